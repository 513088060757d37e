//! `kiln-gateway`: one BuildKit endpoint that consistent-hashes builds over the workers.
//!
//! Clients reach it over mutual TLS (`--tlscacert/--tlscert/--tlskey`, re-read when the
//! files change) unless `--insecure-tcp` is passed; it reaches workers over mutual TLS with
//! `--worker-tlscert/--worker-tlskey` (CA: `--worker-tlscacert`, default `--tlscacert`).
//!
//! Workers come from `--workers`, `--workers-dns` or `--workers-endpointslice` (a watch on
//! the Kubernetes API with the in-cluster or `KUBECONFIG` credentials; the gateway's
//! service account needs `list` and `watch` on `discovery.k8s.io` `endpointslices`).
//!
//! Traces: every proxied RPC has a span (route key kind, key, worker) exported over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; the
//! W3C `traceparent` goes to the worker with the call, so the worker's spans join the trace.
//!
//! The admin endpoint (`--admin-addr`) is plain HTTP on loopback; on any other address it
//! needs the TLS flags and requires a client certificate from the clients' CA.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kiln_gateway::{discovery, metrics::Metrics, Config, Gateway};
use kiln_proto::transport::{Addr, ClientTls, ServeTls, TlsFiles};

/// The Kiln gateway.
#[derive(Debug, Parser)]
#[command(name = "kiln-gateway", version, about)]
struct Args {
    /// Listen address: tcp://HOST:PORT or unix:///PATH.
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
    /// Workers from the EndpointSlices of NAMESPACE/SERVICE (the workers' headless Service;
    /// its port named `grpc`, or its only port), watched through the Kubernetes API.
    #[arg(long)]
    workers_endpointslice: Option<String>,
    /// Load bound c: no worker takes more than ceil(c × mean) in-flight builds.
    #[arg(long, default_value_t = kiln_gateway::ring::DEFAULT_LOAD_BOUND)]
    load_bound: f64,
    /// Concurrent builds per worker; builds beyond it wait in a FIFO queue at the gateway
    /// (`kiln_gateway_queue_depth`) until a slot frees. 0 = unlimited.
    #[arg(long, default_value_t = kiln_gateway::DEFAULT_MAX_BUILDS_PER_WORKER)]
    max_builds_per_worker: usize,
    /// How long a build may wait in a worker's queue before it fails with
    /// resource_exhausted, in seconds.
    #[arg(long, default_value_t = kiln_gateway::proxy::DEFAULT_QUEUE_TIMEOUT.as_secs())]
    queue_timeout: u64,
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
    /// Serve TCP without TLS. Only for trusted networks: anyone who reaches the port can build.
    #[arg(long)]
    insecure_tcp: bool,
    /// CA certificate that client certificates must chain to.
    #[arg(long)]
    tlscacert: Option<PathBuf>,
    /// Server certificate; re-read when the file changes.
    #[arg(long)]
    tlscert: Option<PathBuf>,
    /// Server key; re-read when the file changes.
    #[arg(long)]
    tlskey: Option<PathBuf>,
    /// CA that verifies the workers' certificates (default: --tlscacert).
    #[arg(long)]
    worker_tlscacert: Option<PathBuf>,
    /// The gateway's client certificate towards the workers.
    #[arg(long)]
    worker_tlscert: Option<PathBuf>,
    /// The gateway's client key towards the workers.
    #[arg(long)]
    worker_tlskey: Option<PathBuf>,
    /// Name expected in the workers' certificates (default: the --workers-dns name, or
    /// SERVICE.NAMESPACE.svc for --workers-endpointslice, else each worker's host).
    #[arg(long)]
    worker_tlsservername: Option<String>,
    /// Reach workers over plaintext TCP even though TLS files are given for clients.
    #[arg(long)]
    insecure_workers: bool,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "KILN_LOG", default_value = "info")]
    log: String,
    /// Threads that run the proxy. 1 (the default) runs everything on one thread: no
    /// hand-offs between threads, about a quarter less CPU per build, and the node's
    /// other cores stay with the workers (scale out with gateway replicas). More threads
    /// spread many builds' bytes and TLS over more cores; 0 = one per core.
    #[arg(long, env = "KILN_GATEWAY_THREADS", default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // One process-wide rustls provider (ring) for the Kubernetes client; the transport
    // module passes its own explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let endpointslice: Option<discovery::endpointslice::Target> = args
        .workers_endpointslice
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--workers-endpointslice")?;
    // Logs, and OTLP traces when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set; flushed on exit.
    let _telemetry = kiln_proto::telemetry::init("kiln-gateway", &args.log)?;
    let listen: Addr = args
        .addr
        .parse()
        .with_context(|| format!("--addr {}", args.addr))?;
    let serve_tls = ServeTls::from_flags(
        TlsFiles {
            ca: args.tlscacert.clone(),
            cert: args.tlscert.clone(),
            key: args.tlskey.clone(),
        },
        args.insecure_tcp,
    )?;
    serve_tls.check(&listen)?;
    let worker_files = TlsFiles {
        ca: args.worker_tlscacert.clone().or(args.tlscacert.clone()),
        cert: args.worker_tlscert.clone(),
        key: args.worker_tlskey.clone(),
    };
    let worker_tls = if args.insecure_workers || worker_files.ca.is_none() {
        if worker_files.cert.is_some() {
            bail!("--worker-tlscert needs a CA for the workers: --worker-tlscacert or --tlscacert");
        }
        None
    } else {
        let name = args
            .worker_tlsservername
            .clone()
            .or_else(|| {
                args.workers_dns
                    .as_ref()
                    .and_then(|d| d.rsplit_once(':').map(|(h, _)| h.to_string()))
            })
            .or_else(|| {
                endpointslice
                    .as_ref()
                    .map(|t| format!("{}.{}.svc", t.service, t.namespace))
            });
        Some(ClientTls::load(worker_files, name).context("worker TLS")?)
    };
    if !(args.load_bound.is_finite() && args.load_bound >= 1.0) {
        bail!("--load-bound {}: must be a number >= 1.0", args.load_bound);
    }

    let metrics = Metrics::new().context("registering metrics")?;
    if args.queue_timeout == 0 {
        bail!("--queue-timeout 0: must be at least 1 second");
    }
    let defaults = Config::default();
    let config = Config {
        load_bound: args.load_bound,
        worker_tls,
        max_builds_per_worker: args.max_builds_per_worker,
        timeouts: kiln_gateway::proxy::Timeouts {
            queue: Duration::from_secs(args.queue_timeout),
            ..defaults.timeouts.clone()
        },
        ..defaults
    };
    let gateway = Gateway::new(config, metrics.clone());
    match (&args.workers, &args.workers_dns, endpointslice) {
        (Some(list), _, _) => {
            let members = discovery::parse_static(list).context("--workers")?;
            gateway.pool().set_members(&members)?;
        }
        (None, Some(name), _) => {
            let members = discovery::resolve(name).await.context("--workers-dns")?;
            gateway.pool().set_members(&members)?;
            tokio::spawn(discovery::run_dns(
                gateway.pool().clone(),
                name.clone(),
                Duration::from_secs(args.dns_interval.max(1)),
            ));
        }
        (None, None, Some(target)) => {
            let client = kube::Client::try_default()
                .await
                .context("--workers-endpointslice: no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
            tracing::info!(%target, "watching worker endpoint slices");
            tokio::spawn(discovery::endpointslice::run(
                gateway.pool().clone(),
                client,
                target.clone(),
            ));
            if !discovery::endpointslice::wait_for_members(gateway.pool()).await {
                tracing::warn!(%target, "no worker from the endpoint slices yet; serving anyway");
            }
        }
        (None, None, None) => {
            bail!("no workers: pass --workers, --workers-dns or --workers-endpointslice")
        }
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
        if a.ip().is_loopback() {
            let listener = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("--admin-addr {aaddr}: cannot listen"))?;
            tokio::spawn(kiln_gateway::admin::serve(gateway.pool().clone(), listener));
        } else {
            if !serve_tls.has_tls() {
                bail!("--admin-addr {aaddr}: off loopback the admin endpoint needs mutual TLS (--tlscacert, --tlscert, --tlskey); it never serves plaintext there");
            }
            let incoming = serve_tls
                .listen(&Addr::Tcp(a.to_string()))
                .await
                .with_context(|| format!("--admin-addr {aaddr}: cannot listen"))?;
            tracing::info!(addr = %a, "serving the admin endpoint over mutual TLS");
            tokio::spawn(kiln_gateway::admin::serve_tls(
                gateway.pool().clone(),
                incoming,
            ));
        }
    }

    let incoming = serve_tls.listen(&listen).await?;
    if matches!(listen, Addr::Tcp(_)) && !serve_tls.has_tls() {
        tracing::warn!(addr = %listen, "serving plaintext TCP (--insecure-tcp)");
    } else {
        tracing::info!(addr = %listen, "serving");
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            Ok(())
        }
        res = gateway.serve_incoming(incoming) => res.context("gateway server stopped"),
    }
}
