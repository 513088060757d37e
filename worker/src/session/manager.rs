//! The daemon's table of open sessions (shared/design/buildkit-wire.md §4.1–§4.3):
//! `Control.Session` calls register here, solves look their session up by ID, waiting
//! a little for one that has not connected yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::moby::buildkit::v1::BytesMessage;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::transport::{self, ResponseStream};
use super::SessionHeaders;

/// How long a lookup waits for a session that has not connected yet (BuildKit: 5 s).
pub const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Interval of the daemon's health checks on a session (BuildKit: 5 s).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// One connected session: what the client announced and a gRPC channel to the
/// services it serves (e.g. `FileSyncClient::new(session.channel.clone())`).
#[derive(Debug, Clone)]
pub struct Session {
    /// The client's `Control.Session` headers.
    pub headers: SessionHeaders,
    /// The nested connection to the client.
    pub channel: Channel,
}

/// Open sessions by ID. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct SessionManager {
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    changed: watch::Sender<u64>,
    health_interval: Duration,
}

impl Default for SessionManager {
    fn default() -> Self {
        SessionManager::new()
    }
}

/// Removes its session from the manager when dropped.
#[derive(Debug)]
pub struct Registration {
    manager: SessionManager,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.manager.sessions.lock() {
            map.remove(&self.id);
        }
        self.manager.changed.send_modify(|g| *g += 1);
    }
}

impl SessionManager {
    /// An empty table checking session health every [`HEALTH_INTERVAL`].
    pub fn new() -> SessionManager {
        SessionManager {
            sessions: Arc::default(),
            changed: watch::channel(0).0,
            health_interval: HEALTH_INTERVAL,
        }
    }

    /// Changes the health-check interval of sessions handled from now on.
    pub fn with_health_interval(mut self, interval: Duration) -> SessionManager {
        self.health_interval = interval;
        self
    }

    /// Adds a session (replacing one with the same ID) until the returned guard drops.
    pub fn register(&self, session: Session) -> Registration {
        let id = session.headers.id.clone();
        if let Ok(mut map) = self.sessions.lock() {
            map.insert(id.clone(), session);
        }
        self.changed.send_modify(|g| *g += 1);
        Registration {
            manager: self.clone(),
            id,
        }
    }

    /// Finds session `id` (a `prefix:` before the first `:` is ignored), waiting up to
    /// `wait` for it to connect.
    pub async fn get(&self, id: &str, wait: Duration) -> Option<Session> {
        let id = id.split_once(':').map_or(id, |(_, real)| real);
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(s) = self.sessions.lock().ok()?.get(id).cloned() {
                return Some(s);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Resolves once session `id` (prefix ignored, as in [`SessionManager::get`]) is no
    /// longer open: its client closed it, went away, or failed its health checks.
    pub async fn closed(&self, id: &str) {
        let id = id.split_once(':').map_or(id, |(_, real)| real);
        let mut changes = self.changed.subscribe();
        loop {
            let open = self
                .sessions
                .lock()
                .map(|m| m.contains_key(id))
                .unwrap_or(false);
            if !open || changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// The whole daemon side of `Control.Session`: reads the headers, dials the client
    /// over the stream, registers the session, and keeps it until the client closes
    /// the stream or fails two health checks in a row. Return the result from the
    /// `Control::session` handler.
    pub async fn handle(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let headers = SessionHeaders::from_metadata(request.metadata()).ok_or_else(|| {
            Status::invalid_argument("session request without x-docker-expose-session-uuid")
        })?;
        let (ended_tx, ended) = oneshot::channel::<()>();
        // A marker after the inbound stream: fires when the client half-closes.
        let inbound = request.into_inner().chain(
            futures::stream::once(async move {
                drop(ended_tx);
            })
            .filter_map(|()| async { None }),
        );
        let (pipe, response) = transport::accept(inbound);
        let manager = self.clone();
        tokio::spawn(async move {
            let id = headers.id.clone();
            let channel = match transport::connect_client(pipe).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "cannot connect to session");
                    return;
                }
            };
            let _registration = manager.register(Session {
                headers,
                channel: channel.clone(),
            });
            tracing::debug!(session = %id, "session open");
            tokio::select! {
                err = transport::monitor_health(channel, manager.health_interval) => {
                    tracing::warn!(session = %id, error = %err, "session failed its health checks");
                }
                _ = ended => tracing::debug!(session = %id, "client closed the session"),
            }
        });
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::filesync::{receive, LocalDirs, ReceiveOptions};
    use crate::session::transport::{health_service, pipe, serve};
    use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
    use kiln_proto::moby::buildkit::v1::control_server::{Control, ControlServer};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::service::Routes;

    fn idle_channel() -> Channel {
        tonic::transport::Endpoint::from_static("http://localhost").connect_lazy()
    }

    fn headers(id: &str) -> SessionHeaders {
        SessionHeaders {
            id: id.into(),
            ..SessionHeaders::default()
        }
    }

    #[tokio::test]
    async fn lookups_wait_for_late_sessions_strip_prefixes_and_time_out() -> anyhow::Result<()> {
        let m = SessionManager::new();
        assert!(m.get("nope", Duration::from_millis(50)).await.is_none());
        let late = m.clone();
        let reg = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            late.register(Session {
                headers: headers("abc"),
                channel: idle_channel(),
            })
        });
        let found = m.get("abc", Duration::from_secs(10)).await;
        assert_eq!(found.map(|s| s.headers.id), Some("abc".to_string()));
        let registration = reg.await?;
        assert!(m.get("shared:abc", Duration::ZERO).await.is_some());
        drop(registration);
        assert!(m.get("abc", Duration::ZERO).await.is_none());
        Ok(())
    }

    struct Daemon(SessionManager);

    #[tonic::async_trait]
    impl Control for Daemon {
        async fn session(
            &self,
            request: Request<Streaming<BytesMessage>>,
        ) -> Result<Response<ResponseStream>, Status> {
            self.0.handle(request).await
        }
    }

    #[tokio::test]
    async fn handled_session_serves_files_and_disappears_when_the_client_leaves(
    ) -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        std::fs::write(tmp.path().join("Dockerfile"), "FROM scratch")?;
        let manager = SessionManager::new().with_health_interval(Duration::from_millis(50));
        let sock = tmp.path().join("d.sock");
        let listener = tokio::net::UnixListener::bind(&sock)?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ControlServer::new(Daemon(manager.clone())))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let control = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await?;
        let (out_tx, out_rx) = mpsc::channel(16);
        let mut request = Request::new(ReceiverStream::new(out_rx));
        headers("s1").to_metadata(request.metadata_mut())?;
        let inbound = ControlClient::new(control)
            .session(request)
            .await?
            .into_inner();
        let routes = Routes::new(
            LocalDirs::new()
                .with_dir("dockerfile", tmp.path())
                .into_service(),
        )
        .add_service(health_service());
        let cli = tokio::spawn(serve(pipe(inbound, out_tx), routes));

        let session = manager
            .get("s1", LOOKUP_WAIT)
            .await
            .ok_or_else(|| anyhow::anyhow!("session not registered"))?;
        let dest = tmp.path().join("out");
        let opts = ReceiveOptions {
            follow_paths: vec!["Dockerfile".into()],
            ..ReceiveOptions::default()
        };
        receive(session.channel.clone(), "dockerfile", &dest, &opts).await?;
        assert_eq!(std::fs::read(dest.join("Dockerfile"))?, b"FROM scratch");

        // The client goes away (closing its side of the stream): the session is removed.
        cli.abort();
        let gone = async {
            while manager.get("s1", Duration::ZERO).await.is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), gone).await?;
        Ok(())
    }
}
