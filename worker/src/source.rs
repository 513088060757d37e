//! Fetching build inputs: container images from registries ([`image`]), local
//! directories of the client ([`local`]), git repositories ([`git`]) and URLs ([`http`]). May use `cache`, `content` and `snapshot`.

pub mod git;
pub mod http;
pub mod image;
pub mod local;

/// What can go wrong fetching a source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A registry operation failed.
    #[error("{reference}: {message}")]
    Registry {
        /// The image reference.
        reference: String,
        /// What failed.
        message: String,
    },
    /// A local directory could not be read.
    #[error("local {name} ({path}): {message}")]
    Local {
        /// The local's name (`context`).
        name: String,
        /// Its path.
        path: std::path::PathBuf,
        /// What failed.
        message: String,
    },
    /// A git remote could not be resolved, fetched or checked out.
    #[error("git source {remote} (ref {reference}): {message}")]
    Git {
        /// The remote, without credentials.
        remote: String,
        /// The ref asked for.
        reference: String,
        /// What failed.
        message: String,
    },
    /// A URL could not be downloaded or did not match its checksum.
    #[error("http source {url}: {message}")]
    Http {
        /// The URL, without credentials.
        url: String,
        /// What failed.
        message: String,
    },
    /// Content store failure while fetching.
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
