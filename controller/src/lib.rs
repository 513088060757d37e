//! Kiln's Kubernetes operator as a library.
//!
//! Layout (as kube-rs's controller-rs): [`crd`] holds the resource types and makes no client
//! calls; [`units`] parses sizes and durations; [`crdgen`] writes the CRD YAML; [`render`]
//! turns a pool into the Kubernetes objects it owns (pure functions); [`tls`] issues and
//! checks certificates; [`reconcile`] applies all of it to a cluster; [`leader`] elects the one
//! replica that reconciles; [`metrics`] counts and serves what they do. `main.rs` wires the
//! binary.

pub mod crd;
pub mod crdgen;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod tls;
pub mod units;

pub use error::{Error, Result};
