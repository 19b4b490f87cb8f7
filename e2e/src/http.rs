//! A minimal raw HTTP/1.1 client over `std::net::TcpStream`.
//!
//! Raw on purpose: hostile tests send invalid percent-escapes, non-UTF-8 header
//! values, huge headers and odd methods, which a normal client refuses to send. The
//! request target and header values are bytes, written exactly as given. Strict on
//! what comes back (CRLF line ends), so the upstream's own tests use it too.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Read and write timeout of every connection unless set otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response head we accept before calling the answer broken; also the
/// bound on a chunk-size line and on a chunked body's trailer section.
const MAX_HEAD: usize = 1 << 20;

/// Header or trailer fields, in order: names as sent, values as raw bytes.
pub type Fields = Vec<(String, Vec<u8>)>;

/// A parsed response. Its `Debug` shows header values and body as (lossy) text, so an
/// assertion message is readable.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    /// The minor version of the status line: 1 for `HTTP/1.1`.
    pub version: u8,
    pub status: u16,
    pub reason: String,
    pub headers: Fields,
    pub body: Vec<u8>,
    /// The trailer fields after a chunked body.
    pub trailers: Fields,
}

impl Response {
    /// The first value of header `name` (case-insensitive), if it is UTF-8.
    /// Limit `name`'s `r` (what may still be sent) in the `RateLimit`
    /// header; panics, naming what is missing, when it is not there.
    pub fn ratelimit_remaining(&self, name: &str) -> u64 {
        let header = self
            .header("ratelimit")
            .unwrap_or_else(|| panic!("no RateLimit header: {self:?}"));
        header
            .split(", ")
            .find(|m| m.starts_with(&format!("\"{name}\";")))
            .and_then(|member| member.split(';').find_map(|kv| kv.strip_prefix("r=")))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no {name} with an r in {header}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first value of header `name` (case-insensitive), as bytes.
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of trailer field `name` (case-insensitive), if it is UTF-8.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Every value of header `name` (case-insensitive), in order, lossy UTF-8.
    pub fn header_all(&self, name: &str) -> Vec<Cow<'_, str>> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v))
            .collect()
    }

    /// The body as (lossy) UTF-8.
    pub fn body_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// Whether the server said it will close the connection after this response.
    pub fn closes_connection(&self) -> bool {
        self.header_all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "HTTP {} {}", self.status, self.reason)?;
        for (n, v) in &self.headers {
            writeln!(f, "{n}: {}", String::from_utf8_lossy(v).escape_debug())?;
        }
        write!(f, "\n{}", self.body_str())?;
        for (n, v) in &self.trailers {
            write!(f, "\n{n}: {}", String::from_utf8_lossy(v).escape_debug())?;
        }
        Ok(())
    }
}

/// One keep-alive client connection.
pub struct Conn {
    stream: TcpStream,
    host: String,
    /// Bytes read past the end of the previous response.
    buf: Vec<u8>,
    closed: bool,
}

impl Conn {
    /// Connects to `addr` ("127.0.0.1:port") with [`DEFAULT_TIMEOUT`]s.
    pub fn connect(addr: &str) -> io::Result<Conn> {
        Self::connect_timeout(addr, DEFAULT_TIMEOUT)
    }

    /// Connects with `timeout` for the connect and for every read and write.
    pub fn connect_timeout(addr: &str, timeout: Duration) -> io::Result<Conn> {
        let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("bad address {addr}"))
        })?;
        let stream = TcpStream::connect_timeout(&sa, timeout)?;
        stream.set_nodelay(true)?;
        let conn = Conn {
            stream,
            host: addr.to_owned(),
            buf: Vec::new(),
            closed: false,
        };
        conn.set_timeout(timeout)?;
        Ok(conn)
    }

    /// Read and write timeout from now on.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// The underlying socket, for tests that need to misbehave (half-close, reset).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// True once a response said `Connection: close` or had to be read until EOF.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends `METHOD target HTTP/1.1` with a `Host` header (unless `headers` has one)
    /// and `headers` as given, and reads the response.
    pub fn request(
        &mut self,
        method: &str,
        target: &[u8],
        headers: &[(&str, &[u8])],
    ) -> io::Result<Response> {
        self.request_with_body(method, target, headers, &[])
    }

    /// [`Conn::request`] with a body; adds `Content-Length` when the body is not
    /// empty and `headers` has neither it nor `Transfer-Encoding`.
    pub fn request_with_body(
        &mut self,
        method: &str,
        target: &[u8],
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> io::Result<Response> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the server closed this connection after the previous response",
            ));
        }
        let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let mut req = Vec::with_capacity(256 + body.len());
        req.extend_from_slice(method.as_bytes());
        req.push(b' ');
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\n");
        if !has("host") {
            req.extend_from_slice(format!("Host: {}\r\n", self.host).as_bytes());
        }
        for (name, value) in headers {
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(value);
            req.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() && !has("content-length") && !has("transfer-encoding") {
            req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        self.stream.write_all(&req)?;
        self.read_response(method.eq_ignore_ascii_case("HEAD"))?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection without answering",
                )
            })
    }

    /// `GET target` on this connection, no extra headers.
    pub fn get(&mut self, target: &str) -> io::Result<Response> {
        self.request("GET", target.as_bytes(), &[])
    }

    /// Writes `bytes` as they are (for pipelining or a hand-made request).
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response (skipping 1xx interim ones). `Ok(None)` if the server closed
    /// the connection (EOF or reset) before sending any byte of it.
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Option<Response>> {
        loop {
            let Some((resp, head_len)) = self.read_head()? else {
                return Ok(None);
            };
            self.buf.drain(..head_len);
            // 101 switches protocols: hand back what we have, the rest is not HTTP.
            if (100..200).contains(&resp.status) && resp.status != 101 {
                continue;
            }
            let mut resp = resp;
            let no_body = head_request
                || (100..200).contains(&resp.status)
                || resp.status == 204
                || resp.status == 304;
            if no_body {
                // nothing to read
            } else if resp
                .header_all("transfer-encoding")
                .iter()
                .any(|v| v.to_ascii_lowercase().contains("chunked"))
            {
                (resp.body, resp.trailers) = self.read_chunked()?;
            } else if let Some(len) = resp.header("content-length") {
                let len: usize = len.trim().parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?;
                self.fill_to(len)?;
                resp.body = self.buf.drain(..len).collect();
            } else {
                self.read_to_eof()?;
                resp.body = std::mem::take(&mut self.buf);
                self.closed = true;
            }
            if resp.closes_connection() {
                self.closed = true;
            }
            return Ok(Some(resp));
        }
    }

    /// Parses a response head out of `buf`, reading more as needed.
    fn read_head(&mut self) -> io::Result<Option<(Response, usize)>> {
        loop {
            if !self.buf.is_empty() {
                if let Some(parsed) = parse_head(&self.buf)? {
                    return Ok(Some(parsed));
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "response head larger than 1 MiB",
                    ));
                }
            }
            let had_bytes = !self.buf.is_empty();
            match self.read_more() {
                // Closed (EOF or reset) before the first byte: no answer at all.
                Ok(0) | Err(_) if !had_bytes && self.closed => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a response head",
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what is available into `buf`. 0 means EOF. EOF and a reset mark the
    /// connection closed.
    fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.closed |= n == 0;
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed |= matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    );
                    return Err(e);
                }
            }
        }
    }

    fn fill_to(&mut self, len: usize) -> io::Result<()> {
        while self.buf.len() < len {
            if self.read_more()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {len} body bytes",
                        self.buf.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Everything the server sends until it closes the connection (EOF or a reset),
    /// bytes already read past the last response included.
    pub fn read_until_closed(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.read_more() {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) if self.closed => break,
                Err(e) => return Err(e),
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    fn read_to_eof(&mut self) -> io::Result<()> {
        while self.read_more()? > 0 {}
        Ok(())
    }

    /// One CRLF-ended line of a chunked body, at most `limit` bytes.
    fn read_line(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                if i > limit {
                    break;
                }
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return Ok(line);
            }
            if self.buf.len() > limit + 1 {
                break;
            }
            if self.read_more()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a line of a chunked body is longer than {limit} bytes"),
        ))
    }

    /// A chunked body and its trailer fields (a trailer section of at most
    /// [`MAX_HEAD`] bytes).
    fn read_chunked(&mut self) -> io::Result<(Vec<u8>, Fields)> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(MAX_HEAD)?;
            let size_hex = line.split(|&b| b == b';').next().unwrap_or(&[]);
            let size_hex = std::str::from_utf8(size_hex).unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {:?}", String::from_utf8_lossy(&line)),
                )
            })?;
            if size == 0 {
                return Ok((body, self.read_trailers()?));
            }
            let with_crlf = size.checked_add(2).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "chunk size overflows")
            })?;
            self.fill_to(with_crlf)?;
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// The trailer section after the last chunk, up to the empty line.
    fn read_trailers(&mut self) -> io::Result<Fields> {
        let mut trailers = Vec::new();
        let mut left = MAX_HEAD;
        loop {
            let line = self.read_line(left)?;
            if line.is_empty() {
                return Ok(trailers);
            }
            left = left.saturating_sub(line.len() + 2);
            let field = line
                .iter()
                .position(|&b| b == b':')
                .and_then(|colon| Some((line.get(..colon)?, line.get(colon + 1..)?)))
                .and_then(|(name, value)| Some((std::str::from_utf8(name).ok()?, value)))
                .filter(|(name, _)| {
                    !name.is_empty() && !name.contains(|c: char| c.is_whitespace())
                });
            let Some((name, value)) = field else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad trailer field {:?}", String::from_utf8_lossy(&line)),
                ));
            };
            let value = value.trim_ascii();
            trailers.push((name.to_owned(), value.to_vec()));
        }
    }
}

fn parse_head(buf: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let mut n_headers = 64;
    loop {
        let mut headers = vec![httparse::EMPTY_HEADER; n_headers];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                // httparse takes a bare LF for a line end; HTTP/1.1 says CRLF.
                let head = buf.get(..len).unwrap_or(buf);
                if head
                    .iter()
                    .enumerate()
                    .any(|(i, &b)| b == b'\n' && (i == 0 || head.get(i - 1) != Some(&b'\r')))
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a line of the response head ends in a bare LF: {:?}",
                            String::from_utf8_lossy(head)
                        ),
                    ));
                }
                let resp = Response {
                    version: parsed.version.unwrap_or(0),
                    status: parsed.code.unwrap_or(0),
                    reason: parsed.reason.unwrap_or("").to_owned(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect(),
                    body: Vec::new(),
                    trailers: Vec::new(),
                };
                return Ok(Some((resp, len)));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) if n_headers < 4096 => n_headers *= 4,
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "unparsable response head ({e}): {:?}",
                        String::from_utf8_lossy(&buf[..buf.len().min(200)])
                    ),
                ))
            }
        }
    }
}

/// One connection: writes `bytes` exactly as given, then reads one response.
/// `Ok(None)` if the server closed (or reset) the connection without answering.
/// A write that fails because the server already answered and closed (e.g. a 431
/// to a huge header) still returns that answer.
pub fn send_raw(addr: &str, bytes: &[u8]) -> io::Result<Option<Response>> {
    send_raw_timeout(addr, bytes, DEFAULT_TIMEOUT)
}

/// [`send_raw`] with a read/write timeout. Note: we never half-close our side,
/// because Envoy drops a stream whose client sent FIN before the response.
pub fn send_raw_timeout(
    addr: &str,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<Option<Response>> {
    let mut conn = Conn::connect_timeout(addr, timeout)?;
    let head_request = bytes
        .get(..5)
        .is_some_and(|m| m.eq_ignore_ascii_case(b"HEAD "));
    if let Err(e) = conn.write_raw(bytes) {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(e);
        }
    }
    let r = conn.read_response(head_request);
    let _ = conn.stream.shutdown(Shutdown::Both);
    r
}

/// `GET target` on a fresh connection with `Connection: close`.
pub fn get(addr: &str, target: &str) -> io::Result<Response> {
    get_with(addr, target, &[])
}

/// `GET target` on a fresh connection with `Connection: close` and `headers`.
/// `method target` on a fresh connection that closes after it, with
/// `headers`; panics (a test helper) if there is no answer.
pub fn send_once(addr: &str, method: &str, target: &str, headers: &[(&str, &[u8])]) -> Response {
    let mut all = vec![("Connection", b"close".as_slice())];
    all.extend_from_slice(headers);
    Conn::connect(addr)
        .and_then(|mut conn| conn.request(method, target.as_bytes(), &all))
        .unwrap_or_else(|e| panic!("{method} {target} on {addr}: {e}"))
}

pub fn get_with(addr: &str, target: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    let mut conn = Conn::connect(addr)?;
    let mut hs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("connection"))
    {
        hs.push(("Connection", b"close"));
    }
    conn.request("GET", target.as_bytes(), &hs)
}
