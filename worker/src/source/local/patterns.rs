//! `.dockerignore`-style path patterns (Go filepath.Match syntax plus `**` and `!`
//! exceptions), as BuildKit's local source and Docker apply them.
