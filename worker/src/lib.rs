//! Kiln's build engine: Dockerfile or LLB plus a context in; OCI images, tarballs or
//! directories out; every result keyed by content and kept in a crash-safe local store.
//!
//! The engine is a library. The `kiln-worker` daemon and the `kiln` CLI's daemonless
//! mode both embed it through [`control::Engine`].
//!
//! # Layout (data flow follows BuildKit's)
//!
//! ```text
//! control ─► frontend (Dockerfile → LLB) ─► solver (graph, keys, dedup, progress)
//!               │ llb                           │
//!               ▼                               ▼
//!           llb (pb::Op data)        ops/{source,exec,file} ─► source/{image,local}
//!                                               │                 executor/{runc,spec}
//!                                               ▼
//!                                 cache/{refs,metadata} ─► snapshot, content
//!                                               │
//!                                               ▼
//!                                 export/{image,oci,docker,local,tar}
//! ```
//!
//! # Glossary
//!
//! - **vertex**: one LLB op in a build graph, named by the digest of its marshalled bytes.
//! - **cache key**: a digest of what a vertex's result depends on: its op definition and
//!   its inputs' cache keys, and, for copies, the contents of the files read (never
//!   times). Equal keys mean equal results on any worker.
//! - **ref**: an immutable result held in the cache: a stack of layer directories.
//! - **snapshot**: a layer directory in overlayfs upper-dir format (whiteouts are `c 0,0`
//!   devices, opaque directories carry `trusted.overlay.opaque=y`), or a mounted view of
//!   a stack of them.
//! - **exporter**: turns a final ref plus an image config into an output: an image in a
//!   registry, an OCI or Docker tarball, a local directory or a tar stream.

pub mod cache;
pub mod content;
pub mod control;
pub mod error;
pub mod executor;
pub mod export;
pub mod frontend;
pub mod image;
pub mod llb;
pub mod metrics;
pub mod ops;
pub mod progress;
pub mod session;
pub mod snapshot;
pub mod solver;
pub mod source;
#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};

/// Aborts a task when dropped (a helper task that must not outlive its owner).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
