//! A throwaway Docker registry (Debian's `docker-registry`, the CNCF distribution server)
//! on a free loopback port, storing into a temporary directory and killed on drop.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian installs the registry binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry; the process is killed and its storage removed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on `127.0.0.1:<free port>` and waits until `GET /v2/` answers.
    pub fn start() -> anyhow::Result<Registry> {
        let dir = tempfile::tempdir().context("registry temp dir")?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        // A few tries: another process may grab the port between probe and bind.
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            write_config(&config, &storage, &addr)?;
            let log = std::fs::File::create(dir.path().join("registry.log"))?;
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn {REGISTRY_BIN}"))?;
            let mut child = child;
            match wait_ready(&mut child, &addr, Duration::from_secs(15)) {
                Ok(()) => {
                    return Ok(Registry {
                        child,
                        addr,
                        _dir: dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(dir.path().join("registry.log"))
                        .unwrap_or_default();
                    last_err = Some(e.context(format!("registry log: {log}")));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Where the registry keeps a blob's bytes (distribution's filesystem layout), so
    /// tests can corrupt it.
    pub fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self._dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(child: &mut Child, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("registry exited early: {status}");
        }
        if let Ok(resp) = crate::http::get(addr, "/v2/", &[]) {
            if resp.status == 200 {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            bail!("registry at {addr} not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

fn write_config(path: &Path, storage: &Path, addr: &str) -> anyhow::Result<()> {
    let yml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        storage.display()
    );
    std::fs::write(path, yml).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_and_answers_v2() -> anyhow::Result<()> {
        let reg = Registry::start()?;
        let resp = crate::http::get(&reg.addr(), "/v2/", &[])?;
        assert_eq!(resp.status, 200);
        let addr = reg.addr();
        drop(reg);
        assert!(crate::http::get(&addr, "/v2/", &[]).is_err());
        Ok(())
    }
}
