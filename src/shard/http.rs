//! The HTTP side of a connection: the plain endpoints (/health, /live, /ready, /metrics) and
//! the WebSocket upgrade (origin, auth, capacity, devices per user, `?subscribe=`).

use std::sync::atomic::Ordering;

use super::*;
use crate::auth::{query_param, query_params, token_from_upgrade, Claims};
use crate::config::AuthMode;
use crate::limits::ID_BYTES_MAX;
use crate::metrics::NodeView;
use crate::proto::http::{self, Parsed};

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

    pub(super) fn reject(&mut self, slot: u32, status: u16, text: &str) {
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
                    dedup_entries: node.dedup.len() as u64,
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
        if !crate::admission::connection(&node) {
            self.reject(slot, 503, "server is at maximum capacity");
            return false;
        }
        // Who, admitted against the devices-per-user limit before the 101 goes out.
        let identity = claims
            .as_ref()
            .map(|c| c.sub.clone())
            .or(claimed_user.clone());
        if let Some(user) = identity {
            if service::session::set_identity(self, slot, &user, claims.as_ref()).is_err() {
                crate::admission::connection_gone(&node);
                self.reject(slot, 429, service::session::TOO_MANY_DEVICES);
                return false;
            }
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
        self.reply(slot, response);
        if is_echo {
            self.schedule(slot, now_tick + 1);
            return true;
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
        let (expose_shard, shard) = (self.node.cfg.expose_shard, self.id);
        let f = self.fb.text(self.now_us, |o| {
            o.str("type", "connected")
                .obj("data", |d| {
                    d.uuid("client_id", id)
                        .opt_str("user_id", user.as_deref())
                        .str("message", "Connected to WebSocket server");
                    if expose_shard {
                        d.u64("shard", shard as u64);
                    }
                })
                .u64("timestamp", self.now_ms);
        });
        self.reply(slot, f);
        // `?subscribe=a&subscribe=b`: subscribe as if the client had sent the commands right
        // after `connected`; the replies share the upgrade's write.
        if url_rooms && !await_auth {
            for room in head
                .query
                .into_iter()
                .flat_map(|q| query_params(q, "subscribe"))
            {
                if let Some(room) = service::rooms::valid_room(self, slot, Some(&room), None) {
                    service::rooms::join(self, slot, room, None);
                }
            }
        }
        self.schedule(slot, now_tick + 1);
        true
    }
}
