//! Pieces every mocked API server of these tests shares.

use http::{Response, StatusCode};
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
