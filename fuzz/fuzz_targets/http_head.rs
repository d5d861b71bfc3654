//! Arbitrary bytes as an HTTP upgrade request head. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard::proto::http::{offers_protocol, parse_request, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Parsed::Complete(head, used) = parse_request(data) {
        assert!(used <= data.len());
        let _ = head.upgrade_key();
        let _ = offers_protocol(head.ws_protocols, "switchboard");
        if let Some(q) = head.query {
            let _ = switchboard::auth::query_param(q, "token");
        }
    }
});
