//! The sender: a `FileSync` server over named local directories.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use kiln_proto::fsutil::mode;
use kiln_proto::fsutil::types::packet::PacketType;
use kiln_proto::fsutil::types::{Packet, Stat};
use kiln_proto::moby::filesync::v1::file_sync_server::{FileSync, FileSyncServer};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::{err_packet, kind_name, packet, Selection, MAX_CHUNK};
use crate::session::transport::MAX_GRPC_MESSAGE;
use crate::session::SessionError;
use crate::source::local::patterns::{clean_path, PatternMatcher};

/// The CLI side of FileSync: the local directories a session exposes by name, served
/// with the fsutil sender protocol. A request for an unknown `dir-name` is answered
/// `NotFound`.
#[derive(Debug, Clone, Default)]
pub struct LocalDirs {
    dirs: HashMap<String, PathBuf>,
    keep_ownership: bool,
    sent: Arc<AtomicU64>,
}

impl LocalDirs {
    /// File content bytes sent so far, by this value and its clones (what an incremental
    /// transfer saves shows here).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// No directories; add them with [`LocalDirs::with_dir`].
    pub fn new() -> LocalDirs {
        LocalDirs::default()
    }

    /// Exposes `path` under `name` (e.g. `context`, `dockerfile`).
    pub fn with_dir(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> LocalDirs {
        self.dirs.insert(name.into(), path.into());
        self
    }

    /// Sends the files' real uid/gid instead of 0 (buildctl and buildx send 0).
    pub fn keep_ownership(mut self, keep: bool) -> LocalDirs {
        self.keep_ownership = keep;
        self
    }

    /// The gRPC service to add to the session's routes.
    pub fn into_service(self) -> FileSyncServer<LocalDirs> {
        FileSyncServer::new(self)
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE)
    }
}

/// One listed entry and where its content is read from.
struct Entry {
    stat: Stat,
    source: PathBuf,
}

#[tonic::async_trait]
impl FileSync for LocalDirs {
    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<BoxStream<Packet>>, Status> {
        let selection = Selection::from_metadata(request.metadata())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let root = self.dirs.get(&selection.dir_name).cloned().ok_or_else(|| {
            Status::not_found(format!("no access allowed to dir {:?}", selection.dir_name))
        })?;
        let keep = self.keep_ownership;
        let entries = tokio::task::spawn_blocking(move || walk(&root, &selection, keep))
            .await
            .map_err(|e| Status::internal(format!("directory walk panicked: {e}")))?
            .map_err(|e| Status::failed_precondition(error_chain(&e)))?;
        let (tx, rx) = mpsc::channel(16);
        let inbound = request.into_inner();
        let sent = self.sent.clone();
        tokio::spawn(async move {
            if let Err(e) = run(entries, inbound, &tx, &sent).await {
                let message = error_chain(&e);
                tracing::warn!(error = %message, "filesync send failed");
                let _ = tx.send(Ok(err_packet(&message))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn tar_stream(
        &self,
        _request: Request<Streaming<Packet>>,
    ) -> Result<Response<BoxStream<Packet>>, Status> {
        Err(Status::unimplemented("failed to negotiate protocol"))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

type Out = mpsc::Sender<Result<Packet, Status>>;

async fn send(tx: &Out, p: Packet) -> Result<(), SessionError> {
    tx.send(Ok(p))
        .await
        .map_err(|_| SessionError::protocol("receiver closed the stream"))
}

/// Streams the listing, then serves REQs until the receiver's FIN. The inbound stream
/// is drained by its own task from the start: a receiver may send requests while the
/// listing is still arriving and must never block on them.
async fn run<S>(
    entries: Vec<Entry>,
    mut inbound: S,
    tx: &Out,
    sent: &AtomicU64,
) -> Result<(), SessionError>
where
    S: futures::Stream<Item = Result<Packet, Status>> + Send + Unpin + 'static,
{
    let (req_tx, mut requests) = mpsc::unbounded_channel();
    let _reader = crate::AbortOnDrop(
        tokio::spawn(async move {
            loop {
                let next = inbound.next().await.transpose();
                let done = !matches!(next, Ok(Some(_)));
                if req_tx.send(next).is_err() || done {
                    break;
                }
            }
        })
        .abort_handle(),
    );
    for e in &entries {
        send(
            tx,
            Packet {
                stat: Some(e.stat.clone()),
                ..packet(PacketType::PacketStat)
            },
        )
        .await?;
    }
    send(tx, Packet::default()).await?;
    let mut served = vec![false; entries.len()];
    loop {
        let p = requests
            .recv()
            .await
            .transpose()
            .map_err(|source| SessionError::Rpc {
                call: "FileSync.DiffCopy (receiving requests)".into(),
                source,
            })?
            .flatten()
            .ok_or_else(|| SessionError::protocol("receiver ended the stream without FIN"))?;
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketReq) => {
                let id = p.id as usize;
                let entry = entries
                    .get(id)
                    .filter(|e| mode::is_regular(e.stat.mode) && e.stat.linkname.is_empty())
                    .ok_or_else(|| {
                        SessionError::protocol(format!("request for invalid file id {id}"))
                    })?;
                if std::mem::replace(&mut served[id], true) {
                    return Err(SessionError::protocol(format!(
                        "file id {id} ({}) requested twice",
                        entry.stat.path
                    )));
                }
                send_file(tx, p.id, &entry.source, sent).await?;
            }
            Ok(PacketType::PacketFin) => {
                send(tx, packet(PacketType::PacketFin)).await?;
                return Ok(());
            }
            Ok(PacketType::PacketErr) => {
                return Err(SessionError::Peer {
                    message: String::from_utf8_lossy(&p.data).into_owned(),
                })
            }
            _ => {
                return Err(SessionError::protocol(format!(
                    "unexpected {} from the receiver",
                    kind_name(p.r#type)
                )))
            }
        }
    }
}

/// DATA chunks of one file, then the empty DATA; a file that cannot be opened is sent
/// empty (as fsutil does).
async fn send_file(tx: &Out, id: u32, path: &Path, sent: &AtomicU64) -> Result<(), SessionError> {
    let data = |data: Vec<u8>| Packet {
        id,
        data,
        ..packet(PacketType::PacketData)
    };
    match tokio::fs::File::open(path).await {
        Ok(mut file) => loop {
            let mut buf = vec![0u8; MAX_CHUNK];
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| SessionError::io("read", path, e))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            sent.fetch_add(n as u64, Ordering::SeqCst);
            send(tx, data(buf)).await?;
        },
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot open file to send"),
    }
    send(tx, data(Vec::new())).await
}

/// Includes: the include patterns plus the follow paths (symlinks in them resolved).
fn include_list(root: &Path, sel: &Selection) -> Vec<String> {
    let mut out = sel.include_patterns.clone();
    for p in &sel.follow_paths {
        follow_links(root, &clean_path(p.trim_start_matches('/')), &mut out, 0);
    }
    out
}

/// Adds `rel` and, when a component of it is a symlink inside `root`, the path it
/// resolves to.
fn follow_links(root: &Path, rel: &str, out: &mut Vec<String>, depth: usize) {
    if rel == "." || rel.starts_with("..") || out.iter().any(|p| p == rel) || depth > 40 {
        return;
    }
    out.push(rel.to_string());
    let parts: Vec<&str> = rel.split('/').collect();
    for i in 0..parts.len() {
        let prefix = parts[..=i].join("/");
        let Ok(target) = std::fs::read_link(root.join(&prefix)) else {
            continue;
        };
        let Some(target) = target.to_str() else {
            return;
        };
        let base = if target.starts_with('/') {
            String::new()
        } else {
            parts[..i].join("/")
        };
        let mut resolved = clean_path(&format!("{base}/{target}"));
        resolved = resolved.trim_start_matches('/').to_string();
        let rest = parts[i + 1..].join("/");
        if !rest.is_empty() {
            resolved = clean_path(&format!("{resolved}/{rest}"));
        }
        follow_links(root, &resolved, out, depth + 1);
        return;
    }
}

/// Whether some include pattern could match a path strictly inside `dir`.
fn include_may_enter(includes: &[String], dir: &str) -> bool {
    let segs: Vec<&str> = dir.split('/').collect();
    includes.iter().any(|p| {
        let p = clean_path(p.trim_start_matches('/'));
        let psegs: Vec<&str> = p.split('/').collect();
        for (i, seg) in segs.iter().enumerate() {
            let Some(ps) = psegs.get(i) else {
                return true;
            };
            if ps.contains("**") {
                return true;
            }
            let literal = !ps.contains(['*', '?', '[', '\\']);
            if literal && ps != seg {
                return false;
            }
        }
        true
    })
}

/// Lists `root` in fsutil order (pre-order, siblings by byte order), filtered by the
/// selection; parents of included entries are listed even when they are filtered
/// out themselves.
fn walk(root: &Path, sel: &Selection, keep_ownership: bool) -> Result<Vec<Entry>, SessionError> {
    let excludes =
        PatternMatcher::new(&sel.exclude_patterns).map_err(|source| SessionError::Pattern {
            kind: "exclude",
            source,
        })?;
    let include_list = include_list(root, sel);
    let includes = PatternMatcher::new(&include_list).map_err(|source| SessionError::Pattern {
        kind: "include",
        source,
    })?;
    let meta = std::fs::metadata(root).map_err(|e| SessionError::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(SessionError::io(
            "open",
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut out: Vec<Entry> = Vec::new();
    // Directories not listed yet (filtered out themselves): (depth, entry).
    let mut pending: Vec<(usize, Entry)> = Vec::new();
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut it = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    while let Some(item) = it.next() {
        let item = item.map_err(|e| {
            let path = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.to_path_buf());
            SessionError::io("walk", path, std::io::Error::other(e))
        })?;
        let depth = item.depth();
        while pending.last().is_some_and(|(d, _)| *d >= depth) {
            pending.pop();
        }
        let rel = item
            .path()
            .strip_prefix(root)
            .ok()
            .and_then(Path::to_str)
            .ok_or_else(|| {
                SessionError::io(
                    "walk",
                    item.path(),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "path is not utf-8"),
                )
            })?
            .to_string();
        let md = item
            .metadata()
            .map_err(|e| SessionError::io("stat", item.path(), std::io::Error::other(e)))?;
        let is_dir = md.is_dir();
        let go_mode = mode::from_unix(md.mode());
        if go_mode & mode::SOCKET != 0 {
            continue;
        }
        let excluded = !excludes.is_empty() && excludes.matches(&rel);
        let included = includes.is_empty() || includes.matches(&rel);
        let may_enter = is_dir
            && (!excluded || excludes.might_match_children(&rel))
            && (included || include_may_enter(&include_list, &rel));
        if excluded || !included {
            if may_enter {
                pending.push((depth, entry(&rel, item.path(), &md, keep_ownership)?));
            } else if is_dir {
                it.skip_current_dir();
            }
            continue;
        }
        out.extend(pending.drain(..).map(|(_, e)| e));
        let mut e = entry(&rel, item.path(), &md, keep_ownership)?;
        if mode::is_regular(go_mode) && md.nlink() > 1 {
            match links.get(&(md.dev(), md.ino())) {
                Some(first) => e.stat.linkname = first.clone(),
                None => {
                    links.insert((md.dev(), md.ino()), rel.clone());
                }
            }
        }
        out.push(e);
    }
    Ok(out)
}

fn entry(
    rel: &str,
    path: &Path,
    md: &std::fs::Metadata,
    keep_ownership: bool,
) -> Result<Entry, SessionError> {
    let go_mode = mode::from_unix(md.mode());
    let mut stat = Stat {
        path: rel.to_string(),
        mode: go_mode,
        uid: if keep_ownership { md.uid() } else { 0 },
        gid: if keep_ownership { md.gid() } else { 0 },
        size: if md.is_dir() { 0 } else { md.size() as i64 },
        mod_time: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ..Stat::default()
    };
    if md.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| SessionError::io("readlink", path, e))?;
        stat.linkname = target
            .to_str()
            .ok_or_else(|| {
                SessionError::io(
                    "readlink",
                    path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "target is not utf-8"),
                )
            })?
            .to_string();
    } else {
        if go_mode & mode::DEVICE != 0 {
            stat.devmajor = nix::sys::stat::major(md.rdev()) as i64;
            stat.devminor = nix::sys::stat::minor(md.rdev()) as i64;
        }
        if let Ok(names) = xattr::list(path) {
            for name in names {
                let Some(key) = name.to_str() else { continue };
                if key.starts_with("com.apple.") {
                    continue;
                }
                if let Ok(Some(value)) = xattr::get(path, &name) {
                    stat.xattrs.insert(key.to_string(), value);
                }
            }
        }
    }
    Ok(Entry {
        stat,
        source: path.to_path_buf(),
    })
}

/// The fsutil `Stat` of `path` (named `rel`), owners kept: what StatFile/ReadDir answer.
pub(crate) fn stat_of(rel: &str, path: &Path) -> Result<Stat, SessionError> {
    let md = std::fs::symlink_metadata(path).map_err(|e| SessionError::io("stat", path, e))?;
    Ok(entry(rel, path, &md, true)?.stat)
}

/// The sender side of a directory transfer over any packet stream: lists `root` (owners
/// kept) and serves the receiver's requests until its FIN. Used for `local` outputs, where
/// the daemon sends over `FileSend` and the client receives.
pub(crate) async fn send_dir<S>(root: PathBuf, inbound: S, tx: Out) -> Result<(), SessionError>
where
    S: futures::Stream<Item = Result<Packet, Status>> + Send + Unpin + 'static,
{
    let selection = Selection::default();
    let entries = tokio::task::spawn_blocking(move || walk(&root, &selection, true))
        .await
        .map_err(|e| SessionError::protocol(format!("directory walk failed: {e}")))??;
    let res = run(entries, inbound, &tx, &AtomicU64::new(0)).await;
    if let Err(e) = &res {
        let _ = tx.send(Ok(err_packet(&error_chain(e)))).await;
    }
    res
}
