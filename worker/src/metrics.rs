//! The worker's Prometheus metrics and the small HTTP endpoint that serves them with the
//! probes Kubernetes calls: `/metrics`, `/healthz` (the process answers) and `/readyz`
//! (the store is open and the gRPC listeners are bound).
//!
//! The endpoint is plain HTTP on purpose: kubelet probes and Prometheus scrapes do not
//! present client certificates, and nothing on it can start or read a build.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::core::{Collector, Desc};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The worker's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// Builds (Solve calls) running now.
    pub builds_in_flight: IntGauge,
    /// Finished builds by `result` (`ok`, `error`, `cancelled`).
    pub builds_total: IntCounterVec,
    /// Wall time of finished builds.
    pub build_seconds: Histogram,
    /// Client sessions attached now.
    pub sessions: IntGauge,
    ready: AtomicBool,
}

impl Metrics {
    /// A fresh set of metrics.
    pub fn new() -> Result<Arc<Metrics>, prometheus::Error> {
        let registry = Registry::new_custom(Some("kiln_worker".into()), None)?;
        let builds_in_flight =
            IntGauge::new("builds_in_flight", "Builds running on this worker now.")?;
        let builds_total = IntCounterVec::new(
            Opts::new("builds_total", "Finished builds by result."),
            &["result"],
        )?;
        let build_seconds = Histogram::with_opts(
            HistogramOpts::new("build_duration_seconds", "Wall time of finished builds.")
                .buckets(prometheus::exponential_buckets(0.01, 2.5, 14)?),
        )?;
        let sessions = IntGauge::new("sessions", "Client sessions attached now.")?;
        registry.register(Box::new(builds_in_flight.clone()))?;
        registry.register(Box::new(builds_total.clone()))?;
        registry.register(Box::new(build_seconds.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        Ok(Arc::new(Metrics {
            registry,
            builds_in_flight,
            builds_total,
            build_seconds,
            sessions,
            ready: AtomicBool::new(false),
        }))
    }

    /// Reports the engine's cache figures, read from `read` at each scrape:
    /// `kiln_worker_gc_runs_total`, `kiln_worker_gc_freed_bytes_total`,
    /// `kiln_worker_cache_bytes` and `kiln_worker_cache_export_queue_depth`.
    pub fn watch_engine(
        &self,
        read: impl Fn() -> EngineStats + Send + Sync + 'static,
    ) -> Result<(), prometheus::Error> {
        let c = EngineCollector {
            read: Box::new(read),
            gc_runs: IntCounter::new("gc_runs_total", "Cache GC runs and prunes completed.")?,
            gc_freed: IntCounter::new(
                "gc_freed_bytes_total",
                "Bytes of cache records removed by GC and prunes.",
            )?,
            cache_bytes: IntGauge::new(
                "cache_bytes",
                "Bytes the local cache's layers take, as the last GC run measured them.",
            )?,
            queue_depth: IntGauge::new(
                "cache_export_queue_depth",
                "Pool cache exports queued or running.",
            )?,
        };
        self.registry.register(Box::new(c))
    }

    /// Registers another collector.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::warn!(error = %e, "registering a metric");
        }
    }

    /// Marks the worker ready (`/readyz` answers 200 from now on).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match path {
            "/metrics" => (StatusCode::OK, self.render()),
            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
            "/readyz" if self.ready.load(Ordering::SeqCst) => (StatusCode::OK, "ready\n".into()),
            "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "serving metrics and probes");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = me.answer(req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        }
    }
}

/// The engine's figures [`Metrics::watch_engine`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// GC runs and prunes completed.
    pub gc_runs: u64,
    /// Bytes they freed.
    pub gc_freed_bytes: u64,
    /// Bytes the cache takes (last measured).
    pub cache_bytes: u64,
    /// Pool cache exports queued or running.
    pub export_queue_depth: u64,
}

struct EngineCollector {
    read: Box<dyn Fn() -> EngineStats + Send + Sync>,
    gc_runs: IntCounter,
    gc_freed: IntCounter,
    cache_bytes: IntGauge,
    queue_depth: IntGauge,
}

impl Collector for EngineCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.gc_runs.desc();
        d.extend(self.gc_freed.desc());
        d.extend(self.cache_bytes.desc());
        d.extend(self.queue_depth.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let s = (self.read)();
        // Counters only go up: add what the engine counted since the last scrape.
        self.gc_runs
            .inc_by(s.gc_runs.saturating_sub(self.gc_runs.get()));
        self.gc_freed
            .inc_by(s.gc_freed_bytes.saturating_sub(self.gc_freed.get()));
        self.cache_bytes.set(s.cache_bytes as i64);
        self.queue_depth.set(s.export_queue_depth as i64);
        let mut out = self.gc_runs.collect();
        out.extend(self.gc_freed.collect());
        out.extend(self.cache_bytes.collect());
        out.extend(self.queue_depth.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_and_metrics_answer() {
        let m = Metrics::new().unwrap();
        assert_eq!(m.answer("/healthz").status(), StatusCode::OK);
        assert_eq!(
            m.answer("/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.set_ready(true);
        assert_eq!(m.answer("/readyz").status(), StatusCode::OK);
        assert_eq!(m.answer("/nope").status(), StatusCode::NOT_FOUND);
        m.builds_total.with_label_values(&["ok"]).inc();
        m.builds_in_flight.set(2);
        let text = m.render();
        assert!(
            text.contains("kiln_worker_builds_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("kiln_worker_builds_in_flight 2"), "{text}");
    }

    #[test]
    fn engine_figures_are_read_at_scrape() {
        let m = Metrics::new().unwrap();
        let stats = Arc::new(std::sync::Mutex::new(EngineStats {
            gc_runs: 2,
            gc_freed_bytes: 4096,
            cache_bytes: 1 << 20,
            export_queue_depth: 3,
        }));
        let s = stats.clone();
        m.watch_engine(move || *s.lock().unwrap()).unwrap();
        let text = m.render();
        for want in [
            "kiln_worker_gc_runs_total 2",
            "kiln_worker_gc_freed_bytes_total 4096",
            "kiln_worker_cache_bytes 1048576",
            "kiln_worker_cache_export_queue_depth 3",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        stats.lock().unwrap().gc_runs = 5;
        stats.lock().unwrap().export_queue_depth = 0;
        let text = m.render();
        assert!(text.contains("kiln_worker_gc_runs_total 5"), "{text}");
        assert!(
            text.contains("kiln_worker_cache_export_queue_depth 0"),
            "{text}"
        );
    }
}
