//! Git sources against a real `git daemon` on 127.0.0.1: raw LLB `git://` sources, ref
//! resolution and caching (a moved branch is fetched again, an unchanged one is cached),
//! subdirectories, and clear errors for unknown refs and escaping subdirs.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use kiln_worker::control::{BuildRequest, Engine, EngineConfig, Frontend};
use kiln_worker::image::Platform;
use kiln_worker::llb::builder::{Builder, Output};
use kiln_worker::llb::pb;
use kiln_worker::progress::{Event, Progress};
use tokio_util::sync::CancellationToken;

/// A `git daemon` serving every repository under its base path.
pub struct GitDaemon {
    child: Child,
    /// Where the repositories live (`<base>/<name>.git`).
    pub base: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "kiln")
        .env("GIT_AUTHOR_EMAIL", "kiln@example.invalid")
        .env("GIT_COMMITTER_NAME", "kiln")
        .env("GIT_COMMITTER_EMAIL", "kiln@example.invalid")
        .output()?;
    if !out.status.success() {
        bail!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl GitDaemon {
    /// Starts the daemon on a free loopback port.
    pub fn start() -> anyhow::Result<GitDaemon> {
        let base = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--export-all")
            .arg("--reuseaddr")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.path().display()))
            .arg(base.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting git daemon")?;
        let addr = format!("127.0.0.1:{port}");
        let d = GitDaemon { child, base, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&d.addr).is_err() {
            if Instant::now() > deadline {
                bail!("git daemon did not listen on {}", d.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    /// Creates `<name>.git` on branch `main` with one commit of `files`; returns the
    /// work tree used to make further commits.
    pub fn repo(&self, name: &str, files: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
        let work = self.base.path().join(format!("{name}.work"));
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q", "-b", "main"])?;
        self.commit(&work, files, "initial")?;
        git(
            self.base.path(),
            &[
                "clone",
                "-q",
                "--bare",
                &format!("{name}.work"),
                &format!("{name}.git"),
            ],
        )?;
        git(
            &work,
            &["remote", "add", "origin", &format!("../{name}.git")],
        )?;
        Ok(work)
    }

    /// Commits `files` in `work` and pushes `main`; returns the commit id.
    pub fn commit(&self, work: &Path, files: &[(&str, &str)], msg: &str) -> anyhow::Result<String> {
        for (p, c) in files {
            let path = work.join(p);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, c)?;
        }
        git(work, &["add", "-A"])?;
        git(work, &["commit", "-q", "-m", msg])?;
        if git(work, &["remote"])?.contains("origin") {
            git(work, &["push", "-q", "origin", "main"])?;
        }
        git(work, &["rev-parse", "HEAD"])
    }

    /// The `git://` URL of `<name>.git`.
    pub fn url(&self, name: &str) -> String {
        format!("git://{}/{name}.git", self.addr)
    }
}

/// A definition with one `git://` source of `url#fragment`.
pub fn git_definition(url: &str, fragment: &str, attrs: &[(&str, &str)]) -> pb::Definition {
    let mut attrs: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    attrs.insert("git.fullurl".into(), url.to_string());
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let identifier = if fragment.is_empty() {
        format!("git://{rest}")
    } else {
        format!("git://{rest}#{fragment}")
    };
    let mut b = Builder::new();
    let src = b.add(
        &pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
            platform: Some(Platform::host().to_pb()),
            constraints: Some(Default::default()),
            ..Default::default()
        },
        None,
    );
    b.marshal(&Output {
        digest: src,
        index: 0,
    })
}

struct Solved {
    out: tempfile::TempDir,
    events: Vec<Event>,
}

impl Solved {
    fn read(&self, p: &str) -> anyhow::Result<String> {
        std::fs::read_to_string(self.out.path().join(p)).with_context(|| p.to_string())
    }

    /// Whether the git source vertex was cached.
    fn source_cached(&self) -> anyhow::Result<bool> {
        self.events
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Vertex(v) if v.name.starts_with("git://") && v.completed.is_some() => {
                    Some(v.cached)
                }
                _ => None,
            })
            .ok_or_else(|| anyhow!("no completed git vertex in {:?}", self.events))
    }
}

async fn solve(engine: &Engine, def: pb::Definition) -> anyhow::Result<Solved> {
    let out = tempfile::tempdir()?;
    let req = BuildRequest {
        frontend: Frontend::Llb(def),
        locals: HashMap::new(),
        exports: vec![super::support::to("local", out.path())],
        session: None,
        secrets: HashMap::new(),
    };
    let (progress, mut rx) = Progress::channel();
    let res = engine.build(req, progress, CancellationToken::new()).await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    res.map_err(|e| anyhow!(kiln_worker::solver::error_chain(&e)))?;
    Ok(Solved { out, events })
}

fn engine() -> anyhow::Result<(tempfile::TempDir, Engine)> {
    let root = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        root: root.path().to_path_buf(),
        max_parallelism: 4,
        ..Default::default()
    })?;
    Ok((root, engine))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_source_fetches_caches_and_follows_a_moved_branch() -> anyhow::Result<()> {
    let daemon = GitDaemon::start()?;
    let work = daemon.repo(
        "app",
        &[("README", "v1\n"), ("svc/main.txt", "service v1\n")],
    )?;
    let url = daemon.url("app");
    let (root, engine) = engine()?;

    let first = solve(&engine, git_definition(&url, "main", &[])).await?;
    assert_eq!(first.read("README")?, "v1\n");
    assert_eq!(first.read("svc/main.txt")?, "service v1\n");
    assert!(!first.out.path().join(".git").exists());
    assert!(!first.source_cached()?);
    // One bare mirror per remote under the worker root.
    assert_eq!(std::fs::read_dir(root.path().join("git"))?.count(), 1);

    let again = solve(&engine, git_definition(&url, "main", &[])).await?;
    assert!(again.source_cached()?, "an unchanged branch must be cached");
    assert_eq!(again.read("README")?, "v1\n");

    let moved = daemon.commit(&work, &[("README", "v2\n")], "second")?;
    let third = solve(&engine, git_definition(&url, "main", &[])).await?;
    assert!(
        !third.source_cached()?,
        "a moved branch must be fetched again"
    );
    assert_eq!(third.read("README")?, "v2\n");

    // A full commit id is used as is; HEAD (no fragment) follows the default branch.
    let pinned = solve(&engine, git_definition(&url, &moved, &[])).await?;
    assert_eq!(pinned.read("README")?, "v2\n");
    let head = solve(&engine, git_definition(&url, "", &[])).await?;
    assert_eq!(head.read("README")?, "v2\n");

    // A subdir takes only that directory, at its root.
    let sub = solve(&engine, git_definition(&url, "main:svc", &[])).await?;
    assert_eq!(sub.read("main.txt")?, "service v1\n");
    assert!(!sub.out.path().join("README").exists());

    // keepgitdir keeps a repository at the commit.
    let kept = solve(
        &engine,
        git_definition(&url, "main", &[("git.keepgitdir", "true")]),
    )
    .await?;
    assert_eq!(kept.read("README")?, "v2\n");
    assert_eq!(git(kept.out.path(), &["rev-parse", "HEAD"])?, moved);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_source_errors_name_remote_and_ref() -> anyhow::Result<()> {
    let daemon = GitDaemon::start()?;
    daemon.repo("app", &[("README", "v1\n")])?;
    let url = daemon.url("app");
    let (_root, engine) = engine()?;
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("nosuchbranch", vec![&url, "nosuchbranch", "no such ref"]),
        ("main:missing", vec![&url, "missing", "does not exist"]),
        ("main:../etc", vec!["\"..\""]),
        ("main:/etc", vec!["must be relative"]),
    ];
    for (fragment, wants) in cases {
        let err = solve(&engine, git_definition(&url, fragment, &[]))
            .await
            .err()
            .ok_or_else(|| anyhow!("{fragment} should fail"))?;
        let msg = format!("{err:#}");
        for want in wants {
            assert!(msg.contains(want), "{fragment}: {msg}");
        }
    }
    let missing = daemon.url("nothere");
    let err = solve(&engine, git_definition(&missing, "main", &[]))
        .await
        .err()
        .ok_or_else(|| anyhow!("a missing repository should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains(&missing) && msg.contains("main"), "{msg}");
    Ok(())
}
