//! The behaviour every [`Store`] implementation must have, as one test body: the in-memory
//! store's unit tests and the PostgreSQL integration test (`tests/store_pg.rs`) both call
//! [`run_all`]. Every user and thread id is prefixed, so runs against a shared database do not
//! see each other; ids are compared relative to each other, never to fixed numbers.
//!
//! Test code: it panics on a failed check.

use std::sync::Arc;

use super::*;

/// Run every check against `store`. `p` prefixes every user and thread id (unique per run).
pub async fn run_all<S: Store>(store: &S, p: &str) {
    dm_creates_thread_and_orders(store, p).await;
    idempotent_in_and_across_batches(store, p).await;
    participants_are_enforced(store, p).await;
    group_threads(store, p).await;
    dms_go_only_into_the_pairs_direct_thread(store, p).await;
    direct_threads_over_rest(store, p).await;
    no_thread_has_an_all_digit_id(store, p).await;
    nul_text_is_refused_alone(store, p).await;
    threads_list_and_paginate(store, p).await;
    messages_paginate_newest_first(store, p).await;
    marks_move_forward(store, p).await;
    co_participants_rank_by_activity(store, p).await;
    sync_pages(store, p).await;
    notifications(store, p).await;
    produced_marks(store, p).await;
    store.ping().await.expect("ping");
}

/// `mark_produced` / `produced`: per message, kept for its duplicates; unknown ids are false.
async fn produced_marks<S: Store>(store: &S, p: &str) {
    let (alice, bob) = (format!("{p}pa"), format!("{p}pb"));
    let t = format!("{p}produced");
    let batch = [
        dm(&t, &alice, &bob, &format!("{p}pc1"), "one"),
        dm(&t, &alice, &bob, &format!("{p}pc2"), "two"),
    ];
    let outs = store.append(&batch).await.expect("append");
    let ids: Vec<u64> = outs.iter().map(|o| new_of(o).id).collect();
    let unknown = u64::MAX / 2;
    assert_eq!(
        store.produced(&[ids[0], ids[1], unknown]).await.unwrap(),
        vec![false, false, false]
    );
    store.mark_produced(&[ids[1], unknown]).await.unwrap();
    assert_eq!(
        store.produced(&[ids[0], ids[1], unknown]).await.unwrap(),
        vec![false, true, false]
    );
    // Marking again is harmless; an empty call is a no-op.
    store.mark_produced(&[ids[1]]).await.unwrap();
    store.mark_produced(&[]).await.unwrap();
    assert!(store.produced(&[]).await.unwrap().is_empty());
    // A retry of the produced message is still a duplicate, and still produced.
    let again = store.append(&batch[1..]).await.unwrap();
    match &again[0] {
        Appended::Duplicate(m) => {
            assert_eq!(m.id, ids[1]);
            assert_eq!(store.produced(&[m.id]).await.unwrap(), vec![true]);
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
}

fn a(s: String) -> Arc<str> {
    Arc::from(s)
}

/// A DM from `from` to `to` in `thread`, with a fresh server id.
pub fn dm(thread: &str, from: &str, to: &str, cmid: &str, content: &str) -> NewMessage {
    NewMessage {
        server_msg_id: uuid::Uuid::now_v7().as_u128(),
        event_id: uuid::Uuid::now_v7().as_u128(),
        thread: Arc::from(thread),
        sender: Arc::from(from),
        to: Some(Arc::from(to)),
        client_msg_id: Some(Arc::from(cmid)),
        content: Arc::from(content),
        attachment_url: None,
        sent_at_ms: 1_700_000_000_000,
    }
}

fn new_of(out: &Appended) -> &Message {
    match out {
        Appended::New { message, .. } => message,
        other => panic!("expected New, got {other:?}"),
    }
}

fn found<T: std::fmt::Debug>(l: Lookup<T>) -> T {
    match l {
        Lookup::Found(t) => t,
        other => panic!("expected Found, got {other:?}"),
    }
}

async fn dm_creates_thread_and_orders<S: Store>(s: &S, p: &str) {
    let (al, bo, t) = (format!("{p}al"), format!("{p}bo"), format!("{p}t1"));
    let out = s
        .append(&[dm(&t, &al, &bo, "c1", "one"), dm(&t, &bo, &al, "c2", "two")])
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    let (m1, m2) = (new_of(&out[0]).clone(), new_of(&out[1]).clone());
    assert_eq!((m1.seq, m2.seq), (1, 2));
    assert!(m2.id > m1.id, "ids increase in batch order");
    assert_eq!(m1.thread_numeric_id, m2.thread_numeric_id);
    assert_eq!(&*m1.content, "one");
    assert_eq!(m1.to.as_deref(), Some(&*bo));
    if let Appended::New { participants, .. } = &out[0] {
        let mut got: Vec<&str> = participants.iter().map(|u| &**u).collect();
        got.sort_unstable();
        assert_eq!(got, [&*al, &*bo]);
    }
    // A later batch continues the thread's sequence and the global ids.
    let out = s.append(&[dm(&t, &al, &bo, "c3", "three")]).await.unwrap();
    let m3 = new_of(&out[0]);
    assert_eq!(m3.seq, 3);
    assert!(m3.id > m2.id);
    let view = found(s.thread(&al, &ThreadRef::Id(a(t.clone()))).await.unwrap());
    assert_eq!(view.kind, ThreadKind::Direct);
    assert_eq!(view.participants, vec![a(al.clone()), a(bo.clone())]);
    assert_eq!(view.last_seq, 3);
    assert_eq!(view.last_message.as_ref().map(|m| m.id), Some(m3.id));
    // Unread for al: bo's one message; for bo: al's two.
    assert_eq!(view.unread, 1);
    let bview = found(s.thread(&bo, &ThreadRef::Id(a(t.clone()))).await.unwrap());
    assert_eq!(bview.unread, 2);
    // The numeric id names the same thread.
    let by_num = found(
        s.thread(&al, &ThreadRef::parse(&view.numeric_id.to_string()))
            .await
            .unwrap(),
    );
    assert_eq!(by_num.id, view.id);
    assert_eq!(
        s.thread(&al, &ThreadRef::Id(a(format!("{p}nope"))))
            .await
            .unwrap(),
        Lookup::NotFound
    );
}

async fn idempotent_in_and_across_batches<S: Store>(s: &S, p: &str) {
    let (al, bo, t) = (format!("{p}al2"), format!("{p}bo2"), format!("{p}t2"));
    let first = dm(&t, &al, &bo, "same", "x");
    let again = dm(&t, &al, &bo, "same", "x (retry)");
    let out = s.append(&[first.clone(), again.clone()]).await.unwrap();
    let m = new_of(&out[0]).clone();
    assert_eq!(out[1], Appended::Duplicate(m.clone()), "in-batch duplicate");
    let out = s.append(&[again]).await.unwrap();
    assert_eq!(out[0], Appended::Duplicate(m.clone()), "later duplicate");
    assert_eq!(m.server_msg_id, first.server_msg_id);
    // The same clientMsgId from another sender is another message.
    let out = s.append(&[dm(&t, &bo, &al, "same", "y")]).await.unwrap();
    assert_eq!(new_of(&out[0]).seq, 2);
    // No clientMsgId: never deduplicated (two sends, each with its own server id, as the
    // shard assigns them; the same server id twice is the same message).
    let anon = || NewMessage {
        client_msg_id: None,
        ..dm(&t, &al, &bo, "", "z")
    };
    let out = s.append(&[anon(), anon()]).await.unwrap();
    assert_eq!((new_of(&out[0]).seq, new_of(&out[1]).seq), (3, 4));
}

async fn participants_are_enforced<S: Store>(s: &S, p: &str) {
    let (al, bo, cy, t) = (
        format!("{p}al3"),
        format!("{p}bo3"),
        format!("{p}cy3"),
        format!("{p}t3"),
    );
    s.append(&[dm(&t, &al, &bo, "1", "hi")]).await.unwrap();
    let out = s
        .append(&[
            dm(&t, &cy, &al, "2", "intruder"),
            dm(&t, &al, &cy, "3", "to outsider"),
            dm(&t, &bo, &al, "4", "fine"),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(out[1], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(new_of(&out[2]).seq, 2, "refusals take no seq");
    let mut into_nothing = dm(&format!("{p}missing"), &al, &bo, "5", "x");
    into_nothing.to = None;
    let out = s.append(&[into_nothing]).await.unwrap();
    assert_eq!(out[0], Appended::Refused(Refusal::UnknownThread));
    assert_eq!(
        s.thread(&cy, &ThreadRef::Id(a(t.clone()))).await.unwrap(),
        Lookup::Forbidden
    );
    assert_eq!(
        s.messages(&cy, &ThreadRef::Id(a(t)), None, 10)
            .await
            .unwrap(),
        Lookup::Forbidden
    );
}

async fn group_threads<S: Store>(s: &S, p: &str) {
    let (al, bo, cy) = (format!("{p}al4"), format!("{p}bo4"), format!("{p}cy4"));
    let new = NewThread {
        id: Some(a(format!("{p}g1"))),
        kind: ThreadKind::Group,
        creator: a(al.clone()),
        participants: vec![a(bo.clone()), a(cy.clone()), a(bo.clone()), a(al.clone())],
        title: Some(Arc::from("team")),
        created_at_ms: 1_700_000_000_000,
    };
    let Created::New(view) = s.create_thread(&new).await.unwrap() else {
        panic!("expected a new thread");
    };
    assert_eq!(view.kind, ThreadKind::Group);
    assert_eq!(
        view.participants,
        vec![a(al.clone()), a(bo.clone()), a(cy.clone())]
    );
    assert_eq!(view.title.as_deref(), Some("team"));
    assert_eq!(view.last_seq, 0);
    // Creating it again: the same thread, for a participant.
    match s.create_thread(&new).await.unwrap() {
        Created::Exists(Lookup::Found(v)) => assert_eq!(v.numeric_id, view.numeric_id),
        other => panic!("{other:?}"),
    }
    let mut stranger = new.clone();
    stranger.creator = a(format!("{p}zed4"));
    assert_eq!(
        s.create_thread(&stranger).await.unwrap(),
        Created::Exists(Lookup::Forbidden)
    );
    // A message without `to` reaches every participant.
    let mut m = dm(&view.id, &bo, "", "g", "hello team");
    m.to = None;
    let out = s.append(&[m]).await.unwrap();
    match &out[0] {
        Appended::New {
            message,
            participants,
        } => {
            assert_eq!(message.seq, 1);
            assert_eq!(message.to, None);
            let mut got = participants.clone();
            got.sort();
            assert_eq!(got, view.participants);
        }
        other => panic!("{other:?}"),
    }
    // A store-made id when none is asked for.
    let anon = NewThread {
        id: None,
        ..new.clone()
    };
    let Created::New(v2) = s.create_thread(&anon).await.unwrap() else {
        panic!("expected a new thread");
    };
    assert_ne!(v2.id, view.id);
    assert!(v2.numeric_id > view.numeric_id);
}

fn group(id: &str, creator: &str, others: &[&str]) -> NewThread {
    NewThread {
        id: Some(Arc::from(id)),
        kind: ThreadKind::Group,
        creator: Arc::from(creator),
        participants: others.iter().map(|u| Arc::from(*u)).collect(),
        title: None,
        created_at_ms: 1_700_000_000_000,
    }
}

fn direct(id: &str, creator: &str, others: &[&str]) -> NewThread {
    NewThread {
        kind: ThreadKind::Direct,
        ..group(id, creator, others)
    }
}

fn to_thread(thread: &str, from: &str, cmid: &str) -> NewMessage {
    NewMessage {
        to: None,
        ..dm(thread, from, "", cmid, "to the thread")
    }
}

/// Nobody can make a thread that another pair's DMs land in: a DM (`to` set) goes only into
/// the `direct` thread of exactly its sender and recipient.
async fn dms_go_only_into_the_pairs_direct_thread<S: Store>(s: &S, p: &str) {
    let (al, bo, cy, ma) = (
        format!("{p}al10"),
        format!("{p}bo10"),
        format!("{p}cy10"),
        format!("{p}ma10"),
    );
    // Mallory makes a group thread with al and bo under the id their DMs would use.
    let squat = format!("{p}t10-ab");
    let made = s.create_thread(&group(&squat, &ma, &[&al, &bo])).await;
    assert!(matches!(made.unwrap(), Created::New(_)));
    let out = s
        .append(&[
            dm(&squat, &al, &bo, "1", "secret"),
            dm(&squat, &bo, &al, "2", "secret"),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(out[1], Appended::Refused(Refusal::NotParticipant));
    let seen = found(
        s.messages(&ma, &ThreadRef::Id(a(squat.clone())), None, 10)
            .await
            .unwrap(),
    );
    assert!(seen.items.is_empty(), "mallory reads nothing");
    // Into a group of exactly the two: still not a DM; without `to` it is a group message.
    let pair_group = format!("{p}t10-g2");
    s.create_thread(&group(&pair_group, &al, &[&bo]))
        .await
        .unwrap();
    let out = s
        .append(&[
            dm(&pair_group, &al, &bo, "3", "dm?"),
            to_thread(&pair_group, &al, "4"),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(new_of(&out[1]).to, None);
    // A direct thread of another pair: mallory's DM to bo under al and bo's id.
    let theirs = format!("{p}t10-d");
    s.append(&[dm(&theirs, &al, &bo, "5", "hi")]).await.unwrap();
    let out = s
        .append(&[
            dm(&theirs, &ma, &bo, "6", "let me in"),
            dm(&theirs, &al, &cy, "7", "al to cy, wrong thread"),
            dm(&theirs, &al, &al, "8", "to myself, wrong thread"),
            dm(&theirs, &bo, &al, "9", "fine"),
            to_thread(&theirs, &al, "10"),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(out[1], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(out[2], Appended::Refused(Refusal::NotParticipant));
    assert_eq!(new_of(&out[3]).seq, 2);
    assert_eq!(
        new_of(&out[4]).seq,
        3,
        "a participant may write without `to`"
    );
    // A conversation with yourself takes only you.
    let own = format!("{p}t10-self");
    let out = s
        .append(&[
            dm(&own, &al, &al, "11", "note"),
            dm(&own, &al, &bo, "12", "x"),
        ])
        .await
        .unwrap();
    assert_eq!(new_of(&out[0]).seq, 1);
    assert_eq!(out[1], Appended::Refused(Refusal::NotParticipant));
    let view = found(s.thread(&al, &ThreadRef::Id(a(own))).await.unwrap());
    assert_eq!(
        (view.kind, view.participants),
        (ThreadKind::Direct, vec![a(al)])
    );
}

/// `POST /threads` for two people makes (or finds) their direct thread, the one their DMs use.
async fn direct_threads_over_rest<S: Store>(s: &S, p: &str) {
    let (al, bo, cy) = (format!("{p}al11"), format!("{p}bo11"), format!("{p}cy11"));
    let t = format!("{p}t11");
    let Created::New(v) = s
        .create_thread(&direct(&t, &al, &[&bo, &al]))
        .await
        .unwrap()
    else {
        panic!("expected a new thread");
    };
    assert_eq!(v.kind, ThreadKind::Direct);
    assert_eq!(v.participants, vec![a(al.clone()), a(bo.clone())]);
    // Their DMs land in it, either way round.
    let out = s
        .append(&[dm(&t, &bo, &al, "1", "hi"), dm(&t, &al, &bo, "2", "hey")])
        .await
        .unwrap();
    assert_eq!((new_of(&out[0]).seq, new_of(&out[1]).seq), (1, 2));
    // Made again, by either of them: found.
    match s.create_thread(&direct(&t, &bo, &[&al])).await.unwrap() {
        Created::Exists(Lookup::Found(again)) => assert_eq!(again.numeric_id, v.numeric_id),
        other => panic!("{other:?}"),
    }
    // By someone else, or as a pair it is not: forbidden.
    assert_eq!(
        s.create_thread(&direct(&t, &cy, &[&al])).await.unwrap(),
        Created::Exists(Lookup::Forbidden)
    );
    assert_eq!(
        s.create_thread(&direct(&t, &al, &[])).await.unwrap(),
        Created::Exists(Lookup::Forbidden)
    );
    // A group create under its id finds it for a participant (an idempotent create).
    assert!(matches!(
        s.create_thread(&group(&t, &al, &[&bo])).await.unwrap(),
        Created::Exists(Lookup::Found(_))
    ));
    // A group thread under the id is not the pair's direct thread.
    let g = format!("{p}t11-g");
    s.create_thread(&group(&g, &al, &[&bo])).await.unwrap();
    assert_eq!(
        s.create_thread(&direct(&g, &al, &[&bo])).await.unwrap(),
        Created::Exists(Lookup::Forbidden)
    );
    // Three people are no direct thread.
    assert_eq!(
        s.create_thread(&direct(&format!("{p}t11-3"), &al, &[&bo, &cy]))
            .await
            .unwrap(),
        Created::Refused(Refusal::NotParticipant)
    );
    // Yourself alone: your own conversation, which your DMs to yourself use.
    let own = format!("{p}t11-self");
    let Created::New(v) = s.create_thread(&direct(&own, &cy, &[])).await.unwrap() else {
        panic!("expected a new thread");
    };
    assert_eq!(v.participants, vec![a(cy.clone())]);
    let out = s.append(&[dm(&own, &cy, &cy, "1", "note")]).await.unwrap();
    assert_eq!(new_of(&out[0]).seq, 1);
}

/// Numeric ids are the store's: no thread gets an all-digit text id.
async fn no_thread_has_an_all_digit_id<S: Store>(s: &S, p: &str) {
    let (al, bo) = (format!("{p}al12"), format!("{p}bo12"));
    let digits = "90071992547409931234";
    let out = s.append(&[dm(digits, &al, &bo, "1", "x")]).await.unwrap();
    assert_eq!(out[0], Appended::Refused(Refusal::NumericThreadId));
    for new in [group(digits, &al, &[&bo]), direct(digits, &al, &[&bo])] {
        assert_eq!(
            s.create_thread(&new).await.unwrap(),
            Created::Refused(Refusal::NumericThreadId)
        );
    }
    assert_eq!(
        s.thread(&al, &ThreadRef::Id(a(digits.into())))
            .await
            .unwrap(),
        Lookup::NotFound
    );
    // Digits among other characters are a text id like any other.
    let out = s
        .append(&[dm(&format!("{p}12"), &al, &bo, "2", "x")])
        .await
        .unwrap();
    assert_eq!(new_of(&out[0]).seq, 1);
}

/// A NUL in any text of an entry refuses that entry alone, in both stores alike (PostgreSQL
/// text cannot hold it, and it must not fail the batch); reads naming one find nothing.
async fn nul_text_is_refused_alone<S: Store>(s: &S, p: &str) {
    let (al, bo) = (format!("{p}al13"), format!("{p}bo13"));
    let t = format!("{p}t13");
    let mut batch = vec![dm(&t, &al, &bo, "ok1", "fine")];
    batch.push(dm(&t, &al, &bo, "c1", "a\u{0}b"));
    batch.push(dm(&t, &al, &bo, "c\u{0}2", "x"));
    batch.push(dm(&t, &al, &format!("{bo}\u{0}"), "c3", "x"));
    batch.push(dm(&format!("{t}\u{0}"), &al, &bo, "c4", "x"));
    batch.push(dm(&t, &format!("{al}\u{0}"), &bo, "c5", "x"));
    batch.push(NewMessage {
        attachment_url: Some(Arc::from("https://x/\u{0}")),
        ..dm(&t, &al, &bo, "c6", "x")
    });
    batch.push(dm(&t, &bo, &al, "ok2", "fine too"));
    let out = s.append(&batch).await.unwrap();
    assert_eq!(new_of(&out[0]).seq, 1);
    for o in &out[1..7] {
        assert_eq!(*o, Appended::Refused(Refusal::InvalidText));
    }
    assert_eq!(new_of(&out[7]).seq, 2, "the refused took no seq");
    assert_eq!(
        Refusal::InvalidText.text(),
        "text must not contain NUL characters"
    );
    // The same key without the NUL is a new message: nothing of the refused was kept.
    let out = s.append(&[dm(&t, &al, &bo, "c1", "ab")]).await.unwrap();
    assert_eq!(new_of(&out[0]).seq, 3);
    // Threads and notifications.
    let mut titled = group(&format!("{p}t13-g"), &al, &[&bo]);
    titled.title = Some(Arc::from("a\u{0}"));
    let mut member = group(&format!("{p}t13-g"), &al, &[&format!("{bo}\u{0}")]);
    member.kind = ThreadKind::Direct;
    for new in [titled, member, group(&format!("{p}t13\u{0}"), &al, &[&bo])] {
        assert_eq!(
            s.create_thread(&new).await.unwrap(),
            Created::Refused(Refusal::InvalidText)
        );
    }
    let note = |key: &str, data: &str| NewNotification {
        user: a(al.clone()),
        kind: Arc::from("jobs.posted"),
        data_json: Arc::from(data),
        source_key: Some(Arc::from(key)),
        created_at_ms: 1_700_000_000_000,
    };
    assert_eq!(
        s.store_notification(&note("k\u{0}", "{}")).await.unwrap(),
        Noted::Refused(Refusal::InvalidText)
    );
    assert_eq!(
        s.store_notification(&note("k", "{\"a\":\"\u{0}\"}"))
            .await
            .unwrap(),
        Noted::Refused(Refusal::InvalidText)
    );
    assert!(matches!(
        s.store_notification(&note("k", "{}")).await.unwrap(),
        Noted::New(_)
    ));
    // Reads that name a NUL find nothing (and fail nothing).
    let nul_user = format!("{al}\u{0}");
    assert!(s
        .threads(&nul_user, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    let by_id = ThreadRef::Id(a(t.clone()));
    assert_eq!(s.thread(&nul_user, &by_id).await.unwrap(), Lookup::NotFound);
    assert_eq!(
        s.thread(&al, &ThreadRef::Id(a(format!("{t}\u{0}"))))
            .await
            .unwrap(),
        Lookup::NotFound
    );
    assert_eq!(
        s.messages(&nul_user, &by_id, None, 10).await.unwrap(),
        Lookup::NotFound
    );
    assert!(s
        .sync(&nul_user, Some(0), 10)
        .await
        .unwrap()
        .messages
        .is_empty());
    assert!(s
        .notifications(&nul_user, false, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    assert_eq!(s.notifications_read_all(&nul_user).await.unwrap(), 0);
    let mark = MarkRequest {
        user: a(nul_user.clone()),
        mark: Mark::Read,
        thread: None,
        messages: vec![MessageRef::Number(1)],
        at_ms: 1_700_000_000_000,
    };
    assert_eq!(s.mark(&mark).await.unwrap(), Lookup::NotFound);
}

async fn threads_list_and_paginate<S: Store>(s: &S, p: &str) {
    let me = format!("{p}me5");
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = format!("{p}t5-{i}");
        s.append(&[dm(&t, &me, &format!("{p}peer5-{i}"), &format!("c{i}"), "m")])
            .await
            .unwrap();
        ids.push(t);
    }
    // Thread 1 becomes the most recent.
    s.append(&[dm(&ids[1], &me, &format!("{p}peer5-1"), "again", "m2")])
        .await
        .unwrap();
    let page1 = s.threads(&me, None, 2).await.unwrap();
    let got: Vec<&str> = page1.items.iter().map(|t| &*t.id).collect();
    assert_eq!(got, [&*ids[1], &*ids[4]]);
    let page2 = s.threads(&me, page1.next, 2).await.unwrap();
    let got: Vec<&str> = page2.items.iter().map(|t| &*t.id).collect();
    assert_eq!(got, [&*ids[3], &*ids[2]]);
    let page3 = s.threads(&me, page2.next, 2).await.unwrap();
    let got: Vec<&str> = page3.items.iter().map(|t| &*t.id).collect();
    assert_eq!(got, [&*ids[0]]);
    assert_eq!(page3.next, None);
    assert!(s
        .threads(&format!("{p}nobody5"), None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
}

async fn messages_paginate_newest_first<S: Store>(s: &S, p: &str) {
    let (al, bo, t) = (format!("{p}al6"), format!("{p}bo6"), format!("{p}t6"));
    let batch: Vec<NewMessage> = (0..7)
        .map(|i| dm(&t, &al, &bo, &format!("c{i}"), &format!("m{i}")))
        .collect();
    s.append(&batch).await.unwrap();
    let r = ThreadRef::Id(a(t.clone()));
    let p1 = found(s.messages(&bo, &r, None, 3).await.unwrap());
    let seqs: Vec<u64> = p1.items.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [7, 6, 5]);
    assert_eq!(p1.next, Some(5));
    let p2 = found(s.messages(&bo, &r, p1.next, 3).await.unwrap());
    assert_eq!(
        p2.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [4, 3, 2]
    );
    let p3 = found(s.messages(&bo, &r, p2.next, 3).await.unwrap());
    assert_eq!(p3.items.iter().map(|m| m.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(p3.next, None);
    assert_eq!(&*p3.items[0].content, "m0");
    // An exact fit ends with no next page.
    let p = found(s.messages(&bo, &r, Some(4), 3).await.unwrap());
    assert_eq!(p.items.len(), 3);
    assert_eq!(p.next, None);
}

async fn co_participants_rank_by_activity<S: Store>(s: &S, p: &str) {
    let u = |n: &str| format!("{p}{n}9");
    let me = u("me");
    let (w, x, y, z) = (u("w"), u("x"), u("y"), u("z"));
    let g1 = format!("{p}g9-1");
    let g2 = format!("{p}g9-2");
    s.create_thread(&group(&g1, &me, &[&y, &x])).await.unwrap();
    s.append(&[dm(&format!("{p}t9-z"), &me, &z, "c1", "hi")])
        .await
        .unwrap();
    s.create_thread(&group(&g2, &me, &[&y, &w])).await.unwrap();
    // g1 becomes the most recently active, then g2 (created after the DM), then the DM.
    s.append(&[to_thread(&g1, &x, "c2")]).await.unwrap();
    let names = |c: &CoParticipants| c.users.iter().map(|u| u.to_string()).collect::<Vec<_>>();
    let all = s.co_participants(&me, 1000, 10).await.unwrap();
    assert_eq!(names(&all), [&x, &y, &w, &z].map(|s| s.clone()));
    assert!(!all.truncated);
    let exact = s.co_participants(&me, 1000, 4).await.unwrap();
    assert_eq!((names(&exact).len(), exact.truncated), (4, false));
    let two = s.co_participants(&me, 1000, 2).await.unwrap();
    assert_eq!(names(&two), [&x, &y].map(|s| s.clone()));
    assert!(two.truncated);
    // Fewer threads considered than the user has: truncated (which ones is the store's).
    let one = s.co_participants(&me, 1, 10).await.unwrap();
    assert_eq!((one.users.len(), one.truncated), (2, true), "{one:?}");
    // Someone else's view, and nobody's.
    let of_w = s.co_participants(&w, 1000, 10).await.unwrap();
    assert_eq!(names(&of_w), [&me, &y].map(|s| s.clone()));
    let none = s.co_participants(&u("nobody"), 1000, 10).await.unwrap();
    assert_eq!(
        none,
        CoParticipants {
            users: vec![],
            truncated: false
        }
    );
}

async fn marks_move_forward<S: Store>(s: &S, p: &str) {
    let (al, bo, t) = (format!("{p}al7"), format!("{p}bo7"), format!("{p}t7"));
    let batch: Vec<NewMessage> = (0..4)
        .map(|i| dm(&t, &al, &bo, &format!("c{i}"), "m"))
        .collect();
    let out = s.append(&batch).await.unwrap();
    let msgs: Vec<Message> = out.iter().map(|o| new_of(o).clone()).collect();
    let mark = |ids: Vec<MessageRef>| MarkRequest {
        user: a(bo.clone()),
        mark: Mark::Read,
        thread: Some(a(t.clone())),
        messages: ids,
        at_ms: 1_700_000_000_500,
    };
    let m = found(
        s.mark(&mark(vec![MessageRef::ServerId(msgs[2].server_msg_id)]))
            .await
            .unwrap(),
    );
    assert_eq!(m.up_to_seq, 3);
    assert_eq!(m.messages.len(), 1);
    assert_eq!(m.messages[0].sender, a(al.clone()));
    let view = found(s.thread(&bo, &ThreadRef::Id(a(t.clone()))).await.unwrap());
    assert_eq!((view.read_seq, view.unread), (3, 1));
    // An older mark does not move it back; numeric ids work too.
    let m = found(
        s.mark(&mark(vec![MessageRef::Number(msgs[0].id)]))
            .await
            .unwrap(),
    );
    assert_eq!(m.up_to_seq, 3);
    // Unknown ids are ignored; only unknown ids: NotFound.
    let m = found(
        s.mark(&mark(vec![
            MessageRef::Number(u64::MAX >> 2),
            MessageRef::ServerId(msgs[3].server_msg_id),
        ]))
        .await
        .unwrap(),
    );
    assert_eq!(m.up_to_seq, 4);
    assert_eq!(
        s.mark(&mark(vec![MessageRef::ServerId(7)])).await.unwrap(),
        Lookup::NotFound
    );
    // No thread named: taken from the message (the REST form).
    let mut rest = mark(vec![MessageRef::ServerId(msgs[1].server_msg_id)]);
    rest.thread = None;
    rest.user = a(al.clone());
    let m = found(s.mark(&rest).await.unwrap());
    assert_eq!((&*m.thread, m.up_to_seq), (&*t, 2));
    // Someone else's thread.
    let mut other = mark(vec![MessageRef::ServerId(msgs[1].server_msg_id)]);
    other.user = a(format!("{p}zed7"));
    assert_eq!(s.mark(&other).await.unwrap(), Lookup::Forbidden);
    other.thread = None;
    assert_eq!(s.mark(&other).await.unwrap(), Lookup::Forbidden);
    // Delivered marks are kept apart from read marks.
    let mut d = mark(vec![MessageRef::ServerId(msgs[3].server_msg_id)]);
    d.mark = Mark::Delivered;
    d.user = a(al.clone());
    assert_eq!(found(s.mark(&d).await.unwrap()).up_to_seq, 4);
    let view = found(s.thread(&al, &ThreadRef::Id(a(t))).await.unwrap());
    assert_eq!(view.read_seq, 2, "delivered does not mark read");
}

async fn sync_pages<S: Store>(s: &S, p: &str) {
    let (al, bo, cy) = (format!("{p}al8"), format!("{p}bo8"), format!("{p}cy8"));
    let (t1, t2) = (format!("{p}t8a"), format!("{p}t8b"));
    let start = s.sync(&al, None, 10).await.unwrap();
    assert!(start.messages.is_empty());
    assert!(!start.more);
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.push(dm(&t1, &bo, &al, &format!("a{i}"), "to al"));
        batch.push(dm(&t2, &cy, &bo, &format!("b{i}"), "not al's"));
    }
    batch.push(dm(&t1, &al, &bo, "own", "al's own"));
    let out = s.append(&batch).await.unwrap();
    let al_ids: Vec<u64> = out
        .iter()
        .map(new_of)
        .filter(|m| m.thread == a(t1.clone()))
        .map(|m| m.id)
        .collect();
    assert_eq!(al_ids.len(), 6);
    let since = al_ids[0] - 1;
    let p1 = s.sync(&al, Some(since), 4).await.unwrap();
    assert_eq!(
        p1.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        al_ids[..4]
    );
    assert!(p1.more);
    assert_eq!(p1.cursor, al_ids[3]);
    let p2 = s.sync(&al, Some(p1.cursor), 4).await.unwrap();
    assert_eq!(
        p2.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        al_ids[4..]
    );
    assert!(!p2.more);
    assert_eq!(
        &*p2.messages[1].content, "al's own",
        "own messages are synced too"
    );
    let p3 = s.sync(&al, Some(p2.cursor), 4).await.unwrap();
    assert!(p3.messages.is_empty());
    assert_eq!(p3.cursor, p2.cursor);
    assert!(!p3.more);
    // No `since`: the newest page, oldest first.
    let latest = s.sync(&al, None, 2).await.unwrap();
    assert_eq!(
        latest.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        al_ids[4..]
    );
    assert_eq!(latest.cursor, al_ids[5]);
    assert!(!latest.more);
}

async fn notifications<S: Store>(s: &S, p: &str) {
    let me = format!("{p}me9");
    let n = |i: u32, key: Option<&str>| NewNotification {
        user: a(me.clone()),
        kind: Arc::from("jobs.posted"),
        data_json: Arc::from(format!(r#"{{"n":{i}}}"#)),
        source_key: key.map(Arc::from),
        created_at_ms: 1_700_000_000_000 + u64::from(i),
    };
    let mut ids = Vec::new();
    for i in 0..4 {
        let (stored, fresh) = s
            .add_notification(&n(i, Some(&format!("jobs.posted/0/{i}"))))
            .await
            .unwrap();
        assert!(fresh);
        assert!(!stored.read);
        ids.push(stored.id);
    }
    assert!(ids.windows(2).all(|w| w[1] > w[0]));
    let (again, fresh) = s
        .add_notification(&n(9, Some("jobs.posted/0/2")))
        .await
        .unwrap();
    assert_eq!(
        s.store_notification(&n(9, Some("jobs.posted/0/2")))
            .await
            .unwrap(),
        Noted::Exists(again.clone())
    );
    assert!(!fresh);
    assert_eq!(again.id, ids[2]);
    assert_eq!(&*again.data_json, r#"{"n":2}"#);
    let page = s.notifications(&me, false, None, 3).await.unwrap();
    assert_eq!(
        page.items.iter().map(|n| n.id).collect::<Vec<_>>(),
        [ids[3], ids[2], ids[1]]
    );
    let rest = s.notifications(&me, false, page.next, 3).await.unwrap();
    assert_eq!(
        rest.items.iter().map(|n| n.id).collect::<Vec<_>>(),
        [ids[0]]
    );
    assert_eq!(rest.next, None);
    assert!(found(s.notification_read(&me, ids[1]).await.unwrap()).read);
    assert_eq!(
        s.notification_read(&format!("{p}zed9"), ids[1])
            .await
            .unwrap(),
        Lookup::NotFound
    );
    let unread = s.notifications(&me, true, None, 10).await.unwrap();
    assert_eq!(
        unread.items.iter().map(|n| n.id).collect::<Vec<_>>(),
        [ids[3], ids[2], ids[0]]
    );
    assert_eq!(s.notifications_read_all(&me).await.unwrap(), 3);
    assert_eq!(s.notifications_read_all(&me).await.unwrap(), 0);
    assert!(s
        .notifications(&me, true, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
}
