//! Per-call latency of the gateway (issue 5, `bench/`): `ListWorkers` and `Status` on ONE
//! kept HTTP/2 connection per path, straight to a `kiln-worker` and through a
//! `kiln-gateway` in front of it, interleaved call by call, printing p50/p99 of each path
//! and what the gateway adds (target: p99 added ≤ 1 ms).
//!
//! `Status` needs a build the worker knows: every batch of calls first runs a tiny LLB
//! build (one `mkfile` on scratch, no session) through the gateway under a fresh ref, so
//! both paths stream the same finished build's progress.
//!
//! Usage (release profile):
//!   `cargo bench -p kiln-gateway --bench latency -- [-n N] [--direct HOST:PORT --gateway HOST:PORT]`
//! Without addresses it starts its own worker and gateway (plaintext loopback TCP) from
//! the release binaries next to it (`bench/gateway.sh` passes the ones it started).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use kiln_proto::moby::buildkit::v1 as api;
use tonic::transport::{Channel, Endpoint};

/// Calls per batch: a batch must finish well within the worker's 10 s keep time of a
/// finished build's progress.
const BATCH: usize = 250;

struct Args {
    n: usize,
    direct: Option<String>,
    gateway: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        n: 2000,
        direct: None,
        gateway: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-n" => a.n = it.next().context("-n needs a number")?.parse()?,
            "--direct" => a.direct = Some(it.next().context("--direct needs HOST:PORT")?),
            "--gateway" => a.gateway = Some(it.next().context("--gateway needs HOST:PORT")?),
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.direct.is_some() != a.gateway.is_some() {
        bail!("give both --direct and --gateway, or neither");
    }
    if a.n == 0 {
        bail!("-n must be at least 1");
    }
    Ok(a)
}

async fn connect(hostport: &str) -> anyhow::Result<api::control_client::ControlClient<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{hostport}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {hostport}"))?;
    Ok(api::control_client::ControlClient::new(ch))
}

async fn list_workers(c: &mut api::control_client::ControlClient<Channel>) -> anyhow::Result<()> {
    let r = c.list_workers(api::ListWorkersRequest::default()).await?;
    if r.get_ref().record.is_empty() {
        bail!("ListWorkers answered no worker");
    }
    Ok(())
}

async fn status(
    c: &mut api::control_client::ControlClient<Channel>,
    r#ref: &str,
) -> anyhow::Result<()> {
    let mut s = c
        .status(api::StatusRequest {
            r#ref: r#ref.to_string(),
        })
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        m?;
        n += 1;
    }
    if n == 0 {
        bail!("Status of {ref} streamed nothing");
    }
    Ok(())
}

async fn timed<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: F,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f.await?;
    Ok(t.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The worker and gateway this run measures: given, or started here.
struct Targets {
    direct: String,
    gateway: String,
    _procs: Vec<kiln_e2e::fleet::Proc>,
    _dir: Option<tempfile::TempDir>,
}

fn targets(a: &Args) -> anyhow::Result<Targets> {
    if let (Some(d), Some(g)) = (&a.direct, &a.gateway) {
        return Ok(Targets {
            direct: d.trim_start_matches("tcp://").to_string(),
            gateway: g.trim_start_matches("tcp://").to_string(),
            _procs: Vec::new(),
            _dir: None,
        });
    }
    use kiln_e2e::fleet;
    let bins: PathBuf = fleet::ensure_binaries()?;
    let dir = tempfile::Builder::new()
        .prefix("kiln-latency-bench")
        .tempdir_in("/var/tmp")?;
    let wport = fleet::free_port()?;
    let worker = fleet::start_worker(&bins, "w0", wport, dir.path())?;
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let gateway = fleet::start_gateway(
        &bins,
        gport,
        mport,
        &[format!("w0=tcp://127.0.0.1:{wport}")],
        dir.path(),
    )?;
    Ok(Targets {
        direct: format!("127.0.0.1:{wport}"),
        gateway: format!("127.0.0.1:{gport}"),
        _procs: vec![worker, gateway],
        _dir: Some(dir),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let t = targets(&a)?;
    let mut direct = connect(&t.direct).await?;
    let mut gw = connect(&t.gateway).await?;
    let def = kiln_e2e::llb::mkfile("/bench", b"gateway latency bench");
    let run = std::process::id();

    // Warm both connections and the worker's cache of the tiny build.
    let warm = format!("latency-{run}-warm");
    gw.solve(api::SolveRequest {
        r#ref: warm.clone(),
        definition: Some(def.clone()),
        ..Default::default()
    })
    .await
    .context("warm-up build through the gateway")?;
    for _ in 0..200 {
        list_workers(&mut direct).await?;
        list_workers(&mut gw).await?;
        status(&mut direct, &warm).await?;
        status(&mut gw, &warm).await?;
    }

    let mut lw = (Vec::with_capacity(a.n), Vec::with_capacity(a.n));
    let mut st = (Vec::with_capacity(a.n), Vec::with_capacity(a.n));
    let mut done = 0;
    let mut batch = 0;
    while done < a.n {
        let r#ref = format!("latency-{run}-{batch}");
        batch += 1;
        gw.solve(api::SolveRequest {
            r#ref: r#ref.clone(),
            definition: Some(def.clone()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("build {ref} through the gateway"))?;
        for i in 0..BATCH.min(a.n - done) {
            // Alternate which path goes first so neither always follows the other.
            if i % 2 == 0 {
                lw.0.push(timed(list_workers(&mut direct)).await?);
                lw.1.push(timed(list_workers(&mut gw)).await?);
                st.0.push(timed(status(&mut direct, &r#ref)).await?);
                st.1.push(timed(status(&mut gw, &r#ref)).await?);
            } else {
                lw.1.push(timed(list_workers(&mut gw)).await?);
                lw.0.push(timed(list_workers(&mut direct)).await?);
                st.1.push(timed(status(&mut gw, &r#ref)).await?);
                st.0.push(timed(status(&mut direct, &r#ref)).await?);
            }
        }
        done += BATCH.min(a.n - done);
    }

    println!(
        "{:<12} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "rpc", "calls", "direct p50", "gw p50", "direct p99", "gw p99"
    );
    let mut worst_added = Duration::ZERO;
    for (name, (mut d, mut g)) in [("ListWorkers", lw), ("Status", st)] {
        d.sort();
        g.sort();
        let (d50, g50, d99, g99) = (pct(&d, 0.5), pct(&g, 0.5), pct(&d, 0.99), pct(&g, 0.99));
        println!(
            "{name:<12} {:>8} {:>9.3}ms {:>8.3}ms {:>8.3}ms {:>8.3}ms   added p50 {:.3} ms, p99 {:.3} ms",
            d.len(),
            ms(d50),
            ms(g50),
            ms(d99),
            ms(g99),
            ms(g50.saturating_sub(d50)),
            ms(g99.saturating_sub(d99)),
        );
        worst_added = worst_added.max(g99.saturating_sub(d99));
    }
    println!(
        "p99 added latency (worst rpc) = {:.3} ms  (target <= 1 ms: {})",
        ms(worst_added),
        if worst_added <= Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
