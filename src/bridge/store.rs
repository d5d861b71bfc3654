//! The message store's side of the bridge: what shards hand over as [`StoreJob`]s, run
//! against the node's [`Store`] on the bridge's runtime, and answered through the shards'
//! inboxes.
//!
//! **Direct messages** (`message.send`, `POST /api/v1/messages/threads/:id/messages`) go to
//! one writer task that commits them in batches: while one [`Store::append`] runs, the next
//! batch accumulates (at most [`APPEND_BATCH_MAX`]), so durability costs one commit per batch,
//! not per message. For each stored message the writer builds the `message.create` frame once,
//! hands it to every participant's devices (the sender's other devices included) through the
//! delivery seam, then answers the origin: `message.ack` on a socket, `201` on REST. A failed
//! or timed-out batch answers every job in it with an error and no ack; nothing was acked, so
//! nothing is lost, and a retry with the same `clientMsgId` is deduplicated by the store.
//! With `redis_url` and no `database_url`, a `message.send` is first claimed in Redis
//! (`store/dedup.rs`), so that a retry on another node gets the first copy's ack too.
//!
//! **Reads and updates** (`sync`, receipts, notifications, the REST API's reads) run as local
//! tasks, at most [`STORE_READS_IN_FLIGHT_MAX`] at once; more waiting jobs than
//! [`STORE_JOBS_QUEUED_MAX`] are refused with "server busy, retry later".
//!
//! Every store call is bounded by `store_timeout`. The store's health (a ping every
//! [`HEALTH_INTERVAL`]) is the bridge's readiness.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};

pub mod conv;
mod dedup;
mod durable;

pub use conv::{ConvEvent, ConvJob};

use super::{BridgeMsg, Shards};
use crate::http::{CorsHeaders, Response, Status};
use crate::proto::envelope::{FrameBuilder, Obj};
use crate::proto::json::rfc3339_ms;
use crate::proto::Frame;
use crate::route::{ConnRef, Target};
use crate::shard::{Node, SendFailure, ShardMsg};
use crate::store::pg::{PgConfig, PgStore};
use crate::store::reconnect::Reconnecting;
use crate::store::{
    memory::MemoryStore, Appended, MarkRequest, Message, NewMessage, NewNotification, Store,
    StoreError, APPEND_BATCH_MAX,
};

/// Store jobs running at once (reads, marks, notifications): bounds PostgreSQL round trips in
/// flight beside the writer's (the pool's size bounds connections).
pub const STORE_READS_IN_FLIGHT_MAX: usize = 64;

/// Store jobs accepted but not yet finished (DMs waiting for their batch included). Past it a
/// job is answered "server busy, retry later" at once.
pub const STORE_JOBS_QUEUED_MAX: usize = 65_536;

/// Most bytes of `message.create` frames one `sync` answer carries; a page stops early
/// (`more: true`) past it, so a sync never comes near `send_queue_bytes_max`.
pub const SYNC_PAGE_BYTES_MAX: usize = 256 * 1024;

/// Added to `store_timeout` for the bridge's own deadline on a store call.
pub const BACKSTOP: Duration = Duration::from_millis(500);

/// Messages held for shards whose inbox was full (acks, errors, `message.create`, sync pages,
/// HTTP answers), retried in order every [`BACKLOG_RETRY`]; past it the oldest is dropped and
/// counted (a dropped `message.create` is stored: `sync` returns it).
pub const SHARD_BACKLOG_MAX: usize = 65_536;

/// How often the backlog is retried.
pub const BACKLOG_RETRY: Duration = Duration::from_millis(20);

/// Bytes of content (and attachment URLs) of the DMs waiting for the writer; past it a send is
/// answered "server busy, retry later" (the job count alone would allow ~1 GiB of 16 KiB DMs).
pub const STORE_QUEUED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Least time between two log lines about failed batches (a database that is down fails
/// every batch at once).
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// How often the store's health is checked (and a lost PostgreSQL noticed by `/ready`).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The error text of a DM (or REST call) the store could not take: nothing was acked.
pub const STORE_UNAVAILABLE: &str = "message store unavailable, retry later";

/// The error text when the bridge has more store jobs than it holds.
pub const BUSY: &str = "server busy, retry later";

/// How the origin of a job is answered.
pub enum Answer {
    /// A WebSocket command: frames to the connection; `id` echoed.
    Ws { id: Option<Box<str>> },
    /// A waiting HTTP request: one response, then the connection carries on (`keep`) or closes.
    Http { keep: bool, cors: Option<Arc<str>> },
}

/// Work for the message store, from a shard.
pub enum StoreJob {
    /// Store a message, deliver it to every participant's devices, answer the origin.
    Send {
        origin: ConnRef,
        answer: Answer,
        msg: NewMessage,
        /// `dm.send` when traced (else `Span::none()`): it ends when the job does, at the ack.
        span: tracing::Span,
    },
    /// `sync {since}`: the user's messages after `since`, then `sync.done`.
    Sync {
        origin: ConnRef,
        id: Option<Box<str>>,
        user: Arc<str>,
        since: Option<u64>,
        limit: usize,
    },
    /// Record a `mark.read` / `mark.delivered` (the live receipt went out from the shard).
    Mark(MarkRequest),
    /// Store a notification (server API), deliver it to the user's devices, answer `201`.
    Notify {
        origin: ConnRef,
        keep: bool,
        cors: Option<Arc<str>>,
        n: NewNotification,
    },
    /// A REST API request, parsed and authenticated on the shard: run it
    /// ([`crate::rest::execute`]) as `user` and answer the waiting HTTP connection `origin`
    /// with the whole response (`keep`, and `cors` the origin to echo).
    Rest {
        origin: ConnRef,
        user: Arc<str>,
        op: crate::rest::RestOp,
        keep: bool,
        cors: Option<Arc<str>>,
        /// The request's `http.request` span when traced: it ends with the answer.
        span: tracing::Span,
    },
    /// Typing or a receipt to a stored conversation's participants ([`conv`]).
    Conversation(Box<ConvJob>),
    /// `mark.read` / `mark.delivered` `{messageIds}` with neither `to` nor `conversationId`
    /// (`ids_raw`: the checked array, at most `MARK_IDS_MAX` ids): `conv::mark_by_messages`.
    MarkByMessages {
        origin: ConnRef,
        id: Option<Box<str>>,
        user: Arc<str>,
        read: bool,
        ids_raw: Box<str>,
        at_ms: u64,
    },
    /// `presence.watch {scope: "conversations"}`: the users who share a thread with `user`,
    /// at most `limit` (`conv::contacts`), handed back to `origin`'s shard.
    Contacts {
        origin: ConnRef,
        id: Option<Box<str>>,
        user: Arc<str>,
        limit: usize,
    },
}

/// Counters and gauges of the store, kept by the bridge and rendered by `/metrics`.
#[derive(Default)]
pub struct StoreStats {
    pub batches: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub busy: AtomicU64,
    pub live_missed: AtomicU64,
    /// Messages for a shard whose inbox was full, held back and handed on later.
    pub delayed: AtomicU64,
    /// Messages held back now.
    pub backlog: AtomicU64,
    pub syncs: AtomicU64,
    pub queued: AtomicU64,
    pub last_batch: AtomicU64,
    /// 1 while the store answers its health check.
    pub up: AtomicU64,
    /// The in-memory store's occupancy (zero with PostgreSQL), refreshed every health check.
    pub memory_bytes: AtomicU64,
    pub memory_budget: AtomicU64,
    pub memory_messages: AtomicU64,
    pub evicted_messages: AtomicU64,
}

/// The bridge thread's main task.
pub async fn run(node: Arc<Node>, rx: mpsc::Receiver<BridgeMsg>) {
    match node.cfg.database_url.clone() {
        None => {
            let budget = node.cfg.store_memory_bytes;
            tracing::info!(
                budget_bytes = budget,
                "message store: in memory (it forgets every thread, message and notification on restart; set database_url for PostgreSQL)"
            );
            let store = Rc::new(MemoryStore::new(budget));
            serve(node, rx, store).await;
        }
        Some(url) => {
            let pg = pg_config(&node.cfg, url);
            tracing::info!(
                host = %url_host(&pg.url),
                pool_size = pg.pool_size,
                "message store: PostgreSQL (durable); connecting and applying migrations"
            );
            // Set up in the background: the node serves (and says the store is down) while
            // the database cannot be reached.
            let store = Rc::new(Reconnecting::new("postgres", move || {
                PgStore::connect(pg.clone())
            }));
            serve(node, rx, store).await;
        }
    }
}

/// The PostgreSQL settings from the node's configuration: the pool's size and connect
/// timeout from their keys; every per-call bound from `store_timeout` (a statement, a wait for
/// a pooled connection, an idle transaction, and the client-side deadline), so the store's own
/// timeout answers before the bridge's backstop. The rest are `pg`'s documented defaults.
pub fn pg_config(cfg: &crate::config::Config, url: String) -> PgConfig {
    let mut pg = PgConfig::new(url);
    pg.pool_size = cfg.database_pool_size;
    pg.connect_timeout = cfg.database_connect_timeout;
    pg.statement_timeout = cfg.store_timeout;
    pg.pool_wait_timeout = cfg.store_timeout;
    pg.idle_in_transaction_timeout = cfg.store_timeout;
    // Longer than the statement timeout, so the server's clean cancel comes first.
    pg.call_timeout = cfg.store_timeout + BACKSTOP / 2;
    pg
}

/// `host:port` of a `postgres://` URL (the only form config accepts), for the log (never the
/// user or password).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or("")
}

/// What the store's tasks share.
struct Ctx<S> {
    node: Arc<Node>,
    shards: Shards,
    store: Rc<S>,
    timeout: Duration,
    fb: RefCell<FrameBuilder>,
    /// DMs waiting for the writer.
    sends: RefCell<VecDeque<Send>>,
    wake_writer: Notify,
    jobs: Cell<usize>,
    reads: Semaphore,
    /// Per shard, what its full inbox could not take yet (in order).
    backlog: RefCell<Vec<VecDeque<ShardMsg>>>,
    backlog_len: Cell<usize>,
    /// Wakes the retry task when the backlog stops being empty (it sleeps otherwise: no
    /// timer runs on an idle node).
    backlog_wake: Notify,
    /// Content bytes of the queued sends.
    queued_bytes: Cell<usize>,
    /// The health check has answered once: until then `switchboard_store_up` 0 means "not
    /// known yet" (the node just started), not "down", and sends are tried.
    health_known: Cell<bool>,
    /// Failed messages not yet logged, and when the last line was.
    unlogged_failures: Cell<u64>,
    last_failure_log: Cell<Option<tokio::time::Instant>>,
    /// The Kafka producer of durable DMs (`kafka_brokers` set): acks wait for it too.
    kafka: Option<durable::KafkaSink>,
    /// The other nodes (`redis_url` set): deliveries made here reach their devices too.
    redis: Option<Rc<super::redis::Redis>>,
    /// The `clientMsgId` claims in Redis (`redis_url` set, no `database_url`): a retry on
    /// another node gets the first copy's ack ([`dedup`]).
    dedup: Option<dedup::Dedup>,
    /// Threads' participants, for typing and receipts to stored conversations.
    members: RefCell<conv::Cache>,
    /// Typing events waiting, in arrival order, for their conversation's participants to be
    /// read (one read per conversation at a time).
    typing_waiting: RefCell<conv::Waiting>,
}

struct Send {
    origin: ConnRef,
    answer: Answer,
    msg: NewMessage,
    /// When the bridge accepted it: a send that waited longer than `store_timeout` for its
    /// batch is failed unstored, so an answer never comes later than the origin waits.
    queued_at: tokio::time::Instant,
    /// Its `clientMsgId` claim in Redis ([`dedup`]): recorded as acked when its ack goes
    /// out ([`settle_acked`]), released when it is dropped unacked.
    claim: Cell<Option<dedup::Claim>>,
    /// The step it waits on, when traced (`kafka.produce`); declared before `span` so it
    /// closes first.
    step: tracing::Span,
    /// Its trace (`dm.send`, or a REST request's `http.request`), when traced: it ends when
    /// the job is answered and dropped.
    span: tracing::Span,
}

impl Send {
    fn bytes(&self) -> usize {
        self.msg.content.len() + self.msg.attachment_url.as_ref().map_or(0, |a| a.len())
    }
}

async fn serve<S: Store + 'static>(
    node: Arc<Node>,
    mut rx: mpsc::Receiver<BridgeMsg>,
    store: Rc<S>,
) {
    let node_shards = node.inboxes.len();
    let kafka = kafka_sink(&node);
    let redis = node.cfg.redis_url.as_deref().map(|u| {
        // Validated with the config: a URL list that parses.
        let urls = crate::cluster::parse_redis_urls(u, node.cfg.redis_cluster).unwrap_or_default();
        super::redis::Redis::new(node.clone(), urls)
    });
    // With PostgreSQL the store's unique key already holds across nodes: no Redis round trip.
    let dedup = match (&redis, &node.cfg.database_url) {
        (Some(r), None) => Some(dedup::Dedup::new(node.clone(), r.clone())),
        _ => None,
    };
    let ctx = Rc::new(Ctx {
        shards: Shards {
            inboxes: node.inboxes.clone(),
            node_id: node.id,
        },
        timeout: node.cfg.store_timeout,
        node,
        store,
        fb: RefCell::new(FrameBuilder::default()),
        sends: RefCell::new(VecDeque::new()),
        wake_writer: Notify::new(),
        jobs: Cell::new(0),
        reads: Semaphore::new(STORE_READS_IN_FLIGHT_MAX),
        backlog: RefCell::new((0..node_shards).map(|_| VecDeque::new()).collect()),
        backlog_len: Cell::new(0),
        backlog_wake: Notify::new(),
        queued_bytes: Cell::new(0),
        health_known: Cell::new(false),
        unlogged_failures: Cell::new(0),
        last_failure_log: Cell::new(None),
        kafka,
        redis,
        dedup,
        members: RefCell::new(conv::Cache::default()),
        typing_waiting: RefCell::new(conv::Waiting::default()),
    });
    let redis_tasks = ctx.redis.as_ref().map(|r| {
        // Received deliveries go to this node's shards only, through the ordered backlog
        // (never published again). Weak: the store context owns the Redis clients.
        let weak = Rc::downgrade(&ctx);
        r.set_deliver(Box::new(move |target, frame| {
            if let Some(ctx) = weak.upgrade() {
                deliver_here(&ctx, target, frame);
            }
        }));
        let weak = Rc::downgrade(&ctx);
        r.set_to_shard(Box::new(move |shard, msg| {
            if let Some(ctx) = weak.upgrade() {
                if shard < ctx.shards.inboxes.len() {
                    to_shard(&ctx, shard, msg);
                }
            }
        }));
        r.start()
    });
    let writer = tokio::task::spawn_local(writer(ctx.clone()));
    let claims = ctx
        .dedup
        .as_ref()
        .map(|_| tokio::task::spawn_local(dedup::worker(ctx.clone())));
    let kafka_tasks = ctx.kafka.as_ref().map(|k| {
        (
            tokio::task::spawn_local(durable::completer(ctx.clone())),
            tokio::task::spawn_local(super::kafka::health(
                ctx.node.clone(),
                k.producer.clone(),
                ctx.node.cfg.kafka_dm_topic.clone(),
            )),
        )
    });
    let health = tokio::task::spawn_local(health(ctx.clone()));
    let retry = tokio::task::spawn_local(retry_backlog(ctx.clone()));
    let notify = start_notify(&ctx);
    let proxy = Rc::new(super::proxy::Proxy::new(ctx.node.clone()));
    let mut batch = Vec::with_capacity(256);
    'outer: loop {
        if rx.recv_many(&mut batch, 256).await == 0 {
            break;
        }
        for msg in batch.drain(..) {
            match msg {
                BridgeMsg::Store(job) => accept(&ctx, *job),
                BridgeMsg::Proxy(job) => super::proxy::accept(&proxy, *job),
                // Only sent while clustered (redis_url set).
                BridgeMsg::Deliver { target, frame } => {
                    if let Some(r) = &ctx.redis {
                        r.publish(&target, &frame);
                    }
                }
                BridgeMsg::DeliverTraced(d) => {
                    if let Some(r) = &ctx.redis {
                        let (target, frame, span) = *d;
                        r.publish_traced(&target, &frame, &span);
                    }
                }
                BridgeMsg::Room { room, t } => {
                    if let Some(r) = &ctx.redis {
                        r.room(&room, t);
                    }
                }
                BridgeMsg::User { user, t } => {
                    if let Some(r) = &ctx.redis {
                        r.user(&user, t);
                    }
                }
                BridgeMsg::Topic { topic, t } => {
                    if let Some(r) = &ctx.redis {
                        r.topic(&topic, t);
                    }
                }
                BridgeMsg::Service { to, service, body } => {
                    if let Some(r) = &ctx.redis {
                        r.service(&to, service, &body);
                    }
                }
                BridgeMsg::Presence {
                    user,
                    online,
                    frame,
                    record,
                } => {
                    if let Some(r) = &ctx.redis {
                        r.presence(user, online, frame, record);
                    }
                }
                BridgeMsg::RoomPresence {
                    room,
                    user,
                    join,
                    frame,
                    except,
                } => {
                    if let Some(r) = &ctx.redis {
                        r.room_presence(room, user, join, frame, except);
                    }
                }
                BridgeMsg::RoomRead(read) => match &ctx.redis {
                    Some(r) => r.room_read(*read),
                    None => {
                        let shard = read.owner;
                        let msg = read.answer(None);
                        to_shard(
                            &ctx,
                            shard,
                            ShardMsg::service(crate::shard::service::ServiceMsg::Presence(msg)),
                        );
                    }
                },
                BridgeMsg::PresenceRead(read) => match &ctx.redis {
                    Some(r) => r.presence_read(*read),
                    // Only sent while clustered; answered from this node's state otherwise.
                    None => {
                        let shard = read.to.shard as usize;
                        let msg = read.answer(None);
                        to_shard(
                            &ctx,
                            shard,
                            ShardMsg::service(crate::shard::service::ServiceMsg::Presence(msg)),
                        );
                    }
                },
                // Only sent while clustered.
                BridgeMsg::History(job) => {
                    if let Some(r) = &ctx.redis {
                        r.history_job(*job);
                    }
                }
                BridgeMsg::Shutdown => break 'outer,
            }
        }
    }
    // Clustered: this node's users stay present for the offline grace (a drained node's users
    // who reconnect elsewhere are never offline), then another node reaps what is left.
    if let Some(r) = &ctx.redis {
        r.farewell().await;
    }
    // Finish what was accepted: every DM in the writer's queue is stored and answered (or
    // failed) before the thread ends.
    // Bounded by shutdown_timeout: with the database down every batch takes store_timeout.
    health.abort();
    ctx.wake_writer.notify_one();
    let deadline = tokio::time::Instant::now() + ctx.node.cfg.shutdown_timeout;
    while ctx.jobs.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if !ctx.sends.borrow().is_empty() {
            ctx.wake_writer.notify_one();
        }
    }
    // The last acks' records reach Redis (bounded: Redis may be away).
    if let Some(d) = &ctx.dedup {
        let until = tokio::time::Instant::now() + ctx.node.cfg.redis_timeout;
        while d.busy() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if ctx.jobs.get() > 0 {
        tracing::warn!(
            jobs = ctx.jobs.get(),
            "store jobs unfinished at the shutdown deadline (none of them was acked)"
        );
    }
    if let Some(k) = &ctx.kafka {
        // Records still pending (their senders got errors) are given the rest of the
        // deadline to be written; none of them was acked.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = k.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            p.flush(left)
        })
        .await;
        // Let the completer and the late tasks mark and deliver what the flush confirmed.
        while k.has_pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if let Some((completer, health)) = kafka_tasks {
        completer.abort();
        health.abort();
    }
    writer.abort();
    if let Some(c) = claims {
        c.abort();
    }
    retry.abort();
    for t in redis_tasks.into_iter().flatten() {
        t.abort();
    }
    if let Some(n) = notify {
        n.abort();
    }
}

/// The node's Kafka producer for DMs, when `kafka_brokers` is set. One that cannot be created
/// (a setting librdkafka refuses) leaves Kafka down: every DM gets an error, `/ready` says so.
fn kafka_sink(node: &Arc<Node>) -> Option<durable::KafkaSink> {
    if node.cfg.kafka_brokers.is_empty() {
        return None;
    }
    node.kafka_stats.configured.store(true, Ordering::Relaxed);
    match super::kafka::producer(&node.cfg, node.clone()) {
        Ok(p) => {
            tracing::info!(
                brokers = %node.cfg.kafka_brokers.join(","),
                topic = %node.cfg.kafka_dm_topic,
                "kafka: direct messages are acked once the broker has them (acks=all, idempotent)"
            );
            Some(durable::KafkaSink::new(p, &node.cfg))
        }
        Err(e) => {
            // Never fall back to acking unproduced messages: `admit` refuses every send while
            // Kafka is configured and has no producer (`configured` set, `up` 0).
            tracing::error!(error = %e, "kafka: the producer cannot be created; direct messages get errors and /ready answers 503");
            None
        }
    }
}

fn accept<S: Store + 'static>(ctx: &Rc<Ctx<S>>, job: StoreJob) {
    // Typing keeps its own order and bounds (most of it is answered from the cache, here).
    let job = match job {
        StoreJob::Conversation(j) if matches!(j.what, ConvEvent::Typing { .. }) => {
            conv::typing_event(ctx, *j);
            return;
        }
        other => other,
    };
    if ctx.jobs.get() >= STORE_JOBS_QUEUED_MAX {
        ctx.node.store_stats.busy.fetch_add(1, Ordering::Relaxed);
        refuse(ctx, job, BUSY);
        return;
    }
    ctx.jobs.set(ctx.jobs.get() + 1);
    ctx.node
        .store_stats
        .queued
        .store(ctx.jobs.get() as u64, Ordering::Relaxed);
    match job {
        StoreJob::Send {
            origin,
            answer,
            msg,
            span,
        } => {
            let send = Send {
                origin,
                answer,
                msg,
                queued_at: tokio::time::Instant::now(),
                claim: Cell::new(None),
                step: tracing::Span::none(),
                span,
            };
            if ctx.queued_bytes.get() + send.bytes() > STORE_QUEUED_BYTES_MAX {
                ctx.node.store_stats.busy.fetch_add(1, Ordering::Relaxed);
                let cmid = send.msg.client_msg_id.as_deref();
                answer_error(ctx, send.origin, &send.answer, cmid, BUSY);
                done(ctx, 1);
                return;
            }
            match &ctx.dedup {
                Some(_) if dedup::wanted(&send) => dedup::claim(ctx, send),
                _ => enqueue(ctx, send),
            }
        }
        other => {
            let ctx = ctx.clone();
            let queued_at = tokio::time::Instant::now();
            tokio::task::spawn_local(async move {
                let _permit = ctx.reads.acquire().await;
                // A job that waited store_timeout for its turn is answered unrun: its origin
                // is about to give up on it.
                if queued_at.elapsed() >= ctx.timeout {
                    refuse(&ctx, other, STORE_UNAVAILABLE);
                } else {
                    run_job(&ctx, other).await;
                }
                done(&ctx, 1);
            });
        }
    }
}

/// Queue a send for the writer.
fn enqueue<S>(ctx: &Ctx<S>, send: Send) {
    ctx.queued_bytes.set(ctx.queued_bytes.get() + send.bytes());
    ctx.sends.borrow_mut().push_back(send);
    ctx.wake_writer.notify_one();
}

fn done<S>(ctx: &Ctx<S>, n: usize) {
    ctx.jobs.set(ctx.jobs.get() - n);
    ctx.node
        .store_stats
        .queued
        .store(ctx.jobs.get() as u64, Ordering::Relaxed);
}

/// Answer a job that will not run.
fn refuse<S>(ctx: &Ctx<S>, job: StoreJob, text: &str) {
    match job {
        StoreJob::Send {
            origin,
            answer,
            msg,
            ..
        } => answer_error(ctx, origin, &answer, msg.client_msg_id.as_deref(), text),
        StoreJob::Sync { origin, id, .. }
        | StoreJob::MarkByMessages { origin, id, .. }
        | StoreJob::Contacts { origin, id, .. } => {
            answer_error(ctx, origin, &Answer::Ws { id }, None, text)
        }
        StoreJob::Conversation(job) => match job.what {
            // Typing is droppable: a refused one is lost silently, as to a full inbox.
            ConvEvent::Typing { .. } => {}
            ConvEvent::Receipt { id, .. } => {
                answer_error(ctx, job.origin, &Answer::Ws { id }, None, text)
            }
        },
        StoreJob::Notify {
            origin, keep, cors, ..
        }
        | StoreJob::Rest {
            origin, keep, cors, ..
        } => answer_error(ctx, origin, &Answer::Http { keep, cors }, None, text),
        StoreJob::Mark(_) => {}
    }
}

/// Run a store call under `timeout` plus [`BACKSTOP`] (the store's own deadline is `timeout`
/// and answers first; this one catches a store that does not keep it).
async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = crate::store::Result<T>>,
) -> crate::store::Result<T> {
    match tokio::time::timeout(timeout + BACKSTOP, f).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Timeout),
    }
}

/// The DM writer: one batch at a time, in arrival order.
async fn writer<S: Store + 'static>(ctx: Rc<Ctx<S>>) {
    loop {
        let jobs: Vec<Send> = {
            let mut q = ctx.sends.borrow_mut();
            let n = q.len().min(APPEND_BATCH_MAX);
            q.drain(..n).collect()
        };
        if jobs.is_empty() {
            ctx.wake_writer.notified().await;
            continue;
        }
        let bytes: usize = jobs.iter().map(Send::bytes).sum();
        ctx.queued_bytes.set(ctx.queued_bytes.get() - bytes);
        // A send that already waited store_timeout is failed unstored (its origin is about to
        // give up); while the store is known down, every send fails at once. Before the first
        // health check has answered (the first milliseconds after start) it is not known:
        // sends are tried (a DM sent then once failed here as "down").
        let store_down =
            ctx.health_known.get() && ctx.node.store_stats.up.load(Ordering::Relaxed) == 0;
        let (jobs, expired): (Vec<Send>, Vec<Send>) = jobs
            .into_iter()
            .partition(|j| !store_down && j.queued_at.elapsed() < ctx.timeout);
        if !expired.is_empty() {
            let e = if store_down {
                StoreError::Unavailable("down".into())
            } else {
                StoreError::Timeout
            };
            fail_all(&ctx, &expired, &e);
            done(&ctx, expired.len());
        }
        let jobs = durable::admit(&ctx, jobs);
        if jobs.is_empty() {
            continue;
        }
        let msgs: Vec<NewMessage> = jobs.iter().map(|j| j.msg.clone()).collect();
        let stats = &ctx.node.store_stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.last_batch.store(jobs.len() as u64, Ordering::Relaxed);
        // One `store.append` per traced job of the batch (they share the one commit).
        let batch = jobs.len() as u64;
        let traced: Vec<tracing::Span> = jobs
            .iter()
            .filter(|j| !j.span.is_none())
            .map(|j| crate::child_span!(&j.span, "store.append", batch.size = batch))
            .collect();
        let appended = bounded(ctx.timeout, ctx.store.append(&msgs)).await;
        if appended.is_err() {
            for s in &traced {
                s.record("otel.status_code", "ERROR");
            }
        }
        drop(traced);
        match appended {
            Ok(outs) if outs.len() == jobs.len() && ctx.kafka.is_some() => {
                // Answered (and counted done) as their records are confirmed.
                durable::stage(&ctx, jobs, outs).await;
                continue;
            }
            Ok(outs) if outs.len() == jobs.len() => {
                for (job, out) in jobs.iter().zip(outs) {
                    complete(&ctx, job, out);
                }
            }
            Ok(_) => {
                tracing::error!("the message store answered a batch with the wrong count");
                fail_all(&ctx, &jobs, &StoreError::Unavailable("bad answer".into()));
            }
            Err(e) => fail_all(&ctx, &jobs, &e),
        }
        done(&ctx, jobs.len());
    }
}

fn fail_all<S>(ctx: &Ctx<S>, jobs: &[Send], e: &StoreError) {
    ctx.node
        .store_stats
        .failed
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    // One line per FAILURE_LOG_INTERVAL, with the count since the last one.
    let failed = ctx.unlogged_failures.get() + jobs.len() as u64;
    let now = tokio::time::Instant::now();
    if ctx
        .last_failure_log
        .get()
        .is_none_or(|t| now.duration_since(t) >= FAILURE_LOG_INTERVAL)
    {
        tracing::warn!(error = %e, messages = failed, "direct messages not stored; their senders got errors and no ack");
        ctx.last_failure_log.set(Some(now));
        ctx.unlogged_failures.set(0);
    } else {
        ctx.unlogged_failures.set(failed);
    }
    for j in jobs {
        match j.answer {
            Answer::Http { .. } => crate::trace::record_status(&j.span, 503),
            Answer::Ws { .. } if !j.span.is_none() => {
                j.span.record("otel.status_code", "ERROR");
            }
            Answer::Ws { .. } => {}
        }
        answer_error(
            ctx,
            j.origin,
            &j.answer,
            j.msg.client_msg_id.as_deref(),
            STORE_UNAVAILABLE,
        );
    }
}

fn complete<S>(ctx: &Ctx<S>, job: &Send, out: Appended) {
    let stats = &ctx.node.store_stats;
    match &out {
        Appended::New {
            message,
            participants,
        } => {
            stats.stored.fetch_add(1, Ordering::Relaxed);
            let frame = message_create(ctx, message);
            let origin = matches!(job.answer, Answer::Ws { .. }).then_some(job.origin);
            // Inside the send's span (`dm.send`, a REST send's `http.request`; nothing when
            // it is not traced): each shard's part and the other nodes' are in its trace.
            job.span
                .in_scope(|| live(ctx, message, participants, origin, &frame));
        }
        Appended::Duplicate(_) => {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        Appended::Refused(_) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    match (&job.answer, &out) {
        (Answer::Http { keep, cors }, _) => {
            let r = crate::rest::render_appended(&out);
            crate::trace::record_status(&job.span, r.status.0);
            http_answer(ctx, job.origin, r.status, &r.body, *keep, cors.as_deref());
        }
        (Answer::Ws { id }, Appended::New { message, .. } | Appended::Duplicate(message)) => {
            ack(ctx, job.origin, id.as_deref(), message);
            settle_acked(job, message);
        }
        (Answer::Ws { .. }, Appended::Refused(r)) => answer_error(
            ctx,
            job.origin,
            &job.answer,
            job.msg.client_msg_id.as_deref(),
            r.text(),
        ),
    }
}

/// `message.create` to every participant's devices. A shard held back gets it later, in order
/// (counted by `deliver`); one the backlog could not hold still has it stored, and `sync`
/// returns it. The sending socket (`origin`) gets the ack, not its own message; a REST sender
/// has no device to skip.
fn live<S>(
    ctx: &Ctx<S>,
    message: &Message,
    participants: &[Arc<str>],
    origin: Option<ConnRef>,
    frame: &Frame,
) {
    for p in participants {
        let except = if *p == message.sender { origin } else { None };
        let target = Target::User {
            user: p.clone(),
            except,
        };
        deliver(ctx, target, frame);
    }
}

/// Deliver `frame` to every recipient of `target`: on this node's shards
/// ([`deliver_here`]) and, clustered, on the other nodes (one envelope to Redis).
fn deliver<S>(ctx: &Ctx<S>, target: Target, frame: &Frame) {
    // Inside a traced span (a notification record's, a DM's): the other nodes and this
    // node's shards continue the trace. With tracing off, one atomic load.
    let span = crate::trace::current();
    if let Some(r) = &ctx.redis {
        if span.is_none() {
            r.publish(&target, frame);
        } else {
            r.publish_traced(&target, frame, &span);
        }
    }
    deliver_here_in(ctx, target, frame, &span);
}

/// Hand `frame` to every shard of this node holding recipients of `target`, through the
/// backlog: a shard with messages held back gets this one after them, so what one shard
/// receives from the bridge stays in order.
///
/// Inside a traced span (`kafka.notify`, `redis.receive`, a DM's `dm.send`; with tracing
/// off, one atomic load) each shard's part is a `shard.deliver` child span, which ends after
/// that shard's socket writes.
fn deliver_here<S>(ctx: &Ctx<S>, target: Target, frame: &Frame) {
    deliver_here_in(ctx, target, frame, &crate::trace::current());
}

/// [`deliver_here`] under `parent` (the current span, `Span::none()` when not traced).
fn deliver_here_in<S>(ctx: &Ctx<S>, target: Target, frame: &Frame, parent: &tracing::Span) {
    let mut bits = super::recipient_shards(&ctx.shards, &ctx.node.dir, &target);
    while bits != 0 {
        let shard = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let msg = if parent.is_none() {
            ShardMsg::Deliver {
                target: target.clone(),
                frame: frame.clone(),
            }
        } else {
            let span = crate::child_span!(
                parent,
                "shard.deliver",
                otel.kind = "internal",
                shard = shard as u64,
            );
            ShardMsg::Traced(Box::new((target.clone(), frame.clone(), span)))
        };
        to_shard(ctx, shard, msg);
    }
}

/// Send `msg` to `shard` now, or hold it in the backlog (counted); a shard that has stopped
/// drops it (counted).
fn to_shard<S>(ctx: &Ctx<S>, shard: usize, msg: ShardMsg) {
    let stats = &ctx.node.store_stats;
    let mut backlog = ctx.backlog.borrow_mut();
    let msg = if backlog[shard].is_empty() {
        match ctx.shards.inboxes.try_send(shard, msg) {
            Ok(()) => return,
            Err((SendFailure::Dead, _)) => {
                stats.live_missed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err((SendFailure::Full, m)) => m,
        }
    } else {
        msg
    };
    stats.delayed.fetch_add(1, Ordering::Relaxed);
    if ctx.backlog_len.get() >= SHARD_BACKLOG_MAX {
        // Drop the oldest held message of the longest queue.
        if let Some(q) = backlog.iter_mut().max_by_key(|q| q.len()) {
            if q.pop_front().is_some() {
                ctx.backlog_len.set(ctx.backlog_len.get() - 1);
                stats.live_missed.fetch_add(1, Ordering::Relaxed);
                // It may have been a history message or tag: no history cache is current.
                ctx.node
                    .redis_stats
                    .history_gen
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    backlog[shard].push_back(msg);
    ctx.backlog_len.set(ctx.backlog_len.get() + 1);
    ctx.backlog_wake.notify_one();
    stats
        .backlog
        .store(ctx.backlog_len.get() as u64, Ordering::Relaxed);
}

/// Retry the backlog, in order per shard, every [`BACKLOG_RETRY`].
async fn retry_backlog<S>(ctx: Rc<Ctx<S>>) {
    loop {
        if ctx.backlog_len.get() == 0 {
            ctx.backlog_wake.notified().await;
        }
        tokio::time::sleep(BACKLOG_RETRY).await;
        let mut backlog = ctx.backlog.borrow_mut();
        for (shard, q) in backlog.iter_mut().enumerate() {
            while let Some(msg) = q.pop_front() {
                match ctx.shards.inboxes.try_send(shard, msg) {
                    Ok(()) => {}
                    Err((SendFailure::Full, m)) => {
                        q.push_front(m);
                        break;
                    }
                    Err((SendFailure::Dead, _)) => {
                        ctx.node
                            .store_stats
                            .live_missed
                            .fetch_add(1 + q.len() as u64, Ordering::Relaxed);
                        q.clear();
                        break;
                    }
                }
            }
        }
        let len = backlog.iter().map(VecDeque::len).sum::<usize>();
        ctx.backlog_len.set(len);
        ctx.node
            .store_stats
            .backlog
            .store(len as u64, Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `data` of `message.create` (and of each `sync` replay).
fn message_data(d: &mut Obj, m: &Message) {
    d.uuid("eventId", m.event_id)
        .uuid("serverMsgId", m.server_msg_id)
        .opt_str("clientMsgId", m.client_msg_id.as_deref())
        .str("from", &m.sender)
        .opt_str("to", m.to.as_deref())
        .str("conversationId", &m.thread)
        .u64("conversationNumericId", m.thread_numeric_id)
        .str("content", &m.content)
        .opt_str("attachmentUrl", m.attachment_url.as_deref())
        .str("sentAt", &rfc3339_ms(m.sent_at_ms))
        .u64("cursor", m.id)
        .u64("seq", m.seq);
}

fn message_create<S>(ctx: &Ctx<S>, m: &Message) -> Frame {
    let now = now_ms();
    ctx.fb.borrow_mut().text(ctx.node.now_us(), |o| {
        o.str("type", "message.create")
            .obj("data", |d| message_data(d, m))
            .u64("timestamp", now);
    })
}

/// `message.ack` for a stored (or already stored) message.
fn ack<S>(ctx: &Ctx<S>, origin: ConnRef, id: Option<&str>, m: &Message) {
    let now = now_ms();
    let f = ctx.fb.borrow_mut().text(ctx.node.now_us(), |o| {
        o.str("type", "message.ack")
            .id(id)
            .obj("data", |d| ack_data(d, m))
            .u64("timestamp", now);
    });
    to_conn(ctx, origin, f);
}

/// The `data` of `message.ack`: every field of the message but its content, attachment and
/// `eventId`. The same bytes are what Redis keeps for a retry on another node ([`dedup`]).
fn ack_data(d: &mut Obj, m: &Message) {
    d.opt_str("clientMsgId", m.client_msg_id.as_deref())
        .uuid("serverMsgId", m.server_msg_id)
        .str("conversationId", &m.thread)
        .u64("conversationNumericId", m.thread_numeric_id)
        .str("sentAt", &rfc3339_ms(m.sent_at_ms))
        .u64("cursor", m.id)
        .u64("seq", m.seq)
        .str("from", &m.sender)
        .opt_str("to", m.to.as_deref());
}

/// `message.ack` whose `data` is the first copy's, as another node recorded it in Redis.
fn ack_recorded<S>(ctx: &Ctx<S>, origin: ConnRef, id: Option<&str>, data_json: &str) {
    let now = now_ms();
    let f = ctx.fb.borrow_mut().text(ctx.node.now_us(), |o| {
        o.str("type", "message.ack")
            .id(id)
            .raw("data", data_json)
            .u64("timestamp", now);
    });
    to_conn(ctx, origin, f);
}

/// `job` was acked for `m`: its `clientMsgId` claim (if it holds one) records the ack for the
/// other nodes.
fn settle_acked(job: &Send, m: &Message) {
    if let Some(c) = job.claim.take() {
        c.acked(m);
    }
}

fn answer_error<S>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    answer: &Answer,
    client_msg_id: Option<&str>,
    text: &str,
) {
    match answer {
        Answer::Ws { id } => {
            let f = ctx.fb.borrow_mut().error(
                now_ms(),
                ctx.node.now_us(),
                id.as_deref(),
                text,
                client_msg_id,
            );
            to_conn(ctx, origin, f);
        }
        Answer::Http { keep, cors } => {
            let status = match text {
                t if t == STORE_UNAVAILABLE || t == BUSY => Status::SERVICE_UNAVAILABLE,
                t if t == crate::store::Refusal::UnknownThread.text() => Status::NOT_FOUND,
                t if t == crate::store::Refusal::NotParticipant.text() => Status::FORBIDDEN,
                _ => Status::BAD_REQUEST,
            };
            let body = crate::http::json_error_body(text);
            http_answer(ctx, origin, status, &body, *keep, cors.as_deref());
        }
    }
}

fn to_conn<S>(ctx: &Ctx<S>, origin: ConnRef, f: Frame) {
    deliver(ctx, Target::Conn(origin), &f);
}

/// The response to a waiting HTTP request (its shard resumes the connection).
fn http_answer<S>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    status: Status,
    body: &[u8],
    keep: bool,
    cors: Option<&str>,
) {
    let mut r = Response::new(status, "application/json", body);
    r.keep_alive = keep;
    r.cors = cors.map_or(CorsHeaders::Off, CorsHeaders::Origin);
    let f = Frame::from_wire(&r.to_vec(), ctx.node.now_us());
    to_conn(ctx, origin, f);
}

async fn run_job<S: Store>(ctx: &Ctx<S>, job: StoreJob) {
    match job {
        StoreJob::Send { .. } => unreachable!("sends go to the writer"),
        StoreJob::Mark(req) => {
            if let Err(e) = bounded(ctx.timeout, ctx.store.mark(&req)).await {
                // The live receipt went out; only the stored read state is behind.
                ctx.node.store_stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "a receipt was not stored");
            }
        }
        StoreJob::Sync {
            origin,
            id,
            user,
            since,
            limit,
        } => sync(ctx, origin, id, &user, since, limit).await,
        StoreJob::Notify {
            origin,
            keep,
            cors,
            n,
        } => notify(ctx, origin, keep, cors, n).await,
        StoreJob::Rest {
            origin,
            user,
            op,
            keep,
            cors,
            span,
        } => {
            use tracing::Instrument as _;
            let run_span = span.clone();
            rest(ctx, origin, &user, op, keep, cors, span)
                .instrument(run_span)
                .await
        }
        StoreJob::Conversation(job) => conv::run(ctx, *job).await,
        StoreJob::MarkByMessages {
            origin,
            id,
            user,
            read,
            ids_raw,
            at_ms,
        } => conv::mark_by_messages(ctx, origin, id, user, read, &ids_raw, at_ms).await,
        StoreJob::Contacts {
            origin,
            id,
            user,
            limit,
        } => conv::contacts(ctx, origin, id, &user, limit).await,
    }
}

/// Run a REST request; a message it sends joins the writer's queue and is answered from there
/// (and its `span`, when traced, goes with it).
async fn rest<S: Store>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    user: &str,
    op: crate::rest::RestOp,
    keep: bool,
    cors: Option<Arc<str>>,
    span: tracing::Span,
) {
    use crate::rest::Effect;
    let run = crate::rest::execute(&*ctx.store, user, op, now_ms());
    let done = match tokio::time::timeout(ctx.timeout, run).await {
        Ok(e) => e,
        Err(_) => crate::rest::store_unavailable(),
    };
    let mut answered_later = false;
    for effect in done.effects {
        match effect {
            Effect::Send(msg) => {
                // Counted as a job of its own: the writer finishes it.
                ctx.jobs.set(ctx.jobs.get() + 1);
                let send = Send {
                    origin,
                    answer: Answer::Http {
                        keep,
                        cors: cors.clone(),
                    },
                    msg,
                    queued_at: tokio::time::Instant::now(),
                    claim: Cell::new(None),
                    step: tracing::Span::none(),
                    span: span.clone(),
                };
                enqueue(ctx, send);
                answered_later = true;
            }
            Effect::Receipt { marked, by, at_ms } => receipt(ctx, &marked, &by, at_ms),
        }
    }
    if !answered_later {
        crate::trace::record_status(&span, done.status.0);
        http_answer(ctx, origin, done.status, &done.body, keep, cors.as_deref());
    }
}

/// `message.read` for a read recorded over REST: to the devices of the senders of the marked
/// messages and the reader's own devices (as `mark.read` relays it).
fn receipt<S>(ctx: &Ctx<S>, marked: &crate::store::Marked, by: &Arc<str>, at_ms: u64) {
    let now = now_ms();
    let at = rfc3339_ms(at_ms);
    let f = ctx.fb.borrow_mut().text(ctx.node.now_us(), |o| {
        o.str("type", "message.read")
            .obj("data", |d| {
                d.str("conversationId", &marked.thread)
                    .u64("conversationNumericId", marked.thread_numeric_id)
                    .arr("messageIds", |a| {
                        for m in &marked.messages {
                            a.uuid(m.server_msg_id);
                        }
                    })
                    .arr("messageNumericIds", |a| {
                        for m in &marked.messages {
                            a.u64(m.id);
                        }
                    })
                    .str("by", by)
                    .str("at", &at);
            })
            .u64("timestamp", now);
    });
    let mut users: Vec<&Arc<str>> = marked.messages.iter().map(|m| &m.sender).collect();
    users.push(by);
    users.sort_unstable();
    users.dedup();
    for u in users {
        let target = Target::User {
            user: u.clone(),
            except: None,
        };
        deliver(ctx, target, &f);
    }
}

async fn sync<S: Store>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    id: Option<Box<str>>,
    user: &str,
    since: Option<u64>,
    limit: usize,
) {
    ctx.node.store_stats.syncs.fetch_add(1, Ordering::Relaxed);
    let page = match bounded(ctx.timeout, ctx.store.sync(user, since, limit)).await {
        Ok(p) => p,
        Err(_) => {
            answer_error(ctx, origin, &Answer::Ws { id }, None, STORE_UNAVAILABLE);
            return;
        }
    };
    // Every replayed message and the `sync.done` go out as one write: a full inbox cannot
    // leave a gap in the middle of a page.
    let mut wire = Vec::with_capacity(4096);
    let mut cursor = since.unwrap_or(0);
    let mut more = page.more;
    let now = now_ms();
    let born = ctx.node.now_us();
    let mut fb = ctx.fb.borrow_mut();
    for (i, m) in page.messages.iter().enumerate() {
        if wire.len() >= SYNC_PAGE_BYTES_MAX {
            more = more || i < page.messages.len();
            break;
        }
        let f = fb.text(born, |o| {
            o.str("type", "message.create")
                .obj("data", |d| message_data(d, m))
                .u64("timestamp", now);
        });
        wire.extend_from_slice(f.wire());
        cursor = m.id;
    }
    if page.messages.is_empty() {
        cursor = page.cursor;
    }
    let f = fb.text(born, |o| {
        o.str("type", "sync.done")
            .id(id.as_deref())
            .obj("data", |d| {
                d.u64("cursor", cursor)
                    .bool("more", more)
                    .bool("truncated", page.truncated);
            })
            .u64("timestamp", now);
    });
    drop(fb);
    wire.extend_from_slice(f.wire());
    to_conn(ctx, origin, Frame::from_wire(&wire, born));
}

async fn notify<S: Store>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    keep: bool,
    cors: Option<Arc<str>>,
    n: NewNotification,
) {
    let (stored, fresh) = match bounded(ctx.timeout, ctx.store.store_notification(&n)).await {
        Ok(crate::store::Noted::New(s)) => (s, true),
        Ok(crate::store::Noted::Exists(s)) => (s, false),
        Ok(crate::store::Noted::Refused(r)) => {
            let body = crate::http::json_error_body(r.text());
            http_answer(
                ctx,
                origin,
                Status::BAD_REQUEST,
                &body,
                keep,
                cors.as_deref(),
            );
            return;
        }
        Err(_) => {
            let answer = Answer::Http { keep, cors };
            answer_error(ctx, origin, &answer, None, STORE_UNAVAILABLE);
            return;
        }
    };
    if fresh {
        let now = now_ms();
        let f = ctx.fb.borrow_mut().text(ctx.node.now_us(), |o| {
            o.str("type", "notification")
                .obj("data", |d| notification_data(d, &stored))
                .u64("timestamp", now);
        });
        let target = Target::User {
            user: stored.user.clone(),
            except: None,
        };
        deliver(ctx, target, &f);
    }
    let mut body = Vec::with_capacity(256);
    crate::proto::envelope::write_object(&mut body, |o| notification_data(o, &stored));
    let status = if fresh { Status::CREATED } else { Status::OK };
    http_answer(ctx, origin, status, &body, keep, cors.as_deref());
}

/// The `data` of a `notification` frame: `{id, kind, ...the record's fields, createdAt}`.
pub fn notification_data(d: &mut Obj, n: &crate::store::Notification) {
    d.u64("id", n.id)
        .u64("notificationId", n.id)
        .str("kind", &n.kind)
        .raw("data", &n.data_json)
        .bool("read", n.read)
        .str("createdAt", &rfc3339_ms(n.created_at_ms));
}

async fn health<S: Store>(ctx: Rc<Ctx<S>>) {
    let mut was = None;
    loop {
        let up = bounded(ctx.timeout.min(HEALTH_INTERVAL * 2), ctx.store.ping())
            .await
            .is_ok();
        let stats = &ctx.node.store_stats;
        stats.up.store(u64::from(up), Ordering::Relaxed);
        ctx.health_known.set(true);
        if let Some(m) = ctx.store.memory_stats() {
            stats
                .memory_bytes
                .store(m.bytes_used as u64, Ordering::Relaxed);
            stats
                .memory_budget
                .store(m.budget_bytes as u64, Ordering::Relaxed);
            stats
                .memory_messages
                .store(m.messages as u64, Ordering::Relaxed);
            stats
                .evicted_messages
                .store(m.evicted_messages, Ordering::Relaxed);
        }
        if was != Some(up) {
            if up {
                tracing::info!(store = ctx.store.kind(), "message store up");
            } else if was.is_none() {
                // At start a PostgreSQL store is still connecting: not a fault yet.
                tracing::info!(
                    store = ctx.store.kind(),
                    "message store not up yet (connecting); /ready answers 503 until it is"
                );
            } else {
                tracing::warn!(store = ctx.store.kind(), "message store down: direct messages get errors and no ack, /ready answers 503, retrying");
            }
            was = Some(up);
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// The store's lines of `/metrics`.
pub fn prometheus_lines(s: &StoreStats, out: &mut String) {
    use std::fmt::Write;
    let rows: [(&str, &str, &str, &AtomicU64); 17] = [
        ("switchboard_store_batches_total", "counter", "Batches of direct messages committed to the message store (or failed)", &s.batches),
        ("switchboard_store_messages_total", "counter", "Messages stored", &s.stored),
        ("switchboard_store_duplicates_total", "counter", "Messages not stored again: (sender, clientMsgId) was stored before", &s.duplicates),
        ("switchboard_store_refused_total", "counter", "Messages refused by the store (not a participant, no such conversation)", &s.refused),
        ("switchboard_store_failed_total", "counter", "Messages and receipts the store failed or timed out on (the senders got errors, no ack)", &s.failed),
        ("switchboard_store_busy_total", "counter", "Store jobs refused because STORE_JOBS_QUEUED_MAX were waiting", &s.busy),
        ("switchboard_store_live_missed_total", "counter", "Frames for this node's connections dropped because SHARD_BACKLOG_MAX were held back or the shard had stopped (a dropped message.create is stored: sync returns it)", &s.live_missed),
        ("switchboard_store_delayed_total", "counter", "Frames held back because a shard's inbox was full, handed on later in order", &s.delayed),
        ("switchboard_store_backlog", "gauge", "Frames held back for full shard inboxes now", &s.backlog),
        ("switchboard_store_syncs_total", "counter", "sync calls answered", &s.syncs),
        ("switchboard_store_jobs_queued", "gauge", "Store jobs accepted and not yet finished", &s.queued),
        ("switchboard_store_last_batch_size", "gauge", "Messages in the last committed batch", &s.last_batch),
        ("switchboard_store_up", "gauge", "1 while the message store answers its health check", &s.up),
        ("switchboard_store_memory_bytes", "gauge", "Bytes the in-memory store accounts for (0 with PostgreSQL)", &s.memory_bytes),
        ("switchboard_store_memory_budget_bytes", "gauge", "The in-memory store's budget, store_memory_bytes (0 with PostgreSQL)", &s.memory_budget),
        ("switchboard_store_memory_messages", "gauge", "Messages the in-memory store holds", &s.memory_messages),
        ("switchboard_store_evicted_messages_total", "counter", "Messages the in-memory store evicted to stay within its budget", &s.evicted_messages),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

/// Start the Kafka notification consumer ([`super::notify`]) when `kafka_brokers` is set and
/// `kafka_notifications` has rules; it stores and delivers through this context.
fn start_notify<S: Store + 'static>(ctx: &Rc<Ctx<S>>) -> Option<tokio::task::JoinHandle<()>> {
    if !super::notify::wanted(&ctx.node.cfg) {
        return None;
    }
    // The dead-letter topic is written by the node's one producer (the DMs').
    let Some(producer) = ctx.kafka.as_ref().map(|k| k.producer.clone()) else {
        tracing::error!("the Kafka producer could not be created: no notifications from Kafka on this node; fix the kafka_* settings and restart");
        return None;
    };
    Some(tokio::task::spawn_local(super::notify::run(
        ctx.clone(),
        producer,
    )))
}

impl<S: Store> super::notify::Sink for Ctx<S> {
    fn node(&self) -> &Arc<Node> {
        &self.node
    }

    async fn store_notification(
        &self,
        n: &NewNotification,
    ) -> crate::store::Result<crate::store::Noted> {
        bounded(self.timeout, self.store.store_notification(n)).await
    }

    fn deliver(&self, target: Target, frame: &Frame) {
        deliver(self, target, frame)
    }

    fn notification_frame(&self, f: &mut dyn FnMut(&mut Obj)) -> Frame {
        let now = now_ms();
        self.fb.borrow_mut().text(self.node.now_us(), |o| {
            o.str("type", "notification")
                .obj("data", |d| f(d))
                .u64("timestamp", now);
        })
    }
}
