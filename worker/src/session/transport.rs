//! The byte stream a `Control.Session` call carries and the HTTP/2 connection nested
//! in it (shared/design/buildkit-wire.md §4.2).
//!
//! Each `BytesMessage.data` is an arbitrary slice of one raw byte stream: reads
//! concatenate the inbound messages, every write becomes one outbound message. Inside
//! runs h2c with prior knowledge, roles reversed: the daemon is the gRPC client
//! ([`connect_client`]), the CLI the gRPC server ([`serve`]).
//!
//! Daemon side, inside the `Control.Session` handler:
//!
//! ```text
//! let (pipe, response) = transport::accept(request.into_inner());
//! tokio::spawn(async move { let channel = transport::connect_client(pipe).await?; … });
//! Ok(Response::new(response))
//! ```

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use kiln_proto::grpc::health::v1::health_check_response::ServingStatus;
use kiln_proto::grpc::health::v1::health_client::HealthClient;
use kiln_proto::grpc::health::v1::health_server::{Health, HealthServer};
use kiln_proto::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse};
use kiln_proto::moby::buildkit::v1::BytesMessage;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::codegen::http::Uri;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use super::SessionError;

/// The largest slice of the byte stream put into one outbound `BytesMessage`.
pub const MAX_MESSAGE_DATA: usize = 1 << 20;

/// Message size limit of the nested gRPC connection (BuildKit uses 16 MiB).
pub const MAX_GRPC_MESSAGE: usize = 16 << 20;

/// A bidirectional byte stream over `BytesMessage`s: reading yields the inbound
/// messages' bytes in order (EOF when the inbound stream ends; an error status becomes
/// an I/O error); writing sends one message per write (at most [`MAX_MESSAGE_DATA`]
/// bytes); shutdown closes the outbound side, so the peer reads EOF (half-close).
pub struct SessionPipe {
    inbound: BoxStream<'static, Result<BytesMessage, Status>>,
    pending: Bytes,
    read_done: bool,
    outbound: PollSender<BytesMessage>,
}

impl std::fmt::Debug for SessionPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPipe")
            .field("pending", &self.pending.len())
            .field("read_done", &self.read_done)
            .finish_non_exhaustive()
    }
}

/// Builds a [`SessionPipe`] from the inbound messages (a `tonic::Streaming<BytesMessage>`
/// or any stream of them) and the sender of the outbound ones.
pub fn pipe<S>(inbound: S, outbound: mpsc::Sender<BytesMessage>) -> SessionPipe
where
    S: Stream<Item = Result<BytesMessage, Status>> + Send + 'static,
{
    SessionPipe {
        inbound: inbound.boxed(),
        pending: Bytes::new(),
        read_done: false,
        outbound: PollSender::new(outbound),
    }
}

/// The stream a `Control.Session` handler returns as its response body.
pub type ResponseStream = BoxStream<'static, Result<BytesMessage, Status>>;

/// Daemon side of `Control.Session`: the pipe over the request stream, and the stream
/// to return as the response (it ends when the pipe is shut down or dropped).
pub fn accept<S>(inbound: S) -> (SessionPipe, ResponseStream)
where
    S: Stream<Item = Result<BytesMessage, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let response = ReceiverStream::new(rx).map(Ok).boxed();
    (pipe(inbound, tx), response)
}

impl AsyncRead for SessionPipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.inbound.poll_next_unpin(cx)) {
                Some(Ok(msg)) => this.pending = Bytes::from(msg.data),
                Some(Err(status)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("session stream failed: {}", status.message()),
                    )));
                }
                None => this.read_done = true,
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "session stream closed")
}

impl AsyncWrite for SessionPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.outbound.poll_reserve(cx)).map_err(|_| closed())?;
        let n = buf.len().min(MAX_MESSAGE_DATA);
        this.outbound
            .send_item(BytesMessage {
                data: buf[..n].to_vec(),
            })
            .map_err(|_| closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().outbound.close();
        Poll::Ready(Ok(()))
    }
}

/// Daemon side: dials a gRPC client (h2c, authority `localhost`) over the pipe. The
/// channel works with any generated client (`FileSyncClient::new(channel)`); it uses
/// the pipe for its one connection and cannot reconnect once the session ends.
pub async fn connect_client(pipe: SessionPipe) -> Result<Channel, SessionError> {
    let slot = Arc::new(Mutex::new(Some(pipe)));
    let connector = tower::service_fn(move |_uri: Uri| {
        let slot = Arc::clone(&slot);
        async move {
            let pipe = slot
                .lock()
                .map_err(|_| io::Error::other("session pipe lock poisoned"))?
                .take()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotConnected, "session connection is closed")
                })?;
            Ok::<_, io::Error>(TokioIo::new(pipe))
        }
    });
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(SessionError::Connect)
}

/// CLI side: serves `routes` over the pipe as an HTTP/2 server until the connection
/// ends (the daemon closes it or the stream breaks). To close the session, drop (abort)
/// this future: dropping the pipe half-closes the `Control.Session` request stream. Build the routes with
/// `Routes::new(FileSyncServer::new(dirs)).add_service(health_service())`.
pub async fn serve(pipe: SessionPipe, routes: Routes) -> Result<(), SessionError> {
    let service = TowerToHyperService::new(routes.prepare());
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_frame_size(1 << 20);
    builder
        .serve_connection(TokioIo::new(pipe), service)
        .await
        .map_err(SessionError::Serve)
}

/// One `grpc.health.v1.Health/Check` over the session, failing after `timeout`.
pub async fn check_health(channel: Channel, timeout: Duration) -> Result<(), SessionError> {
    let call = || "Health.Check".to_string();
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = tokio::time::timeout(timeout, HealthClient::new(channel).check(request))
        .await
        .map_err(|_| SessionError::Rpc {
            call: call(),
            source: Status::deadline_exceeded(format!("no answer within {timeout:?}")),
        })?
        .map_err(|source| SessionError::Rpc {
            call: call(),
            source,
        })?
        .into_inner();
    if response.status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(SessionError::Rpc {
            call: call(),
            source: Status::unavailable(format!("client reports status {}", response.status)),
        })
    }
}

/// The daemon's liveness loop (§4.2): checks the client's health every `interval`
/// (BuildKit: 5 s) with a timeout of 3 × `interval`, or 1.5 × the previous check's
/// duration if longer; returns the error once two checks in a row have failed. Run it
/// beside the session and close the session when it returns.
pub async fn monitor_health(channel: Channel, interval: Duration) -> SessionError {
    let mut timeout = interval * 3;
    let mut failed_before = false;
    loop {
        tokio::time::sleep(interval).await;
        let started = tokio::time::Instant::now();
        match check_health(channel.clone(), timeout).await {
            Ok(()) => {
                failed_before = false;
                timeout = timeout.max(started.elapsed().mul_f64(1.5));
            }
            Err(e) if failed_before => return e,
            Err(e) => {
                tracing::debug!(error = %e, "session health check failed");
                failed_before = true;
            }
        }
    }
}

/// The standard health service a session client always serves (§4.1): every service
/// is reported `SERVING`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysServing;

#[tonic::async_trait]
impl Health for AlwaysServing {
    async fn check(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }
}

/// [`AlwaysServing`] as a service to add to the routes given to [`serve`].
pub fn health_service() -> HealthServer<AlwaysServing> {
    HealthServer::new(AlwaysServing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two pipes wired back to back, as the two ends of a `Control.Session` call.
    fn pair() -> (SessionPipe, SessionPipe) {
        let (a_tx, a_rx) = mpsc::channel(4);
        let (b_tx, b_rx) = mpsc::channel(4);
        let a = pipe(ReceiverStream::new(b_rx).map(Ok), a_tx);
        let b = pipe(ReceiverStream::new(a_rx).map(Ok), b_tx);
        (a, b)
    }

    #[tokio::test]
    async fn pipe_carries_bytes_and_half_closes() -> anyhow::Result<()> {
        let (mut a, mut b) = pair();
        let payload: Vec<u8> = (0..3 * MAX_MESSAGE_DATA + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let expect = payload.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&payload).await?;
            a.shutdown().await?;
            // The other direction still works after our half-close.
            let mut back = Vec::new();
            a.read_to_end(&mut back).await?;
            anyhow::Ok(back)
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await?;
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "bytes differ");
        b.write_all(b"reply").await?;
        b.shutdown().await?;
        assert_eq!(writer.await??, b"reply");
        Ok(())
    }

    #[tokio::test]
    async fn inbound_error_is_an_io_error_and_writes_to_a_dropped_peer_fail() -> anyhow::Result<()>
    {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut p = pipe(
            futures::stream::iter(vec![Err(Status::unavailable("gone"))]),
            tx,
        );
        let mut buf = [0u8; 8];
        let err = p
            .read(&mut buf)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("no error"))?;
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let err = p
            .write(b"x")
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("no error"))?;
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        Ok(())
    }

    #[tokio::test]
    async fn grpc_client_and_server_talk_over_the_pipe() -> anyhow::Result<()> {
        let (daemon, cli) = pair();
        let server = tokio::spawn(serve(cli, Routes::new(health_service())));
        let channel = connect_client(daemon).await?;
        let mut health = HealthClient::new(channel.clone());
        for _ in 0..3 {
            let resp = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            assert_eq!(resp.status, ServingStatus::Serving as i32);
        }
        check_health(channel.clone(), Duration::from_secs(5)).await?;
        drop(health);
        drop(channel);
        // Dropping the daemon's channel ends the connection and the server returns.
        tokio::time::timeout(std::time::Duration::from_secs(10), server).await???;
        Ok(())
    }

    #[tokio::test]
    async fn monitor_reports_a_dead_client_after_two_failed_checks() -> anyhow::Result<()> {
        let (a_tx, a_rx) = mpsc::channel(4);
        let (b_tx, b_rx) = mpsc::channel(4);
        let daemon = pipe(ReceiverStream::new(b_rx).map(Ok), a_tx);
        let cli = pipe(ReceiverStream::new(a_rx).map(Ok), b_tx);
        let server = tokio::spawn(serve(cli, Routes::new(health_service())));
        let channel = connect_client(daemon).await?;
        let monitor = tokio::spawn(monitor_health(channel.clone(), Duration::from_millis(20)));
        // Healthy: the monitor keeps running.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!monitor.is_finished());
        check_health(channel, Duration::from_secs(5)).await?;
        // The client goes away: the monitor returns an error.
        server.abort();
        let err = tokio::time::timeout(Duration::from_secs(20), monitor).await??;
        assert!(err.to_string().contains("Health.Check"), "{err}");
        Ok(())
    }
}
