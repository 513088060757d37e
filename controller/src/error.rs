//! The crate's error type, gathering each module's failures with the input they concern.

use crate::units::ParseError;

/// Everything the controller library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A size or duration in a spec did not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A spec value is invalid for a reason other than its syntax.
    #[error("invalid {field} in {object}: {reason}")]
    InvalidSpec {
        /// The object, `namespace/name`.
        object: String,
        /// The spec field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// Issuing or reading a certificate failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A request to the API server failed.
    #[error("cannot {action}")]
    Kube {
        /// What was attempted, e.g. `apply StatefulSet builds/pool-worker`.
        action: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// A gateway's admin endpoint could not be read or refused a request.
    #[error("gateway admin endpoint {endpoint}: {reason}")]
    Admin {
        /// The endpoint (or what it belongs to).
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// Writing generated files failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serializing an object to YAML failed.
    #[error("cannot serialize {what} to YAML: {reason}")]
    Yaml {
        /// What was serialized.
        what: String,
        /// The serializer's message.
        reason: String,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
