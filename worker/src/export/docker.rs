//! The `docker` exporter: a tarball `docker load` accepts: the OCI layout plus Docker's
//! `manifest.json` (`Config`, `RepoTags`, `Layers`) pointing into `blobs/sha256/`.

use std::io::Write;

use super::image::BuiltImage;
use super::{Error, Result};
use crate::content::ContentStore;

/// The familiar form Docker shows for a name: `docker.io/library/busybox:latest` →
/// `busybox:latest`; `None` for names without a tag (digest-only).
pub fn repo_tag(name: &str) -> Result<Option<String>> {
    let (full, tag) = super::oci::name_and_tag(name)?;
    if tag.is_none() || full.contains('@') {
        return Ok(None);
    }
    let short = full
        .strip_prefix("docker.io/library/")
        .or_else(|| full.strip_prefix("docker.io/"))
        .unwrap_or(&full);
    Ok(Some(short.to_string()))
}

/// Docker's `manifest.json` for the image.
pub fn manifest_json(built: &BuiltImage, names: &[String]) -> Result<Vec<u8>> {
    let mut tags = Vec::new();
    for n in names {
        if let Some(t) = repo_tag(n)? {
            tags.push(t);
        }
    }
    let path = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let m = serde_json::json!([{
        "Config": path(&built.config_digest),
        "RepoTags": tags,
        "Layers": built.kept_layers().map(|l| path(&l.digest)).collect::<Vec<_>>(),
    }]);
    serde_json::to_vec(&m).map_err(|e| Error::Attr {
        exporter: "docker".to_string(),
        message: format!("serialize manifest.json: {e}"),
    })
}

/// Writes the image as a `docker load` tarball to `w`.
pub fn write_docker_tar(
    content: &ContentStore,
    built: &BuiltImage,
    names: &[String],
    w: &mut dyn Write,
) -> Result<()> {
    let mut b = tar::Builder::new(w);
    let manifest = manifest_json(built, names)?;
    super::oci::append(
        &mut b,
        "manifest.json",
        &mut &manifest[..],
        manifest.len() as u64,
        false,
    )?;
    super::oci::write_layout_entries(&mut b, content, built, names)?;
    b.finish().map_err(|source| Error::Io {
        path: "<tar stream>".into(),
        source,
    })
}
