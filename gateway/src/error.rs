//! The gateway's library errors, gathered at the crate root.

/// What can go wrong in the gateway's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A worker address that is not `tcp://host:port`.
    #[error("worker address {addr:?}: {reason}")]
    BadWorkerAddr {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--workers-dns` name that is not `NAME:PORT` or does not resolve.
    #[error("worker DNS name {name:?}: {reason}")]
    Dns {
        /// The name as given.
        name: String,
        /// What failed.
        reason: String,
    },
    /// A `--workers-endpointslice` target that is not `NAMESPACE/SERVICE`.
    #[error("worker endpoint slices {target:?}: {reason}")]
    EndpointSlice {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A broken internal invariant (a poisoned lock).
    #[error("internal error: {0}")]
    Internal(String),
}
