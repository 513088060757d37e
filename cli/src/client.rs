//! A BuildKit client for a `kiln-worker` or a `kiln-gateway` (or anything serving BuildKit's
//! Control API): [`Client::connect`] dials an address with optional mutual TLS, and
//! [`Client::build`] runs one build as buildctl ≥ 0.11 does — a session serving the local
//! directories (FileSync), outputs coming back (FileSend), secrets, registry credentials
//! (Auth) and SSH agents (SSH); `Control.Solve` naming no frontend; the frontend driven over LLBBridge (Ping,
//! Solve, Return); the Status stream forwarded as progress events.
//!
//! Dropping the future returned by [`Client::build`] cancels the build: the calls and the
//! session close, and the daemon stops the build when its client goes away.
//!

mod lines;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::frontend as gw;
use kiln_proto::transport::{self, Addr, ClientTls};
use kiln_worker::llb::pb;
use kiln_worker::progress::{self, VertexState};
use kiln_worker::session::attachables::{AuthProvider, SecretStore};
use kiln_worker::session::content::{self, ContentStores};
use kiln_worker::session::filesend::{FileSendTargets, OutputTarget};
use kiln_worker::session::filesync::LocalDirs;
pub use kiln_worker::session::sshforward::SshAgents;
use kiln_worker::session::transport::{health_service, pipe, serve};
use kiln_worker::session::SessionHeaders;
use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub use kiln_proto::transport::TlsFiles;
pub use kiln_worker::cache::registry::CacheEntry;
pub use kiln_worker::control::{CacheRequest, ExportRequest};
pub use kiln_worker::progress::{Event, Progress};
pub use kiln_worker::solver::error_chain;
pub use kiln_worker::source::image::RegistryConfig;
pub use lines::LogLines;

/// Response header of `Control.Solve` through a `kiln-gateway`: the worker that ran the build.
pub const WORKER_HEADER: &str = "kiln-worker";

/// Exporter response key of the pushed or built image's manifest digest.
pub const IMAGE_DIGEST_KEY: &str = "containerimage.digest";

/// Failures of connecting or building, with the address or the daemon's message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address does not parse (`unix:///path` or `tcp://host:port`).
    #[error("invalid address {addr}")]
    Addr {
        /// The address given.
        addr: String,
        /// Why.
        #[source]
        source: transport::Error,
    },
    /// The TLS files could not be loaded.
    #[error("cannot load the TLS files")]
    Tls(#[source] transport::Error),
    /// Dialing the address failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: transport::Error,
    },
    /// An option of the build is invalid (named in the message).
    #[error("{0}")]
    Options(String),
    /// The daemon refused the session.
    #[error("opening a session with {addr}: {message}")]
    Session {
        /// The address.
        addr: String,
        /// The gRPC code of the refusal.
        code: tonic::Code,
        /// The daemon's message.
        message: String,
    },
    /// The build failed: the daemon's (or the frontend's) message.
    #[error("{message}")]
    Build {
        /// The gRPC code of the failure (`Unavailable` when a gateway lost the worker).
        code: tonic::Code,
        /// What the daemon said.
        message: String,
        /// The worker the gateway had routed the build to, when it said so.
        worker: Option<String>,
    },
}

impl Error {
    /// True when the build did not fail on its own account but its daemon went away: a
    /// gateway reports a worker lost mid-build (or none healthy) as `Unavailable`, and a
    /// session or connection that breaks before the build ran is the same.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            Error::Session { code, .. } | Error::Build { code, .. } => {
                *code == tonic::Code::Unavailable
            }
            _ => false,
        }
    }

    /// The worker named by the gateway in a failed build's response, if any.
    pub fn worker(&self) -> Option<&str> {
        match self {
            Error::Build { worker, .. } => worker.as_deref(),
            _ => None,
        }
    }
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to authenticate a TCP connection: the CA that verifies the server and, for mutual
/// TLS, this client's certificate and key (PEM files, re-read when they change).
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// The CA bundle, certificate and key files.
    pub files: TlsFiles,
    /// Name expected in the server's certificate (default: the host of the address).
    pub server_name: Option<String>,
}

/// What to build: the frontend and its attributes, the session's contents, the outputs
/// and the cache.
#[derive(Clone, Default)]
pub struct BuildOptions {
    /// `None` (or [`Frontend::Dockerfile`]) runs `dockerfile.v0`; [`Frontend::Llb`] solves
    /// a definition.
    pub frontend: Frontend,
    /// Frontend attributes as on the wire (`filename`, `target`, `build-arg:K`, `platform`,
    /// `context` for a remote context, `kiln.route-key`, …).
    pub frontend_attrs: BTreeMap<String, String>,
    /// Local directories the session serves by name (`context`, `dockerfile`).
    pub locals: HashMap<String, PathBuf>,
    /// Secret values by id, served over the session's Secrets service.
    pub secrets: HashMap<String, Vec<u8>>,
    /// SSH agents by id, forwarded over the session's SSH service.
    pub ssh: SshAgents,
    /// Where registry credentials come from (served over the session's Auth service).
    pub registry: RegistryConfig,
    /// Outputs. Types other than `image` need a `dest` and come back over the session.
    pub exports: Vec<ExportRequest>,
    /// Cache imports and exports.
    pub cache: CacheRequest,
    /// The session's shared key; `None` derives it from the `context` directory and this
    /// machine, as buildx does.
    pub shared_key: Option<String>,
    /// The build's ref (what `Status` and `ListenBuildHistory` find it by); `None` makes a
    /// random one. A caller that must find the build again after a restart picks its own.
    pub build_ref: Option<String>,
}

impl std::fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret ids only: values never reach a log.
        f.debug_struct("BuildOptions")
            .field("frontend", &self.frontend)
            .field("frontend_attrs", &self.frontend_attrs)
            .field("locals", &self.locals)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("exports", &self.exports)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Which frontend the build runs.
#[derive(Debug, Clone, Default)]
pub enum Frontend {
    /// `dockerfile.v0`.
    #[default]
    Dockerfile,
    /// A raw LLB definition.
    Llb(pb::Definition),
}

/// What a finished build returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOutcome {
    /// The exporter response (`containerimage.digest`, `containerimage.descriptor`, …).
    pub exporter_response: BTreeMap<String, String>,
    /// The worker that ran the build, when a gateway named it in its response.
    pub worker: Option<String>,
}

impl BuildOutcome {
    /// The image's manifest digest (`sha256:…`), when the build exported an image.
    pub fn image_digest(&self) -> Option<&str> {
        self.exporter_response
            .get(IMAGE_DIGEST_KEY)
            .map(String::as_str)
    }
}

/// A connection to a daemon or gateway.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    channel: Channel,
}

impl Client {
    /// Connects to `addr` (`unix:///path` or `tcp://host:port`), with TLS when `tls` is
    /// given; an unreachable address is an error here.
    pub async fn connect(addr: &str, tls: Option<TlsConfig>) -> Result<Client> {
        let parsed: Addr = addr.parse().map_err(|source| Error::Addr {
            addr: addr.to_string(),
            source,
        })?;
        let tls = match tls {
            Some(t) => Some(ClientTls::load(t.files, t.server_name).map_err(Error::Tls)?),
            None => None,
        };
        let channel = transport::connect(&parsed, tls)
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Client {
            addr: addr.to_string(),
            channel,
        })
    }

    /// The gRPC channel, for calls this module does not wrap (`DiskUsage`, `Prune`, …).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The address connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs one build, sending its progress to `progress`; returns the exporter response
    /// and the worker that ran it. Dropping the future cancels the build.
    pub async fn build(&self, opts: BuildOptions, progress: Progress) -> Result<BuildOutcome> {
        let mut exporters = Vec::new();
        let mut targets = HashMap::new();
        // The directory of the one `oci`/`docker` output with `tar=false`: the daemon
        // writes its blobs into the session's content store `export`.
        let mut layout_dir: Option<PathBuf> = None;
        for (i, e) in opts.exports.iter().enumerate() {
            if e.typ != "image" {
                // The daemon streams this output back over the session's FileSend.
                let dest = e
                    .dest
                    .clone()
                    .or_else(|| e.attrs.get("dest").map(PathBuf::from))
                    .ok_or_else(|| {
                        Error::Options(format!("--output type={}: dest is required", e.typ))
                    })?;
                let tar = kiln_worker::control::tar_output(e)
                    .map_err(|err| Error::Options(format!("--output type={}: {err}", e.typ)))?;
                if matches!(e.typ.as_str(), "oci" | "docker") && !tar {
                    if layout_dir.is_some() {
                        return Err(Error::Options(
                            "at most one --output type=oci|docker with tar=false".into(),
                        ));
                    }
                    std::fs::create_dir_all(&dest).map_err(|err| {
                        Error::Options(format!(
                            "--output type={}: cannot create {}: {err}",
                            e.typ,
                            dest.display()
                        ))
                    })?;
                    layout_dir = Some(dest);
                    exporters.push(api::Exporter {
                        r#type: e.typ.clone(),
                        attrs: e
                            .attrs
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    });
                    continue;
                }
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
        // `type=local` caches: the daemon reads and writes them through the session's
        // content store `local:<dir>`; imports name their manifest by digest.
        let mut stores: HashMap<String, PathBuf> = layout_dir
            .iter()
            .map(|d| (content::EXPORT_STORE.to_string(), d.clone()))
            .collect();
        let mut cache_export: Option<(PathBuf, String)> = None;
        for e in &opts.cache.exports {
            if e.typ != "local" {
                continue;
            }
            let Some(dest) = e.attrs.get("dest").filter(|d| !d.is_empty()) else {
                continue;
            };
            std::fs::create_dir_all(dest).map_err(|err| {
                Error::Options(format!(
                    "--export-cache type=local: cannot create {dest}: {err}"
                ))
            })?;
            stores.insert(format!("local:{dest}"), PathBuf::from(dest));
            let tag = e.attrs.get("tag").filter(|t| !t.is_empty());
            cache_export = Some((
                PathBuf::from(dest),
                tag.cloned().unwrap_or_else(|| "latest".into()),
            ));
        }
        let mut cache_imports = Vec::new();
        for e in &opts.cache.imports {
            let mut e = e.clone();
            if e.typ == "local" {
                if let Some(src) = e.attrs.get("src").filter(|d| !d.is_empty()).cloned() {
                    if !e.attrs.contains_key("digest") {
                        let tag = e.attrs.get("tag").filter(|t| !t.is_empty());
                        let tag = tag.map(String::as_str).unwrap_or("latest");
                        match local_cache_digest(std::path::Path::new(&src), tag) {
                            Ok(d) => {
                                e.attrs.insert("digest".into(), d);
                            }
                            Err(why) => {
                                progress.warn(
                                    None,
                                    format!(
                                        "local cache import at {src} not found: {why}; building without it"
                                    ),
                                );
                                continue;
                            }
                        }
                    }
                    stores.insert(format!("local:{src}"), PathBuf::from(&src));
                }
            }
            cache_imports.push(e);
        }
        let mut control = api::control_client::ControlClient::new(self.channel.clone());
        let mut tasks = Tasks::default();

        // The session: this process serves its directories, secrets and credentials.
        let session_id = new_id("session");
        let mut dirs = LocalDirs::new();
        for (name, path) in &opts.locals {
            dirs = dirs.with_dir(name, path);
        }
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
        let mut open = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
        let shared_key = opts
            .shared_key
            .clone()
            .unwrap_or_else(|| shared_key(&opts.locals));
        let mut methods: Vec<String> = vec![
            "/moby.filesync.v1.FileSync/DiffCopy".into(),
            "/moby.filesync.v1.FileSync/TarStream".into(),
            kiln_worker::session::filesend::DIFF_COPY.into(),
            kiln_worker::session::attachables::GET_SECRET.into(),
            kiln_worker::session::attachables::CREDENTIALS.into(),
            kiln_worker::session::attachables::FETCH_TOKEN.into(),
            "/grpc.health.v1.Health/Check".into(),
        ];
        if !stores.is_empty() {
            methods.extend(content::METHODS.iter().map(|m| m.to_string()));
        }
        if !opts.ssh.is_empty() {
            methods.push(kiln_worker::session::sshforward::CHECK_AGENT.into());
            methods.push(kiln_worker::session::sshforward::FORWARD_AGENT.into());
        }
        SessionHeaders {
            id: session_id.clone(),
            shared_key,
            methods,
            name: None,
        }
        .to_metadata(open.metadata_mut())
        .map_err(|e| Error::Options(format!("session headers: {e}")))?;
        let inbound = control
            .session(open)
            .await
            .map_err(|s| Error::Session {
                addr: self.addr.clone(),
                code: s.code(),
                message: s.message().to_string(),
            })?
            .into_inner();
        let routes = tonic::service::Routes::new(dirs.into_service())
            .add_service(health_service())
            .add_service(FileSendTargets::new(targets))
            .add_service(SecretStore::new(opts.secrets.clone()).into_service())
            .add_service(AuthProvider::new(opts.registry.clone()).into_service())
            .add_service(opts.ssh.clone().into_service())
            .add_service(ContentStores::new(stores).into_service());
        let served = serve(pipe(inbound, out_tx), routes);
        tasks.session = Some(tokio::spawn(async move {
            let _ = served.await;
        }));

        let build_ref = opts.build_ref.clone().unwrap_or_else(|| new_id("build"));
        // As buildctl >= 0.11 and buildx do: Control.Solve names neither frontend nor
        // definition, and this client drives the build over LLBBridge, handing the result
        // back with Return; the daemon then exports it.
        let (frontend, definition) = match opts.frontend {
            Frontend::Dockerfile => ("dockerfile.v0".to_string(), None),
            Frontend::Llb(def) => (String::new(), Some(def)),
        };
        let frontend_attrs: HashMap<String, String> = opts.frontend_attrs.into_iter().collect();
        let solve = api::SolveRequest {
            r#ref: build_ref.clone(),
            session: session_id,
            frontend_attrs: frontend_attrs.clone(),
            exporters,
            cache: Some(api::CacheOptions {
                exports: entries(&opts.cache.exports),
                imports: entries(&cache_imports),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bridge = tokio::spawn(drive_bridge(
            self.channel.clone(),
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
        tasks.bridge = Some(bridge);
        let mut status_client = control.clone();
        let sink = progress.clone();
        tasks.status = Some(tokio::spawn(async move {
            let Ok(resp) = status_client
                .status(api::StatusRequest { r#ref: build_ref })
                .await
            else {
                return;
            };
            let mut stream = resp.into_inner();
            while let Ok(Some(msg)) = stream.message().await {
                for e in events(msg) {
                    sink.send(e);
                }
            }
        }));
        let res = control.solve(solve).await;
        // Let the last progress arrive before the caller's renderer finishes.
        if let Some(status) = tasks.status.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), status).await;
        }
        drop(progress);
        let bridge_err = match tasks.bridge.take() {
            Some(b) => match b.await {
                Ok(Err(e)) => Some(e),
                Err(e) => Some(Error::Build {
                    code: tonic::Code::Internal,
                    message: format!("the LLBBridge task failed: {e}"),
                    worker: None,
                }),
                Ok(Ok(())) => None,
            },
            None => None,
        };
        drop(tasks);
        match res {
            Ok(resp) => {
                let worker = worker_header(resp.metadata());
                let exporter_response: BTreeMap<String, String> =
                    resp.into_inner().exporter_response.into_iter().collect();
                if let Some(dir) = &layout_dir {
                    write_layout_index(dir, &exporter_response)?;
                }
                if let Some((dir, tag)) = &cache_export {
                    // Absent when the export failed and ignore-error=true was given.
                    if exporter_response.contains_key("cache.manifest") {
                        let desc = response_descriptor(
                            &exporter_response,
                            "cache.manifest",
                            "the local cache export",
                        )?;
                        put_index(dir, &desc, &[(None, tag.clone())])?;
                    }
                }
                Ok(BuildOutcome {
                    exporter_response,
                    worker,
                })
            }
            Err(s) => {
                let worker = worker_header(s.metadata());
                match bridge_err {
                    // The bridge's error says what went wrong; Solve only echoes it.
                    Some(Error::Build { code, message, .. }) if s.message().is_empty() => {
                        Err(Error::Build {
                            code,
                            message,
                            worker,
                        })
                    }
                    Some(e) if s.message().is_empty() => Err(e),
                    _ => Err(Error::Build {
                        code: s.code(),
                        message: failure(&self.addr, &s),
                        worker,
                    }),
                }
            }
        }
    }
}

/// The helper tasks of one build, aborted when the build's future is dropped.
#[derive(Default)]
struct Tasks {
    session: Option<JoinHandle<()>>,
    bridge: Option<JoinHandle<Result<()>>>,
    status: Option<JoinHandle<()>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Some(t) = &self.session {
            t.abort();
        }
        if let Some(t) = &self.bridge {
            t.abort();
        }
        if let Some(t) = &self.status {
            t.abort();
        }
    }
}

fn worker_header(meta: &tonic::metadata::MetadataMap) -> Option<String> {
    meta.get(WORKER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn entries(v: &[CacheEntry]) -> Vec<api::CacheOptionsEntry> {
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
}

/// After a build with a `tar=false` output, as buildctl does: adds the exporter
/// response's `containerimage.descriptor` to `dir/index.json`, once per name of
/// `image.name` (tag `latest` without one), replacing entries of the same name, and
/// writes `dir/oci-layout`.
fn write_layout_index(dir: &std::path::Path, resp: &BTreeMap<String, String>) -> Result<()> {
    let desc = response_descriptor(resp, "containerimage.descriptor", "the tar=false output")?;
    let names: Vec<(Option<String>, String)> = match resp.get("image.name") {
        Some(n) if !n.trim().is_empty() => n
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| (Some(n.to_string()), reference_name(n)))
            .collect(),
        _ => vec![(None, "latest".to_string())],
    };
    put_index(dir, &desc, &names)
}

fn daemon_error(message: String) -> Error {
    Error::Build {
        code: tonic::Code::Internal,
        message,
        worker: None,
    }
}

/// The base64 JSON descriptor under `key` of an exporter response.
fn response_descriptor(
    resp: &BTreeMap<String, String>,
    key: &str,
    what: &str,
) -> Result<serde_json::Value> {
    use base64::Engine as _;
    let value = resp
        .get(key)
        .ok_or_else(|| daemon_error(format!("the daemon returned no {key} for {what}")))?;
    // BuildKit sends `containerimage.descriptor` as base64 of the JSON and `cache.manifest`
    // as the JSON itself (shared/design/buildkit-wire.md §9.4).
    let json = if key == "cache.manifest" {
        Ok(value.as_bytes().to_vec())
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|e| e.to_string())
    };
    json.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| daemon_error(format!("{key} from the daemon: {e}")))
}

/// Adds `desc` to the OCI layout `dir`'s `index.json` once per (image name, reference
/// name), replacing entries with the same pair, as buildctl's `ociindex` does; writes
/// `oci-layout`. The manifest must already be in `dir`.
fn put_index(
    dir: &std::path::Path,
    desc: &serde_json::Value,
    names: &[(Option<String>, String)],
) -> Result<()> {
    let bad = daemon_error;
    let digest = desc["digest"].as_str().unwrap_or_default();
    if kiln_worker::session::content::digest_hex(digest).is_none()
        || !desc["mediaType"].is_string()
        || !desc["size"].is_u64()
    {
        return Err(bad(format!(
            "containerimage.descriptor from the daemon is not a descriptor: {desc}"
        )));
    }
    let blob = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    if !blob.is_file() {
        return Err(bad(format!(
            "the daemon did not write the manifest {digest} into {}",
            dir.display()
        )));
    }
    let io = |what: &str, path: &std::path::Path, e: std::io::Error| {
        Error::Options(format!("{what} {}: {e}", path.display()))
    };
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::Options(format!("{} is not valid JSON: {e}", index_path.display()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(io("reading", &index_path, e)),
    };
    if !index.is_object() {
        return Err(Error::Options(format!(
            "{} is not an OCI index",
            index_path.display()
        )));
    }
    index["schemaVersion"] = 2.into();
    index["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
    let mut manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    const IMAGE_NAME: &str = "io.containerd.image.name";
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    for (image, refname) in names {
        manifests.retain(|m| {
            m["annotations"][REF_NAME].as_str() != Some(refname.as_str())
                || m["annotations"][IMAGE_NAME].as_str() != image.as_deref()
        });
        let mut d = desc.clone();
        if !d["annotations"].is_object() {
            d["annotations"] = serde_json::json!({});
        }
        if let Some(image) = image {
            d["annotations"][IMAGE_NAME] = image.clone().into();
        }
        d["annotations"][REF_NAME] = refname.clone().into();
        manifests.push(d);
    }
    index["manifests"] = manifests.into();
    let tmp = dir.join(".index.json.tmp");
    let json = serde_json::to_vec(&index).map_err(|e| bad(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &index_path).map_err(|e| io("writing", &index_path, e))?;
    let layout = dir.join("oci-layout");
    std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| io("writing", &layout, e))
}

/// The manifest digest of entry `tag` in the OCI layout `dir`'s `index.json`.
fn local_cache_digest(dir: &std::path::Path, tag: &str) -> Result<String, String> {
    let path = dir.join("index.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let index: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    index["manifests"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        })
        .and_then(|m| m["digest"].as_str())
        .filter(|d| content::digest_hex(d).is_some())
        .map(str::to_string)
        .ok_or_else(|| format!("no entry {tag:?} in {}", path.display()))
}

/// The OCI reference name of an image name, as containerd and buildctl derive it: the
/// tag (`docker.io/library/a:1` → `1`), or the name itself without one.
fn reference_name(name: &str) -> String {
    let name = name.split('@').next().unwrap_or(name);
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((_, tag)) if !tag.is_empty() => tag.to_string(),
        _ => name.to_string(),
    }
}

/// A fresh random-enough identifier (time, pid and a counter, hashed).
fn new_id(kind: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let h = Sha256::digest(format!("{kind}-{t}-{}-{n}", std::process::id()).as_bytes());
    hex::encode(&h[..13])
}

fn time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

/// Status messages as progress events.
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

/// The session's shared key, as buildx makes it: the context directory's name and this
/// machine's node id. A gateway hashes on it, so repeated builds of one project from one
/// machine land on the worker that has its files and cache.
fn shared_key(locals: &HashMap<String, PathBuf>) -> String {
    let Some(ctx) = locals.get("context") else {
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
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
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
fn bridge_request<T>(build_ref: &str, msg: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    let value = build_ref
        .parse()
        .map_err(|_| Error::Options(format!("build ref {build_ref:?} is not a header value")))?;
    r.metadata_mut()
        .insert(kiln_proto::metadata::BUILD_ID, value);
    Ok(r)
}

/// What a failed call says: the daemon's own message, or, when the connection itself broke
/// (tonic then reports a bare "transport error" with the cause as its source), which
/// address was lost and why.
fn failure(addr: &str, s: &tonic::Status) -> String {
    use std::error::Error as _;
    let Some(mut source) = s.source() else {
        return s.message().to_string();
    };
    let mut causes = vec![source.to_string()];
    while let Some(next) = source.source() {
        causes.push(next.to_string());
        source = next;
    }
    causes.dedup();
    causes.retain(|c| c != s.message());
    format!(
        "lost the connection to {addr} during the build ({}: {})",
        s.message(),
        causes.join(": ")
    )
}

fn bridge_error(call: &str, s: &tonic::Status) -> Error {
    Error::Build {
        code: s.code(),
        message: format!("{call}: {}", s.message()),
        worker: worker_header(s.metadata()),
    }
}

/// The client side of the LLBBridge path: Ping, Solve, then Return with the result (or
/// the error), all tagged with the build's ref.
async fn drive_bridge(channel: Channel, build_ref: String, solve: gw::SolveRequest) -> Result<()> {
    let mut bridge = gw::llb_bridge_client::LlbBridgeClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let pong = bridge
        .ping(bridge_request(&build_ref, gw::PingRequest {})?)
        .await
        .map_err(|s| bridge_error("LLBBridge.Ping", &s))?
        .into_inner();
    let has = |id: &str| {
        pong.frontend_api_caps
            .iter()
            .any(|c| c.id == id && c.enabled)
    };
    if !has("return") {
        return Err(Error::Build {
            code: tonic::Code::Unimplemented,
            message: "the daemon does not support LLBBridge.Return (capability \"return\")".into(),
            worker: None,
        });
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
        .map_err(|s| bridge_error("LLBBridge.Return", &s))?;
    outcome.map(|_| ()).map_err(|s| Error::Build {
        code: s.code(),
        message: s.message().to_string(),
        worker: worker_header(s.metadata()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn reference_names_are_tags_as_buildctl_derives_them() {
        assert_eq!(reference_name("docker.io/library/a:1"), "1");
        assert_eq!(reference_name("localhost:5000/a/b:v2"), "v2");
        assert_eq!(reference_name("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(reference_name("a:1@sha256:abcd"), "1");
    }

    #[test]
    fn layout_index_adds_names_and_replaces_the_same_name() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let manifest = b"{}";
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(manifest)));
        std::fs::create_dir_all(dir.path().join("blobs/sha256"))?;
        std::fs::write(
            dir.path()
                .join("blobs/sha256")
                .join(&digest["sha256:".len()..]),
            manifest,
        )?;
        let desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": 2,
        });
        let resp = |name: Option<&str>| {
            let mut r = BTreeMap::from([(
                "containerimage.descriptor".to_string(),
                base64::engine::general_purpose::STANDARD.encode(desc.to_string()),
            )]);
            if let Some(n) = name {
                r.insert("image.name".into(), n.into());
            }
            r
        };
        write_layout_index(dir.path(), &resp(None))?;
        write_layout_index(dir.path(), &resp(Some("example.com/a:1,example.com/a:2")))?;
        // The same name again replaces its entry.
        write_layout_index(dir.path(), &resp(Some("example.com/a:1")))?;
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json"))?)?;
        let refs: Vec<&str> = index["manifests"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(refs, vec!["latest", "2", "1"], "{index}");
        assert!(dir.path().join("oci-layout").is_file());

        // A descriptor naming a manifest the directory lacks is refused, naming it.
        let missing = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", "0".repeat(64)),
            "size": 2,
        });
        let err = put_index(dir.path(), &missing, &[(None, "x".into())])
            .err()
            .ok_or_else(|| anyhow::anyhow!("accepted"))?;
        assert!(err.to_string().contains(&"0".repeat(64)), "{err}");
        // Garbage from the daemon is an error, not a panic.
        let bad = BTreeMap::from([("containerimage.descriptor".to_string(), "!!".to_string())]);
        assert!(write_layout_index(dir.path(), &bad).is_err());
        Ok(())
    }
}
