//! Certificates from `kiln_controller::tls` complete a real mTLS handshake over loopback with
//! rustls (ring), and the wrong CA or a name outside the SANs is refused.

use std::sync::Arc;
use std::time::Duration;

use kiln_controller::tls::{issue, issue_ca, server_names, Ca, Issued, Usage};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LIFE: Duration = Duration::from_secs(86_400);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())?)?;
    Ok(Arc::new(roots))
}

type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn chain(i: &Issued) -> anyhow::Result<Chain> {
    Ok((
        vec![CertificateDer::from_pem_slice(i.cert_pem.as_bytes())?],
        PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes())?,
    ))
}

/// Serves one connection with `server` requiring client certificates from `ca`, and connects
/// to it as `client` trusting `client_trust`, using `name`. The outer error is a broken test
/// setup; the inner one the handshake's outcome. Returns what the client read.
async fn handshake(
    ca: &Ca,
    server: &Issued,
    client_trust: &Ca,
    client: &Issued,
    name: &str,
) -> anyhow::Result<std::io::Result<Vec<u8>>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider()).build()?;
    let (certs, key) = chain(server)?;
    let server_cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    let (certs, key) = chain(client)?;
    let client_cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(client_trust)?)
        .with_client_auth_cert(certs, key)?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.len())
            .unwrap_or(0);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(format!("pong{peer}").as_bytes()).await?;
        tls.shutdown().await?;
        std::io::Result::Ok(())
    });
    let connector = TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string())?;
    let result = async {
        let mut tls = connector.connect(server_name, tcp).await?;
        tls.write_all(b"ping").await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        std::io::Result::Ok(out)
    }
    .await;
    let served = server_task.await?;
    Ok(result.and_then(|out| served.map(|()| out)))
}

#[tokio::test]
async fn issued_certificates_complete_mutual_tls() {
    let now = OffsetDateTime::now_utc();
    let ca = issue_ca("p", now, LIFE).unwrap();
    let names = server_names("p", "ns", 3);
    let server = issue(&ca, "p-gateway", &names, Usage::Server, now, LIFE).unwrap();
    let client = issue(&ca, "kiln-user", &[], Usage::Client, now, LIFE).unwrap();

    for name in [
        "p-gateway.ns.svc",
        "p-worker-2.p-workers.ns.svc.cluster.local",
        "localhost",
    ] {
        let got = handshake(&ca, &server, &ca, &client, name)
            .await
            .unwrap()
            .unwrap();
        // The server saw exactly one client certificate.
        assert_eq!(got, b"pong1", "{name}");
    }
    // The gateway's client certificate towards workers is a server certificate too.
    let got = handshake(&ca, &server, &ca, &server, "p-worker-0.p-workers.ns.svc")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"pong1");
}

#[tokio::test]
async fn wrong_name_or_wrong_ca_is_refused() {
    let now = OffsetDateTime::now_utc();
    let ca = issue_ca("p", now, LIFE).unwrap();
    let other = issue_ca("q", now, LIFE).unwrap();
    let server = issue(
        &ca,
        "p-gateway",
        &server_names("p", "ns", 3),
        Usage::Server,
        now,
        LIFE,
    )
    .unwrap();
    let client = issue(&ca, "kiln-user", &[], Usage::Client, now, LIFE).unwrap();
    let stranger = issue(&other, "kiln-user", &[], Usage::Client, now, LIFE).unwrap();

    // A worker beyond the pool's size is not in the SANs.
    assert!(
        handshake(&ca, &server, &ca, &client, "p-worker-3.p-workers.ns.svc")
            .await
            .unwrap()
            .is_err()
    );
    // A client certificate from another CA.
    assert!(handshake(&ca, &server, &ca, &stranger, "p-gateway.ns.svc")
        .await
        .unwrap()
        .is_err());
    // A client that trusts another CA.
    assert!(handshake(&ca, &server, &other, &client, "p-gateway.ns.svc")
        .await
        .unwrap()
        .is_err());
}
