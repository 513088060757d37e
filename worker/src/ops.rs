//! Ops: one `resolve_op` match from an LLB op to its implementation (source, exec, file).
//! May use `source`, `cache`, `executor` and `snapshot`.

pub mod file;

/// What can go wrong in an op.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The op is not supported.
    #[error("unsupported op: {0}")]
    Unsupported(String),
    /// A file action failed.
    #[error(transparent)]
    File(#[from] file::fsops::Error),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
