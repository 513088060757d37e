//! BuildKit's `moby.buildkit.v1.Control` service over the [`Engine`]: Session (the client's
//! nested connection, see [`crate::session`]), Solve (a raw LLB definition, or
//! `dockerfile.v0` with the context and Dockerfile fetched over the build's session),
//! Status (the job's progress, replayed from the start for late callers, and from the
//! build history once the job is gone), ListWorkers, Info, DiskUsage, Prune,
//! ListenBuildHistory and UpdateBuildHistory ([`history`]), and the gRPC health service.
//! Outputs go back to the client over the session's FileSend; registry credentials and
//! secrets come from the client's session. Errors become `tonic::Status` here and nowhere
//! else.
//!
//! A Solve with neither frontend nor definition is driven by the client over LLBBridge
//! ([`bridge`]), as current buildctl and buildx do.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use kiln_proto::grpc::health::v1 as health;
use kiln_proto::moby::buildkit::v1 as api;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{BuildRequest, Engine, ExportRequest, Frontend};
use crate::frontend::BuildOpts;
use crate::image::Platform;
use crate::progress::{Event, Progress, Step};
use crate::session::filesync::{receive, ReceiveOptions};
use crate::session::manager::{SessionManager, LOOKUP_WAIT};

mod bridge;
mod history;

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long Status waits for a build that has not started yet, and how long a finished
/// build's progress stays available (BuildKit's tolerances).
const STATUS_WAIT: Duration = Duration::from_secs(6);
const KEEP_FINISHED: Duration = Duration::from_secs(10);

/// One build's progress, kept whole so late Status callers see it from the start.
#[derive(Default)]
struct Job {
    events: Mutex<Vec<Event>>,
    done: std::sync::atomic::AtomicBool,
    changed: Notify,
}

/// The Control service.
#[derive(Clone)]
pub struct ControlService {
    engine: Arc<Engine>,
    jobs: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    registered: Arc<Notify>,
    worker_id: String,
    sessions: SessionManager,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    bridges: Arc<Mutex<HashMap<String, Arc<bridge::BridgeJob>>>>,
    local_locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
    history: Arc<history::History>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

// === impl ControlService ===

impl ControlService {
    /// A service over `engine`; `worker_id` names this worker in ListWorkers.
    pub fn new(engine: Arc<Engine>, worker_id: impl Into<String>) -> ControlService {
        let history = Arc::new(history::History::open(
            &engine.worker().root.join("history"),
        ));
        ControlService {
            engine,
            history,
            jobs: Default::default(),
            registered: Arc::new(Notify::new()),
            worker_id: worker_id.into(),
            sessions: SessionManager::new(),
            metrics: None,
            bridges: Default::default(),
            local_locks: Default::default(),
            draining: Default::default(),
        }
    }

    /// Shares `flag`: while it is set the worker is shutting down and refuses new builds
    /// (`Unavailable`); running ones, and their LLBBridge and session calls, go on.
    pub fn with_draining(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> ControlService {
        self.draining = flag;
        self
    }

    /// Counts builds and sessions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> ControlService {
        self.metrics = Some(metrics);
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> api::control_server::ControlServer<ControlService> {
        api::control_server::ControlServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    }

    /// The open session `id` (waiting for it a little, as BuildKit does), or a
    /// `FailedPrecondition` saying why the build needed it.
    async fn client_session(
        &self,
        id: &str,
        purpose: &str,
    ) -> Result<crate::session::manager::Session, Status> {
        self.sessions.get(id, LOOKUP_WAIT).await.ok_or_else(|| {
            Status::failed_precondition(format!("{purpose}, and there is no active session {id:?}"))
        })
    }

    /// Marks a job done; its progress stays readable for a while.
    fn finish(&self, r#ref: &str, job: &Job) {
        job.done.store(true, std::sync::atomic::Ordering::SeqCst);
        job.changed.notify_waiters();
        let jobs = self.jobs.clone();
        let r = r#ref.to_string();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(KEEP_FINISHED).await;
                    if let Ok(mut j) = jobs.lock() {
                        j.remove(&r);
                    }
                });
            }
            // Outside a runtime (a Solve future dropped at shutdown): forget it now.
            Err(_) => {
                if let Ok(mut j) = jobs.lock() {
                    j.remove(&r);
                }
            }
        }
    }

    /// Where the context of a session with a non-empty shared key is kept between builds
    /// (`root/locals/<hash of local name and key>`), locked for this build: a rebuild from
    /// the same client and directory requests only the files that changed.
    async fn shared_context_dir(
        &self,
        local: &str,
        shared_key: &str,
    ) -> Result<Option<(PathBuf, tokio::sync::OwnedMutexGuard<()>)>, Status> {
        use sha2::Digest as _;
        if shared_key.is_empty() {
            return Ok(None);
        }
        let hash = hex::encode(sha2::Sha256::digest(
            format!("{local}:{shared_key}").as_bytes(),
        ));
        let dir = self.engine.worker().root.join("locals").join(&hash[..32]);
        let lock = {
            let mut locks = self
                .local_locks
                .lock()
                .map_err(|_| Status::internal("lock table poisoned"))?;
            locks.entry(dir.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some((dir, guard)))
    }

    /// Gets a Dockerfile build's context: from the remote its `context` attribute names
    /// ([`fetch_remote_locals`](Self::fetch_remote_locals)), else from the client's session.
    pub(super) async fn fetch_context(
        &self,
        session_id: &str,
        attrs: &HashMap<String, String>,
        build: &mut BuildRequest,
        progress: &Progress,
    ) -> Result<Fetched, Status> {
        match attrs.get("context").and_then(|c| super::remote::parse(c)) {
            Some(remote) => {
                self.fetch_remote_locals(session_id, attrs, &remote, build, progress)
                    .await
            }
            None => self.fetch_locals(session_id, build, progress).await,
        }
    }

    /// Materializes a remote (git or http) context on the worker and points the build's
    /// context local at it; the Dockerfile comes from it too unless the client sends one
    /// under `dockerfilekey`. Git credentials are the session's `GIT_AUTH_TOKEN` or
    /// `GIT_AUTH_HEADER` secrets.
    async fn fetch_remote_locals(
        &self,
        session_id: &str,
        attrs: &HashMap<String, String>,
        remote: &super::remote::RemoteContext,
        build: &mut BuildRequest,
        progress: &Progress,
    ) -> Result<Fetched, Status> {
        let shown = attrs.get("context").cloned().unwrap_or_default();
        let shown = crate::source::git::redact(&shown);
        let mut secrets = build.secrets.clone();
        if let Some(s) = &build.session {
            for id in [
                crate::source::git::DEFAULT_TOKEN_SECRET,
                crate::source::git::DEFAULT_HEADER_SECRET,
            ] {
                if let (false, Ok(Some(v))) = (secrets.contains_key(id), s.secret(id).await) {
                    secrets.insert(id.to_string(), v);
                }
            }
        }
        let keep_git_dir = matches!(
            attrs
                .get("build-arg:BUILDKIT_CONTEXT_KEEP_GIT_DIR")
                .map(String::as_str),
            Some("1" | "true")
        );
        let base = self.engine.worker().root.join("mounts");
        std::fs::create_dir_all(&base).map_err(|e| Status::internal(e.to_string()))?;
        let tmp = tempfile::Builder::new()
            .prefix("remote-")
            .tempdir_in(&base)
            .map_err(|e| Status::internal(e.to_string()))?;
        let step = Step::start(
            progress,
            &format!("{session_id}-remote-context"),
            &format!("[internal] load remote build context {shown}"),
        );
        let got = super::remote::materialize(
            &self.engine.worker().root,
            remote,
            attrs.get("contextsubdir").map(String::as_str),
            keep_git_dir,
            &secrets,
            tmp.path(),
        )
        .await;
        let got = match got {
            Ok(g) => {
                step.finish(None);
                g
            }
            Err(e) => {
                step.finish(Some(e.to_string()));
                return Err(Status::failed_precondition(format!(
                    "fetching the remote build context {shown}: {e}"
                )));
            }
        };
        let Frontend::Dockerfile {
            opts,
            dockerfile_local,
        } = &mut build.frontend
        else {
            return Err(Status::internal("not a Dockerfile build"));
        };
        if attrs.contains_key("dockerfilekey") {
            // The client's Dockerfile wins over the remote's.
            let session = self
                .sessions
                .get(session_id, LOOKUP_WAIT)
                .await
                .ok_or_else(|| {
                    Status::failed_precondition(format!("no active session for {session_id}"))
                })?;
            let df_dir = tmp.path().join("client-dockerfile");
            let wanted = ReceiveOptions {
                include_patterns: vec![opts.filename.clone()],
                ..Default::default()
            };
            receive(session.channel.clone(), dockerfile_local, &df_dir, &wanted)
                .await
                .map_err(|e| {
                    Status::failed_precondition(format!(
                        "fetching the Dockerfile over session {session_id}: {e}"
                    ))
                })?;
            build.locals.insert(dockerfile_local.clone(), df_dir);
        } else {
            if let Some(f) = &got.filename {
                opts.filename = f.clone();
            }
            build
                .locals
                .insert(dockerfile_local.clone(), got.dockerfile);
        }
        build.locals.insert(opts.context_name.clone(), got.context);
        Ok(Fetched {
            _prefetch: None,
            _tmp: Some(tmp),
            _locks: Vec::new(),
        })
    }

    /// Fetches the Dockerfile and the context (minus `.dockerignore`d paths) from the
    /// client's session and points the build's locals at them: into a temporary directory,
    /// or, for the context of a session with a shared key, into the directory kept for it.
    async fn fetch_locals(
        &self,
        session_id: &str,
        build: &mut BuildRequest,
        progress: &Progress,
    ) -> Result<Fetched, Status> {
        let Frontend::Dockerfile {
            opts,
            dockerfile_local,
        } = &mut build.frontend
        else {
            return Err(Status::internal("not a Dockerfile build"));
        };
        let session = self
            .sessions
            .get(session_id, LOOKUP_WAIT)
            .await
            .ok_or_else(|| {
                Status::failed_precondition(format!("no active session for {session_id}"))
            })?;
        let base = self.engine.worker().root.join("mounts");
        std::fs::create_dir_all(&base).map_err(|e| Status::internal(e.to_string()))?;
        let tmp = tempfile::Builder::new()
            .prefix("session-")
            .tempdir_in(&base)
            .map_err(|e| Status::internal(e.to_string()))?;
        let key = &session.headers.shared_key;
        let shared = self.shared_context_dir(&opts.context_name, key).await?;
        // The Dockerfile and the context's .dockerignore are kept between builds as the
        // context is (in their own directories: a transfer replaces what its directory
        // holds), so an unchanged one costs a listing and no file request.
        let shared_df = self
            .shared_context_dir(&format!("{dockerfile_local}#dockerfile"), key)
            .await?;
        let shared_ignore = self
            .shared_context_dir(&format!("{}#dockerignore", opts.context_name), key)
            .await?;
        let step = Step::start(
            progress,
            &format!("{session_id}-dockerfile"),
            "[internal] load the Dockerfile and .dockerignore from the client",
        );
        let kept = |d: &Option<(PathBuf, _)>, name: &str| match d {
            Some((dir, _)) => dir.clone(),
            None => tmp.path().join(name),
        };
        let df_dir = kept(&shared_df, "dockerfile");
        let ignore_dir = kept(&shared_ignore, "ignore");
        let ctx_dir = kept(&shared, "context");
        let filename = opts.filename.clone();
        // `<Dockerfile>.dockerignore` beside the Dockerfile wins over the context's.
        let ignore_text = || {
            std::fs::read_to_string(df_dir.join(format!("{filename}.dockerignore")))
                .or_else(|_| std::fs::read_to_string(ignore_dir.join(".dockerignore")))
                .unwrap_or_default()
        };
        let reads_context = || {
            crate::snapshot::resolve_in_root(&df_dir, &filename, true)
                .ok()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .is_some_and(|src| crate::frontend::dockerfile::may_read_context(&src))
        };
        let context_fetch = |ignore: &str| ContextFetch {
            channel: session.channel.clone(),
            name: opts.context_name.clone(),
            dir: ctx_dir.clone(),
            opts: ReceiveOptions {
                exclude_patterns: crate::source::local::patterns::parse_dockerignore(ignore),
                ..Default::default()
            },
            session: session_id.to_string(),
            progress: progress.clone(),
        };
        // With a shared key the last build's Dockerfile and .dockerignore are kept: when
        // that Dockerfile read its context, the context's transfer starts now, with that
        // .dockerignore, beside the Dockerfile's. It stands if the .dockerignore is
        // unchanged (the usual rebuild): no round trip to the client waits for another.
        let speculative = (shared.is_some() && shared_df.is_some() && shared_ignore.is_some())
            .then(|| reads_context().then(ignore_text))
            .flatten()
            .map(|old| {
                let started = context_fetch(&old).start();
                (old, started)
            });
        let fetch = async {
            let wanted = ReceiveOptions {
                include_patterns: vec![
                    opts.filename.clone(),
                    format!("{}.dockerignore", opts.filename),
                ],
                ..Default::default()
            };
            let ignore = ReceiveOptions {
                include_patterns: vec![".dockerignore".into()],
                ..Default::default()
            };
            // The two small transfers are independent: both at once, one set of round
            // trips to the client.
            tokio::try_join!(
                receive(session.channel.clone(), dockerfile_local, &df_dir, &wanted),
                receive(
                    session.channel.clone(),
                    &opts.context_name,
                    &ignore_dir,
                    &ignore,
                ),
            )?;
            Ok::<_, crate::session::SessionError>(ignore_text())
        };
        match fetch.await {
            Ok(text) => {
                step.finish(None);
                // A Dockerfile that copies from its context gets it while its base images
                // resolve; the others get it only if the converted build names it (one
                // session round trip and a listing of the whole context fewer).
                let prefetch = reads_context();
                let started = match speculative {
                    Some((old, started)) if old == text => Some(started),
                    Some((_, started)) => {
                        // Other exclusions: stop the transfer before another writes there.
                        started.stop().await;
                        prefetch.then(|| context_fetch(&text).start())
                    }
                    None => prefetch.then(|| context_fetch(&text).start()),
                };
                let (deferred, prefetch) = match started {
                    Some(started) => {
                        let (deferred, guard) = started.deferred();
                        (deferred, Some(guard))
                    }
                    None => {
                        let context = context_fetch(&text);
                        (
                            super::DeferredLocal::new(move || Box::pin(context.clone().fetch())),
                            None,
                        )
                    }
                };
                build
                    .locals
                    .insert(dockerfile_local.clone(), df_dir.clone());
                opts.dockerignore = Some(text);
                build
                    .deferred_locals
                    .insert(opts.context_name.clone(), deferred);
                Ok(Fetched {
                    _prefetch: prefetch,
                    _tmp: Some(tmp),
                    _locks: [shared, shared_df, shared_ignore]
                        .into_iter()
                        .flatten()
                        .map(|(_, g)| g)
                        .collect(),
                })
            }
            Err(e) => {
                step.finish(Some(e.to_string()));
                Err(Status::failed_precondition(format!(
                    "fetching the build context over session {session_id}: {e}"
                )))
            }
        }
    }

    /// Fetches every `local://NAME` directory a raw LLB definition reads from the client's
    /// session (its `local.session` attribute, else the build's session), letting the
    /// client apply the source's exclude patterns and follow paths, and points the build's
    /// locals at them.
    async fn fetch_llb_locals(
        &self,
        session_id: &str,
        build: &mut BuildRequest,
        progress: &Progress,
    ) -> Result<Option<Fetched>, Status> {
        use kiln_proto::prost::Message as _;
        let Frontend::Llb(def) = &build.frontend else {
            return Ok(None);
        };
        let mut wanted: BTreeMap<String, (String, ReceiveOptions)> = BTreeMap::new();
        for raw in &def.def {
            let Ok(op) = kiln_proto::pb::Op::decode(raw.as_slice()) else {
                continue; // reported by the solve
            };
            let Some(kiln_proto::pb::op::Op::Source(src)) = &op.op else {
                continue;
            };
            let Some(name) = src.identifier.strip_prefix("local://") else {
                continue;
            };
            let list = |key: &str| -> Result<Vec<String>, Status> {
                match src.attrs.get(key).filter(|v| !v.is_empty()) {
                    None => Ok(Vec::new()),
                    Some(v) => serde_json::from_str(v)
                        .map_err(|e| Status::invalid_argument(format!("local {name}: {key}: {e}"))),
                }
            };
            let session = src
                .attrs
                .get("local.session")
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| session_id.to_string());
            let opts = ReceiveOptions {
                include_patterns: list("local.includepattern")?
                    .into_iter()
                    .chain(list("local.includepatterns")?)
                    .collect(),
                exclude_patterns: list("local.excludepatterns")?,
                follow_paths: list("local.followpaths")?,
            };
            wanted.insert(name.to_string(), (session, opts));
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let base = self.engine.worker().root.join("mounts");
        std::fs::create_dir_all(&base).map_err(|e| Status::internal(e.to_string()))?;
        let tmp = tempfile::Builder::new()
            .prefix("locals-")
            .tempdir_in(&base)
            .map_err(|e| Status::internal(e.to_string()))?;
        for (i, (name, (session_id, opts))) in wanted.into_iter().enumerate() {
            // `prefix:id` names the session by the part after the first colon.
            let id = session_id
                .split_once(':')
                .map(|(_, id)| id)
                .unwrap_or(&session_id);
            let session = self.sessions.get(id, LOOKUP_WAIT).await.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "local {name}: no active session {session_id:?} to read it from"
                ))
            })?;
            let step = Step::start(
                progress,
                &format!("local-{name}"),
                &format!("[internal] load local {name} from the client"),
            );
            let dest = tmp.path().join(format!("local-{i}"));
            match receive(session.channel.clone(), &name, &dest, &opts).await {
                Ok(_) => step.finish(None),
                Err(e) => {
                    step.finish(Some(e.to_string()));
                    return Err(Status::failed_precondition(format!(
                        "local {name}: {}",
                        crate::solver::error_chain(&e)
                    )));
                }
            }
            build.locals.insert(name, dest);
        }
        Ok(Some(Fetched {
            _prefetch: None,
            _tmp: Some(tmp),
            _locks: Vec::new(),
        }))
    }

    /// Registers a job under `ref` and starts collecting its progress.
    #[allow(clippy::type_complexity)]
    fn start_job(
        &self,
        r#ref: &str,
    ) -> Result<(Arc<Job>, Progress, tokio::task::JoinHandle<()>), Status> {
        let job = Arc::new(Job::default());
        {
            let mut jobs = self
                .jobs
                .lock()
                .map_err(|_| Status::internal("job table poisoned"))?;
            if jobs.contains_key(r#ref) {
                return Err(Status::already_exists(format!(
                    "a build with ref {ref} is already running"
                )));
            }
            jobs.insert(r#ref.to_string(), job.clone());
        }
        self.registered.notify_waiters();
        let (progress, mut rx) = Progress::channel();
        let collector = {
            let job = job.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    if let Ok(mut evs) = job.events.lock() {
                        evs.push(ev);
                    }
                    job.changed.notify_waiters();
                }
            })
        };
        Ok((job, progress, collector))
    }

    /// The classic path: the frontend (or a definition) is in the Solve itself.
    async fn solve_classic(
        &self,
        req: &api::SolveRequest,
        mut build: BuildRequest,
        exports: &[ExportRequest],
        caches: &CacheOpts,
        progress: &Progress,
        cancel: CancellationToken,
    ) -> Result<super::BuildResponse, Status> {
        build.session = Some(Arc::new(crate::session::attachables::SessionClient::new(
            self.sessions.clone(),
            req.session.clone(),
        )));
        // The Dockerfile and context come from the client over the build's session.
        let fetched = match &build.frontend {
            Frontend::Dockerfile { .. } => Some(
                self.fetch_context(&req.session, &req.frontend_attrs, &mut build, progress)
                    .await?,
            ),
            Frontend::Llb(_) => {
                self.fetch_llb_locals(&req.session, &mut build, progress)
                    .await?
            }
        };
        let solved = self
            .engine
            .solve_with_cache(&build, &caches.imports, progress, cancel)
            .await
            .map_err(engine_status)?;
        drop(fetched);
        self.export_solved(&solved, exports, caches, progress).await
    }

    /// Writes a solved build's outputs and cache exports, then queues its results for the
    /// pool cache (after the exports, so the pool reuses the blobs they made).
    async fn export_solved(
        &self,
        solved: &super::SolvedBuild,
        exports: &[ExportRequest],
        caches: &CacheOpts,
        progress: &Progress,
    ) -> Result<super::BuildResponse, Status> {
        let resp = self
            .engine
            .export_result_with_cache(solved, exports, &caches.exports, progress)
            .await
            .map_err(engine_status)?;
        self.engine
            .queue_pool_export(solved)
            .map_err(engine_status)?;
        Ok(resp)
    }

    /// This worker as ListWorkers and Ping describe it.
    fn worker_record(&self) -> api::types::WorkerRecord {
        let mut labels = BTreeMap::new();
        labels.insert(
            "org.mobyproject.buildkit.worker.executor".to_string(),
            "oci".to_string(),
        );
        labels.insert(
            "org.mobyproject.buildkit.worker.snapshotter".to_string(),
            match self.engine.worker().snapshotter.kind() {
                crate::snapshot::Kind::Overlay => "overlayfs".to_string(),
                crate::snapshot::Kind::Copy => "native".to_string(),
            },
        );
        labels.insert(
            "org.mobyproject.buildkit.worker.hostname".to_string(),
            self.worker_id.clone(),
        );
        api::types::WorkerRecord {
            id: self.worker_id.clone(),
            labels: labels.into_iter().collect(),
            platforms: vec![Platform::host().to_pb()],
            buildkit_version: Some(version()),
            ..Default::default()
        }
    }

    fn job(&self, r#ref: &str) -> Option<Arc<Job>> {
        self.jobs.lock().ok()?.get(r#ref).cloned()
    }

    fn request(req: &api::SolveRequest) -> Result<BuildRequest, Status> {
        if !req.session.is_empty() {
            tracing::debug!(session = %req.session, "solve names a session");
        }
        let frontend = match (req.frontend.as_str(), &req.definition) {
            ("", Some(def)) if !def.def.is_empty() => Frontend::Llb(def.clone()),
            ("", _) => {
                return Err(Status::internal(
                    "a solve without a definition goes over LLBBridge",
                ))
            }
            ("dockerfile.v0", _) => {
                if req.session.is_empty() {
                    return Err(Status::failed_precondition(
                        "dockerfile.v0 needs the client's files: the solve names no session",
                    ));
                }
                dockerfile_frontend(&req.frontend_attrs)?
            }
            (other, _) => {
                return Err(Status::invalid_argument(format!(
                    "unknown frontend {other:?} (supported: none, with an LLB definition)"
                )))
            }
        };
        Ok(BuildRequest {
            frontend,
            locals: HashMap::new(),
            deferred_locals: Default::default(),
            exports: Vec::new(),
            session: None,
            secrets: HashMap::new(),
        })
    }

    /// The outputs a Solve asks for.
    fn exports(req: &api::SolveRequest) -> Result<Vec<ExportRequest>, Status> {
        let mut exports = Vec::new();
        // Clients send the first exporter twice: in Exporters and in the deprecated fields.
        if req.exporters.is_empty() && !req.exporter_deprecated.is_empty() {
            exports.push(ExportRequest {
                typ: req.exporter_deprecated.clone(),
                attrs: req
                    .exporter_attrs_deprecated
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                dest: None,
            });
        }
        for e in &req.exporters {
            exports.push(ExportRequest {
                typ: e.r#type.clone(),
                attrs: e
                    .attrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                dest: None,
            });
        }
        let mut layouts = 0;
        for e in &exports {
            if matches!(e.typ.as_str(), "oci" | "docker")
                && !super::tar_output(e).map_err(|e| Status::invalid_argument(e.to_string()))?
            {
                layouts += 1;
            }
        }
        if layouts > 1 {
            return Err(Status::invalid_argument(
                "at most one oci/docker output with tar=false: they share the client's content store \"export\"",
            ));
        }
        Ok(exports)
    }

    /// The cache imports and exports a Solve asks for. `type=local` caches live on the
    /// client: [`Self::stage_local_caches`] points them at scratch layouts on this worker.
    fn cache_opts(req: &api::SolveRequest) -> Result<CacheOpts, Status> {
        use crate::cache::registry::{self, CacheEntry, Target};
        let entries = |v: &[api::CacheOptionsEntry]| -> Vec<CacheEntry> {
            v.iter()
                .map(|e| CacheEntry {
                    typ: e.r#type.clone(),
                    attrs: e.attrs.clone().into_iter().collect(),
                })
                .collect()
        };
        let bad = |e: registry::Error| Status::invalid_argument(e.to_string());
        let Some(cache) = &req.cache else {
            return Ok(CacheOpts::default());
        };
        let imports = entries(&cache.imports)
            .iter()
            .map(registry::parse_import)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let exports = registry::parse_exports(&entries(&cache.exports)).map_err(bad)?;
        let local_exports = exports
            .iter()
            .filter(|e| matches!(e.target, Target::Layout { .. }))
            .count();
        if local_exports > 1 {
            return Err(Status::invalid_argument(
                "at most one type=local cache export (its manifest comes back as cache.manifest)",
            ));
        }
        Ok(CacheOpts {
            imports,
            exports,
            staged: None,
        })
    }

    /// Moves `type=local` caches onto this worker: each import's manifest and blobs are
    /// read from the client's content store `local:<src>` into a scratch layout, and each
    /// export is pointed at a scratch layout that [`Self::deliver_caches`] uploads to
    /// `local:<dest>` after the build.
    async fn stage_local_caches(
        &self,
        session_id: &str,
        caches: &mut CacheOpts,
        progress: &Progress,
    ) -> Result<(), Status> {
        use crate::cache::registry::Target;
        use crate::session::content;
        let local = caches
            .imports
            .iter()
            .map(|i| &i.target)
            .chain(caches.exports.iter().map(|e| &e.target))
            .any(|t| matches!(t, Target::Layout { .. }));
        if !local {
            return Ok(());
        }
        let session = self
            .client_session(session_id, "type=local caches live on the client")
            .await?;
        if !session.headers.supports(content::READ) || !session.headers.supports(content::WRITE) {
            return Err(Status::failed_precondition(
                "type=local caches go through the client's content store, and its session serves none (Content.Read/Write)",
            ));
        }
        let base = self.engine.worker().root.join("mounts");
        std::fs::create_dir_all(&base).map_err(|e| Status::internal(e.to_string()))?;
        let tmp = tempfile::Builder::new()
            .prefix("caches-")
            .tempdir_in(&base)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut staged = StagedCaches {
            _tmp: None,
            exports: Vec::new(),
        };
        // A cache that cannot be read is a miss, not a failed build (as without a daemon).
        let mut missed = Vec::new();
        for (i, import) in caches.imports.iter_mut().enumerate() {
            let Target::Layout { dir, digest, .. } = &mut import.target else {
                continue;
            };
            let store = format!("local:{}", dir.display());
            let Some(manifest) = digest.clone() else {
                progress.warn(
                    None,
                    format!(
                        "type=local cache import {} through a daemon needs its manifest digest (kiln build sets digest= from index.json); building without this cache",
                        dir.display()
                    ),
                );
                missed.push(i);
                continue;
            };
            let step = Step::start(
                progress,
                &format!("cache-import-{i}"),
                &format!("reading cache {} from the client", dir.display()),
            );
            let scratch = tmp.path().join(format!("import-{i}"));
            let res = fetch_layout(session.channel.clone(), &store, &manifest, &scratch).await;
            step.finish(None);
            if let Err(e) = res {
                progress.warn(
                    None,
                    format!("{}; building without this cache", e.message()),
                );
                missed.push(i);
                continue;
            }
            *dir = scratch;
        }
        caches.imports = std::mem::take(&mut caches.imports)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !missed.contains(i))
            .map(|(_, import)| import)
            .collect();
        for (i, export) in caches.exports.iter_mut().enumerate() {
            let Target::Layout { dir, tag, .. } = &mut export.target else {
                continue;
            };
            let store = format!("local:{}", dir.display());
            let scratch = tmp.path().join(format!("export-{i}"));
            staged.exports.push((store, tag.clone(), scratch.clone()));
            *dir = scratch;
        }
        staged._tmp = Some(tmp);
        caches.staged = Some(staged);
        Ok(())
    }

    /// Uploads the staged `type=local` cache exports to the client's stores and returns
    /// the `cache.manifest` exporter response (the manifest's OCI descriptor as plain JSON,
    /// not base64, as BuildKit sends it: shared/design/buildkit-wire.md §9.4).
    async fn deliver_caches(
        &self,
        session_id: &str,
        caches: &CacheOpts,
        progress: &Progress,
    ) -> Result<Option<String>, Status> {
        let Some(staged) = caches.staged.as_ref().filter(|s| !s.exports.is_empty()) else {
            return Ok(None);
        };
        let session = self
            .client_session(
                session_id,
                "type=local caches go back over the client's session",
            )
            .await?;
        let mut manifest = None;
        for (store, tag, dir) in &staged.exports {
            if !dir.join("index.json").exists() {
                // The export failed and was ignored (ignore-error=true): nothing to send.
                continue;
            }
            let step = Step::start(
                progress,
                "cache-export-send",
                &format!("sending cache to the client ({store})"),
            );
            let res = async {
                let index: serde_json::Value = std::fs::read(dir.join("index.json"))
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                    .map_err(|e| Status::internal(format!("staged cache index: {e}")))?;
                let desc = index["manifests"]
                    .as_array()
                    .and_then(|ms| {
                        ms.iter().find(|m| {
                            m["annotations"]["org.opencontainers.image.ref.name"].as_str()
                                == Some(tag.as_str())
                        })
                    })
                    .cloned()
                    .ok_or_else(|| Status::internal("staged cache index has no entry"))?;
                upload_layout(session.channel.clone(), dir, store)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "sending the cache to the client: {}",
                            crate::solver::error_chain(&e)
                        ))
                    })?;
                let desc = serde_json::json!({
                    "mediaType": desc["mediaType"],
                    "digest": desc["digest"],
                    "size": desc["size"],
                });
                Ok::<_, Status>(desc.to_string())
            }
            .await;
            step.finish(res.as_ref().err().map(|e| e.message().to_string()));
            manifest = Some(res?);
        }
        Ok(manifest)
    }

    /// Points every output that goes back to the client (`local`, `tar`, `oci`, `docker`)
    /// at a scratch path on this worker, from where [`Self::deliver`] sends it.
    fn client_outputs(
        &self,
        exports: &mut [ExportRequest],
    ) -> Result<Option<ClientOutputs>, Status> {
        if exports.iter().all(|e| e.typ == "image") {
            return Ok(None);
        }
        let base = self.engine.worker().root.join("mounts");
        std::fs::create_dir_all(&base).map_err(|e| Status::internal(e.to_string()))?;
        let tmp = tempfile::Builder::new()
            .prefix("outputs-")
            .tempdir_in(&base)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut sends = Vec::new();
        for (i, e) in exports.iter_mut().enumerate() {
            if e.typ == "image" {
                continue;
            }
            let path = tmp.path().join(format!("output-{i}"));
            e.dest = Some(path.clone());
            let how = if e.typ == "local" {
                Delivery::Dir
            } else if matches!(e.typ.as_str(), "oci" | "docker")
                && !super::tar_output(e).map_err(|e| Status::invalid_argument(e.to_string()))?
            {
                Delivery::Store
            } else {
                Delivery::File
            };
            sends.push((i, how, path));
        }
        Ok(Some(ClientOutputs { _tmp: tmp, sends }))
    }

    /// Sends the outputs prepared by [`Self::client_outputs`] to the client: over FileSend,
    /// or (`tar=false` layouts) into its content store `export`.
    async fn deliver(
        &self,
        session_id: &str,
        outputs: &ClientOutputs,
        response: &super::BuildResponse,
        progress: &Progress,
    ) -> Result<(), Status> {
        let session = self
            .client_session(session_id, "outputs go back to the client over its session")
            .await?;
        for (_, how, _) in &outputs.sends {
            let (method, what) = match how {
                Delivery::Store => (
                    crate::session::content::WRITE,
                    "the client's session serves no content store for tar=false outputs (Content.Write)",
                ),
                _ => (
                    crate::session::filesend::DIFF_COPY,
                    "the client's session does not accept outputs (it serves no FileSend)",
                ),
            };
            if !session.headers.supports(method) {
                return Err(Status::failed_precondition(what));
            }
        }
        let step = Step::start(progress, "send-outputs", "sending outputs to the client");
        let mut res = Ok(());
        for (index, how, path) in &outputs.sends {
            let sent = match how {
                Delivery::Dir => {
                    crate::session::filesend::send_dir(session.channel.clone(), *index, path).await
                }
                Delivery::File => {
                    crate::session::filesend::send_file(
                        session.channel.clone(),
                        *index,
                        &response.exporter_response,
                        path,
                    )
                    .await
                }
                Delivery::Store => {
                    upload_layout(
                        session.channel.clone(),
                        path,
                        crate::session::content::EXPORT_STORE,
                    )
                    .await
                }
            };
            if let Err(e) = sent {
                res = Err(Status::unavailable(format!(
                    "sending output {index} to the client: {}",
                    crate::solver::error_chain(&e)
                )));
                break;
            }
        }
        step.finish(res.as_ref().err().map(|e| e.message().to_string()));
        res
    }
}

/// A Solve's cache imports and exports, parsed.
#[derive(Default)]
pub(super) struct CacheOpts {
    imports: Vec<crate::cache::registry::ImportOpts>,
    exports: Vec<crate::cache::registry::ExportOpts>,
    /// Scratch layouts of `type=local` caches, when a Solve has some.
    staged: Option<StagedCaches>,
}

/// Scratch layouts on this worker standing in for the client's `type=local` caches.
pub(super) struct StagedCaches {
    _tmp: Option<tempfile::TempDir>,
    /// (client store ID `local:<dest>`, tag, scratch layout) per export.
    exports: Vec<(String, String, PathBuf)>,
}

/// Reads the manifest `digest` and every blob it names (config, layers, or the entries of
/// a cache index) from the client's store `store` into a new OCI layout at `dir`, with an
/// `index.json` naming the manifest by digest.
async fn fetch_layout(
    channel: tonic::transport::Channel,
    store: &str,
    digest: &str,
    dir: &std::path::Path,
) -> Result<(), Status> {
    use crate::session::content;
    let fail = |e: crate::session::SessionError| {
        Status::unavailable(format!(
            "reading cache {digest} from the client's store {store:?}: {}",
            crate::solver::error_chain(&e)
        ))
    };
    let blobs = dir.join("blobs").join("sha256");
    tokio::fs::create_dir_all(&blobs)
        .await
        .map_err(|e| Status::internal(format!("create {}: {e}", blobs.display())))?;
    let hex = content::digest_hex(digest)
        .ok_or_else(|| Status::invalid_argument(format!("cache digest {digest:?} is invalid")))?;
    let size = content::read_blob(channel.clone(), store, digest, &blobs.join(hex))
        .await
        .map_err(fail)?;
    let bytes = tokio::fs::read(blobs.join(hex))
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        Status::invalid_argument(format!(
            "cache manifest {digest} from {store:?} is not JSON: {e}"
        ))
    })?;
    let mut descs = Vec::new();
    if manifest["config"].is_object() {
        descs.push(&manifest["config"]);
    }
    for key in ["layers", "manifests"] {
        if let Some(list) = manifest[key].as_array() {
            descs.extend(list.iter());
        }
    }
    for d in descs {
        let blob = d["digest"].as_str().unwrap_or_default();
        let hex = content::digest_hex(blob).ok_or_else(|| {
            Status::invalid_argument(format!(
                "cache manifest {digest} names an invalid digest {blob:?}"
            ))
        })?;
        let dest = blobs.join(hex);
        if dest.exists() {
            continue;
        }
        let got = content::read_blob(channel.clone(), store, blob, &dest)
            .await
            .map_err(fail)?;
        if d["size"].as_u64().is_some_and(|s| s != got) {
            return Err(Status::invalid_argument(format!(
                "cache blob {blob} from {store:?} has {got} bytes, its descriptor says {}",
                d["size"]
            )));
        }
    }
    let media_type = manifest["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": media_type, "digest": digest, "size": size}],
    });
    tokio::fs::write(dir.join("index.json"), index.to_string())
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

/// Directories fetched from the client for one build, kept until the build ends: a
/// temporary directory, and the locks on shared context directories it uses.
pub(super) struct Fetched {
    /// A context transfer started ahead of the build's need (first: it stops before the
    /// directories and locks go).
    _prefetch: Option<crate::AbortOnDrop>,
    _tmp: Option<tempfile::TempDir>,
    _locks: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

/// Outputs staged on the worker on their way to the client.
struct ClientOutputs {
    _tmp: tempfile::TempDir,
    /// (exporter index, how it goes back, staged path)
    sends: Vec<(usize, Delivery, PathBuf)>,
}

/// How a staged output goes back to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// A file over FileSend (`tar`, `oci`, `docker`).
    File,
    /// A directory over FileSend (`local`).
    Dir,
    /// The blobs of an OCI layout into the client's content store `export` (`oci`,
    /// `docker` with `tar=false`); the client writes `index.json` itself.
    Store,
}

/// Uploads every `blobs/sha256/*` file of the staged layout at `dir` to the client's
/// content store `store`.
async fn upload_layout(
    channel: tonic::transport::Channel,
    dir: &std::path::Path,
    store: &str,
) -> Result<(), crate::session::SessionError> {
    use crate::session::{content, SessionError};
    let blobs = dir.join("blobs").join("sha256");
    let mut entries = tokio::fs::read_dir(&blobs)
        .await
        .map_err(|e| SessionError::io("read", &blobs, e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| SessionError::io("read", &blobs, e))?
    {
        let name = entry.file_name().to_string_lossy().to_string();
        let digest = format!("sha256:{name}");
        if content::digest_hex(&digest).is_none() {
            continue;
        }
        let meta = entry
            .metadata()
            .await
            .map_err(|e| SessionError::io("stat", entry.path(), e))?;
        content::write_blob(channel.clone(), store, &digest, meta.len(), &entry.path()).await?;
    }
    Ok(())
}

/// Ends a build whose Solve call was dropped before it finished (its client went away):
/// its history record completes as cancelled and its job finishes, so Status streams end
/// (and the job is forgotten after the usual keep time). Disarmed (`job = None`) on the
/// normal path.
struct Unfinished {
    service: ControlService,
    r#ref: String,
    job: Option<Arc<Job>>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else { return };
        tracing::warn!(r#ref = %self.r#ref, "the build's Solve call went away before it finished: recording it as cancelled");
        let cancelled = Status::cancelled("the client went away before the build finished");
        let events = job.events.lock().map(|e| e.clone()).unwrap_or_default();
        self.service
            .history
            .completed(&self.r#ref, Err(&cancelled), &events);
        self.service.finish(&self.r#ref, &job);
    }
}

/// Counts a build as in flight while it lives; a build dropped before it finished (its
/// client went away) is counted as cancelled.
struct InFlight {
    metrics: Arc<crate::metrics::Metrics>,
    started: std::time::Instant,
    finished: bool,
}

impl InFlight {
    fn new(metrics: Arc<crate::metrics::Metrics>, started: std::time::Instant) -> InFlight {
        metrics.builds_in_flight.inc();
        InFlight {
            metrics,
            started,
            finished: false,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.builds_in_flight.dec();
        self.metrics
            .build_seconds
            .observe(self.started.elapsed().as_secs_f64());
        if !self.finished {
            self.metrics
                .builds_total
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

/// The `dockerfile.v0` frontend with its attributes (`--opt`s).
fn dockerfile_frontend(attrs: &HashMap<String, String>) -> Result<Frontend, Status> {
    let attrs: BTreeMap<String, String> =
        attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let opts = BuildOpts::from_attrs(&attrs).map_err(Status::invalid_argument)?;
    Ok(Frontend::Dockerfile {
        opts,
        dockerfile_local: attrs
            .get("dockerfilekey")
            .cloned()
            .unwrap_or_else(|| "dockerfile".into()),
    })
}

/// A Dockerfile build's context, to fetch from the client's session when the build reads it.
#[derive(Clone)]
struct ContextFetch {
    channel: tonic::transport::Channel,
    name: String,
    dir: PathBuf,
    opts: ReceiveOptions,
    session: String,
    progress: Progress,
}

impl ContextFetch {
    async fn fetch(self) -> Result<PathBuf, String> {
        let step = Step::start(
            &self.progress,
            &format!("{}-context", self.session),
            "[internal] load build context from the client",
        );
        match receive(self.channel, &self.name, &self.dir, &self.opts).await {
            Ok(_) => {
                step.finish(None);
                Ok(self.dir)
            }
            Err(e) => {
                step.finish(Some(e.to_string()));
                Err(format!("over session {}: {e}", self.session))
            }
        }
    }

    /// Starts the transfer now, ahead of the build's need.
    fn start(self) -> StartedFetch {
        let task = tokio::spawn(self.fetch());
        let guard = crate::AbortOnDrop(task.abort_handle());
        StartedFetch { task, guard }
    }
}

/// A context transfer under way; dropping it stops the transfer.
struct StartedFetch {
    task: tokio::task::JoinHandle<Result<PathBuf, String>>,
    guard: crate::AbortOnDrop,
}

impl StartedFetch {
    /// Stops the transfer and waits until it has.
    async fn stop(self) {
        let StartedFetch { task, guard } = self;
        drop(guard);
        let _ = task.await;
    }

    /// The build's context as its outcome, and the guard that stops it with the build.
    fn deferred(self) -> (super::DeferredLocal, crate::AbortOnDrop) {
        use futures::FutureExt as _;
        let task = self.task;
        let shared = async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the context transfer task failed: {e}")))
        }
        .boxed()
        .shared();
        (
            super::DeferredLocal::new(move || shared.clone().boxed()),
            self.guard,
        )
    }
}

/// An engine error as the gRPC status a client sees: the whole cause chain.
fn engine_status(e: crate::Error) -> Status {
    Status::unknown(crate::solver::error_chain(&e))
}

fn ts(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(prost_types::Timestamp::from)
}

/// Progress events in the shape of `StatusResponse`.
pub fn status_response(events: &[Event]) -> api::StatusResponse {
    let mut r = api::StatusResponse::default();
    for e in events {
        match e {
            Event::Vertex(v) => r.vertexes.push(api::Vertex {
                digest: v.digest.clone(),
                inputs: v.inputs.clone(),
                name: v.name.clone(),
                cached: v.cached,
                started: ts(v.started),
                completed: ts(v.completed),
                error: v.error.clone().unwrap_or_default(),
                progress_group: None,
            }),
            Event::Status(s) => r.statuses.push(api::VertexStatus {
                id: s.id.clone(),
                vertex: s.vertex.clone(),
                name: s.name.clone(),
                current: s.current as i64,
                total: s.total as i64,
                timestamp: ts(Some(s.timestamp)),
                started: ts(s.started),
                completed: ts(s.completed),
            }),
            Event::Log(l) => r.logs.push(api::VertexLog {
                vertex: l.vertex.clone(),
                timestamp: ts(Some(l.timestamp)),
                stream: l.stream as i64,
                msg: l.data.to_vec(),
            }),
            Event::Warning(w) => r.warnings.push(api::VertexWarning {
                vertex: w.vertex.clone().unwrap_or_default(),
                level: 1,
                short: w.message.clone().into_bytes(),
                ..Default::default()
            }),
        }
    }
    r
}

#[tonic::async_trait]
impl api::control_server::Control for ControlService {
    async fn solve(
        &self,
        request: Request<api::SolveRequest>,
    ) -> Result<Response<api::SolveResponse>, Status> {
        let parent = kiln_proto::telemetry::extract(request.metadata());
        let req = request.into_inner();
        if req.r#ref.is_empty() {
            return Err(Status::invalid_argument("solve: ref is required"));
        }
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "worker {} is shutting down and takes no new builds",
                self.worker_id
            )));
        }
        // Neither a frontend nor a definition: the client drives the build itself over
        // LLBBridge (buildctl >= 0.11, buildx) and hands back its result with Return.
        let via_bridge =
            req.frontend.is_empty() && req.definition.as_ref().is_none_or(|d| d.def.is_empty());
        let build = if via_bridge {
            None
        } else {
            Some(Self::request(&req)?)
        };
        let mut exports = Self::exports(&req)?;
        let mut caches = Self::cache_opts(&req)?;
        let outputs = self.client_outputs(&mut exports)?;
        let (job, progress, collector) = self.start_job(&req.r#ref)?;
        let staged = self
            .stage_local_caches(&req.session, &mut caches, &progress)
            .await;
        self.history.started(&req);
        let mut unfinished = Unfinished {
            service: self.clone(),
            r#ref: req.r#ref.clone(),
            job: Some(job.clone()),
        };
        let span = tracing::info_span!("solve", r#ref = %req.r#ref);
        kiln_proto::telemetry::set_parent(&span, parent);
        let _enter = span.enter();
        // A client that goes away drops this future; the guard then cancels the build, which
        // stops its containers and releases its mounts.
        let cancel = CancellationToken::new();
        let _cancel_on_drop = cancel.clone().drop_guard();
        // A client that dies may leave this call pending; its session going away (closed,
        // or failing health checks) cancels the build too, as BuildKit does.
        if !req.session.is_empty() {
            let (sessions, id, token) =
                (self.sessions.clone(), req.session.clone(), cancel.clone());
            let r#ref = req.r#ref.clone();
            tokio::spawn(async move {
                if sessions.get(&id, LOOKUP_WAIT).await.is_none() {
                    tracing::debug!(%r#ref, session = %id, "no session to watch");
                    return;
                }
                tracing::debug!(%r#ref, session = %id, "watching the session");
                tokio::select! {
                    () = sessions.closed(&id) => {
                        if !token.is_cancelled() {
                            tracing::warn!(%r#ref, session = %id, "the client's session closed: cancelling the build");
                            token.cancel();
                        }
                    }
                    () = token.cancelled() => {}
                }
            });
        }
        let started = std::time::Instant::now();
        let mut in_flight = self
            .metrics
            .as_ref()
            .map(|m| InFlight::new(m.clone(), started));
        let res = match (staged, build) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(build)) => {
                self.solve_classic(&req, build, &exports, &caches, &progress, cancel)
                    .await
            }
            (Ok(()), None) => {
                self.solve_bridged(&req, &exports, &caches, &progress, cancel)
                    .await
            }
        };
        let res = match res {
            Ok(mut resp) => match self.deliver_caches(&req.session, &caches, &progress).await {
                Ok(Some(manifest)) => {
                    resp.exporter_response
                        .insert("cache.manifest".into(), manifest);
                    Ok(resp)
                }
                Ok(None) => Ok(resp),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let res = match (res, &outputs) {
            (Ok(resp), Some(outputs)) => self
                .deliver(&req.session, outputs, &resp, &progress)
                .await
                .map(|()| resp),
            (res, _) => res,
        };
        if let Some(f) = in_flight.as_mut() {
            let result = if res.is_ok() { "ok" } else { "error" };
            f.metrics.builds_total.with_label_values(&[result]).inc();
            f.finished = true;
        }
        drop(progress);
        drop(_enter);
        let _ = collector.await;
        unfinished.job = None;
        if let Ok(events) = job.events.lock() {
            self.history.completed(
                &req.r#ref,
                res.as_ref().map(|r| &r.exporter_response),
                &events,
            );
        }
        self.finish(&req.r#ref, &job);
        // The build's records are released: apply the GC policy now (in the background).
        self.engine.gc().trigger();
        match res {
            Ok(resp) => Ok(Response::new(api::SolveResponse {
                exporter_response: resp.exporter_response.into_iter().collect(),
            })),
            Err(e) => {
                tracing::error!(r#ref = %req.r#ref, error = %e.message(), "build failed");
                Err(e)
            }
        }
    }

    async fn status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<BoxStream<api::StatusResponse>>, Status> {
        let r = request.into_inner().r#ref;
        let deadline = tokio::time::Instant::now() + STATUS_WAIT;
        let job = loop {
            let notified = self.registered.notified();
            if let Some(j) = self.job(&r) {
                break j;
            }
            // A build that finished long ago: replay its stored progress from the history.
            if let Some(stored) = self.history.progress(&r) {
                let stream = futures::stream::iter(stored.into_iter().map(Ok));
                return Ok(with_timestamp(Response::new(
                    Box::pin(stream) as BoxStream<api::StatusResponse>
                )));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::not_found(format!("no such job {r}")));
            }
        };
        let stream = async_stream(job);
        Ok(with_timestamp(Response::new(
            Box::pin(stream) as BoxStream<api::StatusResponse>
        )))
    }

    async fn listen_build_history(
        &self,
        request: Request<api::BuildHistoryRequest>,
    ) -> Result<Response<BoxStream<api::BuildHistoryEvent>>, Status> {
        use futures::StreamExt as _;
        let req = request.into_inner();
        let (first, rx) = self.history.listen(&req)?;
        let first = futures::stream::iter(first.into_iter().map(Ok));
        let stream: BoxStream<api::BuildHistoryEvent> = match rx {
            None => Box::pin(first),
            Some((rx, filters)) => {
                let later =
                    tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| {
                        let out = match ev {
                            Ok(ev) => {
                                history::History::wanted(&req, &filters, &ev).then_some(Ok(ev))
                            }
                            // A listener too slow for the event rate loses events; say so.
                            Err(e) => Some(Err(Status::data_loss(format!(
                                "build history: this listener fell behind: {e}"
                            )))),
                        };
                        std::future::ready(out)
                    });
                Box::pin(first.chain(later))
            }
        };
        Ok(with_timestamp(Response::new(stream)))
    }

    async fn update_build_history(
        &self,
        request: Request<api::UpdateBuildHistoryRequest>,
    ) -> Result<Response<api::UpdateBuildHistoryResponse>, Status> {
        self.history.update(request.get_ref())?;
        Ok(Response::new(api::UpdateBuildHistoryResponse {}))
    }

    async fn session(
        &self,
        request: Request<tonic::Streaming<api::BytesMessage>>,
    ) -> Result<Response<BoxStream<api::BytesMessage>>, Status> {
        self.sessions.handle(request).await
    }

    async fn list_workers(
        &self,
        _request: Request<api::ListWorkersRequest>,
    ) -> Result<Response<api::ListWorkersResponse>, Status> {
        Ok(Response::new(api::ListWorkersResponse {
            record: vec![self.worker_record()],
        }))
    }

    async fn disk_usage(
        &self,
        request: Request<api::DiskUsageRequest>,
    ) -> Result<Response<api::DiskUsageResponse>, Status> {
        let req = request.into_inner();
        let gc = self.engine.gc().clone();
        let usage = tokio::task::spawn_blocking(move || gc.usage(&req.filter))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match e {
                crate::cache::Error::Policy(m) => {
                    Status::invalid_argument(format!("disk usage: {m}"))
                }
                e => Status::internal(e.to_string()),
            })?;
        Ok(Response::new(api::DiskUsageResponse {
            record: usage.iter().map(usage_record).collect(),
        }))
    }

    async fn prune(
        &self,
        request: Request<api::PruneRequest>,
    ) -> Result<Response<BoxStream<api::UsageRecord>>, Status> {
        let req = request.into_inner();
        let bytes = |v: i64, name: &str| {
            u64::try_from(v)
                .map_err(|_| Status::invalid_argument(format!("prune: {name} {v} is negative")))
        };
        if req.keep_duration < 0 {
            return Err(Status::invalid_argument(format!(
                "prune: keepDuration {} is negative",
                req.keep_duration
            )));
        }
        let limits = kiln_proto::gc::Resolved {
            keep_duration: (req.keep_duration > 0)
                .then(|| Duration::from_nanos(req.keep_duration as u64)),
            reserved_space: bytes(req.reserved_space, "reservedSpace")?,
            max_used_space: bytes(req.max_used_space, "maxUsedSpace")?,
            min_free_space: bytes(req.min_free_space, "minFreeSpace")?,
        };
        // Records running builds hold are never removed (see `cache::gc`), so prune runs
        // beside them.
        let gc = self.engine.gc().clone();
        let report = tokio::task::spawn_blocking(move || gc.prune(req.all, &req.filter, limits))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match e {
                crate::cache::Error::Policy(m) => Status::invalid_argument(format!("prune: {m}")),
                e => Status::internal(e.to_string()),
            })?;
        tracing::info!(
            layers = report.removed.len(),
            freed = report.freed,
            "pruned"
        );
        let records: Vec<_> = report.removed.iter().map(|u| Ok(usage_record(u))).collect();
        Ok(Response::new(Box::pin(futures::stream::iter(records))))
    }

    async fn info(
        &self,
        _request: Request<api::InfoRequest>,
    ) -> Result<Response<api::InfoResponse>, Status> {
        Ok(Response::new(api::InfoResponse {
            buildkit_version: Some(version()),
        }))
    }
}

/// A layer as BuildKit's disk-usage record.
fn usage_record(u: &crate::cache::LayerUsage) -> api::UsageRecord {
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(u.created);
    let last_used = SystemTime::UNIX_EPOCH + Duration::from_secs(u.last_used);
    api::UsageRecord {
        id: u.id.to_string(),
        size: u.size as i64,
        in_use: u.in_use,
        created_at: ts(Some(created)),
        last_used_at: ts((u.last_used > u.created).then_some(last_used)),
        description: if u.blobs.is_empty() {
            "layer".to_string()
        } else {
            format!("layer of {}", u.blobs.join(", "))
        },
        record_type: u.kind.clone(),
        ..Default::default()
    }
}

fn version() -> api::types::BuildkitVersion {
    api::types::BuildkitVersion {
        package: "github.com/kiln-build/kiln".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        revision: String::new(),
        dockerfile_version: String::new(),
    }
}

/// Adds the `buildkit-current-timestamp` header (daemon time, RFC 3339 with nanoseconds)
/// that `Status` and `ListenBuildHistory` carry.
fn with_timestamp<T>(mut resp: Response<T>) -> Response<T> {
    let now = prost_types::Timestamp::from(SystemTime::now()).to_string();
    if let Ok(v) = now.parse() {
        resp.metadata_mut()
            .insert(kiln_proto::metadata::CURRENT_TIMESTAMP, v);
    }
    resp
}

/// Replays a job's events, then follows them until the build is done.
fn async_stream(job: Arc<Job>) -> impl Stream<Item = Result<api::StatusResponse, Status>> {
    futures::stream::unfold((job, 0usize, false), |(job, seen, finished)| async move {
        if finished {
            return None;
        }
        loop {
            let notified = job.changed.notified();
            let done = job.done.load(std::sync::atomic::Ordering::SeqCst);
            let batch: Vec<Event> = job
                .events
                .lock()
                .map(|e| e.get(seen..).map(<[Event]>::to_vec).unwrap_or_default())
                .unwrap_or_default();
            if !batch.is_empty() {
                drop(notified);
                let next = seen + batch.len();
                return Some((Ok(status_response(&batch)), (job, next, false)));
            }
            if done {
                return None;
            }
            // Wake at least every second in case a notification raced the check above.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    })
}

/// The gRPC health service: the worker is serving while the process is up and not
/// shutting down.
#[derive(Debug, Clone, Default)]
pub struct HealthService {
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl HealthService {
    /// Answers `NOT_SERVING` while `flag` is set (see [`ControlService::with_draining`]).
    pub fn new(flag: Arc<std::sync::atomic::AtomicBool>) -> HealthService {
        HealthService { draining: flag }
    }
}

#[tonic::async_trait]
impl health::health_server::Health for HealthService {
    async fn check(
        &self,
        _request: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        let status = if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            health::health_check_response::ServingStatus::NotServing
        } else {
            health::health_check_response::ServingStatus::Serving
        };
        Ok(Response::new(health::HealthCheckResponse {
            status: status as i32,
        }))
    }
}
