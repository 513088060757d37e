//! `BuildJob` reconcile against a mocked API server (kube-rs `tower-test` pattern), with the
//! build itself done by a scripted [`Runner`] so the reconcile logic is tested alone: status
//! patches in order through success, failure, a lost worker retried, timeout, TTL deletion,
//! deletion of a running job, a controller restart, missing inputs; and a finished job left
//! untouched.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kiln_controller::crd::{BuildJob, BuildJobSpec, BuildWorkerPool, BuildWorkerPoolSpec};
use kiln_controller::reconcile::job::{
    self, BuildInput, Built, JobContext, Reporter, RunError, RunFuture, Runner, Settings,
};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc::UnboundedReceiver;

const NS: &str = "/namespaces/builds";
const SECRET_VALUE: &str = "s3cr3t-t0ken-value";

// === the mocked API server ===

#[derive(Clone, Debug)]
struct Sent {
    method: String,
    path: String,
    content_type: String,
    body: Option<Value>,
}

impl Sent {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct Fake {
    objects: BTreeMap<String, Value>,
    log: Vec<Sent>,
    /// Events the controller published (kept apart: they are sent in the background).
    events: Vec<Value>,
    version: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn lock(fake: &Shared) -> std::sync::MutexGuard<'_, Fake> {
    fake.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn answer(fake: &mut Fake, sent: &Sent) -> (StatusCode, Value) {
    match sent.method.as_str() {
        "GET" => match fake.objects.get(&sent.path) {
            Some(v) => (StatusCode::OK, v.clone()),
            None => (StatusCode::NOT_FOUND, not_found()),
        },
        "PATCH" => {
            let patch = sent.body.clone().unwrap_or(Value::Null);
            let path = sent.path.strip_suffix("/status").unwrap_or(&sent.path);
            fake.version += 1;
            let version = fake.version.to_string();
            let Some(obj) = fake.objects.get_mut(path) else {
                return (StatusCode::NOT_FOUND, not_found());
            };
            let mut patch = patch;
            if sent.path.ends_with("/status") {
                // The status subresource changes nothing but the status.
                patch = json!({"status": patch["status"].clone()});
            } else if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            merge(obj, &patch);
            obj["metadata"]["resourceVersion"] = json!(version);
            (StatusCode::OK, obj.clone())
        }
        "DELETE" => match fake.objects.remove(&sent.path) {
            Some(v) => (StatusCode::OK, v),
            None => (StatusCode::NOT_FOUND, not_found()),
        },
        _ => (StatusCode::METHOD_NOT_ALLOWED, not_found()),
    }
}

fn mock_client(fake: Shared) -> kube::Client {
    super::mockapi::client(move |parts, bytes| {
        let sent = Sent {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            content_type: super::mockapi::content_type(parts),
            body: super::mockapi::json_body(bytes),
        };
        let mut f = lock(&fake);
        if sent.path.ends_with("/events") && sent.method == "POST" {
            let body = sent.body.clone().unwrap_or(Value::Null);
            f.events.push(body.clone());
            (StatusCode::CREATED, body)
        } else {
            let out = answer(&mut f, &sent);
            f.log.push(sent);
            out
        }
    })
}

// === the scripted runner ===

/// What one call of the runner does.
#[derive(Clone, Debug)]
enum Step {
    Succeed(&'static str),
    Fail(&'static str),
    Lose(&'static str),
    Hang,
}

#[derive(Default)]
struct Script {
    steps: Mutex<VecDeque<Step>>,
    inputs: Mutex<Vec<BuildInput>>,
    /// Set when a hanging build's future is dropped (the build was cancelled).
    cancelled: Arc<AtomicBool>,
    /// What looking up an earlier process's build finds: `Succeed` a finished build,
    /// `Fail` a failed one, `Lose` none (the default when empty).
    found: Mutex<VecDeque<Step>>,
    /// The refs looked up.
    looked_up: Mutex<Vec<String>>,
}

struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Runner for Script {
    fn run(&self, input: BuildInput, report: Reporter) -> RunFuture {
        let step = self
            .steps
            .lock()
            .expect("test fixture")
            .pop_front()
            .unwrap_or(Step::Fail("script exhausted"));
        self.inputs.lock().expect("test fixture").push(input);
        // Dropping the future, at whatever point, marks a hanging build as cancelled.
        let flag = matches!(step, Step::Hang).then(|| DropFlag(self.cancelled.clone()));
        Box::pin(async move {
            let _flag = flag;
            report.worker("w1");
            report.line("#1 [internal] load build definition");
            report.line(&format!("#2 RUN cat /run/secrets/tok -> {SECRET_VALUE}"));
            match step {
                Step::Succeed(d) => Ok(Built {
                    image_digest: Some(d.to_string()),
                    worker: Some("w1".into()),
                }),
                Step::Fail(m) => Err(RunError::Failed {
                    message: m.into(),
                    worker: Some("w1".into()),
                }),
                Step::Lose(m) => Err(RunError::Unavailable {
                    message: m.into(),
                    worker: Some("w1".into()),
                }),
                Step::Hang => {
                    futures::future::pending::<()>().await;
                    unreachable!()
                }
            }
        })
    }

    fn attach(&self, input: BuildInput, _report: Reporter) -> RunFuture {
        let step = self
            .found
            .lock()
            .expect("test fixture")
            .pop_front()
            .unwrap_or(Step::Lose("nobody has it"));
        self.looked_up
            .lock()
            .expect("test fixture")
            .push(input.build_ref.clone());
        Box::pin(async move {
            match step {
                Step::Succeed(d) => Ok(Built {
                    image_digest: Some(d.to_string()),
                    worker: None,
                }),
                Step::Fail(m) => Err(RunError::Failed {
                    message: m.into(),
                    worker: None,
                }),
                Step::Lose(m) => Err(RunError::NotFound { message: m.into() }),
                Step::Hang => futures::future::pending().await,
            }
        })
    }
}

// === fixtures ===

/// 2027-01-15T08:00:00Z.
fn start() -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_800_000_000)
}

fn job_path(name: &str) -> String {
    format!("/apis/kiln.dev/v1alpha1{NS}/buildjobs/{name}")
}

fn status_path(name: &str) -> String {
    format!("{}/status", job_path(name))
}

fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.metadata.namespace = Some("builds".into());
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
    );
    serde_json::to_value(s).expect("test fixture")
}

/// The pool `p`, its controller certificate Secret, the ConfigMap context and the secret.
fn seed_world(fake: &Shared) {
    let mut pool = BuildWorkerPool::new(
        "p",
        serde_json::from_value::<BuildWorkerPoolSpec>(json!({})).expect("test fixture"),
    );
    pool.metadata.namespace = Some("builds".into());
    pool.metadata.uid = Some("pool-uid".into());
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("ctx".into());
    cm.data = Some(BTreeMap::from([
        (
            "Dockerfile".to_string(),
            "FROM busybox\nCOPY hello.txt /\n".to_string(),
        ),
        ("hello.txt".to_string(), "hello\n".to_string()),
    ]));
    let mut f = lock(fake);
    f.objects.insert(
        format!("/apis/kiln.dev/v1alpha1{NS}/buildworkerpools/p"),
        serde_json::to_value(pool).expect("test fixture"),
    );
    f.objects.insert(
        format!("/api/v1{NS}/secrets/p-controller-client-tls"),
        secret(
            "p-controller-client-tls",
            &[
                ("ca.crt", "CA PEM"),
                ("tls.crt", "CERT PEM"),
                ("tls.key", "KEY PEM"),
            ],
        ),
    );
    f.objects.insert(
        format!("/api/v1{NS}/configmaps/ctx"),
        serde_json::to_value(cm).expect("test fixture"),
    );
    f.objects.insert(
        format!("/api/v1{NS}/secrets/tok"),
        secret("tok", &[("token", SECRET_VALUE)]),
    );
}

fn job_value(name: &str, extra: Value) -> Value {
    let mut spec = json!({
        "poolRef": {"name": "p"},
        "source": {"configMap": {"name": "ctx"}},
        "target": "app",
        "buildArgs": {"VERSION": "1"},
        "platforms": ["linux/amd64"],
        "secrets": [{"id": "tok", "secretName": "tok", "key": "token"}],
        "outputs": [{"name": "registry.example/app:1"}],
        "cacheImport": [{"ref": "registry.example/cache"}],
        "cacheExport": [{"ref": "registry.example/cache", "mode": "max"}],
    });
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    let spec: BuildJobSpec = serde_json::from_value(spec).expect("test fixture");
    let mut job = BuildJob::new(name, spec);
    job.metadata.namespace = Some("builds".into());
    job.metadata.uid = Some(format!("uid-{name}"));
    job.metadata.generation = Some(1);
    job.metadata.resource_version = Some("1".into());
    serde_json::to_value(job).expect("test fixture")
}

fn seed_job(fake: &Shared, name: &str, extra: Value) {
    lock(fake)
        .objects
        .insert(job_path(name), job_value(name, extra));
}

/// The job as the fake now holds it.
fn stored(fake: &Shared, name: &str) -> Arc<BuildJob> {
    let v = lock(fake)
        .objects
        .get(&job_path(name))
        .cloned()
        .expect("test fixture");
    Arc::new(serde_json::from_value(v).expect("test fixture"))
}

fn settings() -> Settings {
    Settings {
        max_attempts: 3,
        log_tail: 20,
        progress_interval: Duration::from_secs(3600),
        retry_backoff: Duration::from_millis(10),
        recheck: Duration::from_secs(30),
    }
}

struct Harness {
    fake: Shared,
    script: Arc<Script>,
    ctx: Arc<JobContext>,
    ended: UnboundedReceiver<ObjectRef<BuildJob>>,
}

impl Harness {
    fn new(steps: Vec<Step>, at: OffsetDateTime) -> Harness {
        Harness::with(steps, at, settings(), Shared::default())
    }

    fn with(steps: Vec<Step>, at: OffsetDateTime, settings: Settings, fake: Shared) -> Harness {
        let script = Arc::new(Script {
            steps: Mutex::new(steps.into()),
            ..Script::default()
        });
        let (ctx, ended) = JobContext::new(
            mock_client(fake.clone()),
            Arc::new(move || at),
            script.clone(),
            settings,
        );
        Harness {
            fake,
            script,
            ctx,
            ended,
        }
    }

    /// One reconcile of the stored job; the requests it sent and its action.
    async fn reconcile(&self, name: &str) -> (Vec<Sent>, Action) {
        let before = lock(&self.fake).log.len();
        let action = job::reconcile(stored(&self.fake, name), self.ctx.clone())
            .await
            .expect("test fixture");
        (lock(&self.fake).log[before..].to_vec(), action)
    }

    /// Waits for the job's build task to end (a guard against hanging, not a speed check).
    async fn wait_ended(&mut self) {
        tokio::time::timeout(Duration::from_secs(60), self.ended.recv())
            .await
            .expect("the build task did not end")
            .expect("the channel closed");
    }

    fn status(&self, name: &str) -> Value {
        lock(&self.fake).objects[&job_path(name)]["status"].clone()
    }
}

/// `(type, reason)` of the events published about the jobs, once `n` have arrived (they are
/// sent in the background; the wait guards against hanging, it checks no speed).
async fn events(fake: &Shared, n: usize) -> Vec<(String, String, String)> {
    for _ in 0..500 {
        if lock(fake).events.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lock(fake)
        .events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn lines(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(Sent::line).collect()
}

fn condition(status: &Value, type_: &str) -> (String, String, String) {
    let c = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null);
    (
        c["status"].as_str().unwrap_or("missing").to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    )
}

fn start_requests(name: &str) -> Vec<String> {
    vec![
        format!("GET /apis/kiln.dev/v1alpha1{NS}/buildworkerpools/p"),
        format!("GET /api/v1{NS}/secrets/p-controller-client-tls"),
        format!("GET /api/v1{NS}/configmaps/ctx"),
        format!("GET /api/v1{NS}/secrets/tok"),
        format!("PATCH {}", job_path(name)),
        format!("PATCH {}", status_path(name)),
    ]
}

// === scenarios ===

#[tokio::test]
async fn job_runs_to_success_and_status_says_so_in_order() {
    let mut h = Harness::new(vec![Step::Succeed("sha256:abc")], start());
    seed_world(&h.fake);
    seed_job(&h.fake, "j", json!({}));

    let (sent, action) = h.reconcile("j").await;
    assert_eq!(lines(&sent), start_requests("j"));
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    // The finalizer, with the resource version as a precondition, then Running.
    assert_eq!(sent[4].content_type, "application/merge-patch+json");
    assert_eq!(
        sent[4].body.as_ref().unwrap()["metadata"],
        json!({"finalizers": [job::FINALIZER], "resourceVersion": "1"})
    );
    let running = &sent[5].body.as_ref().unwrap()["status"];
    assert_eq!(sent[5].content_type, "application/merge-patch+json");
    assert_eq!(running["phase"], "Running");
    assert_eq!(running["attempts"], 1);
    assert_eq!(
        running["buildRef"], "kiln-uid-j-1",
        "the ref is recorded before the build is submitted"
    );
    assert_eq!(running["startTime"], "2027-01-15T08:00:00Z");
    assert_eq!(running["imageDigest"], Value::Null);
    assert_eq!(condition(running, "Progressing").0, "True");
    assert_eq!(condition(running, "Ready").0, "False");

    // The task ends: its last progress patch, then the reconcile writes the outcome.
    h.wait_ended().await;
    assert_eq!(h.script.inputs.lock().unwrap()[0].build_ref, "kiln-uid-j-1");
    assert!(h.ctx.has_task("uid-j"));
    let running_copy = stored(&h.fake, "j");
    // What the runner was asked to build.
    let input = h.script.inputs.lock().unwrap()[0].clone();
    assert_eq!(input.addr, "tcp://p-gateway.builds.svc:1234");
    assert_eq!(input.tls.server_name, "p-gateway.builds.svc");
    assert_eq!(input.tls.cert_pem, "CERT PEM");
    let attrs = &input.frontend_attrs;
    for (k, v) in [
        ("filename", "Dockerfile"),
        ("target", "app"),
        ("build-arg:VERSION", "1"),
        ("platform", "linux/amd64"),
        ("kiln.route-key", "buildjob/builds/j"),
    ] {
        assert_eq!(
            attrs.get(k).map(String::as_str),
            Some(v),
            "{k} in {attrs:?}"
        );
    }
    assert!(!attrs.contains_key("context"));
    let files = input.context_files.clone().unwrap();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["Dockerfile", "hello.txt"]
    );
    assert_eq!(input.secrets["tok"], SECRET_VALUE.as_bytes());
    assert_eq!(input.images, [("registry.example/app:1".to_string(), true)]);
    assert_eq!(input.cache_imports, ["registry.example/cache"]);
    assert!(!format!("{input:?}").contains(SECRET_VALUE));

    let (sent, action) = h.reconcile("j").await;
    assert_eq!(
        lines(&sent),
        [
            format!("PATCH {}", status_path("j")),
            format!("PATCH {}", job_path("j")),
        ]
    );
    assert_eq!(action, Action::await_change());
    assert!(!h.ctx.has_task("uid-j"));
    let done = h.status("j");
    assert_eq!(done["phase"], "Succeeded");
    assert_eq!(done["imageDigest"], "sha256:abc");
    assert_eq!(done["worker"], "w1");
    assert_eq!(done["completionTime"], "2027-01-15T08:00:00Z");
    let (ready, reason, message) = condition(&done, "Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("True", "Succeeded"));
    assert!(message.contains("sha256:abc"), "{message}");
    assert_eq!(condition(&done, "Degraded").0, "False");
    assert_eq!(condition(&done, "Progressing").0, "False");
    assert_eq!(
        stored(&h.fake, "j").metadata.finalizers,
        Some(Vec::new()),
        "the finalizer goes when the build is over"
    );
    let tail: Vec<String> = serde_json::from_value(done["logTail"].clone()).unwrap();
    assert!(tail.iter().any(|l| l.contains("-> ****")), "{tail:?}");
    assert_eq!(
        tail.last().map(String::as_str),
        Some("[kiln] attempt 1 succeeded")
    );

    // No request anywhere carried the secret's value.
    for s in &lock(&h.fake).log {
        let body = s.body.as_ref().map(Value::to_string).unwrap_or_default();
        assert!(!body.contains(SECRET_VALUE), "{}: {body}", s.line());
    }

    // An older cached copy (still Running) neither reruns the build nor writes anything.
    let before = lock(&h.fake).log.len();
    let action = job::reconcile(running_copy, h.ctx.clone()).await.unwrap();
    assert_eq!(lock(&h.fake).log.len(), before);
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    assert_eq!(h.script.inputs.lock().unwrap().len(), 1);

    // A finished job is left alone.
    let (sent, action) = h.reconcile("j").await;
    assert_eq!(lines(&sent), Vec::<String>::new());
    assert_eq!(action, Action::await_change());

    // `kubectl describe` shows the start and the outcome as Events on the job.
    let evs = events(&h.fake, 2).await;
    let kinds: Vec<(&str, &str)> = evs
        .iter()
        .map(|(t, r, _)| (t.as_str(), r.as_str()))
        .collect();
    assert_eq!(kinds, [("Normal", "Started"), ("Normal", "Succeeded")]);
    assert!(evs[1].2.contains("sha256:abc"), "{:?}", evs[1]);
    let published = lock(&h.fake).events.clone();
    assert_eq!(published[0]["regarding"]["kind"], "BuildJob");
    assert_eq!(published[0]["regarding"]["name"], "j");
    for e in &published {
        assert!(!e.to_string().contains(SECRET_VALUE), "{e}");
    }
}

/// The value of the sample `name` (with its labels) in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// GET `path` from the metrics endpoint at `addr`: status line and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn metrics_are_served_and_count_reconciles_and_finished_jobs() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(kiln_controller::metrics::serve(listener));
    let (status, before) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let ok = r#"kiln_controller_reconcile_total{kind="BuildJob",result="ok"}"#;
    let took = r#"kiln_controller_reconcile_duration_seconds_count{kind="BuildJob"}"#;
    let succeeded = r#"kiln_controller_buildjobs_total{outcome="succeeded"}"#;
    let failed = r#"kiln_controller_buildjobs_total{outcome="failed"}"#;

    let mut h = Harness::new(
        vec![Step::Succeed("sha256:abc"), Step::Fail("boom")],
        start(),
    );
    seed_world(&h.fake);
    seed_job(&h.fake, "m1", json!({}));
    seed_job(&h.fake, "m2", json!({}));
    for name in ["m1", "m2"] {
        h.reconcile(name).await;
        h.wait_ended().await;
        h.reconcile(name).await;
    }
    assert_eq!(h.status("m1")["phase"], "Succeeded");
    assert_eq!(h.status("m2")["phase"], "Failed");

    let (_, after) = http_get(addr, "/metrics").await;
    // Other tests of this binary count into the same registry: at least these.
    assert!(sample(&after, ok) >= sample(&before, ok) + 4.0, "{after}");
    assert!(
        sample(&after, took) >= sample(&before, took) + 4.0,
        "{after}"
    );
    assert!(
        sample(&after, succeeded) > sample(&before, succeeded),
        "{after}"
    );
    assert!(sample(&after, failed) > sample(&before, failed), "{after}");
    assert!(
        after.contains("# TYPE kiln_controller_leader gauge"),
        "{after}"
    );
    assert_eq!(http_get(addr, "/healthz").await.0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(addr, "/nope").await.0, "HTTP/1.1 404 Not Found");
}

#[tokio::test]
async fn a_failed_build_names_its_cause() {
    let mut h = Harness::new(
        vec![Step::Fail(
            "process \"/bin/sh -c false\" did not complete successfully: exit code: 1",
        )],
        start(),
    );
    seed_world(&h.fake);
    seed_job(&h.fake, "j", json!({}));
    h.reconcile("j").await;
    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["attempts"], 1);
    let (on, reason, message) = condition(&st, "Degraded");
    assert_eq!((on.as_str(), reason.as_str()), ("True", "BuildFailed"));
    assert!(message.contains("exit code: 1"), "{message}");
    assert_eq!(condition(&st, "Ready").0, "False");
    assert!(st.get("imageDigest").is_none());
    assert_eq!(
        h.script.inputs.lock().unwrap().len(),
        1,
        "a build failure is not retried"
    );
    let evs = events(&h.fake, 2).await;
    assert_eq!(
        (evs[1].0.as_str(), evs[1].1.as_str()),
        ("Warning", "BuildFailed")
    );
    assert!(evs[1].2.contains("exit code: 1"), "{:?}", evs[1]);
}

#[tokio::test]
async fn a_lost_worker_is_retried_then_succeeds() {
    let mut h = Harness::new(
        vec![
            Step::Lose("worker w1 failed during build x: transport error"),
            Step::Succeed("sha256:def"),
        ],
        start(),
    );
    seed_world(&h.fake);
    seed_job(&h.fake, "j", json!({}));
    h.reconcile("j").await;
    h.wait_ended().await;

    let (sent, _) = h.reconcile("j").await;
    // Inputs again, then attempt 2 (the finalizer is already there).
    assert_eq!(
        lines(&sent),
        start_requests("j")
            .into_iter()
            .filter(|l| l != &format!("PATCH {}", job_path("j")))
            .collect::<Vec<_>>()
    );
    let st = h.status("j");
    assert_eq!(
        (st["phase"].as_str(), st["attempts"].as_i64()),
        (Some("Running"), Some(2))
    );
    let tail = st["logTail"].to_string();
    assert!(tail.contains("attempt 1 lost its worker w1"), "{tail}");

    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Succeeded");
    assert_eq!(st["attempts"], 2);
    assert_eq!(st["imageDigest"], "sha256:def");
    assert_eq!(h.script.inputs.lock().unwrap().len(), 2);
    let evs = events(&h.fake, 3).await;
    let kinds: Vec<(&str, &str)> = evs
        .iter()
        .map(|(t, r, _)| (t.as_str(), r.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("Normal", "Started"),
            ("Warning", "Retrying"),
            ("Normal", "Succeeded")
        ]
    );
    assert!(evs[1].2.contains("attempt 2"), "{:?}", evs[1]);
}

#[tokio::test]
async fn a_worker_lost_on_every_attempt_fails_the_job() {
    let s = Settings {
        max_attempts: 2,
        ..settings()
    };
    let mut h = Harness::with(
        vec![Step::Lose("worker gone"), Step::Lose("worker gone again")],
        start(),
        s,
        Shared::default(),
    );
    seed_world(&h.fake);
    seed_job(&h.fake, "j", json!({}));
    h.reconcile("j").await;
    h.wait_ended().await;
    h.reconcile("j").await;
    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["attempts"], 2);
    let (on, reason, message) = condition(&st, "Degraded");
    assert_eq!((on.as_str(), reason.as_str()), ("True", "WorkerLost"));
    assert!(
        message.contains("attempt 2 of 2") && message.contains("worker gone again"),
        "{message}"
    );
}

#[tokio::test]
async fn timeout_cancels_the_build() {
    let mut h = Harness::new(vec![Step::Hang], start());
    seed_world(&h.fake);
    seed_job(&h.fake, "j", json!({"timeout": "1s"}));
    h.reconcile("j").await;
    h.wait_ended().await;
    assert!(
        h.script.cancelled.load(Ordering::SeqCst),
        "the build was not dropped"
    );
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Failed");
    let (on, reason, message) = condition(&st, "Degraded");
    assert_eq!(
        (on.as_str(), reason.as_str(), message.as_str()),
        ("True", "TimedOut", "timed out after 1s")
    );
}

#[tokio::test]
async fn deleting_a_running_job_cancels_its_build() {
    let h = Harness::new(vec![Step::Hang], start());
    seed_world(&h.fake);
    seed_job(&h.fake, "j", json!({}));
    h.reconcile("j").await;
    assert!(h.ctx.has_task("uid-j"));
    for _ in 0..100 {
        if !h.script.inputs.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.script.inputs.lock().unwrap().len(),
        1,
        "the build never started"
    );
    lock(&h.fake).objects.get_mut(&job_path("j")).unwrap()["metadata"]["deletionTimestamp"] =
        json!("2027-01-15T08:01:00Z");
    let (sent, _) = h.reconcile("j").await;
    assert_eq!(lines(&sent), [format!("PATCH {}", job_path("j"))]);
    assert_eq!(
        sent[0].body.as_ref().unwrap()["metadata"]["finalizers"],
        json!([])
    );
    assert!(!h.ctx.has_task("uid-j"));
    // The task's abort reaches the runner's future.
    for _ in 0..100 {
        if h.script.cancelled.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        h.script.cancelled.load(Ordering::SeqCst),
        "the build was not cancelled"
    );
}

#[tokio::test]
async fn ttl_deletes_the_finished_job_once_due() {
    let fake = Shared::default();
    let finished = json!({"phase": "Succeeded", "attempts": 1, "imageDigest": "sha256:abc",
                          "completionTime": "2027-01-15T08:00:00Z"});
    let mut v = job_value("j", json!({"ttlSecondsAfterFinished": 60}));
    v["status"] = finished;
    lock(&fake).objects.insert(job_path("j"), v);

    let early = Harness::with(
        vec![],
        start() + time::Duration::seconds(20),
        settings(),
        fake.clone(),
    );
    let (sent, action) = early.reconcile("j").await;
    assert_eq!(lines(&sent), Vec::<String>::new());
    assert_eq!(action, Action::requeue(Duration::from_secs(40)));

    let due = Harness::with(
        vec![],
        start() + time::Duration::seconds(61),
        settings(),
        fake.clone(),
    );
    let (sent, action) = due.reconcile("j").await;
    assert_eq!(lines(&sent), [format!("DELETE {}", job_path("j"))]);
    assert_eq!(action, Action::await_change());
    assert!(!lock(&fake).objects.contains_key(&job_path("j")));
}

#[tokio::test]
async fn a_controller_restart_resubmits_a_running_job() {
    let mut h = Harness::new(vec![Step::Succeed("sha256:abc")], start());
    seed_world(&h.fake);
    let mut v = job_value("j", json!({}));
    v["metadata"]["finalizers"] = json!([job::FINALIZER]);
    v["status"] = json!({"phase": "Running", "attempts": 1, "startTime": "2027-01-15T07:59:00Z",
                         "worker": "w0", "logTail": ["#1 RUN make"]});
    lock(&h.fake).objects.insert(job_path("j"), v);

    let (sent, _) = h.reconcile("j").await;
    assert_eq!(
        sent.last().unwrap().line(),
        format!("PATCH {}", status_path("j"))
    );
    let st = h.status("j");
    assert_eq!(st["attempts"], 2);
    assert_eq!(
        st["startTime"], "2027-01-15T07:59:00Z",
        "the start time stays"
    );
    assert!(
        st.get("worker").is_none(),
        "the previous worker is cleared: {st}"
    );
    assert!(st["logTail"].to_string().contains("controller restarted"));
    h.wait_ended().await;
    h.reconcile("j").await;
    assert_eq!(h.status("j")["phase"], "Succeeded");
}

/// A job `Running` with a `buildRef` and no task here (the controller restarted).
fn seed_running(fake: &Shared, attempts: i32) {
    let mut v = job_value("j", json!({}));
    v["metadata"]["finalizers"] = json!([job::FINALIZER]);
    v["status"] = json!({"phase": "Running", "attempts": attempts, "startTime": "2027-01-15T07:59:00Z",
                         "worker": "w0", "buildRef": job::build_ref("uid-j", attempts),
                         "logTail": ["#1 RUN make"]});
    lock(fake).objects.insert(job_path("j"), v);
}

#[tokio::test]
async fn a_restarted_controller_takes_a_finished_builds_result_without_building_again() {
    let mut h = Harness::new(vec![], start());
    h.script
        .found
        .lock()
        .unwrap()
        .push_back(Step::Succeed("sha256:found"));
    seed_world(&h.fake);
    seed_running(&h.fake, 1);

    h.reconcile("j").await;
    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["imageDigest"], "sha256:found");
    assert_eq!(st["attempts"], 1, "no new attempt: {st:#}");
    assert_eq!(
        st["worker"], "w0",
        "the worker the first process recorded stays"
    );
    assert_eq!(st["buildRef"], "kiln-uid-j-1");
    assert_eq!(*h.script.looked_up.lock().unwrap(), ["kiln-uid-j-1"]);
    assert!(
        h.script.inputs.lock().unwrap().is_empty(),
        "nothing was built"
    );
    let ev = events(&h.fake, 2).await;
    assert_eq!(ev[0].1, "Reattaching", "{ev:?}");
    assert!(ev[0].2.contains("kiln-uid-j-1"), "{ev:?}");
    assert_eq!(ev[1].1, "Succeeded", "{ev:?}");
}

#[tokio::test]
async fn a_restarted_controller_takes_a_failed_builds_error() {
    let mut h = Harness::new(vec![], start());
    h.script
        .found
        .lock()
        .unwrap()
        .push_back(Step::Fail("RUN make: exit code 2"));
    seed_world(&h.fake);
    seed_running(&h.fake, 2);
    h.reconcile("j").await;
    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Failed", "{st:#}");
    assert_eq!(st["attempts"], 2);
    assert_eq!(*h.script.looked_up.lock().unwrap(), ["kiln-uid-j-2"]);
    assert!(h.script.inputs.lock().unwrap().is_empty());
    assert!(
        condition(&st, "Degraded").2.contains("exit code 2"),
        "{st:#}"
    );
}

#[tokio::test]
async fn a_build_no_worker_knows_is_submitted_as_the_next_attempt_with_a_new_ref() {
    let mut h = Harness::new(vec![Step::Succeed("sha256:abc")], start());
    seed_world(&h.fake);
    seed_running(&h.fake, 1);

    h.reconcile("j").await;
    h.wait_ended().await;
    // The look-up found nothing: this reconcile submits attempt 2, its ref recorded
    // in the same status patch that says it runs, before the runner is called.
    let (sent, _) = h.reconcile("j").await;
    let running = sent
        .iter()
        .filter(|s| s.path == status_path("j"))
        .filter_map(|s| s.body.clone())
        .find(|b| b["status"]["phase"] == "Running")
        .expect("a Running status patch");
    assert_eq!(running["status"]["buildRef"], "kiln-uid-j-2");
    assert_eq!(running["status"]["attempts"], 2);
    assert!(
        running["status"]["logTail"]
            .to_string()
            .contains("cannot be resumed: nobody has it"),
        "{running:#}"
    );
    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    let refs: Vec<String> = h
        .script
        .inputs
        .lock()
        .unwrap()
        .iter()
        .map(|i| i.build_ref.clone())
        .collect();
    assert_eq!(refs, ["kiln-uid-j-2"]);
    let ev = events(&h.fake, 3).await;
    let reasons: Vec<&str> = ev.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(reasons, ["Reattaching", "Retrying", "Succeeded"], "{ev:?}");
}

#[tokio::test]
async fn a_lost_build_on_the_last_attempt_fails_the_job() {
    let mut h = Harness::new(vec![], start());
    seed_world(&h.fake);
    seed_running(&h.fake, 3);
    h.reconcile("j").await;
    h.wait_ended().await;
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Failed", "{st:#}");
    let (_, reason, message) = condition(&st, "Degraded");
    assert_eq!(reason, "ControllerRestarted");
    assert!(message.contains("attempt 3 of 3"), "{message}");
    assert!(h.script.inputs.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_job_without_its_pool_waits_degraded_and_idempotent() {
    let h = Harness::new(vec![], start());
    seed_job(&h.fake, "j", json!({}));
    let (sent, action) = h.reconcile("j").await;
    assert_eq!(
        lines(&sent),
        [
            format!("GET /apis/kiln.dev/v1alpha1{NS}/buildworkerpools/p"),
            format!("PATCH {}", status_path("j")),
        ]
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let st = h.status("j");
    assert_eq!(st["phase"], "Pending");
    let (on, reason, message) = condition(&st, "Degraded");
    assert_eq!((on.as_str(), reason.as_str()), ("True", "PoolNotFound"));
    assert_eq!(message, "BuildWorkerPool builds/p not found");
    // Nothing changed: nothing is written.
    let (sent, _) = h.reconcile("j").await;
    assert_eq!(
        lines(&sent),
        [format!(
            "GET /apis/kiln.dev/v1alpha1{NS}/buildworkerpools/p"
        )]
    );
    assert!(h.script.inputs.lock().unwrap().is_empty());
}

#[tokio::test]
async fn context_file_names_that_leave_the_context_are_refused() {
    let h = Harness::new(vec![], start());
    seed_world(&h.fake);
    lock(&h.fake)
        .objects
        .get_mut(&format!("/api/v1{NS}/configmaps/ctx"))
        .unwrap()["data"]["../escape"] = json!("x");
    seed_job(&h.fake, "j", json!({}));
    h.reconcile("j").await;
    let st = h.status("j");
    assert_eq!(st["phase"], "Pending");
    let (on, reason, message) = condition(&st, "Degraded");
    assert_eq!((on.as_str(), reason.as_str()), ("True", "InvalidSource"));
    assert!(message.contains("\"../escape\""), "{message}");
    assert!(h.script.inputs.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_secret_key_is_named_without_any_value() {
    let h = Harness::new(vec![], start());
    seed_world(&h.fake);
    seed_job(
        &h.fake,
        "j",
        json!({"secrets": [{"id": "tok", "secretName": "tok", "key": "nope"}]}),
    );
    h.reconcile("j").await;
    let (on, reason, message) = condition(&h.status("j"), "Degraded");
    assert_eq!((on.as_str(), reason.as_str()), ("True", "SecretNotFound"));
    assert_eq!(
        message,
        "Secret builds/tok has no key \"nope\" (build secret \"tok\")"
    );
}

#[tokio::test]
async fn git_sources_become_a_remote_context() {
    let mut h = Harness::new(
        vec![Step::Fail("remote contexts are not supported")],
        start(),
    );
    seed_world(&h.fake);
    seed_job(
        &h.fake,
        "j",
        json!({"source": {"git": {"url": "https://git.example/app.git", "ref": "v1", "subdir": "svc"}},
               "secrets": []}),
    );
    h.reconcile("j").await;
    h.wait_ended().await;
    let input = h.script.inputs.lock().unwrap()[0].clone();
    assert_eq!(
        input.frontend_attrs.get("context").map(String::as_str),
        Some("https://git.example/app.git#v1:svc")
    );
    assert!(input.context_files.is_none());
    h.reconcile("j").await;
    let (_, reason, message) = condition(&h.status("j"), "Degraded");
    assert_eq!(reason, "BuildFailed");
    assert_eq!(message, "remote contexts are not supported");
}

// === a real build ===

/// A registry with the base image, a worker and a gateway over mutual TLS, and a mocked API
/// server seeded with the pool's world, the controller's client certificate and `dockerfile`
/// in the context ConfigMap; the runner reaches the gateway on loopback.
struct Loopback {
    reg: kiln_e2e::registry::Registry,
    _dir: tempfile::TempDir,
    mtls: kiln_e2e::fleet::MtlsFleet,
    fake: Shared,
    runner: kiln_controller::reconcile::job::runner::GatewayRunner,
}

impl Loopback {
    fn start(dockerfile: &str) -> anyhow::Result<Loopback> {
        use kiln_e2e::{fleet, registry::Registry};
        let bins = fleet::ensure_binaries()?;
        let reg = Registry::start()?;
        kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
        let dir = tempfile::tempdir()?;
        let mtls = fleet::MtlsFleet::start(&bins, dir.path())?;
        let fake = Shared::default();
        seed_world(&fake);
        let read = |p: &std::path::Path| std::fs::read_to_string(p);
        let identity = secret(
            "p-controller-client-tls",
            &[
                ("ca.crt", &read(&mtls.user.ca)?),
                ("tls.crt", &read(&mtls.user.cert)?),
                ("tls.key", &read(&mtls.user.key)?),
            ],
        );
        {
            let mut f = lock(&fake);
            f.objects.insert(
                format!("/api/v1{NS}/secrets/p-controller-client-tls"),
                identity,
            );
            let cm = f
                .objects
                .get_mut(&format!("/api/v1{NS}/configmaps/ctx"))
                .ok_or_else(|| anyhow::anyhow!("no context ConfigMap in the seeded world"))?;
            cm["data"]["Dockerfile"] = json!(dockerfile);
        }
        let runner = kiln_controller::reconcile::job::runner::GatewayRunner {
            addr_override: Some(format!("tcp://127.0.0.1:{}", mtls.gateway_port)),
            server_name_override: Some("localhost".into()),
            insecure_registries: Vec::new(),
        };
        Ok(Loopback {
            reg,
            _dir: dir,
            mtls,
            fake,
            runner,
        })
    }
}

/// The reconcile with the real runner, against a real `kiln-gateway` and `kiln-worker` over
/// mutual TLS and a real `docker-registry`: a ConfigMap context and a build secret, then a
/// git source the worker fetches from a loopback `git daemon`. The
/// digest in the status is the one the registry serves, the worker is the gateway's, and
/// the secret's value (which the Dockerfile prints) is in no request the controller made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_gateway_builds_a_configmap_job() -> anyhow::Result<()> {
    let dockerfile = "ARG BASE\nFROM ${BASE}\nCOPY hello.txt /hello.txt\n\
        RUN --mount=type=secret,id=tok echo \"token: $(cat /run/secrets/tok)\" && cat /hello.txt\n";
    let Loopback {
        reg,
        _dir,
        mtls,
        fake,
        runner,
    } = Loopback::start(dockerfile)?;
    let read = |p: &std::path::Path| std::fs::read_to_string(p);
    let image = format!("{}/kiln/job:1", reg.addr());
    seed_job(
        &fake,
        "j",
        json!({"target": null, "platforms": [], "cacheImport": [], "cacheExport": [],
               "buildArgs": {"BASE": format!("{}/kiln/base:1", reg.addr())},
               "outputs": [{"name": image, "push": true}]}),
    );

    let s = Settings {
        progress_interval: Duration::from_millis(200),
        ..settings()
    };
    let (ctx, mut ended) = JobContext::new(
        mock_client(fake.clone()),
        Arc::new(start),
        Arc::new(runner.clone()),
        s,
    );
    job::reconcile(stored(&fake, "j"), ctx.clone()).await?;
    tokio::time::timeout(Duration::from_secs(600), ended.recv())
        .await
        .expect("the build did not end");
    job::reconcile(stored(&fake, "j"), ctx.clone()).await?;

    let st = lock(&fake).objects[&job_path("j")]["status"].clone();
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["worker"], "w0");
    let digest = st["imageDigest"].as_str().unwrap_or_default().to_string();
    assert!(digest.starts_with("sha256:"), "{st:#}");
    let served = kiln_e2e::http::get(
        &reg.addr(),
        "/v2/kiln/job/manifests/1",
        &[(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.v2+json",
        )],
    )?;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.header("docker-content-digest"),
        Some(digest.as_str())
    );

    // The pool status's usage figures: DiskUsage through the real gateway with the
    // controller's client certificate, summed for the worker that built.
    {
        use kiln_controller::reconcile::usage::{GatewayTarget, GatewayUsage, UsageReader};
        let reader = GatewayUsage {
            addr_override: Some(format!("tcp://127.0.0.1:{}", mtls.gateway_port)),
        };
        let usage = reader
            .read(GatewayTarget {
                addr: "tcp://unused:0".into(),
                server_name: "localhost".into(),
                ca_pem: read(&mtls.user.ca)?,
                cert_pem: read(&mtls.user.cert)?,
                key_pem: read(&mtls.user.key)?,
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        assert!(
            usage.get("w0").is_some_and(|b| *b > 0),
            "usage read through the gateway: {usage:?}"
        );
    }

    let tail: Vec<String> = serde_json::from_value(st["logTail"].clone())?;
    assert!(tail.iter().any(|l| l.ends_with("token: ****")), "{tail:#?}");
    assert!(tail.iter().any(|l| l.ends_with(" hello")), "{tail:#?}");
    let log = lock(&fake).log.clone();
    assert!(
        log.iter().any(|s| s.path == status_path("j")
            && s.body
                .as_ref()
                .is_some_and(|b| b["status"]["phase"].is_null())),
        "no progress patch was made"
    );
    for s in &log {
        let body = s.body.as_ref().map(Value::to_string).unwrap_or_default();
        assert!(!body.contains(SECRET_VALUE), "{}: {body}", s.line());
    }

    // A git source goes to the worker as a remote context, which fetches it from a real
    // git daemon on loopback and builds it.
    let gitd = kiln_e2e::git::GitDaemon::start()?;
    gitd.repo(
        "app",
        &[
            (
                "svc/Dockerfile",
                "ARG BASE\nFROM ${BASE}\nCOPY app.txt /app.txt\nRUN cat /app.txt\n",
            ),
            ("svc/app.txt", "from git\n"),
        ],
    )?;
    seed_job(
        &fake,
        "g",
        json!({"source": {"git": {"url": gitd.url("app"), "ref": "main", "subdir": "svc"}},
               "secrets": [], "target": null, "platforms": [], "cacheImport": [], "cacheExport": [],
               "buildArgs": {"BASE": format!("{}/kiln/base:1", reg.addr())},
               "outputs": [{"name": format!("{}/kiln/git:1", reg.addr()), "push": true}]}),
    );
    job::reconcile(stored(&fake, "g"), ctx.clone()).await?;
    tokio::time::timeout(Duration::from_secs(600), ended.recv())
        .await
        .expect("the git build did not end");
    job::reconcile(stored(&fake, "g"), ctx.clone()).await?;
    let st = lock(&fake).objects[&job_path("g")]["status"].clone();
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    let digest = st["imageDigest"].as_str().unwrap_or_default().to_string();
    assert!(digest.starts_with("sha256:"), "{st:#}");
    let tail: Vec<String> = serde_json::from_value(st["logTail"].clone())?;
    assert!(tail.iter().any(|l| l.ends_with("from git")), "{tail:#?}");

    // The controller process dies after the build finished but before it wrote the
    // outcome: a new process finds the build by its ref on the worker and takes its
    // digest, and the worker ran it once.
    seed_job(
        &fake,
        "r",
        json!({"target": null, "platforms": [], "cacheImport": [], "cacheExport": [],
               "buildArgs": {"BASE": format!("{}/kiln/base:1", reg.addr())},
               "outputs": [{"name": format!("{}/kiln/restart:1", reg.addr()), "push": true}]}),
    );
    let slot = Arc::new(Mutex::new(None));
    let dying = Arc::new(FinishThenHang {
        inner: runner.clone(),
        built: slot.clone(),
    });
    let (first, _first_ended) = JobContext::new(
        mock_client(fake.clone()),
        Arc::new(start),
        dying,
        settings(),
    );
    job::reconcile(stored(&fake, "r"), first.clone()).await?;
    let built = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            if let Some(b) = slot.lock().unwrap().clone() {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the build did not end")
    .map_err(|e| anyhow::anyhow!("the first build failed: {e}"))?;
    assert_eq!(
        lock(&fake).objects[&job_path("r")]["status"]["phase"],
        "Running"
    );
    drop(first);

    let (second, mut second_ended) = JobContext::new(
        mock_client(fake.clone()),
        Arc::new(start),
        Arc::new(runner.clone()),
        settings(),
    );
    job::reconcile(stored(&fake, "r"), second.clone()).await?;
    tokio::time::timeout(Duration::from_secs(120), second_ended.recv())
        .await
        .expect("the look-up did not end");
    job::reconcile(stored(&fake, "r"), second.clone()).await?;
    let st = lock(&fake).objects[&job_path("r")]["status"].clone();
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["attempts"], 1, "{st:#}");
    assert_eq!(st["buildRef"], "kiln-uid-r-1");
    assert_eq!(
        st["imageDigest"].as_str(),
        built.image_digest.as_deref(),
        "{st:#}"
    );
    assert!(built.image_digest.is_some());
    let history = history_refs(mtls.gateway_port, &mtls.user).await?;
    let runs: Vec<&String> = history
        .iter()
        .filter(|r| r.starts_with("kiln-uid-r-"))
        .collect();
    assert_eq!(runs, ["kiln-uid-r-1"], "all refs: {history:?}");
    Ok(())
}

/// The controller process dies while the build runs: its session goes away, the worker
/// cancels the build, and the new process finds it cancelled (or never completing) and
/// submits the next attempt, which succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_gateway_resubmits_a_build_cut_off_by_a_controller_restart() -> anyhow::Result<()> {
    let Loopback {
        reg,
        _dir,
        mtls: _mtls,
        fake,
        runner,
    } = Loopback::start(
        "ARG BASE\nFROM ${BASE}\nCOPY hello.txt /hello.txt\nRUN echo started && sleep 4 && echo slept\n",
    )?;
    seed_job(
        &fake,
        "c",
        json!({"target": null, "platforms": [], "cacheImport": [], "cacheExport": [], "secrets": [],
               "buildArgs": {"BASE": format!("{}/kiln/base:1", reg.addr())},
               "outputs": [{"name": format!("{}/kiln/cut:1", reg.addr()), "push": true}]}),
    );
    let s = Settings {
        progress_interval: Duration::from_millis(100),
        ..settings()
    };
    let (first, _ended) = JobContext::new(
        mock_client(fake.clone()),
        Arc::new(start),
        Arc::new(runner.clone()),
        s.clone(),
    );
    job::reconcile(stored(&fake, "c"), first.clone()).await?;
    // Wait until the RUN step has started on the worker, then "kill" the controller.
    tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let tail = lock(&fake).objects[&job_path("c")]["status"]["logTail"].to_string();
            if tail.contains("started") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the build did not start");
    drop(first);

    let (second, mut ended) = JobContext::new(
        mock_client(fake.clone()),
        Arc::new(start),
        Arc::new(runner),
        s,
    );
    let began = std::time::Instant::now();
    job::reconcile(stored(&fake, "c"), second.clone()).await?;
    tokio::time::timeout(Duration::from_secs(120), ended.recv())
        .await
        .expect("the look-up did not end");
    eprintln!("look-up of the cut-off build took {:?}", began.elapsed());
    job::reconcile(stored(&fake, "c"), second.clone()).await?;
    let st = lock(&fake).objects[&job_path("c")]["status"].clone();
    assert_eq!(st["phase"], "Running", "{st:#}");
    assert_eq!(st["attempts"], 2, "{st:#}");
    assert_eq!(st["buildRef"], "kiln-uid-c-2");
    tokio::time::timeout(Duration::from_secs(300), ended.recv())
        .await
        .expect("the second attempt did not end");
    job::reconcile(stored(&fake, "c"), second.clone()).await?;
    let st = lock(&fake).objects[&job_path("c")]["status"].clone();
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert!(st["imageDigest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
    // The log tail has scrolled on; the Events say what happened.
    let ev = events(&fake, 4).await;
    let retry = ev
        .iter()
        .find(|e| e.1 == "Retrying")
        .expect("a Retrying event");
    assert!(retry.2.contains("cannot be resumed"), "{ev:?}");
    assert!(ev.iter().any(|e| e.1 == "Reattaching"), "{ev:?}");
    Ok(())
}

/// Builds through `inner`, keeps the result, and never returns: the controller process
/// that ran it "dies" before it writes the outcome.
struct FinishThenHang {
    inner: kiln_controller::reconcile::job::runner::GatewayRunner,
    built: Arc<Mutex<Option<Result<Built, RunError>>>>,
}

impl Runner for FinishThenHang {
    fn run(&self, input: BuildInput, report: Reporter) -> RunFuture {
        let run = self.inner.run(input, report);
        let slot = self.built.clone();
        Box::pin(async move {
            let r = run.await;
            *slot.lock().expect("test fixture") = Some(r);
            futures::future::pending().await
        })
    }
}

/// The refs of every build in the history of the gateway's workers.
async fn history_refs(port: u16, user: &kiln_e2e::pki::Identity) -> anyhow::Result<Vec<String>> {
    use futures::StreamExt as _;
    use kiln_proto::moby::buildkit::v1 as api;
    let client = kiln_cli::client::Client::connect(
        &format!("tcp://127.0.0.1:{port}"),
        Some(kiln_cli::client::TlsConfig {
            files: kiln_cli::client::TlsFiles {
                ca: Some(user.ca.clone()),
                cert: Some(user.cert.clone()),
                key: Some(user.key.clone()),
            },
            server_name: Some("localhost".into()),
        }),
    )
    .await?;
    let mut control = api::control_client::ControlClient::new(client.channel());
    let events: Vec<_> = control
        .listen_build_history(api::BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .collect()
        .await;
    let mut refs = Vec::new();
    for ev in events {
        if let Some(r) = ev?.record {
            refs.push(r.r#ref);
        }
    }
    Ok(refs)
}

/// A BuildJob through the controller deployed in a real cluster, when `KUBECONFIG` is set
/// (needs `KILN_E2E_REGISTRY` and `KILN_E2E_BASE` too; see the README).
#[tokio::test]
async fn real_cluster_job_when_kubeconfig_is_set() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("KUBECONFIG not set: the real-cluster BuildJob variant is skipped (mocked and loopback tests ran)");
        return;
    }
    crate::cluster::buildjob_succeeds().await.unwrap();
}
