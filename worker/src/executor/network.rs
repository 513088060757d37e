//! Container network setup: host namespace or a fresh one with only loopback.
