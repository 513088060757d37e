//! `.dockerignore`-style path patterns (Go filepath.Match syntax plus `**` and `!`
//! exceptions), as BuildKit's local source and Docker apply them.
//!
//! Semantics follow moby/patternmatcher: each pattern is cleaned like Go's
//! `filepath.Clean` (a leading `/` is dropped), `*` and `?` stay within one path segment,
//! `[…]` is a character class, `**` spans any number of segments, a pattern that matches a
//! directory excludes everything under it, `!pattern` re-includes, and the last matching
//! pattern wins. Pure functions; used by the local source walker and the frontend.

/// A pattern list that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// A lone `!`.
    #[error("illegal exclusion pattern: \"!\"")]
    IllegalExclusion,
    /// A pattern with a syntax error (unterminated `[`, trailing `\`).
    #[error("syntax error in pattern {pattern:?}: {reason}")]
    Syntax {
        /// The pattern as given.
        pattern: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Lit(char),
    /// `*`: any run of non-`/` characters.
    Star,
    /// `?`: one non-`/` character.
    Any,
    /// `[...]`: ranges (inclusive) and whether negated.
    Class(Vec<(char, char)>, bool),
    /// `**` followed by more pattern: `(.*/)?`.
    DirStar,
    /// `**` at the end: `.*`.
    Rest,
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    tokens: Vec<Token>,
    /// The cleaned pattern's segments, each compiled on its own (for `might_match_children`).
    dirs: Vec<(String, Vec<Token>)>,
}

/// A compiled list of `.dockerignore` patterns.
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

/// Go's `path.Clean` for `/`-separated paths.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

fn compile(pattern: &str) -> Result<Vec<Token>, PatternError> {
    let syntax = |reason: &str| PatternError::Syntax {
        pattern: pattern.to_string(),
        reason: reason.to_string(),
    };
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => {
                if chars.get(i) == Some(&'*') {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i >= chars.len() {
                        tokens.push(Token::Rest);
                    } else {
                        tokens.push(Token::DirStar);
                    }
                } else {
                    tokens.push(Token::Star);
                }
            }
            '?' => tokens.push(Token::Any),
            '\\' => {
                let next = chars.get(i).ok_or_else(|| syntax("trailing backslash"))?;
                tokens.push(Token::Lit(*next));
                i += 1;
            }
            '[' => {
                let mut negated = false;
                if matches!(chars.get(i), Some('^')) {
                    negated = true;
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err(syntax("unterminated character class"));
                    };
                    i += 1;
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let lo = if c == '\\' {
                        let e = *chars.get(i).ok_or_else(|| syntax("trailing backslash"))?;
                        i += 1;
                        e
                    } else {
                        c
                    };
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
                        let mut hi = chars[i + 1];
                        i += 2;
                        if hi == '\\' {
                            hi = *chars.get(i).ok_or_else(|| syntax("trailing backslash"))?;
                            i += 1;
                        }
                        if hi < lo {
                            return Err(syntax("bad range in character class"));
                        }
                        ranges.push((lo, hi));
                    } else {
                        ranges.push((lo, lo));
                    }
                }
                tokens.push(Token::Class(ranges, negated));
            }
            c => tokens.push(Token::Lit(c)),
        }
    }
    Ok(tokens)
}

/// Matches `tokens[ti..]` against `s[si..]`; `failed` remembers positions already
/// known not to match, which keeps patterns like `*a*a*a*b` linear per position.
fn match_tokens(tokens: &[Token], s: &[char], ti: usize, si: usize, failed: &mut [bool]) -> bool {
    let key = ti * (s.len() + 1) + si;
    if failed[key] {
        return false;
    }
    let ok = match_uncached(tokens, s, ti, si, failed);
    if !ok {
        failed[key] = true;
    }
    ok
}

fn match_uncached(tokens: &[Token], s: &[char], ti: usize, si: usize, failed: &mut [bool]) -> bool {
    let Some(first) = tokens.get(ti) else {
        return si == s.len();
    };
    let cur = s.get(si);
    match first {
        Token::Lit(c) => cur == Some(c) && match_tokens(tokens, s, ti + 1, si + 1, failed),
        Token::Any => {
            cur.is_some_and(|c| *c != '/') && match_tokens(tokens, s, ti + 1, si + 1, failed)
        }
        Token::Class(ranges, negated) => {
            cur.is_some_and(|c| ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated)
                && match_tokens(tokens, s, ti + 1, si + 1, failed)
        }
        Token::Star => {
            let mut n = si;
            loop {
                if match_tokens(tokens, s, ti + 1, n, failed) {
                    return true;
                }
                if n >= s.len() || s[n] == '/' {
                    return false;
                }
                n += 1;
            }
        }
        Token::DirStar => {
            if match_tokens(tokens, s, ti + 1, si, failed) {
                return true;
            }
            (si..s.len()).any(|n| s[n] == '/' && match_tokens(tokens, s, ti + 1, n + 1, failed))
        }
        Token::Rest => true,
    }
}

fn glob_matches(tokens: &[Token], path: &str) -> bool {
    let chars: Vec<char> = path.chars().collect();
    let mut failed = vec![false; (tokens.len() + 1) * (chars.len() + 1)];
    match_tokens(tokens, &chars, 0, 0, &mut failed)
}

impl PatternMatcher {
    /// Compiles patterns; blank ones are skipped, `!` marks an exception.
    pub fn new(patterns: &[String]) -> Result<PatternMatcher, PatternError> {
        let mut out = PatternMatcher::default();
        for p in patterns {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let (exclusion, body) = match p.strip_prefix('!') {
                Some("") => return Err(PatternError::IllegalExclusion),
                Some(rest) => (true, rest),
                None => (false, p),
            };
            let mut cleaned = clean_path(body);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned = cleaned[1..].to_string();
            }
            let tokens = compile(&cleaned)?;
            let dirs = cleaned
                .split('/')
                .map(|d| Ok((d.to_string(), compile(d)?)))
                .collect::<Result<Vec<_>, PatternError>>()?;
            out.exclusions |= exclusion;
            out.patterns.push(Pattern {
                cleaned,
                exclusion,
                tokens,
                dirs,
            });
        }
        Ok(out)
    }

    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// True when some pattern is an `!` exception.
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// The cleaned patterns, `!` kept, in order.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| {
                if p.exclusion {
                    format!("!{}", p.cleaned)
                } else {
                    p.cleaned.clone()
                }
            })
            .collect()
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated) is excluded: the
    /// last pattern matching it or one of its parent directories decides.
    pub fn matches(&self, rel_path: &str) -> bool {
        let file = clean_path(rel_path.trim_start_matches('/'));
        let parents: Vec<&str> = match file.rfind('/') {
            Some(i) => file[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut hit = glob_matches(&p.tokens, &file);
            if !hit {
                for i in 0..parents.len() {
                    if glob_matches(&p.tokens, &parents[..=i].join("/")) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether some `!` exception could re-include a path strictly inside directory
    /// `dir_rel`; a walker may skip an excluded directory when this is false.
    pub fn might_match_children(&self, dir_rel: &str) -> bool {
        let dir = clean_path(dir_rel.trim_start_matches('/'));
        let segs: Vec<&str> = if dir == "." {
            Vec::new()
        } else {
            dir.split('/').collect()
        };
        self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            for (i, seg) in segs.iter().enumerate() {
                let Some((text, tokens)) = p.dirs.get(i) else {
                    // The exception matches a parent of `dir`: everything inside may match.
                    return true;
                };
                if text.contains("**") {
                    return true;
                }
                if !glob_matches(tokens, seg) {
                    return false;
                }
            }
            true
        })
    }
}

/// Splits `.dockerignore` text into patterns: `#` comment lines and blank lines are
/// dropped, lines are trimmed, paths cleaned and made relative (`!` kept in front).
pub fn parse_dockerignore(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut p = String::new();
        if !pattern.is_empty() {
            p = clean_path(pattern);
            if p.len() > 1 && p.starts_with('/') {
                p.remove(0);
            }
        }
        if invert {
            p.insert(0, '!');
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(p: &[&str]) -> PatternMatcher {
        let v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        match PatternMatcher::new(&v) {
            Ok(m) => m,
            Err(e) => panic!("bad patterns {p:?}: {e}"),
        }
    }

    #[test]
    fn clean_path_like_go() {
        assert_eq!(clean_path(""), ".");
        assert_eq!(clean_path("a//b/./c/"), "a/b/c");
        assert_eq!(clean_path("/../a"), "/a");
        assert_eq!(clean_path("../a/../../b"), "../../b");
        assert_eq!(clean_path("a/.."), ".");
        assert_eq!(clean_path("/"), "/");
    }

    #[test]
    fn star_stays_in_segment() {
        let m = pm(&["*.txt"]);
        assert!(m.matches("a.txt"));
        assert!(!m.matches("dir/a.txt"));
        assert!(!m.matches("a.txt2"));
        let m = pm(&["dir/*.txt"]);
        assert!(m.matches("dir/a.txt"));
        assert!(!m.matches("dir/sub/a.txt"));
    }

    #[test]
    fn question_and_class() {
        let m = pm(&["a?c", "[0-9]x", "[^a]y"]);
        assert!(m.matches("abc"));
        assert!(!m.matches("a/c"));
        assert!(m.matches("5x"));
        assert!(!m.matches("ax"));
        assert!(m.matches("by"));
        assert!(!m.matches("ay"));
    }

    #[test]
    fn double_star_spans_segments() {
        let m = pm(&["**/*.go"]);
        assert!(m.matches("a.go"));
        assert!(m.matches("x/y/a.go"));
        assert!(!m.matches("x/y/a.rs"));
        let m = pm(&["a/**/b"]);
        assert!(m.matches("a/b"));
        assert!(m.matches("a/x/y/b"));
        assert!(!m.matches("ab"));
        let m = pm(&["**"]);
        assert!(m.matches("anything/at/all"));
        let m = pm(&["dir/**"]);
        assert!(m.matches("dir/x"));
        assert!(!m.matches("dirx"));
    }

    #[test]
    fn directory_match_excludes_children() {
        let m = pm(&["node_modules"]);
        assert!(m.matches("node_modules"));
        assert!(m.matches("node_modules/a/b.js"));
        assert!(!m.matches("src/node_modules"));
    }

    #[test]
    fn exceptions_last_match_wins() {
        let m = pm(&["*.md", "!README.md"]);
        assert!(m.matches("CHANGES.md"));
        assert!(!m.matches("README.md"));
        let m = pm(&["!README.md", "*.md"]);
        assert!(m.matches("README.md"));
        let m = pm(&["docs", "!docs/keep.md", "docs/keep.md"]);
        assert!(m.matches("docs/keep.md"));
        let m = pm(&["docs", "!docs/keep.md"]);
        assert!(!m.matches("docs/keep.md"));
        assert!(m.matches("docs/other.md"));
    }

    #[test]
    fn leading_slash_and_dots_cleaned() {
        let m = pm(&["/a/./b/../c"]);
        assert_eq!(m.patterns(), vec!["a/c"]);
        assert!(m.matches("a/c"));
        assert!(m.matches("/a/c/d"));
        assert!(m.matches("./a/c"));
    }

    #[test]
    fn escapes_are_literal() {
        let m = pm(&["a\\*b"]);
        assert!(m.matches("a*b"));
        assert!(!m.matches("axb"));
    }

    #[test]
    fn errors() {
        assert_eq!(
            PatternMatcher::new(&["!".to_string()]).err(),
            Some(PatternError::IllegalExclusion)
        );
        assert!(matches!(
            PatternMatcher::new(&["a[b".to_string()]),
            Err(PatternError::Syntax { .. })
        ));
        assert!(matches!(
            PatternMatcher::new(&["a\\".to_string()]),
            Err(PatternError::Syntax { .. })
        ));
        assert!(PatternMatcher::new(&["  ".to_string()]).is_ok_and(|m| m.is_empty()));
    }

    #[test]
    fn might_match_children_only_for_exceptions_inside() {
        let m = pm(&["docs", "!docs/keep/*.md"]);
        assert!(m.has_exclusions());
        assert!(m.might_match_children("docs"));
        assert!(m.might_match_children("docs/keep"));
        assert!(!m.might_match_children("docs/other"));
        assert!(!m.might_match_children("src"));
        let m = pm(&["vendor"]);
        assert!(!m.might_match_children("vendor"));
        let m = pm(&["*", "!**/keep"]);
        assert!(m.might_match_children("any/dir"));
    }

    #[test]
    fn pathological_patterns_are_fast() {
        let pattern = "*a".repeat(30) + "b";
        let m = pm(&[pattern.as_str()]);
        let start = std::time::Instant::now();
        assert!(!m.matches(&"a".repeat(200)));
        let m = pm(&["**/a/**/a/**/a/**/a/**/b"]);
        assert!(!m.matches(&"a/".repeat(100)));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn dockerignore_text() {
        let text = "\u{feff}# comment\n\n  node_modules/  \n!/keep//me\n/abs\n ! spaced\n*.log\r\n";
        assert_eq!(
            parse_dockerignore(text),
            vec!["node_modules", "!keep/me", "abs", "!spaced", "*.log"]
        );
    }

    #[test]
    fn property_literal_patterns_match_themselves_and_children() {
        // Simple deterministic generator: literal paths match themselves and anything below.
        let alphabet = ['a', 'b', 'c', '.', '_'];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..500 {
            let mut segs = Vec::new();
            let n = 1 + (seed % 3) as usize;
            for _ in 0..n {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 1 + (seed >> 60) as usize % 4;
                let seg: String = (0..len)
                    .map(|k| alphabet[((seed >> (k * 8)) % 5) as usize])
                    .collect();
                if seg == "." || seg == ".." {
                    segs.push("x".to_string());
                } else {
                    segs.push(seg);
                }
            }
            let path = segs.join("/");
            let m = pm(&[path.as_str()]);
            let cleaned = clean_path(&path);
            assert!(m.matches(&cleaned), "{path}");
            assert!(m.matches(&format!("{cleaned}/child")), "{path}");
            let neg = pm(&[path.as_str(), &format!("!{path}")]);
            assert!(!neg.matches(&cleaned), "{path}");
        }
    }
}
