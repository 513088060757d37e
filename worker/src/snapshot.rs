//! Snapshots: layer directories in overlayfs upper-dir format, mounted as stacks with
//! kernel overlayfs (or materialized by copying where overlay is unavailable), safe path
//! resolution inside a root, and layer diffs/unpacking ([`layer`]). Uses nothing else in
//! the crate; only `cache`, `ops`, `export` and `executor` callers use it.

pub mod fsutil;
pub mod layer;
mod materialize;
mod overlay;

pub use overlay::MAX_LAYERS;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What can go wrong with a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mounting or unmounting failed.
    #[error("mount {target}: {message}")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// What failed.
        message: String,
    },
    /// A layer tar was malformed or tried to escape its root.
    #[error("layer {layer}: {message}")]
    Layer {
        /// Which layer (digest or path).
        layer: String,
        /// What is wrong.
        message: String,
    },
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How layer stacks are presented as one tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Kernel overlayfs.
    Overlay,
    /// Copy the layers into a directory; diff it back afterwards.
    Copy,
}

/// Mounts stacks of layer directories.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    kind: Kind,
}

impl Snapshotter {
    /// Overlay when a test mount in `scratch` works, else copying.
    pub fn detect(scratch: &Path) -> Snapshotter {
        let kind = if overlay::probe(scratch) {
            Kind::Overlay
        } else {
            Kind::Copy
        };
        tracing::info!(?kind, "snapshotter selected");
        Snapshotter { kind }
    }

    /// A snapshotter of a given kind.
    pub fn with_kind(kind: Kind) -> Snapshotter {
        Snapshotter { kind }
    }

    /// Which kind this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A writable view at `target` of `layers` (lowest first, may be empty); writes land
    /// in `upper` (an empty directory) in overlay format; `work` is an empty directory on
    /// the same filesystem as `upper`.
    pub fn mount(
        &self,
        layers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<ActiveMount> {
        match self.kind {
            Kind::Overlay => overlay::mount_rw(layers, upper, work, target),
            Kind::Copy => materialize::mount(layers, Some(upper), target),
        }
    }

    /// A read-only view of `layers` at `target`.
    pub fn mount_readonly(&self, layers: &[PathBuf], target: &Path) -> Result<ActiveMount> {
        match self.kind {
            Kind::Overlay => overlay::mount_ro(layers, target),
            Kind::Copy => materialize::mount(layers, None, target),
        }
    }
}

// === impl ActiveMount ===

/// What an [`ActiveMount`] has to undo.
#[derive(Debug)]
enum MountState {
    /// A kernel mount at the target; an empty lower dir to remove afterwards, if any.
    Kernel { empty_lower: Option<PathBuf> },
    /// Layers copied into the target; a writable view diffs into `upper` on commit.
    Copied(Box<materialize::Materialized>),
    /// Nothing left to undo.
    Done,
}

/// A mounted view; unmounted (best effort) when dropped.
#[derive(Debug)]
pub struct ActiveMount {
    target: PathBuf,
    state: MountState,
}

impl ActiveMount {
    /// Where the view is.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts; for a writable copy-kind view, first writes the changes into `upper` in
    /// overlay format (whiteouts for deletions, opaque markers for replaced directories).
    pub fn commit(mut self) -> Result<()> {
        let state = std::mem::replace(&mut self.state, MountState::Done);
        match state {
            MountState::Kernel { empty_lower } => {
                overlay::unmount(&self.target, false)?;
                if let Some(dir) = empty_lower {
                    let _ = std::fs::remove_dir(&dir);
                }
                Ok(())
            }
            MountState::Copied(mut m) => {
                let res = m.commit(&self.target);
                m.unbind(&self.target);
                let cleared = materialize::clear_dir(&self.target);
                res.and(cleared)
            }
            MountState::Done => Ok(()),
        }
    }
}

impl Drop for ActiveMount {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, MountState::Done) {
            MountState::Kernel { empty_lower } => {
                if let Err(error) = overlay::unmount(&self.target, true) {
                    tracing::warn!(%error, "unmount on drop failed");
                }
                if let Some(dir) = empty_lower {
                    let _ = std::fs::remove_dir(&dir);
                }
            }
            MountState::Copied(mut m) => {
                m.unbind(&self.target);
                if let Err(error) = materialize::clear_dir(&self.target) {
                    tracing::warn!(%error, "clearing a copied view failed");
                }
            }
            MountState::Done => {}
        }
    }
}

// === resolve_in_root ===

/// Most symlinks followed in one resolution, as Linux allows.
const MAX_SYMLINKS: u32 = 40;

fn push_components(pending: &mut Vec<OsString>, path: &[u8]) {
    // Pushed in reverse so `pop` yields them in order; a trailing `/` means the last
    // component must be a directory, so it is followed like an inner one.
    let mut parts: Vec<OsString> = path
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .map(|p| OsString::from(std::ffi::OsStr::from_bytes(p)))
        .collect();
    if path.ends_with(b"/") || path.ends_with(b"/.") {
        parts.push(OsString::from("."));
    }
    pending.extend(parts.into_iter().rev());
}

/// Resolves `path` (absolute or relative) inside `root` the way the kernel would with
/// `root` as `/`: symlinks are followed (the last one only if `follow_last`) and `..`
/// never climbs above `root`. The result is always under `root`.
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf> {
    let mut pending = Vec::new();
    push_components(&mut pending, path.as_bytes());
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0u32;
    while let Some(c) = pending.pop() {
        if c == "." {
            continue;
        }
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        let is_last = pending.is_empty();
        let is_link = std::fs::symlink_metadata(&candidate)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if is_link && (!is_last || follow_last) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(Error::Io {
                    op: "resolve",
                    path: root.join(path.trim_start_matches('/')),
                    source: std::io::Error::from_raw_os_error(libc::ELOOP),
                });
            }
            let target =
                std::fs::read_link(&candidate).map_err(fsutil::io_err("readlink", &candidate))?;
            let bytes = target.as_os_str().as_bytes();
            if bytes.starts_with(b"/") {
                resolved.clear();
            }
            push_components(&mut pending, bytes);
        } else {
            resolved.push(c);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// Tests that time themselves take this lock exclusively; tests that load the machine
/// (mounts, containers) share it, so timings are not skewed by the crate's own tests.
#[cfg(test)]
pub(crate) static HEAVY_TESTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};

    fn write(p: &Path, data: &str) -> anyhow::Result<()> {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(p, data)?;
        Ok(())
    }

    #[test]
    fn resolve_in_root_clamps_hostile_symlinks() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let root = t.path();
        fs::create_dir_all(root.join("etc"))?;
        fs::create_dir_all(root.join("a/b"))?;
        symlink("../../etc/passwd", root.join("a/rel"))?;
        symlink("../../../../../../../etc/passwd", root.join("a/b/deep"))?;
        symlink("/etc/passwd", root.join("abs"))?;
        symlink("/", root.join("slash"))?;
        symlink("loop2", root.join("loop1"))?;
        symlink("loop1", root.join("loop2"))?;
        symlink("b", root.join("a/tob"))?;
        symlink("/a/tob/../..", root.join("updir"))?;

        assert_eq!(
            resolve_in_root(root, "/a/rel", true)?,
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "a/b/deep", true)?,
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "/abs", true)?,
            root.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(root, "/abs", false)?, root.join("abs"));
        assert_eq!(
            resolve_in_root(root, "/slash/../../x", true)?,
            root.join("x")
        );
        assert_eq!(
            resolve_in_root(root, "../../../etc", true)?,
            root.join("etc")
        );
        assert_eq!(
            resolve_in_root(root, "/a/tob/new/file", true)?,
            root.join("a/b/new/file")
        );
        assert_eq!(
            resolve_in_root(root, "/updir/etc", false)?,
            root.join("etc")
        );
        assert_eq!(resolve_in_root(root, "/a/tob/", false)?, root.join("a/b"));
        assert_eq!(resolve_in_root(root, "/", true)?, root.to_path_buf());
        let err = resolve_in_root(root, "/loop1", true)
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(err.to_string().contains("symbolic links"), "{err}");
        assert_eq!(resolve_in_root(root, "/loop1", false)?, root.join("loop1"));
        assert!(resolve_in_root(root, "/loop1/x", false).is_err());
        Ok(())
    }

    /// Two lower layers, a third with a whiteout and an opaque dir.
    fn make_layers(base: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let l1 = base.join("l1");
        let l2 = base.join("l2");
        let l3 = base.join("l3");
        write(&l1.join("a/one"), "1")?;
        write(&l1.join("a/two"), "2")?;
        write(&l1.join("d/x"), "x")?;
        write(&l1.join("d/y"), "y")?;
        write(&l1.join("keep"), "old")?;
        write(&l1.join("gone"), "g")?;
        write(&l2.join("a/three"), "3")?;
        write(&l2.join("o/old"), "o")?;
        fs::create_dir_all(&l3)?;
        fsutil::make_whiteout(&l3.join("gone"))?;
        write(&l3.join("o/new"), "n")?;
        fsutil::set_opaque(&l3.join("o"))?;
        Ok(vec![l1, l2, l3])
    }

    fn is_whiteout_at(p: &Path) -> bool {
        fs::symlink_metadata(p)
            .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
            .unwrap_or(false)
    }

    fn rw_roundtrip(kind: Kind) -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let base = t.path();
        let layers = make_layers(base)?;
        let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d)?;
        }
        let snap = Snapshotter::with_kind(kind);
        let m = snap.mount(&layers, &upper, &work, &merged)?;
        let root = m.path().to_path_buf();
        // The merged view honours the layers' whiteouts and opaque dirs.
        assert!(!root.join("gone").exists());
        assert!(!root.join("o/old").exists());
        assert_eq!(fs::read_to_string(root.join("o/new"))?, "n");
        assert_eq!(fs::read_to_string(root.join("a/three"))?, "3");
        // Changes.
        fs::write(root.join("new"), "fresh")?;
        fs::write(root.join("keep"), "changed")?;
        fs::remove_file(root.join("a/one"))?;
        fs::remove_dir_all(root.join("d"))?;
        write(&root.join("d/z"), "z")?;
        m.commit()?;
        assert!(fs::read_dir(&merged)?.next().is_none(), "view left behind");

        assert_eq!(fs::read_to_string(upper.join("new"))?, "fresh");
        assert_eq!(fs::read_to_string(upper.join("keep"))?, "changed");
        assert!(is_whiteout_at(&upper.join("a/one")));
        assert!(!upper.join("a/two").exists(), "unchanged file copied up");
        assert!(fsutil::is_opaque(&upper.join("d")));
        assert_eq!(fs::read_to_string(upper.join("d/z"))?, "z");
        assert!(!upper.join("d/x").exists());

        let ro = base.join("ro");
        fs::create_dir_all(&ro)?;
        let mut all = layers.clone();
        all.push(upper.clone());
        let v = snap.mount_readonly(&all, &ro)?;
        let r = v.path();
        assert_eq!(fs::read_to_string(r.join("new"))?, "fresh");
        assert_eq!(fs::read_to_string(r.join("keep"))?, "changed");
        assert!(!r.join("a/one").exists());
        assert_eq!(fs::read_to_string(r.join("a/two"))?, "2");
        assert_eq!(fs::read_to_string(r.join("a/three"))?, "3");
        assert_eq!(fs::read_to_string(r.join("d/z"))?, "z");
        assert!(!r.join("d/x").exists() && !r.join("d/y").exists());
        assert!(!r.join("gone").exists());
        if kind == Kind::Overlay {
            assert!(
                fs::write(r.join("nope"), "x").is_err(),
                "read-only view is writable"
            );
        }
        drop(v);
        assert!(
            !ro.join("new").exists(),
            "read-only view not removed on drop"
        );
        Ok(())
    }

    #[test]
    fn overlay_write_delete_replace_commit() -> anyhow::Result<()> {
        let _heavy = HEAVY_TESTS.blocking_read();
        rw_roundtrip(Kind::Overlay)
    }

    #[test]
    fn copy_write_delete_replace_commit() -> anyhow::Result<()> {
        let _heavy = HEAVY_TESTS.blocking_read();
        rw_roundtrip(Kind::Copy)
    }

    #[test]
    fn copy_commit_detects_chmod_and_replaced_file() -> anyhow::Result<()> {
        let _heavy = HEAVY_TESTS.blocking_read();
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir()?;
        let base = t.path();
        write(&base.join("l/f"), "same")?;
        write(&base.join("l/g"), "g")?;
        write(&base.join("l/h"), "h")?;
        write(&base.join("l/untouched"), "u")?;
        fs::create_dir_all(base.join("l/sub"))?;
        fs::hard_link(base.join("l/untouched"), base.join("l/sub/linked"))?;
        let (upper, merged) = (base.join("upper"), base.join("m"));
        fs::create_dir_all(&upper)?;
        let m = Snapshotter::with_kind(Kind::Copy).mount(
            &[base.join("l")],
            &upper,
            &base.join("w"),
            &merged,
        )?;
        assert_eq!(
            fs::metadata(merged.join("untouched"))?.ino(),
            fs::metadata(merged.join("sub/linked"))?.ino(),
            "hard link across directories not kept"
        );
        fs::set_permissions(merged.join("f"), fs::Permissions::from_mode(0o700))?;
        fs::remove_file(merged.join("g"))?;
        fs::write(merged.join("g"), "g")?;
        // Same size, right away: only the change time tells.
        fs::write(merged.join("h"), "H")?;
        m.commit()?;
        assert_eq!(fs::read_to_string(upper.join("h"))?, "H");
        assert!(!upper.join("untouched").exists());
        assert_eq!(fs::metadata(upper.join("f"))?.mode() & 0o777, 0o700);
        assert_eq!(fs::read_to_string(upper.join("g"))?, "g");
        Ok(())
    }

    #[test]
    fn overlay_many_layers_and_empty() -> anyhow::Result<()> {
        let _heavy = HEAVY_TESTS.blocking_read();
        let t = tempfile::tempdir()?;
        let base = t.path();
        let mut layers = Vec::new();
        for i in 0..150 {
            let l = base.join(format!(
                "layers/a-rather-long-directory-name-for-layer-number-{i:04}"
            ));
            write(&l.join(format!("f{i}")), &i.to_string())?;
            write(&l.join("top"), &i.to_string())?;
            layers.push(l);
        }
        let (upper, work, merged) = (base.join("u"), base.join("w"), base.join("m"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d)?;
        }
        let snap = Snapshotter::with_kind(Kind::Overlay);
        let m = snap.mount(&layers, &upper, &work, &merged)?;
        assert_eq!(fs::read_to_string(merged.join("f0"))?, "0");
        assert_eq!(fs::read_to_string(merged.join("f149"))?, "149");
        assert_eq!(fs::read_to_string(merged.join("top"))?, "149");
        m.commit()?;
        let ro = snap.mount_readonly(&layers, &merged)?;
        assert_eq!(fs::read_to_string(merged.join("top"))?, "149");
        drop(ro);
        assert!(!merged.join("top").exists());

        // More layers than one mount takes: the bottom ones grouped into a nested
        // read-only overlay; a whiteout above the group still hides what is in it.
        let mut many = layers.clone();
        for i in 150..MAX_LAYERS {
            let l = base.join(format!("layers/more-{i:04}"));
            write(&l.join("top"), &i.to_string())?;
            many.push(l);
        }
        fsutil::make_whiteout(&many[200].join("f3"))?;
        fsutil::make_whiteout(&many[100].join("f1"))?;
        let (u3, w3, m3) = (base.join("u3"), base.join("w3"), base.join("m3"));
        for d in [&u3, &w3, &m3] {
            fs::create_dir_all(d)?;
        }
        let m = snap.mount(&many, &u3, &w3, &m3)?;
        let top = (MAX_LAYERS - 1).to_string();
        assert_eq!(fs::read_to_string(m3.join("top"))?, top);
        assert_eq!(fs::read_to_string(m3.join("f0"))?, "0");
        assert!(!m3.join("f3").exists() && !m3.join("f1").exists());
        assert_eq!(fs::read_to_string(m3.join("f2"))?, "2");
        fs::write(m3.join("f0"), "changed")?;
        m.commit()?;
        assert_eq!(fs::read_to_string(u3.join("f0"))?, "changed");
        let ro = snap.mount_readonly(&many, &m3)?;
        assert_eq!(fs::read_to_string(m3.join("top"))?, top);
        ro.commit()?;
        many.push(u3.clone());
        let err = snap
            .mount_readonly(&many, &m3)
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(err.to_string().contains("at most"), "{err}");
        let leftovers: Vec<_> = fs::read_dir(base)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".lower-group"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // No layers at all.
        let (u2, w2, m2) = (base.join("u2"), base.join("w2"), base.join("m2"));
        for d in [&u2, &w2, &m2] {
            fs::create_dir_all(d)?;
        }
        let m = snap.mount(&[], &u2, &w2, &m2)?;
        fs::write(m2.join("x"), "x")?;
        m.commit()?;
        assert_eq!(fs::read_to_string(u2.join("x"))?, "x");
        let ro = snap.mount_readonly(&[], &m2)?;
        assert!(fs::write(m2.join("y"), "y").is_err());
        drop(ro);
        let ro = snap.mount_readonly(std::slice::from_ref(&u2), &m2)?;
        assert_eq!(fs::read_to_string(m2.join("x"))?, "x");
        assert!(fs::write(m2.join("y"), "y").is_err());
        ro.commit()?;
        Ok(())
    }

    #[test]
    fn detect_finds_overlay() -> anyhow::Result<()> {
        let _heavy = HEAVY_TESTS.blocking_read();
        let t = tempfile::tempdir()?;
        assert_eq!(Snapshotter::detect(t.path()).kind(), Kind::Overlay);
        assert!(fs::read_dir(t.path())?.next().is_none());
        Ok(())
    }
}
