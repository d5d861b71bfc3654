//! The bare-producer ceiling of durable direct messages (issue 12, "Speed"): what one rdkafka
//! producer with exactly the server's settings reaches on this machine, beside what a
//! Kafka-configured node acks (`switchboard-load dm`).
//!
//! The settings are the server's own: [`switchboard::bridge::kafka::producer_config`] of a
//! [`Config`] loaded the way the server loads it (defaults, then `SWITCHBOARD_*` from the
//! environment, so `SWITCHBOARD_KAFKA_LINGER` and the rest apply here too), with
//! `kafka_brokers` from `--brokers`. Only the client context differs: a `ThreadedProducer`
//! whose delivery callback records the latency (the server's `FutureProducer` is the same
//! producer with a oneshot channel per record).
//!
//! The records have the size and shape of a DM record of `switchboard-load dm`: the value a
//! `message.create` frame with `--payload-bytes` of content (64 by default, the generator's
//! default), the key one of `--conversations` conversation ids, the same five headers
//! (sender, eventId, serverMsgId, content-type, clientMsgId).
//!
//! Open loop at `--rate R` records/s (latency from each record's scheduled time, so a stall
//! counts against every record it delays), or flat out with `--rate 0` (latency from the
//! produce call; on a full queue it waits 1 ms and retries). Reports delivered records/s over
//! the measured window (after `--warmup` seconds) and produce-to-delivery-report p50/p99/max,
//! as text and one JSON line.
//!
//!   cargo run --release --example kafka_ceiling -- --brokers 127.0.0.1:9092 --rate 10000
//!
//! The topic must exist (`--topic`, default the server's `kafka_dm_topic`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use switchboard::config::Config;

/// Longest the final flush waits for outstanding delivery reports.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the first metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before retrying a produce the full queue refused (flat out).
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);
/// Records produced between two looks at the clock when flat out.
const FLAT_OUT_CHUNK: u64 = 64;

struct Opts {
    brokers: String,
    topic: Option<String>,
    rate: u64,
    seconds: f64,
    warmup: f64,
    conversations: usize,
    payload_bytes: usize,
    /// The broker's PID: its CPU over the window is reported too.
    broker_pid: Option<u32>,
}

fn usage() -> ! {
    eprintln!(
        "usage: kafka_ceiling --brokers HOST:PORT[,..] [--rate R (0 = flat out)] [--seconds S] \
         [--warmup S] [--conversations N] [--payload-bytes B] [--topic T] [--broker-pid PID]"
    );
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("{flag}: bad value {v:?}");
        usage()
    })
}

fn parse() -> Opts {
    let mut o = Opts {
        brokers: String::new(),
        topic: None,
        rate: 10_000,
        seconds: 10.0,
        warmup: 1.0,
        conversations: 500,
        payload_bytes: 64,
        broker_pid: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(v) = args.next() else { usage() };
        match flag.as_str() {
            "--brokers" => o.brokers = v.clone(),
            "--topic" => o.topic = Some(v.clone()),
            "--rate" => o.rate = num(&flag, &v),
            "--seconds" => o.seconds = num(&flag, &v),
            "--warmup" => o.warmup = num(&flag, &v),
            "--conversations" => o.conversations = num(&flag, &v),
            "--payload-bytes" => o.payload_bytes = num(&flag, &v),
            "--broker-pid" => o.broker_pid = Some(num(&flag, &v)),
            _ => usage(),
        }
    }
    if o.brokers.is_empty() || o.conversations == 0 || o.seconds <= 0.0 {
        usage()
    }
    o
}

/// Delivery reports: latency of those inside the measured window, and counts.
struct Ctx {
    start: Instant,
    /// The measured window (ns since start; set once connected): records/s are the delivery
    /// reports inside it.
    window_from: AtomicU64,
    window_to: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    delivered_in_window: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Ctx {}

/// A record's opaque: (its reference time in ns since start, produced inside the window).
impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<(u64, bool)>;

    fn delivery(&self, r: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let now = self.start.elapsed().as_nanos() as u64;
        match r {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                let (at, counted) = *opaque;
                if counted {
                    let us = now.saturating_sub(at) / 1000;
                    let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = h.record(us.max(1));
                }
                let (from, to) = (
                    self.window_from.load(Ordering::Relaxed),
                    self.window_to.load(Ordering::Relaxed),
                );
                if now >= from && now < to {
                    self.delivered_in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut f = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                f.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// CPU time of this process (all its threads, librdkafka's included), in ns.
fn cpu_ns() -> u64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as u64 * 1_000_000_000 + v.tv_usec as u64 * 1000;
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU time of another process (utime + stime of /proc/PID/stat), in ns.
fn pid_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

fn uuid_of(n: u128) -> String {
    uuid::Uuid::from_u128(n).to_string()
}

fn main() {
    let o = parse();
    let brokers = o.brokers.clone();
    let env = move |k: &str| {
        if k == "SWITCHBOARD_KAFKA_BROKERS" {
            Some(brokers.clone())
        } else {
            std::env::var(k).ok()
        }
    };
    let cfg = match Config::load(&[], &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config: {e}");
            std::process::exit(2)
        }
    };
    let topic = o
        .topic
        .clone()
        .unwrap_or_else(|| cfg.kafka_dm_topic.clone());
    let warm_ns = (o.warmup * 1e9) as u64;
    let end_ns = warm_ns + (o.seconds * 1e9) as u64;
    let ctx = Ctx {
        start: Instant::now(),
        window_from: AtomicU64::new(u64::MAX),
        window_to: AtomicU64::new(0),
        hist: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")),
        delivered_in_window: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
    };
    let producer: ThreadedProducer<Ctx> =
        match switchboard::bridge::kafka::producer_config(&cfg).create_with_context(ctx) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("producer: {e}");
                std::process::exit(1)
            }
        };
    // Connected before the clock starts (as the server is before it is ready): the topic's
    // metadata, so no record of the run waits for the first connection.
    if let Err(e) = producer
        .client()
        .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
    {
        eprintln!("metadata of {topic}: {e}");
        std::process::exit(1)
    }
    let ctx = producer.context();
    let t0 = ctx.start.elapsed().as_nanos() as u64;
    let (warm_ns, end_ns) = (t0 + warm_ns, t0 + end_ns);
    ctx.window_to.store(end_ns, Ordering::Relaxed);
    ctx.window_from.store(warm_ns, Ordering::Relaxed);

    // Record material, shaped like switchboard-load dm's: users lt<nonce>u<k>, paired
    // 2k <-> 2k+1, one conversation per pair.
    let nonce = format!("{:08x}", std::process::id() as u64 * 2654435761 % (1 << 32));
    let convs: Vec<(String, String, String)> = (0..o.conversations)
        .map(|c| {
            (
                format!("lt{nonce}u{}", 2 * c),
                format!("lt{nonce}u{}", 2 * c + 1),
                uuid_of(0x5b1e_0000_0000_0000_0000_0000_0000_0000 | c as u128),
            )
        })
        .collect();
    let content: String = "x".repeat(o.payload_bytes);

    let mut seq: u64 = 0;
    let mut cpu_window: Option<(u64, u64, Option<u64>)> = None;
    let mut queue_full: u64 = 0;
    let mut produced_in_window: u64 = 0;
    let interval_ns = if o.rate > 0 { 1e9 / o.rate as f64 } else { 0.0 };
    loop {
        let now = ctx.start.elapsed().as_nanos() as u64;
        if now >= end_ns {
            break;
        }
        if cpu_window.is_none() && now >= warm_ns {
            cpu_window = Some((cpu_ns(), now, o.broker_pid.and_then(pid_cpu_ns)));
        }
        // Open loop: produce every record whose scheduled time has come.
        let due = if o.rate > 0 {
            let due_total = ((now - t0) as f64 / interval_ns) as u64 + 1;
            if due_total <= seq {
                let next = t0 + (seq as f64 * interval_ns) as u64;
                std::thread::sleep(Duration::from_nanos(
                    next.saturating_sub(now).min(1_000_000),
                ));
                continue;
            }
            due_total - seq
        } else {
            FLAT_OUT_CHUNK
        };
        for _ in 0..due {
            let sched = if o.rate > 0 {
                t0 + (seq as f64 * interval_ns) as u64
            } else {
                ctx.start.elapsed().as_nanos() as u64
            };
            let (from, to, conv) = &convs[(seq as usize) % convs.len()];
            let id = seq + 1;
            let event = uuid_of(0x0190_0000_0000_7000_8000_0000_0000_0000 | (id as u128) << 64);
            let server = uuid_of(0x0190_0000_0000_7000_9000_0000_0000_0000 | (id as u128) << 64);
            let client = format!("x{}-{seq}-{nonce}", sched / 1000);
            let frame = format!(
                "{{\"type\":\"message.create\",\"data\":{{\"eventId\":\"{event}\",\"serverMsgId\":\"{server}\",\"clientMsgId\":\"{client}\",\"from\":\"{from}\",\"to\":\"{to}\",\"conversationId\":\"{conv}\",\"content\":\"{content}\",\"attachmentUrl\":null,\"sentAt\":\"2026-12-01T21:03:26.934Z\",\"cursor\":{id},\"seq\":{},\"timestamp\":1796159006934}}}}",
                seq / convs.len() as u64 + 1
            );
            let counted = sched >= warm_ns;
            if counted {
                produced_in_window += 1;
            }
            let mut opaque = Box::new((sched, counted));
            loop {
                let headers =
                    switchboard::bridge::kafka::dm_headers(from, &event, &server, Some(&client));
                let record = BaseRecord::with_opaque_to(&topic, opaque)
                    .key(conv.as_bytes())
                    .payload(frame.as_bytes())
                    .headers(headers);
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        queue_full += 1;
                        opaque = r.delivery_opaque;
                        std::thread::sleep(QUEUE_FULL_PAUSE);
                    }
                    Err((e, _)) => {
                        eprintln!("produce: {e}");
                        std::process::exit(1)
                    }
                }
            }
            seq += 1;
        }
    }
    let (cpu_pct, broker_pct) = cpu_window.map_or((0.0, -1.0), |(c, t, b)| {
        let wall = (ctx.start.elapsed().as_nanos() as u64 - t).max(1) as f64;
        let broker = match (b, o.broker_pid.and_then(pid_cpu_ns)) {
            (Some(a), Some(z)) => z.saturating_sub(a) as f64 / wall * 100.0,
            _ => -1.0,
        };
        ((cpu_ns() - c) as f64 / wall * 100.0, broker)
    });
    let _ = producer.flush(FLUSH_TIMEOUT);
    let secs = o.seconds;
    let in_window = ctx.delivered_in_window.load(Ordering::Relaxed);
    let h = ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
    let failed = ctx.failed.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rps = in_window as f64 / secs;
    println!(
        "kafka_ceiling: rate {} ({}), {secs} s after {} s warmup: produced {seq} ({produced_in_window} in window), \
         delivered {} ({in_window} in the window = {rps:.0}/s), failed {failed}, queue full {queue_full}, CPU {cpu_pct:.0} % of a core (broker {broker_pct:.0} %); \
         produce->report p50 {:.2} ms p99 {:.2} ms max {:.2} ms; linger {:?}, batch {} B, {}",
        o.rate,
        if o.rate > 0 { "open loop" } else { "flat out" },
        o.warmup,
        ctx.delivered.load(Ordering::Relaxed),
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0,
        cfg.kafka_linger,
        cfg.kafka_batch_bytes,
        cfg.kafka_compression.as_str(),
    );
    if let Some(e) = ctx
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        println!("first delivery error: {e}");
    }
    println!(
        "{{\"scenario\":\"kafka-ceiling\",\"rate_per_s\":{},\"seconds\":{secs},\"produced\":{seq},\"delivered_per_s\":{rps:.1},\"failed\":{failed},\"queue_full\":{queue_full},\"cpu_pct\":{cpu_pct:.1},\"broker_cpu_pct\":{broker_pct:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        o.rate,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
    drop(h);
    if failed > 0 {
        std::process::exit(1)
    }
}
