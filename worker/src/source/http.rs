//! HTTP(S) sources: downloads a URL (reqwest over rustls with ring, the stack the registry
//! client uses) into a file while hashing it, verifies an expected checksum, and tells
//! tarballs (plain or gzip) from single files for remote build contexts.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::{Error, Result};

fn http_err(url: &str, message: impl std::fmt::Display) -> Error {
    Error::Http {
        url: super::git::redact(url),
        message: message.to_string(),
    }
}

/// A parsed `http://` or `https://` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSpec {
    /// The URL.
    pub url: String,
    /// `http.checksum` (`sha256:…`), verified after the download.
    pub checksum: Option<String>,
    /// The file name in the result (`http.filename`, else the URL's last segment).
    pub filename: String,
    /// Mode bits (`http.perm`, default `0600`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

// === impl HttpSpec ===

impl HttpSpec {
    /// Parses the whole identifier (the URL) and the op's `http.*` attributes.
    pub fn parse(url: &str, attrs: &HashMap<String, String>) -> Result<HttpSpec> {
        let parsed = reqwest::Url::parse(url).map_err(|e| http_err(url, e))?;
        let get = |k: &str| attrs.get(k).filter(|v| !v.is_empty());
        let filename = match get("http.filename") {
            Some(f) => f.clone(),
            None => parsed
                .path_segments()
                .and_then(|mut s| s.next_back().map(str::to_string))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "index".to_string()),
        };
        if filename.contains('/') || filename == "." || filename == ".." {
            return Err(http_err(
                url,
                format!("file name {filename:?} must be one path segment"),
            ));
        }
        let num = |k: &str, radix: u32, default: u32| -> Result<u32> {
            match get(k) {
                None => Ok(default),
                Some(v) => u32::from_str_radix(v, radix)
                    .map_err(|e| http_err(url, format!("{k} {v:?}: {e}"))),
            }
        };
        let checksum = get("http.checksum").cloned();
        if let Some(c) = &checksum {
            let hex = c.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(http_err(
                    url,
                    format!("http.checksum {c:?} is not sha256:<64 hex>"),
                ));
            }
        }
        Ok(HttpSpec {
            url: url.to_string(),
            checksum,
            filename,
            perm: num("http.perm", 8, 0o600)?,
            uid: num("http.uid", 10, 0)?,
            gid: num("http.gid", 10, 0)?,
        })
    }
}

fn client() -> Result<reqwest::Client> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .build()
        .map_err(|e| http_err("", format!("http client: {e}")))
}

/// Downloads `url` into `dest` (created or truncated) and returns its `sha256:` digest.
/// A non-2xx answer is an error naming the URL and the status.
pub async fn download(url: &str, dest: &Path) -> Result<String> {
    let resp = client()?
        .get(url)
        .send()
        .await
        .map_err(|e| http_err(url, e))?;
    if !resp.status().is_success() {
        return Err(http_err(url, format!("server answered {}", resp.status())));
    }
    let mut file = std::fs::File::create(dest).map_err(|e| http_err(url, e))?;
    let mut hash = Sha256::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| http_err(url, e))?;
        hash.update(&chunk);
        file.write_all(&chunk).map_err(|e| http_err(url, e))?;
    }
    file.sync_all().map_err(|e| http_err(url, e))?;
    Ok(format!("sha256:{}", hex::encode(hash.finalize())))
}

/// Checks a downloaded digest against the expected checksum.
pub fn verify(url: &str, expected: Option<&str>, got: &str) -> Result<()> {
    match expected {
        Some(want) if !want.eq_ignore_ascii_case(got) => Err(http_err(
            url,
            format!("checksum mismatch: expected {want}, got {got}"),
        )),
        _ => Ok(()),
    }
}

/// What a downloaded file is: a gzip tarball, a plain tarball or something else.
pub fn archive_kind(path: &Path) -> std::io::Result<Option<&'static str>> {
    use std::io::Read as _;
    let mut head = vec![0u8; 512];
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    if n >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        return Ok(Some("gzip"));
    }
    if n >= 262 && &head[257..262] == b"ustar" {
        return Ok(Some("tar"));
    }
    Ok(None)
}
