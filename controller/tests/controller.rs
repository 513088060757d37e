//! Integration tests of kiln-controller, in one binary: CRD drift, schema validation of every
//! rendered object, and reconciles against a mocked API server.

#[path = "controller/cluster.rs"]
mod cluster;
#[path = "controller/crdgen.rs"]
mod crdgen;
#[path = "controller/handshake.rs"]
mod handshake;
#[path = "controller/job.rs"]
mod job;
#[path = "controller/leader.rs"]
mod leader;
#[path = "controller/mockapi.rs"]
mod mockapi;
#[path = "controller/reconcile.rs"]
mod reconcile;
#[path = "controller/transport.rs"]
mod transport;
#[path = "controller/validate.rs"]
mod validate;
