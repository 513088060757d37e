//! Local sources: a directory of the client (daemonless: on this host), filtered by
//! exclude patterns ([`patterns`]), hashed by content (paths, types, permission bits,
//! link targets and file contents; never times or owners) and copied into a layer.
//! Symlinks are copied as links, never followed, so nothing outside the directory is read.

pub mod patterns;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{Error, Result};
use patterns::PatternMatcher;

/// The kind of a scanned entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symlink with its target.
    Symlink(PathBuf),
}

/// One path of a local directory, relative to its root.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the root, `/`-separated, no leading `/`.
    pub rel: String,
    /// What it is.
    pub kind: EntryKind,
    /// Mode bits (permissions, setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds, nanoseconds); kept on copy, never hashed.
    pub mtime: (i64, i64),
    /// Size of a file.
    pub size: u64,
    /// For a file hard-linked to an earlier entry of the scan: that entry's path.
    pub link_to: Option<String>,
}

/// A scanned local directory.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The local's name (`context`).
    pub name: String,
    /// Its root.
    pub root: PathBuf,
    /// Entries in path order (parents first).
    pub entries: Vec<Entry>,
}

fn local_err(name: &str, path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Local {
        name: name.to_string(),
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Lists `root`, leaving out what `excludes` matches (a directory that matches is
/// skipped whole unless an exception pattern could re-include something in it).
pub fn scan(name: &str, root: &Path, excludes: &[String]) -> Result<Scan> {
    let meta = std::fs::metadata(root).map_err(|e| local_err(name, root, e))?;
    if !meta.is_dir() {
        return Err(local_err(name, root, "not a directory"));
    }
    let matcher = PatternMatcher::new(excludes).map_err(|e| local_err(name, root, e))?;
    let has_exceptions = excludes.iter().any(|p| p.trim_start().starts_with('!'));
    let mut entries = Vec::new();
    let mut emitted_dirs = std::collections::HashSet::new();
    let mut inodes: std::collections::HashMap<(u64, u64), String> = Default::default();
    let mut walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter();
    while let Some(item) = walker.next() {
        let item = item.map_err(|e| local_err(name, root, e))?;
        let rel = match item.path().strip_prefix(root) {
            Ok(r) => r.to_string_lossy().to_string(),
            Err(_) => continue,
        };
        let ft = item.file_type();
        if !excludes.is_empty() && matcher.matches(&rel) {
            if ft.is_dir() && !has_exceptions {
                walker.skip_current_dir();
            }
            continue;
        }
        let md = item
            .path()
            .symlink_metadata()
            .map_err(|e| local_err(name, item.path(), e))?;
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            let target =
                std::fs::read_link(item.path()).map_err(|e| local_err(name, item.path(), e))?;
            EntryKind::Symlink(target)
        } else if ft.is_file() {
            EntryKind::File
        } else {
            // Sockets, fifos and devices are not build context.
            continue;
        };
        // A path re-included by an exception inside an excluded directory still needs
        // its parents.
        if has_exceptions {
            let mut missing = Vec::new();
            let mut parent = Path::new(&rel).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                let key = p.to_string_lossy().to_string();
                if emitted_dirs.contains(&key) {
                    break;
                }
                missing.push(key);
                parent = p.parent();
            }
            for dir in missing.into_iter().rev() {
                let full = root.join(&dir);
                let dm = full
                    .symlink_metadata()
                    .map_err(|e| local_err(name, &full, e))?;
                emitted_dirs.insert(dir.clone());
                entries.push(entry(dir, EntryKind::Dir, &dm, None));
            }
        }
        if kind == EntryKind::Dir {
            emitted_dirs.insert(rel.clone());
        }
        let link_to = if kind == EntryKind::File && md.nlink() > 1 {
            match inodes.entry((md.dev(), md.ino())) {
                std::collections::hash_map::Entry::Occupied(first) => Some(first.get().clone()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(rel.clone());
                    None
                }
            }
        } else {
            None
        };
        entries.push(entry(rel, kind, &md, link_to));
    }
    Ok(Scan {
        name: name.to_string(),
        root: root.to_path_buf(),
        entries,
    })
}

/// An entry as the client sends it: owners are reset to root, as BuildKit's clients do
/// for the build context.
fn entry(rel: String, kind: EntryKind, md: &std::fs::Metadata, link_to: Option<String>) -> Entry {
    Entry {
        rel,
        kind,
        mode: md.permissions().mode() & 0o7777,
        uid: 0,
        gid: 0,
        mtime: (md.mtime(), md.mtime_nsec()),
        size: md.len(),
        link_to,
    }
}

impl Scan {
    /// The content digest of the scanned tree.
    pub fn digest(&self) -> Result<String> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let chunk = self.entries.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .entries
                .chunks(chunk)
                .map(|c| s.spawn(move || self.hash_chunk(c)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(local_err(&self.name, &self.root, "hash panicked")))
                })
                .collect()
        });
        let mut h = Sha256::new();
        for p in parts {
            h.update(p?);
        }
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    }

    fn hash_chunk(&self, entries: &[Entry]) -> Result<Vec<u8>> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        for e in entries {
            h.update(e.rel.as_bytes());
            h.update([0]);
            h.update(format!("{:o}", e.mode).as_bytes());
            match &e.kind {
                EntryKind::Dir => h.update(b"\0d\0"),
                EntryKind::Symlink(t) => {
                    h.update(b"\0l\0");
                    h.update(t.as_os_str().as_encoded_bytes());
                }
                EntryKind::File => {
                    h.update(b"\0f\0");
                    let p = self.root.join(&e.rel);
                    let mut f =
                        std::fs::File::open(&p).map_err(|er| local_err(&self.name, &p, er))?;
                    let mut fh = Sha256::new();
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(|er| local_err(&self.name, &p, er))?;
                        if n == 0 {
                            break;
                        }
                        fh.update(&buf[..n]);
                    }
                    h.update(fh.finalize());
                }
            }
            h.update([0xff]);
        }
        Ok(h.finalize().to_vec())
    }

    /// Copies the scanned tree into the empty directory `dest`, keeping modes, owners and
    /// modification times.
    pub fn copy_into(&self, dest: &Path) -> Result<()> {
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        // Directories first (parents before children), then everything else in parallel.
        let mut dirs = Vec::new();
        let mut others = Vec::new();
        let mut links = Vec::new();
        for e in &self.entries {
            if e.link_to.is_some() {
                links.push(e);
            } else if e.kind == EntryKind::Dir {
                let dst = dest.join(&e.rel);
                std::fs::create_dir(&dst).map_err(|er| local_err(&self.name, &dst, er))?;
                dirs.push(e);
            } else {
                others.push(e);
            }
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let chunk = others.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = others
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().try_for_each(|e| self.copy_entry(e, dest, me))))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(local_err(&self.name, &self.root, "copy panicked")))
            })
        })?;
        // Hard links within the context stay hard links.
        for e in links {
            let dst = dest.join(&e.rel);
            let first = dest.join(e.link_to.as_deref().unwrap_or_default());
            std::fs::hard_link(&first, &dst).map_err(|er| local_err(&self.name, &dst, er))?;
        }
        // Directory metadata last: writing into a directory changes its mtime. Owners before
        // modes: a chown clears setuid/setgid bits.
        for e in dirs.iter().rev() {
            let dst = dest.join(&e.rel);
            let err = |er: std::io::Error| local_err(&self.name, &dst, er);
            if (e.uid, e.gid) != me {
                std::os::unix::fs::lchown(&dst, Some(e.uid), Some(e.gid)).map_err(err)?;
            }
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(e.mode)).map_err(err)?;
            set_mtime(&dst, e.mtime).map_err(err)?;
        }
        Ok(())
    }

    /// Copies one file or symlink; `std::fs::copy` already carries the permission bits.
    fn copy_entry(&self, e: &Entry, dest: &Path, me: (u32, u32)) -> Result<()> {
        let src = self.root.join(&e.rel);
        let dst = dest.join(&e.rel);
        let err = |er: std::io::Error| local_err(&self.name, &src, er);
        match &e.kind {
            EntryKind::File => {
                std::fs::copy(&src, &dst).map_err(err)?;
            }
            EntryKind::Symlink(t) => std::os::unix::fs::symlink(t, &dst).map_err(err)?,
            EntryKind::Dir => return Ok(()),
        }
        if (e.uid, e.gid) != me {
            std::os::unix::fs::lchown(&dst, Some(e.uid), Some(e.gid)).map_err(err)?;
            if e.kind == EntryKind::File {
                // The chown cleared setuid/setgid; put the mode back.
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(e.mode))
                    .map_err(err)?;
            }
        }
        set_mtime(&dst, e.mtime).map_err(err)
    }
}

fn set_mtime(p: &Path, (sec, nsec): (i64, i64)) -> std::io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let ts = TimeSpec::new(sec, nsec);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_content_not_times() -> anyhow::Result<()> {
        let d = tempfile::tempdir()?;
        std::fs::create_dir(d.path().join("sub"))?;
        std::fs::write(d.path().join("sub/a.txt"), "one")?;
        std::fs::write(d.path().join("b.txt"), "two")?;
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link"))?;
        let first = scan("context", d.path(), &[])?.digest()?;
        set_mtime(&d.path().join("b.txt"), (1000, 0))?;
        assert_eq!(scan("context", d.path(), &[])?.digest()?, first);
        std::fs::write(d.path().join("b.txt"), "TWO")?;
        assert_ne!(scan("context", d.path(), &[])?.digest()?, first);
        Ok(())
    }

    #[test]
    fn excluded_paths_are_left_out_and_links_not_followed() -> anyhow::Result<()> {
        let d = tempfile::tempdir()?;
        std::fs::create_dir(d.path().join("node_modules"))?;
        std::fs::write(d.path().join("node_modules/x"), "x")?;
        std::fs::write(d.path().join("keep"), "k")?;
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link"))?;
        let s = scan("context", d.path(), &["node_modules".to_string()])?;
        let rels: Vec<&str> = s.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, vec!["keep", "link"]);
        let out = tempfile::tempdir()?;
        s.copy_into(out.path())?;
        assert_eq!(
            std::fs::read_link(out.path().join("link"))?,
            Path::new("/etc/passwd")
        );
        assert_eq!(std::fs::read_to_string(out.path().join("keep"))?, "k");
        Ok(())
    }

    #[test]
    fn missing_dir_is_a_clear_error() {
        let err = scan("context", Path::new("/nonexistent/kiln"), &[]).err();
        assert!(err
            .map(|e| e.to_string().contains("local context (/nonexistent/kiln)"))
            .unwrap_or(false));
    }
}
