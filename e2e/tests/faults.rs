//! Faults on a real fleet on loopback (real `kiln-worker`, `kiln-gateway`, `kiln`, runc and
//! `docker-registry` processes): a worker killed with SIGKILL mid-RUN, mid-push, mid pool
//! export, mid context upload and mid-GC, and restarted on the same root; the gateway
//! killed mid-build; the registry down and back; a network partition between the gateway
//! and one of three workers, and a silent one (a frozen link) mid-build. No timed
//! assertions: each test waits on what it can observe (progress lines, `runc list`,
//! metrics, bytes through a forwarder, the store on disk), with generous limits that only
//! turn a hang into a failure.
//!
//! Image digests are compared with a clean build on a fresh root: the projects are made
//! reproducible (files with fixed mtimes copied out of the RUN stage, `SOURCE_DATE_EPOCH`
//! set on the workers).

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use kiln_e2e::fleet::{self, Proc};
use kiln_e2e::netfault::{Forwarder, StoppableRegistry};
use kiln_e2e::registry::Registry;

/// Limit after which a wait is a hang (never reached when things work).
const HANG: Duration = Duration::from_secs(120);

/// The RUN step blocks (sleeps) when the `gate` secret says `block`, and runs through when
/// it says `go`; secrets are not part of the cache key, so both are the same step. What the
/// stage makes has fixed mtimes and is copied into the final image, so the image digest is
/// the same on every clean build.
const GATED: &str = "ARG BASE\n\
FROM ${BASE} AS work\n\
RUN --mount=type=secret,id=gate sh -c 'if [ \"$(cat /run/secrets/gate)\" = block ]; then sleep 600; fi; \
mkdir -p /out && echo made > /out/f && touch -d @0 /out/f /out'\n\
FROM ${BASE}\n\
COPY --from=work /out /out\n";

/// The binaries, and the registry holding the busybox base image.
struct Env {
    bins: PathBuf,
    base_reg: Registry,
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> anyhow::Result<Env> {
        let bins = fleet::ensure_binaries()?;
        let base_reg = Registry::start()?;
        kiln_e2e::base::push_base(&base_reg.addr(), "kiln/base:1")?;
        Ok(Env {
            bins,
            base_reg,
            tmp: tempfile::tempdir()?,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn base_arg(&self) -> String {
        format!("BASE={}/kiln/base:1", self.base_reg.addr())
    }

    /// A project dir with `Dockerfile` and the `gate-block` / `gate-go` secret files.
    fn project(&self, name: &str, dockerfile: &str) -> anyhow::Result<PathBuf> {
        let d = self.path(name);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("Dockerfile"), dockerfile)?;
        std::fs::write(self.path(&format!("{name}.block")), "block")?;
        std::fs::write(self.path(&format!("{name}.go")), "go")?;
        Ok(d)
    }

    /// `kiln build --addr tcp://addr` of `project` with `gate` (`block` or `go`) and
    /// `extra` flags; rawjson progress on stderr.
    fn build_cmd(&self, addr: &str, project: &Path, gate: &str, extra: &[&str]) -> Command {
        let secret = format!("id=gate,src={}.{gate}", project.display());
        let mut cmd = Command::new(self.bins.join("kiln"));
        cmd.args(["build", "--addr", &format!("tcp://{addr}")])
            .args(["--progress", "rawjson", "--build-arg", &self.base_arg()])
            .args(["--secret", &secret])
            .args(extra)
            .arg(project);
        cmd
    }

    /// Runs a build to its end; fails with its stderr when it fails.
    fn build(
        &self,
        addr: &str,
        project: &Path,
        gate: &str,
        extra: &[&str],
    ) -> anyhow::Result<Output> {
        let mut cmd = self.build_cmd(addr, project, gate, extra);
        let out = run_bounded(&mut cmd)?;
        if !out.status.success() {
            bail!(
                "kiln build of {} failed: {}\n{}",
                project.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Builds and pushes `project` as `name`; returns the manifest digest printed.
    fn push(&self, addr: &str, project: &Path, name: &str) -> anyhow::Result<String> {
        let out = self.build(addr, project, "go", &["-t", name, "--push"])?;
        digest_of(&out)
    }
}

fn digest_of(out: &Output) -> anyhow::Result<String> {
    let d = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !d.starts_with("sha256:") {
        bail!("no digest on stdout: {d:?}");
    }
    Ok(d)
}

/// Runs `cmd` to its end with output captured, killing it (and failing) after [`HANG`].
fn run_bounded(cmd: &mut Command) -> anyhow::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_bounded(child)
}

/// Waits for `child`'s end and output, killing it (and failing) after [`HANG`].
fn wait_bounded(child: Child) -> anyhow::Result<Output> {
    wait_bounded_for(child, HANG)
}

/// [`wait_bounded`] with another limit.
fn wait_bounded_for(child: Child, limit: Duration) -> anyhow::Result<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            bail!("process {pid} still running after {limit:?} (hang)")
        }
    }
}

/// A `kiln-worker` on `127.0.0.1:port` (plaintext) with state in `dir/state`, its log in
/// `dir/<name>-<n>.log` (one per start), `SOURCE_DATE_EPOCH=0`, and `extra` flags.
struct Worker {
    name: String,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    starts: usize,
    proc: Option<Proc>,
}

impl Worker {
    fn new(name: &str, dir: &Path, extra: &[&str]) -> anyhow::Result<Worker> {
        std::fs::create_dir_all(dir)?;
        Ok(Worker {
            name: name.to_string(),
            port: fleet::free_port()?,
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            proc: None,
        })
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn root(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn start(&mut self, bins: &Path) -> anyhow::Result<()> {
        self.starts += 1;
        let mut cmd = Command::new(bins.join("kiln-worker"));
        cmd.args([
            "--addr",
            &format!("tcp://{}", self.addr()),
            "--insecure-tcp",
        ])
        .args(["--worker-id", &self.name])
        .arg("--root")
        .arg(self.root())
        .args(&self.extra)
        .env("SOURCE_DATE_EPOCH", "0");
        let log = self.dir.join(format!("{}-{}.log", self.name, self.starts));
        let mut p = Proc::spawn(&self.name, cmd, &log)?;
        let start = Instant::now();
        loop {
            p.check_running()?;
            if std::net::TcpStream::connect(self.addr()).is_ok() {
                break;
            }
            if start.elapsed() > HANG {
                bail!(
                    "{} does not listen after {HANG:?}:\n{}",
                    self.name,
                    p.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(p);
        Ok(())
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Every log this worker wrote, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for n in 1..=self.starts {
            let log = self.dir.join(format!("{}-{n}.log", self.name));
            s.push_str(&format!("--- {}:\n", log.display()));
            s.push_str(&std::fs::read_to_string(&log).unwrap_or_default());
        }
        s
    }

    /// Containers in the worker's runc state dir.
    fn containers(&self) -> anyhow::Result<Vec<String>> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(self.root().join("executor/runc"))
            .args(["list", "-q"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Mount points below the worker's root, from /proc/self/mountinfo.
    fn mounts(&self) -> anyhow::Result<Vec<String>> {
        let root = std::fs::canonicalize(self.root())?;
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&root))
            .map(str::to_string)
            .collect())
    }
}

/// Reads rawjson progress lines from `reader` until `pred` holds for one (parsed); returns
/// the lines read. Fails when the stream ends first.
fn read_until(
    reader: &mut impl BufRead,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!(
                "progress ended before {what}:\n{}",
                seen.join("").chars().take(20_000).collect::<String>()
            );
        }
        seen.push(line.clone());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if pred(&v) {
                return Ok(seen);
            }
        }
    }
}

/// Whether a rawjson status has a vertex whose name contains `name` that has started and
/// not completed.
fn vertex_running(v: &serde_json::Value, name: &str) -> bool {
    v["vertexes"].as_array().is_some_and(|vs| {
        vs.iter().any(|x| {
            x["name"].as_str().is_some_and(|n| n.contains(name))
                && !x["started"].is_null()
                && x["completed"].is_null()
        })
    })
}

/// Polls `f` every 100 ms until it returns `Some`, failing with `what` after [`HANG`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > HANG {
            bail!("{what}: not after {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a build that will be interrupted, with stderr piped; returns the child and a
/// reader of its progress.
fn spawn_build(
    mut cmd: Command,
) -> anyhow::Result<(Child, std::io::BufReader<std::process::ChildStderr>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    Ok((child, std::io::BufReader::new(stderr)))
}

/// Reads the rest of an interrupted client's progress and waits for its end (bounded);
/// returns its exit status and the rest of stderr.
fn finish_interrupted(
    child: Child,
    reader: std::io::BufReader<std::process::ChildStderr>,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    finish_interrupted_within(child, reader, HANG)
}

/// [`finish_interrupted`], calling it a hang only after `limit`.
fn finish_interrupted_within(
    child: Child,
    mut reader: std::io::BufReader<std::process::ChildStderr>,
    limit: Duration,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut s);
        s
    });
    let out = wait_bounded_for(child, limit)?;
    let rest = rest.join().map_err(|_| anyhow!("stderr reader panicked"))?;
    Ok((out.status, rest))
}

/// A worker killed with SIGKILL while a RUN step's container runs: after the restart on the
/// same root no container or mount of the killed run is left, the store opens, and the
/// next build of the project gives the digest of a clean build on a fresh root.
#[test]
fn kill_9_mid_run_then_restart_builds_the_clean_digest() -> anyhow::Result<()> {
    let env = Env::new()?;
    let project = env.project("gated", GATED)?;
    let mut w = Worker::new("w0", &env.path("w0"), &[])?;
    w.start(&env.bins)?;
    let result = (|| -> anyhow::Result<()> {
        let (child, mut progress) = spawn_build(env.build_cmd(&w.addr(), &project, "block", &[]))?;
        read_until(&mut progress, "the RUN step started", |v| {
            vertex_running(v, "RUN --mount=type=secret")
        })?;
        let running = wait_for("the RUN step's container runs", || {
            let c = w.containers()?;
            Ok((!c.is_empty()).then_some(c))
        })?;
        let mounts_before = w.mounts()?;
        w.kill();
        complete_records_only(&w.root(), "mid-RUN")?;
        let (status, rest) = finish_interrupted(child, progress)?;
        assert!(!status.success(), "the client of a killed worker exited 0");
        eprintln!(
            "killed mid-RUN: containers {running:?}, {} mounts under the root; client: {}",
            mounts_before.len(),
            rest.lines().last().unwrap_or_default()
        );
        assert_eq!(
            w.containers()?,
            running,
            "the killed worker's container should outlive it until the restart"
        );

        w.start(&env.bins)?;
        assert_eq!(
            w.containers()?,
            Vec::<String>::new(),
            "containers left after the restart"
        );
        assert_eq!(
            w.mounts()?,
            Vec::<String>::new(),
            "mounts left after the restart"
        );
        let scratch = std::fs::read_dir(w.root().join("mounts"))?.count();
        assert_eq!(scratch, 0, "scratch dirs of the killed run left in mounts/");
        for e in std::fs::read_dir(w.root().join("snapshots"))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            assert!(
                name.parse::<u64>().is_ok(),
                "unfinished snapshot {name} left after the restart"
            );
        }
        let name = format!("{}/kiln/after-kill:1", env.base_reg.addr());
        let after = env.push(&w.addr(), &project, &name)?;

        let mut clean = Worker::new("clean", &env.path("clean"), &[])?;
        clean.start(&env.bins)?;
        let name = format!("{}/kiln/clean:1", env.base_reg.addr());
        let expected = env.push(&clean.addr(), &project, &name)?;
        assert_eq!(
            after, expected,
            "the rebuild after kill -9 differs from a clean build"
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// A deterministic incompressible file of `len` bytes (xorshift), mtime fixed at 0.
fn write_noise(path: &Path, len: usize) -> anyhow::Result<()> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data)?;
    let st = Command::new("touch")
        .args(["-d", "@0"])
        .arg(path)
        .status()?;
    if !st.success() {
        bail!("touch -d @0 {} failed", path.display());
    }
    Ok(())
}

/// A worker killed with SIGKILL while it pushes a 24 MiB layer (through a forwarder slowed
/// to 4 MiB/s, so the push takes seconds): after the restart the same build pushes again,
/// and its digest is that of a clean build on a fresh root; the registry serves the image.
#[test]
fn kill_9_mid_push_then_restart_pushes_the_clean_digest() -> anyhow::Result<()> {
    let env = Env::new()?;
    let df = format!("{GATED}COPY noise /noise\n");
    let project = env.project("big", &df)?;
    write_noise(&project.join("noise"), 24 << 20)?;
    let slow = Forwarder::start(&env.base_reg.addr())?;
    slow.set_rate(4 << 20);
    let mut w = Worker::new("w0", &env.path("w0"), &[])?;
    w.start(&env.bins)?;
    let result = (|| -> anyhow::Result<()> {
        let name = format!("{}/kiln/big:1", slow.addr());
        let args = ["-t", name.as_str(), "--push"];
        let (child, mut progress) = spawn_build(env.build_cmd(&w.addr(), &project, "go", &args))?;
        // Killed once the push has sent some bytes and not all.
        read_until(&mut progress, "the push under way", |v| {
            v["statuses"].as_array().is_some_and(|ss| {
                ss.iter().any(|s| {
                    s["id"].as_str().is_some_and(|id| id.starts_with("pushing"))
                        && s["current"].as_u64().unwrap_or(0) > 0
                        && s["completed"].is_null()
                })
            })
        })?;
        w.kill();
        complete_records_only(&w.root(), "mid-push")?;
        let (status, rest) = finish_interrupted(child, progress)?;
        assert!(!status.success(), "the client of a killed worker exited 0");
        eprintln!(
            "killed mid-push; client: {}",
            rest.lines().last().unwrap_or_default()
        );
        let r = kiln_e2e::http::get(
            &env.base_reg.addr(),
            "/v2/kiln/big/manifests/1",
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        )?;
        assert_eq!(r.status, 404, "a manifest was pushed before the kill");

        w.start(&env.bins)?;
        slow.set_rate(0);
        let after = env.push(&w.addr(), &project, &name)?;
        let mut clean = Worker::new("clean", &env.path("clean"), &[])?;
        clean.start(&env.bins)?;
        let clean_name = format!("{}/kiln/big-clean:1", env.base_reg.addr());
        let expected = env.push(&clean.addr(), &project, &clean_name)?;
        assert_eq!(
            after, expected,
            "the push after kill -9 differs from a clean build"
        );
        let r = kiln_e2e::http::get(
            &env.base_reg.addr(),
            &format!("/v2/kiln/big/manifests/{after}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        )?;
        assert_eq!(r.status, 200, "the registry lacks the pushed manifest");
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// A started worker `w0` whose pool cache (`kiln/pool`) is reached through a forwarder
/// slowed to `rate` bytes/s, with metrics on; returns the forwarder, the pool reference,
/// the metrics address and the worker.
fn pool_worker(env: &Env, rate: u64) -> anyhow::Result<(Forwarder, String, String, Worker)> {
    let slow = Forwarder::start(&env.base_reg.addr())?;
    slow.set_rate(rate);
    let pool = format!("{}/kiln/pool", slow.addr());
    let metrics = format!("127.0.0.1:{}", fleet::free_port()?);
    let mut w = Worker::new(
        "w0",
        &env.path("w0"),
        &["--cache-registry", &pool, "--metrics-addr", &metrics],
    )?;
    w.start(&env.bins)?;
    Ok((slow, pool, metrics, w))
}

/// A worker killed with SIGKILL while its pool cache exports a 24 MiB layer in the
/// background (the pool registry behind a forwarder slowed to 4 MiB/s; killed once a MiB
/// went through and the export queue is not empty). Restarted, it queues the export again
/// from its journal and builds the project again; a fresh worker sharing the same pool
/// then runs no RUN step and builds the digest of a clean build on a fresh root without a
/// pool, so the pool holds nothing half-written that is served and lost nothing.
#[test]
fn kill_9_mid_pool_export_leaves_the_pool_usable() -> anyhow::Result<()> {
    let env = Env::new()?;
    let df = format!("{GATED}COPY noise /noise\n");
    let project = env.project("big", &df)?;
    write_noise(&project.join("noise"), 24 << 20)?;
    let (slow, pool, metrics, mut w) = pool_worker(&env, 4 << 20)?;
    let result = (|| -> anyhow::Result<()> {
        let out = env.path("out");
        let dest = format!("type=local,dest={}", out.display());
        env.build(&w.addr(), &project, "go", &["-o", &dest])?;
        let depth = |text: &str| -> f64 {
            text.lines()
                .filter_map(|l| l.strip_prefix("kiln_worker_cache_export_queue_depth "))
                .filter_map(|n| n.trim().parse().ok())
                .next()
                .unwrap_or(0.0)
        };
        let seen = wait_for("the pool export under way", || {
            let r = kiln_e2e::http::get(&metrics, "/metrics", &[])?;
            let d = depth(&String::from_utf8_lossy(&r.body));
            Ok((d > 0.0 && slow.bytes() > 1 << 20).then_some((d, slow.bytes())))
        })?;
        w.kill();
        complete_records_only(&w.root(), "mid pool export")?;
        eprintln!(
            "killed mid pool export: queue depth {}, {} bytes through to the registry",
            seen.0, seen.1
        );

        w.start(&env.bins)?;
        slow.set_rate(0);
        let _ = std::fs::remove_dir_all(&out);
        env.build(&w.addr(), &project, "go", &["-o", &dest])?;
        assert_eq!(std::fs::read_to_string(out.join("out/f"))?, "made\n");
        assert_eq!(
            std::fs::metadata(out.join("noise"))?.len(),
            24 << 20,
            "the rebuilt noise file has the wrong size"
        );

        // Whatever the restarted worker exports (if anything) is done before another
        // worker looks at the pool.
        wait_for("the export queue drained", || {
            let r = kiln_e2e::http::get(&metrics, "/metrics", &[])?;
            Ok((depth(&String::from_utf8_lossy(&r.body)) == 0.0).then_some(()))
        })?;
        let mut sharing = Worker::new("w1", &env.path("w1"), &["--cache-registry", &pool])?;
        sharing.start(&env.bins)?;
        let name = format!("{}/kiln/from-pool:1", env.base_reg.addr());
        let from_pool = env.build(&sharing.addr(), &project, "go", &["-t", &name, "--push"])?;
        let vertices = rawjson_vertices(&from_pool.stderr);
        // The restarted worker queued the killed export again from its journal (its
        // rebuild was a local hit, which exports nothing): the pool has the RUN's result.
        let ran: Vec<_> = vertices
            .iter()
            .filter(|(name, cached)| name.contains("RUN") && !cached)
            .collect();
        anyhow::ensure!(
            ran.is_empty(),
            "the export killed mid-way was lost: the sharing worker ran {ran:?}"
        );
        let tags = kiln_e2e::http::get(&env.base_reg.addr(), "/v2/kiln/pool/tags/list", &[])?;
        eprintln!(
            "pool tags: {}; the worker sharing the pool: {vertices:?}",
            String::from_utf8_lossy(&tags.body)
        );
        let from_pool = digest_of(&from_pool)?;
        let mut clean = Worker::new("clean", &env.path("clean"), &[])?;
        clean.start(&env.bins)?;
        let name = format!("{}/kiln/pool-clean:1", env.base_reg.addr());
        let expected = env.push(&clean.addr(), &project, &name)?;
        assert_eq!(
            from_pool, expected,
            "a build from the pool a killed export wrote differs from a clean build"
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// SIGTERM while a RUN step runs and the pool registry is slow (2 MiB/s): the worker stops
/// being ready and stops taking connections, but the running build finishes and succeeds,
/// the pool cache's export of its 8 MiB result completes, and only then does the worker
/// exit, with status 0. A fresh worker sharing the pool then builds the project executing
/// no RUN step: nothing the stopping worker owed the pool was lost.
#[test]
fn sigterm_finishes_running_builds_and_pool_exports_before_exiting() -> anyhow::Result<()> {
    let env = Env::new()?;
    let df = "ARG BASE\nFROM ${BASE}\nRUN sh -c 'sleep 3; head -c 8388608 /dev/urandom > /noise'\n";
    let project = env.project("term", df)?;
    let (slow, pool, metrics, mut w) = pool_worker(&env, 2 << 20)?;
    let result = (|| -> anyhow::Result<()> {
        let (child, mut reader) = spawn_build(env.build_cmd(&w.addr(), &project, "go", &[]))?;
        read_until(&mut reader, "the RUN step", |v| vertex_running(v, "RUN sh"))?;
        w.proc
            .as_ref()
            .ok_or_else(|| anyhow!("worker not running"))?
            .signal(nix::sys::signal::Signal::SIGTERM)?;

        // Draining: not ready, and a new client cannot reach it.
        wait_for("/readyz failing", || {
            let r = kiln_e2e::http::get(&metrics, "/readyz", &[])?;
            Ok((r.status != 200).then_some(()))
        })?;
        let refused = run_bounded(&mut env.build_cmd(&w.addr(), &project, "go", &[]))?;
        assert!(
            !refused.status.success(),
            "a build started on a draining worker"
        );

        let (status, rest) = finish_interrupted(child, reader)?;
        assert!(
            status.success(),
            "the build running at SIGTERM failed: {status}\n{}",
            rest.chars().take(4000).collect::<String>()
        );
        let proc = w
            .proc
            .as_mut()
            .ok_or_else(|| anyhow!("worker not running"))?;
        let exit = proc.wait_exit(HANG)?;
        assert!(exit.success(), "the drained worker exited with {exit}");
        let log = proc.output();
        assert!(log.contains("pool exports done"), "{log}");
        assert!(
            slow.bytes() > 8 << 20,
            "only {} bytes reached the pool registry",
            slow.bytes()
        );

        slow.set_rate(0);
        let mut sharing = Worker::new("w1", &env.path("w1"), &["--cache-registry", &pool])?;
        sharing.start(&env.bins)?;
        let out = env.build(&sharing.addr(), &project, "go", &[])?;
        let ran: Vec<_> = rawjson_vertices(&out.stderr)
            .into_iter()
            .filter(|(name, cached)| name.contains("RUN") && !cached)
            .collect();
        assert!(
            ran.is_empty(),
            "the pool lacked the drained worker's result: ran {ran:?}"
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// A worker killed with SIGKILL while it receives a 24 MiB context file (the client
/// reaches it through a forwarder slowed to 4 MiB/s; killed once 6 MiB went through): the
/// context kept for the session's shared key is half written. Restarted, the next build
/// from the same directory outputs the file byte for byte.
#[test]
fn kill_9_mid_context_upload_then_rebuild_has_the_whole_file() -> anyhow::Result<()> {
    let env = Env::new()?;
    let project = env.project("ctx", "ARG BASE\nFROM ${BASE}\nCOPY noise /noise\n")?;
    write_noise(&project.join("noise"), 24 << 20)?;
    let mut w = Worker::new("w0", &env.path("w0"), &[])?;
    w.start(&env.bins)?;
    let slow = Forwarder::start(&w.addr())?;
    slow.set_rate(4 << 20);
    let result = (|| -> anyhow::Result<()> {
        let out = env.path("out");
        let dest = format!("type=local,dest={}", out.display());
        let (child, progress) =
            spawn_build(env.build_cmd(&slow.addr(), &project, "go", &["-o", &dest]))?;
        wait_for("6 MiB of the context sent", || {
            Ok((slow.bytes() > 6 << 20).then_some(()))
        })?;
        w.kill();
        complete_records_only(&w.root(), "mid context upload")?;
        let (status, _) = finish_interrupted(child, progress)?;
        assert!(!status.success(), "the client of a killed worker exited 0");
        // The kept context holds the file half written.
        let mut kept = Vec::new();
        for e in std::fs::read_dir(w.root().join("locals"))? {
            if let Ok(m) = std::fs::metadata(e?.path().join("noise")) {
                kept.push(m.len());
            }
        }
        eprintln!("kept context after the kill: noise sizes {kept:?}");
        assert!(
            kept.iter().any(|n| *n < 24 << 20),
            "no half-written noise in the kept context: {kept:?}"
        );

        w.start(&env.bins)?;
        slow.set_rate(0);
        let _ = std::fs::remove_dir_all(&out);
        env.build(&slow.addr(), &project, "go", &["-o", &dest])?;
        let got = std::fs::read(out.join("noise"))?;
        let want = std::fs::read(project.join("noise"))?;
        assert!(
            got == want,
            "the context file after the restart differs: {} bytes, want {}",
            got.len(),
            want.len()
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// Layers of the GC project: each RUN makes a directory of files.
const GC_LAYERS: usize = 6;
const GC_FILES: usize = 600;

fn gc_dockerfile() -> String {
    let mut df = String::from("ARG BASE\nFROM ${BASE}\n");
    for i in 0..GC_LAYERS {
        df.push_str(&format!(
            "RUN mkdir /l{i} && cd /l{i} && seq 1 {GC_FILES} | xargs touch && echo {i} > /l{i}/v\n"
        ));
    }
    df
}

/// Checks a `type=tar` output of the GC project: every layer's files are there.
fn check_gc_output(out: &Path) -> anyhow::Result<()> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let f = std::fs::File::open(out).with_context(|| format!("{}", out.display()))?;
    for e in tar::Archive::new(f).entries()? {
        let mut e = e?;
        let path = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let Some((dir, name)) = path.split_once('/') else {
            continue;
        };
        if name.is_empty() || !dir.starts_with('l') {
            continue;
        }
        *counts.entry(dir.to_string()).or_default() += 1;
        if name == "v" {
            let mut v = String::new();
            std::io::Read::read_to_string(&mut e, &mut v)?;
            values.insert(dir.to_string(), v);
        }
    }
    for i in 0..GC_LAYERS {
        let dir = format!("l{i}");
        assert_eq!(
            values.get(&dir),
            Some(&format!("{i}\n")),
            "{dir}/v in the output"
        );
        assert_eq!(counts.get(&dir), Some(&(GC_FILES + 1)), "entries of {dir}/");
    }
    Ok(())
}

/// The store as the killed worker left it (read before any restart repairs it): recorded
/// layer ids, and ids of the complete snapshot directories.
fn store_state(root: &Path) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let md = kiln_worker::cache::Metadata::open(&root.join("metadata.redb"))?;
    let recorded: BTreeSet<u64> = md.layer_ids()?.into_iter().collect();
    drop(md);
    let mut dirs = BTreeSet::new();
    for e in std::fs::read_dir(root.join("snapshots"))? {
        if let Ok(id) = e?.file_name().to_string_lossy().parse::<u64>() {
            dirs.insert(id);
        }
    }
    Ok((recorded, dirs))
}

/// Fails unless every layer the killed worker's store records has its directory.
fn complete_records_only(root: &Path, when: &str) -> anyhow::Result<()> {
    let (recorded, dirs) = store_state(root)?;
    let missing: Vec<&u64> = recorded.difference(&dirs).collect();
    if !missing.is_empty() {
        bail!("killed {when}: layers {missing:?} recorded without directories");
    }
    Ok(())
}

/// A worker killed with SIGKILL at increasing delays after `kiln prune --all` started, until
/// a prune finishes before the kill. After each kill, every layer the store records still
/// has its directory (GC unrecords before deleting), and after each restart the project
/// builds with all its files, whether its layers were pruned or not.
#[test]
fn kill_9_mid_gc_leaves_only_complete_records() -> anyhow::Result<()> {
    let env = Env::new()?;
    let project = env.project("gc", &gc_dockerfile())?;
    let mut w = Worker::new("w0", &env.path("w0"), &[])?;
    w.start(&env.bins)?;
    let result = (|| -> anyhow::Result<()> {
        let out = env.path("gc-out.tar");
        let dest = format!("type=tar,dest={}", out.display());
        env.build(&w.addr(), &project, "go", &["-o", &dest])?;
        check_gc_output(&out)?;
        let (full, _) = store_state_live(&mut w, &env.bins)?;
        let mut inside = 0;
        for delay_ms in [0u64, 10, 20, 40, 80, 160, 320, 640, 1280] {
            let mut prune = Command::new(env.bins.join("kiln"));
            prune
                .args(["prune", "--all", "--addr", &format!("tcp://{}", w.addr())])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let prune = prune.spawn()?;
            std::thread::sleep(Duration::from_millis(delay_ms));
            w.kill();
            let _ = wait_bounded(prune)?;
            complete_records_only(&w.root(), &format!("{delay_ms} ms into a prune"))?;
            let (recorded, dirs) = store_state(&w.root())?;
            eprintln!(
                "killed {delay_ms} ms into a prune: {} of {full} layers still recorded, {} directories left",
                recorded.len(),
                dirs.len()
            );
            let finished = recorded.is_empty() && dirs.is_empty();
            if !finished && recorded.len() < full {
                inside += 1;
            }
            w.start(&env.bins)?;
            let (recorded_after, dirs_after) = store_state_live(&mut w, &env.bins)?;
            assert_eq!(
                recorded_after, dirs_after,
                "after the restart the store has {recorded_after} records and {dirs_after} directories"
            );
            let _ = std::fs::remove_file(&out);
            env.build(&w.addr(), &project, "go", &["-o", &dest])?;
            check_gc_output(&out)?;
            if finished {
                break;
            }
        }
        eprintln!("kills that landed inside a prune: {inside}");
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// Number of layers recorded now: stops the worker (SIGKILL while idle), reads the store,
/// starts it again.
fn store_state_live(w: &mut Worker, bins: &Path) -> anyhow::Result<(usize, usize)> {
    w.kill();
    let (recorded, dirs) = store_state(&w.root())?;
    w.start(bins)?;
    Ok((recorded.len(), dirs.len()))
}

/// The gateway killed while a build it proxies runs: the client fails promptly with an
/// error naming the connection, and a new gateway on the same port serves the next build.
#[test]
fn gateway_killed_mid_build_fails_clearly_and_a_new_one_serves() -> anyhow::Result<()> {
    let env = Env::new()?;
    let project = env.project("gated", GATED)?;
    let mut w = Worker::new("w0", &env.path("w0"), &[])?;
    w.start(&env.bins)?;
    let members = [format!("w0=tcp://{}", w.addr())];
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let g1 = env.path("g1");
    std::fs::create_dir_all(&g1)?;
    let mut gateway = fleet::start_gateway(&env.bins, gport, mport, &members, &g1)?;
    let gaddr = format!("127.0.0.1:{gport}");
    let result = (|| -> anyhow::Result<()> {
        let (child, mut progress) = spawn_build(env.build_cmd(&gaddr, &project, "block", &[]))?;
        read_until(&mut progress, "the RUN step started", |v| {
            vertex_running(v, "RUN --mount=type=secret")
        })?;
        gateway.kill();
        let (status, rest) = finish_interrupted(child, progress)?;
        assert!(
            !status.success(),
            "the client exited 0 although its gateway died"
        );
        let msg = rest.to_lowercase();
        eprintln!("client after the gateway died: {rest}");
        assert!(
            msg.contains(&gaddr) && msg.contains("lost the connection"),
            "the client's error does not say the connection to the gateway was lost: {rest}"
        );
        // The worker cancels the orphaned build: its container goes away.
        wait_for("the orphaned build's container stops", || {
            Ok(w.containers()?.is_empty().then_some(()))
        })?;

        let g2 = env.path("g2");
        std::fs::create_dir_all(&g2)?;
        gateway = fleet::start_gateway(&env.bins, gport, mport, &members, &g2)?;
        let name = format!("{}/kiln/after-gateway:1", env.base_reg.addr());
        env.push(&gaddr, &project, &name)?;
        Ok(())
    })();
    if result.is_err() {
        eprintln!("gateway:\n{}\n{}", gateway.output(), w.logs());
    }
    result
}

/// The push target and the pool cache's registry stopped: a build that only imports from
/// it succeeds as a cache miss, a push fails naming the registry; restarted on the same
/// port and storage, the registry still holds what was pushed before, and the next push
/// works.
#[test]
fn registry_down_and_back() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut reg = StoppableRegistry::start_in(&env.path("reg2"))?;
    let pool = format!("{}/kiln/pool", reg.addr());
    let mut w = Worker::new("w0", &env.path("w0"), &["--cache-registry", &pool])?;
    w.start(&env.bins)?;
    let a = env.project("a", "ARG BASE\nFROM ${BASE}\nRUN echo a > /a\n")?;
    let b = env.project("b", "ARG BASE\nFROM ${BASE}\nRUN echo b > /b\n")?;
    let result = (|| -> anyhow::Result<()> {
        let name1 = format!("{}/kiln/a:1", reg.addr());
        let first = env.push(&w.addr(), &a, &name1)?;

        reg.stop()?;
        let out = env.path("b-out");
        let dest = format!("type=local,dest={}", out.display());
        let built = env.build(&w.addr(), &b, "go", &["-o", &dest])?;
        assert_eq!(std::fs::read_to_string(out.join("b"))?, "b\n");
        let warnings = rawjson_warnings(&built.stderr);
        eprintln!("warnings of the build with the pool registry down: {warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains(&reg.addr())),
            "no warning names the stopped pool registry {}: {warnings:?}",
            reg.addr()
        );

        let name2 = format!("{}/kiln/a:2", reg.addr());
        let mut cmd = env.build_cmd(&w.addr(), &a, "go", &["-t", &name2, "--push"]);
        let failed = run_bounded(&mut cmd)?;
        assert!(
            !failed.status.success(),
            "a push to a stopped registry exited 0"
        );
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(
            err.contains(&reg.addr()),
            "the push error does not name the registry {}: {err}",
            reg.addr()
        );

        reg.start()?;
        let r = kiln_e2e::http::get(
            &reg.addr(),
            &format!("/v2/kiln/a/manifests/{first}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        )?;
        assert_eq!(r.status, 200, "the restarted registry lost the first push");
        let second = env.push(&w.addr(), &a, &name2)?;
        assert_eq!(first, second, "the same project pushed a different image");
        let r = kiln_e2e::http::get(
            &reg.addr(),
            "/v2/kiln/a/manifests/2",
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        )?;
        assert_eq!(
            r.status, 200,
            "the push after the restart is not in the registry"
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", w.logs());
    }
    result
}

/// The last state of each vertex in rawjson progress: `(name, cached)`.
fn rawjson_vertices(stderr: &[u8]) -> Vec<(String, bool)> {
    let mut last = BTreeMap::new();
    for line in String::from_utf8_lossy(stderr).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for x in v["vertexes"].as_array().into_iter().flatten() {
            let d = x["digest"].as_str().unwrap_or_default().to_string();
            let name = x["name"].as_str().unwrap_or_default().to_string();
            last.insert(d, (name, x["cached"] == true));
        }
    }
    last.into_values().collect()
}

/// The warnings (`short`, base64 in rawjson) of a build's progress, decoded.
fn rawjson_warnings(stderr: &[u8]) -> Vec<String> {
    use base64::Engine;
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(stderr).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for w in v["warnings"].as_array().into_iter().flatten() {
            let short = w["short"].as_str().unwrap_or_default();
            if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(short) {
                out.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
    }
    out
}

/// Gateway metrics: `kiln_gateway_builds_total` and `kiln_gateway_worker_healthy` by worker.
fn gateway_metric(metrics: &str, name: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let r = kiln_e2e::http::get(metrics, "/metrics", &[])?;
    if r.status != 200 {
        bail!("/metrics answered {}", r.status);
    }
    Ok(fleet::counters(&String::from_utf8(r.body)?, name, "worker"))
}

/// Builds `project` through the gateway with route key `key`; returns the worker that ran it.
fn routed_build(
    env: &Env,
    gaddr: &str,
    metrics: &str,
    project: &Path,
    key: &str,
) -> anyhow::Result<String> {
    let before = gateway_metric(metrics, "kiln_gateway_builds_total")?;
    let opt = format!("kiln.route-key={key}");
    env.build(gaddr, project, "go", &["--opt", &opt])?;
    let after = gateway_metric(metrics, "kiln_gateway_builds_total")?;
    let ran: Vec<&String> = after
        .iter()
        .filter(|(w, n)| **n > before.get(*w).copied().unwrap_or(0.0))
        .map(|(w, _)| w)
        .collect();
    match ran.as_slice() {
        [w] => Ok((*w).clone()),
        _ => bail!("key {key}: expected one worker to count the build, got {ran:?}"),
    }
}

/// A partition between the gateway and one of three workers (a forwarder that cuts and
/// black-holes its connections): the gateway ejects that worker, builds whose key maps to
/// it run elsewhere and succeed; healed, it is healthy again and gets those builds back.
#[test]
fn partitioned_worker_is_ejected_and_rejoins() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut workers = Vec::new();
    let mut members = Vec::new();
    let mut link = None;
    for i in 0..3 {
        let name = format!("w{i}");
        let mut w = Worker::new(&name, &env.path(&name), &[])?;
        w.start(&env.bins)?;
        let addr = if i == 1 {
            let f = Forwarder::start(&w.addr())?;
            let a = f.addr();
            link = Some(f);
            a
        } else {
            w.addr()
        };
        members.push(format!("{name}=tcp://{addr}"));
        workers.push(w);
    }
    let link = link.context("no forwarder")?;
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let gdir = env.path("gateway");
    std::fs::create_dir_all(&gdir)?;
    let gateway = fleet::start_gateway(&env.bins, gport, mport, &members, &gdir)?;
    let (gaddr, metrics) = (format!("127.0.0.1:{gport}"), format!("127.0.0.1:{mport}"));
    let result = (|| -> anyhow::Result<()> {
        let project = env.project("p", "ARG BASE\nFROM ${BASE}\nRUN echo p > /p\n")?;
        let healthy = |want: f64| {
            wait_for(&format!("w1 healthy == {want}"), || {
                let h = gateway_metric(&metrics, "kiln_gateway_worker_healthy")?;
                Ok((h.get("w1") == Some(&want)).then_some(()))
            })
        };
        healthy(1.0)?;
        // A route key that lands on w1.
        let mut key = None;
        for k in 0..24 {
            let candidate = format!("partition-{k}");
            if routed_build(&env, &gaddr, &metrics, &project, &candidate)? == "w1" {
                key = Some(candidate);
                break;
            }
        }
        let key = key.context("no route key of 24 landed on w1")?;

        link.partition();
        healthy(0.0)?;
        let ran = routed_build(&env, &gaddr, &metrics, &project, &key)?;
        assert_ne!(ran, "w1", "a build went to the partitioned worker");

        link.heal();
        healthy(1.0)?;
        let ran = routed_build(&env, &gaddr, &metrics, &project, &key)?;
        assert_eq!(ran, "w1", "the healed worker did not get its key back");
        Ok(())
    })();
    if result.is_err() {
        eprintln!("gateway:\n{}", gateway.output());
        for w in &workers {
            eprintln!("{}", w.logs());
        }
    }
    result
}

/// A silent partition (the link between gateway and worker stops carrying bytes, no
/// connection is closed) while a build runs: the client gets an error instead of hanging,
/// and once healed the worker serves builds again.
#[test]
fn silent_partition_mid_build_fails_the_build_instead_of_hanging() -> anyhow::Result<()> {
    let env = Env::new()?;
    let project = env.project("gated", GATED)?;
    let mut w = Worker::new("w0", &env.path("w0"), &[])?;
    w.start(&env.bins)?;
    let link = Forwarder::start(&w.addr())?;
    let members = [format!("w0=tcp://{}", link.addr())];
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let gdir = env.path("gateway");
    std::fs::create_dir_all(&gdir)?;
    let gateway = fleet::start_gateway(&env.bins, gport, mport, &members, &gdir)?;
    let gaddr = format!("127.0.0.1:{gport}");
    let result = (|| -> anyhow::Result<()> {
        let (child, mut progress) = spawn_build(env.build_cmd(&gaddr, &project, "block", &[]))?;
        read_until(&mut progress, "the RUN step started", |v| {
            vertex_running(v, "RUN --mount=type=secret")
        })?;
        link.freeze();
        let frozen = Instant::now();
        // Nothing closes the link: the build ends when HTTP/2 keep-alive gives up on it
        // (about 100 s on this machine), so the hang limit is longer here.
        let (status, rest) = finish_interrupted_within(child, progress, 3 * HANG)?;
        eprintln!(
            "client {:?} after the freeze: {status}: {}",
            frozen.elapsed(),
            rest.lines().last().unwrap_or_default()
        );
        assert!(
            !status.success(),
            "the build succeeded across a frozen link"
        );
        link.heal();
        let metrics = format!("127.0.0.1:{mport}");
        wait_for("w0 healthy again", || {
            let h = gateway_metric(&metrics, "kiln_gateway_worker_healthy")?;
            Ok((h.get("w0") == Some(&1.0)).then_some(()))
        })?;
        let name = format!("{}/kiln/after-freeze:1", env.base_reg.addr());
        env.push(&gaddr, &project, &name)?;
        Ok(())
    })();
    if result.is_err() {
        eprintln!("gateway:\n{}\n{}", gateway.output(), w.logs());
    }
    result
}
