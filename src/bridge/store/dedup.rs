//! `clientMsgId` dedup of direct messages across the nodes of a cluster, when the store cannot
//! do it alone: `redis_url` set and no `database_url` (each node's in-memory store knows only
//! its own messages; with PostgreSQL the `(sender, clientMsgId)` key is shared and nothing here
//! runs). Without `redis_url` nothing here exists.
//!
//! Before a `message.send` reaches the writer, the bridge **claims** its `(sender, clientMsgId)`
//! in Redis: one script call per message, batched with the other claims in pipelines of at most
//! [`DEDUP_BATCH_MAX`] on the publisher's multiplexed connection, one pipeline in flight. The
//! key is `<p>{user:<sender>}:cm:<clientMsgId>` ([`crate::cluster::Channels::client_msg`]).
//!
//! - **Free**: the key now holds this node's pending token (`p:<node>:<serverMsgId>`, for
//!   [`Ttls::pending`], the longest the first copy can take to be answered). The message goes
//!   on as on a single node (store, Kafka, live delivery, ack). Its ack records the ack's
//!   `data` in the key (`a:<json>`, for `dedup_window`); a send answered with an error instead
//!   releases the key (a [`Claim`] dropped unacked does that), so a retry can succeed.
//! - **Acked** (by any node): the retry gets `message.ack` with the first copy's `data`, byte
//!   for byte (a fresh `timestamp`, its own `id`), and is neither stored nor delivered again.
//! - **Pending on this node**: the local store dedups it as on a single node (the retry joins
//!   the first copy or gets its ack); its ack records the ack too, should the first copy's
//!   claim have been released meanwhile.
//! - **Pending on another node**: the retry waits for the first copy (as a retry joins a copy in
//!   flight on one node), asking again every [`DEDUP_POLL_INTERVAL`] for at most
//!   [`Ttls::wait`]; then it gets [`IN_FLIGHT`]. A key released meanwhile is claimed by the
//!   retry, which goes on as a new message.
//!
//! With Kafka, a record whose ack wait ran out keeps its claim, extended to
//! [`Ttls::late`]: it may still be written (then its ack is recorded), and no other node may
//! store a second copy meanwhile.
//!
//! **Faults.** A claim pipeline is bounded by `redis_timeout`. While the publisher's connection
//! is down, or for `redis_timeout` after a pipeline failed, claims are not asked for: the
//! message goes to the store at once, deduplicated by this node's store only, and counted
//! (`switchboard_redis_dedup_unchecked_total`). It still records its ack (or releases what a
//! failed pipeline may have claimed) once Redis answers again. Claim updates (ack, release,
//! extend) are idempotent compare-and-set scripts, retried while Redis is away, at most
//! [`DEDUP_SETTLES_MAX`] (the oldest given up, counted); a claim whose update never lands
//! expires after its pending TTL. Nothing waits for Redis longer than `redis_timeout`, and no
//! acked message is ever lost: Redis only decides whether a retry is a repeat.

use redis::Value;

use super::*;

/// Most claim-script calls (claims and their updates) in one pipeline.
pub const DEDUP_BATCH_MAX: usize = 256;

/// Sends waiting for their claim. Past it a send goes to the store unchecked (counted). Their
/// content bytes count against `STORE_QUEUED_BYTES_MAX` like the writer's queue.
pub const DEDUP_CLAIMS_MAX: usize = 65_536;

/// Retries waiting for a first copy in flight on another node; past it a retry gets
/// [`IN_FLIGHT`] at once.
pub const DEDUP_WAITING_MAX: usize = 4096;

/// Claim updates waiting for Redis (kept while it is away); past it the oldest is given up
/// (counted) and its claim expires after its pending TTL. An update is a key (at most 530 B),
/// a token (45 B) and, for an ack, the ack's `data` (under 1.5 KiB): at most ~32 MiB.
pub const DEDUP_SETTLES_MAX: usize = 16_384;

/// How often a retry whose first copy is in flight on another node asks again.
pub const DEDUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How often claim updates are retried while Redis is away.
pub const DEDUP_SETTLE_RETRY: Duration = Duration::from_millis(250);

/// The error of a retry whose first copy was still in flight on another node for as long as
/// the retry may wait. Nothing was stored: retry with the same `clientMsgId`.
pub const IN_FLIGHT: &str = "message still in flight, retry later";

/// Claim `KEYS[1]` with the pending token `ARGV[1]` for `ARGV[2]` ms, unless it is held:
/// returns nil when claimed now, else what the key holds.
const CLAIM_LUA: &str = "\
local v = redis.call('GET', KEYS[1]) \
if v then return v end \
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
return false";

/// Record the ack `ARGV[2]` for `ARGV[3]` ms, if the key is still claimed by token `ARGV[1]`
/// (or expired meanwhile: the message was acked all the same).
const ACK_LUA: &str = "\
local v = redis.call('GET', KEYS[1]) \
if v and v ~= ARGV[1] then return 0 end \
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) \
return 1";

/// Release the key if token `ARGV[1]` still holds it.
const RELEASE_LUA: &str = "\
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end \
return 0";

/// Hold the key `ARGV[2]` ms longer if token `ARGV[1]` still holds it.
const EXTEND_LUA: &str = "\
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
return 0";

// ---- sans-IO: tokens, values, lifetimes ----

/// The pending token of a claim this node takes for the message `server_msg_id`.
pub fn pending_token(node: u32, server_msg_id: u128) -> String {
    format!("p:{node:08x}:{server_msg_id:032x}")
}

/// What a claim key holds once its message is acked: the ack's `data` object.
pub fn acked_value(data_json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + data_json.len());
    v.extend_from_slice(b"a:");
    v.extend_from_slice(data_json);
    v
}

/// What the claim script found.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen<'a> {
    /// Nothing: the key is ours now.
    Free,
    /// The first copy's ack `data` (JSON).
    Acked(&'a str),
    /// The first copy is in flight on node `node`.
    Pending { node: u32 },
    /// Not a value this code writes (another deployment sharing the prefix, or a corrupt one).
    Malformed,
}

/// Read a claim key's value (`None`: it was free and is claimed now).
pub fn seen(v: Option<&[u8]>) -> Seen<'_> {
    let Some(v) = v else { return Seen::Free };
    if let Some(json) = v.strip_prefix(b"a:") {
        return match std::str::from_utf8(json) {
            Ok(j) if j.starts_with('{') && j.ends_with('}') => Seen::Acked(j),
            _ => Seen::Malformed,
        };
    }
    let Some(rest) = v.strip_prefix(b"p:") else {
        return Seen::Malformed;
    };
    let node = rest
        .get(..8)
        .filter(|_| rest.get(8) == Some(&b':'))
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u32::from_str_radix(h, 16).ok());
    match node {
        Some(node) => Seen::Pending { node },
        None => Seen::Malformed,
    }
}

/// Whether a recorded ack is the ack of `sender`'s `client_msg_id` (valid JSON naming both),
/// so that nothing but such an ack is ever sent as one.
pub fn recorded_ack_matches(json: &str, sender: &str, client_msg_id: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Recorded<'a> {
        #[serde(rename = "clientMsgId", borrow)]
        client_msg_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        from: Option<std::borrow::Cow<'a, str>>,
    }
    sonic_rs::from_str::<Recorded>(json).is_ok_and(|r| {
        r.client_msg_id.as_deref() == Some(client_msg_id) && r.from.as_deref() == Some(sender)
    })
}

/// How long claims live and retries wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttls {
    /// A pending claim: the longest a claimed message can take to be answered (its wait for
    /// a batch and the batch, `store_timeout` each plus the backstop, then `kafka_ack_timeout`
    /// with Kafka), plus two `redis_timeout`s for its update to land. A node that dies
    /// holding one leaves it this long at most.
    pub pending: Duration,
    /// A claim whose Kafka record outlived its ack wait: as long as librdkafka may still write
    /// it (`kafka_message_timeout`), plus the store's mark and the update.
    pub late: Duration,
    /// A recorded ack: `dedup_window`.
    pub window: Duration,
    /// The longest a retry waits for a first copy in flight on another node: half of
    /// `store_timeout`, so that a retry that claims the key after it was released still
    /// has time to be stored within the `store_timeout` a send waits at most.
    pub wait: Duration,
}

impl Ttls {
    pub fn of(cfg: &crate::config::Config) -> Ttls {
        let kafka = if cfg.kafka_brokers.is_empty() {
            Duration::ZERO
        } else {
            cfg.kafka_ack_timeout
        };
        Ttls {
            pending: cfg.store_timeout * 2 + BACKSTOP + kafka + cfg.redis_timeout * 2,
            late: cfg.kafka_message_timeout + cfg.store_timeout + cfg.redis_timeout * 2,
            window: cfg.dedup_window,
            wait: cfg.store_timeout / 2,
        }
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

// ---- claims and their updates ----

/// An update of a claim key, as the pipeline sends it.
enum Settle {
    Ack {
        key: String,
        token: String,
        value: Vec<u8>,
    },
    Release {
        key: String,
        token: String,
    },
    Extend {
        key: String,
        token: String,
    },
}

/// What the claims share with the worker: the queue of updates.
struct Shared {
    node: Arc<Node>,
    ttls: Ttls,
    settles: RefCell<VecDeque<Settle>>,
    wake: Notify,
}

impl Shared {
    fn push(&self, op: Settle) {
        let mut q = self.settles.borrow_mut();
        if q.len() >= DEDUP_SETTLES_MAX {
            q.pop_front();
            self.node
                .redis_stats
                .dedup_settle_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(op);
        self.wake.notify_one();
    }
}

/// A send's hold on its claim key. Acked ([`Claim::acked`]) it records the ack; dropped
/// unacked (an error answered, the send given up) it releases the key, so a retry can succeed.
pub(super) struct Claim {
    key: String,
    token: String,
    /// False for a retry of a message pending on this node: it records its ack, never
    /// releases the first copy's claim (that copy may still be written).
    releases: bool,
    open: bool,
    shared: Rc<Shared>,
}

impl Claim {
    /// The message is acked: record its ack for `dedup_window`.
    pub fn acked(mut self, m: &Message) {
        let mut data = Vec::with_capacity(256);
        crate::proto::envelope::write_object(&mut data, |d| ack_data(d, m));
        self.open = false;
        self.shared.push(Settle::Ack {
            key: std::mem::take(&mut self.key),
            token: std::mem::take(&mut self.token),
            value: acked_value(&data),
        });
    }

    /// Its Kafka record outlived the ack wait and may still be written: hold the key for
    /// [`Ttls::late`].
    pub fn extend_late(&self) {
        self.shared.push(Settle::Extend {
            key: self.key.clone(),
            token: self.token.clone(),
        });
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.open && self.releases {
            self.shared.push(Settle::Release {
                key: std::mem::take(&mut self.key),
                token: std::mem::take(&mut self.token),
            });
        }
    }
}

/// A send waiting for its claim.
struct Queued {
    send: Send,
    /// It waited for a first copy on another node already (counted once).
    waited: bool,
}

/// The node's claims.
pub(super) struct Dedup {
    redis: Rc<super::super::redis::Redis>,
    shared: Rc<Shared>,
    claims: RefCell<VecDeque<Queued>>,
    /// Retries of a message in flight on another node, by when they ask again (in order).
    waiting: RefCell<VecDeque<(tokio::time::Instant, Queued)>>,
    /// Claims are not asked for until then (a pipeline failed).
    skip_until: Cell<Option<tokio::time::Instant>>,
    /// A pipeline is in flight (shutdown waits for the last updates).
    in_flight: Cell<bool>,
}

impl Dedup {
    pub fn new(node: Arc<Node>, redis: Rc<super::super::redis::Redis>) -> Dedup {
        let ttls = Ttls::of(&node.cfg);
        Dedup {
            redis,
            shared: Rc::new(Shared {
                node,
                ttls,
                settles: RefCell::new(VecDeque::new()),
                wake: Notify::new(),
            }),
            claims: RefCell::new(VecDeque::new()),
            waiting: RefCell::new(VecDeque::new()),
            skip_until: Cell::new(None),
            in_flight: Cell::new(false),
        }
    }

    /// Whether updates are still waiting for Redis.
    pub fn busy(&self) -> bool {
        self.in_flight.get() || !self.shared.settles.borrow().is_empty()
    }

    fn claim_of(&self, send: &Send, token: String, releases: bool) -> Claim {
        Claim {
            key: self.key_of(send),
            token,
            releases,
            open: true,
            shared: self.shared.clone(),
        }
    }

    fn key_of(&self, send: &Send) -> String {
        let cmid = send.msg.client_msg_id.as_deref().unwrap_or("");
        self.redis.channels().client_msg(&send.msg.sender, cmid)
    }
}

/// Whether `send` is claimed in Redis: a WebSocket `message.send` (it always has a
/// `clientMsgId`). A REST send is deduplicated by this node's store only.
pub(super) fn wanted(send: &Send) -> bool {
    matches!(send.answer, Answer::Ws { .. }) && send.msg.client_msg_id.is_some()
}

/// Queue `send` for its claim (its bytes count as the writer's queue does).
pub(super) fn claim<S>(ctx: &Ctx<S>, send: Send) {
    let Some(d) = &ctx.dedup else {
        enqueue(ctx, send);
        return;
    };
    if d.claims.borrow().len() >= DEDUP_CLAIMS_MAX {
        unchecked(ctx, d, send);
        return;
    }
    ctx.queued_bytes.set(ctx.queued_bytes.get() + send.bytes());
    d.claims.borrow_mut().push_back(Queued {
        send,
        waited: false,
    });
    d.shared.wake.notify_one();
}

/// `send` leaves the claim queue: its bytes are no longer counted there.
fn leave<S>(ctx: &Ctx<S>, send: &Send) {
    ctx.queued_bytes.set(ctx.queued_bytes.get() - send.bytes());
}

/// To the store without Redis's word (counted). It holds a claim of its own token all the
/// same: once Redis answers, its ack is recorded (or what a failed pipeline may have
/// claimed is released).
fn unchecked<S>(ctx: &Ctx<S>, d: &Dedup, send: Send) {
    ctx.node
        .redis_stats
        .dedup_unchecked
        .fetch_add(1, Ordering::Relaxed);
    let token = pending_token(ctx.node.id, send.msg.server_msg_id);
    send.claim.set(Some(d.claim_of(&send, token, true)));
    enqueue(ctx, send);
}

/// Claim what is queued, one pipeline at a time, with the updates that wait.
pub(super) async fn worker<S: Store + 'static>(ctx: Rc<Ctx<S>>) {
    let Some(d) = &ctx.dedup else { return };
    let timeout = ctx.node.cfg.redis_timeout;
    let ttls = d.shared.ttls;
    let mut batch: Vec<Queued> = Vec::with_capacity(DEDUP_BATCH_MAX);
    let mut settles: Vec<Settle> = Vec::with_capacity(DEDUP_BATCH_MAX);
    loop {
        let now = tokio::time::Instant::now();
        {
            let mut w = d.waiting.borrow_mut();
            let mut c = d.claims.borrow_mut();
            while w.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, q)) = w.pop_front() {
                    c.push_back(q);
                }
            }
        }
        let has_claims = !d.claims.borrow().is_empty();
        let has_settles = !d.shared.settles.borrow().is_empty();
        let conn = if d.skip_until.get().is_some_and(|t| now < t) {
            None
        } else {
            d.redis.command_conn()
        };
        if conn.is_none() && has_claims {
            let all: Vec<Queued> = d.claims.borrow_mut().drain(..).collect();
            for q in all {
                leave(&ctx, &q.send);
                unchecked(&ctx, d, q.send);
            }
            continue;
        }
        let Some(mut conn) = conn.filter(|_| has_claims || has_settles) else {
            let next = d.waiting.borrow().front().map(|(due, _)| *due);
            let retry = has_settles.then(|| now + DEDUP_SETTLE_RETRY);
            match next.into_iter().chain(retry).min() {
                Some(t) => {
                    tokio::select! {
                        _ = d.shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
                None => d.shared.wake.notified().await,
            }
            continue;
        };
        {
            let mut q = d.shared.settles.borrow_mut();
            let n = q.len().min(DEDUP_BATCH_MAX);
            settles.extend(q.drain(..n));
            let mut c = d.claims.borrow_mut();
            let n = c.len().min(DEDUP_BATCH_MAX);
            batch.extend(c.drain(..n));
        }
        let mut pipe = redis::pipe();
        // Updates first: a retry in the same pipeline sees the ack just recorded.
        for op in &settles {
            match op {
                Settle::Ack { key, token, value } => pipe
                    .cmd("EVAL")
                    .arg(ACK_LUA)
                    .arg(1)
                    .arg(key)
                    .arg(token)
                    .arg(&value[..])
                    .arg(ms(ttls.window)),
                Settle::Release { key, token } => {
                    pipe.cmd("EVAL").arg(RELEASE_LUA).arg(1).arg(key).arg(token)
                }
                Settle::Extend { key, token } => pipe
                    .cmd("EVAL")
                    .arg(EXTEND_LUA)
                    .arg(1)
                    .arg(key)
                    .arg(token)
                    .arg(ms(ttls.late)),
            };
        }
        let tokens: Vec<String> = batch
            .iter()
            .map(|q| pending_token(ctx.node.id, q.send.msg.server_msg_id))
            .collect();
        for (q, token) in batch.iter().zip(&tokens) {
            pipe.cmd("EVAL")
                .arg(CLAIM_LUA)
                .arg(1)
                .arg(d.key_of(&q.send))
                .arg(token)
                .arg(ms(ttls.pending));
        }
        d.in_flight.set(true);
        let r = tokio::time::timeout(timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await;
        d.in_flight.set(false);
        let answers = match r {
            Ok(Ok(v)) if v.len() == settles.len() + batch.len() => Some(v),
            Ok(Ok(_)) => {
                d.redis
                    .log_error("clientMsgId claims failed", &"wrong answer count");
                None
            }
            Ok(Err(e)) => {
                d.redis.log_error("clientMsgId claims failed", &e);
                None
            }
            Err(_) => {
                d.redis
                    .log_error("clientMsgId claims failed", &"timed out (redis_timeout)");
                None
            }
        };
        let Some(answers) = answers else {
            // Redis may or may not have run them: the updates are idempotent, so they go back
            // (in order, ahead of newer ones); the claims go on unchecked, holding their
            // tokens in case Redis did take them.
            d.skip_until
                .set(Some(tokio::time::Instant::now() + timeout));
            {
                let mut q = d.shared.settles.borrow_mut();
                for op in settles.drain(..).rev() {
                    q.push_front(op);
                }
                let over = q.len().saturating_sub(DEDUP_SETTLES_MAX);
                q.truncate(DEDUP_SETTLES_MAX);
                ctx.node
                    .redis_stats
                    .dedup_settle_failed
                    .fetch_add(over as u64, Ordering::Relaxed);
            }
            for q in batch.drain(..) {
                leave(&ctx, &q.send);
                unchecked(&ctx, d, q.send);
            }
            continue;
        };
        let answers = &answers[settles.len()..];
        settles.clear();
        for ((q, token), v) in batch.drain(..).zip(tokens).zip(answers) {
            judge(&ctx, d, q, token, v);
        }
    }
}

/// What becomes of a send whose claim script answered `v` (`token`: the one it claimed with).
fn judge<S>(ctx: &Ctx<S>, d: &Dedup, q: Queued, token: String, v: &Value) {
    let stats = &ctx.node.redis_stats;
    let send = q.send;
    let bytes = match v {
        Value::Nil => None,
        Value::BulkString(b) => Some(&b[..]),
        _ => Some(&b"?"[..]),
    };
    match seen(bytes) {
        Seen::Free => {
            stats.dedup_claimed.fetch_add(1, Ordering::Relaxed);
            send.claim.set(Some(d.claim_of(&send, token, true)));
            leave(ctx, &send);
            enqueue(ctx, send);
        }
        Seen::Acked(json)
            if recorded_ack_matches(
                json,
                &send.msg.sender,
                send.msg.client_msg_id.as_deref().unwrap_or(""),
            ) =>
        {
            stats.dedup_repeats.fetch_add(1, Ordering::Relaxed);
            if let Answer::Ws { id } = &send.answer {
                ack_recorded(ctx, send.origin, id.as_deref(), json);
            }
            leave(ctx, &send);
            done(ctx, 1);
        }
        Seen::Pending { node } if node == ctx.node.id => {
            // The first copy is this node's: the store dedups the retry as on one node.
            let first = bytes.map(|b| String::from_utf8_lossy(b).into_owned());
            send.claim.set(first.map(|t| d.claim_of(&send, t, false)));
            leave(ctx, &send);
            enqueue(ctx, send);
        }
        Seen::Pending { .. } => {
            let ttls = d.shared.ttls;
            let mut w = d.waiting.borrow_mut();
            if send.queued_at.elapsed() + DEDUP_POLL_INTERVAL <= ttls.wait
                && w.len() < DEDUP_WAITING_MAX
            {
                if !q.waited {
                    stats.dedup_waited.fetch_add(1, Ordering::Relaxed);
                }
                let due = tokio::time::Instant::now() + DEDUP_POLL_INTERVAL;
                w.push_back((due, Queued { send, waited: true }));
                return;
            }
            drop(w);
            stats.dedup_in_flight.fetch_add(1, Ordering::Relaxed);
            answer_error(
                ctx,
                send.origin,
                &send.answer,
                send.msg.client_msg_id.as_deref(),
                IN_FLIGHT,
            );
            leave(ctx, &send);
            done(ctx, 1);
        }
        Seen::Acked(_) | Seen::Malformed => {
            d.redis.log_error(
                "a clientMsgId key holds a value this node did not write; the message is deduplicated on this node only",
                &"unexpected value",
            );
            stats.dedup_unchecked.fetch_add(1, Ordering::Relaxed);
            leave(ctx, &send);
            enqueue(ctx, send);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_value_is_read_back_as_written() {
        let token = pending_token(0xab, 7);
        assert_eq!(token, format!("p:000000ab:{:032x}", 7));
        assert_eq!(seen(Some(token.as_bytes())), Seen::Pending { node: 0xab });
        assert_eq!(seen(None), Seen::Free);
        let ack = br#"{"clientMsgId":"c-1","from":"alice"}"#;
        let v = acked_value(ack);
        assert_eq!(
            seen(Some(&v)),
            Seen::Acked(r#"{"clientMsgId":"c-1","from":"alice"}"#)
        );
        for bad in [
            &b""[..],
            b"x",
            b"p:",
            b"p:000000zz:1",
            b"p:000000ab",
            b"a:",
            b"a:not json",
            b"a:\xff{}",
        ] {
            assert_eq!(seen(Some(bad)), Seen::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn only_the_ack_of_the_same_sender_and_client_msg_id_is_sent() {
        let ack = r#"{"clientMsgId":"c-1","serverMsgId":"x","from":"alice","to":"bob"}"#;
        assert!(recorded_ack_matches(ack, "alice", "c-1"));
        assert!(!recorded_ack_matches(ack, "mallory", "c-1"));
        assert!(!recorded_ack_matches(ack, "alice", "c-2"));
        assert!(!recorded_ack_matches(
            r#"{"clientMsgId":"c-1","from":"alice""#,
            "alice",
            "c-1"
        ));
        assert!(!recorded_ack_matches(
            r#"{"clientMsgId":"c-1","from":"alice"}x"#,
            "alice",
            "c-1"
        ));
        // Escapes are compared as the text they stand for.
        assert!(recorded_ack_matches(
            r#"{"clientMsgId":"c\"1","from":"al\u0069ce"}"#,
            "alice",
            "c\"1"
        ));
    }

    #[test]
    fn claim_lifetimes_cover_the_longest_answer() {
        let mut cfg = crate::config::Config::default();
        let t = Ttls::of(&cfg);
        // store_timeout 5 s (twice, plus the backstop), redis_timeout 2 s (twice).
        assert_eq!(t.pending, Duration::from_millis(14_500));
        assert_eq!(t.window, Duration::from_secs(300));
        assert_eq!(t.wait, Duration::from_millis(2_500));
        assert_eq!(t.late, Duration::from_secs(300 + 5 + 4));
        cfg.kafka_brokers = vec!["k:9092".into()];
        assert_eq!(
            Ttls::of(&cfg).pending,
            t.pending + cfg.kafka_ack_timeout,
            "with Kafka the ack waits for the broker too"
        );
        assert_eq!(ms(Duration::ZERO), 1, "PX 0 is an error in Redis");
    }
}
