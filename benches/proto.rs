//! Frame encode, unmask and envelope parse/encode, each beside a naive baseline.
//!
//! Run: `cargo bench --bench proto`. Results go to docs/BENCHMARKS.md with the machine.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::proto::envelope::{parse_as, parse_head, raw_or_null, FrameBuilder};
use switchboard::proto::ws::apply_mask;

/// The rooms service's own fields of a `publish` (the shard parses the head, then these).
#[derive(serde::Deserialize)]
struct RoomCmd<'a> {
    #[serde(borrow, default)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<sonic_rs::LazyValue<'a>>,
}

const PUBLISH: &[u8] =
    br#"{"type":"publish","room":"chat","id":42,"data":{"message":"Hello, this is a 64-byte payload for the bench!!","n":7}}"#;

fn naive_mask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

fn mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for len in [64usize, 1024, 65536] {
        let mut buf = vec![0xA5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("word_at_a_time", len), &len, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4]))
        });
        g.bench_with_input(BenchmarkId::new("naive_bytewise", len), &len, |b, _| {
            b.iter(|| naive_mask(black_box(&mut buf), [1, 2, 3, 4]))
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_message_frame");
    let data = r#"{"message":"Hello, this is a 64-byte payload for the bench!!","n":7}"#;
    let mut fb = FrameBuilder::default();
    g.bench_function("switchboard_frame_builder", |b| {
        b.iter(|| {
            fb.text(1, |o| {
                o.str("type", "message")
                    .str("room", black_box("chat"))
                    .raw("data", black_box(data))
                    .uuid("client_id", 0x0123_4567_89ab_cdef)
                    .str("user_id", "alice")
                    .u64("timestamp", 1_795_323_906_789);
            })
        })
    });
    g.bench_function("naive_serde_json_value_then_frame", |b| {
        b.iter(|| {
            let v = serde_json::json!({
                "type": "message",
                "room": black_box("chat"),
                "data": serde_json::from_str::<serde_json::Value>(black_box(data)).unwrap(),
                "client_id": uuid::Uuid::from_u128(0x0123_4567_89ab_cdef).to_string(),
                "user_id": "alice",
                "timestamp": 1_795_323_906_789u64,
            });
            let body = serde_json::to_vec(&v).unwrap();
            let mut frame = Vec::with_capacity(body.len() + 4);
            frame.push(0x81);
            frame.push(body.len() as u8);
            frame.extend_from_slice(&body);
            std::sync::Arc::<[u8]>::from(frame)
        })
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_command");
    g.throughput(Throughput::Bytes(PUBLISH.len() as u64));
    g.bench_function("sonic_rs_borrowed_lazy_data", |b| {
        b.iter(|| {
            let head = parse_head(black_box(PUBLISH)).unwrap();
            let cmd: RoomCmd = parse_as(black_box(PUBLISH)).unwrap();
            black_box((
                head.kind.is_some(),
                cmd.room.is_some(),
                raw_or_null(&cmd.data).len(),
            ))
        })
    });
    g.bench_function("serde_json_value", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(PUBLISH)).unwrap();
            black_box(serde_json::to_string(&v["data"]).unwrap().len())
        })
    });
    g.finish();
}

criterion_group!(benches, mask, encode, parse);
criterion_main!(benches);
