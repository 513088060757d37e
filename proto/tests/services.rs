//! The generated tonic clients and servers, wired together in process (the server is
//! the client's transport), with a recorder in between that logs the HTTP/2 path of
//! every call. Checks service names, the method path of every RPC, default
//! `Unimplemented` stubs, and round trips of the calls a BuildKit client makes
//! (Solve, Status, Session, Ping/Return, FileSync.DiffCopy, Health.Check) including
//! the metadata a gateway routes on.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::{ensure, Context as _};
use futures::{stream, StreamExt};
use kiln_proto::containerd::services::content::v1 as content;
use kiln_proto::fsutil::types::{packet::PacketType, Packet, Stat};
use kiln_proto::grpc::health::v1 as health;
use kiln_proto::metadata::{
    BUILD_ID, CURRENT_TIMESTAMP, DIR_NAME, SESSION_GRPC_METHOD, SESSION_SHARED_KEY, SESSION_UUID,
};
use kiln_proto::moby::buildkit::secrets::v1 as secrets;
use kiln_proto::moby::buildkit::v1 as control;
use kiln_proto::moby::buildkit::v1::frontend as gateway;
use kiln_proto::moby::exporter::v1 as exporter;
use kiln_proto::moby::filesync::v1 as filesync;
use kiln_proto::moby::sshforward::v1 as ssh;
use kiln_proto::moby::upload::v1 as upload;
use tonic::codegen::{http, BoxStream, Service};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

/// Passes requests to `inner` and records their URI paths.
#[derive(Clone)]
struct Recorder<S> {
    inner: S,
    paths: Arc<Mutex<Vec<String>>>,
}

impl<S> Recorder<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            paths: Arc::default(),
        }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl<S, B> Service<http::Request<B>> for Recorder<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Ok(mut paths) = self.paths.lock() {
            paths.push(req.uri().path().to_string());
        }
        self.inner.call(req)
    }
}

/// A service implementation that overrides nothing: every RPC answers with the
/// generated default stub.
#[derive(Clone, Copy, Default)]
struct Stubs;

impl control::control_server::Control for Stubs {}
impl gateway::llb_bridge_server::LlbBridge for Stubs {}
impl filesync::file_sync_server::FileSync for Stubs {}
impl filesync::file_send_server::FileSend for Stubs {}
impl filesync::auth_server::Auth for Stubs {}
impl secrets::secrets_server::Secrets for Stubs {}
impl ssh::ssh_server::Ssh for Stubs {}
impl upload::upload_server::Upload for Stubs {}
impl exporter::exporter_server::Exporter for Stubs {}
impl health::health_server::Health for Stubs {}
impl content::content_server::Content for Stubs {}

/// The call reached the generated default stub (an unknown path would also give
/// `Unimplemented`, but without this message).
fn stubbed<T: std::fmt::Debug>(r: Result<T, Status>) -> anyhow::Result<()> {
    let err = r.err().context("stub answered OK")?;
    ensure!(err.code() == tonic::Code::Unimplemented, "{err:?}");
    ensure!(err.message() == "Not yet implemented", "{err:?}");
    Ok(())
}

fn none<T: Send + 'static>() -> stream::Empty<T> {
    stream::empty()
}

#[test]
fn service_names_match_buildkit() {
    use content::content_server::ContentServer;
    use control::control_server::ControlServer;
    use filesync::file_sync_server::FileSyncServer;
    use filesync::{auth_server::AuthServer, file_send_server::FileSendServer};
    use gateway::llb_bridge_server::LlbBridgeServer;
    use health::health_server::HealthServer;
    let names = [
        (ControlServer::<Stubs>::NAME, "moby.buildkit.v1.Control"),
        (
            LlbBridgeServer::<Stubs>::NAME,
            "moby.buildkit.v1.frontend.LLBBridge",
        ),
        (FileSyncServer::<Stubs>::NAME, "moby.filesync.v1.FileSync"),
        (FileSendServer::<Stubs>::NAME, "moby.filesync.v1.FileSend"),
        (AuthServer::<Stubs>::NAME, "moby.filesync.v1.Auth"),
        (
            secrets::secrets_server::SERVICE_NAME,
            "moby.buildkit.secrets.v1.Secrets",
        ),
        (ssh::ssh_server::SERVICE_NAME, "moby.sshforward.v1.SSH"),
        (upload::upload_server::SERVICE_NAME, "moby.upload.v1.Upload"),
        (
            exporter::exporter_server::SERVICE_NAME,
            "moby.exporter.v1.Exporter",
        ),
        (HealthServer::<Stubs>::NAME, "grpc.health.v1.Health"),
        (
            ContentServer::<Stubs>::NAME,
            "containerd.services.content.v1.Content",
        ),
    ];
    for (got, want) in names {
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn control_method_paths_reach_the_server_stubs() -> anyhow::Result<()> {
    let rec = Recorder::new(control::control_server::ControlServer::new(Stubs));
    let mut c = control::control_client::ControlClient::new(rec.clone());
    stubbed(c.disk_usage(control::DiskUsageRequest::default()).await)?;
    stubbed(c.prune(control::PruneRequest::default()).await)?;
    stubbed(c.solve(control::SolveRequest::default()).await)?;
    stubbed(c.status(control::StatusRequest::default()).await)?;
    stubbed(c.session(none::<control::BytesMessage>()).await)?;
    stubbed(c.list_workers(control::ListWorkersRequest::default()).await)?;
    stubbed(c.info(control::InfoRequest::default()).await)?;
    stubbed(
        c.listen_build_history(control::BuildHistoryRequest::default())
            .await,
    )?;
    stubbed(
        c.update_build_history(control::UpdateBuildHistoryRequest::default())
            .await,
    )?;
    let want: Vec<String> = [
        "DiskUsage",
        "Prune",
        "Solve",
        "Status",
        "Session",
        "ListWorkers",
        "Info",
        "ListenBuildHistory",
        "UpdateBuildHistory",
    ]
    .iter()
    .map(|m| format!("/moby.buildkit.v1.Control/{m}"))
    .collect();
    ensure!(rec.paths() == want, "{:?}", rec.paths());
    Ok(())
}

#[tokio::test]
async fn llbbridge_method_paths_reach_the_server_stubs() -> anyhow::Result<()> {
    let rec = Recorder::new(gateway::llb_bridge_server::LlbBridgeServer::new(Stubs));
    let mut c = gateway::llb_bridge_client::LlbBridgeClient::new(rec.clone());
    stubbed(
        c.resolve_image_config(gateway::ResolveImageConfigRequest::default())
            .await,
    )?;
    stubbed(
        c.resolve_source_meta(gateway::ResolveSourceMetaRequest::default())
            .await,
    )?;
    stubbed(c.solve(gateway::SolveRequest::default()).await)?;
    stubbed(c.read_file(gateway::ReadFileRequest::default()).await)?;
    stubbed(c.read_dir(gateway::ReadDirRequest::default()).await)?;
    stubbed(c.stat_file(gateway::StatFileRequest::default()).await)?;
    stubbed(c.evaluate(gateway::EvaluateRequest::default()).await)?;
    stubbed(c.ping(gateway::PingRequest::default()).await)?;
    stubbed(c.r#return(gateway::ReturnRequest::default()).await)?;
    stubbed(c.inputs(gateway::InputsRequest::default()).await)?;
    stubbed(
        c.new_container(gateway::NewContainerRequest::default())
            .await,
    )?;
    stubbed(
        c.release_container(gateway::ReleaseContainerRequest::default())
            .await,
    )?;
    stubbed(c.exec_process(none::<gateway::ExecMessage>()).await)?;
    stubbed(
        c.read_file_container(gateway::ReadFileRequest::default())
            .await,
    )?;
    stubbed(
        c.read_dir_container(gateway::ReadDirRequest::default())
            .await,
    )?;
    stubbed(
        c.stat_file_container(gateway::StatFileRequest::default())
            .await,
    )?;
    stubbed(c.warn(gateway::WarnRequest::default()).await)?;
    let want: Vec<String> = [
        "ResolveImageConfig",
        "ResolveSourceMeta",
        "Solve",
        "ReadFile",
        "ReadDir",
        "StatFile",
        "Evaluate",
        "Ping",
        "Return",
        "Inputs",
        "NewContainer",
        "ReleaseContainer",
        "ExecProcess",
        "ReadFileContainer",
        "ReadDirContainer",
        "StatFileContainer",
        "Warn",
    ]
    .iter()
    .map(|m| format!("/moby.buildkit.v1.frontend.LLBBridge/{m}"))
    .collect();
    ensure!(rec.paths() == want, "{:?}", rec.paths());
    Ok(())
}

#[tokio::test]
async fn session_service_method_paths_reach_the_server_stubs() -> anyhow::Result<()> {
    let rec = Recorder::new(filesync::file_sync_server::FileSyncServer::new(Stubs));
    let mut c = filesync::file_sync_client::FileSyncClient::new(rec.clone());
    stubbed(c.diff_copy(none::<Packet>()).await)?;
    stubbed(c.tar_stream(none::<Packet>()).await)?;
    let mut paths = rec.paths();

    let rec = Recorder::new(filesync::file_send_server::FileSendServer::new(Stubs));
    let mut c = filesync::file_send_client::FileSendClient::new(rec.clone());
    stubbed(c.diff_copy(none::<filesync::BytesMessage>()).await)?;
    paths.extend(rec.paths());

    let rec = Recorder::new(filesync::auth_server::AuthServer::new(Stubs));
    let mut c = filesync::auth_client::AuthClient::new(rec.clone());
    stubbed(c.credentials(filesync::CredentialsRequest::default()).await)?;
    stubbed(c.fetch_token(filesync::FetchTokenRequest::default()).await)?;
    stubbed(
        c.get_token_authority(filesync::GetTokenAuthorityRequest::default())
            .await,
    )?;
    stubbed(
        c.verify_token_authority(filesync::VerifyTokenAuthorityRequest::default())
            .await,
    )?;
    paths.extend(rec.paths());

    let rec = Recorder::new(secrets::secrets_server::SecretsServer::new(Stubs));
    let mut c = secrets::secrets_client::SecretsClient::new(rec.clone());
    stubbed(c.get_secret(secrets::GetSecretRequest::default()).await)?;
    paths.extend(rec.paths());

    let rec = Recorder::new(ssh::ssh_server::SshServer::new(Stubs));
    let mut c = ssh::ssh_client::SshClient::new(rec.clone());
    stubbed(c.check_agent(ssh::CheckAgentRequest::default()).await)?;
    stubbed(c.forward_agent(none::<ssh::BytesMessage>()).await)?;
    paths.extend(rec.paths());

    let rec = Recorder::new(upload::upload_server::UploadServer::new(Stubs));
    let mut c = upload::upload_client::UploadClient::new(rec.clone());
    stubbed(c.pull(none::<upload::BytesMessage>()).await)?;
    paths.extend(rec.paths());

    let rec = Recorder::new(exporter::exporter_server::ExporterServer::new(Stubs));
    let mut c = exporter::exporter_client::ExporterClient::new(rec.clone());
    stubbed(
        c.find_exporters(exporter::FindExportersRequest::default())
            .await,
    )?;
    stubbed(
        c.finalize_export(exporter::FinalizeExportRequest::default())
            .await,
    )?;
    paths.extend(rec.paths());

    let rec = Recorder::new(health::health_server::HealthServer::new(Stubs));
    let mut c = health::health_client::HealthClient::new(rec.clone());
    stubbed(c.check(health::HealthCheckRequest::default()).await)?;
    stubbed(c.watch(health::HealthCheckRequest::default()).await)?;
    paths.extend(rec.paths());

    let rec = Recorder::new(content::content_server::ContentServer::new(Stubs));
    let mut c = content::content_client::ContentClient::new(rec.clone());
    stubbed(c.info(content::InfoRequest::default()).await)?;
    stubbed(c.read(content::ReadContentRequest::default()).await)?;
    stubbed(c.write(none::<content::WriteContentRequest>()).await)?;
    stubbed(c.abort(content::AbortRequest::default()).await)?;
    paths.extend(rec.paths());

    let want = [
        "/moby.filesync.v1.FileSync/DiffCopy",
        "/moby.filesync.v1.FileSync/TarStream",
        "/moby.filesync.v1.FileSend/DiffCopy",
        "/moby.filesync.v1.Auth/Credentials",
        "/moby.filesync.v1.Auth/FetchToken",
        "/moby.filesync.v1.Auth/GetTokenAuthority",
        "/moby.filesync.v1.Auth/VerifyTokenAuthority",
        "/moby.buildkit.secrets.v1.Secrets/GetSecret",
        "/moby.sshforward.v1.SSH/CheckAgent",
        "/moby.sshforward.v1.SSH/ForwardAgent",
        "/moby.upload.v1.Upload/Pull",
        "/moby.exporter.v1.Exporter/FindExporters",
        "/moby.exporter.v1.Exporter/FinalizeExport",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/containerd.services.content.v1.Content/Info",
        "/containerd.services.content.v1.Content/Read",
        "/containerd.services.content.v1.Content/Write",
        "/containerd.services.content.v1.Content/Abort",
    ];
    ensure!(paths == want, "{paths:?}");
    Ok(())
}

/// A daemon-side Control that echoes what it received.
struct EchoControl;

fn metadata(req_md: &tonic::metadata::MetadataMap, key: &str) -> String {
    req_md
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tonic::async_trait]
impl control::control_server::Control for EchoControl {
    async fn solve(
        &self,
        request: Request<control::SolveRequest>,
    ) -> Result<Response<control::SolveResponse>, Status> {
        let req = request.into_inner();
        let mut out = std::collections::HashMap::new();
        out.insert("ref".to_string(), req.r#ref);
        out.insert("session".to_string(), req.session);
        let exporters: Vec<String> = req.exporters.iter().map(|e| e.r#type.clone()).collect();
        out.insert("exporters".to_string(), exporters.join(","));
        Ok(Response::new(control::SolveResponse {
            exporter_response: out,
        }))
    }

    async fn status(
        &self,
        request: Request<control::StatusRequest>,
    ) -> Result<Response<BoxStream<control::StatusResponse>>, Status> {
        let r = request.into_inner().r#ref;
        let updates = (0..3).map(move |i| {
            Ok(control::StatusResponse {
                vertexes: vec![control::Vertex {
                    digest: format!("sha256:{r}{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            })
        });
        let mut resp = Response::new(Box::pin(stream::iter(updates)) as BoxStream<_>);
        resp.metadata_mut().insert(
            CURRENT_TIMESTAMP,
            tonic::metadata::MetadataValue::from_static("2026-11-27T08:00:00.000000001Z"),
        );
        Ok(resp)
    }

    async fn session(
        &self,
        request: Request<Streaming<control::BytesMessage>>,
    ) -> Result<Response<BoxStream<control::BytesMessage>>, Status> {
        let id = metadata(request.metadata(), SESSION_UUID);
        let methods: Vec<String> = request
            .metadata()
            .get_all(SESSION_GRPC_METHOD)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let mut incoming = request.into_inner();
        let mut data = Vec::new();
        while let Some(msg) = incoming.message().await? {
            data.extend(msg.data);
        }
        let replies = vec![
            Ok(control::BytesMessage {
                data: id.into_bytes(),
            }),
            Ok(control::BytesMessage {
                data: methods.join(",").into_bytes(),
            }),
            Ok(control::BytesMessage { data }),
        ];
        Ok(Response::new(Box::pin(stream::iter(replies))))
    }
}

#[tokio::test]
async fn control_round_trip_of_solve_status_and_session() -> anyhow::Result<()> {
    let mut c = control::control_client::ControlClient::new(
        control::control_server::ControlServer::new(EchoControl),
    );
    let resp = c
        .solve(control::SolveRequest {
            r#ref: "ref123".into(),
            session: "sess9".into(),
            exporters: vec![control::Exporter {
                r#type: "image".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    let get = |k: &str| resp.exporter_response.get(k).cloned().unwrap_or_default();
    ensure!(get("ref") == "ref123" && get("session") == "sess9" && get("exporters") == "image");

    let status = c
        .status(control::StatusRequest { r#ref: "r".into() })
        .await?;
    let ts = metadata(status.metadata(), CURRENT_TIMESTAMP);
    ensure!(ts == "2026-11-27T08:00:00.000000001Z", "{ts}");
    let mut updates = status.into_inner();
    let mut digests = Vec::new();
    while let Some(u) = updates.message().await? {
        digests.extend(u.vertexes.into_iter().map(|v| v.digest));
    }
    ensure!(
        digests == ["sha256:r0", "sha256:r1", "sha256:r2"],
        "{digests:?}"
    );

    let chunks = vec![
        control::BytesMessage {
            data: b"PRI * HTTP/2.0".to_vec(),
        },
        control::BytesMessage {
            data: b"\r\n\r\nSM".to_vec(),
        },
    ];
    let mut req = Request::new(stream::iter(chunks));
    let md = req.metadata_mut();
    md.insert(SESSION_UUID, "abc123".parse()?);
    md.insert(SESSION_SHARED_KEY, "".parse()?);
    md.append(
        SESSION_GRPC_METHOD,
        "/moby.filesync.v1.FileSync/DiffCopy".parse()?,
    );
    md.append(SESSION_GRPC_METHOD, "/grpc.health.v1.Health/Check".parse()?);
    let replies: Vec<Vec<u8>> = c
        .session(req)
        .await?
        .into_inner()
        .map(|m| m.map(|m| m.data))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, Status>>()?;
    ensure!(replies.len() == 3);
    ensure!(replies[0] == b"abc123");
    ensure!(replies[1] == b"/moby.filesync.v1.FileSync/DiffCopy,/grpc.health.v1.Health/Check");
    ensure!(replies[2] == b"PRI * HTTP/2.0\r\n\r\nSM");
    Ok(())
}

/// A daemon-side LLBBridge answering Ping and checking the build ID on Return.
struct Bridge;

#[tonic::async_trait]
impl gateway::llb_bridge_server::LlbBridge for Bridge {
    async fn ping(
        &self,
        _request: Request<gateway::PingRequest>,
    ) -> Result<Response<gateway::PongResponse>, Status> {
        let cap = |id: &str| kiln_proto::moby::buildkit::v1::apicaps::ApiCap {
            id: id.into(),
            enabled: true,
            ..Default::default()
        };
        Ok(Response::new(gateway::PongResponse {
            frontend_api_caps: vec![cap("return"), cap("proto.refarray")],
            llb_caps: vec![cap("source.local")],
            workers: vec![kiln_proto::moby::buildkit::v1::types::WorkerRecord {
                id: "kiln0".into(),
                ..Default::default()
            }],
        }))
    }

    async fn r#return(
        &self,
        request: Request<gateway::ReturnRequest>,
    ) -> Result<Response<gateway::ReturnResponse>, Status> {
        let build = metadata(request.metadata(), BUILD_ID);
        if build != "ref123" {
            return Err(Status::not_found(format!("unknown build {build:?}")));
        }
        match request.into_inner().result.and_then(|r| r.result) {
            Some(gateway::result::Result::Ref(r)) if r.id.is_empty() => {
                Ok(Response::new(gateway::ReturnResponse {}))
            }
            other => Err(Status::invalid_argument(format!("unexpected {other:?}"))),
        }
    }
}

#[tokio::test]
async fn llbbridge_ping_and_probe_return_carry_the_build_id() -> anyhow::Result<()> {
    let mut c = gateway::llb_bridge_client::LlbBridgeClient::new(
        gateway::llb_bridge_server::LlbBridgeServer::new(Bridge),
    );
    let pong = c.ping(gateway::PingRequest {}).await?.into_inner();
    let caps: Vec<&str> = pong
        .frontend_api_caps
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    ensure!(caps == ["return", "proto.refarray"] && pong.workers[0].id == "kiln0");

    let probe = || gateway::ReturnRequest {
        result: Some(gateway::Result {
            result: Some(gateway::result::Result::Ref(gateway::Ref::default())),
            ..Default::default()
        }),
        error: None,
    };
    let mut req = Request::new(probe());
    req.metadata_mut().insert(BUILD_ID, "ref123".parse()?);
    c.r#return(req).await?;
    let err = c
        .r#return(Request::new(probe()))
        .await
        .err()
        .context("no build id accepted")?;
    ensure!(err.code() == tonic::Code::NotFound, "{err:?}");
    Ok(())
}

/// A client-side FileSync sender for one file, driven by the daemon's REQ packets.
struct OneFile;

#[tonic::async_trait]
impl filesync::file_sync_server::FileSync for OneFile {
    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<BoxStream<Packet>>, Status> {
        if metadata(request.metadata(), DIR_NAME) != "context" {
            return Err(Status::not_found("no access allowed to dir"));
        }
        let mut incoming = request.into_inner();
        let stat = |path: &str, mode: u32| Packet {
            stat: Some(Stat {
                path: path.into(),
                mode,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = vec![
            stat("dir", 0x8000_01ed),
            stat("dir/f", 0o644),
            Packet::default(),
        ];
        while let Some(p) = incoming.message().await? {
            match p.r#type() {
                PacketType::PacketReq if p.id == 1 => {
                    out.push(Packet {
                        r#type: PacketType::PacketData as i32,
                        id: 1,
                        data: b"hello".to_vec(),
                        ..Default::default()
                    });
                    out.push(Packet {
                        r#type: PacketType::PacketData as i32,
                        id: 1,
                        ..Default::default()
                    });
                }
                PacketType::PacketFin => {
                    out.push(Packet {
                        r#type: PacketType::PacketFin as i32,
                        ..Default::default()
                    });
                }
                _ => return Err(Status::invalid_argument("unexpected packet")),
            }
        }
        Ok(Response::new(Box::pin(stream::iter(
            out.into_iter().map(Ok),
        ))))
    }
}

#[tokio::test]
async fn filesync_diffcopy_round_trip_with_dir_name_metadata() -> anyhow::Result<()> {
    let mut c = filesync::file_sync_client::FileSyncClient::new(
        filesync::file_sync_server::FileSyncServer::new(OneFile),
    );
    let daemon = vec![
        Packet {
            r#type: PacketType::PacketReq as i32,
            id: 1,
            ..Default::default()
        },
        Packet {
            r#type: PacketType::PacketFin as i32,
            ..Default::default()
        },
    ];
    let mut req = Request::new(stream::iter(daemon.clone()));
    req.metadata_mut().insert(DIR_NAME, "context".parse()?);
    let got: Vec<Packet> = c
        .diff_copy(req)
        .await?
        .into_inner()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, Status>>()?;
    ensure!(got.len() == 6, "{got:?}");
    ensure!(got[0].stat.as_ref().map(|s| s.mode) == Some(0x8000_01ed));
    ensure!(got[2].stat.is_none() && got[2].r#type() == PacketType::PacketStat);
    ensure!(got[3].data == b"hello" && got[4].data.is_empty() && got[4].id == 1);
    ensure!(got[5].r#type() == PacketType::PacketFin);

    let err = c
        .diff_copy(stream::iter(daemon))
        .await
        .err()
        .context("accepted no dir-name")?;
    ensure!(err.code() == tonic::Code::NotFound);
    Ok(())
}

/// The health service every session serves.
struct Healthy;

#[tonic::async_trait]
impl health::health_server::Health for Healthy {
    async fn check(
        &self,
        _request: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        Ok(Response::new(health::HealthCheckResponse {
            status: health::health_check_response::ServingStatus::Serving as i32,
        }))
    }
}

#[tokio::test]
async fn health_check_round_trip() -> anyhow::Result<()> {
    let mut c =
        health::health_client::HealthClient::new(health::health_server::HealthServer::new(Healthy));
    let r = c
        .check(health::HealthCheckRequest::default())
        .await?
        .into_inner();
    ensure!(r.status() == health::health_check_response::ServingStatus::Serving);
    stubbed(c.watch(health::HealthCheckRequest::default()).await)?;
    Ok(())
}

#[tokio::test]
async fn control_and_health_over_real_http2_on_one_endpoint() -> anyhow::Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let addr = incoming.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(control::control_server::ControlServer::new(EchoControl))
            .add_service(health::health_server::HealthServer::new(Healthy))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut c = control::control_client::ControlClient::new(channel.clone());
    let resp = c
        .solve(control::SolveRequest {
            r#ref: "tcp".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(resp.exporter_response.get("ref").map(String::as_str) == Some("tcp"));
    let mut req = Request::new(stream::iter(vec![control::BytesMessage {
        data: b"h2".to_vec(),
    }]));
    req.metadata_mut()
        .insert(SESSION_UUID, "tcp-session".parse()?);
    let replies: Vec<control::BytesMessage> = c
        .session(req)
        .await?
        .into_inner()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, Status>>()?;
    ensure!(replies.len() == 3 && replies[0].data == b"tcp-session" && replies[2].data == b"h2");
    let mut h = health::health_client::HealthClient::new(channel);
    let r = h
        .check(health::HealthCheckRequest::default())
        .await?
        .into_inner();
    ensure!(r.status() == health::health_check_response::ServingStatus::Serving);
    // A service this endpoint does not serve answers Unimplemented.
    let mut ssh = ssh::ssh_client::SshClient::connect(format!("http://{addr}")).await?;
    let err = ssh
        .check_agent(ssh::CheckAgentRequest::default())
        .await
        .err()
        .context("unserved service answered OK")?;
    ensure!(err.code() == tonic::Code::Unimplemented);
    let _ = stop.send(());
    server.await??;
    Ok(())
}
