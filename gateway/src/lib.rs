//! Kiln's gateway: one BuildKit endpoint in front of many workers, sending every call of
//! one build to one worker, chosen by consistent hashing with bounded load so that the
//! same project keeps landing where its cache is warm (shared/design/buildkit-wire.md §5).
//!
//! Layout (discovery, balancing and transport kept apart, joined here):
//! * [`discovery`]: static lists, DNS and Kubernetes EndpointSlices → member sets.
//! * [`health`]: the worker pool (channels, health checks, ejection, draining, load).
//! * [`ring`]: consistent hashing with bounded load (pure data).
//! * [`route`]: routing keys and the session/ref pin tables.
//! * [`proxy`]: the gRPC services that forward calls.
//! * [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! * [`admin`]: the operator's drain/undrain endpoint.
//!
//! Admission: each worker runs at most [`Config::max_builds_per_worker`] builds through
//! the gateway; a Solve beyond that waits in a FIFO queue at the gateway (its Session
//! already open on the worker) until a slot frees or [`proxy::Timeouts::queue`] runs out.

pub mod admin;
pub mod discovery;
pub mod error;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod ring;
pub mod route;

use std::time::Duration;

pub use error::Error;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configured gateway: pool, pin tables and metrics, ready to serve.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The shared state of the services.
    pub proxy: proxy::Proxy,
}

/// How to build a [`Gateway`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Load bound factor `c`.
    pub load_bound: f64,
    /// Virtual nodes per worker.
    pub vnodes: usize,
    /// How long finished builds' pins stay.
    pub keep: Duration,
    /// Proxy timeouts.
    pub timeouts: proxy::Timeouts,
    /// TLS towards the workers (CA and the gateway's client certificate); plaintext if none.
    pub worker_tls: Option<std::sync::Arc<kiln_proto::transport::ClientTls>>,
    /// Concurrent builds per worker before new ones queue at the gateway; 0 = unlimited.
    pub max_builds_per_worker: usize,
}

/// Default [`Config::max_builds_per_worker`].
pub const DEFAULT_MAX_BUILDS_PER_WORKER: usize = 8;

impl Default for Config {
    fn default() -> Self {
        Config {
            load_bound: ring::DEFAULT_LOAD_BOUND,
            vnodes: ring::DEFAULT_VNODES,
            keep: route::DEFAULT_KEEP,
            timeouts: proxy::Timeouts::default(),
            worker_tls: None,
            max_builds_per_worker: DEFAULT_MAX_BUILDS_PER_WORKER,
        }
    }
}

// === impl Gateway ===

impl Gateway {
    /// A gateway with an empty pool; feed it with [`health::Pool::set_members`].
    pub fn new(config: Config, metrics: metrics::Metrics) -> Gateway {
        let pool = health::Pool::new(config.vnodes, config.load_bound, metrics.clone())
            .with_worker_tls(config.worker_tls.clone())
            .with_max_builds(config.max_builds_per_worker);
        Gateway {
            proxy: proxy::Proxy {
                pool,
                routes: route::Routes::new(config.keep),
                metrics,
                timeouts: config.timeouts,
            },
        }
    }

    /// The pool of workers.
    pub fn pool(&self) -> &health::Pool {
        &self.proxy.pool
    }

    /// The tonic router with Control, LLBBridge and health.
    pub fn router(&self) -> tonic::service::Routes {
        tonic::service::Routes::new(self.proxy.control_server())
            .add_service(self.proxy.bridge_server())
            .add_service(self.proxy.health_server())
    }

    /// Starts the background tasks: health checks every `check_every` and pin expiry.
    pub fn spawn_background(&self, check_every: Duration) {
        tokio::spawn(self.proxy.pool.clone().run_checks(check_every));
        tokio::spawn(self.proxy.routes.clone().run_expiry(Duration::from_secs(5)));
    }

    /// Serves the gateway on accepted connections (unix, TCP or mutual TLS; see
    /// `kiln_proto::transport`) until the listener fails.
    pub async fn serve_incoming(
        &self,
        incoming: kiln_proto::transport::Incoming,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_routes(self.router())
            .serve_with_incoming(incoming)
            .await
    }

    /// Serves the gateway on `listener` (plaintext; the caller decides whether that is
    /// allowed) until the listener fails.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_routes(self.router())
            .serve_with_incoming(incoming)
            .await
    }
}
