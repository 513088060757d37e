//! `kiln-worker`: the worker daemon. Serves BuildKit's `moby.buildkit.v1.Control` API and
//! the gRPC health service over the embedded engine on a unix socket (default
//! `/run/kiln/kiln.sock`) or TCP.
//!
//! Partial (see `control::service`): raw LLB, and `dockerfile.v0` with the context fetched
//! over the client's session, exported to images; no LLBBridge, no outputs back to the
//! client yet; TCP needs `--insecure-tcp` until mTLS is implemented.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use kiln_worker::control::service::{ControlService, HealthService};
use kiln_worker::control::{Engine, EngineConfig};
use kiln_worker::executor::Runtime;
use kiln_worker::source::image::RegistryConfig;

/// The Kiln worker daemon.
#[derive(Debug, Parser)]
#[command(name = "kiln-worker", version, about)]
struct Args {
    /// Listen address: unix:///path or tcp://host:port (repeatable).
    #[arg(long = "addr", default_value = "unix:///run/kiln/kiln.sock")]
    addrs: Vec<String>,
    /// State directory.
    #[arg(long, default_value = "/var/lib/kiln")]
    root: PathBuf,
    /// OCI runtime: runc or crun.
    #[arg(long, default_value = "runc")]
    runtime: String,
    /// Most build steps running at once.
    #[arg(long)]
    max_parallelism: Option<usize>,
    /// Registry hosts reached over plain HTTP (localhost always is).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Pool cache repository (`host/path`, no tag): every executed step is exported there in
    /// the background and looked up there on a local miss.
    #[arg(long = "cache-registry", value_name = "REF")]
    cache_registry: Option<String>,
    /// Serve TCP without TLS (mTLS is not implemented yet, so TCP requires this).
    #[arg(long)]
    insecure_tcp: bool,
    /// CA certificate for client verification (mTLS; not implemented yet).
    #[arg(long)]
    tlscacert: Option<PathBuf>,
    /// Server certificate (mTLS; not implemented yet).
    #[arg(long)]
    tlscert: Option<PathBuf>,
    /// Server key (mTLS; not implemented yet).
    #[arg(long)]
    tlskey: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "KILN_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    if args.tlscacert.is_some() || args.tlscert.is_some() || args.tlskey.is_some() {
        bail!("--tlscacert/--tlscert/--tlskey: TLS is not implemented yet");
    }
    let runtime = Runtime::parse(&args.runtime).context("--runtime")?;
    let mut config = EngineConfig {
        root: args.root.clone(),
        runtime,
        registry: RegistryConfig {
            insecure: args.insecure_registries.clone(),
            docker_config: None,
        },
        cache_registry: args.cache_registry.clone(),
        ..Default::default()
    };
    if let Some(n) = args.max_parallelism {
        config.max_parallelism = n;
    }
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || Engine::open(config))
            .await?
            .with_context(|| format!("opening {}", args.root.display()))?,
    );
    let id = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "kiln-worker".to_string());
    let control = ControlService::new(engine, id);
    let mut servers = Vec::new();
    for addr in &args.addrs {
        let router = tonic::transport::Server::builder()
            .add_service(control.clone().into_server())
            .add_service(
                kiln_proto::grpc::health::v1::health_server::HealthServer::new(HealthService),
            );
        if let Some(path) = addr.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("listening on {addr}"))?;
            tracing::info!(%addr, "serving");
            servers.push(tokio::spawn(router.serve_with_incoming(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
            )));
        } else if let Some(hostport) = addr.strip_prefix("tcp://") {
            if !args.insecure_tcp {
                bail!("{addr}: TCP requires mTLS, which is not implemented yet; pass --insecure-tcp to serve plaintext on a trusted network");
            }
            let sock: std::net::SocketAddr = hostport
                .parse()
                .with_context(|| format!("{addr}: expected tcp://IP:PORT"))?;
            tracing::warn!(%addr, "serving plaintext TCP (--insecure-tcp)");
            servers.push(tokio::spawn(router.serve(sock)));
        } else {
            bail!("--addr {addr}: expected unix:///path or tcp://host:port");
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            Ok(())
        }
        res = futures::future::select_all(servers) => {
            let (r, _, _) = res;
            r?.context("server stopped")
        }
    }
}
