//! The in-memory message store (`store::memory`): heap held per stored DM, measured with a
//! counting allocator beside what the store's byte ledger counts for it; appends per second
//! into a growing and into a full (evicting) store, timed by the thread's CPU clock so other
//! processes on a shared machine do not count; then criterion: appends against a naive
//! baseline (a `Vec` and a dedup map), and a `sync` page against the naive full scan.
//!
//!     cargo bench --bench store_memory
//!
//! The DM is a realistic one: 100 bytes of content; user ids, conversation ids and
//! `clientMsgId`s of 36 bytes (UUIDs), every string a fresh `Arc` as the bridge's are, made
//! before the clock starts. The memory figure counts the bytes the allocator hands out and gets
//! back while N DMs are stored, so what remains is what the store holds. Every timing runs
//! under the same (relaxed-atomic) counting allocator, a few ns per allocation, paid by the
//! baseline too.
//!
//! Results on the project's VM: docs/BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use switchboard::store::memory::{self, MemoryStore};
use switchboard::store::{Appended, Message, NewMessage, Store};

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
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Messages per `append` (the bridge's batches are up to `APPEND_BATCH_MAX`).
const BATCH: usize = 256;

const CONTENT: &str = "a direct message of one hundred bytes, which is about what most chat messages are, give or take..";

fn uuid_str(n: u128) -> Arc<str> {
    Arc::from(uuid::Uuid::from_u128(n).hyphenated().to_string())
}

/// The users and DM threads of a workload: thread `k` is between users `2k` and `2k + 1`.
struct Population {
    users: Vec<Arc<str>>,
    threads: Vec<Arc<str>>,
}

impl Population {
    fn new(threads: usize) -> Population {
        Population {
            users: (0..2 * threads as u128)
                .map(|i| uuid_str(1 << 64 | i))
                .collect(),
            threads: (0..threads as u128)
                .map(|i| uuid_str(2 << 64 | i))
                .collect(),
        }
    }

    /// DM number `n`: in thread `n % threads`, the two users taking turns. Every string is
    /// made here, as the bridge's would be (fresh `Arc`s per message).
    fn dm(&self, n: u64) -> NewMessage {
        let k = n as usize % self.threads.len();
        let turn = (n as usize / self.threads.len()) % 2;
        let (from, to) = (&self.users[2 * k + turn], &self.users[2 * k + 1 - turn]);
        NewMessage {
            server_msg_id: uuid::Uuid::now_v7().as_u128(),
            event_id: uuid::Uuid::now_v7().as_u128(),
            thread: Arc::from(&*self.threads[k]),
            sender: Arc::from(&**from),
            to: Some(Arc::from(&**to)),
            client_msg_id: Some(uuid_str(3 << 64 | n as u128)),
            content: Arc::from(CONTENT),
            attachment_url: None,
            sent_at_ms: 1_796_159_102_663,
        }
    }

    fn batch(&self, from: u64) -> Vec<NewMessage> {
        (from..from + BATCH as u64).map(|n| self.dm(n)).collect()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
}

/// CPU time of this thread: on a shared machine it leaves out the time other processes had the
/// core (the wall clock does not).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Append `batches`, returning (wall, CPU) time.
fn append_all(
    rt: &tokio::runtime::Runtime,
    store: &MemoryStore,
    batches: &[Vec<NewMessage>],
) -> (Duration, Duration) {
    let (t0, c0) = (Instant::now(), thread_cpu());
    for batch in batches {
        let out = rt.block_on(store.append(batch)).expect("stored");
        debug_assert!(out.iter().all(|o| matches!(o, Appended::New { .. })));
    }
    (t0.elapsed(), thread_cpu() - c0)
}

fn rate(what: &str, n: u64, (wall, cpu): (Duration, Duration)) {
    println!(
        "  append, {what}: {:.0} DMs/s of CPU time ({:.0} ns per DM; wall clock {:.0} DMs/s), batches of {BATCH}",
        n as f64 / cpu.as_secs_f64(),
        cpu.as_nanos() as f64 / n as f64,
        n as f64 / wall.as_secs_f64(),
    );
}

/// Store `n` DMs over `threads` threads into an empty store; print the heap held and the
/// ledger's count per DM, and the append rate.
fn measure(rt: &tokio::runtime::Runtime, n: u64, threads: usize) {
    let pop = Population::new(threads);
    let store = MemoryStore::new(usize::MAX);
    let before = LIVE.load(Ordering::Relaxed);
    // Every string made first (fresh `Arc`s per DM, as the bridge's are), so the timing is
    // the store's alone; dropped after, so what remains is what the store holds.
    let batches: Vec<Vec<NewMessage>> = (0..n).step_by(BATCH).map(|from| pop.batch(from)).collect();
    let sent = batches.iter().map(Vec::len).sum::<usize>() as u64;
    let times = append_all(rt, &store, &batches);
    drop(batches);
    let held = LIVE.load(Ordering::Relaxed) - before;
    let per = held as f64 / sent as f64;
    let counted = store.bytes_used() as f64 / sent as f64;
    println!(
        "store_memory: {sent} DMs (100 B content, 36 B ids) over {threads} threads ({} per thread), {} users",
        sent / threads as u64,
        2 * threads
    );
    println!(
        "  heap held per DM: {per:.0} B (measured); the ledger counts {counted:.0} B ({:+.1} %)",
        (counted - per) / per * 100.0
    );
    println!(
        "  the ledger's per-DM share alone: {} B fixed + 116 content + 52 clientMsgId + {} dedup + deque slots",
        memory::MESSAGE_FIXED_BYTES,
        memory::DEDUP_ENTRY_BYTES
    );
    rate("into a store growing from empty", sent, times);
}

/// The steady state of a full store: every DM appended evicts about one.
fn measure_full(rt: &tokio::runtime::Runtime, budget: usize, n: u64) {
    let pop = Population::new(1_000);
    let store = MemoryStore::new(budget);
    let mut next = 0u64;
    while store.evicted_messages() == 0 {
        rt.block_on(store.append(&pop.batch(next))).expect("stored");
        next += BATCH as u64;
    }
    let batches: Vec<Vec<NewMessage>> = (next..next + n)
        .step_by(BATCH)
        .map(|from| pop.batch(from))
        .collect();
    let sent = batches.iter().map(Vec::len).sum::<usize>() as u64;
    let evicted = store.evicted_messages();
    let times = append_all(rt, &store, &batches);
    println!(
        "store_memory: a full store of {} MiB ({} DMs held), 1,000 threads",
        budget >> 20,
        store.stats().messages
    );
    println!(
        "  evicted while appending: {} DMs",
        store.evicted_messages() - evicted
    );
    rate("full, each DM evicting the oldest", sent, times);
}

/// The naive baseline: a `Vec` of messages and a dedup map, no thread or user index (so
/// `sync` must scan everything), and no budget: it holds at most `hold` messages, then drops
/// them all at once (keeping its tables' capacity, so it does not reallocate them).
struct Naive {
    messages: Vec<Message>,
    dedup: HashMap<(Arc<str>, Arc<str>), usize>,
    seqs: HashMap<Arc<str>, u64>,
    hold: usize,
    last_id: u64,
}

impl Naive {
    fn new(hold: usize) -> Naive {
        Naive {
            messages: Vec::new(),
            dedup: HashMap::new(),
            seqs: HashMap::new(),
            hold,
            last_id: 0,
        }
    }

    fn append(&mut self, batch: &[NewMessage]) -> Vec<Message> {
        if self.messages.len() + batch.len() > self.hold {
            self.messages.clear();
            self.dedup.clear();
        }
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            if let Some(c) = &m.client_msg_id {
                if let Some(&i) = self.dedup.get(&(m.sender.clone(), c.clone())) {
                    out.push(self.messages[i].clone());
                    continue;
                }
            }
            self.last_id += 1;
            let seq = self.seqs.entry(m.thread.clone()).or_insert(0);
            *seq += 1;
            let msg = Message {
                id: self.last_id,
                seq: *seq,
                thread: m.thread.clone(),
                thread_numeric_id: 0,
                server_msg_id: m.server_msg_id,
                event_id: m.event_id,
                sender: m.sender.clone(),
                to: m.to.clone(),
                client_msg_id: m.client_msg_id.clone(),
                content: m.content.clone(),
                attachment_url: m.attachment_url.clone(),
                sent_at_ms: m.sent_at_ms,
            };
            if let Some(c) = &m.client_msg_id {
                self.dedup
                    .insert((m.sender.clone(), c.clone()), self.messages.len());
            }
            self.messages.push(msg.clone());
            out.push(msg);
        }
        out
    }

    fn sync(&self, user: &str, since: u64, limit: usize) -> Vec<Message> {
        self.messages
            .iter()
            .filter(|m| m.id > since && (*m.sender == *user || m.to.as_deref() == Some(user)))
            .take(limit)
            .cloned()
            .collect()
    }
}

fn benches(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    // Steady state: a 64 MiB store already full, so every batch also evicts as much as it adds.
    let pop = Population::new(1_000);
    let store = MemoryStore::new(64 << 20);
    let mut next = 0u64;
    while store.evicted_messages() == 0 {
        rt.block_on(store.append(&pop.batch(next))).expect("stored");
        next += BATCH as u64;
    }
    let mut naive = Naive::new(store.stats().messages);
    for from in (0..next).step_by(BATCH) {
        naive.append(&pop.batch(from));
    }
    let mut g = c.benchmark_group("store_memory_append");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.measurement_time(Duration::from_secs(4));
    g.sample_size(30);
    let mut n = next;
    g.bench_function("memory_store_full_evicting", |b| {
        b.iter_batched(
            || {
                n += BATCH as u64;
                pop.batch(n)
            },
            |batch| black_box(rt.block_on(store.append(&batch)).expect("stored")),
            BatchSize::SmallInput,
        )
    });
    let mut n = next;
    g.bench_function("naive_vec_and_dedup_map", |b| {
        b.iter_batched(
            || {
                n += BATCH as u64;
                pop.batch(n)
            },
            |batch| black_box(naive.append(&batch)),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // One `sync` page of 50 from the middle of what a user has, in a store of ~130,000 DMs.
    let pop = Population::new(1_000);
    let store = MemoryStore::new(usize::MAX);
    let mut naive = Naive::new(usize::MAX);
    for from in (0..128_000).step_by(BATCH) {
        let batch = pop.batch(from);
        rt.block_on(store.append(&batch)).expect("stored");
        naive.append(&batch);
    }
    let user = pop.users[7].clone();
    let since = 64_000;
    let mut g = c.benchmark_group("store_memory_sync_page_50");
    g.throughput(Throughput::Elements(50));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(30);
    g.bench_function("memory_store_user_index", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(store.sync(&user, Some(since), 50))
                    .expect("read"),
            )
        })
    });
    g.bench_function("naive_scan", |b| {
        b.iter(|| black_box(naive.sync(&user, since, 50)))
    });
    g.finish();
}

fn main() {
    let rt = rt();
    measure(&rt, 100_000, 1_000);
    measure(&rt, 100_000, 50_000);
    measure_full(&rt, 64 << 20, 200_000);
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &rt);
    c.final_summary();
}
