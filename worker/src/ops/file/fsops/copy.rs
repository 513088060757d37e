//! The copy action and its content checksum.
//!
//! Sources are resolved in the source root (the last symlink followed only with
//! `followSymlink`; symlinks inside copied trees are copied as symlinks, never followed),
//! destinations in the destination root. A directory source is copied as a directory
//! named like it into an existing destination directory, or as the destination itself;
//! with `dirCopyContents` its contents go into the destination. A file goes into an
//! existing directory or a destination ending in `/`, else becomes the destination.
//! Everything copied is owned by the given owner; without one, copied entries keep their
//! source's owners (BuildKit's copy with no chown user), except that the Docker `ADD`
//! mode (`attemptUnpackDockerCompatibility`) makes non-archive files root's while an
//! extracted archive keeps its entries' owners. Directories the copy creates are the
//! owner's (root when none). Permission bits and time are set when given.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::pattern::{self, Filter};
use super::{
    exists, glob, inside, io_at, mkdir_all, relabel, require_parent, timestamp, unpack, Error,
    Result,
};
use crate::llb::pb;
use crate::snapshot::fsutil::{self, MetaOpts};
use crate::snapshot::resolve_in_root;

// === modes ===

/// One `who op perms` clause of a symbolic mode.
#[derive(Debug, Clone)]
struct Clause {
    who: u32,
    op: u8,
    perms: Vec<u8>,
}

/// How copied entries get their permission bits.
#[derive(Debug, Clone)]
enum ModeSpec {
    Keep,
    Fixed(u32),
    Symbolic(Vec<Clause>),
}

impl ModeSpec {
    fn parse(action: &pb::FileActionCopy) -> Result<ModeSpec> {
        if action.mode >= 0 {
            return Ok(ModeSpec::Fixed(action.mode as u32 & 0o7777));
        }
        let s = action.mode_str.trim();
        if s.is_empty() {
            return Ok(ModeSpec::Keep);
        }
        if let Ok(m) = u32::from_str_radix(s, 8) {
            return Ok(ModeSpec::Fixed(m & 0o7777));
        }
        let bad = || Error::Invalid {
            op: "copy",
            path: action.src.clone(),
            message: format!("invalid mode {s:?}"),
        };
        let mut clauses = Vec::new();
        for part in s.split(',') {
            let b = part.as_bytes();
            let mut i = 0;
            let mut who = 0;
            while i < b.len() && matches!(b[i], b'u' | b'g' | b'o' | b'a') {
                who |= match b[i] {
                    b'u' => 0o4700,
                    b'g' => 0o2070,
                    b'o' => 0o1007,
                    _ => 0o7777,
                };
                i += 1;
            }
            if who == 0 {
                who = 0o7777;
            }
            if i >= b.len() {
                return Err(bad());
            }
            while i < b.len() {
                let op = b[i];
                if !matches!(op, b'+' | b'-' | b'=') {
                    return Err(bad());
                }
                i += 1;
                let start = i;
                while i < b.len() && matches!(b[i], b'r' | b'w' | b'x' | b'X' | b's' | b't') {
                    i += 1;
                }
                clauses.push(Clause {
                    who,
                    op,
                    perms: b[start..i].to_vec(),
                });
            }
        }
        Ok(ModeSpec::Symbolic(clauses))
    }

    /// The permission bits for an entry whose source mode is `mode`.
    fn apply(&self, mode: u32, is_dir: bool) -> Option<u32> {
        match self {
            ModeSpec::Keep => None,
            ModeSpec::Fixed(m) => Some(*m),
            ModeSpec::Symbolic(clauses) => {
                let orig = mode & 0o7777;
                let mut m = orig;
                for c in clauses {
                    let mut bits = 0;
                    for p in &c.perms {
                        bits |= match p {
                            b'r' => 0o444,
                            b'w' => 0o222,
                            b'x' => 0o111,
                            b'X' if is_dir || orig & 0o111 != 0 => 0o111,
                            b's' => 0o6000,
                            b't' => 0o1000,
                            _ => 0,
                        };
                    }
                    let bits = bits & c.who;
                    match c.op {
                        b'+' => m |= bits,
                        b'-' => m &= !bits,
                        _ => m = (m & !(c.who & 0o777)) | bits,
                    }
                }
                Some(m)
            }
        }
    }
}

// === sources ===

/// The host paths the action copies from, sorted; empty only when an empty wildcard
/// match is allowed.
fn sources(src_root: &Path, action: &pb::FileActionCopy) -> Result<Vec<PathBuf>> {
    let not_found = || Error::NotFound {
        op: "copy",
        path: action.src.clone(),
    };
    if action.allow_wildcard && pattern::has_meta(&action.src) {
        let mut out = Vec::new();
        for m in glob(src_root, &action.src)? {
            let p = if action.follow_symlink {
                resolve_in_root(src_root, &inside(src_root, &m), true)?
            } else {
                m
            };
            if exists(&p) {
                out.push(p);
            }
        }
        if out.is_empty()
            && (!action.allow_empty_wildcard || !wildcard_base_exists(src_root, &action.src))
        {
            return Err(not_found());
        }
        return Ok(out);
    }
    // As BuildKit: a path without wildcards must exist, whatever `allow_empty_wildcard`.
    let p = resolve_in_root(src_root, &action.src, action.follow_symlink)?;
    if exists(&p) {
        Ok(vec![p])
    } else {
        Err(not_found())
    }
}

/// Whether the directory holding the first wildcard component of `src` exists: BuildKit
/// walks it, so an empty match is only allowed when it is there (`COPY nodir/*.txt`
/// fails even with `allow_empty_wildcard`).
fn wildcard_base_exists(src_root: &Path, src: &str) -> bool {
    let base: Vec<&str> = src
        .split('/')
        .take_while(|c| !pattern::has_meta(c))
        .collect();
    let base = format!("/{}", base.join("/").trim_start_matches('/'));
    resolve_in_root(src_root, &base, true).is_ok_and(|p| fs::metadata(p).is_ok_and(|m| m.is_dir()))
}

fn lstat(root: &Path, p: &Path) -> Result<Metadata> {
    fs::symlink_metadata(p).map_err(io_at("copy", root, p))
}

fn sorted_names(root: &Path, dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at("copy", root, dir))? {
        names.push(e.map_err(io_at("copy", root, dir))?.file_name());
    }
    names.sort();
    Ok(names)
}

fn join_rel(rel: &str, name: &std::ffi::OsStr) -> String {
    let name = name.to_string_lossy();
    if rel.is_empty() {
        name.into_owned()
    } else {
        format!("{rel}/{name}")
    }
}

// === copy ===

/// Copies `src` (in `src_root`) to `dest` (in `dest_root`) as BuildKit's file op does;
/// `owner` applies to everything copied; `None` keeps the sources' owners (see the
/// module docs for the `ADD` exception).
pub fn copy(
    src_root: &Path,
    dest_root: &Path,
    action: &pb::FileActionCopy,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let mode = ModeSpec::parse(action)?;
    let mtime = timestamp(action.timestamp);
    let owner_or_root = owner.unwrap_or((0, 0));
    let srcs = sources(src_root, action)?;
    for req in &action.required_paths {
        let ok = srcs
            .iter()
            .any(|s| resolve_in_root(s, req, false).is_ok_and(|p| exists(&p)));
        if !ok {
            return Err(Error::NotFound {
                op: "copy",
                path: format!("{}/{}", action.src.trim_end_matches('/'), req),
            });
        }
    }
    if srcs.is_empty() {
        return Ok(());
    }
    let dest = resolve_in_root(dest_root, &action.dest, true)?;
    let dest_dir_hint = action.dest.ends_with('/') || action.dest.ends_with("/.");
    if dest != dest_root && !action.create_dest_path {
        require_parent("copy", dest_root, &dest, &action.dest)?;
    }
    if dest_dir_hint {
        mkdir_all(dest_root, &dest, owner_or_root, mtime)?;
    }
    let mut c = Copier {
        dest_root,
        src_root,
        owner: if owner.is_none() && action.attempt_unpack_docker_compatibility {
            Some((0, 0))
        } else {
            owner
        },
        mode,
        mtime,
        filter: Filter::new(&action.include_patterns, &action.exclude_patterns),
        links: HashMap::new(),
        dir_times: Vec::new(),
        always_replace: action.always_replace_existing_dest_paths,
    };
    for src in &srcs {
        if action.attempt_unpack_docker_compatibility
            && unpack::try_unpack(src_root, src, dest_root, &dest, owner, mtime)?
        {
            continue;
        }
        let meta = lstat(src_root, src)?;
        let dest_is_dir = fs::metadata(&dest).is_ok_and(|m| m.is_dir());
        let name = src.file_name().filter(|_| src.as_path() != src_root);
        let target = match name {
            Some(n)
                if (dest_is_dir || dest_dir_hint)
                    && !(meta.is_dir() && action.dir_copy_contents) =>
            {
                dest.join(n)
            }
            _ => dest.clone(),
        };
        if action.create_dest_path {
            if let Some(parent) = target.parent() {
                mkdir_all(dest_root, parent, owner_or_root, mtime)?;
            }
        } else if target != dest_root {
            require_parent("copy", dest_root, &target, &action.dest)?;
        }
        if meta.is_dir() {
            c.copy_dir(src, &meta, &target, "", true, false)?;
        } else {
            c.copy_file(src, &meta, &target)?;
        }
    }
    for (p, s, ns) in c.dir_times.iter().rev() {
        fsutil::set_mtime(p, *s, *ns).map_err(relabel(dest_root))?;
    }
    Ok(())
}

/// State of one copy action.
struct Copier<'a> {
    src_root: &'a Path,
    dest_root: &'a Path,
    /// Owner of everything copied; `None` keeps the source's.
    owner: Option<(u32, u32)>,
    mode: ModeSpec,
    mtime: Option<(i64, i64)>,
    filter: Filter,
    /// First destination of each multiply-linked source file, to keep hard links.
    links: HashMap<(u64, u64), PathBuf>,
    dir_times: Vec<(PathBuf, i64, i64)>,
    always_replace: bool,
}

impl Copier<'_> {
    fn opts(&self, meta: &Metadata) -> MetaOpts {
        MetaOpts {
            owner: self.owner,
            mode: self.mode.apply(meta.mode(), meta.is_dir()),
            mtime: self.mtime,
            xattrs: true,
        }
    }

    fn conflict(&self, dst: &Path, message: &str) -> Error {
        Error::Invalid {
            op: "copy",
            path: inside(self.dest_root, dst),
            message: message.into(),
        }
    }

    /// Copies a non-directory.
    fn copy_file(&mut self, src: &Path, meta: &Metadata, dst: &Path) -> Result<()> {
        match fs::symlink_metadata(dst) {
            Ok(m) if m.is_dir() => {
                if !self.always_replace {
                    return Err(self.conflict(dst, "cannot replace a directory with a file"));
                }
                fsutil::remove_any(dst).map_err(relabel(self.dest_root))?;
            }
            Ok(_) => fs::remove_file(dst).map_err(io_at("copy", self.dest_root, dst))?,
            Err(_) => {}
        }
        if meta.is_file() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                return fs::hard_link(first, dst).map_err(io_at("link", self.dest_root, dst));
            }
            self.links.insert(key, dst.to_path_buf());
        }
        let opts = self.opts(meta);
        fsutil::copy_node(src, meta, dst, &opts).map_err(|e| match e {
            crate::snapshot::Error::Io { op, path, source } if path.starts_with(self.src_root) => {
                Error::Io {
                    op,
                    path: inside(self.src_root, &path),
                    source,
                }
            }
            other => relabel(self.dest_root)(other),
        })
    }

    /// Copies a directory; `top` marks the destination given by the action (kept as it
    /// is when it already exists), `lazy` a directory only created if something in it is
    /// copied. Returns whether anything was copied.
    fn copy_dir(
        &mut self,
        src: &Path,
        meta: &Metadata,
        dst: &Path,
        rel: &str,
        top: bool,
        lazy: bool,
    ) -> Result<bool> {
        let mut dst = dst.to_path_buf();
        let mut existed = false;
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() => existed = true,
            Ok(m) if m.file_type().is_symlink() => {
                // A symlink to a directory in the destination (e.g. /bin -> usr/bin) is
                // merged into, resolved inside the destination root.
                let resolved =
                    resolve_in_root(self.dest_root, &inside(self.dest_root, &dst), true)?;
                if fs::symlink_metadata(&resolved).is_ok_and(|m| m.is_dir()) {
                    dst = resolved;
                    existed = true;
                } else if self.always_replace {
                    fs::remove_file(&dst).map_err(io_at("copy", self.dest_root, &dst))?;
                } else {
                    return Err(self.conflict(&dst, "cannot replace a file with a directory"));
                }
            }
            Ok(_) => {
                if !self.always_replace {
                    return Err(self.conflict(&dst, "cannot replace a file with a directory"));
                }
                fs::remove_file(&dst).map_err(io_at("copy", self.dest_root, &dst))?;
            }
            Err(_) => {}
        }
        if !existed {
            fs::create_dir(&dst).map_err(io_at("copy", self.dest_root, &dst))?;
        }
        let mut copied = false;
        for name in sorted_names(self.src_root, src)? {
            let child_rel = join_rel(rel, &name);
            let verdict = if self.filter.is_empty() {
                pattern::Verdict {
                    included: true,
                    descend: true,
                }
            } else {
                self.filter.check(&child_rel)
            };
            let s = src.join(&name);
            let m = lstat(self.src_root, &s)?;
            let d = dst.join(&name);
            if m.is_dir() {
                if verdict.included || verdict.descend {
                    copied |= self.copy_dir(&s, &m, &d, &child_rel, false, !verdict.included)?;
                }
            } else if verdict.included {
                self.copy_file(&s, &m, &d)?;
                copied = true;
            }
        }
        if lazy && !copied && !existed {
            fs::remove_dir(&dst).map_err(io_at("copy", self.dest_root, &dst))?;
            return Ok(false);
        }
        if !(top && existed) {
            let opts = self.opts(meta);
            fsutil::apply_dir_meta(src, meta, &dst, &opts).map_err(relabel(self.dest_root))?;
            let (s, ns) = self.mtime.unwrap_or((meta.mtime(), meta.mtime_nsec()));
            self.dir_times.push((dst, s, ns));
        }
        Ok(true)
    }
}

// === checksum ===

fn put(h: &mut Sha256, field: &[u8]) {
    h.update((field.len() as u64).to_le_bytes());
    h.update(field);
}

/// sha256 digest of everything `copy` would read from `src_root` for this action (paths relative to
/// the matched source, file type, mode bits, symlink targets, file contents, and the owners
/// when the copy keeps them, i.e. without an owner outside the `ADD` mode; never times) —
/// the content part of the copy's cache key.
///
/// Entries are opened and stat'ed relative to their open directory (no repeated path
/// lookups), and the subtrees of a source directory are hashed on a few threads, their
/// digests combined in name order.
pub fn copy_checksum(src_root: &Path, action: &pb::FileActionCopy) -> Result<String> {
    let srcs = sources(src_root, action)?;
    let filter = Filter::new(&action.include_patterns, &action.exclude_patterns);
    let owners = action.owner.is_none() && !action.attempt_unpack_docker_compatibility;
    let mut h = Sha256::new();
    if owners {
        put(&mut h, b"owners");
    }
    let mut buf = vec![0u8; 64 << 10];
    for src in &srcs {
        let top = src.file_name().filter(|_| src.as_path() != src_root);
        put(&mut h, b"source");
        put(&mut h, top.map(|n| n.as_bytes()).unwrap_or_default());
        let meta = lstat(src_root, src)?;
        match top {
            Some(name) if !meta.is_dir() => {
                let parent = src.parent().unwrap_or(src_root);
                let dirfd = open_dir(src_root, parent)?;
                let w = Walk {
                    root: src_root,
                    filter: &filter,
                    owners,
                };
                w.node(
                    &mut h,
                    &mut buf,
                    &dirfd,
                    parent,
                    name,
                    String::new(),
                    meta.file_type(),
                )?;
            }
            _ => {
                put(&mut h, b"");
                h.update((meta.mode() & (libc::S_IFMT | 0o7777)).to_le_bytes());
                if owners {
                    h.update(meta.uid().to_le_bytes());
                    h.update(meta.gid().to_le_bytes());
                }
                let w = Walk {
                    root: src_root,
                    filter: &filter,
                    owners,
                };
                for d in w.children_parallel(src, "")? {
                    h.update(d);
                }
                put(&mut h, b"end");
            }
        }
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn open_dir(root: &Path, dir: &Path) -> Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_at("copy", root, dir)(std::io::Error::from(e)))
}

/// A checksum walk.
struct Walk<'a> {
    root: &'a Path,
    filter: &'a Filter,
    /// Hash owners too (the copy keeps them).
    owners: bool,
}

impl Walk<'_> {
    /// An error on the entry `name` of `dir`; built only when something failed.
    fn err(&self, dir: &Path, name: &std::ffi::OsStr, e: impl Into<std::io::Error>) -> Error {
        Error::Io {
            op: "copy",
            path: inside(self.root, &dir.join(name)),
            source: e.into(),
        }
    }

    /// The children of `dir` that the filter lets in, sorted by name.
    fn children(
        &self,
        dir: &Path,
        rel: &str,
    ) -> Result<Vec<(std::ffi::OsString, String, fs::FileType)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).map_err(io_at("copy", self.root, dir))? {
            let e = e.map_err(io_at("copy", self.root, dir))?;
            let ft = e.file_type().map_err(io_at("copy", self.root, &e.path()))?;
            let name = e.file_name();
            let child_rel = join_rel(rel, &name);
            if !self.filter.is_empty() {
                let v = self.filter.check(&child_rel);
                if !(v.included || (ft.is_dir() && v.descend)) {
                    continue;
                }
            }
            out.push((name, child_rel, ft));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// One digest per child of `dir`, computed on up to four threads.
    fn children_parallel(&self, dir: &Path, rel: &str) -> Result<Vec<[u8; 32]>> {
        let items = self.children(dir, rel)?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4)
            .min(items.len().max(1));
        let chunk = items.len().div_ceil(threads).max(1);
        let dirfd = open_dir(self.root, dir)?;
        let run = |part: &[(std::ffi::OsString, String, fs::FileType)]| -> Result<Vec<[u8; 32]>> {
            let mut buf = vec![0u8; 64 << 10];
            part.iter()
                .map(|(name, child_rel, ft)| {
                    let mut h = Sha256::new();
                    self.node(&mut h, &mut buf, &dirfd, dir, name, child_rel.clone(), *ft)?;
                    Ok(h.finalize().into())
                })
                .collect()
        };
        if threads <= 1 {
            return run(&items);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .map(|part| s.spawn(move || run(part)))
                .collect();
            let mut out = Vec::with_capacity(items.len());
            for h in handles {
                match h.join() {
                    Ok(part) => out.extend(part?),
                    Err(_) => {
                        return Err(Error::Invalid {
                            op: "copy",
                            path: inside(self.root, dir),
                            message: "checksum thread panicked".into(),
                        })
                    }
                }
            }
            Ok(out)
        })
    }

    /// Hashes the entry `name` of the open directory `dirfd` (at `dir`).
    #[allow(clippy::too_many_arguments)]
    fn node(
        &self,
        h: &mut Sha256,
        buf: &mut [u8],
        dirfd: &std::os::fd::OwnedFd,
        dir: &Path,
        name: &std::ffi::OsStr,
        rel: String,
        ft: fs::FileType,
    ) -> Result<()> {
        use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
        use nix::sys::stat::{fstat, fstatat, Mode};
        put(h, rel.as_bytes());
        if ft.is_file() {
            // O_NOATIME: reading must not dirty every inode (relatime would update the
            // atime of each freshly written file); not permitted on others' files
            // without CAP_FOWNER, so retried without it.
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let fd = match openat(dirfd, name, flags | OFlag::O_NOATIME, Mode::empty()) {
                Err(nix::errno::Errno::EPERM) => openat(dirfd, name, flags, Mode::empty()),
                other => other,
            }
            .map_err(|e| self.err(dir, name, e))?;
            let st = fstat(&fd).map_err(|e| self.err(dir, name, e))?;
            h.update((st.st_mode & (libc::S_IFMT | 0o7777)).to_le_bytes());
            if self.owners {
                h.update(st.st_uid.to_le_bytes());
                h.update(st.st_gid.to_le_bytes());
            }
            h.update((st.st_size as u64).to_le_bytes());
            let mut f = fs::File::from(fd);
            let mut left = st.st_size as u64;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = f
                    .read(&mut buf[..want])
                    .map_err(|e| self.err(dir, name, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                left -= n as u64;
            }
            return Ok(());
        }
        let st = fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.err(dir, name, e))?;
        h.update((st.st_mode & (libc::S_IFMT | 0o7777)).to_le_bytes());
        if self.owners {
            h.update(st.st_uid.to_le_bytes());
            h.update(st.st_gid.to_le_bytes());
        }
        if ft.is_symlink() {
            let t = readlinkat(dirfd, name).map_err(|e| self.err(dir, name, e))?;
            put(h, t.as_bytes());
        } else if ft.is_dir() {
            let sub = openat(
                dirfd,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.err(dir, name, e))?;
            let path = dir.join(name);
            for (child, child_rel, cft) in self.children(&path, &rel)? {
                self.node(h, buf, &sub, &path, &child, child_rel, cft)?;
            }
            put(h, b"end");
        } else {
            h.update(st.st_rdev.to_le_bytes());
        }
        Ok(())
    }
}
