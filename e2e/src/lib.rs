//! Whole-system tests of Kiln; the tests live in `tests/`, helpers for them here: a real
//! registry ([`registry`]), a busybox base image to push into it ([`base`]) and test
//! certificates ([`pki`]), a git daemon ([`git`]), network faults (a partitionable TCP
//! forwarder, a registry that stops and starts again: [`netfault`]) and the load harness
//! behind `kiln-load` ([`load`]), and tiny LLB definitions ([`llb`]). This crate never depends on `kiln-worker`, so the helpers
//! stay usable from scripts and other crates'
//! tests alike.

pub mod base;
pub mod fleet;
pub mod git;
pub mod http;
pub mod llb;
pub mod load;
pub mod netfault;
pub mod pki;
pub mod registry;
