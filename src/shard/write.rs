//! Output: queueing frames on a connection (the [`Outbox`]), `write_coalesce`, and flushing
//! dirty connections, split into gathering what to write (`io::gather`) and committing what the
//! kernel took (`io::commit`), so a completion-based backend can drive the same queues.

use super::*;

impl Shard {
    // ---------------------------------------------------------------- output

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        let c = &mut self.clients[slot as usize];
        if !c.has(flag::DIRTY) && !c.queue.is_empty() {
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

    /// Write as much of the client's queue as the socket takes.
    pub(super) fn flush(&mut self, slot: u32) {
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
        if c.phase == Phase::Closing {
            return false;
        }
        let len = frame.wire().len() as u32;
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
