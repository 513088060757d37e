//! `BuildWorkerPool` reconcile against a mocked API server (kube-rs `tower-test` pattern): the
//! mock keeps the objects it is sent, answers GETs from them, and records every request so the
//! tests can check methods, paths, content types and bodies. When `KUBECONFIG` is set the last
//! test runs the same flow against that real cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use kiln_controller::crd::BuildWorkerPool;
use kiln_controller::reconcile::{pool::reconcile, Context};
use kiln_controller::render;
use kiln_controller::tls;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::validate::{non_default_spec, pool};

const APPLY: &str = "application/apply-patch+yaml";
const NS: &str = "/namespaces/builds";

/// One request the controller sent.
#[derive(Clone, Debug)]
struct Sent {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Option<Value>,
}

impl Sent {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The mocked API server's state: stored objects by path, and the request log.
#[derive(Default)]
struct Fake {
    objects: BTreeMap<String, Value>,
    log: Vec<Sent>,
}

type Shared = Arc<Mutex<Fake>>;

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

/// Answers one request from the store.
fn answer(fake: &mut Fake, sent: &Sent) -> (StatusCode, Value) {
    match sent.method.as_str() {
        "GET" => match fake.objects.get(&sent.path) {
            Some(v) => (StatusCode::OK, v.clone()),
            None => (StatusCode::NOT_FOUND, not_found()),
        },
        "PATCH" => {
            let body = sent.body.clone().unwrap_or(Value::Null);
            if let Some(parent) = sent.path.strip_suffix("/status") {
                let Some(obj) = fake.objects.get_mut(parent) else {
                    return (StatusCode::NOT_FOUND, not_found());
                };
                obj["status"] = body["status"].clone();
                return (StatusCode::OK, obj.clone());
            }
            let mut obj = body;
            if let Some(old) = fake.objects.get(&sent.path) {
                if let Some(status) = old.get("status") {
                    obj["status"] = status.clone();
                }
            }
            obj["metadata"]["uid"] = json!(format!("uid-{}", sent.path.len()));
            fake.objects.insert(sent.path.clone(), obj.clone());
            (StatusCode::OK, obj)
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, not_found()),
    }
}

/// A client whose requests go to the fake, served on a background task.
fn mock_client(fake: Shared) -> kube::Client {
    super::mockapi::client(move |parts, bytes| {
        let sent = Sent {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: super::mockapi::content_type(parts),
            body: super::mockapi::json_body(bytes),
        };
        let mut f = lock(&fake);
        let out = answer(&mut f, &sent);
        f.log.push(sent);
        out
    })
}

/// 2027-01-15T08:00:00Z.
fn start() -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_800_000_000)
}

/// The fake's state; a panic elsewhere must not hide what was recorded.
fn lock(fake: &Shared) -> std::sync::MutexGuard<'_, Fake> {
    fake.lock().unwrap_or_else(|e| e.into_inner())
}

fn context(client: kube::Client, at: OffsetDateTime) -> Arc<Context> {
    Arc::new(Context {
        client,
        clock: Arc::new(move || at),
        admin: Default::default(),
        usage: Arc::new(FakeUsage(BTreeMap::new())),
    })
}

/// Cache usage per worker, as the gateway's DiskUsage would give it.
struct FakeUsage(BTreeMap<String, i64>);

impl kiln_controller::reconcile::usage::UsageReader for FakeUsage {
    fn read(
        &self,
        target: kiln_controller::reconcile::usage::GatewayTarget,
    ) -> futures::future::BoxFuture<'static, Result<BTreeMap<String, i64>, String>> {
        let out = self.0.clone();
        Box::pin(async move {
            // The identity is the controller's, read from its Secret.
            if !target.cert_pem.contains("BEGIN CERTIFICATE") {
                return Err(format!("no client certificate for {}", target.addr));
            }
            Ok(out)
        })
    }
}

/// Runs one reconcile and returns the requests it sent.
async fn run(
    fake: &Shared,
    pool: &BuildWorkerPool,
    at: OffsetDateTime,
) -> anyhow::Result<Vec<Sent>> {
    let before = lock(fake).log.len();
    let ctx = context(mock_client(fake.clone()), at);
    reconcile(Arc::new(pool.clone()), ctx).await?;
    Ok(lock(fake).log[before..].to_vec())
}

fn pool_path(p: &BuildWorkerPool) -> String {
    format!(
        "/apis/kiln.dev/v1alpha1{NS}/buildworkerpools/{}",
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The pool as the fake now holds its status.
fn with_stored_status(fake: &Shared, mut p: BuildWorkerPool) -> BuildWorkerPool {
    p.status = lock(fake)
        .objects
        .get(&pool_path(&p))
        .and_then(|o| serde_json::from_value(o["status"].clone()).ok());
    p
}

fn seed_pool(fake: &Shared, p: &BuildWorkerPool) -> anyhow::Result<()> {
    let value = serde_json::to_value(p)?;
    lock(fake).objects.insert(pool_path(p), value);
    Ok(())
}

fn lines(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(Sent::line).collect()
}

fn secret_path(name: &str) -> String {
    format!("/api/v1{NS}/secrets/{name}")
}

/// The status (`True`/`False`) of a condition, or `missing`.
fn condition(status: &Value, type_: &str) -> String {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("missing")
        .to_string()
}

fn new_pool(spec: Value) -> anyhow::Result<BuildWorkerPool> {
    let mut p = pool("p", spec)?;
    p.metadata.generation = Some(1);
    Ok(p)
}

#[tokio::test]
async fn create_applies_exactly_the_rendered_objects() {
    let fake = Shared::default();
    let p = new_pool(json!({})).unwrap();
    seed_pool(&fake, &p).unwrap();
    let sent = run(&fake, &p, start()).await.unwrap();

    let secret_lines = |name: &str| {
        vec![
            format!("GET {}", secret_path(name)),
            format!("PATCH {}", secret_path(name)),
        ]
    };
    let mut want = Vec::new();
    for s in [
        "p-ca",
        "p-server-tls",
        "p-gateway-client-tls",
        "p-controller-client-tls",
        "p-client-tls",
    ] {
        want.extend(secret_lines(s));
    }
    want.extend([
        format!("PATCH /api/v1{NS}/configmaps/p-worker-config"),
        format!("PATCH /api/v1{NS}/serviceaccounts/p-gateway"),
        format!("PATCH /apis/rbac.authorization.k8s.io/v1{NS}/roles/p-gateway"),
        format!("PATCH /apis/rbac.authorization.k8s.io/v1{NS}/rolebindings/p-gateway"),
        format!("PATCH /api/v1{NS}/services/p-workers"),
        format!("PATCH /api/v1{NS}/services/p-gateway"),
        format!("PATCH /apis/policy/v1{NS}/poddisruptionbudgets/p-workers"),
        format!("PATCH /apis/apps/v1{NS}/statefulsets/p-worker"),
        format!("PATCH /apis/apps/v1{NS}/deployments/p-gateway"),
        // The controller's identity, to read the workers' cache usage through the gateway.
        format!("GET {}", secret_path("p-controller-client-tls")),
        format!("PATCH /apis/kiln.dev/v1alpha1{NS}/buildworkerpools/p/status"),
    ]);
    assert_eq!(lines(&sent), want);

    for s in sent.iter().filter(|s| s.method == "PATCH") {
        assert_eq!(s.content_type, APPLY, "{}", s.line());
        assert!(
            s.query.contains("fieldManager=kiln-controller"),
            "{}: {}",
            s.line(),
            s.query
        );
        assert!(s.query.contains("force=true"), "{}: {}", s.line(), s.query);
    }

    // Workload bodies are exactly what render() produces.
    let rendered = render::render(&p).unwrap().to_values().unwrap();
    let bodies: Vec<Value> = sent[10..19]
        .iter()
        .map(|s| s.body.clone().unwrap())
        .collect();
    assert_eq!(bodies, rendered);

    // The server certificate covers the gateway and all three workers, signed by the CA.
    let server = &sent[3].body.clone().unwrap();
    assert_eq!(server["type"], "kubernetes.io/tls");
    assert_eq!(
        server["metadata"]["ownerReferences"][0]["kind"],
        "BuildWorkerPool"
    );
    let pem = |v: &Value, key: &str| {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD
            .decode(v["data"][key].as_str().unwrap())
            .unwrap();
        String::from_utf8(b).unwrap()
    };
    let info = tls::inspect(&pem(server, "tls.crt"), "tls.crt").unwrap();
    for n in [
        "p-gateway.builds.svc",
        "p-worker-2.p-workers.builds.svc.cluster.local",
    ] {
        assert!(
            info.names.iter().any(|x| x == n),
            "{n} not in {:?}",
            info.names
        );
    }
    // The users' Secret also works as a `--tlsdir` directory.
    let user = sent[9].body.clone().unwrap();
    assert_eq!(sent[9].path, secret_path("p-client-tls"));
    assert_eq!(pem(&user, "cert.pem"), pem(&user, "tls.crt"));
    assert_eq!(pem(&user, "key.pem"), pem(&user, "tls.key"));
    assert_eq!(pem(&user, "ca.pem"), pem(&user, "ca.crt"));
    assert!(server["data"].get("cert.pem").is_none());
    let ca = sent[1].body.clone().unwrap();
    assert!(tls::signed_by(&pem(server, "tls.crt"), &pem(&ca, "ca.crt")));
    assert_eq!(pem(server, "ca.crt"), pem(&ca, "ca.crt"));

    // Status: nothing is ready yet, so Progressing; the certificate expiry is reported.
    let status = &sent[20].body.clone().unwrap()["status"];
    assert_eq!(condition(status, "Ready"), "False");
    assert_eq!(condition(status, "Progressing"), "True");
    assert_eq!(condition(status, "Degraded"), "False");
    assert_eq!(status["observedGeneration"], 1);
    let not_after = status["certificateNotAfter"].as_str().unwrap();
    assert_eq!(not_after, "2027-04-15T08:00:00Z"); // start (2027-01-15T08:00:00Z) + 90d
}

#[tokio::test]
async fn second_reconcile_only_reapplies_and_reports_ready() {
    let fake = Shared::default();
    let p = new_pool(json!({})).unwrap();
    seed_pool(&fake, &p).unwrap();
    let first = run(&fake, &p, start()).await.unwrap();

    // The cluster brings everything up.
    {
        let mut f = fake.lock().unwrap();
        f.objects
            .get_mut(&format!("/apis/apps/v1{NS}/statefulsets/p-worker"))
            .unwrap()["status"] = json!({"replicas": 3, "readyReplicas": 3});
        f.objects
            .get_mut(&format!("/apis/apps/v1{NS}/deployments/p-gateway"))
            .unwrap()["status"] = json!({"replicas": 2, "readyReplicas": 2});
    }
    let later = start() + time::Duration::hours(1);
    let p2 = with_stored_status(&fake, p.clone());
    let second = run(&fake, &p2, later).await.unwrap();
    // No certificate is issued again; the same apply bodies; a status saying Ready.
    assert!(
        !second
            .iter()
            .any(|s| s.method == "PATCH" && s.path.contains("/secrets/")),
        "{:?}",
        lines(&second)
    );
    let applies = |v: &[Sent]| -> Vec<Value> {
        v.iter()
            .filter(|s| {
                s.method == "PATCH" && !s.path.contains("/secrets/") && !s.path.ends_with("/status")
            })
            .map(|s| s.body.clone().unwrap())
            .collect()
    };
    assert_eq!(applies(&first), applies(&second));
    let status = &second.last().unwrap().body.clone().unwrap()["status"];
    assert_eq!(condition(status, "Ready"), "True");
    assert_eq!(condition(status, "Progressing"), "False");
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["gatewayReadyReplicas"], 2);

    // A third run with everything right sends the same applies and nothing else.
    let p3 = with_stored_status(&fake, p);
    let third = run(&fake, &p3, later + time::Duration::hours(1))
        .await
        .unwrap();
    assert!(third
        .iter()
        .all(|s| s.method == "GET" || !s.path.contains("/secrets/")));
    assert!(
        !third.iter().any(|s| s.path.ends_with("/status")),
        "{:?}",
        lines(&third)
    );
    assert_eq!(applies(&third), applies(&second));
    assert_eq!(third.iter().filter(|s| s.method == "PATCH").count(), 9);
}

#[tokio::test]
async fn scaling_reissues_only_the_server_certificate() {
    let fake = Shared::default();
    let p = new_pool(json!({})).unwrap();
    seed_pool(&fake, &p).unwrap();
    let before = run(&fake, &p, start()).await.unwrap();
    let mut scaled = with_stored_status(&fake, p);
    scaled.spec.replicas = 4;
    let sent = run(&fake, &scaled, start()).await.unwrap();
    // Of the workload applies, only the StatefulSet's body changed.
    let bodies = |v: &[Sent]| -> BTreeMap<String, Value> {
        v.iter()
            .filter(|s| {
                s.method == "PATCH" && !s.path.contains("/secrets/") && !s.path.ends_with("/status")
            })
            .map(|s| (s.path.clone(), s.body.clone().unwrap_or_default()))
            .collect()
    };
    let (old, new) = (bodies(&before), bodies(&sent));
    assert_eq!(old.len(), 9);
    let changed: Vec<_> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        changed,
        [format!("/apis/apps/v1{NS}/statefulsets/p-worker")]
    );
    let secret_patches: Vec<_> = sent
        .iter()
        .filter(|s| s.method == "PATCH" && s.path.contains("/secrets/"))
        .collect();
    assert_eq!(secret_patches.len(), 1, "{:?}", lines(&sent));
    assert_eq!(secret_patches[0].path, secret_path("p-server-tls"));
    let sts = sent
        .iter()
        .find(|s| s.path.ends_with("/statefulsets/p-worker"))
        .unwrap();
    assert_eq!(sts.body.as_ref().unwrap()["spec"]["replicas"], 4);
}

#[tokio::test]
async fn certificates_near_expiry_are_rotated_and_the_ca_kept() {
    let fake = Shared::default();
    let p = new_pool(json!({})).unwrap();
    seed_pool(&fake, &p).unwrap();
    run(&fake, &p, start()).await.unwrap();
    let p2 = with_stored_status(&fake, p);
    // 61 days into a 90-day lifetime with renewBefore 30d: every leaf renews, the CA
    // (4 × 90 days) does not.
    let sent = run(&fake, &p2, start() + time::Duration::days(61))
        .await
        .unwrap();
    let patched: Vec<_> = sent
        .iter()
        .filter(|s| s.method == "PATCH" && s.path.contains("/secrets/"))
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        patched,
        [
            "p-server-tls",
            "p-gateway-client-tls",
            "p-controller-client-tls",
            "p-client-tls"
        ]
        .map(secret_path)
    );
    let status = &sent.last().unwrap().body.clone().unwrap()["status"];
    let not_after = status["certificateNotAfter"].as_str().unwrap();
    assert_eq!(not_after, "2027-06-15T08:00:00Z"); // start + 61d + 90d
}

#[tokio::test]
async fn ca_rollover_spreads_trust_before_reissuing() {
    use base64::Engine as _;
    let fake = Shared::default();
    let p = new_pool(json!({})).unwrap();
    seed_pool(&fake, &p).unwrap();
    let day = |d: i64| start() + time::Duration::days(d);
    // Leaves (90d) renew every 60 days; the CA (360d) enters its 30-day window at day 330.
    for d in [0, 61, 122, 183, 244, 305] {
        let p = with_stored_status(&fake, p.clone());
        run(&fake, &p, day(d)).await.unwrap();
    }
    let stored = |path: &str, key: &str| -> String {
        let f = lock(&fake);
        let b64 = f.objects[path]["data"][key]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default();
        String::from_utf8(raw).unwrap_or_default()
    };
    let leaves = [
        "p-server-tls",
        "p-gateway-client-tls",
        "p-controller-client-tls",
        "p-client-tls",
    ];
    let old_ca = stored(&secret_path("p-ca"), "ca.crt");
    let old_certs: Vec<String> = leaves
        .iter()
        .map(|l| stored(&secret_path(l), "tls.crt"))
        .collect();

    // Day 331: a new CA; certificates stay, their ca.crt trusts both CAs.
    let sent = run(&fake, &with_stored_status(&fake, p.clone()), day(331))
        .await
        .unwrap();
    let patched = |v: &[Sent]| -> Vec<String> {
        v.iter()
            .filter(|s| s.method == "PATCH" && s.path.contains("/secrets/"))
            .map(|s| s.path.clone())
            .collect()
    };
    let mut want = vec![secret_path("p-ca")];
    want.extend(leaves.map(secret_path));
    assert_eq!(patched(&sent), want);
    let new_ca = stored(&secret_path("p-ca"), "ca.crt");
    assert_ne!(new_ca, old_ca);
    assert_eq!(stored(&secret_path("p-ca"), "previous-ca.crt"), old_ca);
    for (l, old) in leaves.iter().zip(&old_certs) {
        assert_eq!(
            &stored(&secret_path(l), "tls.crt"),
            old,
            "{l} reissued too early"
        );
        assert_eq!(
            stored(&secret_path(l), "ca.crt"),
            format!("{new_ca}{old_ca}")
        );
    }

    // After the grace period: every certificate is reissued by the new CA.
    let later = day(331) + time::Duration::hours(1);
    let sent = run(&fake, &with_stored_status(&fake, p.clone()), later)
        .await
        .unwrap();
    assert_eq!(patched(&sent), leaves.map(secret_path));
    for l in leaves {
        let cert = stored(&secret_path(l), "tls.crt");
        assert!(
            tls::signed_by(&cert, &new_ca),
            "{l} not signed by the new CA"
        );
        assert_eq!(
            stored(&secret_path(l), "ca.crt"),
            format!("{new_ca}{old_ca}")
        );
    }

    // And then nothing more to do.
    let sent = run(
        &fake,
        &with_stored_status(&fake, p),
        later + time::Duration::hours(1),
    )
    .await
    .unwrap();
    assert!(patched(&sent).is_empty(), "{:?}", lines(&sent));
}

#[tokio::test]
async fn missing_existing_secret_is_degraded_and_nothing_is_issued() {
    let fake = Shared::default();
    let p = new_pool(non_default_spec()).unwrap();
    seed_pool(&fake, &p).unwrap();
    let sent = run(&fake, &p, start()).await.unwrap();
    assert_eq!(
        sent[0].line(),
        format!("GET {}", secret_path("my-kiln-tls"))
    );
    assert!(!sent
        .iter()
        .any(|s| s.method == "PATCH" && s.path.contains("/secrets/")));
    let status = &sent.last().unwrap().body.clone().unwrap()["status"];
    assert_eq!(condition(status, "Degraded"), "True");
    assert_eq!(condition(status, "Ready"), "False");
    let msg = status["conditions"][2]["message"].as_str().unwrap();
    assert!(msg.contains("builds/my-kiln-tls not found"), "{msg}");
}

#[tokio::test]
async fn invalid_spec_is_reported_in_status_without_applying() {
    let fake = Shared::default();
    let p = new_pool(json!({"tls": {"lifetime": "7d", "renewBefore": "30d"}})).unwrap();
    seed_pool(&fake, &p).unwrap();
    let sent = run(&fake, &p, start()).await.unwrap();
    assert_eq!(
        lines(&sent),
        [format!(
            "PATCH /apis/kiln.dev/v1alpha1{NS}/buildworkerpools/p/status"
        )]
    );
    let status = &sent[0].body.clone().unwrap()["status"];
    assert_eq!(condition(status, "Degraded"), "True");
    let msg = status["conditions"][2]["message"].as_str().unwrap();
    assert!(msg.contains("spec.tls.renewBefore"), "{msg}");
}

/// The same create-then-idempotent flow against a real cluster, when `KUBECONFIG` is set.
#[tokio::test]
async fn real_cluster_when_kubeconfig_is_set() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("KUBECONFIG not set: the real-cluster variant is skipped (mocked tests ran)");
        return;
    }
    crate::cluster::create_and_reconcile_twice().await.unwrap();
}

// === autoscaling ===

/// A gateway's admin endpoint, faked: it lists its workers' load and drains as told.
#[derive(Default)]
struct AdminFake {
    /// `(name, inflight, queued, draining)`.
    workers: Vec<(String, i64, i64, bool)>,
    requests: Vec<String>,
}

/// Serves `admin` as plain HTTP on loopback; returns its base URL.
async fn admin_server(admin: Arc<Mutex<AdminFake>>) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let body = {
                let mut a = admin.lock().unwrap_or_else(|e| e.into_inner());
                a.requests.push(format!("{method} {path}"));
                if let Some(w) = path.strip_prefix("/drain?worker=") {
                    for x in a.workers.iter_mut().filter(|x| x.0 == w) {
                        x.3 = true;
                    }
                }
                if let Some(w) = path.strip_prefix("/undrain?worker=") {
                    for x in a.workers.iter_mut().filter(|x| x.0 == w) {
                        x.3 = false;
                    }
                }
                a.workers
                    .iter()
                    .map(|(name, inflight, queued, draining)| {
                        format!("{name} tcp://{name}:1234 healthy=true draining={draining} inflight={inflight} queued={queued} limit=unlimited\n")
                    })
                    .collect::<String>()
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    format!("http://{addr}")
}

async fn run_scaled(
    fake: &Shared,
    pool: &BuildWorkerPool,
    at: OffsetDateTime,
    admin_url: &str,
) -> anyhow::Result<Vec<Sent>> {
    let before = lock(fake).log.len();
    let ctx = Arc::new(Context {
        client: mock_client(fake.clone()),
        clock: Arc::new(move || at),
        admin: kiln_controller::reconcile::autoscale::AdminSettings {
            endpoints_override: Some(vec![admin_url.to_string()]),
            plain_http: true,
        },
        usage: Arc::new(FakeUsage(BTreeMap::from([
            ("p-worker-0".to_string(), 1000),
            ("p-worker-1".to_string(), 2000),
        ]))),
    });
    reconcile(Arc::new(with_stored_status(fake, pool.clone())), ctx).await?;
    Ok(lock(fake).log[before..].to_vec())
}

/// The replicas of the StatefulSet applied in `sent`.
fn applied_replicas(sent: &[Sent]) -> Option<i64> {
    sent.iter()
        .find(|s| s.path == format!("/apis/apps/v1{NS}/statefulsets/p-worker"))
        .and_then(|s| s.body.as_ref()?["spec"]["replicas"].as_i64())
}

#[tokio::test]
async fn autoscaling_grows_on_queued_builds_and_drains_before_it_shrinks() {
    let fake = Shared::default();
    let p = new_pool(
        json!({"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 3,
        "targetInflightPerWorker": 2, "scaleDownDelay": "60s"}}),
    )
    .unwrap();
    seed_pool(&fake, &p).unwrap();
    let admin = Arc::new(Mutex::new(AdminFake::default()));
    let url = admin_server(admin.clone()).await;
    let set = |load: &[(&str, i64, i64)]| {
        let mut a = admin.lock().unwrap();
        let draining: Vec<String> = a
            .workers
            .iter()
            .filter(|w| w.3)
            .map(|w| w.0.clone())
            .collect();
        a.workers = load
            .iter()
            .map(|(n, i, q)| (n.to_string(), *i, *q, draining.contains(&n.to_string())))
            .collect();
    };

    // Builds queue: one more worker.
    set(&[("p-worker-0", 2, 1), ("p-worker-1", 2, 0)]);
    let sent = run_scaled(&fake, &p, start(), &url).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(3));
    let st = lock(&fake).objects[&pool_path(&p)]["status"].clone();
    assert_eq!(st["autoscaling"]["desiredReplicas"], 3);
    assert_eq!(
        st["workers"],
        json!([{"name": "p-worker-0", "inflight": 2, "queued": 1, "draining": false, "usedBytes": 1000},
               {"name": "p-worker-1", "inflight": 2, "queued": 0, "draining": false, "usedBytes": 2000}])
    );
    // The server certificate names every worker up to maxReplicas.
    let server = lock(&fake).objects[&secret_path("p-server-tls")].clone();
    let crt = {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD
            .decode(server["data"]["tls.crt"].as_str().unwrap())
            .unwrap();
        String::from_utf8(b).unwrap()
    };
    let names = tls::inspect(&crt, "tls.crt").unwrap().names;
    assert!(
        names
            .iter()
            .any(|n| n == "p-worker-2.p-workers.builds.svc.cluster.local"),
        "{names:?}"
    );

    // Idle: nothing changes until the delay has passed.
    set(&[
        ("p-worker-0", 0, 0),
        ("p-worker-1", 0, 0),
        ("p-worker-2", 0, 0),
    ]);
    let t = |s: i64| start() + time::Duration::seconds(s);
    let sent = run_scaled(&fake, &p, t(10), &url).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(3));
    let sent = run_scaled(&fake, &p, t(40), &url).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(3));
    assert!(!admin
        .lock()
        .unwrap()
        .requests
        .iter()
        .any(|r| r.starts_with("POST")));

    // The delay passed: the highest ordinal is drained first, the replicas stay.
    let sent = run_scaled(&fake, &p, t(75), &url).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(3));
    assert!(admin
        .lock()
        .unwrap()
        .requests
        .contains(&"POST /drain?worker=p-worker-2".to_string()));
    let st = lock(&fake).objects[&pool_path(&p)]["status"].clone();
    assert_eq!(st["autoscaling"]["draining"], "p-worker-2");

    // A build still runs on it: wait.
    set(&[
        ("p-worker-0", 0, 0),
        ("p-worker-1", 0, 0),
        ("p-worker-2", 1, 0),
    ]);
    let sent = run_scaled(&fake, &p, t(90), &url).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(3));

    // Its inflight reached 0: now the StatefulSet shrinks by one.
    set(&[
        ("p-worker-0", 0, 0),
        ("p-worker-1", 0, 0),
        ("p-worker-2", 0, 0),
    ]);
    let sent = run_scaled(&fake, &p, t(100), &url).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(2));
    let st = lock(&fake).objects[&pool_path(&p)]["status"].clone();
    assert_eq!(st["autoscaling"]["desiredReplicas"], 2);
    assert!(st["autoscaling"].get("draining").is_none(), "{st:#}");
}

#[tokio::test]
async fn autoscaling_keeps_the_replicas_when_the_gateways_cannot_be_read() {
    let fake = Shared::default();
    let p = new_pool(json!({"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}))
        .unwrap();
    seed_pool(&fake, &p).unwrap();
    // Nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let sent = run_scaled(&fake, &p, start(), &closed).await.unwrap();
    assert_eq!(applied_replicas(&sent), Some(2));
}

/// The autoscaler reads and drains through the gateway's real admin endpoint over mutual
/// TLS, with the client certificate from the pool's controller Secret.
#[tokio::test]
async fn autoscaling_speaks_mutual_tls_to_the_real_gateway_admin_endpoint() {
    use kiln_gateway::health::{Member, Pool};
    use kiln_proto::transport::{Addr, ServeTls, TlsFiles};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = kiln_e2e::pki::Ca::new("clients").unwrap();
    let server = ca
        .server(dir.path(), "gateway", &["p-gateway.builds.svc"])
        .unwrap();
    let client = ca.client(dir.path(), "controller").unwrap();

    let gw = Pool::new(10, 1.25, kiln_gateway::metrics::Metrics::new().unwrap());
    gw.set_members(&[
        Member {
            name: "p-worker-0".into(),
            addr: "tcp://127.0.0.1:9".into(),
        },
        Member {
            name: "p-worker-1".into(),
            addr: "tcp://127.0.0.1:9".into(),
        },
    ])
    .unwrap();
    let tls = ServeTls::from_flags(
        TlsFiles {
            ca: Some(server.ca.clone()),
            cert: Some(server.cert.clone()),
            key: Some(server.key.clone()),
        },
        false,
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let incoming = tls
        .listen(&Addr::Tcp(format!("127.0.0.1:{port}")))
        .await
        .unwrap();
    tokio::spawn(kiln_gateway::admin::serve_tls(gw.clone(), incoming));

    let fake = Shared::default();
    let p = new_pool(
        json!({"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 2,
        "scaleDownDelay": "0s"}}),
    )
    .unwrap();
    seed_pool(&fake, &p).unwrap();
    let read = |f: &std::path::Path| std::fs::read_to_string(f).unwrap();
    let ctx = |identity: &kiln_e2e::pki::Identity| {
        let mut s = k8s_openapi::api::core::v1::Secret::default();
        s.metadata.name = Some("p-controller-client-tls".into());
        s.data = Some(
            [
                ("ca.crt", read(&identity.ca)),
                ("tls.crt", read(&identity.cert)),
                ("tls.key", read(&identity.key)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.into_bytes())))
            .collect(),
        );
        s
    };
    let admin = kiln_controller::reconcile::autoscale::AdminSettings {
        endpoints_override: Some(vec![format!("https://127.0.0.1:{port}")]),
        plain_http: false,
    };
    let step = |secret: k8s_openapi::api::core::v1::Secret| {
        let fake = fake.clone();
        let p = with_stored_status(&fake, p.clone());
        let admin = admin.clone();
        async move {
            lock(&fake).objects.insert(
                secret_path("p-controller-client-tls"),
                serde_json::to_value(secret).unwrap(),
            );
            let ctx = Context {
                client: mock_client(fake.clone()),
                clock: Arc::new(start),
                admin,
                usage: Arc::new(FakeUsage(BTreeMap::new())),
            };
            let spec = p.spec.autoscaling.clone().unwrap();
            kiln_controller::reconcile::autoscale::step(&p, &spec, &ctx, "builds", start()).await
        }
    };

    // The controller's certificate: the listing comes back and the idle pool's last worker
    // is drained on the gateway.
    let first = step(ctx(&client)).await.unwrap();
    let names: Vec<&str> = first.1.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["p-worker-0", "p-worker-1"]);
    assert_eq!(first.0.drain.as_deref(), Some("p-worker-1"));
    assert!(gw.get("p-worker-1").is_some_and(|w| w.is_draining()));

    // A certificate from another CA is refused: an error naming the endpoint, no drain.
    gw.set_draining("p-worker-1", false);
    let other = kiln_e2e::pki::Ca::new("other").unwrap();
    let stranger = other.client(&dir.path().join("o"), "stranger").unwrap();
    let mut bad = ctx(&stranger);
    // It trusts the right CA, so only the client certificate is wrong.
    bad.data.as_mut().unwrap().insert(
        "ca.crt".into(),
        k8s_openapi::ByteString(read(&client.ca).into_bytes()),
    );
    let err = step(bad).await.unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(gw.get("p-worker-1").is_some_and(|w| !w.is_draining()));
}
