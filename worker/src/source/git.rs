//! Git sources: parses `git://` identifiers, resolves a ref to a commit with `git
//! ls-remote`, keeps one bare repository per remote under the worker root (shallow fetches
//! of the wanted commits, serialized per remote) and checks a commit (or one subdirectory of
//! it) out into a directory. Uses the `git` CLI; credentials go to it through environment
//! config, never through its command line, a log line or a cache key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::{Error, Result};

/// Default secret names BuildKit uses for git credentials.
pub const DEFAULT_TOKEN_SECRET: &str = "GIT_AUTH_TOKEN";
/// Default secret name for a whole `Authorization` header.
pub const DEFAULT_HEADER_SECRET: &str = "GIT_AUTH_HEADER";

/// A parsed `git://` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSpec {
    /// The URL git fetches from (`git.fullurl`, else `https://` + the identifier).
    pub remote: String,
    /// The ref asked for (`HEAD` when none).
    pub reference: String,
    /// A subdirectory of the checkout to keep, relative, without `..`.
    pub subdir: Option<String>,
    /// Keep `.git` in the result.
    pub keep_git_dir: bool,
    /// Secret holding a token for https remotes.
    pub token_secret: String,
    /// Secret holding a whole `Authorization` header value.
    pub header_secret: String,
}

fn git_err(remote: &str, reference: &str, message: impl std::fmt::Display) -> Error {
    Error::Git {
        remote: redact(remote),
        reference: reference.to_string(),
        message: message.to_string(),
    }
}

/// `remote` with any user info (`user:pass@`) removed, for messages.
pub fn redact(remote: &str) -> String {
    if let Some((scheme, rest)) = remote.split_once("://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://{host}{path}");
        }
    }
    remote.to_string()
}

/// Checks a subdirectory: relative, no `..`; returns it without `./` parts and slashes at
/// either end (`None` for the root).
pub fn clean_subdir(subdir: &str) -> std::result::Result<Option<String>, String> {
    if subdir.starts_with('/') {
        return Err(format!("subdir {subdir:?} must be relative"));
    }
    let mut parts = Vec::new();
    for p in subdir.split('/') {
        match p {
            "" | "." => {}
            ".." => return Err(format!("subdir {subdir:?} must not contain \"..\"")),
            p => parts.push(p),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Splits a `#ref:subdir` fragment.
pub fn split_fragment(fragment: &str) -> (String, Option<String>) {
    let (r, sub) = match fragment.split_once(':') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (fragment, None),
    };
    let r = if r.is_empty() { "HEAD" } else { r };
    (r.to_string(), sub.filter(|s| !s.is_empty()))
}

// === impl GitSpec ===

impl GitSpec {
    /// Parses the identifier without `git://` and the op's `git.*` attributes.
    pub fn parse(rest: &str, attrs: &HashMap<String, String>) -> Result<GitSpec> {
        let (location, fragment) = match rest.split_once('#') {
            Some((l, f)) => (l, f),
            None => (rest, ""),
        };
        let remote = match attrs.get("git.fullurl").filter(|u| !u.is_empty()) {
            Some(u) => u.split('#').next().unwrap_or(u).to_string(),
            None => format!("https://{location}"),
        };
        let (reference, subdir) = split_fragment(fragment);
        // Only network transports: a `file://` or plain-path remote would read the worker's
        // own disk, and `ext::` runs commands.
        let allowed = ["git://", "http://", "https://", "ssh://", "git@"];
        if !allowed.iter().any(|p| remote.starts_with(p)) {
            return Err(git_err(
                &remote,
                &reference,
                "unsupported remote (git://, http(s)://, ssh:// or git@host:path)",
            ));
        }
        if location.is_empty() {
            return Err(git_err(
                &remote,
                &reference,
                "the identifier names no remote",
            ));
        }
        if reference.starts_with('-') {
            return Err(git_err(
                &remote,
                &reference,
                "a ref must not start with '-'",
            ));
        }
        let subdir = match subdir {
            Some(s) => clean_subdir(&s).map_err(|e| git_err(&remote, &reference, e))?,
            None => None,
        };
        let keep_git_dir = match attrs.get("git.keepgitdir").map(String::as_str) {
            None | Some("") | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(git_err(
                    &remote,
                    &reference,
                    format!("git.keepgitdir {v:?} is not true or false"),
                ))
            }
        };
        let name = |key: &str, default: &str| {
            attrs
                .get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| default.to_string())
        };
        Ok(GitSpec {
            remote,
            reference,
            subdir,
            keep_git_dir,
            token_secret: name("git.authtokensecret", DEFAULT_TOKEN_SECRET),
            header_secret: name("git.authheadersecret", DEFAULT_HEADER_SECRET),
        })
    }

    /// An error about this source.
    pub fn error(&self, message: impl std::fmt::Display) -> Error {
        git_err(&self.remote, &self.reference, message)
    }

    /// The `Authorization` header for the remote from the build's secrets, if any (https
    /// remotes only).
    pub fn auth_header(&self, secrets: &HashMap<String, Vec<u8>>) -> Option<String> {
        if !self.remote.starts_with("https://") {
            return None;
        }
        if let Some(h) = secrets.get(&self.header_secret) {
            return Some(String::from_utf8_lossy(h).trim().to_string());
        }
        let token = secrets.get(&self.token_secret)?;
        let token = String::from_utf8_lossy(token).trim().to_string();
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
        Some(format!("basic {basic}"))
    }
}

/// A git URL in BuildKit's remote forms, split into remote, ref (`HEAD` when none) and
/// subdir: `git://`, `ssh://`, `git@host:path`, `github.com/…`, and http(s) URLs whose
/// path ends in `.git` or that carry a `#ref` fragment. `None` for anything else.
pub fn parse_url(url: &str) -> Option<(String, String, Option<String>)> {
    let (location, fragment) = match url.split_once('#') {
        Some((l, f)) => (l, Some(f)),
        None => (url, None),
    };
    let is_http = location.starts_with("http://") || location.starts_with("https://");
    let remote = if location.starts_with("git://")
        || location.starts_with("ssh://")
        || location.starts_with("git@")
    {
        location.to_string()
    } else if location.starts_with("github.com/") {
        format!("https://{location}")
    } else if is_http && (location.ends_with(".git") || fragment.is_some()) {
        location.to_string()
    } else {
        return None;
    };
    let (reference, subdir) = split_fragment(fragment.unwrap_or(""));
    Some((remote, reference, subdir))
}

/// The `git://` LLB identifier of a remote (BuildKit uses it for every transport; the real
/// URL goes in `git.fullurl`).
pub fn identifier(remote: &str, reference: &str, subdir: Option<&str>) -> String {
    let bare = match remote.split_once("://") {
        Some((_, rest)) => rest.to_string(),
        None => remote.replacen(':', "/", 1).replacen("git@", "", 1),
    };
    match subdir {
        Some(s) => format!("git://{bare}#{reference}:{s}"),
        None => format!("git://{bare}#{reference}"),
    }
}

/// Whether `s` is a full 40-hex commit id.
pub fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A `git` command with a fixed, non-interactive environment and optional auth header.
fn git(auth: Option<&str>) -> Command {
    let mut c = Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(Stdio::null());
    match auth {
        Some(h) => {
            c.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", format!("Authorization: {h}"));
        }
        None => {
            c.env("GIT_CONFIG_COUNT", "0");
        }
    }
    c
}

/// Runs a command; its stdout on success, its stderr (trimmed) as the error.
fn run(mut c: Command) -> std::result::Result<Vec<u8>, String> {
    let out = c
        .output()
        .map_err(|e| format!("cannot run git: {e} (is git installed?)"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(if err.is_empty() {
            format!("git exited with {}", out.status)
        } else {
            err
        })
    }
}

/// Resolves the spec's ref to a commit id: a full commit id as is, otherwise `git
/// ls-remote` (`HEAD`, a full ref name, a branch, then a tag peeled to its commit).
pub fn resolve(spec: &GitSpec, auth: Option<&str>) -> Result<String> {
    if is_commit_id(&spec.reference) {
        return Ok(spec.reference.to_ascii_lowercase());
    }
    let mut c = git(auth);
    c.args(["ls-remote", "--", &spec.remote]);
    let out = run(c).map_err(|e| spec.error(format!("ls-remote failed: {}", redact(&e))))?;
    let listing = String::from_utf8_lossy(&out);
    let refs: HashMap<&str, &str> = listing
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(id, name)| (name, id))
        .collect();
    let r = &spec.reference;
    let candidates = [
        format!("{r}^{{}}"),
        r.clone(),
        format!("refs/heads/{r}"),
        format!("refs/tags/{r}^{{}}"),
        format!("refs/tags/{r}"),
    ];
    candidates
        .iter()
        .find_map(|c| refs.get(c.as_str()))
        .map(|id| id.to_string())
        .ok_or_else(|| spec.error("no such ref on the remote"))
}

static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

/// The bare repository of `remote` under `root` and the lock serializing its users.
pub fn repo_for(root: &Path, remote: &str) -> (PathBuf, Arc<tokio::sync::Mutex<()>>) {
    let dir = root
        .join("git")
        .join(hex::encode(Sha256::digest(remote.as_bytes())));
    let lock = LOCKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(dir.clone())
        .or_default()
        .clone();
    (dir, lock)
}

fn has_commit(repo: &Path, commit: &str) -> bool {
    let mut c = git(None);
    c.arg("--git-dir")
        .arg(repo)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")]);
    run(c).is_ok()
}

/// Makes sure the bare `repo` holds `commit`, fetching it shallowly when it does not.
/// Returns whether a fetch happened. Callers hold the repo's lock.
pub fn ensure_commit(
    repo: &Path,
    spec: &GitSpec,
    commit: &str,
    auth: Option<&str>,
) -> Result<bool> {
    if !repo.join("HEAD").exists() {
        std::fs::create_dir_all(repo)
            .map_err(|e| spec.error(format!("{}: {e}", repo.display())))?;
        let mut c = git(None);
        c.args(["init", "--bare", "-q"]).arg(repo);
        run(c).map_err(|e| spec.error(format!("init of the local mirror failed: {e}")))?;
    } else if has_commit(repo, commit) {
        return Ok(false);
    }
    let fetch = |what: &str| {
        let mut c = git(auth);
        c.arg("--git-dir")
            .arg(repo)
            .args([
                "-c",
                "gc.auto=0",
                "fetch",
                "-q",
                "--depth",
                "1",
                "--no-tags",
                "--",
            ])
            .arg(&spec.remote)
            .arg(format!("+{what}:refs/kiln/fetch"));
        run(c)
    };
    // Fetch by name first (every server allows it); when the name moved since it was
    // resolved, or the ref is a commit id, fetch the commit itself.
    let mut errors = Vec::new();
    if !is_commit_id(&spec.reference) {
        if let Err(e) = fetch(&spec.reference) {
            errors.push(e);
        }
    }
    if !has_commit(repo, commit) {
        if let Err(e) = fetch(commit) {
            errors.push(e);
        }
    }
    if !has_commit(repo, commit) {
        let why = errors
            .iter()
            .map(|e| redact(e))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(spec.error(format!("fetching commit {commit} failed: {why}")));
    }
    let mut c = git(None);
    c.arg("--git-dir")
        .arg(repo)
        .args(["update-ref", &format!("refs/kiln/{commit}"), commit]);
    run(c).map_err(|e| spec.error(format!("recording commit {commit}: {e}")))?;
    Ok(true)
}

/// Checks `commit` (or its `subdir`) out of the bare `repo` into the empty directory
/// `dest`; with `keep_git_dir` (no subdir) `dest/.git` is a repository at that commit.
/// Returns whether the checkout has a `.gitmodules` file (submodules are not fetched).
pub fn checkout(repo: &Path, spec: &GitSpec, commit: &str, dest: &Path) -> Result<bool> {
    let treeish = match &spec.subdir {
        Some(s) => format!("{commit}:{s}"),
        None => commit.to_string(),
    };
    let mut c = git(None);
    c.arg("--git-dir")
        .arg(repo)
        .args(["cat-file", "-t", &treeish]);
    let kind = run(c).map_err(|_| match &spec.subdir {
        Some(s) => spec.error(format!("subdir {s:?} does not exist at commit {commit}")),
        None => spec.error(format!("commit {commit} is missing from the local mirror")),
    })?;
    let kind = String::from_utf8_lossy(&kind);
    let want = if spec.subdir.is_some() {
        "tree"
    } else {
        "commit"
    };
    if kind.trim() != want {
        return Err(spec.error(format!(
            "subdir {:?} is not a directory at commit {commit}",
            spec.subdir.as_deref().unwrap_or("")
        )));
    }
    if spec.keep_git_dir && spec.subdir.is_none() {
        let mut c = git(None);
        c.args(["init", "-q"]).arg(dest);
        run(c).map_err(|e| spec.error(format!("init of the checkout failed: {e}")))?;
        let mut c = git(None);
        c.arg("-C")
            .arg(dest)
            .args(["fetch", "-q", "--depth", "1", "--no-tags"])
            .arg(repo)
            .arg(format!("refs/kiln/{commit}"));
        run(c).map_err(|e| spec.error(format!("copying commit {commit}: {e}")))?;
        let mut c = git(None);
        c.arg("-C")
            .arg(dest)
            .args(["-c", "advice.detachedHead=false", "checkout", "-q", commit]);
        run(c).map_err(|e| spec.error(format!("checkout of {commit} failed: {e}")))?;
        let mut c = git(None);
        c.arg("-C")
            .arg(dest)
            .args(["remote", "add", "origin", &redact(&spec.remote)]);
        run(c).map_err(|e| spec.error(format!("setting origin: {e}")))?;
    } else {
        let tmp = tempfile::tempdir().map_err(|e| spec.error(format!("temp index: {e}")))?;
        let index = tmp.path().join("index");
        for args in [
            vec!["read-tree", treeish.as_str()],
            vec!["checkout-index", "-a", "-f"],
        ] {
            let mut c = git(None);
            c.arg("--git-dir")
                .arg(repo)
                .arg("--work-tree")
                .arg(dest)
                .env("GIT_INDEX_FILE", &index)
                .args(&args);
            run(c).map_err(|e| spec.error(format!("checkout of {treeish} failed: {e}")))?;
        }
    }
    Ok(dest.join(".gitmodules").exists())
}
