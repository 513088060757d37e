//! Dockerfile parity: each instruction and expansion rule against exact files, modes,
//! owners and image config.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{anyhow, Context};
use kiln_worker::control::{BuildRequest, ExportRequest, Frontend};
use kiln_worker::frontend::BuildOpts;
use kiln_worker::image::Platform;
use kiln_worker::progress::{Event, Progress};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::support::{build, env, project, to, Env};

/// The text of `p` under `root`, with the path in the error.
fn read(root: &Path, p: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(root.join(p)).with_context(|| format!("read {p}"))
}

/// `(uid, gid, permission bits)` of `p` under `root`, not following a final symlink.
fn meta(root: &Path, p: &str) -> anyhow::Result<(u32, u32, u32)> {
    let m = std::fs::symlink_metadata(root.join(p)).with_context(|| format!("stat {p}"))?;
    Ok((m.uid(), m.gid(), m.mode() & 0o7777))
}

/// Sorted names directly under `p`.
fn list(root: &Path, p: &str) -> anyhow::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root.join(p)).with_context(|| format!("list {p}"))? {
        v.push(e?.file_name().to_string_lossy().to_string());
    }
    v.sort();
    Ok(v)
}

/// An image read back from a `type=oci` tarball.
struct Oci {
    config: Value,
    /// Each layer, uncompressed, as (path, bytes) entries in order.
    layers: Vec<Vec<(String, Vec<u8>)>>,
}

impl Oci {
    fn open(path: &Path) -> anyhow::Result<Oci> {
        let mut files = HashMap::new();
        let mut ar = tar::Archive::new(std::fs::File::open(path)?);
        for e in ar.entries()? {
            let mut e = e?;
            let name = e.path()?.to_string_lossy().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            files.insert(name, data);
        }
        let blob = |d: &str| -> anyhow::Result<&Vec<u8>> {
            files
                .get(&format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
                .ok_or_else(|| anyhow!("missing blob {d}"))
        };
        let index: Value = serde_json::from_slice(
            files
                .get("index.json")
                .ok_or_else(|| anyhow!("no index.json"))?,
        )?;
        let md = index["manifests"][0]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("no manifest in {index}"))?;
        let manifest: Value = serde_json::from_slice(blob(md)?)?;
        let cd = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("no config in {manifest}"))?;
        let config: Value = serde_json::from_slice(blob(cd)?)?;
        let mut layers = Vec::new();
        for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let data = blob(l["digest"].as_str().unwrap_or_default())?;
            let mt = l["mediaType"].as_str().unwrap_or_default();
            let raw: Box<dyn Read + '_> = if mt.ends_with("gzip") {
                Box::new(flate2::read::GzDecoder::new(data.as_slice()))
            } else if mt.ends_with("zstd") {
                Box::new(zstd::stream::read::Decoder::new(data.as_slice())?)
            } else {
                Box::new(data.as_slice())
            };
            let mut entries = Vec::new();
            let mut ar = tar::Archive::new(raw);
            for e in ar.entries()? {
                let mut e = e?;
                let name = e.path()?.to_string_lossy().to_string();
                let mut d = Vec::new();
                e.read_to_end(&mut d)?;
                entries.push((name, d));
            }
            layers.push(entries);
        }
        Ok(Oci { config, layers })
    }

    /// `config.config.<key>`.
    fn cfg(&self, key: &str) -> &Value {
        &self.config["config"][key]
    }
}

/// Builds `dir` and reads back the `type=oci` export.
async fn build_oci(
    env: &Env,
    dir: &Path,
    args: &[(&str, &str)],
    target: Option<&str>,
) -> anyhow::Result<Oci> {
    let out = tempfile::tempdir()?;
    let tar = out.path().join("image.tar");
    build(env, dir, args, target, vec![to("oci", &tar)]).await?;
    Oci::open(&tar)
}

/// Builds `dir` and returns the `type=local` export.
async fn build_local(
    env: &Env,
    dir: &Path,
    args: &[(&str, &str)],
    target: Option<&str>,
) -> anyhow::Result<tempfile::TempDir> {
    let out = tempfile::tempdir()?;
    build(env, dir, args, target, vec![to("local", out.path())]).await?;
    Ok(out)
}

/// [`build`] with secrets (the support helper passes none).
async fn build_with_secrets(
    env: &Env,
    dir: &Path,
    secrets: &[(&str, &[u8])],
    exports: Vec<ExportRequest>,
) -> anyhow::Result<()> {
    let mut build_args = BTreeMap::new();
    build_args.insert("BASE".to_string(), env.base.clone());
    let opts = BuildOpts {
        filename: "Dockerfile".into(),
        build_args,
        build_platform: Platform::host(),
        context_name: "context".into(),
        ..Default::default()
    };
    let mut locals = HashMap::new();
    locals.insert("context".to_string(), dir.to_path_buf());
    locals.insert("dockerfile".to_string(), dir.to_path_buf());
    let req = BuildRequest {
        frontend: Frontend::Dockerfile {
            opts,
            dockerfile_local: "dockerfile".into(),
        },
        locals,
        exports,
        secrets: secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
    };
    let (progress, mut rx) = Progress::channel();
    let res = env
        .engine
        .build(req, progress, CancellationToken::new())
        .await;
    let mut logs = String::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::Log(l) = e {
            logs.push_str(&String::from_utf8_lossy(&l.data));
        }
    }
    res.map(|_| ())
        .map_err(|e| anyhow!(kiln_worker::solver::error_chain(&e)))
        .with_context(|| format!("logs:\n{logs}"))
}

/// A tar archive holding `t/one.txt` (mode 0600) and the directory `t/`.
fn archive() -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "t/", std::io::empty())?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(4);
    b.append_data(&mut h, "t/one.txt", &b"one\n"[..])?;
    Ok(b.into_inner()?)
}

const COPY_DF: &str = r#"ARG BASE
FROM ${BASE} AS src
RUN mkdir -p /out && echo fromstage > /out/s.txt
FROM ${BASE}
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group
COPY a.txt /single
COPY a.txt b.txt /multi/
COPY *.txt /glob/
COPY x?.log /question/
COPY x[ab].log /bracket/
COPY dir /dircontents
COPY dir/ /dircontents2/
COPY a.txt /nodir
COPY a.txt /withdir/
WORKDIR /wd
COPY a.txt rel.txt
COPY a.txt reldir/
COPY --chown=1000:1000 a.txt /chown/
COPY --chown=app:app a.txt /named/
COPY --chmod=0640 a.txt /chmod/
COPY exec.sh /exec.sh
ADD arch.tar /untar/
ADD arch.tar.gz /untargz/
COPY arch.tar /copytar/
COPY link /followed
COPY --from=src /out/s.txt /fromstage
COPY --from=0 /out/s.txt /fromindex
COPY <<EOF /heredoc.txt
hello heredoc
EOF
COPY . /ctx/
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_copy_and_add() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        COPY_DF,
        &[
            ("a.txt", "A\n"),
            ("b.txt", "B\n"),
            ("c.md", "C\n"),
            ("xa.log", "xa\n"),
            ("xb.log", "xb\n"),
            ("xc.log", "xc\n"),
            ("xab.log", "xab\n"),
            ("dir/top", "top\n"),
            ("dir/sub/f", "f\n"),
            ("exec.sh", "#!/bin/sh\n"),
            ("junk.tmp", "j\n"),
            ("deep/er/junk.tmp", "j\n"),
            ("important.tmp", "i\n"),
            (".dockerignore", "**/*.tmp\n!important.tmp\n"),
        ],
    )?;
    let p = dir.path();
    std::os::unix::fs::symlink("top", p.join("dir/ln"))?;
    std::os::unix::fs::symlink("a.txt", p.join("link"))?;
    std::os::unix::fs::lchown(p.join("a.txt"), Some(1234), Some(1234))?;
    std::fs::set_permissions(p.join("exec.sh"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(p.join("a.txt"), std::fs::Permissions::from_mode(0o644))?;
    let tar = archive()?;
    std::fs::write(p.join("arch.tar"), &tar)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar)?;
    std::fs::write(p.join("arch.tar.gz"), gz.finish()?)?;

    let out = build_local(&env, p, &[], None).await?;
    let o = out.path();

    assert_eq!(read(o, "single")?, "A\n");
    assert_eq!(list(o, "multi")?, ["a.txt", "b.txt"]);
    assert_eq!(read(o, "multi/b.txt")?, "B\n");
    assert_eq!(list(o, "glob")?, ["a.txt", "b.txt"]);
    assert_eq!(list(o, "question")?, ["xa.log", "xb.log", "xc.log"]);
    assert_eq!(list(o, "bracket")?, ["xa.log", "xb.log"]);
    // `COPY dir /dst` copies the contents of dir; symlinks inside stay symlinks.
    assert_eq!(list(o, "dircontents")?, ["ln", "sub", "top"]);
    assert_eq!(read(o, "dircontents/sub/f")?, "f\n");
    assert_eq!(
        std::fs::read_link(o.join("dircontents/ln"))?.to_string_lossy(),
        "top"
    );
    assert_eq!(list(o, "dircontents2")?, ["ln", "sub", "top"]);
    // Without a trailing slash the destination is the file; with one, a directory.
    assert!(o.join("nodir").is_file(), "/nodir is not a file");
    assert_eq!(read(o, "nodir")?, "A\n");
    assert_eq!(list(o, "withdir")?, ["a.txt"]);
    // Relative destinations are under WORKDIR.
    assert_eq!(read(o, "wd/rel.txt")?, "A\n");
    assert_eq!(list(o, "wd/reldir")?, ["a.txt"]);
    // Owners: 0:0 by default (the context file is 1234:1234), --chown by id and by name.
    assert_eq!(meta(o, "single")?, (0, 0, 0o644));
    assert_eq!(meta(o, "chown/a.txt")?, (1000, 1000, 0o644));
    assert_eq!(meta(o, "named/a.txt")?, (1000, 1000, 0o644));
    assert_eq!(meta(o, "chmod/a.txt")?, (0, 0, 0o640));
    assert_eq!(meta(o, "exec.sh")?, (0, 0, 0o755));
    // ADD extracts local archives; COPY does not.
    assert_eq!(read(o, "untar/t/one.txt")?, "one\n");
    assert_eq!(meta(o, "untar/t/one.txt")?.2, 0o600);
    assert_eq!(read(o, "untargz/t/one.txt")?, "one\n");
    assert_eq!(list(o, "copytar")?, ["arch.tar"]);
    assert_eq!(std::fs::read(o.join("copytar/arch.tar"))?, tar);
    // A symlink named as the source is followed.
    let followed = std::fs::symlink_metadata(o.join("followed"))?;
    assert!(followed.is_file(), "/followed: {followed:?}");
    assert_eq!(read(o, "followed")?, "A\n");
    assert_eq!(read(o, "fromstage")?, "fromstage\n");
    assert_eq!(read(o, "fromindex")?, "fromstage\n");
    assert_eq!(read(o, "heredoc.txt")?, "hello heredoc\n");
    // .dockerignore: `**/*.tmp` drops every .tmp at any depth, `!important.tmp` keeps one.
    let ctx = list(o, "ctx")?;
    assert!(ctx.contains(&"important.tmp".to_string()), "{ctx:?}");
    assert!(!ctx.contains(&"junk.tmp".to_string()), "{ctx:?}");
    assert!(!o.join("ctx/deep/er/junk.tmp").exists(), "deep junk.tmp copied");
    assert!(ctx.contains(&"a.txt".to_string()), "{ctx:?}");

    // A missing source fails and names it.
    let dir = project("ARG BASE\nFROM ${BASE}\nCOPY nope*.txt absent.txt /x/\n", &[])?;
    let err = build(&env, dir.path(), &[], None, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("COPY of a missing file should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains("absent.txt"), "{msg}");
    Ok(())
}
