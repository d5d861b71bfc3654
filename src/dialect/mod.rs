//! Dialects: the wire shapes of the services Switchboard replaces, translated at the edge of
//! one connection (sans-IO). Nothing behind the edge knows dialects exist.
//!
//! - **Inbound**, [`inbound`]: a dialect client's text message becomes zero or more *native*
//!   command texts, which run through the normal command table exactly as if a native client
//!   had sent them, or is answered at the edge in the dialect's own shape (what has no native
//!   counterpart: the topic protocol's `subscribe {topics, filters}`).
//! - **Outbound**, [`encode`]: a native server frame becomes the frames that dialect's clients
//!   expect (none, one, or several). The shard's outbox ([`crate::shard`]) calls it once per
//!   dialect per native frame and shares the result with every recipient of that dialect, so
//!   a fan-out to connections of three dialects costs three encodes, never one per recipient.
//! - **Per connection**, [`EdgeState`]: what a dialect must remember about one connection
//!   (the topic protocol's subscriptions), kept by the shard only for connections that have
//!   some, and consulted by [`wants`] after the shared encode.
//!
//! Which dialect a connection speaks is chosen by its WebSocket path (`ws_dialects`), or, on a
//! path configured `auto`, by its first frame ([`detect`]). See `docs/DIALECTS.md`.

pub mod chat_hub;
pub mod messaging;
pub mod topic;

use std::borrow::Cow;

use serde::Deserialize;
use sonic_rs::LazyValue;

use crate::metrics::ErrorReason;

/// The dialects. The value is what `Client::dialect` holds (with [`UNDECIDED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Dialect {
    /// Switchboard's own protocol (`docs/PROTOCOL.md`): no translation.
    Native = 0,
    /// The `{id, type, payload, timestamp}` topic protocol (`/ws` of the topic service).
    Topic = 1,
    /// The chat hub of `/ws/chat` (`seeds/002`): flat snake_case frames, numeric ids.
    ChatHub = 2,
    /// The messaging service's `{type, payload}` protocol (`/api/v1/ws`).
    Messaging = 3,
}

/// How many dialects there are (the size of per-dialect tables).
pub const DIALECTS: usize = 4;

/// `Client::dialect` bit: the path is `auto` and no frame has decided the dialect yet. Until
/// then the connection is served as native (its `connected` greeting is the native one).
pub const UNDECIDED: u8 = 0x80;

impl Dialect {
    /// Every dialect.
    pub const ALL: &'static [Dialect] = &[
        Dialect::Native,
        Dialect::Topic,
        Dialect::ChatHub,
        Dialect::Messaging,
    ];

    /// From `Client::dialect` (the [`UNDECIDED`] bit ignored).
    #[inline]
    pub fn from_byte(b: u8) -> Dialect {
        match b & !UNDECIDED {
            1 => Dialect::Topic,
            2 => Dialect::ChatHub,
            3 => Dialect::Messaging,
            _ => Dialect::Native,
        }
    }

    /// The name used in `ws_dialects` and in the docs.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Native => "native",
            Dialect::Topic => "topic",
            Dialect::ChatHub => "chat-hub",
            Dialect::Messaging => "messaging",
        }
    }
}

/// What a WebSocket path speaks (`ws_dialects`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathDialect {
    Fixed(Dialect),
    /// Native, or the topic protocol when the first frame carries a `payload` member.
    Auto,
}

impl PathDialect {
    /// Parse one `ws_dialects` value.
    pub fn parse(s: &str) -> Option<PathDialect> {
        if s == "auto" {
            return Some(PathDialect::Auto);
        }
        Dialect::ALL
            .iter()
            .copied()
            .find(|d| d.name() == s)
            .map(PathDialect::Fixed)
    }

    /// The initial `Client::dialect` byte for a connection upgraded on such a path.
    pub fn initial_byte(self) -> u8 {
        match self {
            PathDialect::Fixed(d) => d as u8,
            PathDialect::Auto => UNDECIDED,
        }
    }
}

impl PathDialect {
    /// Whether a connection on such a path must bring its token on the upgrade (jwt mode):
    /// the chat hub's clients have no in-band `authenticate`, so one without a token is
    /// refused with 401 [`TOKEN_REQUIRED`] instead of waiting for one.
    pub fn needs_upgrade_token(self) -> bool {
        self == PathDialect::Fixed(Dialect::ChatHub)
    }
}

/// The 401 of an upgrade without a token on a path that needs one.
pub const TOKEN_REQUIRED: &str = "token is required: send ?token=<jwt>";

/// Every name `ws_dialects` accepts, for error messages.
pub const PATH_DIALECT_NAMES: &str = "auto, native, topic, chat-hub, messaging";

/// The dialect of a connection on an `auto` path, from its first text message: the topic
/// protocol when it is a JSON object with a `payload` member (every topic-protocol frame has
/// one; no native command does), native otherwise (including text that is not JSON: the
/// native path answers it).
pub fn detect(text: &[u8]) -> Dialect {
    // A member that is present counts, `null` included (`"payload": null`). `get` also
    // checks the text up to that member, and parse_head validates all of it afterwards.
    let is_object = text
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if is_object && sonic_rs::get(text, ["payload"]).is_ok() {
        Dialect::Topic
    } else {
        Dialect::Native
    }
}

/// What a dialect remembers about one connection.
#[derive(Debug, Default)]
pub struct EdgeState {
    pub topic: topic::Subscriptions,
    /// The messaging service's sends waiting for their ack.
    pub messaging: messaging::Pending,
}

impl EdgeState {
    /// Nothing to remember (the shard then drops the entry).
    pub fn is_empty(&self) -> bool {
        self.topic == topic::Subscriptions::default() && self.messaging.is_empty()
    }
}

/// One step of what an inbound dialect message becomes, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A native command text, run as if the client had sent it (its replies and errors are
    /// translated on the way out like every other frame).
    Native(Vec<u8>),
    /// A frame already in the dialect's shape (a JSON object text), queued as is.
    Own(Vec<u8>),
    /// A native error for this message (`{"type":"error","error":text}` with the correlation
    /// id), counted under `reason` and translated on the way out.
    Error {
        reason: ErrorReason,
        text: Cow<'static, str>,
        id: Option<String>,
    },
}

/// Translate one inbound text message of dialect `d`. `now_ms` is Unix milliseconds (for
/// frames answered at the edge).
pub fn inbound(d: Dialect, text: &[u8], st: &mut EdgeState, now_ms: u64) -> Vec<Step> {
    match d {
        Dialect::Native => vec![Step::Native(text.to_vec())],
        Dialect::Topic => topic::inbound(text, &mut st.topic, now_ms),
        Dialect::ChatHub => chat_hub::inbound(text),
        Dialect::Messaging => messaging::inbound(text, &mut st.messaging, now_ms),
    }
}

/// The native commands a connection of dialect `d` runs when it opens with an identity (right
/// after its `connected`, or after an in-band `authenticate` gave it one), as if it had sent
/// them: what its clients expect without asking (the messaging service's presence of the
/// users who share a thread with them).
pub fn on_open(d: Dialect) -> Vec<Step> {
    match d {
        Dialect::Messaging => messaging::on_open(),
        Dialect::Native | Dialect::Topic | Dialect::ChatHub => Vec::new(),
    }
}

/// What one native frame becomes for the connections of one dialect.
#[derive(Debug, Default)]
pub struct Encoded {
    /// JSON object texts, one per frame to queue, in order (empty: the dialect has no use
    /// for this event).
    pub frames: Vec<Vec<u8>>,
    /// What the event is about, for per-connection filtering ([`wants`]).
    pub class: Class,
}

/// What a native event is about, as far as a per-connection filter cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Class {
    /// [`topic`]'s topic bits this event belongs to; 0 = always delivered (replies, and
    /// everything addressed to the connection's user that it must not miss).
    pub topics: u8,
    /// The conversation the event belongs to, if any (the topic protocol's
    /// `filters.conversation_id`).
    pub conversation: Option<Box<str>>,
    /// A reply to one connection that settles its send `clientMsgId` (a `message.ack`, or an
    /// error for that send): the frames are completed per connection by [`settle`].
    pub settles: Option<Box<str>>,
}

/// Encode native frame text `native` (a JSON object) for dialect `d`.
///
/// `born_prefix` is the native frame's creation prefix ([`crate::proto::Frame::born_prefix`]):
/// with the bytes it names the event, so an id a dialect derives for it ([`event_id`]) is the
/// same wherever and however often the frame is encoded (on every shard, after a cache miss).
pub fn encode(d: Dialect, native: &[u8], born_prefix: u64) -> Encoded {
    match d {
        Dialect::Native => Encoded {
            frames: vec![native.to_vec()],
            class: Class::default(),
        },
        Dialect::Topic => topic::encode(native, born_prefix),
        Dialect::ChatHub => chat_hub::encode(native),
        Dialect::Messaging => messaging::encode(native),
    }
}

/// The frames a reply whose class [`Class::settles`] send `client_msg_id` becomes for the one
/// connection it is for, given that connection's edge state. None: the shared encoding, as is.
/// Only replies to one connection settle, so this never runs per recipient of a fan-out.
pub fn settle(
    d: Dialect,
    st: &mut EdgeState,
    native: &[u8],
    client_msg_id: &str,
) -> Option<Vec<Vec<u8>>> {
    match d {
        Dialect::Messaging => messaging::settle(&mut st.messaging, native, client_msg_id),
        Dialect::Native | Dialect::Topic | Dialect::ChatHub => None,
    }
}

/// A UUID-shaped id (version 8, RFC 9562's custom layout) for the event of native frame text
/// `native` created at `born_prefix`: a hash of both, so every encode of one frame, on any shard,
/// gives every recipient the same id, and two events differ.
pub fn event_id(native: &[u8], born_prefix: u64) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u64| {
        // DefaultHasher::new() has fixed keys: the same in every shard of the process.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        born_prefix.hash(&mut h);
        native.hash(&mut h);
        h.finish()
    };
    let raw = (u128::from(half(0x5b_d1)) << 64) | u128::from(half(0x7e_a3));
    // Version 8 and the RFC 4122 variant.
    (raw & !(0xf << 76) & !(0x3 << 62)) | (0x8 << 76) | (0x2 << 62)
}

/// Whether a connection of dialect `d` with edge state `st` (None: it has none) takes an event
/// of class `class`.
#[inline]
pub fn wants(d: Dialect, st: Option<&EdgeState>, class: &Class) -> bool {
    if class.topics == 0 {
        return true;
    }
    match d {
        Dialect::Native | Dialect::ChatHub | Dialect::Messaging => true,
        Dialect::Topic => st.is_some_and(|s| s.topic.wants(class)),
    }
}

/// The parts of a native server frame every dialect looks at. `data` and `id` stay raw.
#[derive(Deserialize, Default)]
pub struct NativeFrame<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub id: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    pub room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<LazyValue<'a>>,
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub client_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub timestamp: Option<u64>,
}

/// Parse a native server frame (built by this server, so failure means a bug; the caller
/// passes such a frame through untranslated rather than dropping it).
pub fn parse_native(native: &[u8]) -> Option<NativeFrame<'_>> {
    sonic_rs::from_slice(native).ok()
}

/// Write user or message id `id` as the old services' clients expect it: a JSON number when
/// it is a plain decimal integer a JavaScript client reads exactly (no sign, no leading zero,
/// at most 2^53 - 1), a JSON string otherwise.
pub fn write_id(out: &mut Vec<u8>, id: &str) {
    if numeric_id(id).is_some() {
        out.extend_from_slice(id.as_bytes());
    } else {
        crate::proto::json::write_str(out, id);
    }
}

/// `id` as a number, when [`write_id`] writes it as one.
pub fn numeric_id(id: &str) -> Option<u64> {
    const JS_SAFE_MAX: u64 = (1 << 53) - 1;
    let b = id.as_bytes();
    if b.is_empty() || b.len() > 16 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 1 && b[0] == b'0' {
        return None;
    }
    id.parse::<u64>().ok().filter(|&n| n <= JS_SAFE_MAX)
}

/// An id a dialect client sent as a JSON string or number, as the native string id.
pub fn id_text(v: &LazyValue<'_>) -> Option<String> {
    use sonic_rs::JsonValueTrait;
    if v.is_str() {
        v.as_str().map(str::to_owned)
    } else if v.is_number() {
        let raw = v.as_raw_str();
        raw.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| raw.to_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_dialects_parse() {
        assert_eq!(PathDialect::parse("auto"), Some(PathDialect::Auto));
        assert_eq!(
            PathDialect::parse("topic"),
            Some(PathDialect::Fixed(Dialect::Topic))
        );
        assert_eq!(PathDialect::parse("Topic"), None);
        for &d in Dialect::ALL {
            assert_eq!(Dialect::from_byte(d as u8), d);
            assert_eq!(Dialect::from_byte(d as u8 | UNDECIDED), d);
            assert!(PATH_DIALECT_NAMES.contains(d.name()));
        }
    }

    #[test]
    fn detection_needs_a_payload_member() {
        assert_eq!(
            detect(br#"{"id":"m1","type":"ping","payload":{}}"#),
            Dialect::Topic
        );
        assert_eq!(detect(br#"{"type":"ping","payload":null}"#), Dialect::Topic);
        assert_eq!(
            detect(br#"{"type":"subscribe","room":"chat"}"#),
            Dialect::Native
        );
        assert_eq!(detect(b"not json"), Dialect::Native);
        assert_eq!(detect(b"[1,2]"), Dialect::Native);
    }

    #[test]
    fn ids_numeric_only_when_exact() {
        let w = |s: &str| {
            let mut v = Vec::new();
            write_id(&mut v, s);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(w("6"), "6");
        assert_eq!(w("9007199254740991"), "9007199254740991");
        assert_eq!(w("9007199254740992"), "\"9007199254740992\"");
        assert_eq!(w("007"), "\"007\"");
        assert_eq!(w("0"), "0");
        assert_eq!(w("-1"), "\"-1\"");
        assert_eq!(w("alice"), "\"alice\"");
        assert_eq!(w(""), "\"\"");
    }
}
