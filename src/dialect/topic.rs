//! The topic protocol: the `{id, type, payload, timestamp}` envelope of the topic service's
//! `/ws` (`seeds/003`), both ways, with `subscribe {topics, filters}`.
//!
//! Client frames become native commands with the payload's members lifted to the top level
//! (`conversation_id` -> `conversationId`, `message_ids` -> `messageIds`, `user_id` ->
//! `to` where the native command addresses a user); server frames carry the native `data`
//! as `payload`, an `id` (the command's correlation id on a reply, a fresh UUID on an event:
//! one per event, shared by every recipient) and an RFC 3339 `timestamp`. Subscriptions are
//! kept at the edge ([`Subscriptions`]): typing and presence events reach a connection only
//! through a topic it subscribed; everything addressed to its user (messages, receipts,
//! calls, notifications, replies) always reaches it (the `user` topic is implied). The
//! decisions are written out in `docs/DIALECTS.md`.

use std::borrow::Cow;

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use super::{parse_native, Class, Encoded, Step};
use crate::metrics::ErrorReason;
use crate::proto::envelope::{correlation_id, write_object, Obj};
use crate::proto::json::{rfc3339_ms, write_str};

/// Topic bits (the service's six subscription topics).
pub mod bits {
    pub const USER: u8 = 1;
    pub const CONVERSATION: u8 = 2;
    pub const PRESENCE: u8 = 4;
    pub const TYPING: u8 = 8;
    pub const CALLS: u8 = 16;
    pub const NOTIFICATIONS: u8 = 32;
}

/// The topic names a `subscribe` accepts, with their bits.
pub const TOPICS: [(&str, u8); 6] = [
    ("user", bits::USER),
    ("conversation", bits::CONVERSATION),
    ("presence", bits::PRESENCE),
    ("typing", bits::TYPING),
    ("calls", bits::CALLS),
    ("notifications", bits::NOTIFICATIONS),
];

/// Most conversation ids one connection's `filters.conversation_id` holds (a named bound on
/// the per-connection edge state; more is refused with an error).
pub const FILTER_CONVERSATIONS_MAX: usize = 100;
/// Longest conversation id a filter holds (the native id bound).
pub const FILTER_ID_BYTES_MAX: usize = 256;

/// One connection's subscriptions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Subscriptions {
    /// Subscribed topic bits.
    pub topics: u8,
    /// `filters.conversation_id`: when not empty, conversation-scoped events (typing) are
    /// taken only for these conversations.
    pub conversations: Vec<Box<str>>,
}

impl Subscriptions {
    /// Whether an event of `class` (with non-zero topics) reaches this connection.
    pub fn wants(&self, class: &Class) -> bool {
        if self.topics & class.topics == 0 {
            return false;
        }
        match &class.conversation {
            Some(c) if !self.conversations.is_empty() => {
                self.conversations.iter().any(|x| **x == **c)
            }
            _ => true,
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    payload: Option<LazyValue<'a>>,
}

#[derive(Deserialize, Default)]
struct SubscribePayload<'a> {
    #[serde(borrow, default)]
    topics: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    filters: Option<Filters<'a>>,
}

#[derive(Deserialize, Default)]
struct Filters<'a> {
    #[serde(borrow, default)]
    conversation_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    user_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    user_ids: Option<LazyValue<'a>>,
}

const INVALID: &str = "invalid JSON format";

fn error(reason: ErrorReason, text: impl Into<Cow<'static, str>>, id: Option<&str>) -> Step {
    Step::Error {
        reason,
        text: text.into(),
        id: id.map(str::to_owned),
    }
}

/// Translate one client message.
pub fn inbound(text: &[u8], subs: &mut Subscriptions, now_ms: u64) -> Vec<Step> {
    let Ok(env) = sonic_rs::from_slice::<Envelope>(text) else {
        return vec![error(ErrorReason::InvalidJson, INVALID, None)];
    };
    let id = correlation_id(&env.id);
    let kind = env.kind.as_deref().unwrap_or("");
    let payload = env
        .payload
        .as_ref()
        .map(|p| p.as_raw_str())
        .unwrap_or("null");
    let payload_is_object = env.payload.as_ref().is_some_and(|p| p.is_object());
    let payload_is_empty = env.payload.as_ref().is_none_or(|p| p.is_null());
    if !payload_is_object && !payload_is_empty {
        return vec![error(ErrorReason::InvalidJson, INVALID, id)];
    }
    match kind {
        "subscribe" | "unsubscribe" => subscribe(kind == "subscribe", payload, subs, id, now_ms),
        "ping" | "authenticate" | "presence.update" | "presence.query" | "typing.start"
        | "typing.stop" | "mark.read" | "mark.delivered" | "call.offer" | "call.answer"
        | "call.ice" | "call.hangup" => match lift(kind, id, payload) {
            Some(native) => vec![Step::Native(native)],
            None => vec![error(ErrorReason::InvalidJson, INVALID, id)],
        },
        // Not a type of this protocol: the native table decides (a configured backend route
        // for custom types, else `unknown message type`).
        _ => match lift(kind, id, payload) {
            Some(native) => vec![Step::Native(native)],
            None => vec![error(ErrorReason::UnknownType, "unknown message type", id)],
        },
    }
}

/// Native member name for a payload member of the topic protocol.
fn native_key(kind: &str, key: &str) -> Option<&'static str> {
    Some(match key {
        "conversation_id" => "conversationId",
        "message_ids" => "messageIds",
        "user_ids" => "user_ids",
        // The user a typing indicator, a receipt or a call signal is for.
        "user_id" | "target_user_id" | "recipient_id"
            if kind.starts_with("typing.")
                || kind.starts_with("mark.")
                || kind.starts_with("call.") =>
        {
            "to"
        }
        _ => return None,
    })
}

/// `{"type":kind,"id":id, ...payload members}`: the payload's members lifted to the top level
/// (renamed where the native name differs; `type` and `id` in the payload are ignored).
/// `presence.query {user_id}` becomes `{user_ids:[user_id]}`. None: the payload is not an
/// object (or null).
fn lift(kind: &str, id: Option<&str>, payload: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() + kind.len() + 32);
    out.extend_from_slice(b"{\"type\":");
    write_str(&mut out, kind);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(id.as_bytes());
    }
    if payload != "null" {
        for member in sonic_rs::to_object_iter(payload) {
            let (key, value) = member.ok()?;
            let key: &str = &key;
            if key == "type" || key == "id" {
                continue;
            }
            let raw = value.as_raw_str();
            if kind == "presence.query" && key == "user_id" {
                out.extend_from_slice(b",\"user_ids\":[");
                out.extend_from_slice(raw.as_bytes());
                out.push(b']');
                continue;
            }
            out.push(b',');
            match native_key(kind, key) {
                Some(k) => write_str(&mut out, k),
                None => write_str(&mut out, key),
            }
            out.push(b':');
            out.extend_from_slice(raw.as_bytes());
        }
    }
    out.push(b'}');
    Some(out)
}

/// Ids of a filter member: a string, a number, or an array of them.
fn filter_ids(v: &LazyValue<'_>) -> Option<Vec<String>> {
    if let Some(one) = super::id_text(v) {
        return Some(vec![one]);
    }
    let arr = v.as_raw_str();
    let mut ids = Vec::new();
    for item in sonic_rs::to_array_iter(arr) {
        let item = item.ok()?;
        ids.push(super::id_text(&item)?);
    }
    Some(ids)
}

fn subscribe(
    on: bool,
    payload: &str,
    subs: &mut Subscriptions,
    id: Option<&str>,
    now_ms: u64,
) -> Vec<Step> {
    let p = if payload == "null" {
        SubscribePayload::default()
    } else {
        match sonic_rs::from_str::<SubscribePayload>(payload) {
            Ok(p) => p,
            Err(_) => return vec![error(ErrorReason::InvalidJson, INVALID, id)],
        }
    };
    let Some(topics) = p.topics.filter(|t| !t.is_empty()) else {
        return vec![error(ErrorReason::BadRequest, "topics is required", id)];
    };
    let mut mask = 0u8;
    for t in &topics {
        match TOPICS.iter().find(|(name, _)| *name == &**t) {
            Some((_, bit)) => mask |= bit,
            None => {
                return vec![error(
                    ErrorReason::BadRequest,
                    format!(
                        "unknown topic (one of: {})",
                        TOPICS.map(|(n, _)| n).join(", ")
                    ),
                    id,
                )]
            }
        }
    }
    let filters = p.filters.unwrap_or_default();
    let mut conversations = None;
    if let Some(c) = &filters.conversation_id {
        let Some(ids) = filter_ids(c) else {
            return vec![error(ErrorReason::InvalidJson, INVALID, id)];
        };
        if ids
            .iter()
            .any(|c| c.is_empty() || c.len() > FILTER_ID_BYTES_MAX)
        {
            return vec![error(
                ErrorReason::BadRequest,
                "conversation_id must be 1-256 bytes",
                id,
            )];
        }
        conversations = Some(ids);
    }
    let mut users: Option<Vec<String>> = None;
    for v in [&filters.user_id, &filters.user_ids].into_iter().flatten() {
        let Some(ids) = filter_ids(v) else {
            return vec![error(ErrorReason::InvalidJson, INVALID, id)];
        };
        users.get_or_insert_with(Vec::new).extend(ids);
    }
    let mut steps = Vec::new();
    if on {
        if let Some(ids) = conversations {
            let mut next = subs.conversations.clone();
            for c in ids {
                if !next.iter().any(|x| **x == *c) {
                    next.push(c.into_boxed_str());
                }
            }
            if next.len() > FILTER_CONVERSATIONS_MAX {
                return vec![error(
                    ErrorReason::BadRequest,
                    "too many conversations in filters (at most 100)",
                    id,
                )];
            }
            subs.conversations = next;
        }
        subs.topics |= mask;
        if mask & bits::PRESENCE != 0 {
            // Presence events come from the native watch list: the filtered users, or (no
            // filter) the users this user shares a conversation with.
            steps.push(Step::Native(presence_watch(
                "presence.watch",
                users.as_deref(),
            )));
        }
    } else {
        if let Some(ids) = conversations {
            subs.conversations
                .retain(|x| !ids.iter().any(|c| **x == **c));
        }
        subs.topics &= !mask;
        if mask & bits::PRESENCE != 0 {
            steps.push(Step::Native(presence_watch(
                "presence.unwatch",
                users.as_deref(),
            )));
        }
    }
    // The confirmation, in the protocol's own shape.
    let mut out = Vec::with_capacity(128);
    write_object(&mut out, |o| {
        o.raw("id", id.unwrap_or("null"))
            .str("type", if on { "subscribed" } else { "unsubscribed" })
            .obj("payload", |p| {
                p.arr("topics", |a| {
                    for t in &topics {
                        a.str(t);
                    }
                });
                if on {
                    p.arr("active", |a| {
                        for (name, bit) in TOPICS {
                            if subs.topics & bit != 0 {
                                a.str(name);
                            }
                        }
                    });
                }
            });
        timestamp(o, now_ms);
    });
    steps.insert(0, Step::Own(out));
    steps
}

/// A native watch (or unwatch) of `users`, or of everyone the user shares a conversation with.
fn presence_watch(kind: &str, users: Option<&[String]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_object(&mut out, |o| {
        o.str("type", kind);
        match users {
            Some(u) => {
                o.arr("user_ids", |a| {
                    for u in u {
                        a.str(u);
                    }
                });
            }
            None => {
                o.str("scope", "conversations");
            }
        }
    });
    out
}

fn timestamp(o: &mut Obj, ms: u64) {
    o.str("timestamp", &rfc3339_ms(ms));
}

/// Encode one native server frame.
pub fn encode(native: &[u8], born_prefix: u64) -> Encoded {
    let Some(f) = parse_native(native) else {
        return Encoded {
            frames: vec![native.to_vec()],
            class: Class::default(),
        };
    };
    let ms = f.timestamp.unwrap_or(0);
    let data = f.data.as_ref().map(|d| d.as_raw_str());
    let id = f.id.as_ref().map(|i| i.as_raw_str().to_owned());
    let mut class = Class::default();
    let kind: &str = match &*f.kind {
        "message.create" => "message.new",
        k @ ("typing.start" | "typing.stop") => {
            class.topics = bits::TYPING | bits::CONVERSATION;
            class.conversation = data.and_then(conversation_of);
            k
        }
        k @ ("presence.online" | "presence.offline" | "presence.update") => {
            class.topics = bits::PRESENCE;
            k
        }
        "presence.state" if f.room.is_none() => {
            // The answer to presence.query: one presence.update per user, as the protocol's
            // server table has no presence.state.
            return Encoded {
                frames: presence_updates(data.unwrap_or("{}"), id.as_deref(), ms),
                class,
            };
        }
        k => k,
    };
    let mut out = Vec::with_capacity(native.len() + 64);
    write_object(&mut out, |o| {
        match &id {
            Some(id) => o.raw("id", id),
            None => o.uuid("id", super::event_id(native, born_prefix)),
        };
        o.str("type", kind);
        match &*f.kind {
            _ if f.error.is_some() => {
                // `error`, `auth.failed`, `auth.expired`: the text beside the data.
                o.obj("payload", |p| {
                    p.str("error", f.error.as_deref().unwrap_or(""));
                    copy_members(p, data);
                });
            }
            "message" => {
                // A room message or broadcast (native rooms are reachable from this path).
                o.obj("payload", |p| {
                    if let Some(r) = &f.room {
                        p.str("room", r);
                    }
                    p.raw("data", data.unwrap_or("null"));
                    if let Some(c) = &f.client_id {
                        p.str("client_id", c);
                    }
                    if let Some(u) = &f.user_id {
                        p.str("user_id", u);
                    }
                });
            }
            _ => match data {
                Some(d) if d.starts_with('{') => {
                    o.raw("payload", d);
                }
                Some(d) => {
                    o.obj("payload", |p| {
                        p.raw("data", d);
                    });
                }
                None => {
                    o.obj("payload", |p| {
                        if let Some(r) = &f.room {
                            p.str("room", r);
                        }
                    });
                }
            },
        }
        timestamp(o, ms);
    });
    Encoded {
        frames: vec![out],
        class,
    }
}

/// Copy the members of JSON object text `data` (if any) into `o`.
fn copy_members(o: &mut Obj, data: Option<&str>) {
    let Some(d) = data else { return };
    for (k, v) in sonic_rs::to_object_iter(d).flatten() {
        o.raw(&k, v.as_raw_str());
    }
}

fn conversation_of(data: &str) -> Option<Box<str>> {
    #[derive(Deserialize)]
    struct D<'a> {
        #[serde(rename = "conversationId", borrow, default)]
        conversation_id: Option<Cow<'a, str>>,
    }
    let d: D = sonic_rs::from_str(data).ok()?;
    d.conversation_id.map(|c| Box::from(&*c))
}

fn presence_updates(data: &str, id: Option<&str>, ms: u64) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let Ok(users) = sonic_rs::get(data, ["users"]) else {
        return frames;
    };
    for u in sonic_rs::to_array_iter(users.as_raw_str()).flatten() {
        let mut out = Vec::with_capacity(160);
        write_object(&mut out, |o| {
            o.raw("id", id.unwrap_or("null"))
                .str("type", "presence.update")
                .raw("payload", u.as_raw_str());
            timestamp(o, ms);
        });
        frames.push(out);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Native(t) => String::from_utf8(t.clone()).unwrap(),
                Step::Own(t) => format!("own {}", String::from_utf8(t.clone()).unwrap()),
                Step::Error { text, id, .. } => format!("error {text} {id:?}"),
            })
            .collect()
    }

    #[test]
    fn commands_lift_the_payload() {
        let mut s = Subscriptions::default();
        let t = |text: &str, s: &mut Subscriptions| native(&inbound(text.as_bytes(), s, 0));
        assert_eq!(
            t(
                r#"{"id":"msg_1","type":"ping","payload":{},"timestamp":"x"}"#,
                &mut s
            ),
            [r#"{"type":"ping","id":"msg_1"}"#]
        );
        assert_eq!(
            t(
                r#"{"id":7,"type":"typing.start","payload":{"conversation_id":"c1","user_id":"bob"}}"#,
                &mut s
            ),
            [r#"{"type":"typing.start","id":7,"conversationId":"c1","to":"bob"}"#]
        );
        assert_eq!(
            t(
                r#"{"type":"mark.read","payload":{"to":"bob","conversation_id":"c1","message_ids":["m1",2]}}"#,
                &mut s
            ),
            [r#"{"type":"mark.read","to":"bob","conversationId":"c1","messageIds":["m1",2]}"#]
        );
        assert_eq!(
            t(
                r#"{"type":"presence.query","payload":{"user_id":"bob"}}"#,
                &mut s
            ),
            [r#"{"type":"presence.query","user_ids":["bob"]}"#]
        );
        assert_eq!(
            t(
                r#"{"type":"call.offer","payload":{"to":"bob","call_id":"k","sdp":"v=0"}}"#,
                &mut s
            ),
            [r#"{"type":"call.offer","to":"bob","call_id":"k","sdp":"v=0"}"#]
        );
        assert_eq!(
            t(r#"{"type":"ping","payload":[1]}"#, &mut s),
            ["error invalid JSON format None"]
        );
        assert_eq!(t("nope", &mut s), ["error invalid JSON format None"]);
    }

    #[test]
    fn subscribe_keeps_topics_and_filters() {
        let mut s = Subscriptions::default();
        let steps = inbound(
            br#"{"id":"msg_2","type":"subscribe","payload":{"topics":["conversation","presence"],"filters":{"conversation_id":"c1"}}}"#,
            &mut s,
            1_700_000_000_000,
        );
        let got = native(&steps);
        assert_eq!(
            got[0],
            r#"own {"id":"msg_2","type":"subscribed","payload":{"topics":["conversation","presence"],"active":["conversation","presence"]},"timestamp":"2023-11-14T22:13:20.000Z"}"#
        );
        assert_eq!(
            got[1],
            r#"{"type":"presence.watch","scope":"conversations"}"#
        );
        assert_eq!(s.topics, bits::CONVERSATION | bits::PRESENCE);
        assert_eq!(s.conversations, vec![Box::from("c1")]);
        let typing = |c: &str| Class {
            topics: bits::TYPING | bits::CONVERSATION,
            conversation: Some(c.into()),
            settles: None,
        };
        assert!(s.wants(&typing("c1")));
        assert!(!s.wants(&typing("c2")));
        assert!(!s.wants(&Class {
            topics: bits::NOTIFICATIONS,
            conversation: None,
            settles: None,
        }));
        let got = native(&inbound(
            br#"{"type":"unsubscribe","payload":{"topics":["presence"],"filters":{"user_ids":["bob"]}}}"#,
            &mut s,
            0,
        ));
        assert_eq!(got[1], r#"{"type":"presence.unwatch","user_ids":["bob"]}"#);
        assert_eq!(s.topics, bits::CONVERSATION);
        let got = native(&inbound(
            br#"{"type":"subscribe","payload":{"topics":["weather"]}}"#,
            &mut s,
            0,
        ));
        assert!(got[0].starts_with("error unknown topic"), "{got:?}");
        let got = native(&inbound(br#"{"type":"subscribe","payload":{}}"#, &mut s, 0));
        assert_eq!(got, ["error topics is required None"]);
    }

    #[test]
    fn filter_bound_holds() {
        let mut s = Subscriptions::default();
        let ids: Vec<String> = (0..=FILTER_CONVERSATIONS_MAX)
            .map(|i| format!("\"c{i}\""))
            .collect();
        let text = format!(
            r#"{{"type":"subscribe","payload":{{"topics":["typing"],"filters":{{"conversation_id":[{}]}}}}}}"#,
            ids.join(",")
        );
        let got = native(&inbound(text.as_bytes(), &mut s, 0));
        assert!(
            got[0].starts_with("error too many conversations"),
            "{got:?}"
        );
        assert!(s.conversations.is_empty());
    }

    #[test]
    fn events_wrap_data_as_payload() {
        let e = encode(br#"{"type":"typing.start","data":{"user_id":"alice","to":"bob","conversationId":"c1"},"timestamp":1700000000000}"#, 7);
        assert_eq!(e.class.topics, bits::TYPING | bits::CONVERSATION);
        assert_eq!(e.class.conversation.as_deref(), Some("c1"));
        let f = String::from_utf8(e.frames[0].clone()).unwrap();
        assert!(f.starts_with(r#"{"id":""#), "{f}");
        // The same frame encoded again (another shard, a cache miss) has the same id; another
        // event (another creation time) another.
        let native = br#"{"type":"typing.start","data":{"user_id":"alice","to":"bob","conversationId":"c1"},"timestamp":1700000000000}"#;
        assert_eq!(encode(native, 7).frames, e.frames);
        assert_ne!(encode(native, 8).frames, e.frames);
        assert!(f.ends_with(r#","type":"typing.start","payload":{"user_id":"alice","to":"bob","conversationId":"c1"},"timestamp":"2023-11-14T22:13:20.000Z"}"#), "{f}");
        let e = encode(
            br#"{"type":"pong","id":"msg_1","timestamp":1700000000000}"#,
            7,
        );
        assert_eq!(
            String::from_utf8(e.frames[0].clone()).unwrap(),
            r#"{"id":"msg_1","type":"pong","payload":{},"timestamp":"2023-11-14T22:13:20.000Z"}"#
        );
        let e = encode(br#"{"type":"error","id":3,"error":"to is required","data":{"clientMsgId":"c"},"timestamp":0}"#, 7);
        assert_eq!(
            String::from_utf8(e.frames[0].clone()).unwrap(),
            r#"{"id":3,"type":"error","payload":{"error":"to is required","clientMsgId":"c"},"timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        let e = encode(
            br#"{"type":"message.create","data":{"eventId":"e"},"timestamp":0}"#,
            7,
        );
        assert!(String::from_utf8(e.frames[0].clone())
            .unwrap()
            .contains(r#""type":"message.new","payload":{"eventId":"e"}"#));
        assert_eq!(e.class, Class::default());
        let e = encode(br#"{"type":"presence.state","id":"q","data":{"users":[{"user_id":"a","status":"online"},{"user_id":"b","status":"offline"}]},"timestamp":0}"#, 7);
        assert_eq!(e.frames.len(), 2);
        assert_eq!(
            String::from_utf8(e.frames[1].clone()).unwrap(),
            r#"{"id":"q","type":"presence.update","payload":{"user_id":"b","status":"offline"},"timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
    }
}
