//! `kiln`: the Kiln command line. `kiln build` accepts `buildctl build`'s flags and a
//! docker-style short form; with no `--addr` the engine runs embedded in this process
//! (daemonless), keeping its state under `--root`. `kiln du`, `kiln prune` and
//! `kiln workers` ask a daemon or gateway. The BuildKit client itself is the
//! [`kiln_cli::client`] library, shared with the controller.

mod admin;
mod build;
mod conn;
mod progress;
mod timefmt;

use clap::{Parser, Subcommand};

/// Kiln: a Kubernetes-native distributed build service.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    /// Log filter for diagnostics on stderr (`RUST_LOG` syntax).
    #[arg(long, global = true, env = "KILN_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a Dockerfile or an LLB definition (read from stdin when no frontend is given).
    Build(Box<build::BuildArgs>),
    /// Show the disk usage of a daemon's (or every worker's, through a gateway) cache.
    Du(admin::ListArgs),
    /// Remove cache records from a daemon (never those a running build holds).
    Prune(admin::PruneArgs),
    /// List the workers behind an address.
    Workers(admin::ListArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match cli.command {
            Command::Build(args) => build::run(*args).await,
            Command::Du(args) => admin::du(args).await,
            Command::Prune(args) => admin::prune(args).await,
            Command::Workers(args) => admin::workers(args).await,
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for (i, c) in e.chain().enumerate() {
        let m = c.to_string();
        if i > 0 {
            if s.contains(&m) {
                continue;
            }
            s.push_str(": ");
        }
        s.push_str(&m);
    }
    s
}
