//! A stable, readable text rendering of converted LLB and image config, used by the
//! golden tests and handy when debugging a conversion. Ops are numbered in definition
//! order (`#0`, `#1`, …) and inputs refer to those numbers instead of digests.

use std::collections::HashMap;
use std::fmt::Write as _;

use prost::Message as _;

use crate::image::ImageConfigFile;
use crate::llb::pb;

fn platform(p: &Option<pb::Platform>) -> String {
    match p {
        None => String::new(),
        Some(p) if p.variant.is_empty() => format!(" [{}/{}]", p.os, p.architecture),
        Some(p) => format!(" [{}/{}/{}]", p.os, p.architecture, p.variant),
    }
}

fn owner(o: &Option<pb::ChownOpt>) -> String {
    let user = |u: &Option<pb::UserOpt>| match u.as_ref().and_then(|u| u.user.as_ref()) {
        None => "-".to_string(),
        Some(pb::user_opt::User::ById(id)) => id.to_string(),
        Some(pb::user_opt::User::ByName(n)) => format!("{}(in {})", n.name, n.input),
    };
    match o {
        None => String::new(),
        Some(c) => format!(" owner={}:{}", user(&c.user), user(&c.group)),
    }
}

fn action(a: &pb::FileAction) -> String {
    let head = format!(
        "{} <- {},{} -> {}",
        "", a.input, a.secondary_input, a.output
    );
    match &a.action {
        Some(pb::file_action::Action::Copy(c)) => {
            let mut flags = Vec::new();
            for (on, name) in [
                (c.follow_symlink, "follow"),
                (c.dir_copy_contents, "contents"),
                (c.attempt_unpack_docker_compatibility, "unpack"),
                (c.create_dest_path, "mkdest"),
                (c.allow_wildcard, "wildcard"),
                (c.allow_empty_wildcard, "emptywildcard"),
            ] {
                if on {
                    flags.push(name);
                }
            }
            let mut s = format!(
                "copy{head} src={:?} dest={:?} mode={} ts={} [{}]{}",
                c.src,
                c.dest,
                if c.mode < 0 {
                    "-1".to_string()
                } else {
                    format!("{:o}", c.mode)
                },
                c.timestamp,
                flags.join(","),
                owner(&c.owner)
            );
            if !c.exclude_patterns.is_empty() {
                let _ = write!(s, " exclude={:?}", c.exclude_patterns);
            }
            s
        }
        Some(pb::file_action::Action::Mkfile(m)) => format!(
            "mkfile{head} path={:?} mode={:o} ts={} data={:?}{}",
            m.path,
            m.mode,
            m.timestamp,
            String::from_utf8_lossy(&m.data),
            owner(&m.owner)
        ),
        Some(pb::file_action::Action::Mkdir(m)) => format!(
            "mkdir{head} path={:?} mode={:o} parents={} ts={}{}",
            m.path,
            m.mode,
            m.make_parents,
            m.timestamp,
            owner(&m.owner)
        ),
        other => format!("other{head} {other:?}"),
    }
}

fn mount(m: &pb::Mount) -> String {
    let typ = pb::MountType::try_from(m.mount_type)
        .map(|t| t.as_str_name().to_string())
        .unwrap_or_else(|_| m.mount_type.to_string());
    let mut s = format!(
        "mount {typ} {:?} input={} output={}",
        m.dest, m.input, m.output
    );
    if !m.selector.is_empty() {
        let _ = write!(s, " selector={:?}", m.selector);
    }
    if m.readonly {
        s.push_str(" ro");
    }
    if let Some(c) = &m.cache_opt {
        let sharing = pb::CacheSharingOpt::try_from(c.sharing)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_default();
        let _ = write!(s, " cache(id={:?}, {sharing})", c.id);
    }
    if let Some(t) = &m.tmpfs_opt {
        let _ = write!(s, " tmpfs(size={})", t.size);
    }
    if let Some(x) = &m.secret_opt {
        let _ = write!(
            s,
            " secret(id={:?}, uid={}, gid={}, mode={:o}, optional={})",
            x.id, x.uid, x.gid, x.mode, x.optional
        );
    }
    s
}

/// Renders a definition and config as text; ops that do not decode are shown as such.
pub fn render(def: &pb::Definition, config: &ImageConfigFile) -> String {
    let mut out = String::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let n = def.def.len();
    for (i, bytes) in def.def.iter().enumerate() {
        let digest = crate::llb::digest_of(bytes);
        index.insert(digest.clone(), i);
        let op = match pb::Op::decode(bytes.as_slice()) {
            Ok(op) => op,
            Err(e) => {
                let _ = writeln!(out, "#{i} undecodable: {e}");
                continue;
            }
        };
        let inputs: Vec<String> = op
            .inputs
            .iter()
            .map(|inp| match index.get(&inp.digest) {
                Some(k) => format!("#{k}.{}", inp.index),
                None => format!("?{}.{}", inp.digest, inp.index),
            })
            .collect();
        if i + 1 == n && op.op.is_none() {
            let _ = writeln!(out, "result {}", inputs.join(" "));
            continue;
        }
        let kind = match &op.op {
            Some(pb::op::Op::Source(_)) => "source",
            Some(pb::op::Op::Exec(_)) => "exec",
            Some(pb::op::Op::File(_)) => "file",
            _ => "other",
        };
        let _ = write!(out, "#{i} {kind}{}", platform(&op.platform));
        if !inputs.is_empty() {
            let _ = write!(out, " inputs={}", inputs.join(" "));
        }
        if op.constraints.is_none() {
            out.push_str(" (no constraints)");
        }
        out.push('\n');
        if let Some(md) = def.metadata.get(&digest) {
            if let Some(name) = md.description.get("llb.customname") {
                let _ = writeln!(out, "    name: {name}");
            }
            if md.ignore_cache {
                out.push_str("    ignore_cache\n");
            }
        }
        match &op.op {
            Some(pb::op::Op::Source(s)) => {
                let _ = writeln!(out, "    {}", s.identifier);
                let mut attrs: Vec<_> = s.attrs.iter().collect();
                attrs.sort();
                for (k, v) in attrs {
                    let _ = writeln!(out, "    attr {k}={v}");
                }
            }
            Some(pb::op::Op::Exec(e)) => {
                if let Some(m) = &e.meta {
                    let _ = writeln!(out, "    args: {:?}", m.args);
                    let _ = writeln!(out, "    env: {:?}", m.env);
                    let _ = writeln!(out, "    cwd: {:?} user: {:?}", m.cwd, m.user);
                    if let Some(p) = &m.proxy_env {
                        let _ = writeln!(out, "    proxy: {p:?}");
                    }
                }
                let net = pb::NetMode::try_from(e.network)
                    .map(|t| t.as_str_name().to_string())
                    .unwrap_or_default();
                let _ = writeln!(out, "    network: {net}");
                for m in &e.mounts {
                    let _ = writeln!(out, "    {}", mount(m));
                }
            }
            Some(pb::op::Op::File(f)) => {
                for a in &f.actions {
                    let _ = writeln!(out, "    {}", action(a));
                }
            }
            other => {
                let _ = writeln!(out, "    {other:?}");
            }
        }
    }
    if n == 0 {
        out.push_str("(empty definition)\n");
    }
    out.push_str("config:\n");
    out.push_str(&serde_json::to_string_pretty(config).unwrap_or_default());
    out.push('\n');
    out
}
