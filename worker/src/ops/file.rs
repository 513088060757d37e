//! The file op: LLB `FileOp` actions (copy, mkfile, mkdir, rm, symlink) run against
//! mounted snapshots; the filesystem work itself is in [`fsops`]. A chain of actions
//! (each working on the previous one's result, as Dockerfile COPY emits) runs in one
//! writable mount and becomes one layer.

pub mod fsops;

use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::{BuildCtx, Error};
use crate::cache::{NewLayer, Ref};
use crate::llb::pb;
use crate::snapshot::{ActiveMount, Snapshotter};
use crate::solver::{BoxError, VertexCtx};

/// A file op.
pub struct FileOpImpl {
    op: pb::FileOp,
    inputs: usize,
    outputs: usize,
}

// === impl FileOpImpl ===

impl FileOpImpl {
    /// Validates action indexes against the op's `inputs` count.
    pub fn new(op: pb::FileOp, inputs: usize) -> super::Result<FileOpImpl> {
        let mut outputs = Vec::new();
        for (k, a) in op.actions.iter().enumerate() {
            let limit = (inputs + k) as i64;
            for (what, idx) in [("input", a.input), ("secondaryInput", a.secondary_input)] {
                if idx < -1 || idx >= limit {
                    return Err(Error::Invalid(format!(
                        "file action {k}: {what} {idx} is out of range"
                    )));
                }
            }
            if a.action.is_none() {
                return Err(Error::Invalid(format!("file action {k} has no action")));
            }
            if a.output >= 0 {
                outputs.push(a.output);
            }
        }
        outputs.sort_unstable();
        if outputs.is_empty() || outputs.iter().enumerate().any(|(i, o)| *o != i as i64) {
            return Err(Error::Invalid(format!(
                "file op output indexes {outputs:?} are not 0..n"
            )));
        }
        Ok(FileOpImpl {
            inputs,
            outputs: outputs.len(),
            op,
        })
    }

    /// How many outputs.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The op inputs read by copies (their contents are part of the key).
    pub fn content_inputs(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .op
            .actions
            .iter()
            .filter(|a| match &a.action {
                Some(pb::file_action::Action::Copy(c)) => !copies_whole_root(c),
                _ => false,
            })
            .filter(|a| a.secondary_input >= 0 && (a.secondary_input as usize) < self.inputs)
            .map(|a| a.secondary_input as usize)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The digest of everything the copies read.
    pub async fn cache_key(
        &self,
        build: &Arc<BuildCtx>,
        inputs: &[Option<Ref>],
    ) -> Result<String, BoxError> {
        let copies: Vec<(usize, pb::FileActionCopy)> = self
            .op
            .actions
            .iter()
            .filter_map(|a| match &a.action {
                Some(pb::file_action::Action::Copy(c))
                    if a.secondary_input >= 0
                        && (a.secondary_input as usize) < self.inputs
                        && !copies_whole_root(c) =>
                {
                    Some((a.secondary_input as usize, c.clone()))
                }
                _ => None,
            })
            .collect();
        if copies.is_empty() {
            return Ok(String::new());
        }
        let inputs = inputs.to_vec();
        let worker = build.worker.clone();
        super::blocking(move || {
            let mut h = Sha256::new();
            for (idx, copy) in copies {
                let src = inputs
                    .get(idx)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| -> BoxError {
                        format!("copy input {idx} not resolved").into()
                    })?;
                let view = View::open(&worker.snapshotter, &worker.root, &src)?;
                let sum = fsops::copy_checksum(view.path(), &copy)?;
                h.update(sum.as_bytes());
                h.update([0]);
            }
            Ok(format!("/copy:sha256:{}", hex::encode(h.finalize())))
        })
        .await
    }

    /// Runs the actions.
    pub async fn exec(
        &self,
        build: &Arc<BuildCtx>,
        _ctx: &VertexCtx,
        inputs: &[Ref],
    ) -> Result<Vec<Ref>, BoxError> {
        let op = self.op.clone();
        let inputs = inputs.to_vec();
        let n_inputs = self.inputs;
        let n_outputs = self.outputs;
        let worker = build.worker.clone();
        super::blocking(move || run_actions(&worker, &op, n_inputs, n_outputs, &inputs)).await
    }
}

/// A copy of the whole source root reads everything the source's own cache key already
/// stands for, so its contents need not be hashed again (`COPY . /app`).
fn copies_whole_root(c: &pb::FileActionCopy) -> bool {
    let src = c.src.trim_end_matches('/').trim_start_matches("./");
    (src.is_empty() || src == "/" || src == ".")
        && c.include_patterns.is_empty()
        && c.exclude_patterns.is_empty()
}

/// A read-only view of a ref: the layer dir itself when it is a single layer, else a mount.
struct View {
    path: PathBuf,
    _mount: Option<ActiveMount>,
    _dir: Option<tempfile::TempDir>,
}

impl View {
    fn open(snap: &Snapshotter, root: &std::path::Path, r: &Ref) -> Result<View, BoxError> {
        match r.layers() {
            [] => {
                let dir = tempdir(root)?;
                Ok(View {
                    path: dir.path().to_path_buf(),
                    _mount: None,
                    _dir: Some(dir),
                })
            }
            // A lone layer sits over nothing, so it has nothing to white out: read it as is.
            [only] => Ok(View {
                path: only.fs(),
                _mount: None,
                _dir: None,
            }),
            _ => {
                let dir = tempdir(root)?;
                let target = dir.path().join("v");
                std::fs::create_dir(&target)?;
                let mount = snap.mount_readonly(&r.layer_dirs(), &target)?;
                Ok(View {
                    path: mount.path().to_path_buf(),
                    _mount: Some(mount),
                    _dir: Some(dir),
                })
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // Unmount before the temporary directory is removed.
        if let Some(m) = self._mount.take() {
            let _ = m.commit();
        }
    }
}

fn tempdir(root: &std::path::Path) -> std::io::Result<tempfile::TempDir> {
    let base = root.join("mounts");
    std::fs::create_dir_all(&base)?;
    tempfile::Builder::new().prefix("file-").tempdir_in(base)
}

/// The writable mount the current chain of actions works in.
struct Chain {
    base: Ref,
    layer: NewLayer,
    /// The writable view: an overlay mount, or the new layer itself over scratch.
    root: PathBuf,
    mount: Option<ActiveMount>,
    _dir: Option<tempfile::TempDir>,
}

fn run_actions(
    worker: &super::Worker,
    op: &pb::FileOp,
    n_inputs: usize,
    n_outputs: usize,
    inputs: &[Ref],
) -> Result<Vec<Ref>, BoxError> {
    let mut results: Vec<Option<Ref>> = vec![None; op.actions.len()];
    let mut outputs: Vec<Option<Ref>> = vec![None; n_outputs];
    let mut chain: Option<(usize, Chain)> = None;
    // Which action results are needed by a later action other than as its direct base.
    let mut needed = vec![false; op.actions.len()];
    for (k, a) in op.actions.iter().enumerate() {
        if a.secondary_input >= n_inputs as i64 {
            needed[a.secondary_input as usize - n_inputs] = true;
        }
        if let Some(pb::file_action::Action::Copy(c)) = &a.action {
            if let Some(o) = c.owner.as_ref() {
                for u in [o.user.as_ref(), o.group.as_ref()].into_iter().flatten() {
                    if let Some(pb::user_opt::User::ByName(n)) = &u.user {
                        if n.input >= n_inputs as i64 {
                            needed[n.input as usize - n_inputs] = true;
                        }
                    }
                }
            }
        }
        let _ = k;
    }
    let resolve = |idx: i64, results: &[Option<Ref>]| -> Result<Ref, BoxError> {
        if idx < 0 {
            Ok(Ref::scratch())
        } else if (idx as usize) < n_inputs {
            Ok(inputs[idx as usize].clone())
        } else {
            results[idx as usize - n_inputs]
                .clone()
                .ok_or_else(|| -> BoxError {
                    format!("file action result {idx} not available").into()
                })
        }
    };
    for (k, a) in op.actions.iter().enumerate() {
        // Continue the open chain when this action works on its result.
        let continues = matches!(&chain, Some((last, _)) if a.input == (n_inputs + *last) as i64);
        if !continues {
            if let Some((last, c)) = chain.take() {
                let r = close_chain(worker, c)?;
                results[last] = Some(r);
            }
            let base = resolve(a.input, &results)?;
            let layer = worker.cache.new_layer()?;
            let c = if base.layers().is_empty() {
                // Over scratch the new layer is the whole tree: write it directly.
                Chain {
                    root: layer.fs(),
                    base,
                    layer,
                    mount: None,
                    _dir: None,
                }
            } else {
                let dir = tempdir(&worker.root)?;
                let target = dir.path().join("rw");
                std::fs::create_dir(&target)?;
                let mount = worker.snapshotter.mount(
                    &base.layer_dirs(),
                    &layer.fs(),
                    &layer.work(),
                    &target,
                )?;
                Chain {
                    root: mount.path().to_path_buf(),
                    base,
                    layer,
                    mount: Some(mount),
                    _dir: Some(dir),
                }
            };
            chain = Some((k, c));
        }
        let Some((_, c)) = chain.as_ref() else {
            return Err("file op chain missing".into());
        };
        let dest_root = c.root.clone();
        let owner_opt = match &a.action {
            Some(pb::file_action::Action::Copy(c)) => c.owner.as_ref(),
            Some(pb::file_action::Action::Mkfile(f)) => f.owner.as_ref(),
            Some(pb::file_action::Action::Mkdir(d)) => d.owner.as_ref(),
            Some(pb::file_action::Action::Symlink(l)) => l.owner.as_ref(),
            Some(pb::file_action::Action::Rm(_)) | None => None,
        };
        let owner = owner_for(
            worker, owner_opt, &dest_root, a.input, n_inputs, inputs, &results,
        )?;
        match &a.action {
            Some(pb::file_action::Action::Copy(copy)) => {
                let src = resolve(a.secondary_input, &results)?;
                let view = View::open(&worker.snapshotter, &worker.root, &src)?;
                fsops::copy(view.path(), &dest_root, copy, owner)?;
            }
            Some(pb::file_action::Action::Mkfile(f)) => fsops::mkfile(&dest_root, f, owner)?,
            Some(pb::file_action::Action::Mkdir(d)) => fsops::mkdir(&dest_root, d, owner)?,
            Some(pb::file_action::Action::Rm(r)) => fsops::rm(&dest_root, r)?,
            Some(pb::file_action::Action::Symlink(l)) => fsops::symlink(&dest_root, l, owner)?,
            None => return Err("file action without action".into()),
        }
        let is_output = a.output >= 0;
        let next_continues = op
            .actions
            .get(k + 1)
            .map(|n| n.input == (n_inputs + k) as i64)
            .unwrap_or(false);
        if is_output || needed[k] || !next_continues {
            if let Some((last, c)) = chain.take() {
                let r = close_chain(worker, c)?;
                results[last] = Some(r.clone());
                results[k] = Some(r.clone());
                if is_output {
                    outputs[a.output as usize] = Some(r);
                }
            }
        } else if let Some((last, _)) = chain.as_mut() {
            *last = k;
        }
    }
    if let Some((last, c)) = chain.take() {
        results[last] = Some(close_chain(worker, c)?);
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.ok_or_else(|| -> BoxError { format!("file op output {i} not produced").into() })
        })
        .collect()
}

fn close_chain(worker: &super::Worker, c: Chain) -> Result<Ref, BoxError> {
    if let Some(m) = c.mount {
        m.commit()?;
    }
    let mut layers = worker.cache.commit_layers(vec![(c.layer, Vec::new())])?;
    let l = layers
        .pop()
        .ok_or_else(|| -> BoxError { "layer commit returned nothing".into() })?;
    Ok(c.base.with(l))
}

#[allow(clippy::too_many_arguments)]
fn owner_for(
    worker: &super::Worker,
    owner: Option<&pb::ChownOpt>,
    current: &std::path::Path,
    base_idx: i64,
    n_inputs: usize,
    inputs: &[Ref],
    results: &[Option<Ref>],
) -> Result<Option<(u32, u32)>, BoxError> {
    let Some(o) = owner else {
        return Ok(None);
    };
    // A name is looked up in the passwd/group files of the input it names; the base of
    // this action is the mount already open.
    let named_input = [o.user.as_ref(), o.group.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|u| match &u.user {
            Some(pb::user_opt::User::ByName(n)) => Some(n.input),
            _ => None,
        });
    match named_input {
        None => Ok(fsops::resolve_owner(Some(o), None)?),
        Some(idx) if idx == base_idx => Ok(fsops::resolve_owner(Some(o), Some(current))?),
        Some(idx) => {
            let r = if idx < 0 {
                Ref::scratch()
            } else if (idx as usize) < n_inputs {
                inputs[idx as usize].clone()
            } else {
                results
                    .get(idx as usize - n_inputs)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| -> BoxError {
                        format!("chown input {idx} not available").into()
                    })?
            };
            let view = View::open(&worker.snapshotter, &worker.root, &r)?;
            Ok(fsops::resolve_owner(Some(o), Some(view.path()))?)
        }
    }
}
