//! A small outbound HTTP/1.1 client on the bridge's runtime: JSON POSTs to the auth service
//! and the custom-type backends (`bridge::proxy`), and the POST/PUT/DELETE requests of the
//! service registry (`bridge::eureka`); reusable for the tracing exporters to come.
//!
//! Hand-written over tokio's `TcpStream` and `httparse` (both already in the tree) rather than
//! hyper/reqwest, which are not in Cargo.lock: a POST with a JSON body and a bounded response
//! needs about 300 lines, against some 40 new crates. Plain `http://` only: no TLS crate is in
//! the tree (rustls would bring ring or aws-lc); put the backend on a private network or behind
//! a TLS-terminating sidecar. [`Url::parse`] refuses `https://` and says so.
//!
//! Owns: URL parsing, request encoding and response decoding (sans-IO: [`encode_request`],
//! [`parse_response`]), and a per-host pool of idle keep-alive connections. Every option is
//! explicit in [`Options`]; the whole exchange (pool pick or connect, write, read) runs under
//! the caller's one deadline. Single-threaded (`RefCell`): it lives on the bridge's `LocalSet`.
//! It never logs (bodies carry tokens).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Longest URL accepted in config.
pub const URL_BYTES_MAX: usize = 2048;
/// Headers read from one response at most (more: [`HttpError::Malformed`]).
pub const RESPONSE_HEADERS_MAX: usize = 64;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// An `http://host[:port][/path][?query]` endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// `/path?query` (at least `/`).
    pub path: String,
}

impl Url {
    /// Parse an endpoint. Errors say what to write instead.
    pub fn parse(s: &str) -> Result<Url, String> {
        if s.len() > URL_BYTES_MAX {
            return Err(format!("a URL is at most {URL_BYTES_MAX} bytes"));
        }
        if s.starts_with("https://") {
            return Err(
                "https is not supported by this build (no TLS client); use http:// on a private network or a TLS-terminating sidecar"
                    .into(),
            );
        }
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(format!(
                "{s:?} is not an http:// URL; expected http://host[:port]/path"
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(
                "credentials in the URL are not supported; the backend must trust the network"
                    .into(),
            );
        }
        if path.contains('#') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{s:?}: the path may not hold spaces, controls or a #fragment"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed [ in the host"))?;
            (h, tail.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("{s:?}: the port must be 1 to 65535")),
            },
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
        {
            return Err(format!("{s:?}: expected a host name or IP address"));
        }
        Ok(Url {
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header's value (and the pool key).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// The client's settings, each chosen by the caller (no defaults).
#[derive(Clone, Debug)]
pub struct Options {
    /// Longest a TCP connect may take (also bounded by each call's deadline).
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept per host; 0 = a new connection per request.
    pub idle_per_host_max: usize,
    /// An idle connection older than this is closed instead of reused: below the common
    /// servers' idle timeouts (Node 5 s, nginx 75 s, Go 90 s), so the server rarely closes
    /// one under a request.
    pub idle_timeout: Duration,
    /// Distinct hosts the pool keeps connections for (the config's URLs bound it anyway).
    pub hosts_max: usize,
    /// Largest response head.
    pub head_bytes_max: usize,
    /// `User-Agent` sent with every request.
    pub user_agent: &'static str,
}

/// A response read in full.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a call produced no response. Every variant leaves nothing behind (the connection is
/// dropped, never pooled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// The deadline passed (connecting, writing or reading): the backend is slow; retry later.
    Timeout,
    /// The connection could not be made or broke: the backend is down or restarting.
    Unreachable,
    /// The body is larger than the caller's limit: the backend answered more than allowed.
    TooLarge,
    /// Not an HTTP/1.x response: the endpoint is not the backend it should be.
    Malformed,
}

/// The request bytes of a JSON POST (HTTP/1.1, keep-alive, explicit `Content-Length`).
pub fn encode_post(url: &Url, user_agent: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    encode_request(Method::Post, url, user_agent, headers, Some(body))
}

/// The request methods the callers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// The request bytes of one request (HTTP/1.1, keep-alive). `body` Some: a JSON body with
/// its `Content-Type` and `Content-Length`; None: no body (`Content-Length: 0` for POST and
/// PUT, which servers may otherwise refuse with 411).
pub fn encode_request(
    method: Method,
    url: &Url,
    user_agent: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(url.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(url.authority().as_bytes());
    out.extend_from_slice(b"\r\nUser-Agent: ");
    out.extend_from_slice(user_agent.as_bytes());
    if body.is_some() {
        out.extend_from_slice(b"\r\nContent-Type: application/json");
    }
    out.extend_from_slice(b"\r\nAccept: application/json\r\nConnection: keep-alive\r\n");
    for (k, v) in headers {
        debug_assert!(!k.contains(['\r', '\n']) && !v.contains(['\r', '\n']));
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body {
        Some(body) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
        }
        None if matches!(method, Method::Post | Method::Put) => {
            out.extend_from_slice(b"Content-Length: 0\r\n\r\n")
        }
        None => out.extend_from_slice(b"\r\n"),
    }
    out
}

/// Where reading a response stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Read more (at `eof`, a body delimited by the close is complete: see [`parse_response`]).
    Partial,
    /// The response, and whether the connection may carry another request.
    Done(Response, bool),
    Error(HttpError),
}

/// Decode the response at the start of `buf` (sans-IO). `eof`: the peer closed, so a body
/// without `Content-Length` or chunking ends here. 1xx heads are skipped.
pub fn parse_response(buf: &[u8], eof: bool, head_max: usize, body_max: usize) -> Parsed {
    let mut buf = buf;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
        let mut r = httparse::Response::new(&mut headers);
        let head_len = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > head_max => {
                return Parsed::Error(HttpError::Malformed)
            }
            Ok(httparse::Status::Partial) if eof => {
                return Parsed::Error(if buf.is_empty() {
                    HttpError::Unreachable
                } else {
                    HttpError::Malformed
                })
            }
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Error(HttpError::Malformed),
        };
        if head_len > head_max {
            return Parsed::Error(HttpError::Malformed);
        }
        let status = r.code.unwrap_or(0);
        if (100..200).contains(&status) {
            buf = &buf[head_len..];
            continue;
        }
        let mut keep = r.version == Some(1);
        let mut length: Option<usize> = None;
        let mut chunked = false;
        for h in r.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let Some(n) = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                else {
                    return Parsed::Error(HttpError::Malformed);
                };
                if length.is_some_and(|l| l != n) {
                    return Parsed::Error(HttpError::Malformed);
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep = false;
            }
        }
        let rest = &buf[head_len..];
        if status == 204 || status == 304 {
            return Parsed::Done(
                Response {
                    status,
                    body: Vec::new(),
                },
                keep,
            );
        }
        if chunked {
            return match decode_chunked(rest, body_max) {
                // Not pooled: what follows the trailers (if anything) is not accounted for, and
                // a stray byte would be read as the next request's answer.
                Ok(Some(body)) => Parsed::Done(Response { status, body }, false),
                Ok(None) if eof => Parsed::Error(HttpError::Malformed),
                Ok(None) => Parsed::Partial,
                Err(e) => Parsed::Error(e),
            };
        }
        if let Some(n) = length {
            if n > body_max {
                return Parsed::Error(HttpError::TooLarge);
            }
            if rest.len() < n {
                return if eof {
                    Parsed::Error(HttpError::Malformed)
                } else {
                    Parsed::Partial
                };
            }
            let body = rest[..n].to_vec();
            // Bytes past the body (a server that wrote more than it announced) would be read
            // as the next exchange's answer: such a connection is not pooled.
            return Parsed::Done(Response { status, body }, keep && rest.len() == n);
        }
        // Delimited by the close.
        if rest.len() > body_max {
            return Parsed::Error(HttpError::TooLarge);
        }
        if !eof {
            return Parsed::Partial;
        }
        return Parsed::Done(
            Response {
                status,
                body: rest.to_vec(),
            },
            false,
        );
    }
}

/// A chunked body: `Ok(None)` while incomplete. Trailers are skipped.
fn decode_chunked(mut buf: &[u8], body_max: usize) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() > 64 {
                Err(HttpError::Malformed)
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| HttpError::Malformed)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Malformed)?;
        buf = &buf[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            let mut rest = buf;
            loop {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[end + 2..];
            }
        }
        // No addition can overflow: `size` is the peer's (up to u64::MAX).
        if size > body_max.saturating_sub(body.len()) {
            return Err(HttpError::TooLarge);
        }
        if buf.len() < size || buf.len() - size < 2 {
            return Ok(None);
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err(HttpError::Malformed);
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

/// The client: options and the idle pool.
pub struct Client {
    opts: Options,
    idle: RefCell<HashMap<String, Vec<(TcpStream, Instant)>>>,
}

impl Client {
    pub fn new(opts: Options) -> Client {
        Client {
            opts,
            idle: RefCell::new(HashMap::new()),
        }
    }

    /// POST `body` (JSON) to `url` and read the whole response, all within `timeout`; a body
    /// over `body_max` is [`HttpError::TooLarge`]. A pooled connection that turns out closed
    /// before any response byte is retried once on a new connection (the request cannot have
    /// been answered; a backend that acted on it and then closed without answering would see
    /// it twice, as with any HTTP client that reuses connections).
    pub async fn post_json(
        &self,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
        body_max: usize,
    ) -> Result<Response, HttpError> {
        self.request(Method::Post, url, headers, Some(body), timeout, body_max)
            .await
    }

    /// One request of any [`Method`] (a JSON body or none), as [`Client::post_json`]: the
    /// whole response within `timeout`, a pooled connection found closed retried once. Only
    /// for requests that may be repeated (idempotent, or harmless twice, as Eureka's are).
    pub async fn request(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
        body_max: usize,
    ) -> Result<Response, HttpError> {
        let request = encode_request(method, url, self.opts.user_agent, headers, body);
        let key = url.authority();
        let deadline = Instant::now() + timeout;
        let exchange = async {
            if let Some(sock) = self.take_idle(&key) {
                match self.exchange(sock, &request, body_max).await {
                    Err(Fault::Stale) => {}
                    other => return self.finish(&key, other),
                }
            }
            let sock = tokio::time::timeout(
                self.opts.connect_timeout,
                TcpStream::connect((url.host.as_str(), url.port)),
            )
            .await
            .map_err(|_| HttpError::Timeout)?
            .map_err(|_| HttpError::Unreachable)?;
            let _ = sock.set_nodelay(true);
            let r = self.exchange(sock, &request, body_max).await;
            self.finish(&key, r)
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout),
        }
    }

    fn finish(
        &self,
        key: &str,
        r: Result<(Response, Option<TcpStream>), Fault>,
    ) -> Result<Response, HttpError> {
        match r {
            Ok((resp, sock)) => {
                if let Some(sock) = sock {
                    self.put_idle(key, sock);
                }
                Ok(resp)
            }
            Err(Fault::Stale) => Err(HttpError::Unreachable),
            Err(Fault::Http(e)) => Err(e),
        }
    }

    async fn exchange(
        &self,
        mut sock: TcpStream,
        request: &[u8],
        body_max: usize,
    ) -> Result<(Response, Option<TcpStream>), Fault> {
        if sock.write_all(request).await.is_err() {
            return Err(Fault::Stale);
        }
        let mut buf = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        // Head and body bound what is held: beyond them the parser has already refused.
        let held_max = self.opts.head_bytes_max + body_max + 64 * 1024;
        loop {
            let n = match sock.read(&mut chunk).await {
                Ok(n) => n,
                Err(_) if buf.is_empty() => return Err(Fault::Stale),
                Err(_) => return Err(Fault::Http(HttpError::Unreachable)),
            };
            if n == 0 && buf.is_empty() {
                return Err(Fault::Stale);
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_response(&buf, n == 0, self.opts.head_bytes_max, body_max) {
                Parsed::Partial if n > 0 && buf.len() <= held_max => continue,
                Parsed::Partial => return Err(Fault::Http(HttpError::Malformed)),
                Parsed::Done(resp, keep) => return Ok((resp, keep.then_some(sock))),
                Parsed::Error(e) => return Err(Fault::Http(e)),
            }
        }
    }

    fn take_idle(&self, key: &str) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some((sock, since)) = list.pop() {
            if now.duration_since(since) >= self.opts.idle_timeout {
                continue;
            }
            // An idle connection must have nothing to read: a close (0) or bytes the server
            // sent while it sat in the pool would be taken for the next answer.
            let mut probe = [0u8; 1];
            match sock.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(sock),
                _ => continue,
            }
        }
        None
    }

    fn put_idle(&self, key: &str, sock: TcpStream) {
        if self.opts.idle_per_host_max == 0 {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if !idle.contains_key(key) && idle.len() >= self.opts.hosts_max {
            return;
        }
        let list = idle.entry(key.to_owned()).or_default();
        let now = Instant::now();
        list.retain(|(_, since)| now.duration_since(*since) < self.opts.idle_timeout);
        if list.len() < self.opts.idle_per_host_max {
            list.push((sock, now));
        }
    }
}

/// Why one exchange failed: on a pooled connection, `Stale` (closed before any response byte)
/// is retried on a new one.
enum Fault {
    Stale,
    Http(HttpError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_chunk_sizes_are_refused_not_panics() {
        // A size line of u64::MAX after a first chunk: no overflow, no slice past the end.
        let r = decode_chunked(b"2\r\nhi\r\nffffffffffffffff\r\nxx", 1024);
        assert!(matches!(r, Err(HttpError::TooLarge)), "{r:?}");
        let r = decode_chunked(b"ffffffffffffffff\r\n", usize::MAX);
        assert!(matches!(r, Ok(None) | Err(_)), "{r:?}");
        // A chunk announced but not all there yet is partial.
        assert!(matches!(decode_chunked(b"5\r\nab", 1024), Ok(None)));
    }

    #[test]
    fn extra_bytes_keep_a_connection_out_of_the_pool() {
        let exact = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let more = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n";
        assert!(matches!(
            parse_response(exact, false, 4096, 1024),
            Parsed::Done(_, true)
        ));
        assert!(matches!(
            parse_response(more, false, 4096, 1024),
            Parsed::Done(_, false)
        ));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert!(matches!(
            parse_response(chunked, false, 4096, 1024),
            Parsed::Done(_, false)
        ));
    }

    #[test]
    fn urls() {
        let u = Url::parse("http://auth:8080/check?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("auth", 8080, "/check?x=1")
        );
        assert_eq!(u.authority(), "auth:8080");
        let u = Url::parse("http://10.0.0.1").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.authority()),
            (80, "/", "10.0.0.1".into())
        );
        let u = Url::parse("http://[::1]:81/a").unwrap();
        assert_eq!((u.host.as_str(), u.authority()), ("::1", "[::1]:81".into()));
        assert_eq!(Url::parse("http://h?q").unwrap().path, "/?q");
        assert!(Url::parse("https://a/").unwrap_err().contains("https"));
        assert!(Url::parse("ftp://a/").unwrap_err().contains("http://"));
        assert!(Url::parse("http://u:p@a/")
            .unwrap_err()
            .contains("credentials"));
        assert!(Url::parse("http://a:0/").is_err());
        assert!(Url::parse("http:///x").is_err());
        assert!(Url::parse("http://a/b c").is_err());
    }

    #[test]
    fn post_bytes() {
        let u = Url::parse("http://h:81/p").unwrap();
        let r = encode_post(&u, "sb", &[("X-A", "1")], b"{}");
        assert_eq!(
            std::str::from_utf8(&r).unwrap(),
            "POST /p HTTP/1.1\r\nHost: h:81\r\nUser-Agent: sb\r\nContent-Type: application/json\r\nAccept: application/json\r\nConnection: keep-alive\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn bodiless_request_bytes() {
        let u = Url::parse("http://h/eureka/apps/A/i?value=UP").unwrap();
        let put = encode_request(Method::Put, &u, "sb", &[], None);
        assert_eq!(
            std::str::from_utf8(&put).unwrap(),
            "PUT /eureka/apps/A/i?value=UP HTTP/1.1\r\nHost: h\r\nUser-Agent: sb\r\nAccept: application/json\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        );
        let del = encode_request(
            Method::Delete,
            &u,
            "sb",
            &[("Authorization", "Basic x")],
            None,
        );
        assert_eq!(
            std::str::from_utf8(&del).unwrap(),
            "DELETE /eureka/apps/A/i?value=UP HTTP/1.1\r\nHost: h\r\nUser-Agent: sb\r\nAccept: application/json\r\nConnection: keep-alive\r\nAuthorization: Basic x\r\n\r\n"
        );
    }

    fn done(status: u16, body: &[u8], keep: bool) -> Parsed {
        Parsed::Done(
            Response {
                status,
                body: body.to_vec(),
            },
            keep,
        )
    }

    #[test]
    fn responses() {
        let p = |b: &[u8], eof| parse_response(b, eof, 1024, 10);
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(p(ok, false), done(200, b"hi", true));
        for cut in 0..ok.len() {
            assert_eq!(p(&ok[..cut], false), Parsed::Partial, "{cut}");
        }
        assert_eq!(p(&ok[..3], true), Parsed::Error(HttpError::Malformed));
        assert_eq!(p(b"", true), Parsed::Error(HttpError::Unreachable));
        let close = b"HTTP/1.1 401 No\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(p(close, false), done(401, b"", false));
        let old = b"HTTP/1.0 200 OK\r\n\r\nabc";
        assert_eq!(p(old, false), Parsed::Partial);
        assert_eq!(p(old, true), done(200, b"abc", false));
        let big = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(p(big, false), Parsed::Error(HttpError::TooLarge));
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\n\r\n0123456789A", false),
            Parsed::Error(HttpError::TooLarge)
        );
        assert_eq!(
            p(b"SSH-2.0-OpenSSH\r\n\r\n", false),
            Parsed::Error(HttpError::Malformed)
        );
        let cont = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No\r\n\r\n";
        assert_eq!(p(cont, false), done(204, b"", true));
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(p(two, false), Parsed::Error(HttpError::Malformed));
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 2000));
        assert_eq!(p(&long, false), Parsed::Error(HttpError::Malformed));
    }

    #[test]
    fn chunked_bodies() {
        let p = |b: &[u8]| parse_response(b, false, 1024, 10);
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3;x=1\r\n!!!\r\n0\r\nT: 1\r\n\r\n";
        // Decoded, and never pooled (see parse_response).
        assert_eq!(p(c), done(200, b"hi!!!", false));
        for cut in 0..c.len() - 1 {
            assert_eq!(p(&c[..cut]), Parsed::Partial, "{cut}");
        }
        let big = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n";
        assert_eq!(p(big), Parsed::Error(HttpError::TooLarge));
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(p(bad), Parsed::Error(HttpError::Malformed));
        let unterminated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX";
        assert_eq!(p(unterminated), Parsed::Error(HttpError::Malformed));
    }
}
