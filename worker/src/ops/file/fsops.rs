//! Filesystem semantics of LLB file actions over plain directories, never leaving the
//! roots they are given: every path of an action is resolved with
//! [`resolve_in_root`], so `..` and symlinks (absolute or relative) stay inside.
//!
//! Copy rules follow BuildKit's file backend ([`copy`]): globs, directory contents,
//! destination directories, chown/chmod/timestamps, include/exclude patterns
//! ([`pattern`]) and Docker-compatible tar auto-extraction (module `unpack`).

mod copy;
pub mod pattern;
mod unpack;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use copy::{copy, copy_checksum};

use crate::llb::pb;
use crate::snapshot::{self, fsutil, resolve_in_root};

/// What can go wrong in a file action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed on a path (shown as inside its root).
    #[error("{op} {path}: {source}")]
    Io {
        /// The action or system call.
        op: &'static str,
        /// The path inside the root.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A source or target does not exist.
    #[error("{op} {path}: not found")]
    NotFound {
        /// The action.
        op: &'static str,
        /// The path as given in the action.
        path: String,
    },
    /// The action cannot be carried out as given.
    #[error("{op} {path}: {message}")]
    Invalid {
        /// The action.
        op: &'static str,
        /// The path as given in the action.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A user or group name could not be resolved.
    #[error("chown: {message}")]
    Owner {
        /// What is wrong (naming the user or group).
        message: String,
    },
    /// Resolving a path inside a root failed (e.g. a symlink loop).
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Module-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

// === helpers ===

/// Shows a host path as the path inside `root` it is.
fn inside(root: &Path, p: &Path) -> String {
    match p.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => p.display().to_string(),
    }
}

/// Converts a snapshot-level error into one naming the path inside `root`.
fn relabel(root: &Path) -> impl Fn(snapshot::Error) -> Error + '_ {
    move |e| match e {
        snapshot::Error::Io { op, path, source } => Error::Io {
            op,
            path: inside(root, &path),
            source,
        },
        other => Error::Snapshot(other),
    }
}

fn io_at<'a>(
    op: &'static str,
    root: &'a Path,
    p: &'a Path,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: inside(root, p),
        source,
    }
}

/// An LLB timestamp (nanoseconds since the epoch, -1 = unset) as (seconds, nanoseconds).
fn timestamp(ts: i64) -> Option<(i64, i64)> {
    (ts != -1).then(|| (ts.div_euclid(1_000_000_000), ts.rem_euclid(1_000_000_000)))
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Creates the missing directories up to `dir` (inside `root`) with mode 0755, `owner`
/// and `mtime`.
fn mkdir_all(root: &Path, dir: &Path, owner: (u32, u32), mtime: Option<(i64, i64)>) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while !exists(cur) {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) if p.starts_with(root) => cur = p,
            _ => break,
        }
    }
    for d in missing.iter().rev() {
        fs::create_dir(d).map_err(io_at("mkdir", root, d))?;
        set_owner_mode_time(root, d, owner, Some(0o755), mtime)?;
    }
    Ok(())
}

fn set_owner_mode_time(
    root: &Path,
    p: &Path,
    owner: (u32, u32),
    mode: Option<u32>,
    mtime: Option<(i64, i64)>,
) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1)).map_err(io_at("chown", root, p))?;
    if let Some(m) = mode {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).map_err(io_at("chmod", root, p))?;
    }
    if let Some((s, ns)) = mtime {
        fsutil::set_mtime(p, s, ns).map_err(relabel(root))?;
    }
    Ok(())
}

/// The parent of `p` must exist as a directory.
fn require_parent(op: &'static str, root: &Path, p: &Path, given: &str) -> Result<()> {
    let parent = p.parent().unwrap_or(root);
    match fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Invalid {
            op,
            path: given.to_string(),
            message: format!("{} is not a directory", inside(root, parent)),
        }),
        Err(_) => Err(Error::NotFound {
            op,
            path: inside(root, parent),
        }),
    }
}

/// Expands a glob `path` inside `root` component by component (symlinks in the
/// non-glob parts followed inside the root); results are host paths, sorted.
fn glob(root: &Path, path: &str) -> Result<Vec<PathBuf>> {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let mut current = vec![String::new()];
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let mut next = Vec::new();
        for base in &current {
            if !pattern::has_meta(comp) {
                next.push(format!("{base}/{comp}"));
                continue;
            }
            let dir = resolve_in_root(root, if base.is_empty() { "/" } else { base }, true)?;
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| pattern::component_matches(comp, n))
                .collect();
            names.sort();
            for n in names {
                next.push(format!("{}/{n}", inside(root, &dir).trim_end_matches('/')));
            }
        }
        current = next;
        if !last && current.is_empty() {
            break;
        }
    }
    let mut out = Vec::new();
    for c in current {
        let p = resolve_in_root(root, &c, false)?;
        if exists(&p) {
            out.push(p);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn passwd_like(user_db_root: Option<&Path>, file: &str) -> Result<Vec<Vec<String>>> {
    let Some(root) = user_db_root else {
        return Ok(Vec::new());
    };
    let p = resolve_in_root(root, &format!("/etc/{file}"), true)?;
    match fs::read_to_string(&p) {
        Ok(s) => Ok(s
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(io_at("read", root, &p)(e)),
    }
}

fn lookup(db: &[Vec<String>], name: &str, idx: usize) -> Option<u32> {
    db.iter()
        .find(|r| r.first().map(String::as_str) == Some(name))
        .and_then(|r| r.get(idx))
        .and_then(|s| s.parse().ok())
}

/// Resolves a ChownOpt: byID directly; byName looked up in /etc/passwd and /etc/group under `user_db_root`.
///
/// A user by ID gets the same group ID unless a group is given; a user by name gets its
/// primary group from `/etc/passwd`. An unknown name is an error naming it.
pub fn resolve_owner(
    owner: Option<&pb::ChownOpt>,
    user_db_root: Option<&Path>,
) -> Result<Option<(u32, u32)>> {
    use pb::user_opt::User;
    let Some(owner) = owner else { return Ok(None) };
    let (mut uid, mut gid) = (0, 0);
    match owner.user.as_ref().and_then(|u| u.user.as_ref()) {
        Some(User::ByName(n)) => {
            let db = passwd_like(user_db_root, "passwd")?;
            uid = lookup(&db, &n.name, 2).ok_or_else(|| Error::Owner {
                message: format!("unknown user {:?} (not in /etc/passwd)", n.name),
            })?;
            gid = lookup(&db, &n.name, 3).unwrap_or(uid);
        }
        Some(User::ById(id)) => {
            uid = *id;
            gid = *id;
        }
        None => {}
    }
    match owner.group.as_ref().and_then(|g| g.user.as_ref()) {
        Some(User::ByName(n)) => {
            let db = passwd_like(user_db_root, "group")?;
            gid = lookup(&db, &n.name, 2).ok_or_else(|| Error::Owner {
                message: format!("unknown group {:?} (not in /etc/group)", n.name),
            })?;
        }
        Some(User::ById(id)) => gid = *id,
        None => {}
    }
    Ok(Some((uid, gid)))
}

// === actions ===

/// Writes a file with `data` and mode `mode & 0777` (replacing a file there; a symlink
/// at the path is followed inside the root).
pub fn mkfile(root: &Path, action: &pb::FileActionMkFile, owner: Option<(u32, u32)>) -> Result<()> {
    let p = resolve_in_root(root, &action.path, true)?;
    require_parent("mkfile", root, &p, &action.path)?;
    if fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
        return Err(Error::Invalid {
            op: "mkfile",
            path: action.path.clone(),
            message: "is a directory".into(),
        });
    }
    fs::write(&p, &action.data).map_err(io_at("mkfile", root, &p))?;
    set_owner_mode_time(
        root,
        &p,
        owner.unwrap_or((0, 0)),
        Some(action.mode as u32 & 0o777),
        timestamp(action.timestamp),
    )
}

/// Creates a directory with mode `mode & 0777`; with `makeParents` missing parents are
/// created (0755) and an existing directory is fine.
pub fn mkdir(root: &Path, action: &pb::FileActionMkDir, owner: Option<(u32, u32)>) -> Result<()> {
    let p = resolve_in_root(root, &action.path, true)?;
    let owner = owner.unwrap_or((0, 0));
    let ts = timestamp(action.timestamp);
    match fs::metadata(&p) {
        Ok(m) if m.is_dir() => {
            if action.make_parents {
                return Ok(());
            }
            return Err(Error::Invalid {
                op: "mkdir",
                path: action.path.clone(),
                message: "file exists".into(),
            });
        }
        Ok(_) => {
            return Err(Error::Invalid {
                op: "mkdir",
                path: action.path.clone(),
                message: "file exists and is not a directory".into(),
            })
        }
        Err(_) => {}
    }
    if action.make_parents {
        if let Some(parent) = p.parent() {
            mkdir_all(root, parent, owner, ts)?;
        }
    } else {
        require_parent("mkdir", root, &p, &action.path)?;
    }
    fs::create_dir(&p).map_err(io_at("mkdir", root, &p))?;
    set_owner_mode_time(root, &p, owner, Some(action.mode as u32 & 0o777), ts)
}

/// Removes a path (directories recursively, a symlink itself, not its target);
/// `allowNotFound` makes a missing path fine, `allowWildcard` expands globs.
pub fn rm(root: &Path, action: &pb::FileActionRm) -> Result<()> {
    let targets = if action.allow_wildcard && pattern::has_meta(&action.path) {
        glob(root, &action.path)?
    } else {
        let p = resolve_in_root(root, &action.path, false)?;
        if exists(&p) {
            vec![p]
        } else {
            Vec::new()
        }
    };
    if targets.is_empty() && !action.allow_not_found {
        return Err(Error::NotFound {
            op: "rm",
            path: action.path.clone(),
        });
    }
    for t in targets {
        if t == root {
            // Removing `/` empties the root but keeps it (it may be a mount point).
            for e in fs::read_dir(root).map_err(io_at("rm", root, root))? {
                let e = e.map_err(io_at("rm", root, root))?;
                fsutil::remove_any(&e.path()).map_err(relabel(root))?;
            }
        } else {
            fsutil::remove_any(&t).map_err(relabel(root))?;
        }
    }
    Ok(())
}

/// Creates the symlink `newpath` pointing at `oldpath` (written verbatim).
pub fn symlink(
    root: &Path,
    action: &pb::FileActionSymlink,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let p = resolve_in_root(root, &action.newpath, false)?;
    require_parent("symlink", root, &p, &action.newpath)?;
    if exists(&p) {
        return Err(Error::Invalid {
            op: "symlink",
            path: action.newpath.clone(),
            message: "file exists".into(),
        });
    }
    std::os::unix::fs::symlink(&action.oldpath, &p).map_err(io_at("symlink", root, &p))?;
    set_owner_mode_time(
        root,
        &p,
        owner.unwrap_or((0, 0)),
        None,
        timestamp(action.timestamp),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink as mklink, MetadataExt};

    fn write(p: &Path, data: &str) -> anyhow::Result<()> {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(p, data)?;
        Ok(())
    }

    fn cp(src: &str, dest: &str) -> pb::FileActionCopy {
        pb::FileActionCopy {
            src: src.into(),
            dest: dest.into(),
            mode: -1,
            timestamp: -1,
            follow_symlink: true,
            ..Default::default()
        }
    }

    struct Roots {
        _t: tempfile::TempDir,
        src: PathBuf,
        dst: PathBuf,
        outside: PathBuf,
    }

    fn roots() -> anyhow::Result<Roots> {
        let t = tempfile::tempdir()?;
        let (src, dst, outside) = (
            t.path().join("src"),
            t.path().join("dst"),
            t.path().join("outside"),
        );
        for d in [&src, &dst, &outside] {
            fs::create_dir_all(d)?;
        }
        Ok(Roots {
            _t: t,
            src,
            dst,
            outside,
        })
    }

    #[test]
    fn copy_file_rules() -> anyhow::Result<()> {
        let r = roots()?;
        write(&r.src.join("a.txt"), "A")?;
        std::os::unix::fs::chown(r.src.join("a.txt"), Some(1234), Some(1234))?;
        fsutil::set_mtime(&r.src.join("a.txt"), 1_000_000, 0).map_err(anyhow::Error::from)?;
        fs::create_dir_all(r.dst.join("existing"))?;

        // Into a dest ending in `/` (created), into an existing dir, and renamed.
        let mut a = cp("/a.txt", "/new/dir/");
        a.create_dest_path = true;
        copy(&r.src, &r.dst, &a, None)?;
        copy(&r.src, &r.dst, &cp("a.txt", "/existing"), None)?;
        copy(&r.src, &r.dst, &cp("/a.txt", "/renamed.txt"), None)?;
        // Without an owner the source's is kept (BuildKit); made directories are root's.
        for p in ["new/dir/a.txt", "existing/a.txt", "renamed.txt"] {
            let m = fs::metadata(r.dst.join(p))?;
            assert_eq!(fs::read_to_string(r.dst.join(p))?, "A", "{p}");
            assert_eq!((m.uid(), m.gid()), (1234, 1234), "{p} owner not kept");
            assert_eq!(m.mtime(), 1_000_000, "{p} mtime not kept");
        }
        let m = fs::metadata(r.dst.join("new/dir"))?;
        assert_eq!((m.uid(), m.gid()), (0, 0), "made directory not root's");
        // Docker ADD mode: a non-archive file without an owner becomes root's.
        let mut a = cp("/a.txt", "/added.txt");
        a.attempt_unpack_docker_compatibility = true;
        copy(&r.src, &r.dst, &a, None)?;
        let m = fs::metadata(r.dst.join("added.txt"))?;
        assert_eq!((m.uid(), m.gid()), (0, 0), "ADD of a plain file not root's");
        // No parent and no createDestPath.
        let e = copy(&r.src, &r.dst, &cp("/a.txt", "/missing/x"), None)
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("/missing"), "{e}");
        // Missing source names it.
        let e = copy(&r.src, &r.dst, &cp("/nope", "/x"), None)
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert_eq!(e.to_string(), "copy /nope: not found");
        Ok(())
    }

    #[test]
    fn copy_dir_contents_and_dirs() -> anyhow::Result<()> {
        let r = roots()?;
        write(&r.src.join("app/x"), "x")?;
        write(&r.src.join("app/sub/y"), "y")?;
        mklink("x", r.src.join("app/lx"))?;
        fs::hard_link(r.src.join("app/x"), r.src.join("app/hx"))?;
        fs::create_dir_all(r.dst.join("into"))?;

        let mut a = cp("/app", "/contents");
        a.dir_copy_contents = true;
        copy(&r.src, &r.dst, &a, None)?;
        assert_eq!(fs::read_to_string(r.dst.join("contents/sub/y"))?, "y");
        assert_eq!(
            fs::read_link(r.dst.join("contents/lx"))?,
            PathBuf::from("x")
        );
        let (m1, m2) = (
            fs::metadata(r.dst.join("contents/x"))?,
            fs::metadata(r.dst.join("contents/hx"))?,
        );
        assert_eq!(m1.ino(), m2.ino(), "hard link not kept");

        copy(&r.src, &r.dst, &cp("/app", "/into"), None)?;
        assert_eq!(fs::read_to_string(r.dst.join("into/app/x"))?, "x");
        copy(&r.src, &r.dst, &cp("/app", "/fresh"), None)?;
        assert_eq!(fs::read_to_string(r.dst.join("fresh/sub/y"))?, "y");
        Ok(())
    }

    #[test]
    fn copy_globs() -> anyhow::Result<()> {
        let r = roots()?;
        write(&r.src.join("d/one.txt"), "1")?;
        write(&r.src.join("d/two.txt"), "2")?;
        write(&r.src.join("d/three.md"), "3")?;
        let mut a = cp("/d/*.txt", "/out/");
        a.allow_wildcard = true;
        a.create_dest_path = true;
        copy(&r.src, &r.dst, &a, None)?;
        let mut names: Vec<String> = fs::read_dir(r.dst.join("out"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        assert_eq!(names, vec!["one.txt", "two.txt"]);
        let mut a = cp("/d/*.rs", "/out/");
        a.allow_wildcard = true;
        let e = copy(&r.src, &r.dst, &a, None)
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("/d/*.rs: not found"), "{e}");
        a.allow_empty_wildcard = true;
        copy(&r.src, &r.dst, &a, None)?;
        // An empty match copies nothing and creates no destination.
        let mut a = cp("/d/*.rs", "/none/");
        a.allow_wildcard = true;
        a.allow_empty_wildcard = true;
        a.create_dest_path = true;
        copy(&r.src, &r.dst, &a, None)?;
        assert!(
            !r.dst.join("none").exists(),
            "destination made for no match"
        );
        // Empty matches need the wildcard's directory; plain paths must exist.
        for src in ["/nodir/*.txt", "/d/missing.txt"] {
            let mut a = cp(src, "/out/");
            a.allow_wildcard = true;
            a.allow_empty_wildcard = true;
            let e = copy(&r.src, &r.dst, &a, None)
                .err()
                .ok_or_else(|| anyhow::anyhow!("{src}: expected an error"))?;
            assert!(e.to_string().contains(&format!("{src}: not found")), "{e}");
        }
        let mut a = cp("/*/t*", "/deep/");
        a.allow_wildcard = true;
        copy(&r.src, &r.dst, &a, None)?;
        assert!(r.dst.join("deep/three.md").exists() && r.dst.join("deep/two.txt").exists());
        Ok(())
    }

    #[test]
    fn copy_chown_chmod_timestamp() -> anyhow::Result<()> {
        let r = roots()?;
        write(&r.src.join("d/f"), "f")?;
        write(&r.src.join("d/s/g"), "g")?;
        let mut a = cp("/d", "/o1");
        a.mode = 0o640;
        a.timestamp = 1_500_000_000_123_456_789;
        copy(&r.src, &r.dst, &a, Some((1000, 1001)))?;
        for p in ["o1", "o1/f", "o1/s", "o1/s/g"] {
            let m = fs::symlink_metadata(r.dst.join(p))?;
            assert_eq!((m.uid(), m.gid()), (1000, 1001), "{p}");
            assert_eq!(m.mode() & 0o7777, 0o640, "{p}");
            assert_eq!(
                (m.mtime(), m.mtime_nsec()),
                (1_500_000_000, 123_456_789),
                "{p}"
            );
        }
        fs::set_permissions(r.src.join("d/f"), fs::Permissions::from_mode(0o644))?;
        let mut a = cp("/d/f", "/o2");
        a.mode_str = "u+x,g-r".into();
        copy(&r.src, &r.dst, &a, None)?;
        assert_eq!(fs::metadata(r.dst.join("o2"))?.mode() & 0o777, 0o704);
        a.mode_str = "0700".into();
        copy(&r.src, &r.dst, &cp("/d/f", "/o3"), None)?;
        copy(&r.src, &r.dst, &a, None)?;
        assert_eq!(fs::metadata(r.dst.join("o2"))?.mode() & 0o777, 0o700);
        Ok(())
    }

    #[test]
    fn copy_symlink_source_cannot_leave_root() -> anyhow::Result<()> {
        let r = roots()?;
        write(&r.outside.join("secret"), "secret")?;
        mklink(r.outside.join("secret"), r.src.join("abs"))?;
        mklink("../outside/secret", r.src.join("rel"))?;
        write(&r.src.join("real"), "inside")?;
        mklink("/real", r.src.join("good"))?;
        for s in ["/abs", "/rel"] {
            let e = copy(&r.src, &r.dst, &cp(s, "/x"), None)
                .err()
                .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
            assert!(e.to_string().contains("not found"), "{e}");
        }
        assert!(!r.dst.join("x").exists());
        copy(&r.src, &r.dst, &cp("/good", "/g"), None)?;
        assert_eq!(fs::read_to_string(r.dst.join("g"))?, "inside");
        let mut a = cp("/abs", "/link");
        a.follow_symlink = false;
        copy(&r.src, &r.dst, &a, None)?;
        assert!(fs::symlink_metadata(r.dst.join("link"))?
            .file_type()
            .is_symlink());
        // A destination symlink pointing out of the root is resolved inside it.
        mklink(&r.outside, r.dst.join("escape"))?;
        copy(&r.src, &r.dst, &cp("/real", "/escape/owned"), None).ok();
        assert!(!r.outside.join("owned").exists());
        Ok(())
    }

    #[test]
    fn copy_include_exclude() -> anyhow::Result<()> {
        let r = roots()?;
        for p in [
            "src/a.rs",
            "src/gen/b.rs",
            "docs/x.md",
            "README.md",
            "Cargo.toml",
        ] {
            write(&r.src.join("p").join(p), p)?;
        }
        let mut a = cp("/p", "/o");
        a.dir_copy_contents = true;
        a.include_patterns = vec!["src".into(), "*.md".into()];
        a.exclude_patterns = vec!["src/gen".into()];
        copy(&r.src, &r.dst, &a, None)?;
        assert!(r.dst.join("o/src/a.rs").exists());
        assert!(r.dst.join("o/README.md").exists());
        assert!(!r.dst.join("o/src/gen").exists());
        assert!(!r.dst.join("o/Cargo.toml").exists());
        assert!(
            !r.dst.join("o/docs").exists(),
            "empty non-included dir created"
        );
        Ok(())
    }

    fn tar_bytes(entries: &[(&str, &[u8])], slip: Option<&str>) -> anyhow::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(33);
            h.set_gid(33);
            h.set_mtime(1_234_567);
            b.append_data(&mut h, name, *data)?;
        }
        if let Some(name) = slip {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(4);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append(&h, &b"evil"[..])?;
        }
        Ok(b.into_inner()?)
    }

    #[test]
    fn copy_unpacks_bzip2_and_xz() -> anyhow::Result<()> {
        let r = roots()?;
        let tar = tar_bytes(&[("b.txt", b"bz"), ("d/x.txt", b"xz")], None)?;
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        std::io::Write::write_all(&mut bz, &tar)?;
        fs::write(r.src.join("a.tar.bz2"), bz.finish()?)?;
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::Cursor::new(&tar), &mut xz)?;
        fs::write(r.src.join("a.txz"), &xz)?;
        // xz magic, then garbage: not an archive, copied as it is.
        let mut bad = xz[..6].to_vec();
        bad.extend_from_slice(b"garbage");
        fs::write(r.src.join("bad.tar.xz"), &bad)?;
        for (src, dest) in [("/a.tar.bz2", "/bz"), ("/a.txz", "/xz")] {
            let mut a = cp(src, dest);
            a.attempt_unpack_docker_compatibility = true;
            copy(&r.src, &r.dst, &a, None)?;
            let d = r.dst.join(&dest[1..]);
            assert_eq!(fs::read_to_string(d.join("b.txt"))?, "bz", "{src}");
            assert_eq!(fs::read_to_string(d.join("d/x.txt"))?, "xz", "{src}");
        }
        let mut a = cp("/bad.tar.xz", "/bad/");
        a.attempt_unpack_docker_compatibility = true;
        a.create_dest_path = true;
        copy(&r.src, &r.dst, &a, None)?;
        assert_eq!(fs::read(r.dst.join("bad/bad.tar.xz"))?, bad);
        Ok(())
    }

    #[test]
    fn copy_unpacks_tars_safely() -> anyhow::Result<()> {
        let r = roots()?;
        fs::write(
            r.src.join("plain.tar"),
            tar_bytes(&[("hello.txt", b"hi"), ("d/e.txt", b"e")], None)?,
        )?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar_bytes(&[("z.txt", b"zz")], None)?)?;
        fs::write(r.src.join("c.tgz"), gz.finish()?)?;
        fs::write(r.src.join("notatar.tar"), "just text")?;
        fs::write(
            r.src.join("slip.tar"),
            tar_bytes(&[("ok", b"ok")], Some("../../x"))?,
        )?;

        let mut a = cp("/plain.tar", "/ex");
        a.attempt_unpack_docker_compatibility = true;
        copy(&r.src, &r.dst, &a, None)?;
        assert_eq!(fs::read_to_string(r.dst.join("ex/hello.txt"))?, "hi");
        assert_eq!(fs::read_to_string(r.dst.join("ex/d/e.txt"))?, "e");
        let m = fs::metadata(r.dst.join("ex/hello.txt"))?;
        assert_eq!((m.uid(), m.mtime()), (33, 1_234_567));
        a.src = "/c.tgz".into();
        copy(&r.src, &r.dst, &a, Some((7, 7)))?;
        assert_eq!(fs::metadata(r.dst.join("ex/z.txt"))?.uid(), 7);
        a.src = "/notatar.tar".into();
        a.dest = "/ex/".into();
        copy(&r.src, &r.dst, &a, None)?;
        assert_eq!(
            fs::read_to_string(r.dst.join("ex/notatar.tar"))?,
            "just text"
        );

        a.src = "/slip.tar".into();
        a.dest = "/sl/deeper".into();
        a.create_dest_path = true;
        let e = copy(&r.src, &r.dst, &a, None)
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("outside"), "{e}");
        assert!(!r.dst.join("x").exists() && !r.dst.join("sl/x").exists());
        assert!(!r
            .dst
            .parent()
            .map(|p| p.join("x").exists())
            .unwrap_or(false));

        // A symlink in the archive pointing out of the root, then a file through it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "evil", &r.outside)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "evil/pwned", &b"pwned"[..])?;
        fs::write(r.src.join("link.tar"), b.into_inner()?)?;
        a.src = "/link.tar".into();
        a.dest = "/lk".into();
        copy(&r.src, &r.dst, &a, None)?;
        assert!(
            !r.outside.join("pwned").exists(),
            "wrote through an escaping symlink"
        );
        let inside_copy = resolve_in_root(&r.dst, "/lk/evil/pwned", true)?;
        assert_eq!(fs::read_to_string(inside_copy)?, "pwned");
        Ok(())
    }

    #[test]
    fn mkfile_mkdir_rm_symlink() -> anyhow::Result<()> {
        let r = roots()?;
        let root = &r.dst;
        mkdir(
            root,
            &pb::FileActionMkDir {
                path: "/a/b/c".into(),
                mode: 0o700,
                make_parents: true,
                timestamp: -1,
                ..Default::default()
            },
            Some((5, 6)),
        )?;
        let m = fs::metadata(root.join("a/b/c"))?;
        assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o700, 5, 6));
        assert_eq!(fs::metadata(root.join("a"))?.mode() & 0o777, 0o755);
        let e = mkdir(
            root,
            &pb::FileActionMkDir {
                path: "/x/y".into(),
                mode: 0o755,
                timestamp: -1,
                ..Default::default()
            },
            None,
        );
        assert!(e.is_err());
        mkfile(
            root,
            &pb::FileActionMkFile {
                path: "/a/f".into(),
                mode: 0o600,
                data: b"data".to_vec(),
                timestamp: 2_000_000_000_000_000_000,
                ..Default::default()
            },
            None,
        )?;
        let m = fs::metadata(root.join("a/f"))?;
        assert_eq!((m.mode() & 0o777, m.mtime()), (0o600, 2_000_000_000));
        assert_eq!(fs::read(root.join("a/f"))?, b"data");
        symlink(
            root,
            &pb::FileActionSymlink {
                oldpath: "/a/f".into(),
                newpath: "/lnk".into(),
                timestamp: -1,
                ..Default::default()
            },
            None,
        )?;
        assert_eq!(fs::read_link(root.join("lnk"))?, PathBuf::from("/a/f"));
        assert!(symlink(
            root,
            &pb::FileActionSymlink {
                oldpath: "x".into(),
                newpath: "/lnk".into(),
                timestamp: -1,
                ..Default::default()
            },
            None
        )
        .is_err());
        // mkfile through an escaping symlink stays inside.
        mklink(&r.outside, root.join("out"))?;
        mkfile(
            root,
            &pb::FileActionMkFile {
                path: "/out".into(),
                mode: 0o644,
                data: b"x".to_vec(),
                timestamp: -1,
                ..Default::default()
            },
            None,
        )
        .ok();
        assert!(fs::read_dir(&r.outside)?.next().is_none());

        // rm removes the link, not its target.
        rm(
            root,
            &pb::FileActionRm {
                path: "/lnk".into(),
                ..Default::default()
            },
        )?;
        assert!(root.join("a/f").exists() && !exists(&root.join("lnk")));
        let e = rm(
            root,
            &pb::FileActionRm {
                path: "/nope".into(),
                ..Default::default()
            },
        )
        .err()
        .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert_eq!(e.to_string(), "rm /nope: not found");
        rm(
            root,
            &pb::FileActionRm {
                path: "/nope".into(),
                allow_not_found: true,
                ..Default::default()
            },
        )?;
        write(&root.join("g/1.log"), "")?;
        write(&root.join("g/2.log"), "")?;
        write(&root.join("g/keep"), "")?;
        rm(
            root,
            &pb::FileActionRm {
                path: "/g/*.log".into(),
                allow_wildcard: true,
                ..Default::default()
            },
        )?;
        assert!(!root.join("g/1.log").exists() && root.join("g/keep").exists());
        rm(
            root,
            &pb::FileActionRm {
                path: "/a".into(),
                ..Default::default()
            },
        )?;
        assert!(!root.join("a").exists());
        // rm via an escaping symlink parent does not touch the outside.
        write(&r.outside.join("precious"), "p")?;
        rm(
            root,
            &pb::FileActionRm {
                path: "/out/precious".into(),
                allow_not_found: true,
                ..Default::default()
            },
        )?;
        assert!(r.outside.join("precious").exists());
        Ok(())
    }

    #[test]
    fn owners_resolve() -> anyhow::Result<()> {
        use pb::user_opt::User;
        let r = roots()?;
        write(
            &r.src.join("etc/passwd"),
            "app:x:1000:1001::/home/app:/bin/sh\n",
        )?;
        write(&r.src.join("etc/group"), "staff:x:50:\n")?;
        let by_name = |n: &str| pb::UserOpt {
            user: Some(User::ByName(pb::NamedUserOpt {
                name: n.into(),
                input: 0,
            })),
        };
        let by_id = |i| pb::UserOpt {
            user: Some(User::ById(i)),
        };
        let o = |u, g| pb::ChownOpt { user: u, group: g };
        assert_eq!(resolve_owner(None, None)?, None);
        assert_eq!(
            resolve_owner(Some(&o(Some(by_id(7)), None)), None)?,
            Some((7, 7))
        );
        assert_eq!(
            resolve_owner(Some(&o(Some(by_name("app")), None)), Some(&r.src))?,
            Some((1000, 1001))
        );
        assert_eq!(
            resolve_owner(
                Some(&o(Some(by_name("app")), Some(by_name("staff")))),
                Some(&r.src)
            )?,
            Some((1000, 50))
        );
        assert_eq!(
            resolve_owner(Some(&o(Some(by_id(3)), Some(by_id(4)))), None)?,
            Some((3, 4))
        );
        let e = resolve_owner(Some(&o(Some(by_name("ghost")), None)), Some(&r.src))
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("ghost"), "{e}");
        Ok(())
    }

    #[test]
    fn checksum_tracks_content_not_times() -> anyhow::Result<()> {
        let r = roots()?;
        for i in 0..10_000 {
            write(
                &r.src.join(format!("tree/d{}/f{i}", i % 100)),
                &format!("content {i}"),
            )?;
        }
        let mut a = cp("/tree", "/");
        a.dir_copy_contents = true;
        // With an owner given, the sources' owners do not matter.
        let root = || pb::UserOpt {
            user: Some(pb::user_opt::User::ById(0)),
        };
        a.owner = Some(pb::ChownOpt {
            user: Some(root()),
            group: Some(root()),
        });
        // Speed is measured by the bench harness, not asserted here.
        let c1 = copy_checksum(&r.src, &a)?;
        assert!(c1.starts_with("sha256:") && c1.len() == 71, "{c1}");
        fsutil::set_mtime(&r.src.join("tree/d5/f5"), 42, 0).map_err(anyhow::Error::from)?;
        std::os::unix::fs::chown(r.src.join("tree/d5/f5"), Some(99), Some(99))?;
        assert_eq!(copy_checksum(&r.src, &a)?, c1);
        fs::write(r.src.join("tree/d5/f5"), "other")?;
        let c2 = copy_checksum(&r.src, &a)?;
        assert_ne!(c2, c1);
        fs::set_permissions(r.src.join("tree/d5/f5"), fs::Permissions::from_mode(0o755))?;
        assert_ne!(copy_checksum(&r.src, &a)?, c2);
        a.exclude_patterns = vec!["d5".into()];
        let c3 = copy_checksum(&r.src, &a)?;
        fs::write(r.src.join("tree/d5/f5"), "excluded change")?;
        assert_eq!(copy_checksum(&r.src, &a)?, c3);
        // Without one the copy keeps them, so they are part of the checksum.
        a.owner = None;
        let c4 = copy_checksum(&r.src, &a)?;
        assert_ne!(c4, c3);
        std::os::unix::fs::chown(r.src.join("tree/d7/f7"), Some(5), Some(5))?;
        assert_ne!(copy_checksum(&r.src, &a)?, c4);
        Ok(())
    }
}
