//! Native commands addressed to a stored conversation (a thread of the message store) rather
//! than to a user, over real sockets, senders and recipients on different shards:
//! `typing.start` / `typing.stop {conversationId}` to every participant's devices (renewals
//! coalesced, the TTL stop, the stop on disconnect), `mark.read` / `mark.delivered
//! {conversationId}` and `mark.read {messageIds}` alone (one event per conversation),
//! `conversationNumericId` in `message.create`, `message.ack` and `sync` replays, and
//! `presence.watch {scope: "conversations"}`; every error with the command's `id`.
//!
//! Every test body runs twice, against the in-memory store and against PostgreSQL (a
//! throwaway cluster the test starts, see `common::pg`).

#[macro_use]
mod common;

use common::{Client, TestServer};
use serde_json::{json, Value};

both_stores!(
    typing_reaches_every_participant_but_the_sender,
    typing_ends_by_ttl_and_disconnect,
    typing_errors_come_back_with_the_id,
    receipts_to_a_conversation_reach_its_participants_and_are_recorded,
    receipts_naming_only_messages_find_their_conversations,
    numeric_conversation_ids_in_acks_creates_and_sync,
    watching_the_people_you_share_a_conversation_with,
    the_conversation_watch_stops_at_the_watch_list_limit,
);

fn start(env: &[(&str, &str)], extra: &[(&'static str, &'static str)]) -> TestServer {
    let mut all: Vec<(&str, &str)> = env.to_vec();
    all.push(("SWITCHBOARD_EXPOSE_SHARD", "true"));
    all.extend_from_slice(extra);
    let s = TestServer::start(&all);
    s.wait_ready();
    s
}

fn on(s: &TestServer, user: &str, shard: u64) -> Client {
    s.connect_on_shard(&format!("/ws?user_id={user}"), shard)
}

/// `(status, body)` of one REST request as `user` (auth mode none: `X-User-Id`).
fn rest(s: &TestServer, method: &str, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
    common::http_json(
        s,
        method,
        path,
        &[("X-User-Id", user)],
        body.as_ref(),
        false,
    )
}

/// A group thread `creator` + `others` over REST: `(text id, numeric id)`.
fn group(s: &TestServer, creator: &str, others: &[&str]) -> (String, u64) {
    let (st, t) = rest(
        s,
        "POST",
        "/api/v1/messages/threads",
        creator,
        Some(json!({"participants": others})),
    );
    assert_eq!(st, 201, "{t}");
    (
        t["id"].as_str().unwrap().to_owned(),
        t["numericId"].as_u64().unwrap(),
    )
}

/// Send into thread `conv` (no `to`) and return the ack's data.
fn post(c: &mut Client, cmid: &str, conv: &str, content: &str) -> Value {
    c.send_json(json!({"type": "message.send", "clientMsgId": cmid,
        "conversationId": conv, "content": content}));
    let ack = c.expect_type("message.ack");
    assert_eq!(ack["data"]["clientMsgId"], cmid, "{ack}");
    ack["data"].clone()
}

fn typing_event(v: &Value, kind: &str, user: &str, conv: &str, n: u64) {
    assert_eq!(
        *v,
        json!({"type": kind, "data": {"user_id": user, "conversationId": conv,
            "conversationNumericId": n}, "timestamp": v["timestamp"]}),
        "{v}"
    );
    assert!(v["timestamp"].as_u64().is_some(), "{v}");
}

fn receipt_event(v: &Value, kind: &str, conv: &str, n: u64, ids: Value, by: &str) {
    assert_eq!(
        *v,
        json!({"type": kind, "data": {"conversationId": conv, "conversationNumericId": n,
            "messageIds": ids, "by": by, "at": v["data"]["at"]}, "timestamp": v["timestamp"]}),
        "{v}"
    );
    let at = v["data"]["at"].as_str().expect("at is a string");
    assert!(common::parse_rfc3339_ms(at).is_some(), "{v}");
}

fn silent(clients: &mut [&mut Client]) {
    for c in clients {
        c.expect_silence(200);
    }
}

fn typing_reaches_every_participant_but_the_sender(env: &[(&str, &str)]) {
    let s = start(env, &[]);
    let (conv, n) = group(&s, "alice", &["bob", "carol"]);
    let mut alice0 = on(&s, "alice", 0);
    let mut alice1 = on(&s, "alice", 1);
    let mut bob = on(&s, "bob", 1);
    let mut carol = on(&s, "carol", 0);
    let mut dave = on(&s, "dave", 1);

    alice0.send_json(json!({"type": "typing.start", "conversationId": conv, "id": 1}));
    for c in [&mut bob, &mut carol, &mut alice1] {
        typing_event(&c.recv_json(), "typing.start", "alice", &conv, n);
    }
    // A renewal inside the TTL sends nothing to anybody; the sender never gets its own.
    alice0.send_json(json!({"type": "typing.start", "conversationId": conv, "id": 2}));
    silent(&mut [&mut alice0, &mut alice1, &mut bob, &mut carol, &mut dave]);
    alice0.send_json(json!({"type": "typing.stop", "conversationId": conv, "id": 3}));
    for c in [&mut bob, &mut carol, &mut alice1] {
        typing_event(&c.recv_json(), "typing.stop", "alice", &conv, n);
    }
    // A stop with no state sends nothing.
    alice0.send_json(json!({"type": "typing.stop", "conversationId": conv, "id": 4}));
    silent(&mut [&mut alice0, &mut bob]);

    // By numeric id (as a string of digits): the events name the thread by its text id.
    bob.send_json(json!({"type": "typing.start", "conversationId": n.to_string()}));
    for c in [&mut alice0, &mut alice1, &mut carol] {
        typing_event(&c.recv_json(), "typing.start", "bob", &conv, n);
    }
    bob.send_json(json!({"type": "typing.stop", "conversationId": n.to_string()}));
    for c in [&mut alice0, &mut alice1, &mut carol] {
        typing_event(&c.recv_json(), "typing.stop", "bob", &conv, n);
    }
    silent(&mut [&mut bob, &mut dave]);

    // A start and a stop sent back to back, before the bridge knows the thread: in order.
    let (fresh, fresh_n) = group(&s, "carol", &["bob", "alice"]);
    for _ in 0..3 {
        carol.send_json(json!({"type": "typing.start", "conversationId": fresh}));
        carol.send_json(json!({"type": "typing.stop", "conversationId": fresh}));
    }
    for c in [&mut bob, &mut alice0, &mut alice1] {
        for _ in 0..3 {
            typing_event(&c.recv_json(), "typing.start", "carol", &fresh, fresh_n);
            typing_event(&c.recv_json(), "typing.stop", "carol", &fresh, fresh_n);
        }
    }

    // A direct thread made by a DM is a stored conversation too.
    let ack = {
        carol.send_json(
            json!({"type": "message.send", "clientMsgId": "d1", "to": "dave",
            "content": "hi"}),
        );
        carol.expect_type("message.ack")["data"].clone()
    };
    dave.expect_type("message.create");
    let dm = ack["conversationId"].as_str().unwrap().to_owned();
    let dm_n = ack["conversationNumericId"].as_u64().unwrap();
    dave.send_json(json!({"type": "typing.start", "conversationId": dm}));
    typing_event(&carol.recv_json(), "typing.start", "dave", &dm, dm_n);
    silent(&mut [&mut dave, &mut alice0, &mut bob]);
}

fn typing_ends_by_ttl_and_disconnect(env: &[(&str, &str)]) {
    let s = start(env, &[("SWITCHBOARD_TYPING_TTL", "1s")]);
    let (conv, n) = group(&s, "alice", &["bob"]);
    let mut alice = on(&s, "alice", 0);
    let mut bob = on(&s, "bob", 1);
    alice.send_json(json!({"type": "typing.start", "conversationId": conv}));
    typing_event(&bob.recv_json(), "typing.start", "alice", &conv, n);
    // Not renewed: the server sends the stop after typing_ttl.
    let stop = bob.recv_json();
    typing_event(&stop, "typing.stop", "alice", &conv, n);
    // A disconnect ends the state with a stop.
    alice.send_json(json!({"type": "typing.start", "conversationId": conv}));
    typing_event(&bob.recv_json(), "typing.start", "alice", &conv, n);
    alice.close_and_wait();
    typing_event(&bob.recv_json(), "typing.stop", "alice", &conv, n);
}

fn typing_errors_come_back_with_the_id(env: &[(&str, &str)]) {
    let s = start(env, &[]);
    let (conv, n) = group(&s, "alice", &["bob"]);
    let mut bob = on(&s, "bob", 1);
    let mut dave = on(&s, "dave", 0);
    let mut anon = s.connect_on_shard("/ws", 0);
    let long = "x".repeat(257);
    for kind in ["typing.start", "typing.stop"] {
        anon.send_json(json!({"type": kind, "conversationId": conv, "id": "a"}));
        assert_eq!(anon.expect_error("not allowed")["id"], "a");
        dave.send_json(json!({"type": kind, "conversationId": long, "id": "l"}));
        assert_eq!(dave.expect_error("conversationId too long")["id"], "l");
        dave.send_json(json!({"type": kind, "conversationId": 5, "id": "j"}));
        assert_eq!(dave.expect_error("invalid JSON format")["id"], "j");
        dave.send_json(json!({"type": kind, "conversationId": "", "id": "e"}));
        let e = dave.expect_error("room, to or conversationId is required");
        assert_eq!(e["id"], "e");
    }
    // Refusals of a start: the state is dropped, so each start is refused again.
    for i in 0..2 {
        dave.send_json(json!({"type": "typing.start", "conversationId": conv, "id": i}));
        let e = dave.expect_error("not a participant of this conversation");
        assert_eq!(e["id"], i, "{e}");
        dave.send_json(
            json!({"type": "typing.start", "conversationId": n.to_string(),
            "id": "n"}),
        );
        assert_eq!(
            dave.expect_error("not a participant of this conversation")["id"],
            "n"
        );
        dave.send_json(
            json!({"type": "typing.start", "conversationId": "no-such-thread",
            "id": "x"}),
        );
        assert_eq!(dave.expect_error("conversation not found")["id"], "x");
        dave.send_json(
            json!({"type": "typing.start", "conversationId": "987654321",
            "id": "y"}),
        );
        assert_eq!(dave.expect_error("conversation not found")["id"], "y");
    }
    // A stop without a state is not checked and sends nothing.
    dave.send_json(json!({"type": "typing.stop", "conversationId": conv, "id": "s"}));
    silent(&mut [&mut dave, &mut bob]);
    // An exact refusal frame.
    dave.send_json(json!({"type": "typing.start", "conversationId": conv, "id": 9}));
    let e = dave.recv_json();
    assert_eq!(
        e,
        json!({"type": "error", "id": 9, "error": "not a participant of this conversation",
            "timestamp": e["timestamp"]})
    );
}

fn receipts_to_a_conversation_reach_its_participants_and_are_recorded(env: &[(&str, &str)]) {
    let s = start(env, &[]);
    let (conv, n) = group(&s, "alice", &["bob", "carol"]);
    let mut alice0 = on(&s, "alice", 0);
    let mut alice1 = on(&s, "alice", 1);
    let mut bob0 = on(&s, "bob", 0);
    let mut bob1 = on(&s, "bob", 1);
    let mut carol = on(&s, "carol", 1);
    let mut dave = on(&s, "dave", 0);
    let m1 = post(&mut alice0, "g1", &conv, "one");
    let m2 = post(&mut alice0, "g2", &conv, "two");
    for c in [&mut alice1, &mut bob0, &mut bob1, &mut carol] {
        c.expect_type("message.create");
        c.expect_type("message.create");
    }
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{conv}"),
        "bob",
        None,
    );
    assert_eq!((st, &v["unreadCount"]), (200, &json!(2)), "{v}");

    for (kind, event) in [
        ("mark.delivered", "message.delivered"),
        ("mark.read", "message.read"),
    ] {
        let ids = json!([m1["serverMsgId"], m2["cursor"], "client-own-id"]);
        bob0.send_json(
            json!({"type": kind, "conversationId": conv, "messageIds": ids,
            "id": "r"}),
        );
        for c in [&mut alice0, &mut alice1, &mut bob1, &mut carol] {
            receipt_event(&c.recv_json(), event, &conv, n, ids.clone(), "bob");
        }
        silent(&mut [&mut bob0, &mut dave]);
    }
    // Recorded: bob has read both.
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{conv}"),
        "bob",
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["readSeq"], &v["unreadCount"]),
        (&json!(2), &json!(0)),
        "{v}"
    );
    // By numeric id.
    carol.send_json(json!({"type": "mark.read", "conversationId": n.to_string(),
        "messageIds": [m1["cursor"]]}));
    for c in [&mut alice0, &mut alice1, &mut bob0, &mut bob1] {
        receipt_event(
            &c.recv_json(),
            "message.read",
            &conv,
            n,
            json!([m1["cursor"]]),
            "carol",
        );
    }

    // Errors, with the command's id.
    let long = "x".repeat(257);
    for kind in ["mark.read", "mark.delivered"] {
        dave.send_json(
            json!({"type": kind, "conversationId": conv, "messageIds": [1],
            "id": 1}),
        );
        let e = dave.expect_error("not a participant of this conversation");
        assert_eq!(e["id"], 1);
        dave.send_json(
            json!({"type": kind, "conversationId": "no-such", "messageIds": [1],
            "id": 2}),
        );
        assert_eq!(dave.expect_error("conversation not found")["id"], 2);
        dave.send_json(
            json!({"type": kind, "conversationId": long, "messageIds": [1],
            "id": 3}),
        );
        assert_eq!(dave.expect_error("conversationId too long")["id"], 3);
        dave.send_json(json!({"type": kind, "conversationId": conv, "id": 4}));
        assert_eq!(dave.expect_error("messageIds is required")["id"], 4);
    }
    silent(&mut [&mut alice0, &mut bob0, &mut carol]);
}

fn receipts_naming_only_messages_find_their_conversations(env: &[(&str, &str)]) {
    let s = start(env, &[]);
    let (conv, n) = group(&s, "alice", &["bob", "carol"]);
    let mut alice0 = on(&s, "alice", 0);
    let mut alice1 = on(&s, "alice", 1);
    let mut bob0 = on(&s, "bob", 0);
    let mut bob1 = on(&s, "bob", 1);
    let mut carol = on(&s, "carol", 1);
    let mut dave = on(&s, "dave", 0);
    let g = post(&mut alice0, "g1", &conv, "group");
    for c in [&mut alice1, &mut bob0, &mut bob1, &mut carol] {
        c.expect_type("message.create");
    }
    alice0.send_json(
        json!({"type": "message.send", "clientMsgId": "d1", "to": "bob",
        "content": "direct"}),
    );
    let d = alice0.expect_type("message.ack")["data"].clone();
    for c in [&mut alice1, &mut bob0, &mut bob1] {
        c.expect_type("message.create");
    }
    let dm = d["conversationId"].as_str().unwrap().to_owned();
    let dm_n = d["conversationNumericId"].as_u64().unwrap();

    // One id: its conversation's participants get the receipt (the chat hub's mark_read).
    carol.send_json(json!({"type": "mark.read", "messageIds": [g["cursor"]], "id": 1}));
    for c in [&mut alice0, &mut alice1, &mut bob0, &mut bob1] {
        receipt_event(
            &c.recv_json(),
            "message.read",
            &conv,
            n,
            json!([g["cursor"]]),
            "carol",
        );
    }
    silent(&mut [&mut carol]);
    // Ids of two conversations: one event per conversation, each with its own ids.
    bob0.send_json(json!({"type": "mark.read",
        "messageIds": [g["serverMsgId"], d["cursor"], 987654321], "id": 2}));
    let first = [g["serverMsgId"].clone()];
    for c in [&mut alice0, &mut alice1, &mut bob1, &mut carol] {
        receipt_event(
            &c.recv_json(),
            "message.read",
            &conv,
            n,
            json!(first),
            "bob",
        );
    }
    for c in [&mut alice0, &mut alice1, &mut bob1] {
        receipt_event(
            &c.recv_json(),
            "message.read",
            &dm,
            dm_n,
            json!([d["cursor"]]),
            "bob",
        );
    }
    silent(&mut [&mut bob0, &mut carol, &mut dave]);
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{dm}"),
        "bob",
        None,
    );
    assert_eq!((st, &v["unreadCount"]), (200, &json!(0)), "{v}");
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{conv}"),
        "bob",
        None,
    );
    assert_eq!((st, &v["unreadCount"]), (200, &json!(0)), "{v}");

    // Errors, with the command's id.
    dave.send_json(json!({"type": "mark.read", "messageIds": [g["cursor"]], "id": 3}));
    assert_eq!(
        dave.expect_error("not a participant of this conversation")["id"],
        3
    );
    dave.send_json(json!({"type": "mark.read", "messageIds": [987654321, "m-1"], "id": 4}));
    assert_eq!(dave.expect_error("message not found")["id"], 4);
    let many: Vec<u64> = (1..=101).collect();
    dave.send_json(json!({"type": "mark.read", "messageIds": many, "id": 5}));
    assert_eq!(dave.expect_error("too many messageIds")["id"], 5);
    dave.send_json(json!({"type": "mark.delivered", "id": 6}));
    assert_eq!(dave.expect_error("messageIds is required")["id"], 6);
    silent(&mut [&mut alice0, &mut bob0, &mut carol]);
}

fn numeric_conversation_ids_in_acks_creates_and_sync(env: &[(&str, &str)]) {
    let s = start(env, &[]);
    let (conv, n) = group(&s, "alice", &["bob", "carol"]);
    let mut alice = on(&s, "alice", 0);
    let mut bob = on(&s, "bob", 1);
    let ack = post(&mut alice, "g1", &conv, "hello");
    assert_eq!(ack["conversationNumericId"], n, "{ack}");
    let m = bob.expect_type("message.create");
    assert_eq!(m["data"]["conversationId"], conv.as_str(), "{m}");
    assert_eq!(m["data"]["conversationNumericId"], n, "{m}");
    // A DM's thread: the same number in the ack, every device's create and REST.
    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "d1", "to": "bob",
        "content": "dm"}),
    );
    let dack = alice.expect_type("message.ack")["data"].clone();
    let dn = dack["conversationNumericId"].as_u64().expect("a number");
    assert_ne!(dn, n);
    assert_eq!(
        bob.expect_type("message.create")["data"]["conversationNumericId"],
        dn
    );
    let (st, v) = rest(
        &s,
        "GET",
        &format!(
            "/api/v1/messages/threads/{}",
            dack["conversationId"].as_str().unwrap()
        ),
        "bob",
        None,
    );
    assert_eq!((st, &v["numericId"]), (200, &json!(dn)), "{v}");
    // Sync replays carry it too, the same frame data as live.
    let mut bob2 = on(&s, "bob", 0);
    bob2.send_json(json!({"type": "sync", "since": 0, "id": 7}));
    let r1 = bob2.expect_type("message.create");
    let r2 = bob2.expect_type("message.create");
    assert_eq!(r1["data"]["conversationNumericId"], n, "{r1}");
    assert_eq!(r2["data"]["conversationNumericId"], dn, "{r2}");
    assert_eq!(r1["data"]["serverMsgId"], ack["serverMsgId"]);
    assert_eq!(bob2.expect_type("sync.done")["id"], 7);
}

/// `presence.watch {scope: "conversations"}` and its `presence.state` users.
fn watch_conversations(c: &mut Client, id: u64) -> Value {
    c.send_json(json!({"type": "presence.watch", "scope": "conversations", "id": id}));
    let st = c.expect_type("presence.state");
    assert_eq!(st["id"], id, "{st}");
    st
}

fn offline(user: &str) -> Value {
    json!({"user_id": user, "status": "offline", "text": null, "devices": 0, "last_seen": null})
}

fn online(user: &str, devices: u64) -> Value {
    json!({"user_id": user, "status": "online", "text": null, "devices": devices,
        "last_seen": null})
}

fn watching_the_people_you_share_a_conversation_with(env: &[(&str, &str)]) {
    let s = start(env, &[]);
    group(&s, "alice", &["bob", "carol"]);
    let mut alice = on(&s, "alice", 0);
    let mut bob = on(&s, "bob", 1);
    // A more recent thread (a DM to erin): its people come first.
    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "d1", "to": "erin",
        "content": "hi"}),
    );
    alice.expect_type("message.ack");

    let st = watch_conversations(&mut alice, 1);
    assert_eq!(
        st,
        json!({"type": "presence.state", "id": 1, "data": {"users": [
            offline("erin"), online("bob", 1), offline("carol")], "truncated": false},
            "timestamp": st["timestamp"]})
    );
    // Watched: carol coming online reaches alice (on the other shard).
    let mut carol = on(&s, "carol", 1);
    let e = alice.expect_type("presence.online");
    assert_eq!(e["data"]["user_id"], "carol", "{e}");
    // Asking again re-reads the store (a thread made since is included) and is idempotent.
    group(&s, "dave", &["alice"]);
    let st = watch_conversations(&mut alice, 2);
    let users: Vec<&Value> = st["data"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| &u["user_id"])
        .collect();
    assert_eq!(users, ["dave", "erin", "bob", "carol"], "{st}");
    // Somebody sharing nothing watches nobody.
    let mut frank = on(&s, "frank", 1);
    let st = watch_conversations(&mut frank, 3);
    assert_eq!(st["data"], json!({"users": [], "truncated": false}), "{st}");

    // Errors, with the command's id.
    carol.send_json(json!({"type": "presence.watch", "scope": "rooms", "id": 4}));
    assert_eq!(carol.expect_error("scope must be conversations")["id"], 4);
    carol.send_json(json!({"type": "presence.watch", "scope": "conversations",
        "user_ids": ["bob"], "id": 5}));
    assert_eq!(
        carol.expect_error("give user_ids or scope, not both")["id"],
        5
    );
    carol.send_json(json!({"type": "presence.watch", "scope": 1, "id": 6}));
    assert_eq!(carol.expect_error("invalid JSON format")["id"], 6);
    let mut anon = s.connect_on_shard("/ws", 0);
    anon.send_json(json!({"type": "presence.watch", "scope": "conversations", "id": 7}));
    assert_eq!(anon.expect_error("not allowed")["id"], 7);
    bob.expect_silence(100);
}

fn the_conversation_watch_stops_at_the_watch_list_limit(env: &[(&str, &str)]) {
    let s = start(
        env,
        &[("SWITCHBOARD_MAX_WATCHED_USERS_PER_CONNECTION", "2")],
    );
    group(&s, "alice", &["bob", "carol", "erin"]);
    let mut alice = on(&s, "alice", 0);
    let st = watch_conversations(&mut alice, 1);
    assert_eq!(
        st["data"],
        json!({"users": [offline("bob"), offline("carol")], "truncated": true}),
        "{st}"
    );
    // A watch list with one user already: room for one more.
    let mut alice1 = on(&s, "alice", 1);
    alice1.send_json(json!({"type": "presence.watch", "user_ids": ["zed"], "id": 2}));
    alice1.expect_type("presence.state");
    let st = watch_conversations(&mut alice1, 3);
    assert_eq!(
        st["data"],
        json!({"users": [offline("bob")], "truncated": true}),
        "{st}"
    );
    // Watched users the list holds already count once.
    let st = watch_conversations(&mut alice, 4);
    assert_eq!(
        st["data"],
        json!({"users": [offline("bob"), offline("carol")], "truncated": true}),
        "{st}"
    );
}
