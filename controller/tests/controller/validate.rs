//! Every object the controller renders, and the CRDs, pass `kubernetes-validate --strict`
//! for Kubernetes 1.33 (install: `pip install kubernetes-validate`). The test fails, never
//! skips, when the tool is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_controller::crd::{BuildWorkerPool, BuildWorkerPoolSpec};

/// A pool as the API server would hand it over: name, namespace, uid, defaults filled.
pub fn pool(name: &str, spec: serde_json::Value) -> anyhow::Result<BuildWorkerPool> {
    let spec: BuildWorkerPoolSpec = serde_json::from_value(spec)?;
    let mut pool = BuildWorkerPool::new(name, spec);
    pool.metadata.namespace = Some("builds".into());
    pool.metadata.uid = Some("6f1c1a8e-2a4b-4b8e-9d59-0a6a1c3e5f70".into());
    Ok(pool)
}

/// A pool that sets every optional field to something other than its default.
pub fn non_default_spec() -> serde_json::Value {
    serde_json::json!({
        "replicas": 5,
        "image": "registry.example.com/kiln/worker:dev",
        "imagePullPolicy": "Always",
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
        "storage": {"size": "200Gi", "storageClassName": "fast-ssd"},
        "runtime": "crun",
        "rootless": true,
        "maxParallelism": 8,
        "cache": {"registry": "registry.example.com/team/kiln-cache", "credentialsSecret": "regcred"},
        "gc": {
            "reservedSpace": "10GB", "maxUsedSpace": "80%", "minFreeSpace": "5GiB",
            "keepDuration": "7d",
            "rules": [{"filters": ["type==source.local"], "keepDuration": "48h", "maxUsedSpace": "512Mi"},
                      {"all": true, "maxUsedSpace": "50%"}]
        },
        "tls": {"mode": "existingSecret", "secretName": "my-kiln-tls", "lifetime": "30d", "renewBefore": "7d"},
        "gateway": {"replicas": 3, "serviceType": "LoadBalancer", "port": 8443, "loadBound": "1.5",
                    "image": "registry.example.com/kiln/gateway:dev",
                    "resources": {"requests": {"cpu": "500m"}}}
    })
}

fn kubernetes_validate(files: &[PathBuf]) -> std::process::Output {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.33.0"])
        .args(files)
        .output();
    match out {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run kubernetes-validate ({e}); install it with: pip install kubernetes-validate"
        ),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn rendered_objects_and_crds_pass_strict_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, spec) in [
        ("default", serde_json::json!({})),
        ("custom", non_default_spec()),
    ] {
        let rendered = kiln_controller::render::render(&pool(name, spec).unwrap()).unwrap();
        files.push(
            write(
                tmp.path(),
                &format!("{name}.yaml"),
                &rendered.to_yaml().unwrap(),
            )
            .unwrap(),
        );
    }
    for (rel, text) in kiln_controller::crdgen::files().unwrap() {
        let name = rel.to_string_lossy().replace('/', "_");
        files.push(write(tmp.path(), &name, &text).unwrap());
    }
    let out = kubernetes_validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{stdout}\n{stderr}"
    );
    // 9 objects per pool, 4 CRD files; every one must be reported valid.
    assert_eq!(
        stdout.matches(" passed for resource ").count(),
        22,
        "not every document was validated:\n{stdout}\n{stderr}"
    );
}

#[test]
fn the_validator_rejects_a_broken_object() {
    // Proves the check above can fail: an unknown field under --strict.
    let tmp = tempfile::tempdir().unwrap();
    let rendered =
        kiln_controller::render::render(&pool("default", serde_json::json!({})).unwrap()).unwrap();
    let mut sts = serde_json::to_value(&rendered.stateful_set).unwrap();
    sts["spec"]["replicaz"] = serde_json::json!(3);
    let text = serde_json::to_string(&sts).unwrap();
    let file = write(tmp.path(), "broken.yaml", &text).unwrap();
    let out = kubernetes_validate(&[file]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
