//! Sharing results through a registry or an OCI layout: Kiln's cache format (documented in
//! `docs/cache-format.md`), `--export-cache`/`--import-cache` entries with BuildKit's
//! attributes, the exporter that turns cached refs into blobs, a cache config and a
//! manifest, and the importer that turns records back into local refs (every blob verified
//! by digest, every layer by diffID). The pool cache is in [`super::pool`]. May use
//! `content`, `snapshot`, `source::image` (registry access) and `export::image` (layer
//! blobs); used by `control` and by the solver through [`RemoteCache`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cache, Ref};
use crate::content::ContentStore;
use crate::export::image::ImageOpts;
use crate::export::{ExportLayer, LayerBlob};
use crate::image::ImageConfigFile;
use crate::snapshot::layer::{unpack_blob, UnpackLimits};
use crate::solver::{RemoteCache, VertexCtx};
use crate::source::image::{
    BlobDesc, ImageResolver, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST,
};

/// Media type of Kiln's cache config blob.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.cacheconfig.v1+json";
/// Manifest annotation holding a copy of the cache config blob (read instead of fetching
/// the blob when its digest and size match the config descriptor).
pub const CONFIG_ANNOTATION: &str = "dev.kiln.cacheconfig.v1";
/// Largest cache config copied into [`CONFIG_ANNOTATION`].
const MAX_EMBEDDED_CONFIG: usize = 64 * 1024;
/// Annotation carrying a layer blob's uncompressed digest (containerd's name).
pub const UNCOMPRESSED_ANNOTATION: &str = "containerd.io/uncompressed";
/// Image config label holding the cache config of an inline cache (`type=inline`).
pub const INLINE_LABEL: &str = "dev.kiln.cache.v1";
/// Prefix of pool cache tags: `kiln-<64 hex>`.
pub const POOL_TAG_PREFIX: &str = "kiln-";

/// What can go wrong exporting or importing a cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A cache entry's attributes are invalid.
    #[error("cache {typ}: {message}")]
    Attr {
        /// The entry's type (`registry`, `local`).
        typ: String,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing a cache failed.
    #[error("cache {target}: {message}")]
    Remote {
        /// The cache reference or directory.
        target: String,
        /// What failed.
        message: String,
    },
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn remote(target: &str, message: impl std::fmt::Display) -> Error {
    Error::Remote {
        target: target.to_string(),
        message: message.to_string(),
    }
}

// === format ===

/// A layer blob as the cache config lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigLayer {
    /// Blob media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Digest of the uncompressed tar.
    #[serde(rename = "diffID")]
    pub diff_id: String,
}

/// One output's result: indexes into [`CacheConfig::layers`], lowest first; `None` is an
/// empty layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// `<vertex key>:<output>`.
    pub key: String,
    /// The layer chain.
    pub layers: Vec<Option<usize>>,
}

/// The cache config blob ([`CONFIG_MEDIA_TYPE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Always 1.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Every distinct blob once.
    pub layers: Vec<ConfigLayer>,
    /// Results by key.
    pub records: Vec<ConfigRecord>,
    /// Cache mount contents (`cache-mounts=true`), absent when none were exported.
    #[serde(rename = "cacheMounts", default, skip_serializing_if = "Vec::is_empty")]
    pub cache_mounts: Vec<ConfigMount>,
    /// Definition keys and the content-based cache keys they were computed to (the pool
    /// cache's alias objects; see `docs/cache-format.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<ConfigAlias>,
}

/// The contents of one cache mount: a layer of [`CacheConfig::layers`] holding the mount
/// directory's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigMount {
    /// The mount's id (`RUN --mount=type=cache,id=…`; its target when no id was given).
    pub id: String,
    /// Index into [`CacheConfig::layers`].
    pub layer: usize,
}

/// A definition key and the cache key computed from it and its inputs' contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigAlias {
    /// The definition key (`sha256:…`).
    pub key: String,
    /// The vertex cache key it stands for (`sha256:…`).
    pub to: String,
}

/// A layer chain: blobs lowest first, `None` for an empty layer.
pub type Chain = Vec<Option<LayerBlob>>;

impl CacheConfig {
    /// The config of `records` (key → chain), listing each blob once.
    pub fn new(records: &[(String, Chain)]) -> CacheConfig {
        let mut layers: Vec<ConfigLayer> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(records.len());
        for (key, chain) in records {
            let idx = chain
                .iter()
                .map(|b| {
                    b.as_ref().map(|b| {
                        *index.entry(b.digest.clone()).or_insert_with(|| {
                            layers.push(ConfigLayer {
                                media_type: b.media_type.clone(),
                                digest: b.digest.clone(),
                                size: b.size,
                                diff_id: b.diff_id.clone(),
                            });
                            layers.len() - 1
                        })
                    })
                })
                .collect();
            out.push(ConfigRecord {
                key: key.clone(),
                layers: idx,
            });
        }
        CacheConfig {
            schema_version: 1,
            layers,
            records: out,
            cache_mounts: Vec::new(),
            aliases: Vec::new(),
        }
    }

    /// Adds cache mount contents (id → blob), listing each blob once.
    pub fn add_mounts(&mut self, mounts: &[(String, LayerBlob)]) {
        for (id, b) in mounts {
            let layer = match self.layers.iter().position(|l| l.digest == b.digest) {
                Some(i) => i,
                None => {
                    self.layers.push(ConfigLayer {
                        media_type: b.media_type.clone(),
                        digest: b.digest.clone(),
                        size: b.size,
                        diff_id: b.diff_id.clone(),
                    });
                    self.layers.len() - 1
                }
            };
            self.cache_mounts.push(ConfigMount {
                id: id.clone(),
                layer,
            });
        }
    }

    /// The cache mounts as id → blob.
    pub fn mounts(&self) -> Vec<(String, LayerBlob)> {
        self.cache_mounts
            .iter()
            .filter_map(|m| {
                self.layers.get(m.layer).map(|l| {
                    (
                        m.id.clone(),
                        LayerBlob {
                            media_type: l.media_type.clone(),
                            digest: l.digest.clone(),
                            size: l.size,
                            diff_id: l.diff_id.clone(),
                        },
                    )
                })
            })
            .collect()
    }

    /// Parses and checks a config blob: schema version, digests, layer indexes.
    pub fn parse(bytes: &[u8]) -> Result<CacheConfig, String> {
        let c: CacheConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid cache config: {e}"))?;
        if c.schema_version != 1 {
            return Err(format!(
                "unsupported cache config schemaVersion {}",
                c.schema_version
            ));
        }
        for l in &c.layers {
            for d in [&l.digest, &l.diff_id] {
                crate::content::validate_digest(d)
                    .map_err(|e| format!("invalid digest in cache config: {e}"))?;
            }
        }
        if let Some(bad) = c.cache_mounts.iter().find(|m| m.layer >= c.layers.len()) {
            return Err(format!(
                "cache mount {:?} names layer {} of {}",
                bad.id,
                bad.layer,
                c.layers.len()
            ));
        }
        for a in &c.aliases {
            for d in [&a.key, &a.to] {
                crate::content::validate_digest(d)
                    .map_err(|e| format!("invalid key in cache config alias: {e}"))?;
            }
        }
        for r in &c.records {
            if let Some(bad) = r.layers.iter().flatten().find(|i| **i >= c.layers.len()) {
                return Err(format!(
                    "record {} names layer {bad} of {}",
                    r.key,
                    c.layers.len()
                ));
            }
        }
        Ok(c)
    }

    /// Records as key → chain.
    pub fn chains(&self) -> HashMap<String, Chain> {
        self.records
            .iter()
            .map(|r| {
                let chain = r
                    .layers
                    .iter()
                    .map(|i| {
                        i.and_then(|i| self.layers.get(i)).map(|l| LayerBlob {
                            media_type: l.media_type.clone(),
                            digest: l.digest.clone(),
                            size: l.size,
                            diff_id: l.diff_id.clone(),
                        })
                    })
                    .collect();
                (r.key.clone(), chain)
            })
            .collect()
    }
}

/// The pool cache tag of a vertex key: `kiln-<hex sha256 of the key>`.
pub fn pool_tag(vertex_key: &str) -> String {
    use sha2::Digest as _;
    format!(
        "{POOL_TAG_PREFIX}{}",
        hex::encode(sha2::Sha256::digest(vertex_key.as_bytes()))
    )
}

// === options ===

/// One `--export-cache`/`--import-cache` entry (BuildKit's `CacheOptionsEntry`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheEntry {
    /// `registry`, `local`, `inline`.
    pub typ: String,
    /// Its attributes (`ref`, `mode`, `dest`, …).
    pub attrs: BTreeMap<String, String>,
}

/// Where a cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A registry reference (`host/repo:tag`).
    Registry {
        /// The reference.
        reference: String,
        /// Plain HTTP to its registry.
        insecure: bool,
    },
    /// An OCI layout directory and the tag in its `index.json`.
    Layout {
        /// The directory.
        dir: PathBuf,
        /// `org.opencontainers.image.ref.name` of the entry.
        tag: String,
        /// Pick the entry by manifest digest instead (import).
        digest: Option<String>,
    },
    /// The cache config in a label of the exported image's config (`type=inline`).
    Inline,
}

impl Target {
    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            Target::Registry { reference, .. } => reference.clone(),
            Target::Layout { dir, tag, .. } => format!("{}:{tag}", dir.display()),
            Target::Inline => "inline".to_string(),
        }
    }
}

/// A parsed `--export-cache` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOpts {
    /// Where to.
    pub target: Target,
    /// `mode=max`: every vertex result; else `min`.
    pub max: bool,
    /// Layer compression and media types.
    pub image: ImageOpts,
    /// An image manifest (true) or an index.
    pub image_manifest: bool,
    /// A failure is a warning.
    pub ignore_error: bool,
    /// Also export the contents of the build's cache mounts (`cache-mounts=true`).
    pub cache_mounts: bool,
}

/// A parsed `--import-cache` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOpts {
    /// Where from.
    pub target: Target,
}

fn attr_err(typ: &str, message: impl Into<String>) -> Error {
    Error::Attr {
        typ: typ.to_string(),
        message: message.into(),
    }
}

fn bool_attr(typ: &str, key: &str, v: &str) -> Result<bool> {
    crate::export::image::parse_bool(typ, key, v).map_err(|e| attr_err(typ, e.to_string()))
}

fn target(e: &CacheEntry, export: bool) -> Result<Target> {
    let typ = e.typ.as_str();
    match typ {
        "registry" => {
            let reference = e
                .attrs
                .get("ref")
                .filter(|r| !r.is_empty())
                .ok_or_else(|| attr_err(typ, "ref is required"))?;
            crate::image::ImageName::parse(reference)
                .map_err(|err| attr_err(typ, format!("invalid ref {reference:?}: {err}")))?;
            let insecure = match e.attrs.get("registry.insecure") {
                Some(v) => bool_attr(typ, "registry.insecure", v)?,
                None => false,
            };
            Ok(Target::Registry {
                reference: reference.clone(),
                insecure,
            })
        }
        "local" => {
            let key = if export { "dest" } else { "src" };
            let dir = e
                .attrs
                .get(key)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| attr_err(typ, format!("{key} is required")))?;
            let tag = e
                .attrs
                .get("tag")
                .filter(|t| !t.is_empty())
                .cloned()
                .unwrap_or_else(|| "latest".to_string());
            let digest = e.attrs.get("digest").filter(|d| !d.is_empty()).cloned();
            if let Some(d) = &digest {
                crate::content::validate_digest(d)
                    .map_err(|err| attr_err(typ, format!("invalid digest {d:?}: {err}")))?;
            }
            Ok(Target::Layout {
                dir: PathBuf::from(dir),
                tag,
                digest,
            })
        }
        "inline" if export => Ok(Target::Inline),
        "inline" => Err(attr_err(
            typ,
            "import an inline cache with type=registry,ref=IMAGE",
        )),
        "" => Err(attr_err(typ, "type is required (registry or local)")),
        other => Err(attr_err(
            other,
            "unknown cache type (known: registry, local)",
        )),
    }
}

/// Parses an `--export-cache` entry.
pub fn parse_export(e: &CacheEntry) -> Result<ExportOpts> {
    let typ = e.typ.as_str();
    let target = target(e, true)?;
    let mut max = false;
    let mut image_attrs = BTreeMap::new();
    let mut image_manifest = true;
    let mut ignore_error = false;
    let mut cache_mounts = false;
    for (k, v) in &e.attrs {
        match k.as_str() {
            "mode" => match v.as_str() {
                "max" => max = true,
                "min" | "" => max = false,
                other => {
                    // BuildKit ignores other values and keeps min.
                    tracing::warn!(mode = other, "cache export: unknown mode, using min");
                }
            },
            "compression" | "compression-level" | "force-compression" | "oci-mediatypes" => {
                image_attrs.insert(k.clone(), v.clone());
            }
            "image-manifest" => image_manifest = bool_attr(typ, k, v)?,
            "ignore-error" => ignore_error = bool_attr(typ, k, v)?,
            "cache-mounts" => cache_mounts = bool_attr(typ, k, v)?,
            "ref" | "dest" | "tag" | "registry.insecure" => {}
            other => tracing::warn!(attr = other, "cache export: ignoring unknown attribute"),
        }
    }
    let image = ImageOpts::from_attrs(&image_attrs).map_err(|err| {
        attr_err(
            typ,
            match err {
                crate::export::Error::Attr { message, .. } => message,
                other => other.to_string(),
            },
        )
    })?;
    if !image.oci_mediatypes {
        image_manifest = false;
    }
    Ok(ExportOpts {
        target,
        max,
        image,
        image_manifest,
        ignore_error,
        cache_mounts,
    })
}

/// Parses an `--import-cache` entry.
pub fn parse_import(e: &CacheEntry) -> Result<ImportOpts> {
    Ok(ImportOpts {
        target: target(e, false)?,
    })
}

/// Parses all export entries, rejecting two of the same type as BuildKit does.
pub fn parse_exports(entries: &[CacheEntry]) -> Result<Vec<ExportOpts>> {
    let mut seen = std::collections::HashSet::new();
    entries
        .iter()
        .map(|e| {
            if !seen.insert(e.typ.clone()) {
                return Err(attr_err(&e.typ, "duplicate cache exports of this type"));
            }
            parse_export(e)
        })
        .collect()
}

/// The resolver to use for `target`'s registry (`registry.insecure` honoured).
fn resolver_for(images: &ImageResolver, reference: &str, insecure: bool) -> ImageResolver {
    if !insecure {
        return images.clone();
    }
    let host = match reference.split_once('/') {
        Some((h, _)) if h.contains('.') || h.contains(':') || h == "localhost" => h,
        _ => "docker.io",
    };
    images.with_insecure_host(host)
}

// === export ===

/// A cache ready to write: blobs in the content store and the top-level object.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Distinct layer blobs.
    pub layers: Vec<LayerBlob>,
    /// The cache config blob's digest and size.
    pub config: (String, u64),
    /// The manifest or index.
    pub manifest: Vec<u8>,
    /// Its media type.
    pub manifest_media_type: String,
}

/// Turns cached refs into cache blobs and writes them out. Clones share what they learnt
/// about where blobs already are (for cross-repository mounts).
#[derive(Clone)]
pub struct Exporter {
    cache: Arc<Cache>,
    content: Arc<ContentStore>,
    images: ImageResolver,
    mounts: Arc<Mounts>,
}

/// Where blobs are known to be (digest → a reference in a repository holding it), and
/// clients for mount requests.
#[derive(Default)]
struct Mounts {
    known: std::sync::Mutex<HashMap<String, String>>,
    clients: std::sync::Mutex<HashMap<String, oci_client::Client>>,
    mounted: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

// === impl Exporter ===

impl Exporter {
    /// An exporter over a worker's cache, content store and registry access.
    pub fn new(cache: Arc<Cache>, content: Arc<ContentStore>, images: ImageResolver) -> Self {
        Exporter {
            cache,
            content,
            images,
            mounts: Arc::new(Mounts::default()),
        }
    }

    /// Blobs mounted from another repository instead of uploaded, so far.
    pub fn mounted(&self) -> u64 {
        self.mounts
            .mounted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remembers that the blobs of an imported cache are in its repository.
    pub fn learn(&self, found: &Found) {
        if let BlobSource::Registry { reference, .. } = &found.source {
            let digests = found
                .records
                .values()
                .flatten()
                .flatten()
                .map(|b| &b.digest);
            self.mounts.learn(digests, reference);
        }
    }

    /// Makes (or reuses) the blobs of `results` (key → ref) and the cache config and
    /// manifest describing them, with the cache mount blobs `mounts` (id → blob, already
    /// in the content store).
    pub async fn prepare(
        &self,
        results: &[(String, Ref)],
        mounts: &[(String, LayerBlob)],
        opts: &ExportOpts,
        target: &str,
    ) -> Result<Prepared> {
        let mut order: Vec<super::Layer> = Vec::new();
        let mut pos: HashMap<u64, usize> = HashMap::new();
        for (_, r) in results {
            for l in r.layers() {
                if let std::collections::hash_map::Entry::Vacant(e) = pos.entry(l.id) {
                    e.insert(order.len());
                    order.push(l.clone());
                }
            }
        }
        let mut layers = Vec::with_capacity(order.len());
        for l in &order {
            let blobs = self.cache.blobs(l).map_err(|e| remote(target, e))?;
            layers.push(ExportLayer { dir: l.fs(), blobs });
        }
        let (content, image) = (self.content.clone(), opts.image.clone());
        let built = tokio::task::spawn_blocking(move || {
            crate::export::image::build_image(
                &content,
                &layers,
                &ImageConfigFile::default(),
                &image,
            )
        })
        .await
        .map_err(|e| remote(target, format!("layer worker failed: {e}")))?
        .map_err(|e| remote(target, crate::solver::error_chain(&e)))?;
        let new_blobs: Vec<(u64, LayerBlob)> = order
            .iter()
            .zip(&built.layers)
            .filter_map(|(l, b)| b.clone().map(|b| (l.id, b)))
            .collect();
        self.cache
            .record_blobs(&new_blobs)
            .map_err(|e| remote(target, e))?;
        let records: Vec<(String, Chain)> = results
            .iter()
            .map(|(k, r)| {
                let chain = r
                    .layers()
                    .iter()
                    .map(|l| {
                        pos.get(&l.id)
                            .and_then(|i| built.layers.get(*i).cloned().flatten())
                    })
                    .collect();
                (k.clone(), chain)
            })
            .collect();
        let mut config = CacheConfig::new(&records);
        config.add_mounts(mounts);
        let config_bytes = serde_json::to_vec(&config).map_err(|e| remote(target, e))?;
        let config_desc = self
            .content
            .write_bytes(&config_bytes)
            .map_err(|e| remote(target, e))?;
        let layers: Vec<LayerBlob> = config
            .layers
            .iter()
            .map(|l| LayerBlob {
                media_type: l.media_type.clone(),
                digest: l.digest.clone(),
                size: l.size,
                diff_id: l.diff_id.clone(),
            })
            .collect();
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|b| {
                serde_json::json!({
                    "mediaType": b.media_type,
                    "digest": b.digest,
                    "size": b.size,
                    "annotations": {UNCOMPRESSED_ANNOTATION: b.diff_id},
                })
            })
            .collect();
        let config_json = serde_json::json!({
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_desc.0,
            "size": config_desc.1,
        });
        let (manifest, media_type) = if opts.image_manifest {
            let mut m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_json,
                "layers": layer_descs,
            });
            // A copy of the config in the manifest spares an importer a round trip and a
            // blob write per lookup (the pool cache does one lookup per vertex).
            if config_bytes.len() <= MAX_EMBEDDED_CONFIG {
                if let Ok(text) = std::str::from_utf8(&config_bytes) {
                    m["annotations"] = serde_json::json!({ CONFIG_ANNOTATION: text });
                }
            }
            (m, OCI_MANIFEST)
        } else {
            let mt = if opts.image.oci_mediatypes {
                OCI_INDEX
            } else {
                DOCKER_MANIFEST_LIST
            };
            let mut manifests = layer_descs;
            manifests.push(config_json);
            (
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": mt,
                    "manifests": manifests,
                }),
                mt,
            )
        };
        let manifest = serde_json::to_vec(&manifest).map_err(|e| remote(target, e))?;
        Ok(Prepared {
            layers,
            config: config_desc,
            manifest,
            manifest_media_type: media_type.to_string(),
        })
    }

    /// The value of [`INLINE_LABEL`] for `results`: their cache config, with blobs made
    /// with the image exporter's options so the image carries the same blobs.
    pub async fn inline(&self, results: &[(String, Ref)], image: &ImageOpts) -> Result<String> {
        let opts = ExportOpts {
            target: Target::Inline,
            max: false,
            image: image.clone(),
            image_manifest: true,
            ignore_error: false,
            cache_mounts: false,
        };
        let prepared = self.prepare(results, &[], &opts, "inline").await?;
        let bytes = self
            .content
            .read(&prepared.config.0)
            .map_err(|e| remote("inline", e))?;
        String::from_utf8(bytes).map_err(|e| remote("inline", e))
    }

    /// Pushes to `reference` a cache object with no layers whose config maps the definition
    /// key `key` to the cache key `to` (a pool cache alias); returns the manifest digest.
    pub async fn publish_alias(&self, reference: &str, key: &str, to: &str) -> Result<String> {
        let mut config = CacheConfig::new(&[]);
        config.aliases.push(ConfigAlias {
            key: key.to_string(),
            to: to.to_string(),
        });
        let bytes = serde_json::to_vec(&config).map_err(|e| remote(reference, e))?;
        let desc = self
            .content
            .write_bytes(&bytes)
            .map_err(|e| remote(reference, e))?;
        let text = String::from_utf8(bytes).map_err(|e| remote(reference, e))?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": desc.0, "size": desc.1},
            "layers": [],
            "annotations": { CONFIG_ANNOTATION: text },
        });
        let prepared = Prepared {
            layers: Vec::new(),
            config: desc,
            manifest: serde_json::to_vec(&manifest).map_err(|e| remote(reference, e))?,
            manifest_media_type: OCI_MANIFEST.to_string(),
        };
        let resolver = resolver_for(&self.images, reference, false);
        push(&resolver, &prepared, reference, Some(&self.mounts)).await
    }

    /// Exports `results` to `opts.target`; returns the manifest digest.
    pub async fn export(&self, results: &[(String, Ref)], opts: &ExportOpts) -> Result<String> {
        self.export_with_mounts(results, &[], opts).await
    }

    /// [`Exporter::export`] with cache mount contents (id → blob in the content store).
    pub async fn export_with_mounts(
        &self,
        results: &[(String, Ref)],
        mounts: &[(String, LayerBlob)],
        opts: &ExportOpts,
    ) -> Result<String> {
        let name = opts.target.name();
        let prepared = self.prepare(results, mounts, opts, &name).await?;
        match &opts.target {
            Target::Registry {
                reference,
                insecure,
            } => {
                let resolver = resolver_for(&self.images, reference, *insecure);
                let digest = push(&resolver, &prepared, reference, Some(&self.mounts)).await?;
                let mut all: Vec<&String> = prepared.layers.iter().map(|l| &l.digest).collect();
                all.push(&prepared.config.0);
                self.mounts.learn(all.into_iter(), reference);
                Ok(digest)
            }
            Target::Inline => Err(remote(
                &name,
                "an inline cache is written by the image exporter",
            )),
            Target::Layout { dir, tag, .. } => {
                let (content, dir, tag) = (self.content.clone(), dir.clone(), tag.clone());
                tokio::task::spawn_blocking(move || write_layout(&content, &prepared, &dir, &tag))
                    .await
                    .map_err(|e| remote(&name, format!("writer failed: {e}")))?
            }
        }
    }
}

/// Pushes a prepared cache: blobs the registry lacks (HEAD first, several at once; mounted
/// from another repository of the same registry when `mounts` knows one), the config, then
/// the manifest under `reference`'s tag.
async fn push(
    resolver: &ImageResolver,
    prepared: &Prepared,
    reference: &str,
    mounts: Option<&Arc<Mounts>>,
) -> Result<String> {
    let mut digests: Vec<String> = prepared.layers.iter().map(|l| l.digest.clone()).collect();
    digests.push(prepared.config.0.clone());
    let uploads: Vec<_> = digests
        .into_iter()
        .map(|d| {
            let (resolver, reference) = (resolver.clone(), reference.to_string());
            let mounts = mounts.cloned();
            async move {
                let fail = |e: crate::source::Error| remote(&reference, e);
                if resolver.blob_exists(&reference, &d).await.map_err(fail)? {
                    return Ok(());
                }
                if let Some(m) = &mounts {
                    if m.mount(&resolver, &reference, &d).await {
                        return Ok(());
                    }
                }
                resolver
                    .push_blob(&reference, &d, &|_, _| {})
                    .await
                    .map(|_| ())
                    .map_err(fail)
            }
        })
        .collect();
    let results: Vec<Result<()>> = futures::stream::iter(uploads)
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    resolver
        .push_manifest(reference, &prepared.manifest_media_type, &prepared.manifest)
        .await
        .map_err(|e| remote(reference, e))
}

/// Writes a prepared cache into the OCI layout `dir` under `tag`, replacing that tag's
/// entry and keeping the others. Files are written under temporary names and renamed.
pub fn write_layout(
    content: &ContentStore,
    prepared: &Prepared,
    dir: &Path,
    tag: &str,
) -> Result<String> {
    let name = dir.display().to_string();
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| remote(&name, format!("create {}: {e}", blobs.display())))?;
    let put = |digest: &str, from: Option<&Path>, bytes: Option<&[u8]>| -> Result<()> {
        let hex = crate::content::validate_digest(digest).map_err(|e| remote(&name, e))?;
        let dest = blobs.join(hex);
        if dest.exists() {
            return Ok(());
        }
        let tmp = blobs.join(format!(".tmp-{hex}"));
        let res = match (from, bytes) {
            (Some(src), _) => std::fs::copy(src, &tmp).map(|_| ()),
            (None, Some(b)) => std::fs::write(&tmp, b),
            (None, None) => Ok(()),
        };
        res.and_then(|_| std::fs::rename(&tmp, &dest))
            .map_err(|e| remote(&name, format!("write blob {digest}: {e}")))
    };
    for l in &prepared.layers {
        let src = content.path(&l.digest).map_err(|e| remote(&name, e))?;
        put(&l.digest, Some(&src), None)?;
    }
    let src = content
        .path(&prepared.config.0)
        .map_err(|e| remote(&name, e))?;
    put(&prepared.config.0, Some(&src), None)?;
    let digest = crate::content::digest_bytes(&prepared.manifest);
    put(&digest, None, Some(&prepared.manifest))?;
    let write_atomic = |file: &str, bytes: &[u8]| -> Result<()> {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|_| std::fs::rename(&tmp, dir.join(file)))
            .map_err(|e| remote(&name, format!("write {file}: {e}")))
    };
    write_atomic("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index_path = dir.join("index.json");
    let mut manifests: Vec<serde_json::Value> = match std::fs::read(&index_path) {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
            .map_err(|e| remote(&name, format!("index.json is not valid json: {e}")))?
            .get("manifests")
            .and_then(|m| m.as_array().cloned())
            .unwrap_or_default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(remote(&name, format!("read index.json: {e}"))),
    };
    manifests.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag));
    manifests.push(serde_json::json!({
        "mediaType": prepared.manifest_media_type,
        "digest": digest,
        "size": prepared.manifest.len(),
        "annotations": {REF_NAME: tag},
    }));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec_pretty(&index).map_err(|e| remote(&name, e))?;
    write_atomic("index.json", &bytes)?;
    Ok(digest)
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

// === impl Mounts ===

impl Mounts {
    fn learn<'a>(&self, digests: impl Iterator<Item = &'a String>, reference: &str) {
        if let Ok(mut k) = self.known.lock() {
            for d in digests {
                k.insert(d.clone(), reference.to_string());
            }
        }
    }

    /// Asks the registry of `to` to mount `digest` from the repository known to hold it;
    /// true when it did. Any failure (another registry, no permission, an old registry)
    /// is false and the caller uploads.
    async fn mount(&self, resolver: &ImageResolver, to: &str, digest: &str) -> bool {
        let from = match self.known.lock() {
            Ok(k) => k.get(digest).cloned(),
            Err(_) => None,
        };
        let Some(from) = from else { return false };
        let parse = |r: &str| {
            crate::source::image::normalize_reference(r)
                .ok()
                .and_then(|n| n.parse::<oci_client::Reference>().ok())
        };
        let (Some(t), Some(f)) = (parse(to), parse(&from)) else {
            return false;
        };
        if t.resolve_registry() != f.resolve_registry() || t.repository() == f.repository() {
            return false;
        }
        let host = t.resolve_registry().to_string();
        let existing = self.clients.lock().ok().and_then(|c| c.get(&host).cloned());
        let client = match existing {
            Some(c) => c,
            None => {
                let cfg = resolver.registry_config().clone();
                let insecure = cfg.is_insecure(t.registry()) || cfg.is_insecure(&host);
                let client = oci_client::Client::new(oci_client::client::ClientConfig {
                    protocol: if insecure {
                        oci_client::client::ClientProtocol::Http
                    } else {
                        oci_client::client::ClientProtocol::Https
                    },
                    accept_invalid_certificates: insecure,
                    connect_timeout: Some(std::time::Duration::from_secs(30)),
                    ..Default::default()
                });
                let registry = t.registry().to_string();
                let auth = tokio::task::spawn_blocking(move || cfg.auth_for(&registry))
                    .await
                    .unwrap_or(oci_client::secrets::RegistryAuth::Anonymous);
                client.store_auth_if_needed(&host, &auth).await;
                if let Ok(mut c) = self.clients.lock() {
                    c.insert(host, client.clone());
                }
                client
            }
        };
        match client.mount_blob(&t, &f, digest).await {
            Ok(()) => {
                self.mounted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%digest, from = %from, to, "mounted blob");
                true
            }
            Err(error) => {
                tracing::debug!(%error, %digest, "cross-repository mount failed, uploading");
                false
            }
        }
    }
}

// === import ===

/// Where an imported cache's blobs come from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// A registry repository.
    Registry {
        /// Registry access.
        resolver: ImageResolver,
        /// A reference in the repository holding the blobs.
        reference: String,
    },
    /// An OCI layout directory.
    Layout(PathBuf),
}

impl BlobSource {
    /// Fetches a blob into the content store, verified by digest and size; returns its path.
    pub(crate) async fn fetch(
        &self,
        content: &Arc<ContentStore>,
        b: &BlobDesc,
    ) -> Result<PathBuf, String> {
        match self {
            BlobSource::Registry {
                resolver,
                reference,
            } => resolver
                .fetch_blob(reference, b, &|_, _| {})
                .await
                .map_err(|e| e.to_string()),
            BlobSource::Layout(dir) => {
                if content.has(&b.digest) {
                    return content.path(&b.digest).map_err(|e| e.to_string());
                }
                let hex = crate::content::validate_digest(&b.digest).map_err(|e| e.to_string())?;
                let src = dir.join("blobs").join("sha256").join(hex);
                let (content, digest, size) = (content.clone(), b.digest.clone(), b.size);
                tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
                    let mut f = std::fs::File::open(&src)
                        .map_err(|e| format!("open {}: {e}", src.display()))?;
                    let mut w = content.writer().map_err(|e| e.to_string())?;
                    std::io::copy(&mut f, &mut w)
                        .map_err(|e| format!("read {}: {e}", src.display()))?;
                    if size > 0 && w.written() != size {
                        return Err(format!(
                            "blob {digest}: size {}, expected {size}",
                            w.written()
                        ));
                    }
                    w.finish(Some(&digest)).map_err(|e| e.to_string())?;
                    content.path(&digest).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        }
    }

    /// Reads a small blob (a manifest or a config), verified.
    async fn read(&self, content: &Arc<ContentStore>, b: &BlobDesc) -> Result<Vec<u8>, String> {
        let path = self.fetch(content, b).await?;
        std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))
    }
}

/// The records of one cache config and where to fetch their blobs.
#[derive(Debug, Clone)]
pub struct Found {
    /// Records by `<vertex key>:<output>`.
    pub records: HashMap<String, Chain>,
    /// Cache mount contents (id → blob), when the cache was exported with them.
    pub cache_mounts: Vec<(String, LayerBlob)>,
    /// Where their blobs are.
    pub source: BlobSource,
}

/// Where a manifest keeps its cache config.
enum ConfigAt {
    /// A cache config blob.
    Blob(BlobDesc),
    /// The [`INLINE_LABEL`] of this image config blob.
    Inline(BlobDesc),
}

/// The copy of the cache config `desc` in a manifest's [`CONFIG_ANNOTATION`], when it is
/// there and matches `desc`'s digest and size (else the blob is fetched).
pub(crate) fn embedded_config(manifest: &[u8], desc: &BlobDesc) -> Option<Vec<u8>> {
    use sha2::Digest as _;
    let m: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let text = m["annotations"][CONFIG_ANNOTATION].as_str()?;
    let bytes = text.as_bytes();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    if digest != desc.digest || bytes.len() as u64 != desc.size {
        tracing::warn!(config = %desc.digest, "embedded cache config does not match its digest; fetching the blob");
        return None;
    }
    Some(bytes.to_vec())
}

/// Finds the cache config in a manifest or index.
fn config_desc(manifest: &[u8]) -> Result<ConfigAt, String> {
    let m: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("manifest is not json: {e}"))?;
    let desc = |v: &serde_json::Value| -> Option<BlobDesc> {
        Some(BlobDesc {
            media_type: v["mediaType"].as_str()?.to_string(),
            digest: v["digest"].as_str()?.to_string(),
            size: v["size"].as_u64()?,
        })
    };
    if let Some(c) = m.get("config").and_then(desc) {
        return match c.media_type.as_str() {
            CONFIG_MEDIA_TYPE => Ok(ConfigAt::Blob(c)),
            crate::export::image::OCI_CONFIG | crate::export::image::DOCKER_CONFIG => {
                Ok(ConfigAt::Inline(c))
            }
            other => Err(format!("not a kiln cache (config media type {other:?})")),
        };
    }
    m["manifests"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .filter_map(desc)
                .find(|d| d.media_type == CONFIG_MEDIA_TYPE)
        })
        .map(ConfigAt::Blob)
        .ok_or_else(|| {
            "not a kiln cache (no cache config in the manifest; an image index is not read for inline caches)"
                .to_string()
        })
}

async fn records(
    content: &Arc<ContentStore>,
    source: BlobSource,
    manifest: &[u8],
) -> Result<Found, String> {
    let bytes = match config_desc(manifest)? {
        ConfigAt::Blob(desc) => match embedded_config(manifest, &desc) {
            Some(b) => b,
            None => source.read(content, &desc).await?,
        },
        ConfigAt::Inline(desc) => {
            let image = source.read(content, &desc).await?;
            let image: ImageConfigFile = serde_json::from_slice(&image)
                .map_err(|e| format!("image config {} is invalid: {e}", desc.digest))?;
            image
                .config
                .labels
                .get(INLINE_LABEL)
                .ok_or_else(|| {
                    format!("image has no inline cache (no {INLINE_LABEL} label in its config)")
                })?
                .clone()
                .into_bytes()
        }
    };
    let config = CacheConfig::parse(&bytes)?;
    Ok(Found {
        records: config.chains(),
        cache_mounts: config.mounts(),
        source,
    })
}

/// Reads the cache `opts` names: its manifest and cache config (verified by digest).
pub async fn import(
    images: &ImageResolver,
    content: &Arc<ContentStore>,
    opts: &ImportOpts,
) -> Result<Found> {
    let name = opts.target.name();
    match &opts.target {
        Target::Inline => Err(remote(
            &name,
            "import an inline cache with type=registry,ref=IMAGE",
        )),
        Target::Registry {
            reference,
            insecure,
        } => {
            let resolver = resolver_for(images, reference, *insecure);
            let (manifest, _) = resolver
                .fetch_manifest_raw(reference)
                .await
                .map_err(|e| remote(&name, e))?;
            let source = BlobSource::Registry {
                resolver,
                reference: reference.clone(),
            };
            records(content, source, &manifest)
                .await
                .map_err(|e| remote(&name, e))
        }
        Target::Layout { dir, tag, digest } => {
            let index = std::fs::read(dir.join("index.json"))
                .map_err(|e| remote(&name, format!("read index.json: {e}")))?;
            let index: serde_json::Value = serde_json::from_slice(&index)
                .map_err(|e| remote(&name, format!("index.json is not valid json: {e}")))?;
            let entry = index["manifests"]
                .as_array()
                .and_then(|ms| {
                    ms.iter().find(|m| match digest {
                        Some(d) => m["digest"].as_str() == Some(d),
                        None => m["annotations"][REF_NAME].as_str() == Some(tag),
                    })
                })
                .ok_or_else(|| remote(&name, "no such entry in index.json"))?;
            let desc = BlobDesc {
                media_type: entry["mediaType"].as_str().unwrap_or_default().to_string(),
                digest: entry["digest"].as_str().unwrap_or_default().to_string(),
                size: entry["size"].as_u64().unwrap_or(0),
            };
            let source = BlobSource::Layout(dir.clone());
            let manifest = source
                .read(content, &desc)
                .await
                .map_err(|e| remote(&name, e))?;
            records(content, source, &manifest)
                .await
                .map_err(|e| remote(&name, e))
        }
    }
}

/// Turns records into local refs: each layer is found locally by blob digest, or fetched
/// (verified), unpacked (diffID checked) and committed; then the results are recorded
/// under their keys. Nothing is recorded unless every layer is complete.
pub async fn materialize(
    cache: &Arc<Cache>,
    content: &Arc<ContentStore>,
    source: &BlobSource,
    entries: &[(String, Chain)],
) -> Result<Vec<Ref>, String> {
    let mut refs = Vec::with_capacity(entries.len());
    for (_, chain) in entries {
        // The layers of a chain are fetched and unpacked concurrently.
        let layers = futures::future::try_join_all(
            chain
                .iter()
                .map(|blob| layer(cache, content, source, blob.as_ref())),
        )
        .await?;
        refs.push(Ref::new(layers));
    }
    let puts: Vec<(String, Ref)> = entries
        .iter()
        .zip(&refs)
        .map(|((k, _), r)| (k.clone(), r.clone()))
        .collect();
    cache.put(&puts).map_err(|e| e.to_string())?;
    Ok(refs)
}

async fn layer(
    cache: &Arc<Cache>,
    content: &Arc<ContentStore>,
    source: &BlobSource,
    blob: Option<&LayerBlob>,
) -> Result<super::Layer, String> {
    let Some(blob) = blob else {
        let cache = cache.clone();
        return tokio::task::spawn_blocking(move || -> Result<super::Layer, String> {
            let nl = cache.new_layer().map_err(|e| e.to_string())?;
            cache
                .commit_layers(vec![(nl, Vec::new())])
                .map_err(|e| e.to_string())?
                .pop()
                .ok_or_else(|| "layer commit returned nothing".to_string())
        })
        .await
        .map_err(|e| e.to_string())?;
    };
    let lock = cache.blob_lock(&blob.digest);
    let _held = lock.lock().await;
    if let Some(l) = cache
        .layer_for_blob(&blob.digest)
        .map_err(|e| e.to_string())?
    {
        return Ok(l);
    }
    let desc = BlobDesc {
        media_type: blob.media_type.clone(),
        digest: blob.digest.clone(),
        size: blob.size,
    };
    let started = std::time::Instant::now();
    let path = source.fetch(content, &desc).await?;
    let fetched = started.elapsed();
    let (cache, blob) = (cache.clone(), blob.clone());
    tokio::task::spawn_blocking(move || -> Result<super::Layer, String> {
        let _done = Done(started, fetched, blob.digest.clone());
        let nl = cache.new_layer().map_err(|e| e.to_string())?;
        let stats = unpack_blob(&path, &blob.media_type, &nl.fs(), &UnpackLimits::default())
            .map_err(|e| e.to_string())?;
        if stats.diff_id != blob.diff_id {
            return Err(format!(
                "blob {}: uncompressed digest {}, expected {}",
                blob.digest, stats.diff_id, blob.diff_id
            ));
        }
        cache
            .commit_layers(vec![(nl, vec![blob])])
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or_else(|| "layer commit returned nothing".to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Logs how long a layer import took (fetch, then unpack and commit) when dropped.
struct Done(std::time::Instant, std::time::Duration, String);

impl Drop for Done {
    fn drop(&mut self) {
        tracing::debug!(
            blob = %self.2,
            fetch_ms = self.1.as_millis() as u64,
            total_ms = self.0.elapsed().as_millis() as u64,
            "imported layer"
        );
    }
}

/// An imported cache as the solver consults it on a local miss.
#[derive(Debug)]
pub struct Imported {
    name: String,
    found: Found,
    cache: Arc<Cache>,
    content: Arc<ContentStore>,
}

impl Imported {
    /// `found` (from [`import`] of the cache called `name`) over a worker's stores.
    pub fn new(name: String, found: Found, cache: Arc<Cache>, content: Arc<ContentStore>) -> Self {
        Imported {
            name,
            found,
            cache,
            content,
        }
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.found.records.len()
    }

    /// True when it holds no records.
    pub fn is_empty(&self) -> bool {
        self.found.records.is_empty()
    }
}

/// Looks up the outputs of `key` in `found` and materializes them; a failure is a warning
/// and a miss.
pub async fn load_found(
    name: &str,
    found: &Found,
    cache: &Arc<Cache>,
    content: &Arc<ContentStore>,
    ctx: &VertexCtx,
    key: &str,
    outputs: usize,
) -> Option<Vec<Ref>> {
    let mut entries = Vec::with_capacity(outputs);
    for i in 0..outputs {
        let k = format!("{key}:{i}");
        let chain = found.records.get(&k)?.clone();
        entries.push((k, chain));
    }
    match materialize(cache, content, &found.source, &entries).await {
        Ok(refs) => {
            tracing::debug!(cache = name, key, "imported cache hit");
            Some(refs)
        }
        Err(e) => {
            let message = format!("cache {name}: {key}: {e}; executing instead");
            tracing::warn!(vertex = %ctx.digest, "{message}");
            ctx.progress.warn(Some(&ctx.digest), message);
            None
        }
    }
}

#[async_trait]
impl RemoteCache<Ref> for Imported {
    async fn load(&self, ctx: &VertexCtx, key: &str, outputs: usize) -> Option<Vec<Ref>> {
        load_found(
            &self.name,
            &self.found,
            &self.cache,
            &self.content,
            ctx,
            key,
            outputs,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8) -> LayerBlob {
        LayerBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: format!("sha256:{}", hex::encode([n; 32])),
            size: n as u64,
            diff_id: format!("sha256:{}", hex::encode([n + 100; 32])),
        }
    }

    fn entry(typ: &str, attrs: &[(&str, &str)]) -> CacheEntry {
        CacheEntry {
            typ: typ.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn config_round_trips_and_shares_blobs() -> anyhow::Result<()> {
        let records = vec![
            ("k1:0".to_string(), vec![Some(blob(1)), None, Some(blob(2))]),
            ("k2:0".to_string(), vec![Some(blob(1))]),
        ];
        let c = CacheConfig::new(&records);
        assert_eq!(c.layers.len(), 2);
        let bytes = serde_json::to_vec(&c)?;
        let back = CacheConfig::parse(&bytes).map_err(anyhow::Error::msg)?;
        assert_eq!(back, c);
        let chains = back.chains();
        assert_eq!(chains["k1:0"], records[0].1);
        assert_eq!(chains["k2:0"], records[1].1);
        let v: serde_json::Value = serde_json::from_slice(&bytes)?;
        assert_eq!(v["layers"][0]["diffID"], blob(1).diff_id.as_str());
        assert_eq!(v["records"][0]["layers"][1], serde_json::Value::Null);
        Ok(())
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad_index = r#"{"schemaVersion":1,"layers":[],"records":[{"key":"k:0","layers":[0]}]}"#;
        assert!(CacheConfig::parse(bad_index.as_bytes())
            .err()
            .is_some_and(|e| e.contains("names layer 0")));
        let bad_version = r#"{"schemaVersion":2,"layers":[],"records":[]}"#;
        assert!(CacheConfig::parse(bad_version.as_bytes())
            .err()
            .is_some_and(|e| e.contains("schemaVersion 2")));
        let bad_digest = r#"{"schemaVersion":1,"layers":[{"mediaType":"x","digest":"sha256:../../etc","size":1,"diffID":"sha256:00"}],"records":[]}"#;
        assert!(CacheConfig::parse(bad_digest.as_bytes()).is_err());
        assert!(CacheConfig::parse(b"not json").is_err());
    }

    #[test]
    fn export_attrs_follow_buildkit() -> anyhow::Result<()> {
        let o = parse_export(&entry(
            "registry",
            &[
                ("ref", "localhost:5000/cache:1"),
                ("mode", "max"),
                ("compression", "zstd"),
                ("compression-level", "5"),
                ("ignore-error", "true"),
                ("registry.insecure", "true"),
            ],
        ))?;
        assert!(o.max && o.ignore_error && o.image_manifest);
        assert_eq!(o.image.compression, crate::export::Compression::Zstd);
        assert_eq!(
            o.target,
            Target::Registry {
                reference: "localhost:5000/cache:1".into(),
                insecure: true
            }
        );
        // Unknown modes keep min; oci-mediatypes=false forces an index.
        let o = parse_export(&entry(
            "registry",
            &[
                ("ref", "r/c"),
                ("mode", "weird"),
                ("oci-mediatypes", "false"),
            ],
        ))?;
        assert!(!o.max && !o.image_manifest);
        let o = parse_export(&entry("local", &[("dest", "/tmp/x")]))?;
        assert_eq!(
            o.target,
            Target::Layout {
                dir: "/tmp/x".into(),
                tag: "latest".into(),
                digest: None
            }
        );
        for (typ, attrs, want) in [
            ("registry", vec![], "ref is required"),
            ("local", vec![("src", "/x")], "dest is required"),
            (
                "registry",
                vec![("ref", "r/c"), ("ignore-error", "maybe")],
                "invalid boolean",
            ),
            (
                "registry",
                vec![("ref", "r/c"), ("compression", "lz4")],
                "unsupported compression",
            ),
            ("gha", vec![], "unknown cache type"),
        ] {
            let err = parse_export(&entry(typ, &attrs))
                .err()
                .ok_or_else(|| anyhow::anyhow!("{typ} {attrs:?} must fail"))?;
            assert!(err.to_string().contains(want), "{err}");
        }
        let dup = parse_exports(&[
            entry("registry", &[("ref", "a/b")]),
            entry("registry", &[("ref", "a/c")]),
        ]);
        assert!(dup
            .err()
            .is_some_and(|e| e.to_string().contains("duplicate")));
        assert_eq!(parse_export(&entry("inline", &[]))?.target, Target::Inline);
        assert!(parse_import(&entry("inline", &[])).is_err());
        let i = parse_import(&entry("local", &[("src", "/d"), ("tag", "t")]))?;
        assert_eq!(i.target.name(), "/d:t");
        Ok(())
    }

    #[test]
    fn pool_tags_are_valid_tags() {
        let t = pool_tag("sha256:abc");
        assert_eq!(t.len(), POOL_TAG_PREFIX.len() + 64);
        assert!(t.len() <= 128);
        assert_ne!(t, pool_tag("sha256:abd"));
    }

    #[test]
    fn config_is_found_in_manifest_and_index() {
        let c =
            serde_json::json!({"mediaType": CONFIG_MEDIA_TYPE, "digest": "sha256:aa", "size": 3});
        let m = serde_json::json!({"config": c, "layers": []});
        let i = serde_json::json!({"manifests": [{"mediaType": "x", "digest": "sha256:bb", "size": 1}, c]});
        for v in [m, i] {
            let d = config_desc(&serde_json::to_vec(&v).unwrap_or_default());
            assert!(matches!(d, Ok(ConfigAt::Blob(d)) if d.digest == "sha256:aa"));
        }
        let image = serde_json::json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:aa", "size": 3}});
        assert!(matches!(
            config_desc(&serde_json::to_vec(&image).unwrap_or_default()),
            Ok(ConfigAt::Inline(_))
        ));
        let other = serde_json::json!({"config": {"mediaType": "application/x-other", "digest": "sha256:aa", "size": 3}});
        assert!(config_desc(&serde_json::to_vec(&other).unwrap_or_default())
            .err()
            .is_some_and(|e| e.contains("not a kiln cache")));
    }

    #[test]
    fn embedded_config_is_used_only_when_it_matches_its_digest() {
        use sha2::Digest as _;
        let text = r#"{"schemaVersion":1,"layers":[],"records":[]}"#;
        let desc = BlobDesc {
            media_type: CONFIG_MEDIA_TYPE.into(),
            digest: format!("sha256:{}", hex::encode(sha2::Sha256::digest(text))),
            size: text.len() as u64,
        };
        let manifest = |t: &str| {
            serde_json::to_vec(&serde_json::json!({"annotations": {CONFIG_ANNOTATION: t}}))
                .unwrap_or_default()
        };
        assert_eq!(
            embedded_config(&manifest(text), &desc).as_deref(),
            Some(text.as_bytes())
        );
        // A tampered copy, or none at all, means fetching the blob.
        let tampered = text.replace("[]}", "[{}]}");
        assert!(embedded_config(&manifest(&tampered), &desc).is_none());
        assert!(embedded_config(b"{}", &desc).is_none());
        let short = BlobDesc {
            size: desc.size - 1,
            ..desc.clone()
        };
        assert!(embedded_config(&manifest(text), &short).is_none());
    }
}
