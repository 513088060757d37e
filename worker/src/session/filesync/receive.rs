//! The receiver: requests a listing and writes it into a destination directory.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_proto::fsutil::mode;
use kiln_proto::fsutil::types::packet::PacketType;
use kiln_proto::fsutil::types::{Packet, Stat};
use kiln_proto::moby::filesync::v1::file_sync_client::FileSyncClient;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::Request;

use super::{kind_name, packet, Selection};
use crate::session::transport::MAX_GRPC_MESSAGE;
use crate::session::SessionError;
use crate::source::local::patterns::clean_path;

/// What to ask the sender for (the `DiffCopy` request headers besides `dir-name`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// Only paths matching these `.dockerignore`-style patterns.
    pub include_patterns: Vec<String>,
    /// Not paths matching these patterns.
    pub exclude_patterns: Vec<String>,
    /// Only these paths (and their parents; the sender resolves symlinks in them).
    pub follow_paths: Vec<String>,
}

/// Receives the client's directory `name` over a session channel into `dest` (created
/// if missing; listed entries replace what is there) and returns the entries as listed.
///
/// Every path is checked before anything is written: it must be clean and relative,
/// listed in order, below a directory listed before it (so never below a symlink).
/// Regular files are all requested; modes, mtimes, symlinks, hard links, devices,
/// xattrs and (when running as root) uid/gid are applied.
pub async fn receive(
    channel: Channel,
    name: &str,
    dest: &Path,
    opts: &ReceiveOptions,
) -> Result<Vec<Stat>, SessionError> {
    let call = || format!("FileSync.DiffCopy({name})");
    let rpc = |source| SessionError::Rpc {
        call: call(),
        source,
    };
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| SessionError::io("create", dest, e))?;
    let selection = Selection {
        dir_name: name.to_string(),
        include_patterns: opts.include_patterns.clone(),
        exclude_patterns: opts.exclude_patterns.clone(),
        follow_paths: opts.follow_paths.clone(),
    };
    let (tx, rx) = mpsc::unbounded_channel::<Packet>();
    let mut request = Request::new(UnboundedReceiverStream::new(rx));
    selection.to_metadata(request.metadata_mut())?;
    let mut client = FileSyncClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
    let mut inbound = client.diff_copy(request).await.map_err(rpc)?.into_inner();
    let stats = receive_files(&mut inbound, tx, dest, false)
        .await
        .map_err(|e| match e {
            SessionError::Rpc { source, .. } => rpc(source),
            other => other,
        })?;
    // Every requested file has arrived whole; the sender's closing FIN carries nothing, so
    // it is awaited off the build's path (one round trip less per transfer) and the
    // stream still ends cleanly on both sides.
    let name = name.to_string();
    tokio::spawn(async move {
        if let Err(e) = closing_fin(&mut inbound).await {
            tracing::debug!(dir = %name, error = %e, "filesync: the sender did not close cleanly after FIN");
        }
    });
    Ok(stats)
}

/// The receiver side of a transfer over any packet stream: validates the listing, requests
/// the files, writes everything into `dest` and applies metadata. Sends an ERR packet to
/// the sender when it fails. Public for the `fsutil_packet` fuzz target.
pub async fn receive_stream<S>(
    inbound: &mut S,
    tx: mpsc::UnboundedSender<Packet>,
    dest: &Path,
) -> Result<Vec<Stat>, SessionError>
where
    S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    receive_files(inbound, tx, dest, true).await
}

/// [`receive_stream`], waiting for the sender's closing FIN only when `wait_fin` (else the
/// caller drains the stream with [`closing_fin`]).
async fn receive_files<S>(
    inbound: &mut S,
    tx: mpsc::UnboundedSender<Packet>,
    dest: &Path,
    wait_fin: bool,
) -> Result<Vec<Stat>, SessionError>
where
    S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| SessionError::io("create", dest, e))?;
    let result = match exchange(inbound, &tx, dest).await {
        Ok(entries) if wait_fin => closing_fin(inbound).await.map(|()| entries),
        other => other,
    };
    if let Err(e) = &result {
        let _ = tx.send(super::err_packet(&e.to_string()));
    }
    drop(tx);
    let entries = result?;
    let dest = dest.to_path_buf();
    let stats = tokio::task::spawn_blocking(move || {
        apply_metadata(&dest, &entries)?;
        Ok::<_, SessionError>(entries.into_iter().map(|e| e.stat).collect())
    })
    .await
    .map_err(|e| SessionError::protocol(format!("metadata task failed: {e}")))??;
    Ok(stats)
}

async fn next<S>(inbound: &mut S) -> Result<Option<Packet>, SessionError>
where
    S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    use futures::StreamExt;
    inbound
        .next()
        .await
        .transpose()
        .map_err(|source| SessionError::Rpc {
            call: String::new(),
            source,
        })
}

fn peer_error(p: &Packet) -> SessionError {
    SessionError::Peer {
        message: String::from_utf8_lossy(&p.data).into_owned(),
    }
}

/// One validated entry of the listing.
#[derive(Debug, Clone)]
struct Entry {
    stat: Stat,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    HardLink,
    Symlink,
    Node,
    Skipped,
}

async fn exchange<S>(
    inbound: &mut S,
    tx: &mpsc::UnboundedSender<Packet>,
    dest: &Path,
) -> Result<Vec<Entry>, SessionError>
where
    S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    // 1. The listing, validated as it arrives.
    let mut listing = Listing::default();
    loop {
        let p = next(inbound)
            .await?
            .ok_or_else(|| SessionError::protocol("stream ended before the end of the listing"))?;
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketStat) => match p.stat {
                Some(stat) => listing.push(stat)?,
                None => break,
            },
            Ok(PacketType::PacketErr) => return Err(peer_error(&p)),
            _ => {
                return Err(SessionError::protocol(format!(
                    "unexpected {} before the end of the listing",
                    kind_name(p.r#type)
                )))
            }
        }
    }
    let entries = listing.entries;

    // 2. The skeleton: directories, empty files, links and nodes. What a previous transfer
    // into `dest` left and the listing no longer has goes; a regular file whose size and
    // modification time match the listing is kept as it is and not requested.
    let skeleton = entries.clone();
    let root = dest.to_path_buf();
    let unchanged = tokio::task::spawn_blocking(move || {
        remove_unlisted(&root, &skeleton)?;
        create_skeleton(&root, &skeleton)
    })
    .await
    .map_err(|e| SessionError::protocol(format!("write task failed: {e}")))??;

    // 3. The content of every regular file that changed.
    let mut wanted: HashMap<u32, Option<tokio::fs::File>> = HashMap::new();
    for (id, e) in entries.iter().enumerate() {
        if e.kind == Kind::File && !unchanged.contains(&id) {
            let id = u32::try_from(id)
                .map_err(|_| SessionError::protocol("more than 2^32 entries in the listing"))?;
            wanted.insert(id, None);
            let _ = tx.send(Packet {
                id,
                ..packet(PacketType::PacketReq)
            });
        }
    }
    while !wanted.is_empty() {
        let p = next(inbound).await?.ok_or_else(|| {
            SessionError::protocol(format!(
                "stream ended with {} requested files not sent",
                wanted.len()
            ))
        })?;
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketData) => {
                let slot = wanted.get_mut(&p.id).ok_or_else(|| {
                    SessionError::protocol(format!("data for unrequested entry id {}", p.id))
                })?;
                let path = entries
                    .get(p.id as usize)
                    .map(|e| dest.join(&e.stat.path))
                    .ok_or_else(|| SessionError::protocol(format!("data for entry id {}", p.id)))?;
                if p.data.is_empty() {
                    if let Some(mut f) = slot.take() {
                        f.flush()
                            .await
                            .map_err(|e| SessionError::io("write", &path, e))?;
                    }
                    wanted.remove(&p.id);
                    continue;
                }
                if slot.is_none() {
                    let f = tokio::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .await
                        .map_err(|e| SessionError::io("open", &path, e))?;
                    *slot = Some(f);
                }
                if let Some(f) = slot.as_mut() {
                    f.write_all(&p.data)
                        .await
                        .map_err(|e| SessionError::io("write", &path, e))?;
                }
            }
            Ok(PacketType::PacketErr) => return Err(peer_error(&p)),
            _ => {
                return Err(SessionError::protocol(format!(
                    "unexpected {} while receiving file contents ({} files pending)",
                    kind_name(p.r#type),
                    wanted.len()
                )))
            }
        }
    }

    // 4. FIN; the sender answers with its own (`closing_fin`).
    let _ = tx.send(packet(PacketType::PacketFin));
    Ok(entries)
}

/// Reads the sender's answer to the receiver's FIN: a FIN, or the end of the stream.
async fn closing_fin<S>(inbound: &mut S) -> Result<(), SessionError>
where
    S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    if let Some(p) = next(inbound).await? {
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketFin) => {}
            Ok(PacketType::PacketErr) => return Err(peer_error(&p)),
            Ok(PacketType::PacketData) => {
                return Err(SessionError::protocol(format!(
                    "data for unrequested entry id {}",
                    p.id
                )))
            }
            _ => {
                return Err(SessionError::protocol(format!(
                    "unexpected {} after all files were received",
                    kind_name(p.r#type)
                )))
            }
        }
    }
    Ok(())
}

/// The listing so far, with what validation needs.
#[derive(Default)]
struct Listing {
    entries: Vec<Entry>,
    /// Path → kind of every entry listed.
    kinds: HashMap<String, Kind>,
    dirs: HashSet<String>,
}

/// Path order of fsutil: byte order with `/` below every other byte.
fn order_key(p: &str) -> Vec<u8> {
    p.bytes().map(|b| if b == b'/' { 0 } else { b }).collect()
}

fn unsafe_path(path: &str, reason: impl Into<String>) -> SessionError {
    SessionError::UnsafePath {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Checks that `p` is a clean relative path that stays below the root.
fn check_path(p: &str) -> Result<(), SessionError> {
    if p.is_empty() {
        return Err(unsafe_path(p, "empty path"));
    }
    if p.starts_with('/') {
        return Err(unsafe_path(p, "absolute path"));
    }
    if p.contains('\0') {
        return Err(unsafe_path(p, "nul byte in path"));
    }
    if p == ".." || p.starts_with("../") || p.split('/').any(|s| s == "..") {
        return Err(unsafe_path(p, "path escapes the destination"));
    }
    if clean_path(p) != p || p == "." {
        return Err(unsafe_path(p, "unclean path"));
    }
    Ok(())
}

impl Listing {
    fn push(&mut self, stat: Stat) -> Result<(), SessionError> {
        let p = stat.path.as_str();
        check_path(p)?;
        if let Some(prev) = self.entries.last() {
            if order_key(&prev.stat.path) >= order_key(p) {
                return Err(SessionError::protocol(format!(
                    "changes out of order: {:?} after {:?}",
                    p, prev.stat.path
                )));
            }
        }
        if let Some((parent, _)) = p.rsplit_once('/') {
            if !self.dirs.contains(parent) {
                return Err(match self.kinds.get(parent) {
                    Some(_) => unsafe_path(p, format!("parent {parent:?} is not a directory")),
                    None => SessionError::protocol(format!(
                        "{p:?} listed before its parent directory {parent:?}"
                    )),
                });
            }
        }
        let m = stat.mode;
        let kind = if m & mode::DIR != 0 {
            Kind::Dir
        } else if m & mode::SYMLINK != 0 {
            if stat.linkname.is_empty() {
                return Err(SessionError::protocol(format!(
                    "symlink {p:?} has no target"
                )));
            }
            Kind::Symlink
        } else if m & (mode::DEVICE | mode::NAMED_PIPE) != 0 {
            Kind::Node
        } else if mode::is_regular(m) {
            if stat.linkname.is_empty() {
                Kind::File
            } else {
                let target = stat.linkname.as_str();
                if check_path(target).is_err()
                    || !matches!(self.kinds.get(target), Some(Kind::File | Kind::HardLink))
                {
                    return Err(SessionError::protocol(format!(
                        "invalid link {p:?} to unknown path {target:?}"
                    )));
                }
                Kind::HardLink
            }
        } else {
            Kind::Skipped
        };
        if kind == Kind::Dir {
            self.dirs.insert(p.to_string());
        }
        self.kinds.insert(p.to_string(), kind);
        self.entries.push(Entry { stat, kind });
        Ok(())
    }
}

/// Removes whatever is at `path` without following symlinks.
fn clear(path: &Path) -> Result<(), SessionError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            std::fs::remove_dir_all(path).map_err(|e| SessionError::io("remove", path, e))
        }
        Ok(_) => std::fs::remove_file(path).map_err(|e| SessionError::io("remove", path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SessionError::io("stat", path, e)),
    }
}

/// Creates every entry (files empty). Parents are validated directories created (or
/// checked to be real directories) before their children, so nothing is written
/// through a symlink.
/// Removes whatever is below `dest` but not in the listing (left by an earlier transfer
/// into the same directory), deepest first.
fn remove_unlisted(dest: &Path, entries: &[Entry]) -> Result<(), SessionError> {
    let listed: HashSet<&str> = entries.iter().map(|e| e.stat.path.as_str()).collect();
    let mut doomed = Vec::new();
    let mut walker = walkdir::WalkDir::new(dest).min_depth(1).into_iter();
    while let Some(item) = walker.next() {
        let Ok(item) = item else { continue };
        let Ok(rel) = item.path().strip_prefix(dest) else {
            continue;
        };
        let rel = rel.to_string_lossy();
        if !listed.contains(rel.as_ref()) {
            if item.file_type().is_dir() {
                walker.skip_current_dir();
            }
            doomed.push(item.path().to_path_buf());
        }
    }
    for p in doomed {
        clear(&p)?;
    }
    Ok(())
}

/// True when `path` is a regular file with the listed size and modification time, so its
/// content need not be sent again.
fn is_unchanged(path: &Path, stat: &Stat) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        m.file_type().is_file()
            && m.size() as i64 == stat.size
            && m.mtime() * 1_000_000_000 + m.mtime_nsec() == stat.mod_time
    })
}

/// Creates what the listing holds; returns the ids of regular files already present
/// unchanged.
fn create_skeleton(dest: &Path, entries: &[Entry]) -> Result<HashSet<usize>, SessionError> {
    let mut unchanged = HashSet::new();
    for (id, e) in entries.iter().enumerate() {
        let path = dest.join(&e.stat.path);
        if e.kind == Kind::File && is_unchanged(&path, &e.stat) {
            unchanged.insert(id);
            continue;
        }
        match e.kind {
            Kind::Dir => {
                let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                if !is_dir {
                    clear(&path)?;
                    std::fs::create_dir(&path)
                        .map_err(|err| SessionError::io("mkdir", &path, err))?;
                }
            }
            Kind::File => {
                clear(&path)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|err| SessionError::io("create", &path, err))?;
            }
            Kind::HardLink => {
                clear(&path)?;
                let target = dest.join(&e.stat.linkname);
                std::fs::hard_link(&target, &path)
                    .map_err(|err| SessionError::io("link", &path, err))?;
            }
            Kind::Symlink => {
                clear(&path)?;
                std::os::unix::fs::symlink(&e.stat.linkname, &path)
                    .map_err(|err| SessionError::io("symlink", &path, err))?;
            }
            Kind::Node => {
                clear(&path)?;
                let unix = mode::to_unix(e.stat.mode);
                let kind = nix::sys::stat::SFlag::from_bits_truncate(unix & libc::S_IFMT);
                let perm = nix::sys::stat::Mode::from_bits_truncate(unix & 0o7777);
                let dev = nix::sys::stat::makedev(e.stat.devmajor as u64, e.stat.devminor as u64);
                nix::sys::stat::mknod(&path, kind, perm, dev)
                    .map_err(|err| SessionError::io("mknod", &path, err.into()))?;
            }
            Kind::Skipped => {
                tracing::debug!(path = %e.stat.path, mode = e.stat.mode, "skipping unsupported entry");
            }
        }
    }
    Ok(unchanged)
}

/// Ownership, permissions, xattrs and times, children before their directories.
fn apply_metadata(dest: &Path, entries: &[Entry]) -> Result<(), SessionError> {
    let root = nix::unistd::geteuid().is_root();
    for e in entries.iter().rev() {
        if matches!(e.kind, Kind::HardLink | Kind::Skipped) {
            continue;
        }
        let path: PathBuf = dest.join(&e.stat.path);
        if root {
            std::os::unix::fs::lchown(&path, Some(e.stat.uid), Some(e.stat.gid))
                .map_err(|err| SessionError::io("chown", &path, err))?;
        }
        if e.kind != Kind::Symlink {
            let perm = mode::to_unix(e.stat.mode) & 0o7777;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(perm))
                .map_err(|err| SessionError::io("chmod", &path, err))?;
            for (key, value) in &e.stat.xattrs {
                if let Err(err) = xattr::set(&path, key, value) {
                    tracing::warn!(path = %path.display(), xattr = %key, error = %err, "cannot set xattr");
                }
            }
        }
        let t = nix::sys::time::TimeSpec::new(
            e.stat.mod_time.div_euclid(1_000_000_000),
            e.stat.mod_time.rem_euclid(1_000_000_000),
        );
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|err| SessionError::io("set times", &path, err.into()))?;
    }
    Ok(())
}
