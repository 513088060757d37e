//! `kiln build` against registries that want credentials (HTTP Basic on every request,
//! and bearer tokens from a token server), taken from the docker `config.json` in
//! `$DOCKER_CONFIG`: the base is pulled and the result pushed with them; without them the
//! build fails saying so.

use std::path::Path;
use std::process::{Command, Output};

use kiln_e2e::registry::Registry;

const USER: &str = "builder";
const PASS: &str = "hunter2";
const DOCKERFILE: &str = "ARG BASE\nFROM ${BASE}\nRUN echo hi > /x\n";

/// `kiln build --progress plain --build-arg BASE=<base> -t <tag> --push <ctx>` with
/// `DOCKER_CONFIG=<docker_config>`.
fn build_and_push(
    root: &Path,
    ctx: &Path,
    docker_config: &Path,
    base: &str,
    tag: &str,
) -> anyhow::Result<Output> {
    build_and_push_with_path(root, ctx, docker_config, base, tag, None)
}

/// [`build_and_push`] with `path_dir` first on `$PATH`.
fn build_and_push_with_path(
    root: &Path,
    ctx: &Path,
    docker_config: &Path,
    base: &str,
    tag: &str,
    path_dir: Option<&Path>,
) -> anyhow::Result<Output> {
    let arg = format!("BASE={base}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    if let Some(dir) = path_dir {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs)?);
    }
    Ok(cmd
        .env("DOCKER_CONFIG", docker_config)
        .args([
            "build",
            "--root",
            root.to_str().unwrap_or_default(),
            "--progress",
            "plain",
            "--build-arg",
            &arg,
            "-t",
            tag,
            "--push",
            ctx.to_str().unwrap_or_default(),
        ])
        .output()?)
}

/// The manifest of `repo:tag` as the registry serves it to `USER`.
fn manifest(reg: &Registry, repo: &str, tag: &str) -> anyhow::Result<kiln_e2e::http::Response> {
    reg.get_authorized(
        &format!("/v2/{repo}/manifests/{tag}"),
        &[(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
        )],
    )
}

/// A registry of each kind, wanting `USER`/`PASS`.
fn registries() -> anyhow::Result<[Registry; 2]> {
    Ok([
        Registry::start_with_auth(USER, PASS)?,
        Registry::start_with_token_auth(USER, PASS)?,
    ])
}

#[test]
fn build_pulls_and_pushes_with_docker_config_credentials() -> anyhow::Result<()> {
    for reg in registries()? {
        kiln_e2e::base::push_base_with_creds(&reg.addr(), "kiln/base:1", USER, PASS)?;
        let dir = tempfile::tempdir()?;
        let ctx = dir.path().join("ctx");
        std::fs::create_dir(&ctx)?;
        std::fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
        let docker = dir.path().join("docker");
        reg.write_docker_config(&docker, USER, PASS)?;
        let root = dir.path().join("root");
        let base = format!("{}/kiln/base:1", reg.addr());
        let tag = format!("{}/kiln/auth:1", reg.addr());

        let out = build_and_push(&root, &ctx, &docker, &base, &tag)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kiln failed: {}\n{stderr}",
            out.status
        );
        let resp = manifest(&reg, "kiln/auth", "1")?;
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let m: serde_json::Value = serde_json::from_slice(&resp.body)?;
        // The base layer plus the RUN layer.
        assert_eq!(m["layers"].as_array().map(Vec::len), Some(2), "{m}");
    }
    Ok(())
}

#[test]
fn build_without_credentials_says_unauthorized() -> anyhow::Result<()> {
    for reg in registries()? {
        kiln_e2e::base::push_base_with_creds(&reg.addr(), "kiln/base:1", USER, PASS)?;
        let dir = tempfile::tempdir()?;
        let ctx = dir.path().join("ctx");
        std::fs::create_dir(&ctx)?;
        std::fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
        let base = format!("{}/kiln/base:1", reg.addr());
        let tag = format!("{}/kiln/auth:1", reg.addr());

        // No config.json in $DOCKER_CONFIG: the pull of the base fails, naming the registry.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty)?;
        let out = build_and_push(&dir.path().join("root1"), &ctx, &empty, &base, &tag)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(&reg.addr()), "{stderr}");
        assert!(
            stderr.contains("unauthorized: authentication required"),
            "{stderr}"
        );

        // A wrong password: the registry rejects it, the user is named, the password is not.
        let wrong = dir.path().join("wrong");
        reg.write_docker_config(&wrong, USER, "not-hunter2")?;
        let out = build_and_push(&dir.path().join("root2"), &ctx, &wrong, &base, &tag)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("rejected the credentials of user {USER:?}")),
            "{stderr}"
        );
        assert!(!stderr.contains("not-hunter2"), "{stderr}");
        assert_eq!(manifest(&reg, "kiln/auth", "1")?.status, 404);
    }
    Ok(())
}

#[test]
fn build_uses_the_docker_credential_helper() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for reg in registries()? {
        kiln_e2e::base::push_base_with_creds(&reg.addr(), "kiln/base:1", USER, PASS)?;
        let dir = tempfile::tempdir()?;
        let ctx = dir.path().join("ctx");
        std::fs::create_dir(&ctx)?;
        std::fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
        // `credHelpers` names `docker-credential-kilntest`, which knows this registry only;
        // `auths` has a wrong password that must not be used.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin)?;
        let helper = bin.join("docker-credential-kilntest");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nserver=$(cat)\n\
                 if [ \"$server\" = \"{addr}\" ]; then\n\
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}' \"$server\"\n\
                 else echo 'credentials not found in native keychain'; exit 1; fi\n",
                addr = reg.addr()
            ),
        )?;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))?;
        let docker = dir.path().join("docker");
        reg.write_docker_config(&docker, USER, "wrong")?;
        let config = docker.join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&config)?)?;
        v["credHelpers"] = serde_json::json!({ reg.addr(): "kilntest" });
        std::fs::write(&config, serde_json::to_vec(&v)?)?;
        let base = format!("{}/kiln/base:1", reg.addr());
        let tag = format!("{}/kiln/helper:1", reg.addr());

        let out = build_and_push_with_path(
            &dir.path().join("root"),
            &ctx,
            &docker,
            &base,
            &tag,
            Some(&bin),
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kiln failed: {}\n{stderr}",
            out.status
        );
        assert_eq!(manifest(&reg, "kiln/helper", "1")?.status, 200);

        // Without the helper on $PATH the wrong `auths` password is used, and the error
        // says the helper failed.
        let out = build_and_push(&dir.path().join("root2"), &ctx, &docker, &base, &tag)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("rejected the credentials of user {USER:?}")),
            "{stderr}"
        );
        assert!(
            stderr.contains("after credential helper failed: run docker-credential-kilntest"),
            "{stderr}"
        );
    }
    Ok(())
}
