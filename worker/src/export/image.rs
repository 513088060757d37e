//! The `image` exporter. PLACEHOLDER in main until the imgexport branch lands.

use std::collections::BTreeMap;

use super::{Compression, Error, ExportLayer, LayerBlob, Result};
use crate::content::ContentStore;
use crate::image::ImageConfigFile;
use crate::source::image::ImageResolver;

/// Image exporter options.
#[derive(Debug, Clone, Default)]
pub struct ImageOpts {
    /// Names.
    pub names: Vec<String>,
    /// Push.
    pub push: bool,
    /// Insecure.
    pub insecure: bool,
    /// Compression.
    pub compression: Compression,
    /// Level.
    pub compression_level: Option<i32>,
    /// Force.
    pub force_compression: bool,
    /// OCI media types.
    pub oci_mediatypes: bool,
}

impl ImageOpts {
    /// From attrs.
    pub fn from_attrs(_attrs: &BTreeMap<String, String>) -> Result<ImageOpts> {
        Err(Error::NotImplemented("image exporter"))
    }
}

/// Built image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Manifest digest.
    pub manifest_digest: String,
    /// Media type.
    pub manifest_media_type: String,
    /// Manifest.
    pub manifest_bytes: Vec<u8>,
    /// Config digest.
    pub config_digest: String,
    /// Config.
    pub config_bytes: Vec<u8>,
    /// Layers.
    pub layers: Vec<Option<LayerBlob>>,
}

/// Build.
pub fn build_image(
    _c: &ContentStore,
    _l: &[ExportLayer],
    _cfg: &ImageConfigFile,
    _o: &ImageOpts,
) -> Result<BuiltImage> {
    Err(Error::NotImplemented("image exporter"))
}

/// Push.
pub async fn push(
    _r: &ImageResolver,
    _c: &ContentStore,
    _b: &BuiltImage,
    _name: &str,
    _p: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<()> {
    Err(Error::NotImplemented("push"))
}

/// Descriptor.
pub fn descriptor(b: &BuiltImage) -> serde_json::Value {
    serde_json::json!({"mediaType": b.manifest_media_type, "digest": b.manifest_digest, "size": b.manifest_bytes.len()})
}
