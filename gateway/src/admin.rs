//! The operator's admin endpoint (off unless `--admin-addr` is given): `GET /workers` lists
//! the pool, `POST /drain?worker=NAME` stops new builds going to a worker while its running
//! builds go on, `POST /undrain?worker=NAME` undoes it. On loopback it is plain HTTP
//! ([`serve`]); on any other address it is HTTPS requiring a client certificate from the
//! clients' CA, the same mutual TLS as the gRPC port ([`serve_tls`]; the controller calls
//! it with its client certificate). Uses [`crate::health`] and the HTTP server of
//! [`crate::metrics`].

use crate::health::Pool;
use crate::metrics::serve_http;

/// The answer to one admin request: status code and text body.
pub fn handle(pool: &Pool, method: &str, path: &str) -> (u16, String) {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    match (method, route) {
        ("GET", "/workers") => {
            let mut out = String::new();
            for w in pool.workers() {
                let limit = match w.limit() {
                    0 => "unlimited".to_string(),
                    n => n.to_string(),
                };
                out.push_str(&format!(
                    "{} {} healthy={} draining={} inflight={} queued={} limit={limit}\n",
                    w.name,
                    w.addr,
                    w.is_healthy(),
                    w.is_draining(),
                    w.inflight(),
                    w.queued(),
                ));
            }
            (200, out)
        }
        ("POST", "/drain" | "/undrain") => {
            let Some(name) = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("worker="))
                .filter(|n| !n.is_empty())
            else {
                return (400, format!("{route}: missing ?worker=NAME\n"));
            };
            let draining = route == "/drain";
            if pool.set_draining(name, draining) {
                (200, format!("{name}: draining={draining}\n"))
            } else {
                (404, format!("{route}: no worker named {name:?}\n"))
            }
        }
        (_, "/workers" | "/drain" | "/undrain") => {
            (405, format!("{method} {route}: not allowed\n"))
        }
        _ => (404, "not found\n".to_string()),
    }
}

/// Serves the admin endpoint on `listener` (loopback) forever.
pub async fn serve(pool: Pool, listener: tokio::net::TcpListener) {
    serve_http(listener, move |method: &str, path: &str| {
        handle(&pool, method, path)
    })
    .await
}

/// Serves the admin endpoint over the connections of `incoming`, which
/// [`kiln_proto::transport::ServeTls::listen`] has already authenticated with mutual TLS
/// (a client without a certificate from the CA never gets here), until it ends.
pub async fn serve_tls(pool: Pool, mut incoming: kiln_proto::transport::Incoming) {
    use futures::StreamExt as _;
    while let Some(conn) = incoming.next().await {
        let Ok(conn) = conn else { continue };
        let pool = pool.clone();
        tokio::spawn(async move {
            crate::metrics::serve_http_conn(conn, &|method: &str, path: &str| {
                handle(&pool, method, path)
            })
            .await
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Member;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn drain_and_undrain() {
        let pool = Pool::new(10, 1.25, Metrics::new().expect("metrics"));
        pool.set_members(&[Member {
            name: "w0".into(),
            addr: "tcp://127.0.0.1:9".into(),
        }])
        .expect("members");
        assert_eq!(handle(&pool, "POST", "/drain?worker=w0").0, 200);
        assert!(pool.get("w0").is_some_and(|w| w.is_draining()));
        let (code, body) = handle(&pool, "GET", "/workers");
        assert_eq!(code, 200);
        assert!(body.contains("w0 tcp://127.0.0.1:9") && body.contains("draining=true"));
        assert!(body.contains("queued=0 limit=unlimited"), "{body}");
        assert_eq!(handle(&pool, "POST", "/undrain?worker=w0").0, 200);
        assert!(pool.get("w0").is_some_and(|w| !w.is_draining()));
        let (code, body) = handle(&pool, "POST", "/drain?worker=nope");
        assert_eq!(code, 404);
        assert!(body.contains("nope"));
        assert_eq!(handle(&pool, "POST", "/drain").0, 400);
        assert_eq!(handle(&pool, "GET", "/drain?worker=w0").0, 405);
    }

    /// One HTTP/1.1 request over a TLS connection made with `tls`: the response, or the
    /// I/O error that ended it.
    async fn https(
        port: u16,
        tls: Option<std::sync::Arc<kiln_proto::transport::ClientTls>>,
        request: &str,
    ) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tower::ServiceExt as _;
        let addr = kiln_proto::transport::Addr::Tcp(format!("127.0.0.1:{port}"));
        let io = kiln_proto::transport::connector(&addr, tls)
            .oneshot(http::Uri::from_static("http://localhost"))
            .await?;
        let mut io = io.into_inner();
        io.write_all(request.as_bytes()).await?;
        let mut out = String::new();
        io.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn off_loopback_the_admin_endpoint_needs_a_client_certificate() {
        use kiln_proto::transport::{ClientTls, ServeTls, TlsFiles};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = kiln_e2e::pki::Ca::new("clients").expect("ca");
        let server = ca
            .server(dir.path(), "gateway", &["localhost"])
            .expect("server cert");
        let client = ca.client(dir.path(), "controller").expect("client cert");
        let stranger_ca = kiln_e2e::pki::Ca::new("stranger").expect("ca");
        let stranger = stranger_ca
            .client(&dir.path().join("s"), "stranger")
            .expect("client cert");

        let pool = Pool::new(10, 1.25, Metrics::new().expect("metrics"));
        pool.set_members(&[Member {
            name: "w0".into(),
            addr: "tcp://127.0.0.1:9".into(),
        }])
        .expect("members");
        let tls = ServeTls::from_flags(
            TlsFiles {
                ca: Some(server.ca.clone()),
                cert: Some(server.cert.clone()),
                key: Some(server.key.clone()),
            },
            false,
        )
        .expect("server tls");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let incoming = tls
            .listen(&kiln_proto::transport::Addr::Tcp(format!(
                "127.0.0.1:{port}"
            )))
            .await
            .expect("listen");
        tokio::spawn(serve_tls(pool.clone(), incoming));

        let with = |id: &kiln_e2e::pki::Identity, cert: bool| {
            ClientTls::load(
                TlsFiles {
                    ca: Some(server.ca.clone()),
                    cert: cert.then(|| id.cert.clone()),
                    key: cert.then(|| id.key.clone()),
                },
                Some("localhost".into()),
            )
            .expect("client tls")
        };
        let get = "GET /workers HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let out = https(port, Some(with(&client, true)), get)
            .await
            .expect("with the clients' CA's certificate");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("w0 tcp://127.0.0.1:9 healthy="), "{out}");
        let drain = "POST /drain?worker=w0 HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let out = https(port, Some(with(&client, true)), drain)
            .await
            .expect("drain");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(pool.get("w0").is_some_and(|w| w.is_draining()));

        // No client certificate, or one from another CA: no answer, and nothing changed.
        pool.set_draining("w0", false);
        for (what, tls) in [
            ("no client certificate", with(&client, false)),
            ("another CA's certificate", with(&stranger, true)),
        ] {
            let out = https(port, Some(tls), drain).await;
            assert!(
                out.as_ref().map_or(true, |o| !o.contains("HTTP/1.1")),
                "{what}: {out:?}"
            );
        }
        // Plaintext gets no HTTP answer either.
        let out = https(port, None, get).await;
        assert!(
            out.as_ref().map_or(true, |o| !o.contains("HTTP/1.1")),
            "{out:?}"
        );
        assert!(pool.get("w0").is_some_and(|w| !w.is_draining()));
    }
}
