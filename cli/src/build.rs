//! `kiln build`: flags (buildctl's and the docker-style short form) → an engine build
//! request; runs it embedded and writes the metadata file.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use clap::Args;
use kiln_cli::client;
use kiln_worker::cache::registry::CacheEntry;
use kiln_worker::control::{
    BuildRequest, CacheRequest, Engine, EngineConfig, ExportRequest, Frontend,
};
use kiln_worker::executor::Runtime;
use kiln_worker::frontend::BuildOpts;
use kiln_worker::llb::pb;
use kiln_worker::progress::Progress;
use kiln_worker::snapshot;
use kiln_worker::source::image::RegistryConfig;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::progress::{Mode, Renderer};

/// Flags of `kiln build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    conn: crate::conn::ConnArgs,
    /// State directory of the embedded engine.
    #[arg(long, env = "KILN_ROOT", default_value = "/var/lib/kiln")]
    root: PathBuf,
    /// OCI runtime for RUN steps: runc or crun.
    #[arg(long, default_value = "runc")]
    runtime: String,
    /// Most build steps running at once.
    #[arg(long)]
    max_parallelism: Option<usize>,
    /// Registry hosts (host:port) reached over plain HTTP (localhost always is).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Snapshotter: auto, overlayfs or native (copying).
    #[arg(long, default_value = "auto")]
    snapshotter: String,

    /// Frontend (`dockerfile.v0`); without it an LLB definition is read from stdin.
    #[arg(long)]
    frontend: Option<String>,
    /// Frontend option KEY=VALUE (target, filename, build-arg:K=V, label:K=V, platform, …).
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// Local directory NAME=DIR (context, dockerfile).
    #[arg(long = "local", value_name = "NAME=DIR")]
    locals: Vec<String>,
    /// Disable the cache for every step.
    #[arg(long)]
    no_cache: bool,
    /// Secret: id=ID[,src=FILE|,env=VAR].
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    secrets: Vec<String>,
    /// SSH agent for `RUN --mount=type=ssh`: `default` (or ID) forwards $SSH_AUTH_SOCK,
    /// ID=SOCKET another agent socket (buildctl syntax; key files are not supported yet).
    #[arg(long = "ssh", value_name = "ID[=SOCKET]")]
    ssh: Vec<String>,
    /// Output: type=image|oci|docker|local|tar[,key=value…].
    #[arg(long = "output", short = 'o', value_name = "type=TYPE,…")]
    outputs: Vec<String>,
    /// Write the exporter response (image digest, descriptor, names) as JSON here.
    #[arg(long)]
    metadata_file: Option<PathBuf>,
    /// Progress output: auto, tty, plain, rawjson, quiet.
    #[arg(long, default_value = "auto")]
    progress: String,
    /// Cache export: type=registry,ref=REF[,mode=min|max,…] or type=local,dest=DIR, or a
    /// bare REF (buildctl syntax; daemonless builds only for now).
    #[arg(long = "export-cache", value_name = "type=TYPE,…")]
    export_cache: Vec<String>,
    /// Cache import: type=registry,ref=REF or type=local,src=DIR, or a bare REF.
    #[arg(long = "import-cache", value_name = "type=TYPE,…")]
    import_cache: Vec<String>,

    /// Docker-style: the Dockerfile (default DIR/Dockerfile).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Docker-style: image name (repeatable); exports an image.
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Docker-style: stage to build.
    #[arg(long)]
    target: Option<String>,
    /// Docker-style: build argument K=V (K alone takes the value from the environment).
    #[arg(long = "build-arg", value_name = "K=V")]
    build_args: Vec<String>,
    /// Docker-style: target platform (os/arch[/variant]).
    #[arg(long)]
    platform: Option<String>,
    /// Docker-style: push the tagged image.
    #[arg(long)]
    push: bool,
    /// Docker-style: the build context directory.
    context: Option<PathBuf>,
}

/// Splits `k=v,k2=v2` (values may be quoted with `"`).
pub fn parse_csv(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        bail!("{s:?}: unterminated quote");
    }
    fields.push(cur);
    for f in fields {
        if f.is_empty() {
            continue;
        }
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| anyhow!("{s:?}: field {f:?} is not key=value"))?;
        let k = k.trim().to_string();
        if k.is_empty() {
            bail!("{s:?}: empty key");
        }
        if out.contains_key(&k) && k == "name" {
            // `name` may repeat in buildctl; join like a comma list.
            let prev: String = out.remove(&k).unwrap_or_default();
            out.insert(k, format!("{prev},{v}"));
        } else {
            out.insert(k, v.to_string());
        }
    }
    Ok(out)
}

fn split_kv<'a>(flag: &str, s: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    s.split_once('=')
        .ok_or_else(|| anyhow!("{flag} {s:?}: expected KEY=VALUE"))
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Turns flags into a build request, with the frontend attributes as sent on the wire.
pub fn request(args: &BuildArgs) -> anyhow::Result<(BuildRequest, BTreeMap<String, String>)> {
    let mut locals: HashMap<String, PathBuf> = HashMap::new();
    for l in &args.locals {
        let (k, v) = split_kv("--local", l)?;
        locals.insert(k.to_string(), absolute(Path::new(v))?);
    }
    let mut opts: BTreeMap<String, String> = BTreeMap::new();
    for o in &args.opts {
        match o.split_once('=') {
            Some((k, v)) => opts.insert(k.to_string(), v.to_string()),
            // `--opt build-arg:NAME` takes the value from the environment, or is dropped.
            None => match o.strip_prefix("build-arg:") {
                Some(name) => match std::env::var(name) {
                    Ok(v) => opts.insert(o.clone(), v),
                    Err(_) => None,
                },
                None => bail!("--opt {o:?}: expected KEY=VALUE"),
            },
        };
    }
    let mut frontend = args.frontend.clone();

    // Docker-style short form.
    if let Some(ctx) = &args.context {
        let ctx = absolute(ctx)?;
        locals.entry("context".into()).or_insert(ctx.clone());
        let (dir, name) = match &args.file {
            Some(f) => {
                let f = absolute(f)?;
                let dir = f.parent().map(Path::to_path_buf).unwrap_or(ctx.clone());
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "Dockerfile".into());
                (dir, name)
            }
            None => (ctx.clone(), "Dockerfile".to_string()),
        };
        locals.entry("dockerfile".into()).or_insert(dir);
        opts.entry("filename".into()).or_insert(name);
        frontend.get_or_insert_with(|| "dockerfile.v0".to_string());
    } else if args.file.is_some() {
        bail!("-f needs a context directory argument");
    }
    if let Some(t) = &args.target {
        opts.insert("target".into(), t.clone());
    }
    if let Some(p) = &args.platform {
        opts.insert("platform".into(), p.clone());
    }
    for a in &args.build_args {
        match a.split_once('=') {
            Some((k, v)) => {
                opts.insert(format!("build-arg:{k}"), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    opts.insert(format!("build-arg:{a}"), v);
                }
            }
        }
    }
    if args.no_cache {
        opts.insert("no-cache".into(), String::new());
    }

    let mut exports = Vec::new();
    for o in &args.outputs {
        exports.push(parse_output(o)?);
    }
    if !args.tags.is_empty() {
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), args.tags.join(","));
        if args.push {
            attrs.insert("push".to_string(), "true".to_string());
        }
        exports.push(ExportRequest {
            typ: "image".into(),
            attrs,
            dest: None,
        });
    } else if args.push {
        bail!("--push needs -t NAME");
    }
    let types: Vec<&str> = exports.iter().map(|e| e.typ.as_str()).collect();
    for (i, t) in types.iter().enumerate() {
        if types[..i].contains(t) && *t != "image" {
            bail!("duplicate --output type={t}");
        }
    }

    let mut secrets = HashMap::new();
    for s in &args.secrets {
        let attrs = parse_csv(s).with_context(|| format!("--secret {s:?}"))?;
        let id = attrs
            .get("id")
            .cloned()
            .ok_or_else(|| anyhow!("--secret {s:?}: id= is required"))?;
        let data = if let Some(src) = attrs.get("src").or_else(|| attrs.get("source")) {
            std::fs::read(src).with_context(|| format!("--secret id={id}: reading {src}"))?
        } else {
            let var = attrs.get("env").cloned().unwrap_or_else(|| id.clone());
            std::env::var(&var)
                .map(String::into_bytes)
                .map_err(|_| anyhow!("--secret id={id}: environment variable {var} is not set"))?
        };
        secrets.insert(id, data);
    }

    let frontend = match frontend.as_deref() {
        Some("dockerfile.v0") | Some("dockerfile") => {
            let build_opts = build_opts(&opts)?;
            for need in [build_opts.context_name.as_str(), "dockerfile"] {
                if !locals.contains_key(need) {
                    bail!("dockerfile.v0 needs --local {need}=DIR");
                }
            }
            Frontend::Dockerfile {
                opts: build_opts,
                dockerfile_local: opts
                    .get("dockerfilekey")
                    .cloned()
                    .unwrap_or_else(|| "dockerfile".into()),
            }
        }
        Some("gateway.v0") => {
            bail!("--frontend gateway.v0 is not supported (no frontend images); use dockerfile.v0")
        }
        Some(other) => bail!(
            "unknown frontend {other:?} (supported: dockerfile.v0, or none to read LLB from stdin)"
        ),
        None => {
            let mut stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!("no --frontend given and stdin is a terminal: pipe an LLB definition, or use --frontend dockerfile.v0 / kiln build DIR");
            }
            let mut bytes = Vec::new();
            stdin
                .read_to_end(&mut bytes)
                .context("reading LLB definition from stdin")?;
            let def = pb::Definition::decode(bytes.as_slice())
                .context("stdin is not a valid LLB definition (pb.Definition)")?;
            Frontend::Llb(def)
        }
    };
    Ok((
        BuildRequest {
            frontend,
            locals,
            deferred_locals: Default::default(),
            exports,
            session: None,
            secrets,
        },
        opts,
    ))
}

/// `--output type=…,k=v`.
pub fn parse_output(s: &str) -> anyhow::Result<ExportRequest> {
    let mut attrs = parse_csv(s).with_context(|| format!("--output {s:?}"))?;
    let typ = attrs
        .remove("type")
        .ok_or_else(|| anyhow!("--output {s:?}: type= is required"))?;
    let dest = attrs.remove("dest").map(PathBuf::from);
    match typ.as_str() {
        "image" | "registry" => {
            if typ == "registry" {
                attrs.insert("push".into(), "true".into());
            }
            Ok(ExportRequest {
                typ: "image".into(),
                attrs,
                dest: None,
            })
        }
        "oci" | "docker" | "local" | "tar" => {
            if dest.is_none() {
                bail!("--output {s:?}: dest= is required for type={typ}");
            }
            Ok(ExportRequest { typ, attrs, dest })
        }
        other => bail!(
            "--output {s:?}: unknown type {other:?} (image, registry, oci, docker, local, tar)"
        ),
    }
}

/// One `--export-cache` (`export`) or `--import-cache` value, as buildctl parses it: CSV
/// with `type=`; a value without `type=` is a legacy registry ref; exports without `mode`
/// get `mode=min`; local directories are made absolute.
pub fn parse_cache(s: &str, export: bool) -> anyhow::Result<CacheEntry> {
    let flag = if export {
        "--export-cache"
    } else {
        "--import-cache"
    };
    let mut attrs = if s.contains("type=") {
        parse_csv(s).with_context(|| format!("{flag} {s:?}"))?
    } else {
        if s.trim().is_empty() || s.contains(',') {
            bail!("{flag} {s:?}: expected type=TYPE,… or a registry reference");
        }
        BTreeMap::from([
            ("type".to_string(), "registry".to_string()),
            ("ref".to_string(), s.trim().to_string()),
        ])
    };
    let typ = attrs
        .remove("type")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("{flag} {s:?}: type= is required"))?;
    if export && !attrs.contains_key("mode") {
        attrs.insert("mode".into(), "min".into());
    }
    for key in ["dest", "src"] {
        if let Some(d) = attrs.get_mut(key) {
            *d = absolute(Path::new(d.as_str()))?
                .to_string_lossy()
                .into_owned();
        }
    }
    Ok(CacheEntry { typ, attrs })
}

/// The cache entries of a build; two exports of one type are refused, as BuildKit does.
pub fn cache_request(exports: &[String], imports: &[String]) -> anyhow::Result<CacheRequest> {
    let exports = exports
        .iter()
        .map(|s| parse_cache(s, true))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::new();
    for e in &exports {
        if !seen.insert(e.typ.as_str()) {
            bail!("--export-cache: duplicate cache exports of type {}", e.typ);
        }
    }
    let imports = imports
        .iter()
        .map(|s| parse_cache(s, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(CacheRequest { exports, imports })
}

/// Frontend options → `BuildOpts`.
pub fn build_opts(opts: &BTreeMap<String, String>) -> anyhow::Result<BuildOpts> {
    BuildOpts::from_attrs(opts).map_err(|e| anyhow!("--opt {e}"))
}

/// Runs `kiln build`.
pub async fn run(args: BuildArgs) -> anyhow::Result<()> {
    let caches = cache_request(&args.export_cache, &args.import_cache)?;
    let (mut req, attrs) = request(&args)?;
    let ssh = kiln_worker::session::sshforward::SshAgents::parse(&args.ssh)
        .map_err(anyhow::Error::msg)?;
    let stdout_used = req
        .exports
        .iter()
        .any(|e| e.dest.as_deref() == Some(Path::new("-")));
    let mode = Mode::parse(&args.progress)?;
    let (progress, rx) = Progress::channel();
    let renderer = Renderer::spawn(mode, rx);
    let res = match &args.conn.addr {
        Some(addr) => {
            let registry = RegistryConfig {
                insecure: args.insecure_registries.clone(),
                docker_config: None,
            };
            let session = Session { attrs, ssh };
            remote(&args.conn, addr, registry, req, caches, session, progress).await
        }
        None => {
            // Daemonless: the build reaches the agents directly.
            if !ssh.is_empty() {
                req.session = Some(std::sync::Arc::new(ssh));
            }
            embedded(&args, req, &caches, progress).await
        }
    };
    renderer.finish(res.is_ok()).await;
    let resp = res?;
    if let Some(path) = &args.metadata_file {
        let json = metadata_json(&resp);
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing metadata file {}", path.display()))?;
    }
    if !stdout_used {
        if let Some(d) = resp.get("containerimage.digest") {
            println!("{d}");
        }
    }
    Ok(())
}

/// What a daemon build's session carries besides the request: frontend attributes and
/// the SSH agents it forwards.
struct Session {
    attrs: BTreeMap<String, String>,
    ssh: kiln_worker::session::sshforward::SshAgents,
}

/// Builds on the daemon or gateway at `addr` through the [`kiln_cli::client`] library.
async fn remote(
    conn: &crate::conn::ConnArgs,
    addr: &str,
    registry: RegistryConfig,
    req: BuildRequest,
    cache: CacheRequest,
    session: Session,
    progress: Progress,
) -> anyhow::Result<BTreeMap<String, String>> {
    let frontend = match req.frontend {
        Frontend::Dockerfile { .. } => client::Frontend::Dockerfile,
        Frontend::Llb(def) => client::Frontend::Llb(def),
    };
    let opts = client::BuildOptions {
        frontend,
        frontend_attrs: session.attrs,
        locals: req.locals,
        secrets: req.secrets,
        ssh: session.ssh,
        registry,
        exports: req.exports,
        cache,
        shared_key: None,
        build_ref: None,
    };
    let client = conn.client(addr).await?;
    Ok(client.build(opts, progress).await?.exporter_response)
}

/// Builds with the engine inside this process.
async fn embedded(
    args: &BuildArgs,
    req: BuildRequest,
    caches: &CacheRequest,
    progress: Progress,
) -> anyhow::Result<BTreeMap<String, String>> {
    let runtime = match args.runtime.as_str() {
        "runc" => Runtime::Runc,
        "crun" => Runtime::Crun,
        other => bail!("--runtime {other:?}: expected runc or crun"),
    };
    let snapshotter = match args.snapshotter.as_str() {
        "auto" => None,
        "overlayfs" | "overlay" => Some(snapshot::Kind::Overlay),
        "native" | "copy" => Some(snapshot::Kind::Copy),
        other => bail!("--snapshotter {other:?}: expected auto, overlayfs or native"),
    };
    let mut config = EngineConfig {
        root: args.root.clone(),
        runtime,
        registry: RegistryConfig {
            insecure: args.insecure_registries.clone(),
            docker_config: None,
        },
        snapshotter,
        ..Default::default()
    };
    if let Some(n) = args.max_parallelism {
        config.max_parallelism = n;
    }
    let root = args.root.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::open(config))
        .await?
        .with_context(|| format!("opening state in {}", root.display()))?;
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    // Ctrl-C, and SIGTERM as `timeout`, CI runners and Kubernetes send it: cancel the build
    // so its containers are stopped and its mounts released before the process exits.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        c2.cancel();
    });
    Ok(engine
        .build_with_cache(req, caches, progress, cancel)
        .await?
        .exporter_response)
}

/// The exporter response as buildctl writes it: values that are base64 of a JSON object
/// are decoded.
pub fn metadata_json(resp: &BTreeMap<String, String>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in resp {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(v)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|j| j.is_object());
        m.insert(
            k.clone(),
            decoded.unwrap_or_else(|| serde_json::Value::String(v.clone())),
        );
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_outputs() -> anyhow::Result<()> {
        let o = parse_output("type=image,name=a/b:1,push=true")?;
        assert_eq!(o.typ, "image");
        assert_eq!(o.attrs.get("push").map(String::as_str), Some("true"));
        let o = parse_output("type=oci,dest=/tmp/x.tar")?;
        assert_eq!(o.dest.as_deref(), Some(Path::new("/tmp/x.tar")));
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("dest=/x").is_err());
        assert!(parse_output("type=bogus,dest=x").is_err());
        let q = parse_csv(r#"type=image,"name=a,b""#)?;
        assert_eq!(q.get("name").map(String::as_str), Some("a,b"));
        Ok(())
    }

    #[test]
    fn cache_flags_follow_buildctl() -> anyhow::Result<()> {
        let e = parse_cache("type=registry,ref=r.io/a/cache:1,mode=max", true)?;
        assert_eq!(e.typ, "registry");
        assert_eq!(
            e.attrs.get("ref").map(String::as_str),
            Some("r.io/a/cache:1")
        );
        assert_eq!(e.attrs.get("mode").map(String::as_str), Some("max"));
        // buildctl's default mode, and the legacy bare ref.
        let e = parse_cache("type=registry,ref=r.io/a/c", true)?;
        assert_eq!(e.attrs.get("mode").map(String::as_str), Some("min"));
        let e = parse_cache("r.io/a/c:2", true)?;
        assert_eq!((e.typ.as_str(), e.attrs.len()), ("registry", 2));
        let i = parse_cache("r.io/a/c:2", false)?;
        assert_eq!(i.attrs.get("ref").map(String::as_str), Some("r.io/a/c:2"));
        assert!(!i.attrs.contains_key("mode"));
        let l = parse_cache("type=local,src=rel/dir", false)?;
        assert!(Path::new(&l.attrs["src"]).is_absolute());
        assert!(parse_cache("mode=max,ref=x", true).is_err());
        assert!(parse_cache("type=registry,junk", true).is_err());
        let dup = cache_request(&["type=registry,ref=a/b".into(), "c/d".into()], &[]);
        assert!(dup
            .err()
            .is_some_and(|e| e.to_string().contains("duplicate")));
        let ok = cache_request(
            &["type=registry,ref=a/b".into(), "type=local,dest=/x".into()],
            &["a/b".into()],
        )?;
        assert_eq!((ok.exports.len(), ok.imports.len()), (2, 1));
        Ok(())
    }

    #[test]
    fn metadata_decodes_base64_json() {
        let mut m = BTreeMap::new();
        m.insert("containerimage.digest".into(), "sha256:ab".into());
        m.insert(
            "containerimage.descriptor".into(),
            base64::engine::general_purpose::STANDARD.encode(r#"{"digest":"sha256:ab"}"#),
        );
        let j = metadata_json(&m);
        assert_eq!(j["containerimage.digest"], "sha256:ab");
        assert_eq!(j["containerimage.descriptor"]["digest"], "sha256:ab");
    }

    #[test]
    fn build_opts_from_buildctl_opts() -> anyhow::Result<()> {
        let mut o = BTreeMap::new();
        o.insert("target".into(), "a".into());
        o.insert("build-arg:X".into(), "1".into());
        o.insert("platform".into(), "linux/arm64".into());
        let b = build_opts(&o)?;
        assert_eq!(b.target.as_deref(), Some("a"));
        assert_eq!(b.build_args.get("X").map(String::as_str), Some("1"));
        assert_eq!(
            b.platform.map(|p| p.to_string()).as_deref(),
            Some("linux/arm64")
        );
        o.insert("platform".into(), "linux/amd64,linux/arm64".into());
        assert!(build_opts(&o).is_err());
        Ok(())
    }
}
