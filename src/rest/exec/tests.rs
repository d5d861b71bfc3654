//! `execute` against a scripted store double: each method answers what the test set and
//! records how it was called, so the tests check both the mapping to statuses and bodies
//! and what `execute` asked of the store.

use std::cell::RefCell;

use serde_json::{json, Value};

use super::*;
use crate::store::{MessageRef, NewNotification, Notification, Page, SyncPage, ThreadKind};

#[derive(Clone, Debug, PartialEq)]
enum Call {
    Threads(String, Option<u64>, usize),
    Thread(String, ThreadRef),
    Messages(String, ThreadRef, Option<u64>, usize),
    Create(NewThread),
    Mark(MarkRequest),
    Notifications(String, bool, Option<u64>, usize),
    NotificationRead(String, u64),
    ReadAll(String),
}

/// Answers for each method; `None` where a test does not expect the call (it panics).
#[derive(Default)]
struct Fake {
    /// Every call fails with `Unavailable`.
    down: bool,
    /// `thread` answers these in turn (the last one repeats); `Err` = unavailable.
    thread: RefCell<Vec<Result<Lookup<ThreadView>, StoreError>>>,
    threads: Option<Page<ThreadView>>,
    messages: Option<Lookup<Page<Message>>>,
    created: Option<Created>,
    marked: Option<Lookup<Marked>>,
    notifications: Option<Page<Notification>>,
    notification: Option<Lookup<Notification>>,
    read_all: u64,
    calls: RefCell<Vec<Call>>,
}

impl Fake {
    fn up(&self, c: Call) -> Result<(), StoreError> {
        self.calls.borrow_mut().push(c);
        if self.down {
            Err(StoreError::Unavailable("test".into()))
        } else {
            Ok(())
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }
}

impl Store for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }
    async fn append(&self, _: &[NewMessage]) -> crate::store::Result<Vec<Appended>> {
        panic!("execute never appends (the DM writer does)")
    }
    async fn create_thread(&self, new: &NewThread) -> crate::store::Result<Created> {
        self.up(Call::Create(new.clone()))?;
        Ok(self.created.clone().expect("create_thread"))
    }
    async fn threads(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
    ) -> crate::store::Result<Page<ThreadView>> {
        self.up(Call::Threads(user.into(), before, limit))?;
        Ok(self.threads.clone().expect("threads"))
    }
    async fn thread(&self, user: &str, t: &ThreadRef) -> crate::store::Result<Lookup<ThreadView>> {
        self.up(Call::Thread(user.into(), t.clone()))?;
        let mut q = self.thread.borrow_mut();
        if q.len() > 1 {
            q.remove(0)
        } else {
            q.first().cloned().expect("thread")
        }
    }
    async fn messages(
        &self,
        user: &str,
        t: &ThreadRef,
        before: Option<u64>,
        limit: usize,
    ) -> crate::store::Result<Lookup<Page<Message>>> {
        self.up(Call::Messages(user.into(), t.clone(), before, limit))?;
        Ok(self.messages.clone().expect("messages"))
    }
    async fn mark(&self, req: &MarkRequest) -> crate::store::Result<Lookup<Marked>> {
        self.up(Call::Mark(req.clone()))?;
        Ok(self.marked.clone().expect("mark"))
    }
    async fn sync(&self, _: &str, _: Option<u64>, _: usize) -> crate::store::Result<SyncPage> {
        panic!("REST has no sync")
    }
    async fn store_notification(
        &self,
        _: &NewNotification,
    ) -> crate::store::Result<crate::store::Noted> {
        panic!("REST adds no notification")
    }
    async fn notifications(
        &self,
        user: &str,
        unread: bool,
        before: Option<u64>,
        limit: usize,
    ) -> crate::store::Result<Page<Notification>> {
        self.up(Call::Notifications(user.into(), unread, before, limit))?;
        Ok(self.notifications.clone().expect("notifications"))
    }
    async fn notification_read(
        &self,
        user: &str,
        id: u64,
    ) -> crate::store::Result<Lookup<Notification>> {
        self.up(Call::NotificationRead(user.into(), id))?;
        Ok(self.notification.clone().expect("notification_read"))
    }
    async fn notifications_read_all(&self, user: &str) -> crate::store::Result<u64> {
        self.up(Call::ReadAll(user.into()))?;
        Ok(self.read_all)
    }
    async fn mark_produced(&self, _: &[u64]) -> crate::store::Result<()> {
        unreachable!("REST never marks produced")
    }
    async fn produced(&self, _: &[u64]) -> crate::store::Result<Vec<bool>> {
        unreachable!("REST never asks")
    }
    async fn ping(&self) -> crate::store::Result<()> {
        Ok(())
    }
}

const NOW: u64 = 1_795_323_933_353;

fn run<S: Store>(store: &S, user: &str, op: RestOp) -> Executed {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(execute(store, user, op, NOW))
}

fn body(e: &Executed) -> Value {
    serde_json::from_slice(&e.body).unwrap_or_else(|_| panic!("{:?}", e))
}

fn a(s: &str) -> Arc<str> {
    Arc::from(s)
}

fn msg(id: u64, seq: u64, from: &str) -> Message {
    Message {
        id,
        seq,
        thread: a("t-1"),
        thread_numeric_id: 3,
        server_msg_id: u128::from(id) << 64,
        event_id: 1,
        sender: a(from),
        to: None,
        client_msg_id: None,
        content: a("m"),
        attachment_url: None,
        sent_at_ms: NOW,
    }
}

fn view(id: &str, participants: &[&str]) -> ThreadView {
    ThreadView {
        id: a(id),
        numeric_id: 3,
        kind: ThreadKind::Group,
        title: None,
        participants: participants.iter().map(|p| a(p)).collect(),
        created_at_ms: NOW,
        last_seq: 0,
        last_message: None,
        read_seq: 0,
        unread: 0,
    }
}

fn notif(id: u64) -> Notification {
    Notification {
        id,
        user: a("al"),
        kind: a("jobs.posted"),
        data_json: a(r#"{"jobId":1}"#),
        source_key: None,
        created_at_ms: NOW,
        read: false,
    }
}

fn err(e: &Executed) -> (u16, String) {
    (e.status.0, body(e)["error"].as_str().unwrap().to_owned())
}

#[test]
fn lists_are_pages_with_next() {
    let f = Fake {
        threads: Some(Page {
            items: vec![view("t-1", &["al", "bo"])],
            next: Some(17),
        }),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::ListThreads {
            before: Some(20),
            limit: 1,
        },
    );
    assert_eq!(e.status, Status::OK);
    let v = body(&e);
    assert_eq!(v["threads"][0]["id"], "t-1");
    assert_eq!(v["next"], 17);
    assert_eq!(f.calls(), [Call::Threads("al".into(), Some(20), 1)]);

    let f = Fake {
        messages: Some(Lookup::Found(Page {
            items: vec![msg(9, 2, "bo"), msg(8, 1, "al")],
            next: None,
        })),
        ..Fake::default()
    };
    let t = ThreadRef::parse("3");
    let e = run(
        &f,
        "al",
        RestOp::ListMessages {
            thread: t.clone(),
            before: None,
            limit: 50,
        },
    );
    let v = body(&e);
    assert_eq!(
        (
            v["messages"][0]["seq"].as_u64(),
            v["messages"][1]["id"].as_u64()
        ),
        (Some(2), Some(8))
    );
    assert!(v["next"].is_null());
    assert_eq!(f.calls(), [Call::Messages("al".into(), t, None, 50)]);

    let f = Fake {
        notifications: Some(Page {
            items: vec![notif(4)],
            next: Some(4),
        }),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::ListNotifications {
            unread_only: true,
            before: None,
            limit: 1,
        },
    );
    let v = body(&e);
    assert_eq!(
        v,
        json!({"notifications": [{"id": 4, "kind": "jobs.posted", "data": {"jobId": 1},
        "read": false, "createdAt": "2026-11-22T05:05:33.353Z"}], "next": 4})
    );
    assert_eq!(f.calls(), [Call::Notifications("al".into(), true, None, 1)]);
}

#[test]
fn lookups_map_to_404_and_403() {
    for (l, want) in [
        (Lookup::NotFound, (404, "thread not found")),
        (Lookup::Forbidden, (403, "not a participant of this thread")),
    ] {
        let f = Fake {
            thread: RefCell::new(vec![Ok(l.clone())]),
            ..Fake::default()
        };
        let get = run(
            &f,
            "al",
            RestOp::GetThread {
                thread: ThreadRef::parse("t"),
            },
        );
        assert_eq!(err(&get), (want.0, want.1.into()));
        let send = run(
            &f,
            "al",
            RestOp::SendMessage {
                thread: ThreadRef::parse("t"),
                content: a("x"),
                attachment_url: None,
                client_msg_id: None,
            },
        );
        assert_eq!(err(&send), (want.0, want.1.into()));
        assert!(send.effects.is_empty());
        let f = Fake {
            messages: Some(l.clone().map(|_: ThreadView| unreachable!())),
            ..Fake::default()
        };
        let e = run(
            &f,
            "al",
            RestOp::ListMessages {
                thread: ThreadRef::parse("t"),
                before: None,
                limit: 5,
            },
        );
        assert_eq!(err(&e), (want.0, want.1.into()));
    }
    let f = Fake {
        thread: RefCell::new(vec![Ok(Lookup::Found(view("t", &["al"])))]),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::GetThread {
            thread: ThreadRef::parse("t"),
        },
    );
    assert_eq!((e.status, body(&e)["id"].as_str()), (Status::OK, Some("t")));
    // Notifications: another user's is NotFound, as the store says.
    let f = Fake {
        notification: Some(Lookup::NotFound),
        ..Fake::default()
    };
    assert_eq!(
        err(&run(&f, "al", RestOp::NotificationRead { id: 4 })),
        (404, "notification not found".into())
    );
    let mut n = notif(4);
    n.read = true;
    let f = Fake {
        notification: Some(Lookup::Found(n)),
        ..Fake::default()
    };
    let e = run(&f, "al", RestOp::NotificationRead { id: 4 });
    assert_eq!(
        (e.status, body(&e)["read"].as_bool()),
        (Status::OK, Some(true))
    );
    assert_eq!(f.calls(), [Call::NotificationRead("al".into(), 4)]);
    let f = Fake {
        read_all: 3,
        ..Fake::default()
    };
    let e = run(&f, "al", RestOp::NotificationsReadAll);
    assert_eq!(body(&e), json!({"updated": 3}));
}

#[test]
fn a_store_error_is_503_on_every_op() {
    let f = Fake {
        down: true,
        ..Fake::default()
    };
    let t = || ThreadRef::parse("t");
    for op in [
        RestOp::ListThreads {
            before: None,
            limit: 1,
        },
        RestOp::GetThread { thread: t() },
        RestOp::ListMessages {
            thread: t(),
            before: None,
            limit: 1,
        },
        RestOp::CreateThread {
            id: None,
            participants: vec![a("bo")],
            title: None,
        },
        RestOp::SendMessage {
            thread: t(),
            content: a("x"),
            attachment_url: None,
            client_msg_id: None,
        },
        RestOp::MarkRead {
            message: MessageRef::Number(1),
        },
        RestOp::ListNotifications {
            unread_only: false,
            before: None,
            limit: 1,
        },
        RestOp::NotificationRead { id: 1 },
        RestOp::NotificationsReadAll,
    ] {
        let e = run(&f, "al", op.clone());
        assert_eq!(err(&e), (503, STORE_UNAVAILABLE.into()), "{op:?}");
        assert!(e.effects.is_empty());
    }
}

#[test]
fn create_thread_derives_the_dm_id_for_two_and_dedups_the_creator() {
    let created = view("x", &["al", "bo"]);
    let f = Fake {
        created: Some(Created::New(created.clone())),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::CreateThread {
            id: None,
            participants: vec![a("bo"), a("al")],
            title: Some(a("hi")),
        },
    );
    assert_eq!(
        (e.status, body(&e)["id"].as_str()),
        (Status::CREATED, Some("x"))
    );
    let Call::Create(new) = &f.calls()[0] else {
        panic!()
    };
    assert_eq!(
        new.id.as_deref(),
        Some(derive_conversation_id("al", "bo").as_str())
    );
    assert_eq!(new.kind, ThreadKind::Direct, "the pair's conversation");
    assert_eq!(
        (new.creator.as_ref(), new.participants.clone()),
        ("al", vec![a("bo")])
    );
    assert_eq!((new.title.as_deref(), new.created_at_ms), (Some("hi"), NOW));
    // Only yourself: your self-DM conversation.
    let f = Fake {
        created: Some(Created::New(created.clone())),
        ..Fake::default()
    };
    run(
        &f,
        "al",
        RestOp::CreateThread {
            id: None,
            participants: vec![a("al")],
            title: None,
        },
    );
    let Call::Create(new) = &f.calls()[0] else {
        panic!()
    };
    assert_eq!(
        new.id.as_deref(),
        Some(derive_conversation_id("al", "al").as_str())
    );
    assert_eq!(new.kind, ThreadKind::Direct);
    assert!(new.participants.is_empty());
    // Three or more: the store names it; an asked id is kept.
    let f = Fake {
        created: Some(Created::New(created.clone())),
        ..Fake::default()
    };
    run(
        &f,
        "al",
        RestOp::CreateThread {
            id: None,
            participants: vec![a("bo"), a("cy")],
            title: None,
        },
    );
    let Call::Create(new) = &f.calls()[0] else {
        panic!()
    };
    assert_eq!((new.id.clone(), new.kind), (None, ThreadKind::Group));
    let f = Fake {
        created: Some(Created::New(created.clone())),
        ..Fake::default()
    };
    run(
        &f,
        "al",
        RestOp::CreateThread {
            id: Some(a("mine")),
            participants: vec![a("bo")],
            title: None,
        },
    );
    let Call::Create(new) = &f.calls()[0] else {
        panic!()
    };
    assert_eq!(new.id.as_deref(), Some("mine"));
    assert_eq!(
        new.kind,
        ThreadKind::Group,
        "an id of their own: a group of two"
    );
    // Existing: 200 for a participant, 403 otherwise.
    let f = Fake {
        created: Some(Created::Exists(Lookup::Found(created))),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::CreateThread {
            id: Some(a("x")),
            participants: vec![a("bo")],
            title: None,
        },
    );
    assert_eq!(e.status, Status::OK);
    let f = Fake {
        created: Some(Created::Exists(Lookup::Forbidden)),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::CreateThread {
            id: Some(a("x")),
            participants: vec![a("bo")],
            title: None,
        },
    );
    assert_eq!(err(&e), (403, "not a participant of this thread".into()));
    // Too many with the creator: 255 others is the most.
    let many = |n: usize| (0..n).map(|i| a(&format!("u{i}"))).collect::<Vec<_>>();
    let f = Fake {
        created: Some(Created::New(view("x", &["al"]))),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::CreateThread {
            id: None,
            participants: many(THREAD_PARTICIPANTS_MAX),
            title: None,
        },
    );
    assert_eq!(e.status, Status::BAD_REQUEST);
    assert!(f.calls().is_empty());
    let mut with_me = many(THREAD_PARTICIPANTS_MAX - 1);
    with_me.push(a("al"));
    let e = run(
        &f,
        "al",
        RestOp::CreateThread {
            id: None,
            participants: with_me,
            title: None,
        },
    );
    assert_eq!(e.status, Status::CREATED);
}

/// Derived conversation ids (UUID v5) are not the caller's to choose: only the pair's own,
/// for the pair; nothing reaches the store otherwise.
#[test]
fn create_thread_refuses_anothers_conversation_id() {
    let created = Created::New(view("x", &["al", "bo"]));
    let create = |user: &str, id: &str, participants: &[&str]| {
        let f = Fake {
            created: Some(created.clone()),
            ..Fake::default()
        };
        let e = run(
            &f,
            user,
            RestOp::CreateThread {
                id: Some(a(id)),
                participants: participants.iter().map(|p| a(p)).collect(),
                title: None,
            },
        );
        (e, f.calls())
    };
    let theirs = derive_conversation_id("bo", "cy");
    for (user, id, who) in [
        // Mallory and the pair she wants to read.
        ("ma", theirs.as_str(), &["bo", "cy"][..]),
        ("ma", theirs.as_str(), &["bo"][..]),
        // One of the pair, but as a group of three.
        ("bo", theirs.as_str(), &["cy", "ma"][..]),
    ] {
        let (e, calls) = create(user, id, who);
        assert_eq!(err(&e), (400, RESERVED_ID.into()), "{user} {who:?}");
        assert_eq!(err(&e).1, "id is reserved for direct conversations");
        assert!(calls.is_empty());
    }
    // Another spelling of the pair's own id is not their id either.
    let upper = theirs.to_uppercase();
    let braced = format!("{{{theirs}}}");
    for id in [upper.as_str(), braced.as_str()] {
        let (e, calls) = create("bo", id, &["cy"]);
        assert_eq!(err(&e), (400, RESERVED_ID.into()), "{id}");
        assert!(calls.is_empty());
    }
    // Exactly their own, by one of them: their direct conversation.
    let (e, calls) = create("cy", &theirs, &["bo"]);
    assert_eq!(e.status, Status::CREATED);
    let [Call::Create(new)] = calls.as_slice() else {
        panic!("{calls:?}")
    };
    assert_eq!(
        (new.id.as_deref(), new.kind),
        (Some(theirs.as_str()), ThreadKind::Direct)
    );
    // Other UUIDs are ids like any other.
    let v4 = "6f1c2a4e-8d3b-4c5a-9e7f-1a2b3c4d5e6f";
    let (_, calls) = create("ma", v4, &["bo", "cy"]);
    let [Call::Create(new)] = calls.as_slice() else {
        panic!("{calls:?}")
    };
    assert_eq!((new.id.as_deref(), new.kind), (Some(v4), ThreadKind::Group));
    // What the store refuses is the client's to fix: 400 with the store's text.
    let f = Fake {
        created: Some(Created::Refused(Refusal::InvalidText)),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::CreateThread {
            id: None,
            participants: vec![a("bo"), a("cy")],
            title: None,
        },
    );
    assert_eq!(
        err(&e),
        (400, "text must not contain NUL characters".into())
    );
}

#[test]
fn send_resolves_the_thread_and_hands_the_message_to_the_writer() {
    let mut direct = view("conv-ab", &["al", "bo"]);
    direct.kind = ThreadKind::Direct;
    let f = Fake {
        thread: RefCell::new(vec![Ok(Lookup::Found(direct))]),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::SendMessage {
            thread: ThreadRef::parse("42"),
            content: a("hello"),
            attachment_url: Some(a("https://x/y.png")),
            client_msg_id: Some(a("c-9")),
        },
    );
    assert_eq!((e.status, e.body.len()), (Status::CREATED, 0));
    assert_eq!(
        f.calls(),
        [Call::Thread("al".into(), ThreadRef::parse("42"))]
    );
    let [Effect::Send(m)] = e.effects.as_slice() else {
        panic!("{e:?}")
    };
    assert_eq!(
        (&*m.thread, &*m.sender, m.to.as_deref()),
        ("conv-ab", "al", Some("bo"))
    );
    assert_eq!(
        (
            &*m.content,
            m.attachment_url.as_deref(),
            m.client_msg_id.as_deref()
        ),
        ("hello", Some("https://x/y.png"), Some("c-9"))
    );
    assert_eq!(m.sent_at_ms, NOW);
    assert_ne!(m.server_msg_id, m.event_id);
    assert_eq!(uuid::Uuid::from_u128(m.server_msg_id).get_version_num(), 7);
    // A group thread, even of two: no `to` (a message to every participant).
    let f = Fake {
        thread: RefCell::new(vec![Ok(Lookup::Found(view("g-ab", &["al", "bo"])))]),
        ..Fake::default()
    };
    let e = run(
        &f,
        "al",
        RestOp::SendMessage {
            thread: ThreadRef::parse("g-ab"),
            content: a("hello"),
            attachment_url: None,
            client_msg_id: None,
        },
    );
    let [Effect::Send(m)] = e.effects.as_slice() else {
        panic!("{e:?}")
    };
    assert_eq!((&*m.thread, m.to.as_deref()), ("g-ab", None));
    // Groups: no `to`; yourself alone: `to` is you.
    assert_eq!(recipient("al", &[a("al"), a("bo"), a("cy")]), None);
    assert_eq!(recipient("al", &[a("al")]).as_deref(), Some("al"));
    assert_eq!(recipient("bo", &[a("al"), a("bo")]).as_deref(), Some("al"));
    assert_eq!(recipient("cy", &[a("al"), a("bo")]), None);
}

#[test]
fn rendering_an_append_outcome() {
    let m = msg(12, 5, "al");
    let e = render_appended(&Appended::New {
        message: m.clone(),
        participants: vec![a("al")],
    });
    assert_eq!(
        (e.status, body(&e)["id"].as_u64()),
        (Status::CREATED, Some(12))
    );
    assert_eq!(body(&e)["cursor"], 12);
    let e = render_appended(&Appended::Duplicate(m));
    assert_eq!(e.status, Status::OK);
    assert_eq!(
        err(&render_appended(&Appended::Refused(Refusal::UnknownThread))),
        (404, "thread not found".into())
    );
    assert_eq!(
        err(&render_appended(&Appended::Refused(
            Refusal::NotParticipant
        ))),
        (403, "not a participant of this thread".into())
    );
    assert_eq!(
        err(&render_appended(&Appended::Refused(Refusal::InvalidText))),
        (400, "text must not contain NUL characters".into())
    );
    assert_eq!(
        err(&render_appended(&Appended::Refused(
            Refusal::NumericThreadId
        ))),
        (400, "conversation id must not be all digits".into())
    );
    let e = store_unavailable();
    assert_eq!(
        err(&e),
        (503, "message store unavailable, retry later".into())
    );
    let bytes = http_response(e.status, &e.body, true, Some("https://app.example"));
    let text = String::from_utf8(bytes).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{text}"
    );
    assert!(text.contains("Content-Type: application/json\r\n"));
    assert!(text.contains("Access-Control-Allow-Origin: https://app.example\r\n"));
    assert!(text.contains("Connection: keep-alive\r\n"));
    assert!(text.ends_with("\r\n\r\n{\"error\":\"message store unavailable, retry later\"}"));
    let text = String::from_utf8(http_response(Status::OK, b"{}", false, None)).unwrap();
    assert!(text.contains("Connection: close\r\n") && !text.contains("Access-Control"));
}

#[test]
fn mark_read_answers_the_thread_and_emits_the_receipt() {
    let marked = Marked {
        thread: a("t-1"),
        thread_numeric_id: 3,
        up_to_seq: 2,
        messages: vec![msg(9, 2, "bo")],
    };
    let mut after = view("t-1", &["al", "bo"]);
    after.read_seq = 2;
    after.unread = 1;
    let f = Fake {
        marked: Some(Lookup::Found(marked.clone())),
        thread: RefCell::new(vec![Ok(Lookup::Found(after))]),
        ..Fake::default()
    };
    let id = MessageRef::ServerId(7);
    let e = run(&f, "al", RestOp::MarkRead { message: id });
    assert_eq!(e.status, Status::OK);
    let v = body(&e);
    assert_eq!(
        (v["readSeq"].as_u64(), v["unreadCount"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        e.effects,
        [Effect::Receipt {
            marked,
            by: a("al"),
            at_ms: NOW
        }]
    );
    assert_eq!(
        f.calls(),
        [
            Call::Mark(MarkRequest {
                user: a("al"),
                mark: Mark::Read,
                thread: None,
                messages: vec![id],
                at_ms: NOW,
            }),
            Call::Thread("al".into(), ThreadRef::Id(a("t-1"))),
        ]
    );
    // The mark is stored but the read after it fails: 503, and the receipt still goes out.
    let f = Fake {
        marked: Some(Lookup::Found(Marked {
            thread: a("t-1"),
            thread_numeric_id: 3,
            up_to_seq: 2,
            messages: vec![],
        })),
        thread: RefCell::new(vec![Err(StoreError::Timeout)]),
        ..Fake::default()
    };
    let e = run(&f, "al", RestOp::MarkRead { message: id });
    assert_eq!(err(&e), (503, STORE_UNAVAILABLE.into()));
    assert_eq!(e.effects.len(), 1);
    for (l, want) in [(Lookup::NotFound, 404), (Lookup::Forbidden, 403)] {
        let f = Fake {
            marked: Some(l),
            ..Fake::default()
        };
        let e = run(&f, "al", RestOp::MarkRead { message: id });
        assert_eq!(e.status.0, want);
        assert!(e.effects.is_empty());
    }
    let f = Fake {
        marked: Some(Lookup::NotFound),
        ..Fake::default()
    };
    assert_eq!(
        err(&run(&f, "al", RestOp::MarkRead { message: id })).1,
        "message not found"
    );
}

/// The whole REST flow against the real in-memory store (the DM writer's part, `append`,
/// done here as the bridge would).
#[test]
fn against_the_memory_store() {
    use crate::store::conformance::dm;
    use crate::store::memory::MemoryStore;
    let s = MemoryStore::new(1 << 20);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ex = |user: &str, op: RestOp| rt.block_on(execute(&s, user, op, NOW));
    let conv = derive_conversation_id("al", "bo");
    let out = rt
        .block_on(s.append(&[
            dm(&conv, "al", "bo", "c1", "one"),
            dm(&conv, "al", "bo", "c2", "two"),
        ]))
        .unwrap();
    let Appended::New { message: first, .. } = &out[0] else {
        panic!()
    };

    let v = body(&ex(
        "bo",
        RestOp::ListThreads {
            before: None,
            limit: 10,
        },
    ));
    assert_eq!(v["threads"][0]["id"], conv.as_str());
    assert_eq!(
        (v["threads"][0]["unreadCount"].as_u64(), &v["next"]),
        (Some(2), &Value::Null)
    );
    let numeric = v["threads"][0]["numericId"].as_u64().unwrap();
    let by_number = ThreadRef::parse(&numeric.to_string());
    let v = body(&ex(
        "bo",
        RestOp::GetThread {
            thread: by_number.clone(),
        },
    ));
    assert_eq!(
        (v["kind"].as_str(), v["lastMessage"]["content"].as_str()),
        (Some("direct"), Some("two"))
    );
    let p1 = body(&ex(
        "bo",
        RestOp::ListMessages {
            thread: by_number.clone(),
            before: None,
            limit: 1,
        },
    ));
    assert_eq!(
        (p1["messages"][0]["seq"].as_u64(), p1["next"].as_u64()),
        (Some(2), Some(2))
    );
    let p2 = body(&ex(
        "bo",
        RestOp::ListMessages {
            thread: by_number.clone(),
            before: Some(2),
            limit: 1,
        },
    ));
    assert_eq!(
        (p2["messages"][0]["content"].as_str(), &p2["next"]),
        (Some("one"), &Value::Null)
    );

    // A REST send: resolved here, appended by the writer, answered from the outcome.
    let send = |cmid: &str| RestOp::SendMessage {
        thread: by_number.clone(),
        content: a("three"),
        attachment_url: None,
        client_msg_id: Some(a(cmid)),
    };
    let e = ex("bo", send("r1"));
    let [Effect::Send(m)] = e.effects.as_slice() else {
        panic!("{e:?}")
    };
    assert_eq!((&*m.thread, m.to.as_deref()), (conv.as_str(), Some("al")));
    let stored = rt.block_on(s.append(std::slice::from_ref(m))).unwrap();
    let answer = render_appended(&stored[0]);
    let v = body(&answer);
    assert_eq!(
        (answer.status, v["seq"].as_u64(), v["senderId"].as_str()),
        (Status::CREATED, Some(3), Some("bo"))
    );
    let Effect::Send(again) = &ex("bo", send("r1")).effects[0] else {
        panic!()
    };
    let dup = render_appended(&rt.block_on(s.append(std::slice::from_ref(again))).unwrap()[0]);
    assert_eq!(
        (dup.status, body(&dup)["id"].clone()),
        (Status::OK, v["id"].clone())
    );

    // bo reads al's first message: readSeq 1, one of al's left unread; the receipt names al.
    let e = ex(
        "bo",
        RestOp::MarkRead {
            message: MessageRef::ServerId(first.server_msg_id),
        },
    );
    let v = body(&e);
    assert_eq!(
        (v["readSeq"].as_u64(), v["unreadCount"].as_u64()),
        (Some(1), Some(1))
    );
    let [Effect::Receipt { marked, by, .. }] = e.effects.as_slice() else {
        panic!()
    };
    assert_eq!(
        (&**by, &*marked.messages[0].sender, &*marked.thread),
        ("bo", "al", conv.as_str())
    );
    assert_eq!(
        err(&ex(
            "bo",
            RestOp::MarkRead {
                message: MessageRef::Number(u64::MAX >> 3)
            }
        ))
        .0,
        404
    );
    assert_eq!(
        err(&ex(
            "cy",
            RestOp::MarkRead {
                message: MessageRef::ServerId(first.server_msg_id)
            }
        ))
        .0,
        403
    );

    // "A thread with bo" is their DM conversation.
    let e = ex(
        "al",
        RestOp::CreateThread {
            id: None,
            participants: vec![a("bo")],
            title: None,
        },
    );
    assert_eq!(
        (e.status, body(&e)["id"].as_str()),
        (Status::OK, Some(conv.as_str()))
    );
    let e = ex(
        "al",
        RestOp::CreateThread {
            id: None,
            participants: vec![a("bo"), a("cy")],
            title: Some(a("team")),
        },
    );
    assert_eq!(e.status, Status::CREATED);
    let g = body(&e);
    assert_eq!(g["participants"], json!(["al", "bo", "cy"]));
    let gid = ThreadRef::parse(g["id"].as_str().unwrap());
    assert_eq!(
        body(&ex(
            "cy",
            RestOp::GetThread {
                thread: gid.clone()
            }
        ))["title"],
        "team"
    );
    assert_eq!(
        err(&ex(
            "dan",
            RestOp::GetThread {
                thread: gid.clone()
            }
        ))
        .0,
        403
    );
    assert_eq!(
        err(&ex(
            "dan",
            RestOp::ListMessages {
                thread: gid,
                before: None,
                limit: 5
            }
        ))
        .0,
        403
    );
    assert_eq!(
        err(&ex(
            "al",
            RestOp::GetThread {
                thread: ThreadRef::parse("nope")
            }
        ))
        .0,
        404
    );

    // Notifications.
    for i in 0..3u64 {
        let n = NewNotification {
            user: a("al"),
            kind: a("jobs.posted"),
            data_json: a(&format!(r#"{{"n":{i}}}"#)),
            source_key: Some(a(&format!("jobs.posted/0/{i}"))),
            created_at_ms: NOW + i,
        };
        rt.block_on(s.add_notification(&n)).unwrap();
    }
    let v = body(&ex(
        "al",
        RestOp::ListNotifications {
            unread_only: true,
            before: None,
            limit: 2,
        },
    ));
    assert_eq!(
        (
            v["notifications"][0]["data"]["n"].as_u64(),
            v["next"].is_u64()
        ),
        (Some(2), true)
    );
    let newest = v["notifications"][0]["id"].as_u64().unwrap();
    assert_eq!(
        body(&ex("al", RestOp::NotificationRead { id: newest }))["read"],
        true
    );
    assert_eq!(
        err(&ex("bo", RestOp::NotificationRead { id: newest })).0,
        404
    );
    assert_eq!(
        body(&ex("al", RestOp::NotificationsReadAll)),
        json!({"updated": 2})
    );
    let v = body(&ex(
        "al",
        RestOp::ListNotifications {
            unread_only: true,
            before: None,
            limit: 2,
        },
    ));
    assert_eq!(v, json!({"notifications": [], "next": null}));
}
