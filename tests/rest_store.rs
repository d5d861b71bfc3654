//! The messaging REST API end to end, through the bridge and the message store, with real
//! sockets: a DM is stored, listed over REST, marked read over REST, and the sender's devices
//! see `message.read`; group threads created over REST and written to from the socket; paging
//! edges; who may see what; notifications from the server API listed and marked read.
//!
//! Every body runs against the in-memory store and against PostgreSQL (`common::pg`).

#[macro_use]
mod common;

use common::{Client, TestServer};
use serde_json::{json, Value};
use switchboard::shard::service::dm::derive_conversation_id;

const KEY: &str = "api-key-rs";

both_stores!(
    a_dm_is_listed_marked_read_over_rest_and_the_sender_sees_it,
    group_threads_over_rest_and_the_socket,
    messages_and_threads_page_without_gaps_or_repeats,
    nobody_sees_anothers_threads,
    notifications_from_the_server_api_are_listed_and_marked_read,
    nobody_can_squat_another_pairs_conversation,
    numeric_ids_cannot_be_shadowed,
    a_thread_of_two_over_rest_is_their_conversation,
    nul_text_is_refused,
);

fn start(env: &[(&str, &str)]) -> TestServer {
    let mut all: Vec<(&str, &str)> = env.to_vec();
    all.push(("SWITCHBOARD_API_KEY", KEY));
    let s = TestServer::start(&all);
    s.wait_ready();
    s
}

/// `(status, body)` of one request as `user` (auth mode none: `X-User-Id`).
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

fn api_post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    common::http_json(s, "POST", path, &[("X-API-Key", KEY)], Some(&body), true)
}

fn send(c: &mut Client, cmid: &str, to: &str, content: &str) -> Value {
    c.send_json(json!({"type": "message.send", "clientMsgId": cmid, "to": to, "content": content}));
    c.expect_type("message.ack")["data"].clone()
}

fn a_dm_is_listed_marked_read_over_rest_and_the_sender_sees_it(env: &[(&str, &str)]) {
    let s = start(env);
    let mut alice = s.connect("/ws?user_id=alice");
    let mut alice2 = s.connect("/ws?user_id=alice");
    let mut bob = s.connect("/ws?user_id=bob");
    let a1 = send(&mut alice, "d-1", "bob", "first");
    let a2 = send(&mut alice, "d-2", "bob", "second");
    for c in [&mut alice2, &mut bob] {
        c.expect_type("message.create");
        c.expect_type("message.create");
    }
    let conv = a1["conversationId"].as_str().unwrap();

    // Bob's thread list: one thread, two unread, the last message.
    let (st, v) = rest(&s, "GET", "/api/v1/messages/threads", "bob", None);
    assert_eq!(st, 200, "{v}");
    let threads = v["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 1, "{v}");
    assert_eq!(threads[0]["id"], conv);
    assert_eq!(threads[0]["unreadCount"], 2);
    assert_eq!(threads[0]["lastMessage"]["serverMsgId"], a2["serverMsgId"]);
    assert_eq!(v["next"], Value::Null);

    // The messages, newest first, with the socket's ids.
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{conv}/messages"),
        "bob",
        None,
    );
    assert_eq!(st, 200, "{v}");
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["serverMsgId"], a2["serverMsgId"]);
    assert_eq!(msgs[0]["content"], "second");
    assert_eq!(msgs[1]["serverMsgId"], a1["serverMsgId"]);
    assert_eq!(msgs[1]["cursor"], a1["cursor"]);
    assert_eq!(msgs[1]["senderId"], "alice");

    // Bob marks the second read over REST: alice's devices see message.read; bob's count is 0.
    let sid = a2["serverMsgId"].as_str().unwrap();
    let (st, v) = rest(
        &s,
        "PUT",
        &format!("/api/v1/messages/{sid}/read"),
        "bob",
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["unreadCount"], 0, "{v}");
    assert_eq!(v["readSeq"], 2);
    for c in [&mut alice, &mut alice2] {
        let r = c.expect_type("message.read");
        assert_eq!(r["data"]["conversationId"], conv);
        assert_eq!(r["data"]["messageIds"], json!([sid]));
        assert_eq!(r["data"]["messageNumericIds"], json!([a2["cursor"]]));
        assert_eq!(r["data"]["by"], "bob");
    }
    bob.expect_type("message.read");
    // The numeric id names the same message; marking an older one changes nothing.
    let (st, v) = rest(
        &s,
        "PUT",
        &format!("/api/v1/messages/{}/read", a1["cursor"]),
        "bob",
        None,
    );
    assert_eq!((st, &v["readSeq"]), (200, &json!(2)), "{v}");
    // (The receipt is relayed again, as a repeated mark.read would be.)
    for c in [&mut alice, &mut alice2, &mut bob] {
        let r = c.expect_type("message.read");
        assert_eq!(r["data"]["messageIds"], json!([a1["serverMsgId"]]));
    }

    // A read over the socket is stored as well: alice reads bob's reply.
    let b1 = send(&mut bob, "d-3", "alice", "reply");
    let (_, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{conv}"),
        "alice",
        None,
    );
    assert_eq!(v["unreadCount"], 1, "{v}");
    alice.expect_type("message.create");
    alice2.expect_type("message.create");
    alice.send_json(
        json!({"type": "mark.read", "to": "bob", "conversationId": conv,
        "messageIds": [b1["serverMsgId"]]}),
    );
    bob.expect_type("message.read");
    alice2.expect_type("message.read");
    let mut unread = Value::Null;
    for _ in 0..50 {
        let (_, v) = rest(
            &s,
            "GET",
            &format!("/api/v1/messages/threads/{conv}"),
            "alice",
            None,
        );
        unread = v["unreadCount"].clone();
        if unread == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(unread, 0, "the socket's mark.read reached the store");

    // Sending over REST: stored, acked with 201, delivered live to both users' devices.
    let (st, v) = rest(
        &s,
        "POST",
        &format!("/api/v1/messages/threads/{conv}/messages"),
        "bob",
        Some(json!({"content": "from rest", "clientMsgId": "r-1"})),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["seq"], 4);
    for c in [&mut alice, &mut alice2, &mut bob] {
        let m = c.expect_type("message.create");
        assert_eq!(m["data"]["serverMsgId"], v["serverMsgId"]);
        assert_eq!(m["data"]["from"], "bob");
        assert_eq!(m["data"]["to"], "alice");
    }
    // The same client id again: 200 with the first message, nobody gets it twice.
    let (st, again) = rest(
        &s,
        "POST",
        &format!("/api/v1/messages/threads/{conv}/messages"),
        "bob",
        Some(json!({"content": "from rest", "clientMsgId": "r-1"})),
    );
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["serverMsgId"], v["serverMsgId"]);
    alice.expect_silence(200);
}

fn group_threads_over_rest_and_the_socket(env: &[(&str, &str)]) {
    let s = start(env);
    let mut bob = s.connect("/ws?user_id=bob");
    let mut carol = s.connect("/ws?user_id=carol");
    let (st, t) = rest(
        &s,
        "POST",
        "/api/v1/messages/threads",
        "alice",
        Some(json!({"participants": ["bob", "carol"], "title": "launch"})),
    );
    assert_eq!(st, 201, "{t}");
    assert_eq!(t["kind"], "group");
    assert_eq!(t["participants"], json!(["alice", "bob", "carol"]));
    let id = t["id"].as_str().unwrap().to_owned();
    // A message.send with the group's conversationId and no `to` reaches every participant.
    let mut alice = s.connect("/ws?user_id=alice");
    alice.send_json(json!({"type": "message.send", "clientMsgId": "g-1",
        "conversationId": id, "content": "hello all"}));
    let ack = alice.expect_type("message.ack");
    for c in [&mut bob, &mut carol] {
        let m = c.expect_type("message.create");
        assert_eq!(m["data"]["conversationId"], id.as_str());
        assert_eq!(m["data"]["to"], Value::Null);
        assert_eq!(m["data"]["serverMsgId"], ack["data"]["serverMsgId"]);
    }
    // By numeric id too.
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{}", t["numericId"]),
        "carol",
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["unreadCount"], 1);
    // An outsider can neither read it nor write into it.
    let (st, v) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{id}"),
        "dave",
        None,
    );
    assert_eq!(st, 403, "{v}");
    let mut dave = s.connect("/ws?user_id=dave");
    dave.send_json(json!({"type": "message.send", "clientMsgId": "g-2",
        "conversationId": id, "content": "let me in"}));
    dave.expect_error("not a participant of this conversation");
    let (st, _) = rest(
        &s,
        "POST",
        &format!("/api/v1/messages/threads/{id}/messages"),
        "dave",
        Some(json!({"content": "x"})),
    );
    assert_eq!(st, 403);
}

fn messages_and_threads_page_without_gaps_or_repeats(env: &[(&str, &str)]) {
    let s = start(env);
    let mut alice = s.connect("/ws?user_id=alice");
    let mut conv = String::new();
    for i in 0..7 {
        conv = send(&mut alice, &format!("p-{i}"), "bob", &format!("m{i}"))["conversationId"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let mut seen = Vec::new();
    let mut path = format!("/api/v1/messages/threads/{conv}/messages?limit=3");
    loop {
        let (st, v) = rest(&s, "GET", &path, "bob", None);
        assert_eq!(st, 200, "{v}");
        for m in v["messages"].as_array().unwrap() {
            seen.push(m["seq"].as_u64().unwrap());
        }
        match v["next"].as_u64() {
            Some(n) => {
                path = format!("/api/v1/messages/threads/{conv}/messages?limit=3&before={n}")
            }
            None => break,
        }
    }
    assert_eq!(seen, [7, 6, 5, 4, 3, 2, 1]);
    // Threads: five conversations, paged by two, most recent first.
    for i in 0..4 {
        send(&mut alice, &format!("t-{i}"), &format!("peer{i}"), "x");
    }
    let mut ids = Vec::new();
    let mut path = "/api/v1/messages/threads?limit=2".to_owned();
    loop {
        let (st, v) = rest(&s, "GET", &path, "alice", None);
        assert_eq!(st, 200, "{v}");
        for t in v["threads"].as_array().unwrap() {
            ids.push(t["participants"].clone());
        }
        match v["next"].as_u64() {
            Some(n) => path = format!("/api/v1/messages/threads?limit=2&before={n}"),
            None => break,
        }
    }
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[0], json!(["alice", "peer3"]));
    assert_eq!(ids[4], json!(["alice", "bob"]));
    // Limits out of range are refused before the store.
    let (st, v) = rest(&s, "GET", "/api/v1/messages/threads?limit=0", "alice", None);
    assert_eq!(st, 400, "{v}");
}

fn nobody_sees_anothers_threads(env: &[(&str, &str)]) {
    let s = start(env);
    let mut alice = s.connect("/ws?user_id=alice");
    let a = send(&mut alice, "n-1", "bob", "private");
    let conv = a["conversationId"].as_str().unwrap();
    let (st, v) = rest(&s, "GET", "/api/v1/messages/threads", "eve", None);
    assert_eq!((st, v["threads"].as_array().map(Vec::len)), (200, Some(0)));
    for path in [
        format!("/api/v1/messages/threads/{conv}"),
        format!("/api/v1/messages/threads/{conv}/messages"),
    ] {
        let (st, v) = rest(&s, "GET", &path, "eve", None);
        assert_eq!(st, 403, "{path}: {v}");
        assert!(v["error"].is_string());
    }
    let sid = a["serverMsgId"].as_str().unwrap();
    let (st, _) = rest(
        &s,
        "PUT",
        &format!("/api/v1/messages/{sid}/read"),
        "eve",
        None,
    );
    assert_eq!(st, 403);
    let (st, v) = rest(
        &s,
        "GET",
        "/api/v1/messages/threads/no-such-thread",
        "eve",
        None,
    );
    assert_eq!(st, 404, "{v}");
    let (st, _) = rest(
        &s,
        "PUT",
        "/api/v1/messages/01a23400-0000-7000-8000-000000000000/read",
        "alice",
        None,
    );
    assert_eq!(st, 404);
}

fn notifications_from_the_server_api_are_listed_and_marked_read(env: &[(&str, &str)]) {
    let s = start(env);
    let mut bob = s.connect("/ws?user_id=bob");
    let mut ids = Vec::new();
    for i in 0..3 {
        let (st, v) = api_post(
            &s,
            "/api/users/bob/notifications",
            json!({"kind": "jobs.posted", "data": {"jobId": i}, "id": format!("jobs.posted/0/{i}")}),
        );
        assert_eq!(st, 201, "{v}");
        let live = bob.expect_type("notification");
        assert_eq!(live["data"]["id"], v["id"]);
        assert_eq!(live["data"]["kind"], "jobs.posted");
        assert_eq!(live["data"]["data"]["jobId"], i);
        ids.push(v["id"].as_u64().unwrap());
    }
    // The same source id again: the first one, 200, nothing delivered.
    let (st, v) = api_post(
        &s,
        "/api/users/bob/notifications",
        json!({"kind": "jobs.posted", "data": {"jobId": 9}, "id": "jobs.posted/0/1"}),
    );
    assert_eq!((st, v["id"].as_u64()), (200, Some(ids[1])), "{v}");
    bob.expect_silence(200);
    // Bad bodies.
    for (body, text) in [
        (json!({"data": {}}), "kind is required"),
        (
            json!({"kind": "x", "data": 5}),
            "data must be a JSON object",
        ),
    ] {
        let (st, v) = api_post(&s, "/api/users/bob/notifications", body);
        assert_eq!((st, v["error"].as_str()), (400, Some(text)));
    }

    let (st, v) = rest(&s, "GET", "/api/v1/notifications", "bob", None);
    assert_eq!(st, 200, "{v}");
    let got: Vec<u64> = v["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [ids[2], ids[1], ids[0]]);
    let (st, v) = rest(
        &s,
        "PUT",
        &format!("/api/v1/notifications/{}/read", ids[0]),
        "bob",
        None,
    );
    assert_eq!((st, &v["read"]), (200, &json!(true)), "{v}");
    let (st, _) = rest(
        &s,
        "PUT",
        &format!("/api/v1/notifications/{}/read", ids[0]),
        "eve",
        None,
    );
    assert_eq!(st, 404, "another user's notification is not found");
    let (_, v) = rest(&s, "GET", "/api/v1/notifications?unread=true", "bob", None);
    assert_eq!(v["notifications"].as_array().unwrap().len(), 2, "{v}");
    let (st, v) = rest(&s, "PUT", "/api/v1/notifications/read-all", "bob", None);
    assert_eq!((st, &v["updated"]), (200, &json!(2)), "{v}");
    let (_, v) = rest(&s, "GET", "/api/v1/notifications?unread=true", "bob", None);
    assert_eq!(v["notifications"], json!([]));
}

/// Mallory cannot make the thread that bob's DMs to carol would land in (the reviewer's probe:
/// a REST group under their derived conversation id), so she reads none of them.
fn nobody_can_squat_another_pairs_conversation(env: &[(&str, &str)]) {
    let s = start(env);
    let conv = derive_conversation_id("bob", "carol");
    let threads = "/api/v1/messages/threads";
    for who in [json!(["bob", "carol"]), json!(["bob"]), json!(["carol"])] {
        let (st, v) = rest(
            &s,
            "POST",
            threads,
            "mallory",
            Some(json!({"id": conv, "participants": who})),
        );
        assert_eq!(
            (st, v["error"].as_str()),
            (400, Some("id is reserved for direct conversations")),
            "{who}"
        );
    }
    let mut mallory = s.connect("/ws?user_id=mallory");
    let mut bob = s.connect("/ws?user_id=bob");
    let mut carol = s.connect("/ws?user_id=carol");
    let ack = send(&mut bob, "x1", "carol", "secret");
    assert_eq!(ack["conversationId"], conv.as_str());
    assert_eq!(
        carol.expect_type("message.create")["data"]["content"],
        "secret"
    );
    mallory.expect_silence(200);
    let (st, _) = rest(
        &s,
        "GET",
        &format!("{threads}/{conv}/messages"),
        "mallory",
        None,
    );
    assert_eq!(st, 403);
    // One of the pair may name their own conversation: it is their direct thread.
    let (st, v) = rest(
        &s,
        "POST",
        threads,
        "carol",
        Some(json!({"id": conv, "participants": ["bob"]})),
    );
    assert_eq!((st, &v["kind"]), (200, &json!("direct")), "{v}");
    assert_eq!(v["participants"], json!(["bob", "carol"]));
}

/// A thread id of digits is refused at creation, so `/threads/<digits>` names the thread with
/// that numeric id and nothing else (the reviewer's probe: mallory made a text id equal to the
/// numeric id of bob and carol's thread, and bob's REST send landed in hers).
fn numeric_ids_cannot_be_shadowed(env: &[(&str, &str)]) {
    let s = start(env);
    let mut bob = s.connect("/ws?user_id=bob");
    let conv = send(&mut bob, "b0", "carol", "first")["conversationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, v) = rest(&s, "GET", "/api/v1/messages/threads", "bob", None);
    let nid = v["threads"][0]["numericId"].as_u64().unwrap();
    let (st, v) = rest(
        &s,
        "POST",
        "/api/v1/messages/threads",
        "mallory",
        Some(json!({"id": nid.to_string(), "participants": ["bob"]})),
    );
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("id must not be all digits"))
    );
    let (st, v) = rest(
        &s,
        "POST",
        &format!("/api/v1/messages/threads/{nid}/messages"),
        "bob",
        Some(json!({"content": "for carol"})),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["threadId"].as_str(), v["recipientId"].as_str()),
        (Some(conv.as_str()), Some("carol"))
    );
    let (st, _) = rest(
        &s,
        "GET",
        &format!("/api/v1/messages/threads/{nid}/messages"),
        "mallory",
        None,
    );
    assert_eq!(st, 403);
}

/// `POST /threads` for two people without an id makes their direct conversation, the one
/// `message.send` uses; with an id of their own it is a group of two, which takes no DM.
fn a_thread_of_two_over_rest_is_their_conversation(env: &[(&str, &str)]) {
    let s = start(env);
    let (st, t) = rest(
        &s,
        "POST",
        "/api/v1/messages/threads",
        "alice",
        Some(json!({"participants": ["bob"]})),
    );
    assert_eq!(st, 201, "{t}");
    assert_eq!(
        (&t["kind"], &t["id"]),
        (
            &json!("direct"),
            &json!(derive_conversation_id("alice", "bob"))
        )
    );
    let mut bob = s.connect("/ws?user_id=bob");
    let ack = send(&mut bob, "b1", "alice", "hi");
    assert_eq!(ack["conversationId"], t["id"]);
    // A group of two under an id of their own: REST messages go to both, without `to`.
    let (st, g) = rest(
        &s,
        "POST",
        "/api/v1/messages/threads",
        "alice",
        Some(json!({"id": "alice-bob-project", "participants": ["bob"]})),
    );
    assert_eq!((st, &g["kind"]), (201, &json!("group")), "{g}");
    let (st, v) = rest(
        &s,
        "POST",
        "/api/v1/messages/threads/alice-bob-project/messages",
        "alice",
        Some(json!({"content": "to the project"})),
    );
    assert_eq!((st, &v["recipientId"]), (201, &Value::Null), "{v}");
    let m = bob.expect_type("message.create");
    assert_eq!(m["data"]["conversationId"], "alice-bob-project");
    // A DM does not go into it.
    bob.send_json(
        json!({"type": "message.send", "clientMsgId": "b2", "to": "alice",
        "conversationId": "alice-bob-project", "content": "dm?"}),
    );
    bob.expect_error("not a participant of this conversation");
}

/// U+0000 in a REST text is a 400 with the stores' text, and the store stays whole.
fn nul_text_is_refused(env: &[(&str, &str)]) {
    let s = start(env);
    let mut alice = s.connect("/ws?user_id=alice");
    let conv = send(&mut alice, "a1", "bob", "first")["conversationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/messages/threads/{conv}/messages");
    for body in [
        json!({"content": "a\u{0}b"}),
        json!({"content": "x", "clientMsgId": "c\u{0}"}),
        json!({"content": "x", "attachmentUrl": "https://x/\u{0}"}),
    ] {
        let (st, v) = rest(&s, "POST", &path, "alice", Some(body.clone()));
        assert_eq!(
            (st, v["error"].as_str()),
            (400, Some("text must not contain NUL characters")),
            "{body}"
        );
    }
    let (st, v) = rest(
        &s,
        "POST",
        "/api/v1/messages/threads",
        "alice",
        Some(json!({"participants": ["bob", "carol"], "title": "t\u{0}"})),
    );
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("text must not contain NUL characters"))
    );
    let (st, _) = rest(&s, "GET", "/api/v1/messages/threads/x%00", "alice", None);
    assert_eq!(st, 400);
    let (st, v) = rest(
        &s,
        "POST",
        &path,
        "alice",
        Some(json!({"content": "after"})),
    );
    assert_eq!((st, &v["seq"]), (201, &json!(2)), "{v}");
}
