//! BuildKit sessions (shared/design/buildkit-wire.md §4, §6.1, §6.2): the byte pipe a
//! `Control.Session` stream carries, the HTTP/2 connection nested in it (the daemon is
//! the gRPC client, the CLI the gRPC server), and the fsutil `DiffCopy` file transfer
//! over `moby.filesync.v1.FileSync` in both roles.
//!
//! * [`transport`]: [`transport::pipe`] turns an inbound `BytesMessage` stream and an
//!   outbound sender into an `AsyncRead + AsyncWrite`; [`transport::connect_client`]
//!   dials a gRPC channel over it (daemon side), [`transport::serve`] serves tonic
//!   routes over it (CLI side).
//! * [`filesync`]: [`filesync::LocalDirs`] is the sender (a `FileSync` server that
//!   walks local directories), [`filesync::receive`] the receiver that writes the
//!   listing into a destination directory without ever leaving it.
//! * [`manager`]: [`manager::SessionManager`] is the daemon's table of open sessions;
//!   its `handle` is the whole daemon side of `Control.Session`, its `get` the lookup
//!   a solve does by session ID.
//! * [`attachables`], [`sshforward`] and [`content`]: secrets, registry credentials, SSH
//!   agents and content stores (OCI layouts for `tar=false` outputs and local caches) the
//!   client serves.
//!
//! The module does not know about builds.

pub mod attachables;
pub mod content;
pub mod filesend;
pub mod filesync;
pub mod manager;
pub mod sshforward;
pub mod transport;

use std::path::PathBuf;

use kiln_proto::metadata as md;
use tonic::metadata::MetadataMap;

/// A session or file-transfer failure.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The nested HTTP/2 client connection could not be set up.
    #[error("session: cannot connect the nested grpc client")]
    Connect(#[source] tonic::transport::Error),
    /// The nested HTTP/2 server connection failed.
    #[error("session: nested http/2 server failed")]
    Serve(#[source] hyper::Error),
    /// A gRPC call inside the session failed.
    #[error("session: {call} failed")]
    Rpc {
        /// The method called, e.g. `FileSync.DiffCopy(context)`.
        call: String,
        /// The status returned.
        #[source]
        source: tonic::Status,
    },
    /// The peer broke the fsutil packet protocol.
    #[error("filesync protocol error: {reason}")]
    Protocol {
        /// What was wrong, naming the path or entry ID.
        reason: String,
    },
    /// The peer sent a path that would leave the destination or go through a symlink.
    #[error("filesync: refusing unsafe path {path:?}: {reason}")]
    UnsafePath {
        /// The path as sent.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// The peer aborted with a `PACKET_ERR`.
    #[error("filesync: peer reported an error: {message}")]
    Peer {
        /// The peer's message.
        message: String,
    },
    /// A local file operation failed.
    #[error("filesync: {op} {path}")]
    Io {
        /// What was being done (`create`, `write`, `chmod`…).
        op: &'static str,
        /// The local path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Include/exclude patterns that do not compile.
    #[error("filesync: invalid {kind} patterns")]
    Pattern {
        /// `include` or `exclude`.
        kind: &'static str,
        /// The pattern error.
        #[source]
        source: crate::source::local::patterns::PatternError,
    },
}

impl SessionError {
    pub(crate) fn protocol(reason: impl Into<String>) -> SessionError {
        SessionError::Protocol {
            reason: reason.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SessionError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// What a client announces in the metadata of its `Control.Session` call (§4.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionHeaders {
    /// `X-Docker-Expose-Session-Uuid`: the session ID a `SolveRequest.session` names.
    pub id: String,
    /// `X-Docker-Expose-Session-Sharedkey` (may be empty).
    pub shared_key: String,
    /// `X-Docker-Expose-Session-Grpc-Method`: the methods the client serves, lowercased
    /// (`/moby.filesync.v1.filesync/diffcopy`).
    pub methods: Vec<String>,
    /// `X-Docker-Expose-Session-Name` when an old client still sends it.
    pub name: Option<String>,
}

impl SessionHeaders {
    /// Reads the headers from a `Control.Session` request; `None` without a session ID.
    /// Header names are matched case-insensitively (gRPC metadata keys are lowercase).
    pub fn from_metadata(meta: &MetadataMap) -> Option<SessionHeaders> {
        let get = |key: &str| {
            meta.get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let id = get(md::SESSION_UUID).filter(|id| !id.is_empty())?;
        let methods = meta
            .get_all(md::SESSION_GRPC_METHOD)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
            .collect();
        Some(SessionHeaders {
            id,
            shared_key: get(md::SESSION_SHARED_KEY).unwrap_or_default(),
            methods,
            name: get(md::SESSION_NAME),
        })
    }

    /// Whether the client serves `method` (`/package.Service/Method`, any case).
    pub fn supports(&self, method: &str) -> bool {
        let method = method.to_ascii_lowercase();
        self.methods.contains(&method)
    }

    /// Writes the headers into request metadata, as a client opening a session does.
    pub fn to_metadata(&self, meta: &mut MetadataMap) -> Result<(), SessionError> {
        let value = |v: &str| {
            v.parse().map_err(|_| {
                SessionError::protocol(format!("session header value {v:?} is not ascii"))
            })
        };
        meta.insert(md::SESSION_UUID, value(&self.id)?);
        meta.insert(md::SESSION_SHARED_KEY, value(&self.shared_key)?);
        for m in &self.methods {
            meta.append(md::SESSION_GRPC_METHOD, value(m)?);
        }
        if let Some(name) = &self.name {
            meta.insert(md::SESSION_NAME, value(name)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_headers_round_trip_through_metadata() -> anyhow::Result<()> {
        let h = SessionHeaders {
            id: "abc123".into(),
            shared_key: String::new(),
            methods: vec![
                "/moby.filesync.v1.FileSync/DiffCopy".into(),
                "/grpc.health.v1.Health/Check".into(),
            ],
            name: None,
        };
        let mut meta = MetadataMap::new();
        h.to_metadata(&mut meta)?;
        let back = SessionHeaders::from_metadata(&meta).ok_or_else(|| anyhow::anyhow!("no id"))?;
        assert_eq!(back.id, "abc123");
        assert_eq!(back.shared_key, "");
        assert!(back.supports("/moby.filesync.v1.FileSync/DiffCopy"));
        assert!(back.supports("/MOBY.filesync.v1.filesync/diffcopy"));
        assert!(!back.supports("/moby.filesync.v1.FileSend/DiffCopy"));
        assert!(SessionHeaders::from_metadata(&MetadataMap::new()).is_none());
        Ok(())
    }
}
