//! The real [`Runner`]: drives a job's build through its pool's gateway with the
//! `kiln_cli` client, exactly as `kiln build --addr` does.
//!
//! What the client reads from files — the TLS identity, a ConfigMap context, the docker
//! config with the pool's registry credentials — is written into a private temporary
//! directory (mode 0700) that is removed when the build ends. Build secrets stay in memory
//! and are served over the session's Secrets service only.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use kiln_cli::client::{
    error_chain, BuildOptions, CacheEntry, CacheRequest, Client, Error as ClientError,
    ExportRequest, LogLines, Progress, RegistryConfig, TlsConfig, TlsFiles,
};

use super::{BuildInput, Built, Reporter, RunError, RunFuture, Runner};
use crate::crd::CacheMode;

/// Runs builds on a pool's gateway over mutual TLS.
#[derive(Clone, Debug, Default)]
pub struct GatewayRunner {
    /// Overrides the address of every build (tests on loopback, or a controller outside
    /// the cluster reaching the gateway through a port-forward).
    pub addr_override: Option<String>,
    /// Overrides the name expected in the gateway's certificate (with `addr_override`).
    pub server_name_override: Option<String>,
    /// Registry hosts spoken to over plain HTTP besides localhost.
    pub insecure_registries: Vec<String>,
}

impl Runner for GatewayRunner {
    fn run(&self, input: BuildInput, report: Reporter) -> RunFuture {
        let this = self.clone();
        Box::pin(async move { this.build(input, report).await })
    }
}

fn failed(message: String) -> RunError {
    RunError::Failed {
        message,
        worker: None,
    }
}

/// Writes `data` to `path`, readable by this user only.
fn write_private(path: &Path, data: &[u8]) -> Result<(), RunError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
}

/// Only the `auths` of a docker config: a credential helper named by a Secret must not run
/// in the controller.
fn auths_only(config: &[u8]) -> Result<Vec<u8>, RunError> {
    let v: serde_json::Value = serde_json::from_slice(config).map_err(|e| {
        failed(format!(
            "the registry credentials are not a docker config.json: {e}"
        ))
    })?;
    let auths = v.get("auths").cloned().unwrap_or(serde_json::json!({}));
    serde_json::to_vec(&serde_json::json!({ "auths": auths }))
        .map_err(|e| failed(format!("cannot encode the docker config: {e}")))
}

impl GatewayRunner {
    async fn build(&self, input: BuildInput, report: Reporter) -> Result<Built, RunError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-job-")
            .tempdir()
            .map_err(|e| failed(format!("cannot create a temporary directory: {e}")))?;
        let d = dir.path();
        write_private(&d.join("ca.pem"), input.tls.ca_pem.as_bytes())?;
        write_private(&d.join("cert.pem"), input.tls.cert_pem.as_bytes())?;
        write_private(&d.join("key.pem"), input.tls.key_pem.as_bytes())?;
        let tls = TlsConfig {
            files: TlsFiles {
                ca: Some(d.join("ca.pem")),
                cert: Some(d.join("cert.pem")),
                key: Some(d.join("key.pem")),
            },
            server_name: Some(
                self.server_name_override
                    .clone()
                    .unwrap_or_else(|| input.tls.server_name.clone()),
            ),
        };

        let mut locals = HashMap::new();
        if let Some(files) = &input.context_files {
            let ctx = d.join("context");
            std::fs::create_dir(&ctx)
                .map_err(|e| failed(format!("cannot create {}: {e}", ctx.display())))?;
            for (name, data) in files {
                // Names were checked to be plain file names; checked again where they are used.
                if !super::valid_file_name(name) {
                    return Err(failed(format!("context file name {name:?} is not allowed")));
                }
                write_private(&ctx.join(name), data)?;
            }
            locals.insert("context".to_string(), ctx.clone());
            locals.insert("dockerfile".to_string(), ctx);
        }
        // Without the pool's Secret, a file that does not exist: builds are anonymous rather
        // than using whatever credentials the controller's own environment has.
        let docker_config = d.join("docker-config.json");
        if let Some(cfg) = &input.docker_config {
            write_private(&docker_config, &auths_only(cfg)?)?;
        }

        let exports = input
            .images
            .iter()
            .map(|(name, push)| ExportRequest {
                typ: "image".into(),
                attrs: [
                    ("name".to_string(), name.clone()),
                    ("push".to_string(), push.to_string()),
                ]
                .into(),
                dest: None,
            })
            .collect();
        let cache = CacheRequest {
            imports: input
                .cache_imports
                .iter()
                .map(|r| CacheEntry {
                    typ: "registry".into(),
                    attrs: [("ref".to_string(), r.clone())].into(),
                })
                .collect(),
            exports: input
                .cache_exports
                .iter()
                .map(|(r, mode)| CacheEntry {
                    typ: "registry".into(),
                    attrs: [
                        ("ref".to_string(), r.clone()),
                        (
                            "mode".to_string(),
                            match mode {
                                CacheMode::Min => "min",
                                CacheMode::Max => "max",
                            }
                            .to_string(),
                        ),
                    ]
                    .into(),
                })
                .collect(),
        };
        let opts = BuildOptions {
            frontend_attrs: input.frontend_attrs.clone(),
            locals,
            secrets: input.secrets.clone().into_iter().collect(),
            registry: RegistryConfig {
                insecure: self.insecure_registries.clone(),
                docker_config: Some(docker_config),
            },
            exports,
            cache,
            shared_key: Some(format!("buildjob:{}", input.uid)),
            ..BuildOptions::default()
        };

        let addr = self.addr_override.clone().unwrap_or(input.addr.clone());
        report.line(&format!("[kiln] connecting to {addr}"));
        let client = Client::connect(&addr, Some(tls))
            .await
            .map_err(|e| classify(e, &addr))?;
        let (progress, mut rx) = Progress::channel();
        let sink = report.clone();
        let lines = tokio::spawn(async move {
            let mut log = LogLines::new();
            while let Some(ev) = rx.recv().await {
                for l in log.push(&ev) {
                    sink.line(&l);
                }
            }
        });
        let res = client.build(opts, progress).await;
        // The client dropped its progress sender: the line task drains and ends.
        let _ = lines.await;
        drop(dir);
        match res {
            Ok(out) => {
                if let Some(w) = &out.worker {
                    report.worker(w);
                }
                Ok(Built {
                    image_digest: out.image_digest().map(str::to_string),
                    worker: out.worker.clone(),
                })
            }
            Err(e) => {
                if let Some(w) = e.worker() {
                    report.worker(w);
                }
                Err(remote_context_hint(classify(e, &addr), &input))
            }
        }
    }
}

/// A job with a remote context (git or http source) serves no files over its session; a
/// worker that still asks the session for them did not fetch the remote context (a worker
/// older than remote-context support), so say that rather than only the session's error.
fn remote_context_hint(e: RunError, input: &BuildInput) -> RunError {
    let (Some(url), None) = (input.frontend_attrs.get("context"), &input.context_files) else {
        return e;
    };
    match e {
        RunError::Failed { message, worker } if message.contains("FileSync") => RunError::Failed {
            message: format!(
                "the worker did not fetch the remote context {url} (a worker older than remote git and http context support asks the client for the files): {message}"
            ),
            worker,
        },
        other => other,
    }
}

/// A lost gateway or worker is retried; everything else is the build's own failure.
fn classify(e: ClientError, addr: &str) -> RunError {
    let worker = e.worker().map(str::to_string);
    let message = error_chain(&e);
    if e.is_unavailable() {
        RunError::Unavailable { message, worker }
    } else {
        let message = match &e {
            ClientError::Addr { .. } | ClientError::Tls(_) => format!("{addr}: {message}"),
            _ => message,
        };
        RunError::Failed { message, worker }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_keeps_auths_only() {
        let cfg = br#"{"auths":{"r:5000":{"auth":"dTpw"}},"credHelpers":{"r:5000":"evil"},"credsStore":"evil"}"#;
        let out: serde_json::Value = serde_json::from_slice(&auths_only(cfg).unwrap()).unwrap();
        assert_eq!(out, serde_json::json!({"auths":{"r:5000":{"auth":"dTpw"}}}));
        assert!(auths_only(b"not json").is_err());
    }
}
