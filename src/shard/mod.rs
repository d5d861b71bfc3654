//! A shard: one pinned thread, one mio `Poll`, one listener (SO_REUSEPORT), a `Slab` of
//! clients with generation-tagged tokens, a keyed timer wheel, and a bounded inbox (+ one
//! `Waker`) for messages from other shards and the bridge.
//!
//! One loop turn: poll; drain the inbox (first, so what other shards sent before the bytes
//! that woke us is applied before them); accept; read and handle frames (replies and fan-out
//! only *queue* shared frames); fire timers; close what was doomed; then flush every dirty
//! connection with `send`/`sendmsg`, many frames per call (see `flush_dirty` for
//! `write_coalesce`). Nothing here takes a lock on the message path; another shard's clients
//! are reached only through its inbox (`try_send`, counted when full, never blocking).
//!
//! Files: `read` (accept, recv, frame decoding), `write` (queues, coalescing, flush),
//! `closing`, `timers`, `tls` (TLS connections of `tls_port`, sans-IO over rustls), `deliver` (the delivery seam's execution and the inbox), `http` (the
//! plain endpoints and the upgrade), and `service/` (one module per capability, behind the
//! command table in `service/mod.rs`).

mod client;
mod closing;
mod deliver;
mod dispatch;
mod http;
mod proxy;
mod read;
pub mod service;
mod timer;
mod timers;
mod tls;
mod uring;
mod write;

use write::Outbox;

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

pub use crate::route::{ConnRef, Target};
pub use client::{flag, Client, Grants, Phase};
pub use timer::TimerKey;

use crate::auth::Verifier;
use crate::bridge::BridgeMsg;
use crate::config::Config;
use crate::directory::Directory;
use crate::limits::*;
use crate::metrics::{new_latency_histogram, CloseKind, ErrorReason, LocalStats, ShardStats};
use crate::proto::ws::{self, close};
use crate::proto::{Frame, FrameBuilder};
use crate::route::UserTable;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
/// The TLS listener (`tls_port`). Connection tokens never have all 32 high bits set (a
/// generation is never `u32::MAX`), so these three are free.
const TLS_LISTENER: Token = Token(usize::MAX - 2);

/// Ticks a closing connection waits for the peer's close reply or EOF before it is dropped.
const CLOSING_GRACE_TICKS: u32 = 20;

/// A message for a shard from another shard or the bridge: a delivery, a service's own
/// message, or control. A feature that only relays frames uses `Deliver` and adds nothing here.
pub enum ShardMsg {
    /// Deliver `frame` to this shard's recipients of `target`.
    Deliver { target: Target, frame: Frame },
    /// [`ShardMsg::Deliver`] handed on inside a traced span (a notification's `kafka.notify`,
    /// a cross-node `redis.receive`, a stored DM's `dm.send`; tracing on and the trace
    /// sampled): `span` is this shard's
    /// `shard.deliver`, which ends after the turn's socket writes. Boxed: rare, and the
    /// common variant stays small.
    Traced(Box<(Target, Frame, tracing::Span)>),
    /// A message for one service module (see `service::ServiceMsg`), boxed: service messages
    /// are the rare ones and some are large, while every inbox slot is as large as the
    /// largest variant (65,536 slots per shard, all touched when the channel is built).
    Service(Box<service::ServiceMsg>),
    /// Stop accepting and close every client with 1001 in batches.
    Drain,
}

impl ShardMsg {
    /// A service message (boxed; see [`ShardMsg::Service`]).
    pub fn service(m: service::ServiceMsg) -> ShardMsg {
        ShardMsg::Service(Box::new(m))
    }
}

/// A shard's inbox as seen by senders.
pub struct Inbox {
    pub tx: Sender<ShardMsg>,
    pub waker: Waker,
    /// Set by the first sender after the shard last drained; saves a wake syscall per message.
    pub wake_pending: AtomicBool,
}

/// Why a message could not be queued for a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFailure {
    /// The inbox is at `SHARD_INBOX_CAPACITY`: a policy decision of the caller, counted.
    Full,
    /// The shard thread has ended (it died, or the node is stopping), or this node has no
    /// such shard (an index from another node's envelope).
    Dead,
}

/// Every shard's inbox: what shards and the bridge use to reach a shard.
pub struct Inboxes(pub Vec<Inbox>, pub Arc<crate::fault::Faults>);

impl Inboxes {
    /// Queue `msg` for `shard` without blocking.
    pub fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), SendFailure> {
        self.try_send(shard, msg).map_err(|(why, _)| why)
    }

    /// [`Inboxes::send`], handing the message back when it could not be queued (to keep it
    /// for a retry).
    pub fn try_send(&self, shard: usize, msg: ShardMsg) -> Result<(), (SendFailure, ShardMsg)> {
        if matches!(msg, ShardMsg::Deliver { .. } | ShardMsg::Traced(_))
            && self.1.refuse_delivery(shard)
        {
            return Err((SendFailure::Full, msg));
        }
        // A shard index can come from another node (a connection reference in an envelope):
        // one this node does not have is a shard that is not there, never a panic.
        let Some(inbox) = self.0.get(shard) else {
            return Err((SendFailure::Dead, msg));
        };
        match inbox.tx.try_send(msg) {
            Ok(()) => {
                if !inbox.wake_pending.swap(true, Ordering::SeqCst) {
                    let _ = inbox.waker.wake();
                }
                Ok(())
            }
            Err(TrySendError::Full(m)) => Err((SendFailure::Full, m)),
            Err(TrySendError::Disconnected(m)) => Err((SendFailure::Dead, m)),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Everything the shards share, read-mostly. Built once by the server.
pub struct Node {
    /// This node's random id (in every [`ConnRef`]).
    pub id: u32,
    pub cfg: Config,
    pub dir: Directory,
    pub verifier: Option<Verifier>,
    pub inboxes: Arc<Inboxes>,
    pub stats: Vec<ShardStats>,
    pub draining: AtomicBool,
    /// Set once when a shard thread dies: the node is going down (see `server`).
    pub failed: std::sync::OnceLock<String>,
    /// False when the bridge thread could not start its runtime.
    pub bridge_healthy: Arc<AtomicBool>,
    pub bridge_tx: crate::bridge::BridgeTx,
    /// Whether other nodes may exist (`redis_url` set): deliveries that may have recipients
    /// elsewhere go to the bridge too (false: shards send the bridge store jobs only).
    pub clustered: bool,
    /// The certificates of a `rediss://` `redis_url` (read at start); None = plain TCP.
    pub redis_tls: Option<crate::bridge::redis::tls::RedisTls>,
    /// The TLS listener's certificate and counters (`tls_port`); None = no TLS listener.
    pub tls: Option<crate::tls::ServerTls>,
    /// The Redis clients' counters, kept by the bridge; with Redis configured, `up` is part
    /// of readiness.
    pub redis_stats: crate::bridge::redis::RedisStats,
    /// The message store's counters, kept by the bridge; `up` is its readiness.
    pub store_stats: crate::bridge::store::StoreStats,
    /// The Kafka clients' counters, kept by the bridge; with Kafka configured, `up` is part of
    /// readiness.
    pub kafka_stats: crate::bridge::kafka::KafkaStats,
    /// The auth service's and custom-type backends' counters, kept by the bridge.
    pub proxy_stats: crate::bridge::proxy::ProxyStats,
    /// The Eureka registration's state and counters, kept by the bridge (never part of
    /// readiness: Eureka is not needed to serve).
    pub eureka_stats: crate::bridge::eureka::EurekaStats,
    pub max_connections: u64,
    pub epoch: Instant,
    /// Behind the compatibility metric `websocket_messages_per_second` (scrapes only).
    pub message_rate: crate::metrics::MessageRate,
    pub limits: crate::doctor::Limits,
    /// Test-only fault injection ([`crate::fault`]); all off in deployments.
    pub faults: Arc<crate::fault::Faults>,
}

impl Node {
    /// Queue `msg` for `shard` without blocking; false when it could not be queued.
    pub fn send_to_shard(&self, shard: usize, msg: ShardMsg) -> bool {
        self.inboxes.send(shard, msg).is_ok()
    }

    /// µs since the node started (the clock frames are stamped with).
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Why a configured Redis does not serve the cluster now (a connection down, or the
    /// canary late); None when it does or none is configured.
    pub fn redis_degraded(&self) -> Option<&'static str> {
        let r = &self.redis_stats;
        (r.configured.load(Ordering::Relaxed) && r.up.load(Ordering::Relaxed) == 0)
            .then_some("redis unavailable")
    }

    /// /ready: not draining, no shard dead, and every configured backend up.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.failed.get().is_some() {
            Err("shard failed")
        } else if self.draining.load(Ordering::Relaxed) {
            Err("draining")
        } else if self.store_stats.up.load(Ordering::Relaxed) == 0 {
            Err("message store unavailable")
        } else if self.kafka_stats.configured.load(Ordering::Relaxed) && !self.kafka_stats.is_up() {
            Err("kafka unavailable")
        } else if self.redis_degraded().is_some() && !self.cfg.redis_ready_when_degraded {
            Err("redis unavailable")
        } else if !self.bridge_healthy.load(Ordering::Relaxed) {
            Err("backend unavailable")
        } else {
            Ok(())
        }
    }
}

/// How long an HTTP request waits for the bridge before its shard answers 503: twice
/// `store_timeout` (a queued job's wait and its call) plus 3 s; with Kafka, a DM's produced
/// lookup, its ack wait and its produced mark on top. The bridge drops an answer that would
/// come later (`durable::gave_up`), so it can never be taken for the next request's reply.
pub fn http_answer_wait(cfg: &crate::config::Config) -> Duration {
    let base = cfg.store_timeout * 2 + Duration::from_secs(3);
    let wait = if cfg.kafka_brokers.is_empty() {
        base
    } else {
        base + cfg.store_timeout * 2 + cfg.kafka_ack_timeout
    };
    // An upgrade parked for the auth service (`shard::proxy`) waits here too: the bridge's
    // own 503 at `auth_service_timeout` comes first.
    if cfg.auth_mode == crate::config::AuthMode::Service {
        wait.max(cfg.auth_service_timeout + Duration::from_secs(3))
    } else {
        wait
    }
}

/// What to do with a doomed connection once the current pass is over.
#[derive(Clone, Copy)]
enum Doom {
    /// Send a close frame with this code, then close.
    Close(u16, &'static str),
    /// Drop the socket now.
    Drop(CloseKind),
}

/// Longest reconnect delay a drained clustered node hints in its 1001 close reason.
pub const RECONNECT_HINT_MAX_MS: u64 = 2_000;

/// A per-connection delay in `0..RECONNECT_HINT_MAX_MS` (a hash of the connection and the
/// time: only needs to differ between connections).
fn reconnect_hint_ms(slot: u32, gen: u32, now_ms: u64) -> u64 {
    let mut x =
        (u64::from(slot) << 32 | u64::from(gen)) ^ now_ms.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % RECONNECT_HINT_MAX_MS
}

struct DrainState {
    queue: Vec<(u32, u32)>,
    close_by_tick: u32,
    hard_tick: u32,
    last_batch_tick: u32,
}

pub struct Shard {
    id: usize,
    node: Arc<Node>,
    poll: Poll,
    listener: Option<TcpListener>,
    accept_pending: bool,
    /// The TLS listener (`tls_port`), beside the plain one.
    tls_listener: Option<TcpListener>,
    tls_accept_pending: bool,
    /// TLS state per slot, only for TLS connections (`shard::tls`): kept off [`Client`] so a
    /// plain connection's bytes do not grow. Grows to the highest slot a TLS connection used
    /// (8 B per slot); empty on a node without `tls_port`.
    tls: Vec<Option<Box<tls::TlsConn>>>,
    /// The TLS config new connections get, and its generation (see `crate::tls`).
    tls_config: Option<(u64, Arc<rustls::ServerConfig>)>,
    /// Plaintext out of rustls, handed to the decoding (per shard; empty without `tls_port`).
    tls_plain: Vec<u8>,
    inbox: Receiver<ShardMsg>,
    clients: Slab<Client>,
    users: UserTable,
    /// Server-side subscriptions that are not rooms ([`Target::Topic`]), and per connection
    /// the topics it joined (only connections that joined one have an entry).
    topics: crate::route::TopicTable,
    topics_of: std::collections::HashMap<u32, Vec<Arc<str>>>,
    /// HTTP connections waiting for another shard's answer to a server API request (slot,
    /// generation -> keep-alive), and those whose answer arrived this turn.
    http_waiting: std::collections::HashMap<(u32, u32), bool>,
    http_resume: Vec<(u32, bool)>,
    /// Upgrades parked for the auth service's answer (also in `http_waiting`, which keeps
    /// their later bytes and times them out), and per connection its backend calls in flight
    /// (`shard::proxy`). Both bounded by the connections of the shard.
    auth_parked: std::collections::HashMap<(u32, u32), Box<proxy::Parked>>,
    rpc_in_flight: std::collections::HashMap<(u32, u32), u32>,
    next_gen: u32,
    read_buf: Vec<u8>,
    fb: FrameBuilder,
    out: Outbox,
    resume: Vec<u32>,
    /// `shard.deliver` spans of this turn's traced deliveries, ended after its writes (at
    /// most `INBOX_PER_TURN_MAX`; empty unless tracing is on).
    traced: Vec<tracing::Span>,
    wheel: timer::Wheel,
    fired: Vec<TimerKey>,
    hist: hdrhistogram::Histogram<u64>,
    /// Side tables of the service modules.
    svc: service::Services,
    /// CORS for the HTTP endpoints (`cors_origins`).
    cors: crate::http::Cors,
    /// The node's online users as `GET /api/v1/presence/online` last listed them here.
    rest_online: crate::rest::presence::Snapshot,
    drain: Option<DrainState>,
    /// Connections whose fan-out frames wait for `write_coalesce` (see [`Shard::flush_dirty`]):
    /// (due, in ms since the node started; slot; generation). A client waits in it once per
    /// deferral (it keeps DIRTY while waiting); an urgent write can leave an entry stale, which
    /// is skipped when due. Bounded by `DEFERRED_PER_CLIENT_MAX` x clients: past that, frames
    /// are written at once instead of held.
    deferred: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u32, u32)>>,
    /// Rate gate of `write_coalesce`: whether it applies now, and the start of the current
    /// measuring window (frames queued in it are counted in `out.pushed`).
    coalesce_on: bool,
    load_window_start_us: u64,
    // Clocks, refreshed once per loop turn.
    now_us: u64,
    now_ms: u64,
    now_tick: u32,
    last_stats_ms: u64,
    // Config in the units the loop uses.
    t: Timing,
    /// The io_uring backend's side (`shard::uring`); off under epoll.
    uring: uring::UringSide,
}

/// Config durations converted to ticks and floats once.
struct Timing {
    handshake: u32,
    /// `tls_handshake_timeout`.
    tls_handshake: u32,
    /// `http_keepalive_timeout`.
    keepalive: u32,
    /// Longest an HTTP request waits for its answer from another shard or the bridge: twice
    /// `store_timeout` (a queued send waits at most that for its batch, and the batch takes at
    /// most that) plus 3 s, so the bridge's own answer always comes first.
    answer_wait: u32,
    ping: u32,
    pong: u32,
    write_wait: u32,
    auth: u32,
    refresh_window_s: u32,
    grace_s: u32,
    rate: f32,
    burst: f32,
    /// `write_coalesce` in ms (0 = off).
    coalesce_ms: u32,
    /// `write_coalesce_min_rate`: frames/s that turn coalescing on (off below half).
    coalesce_min_rate: u32,
}

pub(crate) fn ticks(d: Duration) -> u32 {
    (d.as_millis() as u64)
        .div_ceil(TIMER_TICK_MS)
        .max(1)
        .min(u32::MAX as u64) as u32
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn token(slot: usize, gen: u32) -> Token {
    Token(((gen as usize) << 32) | slot)
}

impl Shard {
    pub fn new(
        id: usize,
        node: Arc<Node>,
        poll: Poll,
        listener: TcpListener,
        tls_listener: Option<TcpListener>,
        inbox: Receiver<ShardMsg>,
    ) -> io::Result<Shard> {
        let mut listener = listener;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut tls_listener = tls_listener;
        if let Some(l) = tls_listener.as_mut() {
            poll.registry()
                .register(l, TLS_LISTENER, Interest::READABLE)?;
        }
        let cfg = &node.cfg;
        let t = Timing {
            handshake: ticks(cfg.handshake_timeout),
            tls_handshake: ticks(cfg.tls_handshake_timeout),
            keepalive: ticks(cfg.http_keepalive_timeout),
            answer_wait: ticks(http_answer_wait(cfg)),
            ping: ticks(cfg.ping_interval),
            pong: ticks(cfg.pong_wait),
            write_wait: ticks(cfg.write_wait),
            auth: ticks(cfg.auth_timeout),
            refresh_window_s: cfg.token_refresh_window.as_secs() as u32,
            grace_s: cfg.token_expiry_grace.as_secs() as u32,
            rate: cfg.rate_limit_per_sec as f32,
            burst: cfg.rate_limit_burst as f32,
            coalesce_ms: cfg.write_coalesce.as_millis().min(u32::MAX as u128) as u32,
            coalesce_min_rate: cfg.write_coalesce_min_rate,
        };
        let read_buf = vec![0u8; cfg.read_buffer_size];
        let tls_plain = if tls_listener.is_some() {
            vec![0u8; cfg.read_buffer_size]
        } else {
            Vec::new()
        };
        let cors = crate::http::Cors::new(&cfg.cors_origins)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let queue_limit = cfg.send_queue_bytes_max;
        let now_us = node.now_us();
        let now_tick = (now_us / 1000 / TIMER_TICK_MS) as u32;
        Ok(Shard {
            id,
            node,
            poll,
            listener: Some(listener),
            accept_pending: false,
            tls_listener,
            tls_accept_pending: false,
            tls: Vec::new(),
            tls_config: None,
            tls_plain,
            inbox,
            clients: Slab::new(),
            users: UserTable::default(),
            topics: Default::default(),
            topics_of: Default::default(),
            http_waiting: Default::default(),
            auth_parked: Default::default(),
            rpc_in_flight: Default::default(),
            http_resume: Vec::new(),
            next_gen: 1,
            read_buf,
            fb: FrameBuilder::default(),
            out: Outbox {
                dirty: Vec::new(),
                doomed: Vec::new(),
                stats: LocalStats::default(),
                queue_limit,
                pushed: 0,
                dialect_cache: Default::default(),
                edge: std::collections::HashMap::new(),
            },
            resume: Vec::new(),
            traced: Vec::new(),
            wheel: timer::Wheel::new(now_tick),
            fired: Vec::new(),
            hist: new_latency_histogram(),
            svc: service::Services::default(),
            cors,
            rest_online: Default::default(),
            drain: None,
            deferred: std::collections::BinaryHeap::new(),
            coalesce_on: t.coalesce_min_rate == 0,
            load_window_start_us: now_us,
            now_us,
            now_ms: unix_ms(),
            now_tick,
            last_stats_ms: 0,
            t,
            uring: Default::default(),
        })
    }

    fn refresh_clock(&mut self) {
        self.now_us = self.node.now_us();
        self.now_ms = unix_ms();
        self.now_tick = (self.now_us / 1000 / TIMER_TICK_MS) as u32;
    }

    /// Shard-relative milliseconds for the rate limiter.
    fn rel_ms(&self) -> u32 {
        (self.now_us / 1000) as u32
    }

    /// Run until drained, on the configured backend (io_uring falls back to epoll, with one
    /// log line, when this thread cannot set up its ring). An error is a fault that ends the
    /// shard (the node then stops).
    pub fn run(self) -> io::Result<()> {
        if self.node.cfg.io_backend == crate::config::IoBackend::IoUring {
            match crate::io::uring::Ring::new() {
                Ok(ring) => return self.run_uring(ring),
                Err(e) => tracing::warn!(
                    shard = self.id,
                    error = %e,
                    "io_uring ring setup failed; this shard runs on epoll"
                ),
            }
        }
        self.run_epoll()
    }

    fn run_epoll(mut self) -> io::Result<()> {
        let panic_at_ms = match self.node.faults.shard_panic_after {
            Some((shard, ms)) if shard == self.id => Some(self.now_ms + ms),
            _ => None,
        };
        let mut events = Events::with_capacity(EVENTS_PER_POLL_MAX);
        loop {
            let timeout = self.wait_timeout(self.accept_pending);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.refresh_clock();
            if panic_at_ms.is_some_and(|at| self.now_ms >= at) {
                panic!("injected fault: {}=shard_panic_after", crate::fault::ENV);
            }
            self.update_rate_gate();
            // The inbox before the sockets: whatever another shard sent before the bytes that
            // woke us arrived is applied first (a call's end releases its caller's place
            // before the caller's next offer is judged, however the turn's events fell).
            self.drain_inbox();
            self.on_events(&events);
            if self.end_turn() {
                return Ok(());
            }
        }
    }

    /// How long the next wait may last: zero when this turn left work (reads to resume, a
    /// TLS accept, or `more` from the backend), else until the next held write is due, at most
    /// a timer tick.
    fn wait_timeout(&self, more: bool) -> Duration {
        if more || !self.resume.is_empty() || self.tls_accept_pending {
            Duration::ZERO
        } else if let Some(std::cmp::Reverse((due, _, _))) = self.deferred.peek() {
            let now_ms = self.node.now_us() / 1000;
            Duration::from_millis(due.saturating_sub(now_ms).min(TIMER_TICK_MS))
        } else {
            Duration::from_millis(TIMER_TICK_MS)
        }
    }

    /// mio's events of this turn: the listeners, the waker, connections on epoll.
    fn on_events(&mut self, events: &Events) {
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(),
                TLS_LISTENER => self.accept_tls(),
                WAKER => {}
                Token(t) => {
                    let slot = (t & 0xFFFF_FFFF) as u32;
                    let gen = (t >> 32) as u32;
                    if !self.live(slot, gen) {
                        continue;
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.on_readable(slot);
                    }
                    if ev.is_writable() && self.live(slot, gen) {
                        self.mark_dirty(slot);
                    }
                }
            }
        }
    }

    /// The rest of a loop turn, the same on either backend: accepts and reads left for this
    /// turn, timers, closes, the flush, stats, the drain. True when the shard is done.
    fn end_turn(&mut self) -> bool {
        if self.accept_pending {
            self.accept();
        }
        if self.tls_accept_pending {
            self.accept_tls();
        }
        for (slot, keep) in std::mem::take(&mut self.http_resume) {
            self.http_resume(slot, keep);
        }
        let resume = std::mem::take(&mut self.resume);
        for slot in &resume {
            if let Some(c) = self.clients.get_mut(*slot as usize) {
                c.flags &= !flag::RESUME_READ;
                self.on_readable(*slot);
            }
        }
        self.run_timers();
        self.process_doomed();
        self.release_deferred();
        self.flush_dirty();
        self.process_doomed();
        if !self.traced.is_empty() {
            // The traced deliveries' frames were written (or queued behind a full
            // socket): their spans end here.
            self.traced.clear();
        }
        if self.now_ms.saturating_sub(self.last_stats_ms) >= STATS_PUBLISH_MS {
            self.publish_stats();
        }
        if self.drain.is_some() && self.drain_step() {
            self.publish_stats();
            return true;
        }
        false
    }

    fn live(&self, slot: u32, gen: u32) -> bool {
        self.clients
            .get(slot as usize)
            .is_some_and(|c| c.gen == gen)
    }

    /// Begin draining. The listener stays open so probes see `/ready` = 503 and new upgrades
    /// are refused with 503; existing clients are closed with 1001 in batches.
    fn start_drain(&mut self) {
        if self.drain.is_some() {
            return;
        }
        let timeout = ticks(self.node.cfg.shutdown_timeout);
        let queue: Vec<(u32, u32)> = self
            .clients
            .iter()
            .filter(|(_, c)| c.phase != Phase::Http)
            .map(|(k, c)| (k as u32, c.gen))
            .collect();
        tracing::info!(shard = self.id, clients = queue.len(), "draining");
        self.drain = Some(DrainState {
            queue,
            close_by_tick: self.now_tick + (timeout / 2).max(1),
            hard_tick: self.now_tick + timeout.saturating_sub(1).max(1),
            last_batch_tick: 0,
        });
    }

    /// One drain step; true when the shard is done (no WebSocket client left, or the deadline).
    fn drain_step(&mut self) -> bool {
        let Some(d) = self.drain.as_mut() else {
            return false;
        };
        let now = self.now_tick;
        if now >= d.hard_tick {
            let slots: Vec<u32> = self.clients.iter().map(|(k, _)| k as u32).collect();
            for s in slots {
                self.close_now(s, Some(CloseKind::GoingAway));
            }
            return true;
        }
        if d.last_batch_tick == now {
            return false;
        }
        d.last_batch_tick = now;
        if !d.queue.is_empty() {
            let ticks_left = d.close_by_tick.saturating_sub(now).max(1) as usize;
            let batch = d.queue.len().div_ceil(ticks_left);
            let at = d.queue.len() - batch;
            let batch: Vec<(u32, u32)> = d.queue.split_off(at);
            let clustered = self.node.clustered;
            for (slot, gen) in batch {
                if self.live(slot, gen) && self.clients[slot as usize].phase != Phase::Closing {
                    if clustered {
                        // The other nodes take these clients: a jittered delay hint spreads
                        // their reconnects beyond the drain's own batches.
                        let ms = reconnect_hint_ms(slot, gen, self.now_ms);
                        let reason = format!("server shutdown (reconnect in {ms} ms)");
                        self.close_with(slot, close::GOING_AWAY, &reason);
                    } else {
                        self.close_with(slot, close::GOING_AWAY, "server shutdown");
                    }
                }
            }
            self.flush_dirty();
            return false;
        }
        // Done once only plain HTTP requests remain (probes; dropped at exit).
        self.clients.iter().all(|(_, c)| !c.has(flag::WS))
    }

    fn publish_stats(&mut self) {
        self.last_stats_ms = self.now_ms;
        self.out.stats.rooms = self.svc.rooms.table.len() as u64;
        self.out.stats.coalesce_on = u64::from(self.coalesce_on);
        self.out.stats.coalesce_held = self.deferred.len() as u64;
        let shared = &self.node.stats[self.id];
        shared.publish(&self.out.stats);
        if !self.hist.is_empty() {
            if let Ok(mut h) = shared.latency_us.lock() {
                let _ = h.add(&self.hist);
            }
            self.hist.reset();
        }
    }
}

#[cfg(test)]
mod msg_budget {
    use super::*;

    #[test]
    fn inbox_slots_stay_small() {
        // Every inbox has SHARD_INBOX_CAPACITY slots of the largest variant, all touched when
        // the channel is built: 64 B a message is 4 MiB per shard (plus crossbeam's stamp).
        assert!(
            std::mem::size_of::<ShardMsg>() <= 64,
            "{}",
            std::mem::size_of::<ShardMsg>()
        );
        assert!(std::mem::size_of::<Target>() <= 48);
    }
}
