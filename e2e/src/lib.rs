//! Whole-system tests of Kiln; the tests live in `tests/`, helpers for them here: a real
//! registry ([`registry`]) and a busybox base image to push into it ([`base`]). This crate
//! never depends on `kiln-worker`, so the helpers stay usable from scripts and other crates'
//! tests alike.

pub mod base;
pub mod fleet;
pub mod http;
pub mod registry;
