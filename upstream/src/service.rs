//! The request handler: every path answers `"ok"`, except the health path.

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};

/// Path answered with [`HEALTH_BODY`] instead of [`OK_BODY`].
pub const HEALTH_PATH: &str = "/healthz";
/// What DRF's JSONRenderer makes of `Response("ok")`.
pub const OK_BODY: &str = "\"ok\"";
/// Body of the health check.
pub const HEALTH_BODY: &str = r#"{"status":"healthy"}"#;

pub(crate) async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if req.uri().path() == HEALTH_PATH {
        HEALTH_BODY
    } else {
        OK_BODY
    };

    // Read the request body to the end (discarding it) so the HTTP/1
    // connection stays reusable for the next request; a body hyper cannot
    // read would end the connection anyway, so the error is not interesting.
    let mut incoming = req.into_body();
    while let Some(frame) = incoming.frame().await {
        if frame.is_err() {
            break;
        }
    }

    // A `Full` body has an exact size, so hyper writes `content-length`
    // itself, and it drops the body (but keeps the length) for HEAD.
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
