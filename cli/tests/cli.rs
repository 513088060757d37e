//! `kiln` as scripts use it: the real binary, daemonless, against a registry on 127.0.0.1.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{anyhow, bail};
use kiln_e2e::registry::Registry;

#[path = "cli/auth.rs"]
mod auth;
#[path = "cli/daemon.rs"]
mod daemon;
#[path = "cli/remote.rs"]
mod remote;
#[path = "cli/session.rs"]
mod session;
#[path = "cli/ssh.rs"]
mod ssh;

fn kiln(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()?)
}

fn ok(out: Output) -> anyhow::Result<Output> {
    if !out.status.success() {
        bail!(
            "kiln failed: {}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[test]
fn version() -> anyhow::Result<()> {
    let out = ok(kiln(&["--version"])?)?;
    let s = String::from_utf8(out.stdout)?;
    assert!(s.starts_with("kiln "), "{s}");
    Ok(())
}

/// Every stderr line of `--progress rawjson` is a JSON status object; returns the last
/// state of each vertex.
fn rawjson_vertices(stderr: &[u8]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut last = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(stderr).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("not JSON: {line:?}: {e}"))?;
        for vx in v["vertexes"].as_array().cloned().unwrap_or_default() {
            let d = vx["digest"].as_str().unwrap_or_default().to_string();
            last.insert(d, vx);
        }
    }
    Ok(last.into_values().collect())
}

const DOCKERFILE: &str = "ARG BASE\nFROM ${BASE} AS a\nRUN echo a > /a\nFROM ${BASE}\nCOPY --from=a /a /a\nCOPY f.txt /f.txt\nRUN cat /a /f.txt > /both\n";

#[test]
fn buildctl_flags_rawjson_and_metadata() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE)?;
    std::fs::write(dir.path().join("f.txt"), "f\n")?;
    let root = tempfile::tempdir()?;
    let meta = root.path().join("meta.json");
    let ctx = format!("context={}", dir.path().display());
    let dfl = format!("dockerfile={}", dir.path().display());
    let arg = format!("build-arg:BASE={}/kiln/base:1", reg.addr());
    let name = format!("{}/kiln/cli:1", reg.addr());
    let output = format!("type=image,name={name},push=true");
    let args = [
        "build",
        "--root",
        root.path().to_str().unwrap_or_default(),
        "--frontend",
        "dockerfile.v0",
        "--local",
        &ctx,
        "--local",
        &dfl,
        "--opt",
        &arg,
        "--output",
        &output,
        "--metadata-file",
        meta.to_str().unwrap_or_default(),
        "--progress",
        "rawjson",
    ];
    let first = ok(kiln(&args)?)?;
    let vertices = rawjson_vertices(&first.stderr)?;
    assert!(vertices
        .iter()
        .any(|v| v["name"].as_str().unwrap_or_default().contains("RUN cat")));
    for v in &vertices {
        assert!(v["completed"].is_string(), "not completed: {v}");
        assert!(v.get("error").is_none(), "failed: {v}");
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta)?)?;
    let digest = m["containerimage.digest"]
        .as_str()
        .ok_or_else(|| anyhow!("no digest in {m}"))?
        .to_string();
    assert_eq!(m["containerimage.descriptor"]["digest"], digest.as_str());
    assert_eq!(m["image.name"], name.as_str());
    assert!(m["containerimage.config.digest"].is_string());
    assert_eq!(String::from_utf8(first.stdout)?.trim(), digest);

    // Unchanged rebuild: every LLB vertex is cached, the digest is the same.
    let second = ok(kiln(&args)?)?;
    for v in rawjson_vertices(&second.stderr)? {
        let name = v["name"].as_str().unwrap_or_default();
        if name.starts_with("[internal]") || name.starts_with("exporting") {
            continue;
        }
        assert_eq!(v["cached"], true, "not cached on rebuild: {v}");
    }
    let m2: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta)?)?;
    assert_eq!(m2["containerimage.digest"], digest.as_str());
    Ok(())
}

#[test]
fn docker_style_short_form() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir(dir.path().join("df"))?;
    std::fs::write(dir.path().join("df/Build.dockerfile"), DOCKERFILE)?;
    std::fs::write(dir.path().join("f.txt"), "f\n")?;
    let root = tempfile::tempdir()?;
    let out = root.path().join("out");
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let file = dir.path().join("df/Build.dockerfile");
    let dest = format!("type=local,dest={}", out.display());
    ok(kiln(&[
        "build",
        "--root",
        root.path().to_str().unwrap_or_default(),
        "--progress",
        "plain",
        "-f",
        file.to_str().unwrap_or_default(),
        "--build-arg",
        &arg,
        "-o",
        &dest,
        dir.path().to_str().unwrap_or_default(),
    ])?)?;
    assert_eq!(std::fs::read_to_string(out.join("both"))?, "a\nf\n");
    Ok(())
}

#[test]
fn bad_flags_are_named() -> anyhow::Result<()> {
    let out = kiln(&[
        "build",
        "--root",
        "/tmp/kiln-unused",
        "-o",
        "type=nope,dest=x",
        ".",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("type=nope"), "{err}");
    let out = kiln(&["build", "--addr", "tcp://127.0.0.1:1", "."])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting to tcp://127.0.0.1:1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Path::new(".");
    Ok(())
}

/// Reads the child's stderr (plain progress) until a line names `step`; returns the reader
/// positioned after it.
fn read_until_step(
    child: &mut std::process::Child,
    step: &str,
) -> anyhow::Result<std::io::BufReader<std::process::ChildStderr>> {
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut reader = std::io::BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
            bail!("build ended before the step {step:?} started");
        }
        if line.contains(step) {
            return Ok(reader);
        }
    }
}

#[test]
fn kill_9_mid_run_leaves_a_store_that_builds_correctly() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    let df =
        "ARG BASE\nFROM ${BASE}\nRUN echo before > /before\nRUN sleep 2 && echo slow > /slow\n";
    std::fs::write(dir.path().join("Dockerfile"), df)?;
    let root = tempfile::tempdir()?;
    let out = root.path().join("out");
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let dest = format!("type=local,dest={}", out.display());
    let args = [
        "build",
        "--root",
        root.path().to_str().unwrap_or_default(),
        "--progress",
        "plain",
        "--build-arg",
        &arg,
        "-o",
        &dest,
        dir.path().to_str().unwrap_or_default(),
    ];
    // Kill the build while `sleep 2` runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let _progress = read_until_step(&mut child, "RUN sleep 2")?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill()?;
    child.wait()?;
    // The store opens, the finished step is reused, the killed one runs again.
    let again = ok(kiln(&args)?)?;
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(log.contains("CACHED"), "{log}");
    assert_eq!(std::fs::read_to_string(out.join("slow"))?, "slow\n");
    assert_eq!(std::fs::read_to_string(out.join("before"))?, "before\n");
    Ok(())
}

#[test]
fn sigterm_mid_run_cancels_the_build_and_stops_its_container() -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN sleep 600\n",
    )?;
    let root = tempfile::tempdir()?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--root"])
        .arg(root.path())
        .args(["--progress", "plain", "--build-arg", &arg])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut reader = read_until_step(&mut child, "RUN sleep 600")?;
    // Give runc time to start the container, then send what `timeout` and Kubernetes send.
    let runc_root = root.path().join("executor/runc");
    let running = || -> anyhow::Result<String> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    for _ in 0..100 {
        if !running()?.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !running()?.is_empty(),
        "the RUN step's container never started"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest)?;
    let status = child.wait()?;
    assert!(!status.success(), "a cancelled build exited 0");
    assert!(rest.to_lowercase().contains("cancel"), "{rest}");
    assert_eq!(running()?, "", "a container outlived the cancelled build");
    Ok(())
}

#[test]
fn addr_builds_on_a_daemon_over_a_session() -> anyhow::Result<()> {
    use kiln_worker::control::service::ControlService;
    use kiln_worker::control::{Engine, EngineConfig};

    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let state = tempfile::tempdir()?;
    let sock = state.path().join("kiln.sock");
    // The daemon runs in this test process, as `kiln-worker --addr unix://…` would.
    let rt = tokio::runtime::Runtime::new()?;
    let engine = Engine::open(EngineConfig {
        root: state.path().join("root"),
        ..Default::default()
    })?;
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&sock) })?;
    let control = ControlService::new(std::sync::Arc::new(engine), "w0");
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(control.clone().into_server())
            .add_service(control.into_bridge_server())
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE)?;
    std::fs::write(dir.path().join("f.txt"), "f\n")?;
    let addr = format!("unix://{}", sock.display());
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let name = format!("{}/kiln/remote:1", reg.addr());
    let out = ok(kiln(&[
        "build",
        "--addr",
        &addr,
        "--progress",
        "rawjson",
        "--build-arg",
        &arg,
        "-t",
        &name,
        "--push",
        dir.path().to_str().unwrap_or_default(),
    ])?)?;
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let vertices = rawjson_vertices(&out.stderr)?;
    assert!(
        vertices
            .iter()
            .any(|v| v["name"].as_str().unwrap_or_default().contains("RUN cat")),
        "{vertices:?}"
    );
    // The image is in the registry under that digest.
    let manifest = kiln_e2e::http::get(
        &reg.addr(),
        &format!("/v2/kiln/remote/manifests/{digest}"),
        &[(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
        )],
    )?;
    assert_eq!(manifest.status, 200);
    drop(rt);
    Ok(())
}
