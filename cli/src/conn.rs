//! How `kiln` reaches a daemon or gateway: the `--addr` and TLS flags shared by every
//! remote subcommand (buildctl's names), and the gRPC channel they make.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_cli::client::{Client, TlsConfig};
use kiln_proto::transport::{Addr, TlsFiles};
use tonic::transport::Channel;

/// Where the daemon or gateway is and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Daemon or gateway address (unix:///path or tcp://host:port); without it `build`
    /// runs the engine in this process.
    #[arg(long, env = "BUILDKIT_HOST")]
    pub addr: Option<String>,
    /// CA certificate that verifies the server (TCP; enables TLS).
    #[arg(long, env = "KILN_TLSCACERT")]
    pub tlscacert: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long, env = "KILN_TLSCERT")]
    pub tlscert: Option<PathBuf>,
    /// Client key for mutual TLS.
    #[arg(long, env = "KILN_TLSKEY")]
    pub tlskey: Option<PathBuf>,
    /// Name expected in the server certificate (default: the host of --addr).
    #[arg(long)]
    pub tlsservername: Option<String>,
    /// Directory holding ca.pem, cert.pem and key.pem (buildctl's --tlsdir).
    #[arg(long)]
    pub tlsdir: Option<PathBuf>,
}

impl ConnArgs {
    /// Connects to `--addr`: TLS when a CA is given (or found in --tlsdir), plaintext
    /// otherwise.
    pub async fn client(&self, addr: &str) -> anyhow::Result<Client> {
        let _: Addr = addr.parse().with_context(|| format!("--addr {addr}"))?;
        let from_dir = |name: &str| self.tlsdir.as_ref().map(|d| d.join(name));
        let files = TlsFiles {
            ca: self.tlscacert.clone().or_else(|| from_dir("ca.pem")),
            cert: self.tlscert.clone().or_else(|| from_dir("cert.pem")),
            key: self.tlskey.clone().or_else(|| from_dir("key.pem")),
        };
        let tls = if files.ca.is_some() {
            Some(TlsConfig {
                files,
                server_name: self.tlsservername.clone(),
            })
        } else {
            if files.cert.is_some() || files.key.is_some() {
                anyhow::bail!("--tlscert/--tlskey need --tlscacert (the CA that signed the server's certificate)");
            }
            None
        };
        let tls_note = if tls.is_some() { "TLS" } else { "plaintext" };
        Client::connect(addr, tls)
            .await
            .with_context(|| format!("connecting to {addr} ({tls_note})"))
    }

    /// [`ConnArgs::client`]'s gRPC channel.
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Channel> {
        Ok(self.client(addr).await?.channel())
    }
}
