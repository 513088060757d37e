//! Certificate rotation under load: a gateway and a worker over mutual TLS have every
//! certificate re-issued (files replaced by rename, as a mounted Secret update does) while a
//! build runs through them. The build finishes; the next handshakes present the new
//! certificates; the next build works. No process is restarted.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln_e2e::fleet;
use kiln_e2e::pki::{Ca, Identity};
use kiln_e2e::registry::Registry;

/// The SHA-256 fingerprint of the certificate in `pem`.
fn fingerprint_of_file(pem: &Path) -> anyhow::Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl x509 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The fingerprint of the certificate a server on 127.0.0.1:`port` presents to a client
/// with identity `id` (a fresh handshake).
fn fingerprint_served(port: u16, id: &Identity) -> anyhow::Result<String> {
    let connect = format!("127.0.0.1:{port}");
    let s_client = Command::new("openssl")
        .args(["s_client", "-connect", &connect, "-servername", "localhost"])
        .arg("-CAfile")
        .arg(&id.ca)
        .arg("-cert")
        .arg(&id.cert)
        .arg("-key")
        .arg(&id.key)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running openssl s_client")?;
    let pem = String::from_utf8_lossy(&s_client.stdout).to_string();
    let start = pem
        .find("-----BEGIN CERTIFICATE-----")
        .with_context(|| format!("no certificate from {connect}: {pem}"))?;
    let end = pem[start..]
        .find("-----END CERTIFICATE-----")
        .map(|e| start + e + "-----END CERTIFICATE-----".len())
        .context("truncated certificate")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("served.pem");
    std::fs::write(&file, &pem[start..end])?;
    fingerprint_of_file(&file)
}

fn ok(out: &Output, what: &str) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn certificates_rotate_under_a_running_build_without_restarts() -> anyhow::Result<()> {
    let bins = fleet::ensure_binaries()?;
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("kiln rotation CA")?;
    let pki = dir.path().join("pki");
    let sans = ["localhost", "127.0.0.1"];
    let worker_id = ca.server(&pki, "worker", &sans)?;
    let gateway_id = ca.server(&pki, "gateway", &sans)?;
    let gateway_client = ca.client(&pki, "gateway-client")?;
    let user = ca.client(&pki, "user")?;
    let wport = fleet::free_port()?;
    let mut worker = fleet::start_worker_tls(&bins, "w0", wport, dir.path(), Some(&worker_id))?;
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let member = format!("w0=tcp://127.0.0.1:{wport}");
    let mut gateway = fleet::start_gateway_tls(
        &bins,
        gport,
        mport,
        std::slice::from_ref(&member),
        dir.path(),
        Some((&gateway_id, &gateway_client)),
    )?;
    let old_gateway = fingerprint_of_file(&gateway_id.cert)?;
    let old_worker = fingerprint_of_file(&worker_id.cert)?;
    assert_eq!(fingerprint_served(gport, &user)?, old_gateway);

    let project = dir.path().join("project");
    std::fs::create_dir_all(&project)?;
    std::fs::write(
        project.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN sleep 6 && echo rotated > /r\n",
    )?;
    let addr = format!("tcp://127.0.0.1:{gport}");
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let out_dir = dir.path().join("out");
    let build = |dest: &Path| {
        Command::new(bins.join("kiln"))
            .args(["build", "--addr", &addr])
            .arg("--tlscacert")
            .arg(&user.ca)
            .arg("--tlscert")
            .arg(&user.cert)
            .arg("--tlskey")
            .arg(&user.key)
            .args(["--build-arg", &arg, "-o"])
            .arg(format!("type=local,dest={}", dest.display()))
            .arg(&project)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    let running = build(&out_dir)?;
    // Wait for the RUN step's container on the worker, then re-issue every certificate.
    let containers = dir.path().join("state/executor/runc");
    let start = Instant::now();
    while std::fs::read_dir(&containers).map_or(true, |mut d| d.next().is_none()) {
        worker.check_running()?;
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the RUN step never started:\n{}", worker.output());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let worker_id = ca.server(&pki, "worker", &sans)?;
    let gateway_id = ca.server(&pki, "gateway", &sans)?;
    let gateway_client = ca.client(&pki, "gateway-client")?;
    let user = ca.client(&pki, "user")?;
    let new_gateway = fingerprint_of_file(&gateway_id.cert)?;
    let new_worker = fingerprint_of_file(&worker_id.cert)?;
    assert_ne!(new_gateway, old_gateway);
    assert_ne!(new_worker, old_worker);

    // The build that spans the rotation finishes.
    let out = running.wait_with_output()?;
    ok(&out, "the build across the rotation")?;
    assert_eq!(std::fs::read_to_string(out_dir.join("r"))?, "rotated\n");
    // New handshakes get the new certificates, and the new client certificates are accepted
    // (the worker checks the gateway's, the gateway the user's).
    assert_eq!(fingerprint_served(gport, &user)?, new_gateway);
    assert_eq!(fingerprint_served(wport, &gateway_client)?, new_worker);
    // And the next build goes through with the new identities.
    std::fs::write(
        project.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN echo after > /a\n",
    )?;
    let out_dir2 = dir.path().join("out2");
    let out = build(&out_dir2)?.wait_with_output()?;
    ok(&out, "the build after the rotation")?;
    assert_eq!(std::fs::read_to_string(out_dir2.join("a"))?, "after\n");
    gateway.check_running()?;
    worker.check_running()?;
    Ok(())
}
