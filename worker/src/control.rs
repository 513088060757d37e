//! The engine's front: [`Engine`] opens a worker root and runs builds: frontend (Dockerfile
//! → LLB) → solver → exporters. The daemonless CLI calls it directly; the daemon serves it as
//! BuildKit's `moby.buildkit.v1.Control` gRPC service ([`service`]). May use solver, export,
//! progress and session-level inputs.

pub mod remote;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use tokio_util::sync::CancellationToken;

use crate::cache::gc::Gc;
use crate::cache::pool::Pool;
use crate::cache::registry::{self, CacheEntry, Exporter};
use crate::cache::{Cache, Ref};
use crate::content::ContentStore;
use crate::executor::{Executor, Runtime};
use crate::export::{self, image::ImageOpts, ExportLayer};
use crate::frontend::{self, BuildOpts, ResolvedImageMeta};
use crate::image::{ImageConfigFile, Platform};
use crate::llb::{self, pb};
use crate::ops::{self, BuildCtx, LlbOp, Worker};
use crate::progress::{Progress, Step};
use crate::snapshot::{self, Snapshotter};
use crate::solver::{self, Solver};
use crate::source::image::{ImageResolver, RegistryConfig};
use crate::{Error, Result};

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// State directory (`/var/lib/kiln`).
    pub root: PathBuf,
    /// OCI runtime.
    pub runtime: Runtime,
    /// Most vertices executing at once.
    pub max_parallelism: usize,
    /// Registry access.
    pub registry: RegistryConfig,
    /// Force a snapshotter kind instead of detecting.
    pub snapshotter: Option<snapshot::Kind>,
    /// Pool cache repository (`host/path`): every executed vertex result is exported there
    /// in the background and every local miss is looked up there.
    pub cache_registry: Option<String>,
    /// The garbage-collection policy (`[gc]` of the worker's config file).
    pub gc: kiln_proto::gc::Policy,
    /// Most bytes one pulled image layer may expand to when unpacked (decompression bombs
    /// fail with an error naming the layer digest).
    pub max_layer_size: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            root: PathBuf::from("/var/lib/kiln"),
            runtime: Runtime::Runc,
            max_parallelism: std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4),
            registry: RegistryConfig::default(),
            snapshotter: None,
            cache_registry: None,
            gc: kiln_proto::gc::Policy::default(),
            max_layer_size: snapshot::layer::DEFAULT_MAX_LAYER_SIZE,
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub enum Frontend {
    /// `dockerfile.v0`.
    Dockerfile {
        /// Frontend options.
        opts: BuildOpts,
        /// The local holding the Dockerfile (`dockerfile`).
        dockerfile_local: String,
    },
    /// A raw LLB definition, with the image config to export it with.
    Llb(pb::Definition),
}

/// One output.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// `image`, `oci`, `docker`, `local`, `tar`.
    pub typ: String,
    /// Exporter attributes (`name`, `push`, `compression`, …).
    pub attrs: BTreeMap<String, String>,
    /// File or directory to write (`dest=`).
    pub dest: Option<PathBuf>,
}

/// One build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// What to build.
    pub frontend: Frontend,
    /// Local directories by name.
    pub locals: HashMap<String, PathBuf>,
    /// Local directories fetched only when the build's definition reads them (not in
    /// `locals`), by name.
    pub deferred_locals: HashMap<String, DeferredLocal>,
    /// Outputs.
    pub exports: Vec<ExportRequest>,
    /// Secrets by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// What the client serves over its session (a daemon's builds): secrets not in
    /// `secrets`, and registry credentials.
    pub session: Option<Arc<dyn SessionServices>>,
}

/// A local directory fetched only when a build's definition reads it: a daemon's
/// Dockerfile context, which the client then sends only to builds that use it, as
/// BuildKit's frontend does. Yields the directory, or what went wrong.
#[derive(Clone)]
pub struct DeferredLocal(
    Arc<
        dyn Fn() -> futures::future::BoxFuture<'static, std::result::Result<PathBuf, String>>
            + Send
            + Sync,
    >,
);

impl DeferredLocal {
    /// A local that `fetch` brings in (called once per build that reads it).
    pub fn new(
        fetch: impl Fn() -> futures::future::BoxFuture<'static, std::result::Result<PathBuf, String>>
            + Send
            + Sync
            + 'static,
    ) -> DeferredLocal {
        DeferredLocal(Arc::new(fetch))
    }
}

impl std::fmt::Debug for DeferredLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeferredLocal")
    }
}

/// The build's local directories: `req.locals`, plus the deferred ones the graph reads,
/// fetched now (all at once).
async fn locals_for(req: &BuildRequest, graph: &llb::Graph) -> Result<HashMap<String, PathBuf>> {
    let mut locals = req.locals.clone();
    if req.deferred_locals.is_empty() {
        return Ok(locals);
    }
    let mut wanted: Vec<&str> = graph
        .vertices
        .iter()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::Source(s)) => s.identifier.strip_prefix("local://"),
            _ => None,
        })
        .filter(|name| !locals.contains_key(*name) && req.deferred_locals.contains_key(*name))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let fetched = futures::future::join_all(wanted.into_iter().map(|name| async move {
        let dir = (req.deferred_locals[name].0)().await;
        (name, dir)
    }))
    .await;
    for (name, dir) in fetched {
        let dir = dir.map_err(|message| ops::Error::LocalFetch {
            name: name.to_string(),
            message,
        })?;
        locals.insert(name.to_string(), dir);
    }
    Ok(locals)
}

/// The client's services a build uses (a daemon asks the client's session): secrets by id
/// for the ids RUN steps mount that [`BuildRequest::secrets`] lacks, and credentials for
/// the registries the build pulls from and pushes to.
#[async_trait::async_trait]
pub trait SessionServices: Send + Sync + std::fmt::Debug {
    /// The secret's value, or `None` when the client has no such secret.
    async fn secret(&self, id: &str) -> std::result::Result<Option<Vec<u8>>, String>;
    /// Credentials for registry `host`, or `None` when the client has none.
    async fn registry_auth(
        &self,
        host: &str,
    ) -> std::result::Result<Option<oci_client::secrets::RegistryAuth>, String>;
    /// A registry bearer token the client fetched with its own credentials
    /// (`Auth.FetchToken`), so they never reach this worker; `None` when the client does
    /// not fetch tokens (then [`SessionServices::registry_auth`] is asked).
    async fn fetch_token(
        &self,
        req: &crate::source::image::token::TokenRequest,
    ) -> std::result::Result<Option<crate::source::image::token::Token>, String> {
        let _ = req;
        Ok(None)
    }
    /// Whether the client forwards the SSH agent `id` (`RUN --mount=type=ssh`).
    async fn has_ssh_agent(&self, id: &str) -> std::result::Result<bool, String> {
        let _ = id;
        Ok(false)
    }
    /// One new connection to the client's SSH agent `id`; `None` when it has none.
    async fn ssh_agent(
        &self,
        id: &str,
    ) -> std::result::Result<Option<crate::session::sshforward::AgentConn>, String> {
        let _ = id;
        Ok(None)
    }
}

/// The caches of one build (BuildKit's `SolveRequest.Cache`): `--export-cache` and
/// `--import-cache` entries.
#[derive(Debug, Clone, Default)]
pub struct CacheRequest {
    /// Where to export the build's results (`registry`, `local`); at most one per type.
    pub exports: Vec<CacheEntry>,
    /// Caches to consult on a local miss, in order.
    pub imports: Vec<CacheEntry>,
}

/// What a build returns (BuildKit's `ExporterResponse`).
#[derive(Debug, Clone, Default)]
pub struct BuildResponse {
    /// `containerimage.digest`, `containerimage.config.digest`, `containerimage.descriptor`
    /// (base64 JSON), `image.name`.
    pub exporter_response: BTreeMap<String, String>,
}

/// A solved build, not yet exported: its result and the image config that goes with it.
#[derive(Debug, Clone)]
pub struct SolvedBuild {
    /// The result's layers.
    pub output: Ref,
    /// The image config (from the Dockerfile, or the host platform for raw LLB).
    pub config: ImageConfigFile,
    /// Every vertex whose cache key the solve computed (what cache exports export).
    pub records: Vec<solver::KeyRecord>,
    /// How this build reaches registries (pushes use the client's credentials too).
    pub images: ImageResolver,
    /// The ids of the cache mounts its definition uses (what `cache-mounts=true` exports).
    pub cache_mounts: std::collections::BTreeSet<String>,
}

/// The build engine over one worker root.
pub struct Engine {
    worker: Arc<Worker>,
    solver: Arc<Solver<LlbOp>>,
    pool: Option<Arc<Pool>>,
    cache_exporter: Exporter,
    gc: Arc<Gc>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("root", &self.worker.root)
            .finish()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| {
        Error::Cache(crate::cache::Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

// === impl Engine ===

impl Engine {
    /// Opens (creating) the state under `config.root`.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        let root = &config.root;
        std::fs::create_dir_all(root).map_err(io_err("create", root))?;
        let content = Arc::new(ContentStore::open(&root.join("content"))?);
        let cache = Cache::open(root)?;
        let mounts = root.join("mounts");
        // A previous process killed mid-build may have left containers and mounts behind;
        // stop those first, then the scratch dirs are plain garbage.
        reap_containers(config.runtime, &root.join("executor"));
        unmount_under(root);
        let _ = std::fs::remove_dir_all(&mounts);
        std::fs::create_dir_all(&mounts).map_err(io_err("create", &mounts))?;
        crate::cache::mounts::clean(root);
        let snapshotter = match config.snapshotter {
            Some(kind) => Snapshotter::with_kind(kind),
            None => detect_snapshotter(root, &mounts),
        };
        let executor = Executor::new(config.runtime, root.join("executor"))?;
        let images = ImageResolver::new(config.registry.clone(), content.clone());
        let cache_exporter = Exporter::new(cache.clone(), content.clone(), images.clone());
        let pool = match &config.cache_registry {
            Some(repo) => Some(
                Pool::new(
                    repo,
                    cache.clone(),
                    content.clone(),
                    images.clone(),
                    cache_exporter.clone(),
                )
                .map_err(crate::cache::Error::from)?,
            ),
            None => None,
        };
        if let Some(pool) = &pool {
            if tokio::runtime::Handle::try_current().is_ok() {
                pool.recover(&root.join("pool-queue"));
            }
        }
        let worker = Arc::new(Worker {
            root: root.clone(),
            cache: cache.clone(),
            content,
            snapshotter,
            executor,
            images,
            cache_mount_locks: Default::default(),
            unpack_limits: snapshot::layer::UnpackLimits {
                max_bytes: config.max_layer_size,
            },
        });
        let (gc, warnings) =
            Gc::new(cache.clone(), root, config.gc.clone()).map_err(Error::Cache)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        let solver = Solver::new(cache, config.max_parallelism);
        Ok(Engine {
            worker,
            solver,
            pool,
            cache_exporter,
            gc,
        })
    }

    /// The garbage collector of this engine's cache.
    pub fn gc(&self) -> &Arc<Gc> {
        &self.gc
    }

    /// The exporter of `--export-cache` and the pool cache.
    pub fn cache_exporter(&self) -> &Exporter {
        &self.cache_exporter
    }

    /// The pool cache, when configured (its [`Pool::stats`] are the metrics).
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.as_ref()
    }

    /// The shared worker state.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Runs one build: solves it, then writes its outputs.
    pub async fn build(
        &self,
        req: BuildRequest,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<BuildResponse> {
        self.build_with_cache(req, &CacheRequest::default(), progress, cancel)
            .await
    }

    /// Runs one build, importing and exporting caches. Bad cache entries fail the build
    /// before it starts; an import that cannot be read is a warning (the build proceeds
    /// without it); an export failure fails the build unless the entry says
    /// `ignore-error=true`.
    pub async fn build_with_cache(
        &self,
        req: BuildRequest,
        caches: &CacheRequest,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<BuildResponse> {
        let cache_exports =
            registry::parse_exports(&caches.exports).map_err(crate::cache::Error::from)?;
        let cache_imports = caches
            .imports
            .iter()
            .map(registry::parse_import)
            .collect::<Result<Vec<_>, _>>()
            .map_err(crate::cache::Error::from)?;
        let solved = self
            .solve_with_cache(&req, &cache_imports, &progress, cancel)
            .await?;
        let response = self
            .export_result_with_cache(&solved, &req.exports, &cache_exports, &progress)
            .await?;
        // After the exports, so the pool reuses the blobs they made.
        self.queue_pool_export(&solved)?;
        Ok(response)
    }

    /// Solves a build's frontend to a result without exporting it.
    pub async fn solve(
        &self,
        req: &BuildRequest,
        progress: &Progress,
        cancel: CancellationToken,
    ) -> Result<SolvedBuild> {
        let solved = self.solve_with_cache(req, &[], progress, cancel).await?;
        self.queue_pool_export(&solved)?;
        Ok(solved)
    }

    /// [`Engine::solve`] without queueing pool exports, consulting `imports` (and the pool
    /// cache) on local misses.
    pub async fn solve_with_cache(
        &self,
        req: &BuildRequest,
        imports: &[registry::ImportOpts],
        progress: &Progress,
        cancel: CancellationToken,
    ) -> Result<SolvedBuild> {
        // Free space short of the GC policy: collect before this build writes anything.
        let gc = self.gc.clone();
        match tokio::task::spawn_blocking(move || gc.before_build()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "gc before the build failed"),
            Err(error) => tracing::warn!(%error, "gc before the build panicked"),
        }
        let (definition, config) = match &req.frontend {
            Frontend::Llb(def) => {
                let mut cfg = ImageConfigFile::default();
                let p = Platform::host();
                cfg.os = p.os;
                cfg.architecture = p.architecture;
                (def.clone(), cfg)
            }
            Frontend::Dockerfile {
                opts,
                dockerfile_local,
            } => {
                self.dockerfile(req, opts, dockerfile_local, progress)
                    .await?
            }
        };
        if definition.def.is_empty() {
            // Nothing to build (an untouched scratch stage): the result is empty.
            return Ok(SolvedBuild {
                output: Ref::scratch(),
                config,
                records: Vec::new(),
                images: self.images_for(req.session.as_ref()),
                cache_mounts: Default::default(),
            });
        }
        let graph = llb::decode(&definition)?;
        let (locals, remote) = tokio::join!(
            locals_for(req, &graph),
            self.remote_caches(imports, progress)
        );
        let build = Arc::new(BuildCtx {
            worker: self.worker.clone(),
            locals: locals?,
            secrets: self.secrets_for(req, &definition).await?,
            images: self.images_for(req.session.as_ref()),
            session: req.session.clone(),
        });
        let mut vertices = Vec::with_capacity(graph.vertices.len());
        for v in &graph.vertices {
            let op = ops::resolve_op(&v.op, &build).map_err(|e| {
                Error::Solver(solver::Error::Vertex {
                    name: vertex_name(v),
                    source: Box::new(e),
                })
            })?;
            vertices.push(solver::Vertex {
                digest: v.digest.clone(),
                name: vertex_name(v),
                op: Arc::new(op),
                inputs: v
                    .op
                    .inputs
                    .iter()
                    .map(|i| solver::Edge {
                        vertex: graph
                            .by_digest
                            .get(&i.digest)
                            .copied()
                            .unwrap_or(usize::MAX),
                        output: i.index as usize,
                    })
                    .collect(),
                ignore_cache: v.metadata.ignore_cache,
            });
        }
        let result_vertex = graph
            .by_digest
            .get(&graph.result.digest)
            .copied()
            .ok_or_else(|| llb::Error::Invalid("result op not found".into()))?;
        let solved = self
            .solver
            .solve(
                solver::Graph {
                    vertices,
                    result: solver::Edge {
                        vertex: result_vertex,
                        output: graph.result.index as usize,
                    },
                    remote,
                },
                progress.clone(),
                cancel,
            )
            .await?;
        Ok(SolvedBuild {
            output: solved.output,
            config,
            records: solved.records,
            images: build.images.clone(),
            cache_mounts: crate::cache::mounts::ids(graph.vertices.iter().map(|v| &v.op)),
        })
    }

    /// How a build reaches registries: with its client's credentials first when it has a
    /// session.
    fn images_for(&self, session: Option<&Arc<dyn SessionServices>>) -> ImageResolver {
        match session {
            Some(s) => self.worker.images.with_session(s.clone()),
            None => self.worker.images.clone(),
        }
    }

    /// The build's secrets: those given, plus those its exec ops mount that the build's
    /// [`SessionServices`] has. Missing ones are left to the op (fatal unless optional).
    async fn secrets_for(
        &self,
        req: &BuildRequest,
        definition: &pb::Definition,
    ) -> Result<HashMap<String, Vec<u8>>> {
        let mut secrets = req.secrets.clone();
        let Some(source) = &req.session else {
            return Ok(secrets);
        };
        let mut wanted = std::collections::BTreeSet::new();
        for raw in &definition.def {
            let Ok(op) = <pb::Op as prost::Message>::decode(raw.as_slice()) else {
                continue; // decoding errors are reported by llb::decode
            };
            if let Some(pb::op::Op::Exec(e)) = &op.op {
                for m in &e.mounts {
                    if let Some(s) = &m.secret_opt {
                        wanted.insert(s.id.clone());
                    }
                }
                for se in &e.secretenv {
                    wanted.insert(se.id.clone());
                }
            }
            if let Some(pb::op::Op::Source(s)) = &op.op {
                wanted.extend(git_auth_secrets(s));
            }
        }
        for id in wanted {
            if secrets.contains_key(&id) {
                continue;
            }
            match source.secret(&id).await {
                Ok(Some(v)) => {
                    secrets.insert(id, v);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Ops(ops::Error::Invalid(format!(
                        "secret {id:?}: {e}"
                    ))))
                }
            }
        }
        Ok(secrets)
    }

    /// Queues the vertex results a solve executed for the pool cache (in the background:
    /// nothing waits for it).
    pub fn queue_pool_export(&self, solved: &SolvedBuild) -> Result<()> {
        if let Some(pool) = &self.pool {
            for r in solved.records.iter().filter(|r| r.executed) {
                if let Some(outs) = self.local_outputs(&r.key, r.outputs)? {
                    pool.enqueue(&r.key, outs);
                }
            }
        }
        Ok(())
    }

    /// Writes a solved result to `exports`, in order.
    pub async fn export_result(
        &self,
        solved: &SolvedBuild,
        exports: &[ExportRequest],
        progress: &Progress,
    ) -> Result<BuildResponse> {
        self.export_result_with_cache(solved, exports, &[], progress)
            .await
    }

    /// [`Engine::export_result`], then the cache exports (`type=inline` goes into the image
    /// config first).
    pub async fn export_result_with_cache(
        &self,
        solved: &SolvedBuild,
        exports: &[ExportRequest],
        cache_exports: &[registry::ExportOpts],
        progress: &Progress,
    ) -> Result<BuildResponse> {
        // A lazy result (a pool cache hit) is fetched only when something exports it.
        let fetched;
        let solved = if solved.output.is_lazy() && !(exports.is_empty() && cache_exports.is_empty())
        {
            fetched = SolvedBuild {
                output: solved.output.materialize().await.map_err(|e| {
                    Error::Solver(solver::Error::Vertex {
                        name: "build result".into(),
                        source: e.into(),
                    })
                })?,
                ..solved.clone()
            };
            &fetched
        } else {
            solved
        };
        let mut inline_config = None;
        if let Some(inline) = cache_exports
            .iter()
            .find(|o| o.target == registry::Target::Inline)
        {
            match self.inline_cache(solved, exports).await {
                Ok(label) => {
                    let mut config = solved.config.clone();
                    config
                        .config
                        .labels
                        .insert(registry::INLINE_LABEL.to_string(), label);
                    inline_config = Some(config);
                }
                Err(e) if inline.ignore_error => {
                    let message = format!("inline cache: {e} (ignored: ignore-error=true)");
                    tracing::warn!("{message}");
                    progress.warn(None, message);
                }
                Err(e) => return Err(e),
            }
        }
        let config = inline_config.as_ref().unwrap_or(&solved.config);
        let mut response = BuildResponse::default();
        for (i, exp) in exports.iter().enumerate() {
            self.export(i, exp, solved, config, progress, &mut response)
                .await?;
        }
        for (i, opts) in cache_exports
            .iter()
            .enumerate()
            .filter(|(_, o)| o.target != registry::Target::Inline)
        {
            self.export_cache(i, opts, solved, progress).await?;
        }
        Ok(response)
    }

    /// The imported caches that could be read, then the pool cache.
    async fn remote_caches(
        &self,
        imports: &[registry::ImportOpts],
        progress: &Progress,
    ) -> Vec<Arc<dyn solver::RemoteCache<Ref>>> {
        let mut remote: Vec<Arc<dyn solver::RemoteCache<Ref>>> = Vec::new();
        for (i, opts) in imports.iter().enumerate() {
            let name = opts.target.name();
            let step = Step::start(
                progress,
                &format!("cache-import-{i}"),
                &format!("importing cache manifest from {name}"),
            );
            match registry::import(&self.worker.images, &self.worker.content, opts).await {
                Ok(found) => {
                    step.finish(None);
                    self.cache_exporter.learn(&found);
                    self.seed_cache_mounts(&found, &name, progress).await;
                    remote.push(Arc::new(registry::Imported::new(
                        name,
                        found,
                        self.worker.cache.clone(),
                        self.worker.content.clone(),
                    )));
                }
                Err(e) => {
                    // A cache that cannot be read is a miss, not a failed build.
                    step.finish(None);
                    let message = format!("{e}; building without this cache");
                    tracing::warn!("{message}");
                    progress.warn(None, message);
                }
            }
        }
        if let Some(pool) = &self.pool {
            remote.push(pool.clone());
        }
        remote
    }

    /// Seeds the cache mounts an imported cache carries that this worker lacks; a mount
    /// that cannot be seeded is a warning (it starts empty).
    async fn seed_cache_mounts(&self, found: &registry::Found, name: &str, progress: &Progress) {
        if found.cache_mounts.is_empty() {
            return;
        }
        let step = Step::start(
            progress,
            &format!("cache-mounts-{name}"),
            &format!("seeding cache mounts from {name}"),
        );
        let (seeded, warnings) =
            crate::cache::mounts::seed_from(found, &self.worker.content, &self.worker.root).await;
        step.finish(None);
        if !seeded.is_empty() {
            tracing::info!(cache = name, mounts = ?seeded, "seeded cache mounts");
        }
        for w in warnings {
            let message = format!("{w} (from {name})");
            tracing::warn!("{message}");
            progress.warn(None, message);
        }
    }

    /// The inline cache label for a solved build: the `mode=min` records whose layers are
    /// all in the exported image (so the image alone holds their blobs), with blobs made
    /// the way the image exporter makes them.
    async fn inline_cache(
        &self,
        solved: &SolvedBuild,
        exports: &[ExportRequest],
    ) -> Result<String> {
        let image = exports
            .iter()
            .find(|e| matches!(e.typ.as_str(), "image" | "oci" | "docker"))
            .map(|e| ImageOpts::from_attrs(&e.attrs))
            .transpose()?
            .unwrap_or_default();
        let in_image: std::collections::HashSet<u64> =
            solved.output.layers().iter().map(|l| l.id).collect();
        let mut results = Vec::new();
        for r in solved.records.iter().filter(|r| r.min) {
            if let Some(outs) = self.local_outputs(&r.key, r.outputs)? {
                for (i, o) in outs.into_iter().enumerate() {
                    if o.layers().iter().all(|l| in_image.contains(&l.id)) {
                        results.push((format!("{}:{i}", r.key), o));
                    }
                }
            }
        }
        Ok(self
            .cache_exporter
            .inline(&results, &image)
            .await
            .map_err(crate::cache::Error::from)?)
    }

    /// The outputs stored locally under a vertex key, if all are there.
    fn local_outputs(&self, key: &str, outputs: usize) -> Result<Option<Vec<Ref>>> {
        let mut refs = Vec::with_capacity(outputs);
        for i in 0..outputs {
            match self.worker.cache.get(&format!("{key}:{i}"))? {
                Some(r) => refs.push(r),
                None => return Ok(None),
            }
        }
        Ok(Some(refs))
    }

    async fn export_cache(
        &self,
        index: usize,
        opts: &registry::ExportOpts,
        solved: &SolvedBuild,
        progress: &Progress,
    ) -> Result<()> {
        let name = opts.target.name();
        let step = Step::start(
            progress,
            &format!("cache-export-{index}"),
            &format!("exporting cache to {name}"),
        );
        let mut results = Vec::new();
        for r in solved.records.iter().filter(|r| opts.max || r.min) {
            if let Some(outs) = self.local_outputs(&r.key, r.outputs)? {
                for (i, o) in outs.into_iter().enumerate() {
                    results.push((format!("{}:{i}", r.key), o));
                }
            }
        }
        let mut mounts = Vec::new();
        if opts.cache_mounts && !solved.cache_mounts.is_empty() {
            let (content, root) = (self.worker.content.clone(), self.worker.root.clone());
            let (ids, image) = (solved.cache_mounts.clone(), opts.image.clone());
            let (packed, warnings) = tokio::task::spawn_blocking(move || {
                crate::cache::mounts::pack(&content, &root, &ids, &image)
            })
            .await
            .map_err(|e| {
                crate::cache::Error::from(registry::Error::Remote {
                    target: name.clone(),
                    message: format!("cache mount packer failed: {e}"),
                })
            })?;
            for w in warnings {
                tracing::warn!("{w}");
                progress.warn(None, w);
            }
            mounts = packed;
        }
        match self
            .cache_exporter
            .export_with_mounts(&results, &mounts, opts)
            .await
        {
            Ok(_) => {
                step.finish(None);
                Ok(())
            }
            Err(e) if opts.ignore_error => {
                step.finish(None);
                let message = format!("{e} (ignored: ignore-error=true)");
                tracing::warn!("{message}");
                progress.warn(None, message);
                Ok(())
            }
            Err(e) => {
                step.finish(Some(e.to_string()));
                Err(crate::cache::Error::from(e).into())
            }
        }
    }

    async fn dockerfile(
        &self,
        req: &BuildRequest,
        opts: &BuildOpts,
        dockerfile_local: &str,
        progress: &Progress,
    ) -> Result<(pb::Definition, ImageConfigFile)> {
        let mut opts = opts.clone();
        if opts.filename.is_empty() {
            opts.filename = "Dockerfile".to_string();
        }
        let step = Step::start(
            progress,
            "load-dockerfile",
            &format!("[internal] load build definition from {}", opts.filename),
        );
        let dir = req
            .locals
            .get(dockerfile_local)
            .ok_or_else(|| ops::Error::LocalNotFound(dockerfile_local.to_string()))?;
        let path = snapshot::resolve_in_root(dir, &opts.filename, true)?;
        let src = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) => {
                step.finish(Some(e.to_string()));
                return Err(frontend::Error::General {
                    file: opts.filename.clone(),
                    message: format!("cannot read {}: {e}", path.display()),
                }
                .into());
            }
        };
        step.finish(None);
        if opts.dockerignore.is_none() {
            if let Some(ctx) = req.locals.get(&opts.context_name) {
                // `<Dockerfile>.dockerignore` beside the Dockerfile wins over the context's.
                let specific = path.with_file_name(format!(
                    "{}.dockerignore",
                    path.file_name()
                        .map(|f| f.to_string_lossy())
                        .unwrap_or_default()
                ));
                let ignore = std::fs::read_to_string(&specific)
                    .or_else(|_| std::fs::read_to_string(ctx.join(".dockerignore")));
                opts.dockerignore = ignore.ok();
            }
        }
        // Base images can name more images (ONBUILD triggers), so resolve in rounds until
        // the frontend needs nothing new.
        let mut images = frontend::ResolvedImages::new();
        let mut needed = frontend::dockerfile::required_images(&src, &opts)?;
        // One resolver for all rounds: its registry clients (and the credentials asked of
        // the client's session) are reused across base images.
        let resolver = self.images_for(req.session.as_ref());
        for _round in 0..8 {
            if needed.is_empty() {
                break;
            }
            let resolved = futures::future::try_join_all(needed.into_iter().map(|r| {
                let images = resolver.clone();
                let progress = progress.clone();
                async move {
                    let step = Step::start(
                        &progress,
                        &format!("load-metadata-{}-{}", r.reference, r.platform),
                        &format!("[internal] load metadata for {}", r.reference),
                    );
                    match images.resolve(&r.reference, &r.platform).await {
                        Ok(img) => {
                            step.finish(None);
                            Ok((
                                r,
                                ResolvedImageMeta {
                                    canonical: img.canonical,
                                    digest: img.digest,
                                    config: img.config,
                                },
                            ))
                        }
                        Err(e) => {
                            step.finish(Some(e.to_string()));
                            Err(Error::Source(e))
                        }
                    }
                }
            }))
            .await?;
            images.extend(resolved);
            needed = frontend::dockerfile::missing_images(&src, &opts, &images)?;
        }
        let converted = frontend::dockerfile::convert(&src, &opts, &images)?;
        for w in &converted.warnings {
            progress.warn(None, w.clone());
        }
        Ok((converted.definition, converted.config))
    }

    async fn export(
        &self,
        index: usize,
        exp: &ExportRequest,
        solved: &SolvedBuild,
        config: &ImageConfigFile,
        progress: &Progress,
        response: &mut BuildResponse,
    ) -> Result<()> {
        let (result, images) = (&solved.output, &solved.images);
        let dest = || {
            exp.dest
                .clone()
                .or_else(|| exp.attrs.get("dest").map(PathBuf::from))
                .ok_or_else(|| export::Error::Attr {
                    exporter: exp.typ.clone(),
                    message: "dest is required".into(),
                })
        };
        match exp.typ.as_str() {
            "image" | "oci" | "docker" => {
                let opts = ImageOpts::from_attrs(&exp.attrs)?;
                let step = Step::start(
                    progress,
                    &format!("export-{index}"),
                    &format!(
                        "exporting to {}",
                        if exp.typ == "image" {
                            "image".to_string()
                        } else {
                            format!("{} image format", exp.typ)
                        }
                    ),
                );
                let res = self
                    .export_image(exp, &opts, result, config, images, &step, response, dest)
                    .await;
                step.finish(res.as_ref().err().map(|e| solver::error_chain(e)));
                res
            }
            "local" | "tar" => {
                let dest = dest()?;
                let step = Step::start(
                    progress,
                    &format!("export-{index}"),
                    &format!("exporting to {}", dest.display()),
                );
                let worker = self.worker.clone();
                let result = result.clone();
                let typ = exp.typ.clone();
                let res = tokio::task::spawn_blocking(move || -> Result<()> {
                    let tmp = tempfile::Builder::new()
                        .prefix("export-")
                        .tempdir_in(worker.root.join("mounts"))
                        .map_err(io_err("create", &worker.root))?;
                    let target = tmp.path().join("v");
                    std::fs::create_dir(&target).map_err(io_err("create", &target))?;
                    let view = worker
                        .snapshotter
                        .mount_readonly(&result.layer_dirs(), &target)?;
                    let r = if typ == "local" {
                        export::local::export_local(view.path(), &dest)
                    } else if dest == Path::new("-") {
                        export::tar::export_tar(view.path(), &mut std::io::stdout().lock())
                    } else {
                        std::fs::File::create(&dest)
                            .map_err(|source| export::Error::Io {
                                path: dest.clone(),
                                source,
                            })
                            .and_then(|mut f| export::tar::export_tar(view.path(), &mut f))
                    };
                    view.commit()?;
                    Ok(r?)
                })
                .await
                .map_err(|e| export::Error::Attr {
                    exporter: exp.typ.clone(),
                    message: e.to_string(),
                })?;
                step.finish(res.as_ref().err().map(|e| solver::error_chain(e)));
                res
            }
            other => Err(export::Error::Attr {
                exporter: other.to_string(),
                message: "unknown exporter type (known: image, oci, docker, local, tar)".into(),
            }
            .into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn export_image(
        &self,
        exp: &ExportRequest,
        opts: &ImageOpts,
        result: &Ref,
        config: &ImageConfigFile,
        images: &ImageResolver,
        step: &Step,
        response: &mut BuildResponse,
        dest: impl FnOnce() -> Result<PathBuf, export::Error>,
    ) -> Result<()> {
        let worker = self.worker.clone();
        let mut layers = Vec::new();
        for l in result.layers() {
            layers.push(ExportLayer {
                dir: l.fs(),
                blobs: worker.cache.blobs(l)?,
            });
        }
        let ids: Vec<u64> = result.layers().iter().map(|l| l.id).collect();
        let (content, cfg, o) = (worker.content.clone(), config.clone(), opts.clone());
        let built = tokio::task::spawn_blocking(move || {
            export::image::build_image(&content, &layers, &cfg, &o)
        })
        .await
        .map_err(|e| export::Error::Attr {
            exporter: exp.typ.clone(),
            message: e.to_string(),
        })??;
        let new_blobs: Vec<(u64, export::LayerBlob)> = ids
            .iter()
            .zip(&built.layers)
            .filter_map(|(id, b)| b.clone().map(|b| (*id, b)))
            .collect();
        worker.cache.record_blobs(&new_blobs)?;
        let desc = export::image::descriptor(&built);
        response.exporter_response.insert(
            "containerimage.digest".into(),
            built.manifest_digest.clone(),
        );
        response.exporter_response.insert(
            "containerimage.config.digest".into(),
            built.config_digest.clone(),
        );
        response.exporter_response.insert(
            "containerimage.descriptor".into(),
            base64::engine::general_purpose::STANDARD.encode(desc.to_string()),
        );
        if !opts.names.is_empty() {
            response
                .exporter_response
                .insert("image.name".into(), opts.names.join(","));
        }
        match exp.typ.as_str() {
            "image" => {
                if opts.push {
                    for name in &opts.names {
                        let id = format!("pushing {name}");
                        let last = std::sync::Mutex::new((0u64, 0u64));
                        let report = |done: u64, total: u64| {
                            if let Ok(mut l) = last.lock() {
                                *l = (done, total);
                            }
                            step.status(&id, &id, done, total, false)
                        };
                        let resolver = if opts.insecure {
                            images.with_insecure_host(registry_host(name))
                        } else {
                            images.clone()
                        };
                        export::image::push(&resolver, &worker.content, &built, name, &report)
                            .await?;
                        let (done, total) = last.lock().map(|l| *l).unwrap_or_default();
                        step.status(&id, &id, done, total, true);
                    }
                }
            }
            typ => {
                let dest = dest()?;
                let content = worker.content.clone();
                let names = opts.names.clone();
                let typ = typ.to_string();
                let layout = !tar_output(exp)?;
                tokio::task::spawn_blocking(move || -> Result<(), export::Error> {
                    if layout {
                        return write_oci_layout(&content, &built, &names, &dest);
                    }
                    let mut out: Box<dyn std::io::Write> = if dest == Path::new("-") {
                        Box::new(std::io::stdout().lock())
                    } else {
                        Box::new(std::io::BufWriter::new(
                            std::fs::File::create(&dest).map_err(|source| export::Error::Io {
                                path: dest.clone(),
                                source,
                            })?,
                        ))
                    };
                    if typ == "oci" {
                        export::oci::write_oci_tar(&content, &built, &names, &mut out)?;
                    } else {
                        export::docker::write_docker_tar(&content, &built, &names, &mut out)?;
                    }
                    out.flush().map_err(|source| export::Error::Io {
                        path: dest.clone(),
                        source,
                    })
                })
                .await
                .map_err(|e| export::Error::Attr {
                    exporter: exp.typ.clone(),
                    message: e.to_string(),
                })??;
            }
        }
        Ok(())
    }
}

/// Whether an `oci`/`docker` output is a tarball (`tar=true`, the default) rather than
/// an OCI layout directory (`tar=false`).
pub fn tar_output(exp: &ExportRequest) -> Result<bool, export::Error> {
    match exp.attrs.get("tar").map(String::as_str) {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(export::Error::Attr {
            exporter: exp.typ.clone(),
            message: format!("tar={other:?} is not a boolean"),
        }),
    }
}

/// Writes the image as an OCI layout directory at `dir` (`tar=false`): its blobs (kept
/// when already there with the right size), `oci-layout` and `index.json` naming it.
fn write_oci_layout(
    content: &ContentStore,
    built: &export::image::BuiltImage,
    names: &[String],
    dir: &Path,
) -> Result<(), export::Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| export::Error::Io { path, source }
    };
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    for digest in export::oci::blob_digests(built) {
        let hex = crate::content::validate_digest(&digest)?;
        let size = content.size(&digest)?;
        let path = blobs.join(hex);
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == size) {
            continue;
        }
        // Written beside and renamed, so a blob is never seen half-written.
        let tmp = blobs.join(format!(".{hex}.tmp"));
        let mut src = content.open_blob(&digest)?;
        let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        std::io::copy(&mut src, &mut out).map_err(io(&tmp))?;
        out.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    let layout = dir.join("oci-layout");
    std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&layout))?;
    let index = dir.join("index.json");
    let json = export::oci::index_json(built, names)?;
    std::fs::write(&index, json).map_err(io(&index))
}

/// The snapshotter kind for this root: probed once (a test overlay mount costs tens of
/// milliseconds), then remembered in `root/snapshotter`.
fn detect_snapshotter(root: &Path, scratch: &Path) -> Snapshotter {
    let file = root.join("snapshotter");
    match std::fs::read_to_string(&file).as_deref().map(str::trim) {
        Ok("overlayfs") => return Snapshotter::with_kind(snapshot::Kind::Overlay),
        Ok("native") => return Snapshotter::with_kind(snapshot::Kind::Copy),
        _ => {}
    }
    let s = Snapshotter::detect(scratch);
    let name = match s.kind() {
        snapshot::Kind::Overlay => "overlayfs",
        snapshot::Kind::Copy => "native",
    };
    tracing::info!(snapshotter = name, "detected snapshotter");
    if let Err(e) = std::fs::write(&file, name) {
        tracing::warn!(error = %e, "cannot remember the snapshotter kind");
    }
    s
}

/// Kills and deletes containers a previous process left in the runtime's state dir.
fn reap_containers(runtime: Runtime, executor_root: &Path) {
    let state = executor_root.join("runc");
    let Ok(entries) = std::fs::read_dir(&state) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().to_string();
        tracing::warn!(container = %id, "removing container left by a previous run");
        let _ = std::process::Command::new(runtime.binary())
            .arg("--root")
            .arg(&state)
            .args(["delete", "--force", &id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(executor_root.join("bundles"));
}

/// Detaches every mount below `root` (deepest first), as listed in /proc/self/mountinfo.
fn unmount_under(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&root) && p != &root)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        tracing::warn!(mount = %p.display(), "unmounting mount left by a previous run");
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// The registry host of an image name (`localhost:5000/a/b:1` → `localhost:5000`).
fn registry_host(name: &str) -> &str {
    match name.split_once('/') {
        Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => host,
        _ => "docker.io",
    }
}

/// The display name of a vertex: `llb.customname`, else derived from the op.
pub fn vertex_name(v: &llb::Vertex) -> String {
    if let Some(n) = v.metadata.description.get("llb.customname") {
        return n.clone();
    }
    match &v.op.op {
        Some(pb::op::Op::Source(s)) => s.identifier.clone(),
        Some(pb::op::Op::Exec(e)) => e
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default(),
        Some(pb::op::Op::File(f)) => {
            let names: Vec<&str> = f
                .actions
                .iter()
                .map(|a| match &a.action {
                    Some(pb::file_action::Action::Copy(_)) => "copy",
                    Some(pb::file_action::Action::Mkfile(_)) => "mkfile",
                    Some(pb::file_action::Action::Mkdir(_)) => "mkdir",
                    Some(pb::file_action::Action::Rm(_)) => "rm",
                    Some(pb::file_action::Action::Symlink(_)) => "symlink",
                    None => "?",
                })
                .collect();
            names.join(", ")
        }
        Some(pb::op::Op::Merge(_)) => "merge".into(),
        Some(pb::op::Op::Diff(_)) => "diff".into(),
        Some(pb::op::Op::Build(_)) => "build".into(),
        Some(pb::op::Op::Passthrough(p)) => format!("passthrough {}", p.id),
        None => String::new(),
    }
}

/// The secret names a `git://` source may use for credentials (none for other sources).
fn git_auth_secrets(s: &pb::SourceOp) -> Vec<String> {
    if !s.identifier.starts_with("git://") {
        return Vec::new();
    }
    let name = |key: &str, default: &str| {
        s.attrs
            .get(key)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    vec![
        name(
            "git.authtokensecret",
            crate::source::git::DEFAULT_TOKEN_SECRET,
        ),
        name(
            "git.authheadersecret",
            crate::source::git::DEFAULT_HEADER_SECRET,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain\04"), r"/plain\04");
    }
}
