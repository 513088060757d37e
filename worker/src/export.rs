//! Exporters: turning a result (a stack of layer dirs) and an image config into outputs:
//! an image (built into the content store, optionally pushed: [`image`]), OCI and Docker
//! tarballs ([`oci`], [`docker`]), a local directory ([`local`]) or a tar stream
//! ([`tar`]). May use `content`, `snapshot` and `source::image` (registry access).

pub mod docker;
pub mod image;
pub mod local;
pub mod oci;
pub mod tar;

use std::path::PathBuf;

/// What can go wrong exporting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid exporter attributes.
    #[error("exporter {exporter}: {message}")]
    Attr {
        /// Exporter type.
        exporter: String,
        /// What is wrong.
        message: String,
    },
    /// Writing an output failed.
    #[error("export to {path}: {source}")]
    Io {
        /// Output path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Pushing failed.
    #[error("push {reference}: {message}")]
    Push {
        /// Image name.
        reference: String,
        /// What failed.
        message: String,
    },
    /// Layer or snapshot failure.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    /// Content store failure.
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression.
    Uncompressed,
    /// gzip (default).
    #[default]
    Gzip,
    /// zstd.
    Zstd,
}

/// A layer blob in the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Media type (OCI or Docker, by compression).
    pub media_type: String,
    /// Digest of the blob.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
}

/// One layer of a result to export.
#[derive(Debug, Clone)]
pub struct ExportLayer {
    /// The layer directory (overlay upper format).
    pub dir: PathBuf,
    /// Blobs already made for this layer (pulled, or made by an earlier export); one is
    /// reused when its compression matches.
    pub blobs: Vec<LayerBlob>,
}
