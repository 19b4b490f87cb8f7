//! The request handler: every path answers `"ok"`, except the health path
//! and [`crate::metered`]'s.

use std::convert::Infallible;

use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};

use crate::metered::{self, ReplyBody, METERED_PATH};

/// Path answered with [`HEALTH_BODY`] instead of [`OK_BODY`].
pub const HEALTH_PATH: &str = "/healthz";
/// What DRF's JSONRenderer makes of `Response("ok")`.
pub const OK_BODY: &str = "\"ok\"";
/// Body of the health check.
pub const HEALTH_BODY: &str = r#"{"status":"healthy"}"#;

pub(crate) async fn handle(req: Request<Incoming>) -> Result<Response<ReplyBody>, Infallible> {
    let (head, mut incoming) = req.into_parts();

    // Read the request body to the end (discarding it) so the HTTP/1
    // connection stays reusable for the next request; a body hyper cannot
    // read would end the connection anyway, so the error is not interesting.
    while let Some(frame) = incoming.frame().await {
        if frame.is_err() {
            break;
        }
    }

    let body = match head.uri.path() {
        HEALTH_PATH => HEALTH_BODY,
        METERED_PATH => {
            let (delay, response) = metered::answer(head.uri.query());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            return Ok(response);
        }
        _ => OK_BODY,
    };

    // A `Full` body has an exact size, so hyper writes `content-length`
    // itself, and it drops the body (but keeps the length) for HEAD.
    let mut response = Response::new(Either::Left(Full::new(Bytes::from_static(body.as_bytes()))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
