//! Running processes in containers: an OCI runtime spec built with `oci-spec`
//! ([`spec`]), handed to runc or crun ([`runc`]), with the network set up by
//! [`network`]. Uses only [`crate::snapshot::resolve_in_root`] to look inside rootfses.

pub mod network;
pub mod runc;
pub mod spec;

use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What can go wrong running a process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process ran and exited with a non-zero code.
    #[error("process {args:?} did not complete successfully: exit code: {code}\n{tail}")]
    Exit {
        /// The command line.
        args: Vec<String>,
        /// Its exit code (128+signal when killed).
        code: i32,
        /// The last lines of its output.
        tail: String,
    },
    /// The build was cancelled and the container killed.
    #[error("process {args:?} was cancelled")]
    Cancelled {
        /// The command line.
        args: Vec<String>,
    },
    /// The runtime failed to start the container.
    #[error("{runtime}: {message}")]
    Runtime {
        /// runc or crun.
        runtime: String,
        /// What failed.
        message: String,
    },
    /// The `user[:group]` of a process could not be resolved in the rootfs.
    #[error("user {user}: {message}")]
    User {
        /// The user as given.
        user: String,
        /// What is wrong.
        message: String,
    },
    /// The runtime spec could not be built.
    #[error("runtime spec: {0}")]
    Spec(String),
    /// A file operation on the bundle or rootfs failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

impl From<crate::snapshot::Error> for Error {
    fn from(e: crate::snapshot::Error) -> Self {
        match e {
            crate::snapshot::Error::Io { op, path, source } => Error::Io { op, path, source },
            other => Error::Spec(other.to_string()),
        }
    }
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which OCI runtime runs containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    /// runc (default).
    #[default]
    Runc,
    /// crun.
    Crun,
}

impl Runtime {
    /// The binary name (looked up in `PATH`).
    pub fn binary(&self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Crun => "crun",
        }
    }

    /// Parses `runc` or `crun`.
    pub fn parse(s: &str) -> Result<Runtime> {
        s.parse()
    }
}

impl std::str::FromStr for Runtime {
    type Err = Error;

    fn from_str(s: &str) -> Result<Runtime> {
        match s.trim().to_ascii_lowercase().as_str() {
            "runc" => Ok(Runtime::Runc),
            "crun" => Ok(Runtime::Crun),
            other => Err(Error::Runtime {
                runtime: other.to_string(),
                message: "unknown runtime, expected runc or crun".into(),
            }),
        }
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.binary())
    }
}

/// Network for a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// The worker's own network namespace (`default`/`host`).
    #[default]
    Host,
    /// A fresh namespace with only loopback.
    None,
}

/// An extra mount inside the container.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Absolute path in the container.
    pub dest: String,
    /// What to mount.
    pub kind: MountKind,
    /// Read-only.
    pub readonly: bool,
}

/// The source of a [`MountSpec`].
#[derive(Debug, Clone)]
pub enum MountKind {
    /// Bind-mount a host path (a mounted snapshot, a secret file, a cache dir).
    Bind(PathBuf),
    /// A tmpfs of at most this many bytes (0 = default).
    Tmpfs(u64),
}

/// One process to run.
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    /// argv.
    pub args: Vec<String>,
    /// `K=V`.
    pub env: Vec<String>,
    /// Working directory (created if missing).
    pub cwd: String,
    /// `user[:group]` by name or number, resolved against the rootfs's /etc/passwd and
    /// /etc/group; empty = root.
    pub user: String,
    /// Hostname (default `kiln`).
    pub hostname: String,
    /// Network namespace.
    pub network: Network,
    /// Extra /etc/hosts entries (name, ip).
    pub extra_hosts: Vec<(String, String)>,
    /// Mounts besides the rootfs, in order.
    pub mounts: Vec<MountSpec>,
    /// Mount the rootfs read-only.
    pub readonly_rootfs: bool,
}

/// A chunk of output: stream 1 = stdout, 2 = stderr.
#[derive(Debug, Clone)]
pub struct LogChunk {
    /// 1 or 2.
    pub stream: u8,
    /// Raw bytes; may split lines.
    pub data: Bytes,
}

/// Runs containers with one runtime; state under a root directory.
#[derive(Debug, Clone)]
pub struct Executor {
    runtime: Runtime,
    root: PathBuf,
}

impl Executor {
    /// An executor keeping bundles and runtime state under `root` (created if missing).
    pub fn new(runtime: Runtime, root: PathBuf) -> Result<Executor> {
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            op: "mkdir",
            path: root.clone(),
            source,
        })?;
        Ok(Executor { runtime, root })
    }

    /// The runtime in use.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// Runs `spec` in a container whose rootfs is the mounted directory `rootfs`; output
    /// is sent to `output` as it comes; cancelling `cancel` kills the container. `id` must
    /// be unique among running containers.
    pub async fn run(
        &self,
        id: &str,
        rootfs: &std::path::Path,
        spec: &ProcessSpec,
        output: mpsc::UnboundedSender<LogChunk>,
        cancel: CancellationToken,
    ) -> Result<()> {
        runc::run(self.runtime, &self.root, id, rootfs, spec, output, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// A busybox rootfs with a user `app` (uid 1000).
    fn busybox_rootfs(dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir.join("bin"))?;
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::copy("/bin/busybox", dir.join("bin/busybox"))?;
        for applet in [
            "sh", "echo", "cat", "id", "sleep", "pwd", "grep", "ls", "true", "hostname",
        ] {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
        }
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )?;
        std::fs::write(dir.join("etc/group"), "root:x:0:\napp:x:1000:\n")?;
        Ok(())
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        rootfs: PathBuf,
        exec: Executor,
        state: PathBuf,
    }

    fn fixture() -> anyhow::Result<Fixture> {
        let tmp = tempfile::tempdir()?;
        let rootfs = tmp.path().join("rootfs");
        busybox_rootfs(&rootfs)?;
        let state = tmp.path().join("state");
        let exec = Executor::new(Runtime::Runc, state.clone())?;
        Ok(Fixture {
            _tmp: tmp,
            rootfs,
            exec,
            state,
        })
    }

    fn sh(script: &str) -> ProcessSpec {
        ProcessSpec {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cwd: "/".into(),
            ..ProcessSpec::default()
        }
    }

    /// Runs and collects (result, stdout, stderr).
    async fn run(f: &Fixture, id: &str, spec: &ProcessSpec) -> (Result<()>, String, String) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let res = f
            .exec
            .run(id, &f.rootfs, spec, tx, CancellationToken::new())
            .await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Ok(c) = rx.try_recv() {
            match c.stream {
                1 => out.extend_from_slice(&c.data),
                _ => err.extend_from_slice(&c.data),
            }
        }
        (
            res,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    #[tokio::test]
    async fn echo_streams_and_exit_codes() -> anyhow::Result<()> {
        let _heavy = crate::snapshot::HEAVY_TESTS.read().await;
        let f = fixture()?;
        let mut spec = ProcessSpec {
            args: vec!["echo".into(), "hi".into()],
            ..ProcessSpec::default()
        };
        let (res, out, _) = run(&f, "kiln-t-echo", &spec).await;
        res?;
        assert_eq!(out, "hi\n");

        spec = sh("echo out; echo oops >&2");
        let (res, out, err) = run(&f, "kiln-t-stderr", &spec).await;
        res?;
        assert_eq!((out.as_str(), err.as_str()), ("out\n", "oops\n"));

        spec = sh("echo before-exit; exit 3");
        let (res, _, _) = run(&f, "kiln-t-exit", &spec).await;
        match res {
            Err(Error::Exit { code, tail, args }) => {
                assert_eq!(code, 3);
                assert!(tail.contains("before-exit"), "{tail}");
                assert_eq!(args[0], "/bin/sh");
            }
            other => anyhow::bail!("expected exit 3, got {other:?}"),
        }
        // Nothing left behind.
        assert!(std::fs::read_dir(f.state.join("bundles"))?.next().is_none());
        assert!(!f.state.join("runc/kiln-t-exit").exists());
        Ok(())
    }

    #[tokio::test]
    async fn user_network_hosts_and_cwd() -> anyhow::Result<()> {
        let _heavy = crate::snapshot::HEAVY_TESTS.read().await;
        let f = fixture()?;
        let mut spec = sh("id -u; id -g; echo $HOME");
        spec.user = "app".into();
        let (res, out, _) = run(&f, "kiln-t-user", &spec).await;
        res?;
        assert_eq!(out, "1000\n1000\n/home/app\n");

        let mut spec = sh("cat /proc/net/dev");
        spec.network = Network::None;
        let (res, out, _) = run(&f, "kiln-t-netnone", &spec).await;
        res?;
        let ifaces: Vec<&str> = out
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(ifaces, vec!["lo"], "{out}");

        let mut spec = sh("cat /etc/hosts; hostname; pwd");
        spec.hostname = "builder-7".into();
        spec.cwd = "/work/deep/dir".into();
        spec.extra_hosts = vec![("db".into(), "10.1.2.3".into())];
        let (res, out, _) = run(&f, "kiln-t-hosts", &spec).await;
        res?;
        assert!(out.contains("localhost builder-7"), "{out}");
        assert!(out.contains("10.1.2.3\tdb"), "{out}");
        assert!(out.ends_with("builder-7\n/work/deep/dir\n"), "{out}");
        assert!(f.rootfs.join("work/deep/dir").is_dir());
        // The mount point stubs the runtime created are removed again.
        assert!(!f.rootfs.join("etc/hosts").exists());
        Ok(())
    }

    #[tokio::test]
    async fn bind_and_tmpfs_mounts() -> anyhow::Result<()> {
        let _heavy = crate::snapshot::HEAVY_TESTS.read().await;
        let f = fixture()?;
        let host = f._tmp.path().join("hostdir");
        std::fs::create_dir_all(&host)?;
        std::fs::write(host.join("data"), "from-host")?;
        let mut spec = sh(
            "cat /mnt/in/data; grep ' /scratch ' /proc/mounts; echo x > /scratch/f && cat /scratch/f; \
             echo y > /mnt/in/new 2>/dev/null || echo readonly",
        );
        spec.mounts = vec![
            MountSpec {
                dest: "/mnt/in".into(),
                kind: MountKind::Bind(host.clone()),
                readonly: true,
            },
            MountSpec {
                dest: "/scratch".into(),
                kind: MountKind::Tmpfs(1 << 20),
                readonly: false,
            },
        ];
        let (res, out, err) = run(&f, "kiln-t-mounts", &spec).await;
        res?;
        assert!(out.starts_with("from-host"), "{out} {err}");
        assert!(out.contains("tmpfs /scratch tmpfs"), "{out}");
        assert!(out.contains("\nx\n"), "{out}");
        assert!(out.ends_with("readonly\n"), "{out}");
        assert!(!host.join("new").exists());
        Ok(())
    }

    #[tokio::test]
    async fn cancel_kills_promptly_and_cleans_up() -> anyhow::Result<()> {
        let _heavy = crate::snapshot::HEAVY_TESTS.read().await;
        let f = fixture()?;
        let spec = ProcessSpec {
            args: vec!["sleep".into(), "100".into()],
            ..ProcessSpec::default()
        };
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c2.cancel();
        });
        let (tx, _rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let res = f
            .exec
            .run("kiln-t-cancel", &f.rootfs, &spec, tx, cancel)
            .await;
        assert!(matches!(res, Err(Error::Cancelled { .. })), "{res:?}");
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{:?}",
            start.elapsed()
        );
        assert!(!f.state.join("runc/kiln-t-cancel").exists());
        assert!(!f.state.join("bundles/kiln-t-cancel").exists());
        Ok(())
    }

    #[tokio::test]
    async fn dropped_run_deletes_the_container() -> anyhow::Result<()> {
        let _heavy = crate::snapshot::HEAVY_TESTS.read().await;
        let f = fixture()?;
        let spec = ProcessSpec {
            args: vec!["sleep".into(), "100".into()],
            ..ProcessSpec::default()
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let run = f.exec.run(
            "kiln-t-drop",
            &f.rootfs,
            &spec,
            tx,
            CancellationToken::new(),
        );
        let timed_out = tokio::time::timeout(Duration::from_millis(1500), run).await;
        assert!(
            timed_out.is_err(),
            "sleep 100 finished early: {timed_out:?}"
        );
        assert!(!f.state.join("runc/kiln-t-drop").exists());
        assert!(!f.state.join("bundles/kiln-t-drop").exists());
        Ok(())
    }

    #[tokio::test]
    async fn runtime_errors_are_not_exit_codes() -> anyhow::Result<()> {
        let _heavy = crate::snapshot::HEAVY_TESTS.read().await;
        let f = fixture()?;
        let spec = ProcessSpec {
            args: vec!["/no/such/binary".into()],
            ..ProcessSpec::default()
        };
        let (res, _, _) = run(&f, "kiln-t-noexec", &spec).await;
        assert!(matches!(res, Err(Error::Runtime { .. })), "{res:?}");

        let mut spec = sh("true");
        spec.user = "ghost".into();
        let (res, _, _) = run(&f, "kiln-t-ghost", &spec).await;
        let e = res
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("ghost"), "{e}");

        if find_in_path("crun").is_none() {
            let crun = Executor::new(Runtime::Crun, f.state.clone())?;
            let (tx, _rx) = mpsc::unbounded_channel();
            let res = crun
                .run(
                    "kiln-t-crun",
                    &f.rootfs,
                    &sh("true"),
                    tx,
                    CancellationToken::new(),
                )
                .await;
            let e = res
                .err()
                .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
            assert!(e.to_string().contains("crun"), "{e}");
        }
        assert_eq!("crun".parse::<Runtime>()?, Runtime::Crun);
        assert_eq!(Runtime::parse("runc")?, Runtime::Runc);
        assert!(Runtime::parse("docker").is_err());
        Ok(())
    }

    fn find_in_path(name: &str) -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }
}
