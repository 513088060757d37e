//! Filesystem semantics of LLB file actions over plain directories, never leaving the
//! roots they are given.

/// What can go wrong in a file action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
