//! Memory per stored history message, measured with a counting allocator (not timed): a room
//! with history keeps N message frames of a realistic size; the heap bytes the store holds
//! per message, beside the frame's own wire size. Also the time to append and to replay.
//!
//!     cargo bench --bench history
//!
//! Result on the project's VM (docs/BENCHMARKS.md): see the printed table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use switchboard::proto::FrameBuilder;
use switchboard::shard::service::history::Store;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    const N: u64 = 100_000;
    let mut fb = FrameBuilder::default();
    let room: Arc<str> = Arc::from("chat-1");
    // A chat message as a client publish makes it: ~170 bytes of JSON.
    let frame = |fb: &mut FrameBuilder, n: u64| {
        fb.text(n, |o| {
            o.str("type", "message")
                .str("room", "chat-1")
                .raw(
                    "data",
                    r#"{"text":"a chat message of about sixty bytes, like most are"}"#,
                )
                .uuid("client_id", 0x4d81_9f02_b68d_4658_b25e_892a_ff15_0174)
                .str("user_id", "alice")
                .u64("offset", n)
                .u64("timestamp", 1_796_159_102_663);
        })
    };
    let wire = frame(&mut fb, 1).wire().len();
    let mut store = Store::new(usize::MAX);
    let before = LIVE.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for n in 1..=N {
        let (offset, _) = store.next_offset(&room);
        let f = frame(&mut fb, n);
        store.append(&room, offset, 1_000, f, N as u32, 0);
    }
    let append_ns = t0.elapsed().as_nanos() as f64 / N as f64;
    let held = LIVE.load(Ordering::Relaxed) - before;
    let epoch = store.position(&room).epoch;
    let t0 = Instant::now();
    let r = store.since(&room, N - 100, &epoch, N as u32, 0, 1_000);
    let replay_ns = t0.elapsed().as_nanos() as f64 / 100.0;
    assert!(r.recovered && r.frames.len() == 100);
    let per = held as f64 / N as f64;
    println!("history: {N} messages of {wire} wire bytes in one room");
    println!(
        "  heap held per stored message: {per:.0} B ({:.0} B beyond the wire bytes; the store's estimate is wire + {})",
        per - wire as f64,
        switchboard::shard::service::history::ENTRY_OVERHEAD_BYTES
    );
    println!(
        "  store accounting per message: {:.0} B",
        store.bytes() as f64 / N as f64
    );
    println!("  append: {append_ns:.0} ns/message (encode included); replay of 100: {replay_ns:.0} ns/message");
}
