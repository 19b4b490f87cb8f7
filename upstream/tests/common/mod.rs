//! The tests talk to the server with the harness's raw HTTP/1.1 client
//! (`e2e::http`), which writes request bytes exactly as given, so they see
//! what goes on the wire. These wrappers panic instead of returning errors,
//! and check what every answer of this server must be: HTTP/1.1, its body
//! framed by `content-length` (`/metered`'s streamed bodies: by chunks).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use e2e::http::Response;
use tokio::sync::oneshot;

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `run` on 127.0.0.1:0 in its own runtime; the test thread is the client.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(upstream::run(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            runtime,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn trigger_shutdown(&mut self) {
        self.stop.take().unwrap().send(()).unwrap();
    }

    /// Waits for `run` to return and how long that took; fails past `limit`.
    pub fn join(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let task = self.task.take().unwrap();
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(limit, task).await })
            .unwrap_or_else(|_| panic!("run did not return within {limit:?}"))
            .expect("run task panicked");
        assert!(result.is_ok(), "run returned {result:?}");
        started.elapsed()
    }
}

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

    /// Sends `METHOD target` with `headers` and no body, and reads the
    /// answer, which (unlike [`Conn::request`]'s) may come chunked.
    pub fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        let response = self
            .0
            .request(method, target.as_bytes(), &headers)
            .expect("request");
        assert_eq!(response.version, 1, "not HTTP/1.1: {response:?}");
        if method != "HEAD" && response.status != 204 {
            let chunked = response.header("transfer-encoding") == Some("chunked");
            assert!(
                chunked != response.header("content-length").is_some(),
                "not framed by exactly one of content-length and chunked: {response:?}"
            );
        }
        response
    }

    /// Sets the read and write timeout from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.0.set_timeout(timeout).expect("set timeout");
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
