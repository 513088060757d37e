//! The cache: immutable results (refs: stacks of layer dirs), their records in a
//! crash-safe metadata store keyed by cache key ([`metadata`]), and the only place that
//! creates snapshot directories ([`refs`]). May use `snapshot` and `content`.
//!
//! A layer directory is built under `snapshots/tmp-<id>`, flushed (syncfs) and renamed to
//! `snapshots/<id>` before its record is committed; a result record is written only after
//! all its layers are. On open, directories without a record and records without a
//! directory are removed, so after a crash the store serves only complete records.
//!
//! Results are shared with other workers through a registry or an OCI layout
//! ([`registry`]: format, export, import) and the automatic pool cache ([`pool`]).
//!
//! Every [`Layer`] value holds its layer while it lives, so [`gc`] (the policy, Prune) never
//! removes what a running build resolved. Removal unrecords first and deletes files second,
//! so a crash in between leaves directories without records, which the next open removes.

pub mod gc;
pub mod metadata;
pub mod mounts;
pub mod pool;
pub mod refs;
pub mod registry;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

pub use metadata::{BlobRecord, LayerRecord, Metadata, ResultRecord};
pub use refs::{Layer, NewLayer, Ref};

use refs::Holds;

use crate::export::LayerBlob;
use crate::solver::{BoxError, ResultCache};

/// What can go wrong in the cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metadata store failed.
    #[error("cache metadata {path}: {message}")]
    Store {
        /// The store's file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A filesystem operation failed.
    #[error("cache: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Exporting or importing a shared cache failed.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// A GC policy or prune request cannot be applied as given.
    #[error("gc: {0}")]
    Policy(String),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One layer's record and size, as disk usage reports it and GC weighs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerUsage {
    /// Layer id.
    pub id: u64,
    /// Bytes it takes on disk (allocated blocks, hard links counted once).
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of its last use (its creation when never used since).
    pub last_used: u64,
    /// Whether a running build (or a queued export) holds it now.
    pub in_use: bool,
    /// BuildKit's record type: `regular` or `source.local`.
    pub kind: String,
    /// Digests of the blobs made from or pulled as it.
    pub blobs: Vec<String>,
}

/// The cache of one worker root.
#[derive(Debug)]
pub struct Cache {
    snapshots: PathBuf,
    md: Metadata,
    holds: Arc<Holds>,
    /// Sizes of committed layers (immutable, so measured once per process).
    sizes: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    /// One unpack at a time per blob digest (imports of results sharing a layer).
    blob_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

// === impl Cache ===

impl Cache {
    /// Opens the cache under `root` (`root/snapshots`, `root/metadata.redb`), removing
    /// whatever a crash left incomplete.
    pub fn open(root: &Path) -> Result<Arc<Cache>> {
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io("create", &snapshots))?;
        let md = Metadata::open(&root.join("metadata.redb"))?;
        let cache = Cache {
            snapshots,
            md,
            holds: Default::default(),
            sizes: Default::default(),
            blob_locks: Default::default(),
        };
        cache.recover()?;
        Ok(Arc::new(cache))
    }

    fn recover(&self) -> Result<()> {
        let recorded: HashSet<u64> = self.md.layer_ids()?.into_iter().collect();
        let mut present = HashSet::new();
        let entries = std::fs::read_dir(&self.snapshots).map_err(io("read", &self.snapshots))?;
        for entry in entries {
            let entry = entry.map_err(io("read", &self.snapshots))?;
            let name = entry.file_name().to_string_lossy().to_string();
            match name.parse::<u64>() {
                Ok(id) if recorded.contains(&id) => {
                    present.insert(id);
                }
                _ => {
                    tracing::warn!(dir = %entry.path().display(), "removing incomplete snapshot");
                    refs::remove_tree(&entry.path());
                }
            }
        }
        let missing: Vec<u64> = recorded.difference(&present).copied().collect();
        if !missing.is_empty() {
            tracing::warn!(
                count = missing.len(),
                "dropping layer records without directories"
            );
            self.md.remove_layers(&missing)?;
        }
        let dropped = self.md.drop_dangling_results(&present)?;
        if dropped > 0 {
            tracing::warn!(count = dropped, "dropped results with missing layers");
        }
        Ok(())
    }

    /// The metadata store.
    pub fn metadata(&self) -> &Metadata {
        &self.md
    }

    /// Starts a new layer directory (empty `fs/` and `work/` under a temporary name).
    pub fn new_layer(&self) -> Result<NewLayer> {
        let id = self.md.allocate_ids(1)?;
        NewLayer::create(&self.snapshots, id)
    }

    /// Commits new layers: flushes them to disk, moves them into place and records them
    /// (as `regular` records).
    pub fn commit_layers(&self, layers: Vec<(NewLayer, Vec<LayerBlob>)>) -> Result<Vec<Layer>> {
        self.commit_layers_as(None, layers)
    }

    /// [`Cache::commit_layers`] with BuildKit's record type for GC filters (`source.local`
    /// for a local context; `None`: `regular`).
    pub fn commit_layers_as(
        &self,
        kind: Option<&str>,
        layers: Vec<(NewLayer, Vec<LayerBlob>)>,
    ) -> Result<Vec<Layer>> {
        if layers.is_empty() {
            return Ok(Vec::new());
        }
        refs::sync_fs(&self.snapshots)?;
        let mut records = Vec::with_capacity(layers.len());
        let mut dirs = Vec::with_capacity(layers.len());
        for (nl, blobs) in layers {
            let id = nl.id();
            let dir = nl.finish(&self.snapshots)?;
            records.push((
                id,
                LayerRecord {
                    blobs: blobs.iter().map(BlobRecord::from).collect(),
                    created: unix_now(),
                    kind: kind.map(str::to_string),
                },
            ));
            dirs.push((id, dir));
        }
        refs::sync_dir(&self.snapshots)?;
        // Held before they are recorded: GC never sees them unheld.
        let out: Vec<Layer> = {
            let mut t = self.holds.lock();
            dirs.into_iter()
                .map(|(id, dir)| Layer::new(id, dir, self.holds.hold(&mut t, id)))
                .collect()
        };
        self.md.add_layers(&records)?;
        Ok(out)
    }

    /// A committed layer by id, if its record and directory exist; the value holds it.
    pub fn layer(&self, id: u64) -> Result<Option<Layer>> {
        // Under the hold lock: GC either unrecorded it already, or cannot until released.
        let mut t = self.holds.lock();
        if self.md.layer(id)?.is_none() {
            return Ok(None);
        }
        let dir = self.snapshots.join(id.to_string());
        if !dir.is_dir() {
            return Ok(None);
        }
        let hold = self.holds.hold(&mut t, id);
        Ok(Some(Layer::new(id, dir, hold)))
    }

    /// Every committed layer with its size on disk, use and type (what `DiskUsage`
    /// reports and GC weighs).
    pub fn usage(&self) -> Result<Vec<LayerUsage>> {
        let stored = self.md.last_used()?;
        let mut out = Vec::new();
        for id in self.md.layer_ids()? {
            let Some(rec) = self.md.layer(id)? else {
                continue;
            };
            let size = self.size_of(id);
            let (in_use, pending) = {
                let t = self.holds.lock();
                (t.is_held(id), t.used(id))
            };
            let last_used = [Some(rec.created), stored.get(&id).copied(), pending]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            out.push(LayerUsage {
                id,
                size,
                created: rec.created,
                last_used,
                in_use,
                kind: rec.kind.clone().unwrap_or_else(|| "regular".into()),
                blobs: rec.blobs.iter().map(|b| b.digest.clone()).collect(),
            });
        }
        Ok(out)
    }

    /// Bytes layer `id` takes on disk, measured once.
    fn size_of(&self, id: u64) -> u64 {
        if let Some(s) = self.sizes.lock().ok().and_then(|m| m.get(&id).copied()) {
            return s;
        }
        let size = disk_usage(&self.snapshots.join(id.to_string()));
        if let Ok(mut m) = self.sizes.lock() {
            m.insert(id, size);
        }
        size
    }

    /// Writes the layers' recent use times to the store (GC orders by them).
    pub fn flush_last_used(&self) -> Result<()> {
        let used = self.holds.lock().take_used();
        self.md.set_last_used(&used)
    }

    /// When the filesystem holding the cache is full (under 1 MiB available), a message
    /// saying so and naming `what` was being written; `None` otherwise.
    pub fn no_space(&self, what: &str) -> Option<String> {
        let d = gc::disk_space(&self.snapshots).ok()?;
        (d.free < 1 << 20).then(|| {
            format!(
                "no space left on device: the worker root's filesystem ({}) has {} bytes free of {} while writing {what}; gc could not free enough",
                self.snapshots.parent().unwrap_or(&self.snapshots).display(),
                d.free,
                d.total
            )
        })
    }

    /// How many layers running builds hold now.
    pub fn held_layers(&self) -> usize {
        self.holds.lock().held_count()
    }

    /// Removes the layers `ids` that nothing holds, and the results built on them; returns
    /// what was removed. Records go first (one transaction, taken while no one can take a
    /// new hold), files second: a crash in between leaves only directories without a
    /// record, which the next open removes.
    pub fn remove(&self, candidates: &[LayerUsage]) -> Result<Vec<LayerUsage>> {
        let doomed: Vec<LayerUsage> = {
            let t = self.holds.lock();
            let doomed: Vec<LayerUsage> = candidates
                .iter()
                .filter(|l| !t.is_held(l.id))
                .cloned()
                .collect();
            if doomed.is_empty() {
                return Ok(doomed);
            }
            let ids: Vec<u64> = doomed.iter().map(|l| l.id).collect();
            self.md.remove_layers(&ids)?;
            doomed
        };
        let present: HashSet<u64> = self.md.layer_ids()?.into_iter().collect();
        self.md.drop_dangling_results(&present)?;
        for l in &doomed {
            refs::remove_tree(&self.snapshots.join(l.id.to_string()));
            if let Ok(mut m) = self.sizes.lock() {
                m.remove(&l.id);
            }
        }
        Ok(doomed)
    }

    /// The layer unpacked from a pulled blob, if any.
    pub fn layer_for_blob(&self, digest: &str) -> Result<Option<Layer>> {
        match self.md.layer_for_blob(digest)? {
            Some(id) => self.layer(id),
            None => Ok(None),
        }
    }

    /// A lock to hold while making the layer of blob `digest`, so concurrent imports of
    /// results sharing it fetch and unpack it once.
    pub fn blob_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.blob_locks.lock() {
            Ok(mut m) => {
                // Forget locks nobody holds any more.
                m.retain(|_, l| Arc::strong_count(l) > 1);
                m.entry(digest.to_string()).or_default().clone()
            }
            Err(_) => Arc::default(),
        }
    }

    /// Blobs known for a layer.
    pub fn blobs(&self, layer: &Layer) -> Result<Vec<LayerBlob>> {
        Ok(self
            .md
            .layer(layer.id)?
            .map(|r| r.blobs.iter().map(LayerBlob::from).collect())
            .unwrap_or_default())
    }

    /// Remembers blobs an export made so the next export reuses them.
    pub fn record_blobs(&self, blobs: &[(u64, LayerBlob)]) -> Result<()> {
        let recs: Vec<(u64, BlobRecord)> = blobs
            .iter()
            .map(|(id, b)| (*id, BlobRecord::from(b)))
            .collect();
        self.md.add_blobs(&recs)
    }

    /// The ref stored under a key.
    pub fn get(&self, key: &str) -> Result<Option<Ref>> {
        let Some(rec) = self.md.result(key)? else {
            return Ok(None);
        };
        let mut layers = Vec::with_capacity(rec.layers.len());
        for id in rec.layers {
            match self.layer(id)? {
                Some(l) => layers.push(l),
                None => return Ok(None),
            }
        }
        Ok(Some(Ref::new(layers)))
    }

    /// Stores refs under keys in one transaction. A lazy ref (not fetched yet) is refused:
    /// its layers are not on disk.
    pub fn put(&self, entries: &[(String, Ref)]) -> Result<()> {
        if let Some((k, _)) = entries.iter().find(|(_, r)| r.is_lazy()) {
            return Err(Error::Store {
                path: self.snapshots.clone(),
                message: format!("result {k} is lazy (not fetched yet) and cannot be recorded"),
            });
        }
        let recs: Vec<(String, ResultRecord)> = entries
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    ResultRecord {
                        layers: r.layers().iter().map(|l| l.id).collect(),
                        created: 0,
                    },
                )
            })
            .collect();
        self.md.put_results(&recs)
    }
}

/// Bytes a tree takes on disk: allocated blocks, each inode once.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.nlink() < 2 || m.is_dir() || seen.insert((m.dev(), m.ino())))
        .map(|m| m.blocks() * 512)
        .sum()
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait]
impl ResultCache<Ref> for Cache {
    async fn load(&self, key: &str, outputs: usize) -> Result<Option<Vec<Ref>>, BoxError> {
        let mut refs = Vec::with_capacity(outputs);
        for i in 0..outputs {
            match self.get(&format!("{key}:{i}"))? {
                Some(r) => refs.push(r),
                None => return Ok(None),
            }
        }
        Ok(Some(refs))
    }

    async fn save(&self, key: &str, outputs: &[Ref]) -> Result<(), BoxError> {
        let entries: Vec<(String, Ref)> = outputs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("{key}:{i}"), r.clone()))
            .collect();
        self.put(&entries)?;
        Ok(())
    }

    async fn ready(&self, output: &Ref) -> Result<Ref, BoxError> {
        Ok(output.materialize().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_in_use_is_a_clear_error() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let _first = Cache::open(root.path())?;
        let err = Cache::open(root.path())
            .err()
            .ok_or_else(|| anyhow::anyhow!("a second open must fail"))?;
        assert!(err.to_string().contains("in use by another kiln"), "{err}");
        Ok(())
    }

    #[test]
    fn reopen_after_crash_keeps_only_complete_records() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let (kept, lost_key) = {
            let cache = Cache::open(root.path())?;
            // A complete result.
            let nl = cache.new_layer()?;
            std::fs::write(nl.fs().join("f"), "x")?;
            let layers = cache.commit_layers(vec![(nl, Vec::new())])?;
            let r = Ref::new(layers);
            cache.put(&[("k1:0".to_string(), r.clone())])?;
            // A layer being built when the process died (never committed).
            let pending = cache.new_layer()?;
            std::fs::write(pending.fs().join("half"), "y")?;
            std::mem::forget(pending);
            // A result whose layer directory vanished.
            let nl = cache.new_layer()?;
            let gone = cache.commit_layers(vec![(nl, Vec::new())])?;
            let dir = root.path().join("snapshots").join(gone[0].id.to_string());
            cache.put(&[("k2:0".to_string(), Ref::new(gone))])?;
            std::fs::remove_dir_all(dir)?;
            (r, "k2:0")
        };
        let cache = Cache::open(root.path())?;
        assert_eq!(cache.get("k1:0")?, Some(kept.clone()));
        assert_eq!(
            std::fs::read_to_string(kept.layers()[0].fs().join("f"))?,
            "x"
        );
        assert_eq!(cache.get(lost_key)?, None);
        let leftovers: Vec<String> = std::fs::read_dir(root.path().join("snapshots"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(leftovers, vec![kept.layers()[0].id.to_string()]);
        Ok(())
    }

    fn layer_with(cache: &Cache, bytes: usize) -> anyhow::Result<Layer> {
        let nl = cache.new_layer()?;
        std::fs::write(nl.fs().join("f"), vec![7u8; bytes])?;
        Ok(cache.commit_layers(vec![(nl, Vec::new())])?.remove(0))
    }

    #[test]
    fn gc_removes_only_what_nothing_holds() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let cache = Cache::open(root.path())?;
        let (gc, _) = gc::Gc::new(cache.clone(), root.path(), Default::default())?;
        let l1 = layer_with(&cache, 10_000)?;
        let l2 = layer_with(&cache, 20_000)?;
        let l3 = layer_with(&cache, 30_000)?;
        let ids = [l1.id, l2.id, l3.id];
        cache.put(&[
            ("k1:0".into(), Ref::new(vec![l1.clone()])),
            ("k2:0".into(), Ref::new(vec![l1, l2])),
            ("k3:0".into(), Ref::new(vec![l3])),
        ])?;
        // A build holds k2 (and so its layers); nothing else is held.
        let held = cache
            .get("k2:0")?
            .ok_or_else(|| anyhow::anyhow!("k2 missing"))?;
        assert_eq!(cache.held_layers(), 2);
        let usage = cache.usage()?;
        assert!(usage.iter().all(|u| u.size >= 4096), "{usage:?}");
        assert_eq!(usage.iter().filter(|u| u.in_use).count(), 2);
        let report = gc.prune(true, &[], Default::default())?;
        assert_eq!(
            report.removed.iter().map(|u| u.id).collect::<Vec<_>>(),
            vec![ids[2]]
        );
        assert!(report.freed >= 30_000, "{report:?}");
        assert!(cache.get("k3:0")?.is_none());
        assert_eq!(cache.get("k2:0")?.as_ref(), Some(&held));
        assert_eq!(
            std::fs::read(held.layers()[1].fs().join("f"))?.len(),
            20_000
        );
        assert!(!root
            .path()
            .join("snapshots")
            .join(ids[2].to_string())
            .exists());
        // Released: everything goes, results with it.
        drop(held);
        assert_eq!(cache.held_layers(), 0);
        let report = gc.prune(true, &[], Default::default())?;
        assert_eq!(report.removed.len(), 2);
        assert!(cache.get("k1:0")?.is_none() && cache.get("k2:0")?.is_none());
        assert_eq!(gc.stats().runs, 2);
        assert_eq!(gc.stats().cache_bytes, 0);
        Ok(())
    }

    #[test]
    fn a_crash_between_unrecording_and_deleting_leaves_a_clean_store() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let id = {
            let cache = Cache::open(root.path())?;
            let kept = layer_with(&cache, 100)?;
            let gone = layer_with(&cache, 100)?;
            cache.put(&[
                ("kept:0".into(), Ref::new(vec![kept])),
                ("gone:0".into(), Ref::new(vec![gone.clone()])),
            ])?;
            // GC's first step (records) done, the process killed before the files go.
            cache.metadata().remove_layers(&[gone.id])?;
            gone.id
        };
        let dir = root.path().join("snapshots").join(id.to_string());
        assert!(dir.exists());
        let cache = Cache::open(root.path())?;
        assert!(
            !dir.exists(),
            "the unrecorded layer's files must go on open"
        );
        assert!(cache.get("gone:0")?.is_none());
        let kept = cache
            .get("kept:0")?
            .ok_or_else(|| anyhow::anyhow!("kept lost"))?;
        assert_eq!(std::fs::read(kept.layers()[0].fs().join("f"))?.len(), 100);
        Ok(())
    }

    /// A lazy ref is loaded once (on first use, for all its outputs), cannot be recorded
    /// before, and a failed load is an error naming what it was, never an empty result.
    #[tokio::test]
    async fn lazy_refs_load_once_and_are_never_recorded_unloaded() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let cache = Cache::open(root.path())?;
        let real = Ref::new(vec![layer_with(&cache, 10)?]);
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, n) = (real.clone(), loads.clone());
        let lazy = Ref::lazy(
            "cache test: k".into(),
            2,
            Box::new(move || {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let r = r.clone();
                Box::pin(async move { Ok(vec![Ref::scratch(), r]) })
            }),
        );
        assert!(lazy[1].is_lazy());
        let err = cache
            .put(&[("k:1".into(), lazy[1].clone())])
            .err()
            .ok_or_else(|| anyhow::anyhow!("a lazy ref was recorded"))?;
        assert!(err.to_string().contains("lazy"), "{err}");
        assert_eq!(
            lazy[1].materialize().await.map_err(anyhow::Error::msg)?,
            real
        );
        assert_eq!(
            lazy[0].materialize().await.map_err(anyhow::Error::msg)?,
            Ref::scratch()
        );
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Loaded: every clone sees the layers.
        assert!(!lazy[1].is_lazy());
        assert_eq!(lazy[1].layers(), real.layers());

        let failing = Ref::lazy(
            "cache test: bad".into(),
            1,
            Box::new(|| Box::pin(async { Err("blob sha256:00: size 3, expected 4".to_string()) })),
        );
        let err = failing[0]
            .materialize()
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("a failed load succeeded"))?;
        assert!(
            err.contains("cache test: bad") && err.contains("expected 4"),
            "{err}"
        );
        assert!(failing[0].is_lazy());
        Ok(())
    }

    #[test]
    fn last_use_orders_gc_and_survives_reopen() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let (a, b) = {
            let cache = Cache::open(root.path())?;
            let a = layer_with(&cache, 10)?;
            let b = layer_with(&cache, 10)?;
            let ids = (a.id, b.id);
            drop((a, b));
            cache.flush_last_used()?;
            ids
        };
        let cache = Cache::open(root.path())?;
        let used = cache.metadata().last_used()?;
        assert!(used.contains_key(&a) && used.contains_key(&b), "{used:?}");
        Ok(())
    }
}
