//! Rendering: a `BuildWorkerPool` in, the Kubernetes objects it owns out. Pure functions with
//! no client calls; [`crate::reconcile`] applies what they return.
//!
//! Names are stable so that workers keep their identity and PVCs across restarts:
//! StatefulSet `<pool>-worker` (pods `<pool>-worker-N`), headless Service `<pool>-workers`,
//! gateway Deployment and Service `<pool>-gateway` (and its ServiceAccount, Role and
//! RoleBinding, same name), ConfigMap `<pool>-worker-config`, PodDisruptionBudget
//! `<pool>-workers`.

mod config;
mod gateway;
mod worker;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{BuildWorkerPool, TlsMode};
use crate::units::parse_duration;
use crate::{Error, Result};

pub use config::worker_config_toml;

/// Longest pool name: `<pool>-worker` plus the StatefulSet's revision hash must fit a label.
pub const MAX_POOL_NAME: usize = 40;

/// gRPC port of workers and gateway containers (BuildKit Control API over mTLS).
pub const GRPC_PORT: i32 = 1234;
/// Metrics, `/healthz` and `/readyz` port of workers and gateways.
pub const METRICS_PORT: i32 = 9090;
/// The gateway's admin endpoint (worker listing, drain), HTTPS with client certificates.
pub const ADMIN_PORT: i32 = 9091;
/// Where TLS material is mounted in every container.
pub const TLS_DIR: &str = "/etc/kiln/tls";
/// Where the gateway's client certificate (gateway → worker) is mounted.
pub const CLIENT_TLS_DIR: &str = "/etc/kiln/client-tls";
/// Where the worker ConfigMap is mounted (its own directory, so updates reach the pod).
pub const CONFIG_DIR: &str = "/etc/kiln/config";
/// The worker's configuration file (GC policy), from the ConfigMap.
pub const CONFIG_FILE: &str = "worker.toml";
/// Where the worker's state and cache live (the PVC).
pub const STATE_DIR: &str = "/var/lib/kiln";
/// Field manager of every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "kiln-controller";

/// Everything a pool owns, except TLS Secrets (see [`crate::tls`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// The worker configuration (GC policy).
    pub config_map: ConfigMap,
    /// The workers.
    pub stateful_set: StatefulSet,
    /// Headless Service giving every worker a stable DNS name.
    pub workers_service: Service,
    /// The gateway.
    pub gateway_deployment: Deployment,
    /// The gateway's Service.
    pub gateway_service: Service,
    /// The gateway's ServiceAccount.
    pub gateway_service_account: ServiceAccount,
    /// What the gateway may read: the workers' EndpointSlices.
    pub gateway_role: Role,
    /// Binds the Role to the gateway's ServiceAccount.
    pub gateway_role_binding: RoleBinding,
    /// Keeps all but one worker up during voluntary disruptions.
    pub pdb: PodDisruptionBudget,
}

impl Rendered {
    /// Every object as JSON, in apply order (config and access first, then Services, then
    /// workloads).
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>> {
        let to = |v: serde_json::Result<serde_json::Value>, what: &str| {
            v.map_err(|e| Error::Yaml {
                what: what.to_string(),
                reason: e.to_string(),
            })
        };
        Ok(vec![
            to(serde_json::to_value(&self.config_map), "ConfigMap")?,
            to(
                serde_json::to_value(&self.gateway_service_account),
                "ServiceAccount",
            )?,
            to(serde_json::to_value(&self.gateway_role), "Role")?,
            to(
                serde_json::to_value(&self.gateway_role_binding),
                "RoleBinding",
            )?,
            to(serde_json::to_value(&self.workers_service), "Service")?,
            to(serde_json::to_value(&self.gateway_service), "Service")?,
            to(serde_json::to_value(&self.pdb), "PodDisruptionBudget")?,
            to(serde_json::to_value(&self.stateful_set), "StatefulSet")?,
            to(serde_json::to_value(&self.gateway_deployment), "Deployment")?,
        ])
    }

    /// All objects as one multi-document YAML stream.
    pub fn to_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for v in self.to_values()? {
            let doc = serde_saphyr::to_string(&v).map_err(|e| Error::Yaml {
                what: "rendered object".to_string(),
                reason: e.to_string(),
            })?;
            out.push_str("---\n");
            out.push_str(&doc);
        }
        Ok(out)
    }
}

/// Renders every object `pool` owns. Fails, naming the field, on a spec the API server's
/// schema cannot catch (a bad size, a missing uid or namespace, a name too long).
pub fn render(pool: &BuildWorkerPool) -> Result<Rendered> {
    let ctx = Context::new(pool)?;
    Ok(Rendered {
        config_map: config::config_map(&ctx)?,
        stateful_set: worker::stateful_set(&ctx),
        workers_service: worker::headless_service(&ctx),
        gateway_deployment: gateway::deployment(&ctx)?,
        gateway_service: gateway::service(&ctx),
        gateway_service_account: gateway::service_account(&ctx),
        gateway_role: gateway::role(&ctx),
        gateway_role_binding: gateway::role_binding(&ctx),
        pdb: worker::pdb(&ctx),
    })
}

/// Metadata of an object `pool` owns (labels, namespace, owner reference), for objects
/// rendered outside this module (TLS Secrets).
pub fn owned_meta(pool: &BuildWorkerPool, name: String, component: &str) -> Result<ObjectMeta> {
    Ok(Context::new(pool)?.meta(name, component))
}

// === names ===

/// Name of the workers' StatefulSet; pods are `<this>-N`.
pub fn worker_statefulset_name(pool: &str) -> String {
    format!("{pool}-worker")
}

/// Name of the workers' headless Service.
pub fn workers_service_name(pool: &str) -> String {
    format!("{pool}-workers")
}

/// Name of the gateway Deployment and Service.
pub fn gateway_name(pool: &str) -> String {
    format!("{pool}-gateway")
}

/// Name of the worker ConfigMap.
pub fn config_map_name(pool: &str) -> String {
    format!("{pool}-worker-config")
}

/// Secret with the CA certificate and key (read by the controller only).
pub fn ca_secret_name(pool: &str) -> String {
    format!("{pool}-ca")
}

/// Secret with the server certificate of workers and gateway.
pub fn server_secret_name(pool: &str) -> String {
    format!("{pool}-server-tls")
}

/// Secret with the gateway's client certificate towards the workers.
pub fn gateway_client_secret_name(pool: &str) -> String {
    format!("{pool}-gateway-client-tls")
}

/// Secret with the controller's client certificate.
pub fn controller_client_secret_name(pool: &str) -> String {
    format!("{pool}-controller-client-tls")
}

/// The Secret the controller takes its client identity for `pool`'s gateway from: the
/// pool's own (`tls.mode: existingSecret`) or the one the controller issues.
pub fn controller_identity_secret(pool: &BuildWorkerPool) -> String {
    match (&pool.spec.tls.mode, &pool.spec.tls.secret_name) {
        (TlsMode::ExistingSecret, Some(s)) => s.clone(),
        _ => controller_client_secret_name(&pool.name_any()),
    }
}

/// Secret with a client certificate for users (`kiln build --addr …`).
pub fn user_client_secret_name(pool: &str) -> String {
    format!("{pool}-client-tls")
}

// === impl Context ===

/// What every renderer needs: the pool, its name and namespace, labels and owner reference.
pub(crate) struct Context<'a> {
    pub pool: &'a BuildWorkerPool,
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
}

impl<'a> Context<'a> {
    fn new(pool: &'a BuildWorkerPool) -> Result<Self> {
        let name = pool.name_any();
        let object = format!("{}/{}", pool.namespace().unwrap_or_default(), name);
        let invalid = |field: &str, reason: String| Error::InvalidSpec {
            object: object.clone(),
            field: field.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("metadata.name", "empty".to_string()));
        }
        if name.len() > MAX_POOL_NAME {
            return Err(invalid(
                "metadata.name",
                format!("longer than {MAX_POOL_NAME} characters"),
            ));
        }
        let namespace = pool
            .namespace()
            .ok_or_else(|| invalid("metadata.namespace", "missing".to_string()))?;
        let owner = pool.controller_owner_ref(&()).ok_or_else(|| {
            invalid(
                "metadata.uid",
                "missing (render objects only from a pool read from the API server)".to_string(),
            )
        })?;
        if pool.spec.tls.mode == TlsMode::ExistingSecret && pool.spec.tls.secret_name.is_none() {
            return Err(invalid(
                "spec.tls.secretName",
                "required when spec.tls.mode is existingSecret".to_string(),
            ));
        }
        let lifetime = parse_duration(&pool.spec.tls.lifetime, "spec.tls.lifetime")?;
        let renew = parse_duration(&pool.spec.tls.renew_before, "spec.tls.renewBefore")?;
        if renew >= lifetime {
            return Err(invalid(
                "spec.tls.renewBefore",
                format!(
                    "{} is not shorter than spec.tls.lifetime {}",
                    pool.spec.tls.renew_before, pool.spec.tls.lifetime
                ),
            ));
        }
        Ok(Context {
            pool,
            name,
            namespace,
            owner,
        })
    }

    /// Labels selecting one component of this pool.
    pub fn selector(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "kiln".to_string()),
            ("app.kubernetes.io/instance".to_string(), self.name.clone()),
            (
                "app.kubernetes.io/component".to_string(),
                component.to_string(),
            ),
        ])
    }

    /// Labels on every object of one component.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = self.selector(component);
        l.insert(
            "app.kubernetes.io/managed-by".to_string(),
            FIELD_MANAGER.to_string(),
        );
        l
    }

    /// Metadata of an owned object.
    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// The Secret workers and gateways serve with (`ca.crt`, `tls.crt`, `tls.key`).
    pub fn server_secret(&self) -> String {
        match (&self.pool.spec.tls.mode, &self.pool.spec.tls.secret_name) {
            (TlsMode::ExistingSecret, Some(s)) => s.clone(),
            _ => server_secret_name(&self.name),
        }
    }

    /// The Secret the gateway authenticates to workers with.
    pub fn gateway_client_secret(&self) -> String {
        match (&self.pool.spec.tls.mode, &self.pool.spec.tls.secret_name) {
            (TlsMode::ExistingSecret, Some(s)) => s.clone(),
            _ => gateway_client_secret_name(&self.name),
        }
    }

    /// The pull policy, when the spec sets one.
    pub fn pull_policy(&self) -> Option<String> {
        self.pool
            .spec
            .image_pull_policy
            .map(|p| p.as_str().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BuildWorkerPoolSpec;

    fn pool(spec: serde_json::Value) -> BuildWorkerPool {
        let spec: BuildWorkerPoolSpec = serde_json::from_value(spec).unwrap();
        let mut p = BuildWorkerPool::new("p", spec);
        p.metadata.namespace = Some("ns".into());
        p.metadata.uid = Some("uid-1".into());
        p
    }

    fn args(c: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
        c.args.clone().unwrap_or_default()
    }

    #[test]
    fn default_pool_renders_the_documented_interface() {
        let r = render(&pool(serde_json::json!({}))).unwrap();
        if std::env::var_os("KILN_PRINT_RENDER").is_some() {
            eprintln!("{}", r.to_yaml().unwrap());
        }
        // The gateway reads its workers' EndpointSlices with its own ServiceAccount.
        let gw_pod = r
            .gateway_deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(gw_pod.service_account_name.as_deref(), Some("p-gateway"));
        let rule = &r.gateway_role.rules.as_ref().unwrap()[0];
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["endpointslices".to_string()][..])
        );
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        assert_eq!(r.gateway_role_binding.role_ref.name, "p-gateway");
        let subject = &r.gateway_role_binding.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "p-gateway", Some("ns"))
        );
        let sts = r.stateful_set.spec.as_ref().unwrap();
        assert_eq!(r.stateful_set.metadata.name.as_deref(), Some("p-worker"));
        assert_eq!(sts.service_name.as_deref(), Some("p-workers"));
        assert_eq!(sts.replicas, Some(3));
        let pod = sts.template.spec.as_ref().unwrap();
        let worker = &pod.containers[0];
        let a = args(worker);
        for want in [
            "--addr=tcp://0.0.0.0:1234",
            "--oci-runtime=runc",
            "--metrics-addr=0.0.0.0:9090",
            "--tlscacert=/etc/kiln/tls/ca.crt",
            "--tlscert=/etc/kiln/tls/tls.crt",
            "--tlskey=/etc/kiln/tls/tls.key",
            "--config=/etc/kiln/config/worker.toml",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--max-parallelism")));
        assert_eq!(
            worker.security_context.as_ref().unwrap().privileged,
            Some(true)
        );
        let probe = worker
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        let claim = &sts.volume_claim_templates.as_ref().unwrap()[0];
        let size = &claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"];
        assert_eq!(size.0, "50Gi");
        // Every object is owned by the pool and labelled.
        for v in r.to_values().unwrap() {
            assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "uid-1", "{v}");
            assert_eq!(
                v["metadata"]["ownerReferences"][0]["controller"], true,
                "{v}"
            );
            assert_eq!(
                v["metadata"]["labels"]["app.kubernetes.io/name"], "kiln",
                "{v}"
            );
            assert_eq!(
                v["metadata"]["labels"]["app.kubernetes.io/instance"], "p",
                "{v}"
            );
        }
        let gw = &r
            .gateway_deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let a = args(gw);
        for want in [
            "--workers-endpointslice=ns/p-workers",
            "--load-bound=1.25",
            "--metrics-addr=0.0.0.0:9090",
            "--tlscert=/etc/kiln/tls/tls.crt",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        // No --threads: the gateway's own default (one thread).
        assert!(!a.iter().any(|x| x.starts_with("--threads")), "{a:?}");
        let svc = r.gateway_service.spec.as_ref().unwrap();
        assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            r.workers_service
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .as_deref(),
            Some("None")
        );
    }

    #[test]
    fn options_reach_the_pods() {
        let r = render(&pool(serde_json::json!({
            "runtime": "crun", "rootless": true, "maxParallelism": 4,
            "cache": {"registry": "reg/cache", "credentialsSecret": "regcred"},
            "storage": {"size": "10Gi", "storageClassName": "fast"},
            "tls": {"mode": "existingSecret", "secretName": "mine"},
            "gateway": {"serviceType": "NodePort", "port": 443, "loadBound": "2", "threads": 4}
        })))
        .unwrap();
        let sts = r.stateful_set.spec.as_ref().unwrap();
        let pod = sts.template.spec.as_ref().unwrap();
        let a = args(&pod.containers[0]);
        for want in [
            "--oci-runtime=crun",
            "--max-parallelism=4",
            "--cache-registry=reg/cache",
            "--rootless",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.run_as_non_root, Some(true));
        let vols = pod.volumes.as_ref().unwrap();
        assert_eq!(
            vols[0].secret.as_ref().unwrap().secret_name.as_deref(),
            Some("mine")
        );
        assert!(vols
            .iter()
            .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("regcred")));
        let claim = &sts.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(
            claim.spec.as_ref().unwrap().storage_class_name.as_deref(),
            Some("fast")
        );
        let svc = r.gateway_service.spec.as_ref().unwrap();
        assert_eq!(svc.type_.as_deref(), Some("NodePort"));
        assert_eq!(svc.ports.as_ref().unwrap()[0].port, 443);
        let gw = &r
            .gateway_deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let gw_args = args(&gw.containers[0]);
        for want in ["--load-bound=2", "--threads=4"] {
            assert!(
                gw_args.iter().any(|x| x == want),
                "{want} not in {gw_args:?}"
            );
        }
        let gw_vols = gw.volumes.as_ref().unwrap();
        assert!(gw_vols
            .iter()
            .all(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("mine")));
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases = [
            (
                serde_json::json!({"gateway": {"loadBound": "1"}}),
                "spec.gateway.loadBound",
            ),
            (
                serde_json::json!({"gc": {"keepDuration": "forever"}}),
                "spec.gc.keepDuration",
            ),
            (
                serde_json::json!({"tls": {"lifetime": "1d", "renewBefore": "2d"}}),
                "spec.tls.renewBefore",
            ),
            (
                serde_json::json!({"tls": {"mode": "existingSecret"}}),
                "spec.tls.secretName",
            ),
        ];
        for (spec, field) in cases {
            let e = render(&pool(spec)).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let mut long = pool(serde_json::json!({}));
        long.metadata.name = Some("x".repeat(MAX_POOL_NAME + 1));
        assert!(render(&long)
            .unwrap_err()
            .to_string()
            .contains("metadata.name"));
        let mut orphan = pool(serde_json::json!({}));
        orphan.metadata.uid = None;
        assert!(render(&orphan)
            .unwrap_err()
            .to_string()
            .contains("metadata.uid"));
    }
}
