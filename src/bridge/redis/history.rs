//! Room history across nodes: Redis sequences the messages of rooms with history, keeps them
//! in one stream per room, and the nodes read it to resume clients that come from elsewhere.
//! The owner shard of the room on each node keeps the node's cache of it
//! ([`crate::shard::service::history::Store`], cluster mode); this part is the bridge's:
//! the two scripts, their queues, and the tags that tell an owner whether its cache is
//! current.
//!
//! - **Append** ([`APPEND_LUA`], one script per message, in pipelines of at most
//!   [`super::PIPELINE_MAX`], one pipeline in flight, so Redis runs them in the order the
//!   owner sequenced them): the next offset (`HINCRBY` on `<p>{room:x}:e`), the epoch (set
//!   from the node's random candidate when the hash is missing: a first message, or a Redis
//!   that lost its data; or when the node asks for a new one after sequencing messages
//!   itself), `XADD <p>{room:x}:h MAXLEN ~ history_size <offset>-0`, `PEXPIRE` of both keys
//!   to `history_ttl` when it is set, and `PUBLISH` of the history envelope on the room's
//!   channel: every node, the origin too, delivers the message when it hears it, so every
//!   node delivers a room's messages in offset order. Every key shares the room's hash tag.
//!   A pipeline Redis did not answer (timed out, or its connection failed after sending)
//!   may have run: it is sent again, in order, until Redis answers, and the script runs each
//!   `(node, per-node sequence number)` once (bounded: [`APPEND_TRIES_MAX`],
//!   [`APPEND_RETRY_FOR`]). Messages Redis never saw (no connection with nothing waiting
//!   ahead, [`APPENDS_QUEUED_MAX`] waiting), refused, or gave up on go back to their owner
//!   shard, which sequences them under a node-local epoch (`rooms::Msg::Fallback`).
//! - **Read** ([`READ_LUA`]): the room's epoch, last offset and the kept entries from an
//!   offset, in one script (one consistent snapshot), after the node holds the room's channel
//!   (a read parks until the subscription is confirmed, at most `redis_timeout`): every
//!   message after the snapshot then reaches the node live. Owners ask for one read per room
//!   at a time and share it between every resume it answers.
//! - **Tags.** Each confirmed subscription of a history room's channel gets a new tag, told
//!   to the room's owner (`rooms::Msg::Hold`) in order with the messages and reads, and every
//!   message and read carries the tag it came under: an owner trusts its cache only while its
//!   entries came under the tag held now. Anything that may have lost a push (the subscriber
//!   connection lost or deaf, a push dropped at [`super::INBOUND_MAX`], a bridge-to-shard
//!   message dropped) moves the node's view generation (`RedisStats::history_gen`), which
//!   every cache also checks.
//!
//! Nothing here runs per recipient, nor logs per message.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::LazyLock;

use redis::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Redis;
use crate::cluster;
use crate::route::Target;
use crate::shard::service::history::Snapshot;
use crate::shard::service::rooms::{self, ApiReply};
use crate::shard::service::ServiceMsg;
use crate::shard::ShardMsg;

/// Appends waiting for Redis; past it a message is sequenced by its owner shard instead
/// (counted in `switchboard_redis_history_local_total`).
pub const APPENDS_QUEUED_MAX: usize = 65_536;

/// Most times one append is sent to Redis without an answer (timed out, or the connection
/// failed after it was sent) before it is given up: sequenced by its owner shard instead
/// (counted in `switchboard_redis_history_append_abandoned_total`; the first copy may still
/// run, and then this node delivers the message twice, once per epoch).
pub const APPEND_TRIES_MAX: u32 = 6;

/// How long after an append was first sent it may still be tried again (or wait for the
/// connection to come back); past it it is given up as at [`APPEND_TRIES_MAX`].
pub const APPEND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a node's append mark in a room (`<p>{room:x}:n:<node hex>`, [`APPEND_LUA`])
/// lives after its last append there, at least: the script is given the longer of this and
/// [`APPEND_RETRY_FOR`] plus two `redis_timeout`s ([`append_mark_ttl`]), past the last moment
/// a copy of an append can still arrive.
pub const APPEND_MARK_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The mark's lifetime for `redis_timeout`: [`APPEND_MARK_TTL`], or longer with a long
/// timeout (a copy sent at the end of the retry window may wait a timeout to be sent and
/// another to run).
pub fn append_mark_ttl(redis_timeout: std::time::Duration) -> std::time::Duration {
    APPEND_MARK_TTL.max(APPEND_RETRY_FOR + redis_timeout * 2)
}

/// The pause before a pipeline Redis did not answer is sent again (or, while the publisher's
/// connection is down, between looks for it).
pub const APPEND_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads waiting (for the room's subscription, or for Redis); past it a read is answered
/// "unavailable" (the resume gets `recovered: false`).
pub const READS_WAITING_MAX: usize = 65_536;

/// Most read scripts in one pipeline (a read may bring `history_size` entries).
pub const READ_BATCH_MAX: usize = 64;

/// How often parked reads are checked against `redis_timeout`.
pub const PARKED_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// One message into a room's history: KEYS stream, state hash, the origin's mark
/// (`<p>{room:x}:n:<node hex>`); ARGV channel, envelope prefix, head, candidate epoch,
/// history_size, history_ttl ms (0: none), `1` to start a new epoch, the publish command
/// (`PUBLISH`, or `SPUBLISH` on a Redis Cluster), the mark's lifetime in ms
/// ([`APPEND_MARK_TTL`]), the message's per-node sequence number.
/// Returns `{offset, epoch, 0}`.
///
/// Idempotent per origin: the origin's mark keeps `<seq> <offset> <epoch>` of the last
/// message it appended to the room. A node sends its messages in sequence order and sends a
/// message again only when Redis did not answer (its first copy may have run), for at most
/// [`APPEND_RETRY_FOR`]: a sequence number at or below the one kept ran already, and the
/// script returns `{offset, epoch, 1}` (the kept offset and epoch for that very message,
/// `{0, epoch, 1}` for an earlier one) without appending or publishing anything. The check
/// comes before the new-epoch request: a retried restart does not start a second epoch. The
/// mark expires [`APPEND_MARK_TTL`] after the node's last append to the room, so the marks of
/// node processes that are gone (node ids are random per process) do not pile up.
pub const APPEND_LUA: &str = r#"
local seq = tonumber(ARGV[10])
local last = redis.call('GET', KEYS[3])
if last then
  local lseq, off, ep = string.match(last, '^(%d+) (%d+) (.+)$')
  if lseq and seq <= tonumber(lseq) then
    if seq < tonumber(lseq) then off = 0 end
    return {tonumber(off), ep, 1}
  end
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if (not epoch) or ARGV[7] == '1' then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local t = redis.call('TIME')
local ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local id = string.format('%d', offset)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], id .. '-0', 'd', ARGV[3], 't', ms)
redis.call('SET', KEYS[3], ARGV[10] .. ' ' .. id .. ' ' .. epoch, 'PX', ARGV[9])
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call(ARGV[8], ARGV[1], ARGV[2] .. id .. ' ' .. epoch .. ' ' .. ARGV[3])
return {offset, epoch, 0}
"#;

/// A room's history from an offset: KEYS stream, state hash; ARGV candidate epoch (set when
/// the room has none, so every node tells one epoch), first offset wanted (empty: the
/// position only), history_size, history_ttl ms. Returns `{epoch, last, [id, head, ms]...}`
/// with the entries history keeps: the last `history_size` offsets, younger than the ttl.
pub const READ_LUA: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local ttl = tonumber(ARGV[4])
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
local last = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local out = {epoch, last}
if ARGV[2] ~= '' then
  local from = tonumber(ARGV[2])
  local size = tonumber(ARGV[3])
  local oldest = last - size + 1
  if from < oldest then from = oldest end
  if from < 1 then from = 1 end
  if from <= last then
    local cutoff = 0
    if ttl > 0 then
      local t = redis.call('TIME')
      cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl
    end
    local es = redis.call('XRANGE', KEYS[1], string.format('%d', from), '+', 'COUNT', size)
    for _, e in ipairs(es) do
      local f = e[2]
      local d, at
      for i = 1, #f, 2 do
        if f[i] == 'd' then d = f[i + 1] elseif f[i] == 't' then at = f[i + 1] end
      end
      if d and at and tonumber(at) > cutoff then
        out[#out + 1] = e[1]
        out[#out + 1] = d
        out[#out + 1] = at
      end
    end
  end
end
return out
"#;

static APPEND: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(APPEND_LUA));
static READ: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(READ_LUA));

/// What an owner shard asks of the bridge for a room with history (clustered only).
pub enum HistoryJob {
    /// Sequence and publish one message (`head`: its frame's JSON object without the closing
    /// brace); `restart` asks for a new epoch. On failure it goes back to `owner`.
    Append {
        room: Arc<str>,
        opts: u16,
        size: u32,
        ttl_ms: u64,
        head: Box<[u8]>,
        restart: bool,
        owner: usize,
        api: Option<ApiReply>,
        /// The publish's span when it is traced: the append's `redis.publish` is its child.
        trace: Option<Box<tracing::Span>>,
    },
    /// Read the room's position and its kept entries from `from` (`None`: the position only).
    Read {
        room: Arc<str>,
        owner: usize,
        from: Option<u64>,
        size: u32,
        ttl_ms: u64,
    },
}

struct Append {
    room: Arc<str>,
    opts: u16,
    size: u32,
    ttl_ms: u64,
    head: Box<[u8]>,
    restart: bool,
    owner: usize,
    api: Option<ApiReply>,
    /// This node's sequence number for the message (every append gets the next one): the
    /// script runs a message once however often it is sent.
    seq: u64,
    /// Sent this many times without an answer, the first time then.
    tries: u32,
    first_sent: Option<Instant>,
    /// A traced publish's `redis.publish` span (until Redis answers; marked failed when the
    /// message goes back to its owner) and its context, which the envelope carries.
    span: Option<(Box<tracing::Span>, (u128, u64))>,
}

struct Read {
    room: Arc<str>,
    owner: usize,
    from: Option<u64>,
    size: u32,
    ttl_ms: u64,
    at: Instant,
}

/// The bridge's history state (on the Redis clients).
#[derive(Default)]
pub(super) struct State {
    appends: RefCell<VecDeque<Append>>,
    /// Appends taken from `appends` by the appender and not settled yet.
    appends_out: Cell<usize>,
    /// The last sequence number given to an append.
    last_seq: Cell<u64>,
    wake_append: Notify,
    ready: RefCell<VecDeque<Read>>,
    /// Reads waiting for the room's channel to be held, per room.
    parked: RefCell<HashMap<Arc<str>, Vec<Read>>>,
    parked_len: Cell<usize>,
    wake_read: Notify,
    /// The tag and options index of each history room channel held now (bounded by the
    /// channels held; the options are looked up once per subscription, not per message).
    holds: RefCell<HashMap<Arc<str>, (u64, u16)>>,
    last_tag: Cell<u64>,
}

/// The append script's answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Appended {
    /// The message's offset; 0 when the message ran already and its offset is not kept (an
    /// earlier message than the origin's last one).
    pub offset: u64,
    pub epoch: String,
    /// The script had run this message already (a retry): nothing was appended or
    /// published this time.
    pub repeat: bool,
}

/// `{offset, epoch, repeat}` from the append script.
pub fn parse_append(v: &Value) -> Option<Appended> {
    let Value::Array(a) = v else { return None };
    let repeat = match a.get(2) {
        Some(Value::Int(1)) => true,
        Some(Value::Int(0)) => false,
        _ => return None,
    };
    let offset = match a.first()? {
        Value::Int(n) if *n > 0 => *n as u64,
        Value::Int(0) if repeat => 0,
        _ => return None,
    };
    let epoch = text(a.get(1)?)?;
    (!epoch.is_empty() && epoch.len() <= cluster::EPOCH_BYTES_MAX).then(|| Appended {
        offset,
        epoch: epoch.into(),
        repeat,
    })
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) if *n >= 0 => Some(*n as u64),
        other => text(other)?.parse().ok(),
    }
}

/// The read script's reply: the epoch, the last offset, and each entry's frame as every node
/// builds it (born `born`).
pub fn parse_read(v: &Value, born: u64) -> Option<Snapshot> {
    let Value::Array(a) = v else { return None };
    let epoch = text(a.first()?)?;
    if epoch.is_empty() || epoch.len() > cluster::EPOCH_BYTES_MAX {
        return None;
    }
    let last = number(a.get(1)?)?;
    let rest = &a[2..];
    if rest.len() % 3 != 0 {
        return None;
    }
    let mut entries = Vec::with_capacity(rest.len() / 3);
    for e in rest.chunks(3) {
        let offset: u64 = text(&e[0])?.strip_suffix("-0")?.parse().ok()?;
        let Value::BulkString(head) = &e[1] else {
            return None;
        };
        if head.first() != Some(&b'{') || offset == 0 || offset > last {
            return None;
        }
        let at_ms = number(&e[2])?;
        entries.push((
            offset,
            at_ms,
            cluster::history_frame(head, offset, epoch, born),
        ));
    }
    Some(Snapshot {
        epoch: epoch.into(),
        last,
        entries,
    })
}

/// A fresh random epoch candidate (16 hex digits, as single-node epochs).
fn candidate_epoch() -> String {
    let (hi, _) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{hi:016x}")
}

impl Redis {
    /// `room`'s options index, when it has history.
    fn history_options(&self, room: &str) -> Option<u16> {
        let rooms = &self.node.cfg.rooms;
        let i = crate::room_options::index_for(rooms, room);
        (crate::room_options::at(rooms, i).history_size > 0).then_some(i)
    }

    fn owner_of(&self, room: &str) -> usize {
        rooms::owner(room, self.node.inboxes.len())
    }

    fn to_owner(&self, shard: usize, m: rooms::Msg) {
        if let Some(f) = &*self.to_shard.borrow() {
            f(shard, ShardMsg::service(ServiceMsg::Rooms(m)));
        }
    }

    /// A history job from an owner shard.
    pub fn history_job(&self, job: HistoryJob) {
        let stats = &self.node.redis_stats;
        match job {
            HistoryJob::Append {
                room,
                opts,
                size,
                ttl_ms,
                head,
                restart,
                owner,
                api,
                trace,
            } => {
                let span = trace.and_then(|parent| {
                    let span = crate::child_span!(
                        &*parent,
                        "redis.publish",
                        otel.kind = "producer",
                        messaging.system = "redis",
                        messaging.destination.name = &*self.ch.room(&room),
                        messaging.message.body.size = head.len() as u64,
                        otel.status_code = tracing::field::Empty,
                    );
                    let ctx = crate::trace::context_of(&span)?;
                    Some((Box::new(span), ctx))
                });
                let seq = self.hist.last_seq.get() + 1;
                self.hist.last_seq.set(seq);
                let a = Append {
                    room,
                    opts,
                    size,
                    ttl_ms,
                    head,
                    restart,
                    owner,
                    api,
                    seq,
                    tries: 0,
                    first_sent: None,
                    span,
                };
                let mut q = self.hist.appends.borrow_mut();
                // Without a connection a message goes back to its owner at once, unless
                // appends are still waiting for an answer ahead of it (it keeps its place
                // behind them: a room's messages are delivered here in the order sequenced).
                let ahead = q.len() + self.hist.appends_out.get();
                if q.len() >= APPENDS_QUEUED_MAX || (self.cmd_conn.borrow().is_none() && ahead == 0)
                {
                    drop(q);
                    self.fall_back(a);
                    return;
                }
                q.push_back(a);
                stats
                    .history_queued
                    .store(q.len() as u64, Ordering::Relaxed);
                if q.len() == 1 {
                    self.hist.wake_append.notify_one();
                }
            }
            HistoryJob::Read {
                room,
                owner,
                from,
                size,
                ttl_ms,
            } => {
                let r = Read {
                    room,
                    owner,
                    from,
                    size,
                    ttl_ms,
                    at: Instant::now(),
                };
                let waiting = self.hist.ready.borrow().len() + self.hist.parked_len.get();
                if waiting >= READS_WAITING_MAX || self.cmd_conn.borrow().is_none() {
                    stats.history_read_failed.fetch_add(1, Ordering::Relaxed);
                    self.read_answer(r, None);
                    return;
                }
                if self.hist.holds.borrow().contains_key(&r.room) {
                    self.hist.ready.borrow_mut().push_back(r);
                    self.hist.wake_read.notify_one();
                } else {
                    self.hist
                        .parked
                        .borrow_mut()
                        .entry(r.room.clone())
                        .or_default()
                        .push(r);
                    self.hist.parked_len.set(self.hist.parked_len.get() + 1);
                    self.hist.wake_read.notify_one();
                }
                self.update_reads_waiting();
            }
        }
    }

    fn update_reads_waiting(&self) {
        let n = self.hist.ready.borrow().len() + self.hist.parked_len.get();
        self.node
            .redis_stats
            .history_reads_waiting
            .store(n as u64, Ordering::Relaxed);
    }

    /// Redis cannot sequence this message: its owner does, under a node-local epoch.
    fn fall_back(&self, a: Append) {
        if let Some((span, _)) = &a.span {
            span.record("otel.status_code", "ERROR");
        }
        self.to_owner(
            a.owner,
            rooms::Msg::Fallback {
                room: a.room,
                opts: a.opts,
                head: a.head,
                api: a.api,
            },
        );
    }

    fn read_answer(&self, r: Read, snap: Option<(u64, u64, Snapshot)>) {
        let (tag, gen, snap) = match snap {
            Some((tag, gen, s)) => (tag, gen, Some(s)),
            None => (0, 0, None),
        };
        self.to_owner(
            r.owner,
            rooms::Msg::Read {
                room: r.room,
                tag,
                gen,
                snap,
            },
        );
    }

    /// The subscriber connection confirmed `channels`: history rooms among them get a new
    /// tag (told to their owner), and their parked reads can run.
    pub(super) fn history_subscribed(&self, channels: &[Arc<str>]) {
        let mut woke = false;
        for ch in channels {
            let Some(room) = self.ch.room_of(ch) else {
                continue;
            };
            let Some(opts) = self.history_options(room) else {
                continue;
            };
            let room: Arc<str> = room.into();
            let tag = self.hist.last_tag.get() + 1;
            self.hist.last_tag.set(tag);
            self.hist
                .holds
                .borrow_mut()
                .insert(room.clone(), (tag, opts));
            self.to_owner(
                self.owner_of(&room),
                rooms::Msg::Hold {
                    room: room.clone(),
                    tag,
                },
            );
            if let Some(rs) = self.hist.parked.borrow_mut().remove(&room) {
                self.hist
                    .parked_len
                    .set(self.hist.parked_len.get() - rs.len());
                self.hist.ready.borrow_mut().extend(rs);
                woke = true;
            }
        }
        if woke {
            self.hist.wake_read.notify_one();
        }
    }

    /// `channels` are about to be unsubscribed: their history rooms are no longer held.
    pub(super) fn history_unsubscribing(&self, channels: &[Arc<str>]) {
        for ch in channels {
            let Some(room) = self.ch.room_of(ch) else {
                continue;
            };
            if self.hist.holds.borrow_mut().remove(room).is_some() {
                let room: Arc<str> = room.into();
                self.to_owner(self.owner_of(&room), rooms::Msg::Hold { room, tag: 0 });
            }
        }
    }

    /// The subscriber connection is gone (or deaf): nothing is held, and pushes may have
    /// been lost: every owner's cache stops answering until it is filled again.
    pub(super) fn history_lost(&self) {
        self.hist.holds.borrow_mut().clear();
        let s = &self.node.redis_stats;
        s.history_gen.fetch_add(1, Ordering::Relaxed);
        s.history_view_resets.fetch_add(1, Ordering::Relaxed);
    }

    /// A history envelope heard on a room channel: to the room's owner shard, which delivers
    /// it here (dropping what it delivered already).
    pub(super) fn history_received(
        &self,
        room: Arc<str>,
        offset: u64,
        epoch: &str,
        head: &[u8],
        trace: Option<(u128, u64)>,
    ) {
        let s = &self.node.redis_stats;
        let held = self.hist.holds.borrow().get(&room).copied();
        let Some((tag, opts)) = held.or_else(|| self.history_options(&room).map(|o| (0, o))) else {
            return; // not a room with history here (another configuration): ignored
        };
        let gen = s.history_gen.load(Ordering::Relaxed);
        let frame = cluster::history_frame(head, offset, epoch, self.node.now_us());
        s.history_received.fetch_add(1, Ordering::Relaxed);
        let owner = self.owner_of(&room);
        // A traced publish: this node's part of its trace (the origin's too: it delivers
        // when Redis says), `redis.receive` to the hand-off and the owner's `shard.deliver`.
        let trace = trace.and_then(|(trace_id, span_id)| {
            let receive = crate::root_span!(
                crate::trace::root_from_node(trace_id, span_id),
                "redis.receive",
                otel.kind = "consumer",
                messaging.system = "redis",
                messaging.message.body.size = head.len() as u64,
                messaging.destination.name = &*room,
                messaging.message.id = offset,
            );
            if receive.is_none() {
                return None;
            }
            Some(Box::new(crate::child_span!(
                &receive,
                "shard.deliver",
                otel.kind = "internal",
                shard = owner as u64,
            )))
        });
        self.to_owner(
            owner,
            rooms::Msg::Clustered {
                room,
                opts,
                offset,
                epoch: epoch.into(),
                frame,
                tag,
                gen,
                trace,
            },
        );
    }

    /// Run queued appends, one pipeline at a time. A pipeline Redis did not answer (timed
    /// out, or its connection failed after it was sent) may have run in part or may still
    /// run: it goes back to the front of the queue and is sent again, in order, until Redis
    /// answers (the script runs each message once; [`APPEND_LUA`]) or it is given up
    /// ([`APPEND_TRIES_MAX`], [`APPEND_RETRY_FOR`]). Only what was never sent, or what
    /// Redis refused, goes back to its owner at once.
    pub(super) async fn history_appender(self: Rc<Self>) {
        let stats = &self.node.redis_stats;
        let mut loaded_gen = 0u64;
        let mut batch: Vec<Append> = Vec::with_capacity(super::PIPELINE_MAX);
        let mark_ttl_ms = append_mark_ttl(self.node.cfg.redis_timeout).as_millis() as u64;
        loop {
            if self.hist.appends.borrow().is_empty() {
                self.hist.wake_append.notified().await;
                continue;
            }
            {
                let mut q = self.hist.appends.borrow_mut();
                let n = q.len().min(super::PIPELINE_MAX);
                batch.extend(q.drain(..n));
                self.hist.appends_out.set(batch.len());
                stats
                    .history_queued
                    .store(q.len() as u64, Ordering::Relaxed);
            }
            let conn = self.cmd_conn.borrow().clone();
            let Some(mut conn) = conn else {
                if self.retry_appends(&mut batch, false) {
                    tokio::time::sleep(APPEND_RETRY_WAIT).await;
                }
                continue;
            };
            let gen = self.cmd_gen.get();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            // On a Redis Cluster a loaded script lives on one master only: the body goes
            // with every call there.
            let sharded = self.node.cfg.redis_cluster;
            if loaded_gen != gen && !sharded {
                pipe.cmd("SCRIPT").arg("LOAD").arg(APPEND_LUA).ignore();
            }
            for a in &batch {
                let prefix = cluster::encode_history_prefix(
                    self.node.id,
                    &a.room,
                    a.span.as_ref().map(|(_, ctx)| *ctx),
                );
                if sharded {
                    pipe.cmd("EVAL").arg(APPEND_LUA);
                } else {
                    pipe.cmd("EVALSHA").arg(APPEND.get_hash());
                }
                pipe.arg(3)
                    .arg(self.ch.history(&a.room))
                    .arg(self.ch.history_meta(&a.room))
                    .arg(self.ch.history_mark(&a.room, self.node.id))
                    .arg(&*self.ch.room(&a.room))
                    .arg(prefix)
                    .arg(&a.head[..])
                    .arg(candidate_epoch())
                    .arg(a.size)
                    .arg(a.ttl_ms)
                    .arg(if a.restart { "1" } else { "0" })
                    .arg(self.publish_command())
                    .arg(mark_ttl_ms)
                    .arg(a.seq);
            }
            let r = tokio::time::timeout(
                self.node.cfg.redis_timeout,
                pipe.query_async::<Vec<Value>>(&mut conn),
            )
            .await;
            match r {
                Ok(Ok(vals)) if vals.len() == batch.len() => {
                    loaded_gen = gen;
                    for (a, v) in batch.drain(..).zip(vals) {
                        match parse_append(&v) {
                            Some(done) => {
                                if done.repeat {
                                    stats.history_append_repeats.fetch_add(1, Ordering::Relaxed);
                                }
                                stats.history_appended.fetch_add(1, Ordering::Relaxed);
                                if let Some(api) = &a.api {
                                    // An earlier message found run already: its offset is not
                                    // kept, the answer goes without a position.
                                    let position = (done.offset > 0).then_some(
                                        crate::shard::service::history::Position {
                                            offset: done.offset,
                                            epoch: done.epoch,
                                        },
                                    );
                                    let f = rooms::api_answer_frame(
                                        api,
                                        position.as_ref(),
                                        self.node.now_us(),
                                    );
                                    if let Some(to) = &*self.to_shard.borrow() {
                                        to(
                                            api.conn.shard as usize,
                                            ShardMsg::Deliver {
                                                target: Target::Conn(api.conn),
                                                frame: f,
                                            },
                                        );
                                    }
                                }
                            }
                            None => {
                                // Refused (the script did not run, or failed before it
                                // published): sequenced by its owner.
                                if let Value::ServerError(e) = &v {
                                    if e.code() == "NOSCRIPT" {
                                        loaded_gen = 0;
                                    }
                                    self.log_error("history append failed", &e.to_string());
                                }
                                stats.history_append_failed.fetch_add(1, Ordering::Relaxed);
                                self.fall_back(a);
                            }
                        }
                    }
                    self.hist.appends_out.set(0);
                }
                other => {
                    loaded_gen = 0;
                    match other {
                        Ok(Err(e)) => self.log_error("history append failed", &e),
                        Err(_) => {
                            self.log_error("history append failed", &"timed out (redis_timeout)")
                        }
                        Ok(Ok(_)) => self.log_error("history append failed", &"short reply"),
                    }
                    if self.retry_appends(&mut batch, true) {
                        tokio::time::sleep(APPEND_RETRY_WAIT).await;
                    }
                }
            }
        }
    }

    /// A batch that got no answer (`sent`: it was sent; otherwise there was no connection to
    /// send it on). What was sent and is within its bounds goes back to the front of the
    /// queue, in order, with everything after it; what was never sent and waits behind
    /// nothing, or was tried past its bounds, goes back to its owner now. True when
    /// something is to be tried again.
    fn retry_appends(&self, batch: &mut Vec<Append>, sent: bool) -> bool {
        let stats = &self.node.redis_stats;
        let now = Instant::now();
        let mut keep: Vec<Append> = Vec::with_capacity(batch.len());
        for mut a in batch.drain(..) {
            if sent {
                a.tries += 1;
                a.first_sent.get_or_insert(now);
            }
            if keep.is_empty() {
                match a.first_sent {
                    // Never sent, nothing ahead of it: Redis never saw it.
                    None => {
                        self.fall_back(a);
                        continue;
                    }
                    Some(at)
                        if a.tries >= APPEND_TRIES_MAX
                            || now.duration_since(at) >= APPEND_RETRY_FOR =>
                    {
                        stats.history_append_failed.fetch_add(1, Ordering::Relaxed);
                        stats
                            .history_append_abandoned
                            .fetch_add(1, Ordering::Relaxed);
                        self.fall_back(a);
                        continue;
                    }
                    Some(_) => {}
                }
            }
            if sent {
                stats.history_append_retried.fetch_add(1, Ordering::Relaxed);
            }
            keep.push(a);
        }
        let again = !keep.is_empty();
        let mut q = self.hist.appends.borrow_mut();
        for a in keep.into_iter().rev() {
            q.push_front(a);
        }
        self.hist.appends_out.set(0);
        stats
            .history_queued
            .store(q.len() as u64, Ordering::Relaxed);
        again
    }

    /// Run ready reads in pipelines; answer parked reads that waited past `redis_timeout`.
    pub(super) async fn history_reader(self: Rc<Self>) {
        let stats = &self.node.redis_stats;
        let mut loaded_gen = 0u64;
        let mut batch: Vec<Read> = Vec::with_capacity(READ_BATCH_MAX);
        loop {
            if self.hist.ready.borrow().is_empty() {
                if self.hist.parked_len.get() == 0 {
                    self.hist.wake_read.notified().await;
                } else {
                    tokio::select! {
                        _ = self.hist.wake_read.notified() => {}
                        _ = tokio::time::sleep(PARKED_CHECK) => {}
                    }
                }
                self.expire_parked();
                continue;
            }
            {
                let mut q = self.hist.ready.borrow_mut();
                let n = q.len().min(READ_BATCH_MAX);
                batch.extend(q.drain(..n));
            }
            let conn = self.cmd_conn.borrow().clone();
            let Some(mut conn) = conn else {
                stats
                    .history_read_failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for r in batch.drain(..) {
                    self.read_answer(r, None);
                }
                self.update_reads_waiting();
                continue;
            };
            // The tags and view the reads are taken under: read before they are sent, so a
            // change while they run shows as a mismatch at the owner.
            let tags: Vec<u64> = {
                let holds = self.hist.holds.borrow();
                batch
                    .iter()
                    .map(|r| holds.get(&r.room).map_or(0, |h| h.0))
                    .collect()
            };
            let view = stats.history_gen.load(Ordering::Relaxed);
            let gen = self.cmd_gen.get();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let sharded = self.node.cfg.redis_cluster;
            if loaded_gen != gen && !sharded {
                pipe.cmd("SCRIPT").arg("LOAD").arg(READ_LUA).ignore();
            }
            for r in &batch {
                let from = r.from.map(|f| f.to_string()).unwrap_or_default();
                if sharded {
                    pipe.cmd("EVAL").arg(READ_LUA);
                } else {
                    pipe.cmd("EVALSHA").arg(READ.get_hash());
                }
                pipe.arg(2)
                    .arg(self.ch.history(&r.room))
                    .arg(self.ch.history_meta(&r.room))
                    .arg(candidate_epoch())
                    .arg(from)
                    .arg(r.size)
                    .arg(r.ttl_ms);
            }
            let res = tokio::time::timeout(
                self.node.cfg.redis_timeout,
                pipe.query_async::<Vec<Value>>(&mut conn),
            )
            .await;
            let born = self.node.now_us();
            match res {
                Ok(Ok(vals)) if vals.len() == batch.len() => {
                    loaded_gen = gen;
                    for ((r, v), tag) in batch.drain(..).zip(vals).zip(tags) {
                        match parse_read(&v, born) {
                            Some(s) => {
                                stats.history_reads.fetch_add(1, Ordering::Relaxed);
                                self.read_answer(r, Some((tag, view, s)));
                            }
                            None => {
                                if let Value::ServerError(e) = &v {
                                    if e.code() == "NOSCRIPT" {
                                        loaded_gen = 0;
                                    }
                                    self.log_error("history read failed", &e.to_string());
                                }
                                stats.history_read_failed.fetch_add(1, Ordering::Relaxed);
                                self.read_answer(r, None);
                            }
                        }
                    }
                }
                other => {
                    loaded_gen = 0;
                    if let Ok(Err(e)) = &other {
                        self.log_error("history read failed", e);
                    } else {
                        self.log_error("history read failed", &"timed out (redis_timeout)");
                    }
                    stats
                        .history_read_failed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for r in batch.drain(..) {
                        self.read_answer(r, None);
                    }
                }
            }
            self.update_reads_waiting();
        }
    }

    /// Parked reads whose room's channel was not held within `redis_timeout`: unavailable.
    fn expire_parked(&self) {
        if self.hist.parked_len.get() == 0 {
            return;
        }
        let timeout = self.node.cfg.redis_timeout;
        let now = Instant::now();
        let mut late = Vec::new();
        self.hist.parked.borrow_mut().retain(|_, rs| {
            let (old, keep): (Vec<Read>, Vec<Read>) = std::mem::take(rs)
                .into_iter()
                .partition(|r| now.duration_since(r.at) >= timeout);
            late.extend(old);
            *rs = keep;
            !rs.is_empty()
        });
        if late.is_empty() {
            return;
        }
        self.hist
            .parked_len
            .set(self.hist.parked_len.get() - late.len());
        self.node
            .redis_stats
            .history_read_failed
            .fetch_add(late.len() as u64, Ordering::Relaxed);
        for r in late {
            self.read_answer(r, None);
        }
        self.update_reads_waiting();
    }
}

/// Whether a frame is a history message built by [`cluster::history_frame`] (for tests).
#[cfg(test)]
fn is_history_frame(f: &crate::proto::Frame) -> bool {
    f.payload().ends_with(b"\"}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_append_mark_outlives_every_copy_of_an_append() {
        use std::time::Duration;
        assert_eq!(append_mark_ttl(Duration::from_secs(2)), APPEND_MARK_TTL);
        // The longest redis_timeout the config takes (60 s): the retry window plus two.
        assert_eq!(
            append_mark_ttl(Duration::from_secs(60)),
            APPEND_RETRY_FOR + Duration::from_secs(120)
        );
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn append_replies_parse_or_are_refused() {
        let v = Value::Array(vec![Value::Int(7), bulk("00ff00ff00ff00ff"), Value::Int(0)]);
        assert_eq!(
            parse_append(&v),
            Some(Appended {
                offset: 7,
                epoch: "00ff00ff00ff00ff".into(),
                repeat: false
            })
        );
        // A repeat: the kept offset, or 0 for an earlier message.
        let v = Value::Array(vec![Value::Int(7), bulk("e"), Value::Int(1)]);
        assert!(parse_append(&v).is_some_and(|a| a.repeat && a.offset == 7));
        let v = Value::Array(vec![Value::Int(0), bulk("e"), Value::Int(1)]);
        assert!(parse_append(&v).is_some_and(|a| a.repeat && a.offset == 0));
        assert_eq!(
            parse_append(&Value::Array(vec![Value::Int(0), bulk("e"), Value::Int(0)])),
            None
        );
        assert_eq!(
            parse_append(&Value::Array(vec![Value::Int(3), bulk("")])),
            None
        );
        assert_eq!(
            parse_append(&Value::Array(vec![Value::Int(3), bulk("e")])),
            None
        );
        assert_eq!(parse_append(&Value::Nil), None);
        let long = "e".repeat(cluster::EPOCH_BYTES_MAX + 1);
        assert_eq!(
            parse_append(&Value::Array(vec![
                Value::Int(3),
                bulk(&long),
                Value::Int(0)
            ])),
            None
        );
    }

    #[test]
    fn read_replies_build_the_frames_every_node_builds() {
        let head = r#"{"type":"message","room":"r","data":1,"timestamp":9"#;
        let v = Value::Array(vec![
            bulk("abcd"),
            Value::Int(5),
            bulk("4-0"),
            bulk(head),
            bulk("1000"),
            bulk("5-0"),
            bulk(head),
            bulk("1001"),
        ]);
        let s = parse_read(&v, 0).unwrap();
        assert_eq!((s.epoch.as_str(), s.last), ("abcd", 5));
        assert_eq!(s.entries.len(), 2);
        assert_eq!((s.entries[0].0, s.entries[0].1), (4, 1000));
        let live = cluster::history_frame(head.as_bytes(), 5, "abcd", 0);
        assert_eq!(s.entries[1].2.wire(), live.wire());
        assert!(is_history_frame(&live));
        // Position only.
        let p = parse_read(&Value::Array(vec![bulk("abcd"), Value::Int(0)]), 0).unwrap();
        assert!(p.entries.is_empty() && p.last == 0);
        // Malformed: an entry past the last offset, a bad id, a short entry, no epoch.
        let past = Value::Array(vec![
            bulk("e"),
            Value::Int(1),
            bulk("2-0"),
            bulk(head),
            bulk("1"),
        ]);
        assert!(parse_read(&past, 0).is_none());
        let bad = Value::Array(vec![
            bulk("e"),
            Value::Int(9),
            bulk("x"),
            bulk(head),
            bulk("1"),
        ]);
        assert!(parse_read(&bad, 0).is_none());
        let short = Value::Array(vec![bulk("e"), Value::Int(9), bulk("2-0")]);
        assert!(parse_read(&short, 0).is_none());
        assert!(parse_read(&Value::Array(vec![]), 0).is_none());
        assert!(parse_read(&Value::Okay, 0).is_none());
    }
}
