//! Certificates issued by the controller work with Kiln's own transport
//! (`kiln_proto::transport`, the mTLS listener and channel the worker, gateway and CLI use),
//! through every phase of a CA rollover: a client and server that both hold the two-CA
//! `ca.crt` interoperate whichever CA signed their certificates.

use std::path::Path;
use std::time::Duration;

use kiln_controller::tls::{issue, issue_ca, server_names, Issued, Trust, Usage};
use kiln_proto::grpc::health::v1 as health;
use kiln_proto::transport::{Addr, ClientTls, ServeTls, TlsFiles};
use time::OffsetDateTime;

const LIFE: Duration = Duration::from_secs(86_400);

#[derive(Clone, Default)]
struct Serving;

#[tonic::async_trait]
impl health::health_server::Health for Serving {
    async fn check(
        &self,
        _: tonic::Request<health::HealthCheckRequest>,
    ) -> Result<tonic::Response<health::HealthCheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(health::HealthCheckResponse {
            status: health::health_check_response::ServingStatus::Serving as i32,
        }))
    }
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` as the kubelet would mount the Secret.
fn mount(dir: &Path, issued: &Issued, ca_crt: &str) -> anyhow::Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), ca_crt)?;
    std::fs::write(dir.join("tls.crt"), &issued.cert_pem)?;
    std::fs::write(dir.join("tls.key"), &issued.key_pem)?;
    Ok(TlsFiles {
        ca: Some(dir.join("ca.crt")),
        cert: Some(dir.join("tls.crt")),
        key: Some(dir.join("tls.key")),
    })
}

/// Serves the health service with `server` on a free port and calls it once as `client`,
/// verifying the server as `name`. The outer error is a broken setup; the inner result is
/// whether the call went through.
async fn call(
    server: TlsFiles,
    client: TlsFiles,
    name: &str,
) -> anyhow::Result<Result<(), String>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: Addr = format!("tcp://127.0.0.1:{port}").parse()?;
    let incoming = ServeTls::from_flags(server, false)?.listen(&addr).await?;
    let served = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health::health_server::HealthServer::new(Serving))
            .serve_with_incoming(incoming),
    );
    let tls = ClientTls::load(client, Some(name.to_string()))?;
    let result = async {
        let channel = kiln_proto::transport::connect(&addr, Some(tls))
            .await
            .map_err(|e| e.to_string())?;
        health::health_client::HealthClient::new(channel)
            .check(health::HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    .await;
    served.abort();
    Ok(result)
}

#[tokio::test]
async fn controller_certificates_work_with_kiln_transport_through_a_ca_rollover() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let now = OffsetDateTime::now_utc();
    let names = server_names("p", "ns", 2);
    let gw = "p-gateway.ns.svc";
    let old = issue_ca("p", now, LIFE).unwrap();
    let new = issue_ca("p", now, LIFE).unwrap();
    let srv_old = issue(&old, "p-gateway", &names, Usage::Server, now, LIFE).unwrap();
    let cli_old = issue(&old, "kiln-user", &[], Usage::Client, now, LIFE).unwrap();
    let srv_new = issue(&new, "p-gateway", &names, Usage::Server, now, LIFE).unwrap();
    let cli_new = issue(&new, "kiln-user", &[], Usage::Client, now, LIFE).unwrap();
    let bundle = Trust {
        ca: &new,
        previous: Some(&old.cert_pem),
        switch_over: false,
    }
    .bundle();

    // Before: one CA.
    let r = call(
        mount(&d("s0"), &srv_old, &old.cert_pem).unwrap(),
        mount(&d("c0"), &cli_old, &old.cert_pem).unwrap(),
        gw,
    )
    .await
    .unwrap();
    assert_eq!(r, Ok(()));
    // A worker's stable name verifies too.
    let r = call(
        mount(&d("s0w"), &srv_old, &old.cert_pem).unwrap(),
        mount(&d("c0w"), &cli_old, &old.cert_pem).unwrap(),
        "p-worker-1.p-workers.ns.svc.cluster.local",
    )
    .await
    .unwrap();
    assert_eq!(r, Ok(()));

    // Phase 1 (old certificates, both CAs trusted), and phase 2 in every mix of who has
    // moved to the new certificate already.
    for (i, (srv, cli)) in [
        (&srv_old, &cli_old),
        (&srv_new, &cli_old),
        (&srv_old, &cli_new),
        (&srv_new, &cli_new),
    ]
    .into_iter()
    .enumerate()
    {
        let r = call(
            mount(&d(&format!("s{}", i + 1)), srv, &bundle).unwrap(),
            mount(&d(&format!("c{}", i + 1)), cli, &bundle).unwrap(),
            gw,
        )
        .await
        .unwrap();
        assert_eq!(r, Ok(()), "mix {i}");
    }

    // Without phase 1, a client still trusting only the old CA refuses a new certificate:
    // the reason the rollover spreads trust first.
    let r = call(
        mount(&d("s9"), &srv_new, &bundle).unwrap(),
        mount(&d("c9"), &cli_old, &old.cert_pem).unwrap(),
        gw,
    )
    .await
    .unwrap();
    assert!(r.is_err(), "{r:?}");
    // And a name outside the certificate is refused.
    let r = call(
        mount(&d("s10"), &srv_new, &bundle).unwrap(),
        mount(&d("c10"), &cli_new, &bundle).unwrap(),
        "p-worker-2.p-workers.ns.svc",
    )
    .await
    .unwrap();
    assert!(r.is_err(), "{r:?}");
}
