//! The notification consumer: on the bridge's runtime, a consumer group (`kafka_group_id`) on
//! the topics of `kafka_notifications`, each record mapped by [`crate::notifications`] and
//! handed on; started only when `kafka_brokers` is set and the mapping has rules. It owns the
//! consumer and its offsets; the store, the frames and the delivery seam are the store task's
//! ([`Sink`], implemented in [`super::store`]), the dead-letter producer is the node's one
//! producer ([`super::kafka::producer`]).
//!
//! At least once, and never shown twice to a user:
//! - **User** notifications are stored with `source_key = "topic/partition/offset"`
//!   ([`Store::store_notification`](crate::store::Store::store_notification) is idempotent by
//!   it) and delivered live only when the store says the row is new; a record seen again (after
//!   a restart or a rebalance) is counted as a duplicate and delivers nothing.
//! - **Room** notifications are not stored: a record delivered again after a restart before
//!   its offset was committed reaches the room again, with the same `id` (clients may dedup).
//! - **Unmappable** records are produced to `kafka_dead_letter_topic` (same key, value and
//!   headers, plus `dlq-reason`, `dlq-topic`, `dlq-partition`, `dlq-offset`) and counted.
//!
//! A record's offset is stored (`enable.auto.offset.store=false`; librdkafka commits stored
//! offsets every `kafka_commit_interval` and on a rebalance or close) only after that: stored
//! and handed to the shards, or delivered to a room, or confirmed by the dead-letter topic. A
//! store (or dead-letter topic) that fails is retried with a capped backoff, never skipped.
//!
//! Each partition has its own worker task and queue, so records of one partition are handled
//! in order and a partition waiting for the store does not hold up the others (beyond the
//! shared store itself), until one partition's queue holds [`PARTITION_QUEUE_MAX`] records:
//! then the consumer is not polled (librdkafka stops fetching once its own queue is full)
//! until that worker has worked half of them off. (Not `pause`/`resume`: see the dispatch
//! loop.)

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use tokio::sync::Notify;

use super::kafka::BridgeContext;
use crate::config::Config;
use crate::notifications::{self, Mapped, Target as NTarget};
use crate::proto::envelope::Obj;
use crate::proto::json::rfc3339_ms;
use crate::proto::Frame;
use crate::route::Target;
use crate::shard::Node;
use crate::store::{NewNotification, Noted, Notification};

/// Records queued per partition before the consumer stops being polled (all partitions wait
/// then). Above librdkafka's own prefetch (`queued.min.messages`, 1,000), so a steady stream
/// never waits.
pub const PARTITION_QUEUE_MAX: usize = 2048;

/// Partitions this node keeps a worker for at most; a record of one more partition waits for
/// the consumer to be restarted (logged): far above any topic layout of the ten topics.
pub const PARTITIONS_MAX: usize = 4096;

/// librdkafka's `statistics.interval.ms`: how often consumer lag is refreshed for `/metrics`.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// librdkafka's `max.poll.interval.ms`: the consumer is polled continuously by the dispatch
/// loop (workers never block it), so this only catches a stuck bridge thread.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);

/// First and longest wait between two attempts at a record whose store call or dead-letter
/// produce failed.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Longest a dead-letter produce waits for room in the producer's queue before it counts as
/// failed (and is tried again after a backoff).
pub const DEAD_LETTER_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Least time between two log lines about failing records (a store that is down fails every
/// record of every partition).
pub const NOTIFY_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The consumer's fetch sizes: bytes per partition per fetch (`max.partition.fetch.bytes`),
/// per fetch (`fetch.max.bytes`), and read ahead in librdkafka's queue
/// (`queued.max.messages.kbytes`, KiB).
pub const FETCH_PARTITION_BYTES_MAX: usize = 1024 * 1024;
pub const FETCH_BYTES_MAX: usize = 16 * 1024 * 1024;
pub const QUEUED_KBYTES_MAX: usize = 16 * 1024;

/// What the consumer needs of the store task: the store, the frame builder and the delivery
/// seam (implemented by the store task's context, so both notification paths share them).
pub trait Sink {
    fn node(&self) -> &Arc<Node>;
    /// [`crate::store::Store::store_notification`] under the store's timeout.
    fn store_notification(
        &self,
        n: &NewNotification,
    ) -> impl Future<Output = crate::store::Result<Noted>>;
    /// Hand `frame` to this node's shards holding recipients of `target` (in order).
    fn deliver(&self, target: Target, frame: &Frame);
    /// One `{"type":"notification","data":{...},"timestamp"}` frame, `data`'s members written
    /// by `f`.
    fn notification_frame(&self, f: &mut dyn FnMut(&mut Obj)) -> Frame;
}

/// Whether this node runs the consumer.
pub fn wanted(cfg: &Config) -> bool {
    !cfg.kafka_brokers.is_empty() && !cfg.kafka_notifications.is_empty()
}

/// The consumer's settings, every one that matters set here.
pub fn consumer_config(cfg: &Config) -> ClientConfig {
    // Brokers, client id, reconnects, keepalive, metadata, no topic creation, logs: as the
    // producer's.
    let mut c = super::kafka::common_config(cfg);
    c.set("group.id", &cfg.kafka_group_id)
        // New topics matching a pattern are found within this.
        .set("topic.metadata.refresh.fast.interval.ms", "250")
        // At least once: an offset is stored by hand after its record is handed on, and
        // librdkafka commits only stored offsets (on its interval, a rebalance, and close).
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", millis(cfg.kafka_commit_interval))
        .set(
            "auto.offset.reset",
            if cfg.kafka_from_beginning {
                "earliest"
            } else {
                "latest"
            },
        )
        .set("session.timeout.ms", millis(cfg.kafka_session_timeout))
        .set(
            "heartbeat.interval.ms",
            millis(cfg.kafka_session_timeout / 3),
        )
        .set("max.poll.interval.ms", millis(MAX_POLL_INTERVAL))
        // Cooperative rebalancing would keep partitions through a rebalance, but the classic
        // protocol is what every broker (tansu included) implements.
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", "100")
        .set(
            "max.partition.fetch.bytes",
            FETCH_PARTITION_BYTES_MAX.to_string(),
        )
        .set("fetch.max.bytes", FETCH_BYTES_MAX.to_string())
        .set("queued.max.messages.kbytes", QUEUED_KBYTES_MAX.to_string())
        .set("queued.min.messages", "1000")
        // When the prefetch queue is over those bounds, the next fetch waits this long:
        // librdkafka's default (1 s) added ~500 ms to the median delivery at 5,000 records/s.
        .set("fetch.queue.backoff.ms", "10")
        // Records of aborted transactions are never notifications.
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set("check.crcs", "false")
        .set("statistics.interval.ms", millis(STATS_INTERVAL));
    c
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// The consumer's context: librdkafka's logs and errors as the producer's, and its
/// statistics into [`super::kafka::KafkaStats::lag`].
pub struct NotifyContext {
    inner: BridgeContext,
}

impl ClientContext for NotifyContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.inner.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.inner.error(error, reason)
    }

    fn stats(&self, s: Statistics) {
        let mut rows: Vec<(String, i32, i64)> = Vec::new();
        for (topic, t) in &s.topics {
            for (&id, p) in &t.partitions {
                if id < 0 || !p.desired {
                    continue;
                }
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.hi_offset == 0 {
                    0
                } else {
                    // Not known yet (nothing consumed or committed on it).
                    continue;
                };
                rows.push((topic.clone(), id, lag));
            }
        }
        rows.sort();
        *self
            .inner
            .node
            .kafka_stats
            .lag
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = rows;
    }
}

impl ConsumerContext for NotifyContext {}

type Consumer_ = StreamConsumer<NotifyContext>;

/// One partition's queue, shared by the dispatch loop and the partition's worker.
struct PartQueue {
    records: RefCell<VecDeque<OwnedMessage>>,
    wake: Notify,
    /// Set while the dispatch loop waits for this queue to drain to half.
    full: Cell<bool>,
    /// Wakes the dispatch loop when a full queue has drained to half.
    drained: Notify,
}

/// What the workers share.
struct Shared<K> {
    sink: Rc<K>,
    consumer: Rc<Consumer_>,
    producer: FutureProducer<BridgeContext>,
    dead_letter_topic: String,
    rules: Vec<notifications::Rule>,
    unlogged: Cell<u64>,
    last_log: Cell<Option<tokio::time::Instant>>,
}

impl<K> Shared<K> {
    /// Log a failure at most once per [`NOTIFY_LOG_INTERVAL`], with the count since the last.
    fn log_failure(&self, what: &str, e: &dyn std::fmt::Display) {
        let n = self.unlogged.get() + 1;
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .get()
            .is_none_or(|t| now.duration_since(t) >= NOTIFY_LOG_INTERVAL)
        {
            tracing::warn!(error = %e, records = n, "notification records not handed on yet ({what}); retrying, their offsets are not committed");
            self.last_log.set(Some(now));
            self.unlogged.set(0);
        } else {
            self.unlogged.set(n);
        }
    }
}

/// Run the consumer until the bridge stops (the task is dropped: librdkafka commits the
/// stored offsets when the consumer closes).
pub async fn run<K: Sink + 'static>(sink: Rc<K>, producer: FutureProducer<BridgeContext>) {
    let node = sink.node().clone();
    let cfg = &node.cfg;
    let rules = cfg.kafka_notifications.clone();
    let subs = notifications::subscriptions(&rules);
    let ctx = NotifyContext {
        inner: BridgeContext::new(node.clone()),
    };
    let consumer: Consumer_ = match consumer_config(cfg).create_with_context(ctx) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the notification consumer cannot be created: no notifications from Kafka on this node; fix the kafka_* settings and restart");
            return;
        }
    };
    let refs: Vec<&str> = subs.iter().map(String::as_str).collect();
    if let Err(e) = consumer.subscribe(&refs) {
        tracing::error!(error = %e, topics = ?subs, "the notification consumer cannot subscribe: no notifications from Kafka on this node; fix kafka_notifications and restart");
        return;
    }
    tracing::info!(group = %cfg.kafka_group_id, topics = ?subs, dead_letter = %cfg.kafka_dead_letter_topic, "notification consumer subscribed");
    let shared = Rc::new(Shared {
        sink,
        consumer: Rc::new(consumer),
        producer,
        dead_letter_topic: cfg.kafka_dead_letter_topic.clone(),
        rules,
        unlogged: Cell::new(0),
        last_log: Cell::new(None),
    });
    let mut queues: HashMap<(Arc<str>, i32), Rc<PartQueue>> = HashMap::new();
    let mut full_logged = false;
    loop {
        let m = match shared.consumer.recv().await {
            Ok(m) => m.detach(),
            Err(e) => {
                // Connection trouble is also reported through the context; librdkafka
                // reconnects by itself.
                shared.log_failure("consumer error", &e);
                tokio::time::sleep(RETRY_BACKOFF_MIN).await;
                continue;
            }
        };
        node.kafka_stats.consumed.fetch_add(1, Ordering::Relaxed);
        let k = (Arc::<str>::from(m.topic()), m.partition());
        let q = match queues.get(&k) {
            Some(q) => q.clone(),
            None if queues.len() >= PARTITIONS_MAX => {
                // Not handed on, not stored: it is read again after a restart.
                if !full_logged {
                    tracing::error!(
                        limit = PARTITIONS_MAX,
                        "notification consumer: more partitions than PARTITIONS_MAX; records of the others are left for another node or a restart"
                    );
                    full_logged = true;
                }
                continue;
            }
            None => {
                let q = Rc::new(PartQueue {
                    records: RefCell::new(VecDeque::new()),
                    wake: Notify::new(),
                    full: Cell::new(false),
                    drained: Notify::new(),
                });
                queues.insert(k, q.clone());
                tokio::task::spawn_local(worker(shared.clone(), q.clone()));
                q
            }
        };
        let len = {
            let mut r = q.records.borrow_mut();
            r.push_back(m);
            r.len()
        };
        q.wake.notify_one();
        if len >= PARTITION_QUEUE_MAX {
            // Backpressure by not polling: librdkafka stops fetching once its own queue
            // (`queued.max.messages.kbytes`) is full. Not `pause`: pausing purges the records
            // librdkafka has fetched, and resuming after that was measured to skip records
            // (lag 0, a few hundred of 80,000 never returned) on this librdkafka and tansu.
            q.full.set(true);
            while q.full.get() {
                q.drained.notified().await;
            }
        }
    }
}

/// One partition's records, in order: each handed on (retried until it is), then its offset
/// stored.
async fn worker<K: Sink + 'static>(shared: Rc<Shared<K>>, q: Rc<PartQueue>) {
    loop {
        let next = q.records.borrow_mut().pop_front();
        let Some(m) = next else {
            q.wake.notified().await;
            continue;
        };
        // Traced (when sampled, or when the record's traceparent/B3 headers say so): from
        // the record to its hand-off to the shards (one span per record, never per recipient).
        let span = if crate::trace::on() {
            record_span(&m)
        } else {
            tracing::Span::none()
        };
        {
            use tracing::Instrument as _;
            handle(&shared, &m).instrument(span).await;
        }
        // Stored, then committed by librdkafka: after a revocation this fails, and the
        // partition's new owner reads the record again (the store's key dedups it).
        if let Err(e) = shared
            .consumer
            .store_offset(m.topic(), m.partition(), m.offset())
        {
            tracing::debug!(error = %e, topic = m.topic(), partition = m.partition(), "offset not stored (partition revoked?)");
        }
        if q.full.get() && q.records.borrow().len() <= PARTITION_QUEUE_MAX / 2 {
            q.full.set(false);
            q.drained.notify_one();
        }
    }
}

/// The `kafka.notify` span of a record, continuing the trace its headers carry.
fn record_span(m: &OwnedMessage) -> tracing::Span {
    let mut h = crate::trace::propagation::Headers::default();
    if let Some(hs) = m.headers() {
        for header in hs.iter() {
            if let Some(v) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                h.offer(header.key, v.trim());
            }
        }
    }
    crate::root_span!(
        crate::trace::root_for(&h, || crate::trace::Caller::Trusted),
        "kafka.notify",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.destination.name = m.topic(),
        messaging.kafka.partition = i64::from(m.partition()),
        messaging.kafka.offset = m.offset(),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The stable id of a record: `topic/partition/offset`.
pub fn source_key(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// Map, store, deliver or dead-letter one record; returns when it is done.
async fn handle<K: Sink>(shared: &Shared<K>, m: &OwnedMessage) {
    let stats = &shared.sink.node().kafka_stats;
    let id = source_key(m.topic(), m.partition(), m.offset());
    let mapped = notifications::map_record(&shared.rules, m.topic(), m.key(), m.payload());
    let Mapped {
        target,
        kind,
        data_json,
    } = match mapped {
        Ok(x) => x,
        Err(u) => {
            dead_letter(shared, m, &u.reason()).await;
            return;
        }
    };
    let created_at_ms = now_ms();
    match target {
        NTarget::Room(room) => {
            let f = shared.sink.notification_frame(&mut |d| {
                d.str("id", &id)
                    .str("kind", &kind)
                    .raw("data", &data_json)
                    .str("createdAt", &rfc3339_ms(created_at_ms));
            });
            shared.sink.deliver(Target::room(Arc::from(room)), &f);
            stats.notifications.fetch_add(1, Ordering::Relaxed);
        }
        NTarget::User(user) => {
            let n = NewNotification {
                user: Arc::from(user),
                kind: Arc::from(kind),
                data_json: Arc::from(data_json),
                source_key: Some(Arc::from(id.as_str())),
                created_at_ms,
            };
            let mut backoff = RETRY_BACKOFF_MIN;
            loop {
                match shared.sink.store_notification(&n).await {
                    Ok(Noted::New(stored)) => {
                        let f = shared
                            .sink
                            .notification_frame(&mut |d| kafka_notification_data(d, &id, &stored));
                        let target = Target::User {
                            user: stored.user.clone(),
                            except: None,
                        };
                        shared.sink.deliver(target, &f);
                        stats.notifications.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(Noted::Exists(_)) => {
                        stats
                            .notification_duplicates
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(Noted::Refused(r)) => {
                        dead_letter(shared, m, &format!("store refused: {}", r.text())).await;
                        return;
                    }
                    Err(e) => {
                        shared.log_failure("message store", &e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                    }
                }
            }
        }
    }
}

/// The `data` of a stored notification made from a Kafka record: `id` is the record's
/// `topic/partition/offset`, `notificationId` the store's id (what
/// `PUT /api/v1/notifications/:id/read` takes).
pub fn kafka_notification_data(d: &mut Obj, id: &str, n: &Notification) {
    d.str("id", id)
        .u64("notificationId", n.id)
        .str("kind", &n.kind)
        .raw("data", &n.data_json)
        .bool("read", n.read)
        .str("createdAt", &rfc3339_ms(n.created_at_ms));
}

/// Produce `m` to the dead-letter topic with `reason`, retried until the broker confirms.
async fn dead_letter<K: Sink>(shared: &Shared<K>, m: &OwnedMessage, reason: &str) {
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        let mut hs = OwnedHeaders::new();
        if let Some(orig) = m.headers() {
            for h in orig.iter() {
                hs = hs.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        for (k, v) in [
            ("dlq-reason", reason),
            ("dlq-topic", m.topic()),
            ("dlq-partition", partition.as_str()),
            ("dlq-offset", offset.as_str()),
        ] {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&shared.dead_letter_topic).headers(hs);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        // Awaited until librdkafka's delivery report (it retries within
        // kafka_message_timeout); trying again only after a failure, so a record is written
        // twice only if the broker wrote it and the report was lost.
        match shared.producer.send(rec, DEAD_LETTER_QUEUE_WAIT).await {
            Ok(_) => {
                shared
                    .sink
                    .node()
                    .kafka_stats
                    .dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err((e, _)) => shared.log_failure("dead-letter topic", &e),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
    }
}
