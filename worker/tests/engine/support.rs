//! Helpers of the engine tests: a registry with the busybox base, an engine on a fresh
//! root, project directories, and a build call that collects progress.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, Context};
use kiln_e2e::registry::Registry;
use kiln_worker::control::{
    BuildRequest, BuildResponse, Engine, EngineConfig, ExportRequest, Frontend,
};
use kiln_worker::frontend::BuildOpts;
use kiln_worker::image::Platform;
use kiln_worker::progress::{Event, Progress, VertexState};
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub reg: Registry,
    pub base: String,
    _root: tempfile::TempDir,
    pub engine: Engine,
}

pub fn env() -> anyhow::Result<Env> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let base = format!("{}/kiln/base:1", reg.addr());
    let root = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        root: root.path().to_path_buf(),
        max_parallelism: 4,
        ..Default::default()
    })?;
    Ok(Env {
        reg,
        base,
        _root: root,
        engine,
    })
}

/// An env whose engine is opened with `config` (a root of the test's choosing, a GC
/// policy).
pub fn env_in(config: EngineConfig) -> anyhow::Result<Env> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let base = format!("{}/kiln/base:1", reg.addr());
    Ok(Env {
        reg,
        base,
        _root: tempfile::tempdir()?,
        engine: Engine::open(config)?,
    })
}

/// The same registry and base image, the engine closed and opened again with `config`.
pub fn reopen(env: Env, config: EngineConfig) -> anyhow::Result<Env> {
    let Env {
        reg,
        base,
        _root,
        engine,
    } = env;
    drop(engine);
    Ok(Env {
        reg,
        base,
        _root,
        engine: Engine::open(config)?,
    })
}

/// A project directory with a Dockerfile and files.
pub fn project(dockerfile: &str, files: &[(&str, &str)]) -> anyhow::Result<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    std::fs::write(d.path().join("Dockerfile"), dockerfile)?;
    for (p, c) in files {
        let path = d.path().join(p);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, c)?;
    }
    Ok(d)
}

pub struct Built {
    pub resp: BuildResponse,
    pub events: Vec<Event>,
}

impl Built {
    /// The last state of every vertex, by digest.
    pub fn vertices(&self) -> BTreeMap<String, VertexState> {
        let mut m = BTreeMap::new();
        for e in &self.events {
            if let Event::Vertex(v) = e {
                m.insert(v.digest.clone(), v.clone());
            }
        }
        m
    }

    /// RUN vertices that executed (not cached), by name.
    pub fn executed_runs(&self) -> Vec<String> {
        self.vertices()
            .values()
            .filter(|v| v.name.contains("RUN") && !v.cached && v.completed.is_some())
            .map(|v| v.name.clone())
            .collect()
    }
}

pub async fn build(
    env: &Env,
    dir: &Path,
    args: &[(&str, &str)],
    target: Option<&str>,
    exports: Vec<ExportRequest>,
) -> anyhow::Result<Built> {
    let mut build_args: BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    build_args
        .entry("BASE".into())
        .or_insert_with(|| env.base.clone());
    let opts = BuildOpts {
        filename: "Dockerfile".into(),
        target: target.map(str::to_string),
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
        secrets: HashMap::new(),
    };
    let (progress, mut rx) = Progress::channel();
    let res = env
        .engine
        .build(req, progress, CancellationToken::new())
        .await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    match res {
        Ok(resp) => Ok(Built { resp, events }),
        Err(e) => {
            let logs: String = events
                .iter()
                .filter_map(|e| match e {
                    Event::Log(l) => Some(String::from_utf8_lossy(&l.data).to_string()),
                    _ => None,
                })
                .collect();
            Err(anyhow!(kiln_worker::solver::error_chain(&e))).context(format!("logs:\n{logs}"))
        }
    }
}

pub fn image(name: &str, push: bool) -> ExportRequest {
    let mut attrs = BTreeMap::new();
    attrs.insert("name".to_string(), name.to_string());
    if push {
        attrs.insert("push".to_string(), "true".to_string());
    }
    ExportRequest {
        typ: "image".into(),
        attrs,
        dest: None,
    }
}

pub fn to(typ: &str, dest: &Path) -> ExportRequest {
    ExportRequest {
        typ: typ.into(),
        attrs: BTreeMap::new(),
        dest: Some(dest.to_path_buf()),
    }
}

/// An LLB definition: the image `base`, then `/bin/sh -c script` on it.
pub fn exec_definition(base: &str, script: &str) -> kiln_worker::llb::pb::Definition {
    use kiln_worker::llb::builder::{Builder, Output};
    use kiln_worker::llb::pb;
    let platform = Platform::host().to_pb();
    let mut b = Builder::new();
    let src = b.add(
        &pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("docker-image://{base}"),
                attrs: Default::default(),
            })),
            platform: Some(platform.clone()),
            constraints: Some(Default::default()),
            ..Default::default()
        },
        None,
    );
    let exec = b.add(
        &pb::Op {
            inputs: vec![pb::Input {
                digest: src,
                index: 0,
            }],
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    env: vec!["PATH=/bin".into()],
                    cwd: "/".into(),
                    ..Default::default()
                }),
                mounts: vec![pb::Mount {
                    input: 0,
                    dest: "/".into(),
                    output: 0,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            platform: Some(platform),
            constraints: Some(Default::default()),
        },
        None,
    );
    b.marshal(&Output {
        digest: exec,
        index: 0,
    })
}
