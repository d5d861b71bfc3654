//! Redis Cluster mode (`redis_cluster: true`): the same [`Redis`] (queue, subscription set,
//! presence, heartbeat, reaper, service messages, metrics), with sharded pub/sub and every
//! key command routed to the master of its slot. A child module of [`super`]: it reads the
//! `Redis` state directly and replaces only the publisher, subscriber, inbound and canary
//! tasks; nothing here runs for a single Redis.
//!
//! - **Commands** (presence script, heartbeat, reaper, farewell, history, dedup) go through
//!   one [`CmdConn::Cluster`]: the crate's cluster connection, which follows `MOVED`/`ASK` and
//!   refreshes its slot map itself. A pipeline is split by slot ([`split_pipeline`]): the
//!   commands of one slot go as one pipeline to that slot's master (one round trip for a
//!   presence batch's 256 `SADD`/`SREM` to `{node:x}:users`), and the slots run concurrently,
//!   so a pipeline that pairs `{user:x}:nodes` with `{node:hex}:users` is two routed pipelines,
//!   never one cross-slot call. A command the split does not know to name one key
//!   ([`command_slot`]: `SCRIPT`, `PUBLISH`, a script without keys) is sent alone, routed by
//!   the crate.
//! - **A failed slot.** When a slot's pipeline fails (`MOVED`/`ASK`/`TRYAGAIN`/`CLUSTERDOWN`
//!   still answered after [`CLUSTER_RETRIES`], I/O, `redis_timeout`), the other slots' replies
//!   stand and each of that slot's commands is answered with an error value
//!   ([`merge_runs`]: the server's error, or `SLOTFAILED <cause>`); only when every slot failed
//!   does the pipeline fail as a whole, with the first error, as on one Redis. So a caller
//!   with `ignore_errors()` (history appender and reader) sees which commands failed and
//!   treats only those as not run; a caller without it (presence worker, heartbeat, resync,
//!   reaper, dedup) still gets one error for the pipeline, which is right for them: their
//!   commands are idempotent and the whole batch is judged again (or, for dedup claims, goes
//!   on unchecked). A failed slot's commands may or may not have run, as after a lost
//!   connection.
//! - **Redirects inside a slot's pipeline.** The crate (redis 1.8) retries a pipeline as a
//!   whole when any reply in it asks for it (`MOVED`, `ASK`, `TRYAGAIN`...), on the redirect
//!   target, sending `ASKING` once, before the first command only; the rest of a pipeline on
//!   an importing master is answered `MOVED` back. So a slot's pipeline still redirected after
//!   the retries (a slot being migrated) is sent again one command at a time, each following
//!   its own redirect. Either way a pipeline caught by a migration half way may run its first
//!   commands twice, once on each master: every command sent here bears a second run (sets,
//!   hashes, the presence/heartbeat/dedup scripts, history reads) except the history append
//!   script, which may then record an entry twice (as after a retry on a lost connection).
//! - **Publishing.** The shared queue (`redis_queue_max`, as for one Redis) is drained into one
//!   staging queue per master, by the master of each channel's slot ([`SlotMap::group`]); each
//!   master has its own RESP2 connection and publisher task with at most one pipeline of
//!   [`PIPELINE_MAX`] `SPUBLISH` in flight, so a slow master holds back only its own channels
//!   (until the shared bound is reached). A `MOVED` answer asks for a new slot map and the
//!   envelope is staged again for the new owner.
//! - **Subscribing.** One RESP3 subscriber connection per master holds, with
//!   `SSUBSCRIBE`/`SUNSUBSCRIBE` (pipelined, one channel per command: sharded subscribe takes
//!   several channels only of one slot), the channels of the slots it masters. A `sunsubscribe` push
//!   the node did not ask for (the slot moved to another master) asks for a new slot map, and
//!   the channel is subscribed on its new owner.
//! - **Canaries.** Every master gets its own canary channel, `<p>{canary:<hex node>:<n>}` with
//!   the first `n` whose slot that master owns ([`cluster::canary_channel`]); a canary not back
//!   within `redis_canary_timeout` makes the node subscribe again on that master only. `/ready`
//!   (`switchboard_redis_up`) needs every master's publisher and subscriber connection up and
//!   every master's canary on time.
//! - **Topology.** `CLUSTER SLOTS` is read at start, every [`TOPOLOGY_REFRESH_INTERVAL`], and
//!   when a `MOVED` or an unasked `sunsubscribe` says it changed (at most once per
//!   [`TOPOLOGY_REFRESH_MIN`]). A new master gets its connections; a master that owns no slot
//!   any more is retired and its channels and staged envelopes go to the new owners.
//! - **Supervision.** Every task here, each master's publisher and subscriber too, runs under
//!   [`supervise_with`] (the same restart and counter as the shared tasks' `supervise`): a
//!   panic is logged, counted and the task started again from its beginning a second later.
//!   A master's task marks its connection down as it unwinds ([`DownOnPanic`]) and makes a
//!   new one when started again; the dispatcher, router and canary wait for the first slot
//!   map, which the topology task reads.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    Arg, AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, Pipeline, ProtocolVersion,
    PushInfo, PushKind, RedisError, RedisFuture, RedisResult, ServerError, Value,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{supervise_with, Ordering, SUBSCRIBE_BATCH_MAX};
use super::{Out, Redis, CLIENT_PIPELINE_BUFFER, CLIENT_WRITE_BOUNDARY, INBOUND_MAX, PIPELINE_MAX};
use crate::cluster::{self, Backoff, Changes, Inbound, SlotMap, Subscriptions};

/// How often the slot map is read again when nothing said it changed.
pub const TOPOLOGY_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Least time between two reads of the slot map (a burst of `MOVED` answers asks once).
pub const TOPOLOGY_REFRESH_MIN: Duration = Duration::from_millis(100);

/// Wait before a sharded (un)subscribe that a master refused (`MOVED` before the slot map
/// caught up, `CLUSTERDOWN` while a master is failed) is tried again on the same connection.
pub const SUBSCRIBE_RETRY: Duration = Duration::from_millis(100);

/// Retries of the crate's cluster connection for one command (after a `MOVED`, `ASK`,
/// `TRYAGAIN` or a lost node connection), and its waits between them; every command is also
/// bounded by `redis_timeout` as a whole.
pub const CLUSTER_RETRIES: u32 = 3;
pub const CLUSTER_RETRY_WAIT_MIN_MS: u64 = 10;
pub const CLUSTER_RETRY_WAIT_MAX_MS: u64 = 200;

/// The connection key commands go through: the node's one Redis, or the cluster connection
/// that routes every command to the master of its key's slot.
#[derive(Clone)]
pub enum CmdConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for CmdConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CmdConn::Single(c) => c.req_packed_command(cmd),
            CmdConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CmdConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            CmdConn::Cluster(c) => Box::pin(split_pipeline(c.clone(), pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CmdConn::Single(c) => c.get_db(),
            CmdConn::Cluster(_) => 0,
        }
    }
}

/// Commands whose first argument is their one key (as the crate's cluster routing reads
/// them). Any other command, and a script without keys, has no slot here: it is a run of its
/// own, sent alone as the crate routes it (`SCRIPT`, `PUBLISH`, `PING`...).
const ONE_KEY_COMMANDS: &[&[u8]] = &[
    b"SADD",
    b"SREM",
    b"SMEMBERS",
    b"SSCAN",
    b"SISMEMBER",
    b"SCARD",
    b"HSET",
    b"HDEL",
    b"HGET",
    b"HGETALL",
    b"SET",
    b"GET",
    b"DEL",
    b"EXPIRE",
    b"PEXPIRE",
    b"SPUBLISH",
    b"XADD",
    b"XRANGE",
];

/// The slot of the key `cmd` names (the first argument after the name of a one-key command;
/// for `EVAL`/`EVALSHA` the first key after the key count), None for a command without one
/// or one not known here.
pub fn command_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(b) => Some(b),
        _ => None,
    });
    let name = args.next()?;
    if [&b"EVAL"[..], b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        let _script = args.next()?;
        let keys = args.next()?;
        if keys == b"0" || !keys.iter().all(u8::is_ascii_digit) {
            return None;
        }
    } else if !ONE_KEY_COMMANDS
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        return None;
    }
    args.next().map(cluster::slot)
}

/// One run of a split pipeline: the commands of one slot (None: one command without a slot),
/// as indices into the pipeline, in their order.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    pub slot: Option<u16>,
    pub idx: Vec<usize>,
}

/// Indices `0..slots.len()` in runs of one slot each, every run in its original order (runs in
/// the order of their first command); a command without a slot is a run of its own.
pub fn runs_by_slot(slots: &[Option<u16>]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut of_slot: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for (i, s) in slots.iter().enumerate() {
        match s.and_then(|s| of_slot.get(&s).copied()) {
            Some(r) => runs[r].idx.push(i),
            None => {
                if let Some(s) = s {
                    of_slot.insert(*s, runs.len());
                }
                runs.push(Run {
                    slot: *s,
                    idx: vec![i],
                });
            }
        }
    }
    runs
}

/// The error value a failed run leaves in each of its commands' positions: the server's own
/// error (`MOVED`, `CLUSTERDOWN`... after the crate's retries), or, for a client-side failure
/// (I/O, timeout, no connection), a `SLOTFAILED` error naming it. Either way the command may
/// or may not have run.
pub fn run_error_value(e: &RedisError) -> Value {
    let server = ServerError::try_from(e.clone()).or_else(|e| {
        ServerError::try_from(redis::make_extension_error(
            "SLOTFAILED".into(),
            Some(e.to_string()),
        ))
    });
    match server {
        Ok(s) => Value::ServerError(s),
        // Not reached: an extension error is a server error.
        Err(_) => Value::Nil,
    }
}

/// The replies of `n` commands in pipeline order from the replies of their `runs` (in the same
/// order). A run that failed (or answered the wrong number of replies) leaves
/// [`run_error_value`] in its positions, the other runs' replies stand; when every run failed
/// the pipeline fails as a whole with the first run's error, as it would on one Redis.
pub fn merge_runs(
    n: usize,
    runs: &[Run],
    replies: Vec<RedisResult<Vec<Value>>>,
) -> RedisResult<Vec<Value>> {
    let mut values = vec![Value::Nil; n];
    let mut first_err: Option<RedisError> = None;
    let mut any_ok = n == 0;
    for (run, reply) in runs.iter().zip(replies) {
        let reply = reply.and_then(|v| {
            if v.len() == run.idx.len() {
                Ok(v)
            } else {
                Err(RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "a slot's pipeline answered the wrong number of replies",
                )))
            }
        });
        match reply {
            Ok(v) => {
                any_ok = true;
                for (&i, v) in run.idx.iter().zip(v) {
                    values[i] = v;
                }
            }
            Err(e) => {
                let ev = run_error_value(&e);
                for &i in &run.idx {
                    values[i] = ev.clone();
                }
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) if !any_ok => Err(e),
        _ => Ok(values),
    }
}

/// A (non-atomic) pipeline on a Redis Cluster: each slot's commands as one pipeline to that
/// slot's master, the slots concurrently; the replies in the pipeline's order, a failed slot's
/// commands answered with an error value each ([`merge_runs`]).
async fn split_pipeline(
    conn: ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    if pipeline.is_transaction() {
        return Err(RedisError::from((
            ErrorKind::Client,
            "MULTI/EXEC pipelines are not split over a Redis Cluster",
        )));
    }
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().skip(offset).take(count).collect();
    let slots: Vec<Option<u16>> = cmds.iter().map(|c| command_slot(c)).collect();
    let runs = runs_by_slot(&slots);
    let cmds = &cmds;
    let sent = runs.iter().map(|run| {
        let mut c = conn.clone();
        async move {
            match (run.slot, &run.idx[..]) {
                (Some(slot), idx) if idx.len() > 1 => {
                    let mut p = Pipeline::with_capacity(idx.len());
                    for &i in idx {
                        p.add_command(cmds[i].clone());
                    }
                    let route = Route::new(slot, SlotAddr::Master);
                    let r = c
                        .route_pipeline(p, 0, idx.len(), SingleNodeRoutingInfo::SpecificNode(route))
                        .await;
                    match r {
                        // Still redirected after the crate's retries: the slot is migrating,
                        // and the crate's `ASKING` covers only a pipeline's first command. One
                        // by one, each command follows its own redirect.
                        Err(e) if is_redirect(&e) => one_by_one(&mut c, cmds, idx).await,
                        r => r,
                    }
                }
                (_, idx) => one_by_one(&mut c, cmds, idx).await,
            }
        }
    });
    let replies = join_all(sent).await;
    merge_runs(cmds.len(), &runs, replies)
}

/// A `MOVED` or `ASK` the crate's retries did not get past.
fn is_redirect(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)
    )
}

/// The commands `idx` of `cmds` one after the other, each routed by the crate on its own.
async fn one_by_one(
    c: &mut ClusterConnection,
    cmds: &[&Cmd],
    idx: &[usize],
) -> RedisResult<Vec<Value>> {
    let mut out = Vec::with_capacity(idx.len());
    for &i in idx {
        out.push(c.req_packed_command(cmds[i]).await?);
    }
    Ok(out)
}

/// What one master of the cluster has of this node: its publisher's staging queue, its
/// subscriber's channels, its canary.
struct Master {
    /// Tags this master's pushes (never reused while the node runs).
    id: u64,
    /// `host:port`, as `CLUSTER SLOTS` names it.
    addr: String,
    info: ConnectionInfo,
    queue: RefCell<VecDeque<Out>>,
    canary_out: RefCell<Option<Out>>,
    wake_pub: Notify,
    subs: RefCell<Subscriptions>,
    wake_sub: Notify,
    lost: Notify,
    /// The subscriber generation a loss was reported for: a permit left from an older
    /// connection does not break a fresh one.
    lost_gen: Cell<u64>,
    sub_gen: Cell<u64>,
    pub_up: Cell<bool>,
    sub_up: Cell<bool>,
    deaf: Cell<bool>,
    /// This node's canary channel on this master (a slot it owns).
    canary: RefCell<Option<Arc<str>>>,
    canary_nonce: Cell<u64>,
    canary_sent: Cell<Option<(u64, Instant)>>,
    canary_back: Cell<Instant>,
    /// It owns no slot any more: its tasks end.
    retired: Cell<bool>,
}

impl Master {
    /// The subscriber connection of generation `gen` is lost: the subscriber makes a new one.
    fn lose(&self, gen: u64) {
        self.lost_gen.set(gen);
        self.lost.notify_one();
    }

    fn new(id: u64, addr: String, info: ConnectionInfo) -> Master {
        Master {
            id,
            addr,
            info,
            queue: RefCell::new(VecDeque::new()),
            canary_out: RefCell::new(None),
            wake_pub: Notify::new(),
            subs: RefCell::new(Subscriptions::default()),
            wake_sub: Notify::new(),
            lost: Notify::new(),
            lost_gen: Cell::new(u64::MAX),
            sub_gen: Cell::new(0),
            pub_up: Cell::new(false),
            sub_up: Cell::new(false),
            deaf: Cell::new(false),
            canary: RefCell::new(None),
            canary_nonce: Cell::new(0),
            canary_sent: Cell::new(None),
            canary_back: Cell::new(Instant::now()),
            retired: Cell::new(false),
        }
    }

    fn is_canary(&self, channel: &[u8]) -> bool {
        self.canary
            .borrow()
            .as_deref()
            .is_some_and(|c| c.as_bytes() == channel)
    }
}

type PushTx = mpsc::Sender<(u64, u64, PushInfo)>;

/// Marks a master's publisher or subscriber connection down (`master`, and the node's
/// `node` flag) at once when its task panics, rather than when the supervisor starts it
/// again: Cells and an atomic only, nothing borrowed while unwinding.
struct DownOnPanic<'a> {
    r: &'a Redis,
    master: &'a Cell<bool>,
    node: &'a Cell<bool>,
    /// A subscriber's: its pushes stop with it, so no history cache is current from the
    /// panic on (not only from the restart a second later).
    pushes: bool,
}

impl Drop for DownOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.master.set(false);
            self.node.set(false);
            self.r.update_up();
            if self.pushes {
                self.r
                    .node
                    .redis_stats
                    .history_gen
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The cluster side of one node's [`Redis`].
struct Sharded {
    r: Rc<Redis>,
    seeds: Vec<ConnectionInfo>,
    map: RefCell<SlotMap>,
    /// In the map's master order.
    masters: RefCell<Vec<Rc<Master>>>,
    next_id: Cell<u64>,
    refresh: Notify,
    /// Envelopes a master answered `MOVED` for, staged again after the next slot map.
    moved: RefCell<Vec<Out>>,
    /// Channels wanted whose slot no master owns (an uncovered cluster).
    unrouted: RefCell<HashSet<Arc<str>>>,
    push_tx: PushTx,
    /// The per-master tasks' supervisors.
    tasks: RefCell<Vec<JoinHandle<()>>>,
    /// The first slot map was taken: nothing is routed before it.
    mapped: Cell<bool>,
    mapped_now: Notify,
}

/// Aborts the per-master tasks when the bridge stops (it aborts the tasks [`start`] returns,
/// one of which holds this).
struct AbortTasks(Rc<Sharded>);

impl Drop for AbortTasks {
    fn drop(&mut self) {
        for t in self.0.tasks.borrow_mut().drain(..) {
            t.abort();
        }
    }
}

/// Start cluster mode for `r` (instead of its single-Redis publisher, subscriber, inbound and
/// canary tasks). Every task, the per-master ones too, runs under [`supervise_with`]: a
/// panic is logged, counted (`switchboard_redis_task_restarts_total`) and the task started
/// again a second later, from its beginning (a per-master task makes its connection again).
pub(super) fn start(r: Rc<Redis>) -> Vec<JoinHandle<()>> {
    let seeds: Vec<ConnectionInfo> = r
        .urls
        .iter()
        .filter_map(|u| super::tls::connection_info(u, r.node.redis_tls.as_ref()).ok())
        .collect();
    let (push_tx, rx) = mpsc::channel(INBOUND_MAX);
    let s = Rc::new(Sharded {
        r,
        seeds,
        map: RefCell::new(SlotMap::default()),
        masters: RefCell::new(Vec::new()),
        next_id: Cell::new(1),
        refresh: Notify::new(),
        moved: RefCell::new(Vec::new()),
        unrouted: RefCell::new(HashSet::new()),
        push_tx,
        tasks: RefCell::new(Vec::new()),
        mapped: Cell::new(false),
        mapped_now: Notify::new(),
    });
    // A channel is held once the master of its slot confirmed it (the node-wide set only
    // routes). Weak: the Redis clients own the cluster side.
    let weak = Rc::downgrade(&s);
    s.r.set_held_check(Box::new(move |channel| {
        weak.upgrade().is_some_and(|s| {
            s.masters
                .borrow()
                .iter()
                .any(|m| m.subs.borrow().holds(channel))
        })
    }));
    let rx = Rc::new(tokio::sync::Mutex::new(rx));
    let node = s.r.node.clone();
    let keeper = s.clone();
    vec![
        // Holds the per-master tasks' guard; never ends until aborted.
        tokio::task::spawn_local(async move {
            let _guard = AbortTasks(keeper);
            std::future::pending::<()>().await
        }),
        supervise_with("cluster command connection", node.clone(), s.clone(), |s| {
            s.command_connection()
        }),
        supervise_with("cluster inbound", node.clone(), s.clone(), move |s| {
            s.inbound(rx.clone())
        }),
        supervise_with("cluster dispatcher", node.clone(), s.clone(), |s| {
            s.dispatcher()
        }),
        supervise_with("cluster router", node.clone(), s.clone(), |s| s.router()),
        supervise_with("cluster canary", node.clone(), s.clone(), |s| s.canary()),
        supervise_with("cluster topology", node, s, |s| s.topology()),
    ]
}

impl Sharded {
    /// Run a per-master task under [`supervise_with`] (`make` makes it again after a panic).
    fn spawn<F, Fut>(self: &Rc<Self>, name: &'static str, m: &Rc<Master>, make: F)
    where
        F: Fn((Rc<Self>, Rc<Master>)) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let h = supervise_with(name, self.r.node.clone(), (self.clone(), m.clone()), make);
        let mut t = self.tasks.borrow_mut();
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    /// Wait until the first slot map is taken (nothing is routed before it).
    async fn first_map(&self) {
        while !self.mapped.get() {
            self.mapped_now.notified().await;
        }
    }

    /// Read the first slot map, then follow the cluster's topology
    /// ([`Sharded::follow_topology`]).
    async fn topology(self: Rc<Self>) {
        if !self.mapped.get() {
            self.first_topology().await;
        }
        self.follow_topology().await;
    }

    /// The first slot map, asked of the seeds until one answers (with backoff); then the
    /// tasks waiting in [`Sharded::first_map`] go on.
    async fn first_topology(self: &Rc<Self>) {
        let mut backoff = Backoff::new(
            self.r.node.cfg.redis_reconnect_max,
            u64::from(self.r.node.id) ^ 0x5eed,
        );
        loop {
            match self.fetch_map().await {
                Ok(map) => {
                    self.apply(map);
                    break;
                }
                Err(e) => {
                    self.r.log_error("cannot read the cluster's slot map", &e);
                    tokio::time::sleep(backoff.wait()).await;
                }
            }
        }
        tracing::info!(
            masters = self.masters.borrow().len(),
            "redis: cluster mode, sharded pub/sub on every master"
        );
        self.mapped.set(true);
        self.mapped_now.notify_waiters();
    }

    /// Make the cluster connection for key commands (presence, heartbeat, reaper); the crate
    /// keeps it up from then on (node connections made again, slot map refreshed).
    async fn command_connection(self: Rc<Self>) {
        let cfg = &self.r.node.cfg;
        let mut backoff = Backoff::new(cfg.redis_reconnect_max, u64::from(self.r.node.id));
        loop {
            let mut builder = redis::cluster::ClusterClientBuilder::new(self.seeds.clone());
            // rediss:// seeds: every master the client discovers is reached with TLS, checked
            // (or not, #insecure) as the seeds say, with the certificates of redis_tls_*.
            if let Some(t) = &self.r.node.redis_tls {
                builder = builder
                    .tls(if t.verify == cluster::UrlTls::Insecure {
                        redis::TlsMode::Insecure
                    } else {
                        redis::TlsMode::Secure
                    })
                    .certs(t.certs());
            }
            let client = builder
                .use_protocol(ProtocolVersion::RESP2)
                .connection_timeout(cfg.redis_timeout)
                .response_timeout(cfg.redis_timeout)
                .overall_response_timeout(Some(cfg.redis_timeout))
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(CLUSTER_RETRY_WAIT_MIN_MS)
                .max_retry_wait(CLUSTER_RETRY_WAIT_MAX_MS)
                .tcp_settings(tcp_settings(cfg.redis_timeout))
                .write_backpressure_boundary(CLIENT_WRITE_BOUNDARY)
                .build();
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    self.r.log_error("cannot configure the cluster client", &e);
                    return;
                }
            };
            match tokio::time::timeout(cfg.redis_timeout, client.get_async_connection()).await {
                Ok(Ok(c)) => {
                    *self.r.cmd_conn.borrow_mut() = Some(CmdConn::Cluster(c));
                    self.r.cmd_since.set(Some(Instant::now()));
                    self.r.resync_owed.set(true);
                    self.r.cmd_conn_new.notify_one();
                    return;
                }
                Ok(Err(e)) => self.r.log_error("cannot connect to the cluster", &e),
                Err(_) => self.r.log_error(
                    "cannot connect to the cluster",
                    &"timed out (redis_timeout)",
                ),
            }
            tokio::time::sleep(backoff.wait()).await;
        }
    }

    /// `CLUSTER SLOTS` from the first known master or seed that answers.
    async fn fetch_map(&self) -> RedisResult<SlotMap> {
        let timeout = self.r.node.cfg.redis_timeout;
        let mut infos: Vec<ConnectionInfo> = self
            .masters
            .borrow()
            .iter()
            .filter(|m| m.pub_up.get())
            .map(|m| m.info.clone())
            .collect();
        infos.extend(self.seeds.iter().cloned());
        let mut last: Option<RedisError> = None;
        for info in infos {
            let host = super::tls::host_of(info.addr());
            let asked = tokio::time::timeout(timeout, async {
                let mut c = connect_node(&self.r, &info, None).await?;
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut c)
                    .await
            })
            .await;
            match asked {
                Ok(Ok(v)) => match SlotMap::from_cluster_slots(&v, &host) {
                    Ok(m) if m.covered() > 0 => return Ok(m),
                    Ok(_) => last = Some((ErrorKind::Client, "no slot assigned").into()),
                    Err(e) => last = Some((ErrorKind::Client, "CLUSTER SLOTS", e).into()),
                },
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(super::timed_out()),
            }
        }
        Err(last.unwrap_or_else(|| (ErrorKind::Client, "no seed").into()))
    }

    /// Read the slot map again when asked (or every [`TOPOLOGY_REFRESH_INTERVAL`]).
    async fn follow_topology(self: &Rc<Self>) {
        let mut tick = tokio::time::interval(TOPOLOGY_REFRESH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.refresh.notified() => {}
            }
            match self.fetch_map().await {
                Ok(map) => self.apply(map),
                Err(e) => self.r.log_error("cannot read the cluster's slot map", &e),
            }
            let moved: Vec<Out> = self.moved.borrow_mut().drain(..).collect();
            if !moved.is_empty() {
                self.r.staged.set(self.r.staged.get() - moved.len());
                self.stage(moved);
            }
            tokio::time::sleep(TOPOLOGY_REFRESH_MIN).await;
        }
    }

    /// Take a new slot map: masters added and retired, channels and staged envelopes moved to
    /// the masters of their slots, each master's canary channel chosen again.
    fn apply(self: &Rc<Self>, map: SlotMap) {
        if *self.map.borrow() == map {
            return;
        }
        let old: Vec<Rc<Master>> = self.masters.borrow().clone();
        // Every master's connection info first: a map naming an unusable address is not
        // taken (and no task is started for it).
        let mut infos = Vec::with_capacity(map.masters().len());
        for addr in map.masters() {
            match self.info_for(addr) {
                Some(info) => infos.push(info),
                None => {
                    self.r
                        .log_error("a master's address is not usable", &map.masters().join(","));
                    return;
                }
            }
        }
        let mut list: Vec<Rc<Master>> = Vec::with_capacity(map.masters().len());
        // New masters' tasks start once the new map and list are stored (below): a panic
        // before that leaves no task of a master that no list holds.
        let mut fresh: Vec<Rc<Master>> = Vec::new();
        for (addr, info) in map.masters().iter().zip(infos) {
            if let Some(m) = old.iter().find(|m| &m.addr == addr) {
                list.push(m.clone());
                continue;
            }
            let id = self.next_id.get();
            self.next_id.set(id + 1);
            let m = Rc::new(Master::new(id, addr.clone(), info));
            fresh.push(m.clone());
            list.push(m);
        }
        tracing::info!(
            masters = %map.masters().join(","),
            "redis: the cluster's slot map changed"
        );
        for m in &old {
            if let Some(c) = m.canary.borrow_mut().take() {
                m.subs.borrow_mut().forget(&c);
            }
        }
        let index = |m: &Rc<Master>| list.iter().position(|x| Rc::ptr_eq(x, m));
        for m in &old {
            let mine = index(m);
            if mine.is_none() {
                m.retired.set(true);
                m.pub_up.set(false);
                m.sub_up.set(false);
            }
            // Channels of slots this master lost: Redis let go of them (a sunsubscribe push);
            // the new owner subscribes them.
            let away: Vec<Arc<str>> = m
                .subs
                .borrow()
                .desired()
                .filter(|c| map.owner_of(c) != mine)
                .cloned()
                .collect();
            for c in away {
                self.r.history_unsubscribing(std::slice::from_ref(&c));
                m.subs.borrow_mut().forget(&c);
                match map.owner_of(&c) {
                    Some(o) => list[o].subs.borrow_mut().set(c, true),
                    None => {
                        self.unrouted.borrow_mut().insert(c);
                    }
                }
            }
            let staged: Vec<Out> = m.queue.borrow_mut().drain(..).collect();
            if !staged.is_empty() {
                let (per, none) = map.group(staged, |o| &o.channel);
                for (o, v) in per.into_iter().enumerate() {
                    list[o].queue.borrow_mut().extend(v);
                }
                self.drop_unroutable(none.len());
            }
        }
        let unrouted: Vec<Arc<str>> = self.unrouted.borrow_mut().drain().collect();
        for c in unrouted {
            match map.owner_of(&c) {
                Some(o) => list[o].subs.borrow_mut().set(c, true),
                None => {
                    self.unrouted.borrow_mut().insert(c);
                }
            }
        }
        let now = Instant::now();
        for (i, m) in list.iter().enumerate() {
            let c = cluster::canary_channel(&self.r.node.cfg.redis_prefix, self.r.node.id, &map, i);
            if let Some(c) = &c {
                m.subs.borrow_mut().set(c.clone(), true);
            }
            *m.canary.borrow_mut() = c;
            m.canary_sent.set(None);
            m.canary_back.set(now);
        }
        *self.map.borrow_mut() = map;
        *self.masters.borrow_mut() = list;
        for m in &fresh {
            self.spawn("cluster publisher", m, |(s, m)| s.publisher(m));
            self.spawn("cluster subscriber", m, |(s, m)| s.subscriber(m));
        }
        for m in old.iter().chain(self.masters.borrow().iter()) {
            m.wake_pub.notify_one();
            m.wake_sub.notify_one();
            if m.retired.get() {
                m.lose(m.sub_gen.get());
            }
        }
        self.update_up();
    }

    /// The connection info of master `addr`: the first seed's (credentials, database, TLS
    /// and its certificates) at that address.
    fn info_for(&self, addr: &str) -> Option<ConnectionInfo> {
        let (host, port) = addr.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let seed = self.seeds.first()?;
        Some(super::tls::at_addr(seed, host.to_owned(), port))
    }

    fn drop_unroutable(&self, n: usize) {
        if n > 0 {
            self.r.staged.set(self.r.staged.get() - n);
            self.r
                .node
                .redis_stats
                .publish_failed
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Stage envelopes (already counted in `staged`) on the masters of their channels.
    fn stage(&self, items: Vec<Out>) {
        let n = items.len();
        let (per, none) = self.map.borrow().group(items, |o| &o.channel);
        self.r.staged.set(self.r.staged.get() + n);
        let masters = self.masters.borrow();
        for (m, v) in per.into_iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            masters[m].queue.borrow_mut().extend(v);
            masters[m].wake_pub.notify_one();
        }
        self.drop_unroutable(none.len());
        self.gauge_queued();
    }

    fn gauge_queued(&self) {
        let n = self.r.queue.borrow().len() + self.r.staged.get();
        self.r
            .node
            .redis_stats
            .queued
            .store(n as u64, Ordering::Relaxed);
    }

    /// Move what [`Redis::publish`] queues to the masters' staging queues.
    async fn dispatcher(self: Rc<Self>) {
        self.first_map().await;
        loop {
            if self.r.queue.borrow().is_empty() {
                self.r.wake_pub.notified().await;
                continue;
            }
            let items: Vec<Out> = self.r.queue.borrow_mut().drain(..).collect();
            self.stage(items);
        }
    }

    /// Hand the node's wanted channels ([`Redis`]'s subscription set) to the masters of their
    /// slots.
    async fn router(self: Rc<Self>) {
        self.first_map().await;
        self.route_all();
        loop {
            let c = self.r.subs.borrow_mut().changes(usize::MAX);
            if c.is_empty() {
                self.r.wake_sub.notified().await;
                continue;
            }
            {
                let mut s = self.r.subs.borrow_mut();
                s.confirm(&c);
                self.r
                    .node
                    .redis_stats
                    .subs_expected
                    .store(s.expected() as u64, Ordering::Relaxed);
            }
            let map = self.map.borrow();
            let masters = self.masters.borrow();
            for ch in c.unsubscribe {
                self.unrouted.borrow_mut().remove(&ch);
                for m in masters.iter() {
                    let mut s = m.subs.borrow_mut();
                    if s.wants(&ch) {
                        s.set(ch.clone(), false);
                        m.wake_sub.notify_one();
                    }
                }
            }
            for ch in c.subscribe {
                match map.owner_of(&ch) {
                    Some(o) => {
                        masters[o].subs.borrow_mut().set(ch, true);
                        masters[o].wake_sub.notify_one();
                    }
                    None => {
                        self.unrouted.borrow_mut().insert(ch);
                    }
                }
            }
        }
    }

    /// Route every channel the node wants to the master of its slot, and take from the
    /// masters (and the unrouted set) the ones it does not want, their canaries aside: what a
    /// router that panicked between taking a batch of changes and routing them left undone.
    /// Run as the router starts (the first time it finds nothing to do that its first batch
    /// would not do anyway; every step is idempotent).
    fn route_all(&self) {
        let want: HashSet<Arc<str>> = self.r.subs.borrow().desired().cloned().collect();
        let map = self.map.borrow();
        let masters = self.masters.borrow();
        self.unrouted.borrow_mut().retain(|c| want.contains(c));
        for m in masters.iter() {
            let canary = m.canary.borrow().clone();
            let unwanted: Vec<Arc<str>> = m
                .subs
                .borrow()
                .desired()
                .filter(|c| !want.contains(*c) && canary.as_ref() != Some(*c))
                .cloned()
                .collect();
            let mut s = m.subs.borrow_mut();
            for c in unwanted {
                s.set(c, false);
            }
        }
        for c in want {
            match map.owner_of(&c) {
                Some(o) => masters[o].subs.borrow_mut().set(c, true),
                None => {
                    self.unrouted.borrow_mut().insert(c);
                }
            }
        }
        for m in masters.iter() {
            m.wake_sub.notify_one();
        }
    }

    /// One master's publisher: its staged envelopes as pipelines of `SPUBLISH`, one in flight.
    async fn publisher(self: Rc<Self>, m: Rc<Master>) {
        let stats = &self.r.node.redis_stats;
        let timeout = self.r.node.cfg.redis_timeout;
        let mut backoff = Backoff::new(
            self.r.node.cfg.redis_reconnect_max,
            u64::from(self.r.node.id) ^ m.id.rotate_left(32),
        );
        let mut first = true;
        let mut batch: Vec<Out> = Vec::with_capacity(PIPELINE_MAX);
        // A panic takes the connection (and the batch in flight, unanswered) with the task,
        // which the supervisor starts again.
        let _down = DownOnPanic {
            r: &self.r,
            master: &m.pub_up,
            node: &self.r.pub_up,
            pushes: false,
        };
        while !m.retired.get() {
            let mut conn = match connect_node(&self.r, &m.info, None).await {
                Ok(c) => c,
                Err(e) => {
                    self.r
                        .log_error("cannot connect the publisher to a master", &e);
                    tokio::time::sleep(backoff.wait()).await;
                    continue;
                }
            };
            if !first {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(master = %m.addr, "redis: publisher connected to the master again");
                // The master may have restarted empty: hold this node's presence again, and
                // reap no one until the others have renewed their keys there.
                self.r.resync_owed.set(true);
                self.r.cmd_since.set(Some(Instant::now()));
                self.r.cmd_conn_new.notify_one();
            }
            first = false;
            backoff.reset();
            m.pub_up.set(true);
            self.update_up();
            loop {
                if m.retired.get() {
                    return;
                }
                if m.queue.borrow().is_empty() && m.canary_out.borrow().is_none() {
                    m.wake_pub.notified().await;
                    continue;
                }
                batch.extend(m.canary_out.borrow_mut().take());
                let canaries = batch.len();
                {
                    let mut q = m.queue.borrow_mut();
                    let n = q.len().min(PIPELINE_MAX);
                    batch.extend(q.drain(..n));
                    self.r.staged.set(self.r.staged.get() - n);
                }
                self.gauge_queued();
                let mut pipe = redis::pipe();
                for o in &batch {
                    pipe.cmd("SPUBLISH").arg(&*o.channel).arg(&o.payload[..]);
                }
                let r =
                    tokio::time::timeout(timeout, conn.req_packed_commands(&pipe, 0, batch.len()))
                        .await;
                let n = (batch.len() - canaries) as u64;
                match r {
                    Ok(Ok(values)) if values.len() == batch.len() => {
                        let (mut ok, mut failed) = (0u64, 0u64);
                        let mut moved = Vec::new();
                        let mut refused = None;
                        for (i, (o, v)) in batch.drain(..).zip(values).enumerate() {
                            let message = i >= canaries;
                            match v {
                                Value::ServerError(e) => {
                                    if matches!(
                                        e.kind(),
                                        Some(redis::ServerErrorKind::Moved)
                                            | Some(redis::ServerErrorKind::Ask)
                                    ) {
                                        if message {
                                            moved.push(o);
                                        }
                                    } else {
                                        failed += u64::from(message);
                                        Out::failed(std::slice::from_ref(&o));
                                        refused = Some(e);
                                    }
                                }
                                _ => ok += u64::from(message),
                            }
                        }
                        stats.published.fetch_add(ok, Ordering::Relaxed);
                        stats.publish_failed.fetch_add(failed, Ordering::Relaxed);
                        if let Some(e) = refused {
                            self.r.log_error("a master refused SPUBLISH", &e);
                        }
                        if !moved.is_empty() {
                            self.r.staged.set(self.r.staged.get() + moved.len());
                            self.moved.borrow_mut().extend(moved);
                            self.refresh.notify_one();
                        }
                    }
                    Ok(Ok(_)) => {
                        Out::failed(&batch);
                        batch.clear();
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.r
                            .log_error("publish failed", &"a reply per SPUBLISH expected");
                        break;
                    }
                    Ok(Err(e)) => {
                        Out::failed(&batch);
                        batch.clear();
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.r.log_error("publish failed", &e);
                        break;
                    }
                    Err(_) => {
                        Out::failed(&batch);
                        batch.clear();
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.r
                            .log_error("publish failed", &"timed out (redis_timeout)");
                        break;
                    }
                }
            }
            m.pub_up.set(false);
            self.update_up();
            tokio::time::sleep(backoff.wait()).await;
        }
    }

    /// One master's subscriber connection, holding the channels of its slots.
    async fn subscriber(self: Rc<Self>, m: Rc<Master>) {
        let stats = &self.r.node.redis_stats;
        let timeout = self.r.node.cfg.redis_timeout;
        let mut backoff = Backoff::new(
            self.r.node.cfg.redis_reconnect_max,
            u64::from(self.r.node.id).rotate_left(17) ^ m.id,
        );
        let mut first = true;
        // A panic takes the connection with the task, which the supervisor starts again: a
        // new generation then, so that nothing the old one's pushes left queued (its
        // disconnection) touches the next, and no history cache is current (pushes were
        // lost).
        let _down = DownOnPanic {
            r: &self.r,
            master: &m.sub_up,
            node: &self.r.sub_up,
            pushes: true,
        };
        if m.sub_gen.get() > 0 {
            self.r.history_lost();
        }
        m.sub_gen.set(m.sub_gen.get() + 1);
        while !m.retired.get() {
            let gen = m.sub_gen.get();
            let push = Some((self.push_tx.clone(), m.id, gen));
            let conn = match connect_node(&self.r, &m.info, push).await {
                Ok(c) => c,
                Err(e) => {
                    m.sub_gen.set(gen + 1);
                    self.r
                        .log_error("cannot connect the subscriber to a master", &e);
                    tokio::time::sleep(backoff.wait()).await;
                    continue;
                }
            };
            if !first {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            let first_connection = first;
            first = false;
            backoff.reset();
            m.subs.borrow_mut().reset();
            self.gauge_held();
            let mut subscribed_all = false;
            'conn: loop {
                if m.retired.get() {
                    break 'conn;
                }
                loop {
                    let c = m.subs.borrow_mut().changes(SUBSCRIBE_BATCH_MAX);
                    if c.is_empty() {
                        break;
                    }
                    self.r.history_unsubscribing(&c.unsubscribe);
                    match tokio::time::timeout(timeout, sharded_changes(&conn, &c)).await {
                        Err(_) => {
                            m.subs.borrow_mut().failed(&c);
                            self.r
                                .log_error("subscribe failed", &"timed out (redis_timeout)");
                            break 'conn;
                        }
                        Ok(out) => {
                            {
                                let mut s = m.subs.borrow_mut();
                                s.confirm(&out.done);
                                s.failed(&out.refused);
                            }
                            self.r.history_subscribed(&out.done.subscribe);
                            self.gauge_held();
                            if self.r.node.faults.subscriber_panic(&out.done.subscribe) {
                                panic!("fault injected: subscriber_panic_on");
                            }
                            if let Some(e) = out.broken {
                                self.r.log_error("subscribe failed", &e);
                                break 'conn;
                            }
                            if let Some(e) = out.error {
                                // MOVED (the slot map is behind) or CLUSTERDOWN: a new map,
                                // then again on this connection.
                                self.r.log_error("a master refused SSUBSCRIBE", &e);
                                self.refresh.notify_one();
                                tokio::select! {
                                    _ = tokio::time::sleep(SUBSCRIBE_RETRY) => {}
                                    _ = m.lost.notified() => if m.lost_gen.get() == gen || m.retired.get() {
                                        break 'conn;
                                    },
                                }
                            }
                        }
                    }
                }
                if !subscribed_all {
                    subscribed_all = true;
                    m.canary_back.set(Instant::now());
                    m.canary_sent.set(None);
                    m.sub_up.set(true);
                    self.update_up();
                    if !first_connection {
                        tracing::info!(
                            master = %m.addr,
                            channels = m.subs.borrow().held(),
                            "redis: subscriber connected to the master again, its channels subscribed again"
                        );
                    }
                }
                tokio::select! {
                    _ = m.wake_sub.notified() => {}
                    _ = m.lost.notified() => if m.lost_gen.get() == gen || m.retired.get() {
                        break 'conn;
                    },
                }
            }
            m.sub_gen.set(gen + 1);
            m.sub_up.set(false);
            // Pushes of this master may have been lost: no history cache is current.
            self.r.history_lost();
            self.update_up();
            drop(conn);
            if !m.retired.get() {
                tokio::time::sleep(backoff.wait()).await;
            }
        }
    }

    /// What the masters' subscriber connections receive: envelopes to this node's shards,
    /// canaries to their master, a slot's `sunsubscribe` to a new slot map.
    async fn inbound(
        self: Rc<Self>,
        rx: Rc<tokio::sync::Mutex<mpsc::Receiver<(u64, u64, PushInfo)>>>,
    ) {
        let stats = &self.r.node.redis_stats;
        let mut rx = rx.lock().await;
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            for (id, gen, push) in batch.drain(..) {
                stats
                    .inbound_bytes
                    .fetch_sub(super::push_bytes(&push) as u64, Ordering::Relaxed);
                let Some(m) = self.master(id) else {
                    continue;
                };
                if gen != m.sub_gen.get() {
                    continue;
                }
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        // [channel, payload]
                        let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) =
                            (push.data.first(), push.data.get(1))
                        else {
                            stats.malformed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        if m.is_canary(ch) {
                            self.canary_back(&m, payload);
                        } else {
                            // Another node's bytes: a bug they trigger costs that envelope
                            // (counted), never the inbound path.
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                self.r.received_envelope(payload)
                            }));
                            if r.is_err() {
                                stats.malformed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    PushKind::SUnsubscribe => {
                        let Some(Value::BulkString(ch)) = push.data.first() else {
                            continue;
                        };
                        let Ok(ch) = std::str::from_utf8(ch) else {
                            continue;
                        };
                        let ch: Arc<str> = ch.into();
                        let mut s = m.subs.borrow_mut();
                        if s.wants(&ch) {
                            // Not asked for: the slot moved to another master (a room's
                            // history cache stops answering until it is held again).
                            s.lost(&ch);
                            drop(s);
                            self.r.history_unsubscribing(std::slice::from_ref(&ch));
                            self.gauge_held();
                            self.refresh.notify_one();
                        }
                    }
                    PushKind::Disconnection => m.lose(gen),
                    _ => {}
                }
            }
        }
    }

    fn master(&self, id: u64) -> Option<Rc<Master>> {
        self.masters.borrow().iter().find(|m| m.id == id).cloned()
    }

    fn canary_back(&self, m: &Master, payload: &[u8]) {
        let stats = &self.r.node.redis_stats;
        let Ok(Inbound::Canary { origin, nonce }) = cluster::decode(payload) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if origin != self.r.node.id {
            return;
        }
        let now = Instant::now();
        if let Some((n, at)) = m.canary_sent.get() {
            if n == nonce {
                stats
                    .canary_rtt_us
                    .store(now.duration_since(at).as_micros() as u64, Ordering::Relaxed);
                m.canary_sent.set(None);
            }
        }
        m.canary_back.set(now);
        if m.deaf.replace(false) {
            tracing::info!(master = %m.addr, "redis: the canary is back; the master's subscription delivers again");
            self.update_up();
        }
    }

    /// A canary on every master every `redis_canary_interval`; one not back in
    /// `redis_canary_timeout` makes that master's subscriber connection be made again.
    async fn canary(self: Rc<Self>) {
        self.first_map().await;
        let cfg = &self.r.node.cfg;
        let mut tick = tokio::time::interval(cfg.redis_canary_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let masters = self.masters.borrow().clone();
            let now = Instant::now();
            for m in &masters {
                if !(m.pub_up.get() && m.sub_up.get()) {
                    continue;
                }
                let Some(channel) = m.canary.borrow().clone() else {
                    m.deaf.set(true);
                    continue;
                };
                if now.duration_since(m.canary_back.get()) > cfg.redis_canary_timeout {
                    self.r
                        .node
                        .redis_stats
                        .canary_missed
                        .fetch_add(1, Ordering::Relaxed);
                    if !m.deaf.replace(true) {
                        tracing::warn!(
                            master = %m.addr,
                            timeout = ?cfg.redis_canary_timeout,
                            "redis: no canary came back from a master; its subscriber connection delivers nothing: subscribing again on a new one"
                        );
                    }
                    m.canary_back.set(now);
                    m.canary_sent.set(None);
                    m.lose(m.sub_gen.get());
                    continue;
                }
                if m.canary_sent.get().is_none() {
                    let nonce = m.canary_nonce.get() + 1;
                    m.canary_nonce.set(nonce);
                    m.canary_sent.set(Some((nonce, now)));
                    *m.canary_out.borrow_mut() = Some(Out {
                        _held: None,
                        span: None,
                        channel,
                        payload: cluster::encode_canary(self.r.node.id, nonce),
                    });
                    m.wake_pub.notify_one();
                }
            }
            self.update_up();
        }
    }

    /// [`Redis`]'s readiness from every master's: up while every master's publisher and
    /// subscriber are up and no master's canary is late.
    fn update_up(&self) {
        let masters = self.masters.borrow();
        let all = |f: &dyn Fn(&Master) -> bool| !masters.is_empty() && masters.iter().all(|m| f(m));
        self.r.pub_up.set(all(&|m| m.pub_up.get()));
        self.r.sub_up.set(all(&|m| m.sub_up.get()));
        self.r.deaf.set(masters.iter().any(|m| m.deaf.get()));
        self.r.update_up();
    }

    /// Channels the masters confirmed (canary channels not counted: they are not the node's).
    fn gauge_held(&self) {
        let held: usize = self
            .masters
            .borrow()
            .iter()
            .map(|m| {
                let s = m.subs.borrow();
                let canary = m.canary.borrow();
                s.held() - usize::from(canary.as_ref().is_some_and(|c| s.holds(c)))
            })
            .sum();
        self.r
            .node
            .redis_stats
            .subs_held
            .store(held as u64, Ordering::Relaxed);
    }
}

/// What one round of sharded (un)subscribes did.
#[derive(Default)]
struct ShardedOutcome {
    done: Changes,
    /// Refused by the master (MOVED, CLUSTERDOWN): tried again.
    refused: Changes,
    /// The first refusal.
    error: Option<RedisError>,
    /// The connection failed.
    broken: Option<RedisError>,
}

/// Send `c` to one master in one pipeline of one `SSUBSCRIBE` or `SUNSUBSCRIBE` per channel
/// (one confirmation per command, and no `CROSSSLOT`: sharded subscribe takes several channels
/// only of one slot). A refused unsubscribe counts as done (the master does not hold the
/// channel for this node).
async fn sharded_changes(conn: &MultiplexedConnection, c: &Changes) -> ShardedOutcome {
    let mut pipe = redis::pipe();
    for ch in &c.subscribe {
        pipe.cmd("SSUBSCRIBE").arg(&**ch);
    }
    for ch in &c.unsubscribe {
        pipe.cmd("SUNSUBSCRIBE").arg(&**ch);
    }
    let n = c.subscribe.len() + c.unsubscribe.len();
    let mut out = ShardedOutcome::default();
    let mut conn = conn.clone();
    match conn.req_packed_commands(&pipe, 0, n).await {
        Ok(values) if values.len() == n => {
            for (ch, v) in c.subscribe.iter().zip(&values) {
                match v {
                    Value::ServerError(e) => {
                        out.refused.subscribe.push(ch.clone());
                        if out.error.is_none() {
                            out.error = Some(e.clone().into());
                        }
                    }
                    _ => out.done.subscribe.push(ch.clone()),
                }
            }
            out.done.unsubscribe.extend(c.unsubscribe.iter().cloned());
        }
        Ok(_) => {
            out.refused = Changes {
                subscribe: c.subscribe.clone(),
                unsubscribe: c.unsubscribe.clone(),
            };
            out.broken = Some((ErrorKind::Client, "a confirmation per channel expected").into());
        }
        Err(e) => {
            out.refused = Changes {
                subscribe: c.subscribe.clone(),
                unsubscribe: c.unsubscribe.clone(),
            };
            out.broken = Some(e);
        }
    }
    out
}

/// The TCP options of every Redis connection (as [`Redis::connect`] sets them).
fn tcp_settings(timeout: Duration) -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_user_timeout(timeout)
        .set_keepalive(
            socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(2))
                .with_retries(3),
        )
}

/// A connection to one master with every client option set as [`Redis::connect`] sets them;
/// with `push`, RESP3 with every push handed to that channel tagged with the master's id and
/// the connection's generation.
async fn connect_node(
    r: &Redis,
    info: &ConnectionInfo,
    push: Option<(PushTx, u64, u64)>,
) -> RedisResult<MultiplexedConnection> {
    let cfg = &r.node.cfg;
    let protocol = if push.is_some() {
        ProtocolVersion::RESP3
    } else {
        ProtocolVersion::RESP2
    };
    let settings = info.redis_settings().clone().set_protocol(protocol);
    let info = info
        .clone()
        .set_redis_settings(settings)
        .set_tcp_settings(tcp_settings(cfg.redis_timeout));
    let client = redis::Client::open(info)?;
    let mut conf = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cfg.redis_timeout))
        .set_response_timeout(Some(cfg.redis_timeout))
        .set_pipeline_buffer_size(CLIENT_PIPELINE_BUFFER)
        .set_write_backpressure_boundary(CLIENT_WRITE_BOUNDARY);
    if let Some((tx, id, gen)) = push {
        let node = r.node.clone();
        conf = conf.set_push_sender(move |p: PushInfo| -> Result<(), ()> {
            let n = super::push_bytes(&p);
            let admitted = super::inbound_admit(&node.redis_stats, n);
            if !admitted || tx.try_send((id, gen, p)).is_err() {
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
    client
        .get_multiplexed_async_connection_with_config(&conf)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_routed_by_their_key_and_scripts_by_their_first_key() {
        let eval = {
            let mut c = redis::cmd("EVAL");
            c.arg("return 1")
                .arg(1)
                .arg("sb:{user:alice}:nodes")
                .arg("0000000a");
            c
        };
        assert_eq!(command_slot(&eval), Some(cluster::slot(b"{user:alice}")));
        let mut c = redis::cmd("SADD");
        c.arg("sb:{node:0000000a}:users").arg("alice");
        assert_eq!(command_slot(&c), Some(cluster::slot(b"node:0000000a")));
        let mut c = redis::cmd("HGETALL");
        c.arg("sb:stats");
        assert_eq!(command_slot(&c), Some(cluster::slot(b"sb:stats")));
        let mut keyless = redis::cmd("EVAL");
        keyless.arg("return 1").arg(0);
        assert_eq!(command_slot(&keyless), None);
        assert_eq!(command_slot(&redis::cmd("PING")), None);
    }

    #[test]
    fn only_known_one_key_commands_and_scripts_with_keys_have_a_slot() {
        // SCRIPT LOAD fans out to every master: never grouped by its "LOAD" argument.
        let mut c = redis::cmd("SCRIPT");
        c.arg("LOAD").arg("return 1");
        assert_eq!(command_slot(&c), None);
        let mut c = redis::cmd("PUBLISH");
        c.arg("sb:{room:a}").arg("x");
        assert_eq!(command_slot(&c), None);
        let mut c = redis::cmd("spublish");
        c.arg("sb:{room:a}").arg("x");
        assert_eq!(command_slot(&c), Some(cluster::slot(b"room:a")));
        let mut c = redis::cmd("EVALSHA");
        c.arg("abc")
            .arg(2)
            .arg("sb:{room:a}:h")
            .arg("sb:{room:a}:m");
        assert_eq!(command_slot(&c), Some(cluster::slot(b"room:a")));
        let mut c = redis::cmd("EVAL");
        c.arg("return 1").arg("x").arg("k");
        assert_eq!(command_slot(&c), None);
    }

    fn run(slot: Option<u16>, idx: &[usize]) -> Run {
        Run {
            slot,
            idx: idx.to_vec(),
        }
    }

    #[test]
    fn a_pipeline_splits_into_runs_of_one_slot_in_order() {
        // The presence pipeline: script on a user's set, SADD on the node's set, per user.
        let slots = [Some(5), Some(9), Some(7), Some(9), None, Some(5), None];
        assert_eq!(
            runs_by_slot(&slots),
            vec![
                run(Some(5), &[0, 5]),
                run(Some(9), &[1, 3]),
                run(Some(7), &[2]),
                run(None, &[4]),
                run(None, &[6]),
            ]
        );
        assert!(runs_by_slot(&[]).is_empty());
        // A batch of 256 SADD to one slot is one run of 256, in order.
        let one = vec![Some(42u16); 256];
        let runs = runs_by_slot(&one);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].idx, (0..256).collect::<Vec<_>>());
    }

    fn int(n: i64) -> Value {
        Value::Int(n)
    }

    fn io_error() -> RedisError {
        RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    }

    #[test]
    fn replies_merge_back_into_pipeline_order() {
        let runs = runs_by_slot(&[Some(1), Some(2), Some(1), None, Some(2)]);
        let replies = vec![
            Ok(vec![int(10), int(12)]),
            Ok(vec![int(11), int(14)]),
            Ok(vec![int(13)]),
        ];
        assert_eq!(
            merge_runs(5, &runs, replies).unwrap(),
            vec![int(10), int(11), int(12), int(13), int(14)]
        );
        assert_eq!(merge_runs(0, &[], vec![]).unwrap(), Vec::<Value>::new());
    }

    #[test]
    fn a_failed_slot_leaves_error_values_in_its_positions_only() {
        let runs = runs_by_slot(&[Some(1), Some(2), Some(1), Some(2)]);
        let moved: RedisError = redis::parse_redis_value(b"-MOVED 3999 127.0.0.1:6381\r\n")
            .unwrap()
            .extract_error()
            .unwrap_err();
        let replies = vec![Ok(vec![int(1), int(3)]), Err(moved)];
        let v = merge_runs(4, &runs, replies).unwrap();
        assert_eq!(v[0], int(1));
        assert_eq!(v[2], int(3));
        for i in [1, 3] {
            match &v[i] {
                Value::ServerError(e) => {
                    assert_eq!(e.kind(), Some(redis::ServerErrorKind::Moved));
                }
                other => panic!("not an error: {other:?}"),
            }
        }
        // A client-side failure (I/O) is a SLOTFAILED error naming it.
        let replies = vec![Err(io_error()), Ok(vec![int(2), int(4)])];
        let v = merge_runs(4, &runs, replies).unwrap();
        assert_eq!((&v[1], &v[3]), (&int(2), &int(4)));
        match &v[0] {
            Value::ServerError(e) => {
                assert_eq!(e.code(), "SLOTFAILED");
                assert!(e.details().unwrap_or("").contains("reset"));
            }
            other => panic!("not an error: {other:?}"),
        }
        assert_eq!(v[0], v[2]);
        // A wrong number of replies fails that run only.
        let replies = vec![Ok(vec![int(1)]), Ok(vec![int(2), int(4)])];
        let v = merge_runs(4, &runs, replies).unwrap();
        assert!(matches!(v[0], Value::ServerError(_)));
        assert!(matches!(v[2], Value::ServerError(_)));
        assert_eq!((&v[1], &v[3]), (&int(2), &int(4)));
    }

    #[test]
    fn every_slot_failed_fails_the_pipeline_with_the_first_error() {
        let runs = runs_by_slot(&[Some(1), Some(2)]);
        let replies = vec![
            Err(io_error()),
            Err(RedisError::from((ErrorKind::Client, "other"))),
        ];
        let e = merge_runs(2, &runs, replies).unwrap_err();
        assert!(e.is_io_error());
        let runs = runs_by_slot(&[Some(1)]);
        assert!(merge_runs(1, &runs, vec![Err(io_error())])
            .unwrap_err()
            .is_io_error());
    }

    #[test]
    fn callers_see_a_failed_slot_as_their_pipeline_options_say() {
        // Without ignore_errors (presence, heartbeat, resync, dedup): the pipeline fails, as
        // before. With ignore_errors (history): per command.
        let runs = runs_by_slot(&[Some(1), Some(2)]);
        let merged = || merge_runs(2, &runs, vec![Ok(vec![int(1)]), Err(io_error())]).unwrap();
        let mut strict = redis::pipe();
        strict
            .cmd("SADD")
            .arg("a")
            .arg("x")
            .cmd("SADD")
            .arg("b")
            .arg("y")
            .ignore();
        let mut c = MockConn(merged());
        assert!(block_on(strict.query_async::<Vec<i64>>(&mut c)).is_err());
        let mut lenient = redis::pipe();
        lenient
            .ignore_errors()
            .cmd("SADD")
            .arg("a")
            .arg("x")
            .cmd("SADD")
            .arg("b")
            .arg("y");
        let mut c = MockConn(merged());
        let v = block_on(lenient.query_async::<Vec<Value>>(&mut c)).unwrap();
        assert_eq!(v[0], int(1));
        assert!(matches!(v[1], Value::ServerError(_)));
    }

    /// A connection that answers every pipeline with the same replies.
    struct MockConn(Vec<Value>);

    impl ConnectionLike for MockConn {
        fn req_packed_command<'a>(&'a mut self, _: &'a Cmd) -> RedisFuture<'a, Value> {
            Box::pin(async { Ok(Value::Nil) })
        }
        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a Pipeline,
            _: usize,
            _: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            let v = self.0.clone();
            Box::pin(async move { Ok(v) })
        }
        fn get_db(&self) -> i64 {
            0
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}
