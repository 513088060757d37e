//! The cache: immutable results (refs: stacks of layer dirs), their records in a
//! crash-safe metadata store keyed by cache key, and the only place that creates
//! snapshot directories. May use `snapshot` and `content`.

/// What can go wrong in the cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metadata store failed.
    #[error("cache metadata {path}: {message}")]
    Store {
        /// The store's file.
        path: std::path::PathBuf,
        /// What failed.
        message: String,
    },
    /// A filesystem operation failed.
    #[error("cache: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
