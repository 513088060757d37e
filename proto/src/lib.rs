//! Kiln's wire contracts, generated from `proto/*.proto` at build time.
//!
//! `pb` is BuildKit's LLB with BuildKit's package, names and field numbers, so that
//! definitions marshalled by Go clients (buildctl, buildx) decode unchanged. Nothing in
//! this crate does I/O; the worker, gateway and CLI depend on it, never the reverse.

/// BuildKit's LLB (`solver/pb/ops.proto`, package `pb`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb.rs"));
}
