//! The solver: a build graph of vertices, scheduled with bounded parallelism,
//! deduplicated across concurrent builds by cache key, each result keyed by content.
//! Generic over the [`Op`] trait; it never names a concrete op. May use `progress`.

/// What can go wrong solving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vertex failed.
    #[error("{name}: {message}")]
    Vertex {
        /// Display name of the vertex.
        name: String,
        /// What failed.
        message: String,
    },
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
