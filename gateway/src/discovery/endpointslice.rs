//! Workers from the Kubernetes API: a kube-rs watcher on the `discovery.k8s.io/v1`
//! EndpointSlices labelled `kubernetes.io/service-name=SERVICE` in one namespace
//! (`--workers-endpointslice NAMESPACE/SERVICE`), applied to the pool as whole member sets
//! the way DNS discovery does (a watch restart is a reset: the next full list replaces
//! the set).
//!
//! An endpoint becomes a member named by its `targetRef.name` (the StatefulSet pod), else
//! its hostname, else its address, at `tcp://ADDRESS:PORT` with the slice's port named
//! `grpc` (or its only port). Endpoints with `conditions.ready=false` are not routed to;
//! `conditions.terminating=true` ones stay members but drained (no new builds, running
//! builds go on) until they leave the slice.
//!
//! Uses [`crate::health::Pool`]; nothing else in the crate talks to Kubernetes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;

use crate::health::{Member, Pool};
use crate::{Error, Result};

/// The label Kubernetes puts on a Service's EndpointSlices.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// The name of the workers' gRPC port in their Service.
pub const PORT_NAME: &str = "grpc";

/// `NAMESPACE/SERVICE` as given to `--workers-endpointslice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The Service's namespace.
    pub namespace: String,
    /// The (headless) Service of the workers.
    pub service: String,
}

impl std::str::FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Target> {
        let err = |reason: &str| Error::EndpointSlice {
            target: s.to_string(),
            reason: reason.to_string(),
        };
        let (ns, svc) = s
            .split_once('/')
            .ok_or_else(|| err("expected NAMESPACE/SERVICE"))?;
        let dns_label = |v: &str| {
            !v.is_empty()
                && v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-')
        };
        if !dns_label(ns) || !dns_label(svc) {
            return Err(err(
                "expected NAMESPACE/SERVICE, each a DNS label (lowercase letters, digits, '-')",
            ));
        }
        Ok(Target {
            namespace: ns.to_string(),
            service: svc.to_string(),
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)
    }
}

/// What a set of EndpointSlices says about the workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Every routable or draining worker, sorted by name.
    pub members: Vec<Member>,
    /// The names among `members` whose pods are terminating.
    pub terminating: BTreeSet<String>,
}

/// The port of `slice` that workers serve gRPC on: the one named [`PORT_NAME`], else the
/// only one.
fn grpc_port(slice: &EndpointSlice) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(PORT_NAME))
        .or_else(|| (ports.len() == 1).then(|| &ports[0]))?;
    port.port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// The member for `ep` (with its terminating mark), or `None` when it must not be routed
/// to or has no address.
fn endpoint_member(ep: &Endpoint, port: u16, ipv6: bool) -> Option<(Member, bool)> {
    let cond = ep.conditions.clone().unwrap_or_default();
    // Kubernetes: a nil `ready` is unknown and should be taken as ready.
    let terminating = cond.terminating == Some(true);
    if !terminating && cond.ready == Some(false) {
        return None;
    }
    let address = ep.addresses.first().filter(|a| !a.is_empty())?;
    let host = if ipv6 {
        format!("[{address}]")
    } else {
        address.clone()
    };
    let name = ep
        .target_ref
        .as_ref()
        .and_then(|r| r.name.clone())
        .or_else(|| ep.hostname.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{host}:{port}"));
    Some((
        Member {
            name,
            addr: format!("tcp://{host}:{port}"),
        },
        terminating,
    ))
}

/// The membership described by `slices`. A worker listed twice (in two slices, e.g.
/// dual-stack) counts once, preferring an entry that is not terminating.
pub fn membership<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Membership {
    let mut by_name: BTreeMap<String, (Member, bool)> = BTreeMap::new();
    for slice in slices {
        let Some(port) = grpc_port(slice) else {
            tracing::warn!(
                slice = slice.metadata.name.as_deref().unwrap_or_default(),
                "endpoint slice has no port named {PORT_NAME:?} and not exactly one port; ignored"
            );
            continue;
        };
        let ipv6 = slice.address_type == "IPv6";
        for ep in &slice.endpoints {
            let Some((m, term)) = endpoint_member(ep, port, ipv6) else {
                continue;
            };
            match by_name.get(&m.name) {
                Some((_, false)) => {}
                Some((_, true)) if term => {}
                _ => {
                    by_name.insert(m.name.clone(), (m, term));
                }
            }
        }
    }
    let terminating = by_name
        .iter()
        .filter(|(_, (_, t))| *t)
        .map(|(n, _)| n.clone())
        .collect();
    Membership {
        members: by_name.into_values().map(|(m, _)| m).collect(),
        terminating,
    }
}

/// The slices as the watch has seen them, keyed by name; a watch restart is buffered and
/// swapped in whole when its list is complete.
#[derive(Debug, Default)]
struct Slices {
    current: BTreeMap<String, EndpointSlice>,
    init: Option<BTreeMap<String, EndpointSlice>>,
}

impl Slices {
    /// Applies one watcher event; `true` when the current set changed.
    fn apply(&mut self, event: watcher::Event<EndpointSlice>) -> bool {
        let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => {
                self.init = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(s) => {
                self.init.get_or_insert_default().insert(key(&s), s);
                false
            }
            watcher::Event::InitDone => {
                self.current = self.init.take().unwrap_or_default();
                true
            }
            watcher::Event::Apply(s) => {
                self.current.insert(key(&s), s);
                true
            }
            watcher::Event::Delete(s) => {
                self.current.remove(&key(&s));
                true
            }
        }
    }
}

/// Watches the EndpointSlices of `target` with `client` and keeps `pool`'s members in
/// step, forever. Watch failures are logged and retried with backoff; the pool keeps its
/// last members meanwhile.
pub async fn run(pool: Pool, client: kube::Client, target: Target) {
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, &target.namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_LABEL}={}", target.service));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut slices = Slices::default();
    let mut last: Option<Membership> = None;
    let mut failing = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => {
                if failing {
                    tracing::info!(%target, "endpoint slice watch recovered");
                    failing = false;
                }
                e
            }
            Err(e) => {
                // Logged once per outage: the backoff retries quickly at first.
                if !failing {
                    tracing::warn!(%target, error = %e, "endpoint slice watch failed; retrying, keeping the last members");
                    failing = true;
                }
                continue;
            }
        };
        if !slices.apply(event) {
            continue;
        }
        let now = membership(slices.current.values());
        if last.as_ref() == Some(&now) {
            continue;
        }
        if now.members.is_empty() {
            tracing::warn!(%target, "no ready worker in the endpoint slices");
        }
        match pool.set_members_terminating(&now.members, &now.terminating) {
            Ok(()) => {
                tracing::debug!(%target, members = now.members.len(), terminating = now.terminating.len(), "applied endpoint slices");
                last = Some(now);
            }
            Err(e) => tracing::warn!(%target, error = %e, "applying endpoint slice members"),
        }
    }
    tracing::error!(%target, "endpoint slice watch ended");
}

/// How long [`wait_for_members`] polls.
const FIRST_SET_WAIT: Duration = Duration::from_secs(30);

/// Waits until `pool` has a member (the first list applied), up to 30 s; `false` if none
/// came, so start-up can say so and go on (the watch keeps running).
pub async fn wait_for_members(pool: &Pool) -> bool {
    let deadline = tokio::time::Instant::now() + FIRST_SET_WAIT;
    while tokio::time::Instant::now() < deadline {
        if !pool.workers().is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};

    fn ep(addr: &str, pod: Option<&str>, ready: Option<bool>, term: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![addr.to_string()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating: term,
            }),
            target_ref: pod.map(|p| ObjectReference {
                kind: Some("Pod".into()),
                name: Some(p.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(name: &str, ports: &[(&str, i32)], eps: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn targets() {
        let t: Target = "builds/kiln-workers".parse().expect("parse");
        assert_eq!(
            (t.namespace.as_str(), t.service.as_str()),
            ("builds", "kiln-workers")
        );
        for bad in ["", "svc", "/svc", "ns/", "NS/svc", "ns/svc/x", "ns/-svc"] {
            let e = bad.parse::<Target>().expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn conditions_ports_and_names() {
        let a = slice(
            "a",
            &[("metrics", 9090), ("grpc", 1234)],
            vec![
                ep("10.0.0.1", Some("w-0"), Some(true), Some(false)),
                ep("10.0.0.2", Some("w-1"), Some(false), Some(false)),
                ep("10.0.0.3", Some("w-2"), Some(false), Some(true)),
                ep("10.0.0.4", None, None, None),
            ],
        );
        let mut host = ep("10.0.0.5", None, Some(true), None);
        host.hostname = Some("w-4".into());
        let b = slice("b", &[("whatever", 7)], vec![host]);
        let none = slice(
            "c",
            &[("x", 1), ("y", 2)],
            vec![ep("10.0.0.6", Some("w-9"), None, None)],
        );
        let m = membership([&a, &b, &none]);
        let got: Vec<(&str, &str)> = m
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.addr.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.4:1234", "tcp://10.0.0.4:1234"),
                ("w-0", "tcp://10.0.0.1:1234"),
                ("w-2", "tcp://10.0.0.3:1234"),
                ("w-4", "tcp://10.0.0.5:7"),
            ]
        );
        assert_eq!(m.terminating, BTreeSet::from(["w-2".to_string()]));
    }

    #[test]
    fn ipv6_and_duplicates_prefer_the_live_entry() {
        let mut v6 = slice(
            "v6",
            &[("grpc", 1234)],
            vec![ep("fd00::1", Some("w-0"), Some(false), Some(true))],
        );
        v6.address_type = "IPv6".into();
        let v4 = slice(
            "v4",
            &[("grpc", 1234)],
            vec![ep("10.0.0.1", Some("w-0"), Some(true), None)],
        );
        let m = membership([&v6, &v4]);
        assert_eq!(m.members.len(), 1);
        assert_eq!(m.members[0].addr, "tcp://10.0.0.1:1234");
        assert!(m.terminating.is_empty());
        let m = membership([&v6]);
        assert_eq!(m.members[0].addr, "tcp://[fd00::1]:1234");
        assert!(m.terminating.contains("w-0"));
    }

    #[test]
    fn a_watch_restart_replaces_the_set_when_its_list_is_complete() {
        let mut s = Slices::default();
        assert!(s.apply(watcher::Event::Apply(slice("a", &[("grpc", 1)], vec![]))));
        assert!(!s.apply(watcher::Event::Init));
        assert!(!s.apply(watcher::Event::InitApply(slice(
            "b",
            &[("grpc", 1)],
            vec![]
        ))));
        assert_eq!(
            s.current.keys().collect::<Vec<_>>(),
            ["a"],
            "swapped before InitDone"
        );
        assert!(s.apply(watcher::Event::InitDone));
        assert_eq!(s.current.keys().collect::<Vec<_>>(), ["b"]);
        assert!(s.apply(watcher::Event::Delete(slice("b", &[], vec![]))));
        assert!(s.current.is_empty());
    }
}
