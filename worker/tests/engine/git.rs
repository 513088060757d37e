//! Git sources against a real `git daemon` on 127.0.0.1: raw LLB `git://` sources, ref
//! resolution and caching (a moved branch is fetched again, an unchanged one is cached),
//! subdirectories, and clear errors for unknown refs and escaping subdirs.

use std::collections::HashMap;

use anyhow::{anyhow, Context};
use kiln_e2e::git::{git, GitDaemon};
use kiln_worker::control::{BuildRequest, Engine, EngineConfig, Frontend};
use kiln_worker::image::Platform;
use kiln_worker::llb::builder::{Builder, Output};
use kiln_worker::llb::pb;
use kiln_worker::progress::{Event, Progress};
use tokio_util::sync::CancellationToken;

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
        deferred_locals: Default::default(),
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

    // Submodules are not fetched; a `.gitmodules` file says so in a warning.
    daemon.repo(
        "mods",
        &[(
            ".gitmodules",
            "[submodule \"x\"]\n\tpath = x\n\turl = ../x.git\n",
        )],
    )?;
    let mods = solve(&engine, git_definition(&daemon.url("mods"), "main", &[])).await?;
    let warned = mods.events.iter().any(
        |e| matches!(e, Event::Warning(w) if w.message.contains("submodules are not fetched")),
    );
    assert!(warned, "no submodule warning in {:?}", mods.events);
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
    let err = solve(&engine, git_definition("file:///etc", "main", &[]))
        .await
        .err()
        .ok_or_else(|| anyhow!("a file:// remote must be refused"))?;
    assert!(format!("{err:#}").contains("unsupported remote"), "{err:#}");
    let missing = daemon.url("nothere");
    let err = solve(&engine, git_definition(&missing, "main", &[]))
        .await
        .err()
        .ok_or_else(|| anyhow!("a missing repository should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains(&missing) && msg.contains("main"), "{msg}");
    Ok(())
}
