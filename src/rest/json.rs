//! The REST API's JSON shapes (docs/API.md), written with the frame writer
//! ([`crate::proto::envelope::Obj`]) straight into the response body: no intermediate value.
//!
//! Names are camelCase, as the replaced service's API was. Where a field exists in the
//! WebSocket's `message.create` too, the value is the same (`serverMsgId` the same UUID text,
//! `sentAt` the same RFC 3339 form); only the names of three differ (`threadId` is
//! `conversationId`, `senderId` is `from`, `recipientId` is `to`), because a thread is not
//! always a two-person conversation.

use crate::proto::envelope::{write_object, Arr, Obj};
use crate::proto::json::rfc3339_ms;
use crate::shard::service::presence::state::View;
use crate::store::{Message, Notification, ThreadView};

/// A stored message:
/// `{id, serverMsgId, threadId, threadNumericId, seq, senderId, recipientId, clientMsgId,
/// content, attachmentUrl, sentAt, cursor}`. `id` is the numeric id (and sync cursor; `cursor`
/// repeats it under the name `sync` uses); `recipientId`, `clientMsgId` and `attachmentUrl`
/// are `null` when absent.
pub fn message(o: &mut Obj, m: &Message) {
    o.u64("id", m.id)
        .uuid("serverMsgId", m.server_msg_id)
        .str("threadId", &m.thread)
        .u64("threadNumericId", m.thread_numeric_id)
        .u64("seq", m.seq)
        .str("senderId", &m.sender)
        .opt_str("recipientId", m.to.as_deref())
        .opt_str("clientMsgId", m.client_msg_id.as_deref())
        .str("content", &m.content)
        .opt_str("attachmentUrl", m.attachment_url.as_deref())
        .str("sentAt", &rfc3339_ms(m.sent_at_ms))
        .u64("cursor", m.id);
}

/// A thread as the requesting user sees it:
/// `{id, numericId, kind, title, participants, createdAt, lastMessage, lastSeq, readSeq,
/// unreadCount}`. `lastMessage` is a [`message`] or `null`; `unreadCount` stops at
/// [`crate::store::UNREAD_COUNT_MAX`].
pub fn thread(o: &mut Obj, t: &ThreadView) {
    o.str("id", &t.id)
        .u64("numericId", t.numeric_id)
        .str("kind", t.kind.as_str())
        .opt_str("title", t.title.as_deref())
        .arr("participants", |a| {
            for p in &t.participants {
                a.str(p);
            }
        })
        .str("createdAt", &rfc3339_ms(t.created_at_ms));
    match &t.last_message {
        Some(m) => o.obj("lastMessage", |o| message(o, m)),
        None => o.null("lastMessage"),
    };
    o.u64("lastSeq", t.last_seq)
        .u64("readSeq", t.read_seq)
        .u64("unreadCount", t.unread);
}

/// `{id, kind, data, read, createdAt}`; `data` is the stored JSON object as it was stored.
pub fn notification(o: &mut Obj, n: &Notification) {
    o.u64("id", n.id)
        .str("kind", &n.kind)
        .raw("data", &n.data_json)
        .bool("read", n.read)
        .str("createdAt", &rfc3339_ms(n.created_at_ms));
}

/// One user's presence: `{userId, status, isOnline, text, devices, lastSeen}` (the
/// WebSocket's `presence.state` entry, camelCase, plus `isOnline` as the replaced service
/// had it: true for `online`, `away` and `busy`).
pub fn presence(o: &mut Obj, user: &str, v: &View<'_>) {
    o.str("userId", user)
        .str("status", v.status)
        .bool("isOnline", matches!(v.status, "online" | "away" | "busy"))
        .opt_str("text", v.text)
        .u64("devices", u64::from(v.devices));
    if v.last_seen_ms > 0 {
        o.str("lastSeen", &rfc3339_ms(v.last_seen_ms));
    } else {
        o.null("lastSeen");
    }
}

/// A whole body holding one object written by `f`.
pub fn body(f: impl FnOnce(&mut Obj)) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_object(&mut out, f);
    out
}

/// A page body `{"<key>":[...],"next":<next or null>}`, the elements written by `each`.
pub fn page<T>(
    key: &str,
    items: &[T],
    next: impl FnOnce(&mut Obj),
    mut each: impl FnMut(&mut Obj, &T),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + items.len() * 256);
    write_object(&mut out, |o| {
        o.arr(key, |a: &mut Arr| {
            for item in items {
                a.obj(|o| each(o, item));
            }
        });
        next(o);
    });
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::store::ThreadKind;

    pub(crate) fn msg(id: u64, seq: u64) -> Message {
        Message {
            id,
            seq,
            thread: Arc::from("t-1"),
            thread_numeric_id: 3,
            server_msg_id: 0x0190_0000_0000_7000_8000_0000_0000_0001,
            event_id: 9,
            sender: Arc::from("alice"),
            to: Some(Arc::from("bob")),
            client_msg_id: Some(Arc::from("c-1")),
            content: Arc::from("hi \"bob\""),
            attachment_url: None,
            sent_at_ms: 1_795_323_933_353,
        }
    }

    fn parse(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn message_shape() {
        let v = parse(&body(|o| message(o, &msg(42, 2))));
        assert_eq!(
            v,
            json!({"id": 42, "serverMsgId": "01900000-0000-7000-8000-000000000001",
                "threadId": "t-1", "threadNumericId": 3, "seq": 2, "senderId": "alice",
                "recipientId": "bob", "clientMsgId": "c-1", "content": "hi \"bob\"",
                "attachmentUrl": null, "sentAt": "2026-11-22T05:05:33.353Z", "cursor": 42})
        );
    }

    #[test]
    fn thread_shape_with_and_without_a_last_message() {
        let mut t = ThreadView {
            id: Arc::from("t-1"),
            numeric_id: 3,
            kind: ThreadKind::Group,
            title: Some(Arc::from("team")),
            participants: vec![Arc::from("alice"), Arc::from("bob")],
            created_at_ms: 1_795_323_933_000,
            last_seq: 2,
            last_message: Some(msg(42, 2)),
            read_seq: 1,
            unread: 1,
        };
        let v = parse(&body(|o| thread(o, &t)));
        assert_eq!(v["lastMessage"]["id"], 42);
        assert_eq!(v["participants"], json!(["alice", "bob"]));
        assert_eq!(v["createdAt"], "2026-11-22T05:05:33.000Z");
        assert_eq!(
            (v["kind"].as_str(), v["title"].as_str()),
            (Some("group"), Some("team"))
        );
        assert_eq!(
            (&v["lastSeq"], &v["readSeq"], &v["unreadCount"]),
            (&json!(2), &json!(1), &json!(1))
        );
        t.last_message = None;
        t.title = None;
        let v = parse(&body(|o| thread(o, &t)));
        assert!(v["lastMessage"].is_null() && v["title"].is_null());
        assert_eq!(v["numericId"], 3);
    }

    #[test]
    fn notification_and_page_shapes() {
        let n = Notification {
            id: 5,
            user: Arc::from("alice"),
            kind: Arc::from("jobs.posted"),
            data_json: Arc::from(r#"{"jobId":7,"title":"Logo"}"#),
            source_key: None,
            created_at_ms: 0,
            read: false,
        };
        let b = page(
            "notifications",
            &[n.clone(), n],
            |o| {
                o.opt_u64("next", Some(5));
            },
            notification,
        );
        let v = parse(&b);
        assert_eq!(
            v["notifications"][1]["data"],
            json!({"jobId": 7, "title": "Logo"})
        );
        assert_eq!(v["notifications"][0]["read"], false);
        assert_eq!(
            v["notifications"][0]["createdAt"],
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(v["next"], 5);
        let empty: [Notification; 0] = [];
        let v = parse(&page(
            "notifications",
            &empty,
            |o| {
                o.opt_u64("next", None);
            },
            notification,
        ));
        assert_eq!(v, json!({"notifications": [], "next": null}));
    }
}
