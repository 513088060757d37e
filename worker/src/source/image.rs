//! Image sources: resolving a reference to a manifest (platform chosen from an index)
//! and config, and fetching layer blobs into the content store, with credentials from
//! docker's `config.json` (`auths` entries, `credHelpers`/`credsStore` helpers), HTTP
//! Basic and bearer-token auth, and plain HTTP for localhost and registries marked
//! insecure. A 401 is reported naming the registry and the credentials tried (never the
//! secret). Built on `oci-client`. Pushing blobs and manifests (for the image
//! exporter) lives here too, so all registry traffic goes through one client setup.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

pub mod token;

use super::{Error, Result};
use crate::content::ContentStore;
use crate::image::{ImageConfigFile, Platform};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

const ACCEPT: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Hosts (`host:port`) spoken to over plain HTTP; localhost/127.0.0.1 always are.
    pub insecure: Vec<String>,
    /// A docker `config.json`; `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`
    /// when `None`.
    pub docker_config: Option<PathBuf>,
}

impl RegistryConfig {
    /// True when `host` (`host[:port]`) is spoken to over plain HTTP.
    pub fn is_insecure(&self, host: &str) -> bool {
        host.starts_with("localhost")
            || host.starts_with("127.0.0.1")
            || host.starts_with("[::1]")
            || self.insecure.iter().any(|h| h == host)
    }

    fn config_path(&self) -> Option<PathBuf> {
        config_path_from(
            self.docker_config.as_deref(),
            std::env::var_os("DOCKER_CONFIG"),
            std::env::var_os("HOME"),
        )
    }

    /// Credentials for `host` from the docker config (its credential helper for the
    /// host, else its `auths` entry), anonymous when there are none.
    pub fn auth_for(&self, host: &str) -> RegistryAuth {
        self.lookup_auth(host).0
    }

    /// Credentials for `host` and where they came from (for error messages).
    fn lookup_auth(&self, host: &str) -> (RegistryAuth, CredSource) {
        let Some(path) = self.config_path() else {
            return (RegistryAuth::Anonymous, CredSource::NoConfig);
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (RegistryAuth::Anonymous, CredSource::Missing(path));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read docker config");
                return (
                    RegistryAuth::Anonymous,
                    CredSource::Invalid(path, e.to_string()),
                );
            }
        };
        // Docker's order: a `credHelpers` entry for the host, else `credsStore`, else the
        // `auths` entry. A helper that fails or knows nothing falls back to `auths`.
        let mut helper_failure = None;
        if let Some(helper) = credential_helper(&bytes, host) {
            match run_credential_helper(&helper, host) {
                Ok(Some(auth)) => {
                    let from = format!("docker-credential-{helper} (per {})", path.display());
                    return (auth, CredSource::Found(from));
                }
                Ok(None) => {
                    helper_failure = Some(format!("docker-credential-{helper} has none"));
                }
                Err(why) => {
                    tracing::warn!(%helper, %why, "docker credential helper failed");
                    helper_failure = Some(format!("credential helper failed: {why}"));
                }
            }
        }
        match auth_from_docker_config(&bytes, host) {
            Ok(RegistryAuth::Anonymous) => match helper_failure {
                Some(why) => {
                    let why = format!("{why} (per {})", path.display());
                    (RegistryAuth::Anonymous, CredSource::Helper(why))
                }
                None => (RegistryAuth::Anonymous, CredSource::NoEntry(path)),
            },
            Ok(auth) => {
                let from = match helper_failure {
                    Some(why) => format!("{} after {why}", path.display()),
                    None => path.display().to_string(),
                };
                (auth, CredSource::Found(from))
            }
            Err(message) => {
                tracing::warn!(path = %path.display(), %message, "ignoring docker config");
                (RegistryAuth::Anonymous, CredSource::Invalid(path, message))
            }
        }
    }

    /// Credentials for `host` and what to tell the user when it answers 401 with them.
    fn auth_and_explanation(&self, host: &str) -> (RegistryAuth, String) {
        let (auth, source) = self.lookup_auth(host);
        let message = unauthorized_message(host, &auth, source);
        (auth, message)
    }
}

/// What to tell the user when `host` answered 401 to a request made with `auth` from
/// `source`: which credentials were sent (never the secret) and from where.
fn unauthorized_message(host: &str, auth: &RegistryAuth, source: CredSource) -> String {
    let missing = |why: String| {
        format!("unauthorized: authentication required (no credentials for {host}{why})")
    };
    match (auth, source) {
        (RegistryAuth::Basic(user, _), CredSource::Found(from)) => {
            format!("unauthorized: {host} rejected the credentials of user {user:?} from {from}")
        }
        (RegistryAuth::Bearer(_), CredSource::Found(from)) => {
            format!("unauthorized: {host} rejected the registry token from {from}")
        }
        (_, CredSource::NoConfig) => {
            missing(": neither $DOCKER_CONFIG nor $HOME is set".to_string())
        }
        (_, CredSource::Missing(path)) => missing(format!(": {} does not exist", path.display())),
        (_, CredSource::Invalid(path, why)) => {
            missing(format!(": {} is unusable: {why}", path.display()))
        }
        (_, CredSource::Helper(why)) => missing(format!(": {why}")),
        (_, CredSource::NoEntry(path)) => missing(format!(" in {}", path.display())),
        (_, CredSource::Found(from)) => missing(format!(" in {from}")),
    }
}

/// Where [`RegistryConfig::lookup_auth`] found (or did not find) credentials.
#[derive(Debug)]
enum CredSource {
    /// No docker config location at all.
    NoConfig,
    /// The docker config does not exist.
    Missing(PathBuf),
    /// The docker config cannot be read or parsed.
    Invalid(PathBuf, String),
    /// The docker config has no entry for the host.
    NoEntry(PathBuf),
    /// The host's credential helper failed or had nothing, and `auths` has nothing.
    Helper(String),
    /// Credentials came from here (a config path, or a helper and its config).
    Found(String),
}

/// How long a credential helper may take (it may wait on a keychain).
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The credential helper docker would ask for `host` in a docker `config.json`: its
/// `credHelpers` entry, else `credsStore`; `None` when neither is set (or the config is
/// not JSON).
pub fn credential_helper(bytes: &[u8], host: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let want = normalize_host(host);
    let from_helpers = v
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            h.iter()
                .find(|(k, _)| normalize_host(k) == want)
                .and_then(|(_, name)| name.as_str())
        });
    let name = from_helpers.or_else(|| v.get("credsStore").and_then(|s| s.as_str()))?;
    let name = name.trim();
    // A helper name is a suffix of a program name, never a path.
    (!name.is_empty() && !name.contains('/')).then(|| name.to_string())
}

/// Parses the JSON a `docker-credential-* get` prints (`Username`, `Secret`). A
/// `<token>` user means an OAuth2 identity (refresh) token, which we cannot exchange.
pub fn auth_from_helper_output(out: &[u8]) -> std::result::Result<RegistryAuth, String> {
    let v: serde_json::Value =
        serde_json::from_slice(out).map_err(|e| format!("output is not JSON: {e}"))?;
    let user = v["Username"].as_str().unwrap_or_default();
    let secret = v["Secret"].as_str().unwrap_or_default();
    if user == "<token>" {
        return Err("identity tokens (OAuth2 refresh tokens) are not supported".to_string());
    }
    if user.is_empty() && secret.is_empty() {
        return Ok(RegistryAuth::Anonymous);
    }
    Ok(RegistryAuth::Basic(user.to_string(), secret.to_string()))
}

/// Runs `docker-credential-<helper> get` (found on `$PATH`) for `host`.
fn run_credential_helper(
    helper: &str,
    host: &str,
) -> std::result::Result<Option<RegistryAuth>, String> {
    // Docker keys Docker Hub by its v1 URL.
    let server = if normalize_host(host) == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    };
    run_helper_program(
        std::path::Path::new(&format!("docker-credential-{helper}")),
        &server,
        HELPER_TIMEOUT,
    )
}

/// Runs the credential helper `program` with `get`, `server` on stdin, killed after
/// `timeout`. `Ok(None)` when it has no credentials for `server`.
fn run_helper_program(
    program: &std::path::Path,
    server: &str,
    timeout: std::time::Duration,
) -> std::result::Result<Option<RegistryAuth>, String> {
    use std::process::{Command, Stdio};
    let program = program.display().to_string();
    let spawn = || {
        Command::new(&program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // A helper just written may still be open for writing in a child forked meanwhile.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.map_err(|e| format!("run {program}: {e}"))?,
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit status below.
        let _ = stdin.write_all(server.as_bytes());
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("{program}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(format!(
                "{program} did not answer within {HELPER_TIMEOUT:?}"
            ));
        }
    };
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(format!(
            "{program} get: {}: {}",
            out.status,
            if msg.is_empty() { err } else { msg }
        ));
    }
    match auth_from_helper_output(&out.stdout)? {
        RegistryAuth::Anonymous => Ok(None),
        auth => Ok(Some(auth)),
    }
}

/// The docker config to read: the explicit one, else `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json` (docker's order).
fn config_path_from(
    explicit: Option<&std::path::Path>,
    docker_config_env: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(dir) = docker_config_env.filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    home.filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Normalizes a docker config `auths` key or a registry host to a bare host.
fn normalize_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// Finds credentials for `host` in the bytes of a docker `config.json`.
pub fn auth_from_docker_config(
    bytes: &[u8],
    host: &str,
) -> std::result::Result<RegistryAuth, String> {
    use base64::Engine;
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let want = normalize_host(host);
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    for (key, entry) in auths {
        if normalize_host(key) != want {
            continue;
        }
        if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
            if !auth.is_empty() {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths.{key}.auth: {e}"))?;
                let s = String::from_utf8(raw).map_err(|e| format!("auths.{key}.auth: {e}"))?;
                let (user, pass) = s
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{key}.auth: not user:password"))?;
                return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
            }
        }
        let user = entry.get("username").and_then(|u| u.as_str());
        let pass = entry.get("password").and_then(|p| p.as_str());
        if let (Some(u), Some(p)) = (user, pass) {
            return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
        }
        if let Some(token) = entry.get("registrytoken").and_then(|t| t.as_str()) {
            return Ok(RegistryAuth::Bearer(token.to_string()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

/// A layer (or other blob) descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDesc {
    /// Media type.
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// A resolved image for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Canonical reference (`docker.io/library/busybox:latest`).
    pub canonical: String,
    /// Digest of the platform manifest.
    pub digest: String,
    /// The config.
    pub config: ImageConfigFile,
    /// Digest of the config blob.
    pub config_digest: String,
    /// Layers, lowest first.
    pub layers: Vec<BlobDesc>,
}

/// Normalizes a reference like Docker does (`busybox` → `docker.io/library/busybox:latest`).
pub fn normalize_reference(reference: &str) -> Result<String> {
    parse_ref(reference).map(|r| r.whole())
}

fn parse_ref(reference: &str) -> Result<Reference> {
    let n = crate::image::ImageName::parse(reference).map_err(|e| Error::Registry {
        reference: reference.to_string(),
        message: format!("invalid reference: {e}"),
    })?;
    Ok(match (n.tag, n.digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(n.domain, n.path, t, d),
        (None, Some(d)) => Reference::with_digest(n.domain, n.path, d),
        (Some(t), None) => Reference::with_tag(n.domain, n.path, t),
        (None, None) => Reference::with_tag(n.domain, n.path, "latest".to_string()),
    })
}

/// True when a registry call failed for want of (valid) credentials: HTTP 401 in any of
/// the shapes oci-client reports it, or a failed token exchange.
fn is_unauthorized(err: &OciDistributionError) -> bool {
    use oci_client::errors::OciErrorCode;
    match err {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, OciErrorCode::Unauthorized)),
        OciDistributionError::ServerError { code, .. } => *code == 401,
        OciDistributionError::RequestError(e) => e.status().map(|s| s.as_u16()) == Some(401),
        _ => false,
    }
}

/// Says what went wrong in a registry call, briefly (`manifest unknown`,
/// `connection refused`).
fn describe(err: &OciDistributionError) -> String {
    match err {
        OciDistributionError::RegistryError { envelope, .. } => {
            let msgs: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| {
                    if e.message.is_empty() {
                        format!("{:?}", e.code).to_lowercase()
                    } else {
                        e.message.to_lowercase()
                    }
                })
                .collect();
            msgs.join("; ")
        }
        OciDistributionError::ServerError { code, message, .. } => {
            let m = message.trim();
            if m.is_empty() {
                format!("server error {code}")
            } else {
                format!(
                    "server error {code}: {}",
                    m.chars().take(200).collect::<String>()
                )
            }
        }
        OciDistributionError::UnauthorizedError { .. } => "unauthorized".to_string(),
        other => {
            // Find the innermost OS error (connection refused, …) for a short message.
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(other);
            let mut last_io: Option<&std::io::Error> = None;
            while let Some(e) = src {
                if let Some(io) = e.downcast_ref::<std::io::Error>() {
                    last_io = Some(io);
                }
                src = e.source();
            }
            match last_io.map(|e| e.kind()) {
                Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_string(),
                Some(_) => {
                    let mut parts = vec![other.to_string()];
                    let mut s = std::error::Error::source(other);
                    while let Some(e) = s {
                        parts.push(e.to_string());
                        s = e.source();
                    }
                    parts.dedup();
                    parts.join(": ")
                }
                None => {
                    let mut parts = vec![other.to_string()];
                    let mut s = std::error::Error::source(other);
                    while let Some(e) = s {
                        parts.push(e.to_string());
                        s = e.source();
                    }
                    parts.dedup();
                    parts.join(": ")
                }
            }
        }
    }
}

fn reg_err(reference: &str, message: impl Into<String>) -> Error {
    Error::Registry {
        reference: reference.to_string(),
        message: message.into(),
    }
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn normalize_variant(arch: &str, variant: &str) -> String {
    match (arch, variant) {
        ("arm64", "") => "v8".to_string(),
        ("arm", "") => "v7".to_string(),
        (_, v) => v.to_string(),
    }
}

/// Picks the manifest for `platform` from an index's `manifests` array: same os and
/// architecture, and the same variant (arm64 defaults to v8, arm to v7) when one is
/// asked for.
pub fn pick_platform<'a>(
    manifests: &'a [serde_json::Value],
    platform: &Platform,
) -> Option<&'a serde_json::Value> {
    let want_variant = if platform.variant.is_empty() && platform.architecture != "arm64" {
        String::new()
    } else {
        normalize_variant(&platform.architecture, &platform.variant)
    };
    let candidates = manifests.iter().filter(|m| {
        let p = &m["platform"];
        p["os"].as_str() == Some(platform.os.as_str())
            && p["architecture"].as_str() == Some(platform.architecture.as_str())
    });
    let mut fallback = None;
    for m in candidates {
        let v = normalize_variant(
            &platform.architecture,
            m["platform"]["variant"].as_str().unwrap_or(""),
        );
        if v == want_variant {
            return Some(m);
        }
        if want_variant.is_empty() && fallback.is_none() {
            fallback = Some(m);
        }
    }
    fallback
}

fn blob_desc(v: &serde_json::Value, reference: &str) -> Result<BlobDesc> {
    let digest = v["digest"]
        .as_str()
        .ok_or_else(|| reg_err(reference, "descriptor without digest"))?;
    crate::content::validate_digest(digest)?;
    Ok(BlobDesc {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: digest.to_string(),
        size: v["size"].as_u64().unwrap_or(0),
    })
}

// === impl ImageResolver ===

/// Resolves and fetches images.
#[derive(Clone)]
pub struct ImageResolver {
    config: RegistryConfig,
    content: Arc<ContentStore>,
    /// The client whose session supplies credentials first (a daemon's build).
    session: Option<Arc<dyn crate::control::SessionServices>>,
    /// One client per registry host, with the credentials stored in it.
    clients: Arc<Mutex<HashMap<String, RegistryClient>>>,
    /// Bearer tokens the client's session fetched (`Auth.FetchToken`), by repository.
    tokens: Arc<token::Tokens>,
}

/// A client for one registry host.
#[derive(Clone)]
struct RegistryClient {
    client: Client,
    /// The credentials stored in `client`.
    auth: RegistryAuth,
    /// What a 401 from this registry means (which credentials were sent, from where).
    unauthorized: Arc<str>,
    /// Token realm and service when the client's session fetches this registry's tokens
    /// (its credentials never reach this worker).
    bearer: Option<(String, String)>,
}

impl std::fmt::Debug for ImageResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageResolver")
            .field("config", &self.config)
            .field("content", &self.content)
            .finish_non_exhaustive()
    }
}

impl ImageResolver {
    /// A resolver storing blobs in `content`.
    pub fn new(config: RegistryConfig, content: Arc<ContentStore>) -> ImageResolver {
        install_crypto_provider();
        ImageResolver {
            config,
            content,
            clients: Arc::new(Mutex::new(HashMap::new())),
            session: None,
            tokens: Default::default(),
        }
    }

    /// A resolver for one build whose registry credentials come from the client's session
    /// first (then this worker's docker config). It keeps its own clients, so one build's
    /// credentials never serve another's.
    pub fn with_session(&self, session: Arc<dyn crate::control::SessionServices>) -> ImageResolver {
        let mut r = ImageResolver::new(self.config.clone(), self.content.clone());
        r.session = Some(session);
        r
    }

    /// The same resolver with `host` (`host:port`) spoken to over plain HTTP too (the
    /// image exporter's `registry.insecure`).
    pub fn with_insecure_host(&self, host: &str) -> ImageResolver {
        let mut config = self.config.clone();
        if !config.insecure.iter().any(|h| h == host) {
            config.insecure.push(host.to_string());
        }
        let mut r = ImageResolver::new(config, self.content.clone());
        r.session = self.session.clone();
        r
    }

    /// The content store blobs go into.
    pub fn content(&self) -> &Arc<ContentStore> {
        &self.content
    }

    /// The registry settings.
    pub fn registry_config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Says what went wrong in a registry call to the registry of `r`; a 401 names the
    /// credentials used (or their absence) instead of the bare status.
    fn explain(&self, r: &Reference, err: &OciDistributionError) -> String {
        if !is_unauthorized(err) {
            return describe(err);
        }
        let host = r.resolve_registry();
        let known = self
            .clients
            .lock()
            .ok()
            .and_then(|m| m.get(host).map(|c| c.unauthorized.clone()));
        match known {
            Some(message) => message.to_string(),
            None => format!("unauthorized: authentication required for {}", r.registry()),
        }
    }

    /// The token realm and service of `r`'s registry (which asks for bearer tokens from
    /// `realm` for `service`) when the client's session fetches them (checked by fetching
    /// one for pulling from `r`).
    async fn session_bearer(
        &self,
        session: &dyn crate::control::SessionServices,
        r: &Reference,
        realm: String,
        service: String,
    ) -> Option<(String, String)> {
        let host = r.resolve_registry().to_string();
        let req = token::TokenRequest {
            host: r.registry().to_string(),
            realm: realm.clone(),
            service: service.clone(),
            scopes: vec![format!("repository:{}:pull", r.repository())],
        };
        match session.fetch_token(&req).await {
            Ok(Some(t)) => {
                self.tokens.put(&host, r.repository(), false, &t);
                Some((realm, service))
            }
            Ok(None) => None,
            Err(e) => {
                // The client offers tokens but could not get this one: its Credentials
                // are the fallback, as BuildKit does.
                tracing::warn!(registry = %host, error = %e, "the client's session could not fetch a registry token");
                None
            }
        }
    }

    /// The client for `r`'s registry, with a token for `r`'s repository (push access when
    /// `push`) in it when the client's session fetches this registry's tokens.
    async fn authorize(&self, r: &Reference, push: bool) -> (Client, RegistryAuth) {
        let (client, auth) = self.client(r).await;
        let host = r.resolve_registry().to_string();
        let bearer = self
            .clients
            .lock()
            .ok()
            .and_then(|m| m.get(&host).and_then(|c| c.bearer.clone()));
        let (Some((realm, service)), Some(session)) = (bearer, &self.session) else {
            return (client, auth);
        };
        let token = match self.tokens.get(&host, r.repository(), push) {
            Some(t) => Some(t),
            None => {
                let access = if push { "pull,push" } else { "pull" };
                let req = token::TokenRequest {
                    host: r.registry().to_string(),
                    realm,
                    service,
                    scopes: vec![format!("repository:{}:{access}", r.repository())],
                };
                match session.fetch_token(&req).await {
                    Ok(Some(t)) => {
                        self.tokens.put(&host, r.repository(), push, &t);
                        Some(t.token)
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(registry = %host, error = %e, "the client's session could not fetch a registry token");
                        None
                    }
                }
            }
        };
        if let Some(token) = token {
            let op = if push {
                oci_client::RegistryOperation::Push
            } else {
                oci_client::RegistryOperation::Pull
            };
            // With a bearer token this only stores it for `r` and `op`: no request.
            let _ = client.auth(r, &RegistryAuth::Bearer(token), op).await;
        }
        (client, auth)
    }

    /// A client for the registry of `r` (one per registry, so tokens are reused and the
    /// docker config and credential helpers are consulted once), with its credentials
    /// stored; returns them too.
    async fn client(&self, r: &Reference) -> (Client, RegistryAuth) {
        let host = r.resolve_registry().to_string();
        let existing = self.clients.lock().ok().and_then(|m| m.get(&host).cloned());
        if let Some(c) = existing {
            return (c.client, c.auth);
        }
        let protocol = if self.config.is_insecure(r.registry()) || self.config.is_insecure(&host) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        // Insecure registries are not TLS-verified (Docker's `insecure-registries` meaning);
        // that also spares loading the system roots (~80 ms) for plain-HTTP clients.
        let insecure = matches!(protocol, ClientProtocol::Http);
        let client = Client::new(ClientConfig {
            protocol,
            accept_invalid_certificates: insecure,
            use_monolithic_push: true,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            ..Default::default()
        });
        // A credential helper is a process: keep it off the async threads.
        let config = self.config.clone();
        let registry = r.registry().to_string();
        let fallback = format!("unauthorized: authentication required for {}", r.registry());
        // A token-auth registry and a client that fetches tokens itself: ask it for tokens
        // per repository (Auth.FetchToken) instead of for its credentials.
        let challenge = match &self.session {
            Some(_) => token::challenge(&host, insecure).await.ok(),
            None => None,
        };
        // A registry that does not challenge at `/v2/` gets no credentials from the client
        // (the registry client sends them only after a challenge there), so the session is
        // not asked for any: one round trip to the client fewer per build and registry.
        // BuildKit, too, asks the session only when a registry challenges.
        let open = matches!(challenge, Some(token::Challenge::None));
        let bearer_from_session = match (&self.session, challenge) {
            (Some(s), Some(token::Challenge::Bearer { realm, service })) => {
                self.session_bearer(s.as_ref(), r, realm, service).await
            }
            _ => None,
        };
        let from_session = match &self.session {
            Some(_) if bearer_from_session.is_some() || open => None,
            Some(s) => match s.registry_auth(&registry).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(%registry, error = %e, "no credentials from the client's session");
                    None
                }
            },
            None => None,
        };
        let (auth, unauthorized) = match bearer_from_session {
            Some(_) => (
                RegistryAuth::Anonymous,
                format!("unauthorized: {registry} refused the token the client's session fetched for it"),
            ),
            None => match from_session {
            Some(auth) => {
                let user = match &auth {
                    RegistryAuth::Basic(u, _) => format!("user {u:?}"),
                    _ => "a token".to_string(),
                };
                let message = format!(
                    "unauthorized: {registry} refused the credentials ({user}) the client's session gave for it"
                );
                (auth, message)
            }
            None => tokio::task::spawn_blocking(move || config.auth_and_explanation(&registry))
                .await
                .unwrap_or((RegistryAuth::Anonymous, fallback)),
            },
        };
        client.store_auth_if_needed(&host, &auth).await;
        if let Ok(mut m) = self.clients.lock() {
            m.insert(
                host,
                RegistryClient {
                    client: client.clone(),
                    auth: auth.clone(),
                    unauthorized: unauthorized.into(),
                    bearer: bearer_from_session,
                },
            );
        }
        (client, auth)
    }

    /// Fetches a manifest (or index) as raw bytes with its digest, without choosing a
    /// platform.
    pub async fn fetch_manifest_raw(&self, reference: &str) -> Result<(Vec<u8>, String)> {
        let r = parse_ref(reference)?;
        let canonical = r.whole();
        let (client, auth) = self.authorize(&r, false).await;
        let (bytes, digest) = client
            .pull_manifest_raw(&r, &auth, ACCEPT)
            .await
            .map_err(|e| reg_err(&canonical, self.explain(&r, &e)))?;
        Ok((bytes.to_vec(), digest))
    }

    /// Resolves `reference` (optionally `@sha256:` pinned) for `platform`.
    pub async fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage> {
        let r = parse_ref(reference)?;
        let canonical = r.whole();
        let (mut bytes, mut digest) = self.fetch_manifest_raw(&canonical).await?;
        let mut manifest: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| reg_err(&canonical, format!("manifest is not json: {e}")))?;
        if manifest.get("manifests").is_some() {
            let list = manifest["manifests"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let chosen = pick_platform(&list, platform).ok_or_else(|| {
                reg_err(&canonical, format!("no manifest for platform {platform}"))
            })?;
            let desc = blob_desc(chosen, &canonical)?;
            let by_digest = format!("{}/{}@{}", r.registry(), r.repository(), desc.digest);
            let (b, d) = self.fetch_manifest_raw(&by_digest).await?;
            if d != desc.digest {
                return Err(reg_err(
                    &canonical,
                    format!(
                        "manifest digest mismatch: expected {}, got {d}",
                        desc.digest
                    ),
                ));
            }
            bytes = b;
            digest = d;
            manifest = serde_json::from_slice(&bytes)
                .map_err(|e| reg_err(&canonical, format!("manifest is not json: {e}")))?;
        }
        if manifest["schemaVersion"].as_u64() != Some(2) || manifest.get("config").is_none() {
            return Err(reg_err(
                &canonical,
                "unsupported manifest (only schema 2 / OCI image manifests)",
            ));
        }
        self.content.write_bytes(&bytes)?;
        let config_desc = blob_desc(&manifest["config"], &canonical)?;
        let layers = manifest["layers"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .map(|l| blob_desc(l, &canonical))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        let path = self
            .fetch_blob(&canonical, &config_desc, &|_, _| {})
            .await?;
        let config_bytes = std::fs::read(&path).map_err(|e| {
            reg_err(
                &canonical,
                format!("read config {}: {e}", config_desc.digest),
            )
        })?;
        let config: ImageConfigFile = serde_json::from_slice(&config_bytes).map_err(|e| {
            reg_err(
                &canonical,
                format!("config {} is invalid: {e}", config_desc.digest),
            )
        })?;
        Ok(ResolvedImage {
            canonical,
            digest,
            config,
            config_digest: config_desc.digest,
            layers,
        })
    }

    /// Fetches the blob `desc` of `reference` into the content store (verified) and
    /// returns its path; `progress(done, total)` is called as bytes arrive.
    pub async fn fetch_blob(
        &self,
        reference: &str,
        desc: &BlobDesc,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<PathBuf> {
        let path = self.content.path(&desc.digest)?;
        if self.content.has(&desc.digest) {
            progress(desc.size, desc.size);
            return Ok(path);
        }
        let r = parse_ref(reference)?;
        let canonical = r.whole();
        let (client, _) = self.authorize(&r, false).await;
        let fail = |m: String| reg_err(&canonical, format!("blob {}: {m}", desc.digest));
        let mut stream = client
            .pull_blob_stream(&r, desc.digest.as_str())
            .await
            .map_err(|e| fail(self.explain(&r, &e)))?;
        let total = if desc.size > 0 {
            desc.size
        } else {
            stream.content_length.unwrap_or(0)
        };
        let mut w = self.content.writer()?;
        progress(0, total);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(e.to_string()))?;
            w.write_all(&chunk)
                .map_err(|e| fail(format!("write: {e}")))?;
            if desc.size > 0 && w.written() > desc.size {
                return Err(fail(format!("more than the {} bytes announced", desc.size)));
            }
            progress(w.written(), total);
        }
        let (_, size) = w
            .finish(Some(&desc.digest))
            .map_err(|e| fail(e.to_string()))?;
        if desc.size > 0 && size != desc.size {
            let _ = self.content.delete(&desc.digest);
            return Err(fail(format!("size {size}, expected {}", desc.size)));
        }
        Ok(path)
    }

    /// True when the registry of `reference` already has the blob `digest`.
    pub async fn blob_exists(&self, reference: &str, digest: &str) -> Result<bool> {
        let r = parse_ref(reference)?;
        let (client, _) = self.authorize(&r, false).await;
        client.blob_exists(&r, digest).await.map_err(|e| {
            reg_err(
                &r.whole(),
                format!("blob {digest}: {}", self.explain(&r, &e)),
            )
        })
    }

    /// Uploads the blob `digest` from the content store to the repository of `reference`
    /// unless the registry has it; `progress(done, total)` as bytes go out. Returns true
    /// when bytes were sent.
    pub async fn push_blob(
        &self,
        reference: &str,
        digest: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<bool> {
        let size = self.content.size(digest)?;
        if self.blob_exists(reference, digest).await? {
            progress(size, size);
            return Ok(false);
        }
        let r = parse_ref(reference)?;
        let canonical = r.whole();
        let (client, _) = self.authorize(&r, true).await;
        let path = self.content.path(digest)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| reg_err(&canonical, format!("open blob {digest}: {e}")))?;
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(
            move |chunk| -> std::result::Result<bytes::Bytes, OciDistributionError> {
                let chunk = chunk?;
                done.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(chunk)
            },
        );
        progress(0, size);
        client
            .push_blob_stream(&r, stream, digest, Some(size))
            .await
            .map_err(|e| {
                reg_err(
                    &canonical,
                    format!("push blob {digest}: {}", self.explain(&r, &e)),
                )
            })?;
        progress(size, size);
        Ok(true)
    }

    /// Uploads a manifest under the tag (or digest) of `reference`; returns its digest.
    pub async fn push_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let r = parse_ref(reference)?;
        let canonical = r.whole();
        let (client, _) = self.authorize(&r, true).await;
        let ct = media_type
            .parse()
            .map_err(|e| reg_err(&canonical, format!("media type {media_type:?}: {e}")))?;
        client
            .push_manifest_raw(&r, bytes.to_vec(), ct)
            .await
            .map_err(|e| {
                reg_err(
                    &canonical,
                    format!("push manifest: {}", self.explain(&r, &e)),
                )
            })?;
        Ok(crate::content::digest_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_e2e::registry::Registry;
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn store() -> anyhow::Result<(tempfile::TempDir, Arc<ContentStore>)> {
        let dir = tempfile::tempdir()?;
        let cs = Arc::new(ContentStore::open(dir.path())?);
        Ok((dir, cs))
    }

    #[test]
    fn references_normalize_like_docker() -> anyhow::Result<()> {
        assert_eq!(
            normalize_reference("busybox")?,
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalize_reference("user/app:1")?, "docker.io/user/app:1");
        assert_eq!(
            normalize_reference("localhost:5000/x:1")?,
            "localhost:5000/x:1"
        );
        assert!(normalize_reference("busybox:bad tag!").is_err());
        assert!(normalize_reference("").is_err());
        Ok(())
    }

    #[test]
    fn platform_is_picked_from_index() {
        let list: Vec<serde_json::Value> = serde_json::from_str(
            r#"[
            {"digest":"sha256:a","platform":{"os":"linux","architecture":"amd64"}},
            {"digest":"sha256:b","platform":{"os":"linux","architecture":"arm","variant":"v6"}},
            {"digest":"sha256:c","platform":{"os":"linux","architecture":"arm","variant":"v7"}},
            {"digest":"sha256:d","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"digest":"sha256:e","platform":{"os":"unknown","architecture":"unknown"}}
        ]"#,
        )
        .unwrap_or_default();
        let pick = |s: &str| {
            Platform::parse(s)
                .and_then(|p| pick_platform(&list, &p))
                .and_then(|m| m["digest"].as_str().map(str::to_string))
        };
        assert_eq!(pick("linux/amd64").as_deref(), Some("sha256:a"));
        assert_eq!(pick("linux/arm64").as_deref(), Some("sha256:d"));
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("sha256:d"));
        assert_eq!(pick("linux/arm/v6").as_deref(), Some("sha256:b"));
        assert_eq!(pick("linux/arm/v7").as_deref(), Some("sha256:c"));
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(pick("windows/amd64"), None);
    }

    #[test]
    fn docker_config_credentials() -> anyhow::Result<()> {
        let cfg = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "reg.example.com:5000":{"username":"u2","password":"p:2"}
        }}"#;
        let basic = |a: RegistryAuth| match a {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        };
        assert_eq!(
            basic(auth_from_docker_config(cfg, "docker.io").map_err(anyhow::Error::msg)?),
            Some(("user".into(), "pass".into()))
        );
        assert_eq!(
            basic(auth_from_docker_config(cfg, "index.docker.io").map_err(anyhow::Error::msg)?),
            Some(("user".into(), "pass".into()))
        );
        assert_eq!(
            basic(
                auth_from_docker_config(cfg, "reg.example.com:5000").map_err(anyhow::Error::msg)?
            ),
            Some(("u2".into(), "p:2".into()))
        );
        assert!(matches!(
            auth_from_docker_config(cfg, "other.io"),
            Ok(RegistryAuth::Anonymous)
        ));
        assert!(auth_from_docker_config(b"{not json", "x").is_err());
        Ok(())
    }

    #[test]
    fn credential_helper_is_chosen_like_docker() -> anyhow::Result<()> {
        let cfg = br#"{"credsStore":"desktop","credHelpers":{
            "gcr.io":"gcloud","https://reg.example.com:5000":"pass","bad.io":"../x"}}"#;
        assert_eq!(credential_helper(cfg, "gcr.io").as_deref(), Some("gcloud"));
        assert_eq!(
            credential_helper(cfg, "reg.example.com:5000").as_deref(),
            Some("pass")
        );
        assert_eq!(
            credential_helper(cfg, "docker.io").as_deref(),
            Some("desktop")
        );
        assert_eq!(credential_helper(cfg, "bad.io"), None);
        assert_eq!(credential_helper(br#"{"auths":{}}"#, "gcr.io"), None);
        assert_eq!(credential_helper(b"{not json", "gcr.io"), None);

        let basic = auth_from_helper_output(br#"{"ServerURL":"x","Username":"u","Secret":"s"}"#)
            .map_err(anyhow::Error::msg)?;
        assert!(matches!(basic, RegistryAuth::Basic(u, s) if u == "u" && s == "s"));
        let err = auth_from_helper_output(br#"{"Username":"<token>","Secret":"refresh"}"#)
            .err()
            .unwrap_or_default();
        assert!(err.contains("identity tokens"), "{err}");
        assert!(auth_from_helper_output(b"nope").is_err());
        Ok(())
    }

    #[test]
    fn credential_helper_program_runs_with_a_timeout() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let script = |name: &str, body: &str| -> anyhow::Result<PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n"))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            Ok(p)
        };
        let secs = std::time::Duration::from_secs;
        // Answers for one server only, echoing what it was asked.
        let good = script(
            "good",
            r#"[ "$1" = get ] || exit 3
server=$(cat)
if [ "$server" = "reg:5000" ]; then
  printf '{"ServerURL":"%s","Username":"u-%s","Secret":"s"}' "$server" "$server"
else
  echo "credentials not found in native keychain"; exit 1
fi"#,
        )?;
        let got = run_helper_program(&good, "reg:5000", secs(10)).map_err(anyhow::Error::msg)?;
        assert!(matches!(got, Some(RegistryAuth::Basic(u, _)) if u == "u-reg:5000"));
        assert!(matches!(
            run_helper_program(&good, "other:1", secs(10)),
            Ok(None)
        ));
        let broken = script("broken", "echo keychain locked >&2; exit 2")?;
        let err = run_helper_program(&broken, "reg:5000", secs(10))
            .err()
            .unwrap_or_default();
        assert!(err.contains("keychain locked"), "{err}");
        let hangs = script("hangs", "exec sleep 30")?;
        let err = run_helper_program(&hangs, "reg:5000", std::time::Duration::from_millis(300))
            .err()
            .unwrap_or_default();
        assert!(err.contains("did not answer"), "{err}");
        let err = run_helper_program(&dir.path().join("absent"), "reg:5000", secs(10))
            .err()
            .unwrap_or_default();
        assert!(err.contains("absent"), "{err}");
        Ok(())
    }

    #[test]
    fn unauthorized_messages_name_the_credentials_never_the_secret() {
        let basic = RegistryAuth::Basic("bob".into(), "s3cret".into());
        let cases = [
            (
                unauthorized_message("r:1", &basic, CredSource::Found("/c.json".into())),
                "unauthorized: r:1 rejected the credentials of user \"bob\" from /c.json",
            ),
            (
                unauthorized_message(
                    "r:1",
                    &RegistryAuth::Bearer("tok".into()),
                    CredSource::Found("/c.json".into()),
                ),
                "unauthorized: r:1 rejected the registry token from /c.json",
            ),
            (
                unauthorized_message("r:1", &RegistryAuth::Anonymous, CredSource::NoConfig),
                "unauthorized: authentication required (no credentials for r:1: \
                 neither $DOCKER_CONFIG nor $HOME is set)",
            ),
            (
                unauthorized_message(
                    "r:1",
                    &RegistryAuth::Anonymous,
                    CredSource::Missing("/c.json".into()),
                ),
                "unauthorized: authentication required (no credentials for r:1: \
                 /c.json does not exist)",
            ),
            (
                unauthorized_message(
                    "r:1",
                    &RegistryAuth::Anonymous,
                    CredSource::NoEntry("/c.json".into()),
                ),
                "unauthorized: authentication required (no credentials for r:1 in /c.json)",
            ),
            (
                unauthorized_message(
                    "r:1",
                    &RegistryAuth::Anonymous,
                    CredSource::Helper("docker-credential-x has none (per /c.json)".into()),
                ),
                "unauthorized: authentication required (no credentials for r:1: \
                 docker-credential-x has none (per /c.json))",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
            assert!(!got.contains("s3cret") && !got.contains("tok\""));
        }
    }

    #[test]
    fn docker_config_location_follows_docker() {
        let p = |e: Option<&str>, dc: Option<&str>, home: Option<&str>| {
            config_path_from(
                e.map(std::path::Path::new),
                dc.map(Into::into),
                home.map(Into::into),
            )
        };
        assert_eq!(
            p(Some("/x/c.json"), Some("/d"), Some("/h")),
            Some(PathBuf::from("/x/c.json"))
        );
        assert_eq!(
            p(None, Some("/d"), Some("/h")),
            Some(PathBuf::from("/d/config.json"))
        );
        assert_eq!(
            p(None, Some(""), Some("/h")),
            Some(PathBuf::from("/h/.docker/config.json"))
        );
        assert_eq!(
            p(None, None, Some("/h")),
            Some(PathBuf::from("/h/.docker/config.json"))
        );
        assert_eq!(p(None, None, None), None);
    }

    #[tokio::test]
    async fn resolve_and_fetch_base_from_registry() -> anyhow::Result<()> {
        let reg = Registry::start()?;
        kiln_e2e::base::push_base(&reg.addr(), "base/busybox:1")?;
        let (dir, cs) = store()?;
        let resolver = ImageResolver::new(RegistryConfig::default(), cs.clone());
        let reference = format!("{}/base/busybox:1", reg.addr());
        let img = resolver.resolve(&reference, &Platform::host()).await?;
        assert_eq!(img.canonical, reference);
        assert_eq!(img.layers.len(), 1);
        assert_eq!(img.config.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(img.config.architecture, Platform::host().architecture);
        assert!(cs.has(&img.digest));
        assert!(cs.has(&img.config_digest));

        let last = Arc::new(AtomicU64::new(0));
        let seen = last.clone();
        let path = resolver
            .fetch_blob(&reference, &img.layers[0], &move |done, total| {
                assert!(total == 0 || done <= total);
                seen.store(done, Ordering::SeqCst);
            })
            .await?;
        assert_eq!(last.load(Ordering::SeqCst), img.layers[0].size);
        assert!(cs.has(&img.layers[0].digest));
        let dest = dir.path().join("unpacked");
        std::fs::create_dir(&dest)?;
        let stats = crate::snapshot::layer::unpack_blob(
            &path,
            &img.layers[0].media_type,
            &dest,
            &Default::default(),
        )?;
        assert_eq!(Some(&stats.diff_id), img.config.rootfs.diff_ids.first());
        assert!(dest.join("bin/busybox").is_file());

        // Pinned by digest resolves to the same manifest.
        let pinned = format!("{}/base/busybox@{}", reg.addr(), img.digest);
        assert_eq!(
            resolver.resolve(&pinned, &Platform::host()).await?.digest,
            img.digest
        );
        Ok(())
    }

    #[tokio::test]
    async fn unknown_tag_is_a_clear_error() -> anyhow::Result<()> {
        let reg = Registry::start()?;
        kiln_e2e::base::push_base(&reg.addr(), "base/busybox:1")?;
        let (_dir, cs) = store()?;
        let resolver = ImageResolver::new(RegistryConfig::default(), cs);
        let reference = format!("{}/base/busybox:nope", reg.addr());
        let err = resolver
            .resolve(&reference, &Platform::host())
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, format!("{reference}: manifest unknown"));
        Ok(())
    }

    #[tokio::test]
    async fn unreachable_registry_is_a_clear_error() -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let (_dir, cs) = store()?;
        let resolver = ImageResolver::new(RegistryConfig::default(), cs);
        let reference = format!("127.0.0.1:{port}/x:1");
        let err = resolver
            .resolve(&reference, &Platform::host())
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, format!("{reference}: connection refused"));
        Ok(())
    }

    #[tokio::test]
    async fn corrupt_blob_is_rejected_and_not_stored() -> anyhow::Result<()> {
        // A fake registry answering every request with the wrong bytes.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for mut conn in listener.incoming().take(4).flatten() {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let body = b"these are not the bytes you are looking for";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(body);
            }
        });
        let (_dir, cs) = store()?;
        let resolver = ImageResolver::new(RegistryConfig::default(), cs.clone());
        let digest = crate::content::digest_bytes(b"the real layer");
        let desc = BlobDesc {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: digest.clone(),
            size: 0,
        };
        let err = resolver
            .fetch_blob(&format!("{addr}/x:1"), &desc, &|_, _| {})
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(&digest), "{err}");
        assert!(!cs.has(&digest));
        assert!(cs.list()?.is_empty());
        Ok(())
    }
}

#[cfg(test)]
mod registry_format_tests {
    use super::*;
    use kiln_e2e::base::{busybox_layout, push_layout};
    use kiln_e2e::registry::Registry;

    #[tokio::test]
    async fn index_picks_platform_and_docker_schema2_resolves() -> anyhow::Result<()> {
        let reg = Registry::start()?;
        let t = tempfile::tempdir()?;
        let cs = Arc::new(ContentStore::open(&t.path().join("cs"))?);
        let resolver = ImageResolver::new(RegistryConfig::default(), cs.clone());
        let mut entries = Vec::new();
        let mut digests = HashMap::new();
        for (arch, variant) in [("amd64", ""), ("arm64", "v8")] {
            let layout = t.path().join(arch);
            busybox_layout(&layout, arch)?;
            push_layout(&layout, &reg.addr(), &format!("multi/img:{arch}"), &[])?;
            let (bytes, digest) = resolver
                .fetch_manifest_raw(&format!("{}/multi/img:{arch}", reg.addr()))
                .await?;
            let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
            if !variant.is_empty() {
                platform["variant"] = variant.into();
            }
            entries.push(serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len(),
                "platform": platform,
            }));
            digests.insert(arch, digest);
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
        }))?;
        let all = format!("{}/multi/img:all", reg.addr());
        resolver.push_manifest(&all, OCI_INDEX, &index).await?;
        for (p, arch) in [("linux/amd64", "amd64"), ("linux/arm64", "arm64")] {
            let platform = Platform::parse(p).ok_or_else(|| anyhow::anyhow!("platform"))?;
            let img = resolver.resolve(&all, &platform).await?;
            assert_eq!(Some(&img.digest), digests.get(arch));
            assert_eq!(img.config.architecture, arch);
        }
        let s390 = Platform::parse("linux/s390x").ok_or_else(|| anyhow::anyhow!("platform"))?;
        let err = resolver
            .resolve(&all, &s390)
            .await
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!("{all}: no manifest for platform linux/s390x"))
        );

        // Docker schema2 (skopeo converts the layout's manifest).
        let layout = t.path().join("amd64");
        push_layout(&layout, &reg.addr(), "docker/img:1", &["--format", "v2s2"])?;
        let reference = format!("{}/docker/img:1", reg.addr());
        let (raw, _) = resolver.fetch_manifest_raw(&reference).await?;
        let m: serde_json::Value = serde_json::from_slice(&raw)?;
        assert_eq!(m["mediaType"], DOCKER_MANIFEST);
        let amd64 = Platform::parse("linux/amd64").ok_or_else(|| anyhow::anyhow!("platform"))?;
        let img = resolver.resolve(&reference, &amd64).await?;
        assert_eq!(
            img.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        let path = resolver
            .fetch_blob(&reference, &img.layers[0], &|_, _| {})
            .await?;
        let dest = t.path().join("unpacked");
        std::fs::create_dir(&dest)?;
        crate::snapshot::layer::unpack_blob(
            &path,
            &img.layers[0].media_type,
            &dest,
            &Default::default(),
        )?;
        assert!(dest
            .join("bin/sh")
            .symlink_metadata()?
            .file_type()
            .is_symlink());
        Ok(())
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;
    use kiln_e2e::registry::Registry;
    use std::sync::atomic::{AtomicU64, Ordering};

    const USER: &str = "kiln-user";
    const PASS: &str = "kiln-pass";

    struct Setup {
        reg: Registry,
        dir: tempfile::TempDir,
        cs: Arc<ContentStore>,
        reference: String,
    }

    /// How the registry authenticates.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        /// HTTP Basic on every request (htpasswd).
        Basic,
        /// Bearer tokens from a token server taking Basic credentials.
        Token,
    }

    const KINDS: [Kind; 2] = [Kind::Basic, Kind::Token];

    /// An auth registry holding the busybox base as `base/busybox:1`.
    fn setup(kind: Kind) -> anyhow::Result<Setup> {
        let reg = match kind {
            Kind::Basic => Registry::start_with_auth(USER, PASS)?,
            Kind::Token => Registry::start_with_token_auth(USER, PASS)?,
        };
        kiln_e2e::base::push_base_with_creds(&reg.addr(), "base/busybox:1", USER, PASS)?;
        let dir = tempfile::tempdir()?;
        let cs = Arc::new(ContentStore::open(&dir.path().join("cs"))?);
        let reference = format!("{}/base/busybox:1", reg.addr());
        Ok(Setup {
            reg,
            dir,
            cs,
            reference,
        })
    }

    fn resolver_with(s: &Setup, user: &str, pass: &str) -> anyhow::Result<ImageResolver> {
        let path = s
            .reg
            .write_docker_config(&s.dir.path().join("docker"), user, pass)?;
        let config = RegistryConfig {
            docker_config: Some(path),
            ..Default::default()
        };
        Ok(ImageResolver::new(config, s.cs.clone()))
    }

    #[tokio::test]
    async fn pull_from_auth_registry_with_docker_config() -> anyhow::Result<()> {
        for kind in KINDS {
            let s = setup(kind)?;
            let resolver = resolver_with(&s, USER, PASS)?;
            let img = resolver.resolve(&s.reference, &Platform::host()).await?;
            assert_eq!(img.layers.len(), 1);
            assert_eq!(img.config.config.cmd, Some(vec!["sh".to_string()]));
            let path = resolver
                .fetch_blob(&s.reference, &img.layers[0], &|_, _| {})
                .await?;
            assert!(s.cs.has(&img.layers[0].digest));
            let dest = s.dir.path().join("unpacked");
            std::fs::create_dir(&dest)?;
            let stats = crate::snapshot::layer::unpack_blob(
                &path,
                &img.layers[0].media_type,
                &dest,
                &Default::default(),
            )?;
            assert_eq!(Some(&stats.diff_id), img.config.rootfs.diff_ids.first());
            assert!(dest.join("bin/busybox").is_file());
        }
        Ok(())
    }

    /// A client's session as `kiln build --addr` serves it to a token-auth registry: it
    /// fetches tokens with its own password and counts how often it is asked for the
    /// password itself.
    #[derive(Debug)]
    struct TokenSession {
        auth: RegistryAuth,
        tokens: AtomicU64,
        credentials: AtomicU64,
    }

    #[async_trait::async_trait]
    impl crate::control::SessionServices for TokenSession {
        async fn secret(&self, _id: &str) -> std::result::Result<Option<Vec<u8>>, String> {
            Ok(None)
        }
        async fn registry_auth(
            &self,
            _host: &str,
        ) -> std::result::Result<Option<RegistryAuth>, String> {
            self.credentials.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        }
        async fn fetch_token(
            &self,
            req: &token::TokenRequest,
        ) -> std::result::Result<Option<token::Token>, String> {
            self.tokens.fetch_add(1, Ordering::SeqCst);
            token::exchange(req, &self.auth).await.map(Some)
        }
    }

    /// A registry open at `/v2/`: neither pulls nor pushes ask the client's session for
    /// credentials (the registry client would not send them there).
    #[tokio::test]
    async fn an_open_registry_costs_the_session_nothing() -> anyhow::Result<()> {
        let reg = Registry::start()?;
        kiln_e2e::base::push_base(&reg.addr(), "base/busybox:1")?;
        let dir = tempfile::tempdir()?;
        let cs = Arc::new(ContentStore::open(dir.path())?);
        let session = Arc::new(TokenSession {
            auth: RegistryAuth::Anonymous,
            tokens: AtomicU64::new(0),
            credentials: AtomicU64::new(0),
        });
        let resolver =
            ImageResolver::new(RegistryConfig::default(), cs).with_session(session.clone());
        let reference = format!("{}/base/busybox:1", reg.addr());
        let dest = format!("{}/pushed/app:1", reg.addr());
        pull_and_push(&resolver, &reference, &dest).await?;
        assert_eq!(session.credentials.load(Ordering::SeqCst), 0);
        assert_eq!(session.tokens.load(Ordering::SeqCst), 0);
        Ok(())
    }

    /// Pulls `reference` (its manifest, config and first layer) and pushes it as `dest`;
    /// returns the manifest's digest.
    async fn pull_and_push(
        resolver: &ImageResolver,
        reference: &str,
        dest: &str,
    ) -> anyhow::Result<String> {
        let img = resolver.resolve(reference, &Platform::host()).await?;
        resolver
            .fetch_blob(reference, &img.layers[0], &|_, _| {})
            .await?;
        resolver
            .push_blob(dest, &img.layers[0].digest, &|_, _| {})
            .await?;
        resolver
            .push_blob(dest, &img.config_digest, &|_, _| {})
            .await?;
        let (manifest, digest) = resolver.fetch_manifest_raw(reference).await?;
        let pushed = resolver
            .push_manifest(
                dest,
                "application/vnd.oci.image.manifest.v1+json",
                &manifest,
            )
            .await?;
        assert_eq!(pushed, digest);
        Ok(digest)
    }

    #[tokio::test]
    async fn tokens_from_the_session_pull_and_push_without_credentials_on_the_worker(
    ) -> anyhow::Result<()> {
        let s = setup(Kind::Token)?;
        let session = Arc::new(TokenSession {
            auth: RegistryAuth::Basic(USER.into(), PASS.into()),
            tokens: AtomicU64::new(0),
            credentials: AtomicU64::new(0),
        });
        // The worker itself has no credentials for this registry.
        let empty = s.dir.path().join("empty.json");
        std::fs::write(&empty, br#"{"auths":{}}"#)?;
        let worker = ImageResolver::new(
            RegistryConfig {
                docker_config: Some(empty.clone()),
                ..Default::default()
            },
            s.cs.clone(),
        );
        let resolver = worker.with_session(session.clone());
        // Push the image to another repository: push-scoped tokens for it.
        let dest = format!("{}/pushed/app:1", s.reg.addr());
        let digest = pull_and_push(&resolver, &s.reference, &dest).await?;
        let (_, again) = resolver.fetch_manifest_raw(&dest).await?;
        assert_eq!(again, digest);
        assert_eq!(session.credentials.load(Ordering::SeqCst), 0);
        // Pull of the base, then pull and push of the destination; cached after that.
        let fetched = session.tokens.load(Ordering::SeqCst);
        assert!((3..=4).contains(&fetched), "{fetched} token requests");

        // A client whose token request fails: the worker falls back to asking for
        // credentials, gets none, and says the registry refused.
        let wrong = Arc::new(TokenSession {
            auth: RegistryAuth::Basic(USER.into(), "wrong".into()),
            tokens: AtomicU64::new(0),
            credentials: AtomicU64::new(0),
        });
        let cs2 = Arc::new(ContentStore::open(&s.dir.path().join("cs2"))?);
        let resolver = ImageResolver::new(
            RegistryConfig {
                docker_config: Some(empty),
                ..Default::default()
            },
            cs2,
        )
        .with_session(wrong.clone());
        let err = resolver
            .resolve(&s.reference, &Platform::host())
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unauthorized"), "{err}");
        assert_eq!(wrong.credentials.load(Ordering::SeqCst), 1);
        Ok(())
    }

    #[tokio::test]
    async fn pull_without_credentials_is_a_clear_error() -> anyhow::Result<()> {
        for kind in KINDS {
            let s = setup(kind)?;
            // A docker config with no entry for this registry.
            let path = s.dir.path().join("empty.json");
            std::fs::write(&path, br#"{"auths":{"other.example.com":{"auth":"dTpw"}}}"#)?;
            let config = RegistryConfig {
                docker_config: Some(path.clone()),
                ..Default::default()
            };
            let resolver = ImageResolver::new(config, s.cs.clone());
            let err = resolver
                .resolve(&s.reference, &Platform::host())
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.starts_with(&s.reference), "{kind:?}: {err}");
            assert!(
                err.contains("unauthorized: authentication required"),
                "{kind:?}: {err}"
            );
            assert!(err.contains(&path.display().to_string()), "{kind:?}: {err}");
            assert!(s.cs.list()?.is_empty());
        }
        Ok(())
    }

    #[tokio::test]
    async fn pull_with_wrong_password_is_a_clear_error() -> anyhow::Result<()> {
        for kind in KINDS {
            let s = setup(kind)?;
            let resolver = resolver_with(&s, USER, "not-the-password")?;
            let err = resolver
                .resolve(&s.reference, &Platform::host())
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.starts_with(&s.reference), "{kind:?}: {err}");
            assert!(err.contains("unauthorized"), "{kind:?}: {err}");
            assert!(err.contains(&format!("user {USER:?}")), "{kind:?}: {err}");
            assert!(!err.contains("not-the-password"), "{kind:?}: {err}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn push_to_auth_registry_and_pull_back() -> anyhow::Result<()> {
        for kind in KINDS {
            let s = setup(kind)?;
            let layer_dir = s.dir.path().join("layer");
            std::fs::create_dir_all(layer_dir.join("etc"))?;
            std::fs::write(layer_dir.join("etc/hello"), "hello\n")?;
            let mut config = ImageConfigFile {
                architecture: Platform::host().architecture,
                os: "linux".into(),
                ..Default::default()
            };
            config.config.cmd = Some(vec!["sh".into()]);
            let built = crate::export::image::build_image(
                &s.cs,
                &[crate::export::ExportLayer {
                    dir: layer_dir,
                    blobs: Vec::new(),
                }],
                &config,
                &Default::default(),
            )?;
            let name = format!("{}/pushed/img:1", s.reg.addr());

            // Without credentials the push fails, naming the image.
            let anon = ImageResolver::new(
                RegistryConfig {
                    docker_config: Some(s.dir.path().join("missing.json")),
                    ..Default::default()
                },
                s.cs.clone(),
            );
            let err = crate::export::image::push(&anon, &s.cs, &built, &name, &|_, _| {})
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.starts_with(&format!("push {name}")), "{kind:?}: {err}");
            assert!(
                err.contains("unauthorized: authentication required"),
                "{kind:?}: {err}"
            );

            // With a wrong password it fails too, naming the user.
            let wrong = resolver_with(&s, USER, "wrong")?;
            let err = crate::export::image::push(&wrong, &s.cs, &built, &name, &|_, _| {})
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.starts_with(&format!("push {name}")), "{kind:?}: {err}");
            assert!(
                err.contains(&format!("rejected the credentials of user {USER:?}")),
                "{kind:?}: {err}"
            );

            let resolver = resolver_with(&s, USER, PASS)?;
            crate::export::image::push(&resolver, &s.cs, &built, &name, &|_, _| {}).await?;
            let cs2 = Arc::new(ContentStore::open(&s.dir.path().join("cs2"))?);
            let puller = ImageResolver::new(resolver.registry_config().clone(), cs2);
            let img = puller.resolve(&name, &Platform::host()).await?;
            assert_eq!(img.digest, built.manifest_digest);
            assert_eq!(img.config_digest, built.config_digest);
        }
        Ok(())
    }
}
