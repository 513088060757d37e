//! Reconcilers: the kube-rs `Controller` loops that make the cluster match the resources.
//! One reconciler per kind; [`pool`] handles `BuildWorkerPool`. Uses [`crate::render`] and
//! [`crate::tls`] for the objects, and the API server (through `kube::Client`) for the rest.
//!
//! BuildJob reconcile (running a build through the gateway) is not implemented yet.

pub mod pool;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use time::OffsetDateTime;

use crate::crd::BuildWorkerPool;

/// A clock, injectable so tests can move time to a certificate's expiry.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// What every reconcile shares.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Current time.
    pub clock: Clock,
}

impl Context {
    /// A context on the system clock.
    pub fn new(client: Client) -> Self {
        Context {
            client,
            clock: Arc::new(OffsetDateTime::now_utc),
        }
    }
}

/// Runs the `BuildWorkerPool` controller in every namespace until SIGTERM or Ctrl-C.
pub async fn run(client: Client) {
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

/// Requeue after a failure.
pub(crate) fn retry_after_error() -> Action {
    Action::requeue(std::time::Duration::from_secs(30))
}
