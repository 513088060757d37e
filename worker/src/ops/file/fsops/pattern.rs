//! Path patterns of file actions: Go `filepath.Match` syntax per path component (`*`,
//! `?`, `[...]` classes with `^`/`!` negation and ranges, `\` escapes), `**` matching any
//! number of components, and `.dockerignore`-style `!` exceptions for exclude lists.

/// One glob component matcher over bytes.
fn match_component(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    // Position to resume from after the last `*`: (pattern index, name index).
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star = Some((p + 1, n));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, next)) = match_class(&pat[p..], name[n]) {
                        if ok {
                            p += next;
                            n += 1;
                            continue;
                        }
                    } else if name[n] == b'[' {
                        // Unterminated class: a literal `[`.
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() => {
                    if pat[p + 1] == name[n] {
                        p += 2;
                        n += 1;
                        continue;
                    }
                }
                c => {
                    if c == name[n] {
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sn)) => {
                p = sp;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|c| *c == b'*')
}

/// Matches `c` against the class starting at `pat[0] == '['`; returns (matched, length
/// of the class in the pattern), or `None` when the class is not terminated.
fn match_class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some(b'^' | b'!'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let mut lo = *pat.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if lo == b'\\' {
            i += 1;
            lo = *pat.get(i)?;
        }
        i += 1;
        let mut hi = lo;
        if pat.get(i) == Some(&b'-') && pat.get(i + 1).is_some_and(|c| *c != b']') {
            hi = *pat.get(i + 1)?;
            if hi == b'\\' {
                hi = *pat.get(i + 2)?;
                i += 1;
            }
            i += 2;
        }
        if lo <= c && c <= hi {
            matched = true;
        }
    }
}

/// True when `s` contains glob metacharacters.
pub fn has_meta(s: &str) -> bool {
    s.bytes().any(|c| matches!(c, b'*' | b'?' | b'[' | b'\\'))
}

/// True when the single component `name` matches the glob `pat`.
pub fn component_matches(pat: &str, name: &str) -> bool {
    match_component(pat.as_bytes(), name.as_bytes())
}

fn split(p: &str) -> Vec<&str> {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

/// A compiled path pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    parts: Vec<String>,
    negated: bool,
}

impl Pattern {
    /// Parses `p`; a leading `!` marks an exception (only meaningful in exclude lists).
    pub fn new(p: &str) -> Pattern {
        let p = p.trim();
        let (negated, p) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p),
        };
        Pattern {
            parts: split(p).into_iter().map(str::to_string).collect(),
            negated,
        }
    }

    /// True when the pattern matches `path` (relative, `/`-separated) exactly.
    pub fn matches(&self, path: &[&str]) -> bool {
        fn go(pat: &[String], path: &[&str]) -> bool {
            match pat.split_first() {
                None => path.is_empty(),
                Some((p, rest)) if p == "**" => (0..=path.len()).any(|i| go(rest, &path[i..])),
                Some((p, rest)) => match path.split_first() {
                    Some((c, prest)) => component_matches(p, c) && go(rest, prest),
                    None => false,
                },
            }
        }
        go(&self.parts, path)
    }

    /// True when the pattern matches `path` or one of its parent directories.
    pub fn matches_or_parent(&self, path: &[&str]) -> bool {
        (1..=path.len()).any(|i| self.matches(&path[..i]))
    }
}

/// Include and exclude lists applied to paths relative to a copy's source.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    has_exceptions: bool,
}

/// What a [`Filter`] says about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Copy this entry itself.
    pub included: bool,
    /// For a directory: look inside even if not included (a descendant may be).
    pub descend: bool,
}

impl Filter {
    /// A filter from the action's pattern lists.
    pub fn new(include: &[String], exclude: &[String]) -> Filter {
        let exclude: Vec<Pattern> = exclude
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| Pattern::new(p))
            .collect();
        Filter {
            include: include
                .iter()
                .filter(|p| !p.trim().is_empty())
                .map(|p| Pattern::new(p))
                .collect(),
            has_exceptions: exclude.iter().any(|p| p.negated),
            exclude,
        }
    }

    /// True when the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    fn excluded(&self, path: &[&str]) -> bool {
        let mut excluded = false;
        for p in &self.exclude {
            if p.matches_or_parent(path) {
                excluded = !p.negated;
            }
        }
        excluded
    }

    /// The verdict for the relative path `rel` (`/`-separated, non-empty).
    pub fn check(&self, rel: &str) -> Verdict {
        let path = split(rel);
        let included =
            self.include.is_empty() || self.include.iter().any(|p| p.matches_or_parent(&path));
        let excluded = self.excluded(&path);
        Verdict {
            included: included && !excluded,
            descend: !excluded || self.has_exceptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_go() {
        assert!(component_matches("*.txt", "a.txt"));
        assert!(!component_matches("*.txt", "a.txt.bak"));
        assert!(component_matches("a?c", "abc"));
        assert!(component_matches("[a-c]x", "bx"));
        assert!(!component_matches("[^a-c]x", "bx"));
        assert!(component_matches("[!a-c]x", "dx"));
        assert!(component_matches("\\*", "*"));
        assert!(!component_matches("\\*", "a"));
        assert!(component_matches("*a*b*", "xxaxxbxx"));
        assert!(component_matches("*", ""));
    }

    #[test]
    fn double_star_and_parents() {
        let p = Pattern::new("**/*.go");
        assert!(p.matches(&["a", "b", "c.go"]));
        assert!(p.matches(&["c.go"]));
        let d = Pattern::new("vendor");
        assert!(d.matches_or_parent(&["vendor", "x", "y"]));
        assert!(!d.matches_or_parent(&["src", "vendor"]));
    }

    #[test]
    fn filter_with_exceptions() {
        let f = Filter::new(&[], &["*.md".into(), "!README.md".into(), "build".into()]);
        assert!(!f.check("notes.md").included);
        assert!(f.check("README.md").included);
        assert!(!f.check("build/out").included);
        assert!(f.check("src/main.rs").included);
        let f = Filter::new(&["src".into(), "*.toml".into()], &["src/gen".into()]);
        assert!(f.check("src/a.rs").included);
        assert!(f.check("Cargo.toml").included);
        assert!(!f.check("README").included);
        assert!(!f.check("src/gen/x.rs").included);
        let v = f.check("docs");
        assert!(!v.included && v.descend);
        let v = f.check("src/gen");
        assert!(!v.included && !v.descend);
    }
}
