//! Parses arbitrary `.dockerignore` text and matches the paths it names against it:
//! any input must give a result or an error, never a panic.
#![no_main]

use kiln_worker::source::local::patterns::{parse_dockerignore, PatternMatcher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let patterns = parse_dockerignore(text);
    let Ok(matcher) = PatternMatcher::new(&patterns) else {
        return;
    };
    for p in &patterns {
        let path = p.trim_start_matches('!');
        let _ = matcher.matches(path);
        let _ = matcher.might_match_children(path);
    }
    let _ = matcher.matches("a/b/c");
});
