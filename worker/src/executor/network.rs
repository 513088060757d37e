//! Container network setup: host namespace or a fresh one with only loopback.
//!
//! With [`Network::Host`] the container shares the worker's network namespace and gets
//! a copy of the host's `resolv.conf`. With [`Network::None`] the runtime creates a new
//! namespace, in which it brings up `lo` itself; `resolv.conf` then only carries a
//! placeholder nameserver.

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType};

use super::{Error, Network, Result};

/// `resolv.conf` for a namespace without network.
const DEFAULT_RESOLV: &str = "nameserver 8.8.8.8\nnameserver 8.8.4.4\n";

/// The namespaces a container gets for `network` (pid, ipc, uts and mount always).
pub fn namespaces(network: Network) -> Result<Vec<LinuxNamespace>> {
    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if network == Network::None {
        kinds.push(LinuxNamespaceType::Network);
    }
    kinds
        .into_iter()
        .map(|typ| {
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(|e| Error::Spec(format!("namespace {typ:?}: {e}")))
        })
        .collect()
}

/// The `resolv.conf` contents for `network`: the host's for host networking (falling
/// back to the default when unreadable), the default otherwise.
pub fn resolv_conf(network: Network) -> String {
    match network {
        Network::Host => match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(s) if s.lines().any(|l| l.trim_start().starts_with("nameserver")) => s,
            _ => DEFAULT_RESOLV.to_string(),
        },
        Network::None => DEFAULT_RESOLV.to_string(),
    }
}

/// The `/etc/hosts` contents: loopback names, the hostname and extra entries.
pub fn hosts(hostname: &str, extra: &[(String, String)]) -> String {
    let mut s =
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (name, ip) in extra {
        s.push_str(&format!("{ip}\t{name}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_gets_a_network_namespace_host_does_not() -> anyhow::Result<()> {
        let has_net = |n| -> anyhow::Result<bool> {
            Ok(namespaces(n)?
                .iter()
                .any(|ns| ns.typ() == LinuxNamespaceType::Network))
        };
        assert!(has_net(Network::None)?);
        assert!(!has_net(Network::Host)?);
        assert!(resolv_conf(Network::None).starts_with("nameserver "));
        let h = hosts("box", &[("db".into(), "10.0.0.2".into())]);
        assert!(
            h.contains("localhost box") && h.contains("10.0.0.2\tdb"),
            "{h}"
        );
        Ok(())
    }
}
