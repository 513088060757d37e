//! The `dockerfile.v0` frontend: [`parser`] (text → lines and instructions with line
//! numbers), [`instructions`] (typed instructions and flags), [`shell`] (Docker's word
//! lexer and variable expansion), [`convert`](mod@convert) (instructions → LLB and image config) and
//! [`dump`] (a stable text rendering of a conversion, for golden tests and debugging).

pub mod convert;
pub mod dump;
pub mod instructions;
pub mod parser;
pub mod shell;

pub use convert::{convert, missing_images, required_images};
