//! Registry bearer tokens obtained by the client (`moby.filesync.v1.Auth/FetchToken`,
//! shared/design/buildkit-wire.md §6.3), so a daemon's build reaches a token-auth registry
//! without the client's password ever leaving the client: the worker reads the registry's
//! challenge, asks the client's session for a token for exactly the scope it needs, and
//! hands the token to its registry client.
//!
//! * [`challenge`]: the registry's `WWW-Authenticate` answer to `GET /v2/`.
//! * [`exchange`]: the token request itself (client side, with the client's credentials).
//! * [`Tokens`]: the worker's per-build cache of tokens by host, repository and access.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;

/// A token request: what the daemon asks the client for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The registry host (`host[:port]`).
    pub host: String,
    /// The token server URL from the challenge.
    pub realm: String,
    /// The `service` of the challenge.
    pub service: String,
    /// Scopes such as `repository:team/app:pull,push`.
    pub scopes: Vec<String>,
}

/// A bearer token and how long it is good for.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The token.
    pub token: String,
    /// Seconds it is valid for from when it was issued (0 = unknown).
    pub expires_in: u64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Token")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// How a registry asks to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// No authentication (no 401, or no `WWW-Authenticate`).
    None,
    /// HTTP Basic: the credentials themselves go to the registry.
    Basic,
    /// Bearer tokens from `realm` for `service`.
    Bearer {
        /// Token server URL.
        realm: String,
        /// Service name to ask for.
        service: String,
    },
}

/// Reads the challenge in a `WWW-Authenticate` header value.
pub fn parse_challenge(header: &str) -> Challenge {
    let Ok(challenges) = http_auth::parse_challenges(header) else {
        return Challenge::None;
    };
    for c in &challenges {
        if c.scheme.eq_ignore_ascii_case("bearer") {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
                    .unwrap_or_default()
            };
            let realm = param("realm");
            if !realm.is_empty() {
                return Challenge::Bearer {
                    realm,
                    service: param("service"),
                };
            }
        }
    }
    if challenges
        .iter()
        .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
    {
        return Challenge::Basic;
    }
    Challenge::None
}

/// The HTTP client for challenges and token requests: one per process and TLS mode, so the
/// root store is loaded once rather than on every probe (every daemon build probes).
fn http_client(accept_invalid_certs: bool) -> Result<reqwest::Client, String> {
    static VERIFYING: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    static INSECURE: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    let cell = if accept_invalid_certs {
        &INSECURE
    } else {
        &VERIFYING
    };
    cell.get_or_init(|| {
        super::install_crypto_provider();
        reqwest::Client::builder()
            .danger_accept_invalid_certs(accept_invalid_certs)
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(60))
            // No kept connections: they would belong to the first caller's runtime, and
            // these requests are one-offs anyway.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("http client: {e}"))
    })
    .clone()
}

/// Asks `scheme://host/v2/` how to authenticate (`plain_http` registries are also not
/// TLS-verified, as Docker's insecure registries).
pub async fn challenge(host: &str, plain_http: bool) -> Result<Challenge, String> {
    let scheme = if plain_http { "http" } else { "https" };
    let url = format!("{scheme}://{host}/v2/");
    let resp = http_client(plain_http)?
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
        return Ok(Challenge::None);
    }
    Ok(resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(parse_challenge)
        .unwrap_or(Challenge::None))
}

/// Client side: gets a token from `req.realm` with `auth` (Basic credentials, or none for
/// an anonymous token; a stored registry token is returned as it is).
pub async fn exchange(req: &TokenRequest, auth: &RegistryAuth) -> Result<Token, String> {
    if let RegistryAuth::Bearer(t) = auth {
        return Ok(Token {
            token: t.clone(),
            expires_in: 0,
        });
    }
    let url =
        reqwest::Url::parse(&req.realm).map_err(|e| format!("token realm {:?}: {e}", req.realm))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("token realm {:?}: not an http(s) URL", req.realm));
    }
    let mut query: Vec<(&str, &str)> = Vec::new();
    if !req.service.is_empty() {
        query.push(("service", &req.service));
    }
    for s in &req.scopes {
        query.push(("scope", s));
    }
    let mut get = http_client(false)?.get(url).query(&query);
    if let RegistryAuth::Basic(user, password) = auth {
        get = get.basic_auth(user, Some(password));
    }
    let resp = get
        .send()
        .await
        .map_err(|e| format!("token server {}: {e}", req.realm))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!(
            "token server {} answered {status} for {}",
            req.realm,
            req.scopes.join(" ")
        ));
    }
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("token server {}: the answer is not json: {e}", req.realm))?;
    let token = body["token"]
        .as_str()
        .or_else(|| body["access_token"].as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("token server {}: no token in the answer", req.realm))?;
    Ok(Token {
        token: token.to_string(),
        expires_in: body["expires_in"].as_u64().unwrap_or(0),
    })
}

/// Tokens by (host, repository, push access), each until shortly before it expires
/// (60 s when the server does not say, as distribution's default).
#[derive(Debug, Default)]
pub struct Tokens {
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

/// Host, repository, push access.
type TokenKey = (String, String, bool);

impl Tokens {
    /// A cached token that is still good.
    pub fn get(&self, host: &str, repo: &str, push: bool) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        let (token, until) = tokens.get(&(host.to_string(), repo.to_string(), push))?;
        (Instant::now() < *until).then(|| token.clone())
    }

    /// Keeps `token`.
    pub fn put(&self, host: &str, repo: &str, push: bool, token: &Token) {
        let life = if token.expires_in == 0 {
            60
        } else {
            token.expires_in
        };
        // Renew a little early so a long call does not start with a dying token.
        let until = Instant::now() + Duration::from_secs(life.saturating_sub(10).max(5));
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(
                (host.to_string(), repo.to_string(), push),
                (token.token.clone(), until),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_like_docker() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: "registry.example".into()
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="kiln-test""#),
            Challenge::Basic
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), Challenge::None);
        assert_eq!(parse_challenge("\u{0}garbage"), Challenge::None);
    }

    #[test]
    fn tokens_are_kept_per_repository_and_access() {
        let t = Tokens::default();
        t.put(
            "r:5000",
            "a/b",
            false,
            &Token {
                token: "pull".into(),
                expires_in: 300,
            },
        );
        assert_eq!(t.get("r:5000", "a/b", false).as_deref(), Some("pull"));
        assert_eq!(t.get("r:5000", "a/b", true), None);
        assert_eq!(t.get("r:5000", "a/c", false), None);
        assert!(!format!(
            "{:?}",
            Token {
                token: "s3cret".into(),
                expires_in: 1
            }
        )
        .contains("s3cret"));
    }
}
