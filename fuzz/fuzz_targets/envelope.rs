//! Arbitrary bytes as a client command; whatever parses must re-emit valid JSON when its raw
//! `data` and `id` are copied into a server frame. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sonic_rs::JsonValueTrait;
use switchboard::proto::envelope::{parse_command, FrameBuilder};

fuzz_target!(|data: &[u8]| {
    if let Some(cmd) = parse_command(data) {
        let mut b = FrameBuilder::default();
        let f = b.text(0, |o| {
            o.str("type", "message").id(cmd.correlation_id()).raw("data", cmd.data_raw());
            if let Some(room) = cmd.room.as_deref() {
                o.str("room", room);
            }
        });
        let wire = f.wire();
        let off = match wire[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        // The frame must still be one valid JSON object.
        assert!(sonic_rs::from_slice::<sonic_rs::Value>(&wire[off..]).is_ok_and(|v| v.is_object()));
    }
});

