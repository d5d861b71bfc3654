//! HTTP/1.1 for the server's endpoints and (next) its API, sans-IO: bytes in, a typed request
//! or a refusal out; responses out as bytes. No sockets, no clock, no config lookups: limits
//! are arguments, and what to serve is the caller's (the shard's) decision.
//!
//! Owns: request framing ([`parse_request`]: head, Content-Length bodies, keep-alive,
//! pipelining), responses ([`Response`], [`Status`]), CORS ([`Cors`]), the API-key check
//! ([`api_key_ok`]) and a static [`route`] table. Must not touch: sockets, the shard's state,
//! logging (requests carry tokens and keys).
//!
//! Decisions:
//! - Bodies are framed by Content-Length only. `Transfer-Encoding: chunked` is refused with
//!   411 "length required" (decoding chunks buys nothing for small API calls and is where
//!   request smuggling lives); any other Transfer-Encoding is 501. A Content-Length over the
//!   caller's `body_max` is refused with 413 as soon as the head arrives.
//! - The bytes after a request's `used` belong to the next request (pipelining). They are
//!   WebSocket frames only when the request was an upgrade that the caller accepted.
//! - After any [`RequestError`] the connection closes: the next request's start is unknown.
//!
//! The shard's original entry points keep their names and bytes (`proto::http` re-exports
//! them): [`parse_head`] (as `proto::http::parse_request`), [`HeadParsed`] (as `Parsed`),
//! [`RequestHead`], [`response`], [`json_error`], [`head_only`], [`switching_protocols`],
//! [`offers_protocol`]. The upgrade accept key comes from tungstenite's `derive_accept_key`.

mod apikey;
mod cors;
mod request;
mod response;
mod router;

pub use apikey::{api_key_ok, ct_eq};
pub use cors::{Cors, Preflight, ALLOW_HEADERS, ALLOW_METHODS};
pub use request::{
    parse_head, parse_request, HeadParsed, Parsed, Request, RequestError, RequestHead, Version,
};
pub use response::{
    head_only, json_error, json_error_body, response, switching_protocols, CorsHeaders, Response,
    Status,
};
pub use router::{check_table, percent_decode, route, Params, RouteSpec, Routed};

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

#[cfg(test)]
mod tests;
