//! The `dockerfile.v0` frontend: [`parser`] (text → lines and instructions with line
//! numbers), [`instructions`] (typed instructions and flags), [`shell`] (Docker's word
//! lexer and variable expansion), [`convert`](mod@convert) (instructions → LLB and image config) and
//! [`dump`] (a stable text rendering of a conversion, for golden tests and debugging).

pub mod convert;
pub mod dump;
pub mod instructions;
pub mod parser;
pub mod shell;

pub use convert::{convert, missing_images, required_images};

/// Whether the Dockerfile `src` may read its build context: a `COPY` or `ADD` of local
/// paths (not `--from` a stage or image, not heredocs or URLs), or a `RUN --mount` of type
/// `bind` without `from`. A daemon uses this to fetch the context from the client while
/// it resolves base images; `false` is a hint only (a base image's `ONBUILD` can still
/// read the context, which is then fetched when the converted build names it). An
/// unparsable file says `true`.
pub fn may_read_context(src: &str) -> bool {
    let Ok(parsed) = parser::parse(src) else {
        return true;
    };
    parsed.nodes.iter().any(|node| {
        let Ok(instr) = instructions::parse_node(node, parsed.escape) else {
            return true;
        };
        match instr.kind {
            instructions::Instruction::Copy(args) => {
                args.from.is_none()
                    && args.srcs.iter().any(|s| {
                        let remote = args.add && (s.contains("://") || s.starts_with("git@"));
                        !s.starts_with("<<") && !remote
                    })
            }
            instructions::Instruction::Run { mounts, .. } => mounts.iter().any(|m| {
                let fields = instructions::split_csv(m);
                let get = |k: &str| {
                    fields
                        .iter()
                        .find(|(key, _)| key.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone().unwrap_or_default())
                };
                let bind = get("type").is_none_or(|t| t.eq_ignore_ascii_case("bind"));
                bind && get("from").is_none()
            }),
            _ => false,
        }
    })
}

#[cfg(test)]
mod context_tests {
    use super::may_read_context;

    #[test]
    fn only_local_sources_and_bind_mounts_read_the_context() {
        for reads in [
            "FROM a\nCOPY . /src\n",
            "FROM a\nADD x.tar /\n",
            "FROM a\nCOPY --chown=1 a b /dst/\n",
            "FROM a\nRUN --mount=target=/src make\n",
            "FROM a\nRUN --mount=type=bind,source=go.mod,target=/go.mod go mod download\n",
            "FROM a\nCOPY \\\n  x /y\n",
            "FROM a\nNOT-AN-INSTRUCTION\n",
        ] {
            assert!(may_read_context(reads), "{reads:?}");
        }
        for none in [
            "FROM a\nRUN echo hi > /x\n",
            "FROM a AS b\nRUN true\nFROM c\nCOPY --from=b /x /y\n",
            "FROM a\nADD https://example.com/f /f\n",
            "FROM a\nADD https://example.com/f <<EOF /dst/\nhi\nEOF\n",
            "FROM a\nADD git@github.com:o/r.git /r\n",
            "FROM a\nCOPY <<EOF /f\nhi\nEOF\n",
            "FROM a\nRUN --mount=type=cache,target=/c true\n",
            "FROM a\nRUN --mount=type=bind,from=b,target=/b true\n",
            "FROM a\nONBUILD COPY . /app\n",
        ] {
            assert!(!may_read_context(none), "{none:?}");
        }
    }
}
