//! The `BuildWorkerPool` reconciler: issues or checks TLS Secrets, server-side applies every
//! rendered object (field manager `kiln-controller`), and writes the pool's status (ready
//! workers and gateways, certificate expiry, `Ready`/`Progressing`/`Degraded`).
//!
//! Idempotent: a second run with nothing changed re-sends the same apply bodies (which the API
//! server treats as no-ops), issues no certificate and writes no status.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::OffsetDateTime;
use tracing::{info, warn, Instrument};

use super::{autoscale, condition, unix_time, usage, Context};
use crate::crd::{
    BuildWorkerPool, BuildWorkerPoolStatus, TlsMode, CONDITION_DEGRADED, CONDITION_PROGRESSING,
    CONDITION_READY,
};
use crate::render::{self, FIELD_MANAGER};
use crate::tls::{self, LeafAction, RotateReason, Usage};
use crate::units::parse_duration;
use crate::{Error, Result};

/// Longest wait between two reconciles of a healthy pool.
const MAX_REQUEUE: Duration = Duration::from_secs(3600);
/// Shortest wait, so a certificate about to expire does not spin the loop.
const MIN_REQUEUE: Duration = Duration::from_secs(30);

/// Reconciles one pool; the `Controller` calls this on every change of the pool or what it owns.
pub async fn reconcile(pool: Arc<BuildWorkerPool>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!(
        "reconcile",
        pool = %pool.name_any(),
        namespace = %pool.namespace().unwrap_or_default()
    );
    let started = std::time::Instant::now();
    let res = reconcile_pool(&pool, &ctx).instrument(span).await;
    if let Some(m) = crate::metrics::global() {
        m.reconciled("BuildWorkerPool", res.is_ok(), started.elapsed());
    }
    res
}

/// Logs a failed reconcile and retries later.
pub fn error_policy(pool: Arc<BuildWorkerPool>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(%error, pool = %pool.name_any(), "pool reconcile failed");
    super::retry_after_error()
}

async fn reconcile_pool(pool: &BuildWorkerPool, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let ns = pool.namespace().ok_or_else(|| Error::InvalidSpec {
        object: name.clone(),
        field: "metadata.namespace".into(),
        reason: "missing".into(),
    })?;
    let now = (ctx.clock)();
    let rendered = match render::render(pool) {
        Ok(r) => r,
        Err(e) => {
            // A spec the schema let through but the controller cannot use: say so in the
            // status and wait for the user to change it (the watch requeues on change).
            warn!(error = %e, "invalid pool spec");
            let status = status_for(pool, None, None, &Tls::problem(e.to_string()), now);
            write_status(pool, ctx, &ns, status).await?;
            return Ok(Action::await_change());
        }
    };

    let tls = ensure_tls(pool, ctx, &ns, now).await?;

    // Autoscaling: the replicas come from the gateways' load rather than the spec.
    let mut scaled = None;
    let mut effective = pool.clone();
    if let Some(spec) = &pool.spec.autoscaling {
        let (plan, load) = match autoscale::step(pool, spec, ctx, &ns, now).await {
            Ok(x) => x,
            Err(error) => {
                // Keep the replicas; scaling waits for the gateways.
                warn!(%error, "autoscaling: cannot read the gateways' load");
                let keep = autoscale::current(pool, spec);
                let state = pool
                    .status
                    .as_ref()
                    .and_then(|s| s.autoscaling.clone())
                    .unwrap_or_default();
                let plan = autoscale::Plan {
                    replicas: keep,
                    state: crate::crd::AutoscalingStatus {
                        desired_replicas: keep,
                        ..state
                    },
                    drain: None,
                    undrain: None,
                    reason: error.to_string(),
                };
                let load = pool
                    .status
                    .as_ref()
                    .map(|s| s.workers.clone())
                    .unwrap_or_default();
                (plan, load)
            }
        };
        if plan.replicas != autoscale::current(pool, spec) || plan.drain.is_some() {
            info!(replicas = plan.replicas, drain = ?plan.drain, reason = %plan.reason, "autoscaling");
        }
        effective.spec.replicas = plan.replicas;
        scaled = Some((plan.state, load));
    }
    let rendered = if scaled.is_some() {
        render::render(&effective)?
    } else {
        rendered
    };

    let client = ctx.client.clone();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns),
        &rendered.config_map,
        &pp,
    )
    .await?;
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        &rendered.gateway_service_account,
        &pp,
    )
    .await?;
    apply(
        &Api::<Role>::namespaced(client.clone(), &ns),
        &rendered.gateway_role,
        &pp,
    )
    .await?;
    apply(
        &Api::<RoleBinding>::namespaced(client.clone(), &ns),
        &rendered.gateway_role_binding,
        &pp,
    )
    .await?;
    let svcs = Api::<Service>::namespaced(client.clone(), &ns);
    apply(&svcs, &rendered.workers_service, &pp).await?;
    apply(&svcs, &rendered.gateway_service, &pp).await?;
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        &rendered.pdb,
        &pp,
    )
    .await?;
    let sts = apply(
        &Api::<StatefulSet>::namespaced(client.clone(), &ns),
        &rendered.stateful_set,
        &pp,
    )
    .await?;
    let dep = apply(
        &Api::<Deployment>::namespaced(client, &ns),
        &rendered.gateway_deployment,
        &pp,
    )
    .await?;

    let mut status = status_for(&effective, Some(&sts), Some(&dep), &tls, now);
    let mut next = tls.next_check(now);
    let previous_workers = pool
        .status
        .as_ref()
        .map(|s| s.workers.clone())
        .unwrap_or_default();
    if let Some((state, load)) = scaled {
        status.autoscaling = Some(state);
        status.workers = load;
        next = next.min(autoscale::RECHECK);
    }
    match usage_target(pool, ctx, &ns).await {
        Ok(target) => match ctx.usage.read(target).await {
            Ok(bytes) => usage::merge_usage(&mut status.workers, &bytes),
            Err(reason) => {
                warn!(%reason, "cannot read the workers' cache usage");
                keep_usage(&mut status.workers, &previous_workers);
            }
        },
        Err(reason) => {
            warn!(%reason, "cannot read the workers' cache usage");
            keep_usage(&mut status.workers, &previous_workers);
        }
    }
    write_status(pool, ctx, &ns, status).await?;
    Ok(Action::requeue(next))
}

/// Keeps the last figures read for workers whose usage could not be read this time.
fn keep_usage(workers: &mut Vec<crate::crd::WorkerUsage>, previous: &[crate::crd::WorkerUsage]) {
    let bytes = previous
        .iter()
        .filter_map(|w| Some((w.name.clone(), w.used_bytes?)))
        .collect();
    usage::merge_usage(workers, &bytes);
}

/// The pool's gateway and the controller's client identity for it.
async fn usage_target(
    pool: &BuildWorkerPool,
    ctx: &Context,
    ns: &str,
) -> std::result::Result<usage::GatewayTarget, String> {
    let name = pool.name_any();
    let secret_name = render::controller_identity_secret(pool);
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&secret_name)
        .await
        .map_err(|e| format!("get Secret {ns}/{secret_name}: {e}"))?
        .ok_or_else(|| format!("Secret {ns}/{secret_name} not found"))?;
    let pems =
        tls::identity_pems(&secret).map_err(|k| format!("Secret {ns}/{secret_name} has no {k}"))?;
    let host = format!("{}.{ns}.svc", render::gateway_name(&name));
    Ok(usage::GatewayTarget {
        addr: format!("tcp://{host}:{}", pool.spec.gateway.port),
        server_name: host,
        ca_pem: pems.ca,
        cert_pem: pems.cert,
        key_pem: pems.key,
    })
}

/// Server-side applies `obj` and returns what the API server now holds.
async fn apply<K>(api: &Api<K>, obj: &K, pp: &PatchParams) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, pp, &Patch::Apply(obj))
        .await
        .map_err(|source| Error::Kube {
            action: format!(
                "apply {} {}/{}",
                K::kind(&()),
                obj.meta().namespace.as_deref().unwrap_or_default(),
                name
            ),
            source,
        })
}

async fn get_secret(api: &Api<Secret>, name: &str) -> Result<Option<Secret>> {
    api.get_opt(name).await.map_err(|source| Error::Kube {
        action: format!("get Secret {name}"),
        source,
    })
}

// === TLS ===

/// What the TLS step found: the server certificate's expiry, and any problem.
#[derive(Debug, Default)]
struct Tls {
    not_after: Option<i64>,
    /// When certificates still signed by the previous CA are to be reissued.
    rollover_at: Option<i64>,
    renew_before: Duration,
    problem: Option<String>,
}

impl Tls {
    fn problem(p: String) -> Tls {
        Tls {
            problem: Some(p),
            ..Tls::default()
        }
    }

    /// Come back when the certificate enters its renewal window or a CA rollover switches
    /// over (within bounds).
    fn next_check(&self, now: OffsetDateTime) -> Duration {
        let renew_at = self
            .not_after
            .map(|t| t.saturating_sub(self.renew_before.as_secs() as i64));
        let Some(at) = [renew_at, self.rollover_at].into_iter().flatten().min() else {
            return MAX_REQUEUE;
        };
        let wait = at.saturating_sub(now.unix_timestamp()).max(0) as u64;
        Duration::from_secs(wait).clamp(MIN_REQUEUE, MAX_REQUEUE)
    }
}

/// Makes sure every TLS Secret the pool needs exists and is current: in `selfSigned` mode
/// issues the CA and the certificates, reissuing those `tls::rotation` says must go; in
/// `existingSecret` mode only reads the given Secret.
async fn ensure_tls(
    pool: &BuildWorkerPool,
    ctx: &Context,
    ns: &str,
    now: OffsetDateTime,
) -> Result<Tls> {
    let spec = &pool.spec.tls;
    let lifetime = parse_duration(&spec.lifetime, "spec.tls.lifetime")?;
    let renew_before = parse_duration(&spec.renew_before, "spec.tls.renewBefore")?;
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let name = pool.name_any();

    if spec.mode == TlsMode::ExistingSecret {
        let secret_name = spec.secret_name.clone().unwrap_or_default();
        let mut out = Tls {
            renew_before,
            ..Tls::default()
        };
        match get_secret(&secrets, &secret_name).await? {
            None => out.problem = Some(format!("TLS secret {ns}/{secret_name} not found")),
            Some(s) => {
                match tls::secret_text(&s, tls::CERT_KEY).map(|c| tls::inspect(c, "tls.crt")) {
                    Some(Ok(info)) => {
                        out.not_after = Some(info.not_after);
                        if let Some(r) = tls::rotation_by_time(&info, now, renew_before) {
                            out.problem = Some(format!(
                                "certificate in secret {ns}/{secret_name} {r}; replace it"
                            ));
                        }
                    }
                    Some(Err(e)) => out.problem = Some(format!("secret {ns}/{secret_name}: {e}")),
                    None => out.problem = Some(format!("secret {ns}/{secret_name} has no tls.crt")),
                }
            }
        }
        return Ok(out);
    }

    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let ca_name = render::ca_secret_name(&name);
    let current_ca = get_secret(&secrets, &ca_name).await?;
    let old_ca = current_ca.as_ref().and_then(tls::ca_from_secret);
    let still_valid = |pem: &str| {
        tls::inspect(pem, "ca.crt")
            .map(|info| info.is_ca && now.unix_timestamp() < info.not_after)
            .unwrap_or(false)
    };
    let usable_ca = old_ca.clone().filter(|ca| {
        tls::inspect(&ca.cert_pem, "ca.crt")
            .map(|info| info.is_ca && tls::rotation_by_time(&info, now, renew_before).is_none())
            .unwrap_or(false)
    });
    let (ca, previous) = match usable_ca {
        Some(ca) => {
            let previous = current_ca
                .as_ref()
                .and_then(|s| tls::secret_text(s, tls::PREVIOUS_CA_KEY))
                .filter(|p| still_valid(p))
                .map(str::to_string);
            (ca, previous)
        }
        None => {
            // The outgoing CA stays trusted (in every ca.crt) until it expires.
            let previous = old_ca.map(|c| c.cert_pem).filter(|p| still_valid(p));
            info!(secret = %ca_name, rollover = previous.is_some(), "issuing CA");
            let ca = tls::issue_ca(&name, now, lifetime)?;
            let meta = render::owned_meta(pool, ca_name, "tls")?;
            apply(
                &secrets,
                &tls::ca_secret(meta, &ca, previous.as_deref()),
                &pp,
            )
            .await?;
            (ca, previous)
        }
    };
    let ca_since = tls::inspect(&ca.cert_pem, "ca.crt")?.not_before;
    let switch_at = ca_since + (tls::BACKDATE + tls::CA_SWITCH_GRACE).as_secs() as i64;
    let trust = tls::Trust {
        ca: &ca,
        previous: previous.as_deref(),
        switch_over: now.unix_timestamp() >= switch_at,
    };
    let bundle = trust.bundle();

    // An autoscaled pool's certificate names every worker it may grow to.
    let most = pool
        .spec
        .autoscaling
        .as_ref()
        .map_or(pool.spec.replicas, |a| {
            a.max_replicas.max(pool.spec.replicas)
        });
    let server_names = tls::server_names(&name, ns, most);
    let leaves: [(String, String, Option<&[String]>, Usage); 4] = [
        (
            render::server_secret_name(&name),
            render::gateway_name(&name),
            Some(&server_names),
            Usage::Server,
        ),
        (
            render::gateway_client_secret_name(&name),
            "kiln-gateway".into(),
            None,
            Usage::Client,
        ),
        (
            render::controller_client_secret_name(&name),
            "kiln-controller".into(),
            None,
            Usage::Client,
        ),
        (
            render::user_client_secret_name(&name),
            "kiln-user".into(),
            None,
            Usage::Client,
        ),
    ];
    let mut out = Tls {
        renew_before,
        rollover_at: (trust.previous.is_some() && !trust.switch_over).then_some(switch_at),
        ..Tls::default()
    };
    let user_secret = render::user_client_secret_name(&name);
    for (secret_name, cn, names, usage) in leaves {
        let tlsdir = secret_name == user_secret;
        let current = get_secret(&secrets, &secret_name).await?;
        let current_cert = current
            .as_ref()
            .and_then(|s| tls::secret_text(s, tls::CERT_KEY))
            .unwrap_or_default()
            .to_string();
        let cert = match tls::leaf_action(current.as_ref(), &trust, names, now, renew_before) {
            LeafAction::Keep => current_cert,
            LeafAction::UpdateTrust => {
                info!(secret = %secret_name, "adding the new CA to ca.crt");
                let kept = tls::Issued {
                    ca_pem: bundle.clone(),
                    cert_pem: current_cert.clone(),
                    key_pem: current
                        .as_ref()
                        .and_then(|s| tls::secret_text(s, tls::KEY_KEY))
                        .unwrap_or_default()
                        .to_string(),
                };
                let meta = render::owned_meta(pool, secret_name, "tls")?;
                apply(&secrets, &leaf_secret(meta, &kept, tlsdir), &pp).await?;
                current_cert
            }
            LeafAction::Reissue(reason) => {
                log_rotation(&secret_name, &reason);
                let mut issued =
                    tls::issue(&ca, &cn, names.unwrap_or_default(), usage, now, lifetime)?;
                issued.ca_pem = bundle.clone();
                let meta = render::owned_meta(pool, secret_name, "tls")?;
                apply(&secrets, &leaf_secret(meta, &issued, tlsdir), &pp).await?;
                issued.cert_pem
            }
        };
        if usage == Usage::Server {
            out.not_after = Some(tls::inspect(&cert, "tls.crt")?.not_after);
        }
    }
    Ok(out)
}

/// A leaf certificate's Secret; the users' one also carries buildctl's `--tlsdir` names.
fn leaf_secret(
    meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    issued: &tls::Issued,
    tlsdir: bool,
) -> Secret {
    let secret = tls::tls_secret(meta, issued);
    if tlsdir {
        tls::with_tlsdir_names(secret)
    } else {
        secret
    }
}

fn log_rotation(secret: &str, reason: &RotateReason) {
    match reason {
        RotateReason::Missing => info!(%secret, "issuing certificate"),
        _ => info!(%secret, %reason, "rotating certificate"),
    }
}

// === status ===

fn status_for(
    pool: &BuildWorkerPool,
    sts: Option<&StatefulSet>,
    dep: Option<&Deployment>,
    tls: &Tls,
    now: OffsetDateTime,
) -> BuildWorkerPoolStatus {
    let sts_status = sts.and_then(|s| s.status.as_ref());
    let replicas = sts_status.map(|s| s.replicas).unwrap_or(0);
    let ready = sts_status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let gw_ready = dep
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let want = pool.spec.replicas;
    let want_gw = pool.spec.gateway.replicas;
    let all_ready = tls.problem.is_none()
        && sts.is_some()
        && ready == want
        && replicas == want
        && gw_ready == want_gw;
    let counts = format!("{ready}/{want} workers and {gw_ready}/{want_gw} gateways ready");
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = pool.metadata.generation;
    let cond = |type_: &str, on: bool, reason: &str, message: String| {
        condition(previous, type_, on, reason, message, generation, now)
    };
    let conditions = vec![
        cond(
            CONDITION_READY,
            all_ready,
            if all_ready { "AllReady" } else { "NotReady" },
            counts.clone(),
        ),
        cond(
            CONDITION_PROGRESSING,
            !all_ready && tls.problem.is_none(),
            if all_ready || tls.problem.is_some() {
                "Idle"
            } else {
                "RollingOut"
            },
            counts,
        ),
        match &tls.problem {
            Some(p) => cond(CONDITION_DEGRADED, true, "ConfigurationError", p.clone()),
            None => cond(
                CONDITION_DEGRADED,
                false,
                "AsExpected",
                "no problems found".into(),
            ),
        },
    ];
    BuildWorkerPoolStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        gateway_ready_replicas: gw_ready,
        certificate_not_after: tls.not_after.and_then(unix_time),
        conditions,
        autoscaling: None,
        workers: Vec::new(),
    }
}

/// Writes the status with server-side apply, unless it is already what the pool shows.
async fn write_status(
    pool: &BuildWorkerPool,
    ctx: &Context,
    ns: &str,
    status: BuildWorkerPoolStatus,
) -> Result<()> {
    if pool.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let name = pool.name_any();
    let api = Api::<BuildWorkerPool>::namespaced(ctx.client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": BuildWorkerPool::api_version(&()),
        "kind": BuildWorkerPool::kind(&()),
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&name, &pp, &Patch::Apply(&body))
        .await
        .map_err(|source| Error::Kube {
            action: format!("apply status of BuildWorkerPool {ns}/{name}"),
            source,
        })?;
    Ok(())
}
