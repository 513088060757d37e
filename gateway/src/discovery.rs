//! Where the workers are: a static list (`--workers [NAME=]tcp://HOST:PORT,...`) or the
//! addresses behind a DNS name (`--workers-dns NAME:PORT`, the headless Service of a
//! StatefulSet), re-resolved periodically. Produces member sets for [`crate::health::Pool`];
//! a worker that disappears from discovery leaves the ring (draining: its running builds
//! go on). [`endpointslice`] watches the Kubernetes API instead
//! (`--workers-endpointslice NAMESPACE/SERVICE`).

pub mod endpointslice;

use std::time::Duration;

use crate::health::{Member, Pool};
use crate::{Error, Result};

/// Parses `--workers`: comma-separated `tcp://HOST:PORT` or `NAME=tcp://HOST:PORT`. The
/// name (default: the address) is what the ring hashes, so a stable name keeps a worker's
/// keys when its address changes.
pub fn parse_static(list: &str) -> Result<Vec<Member>> {
    let mut out: Vec<Member> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, addr) = match item.split_once('=') {
            Some((n, a)) => (n.trim().to_string(), a.trim().to_string()),
            None => (item.to_string(), item.to_string()),
        };
        let hostport = addr
            .strip_prefix("tcp://")
            .ok_or_else(|| Error::BadWorkerAddr {
                addr: addr.clone(),
                reason: "expected tcp://HOST:PORT".into(),
            })?;
        let port_ok = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok || name.is_empty() {
            return Err(Error::BadWorkerAddr {
                addr: item.to_string(),
                reason: "expected [NAME=]tcp://HOST:PORT".into(),
            });
        }
        if out.iter().any(|m| m.name == name) {
            return Err(Error::BadWorkerAddr {
                addr: item.to_string(),
                reason: format!("worker name {name:?} given twice"),
            });
        }
        out.push(Member { name, addr });
    }
    if out.is_empty() {
        return Err(Error::BadWorkerAddr {
            addr: list.to_string(),
            reason: "no worker in the list".into(),
        });
    }
    Ok(out)
}

/// Resolves `NAME:PORT` to one member per address (named by `IP:PORT`, sorted).
pub async fn resolve(name_port: &str) -> Result<Vec<Member>> {
    let err = |reason: String| Error::Dns {
        name: name_port.to_string(),
        reason,
    };
    let (host, port) = name_port
        .rsplit_once(':')
        .ok_or_else(|| err("expected NAME:PORT".into()))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(err("expected NAME:PORT".into()));
    }
    let addrs = tokio::net::lookup_host(name_port)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut members: Vec<Member> = addrs
        .map(|a| Member {
            name: a.to_string(),
            addr: format!("tcp://{a}"),
        })
        .collect();
    members.sort();
    members.dedup();
    Ok(members)
}

/// Re-resolves `name_port` every `every` and applies the result to `pool`. A failed or
/// empty lookup keeps the previous members (DNS hiccups must not empty the ring).
pub async fn run_dns(pool: Pool, name_port: String, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match resolve(&name_port).await {
            Ok(m) if !m.is_empty() => {
                if let Err(e) = pool.set_members(&m) {
                    tracing::warn!(error = %e, "applying DNS members");
                }
            }
            Ok(_) => {
                tracing::warn!(name = %name_port, "DNS lookup found no worker; keeping the last set")
            }
            Err(e) => tracing::warn!(error = %e, "DNS lookup failed; keeping the last set"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_lists() {
        let m = parse_static("tcp://10.0.0.1:1234, w1=tcp://h:1").expect("parse");
        assert_eq!(m[0].name, "tcp://10.0.0.1:1234");
        assert_eq!(m[1].name, "w1");
        assert_eq!(m[1].addr, "tcp://h:1");
        for bad in [
            "",
            "http://h:1",
            "tcp://h",
            "tcp://:1",
            "a=tcp://h:1,a=tcp://h:2",
            "=tcp://h:1",
        ] {
            let e = parse_static(bad).expect_err(bad);
            assert!(e.to_string().contains("worker address"), "{e}");
        }
    }

    #[tokio::test]
    async fn dns_names() {
        let m = resolve("localhost:4321").await.expect("resolve");
        assert!(!m.is_empty());
        assert!(m.iter().all(|m| m.addr.ends_with(":4321")));
        let e = resolve("localhost").await.expect_err("no port");
        assert!(e.to_string().contains("localhost"), "{e}");
        assert!(resolve("no-such-host.invalid:1").await.is_err());
    }
}
