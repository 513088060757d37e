//! EndpointSlice discovery against a scripted mock API server (kube-rs `tower-test`
//! pattern): the mock answers the watcher's list with the initial slices and each watch
//! with the next batch of events the test scripts, and records every request. Checked:
//! a ready endpoint joins, a not-ready one is not routed to, a terminating one is drained
//! (no new builds, its running build goes on), a deleted slice's workers leave.
//!
//! When `KUBECONFIG` is set, `real_cluster_endpointslices` runs a thin version against that
//! cluster: it creates an EndpointSlice of its own (namespace `KILN_TEST_NAMESPACE`, default
//! `default`), sees its worker join, deletes it and sees the worker leave.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kiln_gateway::discovery::endpointslice::{self, Target};
use kiln_gateway::health::Pool;
use kiln_gateway::metrics::Metrics;
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const GUARD: Duration = Duration::from_secs(20);

fn endpoint(ip: &str, pod: &str, ready: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": "builds", "name": pod},
    })
}

fn slice(name: &str, rv: u32, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "builds",
            "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": "kiln-workers"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"},
                  {"name": "grpc", "port": 1234, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

/// The requests the mock saw: `(method, path, query)`.
type Log = Arc<Mutex<Vec<(String, String, String)>>>;

/// A client whose list gets `initial` and whose watches get the batches sent on the
/// returned channel, one batch per watch request (a watch waits for its batch).
fn mock_client(initial: Vec<Value>) -> (kube::Client, mpsc::UnboundedSender<Vec<Value>>, Log) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (tx, mut batches) = mpsc::unbounded_channel::<Vec<Value>>();
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            seen.lock().expect("lock").push((
                req.method().to_string(),
                path.clone(),
                query.clone(),
            ));
            let (code, body) = if req.method() != http::Method::GET
                || path != "/apis/discovery.k8s.io/v1/namespaces/builds/endpointslices"
            {
                (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "code": 404}).to_string(),
                )
            } else if query.contains("watch=true") {
                match batches.recv().await {
                    Some(events) => (
                        StatusCode::OK,
                        events
                            .iter()
                            .map(|e| e.to_string() + "\n")
                            .collect::<String>(),
                    ),
                    // Script over: this watch stays open until the test ends.
                    None => futures::future::pending().await,
                }
            } else {
                let list = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": "10"},
                    "items": initial,
                });
                (StatusCode::OK, list.to_string())
            };
            let mut resp = Response::new(Body::from(body.into_bytes()));
            *resp.status_mut() = code;
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            send.send_response(resp);
        }
    });
    (kube::Client::new(service, "builds"), tx, log)
}

/// `(name, addr, draining)` of every member, sorted by name.
fn state(pool: &Pool) -> Vec<(String, String, bool)> {
    pool.workers()
        .iter()
        .map(|w| (w.name.clone(), w.addr.clone(), w.is_draining()))
        .collect()
}

async fn wait_until(pool: &Pool, what: &str, want: &[(&str, &str, bool)]) {
    let want: Vec<(String, String, bool)> = want
        .iter()
        .map(|(n, a, d)| (n.to_string(), a.to_string(), *d))
        .collect();
    let start = tokio::time::Instant::now();
    loop {
        let now = state(pool);
        if now == want {
            return;
        }
        if start.elapsed() > GUARD {
            panic!("{what}: pool is {now:?}, want {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ready_not_ready_terminating_and_deleted_endpoints() {
    let pool = Pool::new(40, 1.25, Metrics::new().expect("metrics"));
    let (client, script, log) = mock_client(vec![slice(
        "kiln-workers-abc",
        5,
        vec![
            endpoint("10.0.0.1", "w-0", true, false),
            endpoint("10.0.0.2", "w-1", false, false),
        ],
    )]);
    let target: Target = "builds/kiln-workers".parse().expect("target");
    let task = tokio::spawn(endpointslice::run(pool.clone(), client, target));

    // Listed: the ready endpoint joins; the not-ready one is not routed to.
    wait_until(
        &pool,
        "initial list",
        &[("w-0", "tcp://10.0.0.1:1234", false)],
    )
    .await;
    {
        let log = log.lock().expect("lock");
        let (method, _, query) = &log[0];
        assert_eq!(method, "GET");
        assert!(
            query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dkiln-workers"),
            "list query {query}"
        );
    }
    // A build running on w-0.
    let (running_on, running) = pool.pick("project", &[]).expect("pick");
    assert_eq!(running_on.name, "w-0");

    // w-0's pod terminates while w-1 becomes ready.
    script
        .send(vec![event(
            "MODIFIED",
            slice(
                "kiln-workers-abc",
                11,
                vec![
                    endpoint("10.0.0.1", "w-0", false, true),
                    endpoint("10.0.0.2", "w-1", true, false),
                ],
            ),
        )])
        .expect("script");
    wait_until(
        &pool,
        "w-0 terminating, w-1 ready",
        &[
            ("w-0", "tcp://10.0.0.1:1234", true),
            ("w-1", "tcp://10.0.0.2:1234", false),
        ],
    )
    .await;
    let available: Vec<String> = pool.available().iter().map(|w| w.name.clone()).collect();
    assert_eq!(
        available,
        ["w-1"],
        "a terminating worker is still routed to"
    );
    let (next, _g) = pool.pick("project", &[]).expect("pick");
    assert_eq!(
        next.name, "w-1",
        "a new build went to the terminating worker"
    );
    // The running build keeps its worker, the same one the pool still holds.
    assert_eq!(running_on.inflight(), 1);
    assert!(Arc::ptr_eq(
        &running_on,
        &pool.get("w-0").expect("w-0 still a member")
    ));

    // A second slice adds w-2; then the first slice is deleted: its workers leave.
    script
        .send(vec![
            event(
                "ADDED",
                slice(
                    "kiln-workers-def",
                    12,
                    vec![endpoint("10.0.0.3", "w-2", true, false)],
                ),
            ),
            event(
                "DELETED",
                slice(
                    "kiln-workers-abc",
                    13,
                    vec![endpoint("10.0.0.2", "w-1", true, false)],
                ),
            ),
        ])
        .expect("script");
    wait_until(
        &pool,
        "first slice deleted",
        &[("w-2", "tcp://10.0.0.3:1234", false)],
    )
    .await;
    // The build that ran on w-0 still holds it and ends normally.
    assert_eq!(running_on.inflight(), 1);
    drop(running);
    assert_eq!(running_on.inflight(), 0);
    let watches = log
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, _, q)| q.contains("watch=true"))
        .count();
    assert!(
        watches >= 2,
        "expected the watcher to re-watch, saw {watches} watches"
    );
    task.abort();
}

#[tokio::test]
async fn real_cluster_endpointslices() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("KUBECONFIG not set: the real-cluster variant is skipped (the mock test ran)");
        return;
    }
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = std::env::var("KILN_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let svc = format!("kiln-gw-es-{}", std::process::id());
    let client = kube::Client::try_default().await.expect("kube client");
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), &ns);
    let mut obj = slice(
        &format!("{svc}-x"),
        1,
        vec![endpoint("10.254.0.7", "w-7", true, false)],
    );
    obj["metadata"] = json!({
        "name": format!("{svc}-x"),
        "labels": {
            "kubernetes.io/service-name": svc,
            // Not the EndpointSlice controller's: it leaves this object alone.
            "endpointslice.kubernetes.io/managed-by": "kiln-gateway-test",
        },
    });
    let obj: EndpointSlice = serde_json::from_value(obj).expect("slice");
    api.create(&Default::default(), &obj)
        .await
        .expect("create slice");
    let pool = Pool::new(40, 1.25, Metrics::new().expect("metrics"));
    let target: Target = format!("{ns}/{svc}").parse().expect("target");
    let task = tokio::spawn(endpointslice::run(pool.clone(), client, target));
    let joined = tokio::time::timeout(
        GUARD,
        wait_until(
            &pool,
            "real cluster: slice created",
            &[("w-7", "tcp://10.254.0.7:1234", false)],
        ),
    )
    .await;
    api.delete(&format!("{svc}-x"), &Default::default())
        .await
        .expect("delete slice");
    joined.expect("join");
    wait_until(&pool, "real cluster: slice deleted", &[]).await;
    task.abort();
}
