//! `--export-cache …,cache-mounts=true`: a cold worker importing the cache starts its
//! `RUN --mount=type=cache` mounts with the exporting worker's contents (registry and OCI
//! layout), without the attribute nothing is carried, and a corrupt mount blob is a
//! warning with an empty mount, never a failed or wrong build.

use std::path::Path;

use kiln_e2e::registry::Registry;
use kiln_worker::cache::registry::CacheEntry;
use kiln_worker::control::CacheRequest;

use super::regcache::{base, dockerfile_request, entry, run, warnings, worker, Worker};
use super::support::{project, to};

/// Fills the cache mount `deps` (a file and a nested directory).
const FILL: &str = r#"ARG BASE
FROM ${BASE}
RUN --mount=type=cache,id=deps,target=/cache sh -c 'echo fetched-once > /cache/dep.txt && mkdir -p /cache/sub && echo deep > /cache/sub/x'
"#;

/// Reads the cache mount `deps` into /seen (another definition than [`FILL`], and one per
/// `n`, so nothing is a cache hit).
fn read(n: u32) -> String {
    format!(
        "ARG BASE\nFROM ${{BASE}}\nRUN --mount=type=cache,id=deps,target=/cache sh -c ': read {n}; cat /cache/dep.txt /cache/sub/x > /seen 2>/dev/null || echo missing > /seen'\n"
    )
}

/// Builds `dockerfile` on `w` with `caches`; returns /seen (if any) and the warnings.
async fn build(
    w: &Worker,
    base: &str,
    dockerfile: &str,
    caches: CacheRequest,
) -> anyhow::Result<(String, Vec<String>)> {
    let dir = project(dockerfile, &[])?;
    let out = tempfile::tempdir()?;
    let req = dockerfile_request(base, dir.path(), vec![to("local", out.path())]);
    let built = run(w, req, caches).await?;
    let seen = std::fs::read_to_string(out.path().join("seen")).unwrap_or_default();
    Ok((seen, warnings(&built)))
}

/// A fresh worker builds [`read`]`(n)` importing `import`.
async fn cold_read(
    base: &str,
    n: u32,
    import: CacheEntry,
) -> anyhow::Result<(String, Vec<String>)> {
    let w = worker(None)?;
    build(&w, base, &read(n), imports(import)).await
}

fn exports(e: CacheEntry) -> CacheRequest {
    CacheRequest {
        exports: vec![e],
        imports: vec![],
    }
}

fn imports(e: CacheEntry) -> CacheRequest {
    CacheRequest {
        exports: vec![],
        imports: vec![e],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_mounts_reach_a_cold_worker_through_a_registry() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let with = format!("{}/kiln/mounts:with", reg.addr());
    let without = format!("{}/kiln/mounts:without", reg.addr());
    let a = worker(None)?;
    build(
        &a,
        &base,
        FILL,
        exports(entry(
            "registry",
            &[("ref", &with), ("cache-mounts", "true"), ("mode", "max")],
        )),
    )
    .await?;
    build(
        &a,
        &base,
        FILL,
        exports(entry("registry", &[("ref", &without)])),
    )
    .await?;

    let (seen, warns) = cold_read(&base, 1, entry("registry", &[("ref", &with)])).await?;
    assert_eq!(seen, "fetched-once\ndeep\n", "warnings: {warns:?}");
    assert!(warns.is_empty(), "{warns:?}");

    let (seen, _) = cold_read(&base, 2, entry("registry", &[("ref", &without)])).await?;
    assert_eq!(
        seen, "missing\n",
        "a cache exported without cache-mounts=true seeded a mount"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_mounts_through_a_layout_keep_local_contents_and_survive_corruption(
) -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let layout = tempfile::tempdir()?;
    let dest = layout.path().join("cache");
    let dest_s = dest.to_string_lossy().to_string();
    let a = worker(None)?;
    build(
        &a,
        &base,
        FILL,
        exports(entry(
            "local",
            &[("dest", &dest_s), ("cache-mounts", "true")],
        )),
    )
    .await?;
    let import = || imports(entry("local", &[("src", &dest_s)]));

    let b = worker(None)?;
    let (seen, warns) = build(&b, &base, &read(3), import()).await?;
    assert_eq!(seen, "fetched-once\ndeep\n", "warnings: {warns:?}");

    // The worker's own contents win over a later import.
    const WRITE: &str = r#"ARG BASE
FROM ${BASE}
RUN --mount=type=cache,id=deps,target=/cache sh -c 'echo local > /cache/dep.txt'
"#;
    build(&b, &base, WRITE, CacheRequest::default()).await?;
    let (seen, _) = build(&b, &base, &read(4), import()).await?;
    assert_eq!(seen, "local\ndeep\n");

    // A corrupt mount blob: a warning, an empty mount, a successful build.
    corrupt_mount_blob(&dest)?;
    let (seen, warns) = cold_read(&base, 5, entry("local", &[("src", &dest_s)])).await?;
    assert_eq!(seen, "missing\n");
    assert!(
        warns
            .iter()
            .any(|w| w.contains("cache mount \"deps\" not seeded")),
        "{warns:?}"
    );
    Ok(())
}

/// Flips a byte in the blob the layout's cache config names for mount `deps`.
fn corrupt_mount_blob(layout: &Path) -> anyhow::Result<()> {
    let blobs = layout.join("blobs/sha256");
    for e in std::fs::read_dir(&blobs)? {
        let bytes = std::fs::read(e?.path())?;
        let Ok(config) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let Some(m) = config["cacheMounts"].as_array().and_then(|m| m.first()) else {
            continue;
        };
        anyhow::ensure!(m["id"] == "deps", "unexpected mount {m}");
        let layer = m["layer"].as_u64().unwrap_or(u64::MAX) as usize;
        let digest = config["layers"][layer]["digest"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("mount layer {layer} missing"))?;
        let path = blobs.join(digest.trim_start_matches("sha256:"));
        let mut blob = std::fs::read(&path)?;
        let mid = blob.len() / 2;
        blob[mid] ^= 0xff;
        std::fs::write(&path, blob)?;
        return Ok(());
    }
    anyhow::bail!("no cache config with cache mounts in {}", blobs.display())
}
