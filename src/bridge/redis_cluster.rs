//! Redis Cluster mode (`redis_cluster: true`): the same [`Redis`] (queue, subscription set,
//! presence, heartbeat, reaper, service messages, metrics), with sharded pub/sub and every
//! key command routed to the master of its slot. A child module of [`super`]: it reads the
//! `Redis` state directly and replaces only the publisher, subscriber, inbound and canary
//! tasks; nothing here runs for a single Redis.
//!
//! - **Commands** (presence script, heartbeat, reaper, farewell) go through one
//!   [`CmdConn::Cluster`]: the crate's cluster connection, which follows `MOVED`/`ASK` and
//!   refreshes its slot map itself. A pipeline is split by slot ([`split_pipeline`]): the
//!   commands of one slot are sent in their order, one after the other, and the slots run
//!   concurrently, so a pipeline that pairs `{user:x}:nodes` with `{node:hex}:users` (two
//!   slots) is two routed commands, never one cross-slot call. Every command here names one
//!   key, so none is refused with `CROSSSLOT`.
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

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    Arg, AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, Pipeline, ProtocolVersion,
    PushInfo, PushKind, RedisError, RedisFuture, RedisResult, Value,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Ordering, SUBSCRIBE_BATCH_MAX};
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

/// The slot of the key `cmd` names (the first argument after the name; for `EVAL`/`EVALSHA`
/// the first key after the key count), None for a command without one.
pub fn command_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(b) => Some(b),
        _ => None,
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVAL") || name.eq_ignore_ascii_case(b"EVALSHA") {
        let _script = args.next()?;
        if args.next()? == b"0" {
            return None;
        }
    }
    args.next().map(cluster::slot)
}

/// Indices `0..slots.len()` in runs of one slot each, every run in its original order (runs in
/// the order of their first command); a command without a slot is a run of its own.
pub fn runs_by_slot(slots: &[Option<u16>]) -> Vec<Vec<usize>> {
    let mut runs: Vec<(Option<u16>, Vec<usize>)> = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        match s.and_then(|s| runs.iter().position(|(r, _)| *r == Some(s))) {
            Some(r) => runs[r].1.push(i),
            None => runs.push((*s, vec![i])),
        }
    }
    runs.into_iter().map(|(_, v)| v).collect()
}

/// A (non-atomic) pipeline on a Redis Cluster: each slot's commands in order on that slot's
/// master, the slots concurrently; the replies in the pipeline's order. Fails as a whole when
/// one command fails (as a lost connection fails a pipeline on one Redis).
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
    let sent = runs.into_iter().map(|run| {
        let mut c = conn.clone();
        async move {
            let mut out = Vec::with_capacity(run.len());
            for i in run {
                out.push((i, c.req_packed_command(cmds[i]).await?));
            }
            Ok::<_, RedisError>(out)
        }
    });
    let mut values = vec![Value::Nil; cmds.len()];
    for run in join_all(sent).await {
        for (i, v) in run? {
            values[i] = v;
        }
    }
    Ok(values)
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
    tasks: RefCell<Vec<JoinHandle<()>>>,
}

/// Aborts the per-master tasks when the cluster's main task is aborted (the bridge stops).
struct AbortTasks(Rc<Sharded>);

impl Drop for AbortTasks {
    fn drop(&mut self) {
        for t in self.0.tasks.borrow_mut().drain(..) {
            t.abort();
        }
    }
}

/// Start cluster mode for `r` (instead of its single-Redis publisher, subscriber, inbound and
/// canary tasks).
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
    });
    vec![tokio::task::spawn_local(s.run(rx))]
}

impl Sharded {
    fn spawn(&self, f: impl Future<Output = ()> + 'static) {
        let mut t = self.tasks.borrow_mut();
        t.retain(|h| !h.is_finished());
        t.push(tokio::task::spawn_local(f));
    }

    async fn run(self: Rc<Self>, rx: mpsc::Receiver<(u64, u64, PushInfo)>) {
        let _guard = AbortTasks(self.clone());
        self.spawn(self.clone().command_connection());
        self.spawn(self.clone().inbound(rx));
        // The first slot map: nothing is routed before it.
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
        self.spawn(self.clone().dispatcher());
        self.spawn(self.clone().router());
        self.spawn(self.clone().canary());
        self.topology().await;
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
    async fn topology(self: &Rc<Self>) {
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
        for (addr, info) in map.masters().iter().zip(infos) {
            if let Some(m) = old.iter().find(|m| &m.addr == addr) {
                list.push(m.clone());
                continue;
            }
            let id = self.next_id.get();
            self.next_id.set(id + 1);
            let m = Rc::new(Master::new(id, addr.clone(), info));
            self.spawn(self.clone().publisher(m.clone()));
            self.spawn(self.clone().subscriber(m.clone()));
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
        for m in old.iter().chain(self.masters.borrow().iter()) {
            m.wake_pub.notify_one();
            m.wake_sub.notify_one();
            if m.retired.get() {
                m.lost.notify_one();
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
                        batch.clear();
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.r
                            .log_error("publish failed", &"a reply per SPUBLISH expected");
                        break;
                    }
                    Ok(Err(e)) => {
                        batch.clear();
                        stats.publish_failed.fetch_add(n, Ordering::Relaxed);
                        self.r.log_error("publish failed", &e);
                        break;
                    }
                    Err(_) => {
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
                                    _ = m.lost.notified() => break 'conn,
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
                    _ = m.lost.notified() => break 'conn,
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
    async fn inbound(self: Rc<Self>, mut rx: mpsc::Receiver<(u64, u64, PushInfo)>) {
        let stats = &self.r.node.redis_stats;
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            for (id, gen, push) in batch.drain(..) {
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
                            self.r.received_envelope(payload);
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
                            // Not asked for: the slot moved to another master.
                            s.lost(&ch);
                            drop(s);
                            self.gauge_held();
                            self.refresh.notify_one();
                        }
                    }
                    PushKind::Disconnection => m.lost.notify_one(),
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
                    m.lost.notify_one();
                    continue;
                }
                if m.canary_sent.get().is_none() {
                    let nonce = m.canary_nonce.get() + 1;
                    m.canary_nonce.set(nonce);
                    m.canary_sent.set(Some((nonce, now)));
                    *m.canary_out.borrow_mut() = Some(Out {
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
            if tx.try_send((id, gen, p)).is_err() {
                node.redis_stats
                    .inbound_dropped
                    .fetch_add(1, Ordering::Relaxed);
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
    fn a_pipeline_splits_into_runs_of_one_slot_in_order() {
        // The presence pipeline: script on a user's set, SADD on the node's set, per user.
        let slots = [Some(5), Some(9), Some(7), Some(9), None, Some(5), None];
        assert_eq!(
            runs_by_slot(&slots),
            vec![vec![0, 5], vec![1, 3], vec![2], vec![4], vec![6]]
        );
        assert!(runs_by_slot(&[]).is_empty());
    }
}
