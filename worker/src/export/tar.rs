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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{describe, sample_tree};

    #[test]
    fn tar_stream_round_trips_and_is_deterministic() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("src");
        std::fs::create_dir(&src)?;
        sample_tree(&src, false)?;
        // A real char device stays a device (no whiteout conversion outside layers).
        nix::sys::stat::mknod(
            &src.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )?;
        let mut a = Vec::new();
        export_tar(&src, &mut a)?;
        let mut b = Vec::new();
        export_tar(&src, &mut b)?;
        assert_eq!(a, b);
        let dest = t.path().join("dest");
        std::fs::create_dir(&dest)?;
        crate::snapshot::layer::unpack_stream(&a[..], "tar", &dest, &Default::default())?;
        assert_eq!(describe(&src)?, describe(&dest)?);
        Ok(())
    }
}
