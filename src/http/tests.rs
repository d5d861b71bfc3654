use super::*;

const HEAD: usize = 8192;
const BODY: usize = 1024;

const UPGRADE: &[u8] = b"GET /ws?token=abc&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://a.example\r\nSec-WebSocket-Protocol: switchboard, bearer.xyz\r\n\r\n";

fn complete(buf: &[u8]) -> (Request<'_>, usize) {
    match parse_request(buf, HEAD, BODY) {
        Parsed::Complete(r, used) => (r, used),
        other => panic!("{other:?}"),
    }
}

fn error(buf: &[u8]) -> RequestError {
    match parse_request(buf, HEAD, BODY) {
        Parsed::Error(e) => e,
        other => panic!("{other:?}"),
    }
}

fn text(v: &[u8]) -> &str {
    std::str::from_utf8(v).unwrap()
}

// ---------------------------------------------------------------- the shard's original API

#[test]
fn parses_an_upgrade() {
    let HeadParsed::Complete(head, used) = parse_head(UPGRADE) else {
        panic!()
    };
    assert_eq!(used, UPGRADE.len());
    assert_eq!(head.path, "/ws");
    assert_eq!(head.query, Some("token=abc&x=1"));
    assert_eq!(head.origin, Some("https://a.example"));
    assert_eq!(head.upgrade_key(), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(offers_protocol(head.ws_protocols, "switchboard"));
    assert!(!offers_protocol(head.ws_protocols, "bearer"));
    // The same through the new parser, and the old path still names it.
    let (r, used) = complete(UPGRADE);
    assert_eq!(
        (used, r.upgrade_key()),
        (UPGRADE.len(), Ok(head.ws_key.unwrap()))
    );
    assert!(matches!(
        crate::proto::http::parse_request(UPGRADE),
        crate::proto::http::Parsed::Complete(_, _)
    ));
}

#[test]
fn head_partial_and_invalid() {
    assert!(matches!(parse_head(&UPGRADE[..40]), HeadParsed::Partial));
    assert!(matches!(
        parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
        HeadParsed::Invalid
    ));
    let HeadParsed::Complete(head, _) = parse_head(b"GET /health HTTP/1.1\r\n\r\n") else {
        panic!()
    };
    assert_eq!(
        head.upgrade_key(),
        Err("expected a websocket upgrade request")
    );
    // Head-only: body framing is not its business (the shard checks `used` itself).
    let HeadParsed::Complete(_, used) =
        parse_head(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    else {
        panic!()
    };
    assert_eq!(used, 48);
}

#[test]
fn upgrade_key_reasons() {
    let base = |m: &'static str, v: Option<&'static str>, k: Option<&'static str>| Request {
        method: m,
        upgrade_websocket: true,
        connection_upgrade: true,
        ws_version: v,
        ws_key: k,
        ..Request::default()
    };
    let key = Some("dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(
        base("POST", Some("13"), key).upgrade_key(),
        Err("websocket upgrade requires GET")
    );
    assert_eq!(
        base("GET", Some("8"), key).upgrade_key(),
        Err("unsupported Sec-WebSocket-Version (need 13)")
    );
    assert_eq!(
        base("GET", Some("13"), Some("short")).upgrade_key(),
        Err("missing or invalid Sec-WebSocket-Key")
    );
    assert_eq!(
        base("GET", Some("13"), None).upgrade_key(),
        Err("missing or invalid Sec-WebSocket-Key")
    );
}

#[test]
fn accept_key_from_rfc6455_example() {
    let r = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
    assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(!r.contains("Sec-WebSocket-Protocol"));
    let r = String::from_utf8(switching_protocols(
        "dGhlIHNhbXBsZSBub25jZQ==",
        Some("switchboard"),
    ))
    .unwrap();
    assert!(r.ends_with("\r\nSec-WebSocket-Protocol: switchboard\r\n\r\n"));
}

#[test]
fn original_helpers_are_byte_identical() {
    assert_eq!(
        text(&response(200, "application/json", b"{}")),
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{}"
    );
    assert_eq!(
        text(&json_error(405, "method \"x\"")),
        "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 24\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{\"error\":\"method \\\"x\\\"\"}"
    );
    let full = response(404, "text/plain", b"gone");
    let head = head_only(full.clone());
    assert_eq!(&full[..head.len()], &head[..]);
    assert!(text(&head)
        .ends_with("Content-Length: 4\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"));
}

// ---------------------------------------------------------------- parse_request

#[test]
fn request_fields_and_body() {
    let buf = b"POST /api/users/u1/send?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 5\r\nX-API-Key: k1\r\nAuthorization: apikey k1\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\nhello";
    let (r, used) = complete(buf);
    assert_eq!(used, buf.len());
    assert_eq!(
        (r.method, r.path, r.query),
        ("POST", "/api/users/u1/send", Some("x=1"))
    );
    assert_eq!(r.version, Version::Http11);
    assert_eq!(r.content_type, Some("application/json"));
    assert_eq!((r.content_length, r.body), (Some(5), &b"hello"[..]));
    assert_eq!(
        (r.api_key, r.authorization),
        (Some("k1"), Some("apikey k1"))
    );
    assert_eq!(r.origin, Some("https://a.example"));
    assert_eq!(r.ac_request_method, Some("POST"));
    assert_eq!(r.ac_request_headers, Some("content-type"));
    assert!(r.keep_alive && !r.is_head());
    // No Content-Length: no body.
    let (r, used) = complete(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!((r.content_length, r.body, used), (None, &b""[..], 18));
    let (r, _) = complete(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.content_length, Some(0));
    // Non-UTF-8 ordinary header values are ignored, as before.
    let (r, _) = complete(b"GET / HTTP/1.1\r\nOrigin: \xff\r\n\r\n");
    assert_eq!(r.origin, None);
}

#[test]
fn partial_until_head_and_body_are_here() {
    let buf = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
    for n in 0..buf.len() {
        assert!(
            matches!(parse_request(&buf[..n], HEAD, BODY), Parsed::Partial),
            "at {n}"
        );
    }
    assert!(matches!(
        parse_request(buf, HEAD, BODY),
        Parsed::Complete(_, 44)
    ));
}

#[test]
fn pipelined_requests_are_split_at_used() {
    let buf = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n\x81\x05";
    let (r, used) = complete(buf);
    assert_eq!((r.path, r.body), ("/a", &b"abc"[..]));
    let (r, used2) = complete(&buf[used..]);
    assert_eq!(r.path, "/b");
    // What follows a non-upgrade request is the next request, never frames: here garbage.
    assert_eq!(error(&buf[used + used2..]), RequestError::BadRequest);
    // An upgrade's `used` ends at its head; what follows is the caller's to take as frames.
    let mut up = UPGRADE.to_vec();
    up.extend_from_slice(b"\x81\x05");
    assert_eq!(complete(&up).1, UPGRADE.len());
}

#[test]
fn keep_alive_per_rfc9112() {
    let ka = |b: &[u8]| complete(b).0.keep_alive;
    assert!(ka(b"GET / HTTP/1.1\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    assert!(!ka(
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(
        complete(b"GET / HTTP/1.0\r\n\r\n").0.version,
        Version::Http10
    );
}

#[test]
fn head_limits_431() {
    let buf = b"GET / HTTP/1.1\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    assert!(matches!(
        parse_request(buf, buf.len(), 0),
        Parsed::Complete(_, _)
    ));
    assert!(matches!(
        parse_request(buf, buf.len() - 1, 0),
        Parsed::Error(RequestError::HeadTooLarge)
    ));
    // Partial but already over the limit.
    assert!(matches!(
        parse_request(&buf[..30], 29, 0),
        Parsed::Error(RequestError::HeadTooLarge)
    ));
    assert!(matches!(parse_request(&buf[..30], 30, 0), Parsed::Partial));
    // Too many headers.
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..=crate::limits::HTTP_HEADERS_MAX {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(error(&many), RequestError::HeadTooLarge);
}

#[test]
fn bad_requests_400() {
    for bad in [
        &b"\x16\x03\x01garbage\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ] {
        assert_eq!(error(bad), RequestError::BadRequest, "{:?}", text(bad));
    }
}

#[test]
fn body_limit_413_before_the_body() {
    let at = |cl: &str| {
        let buf = format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
        match parse_request(buf.as_bytes(), HEAD, BODY) {
            Parsed::Error(e) => Some(e),
            Parsed::Partial => None,
            Parsed::Complete(..) => panic!("no body sent"),
        }
    };
    assert_eq!(
        at(&BODY.to_string()),
        None,
        "at the limit: wait for the body"
    );
    assert_eq!(
        at(&(BODY + 1).to_string()),
        Some(RequestError::BodyTooLarge)
    );
    assert_eq!(
        at("99999999999999999999999999"),
        Some(RequestError::BodyTooLarge)
    );
    // No overflow with the largest limits.
    let buf = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", usize::MAX);
    assert!(matches!(
        parse_request(buf.as_bytes(), usize::MAX, usize::MAX),
        Parsed::Error(RequestError::BodyTooLarge)
    ));
}

#[test]
fn content_length_must_be_one_number_400() {
    for cl in ["-1", "+5", "5, 5", "0x10", "", "5 5", "1e3"] {
        let buf = format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
        assert_eq!(
            error(buf.as_bytes()),
            RequestError::BadContentLength,
            "{cl:?}"
        );
    }
    assert_eq!(
        error(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        RequestError::BadContentLength
    );
    assert_eq!(
        error(b"POST / HTTP/1.1\r\nContent-Length: \xff\r\n\r\n"),
        RequestError::BadContentLength
    );
    let (r, _) = complete(b"POST / HTTP/1.1\r\ncontent-length:  2 \r\n\r\nab");
    assert_eq!(r.body, b"ab");
}

#[test]
fn transfer_encoding_411_and_501() {
    for te in ["chunked", "Chunked", "gzip, chunked", "chunked, gzip"] {
        let buf = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n");
        assert_eq!(error(buf.as_bytes()), RequestError::ChunkedRefused, "{te}");
    }
    // Judged before Content-Length (a smuggling pair).
    assert_eq!(
        error(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
        RequestError::ChunkedRefused
    );
    for te in ["gzip", "identity", "\u{e9}"] {
        let buf = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n");
        assert_eq!(
            error(buf.as_bytes()),
            RequestError::UnknownTransferEncoding,
            "{te}"
        );
    }
    assert_eq!(
        error(b"POST / HTTP/1.1\r\nTransfer-Encoding: \xff\r\n\r\n"),
        RequestError::UnknownTransferEncoding
    );
}

#[test]
fn request_errors_answer_and_close() {
    let all = [
        (RequestError::BadRequest, 400),
        (RequestError::HeadTooLarge, 431),
        (RequestError::BodyTooLarge, 413),
        (RequestError::ChunkedRefused, 411),
        (RequestError::BadContentLength, 400),
        (RequestError::UnknownTransferEncoding, 501),
    ];
    for (e, status) in all {
        assert_eq!(e.status().0, status);
        let r = e.response();
        let r = text(&r);
        assert!(r.starts_with(&format!("HTTP/1.1 {status} {}\r\n", e.status().reason())));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with(&format!("{{\"error\":\"{}\"}}", e.text())));
    }
    assert!(text(&RequestError::ChunkedRefused.response()).contains("length required"));
}

// ---------------------------------------------------------------- responses

#[test]
fn every_status_has_its_reason() {
    let want = [
        (200, "OK"),
        (201, "Created"),
        (202, "Accepted"),
        (204, "No Content"),
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "Not Found"),
        (405, "Method Not Allowed"),
        (411, "Length Required"),
        (413, "Content Too Large"),
        (415, "Unsupported Media Type"),
        (426, "Upgrade Required"),
        (429, "Too Many Requests"),
        (431, "Request Header Fields Too Large"),
        (500, "Internal Server Error"),
        (501, "Not Implemented"),
        (503, "Service Unavailable"),
        (599, "Error"),
    ];
    for (code, reason) in want {
        assert_eq!(Status(code).reason(), reason);
    }
}

#[test]
fn builder_keep_alive_allow_cors_head() {
    let mut r = Response::new(Status::METHOD_NOT_ALLOWED, "application/json", b"{}");
    r.keep_alive = true;
    r.allow = Some("GET, HEAD");
    r.cors = CorsHeaders::Origin("https://a.example");
    assert_eq!(
        text(&r.to_vec()),
        "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 2\r\nCache-Control: no-store\r\nAllow: GET, HEAD\r\nAccess-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\nConnection: keep-alive\r\n\r\n{}"
    );
    r.head_request = true;
    assert!(text(&r.to_vec()).ends_with("Content-Length: 2\r\nCache-Control: no-store\r\nAllow: GET, HEAD\r\nAccess-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\nConnection: keep-alive\r\n\r\n"));
    // 204: no Content-Length, no Content-Type, no body (RFC 9110 8.6).
    let r = Response::new(Status::NO_CONTENT, "application/json", b"ignored");
    assert_eq!(
        text(&r.to_vec()),
        "HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    );
    // Empty content type: omitted. encode appends.
    let mut out = b"x".to_vec();
    Response::new(Status::CREATED, "", b"").encode(&mut out);
    assert_eq!(
        text(&out),
        "xHTTP/1.1 201 Created\r\nContent-Length: 0\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    );
}

// ---------------------------------------------------------------- CORS

fn preflight_req(origin: Option<&'static str>) -> Request<'static> {
    Request {
        method: "OPTIONS",
        path: "/api/x",
        origin,
        ac_request_method: Some("POST"),
        ..Request::default()
    }
}

#[test]
fn cors_off_when_the_list_is_empty() {
    let cors = Cors::new::<&str>(&[]).unwrap();
    assert!(!cors.enabled());
    assert_eq!(cors.headers(Some("https://a.example")), CorsHeaders::Off);
    assert_eq!(
        cors.preflight(&preflight_req(Some("https://a.example"))),
        Preflight::NotPreflight
    );
    assert_eq!(
        cors.preflight_response(&preflight_req(Some("https://a.example")), true),
        None
    );
}

#[test]
fn cors_listed_origins() {
    let cors = Cors::new(&["https://a.example", " https://b.example "]).unwrap();
    assert!(cors.enabled());
    assert_eq!(
        cors.headers(Some("https://A.example")),
        CorsHeaders::Origin("https://A.example")
    );
    assert_eq!(
        cors.headers(Some("https://b.example")),
        CorsHeaders::Origin("https://b.example")
    );
    assert_eq!(cors.headers(Some("https://evil.example")), CorsHeaders::Off);
    assert_eq!(cors.headers(Some("")), CorsHeaders::Off);
    assert_eq!(cors.headers(None), CorsHeaders::Off);

    let ok = cors
        .preflight_response(&preflight_req(Some("https://a.example")), true)
        .unwrap();
    assert_eq!(
        text(&ok),
        "HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\nAccess-Control-Allow-Methods: GET, POST, PUT, DELETE, OPTIONS\r\nAccess-Control-Allow-Headers: Authorization, Content-Type, X-API-Key, X-User-Id\r\nAccess-Control-Max-Age: 600\r\nConnection: keep-alive\r\n\r\n"
    );
    let refused = cors
        .preflight_response(&preflight_req(Some("https://evil.example")), false)
        .unwrap();
    let refused = text(&refused);
    assert!(refused.starts_with("HTTP/1.1 403 Forbidden\r\n"));
    assert!(!refused.contains("Access-Control"));
    assert!(refused.ends_with("{\"error\":\"origin not allowed\"}"));
    // Not preflights: no Origin, no Access-Control-Request-Method, not OPTIONS.
    assert_eq!(
        cors.preflight(&preflight_req(None)),
        Preflight::NotPreflight
    );
    let mut r = preflight_req(Some("https://a.example"));
    r.ac_request_method = None;
    assert_eq!(cors.preflight(&r), Preflight::NotPreflight);
    r.ac_request_method = Some("POST");
    r.method = "POST";
    assert_eq!(cors.preflight(&r), Preflight::NotPreflight);
}

#[test]
fn cors_any_origin_echoes_it() {
    let cors = Cors::new(&["*"]).unwrap();
    assert_eq!(
        cors.headers(Some("https://z.example")),
        CorsHeaders::Origin("https://z.example")
    );
    assert_eq!(
        cors.preflight(&preflight_req(Some("https://z.example"))),
        Preflight::Allowed(CorsHeaders::Preflight("https://z.example"))
    );
}

#[test]
fn cors_config_errors() {
    assert!(Cors::new(&["https://a.example", ""])
        .unwrap_err()
        .contains("empty origin"));
    let many: Vec<String> = (0..=crate::limits::HTTP_CORS_ORIGINS_MAX)
        .map(|i| format!("https://{i}.example"))
        .collect();
    assert!(Cors::new(&many).unwrap_err().contains("at most"));
}

// ---------------------------------------------------------------- API key

fn with_keys(
    api_key: Option<&'static str>,
    authorization: Option<&'static str>,
) -> Request<'static> {
    Request {
        api_key,
        authorization,
        ..Request::default()
    }
}

#[test]
fn api_key_sources() {
    let k = "s3cret-key";
    assert!(api_key_ok(&with_keys(Some(k), None), k));
    assert!(api_key_ok(&with_keys(None, Some("apikey s3cret-key")), k));
    assert!(api_key_ok(
        &with_keys(None, Some("ApiKey   s3cret-key ")),
        k
    ));
    assert!(api_key_ok(
        &with_keys(Some(k), Some("APIKEY s3cret-key")),
        k
    ));
    // Wrong, missing, or a Bearer token (a user's JWT, not an API key).
    assert!(!api_key_ok(&with_keys(Some("s3cret-kez"), None), k));
    assert!(!api_key_ok(&with_keys(Some("s3cret-key2"), None), k));
    assert!(!api_key_ok(&with_keys(Some("s3cret"), None), k));
    assert!(!api_key_ok(&with_keys(None, None), k));
    assert!(!api_key_ok(&with_keys(None, Some("Bearer s3cret-key")), k));
    assert!(!api_key_ok(&with_keys(None, Some("apikey")), k));
    assert!(!api_key_ok(&with_keys(None, Some("apikey ")), k));
    assert!(!api_key_ok(&with_keys(None, Some("apikeys3cret-key")), k));
    // Both presented and one wrong: refused.
    assert!(!api_key_ok(&with_keys(Some(k), Some("apikey other")), k));
    assert!(!api_key_ok(
        &with_keys(Some("other"), Some("apikey s3cret-key")),
        k
    ));
    // A Bearer beside a right X-API-Key does not spoil it.
    assert!(api_key_ok(&with_keys(Some(k), Some("Bearer eyJ...")), k));
    // Not configured: nothing matches, not even an empty key.
    assert!(!api_key_ok(&with_keys(Some(""), None), ""));
    // Over the bound: refused unread.
    let long: &'static str = Box::leak(
        "k".repeat(crate::limits::HTTP_API_KEY_BYTES_MAX + 1)
            .into_boxed_str(),
    );
    assert!(!api_key_ok(&with_keys(Some(long), None), long));
    // Parsed from a real head.
    let (r, _) = complete(b"GET / HTTP/1.1\r\nx-api-key: s3cret-key\r\n\r\n");
    assert!(api_key_ok(&r, k));
}

#[test]
fn ct_eq_matches_plain_eq() {
    let cases: [(&[u8], &[u8]); 8] = [
        (b"", b""),
        (b"a", b""),
        (b"", b"a"),
        (b"abc", b"abc"),
        (b"abc", b"abd"),
        (b"abcabc", b"abc"),
        (b"ab", b"abc"),
        (b"\x00", b"\x00\x00"),
    ];
    for (a, b) in cases {
        assert_eq!(ct_eq(a, b), a == b, "{a:?} {b:?}");
    }
}

// ---------------------------------------------------------------- router

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum R {
    Send,
    Get,
    Put,
    Pair,
    Health,
}

const TABLE: &[RouteSpec<R>] = &[
    ("POST /api/users/{id}/send", R::Send),
    ("GET /api/users/{id}", R::Get),
    ("PUT /api/users/{id}", R::Put),
    ("GET /api/rooms/{room}/members/{user}", R::Pair),
    ("GET /health", R::Health),
];

#[test]
fn router_table_is_valid() {
    check_table(TABLE).unwrap();
    assert!(check_table(&[("GET/x", R::Get)]).is_err());
    assert!(check_table(&[("GET x", R::Get)]).is_err());
    assert!(check_table(&[("GET /x", R::Get), ("GET /x", R::Put)]).is_err());
    assert!(check_table(&[("GET /{a}/{b}/{c}/{d}/{e}", R::Get)]).is_err());
}

#[test]
fn router_matches_and_captures() {
    let Routed::Found(r, p) = route(TABLE, "POST", "/api/users/u%201/send") else {
        panic!()
    };
    assert_eq!(
        (r, p.len(), p.get(0), p.get(1)),
        (R::Send, 1, Some("u 1"), None)
    );
    let Routed::Found(r, p) = route(TABLE, "GET", "/api/rooms/lobby/members/bob") else {
        panic!()
    };
    assert_eq!(
        (r, p.get(0), p.get(1)),
        (R::Pair, Some("lobby"), Some("bob"))
    );
    let Routed::Found(r, p) = route(TABLE, "HEAD", "/health") else {
        panic!()
    };
    assert!(r == R::Health && p.is_empty());
    // %2F decodes inside a capture; it does not split segments.
    let Routed::Found(_, p) = route(TABLE, "GET", "/api/users/a%2Fb") else {
        panic!()
    };
    assert_eq!(p.get(0), Some("a/b"));
}

#[test]
fn router_404_405_400() {
    assert_eq!(route(TABLE, "GET", "/nope"), Routed::NotFound);
    assert_eq!(route(TABLE, "GET", "/api/users//send"), Routed::NotFound);
    assert_eq!(route(TABLE, "GET", "/api/users/"), Routed::NotFound);
    assert_eq!(route(TABLE, "GET", "/health/"), Routed::NotFound);
    assert_eq!(
        route(TABLE, "POST", "/api/users/u1/send/x"),
        Routed::NotFound
    );
    assert_eq!(
        route(TABLE, "DELETE", "/api/users/u1"),
        Routed::MethodNotAllowed("GET, HEAD, PUT".into())
    );
    assert_eq!(
        route(TABLE, "GET", "/api/users/u1/send"),
        Routed::MethodNotAllowed("POST".into())
    );
    assert_eq!(
        route(TABLE, "POST", "/api/users/%zz/send"),
        Routed::BadRequest("bad percent-encoding in path")
    );
    assert_eq!(
        route(TABLE, "POST", "/api/users/%ff/send"),
        Routed::BadRequest("path segment is not UTF-8")
    );
    assert_eq!(
        route(TABLE, "POST", "/api/users/%4/send"),
        Routed::BadRequest("bad percent-encoding in path")
    );
    // A bad capture on the wrong method is still 405.
    assert_eq!(
        route(TABLE, "GET", "/api/users/%zz/send"),
        Routed::MethodNotAllowed("POST".into())
    );
}

#[test]
fn percent_decode_bounds() {
    let max = crate::limits::HTTP_PATH_PARAM_BYTES_MAX;
    assert!(percent_decode(&"a".repeat(max)).is_ok());
    assert_eq!(
        percent_decode(&"a".repeat(max + 1)),
        Err("path segment too long")
    );
    assert_eq!(
        percent_decode(&"%41".repeat(max)).as_deref(),
        Ok("A".repeat(max).as_str())
    );
    assert_eq!(
        percent_decode(&"%41".repeat(max + 1)),
        Err("path segment too long")
    );
    assert_eq!(
        percent_decode(&format!("{}%41", "a".repeat(max))),
        Err("path segment too long")
    );
    assert!(matches!(
        percent_decode("plain"),
        Ok(std::borrow::Cow::Borrowed("plain"))
    ));
    assert_eq!(percent_decode("%e2%82%AC").as_deref(), Ok("\u{20ac}"));
    assert_eq!(percent_decode("%"), Err("bad percent-encoding in path"));
}

#[test]
fn debug_redacts_secrets() {
    let buf = b"POST /ws?token=tok-secret HTTP/1.1\r\nAuthorization: Bearer jwt-secret\r\nX-API-Key: key-secret\r\nSec-WebSocket-Protocol: bearer.proto-secret\r\nContent-Length: 11\r\n\r\nbody-secret";
    let (r, _) = complete(buf);
    let shown = format!("{:?}", parse_request(buf, HEAD, BODY)) + &format!("{r:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("<redacted>") && shown.contains("body_len: 11"));
}

#[test]
fn trace_headers_are_kept_for_the_tracer() {
    let req = b"POST /api/publish HTTP/1.1\r\nHost: h\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-B3-TraceId: a3ce929d0e0e4736\r\nX-B3-SpanId: 00f067aa0ba902b7\r\nb3: 1\r\nX-B3-Sampled: 1\r\nX-B3-Flags: 0\r\nContent-Length: 0\r\n\r\n";
    let (r, _) = complete(req);
    assert_eq!(
        r.trace.traceparent,
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(r.trace.b3, Some("1"));
    assert_eq!(r.trace.b3_trace_id, Some("a3ce929d0e0e4736"));
    assert_eq!(r.trace.b3_span_id, Some("00f067aa0ba902b7"));
    assert_eq!(r.trace.b3_sampled, Some("1"));
    assert_eq!(r.trace.b3_flags, Some("0"));
    assert!(matches!(
        r.trace.parse(),
        Some(crate::trace::Incoming::Parent {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            sampled: Some(true),
            ..
        })
    ));
    let (plain, _) = complete(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(plain.trace.parse(), None);
}
