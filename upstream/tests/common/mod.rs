//! The tests talk to the server with the harness's raw HTTP/1.1 client
//! (`e2e::http`), which writes request bytes exactly as given, so they see
//! what goes on the wire. These wrappers panic instead of returning errors,
//! and check what every answer of this server must be: HTTP/1.1, its body
//! framed by `content-length`.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::Duration;

pub use e2e::http::Response;

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One client connection, kept open across requests (keep-alive).
pub struct Conn(e2e::http::Conn);

impl Conn {
    pub fn open(addr: SocketAddr) -> Self {
        Self(e2e::http::Conn::connect_timeout(&addr.to_string(), IO_TIMEOUT).expect("connect"))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.0.write_raw(bytes).expect("write request");
    }

    /// Sends `METHOD target` with an optional body and reads the answer.
    pub fn request(&mut self, method: &str, target: &str, body: &[u8]) -> Response {
        let len = body.len().to_string();
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        if !body.is_empty() || method == "POST" {
            headers.push(("content-length", len.as_bytes()));
        }
        let response = self
            .0
            .request_with_body(method, target.as_bytes(), &headers, body)
            .expect("request");
        checked(response, method == "HEAD")
    }

    /// Reads one response.
    pub fn read_response(&mut self, head: bool) -> Response {
        let response = self
            .0
            .read_response(head)
            .expect("read response")
            .expect("connection closed mid-response");
        checked(response, head)
    }

    /// True once the server has closed the connection (EOF, or a reset);
    /// panics if it sends anything more or keeps the connection open.
    pub fn is_closed_by_peer(&mut self) -> bool {
        let rest = self.read_until_closed();
        assert!(
            rest.is_empty(),
            "unexpected bytes {:?}",
            String::from_utf8_lossy(&rest)
        );
        true
    }

    /// Everything the server sends until it closes the connection.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        self.0.read_until_closed().expect("connection not closed")
    }
}

/// HTTP/1.1, and a body framed by content-length (all this server sends).
fn checked(response: Response, head: bool) -> Response {
    assert_eq!(response.version, 1, "not HTTP/1.1: {response:?}");
    if !head {
        assert!(
            response.header("content-length").is_some()
                && response.header("transfer-encoding").is_none(),
            "body not framed by content-length: {response:?}"
        );
    }
    response
}

/// The answer for every path but the health check.
pub fn assert_ok(resp: &Response) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("content-length"), Some("4"));
    assert_eq!(resp.body, b"\"ok\"");
}
