//! Typed Dockerfile instructions and variable expansion.
//!
//! [`parse_node`] gives a [`Node`] its meaning: the instruction, its `--flags` (checked
//! against what the instruction accepts) and its arguments in shell or exec (JSON) form.
//! Arguments stay unexpanded here; [`super::convert`](mod@super::convert) expands them with the stage's
//! variables through [`super::shell::Lexer`], because their values depend on the stage.

use super::parser::{split_words_raw, Heredoc, Node};

/// Shell form (`RUN echo hi`) or exec form (`RUN ["echo", "hi"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdLine {
    /// Run through the stage's SHELL.
    Shell(String),
    /// Run as given.
    Exec(Vec<String>),
}

/// `HEALTHCHECK` arguments, unparsed durations kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// `CMD …`; `None` for `HEALTHCHECK NONE`.
    pub cmd: Option<CmdLine>,
    /// `--interval`, nanoseconds.
    pub interval: i64,
    /// `--timeout`, nanoseconds.
    pub timeout: i64,
    /// `--start-period`, nanoseconds.
    pub start_period: i64,
    /// `--start-interval`, nanoseconds.
    pub start_interval: i64,
    /// `--retries`.
    pub retries: i64,
}

/// `COPY` / `ADD` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyArgs {
    /// `ADD` rather than `COPY`.
    pub add: bool,
    /// Sources as written (`<<EOF` for heredocs).
    pub srcs: Vec<String>,
    /// Destination as written.
    pub dest: String,
    /// `--from`.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link` (no effect on the LLB Kiln emits).
    pub link: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `FROM [--platform=p] image [AS name]`.
    From {
        /// The image or stage, unexpanded.
        image: String,
        /// The stage name, lowercase.
        name: Option<String>,
        /// `--platform`, unexpanded.
        platform: Option<String>,
    },
    /// `ARG name[=default] …`, defaults unexpanded.
    Arg(Vec<(String, Option<String>)>),
    /// `ENV k=v …`, unexpanded.
    Env(Vec<(String, String)>),
    /// `LABEL k=v …`, unexpanded.
    Label(Vec<(String, String)>),
    /// `RUN`.
    Run {
        /// The command.
        cmd: CmdLine,
        /// `--mount` values, unexpanded.
        mounts: Vec<String>,
        /// `--network`.
        network: Option<String>,
    },
    /// `COPY` or `ADD`.
    Copy(CopyArgs),
    /// `WORKDIR path`.
    Workdir(String),
    /// `USER user[:group]`.
    User(String),
    /// `EXPOSE port[/proto] …`.
    Expose(Vec<String>),
    /// `VOLUME path …`.
    Volume(Vec<String>),
    /// `ENTRYPOINT`.
    Entrypoint(CmdLine),
    /// `CMD`.
    Cmd(CmdLine),
    /// `SHELL ["exe", "arg"]`.
    Shell(Vec<String>),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// `ONBUILD <instruction>`, stored as the trigger text.
    OnBuild(String),
    /// `MAINTAINER name` (deprecated; becomes the `maintainer` label).
    Maintainer(String),
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instr {
    /// What to do.
    pub kind: Instruction,
    /// 1-based line.
    pub line: usize,
    /// 1-based last line (continuations and heredocs included).
    pub end_line: usize,
    /// The instruction as written (continuations joined).
    pub original: String,
    /// Heredocs of the instruction.
    pub heredocs: Vec<Heredoc>,
}

/// An instruction that does not make sense, with its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct InstrError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

struct Flags {
    flags: Vec<(String, Option<String>)>,
}

impl Flags {
    fn take(&mut self, name: &str) -> Vec<Option<String>> {
        let mut out = Vec::new();
        self.flags.retain(|(n, v)| {
            if n == name {
                out.push(v.clone());
                false
            } else {
                true
            }
        });
        out
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, String> {
        let mut v = self.take(name);
        if v.len() > 1 {
            return Err(format!("duplicate flag specified: {name}"));
        }
        match v.pop() {
            None => Ok(None),
            Some(None) => Err(format!("missing a value on flag: {name}")),
            Some(Some(s)) => Ok(Some(s)),
        }
    }

    fn strings(&mut self, name: &str) -> Result<Vec<String>, String> {
        self.take(name)
            .into_iter()
            .map(|v| v.ok_or_else(|| format!("missing a value on flag: {name}")))
            .collect()
    }

    fn bool(&mut self, name: &str) -> Result<bool, String> {
        match self.take(name).pop() {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(v)) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!("expecting boolean value for flag {name}, not: {v}")),
            },
        }
    }

    fn done(&self) -> Result<(), String> {
        match self.flags.first() {
            Some((n, _)) => Err(format!("unknown flag: {n}")),
            None => Ok(()),
        }
    }
}

/// Removes quotes (and escapes outside single quotes) from a flag word.
fn unquote(word: &str, escape: char) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut it = word.chars();
    while let Some(c) = it.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some('\'') => out.push(c),
            _ if c == escape => {
                if let Some(n) = it.next() {
                    out.push(n);
                }
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            _ => out.push(c),
        }
    }
    out
}

/// Splits leading `--flag[=value]` words off `rest`; returns the flags and what follows.
fn extract_flags(rest: &str, escape: char) -> (Flags, String) {
    let mut flags = Vec::new();
    let mut s = rest.trim_start();
    while s.starts_with("--") {
        // The flag word ends at unquoted whitespace.
        let mut end = s.len();
        let mut quote: Option<char> = None;
        let mut prev_escape = false;
        for (i, c) in s.char_indices() {
            if prev_escape {
                prev_escape = false;
                continue;
            }
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c == escape => prev_escape = true,
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None => {}
            }
        }
        let word = &s[..end];
        s = s[end..].trim_start();
        if word == "--" {
            break;
        }
        let body = &word[2..];
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(unquote(v, escape))),
            None => (body.to_string(), None),
        };
        flags.push((name, value));
    }
    (Flags { flags }, s.to_string())
}

fn parse_json(rest: &str) -> Option<Vec<String>> {
    if !rest.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(rest).ok()
}

fn cmdline(rest: &str) -> CmdLine {
    match parse_json(rest) {
        Some(v) => CmdLine::Exec(v),
        None => CmdLine::Shell(rest.to_string()),
    }
}

fn name_vals(kw: &str, rest: &str, escape: char) -> Result<Vec<(String, String)>, String> {
    let words = split_words_raw(rest, escape);
    let Some(first) = words.first() else {
        return Err(format!("{kw} requires at least one argument"));
    };
    if !first.contains('=') {
        // Legacy `ENV key value with spaces`.
        let value = rest
            .trim_start()
            .split_once(char::is_whitespace)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        if value.is_empty() {
            return Err(format!("{kw} must have two arguments"));
        }
        return Ok(vec![(first.clone(), value)]);
    }
    words
        .iter()
        .map(|w| match w.split_once('=') {
            Some(("", _)) => Err(format!("{kw} names can not be blank")),
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(format!(
                "Syntax error - can't find = in {w:?}. Must be of the form: name=value"
            )),
        })
        .collect()
}

/// Parses a Go duration (`30s`, `1m30s`, `500ms`) into nanoseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[u..];
        total += num * unit;
    }
    if total > i64::MAX as f64 {
        return None;
    }
    Some(total as i64)
}

fn is_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_healthcheck(flags: &mut Flags, rest: &str) -> Result<Healthcheck, String> {
    let dur = |flags: &mut Flags, name: &str| -> Result<i64, String> {
        match flags.string(name)? {
            None => Ok(0),
            Some(v) => {
                let d = parse_duration(&v)
                    .ok_or_else(|| format!("invalid duration for --{name}: {v:?}"))?;
                if d != 0 && d < 1_000_000 {
                    return Err(format!("interval {name:?} cannot be less than 1ms"));
                }
                Ok(d)
            }
        }
    };
    let interval = dur(flags, "interval")?;
    let timeout = dur(flags, "timeout")?;
    let start_period = dur(flags, "start-period")?;
    let start_interval = dur(flags, "start-interval")?;
    let retries = match flags.string("retries")? {
        None => 0,
        Some(v) => {
            let r: i64 = v
                .parse()
                .map_err(|_| format!("invalid value for --retries: {v:?}"))?;
            if r < 0 {
                return Err("--retries cannot be negative".to_string());
            }
            r
        }
    };
    flags.done()?;
    let (typ, args) = match rest.split_once(char::is_whitespace) {
        Some((t, a)) => (t, a.trim()),
        None => (rest, ""),
    };
    let cmd = match typ.to_ascii_uppercase().as_str() {
        "NONE" => {
            if !args.is_empty() {
                return Err("HEALTHCHECK NONE takes no arguments".to_string());
            }
            None
        }
        "CMD" => {
            if args.is_empty() {
                return Err("Missing command after HEALTHCHECK CMD".to_string());
            }
            Some(cmdline(args))
        }
        other => return Err(format!("Unknown type {other:?} in HEALTHCHECK (try CMD)")),
    };
    Ok(Healthcheck {
        cmd,
        interval,
        timeout,
        start_period,
        start_interval,
        retries,
    })
}

fn parse_kind(node: &Node, escape: char) -> Result<Instruction, String> {
    let kw = node.keyword.as_str();
    let upper = kw.to_ascii_uppercase();
    let (mut flags, rest) = extract_flags(&node.rest, escape);
    let rest = rest.trim().to_string();
    let need_args = |what: &str| -> Result<(), String> {
        if rest.is_empty() {
            Err(format!("{upper} requires {what}"))
        } else {
            Ok(())
        }
    };
    let kind = match kw {
        "from" => {
            let platform = flags.string("platform")?;
            flags.done()?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let (image, name) = match words.as_slice() {
                [image] => (image.to_string(), None),
                [image, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                    if !is_stage_name(name) {
                        return Err(format!(
                            "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
                        ));
                    }
                    (image.to_string(), Some(name.to_ascii_lowercase()))
                }
                _ => return Err("FROM requires either one or three arguments".to_string()),
            };
            Instruction::From {
                image,
                name,
                platform,
            }
        }
        "arg" => {
            flags.done()?;
            need_args("at least one argument")?;
            let args = split_words_raw(&rest, escape)
                .into_iter()
                .map(|w| match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (w, None),
                })
                .collect::<Vec<_>>();
            for (k, _) in &args {
                if k.is_empty() {
                    return Err("ARG names can not be blank".to_string());
                }
            }
            Instruction::Arg(args)
        }
        "env" => {
            flags.done()?;
            Instruction::Env(name_vals(&upper, &rest, escape)?)
        }
        "label" => {
            flags.done()?;
            Instruction::Label(name_vals(&upper, &rest, escape)?)
        }
        "run" => {
            let mounts = flags.strings("mount")?;
            let network = flags.string("network")?;
            if let Some(sec) = flags.string("security")? {
                if sec != "sandbox" {
                    return Err(format!("security mode {sec:?} is not supported"));
                }
            }
            flags.done()?;
            need_args("at least one argument")?;
            Instruction::Run {
                cmd: cmdline(&rest),
                mounts,
                network,
            }
        }
        "copy" | "add" => {
            let from = flags.string("from")?;
            let chown = flags.string("chown")?;
            let chmod = flags.string("chmod")?;
            let link = flags.bool("link")?;
            let exclude = flags.strings("exclude")?;
            if kw == "add" {
                if flags.string("checksum")?.is_some() {
                    return Err("ADD --checksum is not supported".to_string());
                }
                flags.bool("keep-git-dir")?;
            }
            flags.done()?;
            let mut args = match parse_json(&rest) {
                Some(v) => v,
                None => rest.split_whitespace().map(str::to_string).collect(),
            };
            if args.len() < 2 {
                return Err(format!("{upper} requires at least two arguments"));
            }
            let dest = args.pop().unwrap_or_default();
            Instruction::Copy(CopyArgs {
                add: kw == "add",
                srcs: args,
                dest,
                from,
                chown,
                chmod,
                link,
                exclude,
            })
        }
        "workdir" => {
            flags.done()?;
            need_args("exactly one argument")?;
            Instruction::Workdir(rest)
        }
        "user" => {
            flags.done()?;
            need_args("exactly one argument")?;
            Instruction::User(rest)
        }
        "expose" => {
            flags.done()?;
            need_args("at least one argument")?;
            Instruction::Expose(rest.split_whitespace().map(str::to_string).collect())
        }
        "volume" => {
            flags.done()?;
            need_args("at least one argument")?;
            let v = match parse_json(&rest) {
                Some(v) => v,
                None => rest.split_whitespace().map(str::to_string).collect(),
            };
            if v.iter().any(|p| p.trim().is_empty()) {
                return Err("VOLUME specified can not be an empty string".to_string());
            }
            Instruction::Volume(v)
        }
        "entrypoint" => {
            flags.done()?;
            Instruction::Entrypoint(cmdline(&rest))
        }
        "cmd" => {
            flags.done()?;
            Instruction::Cmd(cmdline(&rest))
        }
        "shell" => {
            flags.done()?;
            match parse_json(&rest) {
                Some(v) if !v.is_empty() => Instruction::Shell(v),
                _ => return Err("SHELL requires the arguments to be in JSON form".to_string()),
            }
        }
        "healthcheck" => {
            need_args("at least one argument")?;
            Instruction::Healthcheck(parse_healthcheck(&mut flags, &rest)?)
        }
        "stopsignal" => {
            flags.done()?;
            need_args("exactly one argument")?;
            Instruction::StopSignal(rest)
        }
        "onbuild" => {
            flags.done()?;
            need_args("at least one argument")?;
            let trigger = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            match trigger.as_str() {
                "ONBUILD" => {
                    return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".to_string())
                }
                "FROM" | "MAINTAINER" => {
                    return Err(format!("{trigger} isn't allowed as an ONBUILD trigger"))
                }
                _ => {}
            }
            if !KEYWORDS.contains(&trigger.to_ascii_lowercase().as_str()) {
                return Err(format!("unknown instruction: {trigger}"));
            }
            // Stored as written, like BuildKit (the keyword keeps its case).
            Instruction::OnBuild(rest.clone())
        }
        "maintainer" => {
            flags.done()?;
            need_args("exactly one argument")?;
            Instruction::Maintainer(rest)
        }
        _ => return Err(format!("unknown instruction: {upper}")),
    };
    Ok(kind)
}

/// Instruction keywords Kiln knows (lowercase).
pub const KEYWORDS: &[&str] = &[
    "from",
    "arg",
    "env",
    "label",
    "run",
    "copy",
    "add",
    "workdir",
    "user",
    "expose",
    "volume",
    "entrypoint",
    "cmd",
    "shell",
    "healthcheck",
    "stopsignal",
    "onbuild",
    "maintainer",
];

/// Gives a node its meaning.
pub fn parse_node(node: &Node, escape: char) -> Result<Instr, InstrError> {
    let kind = parse_kind(node, escape).map_err(|message| InstrError {
        line: node.line,
        message,
    })?;
    Ok(Instr {
        kind,
        line: node.line,
        end_line: node.end_line,
        original: node.original.clone(),
        heredocs: node.heredocs.clone(),
    })
}

/// Splits a `--mount` value (`type=cache,target=/x`) into key/value pairs; a key without
/// `=` has no value. Double-quoted fields may contain commas.
pub fn split_csv(s: &str) -> Vec<(String, Option<String>)> {
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
    fields.push(cur);
    fields
        .into_iter()
        .filter(|f| !f.trim().is_empty())
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
            None => (f.trim().to_ascii_lowercase(), None),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::parser::parse;
    use super::*;

    fn one(src: &str) -> Result<Instruction, InstrError> {
        let p = parse(src).map_err(|e| InstrError {
            line: e.line,
            message: e.message,
        })?;
        let node = p.nodes.last().ok_or(InstrError {
            line: 0,
            message: "empty".into(),
        })?;
        parse_node(node, p.escape).map(|i| i.kind)
    }

    #[test]
    fn from_forms() {
        assert_eq!(
            one("FROM --platform=$BUILDPLATFORM golang:1 AS Build"),
            Ok(Instruction::From {
                image: "golang:1".into(),
                name: Some("build".into()),
                platform: Some("$BUILDPLATFORM".into()),
            })
        );
        assert!(one("FROM a b").is_err_and(|e| e.message.contains("one or three")));
        assert!(one("FROM a AS 1x").is_err_and(|e| e.message.contains("invalid name")));
        assert!(one("FROM --plat=x a").is_err_and(|e| e.message == "unknown flag: plat"));
    }

    #[test]
    fn env_forms() {
        assert_eq!(
            one("ENV A=1 B=\"x y\" C=z\\ w"),
            Ok(Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"x y\"".into()),
                ("C".into(), "z\\ w".into()),
            ]))
        );
        assert_eq!(
            one("ENV A  hello   world"),
            Ok(Instruction::Env(vec![("A".into(), "hello   world".into())]))
        );
        assert!(one("ENV A=1 B").is_err_and(|e| e.message.contains("can't find =")));
        assert!(one("ENV A").is_err_and(|e| e.message.contains("two arguments")));
        assert!(one("LABEL =x").is_err_and(|e| e.message.contains("blank")));
    }

    #[test]
    fn run_flags_and_forms() {
        assert_eq!(
            one("RUN --mount=type=cache,target=/c --network=none echo  hi"),
            Ok(Instruction::Run {
                cmd: CmdLine::Shell("echo  hi".into()),
                mounts: vec!["type=cache,target=/c".into()],
                network: Some("none".into()),
            })
        );
        assert_eq!(
            one("RUN [\"echo\", \"hi\"]"),
            Ok(Instruction::Run {
                cmd: CmdLine::Exec(vec!["echo".into(), "hi".into()]),
                mounts: vec![],
                network: None,
            })
        );
        assert_eq!(
            one("RUN [not json"),
            Ok(Instruction::Run {
                cmd: CmdLine::Shell("[not json".into()),
                mounts: vec![],
                network: None,
            })
        );
        assert!(one("RUN --bogus x").is_err_and(|e| e.message == "unknown flag: bogus"));
        assert!(one("RUN --network x").is_err_and(|e| e.message.contains("missing a value")));
        assert!(one("RUN").is_err_and(|e| e.message.contains("requires")));
    }

    #[test]
    fn copy_forms() -> anyhow::Result<()> {
        let Instruction::Copy(c) =
            one("COPY --from=build --chown=1:2 --chmod=755 --link a b /dst/")?
        else {
            anyhow::bail!("not a copy");
        };
        assert_eq!(c.srcs, vec!["a", "b"]);
        assert_eq!(c.dest, "/dst/");
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chown.as_deref(), Some("1:2"));
        assert_eq!(c.chmod.as_deref(), Some("755"));
        assert!(c.link && !c.add);
        let Instruction::Copy(c) = one("ADD [\"a b\", \"/c\"]")? else {
            anyhow::bail!("not a copy");
        };
        assert!(c.add);
        assert_eq!(c.srcs, vec!["a b"]);
        assert!(one("COPY a").is_err_and(|e| e.message.contains("at least two")));
        Ok(())
    }

    #[test]
    fn healthcheck_forms() {
        assert_eq!(
            one("HEALTHCHECK --interval=1m30s --retries=3 CMD curl -f x"),
            Ok(Instruction::Healthcheck(Healthcheck {
                cmd: Some(CmdLine::Shell("curl -f x".into())),
                interval: 90_000_000_000,
                timeout: 0,
                start_period: 0,
                start_interval: 0,
                retries: 3,
            }))
        );
        assert!(matches!(
            one("HEALTHCHECK none"),
            Ok(Instruction::Healthcheck(Healthcheck { cmd: None, .. }))
        ));
        assert!(one("HEALTHCHECK RUN x").is_err_and(|e| e.message.contains("Unknown type")));
        assert!(one("HEALTHCHECK --interval=5x CMD x").is_err());
    }

    #[test]
    fn onbuild_rules() {
        assert_eq!(
            one("ONBUILD run echo hi"),
            Ok(Instruction::OnBuild("run echo hi".into()))
        );
        assert!(one("ONBUILD ONBUILD RUN x").is_err_and(|e| e.message.contains("Chaining")));
        assert!(one("ONBUILD FROM x").is_err_and(|e| e.message.contains("isn't allowed")));
        assert!(one("ONBUILD FRM x").is_err_and(|e| e.message.contains("unknown")));
    }

    #[test]
    fn misc() {
        assert!(one("SHELL sh -c").is_err_and(|e| e.message.contains("JSON")));
        assert_eq!(
            one("VOLUME /a /b"),
            Ok(Instruction::Volume(vec!["/a".into(), "/b".into()]))
        );
        assert_eq!(
            one("ARG A B=2"),
            Ok(Instruction::Arg(vec![
                ("A".into(), None),
                ("B".into(), Some("2".into()))
            ]))
        );
        let e = one("FROM a\n\nFRM b");
        assert_eq!(
            e,
            Err(InstrError {
                line: 3,
                message: "unknown instruction: FRM".into()
            })
        );
    }

    #[test]
    fn durations_and_csv() {
        assert_eq!(parse_duration("1h2m3.5s"), Some(3_723_500_000_000));
        assert_eq!(parse_duration("10ms"), Some(10_000_000));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(
            split_csv("type=bind,\"source=a,b\",rw"),
            vec![
                ("type".into(), Some("bind".into())),
                ("source".into(), Some("a,b".into())),
                ("rw".into(), None)
            ]
        );
    }
}
