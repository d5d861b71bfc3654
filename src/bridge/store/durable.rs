//! Durable direct messages: the stage between the store's commit and the sender's ack when
//! Kafka is configured (`kafka_brokers`). An ack waits for every configured sink.
//!
//! 1. The writer commits a batch to the store (the `(sender, clientMsgId)` dedup claim and the
//!    ids), then [`stage`] produces each new message to `kafka_dm_topic`, keyed by
//!    conversationId, the `message.create` frame as the value. A retry of a message that is
//!    still waiting for its delivery report joins it ([`KafkaSink::pending`]); a retry of one
//!    the store records as produced is acked at once; a retry of one that never made it is
//!    produced now. So no client retry writes a record twice (librdkafka's idempotence covers
//!    its own retries).
//! 2. The [`completer`] takes the produced batches in order. A confirmed record is marked
//!    produced in the store, then delivered live (`message.create`) and acked, all at once: a
//!    device never shows a message its sender is still waiting for. A failed record answers
//!    its waiters with an error and no ack. A record not confirmed within `kafka_ack_timeout`
//!    answers its waiters with an error too, and stays pending: librdkafka keeps retrying it
//!    (within `kafka_message_timeout`); if it is written then, it is delivered live, and a
//!    retry of it gets its ack.
//!
//! Bounded: at most `kafka_pending_max` records wait for reports (more get `kafka busy`), and
//! while the health check finds no broker every send fails at once, unstored.

use std::collections::HashMap;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::*;
use crate::bridge::kafka::{
    BridgeContext, KAFKA_BUSY, KAFKA_REJECTED, KAFKA_TIMEOUT, KAFKA_UNAVAILABLE,
};
use crate::store::ThreadRef;

/// Retries of a failed "produced" mark (the record is written and acked; only a later retry's
/// dedup depends on the mark), with this pause between them.
const MARK_RETRIES: u32 = 5;
const MARK_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The Kafka producer as the DM writer uses it.
pub(super) struct KafkaSink {
    pub producer: FutureProducer<BridgeContext>,
    topic: String,
    ack_timeout: Duration,
    pending_max: usize,
    /// Records produced and not yet confirmed, by message id: the sends waiting for the ack
    /// (the first is the original; a client's retries join it while its ack wait runs).
    /// Past the wait the entry is `late`: emptied, kept until the record is confirmed or
    /// failed, and a retry that finds it is told at once to retry later (never held longer
    /// than one ack wait).
    pending: RefCell<HashMap<u64, Entry>>,
    /// Produced batches in order, for the completer.
    batches: RefCell<VecDeque<Batch>>,
    wake: Notify,
}

#[derive(Default)]
struct Entry {
    waiters: Vec<Send>,
    late: bool,
}

struct Record {
    message: Message,
    participants: Vec<Arc<str>>,
    /// The socket that sent it (it gets the ack, not its own message.create).
    origin: Option<ConnRef>,
    frame: Frame,
    fut: DeliveryFuture,
    /// Stored by this batch (its first waiter is answered as a new message: REST 201).
    fresh: bool,
    /// The `clientMsgId` claims of waiters answered before the record was confirmed (its
    /// ack wait ran out): kept, extended, until it is written (then they record its ack) or
    /// fails (then they are released), so no other node stores it again meanwhile.
    claims: Vec<dedup::Claim>,
}

struct Batch {
    deadline: tokio::time::Instant,
    records: Vec<Record>,
}

impl KafkaSink {
    pub fn new(producer: FutureProducer<BridgeContext>, cfg: &crate::config::Config) -> Self {
        KafkaSink {
            producer,
            topic: cfg.kafka_dm_topic.clone(),
            ack_timeout: cfg.kafka_ack_timeout,
            pending_max: cfg.kafka_pending_max,
            pending: RefCell::new(HashMap::new()),
            batches: RefCell::new(VecDeque::new()),
            wake: Notify::new(),
        }
    }

    /// Whether records wait for their delivery reports (shutdown waits for them).
    pub fn has_pending(&self) -> bool {
        !self.pending.borrow().is_empty()
    }

    /// Produce one record (non-blocking: librdkafka queues it). `trace`: the traced
    /// `kafka.produce` span's ids, handed on as a `traceparent` header for the consumers.
    fn produce(
        &self,
        m: &Message,
        frame: &Frame,
        trace: Option<(u128, u64)>,
    ) -> std::result::Result<DeliveryFuture, &'static str> {
        let server = uuid::Uuid::from_u128(m.server_msg_id).to_string();
        let event = uuid::Uuid::from_u128(m.event_id).to_string();
        let headers = crate::bridge::kafka::dm_headers(
            &m.sender,
            &event,
            &server,
            m.client_msg_id.as_deref(),
        );
        let traceparent =
            trace.map(|(t, s)| crate::trace::propagation::format_traceparent(t, s, true));
        let headers = match &traceparent {
            Some(v) => headers.insert(rdkafka::message::Header {
                key: "traceparent",
                value: Some(v.as_bytes()),
            }),
            None => headers,
        };
        let record = FutureRecord::to(&self.topic)
            .key(m.thread.as_bytes())
            .payload(frame.payload())
            .headers(headers);
        self.producer
            .send_result(record)
            .map_err(|(e, _)| error_text(&e))
    }
}

/// The sender's error for a record Kafka did not take.
fn error_text(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => KAFKA_BUSY,
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord,
        ) => KAFKA_REJECTED,
        _ => KAFKA_UNAVAILABLE,
    }
}

/// Before a batch is stored: with no broker reachable every send fails at once (unstored, so
/// nothing waits on a broker that is down); past `kafka_pending_max` the excess gets `kafka
/// busy`. Returns the sends to store.
pub(super) fn admit<S>(ctx: &Ctx<S>, jobs: Vec<Send>) -> Vec<Send> {
    let stats = &ctx.node.kafka_stats;
    if !stats.configured.load(Ordering::Relaxed) {
        return jobs;
    }
    // Configured without a producer (librdkafka refused a setting): never ack unproduced.
    let Some(k) = ctx.kafka.as_ref().filter(|_| stats.is_up()) else {
        stats
            .produce_failed
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        answer_waiters(ctx, &jobs, KAFKA_UNAVAILABLE);
        done(ctx, jobs.len());
        return Vec::new();
    };
    let room = k.pending_max.saturating_sub(k.pending.borrow().len());
    if jobs.len() <= room {
        return jobs;
    }
    let mut jobs = jobs;
    let over = jobs.split_off(room);
    stats.busy.fetch_add(over.len() as u64, Ordering::Relaxed);
    answer_waiters(ctx, &over, KAFKA_BUSY);
    done(ctx, over.len());
    jobs
}

/// A message to produce: its participants, the sends waiting for it (the first is the
/// original), and whether this batch stored it.
type ToProduce = (Message, Vec<Arc<str>>, Vec<Send>, bool);

/// A stored batch: produce what must be, answer what can be answered now, hand the rest to
/// the completer.
pub(super) async fn stage<S: Store>(ctx: &Rc<Ctx<S>>, jobs: Vec<Send>, outs: Vec<Appended>) {
    let Some(k) = &ctx.kafka else { return };
    let stats = &ctx.node.store_stats;
    let kstats = &ctx.node.kafka_stats;
    let mut answered = 0;
    // Message id -> (message, participants, waiters), in batch order.
    let mut order: Vec<u64> = Vec::new();
    let mut produce: HashMap<u64, ToProduce> = HashMap::new();
    let mut dups: Vec<(Send, Message)> = Vec::new();
    for (job, out) in jobs.into_iter().zip(outs) {
        match out {
            Appended::New {
                message,
                participants,
            } => {
                stats.stored.fetch_add(1, Ordering::Relaxed);
                // Traced: the wait for the broker, until the job is acked and dropped.
                let mut job = job;
                if !job.span.is_none() {
                    job.step = crate::child_span!(
                        &job.span,
                        "kafka.produce",
                        otel.kind = "producer",
                        messaging.system = "kafka",
                        messaging.destination.name = ctx.node.cfg.kafka_dm_topic.as_str(),
                    );
                }
                order.push(message.id);
                produce.insert(message.id, (message, participants, vec![job], true));
            }
            Appended::Duplicate(m) => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                let mut pending = k.pending.borrow_mut();
                if let Some(e) = pending.get_mut(&m.id) {
                    if e.late {
                        // Its ack wait ran out and librdkafka is still retrying it: holding
                        // this retry could outlast what its origin waits. Once the record is
                        // written, a retry is acked from the store's mark.
                        drop(pending);
                        answer_waiters(ctx, std::slice::from_ref(&job), KAFKA_TIMEOUT);
                        answered += 1;
                    } else {
                        kstats.joined.fetch_add(1, Ordering::Relaxed);
                        e.waiters.push(job);
                    }
                } else if let Some((_, _, waiters, _)) = produce.get_mut(&m.id) {
                    // The original is in this very batch.
                    kstats.joined.fetch_add(1, Ordering::Relaxed);
                    waiters.push(job);
                } else {
                    drop(pending);
                    dups.push((job, m));
                }
            }
            Appended::Refused(_) => {
                complete(ctx, &job, out);
                answered += 1;
            }
        }
    }
    if !dups.is_empty() {
        let ids: Vec<u64> = dups.iter().map(|(_, m)| m.id).collect();
        match bounded(ctx.timeout, ctx.store.produced(&ids)).await {
            Ok(flags) if flags.len() == dups.len() => {
                for ((job, m), done_before) in dups.into_iter().zip(flags) {
                    if done_before {
                        ack_of(ctx, &job, &m, false);
                        answered += 1;
                    } else if let Some((_, _, waiters, _)) = produce.get_mut(&m.id) {
                        waiters.push(job);
                    } else {
                        // Never written (its first produce failed or was lost): produce it
                        // now, to everyone it was for.
                        let participants = participants_of(ctx, &m).await;
                        order.push(m.id);
                        produce.insert(m.id, (m, participants, vec![job], false));
                    }
                }
            }
            _ => {
                let jobs: Vec<Send> = dups.into_iter().map(|(j, _)| j).collect();
                fail_all(
                    ctx,
                    &jobs,
                    &StoreError::Unavailable("produced lookup".into()),
                );
                answered += jobs.len();
            }
        }
    }
    let deadline = tokio::time::Instant::now() + k.ack_timeout;
    let mut records = Vec::with_capacity(order.len());
    for id in order {
        let Some((message, participants, waiters, fresh)) = produce.remove(&id) else {
            continue;
        };
        let frame = message_create(ctx, &message);
        let trace = waiters
            .iter()
            .find_map(|w| crate::trace::context_of(&w.step));
        match k.produce(&message, &frame, trace) {
            Ok(fut) => {
                let origin = waiters
                    .first()
                    .filter(|w| matches!(w.answer, Answer::Ws { .. }))
                    .map(|w| w.origin);
                k.pending.borrow_mut().insert(
                    id,
                    Entry {
                        waiters,
                        late: false,
                    },
                );
                records.push(Record {
                    message,
                    participants,
                    origin,
                    frame,
                    fut,
                    fresh,
                    claims: Vec::new(),
                });
            }
            Err(text) => {
                kstats
                    .produce_failed
                    .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                answer_waiters(ctx, &waiters, text);
                answered += waiters.len();
            }
        }
    }
    done(ctx, answered);
    kstats
        .pending
        .store(k.pending.borrow().len() as u64, Ordering::Relaxed);
    if !records.is_empty() {
        k.batches
            .borrow_mut()
            .push_back(Batch { deadline, records });
        k.wake.notify_one();
    }
}

/// Who a re-produced duplicate goes to: the pair of a DM, the thread's participants of a
/// group message (the sender alone if the thread cannot be read now).
async fn participants_of<S: Store>(ctx: &Ctx<S>, m: &Message) -> Vec<Arc<str>> {
    let mut users = match &m.to {
        Some(to) => vec![m.sender.clone(), to.clone()],
        None => {
            let t = ThreadRef::Id(m.thread.clone());
            match bounded(ctx.timeout, ctx.store.thread(&m.sender, &t)).await {
                Ok(crate::store::Lookup::Found(v)) => v.participants,
                _ => vec![m.sender.clone()],
            }
        }
    };
    users.sort_unstable();
    users.dedup();
    users
}

fn answer_waiters<S>(ctx: &Ctx<S>, waiters: &[Send], text: &str) {
    for w in waiters {
        if gave_up(ctx, w) {
            continue;
        }
        answer_error(
            ctx,
            w.origin,
            &w.answer,
            w.msg.client_msg_id.as_deref(),
            text,
        );
    }
}

/// Whether `w`'s origin is an HTTP request its shard has (nearly) stopped waiting for: it
/// answered 503 at `answer_wait`, and a later answer would be taken for the reply to the
/// connection's next request. A margin of [`HTTP_ANSWER_MARGIN`] covers the hop from the
/// shard.
fn gave_up<S>(ctx: &Ctx<S>, w: &Send) -> bool {
    matches!(w.answer, Answer::Http { .. })
        && w.queued_at.elapsed() + HTTP_ANSWER_MARGIN
            >= crate::shard::http_answer_wait(&ctx.node.cfg)
}

/// See [`gave_up`].
const HTTP_ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// Takes the produced batches in order: confirmed records are marked produced, delivered and
/// acked; failed ones answered with errors; unconfirmed ones at the deadline answered with
/// errors and left to [`late`].
pub(super) async fn completer<S: Store + 'static>(ctx: Rc<Ctx<S>>) {
    let Some(k) = &ctx.kafka else { return };
    loop {
        let next = k.batches.borrow_mut().pop_front();
        let Some(batch) = next else {
            k.wake.notified().await;
            continue;
        };
        let mut confirmed = Vec::with_capacity(batch.records.len());
        let mut unconfirmed = Vec::new();
        for mut r in batch.records {
            match tokio::time::timeout_at(batch.deadline, &mut r.fut).await {
                Ok(Ok(Ok(_))) => confirmed.push(r),
                Ok(Ok(Err((e, _)))) => fail_record(&ctx, r, error_text(&e)),
                Ok(Err(_)) => fail_record(&ctx, r, KAFKA_UNAVAILABLE),
                Err(_) => unconfirmed.push(r),
            }
        }
        // Answer the timed-out ones first (before `confirm` awaits the store, when retries
        // could join them), and mark them late.
        let kstats = &ctx.node.kafka_stats;
        for r in &mut unconfirmed {
            let waiters = k
                .pending
                .borrow_mut()
                .get_mut(&r.message.id)
                .map(|e| {
                    e.late = true;
                    std::mem::take(&mut e.waiters)
                })
                .unwrap_or_default();
            for w in &waiters {
                if let Some(c) = w.claim.take() {
                    c.extend_late();
                    r.claims.push(c);
                }
            }
            kstats
                .ack_timeouts
                .fetch_add(waiters.len() as u64, Ordering::Relaxed);
            answer_waiters(&ctx, &waiters, KAFKA_TIMEOUT);
            done(&ctx, waiters.len());
        }
        // Each late record on its own: one that is written is delivered then, whatever the
        // others of its batch do.
        for r in unconfirmed {
            tokio::task::spawn_local(late(ctx.clone(), r));
        }
        confirm(&ctx, confirmed).await;
    }
}

/// A record whose ack wait ran out: librdkafka keeps retrying it; it is delivered live when
/// it is written, or dropped from the pending table when it fails (its sender already got an
/// error; a later retry produces it again).
async fn late<S: Store + 'static>(ctx: Rc<Ctx<S>>, mut r: Record) {
    match (&mut r.fut).await {
        Ok(Ok(_)) => {
            ctx.node
                .kafka_stats
                .written_late
                .fetch_add(1, Ordering::Relaxed);
            confirm(&ctx, vec![r]).await;
        }
        Ok(Err((e, _))) => fail_record(&ctx, r, error_text(&e)),
        Err(_) => fail_record(&ctx, r, KAFKA_UNAVAILABLE),
    }
}

fn fail_record<S>(ctx: &Ctx<S>, r: Record, text: &str) {
    let Some(k) = &ctx.kafka else { return };
    let waiters = k
        .pending
        .borrow_mut()
        .remove(&r.message.id)
        .unwrap_or_default()
        .waiters;
    let kstats = &ctx.node.kafka_stats;
    kstats
        .produce_failed
        .fetch_add(waiters.len() as u64, Ordering::Relaxed);
    kstats
        .pending
        .store(k.pending.borrow().len() as u64, Ordering::Relaxed);
    answer_waiters(ctx, &waiters, text);
    done(ctx, waiters.len());
}

/// Written records: mark them produced (one store call), then deliver each live and ack its
/// waiters. A mark that fails does not hold the acks back (the record is written and stored);
/// it is retried, and until it lands a retry of the message would be produced again.
async fn confirm<S: Store + 'static>(ctx: &Rc<Ctx<S>>, records: Vec<Record>) {
    let Some(k) = &ctx.kafka else { return };
    if records.is_empty() {
        return;
    }
    let ids: Vec<u64> = records.iter().map(|r| r.message.id).collect();
    if bounded(ctx.timeout, ctx.store.mark_produced(&ids))
        .await
        .is_err()
    {
        tokio::task::spawn_local(retry_mark(ctx.clone(), ids));
    }
    let kstats = &ctx.node.kafka_stats;
    kstats
        .produced
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    for mut r in records {
        let waiters = k
            .pending
            .borrow_mut()
            .remove(&r.message.id)
            .unwrap_or_default()
            .waiters;
        live(ctx, &r.message, &r.participants, r.origin, &r.frame);
        for (i, w) in waiters.iter().enumerate() {
            ack_of(ctx, w, &r.message, i == 0 && r.fresh);
        }
        // Written after its ack wait: a retry on another node gets its ack from now on.
        for c in r.claims.drain(..) {
            c.acked(&r.message);
        }
        done(ctx, waiters.len());
    }
    kstats
        .pending
        .store(k.pending.borrow().len() as u64, Ordering::Relaxed);
}

async fn retry_mark<S: Store>(ctx: Rc<Ctx<S>>, ids: Vec<u64>) {
    for _ in 0..MARK_RETRIES {
        tokio::time::sleep(MARK_RETRY_PAUSE).await;
        if bounded(ctx.timeout, ctx.store.mark_produced(&ids))
            .await
            .is_ok()
        {
            return;
        }
    }
    ctx.node
        .kafka_stats
        .marks_lost
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    tracing::warn!(
        messages = ids.len(),
        "messages written to Kafka could not be marked produced in the store: a client retry of one of them would be produced again"
    );
}

/// The answer of a waiter whose record is written: `message.ack` (socket) or `201` (REST).
/// `created`: the sender of a new message (REST answers `201`; a retry gets `200`).
fn ack_of<S>(ctx: &Ctx<S>, w: &Send, m: &Message, created: bool) {
    if gave_up(ctx, w) {
        return;
    }
    match &w.answer {
        Answer::Ws { id } => {
            ack(ctx, w.origin, id.as_deref(), m);
            settle_acked(w, m);
        }
        Answer::Http { keep, cors } => {
            let out = Appended::Duplicate(m.clone());
            let mut r = crate::rest::render_appended(&out);
            if created && r.status == Status::OK {
                r.status = Status::CREATED;
            }
            http_answer(ctx, w.origin, r.status, &r.body, *keep, cors.as_deref());
        }
    }
}
