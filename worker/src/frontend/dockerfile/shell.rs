//! Docker's shell-word lexer: quote removal, escapes and `$VAR` expansion as the
//! Dockerfile frontend applies them to instruction arguments (not a real shell: no
//! globbing, no command substitution), including the pattern forms `${V#p}`, `${V##p}`,
//! `${V%p}`, `${V%%p}`, `${V/p/r}` and `${V//p/r}` (`*`, `?` and `\` escapes in `p`).
//! Pure functions.

use std::collections::BTreeMap;

/// Variables visible to expansion.
pub type Env = BTreeMap<String, String>;

/// How a word is processed.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    /// The escape character (`\` or `` ` `` from the `# escape=` directive).
    pub escape: char,
    /// Heredoc bodies: quotes are plain characters and escapes stay unless before `$`.
    raw: bool,
    /// Display names: quotes are kept in the output and unset variables stay as written.
    display: bool,
}

impl Lexer {
    /// A lexer for this escape character.
    pub fn new(escape: char) -> Lexer {
        Lexer {
            escape,
            raw: false,
            display: false,
        }
    }

    /// Expands variables for a progress name the way BuildKit shows commands: quotes
    /// kept, unset variables left as written; the text itself on a lexer error.
    pub fn display(&self, text: &str, env: &Env) -> String {
        let lex = Lexer {
            escape: self.escape,
            raw: false,
            display: true,
        };
        let mut w = Word::new(&lex, text, env);
        match w.process_stop_on(None) {
            Ok((s, _)) => s,
            Err(_) => text.to_string(),
        }
    }

    /// Expands a word to one string (quotes removed, nothing split).
    pub fn process_word(&self, word: &str, env: &Env) -> Result<String, String> {
        let mut w = Word::new(self, word, env);
        let (s, _) = w.process_stop_on(None)?;
        Ok(s)
    }

    /// Expands and splits on unquoted whitespace (also inside unquoted expansions).
    pub fn process_words(&self, word: &str, env: &Env) -> Result<Vec<String>, String> {
        let mut w = Word::new(self, word, env);
        let (_, words) = w.process_stop_on(None)?;
        Ok(words.finish())
    }

    /// Expands `$` references in a heredoc body, keeping quotes and other text as is.
    pub fn expand_heredoc(&self, body: &str, env: &Env) -> Result<String, String> {
        let lex = Lexer {
            escape: self.escape,
            raw: true,
            display: false,
        };
        let mut w = Word::new(&lex, body, env);
        let (s, _) = w.process_stop_on(None)?;
        Ok(s)
    }
}

#[derive(Default)]
struct Words {
    words: Vec<String>,
    cur: String,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() {
            if self.in_word {
                self.words.push(std::mem::take(&mut self.cur));
                self.in_word = false;
            }
        } else {
            self.cur.push(c);
            self.in_word = true;
        }
    }
    fn add_raw_char(&mut self, c: char) {
        self.cur.push(c);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }
    fn add_raw_string(&mut self, s: &str) {
        self.cur.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if self.in_word {
            self.words.push(self.cur);
        }
        self.words
    }
}

struct Word<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    raw: bool,
    display: bool,
    /// Inside a `${V#…}`/`${V/…}` pattern: escapes are kept for the pattern compiler.
    keep_escapes: bool,
    env: &'a Env,
}

impl<'a> Word<'a> {
    fn new(lex: &Lexer, s: &str, env: &'a Env) -> Word<'a> {
        Word {
            chars: s.chars().collect(),
            pos: 0,
            escape: lex.escape,
            raw: lex.raw,
            display: lex.display,
            keep_escapes: false,
            env,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_stop_on(&mut self, stop: Option<char>) -> Result<(String, Words), String> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, words));
            }
            match ch {
                '\'' if !self.raw => {
                    let s = self.single_quote()?;
                    result.push_str(&s);
                    words.add_raw_string(&s);
                }
                '"' if !self.raw => {
                    let s = self.double_quote()?;
                    result.push_str(&s);
                    words.add_raw_string(&s);
                }
                '$' => {
                    let s = self.dollar()?;
                    result.push_str(&s);
                    words.add_string(&s);
                }
                _ => {
                    self.next();
                    if ch == self.escape {
                        if self.raw {
                            // Heredoc: only `$` and the escape itself are escaped.
                            match self.peek() {
                                Some(n) if n == '$' || n == self.escape => {
                                    self.next();
                                    result.push(n);
                                }
                                _ => result.push(ch),
                            }
                            continue;
                        }
                        if self.keep_escapes {
                            words.add_raw_char(ch);
                            result.push(ch);
                        }
                        let Some(n) = self.next() else { break };
                        words.add_raw_char(n);
                        result.push(n);
                    } else {
                        words.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        if let Some(s) = stop {
            return Err(format!("syntax error: missing '{s}'"));
        }
        Ok((result, words))
    }

    fn single_quote(&mut self) -> Result<String, String> {
        self.next();
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .to_string(),
                    )
                }
                Some('\'') => {
                    if self.display {
                        return Ok(format!("'{out}'"));
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Result<String, String> {
        self.next();
        let mut out = String::new();
        loop {
            let Some(ch) = self.peek() else {
                return Err(
                    "unexpected end of statement while looking for matching double-quote"
                        .to_string(),
                );
            };
            if ch == '"' {
                self.next();
                if self.display {
                    return Ok(format!("\"{out}\""));
                }
                return Ok(out);
            }
            if ch == '$' {
                out.push_str(&self.dollar()?);
                continue;
            }
            self.next();
            if ch == self.escape {
                if self.keep_escapes {
                    out.push(ch);
                }
                match self.peek() {
                    None => continue,
                    Some(n) if n == '"' || n == '$' || n == self.escape => {
                        self.next();
                        out.push(n);
                        continue;
                    }
                    _ => {}
                }
            }
            out.push(ch);
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_ascii_digit() {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && "@*#?-$!0".contains(ch) {
                self.next();
                return ch.to_string();
            }
            if !(ch.is_alphanumeric() || ch == '_') {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }

    fn get(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.get(&name) {
                Some(v) => v,
                None if self.display => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return Err("syntax error: missing '}'".to_string()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".to_string()),
            _ => {}
        }
        let name = self.name();
        let Some(ch) = self.next() else {
            return Err("syntax error: missing '}'".to_string());
        };
        let value = self.get(&name);
        if value.is_none() && self.display {
            // Leave `${NAME…}` as written.
            let mut text = format!("${{{name}{ch}");
            if ch != '}' {
                let (word, _) = self.process_stop_on(Some('}'))?;
                text.push_str(&word);
                text.push('}');
            }
            return Ok(text);
        }
        match ch {
            '}' => Ok(value.unwrap_or_default()),
            ':' => {
                let Some(modifier) = self.next() else {
                    return Err("syntax error: missing '}'".to_string());
                };
                let (word, _) = self.process_stop_on(Some('}'))?;
                let set = value.is_some();
                let value = value.unwrap_or_default();
                match modifier {
                    '+' => Ok(if value.is_empty() { value } else { word }),
                    '-' => Ok(if value.is_empty() { word } else { value }),
                    '?' => {
                        if !set {
                            Err(format!(
                                "{name}: {}",
                                or(word, "is not allowed to be unset")
                            ))
                        } else if value.is_empty() {
                            Err(format!(
                                "{name}: {}",
                                or(word, "is not allowed to be empty")
                            ))
                        } else {
                            Ok(value)
                        }
                    }
                    m => Err(format!("unsupported modifier (:{m}) in substitution")),
                }
            }
            '#' | '%' => {
                let word = self.pattern_word('}')?;
                let (greedy, word) = match word.strip_prefix(ch) {
                    Some(rest) => (true, rest.to_string()),
                    None => (false, word),
                };
                let pattern = Pattern::compile(&word)?;
                let value: Vec<char> = value.unwrap_or_default().chars().collect();
                Ok(if ch == '#' {
                    pattern.trim_prefix(&value, greedy)
                } else {
                    pattern.trim_suffix(&value, greedy)
                })
            }
            '/' => {
                let all = self.peek() == Some('/');
                if all {
                    self.next();
                }
                let pattern = self.pattern_word('/')?;
                let replacement = self.pattern_word('}')?;
                let pattern = Pattern::compile(&pattern)?;
                let value: Vec<char> = value.unwrap_or_default().chars().collect();
                Ok(pattern.replace(&value, &replacement, all))
            }
            '+' | '-' | '?' => {
                let (word, _) = self.process_stop_on(Some('}'))?;
                match (ch, value) {
                    ('+', Some(_)) => Ok(word),
                    ('+', None) => Ok(String::new()),
                    ('-', Some(v)) => Ok(v),
                    ('-', None) => Ok(word),
                    (_, Some(v)) => Ok(v),
                    (_, None) => Err(format!(
                        "{name}: {}",
                        or(word, "is not allowed to be unset")
                    )),
                }
            }
            m => Err(format!("unsupported modifier ({m}) in substitution")),
        }
    }
}

impl Word<'_> {
    /// The text of a substitution pattern up to `stop`, variables expanded and escapes
    /// kept for [`Pattern::compile`].
    fn pattern_word(&mut self, stop: char) -> Result<String, String> {
        let before = self.keep_escapes;
        self.keep_escapes = true;
        let res = self.process_stop_on(Some(stop));
        self.keep_escapes = before;
        Ok(res?.0)
    }
}

/// One element of a substitution pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// `*`: any run of characters.
    Star,
    /// `?`: any one character.
    Any,
    /// A character matched as itself.
    Lit(char),
}

/// A shell pattern as BuildKit reads it in `${V#p}` and `${V/p/r}`: `*`, `?`, `\*`,
/// `\?`, `\\`, and `\}` / `\/` for a literal `}` / `/`; brackets are plain characters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Vec<Tok>);

impl Pattern {
    fn compile(text: &str) -> Result<Pattern, String> {
        let mut toks = Vec::new();
        let mut it = text.chars().peekable();
        while let Some(c) = it.next() {
            toks.push(match c {
                '*' => Tok::Star,
                '?' => Tok::Any,
                '\\' => match it.next() {
                    Some(n @ ('}' | '/' | '*' | '?' | '\\')) => Tok::Lit(n),
                    Some(n) => {
                        return Err(format!(
                            "invalid pattern ({text}) in substitution: invalid escape '\\{n}'"
                        ))
                    }
                    None => {
                        return Err(format!(
                            "invalid pattern ({text}) in substitution: trailing escape"
                        ))
                    }
                },
                c => Tok::Lit(c),
            });
        }
        Ok(Pattern(toks))
    }

    /// Whether the whole of `s` matches.
    fn matches(&self, s: &[char]) -> bool {
        fn go(p: &[Tok], s: &[char]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some((Tok::Star, rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
                Some((Tok::Any, rest)) => !s.is_empty() && go(rest, &s[1..]),
                Some((Tok::Lit(c), rest)) => s.first() == Some(c) && go(rest, &s[1..]),
            }
        }
        go(&self.0, s)
    }

    /// `${V#p}` (shortest) or `${V##p}` (longest): `value` without a matching prefix.
    fn trim_prefix(&self, value: &[char], greedy: bool) -> String {
        let mut ends: Box<dyn Iterator<Item = usize>> = if greedy {
            Box::new((0..=value.len()).rev())
        } else {
            Box::new(0..=value.len())
        };
        match ends.find(|&e| self.matches(&value[..e])) {
            Some(e) => value[e..].iter().collect(),
            None => value.iter().collect(),
        }
    }

    /// `${V%p}` (shortest) or `${V%%p}` (longest): `value` without a matching suffix.
    fn trim_suffix(&self, value: &[char], greedy: bool) -> String {
        let mut starts: Box<dyn Iterator<Item = usize>> = if greedy {
            Box::new(0..=value.len())
        } else {
            Box::new((0..=value.len()).rev())
        };
        match starts.find(|&b| self.matches(&value[b..])) {
            Some(b) => value[..b].iter().collect(),
            None => value.iter().collect(),
        }
    }

    /// The leftmost match starting at or after `from`, longest at that start.
    fn find(&self, value: &[char], from: usize) -> Option<(usize, usize)> {
        (from..=value.len()).find_map(|b| {
            (b..=value.len())
                .rev()
                .find(|&e| self.matches(&value[b..e]))
                .map(|e| (b, e))
        })
    }

    /// `${V/p/r}` (first match) or `${V//p/r}` (every match; an empty match right after
    /// another match is not replaced, as Go's `ReplaceAllString` does).
    fn replace(&self, value: &[char], replacement: &str, all: bool) -> String {
        let mut out = String::new();
        let mut last = 0;
        let mut pos = 0;
        while pos <= value.len() {
            let Some((b, e)) = self.find(value, pos) else {
                break;
            };
            out.extend(&value[last..b]);
            if e > last || b == 0 {
                out.push_str(replacement);
            }
            last = e;
            if !all {
                break;
            }
            pos = if e > pos { e } else { pos + 1 };
        }
        out.extend(&value[last.min(value.len())..]);
        out
    }
}

fn or(word: String, default: &str) -> String {
    if word.is_empty() {
        default.to_string()
    } else {
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        [("A", "a"), ("E", ""), ("SP", "x  y"), ("P", "/usr/bin")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn word(s: &str) -> Result<String, String> {
        Lexer::new('\\').process_word(s, &env())
    }

    fn words(s: &str) -> Result<Vec<String>, String> {
        Lexer::new('\\').process_words(s, &env())
    }

    #[test]
    fn simple_and_braced() {
        assert_eq!(word("$A").as_deref(), Ok("a"));
        assert_eq!(word("${A}b").as_deref(), Ok("ab"));
        assert_eq!(word("$Ab").as_deref(), Ok(""));
        assert_eq!(word("x$NOPE-y").as_deref(), Ok("x-y"));
        assert_eq!(word("$").as_deref(), Ok("$"));
        assert_eq!(word("a$ b").as_deref(), Ok("a$ b"));
        assert_eq!(word("$1x").as_deref(), Ok("x"));
    }

    #[test]
    fn modifiers() {
        assert_eq!(word("${A:-w}").as_deref(), Ok("a"));
        assert_eq!(word("${E:-w}").as_deref(), Ok("w"));
        assert_eq!(word("${U:-w}").as_deref(), Ok("w"));
        assert_eq!(word("${E-w}").as_deref(), Ok(""));
        assert_eq!(word("${U-w}").as_deref(), Ok("w"));
        assert_eq!(word("${A:+w}").as_deref(), Ok("w"));
        assert_eq!(word("${E:+w}").as_deref(), Ok(""));
        assert_eq!(word("${E+w}").as_deref(), Ok("w"));
        assert_eq!(word("${U+w}").as_deref(), Ok(""));
        assert_eq!(word("${U:-$A$A}").as_deref(), Ok("aa"));
        assert_eq!(word("${U:-'q r'}").as_deref(), Ok("q r"));
        assert_eq!(word("${A:?x}").as_deref(), Ok("a"));
        assert_eq!(word("${U:?must be set}"), Err("U: must be set".to_string()));
        assert_eq!(
            word("${E:?}"),
            Err("E: is not allowed to be empty".to_string())
        );
        assert_eq!(
            word("${U?}"),
            Err("U: is not allowed to be unset".to_string())
        );
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(word("${A"), Err("syntax error: missing '}'".to_string()));
        assert_eq!(
            word("${}"),
            Err("syntax error: bad substitution".to_string())
        );
        assert_eq!(
            word("${:-x}"),
            Err("syntax error: bad substitution".to_string())
        );
        assert_eq!(word("${A:-x"), Err("syntax error: missing '}'".to_string()));
        assert!(word("${A:%x}").is_err_and(|e| e.contains("unsupported modifier (:%)")));
        assert!(word("${A:#x}").is_err_and(|e| e.contains("unsupported modifier (:#)")));
        assert!(word("${A#\\x}").is_err_and(|e| e.contains("invalid escape")));
        assert!(word("${A/x}").is_err_and(|e| e.contains("missing")));
        assert!(word("'abc").is_err_and(|e| e.contains("single-quote")));
        assert!(word("\"abc").is_err_and(|e| e.contains("double-quote")));
    }

    #[test]
    fn pattern_trims_and_replacements() {
        let mut e = env();
        e.insert("F".into(), "/home/tux/book.tar.bz2".into());
        e.insert("S".into(), "a*b?c".into());
        let w = |s: &str| Lexer::new('\\').process_word(s, &e);
        assert_eq!(w("${F#*/}").as_deref(), Ok("home/tux/book.tar.bz2"));
        assert_eq!(w("${F##*/}").as_deref(), Ok("book.tar.bz2"));
        assert_eq!(w("${F%.*}").as_deref(), Ok("/home/tux/book.tar"));
        assert_eq!(w("${F%%.*}").as_deref(), Ok("/home/tux/book"));
        assert_eq!(w("${F#nomatch}").as_deref(), Ok("/home/tux/book.tar.bz2"));
        assert_eq!(w("${F#/h?me}").as_deref(), Ok("/tux/book.tar.bz2"));
        assert_eq!(w("${P#$P}").as_deref(), Ok(""));
        assert_eq!(w("${U#x}").as_deref(), Ok(""));
        assert_eq!(
            w("${F/tux/wilber}").as_deref(),
            Ok("/home/wilber/book.tar.bz2")
        );
        assert_eq!(w("${F//o/0}").as_deref(), Ok("/h0me/tux/b00k.tar.bz2"));
        assert_eq!(w("${F/o*/X}").as_deref(), Ok("/hX"));
        assert_eq!(w("${F/\\//_}").as_deref(), Ok("_home/tux/book.tar.bz2"));
        assert_eq!(w("${F//\\//_}").as_deref(), Ok("_home_tux_book.tar.bz2"));
        assert_eq!(w("${S/\\*/star}").as_deref(), Ok("astarb?c"));
        assert_eq!(w("${S/\\?/q}").as_deref(), Ok("a*bqc"));
        assert_eq!(w("${S/[/x}").as_deref(), Ok("a*b?c"));
        assert_eq!(w("${A//x*/y}").as_deref(), Ok("a"));
        assert_eq!(w("${P//x/}").as_deref(), Ok("/usr/bin"));
        assert_eq!(w("${P/\\/usr/}").as_deref(), Ok("/bin"));
        assert!(w("${P//}").is_err());
    }

    #[test]
    fn quotes() {
        assert_eq!(word("'$A'").as_deref(), Ok("$A"));
        assert_eq!(word("\"$A b\"").as_deref(), Ok("a b"));
        assert_eq!(word("\"a\\\"b\"").as_deref(), Ok("a\"b"));
        assert_eq!(word("\"a\\nb\"").as_deref(), Ok("a\\nb"));
        assert_eq!(word("\"\\$A\"").as_deref(), Ok("$A"));
        assert_eq!(word("'a\\b'").as_deref(), Ok("a\\b"));
        assert_eq!(word("a'b'\"c\"").as_deref(), Ok("abc"));
    }

    #[test]
    fn escapes() {
        assert_eq!(word("\\$A").as_deref(), Ok("$A"));
        assert_eq!(word("a\\ b").as_deref(), Ok("a b"));
        assert_eq!(word("a\\").as_deref(), Ok("a"));
        let bt = Lexer::new('`');
        assert_eq!(bt.process_word("`$A\\x", &env()).as_deref(), Ok("$A\\x"));
    }

    #[test]
    fn splitting() {
        assert_eq!(
            words("a  b\tc"),
            Ok(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(words("$SP z"), Ok(vec!["x".into(), "y".into(), "z".into()]));
        assert_eq!(words("\"$SP\" z"), Ok(vec!["x  y".into(), "z".into()]));
        assert_eq!(words("a\\ b c"), Ok(vec!["a b".into(), "c".into()]));
        assert_eq!(words("'' x"), Ok(vec!["".into(), "x".into()]));
        assert_eq!(words("$E"), Ok(vec![]));
    }

    #[test]
    fn display_keeps_quotes_and_unset() {
        let lex = Lexer::new('\\');
        assert_eq!(
            lex.display("echo \"$A\" '$A' $NOPE ${NOPE} ${NOPE:-x} ${A:-x}", &env()),
            "echo \"a\" '$A' $NOPE ${NOPE} ${NOPE:-x} a"
        );
        assert_eq!(lex.display("echo ${A", &env()), "echo ${A");
    }

    #[test]
    fn heredoc_expansion_keeps_quotes() {
        let lex = Lexer::new('\\');
        assert_eq!(
            lex.expand_heredoc("echo '$A' \"$P\" \\$A \\n\n", &env())
                .as_deref(),
            Ok("echo 'a' \"/usr/bin\" $A \\n\n")
        );
    }
}
