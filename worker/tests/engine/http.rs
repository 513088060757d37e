//! HTTP(S) sources and remote ADD: `ADD http://…` downloads through the http source (file
//! name from the destination or the URL, mode 0600), `ADD git://…` checks a repository
//! out, and raw `https?://` sources honour `http.filename`, `http.perm` and
//! `http.checksum` (a mismatch names the URL and both digests). The server is
//! `python3 -m http.server` on 127.0.0.1; the git remote a real `git daemon`.

use std::collections::HashMap;

use anyhow::anyhow;
use kiln_e2e::git::GitDaemon;
use kiln_e2e::http::FileServer;
use kiln_worker::control::{BuildRequest, Frontend};
use kiln_worker::image::Platform;
use kiln_worker::llb::builder::{Builder, Output};
use kiln_worker::llb::pb;
use kiln_worker::progress::Progress;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::support::{build, env, project, to};

fn http_definition(url: &str, attrs: &[(&str, &str)]) -> pb::Definition {
    let mut b = Builder::new();
    let src = b.add(
        &pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: url.to_string(),
                attrs: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })),
            platform: Some(Platform::host().to_pb()),
            constraints: Some(Default::default()),
            ..Default::default()
        },
        None,
    );
    b.marshal(&Output {
        digest: src,
        index: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_downloads_urls_and_checks_out_git() -> anyhow::Result<()> {
    let env = env()?;
    let served = tempfile::tempdir()?;
    std::fs::write(served.path().join("file.txt"), "hello http\n")?;
    let http = FileServer::start(served.path())?;
    let gitd = GitDaemon::start()?;
    gitd.repo("app", &[("README", "from git\n")])?;
    let df = format!(
        "ARG BASE\nFROM ${{BASE}}\nADD http://{a}/file.txt /got/\nADD http://{a}/file.txt /renamed.txt\n\
         ADD {g}#main /src\nRUN stat -c %a /got/file.txt > /mode\n",
        a = http.addr,
        g = gitd.url("app"),
    );
    let dir = project(&df, &[])?;
    let out = tempfile::tempdir()?;
    build(&env, dir.path(), &[], None, vec![to("local", out.path())]).await?;
    let read = |p: &str| std::fs::read_to_string(out.path().join(p));
    assert_eq!(read("got/file.txt")?, "hello http\n");
    assert_eq!(read("renamed.txt")?, "hello http\n");
    assert_eq!(read("mode")?.trim(), "600");
    assert_eq!(read("src/README")?, "from git\n");
    assert!(!out.path().join("src/.git").exists());

    // Changed content behind the same URL is a new download and a new result.
    std::fs::write(served.path().join("file.txt"), "changed\n")?;
    let out2 = tempfile::tempdir()?;
    build(&env, dir.path(), &[], None, vec![to("local", out2.path())]).await?;
    assert_eq!(
        std::fs::read_to_string(out2.path().join("got/file.txt"))?,
        "changed\n"
    );

    // COPY takes no URL.
    let bad = project(
        &format!(
            "ARG BASE\nFROM ${{BASE}}\nCOPY http://{}/file.txt /x\n",
            http.addr
        ),
        &[],
    )?;
    let err = build(&env, bad.path(), &[], None, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("COPY of a URL should fail"))?;
    assert!(format!("{err:#}").contains("use ADD"), "{err:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_source_attributes_and_checksum() -> anyhow::Result<()> {
    let env = env()?;
    let served = tempfile::tempdir()?;
    std::fs::write(served.path().join("tool.sh"), "#!/bin/sh\necho tool\n")?;
    let http = FileServer::start(served.path())?;
    let url = format!("http://{}/tool.sh", http.addr);
    let digest = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(b"#!/bin/sh\necho tool\n"))
    );
    let solve = |def: pb::Definition| {
        let engine = &env.engine;
        async move {
            let out = tempfile::tempdir()?;
            let req = BuildRequest {
                frontend: Frontend::Llb(def),
                locals: HashMap::new(),
                deferred_locals: Default::default(),
                exports: vec![to("local", out.path())],
                session: None,
                secrets: HashMap::new(),
            };
            engine
                .build(req, Progress::discard(), CancellationToken::new())
                .await
                .map_err(|e| anyhow!(kiln_worker::solver::error_chain(&e)))?;
            Ok::<_, anyhow::Error>(out)
        }
    };
    let out = solve(http_definition(
        &url,
        &[
            ("http.filename", "run"),
            ("http.perm", "0755"),
            ("http.uid", "1000"),
            ("http.gid", "1001"),
            ("http.checksum", &digest),
        ],
    ))
    .await?;
    use std::os::unix::fs::MetadataExt as _;
    let md = std::fs::metadata(out.path().join("run"))?;
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert_eq!((md.uid(), md.gid()), (1000, 1001));
    assert_eq!(
        std::fs::read_to_string(out.path().join("run"))?,
        "#!/bin/sh\necho tool\n"
    );

    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = solve(http_definition(&url, &[("http.checksum", &wrong)]))
        .await
        .err()
        .ok_or_else(|| anyhow!("a checksum mismatch must fail"))?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&url) && msg.contains(&wrong) && msg.contains(&digest),
        "{msg}"
    );

    let missing = format!("http://{}/nothing", http.addr);
    let err = solve(http_definition(&missing, &[]))
        .await
        .err()
        .ok_or_else(|| anyhow!("a 404 must fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains(&missing) && msg.contains("404"), "{msg}");
    Ok(())
}
