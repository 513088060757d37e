//! The crate's error type: one variant per module, each carrying that module's own error.

/// Anything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Dockerfile frontend rejected its input.
    #[error(transparent)]
    Frontend(#[from] crate::frontend::Error),
    /// An LLB definition was malformed.
    #[error(transparent)]
    Llb(#[from] crate::llb::Error),
    /// The solver failed to schedule or run a vertex.
    #[error(transparent)]
    Solver(#[from] crate::solver::Error),
    /// A snapshot, mount or layer operation failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    /// Running a container failed.
    #[error(transparent)]
    Executor(#[from] crate::executor::Error),
    /// The content store failed.
    #[error(transparent)]
    Content(#[from] crate::content::Error),
    /// The cache store failed.
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
    /// Fetching a source failed.
    #[error(transparent)]
    Source(#[from] crate::source::Error),
    /// Exporting a result failed.
    #[error(transparent)]
    Export(#[from] crate::export::Error),
    /// An op failed.
    #[error(transparent)]
    Ops(#[from] crate::ops::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
