//! The `docker` exporter. PLACEHOLDER.
use super::{image::BuiltImage, Error, Result};
use crate::content::ContentStore;
/// Write.
pub fn write_docker_tar(
    _c: &ContentStore,
    _b: &BuiltImage,
    _n: &[String],
    _w: &mut dyn std::io::Write,
) -> Result<()> {
    Err(Error::NotImplemented("docker"))
}
