//! `kiln-load`: the load harness of issue 8 item 1 (see `kiln_e2e::load`). Starts a
//! registry, `--workers` `kiln-worker`s and a `kiln-gateway` on loopback, warms the
//! projects, measures an unloaded cached build, then drives `--clients` concurrent
//! `kiln build` loops for `--duration` seconds and prints the report. Exits non-zero when
//! a build failed. The binaries are taken from `--bin-dir` (default: this binary's
//! directory).

use std::time::Duration;

use anyhow::{bail, Context};
use kiln_e2e::load::{self, Options};

const USAGE: &str = "usage: kiln-load [--clients N] [--duration SECS] [--workers N] \
[--max-builds-per-worker N] [--cached-projects N] [--partial-projects N] [--cached-pct P] \
[--partial-pct P] [--unloaded-runs N] [--work-dir DIR] [--bin-dir DIR]";

fn main() -> anyhow::Result<()> {
    let mut o = Options {
        bins: kiln_e2e::fleet::bin_dir()?,
        ..Options::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(());
        }
        let value = args
            .next()
            .with_context(|| format!("{flag}: missing value\n{USAGE}"))?;
        let num = |v: &str| -> anyhow::Result<usize> {
            v.parse()
                .with_context(|| format!("{flag} {v:?}: not a number"))
        };
        match flag.as_str() {
            "--clients" => o.clients = num(&value)?,
            "--duration" => o.duration = Duration::from_secs(num(&value)? as u64),
            "--workers" => o.workers = num(&value)?,
            "--max-builds-per-worker" => o.max_builds = num(&value)?,
            "--cached-projects" => o.cached_projects = num(&value)?,
            "--partial-projects" => o.partial_projects = num(&value)?,
            "--cached-pct" => o.cached_pct = num(&value)? as u32,
            "--partial-pct" => o.partial_pct = num(&value)? as u32,
            "--unloaded-runs" => o.unloaded_runs = num(&value)?,
            "--work-dir" => o.work_dir = value.into(),
            "--bin-dir" => o.bins = value.into(),
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    let report = load::run(&o)?;
    print!("{report}");
    if report.errors > 0 {
        bail!("{} of {} builds failed", report.errors, report.builds);
    }
    Ok(())
}
