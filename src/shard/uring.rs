//! The shard loop on io_uring (`io_backend = "io_uring"`; the ring is `crate::io::uring`).
//!
//! The same turn as the epoll loop in `shard::run`, with completions in place of readiness:
//! wait in `io_uring_enter` (submitting what the last turn armed); drain the inbox; take mio's
//! events when the epoll fd is readable (the inbox waker, the TLS listener and TLS
//! connections, which stay on epoll); handle completions: a new socket from the multishot
//! accept, bytes from a connection's multishot receive (decoded in place in the ring's buffer,
//! which goes back to the ring in the same turn), EOF or a reset, a socket with room again;
//! then timers, closes and the flush, as under epoll. Sends are `send`/`sendmsg` as under
//! epoll; a socket that fills arms a one-shot `POLLOUT` poll instead of waiting for an
//! edge-triggered writable event.
//!
//! A closed connection's receive (and its `POLLOUT` poll, if armed) is cancelled by
//! user_data, which names the slot and generation: its last completions, and any buffer they
//! carry, are recognised as stale and the buffer goes back to the ring.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd};

use super::*;
use crate::io::uring::{self, Completion, RecvOutcome, Ring, Tag};

/// What the turn asks of the ring, applied before the next submit (the ring is the loop's,
/// not the shard's, so the handlers that decide these can borrow the shard freely).
#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    Recv { fd: i32, slot: u32, gen: u32 },
    PollOut { fd: i32, slot: u32, gen: u32 },
    Cancel(u64),
}

/// The shard's io_uring side: off under epoll (then nothing here is ever touched).
#[derive(Default)]
pub(super) struct UringSide {
    pub(super) on: bool,
    pub(super) ops: Vec<Op>,
    /// Connections with a `POLLOUT` poll armed (at most one each; bounded by the slab).
    pub(super) pollout: HashSet<u32>,
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

    /// A plain connection is being dropped under io_uring: cancel what it has armed.
    pub(super) fn uring_gone(&mut self, slot: u32, gen: u32) {
        self.uring.ops.push(Op::Cancel(uring::recv_data(slot, gen)));
        if self.uring.pollout.remove(&slot) {
            self.uring
                .ops
                .push(Op::Cancel(uring::pollout_data(slot, gen)));
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

    /// Run until drained, on `ring`.
    pub(super) fn run_uring(mut self, mut ring: Ring) -> io::Result<()> {
        self.uring.on = true;
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
            for op in self.uring.ops.drain(..) {
                match op {
                    Op::Recv { fd, slot, gen } => ring.arm_recv(fd, slot, gen)?,
                    Op::PollOut { fd, slot, gen } => ring.arm_pollout(fd, slot, gen)?,
                    Op::Cancel(ud) => ring.cancel(ud)?,
                }
            }
            let timeout = if !self.resume.is_empty() || self.tls_accept_pending || epoll_ready {
                Duration::ZERO
            } else if let Some(std::cmp::Reverse((due, _, _))) = self.deferred.peek() {
                let now_ms = self.node.now_us() / 1000;
                Duration::from_millis(due.saturating_sub(now_ms).min(TIMER_TICK_MS))
            } else {
                Duration::from_millis(TIMER_TICK_MS)
            };
            ring.submit_and_wait(timeout)?;
            ring.reap(&mut done);
            self.refresh_clock();
            if panic_at_ms.is_some_and(|at| self.now_ms >= at) {
                panic!("injected fault: {}=shard_panic_after", crate::fault::ENV);
            }
            self.update_rate_gate();
            for c in &done {
                if c.tag() == Tag::Epoll {
                    epoll_ready = true;
                    if !c.more() {
                        ring.arm_epoll(epoll_fd)?;
                    }
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
                    Ok(()) => self.on_events(&events),
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
                            accept_rearm_tick = Some(self.now_tick + 1);
                        }
                    }
                    Tag::Recv { slot, gen } => {
                        self.on_recv_completion(&mut ring, &c, slot, gen, &mut rearm)
                    }
                    Tag::PollOut { slot, gen } => {
                        if self.live(slot, gen) {
                            self.uring.pollout.remove(&slot);
                            self.mark_dirty(slot);
                        }
                    }
                    Tag::Epoll | Tag::Cancel => {}
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
            RecvOutcome::Eof | RecvOutcome::Error(_) => {
                if live {
                    self.peer_gone(slot);
                }
            }
            RecvOutcome::Cancelled => {}
        }
    }
}
