//! Wire-level checks of the generated messages: exact bytes of representative
//! messages, decoding of hand-assembled bytes (as a Go client would send them), and
//! the field numbers, types and RPC shapes of the compiled descriptor set against the
//! tables of shared/design/buildkit-wire.md.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, ensure, Context};
use kiln_proto::fsutil::types::{packet::PacketType, Packet, Stat};
use kiln_proto::moby::buildkit::v1 as control;
use kiln_proto::moby::buildkit::v1::frontend as gateway;
use kiln_proto::pb;
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet, Timestamp};

// ---------------------------------------------------------------------------
// Hand assembly of protobuf bytes with explicit tags.

/// A length-delimited field (strings, bytes, messages, map entries).
fn ld(tag: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// A varint field (bool, enums, ints).
fn varint(tag: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::Varint, &mut out);
    encode_varint(value, &mut out);
    out
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A map entry as it goes on the wire: a nested message, key = 1, value = 2.
fn map_entry(tag: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    ld(tag, &[ld(1, key), ld(2, value)].concat())
}

// ---------------------------------------------------------------------------
// Exact bytes of representative messages.

#[test]
fn solve_request_with_ref_definition_and_exporter_encodes_to_buildkit_numbers() -> anyhow::Result<()>
{
    let op_bytes = b"\x1a\x00".to_vec(); // an Op whose source (3) is an empty SourceOp
    let req = control::SolveRequest {
        r#ref: "r1".into(),
        definition: Some(pb::Definition {
            def: vec![op_bytes.clone()],
            ..Default::default()
        }),
        exporter_deprecated: "image".into(),
        session: "s1".into(),
        exporters: vec![control::Exporter {
            r#type: "image".into(),
            attrs: HashMap::from([("name".into(), "x/y".into())]),
        }],
        ..Default::default()
    };
    let expected = [
        ld(1, b"r1"),
        ld(2, &ld(1, &op_bytes)),
        ld(3, b"image"),
        ld(5, b"s1"),
        ld(
            13,
            &[ld(1, b"image"), map_entry(2, b"name", b"x/y")].concat(),
        ),
    ]
    .concat();
    let got = req.encode_to_vec();
    ensure!(got == expected, "got {got:02x?}\nwant {expected:02x?}");
    // Literal spot checks of the keys: Ref = (1<<3)|2, Definition = (2<<3)|2,
    // Exporters = (13<<3)|2.
    ensure!(got[0] == 0x0a && got[4] == 0x12);
    // The exporter is 20 bytes: Type (2 + 5) and one Attrs entry (2 + 6 + 5).
    ensure!(
        contains(&got, &[0x6a, 0x14, 0x0a, 0x05]),
        "no Exporters key 0x6a"
    );
    ensure!(control::SolveRequest::decode(got.as_slice())? == req);
    Ok(())
}

#[test]
fn status_response_vertex_timestamps_encode_as_nested_messages() -> anyhow::Result<()> {
    let started = Timestamp {
        seconds: 1_700_000_000,
        nanos: 5,
    };
    let completed = Timestamp {
        seconds: 1_700_000_001,
        nanos: 0,
    };
    let resp = control::StatusResponse {
        vertexes: vec![control::Vertex {
            digest: "sha256:ab".into(),
            inputs: vec!["sha256:cd".into()],
            name: "[1/2] RUN true".into(),
            cached: true,
            started: Some(started),
            completed: Some(completed),
            ..Default::default()
        }],
        logs: vec![control::VertexLog {
            vertex: "sha256:ab".into(),
            stream: 2,
            msg: b"oops\n".to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ts = |s: u64, n: u64| {
        let mut v = varint(1, s);
        if n != 0 {
            v.extend(varint(2, n));
        }
        v
    };
    let vertex = [
        ld(1, b"sha256:ab"),
        ld(2, b"sha256:cd"),
        ld(3, b"[1/2] RUN true"),
        varint(4, 1),
        ld(5, &ts(1_700_000_000, 5)),
        ld(6, &ts(1_700_000_001, 0)),
    ]
    .concat();
    let log = [ld(1, b"sha256:ab"), varint(3, 2), ld(4, b"oops\n")].concat();
    let expected = [ld(1, &vertex), ld(3, &log)].concat();
    let got = resp.encode_to_vec();
    ensure!(got == expected, "got {got:02x?}\nwant {expected:02x?}");
    // started (5) is key 0x2a, length 8, seconds (key 0x08, 5-byte varint) and nanos
    // (key 0x10, 5); completed (6) is key 0x32 without nanos, then the logs (3, key 0x1a).
    ensure!(contains(
        &got,
        &[0x2a, 0x08, 0x08, 0x80, 0xe2, 0xcf, 0xaa, 0x06, 0x10, 0x05]
    ));
    ensure!(contains(
        &got,
        &[0x32, 0x06, 0x08, 0x81, 0xe2, 0xcf, 0xaa, 0x06, 0x1a]
    ));
    Ok(())
}

#[test]
fn fsutil_packet_with_go_directory_mode_encodes_mode_as_five_byte_varint() -> anyhow::Result<()> {
    const GO_MODE_DIR: u32 = 1 << 31;
    let packet = Packet {
        r#type: PacketType::PacketStat as i32,
        stat: Some(Stat {
            path: "src".into(),
            mode: GO_MODE_DIR | 0o755,
            mod_time: 1_000_000_000,
            ..Default::default()
        }),
        id: 0,
        data: Vec::new(),
    };
    let got = packet.encode_to_vec();
    let stat = [
        vec![0x0a, 0x03, b's', b'r', b'c'],
        // mode (2): 0x800001ed as a varint.
        vec![0x10, 0xed, 0x83, 0x80, 0x80, 0x08],
        // modTime (6): 1e9 ns.
        varint(6, 1_000_000_000),
    ]
    .concat();
    // type 0 (PACKET_STAT) and ID 0 are defaults and do not go on the wire.
    let expected = ld(2, &stat);
    ensure!(got == expected, "got {got:02x?}\nwant {expected:02x?}");
    let back = Packet::decode(got.as_slice())?;
    let mode = back.stat.context("stat lost")?.mode;
    ensure!(mode & GO_MODE_DIR != 0 && mode & 0o777 == 0o755);

    // The end-of-stats marker: a STAT packet without stat serializes to zero bytes.
    ensure!(Packet::default().encode_to_vec().is_empty());
    let end = Packet::decode(&[][..])?;
    ensure!(end.r#type() == PacketType::PacketStat && end.stat.is_none());

    // A DATA packet for ID 7 with a chunk.
    let data = Packet {
        r#type: PacketType::PacketData as i32,
        id: 7,
        data: b"hi".to_vec(),
        ..Default::default()
    };
    ensure!(data.encode_to_vec() == [0x08, 0x02, 0x18, 0x07, 0x22, 0x02, b'h', b'i']);
    Ok(())
}

// ---------------------------------------------------------------------------
// Decoding hand-assembled bytes.

#[test]
fn decodes_hand_assembled_gateway_return_with_ref_and_error() -> anyhow::Result<()> {
    // ReturnRequest{result: Result{ref: Ref{id: "abc"}, metadata: {"k": "v"}},
    //               error: Status{code: 2, message: "boom"}}
    let result = [ld(3, &ld(1, b"abc")), map_entry(10, b"k", b"v")].concat();
    let status = [varint(1, 2), ld(2, b"boom")].concat();
    let bytes = [ld(1, &result), ld(2, &status)].concat();
    let req = gateway::ReturnRequest::decode(bytes.as_slice())?;
    let result = req.result.context("no result")?;
    match result.result {
        Some(gateway::result::Result::Ref(r)) => ensure!(r.id == "abc" && r.def.is_none()),
        other => bail!("wrong oneof arm: {other:?}"),
    }
    ensure!(result.metadata.get("k").map(Vec::as_slice) == Some(&b"v"[..]));
    let err = req.error.context("no error")?;
    ensure!(err.code == 2 && err.message == "boom" && err.details.is_empty());

    // The probe-build Return: Result.ref = Ref{id: ""} is a present but empty ref.
    let probe = gateway::ReturnRequest::decode(ld(1, &ld(3, &[])).as_slice())?;
    let arm = probe.result.context("no result")?.result;
    ensure!(matches!(arm, Some(gateway::result::Result::Ref(ref r)) if r.id.is_empty()));
    Ok(())
}

#[test]
fn decodes_hand_assembled_usage_record_and_skips_unknown_fields() -> anyhow::Result<()> {
    let bytes = [
        ld(1, b"rec1"),
        varint(3, 1),
        varint(4, 4096),
        ld(6, &varint(1, 1_600_000_000)),
        varint(8, 3),
        ld(10, b"regular"),
        ld(12, b"p1"),
        ld(12, b"p2"),
        // A field from a future BuildKit version must be ignored.
        varint(99, 42),
    ]
    .concat();
    let rec = control::UsageRecord::decode(bytes.as_slice())?;
    ensure!(rec.id == "rec1" && rec.in_use && !rec.mutable && rec.size == 4096);
    ensure!(rec.created_at.map(|t| t.seconds) == Some(1_600_000_000));
    ensure!(rec.last_used_at.is_none() && rec.usage_count == 3);
    ensure!(rec.record_type == "regular" && rec.parents == ["p1", "p2"]);
    Ok(())
}

#[test]
fn decodes_hand_assembled_history_descriptor_with_annotations_at_field_5() -> anyhow::Result<()> {
    let desc = [
        ld(1, b"application/vnd.buildkit.status.v0"),
        ld(2, b"sha256:00"),
        varint(3, 12),
        map_entry(5, b"a", b"b"),
    ]
    .concat();
    let rec = [ld(1, b"ref1"), ld(8, &desc), varint(14, 1), varint(19, 2)].concat();
    let event = [varint(1, 1), ld(2, &rec)].concat();
    let ev = control::BuildHistoryEvent::decode(event.as_slice())?;
    ensure!(ev.r#type() == control::BuildHistoryEventType::Complete);
    let rec = ev.record.context("no record")?;
    let logs = rec.logs.context("no logs")?;
    ensure!(rec.r#ref == "ref1" && rec.pinned && rec.num_warnings == 2);
    ensure!(logs.size == 12 && logs.annotations.get("a").map(String::as_str) == Some("b"));
    Ok(())
}

#[test]
fn decodes_hand_assembled_pong_with_caps_and_worker() -> anyhow::Result<()> {
    let cap = [ld(1, b"return"), varint(2, 1)].concat();
    let platform = [ld(1, b"amd64"), ld(2, b"linux")].concat();
    let gc = [varint(1, 1), varint(3, 1 << 30), ld(4, b"type==x")].concat();
    let worker = [ld(1, b"w0"), ld(3, &platform), ld(4, &gc)].concat();
    let pong = [ld(1, &cap), ld(2, &ld(1, b"source.local")), ld(3, &worker)].concat();
    let p = gateway::PongResponse::decode(pong.as_slice())?;
    ensure!(p.frontend_api_caps.len() == 1 && p.frontend_api_caps[0].enabled);
    ensure!(p.llb_caps[0].id == "source.local" && !p.llb_caps[0].enabled);
    let w = &p.workers[0];
    ensure!(w.id == "w0" && w.platforms[0].os == "linux" && w.platforms[0].architecture == "amd64");
    ensure!(w.gc_policy[0].all && w.gc_policy[0].reserved_space == 1 << 30);
    ensure!(w.gc_policy[0].filters == ["type==x"]);
    Ok(())
}

#[test]
fn decodes_hand_assembled_exec_message_oneof_arms() -> anyhow::Result<()> {
    // ExecMessage{ProcessID: "p", File: FdMessage{Fd: 1, Data: "out"}}
    let msg = [ld(1, b"p"), ld(3, &[varint(1, 1), ld(3, b"out")].concat())].concat();
    let m = gateway::ExecMessage::decode(msg.as_slice())?;
    match m.input {
        Some(gateway::exec_message::Input::File(fd)) => {
            ensure!(fd.fd == 1 && !fd.eof && fd.data == b"out")
        }
        other => bail!("wrong arm: {other:?}"),
    }
    // ExecMessage{Exit: ExitMessage{Code: 3}}
    let m = gateway::ExecMessage::decode(ld(6, &varint(1, 3)).as_slice())?;
    ensure!(matches!(m.input, Some(gateway::exec_message::Input::Exit(ref e)) if e.code == 3));
    Ok(())
}

// ---------------------------------------------------------------------------
// Descriptor-set checks: every field number and RPC shape the doc tabulates.

/// All messages of the compiled descriptor set by full name (".pkg.Msg").
fn messages() -> anyhow::Result<BTreeMap<String, DescriptorProto>> {
    fn walk(prefix: &str, msgs: &[DescriptorProto], out: &mut BTreeMap<String, DescriptorProto>) {
        for m in msgs {
            let name = format!("{prefix}.{}", m.name());
            walk(&name, &m.nested_type, out);
            out.insert(name, m.clone());
        }
    }
    let fds = FileDescriptorSet::decode(kiln_proto::FILE_DESCRIPTOR_SET)?;
    let mut out = BTreeMap::new();
    for f in &fds.file {
        walk(&format!(".{}", f.package()), &f.message_type, &mut out);
    }
    Ok(out)
}

/// A field's type as the doc writes it: `string`, `[]string`, `.pb.Definition`,
/// `map<string,.pb.Definition>`.
fn render(f: &FieldDescriptorProto, all: &BTreeMap<String, DescriptorProto>) -> String {
    let scalar = |f: &FieldDescriptorProto| match f.r#type() {
        Type::String => "string".to_string(),
        Type::Bytes => "bytes".into(),
        Type::Bool => "bool".into(),
        Type::Int64 => "int64".into(),
        Type::Int32 => "int32".into(),
        Type::Uint32 => "uint32".into(),
        Type::Message | Type::Enum => f.type_name().to_string(),
        other => format!("{other:?}"),
    };
    if f.r#type() == Type::Message {
        if let Some(entry) = all.get(f.type_name()) {
            if entry.options.as_ref().and_then(|o| o.map_entry) == Some(true) {
                let kv: Vec<String> = entry.field.iter().map(&scalar).collect();
                return format!("map<{}>", kv.join(","));
            }
        }
    }
    let base = scalar(f);
    if f.label() == Label::Repeated {
        format!("[]{base}")
    } else {
        base
    }
}

/// Checks that message `name` has exactly the fields `want` (name, number, type).
fn check(
    all: &BTreeMap<String, DescriptorProto>,
    name: &str,
    want: &[(&str, i32, &str)],
) -> anyhow::Result<()> {
    let msg = all
        .get(name)
        .with_context(|| format!("message {name} missing"))?;
    let got: BTreeMap<i32, (String, String)> = msg
        .field
        .iter()
        .map(|f| (f.number(), (f.name().to_string(), render(f, all))))
        .collect();
    let want: BTreeMap<i32, (String, String)> = want
        .iter()
        .map(|(n, num, t)| (*num, (n.to_string(), t.to_string())))
        .collect();
    ensure!(got == want, "{name}:\n got {got:?}\nwant {want:?}");
    Ok(())
}

const TS: &str = ".google.protobuf.Timestamp";
const MSS: &str = "map<string,string>";

#[test]
fn control_messages_have_the_documented_field_numbers() -> anyhow::Result<()> {
    let all = messages()?;
    let c = |m: &str| format!(".moby.buildkit.v1.{m}");
    check(
        &all,
        &c("SolveRequest"),
        &[
            ("Ref", 1, "string"),
            ("Definition", 2, ".pb.Definition"),
            ("ExporterDeprecated", 3, "string"),
            ("ExporterAttrsDeprecated", 4, MSS),
            ("Session", 5, "string"),
            ("Frontend", 6, "string"),
            ("FrontendAttrs", 7, MSS),
            ("Cache", 8, ".moby.buildkit.v1.CacheOptions"),
            ("Entitlements", 9, "[]string"),
            ("FrontendInputs", 10, "map<string,.pb.Definition>"),
            ("Internal", 11, "bool"),
            ("SourcePolicy", 12, ".moby.buildkit.v1.sourcepolicy.Policy"),
            ("Exporters", 13, "[].moby.buildkit.v1.Exporter"),
            ("EnableSessionExporter", 14, "bool"),
            ("SourcePolicySession", 15, "string"),
            ("CompatibilityVersion", 16, "int64"),
            ("ProxyNetwork", 17, "bool"),
        ],
    )?;
    check(
        &all,
        &c("Exporter"),
        &[("Type", 1, "string"), ("Attrs", 2, MSS)],
    )?;
    check(
        &all,
        &c("CacheOptions"),
        &[
            ("ExportRefDeprecated", 1, "string"),
            ("ImportRefsDeprecated", 2, "[]string"),
            ("ExportAttrsDeprecated", 3, MSS),
            ("Exports", 4, "[].moby.buildkit.v1.CacheOptionsEntry"),
            ("Imports", 5, "[].moby.buildkit.v1.CacheOptionsEntry"),
        ],
    )?;
    check(
        &all,
        &c("CacheOptionsEntry"),
        &[("Type", 1, "string"), ("Attrs", 2, MSS)],
    )?;
    check(&all, &c("SolveResponse"), &[("ExporterResponse", 1, MSS)])?;
    check(&all, &c("StatusRequest"), &[("Ref", 1, "string")])?;
    check(
        &all,
        &c("StatusResponse"),
        &[
            ("vertexes", 1, "[].moby.buildkit.v1.Vertex"),
            ("statuses", 2, "[].moby.buildkit.v1.VertexStatus"),
            ("logs", 3, "[].moby.buildkit.v1.VertexLog"),
            ("warnings", 4, "[].moby.buildkit.v1.VertexWarning"),
        ],
    )?;
    check(
        &all,
        &c("Vertex"),
        &[
            ("digest", 1, "string"),
            ("inputs", 2, "[]string"),
            ("name", 3, "string"),
            ("cached", 4, "bool"),
            ("started", 5, TS),
            ("completed", 6, TS),
            ("error", 7, "string"),
            ("progressGroup", 8, ".pb.ProgressGroup"),
        ],
    )?;
    check(
        &all,
        &c("VertexStatus"),
        &[
            ("ID", 1, "string"),
            ("vertex", 2, "string"),
            ("name", 3, "string"),
            ("current", 4, "int64"),
            ("total", 5, "int64"),
            ("timestamp", 6, TS),
            ("started", 7, TS),
            ("completed", 8, TS),
        ],
    )?;
    check(
        &all,
        &c("VertexLog"),
        &[
            ("vertex", 1, "string"),
            ("timestamp", 2, TS),
            ("stream", 3, "int64"),
            ("msg", 4, "bytes"),
        ],
    )?;
    check(
        &all,
        &c("VertexWarning"),
        &[
            ("vertex", 1, "string"),
            ("level", 2, "int64"),
            ("short", 3, "bytes"),
            ("detail", 4, "[]bytes"),
            ("url", 5, "string"),
            ("info", 6, ".pb.SourceInfo"),
            ("ranges", 7, "[].pb.Range"),
        ],
    )?;
    check(&all, &c("BytesMessage"), &[("data", 1, "bytes")])?;
    check(
        &all,
        &c("DiskUsageRequest"),
        &[("filter", 1, "[]string"), ("ageLimit", 2, "int64")],
    )?;
    check(
        &all,
        &c("DiskUsageResponse"),
        &[("record", 1, "[].moby.buildkit.v1.UsageRecord")],
    )?;
    check(
        &all,
        &c("UsageRecord"),
        &[
            ("ID", 1, "string"),
            ("Mutable", 2, "bool"),
            ("InUse", 3, "bool"),
            ("Size", 4, "int64"),
            ("Parent", 5, "string"),
            ("CreatedAt", 6, TS),
            ("LastUsedAt", 7, TS),
            ("UsageCount", 8, "int64"),
            ("Description", 9, "string"),
            ("RecordType", 10, "string"),
            ("Shared", 11, "bool"),
            ("Parents", 12, "[]string"),
        ],
    )?;
    check(
        &all,
        &c("PruneRequest"),
        &[
            ("filter", 1, "[]string"),
            ("all", 2, "bool"),
            ("keepDuration", 3, "int64"),
            ("reservedSpace", 4, "int64"),
            ("maxUsedSpace", 5, "int64"),
            ("minFreeSpace", 6, "int64"),
        ],
    )?;
    check(&all, &c("ListWorkersRequest"), &[("filter", 1, "[]string")])?;
    check(
        &all,
        &c("ListWorkersResponse"),
        &[("record", 1, "[].moby.buildkit.v1.types.WorkerRecord")],
    )?;
    check(&all, &c("InfoRequest"), &[])?;
    check(
        &all,
        &c("InfoResponse"),
        &[(
            "buildkitVersion",
            1,
            ".moby.buildkit.v1.types.BuildkitVersion",
        )],
    )?;
    check(
        &all,
        &c("BuildHistoryRequest"),
        &[
            ("ActiveOnly", 1, "bool"),
            ("Ref", 2, "string"),
            ("EarlyExit", 3, "bool"),
            ("Filter", 4, "[]string"),
            ("Limit", 5, "int32"),
        ],
    )?;
    check(
        &all,
        &c("BuildHistoryEvent"),
        &[
            ("type", 1, ".moby.buildkit.v1.BuildHistoryEventType"),
            ("record", 2, ".moby.buildkit.v1.BuildHistoryRecord"),
        ],
    )?;
    let desc = ".moby.buildkit.v1.Descriptor";
    let bri = ".moby.buildkit.v1.BuildResultInfo";
    check(
        &all,
        &c("BuildHistoryRecord"),
        &[
            ("Ref", 1, "string"),
            ("Frontend", 2, "string"),
            ("FrontendAttrs", 3, MSS),
            ("Exporters", 4, "[].moby.buildkit.v1.Exporter"),
            ("error", 5, ".google.rpc.Status"),
            ("CreatedAt", 6, TS),
            ("CompletedAt", 7, TS),
            ("logs", 8, desc),
            ("ExporterResponse", 9, MSS),
            ("Result", 10, bri),
            ("Results", 11, &format!("map<string,{bri}>")),
            ("Generation", 12, "int32"),
            ("trace", 13, desc),
            ("pinned", 14, "bool"),
            ("numCachedSteps", 15, "int32"),
            ("numTotalSteps", 16, "int32"),
            ("numCompletedSteps", 17, "int32"),
            ("externalError", 18, desc),
            ("numWarnings", 19, "int32"),
        ],
    )?;
    check(
        &all,
        &c("Descriptor"),
        &[
            ("media_type", 1, "string"),
            ("digest", 2, "string"),
            ("size", 3, "int64"),
            ("annotations", 5, MSS),
        ],
    )?;
    check(
        &all,
        &c("BuildResultInfo"),
        &[
            ("ResultDeprecated", 1, desc),
            ("Attestations", 2, &format!("[]{desc}")),
            ("Results", 3, &format!("map<int64,{desc}>")),
        ],
    )?;
    check(
        &all,
        &c("UpdateBuildHistoryRequest"),
        &[
            ("Ref", 1, "string"),
            ("Pinned", 2, "bool"),
            ("Delete", 3, "bool"),
            ("Finalize", 4, "bool"),
        ],
    )?;
    check(&all, &c("UpdateBuildHistoryResponse"), &[])?;
    Ok(())
}

#[test]
fn worker_policy_and_caps_messages_have_the_documented_field_numbers() -> anyhow::Result<()> {
    let all = messages()?;
    let t = |m: &str| format!(".moby.buildkit.v1.types.{m}");
    check(
        &all,
        &t("WorkerRecord"),
        &[
            ("ID", 1, "string"),
            ("Labels", 2, MSS),
            ("platforms", 3, "[].pb.Platform"),
            ("GCPolicy", 4, "[].moby.buildkit.v1.types.GCPolicy"),
            (
                "BuildkitVersion",
                5,
                ".moby.buildkit.v1.types.BuildkitVersion",
            ),
            ("CDIDevices", 6, "[].moby.buildkit.v1.types.CDIDevice"),
        ],
    )?;
    check(
        &all,
        &t("GCPolicy"),
        &[
            ("all", 1, "bool"),
            ("keepDuration", 2, "int64"),
            ("reservedSpace", 3, "int64"),
            ("filters", 4, "[]string"),
            ("maxUsedSpace", 5, "int64"),
            ("minFreeSpace", 6, "int64"),
        ],
    )?;
    check(
        &all,
        &t("BuildkitVersion"),
        &[
            ("package", 1, "string"),
            ("version", 2, "string"),
            ("revision", 3, "string"),
            ("dockerfileVersion", 4, "string"),
        ],
    )?;
    check(
        &all,
        &t("CDIDevice"),
        &[
            ("Name", 1, "string"),
            ("AutoAllow", 2, "bool"),
            ("Annotations", 3, MSS),
            ("OnDemand", 4, "bool"),
        ],
    )?;
    let sp = |m: &str| format!(".moby.buildkit.v1.sourcepolicy.{m}");
    check(
        &all,
        &sp("Policy"),
        &[
            ("version", 1, "int64"),
            ("rules", 2, "[].moby.buildkit.v1.sourcepolicy.Rule"),
        ],
    )?;
    check(
        &all,
        &sp("Rule"),
        &[
            ("action", 1, ".moby.buildkit.v1.sourcepolicy.PolicyAction"),
            ("selector", 2, ".moby.buildkit.v1.sourcepolicy.Selector"),
            ("updates", 3, ".moby.buildkit.v1.sourcepolicy.Update"),
        ],
    )?;
    check(
        &all,
        &sp("Selector"),
        &[
            ("identifier", 1, "string"),
            ("match_type", 2, ".moby.buildkit.v1.sourcepolicy.MatchType"),
            (
                "constraints",
                3,
                "[].moby.buildkit.v1.sourcepolicy.AttrConstraint",
            ),
        ],
    )?;
    check(
        &all,
        &sp("Update"),
        &[("identifier", 1, "string"), ("attrs", 2, MSS)],
    )?;
    check(
        &all,
        &sp("AttrConstraint"),
        &[
            ("key", 1, "string"),
            ("value", 2, "string"),
            ("condition", 3, ".moby.buildkit.v1.sourcepolicy.AttrMatch"),
        ],
    )?;
    check(
        &all,
        ".moby.buildkit.v1.apicaps.APICap",
        &[
            ("ID", 1, "string"),
            ("Enabled", 2, "bool"),
            ("Deprecated", 3, "bool"),
            ("DisabledReason", 4, "string"),
            ("DisabledReasonMsg", 5, "string"),
            ("DisabledAlternative", 6, "string"),
        ],
    )?;
    check(
        &all,
        ".google.rpc.Status",
        &[
            ("code", 1, "int32"),
            ("message", 2, "string"),
            ("details", 3, "[].google.protobuf.Any"),
        ],
    )?;
    // Enum values the doc gives.
    let fds = FileDescriptorSet::decode(kiln_proto::FILE_DESCRIPTOR_SET)?;
    let enums: BTreeMap<String, Vec<(String, i32)>> = fds
        .file
        .iter()
        .flat_map(|f| {
            f.enum_type.iter().map(move |e| {
                let values = e
                    .value
                    .iter()
                    .map(|v| (v.name().to_string(), v.number()))
                    .collect();
                (format!("{}.{}", f.package(), e.name()), values)
            })
        })
        .collect();
    let vals = |pairs: &[(&str, i32)]| -> Vec<(String, i32)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    };
    ensure!(
        enums.get("moby.buildkit.v1.sourcepolicy.PolicyAction")
            == Some(&vals(&[("ALLOW", 0), ("DENY", 1), ("CONVERT", 2)]))
    );
    ensure!(
        enums.get("moby.buildkit.v1.sourcepolicy.AttrMatch")
            == Some(&vals(&[("EQUAL", 0), ("NOTEQUAL", 1), ("MATCHES", 2)]))
    );
    ensure!(
        enums.get("moby.buildkit.v1.sourcepolicy.MatchType")
            == Some(&vals(&[("WILDCARD", 0), ("EXACT", 1), ("REGEX", 2)]))
    );
    ensure!(
        enums.get("moby.buildkit.v1.BuildHistoryEventType")
            == Some(&vals(&[("STARTED", 0), ("COMPLETE", 1), ("DELETED", 2)]))
    );
    Ok(())
}

#[test]
fn gateway_messages_have_the_documented_field_numbers() -> anyhow::Result<()> {
    let all = messages()?;
    let g = |m: &str| format!(".moby.buildkit.v1.frontend.{m}");
    let policies = "[].moby.buildkit.v1.sourcepolicy.Policy";
    check(
        &all,
        &g("SolveRequest"),
        &[
            ("Definition", 1, ".pb.Definition"),
            ("Frontend", 2, "string"),
            ("FrontendOpt", 3, MSS),
            ("allowResultReturn", 5, "bool"),
            ("allowResultArrayRef", 6, "bool"),
            ("Final", 10, "bool"),
            ("ExporterAttr", 11, "bytes"),
            (
                "CacheImports",
                12,
                "[].moby.buildkit.v1.frontend.CacheOptionsEntry",
            ),
            ("FrontendInputs", 13, "map<string,.pb.Definition>"),
            ("Evaluate", 14, "bool"),
            ("SourcePolicies", 15, policies),
        ],
    )?;
    check(
        &all,
        &g("CacheOptionsEntry"),
        &[("Type", 1, "string"), ("Attrs", 2, MSS)],
    )?;
    check(
        &all,
        &g("SolveResponse"),
        &[
            ("ref", 1, "string"),
            ("result", 3, ".moby.buildkit.v1.frontend.Result"),
        ],
    )?;
    check(
        &all,
        &g("Result"),
        &[
            ("refDeprecated", 1, "string"),
            (
                "refsDeprecated",
                2,
                ".moby.buildkit.v1.frontend.RefMapDeprecated",
            ),
            ("ref", 3, ".moby.buildkit.v1.frontend.Ref"),
            ("refs", 4, ".moby.buildkit.v1.frontend.RefMap"),
            ("metadata", 10, "map<string,bytes>"),
            (
                "attestations",
                12,
                "map<string,.moby.buildkit.v1.frontend.Attestations>",
            ),
        ],
    )?;
    // The four result arms share one oneof; 11 is reserved.
    let result = all.get(&g("Result")).context("Result")?;
    ensure!(result.oneof_decl.len() == 1 && result.oneof_decl[0].name() == "result");
    ensure!(
        result
            .field
            .iter()
            .filter(|f| f.oneof_index == Some(0))
            .count()
            == 4
    );
    ensure!(result.reserved_range.iter().any(|r| r.start() == 11));
    check(
        &all,
        &g("Ref"),
        &[("id", 1, "string"), ("def", 2, ".pb.Definition")],
    )?;
    check(
        &all,
        &g("RefMap"),
        &[("refs", 1, "map<string,.moby.buildkit.v1.frontend.Ref>")],
    )?;
    check(&all, &g("RefMapDeprecated"), &[("refs", 1, MSS)])?;
    check(
        &all,
        &g("ReturnRequest"),
        &[
            ("result", 1, ".moby.buildkit.v1.frontend.Result"),
            ("error", 2, ".google.rpc.Status"),
        ],
    )?;
    check(&all, &g("ReturnResponse"), &[])?;
    check(&all, &g("PingRequest"), &[])?;
    check(
        &all,
        &g("PongResponse"),
        &[
            ("FrontendAPICaps", 1, "[].moby.buildkit.v1.apicaps.APICap"),
            ("LLBCaps", 2, "[].moby.buildkit.v1.apicaps.APICap"),
            ("Workers", 3, "[].moby.buildkit.v1.types.WorkerRecord"),
        ],
    )?;
    check(&all, &g("InputsRequest"), &[])?;
    check(
        &all,
        &g("InputsResponse"),
        &[("Definitions", 1, "map<string,.pb.Definition>")],
    )?;
    check(
        &all,
        &g("ReadFileRequest"),
        &[
            ("Ref", 1, "string"),
            ("FilePath", 2, "string"),
            ("Range", 3, ".moby.buildkit.v1.frontend.FileRange"),
            ("MountIndex", 4, "int32"),
        ],
    )?;
    check(
        &all,
        &g("FileRange"),
        &[("Offset", 1, "int64"), ("Length", 2, "int64")],
    )?;
    check(&all, &g("ReadFileResponse"), &[("Data", 1, "bytes")])?;
    check(
        &all,
        &g("ResolveImageConfigRequest"),
        &[
            ("Ref", 1, "string"),
            ("Platform", 2, ".pb.Platform"),
            ("ResolveMode", 3, "string"),
            ("LogName", 4, "string"),
            ("ResolverType", 5, "int32"),
            ("SessionID", 6, "string"),
            ("StoreID", 7, "string"),
            ("SourcePolicies", 8, policies),
        ],
    )?;
    check(
        &all,
        &g("ResolveImageConfigResponse"),
        &[
            ("Digest", 1, "string"),
            ("Config", 2, "bytes"),
            ("Ref", 3, "string"),
        ],
    )?;
    check(
        &all,
        &g("ReadDirResponse"),
        &[("entries", 1, "[].fsutil.types.Stat")],
    )?;
    check(
        &all,
        &g("StatFileResponse"),
        &[("stat", 1, ".fsutil.types.Stat")],
    )?;
    Ok(())
}

#[test]
fn session_messages_have_the_documented_field_numbers() -> anyhow::Result<()> {
    let all = messages()?;
    check(
        &all,
        ".fsutil.types.Packet",
        &[
            ("type", 1, ".fsutil.types.Packet.PacketType"),
            ("stat", 2, ".fsutil.types.Stat"),
            ("ID", 3, "uint32"),
            ("data", 4, "bytes"),
        ],
    )?;
    check(
        &all,
        ".fsutil.types.Stat",
        &[
            ("path", 1, "string"),
            ("mode", 2, "uint32"),
            ("uid", 3, "uint32"),
            ("gid", 4, "uint32"),
            ("size", 5, "int64"),
            ("modTime", 6, "int64"),
            ("linkname", 7, "string"),
            ("devmajor", 8, "int64"),
            ("devminor", 9, "int64"),
            ("xattrs", 10, "map<string,bytes>"),
        ],
    )?;
    ensure!(PacketType::PacketStat as i32 == 0 && PacketType::PacketReq as i32 == 1);
    ensure!(PacketType::PacketData as i32 == 2 && PacketType::PacketFin as i32 == 3);
    ensure!(PacketType::PacketErr as i32 == 4);
    let f = |m: &str| format!(".moby.filesync.v1.{m}");
    check(&all, &f("BytesMessage"), &[("data", 1, "bytes")])?;
    check(&all, &f("CredentialsRequest"), &[("Host", 1, "string")])?;
    check(
        &all,
        &f("CredentialsResponse"),
        &[("Username", 1, "string"), ("Secret", 2, "string")],
    )?;
    check(
        &all,
        &f("FetchTokenRequest"),
        &[
            ("ClientID", 1, "string"),
            ("Host", 2, "string"),
            ("Realm", 3, "string"),
            ("Service", 4, "string"),
            ("Scopes", 5, "[]string"),
        ],
    )?;
    check(
        &all,
        &f("FetchTokenResponse"),
        &[
            ("Token", 1, "string"),
            ("ExpiresIn", 2, "int64"),
            ("IssuedAt", 3, "int64"),
        ],
    )?;
    check(
        &all,
        &f("GetTokenAuthorityRequest"),
        &[("Host", 1, "string"), ("Salt", 2, "bytes")],
    )?;
    check(
        &all,
        &f("GetTokenAuthorityResponse"),
        &[("PublicKey", 1, "bytes")],
    )?;
    check(
        &all,
        &f("VerifyTokenAuthorityRequest"),
        &[
            ("Host", 1, "string"),
            ("Payload", 2, "bytes"),
            ("Salt", 3, "bytes"),
        ],
    )?;
    check(
        &all,
        &f("VerifyTokenAuthorityResponse"),
        &[("Signed", 1, "bytes")],
    )?;
    check(
        &all,
        ".moby.buildkit.secrets.v1.GetSecretRequest",
        &[("ID", 1, "string"), ("annotations", 2, MSS)],
    )?;
    check(
        &all,
        ".moby.buildkit.secrets.v1.GetSecretResponse",
        &[("data", 1, "bytes")],
    )?;
    check(
        &all,
        ".moby.sshforward.v1.CheckAgentRequest",
        &[("ID", 1, "string")],
    )?;
    check(
        &all,
        ".moby.sshforward.v1.BytesMessage",
        &[("data", 1, "bytes")],
    )?;
    check(
        &all,
        ".moby.upload.v1.BytesMessage",
        &[("data", 1, "bytes")],
    )?;
    check(
        &all,
        ".moby.exporter.v1.FindExportersRequest",
        &[
            ("metadata", 1, "map<string,bytes>"),
            ("refs", 2, "[]string"),
        ],
    )?;
    check(
        &all,
        ".moby.exporter.v1.FindExportersResponse",
        &[("exporters", 1, "[].moby.exporter.v1.ExporterRequest")],
    )?;
    check(
        &all,
        ".moby.exporter.v1.ExporterRequest",
        &[("Type", 1, "string"), ("Attrs", 2, MSS)],
    )?;
    check(
        &all,
        ".moby.exporter.v1.FinalizeExportRequest",
        &[("exporter_response", 1, MSS)],
    )?;
    Ok(())
}

/// (method, input, output, client streaming, server streaming)
type Rpc<'a> = (&'a str, &'a str, &'a str, bool, bool);

fn check_service(service: &str, want: &[Rpc<'_>]) -> anyhow::Result<()> {
    let fds = FileDescriptorSet::decode(kiln_proto::FILE_DESCRIPTOR_SET)?;
    let svc = fds
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| (format!("{}.{}", f.package(), s.name()), s))
        })
        .find(|(name, _)| name == service)
        .map(|(_, s)| s)
        .with_context(|| format!("service {service} missing"))?;
    let got: Vec<(String, String, String, bool, bool)> = svc
        .method
        .iter()
        .map(|m| {
            (
                m.name().to_string(),
                m.input_type().to_string(),
                m.output_type().to_string(),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, bool, bool)> = want
        .iter()
        .map(|(n, i, o, cs, ss)| (n.to_string(), i.to_string(), o.to_string(), *cs, *ss))
        .collect();
    ensure!(got == want, "{service}:\n got {got:?}\nwant {want:?}");
    Ok(())
}

#[test]
fn services_have_the_documented_rpcs_and_stream_shapes() -> anyhow::Result<()> {
    let c = ".moby.buildkit.v1.";
    let req = |m: &str| format!("{c}{m}");
    check_service(
        "moby.buildkit.v1.Control",
        &[
            (
                "DiskUsage",
                &req("DiskUsageRequest"),
                &req("DiskUsageResponse"),
                false,
                false,
            ),
            (
                "Prune",
                &req("PruneRequest"),
                &req("UsageRecord"),
                false,
                true,
            ),
            (
                "Solve",
                &req("SolveRequest"),
                &req("SolveResponse"),
                false,
                false,
            ),
            (
                "Status",
                &req("StatusRequest"),
                &req("StatusResponse"),
                false,
                true,
            ),
            (
                "Session",
                &req("BytesMessage"),
                &req("BytesMessage"),
                true,
                true,
            ),
            (
                "ListWorkers",
                &req("ListWorkersRequest"),
                &req("ListWorkersResponse"),
                false,
                false,
            ),
            (
                "Info",
                &req("InfoRequest"),
                &req("InfoResponse"),
                false,
                false,
            ),
            (
                "ListenBuildHistory",
                &req("BuildHistoryRequest"),
                &req("BuildHistoryEvent"),
                false,
                true,
            ),
            (
                "UpdateBuildHistory",
                &req("UpdateBuildHistoryRequest"),
                &req("UpdateBuildHistoryResponse"),
                false,
                false,
            ),
        ],
    )?;
    let packet = ".fsutil.types.Packet";
    let bm = ".moby.filesync.v1.BytesMessage";
    check_service(
        "moby.filesync.v1.FileSync",
        &[
            ("DiffCopy", packet, packet, true, true),
            ("TarStream", packet, packet, true, true),
        ],
    )?;
    check_service(
        "moby.filesync.v1.FileSend",
        &[("DiffCopy", bm, bm, true, true)],
    )?;
    let a = |m: &str| format!(".moby.filesync.v1.{m}");
    check_service(
        "moby.filesync.v1.Auth",
        &[
            (
                "Credentials",
                &a("CredentialsRequest"),
                &a("CredentialsResponse"),
                false,
                false,
            ),
            (
                "FetchToken",
                &a("FetchTokenRequest"),
                &a("FetchTokenResponse"),
                false,
                false,
            ),
            (
                "GetTokenAuthority",
                &a("GetTokenAuthorityRequest"),
                &a("GetTokenAuthorityResponse"),
                false,
                false,
            ),
            (
                "VerifyTokenAuthority",
                &a("VerifyTokenAuthorityRequest"),
                &a("VerifyTokenAuthorityResponse"),
                false,
                false,
            ),
        ],
    )?;
    check_service(
        "moby.buildkit.secrets.v1.Secrets",
        &[(
            "GetSecret",
            ".moby.buildkit.secrets.v1.GetSecretRequest",
            ".moby.buildkit.secrets.v1.GetSecretResponse",
            false,
            false,
        )],
    )?;
    let ssh = |m: &str| format!(".moby.sshforward.v1.{m}");
    check_service(
        "moby.sshforward.v1.SSH",
        &[
            (
                "CheckAgent",
                &ssh("CheckAgentRequest"),
                &ssh("CheckAgentResponse"),
                false,
                false,
            ),
            (
                "ForwardAgent",
                &ssh("BytesMessage"),
                &ssh("BytesMessage"),
                true,
                true,
            ),
        ],
    )?;
    let up = ".moby.upload.v1.BytesMessage";
    check_service("moby.upload.v1.Upload", &[("Pull", up, up, true, true)])?;
    let h = |m: &str| format!(".grpc.health.v1.{m}");
    check_service(
        "grpc.health.v1.Health",
        &[
            (
                "Check",
                &h("HealthCheckRequest"),
                &h("HealthCheckResponse"),
                false,
                false,
            ),
            (
                "Watch",
                &h("HealthCheckRequest"),
                &h("HealthCheckResponse"),
                false,
                true,
            ),
        ],
    )?;
    let g = |m: &str| format!(".moby.buildkit.v1.frontend.{m}");
    let unary = |n: &'static str, i: &'static str, o: &'static str| (n, g(i), g(o));
    let gateway_unary = [
        unary(
            "ResolveImageConfig",
            "ResolveImageConfigRequest",
            "ResolveImageConfigResponse",
        ),
        unary(
            "ResolveSourceMeta",
            "ResolveSourceMetaRequest",
            "ResolveSourceMetaResponse",
        ),
        unary("Solve", "SolveRequest", "SolveResponse"),
        unary("ReadFile", "ReadFileRequest", "ReadFileResponse"),
        unary("ReadDir", "ReadDirRequest", "ReadDirResponse"),
        unary("StatFile", "StatFileRequest", "StatFileResponse"),
        unary("Evaluate", "EvaluateRequest", "EvaluateResponse"),
        unary("Ping", "PingRequest", "PongResponse"),
        unary("Return", "ReturnRequest", "ReturnResponse"),
        unary("Inputs", "InputsRequest", "InputsResponse"),
        unary(
            "NewContainer",
            "NewContainerRequest",
            "NewContainerResponse",
        ),
        unary(
            "ReleaseContainer",
            "ReleaseContainerRequest",
            "ReleaseContainerResponse",
        ),
        unary("ExecProcess", "ExecMessage", "ExecMessage"),
        unary("ReadFileContainer", "ReadFileRequest", "ReadFileResponse"),
        unary("ReadDirContainer", "ReadDirRequest", "ReadDirResponse"),
        unary("StatFileContainer", "StatFileRequest", "StatFileResponse"),
        unary("Warn", "WarnRequest", "WarnResponse"),
    ];
    let gateway: Vec<Rpc<'_>> = gateway_unary
        .iter()
        .map(|(n, i, o)| {
            let bidi = *n == "ExecProcess";
            (*n, i.as_str(), o.as_str(), bidi, bidi)
        })
        .collect();
    check_service("moby.buildkit.v1.frontend.LLBBridge", &gateway)?;
    Ok(())
}

#[test]
fn every_proto_file_is_compiled_into_the_descriptor_set() -> anyhow::Result<()> {
    fn walk(
        dir: &std::path::Path,
        root: &std::path::Path,
        out: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, root, out)?;
            } else if path.extension().is_some_and(|e| e == "proto") {
                out.push(
                    path.strip_prefix(root)?
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
        Ok(())
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let mut on_disk = Vec::new();
    walk(&root, &root, &mut on_disk)?;
    on_disk.sort();
    let fds = FileDescriptorSet::decode(kiln_proto::FILE_DESCRIPTOR_SET)?;
    let mut compiled: Vec<String> = fds
        .file
        .iter()
        .map(|f| f.name().to_string())
        .filter(|n| !n.starts_with("google/protobuf/"))
        .collect();
    compiled.sort();
    ensure!(on_disk.len() >= 17, "{on_disk:?}");
    ensure!(
        compiled == on_disk,
        "compiled {compiled:?}\non disk {on_disk:?}"
    );
    Ok(())
}
