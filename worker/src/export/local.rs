//! The `local` exporter: the result filesystem copied into a directory, keeping modes,
//! owners, symlinks (verbatim), hard links, devices, xattrs and times.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::{Error, Result};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn set_times(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(path)(e.into()))
}

/// Copies the tree at `view` into `dest` (created if missing; existing entries with the
/// same names are replaced).
pub fn export_local(view: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
    copy_dir(view, dest, &mut links, &mut dirs)?;
    // Directory times last, deepest first.
    for (path, meta) in dirs.iter().rev() {
        set_times(path, meta)?;
    }
    Ok(())
}

fn copy_meta(src: &Path, dst: &Path, meta: &std::fs::Metadata) -> Result<()> {
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid())).map_err(io_err(dst))?;
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err(dst))?;
    }
    if let Ok(names) = xattr::list(src) {
        for name in names {
            if name.to_string_lossy().starts_with("trusted.overlay.") {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(src, &name) {
                if let Err(error) = xattr::set(dst, &name, &v) {
                    tracing::warn!(%error, path = %dst.display(), "copying xattr");
                }
            }
        }
    }
    Ok(())
}

fn remove_existing(path: &Path, keep_dir: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && keep_dir => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => std::fs::remove_file(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

fn copy_dir(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
    dirs: &mut Vec<(PathBuf, std::fs::Metadata)>,
) -> Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(src)
        .map_err(io_err(src))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(io_err(src))?;
    names.sort();
    for name in names {
        let s = src.join(&name);
        let d = dst.join(&name);
        let meta = std::fs::symlink_metadata(&s).map_err(io_err(&s))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            remove_existing(&d, true)?;
            if !d.is_dir() {
                std::fs::create_dir(&d).map_err(io_err(&d))?;
            }
            copy_meta(&s, &d, &meta)?;
            copy_dir(&s, &d, links, dirs)?;
            dirs.push((d, meta));
            continue;
        }
        remove_existing(&d, false)?;
        if ft.is_symlink() {
            let target = std::fs::read_link(&s).map_err(io_err(&s))?;
            std::os::unix::fs::symlink(&target, &d).map_err(io_err(&d))?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    std::fs::hard_link(first, &d).map_err(io_err(&d))?;
                    continue;
                }
                links.insert(key, d.clone());
            }
            let mut from = std::fs::File::open(&s).map_err(io_err(&s))?;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&d)
                .map_err(io_err(&d))?;
            std::io::copy(&mut from, &mut to).map_err(io_err(&d))?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_fifo() {
                SFlag::S_IFIFO
            } else if ft.is_char_device() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            nix::sys::stat::mknod(&d, kind, Mode::empty(), meta.rdev())
                .map_err(|e| io_err(&d)(e.into()))?;
        } else {
            tracing::debug!(path = %s.display(), "local export: skipping socket");
            continue;
        }
        copy_meta(&s, &d, &meta)?;
        set_times(&d, &meta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{describe, sample_tree};

    #[test]
    fn copies_tree_exactly() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("src");
        std::fs::create_dir(&src)?;
        sample_tree(&src, false)?;
        std::os::unix::fs::symlink("/etc/passwd", src.join("abs-link"))?;
        let dest = t.path().join("out/nested");
        export_local(&src, &dest)?;
        assert_eq!(describe(&src)?, describe(&dest)?);
        // The symlink was copied, not followed.
        assert_eq!(
            std::fs::read_link(dest.join("abs-link"))?,
            Path::new("/etc/passwd")
        );
        // Exporting again over the result is fine.
        export_local(&src, &dest)?;
        assert_eq!(describe(&src)?, describe(&dest)?);
        Ok(())
    }
}
