//! `kiln build --addr`: the build runs on a `kiln-worker` (or anything serving BuildKit's
//! Control API). The CLI opens a session serving the context and Dockerfile directories
//! (FileSync), sends the Solve, drives the frontend over LLBBridge as buildctl does, and
//! renders the Status stream.
//!
//! Outputs other than `image` (`local`, `tar`, `oci`, `docker`) come back over the
//! session's FileSend and are written where `--output` says.
//!
//! Secrets (`--secret`) and registry credentials (this machine's docker config) are served
//! to the daemon from this process over the session.
//!
//! Partial, like the daemon it talks to: no SSH forwarding over the session yet.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context};
use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::frontend as gw;
use kiln_worker::control::{BuildRequest, Frontend};
use kiln_worker::progress::{self, Event, Progress, VertexState};
use kiln_worker::session::attachables::{AuthProvider, SecretStore};
use kiln_worker::session::filesend::{FileSendTargets, OutputTarget};
use kiln_worker::session::filesync::LocalDirs;
use kiln_worker::session::transport::{health_service, pipe, serve};
use kiln_worker::session::SessionHeaders;
use sha2::{Digest as _, Sha256};

/// A fresh random-enough identifier (time, pid and a counter, hashed).
fn new_id(kind: &str) -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let h = Sha256::digest(format!("{kind}-{t}-{}", std::process::id()).as_bytes());
    hex::encode(&h[..13])
}

fn time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

/// Status messages as progress events for the renderer.
fn events(msg: api::StatusResponse) -> Vec<Event> {
    let mut out = Vec::new();
    for v in msg.vertexes {
        out.push(Event::Vertex(VertexState {
            digest: v.digest,
            inputs: v.inputs,
            name: v.name,
            started: time(v.started),
            completed: time(v.completed),
            cached: v.cached,
            error: (!v.error.is_empty()).then_some(v.error),
        }));
    }
    for s in msg.statuses {
        out.push(Event::Status(progress::VertexStatus {
            vertex: s.vertex,
            id: s.id,
            name: s.name,
            current: s.current.max(0) as u64,
            total: s.total.max(0) as u64,
            timestamp: time(s.timestamp).unwrap_or_else(SystemTime::now),
            started: time(s.started),
            completed: time(s.completed),
        }));
    }
    for l in msg.logs {
        out.push(Event::Log(progress::VertexLog {
            vertex: l.vertex,
            stream: l.stream.clamp(0, 255) as u8,
            data: l.msg.into(),
            timestamp: time(l.timestamp).unwrap_or_else(SystemTime::now),
        }));
    }
    for w in msg.warnings {
        out.push(Event::Warning(progress::Warning {
            vertex: (!w.vertex.is_empty()).then_some(w.vertex),
            message: String::from_utf8_lossy(&w.short).to_string(),
        }));
    }
    out
}

/// Runs the build on the daemon at `addr`; returns the exporter response.
pub async fn build(
    conn: &crate::conn::ConnArgs,
    addr: &str,
    registry: &kiln_worker::source::image::RegistryConfig,
    req: BuildRequest,
    caches: &kiln_worker::control::CacheRequest,
    attrs: BTreeMap<String, String>,
    progress: Progress,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut exporters = Vec::new();
    let mut targets = HashMap::new();
    for (i, e) in req.exports.iter().enumerate() {
        if e.typ != "image" {
            // The daemon streams this output back over the session's FileSend.
            let dest = e
                .dest
                .clone()
                .or_else(|| e.attrs.get("dest").map(std::path::PathBuf::from))
                .ok_or_else(|| anyhow!("--output type={}: dest is required", e.typ))?;
            targets.insert(
                i,
                if e.typ == "local" {
                    OutputTarget::Dir(dest)
                } else {
                    OutputTarget::File(dest)
                },
            );
        }
        exporters.push(api::Exporter {
            r#type: e.typ.clone(),
            attrs: e
                .attrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }
    let control_channel = conn.connect(addr).await?;
    let mut control = api::control_client::ControlClient::new(control_channel.clone());

    // The session: this process serves its local directories to the daemon.
    let session_id = new_id("session");
    let mut dirs = LocalDirs::new();
    for (name, path) in &req.locals {
        dirs = dirs.with_dir(name, path);
    }
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    let mut open = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    SessionHeaders {
        id: session_id.clone(),
        shared_key: shared_key(&req),
        methods: vec![
            "/moby.filesync.v1.FileSync/DiffCopy".into(),
            "/moby.filesync.v1.FileSync/TarStream".into(),
            kiln_worker::session::filesend::DIFF_COPY.into(),
            kiln_worker::session::attachables::GET_SECRET.into(),
            kiln_worker::session::attachables::CREDENTIALS.into(),
            "/grpc.health.v1.Health/Check".into(),
        ],
        name: None,
    }
    .to_metadata(open.metadata_mut())?;
    let inbound = control
        .session(open)
        .await
        .with_context(|| format!("opening a session with {addr}"))?
        .into_inner();
    let routes = tonic::service::Routes::new(dirs.into_service())
        .add_service(health_service())
        .add_service(FileSendTargets::new(targets))
        .add_service(SecretStore::new(req.secrets.clone()).into_service())
        .add_service(AuthProvider::new(registry.clone()).into_service());
    let session = tokio::spawn(serve(pipe(inbound, out_tx), routes));

    let build_ref = new_id("build");
    // As buildctl >= 0.11 and buildx do: Control.Solve names neither frontend nor
    // definition, and this client drives the build over LLBBridge, handing the result back
    // with Return; the daemon then exports it.
    let (frontend, definition) = match req.frontend {
        Frontend::Dockerfile { .. } => ("dockerfile.v0".to_string(), None),
        Frontend::Llb(def) => (String::new(), Some(def)),
    };
    let frontend_attrs: HashMap<String, String> = attrs.into_iter().collect();
    let entries = |v: &[kiln_worker::cache::registry::CacheEntry]| -> Vec<api::CacheOptionsEntry> {
        v.iter()
            .map(|e| api::CacheOptionsEntry {
                r#type: e.typ.clone(),
                attrs: e
                    .attrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect()
    };
    let solve = api::SolveRequest {
        r#ref: build_ref.clone(),
        session: session_id,
        frontend_attrs: frontend_attrs.clone(),
        exporters,
        cache: Some(api::CacheOptions {
            exports: entries(&caches.exports),
            imports: entries(&caches.imports),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bridge = tokio::spawn(drive_bridge(
        control_channel.clone(),
        build_ref.clone(),
        gw::SolveRequest {
            definition,
            frontend,
            frontend_opt: frontend_attrs,
            allow_result_return: true,
            allow_result_array_ref: true,
            ..Default::default()
        },
    ));
    let mut status_client = control.clone();
    let sink = progress.clone();
    let status = tokio::spawn(async move {
        let mut stream = status_client
            .status(api::StatusRequest { r#ref: build_ref })
            .await?
            .into_inner();
        while let Some(msg) = stream.message().await? {
            for e in events(msg) {
                sink.send(e);
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    let res = control.solve(solve).await;
    // Let the last progress arrive before the renderer finishes.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), status).await;
    drop(progress);
    session.abort();
    let bridge_err = match bridge.await {
        Ok(Err(e)) => Some(e),
        Err(e) => Some(anyhow!("the LLBBridge task failed: {e}")),
        Ok(Ok(())) => None,
    };
    match res {
        Ok(resp) => Ok(resp.into_inner().exporter_response.into_iter().collect()),
        Err(s) => match bridge_err {
            // The bridge's error says what went wrong; Solve only echoes it.
            Some(e) if s.message().is_empty() => Err(e),
            _ => Err(anyhow!("{}", s.message())),
        },
    }
}

/// The session's shared key, as buildx makes it: the context directory's name and this
/// machine's node id. A gateway hashes on it, so repeated builds of one project from one
/// machine land on the worker that has its files and cache.
fn shared_key(req: &BuildRequest) -> String {
    let Some(ctx) = req.locals.get("context") else {
        return String::new();
    };
    let abs = std::fs::canonicalize(ctx).unwrap_or_else(|_| ctx.clone());
    let base = abs
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "root".into());
    format!("{base}:{}", node_id())
}

/// A random id for this machine, kept in `$XDG_CONFIG_HOME/kiln/node-id` (or
/// `~/.config/kiln/node-id`); a fresh one per run when that cannot be written.
fn node_id() -> String {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config")))
        .map(|d| d.join("kiln"));
    let fresh = new_id("node")[..16].to_string();
    let Some(dir) = dir else {
        return fresh;
    };
    let file = dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&file) {
        let id = id.trim();
        if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return id.to_string();
        }
    }
    let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, &fresh));
    fresh
}

/// An LLBBridge call for build `build_ref`.
fn bridge_request<T>(build_ref: &str, msg: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(kiln_proto::metadata::BUILD_ID, build_ref.parse()?);
    Ok(r)
}

/// The client side of the LLBBridge path: Ping, Solve, then Return with the result (or
/// the error), all tagged with the build's ref.
async fn drive_bridge(
    channel: tonic::transport::Channel,
    build_ref: String,
    solve: gw::SolveRequest,
) -> anyhow::Result<()> {
    let mut bridge = gw::llb_bridge_client::LlbBridgeClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let pong = bridge
        .ping(bridge_request(&build_ref, gw::PingRequest {})?)
        .await
        .context("LLBBridge.Ping")?
        .into_inner();
    let has = |id: &str| {
        pong.frontend_api_caps
            .iter()
            .any(|c| c.id == id && c.enabled)
    };
    if !has("return") {
        bail!("the daemon does not support LLBBridge.Return (capability \"return\")");
    }
    let outcome = bridge
        .solve(bridge_request(&build_ref, solve)?)
        .await
        .map(|r| r.into_inner().result.unwrap_or_default());
    let ret = match &outcome {
        Ok(result) => gw::ReturnRequest {
            result: Some(result.clone()),
            error: None,
        },
        Err(status) => gw::ReturnRequest {
            result: None,
            error: Some(kiln_proto::google::rpc::Status {
                code: status.code() as i32,
                message: status.message().to_string(),
                details: Vec::new(),
            }),
        },
    };
    bridge
        .r#return(bridge_request(&build_ref, ret)?)
        .await
        .context("LLBBridge.Return")?;
    outcome.map(|_| ()).map_err(|s| anyhow!("{}", s.message()))
}
