//! BuildKit's `moby.buildkit.v1.frontend.LLBBridge` on the worker: the path current buildctl
//! and buildx take. Their `Control.Solve` names neither a frontend nor a definition; the
//! client then calls `Ping`, `Solve` (running `dockerfile.v0` or a definition here, keeping
//! the result under a handle) and `Return`, each call carrying the build's ref in the
//! `buildkit-controlapi-buildid` header. On `Return` the waiting `Control.Solve` exports the
//! returned result. `ResolveImageConfig`, `ReadFile`, `ReadDir`, `StatFile`, `Evaluate` and
//! `Warn` serve client-side frontends.
//!
//! Partial: multi-platform results (`refs`), frontend inputs, containers (`NewContainer`,
//! `ExecProcess`) and source-meta resolution answer `Unimplemented`, and Ping does not
//! advertise them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::apicaps::ApiCap;
use kiln_proto::moby::buildkit::v1::frontend as gw;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{engine_status, CacheOpts, ControlService};
use crate::control::{BuildRequest, BuildResponse, ExportRequest, Frontend, SolvedBuild};
use crate::image::Platform;
use crate::progress::Progress;

/// How long an LLBBridge call waits for its build's `Control.Solve` to register (BuildKit: 3 s).
const REGISTER_WAIT: Duration = Duration::from_secs(3);

/// Largest ReadFile answer (the gRPC message limit leaves room for framing).
const READ_LIMIT: u64 = 15 << 20;

/// Gateway API capabilities Kiln implements.
const FRONTEND_CAPS: &[&str] = &[
    "solve.base",
    "resolveimage",
    "resolveimage.resolvemode",
    "readfile",
    "return",
    "readdir",
    "statfile",
    "proto.refarray",
    "reference.output",
    "frontend.caps",
    "gateway.solve.evaluate",
    "gateway.evaluate",
    "gateway.warnings",
];

/// LLB capabilities Kiln's ops implement.
const LLB_CAPS: &[&str] = &[
    "source.image",
    "source.image.resolvemode",
    "source.local",
    "source.local.unique",
    "source.local.sessionid",
    "source.local.includepatterns",
    "source.local.excludepatterns",
    "source.local.followpaths",
    "source.local.sharedkeyhint",
    "exec.meta.base",
    "exec.meta.network",
    "exec.meta.proxyenv",
    "exec.meta.setsdefaultpath",
    "exec.mount.bind",
    "exec.mount.cache",
    "exec.mount.cache.sharing",
    "exec.mount.selector",
    "exec.mount.tmpfs",
    "exec.mount.tmpfs.size",
    "exec.mount.secret",
    "file.base",
    "file.rm.wildcard",
    "file.copy.includeexcludepatterns",
    "file.copy.modestring",
    "constraints",
    "platform",
    "meta.ignorecache",
    "meta.description",
    "exporter.multiple",
];

fn caps(ids: &[&str]) -> Vec<ApiCap> {
    ids.iter()
        .map(|id| ApiCap {
            id: id.to_string(),
            enabled: true,
            ..Default::default()
        })
        .collect()
}

/// A build driven over LLBBridge: what its calls share until `Return`.
pub(super) struct BridgeJob {
    session: String,
    imports: Vec<crate::cache::registry::ImportOpts>,
    progress: Progress,
    cancel: CancellationToken,
    results: Mutex<HashMap<String, SolvedBuild>>,
    next: AtomicU64,
    returned: Mutex<Option<oneshot::Sender<Result<gw::Result, Status>>>>,
    /// Contexts fetched from the client, released when the build ends.
    dirs: Mutex<Vec<super::Fetched>>,
}

impl BridgeJob {
    fn keep(&self, solved: SolvedBuild) -> String {
        let id = format!("kiln-ref-{}", self.next.fetch_add(1, Ordering::SeqCst));
        if let Ok(mut r) = self.results.lock() {
            r.insert(id.clone(), solved);
        }
        id
    }

    fn result(&self, id: &str) -> Result<SolvedBuild, Status> {
        self.results
            .lock()
            .ok()
            .and_then(|r| r.get(id).cloned())
            .ok_or_else(|| Status::not_found(format!("no result {id:?} in this build")))
    }
}

/// Removes a bridge job from the table when its `Control.Solve` ends, however it ends.
struct Unregister<'a> {
    service: &'a ControlService,
    r#ref: String,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.service.bridges.lock() {
            b.remove(&self.r#ref);
        }
    }
}

impl ControlService {
    /// The tonic server for this worker's LLBBridge service.
    pub fn into_bridge_server(self) -> gw::llb_bridge_server::LlbBridgeServer<ControlService> {
        gw::llb_bridge_server::LlbBridgeServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    }

    /// `Control.Solve` without frontend or definition: wait for the client's `Return`, then
    /// export what it returned.
    pub(super) async fn solve_bridged(
        &self,
        req: &api::SolveRequest,
        exports: &[ExportRequest],
        caches: &CacheOpts,
        progress: &Progress,
        cancel: CancellationToken,
    ) -> Result<BuildResponse, Status> {
        let (tx, rx) = oneshot::channel();
        let job = Arc::new(BridgeJob {
            session: req.session.clone(),
            imports: caches.imports.clone(),
            progress: progress.clone(),
            cancel,
            results: Mutex::default(),
            next: AtomicU64::new(1),
            returned: Mutex::new(Some(tx)),
            dirs: Mutex::default(),
        });
        self.bridges
            .lock()
            .map_err(|_| Status::internal("bridge table poisoned"))?
            .insert(req.r#ref.clone(), job.clone());
        let _unregister = Unregister {
            service: self,
            r#ref: req.r#ref.clone(),
        };
        self.registered.notify_waiters();
        let result = rx
            .await
            .map_err(|_| Status::cancelled("the build ended without a Return"))??;
        let id = match result.result {
            Some(gw::result::Result::Ref(r)) => r.id,
            Some(gw::result::Result::RefDeprecated(id)) => id,
            Some(gw::result::Result::Refs(_)) | Some(gw::result::Result::RefsDeprecated(_)) => {
                return Err(Status::unimplemented(
                    "multi-platform results (a map of refs) are not implemented yet",
                ))
            }
            None => String::new(),
        };
        if id.is_empty() {
            if exports.is_empty() {
                return Ok(BuildResponse::default());
            }
            return Err(Status::failed_precondition(
                "the build returned no result, so there is nothing to export",
            ));
        }
        let mut solved = job.result(&id)?;
        // A client-side frontend may hand back its own image config.
        if let Some(raw) = result.metadata.get("containerimage.config") {
            solved.config = serde_json::from_slice(raw).map_err(|e| {
                Status::invalid_argument(format!("result metadata containerimage.config: {e}"))
            })?;
        }
        self.export_solved(&solved, exports, caches, progress).await
    }

    /// The bridge job named by a call's `buildkit-controlapi-buildid` header, waiting briefly
    /// for its `Control.Solve` to register.
    async fn bridge_job<T>(&self, request: &Request<T>) -> Result<Arc<BridgeJob>, Status> {
        let id = request
            .metadata()
            .get(kiln_proto::metadata::BUILD_ID)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "LLBBridge call without the {} header",
                    kiln_proto::metadata::BUILD_ID
                ))
            })?
            .to_string();
        let deadline = tokio::time::Instant::now() + REGISTER_WAIT;
        loop {
            let notified = self.registered.notified();
            if let Some(j) = self.bridges.lock().ok().and_then(|b| b.get(&id).cloned()) {
                return Ok(j);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::not_found(format!("no such job {id}")));
            }
        }
    }

    /// Runs `f` on a read-only view of one of the build's results.
    async fn with_result_view<T: Send + 'static>(
        &self,
        job: &BridgeJob,
        id: &str,
        f: impl FnOnce(&Path) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let solved = job.result(id)?;
        // A lazy result (a pool cache hit) is fetched before it is read.
        let output = solved
            .output
            .materialize()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let worker = self.engine.worker().clone();
        tokio::task::spawn_blocking(move || {
            let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
            let base = worker.root.join("mounts");
            std::fs::create_dir_all(&base).map_err(|e| internal(&e))?;
            let tmp = tempfile::Builder::new()
                .prefix("view-")
                .tempdir_in(&base)
                .map_err(|e| internal(&e))?;
            let target = tmp.path().join("v");
            std::fs::create_dir(&target).map_err(|e| internal(&e))?;
            let view = worker
                .snapshotter
                .mount_readonly(&output.layer_dirs(), &target)
                .map_err(|e| internal(&e))?;
            let out = f(view.path());
            view.commit().map_err(|e| internal(&e))?;
            out
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }
}

/// `path` inside a result view; never outside it.
fn in_view(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf, Status> {
    crate::snapshot::resolve_in_root(root, path, follow_last)
        .map_err(|e| Status::invalid_argument(format!("{path}: {e}")))
}

fn build_request(frontend: Frontend) -> BuildRequest {
    BuildRequest {
        frontend,
        locals: HashMap::new(),
        deferred_locals: Default::default(),
        exports: Vec::new(),
        session: None,
        secrets: HashMap::new(),
    }
}

#[tonic::async_trait]
impl gw::llb_bridge_server::LlbBridge for ControlService {
    async fn ping(
        &self,
        _request: Request<gw::PingRequest>,
    ) -> Result<Response<gw::PongResponse>, Status> {
        Ok(Response::new(gw::PongResponse {
            frontend_api_caps: caps(FRONTEND_CAPS),
            llb_caps: caps(LLB_CAPS),
            workers: vec![self.worker_record()],
        }))
    }

    async fn solve(
        &self,
        request: Request<gw::SolveRequest>,
    ) -> Result<Response<gw::SolveResponse>, Status> {
        let job = self.bridge_job(&request).await?;
        let req = request.into_inner();
        if req.r#final {
            return Err(Status::unimplemented(
                "the inline-return mode (Final=true) is not implemented; use Return (Ping advertises it)",
            ));
        }
        if !req.frontend_inputs.is_empty() {
            return Err(Status::unimplemented(
                "frontend inputs are not implemented yet",
            ));
        }
        let def = req.definition.clone().filter(|d| !d.def.is_empty());
        let mut build = match (req.frontend.as_str(), def) {
            ("", None) => {
                // Nothing to solve: an empty result.
                return Ok(Response::new(gw::SolveResponse {
                    result: Some(gw::Result::default()),
                    ..Default::default()
                }));
            }
            ("", Some(def)) => build_request(Frontend::Llb(def)),
            ("dockerfile.v0" | "dockerfile", _) => {
                build_request(super::dockerfile_frontend(&req.frontend_opt)?)
            }
            (other, _) => {
                return Err(Status::invalid_argument(format!(
                    "unknown frontend {other:?} (supported: dockerfile.v0, or a definition)"
                )))
            }
        };
        build.session = Some(Arc::new(crate::session::attachables::SessionClient::new(
            self.sessions.clone(),
            job.session.clone(),
        )));
        let dockerfile = matches!(build.frontend, Frontend::Dockerfile { .. });
        let fetched = if dockerfile {
            Some(
                self.fetch_context(&job.session, &req.frontend_opt, &mut build, &job.progress)
                    .await?,
            )
        } else {
            self.fetch_llb_locals(&job.session, &mut build, &job.progress)
                .await?
        };
        if let (Some(dir), Ok(mut d)) = (fetched, job.dirs.lock()) {
            d.push(dir);
        }
        let solved = self
            .engine
            .solve_with_cache(&build, &job.imports, &job.progress, job.cancel.clone())
            .await
            .map_err(engine_status)?;
        let mut metadata = HashMap::new();
        if dockerfile {
            let config = serde_json::to_vec(&solved.config)
                .map_err(|e| Status::internal(format!("encoding the image config: {e}")))?;
            metadata.insert("containerimage.config".to_string(), config);
        }
        let id = job.keep(solved);
        if !req.allow_result_return {
            return Ok(Response::new(gw::SolveResponse {
                r#ref: id,
                ..Default::default()
            }));
        }
        Ok(Response::new(gw::SolveResponse {
            result: Some(gw::Result {
                result: Some(gw::result::Result::Ref(gw::Ref {
                    id,
                    def: req.definition,
                })),
                metadata,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn r#return(
        &self,
        request: Request<gw::ReturnRequest>,
    ) -> Result<Response<gw::ReturnResponse>, Status> {
        let job = self.bridge_job(&request).await?;
        let req = request.into_inner();
        let outcome = match req.error {
            Some(e) if e.code != 0 => Err(Status::new(tonic::Code::from(e.code), e.message)),
            _ => Ok(req.result.unwrap_or_default()),
        };
        let tx = job
            .returned
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .ok_or_else(|| Status::failed_precondition("this build has already returned"))?;
        let _ = tx.send(outcome);
        Ok(Response::new(gw::ReturnResponse {}))
    }

    async fn resolve_image_config(
        &self,
        request: Request<gw::ResolveImageConfigRequest>,
    ) -> Result<Response<gw::ResolveImageConfigResponse>, Status> {
        let req = request.into_inner();
        let platform = req
            .platform
            .map(|p| Platform {
                os: p.os,
                architecture: p.architecture,
                variant: p.variant,
            })
            .unwrap_or_else(Platform::host);
        let img = self
            .engine
            .worker()
            .images
            .resolve(&req.r#ref, &platform)
            .await
            .map_err(|e| Status::not_found(format!("{}: {e}", req.r#ref)))?;
        let config = serde_json::to_vec(&img.config)
            .map_err(|e| Status::internal(format!("encoding the image config: {e}")))?;
        Ok(Response::new(gw::ResolveImageConfigResponse {
            digest: img.digest,
            config,
            r#ref: img.canonical,
        }))
    }

    async fn read_file(
        &self,
        request: Request<gw::ReadFileRequest>,
    ) -> Result<Response<gw::ReadFileResponse>, Status> {
        let job = self.bridge_job(&request).await?;
        let req = request.into_inner();
        let data = self
            .with_result_view(&job, &req.r#ref, move |root| {
                use std::io::{Read, Seek};
                let path = in_view(root, &req.file_path, true)?;
                let mut f = std::fs::File::open(&path)
                    .map_err(|e| Status::not_found(format!("{}: {e}", req.file_path)))?;
                let (offset, length) = req
                    .range
                    .map(|r| (r.offset.max(0) as u64, r.length.max(0) as u64))
                    .unwrap_or((0, READ_LIMIT));
                f.seek(std::io::SeekFrom::Start(offset))
                    .map_err(|e| Status::internal(e.to_string()))?;
                let mut out = Vec::new();
                f.take(length.min(READ_LIMIT))
                    .read_to_end(&mut out)
                    .map_err(|e| Status::internal(format!("{}: {e}", req.file_path)))?;
                Ok(out)
            })
            .await?;
        Ok(Response::new(gw::ReadFileResponse { data }))
    }

    async fn stat_file(
        &self,
        request: Request<gw::StatFileRequest>,
    ) -> Result<Response<gw::StatFileResponse>, Status> {
        let job = self.bridge_job(&request).await?;
        let req = request.into_inner();
        let stat = self
            .with_result_view(&job, &req.r#ref, move |root| {
                let path = in_view(root, &req.path, false)?;
                crate::session::filesync::stat_of(&req.path, &path)
                    .map_err(|e| Status::not_found(format!("{}: {e}", req.path)))
            })
            .await?;
        Ok(Response::new(gw::StatFileResponse { stat: Some(stat) }))
    }

    async fn read_dir(
        &self,
        request: Request<gw::ReadDirRequest>,
    ) -> Result<Response<gw::ReadDirResponse>, Status> {
        let job = self.bridge_job(&request).await?;
        let req = request.into_inner();
        let entries = self
            .with_result_view(&job, &req.r#ref, move |root| {
                let dir = in_view(root, &req.dir_path, true)?;
                let matcher = if req.include_pattern.is_empty() {
                    None
                } else {
                    Some(
                        crate::source::local::patterns::PatternMatcher::new(std::slice::from_ref(
                            &req.include_pattern,
                        ))
                        .map_err(|e| {
                            Status::invalid_argument(format!(
                                "include pattern {:?}: {e}",
                                req.include_pattern
                            ))
                        })?,
                    )
                };
                let rd = std::fs::read_dir(&dir)
                    .map_err(|e| Status::not_found(format!("{}: {e}", req.dir_path)))?;
                let mut out = Vec::new();
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if matcher.as_ref().is_some_and(|m| !m.matches(&name)) {
                        continue;
                    }
                    let stat = crate::session::filesync::stat_of(&name, &e.path())
                        .map_err(|e| Status::internal(e.to_string()))?;
                    out.push(stat);
                }
                out.sort_by(|a, b| a.path.cmp(&b.path));
                Ok(out)
            })
            .await?;
        Ok(Response::new(gw::ReadDirResponse { entries }))
    }

    async fn evaluate(
        &self,
        request: Request<gw::EvaluateRequest>,
    ) -> Result<Response<gw::EvaluateResponse>, Status> {
        // A result exists only once solved, so a known ref is already evaluated.
        let job = self.bridge_job(&request).await?;
        job.result(&request.into_inner().r#ref)?;
        Ok(Response::new(gw::EvaluateResponse {}))
    }

    async fn warn(
        &self,
        request: Request<gw::WarnRequest>,
    ) -> Result<Response<gw::WarnResponse>, Status> {
        let job = self.bridge_job(&request).await?;
        let w = request.into_inner();
        job.progress.warn(
            (!w.digest.is_empty()).then_some(w.digest.as_str()),
            String::from_utf8_lossy(&w.short).to_string(),
        );
        Ok(Response::new(gw::WarnResponse {}))
    }
}
