//! A tiny base image made from the host's static busybox (`/bin/busybox`): an OCI image
//! layout on disk ([`busybox_layout`]) and a push of it into a registry with skopeo
//! ([`push_base`]). Output is deterministic: the same busybox gives the same digests.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// Where the static busybox lives (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// `PATH` of the base image's config.
pub const BASE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A fixed timestamp so the image is reproducible.
const EPOCH: &str = "2024-01-01T00:00:00Z";
const MTIME: u64 = 1_704_067_200;

/// The image's pieces as written by [`busybox_layout`].
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// Digest of the manifest.
    pub manifest_digest: String,
    /// Digest of the config.
    pub config_digest: String,
    /// Digest of the (gzip) layer blob.
    pub layer_digest: String,
    /// Digest of the uncompressed layer tar.
    pub diff_id: String,
}

/// Writes an OCI image layout into `dir` (created) holding one image, tagged `latest`,
/// for `linux/<platform_arch>`: one gzip layer with `/bin/busybox`, a symlink in `/bin` for
/// every applet, `/etc/passwd`, `/etc/group`, `/tmp` (1777) and `/root`.
pub fn busybox_layout(dir: &Path, platform_arch: &str) -> anyhow::Result<()> {
    busybox_layout_info(dir, platform_arch).map(|_| ())
}

/// [`busybox_layout`], returning the digests it wrote.
pub fn busybox_layout_info(dir: &Path, platform_arch: &str) -> anyhow::Result<BaseImage> {
    let tar = layer_tar()?;
    write_layout(
        dir,
        &tar,
        platform_arch,
        serde_json::json!({ "Env": [BASE_PATH], "Cmd": ["sh"] }),
        "kiln-e2e busybox base",
    )
}

/// Writes an OCI image layout into `dir` (created) holding one image, tagged `latest`, whose
/// only layer is `layer_tar` (an uncompressed tar, gzipped here) and whose image config is
/// `config` (the `config` object of the image configuration: `Env`, `Cmd`, `User`, …).
pub fn write_layout(
    dir: &Path,
    layer_tar: &[u8],
    platform_arch: &str,
    config: serde_json::Value,
    created_by: &str,
) -> anyhow::Result<BaseImage> {
    let diff_id = sha256(layer_tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(layer_tar)?;
    let layer = gz.finish()?;
    let layer_digest = sha256(&layer);

    let config = serde_json::json!({
        "created": EPOCH,
        "architecture": platform_arch,
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": EPOCH, "created_by": created_by }],
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": platform_arch, "os": "linux" },
            "annotations": { "org.opencontainers.image.ref.name": "latest" },
        }],
    });

    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("create {}", blobs.display()))?;
    for (digest, bytes) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let hexpart = digest.trim_start_matches("sha256:");
        std::fs::write(blobs.join(hexpart), bytes)?;
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(BaseImage {
        manifest_digest,
        config_digest,
        layer_digest,
        diff_id,
    })
}

/// The host's architecture in OCI terms (`amd64`, `arm64`, …).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Builds the busybox image for the host architecture and pushes it to
/// `<registry_addr>/<name_tag>` over plain HTTP with skopeo.
pub fn push_base(registry_addr: &str, name_tag: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    busybox_layout(&layout, host_arch())?;
    push_layout(&layout, registry_addr, name_tag, &[])
}

/// Packs a root filesystem tarball (e.g. `mmdebstrap`'s output) as a one-layer image with
/// `config` and pushes it to `<registry_addr>/<name_tag>`: how scripts make stand-ins for
/// public base images (Debian, distroless) on a machine that cannot reach them.
pub fn push_rootfs(
    registry_addr: &str,
    name_tag: &str,
    rootfs_tar: &Path,
    config: serde_json::Value,
) -> anyhow::Result<()> {
    let tar =
        std::fs::read(rootfs_tar).with_context(|| format!("read {}", rootfs_tar.display()))?;
    // A quick sanity check, so a wrong path fails here and not inside the registry push.
    tar::Archive::new(tar.as_slice())
        .entries()
        .and_then(|mut e| e.next().transpose())
        .with_context(|| format!("{} is not a tar archive", rootfs_tar.display()))?
        .with_context(|| format!("{} is an empty tar archive", rootfs_tar.display()))?;
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    let by = format!("kiln-testenv push-rootfs {}", rootfs_tar.display());
    write_layout(&layout, &tar, host_arch(), config, &by)?;
    push_layout(&layout, registry_addr, name_tag, &[])
}

/// [`push_base`] into a registry that wants credentials (skopeo `--dest-creds`).
pub fn push_base_with_creds(
    registry_addr: &str,
    name_tag: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    busybox_layout(&layout, host_arch())?;
    let creds = format!("{user}:{password}");
    push_layout(
        &layout,
        registry_addr,
        name_tag,
        &["--dest-creds", creds.as_str()],
    )
}

/// Pushes the `latest` image of the OCI layout at `layout` to
/// `<registry_addr>/<name_tag>` with skopeo; `extra` goes to `skopeo copy` (e.g.
/// `["--format", "v2s2"]` for a Docker schema2 manifest).
pub fn push_layout(
    layout: &Path,
    registry_addr: &str,
    name_tag: &str,
    extra: &[&str],
) -> anyhow::Result<()> {
    let out = Command::new("skopeo")
        .arg("copy")
        .arg("--insecure-policy")
        .arg("--dest-tls-verify=false")
        .args(extra)
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{registry_addr}/{name_tag}"))
        .output()
        .context("run skopeo")?;
    if !out.status.success() {
        bail!(
            "skopeo copy to {registry_addr}/{name_tag} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn applets() -> anyhow::Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("run {BUSYBOX} --list"))?;
    if !out.status.success() {
        bail!("{BUSYBOX} --list failed");
    }
    let mut names: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "busybox" && !n.contains('/'))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

fn layer_tar() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
    let passwd =
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    let group = "root:x:0:\nnogroup:x:65534:\n";
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, path, std::io::empty())
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data)
    };
    dir(&mut b, "bin/", 0o755)?;
    file(&mut b, "bin/busybox", 0o755, &busybox)?;
    for name in applets()? {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{name}"), "busybox")?;
    }
    dir(&mut b, "etc/", 0o755)?;
    file(&mut b, "etc/group", 0o644, group.as_bytes())?;
    file(&mut b, "etc/passwd", 0o644, passwd.as_bytes())?;
    dir(&mut b, "root/", 0o700)?;
    dir(&mut b, "tmp/", 0o1777)?;
    Ok(b.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn layout_is_deterministic_and_well_formed() -> anyhow::Result<()> {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        let ia = busybox_layout_info(a.path(), "amd64")?;
        let ib = busybox_layout_info(b.path(), "amd64")?;
        assert_eq!(ia.manifest_digest, ib.manifest_digest);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.path().join("index.json"))?)?;
        assert_eq!(index["manifests"][0]["digest"], ia.manifest_digest.as_str());
        // The layer holds busybox, a sh symlink and /tmp with the sticky bit.
        let blob = a
            .path()
            .join("blobs/sha256")
            .join(ia.layer_digest.trim_start_matches("sha256:"));
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(blob)?));
        let mut seen = std::collections::BTreeMap::new();
        for e in ar.entries()? {
            let e = e?;
            let path = e.path()?.to_string_lossy().into_owned();
            let link = e.link_name()?.map(|l| l.to_string_lossy().into_owned());
            seen.insert(path, (e.header().mode()?, link));
        }
        assert_eq!(
            seen.get("bin/sh").map(|v| v.1.as_deref()),
            Some(Some("busybox"))
        );
        assert_eq!(seen.get("tmp/").map(|v| v.0), Some(0o1777));
        assert!(seen.contains_key("bin/busybox"));
        assert!(seen.contains_key("etc/passwd"));
        Ok(())
    }

    #[test]
    fn push_then_get_manifest() -> anyhow::Result<()> {
        let reg = Registry::start()?;
        push_base(&reg.addr(), "base/busybox:1")?;
        let resp = crate::http::get(
            &reg.addr(),
            "/v2/base/busybox/manifests/1",
            &[(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
            )],
        )?;
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let m: serde_json::Value = serde_json::from_slice(&resp.body)?;
        assert_eq!(m["layers"].as_array().map(Vec::len), Some(1));
        let missing = crate::http::get(&reg.addr(), "/v2/base/busybox/manifests/nope", &[])?;
        assert_eq!(missing.status, 404);
        Ok(())
    }

    #[test]
    fn push_with_creds_to_auth_registry() -> anyhow::Result<()> {
        use base64::Engine;
        let reg = Registry::start_with_auth("pusher", "pw")?;
        let err = push_base(&reg.addr(), "base/busybox:1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("skopeo copy to"), "{err}");
        push_base_with_creds(&reg.addr(), "base/busybox:1", "pusher", "pw")?;
        let b64 = base64::engine::general_purpose::STANDARD.encode("pusher:pw");
        let resp = crate::http::get(
            &reg.addr(),
            "/v2/base/busybox/manifests/1",
            &[
                ("Accept", "application/vnd.oci.image.manifest.v1+json"),
                ("Authorization", &format!("Basic {b64}")),
            ],
        )?;
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        Ok(())
    }
}
