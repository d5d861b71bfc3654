//! Response bytes: status lines, the builder, and the shard's original helpers.

use tungstenite::handshake::derive_accept_key;

/// An HTTP status code. The constants are every status the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    pub const OK: Status = Status(200);
    pub const CREATED: Status = Status(201);
    pub const ACCEPTED: Status = Status(202);
    pub const NO_CONTENT: Status = Status(204);
    pub const BAD_REQUEST: Status = Status(400);
    pub const UNAUTHORIZED: Status = Status(401);
    pub const FORBIDDEN: Status = Status(403);
    pub const NOT_FOUND: Status = Status(404);
    pub const METHOD_NOT_ALLOWED: Status = Status(405);
    pub const LENGTH_REQUIRED: Status = Status(411);
    pub const PAYLOAD_TOO_LARGE: Status = Status(413);
    pub const UNSUPPORTED_MEDIA_TYPE: Status = Status(415);
    pub const UPGRADE_REQUIRED: Status = Status(426);
    pub const TOO_MANY_REQUESTS: Status = Status(429);
    pub const HEADER_FIELDS_TOO_LARGE: Status = Status(431);
    pub const INTERNAL_SERVER_ERROR: Status = Status(500);
    pub const NOT_IMPLEMENTED: Status = Status(501);
    pub const SERVICE_UNAVAILABLE: Status = Status(503);

    /// The reason phrase (RFC 9110 section 15); "Error" for a code not listed above.
    pub fn reason(self) -> &'static str {
        match self.0 {
            200 => "OK",
            201 => "Created",
            202 => "Accepted",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            411 => "Length Required",
            413 => "Content Too Large",
            415 => "Unsupported Media Type",
            426 => "Upgrade Required",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "Error",
        }
    }
}

/// CORS headers a response carries (see [`super::Cors`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CorsHeaders<'a> {
    /// None at all (CORS off, no Origin, or an origin not allowed).
    #[default]
    Off,
    /// `Access-Control-Allow-Origin: <origin>` and `Vary: Origin`.
    Origin(&'a str),
    /// As `Origin`, plus the preflight's Allow-Methods, Allow-Headers and Max-Age.
    Preflight(&'a str),
}

/// A response to encode. Built field by field; nothing is implied but `Cache-Control:
/// no-store` (every answer is live state) and `Content-Length` (except on 204, where RFC 9110
/// forbids it).
#[derive(Clone, Copy, Debug)]
pub struct Response<'a> {
    pub status: Status,
    /// Omitted when empty.
    pub content_type: &'a str,
    pub body: &'a [u8],
    /// `Connection: keep-alive` when true, else `Connection: close`.
    pub keep_alive: bool,
    /// The `Allow` header; required on 405 (the router's `allow`).
    pub allow: Option<&'a str>,
    pub cors: CorsHeaders<'a>,
    /// A HEAD request: write the head only, Content-Length still that of `body`.
    pub head_request: bool,
    /// Further header lines, each ending in `\r\n` (static: e.g. the admin page's
    /// Content-Security-Policy); empty for none.
    pub extra_headers: &'static str,
}

impl<'a> Response<'a> {
    /// A `Connection: close` response without CORS headers; set the other fields directly.
    pub fn new(status: Status, content_type: &'a str, body: &'a [u8]) -> Response<'a> {
        Response {
            status,
            content_type,
            body,
            keep_alive: false,
            allow: None,
            cors: CorsHeaders::Off,
            head_request: false,
            extra_headers: "",
        }
    }

    /// Append the encoded response to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let no_content = self.status == Status::NO_CONTENT;
        out.reserve(256 + self.body.len());
        // Writes into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\n",
            self.status.0,
            self.status.reason()
        );
        if !self.content_type.is_empty() && !no_content {
            let _ = write!(out, "Content-Type: {}\r\n", self.content_type);
        }
        if !no_content {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        out.extend_from_slice(b"Cache-Control: no-store\r\n");
        if let Some(allow) = self.allow {
            let _ = write!(out, "Allow: {allow}\r\n");
        }
        out.extend_from_slice(self.extra_headers.as_bytes());
        match self.cors {
            CorsHeaders::Off => {}
            CorsHeaders::Origin(o) | CorsHeaders::Preflight(o) => {
                let _ = write!(out, "Access-Control-Allow-Origin: {o}\r\nVary: Origin\r\n");
            }
        }
        if let CorsHeaders::Preflight(_) = self.cors {
            let _ = write!(
                out,
                "Access-Control-Allow-Methods: {}\r\nAccess-Control-Allow-Headers: {}\r\nAccess-Control-Max-Age: {}\r\n",
                super::cors::ALLOW_METHODS,
                super::cors::ALLOW_HEADERS,
                crate::limits::HTTP_CORS_MAX_AGE_S
            );
        }
        out.extend_from_slice(if self.keep_alive {
            b"Connection: keep-alive\r\n\r\n"
        } else {
            b"Connection: close\r\n\r\n"
        });
        if !self.head_request && !no_content {
            out.extend_from_slice(self.body);
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// A JSON error body: `{"error":"<text>"}` (text JSON-escaped).
pub fn json_error_body(text: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(text.len() + 12);
    body.extend_from_slice(b"{\"error\":");
    crate::proto::json::write_str(&mut body, text);
    body.push(b'}');
    body
}

/// The 101 response. `protocol` is the selected subprotocol, if any (never a token).
pub fn switching_protocols(ws_key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = derive_accept_key(ws_key.as_bytes());
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// A complete response with `Connection: close` (the shard's original helper; byte-identical
/// to before `http/`). Keep-alive and CORS answers use [`Response`].
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    Response::new(Status(status), content_type, body).to_vec()
}

/// The same response without its body (for HEAD), keeping Content-Length.
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// A JSON error response with `Connection: close`: `{"error":"<text>"}`.
pub fn json_error(status: u16, text: &str) -> Vec<u8> {
    response(status, "application/json", &json_error_body(text))
}
