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

/// A `BuildJob` on a real cluster (`KUBECONFIG`), run by the controller deployed there (the
/// chart, with images built from this tree): installs the CRDs, creates a pool and waits
/// for it to be Ready, then a ConfigMap context, a Secret and a job that pushes to
/// `KILN_E2E_REGISTRY` (a registry the workers reach, e.g. kind's local registry) from
/// `KILN_E2E_BASE` (a base image there). Waits for Succeeded; checks the digest and that
/// the secret's value is nowhere in the status. The namespace is deleted afterwards.
pub async fn buildjob_succeeds() -> anyhow::Result<()> {
    use kiln_controller::crd::{BuildJob, BuildJobSpec, BuildPhase};

    let need = |var: &str| {
        std::env::var(var).with_context(|| {
            format!("{var} is required for the BuildJob cluster test (see README, BuildJob)")
        })
    };
    let registry = need("KILN_E2E_REGISTRY")?;
    let base = need("KILN_E2E_BASE")?;
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
        tokio::time::timeout(
            std::time::Duration::from_secs(120),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .context("CRD not established")??;
    }
    let ns = format!("kiln-job-test-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut ns_obj = Namespace::default();
    ns_obj.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &ns_obj)
        .await
        .context("create namespace")?;
    let result = async {
        let mut spec = serde_json::json!({"replicas": 1, "gateway": {"replicas": 1}});
        if let Ok(img) = std::env::var("KILN_E2E_WORKER_IMAGE") {
            spec["image"] = img.into();
        }
        if let Ok(img) = std::env::var("KILN_E2E_GATEWAY_IMAGE") {
            spec["gateway"]["image"] = img.into();
        }
        let pools = Api::<BuildWorkerPool>::namespaced(client.clone(), &ns);
        pools
            .create(
                &PostParams::default(),
                &BuildWorkerPool::new("p", serde_json::from_value(spec)?),
            )
            .await?;
        let pool_ready = |p: Option<&BuildWorkerPool>| {
            p.and_then(|p| p.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        };
        // Guards against hanging forever, not speed checks.
        tokio::time::timeout(
            std::time::Duration::from_secs(600),
            await_condition(pools.clone(), "p", pool_ready),
        )
        .await
        .context("the pool did not become Ready (is kiln-controller running in the cluster?)")??;

        const VALUE: &str = "cluster-s3cr3t-value";
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("ctx".into());
        cm.data = Some(BTreeMap::from([(
            "Dockerfile".to_string(),
            "ARG BASE\nFROM ${BASE}\nRUN --mount=type=secret,id=tok echo \"token: $(cat /run/secrets/tok)\"\n"
                .to_string(),
        )]));
        Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &cm)
            .await?;
        let mut secret = Secret::default();
        secret.metadata.name = Some("tok".into());
        secret.string_data = Some(BTreeMap::from([("tok".to_string(), VALUE.to_string())]));
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await?;
        let spec: BuildJobSpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "p"},
            "source": {"configMap": {"name": "ctx"}},
            "buildArgs": {"BASE": base},
            "secrets": [{"id": "tok", "secretName": "tok"}],
            "outputs": [{"name": format!("{registry}/kiln-e2e/job:{}", std::process::id())}],
            "timeout": "15m",
        }))?;
        let jobs = Api::<BuildJob>::namespaced(client.clone(), &ns);
        jobs.create(&PostParams::default(), &BuildJob::new("j", spec))
            .await?;
        let done = |j: Option<&BuildJob>| {
            j.and_then(|j| j.status.as_ref())
                .is_some_and(|s| matches!(s.phase, BuildPhase::Succeeded | BuildPhase::Failed))
        };
        tokio::time::timeout(
            std::time::Duration::from_secs(1200),
            await_condition(jobs.clone(), "j", done),
        )
        .await
        .context("the BuildJob did not finish")??;
        let job = jobs.get("j").await?;
        let status = job.status.context("job has no status")?;
        let text = serde_json::to_string(&status)?;
        anyhow::ensure!(status.phase == BuildPhase::Succeeded, "job failed: {text}");
        anyhow::ensure!(
            status
                .image_digest
                .as_deref()
                .is_some_and(|d| d.starts_with("sha256:")),
            "no image digest: {text}"
        );
        anyhow::ensure!(!text.contains(VALUE), "the secret is in the status: {text}");
        anyhow::Ok(())
    }
    .await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    result
}
