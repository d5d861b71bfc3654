//! The bridge alone (issue 11, "Speed"): how many room publishes per second one node's bridge
//! thread pushes into one Redis, with no shard, no WebSocket and no HTTP in the way.
//!
//! It starts a real node in this process ([`Server::start`], one shard, `redis_url` from
//! `--redis`, everything else at the server's defaults and `SWITCHBOARD_*` from the
//! environment), waits until both Redis connections are up, and then feeds the bridge's inbox
//! exactly what a shard hands it for a room publish: `BridgeMsg::Deliver` with a room target and
//! the encoded `message` frame (the shape and size a 64-byte publish of `switchboard-load
//! fanout` makes). The rooms (`--rooms`, distinct channel names, in turn) have no subscriber on
//! this node and no history, so each message costs the bridge exactly one envelope and one
//! `PUBLISH` in a pipeline ([`switchboard::bridge::redis`]).
//!
//! With `--history` the rooms have history instead (the server must be configured with it:
//! `SWITCHBOARD_ROOMS='[{"pattern":"bench-*","history_size":100}]'`) and the feeder hands the
//! bridge what a room's owner shard hands it for such a publish: `BridgeMsg::History(Append)`
//! with the message frame's head, so each message costs one append script (`EVALSHA`:
//! `HINCRBY`, `XADD MAXLEN ~`, `PUBLISH`) in a pipeline
//! ([`switchboard::bridge::redis::history`]); the rate is `switchboard_redis_history_appended_total`
//! and the flat-out feeder keeps the append queue (65,536 at most) about half full.
//!
//! Flat out (`--rate 0`, the default) the feeder keeps the Redis queue about half full (it
//! pauses while more than half of `redis_queue_max` wait in the queue and the inbox together),
//! so nothing is dropped and the publisher never runs dry: the rate is what the bridge sustains. With `--rate R` it feeds
//! R messages/s open loop and reports what was dropped. Reported: `switchboard_redis_published_total`
//! over the window (after `--warmup`), per second, the bridge thread's and the feeder's CPU,
//! Redis's CPU (`--redis-pid`) and its own count of `PUBLISH` calls (`INFO commandstats`), as
//! text and one JSON line.
//!
//!   cargo run --release --example redis_bridge_bench -- --redis redis://127.0.0.1:6390 \
//!       --redis-pid $(pidof redis-server)

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::bridge::redis::history::{HistoryJob, APPENDS_QUEUED_MAX};
use switchboard::bridge::BridgeMsg;
use switchboard::config::Config;
use switchboard::proto::Frame;
use switchboard::route::Target;
use switchboard::server::Server;

/// Longest wait for both Redis connections to come up.
const UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages handed to the inbox between two looks at the clock and the queue.
const CHUNK: usize = 64;
/// Pause of the flat-out feeder while the Redis queue is more than half full.
const FULL_PAUSE: Duration = Duration::from_micros(50);
/// Sampling interval of the published counter.
const TICK: Duration = Duration::from_millis(100);

struct Opts {
    redis: String,
    port: u16,
    seconds: f64,
    warmup: f64,
    rooms: usize,
    payload_bytes: usize,
    rate: u64,
    redis_pid: Option<u32>,
    json_only: bool,
    history: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: redis_bridge_bench --redis redis://127.0.0.1:PORT [--port P (18095)] [--seconds S (10)] \
         [--warmup S (2)] [--rooms N (1000)] [--payload-bytes B (64)] [--rate R (0 = flat out)] \
         [--redis-pid PID] [--history] [--json-only]"
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
        redis: String::new(),
        port: 18095,
        seconds: 10.0,
        warmup: 2.0,
        rooms: 1000,
        payload_bytes: 64,
        rate: 0,
        redis_pid: None,
        json_only: false,
        history: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--json-only" {
            o.json_only = true;
            continue;
        }
        if flag == "--history" {
            o.history = true;
            continue;
        }
        let Some(v) = args.next() else { usage() };
        match flag.as_str() {
            "--redis" => o.redis = v,
            "--port" => o.port = num(&flag, &v),
            "--seconds" => o.seconds = num(&flag, &v),
            "--warmup" => o.warmup = num(&flag, &v),
            "--rooms" => o.rooms = num(&flag, &v),
            "--payload-bytes" => o.payload_bytes = num(&flag, &v),
            "--rate" => o.rate = num(&flag, &v),
            "--redis-pid" => o.redis_pid = Some(num(&flag, &v)),
            _ => usage(),
        }
    }
    let host = o
        .redis
        .strip_prefix("redis://")
        .and_then(|r| r.rsplit('@').next())
        .and_then(|h| h.split(['/', ':']).next());
    if !matches!(host, Some("127.0.0.1") | Some("localhost") | Some("[::1]")) {
        eprintln!(
            "--redis must be a redis:// URL on loopback (got {:?})",
            o.redis
        );
        usage()
    }
    if o.rooms == 0
        || o.seconds.is_nan()
        || o.seconds <= 0.0
        || o.warmup < 0.0
        || o.payload_bytes > 60_000
    {
        usage()
    }
    o
}

/// Messages waiting in the bridge's inbox (they reach the Redis queue in the bridge's next
/// turn, so the flat-out feeder counts them as queued already).
fn inbox_len(tx: &switchboard::bridge::BridgeTx) -> u64 {
    (tx.max_capacity() - tx.capacity()) as u64
}

/// CPU ns of thread `tid` of this process (schedstat: time on a CPU).
fn thread_cpu_ns(tid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The tid of this process's thread named `name` (comm, at most 15 bytes).
fn thread_named(name: &str) -> Option<String> {
    let want = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == want)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// CPU ns of process `pid` (all its threads), from /proc/PID/stat's utime + stime.
fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

/// Redis's own count of `PUBLISH`, `EVALSHA` and `XADD` calls and of all commands (calls made
/// by scripts count too).
fn redis_counts(url: &str) -> Option<(u64, u64, u64, u64)> {
    let mut c = redis::Client::open(url).ok()?.get_connection().ok()?;
    let info: String = redis::cmd("INFO").arg("all").query(&mut c).ok()?;
    let field = |line_prefix: &str, key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(line_prefix))?;
        let v = line.split_once(key)?.1;
        v.split([',', '\r']).next()?.parse().ok()
    };
    Some((
        field("cmdstat_publish:", "calls=").unwrap_or(0),
        field("cmdstat_evalsha:", "calls=").unwrap_or(0),
        field("cmdstat_xadd:", "calls=").unwrap_or(0),
        field("total_commands_processed:", ":")?,
    ))
}

#[derive(Clone, Copy, Default)]
struct Snap {
    at: Option<Instant>,
    published: u64,
    dropped: u64,
    failed: u64,
    fed: u64,
    bridge_ns: u64,
    feeder_ns: u64,
    redis_ns: u64,
    redis_publish: u64,
    redis_evalsha: u64,
    redis_xadd: u64,
    redis_commands: u64,
}

fn main() {
    let o = parse();
    let redis = o.redis.clone();
    let port = o.port.to_string();
    let env = move |k: &str| match k {
        "SWITCHBOARD_REDIS_URL" => Some(redis.clone()),
        "SWITCHBOARD_HOST" => Some("127.0.0.1".into()),
        "SWITCHBOARD_PORT" => Some(port.clone()),
        "SWITCHBOARD_SHARDS" => Some("1".into()),
        _ => std::env::var(k).ok(),
    };
    let cfg = match Config::load(&[], &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config: {e}");
            std::process::exit(2)
        }
    };
    let queue_max = cfg.redis_queue_max as u64;
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("server: {e}");
            std::process::exit(1)
        }
    };
    let node = server.node().clone();
    let stats = &node.redis_stats;
    let t0 = Instant::now();
    while stats.up.load(Ordering::Relaxed) != 1 {
        if t0.elapsed() > UP_TIMEOUT {
            eprintln!("redis did not come up within {UP_TIMEOUT:?} at {}", o.redis);
            std::process::exit(1)
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bridge_tid = thread_named("switchboard-bridge").unwrap_or_default();
    let feeder_tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_default();

    // What a shard hands the bridge for a publish of `switchboard-load fanout` into room k:
    // the room target and the encoded frame, or (history) the frame's head for the append.
    let pad = "x".repeat(o.payload_bytes.saturating_sub(30));
    let rooms_cfg = &node.cfg.rooms;
    let mut history_opts: Option<(u16, u32, u64)> = None;
    let work: Vec<(Target, Frame)> = (0..o.rooms)
        .map(|k| {
            let room = format!("bench-{k}");
            let json = format!(
                "{{\"type\":\"message\",\"room\":\"{room}\",\"data\":{{\"seq\":{k},\"ts\":1234567890123,\"pad\":\"{pad}\"}},\"client_id\":\"0190c0de-0000-7000-8000-000000000000\",\"timestamp\":1764633600000}}"
            );
            let opts = switchboard::room_options::index_for(rooms_cfg, &room);
            let ro = switchboard::room_options::at(rooms_cfg, opts);
            if o.history {
                if ro.history_size == 0 {
                    eprintln!(
                        "--history: room {room} has no history in this configuration; set \
                         SWITCHBOARD_ROOMS='[{{\"pattern\":\"bench-*\",\"history_size\":100}}]'"
                    );
                    std::process::exit(2)
                }
                history_opts = Some((opts, ro.history_size, ro.history_ttl.as_millis() as u64));
            } else if ro.history_size > 0 {
                eprintln!("room {room} has history in this configuration: give --history");
                std::process::exit(2)
            }
            (
                Target::room(Arc::from(room.as_str())),
                Frame::text_from_json(json.as_bytes(), node.now_us()),
            )
        })
        .collect();
    let frame_bytes = work[0].1.wire().len();
    let heads: Vec<Box<[u8]>> = work
        .iter()
        .map(|(_, f)| {
            let json = f.payload();
            json[..json.len() - 1].into()
        })
        .collect();
    let rooms_arc: Vec<Arc<str>> = (0..o.rooms)
        .map(|k| Arc::from(format!("bench-{k}").as_str()))
        .collect();
    // What counts as done, lost and failed: envelopes published, or appends Redis answered.
    let history = o.history;
    let published = || {
        if history {
            stats.history_appended.load(Ordering::Relaxed)
        } else {
            stats.published.load(Ordering::Relaxed)
        }
    };
    let dropped = || {
        if history {
            stats.history_local.load(Ordering::Relaxed)
        } else {
            stats.dropped.load(Ordering::Relaxed)
        }
    };
    let failed = || {
        if history {
            stats.history_append_failed.load(Ordering::Relaxed)
        } else {
            stats.publish_failed.load(Ordering::Relaxed)
        }
    };
    let (queued, cap) = if history {
        (&stats.history_queued, APPENDS_QUEUED_MAX as u64)
    } else {
        (&stats.queued, queue_max)
    };

    let snap = |fed: u64| -> Snap {
        let (rp, re, rx, rc) = redis_counts(&o.redis).unwrap_or_default();
        Snap {
            at: Some(Instant::now()),
            published: published(),
            dropped: dropped(),
            failed: failed(),
            fed,
            bridge_ns: thread_cpu_ns(&bridge_tid),
            feeder_ns: thread_cpu_ns(&feeder_tid),
            redis_ns: o.redis_pid.and_then(proc_cpu_ns).unwrap_or(0),
            redis_publish: rp,
            redis_evalsha: re,
            redis_xadd: rx,
            redis_commands: rc,
        }
    };

    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(o.warmup);
    let end = warm_end + Duration::from_secs_f64(o.seconds);
    let mut next_tick = start + TICK;
    let mut ticks: Vec<u64> = Vec::new(); // published at each tick inside the window
    let mut first: Option<Snap> = None;
    let mut fed: u64 = 0;
    let mut i = 0usize;
    let interval_ns = if o.rate > 0 { 1e9 / o.rate as f64 } else { 0.0 };
    loop {
        let now = Instant::now();
        if now >= next_tick {
            next_tick += TICK;
            if now >= warm_end {
                if first.is_none() {
                    first = Some(snap(fed));
                }
                ticks.push(published());
            }
            if now >= end {
                break;
            }
        }
        if o.rate > 0 {
            let due = (now.duration_since(start).as_nanos() as f64 / interval_ns) as u64;
            if fed >= due {
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
        } else if queued.load(Ordering::Relaxed) + inbox_len(&node.bridge_tx) > cap / 2 {
            std::thread::sleep(FULL_PAUSE);
            continue;
        }
        for _ in 0..CHUNK {
            let (target, frame) = &work[i];
            let msg = match history_opts {
                Some((opts, size, ttl_ms)) => BridgeMsg::History(Box::new(HistoryJob::Append {
                    room: rooms_arc[i].clone(),
                    opts,
                    size,
                    ttl_ms,
                    head: heads[i].clone(),
                    restart: false,
                    owner: 0,
                    api: None,
                    trace: None,
                })),
                None => BridgeMsg::Deliver {
                    target: target.clone(),
                    frame: frame.clone(),
                },
            };
            i = (i + 1) % work.len();
            if node.bridge_tx.blocking_send(msg).is_err() {
                eprintln!("the bridge inbox closed");
                std::process::exit(1)
            }
            fed += 1;
        }
    }
    let last = snap(fed);
    let first = first.unwrap_or_default();
    let secs = last
        .at
        .zip(first.at)
        .map_or(0.0, |(b, a)| b.duration_since(a).as_secs_f64())
        .max(1e-9);
    let d = |f: fn(&Snap) -> u64| f(&last).saturating_sub(f(&first));
    let published = d(|s| s.published);
    let rate = published as f64 / secs;
    let per_s: Vec<u64> = ticks
        .windows(11)
        .step_by(10)
        .map(|w| w[10] - w[0])
        .collect();
    let pct = |ns: u64| ns as f64 / secs / 1e7;
    let json = serde_json::json!({
        "scenario": if history { "redis-bridge-history" } else { "redis-bridge" },
        "rooms": o.rooms,
        "payload_bytes": o.payload_bytes,
        "frame_bytes": frame_bytes,
        "rate_asked_per_s": o.rate,
        "window_s": (secs * 100.0).round() / 100.0,
        "fed": d(|s| s.fed),
        "published": published,
        "published_per_s": rate.round(),
        "published_per_s_each_second": per_s,
        "dropped": d(|s| s.dropped),
        "publish_failed": d(|s| s.failed),
        "bridge_cpu_pct": (pct(d(|s| s.bridge_ns)) * 10.0).round() / 10.0,
        "bridge_cpu_ns_per_publish": (d(|s| s.bridge_ns) as f64 / published.max(1) as f64).round(),
        "feeder_cpu_pct": (pct(d(|s| s.feeder_ns)) * 10.0).round() / 10.0,
        "redis_cpu_pct": o.redis_pid.map(|_| (pct(d(|s| s.redis_ns)) * 10.0).round() / 10.0),
        "redis_publish_calls": d(|s| s.redis_publish),
        "redis_evalsha_calls": d(|s| s.redis_evalsha),
        "redis_xadd_calls": d(|s| s.redis_xadd),
        "redis_commands": d(|s| s.redis_commands),
    });
    if !o.json_only {
        println!(
            "bridge alone{}: {published} room publishes in {secs:.2} s = {rate:.0}/s (each second: {per_s:?}); \
             dropped {}, failed {}; bridge thread {} % of a core ({} ns per publish), feeder {} %, redis {} %; \
             Redis counted {} PUBLISH, {} EVALSHA, {} XADD and {} commands",
            if history { " (history rooms)" } else { "" },
            json["dropped"], json["publish_failed"], json["bridge_cpu_pct"],
            json["bridge_cpu_ns_per_publish"], json["feeder_cpu_pct"], json["redis_cpu_pct"],
            json["redis_publish_calls"], json["redis_evalsha_calls"], json["redis_xadd_calls"],
            json["redis_commands"]
        );
    }
    println!("{json}");
    server.shutdown();
}
