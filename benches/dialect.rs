//! What a dialect costs per frame: `dialect::encode` of the events every dialect carries (a
//! direct message's `message.create`, a typing indicator, a room message), for each dialect,
//! beside a native frame's clone (what a native recipient costs the fan-out loop). An encode
//! runs once per dialect per frame per shard, whatever the number of recipients.
//!
//! Run: `cargo bench --bench dialect`. Results go to docs/BENCHMARKS.md with the machine.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchboard::dialect::{encode, Dialect};
use switchboard::proto::Frame;

const CREATE: &[u8] = br#"{"type":"message.create","data":{"eventId":"01a2351e-0f24-7c6c-a371-4508f82281a5","serverMsgId":"01a2351e-0f24-706c-a371-4508f82281a6","clientMsgId":"c-1","from":"5","to":"6","conversationId":"db10e5d3-7550-5919-8bef-ae4480064bd4","conversationNumericId":3,"content":"Hello, are the mockups ready for the review?","attachmentUrl":null,"sentAt":"2026-12-02T05:00:00.000Z","cursor":789,"seq":4},"timestamp":1796187600000}"#;
const TYPING: &[u8] = br#"{"type":"typing.start","data":{"user_id":"5","conversationId":"db10e5d3-7550-5919-8bef-ae4480064bd4","conversationNumericId":3},"timestamp":1796187600000}"#;
const ROOM: &[u8] = br#"{"type":"message","room":"chat","data":{"message":"Hello, this is a 64-byte payload for the bench!!","n":7},"client_id":"7d9f3c2e-1b4a-4c5d-9e8f-0a1b2c3d4e5f","timestamp":1796187600000}"#;

fn dialects(c: &mut Criterion) {
    let mut g = c.benchmark_group("dialect_encode");
    for (name, native) in [
        ("message.create", CREATE),
        ("typing.start", TYPING),
        ("room message", ROOM),
    ] {
        for d in [Dialect::Topic, Dialect::ChatHub, Dialect::Messaging] {
            g.bench_with_input(BenchmarkId::new(d.name(), name), &native, |b, n| {
                b.iter(|| encode(d, black_box(n), 1_000))
            });
        }
        let f = Frame::text_from_json(native, 1_000);
        g.bench_with_input(BenchmarkId::new("native clone", name), &f, |b, f| {
            b.iter(|| black_box(f.clone()))
        });
    }
    g.finish();
}

criterion_group!(benches, dialects);
criterion_main!(benches);
