//! A shard's side of the HTTP backends (`crate::proxy`; the calls run on the bridge,
//! `bridge::proxy`): parking an upgrade while the auth service decides, finishing or refusing
//! it when the verdict comes, and handing a routed custom-type command to its backend with
//! the per-connection in-flight bound. The shard never waits: a parked upgrade is an entry in
//! `auth_parked` (its later bytes are kept, as for a waiting server-API request, and
//! `http_waiting` times it out at `answer_wait`, after the bridge's own 503).

use super::http::Upgraded;
use super::*;
use crate::auth::{query_param, query_params, token_from_upgrade, TOKEN_BYTES_MAX};
use crate::http;
use crate::limits::ID_BYTES_MAX;
use crate::proxy::{ConnectOutcome, Credential, ShardAnswer};

/// An upgrade waiting for the auth service: what finishing it needs once the head is gone.
pub struct Parked {
    /// The 101 response, built while the head was at hand.
    response: Vec<u8>,
    /// `?subscribe=` rooms, joined once the user is known.
    rooms: Vec<String>,
    /// The upgrade's span (`ws.upgrade`, when traced): it ends with the verdict.
    span: tracing::Span,
}

impl Shard {
    /// The credential of a service-mode upgrade (the jwt mode's token sources, else
    /// `?user_id=`), or the refusal queued and None.
    pub(super) fn service_credential(
        &mut self,
        slot: u32,
        head: &http::RequestHead,
    ) -> Option<Credential> {
        if let Some((token, _)) =
            token_from_upgrade(head.authorization, head.query, head.ws_protocols)
        {
            if token.len() > TOKEN_BYTES_MAX {
                self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                self.reject(slot, 401, crate::auth::AuthError::TooLarge.as_str());
                return None;
            }
            return Some(Credential::Token(token.into_owned()));
        }
        match head.query.and_then(|q| query_param(q, "user_id")) {
            Some(u) if u.is_empty() || u.len() > ID_BYTES_MAX || u.contains('\0') => {
                self.reject(slot, 400, "invalid user_id");
                None
            }
            Some(u) => Some(Credential::UserId(u.into_owned())),
            None => {
                self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                self.reject(slot, 401, crate::proxy::AUTH_CREDENTIAL_REQUIRED);
                None
            }
        }
    }

    /// Hand the credential to the bridge and park the connection (a full bridge inbox: 503).
    pub(super) fn park_upgrade(
        &mut self,
        slot: u32,
        head: &http::RequestHead,
        key: &str,
        cred: Credential,
    ) -> Upgraded {
        let protocol =
            http::offers_protocol(head.ws_protocols, "switchboard").then_some("switchboard");
        let response = http::switching_protocols(key, protocol);
        let rooms = head
            .query
            .into_iter()
            .flat_map(|q| query_params(q, "subscribe"))
            .map(|r| r.into_owned())
            .collect();
        let c = &self.clients[slot as usize];
        // One getpeername per service-mode upgrade, for the auth service's `remote_addr`.
        let remote_addr = c.sock.peer_addr().ok().map(|a| a.to_string());
        let job = crate::bridge::proxy::Job::Connect {
            origin: self.conn_ref(slot),
            cred,
            remote_addr,
            path: head.path.to_owned(),
        };
        let msg = crate::bridge::BridgeMsg::Proxy(Box::new(job));
        if self.node.bridge_tx.try_send(msg).is_err() {
            self.out.stats.bridge_dropped += 1;
            self.reject(slot, 503, "server busy, retry later");
            return Upgraded::Refused;
        }
        let now = self.now_tick;
        let c = &mut self.clients[slot as usize];
        c.last_rx_tick = now;
        let gen = c.gen;
        self.auth_parked.insert(
            (slot, gen),
            Box::new(Parked {
                response,
                rooms,
                span: crate::trace::current(),
            }),
        );
        // `http_waiting` keeps the bytes that follow and is the backstop deadline.
        self.http_waiting.insert((slot, gen), false);
        let deadline = now + self.t.keepalive.max(self.t.answer_wait);
        self.schedule(slot, deadline);
        Upgraded::Parked
    }

    /// An answer from the bridge (`ServiceMsg::Proxy`).
    pub(crate) fn on_proxy_answer(&mut self, m: ShardAnswer) {
        match m {
            ShardAnswer::Connect { slot, gen, outcome } => {
                let Some(parked) = self.auth_parked.remove(&(slot, gen)) else {
                    return;
                };
                let span = parked.span.clone();
                let _entered = span.enter();
                if self.http_waiting.remove(&(slot, gen)).is_none()
                    || !self
                        .clients
                        .get(slot as usize)
                        .is_some_and(|c| c.gen == gen && c.phase == Phase::Http)
                {
                    return;
                }
                match outcome {
                    ConnectOutcome::Allow(_) if self.node.draining.load(Ordering::Relaxed) => {
                        self.reject(slot, 503, "server is shutting down");
                    }
                    ConnectOutcome::Allow(user) => {
                        let Parked {
                            response, rooms, ..
                        } = *parked;
                        let user = String::from(&*user);
                        if self.finish_upgrade(
                            slot,
                            None,
                            Some(user),
                            false,
                            false,
                            response,
                            &rooms,
                        ) {
                            crate::trace::record_status(&span, 101);
                            // Frames the client sent behind the head were kept; run them now.
                            self.on_ws_bytes(slot, &mut []);
                        }
                    }
                    ConnectOutcome::Refused => {
                        self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                        self.reject(slot, 401, crate::proxy::AUTH_REFUSED);
                    }
                    ConnectOutcome::Unavailable(text) => self.reject(slot, 503, text),
                }
            }
            ShardAnswer::Call { slot, gen, frame } => {
                if let Some(n) = self.rpc_in_flight.get_mut(&(slot, gen)) {
                    *n -= 1;
                    if *n == 0 {
                        self.rpc_in_flight.remove(&(slot, gen));
                    }
                }
                if self
                    .clients
                    .get(slot as usize)
                    .is_some_and(|c| c.gen == gen && c.phase == Phase::Open)
                {
                    self.reply(slot, frame);
                }
            }
        }
    }

    /// A command whose type is not native: to its backend when `rpc_routes` has one (true),
    /// else false (the caller answers `unknown message type`).
    pub(super) fn rpc_call(&mut self, slot: u32, cmd: &service::Cmd<'_>) -> bool {
        let node = self.node.clone();
        let Some(route) = crate::proxy::route_for(&node.cfg.rpc_routes, cmd.kind) else {
            return false;
        };
        let gen = self.clients[slot as usize].gen;
        let n = self.rpc_in_flight.get(&(slot, gen)).copied().unwrap_or(0);
        if n as usize >= node.cfg.rpc_concurrency_per_connection_max {
            self.send_error(
                slot,
                ErrorReason::Busy,
                cmd.id,
                crate::proxy::RPC_TOO_MANY,
                None,
            );
            return true;
        }
        #[derive(serde::Deserialize)]
        struct DataOnly<'a> {
            #[serde(borrow, default)]
            data: Option<sonic_rs::LazyValue<'a>>,
        }
        let data = crate::proto::envelope::parse_as::<DataOnly>(cmd.text);
        let data_raw = data
            .as_ref()
            .and_then(|d| d.data.as_ref())
            .map(|d| d.as_raw_str());
        // The dispatcher validated the whole text as JSON.
        let text = std::str::from_utf8(cmd.text).unwrap_or("null");
        let c = &self.clients[slot as usize];
        let body = crate::proxy::rpc_body(
            cmd.kind,
            cmd.id,
            c.user.as_deref(),
            c.uuid(),
            data_raw,
            text,
        );
        let job = crate::bridge::proxy::Job::Call {
            origin: self.conn_ref(slot),
            route,
            kind: cmd.kind.to_owned(),
            id: cmd.id.map(str::to_owned),
            body,
        };
        if self
            .node
            .bridge_tx
            .try_send(crate::bridge::BridgeMsg::Proxy(Box::new(job)))
            .is_err()
        {
            self.out.stats.bridge_dropped += 1;
            self.send_error(
                slot,
                ErrorReason::Busy,
                cmd.id,
                crate::proxy::RPC_BUSY,
                None,
            );
            return true;
        }
        *self.rpc_in_flight.entry((slot, gen)).or_insert(0) += 1;
        true
    }
}
