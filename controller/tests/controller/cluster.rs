//! The pool reconcile against a real cluster (`KUBECONFIG`): installs the CRDs, creates a pool
//! in a fresh namespace, reconciles twice and checks the second run changed nothing. The
//! namespace is deleted afterwards whatever happened.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln_controller::crd::{BuildWorkerPool, BuildWorkerPoolSpec};
use kiln_controller::reconcile::{pool::reconcile, Context};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};

pub async fn create_and_reconcile_twice() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .context("client from KUBECONFIG")?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let pp = PatchParams::apply("kiln-controller-test").force();
    for crd in kiln_controller::crdgen::crds() {
        let name = crd.name_any();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .context("apply CRD")?;
        // A guard against hanging forever, not a speed check.
        tokio::time::timeout(
            std::time::Duration::from_secs(120),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .context("CRD not established")??;
    }
    let ns = format!("kiln-ctrl-test-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut ns_obj = Namespace::default();
    ns_obj.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &ns_obj)
        .await
        .context("create namespace")?;
    let result = flow(client.clone(), &ns).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    result
}

async fn flow(client: Client, ns: &str) -> anyhow::Result<()> {
    let pools = Api::<BuildWorkerPool>::namespaced(client.clone(), ns);
    let spec: BuildWorkerPoolSpec =
        serde_json::from_value(serde_json::json!({"replicas": 1, "gateway": {"replicas": 1}}))?;
    pools
        .create(&PostParams::default(), &BuildWorkerPool::new("p", spec))
        .await?;
    let ctx = Arc::new(Context::new(client.clone()));
    reconcile(Arc::new(pools.get("p").await?), ctx.clone()).await?;

    let versions = || async {
        let mut v = BTreeMap::new();
        let secrets = Api::<Secret>::namespaced(client.clone(), ns);
        for s in [
            "p-ca",
            "p-server-tls",
            "p-gateway-client-tls",
            "p-controller-client-tls",
            "p-client-tls",
        ] {
            v.insert(s.to_string(), secrets.get(s).await?.resource_version());
        }
        let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get("p-worker-config")
            .await?;
        v.insert("cm".into(), cm.resource_version());
        let svcs = Api::<Service>::namespaced(client.clone(), ns);
        for s in ["p-workers", "p-gateway"] {
            v.insert(s.to_string(), svcs.get(s).await?.resource_version());
        }
        anyhow::Ok(v)
    };
    let before = versions().await?;
    reconcile(Arc::new(pools.get("p").await?), ctx).await?;
    let after = versions().await?;
    anyhow::ensure!(
        before == after,
        "second reconcile changed objects: {before:?} -> {after:?}"
    );
    let status = pools.get("p").await?.status.context("pool has no status")?;
    anyhow::ensure!(
        status.certificate_not_after.is_some(),
        "no certificate expiry in status"
    );
    Ok(())
}
