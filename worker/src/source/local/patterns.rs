//! `.dockerignore`-style path patterns (Go filepath.Match syntax plus `**` and `!`
//! exceptions), as BuildKit's local source and Docker apply them.
//! PLACEHOLDER in main until the frontend branch lands: exact-prefix matching only.

/// A compiled pattern list.
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<String>,
}

/// A malformed pattern.
#[derive(Debug, thiserror::Error)]
#[error("invalid pattern {0:?}")]
pub struct PatternError(pub String);

impl PatternMatcher {
    /// Compiles patterns.
    pub fn new(patterns: &[String]) -> Result<PatternMatcher, PatternError> {
        Ok(PatternMatcher {
            patterns: patterns.to_vec(),
        })
    }

    /// True when `rel` is excluded.
    pub fn matches(&self, rel: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| rel == p || rel.starts_with(&format!("{p}/")))
    }
}
