//! Running processes in containers: an OCI runtime spec built with `oci-spec`
//! ([`spec`]), handed to runc or crun ([`runc`]), with the network set up by
//! [`network`]. Uses nothing else in the crate.

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
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
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
    /// An executor keeping bundles and runtime state under `root`.
    pub fn new(runtime: Runtime, root: PathBuf) -> Result<Executor> {
        Ok(Executor { runtime, root })
    }

    /// Runs `spec` in a container whose rootfs is the mounted directory `rootfs`; output
    /// is sent to `output` as it comes; cancelling `cancel` kills the container. `id` must
    /// be unique among running containers.
    pub async fn run(
        &self,
        _id: &str,
        _rootfs: &std::path::Path,
        _spec: &ProcessSpec,
        _output: mpsc::UnboundedSender<LogChunk>,
        _cancel: CancellationToken,
    ) -> Result<()> {
        let _ = (&self.runtime, &self.root);
        Err(Error::NotImplemented("executor"))
    }
}
