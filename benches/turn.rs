//! One shard loop turn, driven from memory: K masked `publish` frames from one client arrive
//! in the shard's read buffer; each is decoded and unmasked, checked as UTF-8, parsed, routed
//! to its room, encoded once and queued for every member; then the flush plan gathers each
//! dirty member's queued frames into the iovecs one `sendmsg` would take, and the queues are
//! popped as if the kernel took everything. These are the library calls `Shard` makes, in its
//! order, minus the system calls (the shard's own loop is tied to mio sockets, so the bench
//! composes the same sans-IO parts instead of running it). The naive baseline does what a
//! straightforward server does: a `serde_json::Value` per command, a frame encoded per
//! recipient, and one owned buffer per queued frame, copied again into the write buffer.
//!
//! Run: `cargo bench --bench turn`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::io::IoSlice;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::proto::envelope::{parse_as, parse_head, raw_or_null, Frame, FrameBuilder};
use switchboard::proto::ws::{self, decode_frame, Decoded};
use switchboard::route::RoomTable;

/// The rooms service's own fields of a `publish` (the shard parses the head, then these).
#[derive(serde::Deserialize)]
struct RoomCmd<'a> {
    #[serde(borrow, default)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<sonic_rs::LazyValue<'a>>,
}

/// Publishes arriving in one turn.
const PUBLISHES_PER_TURN: usize = 4;
/// Same cap as the shard's `IOVECS_PER_WRITE_MAX`.
const IOVECS_MAX: usize = 64;
const MAX_PAYLOAD: usize = 64 * 1024;

/// K client frames (masked, as a browser sends them) back to back.
fn inbound(k: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..k {
        let json = format!(
            r#"{{"type":"publish","room":"chat","data":{{"message":"Hello, this is a 64-byte payload for the bench!!","n":{n}}}}}"#
        );
        let payload = json.as_bytes();
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.push(0x80 | ws::opcode::TEXT);
        assert!(payload.len() < 126);
        out.push(0x80 | payload.len() as u8);
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    out
}

struct Members {
    rooms: RoomTable,
    queues: Vec<VecDeque<Frame>>,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
}

impl Members {
    fn new(m: usize) -> Members {
        let mut rooms = RoomTable::default();
        let name: Arc<str> = Arc::from("chat");
        for slot in 0..m as u32 {
            rooms.join(&name, slot);
        }
        Members {
            rooms,
            queues: (0..m).map(|_| VecDeque::with_capacity(8)).collect(),
            dirty: Vec::with_capacity(m),
            is_dirty: vec![false; m],
        }
    }
}

/// The shard's path: decode in place, validate, parse borrowed, encode once, Arc per member,
/// gather iovecs per dirty member.
fn turn_switchboard(
    wire: &[u8],
    rbuf: &mut Vec<u8>,
    fb: &mut FrameBuilder,
    st: &mut Members,
) -> usize {
    rbuf.clear();
    rbuf.extend_from_slice(wire); // what recv() would have copied
    let mut at = 0;
    let mut now_us = 1;
    while at < rbuf.len() {
        let Ok(Decoded::Frame {
            opcode,
            payload,
            consumed,
            ..
        }) = decode_frame(&mut rbuf[at..], MAX_PAYLOAD)
        else {
            panic!("bad frame");
        };
        let text = &rbuf[at + payload.start..at + payload.end];
        assert_eq!(opcode, ws::opcode::TEXT);
        assert!(std::str::from_utf8(text).is_ok());
        let _head = parse_head(text).expect("publish");
        let cmd: RoomCmd = parse_as(text).expect("publish");
        let room = cmd.room.as_deref().expect("room");
        let rid = st.rooms.lookup(room).expect("room exists");
        now_us += 1;
        let f = fb.text(now_us, |o| {
            o.str("type", "message")
                .str("room", room)
                .raw("data", raw_or_null(&cmd.data))
                .uuid("client_id", 7)
                .u64("timestamp", 1_795_323_906_789);
        });
        for &slot in st.rooms.members(rid) {
            st.queues[slot as usize].push_back(f.clone());
            if !st.is_dirty[slot as usize] {
                st.is_dirty[slot as usize] = true;
                st.dirty.push(slot);
            }
        }
        at += consumed;
    }
    let mut bytes = 0;
    for &slot in &st.dirty {
        let q = &mut st.queues[slot as usize];
        let mut iov: [IoSlice; IOVECS_MAX] = [IoSlice::new(&[]); IOVECS_MAX];
        let mut n = 0;
        for f in q.iter().take(IOVECS_MAX) {
            iov[n] = IoSlice::new(f.wire());
            n += 1;
        }
        bytes += black_box(&iov[..n]).iter().map(|s| s.len()).sum::<usize>();
        q.clear();
        st.is_dirty[slot as usize] = false;
    }
    st.dirty.clear();
    bytes
}

/// The naive path: serde_json Value per command, one encoded frame per recipient, owned
/// buffers, copied into a write buffer per member.
fn turn_naive(
    wire: &[u8],
    rbuf: &mut Vec<u8>,
    queues: &mut [Vec<Vec<u8>>],
    members: &[u32],
    wbuf: &mut Vec<u8>,
) -> usize {
    rbuf.clear();
    rbuf.extend_from_slice(wire);
    let mut at = 0;
    while at < rbuf.len() {
        let len = (rbuf[at + 1] & 0x7f) as usize;
        let mask = [rbuf[at + 2], rbuf[at + 3], rbuf[at + 4], rbuf[at + 5]];
        let payload: Vec<u8> = rbuf[at + 6..at + 6 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        let text = String::from_utf8(payload).expect("utf8");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let room = v["room"].as_str().expect("room").to_owned();
        for &slot in members {
            let msg = serde_json::json!({
                "type": "message",
                "room": room,
                "data": v["data"],
                "client_id": "00000000-0000-0000-0000-000000000007",
                "timestamp": 1_795_323_906_789u64,
            });
            let body = serde_json::to_vec(&msg).expect("encode");
            queues[slot as usize].push(ws::frame_bytes(ws::opcode::TEXT, &body));
        }
        at += 6 + len;
    }
    let mut bytes = 0;
    for &slot in members {
        wbuf.clear();
        for f in queues[slot as usize].drain(..) {
            wbuf.extend_from_slice(&f);
        }
        bytes += black_box(&wbuf).len();
    }
    bytes
}

fn turn(c: &mut Criterion) {
    let mut g = c.benchmark_group("shard_turn_4_publishes");
    let wire = inbound(PUBLISHES_PER_TURN);
    for m in [100usize, 5_000] {
        g.throughput(Throughput::Elements((m * PUBLISHES_PER_TURN) as u64));
        let mut st = Members::new(m);
        let mut fb = FrameBuilder::default();
        let mut rbuf = Vec::with_capacity(64 * 1024);
        g.bench_with_input(BenchmarkId::new("switchboard", m), &m, |b, _| {
            b.iter(|| turn_switchboard(&wire, &mut rbuf, &mut fb, &mut st))
        });
        let members: Vec<u32> = (0..m as u32).collect();
        let mut queues: Vec<Vec<Vec<u8>>> = (0..m).map(|_| Vec::new()).collect();
        let mut wbuf = Vec::with_capacity(4096);
        // Both must do the same work: the same bytes would reach the sockets.
        let ours = turn_switchboard(&wire, &mut rbuf, &mut fb, &mut st);
        let theirs = turn_naive(&wire, &mut rbuf, &mut queues, &members, &mut wbuf);
        assert_eq!(ours, theirs, "the two turns must write the same bytes");
        assert!(ours > m * PUBLISHES_PER_TURN * 100, "{ours} bytes");
        g.bench_with_input(BenchmarkId::new("naive", m), &m, |b, _| {
            b.iter(|| turn_naive(&wire, &mut rbuf, &mut queues, &members, &mut wbuf))
        });
    }
    g.finish();
}

criterion_group!(benches, turn);
criterion_main!(benches);
