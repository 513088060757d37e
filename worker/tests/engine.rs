//! The engine end to end, with real parts: runc for RUN steps, overlayfs (or the copying
//! snapshotter where overlay is unavailable), and Debian's docker-registry on 127.0.0.1
//! holding a busybox-static base image. Needs root (CI is root).

#[path = "engine/cachemounts.rs"]
mod cachemounts;
#[path = "engine/daemon.rs"]
mod daemon;
#[path = "engine/gc.rs"]
mod gc;
#[path = "engine/git.rs"]
mod git;
#[path = "engine/http.rs"]
mod http;
#[path = "engine/parity.rs"]
mod parity;
#[path = "engine/regcache.rs"]
mod regcache;
#[path = "engine/support.rs"]
mod support;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use anyhow::anyhow;
use kiln_worker::control::{BuildRequest, Frontend};
use kiln_worker::image::Platform;
use kiln_worker::progress::{Event, Progress, VertexState};
use kiln_worker::source::image::{ImageResolver, RegistryConfig};
use tokio_util::sync::CancellationToken;

use support::{build, env, image, project, to};

const MULTI: &str = r#"ARG BASE
FROM ${BASE} AS a
COPY a.txt /src/a.txt
RUN mkdir -p /data && for i in $(seq 1 50); do echo "line $i" >> /data/a.txt; done && cat /src/a.txt >> /data/a.txt
RUN sha256sum /data/a.txt > /data/a.sum
FROM ${BASE} AS b
COPY b.txt /src/b.txt
RUN mkdir -p /data && cat /src/b.txt > /data/b.txt
FROM ${BASE}
COPY --from=a /data /data
COPY --from=b /data /data
WORKDIR /data
RUN cat a.txt b.txt | wc -l > count
CMD ["cat", "/data/count"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_stage_build_pushes_and_pulls_back() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let name = format!("{}/kiln/multi:1", env.reg.addr());
    let out = tempfile::tempdir()?;
    let built = build(
        &env,
        dir.path(),
        &[],
        None,
        vec![image(&name, true), to("local", &out.path().join("fs"))],
    )
    .await?;
    let digest = built
        .resp
        .exporter_response
        .get("containerimage.digest")
        .cloned()
        .ok_or_else(|| anyhow!("no digest"))?;
    assert_eq!(
        std::fs::read_to_string(out.path().join("fs/data/count"))?.trim(),
        "52"
    );
    assert!(std::fs::read_to_string(out.path().join("fs/data/a.txt"))?.ends_with("from a\n"));

    // Pull it back with a fresh content store: same digest, same files.
    let store = tempfile::tempdir()?;
    let content = std::sync::Arc::new(kiln_worker::content::ContentStore::open(store.path())?);
    let resolver = ImageResolver::new(RegistryConfig::default(), content);
    let pulled = resolver.resolve(&name, &Platform::host()).await?;
    assert_eq!(pulled.digest, digest);
    assert_eq!(
        pulled.config.config.cmd,
        Some(vec!["cat".to_string(), "/data/count".to_string()])
    );
    assert_eq!(pulled.config.config.working_dir, "/data");
    let unpacked = tempfile::tempdir()?;
    for (i, layer) in pulled.layers.iter().enumerate() {
        let blob = resolver.fetch_blob(&name, layer, &|_, _| {}).await?;
        let dest = unpacked.path().join(i.to_string());
        std::fs::create_dir(&dest)?;
        kiln_worker::snapshot::layer::unpack_blob(
            &blob,
            &layer.media_type,
            &dest,
            &Default::default(),
        )?;
    }
    let top = unpacked.path().join((pulled.layers.len() - 1).to_string());
    assert_eq!(
        std::fs::read_to_string(top.join("data/count"))?.trim(),
        "52"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn independent_stages_run_in_parallel() -> anyhow::Result<()> {
    let env = env()?;
    let df = r#"ARG BASE
FROM ${BASE} AS a
RUN sleep 1 && echo a > /a
FROM ${BASE} AS b
RUN sleep 1 && echo b > /b
FROM ${BASE}
COPY --from=a /a /a
COPY --from=b /b /b
"#;
    let dir = project(df, &[])?;
    let built = build(&env, dir.path(), &[], None, vec![]).await?;
    let runs: Vec<VertexState> = built
        .vertices()
        .into_values()
        .filter(|v| v.name.contains("RUN sleep"))
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let span = |v: &VertexState| -> anyhow::Result<(SystemTime, SystemTime)> {
        Ok((
            v.started.ok_or_else(|| anyhow!("not started"))?,
            v.completed.ok_or_else(|| anyhow!("not completed"))?,
        ))
    };
    let (s0, e0) = span(&runs[0])?;
    let (s1, e1) = span(&runs[1])?;
    assert!(
        s0 < e1 && s1 < e0,
        "the two RUN steps did not overlap: {runs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_is_cached_and_a_change_reruns_only_dependents() -> anyhow::Result<()> {
    let env = env()?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let first = build(&env, dir.path(), &[], None, vec![]).await?;
    assert_eq!(
        first.executed_runs().len(),
        4,
        "{:?}",
        first.executed_runs()
    );

    let again = build(&env, dir.path(), &[], None, vec![]).await?;
    let not_cached: Vec<String> = again
        .vertices()
        .values()
        .filter(|v| !v.cached && !v.name.starts_with("[internal]"))
        .map(|v| v.name.clone())
        .collect();
    assert!(not_cached.is_empty(), "rebuild executed {not_cached:?}");

    // Touching a file without changing it changes nothing.
    let a = dir.path().join("a.txt");
    std::fs::write(&a, "from a\n")?;
    let touched = build(&env, dir.path(), &[], None, vec![]).await?;
    assert!(
        touched.executed_runs().is_empty(),
        "{:?}",
        touched.executed_runs()
    );

    // Changing b.txt re-runs stage b and the final RUN, not stage a.
    std::fs::write(dir.path().join("b.txt"), "from b, changed\n")?;
    let changed = build(&env, dir.path(), &[], None, vec![]).await?;
    let mut runs = changed.executed_runs();
    runs.sort();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs.iter().any(|r| r.contains("cat /src/b.txt")),
        "{runs:?}"
    );
    assert!(runs.iter().any(|r| r.contains("wc -l")), "{runs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_run_reports_exit_code_and_output() -> anyhow::Result<()> {
    let env = env()?;
    let df = "ARG BASE\nFROM ${BASE}\nRUN echo about to fail && exit 3\n";
    let dir = project(df, &[])?;
    let err = build(&env, dir.path(), &[], None, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("build should fail"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains("exit code: 3"), "{msg}");
    assert!(msg.contains("about to fail"), "{msg}");
    Ok(())
}

/// Reads `name` out of a tar file.
fn tar_entries(path: &Path) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(path)?);
    for e in ar.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.insert(name, data);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whiteouts_survive_export() -> anyhow::Result<()> {
    let env = env()?;
    let df = "ARG BASE\nFROM ${BASE}\nRUN rm /etc/group && rm -rf /root && mkdir /root && touch /root/new\n";
    let dir = project(df, &[])?;
    let out = tempfile::tempdir()?;
    let oci = out.path().join("image.tar");
    build(&env, dir.path(), &[], None, vec![to("oci", &oci)]).await?;
    let files = tar_entries(&oci)?;
    let index: serde_json::Value = serde_json::from_slice(
        files
            .get("index.json")
            .ok_or_else(|| anyhow!("no index.json"))?,
    )?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("no manifest"))?;
    let blob = |d: &str| -> anyhow::Result<&Vec<u8>> {
        files
            .get(&format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
            .ok_or_else(|| anyhow!("missing blob {d}"))
    };
    let manifest: serde_json::Value = serde_json::from_slice(blob(manifest_digest)?)?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("no layers"))?;
    let top = layers.last().ok_or_else(|| anyhow!("no layers"))?;
    let data = blob(top["digest"].as_str().unwrap_or_default())?;
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data.as_slice()));
    for e in ar.entries()? {
        names.push(e?.path()?.to_string_lossy().to_string());
    }
    assert!(names.iter().any(|n| n == "etc/.wh.group"), "{names:?}");
    assert!(names.iter().any(|n| n == "root/.wh..wh..opq"), "{names:?}");
    assert!(names.iter().any(|n| n == "root/new"), "{names:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gives_one_clear_error() -> anyhow::Result<()> {
    let env = env()?;
    let missing = format!("{}/kiln/base:404", env.reg.addr());
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("ARG BASE\nFROM ${BASE}\nFRM x\n", vec![], "Dockerfile:3"),
        (
            "ARG BASE\nFROM ${BASE}\nCOPY missing.txt /x\n",
            vec![],
            "missing.txt",
        ),
        (
            "FROM 127.0.0.1:1/nothing:1\nRUN true\n",
            vec![],
            "127.0.0.1:1/nothing:1",
        ),
        (
            "ARG BASE\nFROM ${BASE}\nRUN true\n",
            vec![("BASE", missing.as_str())],
            "kiln/base:404",
        ),
    ];
    for (i, (df, args, want)) in cases.into_iter().enumerate() {
        let dir = project(df, &[])?;
        let err = build(&env, dir.path(), &args, None, vec![])
            .await
            .err()
            .ok_or_else(|| anyhow!("case {i} should fail"))?;
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "case {i}: {msg}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_llb_definition_runs() -> anyhow::Result<()> {
    let env = env()?;
    let def = support::exec_definition(&env.base, "echo hi > /hello && id -u");
    let out = tempfile::tempdir()?;
    let req = BuildRequest {
        frontend: Frontend::Llb(def),
        locals: HashMap::new(),
        deferred_locals: Default::default(),
        exports: vec![to("local", out.path())],
        session: None,
        secrets: HashMap::new(),
    };
    let (progress, mut rx) = Progress::channel();
    env.engine
        .build(req, progress, CancellationToken::new())
        .await
        .map_err(|e| anyhow!(kiln_worker::solver::error_chain(&e)))?;
    assert_eq!(std::fs::read_to_string(out.path().join("hello"))?, "hi\n");
    assert!(out.path().join("bin/busybox").exists());
    let mut logs = String::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::Log(l) = e {
            logs.push_str(&String::from_utf8_lossy(&l.data));
        }
    }
    assert_eq!(logs, "0\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_layer_blob_is_a_clear_error() -> anyhow::Result<()> {
    let env = env()?;
    let store = tempfile::tempdir()?;
    let content = std::sync::Arc::new(kiln_worker::content::ContentStore::open(store.path())?);
    let resolver = ImageResolver::new(RegistryConfig::default(), content);
    let base = resolver.resolve(&env.base, &Platform::host()).await?;
    let layer = &base.layers[0];
    let path = env.reg.blob_path(&layer.digest);
    let mut bytes = std::fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes)?;
    let dir = project("ARG BASE\nFROM ${BASE}\nRUN true\n", &[])?;
    let err = build(&env, dir.path(), &[], None, vec![])
        .await
        .err()
        .ok_or_else(|| anyhow!("a corrupt base layer must fail the build"))?;
    let msg = format!("{err:#}");
    assert!(msg.contains(&layer.digest), "{msg}");
    eprintln!("corrupt layer error: {msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crun_is_selectable() -> anyhow::Result<()> {
    use kiln_worker::control::{Engine, EngineConfig};
    use kiln_worker::executor::Runtime;
    let env = env()?;
    let root = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        root: root.path().to_path_buf(),
        runtime: Runtime::Crun,
        ..Default::default()
    })?;
    let out = tempfile::tempdir()?;
    let req = BuildRequest {
        frontend: Frontend::Llb(support::exec_definition(&env.base, "echo crun > /by")),
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
    assert_eq!(std::fs::read_to_string(out.path().join("by"))?, "crun\n");
    Ok(())
}
