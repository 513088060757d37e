//! Tiny LLB definitions for tests and benches that solve without a session.

use kiln_proto::pb;
use kiln_proto::prost::Message as _;
use sha2::Digest as _;

/// A one-op definition: `mkfile path` (mode 0644) with `data` on scratch.
pub fn mkfile(path: &str, data: &[u8]) -> pb::Definition {
    let op = pb::Op {
        op: Some(pb::op::Op::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                    path: path.into(),
                    mode: 0o644,
                    data: data.to_vec(),
                    ..Default::default()
                })),
            }],
        })),
        ..Default::default()
    };
    let bytes = op.encode_to_vec();
    let terminal = pb::Op {
        inputs: vec![pb::Input {
            digest: format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
            index: 0,
        }],
        ..Default::default()
    };
    pb::Definition {
        def: vec![bytes, terminal.encode_to_vec()],
        ..Default::default()
    }
}
