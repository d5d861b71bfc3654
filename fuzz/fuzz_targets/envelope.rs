//! Arbitrary bytes as a client command; whatever parses must re-emit valid JSON when its raw
//! `data` and `id` are copied into a server frame. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sonic_rs::JsonValueTrait;
use switchboard::proto::envelope::{parse_as, parse_head, raw_or_null, FrameBuilder};

/// The rooms service's fields of a publish.
#[derive(serde::Deserialize)]
struct RoomCmd<'a> {
    #[serde(borrow, default)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<sonic_rs::LazyValue<'a>>,
}

fuzz_target!(|data: &[u8]| {
    let Some(head) = parse_head(data) else {
        return;
    };
    if let Some(cmd) = parse_as::<RoomCmd>(data) {
        let mut b = FrameBuilder::default();
        let f = b.text(0, |o| {
            o.str("type", "message").id(head.correlation_id()).raw("data", raw_or_null(&cmd.data));
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

