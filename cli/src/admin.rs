//! `kiln du`, `kiln prune` and `kiln workers`: a daemon's or gateway's DiskUsage, Prune and
//! ListWorkers, printed as tables.

use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use futures::StreamExt;
use kiln_proto::moby::buildkit::v1 as api;

use crate::conn::ConnArgs;

/// Flags of `kiln du` and `kiln workers`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: ConnArgs,
}

/// Flags of `kiln prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Remove everything, not only what is unused (the same on Kiln today).
    #[arg(long)]
    all: bool,
    /// Keep records newer than this (e.g. 48h, 30m, 10s).
    #[arg(long, value_parser = parse_duration)]
    keep_duration: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

async fn client(
    conn: &ConnArgs,
) -> anyhow::Result<api::control_client::ControlClient<tonic::transport::Channel>> {
    let addr = conn.addr.clone().ok_or_else(|| {
        anyhow!("--addr (or BUILDKIT_HOST) is required: which daemon or gateway?")
    })?;
    Ok(api::control_client::ControlClient::new(
        conn.connect(&addr).await?,
    ))
}

/// Human-readable bytes (1024-based, as `buildctl du`).
pub fn human(bytes: i64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 || unit == "TiB" {
            return if unit == "B" {
                format!("{bytes}B")
            } else {
                format!("{v:.2}{unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{bytes}B")
}

/// `kiln du`.
pub async fn du(args: ListArgs) -> anyhow::Result<()> {
    let resp = client(&args.conn)
        .await?
        .disk_usage(api::DiskUsageRequest::default())
        .await
        .map_err(|s| anyhow!("DiskUsage: {}", s.message()))?
        .into_inner();
    println!("{:<12} {:>10}  DESCRIPTION", "ID", "SIZE");
    let mut total = 0;
    for r in &resp.record {
        total += r.size;
        println!("{:<12} {:>10}  {}", r.id, human(r.size), r.description);
    }
    println!("Total: {}", human(total));
    Ok(())
}

/// `kiln prune`.
pub async fn prune(args: PruneArgs) -> anyhow::Result<()> {
    let req = api::PruneRequest {
        all: args.all,
        keep_duration: args
            .keep_duration
            .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
            .unwrap_or(0),
        ..Default::default()
    };
    let mut stream = client(&args.conn)
        .await?
        .prune(req)
        .await
        .map_err(|s| anyhow!("Prune: {}", s.message()))?
        .into_inner();
    let mut total = 0;
    let mut count = 0;
    while let Some(r) = stream.next().await {
        let r = r.map_err(|s| anyhow!("Prune: {}", s.message()))?;
        total += r.size;
        count += 1;
        println!("{:<12} {:>10}  {}", r.id, human(r.size), r.description);
    }
    println!("Reclaimed: {} in {count} records", human(total));
    Ok(())
}

/// `kiln workers`.
pub async fn workers(args: ListArgs) -> anyhow::Result<()> {
    let resp = client(&args.conn)
        .await?
        .list_workers(api::ListWorkersRequest::default())
        .await
        .map_err(|s| anyhow!("ListWorkers: {}", s.message()))
        .context("listing workers")?
        .into_inner();
    println!("{:<32} PLATFORMS", "ID");
    for w in resp.record {
        let platforms: Vec<String> = w
            .platforms
            .iter()
            .map(|p| {
                if p.variant.is_empty() {
                    format!("{}/{}", p.os, p.architecture)
                } else {
                    format!("{}/{}/{}", p.os, p.architecture, p.variant)
                }
            })
            .collect();
        println!("{:<32} {}", w.id, platforms.join(","));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("48h"), Ok(Duration::from_secs(48 * 3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("2w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("h").is_err());
        assert_eq!(human(512), "512B");
        assert_eq!(human(1536), "1.50KiB");
    }
}
