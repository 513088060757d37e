//! Local sources: a directory of the client (daemonless: on this host), filtered by
//! include/exclude patterns ([`patterns`]), hashed by content.

pub mod patterns;
