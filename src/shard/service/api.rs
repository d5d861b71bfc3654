//! The server HTTP API for backends (PROTOCOL.md section 7), behind the API key:
//! `POST /api/publish {room, data, type?}`, `POST /api/broadcast {data, type?}`,
//! `POST /api/users/{id}/send {type?, data}`, `POST /api/users/{id}/disconnect`,
//! `GET /api/stats`. This is how the replaced services' "service layer" reaches clients.
//!
//! Everything goes through the delivery seam as a client's command would: a published room
//! message is the frame a client publish makes (with `client_id` [`rooms::API_CLIENT_ID`], the
//! nil UUID, and no `user_id`), sequenced by the room's owner and kept in its history; a
//! publish into a room ordered on another shard is answered when the owner has ordered it
//! (the HTTP connection waits; later pipelined requests wait behind it). Errors are JSON with
//! the socket protocol's texts.

use std::borrow::Cow;

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use super::rooms;
use crate::http::{json_error_body, Status};
use crate::proto::envelope::raw_or_null;
use crate::route::Target;
use crate::shard::{Shard, ShardMsg};

/// Longest `type` a backend may give a frame, in bytes.
pub const API_TYPE_BYTES_MAX: usize = 64;

/// Frame types of the protocol itself, which a backend may not send as its own (clients would
/// take them for the server's replies and events).
const RESERVED_TYPES: &[&str] = &[
    "connected",
    "subscribed",
    "unsubscribed",
    "pong",
    "error",
    "auth.success",
    "auth.failed",
    "auth.expiring",
    "auth.expired",
    "message.ack",
    "message.create",
    "message.delivered",
    "message.read",
    "typing.start",
    "typing.stop",
    "sync.done",
];
/// Prefixes of protocol types (every presence and call event).
const RESERVED_PREFIXES: &[&str] = &["presence.", "call."];

/// Messages of the API between shards.
pub enum Msg {
    /// Close every local device of `user` (`POST /api/users/{id}/disconnect`).
    Disconnect { user: std::sync::Arc<str> },
}

/// What an API request produced: a response now, or one the room's owner sends later.
pub enum Outcome {
    Now(Status, Vec<u8>),
    Later,
}

fn err(status: Status, text: &str) -> Outcome {
    Outcome::Now(status, json_error_body(text))
}

fn ok(body: String) -> Outcome {
    Outcome::Now(Status::OK, body.into_bytes())
}

/// The frame type a backend asked for (default `default`), or the error text.
fn frame_type<'a>(kind: Option<&'a str>, default: &'a str) -> Result<&'a str, &'static str> {
    let Some(kind) = kind else {
        return Ok(default);
    };
    let valid = !kind.is_empty()
        && kind.len() <= API_TYPE_BYTES_MAX
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !valid {
        return Err("invalid type");
    }
    if RESERVED_TYPES.contains(&kind) || RESERVED_PREFIXES.iter().any(|p| kind.starts_with(p)) {
        return Err("type is reserved");
    }
    Ok(kind)
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DataBody<'a> {
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Outcome> {
    sonic_rs::from_slice::<T>(body).map_err(|_| err(Status::BAD_REQUEST, "invalid JSON format"))
}

/// `POST /api/publish`.
pub fn publish(
    sh: &mut Shard,
    slot: u32,
    body: &[u8],
    keep_alive: bool,
    cors_origin: Option<&str>,
) -> Outcome {
    let b: PublishBody = match parse(body) {
        Ok(b) => b,
        Err(o) => return o,
    };
    let Some(room) = b.room.as_deref().filter(|r| !r.is_empty()) else {
        return err(Status::BAD_REQUEST, "room name is required");
    };
    if room.len() > sh.node.cfg.max_room_name_bytes {
        return err(Status::BAD_REQUEST, "room name too long");
    }
    if b.data.is_none() {
        return err(Status::BAD_REQUEST, "data is required");
    }
    let kind = match frame_type(b.kind.as_deref(), "message") {
        Ok(k) => k,
        Err(text) => return err(Status::BAD_REQUEST, text),
    };
    match rooms::api_publish(
        sh,
        slot,
        room,
        raw_or_null(&b.data),
        kind,
        keep_alive,
        cors_origin,
    ) {
        rooms::Routed::Here(position) => {
            Outcome::Now(Status::OK, rooms::api_body(position.as_ref()))
        }
        rooms::Routed::Owner => Outcome::Later,
        rooms::Routed::Busy => err(Status::SERVICE_UNAVAILABLE, "server busy, retry later"),
    }
}

/// `POST /api/broadcast`.
pub fn broadcast(sh: &mut Shard, body: &[u8]) -> Outcome {
    let b: DataBody = match parse(body) {
        Ok(b) => b,
        Err(o) => return o,
    };
    if b.data.is_none() {
        return err(Status::BAD_REQUEST, "data is required");
    }
    let kind = match frame_type(b.kind.as_deref(), "message") {
        Ok(k) => k,
        Err(text) => return err(Status::BAD_REQUEST, text),
    };
    let f = rooms::encode_message(
        sh,
        None,
        raw_or_null(&b.data),
        rooms::API_CLIENT_ID,
        None,
        None,
        kind,
    );
    sh.out.stats.broadcasts += 1;
    sh.deliver(&Target::All, &f);
    ok("{\"ok\":true}".into())
}

/// `POST /api/users/{id}/send`: `{"type": <type or notification>, "data": ..., "timestamp"}`
/// to every device of the user.
pub fn user_send(sh: &mut Shard, user: &str, body: &[u8]) -> Outcome {
    if user.is_empty() || user.len() > crate::limits::ID_BYTES_MAX {
        return err(Status::BAD_REQUEST, "invalid user id");
    }
    let b: DataBody = match parse(body) {
        Ok(b) => b,
        Err(o) => return o,
    };
    if b.data.is_none() {
        return err(Status::BAD_REQUEST, "data is required");
    }
    let kind = match frame_type(b.kind.as_deref(), "notification") {
        Ok(k) => k,
        Err(text) => return err(Status::BAD_REQUEST, text),
    };
    let devices = sh.node.dir.users.count(user);
    let now_ms = sh.now_ms;
    let data = raw_or_null(&b.data);
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", kind)
            .raw("data", data)
            .u64("timestamp", now_ms);
    });
    sh.deliver(
        &Target::User {
            user: std::sync::Arc::from(user),
            except: None,
        },
        &f,
    );
    let mut out = String::from("{\"ok\":true,\"user_id\":");
    let mut buf = Vec::new();
    crate::proto::json::write_str(&mut buf, user);
    out.push_str(&String::from_utf8_lossy(&buf));
    out.push_str(&format!(",\"devices\":{devices}}}"));
    ok(out)
}

#[derive(Deserialize)]
struct NotifyBody<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
    /// The caller's idempotency key: the same key for the same user stores nothing new.
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

/// `POST /api/users/{id}/notifications {kind, data, id?}`: store a notification for the user
/// (listed by `GET /api/v1/notifications`) and deliver `{"type":"notification","data":{id,
/// kind, data, read, createdAt}}` to every device. Answered by the bridge once stored: 201,
/// or 200 with the first one for a repeated `id`.
pub fn notify(
    sh: &mut Shard,
    slot: u32,
    user: &str,
    body: &[u8],
    keep: bool,
    cors: Option<&str>,
) -> Outcome {
    use crate::bridge::store::{StoreJob, BUSY};
    if user.is_empty() || user.len() > crate::limits::ID_BYTES_MAX {
        return err(Status::BAD_REQUEST, "invalid user id");
    }
    let b: NotifyBody = match parse(body) {
        Ok(b) => b,
        Err(o) => return o,
    };
    let kind = match b.kind.as_deref() {
        None | Some("") => return err(Status::BAD_REQUEST, "kind is required"),
        Some(k) => match frame_type(Some(k), "") {
            Ok(k) => k,
            Err(_) => {
                return err(
                    Status::BAD_REQUEST,
                    "kind must be 1 to 64 bytes of letters, digits and . _ - :",
                )
            }
        },
    };
    let Some(data) = b.data.as_ref().filter(|d| d.is_object()) else {
        return err(Status::BAD_REQUEST, "data must be a JSON object");
    };
    if b.id
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > crate::limits::ID_BYTES_MAX)
    {
        return err(Status::BAD_REQUEST, "id must be 1 to 256 bytes");
    }
    let n = crate::store::NewNotification {
        user: std::sync::Arc::from(user),
        kind: std::sync::Arc::from(kind),
        data_json: std::sync::Arc::from(data.as_raw_str()),
        source_key: b.id.as_deref().map(std::sync::Arc::from),
        created_at_ms: sh.now_ms,
    };
    let job = StoreJob::Notify {
        origin: sh.conn_ref(slot),
        keep,
        cors: cors.map(std::sync::Arc::from),
        n,
    };
    if !sh.hand_to_store(job) {
        return err(Status::SERVICE_UNAVAILABLE, BUSY);
    }
    Outcome::Later
}

/// `POST /api/users/{id}/disconnect`: every device of the user on the node is closed with
/// 1008 `disconnected by the server API`.
pub fn disconnect(sh: &mut Shard, user: &str) -> Outcome {
    if user.is_empty() || user.len() > crate::limits::ID_BYTES_MAX {
        return err(Status::BAD_REQUEST, "invalid user id");
    }
    let devices = sh.node.dir.users.count(user);
    let key = std::sync::Arc::<str>::from(user);
    let mut shards = sh.node.dir.user_shards(user);
    while shards != 0 {
        let i = shards.trailing_zeros() as usize;
        shards &= shards - 1;
        if i == sh.id {
            disconnect_local(sh, &key);
        } else {
            let msg = ShardMsg::service(super::ServiceMsg::Api(Msg::Disconnect {
                user: key.clone(),
            }));
            if sh.node.inboxes.send(i, msg).is_err() {
                sh.out.stats.cross_shard_dropped += 1;
                return err(Status::SERVICE_UNAVAILABLE, "server busy, retry later");
            }
        }
    }
    if sh.node.clustered {
        // Its devices on the other nodes too (`devices` counts this node's).
        let msg = crate::bridge::BridgeMsg::Service {
            to: crate::bridge::ServiceTo::User(key.clone()),
            service: crate::cluster::service::USER_DISCONNECT,
            body: user.as_bytes().to_vec(),
        };
        if sh.node.bridge_tx.try_send(msg).is_err() {
            sh.out.stats.bridge_dropped += 1;
            return err(Status::SERVICE_UNAVAILABLE, "server busy, retry later");
        }
    }
    let mut buf = Vec::new();
    crate::proto::json::write_str(&mut buf, user);
    ok(format!(
        "{{\"ok\":true,\"user_id\":{},\"devices\":{devices}}}",
        String::from_utf8_lossy(&buf)
    ))
}

fn disconnect_local(sh: &mut Shard, user: &str) {
    for slot in sh.devices_of(user) {
        sh.close_with(
            slot,
            crate::proto::ws::close::POLICY,
            "disconnected by the server API",
        );
    }
}

pub fn on_msg(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Disconnect { user } => disconnect_local(sh, &user),
    }
}

/// `GET /api/stats`: this node's numbers (`"scope":"node"`: with one node they are the whole
/// service's; a cluster adds cluster-wide ones). `counters` are totals since start and
/// `gauges` current values, summed over shards, as of their last publication (every 250 ms).
pub fn stats(sh: &Shard) -> Outcome {
    let node = &sh.node;
    let mut out = format!(
        "{{\"scope\":\"node\",\"node_id\":\"{:08x}\",\"uptime_s\":{},\"shards\":{},\"connections\":{},\"max_connections\":{},\"rooms\":{},\"users\":{},\"draining\":{}",
        node.id,
        node.epoch.elapsed().as_secs(),
        node.inboxes.len(),
        node.dir.connections(),
        node.max_connections,
        node.dir.rooms_len(),
        node.dir.users_len(),
        node.draining.load(std::sync::atomic::Ordering::Relaxed),
    );
    let totals = crate::metrics::totals(&node.stats);
    for (section, kind) in [
        ("counters", crate::metrics::Kind::Counter),
        ("gauges", crate::metrics::Kind::ShardGauge),
    ] {
        out.push_str(&format!(",\"{section}\":{{"));
        let mut first = true;
        for (name, _, v) in totals.iter().filter(|(_, k, _)| *k == kind) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&format!("\"{name}\":{v}"));
        }
        out.push('}');
    }
    if node.clustered {
        // The nodes' own numbers as of their last heartbeat (every 2 s), through Redis.
        let r = &node.redis_stats;
        let g = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        out.push_str(&format!(
            ",\"cluster\":{{\"scope\":\"cluster\",\"nodes\":{},\"connections\":{},\"max_connections\":{},\"as_of_ms\":{}}}",
            g(&r.cluster_nodes),
            g(&r.cluster_connections),
            g(&r.cluster_max_connections),
            g(&r.cluster_as_of_ms)
        ));
    }
    out.push('}');
    ok(out)
}

/// `GET /api/admin/activity`: what the admin page shows besides `/api/stats`. The busiest
/// rooms of this node (members here, at most [`ADMIN_BUSIEST_ROOMS`], from a pass over at
/// most [`ADMIN_ROOMS_SCAN_MAX`] rooms), error frames by reason and connection ends by kind
/// (totals since start: the page shows the change between two reads), and the cumulative
/// publish-to-flush histogram (the page takes quantiles of the difference).
///
/// [`ADMIN_BUSIEST_ROOMS`]: crate::limits::ADMIN_BUSIEST_ROOMS
/// [`ADMIN_ROOMS_SCAN_MAX`]: crate::limits::ADMIN_ROOMS_SCAN_MAX
pub fn admin_activity(sh: &Shard) -> Outcome {
    use crate::limits::{ADMIN_BUSIEST_ROOMS, ADMIN_ROOMS_SCAN_MAX};
    use crate::proto::json::write_str;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let node = &sh.node;
    // A min-heap of the K largest (count, name) seen: O(n log K), K entries held.
    let mut top: BinaryHeap<Reverse<(u32, std::sync::Arc<str>)>> =
        BinaryHeap::with_capacity(ADMIN_BUSIEST_ROOMS + 1);
    let scanned = node
        .dir
        .rooms
        .for_each_count(ADMIN_ROOMS_SCAN_MAX, |name, n| {
            if top.len() < ADMIN_BUSIEST_ROOMS {
                top.push(Reverse((n, name.clone())));
            } else if top.peek().is_some_and(|Reverse((m, _))| n > *m) {
                top.pop();
                top.push(Reverse((n, name.clone())));
            }
        });
    let mut rooms: Vec<(u32, std::sync::Arc<str>)> = top.into_iter().map(|r| r.0).collect();
    rooms.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut out = Vec::with_capacity(2048);
    out.extend_from_slice(
        format!(
            "{{\"node_id\":\"{:08x}\",\"rooms\":{},\"rooms_scanned\":{scanned},\"busiest_rooms\":[",
            node.id,
            node.dir.rooms_len()
        )
        .as_bytes(),
    );
    for (i, (n, name)) in rooms.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"room\":");
        write_str(&mut out, name);
        out.extend_from_slice(format!(",\"members\":{n}}}").as_bytes());
    }
    out.push(b']');
    let (errors, closes) = crate::metrics::labelled_totals(&node.stats);
    for (key, list) in [("errors", errors), ("closes", closes)] {
        out.extend_from_slice(format!(",\"{key}\":{{").as_bytes());
        for (i, (label, v)) in list.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(format!("\"{label}\":{v}").as_bytes());
        }
        out.push(b'}');
    }
    let (buckets, count, sum_us) = crate::metrics::latency_buckets(&node.stats);
    out.extend_from_slice(b",\"latency_us\":{\"buckets\":[");
    for (i, (le, c)) in buckets.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("[{le},{c}]").as_bytes());
    }
    out.extend_from_slice(format!("],\"count\":{count},\"sum\":{sum_us}}}}}").as_bytes());
    Outcome::Now(Status::OK, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_types_are_checked() {
        assert_eq!(frame_type(None, "message"), Ok("message"));
        assert_eq!(
            frame_type(Some("room_update"), "message"),
            Ok("room_update")
        );
        assert_eq!(frame_type(Some("notification"), "x"), Ok("notification"));
        assert_eq!(frame_type(Some("connected"), "x"), Err("type is reserved"));
        assert_eq!(
            frame_type(Some("message.ack"), "x"),
            Err("type is reserved")
        );
        assert_eq!(
            frame_type(Some("presence.online"), "x"),
            Err("type is reserved")
        );
        assert_eq!(frame_type(Some("call.ended"), "x"), Err("type is reserved"));
        assert_eq!(frame_type(Some(""), "x"), Err("invalid type"));
        assert_eq!(frame_type(Some("has space"), "x"), Err("invalid type"));
        assert_eq!(frame_type(Some(&"x".repeat(65)), "x"), Err("invalid type"));
    }
}
