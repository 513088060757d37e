//! The solver: runs a build graph of vertices with bounded parallelism, keys every result
//! by content, loads what the cache has, and deduplicates identical work across
//! concurrent builds by cache key. Generic over the [`Op`] trait and the [`ResultCache`]
//! it loads from and saves to; it never names a concrete op. May use `progress`.
//!
//! Each vertex has two lazily computed, shared values: its cache key (from its op and its
//! inputs' keys, plus input contents where the op asks for them) and its outputs. A vertex
//! whose key is in the cache is loaded without resolving its inputs at all, so a rebuild of
//! an unchanged project touches only the keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::progress::{Progress, VertexState};

/// A boxed error from an op or a cache.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong solving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vertex failed.
    #[error("{name}: {source}")]
    Vertex {
        /// Display name of the vertex.
        name: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// A vertex failed in a build that shared it (deduplicated work).
    #[error("{0}")]
    Shared(Arc<Error>),
    /// The graph is malformed (bad edge).
    #[error("invalid graph: {0}")]
    Graph(String),
    /// The build was cancelled.
    #[error("build cancelled")]
    Cancelled,
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Context an op runs in.
#[derive(Debug, Clone)]
pub struct VertexCtx {
    /// The vertex digest.
    pub digest: String,
    /// Its display name.
    pub name: String,
    /// Where its logs and statuses go.
    pub progress: Progress,
    /// Cancelled when the build is.
    pub cancel: CancellationToken,
}

/// One operation of the graph.
#[async_trait]
pub trait Op: Send + Sync + 'static {
    /// The result type (a cache ref).
    type Output: Clone + Send + Sync + 'static;

    /// How many outputs the op produces.
    fn outputs(&self) -> usize {
        1
    }

    /// The inputs whose contents the cache key depends on (the sources of file copies);
    /// they are resolved before the key is known. Other inputs count by key only.
    fn content_inputs(&self) -> Vec<usize> {
        Vec::new()
    }

    /// The definition part of the cache key, the same on every worker for the same op, when
    /// the op has [`Op::content_inputs`]: with its inputs' keys it names the key computed
    /// from their contents, so a remote cache can map it to that key ([`RemoteCache::alias`])
    /// and the contents need not be fetched. `None`: no such shortcut.
    fn definition_key(&self) -> Option<String> {
        None
    }

    /// The op's part of its cache key: a digest of what its result depends on besides its
    /// inputs' keys (the op definition; the contents of a local directory; the contents
    /// it will read from the inputs named by [`Op::content_inputs`], which are `Some` in
    /// `inputs`).
    async fn cache_key(
        &self,
        ctx: &VertexCtx,
        inputs: &[Option<Self::Output>],
    ) -> Result<String, BoxError>;

    /// Runs the op on resolved inputs.
    async fn exec(
        &self,
        ctx: &VertexCtx,
        inputs: &[Self::Output],
    ) -> Result<Vec<Self::Output>, BoxError>;
}

/// Where results are kept by cache key.
#[async_trait]
pub trait ResultCache<R: Clone + Send + Sync + 'static>: Send + Sync + 'static {
    /// The outputs stored under `key`, if all of them are there.
    async fn load(&self, key: &str, outputs: usize) -> Result<Option<Vec<R>>, BoxError>;
    /// Stores outputs under `key`.
    async fn save(&self, key: &str, outputs: &[R]) -> Result<(), BoxError>;
    /// `output` ready to be read (an op's input, contents to hash): a lazy result is
    /// fetched now. The default returns it as is.
    async fn ready(&self, output: &R) -> Result<R, BoxError> {
        Ok(output.clone())
    }
}

/// Results kept outside the local cache (an imported cache, the pool cache), consulted on
/// a local miss before a vertex executes.
#[async_trait]
pub trait RemoteCache<R>: Send + Sync + 'static {
    /// The outputs stored under `key`, verified and already saved to the local cache. A miss
    /// or a failure is `None`; failures are reported as warnings through `ctx.progress`.
    async fn load(&self, ctx: &VertexCtx, key: &str, outputs: usize) -> Option<Vec<R>>;

    /// The content-based cache key that the definition key `strict` (see
    /// [`Op::definition_key`]) was computed to, if this cache knows it. Default: none.
    async fn alias(&self, _ctx: &VertexCtx, _strict: &str) -> Option<String> {
        None
    }

    /// Tells the cache that `strict` was computed to `key` (to share it). Default: ignored.
    fn learn_alias(&self, _strict: &str, _key: &str) {}
}

/// An edge: output `output` of vertex number `vertex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Edge {
    /// Index into [`Graph::vertices`].
    pub vertex: usize,
    /// Output index.
    pub output: usize,
}

/// A vertex of a graph to solve.
pub struct Vertex<O> {
    /// Digest (the LLB op digest).
    pub digest: String,
    /// Display name.
    pub name: String,
    /// The op.
    pub op: Arc<O>,
    /// Its inputs, in op order.
    pub inputs: Vec<Edge>,
    /// Skip the cache lookup (`--no-cache`).
    pub ignore_cache: bool,
}

/// A graph to solve: vertices with inputs before users, and the result edge.
pub struct Graph<O: Op> {
    /// Vertices; inputs refer to earlier indexes.
    pub vertices: Vec<Vertex<O>>,
    /// The result.
    pub result: Edge,
    /// Remote caches to consult, in order, on a local miss.
    pub remote: Vec<Arc<dyn RemoteCache<O::Output>>>,
}

/// A solved result.
#[derive(Debug, Clone)]
pub struct Solved<R> {
    /// The result's cache key.
    pub key: String,
    /// The result.
    pub output: R,
    /// Every vertex whose cache key the build computed, inputs before users.
    pub records: Vec<KeyRecord>,
}

/// A vertex of a solved build, as cache exporters see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The vertex cache key; output `i` is stored under `{key}:{i}`.
    pub key: String,
    /// How many outputs it has.
    pub outputs: usize,
    /// It executed in this build (not a local or remote cache hit).
    pub executed: bool,
    /// It is the build's result, or its contents fed a cache key (a `COPY --from` source):
    /// what `mode=min` exports.
    pub min: bool,
}

type SharedResult<T> = Shared<BoxFuture<'static, Result<T, Arc<Error>>>>;
type SharedKey = SharedResult<String>;
type SharedOutputs<R> = SharedResult<Vec<R>>;

/// The solver; one per engine, shared by all its builds.
pub struct Solver<O: Op> {
    cache: Arc<dyn ResultCache<O::Output>>,
    limit: Arc<Semaphore>,
    inflight: Mutex<HashMap<String, SharedOutputs<O::Output>>>,
}

// === impl Solver ===

impl<O: Op> Solver<O> {
    /// A solver running at most `max_parallelism` ops at once.
    pub fn new(cache: Arc<dyn ResultCache<O::Output>>, max_parallelism: usize) -> Arc<Self> {
        Arc::new(Solver {
            cache,
            limit: Arc::new(Semaphore::new(max_parallelism.max(1))),
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Solves `graph`, reporting vertex progress to `progress`.
    pub async fn solve(
        self: &Arc<Self>,
        graph: Graph<O>,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Solved<O::Output>> {
        for (i, v) in graph.vertices.iter().enumerate() {
            for e in &v.inputs {
                if e.vertex >= i {
                    return Err(Error::Graph(format!(
                        "vertex {} uses vertex {} that is not defined before it",
                        v.digest, e.vertex
                    )));
                }
                let outputs = graph.vertices[e.vertex].op.outputs();
                if e.output >= outputs {
                    return Err(Error::Graph(format!(
                        "vertex {} uses output {} of {} which has {} outputs",
                        v.digest, e.output, graph.vertices[e.vertex].digest, outputs
                    )));
                }
            }
        }
        if graph.result.vertex >= graph.vertices.len() {
            return Err(Error::Graph("result vertex out of range".to_string()));
        }
        let build = Arc::new(Build {
            solver: self.clone(),
            states: graph
                .vertices
                .iter()
                .map(|v| {
                    Mutex::new(VertexState {
                        digest: v.digest.clone(),
                        inputs: v
                            .inputs
                            .iter()
                            .map(|e| graph.vertices[e.vertex].digest.clone())
                            .collect(),
                        name: v.name.clone(),
                        started: None,
                        completed: None,
                        cached: false,
                        error: None,
                    })
                })
                .collect(),
            keys: (0..graph.vertices.len())
                .map(|_| Mutex::new(None))
                .collect(),
            outputs: (0..graph.vertices.len())
                .map(|_| Mutex::new(None))
                .collect(),
            executed: (0..graph.vertices.len())
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            reruns: (0..graph.vertices.len())
                .map(|_| Mutex::new(None))
                .collect(),
            graph,
            progress,
            cancel: cancel.clone(),
        });
        for s in &build.states {
            if let Ok(s) = s.lock() {
                build.progress.vertex(&s);
            }
        }
        let result = build.graph.result;
        let fut = async {
            let key = build.key(result.vertex).await.map_err(unshare)?;
            let outs = build.outputs(result.vertex).await.map_err(unshare)?;
            let output = outs
                .get(result.output)
                .cloned()
                .ok_or_else(|| Error::Graph("result output out of range".to_string()))?;
            Ok::<_, Error>(Solved {
                key: format!("{key}:{}", result.output),
                output,
                records: build.records(),
            })
        };
        // Also when this future is dropped (a client that went away mid-call).
        let _release = Release(&build);
        let res = tokio::select! {
            r = fut => r,
            _ = cancel.cancelled() => Err(Error::Cancelled),
        };
        build.finish(res.is_ok());
        res
    }
}

fn unshare(e: Arc<Error>) -> Error {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(e) => Error::Shared(e),
    }
}

/// The state of one build.
struct Build<O: Op> {
    solver: Arc<Solver<O>>,
    graph: Graph<O>,
    states: Vec<Mutex<VertexState>>,
    keys: Vec<Mutex<Option<SharedKey>>>,
    outputs: Vec<Mutex<Option<SharedOutputs<O::Output>>>>,
    /// Set when the vertex's op ran in this build.
    executed: Vec<std::sync::atomic::AtomicBool>,
    /// Outputs of vertices executed after all because their remote hit could not be
    /// fetched when read.
    reruns: Vec<Mutex<Option<SharedOutputs<O::Output>>>>,
    progress: Progress,
    cancel: CancellationToken,
}

// === impl Build ===

impl<O: Op> Build<O> {
    fn ctx(&self, i: usize) -> VertexCtx {
        let v = &self.graph.vertices[i];
        VertexCtx {
            digest: v.digest.clone(),
            name: v.name.clone(),
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
        }
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut VertexState)) {
        if let Ok(mut s) = self.states[i].lock() {
            f(&mut s);
            self.progress.vertex(&s);
        }
    }

    /// Marks every vertex that never completed: cached on success (its result was not
    /// needed because a dependent came from the cache), cancelled otherwise.
    fn finish(&self, ok: bool) {
        let now = SystemTime::now();
        for i in 0..self.states.len() {
            let pending = self.states[i]
                .lock()
                .map(|s| s.completed.is_none())
                .unwrap_or(false);
            if !pending {
                continue;
            }
            self.update(i, |s| {
                if ok {
                    s.cached = true;
                    s.started.get_or_insert(now);
                    s.completed = Some(now);
                } else if s.started.is_some() {
                    s.completed = Some(now);
                    s.error = Some("context canceled".to_string());
                }
            });
        }
    }

    /// Drops the memoized futures. They hold this build (an `Arc` cycle), so without this
    /// the work of a cancelled build would stay parked, unpolled, for as long as the process
    /// lives (a running container with it); dropped, a container is killed and deleted by
    /// its runtime's drop guard. Work another build shares stays alive through its clone.
    fn release(&self) {
        let mut parked: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        for slot in &self.keys {
            if let Some(f) = slot.lock().ok().and_then(|mut s| s.take()) {
                parked.push(Box::new(f));
            }
        }
        for slot in self.outputs.iter().chain(&self.reruns) {
            if let Some(f) = slot.lock().ok().and_then(|mut s| s.take()) {
                parked.push(Box::new(f));
            }
        }
        drop(parked);
    }

    /// The vertices whose keys are known, inputs first.
    fn records(&self) -> Vec<KeyRecord> {
        let keys: Vec<Option<String>> = self
            .keys
            .iter()
            .map(|slot| {
                slot.lock()
                    .ok()
                    .and_then(|s| s.as_ref().and_then(|f| f.peek().cloned()))
                    .and_then(|r| r.ok())
            })
            .collect();
        let mut min = vec![false; keys.len()];
        min[self.graph.result.vertex] = true;
        for (i, v) in self.graph.vertices.iter().enumerate() {
            if keys[i].is_none() {
                continue;
            }
            for n in v.op.content_inputs() {
                if let Some(e) = v.inputs.get(n) {
                    min[e.vertex] = true;
                }
            }
        }
        keys.into_iter()
            .enumerate()
            .filter_map(|(i, k)| {
                Some(KeyRecord {
                    key: k?,
                    outputs: self.graph.vertices[i].op.outputs(),
                    executed: self.executed[i].load(std::sync::atomic::Ordering::Relaxed),
                    min: min[i],
                })
            })
            .collect()
    }

    fn key(self: &Arc<Self>, i: usize) -> SharedKey {
        let this = self.clone();
        memo(&self.keys[i], move || {
            async move { this.compute_key(i).await.map_err(Arc::new) }.boxed()
        })
    }

    async fn compute_key(self: Arc<Self>, i: usize) -> Result<String> {
        let v = &self.graph.vertices[i];
        // Inputs whose contents the op hashes itself count by content, not by key: an
        // unrelated change elsewhere in them must not change this vertex's key.
        let wanted = v.op.content_inputs();
        // A remote cache may know the key this definition and these inputs' keys were
        // computed to: then the contents need not be fetched at all.
        let strict = match v.op.definition_key() {
            Some(def) if !wanted.is_empty() && !v.ignore_cache && !self.graph.remote.is_empty() => {
                let keys = futures::future::try_join_all(v.inputs.iter().map(|e| {
                    let k = self.key(e.vertex);
                    async move { k.await.map(|k| format!("{k}:{}", e.output)) }
                }))
                .await
                .map_err(unshare)?;
                let mut h = Sha256::new();
                h.update(b"kiln-definition-key/v1\0");
                h.update(def.as_bytes());
                for k in &keys {
                    h.update(b"\0");
                    h.update(k.as_bytes());
                }
                let strict = format!("sha256:{}", hex::encode(h.finalize()));
                let ctx = self.ctx(i);
                for remote in &self.graph.remote {
                    if let Some(key) = remote.alias(&ctx, &strict).await {
                        tracing::debug!(vertex = %v.digest, %key, "cache key from a remote alias");
                        return Ok(key);
                    }
                }
                Some(strict)
            }
            _ => None,
        };
        let keys = futures::future::try_join_all(v.inputs.iter().enumerate().map(|(n, e)| {
            let k = (!wanted.contains(&n)).then(|| self.key(e.vertex));
            async move {
                match k {
                    Some(k) => k.await.map(|k| format!("{k}:{}", e.output)),
                    None => Ok(format!("content:{n}")),
                }
            }
        }));
        // Resolved concurrently with the other inputs' keys, so independent branches run in
        // parallel.
        let contents = futures::future::try_join_all(v.inputs.iter().enumerate().map(|(n, e)| {
            let f = wanted.contains(&n).then(|| self.outputs(e.vertex));
            let idx = e.output;
            let this = self.clone();
            let from = e.vertex;
            async move {
                match f {
                    None => Ok(None),
                    Some(f) => {
                        let outs = f.await?;
                        match outs.get(idx) {
                            Some(r) => this
                                .ready(i, from, idx, r)
                                .await
                                .map(Some)
                                .map_err(Arc::new),
                            None => Ok(None),
                        }
                    }
                }
            }
        }));
        let (input_keys, inputs) = futures::future::try_join(keys, contents)
            .await
            .map_err(unshare)?;
        let ctx = self.ctx(i);
        let own =
            v.op.cache_key(&ctx, &inputs)
                .await
                .map_err(|source| Error::Vertex {
                    name: v.name.clone(),
                    source,
                })?;
        let mut h = Sha256::new();
        h.update(own.as_bytes());
        for k in &input_keys {
            h.update(b"\0");
            h.update(k.as_bytes());
        }
        let key = format!("sha256:{}", hex::encode(h.finalize()));
        if let Some(strict) = strict {
            for remote in &self.graph.remote {
                remote.learn_alias(&strict, &key);
            }
        }
        Ok(key)
    }

    async fn input_outputs(self: &Arc<Self>, i: usize) -> Result<Vec<O::Output>> {
        let v = &self.graph.vertices[i];
        futures::future::try_join_all(v.inputs.iter().map(|e| {
            let f = self.outputs(e.vertex);
            let idx = e.output;
            async move {
                let outs = f.await.map_err(unshare)?;
                let out = outs
                    .get(idx)
                    .ok_or_else(|| Error::Graph(format!("missing output {idx}")))?;
                self.ready(i, e.vertex, idx, out).await
            }
        }))
        .await
    }

    /// `out`, output `idx` of vertex `j` and an input of vertex `i`, made ready to read (a
    /// lazy remote hit is fetched now). When that fails (a blob missing or corrupt), `j` is
    /// executed after all, once, with a warning; its result replaces the hit.
    async fn ready(
        self: &Arc<Self>,
        i: usize,
        j: usize,
        idx: usize,
        out: &O::Output,
    ) -> Result<O::Output> {
        let source = match self.solver.cache.ready(out).await {
            Ok(r) => return Ok(r),
            Err(source) => source,
        };
        let vj = &self.graph.vertices[j];
        let message = format!(
            "{}: {source}; executing {} instead",
            self.graph.vertices[i].name, vj.name
        );
        tracing::warn!(vertex = %vj.digest, "{message}");
        self.progress.warn(Some(&vj.digest), message);
        let this = self.clone();
        let rerun = memo(&self.reruns[j], move || {
            async move {
                let key = this.key(j).await?;
                this.run(j, key).await.map_err(Arc::new)
            }
            .boxed()
        });
        let outs = rerun.await.map_err(unshare)?;
        outs.get(idx)
            .cloned()
            .ok_or_else(|| Error::Graph(format!("missing output {idx}")))
    }

    fn outputs(self: &Arc<Self>, i: usize) -> SharedOutputs<O::Output> {
        let this = self.clone();
        memo(&self.outputs[i], move || {
            async move { this.compute_outputs(i).await.map_err(Arc::new) }.boxed()
        })
    }

    async fn compute_outputs(self: Arc<Self>, i: usize) -> Result<Vec<O::Output>> {
        let key = self.key(i).await.map_err(unshare)?;
        let v = &self.graph.vertices[i];
        let n = v.op.outputs();
        if !v.ignore_cache {
            let hit = self
                .solver
                .cache
                .load(&key, n)
                .await
                .map_err(|source| Error::Vertex {
                    name: v.name.clone(),
                    source,
                })?;
            if let Some(outs) = hit {
                let now = SystemTime::now();
                self.update(i, |s| {
                    s.started = Some(now);
                    s.completed = Some(now);
                    s.cached = true;
                });
                return Ok(outs);
            }
        }
        // Identical work in another build (same key) is shared, not repeated.
        let (fut, owner) = {
            let mut inflight = self
                .solver
                .inflight
                .lock()
                .map_err(|_| Error::Graph("poisoned".into()))?;
            match inflight.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let this = self.clone();
                    let k = key.clone();
                    let fut = async move { this.execute(i, &k).await.map_err(Arc::new) }
                        .boxed()
                        .shared();
                    inflight.insert(key.clone(), fut.clone());
                    (fut, true)
                }
            }
        };
        if owner {
            // The entry goes when this await ends or is dropped (a cancelled build): a
            // stale entry would keep the shared work alive but unpolled, holding whatever it
            // runs (a container) until a later build with the same key polled it again.
            let _entry = InflightEntry {
                solver: &self.solver,
                key: &key,
            };
            return fut.await.map_err(unshare);
        }
        let now = SystemTime::now();
        self.update(i, |s| s.started = Some(now));
        let res = fut.await;
        let done = SystemTime::now();
        self.update(i, |s| {
            s.completed = Some(done);
            if let Err(e) = &res {
                s.error = Some(e.to_string());
            }
        });
        res.map_err(unshare)
    }

    async fn execute(self: Arc<Self>, i: usize, key: &str) -> Result<Vec<O::Output>> {
        let v = &self.graph.vertices[i];
        if !v.ignore_cache {
            // Before resolving inputs: a remote hit needs none of them.
            let n = v.op.outputs();
            let ctx = self.ctx(i);
            for remote in &self.graph.remote {
                if let Some(outs) = remote.load(&ctx, key, n).await {
                    if outs.len() == n {
                        let now = SystemTime::now();
                        self.update(i, |s| {
                            s.started.get_or_insert(now);
                            s.completed = Some(now);
                            s.cached = true;
                        });
                        return Ok(outs);
                    }
                }
            }
        }
        self.run(i, key.to_string()).await
    }

    /// Runs vertex `i`'s op on its inputs and saves the result under `key` (boxed: it recurses through
    /// [`Build::ready`]).
    fn run(self: Arc<Self>, i: usize, key: String) -> BoxFuture<'static, Result<Vec<O::Output>>> {
        async move {
            let v = &self.graph.vertices[i];
            let inputs = self.input_outputs(i).await?;
            let _permit = self
                .solver
                .limit
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::Cancelled)?;
            let started = SystemTime::now();
            self.update(i, |s| {
                s.started = Some(started);
                s.cached = false;
            });
            let ctx = self.ctx(i);
            tracing::debug!(vertex = %v.digest, name = %v.name, "exec");
            self.executed[i].store(true, std::sync::atomic::Ordering::Relaxed);
            let res = v.op.exec(&ctx, &inputs).await;
            let res = match res {
                Ok(outs) if outs.len() == v.op.outputs() => {
                    self.solver
                        .cache
                        .save(&key, &outs)
                        .await
                        .map_err(|source| Error::Vertex {
                            name: v.name.clone(),
                            source,
                        })?;
                    Ok(outs)
                }
                Ok(outs) => Err(Error::Vertex {
                    name: v.name.clone(),
                    source: format!(
                        "op returned {} outputs, expected {}",
                        outs.len(),
                        v.op.outputs()
                    )
                    .into(),
                }),
                Err(source) => Err(Error::Vertex {
                    name: v.name.clone(),
                    source,
                }),
            };
            let done = SystemTime::now();
            self.update(i, |s| {
                s.completed = Some(done);
                if let Err(e) = &res {
                    s.error = Some(error_chain(e));
                }
            });
            res
        }
        .boxed()
    }
}

/// Releases a build's memoized work when its solve ends or is dropped.
struct Release<'a, O: Op>(&'a Build<O>);

impl<O: Op> Drop for Release<'_, O> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Removes a key from the solver's in-flight table when its owner stops waiting for it.
struct InflightEntry<'a, O: Op> {
    solver: &'a Solver<O>,
    key: &'a str,
}

impl<O: Op> Drop for InflightEntry<'_, O> {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.solver.inflight.lock() {
            inflight.remove(self.key);
        }
    }
}

/// The shared future in `slot`, started by `start` the first time it is asked for.
fn memo<T: Clone + Send + Sync + 'static>(
    slot: &Mutex<Option<SharedResult<T>>>,
    start: impl FnOnce() -> BoxFuture<'static, Result<T, Arc<Error>>>,
) -> SharedResult<T> {
    let Ok(mut slot) = slot.lock() else {
        return futures::future::ready(Err(Arc::new(Error::Graph("poisoned lock".into()))))
            .boxed()
            .shared();
    };
    slot.get_or_insert_with(|| start().shared()).clone()
}

/// An error and its sources joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Concatenates its name onto its inputs' strings; counts executions.
    struct Cat {
        name: String,
        runs: Arc<AtomicUsize>,
        barrier: Option<Arc<tokio::sync::Barrier>>,
        fail: bool,
    }

    #[async_trait]
    impl Op for Cat {
        type Output = String;
        async fn cache_key(
            &self,
            _ctx: &VertexCtx,
            _inputs: &[Option<String>],
        ) -> Result<String, BoxError> {
            Ok(self.name.clone())
        }
        async fn exec(&self, _ctx: &VertexCtx, inputs: &[String]) -> Result<Vec<String>, BoxError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            if let Some(b) = &self.barrier {
                // Both independent vertices must be running at once to pass this.
                tokio::time::timeout(std::time::Duration::from_secs(10), b.wait()).await?;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if self.fail {
                return Err("exit code: 3".into());
            }
            Ok(vec![format!("{}({})", self.name, inputs.join(","))])
        }
    }

    #[derive(Default)]
    struct MemCache(Mutex<HashMap<String, Vec<String>>>);

    #[async_trait]
    impl ResultCache<String> for MemCache {
        async fn load(&self, key: &str, _n: usize) -> Result<Option<Vec<String>>, BoxError> {
            Ok(self.0.lock().map_err(|e| e.to_string())?.get(key).cloned())
        }
        async fn save(&self, key: &str, outputs: &[String]) -> Result<(), BoxError> {
            self.0
                .lock()
                .map_err(|e| e.to_string())?
                .insert(key.to_string(), outputs.to_vec());
            Ok(())
        }
    }

    fn diamond(runs: &Arc<AtomicUsize>, leaf: &str, barrier: bool) -> Graph<Cat> {
        let b = barrier.then(|| Arc::new(tokio::sync::Barrier::new(2)));
        let op = |name: &str, barrier: Option<Arc<tokio::sync::Barrier>>| {
            Arc::new(Cat {
                name: name.to_string(),
                runs: runs.clone(),
                barrier,
                fail: false,
            })
        };
        let v = |d: &str, o: Arc<Cat>, inputs: Vec<usize>| Vertex {
            digest: d.to_string(),
            name: d.to_string(),
            op: o,
            inputs: inputs
                .into_iter()
                .map(|vertex| Edge { vertex, output: 0 })
                .collect(),
            ignore_cache: false,
        };
        Graph {
            vertices: vec![
                v("root", op(leaf, None), vec![]),
                v("a", op("a", b.clone()), vec![0]),
                v("b", op("b", b), vec![0]),
                v("top", op("top", None), vec![1, 2]),
            ],
            result: Edge {
                vertex: 3,
                output: 0,
            },
            remote: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn independent_vertices_overlap_and_rebuild_is_cached() -> anyhow::Result<()> {
        let cache = Arc::new(MemCache::default());
        let solver = Solver::new(cache, 4);
        let runs = Arc::new(AtomicUsize::new(0));
        let (progress, mut rx) = Progress::channel();
        let out = solver
            .solve(
                diamond(&runs, "r", true),
                progress,
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(out.output, "top(a(r()),b(r()))");
        assert_eq!(runs.load(Ordering::SeqCst), 4);

        // Unchanged rebuild: nothing runs, every vertex reports cached.
        let (progress, _rx2) = Progress::channel();
        let again = solver
            .solve(
                diamond(&runs, "r", false),
                progress,
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(again.output, out.output);
        assert_eq!(again.key, out.key);
        assert_eq!(runs.load(Ordering::SeqCst), 4);

        // A changed leaf re-runs everything above it.
        let (progress, _rx3) = Progress::channel();
        let changed = solver
            .solve(
                diamond(&runs, "r2", false),
                progress,
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(changed.output, "top(a(r2()),b(r2()))");
        assert_eq!(runs.load(Ordering::SeqCst), 8);
        rx.close();
        let mut completed = 0;
        while let Ok(ev) = rx.try_recv() {
            if let crate::progress::Event::Vertex(s) = ev {
                if s.completed.is_some() {
                    assert!(!s.cached, "first build executed {}", s.digest);
                    completed += 1;
                }
            }
        }
        assert_eq!(completed, 4);
        Ok(())
    }

    /// Never finishes: says when it started and, through a guard, when its work was dropped.
    struct Hang {
        started: Arc<tokio::sync::Notify>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }

    struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Op for Hang {
        type Output = String;
        async fn cache_key(
            &self,
            _ctx: &VertexCtx,
            _inputs: &[Option<String>],
        ) -> Result<String, BoxError> {
            Ok("hang".into())
        }
        async fn exec(
            &self,
            _ctx: &VertexCtx,
            _inputs: &[String],
        ) -> Result<Vec<String>, BoxError> {
            let _guard = SetOnDrop(self.dropped.clone());
            self.started.notify_one();
            std::future::pending::<()>().await;
            Ok(vec![])
        }
    }

    fn hang_graph(op: Hang) -> Graph<Hang> {
        Graph {
            vertices: vec![Vertex {
                digest: "hang".into(),
                name: "hang".into(),
                op: Arc::new(op),
                inputs: vec![],
                ignore_cache: false,
            }],
            result: Edge {
                vertex: 0,
                output: 0,
            },
            remote: Vec::new(),
        }
    }

    /// The work of a cancelled build is dropped (a container's drop guard kills it), not
    /// left parked: the build's memoized futures used to keep it alive through an `Arc` cycle.
    #[tokio::test]
    async fn cancelled_or_dropped_build_drops_its_running_work() -> anyhow::Result<()> {
        for drop_instead_of_cancel in [false, true] {
            let solver = Solver::new(Arc::new(MemCache::default()), 4);
            let started = Arc::new(tokio::sync::Notify::new());
            let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let graph = hang_graph(Hang {
                started: started.clone(),
                dropped: dropped.clone(),
            });
            let cancel = CancellationToken::new();
            let (progress, _rx) = Progress::channel();
            let mut solve = Box::pin(solver.solve(graph, progress, cancel.clone()));
            tokio::select! {
                _ = &mut solve => anyhow::bail!("a hanging build finished"),
                _ = started.notified() => {}
            }
            assert!(!dropped.load(Ordering::SeqCst));
            if drop_instead_of_cancel {
                drop(solve);
            } else {
                cancel.cancel();
                let err = solve.await.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.contains("cancelled"), "{err}");
            }
            assert!(
                dropped.load(Ordering::SeqCst),
                "the running op outlived its build (dropped future: {drop_instead_of_cancel})"
            );
            assert!(solver
                .inflight
                .lock()
                .map(|m| m.is_empty())
                .unwrap_or(false));
        }
        Ok(())
    }

    /// A remote cache over another solver's results.
    struct Remote(Arc<MemCache>, Arc<AtomicUsize>);

    #[async_trait]
    impl RemoteCache<String> for Remote {
        async fn load(&self, _ctx: &VertexCtx, key: &str, n: usize) -> Option<Vec<String>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.load(key, n).await.ok().flatten()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remote_hit_runs_nothing_and_loads_only_what_is_needed() -> anyhow::Result<()> {
        let first = Arc::new(MemCache::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let solved = Solver::new(first.clone(), 4)
            .solve(
                diamond(&runs, "r", false),
                Progress::discard(),
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(solved.records.len(), 4);
        assert!(solved.records.iter().all(|r| r.executed && r.outputs == 1));
        // Only the result is `min` here (no op hashes its inputs' contents).
        let min: Vec<bool> = solved.records.iter().map(|r| r.min).collect();
        assert_eq!(min, vec![false, false, false, true]);

        // A cold solver with the first one's cache as a remote: the top vertex is a remote
        // hit, its inputs are never looked up, nothing runs.
        let lookups = Arc::new(AtomicUsize::new(0));
        let mut graph = diamond(&runs, "r", false);
        graph.remote = vec![Arc::new(Remote(first, lookups.clone()))];
        let again = Solver::new(Arc::new(MemCache::default()), 4)
            .solve(graph, Progress::discard(), CancellationToken::new())
            .await?;
        assert_eq!(again.output, solved.output);
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
        assert!(again.records.iter().all(|r| !r.executed));

        // A remote that has nothing: everything runs, each vertex asked once.
        let lookups = Arc::new(AtomicUsize::new(0));
        let mut graph = diamond(&runs, "r", false);
        graph.remote = vec![Arc::new(Remote(Arc::default(), lookups.clone()))];
        Solver::new(Arc::new(MemCache::default()), 4)
            .solve(graph, Progress::discard(), CancellationToken::new())
            .await?;
        assert_eq!(runs.load(Ordering::SeqCst), 8);
        assert_eq!(lookups.load(Ordering::SeqCst), 4);
        Ok(())
    }

    /// A source (no inputs) or a copy that hashes its input's contents into its key.
    struct Step {
        name: &'static str,
        copy: bool,
        reads: Arc<AtomicUsize>,
        runs: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Op for Step {
        type Output = String;
        fn content_inputs(&self) -> Vec<usize> {
            if self.copy {
                vec![0]
            } else {
                Vec::new()
            }
        }
        fn definition_key(&self) -> Option<String> {
            self.copy.then(|| self.name.to_string())
        }
        async fn cache_key(
            &self,
            _ctx: &VertexCtx,
            inputs: &[Option<String>],
        ) -> Result<String, BoxError> {
            if !self.copy {
                return Ok(self.name.to_string());
            }
            self.reads.fetch_add(1, Ordering::SeqCst);
            let content = inputs.first().cloned().flatten().ok_or("input not read")?;
            Ok(format!("{}:{content}", self.name))
        }
        async fn exec(&self, _ctx: &VertexCtx, inputs: &[String]) -> Result<Vec<String>, BoxError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            Ok(vec![format!("{}({})", self.name, inputs.join(","))])
        }
    }

    /// A remote over a [`MemCache`] that also keeps aliases; counts result lookups.
    #[derive(Default)]
    struct AliasRemote {
        results: Arc<MemCache>,
        aliases: Mutex<HashMap<String, String>>,
        lookups: AtomicUsize,
    }

    #[async_trait]
    impl RemoteCache<String> for AliasRemote {
        async fn load(&self, _ctx: &VertexCtx, key: &str, n: usize) -> Option<Vec<String>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            self.results.load(key, n).await.ok().flatten()
        }
        async fn alias(&self, _ctx: &VertexCtx, strict: &str) -> Option<String> {
            self.aliases.lock().ok()?.get(strict).cloned()
        }
        fn learn_alias(&self, strict: &str, key: &str) {
            if let Ok(mut a) = self.aliases.lock() {
                a.insert(strict.to_string(), key.to_string());
            }
        }
    }

    fn copy_graph(
        src: &'static str,
        reads: &Arc<AtomicUsize>,
        runs: &Arc<AtomicUsize>,
        remote: Arc<AliasRemote>,
    ) -> Graph<Step> {
        let step = |name, copy| {
            Arc::new(Step {
                name,
                copy,
                reads: reads.clone(),
                runs: runs.clone(),
            })
        };
        Graph {
            vertices: vec![
                Vertex {
                    digest: "src".into(),
                    name: "src".into(),
                    op: step(src, false),
                    inputs: vec![],
                    ignore_cache: false,
                },
                Vertex {
                    digest: "copy".into(),
                    name: "copy".into(),
                    op: step("copy", true),
                    inputs: vec![Edge {
                        vertex: 0,
                        output: 0,
                    }],
                    ignore_cache: false,
                },
            ],
            result: Edge {
                vertex: 1,
                output: 0,
            },
            remote: vec![remote],
        }
    }

    /// A content-keyed vertex whose definition key a remote maps to its key: a cold solver
    /// neither loads nor reads its input; a changed input misses the alias and is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remote_alias_spares_reading_content_inputs() -> anyhow::Result<()> {
        let (reads, runs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let results = Arc::new(MemCache::default());
        let remote = Arc::new(AliasRemote {
            results: results.clone(),
            ..Default::default()
        });
        let first = Solver::new(results.clone(), 4)
            .solve(
                copy_graph("s1", &reads, &runs, remote.clone()),
                Progress::discard(),
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(first.output, "copy(s1())");
        assert_eq!(
            (reads.load(Ordering::SeqCst), runs.load(Ordering::SeqCst)),
            (1, 2)
        );
        assert_eq!(remote.aliases.lock().map(|a| a.len()).unwrap_or(0), 1);

        // Cold: the copy's key comes from the alias, the copy is a remote hit, and the
        // source is never loaded, looked up or read.
        remote.lookups.store(0, Ordering::SeqCst);
        let cold = Solver::new(Arc::new(MemCache::default()), 4)
            .solve(
                copy_graph("s1", &reads, &runs, remote.clone()),
                Progress::discard(),
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(cold.output, first.output);
        assert_eq!(cold.key, first.key);
        assert_eq!(
            (reads.load(Ordering::SeqCst), runs.load(Ordering::SeqCst)),
            (1, 2)
        );
        assert_eq!(remote.lookups.load(Ordering::SeqCst), 1);

        // Another source: another definition key, so the input is read again.
        let changed = Solver::new(Arc::new(MemCache::default()), 4)
            .solve(
                copy_graph("s2", &reads, &runs, remote.clone()),
                Progress::discard(),
                CancellationToken::new(),
            )
            .await?;
        assert_eq!(changed.output, "copy(s2())");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        Ok(())
    }

    /// A [`MemCache`] whose `ready` fails for values starting with `lazy:` (a lazy remote
    /// hit whose blobs turn out corrupt when read).
    #[derive(Default)]
    struct BrokenLazy(MemCache);

    #[async_trait]
    impl ResultCache<String> for BrokenLazy {
        async fn load(&self, key: &str, n: usize) -> Result<Option<Vec<String>>, BoxError> {
            self.0.load(key, n).await
        }
        async fn save(&self, key: &str, outputs: &[String]) -> Result<(), BoxError> {
            self.0.save(key, outputs).await
        }
        async fn ready(&self, output: &String) -> Result<String, BoxError> {
            if output.starts_with("lazy:") {
                return Err("blob sha256:0: size 3, expected 4".into());
            }
            Ok(output.clone())
        }
    }

    /// A remote hit that cannot be fetched when a dependent reads it is executed after all,
    /// with a warning, and the build's result is right.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreadable_remote_hit_is_executed_instead() -> anyhow::Result<()> {
        let runs = Arc::new(AtomicUsize::new(0));
        let first = Solver::new(Arc::new(MemCache::default()), 4)
            .solve(
                diamond(&runs, "r", false),
                Progress::discard(),
                CancellationToken::new(),
            )
            .await?;
        // The remote has only vertex a's result, and it is broken.
        let broken = Arc::new(MemCache::default());
        broken
            .save(&first.records[1].key, &["lazy:a".to_string()])
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let lookups = Arc::new(AtomicUsize::new(0));
        let mut graph = diamond(&runs, "r", false);
        graph.remote = vec![Arc::new(Remote(broken, lookups.clone()))];
        let (progress, mut rx) = Progress::channel();
        let again = Solver::new(Arc::new(BrokenLazy::default()), 4)
            .solve(graph, progress, CancellationToken::new())
            .await?;
        assert_eq!(again.output, first.output);
        assert_eq!(runs.load(Ordering::SeqCst), 8);
        rx.close();
        let mut warned = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let crate::progress::Event::Warning(w) = ev {
                warned.push(w.message);
            }
        }
        assert!(
            warned
                .iter()
                .any(|m| m.contains("expected 4") && m.contains("executing a instead")),
            "{warned:?}"
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_builds_share_identical_vertices() -> anyhow::Result<()> {
        let solver = Solver::new(Arc::new(MemCache::default()), 4);
        let runs = Arc::new(AtomicUsize::new(0));
        let (p1, _r1) = Progress::channel();
        let (p2, _r2) = Progress::channel();
        let (a, b) = tokio::join!(
            solver.solve(diamond(&runs, "r", false), p1, CancellationToken::new()),
            solver.solve(diamond(&runs, "r", false), p2, CancellationToken::new()),
        );
        assert_eq!(a?.output, b?.output);
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        Ok(())
    }

    #[tokio::test]
    async fn failure_names_the_vertex() -> anyhow::Result<()> {
        let solver = Solver::new(Arc::new(MemCache::default()), 1);
        let runs = Arc::new(AtomicUsize::new(0));
        let graph = Graph {
            vertices: vec![Vertex {
                digest: "d".into(),
                name: "RUN false".into(),
                op: Arc::new(Cat {
                    name: "x".into(),
                    runs: runs.clone(),
                    barrier: None,
                    fail: true,
                }),
                inputs: vec![],
                ignore_cache: false,
            }],
            result: Edge {
                vertex: 0,
                output: 0,
            },
            remote: Vec::new(),
        };
        let err = solver
            .solve(graph, Progress::discard(), CancellationToken::new())
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected failure"))?;
        assert_eq!(err.to_string(), "RUN false: exit code: 3");
        Ok(())
    }
}
