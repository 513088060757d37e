//! The `kiln_cli` library: the BuildKit client that `kiln build --addr` and the controller's
//! BuildJob runner share, so both drive a daemon or gateway the same way.
//!
//! [`client`] owns the connection (address and TLS), the session the client serves (local
//! directories, secrets, registry credentials, outputs coming back), the Solve and LLBBridge
//! calls and the Status stream; [`client::LogLines`] turns that progress into plain text
//! lines. The `kiln` binary's flag parsing and progress rendering stay in the binary.

pub mod client;
