//! `kiln-worker`: the worker daemon. Serves BuildKit's `moby.buildkit.v1.Control` API and
//! the gRPC health service over the embedded engine, on unix sockets (default
//! `/run/kiln/kiln.sock`) and TCP with mutual TLS, plus plain-HTTP metrics and probes.
//!
//! Settings come from flags, then the `--config` TOML file, then defaults. The file's `[gc]`
//! table (the cache GC policy, see `kiln_worker::cache::gc`) is re-read while the worker runs
//! and applied without a restart.
//!
//! Partial (see `control::service`): raw LLB, and `dockerfile.v0` with the context fetched
//! over the client's session, on the classic and the LLBBridge path, exported to images; no
//! outputs back to the client yet.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kiln_proto::gc::{GcSection, Policy};
use kiln_proto::transport::{Addr, ServeTls, TlsFiles};
use kiln_worker::cache::gc::Gc;
use kiln_worker::control::service::{ControlService, HealthService};
use kiln_worker::control::{Engine, EngineConfig};
use kiln_worker::executor::Runtime;
use kiln_worker::metrics::{EngineStats, Metrics};
use kiln_worker::source::image::RegistryConfig;
use serde::Deserialize;

const DEFAULT_ADDR: &str = "unix:///run/kiln/kiln.sock";
const DEFAULT_ROOT: &str = "/var/lib/kiln";
/// How often the `--config` file is read again for a changed `[gc]` policy.
const DEFAULT_CONFIG_POLL: Duration = Duration::from_secs(5);

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
    /// How often the --config file is re-read; a changed [gc] policy applies without a
    /// restart (default 5s).
    #[arg(long, value_name = "DURATION")]
    config_poll_interval: Option<String>,
    /// On SIGTERM or SIGINT, how long to go on serving running builds and draining the pool
    /// cache's export queue before exiting (default 270s, inside the 300 s grace period the
    /// controller gives worker pods; 0 exits at once). A second signal exits at once.
    #[arg(long, value_name = "DURATION")]
    shutdown_timeout: Option<String>,
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
    config_poll_interval: Option<String>,
    shutdown_timeout: Option<String>,
    /// The garbage-collection policy the controller renders (`[gc]`, `[[gc.rules]]`),
    /// applied again whenever the file changes.
    gc: Option<GcSection>,
}

impl ConfigFile {
    /// The GC policy of this file (the worker's default without a `[gc]` table).
    fn gc_policy(&self) -> anyhow::Result<Policy> {
        match &self.gc {
            Some(g) => Ok(g.parse()?),
            None => Ok(Policy::default()),
        }
    }
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

/// Reads the config file every `every` (a Kubernetes ConfigMap mount changes by swapping a
/// `..data` symlink, so the resolved content is compared) and applies a changed `[gc]`
/// policy; an invalid file is logged and the policy in force kept.
async fn watch_config(path: PathBuf, every: Duration, gc: Arc<Gc>) {
    let mut last = std::fs::read_to_string(&path).ok();
    loop {
        tokio::time::sleep(every).await;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot re-read the config file; keeping the current gc policy");
                continue;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        last = Some(text.clone());
        let policy = toml::from_str::<ConfigFile>(&text)
            .map_err(anyhow::Error::from)
            .and_then(|f| f.gc_policy());
        let policy = match policy {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), path = %path.display(), "the changed config file is invalid; keeping the current gc policy");
                continue;
            }
        };
        if policy == gc.policy() {
            tracing::info!(path = %path.display(), "config file changed; gc policy unchanged (other settings apply at the next restart)");
            continue;
        }
        match gc.set_policy(policy) {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(path = %path.display(), "applied the changed gc policy");
            }
            Err(error) => {
                tracing::error!(%error, path = %path.display(), "the changed gc policy cannot be applied; keeping the current one");
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = kiln_proto::telemetry::init("kiln-worker", &args.log)?;
    let file = match &args.config {
        Some(p) => read_config(p)?,
        None => ConfigFile::default(),
    };
    if args.rootless {
        bail!("--rootless: rootless workers are not implemented yet; run the worker as root (privileged pod)");
    }
    let gc_policy = file.gc_policy().with_context(|| {
        format!(
            "--config {}",
            args.config.as_deref().unwrap_or(Path::new("")).display()
        )
    })?;
    let poll = match args
        .config_poll_interval
        .as_deref()
        .or(file.config_poll_interval.as_deref())
    {
        Some(s) => {
            let d = kiln_proto::gc::parse_duration(s, "--config-poll-interval")?;
            if d.is_zero() {
                bail!("--config-poll-interval must be more than zero");
            }
            d
        }
        None => DEFAULT_CONFIG_POLL,
    };
    let shutdown_timeout = match args
        .shutdown_timeout
        .as_deref()
        .or(file.shutdown_timeout.as_deref())
    {
        Some(s) => kiln_proto::gc::parse_duration(s, "--shutdown-timeout")?,
        None => DEFAULT_SHUTDOWN_TIMEOUT,
    };

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
        gc: gc_policy,
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
    engine.gc().spawn();
    {
        let engine = engine.clone();
        metrics
            .watch_engine(move || {
                let gc = engine.gc().stats();
                EngineStats {
                    gc_runs: gc.runs,
                    gc_freed_bytes: gc.freed_bytes,
                    cache_bytes: gc.cache_bytes,
                    export_queue_depth: engine
                        .pool()
                        .map(|p| p.stats().queue_depth as u64)
                        .unwrap_or(0),
                }
            })
            .context("registering cache metrics")?;
    }
    if let Some(path) = args.config.clone() {
        tokio::spawn(watch_config(path, poll, engine.gc().clone()));
    }
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let control = ControlService::new(engine.clone(), id)
        .with_metrics(metrics.clone())
        .with_draining(draining.clone());
    let stopping = tokio_util::sync::CancellationToken::new();
    for addr in &addrs {
        let incoming = serve_tls.listen(addr).await?;
        let router = tonic::transport::Server::builder()
            .add_service(control.clone().into_server())
            .add_service(control.clone().into_bridge_server())
            .add_service(
                kiln_proto::grpc::health::v1::health_server::HealthServer::new(HealthService::new(
                    draining.clone(),
                )),
            );
        if matches!(addr, Addr::Tcp(_)) && !serve_tls.has_tls() {
            tracing::warn!(%addr, "serving plaintext TCP (--insecure-tcp)");
        } else {
            tracing::info!(%addr, "serving");
        }
        // Stopping ends the listener only: connections already open stay served (their
        // tasks live on), so a running build's later calls (LLBBridge.Return, ReadFile…)
        // still reach it.
        let incoming = futures::StreamExt::take_until(incoming, stopping.clone().cancelled_owned());
        let stop = stopping.clone();
        tasks.push(tokio::spawn(async move {
            router
                .serve_with_incoming(incoming)
                .await
                .context("gRPC server stopped")?;
            if stop.is_cancelled() {
                // Stopped on purpose: the drain decides when the process ends.
                std::future::pending::<()>().await;
            }
            Ok(())
        }));
    }
    metrics.set_ready(true);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tasks = futures::future::select_all(tasks);
    let how = tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
        res = &mut tasks => {
            let (r, _, _) = res;
            return r?;
        }
    };
    let pool = engine.pool().cloned();
    tokio::select! {
        _ = drain(how, &metrics, &draining, &stopping, pool.clone()) => {}
        res = &mut tasks => {
            let (r, _, _) = res;
            r??;
        }
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(
                timeout = ?shutdown_timeout,
                builds = metrics.builds_in_flight.get(),
                exports = pool.as_ref().map(|p| p.stats().queue_depth).unwrap_or(0),
                "shutdown timeout: exiting with work left"
            );
        }
        _ = tokio::signal::ctrl_c() => tracing::warn!("interrupted again: exiting now"),
        _ = term.recv() => tracing::warn!("terminated again: exiting now"),
    }
    Ok(())
}

/// How long a stopping worker goes on by default (see `--shutdown-timeout`).
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(270);

/// A stopping worker's drain: it reports not ready (`/readyz` and gRPC health), refuses
/// new builds and stops accepting connections, waits for the running builds (whose calls
/// on open connections go on), then for the pool cache's export queue to empty.
async fn drain(
    how: &str,
    metrics: &Metrics,
    draining: &std::sync::atomic::AtomicBool,
    stopping: &tokio_util::sync::CancellationToken,
    pool: Option<Arc<kiln_worker::cache::pool::Pool>>,
) {
    tracing::info!(
        builds = metrics.builds_in_flight.get(),
        exports = pool.as_ref().map(|p| p.stats().queue_depth).unwrap_or(0),
        "{how}: draining (no new builds; running builds and pool exports finish first)"
    );
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    metrics.set_ready(false);
    stopping.cancel();
    while metrics.builds_in_flight.get() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("running builds done");
    if let Some(pool) = pool {
        pool.wait_idle().await;
        let stats = pool.stats();
        tracing::info!(
            exported = stats.exported,
            failed = stats.failed,
            "pool exports done"
        );
    }
    tracing::info!("drained: exiting");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `kiln-controller` renders into the worker's ConfigMap.
    #[test]
    fn config_file_accepts_what_the_controller_renders() {
        let text = "max-parallelism = 4\n\n[gc]\nenabled = true\nreserved-space = \"10737418240\"\nmax-used-space = \"80%\"\nkeep-duration = \"172800s\"\n\n[[gc.rules]]\nall = false\nfilters = [\"type==source.local\"]\nkeep-duration = \"172800s\"\nmax-used-space = \"536870912\"\n";
        let c: ConfigFile = toml::from_str(text).unwrap();
        let gc = c.gc_policy().unwrap();
        assert_eq!(
            gc.limits.max_used_space,
            Some(kiln_proto::gc::Size::Percent(80.0))
        );
        assert_eq!(gc.rules[0].filters, ["type==source.local"]);
        assert_eq!(
            gc.rules[0].limits.keep_duration,
            Some(Duration::from_secs(172800))
        );
        let bad: ConfigFile = toml::from_str("[gc]\nmax-used-space = \"lots\"\n").unwrap();
        let err = format!("{:#}", bad.gc_policy().unwrap_err());
        assert!(err.contains("gc.max-used-space"), "{err}");
        let err = toml::from_str::<ConfigFile>("[gc]\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
