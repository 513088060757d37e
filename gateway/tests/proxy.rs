//! The gateway's forwarding against in-process fake workers (tonic servers on 127.0.0.1,
//! each behind a TCP relay the test can cut): Session pass-through (payload bytes,
//! repeated metadata, half-close, cancellation), late binding, Status before Solve,
//! LLBBridge by build ID, node-wide calls, retry before Solve, death mid-build, a
//! held session released after its timeout, and per-worker admission (builds beyond a
//! worker's limit queue at the gateway; cancelled or timed-out ones leave the queue).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kiln_gateway::health::Member;
use kiln_gateway::metrics::Metrics;
use kiln_gateway::proxy::Timeouts;
use kiln_gateway::route::{KEY_KIND_HEADER, ROUTE_KEY_ATTR, WORKER_HEADER};
use kiln_gateway::{Config, Gateway};
use kiln_proto::grpc::health::v1 as health;
use kiln_proto::metadata as md;
use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::frontend as bridge;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Bounds every wait so a broken gateway fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing happened within {GUARD:?}"),
    }
}

/// What a fake worker saw of one session.
#[derive(Debug, Default)]
struct SeenSession {
    metadata: Vec<(String, String)>,
    received: Vec<Vec<u8>>,
    /// `Some("half-close")` or `Some("cancelled: …")` once the inbound side ended.
    ended: Option<String>,
}

#[derive(Default)]
struct FakeState {
    sessions: Mutex<HashMap<String, SeenSession>>,
    solves: Mutex<Vec<api::SolveRequest>>,
    bridge_ids: Mutex<Vec<String>>,
    changed: Notify,
    /// `grpc.health.v1.Health/Check` calls answered.
    checks: std::sync::atomic::AtomicUsize,
    /// Lets one solve with the `wait` attribute finish.
    release: Notify,
}

#[derive(Clone)]
struct Fake {
    name: String,
    state: Arc<FakeState>,
}

impl Fake {
    /// Records a bridge call: `what` and the build ID it carried.
    fn bridge_call(&self, what: &str, metadata: &tonic::metadata::MetadataMap) {
        let id = metadata
            .get(md::BUILD_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        self.state
            .bridge_ids
            .lock()
            .expect("lock")
            .push(format!("{what}{id}"));
    }

    fn session_seen<T>(&self, id: &str, f: impl FnOnce(&SeenSession) -> T) -> Option<T> {
        self.state.sessions.lock().expect("lock").get(id).map(f)
    }

    /// Waits until `cond` holds on this fake's state.
    async fn wait_for(&self, what: &str, cond: impl Fn(&Fake) -> bool) {
        within(what, async {
            loop {
                let n = self.state.changed.notified();
                if cond(self) {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), n).await;
            }
        })
        .await
    }
}

#[tonic::async_trait]
impl api::control_server::Control for Fake {
    async fn session(
        &self,
        request: Request<tonic::Streaming<api::BytesMessage>>,
    ) -> Result<Response<BoxStream<api::BytesMessage>>, Status> {
        let mut metadata: Vec<(String, String)> = Vec::new();
        for kv in request.metadata().iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                metadata.push((k.to_string(), v.to_str().unwrap_or("?").to_string()));
            }
        }
        let id = request
            .metadata()
            .get(md::SESSION_UUID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.state.sessions.lock().expect("lock").insert(
            id.clone(),
            SeenSession {
                metadata,
                ..Default::default()
            },
        );
        self.state.changed.notify_waiters();
        let (tx, rx) = mpsc::channel(16);
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            // The worker speaks first, like a daemon sending its HTTP/2 preface.
            let _ = tx
                .send(Ok(api::BytesMessage {
                    data: format!("hello from {name}").into_bytes(),
                }))
                .await;
            let ended = loop {
                tokio::select! {
                    m = inbound.next() => match m {
                        Some(Ok(m)) => {
                            let mut echo = b"echo:".to_vec();
                            echo.extend_from_slice(&m.data);
                            if let Some(s) = state.sessions.lock().expect("lock").get_mut(&id) {
                                s.received.push(m.data);
                            }
                            state.changed.notify_waiters();
                            let _ = tx.send(Ok(api::BytesMessage { data: echo })).await;
                        }
                        Some(Err(s)) => break format!("cancelled: {s}"),
                        // hyper reports RST_STREAM(CANCEL) as the end of the body; the
                        // reset also drops the response stream, which tells them apart.
                        None => match tokio::time::timeout(Duration::from_millis(300), tx.closed()).await {
                            Ok(()) => break "cancelled: reset".to_string(),
                            Err(_) => break "half-close".to_string(),
                        },
                    },
                    _ = tx.closed() => break "cancelled: response stream dropped".to_string(),
                }
            };
            if let Some(s) = state.sessions.lock().expect("lock").get_mut(&id) {
                s.ended = Some(ended);
            }
            state.changed.notify_waiters();
            // Dropping `tx` ends the response stream with OK.
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as BoxStream<_>
        ))
    }

    async fn solve(
        &self,
        request: Request<api::SolveRequest>,
    ) -> Result<Response<api::SolveResponse>, Status> {
        let req = request.into_inner();
        self.state.solves.lock().expect("lock").push(req.clone());
        self.state.changed.notify_waiters();
        if req.frontend_attrs.contains_key("wait") {
            self.state.release.notified().await;
        }
        if req.frontend_attrs.contains_key("hang") {
            futures::future::pending::<()>().await;
        }
        if req.frontend_attrs.contains_key("fail") {
            return Err(Status::unknown("process \"/bin/false\" did not complete"));
        }
        let mut exporter_response = HashMap::new();
        exporter_response.insert("worker".to_string(), self.name.clone());
        Ok(Response::new(api::SolveResponse { exporter_response }))
    }

    async fn status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<BoxStream<api::StatusResponse>>, Status> {
        let r = request.into_inner().r#ref;
        let msg = api::StatusResponse {
            vertexes: vec![api::Vertex {
                digest: "sha256:1".into(),
                name: format!("{} on {}", r, self.name),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut resp = Response::new(
            Box::pin(futures::stream::iter([Ok(msg)])) as BoxStream<api::StatusResponse>
        );
        resp.metadata_mut().insert(
            md::CURRENT_TIMESTAMP,
            "2026-01-01T00:00:00.000000001Z".parse().expect("value"),
        );
        Ok(resp)
    }

    async fn list_workers(
        &self,
        _request: Request<api::ListWorkersRequest>,
    ) -> Result<Response<api::ListWorkersResponse>, Status> {
        Ok(Response::new(api::ListWorkersResponse {
            record: vec![api::types::WorkerRecord {
                id: format!("id-{}", self.name),
                ..Default::default()
            }],
        }))
    }
}

#[tonic::async_trait]
impl bridge::llb_bridge_server::LlbBridge for Fake {
    async fn ping(
        &self,
        request: Request<bridge::PingRequest>,
    ) -> Result<Response<bridge::PongResponse>, Status> {
        self.bridge_call("", request.metadata());
        Ok(Response::new(bridge::PongResponse {
            workers: vec![api::types::WorkerRecord {
                id: self.name.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    async fn inputs(
        &self,
        request: Request<bridge::InputsRequest>,
    ) -> Result<Response<bridge::InputsResponse>, Status> {
        self.bridge_call("inputs ", request.metadata());
        Ok(Response::new(bridge::InputsResponse::default()))
    }
}

/// `msg` as an LLBBridge request of build `build`.
fn for_build<T>(build: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(md::BUILD_ID, build.parse().expect("build id"));
    req
}

#[derive(Clone)]
struct Healthy(Arc<FakeState>);

#[tonic::async_trait]
impl health::health_server::Health for Healthy {
    async fn check(
        &self,
        _request: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        self.0
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Response::new(health::HealthCheckResponse {
            status: health::health_check_response::ServingStatus::Serving as i32,
        }))
    }
}

/// A fake worker behind a relay: `addr` is the relay's; `cut()` drops every connection
/// through it and stops accepting new ones, like a worker process dying.
struct Backend {
    fake: Fake,
    addr: String,
    relay: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Backend {
    async fn start(name: &str) -> Backend {
        let fake = Fake {
            name: name.to_string(),
            state: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let inner = listener.local_addr().expect("addr");
        let routes =
            tonic::service::Routes::new(api::control_server::ControlServer::new(fake.clone()))
                .add_service(bridge::llb_bridge_server::LlbBridgeServer::new(
                    fake.clone(),
                ))
                .add_service(health::health_server::HealthServer::new(Healthy(
                    fake.state.clone(),
                )));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let relay_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("tcp://{}", relay_listener.local_addr().expect("addr"));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let c2 = conns.clone();
        let relay = tokio::spawn(async move {
            while let Ok((mut down, _)) = relay_listener.accept().await {
                let h = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(inner).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c2.lock().expect("lock").push(h);
            }
        });
        Backend {
            fake,
            addr,
            relay,
            conns,
        }
    }

    fn member(&self) -> Member {
        Member {
            name: self.fake.name.clone(),
            addr: self.addr.clone(),
        }
    }

    fn cut(&self) {
        self.relay.abort();
        for h in self.conns.lock().expect("lock").drain(..) {
            h.abort();
        }
    }
}

struct Setup {
    gateway: Gateway,
    client: api::control_client::ControlClient<Channel>,
    channel: Channel,
}

async fn setup(members: Vec<Member>, timeouts: Timeouts) -> Setup {
    let config = Config {
        timeouts,
        ..Config::default()
    };
    setup_with(members, config).await
}

async fn setup_with(members: Vec<Member>, config: Config) -> Setup {
    let gateway = Gateway::new(config, Metrics::new().expect("metrics"));
    gateway.pool().set_members(&members).expect("members");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let g = gateway.clone();
    tokio::spawn(async move { g.serve(listener).await });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to gateway");
    Setup {
        gateway,
        client: api::control_client::ControlClient::new(channel.clone()),
        channel,
    }
}

/// Opens a session through the gateway; returns the sender of client→worker messages,
/// the worker→client stream and a handle that cancels the call (RST_STREAM).
async fn open_session(
    client: &mut api::control_client::ControlClient<Channel>,
    id: &str,
) -> (
    mpsc::Sender<api::BytesMessage>,
    tonic::Streaming<api::BytesMessage>,
    tonic::CancellationHandle,
) {
    let (tx, rx) = mpsc::channel(16);
    let mut req = Request::new(ReceiverStream::new(rx));
    let cancel = req.cancellation_handle();
    let m = req.metadata_mut();
    m.insert(md::SESSION_UUID, id.parse().expect("value"));
    m.insert(md::SESSION_SHARED_KEY, "".parse().expect("value"));
    for method in [
        "/moby.filesync.v1.FileSync/DiffCopy",
        "/moby.filesync.v1.FileSync/TarStream",
        "/grpc.health.v1.Health/Check",
    ] {
        m.append(md::SESSION_GRPC_METHOD, method.parse().expect("value"));
    }
    let stream = within("session open", client.session(req))
        .await
        .expect("session")
        .into_inner();
    (tx, stream, cancel)
}

fn solve(r: &str, session: &str, key: &str) -> api::SolveRequest {
    let mut attrs = HashMap::new();
    attrs.insert(ROUTE_KEY_ATTR.to_string(), key.to_string());
    api::SolveRequest {
        r#ref: r.into(),
        session: session.into(),
        frontend: "dockerfile.v0".into(),
        frontend_attrs: attrs,
        ..Default::default()
    }
}

fn header(md: &tonic::metadata::MetadataMap, k: &str) -> String {
    md.get(k)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// `err` is UNAVAILABLE and names worker `worker` and build `build`.
fn assert_unavailable_naming(err: &Status, worker: &str, build: &str) {
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        err.message().contains(&format!("worker {worker}")) && err.message().contains(build),
        "{err}"
    );
}

fn find<'a>(backends: &'a [Backend], name: &str) -> &'a Backend {
    backends
        .iter()
        .find(|b| b.fake.name == name)
        .unwrap_or_else(|| panic!("no backend {name}"))
}

#[tokio::test]
async fn session_pass_through_late_binding_and_half_close() {
    let backends = [Backend::start("w0").await, Backend::start("w1").await];
    let mut s = setup(
        backends.iter().map(Backend::member).collect(),
        Timeouts::default(),
    )
    .await;
    let (tx, mut from_worker, _cancel) = open_session(&mut s.client, "sess1").await;
    // Early bytes: every byte value, then an empty-looking but non-empty frame.
    let early: Vec<Vec<u8>> = vec![(0..=255u8).collect(), vec![0, 0, 0, 1]];
    for d in &early {
        tx.send(api::BytesMessage { data: d.clone() })
            .await
            .expect("send");
    }
    // Held: no worker has seen the session yet.
    tokio::task::yield_now().await;
    for b in &backends {
        assert!(b.fake.session_seen("sess1", |_| ()).is_none());
    }
    // Status before Solve waits for the pin.
    let mut status_client = s.client.clone();
    let status = tokio::spawn(async move {
        status_client
            .status(api::StatusRequest {
                r#ref: "ref1".into(),
            })
            .await
    });
    let resp = within(
        "solve",
        s.client.solve(solve("ref1", "pfx:sess1", "project-a")),
    )
    .await
    .expect("solve");
    let worker = header(resp.metadata(), WORKER_HEADER);
    assert_eq!(header(resp.metadata(), KEY_KIND_HEADER), "explicit");
    assert_eq!(
        Some(worker.clone()),
        s.gateway.pool().home("project-a"),
        "not the key's home worker"
    );
    assert_eq!(resp.get_ref().exporter_response["worker"], worker);
    let b = find(&backends, &worker);
    let other = backends
        .iter()
        .find(|x| x.fake.name != worker)
        .expect("other");
    assert!(other.fake.session_seen("sess1", |_| ()).is_none());

    // Status reached the same worker, with its timestamp header.
    let st = within("status", status)
        .await
        .expect("join")
        .expect("status");
    assert_eq!(
        header(st.metadata(), md::CURRENT_TIMESTAMP),
        "2026-01-01T00:00:00.000000001Z"
    );
    let first = within("status message", st.into_inner().message())
        .await
        .expect("status stream")
        .expect("one message");
    assert_eq!(first.vertexes[0].name, format!("ref1 on {worker}"));

    // Metadata: the ID, the shared key and every repeated method value, in order.
    let seen_md = b
        .fake
        .session_seen("sess1", |s| s.metadata.clone())
        .expect("worker saw the session");
    let methods: Vec<&str> = seen_md
        .iter()
        .filter(|(k, _)| k == md::SESSION_GRPC_METHOD)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        methods,
        [
            "/moby.filesync.v1.FileSync/DiffCopy",
            "/moby.filesync.v1.FileSync/TarStream",
            "/grpc.health.v1.Health/Check"
        ]
    );
    assert!(seen_md
        .iter()
        .any(|(k, v)| k == md::SESSION_SHARED_KEY && v.is_empty()));
    assert!(!seen_md.iter().any(|(k, _)| k == "grpc-timeout"));

    // Payloads both ways, untouched and in order.
    let hello = within("worker hello", from_worker.message())
        .await
        .expect("stream")
        .expect("message");
    assert_eq!(hello.data, format!("hello from {worker}").into_bytes());
    for d in &early {
        let m = within("echo", from_worker.message())
            .await
            .expect("stream")
            .expect("message");
        let mut want = b"echo:".to_vec();
        want.extend_from_slice(d);
        assert_eq!(m.data, want);
    }
    b.fake
        .wait_for("early bytes", |f| {
            f.session_seen("sess1", |s| s.received.len()) == Some(2)
        })
        .await;
    assert_eq!(
        b.fake.session_seen("sess1", |s| s.received.clone()),
        Some(early.clone())
    );

    // Half-close: the worker sees the end of its inbound stream and ends OK.
    drop(tx);
    b.fake
        .wait_for("half-close", |f| {
            f.session_seen("sess1", |s| s.ended.clone())
                .flatten()
                .is_some()
        })
        .await;
    assert_eq!(
        b.fake.session_seen("sess1", |s| s.ended.clone()).flatten(),
        Some("half-close".to_string())
    );
    let end = within("end of session", from_worker.message()).await;
    assert!(
        matches!(end, Ok(None)),
        "session did not end cleanly: {end:?}"
    );

    // LLBBridge calls go by build ID to the same worker, bytes untouched (a Ping is answered
    // from the worker's cached Pong after the first).
    let mut bridge_client = bridge::llb_bridge_client::LlbBridgeClient::new(s.channel.clone());
    let pong = within(
        "ping",
        bridge_client.ping(for_build("ref1", bridge::PingRequest::default())),
    )
    .await
    .expect("ping");
    assert_eq!(pong.get_ref().workers[0].id, worker);
    assert_eq!(
        b.fake.state.bridge_ids.lock().expect("lock").clone(),
        ["ref1"]
    );
    // The worker's Pong is kept: the next Ping of a build on it is answered by the
    // gateway, and other bridge calls still pass through to the build's worker.
    let again = within(
        "ping again",
        bridge_client.ping(for_build("ref1", bridge::PingRequest::default())),
    )
    .await
    .expect("ping again");
    assert_eq!(again.get_ref().workers[0].id, worker);
    within(
        "inputs",
        bridge_client.inputs(for_build("ref1", bridge::InputsRequest::default())),
    )
    .await
    .expect("inputs");
    assert_eq!(
        b.fake.state.bridge_ids.lock().expect("lock").clone(),
        ["ref1", "inputs ref1"]
    );

    // Node-wide: ListWorkers aggregates, each record labelled with its worker.
    let lw = s
        .client
        .list_workers(api::ListWorkersRequest::default())
        .await
        .expect("list workers");
    let mut ids: Vec<(String, String)> = lw
        .get_ref()
        .record
        .iter()
        .map(|r| {
            (
                r.id.clone(),
                r.labels
                    .get(kiln_gateway::proxy::WORKER_LABEL)
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            ("id-w0".to_string(), "w0".to_string()),
            ("id-w1".to_string(), "w1".to_string())
        ]
    );
    let info = s
        .client
        .info(api::InfoRequest::default())
        .await
        .expect("info");
    assert!(info
        .get_ref()
        .buildkit_version
        .as_ref()
        .is_some_and(|v| v.package.ends_with("/gateway")));
}

#[tokio::test]
async fn session_cancellation_reaches_the_worker() {
    let backends = [Backend::start("w0").await];
    let mut s = setup(
        backends.iter().map(Backend::member).collect(),
        Timeouts::default(),
    )
    .await;
    let (tx, mut from_worker, cancel) = open_session(&mut s.client, "sess2").await;
    within("solve", s.client.solve(solve("ref2", "sess2", "k")))
        .await
        .expect("solve");
    let hello = within("hello", from_worker.message())
        .await
        .expect("stream")
        .expect("message");
    assert_eq!(hello.data, b"hello from w0");
    // The client cancels the call without half-closing (RST_STREAM); its sender stays.
    cancel.cancel();
    let b = &backends[0];
    b.fake
        .wait_for("cancellation", |f| {
            f.session_seen("sess2", |s| s.ended.clone())
                .flatten()
                .is_some()
        })
        .await;
    let ended = b.fake.session_seen("sess2", |s| s.ended.clone()).flatten();
    assert!(
        ended.as_deref().is_some_and(|e| e.starts_with("cancelled")),
        "worker saw {ended:?}"
    );
    drop((tx, from_worker));
}

#[tokio::test]
async fn session_without_solve_is_released_with_a_clear_error() {
    let backends = [Backend::start("w0").await];
    let timeouts = Timeouts {
        session_hold: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let mut s = setup(backends.iter().map(Backend::member).collect(), timeouts).await;
    let (_tx, mut from_worker, _cancel) = open_session(&mut s.client, "lonely").await;
    let err = within("release", from_worker.message())
        .await
        .expect_err("held session was not released");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    assert!(
        err.message().contains("lonely") && err.message().contains("no Solve"),
        "{err}"
    );
    assert!(backends[0].fake.session_seen("lonely", |_| ()).is_none());
    // And Status for an unknown build gives up with a clear error.
    let timeouts = Timeouts {
        pin_wait: Duration::from_millis(100),
        ..Timeouts::default()
    };
    let mut s = setup(backends.iter().map(Backend::member).collect(), timeouts).await;
    let err = s
        .client
        .status(api::StatusRequest {
            r#ref: "nope".into(),
        })
        .await
        .expect_err("unknown ref routed");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("nope"), "{err}");
}

/// Workers w0 and w1 behind a gateway, and a routing key whose home on the ring is w0.
async fn two_workers_and_a_key_homed_on_w0() -> ([Backend; 2], Setup, String) {
    let backends = [Backend::start("w0").await, Backend::start("w1").await];
    let s = setup(
        backends.iter().map(Backend::member).collect(),
        Timeouts::default(),
    )
    .await;
    let key = (0..100)
        .map(|i| format!("key-{i}"))
        .find(|k| s.gateway.pool().home(k).as_deref() == Some("w0"))
        .expect("a key homed on w0");
    (backends, s, key)
}

#[tokio::test]
async fn dead_worker_before_solve_is_skipped_transparently() {
    let (backends, s, key) = two_workers_and_a_key_homed_on_w0().await;
    // w0 dies.
    backends[0].cut();
    let mut client = s.client.clone();
    let resp = within("solve", client.solve(solve("ref3", "", &key)))
        .await
        .expect("solve retried on w1");
    assert_eq!(header(resp.metadata(), WORKER_HEADER), "w1");
    assert_eq!(backends[1].fake.state.solves.lock().expect("lock").len(), 1);
    assert!(s.gateway.pool().get("w0").is_some_and(|w| !w.is_healthy()));
    // A build error from the worker passes through unchanged.
    let mut req = solve("ref4", "", &key);
    req.frontend_attrs.insert("fail".into(), "1".into());
    let err = client.solve(req).await.expect_err("failing build");
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert_eq!(err.message(), "process \"/bin/false\" did not complete");
}

/// The held Session stream proves its worker alive by being accepted (no separate health
/// check): a dead worker is ejected and the stream, with every byte the client sent while
/// it was held, opens on the next worker of the ring instead.
#[tokio::test]
async fn held_session_of_a_dead_worker_reopens_on_the_next_with_its_early_bytes() {
    let (backends, s, key) = two_workers_and_a_key_homed_on_w0().await;
    let mut client = s.client.clone();
    // The gateway holds a connection to w0 (an earlier build ran there); then w0 dies.
    let warm = within("warm-up solve", client.solve(solve("warm", "", &key)))
        .await
        .expect("warm-up build");
    assert_eq!(header(warm.metadata(), WORKER_HEADER), "w0");
    backends[0].cut();
    let (tx, mut from_worker, _cancel) = open_session(&mut client, "p:sess-dead").await;
    for m in ["early-1", "early-2"] {
        tx.send(api::BytesMessage {
            data: m.as_bytes().to_vec(),
        })
        .await
        .expect("send early bytes");
    }
    within("session held", async {
        while !s.gateway.proxy.routes.session_held("sess-dead") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let resp = within(
        "solve",
        client.solve(solve("ref-dead", "p:sess-dead", &key)),
    )
    .await
    .expect("solve moved to w1 with its session");
    assert_eq!(header(resp.metadata(), WORKER_HEADER), "w1");
    assert_eq!(
        backends[1]
            .fake
            .state
            .checks
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the gateway health-checked w1 although the session's open proved it alive"
    );
    assert!(s.gateway.pool().get("w0").is_some_and(|w| !w.is_healthy()));
    assert_eq!(
        s.gateway
            .proxy
            .routes
            .session_worker("sess-dead")
            .map(|w| w.name.clone())
            .as_deref(),
        Some("w1")
    );
    tx.send(api::BytesMessage {
        data: b"late".to_vec(),
    })
    .await
    .expect("send");
    let w1 = &backends[1].fake;
    w1.wait_for("three messages on w1", |f| {
        f.session_seen("p:sess-dead", |x| x.received.len() >= 3)
            .unwrap_or(false)
    })
    .await;
    let got = w1
        .session_seen("p:sess-dead", |x| x.received.clone())
        .expect("session on w1");
    assert_eq!(
        got,
        vec![b"early-1".to_vec(), b"early-2".to_vec(), b"late".to_vec()],
        "bytes lost, repeated or reordered on the way to w1"
    );
    let hello = within("worker's first message", from_worker.next())
        .await
        .expect("a message")
        .expect("not an error");
    assert_eq!(hello.data, b"hello from w1");
    assert!(
        backends[0]
            .fake
            .session_seen("p:sess-dead", |_| ())
            .is_none(),
        "the dead worker saw the session"
    );
}

/// A unary LLBBridge call may follow the Solve to a worker that has not yet accepted the
/// build's Session. Should that worker be unreachable and the build move on (its Session
/// opened on the next worker), the call is sent again, whole, to the build's new worker;
/// should the build stay, the call fails naming the worker.
#[tokio::test]
async fn bridge_call_sent_before_the_session_opened_follows_the_build() {
    let (backends, s, _key) = two_workers_and_a_key_homed_on_w0().await;
    let routes = &s.gateway.proxy.routes;
    let worker = |n: &str| s.gateway.pool().get(n).expect("member");
    let (w0, w1) = (worker("w0"), worker("w1"));
    let mut bridge_client = bridge::llb_bridge_client::LlbBridgeClient::new(s.channel.clone());
    let calls = |b: &Backend| b.fake.state.bridge_ids.lock().expect("lock").clone();
    let resent = || {
        let text = s.gateway.proxy.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("kiln_gateway_resent_calls_total{rpc=\"llbbridge\"} "))
            .map_or(0.0, |v| v.trim().parse().expect("a number"))
    };

    // An Inputs call of `build`, running.
    let inputs = |build: &'static str| {
        let mut c = bridge_client.clone();
        tokio::spawn(async move {
            c.inputs(for_build(build, bridge::InputsRequest::default()))
                .await
        })
    };
    // Only chosen, not yet forwarded: the call waits for the build's worker.
    routes.expect_ref("b-live", &w1);
    let early = inputs("b-live");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(calls(&backends[1]).is_empty(), "went ahead of its Solve");
    // Forwarded there: the call follows at once, before any pin.
    routes.forwarded_ref("b-live", &w1);
    within("inputs", early)
        .await
        .expect("join")
        .expect("inputs on w1");
    assert_eq!(calls(&backends[1]), ["inputs b-live"]);

    // w0 is dead: the call fails there, w0 is ejected, and the build moves to w1.
    backends[0].cut();
    routes.expect_ref("b-moved", &w0);
    routes.forwarded_ref("b-moved", &w0);
    let moved = inputs("b-moved");
    within("w0 ejected", async {
        while w0.is_healthy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    routes.expect_ref("b-moved", &w1);
    routes.pin_ref("b-moved", &w1);
    within("inputs", moved)
        .await
        .expect("join")
        .expect("inputs sent again on w1");
    assert_eq!(calls(&backends[1]), ["inputs b-live", "inputs b-moved"]);
    assert_eq!(resent(), 1.0);

    // The build stays on the dead worker: the call fails naming it.
    routes.expect_ref("b-stuck", &w0);
    routes.forwarded_ref("b-stuck", &w0);
    let stuck = inputs("b-stuck");
    routes.pin_ref("b-stuck", &w0);
    let err = within("inputs", stuck)
        .await
        .expect("join")
        .expect_err("a call to a dead worker");
    assert_unavailable_naming(&err, "w0", "b-stuck");
    assert!(calls(&backends[0]).is_empty());
    assert_eq!(resent(), 1.0);
    routes.pin_ref("b-live", &w1);
    bridge_client
        .inputs(for_build("b-live", bridge::InputsRequest::default()))
        .await
        .expect("a pinned build's call");
}

#[tokio::test]
async fn worker_dying_mid_build_fails_the_build_naming_it() {
    let backends = [Backend::start("w0").await];
    let s = setup(
        backends.iter().map(Backend::member).collect(),
        Timeouts::default(),
    )
    .await;
    let mut req = solve("ref5", "", "k");
    req.frontend_attrs.insert("hang".into(), "1".into());
    let mut client = s.client.clone();
    let call = tokio::spawn(async move { client.solve(req).await });
    backends[0]
        .fake
        .wait_for("solve reached the worker", |f| {
            !f.state.solves.lock().expect("lock").is_empty()
        })
        .await;
    backends[0].cut();
    let err = within("solve", call)
        .await
        .expect("join")
        .expect_err("build survived its worker");
    assert_unavailable_naming(&err, "w0", "ref5");
    assert_eq!(header(err.metadata(), WORKER_HEADER), "w0");
}

#[tokio::test]
async fn concurrent_builds_of_one_hot_project_respect_the_load_bound() {
    let backends = [
        Backend::start("w0").await,
        Backend::start("w1").await,
        Backend::start("w2").await,
    ];
    let s = setup(
        backends.iter().map(Backend::member).collect(),
        Timeouts::default(),
    )
    .await;
    const BUILDS: usize = 9;
    let mut calls = Vec::new();
    for i in 0..BUILDS {
        let mut req = solve(&format!("hot-{i}"), "", "hot-project");
        req.frontend_attrs.insert("hang".into(), "1".into());
        let mut client = s.client.clone();
        calls.push(tokio::spawn(async move { client.solve(req).await }));
    }
    let total = || {
        backends
            .iter()
            .map(|b| b.fake.state.solves.lock().expect("lock").len())
            .sum::<usize>()
    };
    within("all builds placed", async {
        while total() < BUILDS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // c = 1.25 over 3 workers: at most ceil(1.25 × 9 / 3) = 4 on any one.
    let cap = kiln_gateway::ring::capacity(1.25, BUILDS - 1, 3);
    assert_eq!(cap, 4);
    let home = s.gateway.pool().home("hot-project").expect("home");
    for b in &backends {
        let n = b.fake.state.solves.lock().expect("lock").len();
        assert!(n <= cap, "{} runs {n} builds > bound {cap}", b.fake.name);
        let inflight = s.gateway.pool().get(&b.fake.name).map(|w| w.inflight());
        assert_eq!(inflight, Some(n));
        if b.fake.name == home {
            assert_eq!(n, cap, "the hot project's home is not filled first");
        }
    }
    for c in calls {
        c.abort();
    }
}

#[tokio::test]
async fn ejected_worker_rejoins_when_healthy() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let pool = kiln_gateway::health::Pool::new(40, 1.25, Metrics::new().expect("metrics"));
    pool.set_members(&[Member {
        name: "late".into(),
        addr: format!("tcp://127.0.0.1:{port}"),
    }])
    .expect("members");
    pool.check_all().await;
    assert!(
        pool.available().is_empty(),
        "a dead worker passed its check"
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the same port");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health::health_server::HealthServer::new(Healthy(
                Arc::default(),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    within("rejoin", async {
        loop {
            pool.check_all().await;
            if !pool.available().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(pool.pick("k", &[]).is_some());
}

#[tokio::test]
async fn draining_and_leaving_workers_finish_running_builds_and_take_no_new_ones() {
    let backends = [Backend::start("w0").await, Backend::start("w1").await];
    let s = setup(
        backends.iter().map(Backend::member).collect(),
        Timeouts::default(),
    )
    .await;
    let pool = s.gateway.pool().clone();
    let key = (0..100)
        .map(|i| format!("key-{i}"))
        .find(|k| pool.home(k).as_deref() == Some("w0"))
        .expect("a key homed on w0");
    for how in ["drain", "leave"] {
        let mut req = solve(&format!("running-{how}"), "", &key);
        req.frontend_attrs.insert("wait".into(), "1".into());
        let mut client = s.client.clone();
        let running = tokio::spawn(async move { client.solve(req).await });
        let before = backends[0].fake.state.solves.lock().expect("lock").len();
        backends[0]
            .fake
            .wait_for("the build reached w0", |f| {
                f.state.solves.lock().expect("lock").len() > before
            })
            .await;
        match how {
            "drain" => {
                assert_eq!(
                    kiln_gateway::admin::handle(&pool, "POST", "/drain?worker=w0").0,
                    200
                );
            }
            _ => pool.set_members(&[backends[1].member()]).expect("members"),
        }
        // New builds of the same project go elsewhere...
        let mut client = s.client.clone();
        let resp = client
            .solve(solve(&format!("new-{how}"), "", &key))
            .await
            .expect("new build");
        assert_eq!(header(resp.metadata(), WORKER_HEADER), "w1", "{how}");
        // ...while the running one finishes on w0.
        backends[0].fake.state.release.notify_one();
        let done = within("running build", running)
            .await
            .expect("join")
            .expect("running build failed");
        assert_eq!(header(done.metadata(), WORKER_HEADER), "w0", "{how}");
        assert_eq!(done.get_ref().exporter_response["worker"], "w0");
        if how == "drain" {
            kiln_gateway::admin::handle(&pool, "POST", "/undrain?worker=w0");
            let resp = client
                .solve(solve("after-undrain", "", &key))
                .await
                .expect("build after undrain");
            assert_eq!(header(resp.metadata(), WORKER_HEADER), "w0");
        }
    }
}

/// The value of the sample `name{worker="w"}` in the gateway's metrics, if rendered.
fn sample(s: &Setup, name: &str, worker: &str) -> Option<f64> {
    let prefix = format!("{name}{{worker=\"{worker}\"}} ");
    s.gateway
        .proxy
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
}

/// Waits until the gateway's `kiln_gateway_queue_depth` of `worker` is `depth`.
async fn wait_queue_depth(s: &Setup, worker: &str, depth: f64) {
    within(&format!("queue depth {depth} on {worker}"), async {
        while sample(s, "kiln_gateway_queue_depth", worker) != Some(depth) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn limited(limit: usize, timeouts: Timeouts) -> Config {
    Config {
        max_builds_per_worker: limit,
        timeouts,
        ..Config::default()
    }
}

#[tokio::test]
async fn build_beyond_the_worker_limit_queues_with_its_session_alive_then_runs() {
    let backends = [Backend::start("w0").await];
    // A short pin wait: the queued build's Status call must outlast it.
    let timeouts = Timeouts {
        pin_wait: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let mut s = setup_with(
        backends.iter().map(Backend::member).collect(),
        limited(1, timeouts),
    )
    .await;
    let fake = &backends[0].fake;
    let (_tx1, _from1, _c1) = open_session(&mut s.client, "qs1").await;
    let mut first = solve("q-first", "qs1", "project-q");
    first.frontend_attrs.insert("wait".into(), "1".into());
    let mut c = s.client.clone();
    let first = tokio::spawn(async move { c.solve(first).await });
    fake.wait_for("first build on the worker", |f| {
        f.state.solves.lock().expect("lock").len() == 1
    })
    .await;

    let (tx2, mut from2, _c2) = open_session(&mut s.client, "qs2").await;
    let mut c = s.client.clone();
    let second = tokio::spawn(async move { c.solve(solve("q-second", "qs2", "project-q")).await });
    wait_queue_depth(&s, "w0", 1.0).await;
    let w0 = s.gateway.pool().get("w0").expect("w0");
    assert_eq!((w0.inflight(), w0.queued(), w0.limit()), (1, 1, 1));
    let (code, listing) = kiln_gateway::admin::handle(s.gateway.pool(), "GET", "/workers");
    assert_eq!(code, 200);
    assert!(listing.contains("inflight=1 queued=1 limit=1"), "{listing}");

    // Queued: the session is open on the worker and carries bytes both ways.
    let hello = within("hello", from2.message())
        .await
        .expect("stream")
        .expect("message");
    assert_eq!(hello.data, b"hello from w0");
    tx2.send(api::BytesMessage {
        data: b"while queued".to_vec(),
    })
    .await
    .expect("send");
    let echo = within("echo", from2.message())
        .await
        .expect("stream")
        .expect("message");
    assert_eq!(echo.data, b"echo:while queued");
    // Only the first Solve reached the worker.
    assert_eq!(fake.state.solves.lock().expect("lock").len(), 1);

    // A Status call of the queued build waits for it past the pin wait.
    let mut sc = s.client.clone();
    let status = tokio::spawn(async move {
        sc.status(api::StatusRequest {
            r#ref: "q-second".into(),
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !status.is_finished(),
        "status gave up while its build queued"
    );

    fake.state.release.notify_one();
    within("first build", first)
        .await
        .expect("join")
        .expect("first build");
    let resp = within("second build", second)
        .await
        .expect("join")
        .expect("queued build");
    assert_eq!(header(resp.metadata(), WORKER_HEADER), "w0");
    let st = within("status", status)
        .await
        .expect("join")
        .expect("status of the queued build");
    let msg = within("status message", st.into_inner().message())
        .await
        .expect("status stream")
        .expect("one message");
    assert_eq!(msg.vertexes[0].name, "q-second on w0");
    wait_queue_depth(&s, "w0", 0.0).await;
    assert_eq!(
        sample(&s, "kiln_gateway_queue_wait_seconds_count", "w0"),
        Some(1.0)
    );
    assert_eq!(s.gateway.proxy.routes.queued_refs(), 0);
}

#[tokio::test]
async fn queued_build_whose_client_goes_away_leaves_the_queue() {
    let backends = [Backend::start("w0").await];
    let s = setup_with(
        backends.iter().map(Backend::member).collect(),
        limited(1, Timeouts::default()),
    )
    .await;
    let fake = &backends[0].fake;
    let mut first = solve("c-first", "", "project-c");
    first.frontend_attrs.insert("wait".into(), "1".into());
    let mut c = s.client.clone();
    let first = tokio::spawn(async move { c.solve(first).await });
    fake.wait_for("first build on the worker", |f| {
        f.state.solves.lock().expect("lock").len() == 1
    })
    .await;
    let mut c = s.client.clone();
    let gone = tokio::spawn(async move { c.solve(solve("c-gone", "", "project-c")).await });
    wait_queue_depth(&s, "w0", 1.0).await;
    // The client goes away: its call is reset and the gateway drops the queued Solve.
    gone.abort();
    wait_queue_depth(&s, "w0", 0.0).await;
    let w0 = s.gateway.pool().get("w0").expect("w0");
    assert_eq!((w0.inflight(), w0.queued()), (1, 0));
    within("queued ref forgotten", async {
        while s.gateway.proxy.routes.queued_refs() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The slot it waited for is not lost: after the first build, the next runs at once.
    fake.state.release.notify_one();
    within("first build", first)
        .await
        .expect("join")
        .expect("first build");
    let mut c = s.client.clone();
    within("next build", c.solve(solve("c-next", "", "project-c")))
        .await
        .expect("next build");
    let refs: Vec<String> = fake
        .state
        .solves
        .lock()
        .expect("lock")
        .iter()
        .map(|r| r.r#ref.clone())
        .collect();
    assert_eq!(
        refs,
        ["c-first", "c-next"],
        "the cancelled build reached the worker"
    );
    assert_eq!(w0.inflight(), 0);
}

#[tokio::test]
async fn build_queued_past_the_queue_timeout_fails_naming_the_worker() {
    let backends = [Backend::start("w0").await];
    let timeouts = Timeouts {
        queue: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let s = setup_with(
        backends.iter().map(Backend::member).collect(),
        limited(1, timeouts),
    )
    .await;
    let fake = &backends[0].fake;
    let mut first = solve("t-first", "", "project-t");
    first.frontend_attrs.insert("wait".into(), "1".into());
    let mut c = s.client.clone();
    let first = tokio::spawn(async move { c.solve(first).await });
    fake.wait_for("first build on the worker", |f| {
        f.state.solves.lock().expect("lock").len() == 1
    })
    .await;
    let mut c = s.client.clone();
    let err = within("timed-out build", c.solve(solve("t-late", "", "project-t")))
        .await
        .expect_err("a build past the queue timeout succeeded");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    for part in ["t-late", "w0", "limit of 1", "queue"] {
        assert!(
            err.message().contains(part),
            "{part} not in {:?}",
            err.message()
        );
    }
    wait_queue_depth(&s, "w0", 0.0).await;
    fake.state.release.notify_one();
    within("first build", first)
        .await
        .expect("join")
        .expect("first build");
    assert_eq!(fake.state.solves.lock().expect("lock").len(), 1);
}
