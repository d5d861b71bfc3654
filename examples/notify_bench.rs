//! Notifications from a Kafka topic to sockets, end to end: produces records
//! `{"userId":"nb<k>","sentUs":<unix µs>}` at `--rate` per second for `--seconds` to `--topic`,
//! while `--users` WebSocket clients (one per user, `?user_id=`) read their `notification`
//! frames and record now - sentUs. The server under test maps the topic with
//! `{topic: <topic>, user: /userId, kind: bench}` (see loadtest/README.md); the records are
//! stored (the message store) and delivered.
//!
//! ```sh
//! cargo run --release --example notify_bench -- --server 127.0.0.1:8081 \
//!     --brokers 127.0.0.1:9092 --topic bench.notify --users 100 --rate 5000 --seconds 10
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let server = arg(&args, "--server", "127.0.0.1:8081");
    let brokers = arg(&args, "--brokers", "127.0.0.1:9092");
    let topic = arg(&args, "--topic", "bench.notify");
    let users: usize = arg(&args, "--users", "100").parse().expect("--users");
    let rate: u64 = arg(&args, "--rate", "2000").parse().expect("--rate");
    let seconds: u64 = arg(&args, "--seconds", "10").parse().expect("--seconds");

    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    // `--direct`: a plain consumer reads the topic instead of sockets (the broker's own
    // produce-to-fetch latency, the floor under the server's).
    let direct = args.iter().any(|a| a == "--direct");
    if direct {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message as _;
        let c: BaseConsumer = if args.iter().any(|a| a == "--server-settings") {
            // The server's own consumer settings (src/bridge/notify.rs).
            let cfg = switchboard::config::Config {
                kafka_brokers: vec![brokers.clone()],
                kafka_group_id: format!("nb-direct-{}", now_us()),
                ..Default::default()
            };
            switchboard::bridge::notify::consumer_config(&cfg)
                .create()
                .expect("consumer")
        } else {
            ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("nb-direct-{}", now_us()))
                .set("auto.offset.reset", "latest")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "100")
                .set("fetch.min.bytes", "1")
                .set("isolation.level", "read_committed")
                .create()
                .expect("consumer")
        };
        c.subscribe(&[topic.as_str()]).expect("subscribe");
        // Wait for the assignment.
        let t0 = Instant::now();
        while c.assignment().map_or(0, |a| a.count()) == 0 && t0.elapsed() < Duration::from_secs(20)
        {
            let _ = c.poll(Duration::from_millis(100));
        }
        let (hist, received, stop) = (hist.clone(), received.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    let v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
                    if let Some(sent) = v["sentUs"].as_u64() {
                        let lat = now_us().saturating_sub(sent).max(1);
                        hist.lock().unwrap().record(lat.min(60_000_000)).ok();
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for k in 0..if direct { 0 } else { users } {
        let url = format!("ws://{server}/ws?user_id=nb{k}");
        let (mut ws, _) = tungstenite::connect(url.as_str()).expect("connect");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_millis(200))).ok();
        }
        let (hist, received, stop) = (hist.clone(), received.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: serde_json::Value = match serde_json::from_str(t.as_str()) {
                            Ok(v) => v,
                            Err(_) => continue,
                        };
                        if v["type"] == "notification" {
                            if let Some(sent) = v["data"]["data"]["sentUs"].as_u64() {
                                let lat = now_us().saturating_sub(sent).max(1);
                                hist.lock().unwrap().record(lat.min(60_000_000)).ok();
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("reader nb{k}: {e}"),
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let total = rate * seconds;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let user = format!("nb{}", i as usize % users);
        let value = format!("{{\"userId\":\"{user}\",\"sentUs\":{}}}", now_us());
        let mut rec = BaseRecord::<str, str>::to(&topic)
            .key(&user)
            .payload(&value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).ok();
    let produced_s = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().ok();
    }
    let h = hist.lock().unwrap();
    let got = received.load(Ordering::Relaxed);
    println!(
        "{{\"produced\":{total},\"received\":{got},\"produce_s\":{produced_s:.2},\"wall_s\":{wall:.2},\"delivered_per_s\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2}}}",
        got as f64 / produced_s,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}
