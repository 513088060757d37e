//! Autoscaling a pool's workers on its gateways' load (`spec.autoscaling`): reads every
//! gateway replica's admin endpoint (`GET /workers`: inflight, queued, draining per worker)
//! and decides the StatefulSet's replicas — up by one when builds queue or the mean load
//! reaches the target; down by one only after the pool has been idle for the delay, the
//! highest-ordinal worker has been drained on every gateway (`POST /drain?worker=NAME`) and
//! its inflight has reached 0. [`decide`] is the pure decision; [`step`] does the I/O.
//!
//! The admin endpoint is HTTPS with the controller's client certificate (the pool's
//! `<pool>-controller-client-tls`), spoken as the gateway's one-request HTTP/1.1 over
//! tokio-rustls (ring): the gateway's TLS offers only `h2` in ALPN, which HTTP/1.1 clients
//! such as reqwest refuse to pair with, so this client offers no ALPN. Each gateway replica
//! keeps its own drain state, so every gateway pod is asked, by its IP.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{unix_time, Context};
use crate::crd::{AutoscalingSpec, AutoscalingStatus, BuildWorkerPool, WorkerUsage};
use crate::units::parse_duration;
use crate::{render, tls, Error, Result};

/// Default mean builds per worker that adds a worker.
pub const DEFAULT_TARGET_INFLIGHT: i32 = 2;
/// Default idle time before a worker is drained and removed.
pub const DEFAULT_SCALE_DOWN_DELAY: &str = "5m";
/// How often an autoscaled pool is looked at again.
pub const RECHECK: Duration = Duration::from_secs(15);

/// How the autoscaler reaches the gateways' admin endpoints.
#[derive(Clone, Debug, Default)]
pub struct AdminSettings {
    /// Base URLs to use instead of the gateway pods' (tests; a fake admin server).
    pub endpoints_override: Option<Vec<String>>,
    /// Speak plain HTTP instead of HTTPS with the client certificate (tests only).
    pub plain_http: bool,
}

/// What the autoscaler wants this round.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The StatefulSet's replicas.
    pub replicas: i32,
    /// The state to keep in the status.
    pub state: AutoscalingStatus,
    /// A worker to start draining on every gateway.
    pub drain: Option<String>,
    /// A worker to stop draining (the load came back before it was removed).
    pub undrain: Option<String>,
    /// Why, for the log.
    pub reason: String,
}

/// Parses one gateway's `GET /workers` answer
/// (`NAME ADDR healthy=B draining=B inflight=N queued=N limit=L` per line).
pub fn parse_listing(text: &str) -> std::result::Result<Vec<WorkerUsage>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default().to_string();
        let mut w = WorkerUsage {
            name,
            ..WorkerUsage::default()
        };
        for kv in words {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let bad = || format!("worker listing line {line:?}: {k}={v:?} is not a number");
            match k {
                "inflight" => w.inflight = v.parse().map_err(|_| bad())?,
                "queued" => w.queued = v.parse().map_err(|_| bad())?,
                "draining" => w.draining = v == "true",
                _ => {}
            }
        }
        out.push(w);
    }
    Ok(out)
}

/// Sums the listings of several gateway replicas per worker (draining when any drains).
pub fn merge(listings: &[Vec<WorkerUsage>]) -> Vec<WorkerUsage> {
    let mut out: Vec<WorkerUsage> = Vec::new();
    for w in listings.iter().flatten() {
        match out.iter_mut().find(|o| o.name == w.name) {
            Some(o) => {
                o.inflight += w.inflight;
                o.queued += w.queued;
                o.draining |= w.draining;
            }
            None => out.push(w.clone()),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The replicas to start from: what the autoscaler last wanted, else `spec.replicas`,
/// within the bounds.
pub fn current(pool: &BuildWorkerPool, spec: &AutoscalingSpec) -> i32 {
    pool.status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .map(|a| a.desired_replicas)
        .unwrap_or(pool.spec.replicas)
        .clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas))
}

/// The decision for one round, from the current replicas, the merged load and the state
/// kept from the previous round. `worker_name(ordinal)` names a worker pod.
pub fn decide(
    spec: &AutoscalingSpec,
    current: i32,
    load: &[WorkerUsage],
    previous: &AutoscalingStatus,
    now: OffsetDateTime,
    delay: Duration,
    worker_name: impl Fn(i32) -> String,
) -> Plan {
    let target = i64::from(
        spec.target_inflight_per_worker
            .unwrap_or(DEFAULT_TARGET_INFLIGHT)
            .max(1),
    );
    let (min, max) = (spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    let inflight: i64 = load.iter().map(|w| w.inflight).sum();
    let queued: i64 = load.iter().map(|w| w.queued).sum();
    let n = i64::from(current.max(1));
    let mut state = AutoscalingStatus {
        desired_replicas: current,
        ..previous.clone()
    };
    let plan = |replicas: i32, state: AutoscalingStatus, reason: String| Plan {
        replicas,
        state: AutoscalingStatus {
            desired_replicas: replicas,
            ..state
        },
        drain: None,
        undrain: None,
        reason,
    };

    // Busy: grow (and call off a drain in progress).
    if queued > 0 || inflight >= target * n {
        let undrain = state.draining.take();
        state.idle_since = None;
        let replicas = (current + 1).min(max);
        let mut p = plan(
            replicas,
            state,
            format!(
                "{queued} queued, {inflight} running on {current} worker(s) (target {target} each)"
            ),
        );
        p.undrain = undrain;
        return p;
    }
    // Idle enough to lose one worker: nothing running at all, or the load fits in one
    // fewer worker below the target.
    let idle = current > min && (inflight == 0 || target * (n - 1) > inflight);
    if !idle {
        let undrain = state.draining.take();
        state.idle_since = None;
        let mut p = plan(current, state, "load within bounds".into());
        p.undrain = undrain;
        return p;
    }
    let since = state
        .idle_since
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(now.unix_timestamp());
    if state.idle_since.is_none() {
        state.idle_since = unix_time(since);
    }
    let idle_for = now.unix_timestamp().saturating_sub(since).max(0) as u64;
    if idle_for < delay.as_secs() {
        return plan(
            current,
            state,
            format!("idle for {idle_for}s of {}s", delay.as_secs()),
        );
    }
    let victim = worker_name(current - 1);
    match state.draining.clone() {
        Some(d) if d == victim => {
            let seen = load.iter().find(|w| w.name == victim);
            let drained = seen.is_none_or(|w| w.draining && w.inflight == 0 && w.queued == 0);
            if drained {
                state.draining = None;
                state.idle_since = None;
                plan(current - 1, state, format!("{victim} drained: removing it"))
            } else {
                plan(current, state, format!("waiting for {victim} to drain"))
            }
        }
        other => {
            state.draining = Some(victim.clone());
            let mut p = plan(
                current,
                state,
                format!("idle for {idle_for}s: draining {victim}"),
            );
            p.drain = Some(victim);
            p.undrain = other;
            p
        }
    }
}

// === I/O ===

/// One round for `pool`: reads the load from every gateway, decides, drains or undrains,
/// and returns the plan and the merged load.
pub async fn step(
    pool: &BuildWorkerPool,
    spec: &AutoscalingSpec,
    ctx: &Context,
    ns: &str,
    now: OffsetDateTime,
) -> Result<(Plan, Vec<WorkerUsage>)> {
    let name = pool.name_any();
    let delay_spec = spec
        .scale_down_delay
        .clone()
        .unwrap_or_else(|| DEFAULT_SCALE_DOWN_DELAY.to_string());
    let delay = parse_duration(&delay_spec, "spec.autoscaling.scaleDownDelay")?;
    let admin = Admin::new(pool, ctx, ns).await?;
    let mut listings = Vec::new();
    for e in &admin.endpoints {
        let body = admin.call(e, "GET", "/workers").await?;
        listings.push(parse_listing(&body).map_err(|reason| admin_error(e, reason))?);
    }
    let load = merge(&listings);
    let previous = pool
        .status
        .as_ref()
        .and_then(|s| s.autoscaling.clone())
        .unwrap_or_default();
    let sts = render::worker_statefulset_name(&name);
    let plan = decide(
        spec,
        current(pool, spec),
        &load,
        &previous,
        now,
        delay,
        |i| format!("{sts}-{i}"),
    );
    for (verb, worker) in [("undrain", &plan.undrain), ("drain", &plan.drain)] {
        if let Some(w) = worker {
            for e in &admin.endpoints {
                admin
                    .call(e, "POST", &format!("/{verb}?worker={w}"))
                    .await?;
            }
        }
    }
    Ok((plan, load))
}

fn admin_error(endpoint: &str, reason: String) -> Error {
    Error::Admin {
        endpoint: endpoint.to_string(),
        reason,
    }
}

/// The gateways' admin endpoints and how to speak to them.
struct Admin {
    endpoints: Vec<String>,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Admin {
    async fn new(pool: &BuildWorkerPool, ctx: &Context, ns: &str) -> Result<Admin> {
        let name = pool.name_any();
        let endpoints = match &ctx.admin.endpoints_override {
            Some(e) => e.clone(),
            None => {
                let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns);
                let selector = format!(
                    "app.kubernetes.io/name=kiln,app.kubernetes.io/instance={name},app.kubernetes.io/component=gateway"
                );
                let list = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|source| Error::Kube {
                        action: format!("list the gateway pods of pool {ns}/{name}"),
                        source,
                    })?;
                list.items
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                    .map(|ip| {
                        let host = if ip.contains(':') {
                            format!("[{ip}]")
                        } else {
                            ip
                        };
                        format!("https://{host}:{}", render::ADMIN_PORT)
                    })
                    .collect()
            }
        };
        if endpoints.is_empty() {
            return Err(admin_error(
                &format!("pool {ns}/{name}"),
                "no gateway pod has an address yet".into(),
            ));
        }
        if ctx.admin.plain_http {
            return Ok(Admin {
                endpoints,
                tls: None,
            });
        }
        let secret_name = render::controller_identity_secret(pool);
        let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get_opt(&secret_name)
            .await
            .map_err(|source| Error::Kube {
                action: format!("get Secret {ns}/{secret_name}"),
                source,
            })?
            .ok_or_else(|| {
                admin_error(
                    &format!("pool {ns}/{name}"),
                    format!("client certificate Secret {ns}/{secret_name} not found"),
                )
            })?;
        let pems = tls::identity_pems(&secret).map_err(|k| {
            admin_error(
                &format!("pool {ns}/{name}"),
                format!("Secret {ns}/{secret_name} has no {k}"),
            )
        })?;
        let config = client_config(&pems.ca, &pems.cert, &pems.key)
            .map_err(|reason| admin_error(&format!("Secret {ns}/{secret_name}"), reason))?;
        let server = format!("{}.{ns}.svc", render::gateway_name(&name));
        let server_name = rustls::pki_types::ServerName::try_from(server.clone())
            .map_err(|e| admin_error(&server, format!("not a TLS server name: {e}")))?;
        Ok(Admin {
            endpoints,
            tls: Some((
                tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name,
            )),
        })
    }

    /// One request; the body of a 200 answer, else an error naming the endpoint.
    async fn call(&self, endpoint: &str, method: &str, path: &str) -> Result<String> {
        let fail = |reason: String| admin_error(endpoint, reason);
        let hostport = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
            .unwrap_or(endpoint)
            .trim_end_matches('/');
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(hostport)
                .await
                .map_err(|e| fail(format!("cannot connect: {e}")))?;
            let mut raw = Vec::new();
            match &self.tls {
                Some((connector, name)) => {
                    let mut s = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| fail(format!("TLS handshake: {e}")))?;
                    s.write_all(request.as_bytes())
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    let _ = s.read_to_end(&mut raw).await;
                }
                None => {
                    let mut s = tcp;
                    s.write_all(request.as_bytes())
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    let _ = s.read_to_end(&mut raw).await;
                }
            }
            Ok::<_, Error>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| fail(format!("{method} {path}: no answer within 10 s")))??;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail(format!("{method} {path}: no HTTP answer")))?;
        let code = head.split_whitespace().nth(1).unwrap_or_default();
        if code != "200" {
            return Err(fail(format!("{method} {path}: {code}: {}", body.trim())));
        }
        Ok(body.to_string())
    }
}

/// A rustls client configuration (ring) trusting `ca` and presenting `cert`/`key`.
fn client_config(
    ca: &str,
    cert: &str,
    key: &str,
) -> std::result::Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let c = c.map_err(|e| format!("ca.crt: {e}"))?;
        roots.add(c).map_err(|e| format!("ca.crt: {e}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("tls.key: {e}"))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AutoscalingSpec {
        AutoscalingSpec {
            min_replicas: 1,
            max_replicas: 4,
            target_inflight_per_worker: Some(2),
            scale_down_delay: Some("60s".into()),
        }
    }

    fn w(name: &str, inflight: i64, queued: i64, draining: bool) -> WorkerUsage {
        WorkerUsage {
            name: name.into(),
            inflight,
            queued,
            draining,
            used_bytes: None,
        }
    }

    fn at(s: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_800_000_000 + s)
    }

    fn name(i: i32) -> String {
        format!("p-worker-{i}")
    }

    #[test]
    fn listings_parse_and_merge_across_gateways() {
        let a = parse_listing(
            "p-worker-0 tcp://a:1 healthy=true draining=false inflight=2 queued=1 limit=4\n",
        )
        .unwrap();
        let b = parse_listing("p-worker-0 tcp://a:1 healthy=true draining=true inflight=1 queued=0 limit=4\np-worker-1 tcp://b:1 healthy=true draining=false inflight=0 queued=0 limit=unlimited\n").unwrap();
        let m = merge(&[a, b]);
        assert_eq!(
            m,
            [w("p-worker-0", 3, 1, true), w("p-worker-1", 0, 0, false)]
        );
        assert!(parse_listing("x inflight=lots")
            .unwrap_err()
            .contains("inflight"));
    }

    #[test]
    fn queued_builds_or_a_busy_pool_add_a_worker_up_to_max() {
        let s = spec();
        let st = AutoscalingStatus::default();
        let d = Duration::from_secs(60);
        let p = decide(&s, 2, &[w("p-worker-0", 0, 1, false)], &st, at(0), d, name);
        assert_eq!(p.replicas, 3);
        let busy = [w("p-worker-0", 2, 0, false), w("p-worker-1", 2, 0, false)];
        assert_eq!(decide(&s, 2, &busy, &st, at(0), d, name).replicas, 3);
        assert_eq!(decide(&s, 4, &busy, &st, at(0), d, name).replicas, 4);
        let calm = [w("p-worker-0", 2, 0, false), w("p-worker-1", 1, 0, false)];
        assert_eq!(decide(&s, 2, &calm, &st, at(0), d, name).replicas, 2);
    }

    #[test]
    fn an_idle_pool_drains_its_last_worker_before_it_shrinks() {
        let s = spec();
        let d = Duration::from_secs(60);
        let idle = [w("p-worker-0", 0, 0, false), w("p-worker-1", 0, 0, false)];
        // Idle starts: nothing yet.
        let p1 = decide(&s, 2, &idle, &AutoscalingStatus::default(), at(0), d, name);
        assert_eq!((p1.replicas, p1.drain.clone()), (2, None));
        assert!(p1.state.idle_since.is_some());
        // Not for long enough.
        let p2 = decide(&s, 2, &idle, &p1.state, at(30), d, name);
        assert_eq!((p2.replicas, p2.drain.clone()), (2, None));
        // The delay passed: drain the highest ordinal, keep the replicas.
        let p3 = decide(&s, 2, &idle, &p2.state, at(61), d, name);
        assert_eq!(p3.replicas, 2);
        assert_eq!(p3.drain.as_deref(), Some("p-worker-1"));
        assert_eq!(p3.state.draining.as_deref(), Some("p-worker-1"));
        // Draining, a build still running on it: wait.
        let busy1 = [w("p-worker-0", 0, 0, false), w("p-worker-1", 1, 0, true)];
        let p4 = decide(&s, 2, &busy1, &p3.state, at(70), d, name);
        assert_eq!((p4.replicas, p4.drain.clone()), (2, None));
        // Drained: shrink by one.
        let drained = [w("p-worker-0", 0, 0, false), w("p-worker-1", 0, 0, true)];
        let p5 = decide(&s, 2, &drained, &p4.state, at(80), d, name);
        assert_eq!(p5.replicas, 1);
        assert_eq!(p5.state.draining, None);
        // Never below min.
        let one = [w("p-worker-0", 0, 0, false)];
        let p6 = decide(&s, 1, &one, &p5.state, at(1000), d, name);
        assert_eq!((p6.replicas, p6.drain), (1, None));
    }

    #[test]
    fn load_coming_back_calls_off_the_drain() {
        let s = spec();
        let d = Duration::from_secs(60);
        let st = AutoscalingStatus {
            desired_replicas: 2,
            idle_since: unix_time(at(0).unix_timestamp()),
            draining: Some("p-worker-1".into()),
        };
        let queued = [w("p-worker-0", 2, 3, false), w("p-worker-1", 0, 0, true)];
        let p = decide(&s, 2, &queued, &st, at(100), d, name);
        assert_eq!(p.replicas, 3);
        assert_eq!(p.undrain.as_deref(), Some("p-worker-1"));
        assert_eq!(p.state.draining, None);
        assert_eq!(p.state.idle_since, None);
    }
}
