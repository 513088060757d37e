//! Layer tars: writing an OCI layer from an overlay upper dir (whiteout devices and opaque
//! markers become `.wh.` entries) and unpacking a (compressed) layer blob into an empty
//! layer dir in overlay format, never writing outside it.
//!
//! Unpacking is done entry by entry rather than with `tar::Entry::unpack_in`, so that
//! whiteouts become devices, every parent directory is checked to be a real directory
//! inside the destination (a layer may not write through a symlink it planted), and hard
//! links may only point at files of the same layer.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};

use super::{Error, Result};

/// Name prefix of whiteout entries in layer tars.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker entry.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a directory as opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What unpacking a layer found.
#[derive(Debug, Clone)]
pub struct UnpackStats {
    /// sha256 of the uncompressed tar (`diff_id`).
    pub diff_id: String,
    /// Uncompressed bytes read.
    pub size: u64,
}

/// Limits that protect the worker from hostile layers.
#[derive(Debug, Clone)]
pub struct UnpackLimits {
    /// Most uncompressed bytes one layer may expand to (tar stream and file contents).
    pub max_bytes: u64,
}

/// The default of [`UnpackLimits::max_bytes`]: 10 GiB unpacked per layer.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 10 << 30;

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: DEFAULT_MAX_LAYER_SIZE,
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobCompression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl BlobCompression {
    /// What the media type says, `None` when it says nothing about compression.
    pub fn from_media_type(media_type: &str) -> Option<BlobCompression> {
        let mt = media_type.trim().to_ascii_lowercase();
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") || mt.ends_with(".gzip") {
            Some(BlobCompression::Gzip)
        } else if mt.ends_with("+zstd") || mt.ends_with(".zstd") {
            Some(BlobCompression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with("/x-tar") {
            Some(BlobCompression::None)
        } else {
            None
        }
    }

    /// Guesses from the first bytes of the blob.
    pub fn sniff(head: &[u8]) -> BlobCompression {
        if head.starts_with(&[0x1f, 0x8b]) {
            BlobCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            BlobCompression::Zstd
        } else {
            BlobCompression::None
        }
    }
}

fn layer_error(layer: &str, message: impl std::fmt::Display) -> Error {
    Error::Layer {
        layer: layer.to_string(),
        message: message.to_string(),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A name for the layer in errors: `sha256:<hex>` when the blob is named by its digest
/// (as in the content store), else its path.
fn layer_name(blob: &Path) -> String {
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("sha256:{name}")
    } else {
        blob.display().to_string()
    }
}

// === unpack ===

/// Hashes and counts what passes through, refusing to go past a byte limit.
struct LimitedHasher<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    max: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for LimitedHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.max {
            self.exceeded.set(true);
            return Err(std::io::Error::other("layer exceeds the size limit"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the blob at `blob` (media type decides gzip/zstd/none; magic bytes are sniffed
/// when it says nothing) into the empty dir `dest` as an overlay upper dir.
///
/// On error `dest` may hold a partial tree: the caller must remove it and must not use it.
pub fn unpack_blob(
    blob: &Path,
    media_type: &str,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats> {
    let layer = layer_name(blob);
    let file = File::open(blob).map_err(io_err("open", blob))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let compression = match BlobCompression::from_media_type(media_type) {
        Some(c) => c,
        None => {
            let head = std::io::BufRead::fill_buf(&mut reader).map_err(io_err("read", blob))?;
            BlobCompression::sniff(head)
        }
    };
    let decoded: Box<dyn Read> = match compression {
        BlobCompression::None => Box::new(reader),
        BlobCompression::Gzip => Box::new(flate2::bufread::GzDecoder::new(reader)),
        BlobCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| layer_error(&layer, format_args!("zstd: {e}")))?,
        ),
    };
    unpack_stream(decoded, &layer, dest, limits)
}

/// Unpacks an uncompressed tar stream (see [`unpack_blob`]); `layer` names it in errors.
pub fn unpack_stream(
    stream: impl Read,
    layer: &str,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats> {
    let exceeded = Rc::new(Cell::new(false));
    let hashing = LimitedHasher {
        inner: stream,
        hasher: Sha256::new(),
        count: 0,
        max: limits.max_bytes,
        exceeded: exceeded.clone(),
    };
    let limit_err = || {
        layer_error(
            layer,
            format_args!(
                "uncompressed size exceeds the limit of {} bytes (max-layer-size)",
                limits.max_bytes
            ),
        )
    };
    let mut archive = tar::Archive::new(hashing);
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    let result = extract_entries(&mut archive, layer, dest, &mut dir_times, limits.max_bytes);
    if exceeded.get() {
        return Err(limit_err());
    }
    result?;
    let mut hashing = archive.into_inner();
    // Read to the end so the diff_id covers the whole stream (padding included) and
    // compressed trailers (gzip CRC) are checked.
    let mut sink = [0u8; 1 << 14];
    loop {
        match hashing.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) if exceeded.get() => return Err(limit_err()),
            Err(e) => return Err(layer_error(layer, format_args!("reading tar end: {e}"))),
        }
    }
    // Directory times last, deepest first, since creating entries changes them.
    for (path, mtime) in dir_times.iter().rev() {
        set_mtime(path, *mtime)?;
    }
    Ok(UnpackStats {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
        size: hashing.count,
    })
}

/// Turns an entry path into a clean relative path: leading `/` and `.` dropped, `..`
/// rejected.
fn clean_rel(path: &Path, layer: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(layer_error(
                    layer,
                    format_args!("entry {} escapes the layer", path.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Makes sure every component of `rel`'s parent is a real directory under `dest`
/// (creating missing ones when `create`) and returns the parent's full path.
fn ensure_parent(dest: &Path, rel: &Path, layer: &str, create: bool) -> Result<PathBuf> {
    let mut cur = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(layer_error(
                        layer,
                        format_args!(
                            "entry {}: parent {} is not a directory",
                            rel.display(),
                            cur.strip_prefix(dest).unwrap_or(&cur).display()
                        ),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    std::fs::create_dir(&cur).map_err(io_err("mkdir", &cur))?;
                }
                Err(e) => {
                    return Err(layer_error(
                        layer,
                        format_args!("entry {}: {}: {e}", rel.display(), cur.display()),
                    ))
                }
            }
        }
    }
    Ok(cur)
}

/// Removes whatever is at `path` unless it is a directory and `keep_dir`.
fn clear_target(path: &Path, keep_dir: bool) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => {
            if keep_dir {
                return Ok(true);
            }
            std::fs::remove_dir_all(path).map_err(io_err("remove", path))?;
        }
        Ok(_) => std::fs::remove_file(path).map_err(io_err("remove", path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    Ok(false)
}

fn set_mtime(path: &Path, mtime: i64) -> Result<()> {
    let ts = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err("utimensat", path)(e.into()))
}

fn extract_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    layer: &str,
    dest: &Path,
    dir_times: &mut Vec<(PathBuf, i64)>,
    max_bytes: u64,
) -> Result<()> {
    let bad = |e: std::io::Error| layer_error(layer, format_args!("reading tar: {e}"));
    // Bytes written to files; sparse entries can expand well past the stream size.
    let mut written: u64 = 0;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        }
        let raw_path = entry.path().map_err(bad)?.into_owned();
        let rel = clean_rel(&raw_path, layer)?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            // The root itself (`./`): nothing to create.
            continue;
        };
        let parent = ensure_parent(dest, &rel, layer, true)?;

        // Empty numeric fields read as 0, as Go's archive/tar does.
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mtime = header.mtime().unwrap_or(0) as i64;

        // Whiteouts.
        if name == OPAQUE_MARKER {
            xattr::set(&parent, OPAQUE_XATTR, b"y").map_err(io_err("setxattr", &parent))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) || hidden.is_empty() {
                // Other AUFS metadata (`.wh..wh.plnk` …): nothing to do in overlay format.
                continue;
            }
            if hidden == "." || hidden == ".." {
                // `.wh..` / `.wh...` would whiteout the parent itself or the directory
                // above it: outside the layer when the parent is the layer root.
                return Err(layer_error(
                    layer,
                    format_args!("whiteout {} names no file", rel.display()),
                ));
            }
            let target = parent.join(hidden);
            clear_target(&target, false)?;
            nix::sys::stat::mknod(
                &target,
                SFlag::S_IFCHR,
                Mode::empty(),
                nix::sys::stat::makedev(0, 0),
            )
            .map_err(|e| io_err("mknod", &target)(e.into()))?;
            std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
                .map_err(io_err("chown", &target))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &target))?;
            set_mtime(&target, mtime)?;
            continue;
        }

        let target = parent.join(&name);
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(bad)? {
            for ext in exts {
                let ext = ext.map_err(bad)?;
                if let Ok(key) = ext.key() {
                    if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                        if !x.starts_with("trusted.overlay.") {
                            xattrs.push((x.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }

        match kind {
            tar::EntryType::Directory => {
                clear_target(&target, true)?;
                if !target.is_dir() {
                    std::fs::create_dir(&target).map_err(io_err("mkdir", &target))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                clear_target(&target, false)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                let room = max_bytes.saturating_sub(written);
                let n = std::io::copy(&mut (&mut entry).take(room.saturating_add(1)), &mut f)
                    .map_err(|e| {
                        layer_error(layer, format_args!("entry {}: {e}", rel.display()))
                    })?;
                written = written.saturating_add(n);
                if n > room {
                    return Err(layer_error(
                        layer,
                        format_args!(
                            "entry {}: files expand past the limit of {max_bytes} bytes (max-layer-size)",
                            rel.display()
                        ),
                    ));
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| {
                        layer_error(
                            layer,
                            format_args!("symlink {} has no target", rel.display()),
                        )
                    })?
                    .into_owned();
                clear_target(&target, false)?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_err("symlink", &target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| {
                        layer_error(
                            layer,
                            format_args!("hard link {} has no target", rel.display()),
                        )
                    })?
                    .into_owned();
                let link_rel = clean_rel(&link, layer).map_err(|_| {
                    layer_error(
                        layer,
                        format_args!(
                            "hard link {} to {}: target escapes the layer",
                            rel.display(),
                            link.display()
                        ),
                    )
                })?;
                // Only the path inside the layer goes into the message, not the host's.
                let link_parent = ensure_parent(dest, &link_rel, layer, false).map_err(|_| {
                    layer_error(
                        layer,
                        format_args!(
                            "hard link {} to {}: target is not a file of this layer",
                            rel.display(),
                            link.display()
                        ),
                    )
                })?;
                let source = match link_rel.file_name() {
                    Some(n) => link_parent.join(n),
                    None => {
                        return Err(layer_error(
                            layer,
                            format_args!("hard link {} to the layer root", rel.display()),
                        ))
                    }
                };
                match std::fs::symlink_metadata(&source) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(layer_error(
                            layer,
                            format_args!(
                                "hard link {} to {}: target is not a file of this layer",
                                rel.display(),
                                link.display()
                            ),
                        ))
                    }
                }
                if source == target {
                    continue;
                }
                clear_target(&target, false)?;
                std::fs::hard_link(&source, &target).map_err(io_err("link", &target))?;
                // A hard link shares the target's metadata.
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (sflag, dev) = match kind {
                    tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let major = header.device_major().map_err(bad)?.unwrap_or(0);
                        let minor = header.device_minor().map_err(bad)?.unwrap_or(0);
                        let flag = if kind == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, nix::sys::stat::makedev(major.into(), minor.into()))
                    }
                };
                clear_target(&target, false)?;
                nix::sys::stat::mknod(&target, sflag, Mode::empty(), dev)
                    .map_err(|e| io_err("mknod", &target)(e.into()))?;
            }
            other => {
                tracing::debug!(layer, path = %rel.display(), kind = ?other, "skipping tar entry");
                continue;
            }
        }

        // Metadata: owner first (chown clears set-id bits), then mode, xattrs, times.
        std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
            .map_err(io_err("chown", &target))?;
        if kind != tar::EntryType::Symlink {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &target))?;
        }
        for (k, v) in &xattrs {
            xattr::set(&target, k, v).map_err(io_err("setxattr", &target))?;
        }
        if kind == tar::EntryType::Directory {
            dir_times.push((target, mtime));
        } else {
            set_mtime(&target, mtime)?;
        }
    }
    Ok(())
}

// === write ===

/// Writes the uncompressed OCI layer tar of the upper dir `dir` to `w`, entries sorted,
/// times kept, whiteouts converted.
pub fn write_tar(dir: &Path, w: &mut dyn Write) -> Result<()> {
    write_tar_counted(dir, w).map(|_| ())
}

/// [`write_tar`], returning the number of entries written (0 for an empty layer).
pub fn write_tar_counted(dir: &Path, w: &mut dyn Write) -> Result<u64> {
    write_tar_inner(dir, w, true)
}

/// Writes a plain tree (a mounted view, not a layer) as a tar: the same deterministic
/// order and metadata as [`write_tar`], but devices are kept as devices and no
/// whiteout or opaque entries are made. Returns the number of entries.
pub fn write_tree_tar(dir: &Path, w: &mut dyn Write) -> Result<u64> {
    write_tar_inner(dir, w, false)
}

fn write_tar_inner(dir: &Path, w: &mut dyn Write, layer: bool) -> Result<u64> {
    let mut builder = tar::Builder::new(w);
    builder.follow_symlinks(false);
    let mut state = WriteState {
        root: dir.to_path_buf(),
        links: HashMap::new(),
        count: 0,
        layer,
    };
    state.walk(&mut builder, dir, Path::new(""))?;
    builder.finish().map_err(io_err("write tar of", dir))?;
    Ok(state.count)
}

struct WriteState {
    root: PathBuf,
    /// (dev, ino) of files with several links → the first path written.
    links: HashMap<(u64, u64), PathBuf>,
    count: u64,
    /// Layer mode: whiteout devices and opaque dirs become `.wh.` entries.
    layer: bool,
}

fn base_header(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid().into());
    h.set_gid(meta.gid().into());
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_size(0);
    h
}

fn xattrs_of(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(io_err("listxattr", path)(e)),
    };
    for name in names {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        if let Some(v) = xattr::get(path, &name).map_err(io_err("getxattr", path))? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

impl WriteState {
    fn walk<W: Write>(&mut self, b: &mut tar::Builder<W>, abs: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(abs)
            .map_err(io_err("read dir", abs))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err("read dir", abs))?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let path = abs.join(&name);
            let entry_rel = rel.join(&name);
            let meta = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            let ft = meta.file_type();
            let io = |e: std::io::Error| Error::Io {
                op: "write tar entry",
                path: path.clone(),
                source: e,
            };
            if self.layer && ft.is_char_device() && meta.rdev() == 0 {
                // A whiteout device: an empty `.wh.<name>` file.
                let wh = rel.join(format!("{WHITEOUT_PREFIX}{}", name.to_string_lossy()));
                let mut h = base_header(&meta, tar::EntryType::Regular);
                b.append_data(&mut h, &wh, std::io::empty()).map_err(io)?;
                self.count += 1;
                continue;
            }
            let xattrs = xattrs_of(&path)?;
            let opaque = self.layer
                && ft.is_dir()
                && xattr::get(&path, OPAQUE_XATTR)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v == b"y");
            if !xattrs.is_empty() {
                let pax: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                    .collect();
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                    .map_err(io)?;
            }
            if ft.is_dir() {
                let mut h = base_header(&meta, tar::EntryType::Directory);
                let mut p = entry_rel.clone().into_os_string();
                p.push("/");
                b.append_data(&mut h, PathBuf::from(p), std::io::empty())
                    .map_err(io)?;
                self.count += 1;
                if opaque {
                    let mut h = base_header(&meta, tar::EntryType::Regular);
                    b.append_data(&mut h, entry_rel.join(OPAQUE_MARKER), std::io::empty())
                        .map_err(io)?;
                    self.count += 1;
                }
                self.walk(b, &path, &entry_rel)?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io_err("readlink", &path))?;
                let mut h = base_header(&meta, tar::EntryType::Symlink);
                b.append_link(&mut h, &entry_rel, &target).map_err(io)?;
                self.count += 1;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    let key = (meta.dev(), meta.ino());
                    if let Some(first) = self.links.get(&key) {
                        let mut h = base_header(&meta, tar::EntryType::Link);
                        b.append_link(&mut h, &entry_rel, first).map_err(io)?;
                        self.count += 1;
                        continue;
                    }
                    self.links.insert(key, entry_rel.clone());
                }
                let mut h = base_header(&meta, tar::EntryType::Regular);
                h.set_size(meta.len());
                let f = File::open(&path).map_err(io_err("open", &path))?;
                // Guard against the file changing size under us: the header says len().
                b.append_data(&mut h, &entry_rel, f.take(meta.len()))
                    .map_err(io)?;
                self.count += 1;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let kind = if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h = base_header(&meta, kind);
                if !ft.is_fifo() {
                    let rdev = meta.rdev();
                    h.set_device_major(nix::sys::stat::major(rdev) as u32)
                        .map_err(io)?;
                    h.set_device_minor(nix::sys::stat::minor(rdev) as u32)
                        .map_err(io)?;
                }
                b.append_data(&mut h, &entry_rel, std::io::empty())
                    .map_err(io)?;
                self.count += 1;
            } else {
                tracing::debug!(path = %path.display(), root = %self.root.display(), "skipping socket in layer");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    use crate::testutil::describe;

    fn set_times(p: &Path, t: i64) -> anyhow::Result<()> {
        set_mtime(p, t)?;
        Ok(())
    }

    /// A tree with every kind of entry a layer may hold.
    fn sample_tree(root: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(root.join("etc/app"))?;
        std::fs::write(root.join("etc/app/conf"), b"key=value\n")?;
        std::fs::set_permissions(root.join("etc/app/conf"), PermissionsExt::from_mode(0o640))?;
        std::os::unix::fs::lchown(root.join("etc/app/conf"), Some(1000), Some(2000))?;
        xattr::set(root.join("etc/app/conf"), "user.note", b"hi")?;
        std::fs::create_dir(root.join("bin"))?;
        std::fs::write(root.join("bin/tool"), vec![1u8; 5000])?;
        std::fs::set_permissions(root.join("bin/tool"), PermissionsExt::from_mode(0o4755))?;
        std::fs::hard_link(root.join("bin/tool"), root.join("bin/tool-alias"))?;
        symlink("tool", root.join("bin/t"))?;
        symlink("/does/not/exist", root.join("dangling"))?;
        std::fs::create_dir(root.join("tmp"))?;
        std::fs::set_permissions(root.join("tmp"), PermissionsExt::from_mode(0o1777))?;
        nix::sys::stat::mknod(
            &root.join("fifo"),
            SFlag::S_IFIFO,
            Mode::from_bits_truncate(0o600),
            0,
        )?;
        nix::sys::stat::mknod(
            &root.join("null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )?;
        // A whiteout and an opaque dir.
        nix::sys::stat::mknod(
            &root.join("etc/removed"),
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )?;
        std::fs::create_dir(root.join("var"))?;
        xattr::set(root.join("var"), OPAQUE_XATTR, b"y")?;
        std::fs::write(root.join("var/new"), b"new")?;
        let long = "d".repeat(120);
        std::fs::create_dir_all(root.join(&long))?;
        std::fs::write(root.join(&long).join("f".repeat(150)), b"long")?;
        for e in walkdir::WalkDir::new(root).contents_first(true) {
            let e = e?;
            set_times(e.path(), 1_600_000_000)?;
        }
        Ok(())
    }

    fn tar_of(dir: &Path) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        write_tar(dir, &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trip_keeps_everything() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("src");
        std::fs::create_dir(&src)?;
        sample_tree(&src)?;
        let tar1 = tar_of(&src)?;
        assert_eq!(tar1, tar_of(&src)?, "write_tar is deterministic");

        for (mt, blob) in [
            ("application/vnd.oci.image.layer.v1.tar", tar1.clone()),
            ("application/vnd.oci.image.layer.v1.tar+gzip", {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&tar1)?;
                gz.finish()?
            }),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                zstd::encode_all(&tar1[..], 3)?,
            ),
            ("", zstd::encode_all(&tar1[..], 3)?),
        ] {
            let blob_path = t.path().join("blob");
            std::fs::write(&blob_path, &blob)?;
            let dest = t.path().join("dest");
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir(&dest)?;
            let stats = unpack_blob(&blob_path, mt, &dest, &UnpackLimits::default())?;
            assert_eq!(
                stats.diff_id,
                format!("sha256:{}", hex::encode(Sha256::digest(&tar1)))
            );
            assert_eq!(stats.size, tar1.len() as u64);
            assert_eq!(describe(&src)?, describe(&dest)?, "media type {mt:?}");
            assert_eq!(tar_of(&dest)?, tar1);
        }
        Ok(())
    }

    #[test]
    fn whiteouts_and_opaque_become_tar_entries() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        sample_tree(t.path())?;
        let tar = tar_of(t.path())?;
        let mut names = Vec::new();
        for e in tar::Archive::new(&tar[..]).entries()? {
            let e = e?;
            names.push((
                e.path()?.to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        let pos = |n: &str| names.iter().position(|(p, _)| p == n);
        assert_eq!(
            names
                .iter()
                .find(|(p, _)| p == "etc/.wh.removed")
                .map(|e| e.1),
            Some(tar::EntryType::Regular)
        );
        assert!(pos("etc/removed").is_none());
        let var = pos("var/").ok_or_else(|| anyhow::anyhow!("no var/"))?;
        assert_eq!(pos("var/.wh..wh..opq"), Some(var + 1));
        assert!(pos("var/new") > Some(var + 1));
        assert_eq!(
            names
                .iter()
                .find(|(p, _)| p == "bin/tool-alias")
                .map(|e| e.1),
            Some(tar::EntryType::Link)
        );
        // Dirs come before their contents; siblings sorted.
        assert!(pos("bin/") < pos("bin/t"));
        assert!(pos("bin/t") < pos("bin/tool"));
        // No overlay xattrs leak into the tar.
        assert!(!tar.windows(15).any(|w| w == b"trusted.overlay"));
        Ok(())
    }

    /// A raw tar entry with an unchecked name (the tar crate's builder refuses `..`).
    fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        link: &str,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, data)?;
        Ok(())
    }

    fn unpack_raw(
        entries: &[(&str, tar::EntryType, &str, &[u8])],
        dest: &Path,
    ) -> anyhow::Result<Result<UnpackStats>> {
        let mut b = tar::Builder::new(Vec::new());
        for (n, k, l, d) in entries {
            raw_entry(&mut b, n, *k, l, d)?;
        }
        let tar = b.into_inner()?;
        std::fs::create_dir_all(dest)?;
        Ok(unpack_stream(
            &tar[..],
            "test",
            dest,
            &UnpackLimits::default(),
        ))
    }

    #[test]
    fn whiteout_entries_become_devices() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let dest = t.path().join("d");
        unpack_raw(
            &[
                ("a/.wh.gone", tar::EntryType::Regular, "", b""),
                ("a/b/.wh..wh..opq", tar::EntryType::Regular, "", b""),
                (".wh.top", tar::EntryType::Regular, "", b""),
            ],
            &dest,
        )??;
        let m = std::fs::symlink_metadata(dest.join("a/gone"))?;
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
        assert!(std::fs::symlink_metadata(dest.join("top"))?
            .file_type()
            .is_char_device());
        assert_eq!(
            xattr::get(dest.join("a/b"), OPAQUE_XATTR)?,
            Some(b"y".to_vec())
        );
        assert!(!dest.join("a/b/.wh..wh..opq").exists());
        Ok(())
    }

    #[test]
    fn tar_slip_is_rejected_or_contained() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside)?;
        std::fs::write(t.path().join("secret"), b"secret")?;

        // `..` escapes are rejected.
        let r = unpack_raw(
            &[("../x", tar::EntryType::Regular, "", b"x")],
            &t.path().join("d1"),
        )?;
        assert!(matches!(r, Err(Error::Layer { .. })), "{r:?}");
        assert!(!t.path().join("x").exists());

        // Absolute paths land inside dest.
        unpack_raw(
            &[("/abs/file", tar::EntryType::Regular, "", b"in")],
            &t.path().join("d2"),
        )??;
        assert_eq!(std::fs::read(t.path().join("d2/abs/file"))?, b"in");

        // Writing through a planted symlink is refused.
        let link = outside.display().to_string();
        let r = unpack_raw(
            &[
                ("evil", tar::EntryType::Symlink, &link, b""),
                ("evil/pwned", tar::EntryType::Regular, "", b"x"),
            ],
            &t.path().join("d3"),
        )?;
        assert!(matches!(r, Err(Error::Layer { .. })), "{r:?}");
        assert!(!outside.join("pwned").exists());
        // The symlink itself is kept verbatim.
        assert_eq!(std::fs::read_link(t.path().join("d3/evil"))?, outside);

        // Replacing a symlink with a file does not write through it.
        unpack_raw(
            &[
                ("s", tar::EntryType::Symlink, "../secret", b""),
                ("s", tar::EntryType::Regular, "", b"new"),
            ],
            &t.path().join("d4"),
        )??;
        assert_eq!(std::fs::read(t.path().join("secret"))?, b"secret");
        assert_eq!(std::fs::read(t.path().join("d4/s"))?, b"new");

        // Hard links must point inside the layer.
        for target in ["../../secret", "../secret", "/etc/passwd", "evil/x"] {
            let r = unpack_raw(
                &[
                    ("evil", tar::EntryType::Symlink, &link, b""),
                    ("h", tar::EntryType::Link, target, b""),
                ],
                &t.path().join("d5"),
            )?;
            assert!(matches!(r, Err(Error::Layer { .. })), "{target}: {r:?}");
            std::fs::remove_dir_all(t.path().join("d5"))?;
        }
        assert_eq!(std::fs::read(t.path().join("secret"))?, b"secret");
        Ok(())
    }

    #[test]
    fn whiteouts_of_dot_and_dotdot_are_rejected() -> anyhow::Result<()> {
        // Found by the layer_unpack fuzz target: `.wh...` removed the directory above the
        // layer root (here: the temp dir holding the canary).
        for name in [".wh...", ".wh..", "a/.wh...", "a/.wh.."] {
            let t = tempfile::tempdir()?;
            std::fs::write(t.path().join("canary"), b"keep")?;
            let dest = t.path().join("d");
            let r = unpack_raw(
                &[
                    ("a/", tar::EntryType::Directory, "", b""),
                    (name, tar::EntryType::Regular, "", b""),
                ],
                &dest,
            )?;
            match r {
                Err(Error::Layer { message, .. }) => {
                    assert!(message.contains("names no file"), "{name}: {message}")
                }
                other => anyhow::bail!("{name}: expected an error, got {other:?}"),
            }
            assert_eq!(std::fs::read(t.path().join("canary"))?, b"keep", "{name}");
            assert!(dest.join("a").is_dir(), "{name}");
        }
        Ok(())
    }

    #[test]
    fn decompression_bomb_is_bounded() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let mut b = tar::Builder::new(Vec::new());
        let zeros = vec![0u8; 8 << 20];
        let mut h = tar::Header::new_gnu();
        h.set_size(zeros.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big", &zeros[..])?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&b.into_inner()?)?;
        let blob = t.path().join("bomb");
        std::fs::write(&blob, gz.finish()?)?;
        let dest = t.path().join("d");
        std::fs::create_dir(&dest)?;
        let r = unpack_blob(
            &blob,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            &dest,
            &UnpackLimits { max_bytes: 1 << 20 },
        );
        match r {
            Err(Error::Layer { layer, message }) => {
                assert!(layer.contains("bomb"), "{layer}");
                assert!(message.contains("limit"), "{message}");
            }
            other => anyhow::bail!("expected a limit error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn sparse_expansion_is_bounded() -> anyhow::Result<()> {
        fn octal(field: &mut [u8], v: u64) {
            let s = format!("{v:0width$o}", width = field.len() - 1);
            field[..s.len()].copy_from_slice(s.as_bytes());
            field[s.len()] = 0;
        }
        // A GNU sparse file: 512 data bytes at the end of an 8 MiB hole.
        let real = 8u64 << 20;
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse")?;
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(512);
        if let Some(g) = h.as_gnu_mut() {
            octal(&mut g.sparse[0].offset, real - 512);
            octal(&mut g.sparse[0].numbytes, 512);
            octal(&mut g.realsize, real);
        }
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &[7u8; 512][..])?;
        let tar = b.into_inner()?;
        assert!((tar.len() as u64) < 1 << 20);
        let t = tempfile::tempdir()?;
        let ok = t.path().join("ok");
        std::fs::create_dir(&ok)?;
        unpack_stream(&tar[..], "sparse", &ok, &UnpackLimits::default())?;
        assert_eq!(std::fs::metadata(ok.join("sparse"))?.len(), real);
        let bounded = t.path().join("bounded");
        std::fs::create_dir(&bounded)?;
        let r = unpack_stream(
            &tar[..],
            "sparse",
            &bounded,
            &UnpackLimits { max_bytes: 1 << 20 },
        );
        match r {
            Err(Error::Layer { message, .. }) => assert!(message.contains("limit"), "{message}"),
            other => anyhow::bail!("expected a limit error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn truncated_and_corrupt_blobs_fail_cleanly() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("src");
        std::fs::create_dir(&src)?;
        sample_tree(&src)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_of(&src)?)?;
        let full = gz.finish()?;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", full[..full.len() / 2].to_vec()),
            ("no-trailer", full[..full.len() - 4].to_vec()),
            ("garbage", {
                let mut g = full.clone();
                for b in g.iter_mut().skip(40).step_by(7) {
                    *b ^= 0x5a;
                }
                g
            }),
            ("not-gzip", b"this is not a gzip stream at all".to_vec()),
        ];
        for (name, bytes) in cases {
            let blob = t.path().join(name);
            std::fs::write(&blob, &bytes)?;
            let dest = t.path().join(format!("d-{name}"));
            std::fs::create_dir(&dest)?;
            let r = unpack_blob(
                &blob,
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &dest,
                &UnpackLimits::default(),
            );
            assert!(matches!(r, Err(Error::Layer { .. })), "{name}: {r:?}");
        }
        Ok(())
    }

    #[test]
    fn empty_dir_gives_empty_tar() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let mut out = Vec::new();
        assert_eq!(write_tar_counted(t.path(), &mut out)?, 0);
        assert!(out.iter().all(|b| *b == 0));
        Ok(())
    }
}
