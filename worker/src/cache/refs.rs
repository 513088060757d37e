//! Refs and layers: an immutable result is a stack of committed layer directories; a new
//! layer is built under a temporary name and becomes a [`Layer`] only when committed.
//!
//! Every [`Layer`] value holds its layer ([`Holds`]): while any clone of it lives (in a
//! build's results, a mount, an export queue), GC leaves the layer alone. Dropping the
//! last clone records the layer's last use, which orders GC (least recently used first).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{io, Result};

/// A committed, immutable layer directory (overlay upper format).
#[derive(Clone)]
pub struct Layer {
    /// Its id in the metadata store.
    pub id: u64,
    dir: PathBuf,
    _hold: Arc<Hold>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
}

impl PartialEq for Layer {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.dir == other.dir
    }
}

impl Eq for Layer {}

impl std::hash::Hash for Layer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.dir.hash(state);
    }
}

impl Layer {
    pub(crate) fn new(id: u64, root: PathBuf, hold: Arc<Hold>) -> Layer {
        Layer {
            id,
            dir: root,
            _hold: hold,
        }
    }

    /// The layer's files.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }
}

/// An immutable result: layers, lowest first (none = scratch). A *lazy* result (a pool
/// cache hit) knows its layers only by blob digest until [`Ref::materialize`] fetches,
/// verifies and unpacks them; until then [`Ref::layers`] must not be used on it.
#[derive(Debug, Clone, Default)]
pub struct Ref {
    layers: Arc<Vec<Layer>>,
    lazy: Option<(Arc<Lazy>, usize)>,
}

impl PartialEq for Ref {
    fn eq(&self, other: &Self) -> bool {
        match (&self.lazy, &other.lazy) {
            (None, None) => self.layers == other.layers,
            (Some((a, i)), Some((b, j))) => Arc::ptr_eq(a, b) && i == j,
            _ => false,
        }
    }
}

impl Eq for Ref {}

/// How a lazy result is made real: fetches, verifies, unpacks and records all outputs of
/// one vertex at once.
pub type Loader =
    Box<dyn Fn() -> futures::future::BoxFuture<'static, Result<Vec<Ref>, String>> + Send + Sync>;

/// The outputs of one vertex known by digest only (see [`Ref::lazy`]).
pub struct Lazy {
    /// What it is, for messages (the cache and the key).
    what: String,
    load: Loader,
    done: tokio::sync::OnceCell<Result<Vec<Ref>, String>>,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy")
            .field("what", &self.what)
            .field("loaded", &self.done.initialized())
            .finish()
    }
}

impl Ref {
    /// A ref of these layers.
    pub fn new(layers: Vec<Layer>) -> Ref {
        Ref {
            layers: Arc::new(layers),
            lazy: None,
        }
    }

    /// `outputs` lazy refs over one vertex's results, made real (all at once, the first
    /// time any of them is asked for) by `load`; `what` names them in errors.
    pub fn lazy(what: String, outputs: usize, load: Loader) -> Vec<Ref> {
        let lazy = Arc::new(Lazy {
            what,
            load,
            done: tokio::sync::OnceCell::new(),
        });
        (0..outputs)
            .map(|i| Ref {
                layers: Arc::default(),
                lazy: Some((lazy.clone(), i)),
            })
            .collect()
    }

    /// The empty filesystem.
    pub fn scratch() -> Ref {
        Ref::default()
    }

    /// True while this is a lazy result not yet fetched.
    pub fn is_lazy(&self) -> bool {
        self.loaded().is_none() && self.lazy.is_some()
    }

    fn loaded(&self) -> Option<&Ref> {
        let (lazy, i) = self.lazy.as_ref()?;
        match lazy.done.get() {
            Some(Ok(refs)) => refs.get(*i),
            _ => None,
        }
    }

    /// This result with its layers on disk: a lazy result is fetched (every blob verified by
    /// digest, every layer by diffID) and recorded in the local cache the first time;
    /// anything else is returned as is.
    pub async fn materialize(&self) -> Result<Ref, String> {
        let Some((lazy, i)) = &self.lazy else {
            return Ok(self.clone());
        };
        let refs = lazy
            .done
            .get_or_init(|| (lazy.load)())
            .await
            .as_ref()
            .map_err(|e| format!("{}: {e}", lazy.what))?;
        refs.get(*i)
            .cloned()
            .ok_or_else(|| format!("{}: no output {i}", lazy.what))
    }

    /// Layers, lowest first. Empty for a lazy result not yet materialized (a bug in the
    /// caller, which is logged): use [`Ref::materialize`] first.
    pub fn layers(&self) -> &[Layer] {
        if self.lazy.is_some() {
            return match self.loaded() {
                Some(r) => r.layers(),
                None => {
                    tracing::error!(
                        what = self.lazy.as_ref().map(|(l, _)| l.what.as_str()),
                        "layers of a lazy result read before it was materialized"
                    );
                    &[]
                }
            };
        }
        &self.layers
    }

    /// Layer `fs` directories, lowest first.
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        self.layers().iter().map(Layer::fs).collect()
    }

    /// This ref with `layer` on top.
    pub fn with(&self, layer: Layer) -> Ref {
        let mut v = self.layers().to_vec();
        v.push(layer);
        Ref::new(v)
    }
}

/// A layer being built; removed when dropped uncommitted.
#[derive(Debug)]
pub struct NewLayer {
    id: u64,
    tmp: PathBuf,
    done: bool,
}

impl NewLayer {
    pub(crate) fn create(snapshots: &Path, id: u64) -> Result<NewLayer> {
        let tmp = snapshots.join(format!("tmp-{id}"));
        for d in ["fs", "work"] {
            let p = tmp.join(d);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        Ok(NewLayer {
            id,
            tmp,
            done: false,
        })
    }

    /// The id it will have.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where its files go (the overlay upper dir).
    pub fn fs(&self) -> PathBuf {
        self.tmp.join("fs")
    }

    /// An empty directory on the same filesystem (the overlay work dir).
    pub fn work(&self) -> PathBuf {
        self.tmp.join("work")
    }

    /// A scratch directory beside it (mount points and the like), created on demand.
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let p = self.tmp.join(name);
        std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        Ok(p)
    }

    /// Moves the layer into place; the caller records and holds it.
    pub(crate) fn finish(mut self, snapshots: &Path) -> Result<PathBuf> {
        // Only `fs` survives; the work dir and scratch dirs are not part of the layer.
        if let Ok(entries) = std::fs::read_dir(&self.tmp) {
            for e in entries.flatten() {
                if e.file_name() != "fs" {
                    remove_tree(&e.path());
                }
            }
        }
        let dest = snapshots.join(self.id.to_string());
        std::fs::rename(&self.tmp, &dest).map_err(io("rename", &self.tmp))?;
        self.done = true;
        Ok(dest)
    }
}

impl Drop for NewLayer {
    fn drop(&mut self) {
        if !self.done {
            remove_tree(&self.tmp);
        }
    }
}

// === holds ===

/// Which layers live [`Layer`] values hold, and when layers were last used (not yet
/// written to the metadata store). GC takes [`Holds::lock`] while it picks and unrecords
/// layers, so a layer is either held before GC looks or gone before anyone can hold it.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    inner: Mutex<HoldTable>,
}

/// The table behind [`Holds`].
#[derive(Debug, Default)]
pub(crate) struct HoldTable {
    held: HashMap<u64, usize>,
    used: HashMap<u64, u64>,
}

/// One hold on a layer; released (and the use time recorded) when dropped.
pub(crate) struct Hold {
    id: u64,
    holds: Arc<Holds>,
}

impl Holds {
    /// The table, locked (a poisoned lock is still a consistent table: every change is one
    /// map update).
    pub(crate) fn lock(&self) -> MutexGuard<'_, HoldTable> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds layer `id` (the table must be locked by the caller: `table`).
    pub(crate) fn hold(self: &Arc<Self>, table: &mut HoldTable, id: u64) -> Arc<Hold> {
        *table.held.entry(id).or_default() += 1;
        table.used.insert(id, super::unix_now());
        Arc::new(Hold {
            id,
            holds: self.clone(),
        })
    }
}

impl HoldTable {
    /// Whether a live value holds layer `id`.
    pub(crate) fn is_held(&self, id: u64) -> bool {
        self.held.get(&id).is_some_and(|n| *n > 0)
    }

    /// How many layers are held now.
    pub(crate) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Use times recorded since the last call.
    pub(crate) fn take_used(&mut self) -> HashMap<u64, u64> {
        std::mem::take(&mut self.used)
    }

    /// The last use of `id` not yet written to the store.
    pub(crate) fn used(&self, id: u64) -> Option<u64> {
        self.used.get(&id).copied()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut t = self.holds.lock();
        if let Some(n) = t.held.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                t.held.remove(&self.id);
            }
        }
        t.used.insert(self.id, super::unix_now());
    }
}

/// Removes a tree, best effort (overlay work dirs hold root-only `work/work` dirs).
pub(crate) fn remove_tree(p: &Path) {
    if let Err(e) = std::fs::remove_dir_all(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove");
        }
    }
}

/// Flushes the filesystem holding `p` (one syncfs instead of an fsync per file).
pub(crate) fn sync_fs(p: &Path) -> Result<()> {
    let f = std::fs::File::open(p).map_err(io("open", p))?;
    nix::unistd::syncfs(&f).map_err(|e| super::Error::Io {
        op: "syncfs",
        path: p.to_path_buf(),
        source: e.into(),
    })
}

/// Fsyncs a directory so renames in it are durable.
pub(crate) fn sync_dir(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync", p))
}
