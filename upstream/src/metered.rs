//! `/metered`: an answer that reports a usage figure the way an LLM-style API
//! does, through the channel the query picks, so the filter's "cost settled
//! from the response" (issue 13) has something real to settle against.
//!
//! The query is read as given, not percent-decoded; parameters other than
//! these four (such as `api_key`) are ignored:
//!
//! * `tokens=T` (1 to [`MAX_TOKENS_VALUES`] times): the figure, echoed as
//!   sent, at most [`MAX_TOKENS_LEN`] bytes of `[A-Za-z0-9._-]` (so a test can
//!   send `abc` or `-1`). Absent: no usage anywhere. Repeated: each value is
//!   reported (a repeated header or trailer field, one SSE usage event each;
//!   `via=json` takes one value only).
//! * `via=header|trailer|json|sse` (default `header`).
//! * `delay_ms=D` (0..=[`MAX_DELAY_MS`]): wait before the response head.
//! * `status=S` (200..=599): the status code.
//!
//! Anything else about them is a 400 with a JSON `detail` naming the
//! parameter (never echoing its value).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame};
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, TRAILER};
use hyper::{HeaderMap, Response, StatusCode};
use tokio::time::Sleep;

/// The endpoint's path (exact; any method).
pub const METERED_PATH: &str = "/metered";
/// The header or trailer that carries the figure.
pub const USAGE_FIELD: &str = "x-usage-tokens";
/// Longest `tokens` value.
pub const MAX_TOKENS_LEN: usize = 32;
/// Most `tokens` parameters in one query.
pub const MAX_TOKENS_VALUES: usize = 4;
/// Longest `delay_ms`: enough for any abort test, short enough that a stray
/// request cannot hold a connection for long.
pub const MAX_DELAY_MS: u64 = 30_000;

/// Pause between SSE events: they leave as separate writes, and the whole
/// stream (at most 3 deltas, 4 usage events and `[DONE]`: 7 gaps) stays
/// under 50 ms.
const SSE_GAP: Duration = Duration::from_millis(5);
/// What the SSE stream "generates" before its usage event.
const SSE_DELTAS: [&str; 3] = ["Hello", " from", " upstream"];

/// A response body: one exact-length buffer, or frames sent one by one.
pub(crate) type ReplyBody = Either<Full<Bytes>, Frames>;

/// The channel that carries the figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Header,
    Trailer,
    Json,
    Sse,
}

/// A parsed `/metered` query.
#[derive(Debug)]
struct Query<'a> {
    tokens: Vec<&'a str>,
    via: Via,
    delay: Duration,
    status: StatusCode,
}

/// How long to wait before the head, and the response; a bad query gets its
/// 400 at once.
pub(crate) fn answer(query: Option<&str>) -> (Duration, Response<ReplyBody>) {
    match parse(query.unwrap_or_default()).and_then(|q| Ok((q.delay, respond(&q)?))) {
        Ok(answer) => answer,
        Err(detail) => (Duration::ZERO, bad_request(detail)),
    }
}

fn parse(query: &str) -> Result<Query<'_>, &'static str> {
    let mut tokens = Vec::new();
    let (mut via, mut delay_ms, mut status) = (None, None, None);
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "tokens" => {
                if tokens.len() == MAX_TOKENS_VALUES {
                    return Err("tokens: at most 4 values");
                }
                if value.len() > MAX_TOKENS_LEN
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    return Err("tokens: at most 32 bytes of [A-Za-z0-9._-]");
                }
                tokens.push(value);
            }
            "via" => once(&mut via, value, "via: given twice")?,
            "delay_ms" => once(&mut delay_ms, value, "delay_ms: given twice")?,
            "status" => once(&mut status, value, "status: given twice")?,
            _ => {}
        }
    }
    let via = match via.unwrap_or("header") {
        "header" => Via::Header,
        "trailer" => Via::Trailer,
        "json" => Via::Json,
        "sse" => Via::Sse,
        _ => return Err("via: expected header, trailer, json or sse"),
    };
    if via == Via::Json && tokens.len() > 1 {
        return Err("tokens: one value only with via=json");
    }
    let delay_ms = match delay_ms {
        None => 0,
        Some(text) => small_number(text)
            .filter(|ms| *ms <= MAX_DELAY_MS)
            .ok_or("delay_ms: expected a whole number of milliseconds up to 30000")?,
    };
    let status = match status {
        None => StatusCode::OK,
        Some(text) => small_number(text)
            .filter(|code| (200..=599).contains(code))
            .and_then(|code| StatusCode::from_u16(u16::try_from(code).ok()?).ok())
            .ok_or("status: expected a status code from 200 to 599")?,
    };
    Ok(Query {
        tokens,
        via,
        delay: Duration::from_millis(delay_ms),
        status,
    })
}

/// Records a parameter that may appear once.
fn once<'a>(
    slot: &mut Option<&'a str>,
    value: &'a str,
    twice: &'static str,
) -> Result<(), &'static str> {
    match slot.replace(value) {
        None => Ok(()),
        Some(_) => Err(twice),
    }
}

/// 1 to 5 ASCII digits (no sign, no spaces) as a number.
fn small_number(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn respond(q: &Query<'_>) -> Result<Response<ReplyBody>, &'static str> {
    let usage = HeaderName::from_static(USAGE_FIELD);
    let values = q
        .tokens
        .iter()
        .map(|t| HeaderValue::from_str(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "tokens: not a header value")?;
    let mut response = match q.via {
        Via::Header => {
            let mut response = full(crate::service::OK_BODY.to_owned(), "application/json");
            for value in values {
                response.headers_mut().append(&usage, value);
            }
            response
        }
        Via::Trailer => {
            let mut frames = vec![Frame::data(Bytes::from_static(
                crate::service::OK_BODY.as_bytes(),
            ))];
            let declared = !values.is_empty();
            if declared {
                let mut trailers = HeaderMap::new();
                for value in values {
                    trailers.append(&usage, value);
                }
                frames.push(Frame::trailers(trailers));
            }
            let mut response = streamed(frames, Duration::ZERO, "application/json");
            if declared {
                // hyper's HTTP/1 server sends only the trailer fields this
                // header declares (and only to a request with `TE: trailers`).
                response
                    .headers_mut()
                    .insert(TRAILER, HeaderValue::from_static(USAGE_FIELD));
            }
            response
        }
        Via::Json => {
            let body = match q.tokens.first() {
                Some(t) => format!(r#"{{"usage":{{"total_tokens":{}}}}}"#, json_scalar(t)),
                None => "{}".to_owned(),
            };
            full(body, "application/json")
        }
        Via::Sse => {
            let events = SSE_DELTAS
                .iter()
                .map(|d| format!(r#"{{"delta":"{d}"}}"#))
                .chain(
                    q.tokens
                        .iter()
                        .map(|t| format!(r#"{{"usage":{{"total_tokens":{}}}}}"#, json_scalar(t))),
                )
                .chain(std::iter::once("[DONE]".to_owned()))
                .map(|data| Frame::data(Bytes::from(format!("data: {data}\n\n"))))
                .collect();
            let mut response = streamed(events, SSE_GAP, "text/event-stream");
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
    };
    *response.status_mut() = q.status;
    Ok(response)
}

/// `t` as a JSON number when it is one (`12`, `-1`, `1.5`), else as a JSON
/// string (`"abc"`, `"01"`): the body stays valid JSON and the field present,
/// so a malformed figure is a malformed value, not a missing one. `t` holds
/// only `[A-Za-z0-9._-]`, so quoting needs no escapes.
fn json_scalar(t: &str) -> String {
    if is_json_number(t) {
        t.to_owned()
    } else {
        format!("\"{t}\"")
    }
}

/// RFC 8259's `number` grammar.
fn is_json_number(t: &str) -> bool {
    let digits = |s: &str| -> usize { s.bytes().take_while(u8::is_ascii_digit).count() };
    let rest = t.strip_prefix('-').unwrap_or(t);
    let int = digits(rest);
    if int == 0 || (int > 1 && rest.starts_with('0')) {
        return false;
    }
    let mut rest = rest.get(int..).unwrap_or_default();
    if let Some(frac) = rest.strip_prefix('.') {
        let n = digits(frac);
        if n == 0 {
            return false;
        }
        rest = frac.get(n..).unwrap_or_default();
    }
    if let Some(exp) = rest.strip_prefix(['e', 'E']) {
        let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        let n = digits(exp);
        if n == 0 {
            return false;
        }
        rest = exp.get(n..).unwrap_or_default();
    }
    rest.is_empty()
}

fn full(body: String, content_type: &'static str) -> Response<ReplyBody> {
    with_content_type(
        Response::new(Either::Left(Full::new(Bytes::from(body)))),
        content_type,
    )
}

fn streamed(
    frames: Vec<Frame<Bytes>>,
    gap: Duration,
    content_type: &'static str,
) -> Response<ReplyBody> {
    with_content_type(
        Response::new(Either::Right(Frames::new(frames, gap))),
        content_type,
    )
}

fn with_content_type(
    mut response: Response<ReplyBody>,
    content_type: &'static str,
) -> Response<ReplyBody> {
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn bad_request(detail: &'static str) -> Response<ReplyBody> {
    // `detail` is one of this file's messages: no quotes or backslashes.
    let mut response = full(format!(r#"{{"detail":"{detail}"}}"#), "application/json");
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response
}

/// A body sent frame by frame, `gap` apart, with no length known in advance
/// (so HTTP/1.1 sends it chunked): data frames, then perhaps trailers.
pub(crate) struct Frames {
    frames: VecDeque<Frame<Bytes>>,
    gap: Duration,
    /// Running between two frames.
    pause: Option<Pin<Box<Sleep>>>,
}

impl Frames {
    fn new(frames: Vec<Frame<Bytes>>, gap: Duration) -> Self {
        Self {
            frames: frames.into(),
            gap,
            pause: None,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(pause) = this.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        let frame = this.frames.pop_front();
        if !this.frames.is_empty() && !this.gap.is_zero() {
            this.pause = Some(Box::pin(tokio::time::sleep(this.gap)));
        }
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}
