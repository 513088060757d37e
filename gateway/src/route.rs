//! Which worker each call of a build goes to: the routing key of a Solve
//! (shared/design/buildkit-wire.md §5.3) and the two pin tables of §5.2, `session id →
//! worker` (with Session streams held until their Solve binds them) and `ref → worker`
//! (waited on by Status, LLBBridge and history calls that arrive before their Solve).
//! Finished pins stay a while, then expire.
//!
//! Uses [`crate::health`] worker handles; no I/O. [`crate::proxy`] drives it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_proto::moby::buildkit::v1 as api;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::health::Worker;

/// Frontend attribute naming the routing key explicitly (a BuildJob or a user sets it).
pub const ROUTE_KEY_ATTR: &str = "kiln.route-key";

/// Response header of Solve: the name of the worker that ran the build.
pub const WORKER_HEADER: &str = "kiln-worker";

/// Response header of Solve: which kind of key chose the worker ([`KeyKind::as_str`]).
pub const KEY_KIND_HEADER: &str = "kiln-route-key-kind";

/// Default time Status/LLBBridge/history calls wait for their build's worker (BuildKit
/// tolerates 6 s for Status; a little more covers the gateway's own hop).
pub const DEFAULT_PIN_WAIT: Duration = Duration::from_secs(10);

/// Default time a finished build's pins stay (late Status callers, history).
pub const DEFAULT_KEEP: Duration = Duration::from_secs(60);

/// Default time a Session stream is held waiting for the Solve that names it.
pub const DEFAULT_SESSION_HOLD: Duration = Duration::from_secs(30);

/// What chose a build's worker, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `FrontendAttrs["kiln.route-key"]`.
    Explicit,
    /// `vcs:source` plus Dockerfile path and target.
    Vcs,
    /// The session's non-empty shared key.
    SharedKey,
    /// The session ID (nothing better: no cache locality across builds).
    Session,
    /// The build's session was already bound to a worker by an earlier Solve.
    SessionPinned,
}

impl KeyKind {
    /// The label used in headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Explicit => "explicit",
            KeyKind::Vcs => "vcs",
            KeyKind::SharedKey => "shared-key",
            KeyKind::Session => "session",
            KeyKind::SessionPinned => "session-pinned",
        }
    }
}

/// The session ID a lookup uses: the part after the first `:` of `prefix:id`.
pub fn session_key(id: &str) -> &str {
    id.split_once(':').map_or(id, |(_, rest)| rest)
}

/// The best routing key of `req` that does not need the session (explicit, then VCS).
pub fn request_key(req: &api::SolveRequest) -> Option<(KeyKind, String)> {
    let attr = |k: &str| req.frontend_attrs.get(k).filter(|v| !v.is_empty());
    if let Some(k) = attr(ROUTE_KEY_ATTR) {
        return Some((KeyKind::Explicit, k.clone()));
    }
    if let Some(src) = attr("vcs:source") {
        let file = attr("filename").map_or("Dockerfile", String::as_str);
        let target = attr("target").map_or("", String::as_str);
        return Some((KeyKind::Vcs, format!("{src}\n{file}\n{target}")));
    }
    None
}

/// The routing key of `req` given its session's shared key (if the session is known).
pub fn route_key(req: &api::SolveRequest, shared_key: Option<&str>) -> (KeyKind, String) {
    if let Some(k) = request_key(req) {
        return k;
    }
    match shared_key.filter(|k| !k.is_empty()) {
        Some(k) => (KeyKind::SharedKey, k.to_string()),
        None => (KeyKind::Session, session_key(&req.session).to_string()),
    }
}

/// A held Session stream's request to be connected to a worker.
#[derive(Debug)]
pub struct Binding {
    /// Where the stream goes.
    pub worker: Arc<Worker>,
    /// Answered once the worker accepted the stream (its response headers arrived) or
    /// the open failed.
    pub opened: oneshot::Sender<Result<(), OpenFailed>>,
}

/// A Session stream could not be opened on its worker.
#[derive(Debug)]
pub struct OpenFailed {
    /// Why, as the worker or the connection said it.
    pub reason: String,
    /// Present when the worker never answered (connection refused or reset before its
    /// response headers): the stream still holds every byte the client sent and can be
    /// bound again, to another worker, by sending a new [`Binding`] here.
    pub retry: Option<oneshot::Sender<Binding>>,
}

/// A Session stream waiting for its Solve.
#[derive(Debug)]
struct Held {
    shared_key: String,
    bind: oneshot::Sender<Binding>,
}

#[derive(Debug)]
enum SessionPin {
    Held(Held),
    /// Bound to a worker; `expires` once the stream (or, for a session not yet seen, the
    /// pin itself) is no longer needed.
    Bound {
        worker: Arc<Worker>,
        expires: Option<Instant>,
    },
}

/// How settled a build's worker must be for a call to go to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Only a pin: the worker accepted the build's Session (or the build has none).
    Pinned,
    /// Also the worker the build's Solve was forwarded to while the Session's open is
    /// unanswered ([`Routes::forwarded_ref`]): for calls that can be sent again elsewhere
    /// should that worker never answer.
    Forwarded,
    /// Also the worker the Solve chose before forwarding it ([`Routes::expect_ref`]): for
    /// calls that need only the kind of worker (LLBBridge.Ping).
    Chosen,
}

/// The worker found for a build, and whether the build is pinned to it.
#[derive(Debug, Clone)]
pub struct RefWorker {
    /// The worker.
    pub worker: Arc<Worker>,
    /// False for a worker accepted by [`Accept::Forwarded`] or [`Accept::Chosen`] only.
    pub pinned: bool,
}

/// A build whose Solve chose a worker that has not yet accepted its Session.
#[derive(Debug)]
struct Expected {
    worker: Arc<Worker>,
    expires: Instant,
    /// The Solve has been forwarded to `worker`.
    forwarded: bool,
}

#[derive(Debug)]
struct RefPin {
    worker: Arc<Worker>,
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
struct Tables {
    sessions: HashMap<String, SessionPin>,
    refs: HashMap<String, RefPin>,
    /// Builds whose Solve chose a worker that has not yet accepted the build's Session
    /// (the ref is pinned once it has).
    expected: HashMap<String, Expected>,
    /// Builds whose Solve waits in a worker's admission queue: their calls wait too.
    queued: HashSet<String>,
}

/// What [`Routes::bind_session`] did.
#[derive(Debug)]
pub enum BindOutcome {
    /// A held stream was handed the worker; wait on the receiver for it to open.
    Released(oneshot::Receiver<Result<(), OpenFailed>>),
    /// No stream yet: it will go to the worker when it arrives.
    Prebound,
    /// The session was already bound (to this worker or another).
    AlreadyBound(Arc<Worker>),
}

/// What a newly arrived Session stream should do.
#[derive(Debug)]
pub enum SessionStart {
    /// A Solve already chose the worker.
    Bound(Arc<Worker>),
    /// Wait for a Solve on this receiver.
    Held(oneshot::Receiver<Binding>),
}

/// The pin tables. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Routes {
    tables: Arc<Mutex<Tables>>,
    changed: Arc<Notify>,
    keep: Duration,
}

// === impl Routes ===

impl Routes {
    /// Empty tables whose finished pins stay `keep`.
    pub fn new(keep: Duration) -> Routes {
        Routes {
            tables: Arc::default(),
            changed: Arc::new(Notify::new()),
            keep,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the maps half-updated (every update
        // is one insert or remove), so a poisoned lock is still usable.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A Session stream for `id` (prefix stripped) with `shared_key` arrived.
    pub fn session_arrived(&self, id: &str, shared_key: &str) -> SessionStart {
        let id = session_key(id);
        let mut t = self.lock();
        if let Some(SessionPin::Bound { worker, expires }) = t.sessions.get_mut(id) {
            *expires = None;
            return SessionStart::Bound(worker.clone());
        }
        let (tx, rx) = oneshot::channel();
        t.sessions.insert(
            id.to_string(),
            SessionPin::Held(Held {
                shared_key: shared_key.to_string(),
                bind: tx,
            }),
        );
        drop(t);
        self.changed.notify_waiters();
        SessionStart::Held(rx)
    }

    /// The held stream of `id` gave up waiting (timeout or client gone): forget it.
    pub fn session_abandoned(&self, id: &str) {
        let id = session_key(id);
        let mut t = self.lock();
        if matches!(t.sessions.get(id), Some(SessionPin::Held(_))) {
            t.sessions.remove(id);
        }
    }

    /// The stream of `id` ended: its pin expires after the keep time.
    pub fn session_ended(&self, id: &str) {
        let expiry = Instant::now() + self.keep;
        if let Some(SessionPin::Bound { expires, .. }) =
            self.lock().sessions.get_mut(session_key(id))
        {
            *expires = Some(expiry);
        }
    }

    /// The shared key of session `id` if its stream is held, waiting up to `wait` for it
    /// to arrive. `None` when it did not arrive or is already bound.
    pub async fn held_shared_key(&self, id: &str, wait: Duration) -> Option<String> {
        let id = session_key(id);
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.lock().sessions.get(id) {
                Some(SessionPin::Held(h)) => return Some(h.shared_key.clone()),
                Some(SessionPin::Bound { .. }) => return None,
                None => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The worker session `id` is bound to, if any.
    pub fn session_worker(&self, id: &str) -> Option<Arc<Worker>> {
        match self.lock().sessions.get(session_key(id)) {
            Some(SessionPin::Bound { worker, .. }) => Some(worker.clone()),
            _ => None,
        }
    }

    /// True when the Session stream of `id` has arrived and waits for its Solve.
    pub fn session_held(&self, id: &str) -> bool {
        matches!(
            self.lock().sessions.get(session_key(id)),
            Some(SessionPin::Held(_))
        )
    }

    /// Moves the bound session `id` to `worker` (its stream is being re-opened there after
    /// its first worker never answered).
    pub fn rebind_session(&self, id: &str, worker: &Arc<Worker>) {
        if let Some(SessionPin::Bound { worker: w, .. }) =
            self.lock().sessions.get_mut(session_key(id))
        {
            *w = worker.clone();
        }
    }

    /// Binds session `id` to `worker`: releases its held stream, or pins it for when it
    /// arrives (the pin expires after the keep time if it never does).
    pub fn bind_session(&self, id: &str, worker: &Arc<Worker>) -> BindOutcome {
        let id = session_key(id);
        let mut t = self.lock();
        let pin = SessionPin::Bound {
            worker: worker.clone(),
            expires: None,
        };
        match t.sessions.remove(id) {
            Some(SessionPin::Held(h)) => {
                t.sessions.insert(id.to_string(), pin);
                let (tx, rx) = oneshot::channel();
                let binding = Binding {
                    worker: worker.clone(),
                    opened: tx,
                };
                if h.bind.send(binding).is_err() {
                    // The stream went away just now; keep the pin for a late retry.
                    tracing::debug!(session = %id, "held session gone before binding");
                }
                BindOutcome::Released(rx)
            }
            Some(SessionPin::Bound { worker, expires }) => {
                t.sessions.insert(
                    id.to_string(),
                    SessionPin::Bound {
                        worker: worker.clone(),
                        expires,
                    },
                );
                BindOutcome::AlreadyBound(worker)
            }
            None => {
                t.sessions.insert(
                    id.to_string(),
                    SessionPin::Bound {
                        worker: worker.clone(),
                        expires: Some(Instant::now() + self.keep),
                    },
                );
                BindOutcome::Prebound
            }
        }
    }

    /// Pins build `r#ref` to `worker` (before the Solve is forwarded) and wakes waiters.
    pub fn pin_ref(&self, r#ref: &str, worker: &Arc<Worker>) {
        let mut t = self.lock();
        t.queued.remove(r#ref);
        t.expected.remove(r#ref);
        t.refs.insert(
            r#ref.to_string(),
            RefPin {
                worker: worker.clone(),
                expires: None,
            },
        );
        drop(t);
        self.changed.notify_waiters();
    }

    /// Build `r#ref`'s Solve chose `worker` and waits for it to accept the Session: calls
    /// that need only the kind of worker (LLBBridge.Ping) may go on with it.
    pub fn expect_ref(&self, r#ref: &str, worker: &Arc<Worker>) {
        let expires = Instant::now() + self.keep;
        self.lock().expected.insert(
            r#ref.to_string(),
            Expected {
                worker: worker.clone(),
                expires,
                forwarded: false,
            },
        );
        self.changed.notify_waiters();
    }

    /// Build `r#ref`'s Solve went to `worker` before the worker accepted the build's
    /// Session: calls that can be sent again ([`Accept::Forwarded`]) may follow it.
    pub fn forwarded_ref(&self, r#ref: &str, worker: &Arc<Worker>) {
        let mut t = self.lock();
        match t.expected.get_mut(r#ref) {
            Some(e) if e.worker.name == worker.name => e.forwarded = true,
            _ => return,
        }
        drop(t);
        self.changed.notify_waiters();
    }

    /// Pins build `r#ref`, found on `worker` after its own pin was gone, for the keep
    /// time; returns the worker the ref is pinned to (a pin made meanwhile wins).
    pub fn adopt_ref(&self, r#ref: &str, worker: &Arc<Worker>) -> Arc<Worker> {
        let expires = Some(Instant::now() + self.keep);
        let mut t = self.lock();
        let pin = t.refs.entry(r#ref.to_string()).or_insert_with(|| RefPin {
            worker: worker.clone(),
            expires,
        });
        let w = pin.worker.clone();
        drop(t);
        self.changed.notify_waiters();
        w
    }

    /// Build `r#ref` waits in an admission queue: calls looking for its worker wait
    /// (without their usual bound) until it is pinned or leaves the queue.
    pub fn queue_ref(&self, r#ref: &str) {
        self.lock().queued.insert(r#ref.to_string());
        self.changed.notify_waiters();
    }

    /// Build `r#ref` left its admission queue without being pinned (timeout, client gone).
    pub fn unqueue_ref(&self, r#ref: &str) {
        if self.lock().queued.remove(r#ref) {
            self.changed.notify_waiters();
        }
    }

    /// How many builds wait in admission queues.
    pub fn queued_refs(&self) -> usize {
        self.lock().queued.len()
    }

    /// The build `r#ref` finished: its pin expires after the keep time.
    pub fn ref_done(&self, r#ref: &str) {
        let expiry = Instant::now() + self.keep;
        let mut t = self.lock();
        t.expected.remove(r#ref);
        if let Some(p) = t.refs.get_mut(r#ref) {
            p.expires = Some(expiry);
        }
    }

    /// The worker of build `r#ref`, waiting up to `wait` for its Solve to pin it; while
    /// the Solve waits in an admission queue, the wait is not counted (the deadline
    /// restarts when the build leaves the queue).
    pub async fn ref_worker(&self, r#ref: &str, wait: Duration) -> Option<Arc<Worker>> {
        self.worker_of(r#ref, wait, Accept::Pinned)
            .await
            .map(|f| f.worker)
    }

    /// [`Routes::ref_worker`], also taking a worker the build is not yet pinned to as
    /// `accept` allows.
    pub async fn worker_of(
        &self,
        r#ref: &str,
        wait: Duration,
        accept: Accept,
    ) -> Option<RefWorker> {
        let mut deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let queued = {
                let t = self.lock();
                if let Some(p) = t.refs.get(r#ref) {
                    return Some(RefWorker {
                        worker: p.worker.clone(),
                        pinned: true,
                    });
                }
                let taken = |e: &&Expected| match accept {
                    Accept::Pinned => false,
                    Accept::Forwarded => e.forwarded,
                    Accept::Chosen => true,
                };
                if let Some(e) = t.expected.get(r#ref).filter(taken) {
                    return Some(RefWorker {
                        worker: e.worker.clone(),
                        pinned: false,
                    });
                }
                t.queued.contains(r#ref)
            };
            if queued {
                notified.await;
                deadline = Instant::now() + wait;
            } else if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Drops every pin whose time is up; returns how many remain `(sessions, refs)`.
    pub fn expire(&self) -> (usize, usize) {
        self.expire_at(Instant::now())
    }

    /// [`Routes::expire`] as if the time were `now`.
    pub fn expire_at(&self, now: Instant) -> (usize, usize) {
        let mut t = self.lock();
        t.refs.retain(|_, p| p.expires.is_none_or(|e| e > now));
        t.expected.retain(|_, e| e.expires > now);
        t.sessions.retain(|_, p| match p {
            SessionPin::Held(h) => !h.bind.is_closed(),
            SessionPin::Bound { expires, .. } => expires.is_none_or(|e| e > now),
        });
        (t.sessions.len(), t.refs.len())
    }

    /// Runs [`Routes::expire`] every `every`, forever.
    pub async fn run_expiry(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.expire();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::health::{Member, Pool};
    use crate::metrics::Metrics;

    use super::*;

    fn worker(name: &str) -> Arc<Worker> {
        let pool = Pool::new(10, 1.25, Metrics::new().expect("metrics"));
        pool.set_members(&[Member {
            name: name.into(),
            addr: "tcp://127.0.0.1:9".into(),
        }])
        .expect("members");
        pool.get(name).expect("worker")
    }

    fn solve(attrs: &[(&str, &str)], session: &str) -> api::SolveRequest {
        api::SolveRequest {
            r#ref: "r".into(),
            session: session.into(),
            frontend_attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn key_preference_order() {
        let all = solve(
            &[
                (ROUTE_KEY_ATTR, "job-1"),
                ("vcs:source", "https://git/x.git"),
            ],
            "p:s1",
        );
        assert_eq!(
            route_key(&all, Some("sk")),
            (KeyKind::Explicit, "job-1".into())
        );
        let vcs = solve(
            &[
                ("vcs:source", "https://git/x.git"),
                ("filename", "a.Dockerfile"),
                ("target", "t"),
            ],
            "s1",
        );
        assert_eq!(
            route_key(&vcs, Some("sk")),
            (KeyKind::Vcs, "https://git/x.git\na.Dockerfile\nt".into())
        );
        let plain = solve(&[(ROUTE_KEY_ATTR, "")], "p:s1");
        assert_eq!(
            route_key(&plain, Some("ctx:abcd")),
            (KeyKind::SharedKey, "ctx:abcd".into())
        );
        assert_eq!(route_key(&plain, Some("")), (KeyKind::Session, "s1".into()));
        assert_eq!(route_key(&plain, None), (KeyKind::Session, "s1".into()));
    }

    #[tokio::test]
    async fn held_session_is_released_to_the_bound_worker() {
        let routes = Routes::new(Duration::from_secs(60));
        let w = worker("w0");
        let SessionStart::Held(rx) = routes.session_arrived("s1", "sk") else {
            panic!("not held");
        };
        assert_eq!(
            routes.held_shared_key("pfx:s1", Duration::ZERO).await,
            Some("sk".into())
        );
        let BindOutcome::Released(opened) = routes.bind_session("pfx:s1", &w) else {
            panic!("not released");
        };
        let b = rx.await.expect("binding");
        assert_eq!(b.worker.name, "w0");
        b.opened.send(Ok(())).expect("send");
        assert!(opened.await.expect("opened").is_ok());
        assert!(routes.session_worker("s1").is_some());
        assert!(!routes.session_held("s1"));
        let w2 = worker("w9");
        routes.rebind_session("s1", &w2);
        assert_eq!(routes.session_worker("s1").expect("bound").name, "w9");
    }

    #[tokio::test]
    async fn session_after_solve_goes_straight_to_the_worker() {
        let routes = Routes::new(Duration::from_secs(60));
        let w = worker("w1");
        assert!(matches!(
            routes.bind_session("s2", &w),
            BindOutcome::Prebound
        ));
        let SessionStart::Bound(got) = routes.session_arrived("s2", "") else {
            panic!("not bound");
        };
        assert_eq!(got.name, "w1");
    }

    #[tokio::test]
    async fn ref_lookup_waits_for_the_pin() {
        let routes = Routes::new(Duration::from_secs(60));
        let w = worker("w2");
        let r2 = routes.clone();
        let waiter =
            tokio::spawn(async move { r2.ref_worker("b1", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        routes.pin_ref("b1", &w);
        let got = waiter.await.expect("join").expect("found");
        assert_eq!(got.name, "w2");
        assert!(routes
            .ref_worker("unknown", Duration::from_millis(50))
            .await
            .is_none());
    }

    #[tokio::test]
    async fn unpinned_workers_are_taken_only_as_the_caller_accepts() {
        let routes = Routes::new(Duration::from_secs(60));
        let (w0, w1) = (worker("w0"), worker("w1"));
        let now = |accept| routes.worker_of("b", Duration::ZERO, accept);
        let name = |f: Option<RefWorker>| f.map(|f| (f.worker.name.clone(), f.pinned));
        routes.expect_ref("b", &w0);
        assert_eq!(name(now(Accept::Chosen).await), Some(("w0".into(), false)));
        assert_eq!(name(now(Accept::Forwarded).await), None);
        // A Solve forwarded to another worker than the expected one changes nothing.
        routes.forwarded_ref("b", &w1);
        assert_eq!(name(now(Accept::Forwarded).await), None);
        routes.forwarded_ref("b", &w0);
        assert_eq!(
            name(now(Accept::Forwarded).await),
            Some(("w0".into(), false))
        );
        assert_eq!(name(now(Accept::Pinned).await), None);
        // The open failed on w0: the Solve chooses w1, and calls wait for it again.
        routes.expect_ref("b", &w1);
        assert_eq!(name(now(Accept::Forwarded).await), None);
        let r2 = routes.clone();
        let waiter = tokio::spawn(async move {
            r2.worker_of("b", Duration::from_secs(30), Accept::Pinned)
                .await
                .map(|f| (f.worker.name.clone(), f.pinned))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        routes.forwarded_ref("b", &w1);
        routes.pin_ref("b", &w1);
        assert_eq!(waiter.await.expect("join"), Some(("w1".into(), true)));
        assert_eq!(name(now(Accept::Chosen).await), Some(("w1".into(), true)));
    }

    #[tokio::test]
    async fn finished_pins_expire_and_nothing_leaks() {
        let keep = Duration::from_secs(60);
        let routes = Routes::new(keep);
        let w = worker("w3");
        for i in 0..50 {
            let id = format!("s{i}");
            let r = format!("b{i}");
            let _held = routes.session_arrived(&id, "");
            routes.bind_session(&id, &w);
            routes.pin_ref(&r, &w);
            routes.ref_done(&r);
            routes.session_ended(&id);
        }
        // A session that never connects and one that is abandoned while held.
        routes.bind_session("never", &w);
        let _ = routes.session_arrived("gone", "");
        routes.session_abandoned("gone");
        let now = Instant::now();
        assert_eq!(routes.expire_at(now), (51, 50));
        assert_eq!(
            routes.expire_at(now + keep / 2),
            (51, 50),
            "expired before the keep time"
        );
        assert_eq!(routes.expire_at(now + keep * 2), (0, 0));
        // A running build's pin never expires.
        routes.pin_ref("running", &w);
        assert_eq!(routes.expire_at(now + keep * 10), (0, 1));
    }
}
