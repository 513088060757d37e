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

use futures::StreamExt as _;
use kiln_cli::client::{
    error_chain, BuildOptions, CacheEntry, CacheRequest, Client, Error as ClientError,
    ExportRequest, LogLines, Progress, RegistryConfig, TlsConfig, TlsFiles, IMAGE_DIGEST_KEY,
};
use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::tonic;

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

    fn attach(&self, input: BuildInput, report: Reporter) -> RunFuture {
        let this = self.clone();
        Box::pin(async move { this.find(input, report).await })
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
    /// A private temporary directory holding the client identity, and the TLS settings
    /// naming its files.
    fn identity(&self, input: &BuildInput) -> Result<(tempfile::TempDir, TlsConfig), RunError> {
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
        Ok((dir, tls))
    }

    /// Looks up build `input.build_ref` through the gateway: first on the worker the
    /// gateway pinned it to, then (a gateway that no longer pins it) on every worker's
    /// history with a `ref==` filter. A running build is followed through `Status` to its
    /// end and looked up again.
    async fn find(&self, input: BuildInput, report: Reporter) -> Result<Built, RunError> {
        let (dir, tls) = self.identity(&input)?;
        let addr = self.addr_override.clone().unwrap_or(input.addr.clone());
        let r = input.build_ref.clone();
        report.line(&format!("[kiln] looking up build {r} through {addr}"));
        let client = Client::connect(&addr, Some(tls))
            .await
            .map_err(|e| classify(e, &addr))?;
        drop(dir);
        let mut control = api::control_client::ControlClient::new(client.channel());
        let mut followed = false;
        let mut polls = 0;
        loop {
            let record = lookup(&mut control, &r, &addr).await?;
            let Some((running, record)) = record else {
                return Err(RunError::NotFound {
                    message: format!("no worker behind {addr} knows build {r}"),
                });
            };
            if running {
                if followed {
                    // The earlier controller's session is gone, so the worker cancels the
                    // build; a record still running long after that belongs to a build
                    // whose Solve call was dropped, which never completes its record.
                    polls += 1;
                    if polls > STALE_POLLS {
                        return Err(RunError::NotFound {
                            message: format!(
                                "build {r} is still recorded as running but its client (the earlier controller) is gone, so it cannot deliver its result"
                            ),
                        });
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                report.line(&format!("[kiln] build {r} is still running: following it"));
                follow(&mut control, &r, &report).await;
                followed = true;
                continue;
            }
            return outcome(&r, record);
        }
    }

    async fn build(&self, input: BuildInput, report: Reporter) -> Result<Built, RunError> {
        let (dir, tls) = self.identity(&input)?;
        let d = dir.path();

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
            build_ref: (!input.build_ref.is_empty()).then(|| input.build_ref.clone()),
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

/// How long following a running build waits for its next progress message before looking
/// its record up again.
const FOLLOW_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Look-ups, a second apart, of a build still recorded as running after it was followed.
const STALE_POLLS: u32 = 10;

/// The record of build `r`: `(running, record)`, or `None` when no worker has it. Asks the
/// pinned worker first (`ListenBuildHistory{ref, EarlyExit}`); a gateway that answers
/// `NotFound` for a ref it no longer pins is asked again without the ref and with a
/// `ref==` filter, which it sends to all its workers.
async fn lookup(
    control: &mut api::control_client::ControlClient<tonic::transport::Channel>,
    r: &str,
    addr: &str,
) -> Result<Option<(bool, api::BuildHistoryRecord)>, RunError> {
    let pinned = api::BuildHistoryRequest {
        r#ref: r.to_string(),
        early_exit: true,
        ..Default::default()
    };
    let any = api::BuildHistoryRequest {
        early_exit: true,
        filter: vec![format!("ref=={r}")],
        ..Default::default()
    };
    for req in [pinned, any] {
        let stream = match control.listen_build_history(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            Err(s) => return Err(history_error(&s, r, addr)),
        };
        let events: Vec<api::BuildHistoryEvent> = stream
            .take_while(|m| std::future::ready(m.is_ok()))
            .filter_map(|m| std::future::ready(m.ok()))
            .collect()
            .await;
        let mut found = None;
        for ev in events {
            let Some(record) = ev.record.filter(|rec| rec.r#ref == r) else {
                continue;
            };
            if ev.r#type == api::BuildHistoryEventType::Complete as i32 {
                return Ok(Some((false, record)));
            }
            if ev.r#type == api::BuildHistoryEventType::Started as i32 {
                found = Some((true, record));
            }
        }
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn history_error(s: &tonic::Status, r: &str, addr: &str) -> RunError {
    let message = format!("looking up build {r} through {addr}: {}", s.message());
    if s.code() == tonic::Code::Unavailable {
        RunError::Unavailable {
            message,
            worker: None,
        }
    } else {
        failed(message)
    }
}

/// Reads the `Status` stream of a running build to its end, reporting its log lines.
async fn follow(
    control: &mut api::control_client::ControlClient<tonic::transport::Channel>,
    r: &str,
    report: &Reporter,
) {
    let Ok(resp) = control
        .status(api::StatusRequest {
            r#ref: r.to_string(),
        })
        .await
    else {
        return;
    };
    let mut stream = resp.into_inner();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(FOLLOW_IDLE, stream.message()).await {
        for l in msg.logs {
            for line in String::from_utf8_lossy(&l.msg).lines() {
                report.line(line);
            }
        }
    }
}

/// A finished build's outcome from its history record: its image digest, its error, or —
/// cancelled, as a build is when its client (the earlier controller) goes away —
/// [`RunError::NotFound`] so the next attempt runs.
fn outcome(r: &str, record: api::BuildHistoryRecord) -> Result<Built, RunError> {
    match record.error {
        None => Ok(Built {
            image_digest: record.exporter_response.get(IMAGE_DIGEST_KEY).cloned(),
            worker: None,
        }),
        Some(e) if e.code == tonic::Code::Cancelled as i32 => Err(RunError::NotFound {
            message: format!(
                "build {r} was cancelled (the earlier controller's session went away): {}",
                e.message
            ),
        }),
        Some(e) => Err(failed(e.message)),
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
