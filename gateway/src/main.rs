//! `kiln-gateway`: one BuildKit endpoint that consistent-hashes builds over the workers.
//!
//! Partial: mTLS (to clients and to workers) is not wired yet, so TCP needs
//! `--insecure-tcp`; EndpointSlice discovery and OTLP traces are not implemented yet; the admin
//! endpoint has no authentication, so it listens on loopback only.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kiln_gateway::{discovery, metrics::Metrics, Config, Gateway};

/// The Kiln gateway.
#[derive(Debug, Parser)]
#[command(name = "kiln-gateway", version, about)]
struct Args {
    /// Listen address: tcp://HOST:PORT.
    #[arg(long, default_value = "tcp://0.0.0.0:1234")]
    addr: String,
    /// Workers: comma-separated [NAME=]tcp://HOST:PORT (NAME is what the ring hashes).
    #[arg(long, conflicts_with_all = ["workers_dns", "workers_endpointslice"])]
    workers: Option<String>,
    /// Workers: every address of a DNS name (a headless Service), NAME:PORT.
    #[arg(long, conflicts_with = "workers_endpointslice")]
    workers_dns: Option<String>,
    /// How often --workers-dns is re-resolved, in seconds.
    #[arg(long, default_value_t = 10)]
    dns_interval: u64,
    /// Workers from the EndpointSlices of NAMESPACE/SERVICE (not implemented yet).
    #[arg(long)]
    workers_endpointslice: Option<String>,
    /// Load bound c: no worker takes more than ceil(c × mean) in-flight builds.
    #[arg(long, default_value_t = kiln_gateway::ring::DEFAULT_LOAD_BOUND)]
    load_bound: f64,
    /// Health-check interval, in seconds.
    #[arg(long, default_value_t = 2)]
    health_interval: u64,
    /// Prometheus metrics (and /healthz, /readyz) on HOST:PORT, plain HTTP.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Admin endpoint (drain/undrain workers, list the pool) on a loopback HOST:PORT,
    /// plain HTTP; off by default.
    #[arg(long)]
    admin_addr: Option<String>,
    /// Serve TCP without TLS (mTLS is not wired yet, so this is required for now).
    #[arg(long)]
    insecure_tcp: bool,
    /// CA certificate for client verification (mTLS; not wired yet).
    #[arg(long)]
    tlscacert: Option<std::path::PathBuf>,
    /// Server certificate (mTLS; not wired yet).
    #[arg(long)]
    tlscert: Option<std::path::PathBuf>,
    /// Server key (mTLS; not wired yet).
    #[arg(long)]
    tlskey: Option<std::path::PathBuf>,
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
    if !args.insecure_tcp {
        bail!("mTLS not wired yet: the gateway cannot serve TLS (--tlscacert/--tlscert/--tlskey) yet; pass --insecure-tcp to serve plaintext on a trusted network");
    }
    if !(args.load_bound.is_finite() && args.load_bound >= 1.0) {
        bail!("--load-bound {}: must be a number >= 1.0", args.load_bound);
    }
    if let Some(es) = &args.workers_endpointslice {
        bail!("--workers-endpointslice {es}: EndpointSlice discovery is not implemented yet; use --workers or --workers-dns");
    }
    let hostport = args
        .addr
        .strip_prefix("tcp://")
        .with_context(|| format!("--addr {}: expected tcp://HOST:PORT", args.addr))?;
    let sock: std::net::SocketAddr = hostport
        .parse()
        .with_context(|| format!("--addr {}: expected tcp://IP:PORT", args.addr))?;

    let metrics = Metrics::new().context("registering metrics")?;
    let config = Config {
        load_bound: args.load_bound,
        ..Config::default()
    };
    let gateway = Gateway::new(config, metrics.clone());
    match (&args.workers, &args.workers_dns) {
        (Some(list), _) => {
            let members = discovery::parse_static(list).context("--workers")?;
            gateway.pool().set_members(&members)?;
        }
        (None, Some(name)) => {
            let members = discovery::resolve(name).await.context("--workers-dns")?;
            gateway.pool().set_members(&members)?;
            tokio::spawn(discovery::run_dns(
                gateway.pool().clone(),
                name.clone(),
                Duration::from_secs(args.dns_interval.max(1)),
            ));
        }
        (None, None) => bail!("no workers: pass --workers or --workers-dns"),
    }
    gateway.spawn_background(Duration::from_secs(args.health_interval.max(1)));

    if let Some(maddr) = &args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(maddr)
            .await
            .with_context(|| format!("--metrics-addr {maddr}: cannot listen"))?;
        tracing::info!(addr = %maddr, "serving metrics");
        let pool = gateway.pool().clone();
        tokio::spawn(metrics.serve(listener, move || !pool.available().is_empty()));
    }

    if let Some(aaddr) = &args.admin_addr {
        let a: std::net::SocketAddr = aaddr
            .parse()
            .with_context(|| format!("--admin-addr {aaddr}: expected IP:PORT"))?;
        if !a.ip().is_loopback() {
            bail!("--admin-addr {aaddr}: the admin endpoint has no authentication yet, so it only listens on loopback");
        }
        let listener = tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("--admin-addr {aaddr}: cannot listen"))?;
        tokio::spawn(kiln_gateway::admin::serve(gateway.pool().clone(), listener));
    }

    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .with_context(|| format!("--addr {}: cannot listen", args.addr))?;
    tracing::warn!(addr = %args.addr, "serving plaintext TCP (--insecure-tcp)");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            Ok(())
        }
        res = gateway.serve(listener) => res.context("gateway server stopped"),
    }
}
