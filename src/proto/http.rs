//! HTTP/1.1 request heads (upgrade requests and the plain endpoints) and responses, sans-IO.
//!
//! httparse reads the head from bytes the shard has buffered; this module decides what the
//! request is (a WebSocket upgrade, an HTTP endpoint, or garbage) and builds response bytes.
//! The upgrade accept key comes from tungstenite's `derive_accept_key`.

use tungstenite::handshake::derive_accept_key;

use crate::limits::HTTP_HEADERS_MAX;

/// The fields of a request head that the server acts on, borrowed from the buffer.
#[derive(Debug, Default)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub ws_key: Option<&'a str>,
    pub ws_version: Option<&'a str>,
    pub ws_protocols: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub authorization: Option<&'a str>,
}

/// Outcome of parsing buffered bytes.
pub enum Parsed<'a> {
    /// The head is not complete yet.
    Partial,
    /// A complete head and the number of bytes it used.
    Complete(RequestHead<'a>, usize),
    /// Not HTTP, or HTTP we will not serve: answer 400 and close.
    Invalid,
}

/// Parse a request head. `buf` must already be checked against `max_request_header_bytes`.
pub fn parse_request(buf: &[u8]) -> Parsed<'_> {
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Invalid;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut head = RequestHead {
        method,
        path,
        query,
        ..RequestHead::default()
    };
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            continue;
        };
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            head.connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            head.ws_protocols = Some(value);
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = Some(value);
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(value);
        }
    }
    Parsed::Complete(head, used)
}

/// Comma-separated header token list contains `token` (case-insensitive).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the subprotocol list offers `name`.
pub fn offers_protocol(protocols: Option<&str>, name: &str) -> bool {
    protocols.is_some_and(|p| p.split(',').any(|t| t.trim() == name))
}

impl<'a> RequestHead<'a> {
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

/// A complete response with `Connection: close`.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The same response without its body (for HEAD), keeping Content-Length.
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// A JSON error response: `{"error":"<text>"}`.
pub fn json_error(status: u16, text: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(text.len() + 12);
    body.extend_from_slice(b"{\"error\":");
    super::json::write_str(&mut body, text);
    body.push(b'}');
    response(status, "application/json", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /ws?token=abc&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://a.example\r\nSec-WebSocket-Protocol: switchboard, bearer.xyz\r\n\r\n";

    #[test]
    fn parses_an_upgrade() {
        let Parsed::Complete(head, used) = parse_request(UPGRADE) else {
            panic!()
        };
        assert_eq!(used, UPGRADE.len());
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query, Some("token=abc&x=1"));
        assert_eq!(head.origin, Some("https://a.example"));
        assert_eq!(head.upgrade_key(), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(offers_protocol(head.ws_protocols, "switchboard"));
        assert!(!offers_protocol(head.ws_protocols, "bearer"));
    }

    #[test]
    fn partial_and_invalid() {
        assert!(matches!(parse_request(&UPGRADE[..40]), Parsed::Partial));
        assert!(matches!(
            parse_request(b"\x16\x03\x01garbage\r\n\r\n"),
            Parsed::Invalid
        ));
        let Parsed::Complete(head, _) = parse_request(b"GET /health HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert_eq!(
            head.upgrade_key(),
            Err("expected a websocket upgrade request")
        );
    }

    #[test]
    fn accept_key_from_rfc6455_example() {
        let r = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!r.contains("Sec-WebSocket-Protocol"));
    }
}
