//! SSH agent forwarding for `RUN --mount=type=ssh` (`moby.sshforward.v1.SSH`,
//! shared/design/buildkit-wire.md §6.5): the agent stays on the client; the build only
//! sees a socket whose connections are carried to it.
//!
//! * Client side: [`SshAgents`] maps agent ids to local agent sockets (`kiln build --ssh
//!   default` or `--ssh ID=SOCKET`), serves `CheckAgent`/`ForwardAgent` over the session,
//!   and is the daemonless build's [`crate::control::SessionServices`] for SSH.
//! * Daemon side: [`forward_agent`] opens one `ForwardAgent` stream (metadata
//!   `buildkit.ssh.id`) per connection a build makes to its socket; [`check_agent`] asks
//!   whether the client has the agent at all.
//!
//! Partial: only agent sockets are forwarded; BuildKit's private-key-file form of `--ssh`
//! is refused with an error saying so. Key material never passes through Kiln's memory
//! other than as opaque agent-protocol bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::StreamExt as _;
use kiln_proto::moby::sshforward::v1::ssh_client::SshClient;
use kiln_proto::moby::sshforward::v1::ssh_server::{Ssh, SshServer};
use kiln_proto::moby::sshforward::v1::{BytesMessage, CheckAgentRequest, CheckAgentResponse};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tonic::{Request, Response, Status, Streaming};

/// The CheckAgent method the daemon calls.
pub const CHECK_AGENT: &str = "/moby.sshforward.v1.SSH/CheckAgent";
/// The ForwardAgent method the daemon calls.
pub const FORWARD_AGENT: &str = "/moby.sshforward.v1.SSH/ForwardAgent";
/// Metadata naming the agent of a ForwardAgent stream.
pub const SSH_ID: &str = "buildkit.ssh.id";
/// The agent id when none is named.
pub const DEFAULT_ID: &str = "default";

/// A byte stream to an SSH agent.
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentIo for T {}

/// One connection to an SSH agent.
pub type AgentConn = Box<dyn AgentIo>;

/// Client side: agent sockets by id.
#[derive(Debug, Clone, Default)]
pub struct SshAgents {
    agents: Arc<HashMap<String, PathBuf>>,
}

impl SshAgents {
    /// Agents from `--ssh` values: `ID` (the socket in `$SSH_AUTH_SOCK`) or `ID=SOCKET`.
    /// A path that is not a unix socket (a private key file) is an error naming it.
    pub fn parse(specs: &[String]) -> Result<SshAgents, String> {
        let mut agents = HashMap::new();
        for spec in specs {
            let (id, paths) = match spec.split_once('=') {
                Some((id, paths)) => (id.trim(), Some(paths)),
                None => (spec.trim(), None),
            };
            if id.is_empty() {
                return Err(format!("--ssh {spec:?}: the agent id is empty"));
            }
            let path = match paths {
                Some(p) if p.contains(',') => {
                    return Err(format!(
                        "--ssh {spec:?}: several paths for one id are not supported yet (give one agent socket)"
                    ))
                }
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => match std::env::var_os("SSH_AUTH_SOCK") {
                    Some(s) if !s.is_empty() => PathBuf::from(s),
                    _ => {
                        return Err(format!(
                            "--ssh {spec:?}: SSH_AUTH_SOCK is not set; start ssh-agent or give ID=SOCKET"
                        ))
                    }
                },
            };
            check_socket(spec, &path)?;
            if agents.insert(id.to_string(), path).is_some() {
                return Err(format!("--ssh: agent id {id:?} is given twice"));
            }
        }
        Ok(SshAgents {
            agents: Arc::new(agents),
        })
    }

    /// Whether no agent is configured.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Connects to the agent `id`; `Ok(None)` when there is no such agent.
    pub async fn connect(&self, id: &str) -> Result<Option<tokio::net::UnixStream>, String> {
        let Some(path) = self.agents.get(id) else {
            return Ok(None);
        };
        tokio::net::UnixStream::connect(path)
            .await
            .map(Some)
            .map_err(|e| format!("ssh agent {id:?} at {}: {e}", path.display()))
    }

    /// The tonic service.
    pub fn into_service(self) -> SshServer<SshAgents> {
        SshServer::new(self)
    }
}

fn check_socket(spec: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("--ssh {spec:?}: {}: {e}", path.display()))?;
    if !meta.file_type().is_socket() {
        return Err(format!(
            "--ssh {spec:?}: {} is not an agent socket (private key files are not supported yet; load the key with ssh-add and forward the agent)",
            path.display()
        ));
    }
    Ok(())
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Ssh for SshAgents {
    async fn check_agent(
        &self,
        request: Request<CheckAgentRequest>,
    ) -> Result<Response<CheckAgentResponse>, Status> {
        let id = agent_id(&request.get_ref().id);
        if self.agents.contains_key(id) {
            Ok(Response::new(CheckAgentResponse {}))
        } else {
            Err(Status::not_found(format!(
                "no ssh agent {id:?} is forwarded"
            )))
        }
    }

    async fn forward_agent(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<BoxStream<BytesMessage>>, Status> {
        let id = request
            .metadata()
            .get(SSH_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_default();
        let id = agent_id(&id).to_string();
        let conn = self
            .connect(&id)
            .await
            .map_err(Status::unavailable)?
            .ok_or_else(|| Status::not_found(format!("no ssh agent {id:?} is forwarded")))?;
        let (rd, wr) = conn.into_split();
        tokio::spawn(pump_in(request.into_inner(), wr));
        let stream = tokio_util::io::ReaderStream::new(rd).map(|r| {
            r.map(|b| BytesMessage { data: b.to_vec() })
                .map_err(|e| Status::unavailable(format!("ssh agent: {e}")))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Writes what arrives on `inbound` to `wr` until either ends, then half-closes `wr`.
async fn pump_in<W: AsyncWrite + Unpin>(mut inbound: Streaming<BytesMessage>, mut wr: W) {
    while let Some(Ok(msg)) = inbound.next().await {
        if wr.write_all(&msg.data).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

fn agent_id(id: &str) -> &str {
    if id.is_empty() {
        DEFAULT_ID
    } else {
        id
    }
}

/// Daemon side: whether the client of `channel` forwards the agent `id`.
pub async fn check_agent(channel: tonic::transport::Channel, id: &str) -> Result<bool, String> {
    let req = CheckAgentRequest {
        id: agent_id(id).to_string(),
    };
    match SshClient::new(channel).check_agent(req).await {
        Ok(_) => Ok(true),
        Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unimplemented) => {
            Ok(false)
        }
        Err(s) => Err(format!("the client's SSH service: {}", s.message())),
    }
}

/// Daemon side: one connection to the client's agent `id`, carried by a `ForwardAgent`
/// stream; bytes are copied both ways until either side closes.
pub async fn forward_agent(
    channel: tonic::transport::Channel,
    id: &str,
) -> Result<AgentConn, String> {
    let (near, far) = tokio::io::duplex(64 << 10);
    let (far_rd, far_wr) = tokio::io::split(far);
    // Build → client: what the build writes to its socket is the request stream.
    let outbound =
        tokio_stream::StreamExt::map_while(tokio_util::io::ReaderStream::new(far_rd), |chunk| {
            chunk.ok().map(|b| BytesMessage { data: b.to_vec() })
        });
    let mut req = Request::new(outbound);
    let value = agent_id(id)
        .parse()
        .map_err(|_| format!("ssh agent id {id:?} is not a valid header value"))?;
    req.metadata_mut().insert(SSH_ID, value);
    let inbound = SshClient::new(channel)
        .forward_agent(req)
        .await
        .map_err(|s| format!("the client's SSH service: {}", s.message()))?
        .into_inner();
    // Client → build.
    tokio::spawn(pump_in(inbound, far_wr));
    Ok(Box::new(near))
}

#[async_trait::async_trait]
impl crate::control::SessionServices for SshAgents {
    async fn secret(&self, _id: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }

    async fn registry_auth(
        &self,
        _host: &str,
    ) -> Result<Option<oci_client::secrets::RegistryAuth>, String> {
        Ok(None)
    }

    async fn has_ssh_agent(&self, id: &str) -> Result<bool, String> {
        Ok(self.agents.contains_key(agent_id(id)))
    }

    async fn ssh_agent(&self, id: &str) -> Result<Option<AgentConn>, String> {
        Ok(self
            .connect(agent_id(id))
            .await?
            .map(|c| Box::new(c) as AgentConn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_sockets_and_refuse_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let key = dir.path().join("id_ed25519");
        std::fs::write(&key, "not a socket").unwrap();
        let a = SshAgents::parse(&[format!("work={}", sock.display())]).unwrap();
        assert!(a.agents.contains_key("work"));
        let e = SshAgents::parse(&[format!("k={}", key.display())]).unwrap_err();
        assert!(
            e.contains("not an agent socket") && e.contains("id_ed25519"),
            "{e}"
        );
        let e = SshAgents::parse(&[format!("=x{}", sock.display())]).unwrap_err();
        assert!(e.contains("id is empty"), "{e}");
        let e = SshAgents::parse(&[
            format!("a={}", sock.display()),
            format!("a={}", sock.display()),
        ])
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }
}
