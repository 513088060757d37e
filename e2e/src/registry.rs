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
    token_server: Option<TokenServer>,
    _dir: tempfile::TempDir,
}

/// How a test registry authenticates clients.
enum Auth {
    /// Anyone may pull and push.
    None,
    /// HTTP Basic against an htpasswd file.
    Htpasswd {
        user: String,
        hash: String,
        password: String,
    },
    /// Bearer tokens from a [`TokenServer`] that takes Basic credentials.
    Token { user: String, password: String },
}

/// The `service` (token audience) and `issuer` of token-auth registries.
const TOKEN_SERVICE: &str = "kiln-test-registry";
const TOKEN_ISSUER: &str = "kiln-test-issuer";

impl Registry {
    /// Starts a registry on `127.0.0.1:<free port>` and waits until `GET /v2/` answers.
    pub fn start() -> anyhow::Result<Registry> {
        Registry::spawn(Auth::None)
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
        Registry::spawn(Auth::Htpasswd {
            user: user.to_string(),
            hash,
            password: password.to_string(),
        })
    }

    /// Starts a registry that requires bearer tokens (distribution's `token` backend, as
    /// Docker Hub and most cloud registries do), with a token server on another loopback
    /// port that hands out RS256 JWTs for the scopes asked for to `user`/`password`
    /// (HTTP Basic) and 401 to everyone else. Needs the `openssl` CLI for the signing key.
    pub fn start_with_token_auth(user: &str, password: &str) -> anyhow::Result<Registry> {
        Registry::spawn(Auth::Token {
            user: user.to_string(),
            password: password.to_string(),
        })
    }

    fn spawn(auth: Auth) -> anyhow::Result<Registry> {
        let dir = tempfile::tempdir().context("registry temp dir")?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let (auth_yml, challenge, credentials, token_server) = match &auth {
            Auth::None => (String::new(), None, None, None),
            Auth::Htpasswd {
                user,
                hash,
                password,
            } => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{user}:{hash}\n"))
                    .with_context(|| format!("write {}", path.display()))?;
                let yml = format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    path.display()
                );
                (
                    yml,
                    Some("Basic "),
                    Some((user.clone(), password.clone())),
                    None,
                )
            }
            Auth::Token { user, password } => {
                let server = TokenServer::start(dir.path(), user, password)?;
                let yml = format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: {TOKEN_SERVICE}\n    \
                     issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    server.addr,
                    server.cert.display()
                );
                (
                    yml,
                    Some("Bearer "),
                    Some((user.clone(), password.clone())),
                    Some(server),
                )
            }
        };
        let mut token_server = token_server;
        let mut credentials = credentials;
        // A few tries: another process may grab the port between probe and bind.
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            write_config(&config, &storage, &addr, &auth_yml)?;
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
            match wait_ready(&mut child, &addr, challenge, Duration::from_secs(15)) {
                Ok(()) => {
                    return Ok(Registry {
                        child,
                        addr,
                        credentials: credentials.take(),
                        token_server: token_server.take(),
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

    /// The `(user, password)` a registry from [`Registry::start_with_auth`] or
    /// [`Registry::start_with_token_auth`] accepts.
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

    /// `GET path` (`/v2/…`) with `headers`, authenticated with the registry's own
    /// credentials when it has some: HTTP Basic, or a bearer token fetched from the token
    /// server for pulling the repository in `path`.
    pub fn get_authorized(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<crate::http::Response> {
        use base64::Engine;
        let Some((user, password)) = self.credentials() else {
            return crate::http::get(&self.addr, path, headers);
        };
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let authorization = match self.token_server_addr() {
            None => basic,
            Some(token_addr) => {
                // `/v2/<name>/(manifests|blobs|tags)/…` → `repository:<name>:pull`.
                let name = path
                    .trim_start_matches("/v2/")
                    .rsplitn(3, '/')
                    .nth(2)
                    .unwrap_or_default();
                let token_path = format!(
                    "/token?service={TOKEN_SERVICE}&scope=repository%3A{}%3Apull",
                    name.replace('/', "%2F")
                );
                let resp = crate::http::get(
                    &token_addr,
                    &token_path,
                    &[("Authorization", basic.as_str())],
                )?;
                if resp.status != 200 {
                    bail!("token server answered {}", resp.status);
                }
                let v: serde_json::Value = serde_json::from_slice(&resp.body)?;
                let token = v["token"].as_str().context("no token in answer")?;
                format!("Bearer {token}")
            }
        };
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.push(("Authorization", authorization.as_str()));
        crate::http::get(&self.addr, path, &all)
    }

    /// `127.0.0.1:PORT` of the token server of a [`Registry::start_with_token_auth`]
    /// registry.
    pub fn token_server_addr(&self) -> Option<String> {
        self.token_server.as_ref().map(|t| t.addr.clone())
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

/// Waits for `GET /v2/` to answer 200, or 401 with a challenge starting with `challenge`
/// when one is given.
fn wait_ready(
    child: &mut Child,
    addr: &str,
    challenge: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("registry exited early: {status}");
        }
        if let Ok(resp) = crate::http::get(addr, "/v2/", &[]) {
            let ready = match challenge {
                None => resp.status == 200,
                Some(scheme) => {
                    resp.status == 401
                        && resp
                            .header("www-authenticate")
                            .is_some_and(|h| h.starts_with(scheme))
                }
            };
            if ready {
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

fn write_config(path: &Path, storage: &Path, addr: &str, auth_yml: &str) -> anyhow::Result<()> {
    let mut yml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        storage.display()
    );
    yml.push_str(auth_yml);
    std::fs::write(path, yml).with_context(|| format!("write {}", path.display()))
}

// === TokenServer ===

/// A minimal docker token server (the `realm` of a token-auth registry): answers
/// `GET /token?service=…&scope=…` with a JWT granting the scopes asked for, signed by a
/// throwaway RSA key whose self-signed certificate the registry trusts, when the request
/// carries the right Basic credentials; 401 otherwise. One thread, one request per
/// connection; stopped on drop.
#[derive(Debug)]
struct TokenServer {
    addr: String,
    cert: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    /// Makes a key and certificate in `dir` with `openssl` and starts serving.
    fn start(dir: &Path, user: &str, password: &str) -> anyhow::Result<TokenServer> {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        run_openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256"])
                .args(["-days", "2", "-subj", "/CN=kiln-test-token"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
            &[],
        )?;
        let der = run_openssl(
            Command::new("openssl")
                .args(["x509", "-outform", "DER", "-in"])
                .arg(&cert),
            &[],
        )?;
        let signer = TokenSigner {
            key,
            x5c: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der),
            basic: format!("{user}:{password}"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").context("bind token server")?;
        let addr = listener.local_addr()?.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = signer.serve(conn);
                }
            }
        });
        Ok(TokenServer {
            addr,
            cert,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the token server needs to check a request and sign a token.
struct TokenSigner {
    key: std::path::PathBuf,
    /// The certificate, base64 DER, for the JWT's `x5c` header.
    x5c: String,
    /// `user:password` accepted.
    basic: String,
}

impl TokenSigner {
    fn serve(&self, mut conn: std::net::TcpStream) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") && raw.len() < 64 * 1024 {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&raw);
        let mut lines = head.split("\r\n");
        let target = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string();
        let authorized = lines
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
            .filter_map(|(_, v)| v.trim().strip_prefix("Basic ").map(str::to_string))
            .filter_map(|b64| {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.trim()).ok()
            })
            .any(|creds| creds == self.basic.as_bytes());
        let (status, body) = if !target.starts_with("/token") {
            ("404 Not Found", serde_json::json!({"error": "not found"}))
        } else if !authorized {
            (
                "401 Unauthorized",
                serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}),
            )
        } else {
            let token = self.sign(&scopes(&target))?;
            (
                "200 OK",
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300}),
            )
        };
        let body = serde_json::to_vec(&body)?;
        write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )?;
        conn.write_all(&body)?;
        Ok(())
    }

    /// An RS256 JWT for the registry granting `access` (distribution's claim set).
    fn sign(&self, access: &[serde_json::Value]) -> anyhow::Result<String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": self.basic.split(':').next().unwrap_or_default(),
            "aud": TOKEN_SERVICE,
            "iat": now,
            "nbf": now.saturating_sub(10),
            "exp": now + 300,
            "jti": format!("kiln-{now}-{}", access.len()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64.encode(serde_json::to_vec(&header)?),
            b64.encode(serde_json::to_vec(&claims)?)
        );
        let sig = run_openssl(
            Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&self.key),
            input.as_bytes(),
        )?;
        Ok(format!("{input}.{}", b64.encode(sig)))
    }
}

/// The `access` claim for the `scope` query parameters of `target` (each
/// `type:name:action,action`, several per parameter separated by spaces).
fn scopes(target: &str) -> Vec<serde_json::Value> {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .flat_map(|(_, v)| {
            percent_decode(v)
                .split(' ')
                .filter_map(|scope| {
                    let (kind, rest) = scope.split_once(':')?;
                    let (name, actions) = rest.rsplit_once(':')?;
                    Some(serde_json::json!({
                        "type": kind,
                        "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    }))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (a space) of a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs an `openssl` command with `stdin`, returning its stdout.
fn run_openssl(cmd: &mut Command, stdin: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run openssl")?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
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
    fn token_registry_wants_a_token_from_its_server() -> anyhow::Result<()> {
        use base64::Engine;
        let reg = Registry::start_with_token_auth("tok", "pw")?;
        let anon = crate::http::get(&reg.addr(), "/v2/", &[])?;
        assert_eq!(anon.status, 401);
        let challenge = anon.header("www-authenticate").unwrap_or_default();
        let token_addr = reg.token_server_addr().unwrap_or_default();
        assert!(
            challenge.contains(&format!("realm=\"http://{token_addr}/token\"")),
            "{challenge}"
        );
        let token_path = "/token?service=kiln-test-registry&scope=repository%3Aa%2Fb%3Apull%2Cpush";
        let basic = |creds: &str| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
            crate::http::get(
                &token_addr,
                token_path,
                &[("Authorization", &format!("Basic {b64}"))],
            )
        };
        assert_eq!(basic("tok:wrong")?.status, 401);
        assert_eq!(crate::http::get(&token_addr, token_path, &[])?.status, 401);
        let resp = basic("tok:pw")?;
        assert_eq!(resp.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&resp.body)?;
        let token = v["token"].as_str().unwrap_or_default().to_string();
        let claims = token.split('.').nth(1).unwrap_or_default();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims)?,
        )?;
        assert_eq!(
            claims["access"],
            serde_json::json!([{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}])
        );
        // The registry accepts the token (its signature and claims check out).
        let bearer = format!("Bearer {token}");
        let ok = crate::http::get(&reg.addr(), "/v2/", &[("Authorization", &bearer)])?;
        assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
        let m = reg.get_authorized("/v2/a/b/manifests/1", &[])?;
        assert_eq!(m.status, 404, "{}", String::from_utf8_lossy(&m.body));
        let tampered = format!("Bearer {token}x");
        let bad = crate::http::get(&reg.addr(), "/v2/", &[("Authorization", &tampered)])?;
        assert_eq!(bad.status, 401);
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
        let m = reg.get_authorized("/v2/a/b/manifests/1", &[])?;
        assert_eq!(m.status, 404, "{}", String::from_utf8_lossy(&m.body));

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
