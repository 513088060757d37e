//! Per-RPC forwarding: the gateway's `moby.buildkit.v1.Control` service (Session held and
//! late-bound, its open on the worker being the liveness proof of the Solve's worker;
//! Solve routed by key; Status and history by ref, a ref no longer pinned being looked for
//! in every worker's history; node-wide calls fanned out),
//! a byte-level pass-through of `moby.buildkit.v1.frontend.LLBBridge` routed by the
//! `buildkit-controlapi-buildid` header, and the gateway's own gRPC health service.
//! Errors become `tonic::Status` here and nowhere else.
//!
//! Uses [`crate::route`], [`crate::health`] and [`crate::metrics`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::grpc::health::v1 as health;
use kiln_proto::metadata as md;
use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::frontend as gw;
use kiln_proto::telemetry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::{http, BoxFuture, BoxStream, Service};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::health::{InflightGuard, Pool, Worker};
use crate::metrics::Metrics;
use crate::route::{self, Accept, BindOutcome, KeyKind, RefWorker, Routes, SessionStart};

/// Timeouts of the proxy (defaults follow BuildKit's own tolerances, see [`crate::route`]).
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// How long Status/LLBBridge/history calls wait for their build's worker.
    pub pin_wait: Duration,
    /// How long a Session stream is held waiting for its Solve.
    pub session_hold: Duration,
    /// How long a Solve without an explicit or VCS key waits for its Session stream, to
    /// read the session's shared key.
    pub session_key_wait: Duration,
    /// How long a Solve waits for its released Session stream to be accepted by the worker.
    pub session_open: Duration,
    /// How long a Solve waits in a worker's admission queue before it fails with
    /// `resource_exhausted`.
    pub queue: Duration,
    /// How long Status/LLBBridge calls wait for their build's pin before the workers'
    /// histories are searched for the ref (history calls search at once).
    pub probe_after: Duration,
}

/// Default [`Timeouts::queue`].
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            pin_wait: route::DEFAULT_PIN_WAIT,
            session_hold: route::DEFAULT_SESSION_HOLD,
            session_key_wait: Duration::from_secs(2),
            session_open: Duration::from_secs(10),
            queue: DEFAULT_QUEUE_TIMEOUT,
            probe_after: Duration::from_secs(1),
        }
    }
}

/// Everything the services share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The workers.
    pub pool: Pool,
    /// The pin tables.
    pub routes: Routes,
    /// Metrics.
    pub metrics: Metrics,
    /// Timeouts.
    pub timeouts: Timeouts,
}

/// How long a worker may take to say whether it has a history record of a build.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the end of a client's Session stream is watched for a reset before it is
/// forwarded as a half-close.
const RESET_GRACE: Duration = Duration::from_millis(50);

/// Headers never copied from one hop to the next by the typed services: the transport
/// sets its own, and the gateway re-encodes messages uncompressed.
const HOP_HEADERS: &[&str] = &[
    "grpc-encoding",
    "grpc-accept-encoding",
    "content-length",
    "user-agent",
];

fn forward_metadata(from: &MetadataMap, drop_timeout: bool) -> MetadataMap {
    let mut headers = from.clone().into_headers();
    for h in HOP_HEADERS {
        headers.remove(*h);
    }
    if drop_timeout {
        headers.remove("grpc-timeout");
    }
    MetadataMap::from_headers(headers)
}

fn request_with<T>(metadata: &MetadataMap, msg: T, drop_timeout: bool) -> Request<T> {
    Request::from_parts(
        forward_metadata(metadata, drop_timeout),
        Default::default(),
        msg,
    )
}

fn response_with<T>(upstream: Response<impl Sized>, msg: T) -> Response<T> {
    let (metadata, _, ext) = upstream.into_parts();
    Response::from_parts(forward_metadata(&metadata, true), msg, ext)
}

/// True when `s` says the worker could not be reached or the connection broke, as
/// opposed to an answer from the worker.
fn is_transport_error(s: &Status) -> bool {
    use std::error::Error as _;
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled | Code::Internal => {
            s.source().is_some()
                || s.message().contains("transport error")
                || s.message().contains("h2 protocol error")
                || s.message().contains("connection")
        }
        _ => false,
    }
}

/// The worker's error with the worker named when the fault is the connection's.
fn name_worker(worker: &Worker, what: &str, s: Status) -> Status {
    if is_transport_error(&s) {
        Status::unavailable(format!(
            "worker {} failed during {what}: {}",
            worker.describe(),
            s.message()
        ))
    } else {
        s
    }
}

fn control(worker: &Worker) -> api::control_client::ControlClient<tonic::transport::Channel> {
    api::control_client::ControlClient::new(worker.channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

// === impl Proxy ===

impl Proxy {
    /// The tonic Control server.
    pub fn control_server(&self) -> api::control_server::ControlServer<Proxy> {
        api::control_server::ControlServer::new(self.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The LLBBridge pass-through service.
    pub fn bridge_server(&self) -> BridgeProxy {
        BridgeProxy {
            proxy: self.clone(),
            pongs: Arc::default(),
        }
    }

    /// The gateway's own health service (SERVING while some worker takes builds).
    pub fn health_server(&self) -> health::health_server::HealthServer<GatewayHealth> {
        health::health_server::HealthServer::new(GatewayHealth {
            pool: self.pool.clone(),
        })
    }

    /// The worker of build `r#ref`, waiting for its Solve if needed. When the gateway has
    /// no pin for the ref after `probe_after` (a build that finished before the pin
    /// expired or the gateway restarted), every healthy worker is asked for its history
    /// record of the ref, and the one that has it answers.
    async fn worker_for_ref(
        &self,
        rpc: &str,
        r#ref: &str,
        probe_after: Duration,
    ) -> Result<Arc<Worker>, Status> {
        Ok(self
            .find_worker(rpc, r#ref, probe_after, Accept::Pinned)
            .await?
            .worker)
    }

    /// [`Proxy::worker_for_ref`], also taking a worker the build is not yet pinned to as
    /// `accept` allows.
    async fn find_worker(
        &self,
        rpc: &str,
        r#ref: &str,
        probe_after: Duration,
        accept: Accept,
    ) -> Result<RefWorker, Status> {
        if r#ref.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{rpc}: no build ref to route by"
            )));
        }
        let start = Instant::now();
        if let Some(w) = self.routes.worker_of(r#ref, Duration::ZERO, accept).await {
            return Ok(w);
        }
        let pinned = self.routes.worker_of(r#ref, self.timeouts.pin_wait, accept);
        let probe = async {
            tokio::time::sleep(probe_after).await;
            self.find_ref(r#ref).await
        };
        tokio::pin!(pinned, probe);
        let (found, probed) = tokio::select! {
            w = &mut pinned => (w, false),
            // A probe that finds nothing leaves the pin to come (a Solve on its way).
            Some(w) = &mut probe => {
                let worker = self.routes.adopt_ref(r#ref, &w);
                (Some(RefWorker { worker, pinned: true }), true)
            }
        };
        let outcome = match (&found, probed) {
            (Some(_), true) => "history",
            (Some(_), false) => "found",
            (None, _) => "timeout",
        };
        self.metrics.pin_wait(rpc, outcome, start.elapsed());
        found.ok_or_else(|| {
            Status::not_found(format!(
                "{rpc}: no build with ref {build} reached the gateway within {:?}, and no worker has a record of it",
                self.timeouts.pin_wait,
                build = r#ref
            ))
        })
    }

    /// The healthy worker that has a history record (running or finished) of build
    /// `r#ref`, asking them all at once; `None` when none has.
    async fn find_ref(&self, r#ref: &str) -> Option<Arc<Worker>> {
        let results = self
            .fan_out("find_ref", |w| {
                let req = api::BuildHistoryRequest {
                    r#ref: r#ref.to_string(),
                    early_exit: true,
                    ..Default::default()
                };
                async move {
                    let call = async {
                        let mut s = control(&w).listen_build_history(req).await?.into_inner();
                        while let Some(ev) = s.next().await {
                            if ev?.record.is_some_and(|r| r.r#ref == r#ref) {
                                return Ok(true);
                            }
                        }
                        Ok(false)
                    };
                    tokio::time::timeout(PROBE_TIMEOUT, call)
                        .await
                        .unwrap_or_else(|_| {
                            Err(Status::deadline_exceeded(format!(
                                "no answer within {PROBE_TIMEOUT:?}"
                            )))
                        })
                }
            })
            .await;
        let mut found = None;
        for (w, r) in results {
            match r {
                Ok(true) if found.is_none() => found = Some(w),
                Ok(true) => {
                    tracing::warn!(r#ref, worker = %w.name, "another worker also has a record of the build; using the first")
                }
                Ok(false) => {}
                Err(s) => {
                    tracing::debug!(r#ref, worker = %w.name, status = %s, "history probe failed")
                }
            }
        }
        if let Some(w) = &found {
            tracing::info!(r#ref, worker = %w.name, "unpinned build found in a worker's history");
        }
        found
    }

    /// Picks a live worker for `key` (skipping those in `tried`) and starts opening the
    /// build's Session stream there; the open's outcome arrives on the returned receiver
    /// (see [`Proxy::open_result`]). When the stream is held at the gateway, the worker's
    /// answer to its open (response headers) proves the worker alive: no health check
    /// first. `retry` is a held stream whose open failed on an earlier worker; it is
    /// offered to the new one with every byte the client sent. Without a held stream (no
    /// session, or the Solve came first) the worker is health-checked instead.
    async fn pick_and_open(
        &self,
        req: &api::SolveRequest,
        key: &str,
        tried: &mut Vec<String>,
        mut retry: Option<tokio::sync::oneshot::Sender<route::Binding>>,
    ) -> Result<(Arc<Worker>, InflightGuard, Option<OpenWait>), Status> {
        loop {
            let Some((w, guard)) = self.pool.pick(key, tried) else {
                let detail = if tried.is_empty() {
                    String::new()
                } else {
                    format!(" (unreachable: {})", tried.join(", "))
                };
                return Err(Status::unavailable(format!(
                    "no healthy worker can take the build{detail}"
                )));
            };
            self.routes.expect_ref(&req.r#ref, &w);
            let has_session = !req.session.is_empty();
            let held = retry.is_some() || (has_session && self.routes.session_held(&req.session));
            if !held {
                if let Err(e) = w.check().await {
                    self.pool.eject(&w, &format!("before solve: {e}"));
                    tried.push(w.name.clone());
                    continue;
                }
            }
            if !has_session {
                return Ok((w, guard, None));
            }
            let opened = match retry.take() {
                Some(tx) => {
                    self.routes.rebind_session(&req.session, &w);
                    let (otx, orx) = tokio::sync::oneshot::channel();
                    let binding = route::Binding {
                        worker: w.clone(),
                        opened: otx,
                    };
                    if tx.send(binding).is_err() {
                        return Err(Status::cancelled(format!(
                            "build {}: the client closed session {} while the gateway re-opened it",
                            req.r#ref, req.session
                        )));
                    }
                    orx
                }
                None => match self.routes.bind_session(&req.session, &w) {
                    BindOutcome::Released(rx) => rx,
                    BindOutcome::Prebound => return Ok((w, guard, None)),
                    BindOutcome::AlreadyBound(other) => {
                        if other.name != w.name {
                            tracing::warn!(
                                r#ref = %req.r#ref,
                                session = %req.session,
                                session_worker = %other.name,
                                worker = %w.name,
                                "the build's session lives on another worker"
                            );
                        }
                        return Ok((w, guard, None));
                    }
                },
            };
            return Ok((w, guard, Some(opened)));
        }
    }

    /// Waits for the build's Session stream to open on `worker`. A worker that never
    /// answered is ejected and the stream offered back ([`Opened::Again`]); one that
    /// refused it fails the build; one that takes longer than the open timeout keeps the
    /// build (the Solve goes on there).
    async fn open_result(
        &self,
        req: &api::SolveRequest,
        worker: &Worker,
        opened: OpenWait,
    ) -> Result<Opened, Status> {
        match tokio::time::timeout(self.timeouts.session_open, opened).await {
            Ok(Ok(Ok(()))) => Ok(Opened::Yes),
            Ok(Ok(Err(route::OpenFailed {
                reason,
                retry: Some(tx),
            }))) => {
                self.pool
                    .eject(worker, &format!("session open before solve: {reason}"));
                Ok(Opened::Again(tx))
            }
            Ok(Ok(Err(route::OpenFailed {
                reason,
                retry: None,
            }))) => Err(Status::unavailable(format!(
                "build {}: session {} could not be opened on worker {}: {reason}",
                req.r#ref,
                req.session,
                worker.describe()
            ))),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    r#ref = %req.r#ref,
                    session = %req.session,
                    "session stream did not confirm; forwarding the solve anyway"
                );
                Ok(Opened::Yes)
            }
        }
    }

    /// Opens a Session stream on `worker`, reports the result on `opened` and hands the
    /// worker's side to the client's response (`handoff`). When the worker never answers the open
    /// and a Solve waits on `opened`, the stream is offered for re-binding and, given a new
    /// worker, replays the client's bytes there. When the client cancels (`cancelled`
    /// fires) or goes away (`out` closes), the worker's stream is reset (RST_STREAM).
    async fn run_session(
        mut worker: Arc<Worker>,
        metadata: MetadataMap,
        inbound: Replay,
        out: mpsc::Sender<Result<api::BytesMessage, Status>>,
        handoff: tokio::sync::oneshot::Sender<Upstream>,
        mut opened: Option<tokio::sync::oneshot::Sender<Result<(), route::OpenFailed>>>,
        cancelled: impl std::future::Future<Output = Status>,
    ) {
        tokio::pin!(cancelled);
        let (upstream, cancel) = loop {
            let mut req = request_with(&metadata, inbound.attempt(), true);
            telemetry::inject(&tracing::Span::current(), req.metadata_mut());
            let cancel = req.cancellation_handle();
            let mut client = control(&worker);
            let upstream = tokio::select! {
                r = client.session(req) => r,
                _ = out.closed() => {
                    cancel.cancel();
                    if let Some(o) = opened {
                        let _ = o.send(Err(route::OpenFailed {
                            reason: "the client closed the session".into(),
                            retry: None,
                        }));
                    }
                    return;
                }
            };
            match upstream {
                Ok(r) => {
                    inbound.opened();
                    if let Some(o) = opened {
                        let _ = o.send(Ok(()));
                    }
                    break (r.into_inner(), cancel);
                }
                Err(s) if is_transport_error(&s) && opened.is_some() => {
                    // Nothing reached a worker that answered: offer the stream again.
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if let Some(o) = opened.take() {
                        let _ = o.send(Err(route::OpenFailed {
                            reason: s.message().to_string(),
                            retry: Some(tx),
                        }));
                    }
                    tokio::select! {
                        b = rx => match b {
                            Ok(b) => {
                                tracing::info!(from = %worker.name, to = %b.worker.name, "re-opening the session on another worker");
                                worker = b.worker;
                                opened = Some(b.opened);
                            }
                            Err(_) => {
                                let _ = out.send(Err(name_worker(&worker, "the session", s))).await;
                                return;
                            }
                        },
                        _ = out.closed() => return,
                        _ = &mut cancelled => return,
                    }
                }
                Err(s) => {
                    let s = name_worker(&worker, "the session", s);
                    if let Some(o) = opened {
                        let _ = o.send(Err(route::OpenFailed {
                            reason: s.message().to_string(),
                            retry: None,
                        }));
                    }
                    let _ = out.send(Err(s)).await;
                    return;
                }
            }
        };
        // The worker's messages go to the client's response directly (no task in
        // between); this task stays to reset the worker's stream when the client cancels or
        // its response goes away.
        let up = Upstream {
            stream: upstream,
            worker: worker.clone(),
        };
        if handoff.send(up).is_err() {
            cancel.cancel();
            return;
        }
        tokio::select! {
            _ = out.closed() => cancel.cancel(),
            s = &mut cancelled => {
                tracing::debug!(worker = %worker.name, status = %s, "client cancelled the session");
                cancel.cancel();
            }
        }
    }

    /// The routing decision of a Solve: worker, in-flight guard, key kind and key, and the
    /// open of the build's Session stream on the worker when it is under way.
    async fn choose(&self, req: &api::SolveRequest) -> Result<Choice, Status> {
        if !req.session.is_empty() {
            if let Some(w) = self.routes.session_worker(&req.session) {
                // An earlier Solve bound this session; the build must reach it there.
                let key = route::session_key(&req.session).to_string();
                if w.is_healthy() {
                    if let Some(guard) = self.pool.pin(&w) {
                        return Ok(Choice {
                            worker: w,
                            guard,
                            kind: KeyKind::SessionPinned,
                            key,
                            opening: None,
                        });
                    }
                }
            }
        }
        let (kind, key) = match route::request_key(req) {
            Some(k) => k,
            None => {
                let shared = if req.session.is_empty() {
                    None
                } else {
                    self.routes
                        .held_shared_key(&req.session, self.timeouts.session_key_wait)
                        .await
                };
                route::route_key(req, shared.as_deref())
            }
        };
        // Raw LLB without a session: any consistent choice will do.
        let (kind, key) = if key.is_empty() {
            (KeyKind::Session, req.r#ref.clone())
        } else {
            (kind, key)
        };
        let (worker, guard, opening) = self.pick_and_open(req, &key, &mut Vec::new(), None).await?;
        Ok(Choice {
            worker,
            guard,
            kind,
            key,
            opening,
        })
    }

    /// The build is routed for good to `worker`: counted, logged and, unless it waits in
    /// the worker's queue, pinned (its Status and LLBBridge calls go there).
    fn routed(&self, req: &api::SolveRequest, c: &Choice, queued: bool) {
        if !queued {
            self.routes.pin_ref(&req.r#ref, &c.worker);
        }
        self.metrics.routed(&c.worker.name, c.kind.as_str());
        tracing::info!(
            r#ref = %req.r#ref,
            worker = %c.worker.name,
            key_kind = c.kind.as_str(),
            key = %c.key,
            queued,
            "routed build"
        );
    }

    /// Sends the Solve to the chosen worker. While the build's Session open there is
    /// unanswered, the Solve goes at once, beside it, and bridge calls may follow it
    /// ([`Accept::Forwarded`]); should the worker never answer the open, the Solve is
    /// dropped and the stream offered back ([`Attempt::Again`]).
    async fn forward_solve(
        &self,
        req: &api::SolveRequest,
        c: &mut Choice,
        metadata: &MetadataMap,
    ) -> Result<Attempt, Status> {
        let queued = c.guard.is_queued();
        if queued {
            // A queued build's Session opens first; only the Solve waits for a slot.
            if let Some(o) = c.opening.take() {
                if let Opened::Again(tx) = self.open_result(req, &c.worker, o).await? {
                    return Ok(Attempt::Again(tx));
                }
            }
            // Its Status/LLBBridge calls wait at the gateway until it is admitted.
            self.routes.queue_ref(&req.r#ref);
            let _queued_ref = QueuedRef {
                routes: self.routes.clone(),
                r#ref: req.r#ref.clone(),
            };
            self.routed(req, c, true);
            tracing::info!(
                r#ref = %req.r#ref,
                worker = %c.worker.name,
                limit = c.worker.limit(),
                queued = c.worker.queued(),
                "worker at its build limit; build queued at the gateway"
            );
            if let Err(t) = c.guard.admit(self.timeouts.queue).await {
                return Err(Status::resource_exhausted(format!(
                    "build {}: worker {} stayed at its limit of {} concurrent builds; waited {:.1?} in the gateway's queue (--queue-timeout {:?})",
                    req.r#ref,
                    c.worker.describe(),
                    c.worker.limit(),
                    t.waited,
                    self.timeouts.queue,
                )));
            }
            self.routes.pin_ref(&req.r#ref, &c.worker);
        } else if c.opening.is_some() {
            self.routes.forwarded_ref(&req.r#ref, &c.worker);
        } else {
            self.routed(req, c, false);
        }
        let span = tracing::info_span!(
            "proxy.solve",
            r#ref = %req.r#ref,
            worker = %c.worker.name,
            key_kind = c.kind.as_str(),
            key = %c.key
        );
        telemetry::set_parent(&span, telemetry::extract(metadata));
        let mut fwd = request_with(metadata, req.clone(), false);
        telemetry::inject(&span, fwd.metadata_mut());
        let mut client = control(&c.worker);
        let call = client.solve(fwd).instrument(span);
        let Some(opening) = c.opening.take() else {
            return Ok(Attempt::Done(call.await));
        };
        tokio::pin!(call);
        let open = self.open_result(req, &c.worker, opening);
        tokio::pin!(open);
        let res = tokio::select! {
            o = &mut open => match o? {
                Opened::Yes => {
                    self.routed(req, c, false);
                    return Ok(Attempt::Done(call.await));
                }
                Opened::Again(tx) => return Ok(Attempt::Again(tx)),
            },
            r = &mut call => r,
        };
        // The Solve ended before the open was known. When the worker could not be
        // reached at all, the open decides whether the build moves on.
        if matches!(&res, Err(s) if is_transport_error(s)) {
            if let Opened::Again(tx) = open.await? {
                return Ok(Attempt::Again(tx));
            }
        }
        self.routed(req, c, false);
        Ok(Attempt::Done(res))
    }

    /// Fans a unary call out to every healthy worker.
    async fn fan_out<T, F, Fut>(
        &self,
        rpc: &'static str,
        call: F,
    ) -> Vec<(Arc<Worker>, Result<T, Status>)>
    where
        F: Fn(Arc<Worker>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let workers: Vec<Arc<Worker>> = self
            .pool
            .workers()
            .into_iter()
            .filter(|w| w.is_healthy())
            .collect();
        let calls = workers.into_iter().map(|w| {
            let span = tracing::info_span!("proxy.fan_out", rpc, worker = %w.name);
            let fut = call(w.clone()).instrument(span);
            async move { (w, fut.await) }
        });
        futures::future::join_all(calls).await
    }
}

/// One combined error for a fan-out in which every worker failed.
fn all_failed<T>(rpc: &str, results: Vec<(Arc<Worker>, Result<T, Status>)>) -> Status {
    if results.is_empty() {
        return Status::unavailable(format!("{rpc}: no healthy worker"));
    }
    if results
        .iter()
        .all(|(_, r)| matches!(r, Err(s) if s.code() == Code::Unimplemented))
    {
        return Status::unimplemented(format!("{rpc}: no worker implements it"));
    }
    let detail: Vec<String> = results
        .into_iter()
        .filter_map(|(w, r)| {
            r.err()
                .map(|e| format!("{}: {}", w.describe(), e.message()))
        })
        .collect();
    Status::unavailable(format!(
        "{rpc} failed on every worker: {}",
        detail.join("; ")
    ))
}

/// The outcome of a build's Session open on its worker (see [`Proxy::open_result`]).
type OpenWait = tokio::sync::oneshot::Receiver<Result<(), route::OpenFailed>>;

/// A Solve's routing decision.
struct Choice {
    worker: Arc<Worker>,
    guard: InflightGuard,
    kind: KeyKind,
    key: String,
    /// The build's Session stream being opened on `worker`.
    opening: Option<OpenWait>,
}

/// What became of a Session open.
enum Opened {
    /// The worker accepted the stream, or took too long to say (the build stays there).
    Yes,
    /// The worker never answered: the stream, with the client's bytes, can be bound to
    /// another worker through this sender.
    Again(tokio::sync::oneshot::Sender<route::Binding>),
}

/// What became of a forwarded Solve.
enum Attempt {
    /// The worker's answer.
    Done(Result<Response<api::SolveResponse>, Status>),
    /// The worker never answered the Session's open; the Solve was dropped there.
    Again(tokio::sync::oneshot::Sender<route::Binding>),
}

/// The worker's side of an open Session stream.
struct Upstream {
    stream: tonic::Streaming<api::BytesMessage>,
    worker: Arc<Worker>,
}

/// The client's side of a Session stream: the gateway's own messages (an error before or
/// instead of an open) until the worker's stream is handed over, then the worker's
/// messages, read directly from it.
struct SessionOut {
    own: mpsc::Receiver<Result<api::BytesMessage, Status>>,
    handoff: Option<tokio::sync::oneshot::Receiver<Upstream>>,
    up: Option<Upstream>,
    done: bool,
    /// Dropped with the response: tells the reader of the client's stream that the
    /// client reset the call.
    _gone: tokio::sync::oneshot::Sender<()>,
}

impl futures::Stream for SessionOut {
    type Item = Result<api::BytesMessage, Status>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use std::future::Future as _;
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(up) = &mut this.up {
                return match up.stream.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(m))) => Poll::Ready(Some(Ok(m))),
                    Poll::Ready(Some(Err(s))) => {
                        this.done = true;
                        Poll::Ready(Some(Err(name_worker(&up.worker, "the session", s))))
                    }
                    // The worker ended the stream: so do we (OK).
                    Poll::Ready(None) => {
                        this.done = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            if let Some(h) = &mut this.handoff {
                match std::pin::Pin::new(h).poll(cx) {
                    Poll::Ready(Ok(up)) => {
                        this.up = Some(up);
                        this.handoff = None;
                        continue;
                    }
                    Poll::Ready(Err(_)) => this.handoff = None,
                    Poll::Pending => {}
                }
            }
            return this.own.poll_recv(cx);
        }
    }
}

/// The client-to-worker side of a Session stream, shared by the attempts to open it on a
/// worker: until a worker answers, every message handed to an attempt is kept, so that a
/// later attempt (on the next worker) starts with the same bytes. Cheap to clone.
#[derive(Clone)]
struct Replay(Arc<std::sync::Mutex<ReplayState>>);

struct ReplayState {
    /// The client's stream, read directly by the current attempt.
    inbound: tonic::Streaming<api::BytesMessage>,
    phase: InPhase,
    /// Where a client's cancellation goes (the forwarder then resets the worker's stream).
    cancel: Option<tokio::sync::oneshot::Sender<Status>>,
    /// Ready (closed) once the client's response is dropped.
    gone: tokio::sync::oneshot::Receiver<()>,
    /// Messages handed out while no worker had answered.
    early: Vec<api::BytesMessage>,
    recording: bool,
    /// The current attempt; earlier ones end.
    attempt: u64,
}

/// Where the client's stream is.
enum InPhase {
    Open,
    /// The client's stream ended: a reset or a half-close? hyper reports a client's
    /// RST_STREAM(CANCEL) as the end of the body, like a half-close; the reset also drops
    /// the response stream at once, so a moment's look tells the two apart.
    Grace(std::pin::Pin<Box<tokio::time::Sleep>>),
    HalfClosed,
    /// Cancelled: the worker-bound side stays open until the forwarder resets it, so the
    /// worker sees a cancellation, not a half-close.
    Cancelled,
}

impl ReplayState {
    fn cancelled(&mut self, s: Status) {
        self.phase = InPhase::Cancelled;
        if let Some(tx) = self.cancel.take() {
            let _ = tx.send(s);
        }
    }
}

/// One attempt's request stream: the kept messages, then the live ones.
struct ReplayStream {
    shared: Replay,
    attempt: u64,
    pos: usize,
}

impl Replay {
    fn new(
        inbound: tonic::Streaming<api::BytesMessage>,
        cancel: tokio::sync::oneshot::Sender<Status>,
        gone: tokio::sync::oneshot::Receiver<()>,
    ) -> Replay {
        Replay(Arc::new(std::sync::Mutex::new(ReplayState {
            inbound,
            phase: InPhase::Open,
            cancel: Some(cancel),
            gone,
            early: Vec::new(),
            recording: true,
            attempt: 0,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new attempt's stream; earlier attempts' streams end.
    fn attempt(&self) -> ReplayStream {
        let mut st = self.lock();
        st.attempt += 1;
        ReplayStream {
            shared: self.clone(),
            attempt: st.attempt,
            pos: 0,
        }
    }

    /// A worker answered: messages are no longer kept.
    fn opened(&self) {
        self.lock().recording = false;
    }
}

impl futures::Stream for ReplayStream {
    type Item = api::BytesMessage;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use std::future::Future as _;
        let this = self.get_mut();
        let mut st = this.shared.lock();
        if st.attempt != this.attempt {
            return Poll::Ready(None);
        }
        if this.pos < st.early.len() {
            let m = st.early[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(m));
        }
        if !st.recording && !st.early.is_empty() {
            // Replayed in full to the worker that answered: no longer needed.
            st.early = Vec::new();
            this.pos = 0;
        }
        let st = &mut *st;
        loop {
            match &mut st.phase {
                InPhase::Cancelled => return Poll::Pending,
                InPhase::HalfClosed => return Poll::Ready(None),
                InPhase::Grace(sleep) => {
                    if std::pin::Pin::new(&mut st.gone).poll(cx).is_ready() {
                        st.cancelled(Status::cancelled("the client reset the session"));
                        return Poll::Pending;
                    }
                    if sleep.as_mut().poll(cx).is_ready() {
                        st.phase = InPhase::HalfClosed;
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
                InPhase::Open => match st.inbound.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(m))) => {
                        if st.recording {
                            st.early.push(m.clone());
                            this.pos += 1;
                        }
                        return Poll::Ready(Some(m));
                    }
                    Poll::Ready(Some(Err(s))) => {
                        st.cancelled(s);
                        return Poll::Pending;
                    }
                    Poll::Ready(None) => {
                        st.phase = InPhase::Grace(Box::pin(tokio::time::sleep(RESET_GRACE)));
                    }
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

/// Takes a queued build's ref out of the queued set when the Solve stops waiting (admitted
/// builds are pinned first, so this is a no-op for them).
struct QueuedRef {
    routes: Routes,
    r#ref: String,
}

impl Drop for QueuedRef {
    fn drop(&mut self) {
        self.routes.unqueue_ref(&self.r#ref);
    }
}

/// Label put on every record of an aggregated ListWorkers answer: the worker's name.
pub const WORKER_LABEL: &str = "org.kiln.gateway.worker";

#[tonic::async_trait]
impl api::control_server::Control for Proxy {
    async fn solve(
        &self,
        request: Request<api::SolveRequest>,
    ) -> Result<Response<api::SolveResponse>, Status> {
        let start = Instant::now();
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        if req.r#ref.is_empty() {
            return Err(Status::invalid_argument("solve: ref is required"));
        }
        let mut c = self.choose(&req).await?;
        let mut tried = Vec::new();
        let res = loop {
            match self.forward_solve(&req, &mut c, &metadata).await? {
                Attempt::Done(res) => break res,
                Attempt::Again(tx) => {
                    tried.push(c.worker.name.clone());
                    self.metrics.resent("solve");
                    let (worker, guard, opening) = self
                        .pick_and_open(&req, &c.key, &mut tried, Some(tx))
                        .await?;
                    c = Choice {
                        worker,
                        guard,
                        opening,
                        ..c
                    };
                }
            }
        };
        let Choice {
            worker,
            guard,
            kind,
            ..
        } = c;
        let build = req.r#ref;
        self.metrics.latency("solve", start.elapsed());
        drop(guard);
        self.routes.ref_done(&build);
        let up = match res {
            Ok(r) => r,
            Err(s) => {
                if is_transport_error(&s) {
                    self.pool
                        .eject(&worker, &format!("build {build} failed: {}", s.message()));
                }
                let mut s = name_worker(&worker, &format!("build {build}"), s);
                if let Ok(v) = MetadataValue::try_from(worker.name.as_str()) {
                    s.metadata_mut().insert(route::WORKER_HEADER, v);
                }
                return Err(s);
            }
        };
        let (meta, msg, ext) = up.into_parts();
        let mut resp = Response::from_parts(forward_metadata(&meta, true), msg, ext);
        if let Ok(v) = MetadataValue::try_from(worker.name.as_str()) {
            resp.metadata_mut().insert(route::WORKER_HEADER, v);
        }
        resp.metadata_mut().insert(
            route::KEY_KIND_HEADER,
            MetadataValue::from_static(kind.as_str()),
        );
        Ok(resp)
    }

    async fn status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<BoxStream<api::StatusResponse>>, Status> {
        let start = Instant::now();
        let worker = self
            .worker_for_ref(
                "status",
                &request.get_ref().r#ref,
                self.timeouts.probe_after,
            )
            .await?;
        let (metadata, _, msg) = request.into_parts();
        let span = tracing::info_span!("proxy.status", r#ref = %msg.r#ref, worker = %worker.name);
        telemetry::set_parent(&span, telemetry::extract(&metadata));
        let mut fwd = request_with(&metadata, msg, false);
        telemetry::inject(&span, fwd.metadata_mut());
        let up = control(&worker)
            .status(fwd)
            .instrument(span)
            .await
            .map_err(|s| name_worker(&worker, "status", s))?;
        self.metrics.latency("status", start.elapsed());
        let (meta, stream, ext) = up.into_parts();
        let w = worker.clone();
        let stream = stream.map(move |m| m.map_err(|s| name_worker(&w, "status", s)));
        Ok(Response::from_parts(
            forward_metadata(&meta, true),
            Box::pin(stream) as BoxStream<_>,
            ext,
        ))
    }

    async fn session(
        &self,
        request: Request<tonic::Streaming<api::BytesMessage>>,
    ) -> Result<Response<BoxStream<api::BytesMessage>>, Status> {
        let metadata = request.metadata().clone();
        let id = metadata
            .get(md::SESSION_UUID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!("session request without {}", md::SESSION_UUID))
            })?
            .to_string();
        let shared_key = metadata
            .get(md::SESSION_SHARED_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        // Early bytes wait in the client's stream until the stream is bound; the attempts
        // to open it read it directly (see `Replay`), passing on half-close and
        // cancellation.
        let (out_tx, out_rx) = mpsc::channel::<Result<api::BytesMessage, Status>>(64);
        let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<Status>();
        let (handoff_tx, handoff_rx) = tokio::sync::oneshot::channel::<Upstream>();
        // Closed when the server drops the response stream (the client reset the call).
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        let inbound = Replay::new(request.into_inner(), cancel_tx, gone_rx);
        let routes = self.routes.clone();
        let hold = self.timeouts.session_hold;
        tokio::spawn(async move {
            let start = routes.session_arrived(&id, &shared_key);
            let (worker, opened) = match start {
                SessionStart::Bound(w) => (w, None),
                SessionStart::Held(rx) => {
                    let waited = tokio::select! {
                        r = tokio::time::timeout(hold, rx) => r,
                        _ = out_tx.closed() => {
                            routes.session_abandoned(&id);
                            return;
                        }
                    };
                    match waited {
                        Ok(Ok(b)) => (b.worker, Some(b.opened)),
                        Ok(Err(_)) | Err(_) => {
                            routes.session_abandoned(&id);
                            tracing::warn!(session = %id, ?hold, "no solve named the session; released");
                            let _ = out_tx
                                .send(Err(Status::deadline_exceeded(format!(
                                    "session {id}: no Solve named this session within {hold:?}; the gateway released it"
                                ))))
                                .await;
                            return;
                        }
                    }
                }
            };
            tracing::debug!(session = %id, worker = %worker.name, "session bound");
            // A dropped sender means the client half-closed: keep forwarding.
            let cancelled = async move {
                match cancel_rx.await {
                    Ok(s) => s,
                    Err(_) => futures::future::pending().await,
                }
            };
            let span = tracing::info_span!("proxy.session", session = %id, worker = %worker.name);
            telemetry::set_parent(&span, telemetry::extract(&metadata));
            Proxy::run_session(
                worker, metadata, inbound, out_tx, handoff_tx, opened, cancelled,
            )
            .instrument(span)
            .await;
            routes.session_ended(&id);
        });
        let stream = SessionOut {
            own: out_rx,
            handoff: Some(handoff_rx),
            up: None,
            done: false,
            _gone: gone_tx,
        };
        Ok(Response::new(Box::pin(stream) as BoxStream<_>))
    }

    async fn list_workers(
        &self,
        request: Request<api::ListWorkersRequest>,
    ) -> Result<Response<api::ListWorkersResponse>, Status> {
        let start = Instant::now();
        let (metadata, _, msg) = request.into_parts();
        let results = self
            .fan_out("list_workers", |w| {
                let req = request_with(&metadata, msg.clone(), false);
                async move { control(&w).list_workers(req).await }
            })
            .await;
        let mut out = api::ListWorkersResponse::default();
        let mut any = false;
        for (w, r) in &results {
            if let Ok(r) = r {
                any = true;
                for mut rec in r.get_ref().record.clone() {
                    rec.labels.insert(WORKER_LABEL.to_string(), w.name.clone());
                    out.record.push(rec);
                }
            }
        }
        self.metrics.latency("list_workers", start.elapsed());
        if !any {
            return Err(all_failed("list workers", results));
        }
        Ok(Response::new(out))
    }

    async fn disk_usage(
        &self,
        request: Request<api::DiskUsageRequest>,
    ) -> Result<Response<api::DiskUsageResponse>, Status> {
        let (metadata, _, msg) = request.into_parts();
        let results = self
            .fan_out("disk_usage", |w| {
                let req = request_with(&metadata, msg.clone(), false);
                async move { control(&w).disk_usage(req).await }
            })
            .await;
        let mut out = api::DiskUsageResponse::default();
        let mut any = false;
        for (w, r) in &results {
            if let Ok(r) = r {
                any = true;
                out.record
                    .extend(r.get_ref().record.iter().map(|rec| on_worker(&w.name, rec)));
            }
        }
        if !any {
            return Err(all_failed("disk usage", results));
        }
        Ok(Response::new(out))
    }

    async fn prune(
        &self,
        request: Request<api::PruneRequest>,
    ) -> Result<Response<BoxStream<api::UsageRecord>>, Status> {
        let (metadata, _, msg) = request.into_parts();
        let results = self
            .fan_out("prune", |w| {
                let req = request_with(&metadata, msg.clone(), false);
                async move { control(&w).prune(req).await }
            })
            .await;
        let mut streams = Vec::new();
        let mut failed = Vec::new();
        for (w, r) in results {
            match r {
                Ok(r) => {
                    let w2 = w.clone();
                    streams.push(
                        r.into_inner()
                            .map(move |m| {
                                m.map(|rec| on_worker(&w2.name, &rec))
                                    .map_err(|s| name_worker(&w2, "prune", s))
                            })
                            .boxed(),
                    );
                }
                Err(s) => failed.push((w, Err::<(), _>(s))),
            }
        }
        if streams.is_empty() {
            return Err(all_failed("prune", failed));
        }
        Ok(Response::new(
            Box::pin(futures::stream::select_all(streams)) as BoxStream<_>,
        ))
    }

    async fn info(
        &self,
        _request: Request<api::InfoRequest>,
    ) -> Result<Response<api::InfoResponse>, Status> {
        Ok(Response::new(api::InfoResponse {
            buildkit_version: Some(api::types::BuildkitVersion {
                package: "github.com/kiln-build/kiln/gateway".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                revision: String::new(),
                dockerfile_version: String::new(),
            }),
        }))
    }

    async fn listen_build_history(
        &self,
        request: Request<api::BuildHistoryRequest>,
    ) -> Result<Response<BoxStream<api::BuildHistoryEvent>>, Status> {
        let (metadata, _, msg) = request.into_parts();
        let workers = if msg.r#ref.is_empty() {
            self.pool
                .workers()
                .into_iter()
                .filter(|w| w.is_healthy())
                .collect()
        } else {
            vec![
                self.worker_for_ref("history", &msg.r#ref, Duration::ZERO)
                    .await?,
            ]
        };
        let mut streams = Vec::new();
        let mut failed = Vec::new();
        let mut first_meta = None;
        for w in workers {
            match control(&w)
                .listen_build_history(request_with(&metadata, msg.clone(), false))
                .await
            {
                Ok(r) => {
                    let (meta, s, _) = r.into_parts();
                    first_meta.get_or_insert(meta);
                    let w2 = w.clone();
                    streams.push(
                        s.map(move |m| m.map_err(|s| name_worker(&w2, "history", s)))
                            .boxed(),
                    );
                }
                Err(s) => failed.push((w, Err::<(), _>(s))),
            }
        }
        if streams.is_empty() {
            return Err(all_failed("listen build history", failed));
        }
        let mut resp =
            Response::new(Box::pin(futures::stream::select_all(streams)) as BoxStream<_>);
        if let Some(meta) = first_meta {
            *resp.metadata_mut() = forward_metadata(&meta, true);
        }
        Ok(resp)
    }

    async fn update_build_history(
        &self,
        request: Request<api::UpdateBuildHistoryRequest>,
    ) -> Result<Response<api::UpdateBuildHistoryResponse>, Status> {
        let worker = self
            .worker_for_ref("history", &request.get_ref().r#ref, Duration::ZERO)
            .await?;
        let (metadata, _, msg) = request.into_parts();
        let up = control(&worker)
            .update_build_history(request_with(&metadata, msg, false))
            .await
            .map_err(|s| name_worker(&worker, "history", s))?;
        let msg = *up.get_ref();
        Ok(response_with(up, msg))
    }
}

// === LLBBridge pass-through ===

/// Forwards every `moby.buildkit.v1.frontend.LLBBridge` call, bytes untouched (headers,
/// messages and trailers), to the worker of the build named by its
/// `buildkit-controlapi-buildid` header.
#[derive(Debug, Clone)]
pub struct BridgeProxy {
    proxy: Proxy,
    /// Each worker's answer to LLBBridge.Ping (its capabilities and worker record), kept
    /// for [`PONG_TTL`].
    pongs: Arc<std::sync::Mutex<HashMap<String, (Instant, gw::PongResponse)>>>,
}

/// How long a worker's Ping answer is reused. Capabilities change only when the worker is
/// replaced by another version; a failed bridge call to it drops the answer at once.
const PONG_TTL: Duration = Duration::from_secs(30);

/// A unary service answering with one prepared Pong.
struct Pong(gw::PongResponse);

impl tonic::server::UnaryService<gw::PingRequest> for Pong {
    type Response = gw::PongResponse;
    type Future = futures::future::Ready<Result<Response<gw::PongResponse>, Status>>;

    fn call(&mut self, _request: Request<gw::PingRequest>) -> Self::Future {
        futures::future::ready(Ok(Response::new(self.0.clone())))
    }
}

impl BridgeProxy {
    /// The Pong of `worker`: cached, or asked of the worker (and cached).
    async fn pong(&self, worker: &Worker, build: &str) -> Result<gw::PongResponse, Status> {
        if let Some((at, p)) = self.lock_pongs().get(&worker.name) {
            if at.elapsed() < PONG_TTL {
                return Ok(p.clone());
            }
        }
        let mut req = Request::new(gw::PingRequest {});
        if let Ok(v) = MetadataValue::try_from(build) {
            req.metadata_mut().insert(md::BUILD_ID, v);
        }
        let pong = gw::llb_bridge_client::LlbBridgeClient::new(worker.channel.clone())
            .ping(req)
            .await?
            .into_inner();
        self.lock_pongs()
            .insert(worker.name.clone(), (Instant::now(), pong.clone()));
        Ok(pong)
    }

    fn lock_pongs(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, gw::PongResponse)>> {
        self.pongs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gRPC answer to a Ping request: `pong`.
    async fn answer_ping(
        pong: gw::PongResponse,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
        grpc.unary(Pong(pong), req).await
    }
}

impl tonic::server::NamedService for BridgeProxy {
    const NAME: &'static str = "moby.buildkit.v1.frontend.LLBBridge";
}

fn status_response(s: Status) -> http::Response<tonic::body::Body> {
    s.into_http()
}

impl Service<http::Request<tonic::body::Body>> for BridgeProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let start = Instant::now();
            let build = req
                .headers()
                .get(md::BUILD_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            // The method: the path is /moby.buildkit.v1.frontend.LLBBridge/METHOD.
            let method = req
                .uri()
                .path()
                .strip_prefix('/')
                .and_then(|p| p.strip_prefix(<BridgeProxy as tonic::server::NamedService>::NAME))
                .and_then(|p| p.strip_prefix('/'))
                .unwrap_or_default();
            // A Ping is answered at the gateway from the build's worker's cached Pong. It
            // needs only the kind of worker: the one the Solve chose will do before it is
            // pinned. A unary call can follow the Solve before the worker accepted the
            // build's Session, its request kept to be sent again should the build move.
            let ping = method == "Ping";
            let accept = if ping {
                Accept::Chosen
            } else if RESENDABLE.contains(&method) {
                Accept::Forwarded
            } else {
                Accept::Pinned
            };
            let proxy = &this.proxy;
            let found = match proxy
                .find_worker("llbbridge", &build, proxy.timeouts.probe_after, accept)
                .await
            {
                Ok(w) => w,
                Err(s) => return Ok(status_response(s)),
            };
            let mut worker = found.worker;
            if ping {
                match this.pong(&worker, &build).await {
                    Ok(pong) => {
                        let resp = BridgeProxy::answer_ping(pong, req).await;
                        proxy.metrics.latency("llbbridge", start.elapsed());
                        return Ok(resp);
                    }
                    Err(s) => {
                        tracing::debug!(worker = %worker.name, status = %s, "Ping not answered from cache; forwarding");
                        // The chosen worker may not be the pinned one yet: forward to that.
                        worker = match proxy
                            .worker_for_ref("llbbridge", &build, proxy.timeouts.probe_after)
                            .await
                        {
                            Ok(w) => w,
                            Err(s) => return Ok(status_response(s)),
                        };
                    }
                }
            } else if !found.pinned {
                let resp = this.forward_resendable(worker, req, &build).await;
                proxy.metrics.latency("llbbridge", start.elapsed());
                return Ok(resp);
            }
            let res = this.forward(&worker, req, &build).await;
            proxy.metrics.latency("llbbridge", start.elapsed());
            Ok(res.unwrap_or_else(|e| this.failed(&worker, &build, &e)))
        })
    }
}

/// LLBBridge methods (unary, so their request can be kept and sent again) that may reach
/// the worker a build's Solve was forwarded to before it accepted the build's Session.
const RESENDABLE: &[&str] = &[
    "Solve",
    "ResolveImageConfig",
    "ResolveSourceMeta",
    "ReadFile",
    "ReadDir",
    "StatFile",
    "Evaluate",
    "Inputs",
    "Warn",
];

/// The largest LLBBridge request kept to be sent again.
const RESEND_LIMIT: usize = 64 << 20;

impl BridgeProxy {
    /// Sends one bridge call to `worker`, traced.
    async fn forward(
        &self,
        worker: &Worker,
        mut req: http::Request<tonic::body::Body>,
        build: &str,
    ) -> Result<http::Response<tonic::body::Body>, tonic::transport::Error> {
        let mut channel = worker.channel.clone();
        let span = tracing::info_span!("proxy.llbbridge", r#ref = %build, worker = %worker.name);
        telemetry::inject_headers(&span, req.headers_mut());
        async {
            futures::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx)).await?;
            Service::call(&mut channel, req).await
        }
        .instrument(span)
        .await
    }

    /// The answer to a bridge call whose worker could not be reached: the worker is
    /// ejected and its cached Pong dropped ([`BridgeProxy::lost`]).
    fn failed(
        &self,
        worker: &Worker,
        build: &str,
        e: &tonic::transport::Error,
    ) -> http::Response<tonic::body::Body> {
        self.lost(worker, e);
        unreachable_worker(worker, build, e)
    }

    /// `worker` could not be reached: it is ejected and its cached Pong dropped.
    fn lost(&self, worker: &Worker, e: &tonic::transport::Error) {
        self.lock_pongs().remove(&worker.name);
        self.proxy
            .pool
            .eject(worker, &format!("llbbridge call failed: {e}"));
    }

    /// Sends a unary bridge call to `worker`, which the build's Solve went to but which
    /// has not yet accepted the build's Session. The request is kept: when the worker
    /// cannot be reached and the build moves to another worker (its Session opened
    /// there instead), the call goes there.
    async fn forward_resendable(
        &self,
        worker: Arc<Worker>,
        req: http::Request<tonic::body::Body>,
        build: &str,
    ) -> http::Response<tonic::body::Body> {
        use http_body_util::BodyExt as _;
        let (parts, body) = req.into_parts();
        let body = match http_body_util::Limited::new(body, RESEND_LIMIT).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return status_response(Status::invalid_argument(format!(
                    "LLBBridge call {} of build {build}: could not read the request (at most {RESEND_LIMIT} bytes): {e}",
                    parts.uri.path()
                )))
            }
        };
        let copy = || {
            let mut r = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
                body.clone(),
            )));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r
        };
        let e = match self.forward(&worker, copy(), build).await {
            Ok(r) => return r,
            Err(e) => e,
        };
        let proxy = &self.proxy;
        self.lost(&worker, &e);
        let wait = proxy.timeouts.session_open + proxy.timeouts.pin_wait;
        match proxy.routes.worker_of(build, wait, Accept::Pinned).await {
            Some(p) if p.worker.name != worker.name => {
                tracing::info!(r#ref = build, from = %worker.name, to = %p.worker.name, path = parts.uri.path(), "bridge call sent again to the build's new worker");
                proxy.metrics.resent("llbbridge");
                match self.forward(&p.worker, copy(), build).await {
                    Ok(r) => r,
                    Err(e) => self.failed(&p.worker, build, &e),
                }
            }
            // The build stayed: the worker is already ejected.
            _ => unreachable_worker(&worker, build, &e),
        }
    }
}

/// The gRPC error answering a bridge call of `build` that could not reach `worker`.
fn unreachable_worker(
    worker: &Worker,
    build: &str,
    e: &tonic::transport::Error,
) -> http::Response<tonic::body::Body> {
    status_response(Status::unavailable(format!(
        "worker {} failed during an LLBBridge call of build {build}: {e}",
        worker.describe()
    )))
}

// === health ===

/// The gateway's `grpc.health.v1.Health`: SERVING while some worker takes builds.
#[derive(Debug, Clone)]
pub struct GatewayHealth {
    pool: Pool,
}

#[tonic::async_trait]
impl health::health_server::Health for GatewayHealth {
    async fn check(
        &self,
        _request: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        let serving = if self.pool.available().is_empty() {
            health::health_check_response::ServingStatus::NotServing
        } else {
            health::health_check_response::ServingStatus::Serving
        };
        Ok(Response::new(health::HealthCheckResponse {
            status: serving as i32,
        }))
    }
}

/// A worker's usage record as the gateway reports it: ids (and parent ids) prefixed with
/// the worker's name, so records of different workers never collide and each says where
/// it lives.
fn on_worker(worker: &str, rec: &api::UsageRecord) -> api::UsageRecord {
    let mut rec = rec.clone();
    rec.id = format!("{worker}/{}", rec.id);
    if !rec.parent.is_empty() {
        rec.parent = format!("{worker}/{}", rec.parent);
    }
    for p in &mut rec.parents {
        *p = format!("{worker}/{p}");
    }
    rec
}
