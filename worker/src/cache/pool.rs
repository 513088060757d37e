//! The pool cache (`kiln-worker --cache-registry REPO`): every vertex result a worker
//! executes is exported in the background, one manifest per vertex tagged
//! `REPO:kiln-<sha256 of the vertex key>`, and every local miss looks its key up there
//! before executing. Export is off the build's path: a queue with bounded concurrency,
//! retries with backoff, a journal under `ROOT/pool-queue` that a restarted worker queues
//! again (so kill -9 with exports queued loses none), and counters (queue depth,
//! exported, failed) for metrics. Only
//! reads the local store when exporting; imports go through [`super::registry`], which
//! commits nothing incomplete. A hit is lazy ([`Ref::lazy`]): fetched only when read. It
//! also keeps aliases (definition key → content-based key) so keys that hash contents are
//! found without fetching them. Used by `control`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::registry::{
    self, BlobSource, CacheConfig, ExportOpts, Exporter, Found, Target, POOL_TAG_PREFIX,
};
use super::{Cache, Ref};
use crate::content::ContentStore;
use crate::export::image::ImageOpts;
use crate::solver::{RemoteCache, VertexCtx};
use crate::source::image::ImageResolver;

/// Most exports running at once.
const CONCURRENCY: usize = 2;
/// Tries per export (the first and the retries).
const ATTEMPTS: u32 = 4;
/// Wait before the first retry; doubled each time.
const BACKOFF: Duration = Duration::from_millis(150);

/// Counters of the background exporter, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Exports queued or running.
    pub queue_depth: usize,
    /// Vertex results exported.
    pub exported: u64,
    /// Exports given up after every retry.
    pub failed: u64,
    /// Export attempts retried.
    pub retried: u64,
}

/// A pool cache in one repository.
pub struct Pool {
    repo: String,
    exporter: Exporter,
    images: ImageResolver,
    cache: Arc<Cache>,
    content: Arc<ContentStore>,
    limit: Arc<tokio::sync::Semaphore>,
    depth: AtomicUsize,
    exported: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    idle: tokio::sync::Notify,
    /// Vertex keys exported or queued by this process (no second upload).
    done: Mutex<HashSet<String>>,
    /// Itself, for background work started from `&self`.
    me: std::sync::Weak<Pool>,
    /// Where queued exports are recorded until they are done (see [`Pool::recover`]).
    journal: std::sync::OnceLock<std::path::PathBuf>,
}

/// One queued export as the journal records it.
#[derive(serde::Serialize, serde::Deserialize)]
struct JournalEntry {
    key: String,
    outputs: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("repo", &self.repo)
            .field("stats", &self.stats())
            .finish()
    }
}

// === impl Pool ===

impl Pool {
    /// A pool cache in `repo` (`host/path`, no tag) over a worker's stores.
    pub fn new(
        repo: &str,
        cache: Arc<Cache>,
        content: Arc<ContentStore>,
        images: ImageResolver,
        exporter: Exporter,
    ) -> Result<Arc<Pool>, registry::Error> {
        let bad = |m: String| registry::Error::Attr {
            typ: "pool".into(),
            message: m,
        };
        crate::image::ImageName::parse(repo)
            .map_err(|e| bad(format!("invalid --cache-registry {repo:?}: {e}")))?;
        let last = repo.rsplit('/').next().unwrap_or_default();
        if !repo.contains('/') || last.contains(':') || repo.contains('@') {
            return Err(bad(format!(
                "--cache-registry {repo:?} must be a repository (host/path) without tag or digest"
            )));
        }
        // The registry client (credentials, connection) is set up now, not by the first
        // build's lookups: one request for a tag that is never pushed.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (images, probe) = (images.clone(), format!("{repo}:{POOL_TAG_PREFIX}warm-up"));
            rt.spawn(async move {
                let _ = images.fetch_manifest_raw(&probe).await;
            });
        }
        Ok(Arc::new_cyclic(|me| Pool {
            repo: repo.trim_end_matches('/').to_string(),
            exporter,
            images,
            cache,
            content,
            limit: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY)),
            depth: AtomicUsize::new(0),
            exported: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
            done: Mutex::new(HashSet::new()),
            me: me.clone(),
            journal: std::sync::OnceLock::new(),
        }))
    }

    /// The repository.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The reference a vertex key is stored under.
    pub fn reference(&self, vertex_key: &str) -> String {
        format!("{}:{}", self.repo, registry::pool_tag(vertex_key))
    }

    /// The exporter's counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            queue_depth: self.depth.load(Ordering::SeqCst),
            exported: self.exported.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            retried: self.retried.load(Ordering::SeqCst),
        }
    }

    /// Records queued exports under `dir` from now on (one small file per vertex key,
    /// removed once its export succeeded) and queues again those a previous process left
    /// there, when their results are still in the local store: a worker killed or stopped
    /// with exports queued does not lose them. Returns how many were queued again. Must
    /// run inside a tokio runtime.
    pub fn recover(self: &Arc<Self>, dir: &std::path::Path) -> usize {
        if self.journal.set(dir.to_path_buf()).is_err() {
            return 0;
        }
        if let Err(error) = std::fs::create_dir_all(dir) {
            tracing::warn!(%error, dir = %dir.display(), "pool cache: no export journal");
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut queued = 0;
        for e in entries.flatten() {
            let path = e.path();
            let entry = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<JournalEntry>(&b).ok());
            let refs = entry.as_ref().and_then(|j| {
                (0..j.outputs)
                    .map(|i| self.cache.get(&format!("{}:{i}", j.key)).ok().flatten())
                    .collect::<Option<Vec<Ref>>>()
            });
            match (entry, refs) {
                (Some(j), Some(refs)) => {
                    self.enqueue(&j.key, refs);
                    queued += 1;
                }
                // A torn entry, or results GC removed since: nothing to export.
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if queued > 0 {
            tracing::info!(
                queued,
                "pool cache: exports a previous run left queued are queued again"
            );
        }
        queued
    }

    /// The journal file of a queued export: named by the key's pool tag.
    fn journal_path(&self, key: &str) -> Option<std::path::PathBuf> {
        self.journal.get().map(|d| d.join(registry::pool_tag(key)))
    }

    /// Records a queued export (best effort: a failure only loses crash safety).
    fn journal_add(&self, key: &str, outputs: usize) {
        let Some(path) = self.journal_path(key) else {
            return;
        };
        let entry = JournalEntry {
            key: key.to_string(),
            outputs,
        };
        let tmp = path.with_extension("tmp");
        let res = serde_json::to_vec(&entry)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = res {
            tracing::warn!(%error, key, "pool cache: cannot record a queued export");
        }
    }

    fn journal_remove(&self, key: &str) {
        if let Some(path) = self.journal_path(key) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Queues the export of a vertex's outputs and returns at once; a key already
    /// exported or queued by this process is skipped. Must run inside a tokio runtime.
    pub fn enqueue(self: &Arc<Self>, vertex_key: &str, outputs: Vec<Ref>) {
        match self.done.lock() {
            Ok(mut d) => {
                if !d.insert(vertex_key.to_string()) {
                    return;
                }
            }
            Err(_) => return,
        }
        self.depth.fetch_add(1, Ordering::SeqCst);
        self.journal_add(vertex_key, outputs.len());
        let this = self.clone();
        let key = vertex_key.to_string();
        tokio::spawn(async move {
            let ok = this.export(&key, &outputs).await;
            if ok {
                this.exported.fetch_add(1, Ordering::SeqCst);
                this.journal_remove(&key);
            } else {
                // The journal keeps it: the next start tries again.
                this.failed.fetch_add(1, Ordering::SeqCst);
                // Let a later build try again.
                if let Ok(mut d) = this.done.lock() {
                    d.remove(&key);
                }
            }
            if this.depth.fetch_sub(1, Ordering::SeqCst) == 1 {
                this.idle.notify_waiters();
            }
        });
    }

    async fn export(&self, key: &str, outputs: &[Ref]) -> bool {
        let Ok(_permit) = self.limit.clone().acquire_owned().await else {
            return false;
        };
        let reference = self.reference(key);
        let results: Vec<(String, Ref)> = outputs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("{key}:{i}"), r.clone()))
            .collect();
        let opts = ExportOpts {
            target: Target::Registry {
                reference: reference.clone(),
                insecure: false,
            },
            max: true,
            image: ImageOpts::default(),
            image_manifest: true,
            ignore_error: false,
            cache_mounts: false,
        };
        let mut wait = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match self.exporter.export(&results, &opts).await {
                Ok(_) => {
                    tracing::debug!(%reference, "pool cache export done");
                    return true;
                }
                Err(error) if attempt < ATTEMPTS => {
                    self.retried.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(%error, attempt, "pool cache export failed, retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(error) => {
                    tracing::warn!(%error, "pool cache export failed, giving up");
                }
            }
        }
        false
    }

    /// Waits until no export is queued or running.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.depth.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn lookup(&self, key: &str) -> Result<Option<(CacheConfig, BlobSource)>, String> {
        let started = std::time::Instant::now();
        let reference = self.reference(key);
        let (manifest, _) = match self.images.fetch_manifest_raw(&reference).await {
            Ok(m) => m,
            Err(e) => {
                let m = e.to_string();
                // A 404: no such tag, or no such repository yet.
                if ["manifest unknown", "name unknown", "not known", "not found"]
                    .iter()
                    .any(|s| m.contains(s))
                {
                    return Ok(None);
                }
                return Err(m);
            }
        };
        let desc = config_of(&manifest)?;
        // One round trip when the manifest carries the config (verified by digest).
        let bytes = match registry::embedded_config(&manifest, &desc) {
            Some(b) => b,
            None => {
                let path = self
                    .images
                    .fetch_blob(&reference, &desc, &|_, _| {})
                    .await
                    .map_err(|e| e.to_string())?;
                std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?
            }
        };
        let source = BlobSource::Registry {
            resolver: self.images.clone(),
            reference,
        };
        let config = CacheConfig::parse(&bytes)?;
        tracing::debug!(
            key,
            ms = started.elapsed().as_millis() as u64,
            "pool cache lookup"
        );
        Ok(Some((config, source)))
    }

    /// Queues the publication of an alias (definition key → cache key) in the background.
    fn enqueue_alias(self: &Arc<Self>, strict: &str, key: &str) {
        match self.done.lock() {
            Ok(mut d) => {
                if !d.insert(format!("alias:{strict}")) {
                    return;
                }
            }
            Err(_) => return,
        }
        self.depth.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        let (strict, key) = (strict.to_string(), key.to_string());
        tokio::spawn(async move {
            let ok = match this.limit.clone().acquire_owned().await {
                Ok(_permit) => {
                    let reference = this.reference(&strict);
                    match this.exporter.publish_alias(&reference, &strict, &key).await {
                        Ok(_) => {
                            tracing::debug!(%reference, "pool cache alias published");
                            true
                        }
                        Err(error) => {
                            tracing::warn!(%error, "pool cache alias export failed");
                            false
                        }
                    }
                }
                Err(_) => false,
            };
            if ok {
                this.exported.fetch_add(1, Ordering::SeqCst);
            } else {
                this.failed.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut d) = this.done.lock() {
                    d.remove(&format!("alias:{strict}"));
                }
            }
            if this.depth.fetch_sub(1, Ordering::SeqCst) == 1 {
                this.idle.notify_waiters();
            }
        });
    }
}

fn config_of(manifest: &[u8]) -> Result<crate::source::image::BlobDesc, String> {
    let m: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("manifest is not json: {e}"))?;
    let c = &m["config"];
    if c["mediaType"].as_str() != Some(registry::CONFIG_MEDIA_TYPE) {
        return Err("not a kiln pool cache manifest".into());
    }
    Ok(crate::source::image::BlobDesc {
        media_type: registry::CONFIG_MEDIA_TYPE.to_string(),
        digest: c["digest"].as_str().unwrap_or_default().to_string(),
        size: c["size"].as_u64().unwrap_or(0),
    })
}

/// The pool as the solver consults it. A hit is lazy: its layers are known by digest
/// (from the verified cache config) and fetched only when something reads the result.
#[async_trait]
impl RemoteCache<Ref> for Pool {
    async fn load(&self, ctx: &VertexCtx, key: &str, outputs: usize) -> Option<Vec<Ref>> {
        let pool = self;
        let name = format!("pool {}", pool.repo);
        match pool.lookup(key).await {
            Ok(Some((config, source))) => {
                let found = Found {
                    records: config.chains(),
                    cache_mounts: Vec::new(),
                    source,
                };
                let mut entries = Vec::with_capacity(outputs);
                for i in 0..outputs {
                    let k = format!("{key}:{i}");
                    entries.push((k.clone(), found.records.get(&k)?.clone()));
                }
                pool.exporter.learn(&found);
                // Already in the pool: no need to export it again.
                if let Ok(mut d) = pool.done.lock() {
                    d.insert(key.to_string());
                }
                let (cache, content) = (pool.cache.clone(), pool.content.clone());
                let source = Arc::new(found.source);
                let entries = Arc::new(entries);
                let load: super::refs::Loader = Box::new(move || {
                    let (cache, content) = (cache.clone(), content.clone());
                    let (source, entries) = (source.clone(), entries.clone());
                    Box::pin(async move {
                        let started = std::time::Instant::now();
                        let refs = registry::materialize(&cache, &content, &source, &entries).await;
                        tracing::debug!(
                            ms = started.elapsed().as_millis() as u64,
                            ok = refs.is_ok(),
                            "pool cache hit fetched"
                        );
                        refs
                    })
                });
                tracing::debug!(key, "pool cache hit (lazy)");
                Some(Ref::lazy(
                    format!("cache {name}: {key}: the cached result cannot be fetched"),
                    outputs,
                    load,
                ))
            }
            Ok(None) => None,
            Err(e) => {
                let message = format!("cache {name}: {key}: {e}; executing instead");
                tracing::warn!(vertex = %ctx.digest, "{message}");
                ctx.progress.warn(Some(&ctx.digest), message);
                None
            }
        }
    }

    async fn alias(&self, ctx: &VertexCtx, strict: &str) -> Option<String> {
        match self.lookup(strict).await {
            Ok(Some((config, _))) => config
                .aliases
                .into_iter()
                .find(|a| a.key == strict)
                .map(|a| a.to),
            Ok(None) => None,
            Err(e) => {
                let message = format!(
                    "cache pool {}: alias {strict}: {e}; reading the inputs instead",
                    self.repo
                );
                tracing::warn!(vertex = %ctx.digest, "{message}");
                ctx.progress.warn(Some(&ctx.digest), message);
                None
            }
        }
    }

    fn learn_alias(&self, strict: &str, key: &str) {
        if let Some(me) = self.me.upgrade() {
            me.enqueue_alias(strict, key);
        }
    }
}
