//! The fan-out plan: one room publish to N local subscribers. Switchboard encodes the frame
//! once and queues an `Arc` clone per member (what `Shard::deliver_local` does for a room); the naive
//! baseline encodes a frame per recipient, as servers without shared buffers do.
//!
//! Run: `cargo bench --bench fanout`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::proto::envelope::{Frame, FrameBuilder};
use switchboard::route::RoomTable;

const DATA: &str = r#"{"message":"Hello, this is a 64-byte payload for the bench!!","n":7}"#;

fn encode(fb: &mut FrameBuilder) -> Frame {
    fb.text(1, |o| {
        o.str("type", "message")
            .str("room", "chat")
            .raw("data", DATA)
            .uuid("client_id", 7)
            .u64("timestamp", 1_795_323_906_789);
    })
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_plan");
    for n in [1usize, 100, 5_000, 100_000] {
        let mut rooms = RoomTable::default();
        let name: Arc<str> = Arc::from("chat");
        for slot in 0..n as u32 {
            rooms.join(&name, slot);
        }
        let id = rooms.lookup("chat").unwrap();
        let mut queues: Vec<VecDeque<Frame>> = (0..n).map(|_| VecDeque::with_capacity(4)).collect();
        let mut fb = FrameBuilder::default();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("encode_once_arc_per_member", n),
            &n,
            |b, _| {
                b.iter(|| {
                    let f = encode(&mut fb);
                    for &slot in rooms.members(id) {
                        queues[slot as usize].push_back(f.clone());
                    }
                    for q in queues.iter_mut() {
                        q.clear();
                    }
                })
            },
        );
        if n <= 5_000 {
            g.bench_with_input(
                BenchmarkId::new("naive_encode_per_member", n),
                &n,
                |b, _| {
                    b.iter(|| {
                        for &slot in rooms.members(id) {
                            queues[slot as usize].push_back(encode(&mut fb));
                        }
                        for q in queues.iter_mut() {
                            q.clear();
                        }
                    })
                },
            );
        }
        black_box(&queues);
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
