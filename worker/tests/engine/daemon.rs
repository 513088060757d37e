//! The daemon's Control service over a unix socket, called with the generated client as
//! buildctl would: Solve with an LLB definition and an image output, Status, ListWorkers,
//! Info, and the errors for what it does not serve yet.

use std::sync::Arc;

use anyhow::anyhow;
use kiln_proto::moby::buildkit::v1 as api;
use kiln_worker::control::service::ControlService;
use kiln_worker::control::{Engine, EngineConfig};

use crate::support::{env, exec_definition};

async fn serve(engine: Engine) -> anyhow::Result<(tempfile::TempDir, tonic::transport::Channel)> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("kiln.sock");
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let svc = ControlService::new(Arc::new(engine), "test-worker");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.clone().into_server())
            .add_service(svc.into_bridge_server())
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::try_from("http://kiln.invalid")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await?;
    Ok((dir, channel))
}

/// [`serve`] of a fresh engine with the default configuration over `root`.
async fn serve_root(
    root: &std::path::Path,
) -> anyhow::Result<(tempfile::TempDir, tonic::transport::Channel)> {
    serve(Engine::open(EngineConfig {
        root: root.to_path_buf(),
        ..Default::default()
    })?)
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_api_solves_llb_and_streams_status() -> anyhow::Result<()> {
    let env = env()?;
    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut client = api::control_client::ControlClient::new(channel);

    let info = client.info(api::InfoRequest {}).await?.into_inner();
    assert_eq!(
        info.buildkit_version.map(|v| v.version),
        Some(env!("CARGO_PKG_VERSION").to_string())
    );
    let workers = client
        .list_workers(api::ListWorkersRequest::default())
        .await?
        .into_inner();
    assert_eq!(workers.record.len(), 1);
    assert_eq!(workers.record[0].id, "test-worker");

    let name = format!("{}/kiln/daemon:1", env.reg.addr());
    let mut attrs = std::collections::HashMap::new();
    attrs.insert("name".to_string(), name.clone());
    attrs.insert("push".to_string(), "true".to_string());
    let req = api::SolveRequest {
        r#ref: "build-1".into(),
        definition: Some(exec_definition(&env.base, "echo from-daemon > /x")),
        exporters: vec![api::Exporter {
            r#type: "image".into(),
            attrs,
        }],
        ..Default::default()
    };
    // Status is asked for before the build exists, as buildctl does; it waits for it.
    let mut status_client = client.clone();
    let status = tokio::spawn(async move {
        let mut stream = status_client
            .status(api::StatusRequest {
                r#ref: "build-1".into(),
            })
            .await?
            .into_inner();
        let mut vertexes = Vec::new();
        while let Some(msg) = stream.message().await? {
            vertexes.extend(msg.vertexes);
        }
        Ok::<_, anyhow::Error>(vertexes)
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let resp = client.solve(req).await?.into_inner();
    let digest = resp
        .exporter_response
        .get("containerimage.digest")
        .cloned()
        .ok_or_else(|| anyhow!("no digest in {:?}", resp.exporter_response))?;
    assert!(digest.starts_with("sha256:"));
    let vertexes = status.await??;
    let run = vertexes
        .iter()
        .rfind(|v| v.name.contains("echo from-daemon"))
        .ok_or_else(|| anyhow!("no exec vertex in {vertexes:?}"))?;
    assert!(run.completed.is_some() && run.error.is_empty(), "{run:?}");

    // A Dockerfile build needs a session for its files.
    let err = client
        .solve(api::SolveRequest {
            r#ref: "build-2".into(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("dockerfile.v0 without a session must fail"))?;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("session"), "{}", err.message());
    let err = client
        .status(api::StatusRequest {
            r#ref: "never".into(),
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("unknown ref must fail"))?;
    assert_eq!(err.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dockerfile_build_over_a_session() -> anyhow::Result<()> {
    use kiln_worker::session::filesync::LocalDirs;
    use kiln_worker::session::transport::{health_service, pipe, serve as serve_session};
    use kiln_worker::session::SessionHeaders;

    let env = env()?;
    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut client = api::control_client::ControlClient::new(channel);

    // The client side: a context with a Dockerfile, a file and an ignored file, served
    // over Control.Session as buildctl does.
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nCOPY . /ctx\nRUN ls /ctx > /listing && cat /ctx/hello.txt\n",
    )?;
    std::fs::write(ctx.path().join("hello.txt"), "hello over a session\n")?;
    std::fs::write(ctx.path().join("secret.key"), "nope\n")?;
    std::fs::write(ctx.path().join(".dockerignore"), "*.key\n")?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    SessionHeaders {
        id: "sess-1".into(),
        ..Default::default()
    }
    .to_metadata(request.metadata_mut())?;
    let inbound = client.session(request).await?.into_inner();
    let routes = tonic::service::Routes::new(
        LocalDirs::new()
            .with_dir("context", ctx.path())
            .with_dir("dockerfile", ctx.path())
            .into_service(),
    )
    .add_service(health_service());
    let session = tokio::spawn(serve_session(pipe(inbound, out_tx), routes));

    let name = format!("{}/kiln/session:1", env.reg.addr());
    let mut attrs = std::collections::HashMap::new();
    attrs.insert("name".to_string(), name.clone());
    attrs.insert("push".to_string(), "true".to_string());
    let mut frontend_attrs = std::collections::HashMap::new();
    frontend_attrs.insert("build-arg:BASE".to_string(), env.base.clone());
    let resp = client
        .solve(api::SolveRequest {
            r#ref: "build-s".into(),
            session: "sess-1".into(),
            frontend: "dockerfile.v0".into(),
            frontend_attrs,
            exporters: vec![api::Exporter {
                r#type: "image".into(),
                attrs,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(resp.exporter_response.contains_key("containerimage.digest"));

    // Pull the result back and read the listing the RUN wrote.
    let store = tempfile::tempdir()?;
    let content = std::sync::Arc::new(kiln_worker::content::ContentStore::open(store.path())?);
    let resolver = kiln_worker::source::image::ImageResolver::new(Default::default(), content);
    let img = resolver
        .resolve(&name, &kiln_worker::image::Platform::host())
        .await?;
    let top = img.layers.last().ok_or_else(|| anyhow!("no layers"))?;
    let blob = resolver.fetch_blob(&name, top, &|_, _| {}).await?;
    let unpacked = tempfile::tempdir()?;
    kiln_worker::snapshot::layer::unpack_blob(
        &blob,
        &top.media_type,
        unpacked.path(),
        &Default::default(),
    )?;
    let listing = std::fs::read_to_string(unpacked.path().join("listing"))?;
    assert_eq!(listing, "Dockerfile\nhello.txt\n");
    session.abort();
    Ok(())
}

fn bridge_call<T>(build: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        kiln_proto::metadata::BUILD_ID,
        build.parse().expect("ascii build id"),
    );
    r
}

/// The path current buildctl/buildx take: Control.Solve with neither frontend nor
/// definition, then LLBBridge Ping, Solve, file reads on the result, and Return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llb_bridge_solves_reads_and_returns() -> anyhow::Result<()> {
    use kiln_proto::moby::buildkit::v1::frontend as gw;

    let env = env()?;
    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut control = api::control_client::ControlClient::new(channel.clone());
    let mut bridge = gw::llb_bridge_client::LlbBridgeClient::new(channel);

    // Bridge calls may arrive before the Solve that registers the build: they wait.
    let mut early = bridge.clone();
    let pong =
        tokio::spawn(async move { early.ping(bridge_call("b-1", gw::PingRequest {})).await });
    let name = format!("{}/kiln/bridge:1", env.reg.addr());
    let mut attrs = std::collections::HashMap::new();
    attrs.insert("name".to_string(), name.clone());
    attrs.insert("push".to_string(), "true".to_string());
    let mut solve_control = control.clone();
    let solved = tokio::spawn(async move {
        solve_control
            .solve(api::SolveRequest {
                r#ref: "b-1".into(),
                exporters: vec![api::Exporter {
                    r#type: "image".into(),
                    attrs,
                }],
                ..Default::default()
            })
            .await
    });
    let pong = pong.await??.into_inner();
    let has = |id: &str| {
        pong.frontend_api_caps
            .iter()
            .any(|c| c.id == id && c.enabled)
    };
    assert!(
        has("return") && has("proto.refarray") && has("readfile"),
        "{pong:?}"
    );
    assert!(pong.llb_caps.iter().any(|c| c.id == "exec.mount.cache"));
    assert_eq!(pong.workers.len(), 1);

    let result = bridge
        .solve(bridge_call(
            "b-1",
            gw::SolveRequest {
                definition: Some(exec_definition(
                    &env.base,
                    "mkdir -p /out && echo bridged > /out/file && ln -s /etc/passwd /out/link",
                )),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .result
        .ok_or_else(|| anyhow!("no result"))?;
    let Some(gw::result::Result::Ref(r)) = &result.result else {
        anyhow::bail!("expected a single ref, got {result:?}");
    };
    let id = r.id.clone();
    let data = bridge
        .read_file(bridge_call(
            "b-1",
            gw::ReadFileRequest {
                r#ref: id.clone(),
                file_path: "/out/file".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .data;
    assert_eq!(data, b"bridged\n");
    let part = bridge
        .read_file(bridge_call(
            "b-1",
            gw::ReadFileRequest {
                r#ref: id.clone(),
                file_path: "out/file".into(),
                range: Some(gw::FileRange {
                    offset: 2,
                    length: 3,
                }),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .data;
    assert_eq!(part, b"idg");
    let stat = bridge
        .stat_file(bridge_call(
            "b-1",
            gw::StatFileRequest {
                r#ref: id.clone(),
                path: "/out/link".into(),
            },
        ))
        .await?
        .into_inner()
        .stat
        .ok_or_else(|| anyhow!("no stat"))?;
    assert_eq!(stat.linkname, "/etc/passwd");
    let dir = bridge
        .read_dir(bridge_call(
            "b-1",
            gw::ReadDirRequest {
                r#ref: id.clone(),
                dir_path: "/out".into(),
                include_pattern: "f*".into(),
            },
        ))
        .await?
        .into_inner();
    let names: Vec<_> = dir.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["file"]);
    bridge
        .evaluate(bridge_call(
            "b-1",
            gw::EvaluateRequest { r#ref: id.clone() },
        ))
        .await?;
    let err = bridge
        .evaluate(bridge_call(
            "b-1",
            gw::EvaluateRequest {
                r#ref: "nope".into(),
            },
        ))
        .await
        .err()
        .ok_or_else(|| anyhow!("an unknown result must fail"))?;
    assert_eq!(err.code(), tonic::Code::NotFound);

    bridge
        .r#return(bridge_call(
            "b-1",
            gw::ReturnRequest {
                result: Some(result),
                error: None,
            },
        ))
        .await?;
    let resp = solved.await??.into_inner();
    assert!(
        resp.exporter_response
            .get("containerimage.digest")
            .is_some_and(|d| d.starts_with("sha256:")),
        "{resp:?}"
    );

    // A Return carrying an error fails the Solve with that error.
    let mut failing = control.clone();
    let failed = tokio::spawn(async move {
        failing
            .solve(api::SolveRequest {
                r#ref: "b-2".into(),
                ..Default::default()
            })
            .await
    });
    bridge
        .r#return(bridge_call(
            "b-2",
            gw::ReturnRequest {
                result: None,
                error: Some(kiln_proto::google::rpc::Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message: "frontend said no".into(),
                    details: vec![],
                }),
            },
        ))
        .await?;
    let err = failed
        .await?
        .err()
        .ok_or_else(|| anyhow!("a Return with an error must fail the Solve"))?;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("frontend said no"));

    // No header, or a build that never registers: clear errors.
    let err = bridge.ping(gw::PingRequest {}).await.map(|_| ()).err();
    assert!(err.is_none(), "Ping needs no build: {err:?}");
    let err = bridge
        .solve(gw::SolveRequest::default())
        .await
        .err()
        .ok_or_else(|| anyhow!("Solve without a build id must fail"))?;
    assert!(
        err.message().contains("buildkit-controlapi-buildid"),
        "{}",
        err.message()
    );
    let err = bridge
        .solve(bridge_call("never-registered", gw::SolveRequest::default()))
        .await
        .err()
        .ok_or_else(|| anyhow!("an unknown build must fail"))?;
    assert_eq!(err.code(), tonic::Code::NotFound);
    let _ = control.info(api::InfoRequest {}).await?;
    Ok(())
}

/// A raw LLB definition sent over LLBBridge whose result is a `local://` source: the worker
/// fetches it from the client's session with the source's exclude patterns, and the result
/// holds exactly the files that were not excluded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_llb_local_source_comes_over_the_session() -> anyhow::Result<()> {
    use kiln_proto::moby::buildkit::v1::frontend as gw;
    use kiln_worker::llb::builder::{Builder, Output};
    use kiln_worker::llb::pb;
    use kiln_worker::session::filesync::LocalDirs;
    use kiln_worker::session::transport::{health_service, pipe, serve as serve_session};
    use kiln_worker::session::SessionHeaders;

    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut control = api::control_client::ControlClient::new(channel.clone());
    let mut bridge = gw::llb_bridge_client::LlbBridgeClient::new(channel);

    let ctx = tempfile::tempdir()?;
    std::fs::create_dir(ctx.path().join("src"))?;
    std::fs::write(ctx.path().join("src/main.c"), "int main;\n")?;
    std::fs::write(ctx.path().join("id.key"), "private\n")?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    SessionHeaders {
        id: "sess-llb".into(),
        ..Default::default()
    }
    .to_metadata(request.metadata_mut())?;
    let inbound = control.session(request).await?.into_inner();
    let routes = tonic::service::Routes::new(
        LocalDirs::new()
            .with_dir("mysrc", ctx.path())
            .into_service(),
    )
    .add_service(health_service());
    let _session = tokio::spawn(serve_session(pipe(inbound, out_tx), routes));

    let mut b = Builder::new();
    let mut attrs = std::collections::HashMap::new();
    attrs.insert(
        "local.excludepatterns".to_string(),
        "[\"*.key\"]".to_string(),
    );
    let src = b.add(
        &pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "local://mysrc".into(),
                attrs,
            })),
            ..Default::default()
        },
        None,
    );
    let def = b.marshal(&Output {
        digest: src,
        index: 0,
    });

    let mut c = control.clone();
    let solved = tokio::spawn(async move {
        c.solve(api::SolveRequest {
            r#ref: "llb-local".into(),
            session: "sess-llb".into(),
            ..Default::default()
        })
        .await
    });
    let result = bridge
        .solve(bridge_call(
            "llb-local",
            gw::SolveRequest {
                definition: Some(def),
                allow_result_return: true,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .result
        .ok_or_else(|| anyhow!("no result"))?;
    let Some(gw::result::Result::Ref(r)) = &result.result else {
        anyhow::bail!("expected a ref, got {result:?}");
    };
    let data = bridge
        .read_file(bridge_call(
            "llb-local",
            gw::ReadFileRequest {
                r#ref: r.id.clone(),
                file_path: "src/main.c".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .data;
    assert_eq!(data, b"int main;\n");
    let err = bridge
        .stat_file(bridge_call(
            "llb-local",
            gw::StatFileRequest {
                r#ref: r.id.clone(),
                path: "id.key".into(),
            },
        ))
        .await
        .err()
        .ok_or_else(|| anyhow!("the excluded file reached the worker"))?;
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    bridge
        .r#return(bridge_call(
            "llb-local",
            gw::ReturnRequest {
                result: Some(result),
                error: None,
            },
        ))
        .await?;
    solved.await??;
    Ok(())
}

/// Passes encoded messages through untouched, so a test can send bytes that are not a
/// valid message of the method's type.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEnc;
struct RawDec;

impl tonic::codec::Encoder for RawEnc {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

/// Every RPC of Control and LLBBridge given bytes that are not a valid message (a field
/// tag with an invalid wire type, a length past the end): each answers with a gRPC error,
/// nothing panics, and the daemon goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_messages_are_errors_on_every_rpc() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let unary = [
        "/moby.buildkit.v1.Control/Solve",
        "/moby.buildkit.v1.Control/ListWorkers",
        "/moby.buildkit.v1.Control/Info",
        "/moby.buildkit.v1.Control/DiskUsage",
        "/moby.buildkit.v1.Control/UpdateBuildHistory",
        "/moby.buildkit.v1.frontend.LLBBridge/Ping",
        "/moby.buildkit.v1.frontend.LLBBridge/Solve",
        "/moby.buildkit.v1.frontend.LLBBridge/Return",
        "/moby.buildkit.v1.frontend.LLBBridge/ResolveImageConfig",
        "/moby.buildkit.v1.frontend.LLBBridge/ReadFile",
        "/moby.buildkit.v1.frontend.LLBBridge/ReadDir",
        "/moby.buildkit.v1.frontend.LLBBridge/StatFile",
        "/moby.buildkit.v1.frontend.LLBBridge/Evaluate",
        "/moby.buildkit.v1.frontend.LLBBridge/Warn",
    ];
    let streaming = [
        "/moby.buildkit.v1.Control/Status",
        "/moby.buildkit.v1.Control/Prune",
        "/moby.buildkit.v1.Control/ListenBuildHistory",
    ];
    // Field 1 with wire type 7 (invalid); then a length-delimited field 2 claiming 100 bytes.
    let garbage = [
        bytes::Bytes::from_static(&[0x0f, 0x01]),
        bytes::Bytes::from_static(&[0x12, 0x64, 0x01]),
    ];
    for bad in &garbage {
        for path in unary {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await?;
            let res = grpc
                .unary(
                    tonic::Request::new(bad.clone()),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    RawCodec,
                )
                .await;
            let err = res
                .err()
                .ok_or_else(|| anyhow!("{path} accepted {bad:?}"))?;
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::Internal
                        | tonic::Code::InvalidArgument
                        | tonic::Code::Unimplemented
                ),
                "{path}: {err:?}"
            );
        }
        for path in streaming {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await?;
            let res = grpc
                .server_streaming(
                    tonic::Request::new(bad.clone()),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    RawCodec,
                )
                .await;
            assert!(res.is_err(), "{path} accepted {bad:?}");
        }
    }
    // Still serving.
    let mut control = api::control_client::ControlClient::new(channel);
    control.info(api::InfoRequest {}).await?;
    // A Solve naming a session that never connects: a clear error after the wait.
    let err = control
        .solve(api::SolveRequest {
            r#ref: "no-session".into(),
            session: "never-connected".into(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("a solve naming an unknown session must fail"))?;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("no active session for never-connected"),
        "{}",
        err.message()
    );
    Ok(())
}

/// With a shared key, the context and the Dockerfile are kept between builds: after one
/// of 10,000 files changes, the rebuild requests only that file; an unchanged Dockerfile
/// is not sent again and a changed one is; counted in bytes on the client side.
/// Opens Control.Session `id` (with `shared_key`; empty for none) serving `dirs` as
/// buildctl does; the returned task serves it.
async fn serve_dirs(
    control: &mut api::control_client::ControlClient<tonic::transport::Channel>,
    id: &str,
    shared_key: &str,
    dirs: &kiln_worker::session::filesync::LocalDirs,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use kiln_worker::session::transport::{health_service, pipe, serve as serve_session};
    use kiln_worker::session::SessionHeaders;

    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    SessionHeaders {
        id: id.into(),
        shared_key: shared_key.into(),
        ..Default::default()
    }
    .to_metadata(request.metadata_mut())?;
    let inbound = control.session(request).await?.into_inner();
    let routes =
        tonic::service::Routes::new(dirs.clone().into_service()).add_service(health_service());
    Ok(tokio::spawn(async move {
        let _ = serve_session(pipe(inbound, out_tx), routes).await;
    }))
}

/// Control.Solve of the Dockerfile build `r` over session `session`, without attributes.
async fn solve_dockerfile(
    control: &api::control_client::ControlClient<tonic::transport::Channel>,
    session: &str,
    r: &str,
) -> Result<tonic::Response<api::SolveResponse>, tonic::Status> {
    control
        .clone()
        .solve(api::SolveRequest {
            r#ref: r.into(),
            session: session.into(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_with_a_shared_key_transfers_only_changed_files() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use kiln_worker::session::filesync::LocalDirs;

    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut control = api::control_client::ControlClient::new(channel);

    let ctx = tempfile::tempdir()?;
    let dockerfile = "FROM scratch\nCOPY . /ctx\n";
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile)?;
    for d in 0..100 {
        let dir = ctx.path().join(format!("d{d:03}"));
        std::fs::create_dir(&dir)?;
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:03}")), format!("file {d}/{f}\n"))?;
        }
    }
    let dirs = LocalDirs::new()
        .with_dir("context", ctx.path())
        .with_dir("dockerfile", ctx.path());
    let _session = serve_dirs(&mut control, "sess-inc", "project:0123456789abcdef", &dirs).await?;

    let build = |r: &'static str| solve_dockerfile(&control, "sess-inc", r);
    build("inc-1").await?;
    let first = dirs.bytes_sent();
    assert!(first > 100_000, "the first build sent only {first} bytes");
    let changed = "changed content, longer than before\n";
    std::fs::write(ctx.path().join("d042/f042"), changed)?;
    build("inc-2").await?;
    let second = dirs.bytes_sent() - first;
    assert_eq!(
        second,
        changed.len() as u64,
        "the rebuild sent more than the changed file"
    );
    // A file that disappears from the client disappears from the kept context too.
    std::fs::remove_file(ctx.path().join("d001/f001"))?;
    build("inc-3").await?;
    assert_eq!(dirs.bytes_sent() - first - second, 0);
    // An edited Dockerfile is sent again, and it is what the build runs.
    let edited = "FROM scratch\nCOPY d042 /only-d042\n";
    std::fs::write(ctx.path().join("Dockerfile"), edited)?;
    let before = dirs.bytes_sent();
    build("inc-4").await?;
    // Twice: as the Dockerfile and as a file of the context.
    assert_eq!(dirs.bytes_sent() - before, 2 * edited.len() as u64);
    let broken = "FROM scratch\nNOT-AN-INSTRUCTION x\n";
    std::fs::write(ctx.path().join("Dockerfile"), broken)?;
    let err = build("inc-5")
        .await
        .err()
        .context("a build of an unparsable Dockerfile succeeded")?;
    assert!(
        err.message().contains("NOT-AN-INSTRUCTION")
            || err.message().to_lowercase().contains("unknown instruction"),
        "{}",
        err.message()
    );
    let kept: Vec<_> = walkdir::WalkDir::new(root.path().join("locals"))
        .into_iter()
        .flatten()
        .filter(|e| {
            e.file_name() == "f001" && e.path().parent().is_some_and(|p| p.ends_with("d001"))
        })
        .collect();
    assert!(
        kept.is_empty(),
        "a deleted file survived in the kept context"
    );
    Ok(())
}

/// With a shared key, a rebuild's context transfer starts beside the Dockerfile's, with the
/// kept .dockerignore; when the client's .dockerignore changed, that transfer is dropped and
/// the context comes again with the new exclusions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_dockerignore_replaces_the_early_context_transfer() -> anyhow::Result<()> {
    use kiln_worker::session::filesync::LocalDirs;

    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut control = api::control_client::ControlClient::new(channel);
    let ctx = tempfile::tempdir()?;
    std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY . /ctx\n")?;
    std::fs::write(ctx.path().join("a.txt"), "a\n")?;
    std::fs::write(ctx.path().join("b.key"), "b\n")?;
    let dirs = LocalDirs::new()
        .with_dir("context", ctx.path())
        .with_dir("dockerfile", ctx.path());
    let _session = serve_dirs(&mut control, "sess-spec", "project:spec", &dirs).await?;
    let build = |r: &'static str| solve_dockerfile(&control, "sess-spec", r);
    let kept = |name: &str| {
        walkdir::WalkDir::new(root.path().join("locals"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_name() == name)
            .count()
    };
    build("spec-1").await?;
    assert_eq!(kept("b.key"), 1, "the first build keeps the whole context");
    build("spec-2").await?;
    assert_eq!(kept("b.key"), 1);
    std::fs::write(ctx.path().join(".dockerignore"), "*.key\n")?;
    build("spec-3").await?;
    assert_eq!(
        kept("b.key"),
        0,
        "an ignored file stayed in the kept context"
    );
    assert_eq!(kept("a.txt"), 1);
    Ok(())
}

/// The context crosses the session only for a Dockerfile that reads it, as BuildKit's
/// frontend does: none of it for one without COPY, ADD or a context mount; all of it (minus
/// `.dockerignore`d paths) once the Dockerfile copies from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_context_is_sent_only_to_a_dockerfile_that_reads_it() -> anyhow::Result<()> {
    use kiln_worker::session::filesync::LocalDirs;

    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut control = api::control_client::ControlClient::new(channel);
    let ctx = tempfile::tempdir()?;
    let big = vec![7u8; 1 << 20];
    std::fs::write(ctx.path().join("big.bin"), &big)?;
    std::fs::write(ctx.path().join("skip.key"), "ignored\n")?;
    std::fs::write(ctx.path().join(".dockerignore"), "*.key\n")?;
    let df = tempfile::tempdir()?;
    let dirs = LocalDirs::new()
        .with_dir("context", ctx.path())
        .with_dir("dockerfile", df.path());
    let _session = serve_dirs(&mut control, "sess-lazy", "", &dirs).await?;
    let build = |r: &'static str| solve_dockerfile(&control, "sess-lazy", r);

    let no_context = "FROM scratch\nENV A=1\n";
    std::fs::write(df.path().join("Dockerfile"), no_context)?;
    build("lazy-1").await?;
    // The Dockerfile and the context's .dockerignore, nothing else.
    assert_eq!(
        dirs.bytes_sent(),
        (no_context.len() + "*.key\n".len()) as u64
    );

    let copies = "FROM scratch\nCOPY . /ctx\n";
    std::fs::write(df.path().join("Dockerfile"), copies)?;
    let before = dirs.bytes_sent();
    build("lazy-2").await?;
    let sent = dirs.bytes_sent() - before;
    // The Dockerfile, the .dockerignore again (no shared key: nothing is kept) and the
    // context without the ignored file.
    assert_eq!(
        sent,
        (copies.len() + 2 * "*.key\n".len() + big.len()) as u64,
        "the build that copies the context got {sent} bytes"
    );

    // A base image's ONBUILD trigger reads the context although the Dockerfile does not
    // say so: it is fetched when the converted build names it.
    let env = env()?;
    let onbuild = "ARG BASE\nFROM ${BASE}\nONBUILD COPY big.bin /big.bin\n";
    std::fs::write(df.path().join("Dockerfile"), onbuild)?;
    let image = format!("{}/kiln/onbuild:1", env.reg.addr());
    let before = dirs.bytes_sent();
    control
        .clone()
        .solve(api::SolveRequest {
            r#ref: "lazy-3".into(),
            session: "sess-lazy".into(),
            frontend: "dockerfile.v0".into(),
            frontend_attrs: [("build-arg:BASE".to_string(), env.base.clone())].into(),
            exporters: vec![api::Exporter {
                r#type: "image".into(),
                attrs: [
                    ("name".to_string(), image.clone()),
                    ("push".to_string(), "true".to_string()),
                ]
                .into(),
            }],
            ..Default::default()
        })
        .await?;
    assert_eq!(
        dirs.bytes_sent() - before,
        (onbuild.len() + "*.key\n".len()) as u64
    );
    let child = format!("FROM {image}\nRUN test -s /big.bin\n");
    std::fs::write(df.path().join("Dockerfile"), &child)?;
    let before = dirs.bytes_sent();
    build("lazy-4").await?;
    assert_eq!(
        dirs.bytes_sent() - before,
        (child.len() + 2 * "*.key\n".len() + big.len()) as u64
    );
    Ok(())
}

/// Every event a `ListenBuildHistory` call with `req` yields (it must end by itself).
async fn history(
    client: &mut api::control_client::ControlClient<tonic::transport::Channel>,
    req: api::BuildHistoryRequest,
) -> anyhow::Result<Vec<api::BuildHistoryEvent>> {
    let resp = client.listen_build_history(req).await?;
    let ts = resp
        .metadata()
        .get(kiln_proto::metadata::CURRENT_TIMESTAMP)
        .ok_or_else(|| anyhow!("no timestamp header"))?
        .to_str()?
        .to_string();
    // RFC 3339 with a fraction, as buildx parses it.
    assert!(
        ts.contains('T') && ts.ends_with('Z') && ts.contains('.'),
        "{ts}"
    );
    let mut stream = resp.into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await? {
        out.push(ev);
    }
    Ok(out)
}

fn refs(events: &[api::BuildHistoryEvent]) -> Vec<(i32, String)> {
    events
        .iter()
        .map(|e| (e.r#type, e.record.clone().unwrap_or_default().r#ref))
        .collect()
}

/// The history events of the build `dropped` (at most one, its record).
async fn dropped_record(
    client: &mut api::control_client::ControlClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<api::BuildHistoryEvent>> {
    history(
        client,
        api::BuildHistoryRequest {
            early_exit: true,
            r#ref: "dropped".into(),
            ..Default::default()
        },
    )
    .await
}

/// A client that goes away mid-build (its Solve call dropped while a RUN sleeps): the
/// build's history record completes as cancelled, a Status stream for it ends, and the
/// worker serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_solve_completes_its_record_as_cancelled() -> anyhow::Result<()> {
    let env = env()?;
    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut client = api::control_client::ControlClient::new(channel);
    let solve = |script: &str| api::SolveRequest {
        r#ref: "dropped".into(),
        definition: Some(exec_definition(&env.base, script)),
        ..Default::default()
    };
    let mut status = {
        let mut c = client.clone();
        let req = solve("sleep 600");
        let running = tokio::spawn(async move { c.solve(req).await });
        // Wait until the worker knows the build, then go away.
        let status = loop {
            if !dropped_record(&mut client).await?.is_empty() {
                break client
                    .status(api::StatusRequest {
                        r#ref: "dropped".into(),
                    })
                    .await?
                    .into_inner();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        running.abort();
        status
    };
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while status.message().await?.is_some() {}
        anyhow::Ok(())
    })
    .await;
    assert!(
        ended.is_ok(),
        "the Status stream of a dropped build never ended"
    );
    let record = dropped_record(&mut client)
        .await?
        .first()
        .and_then(|e| e.record.clone())
        .ok_or_else(|| anyhow!("no record of the dropped build"))?;
    assert!(record.completed_at.is_some(), "{record:?}");
    assert_eq!(
        record.error.as_ref().map(|e| e.code),
        Some(tonic::Code::Cancelled as i32),
        "{record:?}"
    );
    // The worker serves on.
    let mut next = solve("true");
    next.r#ref = "after-dropped".into();
    client.solve(next).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_history_is_listed_followed_updated_and_replayed() -> anyhow::Result<()> {
    use api::BuildHistoryEventType::{Complete, Deleted, Started};
    let env = env()?;
    let root = tempfile::tempdir()?;
    let (_dir, channel) = serve_root(root.path()).await?;
    let mut client = api::control_client::ControlClient::new(channel);

    // A follower sees the build start and complete.
    let mut follower = client
        .listen_build_history(api::BuildHistoryRequest::default())
        .await?
        .into_inner();
    let solve = |r: &str, script: &str| api::SolveRequest {
        r#ref: r.into(),
        definition: Some(exec_definition(&env.base, script)),
        frontend_attrs: [("build-arg:A".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    client.solve(solve("hist-ok", "echo hist > /x")).await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = follower
            .message()
            .await?
            .ok_or_else(|| anyhow!("follower ended"))?;
        seen.push(ev);
    }
    assert_eq!(
        refs(&seen),
        vec![
            (Started as i32, "hist-ok".to_string()),
            (Complete as i32, "hist-ok".to_string())
        ]
    );
    let err = client
        .solve(solve("hist-bad", "exit 3"))
        .await
        .err()
        .ok_or_else(|| anyhow!("exit 3 must fail"))?;
    // An internal build is not recorded.
    let mut internal = solve("hist-internal", "true");
    internal.internal = true;
    client.solve(internal).await?;

    let all = history(
        &mut client,
        api::BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        refs(&all),
        vec![
            (Complete as i32, "hist-bad".to_string()),
            (Complete as i32, "hist-ok".to_string())
        ],
        "newest first, internal builds left out"
    );
    let ok = all[1].record.clone().unwrap_or_default();
    assert!(ok.error.is_none() && ok.completed_at.is_some() && ok.created_at.is_some());
    assert!(ok.num_total_steps >= 2, "{ok:?}");
    assert_eq!(ok.num_completed_steps, ok.num_total_steps, "{ok:?}");
    assert_eq!(
        ok.frontend_attrs.get("build-arg:A").map(String::as_str),
        Some("1")
    );
    let bad = all[0].record.clone().unwrap_or_default();
    assert_eq!(
        bad.error.as_ref().map(|e| e.message.clone()),
        Some(err.message().to_string())
    );
    let failed = history(
        &mut client,
        api::BuildHistoryRequest {
            early_exit: true,
            filter: vec!["status==failed".into()],
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        refs(&failed),
        vec![(Complete as i32, "hist-bad".to_string())]
    );
    let newest = history(
        &mut client,
        api::BuildHistoryRequest {
            early_exit: true,
            limit: 1,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        refs(&newest),
        vec![(Complete as i32, "hist-bad".to_string())]
    );
    let err = client
        .listen_build_history(api::BuildHistoryRequest {
            filter: vec!["duration>1s".into()],
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("an unsupported filter must fail"))?;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("duration>1s"), "{}", err.message());

    // Pin one, delete the other: the follower sees the deletion.
    client
        .update_build_history(api::UpdateBuildHistoryRequest {
            r#ref: "hist-ok".into(),
            pinned: true,
            ..Default::default()
        })
        .await?;
    client
        .update_build_history(api::UpdateBuildHistoryRequest {
            r#ref: "hist-bad".into(),
            delete: true,
            ..Default::default()
        })
        .await?;
    let mut deleted = None;
    while deleted.is_none() {
        let ev = follower
            .message()
            .await?
            .ok_or_else(|| anyhow!("follower ended"))?;
        if ev.r#type == Deleted as i32 {
            deleted = ev.record.map(|r| r.r#ref);
        }
    }
    assert_eq!(deleted.as_deref(), Some("hist-bad"));
    let err = client
        .update_build_history(api::UpdateBuildHistoryRequest {
            r#ref: "hist-bad".into(),
            delete: true,
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("deleting twice must fail"))?;
    assert_eq!(err.code(), tonic::Code::NotFound);

    // A daemon started later on the history kept on disk lists the pinned record and
    // replays the finished build's progress through Status.
    let root2 = tempfile::tempdir()?;
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(root.path().join("history"))
        .arg(root2.path())
        .status()?;
    assert!(copy.success());
    let (_dir2, channel2) = serve_root(root2.path()).await?;
    let mut client2 = api::control_client::ControlClient::new(channel2);
    let kept = history(
        &mut client2,
        api::BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(refs(&kept), vec![(Complete as i32, "hist-ok".to_string())]);
    assert!(kept[0].record.as_ref().is_some_and(|r| r.pinned));
    let mut replay = client2
        .status(api::StatusRequest {
            r#ref: "hist-ok".into(),
        })
        .await?
        .into_inner();
    let mut vertexes = Vec::new();
    while let Some(msg) = replay.message().await? {
        vertexes.extend(msg.vertexes);
    }
    assert!(
        vertexes
            .iter()
            .any(|v| v.name.contains("echo hist") && v.completed.is_some()),
        "{vertexes:?}"
    );
    Ok(())
}
