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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::oci::tests::{read_tar, small_image};

    #[test]
    fn repo_tags_are_familiar() -> anyhow::Result<()> {
        assert_eq!(repo_tag("busybox")?.as_deref(), Some("busybox:latest"));
        assert_eq!(repo_tag("docker.io/user/x:2")?.as_deref(), Some("user/x:2"));
        assert_eq!(
            repo_tag("localhost:5000/a/b:c")?.as_deref(),
            Some("localhost:5000/a/b:c")
        );
        let pinned = format!("a/b@sha256:{}", "0".repeat(64));
        assert_eq!(repo_tag(&pinned)?, None);
        Ok(())
    }

    #[test]
    fn docker_tar_structure() -> anyhow::Result<()> {
        let (t, cs, built) = small_image()?;
        let mut out = Vec::new();
        write_docker_tar(&cs, &built, &["example.com/app:v1".to_string()], &mut out)?;
        let files = read_tar(&out)?;
        let m: serde_json::Value = serde_json::from_slice(&files["manifest.json"])?;
        let config = m[0]["Config"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            config,
            format!(
                "blobs/sha256/{}",
                built.config_digest.trim_start_matches("sha256:")
            )
        );
        assert_eq!(files[&config], built.config_bytes);
        assert_eq!(m[0]["RepoTags"][0], "example.com/app:v1");
        let layers = m[0]["Layers"].as_array().cloned().unwrap_or_default();
        assert_eq!(layers.len(), built.kept_layers().count());
        for l in &layers {
            assert!(files.contains_key(l.as_str().unwrap_or_default()));
        }
        assert!(files.contains_key("index.json"));
        let path = t.path().join("img.tar");
        std::fs::write(&path, &out)?;
        let o = std::process::Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("docker-archive:{}", path.display()))
            .output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        assert_eq!(
            cfg["rootfs"]["diff_ids"][0],
            built
                .kept_layers()
                .next()
                .map(|l| l.diff_id.clone())
                .unwrap_or_default()
                .as_str()
        );
        Ok(())
    }
}
