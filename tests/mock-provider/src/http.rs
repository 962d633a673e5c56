//! Minimal HTTP/1.1 server-side plumbing: request parsing (content-length and
//! chunked bodies, keep-alive) and response writing (fixed-length and chunked).
//!
//! Parsing works on any `Read`, so the unit tests feed byte slices (also one
//! byte at a time) instead of sockets.

use std::fmt;
use std::io::{self, Read, Write};

/// Largest accepted request head (request line + headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest accepted number of header lines.
const MAX_HEADERS: usize = 256;
/// Largest accepted request body (after de-chunking).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Largest accepted chunk-size line or trailer section.
const MAX_CHUNK_LINE: usize = 8 * 1024;

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The socket failed.
    Io(io::Error),
    /// The peer closed the connection in the middle of a request.
    Closed,
    /// The bytes are not a valid HTTP/1.x request: answer 400 and close.
    Malformed(String),
    /// The request is too large: answer 413 (body) or 431 (head) and close.
    TooLarge { status: u16, what: &'static str },
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(e) => write!(f, "i/o error: {e}"),
            HttpError::Closed => f.write_str("connection closed mid-request"),
            HttpError::Malformed(m) => write!(f, "malformed request: {m}"),
            HttpError::TooLarge { what, .. } => write!(f, "{what} too large"),
        }
    }
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError::Malformed(msg.into())
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// Request line and headers. Header names are lowercased; order and
/// repetitions are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// First value of a header (name must be lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Comma-separated tokens of a header, lowercased, over all repetitions.
    fn tokens(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target.as_str(), |(p, _)| p)
    }

    /// Whether the client wants the connection kept open after this request.
    pub fn keep_alive(&self) -> bool {
        let tokens = self.tokens("connection");
        if tokens.iter().any(|t| t == "close") {
            false
        } else if self.minor_version == 0 {
            tokens.iter().any(|t| t == "keep-alive")
        } else {
            true
        }
    }

    /// Whether the client waits for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.minor_version >= 1 && self.header("expect").is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
    }

    /// Body framing per RFC 9112 section 6.3 (transfer-encoding wins over
    /// content-length).
    pub fn framing(&self) -> Result<Framing, HttpError> {
        let codings = self.tokens("transfer-encoding");
        if !codings.is_empty() {
            return if codings.last().is_some_and(|c| c == "chunked") {
                Ok(Framing::Chunked)
            } else {
                Err(bad("unsupported transfer-encoding"))
            };
        }
        let mut length: Option<usize> = None;
        for value in self.headers.iter().filter(|(n, _)| n == "content-length").flat_map(|(_, v)| v.split(',')) {
            let value = value.trim();
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("invalid content-length"));
            }
            let parsed: usize = value.parse().map_err(|_| bad("content-length out of range"))?;
            match length {
                Some(previous) if previous != parsed => return Err(bad("conflicting content-length values")),
                _ => length = Some(parsed),
            }
        }
        Ok(match length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        })
    }
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body (names lowercased), in order.
    pub trailers: Vec<(String, String)>,
}

/// A de-chunked body and its trailer fields.
pub type Body = (Vec<u8>, Vec<(String, String)>);

/// Buffered reader over one connection; yields requests one after another
/// (keep-alive and pipelining both work because leftover bytes stay buffered).
pub struct Conn<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> Conn<R> {
    pub fn new(inner: R) -> Self {
        Conn { inner, buf: Vec::new() }
    }

    /// Reads more bytes into the buffer; `Ok(false)` on end of stream.
    fn fill(&mut self) -> Result<bool, HttpError> {
        let mut tmp = [0u8; 16 * 1024];
        loop {
            match self.inner.read(&mut tmp) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(tmp.get(..n).unwrap_or(&[]));
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HttpError::Io(e)),
            }
        }
    }

    /// Reads one line (LF or CRLF terminated) and returns it without the
    /// line ending. `limit` bounds the line length.
    fn read_line(&mut self, limit: usize, what: &'static str) -> Result<Vec<u8>, HttpError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf.iter().skip(scanned).position(|&b| b == b'\n').map(|p| p + scanned) {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            scanned = self.buf.len();
            if scanned > limit {
                return Err(too_large_line(what));
            }
            if !self.fill()? {
                return Err(HttpError::Closed);
            }
        }
    }

    /// Takes exactly `n` bytes.
    fn read_exact_bytes(&mut self, n: usize) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(HttpError::Closed);
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads the next request head. `Ok(None)` when the peer closed the
    /// connection cleanly between requests.
    pub fn read_head(&mut self) -> Result<Option<Head>, HttpError> {
        // Tolerate empty lines before the request line (RFC 9112 2.2).
        let request_line = loop {
            if self.buf.is_empty() && !self.fill()? {
                return Ok(None);
            }
            let line = self.read_line(MAX_HEAD_BYTES, "request head")?;
            if !line.is_empty() {
                break line;
            }
        };
        let mut head_bytes = request_line.len();
        let (method, target, minor_version) = parse_request_line(&request_line)?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line(MAX_HEAD_BYTES, "request head")?;
            if line.is_empty() {
                break;
            }
            head_bytes += line.len() + 2;
            if head_bytes > MAX_HEAD_BYTES {
                return Err(too_large_line("request head"));
            }
            if headers.len() >= MAX_HEADERS {
                return Err(HttpError::TooLarge { status: 431, what: "header list" });
            }
            headers.push(parse_header_line(&line)?);
        }
        Ok(Some(Head { method, target, minor_version, headers }))
    }

    /// Reads the body that belongs to `head` (de-chunked), with the trailer
    /// fields of a chunked body.
    pub fn read_body(&mut self, head: &Head) -> Result<Body, HttpError> {
        match head.framing()? {
            Framing::None => Ok((Vec::new(), Vec::new())),
            Framing::Length(n) if n > MAX_BODY_BYTES => Err(too_large_body()),
            Framing::Length(n) => Ok((self.read_exact_bytes(n)?, Vec::new())),
            Framing::Chunked => self.read_chunked(),
        }
    }

    fn read_chunked(&mut self) -> Result<Body, HttpError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(MAX_CHUNK_LINE, "chunk-size line")?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                break;
            }
            if body.len().saturating_add(size) > MAX_BODY_BYTES {
                return Err(too_large_body());
            }
            body.extend(self.read_exact_bytes(size)?);
            let end = self.read_line(MAX_CHUNK_LINE, "chunk terminator")?;
            if !end.is_empty() {
                return Err(bad("chunk data not followed by CRLF"));
            }
        }
        // Trailer section: header lines until an empty line.
        let mut trailers = Vec::new();
        let mut trailer_bytes = 0usize;
        loop {
            let line = self.read_line(MAX_CHUNK_LINE, "trailer section")?;
            if line.is_empty() {
                return Ok((body, trailers));
            }
            trailer_bytes += line.len();
            if trailer_bytes > MAX_CHUNK_LINE {
                return Err(too_large_line("trailer section"));
            }
            trailers.push(parse_header_line(&line)?);
        }
    }

    /// Reads a whole request (head and body); `Ok(None)` on clean EOF.
    /// The server itself calls `read_head`/`read_body` separately so it can
    /// answer `Expect: 100-continue` in between.
    #[cfg(test)]
    pub fn read_request(&mut self) -> Result<Option<Request>, HttpError> {
        let Some(head) = self.read_head()? else {
            return Ok(None);
        };
        let (body, trailers) = self.read_body(&head)?;
        Ok(Some(Request { head, body, trailers }))
    }
}

fn too_large_line(what: &'static str) -> HttpError {
    HttpError::TooLarge { status: 431, what }
}

fn too_large_body() -> HttpError {
    HttpError::TooLarge { status: 413, what: "request body" }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, u8), HttpError> {
    let text = std::str::from_utf8(line).map_err(|_| bad("request line is not UTF-8"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("request line must be `METHOD TARGET VERSION`"));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(bad("invalid method"));
    }
    if target.is_empty() || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(bad("invalid request target"));
    }
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(bad("unsupported HTTP version")),
    };
    Ok((method.to_string(), target.to_string(), minor_version))
}

fn parse_header_line(line: &[u8]) -> Result<(String, String), HttpError> {
    let colon = line.iter().position(|&b| b == b':').ok_or_else(|| bad("header line without colon"))?;
    let (name, rest) = line.split_at(colon);
    if name.is_empty() || !name.iter().copied().all(is_token_byte) {
        return Err(bad("invalid header name"));
    }
    let value = rest.get(1..).unwrap_or(&[]);
    if value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
        return Err(bad("invalid header value"));
    }
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let value = String::from_utf8_lossy(value).trim_matches(|c| c == ' ' || c == '\t').to_string();
    Ok((name, value))
}

fn parse_chunk_size(line: &[u8]) -> Result<usize, HttpError> {
    let size_part = line.split(|&b| b == b';').next().unwrap_or(&[]).trim_ascii();
    if size_part.is_empty() || size_part.len() > 15 || !size_part.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad("invalid chunk size"));
    }
    let text = std::str::from_utf8(size_part).map_err(|_| bad("invalid chunk size"))?;
    usize::from_str_radix(text, 16).map_err(|_| bad("invalid chunk size"))
}

/// Standard reason phrase for the statuses this server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Serialises a status line and headers, including the blank line.
pub fn head_bytes(status: u16, headers: &[(String, String)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Writes `HTTP/1.1 100 Continue`.
pub fn write_continue<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(&head_bytes(100, &[]))?;
    w.flush()
}

/// Writes a complete response with `content-length` in a single write.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut all = headers.to_vec();
    all.push(("content-length".into(), body.len().to_string()));
    if close {
        all.push(("connection".into(), "close".into()));
    }
    let mut out = head_bytes(status, &all);
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// Writes the head of a streamed response. With `chunked` the body must be
/// sent with [`write_chunk`] and ended with [`write_last_chunk`]; without it
/// (HTTP/1.0 clients) the body is raw and ends when the connection closes.
pub fn write_stream_head<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    chunked: bool,
    close: bool,
) -> io::Result<()> {
    let mut all = headers.to_vec();
    if chunked {
        all.push(("transfer-encoding".into(), "chunked".into()));
    }
    if close || !chunked {
        all.push(("connection".into(), "close".into()));
    }
    w.write_all(&head_bytes(status, &all))?;
    w.flush()
}

/// Writes one chunk (nothing for empty data: a zero-size chunk would end the
/// body) and flushes.
pub fn write_chunk<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    w.write_all(&out)?;
    w.flush()
}

/// Ends a chunked body (no trailers).
pub fn write_last_chunk<W: Write>(w: &mut W) -> io::Result<()> {
    write_last_chunk_with_trailers(w, &[])
}

/// Ends a chunked body with a trailer section.
pub fn write_last_chunk_with_trailers<W: Write>(w: &mut W, trailers: &[(String, String)]) -> io::Result<()> {
    let mut out = String::from("0\r\n");
    for (name, value) in trailers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// Writes a complete response as one chunk of a chunked body followed by a
/// trailer section. The caller declares the trailers (`trailer:` header).
pub fn write_chunked_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    trailers: &[(String, String)],
    close: bool,
) -> io::Result<()> {
    write_stream_head(w, status, headers, true, close)?;
    write_chunk(w, body)?;
    write_last_chunk_with_trailers(w, trailers)
}

#[cfg(test)]
mod tests {

    use super::*;

    /// A reader that hands out at most `step` bytes per `read` call.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            let (now, rest) = self.data.split_at(n);
            out[..n].copy_from_slice(now);
            self.data = rest;
            Ok(n)
        }
    }

    fn parse_all(data: &[u8], step: usize) -> Result<Vec<Request>, HttpError> {
        let mut conn = Conn::new(Trickle { data, step });
        let mut out = Vec::new();
        while let Some(req) = conn.read_request()? {
            out.push(req);
        }
        Ok(out)
    }

    fn parse_one(data: &[u8]) -> Result<Request, HttpError> {
        let mut reqs = parse_all(data, usize::MAX)?;
        assert_eq!(reqs.len(), 1);
        Ok(reqs.remove(0))
    }

    #[test]
    fn content_length_body() {
        let req = parse_one(
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        )
        .unwrap();
        assert_eq!(req.head.method, "POST");
        assert_eq!(req.head.target, "/v1/chat/completions?x=1");
        assert_eq!(req.head.path(), "/v1/chat/completions");
        assert_eq!(req.head.header("content-type"), Some("application/json"));
        assert_eq!(req.body, b"{\"a\":1}");
        assert!(req.head.keep_alive());
    }

    #[test]
    fn header_names_are_lowercased_and_repeats_kept() {
        let req = parse_one(b"GET / HTTP/1.1\r\nX-Thing:  a \r\nx-thing:b\r\nX-EMPTY:\r\n\r\n").unwrap();
        assert_eq!(req.head.header("x-thing"), Some("a"));
        assert_eq!(
            req.head.headers,
            vec![
                ("x-thing".to_string(), "a".to_string()),
                ("x-thing".to_string(), "b".to_string()),
                ("x-empty".to_string(), String::new()),
            ]
        );
        assert_eq!(req.head.header("x-empty"), Some(""));
        assert!(req.body.is_empty());
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let raw = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
            4;name=value\r\nWiki\r\n\
            5 ; ext\r\npedia\r\n\
            E\r\n in\r\n\r\nchunks.\r\n\
            0;last\r\nX-Trailer: yes\r\nOther: 1\r\n\r\n";
        let req = parse_one(raw).unwrap();
        assert_eq!(req.body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(
            req.trailers,
            vec![("x-trailer".to_string(), "yes".to_string()), ("other".to_string(), "1".to_string())]
        );
    }

    #[test]
    fn chunked_wins_over_content_length() {
        let req = parse_one(
            b"POST /x HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(req.body, b"abc");
    }

    #[test]
    fn split_reads_byte_by_byte_and_pipelining() {
        let raw = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n\
            GET /c HTTP/1.1\r\nConnection: close\r\n\r\n";
        for step in [1, 2, 3, 7, 64, usize::MAX] {
            let reqs = parse_all(raw, step).unwrap();
            assert_eq!(reqs.len(), 3, "step {step}");
            assert_eq!(reqs[0].body, b"abc");
            assert_eq!(reqs[1].head.target, "/b");
            assert_eq!(reqs[1].body, b"def");
            assert_eq!(reqs[2].head.method, "GET");
            assert!(!reqs[2].head.keep_alive());
        }
    }

    #[test]
    fn lf_only_line_endings_and_leading_blank_lines() {
        let req = parse_one(b"\r\n\nGET /health HTTP/1.0\nConnection: keep-alive\n\n").unwrap();
        assert_eq!(req.head.path(), "/health");
        assert_eq!(req.head.minor_version, 0);
        assert!(req.head.keep_alive());
        let req = parse_one(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!req.head.keep_alive());
    }

    #[test]
    fn expect_continue() {
        let req = parse_one(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").unwrap();
        assert!(req.head.expects_continue());
    }

    #[test]
    fn clean_eof_yields_nothing() {
        assert!(parse_all(b"", 1).unwrap().is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        let cases: &[&[u8]] = &[
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"hello\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
        ];
        for case in cases {
            match parse_all(case, 5) {
                Err(HttpError::Malformed(_)) => {}
                other => panic!("{:?}: expected Malformed, got {other:?}", String::from_utf8_lossy(case)),
            }
        }
    }

    #[test]
    fn truncated_request_is_closed_error() {
        for case in [
            &b"GET / HTTP/1.1\r\nHost: a"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(matches!(parse_all(case, 3), Err(HttpError::Closed)));
        }
    }

    #[test]
    fn oversized_head_and_body() {
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        huge.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse_all(&huge, usize::MAX), Err(HttpError::TooLarge { status: 431, .. })));
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert!(matches!(parse_all(big.as_bytes(), usize::MAX), Err(HttpError::TooLarge { status: 413, .. })));
    }

    #[test]
    fn response_writing() {
        let mut out = Vec::new();
        let headers = vec![("x-mock-provider".to_string(), "m".to_string())];
        write_response(&mut out, 200, &headers, b"hi", true).unwrap();
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nx-mock-provider: m\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi");
        let mut out = Vec::new();
        write_stream_head(&mut out, 200, &headers, true, false).unwrap();
        write_chunk(&mut out, b"data: 1\n\n").unwrap();
        write_chunk(&mut out, b"").unwrap();
        write_last_chunk(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-mock-provider: m\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        );
        let mut out = Vec::new();
        let trailers = vec![("x-mock-trailer".to_string(), "done".to_string())];
        write_chunked_response(&mut out, 200, &headers, b"{}", &trailers, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-mock-provider: m\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-mock-trailer: done\r\n\r\n"
        );
    }
}
