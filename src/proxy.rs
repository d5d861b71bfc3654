//! The HTTP backends a connection's traffic is handed to, sans-IO: the auth service of
//! `auth_mode: service` (a connect proxy) and the custom message types of `rpc_routes` (an RPC
//! proxy). The contracts are in docs/PROTOCOL.md ("Auth modes", "Custom message types").
//!
//! Owns: the routes table and its matching, the JSON bodies posted to backends, the reading of
//! their answers into verdicts and reply frames' parts, and the auth answers' cache. Pure: no
//! network, no clock (`now_ms` is an argument), no logging. The calls themselves run on the
//! bridge (`bridge::proxy`); shards park the upgrade or count the call (`shard::proxy`).
//! Tokens and user ids never reach a log from here: errors carry fixed texts only.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_norway::Value;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value as Json};

use crate::limits::ID_BYTES_MAX;
use crate::proto::envelope::write_object;

/// Routes in `rpc_routes` at most (each is matched by a linear scan on a routed command only;
/// native types never reach the table).
pub const RPC_ROUTES_MAX: usize = 256;
/// Longest message type (or prefix) in a route, bytes.
pub const RPC_TYPE_BYTES_MAX: usize = 128;
/// Longest JSON pointer accepted in `auth_service_user_pointer`.
pub const POINTER_BYTES_MAX: usize = 256;
/// Longest error text of a backend's 4xx `{"error": "..."}` passed on to the client; a longer
/// one is cut at a character boundary.
pub const BACKEND_ERROR_BYTES_MAX: usize = 256;

// ------------------------------------------------------------ error texts (PROTOCOL.md)

/// The auth service said no (HTTP 401 on the upgrade).
pub const AUTH_REFUSED: &str = "refused by the auth service";
/// The auth service did not answer within `auth_service_timeout` (503).
pub const AUTH_TIMED_OUT: &str = "auth service timed out, retry later";
/// The auth service cannot be reached, or answered 5xx or an unreadable 200 (503).
pub const AUTH_UNAVAILABLE: &str = "auth service unavailable, retry later";
/// `auth_service_concurrency_max` requests are in flight (503 at once).
pub const AUTH_BUSY: &str = "auth service busy, retry later";
/// Service mode, and the upgrade carried neither a token nor `?user_id=` (401).
pub const AUTH_CREDENTIAL_REQUIRED: &str =
    "token or user_id is required: send ?token=, Authorization: Bearer or ?user_id=";

/// A backend cannot be reached, or answered 5xx.
pub const RPC_UNAVAILABLE: &str = "backend unavailable, retry later";
/// A backend did not answer within `rpc_timeout`.
pub const RPC_TIMED_OUT: &str = "backend timed out, retry later";
/// A backend's reply is not JSON, is larger than `rpc_reply_bytes_max`, or is not HTTP.
pub const RPC_GARBAGE: &str = "backend answered garbage";
/// `rpc_concurrency_max` calls are in flight on this node.
pub const RPC_BUSY: &str = "backend busy, retry later";
/// `rpc_concurrency_per_connection_max` calls of this connection are in flight.
pub const RPC_TOO_MANY: &str = "too many backend calls in flight";
/// A backend answered 4xx without an `error` text of its own.
pub const RPC_REFUSED: &str = "backend refused the request";

// ------------------------------------------------------------ routes

/// One `rpc_routes` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcRoute {
    /// The type, or (with `prefix`) the start of the types, without the trailing `*`.
    pub pattern: String,
    pub prefix: bool,
    /// The backend endpoint (`http://host[:port]/path`).
    pub url: String,
}

/// Parse the `rpc_routes` value: a map `type: url` (YAML file, or JSON in env), or the text
/// `type=url,type2=url` (env). A type ending in `*` is a prefix (`orders.*`, `*` = every
/// non-native type).
pub fn parse_routes(v: &Value) -> Result<Vec<RpcRoute>, String> {
    let pairs: Vec<(String, String)> = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| match (k, v) {
                (Value::String(k), Value::String(v)) => Ok((k.clone(), v.clone())),
                _ => Err("expected a map of message type: http:// URL".to_owned()),
            })
            .collect::<Result<_, _>>()?,
        Value::String(s) if s.trim().is_empty() => return Ok(Vec::new()),
        Value::String(s) => s
            .split(',')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) => Ok((k.trim().to_owned(), v.trim().to_owned())),
                None => Err(format!("expected type=url, got {:?}", pair.trim())),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err("expected a map of message type: http:// URL, or type=url,type2=url".into())
        }
    };
    if pairs.len() > RPC_ROUTES_MAX {
        return Err(format!(
            "at most {RPC_ROUTES_MAX} routes, got {}",
            pairs.len()
        ));
    }
    let mut routes = Vec::with_capacity(pairs.len());
    for (kind, url) in pairs {
        let (pattern, prefix) = match kind.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (kind.clone(), false),
        };
        if (!prefix && pattern.is_empty()) || kind.len() > RPC_TYPE_BYTES_MAX {
            return Err(format!(
                "{kind:?}: a message type is 1 to {RPC_TYPE_BYTES_MAX} bytes"
            ));
        }
        if pattern.contains('*') {
            return Err(format!("{kind:?}: `*` may only end a type (a prefix)"));
        }
        if !prefix && crate::shard::service::handler(&pattern).is_some() {
            return Err(format!(
                "{kind:?} is a native message type; native types are never sent to a backend"
            ));
        }
        crate::bridge::http_client::Url::parse(&url).map_err(|e| format!("{kind:?}: {e}"))?;
        if routes
            .iter()
            .any(|r: &RpcRoute| r.pattern == pattern && r.prefix == prefix)
        {
            return Err(format!("{kind:?} is listed twice"));
        }
        routes.push(RpcRoute {
            pattern,
            prefix,
            url,
        });
    }
    Ok(routes)
}

/// The index of the route of a (non-native) type: an exact entry, else the longest matching
/// prefix.
pub fn route_for(routes: &[RpcRoute], kind: &str) -> Option<usize> {
    if let Some(i) = routes.iter().position(|r| !r.prefix && r.pattern == kind) {
        return Some(i);
    }
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.prefix && kind.starts_with(r.pattern.as_str()))
        .max_by_key(|(_, r)| r.pattern.len())
        .map(|(i, _)| i)
}

/// What the bridge hands a shard back (in `ServiceMsg::Proxy`).
pub enum ShardAnswer {
    /// The auth service's verdict on the parked upgrade of connection (`slot`, `gen`).
    Connect {
        slot: u32,
        gen: u32,
        outcome: ConnectOutcome,
    },
    /// The reply (or error) frame to a routed command of connection (`slot`, `gen`).
    Call {
        slot: u32,
        gen: u32,
        frame: crate::proto::Frame,
    },
}

/// How a parked upgrade ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// 101: the connection is this user.
    Allow(Arc<str>),
    /// 401 [`AUTH_REFUSED`].
    Refused,
    /// 503 with this text ([`AUTH_TIMED_OUT`], [`AUTH_UNAVAILABLE`], [`AUTH_BUSY`]).
    Unavailable(&'static str),
}

// ------------------------------------------------------------ JSON pointers

/// Check an RFC 6901 pointer: "" (the whole document) or `/`-separated tokens.
pub fn parse_pointer(p: &str) -> Result<(), String> {
    if p.len() > POINTER_BYTES_MAX {
        return Err(format!(
            "a JSON pointer is at most {POINTER_BYTES_MAX} bytes"
        ));
    }
    if !p.is_empty() && !p.starts_with('/') {
        return Err(format!(
            "{p:?} is not a JSON pointer; expected \"\" or one starting with /, e.g. /user_id"
        ));
    }
    Ok(())
}

// ------------------------------------------------------------ the auth service

/// What the client presented on the upgrade, as sent to the auth service (and the cache key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A token (`?token=`, `Authorization: Bearer`, or a `bearer.` subprotocol).
    Token(String),
    /// Only `?user_id=` (the topic service's clients).
    UserId(String),
}

/// The auth service's request body: `{"token":..}` or `{"user_id":..}`, then
/// `"remote_addr":"ip:port"` and `"path"` (the WebSocket path asked for).
pub fn connect_body(cred: &Credential, remote_addr: Option<&str>, path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_object(&mut out, |o| {
        match cred {
            Credential::Token(t) => o.str("token", t),
            Credential::UserId(u) => o.str("user_id", u),
        };
        o.opt_str("remote_addr", remote_addr).str("path", path);
    });
    out
}

/// What the auth service's answer means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx with a user id at the pointer: the connection is this user.
    Allow(Arc<str>),
    /// 4xx: the credential is refused (cached for `auth_service_negative_cache_ttl`).
    Deny,
    /// 5xx, or a 2xx without a usable user id: the service is broken (503, never cached).
    Broken,
}

/// Read the auth service's answer. The user id may be a string (1 to `ID_BYTES_MAX` bytes, no
/// NUL) or an integer (written in decimal).
pub fn connect_verdict(status: u16, body: &[u8], pointer: &str) -> Verdict {
    match status {
        200..=299 => {}
        400..=499 => return Verdict::Deny,
        _ => return Verdict::Broken,
    }
    let Ok(v) = sonic_rs::from_slice::<Json>(body) else {
        return Verdict::Broken;
    };
    let Some(at) = crate::notifications::pointer(&v, pointer) else {
        return Verdict::Broken;
    };
    let user = if let Some(s) = at.as_str() {
        s.to_owned()
    } else if let Some(n) = at.as_u64() {
        n.to_string()
    } else if let Some(n) = at.as_i64() {
        n.to_string()
    } else {
        return Verdict::Broken;
    };
    if user.is_empty() || user.len() > ID_BYTES_MAX || user.contains('\0') {
        return Verdict::Broken;
    }
    Verdict::Allow(Arc::from(user))
}

/// The auth service's answers, remembered per credential: accepted ones for the positive TTL,
/// refused ones for the negative TTL. Bounded by `max` entries; at the bound the oldest
/// insertion goes first (FIFO: the TTLs are short, so FIFO is close to LRU here and costs no
/// bookkeeping on a hit).
pub struct AuthCache {
    map: HashMap<Credential, (Option<Arc<str>>, u64, u64)>,
    /// Insertion order: (credential, serial of that insertion).
    order: VecDeque<(Credential, u64)>,
    serial: u64,
    max: usize,
}

impl AuthCache {
    pub fn new(max: usize) -> AuthCache {
        assert!(max >= 1);
        AuthCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            serial: 0,
            max,
        }
    }

    /// `Some(Some(user))`: accepted; `Some(None)`: refused; `None`: ask the service.
    pub fn get(&mut self, cred: &Credential, now_ms: u64) -> Option<Option<Arc<str>>> {
        match self.map.get(cred) {
            Some((user, expires, _)) if *expires > now_ms => Some(user.clone()),
            Some(_) => {
                self.map.remove(cred);
                None
            }
            None => None,
        }
    }

    /// Remember `user` (None = refused) for `ttl_ms` (0 = not at all).
    pub fn put(&mut self, cred: Credential, user: Option<Arc<str>>, ttl_ms: u64, now_ms: u64) {
        if ttl_ms == 0 {
            return;
        }
        while self.map.len() >= self.max || self.order.len() >= 2 * self.max {
            let Some((old, serial)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.2 == serial) {
                self.map.remove(&old);
            }
        }
        self.serial += 1;
        self.order.push_back((cred.clone(), self.serial));
        self.map
            .insert(cred, (user, now_ms.saturating_add(ttl_ms), self.serial));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

// ------------------------------------------------------------ custom types (RPC)

/// The body posted for a routed command: `{"type","id","user_id","client_id","data",
/// "command"}`. `id_raw` is the command's `id` as written (raw JSON), `data_raw` its `data`
/// member (raw JSON), `command` the whole command (valid JSON, checked by the caller).
pub fn rpc_body(
    kind: &str,
    id_raw: Option<&str>,
    user: Option<&str>,
    client_id: u128,
    data_raw: Option<&str>,
    command: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() * 2 + 128);
    write_object(&mut out, |o| {
        o.str("type", kind)
            .raw("id", id_raw.unwrap_or("null"))
            .opt_str("user_id", user)
            .uuid("client_id", client_id)
            .raw("data", data_raw.unwrap_or("null"))
            .raw("command", command);
    });
    out
}

/// What goes back to the client for a backend's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RpcAnswer {
    /// `{"type":<kind>,"id":..,"data":<data>,"timestamp":..}`.
    Reply { kind: String, data: String },
    /// `{"type":"error","id":..,"error":<text>,"timestamp":..}`.
    Error(String),
}

/// Read a backend's answer to a routed command of type `cmd_kind`. 2xx with a JSON body: a
/// reply whose type is the body's `type` (a string) or `<cmd_kind>.result`, and whose data is
/// the body's `data` member when the body is an object holding one, else the whole body. 4xx:
/// the body's `error` text (a string, cut to [`BACKEND_ERROR_BYTES_MAX`]) or
/// [`RPC_REFUSED`]. 5xx and other statuses: [`RPC_UNAVAILABLE`]. A 2xx that is not JSON:
/// [`RPC_GARBAGE`]. (A body over `rpc_reply_bytes_max` never gets here: the client refuses it.)
pub fn rpc_answer(cmd_kind: &str, status: u16, body: &[u8]) -> RpcAnswer {
    match status {
        200..=299 => {}
        400..=499 => {
            let text = sonic_rs::from_slice::<Json>(body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(cut_error))
                .filter(|t| !t.is_empty());
            return RpcAnswer::Error(text.unwrap_or_else(|| RPC_REFUSED.to_owned()));
        }
        _ => return RpcAnswer::Error(RPC_UNAVAILABLE.to_owned()),
    }
    let Ok(v) = sonic_rs::from_slice::<Json>(body) else {
        return RpcAnswer::Error(RPC_GARBAGE.to_owned());
    };
    let kind = v
        .get("type")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty() && t.len() <= RPC_TYPE_BYTES_MAX)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{cmd_kind}.result"));
    let data = match v.as_object().and_then(|o| o.get(&"data")) {
        Some(d) => sonic_rs::to_string(d),
        None => sonic_rs::to_string(&v),
    };
    match data {
        Ok(data) => RpcAnswer::Reply { kind, data },
        Err(_) => RpcAnswer::Error(RPC_GARBAGE.to_owned()),
    }
}

fn cut_error(s: &str) -> String {
    let mut end = s.len().min(BACKEND_ERROR_BYTES_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_norway::from_str(s).unwrap()
    }

    #[test]
    fn routes_from_a_map_and_from_env_text() {
        let r = parse_routes(&yaml(
            "get_user: http://users:8080/rpc\n\"orders.*\": http://orders/rpc\n",
        ))
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[1],
            RpcRoute {
                pattern: "orders.".into(),
                prefix: true,
                url: "http://orders/rpc".into()
            }
        );
        let e = parse_routes(&Value::String(
            "get_user=http://a/x, create_order=http://b:81/y".into(),
        ))
        .unwrap();
        assert_eq!(e[1].pattern, "create_order");
        assert_eq!(e[1].url, "http://b:81/y");
        assert!(parse_routes(&Value::String(String::new()))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_routes_say_why() {
        let bad = |s: &str| parse_routes(&Value::String(s.into())).unwrap_err();
        assert!(bad("get_user").contains("type=url"));
        assert!(bad("get_user=https://a/x").contains("https"));
        assert!(bad("subscribe=http://a/x").contains("native"));
        assert!(bad("a*b=http://a/x").contains("end"));
        assert!(bad("a=http://a/x,a=http://b/y").contains("twice"));
        assert!(bad("=http://a/x").contains("1 to"));
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let r = parse_routes(&Value::String(
            "*=http://all/,orders.*=http://o/,orders.create=http://c/,orders.big.*=http://b/"
                .into(),
        ))
        .unwrap();
        let url = |k: &str| route_for(&r, k).map(|i| r[i].url.as_str());
        assert_eq!(url("orders.create"), Some("http://c/"));
        assert_eq!(url("orders.list"), Some("http://o/"));
        assert_eq!(url("orders.big.one"), Some("http://b/"));
        assert_eq!(url("get_user"), Some("http://all/"));
        assert_eq!(route_for(&r[1..], "get_user"), None);
    }

    #[test]
    fn connect_bodies() {
        let t = connect_body(
            &Credential::Token("a\"b".into()),
            Some("127.0.0.1:5"),
            "/ws",
        );
        assert_eq!(
            std::str::from_utf8(&t).unwrap(),
            r#"{"token":"a\"b","remote_addr":"127.0.0.1:5","path":"/ws"}"#
        );
        let u = connect_body(&Credential::UserId("u1".into()), None, "/ws/chat");
        assert_eq!(
            std::str::from_utf8(&u).unwrap(),
            r#"{"user_id":"u1","remote_addr":null,"path":"/ws/chat"}"#
        );
    }

    #[test]
    fn connect_verdicts() {
        let allow = |u: &str| Verdict::Allow(Arc::from(u));
        assert_eq!(
            connect_verdict(200, br#"{"user_id":"u1"}"#, "/user_id"),
            allow("u1")
        );
        assert_eq!(
            connect_verdict(200, br#"{"user_id":42}"#, "/user_id"),
            allow("42")
        );
        assert_eq!(
            connect_verdict(200, br#"{"result":{"user":"x"}}"#, "/result/user"),
            allow("x")
        );
        assert_eq!(connect_verdict(200, br#""whole""#, ""), allow("whole"));
        assert_eq!(connect_verdict(401, b"", "/user_id"), Verdict::Deny);
        assert_eq!(connect_verdict(403, b"{}", "/user_id"), Verdict::Deny);
        assert_eq!(
            connect_verdict(500, br#"{"user_id":"u"}"#, "/user_id"),
            Verdict::Broken
        );
        assert_eq!(
            connect_verdict(200, b"not json", "/user_id"),
            Verdict::Broken
        );
        assert_eq!(
            connect_verdict(200, br#"{"user_id":""}"#, "/user_id"),
            Verdict::Broken
        );
        assert_eq!(
            connect_verdict(200, br#"{"user_id":true}"#, "/user_id"),
            Verdict::Broken
        );
        assert_eq!(
            connect_verdict(200, br#"{"other":"u"}"#, "/user_id"),
            Verdict::Broken
        );
        assert_eq!(
            connect_verdict(200, br#"{"user_id":"a\u0000b"}"#, "/user_id"),
            Verdict::Broken
        );
        let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(ID_BYTES_MAX + 1));
        assert_eq!(
            connect_verdict(200, long.as_bytes(), "/user_id"),
            Verdict::Broken
        );
    }

    #[test]
    fn pointers() {
        assert!(parse_pointer("/user_id").is_ok());
        assert!(parse_pointer("").is_ok());
        assert!(parse_pointer("user_id").unwrap_err().contains("/user_id"));
        assert!(parse_pointer(&format!("/{}", "a".repeat(POINTER_BYTES_MAX))).is_err());
    }

    #[test]
    fn cache_hits_expires_and_stays_bounded() {
        let mut c = AuthCache::new(2);
        let t = |s: &str| Credential::Token(s.into());
        c.put(t("a"), Some(Arc::from("ua")), 1000, 0);
        c.put(t("b"), None, 100, 0);
        assert_eq!(c.get(&t("a"), 999), Some(Some(Arc::from("ua"))));
        assert_eq!(c.get(&t("b"), 50), Some(None));
        assert_eq!(c.get(&t("b"), 100), None, "expired");
        // A token and a user id with the same text are different keys.
        assert_eq!(c.get(&Credential::UserId("a".into()), 0), None);
        c.put(t("c"), Some(Arc::from("uc")), 1000, 0);
        c.put(t("d"), Some(Arc::from("ud")), 1000, 0);
        assert!(c.len() <= 2);
        assert_eq!(c.get(&t("a"), 0), None, "oldest out first");
        assert_eq!(c.get(&t("d"), 0), Some(Some(Arc::from("ud"))));
        // A zero TTL stores nothing; re-putting one key many times keeps the order bounded.
        c.put(t("e"), None, 0, 0);
        assert_eq!(c.get(&t("e"), 0), None);
        for i in 0..100 {
            c.put(t("d"), Some(Arc::from("ud")), 1000, i);
        }
        assert!(c.order.len() <= 4 && c.len() <= 2);
        assert_eq!(c.get(&t("d"), 0), Some(Some(Arc::from("ud"))));
    }

    #[test]
    fn rpc_bodies() {
        let b = rpc_body(
            "get_user",
            Some("7"),
            Some("alice"),
            1,
            Some(r#"{"email":"a@b"}"#),
            r#"{"type":"get_user","id":7,"data":{"email":"a@b"}}"#,
        );
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"type":"get_user","id":7,"user_id":"alice","client_id":"00000000-0000-0000-0000-000000000001","data":{"email":"a@b"},"command":{"type":"get_user","id":7,"data":{"email":"a@b"}}}"#
        );
        let anon = rpc_body("x", None, None, 0, None, r#"{"type":"x"}"#);
        assert!(std::str::from_utf8(&anon)
            .unwrap()
            .starts_with(r#"{"type":"x","id":null,"user_id":null,"#));
    }

    #[test]
    fn rpc_answers() {
        let reply = |k: &str, d: &str| RpcAnswer::Reply {
            kind: k.into(),
            data: d.into(),
        };
        let err = |t: &str| RpcAnswer::Error(t.into());
        assert_eq!(
            rpc_answer(
                "get_user",
                200,
                br#"{"type":"user_response","data":{"email":"a"}}"#
            ),
            reply("user_response", r#"{"email":"a"}"#)
        );
        assert_eq!(
            rpc_answer("get_user", 200, br#"{"email":"a"}"#),
            reply("get_user.result", r#"{"email":"a"}"#)
        );
        assert_eq!(rpc_answer("x", 200, b"[1,2]"), reply("x.result", "[1,2]"));
        assert_eq!(rpc_answer("x", 200, b"<html>"), err(RPC_GARBAGE));
        assert_eq!(rpc_answer("x", 503, b"{}"), err(RPC_UNAVAILABLE));
        assert_eq!(
            rpc_answer("x", 422, br#"{"error":"email required"}"#),
            err("email required")
        );
        assert_eq!(rpc_answer("x", 404, b"nope"), err(RPC_REFUSED));
        let long = format!(r#"{{"error":"{}"}}"#, "é".repeat(200));
        match rpc_answer("x", 400, long.as_bytes()) {
            RpcAnswer::Error(t) => {
                assert!(t.len() <= BACKEND_ERROR_BYTES_MAX && t.starts_with('é'))
            }
            other => panic!("{other:?}"),
        }
    }
}
