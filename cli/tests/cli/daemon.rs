//! `kiln build --addr` against the real `kiln-worker` daemon process: over a unix socket and
//! over TCP with mutual TLS, the daemon's flags, its probes and its refusals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use kiln_e2e::pki::Ca;
use kiln_e2e::registry::Registry;

use super::{kiln, ok, rawjson_vertices, DOCKERFILE};

/// The `kiln-worker` binary, which cargo builds beside `kiln` when the workspace's tests are
/// built (`cargo test --workspace`).
pub fn worker_bin() -> anyhow::Result<PathBuf> {
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    let bin = kiln.with_file_name("kiln-worker");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p kiln-worker` (cargo test --workspace does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running `kiln-worker`, killed when dropped.
pub struct Daemon {
    child: Child,
    /// Its state directory, removed after the process is gone.
    _root: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback TCP port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Daemon {
    /// Its state directory.
    pub fn root(&self) -> &Path {
        self._root.path()
    }

    /// Starts `kiln-worker` with `args` (plus a fresh `--root` and `--metrics-addr`) and waits
    /// until `/readyz` answers 200.
    pub fn start(args: &[&str]) -> anyhow::Result<Daemon> {
        Daemon::start_env(args, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_env(args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<Daemon> {
        let root = tempfile::tempdir()?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(worker_bin()?)
            .envs(envs.iter().map(|(k, v)| (*k, *v)))
            .args(args)
            .arg("--root")
            .arg(root.path())
            .args(["--metrics-addr", &metrics, "--worker-id", "w-test"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut d = Daemon { child, _root: root };
        for _ in 0..200 {
            if let Some(status) = d.child.try_wait()? {
                bail!("kiln-worker exited at start: {status}");
            }
            if let Ok(r) = kiln_e2e::http::get(&metrics, "/readyz", &[]) {
                if r.status == 200 {
                    let m = kiln_e2e::http::get(&metrics, "/metrics", &[])?;
                    let text = String::from_utf8_lossy(&m.body).to_string();
                    if !text.contains("kiln_worker_builds_in_flight") {
                        bail!("/metrics lacks the worker's metrics: {text}");
                    }
                    return Ok(d);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("kiln-worker did not become ready")
    }
}

/// What most daemon tests start from: a registry holding the busybox base as
/// `kiln/base:1`, a scratch directory, its `unix://` socket address, and a `kiln-worker`
/// serving it. Bound as `let (reg, run, unix, daemon) = …`, the daemon drops first.
pub fn unix_daemon() -> anyhow::Result<(Registry, tempfile::TempDir, String, Daemon)> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let run = tempfile::tempdir()?;
    let unix = format!("unix://{}", run.path().join("kiln.sock").display());
    let daemon = Daemon::start(&["--addr", &unix])?;
    Ok((reg, run, unix, daemon))
}

fn context_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE)?;
    std::fs::write(dir.path().join("f.txt"), "f\n")?;
    Ok(dir)
}

#[test]
fn daemon_serves_unix_and_mtls_tcp() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let pki = tempfile::tempdir()?;
    let ca = Ca::new("kiln test CA")?;
    let server = ca.server(pki.path(), "server", &["localhost", "127.0.0.1"])?;
    let client = ca.client(pki.path(), "client")?;
    let sock = pki.path().join("run/kiln.sock");
    let port = free_port()?;
    let unix = format!("unix://{}", sock.display());
    let tcp = format!("tcp://127.0.0.1:{port}");
    let p = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let (sc, scert, skey) = (p(&server.ca), p(&server.cert), p(&server.key));
    let _daemon = Daemon::start(&[
        "--addr",
        &unix,
        "--addr",
        &tcp,
        "--tlscacert",
        &sc,
        "--tlscert",
        &scert,
        "--tlskey",
        &skey,
    ])?;

    let dir = context_dir()?;
    let ctx = dir.path().to_str().context("path")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let name = format!("{}/kiln/mtls:1", reg.addr());
    let (cc, ccert, ckey) = (p(&client.ca), p(&client.cert), p(&client.key));
    let out = ok(kiln(&[
        "build",
        "--addr",
        &tcp,
        "--tlscacert",
        &cc,
        "--tlscert",
        &ccert,
        "--tlskey",
        &ckey,
        "--progress",
        "rawjson",
        "--build-arg",
        &arg,
        "-t",
        &name,
        "--push",
        ctx,
    ])?)?;
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // The same build over the unix socket is fully cached and gives the same image.
    let out = ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--progress",
        "rawjson",
        "--build-arg",
        &arg,
        "-t",
        &name,
        "--push",
        ctx,
    ])?)?;
    assert_eq!(String::from_utf8(out.stdout)?.trim(), digest);
    let vertices = rawjson_vertices(&out.stderr)?;
    let runs: Vec<_> = vertices
        .iter()
        .filter(|v| v["name"].as_str().unwrap_or_default().contains("RUN "))
        .collect();
    assert!(runs.len() >= 2, "{vertices:?}");
    for v in runs {
        assert_eq!(v["cached"], true, "{v}");
    }

    // No client certificate: refused (with TLS 1.3 the server says so after the client's
    // handshake completes, so the first call fails), and the error names the address.
    let out = kiln(&[
        "build",
        "--addr",
        &tcp,
        "--tlscacert",
        &cc,
        "--build-arg",
        &arg,
        "-t",
        &name,
        ctx,
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&tcp), "{err}");
    // Plaintext to the mTLS port: refused.
    let out = kiln(&[
        "build",
        "--addr",
        &tcp,
        "--build-arg",
        &arg,
        "-t",
        &name,
        ctx,
    ])?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn daemon_refuses_plain_tcp_and_bad_flags() -> anyhow::Result<()> {
    let port = free_port()?;
    let tcp = format!("tcp://127.0.0.1:{port}");
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let root = tempfile::tempdir()?;
        let out = Command::new(worker_bin()?)
            .args(args)
            .arg("--root")
            .arg(root.path())
            .output()?;
        assert!(!out.status.success(), "kiln-worker {args:?} started");
        Ok(String::from_utf8_lossy(&out.stderr).to_string())
    };
    let err = run(&["--addr", &tcp])?;
    assert!(err.contains("TCP requires mutual TLS"), "{err}");
    let err = run(&["--addr", "http://x:1"])?;
    assert!(err.contains("--addr http://x:1"), "{err}");
    let err = run(&["--addr", &tcp, "--tlscert", "/nonexistent/c.pem"])?;
    assert!(err.contains("--tlscacert, --tlscert and --tlskey"), "{err}");
    let err = run(&["--oci-runtime", "kata"])?;
    assert!(err.contains("--oci-runtime"), "{err}");
    let cfg = tempfile::NamedTempFile::new()?;
    std::fs::write(cfg.path(), "root = \"/x\"\nbogus = 1\n")?;
    let err = run(&["--config", cfg.path().to_str().unwrap_or_default()])?;
    assert!(err.contains("bogus") && err.contains("line 2"), "{err}");
    Ok(())
}

#[test]
fn daemon_sends_local_and_tar_outputs_to_the_client() -> anyhow::Result<()> {
    let (reg, run, unix, _daemon) = unix_daemon()?;
    let dir = context_dir()?;
    let ctx = dir.path().to_str().context("path")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let out_dir = run.path().join("out/dir");
    let tar = run.path().join("out/image.tar");
    let local = format!("type=local,dest={}", out_dir.display());
    let tarball = format!("type=tar,dest={}", tar.display());
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        &local,
        "-o",
        &tarball,
        ctx,
    ])?)?;
    assert_eq!(std::fs::read_to_string(out_dir.join("both"))?, "a\nf\n");
    assert!(out_dir.join("bin/busybox").exists());
    let mut names = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(&tar)?).entries()? {
        names.push(e?.path()?.to_string_lossy().to_string());
    }
    assert!(
        names.iter().any(|n| n.trim_start_matches("./") == "both"),
        "{names:?}"
    );
    // An oci tarball to stdout.
    let out = ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        "type=oci,dest=-",
        ctx,
    ])?)?;
    let mut found_index = false;
    for e in tar::Archive::new(&out.stdout[..]).entries()? {
        found_index |= e?.path()?.to_string_lossy() == "index.json";
    }
    assert!(found_index, "no index.json in the oci tarball on stdout");

    // kiln workers / du / prune against the same daemon.
    let out = ok(kiln(&["workers", "--addr", &unix])?)?;
    assert!(String::from_utf8(out.stdout)?.contains("w-test"));
    let total = |out: &std::process::Output| -> anyhow::Result<String> {
        let text = String::from_utf8(out.stdout.clone())?;
        text.lines()
            .find_map(|l| l.strip_prefix("Total: ").map(str::to_string))
            .with_context(|| format!("no total in {text}"))
    };
    let before = total(&ok(kiln(&["du", "--addr", &unix])?)?)?;
    assert_ne!(before, "0B");
    let out = ok(kiln(&["prune", "--addr", &unix, "--all"])?)?;
    assert!(String::from_utf8(out.stdout)?.contains("Reclaimed:"));
    assert_eq!(total(&ok(kiln(&["du", "--addr", &unix])?)?)?, "0B");
    // The pruned store builds again, from scratch, to the same files.
    std::fs::remove_dir_all(&out_dir)?;
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        &local,
        ctx,
    ])?)?;
    assert_eq!(std::fs::read_to_string(out_dir.join("both"))?, "a\nf\n");
    Ok(())
}

#[test]
fn daemon_gets_secrets_from_the_client_session_and_never_stores_them() -> anyhow::Result<()> {
    let (reg, run, unix, daemon) = unix_daemon()?;
    let ctx = tempfile::tempdir()?;
    // The Dockerfile names the value only by its hash, so finding the value anywhere on the
    // worker means it leaked.
    let hash = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(b"s3cr3t-value"))
    };
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("ARG BASE\nFROM ${{BASE}}\nRUN --mount=type=secret,id=tok test \"$(sha256sum < /run/secrets/tok | cut -d' ' -f1)\" = {hash} && echo checked > /checked\n"),
    )?;
    let secret = run.path().join("tok.txt");
    std::fs::write(&secret, "s3cr3t-value")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let out_dir = run.path().join("out");
    let local = format!("type=local,dest={}", out_dir.display());
    let sec = format!("id=tok,src={}", secret.display());
    let c = ctx.path().to_str().context("path")?;
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "--secret",
        &sec,
        "-o",
        &local,
        c,
    ])?)?;
    assert_eq!(
        std::fs::read_to_string(out_dir.join("checked"))?,
        "checked\n"
    );
    // The value is nowhere in the output or in the worker's store.
    for root in [out_dir.as_path(), daemon.root()] {
        for e in walkdir::WalkDir::new(root).into_iter().flatten() {
            if e.file_type().is_file() {
                let data = std::fs::read(e.path()).unwrap_or_default();
                assert!(
                    !data.windows(12).any(|w| w == b"s3cr3t-value"),
                    "the secret is in {}",
                    e.path().display()
                );
            }
        }
    }
    // A required secret the client does not have fails the build, naming the id.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN --mount=type=secret,id=tok,required=true true\n",
    )?;
    let out = kiln(&["build", "--addr", &unix, "--build-arg", &arg, c])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tok"), "{err}");
    Ok(())
}

#[test]
fn daemon_uses_registry_credentials_served_by_the_client() -> anyhow::Result<()> {
    // Basic auth: the client serves its credentials (Auth.Credentials). Token auth: the
    // client fetches scoped tokens itself (Auth.FetchToken) and the password stays with it.
    for token in [false, true] {
        registry_auth_over_the_session(token)?;
    }
    Ok(())
}

fn registry_auth_over_the_session(token: bool) -> anyhow::Result<()> {
    const USER: &str = "builder";
    const PASS: &str = "hunter2";
    let reg = if token {
        Registry::start_with_token_auth(USER, PASS)?
    } else {
        Registry::start_with_auth(USER, PASS)?
    };
    kiln_e2e::base::push_base_with_creds(&reg.addr(), "kiln/base:1", USER, PASS)?;
    let run = tempfile::tempdir()?;
    // The worker has no credentials of its own.
    let empty = run.path().join("worker-docker");
    std::fs::create_dir_all(&empty)?;
    let unix = format!("unix://{}", run.path().join("kiln.sock").display());
    let _daemon = Daemon::start_env(&["--addr", &unix], &[("DOCKER_CONFIG", &empty)])?;
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN echo hi > /x\n",
    )?;
    let c = ctx.path().to_str().context("path")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let tag = format!("{}/kiln/session-auth:1", reg.addr());
    let docker = run.path().join("client-docker");
    reg.write_docker_config(&docker, USER, PASS)?;
    let build = |config: &Path| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("DOCKER_CONFIG", config)
            .args([
                "build",
                "--addr",
                &unix,
                "--build-arg",
                &arg,
                "-t",
                &tag,
                "--push",
                c,
            ])
            .output()?)
    };
    // Without the client's credentials the worker cannot pull: the error says so.
    let out = build(&empty)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unauthorized"), "token={token}: {err}");
    // With them (served over the session) it pulls the base and pushes the result.
    let out = ok(build(&docker)?)?;
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let resp = reg.get_authorized(
        &format!("/v2/kiln/session-auth/manifests/{digest}"),
        &[(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
        )],
    )?;
    assert_eq!(resp.status, 200);
    Ok(())
}

/// Containers of a build in the daemon's runtime state directory.
pub fn containers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("executor/runc"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `cond` every 100 ms for up to `secs` seconds.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 10 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

#[test]
fn client_going_away_cancels_the_build_and_its_container() -> anyhow::Result<()> {
    let (reg, _run, unix, daemon) = unix_daemon()?;
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN sleep 300\n",
    )?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let mut client = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--addr", &unix, "--build-arg", &arg])
        .arg(ctx.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = eventually(60, || !containers(daemon.root()).is_empty());
    let early_exit = client.try_wait()?;
    let _ = client.kill();
    let out = client.wait_with_output()?;
    assert!(
        early_exit.is_none(),
        "the client ended before it was killed: {early_exit:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started, "the RUN container never started");
    assert!(
        eventually(30, || containers(daemon.root()).is_empty()),
        "the container outlived its client: {:?}",
        containers(daemon.root())
    );
    // The daemon still serves.
    ok(kiln(&["workers", "--addr", &unix])?)?;
    Ok(())
}

/// Checks an OCI layout directory: `oci-layout`, `index.json` → manifest → config and
/// layers, every blob matching its digest; returns the index.
fn check_layout(dir: &Path) -> anyhow::Result<serde_json::Value> {
    use sha2::Digest as _;
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("oci-layout"))?)?;
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let blob = |d: &serde_json::Value| -> anyhow::Result<Vec<u8>> {
        let digest = d["digest"].as_str().context("descriptor without digest")?;
        let hex = digest.strip_prefix("sha256:").context("not sha256")?;
        let data = std::fs::read(dir.join("blobs/sha256").join(hex))
            .with_context(|| format!("blob {digest}"))?;
        assert_eq!(
            Some(data.len() as u64),
            d["size"].as_u64(),
            "size of {digest}"
        );
        Ok(data)
    };
    let manifests = index["manifests"].as_array().context("no manifests")?;
    assert!(!manifests.is_empty());
    for m in manifests {
        let manifest: serde_json::Value = serde_json::from_slice(&blob(m)?)?;
        blob(&manifest["config"])?;
        let layers = manifest["layers"].as_array().context("no layers")?;
        assert!(!layers.is_empty());
        for l in layers {
            blob(l)?;
        }
    }
    // Every blob in the directory verifies by digest, and nothing else is left there.
    for e in std::fs::read_dir(dir.join("blobs/sha256"))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let got = hex::encode(sha2::Sha256::digest(std::fs::read(e.path())?));
        assert_eq!(got, name, "blob {name} does not match its digest");
    }
    Ok(index)
}

#[test]
fn daemon_writes_oci_layout_directories_through_the_session_content_store() -> anyhow::Result<()> {
    let (reg, run, unix, _daemon) = unix_daemon()?;
    let dir = context_dir()?;
    let ctx = dir.path().to_str().context("path")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let layout = run.path().join("layout");
    let out = format!("type=oci,dest={},tar=false", layout.display());
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        &out,
        ctx,
    ])?)?;
    let index = check_layout(&layout)?;
    let manifests = index["manifests"].as_array().context("manifests")?;
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let first = manifests[0]["digest"].clone();
    // skopeo reads it.
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}", layout.display())])
        .output()?;
    assert!(
        inspect.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    assert_eq!(info["Digest"], first);

    // A named build into the same layout: blobs already there are skipped, the index
    // gains the named entry and keeps `latest`.
    let named = format!("{out},name=example.com/kiln/app:v2");
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        &named,
        ctx,
    ])?)?;
    let index = check_layout(&layout)?;
    let manifests = index["manifests"].as_array().context("manifests")?;
    assert_eq!(manifests.len(), 2, "{index}");
    let tagged = manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "v2")
        .context("no v2 entry")?;
    assert_eq!(
        tagged["annotations"]["io.containerd.image.name"],
        "example.com/kiln/app:v2"
    );
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:v2", layout.display())])
        .output()?;
    assert!(
        inspect.status.success(),
        "skopeo inspect :v2: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );

    // Daemonless, the same flags give the same layout.
    let root = tempfile::tempdir()?;
    let local_layout = run.path().join("local-layout");
    let out = format!("type=oci,dest={},tar=false", local_layout.display());
    ok(kiln(&[
        "build",
        "--root",
        root.path().to_str().context("path")?,
        "--build-arg",
        &arg,
        "-o",
        &out,
        ctx,
    ])?)?;
    let index = check_layout(&local_layout)?;
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(1));
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}", local_layout.display())])
        .output()?;
    assert!(
        inspect.status.success(),
        "skopeo inspect (daemonless): {}",
        String::from_utf8_lossy(&inspect.stderr)
    );

    // Two tar=false outputs share one store: refused, naming the flag.
    let other = format!(
        "type=docker,dest={},tar=false",
        run.path().join("b").display()
    );
    let two = kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        &out,
        "-o",
        &other,
        ctx,
    ])?;
    assert!(!two.status.success());
    assert!(
        String::from_utf8_lossy(&two.stderr).contains("tar=false"),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
    Ok(())
}

#[test]
fn daemon_exports_and_imports_local_caches_through_the_session() -> anyhow::Result<()> {
    use sha2::Digest as _;
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let run = tempfile::tempdir()?;
    let dir = context_dir()?;
    let ctx = dir.path().to_str().context("path")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let cache = run.path().join("cache");
    let export = format!("type=local,dest={},mode=max", cache.display());
    let meta = run.path().join("meta.json");
    {
        let unix = format!("unix://{}", run.path().join("a.sock").display());
        let _daemon = Daemon::start(&["--addr", &unix])?;
        ok(kiln(&[
            "build",
            "--addr",
            &unix,
            "--build-arg",
            &arg,
            "--export-cache",
            &export,
            "--metadata-file",
            meta.to_str().context("path")?,
            ctx,
        ])?)?;
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json"))?)?;
    let manifests = index["manifests"].as_array().context("manifests")?;
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let digest = manifests[0]["digest"].as_str().context("digest")?;
    let hex = digest.trim_start_matches("sha256:");
    assert!(cache.join("blobs/sha256").join(hex).is_file());
    // `cache.manifest` is the descriptor as plain JSON, as BuildKit sends it (buildctl
    // parses it that way to update index.json).
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta)?)?;
    let sent = meta["cache.manifest"].as_str().context("cache.manifest")?;
    let desc: serde_json::Value = serde_json::from_str(sent)?;
    assert_eq!(desc["digest"], digest, "{sent}");
    let mut blobs = 0;
    for e in std::fs::read_dir(cache.join("blobs/sha256"))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let got = hex::encode(sha2::Sha256::digest(std::fs::read(e.path())?));
        assert_eq!(got, name, "blob {name} does not match its digest");
        blobs += 1;
    }
    assert!(blobs >= 3, "{blobs} blobs");

    // A fresh daemon imports it from the client: the RUN steps are cached.
    let unix = format!("unix://{}", run.path().join("b.sock").display());
    let _daemon = Daemon::start(&["--addr", &unix])?;
    let import = format!("type=local,src={}", cache.display());
    let out = ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--progress",
        "rawjson",
        "--build-arg",
        &arg,
        "--import-cache",
        &import,
        ctx,
    ])?)?;
    let vertices = rawjson_vertices(&out.stderr)?;
    let runs: Vec<_> = vertices
        .iter()
        .filter(|v| v["name"].as_str().unwrap_or_default().contains("RUN"))
        .collect();
    assert!(!runs.is_empty(), "{vertices:?}");
    for v in runs {
        assert_eq!(v["cached"], true, "not cached from the local cache: {v}");
    }

    // An import of a directory without a cache is a miss, not a failure.
    let empty = run.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let import = format!("type=local,src={}", empty.display());
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "--import-cache",
        &import,
        ctx,
    ])?)?;
    Ok(())
}
