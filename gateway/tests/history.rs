//! Re-attaching to a build the gateway no longer pins, for real: two `kiln-worker`s and a
//! `kiln-gateway` on loopback; a one-op LLB build finishes through the gateway, the
//! gateway is replaced by a fresh one (no pins), and `Status(ref)` and
//! `ListenBuildHistory{ref}` through the new gateway reach the worker that ran the build
//! (found by asking every worker's history); an unknown ref is NotFound naming it.
//!
//! Needs the binaries built (`cargo build -p kiln-worker -p kiln-gateway`); they are built
//! when missing (see `kiln_e2e::fleet::ensure_binaries`).

use std::time::Duration;

use futures::StreamExt;
use kiln_e2e::fleet;
use kiln_gateway::route::WORKER_HEADER;
use kiln_proto::moby::buildkit::v1 as api;

/// Bounds every call so a broken gateway fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(60);

async fn connect(
    port: u16,
) -> anyhow::Result<api::control_client::ControlClient<tonic::transport::Channel>> {
    Ok(api::control_client::ControlClient::connect(format!("http://127.0.0.1:{port}")).await?)
}

/// The history events a `ListenBuildHistory{ref, EarlyExit}` call returns.
async fn history(
    client: &mut api::control_client::ControlClient<tonic::transport::Channel>,
    r#ref: &str,
) -> Result<Vec<api::BuildHistoryEvent>, tonic::Status> {
    let req = api::BuildHistoryRequest {
        r#ref: r#ref.into(),
        early_exit: true,
        ..Default::default()
    };
    let call = async {
        let mut s = client.listen_build_history(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(ev) = s.next().await {
            out.push(ev?);
        }
        Ok(out)
    };
    tokio::time::timeout(GUARD, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("test guard")))
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn has_record(events: &[api::BuildHistoryEvent], r#ref: &str) -> bool {
    events
        .iter()
        .any(|e| e.record.as_ref().is_some_and(|r| r.r#ref == r#ref))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_history_of_an_unpinned_ref_reach_the_worker_that_ran_it() -> anyhow::Result<()>
{
    let bins = fleet::ensure_binaries()?;
    let dir = tempfile::Builder::new()
        .prefix("kiln-gw-history")
        .tempdir_in("/var/tmp")?;
    let mut members = Vec::new();
    let mut ports = Vec::new();
    let mut workers = Vec::new();
    for name in ["w0", "w1"] {
        let port = fleet::free_port()?;
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root)?;
        workers.push(fleet::start_worker(&bins, name, port, &root)?);
        members.push(format!("{name}=tcp://127.0.0.1:{port}"));
        ports.push((name, port));
    }
    let g1_dir = dir.path().join("g1");
    std::fs::create_dir_all(&g1_dir)?;
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let mut g1 = fleet::start_gateway(&bins, gport, mport, &members, &g1_dir)?;

    let build = "history-unpinned-1";
    let mut client = connect(gport).await?;
    let resp = tokio::time::timeout(
        GUARD,
        client.solve(api::SolveRequest {
            r#ref: build.into(),
            definition: Some(kiln_e2e::llb::mkfile("/history", b"history")),
            frontend_attrs: [("kiln.route-key".to_string(), "history".to_string())].into(),
            ..Default::default()
        }),
    )
    .await??;
    let ran = resp
        .metadata()
        .get(WORKER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ran == "w0" || ran == "w1",
        "solve answered without a worker header: {ran:?}"
    );
    // Only the worker that ran the build has its record.
    for (name, port) in &ports {
        let events = history(&mut connect(*port).await?, build).await?;
        assert_eq!(
            has_record(&events, build),
            *name == ran,
            "worker {name}'s history of {build}: {events:?}"
        );
    }

    // A fresh gateway knows no pins.
    g1.kill();
    drop(client);
    let g2_dir = dir.path().join("g2");
    std::fs::create_dir_all(&g2_dir)?;
    let (gport, mport) = (fleet::free_port()?, fleet::free_port()?);
    let g2 = fleet::start_gateway(&bins, gport, mport, &members, &g2_dir)?;
    let mut client = connect(gport).await?;

    let status = async {
        let mut s = client
            .status(api::StatusRequest {
                r#ref: build.into(),
            })
            .await?
            .into_inner();
        let mut vertexes = Vec::new();
        while let Some(m) = s.next().await {
            vertexes.extend(m?.vertexes);
        }
        Ok::<_, tonic::Status>(vertexes)
    };
    let vertexes = tokio::time::timeout(GUARD, status).await??;
    assert!(
        vertexes.iter().any(|v| v.completed.is_some()),
        "Status({build}) through the new gateway replayed no completed vertex: {vertexes:?}\ngateway:\n{}",
        g2.output()
    );

    let events = history(&mut client, build).await?;
    assert!(
        has_record(&events, build),
        "ListenBuildHistory({build}) through the new gateway: {events:?}\ngateway:\n{}",
        g2.output()
    );
    let log = plain(&g2.output());
    assert!(
        log.lines()
            .any(|l| l.contains("found in a worker's history")
                && l.contains(build)
                && l.contains(&format!("worker={ran}"))),
        "the gateway did not log finding {build} on {ran}:\n{log}"
    );

    // A ref no worker knows: NotFound naming it (after the pin wait).
    let err = history(&mut client, "no-such-build")
        .await
        .expect_err("an unknown ref was answered");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(err.message().contains("no-such-build"), "{err}");
    drop(workers);
    Ok(())
}
