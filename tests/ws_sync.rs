//! Direct messages through the message store, over real sockets: `message.ack` only once the
//! message is stored, `serverMsgId` and `cursor` the same on every device, `sync` replays what
//! a device missed exactly once and in order, a live delivery a full inbox refused is not lost.
//!
//! Every test body runs twice, against the in-memory store and against PostgreSQL (a
//! throwaway cluster the test starts, see `common::pg`).

#[macro_use]
mod common;

use common::{Client, TestServer};
use serde_json::{json, Value};

const EXPOSE: (&str, &str) = ("SWITCHBOARD_EXPOSE_SHARD", "true");

both_stores!(
    ack_and_every_device_carry_the_same_ids_and_cursor,
    an_offline_device_syncs_what_it_missed_once_in_order,
    sync_pages_by_limit_and_bytes,
    sync_without_since_returns_the_latest_page,
    a_retry_is_acked_again_and_not_redelivered,
    a_live_delivery_a_full_inbox_refused_is_held_back_and_delivered_in_order,
    text_a_store_cannot_hold_and_borrowed_conversations_are_refused,
    bad_sync_commands_are_refused,
    a_conversation_belongs_to_its_two_users,
);

fn start(env: &[(&str, &str)], extra: &[(&'static str, &'static str)]) -> TestServer {
    let mut all: Vec<(&str, &str)> = env.to_vec();
    all.extend_from_slice(extra);
    let s = TestServer::start(&all);
    s.wait_ready();
    s
}

fn dm(cmid: &str, to: &str, content: &str) -> Value {
    json!({"type": "message.send", "clientMsgId": cmid, "to": to, "content": content})
}

fn send_acked(c: &mut Client, cmid: &str, to: &str, content: &str) -> Value {
    c.send_json(dm(cmid, to, content));
    let ack = c.expect_type("message.ack");
    assert_eq!(ack["data"]["clientMsgId"], cmid, "{ack}");
    ack["data"].clone()
}

/// Send `sync` and collect the replayed `message.create` data and the `sync.done` data.
fn sync(c: &mut Client, args: Value) -> (Vec<Value>, Value) {
    let mut cmd = json!({"type": "sync", "id": 7});
    for (k, v) in args.as_object().unwrap() {
        cmd[k] = v.clone();
    }
    c.send_json(cmd);
    let mut got = Vec::new();
    loop {
        let f = c.recv_json();
        match f["type"].as_str() {
            Some("message.create") => got.push(f["data"].clone()),
            Some("sync.done") => {
                assert_eq!(f["id"], 7, "{f}");
                return (got, f["data"].clone());
            }
            _ => panic!("unexpected frame during sync: {f}"),
        }
    }
}

fn ack_and_every_device_carry_the_same_ids_and_cursor(env: &[(&str, &str)]) {
    let server = start(env, &[EXPOSE]);
    let mut alice0 = server.connect_on_shard("/ws?user_id=alice", 0);
    let mut alice1 = server.connect_on_shard("/ws?user_id=alice", 1);
    let mut bob = server.connect_on_shard("/ws?user_id=bob", 1);
    let ack = send_acked(&mut alice0, "c-1", "bob", "hello");
    let cursor = ack["cursor"].as_u64().expect("the ack carries the cursor");
    assert_eq!(ack["seq"], 1);
    for c in [&mut bob, &mut alice1] {
        let m = c.expect_type("message.create");
        let d = &m["data"];
        assert_eq!(d["serverMsgId"], ack["serverMsgId"]);
        assert_eq!(d["conversationId"], ack["conversationId"]);
        assert_eq!(d["cursor"], cursor);
        assert_eq!(d["seq"], 1);
        assert_eq!(d["from"], "alice");
        assert_eq!(d["to"], "bob");
        assert_eq!(d["content"], "hello");
        assert_eq!(d["sentAt"], ack["sentAt"]);
    }
    alice0.expect_silence(150);
    // The next message of the conversation: a later cursor, the next seq.
    let ack2 = send_acked(&mut bob, "c-2", "alice", "hi back");
    assert!(ack2["cursor"].as_u64().unwrap() > cursor);
    assert_eq!(ack2["seq"], 2);
    assert_eq!(ack2["conversationId"], ack["conversationId"]);
}

fn an_offline_device_syncs_what_it_missed_once_in_order(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut bob = server.connect("/ws?user_id=bob");
    let first = send_acked(&mut bob, "b-0", "alice", "before");
    let seen = first["cursor"].as_u64().unwrap();
    bob.close_and_wait();

    let mut alice = server.connect("/ws?user_id=alice");
    let mut carol = server.connect("/ws?user_id=carol");
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(send_acked(
            &mut alice,
            &format!("a-{i}"),
            "bob",
            &format!("m{i}"),
        ));
        // Another conversation of bob's, interleaved.
        sent.push(send_acked(
            &mut carol,
            &format!("c-{i}"),
            "bob",
            &format!("n{i}"),
        ));
    }
    // A conversation bob is not in is not his to sync.
    send_acked(&mut alice, "x", "carol", "not bob's");

    let mut bob = server.connect("/ws?user_id=bob");
    let (got, done) = sync(&mut bob, json!({"since": seen}));
    let ids: Vec<&Value> = got.iter().map(|m| &m["serverMsgId"]).collect();
    let want: Vec<&Value> = sent.iter().map(|a| &a["serverMsgId"]).collect();
    assert_eq!(ids, want, "every missed message, oldest first");
    let cursors: Vec<u64> = got.iter().map(|m| m["cursor"].as_u64().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[1] > w[0]), "{cursors:?}");
    assert_eq!(done["cursor"], *cursors.last().unwrap());
    assert_eq!(done["more"], false);
    assert_eq!(done["truncated"], false);
    // Synced up: nothing again.
    let (again, done2) = sync(&mut bob, json!({"since": done["cursor"]}));
    assert!(again.is_empty());
    assert_eq!(done2["cursor"], done["cursor"]);
    // The sender's own messages are synced to the sender's other devices too.
    let mut alice2 = server.connect("/ws?user_id=alice");
    let (mine, _) = sync(&mut alice2, json!({"since": seen}));
    assert_eq!(mine.len(), 6);
    assert_eq!(mine[5]["content"], "not bob's");
}

fn sync_pages_by_limit_and_bytes(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut alice = server.connect("/ws?user_id=alice");
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(send_acked(&mut alice, &format!("p-{i}"), "bob", "x"));
    }
    let mut bob = server.connect("/ws?user_id=bob");
    let since = acks[0]["cursor"].as_u64().unwrap() - 1;
    let (p1, d1) = sync(&mut bob, json!({"since": since, "limit": 2}));
    assert_eq!(p1.len(), 2);
    assert_eq!(d1["more"], true);
    assert_eq!(d1["cursor"], acks[1]["cursor"]);
    let (p2, d2) = sync(&mut bob, json!({"since": d1["cursor"], "limit": 2}));
    assert_eq!(p2[0]["serverMsgId"], acks[2]["serverMsgId"]);
    assert_eq!(d2["more"], true);
    let (p3, d3) = sync(&mut bob, json!({"since": d2["cursor"], "limit": 2}));
    assert_eq!(p3.len(), 1);
    assert_eq!(d3["more"], false);
    assert_eq!(d3["cursor"], acks[4]["cursor"]);

    // Big messages: a page stops at SYNC_PAGE_BYTES_MAX (256 KiB) and says there is more.
    bob.close_and_wait();
    let big = "y".repeat(16 * 1024);
    let mut last = Value::Null;
    for i in 0..20 {
        last = send_acked(&mut alice, &format!("big-{i}"), "bob", &big);
    }
    let mut bob = server.connect("/ws?user_id=bob");
    let (page, done) = sync(&mut bob, json!({"since": d3["cursor"], "limit": 200}));
    assert!(
        page.len() < 20 && page.len() >= 10,
        "{} messages",
        page.len()
    );
    assert_eq!(done["more"], true);
    let (rest, done) = sync(&mut bob, json!({"since": done["cursor"], "limit": 200}));
    assert_eq!(page.len() + rest.len(), 20);
    assert_eq!(done["cursor"], last["cursor"]);
    assert_eq!(done["more"], false);
}

fn sync_without_since_returns_the_latest_page(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut alice = server.connect("/ws?user_id=alice");
    let mut bob = server.connect("/ws?user_id=bob");
    let (none, done) = sync(&mut bob, json!({}));
    assert!(none.is_empty());
    assert_eq!(done["more"], false);
    let mut acks = Vec::new();
    for i in 0..4 {
        acks.push(send_acked(&mut alice, &format!("l-{i}"), "bob", "x"));
        bob.expect_type("message.create");
    }
    let (latest, done) = sync(&mut bob, json!({"limit": 3}));
    let ids: Vec<&Value> = latest.iter().map(|m| &m["serverMsgId"]).collect();
    let want: Vec<&Value> = acks[1..].iter().map(|a| &a["serverMsgId"]).collect();
    assert_eq!(ids, want, "the newest three, oldest first");
    assert_eq!(done["cursor"], acks[3]["cursor"]);
    assert_eq!(done["more"], false);
}

fn a_retry_is_acked_again_and_not_redelivered(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut alice = server.connect("/ws?user_id=alice");
    let mut alice2 = server.connect("/ws?user_id=alice");
    let mut bob = server.connect("/ws?user_id=bob");
    let first = send_acked(&mut alice, "r-1", "bob", "once");
    bob.expect_type("message.create");
    alice2.expect_type("message.create");
    // The same clientMsgId again, from another device and with other content: the first
    // message's ack, and nobody gets anything.
    alice2.send_json(dm("r-1", "bob", "twice?"));
    let again = alice2.expect_type("message.ack");
    assert_eq!(again["data"], first);
    bob.expect_silence(200);
    // Both in one batch: sent back to back, one stored.
    alice.send_json(dm("r-2", "bob", "a"));
    alice.send_json(dm("r-2", "bob", "a"));
    let a1 = alice.expect_type("message.ack");
    let a2 = alice.expect_type("message.ack");
    assert_eq!(a1["data"], a2["data"]);
    bob.expect_type("message.create");
    bob.expect_silence(200);
    let (all, _) = sync(&mut bob, json!({"since": 0}));
    assert_eq!(all.len(), 2, "stored once each");
}

fn a_live_delivery_a_full_inbox_refused_is_held_back_and_delivered_in_order(env: &[(&str, &str)]) {
    // The first delivery handed to shard 1 fails as if its inbox were full.
    let server = start(
        env,
        &[EXPOSE, ("SWITCHBOARD_TEST_FAULT", "refuse_deliveries:1:1")],
    );
    let mut alice = server.connect_on_shard("/ws?user_id=alice", 0);
    let mut bob0 = server.connect_on_shard("/ws?user_id=bob", 0);
    let mut bob1 = server.connect_on_shard("/ws?user_id=bob", 1);
    // Stored, so acked at once; the device whose shard was full gets it a little later, and
    // the next message after it (one shard's frames from the bridge stay in order).
    let ack = send_acked(&mut alice, "f-1", "bob", "hi");
    let ack2 = send_acked(&mut alice, "f-2", "bob", "again");
    for b in [&mut bob0, &mut bob1] {
        let m1 = b.expect_type("message.create");
        let m2 = b.expect_type("message.create");
        assert_eq!(m1["data"]["serverMsgId"], ack["serverMsgId"]);
        assert_eq!(m2["data"]["serverMsgId"], ack2["serverMsgId"]);
    }
    let m = server.http_get("/metrics").1;
    let delayed = m
        .lines()
        .find(|l| l.starts_with("switchboard_store_delayed_total "))
        .unwrap();
    assert_ne!(delayed, "switchboard_store_delayed_total 0", "{delayed}");
    assert!(m.contains("switchboard_store_live_missed_total 0"), "{m}");
    // And sync has it too.
    let (got, _) = sync(
        &mut bob1,
        json!({"since": ack["cursor"].as_u64().unwrap() - 1}),
    );
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["serverMsgId"], ack["serverMsgId"]);
}

fn text_a_store_cannot_hold_and_borrowed_conversations_are_refused(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut m = server.connect("/ws?user_id=mallory");
    for (cmd, text) in [
        (
            json!({"type": "message.send", "clientMsgId": "n-1", "to": "bob", "content": "a\u{0}b"}),
            "text must not contain NUL characters",
        ),
        (
            json!({"type": "message.send", "clientMsgId": "n\u{0}", "to": "bob", "content": "x"}),
            "text must not contain NUL characters",
        ),
        (
            json!({"type": "message.send", "clientMsgId": "n-2", "to": "b\u{0}b", "content": "x"}),
            "text must not contain NUL characters",
        ),
        (
            json!({"type": "message.send", "clientMsgId": "n-3", "to": "bob", "content": "x",
            "conversationId": "12345"}),
            "conversationId must not be all digits",
        ),
    ] {
        m.send_json(cmd);
        m.expect_error(text);
    }
    // The derived id of bob and carol cannot be taken by mallory.
    let mut bob = server.connect("/ws?user_id=bob");
    let bc = send_acked(&mut bob, "b-1", "carol", "hi carol");
    m.send_json(
        json!({"type": "message.send", "clientMsgId": "n-4", "to": "bob",
        "conversationId": bc["conversationId"], "content": "let me in"}),
    );
    m.expect_error("conversationId belongs to another conversation");
    // A NUL in the user id is refused at the upgrade.
    let r = server.raw_upgrade("/ws?user_id=a%00b", &[]);
    assert_eq!(r.status, 400, "{r:?}");
    // And the store kept serving everyone else.
    let again = send_acked(&mut bob, "b-2", "carol", "still here");
    assert_eq!(again["seq"], 2);
}

fn bad_sync_commands_are_refused(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut bob = server.connect("/ws?user_id=bob");
    for (cmd, text) in [
        (
            json!({"type": "sync", "limit": 0}),
            "limit must be 1 to 200",
        ),
        (
            json!({"type": "sync", "limit": 201}),
            "limit must be 1 to 200",
        ),
        (
            json!({"type": "sync", "since": "yesterday"}),
            "invalid JSON format",
        ),
        (json!({"type": "sync", "since": -1}), "invalid JSON format"),
    ] {
        bob.send_json(cmd);
        bob.expect_error(text);
    }
    // Still serving.
    let (_, done) = sync(&mut bob, json!({"since": 0}));
    assert_eq!(done["more"], false);
    // An anonymous connection has no messages to sync.
    let mut anon = server.connect("/ws");
    anon.send_json(json!({"type": "sync"}));
    anon.expect_error("not allowed");
}

fn a_conversation_belongs_to_its_two_users(env: &[(&str, &str)]) {
    let server = start(env, &[]);
    let mut alice = server.connect("/ws?user_id=alice");
    let ack = send_acked(&mut alice, "o-1", "bob", "ours");
    let derived = ack["conversationId"].as_str().unwrap().to_owned();
    // A conversation id of the client's own naming, with `to`, is the two users' thread too.
    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "o-1b", "to": "bob",
        "conversationId": "proj-7", "content": "in proj-7"}),
    );
    alice.expect_type("message.ack");
    // Carol may not write into alice and bob's conversations, nor pull bob into them.
    let mut carol = server.connect("/ws?user_id=carol");
    carol.send_json(
        json!({"type": "message.send", "clientMsgId": "o-2", "to": "bob",
        "conversationId": derived, "content": "me too"}),
    );
    let e = carol.expect_error("conversationId belongs to another conversation");
    assert_eq!(e["data"]["clientMsgId"], "o-2");
    carol.send_json(
        json!({"type": "message.send", "clientMsgId": "o-2b", "to": "bob",
        "conversationId": "proj-7", "content": "me too"}),
    );
    carol.expect_error("not a participant of this conversation");
    // A conversationId that names no stored thread and no `to`: not found.
    carol.send_json(json!({"type": "message.send", "clientMsgId": "o-3",
        "conversationId": "no-such-thread", "content": "hello?"}));
    carol.expect_error("conversation not found");
}
