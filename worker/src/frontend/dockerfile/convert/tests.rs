//! Tests of the conversion: unit tests on the emitted ops and config, golden files
//! under `worker/testdata/dockerfile/` (`KILN_UPDATE_GOLDEN=1` rewrites them) and a
//! no-panic property test over mutated Dockerfiles.

use std::path::{Path, PathBuf};

use prost::Message as _;

use super::*;
use crate::frontend::dockerfile::dump::render;

fn amd64() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: String::new(),
    }
}

fn opts() -> BuildOpts {
    BuildOpts {
        filename: "Dockerfile".into(),
        build_platform: amd64(),
        context_name: "context".into(),
        ..Default::default()
    }
}

fn conv(src: &str, o: &BuildOpts) -> Result<Converted> {
    let images = test_images(src, o)?;
    convert(src, o, &images)
}

fn ops(c: &Converted) -> anyhow::Result<Vec<pb::Op>> {
    let n = c.definition.def.len().saturating_sub(1);
    c.definition.def[..n]
        .iter()
        .map(|b| Ok(pb::Op::decode(b.as_slice())?))
        .collect()
}

fn execs(c: &Converted) -> anyhow::Result<Vec<pb::ExecOp>> {
    Ok(ops(c)?
        .into_iter()
        .filter_map(|o| match o.op {
            Some(pb::op::Op::Exec(e)) => Some(e),
            _ => None,
        })
        .collect())
}

fn sources(c: &Converted) -> anyhow::Result<Vec<String>> {
    Ok(ops(c)?
        .into_iter()
        .filter_map(|o| match o.op {
            Some(pb::op::Op::Source(s)) => Some(s.identifier),
            _ => None,
        })
        .collect())
}

fn refs(v: &[ImageRef]) -> Vec<String> {
    v.iter()
        .map(|r| format!("{} {}", r.reference, r.platform))
        .collect()
}

// === unit tests ===

#[test]
fn required_images_follow_target_and_args() -> anyhow::Result<()> {
    let src = "ARG BASE=alpine:3\nARG UNUSED\nFROM $BASE AS a\nFROM unreachable:1 AS b\nFROM busybox AS c\nCOPY --from=a /x /x\nCOPY --from=tool:1 /y /y\n";
    let mut o = opts();
    assert_eq!(
        refs(&required_images(src, &o)?),
        vec![
            "busybox linux/amd64",
            "alpine:3 linux/amd64",
            "tool:1 linux/amd64"
        ]
    );
    o.build_args.insert("BASE".into(), "debian:12".into());
    o.target = Some("A".into());
    assert_eq!(
        refs(&required_images(src, &o)?),
        vec!["debian:12 linux/amd64"]
    );
    o.target = Some("b".into());
    assert_eq!(
        refs(&required_images(src, &o)?),
        vec!["unreachable:1 linux/amd64"]
    );
    Ok(())
}

#[test]
fn required_images_platforms() -> anyhow::Result<()> {
    let src =
        "FROM --platform=$BUILDPLATFORM golang AS build\nFROM alpine\nCOPY --from=build /b /b\n";
    let mut o = opts();
    o.platform = Platform::parse("linux/arm64/v8");
    assert_eq!(
        refs(&required_images(src, &o)?),
        vec!["alpine linux/arm64/v8", "golang linux/amd64"]
    );
    let c = conv(src, &o)?;
    assert_eq!(c.config.architecture, "arm64");
    assert_eq!(c.config.variant.as_deref(), Some("v8"));
    let platforms: Vec<String> = ops(&c)?
        .iter()
        .filter_map(|op| op.platform.as_ref().map(|p| p.architecture.clone()))
        .collect();
    assert!(platforms.contains(&"amd64".to_string()));
    assert!(platforms.contains(&"arm64".to_string()));
    Ok(())
}

#[test]
fn unknown_target_is_an_error() {
    let mut o = opts();
    o.target = Some("nope".into());
    let e = required_images("FROM a AS x\n", &o)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("Dockerfile: target stage \"nope\" could not be found")
    );
}

#[test]
fn unreachable_stages_are_not_converted() -> anyhow::Result<()> {
    // The unreachable stage has an error that only conversion finds.
    let src = "FROM a AS broken\nRUN --mount=type=bogus,target=/x true\nFROM b\nRUN true\n";
    let c = conv(src, &opts())?;
    assert_eq!(execs(&c)?.len(), 1);
    let mut o = opts();
    o.target = Some("broken".into());
    let e = conv(src, &o).err().map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("Dockerfile:2: unsupported mount type \"bogus\"")
    );
    Ok(())
}

#[test]
fn arg_scoping() -> anyhow::Result<()> {
    let src = "ARG V=global\nARG ONLY_GLOBAL=g\nFROM a\nRUN echo1 $V $ONLY_GLOBAL\nARG V\nRUN echo2 $V\nARG V=local\nRUN echo3 $V\nENV V=env\nARG V=ignored\nRUN echo4 $V\nARG TARGETARCH\nARG NOVAL\nRUN echo5\n";
    let c = conv(src, &opts())?;
    let e = execs(&c)?;
    let meta = |i: usize| e[i].meta.clone().unwrap_or_default();
    assert_eq!(meta(0).args[2], "echo1 $V $ONLY_GLOBAL");
    // Global ARGs are invisible in a stage until redeclared.
    assert!(!meta(0).env.iter().any(|kv| kv.starts_with("V=")));
    assert!(meta(1).env.contains(&"V=global".to_string()));
    assert!(meta(2).env.contains(&"V=local".to_string()));
    // As in BuildKit, a later ARG with a value replaces the variable in the build
    // environment, but never in the image config.
    assert!(meta(3).env.contains(&"V=ignored".to_string()));
    assert!(c.config.config.env.contains(&"V=env".to_string()));
    assert!(meta(4).env.contains(&"TARGETARCH=amd64".to_string()));
    assert!(!meta(4).env.iter().any(|kv| kv.starts_with("NOVAL")));
    let history: Vec<&str> = c
        .config
        .history
        .iter()
        .map(|h| h.created_by.as_str())
        .collect();
    assert!(history.contains(&"RUN |1 V=global /bin/sh -c echo2 $V # buildkit"));
    assert!(history.contains(&"ARG V"));
    assert!(history.contains(&"ARG V=local"));
    // ARG values are not in the image config.
    assert!(!c
        .config
        .config
        .env
        .iter()
        .any(|kv| kv.starts_with("TARGETARCH")));
    Ok(())
}

#[test]
fn build_args_override_declared_args_only() -> anyhow::Result<()> {
    let src = "FROM a\nARG X=default\nRUN echo\n";
    let mut o = opts();
    o.build_args.insert("X".into(), "cli".into());
    o.build_args.insert("UNDECLARED".into(), "u".into());
    let c = conv(src, &o)?;
    let env = execs(&c)?[0].meta.clone().unwrap_or_default().env;
    assert!(env.contains(&"X=cli".to_string()));
    assert!(!env.iter().any(|kv| kv.starts_with("UNDECLARED")));
    Ok(())
}

#[test]
fn onbuild_triggers_run_first_and_are_not_inherited() -> anyhow::Result<()> {
    let c = conv("FROM onbuild-base\nRUN echo after\n", &opts())?;
    let e = execs(&c)?;
    assert_eq!(e.len(), 2);
    assert_eq!(
        e[0].meta.clone().unwrap_or_default().args[2],
        "echo triggered"
    );
    assert!(e[1]
        .meta
        .clone()
        .unwrap_or_default()
        .env
        .contains(&"FROM_TRIGGER=1".to_string()));
    assert!(c.config.config.on_build.is_empty());
    // ONBUILD in this Dockerfile is stored, not run.
    let c = conv("FROM a\nONBUILD RUN echo later\n", &opts())?;
    assert_eq!(c.config.config.on_build, vec!["RUN echo later"]);
    assert!(execs(&c)?.is_empty());
    Ok(())
}

#[test]
fn missing_images_finds_images_named_by_triggers() -> anyhow::Result<()> {
    let src = "FROM onbuild-copy:1\nRUN true\n";
    let first = required_images(src, &opts())?;
    assert_eq!(refs(&first), vec!["onbuild-copy:1 linux/amd64"]);
    let images = test_images(src, &opts())?;
    assert_eq!(images.len(), 2);
    assert!(missing_images(src, &opts(), &images)?.is_empty());
    let mut partial = images.clone();
    partial.retain(|r, _| r.reference == "onbuild-copy:1");
    assert_eq!(
        refs(&missing_images(src, &opts(), &partial)?),
        vec!["helper:1 linux/amd64"]
    );
    let c = convert(src, &opts(), &images)?;
    assert!(sources(&c)?.iter().any(|s| s.contains("helper:1@")));
    Ok(())
}

#[test]
fn onbuild_of_an_earlier_stage_runs_in_the_child() -> anyhow::Result<()> {
    let c = conv(
        "FROM a AS base\nONBUILD RUN echo child\nFROM base\n",
        &opts(),
    )?;
    let e = execs(&c)?;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].meta.clone().unwrap_or_default().args[2], "echo child");
    Ok(())
}

#[test]
fn errors_name_the_line() {
    let cases = [
        ("FROM a\n\nFRM b\n", "Dockerfile:3: unknown instruction: FRM"),
        ("RUN x\n", "Dockerfile:1: no build stage in current context: instructions must follow FROM"),
        ("FROM a\nCOPY --bogus=1 a b\n", "Dockerfile:2: unknown flag: bogus"),
        ("FROM a\nRUN <<EOF\necho\n", "Dockerfile:2: unterminated heredoc \"EOF\""),
        ("FROM a\nENV X=${Y\n", "Dockerfile:2: syntax error: missing '}'"),
        ("FROM a\nCOPY --from=1 a b\n", "Dockerfile:2: invalid from flag value 1: stage index out of range"),
        ("FROM a AS x\nCOPY --from=x a b\n", "Dockerfile:2: invalid from flag value x: refers to current build stage"),
        ("FROM $NOPE\n", "Dockerfile:1: base name ($NOPE) should not be blank"),
        ("FROM --platform=linux a\n", "Dockerfile:1: failed to parse platform linux"),
        ("FROM --platform=$NOPE a\n", "Dockerfile:1: empty platform value from expression $NOPE"),
        ("FROM a\nSTOPSIGNAL SIGNOPE\n", "Dockerfile:2: Invalid signal: SIGNOPE"),
        ("FROM a\nSTOPSIGNAL 0\n", "Dockerfile:2: Invalid signal: 0"),
        ("FROM a\nRUN --network=bridge x\n", "Dockerfile:2: unsupported network mode \"bridge\""),
        ("FROM a\nCOPY a b c\n", "Dockerfile:2: When using COPY with more than one source file, the destination must be a directory and end with a /"),
        ("FROM a\nCOPY https://x/y /z\n", "Dockerfile:2: COPY does not take a URL or git repository (use ADD): https://x/y"),
        ("FROM Bad/Ref\n", "Dockerfile:1: invalid reference format: \"Bad/Ref\""),
        ("FROM a AS x\nFROM b AS x\n", "Dockerfile:2: duplicate stage name \"x\""),
        ("", "Dockerfile: the Dockerfile cannot be empty"),
        ("ARG A\n", "Dockerfile: dockerfile contains no stages to build"),
        ("FROM a\nCOPY --chmod=9 a /b\n", "Dockerfile:2: invalid chmod parameter: '9'. it should be octal string and between 0 and 07777"),
        ("FROM a\nCOPY --chmod=u+q a /b\n", "Dockerfile:2: invalid chmod parameter: 'u+q'. it should be octal string and between 0 and 07777"),
    ];
    for (src, want) in cases {
        let got = match required_images(src, &opts()).and_then(|_| conv(src, &opts())) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, want, "for {src:?}");
    }
}

#[test]
fn missing_resolved_image_is_an_error() {
    let e = convert("FROM a\n", &opts(), &ResolvedImages::new())
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("Dockerfile:1: image \"a\" for linux/amd64 was not resolved")
    );
}

#[test]
fn copy_chains_actions_and_uses_context_once() -> anyhow::Result<()> {
    let c = conv("FROM a\nWORKDIR /w\nCOPY x y* dir/\nADD z.tar .\n", &opts())?;
    let all = ops(&c)?;
    let locals: Vec<&pb::Op> = all
        .iter()
        .filter(|o| matches!(&o.op, Some(pb::op::Op::Source(s)) if s.identifier.starts_with("local://")))
        .collect();
    assert_eq!(locals.len(), 1);
    assert!(locals[0].platform.is_none());
    let files: Vec<pb::FileOp> = all
        .iter()
        .filter_map(|o| match &o.op {
            Some(pb::op::Op::File(f)) => Some(f.clone()),
            _ => None,
        })
        .collect();
    // mkdir, copy (2 actions), add.
    assert_eq!(files.len(), 3);
    let copy = &files[1].actions;
    assert_eq!(
        copy.iter()
            .map(|a| (a.input, a.secondary_input, a.output))
            .collect::<Vec<_>>(),
        vec![(0, 1, -1), (2, 1, 0)]
    );
    let Some(pb::file_action::Action::Copy(c0)) = &copy[0].action else {
        anyhow::bail!("not a copy");
    };
    assert_eq!((c0.src.as_str(), c0.dest.as_str()), ("/x", "/w/dir/"));
    assert!(!c0.attempt_unpack_docker_compatibility);
    let Some(pb::file_action::Action::Copy(add)) = &files[2].actions[0].action else {
        anyhow::bail!("not a copy");
    };
    assert_eq!(add.dest, "/w/");
    assert!(add.attempt_unpack_docker_compatibility);
    Ok(())
}

#[test]
fn scratch_stage_uses_minus_one() -> anyhow::Result<()> {
    let c = conv("FROM scratch\nCOPY a b /\nRUN x\n", &opts())?;
    let all = ops(&c)?;
    let file = all
        .iter()
        .find_map(|o| match &o.op {
            Some(pb::op::Op::File(f)) => Some((o.inputs.len(), f.clone())),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("no file op"))?;
    assert_eq!(file.0, 1);
    assert_eq!(
        file.1
            .actions
            .iter()
            .map(|a| (a.input, a.secondary_input, a.output))
            .collect::<Vec<_>>(),
        vec![(-1, 0, -1), (1, 0, 0)]
    );
    assert_eq!(c.config.config.env, vec![format!("PATH={DEFAULT_PATH}")]);
    // An untouched scratch target is an empty definition.
    let c = conv("FROM scratch\nENV A=1\n", &opts())?;
    assert!(c.definition.def.is_empty());
    Ok(())
}

#[test]
fn run_heredoc_forms() -> anyhow::Result<()> {
    let src = "FROM a\nRUN <<EOF\necho $HOME\nEOF\nRUN cat <<A >/x && cat <<-B\nhi\nA\n\tthere\n\tB\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n";
    let c = conv(src, &opts())?;
    let e = execs(&c)?;
    let args = |i: usize| e[i].meta.clone().unwrap_or_default().args;
    assert_eq!(args(0), vec!["/bin/sh", "-c", "echo $HOME\n"]);
    assert_eq!(
        args(1),
        vec!["/bin/sh", "-c", "cat <<A >/x && cat <<-B\nhi\nA\nthere\nB"]
    );
    assert_eq!(args(2), vec!["/dev/pipes/EOF"]);
    assert_eq!(e[2].mounts[1].dest, "/dev/pipes/");
    assert_eq!(e[2].mounts[1].selector, "/");
    assert_eq!(e[2].mounts[1].input, 1);
    Ok(())
}

#[test]
fn copy_heredoc_expands_unless_quoted() -> anyhow::Result<()> {
    let src =
        "FROM a\nENV NAME=kiln\nCOPY <<EOF <<\"RAW\" /etc/\nhello $NAME\nEOF\nhello $NAME\nRAW\n";
    let c = conv(src, &opts())?;
    let data: Vec<String> = ops(&c)?
        .iter()
        .filter_map(|o| match &o.op {
            Some(pb::op::Op::File(f)) => match &f.actions[0].action {
                Some(pb::file_action::Action::Mkfile(m)) => {
                    Some(String::from_utf8_lossy(&m.data).to_string())
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(data, vec!["hello kiln\n", "hello $NAME\n"]);
    Ok(())
}

#[test]
fn mounts_sorted_and_typed() -> anyhow::Result<()> {
    let src = "FROM a AS src\nFROM b\nRUN --mount=type=secret,id=tok --mount=type=cache,target=/var/cache,sharing=locked --mount=type=bind,from=src,source=/out,target=/in --mount=type=tmpfs,target=/tmp,size=1m --network=none make\n";
    let c = conv(src, &opts())?;
    let e = &execs(&c)?[0];
    let dests: Vec<&str> = e.mounts.iter().map(|m| m.dest.as_str()).collect();
    assert_eq!(
        dests,
        vec!["/", "/in", "/run/secrets/tok", "/tmp", "/var/cache"]
    );
    assert_eq!(e.network, pb::NetMode::None as i32);
    assert!(e
        .meta
        .as_ref()
        .is_some_and(|m| m.remove_mount_stubs_recursive));
    assert_eq!(e.mounts[1].selector, "/out");
    assert!(e.mounts[1].readonly);
    assert_eq!(e.mounts[2].secret_opt.as_ref().map(|s| s.mode), Some(0o400));
    assert_eq!(
        e.mounts[3].tmpfs_opt.as_ref().map(|t| t.size),
        Some(1 << 20)
    );
    assert_eq!(
        e.mounts[4]
            .cache_opt
            .as_ref()
            .map(|c| (c.id.as_str(), c.sharing)),
        Some(("/var/cache", pb::CacheSharingOpt::Locked as i32))
    );
    Ok(())
}

#[test]
fn secret_mounts_as_env_and_by_source() -> anyhow::Result<()> {
    let src = "FROM b\nRUN --mount=type=secret,id=tok,env=TOKEN --mount=type=secret,id=both,env=BOTH,target=/etc/both,required --mount=type=secret,source=named make\n";
    let c = conv(src, &opts())?;
    let e = &execs(&c)?[0];
    let envs: Vec<(&str, &str, bool)> = e
        .secretenv
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str(), s.optional))
        .collect();
    assert_eq!(envs, vec![("tok", "TOKEN", true), ("both", "BOTH", false)]);
    // `env=` alone mounts no file; with a target it does; `source` names the secret.
    let secrets: Vec<(&str, &str)> = e
        .mounts
        .iter()
        .filter_map(|m| Some((m.dest.as_str(), m.secret_opt.as_ref()?.id.as_str())))
        .collect();
    assert_eq!(
        secrets,
        vec![("/etc/both", "both"), ("/run/secrets/named", "named")]
    );
    Ok(())
}

#[test]
fn copies_from_the_context_are_root_owned_others_keep_owners() -> anyhow::Result<()> {
    let src = "FROM a AS s\nFROM b\nCOPY x /x\nCOPY --from=s /y /y\nADD z.tar /z/\nCOPY --chown=5:6 w /w\n";
    let c = conv(src, &opts())?;
    let owners: Vec<Option<(u32, u32)>> = ops(&c)?
        .into_iter()
        .filter_map(|o| match o.op {
            Some(pb::op::Op::File(f)) => Some(f.actions),
            _ => None,
        })
        .flatten()
        .filter_map(|a| match a.action {
            Some(pb::file_action::Action::Copy(cp)) => Some(cp.owner),
            _ => None,
        })
        .map(|o| {
            let id = |u: Option<pb::UserOpt>| match u.and_then(|u| u.user) {
                Some(pb::user_opt::User::ById(i)) => i,
                _ => u32::MAX,
            };
            o.map(|o| (id(o.user), id(o.group)))
        })
        .collect();
    assert_eq!(owners, vec![Some((0, 0)), None, None, Some((5, 6))]);
    Ok(())
}

#[test]
fn image_ops_are_pinned_and_named() -> anyhow::Result<()> {
    let c = conv("FROM busybox\nRUN true\n", &opts())?;
    let ids = sources(&c)?;
    assert_eq!(ids.len(), 1);
    assert!(ids[0].starts_with("docker-image://docker.io/library/busybox:latest@sha256:"));
    let graph = crate::llb::decode(&c.definition)?;
    let names: Vec<String> = graph
        .vertices
        .iter()
        .filter_map(|v| v.metadata.description.get("llb.customname").cloned())
        .collect();
    assert!(names[0].starts_with("[1/2] FROM docker.io/library/busybox:latest@sha256:"));
    assert_eq!(names[1], "[2/2] RUN true");
    Ok(())
}

#[test]
fn step_names_follow_buildkit() -> anyhow::Result<()> {
    let mut src = String::from("FROM a AS one\nENV X=1\n");
    for i in 0..10 {
        src.push_str(&format!("RUN echo $X {i}\n"));
    }
    src.push_str("FROM scratch AS last\nCOPY --from=one /x /x\nWORKDIR /\nWORKDIR /w\n");
    src.push_str("FROM onbuild-img AS kid\nRUN k\n");
    let names = |target: &str| -> anyhow::Result<Vec<String>> {
        let mut o = opts();
        o.target = Some(target.into());
        let g = crate::llb::decode(&conv(&src, &o)?.definition)?;
        Ok(g.vertices
            .iter()
            .filter_map(|v| v.metadata.description.get("llb.customname").cloned())
            .collect())
    };
    let n = names("one")?;
    assert!(n[0].starts_with("[one  1/11] FROM docker.io/library/a:latest@sha256:"));
    assert_eq!(n[1], "[one  2/11] RUN echo 1 0");
    assert_eq!(n[10], "[one 11/11] RUN echo 1 9");
    // Scratch has no FROM step; WORKDIR / counts in the total but makes no op, so
    // it takes no step number.
    let n = names("last")?;
    assert!(n.contains(&"[last 1/3] COPY --from=one /x /x".to_string()));
    assert!(n.contains(&"[last 2/3] WORKDIR /w".to_string()));
    // The FROM step is named before the base's triggers are counted.
    let n = names("kid")?;
    assert!(n[0].starts_with("[kid 1/2] FROM docker.io/library/onbuild-img:latest@"));
    assert_eq!(n[1], "[kid 2/4] ONBUILD RUN echo triggered");
    assert_eq!(n[2], "[kid 3/4] RUN k");
    Ok(())
}

#[test]
fn deep_stage_chains_fit_a_small_stack() -> anyhow::Result<()> {
    let chain = |n: usize| {
        let mut src = String::from("FROM a AS s0\nRUN x\n");
        for i in 1..n {
            src.push_str(&format!(
                "FROM s{} AS s{i}\nCOPY --from=s0 /a /b\nRUN y\n",
                i - 1
            ));
        }
        src
    };
    let worker = std::thread::Builder::new().stack_size(2 << 20).spawn(
        move || -> Result<(usize, String)> {
            let ok = conv(&chain(400), &opts())?;
            // A cycle through the chain is still found.
            let cyclic = chain(50).replacen("RUN x\n", "COPY --from=s49 /q /q\n", 1);
            let err = conv(&cyclic, &opts())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            Ok((ok.definition.def.len(), err))
        },
    )?;
    let (ops, err) = worker
        .join()
        .map_err(|_| anyhow::anyhow!("conversion overflowed its stack"))??;
    assert!(ops > 400);
    assert!(err.contains("circular dependency detected"), "{err}");
    Ok(())
}

#[test]
fn stop_signals() -> anyhow::Result<()> {
    for sig in ["SIGTERM", "term", "9", "SIGRTMIN+3", "RTMAX-1"] {
        let c = conv(&format!("FROM a\nSTOPSIGNAL {sig}\n"), &opts())?;
        assert_eq!(c.config.config.stop_signal, sig);
    }
    Ok(())
}

#[test]
fn go_formatting_helpers() {
    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(1_500), "1.5µs");
    assert_eq!(go_duration(250_000_000), "250ms");
    assert_eq!(go_duration(90_000_000_000), "1m30s");
    assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
    assert_eq!(go_duration(1_250_000_000), "1.25s");
    assert_eq!(go_quote("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\x01é\"");
    assert_eq!(
        go_quote_list(&["sh".to_string(), "-c".to_string()]),
        "[\"sh\" \"-c\"]"
    );
    assert_eq!(uppercase_cmd("run --x y"), "RUN --x y");
}

#[test]
fn ops_carry_source_locations() -> anyhow::Result<()> {
    let src = "FROM a\n\nRUN echo \\\n  hi\nCOPY x /x\n";
    let c = conv(src, &opts())?;
    let source = c
        .definition
        .source
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no source map"))?;
    assert_eq!(source.infos[0].filename, "Dockerfile");
    assert_eq!(source.infos[0].data, src.as_bytes());
    let g = crate::llb::decode(&c.definition)?;
    let mut lines = Vec::new();
    for v in &g.vertices {
        if let Some(l) = source.locations.get(&v.digest) {
            let r = &l.locations[0].ranges[0];
            lines.push((
                r.start.as_ref().map(|p| p.line),
                r.end.as_ref().map(|p| p.line),
            ));
        }
    }
    assert_eq!(
        lines,
        vec![(Some(1), Some(1)), (Some(3), Some(4)), (Some(5), Some(5))]
    );
    Ok(())
}

#[test]
fn conversion_is_deterministic() -> anyhow::Result<()> {
    let src = "FROM a\nCOPY . /src\nRUN make\n";
    let mut o = opts();
    o.dockerignore = Some("target\n!target/keep\n".into());
    let a = conv(src, &o)?;
    for _ in 0..5 {
        let b = conv(src, &o)?;
        assert_eq!(a.definition.def, b.definition.def);
    }
    Ok(())
}

// === golden files ===

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/dockerfile")
}

/// Options from `# kiln: key=value` lines (target, platform, build-arg:K=V, label:K=V,
/// no-cache, dockerignore with `\n` for newlines).
fn golden_opts(src: &str) -> BuildOpts {
    let mut o = opts();
    for line in src.lines() {
        let Some(spec) = line.strip_prefix("# kiln: ") else {
            continue;
        };
        let (k, v) = spec.split_once('=').unwrap_or((spec, ""));
        if let Some(name) = k.strip_prefix("build-arg:") {
            o.build_args.insert(name.into(), v.into());
        } else if let Some(name) = k.strip_prefix("label:") {
            o.labels.insert(name.into(), v.into());
        } else {
            match k {
                "target" => o.target = Some(v.into()),
                "platform" => o.platform = Platform::parse(v),
                "no-cache" => o.no_cache = true,
                "dockerignore" => o.dockerignore = Some(v.replace("\\n", "\n")),
                other => panic!("unknown golden option {other}"),
            }
        }
    }
    o
}

fn golden_output(src: &str) -> String {
    let o = golden_opts(src);
    let images = match required_images(src, &o) {
        Ok(list) => {
            let mut s = String::from("images:\n");
            for r in list {
                s.push_str(&format!("  {} {}\n", r.reference, r.platform));
            }
            s
        }
        Err(e) => return format!("error: {e}\n"),
    };
    match conv(src, &o) {
        Ok(c) => {
            let mut s = images;
            for w in &c.warnings {
                s.push_str(&format!("warning: {w}\n"));
            }
            s + &render(&c.definition, &c.config)
        }
        Err(e) => format!("{images}error: {e}\n"),
    }
}

#[test]
fn golden_files() -> anyhow::Result<()> {
    let update = std::env::var("KILN_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(golden_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "Dockerfile"))
        .collect();
    entries.sort();
    assert!(entries.len() >= 10, "golden Dockerfiles missing");
    let mut failures = Vec::new();
    for path in entries {
        let src = std::fs::read_to_string(&path)?;
        let got = golden_output(&src);
        let golden = path.with_extension("golden");
        if update {
            std::fs::write(&golden, &got)?;
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != got {
            let first = want
                .lines()
                .zip(got.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(want.lines().count().min(got.lines().count()));
            failures.push(format!(
                "{}: differs at line {}\n  want: {:?}\n  got:  {:?}",
                golden.display(),
                first + 1,
                want.lines().nth(first),
                got.lines().nth(first)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches (KILN_UPDATE_GOLDEN=1 to rewrite):\n{}",
        failures.join("\n")
    );
    Ok(())
}

// === property test: no input panics ===

#[test]
fn mutated_dockerfiles_never_panic() -> anyhow::Result<()> {
    let mut seeds: Vec<String> = Vec::new();
    for e in std::fs::read_dir(golden_dir())? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "Dockerfile") {
            seeds.push(std::fs::read_to_string(p)?);
        }
    }
    let pieces = [
        "\\", "`", "$", "${", "}", "\"", "'", "<<EOF", "<<-", "\n", "EOF\n", "--mount=",
        "--from=0", "[", "]", ":-", "#", " ", "FROM ", "ARG ", "=", "\t", "é", "\r\n",
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut converted = 0;
    // KILN_PROPTEST_ROUNDS raises the count for a longer local run.
    let rounds = std::env::var("KILN_PROPTEST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    for round in 0..rounds {
        let base = &seeds[round % seeds.len()];
        let mut s: Vec<char> = base.chars().collect();
        for _ in 0..(1 + next() % 4) {
            let pos = if s.is_empty() {
                0
            } else {
                (next() as usize) % s.len()
            };
            match next() % 3 {
                0 => {
                    let piece = pieces[(next() as usize) % pieces.len()];
                    for (k, ch) in piece.chars().enumerate() {
                        s.insert(pos + k, ch);
                    }
                }
                1 => {
                    let end = (pos + (next() as usize) % 8).min(s.len());
                    s.drain(pos..end);
                }
                _ => {
                    s.truncate(pos);
                }
            }
        }
        let text: String = s.into_iter().collect();
        let o = golden_opts(
            &text
                .lines()
                .filter(|l| l.starts_with("# kiln: target=") || !l.starts_with("# kiln:"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        if let Ok(images) = test_images(&text, &o) {
            if convert(&text, &o, &images).is_ok() {
                converted += 1;
            }
        }
    }
    // The mutations must leave some inputs valid, or the test would prove little.
    assert!(converted > 0);
    Ok(())
}
