//! Image configuration and platform types, as plain data shared by the frontend (which
//! fills the config from Dockerfile instructions), image sources (which read it from a
//! pulled image) and exporters (which write it). Docker's JSON field names are kept so
//! that `docker load` and registries see what Docker writes, including the Docker
//! extensions OCI lacks (Healthcheck, OnBuild, Shell). No I/O here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An image config file (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfigFile {
    /// Creation time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// CPU architecture (`amd64`, `arm64`, …).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// Architecture variant (`v8`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// How containers from this image run.
    #[serde(default)]
    pub config: ContainerConfig,
    /// The layers' uncompressed digests, lowest first.
    #[serde(default)]
    pub rootfs: RootFs,
    /// One entry per instruction, layer-producing or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    /// Keys this type does not model, kept so a pulled config round-trips.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The `config` object of an image config, with Docker's field names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `USER`: a name or uid, optionally `:group`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `EXPOSE`: keys like `80/tcp`, values `{}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
    /// `ENV`: `K=V` in order of definition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`: keys are paths, values `{}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, serde_json::Value>,
    /// `WORKDIR`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `LABEL`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `STOPSIGNAL`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    /// `HEALTHCHECK` (Docker extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthConfig>,
    /// `ONBUILD` triggers, as written (Docker extension).
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "OnBuild")]
    pub on_build: Vec<String>,
    /// `SHELL` (Docker extension).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shell: Vec<String>,
    /// Set when CMD/ENTRYPOINT were given in shell form on Windows; kept for round-trips.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_escaped: bool,
}

/// A `HEALTHCHECK` as Docker stores it; durations are nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    /// `--interval`, nanoseconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    /// `--timeout`, nanoseconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    /// `--start-period`, nanoseconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    /// `--start-interval`, nanoseconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    /// `--retries`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub typ: String,
    /// Uncompressed layer digests, lowest first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            typ: "layers".to_string(),
            diff_ids: Vec::new(),
        }
    }
}

/// One history entry of an image config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction that made this entry.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    /// Free-form comment (`buildkit.dockerfile.v0`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// True when the instruction produced no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// An OCI platform (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `v7`, `v8`, … or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl Default for Platform {
    fn default() -> Self {
        Platform::host()
    }
}

impl Platform {
    /// The platform this process runs on.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: if architecture == "arm64" {
                "v8".to_string()
            } else {
                String::new()
            },
        }
    }

    /// Parses `os/arch[/variant]`; `None` when malformed.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.trim().split('/');
        let os = parts.next().filter(|p| !p.is_empty())?.to_ascii_lowercase();
        let architecture = parts.next().filter(|p| !p.is_empty())?.to_ascii_lowercase();
        let variant = parts.next().unwrap_or("").to_ascii_lowercase();
        if parts.next().is_some() {
            return None;
        }
        Some(Platform {
            os,
            architecture,
            variant,
        })
    }

    /// The LLB form of this platform.
    pub fn to_pb(&self) -> kiln_proto::pb::Platform {
        kiln_proto::pb::Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
            ..Default::default()
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_docker_names() -> anyhow::Result<()> {
        let json = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"OnBuild":["RUN x"],"Healthcheck":{"Test":["CMD","true"],"Interval":1000}},"rootfs":{"type":"layers","diff_ids":["sha256:00"]},"moby.extra":1}"#;
        let cfg: ImageConfigFile = serde_json::from_str(json)?;
        assert_eq!(cfg.config.env, vec!["PATH=/bin"]);
        assert_eq!(cfg.config.on_build, vec!["RUN x"]);
        assert_eq!(
            cfg.config.healthcheck.as_ref().map(|h| h.interval),
            Some(1000)
        );
        let back: serde_json::Value = serde_json::to_value(&cfg)?;
        assert_eq!(back["moby.extra"], 1);
        assert_eq!(back["config"]["Cmd"][0], "sh");
        Ok(())
    }

    #[test]
    fn platform_parse() {
        assert_eq!(
            Platform::parse("linux/arm64/v8").map(|p| p.to_string()),
            Some("linux/arm64/v8".to_string())
        );
        assert_eq!(Platform::parse("linux"), None);
        assert_eq!(Platform::parse("a/b/c/d"), None);
    }
}

/// RFC 3339 UTC time as Go's `time.Time` marshals it (`2026-11-27T08:14:53.12Z`):
/// fractional seconds with trailing zeros trimmed, none when whole. Used for image config
/// times and progress timestamps.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let base = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    if nanos == 0 {
        format!("{base}Z")
    } else {
        let frac = format!("{nanos:09}");
        format!("{base}.{}Z", frac.trim_end_matches('0'))
    }
}

// === impl ImageName ===

/// A parsed image reference with Docker's defaults applied
/// (`busybox` → `docker.io/library/busybox:latest`).
///
/// Hand-parsed on purpose: the regex-based parser of the registry client compiles its
/// grammar on first use, which costs most of a cached rebuild's time in a one-shot CLI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageName {
    /// Registry host, with port (`docker.io`, `localhost:5000`).
    pub domain: String,
    /// Repository path (`library/busybox`).
    pub path: String,
    /// Tag, if any (`latest` is filled in only when there is neither tag nor digest).
    pub tag: Option<String>,
    /// `algo:hex` digest, if pinned.
    pub digest: Option<String>,
}

impl ImageName {
    /// Parses and normalizes `s`; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<ImageName, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty image reference".into());
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let (algo, hex) = d
                    .split_once(':')
                    .ok_or_else(|| format!("invalid digest {d:?}"))?;
                let algo_ok = !algo.is_empty()
                    && algo.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c)
                    });
                let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
                if !algo_ok || !hex_ok {
                    return Err(format!("invalid digest {d:?}"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                let tag_ok = !t.is_empty()
                    && t.len() <= 128
                    && t.chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
                if !tag_ok {
                    return Err(format!("invalid tag {t:?}"));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        if name.len() > 255 {
            return Err("repository name longer than 255 characters".into());
        }
        let (domain, path) = match name.split_once('/') {
            Some((d, p))
                if d.contains('.')
                    || d.contains(':')
                    || d == "localhost"
                    || d != d.to_lowercase() =>
            {
                (d.to_string(), p.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let domain = if domain == "index.docker.io" {
            "docker.io".to_string()
        } else {
            domain
        };
        let host = domain.rsplit_once(':').map(|(h, _)| h).unwrap_or(&domain);
        let port_ok = domain
            .rsplit_once(':')
            .map(|(_, p)| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            .unwrap_or(true);
        let host_ok = (host.starts_with('[') && host.ends_with(']'))
            || (!host.is_empty()
                && host.split('.').all(|c| {
                    !c.is_empty()
                        && !c.starts_with('-')
                        && !c.ends_with('-')
                        && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                }));
        if !host_ok || !port_ok {
            return Err(format!("invalid registry {domain:?}"));
        }
        if path.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("repository name {path:?} must be lowercase"));
        }
        for comp in path.split('/') {
            if !path_component_ok(comp) {
                return Err(format!("invalid repository name {path:?}"));
            }
        }
        let path = if domain == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageName {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path` without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn path_component_ok(c: &str) -> bool {
    if c.is_empty() {
        return false;
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|x| x == '-');
        if !ok {
            return false;
        }
    }
    true
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod name_tests {
    use super::ImageName;

    fn n(s: &str) -> String {
        ImageName::parse(s)
            .map(|n| n.to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("user/app:1.0"), "docker.io/user/app:1.0");
        assert_eq!(n("localhost:5000/a/b"), "localhost:5000/a/b:latest");
        assert_eq!(n("localhost/a"), "localhost/a:latest");
        assert_eq!(n("127.0.0.1:5000/base:1"), "127.0.0.1:5000/base:1");
        assert_eq!(n("index.docker.io/library/x"), "docker.io/library/x:latest");
        let d = "sha256:1eda68bf14238642ad7d6293c1976587919b519b9f25264b4a41a9eb5c15ecb4";
        assert_eq!(n(&format!("r.io/a@{d}")), format!("r.io/a@{d}"));
        assert_eq!(n(&format!("r.io/a:t@{d}")), format!("r.io/a:t@{d}"));
        assert_eq!(
            n("my-reg.example.com:443/a__b/c-d.e:v1_2"),
            "my-reg.example.com:443/a__b/c-d.e:v1_2"
        );
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "UPPER",
            "a/B",
            "a:",
            "a:-x",
            "a@sha256:12",
            "a//b",
            "-a",
            "a.",
            "r.io:x/a",
            "a b",
        ] {
            assert!(
                n(bad).starts_with("error"),
                "{bad:?} accepted as {}",
                n(bad)
            );
        }
    }
}
