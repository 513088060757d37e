//! The `tar` exporter: the result filesystem as one tar stream, entries in a
//! deterministic order (sorted, directories before their contents), owners, modes,
//! times, xattrs, symlinks, hard links and devices kept.

use std::io::Write;
use std::path::Path;

use super::Result;

/// Writes the tree at `view` to `w` as a tar stream.
pub fn export_tar(view: &Path, w: &mut dyn Write) -> Result<()> {
    crate::snapshot::layer::write_tree_tar(view, w)?;
    Ok(())
}
