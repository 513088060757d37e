//! The gateway's Prometheus metrics and the small plaintext HTTP endpoint serving them
//! (`/metrics`, `/healthz`, `/readyz`). Used by every other module; uses none of them.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All gateway metrics. Cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    builds: IntCounterVec,
    inflight: IntGaugeVec,
    healthy: IntGaugeVec,
    ejections: IntCounterVec,
    decisions: IntCounterVec,
    pin_waits: IntCounterVec,
    pin_wait_seconds: HistogramVec,
    latency: HistogramVec,
    queue_depth: IntGaugeVec,
    queue_wait: HistogramVec,
    resent: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

// === impl Metrics ===

impl Metrics {
    /// A fresh registry with every gateway metric registered (fails only on an invalid
    /// metric definition, i.e. a programming error the unit test catches).
    pub fn new() -> Result<Metrics, prometheus::Error> {
        type R<T> = Result<T, prometheus::Error>;
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> R<T> {
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> R<IntCounterVec> {
            reg(r, IntCounterVec::new(Opts::new(name, help), labels)?)
        }
        fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> R<IntGaugeVec> {
            reg(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
        }
        fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> R<HistogramVec> {
            let buckets = vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
            ];
            histogram_with(r, name, help, labels, buckets)
        }
        fn histogram_with(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
            buckets: Vec<f64>,
        ) -> R<HistogramVec> {
            reg(
                r,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?,
            )
        }
        let inner = Inner {
            builds: counter(
                &registry,
                "kiln_gateway_builds_total",
                "Builds (Solve calls) sent to each worker.",
                &["worker"],
            )?,
            inflight: gauge(
                &registry,
                "kiln_gateway_inflight_builds",
                "Builds running on each worker through this gateway.",
                &["worker"],
            )?,
            healthy: gauge(
                &registry,
                "kiln_gateway_worker_healthy",
                "1 when the worker passes its health checks.",
                &["worker"],
            )?,
            ejections: counter(
                &registry,
                "kiln_gateway_worker_ejections_total",
                "Times a worker was taken out of rotation.",
                &["worker"],
            )?,
            decisions: counter(
                &registry,
                "kiln_gateway_routing_decisions_total",
                "Builds routed, by the kind of key that chose the worker.",
                &["kind"],
            )?,
            pin_waits: counter(
                &registry,
                "kiln_gateway_pinning_waits_total",
                "Calls that waited for their build's worker to be known, by RPC and outcome.",
                &["rpc", "outcome"],
            )?,
            pin_wait_seconds: histogram(
                &registry,
                "kiln_gateway_pinning_wait_seconds",
                "Time calls waited for their build's worker to be known.",
                &["rpc"],
            )?,
            latency: histogram(
                &registry,
                "kiln_gateway_proxy_latency_seconds",
                "Time from a call's arrival to the worker's response headers, by RPC.",
                &["rpc"],
            )?,
            queue_depth: gauge(
                &registry,
                "kiln_gateway_queue_depth",
                "Builds waiting in the gateway for a build slot of each worker.",
                &["worker"],
            )?,
            queue_wait: histogram_with(
                &registry,
                "kiln_gateway_queue_wait_seconds",
                "Time builds waited in the gateway's queue for a build slot, by worker.",
                &["worker"],
                vec![
                    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0,
                ],
            )?,
            resent: counter(
                &registry,
                "kiln_gateway_resent_calls_total",
                "Calls sent again to another worker because the first never answered, by RPC.",
                &["rpc"],
            )?,
            registry,
        };
        Ok(Metrics {
            inner: Arc::new(inner),
        })
    }

    /// One build routed to `worker` by a key of `kind`.
    pub fn routed(&self, worker: &str, kind: &str) {
        self.inner.builds.with_label_values(&[worker]).inc();
        self.inner.decisions.with_label_values(&[kind]).inc();
    }

    /// A call of `rpc` was sent again to another worker.
    pub fn resent(&self, rpc: &str) {
        self.inner.resent.with_label_values(&[rpc]).inc();
    }

    /// Sets the in-flight build count of `worker`.
    pub fn set_inflight(&self, worker: &str, n: usize) {
        self.inner
            .inflight
            .with_label_values(&[worker])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the queue depth of `worker`.
    pub fn set_queued(&self, worker: &str, n: usize) {
        self.inner
            .queue_depth
            .with_label_values(&[worker])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One build waited `waited` in the queue of `worker` (admitted or timed out).
    pub fn queue_wait(&self, worker: &str, waited: Duration) {
        self.inner
            .queue_wait
            .with_label_values(&[worker])
            .observe(waited.as_secs_f64());
    }

    /// Sets the health gauge of `worker`.
    pub fn set_healthy(&self, worker: &str, healthy: bool) {
        self.inner
            .healthy
            .with_label_values(&[worker])
            .set(i64::from(healthy));
    }

    /// Counts one ejection of `worker`.
    pub fn ejection(&self, worker: &str) {
        self.inner.ejections.with_label_values(&[worker]).inc();
    }

    /// Drops the per-worker gauges of a worker that left the pool.
    pub fn forget_worker(&self, worker: &str) {
        let _ = self.inner.healthy.remove_label_values(&[worker]);
        let _ = self.inner.inflight.remove_label_values(&[worker]);
        let _ = self.inner.queue_depth.remove_label_values(&[worker]);
    }

    /// A call of `rpc` waited `waited` for its pin; `outcome` is `found` or `timeout`.
    pub fn pin_wait(&self, rpc: &str, outcome: &str, waited: Duration) {
        self.inner
            .pin_waits
            .with_label_values(&[rpc, outcome])
            .inc();
        self.inner
            .pin_wait_seconds
            .with_label_values(&[rpc])
            .observe(waited.as_secs_f64());
    }

    /// Proxy latency of one `rpc` call.
    pub fn latency(&self, rpc: &str, d: Duration) {
        self.inner
            .latency
            .with_label_values(&[rpc])
            .observe(d.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` (ready when `ready()` says so) over
    /// plaintext HTTP/1.1 on `listener`, forever.
    pub async fn serve<F>(self, listener: tokio::net::TcpListener, ready: F)
    where
        F: Fn() -> bool + Send + Sync + Clone + 'static,
    {
        serve_http(listener, move |_method: &str, path: &str| match path {
            "/metrics" => (200, self.render()),
            "/healthz" => (200, "ok\n".to_string()),
            "/readyz" if ready() => (200, "ready\n".to_string()),
            "/readyz" => (503, "no healthy worker\n".to_string()),
            _ => (404, "not found\n".to_string()),
        })
        .await
    }
}

pub use kiln_proto::transport::http::{serve as serve_http, serve_conn as serve_http_conn};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_renders() {
        let m = Metrics::new().expect("metrics");
        m.routed("w0", "explicit");
        m.set_inflight("w0", 2);
        m.set_healthy("w0", true);
        m.ejection("w0");
        m.pin_wait("status", "found", Duration::from_millis(3));
        m.latency("solve", Duration::from_micros(300));
        m.set_queued("w0", 3);
        m.queue_wait("w0", Duration::from_secs(2));
        m.resent("llbbridge");
        let text = m.render();
        for name in [
            "kiln_gateway_builds_total{worker=\"w0\"} 1",
            "kiln_gateway_inflight_builds{worker=\"w0\"} 2",
            "kiln_gateway_worker_healthy{worker=\"w0\"} 1",
            "kiln_gateway_worker_ejections_total{worker=\"w0\"} 1",
            "kiln_gateway_routing_decisions_total{kind=\"explicit\"} 1",
            "kiln_gateway_pinning_waits_total{outcome=\"found\",rpc=\"status\"} 1",
            "kiln_gateway_pinning_wait_seconds_count{rpc=\"status\"} 1",
            "kiln_gateway_proxy_latency_seconds_count{rpc=\"solve\"} 1",
            "kiln_gateway_queue_depth{worker=\"w0\"} 3",
            "kiln_gateway_queue_wait_seconds_count{worker=\"w0\"} 1",
            "kiln_gateway_resent_calls_total{rpc=\"llbbridge\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(!text.contains("invalid"), "{text}");
    }
}
