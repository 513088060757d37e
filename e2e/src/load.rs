//! The load harness (issue 8 item 1): a real `docker-registry`, three `kiln-worker`s and
//! one `kiln-gateway` on loopback, driven by many concurrent `kiln build --addr` processes
//! for a bounded time with a mix of fully cached, partly cached (one changed file, so one
//! COPY and one RUN re-run) and cold projects. Reports builds/s, latency percentiles per
//! kind, errors, cache misses of the cached builds, the gateway's per-worker in-flight
//! builds and queue depth (sampled from its `/metrics`), and the ratio of the p99 of a
//! cached build under load to its unloaded median. Used by the `kiln-load` binary.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::fleet::{self, Proc};
use crate::registry::Registry;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of `kiln`, `kiln-worker` and `kiln-gateway`.
    pub bins: PathBuf,
    /// Concurrent clients, each running one build after another.
    pub clients: usize,
    /// How long clients start new builds.
    pub duration: Duration,
    /// Workers behind the gateway.
    pub workers: usize,
    /// The gateway's `--max-builds-per-worker`.
    pub max_builds: usize,
    /// Distinct fully cached projects.
    pub cached_projects: usize,
    /// Distinct partly cached projects (each build changes one file of a copy).
    pub partial_projects: usize,
    /// Percent of builds that are fully cached; the rest splits into partial and cold.
    pub cached_pct: u32,
    /// Percent of builds that are partly cached.
    pub partial_pct: u32,
    /// Sequential cached builds measured before the load (their median is the baseline).
    pub unloaded_runs: usize,
    /// Where the fleet's state and logs go (a fresh directory under it).
    pub work_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bins: PathBuf::new(),
            clients: 50,
            duration: Duration::from_secs(60),
            workers: 3,
            max_builds: 8,
            cached_projects: 12,
            partial_projects: 6,
            cached_pct: 80,
            partial_pct: 15,
            unloaded_runs: 10,
            work_dir: PathBuf::from("/var/tmp"),
        }
    }
}

/// The kind of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An unchanged, already built project: every step from the cache.
    Cached,
    /// A built project with one changed file: its COPY and the RUN after it re-run.
    Partial,
    /// A project never built: its RUN runs.
    Cold,
}

impl Kind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cached => "cached",
            Kind::Partial => "partial",
            Kind::Cold => "cold",
        }
    }
}

/// One finished build.
#[derive(Debug, Clone)]
struct Sample {
    kind: Kind,
    took: Duration,
    ok: bool,
    /// A cached build in which some step was not from the cache.
    missed: bool,
}

/// Gauges of one worker sampled from the gateway's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct WorkerLoad {
    /// Highest in-flight count seen.
    pub inflight_max: f64,
    /// Mean in-flight count over the samples.
    pub inflight_mean: f64,
    /// Highest queue depth seen.
    pub queue_max: f64,
    /// Mean queue depth over the samples.
    pub queue_mean: f64,
    /// Builds the gateway sent to it during the load.
    pub builds: f64,
    /// Builds that waited in its queue during the load.
    pub queued_builds: f64,
}

/// Latency percentiles of one kind.
#[derive(Debug, Clone, Default)]
pub struct Percentiles {
    /// Builds that succeeded.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The options it ran with.
    pub options: Options,
    /// Median of the unloaded cached builds.
    pub unloaded: Duration,
    /// Every unloaded cached build, in order.
    pub unloaded_all: Vec<Duration>,
    /// Wall time from the first build of the load to the last one's end.
    pub elapsed: Duration,
    /// Builds finished (successful or not).
    pub builds: usize,
    /// Failed builds.
    pub errors: usize,
    /// The first few failures' messages.
    pub error_samples: Vec<String>,
    /// Cached builds in which some step ran.
    pub cache_misses: usize,
    /// Percentiles by kind.
    pub by_kind: BTreeMap<Kind, Percentiles>,
    /// Gateway gauges by worker.
    pub workers: BTreeMap<String, WorkerLoad>,
    /// Load average (1, 5, 15 min) before and after the load.
    pub loadavg: (String, String),
    /// CPU seconds used during the load, by who: `kiln` clients, each worker (with its
    /// runc children), the gateway.
    pub cpu: BTreeMap<String, f64>,
}

impl Report {
    /// p99 of cached builds under load divided by the unloaded median.
    pub fn cached_ratio(&self) -> f64 {
        let p99 = self
            .by_kind
            .get(&Kind::Cached)
            .map(|p| p.p99)
            .unwrap_or_default();
        p99.as_secs_f64() / self.unloaded.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
        writeln!(
            f,
            "kiln-load: {} clients, {} s, {} workers, --max-builds-per-worker {}, mix {}% cached / {}% partial / {}% cold",
            o.clients,
            o.duration.as_secs(),
            o.workers,
            o.max_builds,
            o.cached_pct,
            o.partial_pct,
            100u32.saturating_sub(o.cached_pct + o.partial_pct)
        )?;
        writeln!(
            f,
            "unloaded cached build: median {} ms over {} runs (all: {:?} ms)",
            ms(self.unloaded),
            self.unloaded_all.len(),
            self.unloaded_all.iter().map(|d| ms(*d)).collect::<Vec<_>>()
        )?;
        writeln!(
            f,
            "builds: {} in {:.1} s = {:.2} builds/s; errors: {}; cached builds not fully cached: {}",
            self.builds,
            self.elapsed.as_secs_f64(),
            self.builds as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.errors,
            self.cache_misses
        )?;
        writeln!(
            f,
            "{:<8} {:>6} {:>8} {:>8} {:>8} {:>8}",
            "kind", "ok", "p50 ms", "p95 ms", "p99 ms", "max ms"
        )?;
        for (k, p) in &self.by_kind {
            writeln!(
                f,
                "{:<8} {:>6} {:>8} {:>8} {:>8} {:>8}",
                k.as_str(),
                p.count,
                ms(p.p50),
                ms(p.p95),
                ms(p.p99),
                ms(p.max)
            )?;
        }
        writeln!(
            f,
            "{:<6} {:>7} {:>13} {:>14} {:>10} {:>11} {:>7}",
            "worker",
            "builds",
            "inflight max",
            "inflight mean",
            "queue max",
            "queue mean",
            "queued"
        )?;
        for (w, l) in &self.workers {
            writeln!(
                f,
                "{:<6} {:>7} {:>13} {:>14.1} {:>10} {:>11.1} {:>7}",
                w,
                l.builds,
                l.inflight_max,
                l.inflight_mean,
                l.queue_max,
                l.queue_mean,
                l.queued_builds
            )?;
        }
        writeln!(
            f,
            "p99(cached under load) / unloaded median = {:.2}x (target <= 3x)",
            self.cached_ratio()
        )?;
        let cpu_total: f64 = self.cpu.values().sum();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        writeln!(
            f,
            "CPU during the load: {:.1} s of {:.1} s available ({:.0}%); per build {:.1} ms: {}",
            cpu_total,
            self.elapsed.as_secs_f64() * cores as f64,
            100.0 * cpu_total / (self.elapsed.as_secs_f64() * cores as f64).max(1e-9),
            1000.0 * cpu_total / (self.builds.max(1) as f64),
            self.cpu
                .iter()
                .map(|(k, v)| format!("{k} {:.1}", 1000.0 * v / self.builds.max(1) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "load average before {} / after {}; {} cores",
            self.loadavg.0,
            self.loadavg.1,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )?;
        for e in &self.error_samples {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

/// The fleet and the projects of one run.
struct Bench {
    /// Process ids of the fleet by name (`w0`…, `kiln-gateway`).
    pids: Vec<(String, u32)>,
    bins: PathBuf,
    gateway: String,
    metrics: String,
    registry: String,
    dir: PathBuf,
    seq: AtomicU64,
}

impl Bench {
    /// Runs one `kiln build` of `dir` with route key `key`; `Ok(missed)` when it succeeded
    /// (`missed`: some non-internal step was not from the cache).
    fn build(&self, dir: &Path, key: &str) -> anyhow::Result<bool> {
        let out = Command::new(self.bins.join("kiln"))
            .args(["build", "--addr", &format!("tcp://{}", self.gateway)])
            .args(["--progress", "rawjson"])
            .args(["--opt", &format!("kiln.route-key={key}")])
            .args([
                "--build-arg",
                &format!("BASE={}/kiln/base:1", self.registry),
            ])
            .arg(dir)
            .output()
            .context("running kiln build")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err
                .lines()
                .filter(|l| !l.starts_with('{'))
                .rev()
                .take(3)
                .collect();
            bail!(
                "{key}: kiln build {}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(!fully_cached(&out.stderr))
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn cached_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("cached-{i}"))
    }

    /// A fresh copy of partial project `j` with its input file changed.
    fn partial_copy(&self, j: usize) -> anyhow::Result<PathBuf> {
        let n = self.next();
        let d = self.dir.join(format!("partial-{j}-{n}"));
        write_partial(&d, j, &format!("change {n}"))?;
        Ok(d)
    }

    /// A project never built before.
    fn cold(&self) -> anyhow::Result<(PathBuf, String)> {
        let n = self.next();
        let d = self.dir.join(format!("cold-{n}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("Dockerfile"),
            format!("ARG BASE\nFROM ${{BASE}}\nRUN echo cold-{n} > /c\n"),
        )?;
        Ok((d, format!("cold-{n}")))
    }

    fn scrape(&self) -> anyhow::Result<String> {
        let r = crate::http::get(&self.metrics, "/metrics", &[])?;
        if r.status != 200 {
            bail!("{}/metrics answered {}", self.metrics, r.status);
        }
        Ok(String::from_utf8(r.body)?)
    }
}

fn write_partial(d: &Path, j: usize, input: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(d)?;
    std::fs::write(
        d.join("Dockerfile"),
        format!(
            "ARG BASE\nFROM ${{BASE}}\nRUN echo partial-{j} > /p\nCOPY input /input\nRUN cat /input > /out\n"
        ),
    )?;
    std::fs::write(d.join("input"), input)?;
    Ok(())
}

/// True when every step in `--progress rawjson` output (`stderr`), internal ones and the
/// export aside, finished from the cache.
fn fully_cached(stderr: &[u8]) -> bool {
    let mut last: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for line in String::from_utf8_lossy(stderr).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for vx in v["vertexes"].as_array().cloned().unwrap_or_default() {
            let d = vx["digest"].as_str().unwrap_or_default().to_string();
            last.insert(d, vx);
        }
    }
    last.values().all(|v| {
        let name = v["name"].as_str().unwrap_or_default();
        name.starts_with("[internal]") || name.starts_with("exporting") || v["cached"] == true
    })
}

/// A small deterministic generator (xorshift64*), one per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort();
    // Nearest rank.
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        count: v.len(),
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

/// CPU seconds of process `pid` (`self` for this one): its own and, with `children`, that
/// of its reaped children instead (`/proc/PID/stat`, in USER_HZ = 100 ticks).
fn cpu_seconds(pid: &str, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3; utime, stime,
    // cutime, cstime are fields 14-17.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 4 {
        return 0.0;
    }
    let ticks = if children {
        f[2] + f[3]
    } else {
        f[0] + f[1] + f[2] + f[3]
    };
    ticks / 100.0
}

/// CPU seconds so far: `kiln` clients (this process's reaped children) and each fleet
/// process with its own children.
fn cpu_now(bench: &Bench) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("clients".to_string(), cpu_seconds("self", true));
    for (name, pid) in &bench.pids {
        m.insert(name.clone(), cpu_seconds(&pid.to_string(), false));
    }
    m
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Starts the fleet, prepares and warms the projects, measures the unloaded cached build,
/// drives the load and reports. The fleet is stopped when it returns.
pub fn run(o: &Options) -> anyhow::Result<Report> {
    if o.clients == 0 || o.workers == 0 || o.cached_projects == 0 || o.partial_projects == 0 {
        bail!("clients, workers and project counts must be at least 1");
    }
    if o.cached_pct + o.partial_pct > 100 {
        bail!(
            "--cached-pct {} + --partial-pct {} exceed 100",
            o.cached_pct,
            o.partial_pct
        );
    }
    for b in fleet::BINARIES {
        if !o.bins.join(b).is_file() {
            bail!(
                "{}: missing (build the release binaries first)",
                o.bins.join(b).display()
            );
        }
    }
    std::fs::create_dir_all(&o.work_dir)?;
    let tmp = tempfile::Builder::new()
        .prefix("kiln-load.")
        .tempdir_in(&o.work_dir)
        .with_context(|| format!("temporary directory in {}", o.work_dir.display()))?;
    let reg = Registry::start()?;
    crate::base::push_base(&reg.addr(), "kiln/base:1")?;
    let mut procs: Vec<Proc> = Vec::new();
    let mut members = Vec::new();
    for i in 0..o.workers {
        let name = format!("w{i}");
        let root = tmp.path().join(&name);
        std::fs::create_dir_all(&root)?;
        let port = fleet::free_port()?;
        procs.push(fleet::start_worker(&o.bins, &name, port, &root)?);
        members.push(format!("{name}=tcp://127.0.0.1:{port}"));
    }
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    procs.push(fleet::start_gateway_opts(
        &o.bins,
        gport,
        mport,
        &members,
        tmp.path(),
        None,
        &[
            "--max-builds-per-worker".to_string(),
            o.max_builds.to_string(),
            "--log".to_string(),
            "warn".to_string(),
        ],
    )?);
    let projects = tmp.path().join("projects");
    let bench = Arc::new(Bench {
        pids: procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.id()?)))
            .collect(),
        bins: o.bins.clone(),
        gateway: format!("127.0.0.1:{gport}"),
        metrics: format!("127.0.0.1:{mport}"),
        registry: reg.addr(),
        dir: projects.clone(),
        seq: AtomicU64::new(0),
    });
    let res = drive(o, &bench);
    if res.is_err() {
        for p in &procs {
            eprintln!("--- {} log tail ---", p.name);
            let out = p.output();
            let lines: Vec<&str> = out.lines().collect();
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{l}");
            }
        }
    }
    drop(procs);
    res
}

fn drive(o: &Options, bench: &Arc<Bench>) -> anyhow::Result<Report> {
    // Prepare and warm every project once (first builds are cold; not measured).
    eprintln!(
        "kiln-load: warming {} cached and {} partial projects",
        o.cached_projects, o.partial_projects
    );
    for i in 0..o.cached_projects {
        let d = bench.cached_dir(i);
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("Dockerfile"),
            format!("ARG BASE\nFROM ${{BASE}}\nRUN echo cached-{i} > /p\n"),
        )?;
        bench.build(&d, &format!("cached-{i}"))?;
    }
    for j in 0..o.partial_projects {
        let d = bench.dir.join(format!("partial-{j}"));
        write_partial(&d, j, "warm")?;
        bench.build(&d, &format!("partial-{j}"))?;
    }
    // The unloaded baseline: cached builds one at a time.
    let mut unloaded_all = Vec::new();
    for r in 0..o.unloaded_runs.max(1) {
        let i = r % o.cached_projects;
        let t = Instant::now();
        let missed = bench.build(&bench.cached_dir(i), &format!("cached-{i}"))?;
        unloaded_all.push(t.elapsed());
        if missed {
            bail!("cached-{i}: an unloaded rebuild was not fully cached");
        }
    }
    let mut sorted = unloaded_all.clone();
    sorted.sort();
    let unloaded = sorted[sorted.len() / 2];
    let counters_before = bench.scrape()?;
    eprintln!(
        "kiln-load: unloaded cached median {:.0} ms; {} clients for {} s",
        unloaded.as_secs_f64() * 1000.0,
        o.clients,
        o.duration.as_secs()
    );

    // The sampler: the gateway's gauges twice a second until the clients are done.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let bench = bench.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples: Vec<String> = Vec::new();
            while !done.load(Ordering::SeqCst) {
                if let Ok(t) = bench.scrape() {
                    samples.push(t);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        })
    };
    let load_before = loadavg();
    let cpu_before = cpu_now(bench);
    let results: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Instant::now();
    let deadline = start + o.duration;
    let clients: Vec<_> = (0..o.clients)
        .map(|c| {
            let bench = bench.clone();
            let results = results.clone();
            let errors = errors.clone();
            let o = o.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) << 17));
                while Instant::now() < deadline {
                    let roll = rng.below(100) as u32;
                    let kind = if roll < o.cached_pct {
                        Kind::Cached
                    } else if roll < o.cached_pct + o.partial_pct {
                        Kind::Partial
                    } else {
                        Kind::Cold
                    };
                    let prepared = match kind {
                        Kind::Cached => {
                            let i = rng.below(o.cached_projects as u64) as usize;
                            Ok((bench.cached_dir(i), format!("cached-{i}"), false))
                        }
                        Kind::Partial => {
                            let j = rng.below(o.partial_projects as u64) as usize;
                            bench
                                .partial_copy(j)
                                .map(|d| (d, format!("partial-{j}"), true))
                        }
                        Kind::Cold => bench.cold().map(|(d, k)| (d, k, true)),
                    };
                    let (dir, key, scratch) = match prepared {
                        Ok(p) => p,
                        Err(e) => {
                            errors.lock().expect("lock").push(format!("{e:#}"));
                            break;
                        }
                    };
                    let t = Instant::now();
                    let res = bench.build(&dir, &key);
                    let took = t.elapsed();
                    if scratch {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    let sample = match res {
                        Ok(missed) => Sample {
                            kind,
                            took,
                            ok: true,
                            missed: kind == Kind::Cached && missed,
                        },
                        Err(e) => {
                            errors.lock().expect("lock").push(format!("{e:#}"));
                            Sample {
                                kind,
                                took,
                                ok: false,
                                missed: false,
                            }
                        }
                    };
                    results.lock().expect("lock").push(sample);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().map_err(|_| anyhow!("a client thread panicked"))?;
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::SeqCst);
    let samples = sampler
        .join()
        .map_err(|_| anyhow!("the sampler thread panicked"))?;
    let load_after = loadavg();
    let cpu: BTreeMap<String, f64> = cpu_now(bench)
        .into_iter()
        .map(|(k, v)| {
            let b = cpu_before.get(&k).copied().unwrap_or(0.0);
            (k, v - b)
        })
        .collect();
    let counters_after = bench.scrape()?;

    let results = std::mem::take(&mut *results.lock().expect("lock"));
    let errors = std::mem::take(&mut *errors.lock().expect("lock"));
    let mut by_kind = BTreeMap::new();
    for kind in [Kind::Cached, Kind::Partial, Kind::Cold] {
        let v: Vec<Duration> = results
            .iter()
            .filter(|s| s.kind == kind && s.ok)
            .map(|s| s.took)
            .collect();
        by_kind.insert(kind, percentiles(v));
    }
    let mut workers: BTreeMap<String, WorkerLoad> = BTreeMap::new();
    for text in &samples {
        for (w, n) in fleet::counters(text, "kiln_gateway_inflight_builds", "worker") {
            let l = workers.entry(w).or_default();
            l.inflight_max = l.inflight_max.max(n);
            l.inflight_mean += n / samples.len() as f64;
        }
        for (w, n) in fleet::counters(text, "kiln_gateway_queue_depth", "worker") {
            let l = workers.entry(w).or_default();
            l.queue_max = l.queue_max.max(n);
            l.queue_mean += n / samples.len() as f64;
        }
    }
    let delta = |name: &str| {
        let before = fleet::counters(&counters_before, name, "worker");
        fleet::counters(&counters_after, name, "worker")
            .into_iter()
            .map(move |(w, n)| {
                let b = before.get(&w).copied().unwrap_or(0.0);
                (w, n - b)
            })
    };
    for (w, n) in delta("kiln_gateway_builds_total") {
        workers.entry(w).or_default().builds = n;
    }
    for (w, n) in delta("kiln_gateway_queue_wait_seconds_count") {
        workers.entry(w).or_default().queued_builds = n;
    }
    Ok(Report {
        options: o.clone(),
        unloaded,
        unloaded_all,
        elapsed,
        builds: results.len(),
        errors: results.iter().filter(|s| !s.ok).count(),
        error_samples: errors.into_iter().take(5).collect(),
        cache_misses: results.iter().filter(|s| s.missed).count(),
        by_kind,
        workers,
        loadavg: (load_before, load_after),
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = percentiles(v);
        assert_eq!(p.count, 100);
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p95, Duration::from_millis(95));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        assert_eq!(percentiles(Vec::new()).count, 0);
        assert_eq!(
            percentiles(vec![Duration::from_secs(1)]).p99,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn cached_means_every_real_step_cached() {
        let cached = br#"{"vertexes":[{"digest":"a","name":"[internal] load .dockerignore"}]}
{"vertexes":[{"digest":"b","name":"[2/2] RUN echo","cached":true}]}
"#;
        assert!(fully_cached(cached));
        let ran = br#"{"vertexes":[{"digest":"b","name":"[2/2] RUN echo"}]}
{"vertexes":[{"digest":"b","name":"[2/2] RUN echo","completed":"x"}]}
"#;
        assert!(!fully_cached(ran));
    }
}
