//! A small LLB builder: frontends add ops and get back an `Output` handle naming one of
//! the op's outputs; `marshal` produces a `pb.Definition` with ops in dependency order,
//! each encoded once, and a terminal op last, as BuildKit's Go client does.

use std::collections::{BTreeMap, HashMap};

use prost::Message;

use super::{digest_of, pb};

/// One output of one op in a [`Builder`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Output {
    /// Digest of the op.
    pub digest: String,
    /// Which output of the op.
    pub index: i64,
}

/// Accumulates ops; each op is stored once however often it is added.
#[derive(Debug, Default)]
pub struct Builder {
    ops: Vec<(String, Vec<u8>)>,
    seen: HashMap<String, usize>,
    metadata: BTreeMap<String, pb::OpMetadata>,
}

impl Builder {
    /// An empty builder.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Adds an op whose inputs are already in this builder; returns its digest.
    pub fn add(&mut self, op: &pb::Op, metadata: Option<pb::OpMetadata>) -> String {
        let bytes = op.encode_to_vec();
        let digest = digest_of(&bytes);
        if !self.seen.contains_key(&digest) {
            self.seen.insert(digest.clone(), self.ops.len());
            self.ops.push((digest.clone(), bytes));
        }
        if let Some(md) = metadata {
            self.metadata.insert(digest.clone(), md);
        }
        digest
    }

    /// The definition whose result is `result`.
    pub fn marshal(&self, result: &Output) -> pb::Definition {
        let mut def: Vec<Vec<u8>> = self.ops.iter().map(|(_, b)| b.clone()).collect();
        let terminal = pb::Op {
            inputs: vec![pb::Input {
                digest: result.digest.clone(),
                index: result.index,
            }],
            ..Default::default()
        };
        def.push(terminal.encode_to_vec());
        pb::Definition {
            def,
            metadata: self.metadata.clone().into_iter().collect(),
            source: None,
        }
    }
}
