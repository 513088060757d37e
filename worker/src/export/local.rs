//! The `local` exporter. PLACEHOLDER.
use super::{Error, Result};
/// Export.
pub fn export_local(_v: &std::path::Path, _d: &std::path::Path) -> Result<()> {
    Err(Error::NotImplemented("local"))
}
