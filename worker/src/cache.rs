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

pub mod metadata;
pub mod pool;
pub mod refs;
pub mod registry;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

pub use metadata::{BlobRecord, LayerRecord, Metadata, ResultRecord};
pub use refs::{Layer, NewLayer, Ref};

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

/// One layer's record and size, as disk usage reports it.
#[derive(Debug, Clone)]
pub struct LayerUsage {
    /// Layer id.
    pub id: u64,
    /// Bytes of its files.
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    /// Digests of the blobs made from or pulled as it.
    pub blobs: Vec<String>,
}

/// The cache of one worker root.
#[derive(Debug)]
pub struct Cache {
    snapshots: PathBuf,
    md: Metadata,
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

    /// Commits new layers: flushes them to disk, moves them into place and records them.
    pub fn commit_layers(&self, layers: Vec<(NewLayer, Vec<LayerBlob>)>) -> Result<Vec<Layer>> {
        if layers.is_empty() {
            return Ok(Vec::new());
        }
        refs::sync_fs(&self.snapshots)?;
        let mut records = Vec::with_capacity(layers.len());
        let mut out = Vec::with_capacity(layers.len());
        for (nl, blobs) in layers {
            let layer = nl.finish(&self.snapshots)?;
            records.push((
                layer.id,
                LayerRecord {
                    blobs: blobs.iter().map(BlobRecord::from).collect(),
                    created: unix_now(),
                },
            ));
            out.push(layer);
        }
        refs::sync_dir(&self.snapshots)?;
        self.md.add_layers(&records)?;
        Ok(out)
    }

    /// A committed layer by id, if its record and directory exist.
    pub fn layer(&self, id: u64) -> Result<Option<Layer>> {
        if self.md.layer(id)?.is_none() {
            return Ok(None);
        }
        let dir = self.snapshots.join(id.to_string());
        Ok(dir.is_dir().then(|| Layer::new(id, dir)))
    }

    /// Every committed layer with its size on disk (what `DiskUsage` reports).
    pub fn usage(&self) -> Result<Vec<LayerUsage>> {
        let mut out = Vec::new();
        for id in self.md.layer_ids()? {
            let Some(rec) = self.md.layer(id)? else {
                continue;
            };
            let dir = self.snapshots.join(id.to_string());
            let size = walkdir::WalkDir::new(&dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| !m.is_dir())
                .map(|m| m.len())
                .sum();
            out.push(LayerUsage {
                id,
                size,
                created: rec.created,
                blobs: rec.blobs.iter().map(|b| b.digest.clone()).collect(),
            });
        }
        Ok(out)
    }

    /// Removes every layer created before `older_than` (unix seconds; `None`: all) and
    /// the results built on them; returns what was removed. The caller guarantees no build
    /// holds any of them. Records go first, so a crash in between leaves only directories
    /// that the next open removes.
    pub fn prune(&self, older_than: Option<u64>) -> Result<Vec<LayerUsage>> {
        let doomed: Vec<LayerUsage> = self
            .usage()?
            .into_iter()
            .filter(|l| older_than.is_none_or(|t| l.created < t))
            .collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        let ids: Vec<u64> = doomed.iter().map(|l| l.id).collect();
        self.md.remove_layers(&ids)?;
        let present: HashSet<u64> = self.md.layer_ids()?.into_iter().collect();
        self.md.drop_dangling_results(&present)?;
        for id in &ids {
            refs::remove_tree(&self.snapshots.join(id.to_string()));
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

    /// Stores refs under keys in one transaction.
    pub fn put(&self, entries: &[(String, Ref)]) -> Result<()> {
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

fn unix_now() -> u64 {
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
}
