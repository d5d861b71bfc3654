//! The chat hub (`seeds/002`): `/ws/chat?token=<JWT>`, flat snake_case frames both ways, RFC
//! 3339 timestamps in whole seconds, numeric ids where the native ids are numeric.
//!
//! Client frames: `ping` becomes the native `ping`; `typing {chat_id, is_typing}` becomes
//! `typing.start` / `typing.stop` to the stored conversation `conversationId: "<chat_id>"`
//! (no `to`: the participants of the thread get it); `mark_read {message_id}` becomes
//! `mark.read {messageIds: [<message_id>]}` (neither `to` nor `conversationId`: the store
//! finds the conversation of the message). Any other type goes to the native command table as
//! sent (custom types, or `unknown message type`).
//!
//! Server frames: `connected`, `pong`, `error`, `new_message` (from `message.create`),
//! `message_read` (from `message.read`, one per message id) and `typing` (from
//! `typing.start` / `typing.stop` of a conversation). Other native events (presence, calls,
//! delivery receipts, notifications, room messages) are dropped: a hub client has no such
//! type and could not ask for them. A frame that answers a command with an `id` (only a native
//! command sent on this path has one) goes out unchanged. The decisions are written out in
//! `docs/DIALECTS.md`.
//!
//! Stateless: nothing is kept per connection ([`super::EdgeState`] stays empty).

use std::borrow::Cow;

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use super::{parse_native, write_id, Class, Encoded, Step};
use crate::metrics::ErrorReason;
use crate::proto::envelope::{write_object, Obj};
use crate::proto::json::{rfc3339_ms, write_str};

#[derive(Deserialize)]
struct Inbound<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    chat_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    is_typing: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    message_id: Option<LazyValue<'a>>,
}

const INVALID: &str = "invalid JSON format";

fn error(reason: ErrorReason, text: &'static str) -> Vec<Step> {
    vec![Step::Error {
        reason,
        text: Cow::Borrowed(text),
        id: None,
    }]
}

/// An id the client gave as a number or a string, as JSON text for a native command: a
/// non-negative integer stays a number, a string stays a string. None: anything else (null
/// included).
fn id_json(v: &LazyValue<'_>) -> Option<String> {
    if v.is_str() {
        let s = v.as_str()?;
        let mut out = Vec::with_capacity(s.len() + 2);
        write_str(&mut out, s);
        String::from_utf8(out).ok()
    } else {
        super::id_text(v)
    }
}

/// Translate one client message.
pub fn inbound(text: &[u8]) -> Vec<Step> {
    let is_object = text
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    let parsed = if is_object {
        sonic_rs::from_slice::<Inbound>(text).ok()
    } else {
        None
    };
    let Some(m) = parsed else {
        return error(ErrorReason::InvalidJson, INVALID);
    };
    match m.kind.as_deref().unwrap_or("") {
        "ping" => vec![Step::Native(br#"{"type":"ping"}"#.to_vec())],
        "typing" => {
            // The conversation as the native text id: `123` and `"123"` are the same chat.
            let chat = match m.chat_id.as_ref().filter(|v| !v.is_null()) {
                None => return error(ErrorReason::BadRequest, "chat_id is required"),
                Some(v) => match super::id_text(v).filter(|s| !s.is_empty()) {
                    Some(c) => c,
                    None => {
                        return error(
                            ErrorReason::BadRequest,
                            "chat_id must be a number or a string",
                        )
                    }
                },
            };
            // Absent is false, as the hub's Go struct decoded it: a stop.
            let typing = match m.is_typing.as_ref().filter(|v| !v.is_null()) {
                None => false,
                Some(v) => match v.as_bool() {
                    Some(b) => b,
                    None => {
                        return error(ErrorReason::BadRequest, "is_typing must be true or false")
                    }
                },
            };
            let mut out = Vec::with_capacity(48 + chat.len());
            write_object(&mut out, |o| {
                o.str(
                    "type",
                    if typing {
                        "typing.start"
                    } else {
                        "typing.stop"
                    },
                )
                .str("conversationId", &chat);
            });
            vec![Step::Native(out)]
        }
        "mark_read" => {
            let id = match m.message_id.as_ref().filter(|v| !v.is_null()) {
                None => return error(ErrorReason::BadRequest, "message_id is required"),
                Some(v) => match id_json(v) {
                    Some(id) => id,
                    None => {
                        return error(
                            ErrorReason::BadRequest,
                            "message_id must be a number or a string",
                        )
                    }
                },
            };
            let mut out = Vec::with_capacity(40 + id.len());
            out.extend_from_slice(br#"{"type":"mark.read","messageIds":["#);
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"]}");
            vec![Step::Native(out)]
        }
        // Not a type of the hub: the native table decides (a configured backend route for
        // custom types, a native command, else `unknown message type`).
        _ => vec![Step::Native(text.to_vec())],
    }
}

/// Unix milliseconds as RFC 3339 UTC in whole seconds (`2025-11-21T13:00:00Z`), the form of
/// the hub's document.
pub fn rfc3339_s(unix_ms: u64) -> String {
    seconds(&rfc3339_ms(unix_ms)).into_owned()
}

/// An RFC 3339 time with milliseconds (`...:26.123Z`, the native form) cut to whole seconds;
/// any other text unchanged.
fn seconds(t: &str) -> Cow<'_, str> {
    let b = t.as_bytes();
    let n = b.len();
    if n >= 5
        && b[n - 1] == b'Z'
        && b[n - 5] == b'.'
        && b[n - 4..n - 1].iter().all(u8::is_ascii_digit)
    {
        Cow::Owned(format!("{}Z", &t[..n - 5]))
    } else {
        Cow::Borrowed(t)
    }
}

fn timestamp(o: &mut Obj, ms: u64) {
    o.str("timestamp", &rfc3339_s(ms));
}

/// Write id text `id` with [`write_id`] under `k`, or `null`.
fn id_member(o: &mut Obj, k: &str, id: Option<&str>) {
    let mut v = Vec::with_capacity(24);
    match id {
        Some(id) => write_id(&mut v, id),
        None => v.extend_from_slice(b"null"),
    }
    o.raw(k, std::str::from_utf8(&v).unwrap_or("null"));
}

/// The chat of a native event: the conversation's numeric id, else its text id (a number when
/// it is all digits), else `null`.
fn chat_member(o: &mut Obj, numeric: Option<u64>, text: Option<&str>) {
    match numeric {
        Some(n) => {
            o.u64("chat_id", n);
        }
        None => id_member(o, "chat_id", text),
    }
}

#[derive(Deserialize, Default)]
struct Data<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(default)]
    shard: Option<u64>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<Cow<'a, str>>,
    #[serde(rename = "conversationNumericId", default)]
    conversation_numeric_id: Option<u64>,
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(rename = "attachmentUrl", borrow, default)]
    attachment_url: Option<Cow<'a, str>>,
    #[serde(rename = "sentAt", borrow, default)]
    sent_at: Option<Cow<'a, str>>,
    #[serde(default)]
    cursor: Option<u64>,
    #[serde(rename = "messageIds", borrow, default)]
    message_ids: Option<LazyValue<'a>>,
    #[serde(rename = "messageNumericIds", default)]
    message_numeric_ids: Option<Vec<u64>>,
    #[serde(borrow, default)]
    by: Option<Cow<'a, str>>,
}

/// Encode one native server frame.
/// Native events the hub's clients never knew (a type, or a prefix ending in `.`): dropped.
const NATIVE_EVENTS_DROPPED: &[&str] = &[
    "presence.",
    "call.",
    "message.delivered",
    "message.ack",
    "notification",
    "message",
    "typing.",
    "subscribed",
    "unsubscribed",
    "auth.",
    "sync.done",
    "broadcast",
];

pub fn encode(native: &[u8]) -> Encoded {
    let unchanged = || Encoded {
        frames: vec![native.to_vec()],
        class: Class::default(),
    };
    let Some(f) = parse_native(native) else {
        return unchanged();
    };
    let ms = f.timestamp.unwrap_or(0);
    let data: Data = match f.data.as_ref() {
        Some(d) if d.is_object() => sonic_rs::from_str(d.as_raw_str()).unwrap_or_default(),
        _ => Data::default(),
    };
    let mut out = Vec::with_capacity(native.len() + 32);
    match &*f.kind {
        "connected" => write_object(&mut out, |o| {
            o.str("type", "connected");
            id_member(o, "user_id", data.user_id.as_deref());
            timestamp(o, ms);
            if let Some(s) = data.shard {
                // Only with `expose_shard` (tests, debugging).
                o.u64("shard", s);
            }
        }),
        "pong" => write_object(&mut out, |o| {
            o.str("type", "pong");
            timestamp(o, ms);
        }),
        _ if f.error.is_some() || f.kind == "auth.expired" => write_object(&mut out, |o| {
            // `error`, `auth.failed`, `auth.expired` (its close follows).
            o.str("type", "error");
            if let Some(id) = &f.id {
                o.raw("id", id.as_raw_str());
            }
            o.str("error", f.error.as_deref().unwrap_or("token expired"));
            timestamp(o, ms);
        }),
        "message.create" => write_object(&mut out, |o| {
            o.str("type", "new_message");
            chat_member(
                o,
                data.conversation_numeric_id,
                data.conversation_id.as_deref(),
            );
            o.obj("message", |m| {
                m.opt_u64("id", data.cursor);
                chat_member(
                    m,
                    data.conversation_numeric_id,
                    data.conversation_id.as_deref(),
                );
                id_member(m, "sender_id", data.from.as_deref());
                id_member(m, "receiver_id", data.to.as_deref());
                m.str("content", data.content.as_deref().unwrap_or(""));
                if let Some(u) = data.attachment_url.as_deref() {
                    m.str("attachment_url", u);
                }
                match data.sent_at.as_deref() {
                    Some(t) => m.str("created_at", &seconds(t)),
                    None => m.str("created_at", &rfc3339_s(ms)),
                };
            });
            timestamp(o, ms);
        }),
        "message.read" => {
            return Encoded {
                frames: message_read(&data, ms),
                class: Class::default(),
            }
        }
        "typing.start" | "typing.stop"
            if data.room.is_none()
                && (data.conversation_numeric_id.is_some() || data.conversation_id.is_some()) =>
        {
            write_object(&mut out, |o| {
                o.str("type", "typing");
                chat_member(
                    o,
                    data.conversation_numeric_id,
                    data.conversation_id.as_deref(),
                );
                id_member(o, "user_id", data.user_id.as_deref());
                o.bool("is_typing", f.kind == "typing.start");
                timestamp(o, ms);
            })
        }
        // The answer to a native command that carried an id: as it is.
        _ if f.id.is_some() => return unchanged(),
        // A native event no hub client knows (presence, calls, delivery receipts,
        // notifications, room messages and room typing): nothing.
        k if NATIVE_EVENTS_DROPPED
            .iter()
            .any(|p| k == *p || (p.ends_with('.') && k.starts_with(p))) =>
        {
            return Encoded::default();
        }
        // Anything else is not a native event: a configured backend's reply to a custom type
        // (`rpc_routes`, sent without an id) goes to its client as the backend wrote it.
        _ => return unchanged(),
    }
    Encoded {
        frames: vec![out],
        class: Class::default(),
    }
}

/// One `message_read` per id of a native `message.read`: the numeric id when the frame
/// carries one (`messageNumericIds`, a read over REST), else the id as the reader sent it.
fn message_read(data: &Data<'_>, ms: u64) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let Some(ids) = data.message_ids.as_ref() else {
        return frames;
    };
    for (i, item) in sonic_rs::to_array_iter(ids.as_raw_str())
        .flatten()
        .enumerate()
    {
        let mut out = Vec::with_capacity(128);
        write_object(&mut out, |o| {
            o.str("type", "message_read");
            chat_member(
                o,
                data.conversation_numeric_id,
                data.conversation_id.as_deref(),
            );
            match data.message_numeric_ids.as_ref().and_then(|n| n.get(i)) {
                Some(n) => {
                    o.u64("message_id", *n);
                }
                None if item.is_str() => id_member(o, "message_id", item.as_str()),
                None => {
                    o.raw("message_id", item.as_raw_str());
                }
            }
            id_member(o, "read_by", data.by.as_deref());
            timestamp(o, ms);
        });
        frames.push(out);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(text: &str) -> Vec<String> {
        inbound(text.as_bytes())
            .iter()
            .map(|s| match s {
                Step::Native(t) => String::from_utf8(t.clone()).unwrap(),
                Step::Own(t) => format!("own {}", String::from_utf8(t.clone()).unwrap()),
                Step::Error { text, id, .. } => format!("error {text} {id:?}"),
            })
            .collect()
    }

    fn frames(native: &str) -> Vec<String> {
        encode(native.as_bytes())
            .frames
            .into_iter()
            .map(|f| String::from_utf8(f).unwrap())
            .collect()
    }

    #[test]
    fn client_frames_become_native_commands() {
        assert_eq!(steps(r#"{"type": "ping"}"#), [r#"{"type":"ping"}"#]);
        assert_eq!(
            steps(r#"{"type": "typing", "chat_id": 123, "is_typing": true}"#),
            [r#"{"type":"typing.start","conversationId":"123"}"#]
        );
        assert_eq!(
            steps(r#"{"type":"typing","chat_id":"123","is_typing":false}"#),
            [r#"{"type":"typing.stop","conversationId":"123"}"#]
        );
        assert_eq!(
            steps(r#"{"type":"typing","chat_id":"thread-\"a\""}"#),
            [r#"{"type":"typing.stop","conversationId":"thread-\"a\""}"#]
        );
        assert_eq!(
            steps(r#"{"type": "mark_read", "message_id": 456}"#),
            [r#"{"type":"mark.read","messageIds":[456]}"#]
        );
        assert_eq!(
            steps(r#"{"type":"mark_read","message_id":"01a201a5-32a9-77b2-a173-3f47b1ef19fb"}"#),
            [r#"{"type":"mark.read","messageIds":["01a201a5-32a9-77b2-a173-3f47b1ef19fb"]}"#]
        );
        // Other types run as native commands, unchanged.
        assert_eq!(
            steps(r#"{"type":"get_user","id":1}"#),
            [r#"{"type":"get_user","id":1}"#]
        );
    }

    #[test]
    fn client_errors() {
        assert_eq!(steps("nope"), ["error invalid JSON format None"]);
        assert_eq!(steps("[1]"), ["error invalid JSON format None"]);
        assert_eq!(
            steps(r#"{"type":"typing","is_typing":true}"#),
            ["error chat_id is required None"]
        );
        assert_eq!(
            steps(r#"{"type":"typing","chat_id":-3,"is_typing":true}"#),
            ["error chat_id must be a number or a string None"]
        );
        assert_eq!(
            steps(r#"{"type":"typing","chat_id":3,"is_typing":"yes"}"#),
            ["error is_typing must be true or false None"]
        );
        assert_eq!(
            steps(r#"{"type":"mark_read"}"#),
            ["error message_id is required None"]
        );
        assert_eq!(
            steps(r#"{"type":"mark_read","message_id":4.5}"#),
            ["error message_id must be a number or a string None"]
        );
    }

    #[test]
    fn greeting_pong_and_errors() {
        assert_eq!(
            frames(
                r#"{"type":"connected","data":{"client_id":"x","user_id":"6","message":"Connected to WebSocket server"},"timestamp":1763730000123}"#
            ),
            [r#"{"type":"connected","user_id":6,"timestamp":"2025-11-21T13:00:00Z"}"#]
        );
        assert_eq!(
            frames(
                r#"{"type":"connected","data":{"client_id":"x","user_id":"alice","shard":1},"timestamp":0}"#
            ),
            [
                r#"{"type":"connected","user_id":"alice","timestamp":"1970-01-01T00:00:00Z","shard":1}"#
            ]
        );
        assert_eq!(
            frames(r#"{"type":"pong","timestamp":1763730000999}"#),
            [r#"{"type":"pong","timestamp":"2025-11-21T13:00:00Z"}"#]
        );
        assert_eq!(
            frames(r#"{"type":"error","error":"conversation not found","timestamp":0}"#),
            [
                r#"{"type":"error","error":"conversation not found","timestamp":"1970-01-01T00:00:00Z"}"#
            ]
        );
        assert_eq!(
            frames(
                r#"{"type":"error","id":4,"error":"to is required","data":{"clientMsgId":"c"},"timestamp":0}"#
            ),
            [
                r#"{"type":"error","id":4,"error":"to is required","timestamp":"1970-01-01T00:00:00Z"}"#
            ]
        );
        assert_eq!(
            frames(r#"{"type":"auth.expired","timestamp":0}"#),
            [r#"{"type":"error","error":"token expired","timestamp":"1970-01-01T00:00:00Z"}"#]
        );
    }

    #[test]
    fn events_in_the_hubs_shape() {
        assert_eq!(
            frames(
                r#"{"type":"message.create","data":{"eventId":"e","serverMsgId":"s","clientMsgId":null,"from":"5","to":"6","conversationId":"db10","conversationNumericId":3,"content":"Hello!","attachmentUrl":null,"sentAt":"2025-11-21T13:00:00.250Z","cursor":789,"seq":1},"timestamp":1763730000300}"#
            ),
            [
                r#"{"type":"new_message","chat_id":3,"message":{"id":789,"chat_id":3,"sender_id":5,"receiver_id":6,"content":"Hello!","created_at":"2025-11-21T13:00:00Z"},"timestamp":"2025-11-21T13:00:00Z"}"#
            ]
        );
        // A group message has no receiver; an attachment is kept.
        assert_eq!(
            frames(
                r#"{"type":"message.create","data":{"from":"alice","to":null,"conversationId":"g","conversationNumericId":9,"content":"","attachmentUrl":"https://x/y.png","sentAt":"2025-11-21T13:00:00.000Z","cursor":10},"timestamp":0}"#
            ),
            [
                r#"{"type":"new_message","chat_id":9,"message":{"id":10,"chat_id":9,"sender_id":"alice","receiver_id":null,"content":"","attachment_url":"https://x/y.png","created_at":"2025-11-21T13:00:00Z"},"timestamp":"1970-01-01T00:00:00Z"}"#
            ]
        );
        assert_eq!(
            frames(
                r#"{"type":"message.read","data":{"conversationId":"db10","conversationNumericId":3,"messageIds":[456,"457","m-1"],"by":"6","at":"x"},"timestamp":1763730000000}"#
            ),
            [
                r#"{"type":"message_read","chat_id":3,"message_id":456,"read_by":6,"timestamp":"2025-11-21T13:00:00Z"}"#,
                r#"{"type":"message_read","chat_id":3,"message_id":457,"read_by":6,"timestamp":"2025-11-21T13:00:00Z"}"#,
                r#"{"type":"message_read","chat_id":3,"message_id":"m-1","read_by":6,"timestamp":"2025-11-21T13:00:00Z"}"#,
            ]
        );
        // A read over REST names the message by its UUID and its numeric id.
        assert_eq!(
            frames(
                r#"{"type":"message.read","data":{"conversationId":"db10","conversationNumericId":3,"messageIds":["01a201a5-32a9-77b2-a173-3f47b1ef19fb"],"messageNumericIds":[456],"by":"6","at":"x"},"timestamp":0}"#
            ),
            [
                r#"{"type":"message_read","chat_id":3,"message_id":456,"read_by":6,"timestamp":"1970-01-01T00:00:00Z"}"#
            ]
        );
        assert_eq!(
            frames(
                r#"{"type":"typing.start","data":{"user_id":"5","conversationId":"db10","conversationNumericId":3},"timestamp":0}"#
            ),
            [
                r#"{"type":"typing","chat_id":3,"user_id":5,"is_typing":true,"timestamp":"1970-01-01T00:00:00Z"}"#
            ]
        );
        assert_eq!(
            frames(
                r#"{"type":"typing.stop","data":{"user_id":"bob","to":"alice","conversationId":"c-1"},"timestamp":0}"#
            ),
            [
                r#"{"type":"typing","chat_id":"c-1","user_id":"bob","is_typing":false,"timestamp":"1970-01-01T00:00:00Z"}"#
            ]
        );
    }

    #[test]
    fn what_the_hub_does_not_know() {
        for f in [
            r#"{"type":"typing.start","room":"chat","data":{"user_id":"a","room":"chat"},"timestamp":0}"#,
            r#"{"type":"message.delivered","data":{"messageIds":[1],"by":"a"},"timestamp":0}"#,
            r#"{"type":"message.ack","data":{"clientMsgId":"c"},"timestamp":0}"#,
            r#"{"type":"presence.online","data":{"user_id":"a"},"timestamp":0}"#,
            r#"{"type":"call.incoming","data":{"call_id":"k"},"timestamp":0}"#,
            r#"{"type":"notification","data":{"id":1},"timestamp":0}"#,
            r#"{"type":"message","room":"chat","data":{"x":1},"timestamp":0}"#,
        ] {
            assert!(frames(f).is_empty(), "{f}");
        }
        // A reply to a command with an id goes out as it is.
        let ack = r#"{"type":"message.ack","id":9,"data":{"clientMsgId":"c"},"timestamp":0}"#;
        assert_eq!(frames(ack), [ack]);
        assert_eq!(encode(ack.as_bytes()).class, Class::default());
    }

    #[test]
    fn seconds_cut_only_native_times() {
        assert_eq!(seconds("2026-12-01T21:05:26.999Z"), "2026-12-01T21:05:26Z");
        assert_eq!(seconds("2026-12-01T21:05:26Z"), "2026-12-01T21:05:26Z");
        assert_eq!(seconds("later"), "later");
        assert_eq!(rfc3339_s(1_795_323_906_789), "2026-11-22T05:05:06Z");
    }
}
