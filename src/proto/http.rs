//! The shard's HTTP entry points, now in [`crate::http`]; re-exported under their old names so
//! `crate::proto::http::...` keeps compiling. `parse_request` here is the head-only
//! [`crate::http::parse_head`]; new code uses [`crate::http::parse_request`] (bodies, limits,
//! keep-alive).

pub use crate::http::{
    head_only, json_error, offers_protocol, parse_head as parse_request, response,
    switching_protocols, HeadParsed as Parsed, RequestHead,
};
