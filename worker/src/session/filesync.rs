//! The fsutil `DiffCopy` transfer over `moby.filesync.v1.FileSync`
//! (shared/design/buildkit-wire.md §6.1, §6.2), both roles:
//!
//! * the **sender** ([`LocalDirs`], the CLI side): a `FileSync` server that walks a
//!   named local directory, filtered by the `dir-name`, `include-patterns`,
//!   `exclude-patterns` and `followpaths` request headers, streams the STAT listing in
//!   path order, then answers REQ packets with DATA chunks and the FIN handshake;
//! * the **receiver** ([`receive`], the daemon side): calls `DiffCopy` with those
//!   headers, validates the listing (clean relative paths, order, parents sent before
//!   children and being real directories), requests every regular file ("differ
//!   none") and writes the tree into a destination directory, never outside it and
//!   never through a symlink, keeping modes, ownership (when root), mtimes, symlinks,
//!   hard links and xattrs.

mod receive;
mod send;

pub use receive::{receive, receive_stream, ReceiveOptions};
pub(crate) use send::send_dir;
pub(crate) use send::stat_of;
pub use send::LocalDirs;

use kiln_proto::fsutil::types::packet::PacketType;
use kiln_proto::fsutil::types::Packet;
use kiln_proto::metadata as md;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::SessionError;

/// The largest DATA chunk a sender emits (the Go sender reads 32 KiB at a time).
pub const MAX_CHUNK: usize = 32 * 1024;

/// What a `DiffCopy` request selects: the header values of §6.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// `dir-name`: the local directory's name (`context`, `dockerfile`, …).
    pub dir_name: String,
    /// `include-patterns`: only matching paths are sent.
    pub include_patterns: Vec<String>,
    /// `exclude-patterns`: matching paths are not sent (`.dockerignore` lines).
    pub exclude_patterns: Vec<String>,
    /// `followpaths`: only these paths (and their parents, and symlink targets).
    pub follow_paths: Vec<String>,
}

impl Selection {
    /// Writes the selection as request headers; a key whose values are not all
    /// printable ASCII is URL-query-escaped and flagged with `<key>-encoded: 1`.
    pub fn to_metadata(&self, meta: &mut MetadataMap) -> Result<(), SessionError> {
        put_values(meta, md::DIR_NAME, std::slice::from_ref(&self.dir_name))?;
        put_values(meta, md::INCLUDE_PATTERNS, &self.include_patterns)?;
        put_values(meta, md::EXCLUDE_PATTERNS, &self.exclude_patterns)?;
        put_values(meta, md::FOLLOW_PATHS, &self.follow_paths)?;
        Ok(())
    }

    /// Reads the selection from request headers, unescaping `-encoded` keys.
    pub fn from_metadata(meta: &MetadataMap) -> Result<Selection, SessionError> {
        Ok(Selection {
            dir_name: get_values(meta, md::DIR_NAME)?
                .into_iter()
                .next()
                .unwrap_or_default(),
            include_patterns: get_values(meta, md::INCLUDE_PATTERNS)?,
            exclude_patterns: get_values(meta, md::EXCLUDE_PATTERNS)?,
            follow_paths: get_values(meta, md::FOLLOW_PATHS)?,
        })
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn put_values(
    meta: &mut MetadataMap,
    key: &'static str,
    values: &[String],
) -> Result<(), SessionError> {
    let encode = !values.iter().all(|v| printable(v));
    for v in values {
        let text = if encode { query_escape(v) } else { v.clone() };
        let value: MetadataValue<_> = text.parse().map_err(|_| {
            SessionError::protocol(format!("header {key} value {v:?} cannot be sent"))
        })?;
        meta.append(key, value);
    }
    if encode {
        let flag = format!("{key}{}", md::ENCODED_SUFFIX);
        let name = tonic::metadata::MetadataKey::from_bytes(flag.as_bytes())
            .map_err(|_| SessionError::protocol(format!("invalid header name {flag}")))?;
        meta.insert(name, MetadataValue::from_static("1"));
    }
    Ok(())
}

fn get_values(meta: &MetadataMap, key: &str) -> Result<Vec<String>, SessionError> {
    let encoded = meta
        .get(format!("{key}{}", md::ENCODED_SUFFIX).as_str())
        .is_some();
    meta.get_all(key)
        .iter()
        .map(|v| {
            let text = v.to_str().map_err(|_| {
                SessionError::protocol(format!("header {key} has a non-ascii value"))
            })?;
            if encoded {
                query_unescape(text).ok_or_else(|| {
                    SessionError::protocol(format!("header {key} value {text:?} is badly escaped"))
                })
            } else {
                Ok(text.to_string())
            }
        })
        .collect()
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Go's `url.QueryUnescape`; `None` on a bad escape or non-UTF-8 result.
fn query_unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn packet(kind: PacketType) -> Packet {
    Packet {
        r#type: kind as i32,
        ..Packet::default()
    }
}

fn err_packet(message: &str) -> Packet {
    Packet {
        data: message.as_bytes().to_vec(),
        ..packet(PacketType::PacketErr)
    }
}

fn kind_name(kind: i32) -> String {
    PacketType::try_from(kind)
        .map(|k| k.as_str_name().to_string())
        .unwrap_or_else(|_| format!("unknown packet type {kind}"))
}

#[cfg(test)]
mod recorded;
#[cfg(test)]
mod tests;
