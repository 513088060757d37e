//! Decodes arbitrary bytes as a `pb.Definition` and runs what the engine does with it
//! before executing anything: [`llb::decode`] (op decoding, input references, the
//! terminal op) and [`ops::check_op`] on every vertex. Any input must give a graph or
//! an error, never a panic; a graph must be consistent.
#![no_main]

use kiln_worker::llb::{self, pb};
use kiln_worker::ops;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(def) = pb::Definition::decode(data) else {
        return;
    };
    let Ok(graph) = llb::decode(&def) else {
        return;
    };
    assert!(graph.vertices.len() < def.def.len());
    let mut outputs = Vec::with_capacity(graph.vertices.len());
    for (i, v) in graph.vertices.iter().enumerate() {
        assert_eq!(graph.by_digest.get(&v.digest), Some(&i));
        for input in &v.op.inputs {
            let j = graph.by_digest.get(&input.digest).copied();
            assert!(
                j.is_some_and(|j| j < i),
                "input of {} not before it",
                v.digest
            );
            assert!(input.index >= 0);
        }
        assert!(v.op.op.is_some());
        outputs.push(ops::check_op(&v.op).ok());
    }
    assert!(graph.by_digest.contains_key(&graph.result.digest));
    assert!(graph.result.index >= 0);
    for v in &graph.vertices {
        for m in match &v.op.op {
            Some(pb::op::Op::Exec(e)) => e.mounts.as_slice(),
            _ => &[],
        } {
            // A checked exec op only mounts inputs it has.
            if outputs[graph.by_digest[&v.digest]].is_some() {
                assert!(m.input < v.op.inputs.len() as i64);
            }
        }
    }
});
