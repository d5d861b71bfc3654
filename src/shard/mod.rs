//! A shard: one pinned thread, one mio `Poll`, one listener (SO_REUSEPORT), a `Slab` of
//! clients with generation-tagged tokens, a coarse timer wheel, and a bounded inbox (+ one
//! `Waker`) for messages from other shards and the bridge.
//!
//! One loop turn: poll; accept; read and handle frames (replies and fan-out only *queue*
//! shared frames); drain the inbox; fire timers; close what was doomed; then flush every dirty
//! connection with `send`/`sendmsg`, many frames per call (see `flush_dirty` for `write_coalesce`). Nothing here takes a lock on the message
//! path; another shard's clients are reached only through its inbox (`try_send`, counted when
//! full, never blocking).

mod client;
mod handle;
mod timer;

use std::io::{self, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

pub use client::{flag, Client, Grants, Phase};

use crate::auth::Verifier;
use crate::bridge::BridgeMsg;
use crate::config::Config;
use crate::directory::Directory;
use crate::limits::*;
use crate::metrics::{new_latency_histogram, CloseKind, ErrorReason, LocalStats, ShardStats};
use crate::proto::ws::{self, close};
use crate::proto::{Frame, FrameBuilder};
use crate::route::{RoomTable, UserTable};

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);

/// Ticks a closing connection waits for the peer's close reply or EOF before it is dropped.
const CLOSING_GRACE_TICKS: u32 = 20;

/// A message for a shard from another shard or the bridge.
pub enum ShardMsg {
    /// Deliver to the local subscribers of `room`.
    Room { room: Arc<str>, frame: Frame },
    /// Deliver to every local connection that has completed auth.
    All { frame: Frame },
    /// Deliver to the local devices of `user`, except one connection.
    User {
        user: Arc<str>,
        frame: Frame,
        except: Option<ConnRef>,
    },
    /// Stop accepting and close every client with 1001 in batches.
    Drain,
}

/// Names one connection on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
}

/// A shard's inbox as seen by senders.
pub struct Inbox {
    pub tx: Sender<ShardMsg>,
    pub waker: Waker,
    /// Set by the first sender after the shard last drained; saves a wake syscall per message.
    pub wake_pending: AtomicBool,
}

/// Everything the shards share, read-mostly. Built once by the server.
pub struct Node {
    pub cfg: Config,
    pub dir: Directory,
    pub verifier: Option<Verifier>,
    pub inboxes: Vec<Inbox>,
    pub stats: Vec<ShardStats>,
    pub draining: AtomicBool,
    pub bridge_healthy: Arc<AtomicBool>,
    pub bridge_tx: Sender<BridgeMsg>,
    pub clustered: bool,
    pub max_connections: u64,
    pub epoch: Instant,
    pub limits: crate::doctor::Limits,
}

impl Node {
    /// Queue `msg` for `shard` without blocking; false when its inbox is full.
    pub fn send_to_shard(&self, shard: usize, msg: ShardMsg) -> bool {
        let inbox = &self.inboxes[shard];
        match inbox.tx.try_send(msg) {
            Ok(()) => {
                if !inbox.wake_pending.swap(true, Ordering::SeqCst) {
                    let _ = inbox.waker.wake();
                }
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// µs since the node started (the clock frames are stamped with).
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// /ready: not draining and every configured backend up.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Err("draining")
        } else if !self.bridge_healthy.load(Ordering::Relaxed) {
            Err("backend unavailable")
        } else {
            Ok(())
        }
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
    inbox: Receiver<ShardMsg>,
    clients: Slab<Client>,
    rooms: RoomTable,
    users: UserTable,
    next_gen: u32,
    read_buf: Vec<u8>,
    fb: FrameBuilder,
    out: Outbox,
    resume: Vec<u32>,
    wheel: timer::Wheel,
    fired: Vec<(u32, u32)>,
    hist: hdrhistogram::Histogram<u64>,
    dedup_fifo: std::collections::VecDeque<(u64, Arc<str>, Box<str>)>,
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
}

/// Config durations converted to ticks and floats once.
struct Timing {
    handshake: u32,
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

fn ticks(d: Duration) -> u32 {
    (d.as_millis() as u64)
        .div_ceil(TIMER_TICK_MS)
        .max(1)
        .min(u32::MAX as u64) as u32
}

fn unix_ms() -> u64 {
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
        inbox: Receiver<ShardMsg>,
    ) -> io::Result<Shard> {
        let mut listener = listener;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let cfg = &node.cfg;
        let t = Timing {
            handshake: ticks(cfg.handshake_timeout),
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
        let queue_limit = cfg.send_queue_bytes_max;
        let now_us = node.now_us();
        let now_tick = (now_us / 1000 / TIMER_TICK_MS) as u32;
        Ok(Shard {
            id,
            node,
            poll,
            listener: Some(listener),
            accept_pending: false,
            inbox,
            clients: Slab::new(),
            rooms: RoomTable::default(),
            users: UserTable::default(),
            next_gen: 1,
            read_buf,
            fb: FrameBuilder::default(),
            out: Outbox {
                dirty: Vec::new(),
                doomed: Vec::new(),
                stats: LocalStats::default(),
                queue_limit,
                pushed: 0,
            },
            resume: Vec::new(),
            wheel: timer::Wheel::new(now_tick),
            fired: Vec::new(),
            hist: new_latency_histogram(),
            dedup_fifo: std::collections::VecDeque::new(),
            drain: None,
            deferred: std::collections::BinaryHeap::new(),
            coalesce_on: t.coalesce_min_rate == 0,
            load_window_start_us: now_us,
            now_us,
            now_ms: unix_ms(),
            now_tick,
            last_stats_ms: 0,
            t,
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

    /// Run until drained.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL_MAX);
        loop {
            let timeout = if !self.resume.is_empty() || self.accept_pending {
                Duration::ZERO
            } else if let Some(std::cmp::Reverse((due, _, _))) = self.deferred.peek() {
                let now_ms = self.node.now_us() / 1000;
                Duration::from_millis(due.saturating_sub(now_ms).min(TIMER_TICK_MS))
            } else {
                Duration::from_millis(TIMER_TICK_MS)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(shard = self.id, error = %e, "poll failed; shard stops");
                    return;
                }
            }
            self.refresh_clock();
            self.update_rate_gate();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
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
            if self.accept_pending {
                self.accept();
            }
            self.drain_inbox();
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
            if self.now_ms.saturating_sub(self.last_stats_ms) >= STATS_PUBLISH_MS {
                self.publish_stats();
            }
            if self.drain.is_some() && self.drain_step() {
                self.publish_stats();
                return;
            }
        }
    }

    fn live(&self, slot: u32, gen: u32) -> bool {
        self.clients
            .get(slot as usize)
            .is_some_and(|c| c.gen == gen)
    }

    // ---------------------------------------------------------------- accept

    fn accept(&mut self) {
        self.accept_pending = false;
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => self.on_accept(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: leave the backlog and retry next turn.
                    if e.raw_os_error() != Some(libc::ECONNABORTED) {
                        self.accept_pending = true;
                        tracing::warn!(shard = self.id, error = %e, "accept failed; retrying");
                        return;
                    }
                }
            }
        }
        self.accept_pending = true;
    }

    fn on_accept(&mut self, mut stream: mio::net::TcpStream) {
        // Socket options come from the listener (`io::StreamOptions`): no syscall here.
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        if self.next_gen == u32::MAX {
            self.next_gen = 1;
        }
        let rel_ms = self.rel_ms();
        let entry = self.clients.vacant_entry();
        let slot = entry.key();
        if slot > u32::MAX as usize - 2 {
            return;
        }
        if self
            .poll
            .registry()
            .register(
                &mut stream,
                token(slot, gen),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return;
        }
        let c = Client::new(stream, gen, self.now_tick, self.t.burst, rel_ms);
        entry.insert(c);
        self.out.stats.accepted += 1;
        self.out.stats.connections += 1;
        let deadline = self.now_tick + self.t.handshake;
        self.schedule(slot as u32, deadline);
    }

    // ---------------------------------------------------------------- read

    fn on_readable(&mut self, slot: u32) {
        let mut buf = std::mem::take(&mut self.read_buf);
        for i in 0..READS_PER_EVENT_MAX {
            let Some(c) = self.clients.get_mut(slot as usize) else {
                break;
            };
            let r = c.sock.read(&mut buf);
            match r {
                Ok(0) => {
                    self.peer_gone(slot);
                    break;
                }
                Ok(n) => {
                    self.out.stats.bytes_in += n as u64;
                    let full = n == buf.len();
                    if !self.on_bytes(slot, &mut buf[..n]) {
                        break;
                    }
                    if !full {
                        break;
                    }
                    if i + 1 == READS_PER_EVENT_MAX {
                        if let Some(c) = self.clients.get_mut(slot as usize) {
                            if !c.has(flag::RESUME_READ) {
                                c.flags |= flag::RESUME_READ;
                                self.resume.push(slot);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.peer_gone(slot);
                    break;
                }
            }
        }
        self.read_buf = buf;
    }

    /// The peer closed or reset the connection.
    fn peer_gone(&mut self, slot: u32) {
        let Some(c) = self.clients.get(slot as usize) else {
            return;
        };
        let kind = match c.phase {
            Phase::Closing => None, // already counted when the close began
            Phase::Http => Some(CloseKind::Http),
            _ => Some(CloseKind::Abnormal),
        };
        self.close_now(slot, kind);
    }

    /// Handle bytes read for `slot`. Returns false when the connection stopped reading.
    fn on_bytes(&mut self, slot: u32, data: &mut [u8]) -> bool {
        let Some(c) = self.clients.get_mut(slot as usize) else {
            return false;
        };
        match c.phase {
            Phase::Closing => true, // discard until the peer's close or EOF
            Phase::Http => self.on_http_bytes(slot, data),
            _ => {
                c.last_rx_tick = self.now_tick;
                c.flags &= !flag::PING_SENT;
                self.on_ws_bytes(slot, data)
            }
        }
    }

    fn on_http_bytes(&mut self, slot: u32, data: &[u8]) -> bool {
        let max = self.node.cfg.max_request_header_bytes;
        let c = &mut self.clients[slot as usize];
        // Bounded: `on_http_head` refuses an incomplete head past `max` (431), so at most
        // `max` + one read is ever held here.
        let rx = c.rx.get_or_insert_with(Box::default);
        rx.partial.extend_from_slice(data);
        let mut pending = std::mem::take(&mut rx.partial);
        let keep_reading = self.on_http_head(slot, &mut pending, max);
        if let Some(c) = self.clients.get_mut(slot as usize) {
            if let Some(rx) = c.rx.as_mut() {
                if rx.partial.is_empty() && c.phase == Phase::Http {
                    rx.partial = pending;
                }
                if rx.is_idle() {
                    c.rx = None;
                }
            }
        }
        keep_reading
    }

    fn on_ws_bytes(&mut self, slot: u32, data: &mut [u8]) -> bool {
        let c = &mut self.clients[slot as usize];
        let mut pending =
            c.rx.as_mut()
                .map(|rx| std::mem::take(&mut rx.partial))
                .unwrap_or_default();
        let used;
        let alive;
        if pending.is_empty() {
            (used, alive) = self.decode_frames(slot, data);
            if alive && used < data.len() {
                pending.extend_from_slice(&data[used..]);
            }
        } else {
            pending.extend_from_slice(data);
            (used, alive) = self.decode_frames(slot, &mut pending);
            pending.drain(..used);
        }
        if !alive {
            return false;
        }
        if let Some(c) = self.clients.get_mut(slot as usize) {
            if !pending.is_empty() {
                c.rx.get_or_insert_with(Box::default).partial = pending;
            } else if let Some(rx) = c.rx.as_mut() {
                rx.partial = pending;
                if rx.partial.capacity() > RX_RETAIN_BYTES_MAX {
                    rx.partial = Vec::new();
                }
                if rx.is_idle() {
                    c.rx = None;
                }
            }
            c.phase != Phase::Closing
        } else {
            false
        }
    }

    /// Decode and handle frames at the start of `data`. Returns (bytes used, still open).
    fn decode_frames(&mut self, slot: u32, data: &mut [u8]) -> (usize, bool) {
        let max = self.node.cfg.max_message_size;
        let mut pos = 0;
        while pos < data.len() {
            let Some(c) = self.clients.get(slot as usize) else {
                return (pos, false);
            };
            if c.phase == Phase::Closing {
                return (pos, false);
            }
            let held = c.rx.as_ref().map_or(0, |r| r.fragments.len());
            match ws::decode_frame(&mut data[pos..], max.saturating_sub(held)) {
                Err(e) => {
                    self.ws_violation(slot, e);
                    return (pos, false);
                }
                Ok(ws::Decoded::NeedMore) => {
                    // A large text frame still arriving: refuse bad UTF-8 now, not at its end.
                    let c = &mut self.clients[slot as usize];
                    let (in_text, from) = c.rx.as_ref().map_or((false, 0), |rx| {
                        (
                            rx.frag_opcode == ws::opcode::TEXT
                                && rx.utf8_checked as usize == rx.fragments.len(),
                            rx.partial_checked as usize,
                        )
                    });
                    match ws::check_partial_text(&mut data[pos..], in_text, from) {
                        Ok(n) if n > 0 => {
                            c.rx.get_or_insert_with(Box::default).partial_checked = n as u32
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.ws_violation(slot, e);
                            return (pos, false);
                        }
                    }
                    break;
                }
                Ok(ws::Decoded::Frame {
                    fin,
                    opcode,
                    payload,
                    consumed,
                }) => {
                    if let Some(rx) = self.clients[slot as usize].rx.as_mut() {
                        rx.partial_checked = 0;
                    }
                    let range = pos + payload.start..pos + payload.end;
                    pos += consumed;
                    self.out.stats.frames_in += 1;
                    if !self.on_frame(slot, fin, opcode, &mut data[range]) {
                        return (pos, false);
                    }
                }
            }
        }
        (pos, true)
    }

    /// A protocol violation: error frame for size, then close with the code.
    fn ws_violation(&mut self, slot: u32, e: ws::WsError) {
        if e == ws::WsError::TooBig {
            let f = self
                .fb
                .error(self.now_ms, self.now_us, None, "message too large", None);
            self.out.stats.errors[ErrorReason::TooLarge as usize] += 1;
            self.enqueue(slot, f);
        }
        self.close_with(slot, e.code(), e.reason());
    }

    /// One frame. Returns false when the connection is closing.
    fn on_frame(&mut self, slot: u32, fin: bool, op: u8, payload: &mut [u8]) -> bool {
        match op {
            ws::opcode::PING => {
                let pong =
                    Frame::from_wire(&ws::frame_bytes(ws::opcode::PONG, payload), self.now_us);
                self.enqueue(slot, pong);
                true
            }
            ws::opcode::PONG => true,
            ws::opcode::CLOSE => {
                match ws::parse_close(payload) {
                    Ok(code) => {
                        let code = code.unwrap_or(close::NORMAL);
                        self.close_with(slot, code, "");
                    }
                    Err(e) => self.close_with(slot, e.code(), e.reason()),
                }
                false
            }
            _ => {
                let max = self.node.cfg.max_message_size;
                let c = &mut self.clients[slot as usize];
                match ws::assemble(&mut c.rx, fin, op, payload, max) {
                    Err(e) => {
                        self.ws_violation(slot, e);
                        false
                    }
                    Ok(ws::Assembled::Stored) => true,
                    Ok(ws::Assembled::Whole) => self.on_message(slot, op, payload),
                    Ok(ws::Assembled::Complete(op)) => {
                        let mut msg =
                            c.rx.as_mut()
                                .map(|rx| std::mem::take(&mut rx.fragments))
                                .unwrap_or_default();
                        let alive = self.on_message(slot, op, &mut msg);
                        if let Some(rx) = self
                            .clients
                            .get_mut(slot as usize)
                            .and_then(|c| c.rx.as_mut())
                        {
                            msg.clear();
                            if msg.capacity() <= RX_RETAIN_BYTES_MAX {
                                rx.fragments = msg;
                            }
                        }
                        alive
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- output

    fn mark_dirty(&mut self, slot: u32) {
        let c = &mut self.clients[slot as usize];
        if !c.has(flag::DIRTY) && !c.queue.is_empty() {
            c.flags |= flag::DIRTY;
            self.out.dirty.push(slot);
        }
    }

    /// Queue a reply for one client (fan-out uses the same `Outbox::push`). Replies are
    /// urgent: they are written this turn even when `write_coalesce` holds fan-out back.
    fn enqueue(&mut self, slot: u32, frame: Frame) {
        if let Some(c) = self.clients.get_mut(slot as usize) {
            if self.out.push(c, slot, frame, self.now_tick) {
                self.make_urgent(slot);
            }
        }
    }

    /// Write `slot` this turn. A DIRTY client may be waiting in `deferred`, so it is put on
    /// the dirty list again (`flush_dirty` skips the duplicate once the client is no longer DIRTY).
    fn make_urgent(&mut self, slot: u32) {
        let c = &mut self.clients[slot as usize];
        if c.has(flag::URGENT) || c.queue.is_empty() {
            return;
        }
        c.flags |= flag::URGENT | flag::DIRTY;
        self.out.dirty.push(slot);
    }

    /// Write every dirty connection, except that with `write_coalesce` on, a connection
    /// written less than that long ago and holding only fan-out frames waits until that much
    /// time has passed since its last write (in `deferred`), so frames arriving meanwhile share
    /// one `send`. On this project's VM a send costs ~7 us of kernel time whatever its size, so
    /// at high per-connection rates this is the difference between one send per frame and one
    /// per several frames.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.out.dirty);
        let coalesce = self.t.coalesce_ms;
        let deferred_max = DEFERRED_PER_CLIENT_MAX * self.clients.len();
        let rel_ms = self.rel_ms();
        let now_ms = self.now_us / 1000;
        for &slot in &dirty {
            if let Some(c) = self.clients.get_mut(slot as usize) {
                if !c.has(flag::DIRTY) {
                    // A duplicate entry (see `make_urgent`) already flushed this turn.
                    continue;
                }
                if coalesce > 0
                    && self.coalesce_on
                    && self.deferred.len() < deferred_max
                    && !c.has(flag::URGENT)
                    && c.phase != Phase::Closing
                    && rel_ms.wrapping_sub(c.last_write_ms) < coalesce
                {
                    // Stays DIRTY: pushes meanwhile only add to its queue.
                    let due = now_ms + u64::from(coalesce - rel_ms.wrapping_sub(c.last_write_ms));
                    self.deferred.push(std::cmp::Reverse((due, slot, c.gen)));
                    continue;
                }
                c.flags &= !(flag::DIRTY | flag::URGENT);
                self.flush(slot);
            }
        }
        dirty.clear();
        // Keep the allocation unless a burst left it huge.
        if dirty.capacity() > 65_536 {
            dirty.shrink_to(1024);
        }
        debug_assert!(self.out.dirty.is_empty());
        self.out.dirty = dirty;
    }

    /// Every `LOAD_WINDOW_MS`: the frames queued on this shard per second (the offered load,
    /// which does not change with how they are written) decide whether `write_coalesce`
    /// applies: on from `write_coalesce_min_rate`, off below half of it. A lightly loaded
    /// shard never holds a frame back; a busy one trades a little latency for far fewer sends.
    fn update_rate_gate(&mut self) {
        let elapsed_us = self.now_us.saturating_sub(self.load_window_start_us);
        if elapsed_us < LOAD_WINDOW_MS * 1000 {
            return;
        }
        let min = u64::from(self.t.coalesce_min_rate);
        let rate = self.out.pushed * 1_000_000 / elapsed_us.max(1);
        self.coalesce_on = if min == 0 {
            true
        } else if self.coalesce_on {
            rate * 2 >= min
        } else {
            rate >= min
        };
        self.load_window_start_us = self.now_us;
        self.out.pushed = 0;
    }

    /// Moves the deferred connections whose time has come back to the dirty list, as urgent.
    fn release_deferred(&mut self) {
        let now_ms = self.now_us / 1000;
        while let Some(&std::cmp::Reverse((due, slot, gen))) = self.deferred.peek() {
            if due > now_ms {
                break;
            }
            self.deferred.pop();
            if let Some(c) = self.clients.get_mut(slot as usize) {
                if c.gen == gen && c.has(flag::DIRTY) {
                    c.flags |= flag::URGENT;
                    self.out.dirty.push(slot);
                }
            }
        }
        if self.deferred.is_empty() && self.deferred.capacity() > 65_536 {
            self.deferred.shrink_to(1024);
        }
    }

    /// Write as much of the client's queue as the socket takes.
    fn flush(&mut self, slot: u32) {
        let write_max = self.node.cfg.write_buffer_size;
        let now_us = self.now_us;
        let c = &mut self.clients[slot as usize];
        loop {
            if c.queue.is_empty() {
                break;
            }
            let mut iov: [IoSlice; IOVECS_PER_WRITE_MAX] =
                [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let mut n_iov = 0;
            let mut total = 0;
            for (i, f) in c.queue.iter().enumerate() {
                if n_iov == IOVECS_PER_WRITE_MAX || total >= write_max {
                    break;
                }
                let w = if i == 0 {
                    &f.wire()[c.head_off as usize..]
                } else {
                    f.wire()
                };
                iov[n_iov] = IoSlice::new(w);
                n_iov += 1;
                total += w.len();
            }
            let r = crate::io::send_vectored(c.sock.as_raw_fd(), &iov[..n_iov]);
            self.out.stats.writev_calls += 1;
            match r {
                Ok(0) => {
                    self.out
                        .doomed
                        .push((slot, c.gen, Doom::Drop(CloseKind::Abnormal)));
                    return;
                }
                Ok(mut n) => {
                    c.last_write_ms = (now_us / 1000) as u32;
                    self.out.stats.bytes_out += n as u64;
                    self.out.stats.queued_bytes -= n as u64;
                    c.queued -= n as u32;
                    c.stall_tick = self.now_tick;
                    let wrote_all = n == total;
                    while n > 0 {
                        let Some(front) = c.queue.front() else { break };
                        let left = front.wire().len() - c.head_off as usize;
                        if n >= left {
                            n -= left;
                            c.head_off = 0;
                            let born = front.born_us();
                            let _ = self.hist.record(now_us.saturating_sub(born).max(1));
                            self.out.stats.frames_out += 1;
                            c.queue.pop_front();
                        } else {
                            c.head_off += n as u32;
                            n = 0;
                        }
                    }
                    if !wrote_all {
                        break; // the socket is full: wait for writable
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.out
                        .doomed
                        .push((slot, c.gen, Doom::Drop(CloseKind::Abnormal)));
                    return;
                }
            }
        }
        if c.queue.is_empty() {
            if c.queue.capacity() > SEND_QUEUE_RETAIN_SLOTS {
                c.queue = std::collections::VecDeque::new();
            }
            if c.phase == Phase::Closing && !c.has(flag::WRITE_SHUT) {
                c.flags |= flag::WRITE_SHUT;
                let _ = c.sock.shutdown(std::net::Shutdown::Write);
            }
        }
    }

    // ---------------------------------------------------------------- closing

    /// Begin a graceful close: the client stops being a participant now, frames already queued
    /// are still written, then the close frame, then the socket closes.
    fn close_with(&mut self, slot: u32, code: u16, reason: &str) {
        let Some(c) = self.clients.get_mut(slot as usize) else {
            return;
        };
        if c.phase == Phase::Closing {
            return;
        }
        let was_ws = c.phase != Phase::Http;
        if was_ws {
            tracing::debug!(
                shard = self.id,
                client_id = %uuid::Uuid::from_u128(c.uuid()),
                user_id = c.user.as_deref().unwrap_or("-"),
                code,
                reason,
                "closing"
            );
        }
        if code == close::SLOW_CONSUMER {
            // Free the backlog; only a partly written frame must finish.
            let keep = usize::from(c.head_off > 0);
            let dropped: usize = c.queue.iter().skip(keep).map(|f| f.wire().len()).sum();
            c.queue.truncate(keep);
            c.queued -= dropped as u32;
            self.out.stats.queued_bytes -= dropped as u64;
        }
        self.detach(slot);
        let c = &mut self.clients[slot as usize];
        c.phase = Phase::Closing;
        c.rx = None;
        if was_ws {
            let f = Frame::from_wire(&ws::close_frame(code, reason), self.now_us);
            let len = f.wire().len() as u32;
            c.queue.push_back(f);
            c.queued += len;
            self.out.stats.queued_bytes += len as u64;
            self.out.stats.closes[CloseKind::from_code(code) as usize] += 1;
        } else {
            self.out.stats.closes[CloseKind::Http as usize] += 1;
        }
        let deadline = self.now_tick + CLOSING_GRACE_TICKS;
        self.schedule(slot, deadline);
        self.make_urgent(slot);
    }

    /// Answer an HTTP request and close after the response is written.
    fn http_reply(&mut self, slot: u32, bytes: Vec<u8>) {
        let f = Frame::from_wire(&bytes, self.now_us);
        let c = &mut self.clients[slot as usize];
        let len = f.wire().len() as u32;
        c.queue.push_back(f);
        c.queued += len;
        self.out.stats.queued_bytes += len as u64;
        self.close_with(slot, 0, "");
    }

    /// Remove the client from rooms, users and node counts (it stops receiving).
    fn detach(&mut self, slot: u32) {
        let shard = self.id;
        let c = &mut self.clients[slot as usize];
        let memberships = std::mem::take(&mut c.rooms);
        let user = c.user.take();
        let counted = c.has(flag::COUNTED);
        c.flags &= !flag::COUNTED;
        for m in memberships {
            self.leave_room(m);
        }
        if let Some(user) = user {
            if self.users.remove(&user, slot) {
                self.node.dir.user_remove(&user, shard);
            }
        }
        if counted {
            self.node.dir.connections.fetch_sub(1, Ordering::Relaxed);
            self.out.stats.ws_connections -= 1;
        }
    }

    /// Take one membership out of the room table (fixing up the member moved into its place)
    /// and out of the node directory. The caller has removed it from the client's own list.
    fn leave_room(&mut self, m: crate::route::Membership) {
        let left = self.rooms.leave(m);
        if let Some((moved, pos)) = left.moved {
            if let Some(mm) = self
                .clients
                .get_mut(moved as usize)
                .and_then(|mc| mc.rooms.iter_mut().find(|x| x.room == m.room))
            {
                mm.pos = pos;
            }
        }
        self.node
            .dir
            .room_leave(&left.name, self.id, left.last_local);
    }

    /// Drop the connection now.
    fn close_now(&mut self, slot: u32, kind: Option<CloseKind>) {
        if !self.clients.contains(slot as usize) {
            return;
        }
        if self.clients[slot as usize].phase != Phase::Closing {
            self.detach(slot);
        }
        // No epoll_ctl(DEL): the fd is never duplicated, so closing it (dropping `c`) removes
        // it from the epoll set; events of this batch still queued for it are stale by
        // generation. One system call less per disconnect.
        let c = self.clients.remove(slot as usize);
        self.out.stats.queued_bytes -= c.queued as u64;
        self.out.stats.connections -= 1;
        if let Some(kind) = kind {
            self.out.stats.closes[kind as usize] += 1;
            if c.has(flag::WS) {
                tracing::debug!(
                    shard = self.id,
                    client_id = %uuid::Uuid::from_u128(c.uuid()),
                    cause = kind.label(),
                    "dropped"
                );
            }
        }
    }

    fn process_doomed(&mut self) {
        while let Some((slot, gen, doom)) = self.out.doomed.pop() {
            if !self.live(slot, gen) {
                continue;
            }
            match doom {
                Doom::Close(code, reason) => self.close_with(slot, code, reason),
                Doom::Drop(kind) => {
                    let kind =
                        (self.clients[slot as usize].phase != Phase::Closing).then_some(kind);
                    self.close_now(slot, kind);
                }
            }
        }
    }

    // ---------------------------------------------------------------- timers

    /// Make sure a wheel entry fires at or before `tick`.
    fn schedule(&mut self, slot: u32, tick: u32) {
        let c = &mut self.clients[slot as usize];
        if c.deadline_tick > self.now_tick && c.deadline_tick <= tick {
            return;
        }
        c.deadline_tick = self.wheel.schedule(tick, slot, c.gen);
    }

    fn run_timers(&mut self) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(self.now_tick, &mut fired);
        for &(slot, gen) in &fired {
            if !self.live(slot, gen) {
                continue;
            }
            let c = &mut self.clients[slot as usize];
            if c.deadline_tick > self.now_tick {
                continue; // a stale entry; the live one is later
            }
            c.deadline_tick = 0;
            self.on_timer(slot);
        }
        fired.clear();
        if fired.capacity() > 65_536 {
            fired = Vec::new();
        }
        self.fired = fired;
        self.expire_dedup();
    }

    fn on_timer(&mut self, slot: u32) {
        let now = self.now_tick;
        let now_s = (self.now_ms / 1000) as u32;
        let c = &mut self.clients[slot as usize];
        let next = match c.phase {
            Phase::Http => {
                if now >= c.last_rx_tick + self.t.handshake {
                    self.close_now(slot, Some(CloseKind::Http));
                    return;
                }
                c.last_rx_tick + self.t.handshake
            }
            Phase::Closing => {
                self.close_now(slot, None);
                return;
            }
            // While awaiting auth, exp_s holds the auth deadline tick.
            Phase::AwaitAuth if now >= c.exp_s => {
                self.auth_failed_close(slot, None, "authentication timeout");
                return;
            }
            Phase::AwaitAuth | Phase::Open | Phase::Echo => {
                if now >= c.last_rx_tick + self.t.pong {
                    self.close_now(slot, Some(CloseKind::Timeout));
                    return;
                }
                if c.queued > 0 && now >= c.stall_tick + self.t.write_wait {
                    self.close_now(slot, Some(CloseKind::Timeout));
                    return;
                }
                let mut next = c.last_rx_tick + self.t.pong;
                if !c.has(flag::PING_SENT) {
                    if now >= c.last_rx_tick + self.t.ping {
                        c.flags |= flag::PING_SENT;
                        let ping =
                            Frame::from_wire(&ws::frame_bytes(ws::opcode::PING, b""), self.now_us);
                        self.enqueue(slot, ping);
                    } else {
                        next = next.min(c.last_rx_tick + self.t.ping);
                    }
                }
                let c = &mut self.clients[slot as usize];
                if c.queued > 0 {
                    next = next.min(c.stall_tick + self.t.write_wait);
                }
                if c.phase == Phase::AwaitAuth {
                    next = next.min(c.exp_s);
                } else if c.exp_s > 0 {
                    if now_s >= c.exp_s.saturating_add(self.t.grace_s) {
                        let f = self.fb.text(self.now_us, |o| {
                            o.str("type", "auth.expired").u64("timestamp", self.now_ms);
                        });
                        self.enqueue(slot, f);
                        self.close_with(slot, close::TOKEN_EXPIRED, "token expired");
                        return;
                    }
                    let warn_at = c.exp_s.saturating_sub(self.t.refresh_window_s);
                    if now_s >= warn_at && !c.has(flag::EXPIRING_SENT) {
                        c.flags |= flag::EXPIRING_SENT;
                        let exp_ms = c.exp_s as u64 * 1000;
                        let f = self.fb.text(self.now_us, |o| {
                            o.str("type", "auth.expiring")
                                .obj("data", |d| {
                                    d.u64("expires_at", exp_ms);
                                })
                                .u64("timestamp", self.now_ms);
                        });
                        self.enqueue(slot, f);
                    }
                    let c = &self.clients[slot as usize];
                    let target_s = if c.has(flag::EXPIRING_SENT) {
                        c.exp_s.saturating_add(self.t.grace_s)
                    } else {
                        warn_at
                    };
                    let secs = target_s.saturating_sub(now_s);
                    next = next.min(now + ticks(Duration::from_secs(secs as u64)));
                }
                next
            }
        };
        if self.clients.contains(slot as usize) {
            self.schedule(slot, next);
        }
    }

    fn expire_dedup(&mut self) {
        while let Some((exp, _, _)) = self.dedup_fifo.front() {
            if *exp > self.now_ms {
                break;
            }
            if let Some((_, user, cmid)) = self.dedup_fifo.pop_front() {
                self.node.dir.dedup_expire(&user, &cmid, self.now_ms);
            }
        }
    }

    // ---------------------------------------------------------------- inbox, drain, stats

    fn drain_inbox(&mut self) {
        self.node.inboxes[self.id]
            .wake_pending
            .store(false, Ordering::SeqCst);
        for _ in 0..INBOX_PER_TURN_MAX {
            let Ok(msg) = self.inbox.try_recv() else {
                break;
            };
            match msg {
                ShardMsg::Room { room, frame } => {
                    if let Some(id) = self.rooms.lookup(&room) {
                        self.deliver_room(id, &frame);
                    }
                }
                ShardMsg::All { frame } => self.deliver_all(&frame),
                ShardMsg::User {
                    user,
                    frame,
                    except,
                } => self.deliver_user(&user, &frame, except),
                ShardMsg::Drain => self.start_drain(),
            }
        }
        if !self.inbox.is_empty() {
            // More than one turn's worth: come back without sleeping.
            let _ = self.node.inboxes[self.id].waker.wake();
        }
    }

    /// Every local client past auth gets `frame`.
    fn deliver_all(&mut self, frame: &Frame) {
        let Shard {
            clients,
            out,
            now_tick,
            ..
        } = self;
        let mut n = 0;
        for (slot, c) in clients.iter_mut() {
            if c.phase == Phase::Open {
                n += u64::from(out.push(c, slot as u32, frame.clone(), *now_tick));
            }
        }
        out.stats.deliveries += n;
    }

    /// The local devices of `user`, except one connection, get `frame`.
    fn deliver_user(&mut self, user: &str, frame: &Frame, except: Option<ConnRef>) {
        let except = except
            .filter(|e| e.shard as usize == self.id)
            .map(|e| (e.slot, e.gen));
        let Shard {
            users,
            clients,
            out,
            now_tick,
            ..
        } = self;
        let mut n = 0;
        for &slot in users.devices(user) {
            let Some(c) = clients.get_mut(slot as usize) else {
                continue;
            };
            if except != Some((slot, c.gen)) && c.phase == Phase::Open {
                n += u64::from(out.push(c, slot, frame.clone(), *now_tick));
            }
        }
        out.stats.deliveries += n;
    }

    /// The local subscribers of room `id` get `frame`: the fan-out inner loop.
    fn deliver_room(&mut self, id: crate::route::RoomId, frame: &Frame) {
        let Shard {
            rooms,
            clients,
            out,
            now_tick,
            ..
        } = self;
        let mut n = 0;
        for &slot in rooms.members(id) {
            if let Some(c) = clients.get_mut(slot as usize) {
                n += u64::from(out.push(c, slot, frame.clone(), *now_tick));
            }
        }
        out.stats.deliveries += n;
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
            for (slot, gen) in batch {
                if self.live(slot, gen) && self.clients[slot as usize].phase != Phase::Closing {
                    self.close_with(slot, close::GOING_AWAY, "server shutdown");
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
        self.out.stats.rooms = self.rooms.len() as u64;
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

/// Queued output's bookkeeping: the dirty list, connections doomed during a pass, and the
/// shard's counters. Kept apart from the slab and the routing tables so the fan-out loop can
/// borrow a member list, the clients and this at the same time.
struct Outbox {
    dirty: Vec<u32>,
    doomed: Vec<(u32, u32, Doom)>,
    stats: LocalStats,
    /// `send_queue_bytes_max`.
    queue_limit: usize,
    /// Frames queued since the rate gate's window started (see `update_rate_gate`).
    pushed: u64,
}

impl Outbox {
    /// Queue `frame` on `c`, enforcing the send-queue byte limit (over it: doomed with 4008).
    /// Returns whether the frame was queued.
    #[inline]
    fn push(&mut self, c: &mut Client, slot: u32, frame: Frame, now_tick: u32) -> bool {
        if c.phase == Phase::Closing {
            return false;
        }
        let len = frame.wire().len() as u32;
        if c.queued as usize + len as usize > self.queue_limit {
            self.doomed.push((
                slot,
                c.gen,
                Doom::Close(close::SLOW_CONSUMER, "slow consumer"),
            ));
            return false;
        }
        if c.queue.is_empty() {
            c.stall_tick = now_tick;
        }
        c.queued += len;
        self.stats.queued_bytes += len as u64;
        self.pushed += 1;
        c.queue.push_back(frame);
        if !c.has(flag::DIRTY) {
            c.flags |= flag::DIRTY;
            self.dirty.push(slot);
        }
        true
    }
}
