//! Request parsing: a head (httparse) plus a body bounded by Content-Length.

use crate::limits::HTTP_HEADERS_MAX;

use super::{has_token, Status};

/// The HTTP version of a request line (httparse accepts only these two).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Version {
    Http10,
    #[default]
    Http11,
}

/// A parsed request, borrowed from the read buffer: the head fields the server acts on and
/// the body. Header values are trimmed; of a header sent twice the last one wins (except
/// Content-Length and Transfer-Encoding, which [`parse_request`] refuses when ambiguous).
/// Headers whose value is not UTF-8 are ignored (again except those two). `Debug` prints
/// `authorization`, `api_key`, `query` and `ws_protocols` (each may carry a token, e.g.
/// `?token=` or `bearer.<jwt>`) as `<redacted>` and the body as its length: a logged request
/// leaks no secret.
#[derive(Default)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The target before `?`, not percent-decoded (the router decodes captured segments).
    pub path: &'a str,
    /// The target after the first `?`, if any.
    pub query: Option<&'a str>,
    pub version: Version,
    /// `Upgrade` lists `websocket`.
    pub upgrade_websocket: bool,
    /// `Connection` lists `upgrade`.
    pub connection_upgrade: bool,
    /// The connection stays open after the response (RFC 9112 9.3): HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive` (and no `close`).
    pub keep_alive: bool,
    pub ws_key: Option<&'a str>,
    pub ws_version: Option<&'a str>,
    pub ws_protocols: Option<&'a str>,
    pub origin: Option<&'a str>,
    /// The raw `Authorization` value (a token: never log it).
    pub authorization: Option<&'a str>,
    /// The raw `X-API-Key` value (a secret: never log it). Check it with [`super::api_key_ok`].
    pub api_key: Option<&'a str>,
    /// `X-User-Id`: the identity a REST request claims when `auth_mode` is `none`
    /// (development; ignored in jwt mode).
    pub user_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The declared body length; None when there is no Content-Length.
    pub content_length: Option<usize>,
    /// `Access-Control-Request-Method` (CORS preflight).
    pub ac_request_method: Option<&'a str>,
    /// `Access-Control-Request-Headers` (CORS preflight).
    pub ac_request_headers: Option<&'a str>,
    /// The trace context headers (`traceparent`, `b3`, `X-B3-*`), unparsed: read them with
    /// [`crate::trace::propagation::Headers::parse`] only when tracing is on.
    pub trace: crate::trace::propagation::Headers<'a>,
    /// Exactly `content_length` bytes (empty without one). Always empty from [`parse_head`].
    pub body: &'a [u8],
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: Option<&str>| v.map(|_| "<redacted>");
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query.map(|_| "<redacted>"))
            .field("version", &self.version)
            .field("upgrade_websocket", &self.upgrade_websocket)
            .field("connection_upgrade", &self.connection_upgrade)
            .field("keep_alive", &self.keep_alive)
            .field("ws_key", &self.ws_key)
            .field("ws_version", &self.ws_version)
            .field("ws_protocols", &redacted(self.ws_protocols))
            .field("origin", &self.origin)
            .field("authorization", &redacted(self.authorization))
            .field("api_key", &redacted(self.api_key))
            .field("user_id", &self.user_id)
            .field("content_type", &self.content_type)
            .field("content_length", &self.content_length)
            .field("ac_request_method", &self.ac_request_method)
            .field("ac_request_headers", &self.ac_request_headers)
            .field("trace", &self.trace)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The name the shard's upgrade path has used since before `http/`: the same type.
pub type RequestHead<'a> = Request<'a>;

/// Why a request is refused before it is served. Every one ends the connection: after it the
/// next request's start cannot be found. Answer with [`RequestError::response`], then close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not HTTP/1.x, or malformed (client fault): 400.
    BadRequest,
    /// The head exceeds `head_max` bytes or [`HTTP_HEADERS_MAX`] headers (client): 431.
    HeadTooLarge,
    /// Content-Length exceeds `body_max` (client; decided before the body arrives): 413.
    BodyTooLarge,
    /// `Transfer-Encoding: chunked`: we refuse chunked bodies; the client must send
    /// Content-Length (client): 411.
    ChunkedRefused,
    /// Content-Length is not a decimal number, is a list, or is sent twice (client): 400.
    BadContentLength,
    /// A Transfer-Encoding other than chunked (client): 501.
    UnknownTransferEncoding,
}

impl RequestError {
    pub fn status(self) -> Status {
        match self {
            RequestError::BadRequest | RequestError::BadContentLength => Status::BAD_REQUEST,
            RequestError::HeadTooLarge => Status::HEADER_FIELDS_TOO_LARGE,
            RequestError::BodyTooLarge => Status::PAYLOAD_TOO_LARGE,
            RequestError::ChunkedRefused => Status::LENGTH_REQUIRED,
            RequestError::UnknownTransferEncoding => Status::NOT_IMPLEMENTED,
        }
    }

    /// What the client should change, for the JSON body.
    pub fn text(self) -> &'static str {
        match self {
            RequestError::BadRequest => "bad request",
            RequestError::HeadTooLarge => "request header too large",
            RequestError::BodyTooLarge => "request body too large",
            RequestError::ChunkedRefused => {
                "length required: chunked bodies are not accepted; send Content-Length"
            }
            RequestError::BadContentLength => "invalid or duplicated Content-Length",
            RequestError::UnknownTransferEncoding => "unsupported Transfer-Encoding",
        }
    }

    /// The complete `Connection: close` JSON error response.
    pub fn response(self) -> Vec<u8> {
        super::json_error(self.status().0, self.text())
    }
}

/// Outcome of [`parse_request`].
// Returned by value once per request and matched at once; boxing would allocate per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed<'a> {
    /// Head or body not complete yet: read more (the limits were checked on what is here).
    Partial,
    /// Refused: send [`RequestError::response`] and close.
    Error(RequestError),
    /// A complete request and the bytes it used (head + body). Bytes after them belong to the
    /// next request (pipelining); they are WebSocket frames only after an upgrade.
    Complete(Request<'a>, usize),
}

/// Outcome of [`parse_head`] (the shard's upgrade path; re-exported as
/// `proto::http::Parsed`).
// Returned by value once per request and matched at once; boxing would allocate per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum HeadParsed<'a> {
    /// The head is not complete yet.
    Partial,
    /// A complete head and the number of bytes it used.
    Complete(RequestHead<'a>, usize),
    /// Not HTTP, or HTTP we will not serve: answer 400 and close.
    Invalid,
}

/// Content-Length / Transfer-Encoding as seen in the head.
#[derive(Default)]
struct Framing {
    /// `Some(Ok(n))` (saturating at `u64::MAX`), `Some(Err(()))` when bad or repeated.
    content_length: Option<Result<u64, ()>>,
    transfer_encoding: bool,
    chunked: bool,
}

#[allow(clippy::large_enum_variant)] // as `Parsed`
enum Head<'a> {
    Partial,
    Error(RequestError),
    Complete(Request<'a>, usize, Framing),
}

/// httparse's options, each set on purpose (none inherited): strict request lines, no
/// tolerance for invalid header lines (a smuggling vector).
fn parser_config() -> httparse::ParserConfig {
    let mut c = httparse::ParserConfig::default();
    c.allow_multiple_spaces_in_request_line_delimiters(false)
        .allow_space_before_first_header_name(false)
        .ignore_invalid_headers_in_requests(false)
        // The response-only options do not apply to requests; set anyway, so none is inherited.
        .allow_spaces_after_header_name_in_responses(false)
        .allow_obsolete_multiline_headers_in_responses(false)
        .allow_multiple_spaces_in_response_status_delimiters(false)
        .ignore_invalid_headers_in_responses(false);
    c
}

fn parse_content_length(v: &[u8]) -> Result<u64, ()> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    // Saturates: a number past u64::MAX is well-formed and merely too large (413).
    Ok(v.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

fn parse_head_inner(buf: &[u8]) -> Head<'_> {
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let used = match parser_config().parse_request(&mut req, buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return Head::Error(RequestError::HeadTooLarge),
        Err(_) => return Head::Error(RequestError::BadRequest),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Head::Error(RequestError::BadRequest);
    };
    let version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut r = Request {
        method,
        path,
        query,
        version,
        ..Request::default()
    };
    let mut framing = Framing::default();
    let (mut close, mut keep) = (false, false);
    for h in req.headers.iter() {
        let name = h.name;
        // Framing headers are judged on raw bytes: skipping a non-UTF-8 one would let a proxy
        // and us disagree on where the request ends.
        if name.eq_ignore_ascii_case("content-length") {
            framing.content_length = match framing.content_length {
                None => Some(parse_content_length(h.value)),
                Some(_) => Some(Err(())),
            };
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            framing.transfer_encoding = true;
            if let Ok(v) = std::str::from_utf8(h.value) {
                framing.chunked |= has_token(v, "chunked");
            }
            continue;
        }
        let Ok(value) = std::str::from_utf8(h.value) else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            r.upgrade_websocket |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            r.connection_upgrade |= has_token(value, "upgrade");
            close |= has_token(value, "close");
            keep |= has_token(value, "keep-alive");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            r.ws_key = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            r.ws_version = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            r.ws_protocols = Some(value);
        } else if name.eq_ignore_ascii_case("origin") {
            r.origin = Some(value);
        } else if name.eq_ignore_ascii_case("authorization") {
            r.authorization = Some(value);
        } else if name.eq_ignore_ascii_case("x-api-key") {
            r.api_key = Some(value);
        } else if name.eq_ignore_ascii_case("x-user-id") {
            r.user_id = Some(value);
        } else if name.eq_ignore_ascii_case("content-type") {
            r.content_type = Some(value);
        } else if name.eq_ignore_ascii_case("access-control-request-method") {
            r.ac_request_method = Some(value);
        } else if name.eq_ignore_ascii_case("access-control-request-headers") {
            r.ac_request_headers = Some(value);
        } else {
            r.trace.offer(name, value);
        }
    }
    r.keep_alive = match version {
        Version::Http11 => !close,
        Version::Http10 => keep && !close,
    };
    Head::Complete(r, used, framing)
}

/// Parse one request from `buf`: a head of at most `head_max` bytes and a body of at most
/// `body_max` bytes, framed by Content-Length only.
///
/// - 431 when the head is over `head_max` (judged on the buffered bytes while it is partial)
///   or has more than [`HTTP_HEADERS_MAX`] headers.
/// - 413 as soon as the head declares a Content-Length over `body_max`, before the body.
/// - 411 for `Transfer-Encoding: chunked` (in any position of the list): chunked request
///   bodies are refused, not decoded; API clients send Content-Length. 501 for any other
///   Transfer-Encoding. Transfer-Encoding is judged before Content-Length (RFC 9112 6.3).
/// - 400 for a Content-Length that is not digits, is a list (`5, 5`) or appears twice.
///
/// Cost: one httparse pass over the head; the body is not copied.
pub fn parse_request(buf: &[u8], head_max: usize, body_max: usize) -> Parsed<'_> {
    let (mut r, head_len, framing) = match parse_head_inner(buf) {
        Head::Partial if buf.len() > head_max => return Parsed::Error(RequestError::HeadTooLarge),
        Head::Partial => return Parsed::Partial,
        Head::Error(e) => return Parsed::Error(e),
        Head::Complete(_, used, _) if used > head_max => {
            return Parsed::Error(RequestError::HeadTooLarge)
        }
        Head::Complete(r, used, framing) => (r, used, framing),
    };
    if framing.transfer_encoding {
        return Parsed::Error(if framing.chunked {
            RequestError::ChunkedRefused
        } else {
            RequestError::UnknownTransferEncoding
        });
    }
    let body_len = match framing.content_length {
        None => 0,
        Some(Err(())) => return Parsed::Error(RequestError::BadContentLength),
        Some(Ok(n)) if n > body_max as u64 => return Parsed::Error(RequestError::BodyTooLarge),
        // n <= body_max, a usize.
        Some(Ok(n)) => n as usize,
    };
    if framing.content_length.is_some() {
        r.content_length = Some(body_len);
    }
    let Some(used) = head_len.checked_add(body_len) else {
        return Parsed::Error(RequestError::BodyTooLarge);
    };
    let Some(body) = buf.get(head_len..used) else {
        return Parsed::Partial;
    };
    r.body = body;
    Parsed::Complete(r, used)
}

/// Parse a request head only, as the shard's upgrade path always has (re-exported as
/// `proto::http::parse_request`): no head or body limits (the caller checks `used` against
/// its own), body framing ignored, every parse error `Invalid`. New code uses
/// [`parse_request`].
pub fn parse_head(buf: &[u8]) -> HeadParsed<'_> {
    match parse_head_inner(buf) {
        Head::Partial => HeadParsed::Partial,
        Head::Error(_) => HeadParsed::Invalid,
        Head::Complete(r, used, _) => HeadParsed::Complete(r, used),
    }
}

impl<'a> Request<'a> {
    /// The `Sec-WebSocket-Key` of a valid WebSocket upgrade, or why this is not one.
    pub fn upgrade_key(&self) -> Result<&'a str, &'static str> {
        if self.method != "GET" {
            return Err("websocket upgrade requires GET");
        }
        if !self.upgrade_websocket || !self.connection_upgrade {
            return Err("expected a websocket upgrade request");
        }
        if self.ws_version != Some("13") {
            return Err("unsupported Sec-WebSocket-Version (need 13)");
        }
        match self.ws_key {
            Some(k) if k.len() == 24 => Ok(k),
            _ => Err("missing or invalid Sec-WebSocket-Key"),
        }
    }

    /// HEAD: answer as GET without the body.
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}
