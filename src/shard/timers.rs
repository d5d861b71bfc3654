//! Per-connection timers on the keyed wheel: handshake, auth, ping/pong, write stall, token
//! expiry; and the dispatch of service timers.

use super::*;

impl Shard {
    // ---------------------------------------------------------------- timers

    /// Make sure a wheel entry fires at or before `tick`.
    pub(super) fn schedule(&mut self, slot: u32, tick: u32) {
        let c = &mut self.clients[slot as usize];
        if c.deadline_tick > self.now_tick && c.deadline_tick <= tick {
            return;
        }
        c.deadline_tick = self.wheel.schedule(tick, TimerKey::conn(slot, c.gen));
    }

    pub(super) fn run_timers(&mut self) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(self.now_tick, &mut fired);
        for &key in &fired {
            let (slot, gen) = match key.get() {
                timer::Timer::Conn { slot, gen } => (slot, gen),
                timer::Timer::Service { service, key } => {
                    service::on_timer(self, service, key);
                    continue;
                }
            };
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
    }

    pub(super) fn on_timer(&mut self, slot: u32) {
        let now = self.now_tick;
        let now_s = (self.now_ms / 1000) as u32;
        // TLS: the handshake has its own timeout, and records rustls holds are queued output
        // for write_wait.
        let tls_handshaking = self.tls_handshaking(slot);
        let tls_out = self.tls_wants_write(slot);
        let c = &mut self.clients[slot as usize];
        let next = match c.phase {
            Phase::Http => {
                // A first request must complete within handshake_timeout of the accept; a
                // kept-alive connection (`exp_s` requests served) within http_keepalive_timeout
                // of its last response.
                // A request waiting for another shard or the bridge gets `answer_wait`, which
                // outlasts `store_timeout`: the bridge answers first, even with an error.
                let waiting = self.http_waiting.contains_key(&(slot, c.gen));
                let limit = if tls_handshaking {
                    self.t.tls_handshake
                } else if waiting {
                    self.t.keepalive.max(self.t.answer_wait)
                } else if c.exp_s > 0 {
                    self.t.keepalive
                } else {
                    self.t.handshake
                };
                if now >= c.last_rx_tick + limit {
                    if waiting {
                        let gen = c.gen;
                        self.http_waiting.remove(&(slot, gen));
                        let text = "no answer in time, retry later";
                        self.http_reply(slot, crate::http::json_error(503, text));
                        return;
                    }
                    if tls_handshaking {
                        self.out.stats.tls_handshake_failures += 1;
                    }
                    self.close_now(slot, Some(CloseKind::Http));
                    return;
                }
                c.last_rx_tick + limit
            }
            Phase::Closing if now >= c.last_rx_tick + CLOSING_GRACE_TICKS => {
                self.close_now(slot, None);
                return;
            }
            // Fired early (an entry set before the close began): wait out the grace.
            Phase::Closing => c.last_rx_tick + CLOSING_GRACE_TICKS,
            // While awaiting auth, exp_s holds the auth deadline tick.
            Phase::AwaitAuth if now >= c.exp_s => {
                service::session::auth_failed_close(self, slot, None, "authentication timeout");
                return;
            }
            Phase::AwaitAuth | Phase::Open | Phase::Echo => {
                if now >= c.last_rx_tick + self.t.pong {
                    self.close_now(slot, Some(CloseKind::Timeout));
                    return;
                }
                if (c.queued > 0 || tls_out) && now >= c.stall_tick + self.t.write_wait {
                    self.close_now(slot, Some(CloseKind::Timeout));
                    return;
                }
                let mut next = c.last_rx_tick + self.t.pong;
                if !c.has(flag::PING_SENT) {
                    if now >= c.last_rx_tick + self.t.ping {
                        c.flags |= flag::PING_SENT;
                        let ping =
                            Frame::from_wire(&ws::frame_bytes(ws::opcode::PING, b""), self.now_us);
                        self.reply(slot, ping);
                    } else {
                        next = next.min(c.last_rx_tick + self.t.ping);
                    }
                }
                let c = &mut self.clients[slot as usize];
                if c.queued > 0 || tls_out {
                    next = next.min(c.stall_tick + self.t.write_wait);
                }
                if c.phase == Phase::AwaitAuth {
                    next = next.min(c.exp_s);
                } else if c.exp_s > 0 {
                    if now_s >= c.exp_s.saturating_add(self.t.grace_s) {
                        let f = self.fb.text(self.now_us, |o| {
                            o.str("type", "auth.expired").u64("timestamp", self.now_ms);
                        });
                        self.reply(slot, f);
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
                        self.reply(slot, f);
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

    /// Schedule a service timer: `service::on_timer(service, key)` runs at `tick` or later
    /// (typing TTLs, presence grace, call ring timeouts).
    pub(crate) fn schedule_service(&mut self, tick: u32, service: u8, key: u64) -> u32 {
        self.wheel.schedule(tick, TimerKey::service(service, key))
    }
}
