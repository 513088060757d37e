//! Reconcilers: the kube-rs `Controller` loops that make the cluster match the resources.
//! One reconciler per kind; [`pool`] handles `BuildWorkerPool`, [`job`] runs `BuildJob`s
//! through their pool's gateway. Uses [`crate::render`] and [`crate::tls`] for the objects,
//! and the API server (through `kube::Client`) for the rest.

pub mod autoscale;
pub mod job;
pub mod pool;
pub mod usage;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use time::OffsetDateTime;

use crate::crd::{BuildJob, BuildWorkerPool};

/// A clock, injectable so tests can move time to a certificate's expiry.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// What every reconcile shares.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Current time.
    pub clock: Clock,
    /// How the autoscaler reaches the gateways' admin endpoints.
    pub admin: autoscale::AdminSettings,
    /// Reads the workers' cache usage for the pool status.
    pub usage: Arc<dyn usage::UsageReader>,
}

impl Context {
    /// A context on the system clock.
    pub fn new(client: Client) -> Self {
        Context {
            client,
            clock: Arc::new(OffsetDateTime::now_utc),
            admin: autoscale::AdminSettings::default(),
            usage: Arc::new(usage::GatewayUsage::default()),
        }
    }
}

/// Runs the `BuildWorkerPool` and `BuildJob` controllers in every namespace until SIGTERM
/// or Ctrl-C; builds go through `runner`.
pub async fn run(client: Client, runner: Arc<dyn job::Runner>) {
    tokio::join!(run_pools(client.clone()), run_jobs(client, runner));
}

async fn run_pools(client: Client) {
    let pools = Api::<BuildWorkerPool>::all(client.clone());
    // Owned objects carry this label; watching only them keeps the controller off every
    // Secret and Service in the cluster.
    let cfg = watcher::Config::default().labels("app.kubernetes.io/managed-by=kiln-controller");
    let ctx = Arc::new(Context::new(client.clone()));
    Controller::new(pools, watcher::Config::default())
        .owns(Api::<StatefulSet>::all(client.clone()), cfg.clone())
        .owns(Api::<Deployment>::all(client.clone()), cfg.clone())
        .owns(Api::<Service>::all(client.clone()), cfg.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), cfg.clone())
        .owns(Api::<Secret>::all(client.clone()), cfg.clone())
        .owns(Api::<PodDisruptionBudget>::all(client), cfg)
        .shutdown_on_signal()
        .run(pool::reconcile, pool::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(pool = %obj.name, "reconciled"),
                Err(error) => tracing::warn!(%error, "reconcile failed"),
            }
        })
        .await;
}

async fn run_jobs(client: Client, runner: Arc<dyn job::Runner>) {
    let jobs = Api::<BuildJob>::all(client.clone());
    // A build task that ends patches a last line into its job's status; that change brings
    // the reconcile which writes the outcome, so the notification channel is not needed.
    let (ctx, _ended) = job::JobContext::new(
        client,
        Arc::new(OffsetDateTime::now_utc),
        runner,
        job::Settings::default(),
    );
    Controller::new(jobs, watcher::Config::default())
        .shutdown_on_signal()
        .run(job::reconcile, job::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(job = %obj.name, "reconciled"),
                Err(error) => tracing::warn!(%error, "job reconcile failed"),
            }
        })
        .await;
}

/// Requeue after a failure.
pub(crate) fn retry_after_error() -> Action {
    Action::requeue(std::time::Duration::from_secs(30))
}

/// A condition that keeps its previous transition time when its status did not change.
pub(crate) fn condition(
    previous: &[Condition],
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: OffsetDateTime,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .or_else(|| unix_time(now.unix_timestamp()))
        .unwrap_or(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

pub(crate) fn unix_time(secs: i64) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .ok()
        .map(Time)
}
