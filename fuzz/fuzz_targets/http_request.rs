//! Arbitrary bytes as one or more pipelined HTTP requests through `http::parse_request`, then
//! the API helpers a server would run on each. Must never panic; `used` stays in bounds and
//! always advances; a body is exactly Content-Length bytes within `body_max`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard::http::{self, Parsed};

/// Small limits so the fuzzer reaches the 431 and 413 branches.
const HEAD_MAX: usize = 512;
const BODY_MAX: usize = 64;

const ROUTES: &[http::RouteSpec<u8>] = &[
    ("POST /api/users/{id}/send", 0),
    ("GET /api/users/{id}", 1),
    ("DELETE /api/rooms/{room}/members/{user}", 2),
];

fuzz_target!(|data: &[u8]| {
    let cors = http::Cors::new(&["https://a.example"]).expect("static origins");
    let mut rest = data;
    // At most one request per input byte: `used` is never 0 on Complete.
    for _ in 0..=data.len() {
        match http::parse_request(rest, HEAD_MAX, BODY_MAX) {
            Parsed::Partial => break,
            Parsed::Error(e) => {
                let _ = e.response();
                break;
            }
            Parsed::Complete(req, used) => {
                assert!(used > 0 && used <= rest.len());
                assert!(req.body.len() <= BODY_MAX);
                assert_eq!(req.body.len(), req.content_length.unwrap_or(0));
                let _ = req.upgrade_key();
                let _ = http::api_key_ok(&req, "k");
                let _ = cors.preflight_response(&req, req.keep_alive);
                let _ = cors.headers(req.origin);
                if let http::Routed::MethodNotAllowed(allow) =
                    http::route(ROUTES, req.method, req.path)
                {
                    let mut r = http::Response::new(http::Status::METHOD_NOT_ALLOWED, "", b"");
                    r.allow = Some(&allow);
                    let _ = r.to_vec();
                }
                rest = &rest[used..];
            }
        }
    }
});
