//! What a shard does with a complete WebSocket data message: echo (on `echo_path`), the
//! per-connection rate limit, binary refusal, the envelope head, the auth gate, and the
//! command table ([`service::handler`]). Replies are queued with [`Shard::reply`]; errors with
//! [`Shard::send_error`].

use super::*;
use crate::dialect::{self, Dialect, Step};
use crate::proto::envelope::parse_head;
use service::Cmd;

impl Shard {
    /// A complete data message. Returns false when the connection is closing.
    pub(super) fn on_message(&mut self, slot: u32, op: u8, payload: &mut [u8]) -> bool {
        let (rate, burst) = (self.t.rate, self.t.burst);
        let now_ms = self.rel_ms();
        let max_strikes = self.node.cfg.rate_limit_max_violations;
        let c = &mut self.clients[slot as usize];
        if c.phase == Phase::Echo {
            let f = Frame::from_wire(&ws::frame_bytes(op, payload), self.now_us);
            self.reply(slot, f);
            return true;
        }
        if !c.take_token(now_ms, rate, burst) {
            c.rl_strikes = c.rl_strikes.saturating_add(1);
            if c.rl_strikes as u32 > max_strikes {
                self.close_with(slot, close::RATE_LIMITED, "rate limit exceeded");
                return false;
            }
            // Parsing costs little next to a frame, and the client can correlate the refusal.
            let head = parse_head(payload);
            let id = head
                .as_ref()
                .and_then(|h| h.correlation_id().map(str::to_owned));
            self.send_error(
                slot,
                ErrorReason::RateLimited,
                id.as_deref(),
                "rate limit exceeded",
                None,
            );
            return true;
        }
        c.rl_strikes = 0;
        if op == ws::opcode::BINARY {
            // A binary frame has no JSON envelope, so there is no id to copy back.
            self.send_error(
                slot,
                ErrorReason::Binary,
                None,
                "binary frames are not supported",
                None,
            );
            return true;
        }
        self.on_command(slot, payload);
        self.clients
            .get(slot as usize)
            .is_some_and(|c| c.phase != Phase::Closing)
    }

    /// Queue an error frame for one client (counted by `reason`).
    pub(crate) fn send_error(
        &mut self,
        slot: u32,
        reason: ErrorReason,
        id: Option<&str>,
        text: &str,
        client_msg_id: Option<&str>,
    ) {
        self.out.stats.errors[reason as usize] += 1;
        let f = self
            .fb
            .error(self.now_ms, self.now_us, id, text, client_msg_id);
        self.reply(slot, f);
    }

    /// Run one command's handler. A panic inside it is a bug hit by this connection's input:
    /// it ends this connection with 1011 (internal error), is logged with the command type
    /// (never the content) and counted, and the shard serves everyone else. A fault outside
    /// a command (the loop, I/O, the inbox) is not caught here and takes the node down.
    fn run_command(&mut self, slot: u32, handle: service::Handler, cmd: &Cmd<'_>) {
        let injected = self.node.faults.panic_on_command.as_deref() == Some(cmd.kind);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if injected {
                panic!("injected fault: {}=panic_on_command", crate::fault::ENV);
            }
            handle(self, slot, cmd)
        }));
        if outcome.is_err() {
            self.out.stats.errors[ErrorReason::Internal as usize] += 1;
            tracing::error!(
                shard = self.id,
                command = cmd.kind,
                "command handler panicked; closing the connection with 1011"
            );
            if self.clients.contains(slot as usize) {
                self.close_with(slot, close::INTERNAL, "internal error");
            }
        }
    }

    fn on_command(&mut self, slot: u32, text: &[u8]) {
        let byte = self.clients[slot as usize].dialect;
        if byte == 0 {
            return self.on_native_command(slot, text);
        }
        let d = if byte & dialect::UNDECIDED != 0 {
            // An `auto` path: the first message decides, for good.
            let d = dialect::detect(text);
            self.clients[slot as usize].dialect = d as u8;
            d
        } else {
            Dialect::from_byte(byte)
        };
        if d == Dialect::Native {
            return self.on_native_command(slot, text);
        }
        let now_ms = self.now_ms;
        let st = self.out.edge.entry(slot).or_default();
        let steps = dialect::inbound(d, text, st, now_ms);
        if self.out.edge.get(&slot).is_some_and(|s| s.is_empty()) {
            // Nothing to remember: keep the table to connections that need it.
            self.out.edge.remove(&slot);
        }
        self.run_steps(slot, d, steps);
    }

    /// A dialect connection has just opened with an identity (after `connected`, or after an
    /// in-band `authenticate` gave it one): run what its dialect does then
    /// ([`dialect::on_open`]).
    pub(crate) fn dialect_opened(&mut self, slot: u32) {
        let Some(c) = self.clients.get(slot as usize) else {
            return;
        };
        if c.dialect == 0 || c.dialect & dialect::UNDECIDED != 0 || c.user.is_none() {
            return;
        }
        let d = Dialect::from_byte(c.dialect);
        let steps = dialect::on_open(d);
        if !steps.is_empty() {
            self.run_steps(slot, d, steps);
        }
    }

    /// Carry out what a dialect made of a message (or of the connection opening), in order.
    fn run_steps(&mut self, slot: u32, d: Dialect, steps: Vec<Step>) {
        for step in steps {
            if !self
                .clients
                .get(slot as usize)
                .is_some_and(|c| c.phase != Phase::Closing && c.dialect == d as u8)
            {
                break;
            }
            match step {
                Step::Native(cmd) => self.on_native_command(slot, &cmd),
                Step::Own(_) if self.clients[slot as usize].phase == Phase::AwaitAuth => {
                    // Edge-only commands (topic subscriptions) wait for authentication too.
                    service::session::auth_failed_close(
                        self,
                        slot,
                        None,
                        "authentication required",
                    );
                    break;
                }
                Step::Own(json) => {
                    let f = Frame::text_from_json(&json, self.now_us);
                    if let Some(c) = self.clients.get_mut(slot as usize) {
                        if self.out.push_raw(c, slot, f, self.now_tick) {
                            self.make_urgent(slot);
                        }
                    }
                }
                Step::Error { reason, text, id } => {
                    self.send_error(slot, reason, id.as_deref(), &text, None)
                }
            }
        }
    }

    /// A command in the native protocol (from a native client, or translated by a dialect).
    fn on_native_command(&mut self, slot: u32, text: &[u8]) {
        let Some(head) = parse_head(text) else {
            self.send_error(
                slot,
                ErrorReason::InvalidJson,
                None,
                "invalid JSON format",
                None,
            );
            return;
        };
        let id = head.correlation_id();
        let kind = head.kind.as_deref().unwrap_or("");
        if self.clients[slot as usize].phase == Phase::AwaitAuth && kind != "authenticate" {
            service::session::auth_failed_close(self, slot, id, "authentication required");
            return;
        }
        match service::handler(kind) {
            Some(handle) => self.run_command(slot, handle, &Cmd { kind, id, text }),
            // Not native: a backend's when `rpc_routes` routes it (`shard::proxy`).
            None if !self.node.cfg.rpc_routes.is_empty()
                && self.rpc_call(slot, &Cmd { kind, id, text }) => {}
            None => self.send_error(
                slot,
                ErrorReason::UnknownType,
                id,
                "unknown message type",
                None,
            ),
        }
    }
}
