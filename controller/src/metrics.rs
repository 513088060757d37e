//! The controller's Prometheus metrics and the plaintext HTTP endpoint serving them
//! (`/metrics`, `/healthz`, `/readyz`, with `--metrics-addr`). The reconcilers count into
//! [`global`]; nothing here calls the API server.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The controller's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_seconds: HistogramVec,
    buildjobs: IntCounterVec,
    leader: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "kiln_controller_reconcile_total",
                "Reconciles by kind and result (ok or error).",
            ),
            &["kind", "result"],
        )?;
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "kiln_controller_reconcile_duration_seconds",
                "Time one reconcile took, by kind.",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["kind"],
        )?;
        let buildjobs = IntCounterVec::new(
            Opts::new(
                "kiln_controller_buildjobs_total",
                "BuildJobs finished by this process, by outcome (succeeded or failed).",
            ),
            &["outcome"],
        )?;
        let leader = IntGauge::new(
            "kiln_controller_leader",
            "1 while this replica holds the controller Lease and runs the controllers.",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_seconds.clone()))?;
        registry.register(Box::new(buildjobs.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            buildjobs,
            leader,
        })
    }

    /// Counts one reconcile of `kind` (`BuildJob`, `BuildWorkerPool`).
    pub fn reconciled(&self, kind: &str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles.with_label_values(&[kind, result]).inc();
        self.reconcile_seconds
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
    }

    /// Counts one BuildJob that ended with `outcome`.
    pub fn job_finished(&self, outcome: &str) {
        self.buildjobs.with_label_values(&[outcome]).inc();
    }

    /// Sets whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

static GLOBAL: LazyLock<Option<Arc<Metrics>>> = LazyLock::new(|| match Metrics::new() {
    Ok(m) => Some(Arc::new(m)),
    Err(error) => {
        tracing::error!(%error, "cannot register the controller metrics");
        None
    }
});

/// The process's metrics (`None` only if registering them failed, which is logged).
pub fn global() -> Option<&'static Metrics> {
    GLOBAL.as_deref()
}

/// Serves `/metrics`, `/healthz` and `/readyz` over plaintext HTTP/1.1 on `listener`
/// forever (one request per connection, no request bodies).
pub async fn serve(listener: tokio::net::TcpListener) {
    kiln_proto::transport::http::serve(listener, |_method: &str, path: &str| match path {
        "/metrics" => (200, global().map(Metrics::render).unwrap_or_default()),
        "/healthz" | "/readyz" => (200, "ok\n".to_string()),
        _ => (404, "not found\n".to_string()),
    })
    .await
}
