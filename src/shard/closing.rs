//! Closing: graceful closes (queued frames, then the close frame), immediate drops, and
//! detaching a connection from every table and service.

use super::*;

impl Shard {
    // ---------------------------------------------------------------- closing

    /// Begin a graceful close: the client stops being a participant now, frames already queued
    /// are still written, then the close frame, then the socket closes.
    pub(super) fn close_with(&mut self, slot: u32, code: u16, reason: &str) {
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
            // Under io_uring the kernel may be reading the first frames still: those stay.
            let keep = usize::from(c.head_off > 0).max(self.uring.frames_in_flight(slot));
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
        // The grace runs from now (`last_rx_tick` no longer measures liveness once closing):
        // an earlier timer entry still pending (the one an upgrade sets for the next tick)
        // must not cut it short; `on_timer` waits until it has passed.
        let c = &mut self.clients[slot as usize];
        c.last_rx_tick = self.now_tick;
        let deadline = self.now_tick + CLOSING_GRACE_TICKS;
        self.schedule(slot, deadline);
        self.make_urgent(slot);
    }

    /// Answer an HTTP request and close after the response is written.
    pub(super) fn http_reply(&mut self, slot: u32, bytes: Vec<u8>) {
        let f = Frame::from_wire(&bytes, self.now_us);
        let c = &mut self.clients[slot as usize];
        let len = f.wire().len() as u32;
        c.queue.push_back(f);
        c.queued += len;
        self.out.stats.queued_bytes += len as u64;
        self.close_with(slot, 0, "");
    }

    /// Remove the client from every service, the user table and the node counts (it stops
    /// receiving and stops being a participant).
    pub(super) fn detach(&mut self, slot: u32) {
        service::on_detach(self, slot);
        self.leave_all_topics(slot);
        self.out.edge.remove(&slot);
        service::session::clear_identity(self, slot);
        let c = &mut self.clients[slot as usize];
        let counted = c.has(flag::COUNTED);
        c.flags &= !flag::COUNTED;
        if counted {
            crate::admission::connection_gone(&self.node);
            self.out.stats.ws_connections -= 1;
        }
    }

    /// Drop the connection now.
    pub(super) fn close_now(&mut self, slot: u32, kind: Option<CloseKind>) {
        if !self.clients.contains(slot as usize) {
            return;
        }
        if self.clients[slot as usize].phase != Phase::Closing {
            self.detach(slot);
        }
        // No epoll_ctl(DEL): the fd is never duplicated, so closing it (dropping `c`) removes
        // it from the epoll set; events of this batch still queued for it are stale by
        // generation. One system call less per disconnect.
        if self.uring.on && !self.is_tls(slot) {
            let gen = self.clients[slot as usize].gen;
            self.uring_gone(slot, gen);
        }
        self.tls_gone(slot);
        let c = self.clients.remove(slot as usize);
        // A server API request still waiting for another shard's answer: nobody to answer.
        if !self.http_waiting.is_empty() {
            self.http_waiting.remove(&(slot, c.gen));
        }
        if !self.auth_parked.is_empty() {
            self.auth_parked.remove(&(slot, c.gen));
        }
        if !self.rpc_in_flight.is_empty() {
            self.rpc_in_flight.remove(&(slot, c.gen));
        }
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

    pub(super) fn process_doomed(&mut self) {
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
}
