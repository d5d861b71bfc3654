//! The Redis side of the bridge: what joins this node to the others. It owns every Redis
//! connection of the node, on the bridge's runtime; shards never see them.
//!
//! - **Publishing.** A delivery whose recipients may be on other nodes (from a shard through
//!   `BridgeMsg::Deliver`, or made here by the store: a DM's `message.create`, a
//!   notification) becomes one [`crate::cluster`] envelope on one channel, queued in
//!   [`Redis::publish`]. One publisher task drains the queue in pipelines of at most
//!   [`PIPELINE_MAX`] `PUBLISH` commands, one pipeline in flight: one round trip carries
//!   hundreds of messages. The queue holds at most `redis_queue_max` messages: while Redis is
//!   slow or down it fills, then newer messages are dropped and counted
//!   (`switchboard_redis_dropped_total`); what waits is published once Redis is back.
//! - **Subscribing.** One subscriber connection (RESP3; Redis pushes arrive through the
//!   client's callback into a bounded channel, [`INBOUND_MAX`], then to [`Redis::inbound`]),
//!   holding a room's channel only while this node has a subscriber of the room (the
//!   directory's node-level transitions), a user's channel while it has one of the user's
//!   devices, a topic's while it has a member, and always the broadcast and this node's own
//!   channel. Changes are sent in batches ([`SUBSCRIBE_BATCH_MAX`] channels per command).
//!   A received envelope is handed to this node's shards with recipients, through the
//!   store's ordered backlog, as the frame its origin encoded (one copy, no re-encoding).
//! - **Faults.** A failed connection is made again after a capped, jittered backoff
//!   ([`crate::cluster::Backoff`], `redis_reconnect_max`); a new subscriber connection
//!   subscribes everything the node needs again. A canary published to the node's own
//!   channel every `redis_canary_interval` proves the subscription still delivers; none back
//!   within `redis_canary_timeout` (the connection alive but deaf, as after a failover) makes
//!   the node drop that connection and subscribe again on a new one. `/ready` answers 503 while
//!   either connection is down or the canary is late, unless `redis_ready_when_degraded`.
//!
//! Nothing here runs per recipient; per message it is one envelope copy out and one frame
//! copy in. Without `redis_url` nothing here exists.

pub mod history;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::cluster::{self, Backoff, Channels, Inbound, Subscriptions};
use crate::directory::Transition;
use crate::proto::envelope::droppable;
use crate::proto::Frame;
use crate::route::Target;
use crate::shard::service::presence::state;
use crate::shard::Node;

#[path = "redis_cluster.rs"]
mod redis_cluster;
pub use redis_cluster::CmdConn;

/// Most `PUBLISH` commands in one pipeline (one round trip).
pub const PIPELINE_MAX: usize = 512;

/// Most channels in one `SUBSCRIBE` or `UNSUBSCRIBE` command.
pub const SUBSCRIBE_BATCH_MAX: usize = 1024;

/// Pushes (messages) from the subscriber connection waiting for [`Redis::inbound`]; past it
/// they are dropped and counted (`switchboard_redis_inbound_dropped_total`).
pub const INBOUND_MAX: usize = 65_536;

/// Bytes of the pushes waiting for [`Redis::inbound`] at most (beside [`INBOUND_MAX`]): a
/// burst of large envelopes from other nodes cannot take more memory than this; past it
/// pushes are dropped and counted (`switchboard_redis_inbound_dropped_total`).
pub const INBOUND_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The bytes of a push that count against [`INBOUND_BYTES_MAX`]: its payload.
pub(crate) fn push_bytes(p: &PushInfo) -> usize {
    match p.data.get(1) {
        Some(Value::BulkString(b)) => b.len(),
        _ => 0,
    }
}

/// Admit a push of `n` bytes to the inbound queue (false: over [`INBOUND_BYTES_MAX`]).
pub(crate) fn inbound_admit(stats: &RedisStats, n: usize) -> bool {
    let n = n as u64;
    let before = stats.inbound_bytes.fetch_add(n, Ordering::Relaxed);
    if before + n > INBOUND_BYTES_MAX as u64 {
        stats.inbound_bytes.fetch_sub(n, Ordering::Relaxed);
        return false;
    }
    true
}

/// The client's own command channel between a connection handle and its driver task
/// (`pipeline_buffer_size`): one pipeline or one (un)subscribe at a time uses one slot.
pub const CLIENT_PIPELINE_BUFFER: usize = 64;

/// The client's write buffer flush threshold (`write_backpressure_boundary`): a pipeline of
/// [`PIPELINE_MAX`] small envelopes is written in a few calls.
pub const CLIENT_WRITE_BOUNDARY: usize = 256 * 1024;

/// Presence changes waiting for Redis ([`Redis::presence`]); past it a change is told as
/// this node judged it (counted in `switchboard_redis_presence_unchecked_total`).
pub const PRESENCE_QUEUE_MAX: usize = 65_536;

/// Most presence changes in one pipeline.
pub const PRESENCE_BATCH_MAX: usize = 256;

/// How often a node renews its `alive` key.
pub const NODE_HEARTBEAT: Duration = Duration::from_secs(2);

/// The TTL of a node's `alive` key: a node silent this long is dead, and the first node to
/// notice reaps its presence. Users of a node that died without a word go offline elsewhere
/// within `NODE_DEAD_AFTER + REAP_INTERVAL` (and one pipeline): 12 s.
pub const NODE_DEAD_AFTER: Duration = Duration::from_secs(10);

/// How often a node looks for dead nodes to reap.
pub const REAP_INTERVAL: Duration = Duration::from_secs(2);

/// How long a reaper's lock lasts (a reaper that dies mid-way leaves the rest to another).
pub const REAP_LOCK: Duration = Duration::from_secs(30);

/// Users read per `SSCAN` of a dead node's set, and re-added per pipeline after a reconnect.
pub const PRESENCE_SCAN_COUNT: usize = 512;

/// Presence across nodes, two keys per user in one slot (`KEYS[1]`, the user's nodes;
/// `KEYS[2]`, its record): `ARGV[2]` 1 = node `ARGV[1]` holds the user present now, 0 = it
/// does not any more. Returns 1 when that made the user online or offline cluster-wide: this
/// node joined the empty set, or left it empty. Joining a set it was in, or leaving one it
/// was not in, changes nothing: a script run again (a pipeline Redis ran but did not answer
/// in time is tried again) is never told twice, nor a node the reaper took out. Then the
/// record becomes `ARGV[6]` (unless empty; an offline one for `ARGV[7]` ms), and when
/// `ARGV[3]` names a channel, it publishes `ARGV[4]` (the change's envelope) there from
/// inside the script, so every node's watchers hear a user's changes in the order Redis
/// judged them, whichever nodes judged them, and readers find the record they heard last.
/// The channel is tagged like the keys (one slot), and `ARGV[5]` is the command: `PUBLISH`,
/// or `SPUBLISH` on a Redis Cluster.
const PRESENCE_LUA: &str = "\
local told = 0 \
if ARGV[2] == '1' then \
  if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then told = 1 end \
else \
  if redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then told = 1 end \
end \
if told == 1 then \
  if ARGV[6] ~= '' then \
    if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[6]) \
    else redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[7]) end \
  end \
  if ARGV[3] ~= '' then redis.call(ARGV[5], ARGV[3], ARGV[4]) end \
end \
return told";

/// Room presence across nodes, one key per room (`KEYS[1]`, the room's hash: user -> the
/// nodes holding it in the room, space-separated hex ids): `ARGV[2]` 1 = node `ARGV[1]` holds
/// user `ARGV[3]` in the room now, 0 = not any more. Returns 1 when that is the cluster's
/// join (the user's first node) or leave (its last), and then publishes `ARGV[5]` on channel
/// `ARGV[4]` (the room's, same slot; none when empty) with command `ARGV[6]`. A node already
/// listed joining, or one not listed leaving, changes nothing (a reaped node is never told
/// twice).
const ROOM_LUA: &str = "\
local cur = redis.call('HGET', KEYS[1], ARGV[3]) \
local list = {} \
local had = false \
if cur then \
  for n in string.gmatch(cur, '%S+') do \
    if n == ARGV[1] then had = true else table.insert(list, n) end \
  end \
end \
local told = 0 \
if ARGV[2] == '1' then \
  if had then return 0 end \
  table.insert(list, ARGV[1]) \
  redis.call('HSET', KEYS[1], ARGV[3], table.concat(list, ' ')) \
  if #list == 1 then told = 1 end \
else \
  if not had then return 0 end \
  if #list == 0 then \
    redis.call('HDEL', KEYS[1], ARGV[3]) \
    told = 1 \
  else \
    redis.call('HSET', KEYS[1], ARGV[3], table.concat(list, ' ')) \
  end \
end \
if told == 1 and ARGV[4] ~= '' then redis.call(ARGV[6], ARGV[4], ARGV[5]) end \
return told";

/// How long the presence worker waits before it tries a batch Redis did not answer again.
pub const PRESENCE_RETRY: Duration = Duration::from_millis(500);

/// How long Redis keeps the record of a user no node holds (`<p>{topic:presence:<id>}:rec`,
/// for `last_seen` on every node): after it, the user reads as never seen on nodes that do
/// not remember it themselves.
pub const PRESENCE_RECORD_TTL: Duration = Duration::from_secs(24 * 3600);

/// Presence reads ([`Redis::presence_read`]) in flight at most; past it a read is answered
/// from this node's state at once (`switchboard_presence_read_local_total`).
pub const PRESENCE_READS_MAX: usize = 1_024;

/// Users read per pipeline of a presence read (two commands each).
pub const PRESENCE_READ_BATCH: usize = 256;

/// How often a watch's read looks whether its users' watch channels are held yet.
pub const PRESENCE_READ_POLL: Duration = Duration::from_millis(5);

/// A node's heartbeat, in its own slot (`KEYS`: alive, reaper lock, reaped mark; `ARGV[1]`
/// the TTL in ms): renew `alive`, then say whether the cluster forgot this node: 1 = no,
/// 2 = another node is reaping it now (wait), 3 = it was reaped and the reaper is done (the
/// mark is cleared: announce every user again, once).
const HEARTBEAT_LUA: &str = "\
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) \
if redis.call('EXISTS', KEYS[3]) == 0 then return 1 end \
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end \
redis.call('DEL', KEYS[3]) \
return 3";

/// Start reaping a node, in its slot (`KEYS`: alive, reaper lock, reaped mark; `ARGV`: this
/// node, lock TTL ms, mark TTL ms): only if its `alive` key is gone at this very moment and no
/// one else holds the lock. Returns 1 when this node is now its reaper.
const REAP_BEGIN_LUA: &str = "\
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end \
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3]) \
return 1";

/// Finish reaping a node, in its slot (`KEYS`: reaper lock, the node's users, its room
/// presences; `ARGV[1]` this node): forget them and release the lock, only while this node
/// still holds it.
const REAP_END_LUA: &str = "\
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
redis.call('DEL', KEYS[2]) \
redis.call('DEL', KEYS[3]) \
redis.call('DEL', KEYS[1]) \
return 1";

/// How long a reaped node's mark lasts: a node that was only paused learns it was forgotten
/// if it comes back within this.
pub const REAPED_MARK: Duration = Duration::from_secs(3600);

/// How often the bridge re-reads the directory when a shard could not report a first/last
/// transition (its inbox to the bridge was full), and in any case.
pub const SUBS_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// Least time between two log lines about Redis errors.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Counters and gauges of the Redis clients, kept by the bridge, rendered by `/metrics`.
#[derive(Default)]
pub struct RedisStats {
    /// True when `redis_url` is set (then `up` is part of readiness).
    pub configured: AtomicBool,
    /// 1 while both connections are up and the canary is on time.
    pub up: AtomicU64,
    /// Envelopes Redis took (`PUBLISH` answered).
    pub published: AtomicU64,
    /// Envelopes of pipelines that failed (Redis may or may not have published them).
    pub publish_failed: AtomicU64,
    /// Envelopes dropped because `redis_queue_max` were waiting.
    pub dropped: AtomicU64,
    /// Envelopes waiting to be published now.
    pub queued: AtomicU64,
    /// Envelopes received from other nodes and handed to this node's shards.
    pub received: AtomicU64,
    /// Envelopes that could not be decoded.
    pub malformed: AtomicU64,
    /// Pushes dropped because [`INBOUND_MAX`] or [`INBOUND_BYTES_MAX`] were waiting.
    pub inbound_dropped: AtomicU64,
    /// Bytes of the pushes waiting for the inbound task (not a metric: the bound's ledger).
    pub inbound_bytes: AtomicU64,
    /// Connections made again after a failure (both kinds).
    pub reconnects: AtomicU64,
    /// Canaries not back within `redis_canary_timeout` (each makes the node resubscribe).
    pub canary_missed: AtomicU64,
    /// Round trip of the last canary, µs.
    pub canary_rtt_us: AtomicU64,
    /// Channels this node needs, and the ones Redis has confirmed.
    pub subs_expected: AtomicU64,
    pub subs_held: AtomicU64,
    /// Presence changes Redis judged: told to the watchers (the cluster's), or not (another
    /// node holds the user).
    pub presence_told: AtomicU64,
    pub presence_kept: AtomicU64,
    /// Presence changes told as this node judged them (Redis down, or the queue full).
    pub presence_unchecked: AtomicU64,
    /// Presence changes of this node written to Redis after a reconnect, and the times this
    /// node found the cluster had reaped it while it was alive (its users announced again).
    pub presence_resynced: AtomicU64,
    pub forgotten: AtomicU64,
    /// Presence reads of users held by other nodes Redis answered, and reads answered from
    /// this node's state instead (Redis down or late, or too many in flight).
    pub presence_reads: AtomicU64,
    pub presence_read_failed: AtomicU64,
    /// Set by a shard that could not report a first/last transition to the bridge (its
    /// inbox full): the bridge re-reads the directory for the channels it must hold.
    pub transitions_lost: AtomicBool,
    /// Set by a shard whose presence change could not reach the bridge (its inbox full; the
    /// shard told its own watchers): the bridge re-reads the directory for the users this
    /// node holds and resyncs, telling the other nodes what they missed.
    pub presence_lost: AtomicBool,
    /// Service messages from other nodes dropped because a shard's inbox was full.
    pub handoff_dropped: AtomicU64,
    /// Bridge tasks that panicked and were started again (a bug: reported, never silent).
    pub task_restarts: AtomicU64,
    /// Users of dead nodes whose presence this node reaped (and dead nodes reaped).
    pub presence_reaped: AtomicU64,
    pub nodes_reaped: AtomicU64,
    /// `clientMsgId` claims (direct messages; `redis_url` set, no `database_url`): taken by
    /// this node for a new message.
    pub dedup_claimed: AtomicU64,
    /// Retries answered with the first copy's ack from Redis (not stored or delivered again).
    pub dedup_repeats: AtomicU64,
    /// Retries that found the first copy still in flight on another node and waited for it.
    pub dedup_waited: AtomicU64,
    /// Retries answered `message still in flight, retry later` (the first copy was in flight
    /// elsewhere for as long as a retry waits).
    pub dedup_in_flight: AtomicU64,
    /// Messages handed to the store without asking Redis (down, slow, or the claim queue
    /// full): deduplicated on this node only.
    pub dedup_unchecked: AtomicU64,
    /// Claim updates (an ack recorded, a claim released or extended) given up: a pipeline
    /// failed or the queue was full. The claim expires after its pending TTL.
    pub dedup_settle_failed: AtomicU64,
    /// The cluster's numbers as of the last heartbeat (`/api/stats`): live nodes, their
    /// connections and connection limits summed, and when (Unix ms; 0 = not yet).
    pub cluster_nodes: AtomicU64,
    pub cluster_connections: AtomicU64,
    pub cluster_max_connections: AtomicU64,
    pub cluster_as_of_ms: AtomicU64,
    /// Room history across nodes ([`history`]). Not a metric: the bridge's view generation,
    /// moved whenever a push may have been lost; owner shards' caches check it.
    pub history_gen: AtomicU64,
    /// Messages Redis sequenced (append scripts answered), and appends that failed (their
    /// messages were sequenced by their owner shard instead).
    pub history_appended: AtomicU64,
    pub history_append_failed: AtomicU64,
    /// Appends sent again after Redis did not answer (timed out, or the connection failed
    /// after they were sent), answers saying the first copy had run (nothing appended
    /// again), and appends given up after their bounds (sequenced on this node; if the
    /// first copy runs after all, this node delivers the message twice).
    pub history_append_retried: AtomicU64,
    pub history_append_repeats: AtomicU64,
    pub history_append_abandoned: AtomicU64,
    /// Messages sequenced on this node under a node-local epoch (Redis unavailable, its
    /// queue full, or the bridge inbox full).
    pub history_local: AtomicU64,
    /// Appends waiting for Redis now.
    pub history_queued: AtomicU64,
    /// History messages heard on room channels (this node's own too).
    pub history_received: AtomicU64,
    /// Stream reads Redis answered, and reads that failed or waited too long.
    pub history_reads: AtomicU64,
    pub history_read_failed: AtomicU64,
    /// Reads waiting now (for a subscription, or for Redis).
    pub history_reads_waiting: AtomicU64,
    /// Resumes answered from this node's cache, after a stream read, and resumes that shared
    /// another resume's read.
    pub history_resumes_local: AtomicU64,
    pub history_resumes_read: AtomicU64,
    pub history_resumes_shared: AtomicU64,
    /// History messages that arrived after skipped offsets (lost on the way here).
    pub history_gaps: AtomicU64,
    /// Times the view generation moved (every cache had to be filled again).
    pub history_view_resets: AtomicU64,
}

/// One presence event waiting for Redis: a change Redis judges (`online` Some: this node
/// holds the user now, or not any more), or an event that follows the user's earlier ones in
/// order (`None`: a status change, told as it is).
struct PresenceOp {
    user: Arc<str>,
    online: Option<bool>,
    /// None: a change told to no one (an invisible user's), still judged and recorded.
    frame: Option<Frame>,
    /// The user as the cluster's readers see it after the change (`encode_remote`; empty
    /// for a room op).
    record: Box<str>,
    /// A room presence op (`online`: joined or left the room; `frame` the event, if the room
    /// has events, for its members except that connection).
    room: Option<(Arc<str>, Option<crate::route::ConnRef>)>,
    /// This node's watchers (or the room's members here) heard it already (Redis did not
    /// answer the first time).
    told_here: bool,
}

impl PresenceOp {
    /// Where the op's frame goes: the user's watchers, or the room's members.
    fn target(&self) -> Target {
        match &self.room {
            Some((room, except)) => Target::Room {
                room: room.clone(),
                except: *except,
            },
            None => presence_topic(&self.user),
        }
    }
}

/// How a received delivery reaches this node's shards (set by the store, which owns the
/// ordered backlog).
pub type DeliverHere = Box<dyn Fn(Target, &Frame)>;

/// A (room, user) pair of room presence.
type RoomUser = (Arc<str>, Arc<str>);

/// Whether Redis confirmed this node's subscription to a channel (Redis Cluster mode).
pub(super) type HeldCheck = Box<dyn Fn(&str) -> bool>;

/// How a message reaches one shard of this node, in order with every delivery (the store's
/// ordered backlog).
pub type ToShard = Box<dyn Fn(usize, crate::shard::ShardMsg)>;

/// One envelope waiting to be published.
struct Out {
    /// Its bytes in `queued_bytes` until it is dropped (published, failed or moved on);
    /// None for a canary (outside the bound).
    _held: Option<Held>,
    channel: Arc<str>,
    payload: Vec<u8>,
    /// A traced delivery's `redis.publish` span, which ends when this is dropped (its
    /// pipeline answered or failed, or the envelope given up); boxed, as it is rare.
    span: Option<Box<tracing::Span>>,
}

impl Out {
    /// Mark the traced ones of `batch` failed (their pipeline did not publish them).
    fn failed(batch: &[Out]) {
        for o in batch {
            if let Some(s) = &o.span {
                s.record("otel.status_code", "ERROR");
            }
        }
    }
}

/// Bytes an envelope holds of the publish queue's budget (`redis_queue_bytes_max`), given
/// back when the envelope is dropped, wherever that happens (a pipeline answered or failed,
/// a staging queue of a Redis Cluster master).
struct Held {
    n: usize,
    total: Rc<Cell<usize>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.set(self.total.get() - self.n);
    }
}

/// The node's Redis clients and what they share.
pub struct Redis {
    node: Arc<Node>,
    urls: Vec<String>,
    ch: Channels,
    queue: RefCell<VecDeque<Out>>,
    /// A canary to publish ahead of the queue (outside its bound: a full queue must not
    /// hide a deaf subscription, and the canary never takes a message's place).
    canary_out: RefCell<Option<Out>>,
    wake_pub: Notify,
    subs: RefCell<Subscriptions>,
    wake_sub: Notify,
    /// The subscriber connection is lost (a disconnection push, or a late canary).
    lost: Notify,
    /// Generation of the subscriber connection: pushes of an older one are ignored.
    sub_gen: Cell<u64>,
    pub_up: Cell<bool>,
    sub_up: Cell<bool>,
    /// The canary is late (the subscription may deliver nothing).
    deaf: Cell<bool>,
    canary_nonce: Cell<u64>,
    canary_sent: Cell<Option<(u64, Instant)>>,
    /// When a canary last came back (or the subscriber connection was made).
    canary_back: Cell<Instant>,
    last_error_log: Cell<Option<Instant>>,
    unlogged_errors: Cell<u64>,
    /// Hands a received delivery to this node's shards (the store's ordered backlog).
    deliver: RefCell<Option<DeliverHere>>,
    /// The publisher's connection while it is up, for the presence tasks' commands (a
    /// multiplexed connection: their commands pipeline beside the publishes; on a Redis
    /// Cluster the cluster connection, which routes each command to its slot's master).
    cmd_conn: RefCell<Option<CmdConn>>,
    /// Made when the publisher connects again: presence is re-published then.
    cmd_conn_new: Notify,
    presence_q: RefCell<VecDeque<PresenceOp>>,
    wake_presence: Notify,
    /// Presence reads in flight ([`Redis::presence_read`]), at most [`PRESENCE_READS_MAX`].
    presence_reads: Cell<usize>,
    /// Whether Redis confirmed a channel (set on a Redis Cluster, where the masters hold the
    /// confirmations; None: `subs`).
    held_check: RefCell<Option<HeldCheck>>,
    /// The users this node holds present, as it has told (or queued to tell) Redis: online
    /// here or in the offline grace. What a resync writes again. Bounded by the users with
    /// a device on this node (each entry got there by a first device).
    held: RefCell<std::collections::HashSet<Arc<str>>>,
    /// The same for room presence: the (room, user) pairs this node holds (a device of the
    /// user in the room here). Bounded by the room memberships of this node's connections.
    held_rooms: RefCell<std::collections::HashSet<RoomUser>>,
    /// Every user of the node must be written again (a new connection: Redis may have lost
    /// its data; or a change Redis never got); cleared only by a resync that completed.
    resync_owed: Cell<bool>,
    /// The cluster reaped this node while it was alive: the next complete resync tells the
    /// users it makes online again.
    announce_owed: Cell<bool>,
    /// A presence change never reached the bridge (the shard told this node's watchers
    /// itself): the next complete resync tells the other nodes, through the scripts, what
    /// that makes online or offline cluster-wide, and not this node's watchers again.
    announce_elsewhere_owed: Cell<bool>,
    /// When the command connection was last made: no node is reaped until this node has
    /// been connected for [`NODE_DEAD_AFTER`] (the others renew their keys meanwhile).
    cmd_since: Cell<Option<Instant>>,
    /// The generation of the subscriber connection a loss was reported for ([`Redis::lost`]).
    lost_gen: Cell<u64>,
    /// The bridge is stopping: the heartbeat no longer renews `alive` (the farewell's TTL
    /// stands) and nothing is reaped.
    stopping: Cell<bool>,
    fb: RefCell<crate::proto::envelope::FrameBuilder>,
    /// Room history across nodes.
    hist: history::State,
    /// Hands a message to one shard (the store's ordered backlog).
    to_shard: RefCell<Option<ToShard>>,
    /// Moves each time the publisher connects (scripts are loaded again on a new connection).
    cmd_gen: Cell<u64>,
    /// Envelopes taken from `queue` and staged on a Redis Cluster master (cluster mode; they
    /// count against `redis_queue_max` too).
    staged: Cell<usize>,
    /// Bytes of the envelopes waiting (queued or staged; [`Held`]).
    queued_bytes: Rc<Cell<usize>>,
}

impl Redis {
    /// The node's Redis clients for `urls` (from `redis_url`); nothing connects until
    /// [`Redis::start`].
    pub fn new(node: Arc<Node>, urls: Vec<String>) -> Rc<Redis> {
        node.redis_stats.configured.store(true, Ordering::Relaxed);
        let ch = Channels::new(&node.cfg.redis_prefix);
        let mut subs = Subscriptions::default();
        subs.set(ch.all(), true);
        subs.set(ch.calls(), true);
        subs.set(ch.node(node.id), true);
        node.redis_stats
            .subs_expected
            .store(subs.expected() as u64, Ordering::Relaxed);
        Rc::new(Redis {
            ch,
            urls,
            queue: RefCell::new(VecDeque::new()),
            canary_out: RefCell::new(None),
            wake_pub: Notify::new(),
            subs: RefCell::new(subs),
            wake_sub: Notify::new(),
            lost: Notify::new(),
            sub_gen: Cell::new(0),
            pub_up: Cell::new(false),
            sub_up: Cell::new(false),
            deaf: Cell::new(false),
            canary_nonce: Cell::new(0),
            canary_sent: Cell::new(None),
            canary_back: Cell::new(Instant::now()),
            last_error_log: Cell::new(None),
            unlogged_errors: Cell::new(0),
            deliver: RefCell::new(None),
            cmd_conn: RefCell::new(None),
            cmd_conn_new: Notify::new(),
            presence_q: RefCell::new(VecDeque::new()),
            wake_presence: Notify::new(),
            presence_reads: Cell::new(0),
            held_check: RefCell::new(None),
            held: RefCell::new(Default::default()),
            held_rooms: RefCell::new(Default::default()),
            resync_owed: Cell::new(false),
            announce_owed: Cell::new(false),
            announce_elsewhere_owed: Cell::new(false),
            cmd_since: Cell::new(None),
            lost_gen: Cell::new(u64::MAX),
            stopping: Cell::new(false),
            fb: RefCell::new(Default::default()),
            hist: Default::default(),
            to_shard: RefCell::new(None),
            cmd_gen: Cell::new(0),
            staged: Cell::new(0),
            queued_bytes: Rc::new(Cell::new(0)),
            node,
        })
    }

    /// The publisher's connection while it is up, for commands that pipeline beside the
    /// publishes (the store's `clientMsgId` claims); None while it is down.
    pub fn command_conn(&self) -> Option<CmdConn> {
        self.cmd_conn.borrow().clone()
    }

    /// This deployment's channel and key names.
    pub fn channels(&self) -> &Channels {
        &self.ch
    }

    /// Set how received deliveries reach this node's shards.
    pub fn set_deliver(&self, f: DeliverHere) {
        *self.deliver.borrow_mut() = Some(f);
    }

    /// Set how messages reach one shard (in order with the deliveries).
    pub fn set_to_shard(&self, f: ToShard) {
        *self.to_shard.borrow_mut() = Some(f);
    }

    /// Start the publisher, subscriber and canary tasks on the current `LocalSet`.
    pub fn start(self: &Rc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        tracing::info!(
            redis = %self.urls.iter().map(|u| cluster::redact(u)).collect::<Vec<_>>().join(","),
            node = format_args!("{:08x}", self.node.id),
            "redis: this node joins the cluster (room, user and broadcast traffic crosses nodes through Redis pub/sub)"
        );
        let me = self;
        let mut tasks = if self.node.cfg.redis_cluster {
            redis_cluster::start(self.clone())
        } else {
            let (tx, rx) = mpsc::channel(INBOUND_MAX);
            let rx = Rc::new(tokio::sync::Mutex::new(rx));
            vec![
                supervise("publisher", me, |r| r.publisher()),
                supervise("subscriber", me, move |r| r.subscriber(tx.clone())),
                supervise("inbound", me, move |r| r.inbound(rx.clone())),
                supervise("canary", me, |r| r.canary()),
            ]
        };
        tasks.extend([
            supervise("presence", me, |r| r.presence_worker()),
            supervise("heartbeat", me, |r| r.heartbeat()),
            supervise("reaper", me, |r| r.reaper()),
            supervise("reconcile", me, |r| r.reconcile()),
            supervise("history appender", me, |r| r.history_appender()),
            supervise("history reader", me, |r| r.history_reader()),
        ]);
        tasks
    }

    /// Deliver `frame` to `target` on this node and the others.
    fn deliver_everywhere(&self, target: Target, frame: &Frame) {
        self.publish(&target, frame);
        if let Some(f) = &*self.deliver.borrow() {
            f(target, frame);
        }
    }

    /// Deliver `frame` to `target` on this node only (its copy for the other nodes went out
    /// already, from inside a presence script).
    fn deliver_local(&self, target: Target, frame: &Frame) {
        if let Some(f) = &*self.deliver.borrow() {
            f(target, frame);
        }
    }

    /// A user's presence owner on this node has an event for the user's watchers on every
    /// node (`frame`). `online` Some: this node found the user online (true) or offline;
    /// Redis judges whether the change is the cluster's, and the watchers hear it only then.
    /// Once per user cluster-wide: a user with devices on two nodes is online once, offline
    /// once, and a device that moves to another node within the offline grace changes
    /// nothing. `online` None: an event told as it is (a status change), in order after the
    /// user's changes still waiting here, so it never overtakes the online it follows.
    pub fn presence(
        &self,
        user: Arc<str>,
        online: Option<bool>,
        frame: Option<Frame>,
        record: Box<str>,
    ) {
        self.hold(&user, online);
        self.presence_enqueue(PresenceOp {
            user,
            online,
            frame,
            record,
            room: None,
            told_here: false,
        });
    }

    /// A room's presence owner on this node saw `user`'s first device in `room` here
    /// (`join`) or its last one leave: judged in Redis in order with the user presence
    /// changes (the same queue), published from the script when it is the cluster's, and
    /// then delivered to this node's members (`frame`, None in rooms without events).
    pub fn room_presence(
        &self,
        room: Arc<str>,
        user: Arc<str>,
        join: bool,
        frame: Option<Frame>,
        except: Option<crate::route::ConnRef>,
    ) {
        self.hold_room(&room, &user, join);
        self.presence_enqueue(PresenceOp {
            user,
            online: Some(join),
            frame,
            record: Box::from(""),
            room: Some((room, except)),
            told_here: false,
        });
    }

    /// Queue a presence op for the worker; past [`PRESENCE_QUEUE_MAX`] it is told as this
    /// node judged it ([`Redis::unchecked`]).
    fn presence_enqueue(&self, op: PresenceOp) {
        let mut q = self.presence_q.borrow_mut();
        if q.len() >= PRESENCE_QUEUE_MAX {
            drop(q);
            self.unchecked(op);
            return;
        }
        q.push_back(op);
        if q.len() == 1 {
            self.wake_presence.notify_one();
        }
    }

    /// Note whether this node holds `user` present now (a change of its devices).
    fn hold(&self, user: &Arc<str>, online: Option<bool>) {
        match online {
            Some(true) => {
                self.held.borrow_mut().insert(user.clone());
            }
            Some(false) => {
                self.held.borrow_mut().remove(user);
            }
            None => {}
        }
    }

    /// Note whether this node holds `user` in `room` now.
    fn hold_room(&self, room: &Arc<str>, user: &Arc<str>, join: bool) {
        let key = (room.clone(), user.clone());
        if join {
            self.held_rooms.borrow_mut().insert(key);
        } else {
            self.held_rooms.borrow_mut().remove(&key);
        }
    }

    /// Tell a presence event as this node judged it (past the queue's bound Redis cannot
    /// judge it): the next resync writes the change to Redis (users and rooms alike, from
    /// [`Redis::held`] and [`Redis::held_rooms`]).
    fn unchecked(&self, op: PresenceOp) {
        if op.online.is_some() {
            self.node
                .redis_stats
                .presence_unchecked
                .fetch_add(1, Ordering::Relaxed);
            self.resync_owed.set(true);
        }
        if let Some(f) = &op.frame {
            self.deliver_everywhere(op.target(), f);
        }
    }

    /// Clustered room query: the room's users on every node (`HLEN` and `HRANDFIELD` of its
    /// hash, at most `cap`, one pipeline within `redis_timeout`), handed to the room's owner
    /// shard, which merges its own. Redis down or late, or [`PRESENCE_READS_MAX`] in flight:
    /// answered at once with nothing found (the owner lists this node's members).
    pub fn room_read(self: &Rc<Self>, read: crate::shard::service::presence::RoomRead) {
        let Some(mut conn) = self.command_conn() else {
            return self.room_answer(read, None);
        };
        if self.presence_reads.get() >= PRESENCE_READS_MAX {
            return self.room_answer(read, None);
        }
        self.presence_reads.set(self.presence_reads.get() + 1);
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let key = me.ch.room_present(&read.room);
            let mut pipe = redis::pipe();
            pipe.cmd("HLEN").arg(&key);
            pipe.cmd("HRANDFIELD")
                .arg(&key)
                .arg(read.cap.max(1))
                .arg("WITHVALUES");
            let r = tokio::time::timeout(
                me.node.cfg.redis_timeout,
                pipe.query_async::<Vec<Value>>(&mut conn),
            )
            .await;
            me.presence_reads.set(me.presence_reads.get() - 1);
            let found = match r {
                Ok(Ok(v)) => parse_room_found(&v),
                Ok(Err(e)) => {
                    me.log_error("room presence read failed", &e);
                    None
                }
                Err(_) => {
                    me.log_error("room presence read failed", &"timed out (redis_timeout)");
                    None
                }
            };
            if found.is_some() {
                me.node
                    .redis_stats
                    .presence_reads
                    .fetch_add(1, Ordering::Relaxed);
            }
            me.room_answer(read, found);
        });
    }

    fn room_answer(
        &self,
        read: crate::shard::service::presence::RoomRead,
        found: Option<crate::shard::service::presence::RoomFound>,
    ) {
        if found.is_none() {
            self.node
                .redis_stats
                .presence_read_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        let shard = read.owner;
        let msg = crate::shard::ShardMsg::service(crate::shard::service::ServiceMsg::Presence(
            read.answer(found),
        ));
        if let Some(f) = &*self.to_shard.borrow() {
            f(shard, msg);
        }
    }

    /// Clustered `presence.state` with users this node does not hold: read them from Redis
    /// (`SCARD` of each user's nodes set and `GET` of its record, pipelined
    /// [`PRESENCE_READ_BATCH`] users at a time, within `redis_timeout`), and hand the answer
    /// to the asking connection's shard. A watch's read first waits, at most `redis_timeout`,
    /// until this node holds the users' watch channels (so no event falls between the read
    /// and the watch). Redis down, a read failed or late, or [`PRESENCE_READS_MAX`] in
    /// flight: answered at once with nothing found (the shard reads its own state, counted).
    pub fn presence_read(self: &Rc<Self>, read: crate::shard::service::presence::Read) {
        let Some(conn) = self.command_conn() else {
            return self.presence_answer(read, None);
        };
        if self.presence_reads.get() >= PRESENCE_READS_MAX {
            return self.presence_answer(read, None);
        }
        self.presence_reads.set(self.presence_reads.get() + 1);
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let found = me.presence_lookup(conn, &read).await;
            me.presence_reads.set(me.presence_reads.get() - 1);
            me.presence_answer(read, found);
        });
    }

    async fn presence_lookup(
        &self,
        mut conn: CmdConn,
        read: &crate::shard::service::presence::Read,
    ) -> Option<Vec<crate::shard::service::presence::state::Remote>> {
        use crate::shard::service::presence::state::Remote;
        let timeout = self.node.cfg.redis_timeout;
        if read.watch {
            let channels: Vec<Arc<str>> = read
                .remote_users()
                .map(|u| {
                    self.ch
                        .topic(&crate::shard::service::presence::watch_topic(u))
                })
                .collect();
            let until = Instant::now() + timeout;
            while !channels.iter().all(|c| self.channel_held(c)) {
                if Instant::now() >= until {
                    break; // read anyway: a late subscription costs at most that moment's events
                }
                tokio::time::sleep(PRESENCE_READ_POLL).await;
            }
        }
        let users: Vec<&Arc<str>> = read.remote_users().collect();
        let run = async {
            let mut found = Vec::with_capacity(users.len());
            for chunk in users.chunks(PRESENCE_READ_BATCH) {
                let mut pipe = redis::pipe();
                for u in chunk {
                    pipe.cmd("SCARD").arg(self.ch.user_nodes(u));
                    pipe.cmd("GET").arg(self.ch.user_record(u));
                }
                let v: Vec<Value> = pipe.query_async(&mut conn).await?;
                if v.len() != chunk.len() * 2 {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "a presence read answered the wrong number of replies",
                    )));
                }
                for pair in v.chunks(2) {
                    let nodes = match &pair[0] {
                        Value::Int(n) => u64::try_from(*n).unwrap_or(0),
                        _ => 0,
                    };
                    let rec = match &pair[1] {
                        Value::BulkString(b) => std::str::from_utf8(b).ok(),
                        Value::SimpleString(s) => Some(s.as_str()),
                        _ => None,
                    };
                    found.push(Remote::read(nodes, rec));
                }
            }
            Ok::<_, redis::RedisError>(found)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(found)) => {
                self.node
                    .redis_stats
                    .presence_reads
                    .fetch_add(1, Ordering::Relaxed);
                Some(found)
            }
            Ok(Err(e)) => {
                self.log_error("presence read failed", &e);
                None
            }
            Err(_) => {
                self.log_error("presence read failed", &"timed out (redis_timeout)");
                None
            }
        }
    }

    fn presence_answer(
        &self,
        read: crate::shard::service::presence::Read,
        found: Option<Vec<crate::shard::service::presence::state::Remote>>,
    ) {
        if found.is_none() {
            self.node
                .redis_stats
                .presence_read_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        let shard = read.to.shard as usize;
        let msg = crate::shard::ShardMsg::service(crate::shard::service::ServiceMsg::Presence(
            read.answer(found),
        ));
        if let Some(f) = &*self.to_shard.borrow() {
            f(shard, msg);
        }
    }

    /// Whether Redis confirmed this node's subscription to `channel`.
    fn channel_held(&self, channel: &str) -> bool {
        match &*self.held_check.borrow() {
            Some(f) => f(channel),
            None => self.subs.borrow().holds(channel),
        }
    }

    /// On a Redis Cluster: how [`Redis::channel_held`] asks the masters.
    pub(super) fn set_held_check(&self, f: HeldCheck) {
        *self.held_check.borrow_mut() = Some(f);
    }

    /// Judge queued presence events in pipelines, one script call per change (publishing it
    /// when it is the cluster's) with the node's own user and room sets kept beside, one
    /// `PUBLISH` per event told as it is, in queue order; a batch Redis did not answer is
    /// told here and tried again.
    async fn presence_worker(self: Rc<Self>) {
        let stats = &self.node.redis_stats;
        let me = format!("{:08x}", self.node.id);
        let node_users = self.ch.node_users(self.node.id);
        let node_rooms = self.ch.node_rooms(self.node.id);
        let record_ttl = PRESENCE_RECORD_TTL.as_millis() as u64;
        let mut batch: Vec<PresenceOp> = Vec::with_capacity(PRESENCE_BATCH_MAX);
        loop {
            if self.presence_q.borrow().is_empty() {
                self.wake_presence.notified().await;
                continue;
            }
            {
                let mut q = self.presence_q.borrow_mut();
                let n = q.len().min(PRESENCE_BATCH_MAX);
                batch.extend(q.drain(..n));
            }
            let conn = self.cmd_conn.borrow().clone();
            let verdicts: Option<Vec<Value>> = match conn {
                Some(mut conn) => 'judged: {
                    // This node's users (and rooms) set learns of an online (a join) before
                    // anyone is told it, in a round trip of its own (on a Redis Cluster the
                    // set is on another master, and the two run concurrently): a node that
                    // dies in between leaves nothing its reaper cannot find.
                    let mut first = redis::pipe();
                    for op in batch.iter().filter(|op| op.online == Some(true)) {
                        match &op.room {
                            Some((room, _)) => first
                                .cmd("SADD")
                                .arg(&node_rooms)
                                .arg(state::encode_room_member(room, &op.user))
                                .ignore(),
                            None => first.cmd("SADD").arg(&node_users).arg(&*op.user).ignore(),
                        };
                    }
                    if !first.is_empty() {
                        let r = tokio::time::timeout(
                            self.node.cfg.redis_timeout,
                            first.exec_async(&mut conn),
                        )
                        .await;
                        if !matches!(r, Ok(Ok(()))) {
                            self.log_error("presence update failed", &"the node's users set");
                            break 'judged None;
                        }
                    }
                    let mut pipe = redis::pipe();
                    for op in &batch {
                        let target = op.target();
                        let (channel, envelope) = self.script_publish(&target, op.frame.as_ref());
                        if let (Some((room, _)), Some(join)) = (&op.room, op.online) {
                            pipe.cmd("EVAL")
                                .arg(ROOM_LUA)
                                .arg(1)
                                .arg(self.ch.room_present(room))
                                .arg(&me)
                                .arg(if join { "1" } else { "0" })
                                .arg(&*op.user)
                                .arg(&*channel)
                                .arg(envelope)
                                .arg(self.publish_command());
                            if !join {
                                // After the verdict: the reaper still finds the pair.
                                pipe.cmd("SREM")
                                    .arg(&node_rooms)
                                    .arg(state::encode_room_member(room, &op.user))
                                    .ignore();
                            }
                            continue;
                        }
                        match op.online {
                            Some(online) => {
                                pipe.cmd("EVAL")
                                    .arg(PRESENCE_LUA)
                                    .arg(2)
                                    .arg(self.ch.user_nodes(&op.user))
                                    .arg(self.ch.user_record(&op.user))
                                    .arg(&me)
                                    .arg(if online { "1" } else { "0" })
                                    .arg(&*channel)
                                    .arg(envelope)
                                    .arg(self.publish_command())
                                    .arg(&*op.record)
                                    .arg(record_ttl);
                                if !online {
                                    // After the verdict: the reaper still finds the user.
                                    pipe.cmd("SREM").arg(&node_users).arg(&*op.user).ignore();
                                }
                            }
                            None => {
                                // A status change: the record, then the event, in one slot
                                // and in order (the user is connected: no TTL).
                                if channel.is_empty() {
                                    pipe.cmd("SET")
                                        .arg(self.ch.user_record(&op.user))
                                        .arg(&*op.record);
                                } else {
                                    pipe.cmd("SET")
                                        .arg(self.ch.user_record(&op.user))
                                        .arg(&*op.record)
                                        .ignore();
                                    pipe.cmd(self.publish_command())
                                        .arg(&*channel)
                                        .arg(envelope);
                                }
                            }
                        }
                    }
                    match tokio::time::timeout(
                        self.node.cfg.redis_timeout,
                        pipe.query_async::<Vec<Value>>(&mut conn),
                    )
                    .await
                    {
                        Ok(Ok(v)) if v.len() == batch.len() => Some(v),
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => {
                            self.log_error("presence update failed", &e);
                            None
                        }
                        Err(_) => {
                            self.log_error("presence update failed", &"timed out (redis_timeout)");
                            None
                        }
                    }
                }
                None => None,
            };
            let Some(v) = &verdicts else {
                // Redis did not answer (it may still have run some scripts): this node's
                // watchers (or room members) hear the events now (local delivery goes on),
                // and the batch goes back to the front of the queue, in order, to be judged
                // and published once Redis answers. A script that ran already judges nothing
                // the second time (its node is in the set already, or out of it), so nothing
                // is told twice.
                {
                    let mut q = self.presence_q.borrow_mut();
                    for mut op in batch.drain(..).rev() {
                        if !op.told_here {
                            op.told_here = true;
                            if op.online.is_some() {
                                stats.presence_unchecked.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Some(f) = &op.frame {
                                self.deliver_local(op.target(), f);
                            }
                        }
                        q.push_front(op);
                    }
                }
                tokio::time::sleep(PRESENCE_RETRY).await;
                continue;
            };
            for (i, op) in batch.drain(..).enumerate() {
                let tell = match op.online {
                    Some(_) => {
                        let tell = matches!(v.get(i), Some(Value::Int(1)));
                        let c = if tell {
                            &stats.presence_told
                        } else {
                            &stats.presence_kept
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                        tell
                    }
                    None => true,
                };
                if let (true, false, Some(f)) = (tell, op.told_here, &op.frame) {
                    self.deliver_local(op.target(), f);
                }
            }
        }
    }

    /// Renew this node's `alive` key and share its numbers; after every reconnect of the
    /// publisher, write this node's presence again ([`Redis::resync`]) until that succeeds;
    /// and when the cluster reaped this node while it was alive (a pause longer than
    /// [`NODE_DEAD_AFTER`]), announce its users again.
    async fn heartbeat(self: Rc<Self>) {
        let me = format!("{:08x}", self.node.id);
        let alive = self.ch.node_alive(self.node.id);
        let reaper = self.ch.node_reaper(self.node.id);
        let reaped = self.ch.node_reaped(self.node.id);
        let nodes = self.ch.nodes();
        let stats_key = self.ch.stats();
        let mut tick = tokio::time::interval(NODE_HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.cmd_conn_new.notified() => {}
            }
            if self.stopping.get() {
                return; // the farewell's TTL stands
            }
            let Some(mut conn) = self.cmd_conn.borrow().clone() else {
                continue;
            };
            let mut pipe = redis::pipe();
            pipe.cmd("EVAL")
                .arg(HEARTBEAT_LUA)
                .arg(3)
                .arg(&alive)
                .arg(&reaper)
                .arg(&reaped)
                .arg(NODE_DEAD_AFTER.as_millis() as u64);
            pipe.cmd("SADD").arg(&nodes).arg(&me).ignore();
            let now_ms = crate::shard::unix_ms();
            pipe.cmd("HSET")
                .arg(&stats_key)
                .arg(&me)
                .arg(format!(
                    "{} {} {now_ms}",
                    self.node.dir.connections(),
                    self.node.max_connections
                ))
                .ignore();
            pipe.cmd("HGETALL").arg(&stats_key);
            let timeout = self.node.cfg.redis_timeout;
            let state = match tokio::time::timeout(
                timeout,
                pipe.query_async::<(i64, Vec<String>)>(&mut conn),
            )
            .await
            {
                Ok(Ok((state, all))) => {
                    self.sum_cluster(&all, now_ms);
                    state
                }
                Ok(Err(e)) => {
                    self.log_error("heartbeat failed", &e);
                    continue;
                }
                Err(_) => continue,
            };
            if state == 3 {
                self.node
                    .redis_stats
                    .forgotten
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "redis: the cluster reaped this node while it was alive (a pause past the heartbeat TTL): announcing its users again"
                );
                // Every user again, telling those the reaper made offline (owed until a
                // resync completes).
                self.resync_owed.set(true);
                self.announce_owed.set(true);
            }
            if self
                .node
                .redis_stats
                .presence_lost
                .swap(false, Ordering::Relaxed)
            {
                self.held_from_directory();
                self.resync_owed.set(true);
                self.announce_elsewhere_owed.set(true);
            }
            if state != 2 && self.resync_owed.get() {
                self.resync(&mut conn, &me).await;
            }
        }
    }

    /// Sum the live nodes' numbers from `HGETALL <p>stats` (field, value, field, value...):
    /// entries older than [`NODE_DEAD_AFTER`] are nodes that stopped (the reaper removes
    /// them).
    fn sum_cluster(&self, all: &[String], now_ms: u64) {
        let (mut nodes, mut conns, mut max) = (0u64, 0u64, 0u64);
        for pair in all.chunks(2) {
            let Some(v) = pair.get(1) else { continue };
            let mut it = v.split(' ').map(|x| x.parse::<u64>().ok());
            let (Some(Some(c)), Some(Some(m)), Some(Some(at))) = (it.next(), it.next(), it.next())
            else {
                continue;
            };
            if now_ms.saturating_sub(at) > NODE_DEAD_AFTER.as_millis() as u64 {
                continue;
            }
            nodes += 1;
            conns += c;
            max += m;
        }
        let s = &self.node.redis_stats;
        s.cluster_nodes.store(nodes, Ordering::Relaxed);
        s.cluster_connections.store(conns, Ordering::Relaxed);
        s.cluster_max_connections.store(max, Ordering::Relaxed);
        s.cluster_as_of_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Take the users this node holds present from the directory itself (a device here, or
    /// a record in its offline grace: `state::held_here`), after a shard's change could not
    /// reach the bridge and [`Redis::held`] may have missed it. Changes still queued were
    /// applied to `held` when queued and are in the directory already.
    fn held_from_directory(&self) {
        let dir = &self.node.dir;
        let mut held = std::collections::HashSet::new();
        dir.users.for_each_name(|u| {
            if dir.users.count(u) > 0 {
                held.insert(u.clone());
            }
        });
        dir.presence.for_each(|u, rec| {
            if state::held_here(Some(rec), dir.users.count(u)) {
                held.insert(u.clone());
            }
        });
        *self.held.borrow_mut() = held;
    }

    /// The users (and room pairs) with a change still waiting in the presence queue (that
    /// change judges them itself: a resync must not write them first).
    fn pending_users(&self) -> std::collections::HashSet<Arc<str>> {
        self.presence_q
            .borrow()
            .iter()
            .filter(|op| op.room.is_none())
            .map(|op| op.user.clone())
            .collect()
    }

    fn pending_rooms(&self) -> std::collections::HashSet<RoomUser> {
        self.presence_q
            .borrow()
            .iter()
            .filter_map(|op| op.room.as_ref().map(|(r, _)| (r.clone(), op.user.clone())))
            .collect()
    }

    /// Write this node's presence to Redis again (owed after a new connection, a change Redis
    /// never got, or a reap of this node). First the members Redis has for this node that it
    /// does not hold any more (`SSCAN` of its users set): each goes through the offline
    /// script, telling the user offline if no node holds it now. Then every user it holds
    /// ([`Redis::held`]: online here or in the offline grace): silently, or after a reap
    /// telling those that become online cluster-wide by it (invisible users excepted). Then
    /// the same for room presence ([`Redis::resync_rooms`]). Users with a change still
    /// queued are left to that change. Stops at the first failure, keeping the resync owed:
    /// the next heartbeat goes on.
    async fn resync(&self, conn: &mut CmdConn, me: &str) {
        let node_users = self.ch.node_users(self.node.id);
        let timeout = self.node.cfg.redis_timeout;
        let stats = &self.node.redis_stats;
        // After a reap every node's watchers, this node's too, heard this node's users go;
        // after a lost change this node's watchers heard it already.
        let tell = self.announce_owed.get() || self.announce_elsewhere_owed.get();
        let here = !self.announce_elsewhere_owed.get() || self.announce_owed.get();
        let record_ttl = PRESENCE_RECORD_TTL.as_millis() as u64;
        let mut cursor: u64 = 0;
        loop {
            let (next, members): (u64, Vec<String>) = match tokio::time::timeout(
                timeout,
                redis::cmd("SSCAN")
                    .arg(&node_users)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(PRESENCE_SCAN_COUNT)
                    .query_async(conn),
            )
            .await
            {
                Ok(Ok(r)) => r,
                _ => return,
            };
            let pending = self.pending_users();
            let ghosts: Vec<String> = {
                let held = self.held.borrow();
                members
                    .into_iter()
                    .filter(|m| !held.contains(m.as_str()) && !pending.contains(m.as_str()))
                    .collect()
            };
            if !ghosts.is_empty() {
                let mut pipe = redis::pipe();
                let mut frames = Vec::with_capacity(ghosts.len());
                let now = crate::shard::unix_ms();
                let record = state::encode_offline(now);
                for g in &ghosts {
                    let f = self.offline_frame(g, now);
                    let target = presence_topic(g);
                    pipe.cmd("EVAL")
                        .arg(PRESENCE_LUA)
                        .arg(2)
                        .arg(self.ch.user_nodes(g))
                        .arg(self.ch.user_record(g))
                        .arg(me)
                        .arg("0")
                        .arg(&*self.ch.of(&target, self.node.id).unwrap_or_default())
                        .arg(cluster::encode(self.node.id, &target, &f))
                        .arg(self.publish_command())
                        .arg(&record)
                        .arg(record_ttl);
                    pipe.cmd("SREM").arg(&node_users).arg(g).ignore();
                    frames.push(f);
                }
                let verdicts: Vec<i64> =
                    match tokio::time::timeout(timeout, pipe.query_async(conn)).await {
                        Ok(Ok(v)) => v,
                        _ => return,
                    };
                for ((g, f), v) in ghosts.iter().zip(frames).zip(verdicts) {
                    if v == 1 {
                        stats.presence_told.fetch_add(1, Ordering::Relaxed);
                        if here {
                            self.deliver_local(presence_topic(g), &f);
                        }
                    }
                }
                stats
                    .presence_resynced
                    .fetch_add(ghosts.len() as u64, Ordering::Relaxed);
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let users: Vec<Arc<str>> = self.held.borrow().iter().cloned().collect();
        for chunk in users.chunks(PRESENCE_SCAN_COUNT) {
            // Read now, just before the pipeline goes (nothing is queued in between).
            let pending = self.pending_users();
            let chunk: Vec<&Arc<str>> = chunk.iter().filter(|u| !pending.contains(*u)).collect();
            let mut pipe = redis::pipe();
            let mut frames: Vec<Option<Frame>> = Vec::with_capacity(chunk.len());
            for u in &chunk {
                let frame = if tell { self.online_frame(u) } else { None };
                let target = presence_topic(u);
                let (channel, envelope) = self.script_publish(&target, frame.as_ref());
                pipe.cmd("EVAL")
                    .arg(PRESENCE_LUA)
                    .arg(2)
                    .arg(self.ch.user_nodes(u))
                    .arg(self.ch.user_record(u))
                    .arg(me)
                    .arg("1")
                    .arg(&*channel)
                    .arg(envelope)
                    .arg(self.publish_command())
                    .arg(self.record_here(u))
                    .arg(record_ttl);
                pipe.cmd("SADD").arg(&node_users).arg(&***u).ignore();
                frames.push(frame);
            }
            let verdicts: Vec<i64> =
                match tokio::time::timeout(timeout, pipe.query_async(conn)).await {
                    Ok(Ok(v)) => v,
                    _ => return,
                };
            for ((u, frame), v) in chunk.iter().zip(frames).zip(verdicts) {
                if let (Some(f), 1) = (frame, v) {
                    stats.presence_told.fetch_add(1, Ordering::Relaxed);
                    if here {
                        self.deliver_local(presence_topic(u), &f);
                    }
                }
            }
            stats
                .presence_resynced
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if !self.resync_rooms(conn, me).await {
            return;
        }
        self.resync_owed.set(false);
        self.announce_owed.set(false);
        self.announce_elsewhere_owed.set(false);
        if !users.is_empty() {
            tracing::info!(
                users = users.len(),
                "redis: presence of this node's users held again"
            );
        }
    }

    /// Room presence's part of [`Redis::resync`]: pairs Redis has for this node that it does
    /// not hold any more (`SSCAN` of its rooms set) leave their room (told when they were
    /// the cluster's last), and every pair it holds ([`Redis::held_rooms`]) is written again
    /// silently (a Redis that restarted empty gets the node's room presence back). False at
    /// the first failure.
    async fn resync_rooms(&self, conn: &mut CmdConn, me: &str) -> bool {
        let node_rooms = self.ch.node_rooms(self.node.id);
        let timeout = self.node.cfg.redis_timeout;
        let stats = &self.node.redis_stats;
        let mut cursor: u64 = 0;
        loop {
            let (next, members): (u64, Vec<String>) = match tokio::time::timeout(
                timeout,
                redis::cmd("SSCAN")
                    .arg(&node_rooms)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(PRESENCE_SCAN_COUNT)
                    .query_async(conn),
            )
            .await
            {
                Ok(Ok(r)) => r,
                _ => return false,
            };
            let pending = self.pending_rooms();
            let ghosts: Vec<(&str, &str)> = {
                let held = self.held_rooms.borrow();
                members
                    .iter()
                    .filter_map(|m| state::decode_room_member(m))
                    .filter(|(r, u)| {
                        let k: RoomUser = (Arc::from(*r), Arc::from(*u));
                        !held.contains(&k) && !pending.contains(&k)
                    })
                    .collect()
            };
            if !ghosts.is_empty() {
                match self.leave_rooms(conn, me, &ghosts, Some(&node_rooms)).await {
                    Ok(told) => stats.presence_told.fetch_add(told, Ordering::Relaxed),
                    Err(_) => return false,
                };
                stats
                    .presence_resynced
                    .fetch_add(ghosts.len() as u64, Ordering::Relaxed);
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let pairs: Vec<RoomUser> = self.held_rooms.borrow().iter().cloned().collect();
        for chunk in pairs.chunks(PRESENCE_SCAN_COUNT) {
            let pending = self.pending_rooms();
            let chunk: Vec<&RoomUser> = chunk.iter().filter(|k| !pending.contains(*k)).collect();
            if chunk.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for (room, user) in &chunk {
                pipe.cmd("SADD")
                    .arg(&node_rooms)
                    .arg(state::encode_room_member(room, user))
                    .ignore();
            }
            for (room, user) in &chunk {
                pipe.cmd("EVAL")
                    .arg(ROOM_LUA)
                    .arg(1)
                    .arg(self.ch.room_present(room))
                    .arg(me)
                    .arg("1")
                    .arg(&**user)
                    .arg("")
                    .arg("")
                    .arg(self.publish_command())
                    .ignore();
            }
            let r = tokio::time::timeout(timeout, pipe.exec_async(conn)).await;
            if !matches!(r, Ok(Ok(()))) {
                return false;
            }
            stats
                .presence_resynced
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        true
    }

    /// `user` as the cluster's readers would see it from this node's state now
    /// (`encode_remote`).
    fn record_here(&self, user: &str) -> String {
        use crate::shard::service::presence::state;
        let rec = self.node.dir.presence.get(user);
        let v = state::view(rec.as_deref(), self.node.dir.users.count(user), false);
        state::encode_remote(&v)
    }

    /// `presence.online` for `user` as its watchers would see it now (None: the user is
    /// invisible, or has no device here any more).
    fn online_frame(&self, user: &Arc<str>) -> Option<Frame> {
        use crate::shard::service::presence::state;
        let devices = self.node.dir.users.count(user);
        let rec = self.node.dir.presence.get(user);
        let v = state::view(rec.as_deref(), devices, false);
        if devices == 0 || v.status == state::Status::Offline.as_str() {
            return None;
        }
        let now = crate::shard::unix_ms();
        Some(self.fb.borrow_mut().text(self.node.now_us(), |o| {
            o.str("type", "presence.online")
                .obj("data", |d| {
                    d.str("user_id", user)
                        .str("status", v.status)
                        .opt_str("text", v.text)
                        .opt_str("last_seen", None);
                })
                .u64("timestamp", now);
        }))
    }

    /// Find nodes whose `alive` key expired and reap their presence: every user only they
    /// held goes offline for its watchers on every node (once: the reaper holds a lock, taken
    /// in the same script that sees the key gone). Not before this node has been connected
    /// for [`NODE_DEAD_AFTER`] (after Redis was away, the others need a heartbeat to renew
    /// their keys), nor while it is stopping.
    async fn reaper(self: Rc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.stopping.get() {
                return;
            }
            let settled = self
                .cmd_since
                .get()
                .is_some_and(|t| t.elapsed() >= NODE_DEAD_AFTER);
            if !settled {
                continue;
            }
            let Some(mut conn) = self.cmd_conn.borrow().clone() else {
                continue;
            };
            if let Err(e) = self.reap_once(&mut conn).await {
                self.log_error("reaping dead nodes failed", &e);
            }
        }
    }

    async fn reap_once(&self, conn: &mut CmdConn) -> redis::RedisResult<()> {
        let timeout = self.node.cfg.redis_timeout;
        let nodes_key = self.ch.nodes();
        let me = format!("{:08x}", self.node.id);
        let ids: Vec<String> = match tokio::time::timeout(
            timeout,
            redis::cmd("SMEMBERS").arg(&nodes_key).query_async(conn),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(timed_out()),
        };
        for id in ids {
            let Ok(node) = u32::from_str_radix(&id, 16) else {
                continue;
            };
            if node == self.node.id {
                continue;
            }
            let begun: i64 = match tokio::time::timeout(
                timeout,
                redis::cmd("EVAL")
                    .arg(REAP_BEGIN_LUA)
                    .arg(3)
                    .arg(self.ch.node_alive(node))
                    .arg(self.ch.node_reaper(node))
                    .arg(self.ch.node_reaped(node))
                    .arg(&me)
                    .arg(REAP_LOCK.as_millis() as u64)
                    .arg(REAPED_MARK.as_millis() as u64)
                    .query_async(conn),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Err(timed_out()),
            };
            if begun == 1 {
                self.reap_node(conn, node, &id).await?;
            }
        }
        Ok(())
    }

    /// Take dead node `node` (hex `id`) out of every user's set; users it alone held go
    /// offline everywhere (published by the script that judged it). Then forget the node.
    async fn reap_node(&self, conn: &mut CmdConn, node: u32, id: &str) -> redis::RedisResult<()> {
        let timeout = self.node.cfg.redis_timeout;
        let users_key = self.ch.node_users(node);
        let mut cursor: u64 = 0;
        let mut reaped = 0u64;
        loop {
            let (next, users): (u64, Vec<String>) = match tokio::time::timeout(
                timeout,
                redis::cmd("SSCAN")
                    .arg(&users_key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(PRESENCE_SCAN_COUNT)
                    .query_async(conn),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Err(timed_out()),
            };
            if !users.is_empty() {
                let mut pipe = redis::pipe();
                let mut frames = Vec::with_capacity(users.len());
                let now = crate::shard::unix_ms();
                let record = state::encode_offline(now);
                for u in &users {
                    let f = self.offline_frame(u, now);
                    let target = presence_topic(u);
                    pipe.cmd("EVAL")
                        .arg(PRESENCE_LUA)
                        .arg(2)
                        .arg(self.ch.user_nodes(u))
                        .arg(self.ch.user_record(u))
                        .arg(id)
                        .arg("0")
                        .arg(&*self.ch.of(&target, self.node.id).unwrap_or_default())
                        .arg(cluster::encode(self.node.id, &target, &f))
                        .arg(self.publish_command())
                        .arg(&record)
                        .arg(PRESENCE_RECORD_TTL.as_millis() as u64);
                    frames.push(f);
                }
                let verdicts: Vec<i64> =
                    match tokio::time::timeout(timeout, pipe.query_async(conn)).await {
                        Ok(r) => r?,
                        Err(_) => return Err(timed_out()),
                    };
                for ((u, f), v) in users.iter().zip(frames).zip(verdicts) {
                    reaped += 1;
                    if v == 1 {
                        self.deliver_local(presence_topic(u), &f);
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.reap_rooms(conn, node, id).await?;
        let me = format!("{:08x}", self.node.id);
        let ended: i64 = match tokio::time::timeout(
            timeout,
            redis::cmd("EVAL")
                .arg(REAP_END_LUA)
                .arg(3)
                .arg(self.ch.node_reaper(node))
                .arg(&users_key)
                .arg(self.ch.node_rooms(node))
                .arg(&me)
                .query_async(conn),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(timed_out()),
        };
        if ended != 1 {
            // The lock expired under this reap (REAP_LOCK): the node may be back, or another
            // reaper took over; it is not forgotten, and its calls are not ended, from here.
            tracing::warn!(
                node = id,
                "redis: a reap outlived its lock; left to the lock's holder"
            );
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SREM").arg(self.ch.nodes()).arg(id).ignore();
        pipe.cmd("HDEL").arg(self.ch.stats()).arg(id).ignore();
        match tokio::time::timeout(timeout, pipe.exec_async(conn)).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out()),
        }
        let stats = &self.node.redis_stats;
        stats.presence_reaped.fetch_add(reaped, Ordering::Relaxed);
        stats.nodes_reaped.fetch_add(1, Ordering::Relaxed);
        // Calls with a party on the dead node end, on every node that owns one.
        self.service(
            &super::ServiceTo::Calls,
            cluster::service::NODE_GONE,
            &node.to_le_bytes(),
        );
        self.node_gone_here(node);
        tracing::warn!(
            node = id,
            users = reaped,
            "redis: a node stopped renewing its heartbeat; its users' presence is gone"
        );
        Ok(())
    }

    /// Take dead node `node` (hex `id`) out of the rooms it held users in; users it alone held
    /// in a room leave it everywhere (`presence.leave` in rooms with events, published by the
    /// script that judged it).
    async fn reap_rooms(&self, conn: &mut CmdConn, node: u32, id: &str) -> redis::RedisResult<()> {
        let timeout = self.node.cfg.redis_timeout;
        let key = self.ch.node_rooms(node);
        let mut cursor: u64 = 0;
        loop {
            let (next, members): (u64, Vec<String>) = match tokio::time::timeout(
                timeout,
                redis::cmd("SSCAN")
                    .arg(&key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(PRESENCE_SCAN_COUNT)
                    .query_async(conn),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Err(timed_out()),
            };
            let pairs: Vec<(&str, &str)> = members
                .iter()
                .filter_map(|m| state::decode_room_member(m))
                .collect();
            if !pairs.is_empty() {
                self.leave_rooms(conn, id, &pairs, None).await?;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// The channel and envelope a presence script publishes `frame` with (none: nothing).
    fn script_publish(&self, target: &Target, frame: Option<&Frame>) -> (Arc<str>, Vec<u8>) {
        match frame {
            Some(f) => (
                self.ch.of(target, self.node.id).unwrap_or_default(),
                cluster::encode(self.node.id, target, f),
            ),
            None => (Arc::from(""), Vec::new()),
        }
    }

    /// Node `id` (hex) leaves each (room, user) of `pairs` in Redis (the room script: a
    /// pair that was the cluster's last publishes its `presence.leave` from inside, and this
    /// node's members hear it once the verdict is back); `unset`: the node's rooms set to take
    /// the pairs out of as well. One pipeline within `redis_timeout`; the number of leaves
    /// told.
    async fn leave_rooms(
        &self,
        conn: &mut CmdConn,
        id: &str,
        pairs: &[(&str, &str)],
        unset: Option<&str>,
    ) -> redis::RedisResult<u64> {
        let mut pipe = redis::pipe();
        let mut frames = Vec::with_capacity(pairs.len());
        for (room, user) in pairs {
            let (target, frame) = self.room_leave(room, user);
            let (channel, envelope) = self.script_publish(&target, frame.as_ref());
            pipe.cmd("EVAL")
                .arg(ROOM_LUA)
                .arg(1)
                .arg(self.ch.room_present(room))
                .arg(id)
                .arg("0")
                .arg(*user)
                .arg(&*channel)
                .arg(envelope)
                .arg(self.publish_command());
            if let Some(key) = unset {
                pipe.cmd("SREM")
                    .arg(key)
                    .arg(state::encode_room_member(room, user))
                    .ignore();
            }
            frames.push((target, frame));
        }
        let timeout = self.node.cfg.redis_timeout;
        let verdicts: Vec<Value> = match tokio::time::timeout(timeout, pipe.query_async(conn)).await
        {
            Ok(r) => r?,
            Err(_) => return Err(timed_out()),
        };
        let mut told = 0;
        for ((target, frame), v) in frames.into_iter().zip(verdicts) {
            if let (Some(f), Value::Int(1)) = (frame, v) {
                told += 1;
                self.deliver_local(target, &f);
            }
        }
        Ok(told)
    }

    /// Where a leave of `user` from `room` this node did not see goes, and its
    /// `presence.leave` (None in a room without join/leave events).
    fn room_leave(&self, room: &str, user: &str) -> (Target, Option<Frame>) {
        let cfg = &self.node.cfg.rooms;
        let events =
            crate::room_options::at(cfg, crate::room_options::index_for(cfg, room)).join_leave;
        let target = Target::room(Arc::from(room));
        (target, events.then(|| self.room_leave_frame(room, user)))
    }

    /// `presence.leave` of `user` from `room`, as its owner would have written it.
    fn room_leave_frame(&self, room: &str, user: &str) -> Frame {
        let now = crate::shard::unix_ms();
        self.fb.borrow_mut().text(self.node.now_us(), |o| {
            o.str("type", "presence.leave")
                .str("room", room)
                .obj("data", |d| {
                    d.str("user_id", user);
                })
                .u64("timestamp", now);
        })
    }

    /// `presence.offline` for `user`, as its owner would have written it.
    fn offline_frame(&self, user: &str, now: u64) -> Frame {
        let last_seen = crate::proto::json::rfc3339_ms(now);
        self.fb.borrow_mut().text(self.node.now_us(), |o| {
            o.str("type", "presence.offline")
                .obj("data", |d| {
                    d.str("user_id", user)
                        .str("status", "offline")
                        .opt_str("text", None)
                        .str("last_seen", &last_seen);
                })
                .u64("timestamp", now);
        })
    }

    /// The bridge is stopping (a drain, or SIGTERM): keep this node's presence for the
    /// offline grace, so its users who reconnect elsewhere within it are never offline; then
    /// another node reaps what is left.
    pub async fn farewell(&self) {
        // From now on the heartbeat leaves `alive` alone (a renewal after this would undo
        // the grace TTL) and this node reaps no one.
        self.stopping.set(true);
        let Some(mut conn) = self.cmd_conn.borrow().clone() else {
            return;
        };
        let grace = self
            .node
            .cfg
            .presence_offline_grace
            .max(Duration::from_millis(1));
        let _ = tokio::time::timeout(
            self.node.cfg.redis_timeout,
            redis::cmd("SET")
                .arg(self.ch.node_alive(self.node.id))
                .arg(1)
                .arg("PX")
                .arg(grace.as_millis() as u64)
                .exec_async(&mut conn),
        )
        .await;
    }

    /// Queue a delivery to `target` for the other nodes. Dropped (counted) when
    /// `redis_queue_max` envelopes wait already.
    pub fn publish(&self, target: &Target, frame: &Frame) {
        let Some(channel) = self.ch.of(target, self.node.id) else {
            return;
        };
        // The envelope's header is a few dozen bytes beside the frame.
        let hint = frame.wire().len() + 64;
        self.enqueue_with(channel, hint, None, || {
            cluster::encode(self.node.id, target, frame)
        });
    }

    /// [`Redis::publish`] of a delivery made inside the traced span `parent`: a
    /// `redis.publish` span (until Redis answers), whose context the envelope carries to the
    /// receiving nodes' `redis.receive` spans.
    pub fn publish_traced(&self, target: &Target, frame: &Frame, parent: &tracing::Span) {
        let Some(channel) = self.ch.of(target, self.node.id) else {
            return;
        };
        let span = crate::child_span!(
            parent,
            "redis.publish",
            otel.kind = "producer",
            messaging.system = "redis",
            messaging.destination.name = &*channel,
            messaging.message.body.size = frame.wire().len() as u64,
            otel.status_code = tracing::field::Empty,
        );
        let ctx = crate::trace::context_of(&span);
        let hint = frame.wire().len() + 64;
        self.enqueue_with(channel, hint, Some(Box::new(span)), || {
            cluster::encode_traced(self.node.id, target, frame, ctx)
        });
    }

    /// Queue the envelope `payload` makes on `channel`, or drop it (counted) when
    /// `redis_queue_max` envelopes wait already (then it is never encoded).
    fn enqueue(&self, channel: Arc<str>, size_hint: usize, payload: impl FnOnce() -> Vec<u8>) {
        self.enqueue_with(channel, size_hint, None, payload)
    }

    /// [`Redis::enqueue`] with the `redis.publish` span of a traced delivery (ended, marked
    /// failed, when the envelope is dropped here).
    fn enqueue_with(
        &self,
        channel: Arc<str>,
        size_hint: usize,
        span: Option<Box<tracing::Span>>,
        payload: impl FnOnce() -> Vec<u8>,
    ) {
        let mut q = self.queue.borrow_mut();
        let cfg = &self.node.cfg;
        if q.len() + self.staged.get() >= cfg.redis_queue_max
            || self.queued_bytes.get() + size_hint + channel.len() > cfg.redis_queue_bytes_max
        {
            self.node
                .redis_stats
                .dropped
                .fetch_add(1, Ordering::Relaxed);
            if let Some(s) = span {
                s.record("otel.status_code", "ERROR");
            }
            return;
        }
        let payload = payload();
        let n = payload.len() + channel.len();
        self.queued_bytes.set(self.queued_bytes.get() + n);
        q.push_back(Out {
            _held: Some(Held {
                n,
                total: self.queued_bytes.clone(),
            }),
            channel,
            payload,
            span,
        });
        self.node
            .redis_stats
            .queued
            .store((q.len() + self.staged.get()) as u64, Ordering::Relaxed);
        if q.len() == 1 {
            self.wake_pub.notify_one();
        }
    }

    /// Queue a service message for the nodes `to` names.
    pub fn service(&self, to: &super::ServiceTo, service: u8, body: &[u8]) {
        let channel = match to {
            super::ServiceTo::Node(n) => self.ch.node(*n),
            super::ServiceTo::Calls => self.ch.calls(),
            super::ServiceTo::User(u) => self.ch.user(u),
        };
        self.enqueue(channel, body.len() + 16, || {
            cluster::encode_service(self.node.id, service, body)
        });
    }

    /// Node `node` is dead: every shard ends the calls it owns with a party there.
    fn node_gone_here(&self, node: u32) {
        use crate::shard::service::{calls, ServiceMsg};
        for shard in 0..self.node.inboxes.len() {
            let msg = crate::shard::ShardMsg::service(ServiceMsg::Calls(Box::new(
                calls::Msg::Owner(calls::Input::NodeGone { node }),
            )));
            if self.node.inboxes.try_send(shard, msg).is_err() {
                self.node
                    .redis_stats
                    .handoff_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A service message from node `origin`, handed to the shard it is for.
    fn service_here(&self, origin: u32, service: u8, body: &[u8]) {
        use crate::shard::service::{calls, ServiceMsg};
        let stats = &self.node.redis_stats;
        let (shard, msg) = match service {
            cluster::service::CALL_INPUT => match calls::decode_remote(body) {
                Some((input, ask)) => (
                    calls::owner_of_input(&input, self.node.inboxes.len()),
                    calls::Msg::Remote { input, ask },
                ),
                None => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            // For the shard that forwarded the command: the owner of its pair here.
            // Fault injection (`SWITCHBOARD_TEST_FAULT`): lost on the way.
            cluster::service::CALL_HELD if self.node.faults.drop_call_held() => return,
            cluster::service::CALL_HELD => match calls::decode_held(origin, body) {
                Some(input @ calls::Input::Held { conn, .. }) if conn.node == self.node.id => (
                    calls::owner_of_input(&input, self.node.inboxes.len()),
                    calls::Msg::Remote { input, ask: None },
                ),
                _ => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            cluster::service::NODE_GONE => {
                match body.try_into().map(u32::from_le_bytes) {
                    // This node, reaped while alive (its heartbeat learns it and announces its
                    // users again): the calls it owns go on; the other nodes ended theirs.
                    Ok(node) if node == self.node.id => {}
                    Ok(node) => self.node_gone_here(node),
                    Err(_) => {
                        stats.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            }
            cluster::service::USER_DISCONNECT => {
                let Ok(user) = std::str::from_utf8(body) else {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let user: Arc<str> = user.into();
                let mut bits = self.node.dir.user_shards(&user);
                while bits != 0 {
                    let shard = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let msg = crate::shard::ShardMsg::service(ServiceMsg::Api(
                        crate::shard::service::api::Msg::Disconnect { user: user.clone() },
                    ));
                    if self.node.inboxes.try_send(shard, msg).is_err() {
                        stats.handoff_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                stats.received.fetch_add(1, Ordering::Relaxed);
                return;
            }
            cluster::service::CALL_UNTRACK => match calls::decode_untrack(body) {
                Some(m @ calls::Msg::Untrack { conn, .. }) => (conn.shard as usize, m),
                _ => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            _ => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if shard >= self.node.inboxes.len() {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let msg = crate::shard::ShardMsg::service(ServiceMsg::Calls(Box::new(msg)));
        if self.node.inboxes.try_send(shard, msg).is_err() {
            // Like a lost signalling packet: the ring timeout or a hangup ends the call.
            stats.handoff_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.received.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A room's, user's or topic's node-level first member arrived or its last left: hold its
    /// channel while the node has members (re-read from the directory: two shards' reports
    /// may arrive in either order).
    pub fn room(&self, room: &str, _t: Transition) {
        let want = self.node.dir.room_shards(room) != 0;
        self.want(self.ch.room(room), want);
    }

    pub fn user(&self, user: &str, _t: Transition) {
        let want = self.node.dir.user_shards(user) != 0;
        self.want(self.ch.user(user), want);
    }

    pub fn topic(&self, topic: &str, _t: Transition) {
        let want = self.node.dir.topics.shards(topic) != 0;
        self.want(self.ch.topic(topic), want);
    }

    fn want(&self, channel: Arc<str>, want: bool) {
        let mut s = self.subs.borrow_mut();
        s.set(channel, want);
        self.node
            .redis_stats
            .subs_expected
            .store(s.expected() as u64, Ordering::Relaxed);
        if s.has_changes() {
            self.wake_sub.notify_one();
        }
    }

    /// Hold exactly the channels the directory needs. A shard whose report of a first or
    /// last member could not reach the bridge (its inbox was full) leaves the wanted set wrong
    /// until this re-reads the directory: within a second of such a loss, and every
    /// [`SUBS_RECONCILE_INTERVAL`] anyway. One pass over the node's rooms, users and topics.
    async fn reconcile(self: Rc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let stats = &self.node.redis_stats;
        loop {
            tick.tick().await;
            let lost = stats.transitions_lost.swap(false, Ordering::Relaxed);
            if !lost && last.elapsed() < SUBS_RECONCILE_INTERVAL {
                continue;
            }
            last = Instant::now();
            let dir = &self.node.dir;
            let mut want = std::collections::HashSet::new();
            want.insert(self.ch.all());
            want.insert(self.ch.calls());
            want.insert(self.ch.node(self.node.id));
            dir.rooms.for_each_name(|r| {
                if dir.rooms.shards(r) != 0 {
                    want.insert(self.ch.room(r));
                }
            });
            dir.users.for_each_name(|u| {
                if dir.users.shards(u) != 0 {
                    want.insert(self.ch.user(u));
                }
            });
            dir.topics.for_each_name(|t| {
                if dir.topics.shards(t) != 0 {
                    want.insert(self.ch.topic(t));
                }
            });
            let mut s = self.subs.borrow_mut();
            let wrong = s.reconcile(want);
            stats
                .subs_expected
                .store(s.expected() as u64, Ordering::Relaxed);
            if s.has_changes() {
                self.wake_sub.notify_one();
            }
            if wrong > 0 {
                tracing::warn!(
                    channels = wrong,
                    "redis: subscriptions put right from the directory (a shard's report to the bridge was lost)"
                );
            }
        }
    }

    /// The command that publishes an envelope: sharded on a Redis Cluster.
    pub(super) fn publish_command(&self) -> &'static str {
        if self.node.cfg.redis_cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The subscriber connection of generation `gen` is lost: the subscriber makes a new one.
    fn lose(&self, gen: u64) {
        self.lost_gen.set(gen);
        self.lost.notify_one();
    }

    fn update_up(&self) {
        let up = self.pub_up.get() && self.sub_up.get() && !self.deaf.get();
        self.node
            .redis_stats
            .up
            .store(u64::from(up), Ordering::Relaxed);
    }

    /// Log a Redis error, at most one line per [`ERROR_LOG_INTERVAL`] (a Redis that is down
    /// fails every attempt).
    pub fn log_error(&self, what: &str, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last_error_log
            .get()
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL)
        {
            self.unlogged_errors.set(self.unlogged_errors.get() + 1);
            return;
        }
        let more = self.unlogged_errors.replace(0);
        self.last_error_log.set(Some(now));
        tracing::warn!(error = %e, more_errors = more, "redis: {what}");
    }

    /// A connection to the first URL that answers, with every client option set. With
    /// `push`, the connection speaks RESP3 and hands every push (pub/sub messages, its own
    /// disconnection) to that channel, tagged with `gen`.
    async fn connect(
        &self,
        push: Option<(mpsc::Sender<(u64, PushInfo)>, u64)>,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let cfg = &self.node.cfg;
        let mut last = None;
        for url in &self.urls {
            // With rediss://, the certificates of redis_tls_* (read at start).
            let info = tls::connection_info(url, self.node.redis_tls.as_ref())?;
            let protocol = if push.is_some() {
                ProtocolVersion::RESP3
            } else {
                ProtocolVersion::RESP2
            };
            let redis_settings = info.redis_settings().clone().set_protocol(protocol);
            let info = info.set_redis_settings(redis_settings).set_tcp_settings(
                redis::io::tcp::TcpSettings::default()
                    // Pipelines and canaries are latency-bound: never wait on Nagle.
                    .set_nodelay(true)
                    // A peer that vanished without a FIN (a killed VM) is noticed by the
                    // kernel: data unacknowledged for redis_timeout fails the socket, and an
                    // idle one is probed.
                    .set_user_timeout(cfg.redis_timeout)
                    .set_keepalive(
                        socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(10))
                            .with_interval(Duration::from_secs(2))
                            .with_retries(3),
                    ),
            );
            let client = redis::Client::open(info)?;
            let mut conf = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(cfg.redis_timeout))
                .set_response_timeout(Some(cfg.redis_timeout))
                .set_pipeline_buffer_size(CLIENT_PIPELINE_BUFFER)
                .set_write_backpressure_boundary(CLIENT_WRITE_BOUNDARY);
            if let Some((tx, gen)) = &push {
                let (tx, gen, node) = (tx.clone(), *gen, self.node.clone());
                conf = conf.set_push_sender(move |p: PushInfo| -> Result<(), ()> {
                    let n = push_bytes(&p);
                    let admitted = inbound_admit(&node.redis_stats, n);
                    if !admitted || tx.try_send((gen, p)).is_err() {
                        if admitted {
                            node.redis_stats
                                .inbound_bytes
                                .fetch_sub(n as u64, Ordering::Relaxed);
                        }
                        node.redis_stats
                            .inbound_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        // It may have been a history message: no cache is current any more.
                        node.redis_stats.history_gen.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                });
            }
            match client
                .get_multiplexed_async_connection_with_config(&conf)
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no URL"))))
    }

    /// Publish what is queued, one pipeline at a time; reconnect after a failure.
    async fn publisher(self: Rc<Self>) {
        let stats = &self.node.redis_stats;
        let timeout = self.node.cfg.redis_timeout;
        let mut backoff = Backoff::new(self.node.cfg.redis_reconnect_max, u64::from(self.node.id));
        let mut first = true;
        let mut batch: Vec<Out> = Vec::with_capacity(PIPELINE_MAX);
        loop {
            let mut conn = match self.connect(None).await {
                Ok(c) => c,
                Err(e) => {
                    self.log_error("cannot connect the publisher", &e);
                    tokio::time::sleep(backoff.wait()).await;
                    continue;
                }
            };
            if !first {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!("redis: publisher connected again");
            }
            first = false;
            backoff.reset();
            self.pub_up.set(true);
            // A canary lost with the old connection's pipeline never reached Redis: it is not
            // the subscription's fault.
            self.canary_sent.set(None);
            self.canary_back.set(Instant::now());
            self.update_up();
            self.cmd_gen.set(self.cmd_gen.get() + 1);
            *self.cmd_conn.borrow_mut() = Some(CmdConn::Single(conn.clone()));
            self.cmd_since.set(Some(Instant::now()));
            // Redis may have lost this node's presence (a restart without persistence).
            self.resync_owed.set(true);
            self.cmd_conn_new.notify_one();
            let mut canaries;
            loop {
                if self.queue.borrow().is_empty() && self.canary_out.borrow().is_none() {
                    self.wake_pub.notified().await;
                    continue;
                }
                {
                    // The canary first; counted apart from the messages.
                    batch.extend(self.canary_out.borrow_mut().take());
                    canaries = batch.len();
                    let mut q = self.queue.borrow_mut();
                    let n = q.len().min(PIPELINE_MAX);
                    batch.extend(q.drain(..n));
                    stats.queued.store(q.len() as u64, Ordering::Relaxed);
                }
                let mut pipe = redis::pipe();
                for o in &batch {
                    pipe.cmd("PUBLISH")
                        .arg(&*o.channel)
                        .arg(&o.payload[..])
                        .ignore();
                }
                let n = (batch.len() - canaries) as u64;
                let r = tokio::time::timeout(timeout, pipe.exec_async(&mut conn)).await;
                if !matches!(r, Ok(Ok(()))) {
                    Out::failed(&batch);
                }
                batch.clear();
                match r {
                    Ok(Ok(())) => {
                        stats.published.fetch_add(n, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.log_error("publish failed", &e);
                        break;
                    }
                    Err(_) => {
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.log_error("publish failed", &"timed out (redis_timeout)");
                        break;
                    }
                }
            }
            self.pub_up.set(false);
            self.update_up();
            *self.cmd_conn.borrow_mut() = None;
            self.cmd_since.set(None);
            tokio::time::sleep(backoff.wait()).await;
        }
    }

    /// Keep one subscriber connection holding every channel the node needs.
    async fn subscriber(self: Rc<Self>, tx: mpsc::Sender<(u64, PushInfo)>) {
        let stats = &self.node.redis_stats;
        let timeout = self.node.cfg.redis_timeout;
        let mut backoff = Backoff::new(
            self.node.cfg.redis_reconnect_max,
            u64::from(self.node.id).rotate_left(17),
        );
        let mut first = true;
        loop {
            let gen = self.sub_gen.get();
            let mut conn = match self.connect(Some((tx.clone(), gen))).await {
                Ok(c) => c,
                Err(e) => {
                    self.sub_gen.set(gen + 1);
                    self.log_error("cannot connect the subscriber", &e);
                    tokio::time::sleep(backoff.wait()).await;
                    continue;
                }
            };
            let first_connection = first;
            if !first {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            backoff.reset();
            self.subs.borrow_mut().reset();
            stats.subs_held.store(0, Ordering::Relaxed);
            let mut subscribed_all = false;
            'conn: loop {
                // Bring Redis in line with what is wanted, a batch at a time.
                loop {
                    let c = self.subs.borrow_mut().changes(SUBSCRIBE_BATCH_MAX);
                    if c.is_empty() {
                        break;
                    }
                    // History rooms stop being held before their channel is let go.
                    self.history_unsubscribing(&c.unsubscribe);
                    let r = tokio::time::timeout(timeout, async {
                        if !c.subscribe.is_empty() {
                            let names: Vec<&str> = c.subscribe.iter().map(|s| &**s).collect();
                            conn.subscribe(&names).await?;
                        }
                        if !c.unsubscribe.is_empty() {
                            let names: Vec<&str> = c.unsubscribe.iter().map(|s| &**s).collect();
                            conn.unsubscribe(&names).await?;
                        }
                        Ok::<(), redis::RedisError>(())
                    })
                    .await;
                    let mut s = self.subs.borrow_mut();
                    match r {
                        Ok(Ok(())) => {
                            s.confirm(&c);
                            stats.subs_held.store(s.held() as u64, Ordering::Relaxed);
                            drop(s);
                            self.history_subscribed(&c.subscribe);
                        }
                        Ok(Err(e)) => {
                            s.failed(&c);
                            drop(s);
                            self.log_error("subscribe failed", &e);
                            break 'conn;
                        }
                        Err(_) => {
                            s.failed(&c);
                            drop(s);
                            self.log_error("subscribe failed", &"timed out (redis_timeout)");
                            break 'conn;
                        }
                    }
                }
                if !subscribed_all {
                    // Up once everything the node needs is held again.
                    subscribed_all = true;
                    self.canary_back.set(Instant::now());
                    self.canary_sent.set(None);
                    self.sub_up.set(true);
                    self.update_up();
                    if !first_connection {
                        tracing::info!(
                            channels = self.subs.borrow().held(),
                            "redis: subscriber connected again, every channel subscribed again"
                        );
                    }
                }
                tokio::select! {
                    _ = self.wake_sub.notified() => {}
                    // A loss reported for an older connection (a permit left from then) is
                    // not this one's.
                    _ = self.lost.notified() => if self.lost_gen.get() == gen {
                        break 'conn;
                    },
                }
            }
            // Pushes of this connection (its disconnection among them) are stale from now on.
            self.sub_gen.set(gen + 1);
            self.history_lost();
            self.sub_up.set(false);
            self.update_up();
            drop(conn);
            tokio::time::sleep(backoff.wait()).await;
        }
    }

    /// Hand what the subscriber connection receives to this node's shards.
    async fn inbound(self: Rc<Self>, rx: Rc<tokio::sync::Mutex<mpsc::Receiver<(u64, PushInfo)>>>) {
        let stats = &self.node.redis_stats;
        let mut rx = rx.lock().await;
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            for (gen, push) in batch.drain(..) {
                stats
                    .inbound_bytes
                    .fetch_sub(push_bytes(&push) as u64, Ordering::Relaxed);
                if gen != self.sub_gen.get() {
                    continue;
                }
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        // [channel, payload]
                        let Some(Value::BulkString(payload)) = push.data.get(1) else {
                            stats.malformed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        // Another node's bytes: a bug they trigger costs that envelope (counted),
                        // never the inbound path.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.received_envelope(payload)
                        }));
                        if r.is_err() {
                            stats.malformed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    PushKind::Disconnection => self.lose(gen),
                    _ => {}
                }
            }
        }
    }

    fn received_envelope(&self, payload: &[u8]) {
        let stats = &self.node.redis_stats;
        match cluster::decode(payload) {
            Ok(Inbound::Deliver {
                origin,
                target,
                droppable: d,
                wire,
                trace,
            }) => {
                if origin == self.node.id {
                    return; // our own publish, heard on a channel we hold
                }
                let born = self.node.now_us();
                let frame = Frame::from_wire(wire, if d { droppable(born) } else { born });
                stats.received.fetch_add(1, Ordering::Relaxed);
                // A traced delivery: this node's part of its trace, from the envelope to the
                // hand-off to the shards (another node of ours: its flag is followed).
                let span = match trace {
                    Some((trace_id, span_id)) => crate::root_span!(
                        crate::trace::root_from_node(trace_id, span_id),
                        "redis.receive",
                        otel.kind = "consumer",
                        messaging.system = "redis",
                        messaging.message.body.size = wire.len() as u64,
                        origin.node = %format!("{origin:08x}"),
                    ),
                    None => tracing::Span::none(),
                };
                let _entered = span.enter();
                if let Some(f) = &*self.deliver.borrow() {
                    f(target, &frame);
                }
            }
            Ok(Inbound::History {
                origin: _,
                room,
                offset,
                epoch,
                head,
                trace,
            }) => {
                // Every node, the origin too, delivers it when Redis says (offset order).
                self.history_received(room, offset, epoch, head, trace);
            }
            Ok(Inbound::Service {
                origin,
                service,
                body,
            }) => {
                if origin != self.node.id {
                    self.service_here(origin, service, body);
                }
            }
            Ok(Inbound::Canary { origin, nonce }) => {
                if origin != self.node.id {
                    return;
                }
                let now = Instant::now();
                if let Some((n, at)) = self.canary_sent.get() {
                    if n == nonce {
                        stats
                            .canary_rtt_us
                            .store(now.duration_since(at).as_micros() as u64, Ordering::Relaxed);
                        self.canary_sent.set(None);
                    }
                }
                self.canary_back.set(now);
                if self.deaf.replace(false) {
                    tracing::info!("redis: the canary is back; the subscription delivers again");
                    self.update_up();
                }
            }
            Err(_) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Publish a canary to this node's channel every `redis_canary_interval`; one not back
    /// within `redis_canary_timeout` means the subscription is deaf: subscribe again.
    async fn canary(self: Rc<Self>) {
        let cfg = &self.node.cfg;
        let mut tick = tokio::time::interval(cfg.redis_canary_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let own = self.ch.node(self.node.id);
        loop {
            tick.tick().await;
            if !(self.pub_up.get() && self.sub_up.get()) {
                continue;
            }
            let now = Instant::now();
            if now.duration_since(self.canary_back.get()) > cfg.redis_canary_timeout {
                self.node
                    .redis_stats
                    .canary_missed
                    .fetch_add(1, Ordering::Relaxed);
                if !self.deaf.replace(true) {
                    tracing::warn!(
                        timeout = ?cfg.redis_canary_timeout,
                        "redis: no canary came back; the subscriber connection delivers nothing: subscribing again on a new one"
                    );
                }
                self.update_up();
                self.canary_back.set(now);
                self.lose(self.sub_gen.get());
                continue;
            }
            if self.canary_sent.get().is_none() {
                let nonce = self.canary_nonce.get() + 1;
                self.canary_nonce.set(nonce);
                self.canary_sent.set(Some((nonce, now)));
                *self.canary_out.borrow_mut() = Some(Out {
                    _held: None,
                    span: None,
                    channel: own.clone(),
                    payload: cluster::encode_canary(self.node.id, nonce),
                });
                self.wake_pub.notify_one();
            }
        }
    }
}

/// Run the task `make` makes on the current `LocalSet` for as long as the bridge lives. A
/// task that panics (a bug: Redis's answers and other nodes' envelopes are checked, never
/// trusted) is logged, counted (`switchboard_redis_task_restarts_total`) and started again a
/// second later, so one bad answer never silently takes a part of the cluster away. Aborting
/// the returned handle aborts the task.
fn supervise<F, Fut>(name: &'static str, redis: &Rc<Redis>, make: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Rc<Redis>) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    supervise_with(name, redis.node.clone(), redis.clone(), make)
}

/// [`supervise`] for a task of another context `ctx` (Redis Cluster mode's tasks, and its
/// per-master ones), counted in the node's `switchboard_redis_task_restarts_total` all the
/// same. `make` is called again for each restart: the task starts from its beginning, so it
/// must (re)make what it needs there (a connection, its up flags).
pub(super) fn supervise_with<C, F, Fut>(
    name: &'static str,
    node: Arc<Node>,
    ctx: C,
    make: F,
) -> tokio::task::JoinHandle<()>
where
    C: Clone + 'static,
    F: Fn(C) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    /// Aborts the task when the supervisor is dropped (aborted).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    tokio::task::spawn_local(async move {
        loop {
            let mut task = AbortOnDrop(tokio::task::spawn_local(make(ctx.clone())));
            match (&mut task.0).await {
                Err(e) if e.is_panic() => {
                    node.redis_stats
                        .task_restarts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        task = name,
                        "redis: a bridge task panicked; starting it again"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // Ended on its own (the bridge is stopping, a retired master), or aborted.
                _ => return,
            }
        }
    })
}

/// The Redis lines of `/metrics`.
pub fn prometheus_lines(s: &RedisStats, out: &mut String) {
    let rows: [(&str, &str, &str, &AtomicU64); 29] = [
        (
            "switchboard_redis_up",
            "gauge",
            "1 while both Redis connections (on a Redis Cluster, every master's) are up and the canary (every master's) is on time",
            &s.up,
        ),
        (
            "switchboard_redis_published_total",
            "counter",
            "Envelopes Redis took (PUBLISH, or SPUBLISH on a Redis Cluster, answered)",
            &s.published,
        ),
        (
            "switchboard_redis_publish_failed_total",
            "counter",
            "Envelopes of pipelines that failed (Redis may not have published them)",
            &s.publish_failed,
        ),
        (
            "switchboard_redis_dropped_total",
            "counter",
            "Envelopes dropped because redis_queue_max were waiting for Redis",
            &s.dropped,
        ),
        (
            "switchboard_redis_queued",
            "gauge",
            "Envelopes waiting to be published",
            &s.queued,
        ),
        (
            "switchboard_redis_received_total",
            "counter",
            "Envelopes from other nodes handed to this node's shards",
            &s.received,
        ),
        (
            "switchboard_redis_malformed_total",
            "counter",
            "Envelopes that could not be decoded",
            &s.malformed,
        ),
        (
            "switchboard_redis_inbound_dropped_total",
            "counter",
            "Pushes dropped because the inbound queue was full",
            &s.inbound_dropped,
        ),
        (
            "switchboard_redis_handoff_dropped_total",
            "counter",
            "Service messages from other nodes dropped because a shard's inbox was full",
            &s.handoff_dropped,
        ),
        (
            "switchboard_redis_task_restarts_total",
            "counter",
            "Bridge tasks of the Redis clients that panicked and were started again (a bug)",
            &s.task_restarts,
        ),
        (
            "switchboard_redis_reconnects_total",
            "counter",
            "Redis connections made again after a failure",
            &s.reconnects,
        ),
        (
            "switchboard_redis_canary_missed_total",
            "counter",
            "Canaries not back within redis_canary_timeout (each makes the node subscribe again)",
            &s.canary_missed,
        ),
        (
            "switchboard_redis_subscriptions_expected",
            "gauge",
            "Channels this node needs held",
            &s.subs_expected,
        ),
        (
            "switchboard_redis_subscriptions_held",
            "gauge",
            "Channels Redis has confirmed on the subscriber connection (on a Redis Cluster, the masters' subscriber connections)",
            &s.subs_held,
        ),
        (
            "switchboard_redis_presence_told_total",
            "counter",
            "Presence changes Redis found to be the cluster's (told to the watchers)",
            &s.presence_told,
        ),
        (
            "switchboard_redis_presence_kept_total",
            "counter",
            "Presence changes Redis found to be this node's only (another node holds the user)",
            &s.presence_kept,
        ),
        (
            "switchboard_redis_presence_unchecked_total",
            "counter",
            "Presence changes told as this node judged them (Redis down or the queue full)",
            &s.presence_unchecked,
        ),
        (
            "switchboard_redis_presence_resynced_total",
            "counter",
            "Presence changes of this node written to Redis again after a reconnect",
            &s.presence_resynced,
        ),
        (
            "switchboard_redis_presence_reads_total",
            "counter",
            "Presence reads (query or watch answers) of users held by other nodes that Redis answered",
            &s.presence_reads,
        ),
        (
            "switchboard_redis_presence_read_failed_total",
            "counter",
            "Presence reads answered from this node's state instead (Redis down or past redis_timeout, or PRESENCE_READS_MAX in flight)",
            &s.presence_read_failed,
        ),
        (
            "switchboard_redis_forgotten_total",
            "counter",
            "Times the cluster reaped this node while it was alive (its users were announced again)",
            &s.forgotten,
        ),
        (
            "switchboard_redis_dedup_claims_total",
            "counter",
            "clientMsgId claims this node took in Redis for new direct messages",
            &s.dedup_claimed,
        ),
        (
            "switchboard_redis_dedup_repeats_total",
            "counter",
            "Direct-message retries answered with the first copy's ack from Redis (not stored or delivered again)",
            &s.dedup_repeats,
        ),
        (
            "switchboard_redis_dedup_waited_total",
            "counter",
            "Direct-message retries that found the first copy in flight on another node and waited for it",
            &s.dedup_waited,
        ),
        (
            "switchboard_redis_dedup_in_flight_total",
            "counter",
            "Direct-message retries answered message still in flight, retry later",
            &s.dedup_in_flight,
        ),
        (
            "switchboard_redis_dedup_unchecked_total",
            "counter",
            "Direct messages stored without asking Redis for their clientMsgId (Redis down or slow, or the claim queue full): deduplicated on this node only",
            &s.dedup_unchecked,
        ),
        (
            "switchboard_redis_dedup_settle_failed_total",
            "counter",
            "clientMsgId claim updates given up (a failed pipeline or a full queue); the claim expires after its pending TTL",
            &s.dedup_settle_failed,
        ),
        (
            "switchboard_redis_presence_reaped_total",
            "counter",
            "Users of dead nodes whose presence this node reaped",
            &s.presence_reaped,
        ),
        (
            "switchboard_redis_nodes_reaped_total",
            "counter",
            "Dead nodes whose presence this node reaped",
            &s.nodes_reaped,
        ),
    ];
    let history: [(&str, &str, &str, &AtomicU64); 17] = [
        ("switchboard_redis_history_appended_total", "counter", "Room history messages Redis sequenced (append scripts answered)", &s.history_appended),
        ("switchboard_redis_history_append_failed_total", "counter", "History appends that failed (their messages were sequenced on this node instead)", &s.history_append_failed),
        ("switchboard_redis_history_append_retried_total", "counter", "History appends sent again after Redis did not answer (timed out, or the connection failed after sending)", &s.history_append_retried),
        ("switchboard_redis_history_append_repeats_total", "counter", "History appends Redis had run already when they were sent again (not appended or published twice)", &s.history_append_repeats),
        ("switchboard_redis_history_append_abandoned_total", "counter", "History appends given up after their retry bounds (sequenced on this node; delivered twice here if the first copy ran)", &s.history_append_abandoned),
        ("switchboard_redis_history_local_total", "counter", "History messages sequenced on this node under a node-local epoch (nothing sent: Redis unavailable or its queue full; refused; or given up after retries)", &s.history_local),
        ("switchboard_redis_history_queued", "gauge", "History appends waiting for Redis", &s.history_queued),
        ("switchboard_redis_history_received_total", "counter", "History messages heard on room channels (this node's own too)", &s.history_received),
        ("switchboard_redis_history_reads_total", "counter", "History stream reads Redis answered", &s.history_reads),
        ("switchboard_redis_history_read_failed_total", "counter", "History stream reads that failed or waited past redis_timeout (their resumes read recovered: false)", &s.history_read_failed),
        ("switchboard_redis_history_reads_waiting", "gauge", "History stream reads waiting for a subscription or for Redis", &s.history_reads_waiting),
        ("switchboard_redis_history_resumes_local_total", "counter", "Resumes answered from this node's history cache", &s.history_resumes_local),
        ("switchboard_redis_history_resumes_read_total", "counter", "Resumes answered after a history stream read", &s.history_resumes_read),
        ("switchboard_redis_history_resumes_shared_total", "counter", "Resumes that waited for a read another resume of the room had asked for", &s.history_resumes_shared),
        ("switchboard_redis_history_gaps_total", "counter", "History messages that arrived after skipped offsets (lost on the way to this node)", &s.history_gaps),
        ("switchboard_redis_history_view_resets_total", "counter", "Times a lost subscription made every history cache of this node stale", &s.history_view_resets),
        ("switchboard_redis_history_generation", "gauge", "The bridge's history view generation (moves when pushes may have been lost)", &s.history_gen),
    ];
    for (name, kind, help, v) in rows.into_iter().chain(history) {
        let v = v.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP switchboard_redis_canary_rtt_seconds Round trip of the last canary through Redis\n# TYPE switchboard_redis_canary_rtt_seconds gauge\nswitchboard_redis_canary_rtt_seconds {:.6}",
        s.canary_rtt_us.load(Ordering::Relaxed) as f64 / 1e6
    );
}

fn timed_out() -> redis::RedisError {
    (redis::ErrorKind::Io, "timed out (redis_timeout)").into()
}

/// A room's users from `HLEN` and `HRANDFIELD ... WITHVALUES` of its hash (a flat list of
/// field, value, or pairs on RESP3): each user with the number of nodes holding it. None for
/// a reply of another shape (never a panic).
fn parse_room_found(v: &[Value]) -> Option<crate::shard::service::presence::RoomFound> {
    let [Value::Int(count), list] = v else {
        return None;
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut users = Vec::new();
    match list {
        Value::Array(items) if items.iter().all(|i| matches!(i, Value::Array(_))) => {
            for i in items {
                let Value::Array(pair) = i else { continue };
                if let [f, n] = &pair[..] {
                    users.push((text(f)?.into(), text(n)?.split_whitespace().count() as u32));
                }
            }
        }
        Value::Array(items) => {
            for pair in items.chunks(2) {
                if let [f, n] = pair {
                    users.push((text(f)?.into(), text(n)?.split_whitespace().count() as u32));
                }
            }
        }
        Value::Nil => {}
        _ => return None,
    }
    Some(crate::shard::service::presence::RoomFound {
        users,
        count: usize::try_from(*count).unwrap_or(0),
    })
}

/// The topic of a user's presence watchers.
fn presence_topic(user: &str) -> Target {
    Target::Topic {
        topic: crate::shard::service::presence::watch_topic(user).into(),
        except: None,
    }
}
