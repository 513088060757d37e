//! A minimal HTTP/1.1 server for the daemons' plain endpoints (metrics, probes, the
//! gateway's admin API): one request per connection, no request bodies, text answers.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal plaintext HTTP/1.1 server (one request per connection, no request bodies):
/// `handler(method, path_and_query)` returns the status code and a text body.
pub async fn serve<H>(listener: tokio::net::TcpListener, handler: H)
where
    H: Fn(&str, &str) -> (u16, String) + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move { serve_conn(sock, &*handler).await });
    }
}

/// Answers the one request of a connection (plaintext or already TLS-authenticated) with
/// `handler(method, path_and_query)`, then closes it.
pub async fn serve_conn<S, H>(mut sock: S, handler: &H)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(&str, &str) -> (u16, String) + ?Sized,
{
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // Read until the end of the request head.
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("GET");
    let path = words.next().unwrap_or("/");
    let (code, body) = handler(method, path);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}
