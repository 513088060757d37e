//! Outputs streamed back to the client over `moby.filesync.v1.FileSend.DiffCopy`
//! (shared/design/buildkit-wire.md §6.1). The daemon calls it on the build's session, one
//! call per output, naming the output by its index in `SolveRequest.Exporters`
//! (`buildkit-attachable-exporter-id`). The payload depends on the exporter, on the same
//! method: raw bytes in `BytesMessage` chunks for `tar`, `oci` and `docker`; fsutil
//! `Packet`s for `local`, with the daemon as sender and the client as receiver. A raw codec
//! lets one method carry both.
//!
//! * Daemon side: [`send_file`] and [`send_dir`].
//! * Client side: [`FileSendTargets`], a tonic service writing each output where the
//!   user asked (a file, stdout for `-`, or a directory it never writes outside of).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use kiln_proto::fsutil::types::Packet;
use kiln_proto::moby::buildkit::v1::BytesMessage;
use kiln_proto::prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::SessionError;

/// The method's path.
pub const DIFF_COPY: &str = "/moby.filesync.v1.FileSend/DiffCopy";
/// Size of each `BytesMessage` the daemon sends (BuildKit splits at 3 MiB).
const CHUNK: usize = 1 << 20;

/// A codec passing encoded protobuf messages through as bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

fn decode<M: Message + Default>(raw: Result<Bytes, Status>) -> Result<M, Status> {
    M::decode(raw?).map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))
}

/// Opens FileSend.DiffCopy for output `index`, with `md` as `exporter-md-*` headers.
async fn open(
    channel: Channel,
    index: usize,
    md: &BTreeMap<String, String>,
    outbound: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Result<Streaming<Bytes>, SessionError> {
    let call = || format!("FileSend.DiffCopy(output {index})");
    let mut request = Request::new(outbound);
    let meta = request.metadata_mut();
    let bad = |k: &str| SessionError::protocol(format!("header {k:?} cannot be sent"));
    meta.insert(
        kiln_proto::metadata::EXPORTER_ID,
        index.to_string().parse().map_err(|_| bad("exporter id"))?,
    );
    for (k, v) in md {
        let key = format!("{}{k}", kiln_proto::metadata::EXPORTER_MD_PREFIX);
        let name =
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()).map_err(|_| bad(&key))?;
        meta.insert(name, v.parse().map_err(|_| bad(&key))?);
    }
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(super::transport::MAX_GRPC_MESSAGE)
        .max_encoding_message_size(super::transport::MAX_GRPC_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| SessionError::protocol(format!("{}: {e}", call())))?;
    let path = http::uri::PathAndQuery::from_static(DIFF_COPY);
    Ok(grpc
        .streaming(request, path, RawCodec)
        .await
        .map_err(|source| SessionError::Rpc {
            call: call(),
            source,
        })?
        .into_inner())
}

/// Daemon side: streams the file at `path` to the client as output `index` (a `tar`,
/// `oci` or `docker` output), then half-closes and waits for the client to end the call.
pub async fn send_file(
    channel: Channel,
    index: usize,
    md: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(), SessionError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| SessionError::io("open", path, e))?;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let mut inbound = open(channel, index, md, ReceiverStream::new(rx)).await?;
    let rpc = |source| SessionError::Rpc {
        call: format!("FileSend.DiffCopy(output {index})"),
        source,
    };
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
        let msg = BytesMessage { data: buf }.encode_to_vec();
        if tx.send(Bytes::from(msg)).await.is_err() {
            // The client ended the call early: its status says why.
            break;
        }
    }
    drop(tx);
    while let Some(m) = inbound.next().await {
        m.map_err(rpc)?;
    }
    Ok(())
}

/// Daemon side: sends the directory `dir` to the client as output `index` (a `local`
/// output) with the fsutil sender protocol.
pub async fn send_dir(channel: Channel, index: usize, dir: &Path) -> Result<(), SessionError> {
    let (tx, rx) = mpsc::channel::<Result<Packet, Status>>(16);
    let outbound = ReceiverStream::new(rx)
        .filter_map(|p| async move { p.ok().map(|p| Bytes::from(p.encode_to_vec())) });
    let inbound = open(channel, index, &BTreeMap::new(), outbound).await?;
    let packets = inbound.map(decode::<Packet>);
    super::filesync::send_dir(dir.to_path_buf(), Box::pin(packets), tx).await
}

/// Where one output goes on the client.
#[derive(Debug, Clone)]
pub enum OutputTarget {
    /// A directory the `local` output is written into (created if missing).
    Dir(PathBuf),
    /// A file (`-` is stdout) the tarball is written to.
    File(PathBuf),
}

/// Client side: the `FileSend` service of a session, writing output `i` (the exporter's
/// index in the Solve) to its target. Outputs nobody asked for are refused.
#[derive(Debug, Clone, Default)]
pub struct FileSendTargets {
    targets: Arc<HashMap<usize, OutputTarget>>,
}

impl FileSendTargets {
    /// Targets by exporter index.
    pub fn new(targets: HashMap<usize, OutputTarget>) -> FileSendTargets {
        FileSendTargets {
            targets: Arc::new(targets),
        }
    }

    async fn diff_copy(
        &self,
        request: Request<Streaming<Bytes>>,
    ) -> Result<Response<futures::stream::BoxStream<'static, Result<Bytes, Status>>>, Status> {
        let index: usize = request
            .metadata()
            .get(kiln_proto::metadata::EXPORTER_ID)
            .map(|v| v.to_str().unwrap_or("x").parse())
            .unwrap_or(Ok(0))
            .map_err(|_| Status::invalid_argument("malformed buildkit-attachable-exporter-id"))?;
        let target = self.targets.get(&index).cloned().ok_or_else(|| {
            Status::already_exists(format!("no output {index} was asked for on this client"))
        })?;
        let mut inbound = request.into_inner();
        match target {
            OutputTarget::File(path) => {
                // Answer at once: the daemon waits for the response headers before it
                // sends. The response stream ends when the file is written, or carries
                // the error that stopped it.
                let (tx, rx) = mpsc::channel::<Result<Bytes, Status>>(1);
                tokio::spawn(async move {
                    if let Err(e) = write_file(&path, &mut inbound).await {
                        tracing::error!(path = %path.display(), error = %e.message(), "receiving an output");
                        let _ = tx.send(Err(e)).await;
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx).boxed()))
            }
            OutputTarget::Dir(dir) => {
                let (tx, rx) = mpsc::unbounded_channel::<Packet>();
                let outbound = UnboundedReceiverStream::new(rx)
                    .map(|p| Ok(Bytes::from(p.encode_to_vec())))
                    .boxed();
                tokio::spawn(async move {
                    let mut packets = Box::pin(inbound.map(decode::<Packet>));
                    if let Err(e) = super::filesync::receive_stream(&mut packets, tx, &dir).await {
                        tracing::error!(dir = %dir.display(), error = %e, "receiving a local output");
                    }
                });
                Ok(Response::new(outbound))
            }
        }
    }
}

/// Writes the byte chunks of one output to `path` (`-`: stdout).
async fn write_file(path: &Path, inbound: &mut Streaming<Bytes>) -> Result<(), Status> {
    let failed =
        |what: &str, e: std::io::Error| Status::internal(format!("{what} {}: {e}", path.display()));
    let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if path == Path::new("-") {
        Box::new(tokio::io::stdout())
    } else {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| failed("creating the directory of", e))?;
        }
        Box::new(
            tokio::fs::File::create(path)
                .await
                .map_err(|e| failed("creating", e))?,
        )
    };
    while let Some(raw) = inbound.next().await {
        let msg: BytesMessage = decode(raw)?;
        out.write_all(&msg.data)
            .await
            .map_err(|e| failed("writing", e))?;
    }
    out.flush().await.map_err(|e| failed("writing", e))
}

impl tonic::server::NamedService for FileSendTargets {
    const NAME: &'static str = "moby.filesync.v1.FileSend";
}

impl<B> tower::Service<http::Request<B>> for FileSendTargets
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            if req.uri().path() != DIFF_COPY {
                return Ok(
                    Status::unimplemented(format!("{} is not served", req.uri().path()))
                        .into_http(),
                );
            }
            let svc = tower::service_fn(move |r: Request<Streaming<Bytes>>| {
                let me = me.clone();
                async move { me.diff_copy(r).await }
            });
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(super::transport::MAX_GRPC_MESSAGE)
                .max_encoding_message_size(super::transport::MAX_GRPC_MESSAGE);
            Ok(grpc.streaming(svc, req).await)
        })
    }
}
