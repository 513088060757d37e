//! The containerd content store a client attaches to its session
//! (`containerd.services.content.v1.Content`, shared/design/buildkit-wire.md §6.5, §9.3):
//! directories laid out as OCI layouts (`blobs/sha256/<hex>`), chosen per call by the
//! `buildkit-attachable-store-id` header (`export` for `oci`/`docker` outputs with
//! `tar=false`).
//!
//! * Client side: [`ContentStores`], serving `Info`, `Read`, `Write` and `Abort`.
//! * Daemon side: [`write_blob`] and [`read_blob`].
//!
//! Digests must be `sha256:<64 lowercase hex>`, so no request can name a path outside
//! its store; a blob only appears under `blobs/` once its size and digest are verified.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_proto::containerd::services::content::v1::content_client::ContentClient;
use kiln_proto::containerd::services::content::v1::content_server::{Content, ContentServer};
use kiln_proto::containerd::services::content::v1::{
    AbortRequest, Info, InfoRequest, InfoResponse, ReadContentRequest, ReadContentResponse,
    WriteAction, WriteContentRequest, WriteContentResponse,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::SessionError;

/// `Content.Info`.
pub const INFO: &str = "/containerd.services.content.v1.Content/Info";
/// `Content.Read`.
pub const READ: &str = "/containerd.services.content.v1.Content/Read";
/// `Content.Write`.
pub const WRITE: &str = "/containerd.services.content.v1.Content/Write";
/// `Content.Abort`.
pub const ABORT: &str = "/containerd.services.content.v1.Content/Abort";
/// The methods [`ContentStores`] serves, for the session headers.
pub const METHODS: [&str; 4] = [INFO, READ, WRITE, ABORT];
/// The store an `oci`/`docker` output with `tar=false` writes to.
pub const EXPORT_STORE: &str = "export";
/// Size of each chunk sent by `Read` and `Write`.
const CHUNK: usize = 1 << 20;

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns its hex part.
pub fn digest_hex(digest: &str) -> Option<&str> {
    crate::content::validate_digest(digest).ok()
}

/// The path of `digest` inside the OCI layout at `dir`.
fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, Status> {
    let hex = digest_hex(digest).ok_or_else(|| {
        Status::invalid_argument(format!(
            "digest {digest:?} is not sha256:<64 lowercase hex>"
        ))
    })?;
    Ok(dir.join("blobs").join("sha256").join(hex))
}

fn io_status(op: &str, path: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("content store: {op} {}: {e}", path.display()))
}

/// Client side: the content stores served to the daemon, by store ID.
#[derive(Clone, Debug, Default)]
pub struct ContentStores {
    stores: Arc<HashMap<String, PathBuf>>,
}

impl ContentStores {
    /// Serves each directory in `stores` under its store ID.
    pub fn new(stores: HashMap<String, PathBuf>) -> ContentStores {
        ContentStores {
            stores: Arc::new(stores),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> ContentServer<ContentStores> {
        ContentServer::new(self)
            .max_decoding_message_size(super::transport::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(super::transport::MAX_GRPC_MESSAGE)
    }

    /// The directory of the store a request names.
    fn store(&self, meta: &tonic::metadata::MetadataMap) -> Result<PathBuf, Status> {
        let id = meta
            .get(kiln_proto::metadata::STORE_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        self.stores.get(id).cloned().ok_or_else(|| {
            Status::not_found(format!("content store {id:?} is not served by this client"))
        })
    }
}

#[tonic::async_trait]
impl Content for ContentStores {
    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let dir = self.store(request.metadata())?;
        let digest = request.into_inner().digest;
        let path = blob_path(&dir, &digest)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Response::new(InfoResponse {
                info: Some(Info {
                    digest,
                    size: m.len() as i64,
                    ..Default::default()
                }),
            })),
            Ok(_) => Err(Status::not_found(format!("content {digest} not found"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Status::not_found(format!("content {digest} not found")))
            }
            Err(e) => Err(io_status("stat", &path, e)),
        }
    }

    async fn read(
        &self,
        request: Request<ReadContentRequest>,
    ) -> Result<Response<BoxStream<ReadContentResponse>>, Status> {
        let dir = self.store(request.metadata())?;
        let req = request.into_inner();
        let path = blob_path(&dir, &req.digest)?;
        if req.offset < 0 || req.size < 0 {
            return Err(Status::invalid_argument(format!(
                "read of {}: negative offset or size",
                req.digest
            )));
        }
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!(
                    "content {} not found",
                    req.digest
                )))
            }
            Err(e) => return Err(io_status("open", &path, e)),
        };
        file.seek(std::io::SeekFrom::Start(req.offset as u64))
            .await
            .map_err(|e| io_status("seek", &path, e))?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut offset = req.offset;
            let mut left = if req.size == 0 {
                u64::MAX
            } else {
                req.size as u64
            };
            while left > 0 {
                let mut buf = Vec::with_capacity(CHUNK);
                let want = left.min(CHUNK as u64);
                let n = match (&mut file).take(want).read_to_end(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(io_status("read", &path, e))).await;
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                let msg = ReadContentResponse { offset, data: buf };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                offset += n as i64;
                left -= n as u64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteContentRequest>>,
    ) -> Result<Response<BoxStream<WriteContentResponse>>, Status> {
        let dir = self.store(request.metadata())?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            if let Err(status) = ingest(&dir, &mut inbound, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Ingests live only as long as their `Write` stream: nothing is left to abort.
    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<()>, Status> {
        self.store(request.metadata())?;
        Ok(Response::new(()))
    }
}

/// One ongoing write: a temporary file inside the store, removed unless committed.
struct Ingest {
    file: tokio::fs::File,
    tmp: tempfile::TempPath,
    hasher: Sha256,
    offset: i64,
    total: i64,
    expected: String,
}

/// Runs one `Write` stream in lock-step: every request gets exactly one response.
async fn ingest(
    dir: &Path,
    inbound: &mut Streaming<WriteContentRequest>,
    tx: &mpsc::Sender<Result<WriteContentResponse, Status>>,
) -> Result<(), Status> {
    let mut cur: Option<Ingest> = None;
    // Set once the stream turned out to write a blob the store has: every later request
    // (a writer's STAT or COMMIT) gets the same full-size answer.
    let mut existing: Option<(String, i64)> = None;
    while let Some(req) = inbound.next().await {
        let req = req?;
        let action = WriteAction::try_from(req.action).map_err(|_| {
            Status::invalid_argument(format!("unknown write action {}", req.action))
        })?;
        if !req.expected.is_empty() {
            blob_path(dir, &req.expected)?;
        }
        if let Some((digest, size)) = &existing {
            let resp = WriteContentResponse {
                action: req.action,
                offset: *size,
                total: *size,
                digest: digest.clone(),
                ..Default::default()
            };
            if tx.send(Ok(resp)).await.is_err() || action == WriteAction::Commit {
                return Ok(());
            }
            continue;
        }
        if cur.is_none() {
            // An existing blob: answer with its full size so the writer skips it.
            if !req.expected.is_empty() {
                let path = blob_path(dir, &req.expected)?;
                if let Ok(m) = tokio::fs::metadata(&path).await {
                    if m.is_file() && (req.total <= 0 || req.total == m.len() as i64) {
                        let size = m.len() as i64;
                        let resp = WriteContentResponse {
                            action: req.action,
                            offset: size,
                            total: size,
                            digest: req.expected.clone(),
                            ..Default::default()
                        };
                        existing = Some((req.expected.clone(), size));
                        if tx.send(Ok(resp)).await.is_err() || action == WriteAction::Commit {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            let named = tempfile::Builder::new()
                .prefix(".kiln-ingest-")
                .tempfile_in(dir)
                .map_err(|e| io_status("create an ingest file in", dir, e))?;
            let (file, tmp) = named.into_parts();
            cur = Some(Ingest {
                file: tokio::fs::File::from_std(file),
                tmp,
                hasher: Sha256::new(),
                offset: 0,
                total: 0,
                expected: String::new(),
            });
        }
        let Some(ing) = cur.as_mut() else {
            return Err(Status::internal("no ingest"));
        };
        if req.total > 0 {
            ing.total = req.total;
        }
        if !req.expected.is_empty() {
            ing.expected = req.expected.clone();
        }
        if !req.data.is_empty() {
            if req.offset != ing.offset {
                return Err(Status::invalid_argument(format!(
                    "write of {:?} at offset {} but {} bytes are written",
                    req.r#ref, req.offset, ing.offset
                )));
            }
            ing.file
                .write_all(&req.data)
                .await
                .map_err(|e| io_status("write", &ing.tmp, e))?;
            ing.hasher.update(&req.data);
            ing.offset += req.data.len() as i64;
            if ing.total > 0 && ing.offset > ing.total {
                return Err(Status::invalid_argument(format!(
                    "write of {:?} exceeds its total of {} bytes",
                    req.r#ref, ing.total
                )));
            }
        }
        let mut resp = WriteContentResponse {
            action: req.action,
            offset: ing.offset,
            total: ing.total,
            ..Default::default()
        };
        if action == WriteAction::Commit {
            let Some(ing) = cur.take() else {
                return Err(Status::internal("no ingest"));
            };
            resp.digest = commit(dir, ing).await?;
            let _ = tx.send(Ok(resp)).await;
            return Ok(());
        }
        if tx.send(Ok(resp)).await.is_err() {
            return Ok(());
        }
    }
    // The stream ended without a commit: dropping the ingest removes its file.
    Ok(())
}

/// Verifies an ingest's size and digest and moves it into `blobs/sha256/`.
async fn commit(dir: &Path, mut ing: Ingest) -> Result<String, Status> {
    let digest = format!("sha256:{}", hex::encode(ing.hasher.finalize_reset()));
    if ing.total > 0 && ing.offset != ing.total {
        return Err(Status::failed_precondition(format!(
            "commit of {digest}: {} bytes written, {} expected",
            ing.offset, ing.total
        )));
    }
    if !ing.expected.is_empty() && ing.expected != digest {
        return Err(Status::failed_precondition(format!(
            "commit: content has digest {digest}, {} expected",
            ing.expected
        )));
    }
    ing.file
        .sync_all()
        .await
        .map_err(|e| io_status("sync", &ing.tmp, e))?;
    drop(ing.file);
    let dest = blob_path(dir, &digest)?;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io_status("create", parent, e))?;
    }
    ing.tmp
        .persist(&dest)
        .map_err(|e| io_status("rename into", &dest, e.error))?;
    Ok(digest)
}

fn with_store<T>(store_id: &str, msg: T) -> Result<Request<T>, SessionError> {
    let mut request = Request::new(msg);
    let value = store_id.parse().map_err(|_| {
        SessionError::protocol(format!("content store id {store_id:?} cannot be sent"))
    })?;
    request
        .metadata_mut()
        .insert(kiln_proto::metadata::STORE_ID, value);
    Ok(request)
}

fn client(channel: Channel) -> ContentClient<Channel> {
    ContentClient::new(channel)
        .max_decoding_message_size(super::transport::MAX_GRPC_MESSAGE)
        .max_encoding_message_size(super::transport::MAX_GRPC_MESSAGE)
}

/// Daemon side: uploads the file at `path` (`size` bytes, `digest`) into the client's
/// store `store_id`, unless the store already has it.
pub async fn write_blob(
    channel: Channel,
    store_id: &str,
    digest: &str,
    size: u64,
    path: &Path,
) -> Result<(), SessionError> {
    let call = |m: &str| format!("Content.{m}(store {store_id:?}, {digest})");
    let rpc = |m: &str, source| SessionError::Rpc {
        call: call(m),
        source,
    };
    let mut content = client(channel);
    let info = content
        .info(with_store(
            store_id,
            InfoRequest {
                digest: digest.to_string(),
            },
        )?)
        .await;
    match info {
        Ok(r) if r.get_ref().info.as_ref().map(|i| i.size) == Some(size as i64) => return Ok(()),
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(rpc("Info", s)),
    }
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| SessionError::io("open", path, e))?;
    let (tx, rx) = mpsc::channel::<WriteContentRequest>(1);
    let base = WriteContentRequest {
        r#ref: digest.to_string(),
        total: size as i64,
        expected: digest.to_string(),
        ..Default::default()
    };
    tx.send(WriteContentRequest {
        action: WriteAction::Stat as i32,
        ..base.clone()
    })
    .await
    .map_err(|_| SessionError::protocol(format!("{}: stream closed", call("Write"))))?;
    let mut inbound = content
        .write(with_store(store_id, ReceiverStream::new(rx))?)
        .await
        .map_err(|s| rpc("Write", s))?
        .into_inner();
    let closed =
        || SessionError::protocol(format!("{}: the client ended the stream", call("Write")));
    let stat = match inbound.message().await {
        // A containerd store refuses to open a writer for content it has.
        Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
        res => res.map_err(|s| rpc("Write", s))?.ok_or_else(closed)?,
    };
    if stat.offset == size as i64 && stat.digest == digest {
        return Ok(());
    }
    let mut offset = 0i64;
    loop {
        let mut buf = Vec::with_capacity(CHUNK);
        let n = (&mut file)
            .take(CHUNK as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| SessionError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        tx.send(WriteContentRequest {
            action: WriteAction::Write as i32,
            offset,
            data: buf,
            ..base.clone()
        })
        .await
        .map_err(|_| closed())?;
        offset += n as i64;
        let resp = inbound
            .message()
            .await
            .map_err(|s| rpc("Write", s))?
            .ok_or_else(closed)?;
        if resp.offset != offset {
            return Err(SessionError::protocol(format!(
                "{}: the client acknowledged offset {}, {offset} sent",
                call("Write"),
                resp.offset
            )));
        }
    }
    if offset != size as i64 {
        return Err(SessionError::protocol(format!(
            "{}: {} has {offset} bytes, {size} expected",
            call("Write"),
            path.display()
        )));
    }
    tx.send(WriteContentRequest {
        action: WriteAction::Commit as i32,
        offset,
        ..base.clone()
    })
    .await
    .map_err(|_| closed())?;
    let resp = inbound
        .message()
        .await
        .map_err(|s| rpc("Write", s))?
        .ok_or_else(closed)?;
    if resp.digest != digest {
        return Err(SessionError::protocol(format!(
            "{}: the client committed {:?}",
            call("Write"),
            resp.digest
        )));
    }
    Ok(())
}

/// Daemon side: downloads `digest` from the client's store `store_id` into `dest` and
/// returns its size once the digest is verified (`dest` is removed otherwise).
pub async fn read_blob(
    channel: Channel,
    store_id: &str,
    digest: &str,
    dest: &Path,
) -> Result<u64, SessionError> {
    let call = format!("Content.Read(store {store_id:?}, {digest})");
    if digest_hex(digest).is_none() {
        return Err(SessionError::protocol(format!(
            "{call}: digest is not sha256:<64 lowercase hex>"
        )));
    }
    let mut content = client(channel);
    let mut inbound = content
        .read(with_store(
            store_id,
            ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
        )?)
        .await
        .map_err(|source| SessionError::Rpc {
            call: call.clone(),
            source,
        })?
        .into_inner();
    let res = async {
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| SessionError::io("create", dest, e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(msg) = inbound
            .message()
            .await
            .map_err(|source| SessionError::Rpc {
                call: call.clone(),
                source,
            })?
        {
            if msg.offset != size as i64 {
                return Err(SessionError::protocol(format!(
                    "{call}: chunk at offset {}, {size} expected",
                    msg.offset
                )));
            }
            file.write_all(&msg.data)
                .await
                .map_err(|e| SessionError::io("write", dest, e))?;
            hasher.update(&msg.data);
            size += msg.data.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| SessionError::io("write", dest, e))?;
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != digest {
            return Err(SessionError::protocol(format!(
                "{call}: the content has digest {got}"
            )));
        }
        Ok(size)
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(dest).await;
    }
    res
}

#[cfg(test)]
mod tests;
