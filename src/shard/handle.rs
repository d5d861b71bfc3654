//! What a shard does with a complete request head or a complete message: the HTTP endpoints,
//! the upgrade (origin, auth, capacity), and every client command of PROTOCOL.md sections 1-3.
//! Replies and fan-out only queue frames; the loop flushes them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::auth::{query_param, query_params, token_from_upgrade, Claims};
use crate::bridge::BridgeMsg;
use crate::config::AuthMode;
use crate::directory::{AckRecord, Claim, JoinResult};
use crate::limits::{ID_BYTES_MAX, URL_BYTES_MAX};
use crate::metrics::{ErrorReason, NodeView};
use crate::proto::envelope::parse_command;
use crate::proto::http::{self, Parsed};
use crate::proto::json::rfc3339_ms;
use crate::proto::ws::{self, close};
use crate::proto::{Command, Frame};

use super::{flag, ConnRef, Grants, Phase, Shard, ShardMsg};

/// Namespace for conversation ids derived from two user ids (UUID v5).
const CONVERSATION_NS: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_3a52_9d0e_4b7a_8c21_5e4f_0a9b_7d13);

/// A stable conversation id for two users, the same whichever of them asks.
pub fn derive_conversation_id(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    let mut name = Vec::with_capacity(x.len() + y.len() + 1);
    name.extend_from_slice(x.as_bytes());
    name.push(0);
    name.extend_from_slice(y.as_bytes());
    uuid::Uuid::new_v5(&CONVERSATION_NS, &name).to_string()
}

fn non_empty<'a>(v: &'a Option<std::borrow::Cow<'_, str>>) -> Option<&'a str> {
    v.as_deref().filter(|s| !s.is_empty())
}

impl Shard {
    // ------------------------------------------------------------ HTTP

    /// A request head may be complete in `buf`. Returns false when the connection stops reading.
    pub(super) fn on_http_head(&mut self, slot: u32, buf: &mut Vec<u8>, max: usize) -> bool {
        let used = match http::parse_request(buf) {
            Parsed::Partial => {
                if buf.len() > max {
                    self.reject(slot, 431, "request header too large");
                    return false;
                }
                return true;
            }
            Parsed::Invalid => {
                self.reject(slot, 400, "bad request");
                return false;
            }
            Parsed::Complete(_, used) if used > max => {
                self.reject(slot, 431, "request header too large");
                return false;
            }
            Parsed::Complete(head, used) => {
                let cfg = &self.node.cfg;
                let is_echo = cfg.echo_path.as_deref() == Some(head.path);
                if is_echo || cfg.ws_paths.iter().any(|p| p == head.path) {
                    if !self.upgrade(slot, &head, is_echo) {
                        return false;
                    }
                } else {
                    self.serve_http(slot, head.method, head.path);
                    return false;
                }
                used
            }
        };
        // Bytes after the head are the client's first frames.
        let mut rest = buf.split_off(used);
        buf.clear();
        if rest.is_empty() {
            return true;
        }
        self.on_ws_bytes(slot, &mut rest)
    }

    fn reject(&mut self, slot: u32, status: u16, text: &str) {
        self.out.stats.upgrade_rejected += 1;
        self.http_reply(slot, http::json_error(status, text));
    }

    fn serve_http(&mut self, slot: u32, method: &str, path: &str) {
        self.out.stats.http_requests += 1;
        if method != "GET" && method != "HEAD" {
            self.http_reply(slot, http::json_error(405, "method not allowed"));
            return;
        }
        let node = &self.node;
        let reply = match path {
            "/health" => {
                let body = format!(
                    "{{\"status\":\"healthy\",\"clients\":{},\"rooms\":{}}}",
                    node.dir.connections(),
                    node.dir.rooms_len()
                );
                http::response(200, "application/json", body.as_bytes())
            }
            "/live" => http::response(200, "application/json", b"{\"status\":\"alive\"}"),
            "/ready" => match node.ready() {
                Ok(()) => http::response(200, "application/json", b"{\"status\":\"ready\"}"),
                Err(why) => {
                    let body = format!("{{\"status\":\"not ready\",\"reason\":\"{why}\"}}");
                    http::response(503, "application/json", body.as_bytes())
                }
            },
            "/metrics" | "/prometheus/metrics" => {
                let text = crate::metrics::render(&NodeView {
                    shards: &node.stats,
                    rooms: node.dir.rooms_len() as u64,
                    users: node.dir.users_len() as u64,
                    connections: node.dir.connections(),
                    max_connections: node.max_connections,
                    draining: node.draining.load(Ordering::Relaxed),
                    dedup_entries: node.dir.dedup_len() as u64,
                    limits: Some(&node.limits),
                });
                http::response(200, "text/plain; version=0.0.4", text.as_bytes())
            }
            _ => http::json_error(404, "not found"),
        };
        let reply = if method == "HEAD" {
            http::head_only(reply)
        } else {
            reply
        };
        self.http_reply(slot, reply);
    }

    /// Validate and perform an upgrade. Returns false when the request was refused.
    fn upgrade(&mut self, slot: u32, head: &http::RequestHead, is_echo: bool) -> bool {
        let key = match head.upgrade_key() {
            Ok(key) => key,
            Err(problem) => {
                self.reject(slot, 400, problem);
                return false;
            }
        };
        let node = self.node.clone();
        let cfg = &node.cfg;
        if !cfg.allowed_origins.is_empty() {
            if let Some(origin) = head.origin {
                if !cfg.allowed_origins.iter().any(|o| o == origin || o == "*") {
                    self.reject(slot, 403, "origin not allowed");
                    return false;
                }
            }
        }
        if node.draining.load(Ordering::Relaxed) {
            self.reject(slot, 503, "server is shutting down");
            return false;
        }
        // Who is this?
        let mut claims: Option<Claims> = None;
        let mut claimed_user: Option<String> = None;
        let mut await_auth = false;
        if !is_echo {
            match (cfg.auth_mode, node.verifier.as_ref()) {
                (AuthMode::Jwt, Some(verifier)) => {
                    match token_from_upgrade(head.authorization, head.query, head.ws_protocols) {
                        Some((token, _)) => match verifier.verify(&token, self.now_ms / 1000) {
                            Ok(c) => claims = Some(c),
                            Err(e) => {
                                self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                                // The reason only: tokens never reach the logs.
                                tracing::debug!(
                                    shard = self.id,
                                    reason = e.as_str(),
                                    "upgrade refused: bad token"
                                );
                                self.reject(slot, 401, e.as_str());
                                return false;
                            }
                        },
                        None => await_auth = true,
                    }
                }
                _ => {
                    if let Some(u) = head.query.and_then(|q| query_param(q, "user_id")) {
                        if u.is_empty() || u.len() > ID_BYTES_MAX {
                            self.reject(slot, 400, "invalid user_id");
                            return false;
                        }
                        claimed_user = Some(u.into_owned());
                    }
                }
            }
        }
        let url_rooms = head
            .query
            .is_some_and(|q| query_params(q, "subscribe").next().is_some());
        if url_rooms && (await_auth || is_echo) {
            // The grants that decide these subscriptions come with the token.
            self.reject(
                slot,
                400,
                "subscribe in the URL needs a token on the upgrade",
            );
            return false;
        }
        // Capacity.
        let before = node.dir.connections.fetch_add(1, Ordering::Relaxed);
        if before >= node.max_connections {
            node.dir.connections.fetch_sub(1, Ordering::Relaxed);
            self.reject(slot, 503, "server is at maximum capacity");
            return false;
        }
        let protocol =
            http::offers_protocol(head.ws_protocols, "switchboard").then_some("switchboard");
        let response = Frame::from_wire(&http::switching_protocols(key, protocol), self.now_us);
        self.out.stats.upgrades += 1;
        self.out.stats.ws_connections += 1;
        let now_tick = self.now_tick;
        let auth_deadline = now_tick + self.t.auth;
        let c = &mut self.clients[slot as usize];
        c.flags |= flag::COUNTED | flag::WS;
        c.last_rx_tick = now_tick;
        c.phase = if is_echo {
            Phase::Echo
        } else if await_auth {
            // While awaiting auth, exp_s holds the auth deadline tick (no token yet).
            c.exp_s = auth_deadline;
            Phase::AwaitAuth
        } else {
            Phase::Open
        };
        self.enqueue(slot, response);
        if is_echo {
            self.schedule(slot, now_tick + 1);
            return true;
        }
        if let Some(claims) = claims {
            self.set_identity(slot, &claims.sub, Some(&claims));
        } else if let Some(user) = claimed_user {
            self.set_identity(slot, &user, None);
        }
        let c = &self.clients[slot as usize];
        let (id, user) = (c.uuid(), c.user.clone());
        tracing::debug!(
            shard = self.id,
            client_id = %uuid::Uuid::from_u128(id),
            user_id = user.as_deref().unwrap_or("-"),
            awaiting_auth = await_auth,
            "connected"
        );
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "connected")
                .obj("data", |d| {
                    d.uuid("client_id", id)
                        .opt_str("user_id", user.as_deref())
                        .str("message", "Connected to WebSocket server");
                })
                .u64("timestamp", self.now_ms);
        });
        self.enqueue(slot, f);
        // `?subscribe=a&subscribe=b`: subscribe as if the client had sent the commands right
        // after `connected`; the replies share the upgrade's write.
        if url_rooms && !await_auth {
            for room in head
                .query
                .into_iter()
                .flat_map(|q| query_params(q, "subscribe"))
            {
                if let Some(room) = self.valid_room(slot, Some(&room), None) {
                    self.subscribe(slot, room, None);
                }
            }
        }
        self.schedule(slot, now_tick + 1);
        true
    }

    /// Attach a user identity (and JWT grants) to a connection.
    fn set_identity(&mut self, slot: u32, user: &str, claims: Option<&Claims>) {
        let (arc, first) = self.users.add(user, slot);
        if first {
            self.node.dir.user_add(&arc, self.id);
        }
        let c = &mut self.clients[slot as usize];
        c.user = Some(arc);
        if let Some(claims) = claims {
            c.exp_s = claims.exp.min(u32::MAX as u64) as u32;
            c.grants = Some(Arc::new(Grants {
                rooms: claims.rooms.clone(),
                admin: claims.admin,
            }));
        }
    }

    // ------------------------------------------------------------ messages

    /// A complete data message. Returns false when the connection is closing.
    pub(super) fn on_message(&mut self, slot: u32, op: u8, payload: &mut [u8]) -> bool {
        let (rate, burst) = (self.t.rate, self.t.burst);
        let now_ms = self.rel_ms();
        let max_strikes = self.node.cfg.rate_limit_max_violations;
        let c = &mut self.clients[slot as usize];
        if c.phase == Phase::Echo {
            let f = Frame::from_wire(&ws::frame_bytes(op, payload), self.now_us);
            self.enqueue(slot, f);
            return true;
        }
        if !c.take_token(now_ms, rate, burst) {
            c.rl_strikes = c.rl_strikes.saturating_add(1);
            if c.rl_strikes as u32 > max_strikes {
                self.close_with(slot, close::RATE_LIMITED, "rate limit exceeded");
                return false;
            }
            // Parsing costs little next to a frame, and the client can correlate the refusal.
            let id = parse_command(payload).and_then(|c| c.correlation_id().map(str::to_owned));
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

    fn send_error(
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
        self.enqueue(slot, f);
    }

    fn on_command(&mut self, slot: u32, text: &[u8]) {
        let Some(cmd) = parse_command(text) else {
            self.send_error(
                slot,
                ErrorReason::InvalidJson,
                None,
                "invalid JSON format",
                None,
            );
            return;
        };
        let id = cmd.correlation_id();
        let kind = cmd.kind.as_deref().unwrap_or("");
        if self.clients[slot as usize].phase == Phase::AwaitAuth && kind != "authenticate" {
            self.auth_failed_close(slot, id, "authentication required");
            return;
        }
        match kind {
            "subscribe" => self.cmd_subscribe(slot, &cmd, id),
            "unsubscribe" => self.cmd_unsubscribe(slot, &cmd, id),
            "publish" => self.cmd_publish(slot, &cmd, id),
            "broadcast" => self.cmd_broadcast(slot, &cmd, id),
            "ping" => {
                let f = self.fb.text(self.now_us, |o| {
                    o.str("type", "pong").id(id).u64("timestamp", self.now_ms);
                });
                self.enqueue(slot, f);
            }
            "authenticate" => self.cmd_authenticate(slot, &cmd, id),
            "message.send" => self.cmd_message_send(slot, &cmd, id),
            _ => self.send_error(
                slot,
                ErrorReason::UnknownType,
                id,
                "unknown message type",
                None,
            ),
        }
    }

    /// The room named by a command, or the error already sent.
    fn room_arg<'c>(&mut self, slot: u32, cmd: &'c Command, id: Option<&str>) -> Option<&'c str> {
        self.valid_room(slot, non_empty(&cmd.room), id)
    }

    /// A usable room name, or the error sent.
    fn valid_room<'r>(
        &mut self,
        slot: u32,
        room: Option<&'r str>,
        id: Option<&str>,
    ) -> Option<&'r str> {
        let Some(room) = room.filter(|r| !r.is_empty()) else {
            self.send_error(
                slot,
                ErrorReason::RoomRequired,
                id,
                "room name is required",
                None,
            );
            return None;
        };
        if room.len() > self.node.cfg.max_room_name_bytes {
            self.send_error(
                slot,
                ErrorReason::BadRequest,
                id,
                "room name too long",
                None,
            );
            return None;
        }
        Some(room)
    }

    /// The client's membership of `room`, if any: (index in its list, room id).
    fn membership(&self, slot: u32, room: &str) -> Option<(usize, crate::route::RoomId)> {
        let rid = self.rooms.lookup(room)?;
        let c = &self.clients[slot as usize];
        c.rooms.iter().position(|m| m.room == rid).map(|i| (i, rid))
    }

    /// The client's membership of `room`, or the `not subscribed to this room` error sent.
    fn subscribed_to(
        &mut self,
        slot: u32,
        room: &str,
        id: Option<&str>,
    ) -> Option<(usize, crate::route::RoomId)> {
        let found = self.membership(slot, room);
        if found.is_none() {
            self.send_error(
                slot,
                ErrorReason::NotSubscribed,
                id,
                "not subscribed to this room",
                None,
            );
        }
        found
    }

    fn cmd_subscribe(&mut self, slot: u32, cmd: &Command, id: Option<&str>) {
        if let Some(room) = self.room_arg(slot, cmd, id) {
            self.subscribe(slot, room, id);
        }
    }

    /// Subscribe `slot` to `room` (a valid name) and queue `subscribed` or the error.
    fn subscribe(&mut self, slot: u32, room: &str, id: Option<&str>) {
        let c = &self.clients[slot as usize];
        if !c.allows_room(room) {
            self.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
            return;
        }
        let count = if self.membership(slot, room).is_some() {
            self.node.dir.room(room).map_or(1, |r| r.members)
        } else {
            if c.rooms.len() >= self.node.cfg.max_rooms_per_connection {
                self.send_error(slot, ErrorReason::TooManyRooms, id, "too many rooms", None);
                return;
            }
            let name = match self.rooms.lookup(room) {
                Some(rid) => self.rooms.name_of(rid).clone(),
                None => Arc::from(room),
            };
            let max = self.node.cfg.max_connections_per_room;
            match self.node.dir.room_join(&name, self.id, max) {
                JoinResult::Full => {
                    self.send_error(
                        slot,
                        ErrorReason::RoomFull,
                        id,
                        "room is at maximum capacity",
                        None,
                    );
                    return;
                }
                JoinResult::Joined { members } => {
                    let joined = self.rooms.join(&name, slot);
                    self.clients[slot as usize].rooms.push(joined.membership);
                    members
                }
            }
        };
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "subscribed")
                .id(id)
                .str("room", room)
                .obj("data", |d| {
                    d.str("room", room).u64("client_count", count as u64);
                })
                .u64("timestamp", self.now_ms);
        });
        self.enqueue(slot, f);
    }

    fn cmd_unsubscribe(&mut self, slot: u32, cmd: &Command, id: Option<&str>) {
        let Some(room) = self.room_arg(slot, cmd, id) else {
            return;
        };
        let Some((idx, _)) = self.subscribed_to(slot, room, id) else {
            return;
        };
        let m = self.clients[slot as usize].rooms.swap_remove(idx);
        self.leave_room(m);
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "unsubscribed")
                .id(id)
                .str("room", room)
                .obj("data", |d| {
                    d.str("room", room);
                })
                .u64("timestamp", self.now_ms);
        });
        self.enqueue(slot, f);
    }

    fn cmd_publish(&mut self, slot: u32, cmd: &Command, id: Option<&str>) {
        let Some(room) = self.room_arg(slot, cmd, id) else {
            return;
        };
        let Some((_, rid)) = self.subscribed_to(slot, room, id) else {
            return;
        };
        let c = &self.clients[slot as usize];
        // A refreshed token may have narrowed the rooms claim since the subscribe.
        if !c.allows_room(room) {
            self.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
            return;
        }
        let (client_id, user) = (c.uuid(), c.user.clone());
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "message")
                .str("room", room)
                .raw("data", cmd.data_raw())
                .uuid("client_id", client_id);
            if let Some(u) = user.as_deref() {
                o.str("user_id", u);
            }
            o.u64("timestamp", self.now_ms);
        });
        self.out.stats.publishes += 1;
        self.deliver_room(rid, &f);
        let name = self.rooms.name_of(rid).clone();
        let others = self.node.dir.room(room).map_or(0, |r| r.shards) & !(1u64 << self.id);
        self.fan_to_shards(
            others,
            |frame| ShardMsg::Room {
                room: name.clone(),
                frame,
            },
            &f,
        );
        if self.node.clustered
            && self
                .node
                .bridge_tx
                .try_send(BridgeMsg::RoomPublish {
                    room: name,
                    frame: f,
                })
                .is_err()
        {
            self.out.stats.cross_shard_dropped += 1;
        }
    }

    /// Send `frame` to every shard whose bit is set in `bits`. Returns false if any inbox was full.
    fn fan_to_shards(
        &mut self,
        mut bits: u64,
        make: impl Fn(Frame) -> ShardMsg,
        frame: &Frame,
    ) -> bool {
        let mut ok = true;
        while bits != 0 {
            let shard = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if self.node.send_to_shard(shard, make(frame.clone())) {
                self.out.stats.cross_shard_sent += 1;
            } else {
                self.out.stats.cross_shard_dropped += 1;
                ok = false;
            }
        }
        ok
    }

    fn all_other_shards(&self) -> u64 {
        let n = self.node.inboxes.len();
        let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        all & !(1u64 << self.id)
    }

    fn cmd_broadcast(&mut self, slot: u32, cmd: &Command, id: Option<&str>) {
        let c = &self.clients[slot as usize];
        if !(self.node.cfg.allow_client_broadcast || c.is_admin()) {
            self.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
            return;
        }
        let (client_id, user) = (c.uuid(), c.user.clone());
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "message")
                .raw("data", cmd.data_raw())
                .uuid("client_id", client_id);
            if let Some(u) = user.as_deref() {
                o.str("user_id", u);
            }
            o.u64("timestamp", self.now_ms);
        });
        self.out.stats.broadcasts += 1;
        self.deliver_all(&f);
        let others = self.all_other_shards();
        self.fan_to_shards(others, |frame| ShardMsg::All { frame }, &f);
    }

    pub(super) fn auth_failed_close(&mut self, slot: u32, id: Option<&str>, text: &str) {
        self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "auth.failed")
                .id(id)
                .str("error", text)
                .u64("timestamp", self.now_ms);
        });
        self.enqueue(slot, f);
        self.close_with(slot, close::UNAUTHORIZED, "unauthorized");
    }

    fn cmd_authenticate(&mut self, slot: u32, cmd: &Command, id: Option<&str>) {
        let node = self.node.clone();
        let Some(verifier) = node
            .verifier
            .as_ref()
            .filter(|_| node.cfg.auth_mode == AuthMode::Jwt)
        else {
            self.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
            return;
        };
        let awaiting = self.clients[slot as usize].phase == Phase::AwaitAuth;
        let result = match non_empty(&cmd.token) {
            None => Err("token is required"),
            Some(token) => verifier
                .verify(token, self.now_ms / 1000)
                .map_err(|e| e.as_str()),
        };
        let claims = match result {
            Ok(claims) => claims,
            Err(text) if awaiting => {
                self.auth_failed_close(slot, id, text);
                return;
            }
            Err(text) => {
                self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                let f = self.fb.text(self.now_us, |o| {
                    o.str("type", "auth.failed")
                        .id(id)
                        .str("error", text)
                        .u64("timestamp", self.now_ms);
                });
                self.enqueue(slot, f);
                return;
            }
        };
        if awaiting {
            let c = &mut self.clients[slot as usize];
            c.phase = Phase::Open;
            c.exp_s = 0;
            self.set_identity(slot, &claims.sub, Some(&claims));
        } else {
            let c = &mut self.clients[slot as usize];
            if c.user.as_deref() != Some(claims.sub.as_str()) {
                self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                let f = self.fb.text(self.now_us, |o| {
                    o.str("type", "auth.failed")
                        .id(id)
                        .str("error", "token subject mismatch")
                        .u64("timestamp", self.now_ms);
                });
                self.enqueue(slot, f);
                return;
            }
            c.exp_s = claims.exp.min(u32::MAX as u64) as u32;
            c.flags &= !flag::EXPIRING_SENT;
            c.grants = Some(Arc::new(Grants {
                rooms: claims.rooms.clone(),
                admin: claims.admin,
            }));
        }
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "auth.success")
                .id(id)
                .obj("data", |d| {
                    d.str("user_id", &claims.sub)
                        .u64("expires_at", claims.exp * 1000);
                })
                .u64("timestamp", self.now_ms);
        });
        self.enqueue(slot, f);
        let now = self.now_tick;
        self.schedule(slot, now + 1);
    }

    fn cmd_message_send(&mut self, slot: u32, cmd: &Command, id: Option<&str>) {
        let cmid = non_empty(&cmd.client_msg_id);
        let Some(user) = self.clients[slot as usize].user.clone() else {
            self.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", cmid);
            return;
        };
        let Some(cmid) = cmid.filter(|c| c.len() <= ID_BYTES_MAX) else {
            self.send_error(
                slot,
                ErrorReason::BadRequest,
                id,
                "clientMsgId is required",
                None,
            );
            return;
        };
        let Some(to) = non_empty(&cmd.to).filter(|t| t.len() <= ID_BYTES_MAX) else {
            self.send_error(
                slot,
                ErrorReason::BadRequest,
                id,
                "to is required",
                Some(cmid),
            );
            return;
        };
        let content = cmd.content.as_deref().unwrap_or("");
        let attachment = non_empty(&cmd.attachment_url);
        if content.len() > self.node.cfg.max_dm_content_bytes
            || attachment.is_some_and(|a| a.len() > URL_BYTES_MAX)
        {
            self.send_error(
                slot,
                ErrorReason::TooLarge,
                id,
                "message too large",
                Some(cmid),
            );
            return;
        }
        if content.is_empty() && attachment.is_none() {
            self.send_error(
                slot,
                ErrorReason::BadRequest,
                id,
                "content is required",
                Some(cmid),
            );
            return;
        }
        let conversation: Arc<str> = match non_empty(&cmd.conversation_id) {
            Some(c) if c.len() <= ID_BYTES_MAX => Arc::from(c),
            Some(_) => {
                self.send_error(
                    slot,
                    ErrorReason::BadRequest,
                    id,
                    "conversationId too long",
                    Some(cmid),
                );
                return;
            }
            None => Arc::from(derive_conversation_id(&user, to)),
        };
        let record = AckRecord {
            server_msg_id: uuid::Uuid::now_v7().as_u128(),
            conversation_id: conversation,
            sent_at_ms: self.now_ms,
            expires_ms: self.now_ms + self.node.cfg.dedup_window.as_millis() as u64,
        };
        match self.node.dir.dedup_claim(&user, cmid, &record, self.now_ms) {
            Claim::Duplicate(prev) => {
                self.out.stats.dm_duplicates += 1;
                self.send_ack(slot, id, cmid, &prev);
                return;
            }
            Claim::Full => {
                self.send_error(
                    slot,
                    ErrorReason::Busy,
                    id,
                    "server busy, retry later",
                    Some(cmid),
                );
                return;
            }
            Claim::New => {}
        }
        self.dedup_fifo
            .push_back((record.expires_ms, user.clone(), cmid.into()));
        let sent_at = rfc3339_ms(record.sent_at_ms);
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "message.create")
                .obj("data", |d| {
                    d.uuid("eventId", uuid::Uuid::now_v7().as_u128())
                        .str("clientMsgId", cmid)
                        .str("from", &user)
                        .str("to", to)
                        .str("conversationId", &record.conversation_id)
                        .str("content", content)
                        .opt_str("attachmentUrl", attachment)
                        .str("sentAt", &sent_at);
                })
                .u64("timestamp", self.now_ms);
        });
        let me = ConnRef {
            shard: self.id as u16,
            slot,
            gen: self.clients[slot as usize].gen,
        };
        let self_bit = 1u64 << self.id;
        // The recipient's devices, then the sender's other devices (once, if they are the same
        // user; the sending device gets the ack, not its own message).
        let to_self = *user == *to;
        self.deliver_user(to, &f, to_self.then_some(me));
        let to_arc: Arc<str> = Arc::from(to);
        let mut ok = self.fan_to_shards(
            self.node.dir.user_shards(to) & !self_bit,
            |frame| ShardMsg::User {
                user: to_arc.clone(),
                frame,
                except: None,
            },
            &f,
        );
        if !to_self {
            self.deliver_user(&user, &f, Some(me));
            ok &= self.fan_to_shards(
                self.node.dir.user_shards(&user) & !self_bit,
                |frame| ShardMsg::User {
                    user: user.clone(),
                    frame,
                    except: Some(me),
                },
                &f,
            );
        }
        if !ok {
            // Some device could not be reached: no ack for what was not delivered; the client retries.
            self.node.dir.dedup_release(&user, cmid);
            self.send_error(
                slot,
                ErrorReason::Busy,
                id,
                "server busy, retry later",
                Some(cmid),
            );
            return;
        }
        self.out.stats.dms += 1;
        self.send_ack(slot, id, cmid, &record);
    }

    fn send_ack(&mut self, slot: u32, id: Option<&str>, cmid: &str, rec: &AckRecord) {
        let sent_at = rfc3339_ms(rec.sent_at_ms);
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "message.ack")
                .id(id)
                .obj("data", |d| {
                    d.str("clientMsgId", cmid)
                        .uuid("serverMsgId", rec.server_msg_id)
                        .str("conversationId", &rec.conversation_id)
                        .str("sentAt", &sent_at);
                })
                .u64("timestamp", self.now_ms);
        });
        self.enqueue(slot, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_are_symmetric_and_distinct() {
        assert_eq!(
            derive_conversation_id("alice", "bob"),
            derive_conversation_id("bob", "alice")
        );
        assert_ne!(
            derive_conversation_id("alice", "bob"),
            derive_conversation_id("alice", "carol")
        );
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            derive_conversation_id("ab", "c"),
            derive_conversation_id("a", "bc")
        );
    }
}
