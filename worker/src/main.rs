//! `kiln-worker`: the worker daemon. Serves BuildKit's `moby.buildkit.v1.Control` API and
//! the gRPC health service over the embedded engine, on unix sockets (default
//! `/run/kiln/kiln.sock`) and TCP with mutual TLS, plus plain-HTTP metrics and probes.
//!
//! Settings come from flags, then the `--config` TOML file, then defaults.
//!
//! Partial (see `control::service`): raw LLB, and `dockerfile.v0` with the context fetched
//! over the client's session, on the classic and the LLBBridge path, exported to images; no
//! outputs back to the client yet.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use kiln_proto::transport::{Addr, ServeTls, TlsFiles};
use kiln_worker::control::service::{ControlService, HealthService};
use kiln_worker::control::{Engine, EngineConfig};
use kiln_worker::executor::Runtime;
use kiln_worker::metrics::Metrics;
use kiln_worker::source::image::RegistryConfig;
use serde::Deserialize;

const DEFAULT_ADDR: &str = "unix:///run/kiln/kiln.sock";
const DEFAULT_ROOT: &str = "/var/lib/kiln";

/// The Kiln worker daemon.
#[derive(Debug, Parser)]
#[command(name = "kiln-worker", version, about)]
struct Args {
    /// TOML file with defaults for every setting below (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address: unix:///path or tcp://host:port (repeatable; default unix:///run/kiln/kiln.sock).
    #[arg(long = "addr")]
    addrs: Vec<String>,
    /// State directory (default /var/lib/kiln).
    #[arg(long)]
    root: Option<PathBuf>,
    /// OCI runtime: runc or crun (default runc).
    #[arg(long = "oci-runtime", alias = "runtime")]
    runtime: Option<String>,
    /// Most build steps running at once.
    #[arg(long)]
    max_parallelism: Option<usize>,
    /// Registry hosts reached over plain HTTP (localhost always is; repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Pool cache repository (`host/path`, no tag): every executed step is exported there in
    /// the background and looked up there on a local miss.
    #[arg(long = "cache-registry", value_name = "REF")]
    cache_registry: Option<String>,
    /// Most bytes one pulled image layer may unpack to (default 10 GiB).
    #[arg(long, value_name = "BYTES")]
    max_layer_size: Option<u64>,
    /// Serve TCP without TLS. Only for trusted networks: anyone who reaches the port can build.
    #[arg(long)]
    insecure_tcp: bool,
    /// CA certificate that client certificates must chain to (mTLS on TCP).
    #[arg(long)]
    tlscacert: Option<PathBuf>,
    /// Server certificate; re-read when the file changes.
    #[arg(long)]
    tlscert: Option<PathBuf>,
    /// Server key; re-read when the file changes.
    #[arg(long)]
    tlskey: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz over plain HTTP on HOST:PORT.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// This worker's name in ListWorkers (default: the host name, which is the pod name).
    #[arg(long)]
    worker_id: Option<String>,
    /// Run without root (not implemented yet: refused with an error).
    #[arg(long)]
    rootless: bool,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "KILN_LOG", default_value = "info")]
    log: String,
}

/// The `--config` file. Keys are the flags' names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    #[serde(default)]
    addr: Vec<String>,
    root: Option<PathBuf>,
    oci_runtime: Option<String>,
    max_parallelism: Option<usize>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    #[serde(default)]
    insecure_tcp: bool,
    metrics_addr: Option<SocketAddr>,
    worker_id: Option<String>,
    cache_registry: Option<String>,
    max_layer_size: Option<u64>,
    #[serde(default)]
    tls: TlsSection,
    gc: Option<GcSection>,
}

/// The garbage-collection policy the controller renders (`[gc]`, `[[gc.rules]]`). Read and
/// checked; not enforced yet (see `main`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
struct GcSection {
    enabled: Option<bool>,
    reserved_space: Option<String>,
    max_used_space: Option<String>,
    min_free_space: Option<String>,
    keep_duration: Option<String>,
    #[serde(default)]
    rules: Vec<GcRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
struct GcRule {
    all: Option<bool>,
    #[serde(default)]
    filters: Vec<String>,
    reserved_space: Option<String>,
    max_used_space: Option<String>,
    min_free_space: Option<String>,
    keep_duration: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    let file = match &args.config {
        Some(p) => read_config(p)?,
        None => ConfigFile::default(),
    };
    if args.rootless {
        bail!("--rootless: rootless workers are not implemented yet; run the worker as root (privileged pod)");
    }
    if file.gc.as_ref().is_some_and(|g| g.enabled != Some(false)) {
        tracing::warn!("the [gc] policy in --config is read but not enforced yet: the store grows until pruned");
    }

    let addrs: Vec<Addr> = {
        let given = if !args.addrs.is_empty() {
            args.addrs.clone()
        } else if !file.addr.is_empty() {
            file.addr.clone()
        } else {
            vec![DEFAULT_ADDR.to_string()]
        };
        given
            .iter()
            .map(|a| a.parse().with_context(|| format!("--addr {a}")))
            .collect::<anyhow::Result<_>>()?
    };
    let tls = TlsFiles {
        ca: args.tlscacert.clone().or(file.tls.ca),
        cert: args.tlscert.clone().or(file.tls.cert),
        key: args.tlskey.clone().or(file.tls.key),
    };
    let serve_tls = ServeTls::from_flags(tls, args.insecure_tcp || file.insecure_tcp)?;
    for a in &addrs {
        serve_tls.check(a)?;
    }
    let root = args
        .root
        .clone()
        .or(file.root)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let runtime_name = args
        .runtime
        .clone()
        .or(file.oci_runtime)
        .unwrap_or_else(|| "runc".into());
    let runtime = Runtime::parse(&runtime_name).context("--oci-runtime")?;
    let mut insecure = args.insecure_registries.clone();
    insecure.extend(file.insecure_registries);
    let mut config = EngineConfig {
        root: root.clone(),
        runtime,
        registry: RegistryConfig {
            insecure,
            docker_config: None,
        },
        cache_registry: args.cache_registry.clone().or(file.cache_registry),
        ..Default::default()
    };
    if let Some(n) = args.max_layer_size.or(file.max_layer_size) {
        config.max_layer_size = n;
    }
    if let Some(n) = args.max_parallelism.or(file.max_parallelism) {
        if n == 0 {
            bail!("--max-parallelism must be at least 1");
        }
        config.max_parallelism = n;
    }

    let metrics = Metrics::new().context("setting up metrics")?;
    let mut tasks = Vec::new();
    if let Some(addr) = args.metrics_addr.or(file.metrics_addr) {
        let m = metrics.clone();
        let listener_check =
            std::net::TcpListener::bind(addr).with_context(|| format!("--metrics-addr {addr}"))?;
        drop(listener_check);
        tasks.push(tokio::spawn(async move {
            m.serve(addr)
                .await
                .with_context(|| format!("metrics on {addr}"))
        }));
    }

    let engine = Arc::new(
        tokio::task::spawn_blocking(move || Engine::open(config))
            .await?
            .with_context(|| format!("opening {}", root.display()))?,
    );
    let id = args
        .worker_id
        .clone()
        .or(file.worker_id)
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "kiln-worker".to_string());
    let control = ControlService::new(engine, id).with_metrics(metrics.clone());
    for addr in &addrs {
        let incoming = serve_tls.listen(addr).await?;
        let router = tonic::transport::Server::builder()
            .add_service(control.clone().into_server())
            .add_service(control.clone().into_bridge_server())
            .add_service(
                kiln_proto::grpc::health::v1::health_server::HealthServer::new(HealthService),
            );
        if matches!(addr, Addr::Tcp(_)) && !serve_tls.has_tls() {
            tracing::warn!(%addr, "serving plaintext TCP (--insecure-tcp)");
        } else {
            tracing::info!(%addr, "serving");
        }
        tasks.push(tokio::spawn(async move {
            router
                .serve_with_incoming(incoming)
                .await
                .context("gRPC server stopped")
        }));
    }
    metrics.set_ready(true);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: shutting down");
            Ok(())
        }
        _ = term.recv() => {
            tracing::info!("terminated: shutting down");
            Ok(())
        }
        res = futures::future::select_all(tasks) => {
            let (r, _, _) = res;
            r?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `kiln-controller` renders into the worker's ConfigMap.
    #[test]
    fn config_file_accepts_what_the_controller_renders() {
        let text = "max-parallelism = 4\n\n[gc]\nenabled = true\nreserved-space = \"10737418240\"\nmax-used-space = \"80%\"\nkeep-duration = \"172800s\"\n\n[[gc.rules]]\nall = false\nfilters = [\"type==source.local\"]\nkeep-duration = \"172800s\"\nmax-used-space = \"536870912\"\n";
        let c: ConfigFile = toml::from_str(text).unwrap();
        let gc = c.gc.unwrap();
        assert_eq!(gc.max_used_space.as_deref(), Some("80%"));
        assert_eq!(gc.rules[0].filters, ["type==source.local"]);
        let err = toml::from_str::<ConfigFile>("[gc]\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
