//! The worker pool: each worker's channel, health (active gRPC health checks, passive
//! ejection on connection failures, rejoin when healthy), draining flag and in-flight
//! builds, and the hash ring over the pool's members.
//!
//! Uses [`crate::ring`] and [`crate::metrics`]; knows nothing of routes or RPCs beyond
//! `grpc.health.v1.Health/Check`. Discovery ([`crate::discovery`]) feeds it member sets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiln_proto::grpc::health::v1 as health;
use kiln_proto::transport::ClientTls;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::ring::Ring;
use crate::{Error, Result};

/// Connect timeout towards a worker; a worker that cannot be reached in this time is ejected.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Timeout of one active health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A worker as discovery names it: a stable name (the ring hashes it) and an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// Stable identity (pod name, or the address when nothing better is known).
    pub name: String,
    /// `tcp://host:port`.
    pub addr: String,
}

/// One worker.
#[derive(Debug)]
pub struct Worker {
    /// Stable identity, the one hashed on the ring.
    pub name: String,
    /// `tcp://host:port`.
    pub addr: String,
    /// The gRPC channel (connects lazily, reconnects by itself).
    pub channel: Channel,
    healthy: AtomicBool,
    /// Drained by the operator (admin API).
    draining: AtomicBool,
    /// Drained by discovery (a terminating pod); kept apart so that discovery never
    /// clears an operator's drain.
    terminating: AtomicBool,
    inflight: AtomicUsize,
    /// Builds waiting in the gateway for one of its build slots.
    queued: AtomicUsize,
    /// Its build slots (FIFO); `None` when unlimited.
    slots: Option<Arc<Semaphore>>,
    limit: usize,
}

// === impl Worker ===

impl Worker {
    fn new(m: &Member, tls: Option<Arc<ClientTls>>, limit: usize) -> Result<Worker> {
        let hostport = m
            .addr
            .strip_prefix("tcp://")
            .ok_or_else(|| Error::BadWorkerAddr {
                addr: m.addr.clone(),
                reason: "expected tcp://host:port".into(),
            })?;
        let addr: kiln_proto::transport::Addr =
            m.addr
                .parse()
                .map_err(|e: kiln_proto::transport::Error| Error::BadWorkerAddr {
                    addr: m.addr.clone(),
                    reason: e.to_string(),
                })?;
        let endpoint = Endpoint::from_shared(format!("http://{hostport}"))
            .map_err(|e| Error::BadWorkerAddr {
                addr: m.addr.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A worker that goes silent (a network partition that drops packets rather
            // than refusing them) fails its builds within ~20 s instead of the minutes TCP
            // would take; health checks eject it sooner still.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Worker {
            name: m.name.clone(),
            addr: m.addr.clone(),
            channel: endpoint
                .connect_with_connector_lazy(kiln_proto::transport::connector(&addr, tls)),
            // Optimistic until a check or a call says otherwise: a fresh pool can route at once.
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            terminating: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            slots: (limit > 0).then(|| Arc::new(Semaphore::new(limit))),
            limit,
        })
    }

    /// True when the last check or call reached it.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// True when it takes no new builds (its running builds go on): drained by the
    /// operator or terminating according to discovery.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || self.is_terminating()
    }

    /// True when discovery reported it terminating (it is drained until it leaves).
    pub fn is_terminating(&self) -> bool {
        self.terminating.load(Ordering::SeqCst)
    }

    /// Builds running on it through this gateway (admitted, not queued).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Builds waiting in the gateway's queue for one of its build slots.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Its limit of concurrent builds; 0 when unlimited.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The load the ring weighs: running plus queued builds.
    fn load(&self) -> usize {
        self.inflight() + self.queued()
    }

    /// `name (addr)`, for error messages.
    pub fn describe(&self) -> String {
        if self.name == self.addr {
            self.addr.clone()
        } else {
            format!("{} ({})", self.name, self.addr)
        }
    }

    /// One `grpc.health.v1.Health/Check`; `Ok` when the worker answers SERVING.
    pub async fn check(&self) -> std::result::Result<(), String> {
        let mut client = health::health_client::HealthClient::new(self.channel.clone());
        let call = client.check(health::HealthCheckRequest::default());
        match tokio::time::timeout(CHECK_TIMEOUT, call).await {
            Err(_) => Err(format!("no answer in {CHECK_TIMEOUT:?}")),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Ok(Ok(r)) => {
                let s = r.into_inner().status;
                if s == health::health_check_response::ServingStatus::Serving as i32 {
                    Ok(())
                } else {
                    Err(format!("status {s} (not SERVING)"))
                }
            }
        }
    }
}

/// One build on a worker: counted as running once admitted (holding one of the worker's
/// build slots), as queued before that. Dropping it frees the slot or leaves the queue.
#[derive(Debug)]
pub struct InflightGuard {
    worker: Arc<Worker>,
    metrics: Metrics,
    /// Holds the build slot while running (none when the worker is unlimited).
    permit: Option<OwnedSemaphorePermit>,
    queued: bool,
}

/// A queued build gave up: the worker stayed at its limit for the whole queue timeout.
#[derive(Debug, Clone, Copy)]
pub struct QueueTimeout {
    /// How long it waited.
    pub waited: Duration,
}

// === impl InflightGuard ===

impl InflightGuard {
    /// Takes a slot of `worker` if one is free (never ahead of queued builds), else joins
    /// its queue.
    fn take(worker: &Arc<Worker>, metrics: &Metrics) -> InflightGuard {
        let permit = match &worker.slots {
            None => None,
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let now = worker.queued.fetch_add(1, Ordering::SeqCst) + 1;
                    metrics.set_queued(&worker.name, now);
                    return InflightGuard {
                        worker: worker.clone(),
                        metrics: metrics.clone(),
                        permit: None,
                        queued: true,
                    };
                }
            },
        };
        let now = worker.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        metrics.set_inflight(&worker.name, now);
        InflightGuard {
            worker: worker.clone(),
            metrics: metrics.clone(),
            permit,
            queued: false,
        }
    }

    /// True while the build waits for a slot.
    pub fn is_queued(&self) -> bool {
        self.queued
    }

    /// Waits (FIFO) up to `timeout` for a slot of the worker; at once when already
    /// admitted. Cancel-safe: dropping the future (or the guard) leaves the queue.
    pub async fn admit(&mut self, timeout: Duration) -> std::result::Result<(), QueueTimeout> {
        let Some(slots) = self.worker.slots.clone().filter(|_| self.queued) else {
            return Ok(());
        };
        let start = tokio::time::Instant::now();
        let got = tokio::time::timeout(timeout, slots.acquire_owned()).await;
        let waited = start.elapsed();
        self.metrics.queue_wait(&self.worker.name, waited);
        match got {
            Ok(Ok(p)) => {
                self.permit = Some(p);
                self.queued = false;
                let q = self.worker.queued.fetch_sub(1, Ordering::SeqCst) - 1;
                self.metrics.set_queued(&self.worker.name, q);
                let now = self.worker.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                self.metrics.set_inflight(&self.worker.name, now);
                Ok(())
            }
            // The semaphore is never closed; treat it like a timeout if it were.
            Ok(Err(_)) | Err(_) => Err(QueueTimeout { waited }),
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.queued {
            let now = self.worker.queued.fetch_sub(1, Ordering::SeqCst) - 1;
            self.metrics.set_queued(&self.worker.name, now);
        } else {
            let now = self.worker.inflight.fetch_sub(1, Ordering::SeqCst) - 1;
            self.metrics.set_inflight(&self.worker.name, now);
        }
        // The permit (if any) drops after the count, handing the slot to the next in line.
        drop(self.permit.take());
    }
}

/// The workers and the ring over them. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<RwLock<Inner>>,
    picking: Arc<std::sync::Mutex<()>>,
    vnodes: usize,
    load_bound: f64,
    metrics: Metrics,
    worker_tls: Option<Arc<ClientTls>>,
    max_builds: usize,
}

#[derive(Debug, Default)]
struct Inner {
    workers: BTreeMap<String, Arc<Worker>>,
    ring: Ring,
}

// === impl Pool ===

impl Pool {
    /// An empty pool; `load_bound` is `c` of bounded-load hashing.
    pub fn new(vnodes: usize, load_bound: f64, metrics: Metrics) -> Pool {
        Pool {
            inner: Arc::default(),
            picking: Arc::default(),
            vnodes,
            load_bound,
            metrics,
            worker_tls: None,
            max_builds: 0,
        }
    }

    /// Limits every worker that joins from now on to `n` concurrent builds (0: unlimited);
    /// builds beyond it wait in the gateway's queue (see [`InflightGuard::admit`]).
    pub fn with_max_builds(mut self, n: usize) -> Pool {
        self.max_builds = n;
        self
    }

    /// Dials workers with mutual TLS (the gateway's client certificate).
    pub fn with_worker_tls(mut self, tls: Option<Arc<ClientTls>>) -> Pool {
        self.worker_tls = tls;
        self
    }

    /// Makes the pool's members exactly `members`: new ones join (healthy until a check
    /// says otherwise), missing ones leave the ring (builds already on them go on through
    /// the handles they hold), changed addresses get a new channel.
    pub fn set_members(&self, members: &[Member]) -> Result<()> {
        self.set_members_terminating(members, &BTreeSet::new())
    }

    /// [`Pool::set_members`], with the members named in `terminating` drained (their pods
    /// are going away: no new builds, running ones go on) and every other member's
    /// terminating mark cleared.
    pub fn set_members_terminating(
        &self,
        members: &[Member],
        terminating: &BTreeSet<String>,
    ) -> Result<()> {
        let mut fresh = BTreeMap::new();
        for m in members {
            fresh.insert(m.name.clone(), m);
        }
        let mut inner = self
            .inner
            .write()
            .map_err(|_| Error::Internal("pool lock poisoned".into()))?;
        let mut workers = BTreeMap::new();
        for (name, m) in fresh {
            let w = match inner.workers.get(&name) {
                Some(w) if w.addr == m.addr => w.clone(),
                _ => {
                    tracing::info!(worker = %name, addr = %m.addr, "worker joined");
                    Arc::new(Worker::new(m, self.worker_tls.clone(), self.max_builds)?)
                }
            };
            let term = terminating.contains(&name);
            if w.terminating.swap(term, Ordering::SeqCst) != term {
                tracing::info!(worker = %name, terminating = term, "worker terminating changed");
            }
            self.metrics.set_healthy(&name, w.is_healthy());
            workers.insert(name, w);
        }
        for name in inner.workers.keys() {
            if !workers.contains_key(name) {
                tracing::info!(worker = %name, "worker left discovery; draining");
                self.metrics.forget_worker(name);
            }
        }
        if workers.keys().ne(inner.workers.keys()) {
            inner.ring = Ring::new(workers.keys().cloned(), self.vnodes);
        }
        inner.workers = workers;
        Ok(())
    }

    /// All members.
    pub fn workers(&self) -> Vec<Arc<Worker>> {
        self.inner
            .read()
            .map(|i| i.workers.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The member called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Worker>> {
        self.inner.read().ok()?.workers.get(name).cloned()
    }

    /// Members that take new builds (healthy, not draining).
    pub fn available(&self) -> Vec<Arc<Worker>> {
        self.workers()
            .into_iter()
            .filter(|w| w.is_healthy() && !w.is_draining())
            .collect()
    }

    /// The worker for `key` under bounded load (running plus queued builds), skipping
    /// `exclude`d names; counts the build on it (running, or queued when the worker is at
    /// its limit) until the returned guard drops.
    pub fn pick(&self, key: &str, exclude: &[String]) -> Option<(Arc<Worker>, InflightGuard)> {
        // One decision at a time, so concurrent builds cannot both take the last slot
        // under the load bound.
        let _one = self.picking.lock().ok()?;
        let inner = self.inner.read().ok()?;
        let load = |n: &str| {
            let w = inner.workers.get(n)?;
            (w.is_healthy() && !w.is_draining() && !exclude.iter().any(|e| e == n))
                .then(|| w.load())
        };
        let name = inner.ring.pick(key, self.load_bound, load)?;
        let w = inner.workers.get(name)?.clone();
        let guard = InflightGuard::take(&w, &self.metrics);
        Some((w, guard))
    }

    /// Counts one more build on `worker` (chosen by an earlier pin, not by the ring) unless
    /// it is draining; queued when the worker is at its limit.
    pub fn pin(&self, worker: &Arc<Worker>) -> Option<InflightGuard> {
        if worker.is_draining() {
            return None;
        }
        Some(InflightGuard::take(worker, &self.metrics))
    }

    /// The key's home worker ignoring load and health (for tests and diagnostics).
    pub fn home(&self, key: &str) -> Option<String> {
        self.inner.read().ok()?.ring.home(key).map(str::to_string)
    }

    /// Takes `name` out of rotation after a connection failure (passive ejection); the
    /// active checks bring it back when it answers again.
    pub fn eject(&self, worker: &Worker, reason: &str) {
        if worker.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(worker = %worker.name, addr = %worker.addr, %reason, "worker ejected");
            self.metrics.ejection(&worker.name);
        }
        self.metrics.set_healthy(&worker.name, false);
    }

    fn mark_healthy(&self, worker: &Worker) {
        if !worker.healthy.swap(true, Ordering::SeqCst) {
            tracing::info!(worker = %worker.name, "worker healthy again; rejoined");
        }
        self.metrics.set_healthy(&worker.name, true);
    }

    /// Sets or clears draining on `name`: a draining worker takes no new builds and keeps
    /// its running ones. `false` when there is no such member.
    pub fn set_draining(&self, name: &str, draining: bool) -> bool {
        match self.get(name) {
            Some(w) => {
                if w.draining.swap(draining, Ordering::SeqCst) != draining {
                    tracing::info!(worker = %name, draining, "worker draining changed");
                }
                true
            }
            None => false,
        }
    }

    /// Checks every member once, ejecting the ones that fail and restoring the ones that
    /// answer.
    pub async fn check_all(&self) {
        let workers = self.workers();
        let checks = workers.iter().map(|w| async move { (w, w.check().await) });
        for (w, res) in futures::future::join_all(checks).await {
            match res {
                Ok(()) => self.mark_healthy(w),
                Err(e) => self.eject(w, &format!("health check failed: {e}")),
            }
        }
    }

    /// Runs [`Pool::check_all`] every `interval`, forever.
    pub async fn run_checks(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check_all().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: usize) -> Member {
        Member {
            name: format!("w{i}"),
            addr: format!("tcp://127.0.0.1:{}", 1 + i),
        }
    }

    #[tokio::test]
    async fn membership_and_draining() {
        let pool = Pool::new(40, 1.25, Metrics::new().expect("metrics"));
        pool.set_members(&[member(0), member(1), member(2)])
            .expect("members");
        assert_eq!(pool.available().len(), 3);
        let home = pool.home("k").expect("home");
        assert!(pool.set_draining(&home, true));
        let (w, _g) = pool.pick("k", &[]).expect("pick");
        assert_ne!(w.name, home, "a draining worker took a new build");
        assert!(pool.set_draining(&home, false));
        let (w, g) = pool.pick("k", &[]).expect("pick");
        assert_eq!(w.name, home);
        assert_eq!(w.inflight(), 1);
        drop(g);
        assert_eq!(w.inflight(), 0);
        // Leaving discovery: the handle stays usable, the ring forgets it.
        let kept = pool.get(&home).expect("member");
        let rest: Vec<Member> = [member(0), member(1), member(2)]
            .into_iter()
            .filter(|m| m.name != home)
            .collect();
        pool.set_members(&rest).expect("members");
        assert!(pool.get(&home).is_none());
        assert_ne!(pool.home("k"), Some(home));
        assert_eq!(kept.inflight(), 0);
        assert!(!pool.set_draining("nope", true));
    }

    #[tokio::test]
    async fn bad_address_is_an_error_naming_it() {
        let pool = Pool::new(40, 1.25, Metrics::new().expect("metrics"));
        let err = pool
            .set_members(&[Member {
                name: "x".into(),
                addr: "http://nowhere".into(),
            }])
            .expect_err("bad address accepted");
        assert!(err.to_string().contains("http://nowhere"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_worker_is_ejected_and_skipped() {
        // A port nothing listens on: bind, take the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let pool = Pool::new(40, 1.25, Metrics::new().expect("metrics"));
        pool.set_members(&[Member {
            name: "dead".into(),
            addr: format!("tcp://127.0.0.1:{port}"),
        }])
        .expect("members");
        pool.check_all().await;
        assert!(pool.available().is_empty());
        assert!(pool.pick("k", &[]).is_none());
    }
}
