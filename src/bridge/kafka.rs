//! The Kafka side of the bridge: the node's one producer (durable direct messages, and the
//! dead-letter topic of the notification consumer), its health, and the counters `/metrics`
//! and `/ready` read. With `kafka_brokers` empty nothing here is created.
//!
//! Every librdkafka option that matters is set here explicitly, with the reason; nothing is
//! left to librdkafka's defaults (which, for one, leave idempotence off).
//!
//! The durable-DM flow (the writer in [`super::store`]): a batch is committed to the store
//! first (the `(sender, clientMsgId)` dedup claim, the ids), then every new message is
//! produced here; its sender's `message.ack` and the live `message.create` wait for the
//! delivery report, and the store records the message as produced before the ack goes out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::Config;

/// How often the brokers' reachability is checked (a metadata request), and `/ready` updated.
pub const KAFKA_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Longest one health check's metadata request may take.
pub const KAFKA_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Least time between two log lines of librdkafka errors (a broker that is down makes it
/// report one per connection attempt).
pub const KAFKA_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// librdkafka's `queue.buffering.max.kbytes`: bytes of records the producer holds at most.
pub const PRODUCER_QUEUE_KBYTES: usize = 64 * 1024;

/// librdkafka's `message.max.bytes`: the largest record (a DM is at most 64 MiB of content by
/// config, but its frame must also fit the broker's own limit, 1 MiB by default).
pub const RECORD_BYTES_MAX: usize = 1024 * 1024;

/// Records the dead-letter topic and other non-DM producers may add on top of
/// `kafka_pending_max` in librdkafka's queue.
pub const PRODUCER_QUEUE_EXTRA: usize = 4096;

/// Error texts of a DM that Kafka did not take (no ack was sent).
pub const KAFKA_UNAVAILABLE: &str = "kafka unavailable, retry later";
pub const KAFKA_TIMEOUT: &str = "kafka did not confirm in time, retry later";
pub const KAFKA_BUSY: &str = "kafka busy, retry later";
pub const KAFKA_REJECTED: &str = "kafka rejected the message";

/// Counters and gauges of the Kafka clients, kept by the bridge, rendered by `/metrics`.
#[derive(Default)]
pub struct KafkaStats {
    /// True when `kafka_brokers` is set (then `up` is readiness).
    pub configured: std::sync::atomic::AtomicBool,
    /// 1 while the brokers answer the health check.
    pub up: AtomicU64,
    /// DMs whose delivery report said written.
    pub produced: AtomicU64,
    /// DMs the producer failed (their senders got errors, no ack).
    pub produce_failed: AtomicU64,
    /// DMs whose ack wait ran out before the delivery report (their senders got errors).
    pub ack_timeouts: AtomicU64,
    /// DMs written after their ack wait ran out (delivered live then).
    pub written_late: AtomicU64,
    /// DMs refused because `kafka_pending_max` were pending.
    pub busy: AtomicU64,
    /// DMs produced and waiting for their delivery report now.
    pub pending: AtomicU64,
    /// Retries of a clientMsgId that joined a record still pending instead of producing again.
    pub joined: AtomicU64,
    /// Written (and acked) records whose "produced" mark could not be stored after retries: a
    /// client's retry of one would be produced again.
    pub marks_lost: AtomicU64,
    /// librdkafka errors reported (connection failures, all brokers down, ...).
    pub client_errors: AtomicU64,
    /// The notification consumer's counters (see `notify`).
    pub consumed: AtomicU64,
    pub notifications: AtomicU64,
    pub notification_duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Consumer lag per assigned partition: (topic, partition, lag), refreshed from
    /// librdkafka's statistics.
    pub lag: Mutex<Vec<(String, i32, i64)>>,
}

impl KafkaStats {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed) == 1
    }
}

/// The client context: librdkafka's errors and logs into `tracing`, rate limited, and counted.
pub struct BridgeContext {
    pub node: Arc<crate::shard::Node>,
    last_log: Mutex<Option<std::time::Instant>>,
}

impl BridgeContext {
    pub fn new(node: Arc<crate::shard::Node>) -> Self {
        BridgeContext {
            node,
            last_log: Mutex::new(None),
        }
    }

    fn may_log(&self) -> bool {
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= KAFKA_ERROR_LOG_INTERVAL) {
            *last = Some(now);
            true
        } else {
            false
        }
    }
}

impl ClientContext for BridgeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                if self.may_log() {
                    tracing::warn!(facility = fac, "librdkafka: {log_message}");
                }
            }
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                tracing::debug!(facility = fac, "librdkafka: {log_message}")
            }
            _ => tracing::trace!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.node
            .kafka_stats
            .client_errors
            .fetch_add(1, Ordering::Relaxed);
        if self.may_log() {
            tracing::warn!(error = %error, "kafka client error: {reason} (retrying)");
        }
    }
}

/// The settings every client of this node shares (the producer here, the notification
/// consumer in `notify`).
pub fn common_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.kafka_brokers.join(","))
        .set("client.id", &cfg.kafka_client_id)
        // Capped, growing reconnect backoff (librdkafka adds jitter).
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "2000")
        .set("socket.keepalive.enable", "true")
        .set("socket.connection.setup.timeout.ms", "5000")
        // Metadata: refreshed every 30 s, and at once on errors.
        .set("topic.metadata.refresh.interval.ms", "30000")
        .set("metadata.max.age.ms", "90000")
        .set("api.version.request", "true")
        // Never create topics (librdkafka asks brokers to auto-create on metadata requests
        // by default): a missing topic is an operator's error, reported by the health check.
        .set("allow.auto.create.topics", "false")
        // Logs go through BridgeContext::log; no per-record debug contexts.
        .set_log_level(RDKafkaLogLevel::Warning)
        .set("log.connection.close", "false");
    c
}

/// The producer's settings: durable (acks from every in-sync replica), idempotent (a retry
/// inside librdkafka never writes a record twice, and order per partition holds with up to 5
/// requests in flight), batched (`kafka_linger`, `kafka_batch_bytes`), bounded (its queue
/// holds `kafka_pending_max` records and [`PRODUCER_QUEUE_KBYTES`]).
pub fn producer_config(cfg: &Config) -> ClientConfig {
    let mut c = common_config(cfg);
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        // The highest idempotence allows; ordering is kept by the sequence numbers.
        .set("max.in.flight.requests.per.connection", "5")
        // Retried until message.timeout.ms: idempotence makes each retry safe.
        .set("retries", "2147483647")
        .set("retry.backoff.ms", "100")
        .set("retry.backoff.max.ms", "1000")
        .set("message.timeout.ms", millis(cfg.kafka_message_timeout))
        .set("request.timeout.ms", "10000")
        // A float in librdkafka: sub-millisecond values are kept.
        .set(
            "linger.ms",
            (cfg.kafka_linger.as_secs_f64() * 1000.0).to_string(),
        )
        .set("batch.size", cfg.kafka_batch_bytes.to_string())
        .set("batch.num.messages", "10000")
        .set("compression.codec", cfg.kafka_compression.as_str())
        .set(
            "queue.buffering.max.messages",
            (cfg.kafka_pending_max + PRODUCER_QUEUE_EXTRA).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            PRODUCER_QUEUE_KBYTES.to_string(),
        )
        .set("message.max.bytes", RECORD_BYTES_MAX.to_string())
        // The Java client's partitioner: a conversationId lands on the partition a Java
        // producer would pick for it (librdkafka's default is CRC32-based).
        .set("partitioner", "murmur2_random")
        // A record that fails, fails alone (its sender got an error and no ack, and may retry):
        // true would make any such failure fatal to the whole producer.
        .set("enable.gapless.guarantee", "false")
        .set("statistics.interval.ms", "0");
    c
}

/// The headers of a direct message's record (PROTOCOL.md section 6): `sender`, `eventId`,
/// `serverMsgId`, `content-type`, and `clientMsgId` when there is one. The benchmark's
/// records (`examples/kafka_ceiling`) are built with it too.
pub fn dm_headers(
    sender: &str,
    event_id: &str,
    server_msg_id: &str,
    client_msg_id: Option<&str>,
) -> OwnedHeaders {
    fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
        Header {
            key,
            value: Some(value.as_bytes()),
        }
    }
    let headers = OwnedHeaders::new_with_capacity(5)
        .insert(h("sender", sender))
        .insert(h("eventId", event_id))
        .insert(h("serverMsgId", server_msg_id))
        .insert(h("content-type", "application/json"));
    match client_msg_id {
        Some(c) => headers.insert(h("clientMsgId", c)),
        None => headers,
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// The node's producer (created without contacting a broker: librdkafka connects in the
/// background and the health check reports when it cannot).
pub fn producer(
    cfg: &Config,
    node: Arc<crate::shard::Node>,
) -> Result<FutureProducer<BridgeContext>, KafkaError> {
    producer_config(cfg).create_with_context(BridgeContext::new(node))
}

/// What one health check found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Health {
    Up,
    /// No broker answered the metadata request.
    Down,
    /// The brokers answer, but the DM topic does not exist (this node never creates topics,
    /// and a broker that does not auto-create would time every DM out).
    NoTopic,
}

/// Check the brokers every [`KAFKA_HEALTH_INTERVAL`]: a metadata request for `topic` (on a
/// blocking thread: librdkafka's call blocks). `up` is what `/ready` reads; a missing topic
/// counts as down, with its own log line.
pub async fn health(
    node: Arc<crate::shard::Node>,
    producer: FutureProducer<BridgeContext>,
    topic: String,
) {
    let mut was: Option<Health> = None;
    loop {
        let p = producer.clone();
        let t = topic.clone();
        let now = tokio::task::spawn_blocking(move || {
            match p.client().fetch_metadata(Some(&t), KAFKA_HEALTH_TIMEOUT) {
                Ok(m) if m.brokers().is_empty() => Health::Down,
                Ok(m) => match m.topics().iter().find(|x| x.name() == t) {
                    Some(x) if x.error().is_none() && !x.partitions().is_empty() => {
                        // Every partition needs a leader, or its records time out one by one.
                        if x.partitions()
                            .iter()
                            .all(|p| p.leader() >= 0 && p.error().is_none())
                        {
                            Health::Up
                        } else {
                            Health::Down
                        }
                    }
                    Some(x)
                        if x.error().is_some_and(|e| {
                            rdkafka::error::RDKafkaErrorCode::from(e)
                                == rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition
                        }) =>
                    {
                        Health::NoTopic
                    }
                    None => Health::NoTopic,
                    Some(_) => Health::Down,
                },
                Err(_) => Health::Down,
            }
        })
        .await
        .unwrap_or(Health::Down);
        let stats = &node.kafka_stats;
        stats
            .up
            .store(u64::from(now == Health::Up), Ordering::Relaxed);
        if was != Some(now) {
            match now {
                Health::Up => tracing::info!("kafka up"),
                Health::NoTopic => tracing::warn!(
                    topic = %topic,
                    "kafka: the direct-message topic does not exist; create it (this node never creates topics); /ready answers 503 and direct messages get errors until it exists"
                ),
                Health::Down if was.is_none() => tracing::info!("kafka not reachable yet; /ready answers 503 and direct messages get errors until it is"),
                Health::Down => tracing::warn!("kafka down: direct messages get errors and no ack, /ready answers 503, reconnecting"),
            }
            was = Some(now);
        }
        tokio::time::sleep(KAFKA_HEALTH_INTERVAL).await;
    }
}

/// The Kafka lines of `/metrics` (none without Kafka configured).
pub fn prometheus_lines(s: &KafkaStats, out: &mut String) {
    use std::fmt::Write;
    if !s.configured.load(Ordering::Relaxed) {
        return;
    }
    let rows: [(&str, &str, &str, &AtomicU64); 14] = [
        ("switchboard_kafka_up", "gauge", "1 while the Kafka brokers answer the health check", &s.up),
        ("switchboard_kafka_dm_produced_total", "counter", "Direct messages the broker confirmed (then acked)", &s.produced),
        ("switchboard_kafka_dm_failed_total", "counter", "Direct messages the producer failed (the senders got errors, no ack)", &s.produce_failed),
        ("switchboard_kafka_dm_ack_timeouts_total", "counter", "Direct messages not confirmed within kafka_ack_timeout (the senders got errors, no ack)", &s.ack_timeouts),
        ("switchboard_kafka_dm_written_late_total", "counter", "Direct messages confirmed after their ack wait ran out (delivered live then)", &s.written_late),
        ("switchboard_kafka_dm_busy_total", "counter", "Direct messages refused because kafka_pending_max were waiting for the broker", &s.busy),
        ("switchboard_kafka_dm_pending", "gauge", "Direct messages produced and waiting for the broker now", &s.pending),
        ("switchboard_kafka_dm_joined_total", "counter", "Retries of a clientMsgId that waited for its pending record instead of producing again", &s.joined),
        ("switchboard_kafka_dm_marks_lost_total", "counter", "Written direct messages whose produced mark the store did not take after retries (a client retry of one would be produced again)", &s.marks_lost),
        ("switchboard_kafka_client_errors_total", "counter", "Errors librdkafka reported (connections, brokers down)", &s.client_errors),
        ("switchboard_kafka_records_consumed_total", "counter", "Records read from the notification topics", &s.consumed),
        ("switchboard_kafka_notifications_total", "counter", "Notifications made from records and handed on", &s.notifications),
        ("switchboard_kafka_notification_duplicates_total", "counter", "Records seen again (redelivered after a restart or rebalance) and not shown twice", &s.notification_duplicates),
        ("switchboard_kafka_dead_lettered_total", "counter", "Records that could not be mapped, sent to the dead-letter topic", &s.dead_lettered),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let lag = s.lag.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(
        out,
        "# HELP switchboard_kafka_consumer_lag Records behind the end of each assigned partition\n# TYPE switchboard_kafka_consumer_lag gauge"
    );
    for (topic, partition, l) in lag.iter() {
        let _ = writeln!(
            out,
            "switchboard_kafka_consumer_lag{{topic=\"{topic}\",partition=\"{partition}\"}} {l}"
        );
    }
}
