//! Output: queueing frames on a connection (the [`Outbox`]), `write_coalesce`, and flushing
//! dirty connections, split into gathering what to write (`io::gather`) and committing what the
//! kernel took (`io::commit`), so a completion-based backend can drive the same queues.

use std::collections::{HashMap, VecDeque};

use super::*;

impl Shard {
    // ---------------------------------------------------------------- output

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        let tls_out = self.tls_wants_write(slot);
        let c = &mut self.clients[slot as usize];
        if !c.has(flag::DIRTY) && (!c.queue.is_empty() || tls_out) {
            c.flags |= flag::DIRTY;
            self.out.dirty.push(slot);
        }
    }

    /// Queue a reply for one client (fan-out uses the same `Outbox::push`). Replies are
    /// urgent: they are written this turn even when `write_coalesce` holds fan-out back.
    pub(super) fn reply(&mut self, slot: u32, frame: Frame) {
        if let Some(c) = self.clients.get_mut(slot as usize) {
            if self.out.push(c, slot, frame, self.now_tick) {
                self.make_urgent(slot);
            }
        }
    }

    /// Write `slot` this turn. A DIRTY client may be waiting in `deferred`, so it is put on
    /// the dirty list again (`flush_dirty` skips the duplicate once the client is no longer DIRTY).
    pub(super) fn make_urgent(&mut self, slot: u32) {
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
    pub(super) fn flush_dirty(&mut self) {
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
                if self.uring.ring_sends && self.uring.send_in_flight(slot) {
                    // Its send's completion puts it back on the list; DIRTY (and URGENT)
                    // stay set until then.
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
    pub(super) fn update_rate_gate(&mut self) {
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
    pub(super) fn release_deferred(&mut self) {
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

    /// The kernel took `n` bytes of `slot`'s queue: count them, record the frames written
    /// whole, and pop them (`commit`).
    pub(super) fn wrote(&mut self, slot: u32, n: usize) {
        let now_us = self.now_us;
        let c = &mut self.clients[slot as usize];
        c.last_write_ms = (now_us / 1000) as u32;
        self.out.stats.bytes_out += n as u64;
        self.out.stats.queued_bytes -= n as u64;
        c.queued -= n as u32;
        c.stall_tick = self.now_tick;
        let hist = &mut self.hist;
        let frames = commit(&mut c.queue, &mut c.head_off, n, |f| {
            let _ = hist.record(now_us.saturating_sub(f.born_us()).max(1));
        });
        self.out.stats.frames_out += frames;
    }

    /// `slot`'s queue is empty: give back a large queue's memory, and after a closing
    /// connection's last frame shut the write side.
    pub(super) fn flushed(&mut self, slot: u32) {
        let c = &mut self.clients[slot as usize];
        if c.queue.capacity() > SEND_QUEUE_RETAIN_SLOTS {
            c.queue = std::collections::VecDeque::new();
        }
        if c.phase == Phase::Closing && !c.has(flag::WRITE_SHUT) {
            c.flags |= flag::WRITE_SHUT;
            crate::io::shutdown_write(&c.sock);
        }
    }

    /// Write as much of the client's queue as the socket takes: gather, one send, commit.
    /// Under io_uring with `io_uring_sends`, the send is submitted to the ring instead and
    /// committed on its completion (`shard::uring`).
    pub(super) fn flush(&mut self, slot: u32) {
        if self.is_tls(slot) {
            return self.flush_tls(slot);
        }
        if self.uring.ring_sends {
            return self.flush_ring(slot);
        }
        let write_max = self.node.cfg.write_buffer_size;
        loop {
            let c = &mut self.clients[slot as usize];
            if c.queue.is_empty() {
                break;
            }
            let mut iov: [IoSlice; IOVECS_PER_WRITE_MAX] =
                [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let (n_iov, total) = gather(&c.queue, c.head_off, write_max, &mut iov);
            let r = crate::io::send_vectored(c.sock.as_raw_fd(), &iov[..n_iov]);
            self.out.stats.writev_calls += 1;
            match r {
                Ok(0) => {
                    self.out
                        .doomed
                        .push((slot, c.gen, Doom::Drop(CloseKind::Abnormal)));
                    return;
                }
                Ok(n) => {
                    self.wrote(slot, n);
                    if n != total {
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
        if !self.clients[slot as usize].queue.is_empty() {
            // The socket is full. Under epoll its writable edge marks it dirty again; under
            // io_uring a one-shot POLLOUT poll does.
            if self.uring.on {
                self.uring_wants_write(slot);
            }
        } else {
            self.flushed(slot);
        }
    }
}

/// Queued output's bookkeeping: the dirty list, connections doomed during a pass, and the
/// shard's counters. Kept apart from the slab and the routing tables so the fan-out loop can
/// borrow a member list, the clients and this at the same time.
pub(super) struct Outbox {
    pub(super) dirty: Vec<u32>,
    pub(super) doomed: Vec<(u32, u32, Doom)>,
    pub(super) stats: LocalStats,
    /// `send_queue_bytes_max`.
    pub(super) queue_limit: usize,
    /// Frames queued since the rate gate's window started (see `update_rate_gate`).
    pub(super) pushed: u64,
    /// The last native frame each dialect encoded, and what it became: a fan-out to
    /// connections of a dialect encodes once, on the first such recipient, and every later
    /// one shares the result (see [`Outbox::push`]). Holding the source frame keeps its
    /// identity unique while cached.
    pub(super) dialect_cache: [Option<DialectCached>; crate::dialect::DIALECTS],
    /// Per-connection dialect state, only for connections that have some (the topic
    /// protocol's subscriptions); removed when the connection detaches. Bounded by the
    /// connections of the shard.
    pub(super) edge: HashMap<u32, crate::dialect::EdgeState>,
}

/// One dialect's encoding of one native frame.
pub(super) struct DialectCached {
    src: Frame,
    out: Vec<Frame>,
    class: crate::dialect::Class,
}

impl Outbox {
    /// Queue `frame` on `c`, enforcing the send-queue byte limit (over it: doomed with 4008).
    /// An empty queue admits any one frame, however large: `send_queue_bytes_max` bounds a
    /// backlog, and a frame bigger than it (a 1 MiB echo with the default 1 MiB queue) on a
    /// reader that keeps up is no backlog. The largest single frame is bounded elsewhere
    /// (`max_message_size` inbound, `max_dm_content_bytes`, the HTTP body limit).
    /// Returns whether the frame was queued.
    #[inline]
    pub(super) fn push(&mut self, c: &mut Client, slot: u32, frame: Frame, now_tick: u32) -> bool {
        if c.dialect != 0 {
            return self.push_edge(c, slot, frame, now_tick);
        }
        self.push_raw(c, slot, frame, now_tick)
    }

    /// [`Outbox::push`] for a connection of another dialect: its JSON frames are translated
    /// (once per dialect per native frame, shared by every recipient of that dialect) and
    /// filtered by the connection's edge state; anything else (the 101 response, control
    /// frames) goes as is. Returns whether anything was queued.
    fn push_edge(&mut self, c: &mut Client, slot: u32, frame: Frame, now_tick: u32) -> bool {
        use crate::dialect::{self, Dialect};
        let d = Dialect::from_byte(c.dialect);
        if d == Dialect::Native || !frame.is_text() || c.phase == Phase::Closing {
            return self.push_raw(c, slot, frame, now_tick);
        }
        let i = d as usize;
        if !self.dialect_cache[i]
            .as_ref()
            .is_some_and(|e| e.src.same(&frame))
        {
            let prefix = frame.born_prefix();
            let enc = dialect::encode(d, frame.payload(), prefix);
            let out = enc
                .frames
                .iter()
                .map(|json| Frame::text_from_json(json, prefix))
                .collect();
            self.stats.dialect_encodes += 1;
            self.dialect_cache[i] = Some(DialectCached {
                src: frame,
                out,
                class: enc.class,
            });
        }
        let Some(e) = self.dialect_cache[i].as_ref() else {
            return false;
        };
        if !dialect::wants(d, self.edge.get(&slot), &e.class) {
            return false;
        }
        if let Some(cmid) = &e.class.settles {
            // A reply to this one connection that settles a send its edge state holds.
            let st = self.edge.entry(slot).or_default();
            let own = dialect::settle(d, st, e.src.payload(), cmid);
            if st.is_empty() {
                self.edge.remove(&slot);
            }
            if let Some(own) = own {
                let prefix = e.src.born_prefix();
                let frames: Vec<Frame> = own
                    .iter()
                    .map(|json| Frame::text_from_json(json, prefix))
                    .collect();
                let mut queued = false;
                for f in frames {
                    queued |= self.push_raw(c, slot, f, now_tick);
                }
                return queued;
            }
        }
        let mut queued = false;
        for k in 0..e.out.len() {
            let Some(f) = self.dialect_cache[i].as_ref().map(|e| e.out[k].clone()) else {
                break;
            };
            queued |= self.push_raw(c, slot, f, now_tick);
        }
        queued
    }

    /// Queue a frame as is (no dialect translation).
    #[inline]
    pub(super) fn push_raw(
        &mut self,
        c: &mut Client,
        slot: u32,
        frame: Frame,
        now_tick: u32,
    ) -> bool {
        if c.phase == Phase::Closing {
            return false;
        }
        let len = frame.wire().len() as u32;
        // The queue test first: a reader that keeps up never reads the frame's prefix here.
        if c.queued as usize > self.queue_limit / 2 && frame.is_droppable() {
            // Falling behind: a droppable frame (typing) is the first thing to go.
            self.stats.droppable_dropped += 1;
            return false;
        }
        if c.queued > 0 && c.queued as usize + len as usize > self.queue_limit {
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

/// Gather what to write next from a send queue: up to `iov.len()` frames and about
/// `write_max` bytes, the first from `head_off` (its part already written). Returns (iovecs
/// used, bytes in them). Sans-IO: a readiness backend hands the slices to `sendmsg`, a
/// completion backend to a submitted send, and both hand the count written to [`commit`].
pub(super) fn gather<'q>(
    queue: &'q VecDeque<Frame>,
    head_off: u32,
    write_max: usize,
    iov: &mut [IoSlice<'q>],
) -> (usize, usize) {
    let mut n_iov = 0;
    let mut total = 0;
    for (i, f) in queue.iter().enumerate() {
        if n_iov == iov.len() || total >= write_max {
            break;
        }
        let w = if i == 0 {
            &f.wire()[head_off as usize..]
        } else {
            f.wire()
        };
        iov[n_iov] = IoSlice::new(w);
        n_iov += 1;
        total += w.len();
    }
    (n_iov, total)
}

/// Commit `n` bytes written from the front of a send queue: pop every frame written whole
/// (calling `done` with each), and leave `head_off` at the part of the next one written.
/// Returns the frames completed. `n` must not exceed what [`gather`] offered.
pub(super) fn commit(
    queue: &mut VecDeque<Frame>,
    head_off: &mut u32,
    mut n: usize,
    mut done: impl FnMut(&Frame),
) -> u64 {
    let mut frames = 0;
    while n > 0 {
        let Some(front) = queue.front() else {
            debug_assert!(false, "committed more than was queued");
            break;
        };
        let left = front.wire().len() - *head_off as usize;
        if n >= left {
            n -= left;
            *head_off = 0;
            done(front);
            frames += 1;
            queue.pop_front();
        } else {
            *head_off += n as u32;
            n = 0;
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(frames: &[&[u8]]) -> VecDeque<Frame> {
        frames.iter().map(|w| Frame::from_wire(w, 7)).collect()
    }

    #[test]
    fn gather_respects_head_offset_iovecs_and_byte_budget() {
        let queue = q(&[b"aaaa", b"bb", b"cccccc"]);
        let mut iov = [IoSlice::new(&[]); 2];
        assert_eq!(gather(&queue, 1, 1 << 20, &mut iov), (2, 5));
        assert_eq!(&*iov[0], b"aaa");
        assert_eq!(&*iov[1], b"bb");
        let mut iov = [IoSlice::new(&[]); 8];
        // The budget is checked before each frame: a frame that starts under it goes whole.
        assert_eq!(gather(&queue, 0, 5, &mut iov), (2, 6));
        assert_eq!(gather(&VecDeque::new(), 0, 5, &mut iov), (0, 0));
    }

    #[test]
    fn commit_pops_whole_frames_and_keeps_a_short_write_offset() {
        let mut queue = q(&[b"aaaa", b"bb", b"cccccc"]);
        let mut head = 1u32;
        let mut seen = Vec::new();
        // A short send: the rest of the first frame and half of the second.
        let n = commit(&mut queue, &mut head, 4, |f| seen.push(f.wire().to_vec()));
        assert_eq!(n, 1);
        assert_eq!(seen, vec![b"aaaa".to_vec()]);
        assert_eq!((queue.len(), head), (2, 1));
        // Nothing written: nothing changes.
        assert_eq!(commit(&mut queue, &mut head, 0, |_| {}), 0);
        assert_eq!((queue.len(), head), (2, 1));
        // The rest of everything.
        assert_eq!(commit(&mut queue, &mut head, 1 + 6, |_| {}), 2);
        assert!(queue.is_empty());
        assert_eq!(head, 0);
    }
}
