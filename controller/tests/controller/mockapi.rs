//! Pieces every mocked API server of these tests shares.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::Value;

/// The mocked API server's JSON answer.
pub fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(value.to_string().into_bytes()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A kube client whose API server is `respond`: it gets each request's head and body and
/// returns the status and JSON answer.
pub fn client<F>(mut respond: F) -> kube::Client
where
    F: FnMut(&http::request::Parts, &[u8]) -> (StatusCode, Value) + Send + 'static,
{
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let (code, value) = respond(&parts, &bytes);
            send.send_response(json_response(code, &value));
        }
    });
    kube::Client::new(service, "default")
}

/// A request's `Content-Type` (empty when absent).
pub fn content_type(parts: &http::request::Parts) -> String {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default()
}

/// A request body as JSON; one that is not JSON is kept as a string, which no assertion
/// accepts; none when empty.
pub fn json_body(bytes: &[u8]) -> Option<Value> {
    (!bytes.is_empty()).then(|| {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
    })
}
