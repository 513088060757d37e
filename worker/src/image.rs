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
