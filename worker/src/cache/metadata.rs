//! The metadata store: layer records, result records by cache key, and pulled-blob →
//! layer links, in one redb file. Every change is one transaction committed durably, so
//! a kill -9 at any moment leaves either the old or the new record, never half of one.

// redb's error type is large; it never leaves this module (mapped to `cache::Error`).
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::export::LayerBlob;

const LAYERS: TableDefinition<u64, &[u8]> = TableDefinition::new("layers");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
const BLOBS: TableDefinition<&str, u64> = TableDefinition::new("blob_layers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Layer id → unix seconds of its last use (written in batches by GC runs).
const LAST_USED: TableDefinition<u64, u64> = TableDefinition::new("layer_last_used");

/// A committed layer directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Blobs made from (or pulled as) this layer.
    #[serde(default)]
    pub blobs: Vec<BlobRecord>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// BuildKit's record type when not `regular` (`source.local` for a local context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// [`LayerBlob`] as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Media type.
    pub media_type: String,
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Uncompressed digest.
    pub diff_id: String,
}

impl From<&LayerBlob> for BlobRecord {
    fn from(b: &LayerBlob) -> Self {
        BlobRecord {
            media_type: b.media_type.clone(),
            digest: b.digest.clone(),
            size: b.size,
            diff_id: b.diff_id.clone(),
        }
    }
}

impl From<&BlobRecord> for LayerBlob {
    fn from(b: &BlobRecord) -> Self {
        LayerBlob {
            media_type: b.media_type.clone(),
            digest: b.digest.clone(),
            size: b.size,
            diff_id: b.diff_id.clone(),
        }
    }
}

/// A result: which layers, lowest first, make it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResultRecord {
    /// Layer ids, lowest first.
    pub layers: Vec<u64>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
}

/// The store.
#[derive(Debug)]
pub struct Metadata {
    db: Database,
    path: PathBuf,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// === impl Metadata ===

impl Metadata {
    /// Opens or creates the store at `path`.
    pub fn open(path: &Path) -> Result<Metadata> {
        let err = |e: &dyn std::fmt::Display| Error::Store {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => err(
                &"in use by another kiln or kiln-worker process (one process per state directory: pass another --root, or build through the daemon)",
            ),
            e => err(&e),
        })?;
        let md = Metadata {
            db,
            path: path.to_path_buf(),
        };
        // Create the tables so readers never see them missing (once: a write transaction
        // costs an fsync on every open otherwise).
        let exists = md
            .db
            .begin_read()
            .ok()
            .map(|r| r.open_table(META).is_ok() && r.open_table(BLOBS).is_ok())
            .unwrap_or(false);
        if exists {
            return Ok(md);
        }
        md.write(|txn| {
            txn.open_table(LAYERS)?;
            txn.open_table(RESULTS)?;
            txn.open_table(BLOBS)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        Ok(md)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let v = f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(v)
    }

    /// Allocates `n` fresh layer ids.
    pub fn allocate_ids(&self, n: u64) -> Result<u64> {
        self.write(|txn| {
            let mut t = txn.open_table(META)?;
            let next = t.get("next_layer_id")?.map(|v| v.value()).unwrap_or(1);
            t.insert("next_layer_id", next + n)?;
            Ok(next)
        })
    }

    /// Records committed layers, and for pulled ones the blob they came from.
    pub fn add_layers(&self, layers: &[(u64, LayerRecord)]) -> Result<()> {
        let encoded: Vec<(u64, Vec<u8>)> = layers
            .iter()
            .map(|(id, r)| Ok((*id, serde_json::to_vec(r)?)))
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| self.err(e))?;
        self.write(|txn| {
            let mut t = txn.open_table(LAYERS)?;
            let mut b = txn.open_table(BLOBS)?;
            for ((id, bytes), (_, rec)) in encoded.iter().zip(layers) {
                t.insert(*id, bytes.as_slice())?;
                for blob in &rec.blobs {
                    b.insert(blob.digest.as_str(), *id)?;
                }
            }
            Ok(())
        })
    }

    /// Adds blobs made by an export to existing layers.
    pub fn add_blobs(&self, blobs: &[(u64, BlobRecord)]) -> Result<()> {
        let mut updates = Vec::new();
        for (id, blob) in blobs {
            let mut rec = self.layer(*id)?.unwrap_or_default();
            if !rec.blobs.contains(blob) {
                rec.blobs.push(blob.clone());
                updates.push((*id, rec));
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        self.add_layers(&updates)
    }

    /// A layer's record.
    pub fn layer(&self, id: u64) -> Result<Option<LayerRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(LAYERS).map_err(|e| self.err(e))?;
        let Some(v) = t.get(id).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| self.err(format!("layer {id}: {e}")))
    }

    /// The layer unpacked from a pulled blob.
    pub fn layer_for_blob(&self, digest: &str) -> Result<Option<u64>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(BLOBS).map_err(|e| self.err(e))?;
        Ok(t.get(digest).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    /// Stores results under keys in one transaction.
    pub fn put_results(&self, results: &[(String, ResultRecord)]) -> Result<()> {
        let encoded: Vec<(String, Vec<u8>)> = results
            .iter()
            .map(|(k, r)| {
                let mut r = r.clone();
                r.created = now();
                Ok((k.clone(), serde_json::to_vec(&r)?))
            })
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| self.err(e))?;
        self.write(|txn| {
            let mut t = txn.open_table(RESULTS)?;
            for (k, v) in &encoded {
                t.insert(k.as_str(), v.as_slice())?;
            }
            Ok(())
        })
    }

    /// The result stored under `key`.
    pub fn result(&self, key: &str) -> Result<Option<ResultRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        let Some(v) = t.get(key).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| self.err(format!("result {key}: {e}")))
    }

    /// Every layer id that has a record.
    pub fn layer_ids(&self) -> Result<Vec<u64>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(LAYERS).map_err(|e| self.err(e))?;
        let mut ids = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            ids.push(k.value());
        }
        Ok(ids)
    }

    /// Removes results whose layers are not all recorded; returns how many.
    pub fn drop_dangling_results(&self, present: &std::collections::HashSet<u64>) -> Result<usize> {
        let mut bad = Vec::new();
        {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let ok = serde_json::from_slice::<ResultRecord>(v.value())
                    .map(|r| r.layers.iter().all(|l| present.contains(l)))
                    .unwrap_or(false);
                if !ok {
                    bad.push(k.value().to_string());
                }
            }
        }
        if bad.is_empty() {
            return Ok(0);
        }
        self.write(|txn| {
            let mut t = txn.open_table(RESULTS)?;
            for k in &bad {
                t.remove(k.as_str())?;
            }
            Ok(())
        })?;
        Ok(bad.len())
    }

    /// Last-use times of layers (unix seconds), for those that have one.
    pub fn last_used(&self) -> Result<std::collections::HashMap<u64, u64>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = match txn.open_table(LAST_USED) {
            Ok(t) => t,
            // A store written before use times were kept.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = std::collections::HashMap::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// Records last-use times of layers that still have a record, in one transaction.
    pub fn set_last_used(&self, times: &std::collections::HashMap<u64, u64>) -> Result<()> {
        if times.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
            let layers = txn.open_table(LAYERS)?;
            let mut t = txn.open_table(LAST_USED)?;
            for (id, at) in times {
                if layers.get(*id)?.is_some() {
                    let prev = t.get(*id)?.map(|v| v.value()).unwrap_or(0);
                    if *at > prev {
                        t.insert(*id, *at)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Removes layer records (and their blob links and use times) in one transaction.
    pub fn remove_layers(&self, ids: &[u64]) -> Result<()> {
        self.write(|txn| {
            {
                let mut used = txn.open_table(LAST_USED)?;
                for id in ids {
                    used.remove(*id)?;
                }
            }
            let mut t = txn.open_table(LAYERS)?;
            let mut blobs = Vec::new();
            for id in ids {
                if let Some(v) = t.remove(*id)? {
                    if let Ok(rec) = serde_json::from_slice::<LayerRecord>(v.value()) {
                        blobs.extend(rec.blobs.into_iter().map(|b| b.digest));
                    }
                }
            }
            let mut b = txn.open_table(BLOBS)?;
            for d in &blobs {
                b.remove(d.as_str())?;
            }
            Ok(())
        })
    }
}
