//! Presence over real sockets (PROTOCOL.md section 4), 2 shards, watcher and watched on
//! different shards: online on the first device only, offline only after the last device and
//! the grace (1 s here), no flap on a reconnect inside the grace, `presence.update` and
//! invisible, queries of never-seen users, watch limits, room presence (query with devices and
//! count across shards, truncation, `presence.join` / `presence.leave` in `join_leave` rooms,
//! the error for rooms without presence), and `address_policy: claim`.

mod common;

use std::time::{Duration, Instant};

use common::jwt::{self, SECRET};
use common::{now_ms, now_s, parse_rfc3339_ms, Client, TestServer};
use serde_json::{json, Value};

const GRACE: &str = "1s";
const ROOMS: &str = r#"[{"pattern":"jl-*","join_leave":true},{"pattern":"p-*","presence":true}]"#;

fn server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_EXPOSE_SHARD", "true"),
        ("SWITCHBOARD_PRESENCE_OFFLINE_GRACE", GRACE),
        ("SWITCHBOARD_ROOMS", ROOMS),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

fn user(server: &TestServer, name: &str, shard: u64) -> Client {
    server.connect_on_shard(&format!("/ws?user_id={name}"), shard)
}

/// `presence.watch` and its `presence.state` answer (the users in order).
fn watch(c: &mut Client, ids: &[&str]) -> Vec<Value> {
    c.send_json(json!({"type": "presence.watch", "id": "w", "user_ids": ids}));
    let s = c.expect_type("presence.state");
    assert_eq!(s["id"], "w", "{s}");
    s["data"]["users"].as_array().expect("users").clone()
}

fn query(c: &mut Client, ids: &[&str]) -> Vec<Value> {
    c.send_json(json!({"type": "presence.query", "id": "q", "user_ids": ids}));
    let s = c.expect_type("presence.state");
    assert_eq!(s["id"], "q", "{s}");
    s["data"]["users"].as_array().expect("users").clone()
}

fn assert_user(u: &Value, id: &str, status: &str, devices: u64) {
    assert_eq!(u["user_id"], id, "{u}");
    assert_eq!(u["status"], status, "{u}");
    assert_eq!(u["devices"], devices, "{u}");
}

/// The next frame is the user event `kind` for `id` with `status`; returns its data.
fn expect_event(c: &mut Client, kind: &str, id: &str, status: &str) -> Value {
    let e = c.expect_type(kind);
    let d = e["data"].clone();
    let mut keys: Vec<&str> = d
        .as_object()
        .expect("data")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["last_seen", "status", "text", "user_id"], "{e}");
    assert_eq!(d["user_id"], id, "{e}");
    assert_eq!(d["status"], status, "{e}");
    d
}

fn last_seen_ms(v: &Value) -> u64 {
    parse_rfc3339_ms(v["last_seen"].as_str().expect("last_seen is a string"))
        .unwrap_or_else(|| panic!("last_seen is not RFC 3339: {v}"))
}

#[test]
fn online_on_first_device_offline_after_last_device_and_grace() {
    let server = server(&[]);
    let mut w = user(&server, "watcher", 0);
    let users = watch(&mut w, &["bob"]);
    assert_eq!(users.len(), 1);
    assert_user(&users[0], "bob", "offline", 0);
    assert!(users[0]["last_seen"].is_null(), "{}", users[0]);

    let bob1 = user(&server, "bob", 1);
    let d = expect_event(&mut w, "presence.online", "bob", "online");
    assert!(d["last_seen"].is_null() && d["text"].is_null(), "{d}");
    // A second device: no event.
    let bob2 = user(&server, "bob", 0);
    w.expect_silence(300);
    assert_user(&query(&mut w, &["bob"])[0], "bob", "online", 2);

    // One device left: still online, nothing sent, even after the grace.
    bob1.close();
    w.expect_silence(1_500);
    assert_user(&query(&mut w, &["bob"])[0], "bob", "online", 1);

    // The last one: offline, but only once the grace has passed.
    let closed = Instant::now();
    let closed_ms = now_ms();
    bob2.close();
    let d = expect_event(&mut w, "presence.offline", "bob", "offline");
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "offline {:?} after the last device left, before the 1 s grace",
        closed.elapsed()
    );
    let seen = last_seen_ms(&d);
    assert!(
        seen + 2_000 > closed_ms && seen < closed_ms + 2_000,
        "last_seen {seen} is not when the last device left ({closed_ms})"
    );
    let u = &query(&mut w, &["bob"])[0];
    assert_user(u, "bob", "offline", 0);
    assert_eq!(last_seen_ms(u), seen, "{u}");
    w.expect_silence(200);
}

#[test]
fn reconnect_inside_the_grace_does_not_flap() {
    let server = server(&[]);
    let mut w = user(&server, "watcher", 0);
    watch(&mut w, &["bob"]);
    let bob = user(&server, "bob", 1);
    expect_event(&mut w, "presence.online", "bob", "online");
    // A blip: the only device goes; inside the grace bob is still online, with 0 devices.
    bob.close();
    let deadline = Instant::now() + Duration::from_millis(800);
    loop {
        let u = query(&mut w, &["bob"]).remove(0);
        assert_eq!(u["status"], "online", "{u}");
        if u["devices"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the device never left: {u}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A new device comes back (on the other shard) before the grace ends: no event at all.
    let _bob = user(&server, "bob", 0);
    w.expect_silence(2_000);
    assert_user(&query(&mut w, &["bob"])[0], "bob", "online", 1);
}

#[test]
fn update_and_invisible() {
    let server = server(&[]);
    let mut w = user(&server, "watcher", 0);
    watch(&mut w, &["bob"]);
    let mut bob1 = user(&server, "bob", 1);
    expect_event(&mut w, "presence.online", "bob", "online");
    let mut bob2 = user(&server, "bob", 0);

    bob1.send_json(
        json!({"type": "presence.update", "id": "u1", "status": "away", "text": "lunch 🍜"}),
    );
    let r = bob1.expect_type("presence.update");
    assert_eq!(r["id"], "u1", "{r}");
    assert_eq!(r["data"]["status"], "away", "{r}");
    assert_eq!(r["data"]["text"], "lunch 🍜", "{r}");
    let other = bob2.expect_type("presence.update");
    assert!(other.get("id").is_none(), "{other}");
    assert_eq!(other["data"]["status"], "away", "{other}");
    let d = expect_event(&mut w, "presence.update", "bob", "away");
    assert_eq!(d["text"], "lunch 🍜", "{d}");
    assert!(d["last_seen"].is_null(), "{d}");
    let u = &query(&mut w, &["bob"])[0];
    assert_user(u, "bob", "away", 2);
    assert_eq!(u["text"], "lunch 🍜", "{u}");

    // The same status again: the devices are answered, watchers get nothing.
    bob1.send_json(json!({"type": "presence.update", "status": "away", "text": "lunch 🍜"}));
    bob1.expect_type("presence.update");
    bob2.expect_type("presence.update");
    w.expect_silence(300);

    // Invisible: offline to everyone else, the true status to the user.
    bob1.send_json(json!({"type": "presence.update", "status": "invisible"}));
    assert_eq!(
        bob1.expect_type("presence.update")["data"]["status"],
        "invisible"
    );
    bob2.expect_type("presence.update");
    let d = expect_event(&mut w, "presence.offline", "bob", "offline");
    last_seen_ms(&d);
    assert_user(&query(&mut w, &["bob"])[0], "bob", "offline", 0);
    assert_user(&query(&mut bob2, &["bob"])[0], "bob", "invisible", 2);
    // A device leaving while invisible tells nobody.
    bob2.close();
    w.expect_silence(1_500);

    // Back: online again.
    bob1.send_json(json!({"type": "presence.update", "status": "busy"}));
    bob1.expect_type("presence.update");
    let d = expect_event(&mut w, "presence.online", "bob", "busy");
    assert!(d["last_seen"].is_null(), "{d}");

    // Refusals.
    bob1.send_json(json!({"type": "presence.update", "id": 7, "status": "dancing"}));
    let e = bob1.expect_error("status must be online, away, busy or invisible");
    assert_eq!(e["id"], 7, "{e}");
    bob1.send_json(json!({"type": "presence.update"}));
    bob1.expect_error("status must be online, away, busy or invisible");
    bob1.send_json(json!({"type": "presence.update", "status": "away", "text": "x".repeat(257)}));
    bob1.expect_error("presence text too long");
    bob1.send_json(json!({"type": "presence.update", "status": 1}));
    bob1.expect_error("invalid JSON format");
    w.expect_silence(200);
}

#[test]
fn query_of_never_seen_users_and_errors() {
    let server = server(&[("SWITCHBOARD_MAX_PRESENCE_QUERY_USERS", "4")]);
    let mut a = user(&server, "alice", 0);
    let _b = user(&server, "bob", 1);
    let users = query(&mut a, &["ghost", "bob", "ghost", "alice"]);
    assert_eq!(users.len(), 3, "duplicates answered once: {users:?}");
    assert_user(&users[0], "ghost", "offline", 0);
    assert!(users[0]["last_seen"].is_null() && users[0]["text"].is_null());
    assert_user(&users[1], "bob", "online", 1);
    assert_user(&users[2], "alice", "online", 1);

    for (cmd, text) in [
        (
            json!({"type": "presence.query", "id": "e"}),
            "user_ids or room is required",
        ),
        (
            json!({"type": "presence.query", "id": "e", "user_ids": ["a"], "room": "p-1"}),
            "give either room or user_ids, not both",
        ),
        (
            json!({"type": "presence.query", "id": "e", "user_ids": ["a", "b", "c", "d", "e"]}),
            "too many user_ids",
        ),
        (
            json!({"type": "presence.query", "id": "e", "user_ids": [""]}),
            "user_ids must be non-empty strings of at most 256 bytes",
        ),
        (
            json!({"type": "presence.query", "id": "e", "user_ids": ["x".repeat(257)]}),
            "user_ids must be non-empty strings of at most 256 bytes",
        ),
        (
            json!({"type": "presence.query", "id": "e", "user_ids": "bob"}),
            "invalid JSON format",
        ),
        (
            json!({"type": "presence.watch", "id": "e", "user_ids": [1]}),
            "invalid JSON format",
        ),
        (
            json!({"type": "presence.watch", "id": "e"}),
            "user_ids is required",
        ),
        (
            json!({"type": "presence.unwatch", "id": "e"}),
            "user_ids is required",
        ),
    ] {
        a.send_json(cmd);
        let e = a.expect_error(text);
        assert_eq!(e["id"], "e", "{e}");
    }

    // Presence is between identified users.
    let mut anon = server.connect("/ws");
    for t in ["presence.query", "presence.watch", "presence.unwatch"] {
        anon.send_json(json!({"type": t, "user_ids": ["bob"]}));
        anon.expect_error("not allowed");
    }
    anon.send_json(json!({"type": "presence.update", "status": "away"}));
    anon.expect_error("not allowed");
}

#[test]
fn watch_limits_and_unwatch() {
    let server = server(&[
        ("SWITCHBOARD_MAX_WATCHED_USERS_PER_CONNECTION", "3"),
        ("SWITCHBOARD_MAX_PRESENCE_QUERY_USERS", "4"),
    ]);
    let mut w = user(&server, "watcher", 0);
    w.send_json(json!({"type": "presence.watch", "id": 1, "user_ids": ["a", "b", "c", "d", "e"]}));
    assert_eq!(w.expect_error("too many user_ids")["id"], 1);
    assert_eq!(watch(&mut w, &["a", "b"]).len(), 2);
    // Two more would make 4: refused whole (neither c nor d is watched).
    w.send_json(json!({"type": "presence.watch", "id": 2, "user_ids": ["c", "d"]}));
    assert_eq!(w.expect_error("too many watched users")["id"], 2);
    // Watching one already watched costs nothing.
    assert_eq!(watch(&mut w, &["a", "c"]).len(), 2);
    w.send_json(json!({"type": "presence.watch", "user_ids": ["d"]}));
    w.expect_error("too many watched users");
    let _d = user(&server, "d", 1);
    w.expect_silence(300);

    w.send_json(json!({"type": "presence.unwatch", "id": "u", "user_ids": ["a", "zed"]}));
    let r = w.expect_type("presence.unwatched");
    assert_eq!(r["id"], "u", "{r}");
    assert_eq!(r["data"]["user_ids"], json!(["a", "zed"]), "{r}");
    let _a = user(&server, "a", 1);
    w.expect_silence(300);
    // The freed place takes d, whose presence.state says online.
    let users = watch(&mut w, &["d"]);
    assert_user(&users[0], "d", "online", 1);
    let _c = user(&server, "c", 1);
    expect_event(&mut w, "presence.online", "c", "online");
}

fn room_state(c: &mut Client, room: &str) -> Value {
    c.send_json(json!({"type": "presence.query", "id": "r", "room": room}));
    // A member that joined just before this one may be announced after it joined: the join
    // events of the room come from its owner shard, in the room's order.
    let s = loop {
        let f = c.recv_json();
        if f["type"] != "presence.join" {
            break f;
        }
    };
    assert_eq!(s["type"], "presence.state", "{s}");
    assert_eq!(s["id"], "r", "{s}");
    assert_eq!(s["room"], room, "{s}");
    s["data"].clone()
}

#[test]
fn room_presence_query_counts_devices_across_shards() {
    let server = server(&[]);
    let mut a1 = user(&server, "alice", 0);
    let mut a2 = user(&server, "alice", 1);
    let mut b = user(&server, "bob", 1);
    let mut anon = server.connect("/ws");
    for c in [&mut a1, &mut a2, &mut b, &mut anon] {
        c.subscribe("p-1");
    }
    let d = room_state(&mut b, "p-1");
    let mut users: Vec<(String, u64)> = d["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| {
            (
                u["user_id"].as_str().expect("user_id").to_owned(),
                u["devices"].as_u64().expect("devices"),
            )
        })
        .collect();
    users.sort();
    assert_eq!(users, [("alice".into(), 2), ("bob".into(), 1)], "{d}");
    assert_eq!(d["count"], 2, "{d}");
    assert_eq!(d["truncated"], false, "{d}");
    // A connection without identity is a subscriber, not a user; it may ask.
    assert_eq!(room_state(&mut anon, "p-1")["count"], 2);

    a2.send_json(json!({"type": "unsubscribe", "room": "p-1"}));
    a2.expect_type("unsubscribed");
    let d = room_state(&mut a1, "p-1");
    assert_eq!(d["users"].as_array().map(Vec::len), Some(2), "{d}");
    b.close();
    // The close is asynchronous: ask until bob's leave has reached the room's owner.
    let deadline = Instant::now() + Duration::from_secs(5);
    let d = loop {
        let d = room_state(&mut a1, "p-1");
        if d["count"] == 1 || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(d["count"], 1, "{d}");
    assert_eq!(
        d["users"],
        json!([{"user_id": "alice", "devices": 1}]),
        "{d}"
    );

    // Refusals: not subscribed; a room whose options do not track presence.
    a1.send_json(json!({"type": "presence.query", "id": 3, "room": "p-2"}));
    assert_eq!(a1.expect_error("not subscribed to this room")["id"], 3);
    a1.subscribe("plain");
    a1.send_json(json!({"type": "presence.query", "id": 4, "room": "plain"}));
    assert_eq!(
        a1.expect_error("presence is not enabled for this room")["id"],
        4
    );
    a1.send_json(json!({"type": "presence.query", "room": ""}));
    a1.expect_error("room name is required");
}

#[test]
fn room_presence_is_capped_and_says_so() {
    let server = server(&[("SWITCHBOARD_MAX_PRESENCE_ROOM_USERS", "2")]);
    let mut clients: Vec<Client> = ["u1", "u2", "u3"]
        .iter()
        .enumerate()
        .map(|(i, name)| user(&server, name, i as u64 % 2))
        .collect();
    for c in &mut clients {
        c.subscribe("jl-big");
    }
    // Joins of the later members reach the earlier ones; drain them.
    clients[0].expect_type("presence.join");
    clients[0].expect_type("presence.join");
    clients[1].expect_type("presence.join");
    let d = room_state(&mut clients[2], "jl-big");
    assert_eq!(d["users"].as_array().map(Vec::len), Some(2), "{d}");
    assert_eq!(d["count"], 3, "{d}");
    assert_eq!(d["truncated"], true, "{d}");
}

#[test]
fn join_and_leave_on_first_device_in_and_last_out() {
    let server = server(&[]);
    let mut carol = user(&server, "carol", 0);
    carol.subscribe("jl-1");
    let mut a1 = user(&server, "alice", 1);
    a1.subscribe("jl-1");
    let j = carol.expect_type("presence.join");
    assert_eq!(j["room"], "jl-1", "{j}");
    assert_eq!(j["data"], json!({"user_id": "alice"}), "{j}");
    a1.expect_silence(200); // not its own join

    // A second device of alice, on carol's shard: no join; leaving with it: no leave.
    let mut a2 = user(&server, "alice", 0);
    a2.subscribe("jl-1");
    carol.expect_silence(300);
    a2.send_json(json!({"type": "unsubscribe", "room": "jl-1"}));
    a2.expect_type("unsubscribed");
    carol.expect_silence(300);

    // Events are in order with the room's messages (the room's owner sequences both).
    a1.send_json(json!({"type": "publish", "room": "jl-1", "data": {"n": 1}}));
    assert_eq!(carol.expect_type("message")["data"]["n"], 1);
    a1.close();
    let l = carol.expect_type("presence.leave");
    assert_eq!(l["room"], "jl-1", "{l}");
    assert_eq!(l["data"], json!({"user_id": "alice"}), "{l}");

    // A presence room without join_leave answers queries but sends no events.
    carol.subscribe("p-quiet");
    let mut a3 = user(&server, "alice", 1);
    a3.subscribe("p-quiet");
    carol.expect_silence(300);
    // Nor do connections without identity count as users.
    let mut anon = server.connect("/ws");
    anon.subscribe("jl-1");
    carol.expect_silence(300);
}

#[test]
fn address_policy_claim_limits_watching_and_queries() {
    let server = server(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", SECRET),
        ("SWITCHBOARD_ADDRESS_POLICY", "claim"),
    ]);
    let token = |sub: &str, allowed: Option<&[&str]>| {
        let mut c = json!({"sub": sub, "iat": now_s(), "exp": now_s() + 300});
        if let Some(a) = allowed {
            c["allowed_users"] = json!(a);
        }
        jwt::hs256(&c)
    };
    let mut alice =
        server.connect_on_shard(&format!("/ws?token={}", token("alice", Some(&["bob"]))), 0);
    let users = watch(&mut alice, &["bob", "alice"]);
    assert_user(&users[0], "bob", "offline", 0);
    // Online; the count may still include a connection `connect_on_shard` just closed on the
    // other shard (placement retries), which this test is not about.
    assert_eq!(users[1]["user_id"], "alice");
    assert_eq!(users[1]["status"], "online");
    assert!(
        users[1]["devices"].as_u64().is_some_and(|d| d >= 1),
        "{}",
        users[1]
    );
    for t in ["presence.watch", "presence.query"] {
        alice.send_json(json!({"type": t, "id": "no", "user_ids": ["bob", "carol"]}));
        assert_eq!(alice.expect_error("not allowed")["id"], "no");
    }
    // Nothing of the refused frame was watched: carol's arrival is not reported.
    let _carol = server.connect_on_shard(&format!("/ws?token={}", token("carol", None)), 1);
    alice.expect_silence(300);
    let _bob = server.connect_on_shard(&format!("/ws?token={}", token("bob", None)), 1);
    expect_event(&mut alice, "presence.online", "bob", "online");

    // Without the claim nobody may be watched (oneself excepted).
    let mut dave = server.connect_on_shard(&format!("/ws?token={}", token("dave", None)), 1);
    dave.send_json(json!({"type": "presence.watch", "user_ids": ["bob"]}));
    dave.expect_error("not allowed");
    assert_user(&query(&mut dave, &["dave"])[0], "dave", "online", 1);
}
