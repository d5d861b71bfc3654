//! JWT authentication over real sockets (PROTOCOL.md section 1): the three upgrade token
//! sources, the rejection matrix (HTTP 401 + JSON), in-band `authenticate`, the auth timeout,
//! token expiry and refresh while connected, the `rooms` claim and `role: admin`.

mod common;

use std::time::Duration;

use common::jwt::{self, SECRET};
use common::{key_path, now_ms, now_s, Event, TestServer, RECV_TIMEOUT};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

fn hs_server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_SECRET", SECRET),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

fn pem_server(alg: &str, public_key: &str) -> TestServer {
    let key = key_path(public_key);
    TestServer::start(&[
        ("SWITCHBOARD_AUTH_MODE", "jwt"),
        ("SWITCHBOARD_JWT_ALGORITHMS", alg),
        ("SWITCHBOARD_JWT_PUBLIC_KEY_FILE", &key),
    ])
}

fn claims(sub: &str, exp_in_s: i64) -> Value {
    json!({"sub": sub, "iat": now_s(), "exp": now_s() as i64 + exp_in_s})
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn three_upgrade_token_sources() {
    let server = hs_server(&[]);
    let token = jwt::hs256(&claims("alice", 300));

    let c = server.connect_with("/ws", &[("Authorization", &bearer(&token))]);
    assert_eq!(c.welcome["data"]["user_id"], "alice", "{}", c.welcome);

    let c = server.connect(&format!("/ws?token={token}"));
    assert_eq!(c.welcome["data"]["user_id"], "alice", "{}", c.welcome);

    let protocols = format!("switchboard, bearer.{token}");
    let (mut c, headers) = server
        .try_connect_with("/ws", &[("Sec-WebSocket-Protocol", &protocols)], None)
        .unwrap_or_else(|r| panic!("subprotocol token refused: {r:?}"));
    let selected: Vec<&(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
        .collect();
    assert_eq!(selected.len(), 1, "{headers:?}");
    assert_eq!(selected[0].1, "switchboard");
    for (k, v) in &headers {
        assert!(
            !v.contains(&token) && !v.contains("bearer."),
            "token echoed in {k}: {v}"
        );
    }
    let w = c.expect_type("connected");
    assert_eq!(w["data"]["user_id"], "alice", "{w}");
}

#[test]
fn token_wins_over_claimed_user_id() {
    let server = hs_server(&[]);
    let token = jwt::hs256(&claims("alice", 300));
    let c = server.connect(&format!("/ws?user_id=mallory&token={token}"));
    assert_eq!(c.welcome["data"]["user_id"], "alice");
    // Without a token, ?user_id= is not an identity in jwt mode.
    let c = server.connect("/ws?user_id=mallory");
    assert_eq!(c.welcome["data"]["user_id"], Value::Null, "{}", c.welcome);
}

#[test]
fn authorization_header_wins_over_query() {
    let server = hs_server(&[]);
    let good = jwt::hs256(&claims("alice", 300));
    let bad = jwt::hs(
        Algorithm::HS256,
        b"some-other-secret-of-enough-length",
        &claims("alice", 300),
    );
    let r = server.raw_upgrade(
        &format!("/ws?token={good}"),
        &[("Authorization", &bearer(&bad))],
    );
    assert_eq!(r.status, 401, "first found (the header) wins: {r:?}");
}

/// Upgrade with `token` in the Authorization header: must be 401 with `{"error": text}`.
fn assert_rejected(server: &TestServer, what: &str, token: &str, text: &str) {
    let r = server.raw_upgrade("/ws", &[("Authorization", &bearer(token))]);
    assert_eq!(r.status, 401, "{what}: {r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{what}: {r:?}"
    );
    assert_eq!(r.json(), json!({"error": text}), "{what}");
    assert!(r.header("upgrade").is_none(), "{what}: no upgrade on 401");
    // The same token as ?token=.
    let r = server.raw_upgrade(&format!("/ws?token={token}"), &[]);
    assert_eq!(r.status, 401, "{what} via ?token=: {r:?}");
}

#[test]
fn hs256_rejection_matrix() {
    let server = hs_server(&[("SWITCHBOARD_MAX_REQUEST_HEADER_BYTES", "64KiB")]);
    let now = now_s() as i64;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            jwt::hs256(&json!({"sub": "a", "exp": now - 60})),
            "token expired",
        ),
        (
            "nbf in the future",
            jwt::hs256(&json!({"sub": "a", "exp": now + 300, "nbf": now + 120})),
            "token not yet valid",
        ),
        (
            "wrong key",
            jwt::hs(
                Algorithm::HS256,
                b"wrong-secret-wrong-secret-wrong!",
                &claims("a", 300),
            ),
            "invalid token signature",
        ),
        (
            "alg none",
            jwt::alg_none(&claims("a", 300)),
            "token algorithm not allowed",
        ),
        (
            "alg not listed (HS512)",
            jwt::hs(Algorithm::HS512, SECRET.as_bytes(), &claims("a", 300)),
            "token algorithm not allowed",
        ),
        (
            "missing exp",
            jwt::hs256(&json!({"sub": "a"})),
            "token missing exp",
        ),
        (
            "missing sub",
            jwt::hs256(&json!({"exp": now + 300})),
            "token missing sub",
        ),
        (
            "empty sub",
            jwt::hs256(&json!({"sub": "", "exp": now + 300})),
            "token missing sub",
        ),
        ("garbage", "not-a-jwt".to_owned(), "malformed token"),
        (
            "three garbage parts",
            "abc.def.ghi".to_owned(),
            "malformed token",
        ),
        (
            "oversized",
            jwt::hs256(&json!({"sub": "a", "exp": now + 300, "pad": "x".repeat(9000)})),
            "token too large",
        ),
    ];
    for (what, token, text) in &cases {
        assert_rejected(&server, what, token, text);
    }
    // The server is fine and a good token still works.
    let c = server.connect_with(
        "/ws",
        &[("Authorization", &bearer(&jwt::hs256(&claims("ok", 300))))],
    );
    assert_eq!(c.welcome["data"]["user_id"], "ok");
}

#[test]
fn rs256_accepts_and_rejects() {
    let server = pem_server("RS256", "rsa_public.pem");
    let good = jwt::pem(
        Algorithm::RS256,
        "rsa_private.pem",
        &claims("rsa-user", 300),
    );
    let c = server.connect_with("/ws", &[("Authorization", &bearer(&good))]);
    assert_eq!(c.welcome["data"]["user_id"], "rsa-user");

    let wrong = jwt::pem(
        Algorithm::RS256,
        "rsa2_private.pem",
        &claims("rsa-user", 300),
    );
    assert_rejected(&server, "wrong RSA key", &wrong, "invalid token signature");
    // RS/HS confusion: an HS256 token keyed with the public key's PEM bytes.
    let public = std::fs::read(key_path("rsa_public.pem")).expect("public key");
    let confused = jwt::hs(Algorithm::HS256, &public, &claims("rsa-user", 300));
    assert_rejected(
        &server,
        "HS256 signed with the RSA public key",
        &confused,
        "token algorithm not allowed",
    );
    assert_rejected(
        &server,
        "alg none",
        &jwt::alg_none(&claims("rsa-user", 300)),
        "token algorithm not allowed",
    );
}

#[test]
fn es256_and_eddsa_tokens() {
    let server = pem_server("ES256", "ec_public.pem");
    let t = jwt::pem(Algorithm::ES256, "ec_private.pem", &claims("ec-user", 300));
    assert_eq!(
        server.connect(&format!("/ws?token={t}")).welcome["data"]["user_id"],
        "ec-user"
    );
    let rs = jwt::pem(Algorithm::RS256, "rsa_private.pem", &claims("ec-user", 300));
    assert_rejected(
        &server,
        "RS256 token at an ES256 server",
        &rs,
        "token algorithm not allowed",
    );

    let server = pem_server("EdDSA", "ed_public.pem");
    let t = jwt::pem(Algorithm::EdDSA, "ed_private.pem", &claims("ed-user", 300));
    assert_eq!(
        server.connect(&format!("/ws?token={t}")).welcome["data"]["user_id"],
        "ed-user"
    );
}

#[test]
fn in_band_authenticate() {
    let server = hs_server(&[]);
    let mut c = server.connect("/ws");
    assert_eq!(c.welcome["data"]["user_id"], Value::Null, "{}", c.welcome);
    let cl = claims("bob", 300);
    c.send_json(json!({"type": "authenticate", "token": jwt::hs256(&cl), "id": "auth-1"}));
    let ok = c.expect_type("auth.success");
    assert_eq!(ok["id"], "auth-1", "{ok}");
    assert_eq!(
        ok["data"],
        json!({"user_id": "bob", "expires_at": cl["exp"].as_u64().expect("exp") * 1000})
    );
    // Now a normal client with an identity.
    c.subscribe("after-auth");
    c.send_json(json!({"type": "publish", "room": "after-auth", "data": 1}));
    assert_eq!(c.expect_type("message")["user_id"], "bob");
}

#[test]
fn in_band_bad_token_fails_and_closes_4001() {
    let server = hs_server(&[]);
    let mut c = server.connect("/ws");
    let bad = jwt::hs(
        Algorithm::HS256,
        b"not-the-secret-not-the-secret!!!",
        &claims("bob", 300),
    );
    c.send_json(json!({"type": "authenticate", "token": bad}));
    let f = c.expect_type("auth.failed");
    assert_eq!(f["error"], "invalid token signature", "{f}");
    c.expect_close(4001);

    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "authenticate", "token": jwt::hs256(&json!({"sub": "x", "exp": now_s() - 60}))}));
    assert_eq!(c.expect_type("auth.failed")["error"], "token expired");
    c.expect_close(4001);
    server.assert_serving_jwt();
}

#[test]
fn non_authenticate_first_frame_fails_and_closes_4001() {
    let server = hs_server(&[]);
    let mut c = server.connect("/ws");
    c.send_json(json!({"type": "subscribe", "room": "sneaky", "id": 1}));
    let f = c.expect_type("auth.failed");
    assert!(f["error"].as_str().is_some_and(|e| !e.is_empty()), "{f}");
    c.expect_close(4001);
    // It did not join the room.
    let t = jwt::hs256(&claims("x", 300));
    let mut d = server.connect(&format!("/ws?token={t}"));
    assert_eq!(d.subscribe("sneaky")["data"]["client_count"], 1);
}

#[test]
fn auth_timeout_closes_4001() {
    let server = hs_server(&[("SWITCHBOARD_AUTH_TIMEOUT", "1s")]);
    let started = std::time::Instant::now();
    let mut c = server.connect("/ws");
    // An auth.failed frame may precede the close.
    let skipped = c.expect_close_after(4001, 1);
    for f in &skipped {
        assert_eq!(f["type"], "auth.failed", "{f}");
    }
    let t = started.elapsed();
    assert!(
        t >= Duration::from_millis(800) && t <= Duration::from_millis(2500),
        "closed after {t:?}"
    );
    // A connection with a token in the upgrade is not subject to it.
    let tok = jwt::hs256(&claims("patient", 300));
    let mut ok = server.connect(&format!("/ws?token={tok}"));
    ok.expect_silence(1500);
}

/// Settings for the expiry tests: exp is exact, warn 2 s before, close 1 s after.
const EXPIRY_ENV: [(&str, &str); 3] = [
    ("SWITCHBOARD_JWT_LEEWAY", "0s"),
    ("SWITCHBOARD_TOKEN_REFRESH_WINDOW", "2s"),
    ("SWITCHBOARD_TOKEN_EXPIRY_GRACE", "1s"),
];

#[test]
fn token_expiry_warns_then_closes_4003() {
    let server = hs_server(&EXPIRY_ENV);
    let exp = now_s() + 3;
    let tok = jwt::hs256(&json!({"sub": "short", "exp": exp}));
    let mut c = server.connect(&format!("/ws?token={tok}"));
    let warn = c.expect_type("auth.expiring");
    assert_eq!(warn["data"], json!({"expires_at": exp * 1000}), "{warn}");
    let warned_at = now_ms();
    assert!(
        warned_at + 1000 >= (exp - 2) * 1000,
        "warned too early: {warned_at} for exp {exp}"
    );
    assert!(
        warned_at < exp * 1000,
        "warned only after exp: {warned_at} for exp {exp}"
    );
    match c.next_event(RECV_TIMEOUT) {
        Event::Json(v) => {
            assert_eq!(v["type"], "auth.expired", "{v}");
            common::assert_timestamp(&v);
        }
        other => panic!("expected auth.expired, got {other:?}"),
    }
    let expired_at = now_ms();
    assert!(
        expired_at >= exp * 1000,
        "expired before exp: {expired_at} < {}",
        exp * 1000
    );
    c.expect_close(4003);
}

#[test]
fn token_refresh_keeps_the_connection() {
    let server = hs_server(&EXPIRY_ENV);
    let exp = now_s() + 3;
    let mut c = server.connect(&format!(
        "/ws?token={}",
        jwt::hs256(&json!({"sub": "carol", "exp": exp}))
    ));
    c.subscribe("keep");
    c.expect_type("auth.expiring");
    let fresh = claims("carol", 120);
    c.send_json(json!({"type": "authenticate", "token": jwt::hs256(&fresh), "id": 77}));
    let ok = c.expect_type("auth.success");
    assert_eq!(ok["id"], 77);
    assert_eq!(
        ok["data"],
        json!({"user_id": "carol", "expires_at": fresh["exp"].as_u64().expect("exp") * 1000})
    );
    // Past the old exp + grace: no auth.expired, no close.
    let until = (exp + 1) * 1000 + 1500;
    c.expect_silence(until.saturating_sub(now_ms()));
    c.send_json(json!({"type": "publish", "room": "keep", "data": "still here"}));
    let m = c.expect_type("message");
    assert_eq!(m["user_id"], "carol");
}

#[test]
fn refresh_for_another_subject_is_refused() {
    let server = hs_server(&[]);
    let mut c = server.connect(&format!("/ws?token={}", jwt::hs256(&claims("carol", 300))));
    c.subscribe("who");
    c.send_json(json!({"type": "authenticate", "token": jwt::hs256(&claims("mallory", 300))}));
    let f = c.expect_type("auth.failed");
    assert!(f["error"].as_str().is_some_and(|e| !e.is_empty()), "{f}");
    // Whatever happens next, the identity was not taken over.
    c.send_json(json!({"type": "publish", "room": "who", "data": 1}));
    match c.next_event(RECV_TIMEOUT) {
        Event::Json(m) => assert_eq!(m["user_id"], "carol", "{m}"),
        Event::Close(Some(4001), _) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn rooms_claim_limits_subscribe() {
    let server = hs_server(&[]);
    let mut cl = claims("limited", 300);
    cl["rooms"] = json!(["team-*", "lobby"]);
    let mut c = server.connect(&format!("/ws?token={}", jwt::hs256(&cl)));
    c.subscribe("team-a");
    c.subscribe("team-");
    c.subscribe("lobby");
    for room in ["secret", "lobby2", "xteam-a", "Team-a"] {
        c.send_json(json!({"type": "subscribe", "room": room, "id": room}));
        let e = c.expect_error("not allowed");
        assert_eq!(e["id"], room, "{e}");
    }
    c.send_json(json!({"type": "publish", "room": "secret", "data": 1}));
    c.expect_error("not subscribed to this room");
    // A token without the claim may use any room.
    let mut free = server.connect(&format!("/ws?token={}", jwt::hs256(&claims("free", 300))));
    free.subscribe("secret");
}

#[test]
fn admin_role_may_broadcast() {
    let server = hs_server(&[]);
    let mut admin_claims = claims("root", 300);
    admin_claims["role"] = json!("admin");
    let mut admin = server.connect(&format!("/ws?token={}", jwt::hs256(&admin_claims)));
    let mut user = server.connect(&format!("/ws?token={}", jwt::hs256(&claims("joe", 300))));
    let mut other_claims = claims("ann", 300);
    other_claims["role"] = json!("member");
    let mut other = server.connect(&format!("/ws?token={}", jwt::hs256(&other_claims)));

    user.send_json(json!({"type": "broadcast", "data": "no", "id": 1}));
    assert_eq!(user.expect_error("not allowed")["id"], 1);
    other.send_json(json!({"type": "broadcast", "data": "no"}));
    other.expect_error("not allowed");

    let admin_id = admin.client_id.clone();
    // A connection that has not authenticated yet does not receive broadcasts.
    let mut pending = server.connect("/ws");
    admin.send_json(json!({"type": "broadcast", "data": {"notice": "maintenance"}}));
    for c in [&mut admin, &mut user, &mut other] {
        let m = c.expect_type("message");
        assert_eq!(m["data"], json!({"notice": "maintenance"}));
        assert_eq!(m["user_id"], "root");
        assert_eq!(m["client_id"].as_str(), Some(admin_id.as_str()));
    }
    pending.expect_silence(200);
}

trait ServingJwt {
    fn assert_serving_jwt(&self);
}

impl ServingJwt for TestServer {
    /// A fresh authenticated client still gets served.
    fn assert_serving_jwt(&self) {
        let mut c = self.connect(&format!("/ws?token={}", jwt::hs256(&claims("probe", 300))));
        c.send_json(json!({"type": "ping", "id": "p"}));
        assert_eq!(c.expect_type("pong")["id"], "p");
    }
}

/// The harness's base64url encoder, which the alg-none token relies on (RFC 4648 vectors).
#[test]
fn harness_b64url_matches_rfc4648_vectors() {
    for (i, o) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
    ] {
        assert_eq!(jwt::b64url(i.as_bytes()), o);
    }
}
