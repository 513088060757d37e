//! Invoking runc/crun: a per-run bundle (`config.json` plus generated `/etc` files)
//! under `<root>/bundles/<id>`, `<runtime> --root <root>/runc run --bundle <dir> <id>`
//! in the foreground with stdout and stderr piped and streamed, `kill` + `delete` on
//! cancel, and cleanup of the bundle and the runtime's state whatever happens.
//!
//! The runtime's own log goes to `runtime.log` (JSON) in the bundle, so a failure to
//! start the container (e.g. no such executable) is told apart from the process exiting
//! non-zero: the former is [`Error::Runtime`], the latter [`Error::Exit`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{spec, Error, LogChunk, ProcessSpec, Result, Runtime};
use crate::snapshot::resolve_in_root;

/// Lines of output kept for the error of a failed process.
const TAIL_LINES: usize = 20;
/// Bytes of output kept to cut those lines from.
const TAIL_BYTES: usize = 8 << 10;

/// The last bytes of a process's combined output.
#[derive(Debug, Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.0.extend(data);
        let excess = self.0.len().saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
    }

    fn lines(&self) -> String {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Finds `name` in `PATH`.
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True on a hybrid cgroup host: v1 controllers plus a cgroup2 mount at
/// `/sys/fs/cgroup/unified`.
fn hybrid_cgroups() -> bool {
    static HYBRID: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HYBRID.get_or_init(|| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|info| {
                info.lines().any(|l| {
                    let mut f = l.split(' ');
                    let point = f.nth(4);
                    let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
                    point == Some("/sys/fs/cgroup/unified") && fstype == Some("cgroup2")
                })
            })
            .unwrap_or(false)
    })
}

/// The runtime invocation with its global flags.
struct Runc {
    binary: PathBuf,
    name: &'static str,
    state: PathBuf,
}

impl Runc {
    fn command(&self, log: Option<&Path>) -> Command {
        let mut c = if self.name == "crun" && hybrid_cgroups() {
            // crun refuses a host that mounts cgroup v2 beside v1 controllers; in a private
            // mount namespace without the v2 mount it sees plain cgroup v1.
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg("umount /sys/fs/cgroup/unified 2>/dev/null; exec \"$0\" \"$@\"")
                .arg(&self.binary);
            c
        } else {
            Command::new(&self.binary)
        };
        c.arg("--root").arg(&self.state);
        if let Some(log) = log {
            c.arg("--log").arg(log).arg("--log-format").arg("json");
        }
        c.stdin(Stdio::null());
        c
    }

    /// Runs a short management command (`kill`, `delete`), ignoring its outcome apart
    /// from a debug log.
    async fn quiet(&self, args: &[&str]) -> bool {
        let mut c = self.command(None);
        c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        match c.output().await {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                tracing::debug!(
                    runtime = self.name,
                    ?args,
                    stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                    "runtime command failed"
                );
                false
            }
            Err(error) => {
                tracing::debug!(runtime = self.name, ?args, %error, "runtime command failed");
                false
            }
        }
    }

    async fn delete(&self, id: &str) {
        self.quiet(&["delete", "--force", id]).await;
    }
}

/// Copies `r` to `output` as chunks of `stream`, keeping a tail.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    stream: u8,
    output: mpsc::UnboundedSender<LogChunk>,
    tail: Arc<Mutex<Tail>>,
) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
                let _ = output.send(LogChunk {
                    stream,
                    data: Bytes::copy_from_slice(&buf[..n]),
                });
            }
        }
    }
}

/// The last error the runtime logged to its JSON log, if any.
fn runtime_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .next_back()
}

/// Paths in the rootfs that do not exist yet but will be created by the runtime as
/// mount points; removed again afterwards if still empty.
fn missing_mount_points(rootfs: &Path, spec: &ProcessSpec) -> Vec<PathBuf> {
    let mut dests: Vec<&str> = vec!["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];
    dests.extend(spec.mounts.iter().map(|m| m.dest.as_str()));
    // Every missing component counts, not just the last: the runtime creates parents too
    // (BuildKit's removeMountStubsRecursive, which current frontends always set).
    let mut stubs: Vec<PathBuf> = Vec::new();
    for p in dests
        .into_iter()
        .filter_map(|d| resolve_in_root(rootfs, d, false).ok())
    {
        let mut cur = Some(p.as_path());
        while let Some(c) = cur.filter(|c| c.starts_with(rootfs) && *c != rootfs) {
            if std::fs::symlink_metadata(c).is_ok() {
                break;
            }
            if !stubs.iter().any(|s| s == c) {
                stubs.push(c.to_path_buf());
            }
            cur = c.parent();
        }
    }
    // Parents first, so removal in reverse goes deepest first.
    stubs.sort_by_key(|p| p.components().count());
    stubs
}

fn remove_stub(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir(p);
        }
        Ok(m) if m.is_file() && m.len() == 0 => {
            let _ = std::fs::remove_file(p);
        }
        _ => {}
    }
}

/// Deletes the container and its bundle if the run future is dropped midway (its
/// runtime process is killed by `kill_on_drop`, the container would stay behind): the
/// solver drops the work of a cancelled build.
struct DropGuard {
    binary: PathBuf,
    state: PathBuf,
    id: String,
    bundle: PathBuf,
    armed: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::warn!(id = %self.id, "run abandoned, deleting container");
        let _ = std::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// Runs `spec` as container `id` on `rootfs` with `runtime`, state under `root`.
pub async fn run(
    runtime: Runtime,
    root: &Path,
    id: &str,
    rootfs: &Path,
    spec: &ProcessSpec,
    output: mpsc::UnboundedSender<LogChunk>,
    cancel: CancellationToken,
) -> Result<()> {
    let name = runtime.binary();
    let binary = find_binary(name).ok_or_else(|| Error::Runtime {
        runtime: name.to_string(),
        message: format!("{name} binary not found in PATH"),
    })?;
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(Error::Spec(format!("invalid container id {id:?}")));
    }
    let runc = Runc {
        binary,
        name,
        state: root.join("runc"),
    };
    std::fs::create_dir_all(&runc.state).map_err(io_err("mkdir", &runc.state))?;
    let bundle = root.join("bundles").join(id);
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle).map_err(io_err("remove", &bundle))?;
    }
    std::fs::create_dir_all(&bundle).map_err(io_err("mkdir", &bundle))?;
    let stubs = missing_mount_points(rootfs, spec);
    let mut guard = DropGuard {
        binary: runc.binary.clone(),
        state: runc.state.clone(),
        id: id.to_string(),
        bundle: bundle.clone(),
        armed: true,
    };
    let res = run_in_bundle(&runc, &bundle, id, rootfs, spec, output, cancel).await;
    guard.armed = false;
    runc.delete(id).await;
    for s in stubs.iter().rev() {
        remove_stub(s);
    }
    if let Err(error) = std::fs::remove_dir_all(&bundle) {
        tracing::warn!(%error, bundle = %bundle.display(), "removing bundle failed");
    }
    res
}

async fn run_in_bundle(
    runc: &Runc,
    bundle: &Path,
    id: &str,
    rootfs: &Path,
    spec: &ProcessSpec,
    output: mpsc::UnboundedSender<LogChunk>,
    cancel: CancellationToken,
) -> Result<()> {
    spec::ensure_cwd(rootfs, &spec.cwd)?;
    let etc = spec::write_etc_files(bundle, spec)?;
    let oci = spec::build(id, rootfs, spec, &etc)?;
    let config = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(&oci).map_err(|e| Error::Spec(e.to_string()))?;
    std::fs::write(&config, json).map_err(io_err("write", &config))?;
    let log = bundle.join("runtime.log");

    // A container left behind by a crashed worker would make `run` fail.
    runc.delete(id).await;

    let mut cmd = runc.command(Some(&log));
    cmd.arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| Error::Runtime {
        runtime: runc.name.to_string(),
        message: format!("starting {}: {e}", runc.binary.display()),
    })?;
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, 1, output.clone(), tail.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, 2, output, tail.clone())));
    }

    let status = tokio::select! {
        s = child.wait() => Some(s),
        () = cancel.cancelled() => None,
    };
    let status = match status {
        Some(s) => s.map_err(|e| Error::Runtime {
            runtime: runc.name.to_string(),
            message: format!("waiting for {id}: {e}"),
        })?,
        None => {
            tracing::debug!(id, "cancelled, killing container");
            // The container may still be starting: retry the kill for a moment.
            for _ in 0..50 {
                if runc.quiet(&["kill", id, "KILL"]).await {
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            for p in pumps {
                let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
            }
            return Err(Error::Cancelled {
                args: spec.args.clone(),
            });
        }
    };
    for p in pumps {
        // Output pipes may be held open by daemonized grandchildren; don't hang on them.
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    if status.success() {
        return Ok(());
    }
    if let Some(message) = runtime_error(&log) {
        return Err(Error::Runtime {
            runtime: runc.name.to_string(),
            message,
        });
    }
    let code = match status.code() {
        Some(c) => c,
        None => {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }
    };
    let tail = tail.lock().map(|t| t.lines()).unwrap_or_default();
    Err(Error::Exit {
        args: spec.args.clone(),
        code,
        tail,
    })
}
