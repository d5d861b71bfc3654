//! The messaging service's protocol (`seeds/004`, `/api/v1/ws?token=`): `{type, payload}` both
//! ways, translated at the edge of one connection (sans-IO).
//!
//! Client frames: `message {threadId, body}` becomes `message.send` to the stored conversation
//! (with a `clientMsgId` taken from the payload or made here), `typing {threadId, isTyping}`
//! `typing.start` / `typing.stop` and `read {threadId, messageId}` `mark.read`, both addressed
//! to the stored conversation with no `to`; `ping` the native `ping`. Server frames: the
//! native events in the service's shapes, with the REST API's objects as payloads (`message`
//! is the REST message object of `docs/API.md`, `notification` the REST notification object)
//! and user ids as numbers where they are numeric ([`super::write_id`]).
//!
//! **The sender of a message.** Natively the sending connection gets `message.ack`, never its
//! own `message.create`; this service's clients never heard of acks and expect the `message`
//! every participant gets. So the edge keeps the body of each send until its ack ([`Pending`],
//! per connection, at most [`PENDING_SENDS_MAX`]), and turns the ack (which carries every
//! other field of the message) into the same `message` object; a refused send becomes an
//! `error` frame and forgets its body. The ack is a reply to one connection, so this per-
//! connection step costs nothing on fan-out ([`settle`]).
//!
//! **Presence** goes to the users who share a thread with that user, and its clients never
//! send a watch: [`on_open`] watches them (`presence.watch {scope: "conversations"}`) when the
//! connection opens. Every decision is written out in `docs/DIALECTS.md`.

use std::borrow::Cow;
use std::collections::VecDeque;

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use super::{id_text, parse_native, write_id, Class, Encoded, Step};
use crate::limits::ID_BYTES_MAX;
use crate::metrics::ErrorReason;
use crate::proto::envelope::{write_object, Obj};
use crate::proto::json::write_str;

/// Sends one connection may have waiting for their ack at once (a named bound on the per-
/// connection edge state). A client that waits for each `message` before the next never has
/// more than one; past the bound a send is refused with an error, never forgotten.
pub const PENDING_SENDS_MAX: usize = 64;

/// A send still waiting after this long is taken as lost (its answer went missing: a shard
/// inbox overflow, which the native protocol repairs with `sync`) and may be evicted to make
/// room. Far above the longest default wait for an answer (`store_timeout` 5 s, then
/// `kafka_ack_timeout` 5 s).
pub const PENDING_SEND_STALE_MS: u64 = 5 * 60 * 1000;

/// Longest `clientMsgId` a client may give (the native bound).
const CLIENT_MSG_ID_BYTES_MAX: usize = 256;

/// One send waiting for its ack: what the ack does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Send {
    client_msg_id: Box<str>,
    /// The body as the client sent it (a JSON string text).
    content: Box<str>,
    /// `attachmentUrl` as sent (JSON text), when given.
    attachment: Option<Box<str>>,
    at_ms: u64,
}

/// One connection's sends waiting for their ack, oldest first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    sends: VecDeque<Send>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }

    pub fn len(&self) -> usize {
        self.sends.len()
    }

    /// Remember `s` (a retry of a held `clientMsgId` replaces it). False: full of fresh sends.
    fn hold(&mut self, s: Send) -> bool {
        if let Some(i) = self
            .sends
            .iter()
            .position(|x| x.client_msg_id == s.client_msg_id)
        {
            self.sends.remove(i);
        }
        if self.sends.len() >= PENDING_SENDS_MAX {
            let now = s.at_ms;
            self.sends
                .retain(|x| now.saturating_sub(x.at_ms) < PENDING_SEND_STALE_MS);
            if self.sends.len() >= PENDING_SENDS_MAX {
                return false;
            }
        }
        self.sends.push_back(s);
        true
    }

    fn take(&mut self, client_msg_id: &str) -> Option<Send> {
        let i = self
            .sends
            .iter()
            .position(|x| &*x.client_msg_id == client_msg_id)?;
        self.sends.remove(i)
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    payload: Option<LazyValue<'a>>,
    /// Not of this protocol, but a client sending its own commands (custom types through a
    /// backend) may correlate with one: copied into the native command, so the reply has it.
    #[serde(borrow, default)]
    id: Option<LazyValue<'a>>,
}

#[derive(Deserialize, Default)]
struct Payload<'a> {
    #[serde(rename = "threadId", borrow, default)]
    thread_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    body: Option<LazyValue<'a>>,
    #[serde(rename = "clientMsgId", borrow, default)]
    client_msg_id: Option<LazyValue<'a>>,
    #[serde(rename = "attachmentUrl", borrow, default)]
    attachment_url: Option<LazyValue<'a>>,
    #[serde(rename = "isTyping", borrow, default)]
    is_typing: Option<LazyValue<'a>>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<LazyValue<'a>>,
}

const INVALID: &str = "invalid JSON format";

fn error(reason: ErrorReason, text: impl Into<Cow<'static, str>>) -> Vec<Step> {
    vec![Step::Error {
        reason,
        text: text.into(),
        id: None,
    }]
}

/// A present, non-null member.
fn given<'v, 'a>(v: &'v Option<LazyValue<'a>>) -> Option<&'v LazyValue<'a>> {
    v.as_ref().filter(|v| !v.is_null())
}

/// The thread a payload names, as the native `conversationId` (text or numeric id). Err: the
/// frame's error.
fn thread_of(p: &Payload<'_>, required: bool) -> Result<Option<String>, Vec<Step>> {
    match given(&p.thread_id) {
        None if required => Err(error(ErrorReason::BadRequest, "threadId is required")),
        None => Ok(None),
        Some(v) => match id_text(v) {
            Some(t) if !t.is_empty() && t.len() <= ID_BYTES_MAX => Ok(Some(t)),
            Some(_) => Err(error(
                ErrorReason::BadRequest,
                "threadId must be 1 to 256 bytes",
            )),
            None => Err(error(ErrorReason::InvalidJson, INVALID)),
        },
    }
}

/// Translate one client message. `now_ms` is Unix milliseconds.
pub fn inbound(text: &[u8], st: &mut Pending, now_ms: u64) -> Vec<Step> {
    let Ok(env) = sonic_rs::from_slice::<Envelope>(text) else {
        return error(ErrorReason::InvalidJson, INVALID);
    };
    let kind = env.kind.as_deref().unwrap_or("");
    let payload = given(&env.payload);
    if payload.is_some_and(|p| !p.is_object()) {
        return error(ErrorReason::InvalidJson, INVALID);
    }
    let raw = payload.map(|p| p.as_raw_str()).unwrap_or("{}");
    let p = match kind {
        "message" | "typing" | "read" => match sonic_rs::from_str::<Payload>(raw) {
            Ok(p) => p,
            Err(_) => return error(ErrorReason::InvalidJson, INVALID),
        },
        _ => Payload::default(),
    };
    match kind {
        "message" => message(&p, st, now_ms),
        "typing" => {
            let thread = match thread_of(&p, true) {
                Ok(t) => t.unwrap_or_default(),
                Err(e) => return e,
            };
            // A typing frame without isTyping says the user is typing.
            let start = match given(&p.is_typing) {
                None => true,
                Some(v) => match v.as_bool() {
                    Some(b) => b,
                    None => return error(ErrorReason::InvalidJson, INVALID),
                },
            };
            let mut out = Vec::with_capacity(64 + thread.len());
            write_object(&mut out, |o| {
                o.str("type", if start { "typing.start" } else { "typing.stop" })
                    .str("conversationId", &thread);
            });
            vec![Step::Native(out)]
        }
        "read" => {
            let thread = match thread_of(&p, false) {
                Ok(t) => t,
                Err(e) => return e,
            };
            let Some(m) = given(&p.message_id) else {
                return error(ErrorReason::BadRequest, "messageId is required");
            };
            if !(m.is_str() || m.is_number()) {
                return error(ErrorReason::InvalidJson, INVALID);
            }
            let mut out = Vec::with_capacity(96);
            write_object(&mut out, |o| {
                o.str("type", "mark.read");
                if let Some(t) = &thread {
                    o.str("conversationId", t);
                }
                o.arr("messageIds", |_| {});
            });
            // `[]` -> `[<messageId>]`, the id copied as sent (string or number).
            out.truncate(out.len() - 2);
            out.extend_from_slice(m.as_raw_str().as_bytes());
            out.extend_from_slice(b"]}");
            vec![Step::Native(out)]
        }
        "ping" => vec![Step::Native(br#"{"type":"ping"}"#.to_vec())],
        "" => error(ErrorReason::UnknownType, "unknown message type"),
        // Not a type of this protocol: the native table decides, with the payload's members
        // at the top level (a configured backend route for a custom type, a native command,
        // else `unknown message type`).
        _ => match lift(kind, crate::proto::envelope::correlation_id(&env.id), raw) {
            Some(native) => vec![Step::Native(native)],
            None => error(ErrorReason::InvalidJson, INVALID),
        },
    }
}

/// `message {threadId, body}` -> `message.send {conversationId, content, clientMsgId}`, the
/// body held until the ack.
fn message(p: &Payload<'_>, st: &mut Pending, now_ms: u64) -> Vec<Step> {
    let thread = match thread_of(p, true) {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => return e,
    };
    let content = match given(&p.body) {
        None => None,
        Some(v) if v.is_str() => Some(v.as_raw_str()),
        Some(_) => return error(ErrorReason::InvalidJson, INVALID),
    };
    let attachment = match given(&p.attachment_url) {
        None => None,
        Some(v) if v.is_str() => Some(v.as_raw_str()),
        Some(_) => return error(ErrorReason::InvalidJson, INVALID),
    };
    let client_msg_id = match given(&p.client_msg_id) {
        None => uuid::Uuid::new_v4().to_string(),
        Some(v) => match v.as_str() {
            Some("") => uuid::Uuid::new_v4().to_string(),
            Some(s) if s.len() <= CLIENT_MSG_ID_BYTES_MAX => s.to_owned(),
            Some(_) => {
                return error(
                    ErrorReason::BadRequest,
                    "clientMsgId must be 1 to 256 bytes",
                )
            }
            None => return error(ErrorReason::InvalidJson, INVALID),
        },
    };
    let held = st.hold(Send {
        client_msg_id: client_msg_id.as_str().into(),
        content: content.unwrap_or("\"\"").into(),
        attachment: attachment.map(Box::from),
        at_ms: now_ms,
    });
    if !held {
        return error(
            ErrorReason::BadRequest,
            "too many messages waiting to be sent (at most 64): wait for their message frames",
        );
    }
    let mut out = Vec::with_capacity(96 + thread.len() + content.map_or(0, str::len));
    write_object(&mut out, |o| {
        o.str("type", "message.send")
            .str("clientMsgId", &client_msg_id)
            .str("conversationId", &thread);
        if let Some(c) = content {
            o.raw("content", c);
        }
        if let Some(a) = attachment {
            o.raw("attachmentUrl", a);
        }
    });
    vec![Step::Native(out)]
}

/// `{"type":kind, ...payload members}` (`type` in the payload ignored). None: not an object.
fn lift(kind: &str, id: Option<&str>, payload: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() + kind.len() + 16);
    out.extend_from_slice(b"{\"type\":");
    write_str(&mut out, kind);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(id.as_bytes());
    }
    for member in sonic_rs::to_object_iter(payload) {
        let (key, value) = member.ok()?;
        if &*key == "type" || (&*key == "id" && id.is_some()) {
            continue;
        }
        out.push(b',');
        write_str(&mut out, &key);
        out.push(b':');
        out.extend_from_slice(value.as_raw_str().as_bytes());
    }
    out.push(b'}');
    Some(out)
}

/// The native commands a connection of this dialect runs when it opens with an identity: a
/// watch of everyone it shares a stored conversation with (its clients never send one).
pub fn on_open() -> Vec<Step> {
    vec![Step::Native(
        br#"{"type":"presence.watch","scope":"conversations"}"#.to_vec(),
    )]
}

/// The members of `message.create` / `message.ack` data the message object is made of, raw.
#[derive(Deserialize, Default)]
struct MessageData<'a> {
    #[serde(rename = "serverMsgId", borrow, default)]
    server_msg_id: Option<LazyValue<'a>>,
    #[serde(rename = "clientMsgId", borrow, default)]
    client_msg_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    from: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    to: Option<LazyValue<'a>>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<LazyValue<'a>>,
    #[serde(rename = "conversationNumericId", borrow, default)]
    conversation_numeric_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    content: Option<LazyValue<'a>>,
    #[serde(rename = "attachmentUrl", borrow, default)]
    attachment_url: Option<LazyValue<'a>>,
    #[serde(rename = "sentAt", borrow, default)]
    sent_at: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    cursor: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    seq: Option<LazyValue<'a>>,
}

fn raw_or_null<'v>(v: &'v Option<LazyValue<'_>>) -> &'v str {
    v.as_ref().map_or("null", |v| v.as_raw_str())
}

/// The REST message object (`docs/API.md`): `{id, serverMsgId, threadId, threadNumericId, seq,
/// senderId, recipientId, clientMsgId, content, attachmentUrl, sentAt, cursor}`, each value the
/// native one's raw text (so the bytes are the REST API's). `content` / `attachment` override
/// the data's (the sender's held body, for an ack).
fn message_object(
    o: &mut Obj,
    m: &MessageData<'_>,
    content: Option<&str>,
    attachment: Option<&str>,
) {
    o.raw("id", raw_or_null(&m.cursor))
        .raw("serverMsgId", raw_or_null(&m.server_msg_id))
        .raw("threadId", raw_or_null(&m.conversation_id))
        .raw("threadNumericId", raw_or_null(&m.conversation_numeric_id))
        .raw("seq", raw_or_null(&m.seq))
        .raw("senderId", raw_or_null(&m.from))
        .raw("recipientId", raw_or_null(&m.to))
        .raw("clientMsgId", raw_or_null(&m.client_msg_id))
        .raw("content", content.unwrap_or(raw_or_null(&m.content)))
        .raw(
            "attachmentUrl",
            match content {
                Some(_) => attachment.unwrap_or("null"),
                None => raw_or_null(&m.attachment_url),
            },
        )
        .raw("sentAt", raw_or_null(&m.sent_at))
        .raw("cursor", raw_or_null(&m.cursor));
}

/// `{"type":kind,"payload":<f>}`.
fn frame(kind: &str, f: impl FnOnce(&mut Obj)) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    write_object(&mut out, |o| {
        o.str("type", kind).obj("payload", f);
    });
    out
}

/// A user id member as this service's clients read it (a number when numeric).
fn id_member(o: &mut Obj, k: &str, id: &str) {
    let mut v = Vec::with_capacity(id.len() + 2);
    write_id(&mut v, id);
    o.raw(k, std::str::from_utf8(&v).unwrap_or("null"));
}

#[derive(Deserialize, Default)]
struct EventData<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<Cow<'a, str>>,
    #[serde(rename = "messageIds", borrow, default)]
    message_ids: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    by: Option<Cow<'a, str>>,
    #[serde(rename = "clientMsgId", borrow, default)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(rename = "notificationId", borrow, default)]
    notification_id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    kind: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    read: Option<LazyValue<'a>>,
    #[serde(rename = "createdAt", borrow, default)]
    created_at: Option<LazyValue<'a>>,
    #[serde(default)]
    shard: Option<u64>,
}

fn none() -> Encoded {
    Encoded::default()
}

fn one(f: Vec<u8>) -> Encoded {
    Encoded {
        frames: vec![f],
        class: Class::default(),
    }
}

/// Encode one native server frame.
pub fn encode(native: &[u8]) -> Encoded {
    let Some(f) = parse_native(native) else {
        return one(native.to_vec());
    };
    let data_raw = f.data.as_ref().map(|d| d.as_raw_str());
    let ev = || -> EventData<'_> {
        data_raw
            .filter(|d| d.starts_with('{'))
            .and_then(|d| sonic_rs::from_str(d).ok())
            .unwrap_or_default()
    };
    if let Some(text) = f.error.as_deref() {
        // `error`, `auth.failed`, `auth.expired`: one error shape, the data's members beside
        // the text. A refused send forgets its held body ([`settle`]).
        let out = frame("error", |p| {
            p.str("error", text);
            if let Some(d) = data_raw.filter(|d| d.starts_with('{')) {
                for (k, v) in sonic_rs::to_object_iter(d).flatten() {
                    p.raw(&k, v.as_raw_str());
                }
            }
        });
        let settles = ev().client_msg_id.map(|c| Box::from(&*c));
        return Encoded {
            frames: vec![out],
            class: Class {
                settles,
                ..Class::default()
            },
        };
    }
    match &*f.kind {
        "message.create" => {
            let Some(m) = data_raw.and_then(|d| sonic_rs::from_str::<MessageData>(d).ok()) else {
                return none();
            };
            one(frame("message", |p| message_object(p, &m, None, None)))
        }
        "message.ack" => {
            // Completed per connection, with the body the edge holds ([`settle`]).
            let settles = ev().client_msg_id.map(|c| Box::from(&*c));
            Encoded {
                frames: Vec::new(),
                class: Class {
                    settles,
                    ..Class::default()
                },
            }
        }
        k @ ("typing.start" | "typing.stop") => {
            let d = ev();
            // Room typing has no thread: nothing for this service's clients.
            let (Some(thread), Some(user)) = (d.conversation_id, d.user_id) else {
                return none();
            };
            one(frame("typing", |p| {
                p.str("threadId", &thread);
                id_member(p, "userId", &user);
                p.bool("isTyping", k == "typing.start");
            }))
        }
        "message.read" => {
            let d = ev();
            let (Some(thread), Some(by), Some(ids)) = (d.conversation_id, d.by, d.message_ids)
            else {
                return none();
            };
            // One `read` per message the receipt names.
            let frames = sonic_rs::to_array_iter(ids.as_raw_str())
                .flatten()
                .map(|m| {
                    frame("read", |p| {
                        p.str("threadId", &thread).raw("messageId", m.as_raw_str());
                        id_member(p, "userId", &by);
                    })
                })
                .collect();
            Encoded {
                frames,
                class: Class::default(),
            }
        }
        k @ ("presence.online" | "presence.offline") => {
            let Some(user) = ev().user_id else {
                return none();
            };
            one(presence(&user, k == "presence.online"))
        }
        "presence.state" if f.room.is_none() => {
            // The watch's (or a query's) answer: the users online now, one `presence` each;
            // the others are offline, as a client that just connected assumes.
            let mut frames = Vec::new();
            if let Some(users) = data_raw.and_then(|d| sonic_rs::get(d, ["users"]).ok()) {
                for u in sonic_rs::to_array_iter(users.as_raw_str()).flatten() {
                    let s: EntryState = sonic_rs::from_str(u.as_raw_str()).unwrap_or_default();
                    if let (Some(user), Some(status)) = (s.user_id, s.status) {
                        if status != "offline" {
                            frames.push(presence(&user, true));
                        }
                    }
                }
            }
            Encoded {
                frames,
                class: Class::default(),
            }
        }
        "notification" => {
            let d = ev();
            match d.notification_id {
                // A stored notification: the REST notification object.
                Some(n) => one(frame("notification", |p| {
                    p.raw("id", n.as_raw_str())
                        .raw("kind", raw_or_null(&d.kind))
                        .raw("data", raw_or_null(&d.data))
                        .raw("read", raw_or_null(&d.read))
                        .raw("createdAt", raw_or_null(&d.created_at));
                })),
                // A backend's own notification (`POST /api/users/{id}/send`) or a room's: its
                // data as the backend wrote it.
                None => one(raw_frame("notification", None, data_raw.unwrap_or("null"))),
            }
        }
        "pong" => {
            let mut out = Vec::with_capacity(48);
            write_object(&mut out, |o| {
                o.str("type", "pong")
                    .u64("payload", f.timestamp.unwrap_or(0) / 1000);
            });
            one(out)
        }
        "connected" => {
            // Not a frame of this service. Only with `expose_shard` (tests and debugging) is
            // it sent, so a test can tell which shard serves the connection.
            let d = ev();
            match d.shard {
                Some(shard) => one(frame("connected", |p| {
                    match &d.user_id {
                        Some(u) => id_member(p, "userId", u),
                        None => {
                            p.null("userId");
                        }
                    }
                    p.u64("shard", shard);
                })),
                None => none(),
            }
        }
        // No counterpart, or a name this service uses for something else: a room or broadcast
        // `message` is not a chat message; delivery receipts and status changes that leave a
        // user online change nothing a client of this service shows.
        "message" | "message.delivered" | "presence.update" => none(),
        // Everything else (answers to lifted native commands, a backend's own event types):
        // `{type, payload: data}`.
        k => one(raw_frame(
            k,
            f.id.as_ref().map(|i| i.as_raw_str()),
            data_raw.unwrap_or("null"),
        )),
    }
}

#[derive(Deserialize, Default)]
struct EntryState<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
}

fn presence(user: &str, online: bool) -> Vec<u8> {
    frame("presence", |p| {
        id_member(p, "userId", user);
        p.bool("isOnline", online);
    })
}

fn raw_frame(kind: &str, id: Option<&str>, payload: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + kind.len() + 24);
    write_object(&mut out, |o| {
        o.str("type", kind).raw("payload", payload);
        // The correlation id of the command this answers (a lifted native command or a
        // custom type's backend reply), when it had one.
        if let Some(id) = id {
            o.raw("id", id);
        }
    });
    out
}

/// The frames a reply that settles send `client_msg_id` becomes for the one connection it is
/// for, with that connection's held sends `st`. None: the shared encoding as is (an error:
/// the held body is forgotten). An ack whose send is not held (a `message.send` the client
/// wrote itself through the lifted native command) is dropped: its `message` is not known.
pub fn settle(st: &mut Pending, native: &[u8], client_msg_id: &str) -> Option<Vec<Vec<u8>>> {
    let held = st.take(client_msg_id);
    let f = parse_native(native)?;
    if f.kind != "message.ack" {
        return None;
    }
    let Some(s) = held else {
        return Some(Vec::new());
    };
    let m: MessageData = f
        .data
        .as_ref()
        .and_then(|d| sonic_rs::from_str(d.as_raw_str()).ok())
        .unwrap_or_default();
    Some(vec![frame("message", |p| {
        message_object(
            p,
            &m,
            Some(&s.content),
            Some(s.attachment.as_deref().unwrap_or("null")),
        )
    })])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(text: &str, st: &mut Pending) -> Vec<String> {
        inbound(text.as_bytes(), st, 1_000)
            .iter()
            .map(|s| match s {
                Step::Native(t) => String::from_utf8(t.clone()).unwrap(),
                Step::Own(t) => format!("own {}", String::from_utf8(t.clone()).unwrap()),
                Step::Error { text, .. } => format!("error {text}"),
            })
            .collect()
    }

    fn frames(e: &Encoded) -> Vec<String> {
        e.frames
            .iter()
            .map(|f| String::from_utf8(f.clone()).unwrap())
            .collect()
    }

    #[test]
    fn client_frames_become_native_commands() {
        let mut st = Pending::default();
        let got = steps(
            r#"{"type":"message","payload":{"threadId":"t-1","body":"Hello!"}}"#,
            &mut st,
        );
        assert_eq!(st.len(), 1);
        let cmid = st.sends[0].client_msg_id.clone();
        uuid::Uuid::parse_str(&cmid).expect("a generated UUID");
        assert_eq!(
            got,
            [format!(
                r#"{{"type":"message.send","clientMsgId":"{cmid}","conversationId":"t-1","content":"Hello!"}}"#
            )]
        );
        assert_eq!(
            steps(
                r#"{"type":"message","payload":{"threadId":42,"body":"x","clientMsgId":"c-1"}}"#,
                &mut st
            ),
            [r#"{"type":"message.send","clientMsgId":"c-1","conversationId":"42","content":"x"}"#]
        );
        assert_eq!(
            steps(
                r#"{"type":"typing","payload":{"threadId":"t-1","isTyping":true}}"#,
                &mut st
            ),
            [r#"{"type":"typing.start","conversationId":"t-1"}"#]
        );
        assert_eq!(
            steps(
                r#"{"type":"typing","payload":{"threadId":"t-1","isTyping":false}}"#,
                &mut st
            ),
            [r#"{"type":"typing.stop","conversationId":"t-1"}"#]
        );
        assert_eq!(
            steps(
                r#"{"type":"read","payload":{"threadId":"t-1","messageId":"m-9"}}"#,
                &mut st
            ),
            [r#"{"type":"mark.read","conversationId":"t-1","messageIds":["m-9"]}"#]
        );
        assert_eq!(
            steps(r#"{"type":"read","payload":{"messageId":7}}"#, &mut st),
            [r#"{"type":"mark.read","messageIds":[7]}"#]
        );
        assert_eq!(
            steps(r#"{"type":"ping","payload":null}"#, &mut st),
            [r#"{"type":"ping"}"#]
        );
        assert_eq!(
            steps(r#"{"type":"sync","payload":{"since":3}}"#, &mut st),
            [r#"{"type":"sync","since":3}"#]
        );
    }

    #[test]
    fn bad_client_frames_are_errors() {
        let mut st = Pending::default();
        let e = |t: &str, st: &mut Pending| steps(t, st);
        assert_eq!(e("nope", &mut st), ["error invalid JSON format"]);
        assert_eq!(
            e(r#"{"type":"ping","payload":[1]}"#, &mut st),
            ["error invalid JSON format"]
        );
        assert_eq!(
            e(r#"{"type":"message","payload":{"body":"x"}}"#, &mut st),
            ["error threadId is required"]
        );
        assert_eq!(
            e(
                r#"{"type":"message","payload":{"threadId":"t","body":5}}"#,
                &mut st
            ),
            ["error invalid JSON format"]
        );
        assert_eq!(
            e(
                r#"{"type":"typing","payload":{"threadId":"t","isTyping":"yes"}}"#,
                &mut st
            ),
            ["error invalid JSON format"]
        );
        assert_eq!(
            e(r#"{"type":"read","payload":{"threadId":"t"}}"#, &mut st),
            ["error messageId is required"]
        );
        assert_eq!(
            e(r#"{"payload":{}}"#, &mut st),
            ["error unknown message type"]
        );
        assert!(st.is_empty());
    }

    #[test]
    fn held_sends_are_bounded() {
        let mut st = Pending::default();
        for i in 0..PENDING_SENDS_MAX {
            let t = format!(
                r#"{{"type":"message","payload":{{"threadId":"t","body":"b","clientMsgId":"c{i}"}}}}"#
            );
            assert!(!steps(&t, &mut st)[0].starts_with("error"));
        }
        // A retry of a held id is not a new one.
        let again =
            r#"{"type":"message","payload":{"threadId":"t","body":"b2","clientMsgId":"c0"}}"#;
        assert!(!steps(again, &mut st)[0].starts_with("error"));
        let more = r#"{"type":"message","payload":{"threadId":"t","body":"b"}}"#;
        assert!(steps(more, &mut st)[0].starts_with("error too many messages waiting"));
        assert_eq!(st.len(), PENDING_SENDS_MAX);
        // Stale ones make room.
        let later = inbound(more.as_bytes(), &mut st, 1_000 + PENDING_SEND_STALE_MS);
        assert!(matches!(later[0], Step::Native(_)));
        assert_eq!(st.len(), 1);
    }

    const ACK: &str = r#"{"type":"message.ack","data":{"clientMsgId":"c-1","serverMsgId":"01a201b2-7710-7c02-b3e1-44d2a0c9f8e6","conversationId":"t-1","conversationNumericId":1041,"sentAt":"2026-12-01T21:05:26.000Z","cursor":1071,"seq":3,"from":"7","to":null},"timestamp":1}"#;

    #[test]
    fn the_ack_becomes_the_senders_message() {
        let mut st = Pending::default();
        steps(
            r#"{"type":"message","payload":{"threadId":"t-1","body":"héllo \"q\"","clientMsgId":"c-1"}}"#,
            &mut st,
        );
        let e = encode(ACK.as_bytes());
        assert!(e.frames.is_empty());
        assert_eq!(e.class.settles.as_deref(), Some("c-1"));
        let got = settle(&mut st, ACK.as_bytes(), "c-1").unwrap();
        assert_eq!(
            String::from_utf8(got[0].clone()).unwrap(),
            r#"{"type":"message","payload":{"id":1071,"serverMsgId":"01a201b2-7710-7c02-b3e1-44d2a0c9f8e6","threadId":"t-1","threadNumericId":1041,"seq":3,"senderId":"7","recipientId":null,"clientMsgId":"c-1","content":"héllo \"q\"","attachmentUrl":null,"sentAt":"2026-12-01T21:05:26.000Z","cursor":1071}}"#
        );
        assert!(st.is_empty());
        // Not held: nothing.
        assert_eq!(settle(&mut st, ACK.as_bytes(), "c-1"), Some(vec![]));
        // A refusal forgets the body and keeps the shared error frame.
        steps(
            r#"{"type":"message","payload":{"threadId":"nope","body":"x","clientMsgId":"c-2"}}"#,
            &mut st,
        );
        let err = br#"{"type":"error","error":"conversation not found","data":{"clientMsgId":"c-2"},"timestamp":5}"#;
        let e = encode(err);
        assert_eq!(
            frames(&e),
            [
                r#"{"type":"error","payload":{"error":"conversation not found","clientMsgId":"c-2"}}"#
            ]
        );
        assert_eq!(e.class.settles.as_deref(), Some("c-2"));
        assert_eq!(settle(&mut st, err, "c-2"), None);
        assert!(st.is_empty());
    }

    #[test]
    fn events_in_the_services_shapes() {
        let e = encode(br#"{"type":"message.create","data":{"eventId":"e","serverMsgId":"s","clientMsgId":null,"from":"alice","to":"bob","conversationId":"t-1","conversationNumericId":9,"content":"hi","attachmentUrl":null,"sentAt":"2026-12-01T21:05:26.000Z","cursor":17,"seq":1},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [
                r#"{"type":"message","payload":{"id":17,"serverMsgId":"s","threadId":"t-1","threadNumericId":9,"seq":1,"senderId":"alice","recipientId":"bob","clientMsgId":null,"content":"hi","attachmentUrl":null,"sentAt":"2026-12-01T21:05:26.000Z","cursor":17}}"#
            ]
        );
        let e = encode(br#"{"type":"typing.start","data":{"user_id":"1","conversationId":"t-1","conversationNumericId":9},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"typing","payload":{"threadId":"t-1","userId":1,"isTyping":true}}"#]
        );
        let e = encode(br#"{"type":"typing.stop","data":{"user_id":"bob","to":"alice","conversationId":"c"},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"typing","payload":{"threadId":"c","userId":"bob","isTyping":false}}"#]
        );
        assert!(encode(br#"{"type":"typing.start","room":"r","data":{"user_id":"a","room":"r"},"timestamp":1}"#).frames.is_empty());
        let e = encode(br#"{"type":"message.read","data":{"conversationId":"t-1","conversationNumericId":9,"messageIds":["m-1",42],"by":"2","at":"x"},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [
                r#"{"type":"read","payload":{"threadId":"t-1","messageId":"m-1","userId":2}}"#,
                r#"{"type":"read","payload":{"threadId":"t-1","messageId":42,"userId":2}}"#
            ]
        );
        let e = encode(br#"{"type":"presence.online","data":{"user_id":"1","status":"online","text":null,"last_seen":null},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"presence","payload":{"userId":1,"isOnline":true}}"#]
        );
        let e = encode(br#"{"type":"presence.offline","data":{"user_id":"bob","status":"offline","text":null,"last_seen":"x"},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"presence","payload":{"userId":"bob","isOnline":false}}"#]
        );
        let e = encode(br#"{"type":"presence.state","data":{"users":[{"user_id":"a","status":"away","text":null,"devices":1,"last_seen":null},{"user_id":"b","status":"offline","text":null,"devices":0,"last_seen":null}],"truncated":false},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"presence","payload":{"userId":"a","isOnline":true}}"#]
        );
        let e = encode(br#"{"type":"pong","id":3,"timestamp":1703012345678}"#);
        assert_eq!(frames(&e), [r#"{"type":"pong","payload":1703012345}"#]);
        let e = encode(br#"{"type":"notification","data":{"id":"jobs.posted/0/17","notificationId":42,"kind":"job.posted","data":{"jobId":"j1"},"read":false,"createdAt":"2026-12-02T01:40:12.345Z"},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [
                r#"{"type":"notification","payload":{"id":42,"kind":"job.posted","data":{"jobId":"j1"},"read":false,"createdAt":"2026-12-02T01:40:12.345Z"}}"#
            ]
        );
        let e = encode(br#"{"type":"notification","data":{"kind":"x","n":1},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"notification","payload":{"kind":"x","n":1}}"#]
        );
        let e = encode(br#"{"type":"payment.received","data":{"amount":5},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"payment.received","payload":{"amount":5}}"#]
        );
        for quiet in [
            &br#"{"type":"connected","data":{"client_id":"c","user_id":"1","message":"m"},"timestamp":1}"#[..],
            br#"{"type":"message","room":"r","data":{},"client_id":"c","timestamp":1}"#,
            br#"{"type":"message.delivered","data":{"conversationId":"t","messageIds":[1],"by":"b","at":"x"},"timestamp":1}"#,
            br#"{"type":"presence.update","data":{"user_id":"b","status":"away","text":null,"last_seen":null},"timestamp":1}"#,
        ] {
            assert!(encode(quiet).frames.is_empty(), "{}", String::from_utf8_lossy(quiet));
        }
        let e = encode(br#"{"type":"connected","data":{"client_id":"c","user_id":"12","message":"m","shard":1},"timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"connected","payload":{"userId":12,"shard":1}}"#]
        );
        let e = encode(br#"{"type":"auth.failed","error":"token expired","timestamp":1}"#);
        assert_eq!(
            frames(&e),
            [r#"{"type":"error","payload":{"error":"token expired"}}"#]
        );
        assert_eq!(e.class, Class::default());
    }
}
