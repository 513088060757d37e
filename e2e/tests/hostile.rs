//! Hostile input (issue 8 item 4): builds made of known BuildKit escape classes, each run
//! for real — daemonless through the engine (runc, overlayfs, a `docker-registry` on
//! loopback), or through a real `kiln-worker` process for the fsutil cases, with a
//! hand-made session client sending the malicious packets.
//!
//! Every case checks the same two things: the build fails with an error naming the
//! input, or its content stays inside its root; and nothing outside the worker's root is
//! read or written. A canary directory outside everything holds a file whose content
//! must appear in no output and no layer of the worker's store, and whose listing and
//! contents must be unchanged afterwards.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use kiln_e2e::registry::Registry;
use kiln_worker::control::{BuildRequest, Engine, EngineConfig, ExportRequest, Frontend};
use kiln_worker::frontend::BuildOpts;
use kiln_worker::image::Platform;
use kiln_worker::progress::Progress;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

// === environment ===

/// A registry with the busybox base, an engine on a fresh root, and the canary.
struct Env {
    reg: Registry,
    base: String,
    engine: Engine,
    /// Everything of the test lives below: `root/` (the worker's), `outside/` (canary),
    /// contexts and outputs.
    dir: tempfile::TempDir,
    /// Content of `outside/canary`; unique per test.
    canary: String,
    /// Listing and contents of `outside/` before the test.
    outside_before: BTreeMap<String, Vec<u8>>,
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

impl Env {
    fn new(max_layer_size: Option<u64>) -> anyhow::Result<Env> {
        let reg = Registry::start()?;
        kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
        let base = format!("{}/kiln/base:1", reg.addr());
        let dir = tempfile::Builder::new().prefix("kiln-hostile-").tempdir()?;
        let mut config = EngineConfig {
            root: dir.path().join("root"),
            max_parallelism: 4,
            ..Default::default()
        };
        if let Some(n) = max_layer_size {
            config.max_layer_size = n;
        }
        let engine = Engine::open(config)?;
        let canary = format!("kiln-hostile-canary-{}", unique());
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("dir"))?;
        std::fs::write(outside.join("canary"), &canary)?;
        std::fs::write(outside.join("dir/canary"), &canary)?;
        let outside_before = snapshot(&outside)?;
        Ok(Env {
            reg,
            base,
            engine,
            dir,
            canary,
            outside_before,
        })
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A new empty directory below the test's directory.
    fn mkdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// A context directory `name` with a Dockerfile.
    fn context(&self, name: &str, dockerfile: &str) -> anyhow::Result<PathBuf> {
        let p = self.mkdir(name)?;
        std::fs::write(p.join("Dockerfile"), dockerfile)?;
        Ok(p)
    }

    /// Builds the Dockerfile of `ctx` daemonless and exports the result to `out` (a local
    /// directory, when given). `Err` carries the whole error chain.
    async fn build(&self, ctx: &Path, out: Option<&Path>) -> anyhow::Result<Result<(), String>> {
        let mut build_args = BTreeMap::new();
        build_args.insert("BASE".to_string(), self.base.clone());
        let opts = BuildOpts {
            filename: "Dockerfile".into(),
            build_args,
            build_platform: Platform::host(),
            context_name: "context".into(),
            ..Default::default()
        };
        let mut locals = HashMap::new();
        locals.insert("context".to_string(), ctx.to_path_buf());
        locals.insert("dockerfile".to_string(), ctx.to_path_buf());
        let exports = out
            .map(|o| {
                vec![ExportRequest {
                    typ: "local".into(),
                    attrs: BTreeMap::new(),
                    dest: Some(o.to_path_buf()),
                }]
            })
            .unwrap_or_default();
        let req = BuildRequest {
            frontend: Frontend::Dockerfile {
                opts,
                dockerfile_local: "dockerfile".into(),
            },
            locals,
            deferred_locals: Default::default(),
            exports,
            session: None,
            secrets: HashMap::new(),
        };
        let (progress, _rx) = Progress::channel();
        let run = self.engine.build(req, progress, CancellationToken::new());
        let res = tokio::time::timeout(Duration::from_secs(300), run)
            .await
            .map_err(|_| anyhow!("build of {} did not finish in 300 s", ctx.display()))?;
        Ok(res
            .map(|_| ())
            .map_err(|e| kiln_worker::solver::error_chain(&e)))
    }

    /// The invariants every case ends with: `outside/` unchanged, and the canary's content
    /// in no file of the worker's root or of `extra` (outputs).
    fn check_contained(&self, extra: &[&Path]) -> anyhow::Result<()> {
        let now = snapshot(&self.outside())?;
        if now != self.outside_before {
            bail!(
                "the canary directory changed: before {:?}, after {:?}",
                self.outside_before.keys().collect::<Vec<_>>(),
                now.keys().collect::<Vec<_>>()
            );
        }
        let mut places = vec![self.root()];
        places.extend(extra.iter().map(|p| p.to_path_buf()));
        for place in places {
            if let Some(hit) = find_bytes(&place, self.canary.as_bytes())? {
                bail!("host canary content leaked into {}", hit.display());
            }
        }
        Ok(())
    }
}

/// Every regular file and symlink under `dir` (relative path → content or link target).
fn snapshot(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let p = e?.path();
            let rel = p.strip_prefix(dir)?.display().to_string();
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    std::fs::read_link(&p)?
                        .into_os_string()
                        .into_encoded_bytes(),
                );
            } else if m.is_file() {
                out.insert(rel, std::fs::read(&p)?);
            } else {
                out.insert(rel, format!("mode {:o}", m.mode()).into_bytes());
            }
        }
    }
    Ok(out)
}

/// The first regular file under `dir` (symlinks not followed) whose content holds
/// `needle`.
fn find_bytes(dir: &Path, needle: &[u8]) -> anyhow::Result<Option<PathBuf>> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e?.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let data = std::fs::read(&p)?;
                if data.windows(needle.len()).any(|w| w == needle) {
                    return Ok(Some(p));
                }
            }
        }
    }
    Ok(None)
}

/// Every path under `dir` whose file name contains `part`.
fn find_named(dir: &Path, part: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(part))
            {
                hits.push(p.clone());
            }
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                stack.push(p);
            }
        }
    }
    hits
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

// === hand-made images ===

/// A raw tar entry with an unchecked name and link target (the tar crate's builder
/// refuses `..` and long absolute links).
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut h = tar::Header::new_old();
    if name.len() > 100 || link.len() > 100 {
        bail!("raw tar names are at most 100 bytes: {name:?} -> {link:?}");
    }
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_size(data.len() as u64);
    h.set_mtime(1_704_067_200);
    h.set_cksum();
    b.append(&h, data)?;
    Ok(())
}

/// A raw tar entry: name, kind, link target, content.
type RawEntry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

/// A layer tar of raw entries.
fn layer_tar(entries: &[RawEntry]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, k, l, d) in entries {
        raw_entry(&mut b, n, *k, l, d)?;
    }
    Ok(b.into_inner()?)
}

/// Pushes `<registry>/<name>`: the busybox base plus `layer` (a tar, gzipped here) on
/// top. Returns the reference and the digest of the new layer's blob.
fn push_image(reg: &Registry, name: &str, layer: &[u8]) -> anyhow::Result<(String, String)> {
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("layout");
    kiln_e2e::base::busybox_layout(&layout, kiln_e2e::base::host_arch())?;
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| -> anyhow::Result<String> {
        let d = sha256(bytes);
        std::fs::write(blob(&d), bytes)?;
        Ok(d)
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("index without a manifest"))?
        .to_string();
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&mdigest))?)?;
    let cdigest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("manifest without a config"))?
        .to_string();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&cdigest))?)?;

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(layer)?;
    let gz = gz.finish()?;
    let layer_digest = put(&gz)?;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .ok_or_else(|| anyhow!("config without diff_ids"))?
        .push(sha256(layer).into());
    let config = serde_json::to_vec(&config)?;
    let cdigest = put(&config)?;
    manifest["config"]["digest"] = cdigest.into();
    manifest["config"]["size"] = config.len().into();
    manifest["layers"]
        .as_array_mut()
        .ok_or_else(|| anyhow!("manifest without layers"))?
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": gz.len(),
        }));
    let manifest = serde_json::to_vec(&manifest)?;
    let mdigest = put(&manifest)?;
    index["manifests"][0]["digest"] = mdigest.into();
    index["manifests"][0]["size"] = manifest.len().into();
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    kiln_e2e::base::push_layout(&layout, &reg.addr(), name, &[])?;
    Ok((format!("{}/{name}", reg.addr()), layer_digest))
}

// === context symlinks and hard links ===

/// Symlinks in the context pointing outside it (absolute, relative, to `/`, to a
/// directory): COPY, ADD and a RUN over the copied context never read the host's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn context_symlinks_do_not_read_host_files() -> anyhow::Result<()> {
    let env = Env::new(None)?;
    let outside = env.outside();
    let depth = outside.components().count();
    let climb = format!("{}{}", "../".repeat(depth + 4), outside.display());
    let cases = [
        "FROM scratch\nCOPY abs /got\n",
        "FROM scratch\nCOPY rel /got\n",
        "FROM scratch\nCOPY absdir/ /got/\n",
        "FROM scratch\nCOPY absdir/canary /got\n",
        &format!("FROM scratch\nCOPY root{}/canary /got\n", outside.display()),
        "FROM scratch\nCOPY abs rel absdir root /got/\n",
        "FROM scratch\nADD abs /got\n",
        "FROM scratch\nCOPY --chown=1:1 . /ctx/\n",
        "ARG BASE\nFROM ${BASE}\nCOPY . /ctx/\n\
         RUN cat /ctx/abs /ctx/rel /ctx/absdir/canary > /got 2>&1; ls -la /ctx >> /got; true\n",
    ];
    for (i, dockerfile) in cases.iter().enumerate() {
        let ctx = env.context(&format!("ctx{i}"), dockerfile)?;
        symlink(outside.join("canary"), ctx.join("abs"))?;
        symlink(format!("{climb}/canary"), ctx.join("rel"))?;
        symlink(outside.join("dir"), ctx.join("absdir"))?;
        symlink("/", ctx.join("root"))?;
        let out = env.mkdir(&format!("out{i}"))?;
        match env.build(&ctx, Some(&out)).await? {
            Ok(()) => {}
            Err(e) => {
                // A refusal must say which path it is about.
                assert!(
                    ["abs", "rel", "absdir", "root", "not found"]
                        .iter()
                        .any(|w| e.contains(w)),
                    "case {i}: unclear error: {e}"
                );
            }
        }
        env.check_contained(&[&out])
            .with_context(|| format!("case {i}: {dockerfile}"))?;
    }
    Ok(())
}

/// A context file hard-linked to a file outside the context is the user's own content:
/// it is copied, but nothing written later in the build reaches the linked host file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn context_hard_links_never_write_back() -> anyhow::Result<()> {
    let env = Env::new(None)?;
    let host = env.mkdir("host")?;
    std::fs::write(host.join("linked"), "host file\n")?;
    let ctx = env.context(
        "ctx",
        "ARG BASE\nFROM ${BASE}\nCOPY . /ctx/\n\
         RUN echo pwned >> /ctx/hl && echo pwned >> /ctx/hl2 && cat /ctx/hl > /got\n",
    )?;
    std::fs::hard_link(host.join("linked"), ctx.join("hl"))?;
    std::fs::hard_link(host.join("linked"), ctx.join("hl2"))?;
    let out = env.mkdir("out")?;
    env.build(&ctx, Some(&out))
        .await?
        .map_err(|e| anyhow!("build failed: {e}"))?;
    // (Whether the write to `hl2` shows through `hl` depends on the snapshotter: overlayfs
    // copies up one name of a hard-linked pair.)
    let got = std::fs::read_to_string(out.join("got"))?;
    assert!(got.starts_with("host file\npwned\n"), "{got}");
    assert_eq!(std::fs::read_to_string(host.join("linked"))?, "host file\n");
    assert_eq!(std::fs::read_to_string(ctx.join("hl"))?, "host file\n");
    env.check_contained(&[&out])
}

// === layers of a pulled image ===

/// Layers that try to climb out (`..`), write through a planted symlink, hard-link host
/// files or whiteout their own parent: each build fails naming the layer and the entry;
/// absolute symlinks are kept as links and resolve inside the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_layers_fail_or_stay_inside() -> anyhow::Result<()> {
    use tar::EntryType::{Link, Regular, Symlink};
    let env = Env::new(None)?;
    let outside = env.outside();
    let o = outside.display().to_string();
    let marker = format!("slip-{}", unique());
    let canary = format!("{o}/canary");
    let slip = format!("../../../../../../../../../../{o}/{marker}");
    let planted = format!("planted/{marker}");
    let failing: Vec<(&str, Vec<RawEntry>, &str)> = vec![
        (
            "slip",
            vec![(slip.as_str(), Regular, "", b"x")],
            "escapes the layer",
        ),
        (
            "dotdot",
            vec![("a/../../x", Regular, "", b"x")],
            "escapes the layer",
        ),
        (
            "through-symlink",
            vec![
                ("planted", Symlink, o.as_str(), b""),
                (planted.as_str(), Regular, "", b"x"),
            ],
            "not a directory",
        ),
        (
            "hardlink-abs",
            vec![("h", Link, canary.as_str(), b"")],
            "hard link h to",
        ),
        (
            "hardlink-up",
            vec![("h", Link, "../../../../../../../../etc/passwd", b"")],
            "target escapes the layer",
        ),
        (
            "whiteout-parent",
            vec![(".wh...", Regular, "", b"")],
            "names no file",
        ),
        (
            "whiteout-self",
            vec![("etc/.wh..", Regular, "", b"")],
            "names no file",
        ),
    ];
    for (name, entries, expect) in failing {
        let (image, digest) =
            push_image(&env.reg, &format!("evil/{name}:1"), &layer_tar(&entries)?)?;
        let ctx = env.context(&format!("ctx-{name}"), &format!("FROM {image}\nRUN true\n"))?;
        let err = match env.build(&ctx, None).await? {
            Ok(()) => bail!("{name}: a build on the hostile layer succeeded"),
            Err(e) => e,
        };
        assert!(err.contains(expect), "{name}: {err}");
        assert!(
            err.contains(&digest),
            "{name}: the error does not name the layer: {err}"
        );
        env.check_contained(&[])
            .with_context(|| format!("layer case {name}"))?;
        assert!(find_named(env.dir.path(), &marker).is_empty(), "{name}");
    }

    // Absolute symlinks are links inside the image: following them in RUN or COPY reads
    // the image's own files, never the host's.
    let dir = format!("{o}/dir");
    let layer = layer_tar(&[
        ("hostfile", Symlink, canary.as_str(), b""),
        ("hostdir", Symlink, dir.as_str(), b""),
        ("hostroot", Symlink, "/", b""),
        ("up", Symlink, "../../../../../../..", b""),
    ])?;
    let (image, _) = push_image(&env.reg, "evil/abs-symlinks:1", &layer)?;
    let cases = [
        format!(
            "FROM {image}\nRUN cat /hostfile /hostdir/canary /up{o}/canary > /got 2>&1; \
             ls -la / /hostroot/ >> /got; true\n"
        ),
        format!("FROM {image} AS img\nFROM scratch\nCOPY --from=img /hostfile /got\n"),
        format!("FROM {image} AS img\nFROM scratch\nCOPY --from=img /hostdir/ /got/\n"),
        format!("FROM {image} AS img\nFROM scratch\nCOPY --from=img /up{o}/canary /got\n"),
        format!("FROM {image} AS img\nFROM scratch\nCOPY --from=img /hostroot{o}/ /got/\n"),
    ];
    for (i, dockerfile) in cases.iter().enumerate() {
        let ctx = env.context(&format!("ctx-abs{i}"), dockerfile)?;
        let out = env.mkdir(&format!("out-abs{i}"))?;
        if let Err(e) = env.build(&ctx, Some(&out)).await? {
            assert!(e.contains("not found"), "case {i}: unclear error: {e}");
        }
        env.check_contained(&[&out])
            .with_context(|| format!("symlink case {i}: {dockerfile}"))?;
    }
    Ok(())
}

/// A layer that expands far beyond `max-layer-size` fails with an error naming its
/// digest and the limit, and leaves no partial layer behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decompression_bomb_layer_is_bounded() -> anyhow::Result<()> {
    const LIMIT: u64 = 32 << 20;
    let env = Env::new(Some(LIMIT))?;
    // 512 MiB of zeros: about 2 MB of gzip.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(512 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "bomb", std::io::repeat(0).take(512 << 20))?;
    let (image, digest) = push_image(&env.reg, "evil/bomb:1", &b.into_inner()?)?;
    let ctx = env.context("ctx", &format!("FROM {image}\nRUN true\n"))?;
    let started = Instant::now();
    let err = match env.build(&ctx, None).await? {
        Ok(()) => bail!("a build on a 512 MiB layer passed a {LIMIT}-byte limit"),
        Err(e) => e,
    };
    eprintln!("bomb refused in {:?}: {err}", started.elapsed());
    assert!(err.contains(&digest), "{err}");
    assert!(err.contains(&format!("limit of {LIMIT} bytes")), "{err}");
    // Nothing of it stays in the store: no file as big as the limit.
    let mut stack = vec![env.root()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let m = std::fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                assert!(m.len() < LIMIT / 2, "{} left behind", e.path().display());
            }
        }
    }
    env.check_contained(&[])
}

// === Dockerfile text ===

/// A 100 MB Dockerfile line is handled in bounded memory: the `kiln` CLI (daemonless, its
/// own process) fails with a clear error naming the line, with a peak RSS far below what
/// copying the line at every step took (over 2 GB and minutes before the parser's limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_dockerfile_line_is_bounded() -> anyhow::Result<()> {
    let env = Env::new(None)?;
    let bins = kiln_e2e::fleet::ensure_binaries()?;
    let line = "a".repeat(100 << 20);
    let cases = [
        (
            "run",
            format!("ARG BASE\nFROM ${{BASE}}\nRUN echo {line}\n"),
        ),
        ("label", format!("FROM scratch\nLABEL big={line}\n")),
        (
            "comment",
            format!("# {line}\nFROM scratch\nCOPY Dockerfile /\n"),
        ),
    ];
    drop(line);
    for (name, text) in cases {
        let ctx = env.context(&format!("ctx-{name}"), &text)?;
        drop(text);
        let out = env.mkdir(&format!("out-{name}"))?;
        let root = env.mkdir(&format!("cli-root-{name}"))?;
        let started = Instant::now();
        let child = std::process::Command::new(bins.join("kiln"))
            .arg("build")
            .arg("--root")
            .arg(&root)
            .args(["--frontend", "dockerfile.v0"])
            .arg("--local")
            .arg(format!("context={}", ctx.display()))
            .arg("--local")
            .arg(format!("dockerfile={}", ctx.display()))
            .arg("--opt")
            .arg(format!("build-arg:BASE={}", env.base))
            .arg("--output")
            .arg(format!("type=local,dest={}", out.display()))
            .args(["--progress", "plain"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watch = tokio::spawn(watch_peak_rss(pid, peak.clone()));
        let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        watch.abort();
        let rss_kib = peak.load(std::sync::atomic::Ordering::SeqCst);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        eprintln!(
            "{name}: exit {:?} in {:?}, peak rss {rss_kib} KiB: {tail}",
            output.status.code(),
            started.elapsed()
        );
        assert!(
            output.status.code().is_some(),
            "{name}: kiln was killed ({:?}): {tail}",
            output.status
        );
        assert!(
            !output.status.success(),
            "{name}: a 100 MB line was accepted"
        );
        {
            assert!(
                stderr.contains("more than the limit of"),
                "{name}: unclear error: {tail}"
            );
            assert!(!stderr.contains("panicked"), "{name}: {tail}");
        }
        // The file itself is 100 MB; unbounded handling took over 2 GB and minutes.
        assert!(rss_kib < 1 << 20, "{name}: peak rss {rss_kib} KiB");
        env.check_contained(&[&out])?;
    }
    Ok(())
}

/// Keeps `peak` at the process's peak RSS (`VmHWM`, KiB) until it exits; read every
/// 20 ms, so the last reading is within 20 ms of the end.
async fn watch_peak_rss(pid: u32, peak: Arc<std::sync::atomic::AtomicU64>) {
    loop {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        if let Some(kib) = hwm {
            peak.fetch_max(kib, std::sync::atomic::Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Many heredocs on one instruction, heredoc bodies full of heredoc markers and deep
/// line continuations: the frontend answers in bounded time without overflowing its stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deeply_nested_heredocs_are_bounded() -> anyhow::Result<()> {
    let env = Env::new(None)?;
    let mut many = String::from("ARG BASE\nFROM ${BASE}\nRUN");
    for i in 0..2000 {
        many.push_str(&format!(" <<E{i}"));
    }
    many.push('\n');
    for i in 0..2000 {
        many.push_str(&format!("echo {i}\nE{i}\n"));
    }
    let mut nested = String::from("ARG BASE\nFROM ${BASE}\nRUN <<E0\n");
    for i in 1..20000 {
        nested.push_str(&format!("cat <<E{i}\n"));
    }
    nested.push_str("E0\n");
    let mut copies = String::from("FROM scratch\nCOPY");
    for i in 0..2000 {
        copies.push_str(&format!(" <<F{i}"));
    }
    copies.push_str(" /dst/\n");
    for i in 0..2000 {
        copies.push_str(&format!("{i}\nF{i}\n"));
    }
    let unterminated = format!("FROM scratch\nRUN <<A <<B\n{}", "<<C\n".repeat(50000));
    let continuations = format!("FROM scratch\nRUN echo \\\n{}x\n", " \\\n".repeat(200000));
    for (name, text) in [
        ("many", many),
        ("nested", nested),
        ("copies", copies),
        ("unterminated", unterminated),
        ("continuations", continuations),
    ] {
        let ctx = env.context(&format!("ctx-{name}"), &text)?;
        let out = env.mkdir(&format!("out-{name}"))?;
        let started = Instant::now();
        let res = env.build(&ctx, Some(&out)).await?;
        eprintln!(
            "{name}: {:?} in {:?}",
            res.as_ref()
                .map_err(|e| e.chars().take(300).collect::<String>()),
            started.elapsed()
        );
        if name == "copies" {
            res.map_err(|e| anyhow!("{name}: {e}"))?;
            assert_eq!(std::fs::read_to_string(out.join("dst/F1999"))?, "1999\n");
        }
        env.check_contained(&[&out])?;
    }
    Ok(())
}

// === mounts ===

/// Cache mount ids shaped like paths (`../x`, absolute, `/`) neither alias another
/// build's cache nor reach host directories; nothing is written outside the worker root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_mount_ids_stay_in_their_own_cache() -> anyhow::Result<()> {
    let env = Env::new(None)?;
    let secret = format!("victim-secret-{}", unique());
    let marker = format!("pwned-{}", unique());
    let ctx = env.context(
        "ctx-victim",
        &format!(
            "ARG BASE\nFROM ${{BASE}}\n\
             RUN --mount=type=cache,id=victim,target=/c echo {secret} > /c/s && cat /c/s > /got\n"
        ),
    )?;
    env.build(&ctx, None)
        .await?
        .map_err(|e| anyhow!("victim build: {e}"))?;
    let o = env.outside().display().to_string();
    let ids = [
        "../victim".to_string(),
        "/victim".to_string(),
        "./victim".to_string(),
        "victim/.".to_string(),
        "victim/../victim".to_string(),
        "../../../../../../../..".to_string(),
        format!("../../../../../../../..{o}"),
        o.clone(),
        "/".to_string(),
        "/etc".to_string(),
    ];
    for (i, id) in ids.iter().enumerate() {
        let ctx = env.context(
            &format!("ctx-id{i}"),
            &format!(
                "ARG BASE\nFROM ${{BASE}}\n\
                 RUN --mount=type=cache,id={id},target=/c \
                 (ls -la /c; cat /c/s /c/canary /c/dir/canary; true) > /got 2>&1; \
                 touch /c/{marker} /c/canary\n"
            ),
        )?;
        let out = env.mkdir(&format!("out-id{i}"))?;
        if let Err(e) = env.build(&ctx, Some(&out)).await? {
            bail!("id {id:?}: {e}");
        }
        let got = std::fs::read_to_string(out.join("got"))?;
        assert!(
            !got.contains(&secret),
            "id {id:?} reached the victim's cache: {got}"
        );
        env.check_contained(&[&out])
            .with_context(|| format!("id {id:?}"))?;
    }
    // The marker exists only in cache mounts below the worker root.
    for hit in find_named(env.dir.path(), &marker) {
        assert!(
            hit.starts_with(env.root()),
            "{} outside the root",
            hit.display()
        );
    }
    assert!(!Path::new("/").join(&marker).exists());
    assert!(!Path::new("/etc").join(&marker).exists());
    Ok(())
}

/// `RUN --mount=type=bind` with sources climbing out (`../..`, `/../..`) sees only the
/// context (or the image it names); a writable bind does not write into the context.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bind_mount_sources_stay_in_their_root() -> anyhow::Result<()> {
    let env = Env::new(None)?;
    let marker = format!("pwned-{}", unique());
    let o = env.outside().display().to_string();
    let sources = [
        "../..".to_string(),
        "/../../..".to_string(),
        format!("../../../../../../../..{o}"),
        "link".to_string(),
        "link/canary".to_string(),
    ];
    for (i, source) in sources.iter().enumerate() {
        let ctx = env.context(
            &format!("ctx-bind{i}"),
            &format!(
                "ARG BASE\nFROM ${{BASE}}\n\
                 RUN --mount=type=bind,source={source},target=/m \
                 --mount=type=bind,from={base},source=../../..,target=/b \
                 (ls -laR /m /b/etc; cat /m /m/canary /m/dir/canary; true) > /got 2>&1\n\
                 RUN --mount=type=bind,source={source},target=/w,rw touch /w/{marker} || true\n",
                base = env.base
            ),
        )?;
        std::fs::write(ctx.join("inctx"), "in the context\n")?;
        symlink(&o, ctx.join("link"))?;
        let out = env.mkdir(&format!("out-bind{i}"))?;
        match env.build(&ctx, Some(&out)).await? {
            Ok(()) => {
                let got = std::fs::read_to_string(out.join("got"))?;
                if !source.starts_with("link") {
                    assert!(got.contains("inctx"), "source {source:?}: {got}");
                }
            }
            Err(e) => {
                eprintln!("source {source:?}: {e}");
                assert!(
                    e.contains("mount /m: source") && e.contains("not found"),
                    "source {source:?}: unclear error: {e}"
                );
            }
        }
        assert!(
            !ctx.join(&marker).exists(),
            "source {source:?} wrote into the context"
        );
        env.check_contained(&[&out])
            .with_context(|| format!("source {source:?}"))?;
    }
    for hit in find_named(env.dir.path(), &marker) {
        assert!(
            hit.starts_with(env.root()),
            "{} outside the root",
            hit.display()
        );
    }
    Ok(())
}

// === fsutil packets through a real kiln-worker ===

mod evil_session {
    //! A session client whose FileSync sender lists whatever it is told to.

    use std::sync::Arc;

    use kiln_proto::fsutil::types::packet::PacketType;
    use kiln_proto::fsutil::types::{Packet, Stat};
    use kiln_proto::moby::filesync::v1::file_sync_server::{FileSync, FileSyncServer};
    use tokio_stream::wrappers::ReceiverStream;
    use tokio_stream::StreamExt;
    use tonic::codegen::BoxStream;
    use tonic::{Request, Response, Status, Streaming};

    /// Serves `dockerfile` honestly and `context` as the `listing` (with `data` as the
    /// content of every requested file).
    #[derive(Clone)]
    pub struct Evil {
        pub dockerfile: Arc<Vec<u8>>,
        pub listing: Arc<Vec<Stat>>,
        pub data: Arc<Vec<u8>>,
    }

    impl Evil {
        pub fn into_service(self) -> FileSyncServer<Evil> {
            FileSyncServer::new(self)
        }
    }

    fn packet(kind: PacketType) -> Packet {
        Packet {
            r#type: kind as i32,
            ..Packet::default()
        }
    }

    #[tonic::async_trait]
    impl FileSync for Evil {
        async fn diff_copy(
            &self,
            request: Request<Streaming<Packet>>,
        ) -> Result<Response<BoxStream<Packet>>, Status> {
            let dir = request
                .metadata()
                .get("dir-name")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (listing, data) = if dir == "dockerfile" {
                let stat = Stat {
                    path: "Dockerfile".into(),
                    mode: 0o644,
                    size: self.dockerfile.len() as i64,
                    ..Default::default()
                };
                (vec![stat], self.dockerfile.clone())
            } else {
                (self.listing.as_ref().clone(), self.data.clone())
            };
            let mut inbound = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(async move {
                for stat in listing {
                    let p = Packet {
                        stat: Some(stat),
                        ..packet(PacketType::PacketStat)
                    };
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Ok(packet(PacketType::PacketStat))).await;
                while let Some(Ok(p)) = inbound.next().await {
                    match PacketType::try_from(p.r#type) {
                        Ok(PacketType::PacketReq) => {
                            for chunk in [data.as_ref().clone(), Vec::new()] {
                                let d = Packet {
                                    id: p.id,
                                    data: chunk,
                                    ..packet(PacketType::PacketData)
                                };
                                let _ = tx.send(Ok(d)).await;
                            }
                        }
                        Ok(PacketType::PacketFin) => {
                            let _ = tx.send(Ok(packet(PacketType::PacketFin))).await;
                            return;
                        }
                        _ => return,
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn tar_stream(
            &self,
            _request: Request<Streaming<Packet>>,
        ) -> Result<Response<BoxStream<Packet>>, Status> {
            Err(Status::unimplemented("tar stream"))
        }
    }
}

/// A real `kiln-worker` on a unix socket; its state under `root`.
struct Daemon {
    proc: kiln_e2e::fleet::Proc,
    channel: tonic::transport::Channel,
}

async fn start_daemon(bins: &Path, dir: &Path, root: &Path) -> anyhow::Result<Daemon> {
    let sock = dir.join("kiln.sock");
    let mut cmd = std::process::Command::new(bins.join("kiln-worker"));
    cmd.arg("--addr")
        .arg(format!("unix://{}", sock.display()))
        .arg("--root")
        .arg(root);
    let mut proc = kiln_e2e::fleet::Proc::spawn("kiln-worker", cmd, &dir.join("worker.log"))?;
    let started = Instant::now();
    while !sock.exists() {
        proc.check_running()?;
        if started.elapsed() > Duration::from_secs(60) {
            bail!("kiln-worker did not listen in 60 s:\n{}", proc.output());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tonic::transport::Endpoint::try_from("http://kiln.invalid")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await?;
    Ok(Daemon { proc, channel })
}

/// Runs `COPY . /` over a session whose context listing is `listing`; the solve's
/// error message, or `Ok` when it built.
async fn solve_with_listing(
    daemon: &Daemon,
    session_id: &str,
    listing: Vec<kiln_proto::fsutil::types::Stat>,
) -> anyhow::Result<Result<(), String>> {
    use kiln_proto::moby::buildkit::v1 as api;
    use kiln_worker::session::transport::{health_service, pipe, serve as serve_session};
    use kiln_worker::session::SessionHeaders;

    let mut client = api::control_client::ControlClient::new(daemon.channel.clone());
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    SessionHeaders {
        id: session_id.into(),
        methods: vec![
            "/moby.filesync.v1.filesync/diffcopy".into(),
            "/grpc.health.v1.health/check".into(),
        ],
        ..Default::default()
    }
    .to_metadata(request.metadata_mut())?;
    let inbound = client.session(request).await?.into_inner();
    let evil = evil_session::Evil {
        dockerfile: Arc::new(b"FROM scratch\nCOPY . /\n".to_vec()),
        listing: Arc::new(listing),
        data: Arc::new(b"pwned\n".to_vec()),
    };
    let routes = tonic::service::Routes::new(evil.into_service()).add_service(health_service());
    let session = tokio::spawn(serve_session(pipe(inbound, out_tx), routes));
    let res = tokio::time::timeout(
        Duration::from_secs(120),
        client.solve(api::SolveRequest {
            r#ref: format!("build-{session_id}"),
            session: session_id.into(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| anyhow!("solve over session {session_id} hung"))?;
    session.abort();
    Ok(res.map(|_| ()).map_err(|s| s.message().to_string()))
}

/// Listings with `..`, absolute paths, children of symlinks and hard links to paths
/// outside the context: the worker refuses each with an error naming the path, writes
/// nothing outside its root, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsutil_packets_cannot_escape_the_worker_root() -> anyhow::Result<()> {
    use kiln_proto::fsutil::mode;
    use kiln_proto::fsutil::types::Stat;

    let bins = kiln_e2e::fleet::ensure_binaries()?;
    let dir = tempfile::Builder::new()
        .prefix("kiln-hostile-fsutil-")
        .tempdir()?;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    let canary = format!("kiln-hostile-canary-{}", unique());
    std::fs::write(outside.join("canary"), &canary)?;
    let before = snapshot(&outside)?;
    let root = dir.path().join("root");
    let daemon = start_daemon(&bins, dir.path(), &root).await?;

    let marker = format!("escape-{}", unique());
    let abs = format!("/tmp/kiln-hostile-{marker}");
    let o = outside.display().to_string();
    let file = |path: &str| Stat {
        path: path.into(),
        mode: 0o644,
        size: 6,
        ..Default::default()
    };
    let dirent = |path: &str| Stat {
        path: path.into(),
        mode: mode::DIR | 0o755,
        ..Default::default()
    };
    let link = |path: &str, target: &str| Stat {
        path: path.into(),
        mode: mode::SYMLINK | 0o777,
        linkname: target.into(),
        ..Default::default()
    };
    let hard = |path: &str, target: &str| Stat {
        linkname: target.into(),
        ..file(path)
    };
    let up = format!("../{marker}");
    let deep = format!("../../../../../../../../../..{o}/{marker}");
    let inner = format!("a/../../{marker}");
    let through = format!("l/{marker}");
    let cases: Vec<(&str, Vec<Stat>, &str)> = vec![
        ("dotdot", vec![file(&up)], up.as_str()),
        ("deep-dotdot", vec![file(&deep)], deep.as_str()),
        ("absolute", vec![file(&abs)], abs.as_str()),
        (
            "inner-dotdot",
            vec![dirent("a"), file(&inner)],
            inner.as_str(),
        ),
        (
            "through-symlink",
            vec![link("l", &o), file(&through)],
            through.as_str(),
        ),
        ("hardlink-abs", vec![hard("h", &format!("{o}/canary"))], "h"),
        (
            "hardlink-up",
            vec![file("f"), hard("h", "../../outside/canary")],
            "h",
        ),
        ("dir-dotdot", vec![dirent("..")], ".."),
        ("dot", vec![dirent(".")], "."),
    ];
    for (i, (name, listing, path)) in cases.into_iter().enumerate() {
        let res = solve_with_listing(&daemon, &format!("evil-{i}"), listing).await?;
        let err = match res {
            Ok(()) => bail!("{name}: a listing with {path:?} was accepted"),
            Err(e) => e,
        };
        assert!(
            err.contains(&format!("{path:?}")) || err.contains(path),
            "{name}: {err}"
        );
        assert_eq!(snapshot(&outside)?, before, "{name}: outside changed");
        assert!(!Path::new(&abs).exists(), "{name}: {abs} created");
        let hits = find_named(dir.path(), &marker);
        assert!(hits.is_empty(), "{name}: created {hits:?}");
        assert!(
            find_bytes(&root, canary.as_bytes())?.is_none(),
            "{name}: canary copied"
        );
    }
    // Still serving: an honest listing builds.
    let mut daemon = daemon;
    daemon.proc.check_running()?;
    solve_with_listing(&daemon, "honest", vec![dirent("d"), file("d/f")])
        .await?
        .map_err(|e| anyhow!("honest listing after the hostile ones: {e}"))?;
    Ok(())
}
