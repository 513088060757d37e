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
    credentials: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on `127.0.0.1:<free port>` and waits until `GET /v2/` answers.
    pub fn start() -> anyhow::Result<Registry> {
        Registry::spawn(None)
    }

    /// Starts a registry that requires HTTP Basic auth (distribution's `htpasswd`
    /// backend, bcrypt hash) for every request, as `user`/`password`; waits until
    /// `GET /v2/` answers 401 with a `Basic` challenge.
    pub fn start_with_auth(user: &str, password: &str) -> anyhow::Result<Registry> {
        if user.is_empty() || user.contains(':') {
            bail!("htpasswd user {user:?} must be non-empty and without ':'");
        }
        // Cost 4 (the minimum): the hash is checked on every request.
        let hash = bcrypt::hash(password, 4).context("bcrypt hash")?;
        Registry::spawn(Some((user.to_string(), hash, password.to_string())))
    }

    fn spawn(auth: Option<(String, String, String)>) -> anyhow::Result<Registry> {
        let dir = tempfile::tempdir().context("registry temp dir")?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let htpasswd = match &auth {
            Some((user, hash, _)) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{user}:{hash}\n"))
                    .with_context(|| format!("write {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        // A few tries: another process may grab the port between probe and bind.
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            write_config(&config, &storage, &addr, htpasswd.as_deref())?;
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
            match wait_ready(&mut child, &addr, auth.is_some(), Duration::from_secs(15)) {
                Ok(()) => {
                    return Ok(Registry {
                        child,
                        addr,
                        credentials: auth.map(|(user, _, password)| (user, password)),
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

    /// The `(user, password)` a registry from [`Registry::start_with_auth`] accepts.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Writes `dir/config.json`, a docker config whose `auths` entry for this registry
    /// holds `user:password` (base64, as `docker login` writes it); returns its path.
    pub fn write_docker_config(
        &self,
        dir: &Path,
        user: &str,
        password: &str,
    ) -> anyhow::Result<std::path::PathBuf> {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let config = serde_json::json!({ "auths": { self.addr.clone(): { "auth": auth } } });
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
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

/// Waits for `GET /v2/` to answer 200, or 401 with a `Basic` challenge when `auth`.
fn wait_ready(child: &mut Child, addr: &str, auth: bool, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("registry exited early: {status}");
        }
        if let Ok(resp) = crate::http::get(addr, "/v2/", &[]) {
            let challenged = resp.status == 401
                && resp
                    .header("www-authenticate")
                    .is_some_and(|h| h.starts_with("Basic"));
            if (!auth && resp.status == 200) || (auth && challenged) {
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

fn write_config(
    path: &Path,
    storage: &Path,
    addr: &str,
    htpasswd: Option<&Path>,
) -> anyhow::Result<()> {
    let mut yml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        storage.display()
    );
    if let Some(h) = htpasswd {
        yml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
            h.display()
        ));
    }
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

    #[test]
    fn auth_registry_wants_basic_credentials() -> anyhow::Result<()> {
        use base64::Engine;
        let reg = Registry::start_with_auth("kiln", "s3cret")?;
        assert_eq!(reg.credentials(), Some(("kiln", "s3cret")));
        let anon = crate::http::get(&reg.addr(), "/v2/", &[])?;
        assert_eq!(anon.status, 401);
        assert!(anon
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Basic realm=\"kiln-test\"")));
        let basic = |creds: &str| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
            crate::http::get(
                &reg.addr(),
                "/v2/",
                &[("Authorization", &format!("Basic {b64}"))],
            )
        };
        assert_eq!(basic("kiln:s3cret")?.status, 200);
        assert_eq!(basic("kiln:wrong")?.status, 401);

        let dir = tempfile::tempdir()?;
        let path = reg.write_docker_config(dir.path(), "kiln", "s3cret")?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let auth = v["auths"][reg.addr().as_str()]["auth"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            base64::engine::general_purpose::STANDARD.decode(auth)?,
            b"kiln:s3cret"
        );
        Ok(())
    }
}
