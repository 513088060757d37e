//! The copying snapshotter: layers are applied in order into the target directory
//! (honouring whiteouts and opaque directories), and a writable view is diffed back
//! into an overlay-format upper directory on commit.
//!
//! Right after the layers are applied, every entry's inode number, birth time and change
//! time are recorded. At commit, an entry with a different inode or birth time was
//! replaced (a replaced
//! directory becomes opaque); one with a different change time (or size, mode, owner,
//! mtime) was modified: writes, `chmod`, `chown` and `setxattr` all bump the ctime.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::fsutil::{self, io_err, MetaOpts};
use super::{ActiveMount, MountState, Result};

/// What an entry looked like right after materializing.
#[derive(Debug, Clone)]
struct Record {
    ino: u64,
    /// Birth time, where the filesystem keeps one: tells a recreated entry from the
    /// original when the inode number is reused.
    btime: Option<std::time::SystemTime>,
    fmt: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Record {
    fn of(m: &Metadata) -> Record {
        Record {
            ino: m.ino(),
            btime: m.created().ok(),
            fmt: m.mode() & libc::S_IFMT,
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: if m.is_dir() { 0 } else { m.size() },
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn changed(&self, now: &Record) -> bool {
        self.mode != now.mode
            || self.uid != now.uid
            || self.gid != now.gid
            || self.size != now.size
            || self.mtime != now.mtime
            || self.ctime != now.ctime
    }
}

/// A materialized (copied) view and, when writable, what it looked like at the start.
#[derive(Debug)]
pub(super) struct Materialized {
    upper: Option<PathBuf>,
    /// A read-only view is bind-mounted read-only onto itself (when permitted).
    ro_bind: bool,
    records: HashMap<PathBuf, Record>,
    children: HashMap<PathBuf, BTreeSet<OsString>>,
}

/// Copies `layers` into `target`; writes will be diffed into `upper` when given.
pub(super) fn mount(
    layers: &[PathBuf],
    upper: Option<&Path>,
    target: &Path,
) -> Result<ActiveMount> {
    fs::create_dir_all(target).map_err(io_err("mkdir", target))?;
    if fs::read_dir(target)
        .map_err(io_err("readdir", target))?
        .next()
        .is_some()
    {
        return Err(super::Error::Mount {
            target: target.to_path_buf(),
            message: "target directory is not empty".into(),
        });
    }
    let mut dir_times = Vec::new();
    for layer in layers {
        let mut links = HashMap::new();
        apply_layer(layer, target, Path::new(""), &mut dir_times, &mut links).inspect_err(
            |_| {
                let _ = clear_dir(target);
            },
        )?;
    }
    for (path, sec, nsec) in dir_times.iter().rev() {
        fsutil::set_mtime(path, *sec, *nsec)?;
    }
    let mut m = Materialized {
        upper: upper.map(Path::to_path_buf),
        ro_bind: false,
        records: HashMap::new(),
        children: HashMap::new(),
    };
    if upper.is_some() {
        m.record(target, Path::new(""))?;
        // Change times may come from a coarse clock (a tick is at most 10 ms): wait a
        // little so that any change made from now on gets a later ctime than recorded.
        std::thread::sleep(std::time::Duration::from_millis(20));
    } else {
        m.ro_bind = bind_readonly(target);
    }
    Ok(ActiveMount {
        target: target.to_path_buf(),
        state: MountState::Copied(Box::new(m)),
    })
}

/// Bind-mounts `target` read-only onto itself; false when mounting is not permitted.
fn bind_readonly(target: &Path) -> bool {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let none: Option<&str> = None;
    if mount(
        Some(target),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .is_err()
    {
        return false;
    }
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if mount(none, target, none, ro, none).is_err() {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return false;
    }
    true
}

impl Materialized {
    /// Undoes the read-only bind mount, if any.
    pub(super) fn unbind(&mut self, target: &Path) {
        if std::mem::take(&mut self.ro_bind) {
            if let Err(error) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(%error, target = %target.display(), "unmounting a read-only view failed");
            }
        }
    }
}

/// Removes everything inside `dir`, keeping `dir`.
pub(super) fn clear_dir(dir: &Path) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("readdir", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("readdir", dir))?;
        fsutil::remove_any(&e.path())?;
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<OsString>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("readdir", dir))? {
        names.push(e.map_err(io_err("readdir", dir))?.file_name());
    }
    names.sort();
    Ok(names)
}

/// Applies the layer dir `layer` (at relative dir `rel`) onto `target`; files linked
/// more than once in the layer stay hard links (`links`: first copy of each inode).
fn apply_layer(
    layer: &Path,
    target: &Path,
    rel: &Path,
    dir_times: &mut Vec<(PathBuf, i64, i64)>,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let src_dir = layer.join(rel);
    let opts = MetaOpts {
        xattrs: true,
        ..MetaOpts::default()
    };
    for name in read_dir_sorted(&src_dir)? {
        let rel_child = rel.join(&name);
        let src = layer.join(&rel_child);
        let dst = target.join(&rel_child);
        let meta = fs::symlink_metadata(&src).map_err(io_err("lstat", &src))?;
        if fsutil::is_whiteout(&meta) {
            fsutil::remove_any(&dst)?;
            continue;
        }
        if meta.is_dir() {
            if fsutil::is_opaque(&src) {
                fsutil::remove_any(&dst)?;
            } else if let Ok(m) = fs::symlink_metadata(&dst) {
                if !m.is_dir() {
                    fsutil::remove_any(&dst)?;
                }
            }
            fsutil::apply_dir_meta(&src, &meta, &dst, &opts)?;
            dir_times.push((dst.clone(), meta.mtime(), meta.mtime_nsec()));
            apply_layer(layer, target, &rel_child, dir_times, links)?;
            continue;
        }
        fsutil::remove_any(&dst)?;
        if meta.is_file() && meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                fs::hard_link(first, &dst).map_err(io_err("link", &dst))?;
                continue;
            }
            links.insert((meta.dev(), meta.ino()), dst.clone());
        }
        fsutil::copy_node(&src, &meta, &dst, &opts)?;
    }
    Ok(())
}

impl Materialized {
    /// Records every entry under `root/rel`.
    fn record(&mut self, root: &Path, rel: &Path) -> Result<()> {
        let dir = root.join(rel);
        let mut names = BTreeSet::new();
        for name in read_dir_sorted(&dir)? {
            let rel_child = rel.join(&name);
            let p = root.join(&rel_child);
            let meta = fs::symlink_metadata(&p).map_err(io_err("lstat", &p))?;
            self.records.insert(rel_child.clone(), Record::of(&meta));
            if meta.is_dir() {
                self.record(root, &rel_child)?;
            }
            names.insert(name);
        }
        self.children.insert(rel.to_path_buf(), names);
        Ok(())
    }

    /// Writes the changes made in `target` into the upper dir (read-only views: nothing).
    pub(super) fn commit(&self, target: &Path) -> Result<()> {
        let Some(upper) = &self.upper else {
            return Ok(());
        };
        let mut w = DiffWriter {
            target,
            upper,
            dir_times: Vec::new(),
            made: BTreeSet::new(),
        };
        self.diff_dir(&mut w, Path::new(""))?;
        for (p, sec, nsec) in w.dir_times.iter().rev() {
            fsutil::set_mtime(p, *sec, *nsec)?;
        }
        Ok(())
    }

    fn diff_dir(&self, w: &mut DiffWriter<'_>, rel: &Path) -> Result<()> {
        let dir = w.target.join(rel);
        let present = read_dir_sorted(&dir)?;
        if let Some(before) = self.children.get(rel) {
            for gone in before.iter().filter(|n| present.binary_search(n).is_err()) {
                let rel_child = rel.join(gone);
                w.ensure_parents(&rel_child)?;
                fsutil::make_whiteout(&w.upper.join(&rel_child))?;
            }
        }
        for name in present {
            let rel_child = rel.join(&name);
            let p = w.target.join(&rel_child);
            let meta = fs::symlink_metadata(&p).map_err(io_err("lstat", &p))?;
            let now = Record::of(&meta);
            match self.records.get(&rel_child) {
                None => w.copy_tree(&rel_child, &meta, false)?,
                Some(old) if old.ino != now.ino || old.btime != now.btime || old.fmt != now.fmt => {
                    let opaque = old.fmt == libc::S_IFDIR && meta.is_dir();
                    w.copy_tree(&rel_child, &meta, opaque)?;
                }
                Some(old) => {
                    if meta.is_dir() {
                        if old.changed(&now) {
                            w.ensure_dir(&rel_child)?;
                        }
                        self.diff_dir(w, &rel_child)?;
                    } else if old.changed(&now) {
                        w.copy_tree(&rel_child, &meta, false)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes entries of the view into the upper dir.
struct DiffWriter<'a> {
    target: &'a Path,
    upper: &'a Path,
    dir_times: Vec<(PathBuf, i64, i64)>,
    made: BTreeSet<PathBuf>,
}

impl DiffWriter<'_> {
    fn opts() -> MetaOpts {
        MetaOpts {
            xattrs: true,
            ..MetaOpts::default()
        }
    }

    /// Creates `rel` in the upper dir as a copy of the view's directory (metadata only).
    fn ensure_dir(&mut self, rel: &Path) -> Result<()> {
        if rel.as_os_str().is_empty() || self.made.contains(rel) {
            return Ok(());
        }
        self.ensure_parents(rel)?;
        let src = self.target.join(rel);
        let dst = self.upper.join(rel);
        let meta = fs::symlink_metadata(&src).map_err(io_err("lstat", &src))?;
        fsutil::apply_dir_meta(&src, &meta, &dst, &Self::opts())?;
        self.dir_times.push((dst, meta.mtime(), meta.mtime_nsec()));
        self.made.insert(rel.to_path_buf());
        Ok(())
    }

    fn ensure_parents(&mut self, rel: &Path) -> Result<()> {
        match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.ensure_dir(p),
            _ => Ok(()),
        }
    }

    /// Copies the view's entry `rel` (a whole tree for a directory) into the upper dir.
    fn copy_tree(&mut self, rel: &Path, meta: &Metadata, opaque: bool) -> Result<()> {
        self.ensure_parents(rel)?;
        let src = self.target.join(rel);
        let dst = self.upper.join(rel);
        if !meta.is_dir() {
            return fsutil::copy_node(&src, meta, &dst, &Self::opts());
        }
        fsutil::apply_dir_meta(&src, meta, &dst, &Self::opts())?;
        if opaque {
            fsutil::set_opaque(&dst)?;
        }
        self.made.insert(rel.to_path_buf());
        self.dir_times
            .push((dst.clone(), meta.mtime(), meta.mtime_nsec()));
        for name in read_dir_sorted(&src)? {
            let child = rel.join(&name);
            let p = self.target.join(&child);
            let m = fs::symlink_metadata(&p).map_err(io_err("lstat", &p))?;
            self.copy_tree(&child, &m, false)?;
        }
        Ok(())
    }
}
