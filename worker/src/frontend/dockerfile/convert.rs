//! Instructions → LLB definition and image config.
//!
//! Stages are converted on demand, starting from the target: a stage is converted only
//! when the target (or a stage it needs) refers to it through `FROM`, `COPY --from` or
//! `RUN --mount=from=`, so unreachable stages cost nothing and need no base image.
//! [`required_images`] runs the same conversion with placeholder images and records which
//! images it asked for; [`convert`] then runs it with the resolved ones.

use std::collections::HashMap;

use crate::frontend::{
    BuildOpts, Converted, Error, ImageRef, ResolvedImageMeta, ResolvedImages, Result,
};
use crate::image::{HealthConfig, History, ImageConfigFile, Platform};
use crate::llb::builder::{Builder, Output};
use crate::llb::pb;
use crate::source::local::patterns::{parse_dockerignore, PatternMatcher};

use super::instructions::{parse_node, split_csv, CmdLine, CopyArgs, Instr, Instruction};
use super::parser::{self, Heredoc};
use super::shell::{Env, Lexer};

/// `PATH` a stage gets when its image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// ARGs BuildKit keeps out of the build environment.
const NON_ENV_ARGS: &[&str] = &["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];
const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const PLACEHOLDER_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// The images a Dockerfile refers to for these options (FROM, COPY --from=image and
/// RUN --mount=from=image), for the stages the target needs, in first-use order.
///
/// Base images are not known yet, so what depends on their configs (ONBUILD triggers,
/// variables from their ENV) is not seen; [`missing_images`] finds those once the
/// first round is resolved.
pub fn required_images(src: &str, opts: &BuildOpts) -> Result<Vec<ImageRef>> {
    let empty = ResolvedImages::new();
    let mut c = Converter::new(src, opts, Some(&empty), true)?;
    c.run()?;
    Ok(c.requested)
}

/// The images [`convert`] would still ask for given the already resolved `images`
/// (empty when `convert` can run). Use it after resolving [`required_images`] until it
/// returns nothing, so images named by base images' ONBUILD triggers are found too.
pub fn missing_images(
    src: &str,
    opts: &BuildOpts,
    images: &ResolvedImages,
) -> Result<Vec<ImageRef>> {
    let mut c = Converter::new(src, opts, Some(images), true)?;
    c.run()?;
    Ok(c.requested
        .into_iter()
        .filter(|r| !images.contains_key(r))
        .collect())
}

/// Converts a Dockerfile to LLB and an image config.
pub fn convert(src: &str, opts: &BuildOpts, images: &ResolvedImages) -> Result<Converted> {
    let mut c = Converter::new(src, opts, Some(images), false)?;
    let (root, config) = c.run()?;
    let definition = match root {
        Some(out) => c.builder.marshal(&out),
        // A scratch result with nothing done to it: an empty definition, as BuildKit sends.
        None => pb::Definition::default(),
    };
    Ok(Converted {
        definition,
        config,
        warnings: c.warnings,
    })
}

/// Docker's normalized form of an image reference (`busybox` →
/// `docker.io/library/busybox:latest`); `None` when it is not a valid reference.
pub fn normalize_reference(reference: &str) -> Option<String> {
    crate::image::ImageName::parse(reference)
        .ok()
        .map(|n| n.to_string())
}

// === impl Converter ===

struct StageDef {
    name: Option<String>,
    image: String,
    platform: Option<String>,
    line: usize,
    instrs: Vec<Instr>,
}

#[derive(Clone)]
struct StageResult {
    root: Option<Output>,
    config: ImageConfigFile,
    platform: Platform,
    /// The build environment (image env, ENV and ARG values), inherited by `FROM <stage>`.
    build_env: Vec<(String, String)>,
    /// Declared ARGs, inherited by `FROM <stage>`.
    args: Vec<(String, Option<String>)>,
}

/// Variables of a build environment, in definition order.
type BuildEnv = Vec<(String, String)>;
/// Declared ARGs and their values (None when declared without one).
type DeclaredArgs = Vec<(String, Option<String>)>;

/// Where a copy or bind mount reads from.
#[derive(Clone)]
enum SourceKind {
    Context,
    Stage,
    Image,
    Heredoc,
    Remote,
}

struct Converter<'a> {
    opts: &'a BuildOpts,
    file: String,
    lexer: Lexer,
    escape: char,
    stages: Vec<StageDef>,
    /// Global ARGs: declared name → value (None when declared without a value).
    meta_args: Vec<(String, Option<String>)>,
    auto_args: Env,
    target_platform: Platform,
    images: Option<&'a ResolvedImages>,
    /// Record every image asked for, using placeholders for unknown ones.
    collect: bool,
    requested: Vec<ImageRef>,
    builder: Builder,
    context: Option<Output>,
    exclude_patterns: Vec<String>,
    done: Vec<Option<StageResult>>,
    /// Build args some ARG declared (for the "not consumed" warning).
    used_args: std::collections::BTreeSet<String>,
    /// Lines of the instruction being converted (for source locations).
    cur_lines: Option<(usize, usize)>,
    /// A stage conversion is running (nested needs go through `need`).
    driving: bool,
    /// The stage (and the line that needs it) the running conversion is waiting for.
    need: Option<(usize, usize)>,
    warnings: Vec<String>,
}

/// Per-stage state while its instructions are dispatched.
struct Stage {
    index: usize,
    prefix: String,
    total: usize,
    /// Progress steps named so far (`[name step/total]`).
    step: usize,
    /// Dispatching the base image's ONBUILD triggers.
    onbuild: bool,
    /// Image env, ENV and ARG values in definition order (BuildKit's state env).
    build_env: Vec<(String, String)>,
    root: Option<Output>,
    config: ImageConfigFile,
    platform: Platform,
    args: Vec<(String, Option<String>)>,
    shell: Vec<String>,
    cwd: String,
    cmd_set: bool,
}

impl Stage {
    /// Variables for expansion: the build environment.
    fn env(&self) -> Env {
        self.build_env.iter().cloned().collect()
    }

    /// Sets a variable in the build environment (in place if already set).
    fn set_build_env(&mut self, key: &str, value: &str) {
        match self.build_env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.build_env.push((key.to_string(), value.to_string())),
        }
    }

    /// ARG values only (for `--from`, which must not depend on the base image).
    fn arg_env(&self) -> Env {
        self.args
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())))
            .collect()
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.set_build_env(key, value);
        let entry = format!("{key}={value}");
        let env = &mut self.config.config.env;
        match env
            .iter_mut()
            .find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == key)
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }

    /// The exec environment: the build environment, `PATH` defaulted.
    fn run_env(&self) -> Vec<String> {
        let mut env: Vec<String> = self
            .build_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !self.build_env.iter().any(|(k, _)| k == "PATH") {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        env
    }

    /// The next progress name: `[stage  3/12] TEXT`, as BuildKit numbers steps.
    fn name(&mut self, text: &str) -> String {
        self.step += 1;
        step_name(&self.prefix, self.step, self.total, self.onbuild, text)
    }

    fn history(&mut self, created_by: String, empty_layer: bool) {
        self.config.history.push(History {
            created: None,
            created_by,
            comment: HISTORY_COMMENT.to_string(),
            empty_layer,
        });
    }

    fn root_index(&self) -> i64 {
        if self.root.is_some() {
            0
        } else {
            -1
        }
    }
}

/// `[prefix step/total] text`, the step right-aligned to the width of `total`.
fn step_name(prefix: &str, step: usize, total: usize, onbuild: bool, text: &str) -> String {
    if total == 0 {
        return text.to_string();
    }
    let width = total.to_string().len();
    let onbuild = if onbuild { "ONBUILD " } else { "" };
    format!("{prefix}{step:>width$}/{total}] {onbuild}{text}")
}

/// The keyword of a command line in upper case (`run x` → `RUN x`).
fn uppercase_cmd(text: &str) -> String {
    match text.split_once(' ') {
        Some((k, rest)) => format!("{} {rest}", k.to_ascii_uppercase()),
        None => text.to_ascii_uppercase(),
    }
}

/// Go's `%q` of a string.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quote_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", items.join(" "))
}

/// Go's `%v` of a string slice: `[a b]`.
fn go_list(v: &[String]) -> String {
    format!("[{}]", v.join(" "))
}

/// Go's `time.Duration` formatting (`1m30s`, `500ms`, `0s`).
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".to_string();
    }
    let neg = ns < 0;
    let u = ns.unsigned_abs();
    let frac = |v: u64, unit: u64| -> String {
        let whole = v / unit;
        let rem = v % unit;
        if rem == 0 {
            return whole.to_string();
        }
        let digits = unit.to_string().len() - 1;
        let f = format!("{rem:0digits$}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    let s = if u < 1_000 {
        format!("{u}ns")
    } else if u < 1_000_000 {
        format!("{}µs", frac(u, 1_000))
    } else if u < 1_000_000_000 {
        format!("{}ms", frac(u, 1_000_000))
    } else {
        let h = u / 3_600_000_000_000;
        let m = (u / 60_000_000_000) % 60;
        let sec = frac(u % 60_000_000_000, 1_000_000_000);
        if h > 0 {
            format!("{h}h{m}m{sec}s")
        } else if m > 0 {
            format!("{m}m{sec}s")
        } else {
            format!("{sec}s")
        }
    };
    if neg {
        format!("-{s}")
    } else {
        s
    }
}

fn platform_args(prefix: &str, p: &Platform, env: &mut Env) {
    env.insert(format!("{prefix}PLATFORM"), p.to_string());
    env.insert(format!("{prefix}OS"), p.os.clone());
    env.insert(format!("{prefix}ARCH"), p.architecture.clone());
    env.insert(format!("{prefix}VARIANT"), p.variant.clone());
}

fn join_path(base: &str, p: &str) -> String {
    use crate::source::local::patterns::clean_path;
    if p.starts_with('/') {
        clean_path(p)
    } else {
        clean_path(&format!(
            "{}/{}",
            if base.is_empty() { "/" } else { base },
            p
        ))
    }
}

fn is_remote(src: &str) -> bool {
    let l = src.to_ascii_lowercase();
    l.starts_with("http://")
        || l.starts_with("https://")
        || l.starts_with("git@")
        || l.starts_with("git://")
}

fn parse_octal(s: &str) -> Option<u32> {
    if s.is_empty() {
        return None;
    }
    let v = u32::from_str_radix(s, 8).ok()?;
    (v <= 0o7777).then_some(v)
}

fn parse_size(s: &str) -> Option<i64> {
    let l = s.trim().to_ascii_lowercase();
    let digits = l.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &l[digits.len()..];
    let n: f64 = digits.parse().ok()?;
    let mult: f64 = match unit {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = n * mult;
    (v >= 0.0 && v < i64::MAX as f64).then_some(v as i64)
}

fn user_opt(part: &str, base_index: i64) -> pb::UserOpt {
    let user = match part.parse::<u32>() {
        Ok(id) => pb::user_opt::User::ById(id),
        Err(_) => pb::user_opt::User::ByName(pb::NamedUserOpt {
            name: part.to_string(),
            input: base_index,
        }),
    };
    pb::UserOpt { user: Some(user) }
}

fn chown_opt(chown: &str, base_index: i64) -> Option<pb::ChownOpt> {
    if chown.is_empty() {
        return None;
    }
    let (u, g) = match chown.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (chown, None),
    };
    Some(pb::ChownOpt {
        user: (!u.is_empty()).then(|| user_opt(u, base_index)),
        group: g.filter(|g| !g.is_empty()).map(|g| user_opt(g, base_index)),
    })
}

/// `--chown=0:0`, for copies from the context.
fn root_owner() -> pb::ChownOpt {
    let root = || pb::UserOpt {
        user: Some(pb::user_opt::User::ById(0)),
    };
    pb::ChownOpt {
        user: Some(root()),
        group: Some(root()),
    }
}

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl<'a> Converter<'a> {
    fn new(
        src: &str,
        opts: &'a BuildOpts,
        images: Option<&'a ResolvedImages>,
        collect: bool,
    ) -> Result<Converter<'a>> {
        let file = if opts.filename.is_empty() {
            "Dockerfile".to_string()
        } else {
            opts.filename.clone()
        };
        let at = |line: usize, message: String| Error::Dockerfile {
            file: file.clone(),
            line,
            message,
        };
        let parsed = parser::parse(src).map_err(|e| at(e.line, e.message))?;
        let mut warnings: Vec<String> = parsed.warnings.clone();
        let lexer = Lexer::new(parsed.escape);
        let mut stages: Vec<StageDef> = Vec::new();
        let mut global_args = Vec::new();
        for node in &parsed.nodes {
            let instr = parse_node(node, parsed.escape).map_err(|e| at(e.line, e.message))?;
            match (&instr.kind, stages.last_mut()) {
                (
                    Instruction::From {
                        image,
                        name,
                        platform,
                    },
                    _,
                ) => {
                    if let Some(n) = name {
                        if stages.iter().any(|s| s.name.as_deref() == Some(n)) {
                            return Err(at(instr.line, format!("duplicate stage name {n:?}")));
                        }
                    }
                    stages.push(StageDef {
                        name: name.clone(),
                        image: image.clone(),
                        platform: platform.clone(),
                        line: instr.line,
                        instrs: Vec::new(),
                    });
                }
                (_, Some(stage)) => stage.instrs.push(instr),
                (Instruction::Arg(_), None) => global_args.push(instr),
                (_, None) => {
                    return Err(at(
                        instr.line,
                        "no build stage in current context: instructions must follow FROM"
                            .to_string(),
                    ))
                }
            }
        }
        if stages.is_empty() {
            return Err(Error::General {
                file,
                message: if parsed.nodes.is_empty() {
                    "the Dockerfile cannot be empty".to_string()
                } else {
                    "dockerfile contains no stages to build".to_string()
                },
            });
        }
        let target_platform = opts
            .platform
            .clone()
            .unwrap_or_else(|| opts.build_platform.clone());
        let mut auto_args = Env::new();
        platform_args("TARGET", &target_platform, &mut auto_args);
        platform_args("BUILD", &opts.build_platform, &mut auto_args);
        let mut c = Converter {
            opts,
            file,
            lexer,
            escape: parsed.escape,
            done: vec![None; stages.len()],
            used_args: Default::default(),
            cur_lines: None,
            driving: false,
            need: None,
            stages,
            meta_args: Vec::new(),
            auto_args,
            target_platform,
            images,
            collect,
            requested: Vec::new(),
            builder: Builder::new(),
            context: None,
            exclude_patterns: opts
                .dockerignore
                .as_deref()
                .map(parse_dockerignore)
                .unwrap_or_default(),
            warnings: Vec::new(),
        };
        // Global ARGs, in order; each default sees the ones before it.
        for instr in global_args {
            if let Instruction::Arg(args) = &instr.kind {
                for (k, default) in args {
                    c.used_args.insert(k.clone());
                    let value = match (opts.build_args.get(k), default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(c.expand(&c.meta_env(), d, instr.line)?),
                        (None, None) => None,
                    };
                    c.meta_args.retain(|(n, _)| n != k);
                    c.meta_args.push((k.clone(), value));
                }
            }
        }
        let file = c.file.clone();
        c.builder.set_source(&file, src.as_bytes());
        if let Err(e) = PatternMatcher::new(&c.exclude_patterns) {
            return Err(Error::General {
                file: ".dockerignore".to_string(),
                message: e.to_string(),
            });
        }
        c.warnings.append(&mut warnings);
        Ok(c)
    }

    fn err(&self, line: usize, message: impl Into<String>) -> Error {
        Error::Dockerfile {
            file: self.file.clone(),
            line,
            message: message.into(),
        }
    }

    /// Variables for FROM: automatic platform args, then global ARGs.
    fn meta_env(&self) -> Env {
        let mut env = self.auto_args.clone();
        for (k, v) in &self.meta_args {
            if let Some(v) = v {
                env.insert(k.clone(), v.clone());
            }
        }
        env
    }

    fn expand(&self, env: &Env, word: &str, line: usize) -> Result<String> {
        self.lexer
            .process_word(word, env)
            .map_err(|m| self.err(line, m))
    }

    fn expand_words(&self, env: &Env, word: &str, line: usize) -> Result<Vec<String>> {
        self.lexer
            .process_words(word, env)
            .map_err(|m| self.err(line, m))
    }

    fn stage_by_name(&self, name: &str) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        self.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
    }

    fn run(&mut self) -> Result<(Option<Output>, ImageConfigFile)> {
        let target = match &self.opts.target {
            Some(t) if !t.is_empty() => self.stage_by_name(t).ok_or_else(|| Error::General {
                file: self.file.clone(),
                message: format!("target stage {t:?} could not be found"),
            })?,
            _ => self.stages.len() - 1,
        };
        let result = self.stage(target, self.stages[target].line)?;
        let unused: Vec<&String> = self
            .opts
            .build_args
            .keys()
            .filter(|k| !self.used_args.contains(*k) && !k.starts_with("BUILDKIT_"))
            .collect();
        if !unused.is_empty() {
            self.warnings.push(format!(
                "one or more build-args {unused:?} were not consumed"
            ));
        }
        let mut config = result.config;
        for (k, v) in &self.opts.labels {
            config.config.labels.insert(k.clone(), v.clone());
        }
        Ok((result.root, config))
    }

    fn metadata(&self, name: String, command: Option<&str>) -> pb::OpMetadata {
        let mut description = HashMap::new();
        description.insert("llb.customname".to_string(), name);
        if let Some(c) = command {
            description.insert(
                "com.docker.dockerfile.v1.command".to_string(),
                c.to_string(),
            );
        }
        pb::OpMetadata {
            ignore_cache: self.opts.no_cache,
            description,
            ..Default::default()
        }
    }

    fn add_op(
        &mut self,
        inputs: &[Output],
        op: pb::op::Op,
        platform: &Platform,
        md: pb::OpMetadata,
    ) -> Output {
        let op = pb::Op {
            inputs: inputs
                .iter()
                .map(|o| pb::Input {
                    digest: o.digest.clone(),
                    index: o.index,
                })
                .collect(),
            op: Some(op),
            platform: Some(platform.to_pb()),
            constraints: Some(Default::default()),
        };
        let digest = self.builder.add(&op, Some(md));
        self.locate(&digest);
        Output { digest, index: 0 }
    }

    /// Ties an op to the lines of the instruction being converted.
    fn locate(&mut self, digest: &str) {
        if let Some((start, end)) = self.cur_lines {
            self.builder.add_location(digest, start, end);
        }
    }

    /// The build context source op (shared by every use).
    /// The source op of an `ADD` URL or git repository, and the path to copy from it: a
    /// git checkout's root, or the downloaded file (named after the destination when it
    /// is not a directory, else after the URL).
    fn remote_source(&mut self, src: &str, dest: &str) -> (Output, String) {
        let mut attrs = HashMap::new();
        let (identifier, path, shown) = match crate::source::git::parse_url(src) {
            Some((remote, reference, subdir)) => {
                attrs.insert("git.fullurl".to_string(), remote.clone());
                let shown = crate::source::git::redact(src);
                (
                    crate::source::git::identifier(&remote, &reference, subdir.as_deref()),
                    "/".to_string(),
                    shown,
                )
            }
            None => {
                let from_url = src
                    .split(['?', '#'])
                    .next()
                    .unwrap_or(src)
                    .rsplit('/')
                    .next()
                    .filter(|s| !s.is_empty() && !src.ends_with("://"))
                    .unwrap_or("index")
                    .to_string();
                let name = if dest.ends_with('/') {
                    from_url
                } else {
                    dest.rsplit('/')
                        .next()
                        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
                        .map(str::to_string)
                        .unwrap_or(from_url)
                };
                attrs.insert("http.filename".to_string(), name.clone());
                (
                    src.to_string(),
                    format!("/{name}"),
                    crate::source::git::redact(src),
                )
            }
        };
        let op = pb::Op {
            inputs: Vec::new(),
            op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
            platform: None,
            constraints: Some(Default::default()),
        };
        let md = self.metadata(shown, None);
        let digest = self.builder.add(&op, Some(md));
        (Output { digest, index: 0 }, path)
    }

    fn context(&mut self) -> Output {
        if let Some(c) = &self.context {
            return c.clone();
        }
        let name = if self.opts.context_name.is_empty() {
            "context".to_string()
        } else {
            self.opts.context_name.clone()
        };
        let mut attrs = HashMap::new();
        attrs.insert("local.sharedkeyhint".to_string(), name.clone());
        if !self.exclude_patterns.is_empty() {
            attrs.insert(
                "local.excludepatterns".to_string(),
                json_list(&self.exclude_patterns),
            );
        }
        let op = pb::Op {
            inputs: Vec::new(),
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("local://{name}"),
                attrs,
            })),
            platform: None,
            constraints: Some(Default::default()),
        };
        let md = self.metadata("[internal] load build context".to_string(), None);
        let digest = self.builder.add(&op, Some(md));
        let out = Output { digest, index: 0 };
        self.context = Some(out.clone());
        out
    }

    /// Looks an image up (or records the request) and returns its meta.
    fn image_meta(
        &mut self,
        reference: &str,
        platform: &Platform,
        line: usize,
    ) -> Result<(ResolvedImageMeta, bool)> {
        if normalize_reference(reference).is_none() {
            return Err(self.err(line, format!("invalid reference format: {reference:?}")));
        }
        let key = ImageRef {
            reference: reference.to_string(),
            platform: platform.clone(),
        };
        if self.collect && !self.requested.contains(&key) {
            self.requested.push(key.clone());
        }
        match self.images.and_then(|i| i.get(&key)) {
            Some(meta) => Ok((meta.clone(), true)),
            None if self.collect => Ok((
                ResolvedImageMeta {
                    canonical: normalize_reference(reference).unwrap_or_default(),
                    digest: PLACEHOLDER_DIGEST.to_string(),
                    config: ImageConfigFile::default(),
                },
                false,
            )),
            None => Err(self.err(
                line,
                format!("image {reference:?} for {platform} was not resolved"),
            )),
        }
    }

    fn image_op(&mut self, meta: &ResolvedImageMeta, platform: &Platform, name: String) -> Output {
        let pinned = if meta.canonical.contains('@') {
            meta.canonical.clone()
        } else {
            format!("{}@{}", meta.canonical, meta.digest)
        };
        let op = pb::Op {
            inputs: Vec::new(),
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("docker-image://{pinned}"),
                attrs: HashMap::new(),
            })),
            platform: Some(platform.to_pb()),
            constraints: Some(Default::default()),
        };
        let name = name.replace("{image}", &pinned);
        let md = self.metadata(name, None);
        let digest = self.builder.add(&op, None);
        self.builder.set_metadata_if_absent(&digest, md);
        self.locate(&digest);
        Output { digest, index: 0 }
    }

    fn prefix(&self, index: usize) -> String {
        if self.stages.len() == 1 {
            return "[".to_string();
        }
        match &self.stages[index].name {
            Some(n) => format!("[{n} "),
            None => format!("[stage-{index} "),
        }
    }

    /// The result of stage `index`, converting it (once) if needed.
    ///
    /// Conversion never recurses: a stage that needs an unconverted stage stops with
    /// `need` set, the driver converts the needed stage and then starts the
    /// first one again. Stack use is therefore bounded whatever the input, and the
    /// abandoned attempt leaves at most unreachable ops, which `marshal` drops.
    fn stage(&mut self, index: usize, from_line: usize) -> Result<StageResult> {
        if let Some(done) = &self.done[index] {
            return Ok(done.clone());
        }
        if self.driving {
            self.need = Some((index, from_line));
            return Err(Error::General {
                file: self.file.clone(),
                message: format!("internal: stage {index} deferred"),
            });
        }
        self.driving = true;
        let res = self.drive(index, from_line);
        self.driving = false;
        res
    }

    fn drive(&mut self, target: usize, from_line: usize) -> Result<StageResult> {
        let mut stack: Vec<usize> = vec![target];
        while let Some(&top) = stack.last() {
            if self.done[top].is_some() {
                stack.pop();
                continue;
            }
            match self.convert_stage(top) {
                Ok(res) => {
                    self.done[top] = Some(res);
                    stack.pop();
                }
                Err(e) => {
                    let Some((j, line)) = self.need.take() else {
                        return Err(e);
                    };
                    if stack.contains(&j) {
                        return Err(self.err(
                            line,
                            format!(
                                "circular dependency detected on stage: {}",
                                self.stage_label(j)
                            ),
                        ));
                    }
                    stack.push(j);
                }
            }
        }
        self.done[target].clone().ok_or_else(|| {
            self.err(
                from_line,
                format!("stage {} was not converted", self.stage_label(target)),
            )
        })
    }

    /// One attempt at converting stage `index`.
    fn convert_stage(&mut self, index: usize) -> Result<StageResult> {
        let line = self.stages[index].line;
        self.cur_lines = Some((line, line));
        let meta_env = self.meta_env();
        let explicit_platform = match self.stages[index].platform.clone() {
            Some(p) => {
                let text = self.expand(&meta_env, &p, line)?;
                if text.is_empty() {
                    return Err(self.err(line, format!("empty platform value from expression {p}")));
                }
                Some(
                    Platform::parse(&text)
                        .ok_or_else(|| self.err(line, format!("failed to parse platform {p}")))?,
                )
            }
            None => None,
        };
        let raw_image = self.stages[index].image.clone();
        let image = self.expand(&meta_env, &raw_image, line)?;
        if image.is_empty() {
            return Err(self.err(line, format!("base name ({raw_image}) should not be blank")));
        }
        let prefix = self.prefix(index);
        let counted = self.stages[index]
            .instrs
            .iter()
            .filter(|i| {
                matches!(
                    i.kind,
                    Instruction::Run { .. } | Instruction::Copy(_) | Instruction::Workdir(_)
                )
            })
            .count();
        let base_stage = self.stage_by_name(&image).filter(|j| *j < index);
        let is_scratch = image.eq_ignore_ascii_case("scratch");
        let mut step = 0;
        let mut inherited: Option<(BuildEnv, DeclaredArgs)> = None;
        let (root, mut config, platform) = if is_scratch {
            let platform = explicit_platform.unwrap_or_else(|| self.target_platform.clone());
            (None, ImageConfigFile::default(), platform)
        } else if let Some(j) = base_stage {
            let base = self.stage(j, line)?;
            let platform = explicit_platform.unwrap_or(base.platform);
            inherited = Some((base.build_env, base.args));
            (base.root, base.config, platform)
        } else {
            let platform = explicit_platform.unwrap_or_else(|| self.target_platform.clone());
            let (meta, known) = self.image_meta(&image, &platform, line)?;
            // BuildKit names the FROM step before it counts the base's triggers.
            let total = counted + 1;
            step = 1;
            let name = step_name(&prefix, 1, total, false, "FROM {image}");
            // An image without layers is scratch (BuildKit checks the same way).
            let layerless = known
                && meta.config.rootfs.diff_ids.is_empty()
                && meta.config.history.iter().all(|h| h.empty_layer);
            let out = if layerless {
                None
            } else {
                Some(self.image_op(&meta, &platform, name))
            };
            (out, meta.config, platform)
        };
        let has_from_step = !is_scratch && base_stage.is_none();
        config.architecture = platform.architecture.clone();
        config.os = platform.os.clone();
        config.variant = (!platform.variant.is_empty()).then(|| platform.variant.clone());
        config.rootfs.diff_ids.clear();
        config.created = None;
        let triggers = std::mem::take(&mut config.config.on_build);
        let total = counted + usize::from(has_from_step) + triggers.len();
        let mut st = Stage {
            index,
            prefix,
            total,
            step,
            onbuild: false,
            build_env: Vec::new(),
            root,
            shell: if config.config.shell.is_empty() {
                vec!["/bin/sh".to_string(), "-c".to_string()]
            } else {
                config.config.shell.clone()
            },
            cwd: if config.config.working_dir.is_empty() {
                "/".to_string()
            } else {
                config.config.working_dir.clone()
            },
            config,
            platform,
            args: Vec::new(),
            cmd_set: false,
        };
        if !st
            .config
            .config
            .env
            .iter()
            .any(|kv| kv.starts_with("PATH="))
        {
            st.config.config.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        match inherited {
            Some((build_env, args)) => {
                st.build_env = build_env;
                st.args = args;
            }
            None => {
                st.build_env = st
                    .config
                    .config
                    .env
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                        (k.to_string(), v.to_string())
                    })
                    .collect();
            }
        }
        // ONBUILD triggers of the base run first, named after the FROM step.
        for trigger in triggers {
            let parsed = parser::parse(&trigger).map_err(|e| {
                self.err(line, format!("onbuild trigger {trigger:?}: {}", e.message))
            })?;
            for node in &parsed.nodes {
                let mut instr = parse_node(node, parsed.escape).map_err(|e| {
                    self.err(line, format!("onbuild trigger {trigger:?}: {}", e.message))
                })?;
                if matches!(
                    instr.kind,
                    Instruction::From { .. } | Instruction::OnBuild(_)
                ) {
                    return Err(
                        self.err(line, format!("onbuild trigger {trigger:?} is not allowed"))
                    );
                }
                instr.line = line;
                instr.end_line = line;
                st.onbuild = true;
                let res = self.dispatch(&mut st, &instr);
                st.onbuild = false;
                res?;
            }
        }
        let instrs = std::mem::take(&mut self.stages[index].instrs);
        let mut res = Ok(());
        for instr in &instrs {
            res = self.dispatch(&mut st, instr);
            if res.is_err() {
                break;
            }
        }
        self.stages[index].instrs = instrs;
        res?;
        let result = StageResult {
            root: st.root,
            config: st.config,
            platform: st.platform,
            build_env: st.build_env,
            args: st.args,
        };
        Ok(result)
    }

    fn stage_label(&self, index: usize) -> String {
        self.stages[index]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{index}"))
    }

    /// Resolves a `--from` value to a source output (None = scratch) and its kind.
    fn source_for_from(
        &mut self,
        st: &Stage,
        from: &str,
        line: usize,
    ) -> Result<(Option<Output>, SourceKind)> {
        let from = self.expand(&st.arg_env(), from, line)?;
        if from.is_empty() {
            return Err(self.err(line, "--from requires a value"));
        }
        let target = if let Ok(n) = from.parse::<usize>() {
            if n >= self.stages.len() {
                return Err(self.err(
                    line,
                    format!("invalid from flag value {from}: stage index out of range"),
                ));
            }
            Some(n)
        } else {
            self.stage_by_name(&from)
        };
        match target {
            Some(j) if j == st.index => Err(self.err(
                line,
                format!("invalid from flag value {from}: refers to current build stage"),
            )),
            Some(j) => Ok((self.stage(j, line)?.root, SourceKind::Stage)),
            None => {
                let (meta, _) = self.image_meta(&from, &st.platform, line)?;
                let out = self.image_op(&meta, &st.platform, "FROM {image}".to_string());
                Ok((Some(out), SourceKind::Image))
            }
        }
    }

    /// The progress name of an instruction: variables expanded for display, keyword in
    /// upper case, step prefix.
    fn step_name(&self, st: &mut Stage, instr: &Instr, suffix: &str) -> String {
        let text = format!("{}{suffix}", instr.original);
        st.name(&uppercase_cmd(&self.lexer.display(&text, &st.env())))
    }

    fn dispatch(&mut self, st: &mut Stage, instr: &Instr) -> Result<()> {
        let line = instr.line;
        self.cur_lines = Some((instr.line, instr.end_line));
        let env = st.env();
        match &instr.kind {
            Instruction::From { .. } => Err(self.err(line, "unexpected FROM")),
            Instruction::Arg(args) => {
                let mut parts = Vec::new();
                for (k, default) in args {
                    self.used_args.insert(k.clone());
                    let default = default
                        .as_ref()
                        .map(|d| self.expand(&st.env(), d, line))
                        .transpose()?;
                    // History shows the declaration, not the value a build-arg gave it.
                    parts.push(match &default {
                        Some(d) => format!("{k}={d}"),
                        None => k.clone(),
                    });
                    let value = match (self.opts.build_args.get(k), default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(d),
                        (None, None) => self
                            .meta_args
                            .iter()
                            .find(|(n, _)| n == k)
                            .and_then(|(_, v)| v.clone())
                            .or_else(|| self.auto_args.get(k).cloned()),
                    };
                    if let Some(v) = &value {
                        if !NON_ENV_ARGS.contains(&k.as_str()) {
                            st.set_build_env(k, v);
                        }
                    }
                    st.args.push((k.clone(), value));
                }
                st.history(format!("ARG {}", parts.join(" ")), true);
                Ok(())
            }
            Instruction::Env(pairs) => {
                let mut parts = Vec::new();
                let mut set = Vec::new();
                for (k, v) in pairs {
                    let k = self.expand(&env, k, line)?;
                    let v = self.expand(&env, v, line)?;
                    if k.is_empty() {
                        return Err(self.err(line, "ENV names can not be blank"));
                    }
                    parts.push(format!("{k}={v}"));
                    set.push((k, v));
                }
                for (k, v) in set {
                    st.set_env(&k, &v);
                }
                st.history(format!("ENV {}", parts.join(" ")), true);
                Ok(())
            }
            Instruction::Label(pairs) => {
                let mut parts = Vec::new();
                for (k, v) in pairs {
                    let k = self.expand(&env, k, line)?;
                    let v = self.expand(&env, v, line)?;
                    if k.is_empty() {
                        return Err(self.err(line, "LABEL names can not be blank"));
                    }
                    parts.push(format!("{k}={v}"));
                    st.config.config.labels.insert(k, v);
                }
                st.history(format!("LABEL {}", parts.join(" ")), true);
                Ok(())
            }
            Instruction::Maintainer(m) => {
                st.config
                    .config
                    .labels
                    .insert("maintainer".to_string(), m.clone());
                st.config
                    .extra
                    .insert("author".to_string(), serde_json::Value::String(m.clone()));
                st.history(format!("MAINTAINER {m}"), true);
                Ok(())
            }
            Instruction::Run {
                cmd,
                mounts,
                network,
            } => self.dispatch_run(st, instr, cmd, mounts, network.as_deref()),
            Instruction::Copy(c) => self.dispatch_copy(st, instr, c),
            Instruction::Workdir(p) => {
                let p = self.expand(&env, p, line)?;
                let wd = join_path(&st.cwd, &p);
                st.cwd = wd.clone();
                st.config.config.working_dir = wd.clone();
                let with_layer = wd != "/";
                if with_layer {
                    let mkdir = pb::FileAction {
                        input: st.root_index(),
                        secondary_input: -1,
                        output: 0,
                        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                            path: wd.clone(),
                            mode: 0o755,
                            make_parents: true,
                            owner: chown_opt(&st.config.config.user, st.root_index()),
                            timestamp: -1,
                        })),
                    };
                    let inputs: Vec<Output> = st.root.iter().cloned().collect();
                    let name = self.step_name(st, instr, "");
                    let md = self.metadata(name, Some(&instr.original));
                    let out = self.add_op(
                        &inputs,
                        pb::op::Op::File(pb::FileOp {
                            actions: vec![mkdir],
                        }),
                        &st.platform,
                        md,
                    );
                    st.root = Some(out);
                }
                st.history(format!("WORKDIR {wd}"), !with_layer);
                Ok(())
            }
            Instruction::User(u) => {
                let u = self.expand(&env, u, line)?;
                st.config.config.user = u.clone();
                st.history(format!("USER {u}"), true);
                Ok(())
            }
            Instruction::Expose(ports) => {
                let mut keys = Vec::new();
                for p in ports {
                    for w in self.expand_words(&env, p, line)? {
                        let (port, proto) = match w.split_once('/') {
                            Some((p, proto)) => (p.to_string(), proto.to_ascii_lowercase()),
                            None => (w.clone(), "tcp".to_string()),
                        };
                        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
                            return Err(self.err(line, format!("invalid proto: {proto}")));
                        }
                        let (lo, hi) = match port.split_once('-') {
                            Some((a, b)) => (a.to_string(), b.to_string()),
                            None => (port.clone(), port.clone()),
                        };
                        let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) else {
                            return Err(self.err(line, format!("invalid port: {w:?}")));
                        };
                        if hi < lo {
                            return Err(self.err(line, format!("invalid port range: {w:?}")));
                        }
                        for n in lo..=hi {
                            let key = format!("{n}/{proto}");
                            st.config
                                .config
                                .exposed_ports
                                .insert(key.clone(), serde_json::json!({}));
                            keys.push(key);
                        }
                    }
                }
                st.history(format!("EXPOSE {}", go_list(&keys)), true);
                Ok(())
            }
            Instruction::Volume(vols) => {
                let mut out = Vec::new();
                for v in vols {
                    let v = self.expand(&env, v, line)?;
                    if v.trim().is_empty() {
                        return Err(self.err(line, "VOLUME specified can not be an empty string"));
                    }
                    st.config
                        .config
                        .volumes
                        .insert(v.clone(), serde_json::json!({}));
                    out.push(v);
                }
                st.history(format!("VOLUME {}", go_list(&out)), true);
                Ok(())
            }
            Instruction::Entrypoint(c) => {
                let args = self.cmd_args(st, c);
                st.config.config.entrypoint = Some(args.clone());
                if !st.cmd_set {
                    st.config.config.cmd = None;
                }
                st.history(format!("ENTRYPOINT {}", go_quote_list(&args)), true);
                Ok(())
            }
            Instruction::Cmd(c) => {
                let args = self.cmd_args(st, c);
                st.config.config.cmd = Some(args.clone());
                st.config.config.args_escaped = true;
                st.cmd_set = true;
                st.history(format!("CMD {}", go_quote_list(&args)), true);
                Ok(())
            }
            Instruction::Shell(v) => {
                st.shell = v.clone();
                st.config.config.shell = v.clone();
                st.history(format!("SHELL {}", go_list(v)), true);
                Ok(())
            }
            Instruction::Healthcheck(h) => {
                let test = match &h.cmd {
                    None => vec!["NONE".to_string()],
                    Some(CmdLine::Shell(s)) => vec!["CMD-SHELL".to_string(), s.clone()],
                    Some(CmdLine::Exec(v)) => {
                        let mut t = vec!["CMD".to_string()];
                        t.extend(v.iter().cloned());
                        t
                    }
                };
                let created_by = format!(
                    "HEALTHCHECK {{Test:{} Interval:{} Timeout:{} StartPeriod:{} StartInterval:{} Retries:{}}}",
                    go_list(&test),
                    go_duration(h.interval),
                    go_duration(h.timeout),
                    go_duration(h.start_period),
                    go_duration(h.start_interval),
                    h.retries
                );
                st.config.config.healthcheck = Some(HealthConfig {
                    test,
                    interval: h.interval,
                    timeout: h.timeout,
                    start_period: h.start_period,
                    start_interval: h.start_interval,
                    retries: h.retries,
                });
                st.history(created_by, true);
                Ok(())
            }
            Instruction::StopSignal(s) => {
                let s = self.expand(&env, s, line)?;
                if !is_signal(&s) {
                    return Err(self.err(line, format!("Invalid signal: {s}")));
                }
                st.config.config.stop_signal = s.clone();
                st.history(format!("STOPSIGNAL {s}"), true);
                Ok(())
            }
            Instruction::OnBuild(t) => {
                // Stored for children; BuildKit writes no history entry for it.
                st.config.config.on_build.push(t.clone());
                Ok(())
            }
        }
    }

    /// Docker's predefined proxy ARGs, usable without a declaration; they go to
    /// `proxy_env` so they stay out of the history and the cache key.
    fn proxy_env(&mut self) -> Option<pb::ProxyEnv> {
        let mut any = false;
        let mut get = |upper: &str| -> String {
            let lower = upper.to_ascii_lowercase();
            for k in [upper, lower.as_str()] {
                if let Some(v) = self.opts.build_args.get(k) {
                    self.used_args.insert(k.to_string());
                    any = true;
                    return v.clone();
                }
            }
            String::new()
        };
        let p = pb::ProxyEnv {
            http_proxy: get("HTTP_PROXY"),
            https_proxy: get("HTTPS_PROXY"),
            ftp_proxy: get("FTP_PROXY"),
            no_proxy: get("NO_PROXY"),
            all_proxy: get("ALL_PROXY"),
        };
        any.then_some(p)
    }

    fn cmd_args(&self, st: &Stage, c: &CmdLine) -> Vec<String> {
        match c {
            CmdLine::Exec(v) => v.clone(),
            CmdLine::Shell(s) => {
                let mut a = st.shell.clone();
                a.push(s.clone());
                a
            }
        }
    }

    /// A scratch FileOp holding one heredoc body as `/<name>`.
    fn mkfile_op(&mut self, st: &Stage, h: &Heredoc, data: String, mode: i32) -> Output {
        let action = pb::FileAction {
            input: -1,
            secondary_input: -1,
            output: 0,
            action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                path: format!("/{}", h.name),
                mode,
                data: data.into_bytes(),
                owner: None,
                timestamp: -1,
            })),
        };
        let md = self.metadata("[internal] preparing inline document".to_string(), None);
        self.add_op(
            &[],
            pb::op::Op::File(pb::FileOp {
                actions: vec![action],
            }),
            &st.platform,
            md,
        )
    }

    fn dispatch_run(
        &mut self,
        st: &mut Stage,
        instr: &Instr,
        cmd: &CmdLine,
        mount_flags: &[String],
        network: Option<&str>,
    ) -> Result<()> {
        let line = instr.line;
        let env = st.env();
        let mut inputs: Vec<Output> = st.root.iter().cloned().collect();
        let mut extra: Vec<pb::Mount> = Vec::new();
        let mut name_suffix = String::new();
        let mut secret_env: Vec<pb::SecretEnv> = Vec::new();
        let with_shell = |cmd: String| {
            let mut a = st.shell.clone();
            a.push(cmd);
            a
        };
        let args: Vec<String> = match cmd {
            CmdLine::Exec(v) => v.clone(),
            CmdLine::Shell(s) if !instr.heredocs.is_empty() => {
                let single = instr.heredocs.len() == 1
                    && super::parser::heredoc_markers(s, self.escape).len() == 1
                    && s.split_whitespace().count() == 1;
                if single {
                    let h = &instr.heredocs[0];
                    let summary = h.content.trim();
                    let mut lines = summary.lines();
                    name_suffix = format!(" ({}", lines.next().unwrap_or_default());
                    if lines.next().is_some() {
                        name_suffix.push_str("...");
                    }
                    name_suffix.push(')');
                    if h.content.starts_with("#!") {
                        // A script with its own interpreter: mount it and exec it.
                        let script = self.mkfile_op(st, h, h.content.clone(), 0o755);
                        inputs.push(script);
                        extra.push(pb::Mount {
                            input: inputs.len() as i64 - 1,
                            selector: "/".to_string(),
                            dest: "/dev/pipes/".to_string(),
                            output: -1,
                            readonly: true,
                            mount_type: pb::MountType::Bind as i32,
                            ..Default::default()
                        });
                        vec![format!("/dev/pipes/{}", h.name)]
                    } else {
                        with_shell(h.content.clone())
                    }
                } else {
                    // The shell runs the heredocs itself.
                    let mut script = s.clone();
                    for h in &instr.heredocs {
                        script.push('\n');
                        script.push_str(&h.content);
                        script.push_str(&h.name);
                    }
                    with_shell(script)
                }
            }
            CmdLine::Shell(s) => with_shell(s.clone()),
        };
        let name = self.step_name(st, instr, &name_suffix);
        let mut ssh_sockets = Vec::new();
        for m in mount_flags {
            let m = self.expand(&env, m, line)?;
            if let Some(mut mount) = self.parse_mount(st, &m, line, &mut inputs, &mut secret_env)? {
                if mount.mount_type == pb::MountType::Ssh as i32 {
                    if mount.dest.is_empty() {
                        mount.dest = format!("/run/buildkit/ssh_agent.{}", ssh_sockets.len());
                    }
                    ssh_sockets.push(mount.dest.clone());
                }
                extra.push(mount);
            }
        }
        let mut run_env = st.run_env();
        // As BuildKit's LLB client does: the first agent socket is SSH_AUTH_SOCK unless the
        // stage sets it.
        if let Some(first) = ssh_sockets.first() {
            if !run_env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
                run_env.push(format!("SSH_AUTH_SOCK={first}"));
            }
        }
        extra.sort_by(|a, b| a.dest.cmp(&b.dest));
        let mut mounts = vec![pb::Mount {
            input: st.root_index(),
            selector: String::new(),
            dest: "/".to_string(),
            output: 0,
            ..Default::default()
        }];
        mounts.extend(extra);
        let network = match network.map(|n| self.expand(&env, n, line)).transpose()? {
            None => pb::NetMode::Unset,
            Some(n) => match n.as_str() {
                "default" => pb::NetMode::Unset,
                "none" => pb::NetMode::None,
                "host" => pb::NetMode::Host,
                other => return Err(self.err(line, format!("unsupported network mode {other:?}"))),
            },
        };
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: args.clone(),
                env: run_env,
                cwd: st.cwd.clone(),
                user: st.config.config.user.clone(),
                proxy_env: self.proxy_env(),
                // As BuildKit's LLB client sets on every exec: mount-point directories
                // the run had to create (and their created parents) are removed after.
                remove_mount_stubs_recursive: true,
                ..Default::default()
            }),
            mounts,
            network: network as i32,
            secretenv: secret_env,
            ..Default::default()
        };
        let md = self.metadata(name, Some(&instr.original));
        let out = self.add_op(&inputs, pb::op::Op::Exec(exec), &st.platform, md);
        st.root = Some(out);
        // History like BuildKit: `RUN |N K=V … args # buildkit`, values from the build env.
        let mut words: Vec<String> = Vec::new();
        let declared: Vec<String> = st
            .args
            .iter()
            .map(|(k, v)| {
                let v = env
                    .get(k)
                    .cloned()
                    .or_else(|| v.clone())
                    .unwrap_or_default();
                format!("{k}={v}")
            })
            .collect();
        if !declared.is_empty() {
            words.push(format!("|{}", declared.len()));
            words.extend(declared);
        }
        words.extend(args);
        st.history(format!("RUN {} # buildkit", words.join(" ")), false);
        Ok(())
    }

    fn parse_mount(
        &mut self,
        st: &Stage,
        value: &str,
        line: usize,
        inputs: &mut Vec<Output>,
        secret_env: &mut Vec<pb::SecretEnv>,
    ) -> Result<Option<pb::Mount>> {
        let mut typ = "bind".to_string();
        let mut target = None;
        let mut source = None;
        let mut from = None;
        let mut readonly = None;
        let mut id = None;
        let mut sharing = pb::CacheSharingOpt::Shared;
        let mut mode = None;
        let mut uid = None;
        let mut gid = None;
        let mut required = false;
        let mut size = 0i64;
        let mut env_name: Option<String> = None;
        let bad = |msg: String| self.err(line, msg);
        for (k, v) in split_csv(value) {
            let val = v.clone().unwrap_or_default();
            let flag = |v: &Option<String>| match v.as_deref() {
                None | Some("true") | Some("1") => Ok(true),
                Some("false") | Some("0") => Ok(false),
                Some(o) => Err(format!("invalid value for {k}: {o}")),
            };
            match k.as_str() {
                "type" => typ = val.to_ascii_lowercase(),
                "target" | "dst" | "destination" => target = Some(val),
                "source" | "src" => source = Some(val),
                "from" => from = Some(val),
                "readonly" | "ro" => readonly = Some(flag(&v).map_err(bad)?),
                "readwrite" | "rw" => readonly = Some(!flag(&v).map_err(bad)?),
                "id" => id = Some(val),
                "sharing" => {
                    sharing = match val.as_str() {
                        "shared" => pb::CacheSharingOpt::Shared,
                        "private" => pb::CacheSharingOpt::Private,
                        "locked" => pb::CacheSharingOpt::Locked,
                        o => return Err(bad(format!("unsupported sharing value {o:?}"))),
                    }
                }
                "mode" => {
                    mode = Some(
                        parse_octal(&val).ok_or_else(|| bad(format!("invalid mode {val:?}")))?,
                    )
                }
                "uid" => {
                    uid = Some(
                        val.parse::<u32>()
                            .map_err(|_| bad(format!("invalid uid {val:?}")))?,
                    )
                }
                "gid" => {
                    gid = Some(
                        val.parse::<u32>()
                            .map_err(|_| bad(format!("invalid gid {val:?}")))?,
                    )
                }
                "required" => required = flag(&v).map_err(bad)?,
                "env" => env_name = Some(val),
                "size" => {
                    size = parse_size(&val).ok_or_else(|| bad(format!("invalid size {val:?}")))?
                }
                other => {
                    return Err(bad(format!("unexpected key '{other}' in '{value}'")));
                }
            }
        }
        let abs_target = |t: &str| join_path(&st.cwd, t);
        match typ.as_str() {
            "bind" => {
                let Some(t) = target else {
                    return Err(bad("mount target is required".to_string()));
                };
                let (src, _) = match &from {
                    None => (Some(self.context()), SourceKind::Context),
                    Some(f) => self.source_for_from(st, f, line)?,
                };
                let input = match src {
                    Some(o) => {
                        inputs.push(o);
                        inputs.len() as i64 - 1
                    }
                    None => -1,
                };
                let selector = match source.as_deref() {
                    None | Some("") | Some("/") | Some(".") => String::new(),
                    Some(s) => join_path("/", s),
                };
                Ok(Some(pb::Mount {
                    input,
                    selector,
                    dest: abs_target(&t),
                    output: -1,
                    readonly: readonly.unwrap_or(true),
                    mount_type: pb::MountType::Bind as i32,
                    ..Default::default()
                }))
            }
            "cache" => {
                let Some(t) = target else {
                    return Err(bad("mount target is required".to_string()));
                };
                if from.is_some() || source.is_some() {
                    return Err(bad(
                        "cache mounts with from/source are not supported".to_string()
                    ));
                }
                let dest = abs_target(&t);
                // Ownership or mode for a new cache: BuildKit seeds it from a directory
                // made in scratch and mounts that directory.
                let (input, selector) = if uid.is_some() || gid.is_some() || mode.is_some() {
                    let by_id = |id: u32| pb::UserOpt {
                        user: Some(pb::user_opt::User::ById(id)),
                    };
                    let mkdir = pb::FileAction {
                        input: -1,
                        secondary_input: -1,
                        output: 0,
                        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                            path: "/cache".to_string(),
                            mode: mode.unwrap_or(0o755) as i32,
                            make_parents: true,
                            owner: Some(pb::ChownOpt {
                                user: Some(by_id(uid.unwrap_or(0))),
                                group: Some(by_id(gid.unwrap_or(0))),
                            }),
                            timestamp: -1,
                        })),
                    };
                    let md = self.metadata(
                        "[internal] settings cache mount permissions".to_string(),
                        None,
                    );
                    let out = self.add_op(
                        &[],
                        pb::op::Op::File(pb::FileOp {
                            actions: vec![mkdir],
                        }),
                        &st.platform,
                        md,
                    );
                    inputs.push(out);
                    (inputs.len() as i64 - 1, "/cache".to_string())
                } else {
                    (-1, String::new())
                };
                Ok(Some(pb::Mount {
                    input,
                    selector,
                    dest: dest.clone(),
                    output: -1,
                    readonly: readonly.unwrap_or(false),
                    mount_type: pb::MountType::Cache as i32,
                    cache_opt: Some(pb::CacheOpt {
                        id: id.filter(|i| !i.is_empty()).unwrap_or(dest),
                        sharing: sharing as i32,
                    }),
                    ..Default::default()
                }))
            }
            "tmpfs" => {
                let Some(t) = target else {
                    return Err(bad("mount target is required".to_string()));
                };
                Ok(Some(pb::Mount {
                    input: -1,
                    dest: abs_target(&t),
                    output: -1,
                    mount_type: pb::MountType::Tmpfs as i32,
                    tmpfs_opt: Some(pb::TmpfsOpt { size }),
                    ..Default::default()
                }))
            }
            "secret" => {
                // BuildKit: `source` names the secret over `id`; the target's base name
                // when neither is given. `env=NAME` sets a variable, and then a file is
                // mounted only when a target is given.
                let named = source.or(id).filter(|i| !i.is_empty());
                let id = match (named, &target) {
                    (Some(i), _) => i,
                    (None, Some(t)) => t.rsplit('/').next().unwrap_or_default().to_string(),
                    (None, None) => {
                        return Err(bad("secret mount requires an id or a target".to_string()))
                    }
                };
                if id.is_empty() {
                    return Err(bad("secret mount requires an id".to_string()));
                }
                if let Some(name) = env_name.filter(|n| !n.is_empty()) {
                    secret_env.push(pb::SecretEnv {
                        id: id.clone(),
                        name,
                        optional: !required,
                    });
                    if target.is_none() {
                        return Ok(None);
                    }
                }
                let dest = match target {
                    Some(t) => abs_target(&t),
                    None => format!("/run/secrets/{}", id.rsplit('/').next().unwrap_or(&id)),
                };
                Ok(Some(pb::Mount {
                    input: -1,
                    dest,
                    output: -1,
                    readonly: true,
                    mount_type: pb::MountType::Secret as i32,
                    secret_opt: Some(pb::SecretOpt {
                        id,
                        uid: uid.unwrap_or(0),
                        gid: gid.unwrap_or(0),
                        mode: mode.unwrap_or(0o400),
                        optional: !required,
                    }),
                    ..Default::default()
                }))
            }
            "ssh" => {
                // The agent socket; an empty dest gets BuildKit's default
                // (`/run/buildkit/ssh_agent.N`) in dispatch_run.
                let id = id
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| "default".into());
                Ok(Some(pb::Mount {
                    input: -1,
                    dest: target.map(|t| abs_target(&t)).unwrap_or_default(),
                    output: -1,
                    readonly: true,
                    mount_type: pb::MountType::Ssh as i32,
                    ssh_opt: Some(pb::SshOpt {
                        id,
                        uid: uid.unwrap_or(0),
                        gid: gid.unwrap_or(0),
                        mode: mode.unwrap_or(0o600),
                        optional: !required,
                    }),
                    ..Default::default()
                }))
            }
            other => Err(bad(format!("unsupported mount type {other:?}"))),
        }
    }

    fn dispatch_copy(&mut self, st: &mut Stage, instr: &Instr, c: &CopyArgs) -> Result<()> {
        let line = instr.line;
        let env = st.env();
        let kw = if c.add { "ADD" } else { "COPY" };
        let dest_raw = self.expand(&env, &c.dest, line)?;
        if c.srcs.len() > 1 && !dest_raw.ends_with('/') {
            return Err(self.err(
                line,
                format!("When using {kw} with more than one source file, the destination must be a directory and end with a /"),
            ));
        }
        let mut dest = join_path(&st.cwd, &dest_raw);
        if (dest_raw.ends_with('/')
            || dest_raw == "."
            || dest_raw.ends_with("/.")
            || dest_raw.is_empty())
            && !dest.ends_with('/')
        {
            dest.push('/');
        }
        let (mode, mode_str) = match &c.chmod {
            None => (-1, String::new()),
            Some(m) => {
                let m = self.expand(&env, m, line)?;
                match u32::from_str_radix(&m, 8) {
                    Ok(v) if v <= 0o7777 => (v as i32, String::new()),
                    _ if m.chars().all(|c| c.is_ascii_digit()) || !is_symbolic_mode(&m) => {
                        return Err(self.err(
                            line,
                            format!("invalid chmod parameter: '{m}'. it should be octal string and between 0 and 07777"),
                        ))
                    }
                    _ => (-1, m),
                }
            }
        };
        let chown_text = match &c.chown {
            None => None,
            Some(ch) => Some(self.expand(&env, ch, line)?),
        };
        let chown = chown_text
            .as_deref()
            .and_then(|ch| chown_opt(ch, st.root_index()));
        let exclude = c
            .exclude
            .iter()
            .map(|e| self.expand(&env, e, line))
            .collect::<Result<Vec<_>>>()?;
        // The shared source for non-heredoc paths.
        let shared: Option<(Option<Output>, SourceKind)> = match &c.from {
            Some(f) => Some(self.source_for_from(st, f, line)?),
            None => None,
        };
        let name = self.step_name(st, instr, "");
        let mut inputs: Vec<Output> = st.root.iter().cloned().collect();
        let base_index = st.root_index();
        let mut sources: Vec<(String, i64, SourceKind)> = Vec::new();
        let escape = self.escape;
        let heredoc_for = |src: &str| -> Option<&Heredoc> {
            let (_, _, hname, _) = super::parser::heredoc_markers(src, escape).pop()?;
            instr.heredocs.iter().find(|h| h.name == hname)
        };
        let index_of = |inputs: &mut Vec<Output>, o: Option<Output>| -> i64 {
            match o {
                None => -1,
                Some(o) => match inputs.iter().position(|x| *x == o) {
                    Some(i) => i as i64,
                    None => {
                        inputs.push(o);
                        inputs.len() as i64 - 1
                    }
                },
            }
        };
        let mut shown_paths = Vec::new();
        let mut shown_heredocs = Vec::new();
        for raw in &c.srcs {
            if let Some(h) = heredoc_for(raw) {
                let data = if h.expand {
                    self.lexer
                        .expand_heredoc(&h.content, &env)
                        .map_err(|m| self.err(line, m))?
                } else {
                    h.content.clone()
                };
                let out = self.mkfile_op(st, h, data, 0o644);
                let idx = index_of(&mut inputs, Some(out));
                sources.push((format!("/{}", h.name), idx, SourceKind::Heredoc));
                shown_heredocs.push(format!("<<{}", h.name));
                continue;
            }
            let src = self.expand(&env, raw, line)?;
            if src.is_empty() {
                return Err(self.err(line, format!("{kw} source can not be empty")));
            }
            shown_paths.push(src.clone());
            let (out, kind) = match &shared {
                Some((o, k)) => (o.clone(), k.clone()),
                None => {
                    if is_remote(&src) {
                        if !c.add {
                            return Err(self.err(
                                line,
                                format!(
                                    "{kw} does not take a URL or git repository (use ADD): {src}"
                                ),
                            ));
                        }
                        let (out, path) = self.remote_source(&src, &c.dest);
                        let idx = index_of(&mut inputs, Some(out));
                        sources.push((path, idx, SourceKind::Remote));
                        continue;
                    }
                    (Some(self.context()), SourceKind::Context)
                }
            };
            let idx = index_of(&mut inputs, out);
            sources.push((join_path("/", &src), idx, kind));
        }
        let n_inputs = inputs.len() as i64;
        let count = sources.len();
        let actions = sources
            .into_iter()
            .enumerate()
            .map(|(k, (src, idx, kind))| pb::FileAction {
                input: if k == 0 {
                    base_index
                } else {
                    n_inputs + k as i64 - 1
                },
                secondary_input: idx,
                output: if k + 1 == count { 0 } else { -1 },
                action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                    src,
                    dest: dest.clone(),
                    // A copy keeps its sources' owners unless told; the context's files
                    // count as root's (BuildKit's client sends them as 0:0). ADD leaves
                    // it to the copy, which keeps archive entries' owners.
                    owner: match (&chown, &kind) {
                        (Some(ch), _) => Some(ch.clone()),
                        (None, SourceKind::Context) if !c.add => Some(root_owner()),
                        (None, _) => None,
                    },
                    mode,
                    mode_str: mode_str.clone(),
                    follow_symlink: true,
                    dir_copy_contents: true,
                    attempt_unpack_docker_compatibility: c.add
                        && matches!(kind, SourceKind::Context),
                    create_dest_path: true,
                    allow_wildcard: true,
                    // BuildKit: `COPY maybe.* /d/` matching nothing is not an error.
                    allow_empty_wildcard: true,
                    timestamp: -1,
                    exclude_patterns: exclude.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        let md = self.metadata(name, Some(&instr.original));
        let out = self.add_op(
            &inputs,
            pb::op::Op::File(pb::FileOp { actions }),
            &st.platform,
            md,
        );
        st.root = Some(out);
        // History like BuildKit: flags it prints, paths, heredocs, then the destination.
        let mut msg = kw.to_string();
        if let Some(ch) = &chown_text {
            msg.push_str(&format!(" --chown={ch}"));
        }
        if let Some(m) = &c.chmod {
            msg.push_str(&format!(" --chmod={m}"));
        }
        for s in shown_paths.iter().chain(&shown_heredocs) {
            msg.push(' ');
            msg.push_str(s);
        }
        msg.push(' ');
        msg.push_str(&c.dest);
        st.history(format!("{msg} # buildkit"), false);
        Ok(())
    }
}

/// Whether Docker accepts this as a STOPSIGNAL: a non-zero number or a Linux signal
/// name, with or without `SIG`.
fn is_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return n != 0;
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "UNUSED", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU",
        "XFSZ", "RTMIN", "RTMAX",
    ];
    if NAMES.contains(&name) {
        return true;
    }
    // RTMIN+n / RTMAX-n.
    let rt = |prefix: &str, sep: char| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(sep))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| (1..=15).contains(&n))
    };
    rt("RTMIN", '+') || rt("RTMAX", '-')
}

/// A symbolic chmod (`u+x,go-w`, `a=rX`), which the copy carries as `modeStr`.
fn is_symbolic_mode(m: &str) -> bool {
    !m.is_empty()
        && m.split(',').all(|clause| {
            let who_end = clause
                .find(|c: char| !"ugoa".contains(c))
                .unwrap_or(clause.len());
            let rest = &clause[who_end..];
            let mut chars = rest.chars();
            matches!(chars.next(), Some('+' | '-' | '='))
                && chars.all(|c| "rwxXstugo+-=".contains(c))
        })
}

/// Test images: any reference resolves to a config with `PATH`, `BASE=1` and `CMD sh`;
/// references containing `onbuild` carry ONBUILD triggers (`onbuild-copy`: one that
/// copies from another image). Resolved in rounds, as a caller of [`missing_images`] does.
#[cfg(test)]
pub(crate) fn test_images(src: &str, opts: &BuildOpts) -> Result<ResolvedImages> {
    use sha2::Digest as _;
    let mut out = ResolvedImages::new();
    let mut todo = required_images(src, opts)?;
    for _round in 0..4 {
        for r in todo {
            let mut config = ImageConfigFile::default();
            config.config.env = vec![format!("PATH={DEFAULT_PATH}"), "BASE=1".to_string()];
            config.config.cmd = Some(vec!["sh".to_string()]);
            config.rootfs.diff_ids = vec![PLACEHOLDER_DIGEST.to_string()];
            config.history.push(History {
                created_by: "base layer".to_string(),
                ..Default::default()
            });
            if r.reference.contains("onbuild-copy") {
                config.config.on_build = vec!["COPY --from=helper:1 /x /x".to_string()];
            } else if r.reference.contains("onbuild") {
                config.config.on_build = vec![
                    "RUN echo triggered".to_string(),
                    "ENV FROM_TRIGGER=1".to_string(),
                ];
            }
            let canonical = normalize_reference(&r.reference).unwrap_or_default();
            let digest = format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
            );
            out.insert(
                r,
                ResolvedImageMeta {
                    canonical,
                    digest,
                    config,
                },
            );
        }
        todo = missing_images(src, opts, &out)?;
        if todo.is_empty() {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
