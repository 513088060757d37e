//! Docker-compatible auto-extraction (`ADD local.tar /dest`): a source file that is a
//! tar archive (plain, gzip, bzip2, xz or zstd) is extracted into the destination directory
//! instead of copied. Entries that would climb out of the destination (`../x`) are
//! refused; every path is resolved inside the destination root, so symlinks from the
//! archive or already in place never lead writes outside it.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use flate2::read::GzDecoder;
use nix::sys::stat::{mknod, Mode, SFlag};

use super::{inside, io_at, mkdir_all, relabel, Error, Result};
use crate::snapshot::{fsutil, resolve_in_root};

const GZIP: &[u8] = &[0x1f, 0x8b];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const BZIP2: &[u8] = b"BZh";
const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];

/// Opens `src` decompressed by its magic bytes (gzip, bzip2, xz, zstd or none), as
/// Docker's archive reader does.
fn open(src: &Path) -> io::Result<Box<dyn Read>> {
    let mut f = fs::File::open(src)?;
    let mut magic = [0u8; 6];
    let n = read_full(&mut f, &mut magic)?;
    let magic = &magic[..n];
    let f = fs::File::open(src)?;
    Ok(if magic.starts_with(GZIP) {
        Box::new(GzDecoder::new(f))
    } else if magic.starts_with(ZSTD) {
        Box::new(zstd::Decoder::new(f)?)
    } else if magic.starts_with(BZIP2) {
        Box::new(bzip2::read::MultiBzDecoder::new(f))
    } else if magic.starts_with(XZ) {
        Box::new(XzReader::spawn(f)?)
    } else {
        Box::new(f)
    })
}

/// A streaming view of an xz file: `lzma-rs` decompresses on a thread into a pipe; its
/// error, if any, is returned at the end of the stream.
struct XzReader {
    pipe: fs::File,
    worker: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl XzReader {
    fn spawn(f: fs::File) -> io::Result<XzReader> {
        let (r, w) = nix::unistd::pipe().map_err(io::Error::from)?;
        let mut w = fs::File::from(w);
        let worker = std::thread::Builder::new()
            .name("kiln-xz".into())
            .spawn(move || {
                let mut input = io::BufReader::new(f);
                lzma_rs::xz_decompress(&mut input, &mut w).map_err(|e| match e {
                    lzma_rs::error::Error::IoError(e) => e,
                    other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
                })
            })?;
        Ok(XzReader {
            pipe: fs::File::from(r),
            worker: Some(worker),
        })
    }
}

impl Read for XzReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(w) = self.worker.take() {
                w.join()
                    .map_err(|_| io::Error::other("xz decompressor panicked"))??;
            }
        }
        Ok(n)
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// True when `block` is a tar header with a valid checksum.
fn is_tar_header(block: &[u8; 512]) -> bool {
    if block.iter().all(|b| *b == 0) {
        return false;
    }
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let Ok(want) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    sum == want
}

/// Is `src` a (possibly compressed) tar archive?
fn is_archive(src: &Path) -> bool {
    let Ok(mut r) = open(src) else {
        return false;
    };
    let mut block = [0u8; 512];
    matches!(read_full(&mut r, &mut block), Ok(512)) && is_tar_header(&block)
}

/// Normalizes an archive path relative to its destination; `None` when it climbs out.
fn normalize(raw: &[u8]) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    let s = std::str::from_utf8(raw).ok()?;
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Extracts `src` into `dest` when it is a tar archive; `Ok(false)` when it is not.
pub(super) fn try_unpack(
    src_root: &Path,
    src: &Path,
    dest_root: &Path,
    dest: &Path,
    owner: Option<(u32, u32)>,
    mtime: Option<(i64, i64)>,
) -> Result<bool> {
    if !fs::symlink_metadata(src).is_ok_and(|m| m.is_file()) || !is_archive(src) {
        return Ok(false);
    }
    let shown = inside(src_root, src);
    let tar_err = |message: String| Error::Invalid {
        op: "unpack",
        path: shown.clone(),
        message,
    };
    if fs::symlink_metadata(dest).is_ok_and(|m| !m.is_dir()) {
        return Err(Error::Invalid {
            op: "unpack",
            path: inside(dest_root, dest),
            message: "destination exists and is not a directory".into(),
        });
    }
    mkdir_all(dest_root, dest, owner.unwrap_or((0, 0)), mtime)?;
    let dest_in_root = inside(dest_root, dest);
    let r = open(src).map_err(io_at("unpack", src_root, src))?;
    let mut archive = tar::Archive::new(r);
    let mut dir_times = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| tar_err(format!("reading archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| tar_err(format!("reading archive: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let rel = normalize(&raw).ok_or_else(|| {
            tar_err(format!(
                "entry {:?} points outside the destination",
                String::from_utf8_lossy(&raw)
            ))
        })?;
        if rel.is_empty() {
            continue;
        }
        let target = resolve_in_root(dest_root, &format!("{dest_in_root}/{rel}"), false)?;
        let h = entry.header();
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let entry_mtime = h.mtime().unwrap_or(0) as i64;
        let kind = h.entry_type();
        let (ouid, ogid) = owner.unwrap_or((uid, gid));
        if let Some(parent) = target.parent() {
            mkdir_all(dest_root, parent, owner.unwrap_or((0, 0)), None)?;
        }
        let existing = fs::symlink_metadata(&target).ok();
        if kind.is_dir() {
            if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                fsutil::remove_any(&target).map_err(relabel(dest_root))?;
                fs::create_dir(&target).map_err(io_at("unpack", dest_root, &target))?;
            }
        } else {
            fsutil::remove_any(&target).map_err(relabel(dest_root))?;
        }
        match kind {
            k if k.is_dir() => {}
            k if k.is_file() || k == tar::EntryType::Continuous => {
                let mut f =
                    fs::File::create(&target).map_err(io_at("unpack", dest_root, &target))?;
                io::copy(&mut entry, &mut f).map_err(io_at("unpack", dest_root, &target))?;
            }
            k if k.is_symlink() => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| tar_err(format!("symlink {rel} has no target")))?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &target)
                    .map_err(io_at("unpack", dest_root, &target))?;
            }
            k if k.is_hard_link() => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| tar_err(format!("hard link {rel} has no target")))?;
                let link_rel = normalize(&link).ok_or_else(|| {
                    tar_err(format!("hard link {rel} points outside the destination"))
                })?;
                let first =
                    resolve_in_root(dest_root, &format!("{dest_in_root}/{link_rel}"), false)?;
                fs::hard_link(&first, &target).map_err(io_at("unpack", dest_root, &target))?;
                continue;
            }
            k if k.is_character_special() || k.is_block_special() || k.is_fifo() => {
                let (kind, dev) = if k.is_fifo() {
                    (SFlag::S_IFIFO, 0)
                } else {
                    let major = u64::from(h.device_major().ok().flatten().unwrap_or(0));
                    let minor = u64::from(h.device_minor().ok().flatten().unwrap_or(0));
                    let t = if k.is_block_special() {
                        SFlag::S_IFBLK
                    } else {
                        SFlag::S_IFCHR
                    };
                    (t, nix::sys::stat::makedev(major, minor))
                };
                mknod(&target, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| io_at("unpack", dest_root, &target)(io::Error::from(e)))?;
            }
            _ => continue,
        }
        let is_link = kind.is_symlink();
        std::os::unix::fs::lchown(&target, Some(ouid), Some(ogid))
            .map_err(io_at("chown", dest_root, &target))?;
        if !is_link {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_at("chmod", dest_root, &target))?;
        }
        if kind.is_dir() {
            dir_times.push((target, entry_mtime));
        } else {
            fsutil::set_mtime(&target, entry_mtime, 0).map_err(relabel(dest_root))?;
        }
    }
    for (p, t) in dir_times.iter().rev() {
        fsutil::set_mtime(p, *t, 0).map_err(relabel(dest_root))?;
    }
    Ok(true)
}
