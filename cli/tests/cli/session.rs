//! The daemon's sessions under stress: a client that vanishes in the middle of sending its
//! context, and two clients building the same project at the same moment.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;

use super::daemon::{containers, eventually, unix_daemon};
use super::{kiln, ok};

/// Mount points under `root` (the daemon's state directory).
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&root))
        .map(str::to_string)
        .collect()
}

/// Bytes under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_session_that_vanishes_mid_transfer_loses_nothing() -> anyhow::Result<()> {
    let (reg, run, unix, daemon) = unix_daemon()?;
    // A context big enough to take a while: 64 files of 4 MiB of incompressible bytes.
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nCOPY data/ /data/\nRUN cat /data/* | sha256sum | cut -d' ' -f1 > /sum\n",
    )?;
    std::fs::create_dir(ctx.path().join("data"))?;
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut all = Vec::new();
    for i in 0..64 {
        let mut buf = vec![0u8; 4 << 20];
        for chunk in buf.chunks_mut(8) {
            // xorshift: cheap bytes that do not compress.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(ctx.path().join(format!("data/f{i:02}")), &buf)?;
        all.extend_from_slice(&buf);
    }
    let want = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&all))
    };
    drop(all);
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let locals = daemon.root().join("locals");
    let mut client = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--addr", &unix, "--build-arg", &arg])
        .arg(ctx.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Kill the client once the daemon has some, but not all, of the context.
    let total = 64u64 << 20;
    let started = eventually(120, || {
        let got = bytes_under(&locals);
        got > 0 && got < total / 2
    });
    let early = client.try_wait()?;
    let _ = client.kill();
    let out = client.wait_with_output()?;
    assert!(
        early.is_none() && started,
        "the client was not caught mid-transfer (ended: {early:?}, saw a partial context: {started})\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let partial = bytes_under(&locals);
    assert!(partial < total, "the whole context arrived before the kill");
    // Nothing is left running or mounted for the dead session, and the daemon serves on.
    assert!(
        eventually(30, || containers(daemon.root()).is_empty()
            && mounts_under(&daemon.root().join("mounts")).is_empty()),
        "left behind: containers {:?}, mounts {:?}",
        containers(daemon.root()),
        mounts_under(&daemon.root().join("mounts"))
    );
    ok(kiln(&["workers", "--addr", &unix])?)?;
    // The next build from the same directory (same shared key, so the daemon reuses what it
    // kept of the context) sees every byte, not the torn copy.
    let out_dir = run.path().join("out");
    let local = format!("type=local,dest={}", out_dir.display());
    let c = ctx.path().to_str().context("path")?;
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "-o",
        &local,
        c,
    ])?)?;
    assert_eq!(std::fs::read_to_string(out_dir.join("sum"))?.trim(), want);
    Ok(())
}

#[test]
fn two_clients_building_one_project_at_once_share_its_steps() -> anyhow::Result<()> {
    let (reg, run, unix, _daemon) = unix_daemon()?;
    // Each execution of the RUN writes different bytes: equal outputs mean one execution.
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nCOPY f.txt /f.txt\nRUN sleep 3 && head -c 32 /dev/urandom | od -An -tx1 > /rand\n",
    )?;
    std::fs::write(ctx.path().join("f.txt"), "shared\n")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let spawn = |n: usize| {
        let dest = run.path().join(format!("out{n}"));
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["build", "--addr", &unix, "--build-arg", &arg])
            .arg("-o")
            .arg(format!("type=local,dest={}", dest.display()))
            .arg(ctx.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map(|c| (c, dest))
    };
    let (a, out_a) = spawn(0)?;
    let (b, out_b) = spawn(1)?;
    ok(a.wait_with_output()?)?;
    ok(b.wait_with_output()?)?;
    let ra = std::fs::read_to_string(out_a.join("rand"))?;
    let rb = std::fs::read_to_string(out_b.join("rand"))?;
    assert!(!ra.trim().is_empty());
    assert_eq!(ra, rb, "the RUN step ran once per client instead of once");
    Ok(())
}
