//! The shard loop on io_uring (`io_backend = "io_uring"`; the ring is `crate::io::uring`).
//!
//! The same turn as the epoll loop in `shard::run`, with completions in place of readiness:
//! wait in `io_uring_enter` (submitting what the last turn armed); drain the inbox; take mio's
//! events when the epoll fd is readable (the inbox waker, the TLS listener and TLS
//! connections, which stay on epoll); handle completions: a new socket from the multishot
//! accept, bytes from a connection's multishot receive (decoded in place in the ring's buffer,
//! which goes back to the ring in the same turn), EOF or a reset, a send's bytes taken, a
//! socket with room again; then timers, closes and the flush, as under epoll.
//!
//! Sends (`io_uring_sends`, the default): the flush prepares one `sendmsg` per dirty
//! connection ([`SendOp`]: the message, its iovecs and the frames' `Arc`s) and the next wait
//! submits them all in one `io_uring_enter`; at most one per connection is in the ring, and
//! its completion commits what the kernel took with the same accounting as under epoll. With
//! `io_uring_sends: false` they are `send`/`sendmsg` calls as under epoll, and a socket that
//! fills arms a one-shot `POLLOUT` poll in place of the edge-triggered writable event.
//!
//! A closed connection's receive, `POLLOUT` poll and send are cancelled by user_data, which
//! names the slot and generation: their last completions, and any buffer they carry, are
//! recognised as stale; a receive buffer goes back to the ring, and a send's op (with its
//! frames) is freed only at its completion.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd};

use super::write::gather;
use super::*;
use crate::io::uring::{self, Completion, RecvOutcome, Ring, Tag};

/// What the turn asks of the ring, applied before the next submit (the ring is the loop's,
/// not the shard's, so the handlers that decide these can borrow the shard freely).
#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    Recv {
        fd: i32,
        slot: u32,
        gen: u32,
    },
    PollOut {
        fd: i32,
        slot: u32,
        gen: u32,
    },
    /// Submit the send prepared in `UringSide::sends` for `slot` (skipped when the
    /// connection closed before the submit).
    Send {
        slot: u32,
    },
    Cancel(u64),
}

/// One send in the ring (`io_uring_sends`): the message, its iovecs, and the frames they
/// point into, held (their `Arc`s) until the completion, so a connection closed or a queue
/// cut while the kernel reads them never frees them early. Boxed, so the message and the
/// iovecs keep their address while the box moves between maps; reused (`UringSide::pool`).
pub(super) struct SendOp {
    gen: u32,
    fd: i32,
    submitted: bool,
    /// Bytes gathered (what a complete send takes).
    total: usize,
    msg: libc::msghdr,
    /// At most `IOVECS_PER_WRITE_MAX`; on the heap, sized to what sends needed, so an op
    /// costs about 130 B plus 24 B per frame (a fan-out to 19,500 connections has as many
    /// ops in the ring at once).
    iov: Vec<libc::iovec>,
    frames: Vec<Frame>,
}

// SAFETY: the raw pointers in `msg` and `iov` point only into this op's own `iov` array and
// into the frames it holds; they are used by the kernel and by the shard thread that owns the
// op, never shared. The op moves between threads only before the shard runs (empty).
unsafe impl Send for SendOp {}

impl SendOp {
    fn new() -> Box<SendOp> {
        Box::new(SendOp {
            gen: 0,
            fd: -1,
            submitted: false,
            total: 0,
            // SAFETY: msghdr is plain data; all-zero is a valid empty message.
            msg: unsafe { std::mem::zeroed() },
            iov: Vec::new(),
            frames: Vec::new(),
        })
    }
}

/// Waits of 10 ms for the cancelled sends' completions when a shard on io_uring ends.
const SETTLE_WAITS_MAX: usize = 20;

/// Spare send ops a shard may always keep for reuse, whatever its recent peak.
const SEND_OP_POOL_MIN: usize = 256;
/// The most spare send ops a shard keeps, whatever its recent peak; past it a finished op is
/// freed. A spare is about 700 B with its allocator headers once `follow_peak` has cut its
/// arrays to `SEND_OP_ARRAYS_KEPT` (about 2.2 KB until then, at most a second), so at most
/// about 22 MiB per shard, held only while a fan-out of that many connections per flush goes
/// on.
const SEND_OP_POOL_MAX: usize = 32_768;
/// How often the pool's bound follows the peak number of ops in use: a shard that flushes N
/// connections at once (a room's fan-out under `write_coalesce`) keeps N spare ops between
/// flushes instead of freeing and allocating them again every flush (the allocator's share
/// of a fan-out on io_uring was 3-5 % of the shard's time with a fixed 256), and a second
/// after the burst ends the spares beyond the new peak are freed. (A room that publishes
/// less than once a second sees its peak only every other window: its flushes allocate.)
const SEND_OP_POOL_WINDOW_MS: u64 = 1_000;
/// Iovec and frame slots a spare op keeps allocated past a window's end; a larger array (a
/// backlog's send of up to `IOVECS_PER_WRITE_MAX` frames) is cut to this by `follow_peak`,
/// once a second, never on the send path, where a pooled op keeps what it grew to.
const SEND_OP_ARRAYS_KEPT: usize = 16;

/// The shard's io_uring side: off under epoll (then nothing here is ever touched).
#[derive(Default)]
pub(super) struct UringSide {
    pub(super) on: bool,
    /// Sends go through the ring (`io_uring_sends`); false: `send`/`sendmsg` as under epoll.
    pub(super) ring_sends: bool,
    pub(super) ops: Vec<Op>,
    /// Connections with a `POLLOUT` poll armed (at most one each; bounded by the slab).
    pub(super) pollout: HashSet<u32>,
    /// The send in the ring per connection, by slot: at most one each (the next is prepared
    /// when it completes). A side table like `Shard::tls`: 8 B per slot up to the highest slot
    /// that sent through the ring, nothing in `Client`.
    pub(super) sends: Vec<Option<Box<SendOp>>>,
    /// Sends of connections that closed while the kernel had them, by user_data, until their
    /// completion (cancelled at the close, so it comes soon). Bounded by the slab too: a slot
    /// is reused only by a later generation, whose user_data differs.
    pub(super) orphans: HashMap<u64, Box<SendOp>>,
    /// Boxed on purpose: an op's message points at its own iovecs, so it must keep its
    /// address when it moves between this pool and the maps.
    #[allow(clippy::vec_box)]
    pub(super) pool: Vec<Box<SendOp>>,
    /// How many spare ops `pool` may hold: the peak of `ops_out` over the last window,
    /// between `SEND_OP_POOL_MIN` and `SEND_OP_POOL_MAX`.
    pool_keep: usize,
    /// Ops out of the pool (prepared, in the ring, or orphaned).
    ops_out: usize,
    /// The most ops out at once in the current window.
    ops_out_peak: usize,
    /// When the current window began (the shard's `now_ms`).
    pool_window_start_ms: u64,
}

impl UringSide {
    /// Frames of `slot`'s queue the kernel may be reading (a cut of the queue keeps them).
    pub(super) fn frames_in_flight(&self, slot: u32) -> usize {
        self.sends
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map_or(0, |op| op.frames.len())
    }

    /// Whether `slot` has a send in the ring (or prepared for the next submit).
    #[inline]
    pub(super) fn send_in_flight(&self, slot: u32) -> bool {
        self.sends.get(slot as usize).is_some_and(Option::is_some)
    }

    /// A send op for a new send: a spare one when there is one.
    fn take_op(&mut self) -> Box<SendOp> {
        self.ops_out += 1;
        self.ops_out_peak = self.ops_out_peak.max(self.ops_out);
        self.pool.pop().unwrap_or_else(SendOp::new)
    }

    /// A finished op back to the pool (or freed past the pool's bound).
    fn recycle(&mut self, mut op: Box<SendOp>) {
        debug_assert!(self.ops_out > 0, "an op recycled twice or not from take_op");
        self.ops_out = self.ops_out.saturating_sub(1);
        op.frames.clear();
        op.iov.clear();
        op.submitted = false;
        if self.pool.len() < self.pool_keep.max(SEND_OP_POOL_MIN) {
            self.pool.push(op);
        }
    }

    /// Once a `SEND_OP_POOL_WINDOW_MS` window: the pool may keep as many spares as were out
    /// at once in the window that ended; the spares beyond that are freed.
    pub(super) fn follow_peak(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.pool_window_start_ms) < SEND_OP_POOL_WINDOW_MS {
            return;
        }
        self.pool_window_start_ms = now_ms;
        self.pool_keep = self.ops_out_peak.clamp(SEND_OP_POOL_MIN, SEND_OP_POOL_MAX);
        self.ops_out_peak = self.ops_out;
        if self.pool.len() > self.pool_keep {
            self.pool.truncate(self.pool_keep);
            self.pool.shrink_to(self.pool_keep);
        }
        for op in &mut self.pool {
            if op.iov.capacity() > SEND_OP_ARRAYS_KEPT {
                op.iov.shrink_to(SEND_OP_ARRAYS_KEPT);
            }
            if op.frames.capacity() > SEND_OP_ARRAYS_KEPT {
                op.frames.shrink_to(SEND_OP_ARRAYS_KEPT);
            }
        }
    }
}

impl Shard {
    /// A plain connection entered the slab under io_uring: arm its receive.
    pub(super) fn uring_accepted(&mut self, slot: u32) {
        let c = &self.clients[slot as usize];
        self.uring.ops.push(Op::Recv {
            fd: c.sock.as_raw_fd(),
            slot,
            gen: c.gen,
        });
    }

    /// A plain connection is being dropped under io_uring: cancel what it has armed. A send
    /// the kernel has is kept (with its frames) until its completion.
    pub(super) fn uring_gone(&mut self, slot: u32, gen: u32) {
        self.uring.ops.push(Op::Cancel(uring::recv_data(slot, gen)));
        if self.uring.pollout.remove(&slot) {
            self.uring
                .ops
                .push(Op::Cancel(uring::pollout_data(slot, gen)));
        }
        if let Some(op) = self
            .uring
            .sends
            .get_mut(slot as usize)
            .and_then(Option::take)
        {
            if op.submitted {
                let ud = uring::send_data(slot, op.gen);
                self.uring.ops.push(Op::Cancel(ud));
                self.uring.orphans.insert(ud, op);
            } else {
                // Prepared this turn, not yet in the ring: its `Op::Send` finds nothing.
                self.uring.recycle(op);
            }
        }
    }

    /// `flush` with `io_uring_sends`: gather what the queue holds into a send op and have it
    /// submitted before the next wait, with every other connection's of this turn (one
    /// `io_uring_enter` for all). One send per connection in the ring at a time; its
    /// completion commits and flushes again.
    pub(super) fn flush_ring(&mut self, slot: u32) {
        if self.uring.send_in_flight(slot) {
            return; // its completion flushes the rest
        }
        let write_max = self.node.cfg.write_buffer_size;
        let c = &self.clients[slot as usize];
        if c.queue.is_empty() {
            self.flushed(slot);
            return;
        }
        let mut op = self.uring.take_op();
        let mut iov: [IoSlice; IOVECS_PER_WRITE_MAX] = [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
        let (n_iov, total) = gather(&c.queue, c.head_off, write_max, &mut iov);
        op.iov.clear();
        op.iov.extend(iov[..n_iov].iter().map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        op.frames.clear();
        op.frames.extend(c.queue.iter().take(n_iov).cloned());
        op.gen = c.gen;
        op.fd = c.sock.as_raw_fd();
        op.total = total;
        op.submitted = false;
        // SAFETY: msghdr is plain data; all-zero is a valid empty message.
        op.msg = unsafe { std::mem::zeroed() };
        op.msg.msg_iov = op.iov.as_mut_ptr();
        op.msg.msg_iovlen = n_iov as _;
        self.out.stats.writev_calls += 1;
        let sends = &mut self.uring.sends;
        if sends.len() <= slot as usize {
            sends.resize_with(slot as usize + 1, || None);
        }
        sends[slot as usize] = Some(op);
        self.uring.ops.push(Op::Send { slot });
    }

    /// A send's completion: commit what the kernel took and flush the rest, or drop the
    /// connection on an error. A closed connection's send only frees its op.
    fn on_send_completion(&mut self, c: &Completion, slot: u32, gen: u32) {
        let ud = c.user_data;
        if !self.uring.orphans.is_empty() {
            if let Some(op) = self.uring.orphans.remove(&ud) {
                self.uring.recycle(op);
                return;
            }
        }
        let live = self.live(slot, gen);
        let Some(entry) = self.uring.sends.get_mut(slot as usize) else {
            return;
        };
        if entry.as_ref().is_none_or(|op| op.gen != gen) || !live {
            // Not this send's (cannot happen: a close moves a submitted send to `orphans`).
            return;
        }
        let Some(op) = entry.take() else { return };
        let total = op.total;
        self.uring.recycle(op);
        match c.result {
            n if n > 0 => {
                self.wrote(slot, n as usize);
                let c = &mut self.clients[slot as usize];
                if c.queue.is_empty() {
                    c.flags &= !(flag::DIRTY | flag::URGENT);
                    self.flushed(slot);
                } else if (n as usize) < total {
                    // A short send: the rest of what was gathered goes out this turn.
                    c.flags |= flag::URGENT | flag::DIRTY;
                    self.out.dirty.push(slot);
                } else if c.has(flag::DIRTY) {
                    // Frames queued while the send was in the ring (`flush_dirty` left the
                    // connection DIRTY, and URGENT if a reply is among them): flushed now
                    // under the same `write_coalesce` rule as any other.
                    self.out.dirty.push(slot);
                } else {
                    self.mark_dirty(slot);
                }
            }
            e if e == -libc::EINTR || e == -libc::EAGAIN => {
                // Nothing taken: send again this turn (flags may still be set from while it
                // was in the ring, so `make_urgent` could not be relied on to list it).
                let c = &mut self.clients[slot as usize];
                c.flags |= flag::URGENT | flag::DIRTY;
                self.out.dirty.push(slot);
            }
            _ => {
                // 0 or an error (a reset, a cancel by the write-stall timer's close).
                self.out
                    .doomed
                    .push((slot, gen, Doom::Drop(CloseKind::Abnormal)));
            }
        }
    }

    /// A plain connection's socket is full with frames still queued: wake it when it has room.
    pub(super) fn uring_wants_write(&mut self, slot: u32) {
        if !self.uring.pollout.insert(slot) {
            return;
        }
        let c = &self.clients[slot as usize];
        self.uring.ops.push(Op::PollOut {
            fd: c.sock.as_raw_fd(),
            slot,
            gen: c.gen,
        });
    }

    /// Run until drained, on `ring`. On every way out (done, an error, a panic) the sends
    /// still in the ring are cancelled and waited for; what cannot be confirmed finished, and
    /// the receive buffers, are leaked rather than freed, because the kernel ends a closed
    /// ring's requests in the background and could still read a frame or fill a buffer.
    pub(super) fn run_uring(mut self, ring: Ring) -> io::Result<()> {
        let mut ring = ring;
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.uring_loop(&mut ring)));
        self.uring_settle(&mut ring);
        for op in self.uring.sends.drain(..).flatten() {
            std::mem::forget(op);
        }
        for (_, op) in self.uring.orphans.drain() {
            std::mem::forget(op);
        }
        ring.close_leaking_buffers();
        match r {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// At exit: cancel the sends still in the ring and wait a little for their completions;
    /// the ops confirmed finished are freed.
    fn uring_settle(&mut self, ring: &mut Ring) {
        let uds: Vec<u64> = self
            .uring
            .sends
            .iter()
            .enumerate()
            .filter_map(|(slot, op)| op.as_ref().map(|op| (slot as u32, op)))
            .filter(|(_, op)| op.submitted)
            .map(|(slot, op)| uring::send_data(slot, op.gen))
            .chain(self.uring.orphans.keys().copied())
            .collect();
        // Prepared but never submitted: the kernel never saw them.
        for entry in self.uring.sends.iter_mut() {
            if entry.as_ref().is_some_and(|op| !op.submitted) {
                *entry = None;
            }
        }
        if uds.is_empty() {
            return;
        }
        for ud in &uds {
            let _ = ring.cancel(*ud);
        }
        let mut pending: HashSet<u64> = uds.into_iter().collect();
        let mut done = Vec::new();
        for _ in 0..SETTLE_WAITS_MAX {
            if pending.is_empty() || ring.submit_and_wait(Duration::from_millis(10)).is_err() {
                break;
            }
            ring.reap(&mut done);
            for c in done.drain(..) {
                if let Tag::Send { slot, .. } = c.tag() {
                    if pending.remove(&c.user_data) {
                        // Finished: its op may be freed.
                        self.uring.orphans.remove(&c.user_data);
                        if let Some(e) = self.uring.sends.get_mut(slot as usize) {
                            if e.as_ref()
                                .is_some_and(|op| uring::send_data(slot, op.gen) == c.user_data)
                            {
                                *e = None;
                            }
                        }
                    }
                }
            }
        }
    }

    fn uring_loop(&mut self, ring: &mut Ring) -> io::Result<()> {
        let ring = &mut *ring;
        self.uring.on = true;
        self.uring.ring_sends = self.node.cfg.io_uring_sends;
        let listener_fd = match self.listener.as_mut() {
            Some(l) => {
                // Plain connections arrive through the ring, not through epoll.
                self.poll.registry().deregister(l)?;
                l.as_raw_fd()
            }
            None => -1,
        };
        if listener_fd >= 0 {
            ring.arm_accept(listener_fd)?;
        }
        let epoll_fd = self.poll.as_raw_fd();
        ring.arm_epoll(epoll_fd)?;
        let panic_at_ms = match self.node.faults.shard_panic_after {
            Some((shard, ms)) if shard == self.id => Some(self.now_ms + ms),
            _ => None,
        };
        let mut events = Events::with_capacity(EVENTS_PER_POLL_MAX);
        let mut done: Vec<Completion> = Vec::with_capacity(1024);
        let mut rearm: Vec<(u32, u32)> = Vec::new();
        // mio is looked at when the ring says the epoll fd is readable, and once a tick
        // whatever it said (a lost wake-up costs at most a tick, never a hang).
        let mut epoll_ready = true;
        let mut epoll_tick = self.now_tick;
        let mut accept_rearm_tick: Option<u32> = None;
        loop {
            let clients = &self.clients;
            // A connection closed after its op was queued has closed its fd, whose number the
            // kernel may already have given to a new socket: its ops are skipped.
            let live =
                |slot: u32, gen: u32| clients.get(slot as usize).is_some_and(|c| c.gen == gen);
            let UringSide { ops, sends, .. } = &mut self.uring;
            for op in ops.drain(..) {
                match op {
                    Op::Recv { fd, slot, gen } if live(slot, gen) => {
                        ring.arm_recv(fd, slot, gen)?
                    }
                    Op::PollOut { fd, slot, gen } if live(slot, gen) => {
                        ring.arm_pollout(fd, slot, gen)?
                    }
                    Op::Recv { .. } | Op::PollOut { .. } => {}
                    Op::Send { slot } => {
                        if let Some(op) = sends.get_mut(slot as usize).and_then(Option::as_mut) {
                            if !op.submitted {
                                op.submitted = true;
                                let ud = uring::send_data(slot, op.gen);
                                // SAFETY: the op (message, iovecs, the frames' Arcs) stays
                                // boxed in `sends` or `orphans` until this send's
                                // completion is reaped (`on_send_completion`), and is only
                                // freed then; the ring is dropped before the shard's maps.
                                unsafe {
                                    if op.msg.msg_iovlen == 1 {
                                        ring.submit_send_one(op.fd, &op.iov[0], ud)?
                                    } else {
                                        ring.submit_send(op.fd, &op.msg, ud)?
                                    }
                                };
                            }
                        }
                    }
                    Op::Cancel(ud) => ring.cancel(ud)?,
                }
            }
            let timeout = self.wait_timeout(epoll_ready);
            ring.submit_and_wait(timeout)?;
            ring.reap(&mut done);
            self.refresh_clock();
            if panic_at_ms.is_some_and(|at| self.now_ms >= at) {
                panic!("injected fault: {}=shard_panic_after", crate::fault::ENV);
            }
            self.update_rate_gate();
            self.uring.follow_peak(self.now_ms);
            // Our own writes' progress first: under epoll a send is committed when it is made,
            // so the queue (and its `send_queue_bytes_max`) counts only what the kernel has not
            // taken; a send's completion reaped this turn is applied before this turn's input
            // can queue more behind it.
            for c in &done {
                match c.tag() {
                    Tag::Epoll => {
                        epoll_ready = true;
                        if !c.more() {
                            ring.arm_epoll(epoll_fd)?;
                        }
                    }
                    Tag::Send { slot, gen } => self.on_send_completion(c, slot, gen),
                    Tag::PollOut { slot, gen } if self.live(slot, gen) => {
                        self.uring.pollout.remove(&slot);
                        self.mark_dirty(slot);
                    }
                    _ => {}
                }
            }
            if self.now_tick != epoll_tick {
                epoll_ready = true;
                epoll_tick = self.now_tick;
            }
            // The inbox first, as under epoll (see `run`).
            self.drain_inbox();
            if epoll_ready {
                epoll_ready = false;
                match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => {
                        self.on_events(&events);
                        // A full batch may have left events behind: look again next turn.
                        epoll_ready = events.iter().count() == EVENTS_PER_POLL_MAX;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            for c in done.drain(..) {
                match c.tag() {
                    Tag::Accept => {
                        if c.result >= 0 {
                            // SAFETY: a new socket from accept, owned by nothing else.
                            let stream = unsafe { mio::net::TcpStream::from_raw_fd(c.result) };
                            if let Some(slot) = self.on_accept(stream, false) {
                                self.uring_accepted(slot);
                            }
                        } else if c.result != -libc::ECONNABORTED {
                            // EMFILE/ENFILE and friends: the backlog waits; try next tick.
                            let e = io::Error::from_raw_os_error(-c.result);
                            tracing::warn!(shard = self.id, error = %e, "accept failed; retrying");
                        }
                        if !c.more() && accept_rearm_tick.is_none() {
                            // Out of fds or memory: the backlog waits a tick. Otherwise (a
                            // full completion queue ended it, an aborted connection) at once.
                            let wait =
                                [-libc::EMFILE, -libc::ENFILE, -libc::ENOMEM, -libc::ENOBUFS]
                                    .contains(&c.result);
                            accept_rearm_tick = Some(self.now_tick + u32::from(wait));
                        }
                    }
                    Tag::Recv { slot, gen } => {
                        self.on_recv_completion(ring, &c, slot, gen, &mut rearm)
                    }
                    Tag::Send { .. } | Tag::PollOut { .. } | Tag::Epoll | Tag::Cancel => {}
                }
            }
            ring.bufs.publish();
            for (slot, gen) in rearm.drain(..) {
                if self.live(slot, gen) {
                    self.uring_accepted(slot);
                }
            }
            if let Some(at) = accept_rearm_tick {
                if self.now_tick >= at && listener_fd >= 0 {
                    ring.arm_accept(listener_fd)?;
                    accept_rearm_tick = None;
                }
            }
            if self.end_turn() {
                return Ok(());
            }
        }
    }

    fn on_recv_completion(
        &mut self,
        ring: &mut Ring,
        c: &Completion,
        slot: u32,
        gen: u32,
        rearm: &mut Vec<(u32, u32)>,
    ) {
        let live = self.live(slot, gen);
        match uring::recv_outcome(c) {
            RecvOutcome::Data { bid, len } => {
                if live {
                    self.out.stats.bytes_in += len as u64;
                    let data = ring.bufs.data(bid, len);
                    self.on_bytes(slot, data);
                }
                ring.bufs.give_back(bid);
                if !c.more() && self.live(slot, gen) {
                    rearm.push((slot, gen));
                }
            }
            RecvOutcome::NoBuffers => {
                if live {
                    rearm.push((slot, gen));
                }
            }
            RecvOutcome::Error(e) if e == libc::EAGAIN || e == libc::EINTR => {
                if live {
                    rearm.push((slot, gen));
                }
            }
            RecvOutcome::Eof | RecvOutcome::Error(_) => {
                if live {
                    self.peer_gone(slot);
                }
            }
            RecvOutcome::Cancelled => {
                // Ours come only after a close (then it is not live); one on a live
                // connection is the kernel's: the connection still needs its receive.
                if live {
                    rearm.push((slot, gen));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burst(u: &mut UringSide, n: usize) {
        let ops: Vec<_> = (0..n).map(|_| u.take_op()).collect();
        assert_eq!(u.ops_out, n);
        for op in ops {
            u.recycle(op);
        }
        assert_eq!(u.ops_out, 0);
    }

    #[test]
    fn the_send_op_pool_keeps_the_last_windows_peak_and_frees_the_spares_after_it() {
        let mut u = UringSide::default();
        // A fan-out flush of 1,000 connections at once: in the first window only the floor
        // is kept.
        burst(&mut u, 1_000);
        assert_eq!(u.pool.len(), SEND_OP_POOL_MIN);
        // Not a window yet: nothing changes.
        u.follow_peak(SEND_OP_POOL_WINDOW_MS - 1);
        assert_eq!(u.pool_keep, 0);
        u.follow_peak(SEND_OP_POOL_WINDOW_MS);
        assert_eq!(u.pool_keep, 1_000);
        // The next flushes reuse them: no op is freed and allocated again.
        burst(&mut u, 1_000);
        assert_eq!(u.pool.len(), 1_000);
        burst(&mut u, 1_000);
        assert_eq!(u.pool.len(), 1_000);
        u.follow_peak(2 * SEND_OP_POOL_WINDOW_MS);
        assert_eq!(u.pool_keep, 1_000);
        assert_eq!(u.pool.len(), 1_000);
        // A quiet window: the spares past the floor are freed at its end.
        u.follow_peak(3 * SEND_OP_POOL_WINDOW_MS);
        assert_eq!(u.pool_keep, SEND_OP_POOL_MIN);
        assert_eq!(u.pool.len(), SEND_OP_POOL_MIN);
        // Ops still out at a window's end count for the next window's peak.
        let held: Vec<_> = (0..300).map(|_| u.take_op()).collect();
        u.follow_peak(4 * SEND_OP_POOL_WINDOW_MS);
        assert_eq!(u.ops_out_peak, 300);
        for op in held {
            u.recycle(op);
        }
        u.follow_peak(5 * SEND_OP_POOL_WINDOW_MS);
        assert_eq!(u.pool_keep, 300);
    }

    #[test]
    fn the_send_op_pool_is_bounded_and_cuts_its_spares_arrays_once_a_window() {
        let mut u = UringSide {
            ops_out_peak: 10 * SEND_OP_POOL_MAX,
            ..UringSide::default()
        };
        u.follow_peak(SEND_OP_POOL_WINDOW_MS);
        assert_eq!(u.pool_keep, SEND_OP_POOL_MAX);
        let mut op = u.take_op();
        op.iov.reserve(IOVECS_PER_WRITE_MAX);
        op.frames.reserve(IOVECS_PER_WRITE_MAX);
        let grown = op.iov.capacity();
        assert!(grown > SEND_OP_ARRAYS_KEPT);
        u.recycle(op);
        // On the send path a pooled op keeps what it grew to (no realloc per send)...
        let op = u.pool.last().expect("kept");
        assert_eq!(op.iov.capacity(), grown);
        assert!(!op.submitted && op.iov.is_empty() && op.frames.is_empty());
        // ...and the window's end cuts it.
        u.follow_peak(2 * SEND_OP_POOL_WINDOW_MS);
        let op = u.pool.last().expect("kept");
        assert!(
            op.iov.capacity() <= SEND_OP_ARRAYS_KEPT,
            "{}",
            op.iov.capacity()
        );
        assert!(op.frames.capacity() <= SEND_OP_ARRAYS_KEPT);
    }
}
