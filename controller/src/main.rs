//! `kiln-controller`: `crdgen` writes the CRD YAML; `run` is the operator (BuildWorkerPool
//! reconcile, and BuildJobs run through their pool's gateway).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Kiln's Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "kiln-controller", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the CRD YAML into charts/kiln/crds/ and manifests/crds/ under a repository root.
    Crdgen {
        /// Repository root to write under.
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Run the operator (uses the in-cluster config or KUBECONFIG).
    Run {
        /// Log filter (RUST_LOG syntax).
        #[arg(long, env = "KILN_LOG", default_value = "info")]
        log: String,
        /// Serve Prometheus metrics, /healthz and /readyz on this IP:PORT.
        #[arg(long, env = "KILN_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Run the controllers only while holding the Lease `kiln-controller` in
        /// `--lease-namespace` (so several replicas can run).
        #[arg(long, env = "KILN_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
        /// Namespace of the Lease (the controller's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "kiln-system")]
        lease_namespace: String,
        /// This replica's identity in the Lease (its pod name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Crdgen { root } => {
            for path in kiln_controller::crdgen::write_all(&root)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Run {
            log,
            metrics_addr,
            leader_elect,
            lease_namespace,
            identity,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(&log))
                .with_writer(std::io::stderr)
                .init();
            // ring is the only rustls provider in this build; installing it explicitly keeps
            // that true even if a dependency later enables another.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = kube::Client::try_default()
                .await
                .map_err(|e| anyhow::anyhow!("cannot build a Kubernetes client: {e}"))?;
            tracing::info!("kiln-controller starting");
            if let Some(addr) = metrics_addr {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}"))?;
                tokio::spawn(kiln_controller::metrics::serve(listener));
            }
            let runner = std::sync::Arc::new(
                kiln_controller::reconcile::job::runner::GatewayRunner::default(),
            );
            if !leader_elect {
                if let Some(m) = kiln_controller::metrics::global() {
                    m.set_leader(true);
                }
                kiln_controller::reconcile::run(client, runner).await;
                return Ok(());
            }
            let identity = match identity {
                Some(i) if !i.is_empty() => i,
                _ => anyhow::bail!(
                    "--identity (or POD_NAME) is required with leader election; pass --leader-elect=false to run without"
                ),
            };
            use kiln_controller::leader;
            let settings = leader::LeaseSettings::new(&lease_namespace, &identity);
            let elector = leader::Elector::new(
                client.clone(),
                settings,
                std::sync::Arc::new(time::OffsetDateTime::now_utc),
            );
            leader::run_elected(
                elector,
                move || kiln_controller::reconcile::run(client.clone(), runner.clone()),
                |_| {},
                shutdown_signal(),
            )
            .await;
            Ok(())
        }
    }
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
