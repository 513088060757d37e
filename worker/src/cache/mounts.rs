//! Cache mounts (`RUN --mount=type=cache`) shared through an exported cache: where a
//! mount's directory lives on the worker, packing mounts into layer blobs for
//! `--export-cache …,cache-mounts=true`, and seeding a worker's missing mounts from an
//! imported cache. Uses `export` (blob making) and `snapshot` (verified unpacking).
//!
//! A cache mount is a plain directory `ROOT/cachemounts/<hex sha256 of its id>` that RUN
//! steps bind-mount read-write; it is not a cache record and belongs to no result. An
//! export packs each mount the build's definition names into one layer blob (a tar of the
//! directory); an import seeds a mount only when the worker has no directory for its id
//! yet, so local contents always win. A seed is unpacked under a temporary name, its
//! uncompressed digest checked, and renamed into place only when complete.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::content::ContentStore;
use crate::export::image::ImageOpts;
use crate::export::{ExportLayer, LayerBlob};
use crate::llb::pb;
use crate::snapshot::layer::{unpack_blob, UnpackLimits};

/// The directory under the worker root holding every cache mount.
pub const DIR: &str = "cachemounts";

/// Prefix of a seed being unpacked (removed when found at start-up).
const SEED_PREFIX: &str = ".seed-";

/// The directory of cache mount `id` under the worker `root`.
pub fn dir(root: &Path, id: &str) -> PathBuf {
    use sha2::Digest as _;
    root.join(DIR)
        .join(hex::encode(sha2::Sha256::digest(id.as_bytes())))
}

/// The cache mount ids the exec ops among `ops` use (an empty id is the mount's target
/// path, as the exec op treats it).
pub fn ids<'a>(ops: impl IntoIterator<Item = &'a pb::Op>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for op in ops {
        if let Some(pb::op::Op::Exec(e)) = &op.op {
            for m in &e.mounts {
                if m.mount_type() != pb::MountType::Cache {
                    continue;
                }
                let id = m.cache_opt.as_ref().map(|o| o.id.as_str()).unwrap_or("");
                out.insert(if id.is_empty() {
                    m.dest.clone()
                } else {
                    id.to_string()
                });
            }
        }
    }
    out
}

/// Removes seeds a crash left half-unpacked.
pub fn clean(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root.join(DIR)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(SEED_PREFIX) {
            if let Err(error) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(%error, path = %e.path().display(), "cannot remove a partial cache mount seed");
            }
        }
    }
}

/// Packs the cache mounts `ids` that exist on this worker and are not empty into layer
/// blobs in `content` (compression from `opts`). A mount that cannot be read (for
/// example because a running build changes it) is skipped with a warning in the result.
pub fn pack(
    content: &ContentStore,
    root: &Path,
    ids: &BTreeSet<String>,
    opts: &ImageOpts,
) -> (Vec<(String, LayerBlob)>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for id in ids {
        let layer = ExportLayer {
            dir: dir(root, id),
            blobs: Vec::new(),
        };
        if !layer.dir.is_dir() {
            continue;
        }
        match crate::export::image::layer_blob(content, &layer, opts, opts.compression) {
            Ok(Some(blob)) => out.push((id.clone(), blob)),
            Ok(None) => {}
            Err(e) => warnings.push(format!("cache mount {id:?} not exported: {e}")),
        }
    }
    (out, warnings)
}

/// Unpacks the blob at `blob` (already verified by digest) as the contents of cache mount
/// `id` under `root`, unless the worker already has that mount. Returns whether it seeded.
pub fn seed(root: &Path, id: &str, layer: &LayerBlob, blob: &Path) -> Result<bool, String> {
    let target = dir(root, id);
    if target.exists() {
        return Ok(false);
    }
    let parent = root.join(DIR);
    std::fs::create_dir_all(&parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(SEED_PREFIX)
        .tempdir_in(&parent)
        .map_err(|e| format!("create a seed directory in {}: {e}", parent.display()))?;
    let stats = unpack_blob(
        blob,
        &layer.media_type,
        tmp.path(),
        &UnpackLimits::default(),
    )
    .map_err(|e| e.to_string())?;
    if stats.diff_id != layer.diff_id {
        return Err(format!(
            "blob {}: uncompressed digest {}, expected {}",
            layer.digest, stats.diff_id, layer.diff_id
        ));
    }
    let tmp = tmp.keep();
    // Another build may have created the mount meanwhile: its contents win.
    if target.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(false);
    }
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_dir_all(&tmp);
        if target.exists() {
            return Ok(false);
        }
        return Err(format!("rename the seed into {}: {e}", target.display()));
    }
    Ok(true)
}

/// Seeds the cache mounts an imported cache carries that this worker does not have yet:
/// each blob is fetched (verified by digest and size), unpacked and checked. Returns the
/// ids seeded and, per mount that could not be seeded, a warning (the mount then starts
/// empty, as it would without the import).
pub async fn seed_from(
    found: &super::registry::Found,
    content: &std::sync::Arc<ContentStore>,
    root: &Path,
) -> (Vec<String>, Vec<String>) {
    let (mut seeded, mut warnings) = (Vec::new(), Vec::new());
    for (id, layer) in &found.cache_mounts {
        if dir(root, id).exists() {
            continue;
        }
        let desc = crate::source::image::BlobDesc {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
        };
        let path = match found.source.fetch(content, &desc).await {
            Ok(p) => p,
            Err(e) => {
                warnings.push(format!("cache mount {id:?} not seeded: {e}"));
                continue;
            }
        };
        let (root, id2, layer) = (root.to_path_buf(), id.clone(), layer.clone());
        match tokio::task::spawn_blocking(move || seed(&root, &id2, &layer, &path)).await {
            Ok(Ok(true)) => seeded.push(id.clone()),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warnings.push(format!("cache mount {id:?} not seeded: {e}")),
            Err(e) => warnings.push(format!("cache mount {id:?} not seeded: {e}")),
        }
    }
    (seeded, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_with_mounts(mounts: Vec<pb::Mount>) -> pb::Op {
        pb::Op {
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                mounts,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn cache_mount(dest: &str, id: &str) -> pb::Mount {
        pb::Mount {
            dest: dest.into(),
            mount_type: pb::MountType::Cache as i32,
            cache_opt: Some(pb::CacheOpt {
                id: id.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_the_cache_mounts_of_exec_ops() {
        let bind = pb::Mount {
            dest: "/src".into(),
            ..Default::default()
        };
        let op = exec_with_mounts(vec![
            cache_mount("/root/.cache", "go"),
            cache_mount("/var/cache/apt", ""),
            bind,
        ]);
        let got: Vec<String> = ids([&op]).into_iter().collect();
        assert_eq!(got, vec!["/var/cache/apt".to_string(), "go".to_string()]);
    }

    #[test]
    fn pack_then_seed_round_trips_and_local_contents_win() {
        let root_a = tempfile::tempdir().unwrap();
        let root_b = tempfile::tempdir().unwrap();
        let content = ContentStore::open(&root_a.path().join("content")).unwrap();
        let d = dir(root_a.path(), "go");
        std::fs::create_dir_all(d.join("pkg")).unwrap();
        std::fs::write(d.join("pkg/mod.txt"), b"cached module").unwrap();
        std::fs::create_dir_all(dir(root_a.path(), "empty")).unwrap();
        let ids: BTreeSet<String> = ["go", "empty", "absent"].map(String::from).into();
        let (packed, warnings) = pack(&content, root_a.path(), &ids, &ImageOpts::default());
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(packed.len(), 1, "only the non-empty mount is packed");
        let (id, blob) = &packed[0];
        assert_eq!(id, "go");
        let path = content.path(&blob.digest).unwrap();
        assert!(seed(root_b.path(), id, blob, &path).unwrap());
        let seeded = dir(root_b.path(), "go").join("pkg/mod.txt");
        assert_eq!(std::fs::read(&seeded).unwrap(), b"cached module");
        // A second seed leaves the (now local) contents alone.
        std::fs::write(&seeded, b"changed locally").unwrap();
        assert!(!seed(root_b.path(), id, blob, &path).unwrap());
        assert_eq!(std::fs::read(&seeded).unwrap(), b"changed locally");
    }

    #[test]
    fn a_seed_whose_contents_do_not_match_is_refused_and_leaves_nothing() {
        let root_a = tempfile::tempdir().unwrap();
        let root_b = tempfile::tempdir().unwrap();
        let content = ContentStore::open(&root_a.path().join("content")).unwrap();
        let d = dir(root_a.path(), "x");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"data").unwrap();
        let ids: BTreeSet<String> = ["x".to_string()].into();
        let (packed, _) = pack(&content, root_a.path(), &ids, &ImageOpts::default());
        let (_, mut blob) = packed.into_iter().next().unwrap();
        let path = content.path(&blob.digest).unwrap();
        blob.diff_id = format!("sha256:{}", "0".repeat(64));
        let err = seed(root_b.path(), "x", &blob, &path).unwrap_err();
        assert!(err.contains("uncompressed digest"), "{err}");
        assert!(!dir(root_b.path(), "x").exists());
        let left: Vec<_> = std::fs::read_dir(root_b.path().join(DIR))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "a partial seed was left: {left:?}");
    }
}
