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
        deferred_locals: Default::default(),
        exports,
        session: None,
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
ADD a.txt /added.txt
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
    assert_eq!(meta(o, "added.txt")?, (0, 0, 0o644));
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
    assert!(
        !o.join("ctx/deep/er/junk.tmp").exists(),
        "deep junk.tmp copied"
    );
    assert!(ctx.contains(&"a.txt".to_string()), "{ctx:?}");

    // A missing source fails and names it.
    let dir = project(
        "ARG BASE\nFROM ${BASE}\nCOPY nope*.txt absent.txt /x/\n",
        &[],
    )?;
    let err = build(&env, dir.path(), &[], None, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("COPY of a missing file should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains("absent.txt"), "{msg}");
    Ok(())
}

impl Oci {
    /// The content of `path` in the top-most layer holding it.
    fn file(&self, path: &str) -> anyhow::Result<String> {
        for layer in self.layers.iter().rev() {
            if let Some((_, d)) = layer.iter().rev().find(|(n, _)| n == path) {
                return Ok(String::from_utf8_lossy(d).to_string());
            }
        }
        Err(anyhow!("{path} is in no layer"))
    }

    /// `config.config.Env` as a map.
    fn env(&self) -> BTreeMap<String, String> {
        self.cfg("Env")
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

const RUN_DF: &str = r#"ARG BASE
FROM ${BASE}
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group
ENV GREETING="hello world"
RUN echo "$GREETING" > /env.txt
RUN ["/bin/sh", "-c", "echo exec > /exec.txt"]
RUN ["/bin/sh", "-c", "printf '%s' \"$1\" > /noexpand.txt", "sh", "${GREETING}"]
SHELL ["/bin/sh", "-c", "echo \"$0\" > /shell.txt", "via-shell"]
RUN ignored by the shell above
SHELL ["/bin/sh", "-c"]
RUN echo back > /back.txt
RUN <<EOF
echo line1 > /heredoc.txt
echo line2 >> /heredoc.txt
EOF
USER app
RUN id -u > /tmp/uid.txt && id -g > /tmp/gid.txt
USER 0
WORKDIR /work/dir
RUN pwd > /pwd.txt
RUN --network=none cat /proc/net/dev > /netdev.txt
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_run() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(RUN_DF, &[])?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    let o = out.path();
    assert_eq!(read(o, "env.txt")?, "hello world\n");
    assert_eq!(read(o, "exec.txt")?, "exec\n");
    // Exec form is not expanded by the frontend.
    assert_eq!(read(o, "noexpand.txt")?, "${GREETING}");
    assert_eq!(read(o, "shell.txt")?, "via-shell\n");
    assert_eq!(read(o, "back.txt")?, "back\n");
    assert_eq!(read(o, "heredoc.txt")?, "line1\nline2\n");
    assert_eq!(read(o, "tmp/uid.txt")?, "1000\n");
    assert_eq!(read(o, "tmp/gid.txt")?, "1000\n");
    assert!(o.join("work/dir").is_dir(), "WORKDIR not created");
    assert_eq!(read(o, "pwd.txt")?, "/work/dir\n");
    let netdev = read(o, "netdev.txt")?;
    let ifaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{netdev}");
    Ok(())
}

const MOUNTS_DF: &str = r#"ARG BASE
FROM ${BASE} AS other
RUN mkdir /o && echo bound > /o/b.txt
FROM ${BASE}
RUN --mount=type=cache,target=/cache echo RUNTEXT >> /cache/log && cat /cache/log > /cache.txt
RUN --mount=type=tmpfs,target=/scratch grep ' /scratch ' /proc/mounts | cut -d' ' -f3 > /tmpfs.txt && touch /scratch/x
RUN --mount=type=bind,from=other,source=/o,target=/mnt/o cat /mnt/o/b.txt > /bind.txt && (touch /mnt/o/new 2>/dev/null && echo rw || echo ro) > /bindro.txt
RUN --mount=type=secret,id=tok test "$(tr a-z A-Z < /run/secrets/tok)" = S3CR3T-VALUE && echo ok > /secret.txt
RUN --mount=type=secret,id=tok,target=/etc/tok test "$(tr a-z A-Z < /etc/tok)" = S3CR3T-VALUE && echo ok > /secret-target.txt
RUN --mount=type=secret,id=tok,env=TOK test "$(echo "$TOK" | tr a-z A-Z)" = S3CR3T-VALUE && test ! -e /run/secrets/tok && echo ok > /secret-env.txt
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_run_mounts() -> anyhow::Result<()> {
    let env = env()?;
    let secret: &[u8] = b"s3cr3t-value";
    let mut outs = Vec::new();
    for text in ["v1", "v2"] {
        let dir = project(&MOUNTS_DF.replace("RUNTEXT", text), &[])?;
        let out = tempfile::tempdir()?;
        let oci = out.path().join("image.tar");
        build_with_secrets(
            &env,
            dir.path(),
            &[("tok", secret)],
            vec![to("local", &out.path().join("fs")), to("oci", &oci)],
        )
        .await?;
        outs.push(out);
    }
    // The cache mount kept the first build's line.
    assert_eq!(read(&outs[0].path().join("fs"), "cache.txt")?, "v1\n");
    let o = outs[1].path().join("fs");
    assert_eq!(read(&o, "cache.txt")?, "v1\nv2\n");
    assert!(!o.join("cache/log").exists(), "cache content leaked");
    assert_eq!(read(&o, "tmpfs.txt")?, "tmpfs\n");
    assert!(!o.join("scratch/x").exists(), "tmpfs content leaked");
    assert_eq!(read(&o, "bind.txt")?, "bound\n");
    assert_eq!(read(&o, "bindro.txt")?, "ro\n");
    assert!(!o.join("o").exists(), "the bound stage leaked");
    assert_eq!(read(&o, "secret.txt")?, "ok\n");
    assert_eq!(read(&o, "secret-target.txt")?, "ok\n");
    assert_eq!(read(&o, "secret-env.txt")?, "ok\n");
    assert!(!o.join("run/secrets/tok").exists(), "secret file leaked");
    // Mount points the mounts had to create are removed again (BuildKit's mount stubs).
    for stub in ["cache", "scratch", "mnt/o", "etc/tok"] {
        assert!(
            !o.join(stub).exists(),
            "mount stub /{stub} left in the image"
        );
    }
    assert!(!o.join("run").exists(), "mount stub /run left in the image");
    assert!(!o.join("mnt").exists(), "mount stub /mnt left in the image");
    let img = Oci::open(&outs[1].path().join("image.tar"))?;
    let needle = "s3cr3t-value";
    assert!(
        !img.config.to_string().contains(needle),
        "secret in config: {}",
        img.config
    );
    for (i, layer) in img.layers.iter().enumerate() {
        for (name, data) in layer {
            assert!(
                !String::from_utf8_lossy(data).contains(needle),
                "secret in layer {i} at {name}"
            );
        }
    }
    Ok(())
}

const EXPAND_DF: &str = r#"ARG BASE
ARG TAGGED=${BASE}
ARG GLOBAL=g
FROM ${TAGGED} AS first
ARG V=val
ARG EMPTY=
ARG OVER=default
ARG GLOBAL
ARG TARGETARCH
ARG BUILDPLATFORM
ARG TARGETPLATFORM
ARG STAGEONLY=s1
ENV A=${V} B=${V:-w} C=${UNSET:-w} D=${V:+w} F=${UNSET:+w} G=${EMPTY-w} H=${UNSET-w} I=${EMPTY+w} J=${UNSET+w} K=${EMPTY:-w}
ENV ESC=\$V SQ='$V' DQ="$V" MIX=pre${V}post BRACE=$V.x
ENV OVERV=${OVER} GLOBALV=${GLOBAL} TA=${TARGETARCH} BP=${BUILDPLATFORM} TP=${TARGETPLATFORM}
ARG F=/home/tux/book.tar.bz2
ENV PFX=${F##*/} SPFX=${F#*/} SFX=${F%.*} LSFX=${F%%.*} REP=${F/tux/wilber} REPALL=${F//o/0}
ENV E1=one
ENV E2=${E1}-two
ENV E1=changed E3=${E1}
RUN echo "$V $OVER" > /argrun.txt
FROM ${BASE}
ENV NOGLOBAL=x${GLOBAL}x NOSTAGE=x${STAGEONLY}x NOTA=x${TARGETARCH}x
COPY --from=first /argrun.txt /argrun.txt
"#;

const ESCAPE_DF: &str = "# escape=`
ARG BASE
FROM ${BASE}
ENV P=C:\\path\\x `
    Q=q
ENV R=`$notvar
RUN echo ok `
    > /cont.txt
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_expansion() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(EXPAND_DF, &[])?;
    let img = build_oci(&env, dir.path(), &[("OVER", "cli")], Some("first")).await?;
    let e = img.env();
    let host = Platform::host();
    let want: &[(&str, &str)] = &[
        ("A", "val"),
        ("B", "val"),
        ("C", "w"),
        ("D", "w"),
        ("F", ""),
        ("G", ""),
        ("H", "w"),
        ("I", "w"),
        ("J", ""),
        ("K", "w"),
        ("ESC", "$V"),
        ("SQ", "$V"),
        ("DQ", "val"),
        ("MIX", "prevalpost"),
        ("BRACE", "val.x"),
        ("OVERV", "cli"),
        ("GLOBALV", "g"),
        ("TA", host.architecture.as_str()),
        ("PFX", "book.tar.bz2"),
        ("SPFX", "home/tux/book.tar.bz2"),
        ("SFX", "/home/tux/book.tar"),
        ("LSFX", "/home/tux/book"),
        ("REP", "/home/wilber/book.tar.bz2"),
        ("REPALL", "/h0me/tux/b00k.tar.bz2"),
        ("E1", "changed"),
        ("E2", "one-two"),
        ("E3", "one"),
    ];
    for (k, v) in want {
        assert_eq!(e.get(*k).map(String::as_str), Some(*v), "{k} in {e:?}");
    }
    let plat = format!("{}/{}", host.os, host.architecture);
    assert_eq!(e.get("BP"), Some(&plat), "BP in {e:?}");
    assert_eq!(e.get("TP"), Some(&plat), "TP in {e:?}");
    assert_eq!(img.file("argrun.txt")?, "val cli\n");

    // The last stage declares nothing: globals, other stages' ARGs and automatic ARGs
    // are not in scope.
    let img = build_oci(&env, dir.path(), &[("OVER", "cli")], None).await?;
    let e = img.env();
    for k in ["NOGLOBAL", "NOSTAGE", "NOTA"] {
        assert_eq!(e.get(k).map(String::as_str), Some("xx"), "{k} in {e:?}");
    }
    assert!(!e.contains_key("A"), "stage env leaked: {e:?}");
    assert_eq!(img.file("argrun.txt")?, "val cli\n");

    let dir = project(ESCAPE_DF, &[])?;
    let img = build_oci(&env, dir.path(), &[], None).await?;
    let e = img.env();
    assert_eq!(e.get("P").map(String::as_str), Some("C:\\path\\x"), "{e:?}");
    assert_eq!(e.get("Q").map(String::as_str), Some("q"), "{e:?}");
    assert_eq!(e.get("R").map(String::as_str), Some("$notvar"), "{e:?}");
    assert_eq!(img.file("cont.txt")?, "ok\n");
    Ok(())
}

const CONFIG_DF: &str = r#"ARG BASE
FROM ${BASE} AS base
ENV KEEP=1
FROM ${BASE} AS other
CMD ["other"]
FROM ${BASE} AS entryonly
ENTRYPOINT ["/bin/echo"]
FROM ${BASE} AS shellform
ENTRYPOINT echo "entry $HOME"
CMD echo cmd
FROM ${BASE} AS final
ENV MY="a b" OTHER=x
LABEL simple=v "with space"="has spaces" quoted="say \"hi\""
LABEL multi=1 \
      second=2
EXPOSE 80 53/udp
VOLUME /data
VOLUME ["/v1", "/v2"]
RUN echo layer > /layer.txt
COPY f.txt /f.txt
USER 1000:1000
WORKDIR /app
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=4 CMD wget -q http://x/ || exit 1
ONBUILD RUN echo onbuild
SHELL ["/bin/ash", "-eo", "pipefail", "-c"]
ENTRYPOINT ["/bin/echo"]
CMD ["hi"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_config() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(CONFIG_DF, &[("f.txt", "f\n")])?;
    let img = build_oci(&env, dir.path(), &[], None).await?;
    let c = |k: &str| img.cfg(k).clone();
    let host = Platform::host();
    assert_eq!(img.config["os"], host.os.as_str());
    assert_eq!(img.config["architecture"], host.architecture.as_str());
    assert_eq!(
        c("Env"),
        serde_json::json!([kiln_e2e::base::BASE_PATH, "MY=a b", "OTHER=x"])
    );
    assert_eq!(
        c("Labels"),
        serde_json::json!({"simple": "v", "with space": "has spaces", "quoted": "say \"hi\"",
            "multi": "1", "second": "2"})
    );
    assert_eq!(
        c("ExposedPorts"),
        serde_json::json!({"80/tcp": {}, "53/udp": {}})
    );
    assert_eq!(
        c("Volumes"),
        serde_json::json!({"/data": {}, "/v1": {}, "/v2": {}})
    );
    assert_eq!(c("User"), "1000:1000");
    assert_eq!(c("WorkingDir"), "/app");
    assert_eq!(c("StopSignal"), "SIGTERM");
    assert_eq!(c("Entrypoint"), serde_json::json!(["/bin/echo"]));
    assert_eq!(c("Cmd"), serde_json::json!(["hi"]));
    assert_eq!(
        c("Healthcheck"),
        serde_json::json!({
            "Test": ["CMD-SHELL", "wget -q http://x/ || exit 1"],
            "Interval": 5_000_000_000u64,
            "Timeout": 3_000_000_000u64,
            "StartPeriod": 10_000_000_000u64,
            "Retries": 4,
        })
    );
    assert_eq!(c("OnBuild"), serde_json::json!(["RUN echo onbuild"]));
    assert_eq!(
        c("Shell"),
        serde_json::json!(["/bin/ash", "-eo", "pipefail", "-c"])
    );
    // One history entry per instruction that made a layer, plus the base's.
    let history = img.config["history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let non_empty = history
        .iter()
        .filter(|h| h["empty_layer"] != Value::Bool(true))
        .count();
    assert_eq!(non_empty, img.layers.len(), "{history:?}");
    assert_eq!(
        img.config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(img.layers.len())
    );
    assert_eq!(img.file("layer.txt")?, "layer\n");
    assert_eq!(img.file("f.txt")?, "f\n");

    // Shell forms are wrapped in /bin/sh -c.
    let img = build_oci(&env, dir.path(), &[], Some("shellform")).await?;
    assert_eq!(
        img.cfg("Entrypoint"),
        &serde_json::json!(["/bin/sh", "-c", "echo \"entry $HOME\""])
    );
    assert_eq!(
        img.cfg("Cmd"),
        &serde_json::json!(["/bin/sh", "-c", "echo cmd"])
    );
    // ENTRYPOINT drops the base image's CMD.
    let img = build_oci(&env, dir.path(), &[], Some("entryonly")).await?;
    assert_eq!(img.cfg("Entrypoint"), &serde_json::json!(["/bin/echo"]));
    assert_eq!(img.cfg("Cmd"), &Value::Null, "{}", img.config);
    // --target picks the stage.
    let img = build_oci(&env, dir.path(), &[], Some("other")).await?;
    assert_eq!(img.cfg("Cmd"), &serde_json::json!(["other"]));
    // The base image's Env and Cmd carry over when not overridden.
    let img = build_oci(&env, dir.path(), &[], Some("base")).await?;
    assert_eq!(
        img.cfg("Env"),
        &serde_json::json!([kiln_e2e::base::BASE_PATH, "KEEP=1"])
    );
    assert_eq!(img.cfg("Cmd"), &serde_json::json!(["sh"]));
    Ok(())
}

const EDGE_DF: &str = r#"ARG BASE
FROM ${BASE}
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group \
 && echo 'svc:x:2000:2001::/:/bin/sh' >> /etc/passwd && echo 'svcgrp:x:2001:' >> /etc/group
ARG F=a.txt
COPY ${F} /fromarg/
COPY --chown=svc a.txt /svc-user/
COPY --chown=3000 a.txt /uid-only/
COPY --chown=svc:0 a.txt /svc-root/
COPY --chown=app:svcgrp a.txt /app-svcgrp/
COPY --chmod=0750 dir /chmoddir/
COPY --chown=1000:1000 dir /chowndir/
COPY d* /dirglob/
COPY a.txt /etc
COPY a.txt /deep/er/
WORKDIR rel
WORKDIR sub
RUN pwd > /pwd.txt
USER app
WORKDIR /owned
USER root
ENV LEGACY value with spaces
COPY <<EOF <<"QUOTED" /docs/
expanded $F
EOF
literal $F
QUOTED
RUN <<-EOT
	echo tabs > /tabs.txt
	EOT
RUN <<EOT
#!/bin/sh
echo "shebang $0" > /shebang.txt
EOT
EXPOSE 8000-8001
HEALTHCHECK CMD ["/bin/true"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_edges() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        EDGE_DF,
        &[
            ("a.txt", "A\n"),
            ("dir/top", "top\n"),
            ("dir/sub/f", "f\n"),
            ("dother/o", "o\n"),
        ],
    )?;
    let p = dir.path();
    for f in ["a.txt", "dir/top", "dir/sub/f", "dother/o"] {
        std::fs::set_permissions(p.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    for d in ["dir", "dir/sub", "dother"] {
        std::fs::set_permissions(p.join(d), std::fs::Permissions::from_mode(0o755))?;
    }
    let mtime = std::fs::metadata(p.join("a.txt"))?.mtime();
    let out = tempfile::tempdir()?;
    let oci = out.path().join("image.tar");
    build(
        &env,
        p,
        &[],
        None,
        vec![to("local", &out.path().join("fs")), to("oci", &oci)],
    )
    .await?;
    let o = &out.path().join("fs");
    assert_eq!(read(o, "fromarg/a.txt")?, "A\n");
    // --chown by name alone takes the user's primary group; by id alone, gid = uid.
    assert_eq!(meta(o, "svc-user/a.txt")?, (2000, 2001, 0o644));
    assert_eq!(meta(o, "uid-only/a.txt")?, (3000, 3000, 0o644));
    assert_eq!(meta(o, "svc-root/a.txt")?, (2000, 0, 0o644));
    assert_eq!(meta(o, "app-svcgrp/a.txt")?, (1000, 2001, 0o644));
    // The destination directory COPY creates gets the --chown owner too.
    assert_eq!(meta(o, "svc-user")?, (2000, 2001, 0o755));
    // --chmod applies to every file and directory copied.
    assert_eq!(meta(o, "chmoddir/top")?.2, 0o750);
    assert_eq!(meta(o, "chmoddir/sub")?.2, 0o750);
    assert_eq!(meta(o, "chmoddir/sub/f")?.2, 0o750);
    assert_eq!(meta(o, "chowndir/sub/f")?, (1000, 1000, 0o644));
    assert_eq!(meta(o, "chowndir/sub")?, (1000, 1000, 0o755));
    // A wildcard matching directories copies their contents, merged.
    assert_eq!(list(o, "dirglob")?, ["o", "sub", "top"]);
    // An existing directory as destination takes the file inside.
    assert_eq!(read(o, "etc/a.txt")?, "A\n");
    assert_eq!(read(o, "deep/er/a.txt")?, "A\n");
    // COPY keeps the source's mtime.
    assert_eq!(std::fs::metadata(o.join("deep/er/a.txt"))?.mtime(), mtime);
    // Relative WORKDIRs nest.
    assert_eq!(read(o, "pwd.txt")?, "/rel/sub\n");
    // WORKDIR after USER creates the directory owned by that user.
    assert_eq!(meta(o, "owned")?.0, 1000);
    assert_eq!(read(o, "docs/EOF")?, "expanded a.txt\n");
    assert_eq!(read(o, "docs/QUOTED")?, "literal $F\n");
    assert_eq!(read(o, "tabs.txt")?, "tabs\n");
    assert!(
        read(o, "shebang.txt")?.starts_with("shebang "),
        "shebang.txt"
    );

    let img = Oci::open(&oci)?;
    let e = img.env();
    assert_eq!(
        e.get("LEGACY").map(String::as_str),
        Some("value with spaces")
    );
    assert_eq!(
        img.cfg("ExposedPorts"),
        &serde_json::json!({"8000/tcp": {}, "8001/tcp": {}})
    );
    assert_eq!(
        img.cfg("Healthcheck"),
        &serde_json::json!({"Test": ["CMD", "/bin/true"]})
    );
    Ok(())
}

const STAGES_DF: &str = r#"ARG BASE
ARG GLOBAL=g
FROM --platform=$BUILDPLATFORM ${BASE} AS Builder
ARG GLOBAL=override
ARG V=val
ENV FROMBUILDER=${GLOBAL} N=${UNSET:-${V}x} SP=a\ b DQ="\$V" LBL=$V
LABEL l=$V
WORKDIR /bw
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd
USER app
COPY a.txt /as-user.txt
FROM builder AS child
RUN pwd > /tmp/child-pwd.txt
RUN --mount=type=bind,target=/ctx cat /ctx/a.txt > /tmp/ctx.txt
USER root
RUN --mount=type=cache,id=shared,target=/c1 echo one > /c1/v
RUN --mount=type=cache,id=shared,target=/c2 cat /c2/v > /tmp/shared.txt
RUN --mount=type=cache,id=owned,target=/c3,uid=1000,gid=1000,mode=0700 stat -c '%u:%g %a' /c3 > /tmp/cacheowner.txt
RUN --mount=type=secret,id=nope test ! -e /run/secrets/nope && echo absent > /tmp/nosecret.txt
USER app
STOPSIGNAL 9
HEALTHCHECK NONE
FROM scratch AS bare
COPY a.txt /only.txt
"#;

const ONBUILD_DF: &str = r#"ARG BASE
FROM ${BASE}
LABEL base.label=kept over=base
ONBUILD RUN echo triggered > /trig.txt
ONBUILD ENV FROM_TRIGGER=1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_stages_and_onbuild() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(STAGES_DF, &[("a.txt", "A\n")])?;
    let out = build_local(&env, dir.path(), &[], Some("child")).await?;
    let o = out.path();
    // COPY without --chown is root-owned even after USER.
    assert_eq!(meta(o, "as-user.txt")?.0, 0);
    assert_eq!(meta(o, "as-user.txt")?.1, 0);
    // A stage built FROM another (by name, case-insensitively) keeps its WORKDIR and USER.
    assert_eq!(read(o, "tmp/child-pwd.txt")?, "/bw\n");
    assert_eq!(read(o, "tmp/ctx.txt")?, "A\n");
    assert_eq!(read(o, "tmp/shared.txt")?, "one\n");
    let cache_owner = read(o, "tmp/cacheowner.txt")?;
    assert_eq!(cache_owner, "1000:1000 700\n");
    assert_eq!(read(o, "tmp/nosecret.txt")?, "absent\n");
    let img = build_oci(&env, dir.path(), &[], Some("child")).await?;
    let e = img.env();
    let want: &[(&str, &str)] = &[
        ("FROMBUILDER", "override"),
        ("N", "valx"),
        ("SP", "a b"),
        ("DQ", "$V"),
        ("LBL", "val"),
    ];
    for (k, v) in want {
        assert_eq!(e.get(*k).map(String::as_str), Some(*v), "{k} in {e:?}");
    }
    assert_eq!(img.cfg("Labels"), &serde_json::json!({"l": "val"}));
    assert_eq!(img.cfg("User"), "app");
    assert_eq!(img.cfg("WorkingDir"), "/bw");
    assert_eq!(img.cfg("StopSignal"), "9");
    assert_eq!(
        img.cfg("Healthcheck"),
        &serde_json::json!({"Test": ["NONE"]})
    );
    // FROM scratch holds only what was copied.
    let out = build_local(&env, dir.path(), &[], Some("bare")).await?;
    assert_eq!(list(out.path(), "")?, ["only.txt"]);

    // ONBUILD triggers run in the child build; labels are inherited.
    let name = format!("{}/kiln/onbuild:1", env.reg.addr());
    let dir = project(ONBUILD_DF, &[])?;
    build(
        &env,
        dir.path(),
        &[],
        None,
        vec![super::support::image(&name, true)],
    )
    .await?;
    let child = format!("ARG BASE\nFROM {name}\nLABEL over=child\n");
    let dir = project(&child, &[])?;
    let img = build_oci(&env, dir.path(), &[], None).await?;
    assert_eq!(img.file("trig.txt")?, "triggered\n");
    assert_eq!(img.env().get("FROM_TRIGGER").map(String::as_str), Some("1"));
    assert_eq!(
        img.cfg("Labels"),
        &serde_json::json!({"base.label": "kept", "over": "child"})
    );
    // Triggers are consumed, not passed on.
    assert!(
        matches!(img.cfg("OnBuild"), Value::Null) || img.cfg("OnBuild") == &serde_json::json!([]),
        "OnBuild: {}",
        img.cfg("OnBuild")
    );
    Ok(())
}

const MORE_DF: &str = r#"ARG BASE
FROM ${BASE}
ARG BASE
ARG UID=4000
ARG PORT=9000
ARG NOTPERSISTED=x
ARG U=1000
ENV EQ=a=b UN=x${UNDECL}x
LABEL empty=""
COPY --chown=${UID}:${UID} a.txt /argchown.txt
COPY --from=${BASE} /etc/group /imggroup
RUN mkdir /real && ln -s /real /lnk
COPY a.txt /lnk/
COPY dir /etc/
COPY a.txt /ow.txt
COPY b.txt /ow.txt
ADD data.bin /sniffed/
ADD fake.tar.gz /fake/
ADD arch.tar.zst /unzst/
ADD arch.tar.bz2 /unbz2/
ADD arch.tar.xz /unxz/
COPY --chmod=0755 <<EOF /script.sh
#!/bin/sh
echo script
EOF
RUN cat <<EOF > /catheredoc.txt
hello
EOF
RUN --mount=type=bind,source=dir,target=/b,rw echo x > /b/new && cat /b/top > /bindsub.txt
WORKDIR /a/../b
RUN pwd > /pwd.txt
EXPOSE ${PORT}/tcp
USER ${U}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_more_copy_and_expansion() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        MORE_DF,
        &[
            ("a.txt", "A\n"),
            ("b.txt", "B\n"),
            ("dir/top", "top\n"),
            ("dir/sub/f", "f\n"),
            ("fake.tar.gz", "not an archive\n"),
        ],
    )?;
    let p = dir.path();
    let tar = archive()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar)?;
    std::fs::write(p.join("data.bin"), gz.finish()?)?;
    std::fs::write(p.join("arch.tar.zst"), zstd::encode_all(tar.as_slice(), 3)?)?;
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    std::io::Write::write_all(&mut bz, &tar)?;
    std::fs::write(p.join("arch.tar.bz2"), bz.finish()?)?;
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut std::io::Cursor::new(&tar), &mut xz)?;
    std::fs::write(p.join("arch.tar.xz"), xz)?;
    let out = tempfile::tempdir()?;
    let oci = out.path().join("image.tar");
    build(
        &env,
        p,
        &[("UNDECL", "1")],
        None,
        vec![to("local", &out.path().join("fs")), to("oci", &oci)],
    )
    .await?;
    let o = &out.path().join("fs");
    assert_eq!(meta(o, "argchown.txt")?.0, 4000);
    assert_eq!(meta(o, "argchown.txt")?.1, 4000);
    assert_eq!(read(o, "imggroup")?, "root:x:0:\nnogroup:x:65534:\n");
    // A symlinked destination directory is followed.
    assert_eq!(read(o, "real/a.txt")?, "A\n");
    assert!(std::fs::symlink_metadata(o.join("lnk"))?.is_symlink());
    // A directory copied onto an existing one merges.
    assert_eq!(read(o, "etc/top")?, "top\n");
    assert_eq!(read(o, "etc/sub/f")?, "f\n");
    assert!(o.join("etc/passwd").is_file(), "/etc/passwd lost");
    assert_eq!(read(o, "ow.txt")?, "B\n");
    // ADD recognises archives by content, not by name.
    assert_eq!(read(o, "sniffed/t/one.txt")?, "one\n");
    assert_eq!(list(o, "fake")?, ["fake.tar.gz"]);
    assert_eq!(read(o, "fake/fake.tar.gz")?, "not an archive\n");
    assert_eq!(read(o, "unzst/t/one.txt")?, "one\n");
    assert_eq!(read(o, "unbz2/t/one.txt")?, "one\n");
    assert_eq!(read(o, "unxz/t/one.txt")?, "one\n");
    assert_eq!(meta(o, "script.sh")?.2, 0o755);
    assert_eq!(read(o, "script.sh")?, "#!/bin/sh\necho script\n");
    assert_eq!(read(o, "catheredoc.txt")?, "hello\n");
    // A rw bind mount is writable but neither the image nor the context keep the write.
    assert_eq!(read(o, "bindsub.txt")?, "top\n");
    assert!(
        !o.join("b/new").exists(),
        "bind write leaked into the image"
    );
    assert!(
        !p.join("dir/new").exists(),
        "bind write leaked into the context"
    );
    assert_eq!(read(o, "pwd.txt")?, "/b\n");

    let img = Oci::open(&oci)?;
    let e = img.env();
    assert_eq!(e.get("EQ").map(String::as_str), Some("a=b"), "{e:?}");
    assert_eq!(e.get("UN").map(String::as_str), Some("xx"), "{e:?}");
    assert!(!e.contains_key("NOTPERSISTED"), "ARG persisted: {e:?}");
    assert_eq!(img.cfg("Labels"), &serde_json::json!({"empty": ""}));
    assert_eq!(
        img.cfg("ExposedPorts"),
        &serde_json::json!({"9000/tcp": {}})
    );
    assert_eq!(img.cfg("User"), "1000");
    assert_eq!(img.cfg("WorkingDir"), "/b");

    // Errors: several sources need a directory destination; `${V:?msg}` fails with msg.
    let cases = [
        ("COPY a.txt b.txt /notdir\n", "end with a /"),
        ("ENV X=\"${NOPE:?must be set}\"\n", "must be set"),
    ];
    for (line, want) in cases {
        let dir = project(
            &format!("ARG BASE\nFROM ${{BASE}}\n{line}"),
            &[("a.txt", "A\n"), ("b.txt", "B\n")],
        )?;
        let err = build(&env, dir.path(), &[], None, vec![])
            .await
            .err()
            .ok_or_else(|| anyhow!("{line:?} should fail"))?;
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{line:?}: {msg}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_dockerignore() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        "ARG BASE\nFROM ${BASE}\nCOPY . /ctx/\n",
        &[
            (
                ".dockerignore",
                "# comment\nexcluded\n*.md\n/abs.txt\n**/*.log\n!keep.log\nsub/*/x\n",
            ),
            ("excluded/drop", "d\n"),
            ("root.md", "r\n"),
            ("nested/readme.md", "n\n"),
            ("abs.txt", "a\n"),
            ("nested/abs.txt", "n\n"),
            ("a.log", "l\n"),
            ("deep/er/b.log", "l\n"),
            ("keep.log", "k\n"),
            ("sub/one/x", "x\n"),
            ("sub/one/y", "y\n"),
            ("sub/x", "x\n"),
        ],
    )?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    let mut got = Vec::new();
    for e in walkdir::WalkDir::new(out.path().join("ctx")).sort_by_file_name() {
        let e = e?;
        if e.file_type().is_file() {
            got.push(
                e.path()
                    .strip_prefix(out.path().join("ctx"))?
                    .to_string_lossy()
                    .to_string(),
            );
        }
    }
    assert_eq!(
        got,
        [
            ".dockerignore",
            "Dockerfile",
            "keep.log",
            "nested/abs.txt",
            "nested/readme.md",
            "sub/one/y",
            "sub/x",
        ]
    );

    // An exception re-includes a file inside an excluded directory.
    let dir = project(
        "ARG BASE\nFROM ${BASE}\nCOPY . /ctx/\n",
        &[
            (".dockerignore", "excluded\n!excluded/keep\n"),
            ("excluded/drop", "d\n"),
            ("excluded/keep", "k\n"),
        ],
    )?;
    let res = build_local(&env, dir.path(), &[], None).await;
    let out = res?;
    assert_eq!(list(out.path(), "ctx/excluded")?, ["keep"]);
    Ok(())
}

const SYNTAX_DF: &str = r#"# syntax=docker/dockerfile:1
ARG BASE
FROM ${BASE}
MAINTAINER someone <a@b.c>
ARG A=1 B=2
ENV AB=${A}${B}
run echo a \
# a comment inside a continuation
  b > /cont.txt
RUN echo c \

  d > /blank.txt
ENV V=x
RUN <<EOF
echo $V > /h1.txt
EOF
RUN cat > /h2.txt <<'EOF'
$V
EOF
EXPOSE 80/TCP
SHELL ["/bin/ash", "-c"]
ENTRYPOINT echo entry
CMD echo cmd
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_syntax() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(SYNTAX_DF, &[])?;
    let img = build_oci(&env, dir.path(), &[], None).await?;
    assert_eq!(img.config["author"], "someone <a@b.c>", "{}", img.config);
    assert_eq!(img.env().get("AB").map(String::as_str), Some("12"));
    assert_eq!(img.file("cont.txt")?, "a b\n");
    assert_eq!(img.file("blank.txt")?, "c d\n");
    assert_eq!(img.file("h1.txt")?, "x\n");
    assert_eq!(img.file("h2.txt")?, "$V\n");
    assert_eq!(img.cfg("ExposedPorts"), &serde_json::json!({"80/tcp": {}}));
    // Shell forms use the current SHELL.
    assert_eq!(
        img.cfg("Entrypoint"),
        &serde_json::json!(["/bin/ash", "-c", "echo entry"])
    );
    assert_eq!(
        img.cfg("Cmd"),
        &serde_json::json!(["/bin/ash", "-c", "echo cmd"])
    );

    // JSON forms: escapes are decoded; a malformed array falls back to the shell form.
    let df =
        "ARG BASE\nFROM ${BASE}\nENTRYPOINT [\"echo\", \"a\\\"b\", \"\\u0041\"]\nCMD [not json\n";
    let dir = project(df, &[])?;
    let img = build_oci(&env, dir.path(), &[], None).await?;
    assert_eq!(
        img.cfg("Entrypoint"),
        &serde_json::json!(["echo", "a\"b", "A"])
    );
    assert_eq!(
        img.cfg("Cmd"),
        &serde_json::json!(["/bin/sh", "-c", "[not json"])
    );
    Ok(())
}

/// A tar with owners, a hardlink and unsafe paths.
fn owned_archive() -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o700);
    h.set_uid(123);
    h.set_gid(456);
    h.set_mtime(1_000_000_000);
    h.set_size(0);
    b.append_data(&mut h, "o/", std::io::empty())?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_uid(123);
    h.set_gid(456);
    h.set_mtime(1_000_000_000);
    h.set_size(2);
    b.append_data(&mut h, "o/file", &b"f\n"[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o640);
    b.append_link(&mut h, "o/hard", "o/file")?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "o/sym", "file")?;
    Ok(b.into_inner()?)
}

const FSOPS_DF: &str = r#"ARG BASE
FROM ${BASE} AS src
RUN mkdir -p /d/inner && echo in > /d/inner/x && ln -s /d /lnkdir
FROM ${BASE}
COPY dir/*/f /globsub/
COPY hid/* /hid/
COPY /a.txt ./b.txt /abs/
COPY ../a.txt /clamped.txt
COPY --from=src /lnkdir /followdir/
ADD owned.tar /owned/
ADD --chown=1000:1000 owned.tar /ownedch/
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_fsops() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        FSOPS_DF,
        &[
            ("a.txt", "A\n"),
            ("b.txt", "B\n"),
            ("dir/sub/f", "f\n"),
            ("hid/.secret", "s\n"),
            ("hid/vis", "v\n"),
        ],
    )?;
    std::fs::write(dir.path().join("owned.tar"), owned_archive()?)?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    let o = out.path();
    assert_eq!(list(o, "globsub")?, ["f"]);
    // `*` matches dotfiles (Go's filepath.Match has no dot rule).
    assert_eq!(list(o, "hid")?, [".secret", "vis"]);
    // Sources are relative to the context root, whatever their leading `/` or `..`.
    assert_eq!(list(o, "abs")?, ["a.txt", "b.txt"]);
    assert_eq!(read(o, "clamped.txt")?, "A\n");
    // A symlink named as the source is followed, then the directory's contents copied.
    assert_eq!(list(o, "followdir")?, ["inner"]);
    assert_eq!(read(o, "followdir/inner/x")?, "in\n");
    // ADD keeps the archive's owners, modes, hardlinks and symlinks.
    assert_eq!(meta(o, "owned/o")?, (123, 456, 0o700));
    assert_eq!(meta(o, "owned/o/file")?, (123, 456, 0o640));
    assert_eq!(
        std::fs::metadata(o.join("owned/o/file"))?.mtime(),
        1_000_000_000
    );
    assert_eq!(
        std::fs::metadata(o.join("owned/o/hard"))?.ino(),
        std::fs::metadata(o.join("owned/o/file"))?.ino(),
        "hardlink not kept"
    );
    assert_eq!(
        std::fs::read_link(o.join("owned/o/sym"))?.to_string_lossy(),
        "file"
    );
    // ADD --chown owns every extracted entry.
    assert_eq!(meta(o, "ownedch/o")?, (1000, 1000, 0o700));
    assert_eq!(meta(o, "ownedch/o/file")?, (1000, 1000, 0o640));
    Ok(())
}

const USERS_DF: &str = r#"ARG BASE
FROM ${BASE} AS broken
RUN exit 7
FROM ${BASE} AS main
ARG TARGETOS
ARG TARGETARCH
ARG BUILDOS
ARG BUILDARCH
ENV PATH=/custom:$PATH PLAT=${TARGETOS}/${TARGETARCH} BPLAT=${BUILDOS}/${BUILDARCH}
LABEL "a.b"="c d" 'single'='q v'
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group \
 && echo 'extra:x:3000:app' >> /etc/group
USER app
RUN id -G > /tmp/groups.txt
USER 4242
RUN id -u > /tmp/u4242.txt && id -g > /tmp/g4242.txt
USER nobody:nogroup
RUN id -u > /tmp/nobody.txt && id -g >> /tmp/nobody.txt
USER root
COPY --link a.txt /linked/
COPY --exclude=*.log --exclude=skip . /excluded/
ADD --chmod=0700 a.txt /addchmod.txt
COPY emptydir /emptydir/
COPY privdir /privdir
COPY suid /suid
RUN cp /suid /suid2 && chmod 4755 /suid2 && stat -c %a /suid > /tmp/suid-in-run.txt
FROM ${BASE} AS again
COPY --from=main /suid2 /suid3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_users_and_stage_pruning() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        USERS_DF,
        &[
            ("a.txt", "A\n"),
            ("x.log", "l\n"),
            ("skip/f", "s\n"),
            ("privdir/f", "p\n"),
            ("suid", "#!/bin/sh\n"),
        ],
    )?;
    let p = dir.path();
    std::fs::create_dir(p.join("emptydir"))?;
    std::fs::set_permissions(p.join("privdir"), std::fs::Permissions::from_mode(0o700))?;
    std::fs::set_permissions(p.join("suid"), std::fs::Permissions::from_mode(0o4755))?;
    std::fs::set_permissions(p.join("a.txt"), std::fs::Permissions::from_mode(0o644))?;
    let out = tempfile::tempdir()?;
    let oci = out.path().join("image.tar");
    // The `broken` stage is not needed by the target, so it never runs.
    build(
        &env,
        p,
        &[],
        Some("main"),
        vec![to("local", &out.path().join("fs")), to("oci", &oci)],
    )
    .await?;
    let o = &out.path().join("fs");
    // Supplementary groups come from /etc/group.
    assert_eq!(read(o, "tmp/groups.txt")?, "1000 3000\n");
    // A uid without a passwd entry runs with gid 0.
    assert_eq!(read(o, "tmp/u4242.txt")?, "4242\n");
    assert_eq!(read(o, "tmp/g4242.txt")?, "0\n");
    assert_eq!(read(o, "tmp/nobody.txt")?, "65534\n65534\n");
    assert_eq!(read(o, "linked/a.txt")?, "A\n");
    let ex = list(o, "excluded")?;
    assert!(ex.contains(&"a.txt".to_string()), "{ex:?}");
    assert!(!ex.contains(&"x.log".to_string()), "{ex:?}");
    assert!(!ex.contains(&"skip".to_string()), "{ex:?}");
    assert_eq!(meta(o, "addchmod.txt")?.2, 0o700);
    assert!(o.join("emptydir").is_dir(), "empty dir not copied");
    assert_eq!(list(o, "emptydir")?, Vec::<String>::new());
    assert_eq!(meta(o, "privdir")?.2, 0o700);
    assert_eq!(meta(o, "suid2")?.2, 0o4755);
    let in_run = read(o, "tmp/suid-in-run.txt")?;
    assert_eq!(in_run, "4755\n");
    assert_eq!(meta(o, "suid")?.2, 0o4755);

    let img = Oci::open(&oci)?;
    let host = Platform::host();
    // ENV replaces a base variable in place.
    assert_eq!(
        img.cfg("Env")[0],
        format!(
            "PATH=/custom:{}",
            kiln_e2e::base::BASE_PATH.trim_start_matches("PATH=")
        )
        .as_str()
    );
    let e = img.env();
    let plat = format!("{}/{}", host.os, host.architecture);
    assert_eq!(e.get("PLAT"), Some(&plat));
    assert_eq!(e.get("BPLAT"), Some(&plat));
    assert_eq!(
        img.cfg("Labels"),
        &serde_json::json!({"a.b": "c d", "single": "q v"})
    );
    // COPY --from keeps setuid.
    let out = build_local(&env, p, &[], None).await?;
    assert_eq!(meta(out.path(), "suid3")?.2, 0o4755);
    Ok(())
}

/// A tar whose first entry is named `name` verbatim (the tar crate refuses `..` paths).
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_add_stays_inside_and_empty_wildcards() -> anyhow::Result<()> {
    let env = env()?;
    let host_dir = tempfile::tempdir()?;
    let host = host_dir.path().to_string_lossy().to_string();
    let climb = format!("../../../../../../../../../..{host}/climbed.txt");
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, "ok.txt", tar::EntryType::Regular, "", b"ok\n")?;
    raw_entry(&mut b, "out", tar::EntryType::Symlink, &host, b"")?;
    raw_entry(
        &mut b,
        "out/through-link.txt",
        tar::EntryType::Regular,
        "",
        b"x\n",
    )?;
    let escape = b.into_inner()?;
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, &climb, tar::EntryType::Regular, "", b"x\n")?;
    let climbing = b.into_inner()?;

    let df = "ARG BASE\nFROM ${BASE}\nADD escape.tar /x/\nCOPY nomatch*.txt /nomatch/\nCOPY a.txt /new/deep/file.txt\nRUN test ! -e /nomatch && echo absent > /nomatch.txt\n";
    let dir = project(df, &[("a.txt", "A\n")])?;
    std::fs::write(dir.path().join("escape.tar"), &escape)?;
    let res = build_local(&env, dir.path(), &[], None).await;
    // Whatever the outcome, nothing was written through the symlink to the host.
    assert!(
        !host_dir.path().join("through-link.txt").exists(),
        "ADD wrote through a symlink to the host"
    );
    let out = res?;
    let o = out.path();
    assert_eq!(read(o, "x/ok.txt")?, "ok\n");
    // The write through the archive's absolute symlink lands inside the image root.
    assert_eq!(read(o, &format!("{}/through-link.txt", &host[1..]))?, "x\n");
    // A wildcard that matches nothing copies nothing and creates no destination.
    assert_eq!(read(o, "nomatch.txt")?, "absent\n");
    // Missing parents of the destination are created, root-owned, 0755.
    assert_eq!(read(o, "new/deep/file.txt")?, "A\n");
    assert_eq!(meta(o, "new/deep")?, (0, 0, 0o755));

    // An entry climbing out with `..` is refused, naming the archive.
    let dir = project("ARG BASE\nFROM ${BASE}\nADD climb.tar /y/\n", &[])?;
    std::fs::write(dir.path().join("climb.tar"), &climbing)?;
    let res = build_local(&env, dir.path(), &[], None).await;
    assert!(
        !host_dir.path().join("climbed.txt").exists(),
        "ADD climbed out of the destination"
    );
    let msg = format!(
        "{:#}",
        res.err()
            .ok_or_else(|| anyhow!("ADD of a climbing entry should fail"))?
    );
    assert!(msg.contains("climb.tar"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_parser_details() -> anyhow::Result<()> {
    let env = env()?;
    // A BOM, CRLF line endings, indented instructions and comments, `#` inside a line.
    let df = "\u{feff}# escape=\\\r\nARG BASE\r\nFROM ${BASE}\r\n  # indented comment\r\n  ENV A=1 \\\r\n      B=2\r\nARG Q=\"a b\"\r\nENV Q=${Q} HASH=x#y EMPTY= ESCQ=\"a\\\"b\"\r\nWORKDIR /app/\r\nRUN echo \"crlf\" > /crlf.txt\r\nHEALTHCHECK --start-interval=2s --interval=1m CMD true\r\nCMD [\"\u{e9}t\u{e9}\"]\r\n";
    let dir = project(df, &[])?;
    let img = build_oci(&env, dir.path(), &[], None).await?;
    let e = img.env();
    let want: &[(&str, &str)] = &[
        ("A", "1"),
        ("B", "2"),
        ("Q", "a b"),
        ("HASH", "x#y"),
        ("EMPTY", ""),
        ("ESCQ", "a\"b"),
    ];
    for (k, v) in want {
        assert_eq!(e.get(*k).map(String::as_str), Some(*v), "{k} in {e:?}");
    }
    assert_eq!(img.cfg("WorkingDir"), "/app");
    assert_eq!(img.file("crlf.txt")?, "crlf\n");
    assert_eq!(
        img.cfg("Healthcheck"),
        &serde_json::json!({"Test": ["CMD-SHELL", "true"], "Interval": 60_000_000_000u64,
            "StartInterval": 2_000_000_000u64})
    );
    assert_eq!(img.cfg("Cmd"), &serde_json::json!(["\u{e9}t\u{e9}"]));
    Ok(())
}

const STAGE_ONBUILD_DF: &str = r#"ARG BASE
FROM ${BASE} AS parent
ONBUILD RUN echo fromparent > /onb.txt
FROM parent AS child
RUN cat /onb.txt > /seen.txt
FROM ${BASE} AS binder
ARG BASE
RUN --mount=type=bind,from=${BASE},source=/etc,target=/imgetc cat /imgetc/group > /fromimage.txt
RUN --mount=type=cache,target=/pc,sharing=private echo p > /pc/f && cat /pc/f > /private.txt
COPY --chmod=0600 <<one.txt <<two.txt /docs/
first
one.txt
second
two.txt
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_stage_onbuild_and_mount_sources() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(STAGE_ONBUILD_DF, &[])?;
    // ONBUILD of a stage runs in a stage built FROM it, and is consumed there.
    let img = build_oci(&env, dir.path(), &[], Some("child")).await?;
    assert_eq!(img.file("seen.txt")?, "fromparent\n");
    assert!(
        matches!(img.cfg("OnBuild"), Value::Null) || img.cfg("OnBuild") == &serde_json::json!([]),
        "OnBuild: {}",
        img.cfg("OnBuild")
    );
    let out = build_local(&env, dir.path(), &[], Some("binder")).await?;
    let o = out.path();
    assert_eq!(read(o, "fromimage.txt")?, "root:x:0:\nnogroup:x:65534:\n");
    assert_eq!(read(o, "private.txt")?, "p\n");
    assert_eq!(read(o, "docs/one.txt")?, "first\n");
    assert_eq!(read(o, "docs/two.txt")?, "second\n");
    assert_eq!(meta(o, "docs/one.txt")?, (0, 0, 0o600));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_errors_name_the_problem() -> anyhow::Result<()> {
    let env = env()?;
    let cases: &[(&str, &str)] = &[
        ("COPY --chown=nouser a.txt /x\n", "nouser"),
        ("COPY --chown=0:nogrp a.txt /x\n", "nogrp"),
        ("COPY --from=nostage /a /b\n", "nostage"),
        ("COPY nodir/*.txt /x/\n", "nodir"),
        ("ENV\n", "ENV"),
        ("WORKDIR\n", "WORKDIR"),
        ("RUN --mount=type=bogus true\n", "bogus"),
        ("ADD --chmod=999 a.txt /x\n", "999"),
        ("ADD http://127.0.0.1:1/x /x\n", "http://127.0.0.1:1/x"),
        ("ONBUILD ONBUILD RUN true\n", "ONBUILD"),
        ("FROM ${BASE} AS dup\nFROM ${BASE} AS dup\n", "dup"),
    ];
    for (line, want) in cases {
        let dir = project(
            &format!("ARG BASE\nFROM ${{BASE}}\n{line}"),
            &[("a.txt", "A\n")],
        )?;
        let err = build(&env, dir.path(), &[], None, vec![])
            .await
            .err()
            .ok_or_else(|| anyhow!("{line:?} should fail"))?;
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{line:?}: {msg}");
    }
    // --target naming no stage fails and names it.
    let dir = project("ARG BASE\nFROM ${BASE} AS a\n", &[])?;
    let err = build(&env, dir.path(), &[], Some("nope"), vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("--target nope should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains("nope"), "{msg}");
    Ok(())
}

const PRECEDENCE_DF: &str = r#"ARG BASE
FROM ${BASE}
ARG X=arg
ENV X=env
ARG SPECIAL
RUN echo "$X" > /x.txt && printf '%s' "$SPECIAL" > /special.txt
ARG X
RUN echo "$X" > /x2.txt
ENV FROMX=${X}
COPY --chmod=u=rwx,go=rx a.txt /sym.txt
COPY --chown=1000:1000 --chmod=0640 a.txt /both.txt
WORKDIR /w
COPY a.txt .
COPY a.txt ./sub/.
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_arg_env_precedence_and_modes() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(PRECEDENCE_DF, &[("a.txt", "A\n")])?;
    std::fs::set_permissions(
        dir.path().join("a.txt"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let special = "a b \"q\" $HOME 'x' \\n";
    let out = tempfile::tempdir()?;
    let oci = out.path().join("image.tar");
    build(
        &env,
        dir.path(),
        &[("X", "cli"), ("SPECIAL", special)],
        None,
        vec![to("local", &out.path().join("fs")), to("oci", &oci)],
    )
    .await?;
    let o = &out.path().join("fs");
    // ENV beats an earlier ARG of the same name, even a build-arg; an ARG declared
    // after the ENV sets the variable for later steps (BuildKit adds it to the state's
    // env) but not in the image config.
    assert_eq!(read(o, "x.txt")?, "env\n");
    assert_eq!(read(o, "x2.txt")?, "cli\n");
    // Build-arg values reach RUN untouched.
    assert_eq!(read(o, "special.txt")?, special);
    assert_eq!(meta(o, "sym.txt")?.2, 0o755);
    assert_eq!(meta(o, "both.txt")?, (1000, 1000, 0o640));
    assert_eq!(read(o, "w/a.txt")?, "A\n");
    assert_eq!(read(o, "w/sub/a.txt")?, "A\n");
    let img = Oci::open(&oci)?;
    assert_eq!(img.env().get("FROMX").map(String::as_str), Some("cli"));
    assert_eq!(img.env().get("X").map(String::as_str), Some("env"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_copy_from_keeps_owners() -> anyhow::Result<()> {
    let env = env()?;
    let df = "ARG BASE\nFROM ${BASE} AS s\nRUN mkdir -p /o/d && echo f > /o/d/f && chown -R 1234:5678 /o && chmod 0750 /o/d\nFROM ${BASE}\nCOPY --from=s /o /o\nCOPY --from=s --chown=1:2 /o /c\n";
    let dir = project(df, &[])?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    let o = out.path();
    // Without --chown, COPY --from keeps the stage's owners and modes, the created
    // destination directory included.
    assert_eq!(meta(o, "o")?, (1234, 5678, 0o755));
    assert_eq!(meta(o, "o/d")?, (1234, 5678, 0o750));
    assert_eq!(meta(o, "o/d/f")?, (1234, 5678, 0o644));
    assert_eq!(meta(o, "c/d/f")?, (1, 2, 0o644));
    assert_eq!(meta(o, "c/d")?, (1, 2, 0o750));
    // Same content, other owners in the stage: the copy is not served from cache.
    let dir = project(&df.replace("1234:5678", "4321:8765"), &[])?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    assert_eq!(meta(out.path(), "o/d/f")?, (4321, 8765, 0o644));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_context_symlinks_stay_inside() -> anyhow::Result<()> {
    let env = env()?;
    let df =
        "ARG BASE\nFROM ${BASE}\nCOPY linkdir/f /via-link.txt\nCOPY linkdir /linkdir-contents/\n";
    let dir = project(df, &[("realdir/f", "real\n")])?;
    std::os::unix::fs::symlink("realdir", dir.path().join("linkdir"))?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    assert_eq!(read(out.path(), "via-link.txt")?, "real\n");
    assert_eq!(list(out.path(), "linkdir-contents")?, ["f"]);

    // An absolute symlink in the context resolves inside the context, never to the host.
    let secret = tempfile::tempdir()?;
    std::fs::write(secret.path().join("host.txt"), "host secret\n")?;
    let df = "ARG BASE\nFROM ${BASE}\nCOPY abslink /z\n";
    let dir = project(df, &[])?;
    std::os::unix::fs::symlink(secret.path().join("host.txt"), dir.path().join("abslink"))?;
    let res = build_local(&env, dir.path(), &[], None).await;
    let msg = format!(
        "{:#}",
        res.err()
            .ok_or_else(|| anyhow!("COPY of a symlink leaving the context should fail"))?
    );
    assert!(msg.contains("/abslink: not found"), "{msg}");
    assert!(!msg.contains("host secret"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_heredoc_stdin_and_ignore_file_precedence() -> anyhow::Result<()> {
    let env = env()?;
    let df = "ARG BASE\nFROM ${BASE}\nRUN sh <<EOF\necho viastdin > /stdin.txt\nEOF\nRUN <<A cat > /f1.txt && <<B cat > /f2.txt\nfirst\nA\nsecond\nB\nCOPY . /ctx/\n";
    let dir = project(
        df,
        &[
            (".dockerignore", "a.txt\n"),
            ("Dockerfile.dockerignore", "b.txt\n"),
            ("a.txt", "a\n"),
            ("b.txt", "b\n"),
        ],
    )?;
    let out = build_local(&env, dir.path(), &[], None).await?;
    let o = out.path();
    assert_eq!(read(o, "stdin.txt")?, "viastdin\n");
    assert_eq!(read(o, "f1.txt")?, "first\n");
    assert_eq!(read(o, "f2.txt")?, "second\n");
    // `<Dockerfile>.dockerignore` beside the Dockerfile wins over the context's.
    let ctx = list(o, "ctx")?;
    assert!(ctx.contains(&"a.txt".to_string()), "{ctx:?}");
    assert!(!ctx.contains(&"b.txt".to_string()), "{ctx:?}");

    // FROM with a variable that expands to nothing fails and says so.
    let dir = project("FROM ${UNDEF}\n", &[])?;
    let err = build(&env, dir.path(), &[], None, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("FROM of an empty name should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains("${UNDEF}"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_run_env_from_args() -> anyhow::Result<()> {
    let env = env()?;
    let df = "ARG BASE\nFROM ${BASE}\nARG NOVAL\nARG WITHVAL=v\nRUN echo \"${NOVAL-unset} ${WITHVAL} ${UNDECL-unset} ${http_proxy-unset}\" > /args.txt\n";
    let dir = project(df, &[])?;
    let out = tempfile::tempdir()?;
    let oci = out.path().join("image.tar");
    build(
        &env,
        dir.path(),
        &[("UNDECL", "1"), ("http_proxy", "http://proxy:3128")],
        None,
        vec![to("local", &out.path().join("fs")), to("oci", &oci)],
    )
    .await?;
    // Declared ARGs without a value are unset; undeclared build-args are invisible except
    // the predefined proxy ones.
    let args = read(&out.path().join("fs"), "args.txt")?;
    assert!(args.starts_with("unset v unset "), "{args}");
    assert_eq!(args, "unset v unset http://proxy:3128\n");
    let img = Oci::open(&oci)?;
    let cfg = img.config.to_string();
    assert!(
        !cfg.contains("proxy:3128"),
        "proxy leaked into the config: {cfg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parity_context_hardlinks_kept() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(
        "ARG BASE\nFROM ${BASE} AS s\nRUN mkdir /d && echo s > /d/a && ln /d/a /d/b\nFROM ${BASE}\nCOPY --from=s /d /d\nCOPY . /ctx/\n",
        &[("h1", "same\n")],
    )?;
    std::fs::hard_link(dir.path().join("h1"), dir.path().join("h2"))?;
    let out = tempfile::tempdir()?;
    let tar = out.path().join("image.tar");
    build(&env, dir.path(), &[], None, vec![to("oci", &tar)]).await?;
    // Read the top layer's entry types.
    let mut files = HashMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(&tar)?);
    for e in ar.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        files.insert(name, data);
    }
    let img = Oci::open(&tar)?;
    let top_names: Vec<&str> = img
        .layers
        .last()
        .map(|l| l.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    assert!(top_names.contains(&"ctx/h1"), "{top_names:?}");
    let index: Value =
        serde_json::from_slice(files.get("index.json").ok_or_else(|| anyhow!("no index"))?)?;
    let blob = |d: &str| files.get(&format!("blobs/sha256/{}", d.trim_start_matches("sha256:")));
    let manifest: Value = serde_json::from_slice(
        blob(index["manifests"][0]["digest"].as_str().unwrap_or_default())
            .ok_or_else(|| anyhow!("no manifest"))?,
    )?;
    let mut kinds = BTreeMap::new();
    for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
        let data =
            blob(layer["digest"].as_str().unwrap_or_default()).ok_or_else(|| anyhow!("no blob"))?;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data.as_slice()));
        for e in ar.entries()? {
            let e = e?;
            kinds.insert(
                e.path()?.to_string_lossy().to_string(),
                e.header().entry_type(),
            );
        }
    }
    // Hard links copied from a stage stay hard links in the layer.
    let stage_links = ["d/a", "d/b"]
        .iter()
        .filter(|n| kinds.get(**n) == Some(&tar::EntryType::Link))
        .count();
    assert_eq!(
        stage_links,
        1,
        "{:?}",
        kinds
            .iter()
            .filter(|(k, _)| k.starts_with("d/"))
            .collect::<Vec<_>>()
    );
    // One of the two names is stored as a hard link to the other.
    let links = ["ctx/h1", "ctx/h2"]
        .iter()
        .filter(|n| kinds.get(**n) == Some(&tar::EntryType::Link))
        .count();
    assert_eq!(links, 1, "{kinds:?}");
    Ok(())
}
