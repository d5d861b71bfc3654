//! Every route, and every way a request can be wrong.

use super::*;

const LIMITS: Limits = Limits {
    content_bytes_max: 16,
};

fn req<'a>(method: &'a str, target: &'a str, body: &'a [u8]) -> Request<'a> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    Request {
        method,
        path,
        query,
        body,
        ..Request::default()
    }
}

fn ok(method: &str, target: &str, body: &str) -> Op {
    parse(&req(method, target, body.as_bytes()), &LIMITS)
        .unwrap_or_else(|e| panic!("{method} {target} {body}: {e:?}"))
}

fn store(method: &str, target: &str, body: &str) -> RestOp {
    match ok(method, target, body) {
        Op::Store(op) => op,
        other => panic!("{other:?}"),
    }
}

fn fails(method: &str, target: &str, body: &str) -> (u16, String) {
    let e = parse(&req(method, target, body.as_bytes()), &LIMITS)
        .expect_err(&format!("{method} {target} {body} should fail"));
    (e.status.0, e.text.into_owned())
}

fn bad(text: &str) -> (u16, String) {
    (400, text.to_owned())
}

fn a(s: &str) -> Arc<str> {
    Arc::from(s)
}

#[test]
fn the_table_is_valid() {
    crate::http::check_table(ROUTES).unwrap();
}

#[test]
fn every_route() {
    assert_eq!(
        store("GET", "/api/v1/messages/threads", ""),
        RestOp::ListThreads {
            before: None,
            limit: PAGE_LIMIT_DEFAULT
        }
    );
    assert_eq!(
        store("GET", "/api/v1/messages/threads?limit=5&before=99", ""),
        RestOp::ListThreads {
            before: Some(99),
            limit: 5
        }
    );
    assert_eq!(
        store("GET", "/api/v1/messages/threads/conv-1", ""),
        RestOp::GetThread {
            thread: ThreadRef::Id(a("conv-1"))
        }
    );
    assert_eq!(
        store("GET", "/api/v1/messages/threads/17", ""),
        RestOp::GetThread {
            thread: ThreadRef::IdOrNumber(a("17"), 17)
        }
    );
    assert_eq!(
        store(
            "GET",
            "/api/v1/messages/threads/t/messages?before=4&limit=200",
            ""
        ),
        RestOp::ListMessages {
            thread: ThreadRef::Id(a("t")),
            before: Some(4),
            limit: 200
        }
    );
    assert_eq!(
        store(
            "POST",
            "/api/v1/messages/threads",
            r#"{"participants":["bo","cy"],"title":"team","id":"g1"}"#
        ),
        RestOp::CreateThread {
            id: Some(a("g1")),
            participants: vec![a("bo"), a("cy")],
            title: Some(a("team")),
        }
    );
    assert_eq!(
        store(
            "POST",
            "/api/v1/messages/threads/t/messages",
            r#"{"content":"hi","clientMsgId":"c1"}"#
        ),
        RestOp::SendMessage {
            thread: ThreadRef::Id(a("t")),
            content: a("hi"),
            attachment_url: None,
            client_msg_id: Some(a("c1")),
        }
    );
    assert_eq!(
        store("PUT", "/api/v1/messages/42/read", ""),
        RestOp::MarkRead {
            message: MessageRef::Number(42)
        }
    );
    assert_eq!(
        store(
            "PUT",
            "/api/v1/messages/01A201A5-32A9-77B2-A173-3F47B1EF19FB/read",
            ""
        ),
        RestOp::MarkRead {
            message: MessageRef::ServerId(0x01a201a5_32a9_77b2_a173_3f47b1ef19fb)
        }
    );
    assert_eq!(
        store(
            "PUT",
            "/api/v1/messages/01a201a532a977b2a1733f47b1ef19fb/read",
            ""
        ),
        RestOp::MarkRead {
            message: MessageRef::ServerId(0x01a201a5_32a9_77b2_a173_3f47b1ef19fb)
        }
    );
    assert_eq!(
        ok("GET", "/api/v1/presence/online", ""),
        Op::Presence(PresenceOp::Online {
            after: None,
            limit: PAGE_LIMIT_DEFAULT
        })
    );
    assert_eq!(
        ok("GET", "/api/v1/presence/online?after=bob&limit=2", ""),
        Op::Presence(PresenceOp::Online {
            after: Some(a("bob")),
            limit: 2
        })
    );
    assert_eq!(
        ok("GET", "/api/v1/presence/user/bob", ""),
        Op::Presence(PresenceOp::User { user: a("bob") })
    );
    assert_eq!(
        store("GET", "/api/v1/notifications", ""),
        RestOp::ListNotifications {
            unread_only: false,
            before: None,
            limit: PAGE_LIMIT_DEFAULT
        }
    );
    assert_eq!(
        store(
            "GET",
            "/api/v1/notifications?unread=true&before=7&limit=1",
            ""
        ),
        RestOp::ListNotifications {
            unread_only: true,
            before: Some(7),
            limit: 1
        }
    );
    assert_eq!(
        store("PUT", "/api/v1/notifications/9/read", ""),
        RestOp::NotificationRead { id: 9 }
    );
    assert_eq!(
        store("PUT", "/api/v1/notifications/read-all", ""),
        RestOp::NotificationsReadAll
    );
    // A trailing slash is the same path; a body on a GET or PUT is ignored.
    assert_eq!(
        store("GET", "/api/v1/notifications/", "not json"),
        store("GET", "/api/v1/notifications", "")
    );
    assert_eq!(
        store("PUT", "/api/v1/notifications/read-all", "{oops"),
        RestOp::NotificationsReadAll
    );
}

#[test]
fn percent_encoded_segments_are_decoded() {
    assert_eq!(
        store("GET", "/api/v1/messages/threads/a%2Fb%20c", ""),
        RestOp::GetThread {
            thread: ThreadRef::Id(a("a/b c"))
        }
    );
    assert_eq!(
        ok("GET", "/api/v1/presence/user/%C3%A9ve", ""),
        Op::Presence(PresenceOp::User { user: a("éve") })
    );
    assert_eq!(
        store("PUT", "/api/v1/notifications/%31%32/read", ""),
        RestOp::NotificationRead { id: 12 }
    );
    assert_eq!(
        fails("GET", "/api/v1/messages/threads/%zz", ""),
        bad("bad percent-encoding in path")
    );
    assert_eq!(
        fails("GET", "/api/v1/messages/threads/%FF", ""),
        bad("path segment is not UTF-8")
    );
    assert_eq!(
        ok("GET", "/api/v1/presence/online?after=b%C3%B6b", ""),
        Op::Presence(PresenceOp::Online {
            after: Some(a("böb")),
            limit: PAGE_LIMIT_DEFAULT
        })
    );
}

#[test]
fn unknown_paths_and_methods() {
    assert_eq!(
        fails("GET", "/api/v1/nothing", ""),
        (404, "not found".into())
    );
    assert_eq!(
        fails("GET", "/api/v1/messages/threads//messages", ""),
        (404, "not found".into())
    );
    assert_eq!(
        fails("GET", "/api/v1/messages/threads/t/messages/x", ""),
        (404, "not found".into())
    );
    let e = parse(&req("DELETE", "/api/v1/messages/threads", b""), &LIMITS).unwrap_err();
    assert_eq!(
        (e.status.0, &*e.text, e.allow.as_deref()),
        (405, "method not allowed", Some("GET, POST"))
    );
    let e = parse(&req("GET", "/api/v1/notifications/read-all", b""), &LIMITS).unwrap_err();
    assert_eq!((e.status.0, e.allow.as_deref()), (405, Some("PUT")));
    // HEAD is not served, even where GET is.
    let e = parse(&req("HEAD", "/api/v1/messages/threads", b""), &LIMITS).unwrap_err();
    assert_eq!((e.status.0, e.allow.as_deref()), (405, Some("GET, POST")));
    let e = parse(&req("HEAD", "/api/v1/presence/online", b""), &LIMITS).unwrap_err();
    assert_eq!((e.status.0, e.allow.as_deref()), (405, Some("GET")));
}

#[test]
fn ids_in_paths() {
    let long = "x".repeat(ID_BYTES_MAX + 1);
    for path in [
        format!("/api/v1/messages/threads/{long}"),
        format!("/api/v1/messages/threads/{long}/messages"),
        format!("/api/v1/presence/user/{long}"),
        format!("/api/v1/messages/{long}/read"),
    ] {
        let method = if path.ends_with("read") { "PUT" } else { "GET" };
        assert_eq!(
            fails(method, &path, ""),
            bad("path segment too long"),
            "{path}"
        );
    }
    let max = "x".repeat(ID_BYTES_MAX);
    assert!(parse(
        &req("GET", &format!("/api/v1/presence/user/{max}"), b""),
        &LIMITS
    )
    .is_ok());
    let msg_id = "messageId must be a serverMsgId (a UUID) or a numeric message id";
    for id in [
        "abc",
        "-1",
        "1.5",
        "18446744073709551616",
        "01a201a5-32a9-77b2-a173",
    ] {
        assert_eq!(
            fails("PUT", &format!("/api/v1/messages/{id}/read"), ""),
            bad(msg_id),
            "{id}"
        );
    }
    for id in ["x", "-1", "1e3", "99999999999999999999"] {
        assert_eq!(
            fails("PUT", &format!("/api/v1/notifications/{id}/read"), ""),
            bad("notification id must be a number"),
            "{id}"
        );
    }
}

#[test]
fn query_bounds() {
    let limit = "limit must be an integer from 1 to 200";
    for q in [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=x",
        "limit=",
        "limit=1.5",
    ] {
        for path in [
            "/api/v1/messages/threads",
            "/api/v1/notifications",
            "/api/v1/presence/online",
            "/api/v1/messages/threads/t/messages",
        ] {
            assert_eq!(
                fails("GET", &format!("{path}?{q}"), ""),
                bad(limit),
                "{path}?{q}"
            );
        }
    }
    assert_eq!(
        store("GET", "/api/v1/notifications?limit=1", ""),
        RestOp::ListNotifications {
            unread_only: false,
            before: None,
            limit: 1
        }
    );
    let before = "before must be the next value of the previous page (a number)";
    for q in [
        "before=x",
        "before=-2",
        "before=",
        "before=18446744073709551616",
    ] {
        assert_eq!(
            fails("GET", &format!("/api/v1/messages/threads?{q}"), ""),
            bad(before),
            "{q}"
        );
        assert_eq!(
            fails("GET", &format!("/api/v1/notifications?{q}"), ""),
            bad(before)
        );
    }
    assert_eq!(
        fails("GET", "/api/v1/notifications?unread=yes", ""),
        bad("unread must be true or false")
    );
    for (q, want) in [
        ("unread=1", true),
        ("unread", true),
        ("unread=0", false),
        ("unread=false", false),
    ] {
        let RestOp::ListNotifications { unread_only, .. } =
            store("GET", &format!("/api/v1/notifications?{q}"), "")
        else {
            panic!()
        };
        assert_eq!(unread_only, want, "{q}");
    }
    let long = "u".repeat(ID_BYTES_MAX + 1);
    assert_eq!(
        fails("GET", &format!("/api/v1/presence/online?after={long}"), ""),
        bad("after must be the next value of the previous page (a user id)")
    );
    // Unknown parameters are ignored; an empty `after` is none.
    assert_eq!(
        ok("GET", "/api/v1/presence/online?x=1&after=", ""),
        Op::Presence(PresenceOp::Online {
            after: None,
            limit: PAGE_LIMIT_DEFAULT
        })
    );
}

#[test]
fn create_thread_bodies() {
    let p = "/api/v1/messages/threads";
    let post = |b: &str| fails("POST", p, b);
    assert_eq!(post(""), bad("a JSON object body is required"));
    assert_eq!(post("  \n"), bad("a JSON object body is required"));
    assert_eq!(post("[\"bo\"]"), bad("the body must be a JSON object"));
    assert_eq!(post("\"x\""), bad("the body must be a JSON object"));
    assert_eq!(
        post("{\"participants\":[\"bo\"]"),
        bad("invalid JSON format")
    );
    assert_eq!(
        post("{\"participants\":[\"bo\",]}"),
        bad("invalid JSON format")
    );
    assert_eq!(
        post("{\"participants\":[\"bo\"]} trailing"),
        bad("invalid JSON format")
    );
    assert_eq!(
        post(r#"{"participants":["a"],"participants":["b"]}"#),
        bad("a member is given twice")
    );
    assert_eq!(post("{}"), bad("participants is required"));
    assert_eq!(
        post(r#"{"participants":null}"#),
        bad("participants is required")
    );
    assert_eq!(
        post(r#"{"participants":[]}"#),
        bad("participants is required")
    );
    for wrong in [
        r#""bo""#,
        "5",
        "{}",
        "true",
        r#"[""]"#,
        "[null]",
        "[1.5]",
        "[-1]",
        "[[\"a\"]]",
        "[true]",
    ] {
        assert_eq!(
            post(&format!("{{\"participants\":{wrong}}}")),
            bad(BAD_PARTICIPANTS),
            "{wrong}"
        );
    }
    let long = "x".repeat(ID_BYTES_MAX + 1);
    assert_eq!(
        post(&format!(r#"{{"participants":["{long}"]}}"#)),
        bad(BAD_PARTICIPANTS)
    );
    let many: Vec<String> = (0..=THREAD_PARTICIPANTS_MAX)
        .map(|i| format!("\"u{i}\""))
        .collect();
    assert_eq!(
        post(&format!(r#"{{"participants":[{}]}}"#, many.join(","))),
        bad("too many participants: a thread has at most 256, you included")
    );
    assert_eq!(
        post(r#"{"participants":["bo"],"title":5}"#),
        bad("title must be a string")
    );
    assert_eq!(
        post(r#"{"participants":["bo"],"id":["x"]}"#),
        bad("id must be a string")
    );
    assert_eq!(
        post(&format!(
            r#"{{"participants":["bo"],"title":"{}"}}"#,
            "t".repeat(THREAD_TITLE_BYTES_MAX + 1)
        )),
        bad("title must be at most 256 bytes")
    );
    assert_eq!(
        post(&format!(r#"{{"participants":["bo"],"id":"{long}"}}"#)),
        bad("id must be at most 256 bytes")
    );
    // Integers are user ids too; duplicates collapse in order; escapes are decoded; unknown
    // members, null and "" optional members are ignored.
    assert_eq!(
        store(
            "POST",
            p,
            r#"{"participants":[2,"bo","b\u006f",2,"c\"y"],"title":"","id":null,"extra":{"a":[1]}}"#
        ),
        RestOp::CreateThread {
            id: None,
            participants: vec![a("2"), a("bo"), a("c\"y")],
            title: None,
        }
    );
    let max: Vec<String> = (0..THREAD_PARTICIPANTS_MAX)
        .map(|i| format!("\"u{i}\""))
        .collect();
    assert!(matches!(
        store("POST", p, &format!(r#"{{"participants":[{}]}}"#, max.join(","))),
        RestOp::CreateThread { participants, .. } if participants.len() == THREAD_PARTICIPANTS_MAX
    ));
}

#[test]
fn send_message_bodies() {
    let p = "/api/v1/messages/threads/t/messages";
    let post = |b: &str| fails("POST", p, b);
    assert_eq!(post(""), bad("a JSON object body is required"));
    assert_eq!(post("{\"content\":\"x\""), bad("invalid JSON format"));
    assert_eq!(post("{\"content\":tru}"), bad("invalid JSON format"));
    assert_eq!(post("{}"), bad("content is required"));
    assert_eq!(post(r#"{"content":""}"#), bad("content is required"));
    assert_eq!(
        post(r#"{"content":null,"attachmentUrl":""}"#),
        bad("content is required")
    );
    assert_eq!(post(r#"{"content":5}"#), bad("content must be a string"));
    assert_eq!(
        post(r#"{"body":{"text":"x"}}"#),
        bad("body must be a string")
    );
    assert_eq!(
        post(r#"{"content":"x","attachmentUrl":1}"#),
        bad("attachmentUrl must be a string")
    );
    assert_eq!(
        post(r#"{"content":"x","clientMsgId":7}"#),
        bad("clientMsgId must be a string")
    );
    assert_eq!(
        post(r#"{"content":"x","body":"y"}"#),
        bad("give content or body, not both")
    );
    let long = "c".repeat(ID_BYTES_MAX + 1);
    assert_eq!(
        post(&format!(r#"{{"content":"x","clientMsgId":"{long}"}}"#)),
        bad("clientMsgId must be at most 256 bytes")
    );
    // Limits of message.send: content (here 16 bytes) and the URL; 413.
    let too_large = (413, "message too large".to_string());
    assert_eq!(
        post(&format!(r#"{{"content":"{}"}}"#, "x".repeat(17))),
        too_large
    );
    assert_eq!(
        post(&format!(
            r#"{{"attachmentUrl":"https://{}"}}"#,
            "x".repeat(URL_BYTES_MAX)
        )),
        too_large
    );
    assert!(matches!(
        store("POST", p, &format!(r#"{{"content":"{}"}}"#, "x".repeat(16))),
        RestOp::SendMessage { content, .. } if content.len() == 16
    ));
    // `body` is `content`; an attachment alone is a message; "" optional members are none.
    assert_eq!(
        store("POST", p, r#"{"body":"hé\n","clientMsgId":""}"#),
        RestOp::SendMessage {
            thread: ThreadRef::Id(a("t")),
            content: a("hé\n"),
            attachment_url: None,
            client_msg_id: None,
        }
    );
    assert_eq!(
        store(
            "POST",
            "/api/v1/messages/threads/5/messages",
            r#"{"attachmentUrl":"https://x/a.png","threadId":"ignored"}"#
        ),
        RestOp::SendMessage {
            thread: ThreadRef::IdOrNumber(a("5"), 5),
            content: a(""),
            attachment_url: Some(a("https://x/a.png")),
            client_msg_id: None,
        }
    );
}

/// U+0000 in any text input, decoded from JSON (`\u0000`) or from a path or query (`%00`), is
/// refused with the stores' text: PostgreSQL cannot hold it.
#[test]
fn nul_is_refused_in_every_text_input() {
    let nul = bad(NUL_TEXT);
    assert_eq!(nul.1, "text must not contain NUL characters");
    let threads = "/api/v1/messages/threads";
    for body in [
        r#"{"participants":["bo\u0000"]}"#,
        r#"{"participants":["bo"],"title":"a\u0000b"}"#,
        r#"{"participants":["bo"],"id":"x\u0000"}"#,
    ] {
        assert_eq!(fails("POST", threads, body), nul, "{body}");
    }
    let send = "/api/v1/messages/threads/t/messages";
    for body in [
        r#"{"content":"a\u0000b"}"#,
        r#"{"body":"\u0000"}"#,
        r#"{"content":"x","attachmentUrl":"https://x/\u0000"}"#,
        r#"{"content":"x","clientMsgId":"c\u0000"}"#,
    ] {
        assert_eq!(fails("POST", send, body), nul, "{body}");
    }
    for (method, target, body) in [
        ("GET", "/api/v1/messages/threads/t%00", ""),
        ("GET", "/api/v1/messages/threads/t%00/messages", ""),
        (
            "POST",
            "/api/v1/messages/threads/t%00/messages",
            r#"{"content":"x"}"#,
        ),
        ("PUT", "/api/v1/messages/%00/read", ""),
        ("PUT", "/api/v1/notifications/%00/read", ""),
        ("GET", "/api/v1/presence/user/al%00", ""),
        ("GET", "/api/v1/presence/online?after=al%00", ""),
    ] {
        assert_eq!(fails(method, target, body), nul, "{method} {target}");
    }
    // Escapes that are not NUL are fine.
    assert!(matches!(
        store("POST", send, r#"{"content":"a\u0001b"}"#),
        RestOp::SendMessage { content, .. } if &*content == "a\u{1}b"
    ));
}

/// Numeric ids are the store's: a caller's thread id must not be all digits.
#[test]
fn a_thread_id_of_digits_is_refused() {
    let p = "/api/v1/messages/threads";
    for id in ["\"42\"", "\"0\"", "\"0042\"", "\"18446744073709551616\""] {
        assert_eq!(
            fails(
                "POST",
                p,
                &format!(r#"{{"participants":["bo"],"id":{id}}}"#)
            ),
            bad(NUMERIC_ID),
            "{id}"
        );
    }
    assert_eq!(NUMERIC_ID, "id must not be all digits");
    for id in ["t42", "42 ", "-42", "4.2"] {
        assert!(matches!(
            store("POST", p, &format!(r#"{{"participants":["bo"],"id":"{id}"}}"#)),
            RestOp::CreateThread { id: Some(got), .. } if &*got == id
        ));
    }
}
