//! Filesystem semantics of LLB file actions over plain directories, never leaving the
//! roots they are given. PLACEHOLDER in main until the snapmount branch lands.

use std::path::Path;

use crate::llb::pb;

/// What can go wrong in a file action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Copy.
pub fn copy(_s: &Path, _d: &Path, _a: &pb::FileActionCopy, _o: Option<(u32, u32)>) -> Result<()> {
    Err(Error::NotImplemented("copy"))
}
/// Mkfile.
pub fn mkfile(_r: &Path, _a: &pb::FileActionMkFile, _o: Option<(u32, u32)>) -> Result<()> {
    Err(Error::NotImplemented("mkfile"))
}
/// Mkdir.
pub fn mkdir(_r: &Path, _a: &pb::FileActionMkDir, _o: Option<(u32, u32)>) -> Result<()> {
    Err(Error::NotImplemented("mkdir"))
}
/// Rm.
pub fn rm(_r: &Path, _a: &pb::FileActionRm) -> Result<()> {
    Err(Error::NotImplemented("rm"))
}
/// Symlink.
pub fn symlink(_r: &Path, _a: &pb::FileActionSymlink, _o: Option<(u32, u32)>) -> Result<()> {
    Err(Error::NotImplemented("symlink"))
}
/// Owner.
pub fn resolve_owner(_o: Option<&pb::ChownOpt>, _r: Option<&Path>) -> Result<Option<(u32, u32)>> {
    Err(Error::NotImplemented("owner"))
}
/// Checksum.
pub fn copy_checksum(_s: &Path, _a: &pb::FileActionCopy) -> Result<String> {
    Err(Error::NotImplemented("checksum"))
}
