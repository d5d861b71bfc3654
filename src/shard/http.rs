//! The HTTP side of a connection: the plain endpoints (/health, /live, /ready, /metrics) and
//! the WebSocket upgrade (origin, auth, capacity, devices per user, `?subscribe=`).

use std::sync::atomic::Ordering;

use super::*;
use crate::auth::{query_param, query_params, token_from_upgrade, Claims};
use crate::config::AuthMode;
use crate::http;
use crate::http::{RouteSpec, Status};
use crate::limits::ID_BYTES_MAX;
use crate::metrics::NodeView;

impl Shard {
    // ------------------------------------------------------------ HTTP

    /// Serve every complete request at the start of `buf` (keep-alive and pipelining); what
    /// is left in `buf` is the start of an incomplete one. An upgrade hands the bytes after
    /// its head to the WebSocket decoder; bytes after any other request are the next request,
    /// never frames. Returns false when the connection stops reading.
    pub(super) fn on_http_head(&mut self, slot: u32, buf: &mut Vec<u8>, head_max: usize) -> bool {
        let body_max = self.node.cfg.http_body_bytes_max;
        loop {
            match crate::http::parse_request(buf, head_max, body_max) {
                crate::http::Parsed::Partial => return true,
                crate::http::Parsed::Error(e) => {
                    self.out.stats.upgrade_rejected += 1;
                    self.http_reply(slot, e.response());
                    return false;
                }
                crate::http::Parsed::Complete(req, used) => {
                    let cfg = &self.node.cfg;
                    let is_echo = cfg.echo_path.as_deref() == Some(req.path);
                    if is_echo || cfg.ws_paths.iter().any(|p| p == req.path) {
                        // Traced (when sampled) until the 101 or the refusal; a parked upgrade
                        // keeps the span until the auth service's verdict.
                        let span = crate::root_span!(
                            crate::trace::root_for(&req.trace, || {
                                crate::trace::Caller::EndUser
                            }),
                            "ws.upgrade",
                            otel.kind = "server",
                            url.path = req.path,
                            shard = self.id as u64,
                            http.response.status_code = tracing::field::Empty,
                            otel.status_code = tracing::field::Empty,
                            enduser.id = tracing::field::Empty,
                        );
                        let _entered = span.enter();
                        let upgraded = self.upgrade(slot, &req, is_echo);
                        if matches!(upgraded, Upgraded::Done) {
                            crate::trace::record_status(&span, 101);
                        }
                        match upgraded {
                            Upgraded::Refused => return false,
                            Upgraded::Parked => {
                                // The auth service answers later; what follows waits for it
                                // (kept as the connection's pending bytes).
                                buf.drain(..used);
                                return true;
                            }
                            Upgraded::Done => {}
                        }
                        // Bytes after the head are the client's first frames.
                        let mut rest = buf.split_off(used);
                        buf.clear();
                        return rest.is_empty() || self.on_ws_bytes(slot, &mut rest);
                    }
                    match self.serve_http(slot, &req) {
                        Served::Closing => return false,
                        Served::KeepOpen => {}
                        Served::Waiting => {
                            // The answer comes from another shard; what follows waits for it.
                            buf.drain(..used);
                            return true;
                        }
                    }
                    buf.drain(..used);
                    if buf.is_empty() {
                        return true;
                    }
                }
            }
        }
    }

    pub(super) fn reject(&mut self, slot: u32, status: u16, text: &str) {
        self.out.stats.upgrade_rejected += 1;
        crate::trace::record_status(&crate::trace::current(), status);
        self.http_reply(slot, http::json_error(status, text));
    }

    /// Answer one plain HTTP request. Keep-alive: asked for by the client, under
    /// `http_keepalive_requests_max`, not draining.
    fn serve_http(&mut self, slot: u32, req: &crate::http::Request) -> Served {
        use crate::http::{route, Response, Routed, Status};
        self.out.stats.http_requests += 1;
        // Only the APIs are traced (not the probes: /health, /ready, /metrics are scraped
        // every few seconds and say nothing a trace would).
        let span = if req.path.starts_with("/api/") {
            // The API key's holders are our own services: their sampled flag decides; a
            // REST user's does not (trace_parent_sampled).
            let caller = || match &self.node.cfg.api_key {
                Some(k) if crate::http::api_key_ok(req, k) => crate::trace::Caller::Trusted,
                _ => crate::trace::Caller::EndUser,
            };
            crate::root_span!(
                crate::trace::root_for(&req.trace, caller),
                "http.request",
                otel.kind = "server",
                http.request.method = req.method,
                url.path = req.path,
                shard = self.id as u64,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                enduser.id = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let _entered = span.enter();
        let served = self.clients[slot as usize].exp_s;
        if served > 0 {
            self.out.stats.http_keepalive_reuses += 1;
        }
        let node = self.node.clone();
        let keep = req.keep_alive
            && served.saturating_add(1) < node.cfg.http_keepalive_requests_max
            && !node.draining.load(Ordering::Relaxed);
        if req.method == "OPTIONS" {
            if let Some(bytes) = self.cors.preflight_response(req, keep) {
                return self.http_respond(slot, bytes, keep);
            }
        }
        let json = "application/json";
        let mut allow = None;
        let mut extra = "";
        let api = if req.path.starts_with(crate::rest::PREFIX) {
            // The messaging REST API: a user's token, not the server API key.
            Some(self.rest_request(slot, req, keep))
        } else if req.path.starts_with("/api/") {
            Some(self.api_request(slot, req, keep))
        } else {
            None
        };
        let (status, ctype, body): (Status, &str, Vec<u8>) = if let Some(answer) = api {
            match answer {
                ApiAnswer::Now(status, body, a) => {
                    crate::trace::record_status(&span, status.0);
                    allow = a;
                    (status, json, body)
                }
                ApiAnswer::Later => {
                    // Counted as served now; the response is delivered to this connection by
                    // the shard that orders the room (`rooms::answer_api`) or, for the REST
                    // API, by the bridge that ran it against the store.
                    let now = self.now_tick;
                    let gen = self.clients[slot as usize].gen;
                    let c = &mut self.clients[slot as usize];
                    c.exp_s = c.exp_s.saturating_add(1);
                    c.last_rx_tick = now;
                    self.http_waiting.insert((slot, gen), keep);
                    let deadline = now + self.t.keepalive.max(self.t.answer_wait);
                    self.schedule(slot, deadline);
                    return Served::Waiting;
                }
            }
        } else {
            match route(ROUTES, req.method, req.path) {
                Routed::Found(r, _) => {
                    if matches!(r, Route::Admin(_)) && node.cfg.admin_page {
                        extra = ADMIN_HEADERS;
                    }
                    endpoint(&node, r)
                }
                Routed::MethodNotAllowed(a) => {
                    allow = Some(a);
                    (
                        Status::METHOD_NOT_ALLOWED,
                        json,
                        http::json_error_body("method not allowed"),
                    )
                }
                Routed::BadRequest(text) => {
                    (Status::BAD_REQUEST, json, http::json_error_body(text))
                }
                Routed::NotFound => (Status::NOT_FOUND, json, http::json_error_body("not found")),
            }
        };
        let mut r = Response::new(status, ctype, &body);
        r.keep_alive = keep;
        r.allow = allow.as_deref();
        r.cors = self.cors.headers(req.origin);
        r.head_request = req.is_head();
        r.extra_headers = extra;
        let bytes = r.to_vec();
        self.http_respond(slot, bytes, keep)
    }

    /// A request under `/api/`: the key, then the API's routes.
    fn api_request(&mut self, slot: u32, req: &crate::http::Request, keep: bool) -> ApiAnswer {
        use crate::http::{route, Routed};
        use service::api::{self, Outcome};
        let Some(key) = self.node.cfg.api_key.clone() else {
            return ApiAnswer::now(
                Status::NOT_FOUND,
                "the server API is off (no api_key configured)",
            );
        };
        if !crate::http::api_key_ok(req, &key) {
            return ApiAnswer::now(Status::UNAUTHORIZED, "invalid or missing API key");
        }
        // The body is read as JSON whatever the Content-Type says: `curl -d` sends
        // application/x-www-form-urlencoded, and a body that is not JSON is refused anyway.
        let outcome = match route(API_ROUTES, req.method, req.path) {
            Routed::Found(r, params) => match r {
                Api::Publish => {
                    let origin = match self.cors.headers(req.origin) {
                        crate::http::CorsHeaders::Origin(o) => Some(o),
                        _ => None,
                    };
                    api::publish(self, slot, req.body, keep, origin)
                }
                Api::Notify => {
                    let origin = match self.cors.headers(req.origin) {
                        crate::http::CorsHeaders::Origin(o) => Some(o),
                        _ => None,
                    };
                    let user = params.get(0).unwrap_or("");
                    api::notify(self, slot, user, req.body, keep, origin)
                }
                Api::Broadcast => api::broadcast(self, req.body),
                Api::UserSend => api::user_send(self, params.get(0).unwrap_or(""), req.body),
                Api::Disconnect => api::disconnect(self, params.get(0).unwrap_or("")),
                Api::Stats => api::stats(self),
                Api::AdminActivity => api::admin_activity(self),
            },
            Routed::MethodNotAllowed(a) => {
                return ApiAnswer::Now(
                    Status::METHOD_NOT_ALLOWED,
                    http::json_error_body("method not allowed"),
                    Some(a),
                )
            }
            Routed::BadRequest(text) => return ApiAnswer::now(Status::BAD_REQUEST, text),
            Routed::NotFound => return ApiAnswer::now(Status::NOT_FOUND, "not found"),
        };
        match outcome {
            Outcome::Now(status, body) => ApiAnswer::Now(status, body, None),
            Outcome::Later => ApiAnswer::Later,
        }
    }

    /// A request under `/api/v1/` (the messaging REST API, `crate::rest`): authenticated as
    /// the upgrade would be, parsed here; presence answered here from the directory, store
    /// requests handed to the bridge (the connection waits for its answer; a full bridge
    /// inbox is 503 `server busy, retry later`).
    fn rest_request(&mut self, slot: u32, req: &crate::http::Request, keep: bool) -> ApiAnswer {
        use crate::bridge::StoreJob;
        use crate::rest::{self, Op};
        let node = self.node.clone();
        let cfg = &node.cfg;
        let id = match rest::identify(
            req,
            cfg.auth_mode,
            node.verifier.as_ref(),
            cfg.api_key.as_deref(),
            self.now_ms / 1000,
        ) {
            Ok(id) => id,
            Err(e) => {
                if e.status == Status::UNAUTHORIZED {
                    self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                }
                return e.into();
            }
        };
        let limits = rest::Limits {
            content_bytes_max: cfg.max_dm_content_bytes,
        };
        let op = match rest::parse(req, &limits) {
            Ok(op) => op,
            Err(e) => return e.into(),
        };
        match op {
            Op::Presence(p) => {
                let allowed = match cfg.address_policy {
                    crate::config::AddressPolicy::Any => None,
                    crate::config::AddressPolicy::Claim => {
                        Some(id.allowed_users.as_deref().unwrap_or(&[]))
                    }
                };
                let (snapshot, now_ms) = (&mut self.rest_online, self.now_ms);
                match rest::presence::answer(&node.dir, &id.user, &p, allowed, snapshot, now_ms) {
                    Ok(body) => ApiAnswer::Now(Status::OK, body, None),
                    Err(e) => e.into(),
                }
            }
            Op::Store(op) => {
                let cors = match self.cors.headers(req.origin) {
                    crate::http::CorsHeaders::Origin(o) => Some(Arc::from(o)),
                    _ => None,
                };
                let span = crate::trace::current();
                if !span.is_none() {
                    span.record("enduser.id", &*id.user);
                }
                let job = StoreJob::Rest {
                    origin: self.conn_ref(slot),
                    user: id.user,
                    op,
                    keep,
                    cors,
                    span,
                };
                if !self.hand_to_store(job) {
                    return ApiAnswer::now(Status::SERVICE_UNAVAILABLE, "server busy, retry later");
                }
                ApiAnswer::Later
            }
        }
    }

    /// The answer to a waiting API request arrived (queued by `deliver_local`): carry on with
    /// what the client pipelined behind it, or close if it asked to.
    pub(super) fn http_resume(&mut self, slot: u32, keep: bool) {
        if !self.clients.contains(slot as usize) {
            return;
        }
        if !keep {
            self.close_with(slot, 0, "");
            return;
        }
        self.make_urgent(slot);
        self.on_http_bytes(slot, &[]);
    }

    /// Queue a response; keep the connection for the next request or close after it.
    fn http_respond(&mut self, slot: u32, bytes: Vec<u8>, keep: bool) -> Served {
        if !keep {
            self.http_reply(slot, bytes);
            return Served::Closing;
        }
        let f = Frame::from_wire(&bytes, self.now_us);
        let now = self.now_tick;
        let c = &mut self.clients[slot as usize];
        // In the HTTP phase `exp_s` counts the requests served on the connection, and
        // `last_rx_tick` is when it went idle: the next request must complete within
        // `http_keepalive_timeout` of it.
        c.exp_s = c.exp_s.saturating_add(1);
        c.last_rx_tick = now;
        self.reply(slot, f);
        let deadline = now + self.t.keepalive;
        self.schedule(slot, deadline);
        Served::KeepOpen
    }

    /// Validate and perform an upgrade, or park it for the auth service (`auth_mode:
    /// service`, finished by `finish_upgrade` when the answer comes).
    fn upgrade(&mut self, slot: u32, head: &http::RequestHead, is_echo: bool) -> Upgraded {
        // `exp_s` counted kept-alive requests in the HTTP phase; from here it is the token's.
        self.clients[slot as usize].exp_s = 0;
        // The path's dialect, for every JSON frame from `connected` on (until the 101 only
        // HTTP responses are queued, which no dialect translates).
        if !is_echo {
            self.clients[slot as usize].dialect =
                self.node.cfg.path_dialect(head.path).initial_byte();
        }
        let key = match head.upgrade_key() {
            Ok(key) => key,
            Err(problem) => {
                self.reject(slot, 400, problem);
                return Upgraded::Refused;
            }
        };
        let node = self.node.clone();
        let cfg = &node.cfg;
        if !cfg.allowed_origins.is_empty() {
            if let Some(origin) = head.origin {
                if !cfg.allowed_origins.iter().any(|o| o == origin || o == "*") {
                    self.reject(slot, 403, "origin not allowed");
                    return Upgraded::Refused;
                }
            }
        }
        if node.draining.load(Ordering::Relaxed) {
            self.reject(slot, 503, "server is shutting down");
            return Upgraded::Refused;
        }
        // Who is this?
        let mut claims: Option<Claims> = None;
        let mut claimed_user: Option<String> = None;
        let mut await_auth = false;
        if !is_echo {
            match (cfg.auth_mode, node.verifier.as_ref()) {
                (AuthMode::Jwt, Some(verifier)) => {
                    match token_from_upgrade(head.authorization, head.query, head.ws_protocols) {
                        Some((token, _)) => {
                            match verify_traced(verifier, &token, self.now_ms / 1000) {
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
                                    return Upgraded::Refused;
                                }
                            }
                        }
                        None if cfg.path_dialect(head.path).needs_upgrade_token() => {
                            // The chat hub's clients cannot authenticate in-band.
                            self.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
                            self.reject(slot, 401, crate::dialect::TOKEN_REQUIRED);
                            return Upgraded::Refused;
                        }
                        None => await_auth = true,
                    }
                }
                (AuthMode::Service, _) => {
                    return match self.service_credential(slot, head) {
                        Some(cred) => self.park_upgrade(slot, head, key, cred),
                        None => Upgraded::Refused,
                    };
                }
                _ => {
                    if let Some(u) = head.query.and_then(|q| query_param(q, "user_id")) {
                        if u.is_empty() || u.len() > ID_BYTES_MAX || u.contains('\0') {
                            self.reject(slot, 400, "invalid user_id");
                            return Upgraded::Refused;
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
            return Upgraded::Refused;
        }
        let protocol =
            http::offers_protocol(head.ws_protocols, "switchboard").then_some("switchboard");
        let response = http::switching_protocols(key, protocol);
        let rooms: Vec<String> = if url_rooms && !await_auth {
            head.query
                .into_iter()
                .flat_map(|q| query_params(q, "subscribe"))
                .map(|r| r.into_owned())
                .collect()
        } else {
            Vec::new()
        };
        if self.finish_upgrade(
            slot,
            claims,
            claimed_user,
            await_auth,
            is_echo,
            response,
            &rooms,
        ) {
            Upgraded::Done
        } else {
            Upgraded::Refused
        }
    }

    /// The rest of an upgrade once the user is known (now, or from the auth service): the
    /// store's NUL rule, capacity, devices per user, the 101 (`response`), `connected`, and
    /// the `?subscribe=` rooms. Returns false when it was refused.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_upgrade(
        &mut self,
        slot: u32,
        claims: Option<Claims>,
        claimed_user: Option<String>,
        await_auth: bool,
        is_echo: bool,
        response: Vec<u8>,
        rooms: &[String],
    ) -> bool {
        let node = self.node.clone();
        if claims
            .as_ref()
            .is_some_and(|c| crate::store::has_nul(&c.sub))
        {
            // The message store cannot hold such a user id.
            self.reject(slot, 400, service::dm::NUL_TEXT);
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
            let span = crate::trace::current();
            if !span.is_none() {
                span.record("enduser.id", user.as_str());
            }
            if service::session::set_identity(self, slot, &user, claims.as_ref()).is_err() {
                crate::admission::connection_gone(&node);
                self.reject(slot, 429, service::session::TOO_MANY_DEVICES);
                return false;
            }
        }
        let response = Frame::from_wire(&response, self.now_us);
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
        if !await_auth {
            self.dialect_opened(slot);
        }
        // `?subscribe=a&subscribe=b`: subscribe as if the client had sent the commands right
        // after `connected`; the replies share the upgrade's write.
        for room in rooms {
            if let Some(room) = service::rooms::valid_room(self, slot, Some(room), None) {
                service::rooms::join(self, slot, room, None, None);
            }
        }
        self.schedule(slot, now_tick + 1);
        true
    }
}

/// Check an upgrade's token; traced, as an `auth` child of the upgrade's span.
fn verify_traced(
    verifier: &crate::auth::Verifier,
    token: &str,
    now_s: u64,
) -> Result<Claims, crate::auth::AuthError> {
    let auth = crate::child_span!(
        &crate::trace::current(),
        "auth",
        auth.mode = "jwt",
        auth.result = tracing::field::Empty,
    );
    let verified = verifier.verify(token, now_s);
    if !auth.is_none() {
        let result = verified.as_ref().map_or_else(|e| e.as_str(), |_| "ok");
        auth.record("auth.result", result);
    }
    verified
}

/// The plain endpoints. `HEAD` is served wherever `GET` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Live,
    Ready,
    Metrics,
    /// The admin page and its script and style (`admin_page`; 404 while it is off).
    Admin(AdminFile),
}

/// The admin page's files, shipped in the binary (`src/admin/`, no build step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AdminFile {
    Html,
    Js,
    Css,
}

/// The admin page's headers: only its own script and style run, it talks to this node only,
/// no other site may frame it, and its URL (which may carry `#key=`) is never sent on.
const ADMIN_HEADERS: &str = "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n";

const ROUTES: &[RouteSpec<Route>] = &[
    ("GET /health", Route::Health),
    ("GET /live", Route::Live),
    ("GET /ready", Route::Ready),
    ("GET /metrics", Route::Metrics),
    ("GET /prometheus/metrics", Route::Metrics),
    ("GET /admin", Route::Admin(AdminFile::Html)),
    ("GET /admin/app.js", Route::Admin(AdminFile::Js)),
    ("GET /admin/app.css", Route::Admin(AdminFile::Css)),
];

fn endpoint(node: &Node, r: Route) -> (Status, &'static str, Vec<u8>) {
    let json = "application/json";
    match r {
        Route::Health => {
            // The rooms module's fields, then the messaging service's (one body, the union).
            let mut body = format!(
                "{{\"status\":\"healthy\",\"clients\":{},\"rooms\":{},\"service\":",
                node.dir.connections(),
                node.dir.rooms_len()
            )
            .into_bytes();
            crate::proto::json::write_str(&mut body, &node.cfg.service_name);
            body.extend_from_slice(b",\"time\":\"");
            // RFC 3339 UTC to the second, as the messaging service wrote it (`...T10:00:00Z`).
            let time = crate::proto::json::rfc3339_ms(super::unix_ms());
            body.extend_from_slice(&time.as_bytes()[..19]);
            body.extend_from_slice(b"Z\"}");
            (Status::OK, json, body)
        }
        Route::Live => (Status::OK, json, b"{\"status\":\"alive\"}".to_vec()),
        Route::Ready => match node.ready() {
            Ok(()) => match node.redis_degraded() {
                // redis_ready_when_degraded: serving this node's clients, and saying so.
                Some(why) => {
                    let body = format!("{{\"status\":\"ready\",\"degraded\":\"{why}\"}}");
                    (Status::OK, json, body.into_bytes())
                }
                None => (Status::OK, json, b"{\"status\":\"ready\"}".to_vec()),
            },
            Err(why) => {
                let body = format!("{{\"status\":\"not ready\",\"reason\":\"{why}\"}}");
                (Status::SERVICE_UNAVAILABLE, json, body.into_bytes())
            }
        },
        Route::Metrics => {
            let text = crate::metrics::render(&NodeView {
                shards: &node.stats,
                rooms: node.dir.rooms_len() as u64,
                users: node.dir.users_len() as u64,
                connections: node.dir.connections(),
                max_connections: node.max_connections,
                draining: node.draining.load(Ordering::Relaxed),
                store: Some(&node.store_stats),
                kafka: Some(&node.kafka_stats),
                limits: Some(&node.limits),
                compat: Some(&node.message_rate),
            });
            let mut text = text;
            let cfg = &node.cfg;
            if cfg.redis_url.is_some() {
                crate::bridge::redis::prometheus_lines(&node.redis_stats, &mut text);
            }
            if cfg.auth_mode == AuthMode::Service || !cfg.rpc_routes.is_empty() {
                crate::bridge::proxy::render(&node.proxy_stats, &mut text);
            }
            if !cfg.eureka_url.is_empty() {
                crate::bridge::eureka::render(&node.eureka_stats, &mut text);
            }
            if let Some(t) = node.tls.as_ref() {
                crate::tls::render(t, &mut text);
            }
            crate::trace::render(&mut text);
            crate::metrics::render_io_backend(cfg.io_backend, cfg.io_uring_sends, &mut text);
            (Status::OK, "text/plain; version=0.0.4", text.into_bytes())
        }
        Route::Admin(_) if !node.cfg.admin_page => {
            (Status::NOT_FOUND, json, http::json_error_body("not found"))
        }
        Route::Admin(f) => {
            let (ctype, body) = match f {
                AdminFile::Html => ("text/html; charset=utf-8", ADMIN_HTML),
                AdminFile::Js => ("text/javascript; charset=utf-8", ADMIN_JS),
                AdminFile::Css => ("text/css; charset=utf-8", ADMIN_CSS),
            };
            (Status::OK, ctype, body.as_bytes().to_vec())
        }
    }
}

const ADMIN_HTML: &str = include_str!("../admin/index.html");
const ADMIN_JS: &str = include_str!("../admin/app.js");
const ADMIN_CSS: &str = include_str!("../admin/app.css");

/// What `upgrade` did with a request.
pub(super) enum Upgraded {
    /// Refused (the response is queued and the connection closes after it).
    Refused,
    /// Switched to WebSocket.
    Done,
    /// Parked for the auth service's answer.
    Parked,
}

/// What `serve_http` did with a request.
enum Served {
    /// The response is queued and the connection closes after it.
    Closing,
    /// The response is queued; the connection waits for the next request.
    KeepOpen,
    /// The response comes later from another shard; further requests wait for it.
    Waiting,
}

/// An API request's answer: now (status, JSON body, `Allow` for a 405) or later.
enum ApiAnswer {
    Now(Status, Vec<u8>, Option<String>),
    Later,
}

impl ApiAnswer {
    fn now(status: Status, text: &str) -> ApiAnswer {
        ApiAnswer::Now(status, http::json_error_body(text), None)
    }
}

impl From<crate::rest::RestError> for ApiAnswer {
    fn from(e: crate::rest::RestError) -> ApiAnswer {
        ApiAnswer::Now(e.status, e.body(), e.allow)
    }
}

/// The server API's routes (behind the API key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Publish,
    Broadcast,
    UserSend,
    Disconnect,
    Notify,
    Stats,
    AdminActivity,
}

const API_ROUTES: &[RouteSpec<Api>] = &[
    ("POST /api/publish", Api::Publish),
    ("POST /api/broadcast", Api::Broadcast),
    ("POST /api/users/{id}/send", Api::UserSend),
    ("POST /api/users/{id}/disconnect", Api::Disconnect),
    ("POST /api/users/{id}/notifications", Api::Notify),
    ("GET /api/stats", Api::Stats),
    ("GET /api/admin/activity", Api::AdminActivity),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_tables_are_valid() {
        crate::http::check_table(ROUTES).unwrap();
        crate::http::check_table(API_ROUTES).unwrap();
        // No REST route falls under the server API's table, and the reverse.
        for (spec, _) in API_ROUTES {
            assert!(!spec.contains(crate::rest::PREFIX), "{spec}");
        }
    }
}
