//! OTLP traces from gateway to worker, for real: an in-process OTLP trace receiver (the
//! `opentelemetry.proto.collector.trace.v1.TraceService` over tonic) on 127.0.0.1, the
//! `kiln-worker` and `kiln-gateway` binaries started with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at it, one build (a one-op LLB definition) solved through the gateway; the
//! gateway's `proxy.solve` span and the worker's `solve` span must share a trace id, the
//! worker's span being the gateway's child.
//!
//! Needs the binaries built (`cargo build -p kiln-worker -p kiln-gateway`); they are built
//! when missing (see `kiln_e2e::fleet::ensure_binaries`).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_e2e::fleet::{self, Proc};
use kiln_proto::moby::buildkit::v1 as api;
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One received span.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        attrs: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn with_otlp(cmd: &mut Command, receiver: &str) {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{receiver}"))
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_through_the_gateway_is_one_trace_across_gateway_and_worker() -> anyhow::Result<()>
{
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = listener.local_addr()?.to_string();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let bins = fleet::ensure_binaries()?;
    let dir = tempfile::Builder::new()
        .prefix("kiln-traces")
        .tempdir_in("/var/tmp")?;
    let wport = fleet::free_port()?;
    let mut cmd = Command::new(bins.join("kiln-worker"));
    cmd.args([
        "--addr",
        &format!("tcp://127.0.0.1:{wport}"),
        "--insecure-tcp",
    ])
    .args(["--worker-id", "w0"])
    .arg("--root")
    .arg(dir.path().join("state"));
    with_otlp(&mut cmd, &otlp);
    let _worker = Proc::spawn("kiln-worker", cmd, &dir.path().join("worker.log"))?;
    fleet::wait_for_port(&format!("127.0.0.1:{wport}"), Duration::from_secs(60))?;
    let gport = fleet::free_port()?;
    let mut cmd = Command::new(bins.join("kiln-gateway"));
    cmd.args([
        "--addr",
        &format!("tcp://127.0.0.1:{gport}"),
        "--insecure-tcp",
    ])
    .args(["--workers", &format!("w0=tcp://127.0.0.1:{wport}")]);
    with_otlp(&mut cmd, &otlp);
    let gateway = Proc::spawn("kiln-gateway", cmd, &dir.path().join("gateway.log"))?;
    fleet::wait_for_port(&format!("127.0.0.1:{gport}"), Duration::from_secs(60))?;

    let mut client =
        api::control_client::ControlClient::connect(format!("http://127.0.0.1:{gport}")).await?;
    client
        .solve(api::SolveRequest {
            r#ref: "traced-build".into(),
            definition: Some(kiln_e2e::llb::mkfile("/traced", b"trace me")),
            frontend_attrs: [("kiln.route-key".to_string(), "traced".to_string())].into(),
            ..Default::default()
        })
        .await?;

    let start = Instant::now();
    let (gw, wk) = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let gw = spans
            .iter()
            .find(|s| s.service == "kiln-gateway" && s.name == "proxy.solve")
            .cloned();
        let wk = spans
            .iter()
            .find(|s| s.service == "kiln-worker" && s.name == "solve")
            .cloned();
        if let (Some(g), Some(w)) = (gw, wk) {
            break (g, w);
        }
        if start.elapsed() > Duration::from_secs(30) {
            let names: Vec<(String, String)> = spans
                .iter()
                .map(|s| (s.service.clone(), s.name.clone()))
                .collect();
            anyhow::bail!(
                "no gateway proxy.solve and worker solve spans after 30 s; got {names:?}\ngateway log:\n{}",
                gateway.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(gw.trace_id.len(), 16);
    assert!(gw.trace_id.iter().any(|b| *b != 0), "empty trace id");
    assert_eq!(
        gw.trace_id, wk.trace_id,
        "gateway and worker spans in different traces"
    );
    assert_eq!(
        wk.parent, gw.span_id,
        "the worker's solve span is not the gateway span's child"
    );
    let attr = |k: &str| {
        gw.attrs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attr("worker").as_deref(), Some("w0"));
    assert_eq!(attr("key_kind").as_deref(), Some("explicit"));
    assert_eq!(attr("key").as_deref(), Some("traced"));
    Ok(())
}
