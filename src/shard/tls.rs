//! TLS connections (`tls_port`): one `rustls::ServerConnection` per connection, driven
//! sans-IO by the shard. Socket bytes read into the shard's read buffer go to `read_tls` and
//! `process_new_packets`; the plaintext they give goes to the same HTTP and WebSocket decoding
//! as a plain connection's bytes ([`Shard::on_bytes`]). Output is the same send queue, with the
//! same `send_queue_bytes_max` and `write_wait`: frames are encrypted through `writer()` only
//! once rustls has handed its previous records to the socket (so at most
//! `TLS_SEND_BUFFER_BYTES_MAX` is encrypted ahead of the socket), then `write_tls` sends them.
//!
//! The TLS state lives in a side table indexed by slot (`Shard::tls`), not in [`Client`]: a
//! plain connection pays nothing (the table stays empty on a node without `tls_port`, and a
//! plain slot's entry is one null pointer). A connection keeps the config it was accepted
//! with; after a SIGHUP reload the shard takes the new one at its next TLS accept.
//!
//! Cost, measured (docs/BENCHMARKS.md, "TLS cost", 2-vCPU VM, 5,000 idle connections): 8,250 B
//! of server memory per idle TLS connection against 283 B plain, and ~240 us of shard CPU per
//! full handshake (286 us against 44 us for a plain connection's whole set-up).
//!
//! Peer input never panics: a handshake that fails (not TLS, a bad record, an alert, no
//! common version or suite, or not done within `tls_handshake_timeout`) closes that
//! connection and is counted (`switchboard_tls_handshake_failures_total`).

use std::io::Read as _;

use super::*;

/// One TLS connection's state.
pub(super) struct TlsConn {
    conn: rustls::ServerConnection,
    /// Its handshake completed (counted in `tls_handshakes` and the `tls_connections`
    /// gauge); a connection that ends without it counts as a failed handshake.
    open: bool,
}

impl Shard {
    /// Whether `slot` is a TLS connection (a plain node: one length test).
    #[inline]
    pub(super) fn is_tls(&self, slot: u32) -> bool {
        !self.tls.is_empty() && self.tls.get(slot as usize).is_some_and(Option::is_some)
    }

    fn tls_mut(&mut self, slot: u32) -> Option<&mut TlsConn> {
        self.tls
            .get_mut(slot as usize)
            .and_then(|t| t.as_deref_mut())
    }

    /// Whether rustls holds records the socket has not taken yet.
    #[inline]
    pub(super) fn tls_wants_write(&self, slot: u32) -> bool {
        !self.tls.is_empty()
            && self
                .tls
                .get(slot as usize)
                .and_then(|t| t.as_deref())
                .is_some_and(|t| t.conn.wants_write())
    }

    /// Whether `slot` is a TLS connection whose handshake has not finished.
    pub(super) fn tls_handshaking(&self, slot: u32) -> bool {
        !self.tls.is_empty()
            && self
                .tls
                .get(slot as usize)
                .and_then(|t| t.as_deref())
                .is_some_and(|t| !t.open)
    }

    // ---------------------------------------------------------------- accept

    pub(super) fn accept_tls(&mut self) {
        self.tls_accept_pending = false;
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let Some(listener) = self.tls_listener.as_ref() else {
                return;
            };
            match crate::io::accept(listener) {
                Ok(stream) => self.on_accept_tls(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.raw_os_error() != Some(libc::ECONNABORTED) {
                        self.tls_accept_pending = true;
                        tracing::warn!(shard = self.id, error = %e, "TLS accept failed; retrying");
                        return;
                    }
                }
            }
        }
        self.tls_accept_pending = true;
    }

    fn on_accept_tls(&mut self, stream: mio::net::TcpStream) {
        let Some(node_tls) = self.node.tls.as_ref() else {
            return;
        };
        // A reload since the last accept: take the new config (one atomic load otherwise).
        let gen = node_tls.generation();
        if self.tls_config.as_ref().is_none_or(|(g, _)| *g != gen) {
            self.tls_config = Some(node_tls.current());
        }
        let Some((_, config)) = self.tls_config.as_ref() else {
            return;
        };
        let mut conn = match rustls::ServerConnection::new(config.clone()) {
            Ok(c) => c,
            Err(e) => {
                // Only a config rustls refuses does this, and the config was built at start.
                tracing::error!(shard = self.id, error = %e, "cannot start a TLS connection");
                return;
            }
        };
        conn.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES_MAX));
        let Some(slot) = self.on_accept(stream, true) else {
            return;
        };
        if self.tls.len() <= slot as usize {
            self.tls.resize_with(slot as usize + 1, || None);
        }
        debug_assert!(self.tls[slot as usize].is_none(), "stale TLS state");
        self.tls[slot as usize] = Some(Box::new(TlsConn { conn, open: false }));
        let deadline = self.now_tick + self.t.tls_handshake;
        self.schedule(slot, deadline);
    }

    /// The connection is being dropped: forget its TLS state.
    pub(super) fn tls_gone(&mut self, slot: u32) {
        if let Some(t) = self.tls.get_mut(slot as usize).and_then(Option::take) {
            if t.open {
                self.out.stats.tls_connections -= 1;
            }
        }
    }

    // ---------------------------------------------------------------- read

    /// `on_readable` for a TLS connection: recv, decrypt, decode the plaintext.
    pub(super) fn on_tls_readable(&mut self, slot: u32) {
        let mut buf = std::mem::take(&mut self.read_buf);
        let mut plain_total = 0usize;
        for i in 0..READS_PER_EVENT_MAX {
            let Some(c) = self.clients.get_mut(slot as usize) else {
                break;
            };
            match crate::io::recv(&mut c.sock, &mut buf) {
                Ok(0) => {
                    self.tls_peer_gone(slot);
                    break;
                }
                Ok(n) => {
                    self.out.stats.bytes_in += n as u64;
                    let full = n == buf.len();
                    match self.on_tls_bytes(slot, &buf[..n]) {
                        Some(p) => plain_total += p,
                        None => break,
                    }
                    if !full {
                        break;
                    }
                    if i + 1 == READS_PER_EVENT_MAX
                        || plain_total >= TLS_PLAINTEXT_PER_EVENT_BYTES_MAX
                    {
                        if let Some(c) = self.clients.get_mut(slot as usize) {
                            if !c.has(flag::RESUME_READ) {
                                c.flags |= flag::RESUME_READ;
                                self.resume.push(slot);
                            }
                        }
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.tls_peer_gone(slot);
                    break;
                }
            }
        }
        self.read_buf = buf;
    }

    /// The peer's TCP connection ended (EOF or error): a handshake it left unfinished counts
    /// as failed.
    fn tls_peer_gone(&mut self, slot: u32) {
        if self.tls_handshaking(slot) {
            self.out.stats.tls_handshake_failures += 1;
        }
        self.peer_gone(slot);
    }

    /// Feed socket bytes to rustls and the plaintext they give to the decoding. Returns the
    /// plaintext bytes handled, or None when the connection stopped reading (closed, closing).
    fn on_tls_bytes(&mut self, slot: u32, data: &[u8]) -> Option<usize> {
        let mut rd: &[u8] = data;
        let mut plain = std::mem::take(&mut self.tls_plain);
        let mut handled = 0usize;
        let outcome = loop {
            if rd.is_empty() {
                break Some(handled);
            }
            let Some(t) = self.tls_mut(slot) else {
                break None;
            };
            match t.conn.read_tls(&mut rd) {
                // After the peer's close_notify rustls reads nothing more: the rest is noise.
                Ok(0) => break Some(handled),
                Ok(_) => {}
                Err(e) => {
                    self.tls_failed(slot, &e.to_string());
                    break None;
                }
            }
            let state = match t.conn.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    self.tls_failed(slot, &e.to_string());
                    break None;
                }
            };
            let handshake_done = !t.open && !t.conn.is_handshaking();
            if handshake_done {
                t.open = true;
            }
            let wants_write = t.conn.wants_write();
            let closed = state.peer_has_closed();
            let mut avail = state.plaintext_bytes_to_read();
            if handshake_done {
                self.out.stats.tls_handshakes += 1;
                self.out.stats.tls_connections += 1;
                // The upgrade request's handshake_timeout runs from here.
                if let Some(c) = self.clients.get_mut(slot as usize) {
                    c.last_rx_tick = self.now_tick;
                }
            }
            if wants_write {
                self.tls_urgent(slot);
            }
            let mut stopped = false;
            while avail > 0 {
                let Some(t) = self.tls_mut(slot) else {
                    stopped = true;
                    break;
                };
                let k = t.conn.reader().read(&mut plain).unwrap_or(0);
                if k == 0 {
                    break;
                }
                avail = avail.saturating_sub(k);
                handled += k;
                if !self.on_bytes(slot, &mut plain[..k]) {
                    stopped = true;
                    break;
                }
            }
            if stopped {
                break None;
            }
            if closed {
                // close_notify: the peer sends no more. An HTTP answer still queued goes out
                // first, then our close_notify (a plain connection's FIN is likewise read only
                // after the turn's flush); a close already under way finishes as it is; a
                // WebSocket gone without a close frame is dropped, as at EOF.
                let (phase, queued) = self
                    .clients
                    .get(slot as usize)
                    .map_or((Phase::Closing, false), |c| (c.phase, !c.queue.is_empty()));
                match phase {
                    Phase::Http if queued => self.close_with(slot, 0, ""),
                    Phase::Closing => {}
                    _ => self.peer_gone(slot),
                }
                break None;
            }
        };
        self.tls_plain = plain;
        outcome
    }

    /// rustls refused what the peer sent: send the alert it queued (best effort, one write),
    /// count a failed handshake (when it had not completed), drop the connection.
    fn tls_failed(&mut self, slot: u32, error: &str) {
        let handshaking = self.tls_handshaking(slot);
        let Some(c) = self.clients.get(slot as usize) else {
            return;
        };
        let fd = c.sock.as_raw_fd();
        if let Some(t) = self.tls_mut(slot) {
            let _ = t.conn.write_tls(&mut crate::io::SockWriter(fd));
        }
        if handshaking {
            self.out.stats.tls_handshake_failures += 1;
        }
        tracing::debug!(
            shard = self.id,
            handshaking,
            error,
            "TLS error; dropping the connection"
        );
        self.peer_gone(slot);
    }

    /// Put `slot` on the dirty list to be written this turn, queue or not (rustls has records
    /// of its own to send: handshake messages, alerts, session tickets).
    fn tls_urgent(&mut self, slot: u32) {
        let Some(c) = self.clients.get_mut(slot as usize) else {
            return;
        };
        if c.has(flag::URGENT) {
            return;
        }
        c.flags |= flag::URGENT | flag::DIRTY;
        self.out.dirty.push(slot);
    }

    // ---------------------------------------------------------------- write

    /// `flush` for a TLS connection: send what rustls holds; when it holds nothing, encrypt
    /// the next part of the send queue (at most `TLS_SEND_BUFFER_BYTES_MAX`) and send that;
    /// until the queue is empty or the socket is full.
    pub(super) fn flush_tls(&mut self, slot: u32) {
        let now_us = self.now_us;
        let now_tick = self.now_tick;
        let Some(t) = self
            .tls
            .get_mut(slot as usize)
            .and_then(|t| t.as_deref_mut())
        else {
            return;
        };
        let c = &mut self.clients[slot as usize];
        let fd = c.sock.as_raw_fd();
        loop {
            while t.conn.wants_write() {
                match t.conn.write_tls(&mut crate::io::SockWriter(fd)) {
                    Ok(0) => {
                        self.out
                            .doomed
                            .push((slot, c.gen, Doom::Drop(CloseKind::Abnormal)));
                        return;
                    }
                    Ok(n) => {
                        self.out.stats.writev_calls += 1;
                        self.out.stats.bytes_out += n as u64;
                        c.last_write_ms = (now_us / 1000) as u32;
                        c.stall_tick = now_tick;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
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
                break;
            }
            let mut iov: [IoSlice; IOVECS_PER_WRITE_MAX] =
                [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let (n_iov, _) =
                super::write::gather(&c.queue, c.head_off, TLS_SEND_BUFFER_BYTES_MAX, &mut iov);
            let n = match std::io::Write::write_vectored(&mut t.conn.writer(), &iov[..n_iov]) {
                Ok(n) => n,
                Err(_) => {
                    self.out
                        .doomed
                        .push((slot, c.gen, Doom::Drop(CloseKind::Abnormal)));
                    return;
                }
            };
            if n == 0 {
                // rustls took nothing although its buffer is empty (never expected): try
                // again when the socket is writable rather than spin.
                break;
            }
            self.out.stats.queued_bytes -= n as u64;
            c.queued -= n as u32;
            let hist = &mut self.hist;
            let frames = super::write::commit(&mut c.queue, &mut c.head_off, n, |f| {
                let _ = hist.record(now_us.saturating_sub(f.born_us()).max(1));
            });
            self.out.stats.frames_out += frames;
        }
        if c.queue.is_empty() {
            if c.queue.capacity() > SEND_QUEUE_RETAIN_SLOTS {
                c.queue = std::collections::VecDeque::new();
            }
            if c.phase == Phase::Closing && !c.has(flag::WRITE_SHUT) {
                // The last frame is out: close_notify, then the TCP write side.
                t.conn.send_close_notify();
                let _ = t.conn.write_tls(&mut crate::io::SockWriter(fd));
                if !t.conn.wants_write() {
                    c.flags |= flag::WRITE_SHUT;
                    crate::io::shutdown_write(&c.sock);
                }
            }
        }
    }
}
