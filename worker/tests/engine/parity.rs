//! Dockerfile parity: each instruction and expansion rule against exact files, modes,
//! owners and image config.
