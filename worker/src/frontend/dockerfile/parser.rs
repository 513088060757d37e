//! Dockerfile text → logical lines (directives, comments, continuations, heredocs).
