//! Dockerfile text → logical lines (directives, comments, continuations, heredocs).
//!
//! Only layout is handled here: parser directives at the top (`# syntax=`, `# escape=`,
//! `# check=`), comment and blank lines, line continuation with the escape character,
//! and heredoc bodies after `RUN`, `COPY` and `ADD`. Each resulting [`Node`] knows the
//! lines it came from; [`super::instructions`] gives it meaning.

/// A heredoc attached to an instruction (`<<EOF`, `<<-EOF`, `<<"EOF"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word, unquoted.
    pub name: String,
    /// The body, each line ending in `\n` (leading tabs removed for `<<-`).
    pub content: String,
    /// False when the delimiter was quoted: the body is taken literally.
    pub expand: bool,
    /// `<<-`: leading tabs were stripped.
    pub chomp: bool,
    /// A file descriptor written before `<<` (`3<<EOF`), if any.
    pub fd: Option<u32>,
}

/// One logical instruction line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The instruction keyword, lowercase (`run`).
    pub keyword: String,
    /// Everything after the keyword, continuations joined, trimmed.
    pub rest: String,
    /// The logical line as written (keyword and rest), continuations joined.
    pub original: String,
    /// 1-based first line.
    pub line: usize,
    /// 1-based last line (including heredoc bodies).
    pub end_line: usize,
    /// Heredoc bodies in the order their markers appear.
    pub heredocs: Vec<Heredoc>,
}

/// A parsed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Instructions in order.
    pub nodes: Vec<Node>,
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// The `# syntax=` directive, if any (accepted and ignored).
    pub syntax: Option<String>,
    /// Non-fatal remarks, with line numbers.
    pub warnings: Vec<String>,
}

/// A syntax error at a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim_start().strip_prefix('#')?;
    let (k, v) = body.split_once('=')?;
    let k = k.trim();
    let v = v.trim();
    let mut chars = k.chars();
    if !chars.next()?.is_ascii_alphabetic() || !chars.all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    if v.is_empty() {
        return None;
    }
    Some((k.to_ascii_lowercase(), v.to_string()))
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// Strips a trailing escape character (and whitespace after it): `(text, continues)`.
fn continuation(line: &str, escape: char) -> (&str, bool) {
    let t = line.trim_end_matches([' ', '\t']);
    match t.strip_suffix(escape) {
        Some(s) => (s, true),
        None => (line, false),
    }
}

/// Words of a line as Docker's parser splits them: on unquoted whitespace, quotes and
/// escapes kept in the words.
pub fn split_words_raw(rest: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut blank_ok = false;
    let mut quote: Option<char> = None;
    let mut it = rest.chars().peekable();
    while let Some(ch) = it.next() {
        if let Some(q) = quote {
            if ch == q {
                quote = None;
            } else if ch == escape && q != '\'' {
                match it.next() {
                    Some(n) => {
                        word.push(ch);
                        word.push(n);
                    }
                    None => quote = None,
                }
                continue;
            }
            word.push(ch);
            continue;
        }
        if ch.is_whitespace() {
            if in_word && (blank_ok || !word.is_empty()) {
                words.push(std::mem::take(&mut word));
            }
            word.clear();
            in_word = false;
            blank_ok = false;
            continue;
        }
        in_word = true;
        if ch == '\'' || ch == '"' {
            quote = Some(ch);
            blank_ok = true;
        }
        if ch == escape {
            if let Some(n) = it.next() {
                word.push(ch);
                word.push(n);
            }
            continue;
        }
        word.push(ch);
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// A heredoc marker in a word: `(fd, chomp, name, expand)`.
fn heredoc_marker(word: &str) -> Option<(Option<u32>, bool, String, bool)> {
    let digits: String = word.chars().take_while(|c| c.is_ascii_digit()).collect();
    let after = word[digits.len()..].strip_prefix("<<")?;
    let (chomp, name) = match after.strip_prefix('-') {
        Some(n) => (true, n),
        None => (false, after),
    };
    if name.is_empty() || name.contains('<') {
        return None;
    }
    let quoted = name.contains('"') || name.contains('\'');
    let unquoted: String = name.chars().filter(|c| *c != '"' && *c != '\'').collect();
    if unquoted.is_empty() {
        return None;
    }
    let fd = if digits.is_empty() {
        None
    } else {
        digits.parse().ok()
    };
    Some((fd, chomp, unquoted, !quoted))
}

/// The heredoc markers of an instruction's arguments, in order.
pub fn heredoc_markers(rest: &str, escape: char) -> Vec<(Option<u32>, bool, String, bool)> {
    split_words_raw(rest, escape)
        .iter()
        .filter_map(|w| heredoc_marker(w))
        .collect()
}

fn allows_heredoc(keyword: &str) -> bool {
    matches!(keyword, "run" | "copy" | "add")
}

/// Longest line of a Dockerfile accepted (1 MiB). No instruction can use more (Linux takes
/// at most 128 KiB in one exec argument), and every later step of a build copies the text
/// again: a 100 MB line took gigabytes of memory and minutes before this limit.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Parses Dockerfile text into nodes.
pub fn parse(src: &str) -> Result<Parsed, ParseError> {
    let src = src.strip_prefix('\u{feff}').unwrap_or(src);
    let lines: Vec<&str> = src.lines().collect();
    if let Some((n, l)) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.len() > MAX_LINE_BYTES)
    {
        return err(
            n + 1,
            format!(
                "line is {} bytes long, more than the limit of {MAX_LINE_BYTES} bytes",
                l.len()
            ),
        );
    }
    let mut escape = '\\';
    let mut syntax = None;
    let mut warnings = Vec::new();
    let mut seen_escape = false;
    let mut i = 0;
    // Parser directives: only before anything else.
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else {
            break;
        };
        match key.as_str() {
            "escape" => {
                if seen_escape {
                    return err(i + 1, "only one escape parser directive can be used");
                }
                seen_escape = true;
                escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        return err(
                            i + 1,
                            format!("invalid escape token '{other}' does not match ` or \\"),
                        )
                    }
                };
            }
            "syntax" => {
                if syntax.is_some() {
                    return err(i + 1, "only one syntax parser directive can be used");
                }
                warnings.push(format!(
                    "line {}: syntax directive {value:?} is ignored; the built-in dockerfile frontend is used",
                    i + 1
                ));
                syntax = Some(value);
            }
            "check" => {}
            _ => break,
        }
        i += 1;
    }

    let mut nodes = Vec::new();
    while i < lines.len() {
        if is_comment(lines[i]) || is_blank(lines[i]) {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut logical = String::new();
        let mut cur = lines[i];
        loop {
            let (text, cont) = continuation(cur, escape);
            logical.push_str(text);
            if !cont {
                break;
            }
            i += 1;
            while i < lines.len() && (is_comment(lines[i]) || is_blank(lines[i])) {
                i += 1;
            }
            if i >= lines.len() {
                break;
            }
            cur = lines[i];
        }
        i += 1;
        let trimmed = logical.trim();
        let (kw, rest) = match trimmed.find(char::is_whitespace) {
            Some(p) => (&trimmed[..p], trimmed[p..].trim()),
            None => (trimmed, ""),
        };
        let keyword = kw.to_ascii_lowercase();
        let mut heredocs = Vec::new();
        let json_form = rest.starts_with('[');
        if allows_heredoc(&keyword) && !json_form {
            for (fd, chomp, name, expand) in heredoc_markers(rest, escape) {
                let mut content = String::new();
                loop {
                    let Some(raw) = lines.get(i) else {
                        return err(start, format!("unterminated heredoc {name:?}"));
                    };
                    i += 1;
                    let l = if chomp {
                        raw.trim_start_matches('\t')
                    } else {
                        raw
                    };
                    if l == name {
                        break;
                    }
                    content.push_str(l);
                    content.push('\n');
                }
                heredocs.push(Heredoc {
                    name,
                    content,
                    expand,
                    chomp,
                    fd,
                });
            }
        }
        nodes.push(Node {
            keyword,
            rest: rest.to_string(),
            original: trimmed.to_string(),
            line: start,
            end_line: i,
            heredocs,
        });
    }
    Ok(Parsed {
        nodes,
        escape,
        syntax,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(src: &str) -> Parsed {
        match parse(src) {
            Ok(p) => p,
            Err(e) => panic!("parse failed: {e:?}"),
        }
    }

    #[test]
    fn comments_blank_lines_and_line_numbers() {
        let p = parse_ok("# hello\n\nFROM busybox\n  # c\nrun   echo hi  \n");
        assert_eq!(p.nodes.len(), 2);
        assert_eq!(p.nodes[0].keyword, "from");
        assert_eq!(p.nodes[0].line, 3);
        assert_eq!(p.nodes[1].keyword, "run");
        assert_eq!(p.nodes[1].rest, "echo hi");
        assert_eq!(p.nodes[1].line, 5);
    }

    #[test]
    fn overlong_lines_are_refused() {
        let long = "a".repeat(MAX_LINE_BYTES + 1);
        for src in [
            format!("FROM a\nRUN echo {long}\n"),
            format!("# {long}\nFROM a\n"),
            format!("FROM a\nCOPY <<EOF /x\n{long}\nEOF\n"),
        ] {
            let e = parse(&src).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("more than the limit of 1048576 bytes"), "{e}");
        }
        let fits = format!("FROM a\nRUN echo {}\n", "a".repeat(MAX_LINE_BYTES - 9));
        assert_eq!(parse_ok(&fits).nodes.len(), 2);
    }

    #[test]
    fn bom_and_crlf() {
        let p = parse_ok("\u{feff}# escape=`\r\nFROM a\r\nRUN x `\r\n y\r\n");
        assert_eq!(p.escape, '`');
        assert_eq!(p.nodes[1].rest, "x  y");
    }

    #[test]
    fn continuation_joins_and_skips_comments() {
        let p = parse_ok("FROM a\nRUN echo a \\\n# comment\n\n   b \\  \n c\nUSER x\n");
        assert_eq!(p.nodes[1].rest, "echo a    b  c");
        assert_eq!(p.nodes[1].line, 2);
        assert_eq!(p.nodes[1].end_line, 6);
        assert_eq!(p.nodes[2].line, 7);
    }

    #[test]
    fn escape_directive() {
        let p = parse_ok("# escape=`\nFROM a\nRUN dir c:\\ `\n  x\n");
        assert_eq!(p.escape, '`');
        assert_eq!(p.nodes[1].rest, "dir c:\\   x");
        let e = parse("# escape=x\nFROM a\n");
        assert_eq!(e.err().map(|e| e.line), Some(1));
        let e = parse("# escape=`\n# escape=\\\nFROM a\n");
        assert!(e.is_err_and(|e| e.message.contains("only one escape")));
    }

    #[test]
    fn directives_only_at_top() {
        let p = parse_ok("FROM a\n# escape=`\nRUN a \\\n b\n");
        assert_eq!(p.escape, '\\');
        assert_eq!(p.nodes[1].rest, "a  b");
        let p = parse_ok("# syntax=docker/dockerfile:1\n# escape=\\\nFROM a\n");
        assert_eq!(p.syntax.as_deref(), Some("docker/dockerfile:1"));
        assert_eq!(p.warnings.len(), 1);
        let p = parse_ok("# unknown=1\n# escape=`\nFROM a\n");
        assert_eq!(p.escape, '\\');
    }

    #[test]
    fn heredoc_forms() {
        let src = "FROM a\nRUN <<EOF\necho $A\n\tx\nEOF\nRUN <<-EOT\n\techo hi\n\tEOT\nCOPY <<\"E1\" 3<<'E2' /d/\n$A\nE1\nb\nE2\nRUN echo done\n";
        let p = parse_ok(src);
        assert_eq!(p.nodes.len(), 5);
        let h = &p.nodes[1].heredocs;
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].name, "EOF");
        assert_eq!(h[0].content, "echo $A\n\tx\n");
        assert!(h[0].expand && !h[0].chomp);
        let h = &p.nodes[2].heredocs;
        assert_eq!(h[0].content, "echo hi\n");
        assert!(h[0].chomp);
        let h = &p.nodes[3].heredocs;
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].name.as_str(), h[0].expand), ("E1", false));
        assert_eq!((h[1].name.as_str(), h[1].fd), ("E2", Some(3)));
        assert_eq!(h[1].content, "b\n");
        assert_eq!(p.nodes[4].line, 14);
    }

    #[test]
    fn heredoc_not_in_quotes_or_json_or_other_instructions() {
        let p = parse_ok("FROM a\nRUN echo \"<<EOF\"\nRUN [\"sh\", \"<<EOF\"]\nENV A=<<EOF\n");
        assert!(p.nodes.iter().all(|n| n.heredocs.is_empty()));
    }

    #[test]
    fn unterminated_heredoc() {
        let e = parse("FROM a\n\nRUN <<EOF\necho\n");
        assert_eq!(
            e.err(),
            Some(ParseError {
                line: 3,
                message: "unterminated heredoc \"EOF\"".to_string()
            })
        );
    }

    #[test]
    fn raw_words() {
        assert_eq!(
            split_words_raw("A=\"a b\" B='c d'  C=e\\ f \"\"", '\\'),
            vec!["A=\"a b\"", "B='c d'", "C=e\\ f", "\"\""]
        );
    }
}
