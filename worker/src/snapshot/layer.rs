//! Layer tars: writing an OCI layer from an overlay upper dir (whiteout devices and opaque
//! markers become `.wh.` entries) and unpacking a (compressed) layer blob into an empty
//! layer dir in overlay format, never writing outside it.

use std::io::Write;
use std::path::Path;

use super::{Error, Result};

/// What unpacking a layer found.
#[derive(Debug, Clone)]
pub struct UnpackStats {
    /// sha256 of the uncompressed tar (`diff_id`).
    pub diff_id: String,
    /// Uncompressed bytes read.
    pub size: u64,
}

/// Limits that protect the worker from hostile layers.
#[derive(Debug, Clone)]
pub struct UnpackLimits {
    /// Most uncompressed bytes one layer may expand to.
    pub max_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 64 << 30,
        }
    }
}

/// Unpacks the blob at `blob` (media type decides gzip/zstd/none) into the empty dir `dest`.
pub fn unpack_blob(
    _blob: &Path,
    _media_type: &str,
    _dest: &Path,
    _limits: &UnpackLimits,
) -> Result<UnpackStats> {
    Err(Error::NotImplemented("layer unpack"))
}

/// Writes the uncompressed OCI layer tar of the upper dir `dir` to `w`, entries sorted,
/// times kept, whiteouts converted.
pub fn write_tar(_dir: &Path, _w: &mut dyn Write) -> Result<()> {
    Err(Error::NotImplemented("layer tar"))
}
