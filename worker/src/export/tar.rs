//! The `tar` exporter. PLACEHOLDER.
use super::{Error, Result};
/// Export.
pub fn export_tar(_v: &std::path::Path, _w: &mut dyn std::io::Write) -> Result<()> {
    Err(Error::NotImplemented("tar"))
}
