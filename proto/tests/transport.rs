//! Listeners and channels of `kiln_proto::transport` with real TLS over loopback: mutual TLS
//! is enforced, and rotated certificate files take effect for new connections while an
//! established one keeps working.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_e2e::pki::{Ca, Identity};
use kiln_proto::grpc::health::v1 as health;
use kiln_proto::transport::{self, Addr, ClientTls, ServeTls, TlsFiles};

/// A health service that counts its calls, so the test knows a call reached it.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

#[tonic::async_trait]
impl health::health_server::Health for Counting {
    async fn check(
        &self,
        _: tonic::Request<health::HealthCheckRequest>,
    ) -> Result<tonic::Response<health::HealthCheckResponse>, tonic::Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(health::HealthCheckResponse {
            status: health::health_check_response::ServingStatus::Serving as i32,
        }))
    }
}

fn files(id: &Identity) -> TlsFiles {
    TlsFiles {
        ca: Some(id.ca.clone()),
        cert: Some(id.cert.clone()),
        key: Some(id.key.clone()),
    }
}

async fn serve(tls: ServeTls, addr: &Addr, svc: Counting) -> anyhow::Result<()> {
    let incoming = tls.listen(addr).await?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health::health_server::HealthServer::new(svc))
            .serve_with_incoming(incoming),
    );
    Ok(())
}

async fn check(channel: tonic::transport::Channel) -> Result<i32, tonic::Status> {
    let mut c = health::health_client::HealthClient::new(channel);
    Ok(c.check(health::HealthCheckRequest::default())
        .await?
        .into_inner()
        .status)
}

fn free_addr() -> anyhow::Result<Addr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("tcp://{}", l.local_addr()?).parse()?)
}

#[tokio::test]
async fn mutual_tls_is_enforced_and_rotation_needs_no_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("kiln test CA")?;
    let server = ca.server(
        &dir.path().join("server"),
        "server",
        &["localhost", "127.0.0.1"],
    )?;
    let client = ca.client(&dir.path().join("client"), "client")?;
    let addr = free_addr()?;
    let svc = Counting::default();
    serve(
        ServeTls::from_flags(files(&server), false)?,
        &addr,
        svc.clone(),
    )
    .await?;

    // With a client certificate from the CA: served.
    let good = ClientTls::load(files(&client), None)?;
    let ch = transport::connect(&addr, Some(good.clone())).await?;
    assert_eq!(check(ch.clone()).await?, 1);
    assert_eq!(svc.0.load(Ordering::SeqCst), 1);

    // Without a client certificate: the handshake is refused, nothing reaches the service.
    let anonymous = ClientTls::load(
        TlsFiles {
            ca: Some(client.ca.clone()),
            ..Default::default()
        },
        None,
    )?;
    let refused = match transport::connect(&addr, Some(anonymous)).await {
        Ok(ch) => check(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");
    // Plaintext to the TLS port: refused too.
    let plain = match transport::connect(&addr, None).await {
        Ok(ch) => check(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(plain, "a plaintext client was served on the mTLS port");
    // A client certificate from another CA: refused.
    let other = Ca::new("someone else")?;
    let stranger = other.client(&dir.path().join("stranger"), "stranger")?;
    let mixed = ClientTls::load(
        TlsFiles {
            ca: Some(client.ca.clone()),
            cert: Some(stranger.cert.clone()),
            key: Some(stranger.key.clone()),
        },
        None,
    )?;
    let refused = match transport::connect(&addr, Some(mixed)).await {
        Ok(ch) => check(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client certificate from another CA was accepted");
    // A server name the certificate does not carry: the client refuses.
    let wrong_name = ClientTls::load(files(&client), Some("not-the-server".into()))?;
    assert!(transport::connect(&addr, Some(wrong_name)).await.is_err());
    assert_eq!(svc.0.load(Ordering::SeqCst), 1);

    // Rotate the server to a new CA by replacing its files in place.
    let ca2 = Ca::new("kiln test CA 2")?;
    ca2.server(
        &dir.path().join("server"),
        "server",
        &["localhost", "127.0.0.1"],
    )?;
    let client2 = ca2.client(&dir.path().join("client2"), "client")?;
    // The connection made before the rotation still serves calls.
    assert_eq!(check(ch).await?, 1);
    // New clients of the new CA are served; new clients of the old CA are not.
    let ch2 = transport::connect(&addr, Some(ClientTls::load(files(&client2), None)?)).await?;
    assert_eq!(check(ch2).await?, 1);
    let old = match transport::connect(&addr, Some(good)).await {
        Ok(ch) => check(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(old, "the old CA still works after rotation");
    assert_eq!(svc.0.load(Ordering::SeqCst), 3);
    Ok(())
}

#[tokio::test]
async fn unix_socket_replaces_a_stale_file_and_serves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("run/kiln/kiln.sock");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, b"stale")?;
    let addr: Addr = format!("unix://{}", path.display()).parse()?;
    serve(ServeTls::default(), &addr, Counting::default()).await?;
    assert_eq!(check(transport::connect(&addr, None).await?).await?, 1);
    // A lazy channel to nowhere fails at its first call with the address in the error.
    let nowhere: Addr = format!("unix://{}", dir.path().join("none.sock").display()).parse()?;
    let err = check(transport::channel(&nowhere, None)?)
        .await
        .unwrap_err();
    assert!(!err.message().is_empty());
    Ok(())
}
