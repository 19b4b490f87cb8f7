//! A deliberately small HTTP/1.1 client over std's `TcpStream`: the tests
//! write request bytes by hand so they see exactly what goes on the wire.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Names lower-cased, in wire order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("body is UTF-8")
    }
}

/// One client connection, kept open across requests (keep-alive).
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.reader
            .get_mut()
            .write_all(bytes)
            .expect("write request");
    }

    /// Sends `METHOD target` with an optional body and reads the answer.
    pub fn request(&mut self, method: &str, target: &str, body: &[u8]) -> Response {
        let mut req = format!("{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes);
        self.read_response(method == "HEAD")
    }

    /// Reads one response; the body is framed by content-length only, since
    /// that is all the server under test sends.
    pub fn read_response(&mut self, head: bool) -> Response {
        let status_line = self.line();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "status line {status_line:?}"
        );
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));

        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if !head {
            let len: usize = response
                .header("content-length")
                .expect("content-length header")
                .parse()
                .expect("numeric content-length");
            response.body = vec![0; len];
            self.reader
                .read_exact(&mut response.body)
                .expect("read body");
        }
        response
    }

    /// True once the server has closed the connection (EOF, or a reset).
    pub fn is_closed_by_peer(&mut self) -> bool {
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => panic!("unexpected bytes {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("connection neither closed nor open: {e}"),
        }
    }

    /// Everything the server sends until it closes the connection.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        match self.reader.read_to_end(&mut all) {
            Ok(_) => all,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => all,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read line");
        assert!(n > 0, "connection closed mid-response");
        assert!(line.ends_with("\r\n"), "line not CRLF-terminated: {line:?}");
        line.truncate(line.len() - 2);
        line
    }
}

/// The answer for every path but the health check.
pub fn assert_ok(resp: &Response) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("content-length"), Some("4"));
    assert_eq!(resp.body, b"\"ok\"");
}
