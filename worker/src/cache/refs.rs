//! Refs and layers: an immutable result is a stack of committed layer directories; a new
//! layer is built under a temporary name and becomes a [`Layer`] only when committed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{io, Result};

/// A committed, immutable layer directory (overlay upper format).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layer {
    /// Its id in the metadata store.
    pub id: u64,
    dir: PathBuf,
}

impl Layer {
    pub(crate) fn new(id: u64, root: PathBuf) -> Layer {
        Layer { id, dir: root }
    }

    /// The layer's files.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }
}

/// An immutable result: layers, lowest first (none = scratch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ref(Arc<Vec<Layer>>);

impl Ref {
    /// A ref of these layers.
    pub fn new(layers: Vec<Layer>) -> Ref {
        Ref(Arc::new(layers))
    }

    /// The empty filesystem.
    pub fn scratch() -> Ref {
        Ref::default()
    }

    /// Layers, lowest first.
    pub fn layers(&self) -> &[Layer] {
        &self.0
    }

    /// Layer `fs` directories, lowest first.
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        self.0.iter().map(Layer::fs).collect()
    }

    /// This ref with `layer` on top.
    pub fn with(&self, layer: Layer) -> Ref {
        let mut v = (*self.0).clone();
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

    pub(crate) fn finish(mut self, snapshots: &Path) -> Result<Layer> {
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
        Ok(Layer::new(self.id, dest))
    }
}

impl Drop for NewLayer {
    fn drop(&mut self) {
        if !self.done {
            remove_tree(&self.tmp);
        }
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
