//! Leader election against a mocked API server holding one Lease: acquire, renew, an
//! unexpired Lease of another holder (not leader, nothing written), an expired one (taken
//! over), a lost race (409 on the update), and `run_elected` starting the controllers while
//! leading and stopping them when the Lease goes to another replica.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use kiln_controller::leader::{run_elected, Elector, LeaseSettings};
use serde_json::{json, Value};
use time::OffsetDateTime;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kiln/leases";

#[derive(Default)]
struct Fake {
    objects: BTreeMap<String, Value>,
    log: Vec<String>,
    version: u64,
    /// Answer the next PUT with 409 (another replica wrote first).
    conflict_next_put: bool,
}

type Shared = Arc<Mutex<Fake>>;

fn lock(f: &Shared) -> std::sync::MutexGuard<'_, Fake> {
    f.lock().unwrap_or_else(|e| e.into_inner())
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn answer(f: &mut Fake, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    match method {
        "GET" => match f.objects.get(path) {
            Some(v) => (StatusCode::OK, v.clone()),
            None => (StatusCode::NOT_FOUND, status(404, "NotFound")),
        },
        "POST" => {
            let mut obj = body.unwrap_or(Value::Null);
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let at = format!("{path}/{name}");
            if f.objects.contains_key(&at) {
                return (StatusCode::CONFLICT, status(409, "AlreadyExists"));
            }
            f.version += 1;
            obj["metadata"]["resourceVersion"] = json!(f.version.to_string());
            f.objects.insert(at, obj.clone());
            (StatusCode::CREATED, obj)
        }
        "PUT" => {
            let mut obj = body.unwrap_or(Value::Null);
            let Some(cur) = f.objects.get(path) else {
                return (StatusCode::NOT_FOUND, status(404, "NotFound"));
            };
            if std::mem::take(&mut f.conflict_next_put)
                || cur["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]
            {
                return (StatusCode::CONFLICT, status(409, "Conflict"));
            }
            f.version += 1;
            obj["metadata"]["resourceVersion"] = json!(f.version.to_string());
            f.objects.insert(path.to_string(), obj.clone());
            (StatusCode::OK, obj)
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed"),
        ),
    }
}

fn mock_client(fake: Shared) -> kube::Client {
    super::mockapi::client(move |parts, bytes| {
        let body: Option<Value> = serde_json::from_slice(bytes).ok();
        let mut f = lock(&fake);
        let path = parts.uri.path().to_string();
        f.log.push(format!("{} {path}", parts.method));
        answer(&mut f, parts.method.as_str(), &path, body)
    })
}

/// A clock the test moves.
#[derive(Clone)]
struct TestClock(Arc<Mutex<OffsetDateTime>>);

impl TestClock {
    fn new() -> Self {
        TestClock(Arc::new(Mutex::new(
            OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_800_000_000),
        )))
    }
    fn advance(&self, secs: i64) {
        *self.0.lock().expect("test clock") += time::Duration::seconds(secs);
    }
    fn clock(&self) -> kiln_controller::reconcile::Clock {
        let c = self.0.clone();
        Arc::new(move || *c.lock().expect("test clock"))
    }
}

fn elector(fake: &Shared, me: &str, clock: &TestClock) -> Elector {
    let mut s = LeaseSettings::new("kiln", me);
    s.renew_every = Duration::from_millis(20);
    Elector::new(mock_client(fake.clone()), s, clock.clock())
}

fn lease(fake: &Shared) -> Value {
    lock(fake).objects[&format!("{LEASES}/kiln-controller")]["spec"].clone()
}

fn requests(fake: &Shared) -> Vec<String> {
    std::mem::take(&mut lock(fake).log)
}

#[tokio::test]
async fn acquire_renew_hold_off_and_take_over_an_expired_lease() {
    let fake = Shared::default();
    let clock = TestClock::new();
    let a = elector(&fake, "controller-a", &clock);
    let b = elector(&fake, "controller-b", &clock);

    // No Lease: a creates it and leads.
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert_eq!(
        requests(&fake),
        [
            format!("GET {LEASES}/kiln-controller"),
            format!("POST {LEASES}")
        ]
    );
    let l = lease(&fake);
    assert_eq!(l["holderIdentity"], "controller-a");
    assert_eq!(l["leaseDurationSeconds"], 15);
    assert_eq!(l["leaseTransitions"], 0);
    let acquired = l["acquireTime"].clone();

    // a renews 5 s later: renewTime moves, acquireTime does not.
    clock.advance(5);
    assert!(a.try_acquire_or_renew().await.unwrap());
    let l = lease(&fake);
    assert_eq!(l["holderIdentity"], "controller-a");
    assert_eq!(l["acquireTime"], acquired);
    assert_ne!(l["renewTime"], acquired);
    requests(&fake);

    // b sees a's unexpired claim: not leader, and writes nothing.
    clock.advance(10);
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert_eq!(requests(&fake), [format!("GET {LEASES}/kiln-controller")]);
    assert_eq!(lease(&fake)["holderIdentity"], "controller-a");

    // a stops renewing; 16 s after its last renewal the claim has expired and b takes it.
    clock.advance(6);
    assert!(b.try_acquire_or_renew().await.unwrap());
    let l = lease(&fake);
    assert_eq!(l["holderIdentity"], "controller-b");
    assert_eq!(l["leaseTransitions"], 1);
    assert_ne!(l["acquireTime"], acquired);
    // And a, back, is not leader any more.
    assert!(!a.try_acquire_or_renew().await.unwrap());
}

#[tokio::test]
async fn a_lost_race_is_not_leadership() {
    let fake = Shared::default();
    let clock = TestClock::new();
    let a = elector(&fake, "controller-a", &clock);
    let b = elector(&fake, "controller-b", &clock);
    assert!(a.try_acquire_or_renew().await.unwrap());
    clock.advance(60);
    // Another replica updates the Lease between b's read and b's write.
    lock(&fake).conflict_next_put = true;
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert_eq!(lease(&fake)["holderIdentity"], "controller-a");
    // A Lease another process created between the read and the create: 409, not leader.
    let fresh = Shared::default();
    let c = elector(&fresh, "controller-c", &clock);
    let d = elector(&fresh, "controller-d", &clock);
    assert!(c.try_acquire_or_renew().await.unwrap());
    assert!(!d.try_acquire_or_renew().await.unwrap());
}

/// Counts while alive: the controllers' future runs exactly while this is 1.
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn controllers_run_only_while_leading() {
    let fake = Shared::default();
    let clock = TestClock::new();
    // Another replica holds the Lease.
    let other = elector(&fake, "controller-b", &clock);
    assert!(other.try_acquire_or_renew().await.unwrap());

    let alive = Arc::new(AtomicUsize::new(0));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let a = elector(&fake, "controller-a", &clock);
    let run = {
        let alive = alive.clone();
        let changes = changes.clone();
        tokio::spawn(run_elected(
            a,
            move || {
                let alive = alive.clone();
                alive.fetch_add(1, Ordering::SeqCst);
                let guard = Alive(alive);
                async move {
                    let _guard = guard;
                    futures::future::pending::<()>().await;
                }
            },
            move |on| changes.lock().unwrap().push(on),
            async move {
                let _ = stop_rx.await;
            },
        ))
    };
    // Several rounds pass without leading.
    requests(&fake);
    wait_for("rounds", || lock(&fake).log.len() >= 3).await;
    assert_eq!(alive.load(Ordering::SeqCst), 0);

    // The other holder's claim expires: a leads and runs the controllers.
    clock.advance(16);
    wait_for("leading", || alive.load(Ordering::SeqCst) == 1).await;
    assert_eq!(lease(&fake)["holderIdentity"], "controller-a");
    let metrics = kiln_controller::metrics::global().expect("metrics");
    assert!(
        metrics.render().contains("\nkiln_controller_leader 1\n"),
        "{}",
        metrics.render()
    );

    // Another replica takes the Lease over (as if a had been partitioned): a stops.
    {
        let mut f = lock(&fake);
        let l = f
            .objects
            .get_mut(&format!("{LEASES}/kiln-controller"))
            .unwrap();
        l["spec"]["holderIdentity"] = json!("controller-b");
    }
    wait_for("stopped", || alive.load(Ordering::SeqCst) == 0).await;
    assert_eq!(*changes.lock().unwrap(), [false, true, false]);
    assert!(metrics.render().contains("\nkiln_controller_leader 0\n"));

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run_elected did not end on shutdown")
        .unwrap();
}
