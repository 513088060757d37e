//! Typed Dockerfile instructions and variable expansion.
