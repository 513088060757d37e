//! LLB as plain data: decoding and validating a `pb.Definition` into a graph of ops
//! named by digest, and a small builder ([`builder`]) that frontends use to emit one.
//! No I/O; may use only `kiln-proto`.

pub mod builder;

use std::collections::HashMap;

pub use kiln_proto::pb;
use prost::Message;
use sha2::{Digest as _, Sha256};

/// What can be wrong with a definition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An element of `Definition.def` is not a valid `pb.Op`.
    #[error("llb definition: op #{index} does not decode")]
    Decode {
        /// Position in `Definition.def`.
        index: usize,
        /// What prost reported.
        #[source]
        source: prost::DecodeError,
    },
    /// The definition has fewer than two ops or no terminal op.
    #[error("llb definition: {0}")]
    Invalid(String),
    /// An op names an input digest that is not defined before it.
    #[error("llb definition: op {op} has input {input} that is not in the definition")]
    MissingInput {
        /// The op with the dangling input.
        op: String,
        /// The digest it names.
        input: String,
    },
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `sha256:<hex>` of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One decoded op with its digest.
#[derive(Debug, Clone)]
pub struct Vertex {
    /// Digest of the op's bytes as received.
    pub digest: String,
    /// The op.
    pub op: pb::Op,
    /// Metadata from `Definition.metadata`, default when absent.
    pub metadata: pb::OpMetadata,
}

/// A validated definition: every op by digest, in dependency order, and the result.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Ops in the order they were defined (inputs before users), without the terminal op.
    pub vertices: Vec<Vertex>,
    /// Index of each vertex in `vertices` by digest.
    pub by_digest: HashMap<String, usize>,
    /// The build result: which op and which of its outputs.
    pub result: pb::Input,
}

impl Graph {
    /// The vertex with this digest.
    pub fn get(&self, digest: &str) -> Option<&Vertex> {
        self.by_digest.get(digest).map(|&i| &self.vertices[i])
    }
}

/// Decodes and validates a definition: every op decodes, inputs refer to earlier ops,
/// the last op is the terminal marker with exactly one input.
pub fn decode(def: &pb::Definition) -> Result<Graph> {
    if def.def.len() < 2 {
        return Err(Error::Invalid(format!(
            "needs at least 2 ops (got {})",
            def.def.len()
        )));
    }
    let mut vertices = Vec::with_capacity(def.def.len() - 1);
    let mut by_digest = HashMap::new();
    let last = def.def.len() - 1;
    let mut result = None;
    for (index, bytes) in def.def.iter().enumerate() {
        let op =
            pb::Op::decode(bytes.as_slice()).map_err(|source| Error::Decode { index, source })?;
        let digest = digest_of(bytes);
        for input in &op.inputs {
            if !by_digest.contains_key(&input.digest) {
                return Err(Error::MissingInput {
                    op: digest,
                    input: input.digest.clone(),
                });
            }
            if input.index < 0 {
                return Err(Error::Invalid(format!(
                    "op {digest} has negative input index {}",
                    input.index
                )));
            }
        }
        if index == last {
            if op.op.is_some() || op.inputs.len() != 1 {
                return Err(Error::Invalid(
                    "the last op must be a terminal op with exactly one input".to_string(),
                ));
            }
            result = Some(op.inputs[0].clone());
            break;
        }
        if op.op.is_none() {
            return Err(Error::Invalid(format!(
                "op {digest} (#{index}) has no operation"
            )));
        }
        if by_digest.contains_key(&digest) {
            continue;
        }
        let metadata = def.metadata.get(&digest).cloned().unwrap_or_default();
        by_digest.insert(digest.clone(), vertices.len());
        vertices.push(Vertex {
            digest,
            op,
            metadata,
        });
    }
    let result = result.ok_or_else(|| Error::Invalid("no terminal op".to_string()))?;
    Ok(Graph {
        vertices,
        by_digest,
        result,
    })
}
