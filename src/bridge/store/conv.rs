//! Live events to the participants of a stored conversation (PROTOCOL.md sections 12 and 13):
//! `typing.start` / `typing.stop` and `mark.read` / `mark.delivered` with a `conversationId`
//! and no `to`, `mark.read {messageIds}` naming only messages, and `presence.watch {scope:
//! "conversations"}`. The shard checks the command and keeps typing state; only the bridge
//! knows who takes part in a thread, so it resolves the participants here, builds the event
//! once and hands it to every participant's devices except the sending connection.
//!
//! A typing frame must not cost a database query: the participants are held in a
//! [`Cache`] (at most [`PARTICIPANT_CACHE_ENTRIES_MAX`] threads, each for
//! [`PARTICIPANT_CACHE_TTL`]). No API changes a thread's participants once it exists (a thread
//! is created with them; DMs and REST only read them), so an entry cannot go stale and needs
//! no invalidation; the TTL only bounds how long a thread the memory store evicted is still
//! answered from here. Refusals (no such thread, not a participant) are not cached: a
//! participant list is only learnt from a participant's read, and a thread created a moment
//! later must be found. Typing keeps its order: an event whose thread is cached is sent on
//! arrival (no task, no await), and the events of a thread being read wait behind that one
//! read ([`Waiting`], bounded by [`TYPING_WAITING_PER_CONVERSATION_MAX`] and
//! [`TYPING_RESOLVING_MAX`]).
//!
//! Must not touch: the DM writer's batches (these jobs run as ordinary read tasks, bounded by
//! `STORE_READS_IN_FLIGHT_MAX`), and the native fan-out path of the shards (events go through
//! the same [`deliver`] seam as `message.create`).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::*;
use crate::proto::envelope::droppable;
use crate::shard::service::{presence, typing, ServiceMsg};
use crate::store::{Lookup, Mark, MessageRef, Refusal, ThreadRef, MARK_IDS_MAX};

/// Threads whose participants the bridge holds at once. Past it, expired entries go first,
/// then the oldest one (one scan per insert when full: rare, and 4,096 entries is microseconds).
pub const PARTICIPANT_CACHE_ENTRIES_MAX: usize = 4096;

/// How long a thread's participants are answered from the cache. Short, because the memory
/// store may evict a thread; participants themselves never change (module doc).
pub const PARTICIPANT_CACHE_TTL: Duration = Duration::from_secs(10);

/// Conversations whose participants are being read for typing at once; a typing event for
/// another conversation past it is dropped (typing is droppable), counted as `busy`.
pub const TYPING_RESOLVING_MAX: usize = 1024;

/// Typing events waiting behind one conversation's read; past it the newest is dropped.
pub const TYPING_WAITING_PER_CONVERSATION_MAX: usize = 64;

/// Most of a user's threads `presence.watch {scope: "conversations"}` reads (most recently
/// active first, in pages of `PAGE_LIMIT_MAX`): five store reads at most per watch.
pub const CONTACT_THREADS_MAX: usize = 1000;

/// The error text of a `mark.read {messageIds}` none of whose ids names a stored message.
pub const MESSAGE_NOT_FOUND: &str = "message not found";

/// Work the shards hand over for a stored conversation.
pub enum ConvEvent {
    /// `typing.start` (`start`) or `typing.stop`. `id`: `Some` for a command (a refusal is
    /// answered, and the shard drops the typing state), `None` for a stop the server makes
    /// (TTL, disconnect), whose refusal is dropped.
    Typing {
        start: bool,
        id: Option<Option<Box<str>>>,
    },
    /// `mark.read` (`read`) or `mark.delivered` with `conversationId`: relay the raw
    /// `messageIds` to the participants, then record them.
    Receipt {
        read: bool,
        id: Option<Box<str>>,
        ids_raw: Box<str>,
        at_ms: u64,
    },
}

/// A live event for the participants of `conversation` (text or numeric id, as the client
/// gave it) from `user` on connection `origin`.
pub struct ConvJob {
    pub origin: ConnRef,
    pub user: Arc<str>,
    pub conversation: Arc<str>,
    pub what: ConvEvent,
}

/// A thread's participants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    /// The text id (`conversationId` in events).
    pub id: Arc<str>,
    pub numeric_id: u64,
    /// Sorted by user id (as the store lists them).
    pub participants: Arc<[Arc<str>]>,
}

impl Members {
    pub fn has(&self, user: &str) -> bool {
        self.participants.iter().any(|p| **p == *user)
    }
}

/// Thread -> participants, bounded and short-lived (sans-IO: callers pass `now`).
#[derive(Default)]
pub struct Cache {
    map: HashMap<Arc<str>, (Members, Instant)>,
}

impl Cache {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The participants of the thread named `key` (text or numeric id), if held and fresh.
    pub fn get(&self, key: &str, now: Instant) -> Option<Members> {
        let (m, at) = self.map.get(key)?;
        (now.saturating_duration_since(*at) < PARTICIPANT_CACHE_TTL).then(|| m.clone())
    }

    /// Hold `m` under `key` (the name asked) and under its text id.
    pub fn put(&mut self, key: &Arc<str>, m: &Members, now: Instant) {
        self.insert(key.clone(), m.clone(), now);
        if **key != *m.id {
            self.insert(m.id.clone(), m.clone(), now);
        }
    }

    fn insert(&mut self, key: Arc<str>, m: Members, now: Instant) {
        if self.map.len() >= PARTICIPANT_CACHE_ENTRIES_MAX && !self.map.contains_key(&key) {
            self.map
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < PARTICIPANT_CACHE_TTL);
            if self.map.len() >= PARTICIPANT_CACHE_ENTRIES_MAX {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(key, (m, now));
    }
}

/// Typing events waiting for their conversation's participants, by the name the client used.
#[derive(Default)]
pub struct Waiting {
    map: HashMap<Arc<str>, VecDeque<ConvJob>>,
}

/// A typing event (`job.what` is [`ConvEvent::Typing`]), arriving from a shard. With the
/// conversation's participants cached (the common case) it is sent right here, with no task
/// and no store call; otherwise one task reads them and every typing event for that
/// conversation arriving meanwhile waits behind it, so a `typing.stop` never overtakes its
/// `typing.start` (two store reads could finish in either order).
pub(super) fn typing_event<S: Store + 'static>(ctx: &Rc<Ctx<S>>, job: ConvJob) {
    if let Some(q) = ctx
        .typing_waiting
        .borrow_mut()
        .map
        .get_mut(&job.conversation)
    {
        if q.len() < TYPING_WAITING_PER_CONVERSATION_MAX {
            q.push_back(job);
        } else {
            ctx.node.store_stats.busy.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let cached = ctx.members.borrow().get(&job.conversation, Instant::now());
    if let Some(m) = cached {
        let r = if m.has(&job.user) {
            Ok(m)
        } else {
            Err(Refusal::NotParticipant.text())
        };
        typing_answer(ctx, job, r);
        return;
    }
    {
        let mut w = ctx.typing_waiting.borrow_mut();
        if w.map.len() >= TYPING_RESOLVING_MAX {
            ctx.node.store_stats.busy.fetch_add(1, Ordering::Relaxed);
            return;
        }
        w.map.insert(job.conversation.clone(), VecDeque::new());
    }
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        let key = job.conversation.clone();
        let mut job = job;
        loop {
            let r = {
                let _permit = ctx.reads.acquire().await;
                resolve(&ctx, &job.user, &job.conversation).await
            };
            typing_answer(&ctx, job, r);
            let mut w = ctx.typing_waiting.borrow_mut();
            match w.map.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => job = next,
                None => {
                    w.map.remove(&key);
                    return;
                }
            }
        }
    });
}

/// Send a typing event to the participants, or tell the shard it was refused.
fn typing_answer<S>(ctx: &Ctx<S>, job: ConvJob, r: std::result::Result<Members, &'static str>) {
    let ConvEvent::Typing { start, id } = job.what else {
        debug_assert!(false, "typing_answer for a receipt");
        return;
    };
    match r {
        Ok(m) => {
            let kind = if start { "typing.start" } else { "typing.stop" };
            let now = now_ms();
            let f = ctx.fb.borrow_mut().text(droppable(ctx.node.now_us()), |o| {
                o.str("type", kind)
                    .obj("data", |d| {
                        d.str("user_id", &job.user)
                            .str("conversationId", &m.id)
                            .u64("conversationNumericId", m.numeric_id);
                    })
                    .u64("timestamp", now);
            });
            to_participants(ctx, &m, &job.user, job.origin, &f);
        }
        Err(text) => {
            // A server-made stop (TTL, disconnect) has nobody to tell.
            let Some(id) = id else { return };
            let msg = typing::Msg::Refused {
                slot: job.origin.slot,
                gen: job.origin.gen,
                conversation: job.conversation,
                id,
                text,
            };
            to_shard(
                ctx,
                job.origin.shard as usize,
                ShardMsg::service(ServiceMsg::Typing(msg)),
            );
        }
    }
}

/// The participants of `conversation` if `user` is one of them, else the error text to answer.
async fn resolve<S: Store>(
    ctx: &Ctx<S>,
    user: &str,
    conversation: &Arc<str>,
) -> std::result::Result<Members, &'static str> {
    let now = Instant::now();
    let cached = ctx.members.borrow().get(conversation, now);
    let m = match cached {
        Some(m) => m,
        None => {
            let r = ThreadRef::parse(conversation);
            match bounded(ctx.timeout, ctx.store.thread(user, &r)).await {
                Ok(Lookup::Found(v)) => {
                    let m = Members {
                        id: v.id,
                        numeric_id: v.numeric_id,
                        participants: Arc::from(v.participants),
                    };
                    ctx.members.borrow_mut().put(conversation, &m, now);
                    m
                }
                Ok(Lookup::NotFound) => return Err(Refusal::UnknownThread.text()),
                Ok(Lookup::Forbidden) => return Err(Refusal::NotParticipant.text()),
                Err(_) => return Err(STORE_UNAVAILABLE),
            }
        }
    };
    if m.has(user) {
        Ok(m)
    } else {
        Err(Refusal::NotParticipant.text())
    }
}

/// Hand `f` to every participant's devices except the sending connection `origin`.
fn to_participants<S>(ctx: &Ctx<S>, m: &Members, sender: &str, origin: ConnRef, f: &Frame) {
    for p in m.participants.iter() {
        let except = (**p == *sender).then_some(origin);
        deliver(
            ctx,
            Target::User {
                user: p.clone(),
                except,
            },
            f,
        );
    }
}

/// Run a receipt [`ConvJob`] (typing goes through [`typing_event`]).
pub(super) async fn run<S: Store>(ctx: &Ctx<S>, job: ConvJob) {
    match job.what {
        ConvEvent::Typing { .. } => {
            let r = resolve(ctx, &job.user, &job.conversation).await;
            typing_answer(ctx, job, r);
        }
        ConvEvent::Receipt {
            read,
            id,
            ids_raw,
            at_ms,
        } => {
            let m = match resolve(ctx, &job.user, &job.conversation).await {
                Ok(m) => m,
                Err(text) => {
                    answer_error(ctx, job.origin, &Answer::Ws { id }, None, text);
                    return;
                }
            };
            let kind = if read {
                "message.read"
            } else {
                "message.delivered"
            };
            let f = receipt_frame(ctx, kind, &m.id, m.numeric_id, &ids_raw, &job.user, at_ms);
            to_participants(ctx, &m, &job.user, job.origin, &f);
            // Recorded after the live receipt, in jobs of at most MARK_IDS_MAX ids; ids that
            // name no stored message of the thread (a client's own ids) are skipped there.
            let refs: Vec<MessageRef> = refs_of(&ids_raw).into_iter().map(|(r, _)| r).collect();
            for chunk in refs.chunks(MARK_IDS_MAX) {
                let req = MarkRequest {
                    user: job.user.clone(),
                    mark: if read { Mark::Read } else { Mark::Delivered },
                    thread: Some(m.id.clone()),
                    messages: chunk.to_vec(),
                    at_ms,
                };
                if bounded(ctx.timeout, ctx.store.mark(&req)).await.is_err() {
                    ctx.node.store_stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `message.read` / `message.delivered` `{conversationId, conversationNumericId, messageIds,
/// by, at}`.
fn receipt_frame<S>(
    ctx: &Ctx<S>,
    kind: &str,
    thread: &str,
    numeric_id: u64,
    ids_raw: &str,
    by: &str,
    at_ms: u64,
) -> Frame {
    let now = now_ms();
    let at = rfc3339_ms(at_ms);
    ctx.fb.borrow_mut().text(ctx.node.now_us(), |o| {
        o.str("type", kind)
            .obj("data", |d| {
                d.str("conversationId", thread)
                    .u64("conversationNumericId", numeric_id)
                    .raw("messageIds", ids_raw)
                    .str("by", by)
                    .str("at", &at);
            })
            .u64("timestamp", now);
    })
}

/// The message refs of a checked `messageIds` array, each with its raw JSON text (elements
/// that name no stored message by form, like `"m-1"`, are left out).
fn refs_of(raw: &str) -> Vec<(MessageRef, String)> {
    use sonic_rs::JsonValueTrait;
    let mut out = Vec::new();
    for item in sonic_rs::to_array_iter(raw).flatten() {
        let r = match item.as_str() {
            Some(s) => MessageRef::parse(s),
            None => item.as_u64().map(MessageRef::Number),
        };
        if let Some(r) = r {
            out.push((r, item.as_raw_str().to_owned()));
        }
    }
    out
}

/// Whether stored message `m` is the one `r` names.
fn names(r: MessageRef, m: &Message) -> bool {
    match r {
        MessageRef::Number(n) => n == m.id,
        MessageRef::ServerId(u) => u == m.server_msg_id,
    }
}

/// `mark.read {messageIds}` / `mark.delivered {messageIds}` with neither `to` nor
/// `conversationId`: the store finds the conversation of the first named message it holds,
/// records the ids of that conversation, and its participants get one event with them; the
/// ids left (of other conversations) are marked the same way, one event per conversation, at
/// most one store call per id. A conversation the reader is not in stops there with `not a
/// participant of this conversation` (the conversations before it stay marked); no stored
/// message among the ids is `message not found`.
pub(super) async fn mark_by_messages<S: Store>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    id: Option<Box<str>>,
    user: Arc<str>,
    read: bool,
    ids_raw: &str,
    at_ms: u64,
) {
    let mut left = refs_of(ids_raw);
    let answer = Answer::Ws { id };
    let kind = if read {
        "message.read"
    } else {
        "message.delivered"
    };
    let mut first = true;
    while !left.is_empty() {
        let req = MarkRequest {
            user: user.clone(),
            mark: if read { Mark::Read } else { Mark::Delivered },
            thread: None,
            messages: left.iter().map(|(r, _)| *r).take(MARK_IDS_MAX).collect(),
            at_ms,
        };
        let marked = match bounded(ctx.timeout, ctx.store.mark(&req)).await {
            Ok(Lookup::Found(m)) => m,
            Ok(Lookup::NotFound) => {
                if first {
                    answer_error(ctx, origin, &answer, None, MESSAGE_NOT_FOUND);
                }
                return;
            }
            Ok(Lookup::Forbidden) => {
                let text = Refusal::NotParticipant.text();
                answer_error(ctx, origin, &answer, None, text);
                return;
            }
            Err(_) => {
                answer_error(ctx, origin, &answer, None, STORE_UNAVAILABLE);
                return;
            }
        };
        first = false;
        let (here, rest): (Vec<_>, Vec<_>) = left
            .into_iter()
            .partition(|(r, _)| marked.messages.iter().any(|m| names(*r, m)));
        left = rest;
        if here.is_empty() {
            // A store that marks none of the ids it was given: stop rather than loop.
            return;
        }
        let mut raw =
            String::with_capacity(2 + here.iter().map(|(_, s)| s.len() + 1).sum::<usize>());
        raw.push('[');
        for (i, (_, s)) in here.iter().enumerate() {
            if i > 0 {
                raw.push(',');
            }
            raw.push_str(s);
        }
        raw.push(']');
        let thread: Arc<str> = marked.thread.clone();
        match resolve(ctx, &user, &thread).await {
            Ok(m) => {
                let f = receipt_frame(ctx, kind, &m.id, m.numeric_id, &raw, &user, at_ms);
                to_participants(ctx, &m, &user, origin, &f);
            }
            Err(text) => {
                answer_error(ctx, origin, &answer, None, text);
                return;
            }
        }
    }
}

/// `presence.watch {scope: "conversations"}`: every user who shares a stored thread with
/// `user` ([`Store::co_participants`]: most recently active shared thread first, at most
/// [`CONTACT_THREADS_MAX`] threads and `limit` users), handed back to the connection's shard,
/// which watches them and answers.
pub(super) async fn contacts<S: Store>(
    ctx: &Ctx<S>,
    origin: ConnRef,
    id: Option<Box<str>>,
    user: &str,
    limit: usize,
) {
    let read = ctx.store.co_participants(user, CONTACT_THREADS_MAX, limit);
    let found = match bounded(ctx.timeout, read).await {
        Ok(c) => c,
        Err(_) => {
            answer_error(ctx, origin, &Answer::Ws { id }, None, STORE_UNAVAILABLE);
            return;
        }
    };
    let msg = presence::Msg::Contacts {
        to: origin,
        id,
        users: found.users,
        truncated: found.truncated,
    };
    to_shard(
        ctx,
        origin.shard as usize,
        ShardMsg::service(ServiceMsg::Presence(msg)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(id: &str, n: u64) -> Members {
        Members {
            id: Arc::from(id),
            numeric_id: n,
            participants: Arc::from(vec![Arc::from("alice"), Arc::from("bob")]),
        }
    }

    #[test]
    fn cache_answers_by_either_name_until_the_ttl() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        let m = members("t-1", 42);
        c.put(&Arc::from("42"), &m, t0);
        assert_eq!(c.get("42", t0), Some(m.clone()));
        assert_eq!(c.get("t-1", t0), Some(m.clone()));
        assert!(m.has("bob") && !m.has("carol"));
        let late = t0 + PARTICIPANT_CACHE_TTL;
        assert_eq!(c.get("t-1", late), None);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        for i in 0..PARTICIPANT_CACHE_ENTRIES_MAX + 10 {
            let at = t0 + Duration::from_micros(i as u64);
            let id: Arc<str> = Arc::from(format!("t-{i}"));
            c.put(&id, &members(&id, i as u64), at);
        }
        assert_eq!(c.len(), PARTICIPANT_CACHE_ENTRIES_MAX);
        // The oldest went first.
        let now = t0 + Duration::from_millis(1);
        assert!(c.get("t-0", now).is_none());
        assert!(c
            .get(&format!("t-{}", PARTICIPANT_CACHE_ENTRIES_MAX + 9), now)
            .is_some());
        // Expired entries are dropped before a fresh one is evicted.
        let later = t0 + PARTICIPANT_CACHE_TTL * 2;
        c.put(&Arc::from("new"), &members("new", 1), later);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn refs_keep_their_raw_text() {
        let raw = r#"["m-1", 7, "01a201a5-32a9-77b2-a173-3f47b1ef19fb"]"#;
        let got = refs_of(raw);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (MessageRef::Number(7), "7".to_owned()));
        assert_eq!(got[1].1, r#""01a201a5-32a9-77b2-a173-3f47b1ef19fb""#);
    }
}
