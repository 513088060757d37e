//! The Tekton task's step script (`manifests/tekton/kiln-build.sh`, embedded verbatim in
//! `manifests/tekton/kiln-build.yaml`) run locally with the environment Tekton gives it,
//! against a loopback gateway and worker over mutual TLS: it builds, pushes, and writes the
//! `IMAGE_DIGEST` and `IMAGE_URL` result files, and the digest is the one the registry serves.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use kiln_e2e::fleet;
use kiln_e2e::registry::Registry;

#[test]
fn tekton_step_script_builds_and_writes_results() -> anyhow::Result<()> {
    let bins = fleet::ensure_binaries()?;
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    let mtls = fleet::MtlsFleet::start(&bins, dir.path())?;
    let (user, gport) = (&mtls.user, mtls.gateway_port);

    // The client-certificate Secret as Tekton mounts it.
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls)?;
    std::fs::copy(&user.ca, tls.join("ca.crt"))?;
    std::fs::copy(&user.cert, tls.join("tls.crt"))?;
    std::fs::copy(&user.key, tls.join("tls.key"))?;
    // The source workspace.
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("app"))?;
    std::fs::write(
        source.join("app/Dockerfile"),
        "ARG BASE\nFROM ${BASE} AS build\nRUN echo built > /out\nFROM ${BASE}\nCOPY --from=build /out /out\n",
    )?;
    let results = dir.path().join("results");
    std::fs::create_dir_all(&results)?;
    let image = format!("{}/kiln/tekton:1", reg.addr());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/tekton/kiln-build.sh");
    let path = std::env::join_paths(std::iter::once(bins.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    let out = Command::new("sh")
        .arg(&script)
        .arg(format!("BASE={}/kiln/base:1", reg.addr()))
        .env("PATH", path)
        .env("IMAGE", &image)
        .env("CONTEXT", "app")
        .env("DOCKERFILE", "Dockerfile")
        .env("GATEWAY", format!("tcp://127.0.0.1:{gport}"))
        .env("SOURCE_DIR", &source)
        .env("TLS_DIR", &tls)
        .env("TMPDIR", dir.path())
        .env("RESULT_IMAGE_DIGEST", results.join("IMAGE_DIGEST"))
        .env("RESULT_IMAGE_URL", results.join("IMAGE_URL"))
        .output()
        .context("running kiln-build.sh")?;
    if !out.status.success() {
        bail!(
            "kiln-build.sh failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let digest = std::fs::read_to_string(results.join("IMAGE_DIGEST"))?;
    assert_eq!(std::fs::read_to_string(results.join("IMAGE_URL"))?, image);
    let served = kiln_e2e::http::get(
        &reg.addr(),
        "/v2/kiln/tekton/manifests/1",
        &[(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.v2+json",
        )],
    )?;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.header("docker-content-digest"),
        Some(digest.as_str()),
        "the result digest is not what the registry serves for {image}"
    );
    Ok(())
}
