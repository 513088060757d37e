//! The `oci` exporter: an OCI image layout tarball (`oci-layout`, `index.json` with the
//! image names as annotations, `blobs/sha256/…`), written deterministically.

use std::collections::BTreeSet;
use std::io::Write;

use super::image::BuiltImage;
use super::{Error, Result};
use crate::content::ContentStore;
use crate::source::image::OCI_INDEX;

/// Annotation with the full image name (containerd).
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// Annotation with the tag (OCI).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

fn io_err(e: std::io::Error) -> Error {
    Error::Io {
        path: "<tar stream>".into(),
        source: e,
    }
}

/// Writes one tar entry (regular file or dir) with fixed metadata.
pub(crate) fn append(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &str,
    data: &mut dyn std::io::Read,
    size: u64,
    dir: bool,
) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    if dir {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
    } else {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(size);
    }
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data).map_err(io_err)
}

/// The blobs of an image: config, layers, manifest, each once, sorted.
pub(crate) fn blob_digests(built: &BuiltImage) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    set.insert(built.config_digest.clone());
    set.insert(built.manifest_digest.clone());
    for l in built.kept_layers() {
        set.insert(l.digest.clone());
    }
    set
}

/// Appends `blobs/`, `blobs/sha256/` and every blob of the image.
pub(crate) fn append_blobs(
    b: &mut tar::Builder<&mut dyn Write>,
    content: &ContentStore,
    built: &BuiltImage,
) -> Result<()> {
    append(b, "blobs/", &mut std::io::empty(), 0, true)?;
    append(b, "blobs/sha256/", &mut std::io::empty(), 0, true)?;
    for digest in blob_digests(built) {
        let size = content.size(&digest)?;
        let mut f = content.open_blob(&digest)?;
        let hex = digest.trim_start_matches("sha256:");
        append(b, &format!("blobs/sha256/{hex}"), &mut f, size, false)?;
    }
    Ok(())
}

/// Splits a name into (full normalized name, tag) when it has a tag.
pub(crate) fn name_and_tag(name: &str) -> Result<(String, Option<String>)> {
    let full = crate::source::image::normalize_reference(name).map_err(|e| Error::Attr {
        exporter: "oci".to_string(),
        message: format!("invalid image name {name:?}: {e}"),
    })?;
    let without_digest = full.split('@').next().unwrap_or(&full);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let tag = last.split_once(':').map(|(_, t)| t.to_string());
    Ok((full, tag))
}

/// The `index.json` of the layout: one manifest entry per name (annotated), or one
/// unannotated entry when there are no names.
pub fn index_json(built: &BuiltImage, names: &[String]) -> Result<Vec<u8>> {
    let base = super::image::descriptor(built);
    let mut manifests = Vec::new();
    for name in names {
        let (full, tag) = name_and_tag(name)?;
        let mut d = base.clone();
        let mut ann = serde_json::Map::new();
        ann.insert(ANNOTATION_IMAGE_NAME.into(), full.clone().into());
        if let Some(tag) = tag {
            ann.insert(ANNOTATION_REF_NAME.into(), tag.into());
        }
        d["annotations"] = serde_json::Value::Object(ann);
        manifests.push(d);
    }
    if manifests.is_empty() {
        manifests.push(base);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    serde_json::to_vec(&index).map_err(|e| Error::Attr {
        exporter: "oci".to_string(),
        message: format!("serialize index: {e}"),
    })
}

/// Writes the image as an OCI layout tarball to `w`.
pub fn write_oci_tar(
    content: &ContentStore,
    built: &BuiltImage,
    names: &[String],
    w: &mut dyn Write,
) -> Result<()> {
    let mut b = tar::Builder::new(w);
    write_layout_entries(&mut b, content, built, names)?;
    b.finish().map_err(io_err)
}

/// The OCI layout entries (shared with the docker exporter).
pub(crate) fn write_layout_entries(
    b: &mut tar::Builder<&mut dyn Write>,
    content: &ContentStore,
    built: &BuiltImage,
    names: &[String],
) -> Result<()> {
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append(
        b,
        "oci-layout",
        &mut &layout[..],
        layout.len() as u64,
        false,
    )?;
    let index = index_json(built, names)?;
    append(b, "index.json", &mut &index[..], index.len() as u64, false)?;
    append_blobs(b, content, built)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::export::image::{build_image, ImageOpts};
    use crate::export::ExportLayer;
    use std::collections::BTreeMap;
    use std::io::Read;

    /// Builds a small image and returns (store dir, store, image).
    pub(crate) fn small_image() -> anyhow::Result<(tempfile::TempDir, ContentStore, BuiltImage)> {
        let t = tempfile::tempdir()?;
        let l = t.path().join("l");
        std::fs::create_dir(&l)?;
        crate::testutil::sample_tree(&l, true)?;
        let cs = ContentStore::open(&t.path().join("cs"))?;
        let config = crate::image::ImageConfigFile {
            created: Some("2024-05-01T10:00:00Z".into()),
            architecture: crate::image::Platform::host().architecture,
            os: "linux".into(),
            ..Default::default()
        };
        let built = build_image(
            &cs,
            &[ExportLayer {
                dir: l,
                blobs: vec![],
            }],
            &config,
            &ImageOpts::default(),
        )?;
        Ok((t, cs, built))
    }

    pub(crate) fn read_tar(bytes: &[u8]) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for e in ::tar::Archive::new(bytes).entries()? {
            let mut e = e?;
            let name = e.path()?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.insert(name, data);
        }
        Ok(out)
    }

    #[test]
    fn oci_tar_structure() -> anyhow::Result<()> {
        let (t, cs, built) = small_image()?;
        let names = vec!["example.com/app:v1".to_string(), "busybox".to_string()];
        let mut out = Vec::new();
        write_oci_tar(&cs, &built, &names, &mut out)?;
        let mut again = Vec::new();
        write_oci_tar(&cs, &built, &names, &mut again)?;
        assert_eq!(out, again, "deterministic");
        let files = read_tar(&out)?;
        assert_eq!(
            files.get("oci-layout").map(|v| v.as_slice()),
            Some(&br#"{"imageLayoutVersion":"1.0.0"}"#[..])
        );
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"])?;
        let m = index["manifests"].as_array().cloned().unwrap_or_default();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["digest"], built.manifest_digest.as_str());
        assert_eq!(m[0]["annotations"][ANNOTATION_REF_NAME], "v1");
        assert_eq!(
            m[0]["annotations"][ANNOTATION_IMAGE_NAME],
            "example.com/app:v1"
        );
        assert_eq!(
            m[1]["annotations"][ANNOTATION_IMAGE_NAME],
            "docker.io/library/busybox:latest"
        );
        // Every blob is there and matches its digest.
        for d in blob_digests(&built) {
            let data = &files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))];
            assert_eq!(crate::content::digest_bytes(data), d);
        }
        // skopeo reads it as an OCI archive.
        let path = t.path().join("img.tar");
        std::fs::write(&path, &out)?;
        let o = std::process::Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci-archive:{}:v1", path.display()))
            .output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            crate::content::digest_bytes(&o.stdout),
            built.manifest_digest
        );
        Ok(())
    }
}
