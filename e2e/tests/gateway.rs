//! The gateway in front of a real fleet on loopback: a real `docker-registry`, three
//! `kiln-worker` processes and one `kiln-gateway`, driven by `kiln build --addr`.
//! Twelve projects built twice each: the second build is fully cached and ran on the same
//! worker as the first, and the projects spread over all three workers. Then one worker
//! is killed: only its projects move, the others stay on their workers, fully cached.
//! Which worker ran a build is read from the gateway's `kiln_gateway_builds_total{worker}`
//! counter (builds run one at a time).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context};
use kiln_e2e::fleet::{self, Proc};
use kiln_e2e::registry::Registry;

const PROJECTS: usize = 12;

struct Fleet {
    bins: std::path::PathBuf,
    gateway_addr: String,
    metrics_addr: String,
    registry: String,
}

impl Fleet {
    fn scrape(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let r = kiln_e2e::http::get(&self.metrics_addr, "/metrics", &[])?;
        if r.status != 200 {
            bail!("/metrics answered {}", r.status);
        }
        let text = String::from_utf8(r.body)?;
        Ok(fleet::counters(
            &text,
            "kiln_gateway_builds_total",
            "worker",
        ))
    }

    /// Builds project `i` through the gateway; returns the worker that ran it and whether
    /// every step came from the cache.
    fn build(&self, dir: &Path, i: usize) -> anyhow::Result<(String, bool)> {
        let before = self.scrape()?;
        let ctx = format!("context={}", dir.display());
        let dfl = format!("dockerfile={}", dir.display());
        let arg = format!("build-arg:BASE={}/kiln/base:1", self.registry);
        let key = format!("kiln.route-key=project-{i}");
        let output = format!("type=image,name={}/kiln/p{i}:1,push=true", self.registry);
        let out = Command::new(self.bins.join("kiln"))
            .args(["build", "--addr", &format!("tcp://{}", self.gateway_addr)])
            .args([
                "--frontend",
                "dockerfile.v0",
                "--local",
                &ctx,
                "--local",
                &dfl,
            ])
            .args(["--opt", &arg, "--opt", &key, "--output", &output])
            .args(["--progress", "rawjson"])
            .output()?;
        ok(&out, &format!("project {i}"))?;
        let after = self.scrape()?;
        let ran: Vec<&String> = after
            .iter()
            .filter(|(w, n)| **n > before.get(*w).copied().unwrap_or(0.0))
            .map(|(w, _)| w)
            .collect();
        let [worker] = ran.as_slice() else {
            bail!("project {i}: expected one worker to count the build, got {ran:?}");
        };
        let mut cached = true;
        let mut runs = 0;
        for v in rawjson_vertices(&out.stderr)? {
            let name = v["name"].as_str().unwrap_or_default();
            if name.starts_with("[internal]") || name.starts_with("exporting") {
                continue;
            }
            if name.contains("RUN") {
                runs += 1;
            }
            cached &= v["cached"] == true;
        }
        if runs != 1 {
            bail!("project {i}: expected one RUN step in the progress, saw {runs}");
        }
        Ok(((*worker).clone(), cached))
    }
}

fn ok(out: &Output, what: &str) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!(
            "kiln build of {what} failed: {}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The last state of each vertex in `--progress rawjson` output.
fn rawjson_vertices(stderr: &[u8]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut last = BTreeMap::new();
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

#[test]
fn twelve_projects_stick_to_their_workers() -> anyhow::Result<()> {
    let bins = fleet::ensure_binaries()?;
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;

    let mut workers: BTreeMap<String, Proc> = BTreeMap::new();
    let mut members = Vec::new();
    for i in 0..3 {
        let name = format!("w{i}");
        let root = tmp.path().join(&name);
        std::fs::create_dir_all(&root)?;
        let port = fleet::free_port()?;
        workers.insert(
            name.clone(),
            fleet::start_worker(&bins, &name, port, &root)?,
        );
        members.push(format!("{name}=tcp://127.0.0.1:{port}"));
    }
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let gateway = fleet::start_gateway(&bins, gport, mport, &members, tmp.path())?;
    let f = Fleet {
        bins,
        gateway_addr: format!("127.0.0.1:{gport}"),
        metrics_addr: format!("127.0.0.1:{mport}"),
        registry: reg.addr(),
    };

    let mut dirs = Vec::new();
    for i in 0..PROJECTS {
        let d = tmp.path().join(format!("project-{i}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("Dockerfile"),
            format!("ARG BASE\nFROM ${{BASE}}\nRUN echo project-{i} > /p\n"),
        )?;
        dirs.push(d);
    }

    let result = (|| -> anyhow::Result<()> {
        // First and second build of every project.
        let mut home = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let (w1, cached1) = f.build(d, i)?;
            assert!(!cached1, "project {i}: first build was cached");
            let (w2, cached2) = f.build(d, i)?;
            assert_eq!(w1, w2, "project {i}: rebuilt on another worker");
            assert!(cached2, "project {i}: rebuild on {w2} was not fully cached");
            home.push(w1);
        }
        let used: BTreeSet<&String> = home.iter().collect();
        assert_eq!(
            used.len(),
            3,
            "projects did not spread over the three workers: {home:?}"
        );
        // Node-wide calls through the gateway: every worker listed, and disk usage
        // aggregated over all of them with records naming their worker.
        let kiln = |cmd: &str| -> anyhow::Result<String> {
            let out = Command::new(f.bins.join("kiln"))
                .args([cmd, "--addr", &format!("tcp://{}", f.gateway_addr)])
                .output()?;
            ok(&out, &format!("kiln {cmd}"))?;
            Ok(String::from_utf8(out.stdout)?)
        };
        let listed = kiln("workers")?;
        let du = kiln("du")?;
        for w in &used {
            assert!(
                listed.contains(w.as_str()),
                "kiln workers lacks {w}: {listed}"
            );
            assert!(
                du.contains(&format!("{w}/")),
                "kiln du lacks records of {w}: {du}"
            );
        }

        // Kill the worker with the most projects: only its projects move.
        let victim = used
            .iter()
            .max_by_key(|w| home.iter().filter(|h| h == *w).count())
            .map(|w| w.to_string())
            .context("no worker")?;
        eprintln!("projects per worker: {home:?}; killing {victim}");
        if let Some(mut p) = workers.remove(&victim) {
            p.kill();
        }
        for (i, d) in dirs.iter().enumerate() {
            let (w, cached) = f.build(d, i)?;
            eprintln!("after the kill: project {i} on {w} (cached: {cached})");
            if home[i] == victim {
                assert_ne!(w, victim, "project {i} still routed to the dead worker");
                assert!(
                    !cached,
                    "project {i} moved to {w}, which never built it, yet was cached"
                );
            } else {
                assert_eq!(w, home[i], "project {i} moved although its worker lives");
                assert!(cached, "project {i}: not cached on its worker {w}");
            }
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("gateway log:\n{}", gateway.output());
        for (n, w) in &workers {
            eprintln!("{n} log:\n{}", w.output());
        }
    }
    result
}

/// The whole chain over mutual TLS: `kiln` → gateway (client certificate checked) →
/// worker (the gateway's own client certificate checked). Plaintext and certificate-less
/// clients are refused, and a gateway without a client certificate cannot reach the worker.
#[test]
fn mutual_tls_from_client_through_gateway_to_worker() -> anyhow::Result<()> {
    let bins = fleet::ensure_binaries()?;
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let dir = tempfile::tempdir()?;
    let mtls = fleet::MtlsFleet::start(&bins, dir.path())?;
    let (user, gport) = (&mtls.user, mtls.gateway_port);
    let workers = [mtls.worker_member.clone()];

    let project = dir.path().join("project");
    std::fs::create_dir_all(&project)?;
    std::fs::write(
        project.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN echo over-mtls > /m\n",
    )?;
    let addr = format!("tcp://127.0.0.1:{gport}");
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let name = format!("{}/kiln/mtls-fleet:1", reg.addr());
    let p = |p: &Path| p.display().to_string();
    let kiln = |tls: &[String]| -> anyhow::Result<Output> {
        Ok(Command::new(bins.join("kiln"))
            .args(["build", "--addr", &addr])
            .args(tls)
            .args(["--build-arg", &arg, "-t", &name, "--push"])
            .arg(&project)
            .output()?)
    };
    let with_cert = [
        "--tlscacert".to_string(),
        p(&user.ca),
        "--tlscert".into(),
        p(&user.cert),
        "--tlskey".into(),
        p(&user.key),
    ];
    let out = kiln(&with_cert)?;
    ok(&out, "the mTLS build")?;
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    if !digest.starts_with("sha256:") {
        bail!("no digest on stdout: {digest:?}");
    }
    let out = kiln(&["--tlscacert".to_string(), p(&user.ca)])?;
    if out.status.success() {
        bail!("a client without a certificate was served by the gateway");
    }
    let out = kiln(&[])?;
    if out.status.success() {
        bail!("a plaintext client was served by the gateway");
    }

    // A gateway that presents no client certificate is refused by the worker.
    let (g2, m2) = (fleet::free_port()?, fleet::free_port()?);
    let logs = dir.path().join("g2");
    std::fs::create_dir_all(&logs)?;
    let _bare = {
        let mut cmd = Command::new(bins.join("kiln-gateway"));
        cmd.args(["--addr", &format!("tcp://127.0.0.1:{g2}"), "--insecure-tcp"])
            .args(["--workers", &workers[0]])
            .args(["--worker-tlscacert", &p(&user.ca)])
            .args(["--metrics-addr", &format!("127.0.0.1:{m2}")]);
        let mut proc = Proc::spawn("bare-gateway", cmd, &logs.join("gateway.log"))?;
        fleet::wait_for_port(
            &format!("127.0.0.1:{g2}"),
            std::time::Duration::from_secs(60),
        )
        .with_context(|| proc.output())?;
        proc.check_running()?;
        proc
    };
    let out = Command::new(bins.join("kiln"))
        .args(["build", "--addr", &format!("tcp://127.0.0.1:{g2}")])
        .args(["--build-arg", &arg, "-t", &name])
        .arg(&project)
        .output()?;
    if out.status.success() {
        bail!("a worker served a gateway that has no client certificate");
    }
    Ok(())
}
