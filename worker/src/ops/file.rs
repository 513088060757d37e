//! The file op: LLB `FileOp` actions (copy, mkfile, mkdir, rm, symlink) run against
//! mounted snapshots; the filesystem work itself is in [`fsops`].

pub mod fsops;
