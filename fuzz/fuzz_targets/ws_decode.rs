//! Feed arbitrary bytes through the WebSocket decoder exactly as a shard does: decode frames,
//! fold data frames into fragmented messages, validate close payloads. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard::proto::ws::{assemble, decode_frame, opcode, parse_close, Decoded};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut rx = None;
    let max = 4096;
    let mut pos = 0;
    while pos < buf.len() {
        let held = rx.as_ref().map_or(0, |r: &Box<switchboard::proto::ws::RxState>| r.fragments.len());
        match decode_frame(&mut buf[pos..], max - held.min(max)) {
            Err(_) | Ok(Decoded::NeedMore) => break,
            Ok(Decoded::Frame { fin, opcode: op, payload, consumed }) => {
                let p = &buf[pos + payload.start..pos + payload.end];
                pos += consumed;
                match op {
                    opcode::CLOSE => {
                        let _ = parse_close(p);
                    }
                    opcode::PING | opcode::PONG => {}
                    _ => {
                        if assemble(&mut rx, fin, op, p, max).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
});
