//! The `dockerfile.v0` frontend: [`parser`] (text → lines and instructions with line
//! numbers), [`instructions`] (typed instructions, flags, variable expansion) and
//! [`convert`] (instructions → LLB and image config).

pub mod convert;
pub mod instructions;
pub mod parser;

pub use convert::{convert, required_images};
