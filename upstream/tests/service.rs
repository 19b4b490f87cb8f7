//! `upstream::run` over real sockets: what it answers, keep-alive, and
//! graceful shutdown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{assert_ok, Conn, Server};

#[test]
fn root_answers_ok_json_string() {
    let server = Server::start();
    let resp = Conn::open(server.addr).request("GET", "/", b"");
    assert_ok(&resp);
}

#[test]
fn query_string_and_other_paths_answer_ok() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    assert_ok(&conn.request("GET", "/?api_key=1234", b""));
    assert_ok(&conn.request("GET", "/api/v1/things/42?x=%20y", b""));
    // Only the exact health path is special.
    assert_ok(&conn.request("GET", "/healthz/extra", b""));
}

#[test]
fn healthz_answers_healthy() {
    let server = Server::start();
    let resp = Conn::open(server.addr).request("GET", "/healthz", b"");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("content-length"), Some("20"));
    assert_eq!(resp.body_str(), r#"{"status":"healthy"}"#);
}

#[test]
fn post_with_body_answers_ok_and_keeps_connection() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    assert_ok(&conn.request("POST", "/?api_key=1234", br#"{"hello":"world"}"#));
    // The body was consumed, so the same connection serves the next request.
    assert_ok(&conn.request("POST", "/", b""));
}

#[test]
fn head_has_headers_but_no_body() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let resp = conn.request("HEAD", "/", b"");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("content-length"), Some("4"));
    // Had the server sent body bytes after the HEAD response, they would now
    // be misread as the start of this response.
    assert_ok(&conn.request("GET", "/", b""));
}

#[test]
fn any_method_answers_ok() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    for method in ["OPTIONS", "DELETE", "PUT", "PATCH", "PROPFIND", "BREW"] {
        let resp = conn.request(method, "/", b"");
        assert_ok(&resp);
    }
}

#[test]
fn two_requests_on_one_keep_alive_connection() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    let first = conn.request("GET", "/", b"");
    assert_ok(&first);
    assert_ne!(first.header("connection"), Some("close"));
    let second = conn.request("GET", "/healthz", b"");
    assert_eq!(second.body_str(), r#"{"status":"healthy"}"#);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start();
    let mut conn = Conn::open(server.addr);
    conn.send_raw(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n");
    assert_eq!(
        conn.read_response(false).body_str(),
        r#"{"status":"healthy"}"#
    );
    assert_ok(&conn.read_response(false));
}

#[test]
fn malformed_request_closes_only_that_connection() {
    let server = Server::start();
    let mut bad = Conn::open(server.addr);
    bad.send_raw(b"\x00\x01 NOT HTTP AT ALL \xff\r\n\r\n");
    // hyper may answer 400 before closing; either way the connection ends.
    let answer = bad.read_until_closed();
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
        "unexpected answer {:?}",
        String::from_utf8_lossy(&answer)
    );
    // The server itself is unharmed.
    assert_ok(&Conn::open(server.addr).request("GET", "/", b""));
}

#[test]
fn shutdown_returns_promptly_with_idle_keep_alive_connection() {
    let mut server = Server::start();
    let mut idle = Conn::open(server.addr);
    assert_ok(&idle.request("GET", "/", b""));

    server.trigger_shutdown();
    let took = server.join(Duration::from_secs(4));
    // The idle connection is closed at once, not waited out to the grace limit.
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert!(idle.is_closed_by_peer());
    // And nothing accepts new connections any more.
    assert!(std::net::TcpStream::connect(server.addr).is_err());
}

#[test]
fn shutdown_lets_an_in_flight_request_finish() {
    let mut server = Server::start();
    let mut conn = Conn::open(server.addr);
    // Half a body: the handler is now waiting for the rest.
    conn.send_raw(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n01234");
    std::thread::sleep(Duration::from_millis(200));

    server.trigger_shutdown();
    std::thread::sleep(Duration::from_millis(200));
    conn.send_raw(b"56789");

    let resp = conn.read_response(false);
    assert_ok(&resp);
    // Shutting down, so the server does not offer to keep the connection.
    assert_eq!(resp.header("connection"), Some("close"));
    server.join(Duration::from_secs(4));
    assert!(conn.is_closed_by_peer());
}
