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
        Command::Run { log } => {
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
            let runner = kiln_controller::reconcile::job::runner::GatewayRunner::default();
            kiln_controller::reconcile::run(client, std::sync::Arc::new(runner)).await;
            Ok(())
        }
    }
}
