//! Per-worker cache usage of a pool for its status: `DiskUsage` through the pool's gateway,
//! whose records name their worker (`<worker>/<id>`), summed per worker. Behind the
//! [`UsageReader`] trait so tests can inject the figures; [`GatewayUsage`] is the real one,
//! with the controller's client certificate (as the BuildJob runner uses it).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_cli::client::{Client, TlsConfig, TlsFiles};
use kiln_proto::moby::buildkit::v1 as api;

use crate::crd::WorkerUsage;

/// Where a pool's gateway is and how to authenticate to it.
#[derive(Clone)]
pub struct GatewayTarget {
    /// `tcp://<pool>-gateway.<ns>.svc:<port>`.
    pub addr: String,
    /// Name expected in the gateway's certificate.
    pub server_name: String,
    /// CA bundle, client certificate and key (PEM).
    pub ca_pem: String,
    /// The controller's client certificate.
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
}

/// Reads the bytes each worker's cache holds.
pub trait UsageReader: Send + Sync + 'static {
    /// Bytes per worker name, or why they cannot be read.
    fn read(
        &self,
        target: GatewayTarget,
    ) -> BoxFuture<'static, Result<BTreeMap<String, i64>, String>>;
}

/// `DiskUsage` through the gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewayUsage {
    /// Overrides the gateway address (a controller outside the cluster).
    pub addr_override: Option<String>,
}

impl UsageReader for GatewayUsage {
    fn read(
        &self,
        target: GatewayTarget,
    ) -> BoxFuture<'static, Result<BTreeMap<String, i64>, String>> {
        let addr = self.addr_override.clone().unwrap_or(target.addr.clone());
        Box::pin(async move {
            let dir = tempfile::Builder::new()
                .prefix("kiln-usage-")
                .tempdir()
                .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
            let d = dir.path();
            for (file, pem) in [
                ("ca.pem", &target.ca_pem),
                ("cert.pem", &target.cert_pem),
                ("key.pem", &target.key_pem),
            ] {
                let path = d.join(file);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                f.write_all(pem.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            let tls = TlsConfig {
                files: TlsFiles {
                    ca: Some(d.join("ca.pem")),
                    cert: Some(d.join("cert.pem")),
                    key: Some(d.join("key.pem")),
                },
                server_name: Some(target.server_name.clone()),
            };
            let read = async {
                let client = Client::connect(&addr, Some(tls))
                    .await
                    .map_err(|e| format!("{addr}: {}", kiln_cli::client::error_chain(&e)))?;
                let mut control = api::control_client::ControlClient::new(client.channel());
                let resp = control
                    .disk_usage(api::DiskUsageRequest::default())
                    .await
                    .map_err(|s| format!("{addr}: disk usage: {}", s.message()))?;
                Ok::<_, String>(per_worker(&resp.into_inner().record))
            };
            let out = tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .map_err(|_| format!("{addr}: disk usage: no answer within 10 s"))?;
            drop(dir);
            out
        })
    }
}

/// Sums the sizes of a gateway's usage records by the worker their id names.
pub fn per_worker(records: &[api::UsageRecord]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for r in records {
        if let Some((worker, _)) = r.id.split_once('/') {
            *out.entry(worker.to_string()).or_insert(0) += r.size.max(0);
        }
    }
    out
}

/// Puts `bytes` into `workers` (adding the workers only the usage names).
pub fn merge_usage(workers: &mut Vec<WorkerUsage>, bytes: &BTreeMap<String, i64>) {
    for (name, b) in bytes {
        match workers.iter_mut().find(|w| &w.name == name) {
            Some(w) => w.used_bytes = Some(*b),
            None => workers.push(WorkerUsage {
                name: name.clone(),
                used_bytes: Some(*b),
                ..WorkerUsage::default()
            }),
        }
    }
    workers.sort_by(|a, b| a.name.cmp(&b.name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_summed_by_the_worker_in_their_id() {
        let rec = |id: &str, size: i64| api::UsageRecord {
            id: id.into(),
            size,
            ..Default::default()
        };
        let m = per_worker(&[
            rec("w0/a", 10),
            rec("w1/b", 5),
            rec("w0/c", 7),
            rec("bare", 99),
        ]);
        assert_eq!(m, BTreeMap::from([("w0".into(), 17), ("w1".into(), 5)]));
        let mut workers = vec![WorkerUsage {
            name: "w1".into(),
            inflight: 2,
            ..WorkerUsage::default()
        }];
        merge_usage(&mut workers, &m);
        assert_eq!(workers[0].name, "w0");
        assert_eq!(workers[0].used_bytes, Some(17));
        assert_eq!((workers[1].inflight, workers[1].used_bytes), (2, Some(5)));
    }
}
