//! Frontends turn a build description into LLB. Only `dockerfile.v0` exists. A
//! frontend does no I/O: what it needs from outside (base image configs, the
//! `.dockerignore` text) is handed to it; it may use only `llb` and `image` (and the
//! pure `.dockerignore` parser in `source::local::patterns`).
//!
//! A caller resolves images in rounds, then converts:
//!
//! ```text
//! refs = dockerfile::required_images(src, opts)        // FROM, COPY --from, mount from
//! images = resolve(refs)
//! while missing = dockerfile::missing_images(src, opts, &images), !missing.is_empty():
//!     images += resolve(missing)                        // e.g. named by ONBUILD triggers
//! converted = dockerfile::convert(src, opts, &images)
//! ```

pub mod dockerfile;

use std::collections::{BTreeMap, HashMap};

use crate::image::{ImageConfigFile, Platform};
use crate::llb::pb;

/// What the Dockerfile frontend can reject.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A syntax or semantic error at a line of the Dockerfile.
    #[error("{file}:{line}: {message}")]
    Dockerfile {
        /// The Dockerfile's name as the user gave it.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An error not tied to one line (unknown target, empty file, …).
    #[error("{file}: {message}")]
    General {
        /// The Dockerfile's name as the user gave it.
        file: String,
        /// What is wrong.
        message: String,
    },
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Options of one Dockerfile build (the `--opt` keys of `dockerfile.v0`).
#[derive(Debug, Clone, Default)]
pub struct BuildOpts {
    /// Name of the Dockerfile for error messages (`Dockerfile`).
    pub filename: String,
    /// `--target`: the stage to build; the last stage when `None`.
    pub target: Option<String>,
    /// `build-arg:K=V`.
    pub build_args: BTreeMap<String, String>,
    /// `label:K=V`, added to the image config.
    pub labels: BTreeMap<String, String>,
    /// Target platform; the build platform when `None`.
    pub platform: Option<Platform>,
    /// The platform the build runs on (BUILDPLATFORM).
    pub build_platform: Platform,
    /// Text of `.dockerignore` from the context, if there is one.
    pub dockerignore: Option<String>,
    /// Name of the local that holds the context (`context`).
    pub context_name: String,
    /// `no-cache`: every vertex gets `ignore_cache`.
    pub no_cache: bool,
}

impl BuildOpts {
    /// Options from `dockerfile.v0` frontend attributes (buildctl's `--opt K=V`):
    /// `filename`, `target`, `build-arg:*`, `label:*`, `platform`, `no-cache`,
    /// `contextkey`. The error names the attribute.
    pub fn from_attrs(attrs: &BTreeMap<String, String>) -> Result<BuildOpts, String> {
        let mut b = BuildOpts {
            filename: attrs
                .get("filename")
                .cloned()
                .unwrap_or_else(|| "Dockerfile".into()),
            target: attrs.get("target").filter(|t| !t.is_empty()).cloned(),
            build_platform: Platform::host(),
            context_name: attrs
                .get("contextkey")
                .cloned()
                .unwrap_or_else(|| "context".into()),
            no_cache: attrs.contains_key("no-cache"),
            ..Default::default()
        };
        for (k, v) in attrs {
            if let Some(name) = k.strip_prefix("build-arg:") {
                b.build_args.insert(name.to_string(), v.clone());
            } else if let Some(name) = k.strip_prefix("label:") {
                b.labels.insert(name.to_string(), v.clone());
            }
        }
        if let Some(p) = attrs.get("platform") {
            let list: Vec<&str> = p.split(',').filter(|s| !s.is_empty()).collect();
            if list.len() > 1 {
                return Err(format!(
                    "platform={p}: multi-platform builds are not implemented yet"
                ));
            }
            if let Some(one) = list.first() {
                b.platform = Some(
                    Platform::parse(one)
                        .ok_or_else(|| format!("platform={one}: expected os/arch[/variant]"))?,
                );
            }
        }
        Ok(b)
    }
}

/// An image the Dockerfile refers to (FROM or COPY --from), to be resolved before conversion.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The reference as written after ARG expansion (`busybox`, `localhost:5000/x:1`).
    pub reference: String,
    /// The platform to resolve it for.
    pub platform: Platform,
}

/// A resolved image: its manifest digest and config.
#[derive(Debug, Clone)]
pub struct ResolvedImageMeta {
    /// Canonical reference with tag (`docker.io/library/busybox:latest`).
    pub canonical: String,
    /// Manifest digest the build pins to.
    pub digest: String,
    /// The image's config.
    pub config: ImageConfigFile,
}

/// What conversion produces.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The LLB of the target stage.
    pub definition: pb::Definition,
    /// The image config of the target stage (env, cmd, labels, history, …).
    pub config: ImageConfigFile,
    /// Non-fatal remarks (`# syntax=` ignored, …), with their lines.
    pub warnings: Vec<String>,
}

/// Images needed, keyed the way [`Converted`] expects them in `images`.
pub type ResolvedImages = HashMap<ImageRef, ResolvedImageMeta>;
