//! The `image` exporter: layer blobs, config and manifest into the content store, and
//! push to a registry.
//!
//! Layers are made from their upper dirs in one streaming pass each (tar → hash for the
//! `diff_id` → compress → content store, which hashes the blob), in parallel threads;
//! blobs already made for a layer (pulled, or from an earlier export) are reused. Output
//! is deterministic: identical inputs give identical digests.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::{Compression, Error, ExportLayer, LayerBlob, Result};
use crate::content::{BlobWriter, ContentStore};
use crate::image::{History, ImageConfigFile, RootFs};
use crate::snapshot::layer::BlobCompression;
use crate::source::image::{ImageResolver, DOCKER_MANIFEST, OCI_MANIFEST};

/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Options of the image exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOpts {
    /// Image names (`registry/repo:tag`).
    pub names: Vec<String>,
    /// Push to the registry after building.
    pub push: bool,
    /// Use plain HTTP for the registry.
    pub insecure: bool,
    /// Layer compression.
    pub compression: Compression,
    /// Compression level (gzip 0-9, zstd 1-22); the codec's default when `None`.
    pub compression_level: Option<i32>,
    /// Recompress layers whose existing blobs use another compression.
    pub force_compression: bool,
    /// OCI media types (default) or Docker schema2.
    pub oci_mediatypes: bool,
}

impl Default for ImageOpts {
    fn default() -> Self {
        ImageOpts {
            names: Vec::new(),
            push: false,
            insecure: false,
            compression: Compression::Gzip,
            compression_level: None,
            force_compression: false,
            oci_mediatypes: true,
        }
    }
}

/// Parses a boolean the way Go's `strconv.ParseBool` does (BuildKit's attrs).
pub(crate) fn parse_bool(exporter: &str, key: &str, v: &str) -> Result<bool> {
    match v {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::Attr {
            exporter: exporter.to_string(),
            message: format!("invalid boolean {v:?} for {key}"),
        }),
    }
}

impl ImageOpts {
    /// Parses buildctl exporter attrs: `name` (comma list), `push`, `registry.insecure`,
    /// `compression`, `compression-level`, `force-compression`, `oci-mediatypes`. Unknown
    /// attrs are ignored with a warning.
    pub fn from_attrs(attrs: &BTreeMap<String, String>) -> Result<ImageOpts> {
        let attr = |message: String| Error::Attr {
            exporter: "image".to_string(),
            message,
        };
        let mut o = ImageOpts::default();
        for (k, v) in attrs {
            match k.as_str() {
                "name" | "names" => o.names.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(str::to_string),
                ),
                "push" => o.push = parse_bool("image", k, v)?,
                "registry.insecure" => o.insecure = parse_bool("image", k, v)?,
                "force-compression" => o.force_compression = parse_bool("image", k, v)?,
                "oci-mediatypes" => o.oci_mediatypes = parse_bool("image", k, v)?,
                "compression" => {
                    o.compression = match v.as_str() {
                        "gzip" => Compression::Gzip,
                        "zstd" => Compression::Zstd,
                        "uncompressed" => Compression::Uncompressed,
                        other => {
                            return Err(attr(format!("unsupported compression type {other:?}")))
                        }
                    }
                }
                "compression-level" => {
                    let level: i32 = v
                        .parse()
                        .map_err(|_| attr(format!("invalid compression-level {v:?}")))?;
                    o.compression_level = Some(level);
                }
                other => tracing::warn!(attr = other, "image exporter: ignoring unknown attribute"),
            }
        }
        if let Some(level) = o.compression_level {
            let ok = match o.compression {
                Compression::Gzip => (0..=9).contains(&level),
                Compression::Zstd => (1..=22).contains(&level),
                Compression::Uncompressed => true,
            };
            if !ok {
                return Err(attr(format!(
                    "compression-level {level} out of range for {:?}",
                    o.compression
                )));
            }
        }
        Ok(o)
    }
}

/// An image built into the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// Digest of the manifest.
    pub manifest_digest: String,
    /// Media type of the manifest.
    pub manifest_media_type: String,
    /// The manifest as stored.
    pub manifest_bytes: Vec<u8>,
    /// Digest of the config.
    pub config_digest: String,
    /// The config as stored.
    pub config_bytes: Vec<u8>,
    /// One per input layer, aligned with the input slice; `None` for an empty layer
    /// (dropped).
    pub layers: Vec<Option<LayerBlob>>,
}

impl BuiltImage {
    /// The layers kept in the image, lowest first.
    pub fn kept_layers(&self) -> impl Iterator<Item = &LayerBlob> {
        self.layers.iter().flatten()
    }
}

/// The media type of a layer blob with `compression`.
pub fn layer_media_type(compression: Compression, oci: bool) -> &'static str {
    match (compression, oci) {
        (Compression::Uncompressed, true) => "application/vnd.oci.image.layer.v1.tar",
        (Compression::Gzip, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (Compression::Zstd, _) => "application/vnd.oci.image.layer.v1.tar+zstd",
        (Compression::Uncompressed, false) => "application/vnd.docker.image.rootfs.diff.tar",
        (Compression::Gzip, false) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
}

fn compression_of(media_type: &str) -> Option<Compression> {
    BlobCompression::from_media_type(media_type).map(|c| match c {
        BlobCompression::None => Compression::Uncompressed,
        BlobCompression::Gzip => Compression::Gzip,
        BlobCompression::Zstd => Compression::Zstd,
    })
}

/// Hashes what goes through (the uncompressed tar, for the `diff_id`).
struct DiffHasher<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for DiffHasher<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder {
    None(BlobWriter),
    Gzip(flate2::write::GzEncoder<BlobWriter>),
    Zstd(zstd::stream::write::Encoder<'static, BlobWriter>),
}

impl Write for Encoder {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(w) => w.write(buf),
            Encoder::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(w) => w.flush(),
            Encoder::Zstd(w) => w.flush(),
        }
    }
}

impl Encoder {
    fn finish(self) -> std::io::Result<BlobWriter> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(w) => w.finish(),
            Encoder::Zstd(w) => w.finish(),
        }
    }
}

/// Makes (or reuses) the blob of one layer; `None` when the layer is empty.
pub(crate) fn layer_blob(
    content: &ContentStore,
    layer: &ExportLayer,
    opts: &ImageOpts,
    compression: Compression,
) -> Result<Option<LayerBlob>> {
    let usable = |b: &&LayerBlob| content.has(&b.digest);
    let matching = layer
        .blobs
        .iter()
        .filter(usable)
        .find(|b| compression_of(&b.media_type) == Some(compression));
    let reuse = matching.or_else(|| {
        if opts.force_compression {
            None
        } else {
            layer
                .blobs
                .iter()
                .filter(usable)
                .find(|b| compression_of(&b.media_type).is_some())
        }
    });
    if let Some(b) = reuse {
        let c = compression_of(&b.media_type).unwrap_or(compression);
        return Ok(Some(LayerBlob {
            media_type: layer_media_type(c, opts.oci_mediatypes || c == Compression::Zstd)
                .to_string(),
            ..b.clone()
        }));
    }
    let empty = std::fs::read_dir(&layer.dir)
        .map_err(|source| Error::Io {
            path: layer.dir.clone(),
            source,
        })?
        .next()
        .is_none();
    if empty {
        return Ok(None);
    }
    let writer = content.writer()?;
    let enc = match compression {
        Compression::Uncompressed => Encoder::None(writer),
        Compression::Gzip => {
            let level = opts.compression_level.map(|l| l as u32).unwrap_or(6);
            Encoder::Gzip(flate2::write::GzEncoder::new(
                writer,
                flate2::Compression::new(level),
            ))
        }
        Compression::Zstd => {
            let level = opts.compression_level.unwrap_or(3);
            Encoder::Zstd(
                zstd::stream::write::Encoder::new(writer, level).map_err(|source| Error::Io {
                    path: layer.dir.clone(),
                    source,
                })?,
            )
        }
    };
    let mut tee = DiffHasher {
        inner: enc,
        hasher: Sha256::new(),
    };
    let count = crate::snapshot::layer::write_tar_counted(&layer.dir, &mut tee)?;
    if count == 0 {
        return Ok(None);
    }
    let diff_id = format!("sha256:{}", hex::encode(tee.hasher.finalize()));
    let writer = tee.inner.finish().map_err(|source| Error::Io {
        path: layer.dir.clone(),
        source,
    })?;
    let (digest, size) = writer.finish(None)?;
    Ok(Some(LayerBlob {
        media_type: layer_media_type(
            compression,
            opts.oci_mediatypes || compression == Compression::Zstd,
        )
        .to_string(),
        digest,
        size,
        diff_id,
    }))
}

/// RFC 3339 UTC time for whole seconds since the epoch.
pub(crate) fn rfc3339(secs: i64) -> String {
    crate::image::rfc3339(secs, 0)
}

/// The creation time for a config without one: `SOURCE_DATE_EPOCH`, else the newest
/// history time, else now.
fn default_created(config: &ImageConfigFile) -> String {
    if let Some(secs) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
    {
        return rfc3339(secs);
    }
    if let Some(latest) = config
        .history
        .iter()
        .filter_map(|h| h.created.clone())
        .max()
    {
        return latest;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(now)
}

/// Makes history agree with the layers the way BuildKit does: entries for dropped (empty)
/// layers become `empty_layer`, surplus layer entries are marked empty from the bottom,
/// and missing ones are appended.
fn normalize_history(history: &mut Vec<History>, kept: &[bool], created: &str) {
    let kept_count = kept.iter().filter(|k| **k).count();
    let layer_entries = history.iter().filter(|h| !h.empty_layer).count();
    if layer_entries == kept.len() && kept_count != kept.len() {
        // One entry per input layer: mark those of dropped layers empty.
        for (i, h) in history.iter_mut().filter(|h| !h.empty_layer).enumerate() {
            if !kept[i] {
                h.empty_layer = true;
            }
        }
    }
    let mut layer_entries = history.iter().filter(|h| !h.empty_layer).count();
    if layer_entries > kept_count {
        for h in history.iter_mut() {
            if layer_entries == kept_count {
                break;
            }
            if !h.empty_layer {
                h.empty_layer = true;
                layer_entries -= 1;
            }
        }
    }
    while layer_entries < kept_count {
        history.push(History {
            created: Some(created.to_string()),
            created_by: String::new(),
            comment: "buildkit.exporter.image.v0".to_string(),
            empty_layer: false,
        });
        layer_entries += 1;
    }
}

/// Builds the image into `content`: layer blobs (reused or made), the config with
/// `rootfs.diff_ids` and normalized history, and the manifest.
pub fn build_image(
    content: &ContentStore,
    layers: &[ExportLayer],
    config: &ImageConfigFile,
    opts: &ImageOpts,
) -> Result<BuiltImage> {
    let mut compression = opts.compression;
    let oci = if compression == Compression::Zstd && !opts.oci_mediatypes {
        tracing::warn!("zstd layers need OCI media types; using them");
        true
    } else {
        opts.oci_mediatypes
    };
    if !oci && compression == Compression::Zstd {
        compression = Compression::Gzip;
    }
    let opts = ImageOpts {
        oci_mediatypes: oci,
        ..opts.clone()
    };

    // Layers in parallel, at most a few at a time (we have few cores).
    let results: Vec<Result<Option<LayerBlob>>> = std::thread::scope(|s| {
        let max = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 4);
        let mut out = Vec::with_capacity(layers.len());
        for chunk in layers.chunks(max) {
            let handles: Vec<_> = chunk
                .iter()
                .map(|l| s.spawn(|| layer_blob(content, l, &opts, compression)))
                .collect();
            for h in handles {
                out.push(h.join().unwrap_or_else(|_| {
                    Err(Error::Attr {
                        exporter: "image".to_string(),
                        message: "layer worker thread panicked".to_string(),
                    })
                }));
            }
        }
        out
    });
    let blobs: Vec<Option<LayerBlob>> = results.into_iter().collect::<Result<_>>()?;

    let mut cfg = config.clone();
    let created = cfg
        .created
        .clone()
        .unwrap_or_else(|| default_created(config));
    cfg.created = Some(created.clone());
    cfg.rootfs = RootFs {
        typ: "layers".to_string(),
        diff_ids: blobs.iter().flatten().map(|b| b.diff_id.clone()).collect(),
    };
    let kept: Vec<bool> = blobs.iter().map(Option::is_some).collect();
    normalize_history(&mut cfg.history, &kept, &created);
    let config_bytes = serde_json::to_vec(&cfg).map_err(|e| Error::Attr {
        exporter: "image".to_string(),
        message: format!("serialize config: {e}"),
    })?;
    let (config_digest, config_size) = content.write_bytes(&config_bytes)?;

    let (manifest_mt, config_mt) = if oci {
        (OCI_MANIFEST, OCI_CONFIG)
    } else {
        (DOCKER_MANIFEST, DOCKER_CONFIG)
    };
    let layer_descs: Vec<serde_json::Value> = blobs
        .iter()
        .flatten()
        .map(|b| {
            serde_json::json!({
                "mediaType": b.media_type,
                "digest": b.digest,
                "size": b.size,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_mt,
        "config": {
            "mediaType": config_mt,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Attr {
        exporter: "image".to_string(),
        message: format!("serialize manifest: {e}"),
    })?;
    let (manifest_digest, _) = content.write_bytes(&manifest_bytes)?;
    Ok(BuiltImage {
        manifest_digest,
        manifest_media_type: manifest_mt.to_string(),
        manifest_bytes,
        config_digest,
        config_bytes,
        layers: blobs,
    })
}

/// Pushes the built image to `name`: layer blobs (skipping those the registry has, in
/// parallel), the config, then the manifest under the tag of `name`. Plain HTTP for
/// localhost and registries the resolver's config marks insecure.
/// `progress(done, total)` counts blob bytes.
pub async fn push(
    resolver: &ImageResolver,
    content: &ContentStore,
    built: &BuiltImage,
    name: &str,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<()> {
    let reference = crate::source::image::normalize_reference(name).map_err(|e| Error::Push {
        reference: name.to_string(),
        message: e.to_string(),
    })?;
    let push_err = |e: crate::source::Error| Error::Push {
        reference: reference.clone(),
        message: match e {
            crate::source::Error::Registry { message, .. } => message,
            other => other.to_string(),
        },
    };
    let mut blobs: Vec<(String, u64)> = built
        .kept_layers()
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    blobs.sort();
    blobs.dedup();
    let config_size = content.size(&built.config_digest)?;
    let total: u64 = blobs.iter().map(|b| b.1).sum::<u64>() + config_size;
    let done = Arc::new(AtomicU64::new(0));
    progress(0, total);
    let results: Vec<Result<()>> =
        futures::stream::iter(blobs.into_iter().map(|(digest, size)| {
            let done = done.clone();
            let reference = reference.clone();
            let push_err = &push_err;
            async move {
                resolver
                    .push_blob(&reference, &digest, &|_, _| {})
                    .await
                    .map_err(push_err)?;
                let d = done.fetch_add(size, Ordering::Relaxed) + size;
                progress(d, total);
                Ok(())
            }
        }))
        .buffer_unordered(3)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    resolver
        .push_blob(&reference, &built.config_digest, &|_, _| {})
        .await
        .map_err(push_err)?;
    progress(total, total);
    resolver
        .push_manifest(
            &reference,
            &built.manifest_media_type,
            &built.manifest_bytes,
        )
        .await
        .map_err(push_err)?;
    Ok(())
}

/// The OCI descriptor of the manifest: `{mediaType, digest, size}`.
pub fn descriptor(built: &BuiltImage) -> serde_json::Value {
    serde_json::json!({
        "mediaType": built.manifest_media_type,
        "digest": built.manifest_digest,
        "size": built.manifest_bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Platform;
    use crate::source::image::RegistryConfig;
    use crate::testutil::{describe, sample_tree};
    use std::path::Path;

    fn layer(dir: &Path) -> ExportLayer {
        ExportLayer {
            dir: dir.to_path_buf(),
            blobs: Vec::new(),
        }
    }

    fn base_config() -> ImageConfigFile {
        let mut c = ImageConfigFile {
            created: Some("2024-05-01T10:00:00Z".into()),
            architecture: Platform::host().architecture,
            os: "linux".into(),
            ..Default::default()
        };
        c.config.cmd = Some(vec!["sh".into()]);
        c
    }

    #[test]
    fn attrs_parse() -> anyhow::Result<()> {
        let attrs: BTreeMap<String, String> = [
            ("name", "a/b:1, c/d:2"),
            ("push", "true"),
            ("registry.insecure", "1"),
            ("compression", "zstd"),
            ("compression-level", "5"),
            ("force-compression", "true"),
            ("oci-mediatypes", "false"),
            ("unknown-thing", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let o = ImageOpts::from_attrs(&attrs)?;
        assert_eq!(o.names, vec!["a/b:1", "c/d:2"]);
        assert!(o.push && o.insecure && o.force_compression && !o.oci_mediatypes);
        assert_eq!(o.compression, Compression::Zstd);
        assert_eq!(o.compression_level, Some(5));
        assert_eq!(
            ImageOpts::from_attrs(&BTreeMap::new())?,
            ImageOpts::default()
        );
        for (k, v) in [
            ("push", "maybe"),
            ("compression", "estargz-ish"),
            ("compression-level", "x"),
            ("compression-level", "99"),
        ] {
            let attrs = BTreeMap::from([(k.to_string(), v.to_string())]);
            assert!(
                matches!(ImageOpts::from_attrs(&attrs), Err(Error::Attr { .. })),
                "{k}={v}"
            );
        }
        Ok(())
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn same_input_same_digest_and_empty_layers_dropped() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let l1 = t.path().join("l1");
        let empty = t.path().join("empty");
        let l2 = t.path().join("l2");
        for d in [&l1, &empty, &l2] {
            std::fs::create_dir(d)?;
        }
        sample_tree(&l1, false)?;
        std::fs::write(l2.join("hello"), b"world")?;
        let mut config = base_config();
        config.history = vec![
            History {
                created_by: "l1".into(),
                ..Default::default()
            },
            History {
                created_by: "env".into(),
                empty_layer: true,
                ..Default::default()
            },
            History {
                created_by: "empty".into(),
                ..Default::default()
            },
            History {
                created_by: "l2".into(),
                ..Default::default()
            },
        ];
        let layers = [layer(&l1), layer(&empty), layer(&l2)];
        for opts in [
            ImageOpts::default(),
            ImageOpts {
                compression: Compression::Zstd,
                ..Default::default()
            },
            ImageOpts {
                compression: Compression::Uncompressed,
                oci_mediatypes: false,
                ..Default::default()
            },
        ] {
            let cs1 = ContentStore::open(&t.path().join("cs1"))?;
            let cs2 = ContentStore::open(&t.path().join("cs2"))?;
            let a = build_image(&cs1, &layers, &config, &opts)?;
            let b = build_image(&cs2, &layers, &config, &opts)?;
            assert_eq!(a, b, "{opts:?}");
            assert!(a.layers[1].is_none());
            assert_eq!(a.kept_layers().count(), 2);
            for l in a.kept_layers() {
                assert!(cs1.has(&l.digest));
                assert_eq!(cs1.size(&l.digest)?, l.size);
                assert_eq!(
                    l.media_type,
                    layer_media_type(opts.compression, opts.oci_mediatypes)
                );
            }
            let m: serde_json::Value = serde_json::from_slice(&a.manifest_bytes)?;
            assert_eq!(m["mediaType"], a.manifest_media_type.as_str());
            assert_eq!(m["layers"].as_array().map(Vec::len), Some(2));
            let cfg: ImageConfigFile = serde_json::from_slice(&cs1.read(&a.config_digest)?)?;
            assert_eq!(cfg.rootfs.diff_ids.len(), 2);
            let layer_hist: Vec<&str> = cfg
                .history
                .iter()
                .filter(|h| !h.empty_layer)
                .map(|h| h.created_by.as_str())
                .collect();
            assert_eq!(layer_hist, vec!["l1", "l2"]);
            assert_eq!(cfg.created.as_deref(), Some("2024-05-01T10:00:00Z"));

            // A rebuild with the blobs known reuses them.
            let known: Vec<ExportLayer> = layers
                .iter()
                .zip(&a.layers)
                .map(|(l, b)| ExportLayer {
                    // Known blobs are used without reading the dir.
                    dir: if b.is_some() {
                        t.path().join("does-not-exist")
                    } else {
                        l.dir.clone()
                    },
                    blobs: b.iter().cloned().collect::<Vec<_>>(),
                })
                .collect();
            let c = build_image(&cs1, &known, &config, &opts)?;
            assert_eq!(c.manifest_digest, a.manifest_digest);
        }
        Ok(())
    }

    #[test]
    fn history_is_fixed_up() {
        let mut h = vec![History::default(); 3];
        normalize_history(&mut h, &[true], "t");
        assert_eq!(h.iter().filter(|e| !e.empty_layer).count(), 1);
        let mut h = vec![];
        normalize_history(&mut h, &[true, true], "t");
        assert_eq!(h.len(), 2);
        assert!(h.iter().all(|e| e.created.as_deref() == Some("t")));
    }

    #[test]
    fn whiteouts_survive_export() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let l = t.path().join("l");
        std::fs::create_dir(&l)?;
        sample_tree(&l, true)?;
        let cs = ContentStore::open(&t.path().join("cs"))?;
        let built = build_image(&cs, &[layer(&l)], &base_config(), &ImageOpts::default())?;
        let blob = built
            .kept_layers()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no layer"))?;
        let mut ar = ::tar::Archive::new(flate2::read::GzDecoder::new(cs.open_blob(&blob.digest)?));
        let mut names = Vec::new();
        for e in ar.entries()? {
            names.push(e?.path()?.to_string_lossy().into_owned());
        }
        assert!(names.contains(&"etc/.wh.gone".to_string()), "{names:?}");
        assert!(names.contains(&"var/.wh..wh..opq".to_string()), "{names:?}");
        Ok(())
    }

    #[tokio::test]
    async fn push_then_pull_back() -> anyhow::Result<()> {
        let reg = kiln_e2e::registry::Registry::start()?;
        let t = tempfile::tempdir()?;
        let l1 = t.path().join("l1");
        let l2 = t.path().join("l2");
        std::fs::create_dir(&l1)?;
        std::fs::create_dir(&l2)?;
        sample_tree(&l1, false)?;
        sample_tree(&l2, true)?;
        let cs = std::sync::Arc::new(ContentStore::open(&t.path().join("cs"))?);
        let built = build_image(
            &cs,
            &[layer(&l1), layer(&l2)],
            &base_config(),
            &ImageOpts::default(),
        )?;
        let resolver = ImageResolver::new(RegistryConfig::default(), cs.clone());
        let name = format!("{}/test/img:1", reg.addr());
        let last = std::sync::Arc::new(AtomicU64::new(0));
        let seen = last.clone();
        push(&resolver, &cs, &built, &name, &move |d, total| {
            assert!(d <= total);
            seen.store(d, Ordering::SeqCst);
        })
        .await?;
        let total: u64 =
            built.kept_layers().map(|l| l.size).sum::<u64>() + cs.size(&built.config_digest)?;
        assert_eq!(last.load(Ordering::SeqCst), total);
        // A second push (blobs already there) works too, under another tag.
        push(
            &resolver,
            &cs,
            &built,
            &format!("{}/test/img:2", reg.addr()),
            &|_, _| {},
        )
        .await?;

        let cs2 = std::sync::Arc::new(ContentStore::open(&t.path().join("cs2"))?);
        let puller = ImageResolver::new(RegistryConfig::default(), cs2.clone());
        for tag in ["1", "2"] {
            let img = puller
                .resolve(&format!("{}/test/img:{tag}", reg.addr()), &Platform::host())
                .await?;
            assert_eq!(img.digest, built.manifest_digest);
            assert_eq!(img.config_digest, built.config_digest);
        }
        let img = puller.resolve(&name, &Platform::host()).await?;
        for (i, (desc, src)) in img.layers.iter().zip([&l1, &l2]).enumerate() {
            let path = puller.fetch_blob(&name, desc, &|_, _| {}).await?;
            let dest = t.path().join(format!("out{i}"));
            std::fs::create_dir(&dest)?;
            let stats = crate::snapshot::layer::unpack_blob(
                &path,
                &desc.media_type,
                &dest,
                &Default::default(),
            )?;
            assert_eq!(stats.diff_id, img.config.rootfs.diff_ids[i]);
            assert_eq!(describe(src)?, describe(&dest)?);
        }
        assert_eq!(descriptor(&built)["digest"], built.manifest_digest.as_str());
        Ok(())
    }
}
