//! Minimal client side of HTTP/1.1 for the REST scenarios, sans-IO: request bytes, the
//! response head (status, `Content-Length`, `Connection: close`), and a cheap check of a
//! message page's body (`{"messages":[...],"next":N|null}`) that counts the messages and
//! reads `next` without parsing the JSON.
//!
//! Owns bytes only: no sockets, no clocks. The server frames every body with
//! `Content-Length`; a chunked or unframed response is an error for the generator.

/// Largest response head we wait for before calling the response malformed.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Largest response body we accept (a page of 200 messages of 16 KiB is about 3.3 MB).
pub const BODY_BYTES_MAX: usize = 8 << 20;

/// Appends one request to `out`. `body` non-empty adds `Content-Type` and `Content-Length`;
/// `user` goes in `X-User-Id` (the server's `auth_mode: none`).
pub fn request(out: &mut Vec<u8>, method: &str, host: &str, path: &str, user: &str, body: &[u8]) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nX-User-Id: ");
    out.extend_from_slice(user.as_bytes());
    if !body.is_empty() || method != "GET" {
        out.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// One complete response at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of the head, blank line included; the body follows.
    pub head_len: usize,
    pub body_len: usize,
    /// The server closes the connection after this response (`Connection: close`, or
    /// HTTP/1.0 without `keep-alive`).
    pub close: bool,
}

impl Response {
    /// Bytes of head and body: where the next response starts.
    pub fn total(&self) -> usize {
        self.head_len + self.body_len
    }

    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.head_len..self.total()]
    }
}

/// Parses the response at the start of `buf`: `Ok(None)` until head and body are complete.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, String> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > HEAD_BYTES_MAX {
            return Err(format!("response head over {HEAD_BYTES_MAX} bytes"));
        }
        return Ok(None);
    };
    let head_len = end + 4;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let (version, rest) = status_line
        .split_once(' ')
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    let code = rest.get(..3).unwrap_or("");
    let status: u16 = code
        .parse()
        .ok()
        .filter(|s| (100..=599).contains(s) && code.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut body_len: Option<usize> = None;
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if body_len.is_some_and(|old| old != n) {
                return Err("two different Content-Length headers".into());
            }
            body_len = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!(
                "Transfer-Encoding {value} is not supported (the server frames with Content-Length)"
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    // 1xx, 204 and 304 have no body; everything else from this server has a Content-Length.
    let body_len = match body_len {
        Some(n) => n,
        None if status < 200 || status == 204 || status == 304 => 0,
        None => return Err(format!("status {status} without Content-Length")),
    };
    if body_len > BODY_BYTES_MAX {
        return Err(format!(
            "response body of {body_len} bytes is over {BODY_BYTES_MAX}"
        ));
    }
    if buf.len() < head_len + body_len {
        return Ok(None);
    }
    Ok(Some(Response {
        status,
        head_len,
        body_len,
        close,
    }))
}

/// What a message page holds, as far as the cheap check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Messages in the page (occurrences of `"serverMsgId":`, one per message object).
    pub messages: usize,
    /// The `next` cursor: `before` for the next page, `None` on the last page.
    pub next: Option<u64>,
}

/// Checks the shape of a `GET .../messages` body without parsing it: the object starts with
/// `{"messages":[`, ends with `,"next":N}` or `,"next":null}`, and the messages are counted by
/// their `"serverMsgId":` key. The generator writes message contents without quotes or keys, so
/// the count is exact for the threads it sets up.
pub fn check_page(body: &[u8]) -> Result<Page, &'static str> {
    let inner = body
        .strip_prefix(b"{\"messages\":[")
        .ok_or("body does not start with {\"messages\":[")?;
    let inner = inner.strip_suffix(b"}").ok_or("body does not end with }")?;
    let at = memchr::memmem::rfind(inner, b"],\"next\":").ok_or("no \"next\" after the list")?;
    let tail = &inner[at + 9..];
    let next = if tail == b"null" {
        None
    } else {
        if tail.is_empty() || tail.len() > 20 || !tail.iter().all(u8::is_ascii_digit) {
            return Err("\"next\" is neither null nor a number");
        }
        let n = std::str::from_utf8(tail)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or("\"next\" is out of range")?;
        Some(n)
    };
    let list = &inner[..at];
    let messages = memchr::memmem::find_iter(list, b"\"serverMsgId\":").count();
    if messages == 0 && !list.is_empty() {
        return Err("a non-empty list without messages");
    }
    Ok(Page { messages, next })
}

/// Percent-encodes a path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_post_requests_are_framed() {
        let mut v = Vec::new();
        request(
            &mut v,
            "GET",
            "127.0.0.1:8081",
            "/api/v1/x?limit=5",
            "lt1a",
            b"",
        );
        assert_eq!(
            v,
            b"GET /api/v1/x?limit=5 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nX-User-Id: lt1a\r\n\r\n"
        );
        v.clear();
        request(&mut v, "POST", "h:1", "/p", "u", b"{\"a\":1}");
        let s = std::str::from_utf8(&v).unwrap();
        assert!(
            s.starts_with("POST /p HTTP/1.1\r\nHost: h:1\r\nX-User-Id: u\r\n"),
            "{s}"
        );
        assert!(s.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"), "{s}");
    }

    #[test]
    fn responses_are_split_at_their_content_length() {
        let one = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 5\r\nConnection: keep-alive\r\n\r\nhello";
        let mut two = one.to_vec();
        two.extend_from_slice(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        );
        let r = parse_response(&two).unwrap().unwrap();
        assert_eq!((r.status, r.body_len, r.close), (200, 5, false));
        assert_eq!(r.body(&two), b"hello");
        let r2 = parse_response(&two[r.total()..]).unwrap().unwrap();
        assert_eq!((r2.status, r2.body_len, r2.close), (503, 2, true));
        assert_eq!(r.total() + r2.total(), two.len());
        // Every prefix is incomplete, never an error.
        for cut in 0..one.len() {
            assert_eq!(parse_response(&one[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_heads_are_errors() {
        for bad in [
            &b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_response(&vec![b'a'; HEAD_BYTES_MAX + 1]).is_err());
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body_len), (204, 0));
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.close);
        let r = parse_response(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!r.close);
    }

    #[test]
    fn pages_are_counted_and_next_is_read() {
        let m = |id: u64| {
            format!(
                r#"{{"id":{id},"serverMsgId":"01a2-{id}","threadId":"t","seq":{id},"content":"xxxx","cursor":{id}}}"#
            )
        };
        let body = format!(r#"{{"messages":[{},{},{}],"next":7}}"#, m(9), m(8), m(7));
        assert_eq!(
            check_page(body.as_bytes()),
            Ok(Page {
                messages: 3,
                next: Some(7)
            })
        );
        let last = format!(r#"{{"messages":[{}],"next":null}}"#, m(1));
        assert_eq!(
            check_page(last.as_bytes()),
            Ok(Page {
                messages: 1,
                next: None
            })
        );
        assert_eq!(
            check_page(br#"{"messages":[],"next":null}"#),
            Ok(Page {
                messages: 0,
                next: None
            })
        );
        for bad in [
            &br#"{"error":"thread not found"}"#[..],
            br#"{"messages":[{"id":1}],"next":null}"#,
            br#"{"messages":[],"next":"x"}"#,
            br#"{"messages":[],"next":12"#,
            br#"{"messages":[]}"#,
            br#"{"messages":[],"next":}"#,
            br#"{"messages":[],"next":123456789012345678901234}"#,
        ] {
            assert!(check_page(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("db10e5d3-7550_a.b~c"), "db10e5d3-7550_a.b~c");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }
}
