//! Cache GC with real builds: GC running beside a build leaves that build's inputs alone;
//! a worker root on a small tmpfs collects before a build that would not fit, fails a
//! build GC cannot make room for with a clear "no space left on device" error, and keeps
//! its store consistent; a `[gc]` change in a running daemon's config file applies live.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use kiln_proto::gc::{Limits, Policy, Size};
use kiln_proto::moby::buildkit::v1 as api;
use kiln_worker::cache::{Cache, Ref};
use kiln_worker::control::{BuildRequest, EngineConfig, Frontend};
use kiln_worker::frontend::BuildOpts;
use kiln_worker::image::Platform;
use kiln_worker::progress::{Event, Progress};
use tokio_util::sync::CancellationToken;

use crate::support::{build, env, env_in, project, reopen, to};

/// A tmpfs mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()?;
        if !st.success() {
            bail!("mount -t tmpfs on {} failed: {st}", dir.path().display());
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a mount left under the root by a failed test must not keep it busy.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn free_bytes(p: &Path) -> anyhow::Result<u64> {
    Ok(kiln_worker::cache::gc::disk_space(p)?.free)
}

/// Builds `dir` on `env`, calling `on_event` with every progress event as it arrives.
async fn build_watching(
    env: &crate::support::Env,
    dir: &Path,
    args: &[(&str, &str)],
    exports: Vec<kiln_worker::control::ExportRequest>,
    on_event: impl Fn(&Event) + Send + 'static,
) -> anyhow::Result<Vec<Event>> {
    let mut build_args: BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    build_args.insert("BASE".into(), env.base.clone());
    let opts = BuildOpts {
        filename: "Dockerfile".into(),
        build_args,
        build_platform: Platform::host(),
        context_name: "context".into(),
        ..Default::default()
    };
    let locals = HashMap::from([
        ("context".to_string(), dir.to_path_buf()),
        ("dockerfile".to_string(), dir.to_path_buf()),
    ]);
    let req = BuildRequest {
        frontend: Frontend::Dockerfile {
            opts,
            dockerfile_local: "dockerfile".into(),
        },
        locals,
        deferred_locals: Default::default(),
        exports,
        session: None,
        secrets: HashMap::new(),
    };
    let (progress, mut rx) = Progress::channel();
    let watcher = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            on_event(&e);
            events.push(e);
        }
        events
    });
    env.engine
        .build(req, progress, CancellationToken::new())
        .await
        .map_err(|e| anyhow!(kiln_worker::solver::error_chain(&e)))?;
    Ok(watcher.await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_beside_a_running_build_keeps_that_builds_inputs() -> anyhow::Result<()> {
    let env = env()?;
    // Records no build holds: another project's results.
    let other = project("ARG BASE\nFROM ${BASE}\nRUN echo other > /other\n", &[])?;
    build(&env, other.path(), &[], None, vec![]).await?;
    // The build under test: stage `a`, copied into the final stage, read by a slow RUN.
    // While that RUN runs, GC prunes everything it can, again and again.
    let df = "ARG BASE\nFROM ${BASE} AS a\nRUN head -c 300000 /dev/urandom > /a.bin\n\
              FROM ${BASE}\nCOPY --from=a /a.bin /a.bin\n\
              RUN sleep 3 && sha256sum /a.bin > /sum\n";
    let dir = project(df, &[])?;
    let running = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let pruner = {
        let gc = env.engine.gc().clone();
        let (running, finished) = (running.clone(), finished.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, Vec<u64>)> {
            let (mut runs, mut removed) = (0, Vec::new());
            while !finished.load(Ordering::SeqCst) {
                if running.load(Ordering::SeqCst) {
                    let r = gc.prune(true, &[], Default::default())?;
                    runs += 1;
                    removed.extend(r.removed.iter().map(|u| u.id));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok((runs, removed))
        })
    };
    let out = tempfile::tempdir()?;
    let watch = {
        let (running, finished) = (running.clone(), finished.clone());
        move |e: &Event| {
            if let Event::Vertex(v) = e {
                if v.name.contains("RUN sleep 3") {
                    if v.completed.is_some() || v.error.is_some() {
                        finished.store(true, Ordering::SeqCst);
                    } else if v.started.is_some() {
                        running.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    };
    let res = build_watching(&env, dir.path(), &[], vec![to("local", out.path())], watch).await;
    finished.store(true, Ordering::SeqCst);
    let (runs, removed) = pruner.await??;
    res?;
    assert!(runs >= 10, "only {runs} prunes ran beside the build");
    assert!(
        !removed.is_empty(),
        "the other project's records were not pruned"
    );
    let sum = std::fs::read_to_string(out.path().join("sum"))?;
    assert_eq!(std::fs::read(out.path().join("a.bin"))?.len(), 300_000);
    assert!(sum.ends_with(" /a.bin\n"), "{sum}");
    assert!(out.path().join("bin/busybox").exists());
    // Everything the build held survived: the same build again runs nothing.
    let again = build(&env, dir.path(), &[], None, vec![]).await?;
    assert!(
        again.executed_runs().is_empty(),
        "{:?}",
        again.executed_runs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_collects_first_then_fails_clearly_and_stays_consistent() -> anyhow::Result<()> {
    let disk = Tmpfs::mount("64m")?;
    let root = disk.path().join("root");
    let policy = Policy {
        limits: Limits {
            min_free_space: Some(Size::Bytes(24 << 20)),
            ..Limits::default()
        },
        ..Policy::default()
    };
    let config = |root: &Path| EngineConfig {
        root: root.to_path_buf(),
        max_parallelism: 2,
        gc: policy.clone(),
        ..Default::default()
    };
    let big = |tag: &str, mb: u32| {
        format!(
            "ARG BASE\nFROM ${{BASE}}\nRUN echo {tag} > /tag && head -c {}000000 /dev/urandom > /big\n",
            mb
        )
    };
    let p1 = project(&big("one", 20), &[])?;
    let p2 = project(&big("two", 20), &[])?;
    let p3 = project(&big("three", 20), &[])?;
    let env = env_in(config(&root))?;
    let ids = |env: &crate::support::Env| -> anyhow::Result<Vec<u64>> {
        Ok(env
            .engine
            .worker()
            .cache
            .usage()?
            .iter()
            .map(|u| u.id)
            .collect())
    };
    let gc_runs;
    let env = {
        build(&env, p1.path(), &[], None, vec![]).await?;
        let after1 = ids(&env)?;
        // Last use is kept in seconds: one apart, so the order is certain.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        build(&env, p2.path(), &[], None, vec![]).await?;
        let two: Vec<u64> = ids(&env)?
            .into_iter()
            .filter(|i| !after1.contains(i))
            .collect();
        let one = *after1.iter().max().ok_or_else(|| anyhow!("no layers"))?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let free = free_bytes(&root)?;
        assert!(
            free < 24 << 20,
            "the test needs less free space than the policy's minimum: {free}"
        );
        assert_eq!(env.engine.gc().stats().runs, 0, "no gc was needed yet");
        // 20 MB more would not fit under the limit: GC makes room first (project one,
        // the least recently used), and the build succeeds.
        let third = build(&env, p3.path(), &[], None, vec![]).await?;
        assert_eq!(third.executed_runs().len(), 1);
        let stats = env.engine.gc().stats();
        assert!(
            stats.runs >= 1 && stats.freed_bytes >= 20_000_000,
            "{stats:?}"
        );
        let now = ids(&env)?;
        assert!(
            !now.contains(&one),
            "project one's layer {one} is still there: {now:?}"
        );
        assert!(
            two.iter().all(|i| now.contains(i)),
            "project two's layers {two:?} went: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;

        // More than the whole disk: GC cannot help, the build fails saying why.
        let huge = project(&big("huge", 80), &[])?;
        let err = build(&env, huge.path(), &[], None, vec![])
            .await
            .err()
            .ok_or_else(|| anyhow!("an 80 MB layer cannot fit on a 64 MB disk"))?;
        let msg = err.root_cause().to_string();
        let all = format!("{err:#}");
        eprintln!("full disk error: {all}");
        assert!(
            msg.to_lowercase().contains("no space left on device"),
            "{msg}"
        );
        assert!(
            msg.contains("head -c 80000000"),
            "must name the step: {msg}"
        );
        gc_runs = env.engine.gc().stats().runs;
        env
    };
    assert!(gc_runs >= 2, "gc ran {gc_runs} times");

    // Re-open: every record is complete, a small build works and project three is still
    // cached.
    let env = reopen(env, config(&root))?;
    let usage = env.engine.worker().cache.usage()?;
    for u in &usage {
        let dir = root.join("snapshots").join(u.id.to_string());
        assert!(dir.join("fs").is_dir(), "record {} without files", u.id);
    }
    let leftovers: Vec<String> = std::fs::read_dir(root.join("snapshots"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.parse::<u64>().is_err())
        .collect();
    assert!(
        leftovers.is_empty(),
        "incomplete layers left: {leftovers:?}"
    );
    let small = project("ARG BASE\nFROM ${BASE}\nRUN echo small > /small\n", &[])?;
    let out = tempfile::tempdir()?;
    build(&env, small.path(), &[], None, vec![to("local", out.path())]).await?;
    assert_eq!(
        std::fs::read_to_string(out.path().join("small"))?,
        "small\n"
    );
    let three = build(&env, p3.path(), &[], None, vec![]).await?;
    assert!(
        three.executed_runs().is_empty(),
        "{:?}",
        three.executed_runs()
    );
    drop(env);
    drop(disk);
    Ok(())
}

// === the daemon ===

/// A `kiln-worker` process, killed when dropped.
struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn metrics(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn disk_usage(
    client: &mut api::control_client::ControlClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<api::UsageRecord>> {
    Ok(client
        .disk_usage(api::DiskUsageRequest::default())
        .await?
        .into_inner()
        .record)
}

/// Polls `f` every 100 ms for up to `secs` seconds.
async fn eventually<T>(
    secs: u64,
    what: &str,
    mut f: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gc_change_in_the_config_file_applies_without_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    // Five results of ~1 MB each, one layer each.
    {
        let cache = Cache::open(&root)?;
        for i in 0..5u8 {
            let nl = cache.new_layer()?;
            std::fs::write(nl.fs().join("f"), vec![i; 1 << 20])?;
            let layers = cache.commit_layers(vec![(nl, Vec::new())])?;
            cache.put(&[(format!("k{i}:0"), Ref::new(layers))])?;
        }
    }
    // The ConfigMap layout: the file is a symlink through `..data`, swapped on update.
    let cm = dir.path().join("config");
    let write_config = |gen: u32, text: &str| -> anyhow::Result<()> {
        let data = cm.join(format!("..gen{gen}"));
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("worker.toml"), text)?;
        let tmp = cm.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..gen{gen}"), &tmp)?;
        std::fs::rename(&tmp, cm.join("..data"))?;
        Ok(())
    };
    std::fs::create_dir_all(&cm)?;
    write_config(1, "[gc]\nmax-used-space = \"1Gi\"\ninterval = \"1h\"\n")?;
    std::os::unix::fs::symlink("..data/worker.toml", cm.join("worker.toml"))?;

    let sock = dir.path().join("kiln.sock");
    let port = free_port()?;
    let stderr = dir.path().join("stderr");
    let _daemon = Daemon {
        child: Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
            .arg("--addr")
            .arg(format!("unix://{}", sock.display()))
            .arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(cm.join("worker.toml"))
            .args(["--config-poll-interval", "200ms"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("starting kiln-worker (cargo build -p kiln-worker --bin kiln-worker)")?,
        stderr: stderr.clone(),
    };
    let d = &_daemon;
    eventually(30, "the daemon's socket", async || {
        Ok(sock.exists().then_some(()))
    })
    .await?;
    let channel = tonic::transport::Endpoint::try_from("http://kiln.invalid")?
        .connect_with_connector(tower::service_fn({
            let sock = sock.clone();
            move |_: tonic::transport::Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }
        }))
        .await?;
    let mut client = api::control_client::ControlClient::new(channel);
    // The first run (at start) finds 5 MB under 1 GiB: nothing goes.
    eventually(10, "the first gc run", async || {
        let m = metrics(port).await.unwrap_or_default();
        Ok(metric(&m, "kiln_worker_gc_runs_total")
            .filter(|r| *r >= 1.0)
            .map(|_| m))
    })
    .await?;
    assert_eq!(disk_usage(&mut client).await?.len(), 5);

    // Lower the cap to 2.5 MiB: the three least recently used results go, live.
    write_config(2, "[gc]\nmax-used-space = \"2.5Mi\"\ninterval = \"1h\"\n")?;
    let left = eventually(10, "gc under the new policy", async || {
        let u = disk_usage(&mut client).await?;
        Ok((u.len() < 5).then_some(u))
    })
    .await?;
    assert_eq!(left.len(), 2, "{left:?}\n{}", d.log());
    // The counters move when the run ends (after the files are gone).
    let m = eventually(10, "the freed bytes in the metrics", async || {
        let m = metrics(port).await?;
        let freed = metric(&m, "kiln_worker_gc_freed_bytes_total").unwrap_or(0.0);
        Ok((freed >= 3.0 * (1 << 20) as f64).then_some(m))
    })
    .await?;
    let cache_bytes = metric(&m, "kiln_worker_cache_bytes").unwrap_or(0.0);
    assert!(
        cache_bytes >= 2.0 * (1 << 20) as f64 && cache_bytes <= 2.5 * (1 << 20) as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "kiln_worker_cache_export_queue_depth"),
        Some(0.0),
        "{m}"
    );
    assert!(
        d.log().contains("applied the changed gc policy"),
        "{}",
        d.log()
    );

    // An invalid file is logged and the policy in force kept.
    write_config(3, "[gc]\nmax-used-space = \"a lot\"\n")?;
    eventually(10, "the invalid config to be noticed", async || {
        Ok(d.log().contains("invalid").then_some(()))
    })
    .await?;
    assert!(d.log().contains("gc.max-used-space"), "{}", d.log());
    write_config(4, "[gc]\nmax-used-space = \"1Gi\"\ninterval = \"1h\"\n")?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(disk_usage(&mut client).await?.len(), 2);

    // Prune with a filter and a space target over the same code: keep 1 MiB.
    let pruned: Vec<api::UsageRecord> = {
        use futures::StreamExt;
        let s = client
            .prune(api::PruneRequest {
                filter: vec!["type==regular".into()],
                max_used_space: 3 << 19,
                ..Default::default()
            })
            .await?
            .into_inner();
        s.collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?
    };
    assert_eq!(pruned.len(), 1, "{pruned:?}");
    assert_eq!(pruned[0].record_type, "regular");
    let filtered = client
        .disk_usage(api::DiskUsageRequest {
            filter: vec!["type==source.local".into()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .record;
    assert!(filtered.is_empty(), "{filtered:?}");
    assert_eq!(disk_usage(&mut client).await?.len(), 1);
    let bad = client
        .prune(api::PruneRequest {
            filter: vec!["description~=RUN".into()],
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("a regexp filter must be refused"))?;
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("description~=RUN"),
        "{}",
        bad.message()
    );
    Ok(())
}
