//! Accepting connections and reading from them: recv into the per-shard buffer, the HTTP
//! phase's head buffering, WebSocket frame decoding in place, control frames, reassembly.

use super::*;

impl Shard {
    // ---------------------------------------------------------------- accept

    pub(super) fn accept(&mut self) {
        self.accept_pending = false;
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match crate::io::accept(listener) {
                Ok(stream) => {
                    self.on_accept(stream, true);
                }
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

    /// Take a new connection into the slab, its handshake timer set, registered with epoll
    /// when `epoll` (under io_uring a plain connection's receive is armed by the caller).
    /// Returns its slot (None: no slot or registration failed, and the socket is closed).
    pub(super) fn on_accept(
        &mut self,
        mut stream: mio::net::TcpStream,
        epoll: bool,
    ) -> Option<u32> {
        // Socket options come from the listener (`io::StreamOptions`): no syscall here.
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        if self.next_gen == u32::MAX {
            self.next_gen = 1;
        }
        let rel_ms = self.rel_ms();
        let entry = self.clients.vacant_entry();
        let slot = entry.key();
        if slot > timer::SLOT_MAX as usize
            || (self.uring.on && slot >= crate::io::uring::SLOT_LIMIT as usize)
        {
            return None;
        }
        if epoll && crate::io::register(&self.poll, &mut stream, token(slot, gen)).is_err() {
            return None;
        }
        let c = Client::new(stream, gen, self.now_tick, self.t.burst, rel_ms);
        entry.insert(c);
        self.out.stats.accepted += 1;
        self.out.stats.connections += 1;
        let deadline = self.now_tick + self.t.handshake;
        self.schedule(slot as u32, deadline);
        Some(slot as u32)
    }

    // ---------------------------------------------------------------- read

    pub(super) fn on_readable(&mut self, slot: u32) {
        if self.is_tls(slot) {
            return self.on_tls_readable(slot);
        }
        let mut buf = std::mem::take(&mut self.read_buf);
        for i in 0..READS_PER_EVENT_MAX {
            let Some(c) = self.clients.get_mut(slot as usize) else {
                break;
            };
            let r = crate::io::recv(&mut c.sock, &mut buf);
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
    pub(super) fn peer_gone(&mut self, slot: u32) {
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
    pub(super) fn on_bytes(&mut self, slot: u32, data: &mut [u8]) -> bool {
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

    pub(super) fn on_http_bytes(&mut self, slot: u32, data: &[u8]) -> bool {
        let max = self.node.cfg.max_request_header_bytes;
        let c = &mut self.clients[slot as usize];
        let waiting = self.http_waiting.contains_key(&(slot, c.gen));
        // Bounded: `on_http_head` refuses an incomplete head past `max` (431) and a body past
        // `http_body_bytes_max` (413), so at most one request and one read is held here; while
        // an API answer is awaited, bytes are only kept, up to the same bound.
        let rx = c.rx.get_or_insert_with(Box::default);
        if waiting && rx.partial.len() + data.len() > max + self.node.cfg.http_body_bytes_max {
            self.close_now(slot, Some(CloseKind::Http));
            return false;
        }
        rx.partial.extend_from_slice(data);
        if waiting {
            return true;
        }
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

    pub(super) fn on_ws_bytes(&mut self, slot: u32, data: &mut [u8]) -> bool {
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
    pub(super) fn decode_frames(&mut self, slot: u32, data: &mut [u8]) -> (usize, bool) {
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
    pub(super) fn ws_violation(&mut self, slot: u32, e: ws::WsError) {
        if e == ws::WsError::TooBig {
            let f = self
                .fb
                .error(self.now_ms, self.now_us, None, "message too large", None);
            self.out.stats.errors[ErrorReason::TooLarge as usize] += 1;
            self.reply(slot, f);
        }
        self.close_with(slot, e.code(), e.reason());
    }

    /// One frame. Returns false when the connection is closing.
    pub(super) fn on_frame(&mut self, slot: u32, fin: bool, op: u8, payload: &mut [u8]) -> bool {
        match op {
            ws::opcode::PING => {
                let pong =
                    Frame::from_wire(&ws::frame_bytes(ws::opcode::PONG, payload), self.now_us);
                self.reply(slot, pong);
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
}
