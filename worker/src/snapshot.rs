//! Snapshots: layer directories in overlayfs upper-dir format, mounted as stacks with
//! kernel overlayfs (or materialized by copying where overlay is unavailable), safe path
//! resolution inside a root, and layer diffs/unpacking ([`layer`]). Uses nothing else in
//! the crate; only `cache`, `ops`, `export` and `executor` callers use it.

pub mod layer;

use std::path::{Path, PathBuf};

/// What can go wrong with a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
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
    /// Mounting or unmounting failed.
    #[error("mount {target}: {message}")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// What failed.
        message: String,
    },
    /// A layer tar was malformed or tried to escape its root.
    #[error("layer {layer}: {message}")]
    Layer {
        /// Which layer (digest or path).
        layer: String,
        /// What is wrong.
        message: String,
    },
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How layer stacks are presented as one tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Kernel overlayfs.
    Overlay,
    /// Copy the layers into a directory; diff it back afterwards.
    Copy,
}

/// Mounts stacks of layer directories.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    kind: Kind,
}

impl Snapshotter {
    /// Overlay when a test mount in `scratch` works, else copying.
    pub fn detect(_scratch: &Path) -> Snapshotter {
        Snapshotter { kind: Kind::Copy }
    }

    /// A snapshotter of a given kind.
    pub fn with_kind(kind: Kind) -> Snapshotter {
        Snapshotter { kind }
    }

    /// Which kind this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A writable view at `target` of `layers` (lowest first, may be empty); writes land
    /// in `upper` (an empty directory) in overlay format; `work` is an empty directory on
    /// the same filesystem as `upper`.
    pub fn mount(
        &self,
        _layers: &[PathBuf],
        _upper: &Path,
        _work: &Path,
        _target: &Path,
    ) -> Result<ActiveMount> {
        Err(Error::NotImplemented("snapshot mount"))
    }

    /// A read-only view of `layers` at `target`.
    pub fn mount_readonly(&self, _layers: &[PathBuf], _target: &Path) -> Result<ActiveMount> {
        Err(Error::NotImplemented("snapshot mount"))
    }
}

/// A mounted view; unmounted (best effort) when dropped.
#[derive(Debug)]
pub struct ActiveMount {
    target: PathBuf,
}

impl ActiveMount {
    /// Where the view is.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts; for a writable copy-kind view, first writes the changes into `upper` in
    /// overlay format (whiteouts for deletions, opaque markers for replaced directories).
    pub fn commit(self) -> Result<()> {
        Err(Error::NotImplemented("snapshot commit"))
    }
}

/// Resolves `path` (absolute or relative) inside `root` the way the kernel would with
/// `root` as `/`: symlinks are followed (the last one only if `follow_last`) and `..`
/// never climbs above `root`. The result is always under `root`.
pub fn resolve_in_root(_root: &Path, _path: &str, _follow_last: bool) -> Result<PathBuf> {
    Err(Error::NotImplemented("resolve_in_root"))
}
