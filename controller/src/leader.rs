//! Leader election on a `coordination.k8s.io/v1` Lease, so that several controller replicas
//! can run and only one reconciles: [`Elector::try_acquire_or_renew`] takes or keeps the
//! Lease (optimistic concurrency on its resource version, so two candidates never both win
//! one round), and [`run_elected`] runs the controllers while this replica leads and stops
//! them as soon as it does not. Uses the API server only; [`crate::reconcile`] is what it
//! runs.
//!
//! Hand-written: the crates that do this (`kube-leader-election`, `kube-lease-manager`)
//! were not found with a release for kube 5 / k8s-openapi 0.29.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::reconcile::Clock;
use crate::{Error, Result};

/// Name of the controller's Lease.
pub const LEASE_NAME: &str = "kiln-controller";

/// Lease timings and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The Lease's namespace (the controller's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder's claim lasts without a renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and a candidate tries).
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// The defaults: Lease [`LEASE_NAME`], 15 s, renewed every 5 s.
    pub fn new(namespace: &str, identity: &str) -> Self {
        LeaseSettings {
            namespace: namespace.to_string(),
            name: LEASE_NAME.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    clock: Clock,
}

fn micro(t: OffsetDateTime) -> Option<MicroTime> {
    let nanos = i64::try_from(t.unix_timestamp_nanos()).ok()?;
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .ok()
        .map(MicroTime)
}

impl Elector {
    /// A candidate with `settings`, reading time from `clock`.
    pub fn new(client: Client, settings: LeaseSettings, clock: Clock) -> Self {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            clock,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn action(&self, verb: &str) -> String {
        format!(
            "{verb} Lease {}/{}",
            self.settings.namespace, self.settings.name
        )
    }

    /// The Lease as the API server holds it now, if it exists.
    async fn current(&self) -> Result<Option<Lease>> {
        self.api
            .get_opt(&self.settings.name)
            .await
            .map_err(|source| Error::Kube {
                action: self.action("get"),
                source,
            })
    }

    /// One round: creates the Lease, renews it when this replica holds it, or takes it over
    /// when its holder let it expire. True when this replica holds the Lease afterwards.
    /// Losing a race (409 Conflict) is `false`, not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = (self.clock)();
        let me = self.settings.identity.clone();
        let duration = i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let existing = self.current().await?;
        let Some(lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration),
                    acquire_time: micro(now),
                    renew_time: micro(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(source) => Err(Error::Kube {
                    action: self.action("create"),
                    source,
                }),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == me;
        if !mine && !holder.is_empty() {
            let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(duration).max(0));
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0.as_second());
            let expired = match renewed {
                Some(at) => now.unix_timestamp() > at.saturating_add(held_for),
                None => true,
            };
            if !expired {
                return Ok(false);
            }
            info!(previous = %holder, "the controller Lease expired: taking it over");
        }
        let mut next = lease.clone();
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(me);
        new_spec.lease_duration_seconds = Some(duration);
        new_spec.renew_time = micro(now);
        if !mine {
            new_spec.acquire_time = micro(now);
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        next.spec = Some(new_spec);
        // The resource version read above is the precondition: a concurrent writer wins
        // and this round is lost.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(source) => Err(Error::Kube {
                action: self.action("update"),
                source,
            }),
        }
    }
}

impl Elector {
    /// Gives the Lease up when this replica holds it, so another takes over without
    /// waiting for it to expire.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.current().await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
            Err(source) => Err(Error::Kube {
                action: self.action("release"),
                source,
            }),
        }
    }
}

/// Runs `controllers()` while this replica holds the Lease, until `shutdown` completes.
/// Losing the Lease (another holder, or no successful renewal within the lease duration)
/// stops them at once by dropping their future; they start again when the Lease comes
/// back. Each change sets the `kiln_controller_leader` metric and is told to
/// `on_change(leading)`.
pub async fn run_elected<F, Fut, S>(
    elector: Elector,
    controllers: F,
    on_change: impl Fn(bool),
    shutdown: S,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let every = elector.settings.renew_every;
    let lease_for = elector.settings.lease_duration;
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_ok = tokio::time::Instant::now();
    let on_change = |leading: bool| {
        if let Some(m) = crate::metrics::global() {
            m.set_leader(leading);
        }
        on_change(leading);
    };
    on_change(false);
    loop {
        let leading = match elector.try_acquire_or_renew().await {
            Ok(held) => {
                last_ok = tokio::time::Instant::now();
                held
            }
            Err(error) => {
                warn!(%error, "cannot renew the controller Lease");
                // Keep leading while the claim made at the last success still stands
                // (less one renewal, so the next holder never overlaps).
                running.is_some() && last_ok.elapsed() + every < lease_for
            }
        };
        match (&running, leading) {
            (None, true) => {
                info!(identity = %elector.settings.identity, "leading: starting the controllers");
                running = Some(tokio::spawn(controllers()));
                on_change(true);
            }
            (Some(_), false) => {
                warn!(identity = %elector.settings.identity, "lost the controller Lease: stopping the controllers");
                if let Some(h) = running.take() {
                    h.abort();
                }
                on_change(false);
            }
            _ => {}
        }
        if running.as_ref().is_some_and(|h| h.is_finished()) {
            // The controllers ended on their own (a signal): so does the election.
            break;
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if let Some(mut h) = running.take() {
        // The controllers stop on the same signal; let them finish their reconciles.
        if tokio::time::timeout(Duration::from_secs(30), &mut h)
            .await
            .is_err()
        {
            warn!("the controllers did not stop within 30 s");
            h.abort();
        }
        if let Err(error) = elector.release().await {
            warn!(%error, "cannot release the controller Lease");
        }
    }
    on_change(false);
}
