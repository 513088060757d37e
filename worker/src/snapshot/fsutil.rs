//! Low-level copying of single filesystem entries with their metadata (owner, mode,
//! extended attributes, times), shared by the copying snapshotter and the file op.
//! Never follows a symlink at the source or the destination of a copy.

use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::{Error, Result};

/// Name of the overlayfs opaque-directory marker.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How metadata is carried over by [`copy_node`] and [`apply_dir_meta`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaOpts {
    /// Owner to set instead of the source's.
    pub owner: Option<(u32, u32)>,
    /// Permission bits (the low 12 bits) to set instead of the source's.
    pub mode: Option<u32>,
    /// Modification time (seconds, nanoseconds since the epoch) to set instead of the
    /// source's.
    pub mtime: Option<(i64, i64)>,
    /// Copy extended attributes (except overlay's own).
    pub xattrs: bool,
}

/// Wraps an I/O error with what was done to which path.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> Error + 'a {
    move |e| Error::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

/// True for an overlay whiteout: a character device with device number 0/0.
pub fn is_whiteout(meta: &Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Creates an overlay whiteout (`c 0,0`) at `path`.
pub fn make_whiteout(path: &Path) -> Result<()> {
    mknod(path, SFlag::S_IFCHR, Mode::empty(), 0).map_err(nix_err("mknod", path))
}

/// Marks the directory `path` opaque for overlayfs.
pub fn set_opaque(path: &Path) -> Result<()> {
    xattr::set(path, OPAQUE_XATTR, b"y").map_err(io_err("setxattr", path))
}

/// True when the directory `path` carries the overlay opaque marker.
pub fn is_opaque(path: &Path) -> bool {
    matches!(xattr::get(path, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

/// Removes whatever is at `path` (a directory recursively); a missing path is fine.
pub fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("remove", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("lstat", path)(e)),
    }
}

/// Copies one non-directory entry `src` (described by `meta`, from `lstat`) to `dst`,
/// which must not exist: regular files by content, symlinks as symlinks, devices, fifos
/// and sockets by `mknod`; then sets owner, mode, xattrs and times.
pub fn copy_node(src: &Path, meta: &Metadata, dst: &Path, opts: &MetaOpts) -> Result<()> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(io_err("readlink", src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(io_err("symlink", dst))?;
    } else if ft.is_file() {
        copy_file_contents(src, dst)?;
    } else {
        let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
        mknod(dst, kind, Mode::from_bits_truncate(0o600), meta.rdev())
            .map_err(nix_err("mknod", dst))?;
    }
    apply_meta(src, meta, dst, opts)
}

fn copy_file_contents(src: &Path, dst: &Path) -> Result<()> {
    let mut from = fs::File::open(src).map_err(io_err("open", src))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err("create", dst))?;
    io::copy(&mut from, &mut to).map_err(io_err("copy", src))?;
    Ok(())
}

/// Creates directory `dst` (if missing) and gives it the metadata of `src` (except times,
/// which callers set with [`set_mtime`] once the directory's contents are written).
pub fn apply_dir_meta(src: &Path, meta: &Metadata, dst: &Path, opts: &MetaOpts) -> Result<()> {
    match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            fs::remove_file(dst).map_err(io_err("remove", dst))?;
            fs::create_dir(dst).map_err(io_err("mkdir", dst))?;
        }
        Err(_) => fs::create_dir(dst).map_err(io_err("mkdir", dst))?,
    }
    let opts = MetaOpts {
        mtime: None,
        ..*opts
    };
    set_owner_mode_xattrs(src, meta, dst, &opts)
}

/// Sets owner, mode, xattrs and mtime on `dst` from `meta`/`src` as `opts` says.
pub fn apply_meta(src: &Path, meta: &Metadata, dst: &Path, opts: &MetaOpts) -> Result<()> {
    set_owner_mode_xattrs(src, meta, dst, opts)?;
    let (sec, nsec) = match opts.mtime {
        Some(t) => t,
        None => (meta.mtime(), meta.mtime_nsec()),
    };
    set_mtime(dst, sec, nsec)
}

fn set_owner_mode_xattrs(src: &Path, meta: &Metadata, dst: &Path, opts: &MetaOpts) -> Result<()> {
    let (uid, gid) = opts.owner.unwrap_or((meta.uid(), meta.gid()));
    std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io_err("lchown", dst))?;
    if opts.xattrs {
        copy_xattrs(src, dst)?;
    }
    if !meta.file_type().is_symlink() {
        let mode = match opts.mode {
            Some(m) => m & 0o7777,
            None => meta.mode() & 0o7777,
        };
        fs::set_permissions(dst, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", dst))?;
    }
    Ok(())
}

/// Copies extended attributes of `src` to `dst` (not following symlinks), except
/// overlay's own markers. Attributes the filesystem refuses are skipped.
pub fn copy_xattrs(src: &Path, dst: &Path) -> Result<()> {
    let names = match xattr::list(src) {
        Ok(n) => n,
        Err(_) => return Ok(()),
    };
    for name in names {
        let Some(n) = name.to_str() else { continue };
        if n.starts_with("trusted.overlay.") {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(src, &name) {
            if let Err(e) = xattr::set(dst, &name, &v) {
                tracing::trace!(path = %dst.display(), name = n, error = %e, "xattr not copied");
            }
        }
    }
    Ok(())
}

/// Sets the modification (and access) time of `path` without following a symlink.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) -> Result<()> {
    let ts = TimeSpec::new(sec, nsec);
    utimensat(AT_FDCWD, path, &ts, &ts, UtimensatFlags::NoFollowSymlink)
        .map_err(nix_err("utimensat", path))
}
