//! `/metered` over real sockets: the usage figure through each channel
//! (header, trailer, JSON body, SSE), echoed as sent, and the 400s for
//! parameters it cannot honour.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{assert_ok, Conn, Response, Server};

const TE: (&str, &str) = ("TE", "trailers");

fn get(conn: &mut Conn, target: &str) -> Response {
    conn.send("GET", target, &[TE])
}

/// The SSE body the endpoint streams, with these usage figures.
fn sse_body(tokens: &[&str]) -> String {
    let mut body = String::new();
    for delta in ["Hello", " from", " upstream"] {
        body += &format!("data: {{\"delta\":\"{delta}\"}}\n\n");
    }
    for t in tokens {
        body += &format!("data: {{\"usage\":{{\"total_tokens\":{t}}}}}\n\n");
    }
    body + "data: [DONE]\n\n"
}

fn assert_bad_request(resp: &Response, names: &str) {
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let body = resp.body_str();
    assert!(
        body.starts_with(&format!("{{\"detail\":\"{names}")) && body.ends_with("\"}"),
        "expected a detail naming {names}: {resp:?}"
    );
}

#[test]
fn header_is_the_default_channel_and_carries_the_figure() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    for target in [
        "/metered?tokens=42",
        "/metered?api_key=k&via=header&tokens=42",
    ] {
        let resp = get(&mut conn, target);
        assert_ok(&resp);
        assert_eq!(resp.header_all("x-usage-tokens"), vec!["42"], "{target}");
        assert!(resp.trailers.is_empty());
    }
}

#[test]
fn trailer_carries_the_figure_after_a_chunked_ok() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = get(&mut conn, "/metered?tokens=42&via=trailer");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.header("trailer"), Some("x-usage-tokens"));
    assert_eq!(resp.header("x-usage-tokens"), None, "{resp:?}");
    assert_eq!(resp.body, b"\"ok\"");
    assert_eq!(
        resp.trailers,
        vec![("x-usage-tokens".into(), b"42".to_vec())]
    );
    // The body ended where it should: the connection serves the next request.
    assert_ok(&conn.request("GET", "/", b""));
}

/// hyper's HTTP/1 server sends trailers only to a request with
/// `TE: trailers` (hyper 1.12, proto/h1/conn.rs `write_trailers`); without
/// it the figure is lost, but the chunked body still ends properly.
#[test]
fn trailer_needs_te_trailers_and_the_body_ends_without_it() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = conn.send("GET", "/metered?tokens=42&via=trailer", &[]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"\"ok\"");
    assert!(resp.trailers.is_empty(), "{resp:?}");
    // `TE: gzip, trailers` counts too.
    let resp = conn.send(
        "GET",
        "/metered?tokens=42&via=trailer",
        &[("te", "gzip, trailers")],
    );
    assert_eq!(resp.trailer("x-usage-tokens"), Some("42"), "{resp:?}");
    assert_ok(&conn.request("GET", "/", b""));
}

#[test]
fn json_carries_the_figure_in_the_body() {
    let server = Server::start();
    let resp = get(&mut Conn::open(server.addr), "/metered?via=json&tokens=42");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.body_str(), r#"{"usage":{"total_tokens":42}}"#);
    assert_eq!(resp.header("x-usage-tokens"), None);
}

#[test]
fn sse_streams_deltas_then_the_usage_then_done() {
    let server = Server::start();
    let resp = get(&mut Conn::open(server.addr), "/metered?via=sse&tokens=42");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.body_str(), sse_body(&["42"]));
}

#[test]
fn sse_events_leave_as_separate_chunks() {
    let server = Server::start();
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"GET /metered?via=sse&tokens=7 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut wire = Vec::new();
    stream.read_to_end(&mut wire).unwrap();
    // Chunk sizes are hex in either case (hyper writes upper case).
    let wire = String::from_utf8(wire).unwrap().to_ascii_lowercase();
    let body = sse_body(&["7"]);
    let events: Vec<&str> = body.split_inclusive("\n\n").collect();
    assert_eq!(events.len(), 5);
    for event in events {
        let chunk = format!("\r\n{:x}\r\n{event}\r\n", event.len()).to_ascii_lowercase();
        assert!(wire.contains(&chunk), "no chunk {chunk:?} in {wire:?}");
    }
}

#[test]
fn without_tokens_no_channel_reports_usage() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = get(&mut conn, "/metered");
    assert_ok(&resp);
    assert_eq!(resp.header("x-usage-tokens"), None);

    let resp = get(&mut conn, "/metered?via=trailer");
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"\"ok\""[..]));
    assert_eq!(resp.header("trailer"), None, "{resp:?}");
    assert!(resp.trailers.is_empty(), "{resp:?}");

    let resp = get(&mut conn, "/metered?via=json");
    assert_eq!((resp.status, resp.body_str().as_ref()), (200, "{}"));

    let resp = get(&mut conn, "/metered?via=sse");
    assert_eq!(resp.body_str(), sse_body(&[]));
    assert!(!resp.body_str().contains("usage"));
}

#[test]
fn malformed_figures_are_echoed_as_sent() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let longest = "9".repeat(upstream::MAX_TOKENS_LEN);
    // (sent, as it appears in JSON: a number when it is one, else a string)
    let cases = [
        ("abc", "\"abc\""),
        ("-1", "-1"),
        ("1.5", "1.5"),
        ("1e3", "1e3"),
        ("01", "\"01\""),
        ("1.", "\"1.\""),
        ("-", "\"-\""),
        ("", "\"\""),
        ("1000000001", "1000000001"),
        (longest.as_str(), longest.as_str()),
    ];
    for (sent, json) in cases {
        let resp = get(&mut conn, &format!("/metered?tokens={sent}"));
        assert_eq!(resp.header_all("x-usage-tokens"), vec![sent], "{resp:?}");
        let resp = get(&mut conn, &format!("/metered?tokens={sent}&via=trailer"));
        assert_eq!(resp.trailer("x-usage-tokens"), Some(sent), "{resp:?}");
        let resp = get(&mut conn, &format!("/metered?tokens={sent}&via=json"));
        assert_eq!(
            resp.body_str(),
            format!(r#"{{"usage":{{"total_tokens":{json}}}}}"#)
        );
        let resp = get(&mut conn, &format!("/metered?tokens={sent}&via=sse"));
        assert_eq!(resp.body_str(), sse_body(&[json]));
    }
    // A bare `tokens` is an empty one.
    let resp = get(&mut conn, "/metered?tokens");
    assert_eq!(resp.header_all("x-usage-tokens"), vec![""], "{resp:?}");
}

#[test]
fn repeated_figures_are_each_reported() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = get(&mut conn, "/metered?tokens=5&tokens=7");
    assert_eq!(resp.header_all("x-usage-tokens"), vec!["5", "7"]);
    let resp = get(&mut conn, "/metered?tokens=5&via=trailer&tokens=7");
    let trailers: Vec<&[u8]> = resp.trailers.iter().map(|(_, v)| v.as_slice()).collect();
    assert_eq!(trailers, vec![&b"5"[..], b"7"], "{resp:?}");
    let resp = get(&mut conn, "/metered?tokens=5&tokens=7&via=sse");
    assert_eq!(resp.body_str(), sse_body(&["5", "7"]));
    // One JSON body has one figure.
    let resp = get(&mut conn, "/metered?tokens=5&tokens=7&via=json");
    assert_bad_request(&resp, "tokens: ");
}

#[test]
fn bad_parameters_get_a_400_naming_the_parameter() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let too_long = "9".repeat(upstream::MAX_TOKENS_LEN + 1);
    let cases = [
        ("via=bogus".to_owned(), "via: "),
        ("via=HEADER".to_owned(), "via: "),
        ("via=".to_owned(), "via: "),
        ("via=sse&via=sse".to_owned(), "via: "),
        ("delay_ms=abc".to_owned(), "delay_ms: "),
        ("delay_ms=-1".to_owned(), "delay_ms: "),
        ("delay_ms=+5".to_owned(), "delay_ms: "),
        ("delay_ms=1.5".to_owned(), "delay_ms: "),
        ("delay_ms=".to_owned(), "delay_ms: "),
        ("delay_ms=30001".to_owned(), "delay_ms: "),
        ("delay_ms=999999999999999999999".to_owned(), "delay_ms: "),
        ("delay_ms=1&delay_ms=1".to_owned(), "delay_ms: "),
        ("status=199".to_owned(), "status: "),
        ("status=600".to_owned(), "status: "),
        ("status=20".to_owned(), "status: "),
        ("status=2000".to_owned(), "status: "),
        ("status=ok".to_owned(), "status: "),
        ("status=200&status=200".to_owned(), "status: "),
        (format!("tokens={too_long}"), "tokens: "),
        ("tokens=%31".to_owned(), "tokens: "),
        ("tokens=1+2".to_owned(), "tokens: "),
        ("tokens=a=b".to_owned(), "tokens: "),
        (
            "tokens=1&tokens=2&tokens=3&tokens=4&tokens=5".to_owned(),
            "tokens: ",
        ),
    ];
    for (query, names) in cases {
        let resp = get(&mut conn, &format!("/metered?{query}"));
        assert_bad_request(&resp, names);
        // The value itself is never echoed back.
        if let Some((_, value)) = query.split_once('=') {
            if value.len() > 3 {
                assert!(!resp.body_str().contains(value), "{resp:?}");
            }
        }
    }
    // Other parameters and an empty query are no business of this endpoint.
    assert_ok(&get(&mut conn, "/metered?api_key=1234&x=%zz&&=&via2=no"));
    assert_ok(&get(&mut conn, "/metered?"));
    // Nor is a longer path.
    assert_ok(&get(&mut conn, "/metered/x?via=bogus"));
}

#[test]
fn status_sets_the_code_and_usage_is_still_reported() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = get(&mut conn, "/metered?status=503&tokens=3");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("x-usage-tokens"), Some("3"));
    let resp = get(&mut conn, "/metered?status=429&tokens=3&via=trailer");
    assert_eq!(
        (resp.status, resp.trailer("x-usage-tokens")),
        (429, Some("3"))
    );
    for status in ["200", "599"] {
        let resp = get(&mut conn, &format!("/metered?status={status}&via=json"));
        assert_eq!(resp.status.to_string(), status);
    }
    // A 204 has no body whatever the channel; the connection carries on.
    let resp = get(&mut conn, "/metered?status=204&tokens=3&via=sse");
    assert_eq!((resp.status, resp.body.len()), (204, 0));
    assert_ok(&conn.request("GET", "/", b""));
}

#[test]
fn delay_holds_the_head_back_and_is_bounded() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let started = Instant::now();
    let resp = get(&mut conn, "/metered?delay_ms=300&tokens=1");
    // A sleep never ends early, so this lower bound holds on any machine.
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(resp.header("x-usage-tokens"), Some("1"));

    // The longest delay is accepted: no answer (not a 400) for a while.
    let mut slow = std::net::TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let request = format!(
        "GET /metered?delay_ms={} HTTP/1.1\r\nhost: a\r\n\r\n",
        upstream::MAX_DELAY_MS
    );
    std::io::Write::write_all(&mut slow, request.as_bytes()).unwrap();
    let mut byte = [0u8; 1];
    let read = slow.read(&mut byte);
    assert!(
        read.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "expected no answer yet, got {read:?}"
    );
}

#[test]
fn head_gets_the_head_and_no_body_on_every_channel() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = conn.send("HEAD", "/metered?tokens=9", &[TE]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("4"));
    assert_eq!(resp.header("x-usage-tokens"), Some("9"));
    for via in ["trailer", "json", "sse"] {
        let resp = conn.send("HEAD", &format!("/metered?tokens=9&via={via}"), &[TE]);
        assert_eq!(resp.status, 200, "{via}: {resp:?}");
        assert!(resp.body.is_empty() && resp.trailers.is_empty(), "{via}");
    }
    let resp = conn.send("HEAD", "/metered?via=bogus", &[]);
    assert_eq!(resp.status, 400);
    // Had any body bytes followed, this would misread them.
    assert_ok(&conn.request("GET", "/", b""));
}

#[test]
fn the_request_body_is_drained_first() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = conn.request("POST", "/metered?via=json&tokens=2", br#"{"prompt":"hi"}"#);
    assert_eq!(resp.body_str(), r#"{"usage":{"total_tokens":2}}"#);
    let resp = conn.request("PUT", "/metered?via=bogus", b"0123456789");
    assert_bad_request(&resp, "via: ");
    // Both bodies were read, so the connection is still in step.
    let resp = get(&mut conn, "/metered?via=json&tokens=3");
    assert_eq!(resp.body_str(), r#"{"usage":{"total_tokens":3}}"#);
}
