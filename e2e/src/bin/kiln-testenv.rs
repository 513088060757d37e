//! `kiln-testenv`: test environment helpers for scripts and demos.
//!
//! - `kiln-testenv registry` runs a throwaway registry in the foreground and prints its
//!   address (`127.0.0.1:PORT`); Ctrl-C stops it.
//! - `kiln-testenv push-base ADDR NAME:TAG` pushes the busybox base image.
//! - `kiln-testenv layout DIR` writes the busybox base as an OCI layout.
//! - `kiln-testenv push-rootfs ADDR NAME:TAG ROOTFS.tar [CONFIG_JSON]` packs a root
//!   filesystem tarball as a one-layer image (image config `config` object given as JSON,
//!   default `{"Env":["PATH=…"]}`) and pushes it.

use std::io::Write;

use anyhow::bail;
use nix::sys::signal::{SigSet, Signal};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["registry"] => {
            let reg = kiln_e2e::registry::Registry::start()?;
            // Wait for SIGINT/SIGTERM so the registry is stopped (on drop) when we are.
            // Blocked only now, after the registry was spawned with the normal mask.
            let mut set = SigSet::empty();
            set.add(Signal::SIGINT);
            set.add(Signal::SIGTERM);
            set.thread_block()?;
            println!("{}", reg.addr());
            std::io::stdout().flush()?;
            let sig = set.wait()?;
            eprintln!("kiln-testenv: {sig}, stopping registry");
            drop(reg);
            Ok(())
        }
        ["push-base", addr, name] => {
            kiln_e2e::base::push_base(addr, name)?;
            println!("pushed {addr}/{name}");
            Ok(())
        }
        ["layout", dir] => {
            kiln_e2e::base::busybox_layout(std::path::Path::new(dir), kiln_e2e::base::host_arch())
        }
        ["push-rootfs", addr, name, tar, rest @ ..] if rest.len() <= 1 => {
            let config = match rest.first() {
                Some(json) => serde_json::from_str(json)
                    .map_err(|e| anyhow::anyhow!("image config {json:?} is not JSON: {e}"))?,
                None => serde_json::json!({ "Env": [kiln_e2e::base::BASE_PATH] }),
            };
            kiln_e2e::base::push_rootfs(addr, name, std::path::Path::new(tar), config)?;
            println!("pushed {addr}/{name}");
            Ok(())
        }
        _ => bail!(
            "usage: kiln-testenv registry | push-base ADDR NAME:TAG | layout DIR \
             | push-rootfs ADDR NAME:TAG ROOTFS.tar [CONFIG_JSON]"
        ),
    }
}
