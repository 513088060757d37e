//! Shared caches between engines with separate roots, through a real docker-registry and an
//! OCI layout: `--export-cache`/`--import-cache` (mode=max, mode=min, type=local), broken
//! and corrupt caches (a miss with a warning, never a wrong build), and the pool cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use kiln_e2e::registry::Registry;
use kiln_worker::cache::registry::CacheEntry;
use kiln_worker::control::{BuildRequest, CacheRequest, Engine, EngineConfig, Frontend};
use kiln_worker::frontend::BuildOpts;
use kiln_worker::image::Platform;
use kiln_worker::progress::{Event, Progress};
use tokio_util::sync::CancellationToken;

use super::support::{exec_definition, image, project, to, Built};

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
RUN cat a.txt b.txt | wc -l > count && cp b.txt b.copy
CMD ["cat", "/data/count"]
"#;

pub(super) struct Worker {
    _root: tempfile::TempDir,
    engine: Engine,
}

pub(super) fn worker(pool: Option<String>) -> anyhow::Result<Worker> {
    let root = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        root: root.path().to_path_buf(),
        max_parallelism: 4,
        cache_registry: pool,
        ..Default::default()
    })?;
    Ok(Worker {
        _root: root,
        engine,
    })
}

pub(super) fn entry(typ: &str, attrs: &[(&str, &str)]) -> CacheEntry {
    CacheEntry {
        typ: typ.into(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub(super) fn base(reg: &Registry) -> anyhow::Result<String> {
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    Ok(format!("{}/kiln/base:1", reg.addr()))
}

/// Builds `dir` with the caches in `caches`; the image is built (not pushed) so its digest
/// can be compared.
async fn build(w: &Worker, base: &str, dir: &Path, caches: CacheRequest) -> anyhow::Result<Built> {
    build_to(w, base, dir, caches, None).await
}

/// [`build`], also exporting the result's files to `out`.
async fn build_to(
    w: &Worker,
    base: &str,
    dir: &Path,
    caches: CacheRequest,
    out: Option<&Path>,
) -> anyhow::Result<Built> {
    let opts = BuildOpts {
        filename: "Dockerfile".into(),
        build_args: BTreeMap::from([("BASE".to_string(), base.to_string())]),
        build_platform: Platform::host(),
        context_name: "context".into(),
        ..Default::default()
    };
    let locals = HashMap::from([
        ("context".to_string(), dir.to_path_buf()),
        ("dockerfile".to_string(), dir.to_path_buf()),
    ]);
    let req = BuildRequest {
        frontend: Frontend::Dockerfile {
            opts,
            dockerfile_local: "dockerfile".into(),
        },
        locals,
        deferred_locals: Default::default(),
        exports: std::iter::once(image("kiln/regcache:test", false))
            .chain(out.map(|o| to("local", o)))
            .collect(),
        session: None,
        secrets: HashMap::new(),
    };
    run(w, req, caches).await
}

pub(super) async fn run(
    w: &Worker,
    req: BuildRequest,
    caches: CacheRequest,
) -> anyhow::Result<Built> {
    let (progress, mut rx) = Progress::channel();
    let res = w
        .engine
        .build_with_cache(req, &caches, progress, CancellationToken::new())
        .await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    let resp = res.map_err(|e| anyhow!(kiln_worker::solver::error_chain(&e)))?;
    Ok(Built { resp, events })
}

fn digest(b: &Built) -> anyhow::Result<String> {
    b.resp
        .exporter_response
        .get("containerimage.digest")
        .cloned()
        .ok_or_else(|| anyhow!("no image digest"))
}

pub(super) fn warnings(b: &Built) -> Vec<String> {
    b.events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.message.clone()),
            _ => None,
        })
        .collect()
}

fn sorted_runs(b: &Built) -> Vec<String> {
    let mut r = b.executed_runs();
    r.sort();
    r
}

/// A exports with `export`, a cold B imports with `import`: B runs nothing and builds the
/// same image; after b.txt changes, B re-runs only stage b's RUN and the final RUN.
async fn round_trip(export: CacheEntry, import: CacheEntry) -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let a = worker(None)?;
    let built_a = build(
        &a,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![export],
            imports: vec![],
        },
    )
    .await?;
    assert_eq!(
        built_a.executed_runs().len(),
        4,
        "{:?}",
        built_a.executed_runs()
    );

    let b = worker(None)?;
    let import = CacheRequest {
        exports: vec![],
        imports: vec![import],
    };
    let built_b = build(&b, &base, dir.path(), import.clone()).await?;
    assert!(
        built_b.executed_runs().is_empty(),
        "cold importer executed {:?}; warnings {:?}",
        built_b.executed_runs(),
        warnings(&built_b)
    );
    assert_eq!(digest(&built_b)?, digest(&built_a)?);
    assert!(warnings(&built_b).is_empty(), "{:?}", warnings(&built_b));

    std::fs::write(dir.path().join("b.txt"), "from b, changed\n")?;
    let changed = build(&b, &base, dir.path(), import).await?;
    let runs = sorted_runs(&changed);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs.iter().any(|r| r.contains("cat /src/b.txt")),
        "{runs:?}"
    );
    assert!(runs.iter().any(|r| r.contains("wc -l")), "{runs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_mode_max_cold_worker_runs_nothing() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let r = format!("{}/kiln/cache:max", reg.addr());
    round_trip(
        entry("registry", &[("ref", &r), ("mode", "max")]),
        entry("registry", &[("ref", &r)]),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_mode_min_cold_worker_runs_nothing() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let r = format!("{}/kiln/cache:min", reg.addr());
    round_trip(
        entry("registry", &[("ref", &r), ("mode", "min")]),
        entry("registry", &[("ref", &r)]),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_index_form_round_trips() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let r = format!("{}/kiln/cache:index", reg.addr());
    round_trip(
        entry(
            "registry",
            &[("ref", &r), ("mode", "max"), ("image-manifest", "false")],
        ),
        entry("registry", &[("ref", &r)]),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_oci_layout_cold_worker_runs_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("cache");
    let d = d.to_string_lossy();
    round_trip(
        entry("local", &[("dest", &d), ("mode", "max")]),
        entry("local", &[("src", &d)]),
    )
    .await?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cache/index.json"))?)?;
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    Ok(())
}

/// Answers every HTTP request with a 500 until dropped.
fn failing_server() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\noops",
            );
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_caches_are_a_miss_with_a_warning() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    // A port nothing listens on, and a server that answers 500.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let failing = failing_server()?;
    let a = worker(None)?;
    let built = build(
        &a,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![],
            imports: vec![
                entry("registry", &[("ref", &format!("{closed}/kiln/cache:1"))]),
                entry("registry", &[("ref", &format!("{failing}/kiln/cache:1"))]),
            ],
        },
    )
    .await?;
    assert_eq!(built.executed_runs().len(), 4);
    let w = warnings(&built);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains(&closed.to_string()), "{w:?}");
    assert!(w.iter().any(|m| m.contains("500")), "{w:?}");

    // An export that fails with ignore-error=true is a warning; without, an error.
    let dead = entry("registry", &[("ref", &format!("{closed}/kiln/cache:1"))]);
    let mut ignored = dead.clone();
    ignored.attrs.insert("ignore-error".into(), "true".into());
    let ok = build(
        &a,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![ignored],
            imports: vec![],
        },
    )
    .await?;
    assert!(warnings(&ok).iter().any(|m| m.contains("ignore-error")));
    let err = build(
        &a,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![dead],
            imports: vec![],
        },
    )
    .await
    .err()
    .ok_or_else(|| anyhow!("an export to a dead registry must fail"))?;
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_blob_is_a_miss_and_the_build_is_right() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let r = format!("{}/kiln/cache:corrupt", reg.addr());
    let a = worker(None)?;
    let built_a = build(
        &a,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![entry("registry", &[("ref", &r), ("mode", "max")])],
            imports: vec![],
        },
    )
    .await?;
    // Corrupt every layer blob of the cache but the base's (same length, other bytes).
    let store = tempfile::tempdir()?;
    let content = Arc::new(kiln_worker::content::ContentStore::open(store.path())?);
    let resolver = kiln_worker::source::image::ImageResolver::new(Default::default(), content);
    let (manifest, _) = resolver.fetch_manifest_raw(&r).await?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
    let pulled_base = resolver.resolve(&base, &Platform::host()).await?;
    let mut corrupted = 0;
    for l in manifest["layers"].as_array().context("layers")? {
        let d = l["digest"].as_str().context("digest")?;
        if pulled_base.layers.iter().any(|b| b.digest == d) {
            continue;
        }
        let path = reg.blob_path(d);
        let len = std::fs::metadata(&path)?.len() as usize;
        std::fs::write(&path, vec![b'x'; len])?;
        corrupted += 1;
    }
    assert!(corrupted >= 4, "{corrupted}");
    let b = worker(None)?;
    let out = tempfile::tempdir()?;
    let built_b = build_to(
        &b,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![],
            imports: vec![entry("registry", &[("ref", &r)])],
        },
        Some(&out.path().join("fs")),
    )
    .await?;
    // Re-executed RUN steps make new files (new times), so check the files, not the digest.
    let _ = digest(&built_a)?;
    let fs = out.path().join("fs/data");
    assert_eq!(std::fs::read_to_string(fs.join("count"))?.trim(), "52");
    assert_eq!(std::fs::read_to_string(fs.join("b.copy"))?, "from b\n");
    assert!(std::fs::read_to_string(fs.join("a.txt"))?.ends_with("line 50\nfrom a\n"));
    assert!(!built_b.executed_runs().is_empty());
    let w = warnings(&built_b);
    assert!(w.iter().any(|m| m.contains("executing instead")), "{w:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_cache_cold_worker_runs_nothing() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let pool = format!("{}/kiln/pool", reg.addr());
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let a = worker(Some(pool.clone()))?;
    let built_a = build(&a, &base, dir.path(), CacheRequest::default()).await?;
    assert_eq!(built_a.executed_runs().len(), 4);
    let p = a.engine.pool().context("pool")?;
    p.wait_idle().await;
    let stats = p.stats();
    assert_eq!(stats.queue_depth, 0);
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.exported >= 4, "{stats:?}");
    // An explicit export to another repository of the same registry mounts the blobs the
    // pool already has instead of uploading them.
    let other = format!("{}/kiln/cache:mounted", reg.addr());
    build(
        &a,
        &base,
        dir.path(),
        CacheRequest {
            exports: vec![entry("registry", &[("ref", &other), ("mode", "max")])],
            imports: vec![],
        },
    )
    .await?;
    assert!(a.engine.cache_exporter().mounted() >= 4);

    let b = worker(Some(pool.clone()))?;
    let built_b = build(&b, &base, dir.path(), CacheRequest::default()).await?;
    assert!(
        built_b.executed_runs().is_empty(),
        "{:?} {:?}",
        built_b.executed_runs(),
        warnings(&built_b)
    );
    assert_eq!(digest(&built_b)?, digest(&built_a)?);
    assert!(warnings(&built_b).is_empty(), "{:?}", warnings(&built_b));
    // B exports nothing again: every hit came from the pool.
    let pb = b.engine.pool().context("pool")?;
    pb.wait_idle().await;
    assert_eq!(pb.stats().exported, 0, "{:?}", pb.stats());

    // A change: B re-runs only the dependents and exports those.
    std::fs::write(dir.path().join("b.txt"), "from b, changed\n")?;
    let changed = build(&b, &base, dir.path(), CacheRequest::default()).await?;
    assert_eq!(
        sorted_runs(&changed).len(),
        2,
        "{:?}",
        sorted_runs(&changed)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_registry_down_does_not_fail_or_corrupt() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let pool_reg = Registry::start()?;
    let pool = format!("{}/kiln/pool", pool_reg.addr());
    // The pool registry dies before the build's background export.
    drop(pool_reg);
    let w = worker(Some(pool))?;
    let req = || BuildRequest {
        frontend: Frontend::Llb(exec_definition(&base, "echo hi > /hi")),
        locals: HashMap::new(),
        deferred_locals: Default::default(),
        exports: vec![],
        session: None,
        secrets: HashMap::new(),
    };
    let first = run(&w, req(), CacheRequest::default()).await?;
    assert_eq!(first.vertices().values().filter(|v| !v.cached).count(), 2);
    assert!(
        warnings(&first)
            .iter()
            .any(|m| m.contains("connection refused")),
        "{:?}",
        warnings(&first)
    );
    let p = w.engine.pool().context("pool")?;
    p.wait_idle().await;
    let stats = p.stats();
    assert_eq!(stats.exported, 0, "{stats:?}");
    assert_eq!(stats.failed, 2, "{stats:?}");
    assert!(stats.retried >= 2, "{stats:?}");
    // The local store is intact: a rebuild is all cached.
    let again = run(&w, req(), CacheRequest::default()).await?;
    assert!(again.vertices().values().all(|v| v.cached));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_cache_in_the_pushed_image() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let df = r#"ARG BASE
FROM ${BASE}
COPY a.txt /a.txt
RUN cat /a.txt > /b.txt && echo one >> /b.txt
RUN echo two >> /b.txt
"#;
    let dir = project(df, &[("a.txt", "from a\n")])?;
    let name = format!("{}/kiln/app:1", reg.addr());
    let inline = CacheRequest {
        exports: vec![entry("inline", &[])],
        imports: vec![],
    };
    let a = worker(None)?;
    let built_a = run(
        &a,
        dockerfile_request(&base, dir.path(), vec![image(&name, true)]),
        inline.clone(),
    )
    .await?;
    assert_eq!(built_a.executed_runs().len(), 2);

    // B imports the image as a cache (and exports inline too, so its config is the same).
    let b = worker(None)?;
    let mut caches = inline;
    caches.imports = vec![entry("registry", &[("ref", &name)])];
    let built_b = run(
        &b,
        dockerfile_request(&base, dir.path(), vec![image("kiln/app:local", false)]),
        caches,
    )
    .await?;
    assert!(
        built_b.executed_runs().is_empty(),
        "{:?} {:?}",
        built_b.executed_runs(),
        warnings(&built_b)
    );
    assert_eq!(digest(&built_b)?, digest(&built_a)?);
    Ok(())
}

pub(super) fn dockerfile_request(
    base: &str,
    dir: &Path,
    exports: Vec<kiln_worker::control::ExportRequest>,
) -> BuildRequest {
    BuildRequest {
        frontend: Frontend::Dockerfile {
            opts: BuildOpts {
                filename: "Dockerfile".into(),
                build_args: BTreeMap::from([("BASE".to_string(), base.to_string())]),
                build_platform: Platform::host(),
                context_name: "context".into(),
                ..Default::default()
            },
            dockerfile_local: "dockerfile".into(),
        },
        locals: HashMap::from([
            ("context".to_string(), dir.to_path_buf()),
            ("dockerfile".to_string(), dir.to_path_buf()),
        ]),
        deferred_locals: Default::default(),
        exports,
        session: None,
        secrets: HashMap::new(),
    }
}

/// A loopback TCP proxy to a registry that records the request line of every request
/// (`GET /v2/… HTTP/1.1`). Requests with a body are relayed by `Content-Length`.
struct Proxy {
    addr: String,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
}

fn proxy(upstream: String) -> anyhow::Result<Proxy> {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(up) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (Ok(mut back), Ok(mut from_up)) = (client.try_clone(), up.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_up, &mut back);
                let _ = back.shutdown(std::net::Shutdown::Write);
            });
            let log = log.clone();
            std::thread::spawn(move || relay_requests(client, up, &log));
        }
    });
    Ok(Proxy { addr, requests })
}

fn relay_requests(
    client: std::net::TcpStream,
    mut up: std::net::TcpStream,
    log: &std::sync::Mutex<Vec<String>>,
) {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut len = 0u64;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = up.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(_) => {}
            }
            if head.is_empty() {
                if let Ok(mut l) = log.lock() {
                    l.push(line.trim_end().to_string());
                }
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            head.extend_from_slice(line.as_bytes());
            if line == "\r\n" {
                break;
            }
        }
        if up.write_all(&head).is_err() || std::io::copy(&mut (&mut r).take(len), &mut up).is_err()
        {
            return;
        }
    }
}

/// The pool tags (`kiln-<hex>`) and blob digests a worker's requests to `proxy` named.
fn pool_requests(proxy: &Proxy, method: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let requests = proxy
        .requests
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .clone();
    let path_of = |r: &String| -> Option<String> {
        let mut parts = r.split(' ');
        (parts.next() == Some(method)).then(|| parts.next().unwrap_or_default().to_string())
    };
    let paths: Vec<String> = requests.iter().filter_map(path_of).collect();
    let tags = paths
        .iter()
        .filter_map(|p| p.strip_prefix("/v2/kiln/pool/manifests/"))
        .filter(|t| !t.ends_with("warm-up"))
        .map(str::to_string)
        .collect();
    let blobs = paths
        .iter()
        .filter_map(|p| p.strip_prefix("/v2/kiln/pool/blobs/"))
        .map(str::to_string)
        .collect();
    Ok((tags, blobs))
}

/// The layer digests of every pool manifest (what A exported), and of the one tagged `tag`.
fn pool_layers(reg: &Registry, tag: &str) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let list = reg.get_authorized("/v2/kiln/pool/tags/list", &[])?;
    let list: serde_json::Value = serde_json::from_slice(&list.body)?;
    let (mut all, mut of_tag) = (HashSet::new(), HashSet::new());
    for t in list["tags"].as_array().context("tags")? {
        let t = t.as_str().context("tag")?;
        let m = reg.get_authorized(
            &format!("/v2/kiln/pool/manifests/{t}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        )?;
        let m: serde_json::Value = serde_json::from_slice(&m.body)?;
        for l in m["layers"].as_array().context("layers")? {
            let d = l["digest"].as_str().context("digest")?.to_string();
            if t == tag {
                of_tag.insert(d.clone());
            }
            all.insert(d);
        }
    }
    Ok((all, of_tag))
}

/// Which of the pool tags `tags` are alias objects (a cache config with `aliases`, no
/// records) and which are results.
fn split_aliases(reg: &Registry, tags: &[String]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut aliases, mut results) = (Vec::new(), Vec::new());
    for t in tags {
        let m = reg.get_authorized(
            &format!("/v2/kiln/pool/manifests/{t}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        )?;
        let m: serde_json::Value = serde_json::from_slice(&m.body)?;
        let config = m["annotations"]["dev.kiln.cacheconfig.v1"]
            .as_str()
            .with_context(|| format!("{t}: no embedded cache config: {m}"))?;
        let config: serde_json::Value = serde_json::from_str(config)?;
        if config["aliases"].as_array().is_some_and(|a| !a.is_empty()) {
            aliases.push(t.clone());
        } else {
            results.push(t.clone());
        }
    }
    Ok((aliases, results))
}

/// Issue 4's laziness: a cold worker never fetches the results of hits that only feed other
/// hits. The `COPY` keys come from the pool's aliases (definition key → cache key, so the
/// copied contents need not be hashed), the final RUN is a lazy hit, and the only blobs
/// fetched are the final result's, because the image exporter reads them; stage a's and
/// b's own layers (inputs of the `COPY --from` hits) are never fetched, no blob twice, and
/// the image digest is the first worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_hits_that_only_feed_hits_download_nothing() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let a = worker(Some(format!("{}/kiln/pool", reg.addr())))?;
    let built_a = build(&a, &base, dir.path(), CacheRequest::default()).await?;
    assert_eq!(built_a.executed_runs().len(), 4);
    let p = a.engine.pool().context("pool")?;
    p.wait_idle().await;
    assert!(p.stats().exported >= 4, "{:?}", p.stats());

    let proxy = proxy(reg.addr())?;
    let b = worker(Some(format!("{}/kiln/pool", proxy.addr)))?;
    let built_b = build(&b, &base, dir.path(), CacheRequest::default()).await?;
    assert!(
        built_b.executed_runs().is_empty(),
        "{:?}",
        warnings(&built_b)
    );
    assert_eq!(digest(&built_b)?, digest(&built_a)?);
    b.engine.pool().context("pool")?.wait_idle().await;

    let (tags, blobs) = pool_requests(&proxy, "GET")?;
    // Looked up: the four `COPY` keys by alias (two context copies, two `COPY --from`) and
    // one result, the final RUN's. Nothing else, though A exported every vertex.
    let (aliases, results) = split_aliases(&reg, &tags)?;
    assert_eq!(aliases.len(), 4, "{tags:?}");
    assert_eq!(results.len(), 1, "{tags:?}");
    let (all, final_layers) = pool_layers(&reg, &results[0])?;
    let intermediate: HashSet<String> = all.difference(&final_layers).cloned().collect();
    assert!(
        intermediate.len() >= 3,
        "stage a's and b's own layers: {intermediate:?}"
    );
    let distinct: HashSet<String> = blobs.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        blobs.len(),
        "a blob fetched twice: {blobs:?}"
    );
    assert!(
        distinct.is_subset(&final_layers),
        "fetched {distinct:?}, needed only the final result's {final_layers:?}"
    );
    assert!(distinct.is_disjoint(&intermediate), "{distinct:?}");
    Ok(())
}

/// A pool hit that nothing reads downloads nothing: a cold worker's build with no export
/// fetches no blob at all; pushing its image to the same registry afterwards fetches only
/// the final result's layers (never stage a's or b's), and the pushed image is A's.
/// A lazy result whose blob turns out corrupt when it is finally read fails the build
/// clearly and records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_pool_hit_fetches_only_what_is_read() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let a = worker(Some(format!("{}/kiln/pool", reg.addr())))?;
    let built_a = build(&a, &base, dir.path(), CacheRequest::default()).await?;
    a.engine.pool().context("pool")?.wait_idle().await;

    let proxy = proxy(reg.addr())?;
    let b = worker(Some(format!("{}/kiln/pool", proxy.addr)))?;
    let quiet = run(
        &b,
        dockerfile_request(&base, dir.path(), vec![]),
        CacheRequest::default(),
    )
    .await?;
    assert!(quiet.executed_runs().is_empty(), "{:?}", warnings(&quiet));
    let (tags, blobs) = pool_requests(&proxy, "GET")?;
    assert!(
        blobs.is_empty(),
        "a build that reads nothing fetched {blobs:?}"
    );
    let (_, results) = split_aliases(&reg, &tags)?;
    assert_eq!(results.len(), 1, "{tags:?}");

    // The same build, pushed to the same registry.
    let pushed = run(
        &b,
        dockerfile_request(
            &base,
            dir.path(),
            vec![image(&format!("{}/kiln/app:1", proxy.addr), true)],
        ),
        CacheRequest::default(),
    )
    .await?;
    assert!(pushed.executed_runs().is_empty(), "{:?}", warnings(&pushed));
    assert_eq!(digest(&pushed)?, digest(&built_a)?);
    let (_, blobs) = pool_requests(&proxy, "GET")?;
    let (all, final_layers) = pool_layers(&reg, &results[0])?;
    let fetched: HashSet<String> = blobs.iter().cloned().collect();
    assert!(!fetched.is_empty());
    assert!(
        fetched.is_subset(&final_layers),
        "fetched {fetched:?}, needed only {final_layers:?}"
    );
    let intermediate: HashSet<String> = all.difference(&final_layers).cloned().collect();
    assert!(!intermediate.is_empty() && fetched.is_disjoint(&intermediate));

    // A third worker: the final result's own top layer is corrupt in the registry (same
    // length, other bytes). Nothing reads it: the build succeeds. An export reads it: a
    // clear error naming the cache, and no local record of the result.
    let pulled_base = {
        let store = tempfile::tempdir()?;
        let content = Arc::new(kiln_worker::content::ContentStore::open(store.path())?);
        let resolver = kiln_worker::source::image::ImageResolver::new(Default::default(), content);
        resolver.resolve(&base, &Platform::host()).await?
    };
    let mut corrupted = 0;
    for d in &final_layers {
        if pulled_base.layers.iter().any(|b| &b.digest == d) {
            continue;
        }
        let path = reg.blob_path(d);
        let len = std::fs::metadata(&path)?.len() as usize;
        std::fs::write(&path, vec![b'x'; len])?;
        corrupted += 1;
    }
    assert!(corrupted >= 1);
    let c = worker(Some(format!("{}/kiln/pool", reg.addr())))?;
    let quiet = run(
        &c,
        dockerfile_request(&base, dir.path(), vec![]),
        CacheRequest::default(),
    )
    .await?;
    assert!(quiet.executed_runs().is_empty());
    let err = run(
        &c,
        dockerfile_request(&base, dir.path(), vec![image("kiln/app:2", false)]),
        CacheRequest::default(),
    )
    .await
    .err()
    .context("a corrupt lazy result must fail the export")?
    .to_string();
    assert!(
        err.contains("cannot be fetched") && err.contains("kiln/pool"),
        "{err}"
    );
    Ok(())
}

/// A lazy pool hit whose blob is corrupt when an executing op finally reads it is executed
/// after all (a warning says so) and the build is right: B's project differs from A's in
/// b.txt, so the `COPY --from=b` re-runs on the unchanged `COPY --from=a` result, a lazy
/// hit whose own layer is corrupt in the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_lazy_input_is_executed_instead() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    let base = base(&reg)?;
    let dir = project(MULTI, &[("a.txt", "from a\n"), ("b.txt", "from b\n")])?;
    let a = worker(Some(format!("{}/kiln/pool", reg.addr())))?;
    build(&a, &base, dir.path(), CacheRequest::default()).await?;
    a.engine.pool().context("pool")?.wait_idle().await;

    // The final result's chain is base, COPY --from=a, COPY --from=b, …: its second layer is
    // the `COPY --from=a` layer (the base image has one layer).
    let proxy = proxy(reg.addr())?;
    let probe = worker(Some(format!("{}/kiln/pool", proxy.addr)))?;
    run(
        &probe,
        dockerfile_request(&base, dir.path(), vec![]),
        CacheRequest::default(),
    )
    .await?;
    let (tags, _) = pool_requests(&proxy, "GET")?;
    let (_, results) = split_aliases(&reg, &tags)?;
    let m = reg.get_authorized(
        &format!("/v2/kiln/pool/manifests/{}", results[0]),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )?;
    let m: serde_json::Value = serde_json::from_slice(&m.body)?;
    let copy_a = m["layers"][1]["digest"]
        .as_str()
        .context("second layer")?
        .to_string();
    let path = reg.blob_path(&copy_a);
    let len = std::fs::metadata(&path)?.len() as usize;
    std::fs::write(&path, vec![b'x'; len])?;

    std::fs::write(dir.path().join("b.txt"), "from b, changed\n")?;
    let b = worker(Some(format!("{}/kiln/pool", reg.addr())))?;
    let out = tempfile::tempdir()?;
    let built = build_to(
        &b,
        &base,
        dir.path(),
        CacheRequest::default(),
        Some(&out.path().join("fs")),
    )
    .await?;
    let fs = out.path().join("fs/data");
    assert_eq!(std::fs::read_to_string(fs.join("count"))?.trim(), "52");
    assert_eq!(
        std::fs::read_to_string(fs.join("b.copy"))?,
        "from b, changed\n"
    );
    assert!(std::fs::read_to_string(fs.join("a.txt"))?.ends_with("line 50\nfrom a\n"));
    let w = warnings(&built);
    assert!(
        w.iter()
            .any(|m| m.contains("cannot be fetched") && m.contains("instead")),
        "{w:?}"
    );
    Ok(())
}
