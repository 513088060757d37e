//! A fleet on loopback for whole-system tests: the workspace's binaries (`kiln-worker`,
//! `kiln-gateway`, `kiln`), found next to the running test executable and built once if
//! missing, and child processes that are killed when dropped, with their logs in files.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// Binaries of the workspace that fleet tests run.
pub const BINARIES: &[&str] = &["kiln-worker", "kiln-gateway", "kiln"];

/// The directory holding the workspace's binaries: the profile directory of the running
/// test executable (`target/debug` for `target/debug/deps/test-…`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{}: no parent directory", exe.display()))?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Makes sure [`BINARIES`] exist in [`bin_dir`], building them once per process with
/// `cargo build --locked -p kiln-worker -p kiln-gateway -p kiln-cli --bins` into the same
/// target directory when any is missing. Returns the directory.
pub fn ensure_binaries() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_if_missing().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_if_missing() -> anyhow::Result<PathBuf> {
    let dir = bin_dir()?;
    if BINARIES.iter().all(|b| dir.join(b).is_file()) {
        return Ok(dir);
    }
    let target_dir = dir
        .parent()
        .ok_or_else(|| anyhow!("{}: no target directory above it", dir.display()))?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--locked", "--bins"])
        .args(["-p", "kiln-worker", "-p", "kiln-gateway", "-p", "kiln-cli"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {cargo} build for the fleet binaries"))?;
    if !status.success() {
        bail!("building the fleet binaries failed: {status}");
    }
    for b in BINARIES {
        if !dir.join(b).is_file() {
            bail!("{} missing after building", dir.join(b).display());
        }
    }
    Ok(dir)
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `addr` (`host:port`) accepts TCP connections, up to `limit`.
pub fn wait_for_port(addr: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("nothing listens on {addr} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped; stdout and stderr go to
/// `log`.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    /// Its combined output.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with its output in `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    /// Its process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with its log if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited ({status}):\n{}", self.name, self.output());
            }
        }
        Ok(())
    }

    /// Sends `signal` to the process (while it runs).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        if let Some(pid) = self.id() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
                .with_context(|| format!("signalling {}", self.name))?;
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit by itself and reaps it; fails (leaving
    /// it running) when it does not.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        let Some(c) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        loop {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > limit {
                bail!(
                    "{} still running after {limit:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `kiln-worker` serving plaintext TCP on `127.0.0.1:port` with state in `root`;
/// returns once it accepts connections.
pub fn start_worker(bins: &Path, name: &str, port: u16, root: &Path) -> anyhow::Result<Proc> {
    start_worker_tls(bins, name, port, root, None)
}

/// [`start_worker`], serving mutual TLS with `tls` (the server's CA, certificate and key)
/// when given.
pub fn start_worker_tls(
    bins: &Path,
    name: &str,
    port: u16,
    root: &Path,
    tls: Option<&crate::pki::Identity>,
) -> anyhow::Result<Proc> {
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(bins.join("kiln-worker"));
    cmd.arg("--addr")
        .arg(format!("tcp://{addr}"))
        .arg("--worker-id")
        .arg(name);
    match tls {
        Some(id) => cmd
            .arg("--tlscacert")
            .arg(&id.ca)
            .arg("--tlscert")
            .arg(&id.cert)
            .arg("--tlskey")
            .arg(&id.key),
        None => cmd.arg("--insecure-tcp"),
    };
    cmd.arg("--root").arg(root.join("state"));
    let mut p = Proc::spawn(name, cmd, &root.join(format!("{name}.log")))?;
    wait_until_listening(&mut p, &addr)?;
    Ok(p)
}

/// Starts `kiln-gateway` on `127.0.0.1:port` in front of `workers` (`NAME=tcp://…`), with
/// metrics on `127.0.0.1:metrics_port` and health checks every second; returns once it
/// accepts connections.
pub fn start_gateway(
    bins: &Path,
    port: u16,
    metrics_port: u16,
    workers: &[String],
    log_dir: &Path,
) -> anyhow::Result<Proc> {
    start_gateway_tls(bins, port, metrics_port, workers, log_dir, None)
}

/// [`start_gateway`] with mutual TLS on both sides when `tls` is given: `(server
/// identity for clients, client identity towards the workers)`.
pub fn start_gateway_tls(
    bins: &Path,
    port: u16,
    metrics_port: u16,
    workers: &[String],
    log_dir: &Path,
    tls: Option<(&crate::pki::Identity, &crate::pki::Identity)>,
) -> anyhow::Result<Proc> {
    start_gateway_opts(bins, port, metrics_port, workers, log_dir, tls, &[])
}

/// [`start_gateway_tls`] with `extra` flags appended to the gateway's command line (for
/// example `--max-builds-per-worker 4`).
pub fn start_gateway_opts(
    bins: &Path,
    port: u16,
    metrics_port: u16,
    workers: &[String],
    log_dir: &Path,
    tls: Option<(&crate::pki::Identity, &crate::pki::Identity)>,
    extra: &[String],
) -> anyhow::Result<Proc> {
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(bins.join("kiln-gateway"));
    cmd.arg("--addr").arg(format!("tcp://{addr}"));
    match tls {
        Some((server, client)) => cmd
            .arg("--tlscacert")
            .arg(&server.ca)
            .arg("--tlscert")
            .arg(&server.cert)
            .arg("--tlskey")
            .arg(&server.key)
            .arg("--worker-tlscert")
            .arg(&client.cert)
            .arg("--worker-tlskey")
            .arg(&client.key),
        None => cmd.arg("--insecure-tcp"),
    };
    cmd.arg("--workers")
        .arg(workers.join(","))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--health-interval")
        .arg("1")
        .args(extra);
    let mut p = Proc::spawn("kiln-gateway", cmd, &log_dir.join("gateway.log"))?;
    wait_until_listening(&mut p, &addr)?;
    wait_until_listening(&mut p, &format!("127.0.0.1:{metrics_port}"))?;
    Ok(p)
}

fn wait_until_listening(p: &mut Proc, addr: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        p.check_running()?;
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "{} does not listen on {addr} after 60 s:\n{}",
                p.name,
                p.output()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the counter `name{label="value"}` of every label value from a Prometheus text
/// exposition (lines `name{label="v"} n`).
pub fn counters(text: &str, name: &str, label: &str) -> std::collections::BTreeMap<String, f64> {
    let prefix = format!("{name}{{{label}=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (value, n) = rest.split_once("\"} ")?;
            Some((value.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

/// One worker behind one gateway, both over mutual TLS with certificates from one test CA
/// (written under `dir/pki`), and a user client identity to reach the gateway with.
pub struct MtlsFleet {
    /// The worker process.
    pub worker: Proc,
    /// The gateway process.
    pub gateway: Proc,
    /// The worker as `--workers` names it (`w0=tcp://…`).
    pub worker_member: String,
    /// The gateway's TCP port on 127.0.0.1.
    pub gateway_port: u16,
    /// The CA, and a client certificate the gateway accepts.
    pub user: crate::pki::Identity,
}

impl MtlsFleet {
    /// Starts the worker and the gateway; returns once both listen.
    pub fn start(bins: &Path, dir: &Path) -> anyhow::Result<MtlsFleet> {
        let ca = crate::pki::Ca::new("kiln test fleet CA")?;
        let pki = dir.join("pki");
        let worker_id = ca.server(&pki, "worker", &["localhost", "127.0.0.1"])?;
        let gateway_id = ca.server(&pki, "gateway", &["localhost", "127.0.0.1"])?;
        let gateway_client = ca.client(&pki, "gateway-client")?;
        let user = ca.client(&pki, "user")?;
        let wport = free_port()?;
        let worker = start_worker_tls(bins, "w0", wport, dir, Some(&worker_id))?;
        let (gport, mport) = (free_port()?, free_port()?);
        let worker_member = format!("w0=tcp://127.0.0.1:{wport}");
        let gateway = start_gateway_tls(
            bins,
            gport,
            mport,
            std::slice::from_ref(&worker_member),
            dir,
            Some((&gateway_id, &gateway_client)),
        )?;
        Ok(MtlsFleet {
            worker,
            gateway,
            worker_member,
            gateway_port: gport,
            user,
        })
    }
}
