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
            .add_service(svc.into_server())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_api_solves_llb_and_streams_status() -> anyhow::Result<()> {
    let env = env()?;
    let root = tempfile::tempdir()?;
    let engine = Engine::open(EngineConfig {
        root: root.path().to_path_buf(),
        ..Default::default()
    })?;
    let (_dir, channel) = serve(engine).await?;
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

    // What is not served yet says so.
    let err = client
        .solve(api::SolveRequest {
            r#ref: "build-2".into(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("dockerfile.v0 without a session must fail"))?;
    assert_eq!(err.code(), tonic::Code::Unimplemented);
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
