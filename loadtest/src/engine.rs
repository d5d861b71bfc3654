//! The worker event loops: each thread owns a slice of the connections (global index `i` goes
//! to thread `i % threads`), one mio `Poll`, one timerfd for the open-loop send schedule and one
//! read buffer. The controller (main thread) moves all workers through the phases
//! Setup -> Run -> Drain -> Close through [`Shared`]; workers publish counters there once per
//! loop turn and hand back a [`WorkerReport`] when they exit.
//!
//! Per connection the generator keeps only its socket, a few timestamps, the tail of a partial
//! frame and unsent bytes: about 200 bytes plus buffers that are freed when empty.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::sys::now_ns;
use crate::ws::{self, Message, Reassembly, Upgrade};

/// Bytes read from a socket per `read` call (one buffer per worker, not per connection).
const READ_BUF_BYTES: usize = 64 * 1024;
/// Bytes read from one socket per readiness event before moving on (fairness).
const READ_PER_EVENT_BYTES_MAX: usize = 1024 * 1024;
/// Unsent bytes one connection may hold before sends are dropped and counted.
const OUT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Events taken from epoll per wait.
const EVENTS_MAX: usize = 1024;
/// Longest epoll wait, so phase changes are seen promptly.
const POLL_WAIT_MS: u64 = 5;
/// Interval of the setup-timeout scan over all connections.
const TIMEOUT_SCAN_NS: u64 = 200_000_000;
/// Pings awaiting their pong per connection (echo).
const PENDING_PINGS_MAX: usize = 4096;
/// Distinct failure reasons kept; later ones are counted under "other".
const FAILURE_KINDS_MAX: usize = 32;
/// Sample error texts kept per worker.
pub(crate) const ERROR_SAMPLES_MAX: usize = 5;
/// Bytes drained from a slow subscriber at the end to find the server's close frame.
const SLOW_DRAIN_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Histogram range: 1 ns .. 120 s, 3 significant digits.
const HIST_MAX_NS: u64 = 120_000_000_000;
/// presence-churn: user ids per `presence.watch` frame (the server's max_presence_query_users
/// default); a longer watch list goes in several frames.
const WATCH_FRAME_USERS: usize = 100;
/// Token of the timerfd in each worker's poll.
const TIMER_TOKEN: Token = Token(usize::MAX - 1);

/// What one connection does in the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Subscribes to `room`; `slow` ones stop reading once subscribed.
    Sub { room: u32, slow: bool },
    /// Subscribes to `room` and publishes on the schedule.
    Pub { room: u32 },
    /// DM device `device` of user `user` (connects with `?user_id=`).
    Dm { user: u32, device: u32 },
    /// Connects and does nothing else (echo pings on the schedule).
    Plain,
    /// typing-storm: user `user` (`?user_id=`), subscribed to `room`; typers are senders.
    Member { user: u32, room: u32 },
    /// presence-churn: `?user_id=` of churning user `user`; leaves and comes back on schedule.
    Churner { user: u32 },
    /// presence-churn: watches `--watch` churners from `first` on (wrapping).
    Watcher { first: u32 },
}

/// Why a connection was opened: the first time (setup), again to resume a room's history, or
/// again on a churner's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Setup,
    Resume,
    Churn,
}

/// Slots of [`Shared::kind`]: counters whose meaning depends on the scenario.
pub mod kind {
    /// history-resume: messages the publisher got back (all of them are stored then).
    pub const PUB_GOT: usize = 0;
    /// history-resume: replayed messages received by resuming subscribers.
    pub const REPLAYED: usize = 1;
    /// history-resume: `subscribed` with `recovered: true` / anything else.
    pub const RECOVERED: usize = 2;
    pub const NOT_RECOVERED: usize = 3;
    /// history-resume: subscribers that left.
    pub const LEFT: usize = 4;
    /// history-resume: replayed offsets missing / seen twice or out of order.
    pub const MISSING: usize = 5;
    pub const DUPLICATE: usize = 6;

    /// typing-storm: `typing.start` while not typing (produces events), renewals (coalesced),
    /// `typing.stop` while typing.
    pub const FIRST_STARTS: usize = 0;
    pub const RENEWALS: usize = 1;
    pub const STOPS: usize = 2;
    /// typing-storm: events received.
    pub const START_EVENTS: usize = 4;
    pub const STOP_EVENTS: usize = 5;

    /// presence-churn: disconnects, reconnects started, events the completed cycles should
    /// produce, events received.
    pub const DISCONNECTS: usize = 0;
    pub const RECONNECTS: usize = 1;
    pub const EXPECTED_EVENTS: usize = 3;
    pub const ONLINE_EVENTS: usize = 4;
    pub const OFFLINE_EVENTS: usize = 5;
    pub const EARLY_EVENTS: usize = 6;
    /// presence-churn: `presence.state` answers to the watch frames.
    pub const WATCH_STATES: usize = 7;

    /// rest-read (`crate::rest`): requests put on the schedule (or, closed loop, sent fresh),
    /// requests finished (answered, or failed for good), 200s with a page that checks out,
    /// errors, reconnects, requests sent again after the server closed a kept-alive connection
    /// before answering, idle connections the server closed, requests dropped because the
    /// backlog was full, body bytes of the good pages, and the deepest backlog (a maximum).
    pub const REST_SCHEDULED: usize = 0;
    pub const REST_DONE: usize = 1;
    pub const REST_OK: usize = 2;
    pub const REST_ERRORS: usize = 3;
    pub const REST_RECONNECTS: usize = 4;
    pub const REST_RETRIED: usize = 5;
    pub const REST_IDLE_CLOSES: usize = 6;
    pub const REST_BACKLOG_DROPPED: usize = 7;
    pub const REST_BODY_BYTES: usize = 8;
    pub const REST_BACKLOG_PEAK: usize = 9;

    pub const SLOTS: usize = 10;
}

/// What the workers do in the run phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    None,
    /// Publishes from `Role::Pub` connections in round-robin order.
    Publish,
    /// `message.send` from device 0 of each user to its partner, round-robin over users.
    Dm,
    /// Pings from every connection, round-robin.
    Ping,
    /// history-resume: the publisher's bursts ([`Shared::burst_target`]), the subscribers'
    /// leave (`LEAVE`) and resume (`RESUME`).
    History,
    /// typing-storm: `typing.start` / `typing.stop` from the senders, round-robin.
    Typing,
    /// presence-churn: churners leave and come back on their own schedule.
    Presence,
}

/// One server of the run: where to connect, the Host header and the WebSocket path.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

/// Everything the workers need to know, fixed for a run.
pub struct Plan {
    /// The servers (`--urls`; one without it): connection `i` goes to `endpoints[i % len]`.
    pub endpoints: Vec<Endpoint>,
    /// history-resume: the server every subscriber reconnects to for its resume
    /// (`--resume-url`; None: the one it left).
    pub resume_endpoint: Option<Endpoint>,
    pub source_ips: Vec<Ipv4Addr>,
    pub roles: Vec<Role>,
    pub room_names: Vec<String>,
    pub user_names: Vec<String>,
    pub threads: usize,
    pub in_flight_per_thread: usize,
    /// Run phase: sleep this long when a non-blocking poll is empty (0 = block in epoll).
    pub batch_ns: u64,
    /// Subscribe with `?subscribe=ROOM` on the upgrade instead of a command.
    pub url_subscribe: bool,
    /// Subscribers' paths, round-robin by global connection index (empty: `path`).
    pub sub_paths: Vec<String>,
    /// This process's index among `procs` generator processes (`--processes`); a process
    /// opens the connections whose global index `i` has `i % procs == proc_index`.
    pub proc_index: usize,
    pub procs: usize,
    pub connect_timeout_ns: u64,
    pub slow_rcvbuf: usize,
    pub traffic: Traffic,
    /// Global connection indices that send, in round-robin order.
    pub senders: Vec<usize>,
    /// Nanoseconds between two sends (all senders together).
    pub interval_ns: f64,
    pub payload_bytes: usize,
    /// Distinguishes this run's message ids from earlier runs (server dedup).
    pub nonce: u64,
    /// history-resume: messages published while the subscribers are away.
    pub gap: u64,
    /// typing-storm: every K-th command of a typer is `typing.stop` (0 = never).
    pub stop_every: u64,
    /// presence-churn: users per watcher, and each churner's cycle and time away.
    pub watch: usize,
    pub cycle_ns: u64,
    pub away_ns: u64,
}

impl Plan {
    fn dm_partner(&self, user: u32) -> u32 {
        user ^ 1
    }

    /// The server of global connection `gidx`.
    pub fn endpoint(&self, gidx: usize) -> &Endpoint {
        &self.endpoints[gidx % self.endpoints.len()]
    }

    /// The server of global connection `gidx` when opened for `why`: a resume goes to
    /// `resume_endpoint` when there is one.
    fn endpoint_for(&self, gidx: usize, why: Open) -> &Endpoint {
        match (&self.resume_endpoint, why) {
            (Some(ep), Open::Resume) => ep,
            _ => self.endpoint(gidx),
        }
    }
}

/// fanout over several servers: the histogram of deliveries received on node `recv` from a
/// publisher on the same node (`cross` false) or on another one, in [`Ctx::by_node`].
fn node_slot(recv: usize, cross: bool) -> usize {
    recv * 2 + usize::from(cross)
}

/// Phases driven by the controller.
pub mod phase {
    pub const SETUP: u8 = 0;
    pub const RUN: u8 = 1;
    pub const DRAIN: u8 = 2;
    pub const CLOSE: u8 = 3;
    /// history-resume: subscribers close their connections and remember where they were.
    pub const LEAVE: u8 = 4;
    /// history-resume: they reconnect (`--in-flight` at a time) and subscribe with `since`.
    pub const RESUME: u8 = 5;
}

/// Counters shared between the workers and the controller.
pub struct Shared {
    pub phase: AtomicU8,
    pub run_start_ns: AtomicU64,
    pub run_end_ns: AtomicU64,
    /// Connections fully set up (subscribed or connected).
    pub ready: AtomicUsize,
    /// Connections that failed before being ready.
    pub setup_failed: AtomicUsize,
    /// Ready connections that were lost before the close phase.
    pub dropped: AtomicUsize,
    /// Data deliveries received by connections whose latency counts.
    pub received: AtomicU64,
    /// dm: acks received.
    pub acks: AtomicU64,
    /// Sends handed to the sockets (publish, message.send, ping).
    pub sent: AtomicU64,
    /// fanout: publishes per room.
    pub published: Vec<AtomicU64>,
    /// fanout: ready connections per room whose deliveries count (not slow).
    pub members: Vec<AtomicU64>,
    /// Reconnected connections that are ready again / that failed before being ready.
    pub again_ready: AtomicUsize,
    pub again_failed: AtomicUsize,
    /// history-resume: publishes the publisher must have sent so far (the controller raises it).
    pub burst_target: AtomicU64,
    /// Scenario counters, see [`kind`].
    pub kind: [AtomicU64; kind::SLOTS],
    /// typing-storm / presence-churn: per user, the monotonic time of the last command or
    /// connect (and, after `users`, disconnect) that should produce an event; receivers read
    /// it for their latency (one process only).
    pub marks: Vec<AtomicU64>,
}

impl Shared {
    pub fn new(rooms: usize) -> Shared {
        Shared {
            phase: AtomicU8::new(phase::SETUP),
            run_start_ns: AtomicU64::new(0),
            run_end_ns: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            setup_failed: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            published: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            members: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            again_ready: AtomicUsize::new(0),
            again_failed: AtomicUsize::new(0),
            burst_target: AtomicU64::new(0),
            kind: std::array::from_fn(|_| AtomicU64::new(0)),
            marks: Vec::new(),
        }
    }

    /// With `marks` latency slots (typing-storm, presence-churn).
    pub fn with_marks(rooms: usize, marks: usize) -> Shared {
        let mut s = Shared::new(rooms);
        s.marks = (0..marks).map(|_| AtomicU64::new(0)).collect();
        s
    }

    pub fn k(&self, slot: usize) -> u64 {
        self.kind[slot].load(Ordering::Relaxed)
    }
}

fn new_hist() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low 1, high >= 2, 3 sig figs).
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("constant histogram bounds are valid")
}

/// What one worker measured.
pub struct WorkerReport {
    /// connect() start -> 101 received.
    pub handshake: Histogram<u64>,
    /// subscribe sent -> subscribed received.
    pub subscribe: Histogram<u64>,
    /// Delivery latency (fanout message, dm message.create, echo pong).
    pub latency: Histogram<u64>,
    /// dm: message.send -> message.ack.
    pub ack: Histogram<u64>,
    pub upgrades: u64,
    pub first_start_ns: u64,
    pub last_upgrade_ns: u64,
    pub last_ready_ns: u64,
    /// Failure reason -> count.
    pub failures: BTreeMap<String, u64>,
    /// `error` frames received, and a few of their texts.
    pub error_frames: u64,
    pub error_samples: Vec<String>,
    /// Messages received that the scenario did not expect (not counted as failures).
    pub other_frames: u64,
    /// Slow subscribers: closed by the server with 4008, closed otherwise, still open at the end.
    pub slow_closed_4008: u64,
    pub slow_closed_other: u64,
    pub slow_open: u64,
    /// Sends not made because the connection was gone or its buffer was full.
    pub sends_dropped: u64,
    /// Scenario histograms by name (history-resume, typing-storm, presence-churn).
    pub hists: BTreeMap<String, Histogram<u64>>,
    /// Time the last reconnected connection was ready again.
    pub last_again_ns: u64,
}

impl WorkerReport {
    fn new() -> WorkerReport {
        WorkerReport {
            handshake: new_hist(),
            subscribe: new_hist(),
            latency: new_hist(),
            ack: new_hist(),
            upgrades: 0,
            first_start_ns: u64::MAX,
            last_upgrade_ns: 0,
            last_ready_ns: 0,
            failures: BTreeMap::new(),
            error_frames: 0,
            error_samples: Vec::new(),
            other_frames: 0,
            slow_closed_4008: 0,
            slow_closed_other: 0,
            slow_open: 0,
            sends_dropped: 0,
            hists: BTreeMap::new(),
            last_again_ns: 0,
        }
    }

    /// Records `ns` in the histogram `name` (created on first use).
    pub(crate) fn rec(&mut self, name: &str, ns: u64) {
        if let Some(h) = self.hists.get_mut(name) {
            h.saturating_record(ns.max(1));
            return;
        }
        let mut h = new_hist();
        h.saturating_record(ns.max(1));
        self.hists.insert(name.to_string(), h);
    }

    /// The histogram `name`, empty when nothing was recorded.
    pub fn hist(&self, name: &str) -> Histogram<u64> {
        self.hists.get(name).cloned().unwrap_or_else(new_hist)
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: WorkerReport) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.handshake.add(&other.handshake);
        let _ = self.subscribe.add(&other.subscribe);
        let _ = self.latency.add(&other.latency);
        let _ = self.ack.add(&other.ack);
        self.upgrades += other.upgrades;
        self.first_start_ns = self.first_start_ns.min(other.first_start_ns);
        self.last_upgrade_ns = self.last_upgrade_ns.max(other.last_upgrade_ns);
        self.last_ready_ns = self.last_ready_ns.max(other.last_ready_ns);
        for (k, v) in other.failures {
            *self.failures.entry(k).or_insert(0) += v;
        }
        self.error_frames += other.error_frames;
        for s in other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES_MAX {
                self.error_samples.push(s);
            }
        }
        self.other_frames += other.other_frames;
        self.slow_closed_4008 += other.slow_closed_4008;
        self.slow_closed_other += other.slow_closed_other;
        self.slow_open += other.slow_open;
        self.sends_dropped += other.sends_dropped;
        for (k, h) in other.hists {
            match self.hists.get_mut(&k) {
                Some(mine) => {
                    let _ = mine.add(&h);
                }
                None => {
                    self.hists.insert(k, h);
                }
            }
        }
        self.last_again_ns = self.last_again_ns.max(other.last_again_ns);
    }

    /// An empty report to merge worker reports into.
    pub fn empty() -> WorkerReport {
        WorkerReport::new()
    }

    pub(crate) fn fail(&mut self, reason: &str) {
        if self.failures.len() >= FAILURE_KINDS_MAX && !self.failures.contains_key(reason) {
            *self.failures.entry("other".into()).or_insert(0) += 1;
        } else {
            *self.failures.entry(reason.to_string()).or_insert(0) += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Upgrading,
    WaitConnected,
    Subscribing,
    Ready,
}

struct Conn {
    sock: TcpStream,
    gidx: u32,
    role: Role,
    state: State,
    t_start: u64,
    t_sub: u64,
    /// Partial frame (or HTTP head) carried over between reads.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_at: usize,
    reasm: Reassembly,
    /// echo: scheduled send times of pings awaiting pongs.
    pending: VecDeque<u64>,
    /// Slow subscriber has stopped reading.
    muted: bool,
    /// Close code the server sent, if any.
    close_code: Option<u16>,
    open: Open,
    /// history-resume: the room's epoch from `subscribed` and the offset of the last message.
    epoch: Option<Box<str>>,
    offset: u64,
    /// typing-storm: a `typing.start` was sent and not stopped.
    typing: bool,
}

/// Why a connection is being dropped.
enum Drop {
    Fail(String),
    /// The server closed the connection (close frame or EOF).
    Closed(Option<u16>),
}

/// Per-worker mutable context, separate from the connection table for disjoint borrows.
struct Ctx {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    report: WorkerReport,
    rng: u64,
    received: u64,
    acks: u64,
    sent: u64,
    published: Vec<u64>,
    scratch: Vec<u8>,
    kind: [u64; kind::SLOTS],
    /// typing-storm / presence-churn: user names are this prefix and the user's index.
    user_prefix: Vec<u8>,
    /// fanout over several servers: delivery latency by receiving node and same-node or
    /// cross-node publisher ([`node_slot`]); empty with one server. Folded into the report's
    /// named histograms at the end ([`Ctx::fold_node_hists`]).
    by_node: Vec<Histogram<u64>>,
}

impl Ctx {
    fn mask(&mut self) -> [u8; 4] {
        // xorshift64: cheap, unpredictable enough for masking keys of a load generator.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    /// `latency_node<k>` (deliveries received on node k), `latency_same_node` and
    /// `latency_cross_node` (the publisher on the receiver's node, or on another).
    fn fold_node_hists(&mut self) {
        let by_node = std::mem::take(&mut self.by_node);
        for (slot, h) in by_node.iter().enumerate() {
            if h.is_empty() {
                continue;
            }
            let names = [
                format!("latency_node{}", slot / 2),
                if slot % 2 == 1 {
                    "latency_cross_node"
                } else {
                    "latency_same_node"
                }
                .to_string(),
            ];
            for name in names {
                match self.report.hists.get_mut(&name) {
                    Some(t) => {
                        let _ = t.add(h);
                    }
                    None => {
                        self.report.hists.insert(name, h.clone());
                    }
                }
            }
        }
    }

    fn flush_counters(&mut self) {
        if self.received > 0 {
            self.shared
                .received
                .fetch_add(self.received, Ordering::Relaxed);
            self.received = 0;
        }
        if self.acks > 0 {
            self.shared.acks.fetch_add(self.acks, Ordering::Relaxed);
            self.acks = 0;
        }
        if self.sent > 0 {
            self.shared.sent.fetch_add(self.sent, Ordering::Relaxed);
            self.sent = 0;
        }
        for (slot, n) in self.kind.iter_mut().enumerate() {
            if *n > 0 {
                self.shared.kind[slot].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        for (room, n) in self.published.iter_mut().enumerate() {
            if *n > 0 {
                self.shared.published[room].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
    }

    fn error_frame(&mut self, text: &[u8]) {
        self.report.error_frames += 1;
        if self.report.error_samples.len() < ERROR_SAMPLES_MAX {
            let t = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
            self.report.error_samples.push(t);
        }
    }
}

/// A CLOCK_MONOTONIC timerfd for the open-loop schedule (ns precision, unlike epoll's ms).
pub(crate) struct TimerFd {
    fd: OwnedFd,
}

impl TimerFd {
    pub(crate) fn new() -> std::io::Result<TimerFd> {
        // SAFETY: plain syscall; the returned fd is checked and owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(TimerFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Arms the timer for absolute monotonic time `at_ns` (0 disarms).
    pub(crate) fn arm(&self, at_ns: u64) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid fd and itimerspec; the old value is not requested.
        unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
    }

    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid 8-byte buffer; EAGAIN is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One event-loop thread.
pub struct Worker {
    /// Global worker index across processes, and the number of workers in all.
    gid: usize,
    workers: usize,
    poll: Poll,
    timer: TimerFd,
    conns: Vec<Option<Conn>>,
    /// Global indices of this worker's connections, in connect order.
    mine: Vec<usize>,
    next_connect: usize,
    in_flight: usize,
    ctx: Ctx,
    rbuf: Vec<u8>,
    /// Next global send index of the schedule this worker owns (`None`: owns no sender).
    next_send: Option<u64>,
    /// Cached local index of each global connection of this worker (by position in `mine`).
    local_of: BTreeMap<usize, usize>,
    /// history-resume: where each subscriber that left was (offset, epoch), by local index.
    memo: Vec<Option<(u64, Option<Box<str>>)>>,
    left: bool,
    next_reconnect: usize,
    /// history-resume: this worker's publisher and the publishes it has made.
    burst_local: Option<usize>,
    burst_sent: u64,
    /// presence-churn: (time, local, reconnect?) of this worker's churners, earliest first.
    churn: BinaryHeap<Reverse<(u64, usize, bool)>>,
    churn_started: bool,
    /// presence-churn: watchers per churning user (all of them, from the plan).
    watchers_of: Vec<u32>,
}

impl Worker {
    pub fn new(id: usize, plan: Arc<Plan>, shared: Arc<Shared>) -> std::io::Result<Worker> {
        let poll = Poll::new()?;
        let timer = TimerFd::new()?;
        poll.registry()
            .register(&mut SourceFd(&timer.raw()), TIMER_TOKEN, Interest::READABLE)?;
        // Global worker `gid` of `workers` (all threads of all processes) owns index i when
        // i % workers == gid; with one process this is thread `i % threads`.
        let workers = plan.threads * plan.procs.max(1);
        let gid = plan.proc_index * plan.threads + id;
        let mine: Vec<usize> = (gid..plan.roles.len()).step_by(workers).collect();
        let local_of = mine.iter().enumerate().map(|(l, g)| (*g, l)).collect();
        let owns_sender = plan.senders.iter().any(|g| g % workers == gid);
        let rooms = plan.room_names.len();
        let n_endpoints = plan.endpoints.len();
        let seed = (now_ns() ^ ((id as u64 + 1) * 0x9E37_79B9_7F4A_7C15)) | 1;
        let burst_local = mine
            .iter()
            .position(|g| matches!(plan.roles[*g], Role::Pub { .. }))
            .filter(|_| plan.traffic == Traffic::History);
        let watchers_of = if plan.traffic == Traffic::Presence {
            watchers_of(&plan.roles, plan.user_names.len(), plan.watch)
        } else {
            Vec::new()
        };
        let user_prefix = user_prefix(&plan).into_bytes();
        Ok(Worker {
            gid,
            workers,
            poll,
            timer,
            conns: (0..mine.len()).map(|_| None).collect(),
            mine,
            next_connect: 0,
            in_flight: 0,
            ctx: Ctx {
                plan,
                shared,
                report: WorkerReport::new(),
                rng: seed,
                received: 0,
                acks: 0,
                sent: 0,
                published: vec![0; rooms],
                scratch: Vec::with_capacity(1024),
                kind: [0; kind::SLOTS],
                user_prefix,
                by_node: if n_endpoints > 1 {
                    (0..2 * n_endpoints).map(|_| new_hist()).collect()
                } else {
                    Vec::new()
                },
            },
            rbuf: vec![0; READ_BUF_BYTES],
            next_send: owns_sender.then_some(0),
            local_of,
            memo: Vec::new(),
            left: false,
            next_reconnect: 0,
            burst_local,
            burst_sent: 0,
            churn: BinaryHeap::new(),
            churn_started: false,
            watchers_of,
        })
    }

    /// Runs until the controller sets the close phase; returns the measurements.
    pub fn run(mut self) -> WorkerReport {
        if self.ctx.plan.batch_ns > 0 {
            // Coalescing naps must be short and exact: drop the default 50 us timer slack.
            // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only this thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        }
        let mut events = Events::with_capacity(EVENTS_MAX);
        let mut last_scan = now_ns();
        let mut armed_for = 0u64;
        loop {
            let ph = self.ctx.shared.phase.load(Ordering::Acquire);
            if ph == phase::CLOSE {
                break;
            }
            if ph == phase::SETUP {
                self.start_connects();
            }
            if self.burst_local.is_some() {
                self.burst_due();
            }
            if ph == phase::LEAVE && !self.left {
                self.left = true;
                self.leave_all();
            }
            if ph == phase::RESUME {
                self.start_reconnects();
            }
            if ph == phase::RUN || ph == phase::DRAIN {
                let mut next = if ph == phase::RUN { self.send_due() } else { 0 };
                if self.ctx.plan.traffic == Traffic::Presence {
                    let c = self.churn_due(ph);
                    if c != 0 && (next == 0 || c < next) {
                        next = c;
                    }
                }
                if next != 0 && next != armed_for {
                    self.timer.arm(next);
                    armed_for = next;
                }
            }
            // Coalescing mode: a worker that never blocks in epoll_wait is never woken by the
            // server's send (on loopback that wake-up runs in, and is charged to, the server).
            let coalesce = ph == phase::RUN && self.ctx.plan.batch_ns > 0;
            let wait = if coalesce {
                Duration::ZERO
            } else {
                Duration::from_millis(POLL_WAIT_MS)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.ctx.report.fail(&format!("epoll: {e}"));
                    break;
                }
            }
            for ev in events.iter() {
                let tok = ev.token();
                if tok == TIMER_TOKEN {
                    self.timer.clear();
                    armed_for = 0;
                    continue;
                }
                self.on_event(
                    tok.0,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                );
            }
            let now = now_ns();
            if now - last_scan > TIMEOUT_SCAN_NS {
                last_scan = now;
                self.scan_timeouts(now);
            }
            self.ctx.flush_counters();
            if coalesce && events.is_empty() {
                let mut nap = self.ctx.plan.batch_ns;
                if armed_for != 0 {
                    nap = nap.min(armed_for.saturating_sub(now_ns()));
                }
                if nap > 0 {
                    std::thread::sleep(Duration::from_nanos(nap));
                }
            }
        }
        self.close_all();
        self.ctx.flush_counters();
        self.ctx.fold_node_hists();
        self.ctx.report
    }

    fn start_connects(&mut self) {
        while self.in_flight < self.ctx.plan.in_flight_per_thread
            && self.next_connect < self.mine.len()
        {
            let local = self.next_connect;
            self.next_connect += 1;
            let gidx = self.mine[local];
            match self.open(local, gidx, Open::Setup) {
                Ok(conn) => {
                    self.conns[local] = Some(conn);
                    self.in_flight += 1;
                }
                Err(e) => {
                    self.ctx.report.fail(&format!("connect: {e}"));
                    self.ctx.shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn open(&mut self, local: usize, gidx: usize, why: Open) -> std::io::Result<Conn> {
        let plan = &self.ctx.plan;
        let role = plan.roles[gidx];
        let ep = plan.endpoint_for(gidx, why);
        let domain = socket2::Domain::for_address(ep.addr);
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        if let Role::Sub { slow: true, .. } = role {
            sock.set_recv_buffer_size(plan.slow_rcvbuf)?;
        }
        if !plan.source_ips.is_empty() {
            let ip = plan.source_ips[gidx % plan.source_ips.len()];
            // Let connect() pick the port for the full 4-tuple, so each source address has
            // the whole ephemeral range per destination.
            let one: libc::c_int = 1;
            // SAFETY: valid socket fd, option value is a c_int of the given size.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            sock.bind(&SocketAddr::new(ip.into(), 0).into())?;
        }
        let t_start = now_ns();
        match sock.connect(&ep.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(sock));
        self.poll.registry().register(
            &mut stream,
            Token(local),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        if self.ctx.report.first_start_ns == u64::MAX {
            self.ctx.report.first_start_ns = t_start;
        }
        Ok(Conn {
            sock: stream,
            gidx: gidx as u32,
            role,
            state: State::Connecting,
            t_start,
            t_sub: 0,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            reasm: Reassembly::default(),
            pending: VecDeque::new(),
            muted: false,
            close_code: None,
            open: Open::Setup,
            epoch: None,
            offset: 0,
            typing: false,
        })
    }

    fn on_event(&mut self, local: usize, readable: bool) {
        let Some(conn) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        if conn.muted {
            return;
        }
        let result = drive(conn, &mut self.ctx, &mut self.rbuf, readable);
        match result {
            Err(d) => self.drop_conn(local, d),
            Ok(()) => self.after_drive(local),
        }
    }

    /// Bookkeeping after a connection became ready (in-flight slot, muting slow ones).
    fn after_drive(&mut self, local: usize) {
        let Some(conn) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        if conn.state == State::Ready && conn.t_start != 0 && conn.open != Open::Setup {
            conn.t_start = 0; // marks "counted as ready"
            if conn.open == Open::Resume {
                self.in_flight -= 1;
            }
            self.ctx.shared.again_ready.fetch_add(1, Ordering::Relaxed);
            self.ctx.report.last_again_ns = now_ns();
            return;
        }
        if conn.state == State::Ready && conn.t_start != 0 {
            conn.t_start = 0; // marks "counted as ready"
            self.in_flight -= 1;
            self.ctx.shared.ready.fetch_add(1, Ordering::Relaxed);
            self.ctx.report.last_ready_ns = now_ns();
            if let Role::Sub { room, slow: false }
            | Role::Pub { room }
            | Role::Member { room, .. } = conn.role
            {
                self.ctx.shared.members[room as usize].fetch_add(1, Ordering::Relaxed);
            }
            if let Role::Sub { slow: true, .. } = conn.role {
                conn.muted = true;
                if let Err(e) = self.poll.registry().reregister(
                    &mut conn.sock,
                    Token(local),
                    Interest::WRITABLE,
                ) {
                    let reason = format!("reregister: {e}");
                    self.drop_conn(local, Drop::Fail(reason));
                }
            }
        }
    }

    fn drop_conn(&mut self, local: usize, why: Drop) {
        let Some(mut conn) = self.conns.get_mut(local).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        let was_ready = conn.t_start == 0;
        let reason = match why {
            Drop::Fail(r) => r,
            Drop::Closed(Some(code)) => format!("closed by server with code {code}"),
            Drop::Closed(None) => "closed by server without close frame".to_string(),
        };
        let stage = match conn.state {
            State::Connecting => "connect",
            State::Upgrading => "upgrade",
            State::WaitConnected => "wait-connected",
            State::Subscribing => "subscribe",
            State::Ready => "ready",
        };
        self.ctx.report.fail(&format!("{stage}: {reason}"));
        if was_ready {
            self.ctx.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else if conn.open == Open::Setup {
            self.in_flight -= 1;
            self.ctx.shared.setup_failed.fetch_add(1, Ordering::Relaxed);
        } else {
            if conn.open == Open::Resume {
                self.in_flight -= 1;
            }
            self.ctx.shared.again_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes a connection on purpose (1000), without counting it as lost; returns it.
    fn leave(&mut self, local: usize) -> Option<Conn> {
        let mut conn = self.conns.get_mut(local).and_then(Option::take)?;
        let mask = self.ctx.mask();
        ws::encode_close(&mut conn.out, 1000, mask);
        let _ = flush(&mut conn);
        let _ = conn.sock.shutdown(std::net::Shutdown::Write);
        let _ = self.poll.registry().deregister(&mut conn.sock);
        Some(conn)
    }

    /// Opens connection `local` again; false (counted) when the socket could not be opened.
    fn reopen(&mut self, local: usize, why: Open) -> Option<&mut Conn> {
        let gidx = self.mine[local];
        match self.open(local, gidx, why) {
            Ok(mut conn) => {
                conn.open = why;
                if let Some(Some((offset, epoch))) = self.memo.get_mut(local).map(Option::take) {
                    conn.offset = offset;
                    conn.epoch = epoch;
                }
                if why == Open::Resume {
                    self.in_flight += 1;
                }
                self.conns[local] = Some(conn);
                self.conns[local].as_mut()
            }
            Err(e) => {
                self.ctx.report.fail(&format!("reconnect: {e}"));
                self.ctx.shared.again_failed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// history-resume: every ready subscriber leaves and remembers where it was.
    fn leave_all(&mut self) {
        self.memo = (0..self.conns.len()).map(|_| None).collect();
        for local in 0..self.conns.len() {
            let ready_sub = matches!(
                self.conns[local].as_ref(),
                Some(c) if c.state == State::Ready && matches!(c.role, Role::Sub { .. })
            );
            if !ready_sub {
                continue;
            }
            if let Some(conn) = self.leave(local) {
                self.memo[local] = Some((conn.offset, conn.epoch));
                self.ctx.kind[kind::LEFT] += 1;
            }
        }
    }

    /// history-resume: reconnects the subscribers that left, `in_flight` at a time.
    fn start_reconnects(&mut self) {
        while self.in_flight < self.ctx.plan.in_flight_per_thread
            && self.next_reconnect < self.memo.len()
        {
            let local = self.next_reconnect;
            self.next_reconnect += 1;
            if self.memo[local].is_some() {
                self.reopen(local, Open::Resume);
            }
        }
    }

    /// history-resume: the publisher sends up to [`Shared::burst_target`] publishes.
    fn burst_due(&mut self) {
        let Some(local) = self.burst_local else {
            return;
        };
        let target = self.ctx.shared.burst_target.load(Ordering::Acquire);
        let plan = Arc::clone(&self.ctx.plan);
        while self.burst_sent < target {
            let Some(conn) = self.conns.get_mut(local).and_then(Option::as_mut) else {
                return;
            };
            if conn.state != State::Ready {
                return;
            }
            let Role::Pub { room } = conn.role else {
                return;
            };
            let mut msg = std::mem::take(&mut self.ctx.scratch);
            msg.clear();
            let at = now_ns();
            publish_json(
                &mut msg,
                &plan.room_names[room as usize],
                self.burst_sent,
                at,
                plan.payload_bytes,
            );
            let mask = self.ctx.mask();
            ws::encode_frame(&mut conn.out, ws::opcode::TEXT, &msg, mask);
            self.ctx.scratch = msg;
            self.ctx.sent += 1;
            self.burst_sent += 1;
            if let Err(d) = flush(conn) {
                self.drop_conn(local, d);
                return;
            }
        }
    }

    /// presence-churn: runs the churners' leaves and returns that are due; returns the time of
    /// the next one (0 when none).
    fn churn_due(&mut self, ph: u8) -> u64 {
        let plan = Arc::clone(&self.ctx.plan);
        let start = self.ctx.shared.run_start_ns.load(Ordering::Acquire);
        let end = self.ctx.shared.run_end_ns.load(Ordering::Acquire);
        let users = plan.user_names.len().max(1) as u64;
        if !self.churn_started && ph == phase::RUN {
            self.churn_started = true;
            // Churner u first leaves at start + u/users of a cycle: the leaves (and the returns,
            // `away` later) are spread evenly at `users / cycle` per second.
            for (local, g) in self.mine.iter().enumerate() {
                if let Role::Churner { user } = plan.roles[*g] {
                    let at = start + plan.cycle_ns * u64::from(user) / users;
                    self.churn.push(Reverse((at, local, false)));
                }
            }
        }
        let now = now_ns();
        while let Some(Reverse((at, local, back))) = self.churn.peek().copied() {
            if at > now {
                return at;
            }
            self.churn.pop();
            let Some(&Role::Churner { user }) = self.mine.get(local).map(|g| &plan.roles[*g])
            else {
                continue;
            };
            if back {
                self.ctx.shared.marks[user as usize].store(now_ns(), Ordering::Relaxed);
                self.ctx.kind[kind::RECONNECTS] += 1;
                if self.reopen(local, Open::Churn).is_some() {
                    self.churn
                        .push(Reverse((at - plan.away_ns + plan.cycle_ns, local, false)));
                }
                continue;
            }
            // Only whole cycles: leave when the return still falls inside the run.
            if at + plan.away_ns > end || ph != phase::RUN {
                continue;
            }
            let was_ready =
                matches!(self.conns[local].as_ref(), Some(c) if c.state == State::Ready);
            if !was_ready {
                self.ctx
                    .report
                    .fail("churn: not connected when its next leave was due");
            }
            let users_n = plan.user_names.len();
            self.ctx.shared.marks[users_n + user as usize].store(now_ns(), Ordering::Relaxed);
            if let Some(conn) = self.leave(local) {
                if conn.t_start != 0 {
                    // A return that had not finished: it counts as failed, not as lost.
                    self.ctx.shared.again_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.ctx.kind[kind::DISCONNECTS] += 1;
            self.ctx.kind[kind::EXPECTED_EVENTS] +=
                2 * u64::from(self.watchers_of.get(user as usize).copied().unwrap_or(0));
            self.churn.push(Reverse((at + plan.away_ns, local, true)));
        }
        0
    }

    fn scan_timeouts(&mut self, now: u64) {
        let limit = self.ctx.plan.connect_timeout_ns;
        let mut expired = Vec::new();
        for (local, c) in self.conns.iter().enumerate() {
            if let Some(c) = c {
                if c.t_start != 0 && now.saturating_sub(c.t_start) > limit {
                    expired.push(local);
                }
            }
        }
        for local in expired {
            self.drop_conn(local, Drop::Fail("setup timeout".into()));
        }
    }

    /// Sends everything that is due on this worker's part of the schedule; returns the time of
    /// the next send (0 when there is none).
    fn send_due(&mut self) -> u64 {
        let Some(mut i) = self.next_send else {
            return 0;
        };
        let plan = Arc::clone(&self.ctx.plan);
        let start = self.ctx.shared.run_start_ns.load(Ordering::Acquire);
        let end = self.ctx.shared.run_end_ns.load(Ordering::Acquire);
        let n = plan.senders.len() as u64;
        let now = now_ns();
        loop {
            // Skip the sends that belong to other workers (at most n steps).
            let mut skipped = 0;
            while plan.senders[(i % n) as usize] % self.workers != self.gid {
                i += 1;
                skipped += 1;
                if skipped > n {
                    self.next_send = None;
                    return 0;
                }
            }
            let at = start + (i as f64 * plan.interval_ns) as u64;
            if at >= end {
                self.next_send = None;
                return 0;
            }
            if at > now {
                self.next_send = Some(i);
                return at;
            }
            let gidx = plan.senders[(i % n) as usize];
            self.send_one(gidx, i, at);
            i += 1;
        }
    }

    fn send_one(&mut self, gidx: usize, seq: u64, at: u64) {
        let Some(&local) = self.local_of.get(&gidx) else {
            return;
        };
        let plan = Arc::clone(&self.ctx.plan);
        let Some(conn) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            self.ctx.report.sends_dropped += 1;
            return;
        };
        if conn.state != State::Ready || conn.out.len() - conn.out_at > OUT_BYTES_MAX {
            self.ctx.report.sends_dropped += 1;
            return;
        }
        let mut msg = std::mem::take(&mut self.ctx.scratch);
        msg.clear();
        match (plan.traffic, conn.role) {
            (Traffic::Publish, Role::Pub { room }) => {
                publish_json(
                    &mut msg,
                    &plan.room_names[room as usize],
                    seq,
                    at,
                    plan.payload_bytes,
                );
                self.ctx.published[room as usize] += 1;
            }
            (Traffic::Dm, Role::Dm { user, .. }) => {
                let to = &plan.user_names[plan.dm_partner(user) as usize];
                dm_json(&mut msg, to, seq, at, plan.nonce, plan.payload_bytes);
            }
            (Traffic::Typing, Role::Member { room, user }) => {
                let typers = plan.senders.len() as u64;
                let Some((stop, slot)) = typing_step(seq, typers, plan.stop_every, conn.typing)
                else {
                    // A stop while not typing would produce nothing: not sent.
                    self.ctx.scratch = msg;
                    return;
                };
                self.ctx.kind[slot] += 1;
                if slot != kind::RENEWALS {
                    // The scheduled time, so a stalled sender is counted in the latency.
                    self.ctx.shared.marks[user as usize].store(at, Ordering::Relaxed);
                }
                conn.typing = !stop;
                let ty = if stop { "typing.stop" } else { "typing.start" };
                msg.extend_from_slice(
                    format!(
                        "{{\"type\":\"{ty}\",\"room\":\"{}\"}}",
                        plan.room_names[room as usize]
                    )
                    .as_bytes(),
                );
            }
            (Traffic::Ping, _) => {
                if conn.pending.len() >= PENDING_PINGS_MAX {
                    self.ctx.report.sends_dropped += 1;
                    self.ctx.scratch = msg;
                    return;
                }
                conn.pending.push_back(at);
                msg.extend_from_slice(format!("{{\"type\":\"ping\",\"id\":{seq}}}").as_bytes());
            }
            _ => {
                self.ctx.scratch = msg;
                return;
            }
        }
        let mask = self.ctx.mask();
        ws::encode_frame(&mut conn.out, ws::opcode::TEXT, &msg, mask);
        self.ctx.scratch = msg;
        self.ctx.sent += 1;
        if let Err(d) = flush(conn) {
            self.drop_conn(local, d);
        }
    }

    fn close_all(&mut self) {
        for local in 0..self.conns.len() {
            let Some(mut conn) = self.conns[local].take() else {
                continue;
            };
            if conn.muted {
                // Slow subscriber: read what the server left, to see whether it closed us.
                conn.muted = false;
                let mut budget = SLOW_DRAIN_BYTES_MAX;
                let mut code = None;
                let mut eof = false;
                while budget > 0 {
                    match conn.sock.read(&mut self.rbuf) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            budget = budget.saturating_sub(n);
                            if let Some(c) = find_close(&mut conn, &self.rbuf[..n]) {
                                code = Some(c);
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                match code {
                    Some(4008) => self.ctx.report.slow_closed_4008 += 1,
                    Some(_) => self.ctx.report.slow_closed_other += 1,
                    None if eof => self.ctx.report.slow_closed_other += 1,
                    None => self.ctx.report.slow_open += 1,
                }
            }
            let mask = self.ctx.mask();
            ws::encode_close(&mut conn.out, 1000, mask);
            let _ = flush(&mut conn);
            let _ = conn.sock.shutdown(std::net::Shutdown::Write);
            let _ = self.poll.registry().deregister(&mut conn.sock);
        }
    }
}

/// Scans raw bytes of a slow subscriber for a close frame; returns its code.
fn find_close(conn: &mut Conn, data: &[u8]) -> Option<u16> {
    let mut tail = std::mem::take(&mut conn.inbuf);
    tail.extend_from_slice(data);
    let mut at = 0;
    let mut code = None;
    while let Ok(Some((frame, used))) = ws::parse_frame(&tail[at..]) {
        at += used;
        if frame.op == ws::opcode::CLOSE {
            code = Some(if frame.payload.len() >= 2 {
                u16::from_be_bytes([frame.payload[0], frame.payload[1]])
            } else {
                1005
            });
            break;
        }
    }
    tail.drain(..at);
    conn.inbuf = tail;
    code
}

/// Writes pending output; keeps the rest for the next writable event.
fn flush(conn: &mut Conn) -> Result<(), Drop> {
    while conn.out_at < conn.out.len() {
        match conn.sock.write(&conn.out[conn.out_at..]) {
            Ok(0) => return Err(Drop::Fail("write returned 0".into())),
            Ok(n) => conn.out_at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Drop::Fail(format!("write: {e}"))),
        }
    }
    conn.out.clear();
    conn.out_at = 0;
    if conn.out.capacity() > 16 * 1024 {
        conn.out = Vec::new();
    }
    Ok(())
}

/// Handles one readiness event of one connection.
fn drive(conn: &mut Conn, ctx: &mut Ctx, rbuf: &mut [u8], readable: bool) -> Result<(), Drop> {
    if conn.state == State::Connecting {
        match conn.sock.take_error() {
            Ok(Some(e)) => return Err(Drop::Fail(format!("{e}"))),
            Err(e) => return Err(Drop::Fail(format!("{e}"))),
            Ok(None) => {}
        }
        match conn.sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(Drop::Fail(format!("{e}"))),
        }
        let plan = Arc::clone(&ctx.plan);
        let ep = plan.endpoint_for(conn.gidx as usize, conn.open);
        let path = match conn.role {
            Role::Dm { user, .. } | Role::Churner { user } => {
                format!("{}?user_id={}", ep.path, plan.user_names[user as usize])
            }
            Role::Member { user, room } if plan.url_subscribe => format!(
                "{}?user_id={}&subscribe={}",
                ep.path, plan.user_names[user as usize], plan.room_names[room as usize]
            ),
            Role::Member { user, .. } => {
                format!("{}?user_id={}", ep.path, plan.user_names[user as usize])
            }
            Role::Watcher { .. } => {
                format!("{}?user_id=lt{}w{}", ep.path, plan.nonce, conn.gidx)
            }
            // Room names are `lt<digits>-<digits>`: nothing to percent-encode.
            Role::Sub { room, .. } if plan.url_subscribe && !plan.sub_paths.is_empty() => {
                let p = &plan.sub_paths[conn.gidx as usize % plan.sub_paths.len()];
                format!("{p}?subscribe={}", plan.room_names[room as usize])
            }
            Role::Sub { room, .. } | Role::Pub { room } if plan.url_subscribe => {
                format!("{}?subscribe={}", ep.path, plan.room_names[room as usize])
            }
            _ => ep.path.clone(),
        };
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&ctx.mask());
        key[4..8].copy_from_slice(&ctx.mask());
        key[8..12].copy_from_slice(&conn.gidx.to_le_bytes());
        key[12..].copy_from_slice(&ctx.mask());
        conn.out
            .extend_from_slice(&ws::upgrade_request(&ep.host, &path, key));
        conn.state = State::Upgrading;
    }
    flush(conn)?;
    if !readable {
        return Ok(());
    }
    let mut total = 0;
    loop {
        let n = match conn.sock.read(rbuf) {
            Ok(0) => {
                return Err(Drop::Closed(conn.close_code));
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Drop::Fail(format!("read: {e}"))),
        };
        total += n;
        let mut tail = std::mem::take(&mut conn.inbuf);
        let res = if tail.is_empty() {
            let r = on_bytes(conn, ctx, &rbuf[..n]);
            if let Ok(used) = r {
                tail.extend_from_slice(&rbuf[used..n]);
            }
            r.map(|_| ())
        } else {
            tail.extend_from_slice(&rbuf[..n]);
            let r = on_bytes(conn, ctx, &tail);
            if let Ok(used) = r {
                tail.drain(..used);
            }
            r.map(|_| ())
        };
        if tail.is_empty() && tail.capacity() > 4096 {
            tail = Vec::new();
        }
        conn.inbuf = tail;
        res?;
        flush(conn)?;
        // A short read emptied the socket; new data raises a new edge, so the extra read
        // that would only return EAGAIN is skipped.
        if conn.muted || total >= READ_PER_EVENT_BYTES_MAX || n < rbuf.len() {
            break;
        }
    }
    Ok(())
}

/// Consumes whole frames (or the HTTP head) from `data`; returns the bytes used.
fn on_bytes(conn: &mut Conn, ctx: &mut Ctx, data: &[u8]) -> Result<usize, Drop> {
    let mut at = 0;
    if conn.state == State::Upgrading {
        match ws::parse_upgrade(data) {
            Upgrade::Incomplete => return Ok(0),
            Upgrade::Refused(why) => return Err(Drop::Fail(format!("upgrade refused: {why}"))),
            Upgrade::Done(n) => {
                let now = now_ns();
                ctx.report
                    .handshake
                    .saturating_record(now.saturating_sub(conn.t_start).max(1));
                ctx.report.upgrades += 1;
                ctx.report.last_upgrade_ns = now;
                conn.state = State::WaitConnected;
                at = n;
            }
        }
    }
    loop {
        let (frame, used) = match ws::parse_frame(&data[at..]) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(at),
            Err(e) => return Err(Drop::Fail(format!("bad frame from server: {e:?}"))),
        };
        at += used;
        // The reassembly buffer is moved out for the duration of the message so the message
        // can borrow it while the rest of the connection is mutated (no per-message copy).
        let mut reasm = std::mem::take(&mut conn.reasm);
        let result = on_message(conn, ctx, &mut reasm, frame);
        reasm.shrink();
        conn.reasm = reasm;
        result?;
        if conn.muted {
            return Ok(at);
        }
    }
}

fn on_message(
    conn: &mut Conn,
    ctx: &mut Ctx,
    reasm: &mut Reassembly,
    frame: ws::Frame<'_>,
) -> Result<(), Drop> {
    let msg = reasm
        .push(frame)
        .map_err(|e| Drop::Fail(format!("bad frame from server: {e:?}")))?;
    match msg {
        None | Some(Message::Pong) => Ok(()),
        Some(Message::Text(t)) => on_text(conn, ctx, t),
        Some(Message::Binary(_)) => {
            ctx.report.other_frames += 1;
            Ok(())
        }
        Some(Message::Ping(p)) => {
            let mask = ctx.mask();
            ws::encode_frame(&mut conn.out, ws::opcode::PONG, p, mask);
            Ok(())
        }
        Some(Message::Close(code)) => {
            conn.close_code = Some(code);
            Err(Drop::Closed(Some(code)))
        }
    }
}

/// Handles one complete text message according to the connection's state and role.
fn on_text(conn: &mut Conn, ctx: &mut Ctx, t: &[u8]) -> Result<(), Drop> {
    let now = now_ns();
    if ws::has_type(t, b"error") {
        if conn.state != State::Ready {
            let text = String::from_utf8_lossy(&t[..t.len().min(200)]).into_owned();
            return Err(Drop::Fail(format!("error frame during setup: {text}")));
        }
        ctx.error_frame(t);
        return Ok(());
    }
    match conn.state {
        State::WaitConnected => {
            if !ws::has_type(t, b"connected") {
                ctx.report.other_frames += 1;
                return Ok(());
            }
            match conn.role {
                Role::Sub { room, .. } if conn.open == Open::Resume => {
                    let name = &ctx.plan.room_names[room as usize];
                    let epoch = conn.epoch.as_deref().unwrap_or("");
                    let cmd = format!(
                        "{{\"type\":\"subscribe\",\"room\":\"{name}\",\"since\":{{\"offset\":{},\"epoch\":\"{epoch}\"}}}}",
                        conn.offset
                    );
                    let mask = ctx.mask();
                    ws::encode_frame(&mut conn.out, ws::opcode::TEXT, cmd.as_bytes(), mask);
                    conn.t_sub = now;
                    conn.state = State::Subscribing;
                }
                Role::Sub { .. } | Role::Pub { .. } | Role::Member { .. }
                    if ctx.plan.url_subscribe =>
                {
                    // `subscribed` follows `connected` in the same write.
                    conn.t_sub = now;
                    conn.state = State::Subscribing;
                }
                Role::Sub { room, .. } | Role::Pub { room } | Role::Member { room, .. } => {
                    let name = &ctx.plan.room_names[room as usize];
                    let cmd = format!("{{\"type\":\"subscribe\",\"room\":\"{name}\"}}");
                    let mask = ctx.mask();
                    ws::encode_frame(&mut conn.out, ws::opcode::TEXT, cmd.as_bytes(), mask);
                    conn.t_sub = now;
                    conn.state = State::Subscribing;
                }
                Role::Watcher { first } => {
                    let plan = Arc::clone(&ctx.plan);
                    let users = plan.user_names.len();
                    let ids: Vec<&str> = (0..plan.watch)
                        .map(|j| plan.user_names[(first as usize + j) % users].as_str())
                        .collect();
                    for chunk in ids.chunks(WATCH_FRAME_USERS) {
                        let cmd = watch_json(chunk);
                        let mask = ctx.mask();
                        ws::encode_frame(&mut conn.out, ws::opcode::TEXT, cmd.as_bytes(), mask);
                    }
                    conn.state = State::Ready;
                }
                Role::Dm { .. } | Role::Plain | Role::Churner { .. } => conn.state = State::Ready,
            }
        }
        State::Subscribing if conn.open == Open::Resume => on_resume_text(conn, ctx, t, now)?,
        State::Subscribing => {
            if ws::has_type(t, b"subscribed") {
                if ctx.plan.traffic == Traffic::History {
                    let Some(epoch) = ws::find_str(t, b"\"epoch\":") else {
                        return Err(Drop::Fail(
                            "subscribed without epoch: the room keeps no history; start the \
                             server with SWITCHBOARD_ROOMS='[{\"pattern\":\"bench-*\",\
                             \"history_size\":200}]'"
                                .into(),
                        ));
                    };
                    conn.epoch = Some(String::from_utf8_lossy(epoch).into());
                    conn.offset = ws::find_u64(t, b"\"offset\":").unwrap_or(0);
                }
                ctx.report
                    .subscribe
                    .saturating_record(now.saturating_sub(conn.t_sub).max(1));
                conn.state = State::Ready;
                if let Role::Sub { slow: true, .. } = conn.role {
                    conn.muted = true;
                }
            } else {
                ctx.report.other_frames += 1;
            }
        }
        State::Ready => on_ready_text(conn, ctx, t, now),
        State::Connecting | State::Upgrading => {}
    }
    Ok(())
}

/// history-resume: a resuming subscriber's frames up to `subscribed`: the replayed messages,
/// each exactly one offset after the one before, then `subscribed` with `recovered: true` at
/// the offset of the last one.
fn on_resume_text(conn: &mut Conn, ctx: &mut Ctx, t: &[u8], now: u64) -> Result<(), Drop> {
    if ws::has_type(t, b"message") {
        let Some(off) = ws::find_u64(t, b"\"offset\":") else {
            ctx.report.fail("resume: replayed message without offset");
            return Ok(());
        };
        let (missing, duplicate) = offset_step(conn.offset, off);
        ctx.kind[kind::MISSING] += missing;
        ctx.kind[kind::DUPLICATE] += duplicate;
        conn.offset = conn.offset.max(off);
        ctx.kind[kind::REPLAYED] += 1;
        return Ok(());
    }
    if !ws::has_type(t, b"subscribed") {
        ctx.report.other_frames += 1;
        return Ok(());
    }
    let recovered = ws::find_bool(t, b"\"recovered\":") == Some(true);
    if let Some(at) = ws::find_u64(t, b"\"offset\":") {
        // Messages before this offset that did not come are missing.
        ctx.kind[kind::MISSING] += at.saturating_sub(conn.offset);
    }
    if recovered {
        ctx.kind[kind::RECOVERED] += 1;
    } else {
        ctx.kind[kind::NOT_RECOVERED] += 1;
        ctx.report
            .fail("resume: subscribed without recovered: true");
    }
    let phase_start = ctx.shared.run_start_ns.load(Ordering::Relaxed);
    ctx.report.rec("resume", now.saturating_sub(conn.t_start));
    ctx.report.rec("replay", now.saturating_sub(conn.t_sub));
    ctx.report
        .rec("resume_wait", now.saturating_sub(phase_start));
    conn.state = State::Ready;
    Ok(())
}

/// (missing, duplicate) when offset `next` follows `last`: one more is right, a jump misses the
/// ones between, an offset not after `last` is a duplicate (or out of order).
pub fn offset_step(last: u64, next: u64) -> (u64, u64) {
    if next == last + 1 {
        (0, 0)
    } else if next > last {
        (next - last - 1, 0)
    } else {
        (0, 1)
    }
}

/// typing-storm: send `seq` of the schedule goes to typer `seq % typers` as its round
/// `seq / typers`; every `stop_every`-th round is a stop. Returns (is a stop, the [`kind`] slot
/// it counts in: first start, renewal or stop), or `None` for a stop while not typing (nothing
/// to send).
pub fn typing_step(seq: u64, typers: u64, stop_every: u64, typing: bool) -> Option<(bool, usize)> {
    let round = seq / typers.max(1);
    let stop = stop_every > 0 && (round + 1).is_multiple_of(stop_every);
    match (stop, typing) {
        (false, false) => Some((false, kind::FIRST_STARTS)),
        (false, true) => Some((false, kind::RENEWALS)),
        (true, true) => Some((true, kind::STOPS)),
        (true, false) => None,
    }
}

/// The user index in a frame's `"user_id":"<prefix><index>"`.
fn event_user(ctx: &Ctx, t: &[u8]) -> Option<usize> {
    let u = ws::find_str_u64(t, b"\"user_id\":", &ctx.user_prefix)? as usize;
    (u < ctx.plan.user_names.len()).then_some(u)
}

fn on_ready_text(conn: &mut Conn, ctx: &mut Ctx, t: &[u8], now: u64) {
    match ctx.plan.traffic {
        Traffic::History => {
            if ws::has_type(t, b"message") {
                if let Some(off) = ws::find_u64(t, b"\"offset\":") {
                    conn.offset = conn.offset.max(off);
                }
                if matches!(conn.role, Role::Pub { .. }) {
                    ctx.kind[kind::PUB_GOT] += 1;
                } else {
                    ctx.received += 1;
                }
                return;
            }
            ctx.report.other_frames += 1;
        }
        Traffic::Typing => {
            if ctx.shared.phase.load(Ordering::Relaxed) == phase::CLOSE {
                // Stops from the other members' disconnects at the end: not part of the run.
                return;
            }
            let (slot, name) = if ws::has_type(t, b"typing.start") {
                (kind::START_EVENTS, "typing_start")
            } else if ws::has_type(t, b"typing.stop") {
                (kind::STOP_EVENTS, "typing_stop")
            } else {
                ctx.report.other_frames += 1;
                return;
            };
            ctx.kind[slot] += 1;
            if let Some(u) = event_user(ctx, t) {
                let at = ctx.shared.marks[u].load(Ordering::Relaxed);
                if at != 0 {
                    ctx.report.rec(name, now.saturating_sub(at));
                }
            }
        }
        Traffic::Presence => {
            let (slot, name, mark_base) = if ws::has_type(t, b"presence.online") {
                (kind::ONLINE_EVENTS, "online", 0)
            } else if ws::has_type(t, b"presence.offline") {
                (kind::OFFLINE_EVENTS, "offline", ctx.plan.user_names.len())
            } else if ws::has_type(t, b"presence.state") {
                ctx.kind[kind::WATCH_STATES] += 1;
                return;
            } else {
                ctx.report.other_frames += 1;
                return;
            };
            let ph = ctx.shared.phase.load(Ordering::Relaxed);
            if ph != phase::RUN && ph != phase::DRAIN {
                // The state at watch time, not a change of the run.
                ctx.kind[kind::EARLY_EVENTS] += 1;
                return;
            }
            ctx.kind[slot] += 1;
            if let Some(u) = event_user(ctx, t) {
                let at = ctx.shared.marks[mark_base + u].load(Ordering::Relaxed);
                if at != 0 {
                    ctx.report.rec(name, now.saturating_sub(at));
                }
            }
        }
        Traffic::Publish => {
            if ws::has_type(t, b"message") {
                if let Some(ts) = ws::find_u64(t, b"\"ts\":") {
                    if let Some(seq) = ws::find_u64(t, b"\"seq\":") {
                        let lat = now.saturating_sub(ts).max(1);
                        ctx.report.latency.saturating_record(lat);
                        ctx.received += 1;
                        if !ctx.by_node.is_empty() {
                            // Send `seq` was made by sender `seq % senders` (`send_due`).
                            let plan = &ctx.plan;
                            let n = plan.endpoints.len();
                            let recv = conn.gidx as usize % n;
                            let senders = plan.senders.len().max(1) as u64;
                            let from = plan.senders.get((seq % senders) as usize).map(|g| g % n);
                            let slot = node_slot(recv, from != Some(recv));
                            ctx.by_node[slot].saturating_record(lat);
                        }
                        return;
                    }
                }
            }
            ctx.report.other_frames += 1;
        }
        Traffic::Dm => {
            let is_ack = ws::has_type(t, b"message.ack");
            let is_create = !is_ack && ws::has_type(t, b"message.create");
            match ws::find_str_u64(t, b"\"clientMsgId\":", b"x") {
                Some(ts) if is_ack => {
                    ctx.report
                        .ack
                        .saturating_record(now.saturating_sub(ts).max(1));
                    ctx.acks += 1;
                }
                Some(ts) if is_create => {
                    ctx.report
                        .latency
                        .saturating_record(now.saturating_sub(ts).max(1));
                    ctx.received += 1;
                }
                _ => ctx.report.other_frames += 1,
            }
        }
        Traffic::Ping => {
            if ws::has_type(t, b"pong") {
                if let Some(at) = conn.pending.pop_front() {
                    ctx.report
                        .latency
                        .saturating_record(now.saturating_sub(at).max(1));
                    ctx.received += 1;
                    return;
                }
            }
            ctx.report.other_frames += 1;
        }
        Traffic::None => ctx.report.other_frames += 1,
    }
}

/// `{"type":"presence.watch","user_ids":[...]}` for `users`.
pub fn watch_json(users: &[&str]) -> String {
    let mut cmd = String::from("{\"type\":\"presence.watch\",\"user_ids\":[");
    for (j, u) in users.iter().enumerate() {
        if j > 0 {
            cmd.push(',');
        }
        cmd.push('"');
        cmd.push_str(u);
        cmd.push('"');
    }
    cmd.push_str("]}");
    cmd
}

/// presence-churn: how many watchers watch each of `users` churners (watcher `first` watches
/// `first .. first + watch`, wrapping).
pub fn watchers_of(roles: &[Role], users: usize, watch: usize) -> Vec<u32> {
    let mut n = vec![0u32; users];
    if users == 0 {
        return n;
    }
    for r in roles {
        if let Role::Watcher { first } = r {
            for j in 0..watch.min(users) {
                n[(*first as usize + j) % users] += 1;
            }
        }
    }
    n
}

/// The part of the scenario's user names before the user's index: `lt<nonce>t` (typing),
/// `lt<nonce>p` (presence churners).
pub fn user_prefix(plan: &Plan) -> String {
    match plan.traffic {
        Traffic::Typing => format!("lt{}t", plan.nonce),
        Traffic::Presence => format!("lt{}p", plan.nonce),
        _ => format!("lt{}u", plan.nonce),
    }
}

/// `{"type":"publish","room":R,"data":{"seq":S,"ts":T,"pad":"..."}}` with the `data` object
/// padded to `payload_bytes` when that is larger than its minimum.
pub fn publish_json(out: &mut Vec<u8>, room: &str, seq: u64, ts: u64, payload_bytes: usize) {
    out.extend_from_slice(b"{\"type\":\"publish\",\"room\":\"");
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    let data_start = out.len();
    out.extend_from_slice(format!("{{\"seq\":{seq},\"ts\":{ts},\"pad\":\"").as_bytes());
    let fixed = out.len() - data_start + 2; // closing `"}`
    for _ in fixed..payload_bytes {
        out.push(b'x');
    }
    out.extend_from_slice(b"\"}}");
}

/// A `message.send` whose clientMsgId carries the scheduled time: `x<ts>-<seq>-<nonce>`.
pub fn dm_json(out: &mut Vec<u8>, to: &str, seq: u64, ts: u64, nonce: u64, content_bytes: usize) {
    out.extend_from_slice(
        format!("{{\"type\":\"message.send\",\"clientMsgId\":\"x{ts}-{seq}-{nonce}\",\"to\":\"{to}\",\"content\":\"")
            .as_bytes(),
    );
    for _ in 0..content_bytes.max(1) {
        out.push(b'x');
    }
    out.extend_from_slice(b"\"}");
}

// ------------------------------------------------------------------ between processes
//
// With `--processes P` the controller runs P copies of this binary (`switchboard-load child`)
// and talks to them over their stdin/stdout; these are the values that cross.

fn role_code(r: &Role) -> String {
    match *r {
        Role::Sub { room, slow: false } => format!("s{room}"),
        Role::Sub { room, slow: true } => format!("w{room}"),
        Role::Pub { room } => format!("p{room}"),
        Role::Dm { user, device } => format!("d{user}.{device}"),
        Role::Plain => "n".into(),
        Role::Member { user, room } => format!("m{user}.{room}"),
        Role::Churner { user } => format!("c{user}"),
        Role::Watcher { first } => format!("v{first}"),
    }
}

fn role_parse(t: &str) -> Option<Role> {
    let (k, rest) = t.split_at(1.min(t.len()));
    Some(match k {
        "s" => Role::Sub {
            room: rest.parse().ok()?,
            slow: false,
        },
        "w" => Role::Sub {
            room: rest.parse().ok()?,
            slow: true,
        },
        "p" => Role::Pub {
            room: rest.parse().ok()?,
        },
        "d" => {
            let (u, d) = rest.split_once('.')?;
            Role::Dm {
                user: u.parse().ok()?,
                device: d.parse().ok()?,
            }
        }
        "n" => Role::Plain,
        "m" => {
            let (u, r) = rest.split_once('.')?;
            Role::Member {
                user: u.parse().ok()?,
                room: r.parse().ok()?,
            }
        }
        "c" => Role::Churner {
            user: rest.parse().ok()?,
        },
        "v" => Role::Watcher {
            first: rest.parse().ok()?,
        },
        _ => return None,
    })
}

fn traffic_code(t: Traffic) -> &'static str {
    match t {
        Traffic::None => "none",
        Traffic::Publish => "publish",
        Traffic::Dm => "dm",
        Traffic::Ping => "ping",
        Traffic::History => "history",
        Traffic::Typing => "typing",
        Traffic::Presence => "presence",
    }
}

impl Plan {
    /// The plan as one JSON value, for a child process (`proc_index` set by the caller).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "endpoints": self.endpoints.iter().map(|e| serde_json::json!([e.addr.to_string(), e.host, e.path])).collect::<Vec<_>>(),
            "resume_endpoint": self.resume_endpoint.as_ref().map(|e| serde_json::json!([e.addr.to_string(), e.host, e.path])),
            "source_ips": self.source_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            "roles": self.roles.iter().map(role_code).collect::<Vec<_>>().join(" "),
            "room_names": self.room_names,
            "user_names": self.user_names,
            "threads": self.threads,
            "in_flight_per_thread": self.in_flight_per_thread,
            "connect_timeout_ns": self.connect_timeout_ns,
            "slow_rcvbuf": self.slow_rcvbuf,
            "traffic": traffic_code(self.traffic),
            "senders": self.senders,
            "interval_ns": self.interval_ns,
            "payload_bytes": self.payload_bytes,
            "nonce": self.nonce,
            "batch_ns": self.batch_ns,
            "url_subscribe": self.url_subscribe,
            "sub_paths": self.sub_paths,
            "proc_index": self.proc_index,
            "procs": self.procs,
            "gap": self.gap,
            "stop_every": self.stop_every,
            "watch": self.watch,
            "cycle_ns": self.cycle_ns,
            "away_ns": self.away_ns,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Plan, String> {
        let s = |k: &str| v[k].as_str().map(str::to_owned).ok_or(format!("plan: {k}"));
        let u = |k: &str| v[k].as_u64().ok_or(format!("plan: {k}"));
        let strings = |k: &str| -> Result<Vec<String>, String> {
            v[k].as_array()
                .ok_or(format!("plan: {k}"))?
                .iter()
                .map(|x| x.as_str().map(str::to_owned).ok_or(format!("plan: {k}")))
                .collect()
        };
        let roles = s("roles")?
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(|t| role_parse(t).ok_or(format!("plan: role {t:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let traffic = match s("traffic")?.as_str() {
            "none" => Traffic::None,
            "publish" => Traffic::Publish,
            "dm" => Traffic::Dm,
            "ping" => Traffic::Ping,
            "history" => Traffic::History,
            "typing" => Traffic::Typing,
            "presence" => Traffic::Presence,
            t => return Err(format!("plan: traffic {t:?}")),
        };
        let endpoint = |e: &serde_json::Value| -> Result<Endpoint, String> {
            let part = |i: usize| e[i].as_str().ok_or("plan: endpoint".to_string());
            Ok(Endpoint {
                addr: part(0)?
                    .parse()
                    .map_err(|_| "plan: endpoint addr".to_string())?,
                host: part(1)?.to_owned(),
                path: part(2)?.to_owned(),
            })
        };
        Ok(Plan {
            endpoints: v["endpoints"]
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or("plan: endpoints")?
                .iter()
                .map(endpoint)
                .collect::<Result<_, String>>()?,
            resume_endpoint: match &v["resume_endpoint"] {
                serde_json::Value::Null => None,
                e => Some(endpoint(e)?),
            },
            source_ips: strings("source_ips")?
                .iter()
                .map(|ip| ip.parse().map_err(|_| format!("plan: ip {ip}")))
                .collect::<Result<_, _>>()?,
            roles,
            room_names: strings("room_names")?,
            user_names: strings("user_names")?,
            threads: u("threads")? as usize,
            in_flight_per_thread: u("in_flight_per_thread")? as usize,
            connect_timeout_ns: u("connect_timeout_ns")?,
            slow_rcvbuf: u("slow_rcvbuf")? as usize,
            traffic,
            senders: v["senders"]
                .as_array()
                .ok_or("plan: senders")?
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize).ok_or("plan: senders"))
                .collect::<Result<_, _>>()?,
            interval_ns: v["interval_ns"].as_f64().ok_or("plan: interval_ns")?,
            payload_bytes: u("payload_bytes")? as usize,
            nonce: u("nonce")?,
            batch_ns: u("batch_ns")?,
            url_subscribe: v["url_subscribe"].as_bool().ok_or("plan: url_subscribe")?,
            sub_paths: v["sub_paths"]
                .as_array()
                .ok_or("plan: sub_paths")?
                .iter()
                .map(|p| p.as_str().map(str::to_owned).ok_or("plan: sub_paths"))
                .collect::<Result<_, _>>()?,
            proc_index: u("proc_index")? as usize,
            procs: u("procs")? as usize,
            gap: u("gap")?,
            stop_every: u("stop_every")?,
            watch: u("watch")? as usize,
            cycle_ns: u("cycle_ns")?,
            away_ns: u("away_ns")?,
        })
    }
}

fn hist_json(h: &Histogram<u64>) -> serde_json::Value {
    let pairs: Vec<[u64; 2]> = h
        .iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect();
    serde_json::json!(pairs)
}

fn hist_from(v: &serde_json::Value) -> Histogram<u64> {
    let mut h = new_hist();
    for pair in v.as_array().into_iter().flatten() {
        if let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) {
            let _ = h.record_n(value.clamp(1, HIST_MAX_NS), count);
        }
    }
    h
}

impl WorkerReport {
    /// The report as one JSON value (histograms as [value, count] pairs of their buckets).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "handshake": hist_json(&self.handshake),
            "subscribe": hist_json(&self.subscribe),
            "latency": hist_json(&self.latency),
            "ack": hist_json(&self.ack),
            "upgrades": self.upgrades,
            "first_start_ns": self.first_start_ns,
            "last_upgrade_ns": self.last_upgrade_ns,
            "last_ready_ns": self.last_ready_ns,
            "failures": self.failures,
            "error_frames": self.error_frames,
            "error_samples": self.error_samples,
            "other_frames": self.other_frames,
            "slow_closed_4008": self.slow_closed_4008,
            "slow_closed_other": self.slow_closed_other,
            "slow_open": self.slow_open,
            "sends_dropped": self.sends_dropped,
            "hists": self.hists.iter().map(|(k, h)| (k.clone(), hist_json(h))).collect::<serde_json::Map<_, _>>(),
            "last_again_ns": self.last_again_ns,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> WorkerReport {
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        let mut r = WorkerReport::new();
        r.handshake = hist_from(&v["handshake"]);
        r.subscribe = hist_from(&v["subscribe"]);
        r.latency = hist_from(&v["latency"]);
        r.ack = hist_from(&v["ack"]);
        r.upgrades = u("upgrades");
        r.first_start_ns = v["first_start_ns"].as_u64().unwrap_or(u64::MAX);
        r.last_upgrade_ns = u("last_upgrade_ns");
        r.last_ready_ns = u("last_ready_ns");
        if let Some(m) = v["failures"].as_object() {
            for (k, n) in m {
                r.failures.insert(k.clone(), n.as_u64().unwrap_or(1));
            }
        }
        r.error_frames = u("error_frames");
        r.error_samples = v["error_samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect();
        r.other_frames = u("other_frames");
        r.slow_closed_4008 = u("slow_closed_4008");
        r.slow_closed_other = u("slow_closed_other");
        r.slow_open = u("slow_open");
        r.sends_dropped = u("sends_dropped");
        if let Some(m) = v["hists"].as_object() {
            for (k, h) in m {
                r.hists.insert(k.clone(), hist_from(h));
            }
        }
        r.last_again_ns = u("last_again_ns");
        r
    }
}

/// The counters of [`Shared`] a child reports to the controller, as numbers in a fixed order:
/// ready, setup_failed, dropped, received, acks, sent, again_ready, again_failed, the
/// [`kind`] slots, then published and members per room.
pub fn shared_snapshot(sh: &Shared) -> Vec<u64> {
    let mut v = vec![
        sh.ready.load(Ordering::Relaxed) as u64,
        sh.setup_failed.load(Ordering::Relaxed) as u64,
        sh.dropped.load(Ordering::Relaxed) as u64,
        sh.received.load(Ordering::Relaxed),
        sh.acks.load(Ordering::Relaxed),
        sh.sent.load(Ordering::Relaxed),
        sh.again_ready.load(Ordering::Relaxed) as u64,
        sh.again_failed.load(Ordering::Relaxed) as u64,
    ];
    v.extend(sh.kind.iter().map(|k| k.load(Ordering::Relaxed)));
    v.extend(sh.published.iter().map(|p| p.load(Ordering::Relaxed)));
    v.extend(sh.members.iter().map(|m| m.load(Ordering::Relaxed)));
    v
}

/// Adds `new - old` of one child's snapshot to the controller's totals (counters only grow,
/// but the arithmetic wraps so a shrinking one is carried correctly too).
pub fn shared_apply_delta(sh: &Shared, old: &[u64], new: &[u64]) {
    let d = |i: usize| {
        new.get(i)
            .copied()
            .unwrap_or(0)
            .wrapping_sub(old.get(i).copied().unwrap_or(0))
    };
    sh.ready.fetch_add(d(0) as usize, Ordering::Relaxed);
    sh.setup_failed.fetch_add(d(1) as usize, Ordering::Relaxed);
    sh.dropped.fetch_add(d(2) as usize, Ordering::Relaxed);
    sh.received.fetch_add(d(3), Ordering::Relaxed);
    sh.acks.fetch_add(d(4), Ordering::Relaxed);
    sh.sent.fetch_add(d(5), Ordering::Relaxed);
    sh.again_ready.fetch_add(d(6) as usize, Ordering::Relaxed);
    sh.again_failed.fetch_add(d(7) as usize, Ordering::Relaxed);
    for (slot, k) in sh.kind.iter().enumerate() {
        k.fetch_add(d(8 + slot), Ordering::Relaxed);
    }
    let base = 8 + kind::SLOTS;
    let rooms = sh.published.len();
    for k in 0..rooms {
        sh.published[k].fetch_add(d(base + k), Ordering::Relaxed);
        sh.members[k].fetch_add(d(base + rooms + k), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plan_and_report_cross_the_process_boundary_intact() {
        let ep = |port: u16| Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            host: format!("127.0.0.1:{port}"),
            path: "/ws".into(),
        };
        let plan = Plan {
            endpoints: vec![ep(18081), ep(18082)],
            resume_endpoint: Some(ep(18083)),
            source_ips: vec![Ipv4Addr::new(127, 0, 0, 7)],
            roles: vec![
                Role::Sub {
                    room: 3,
                    slow: false,
                },
                Role::Sub {
                    room: 0,
                    slow: true,
                },
                Role::Pub { room: 1 },
                Role::Dm { user: 9, device: 1 },
                Role::Plain,
                Role::Member { user: 4, room: 0 },
                Role::Churner { user: 12 },
                Role::Watcher { first: 998 },
            ],
            room_names: vec!["a".into(), "b c".into()],
            user_names: vec!["u\"1".into()],
            threads: 2,
            in_flight_per_thread: 128,
            connect_timeout_ns: 5,
            slow_rcvbuf: 4096,
            traffic: Traffic::Publish,
            senders: vec![2],
            interval_ns: 2.5e6,
            payload_bytes: 64,
            nonce: 77,
            batch_ns: 100_000,
            url_subscribe: true,
            sub_paths: vec!["/ws".into(), "/topic".into()],
            proc_index: 1,
            procs: 3,
            gap: 100,
            stop_every: 5,
            watch: 10,
            cycle_ns: 7_000_000_000,
            away_ns: 6_000_000_000,
        };
        let back = Plan::from_json(&plan.to_json()).expect("plan parses back");
        assert_eq!(back.roles, plan.roles);
        assert_eq!(back.room_names, plan.room_names);
        assert_eq!(back.user_names, plan.user_names);
        assert_eq!(back.source_ips, plan.source_ips);
        assert_eq!(back.senders, plan.senders);
        assert_eq!(
            (back.endpoints.len(), back.traffic, back.interval_ns),
            (2, plan.traffic, plan.interval_ns)
        );
        assert_eq!(back.endpoint(3).addr, plan.endpoints[1].addr);
        assert_eq!(back.endpoint(4).host, "127.0.0.1:18081");
        assert_eq!(back.endpoint_for(4, Open::Resume).host, "127.0.0.1:18083");
        assert_eq!(back.endpoint_for(4, Open::Setup).host, "127.0.0.1:18081");
        assert_eq!(
            (back.proc_index, back.procs, back.url_subscribe),
            (1, 3, true)
        );
        assert_eq!(
            (
                back.gap,
                back.stop_every,
                back.watch,
                back.cycle_ns,
                back.away_ns
            ),
            (100, 5, 10, 7_000_000_000, 6_000_000_000)
        );

        let mut r = WorkerReport::new();
        for v in [1_000u64, 2_000, 2_000, 50_000_000] {
            r.latency.saturating_record(v);
        }
        r.upgrades = 4;
        r.first_start_ns = 11;
        r.fail("connect: refused");
        r.rec("resume", 5_000);
        r.rec("resume", 7_000);
        r.last_again_ns = 99;
        let back = WorkerReport::from_json(&r.to_json());
        assert_eq!(back.hist("resume").len(), 2);
        assert_eq!(back.hist("missing").len(), 0);
        assert_eq!(back.last_again_ns, 99);
        assert_eq!(back.latency.len(), 4);
        assert_eq!(
            back.latency.value_at_quantile(0.5),
            r.latency.value_at_quantile(0.5)
        );
        assert_eq!(back.latency.max(), r.latency.max());
        assert_eq!((back.upgrades, back.first_start_ns), (4, 11));
        assert_eq!(back.failures, r.failures);
    }

    #[test]
    fn child_snapshots_add_up_in_the_controller() {
        // ready, setup_failed, dropped, received, acks, sent, again_ready, again_failed,
        // kind::SLOTS kind slots, published x2, members x2.
        let snap = |head: [u64; 8], k1: u64, rooms: [u64; 4]| -> Vec<u64> {
            let mut v = head.to_vec();
            let mut kinds = [0u64; kind::SLOTS];
            kinds[1] = k1;
            v.extend(kinds);
            v.extend(rooms);
            v
        };
        let total = Shared::new(2);
        let a = snap([5, 1, 0, 100, 0, 7, 2, 0], 3, [3, 4, 10, 20]);
        shared_apply_delta(&total, &[], &a);
        let a2 = snap([6, 1, 0, 150, 0, 9, 3, 1], 5, [4, 4, 10, 20]);
        shared_apply_delta(&total, &a, &a2);
        let b = snap([2, 0, 0, 40, 0, 0, 1, 0], 1, [0, 0, 5, 5]);
        shared_apply_delta(&total, &[], &b);
        assert_eq!(
            shared_snapshot(&total),
            snap([8, 1, 0, 190, 0, 9, 4, 1], 6, [4, 4, 15, 25])
        );
        assert_eq!(total.k(1), 6);
    }

    #[test]
    fn replayed_offsets_are_judged_one_step_at_a_time() {
        assert_eq!(offset_step(3, 4), (0, 0));
        assert_eq!(offset_step(3, 7), (3, 0));
        assert_eq!(offset_step(3, 3), (0, 1));
        assert_eq!(offset_step(3, 1), (0, 1));
        assert_eq!(offset_step(0, 1), (0, 0));
    }

    #[test]
    fn typers_start_renew_and_stop_in_rounds() {
        // 3 typers, every 3rd round a stop: one typer's rounds are start, renew, stop, start...
        let mut typing = false;
        let mut got = Vec::new();
        for round in 0..7u64 {
            let seq = round * 3 + 1; // typer 1
            match typing_step(seq, 3, 3, typing) {
                Some((stop, slot)) => {
                    typing = !stop;
                    got.push(slot);
                }
                None => got.push(usize::MAX),
            }
        }
        use kind::{FIRST_STARTS as F, RENEWALS as R, STOPS as S};
        assert_eq!(got, vec![F, R, S, F, R, S, F]);
        assert_eq!(typing_step(7, 3, 3, false), None);
        // stop_every 0: never a stop.
        assert_eq!(typing_step(1_000, 1, 0, true), Some((false, R)));
    }

    #[test]
    fn typing_event_user_is_read_from_the_frame() {
        let t = br#"{"type":"typing.start","room":"r","data":{"user_id":"lt7t42","room":"r"},"timestamp":1}"#;
        assert!(ws::has_type(t, b"typing.start"));
        assert_eq!(ws::find_str_u64(t, b"\"user_id\":", b"lt7t"), Some(42));
        assert_eq!(ws::find_str_u64(t, b"\"user_id\":", b"lt8t"), None);
        let p = br#"{"type":"presence.offline","data":{"user_id":"lt7p3","status":"offline","text":null,"last_seen":"2026-12-01T21:00:00.000Z"},"timestamp":1}"#;
        assert!(ws::has_type(p, b"presence.offline") && !ws::has_type(p, b"presence.online"));
        assert_eq!(ws::find_str_u64(p, b"\"user_id\":", b"lt7p"), Some(3));
    }

    #[test]
    fn watch_frames_parse_as_json() {
        let v: serde_json::Value =
            serde_json::from_str(&watch_json(&["lt1p0", "lt1p1"])).expect("json");
        assert_eq!(v["type"], "presence.watch");
        assert_eq!(v["user_ids"], serde_json::json!(["lt1p0", "lt1p1"]));
        let v: serde_json::Value = serde_json::from_str(&watch_json(&[])).expect("json");
        assert_eq!(v["user_ids"], serde_json::json!([]));
    }

    #[test]
    fn watchers_are_spread_over_the_churners() {
        let roles: Vec<Role> = (0..10u32)
            .map(|w| Role::Watcher { first: w * 3 % 5 })
            .chain((0..5).map(|u| Role::Churner { user: u }))
            .collect();
        let n = watchers_of(&roles, 5, 3);
        assert_eq!(n.iter().sum::<u32>(), 30);
        assert_eq!(n, vec![6, 6, 6, 6, 6]);
        assert_eq!(watchers_of(&roles, 0, 3), Vec::<u32>::new());
    }

    use super::*;

    #[test]
    fn publish_payload_is_padded_to_size_and_parseable() {
        let mut v = Vec::new();
        publish_json(&mut v, "room-1", 42, 123_456_789, 64);
        let s = std::str::from_utf8(&v).expect("utf8");
        let parsed: serde_json::Value = serde_json::from_str(s).expect("json");
        let data = serde_json::to_string(&parsed["data"]).expect("data");
        assert_eq!(data.len(), 64, "{data}");
        assert_eq!(parsed["data"]["seq"], 42);
        assert_eq!(ws::find_u64(&v, b"\"ts\":"), Some(123_456_789));
        let mut small = Vec::new();
        publish_json(&mut small, "r", 1, 2, 0);
        assert!(serde_json::from_slice::<serde_json::Value>(&small).is_ok());
    }

    #[test]
    fn dm_message_id_carries_time() {
        let mut v = Vec::new();
        dm_json(&mut v, "bob", 7, 99_000, 5, 10);
        let parsed: serde_json::Value = serde_json::from_slice(&v).expect("json");
        assert_eq!(parsed["clientMsgId"], "x99000-7-5");
        assert_eq!(parsed["content"].as_str().map(str::len), Some(10));
        let echoed =
            br#"{"type":"message.ack","data":{"clientMsgId":"x99000-7-5","serverMsgId":"s"}}"#;
        assert_eq!(
            ws::find_str_u64(echoed, b"\"clientMsgId\":", b"x"),
            Some(99_000)
        );
    }
}
