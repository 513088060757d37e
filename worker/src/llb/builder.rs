//! A small LLB builder: frontends add ops and get back an `Output` handle naming one of
//! the op's outputs; `marshal` produces a `pb.Definition` with ops in dependency order,
//! each encoded once, and a terminal op last, as BuildKit's Go client does.
//!
//! Encoding is deterministic like Go's: prost writes `map` fields in `HashMap` order,
//! so source ops (the only ops with a map, `attrs`) are encoded here with their
//! attributes sorted by key; otherwise the same op would get a different digest per run.

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
    inputs: HashMap<String, Vec<String>>,
    /// Source ranges (1-based first and last line) of each op, for error messages.
    locations: HashMap<String, Vec<(usize, usize)>>,
    /// The file the locations refer to: name and contents.
    source: Option<(String, Vec<u8>)>,
    metadata: BTreeMap<String, pb::OpMetadata>,
}

impl Builder {
    /// An empty builder.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Adds an op whose inputs are already in this builder; returns its digest.
    pub fn add(&mut self, op: &pb::Op, metadata: Option<pb::OpMetadata>) -> String {
        let bytes = encode_op(op);
        let digest = digest_of(&bytes);
        if !self.seen.contains_key(&digest) {
            self.seen.insert(digest.clone(), self.ops.len());
            self.ops.push((digest.clone(), bytes));
            self.inputs.insert(
                digest.clone(),
                op.inputs.iter().map(|i| i.digest.clone()).collect(),
            );
        }
        if let Some(md) = metadata {
            self.metadata.insert(digest.clone(), md);
        }
        digest
    }

    /// Names the source file that [`Builder::add_location`] ranges refer to.
    pub fn set_source(&mut self, filename: &str, data: &[u8]) {
        self.source = Some((filename.to_string(), data.to_vec()));
    }

    /// Records that an op comes from lines `start..=end` (1-based) of the source file.
    pub fn add_location(&mut self, digest: &str, start: usize, end: usize) {
        let ranges = self.locations.entry(digest.to_string()).or_default();
        if !ranges.contains(&(start, end)) {
            ranges.push((start, end));
        }
    }

    /// Whether an op with this digest was added.
    pub fn contains(&self, digest: &str) -> bool {
        self.seen.contains_key(digest)
    }

    /// Adds metadata for an op only if it has none yet.
    pub fn set_metadata_if_absent(&mut self, digest: &str, metadata: pb::OpMetadata) {
        self.metadata.entry(digest.to_string()).or_insert(metadata);
    }

    /// The definition whose result is `result`: only the ops it depends on, in the order
    /// they were added (inputs first), with their metadata.
    pub fn marshal(&self, result: &Output) -> pb::Definition {
        let mut reachable = std::collections::HashSet::new();
        let mut todo = vec![result.digest.clone()];
        while let Some(d) = todo.pop() {
            if reachable.insert(d.clone()) {
                todo.extend(self.inputs.get(&d).into_iter().flatten().cloned());
            }
        }
        let mut def: Vec<Vec<u8>> = self
            .ops
            .iter()
            .filter(|(d, _)| reachable.contains(d))
            .map(|(_, b)| b.clone())
            .collect();
        let terminal = pb::Op {
            inputs: vec![pb::Input {
                digest: result.digest.clone(),
                index: result.index,
            }],
            ..Default::default()
        };
        def.push(terminal.encode_to_vec());
        let source = self.source.as_ref().map(|(filename, data)| {
            let position = |line: usize| pb::Position {
                line: i32::try_from(line).unwrap_or(i32::MAX),
                character: 0,
            };
            pb::Source {
                locations: self
                    .locations
                    .iter()
                    .filter(|(d, _)| reachable.contains(*d))
                    .map(|(d, ranges)| {
                        let loc = pb::Location {
                            source_index: 0,
                            ranges: ranges
                                .iter()
                                .map(|&(s, e)| pb::Range {
                                    start: Some(position(s)),
                                    end: Some(position(e)),
                                })
                                .collect(),
                        };
                        (
                            d.clone(),
                            pb::Locations {
                                locations: vec![loc],
                            },
                        )
                    })
                    .collect(),
                infos: vec![pb::SourceInfo {
                    filename: filename.clone(),
                    data: data.clone(),
                    definition: None,
                    language: "Dockerfile".to_string(),
                }],
            }
        });
        pb::Definition {
            def,
            metadata: self
                .metadata
                .iter()
                .filter(|(d, _)| reachable.contains(*d))
                .map(|(d, m)| (d.clone(), m.clone()))
                .collect(),
            source,
        }
    }
}

fn put_bytes(field: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

/// Encodes an op deterministically: like prost, but a source op's `attrs` sorted by key
/// (each entry with both key and value, as Go writes them).
pub fn encode_op(op: &pb::Op) -> Vec<u8> {
    let Some(pb::op::Op::Source(src)) = &op.op else {
        return op.encode_to_vec();
    };
    if src.attrs.is_empty() {
        return op.encode_to_vec();
    }
    let mut source = Vec::new();
    if !src.identifier.is_empty() {
        put_bytes(1, src.identifier.as_bytes(), &mut source);
    }
    let mut attrs: Vec<(&String, &String)> = src.attrs.iter().collect();
    attrs.sort();
    for (k, v) in attrs {
        let mut entry = Vec::new();
        put_bytes(1, k.as_bytes(), &mut entry);
        put_bytes(2, v.as_bytes(), &mut entry);
        put_bytes(2, &entry, &mut source);
    }
    // Fields 1 (inputs) come before the oneof (3), platform (10) and constraints (11) after.
    let inputs_only = pb::Op {
        inputs: op.inputs.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let without_op = pb::Op {
        op: None,
        ..op.clone()
    }
    .encode_to_vec();
    let mut out = inputs_only.clone();
    put_bytes(3, &source, &mut out);
    out.extend_from_slice(&without_op[inputs_only.len()..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marshal_keeps_only_what_the_result_needs() -> anyhow::Result<()> {
        let mut b = Builder::new();
        let src = |id: &str| pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: id.to_string(),
                attrs: Default::default(),
            })),
            ..Default::default()
        };
        let a = b.add(&src("a"), None);
        let unused = b.add(&src("unused"), Some(pb::OpMetadata::default()));
        let user = pb::Op {
            inputs: vec![pb::Input {
                digest: a.clone(),
                index: 0,
            }],
            op: Some(pb::op::Op::File(pb::FileOp::default())),
            ..Default::default()
        };
        let top = b.add(&user, None);
        let def = b.marshal(&Output {
            digest: top.clone(),
            index: 0,
        });
        assert_eq!(def.def.len(), 3);
        assert!(!def.metadata.contains_key(&unused));
        let g = crate::llb::decode(&def)?;
        assert_eq!(g.vertices.len(), 2);
        assert_eq!(g.vertices[0].digest, a);
        Ok(())
    }

    #[test]
    fn source_attrs_encode_sorted_and_decode_back() -> anyhow::Result<()> {
        let mut attrs = std::collections::HashMap::new();
        for k in ["z", "a", "m", "b", "y"] {
            attrs.insert(k.to_string(), format!("v{k}"));
        }
        let op = pb::Op {
            inputs: vec![],
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "local://context".to_string(),
                attrs: attrs.clone(),
            })),
            platform: Some(pb::Platform {
                os: "linux".to_string(),
                ..Default::default()
            }),
            constraints: Some(pb::WorkerConstraints::default()),
        };
        let bytes = encode_op(&op);
        assert_eq!(pb::Op::decode(bytes.as_slice())?, op);
        // Same bytes whatever the HashMap order.
        for _ in 0..8 {
            let mut again = op.clone();
            if let Some(pb::op::Op::Source(s)) = &mut again.op {
                s.attrs = attrs.clone().into_iter().collect();
            }
            assert_eq!(encode_op(&again), bytes);
        }
        let text = String::from_utf8_lossy(&bytes);
        let (a, z) = (text.find("va"), text.find("vz"));
        assert!(a.is_some() && z.is_some() && a < z);
        Ok(())
    }
}
