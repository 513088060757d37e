//! Where Kiln's gRPC services listen and how clients reach them: `unix://` and `tcp://`
//! addresses, mutual TLS on TCP with certificates re-read when their files change, and
//! tonic channels over either. The worker, the gateway and the CLI all use this module, so
//! they accept the same addresses and the same TLS flags.
//!
//! A server's TLS configuration is checked against its files' metadata at every accepted
//! connection; a changed file is re-read and the new configuration applies to new
//! connections, while established connections (and the builds on them) continue. A file
//! that fails to load keeps the previous configuration and logs why.

pub mod http;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from parsing addresses, loading certificates, listening and connecting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An address that is neither `unix:///path` nor `tcp://host:port`.
    #[error("address {0:?}: expected unix:///path or tcp://host:port")]
    BadAddr(String),
    /// A TCP listener without TLS files and without the explicit opt-out.
    #[error("{0}: TCP requires mutual TLS: pass --tlscacert, --tlscert and --tlskey, or --insecure-tcp to serve plaintext on a trusted network")]
    TlsRequired(String),
    /// Only some of the TLS files were given.
    #[error("TLS needs all of {0}")]
    TlsIncomplete(&'static str),
    /// A certificate, key or CA file that cannot be read or used.
    #[error("{path}: {msg}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A TLS configuration rustls refuses (for example a key that does not match).
    #[error("TLS configuration from {cert}: {source}")]
    TlsConfig {
        /// The certificate file the configuration was built from.
        cert: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// Binding or connecting failed.
    #[error("{addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The gRPC channel could not be set up.
    #[error("{addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A listen or dial address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A unix socket path (`unix:///run/kiln/kiln.sock`).
    Unix(PathBuf),
    /// A TCP `host:port` (`tcp://0.0.0.0:1234`).
    Tcp(String),
}

impl FromStr for Addr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Addr> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(Error::BadAddr(s.to_string()));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = s.strip_prefix("tcp://") {
            let hostport = hostport.trim_end_matches('/');
            match hostport.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    return Ok(Addr::Tcp(hostport.to_string()))
                }
                _ => return Err(Error::BadAddr(s.to_string())),
            }
        }
        Err(Error::BadAddr(s.to_string()))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix://{}", p.display()),
            Addr::Tcp(hp) => write!(f, "tcp://{hp}"),
        }
    }
}

impl Addr {
    /// The host part of a TCP address, without brackets (`None` for unix sockets).
    pub fn host(&self) -> Option<&str> {
        match self {
            Addr::Unix(_) => None,
            Addr::Tcp(hp) => hp
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')),
        }
    }
}

/// The files of one side of a mutual-TLS setup, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA bundle that verifies the peer (`--tlscacert`).
    pub ca: Option<PathBuf>,
    /// Own certificate chain (`--tlscert`).
    pub cert: Option<PathBuf>,
    /// Own private key (`--tlskey`).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// True when no file was given.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    fn paths(&self) -> Vec<&Path> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect()
    }
}

/// What identifies a file's content cheaply: a change means "read it again".
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |msg: String| Error::TlsFile {
        path: path.to_path_buf(),
        msg,
    };
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data = std::fs::read(path).map_err(|e| Error::TlsFile {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| Error::TlsFile {
        path: path.to_path_buf(),
        msg: format!("no usable PEM private key: {e}"),
    })
}

fn read_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| Error::TlsFile {
            path: path.to_path_buf(),
            msg: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let (Some(ca), Some(cert), Some(key)) = (&files.ca, &files.cert, &files.key) else {
        return Err(Error::TlsIncomplete("--tlscacert, --tlscert and --tlskey"));
    };
    let roots = Arc::new(read_roots(ca)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| Error::TlsFile {
            path: ca.clone(),
            msg: format!("cannot verify clients with it: {e}"),
        })?;
    let config_err = |source| Error::TlsConfig {
        cert: cert.clone(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert)?, read_key(key)?)
        .map_err(config_err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig> {
    let Some(ca) = &files.ca else {
        return Err(Error::TlsIncomplete(
            "--tlscacert (and --tlscert/--tlskey for mTLS)",
        ));
    };
    let roots = read_roots(ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::TlsConfig {
            cert: ca.clone(),
            source,
        })?
        .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|source| Error::TlsConfig {
                cert: cert.clone(),
                source,
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(Error::TlsIncomplete("--tlscert and --tlskey")),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A TLS configuration built from files and rebuilt when they change.
struct Reloading<C> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<C>,
    state: Mutex<(Stamp, Arc<C>)>,
}

impl<C> Reloading<C> {
    fn load(files: TlsFiles, build: fn(&TlsFiles) -> Result<C>) -> Result<Reloading<C>> {
        let before = stamp(&files.paths());
        let config = build(&files)?;
        Ok(Reloading {
            files,
            build,
            state: Mutex::new((before, Arc::new(config))),
        })
    }

    /// The configuration for a new connection: re-read first if a file changed.
    fn current(&self) -> Arc<C> {
        let now = stamp(&self.files.paths());
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.0 != now {
            match (self.build)(&self.files) {
                Ok(config) => {
                    tracing::info!(files = ?self.files.paths(), "TLS files changed: reloaded");
                    *state = (now, Arc::new(config));
                }
                Err(e) => {
                    // Probably caught mid-rotation; keep serving with the old files and
                    // try again at the next connection.
                    tracing::warn!(error = %e, "TLS files changed but cannot be loaded; keeping the previous ones");
                }
            }
        }
        state.1.clone()
    }
}

/// Server-side mutual TLS from `--tlscacert/--tlscert/--tlskey`, reloaded on change.
pub struct ServerTls(Reloading<rustls::ServerConfig>);

impl ServerTls {
    /// Loads the files; all three are required, and clients must present a certificate
    /// signed by the CA.
    pub fn load(files: TlsFiles) -> Result<Arc<ServerTls>> {
        Ok(Arc::new(ServerTls(Reloading::load(files, server_config)?)))
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.0.current())
    }
}

/// Client-side TLS (the CA that verifies the server, and optionally a client certificate),
/// reloaded on change, with the name expected in the server's certificate.
pub struct ClientTls {
    config: Reloading<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.config.files)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.0.files)
            .finish()
    }
}

impl ClientTls {
    /// Loads the files. `server_name` overrides the host of the address as the name
    /// checked against the server certificate (buildctl's `--tlsservername`).
    pub fn load(files: TlsFiles, server_name: Option<String>) -> Result<Arc<ClientTls>> {
        Ok(Arc::new(ClientTls {
            config: Reloading::load(files, client_config)?,
            server_name,
        }))
    }
}

/// How a server treats its listeners: the TLS to use on TCP, or the explicit opt-out.
#[derive(Clone, Default)]
pub struct ServeTls {
    tls: Option<Arc<ServerTls>>,
    insecure_tcp: bool,
}

impl ServeTls {
    /// From the command-line flags: any TLS file given means all three are needed.
    pub fn from_flags(files: TlsFiles, insecure_tcp: bool) -> Result<ServeTls> {
        let tls = if files.is_empty() {
            None
        } else {
            Some(ServerTls::load(files)?)
        };
        Ok(ServeTls { tls, insecure_tcp })
    }

    /// True when TCP listeners use TLS.
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Checks that `addr` can be served with these settings (TCP needs TLS or the opt-out).
    pub fn check(&self, addr: &Addr) -> Result<()> {
        if matches!(addr, Addr::Tcp(_)) && self.tls.is_none() && !self.insecure_tcp {
            return Err(Error::TlsRequired(addr.to_string()));
        }
        Ok(())
    }

    /// Binds `addr` and returns its stream of accepted (and, on TCP, TLS-authenticated)
    /// connections, ready for tonic's `serve_with_incoming`. Unix sockets get their
    /// directory created and a stale socket file replaced.
    pub async fn listen(&self, addr: &Addr) -> Result<Incoming> {
        self.check(addr)?;
        let io_err = |source| Error::Io {
            addr: addr.to_string(),
            source,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        match addr {
            Addr::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io_err)?;
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(e)),
                }
                let listener = UnixListener::bind(path).map_err(io_err)?;
                tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((s, _)) => {
                                if tx.send(Ok(ServerIo::Unix(s))).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
            Addr::Tcp(hostport) => {
                let listener = TcpListener::bind(hostport.as_str()).await.map_err(io_err)?;
                let tls = self.tls.clone();
                tokio::spawn(accept_tcp(listener, tls, tx));
            }
        }
        Ok(Incoming(rx))
    }
}

async fn accept_tcp(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    tx: tokio::sync::mpsc::Sender<io::Result<ServerIo>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &tls else {
            if tx.send(Ok(ServerIo::Tcp(stream, peer))).await.is_err() {
                return;
            }
            continue;
        };
        // Handshakes run beside the accept loop so one slow client holds up no one.
        let acceptor = tls.acceptor();
        let out = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let _ = out.send(Ok(ServerIo::Tls(Box::new(s), peer))).await;
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
            }
        });
        if tx.is_closed() {
            return;
        }
    }
}

/// Accepted connections of one listener (see [`ServeTls::listen`]).
pub struct Incoming(tokio::sync::mpsc::Receiver<io::Result<ServerIo>>);

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// One accepted connection: a unix socket, plain TCP, or TCP with TLS.
pub enum ServerIo {
    /// A unix socket connection.
    Unix(UnixStream),
    /// Plaintext TCP (`--insecure-tcp`).
    Tcp(TcpStream, SocketAddr),
    /// TCP with an authenticated TLS session.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, SocketAddr),
}

/// What a handler can learn about its connection (`request.extensions()`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer, if any.
    pub peer: Option<SocketAddr>,
    /// Whether the connection is authenticated with TLS.
    pub tls: bool,
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ServerIo::Unix(_) => ConnInfo {
                peer: None,
                tls: false,
            },
            ServerIo::Tcp(_, peer) => ConnInfo {
                peer: Some(*peer),
                tls: false,
            },
            ServerIo::Tls(_, peer) => ConnInfo {
                peer: Some(*peer),
                tls: true,
            },
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerIo::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            ServerIo::Tcp($s, _) => {
                let $s = Pin::new($s);
                $e
            }
            ServerIo::Tls($s, _) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_io!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Unix(s) => s.is_write_vectored(),
            ServerIo::Tcp(s, _) => s.is_write_vectored(),
            ServerIo::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// A gRPC channel to `addr` that connects on first use and reconnects as needed. TCP
/// uses `tls` when given (TLS files are re-read when they change) and plaintext otherwise.
pub fn channel(addr: &Addr, tls: Option<Arc<ClientTls>>) -> Result<Channel> {
    let (endpoint, connector) = endpoint(addr, tls)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Like [`channel`], but connects now, so an unreachable address is an error here.
pub async fn connect(addr: &Addr, tls: Option<Arc<ClientTls>>) -> Result<Channel> {
    let (endpoint, connector) = endpoint(addr, tls)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })
}

/// A connection made by [`channel`]: boxed so unix, TCP and TLS share one type.
pub type ClientIo = hyper_util::rt::TokioIo<Pin<Box<dyn IoStream>>>;

/// Everything a client connection needs from its stream.
pub trait IoStream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> IoStream for T {}

/// What a [`connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>>;

fn endpoint(
    addr: &Addr,
    tls: Option<Arc<ClientTls>>,
) -> Result<(
    Endpoint,
    impl tower::Service<Uri, Response = ClientIo, Error = io::Error, Future = ConnectFuture>
        + Clone
        + Send
        + 'static,
)> {
    // The URI only names the :authority; the connector decides where bytes go.
    let authority = match addr {
        Addr::Unix(_) => "localhost".to_string(),
        Addr::Tcp(hp) => hp.clone(),
    };
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok((endpoint, connector(addr, tls)))
}

/// The connector [`channel`] uses, for callers that set up their own `Endpoint`
/// (timeouts, keep-alive): it dials `addr` whatever URI the endpoint names, with TLS when
/// `tls` is given.
pub fn connector(
    addr: &Addr,
    tls: Option<Arc<ClientTls>>,
) -> impl tower::Service<Uri, Response = ClientIo, Error = io::Error, Future = ConnectFuture>
       + Clone
       + Send
       + 'static {
    let addr = addr.clone();
    tower::service_fn(move |_: Uri| -> ConnectFuture {
        let addr = addr.clone();
        let tls = tls.clone();
        Box::pin(async move { dial(&addr, tls.as_deref()).await })
    })
}

async fn dial(addr: &Addr, tls: Option<&ClientTls>) -> io::Result<ClientIo> {
    let io: Pin<Box<dyn IoStream>> = match addr {
        Addr::Unix(path) => Box::pin(UnixStream::connect(path).await?),
        Addr::Tcp(hp) => {
            let tcp = TcpStream::connect(hp.as_str()).await?;
            tcp.set_nodelay(true)?;
            match tls {
                None => Box::pin(tcp),
                Some(tls) => {
                    let host = tls
                        .server_name
                        .clone()
                        .or_else(|| addr.host().map(str::to_string))
                        .unwrap_or_default();
                    let name = ServerName::try_from(host.clone()).map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("TLS server name {host:?}: {e}"),
                        )
                    })?;
                    let connector = TlsConnector::from(tls.config.current());
                    Box::pin(
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                            .await
                            .map_err(|_| {
                                io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                            })??,
                    )
                }
            }
        }
    };
    Ok(hyper_util::rt::TokioIo::new(io))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a: Addr = "unix:///run/kiln/kiln.sock".parse().unwrap();
        assert_eq!(a, Addr::Unix("/run/kiln/kiln.sock".into()));
        assert_eq!(a.to_string(), "unix:///run/kiln/kiln.sock");
        let t: Addr = "tcp://127.0.0.1:1234".parse().unwrap();
        assert_eq!(t.host(), Some("127.0.0.1"));
        let v6: Addr = "tcp://[::1]:1234".parse().unwrap();
        assert_eq!(v6.host(), Some("::1"));
        for bad in [
            "",
            "unix://",
            "tcp://host",
            "tcp://:12",
            "tcp://h:x",
            "http://h:1",
            "/a",
        ] {
            let err = bad.parse::<Addr>().unwrap_err().to_string();
            assert!(
                err.contains("expected unix:///path or tcp://host:port"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn tcp_without_tls_needs_the_opt_out() {
        let tcp: Addr = "tcp://127.0.0.1:1".parse().unwrap();
        let err = ServeTls::default().check(&tcp).unwrap_err().to_string();
        assert!(err.contains("requires mutual TLS"), "{err}");
        assert!(ServeTls::from_flags(TlsFiles::default(), true)
            .unwrap()
            .check(&tcp)
            .is_ok());
        let unix: Addr = "unix:///tmp/x.sock".parse().unwrap();
        assert!(ServeTls::default().check(&unix).is_ok());
    }

    #[test]
    fn partial_or_bad_tls_files_are_named() {
        let only_cert = TlsFiles {
            cert: Some("/nonexistent/cert.pem".into()),
            ..Default::default()
        };
        let err = ServeTls::from_flags(only_cert, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tlscacert, --tlscert and --tlskey"), "{err}");
        let missing = TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
        };
        let err = ServeTls::from_flags(missing, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
