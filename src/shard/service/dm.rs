//! Direct messages: `message.send` and `sync` (PROTOCOL.md sections 3 and 6). The shard checks
//! the command and hands it to the bridge's message store ([`crate::bridge::store`]), which
//! stores it (batched with other DMs), delivers `message.create` to every device of every
//! participant (the sending device excepted) through the delivery seam, and then acks the
//! sender; a store that fails or times out gets the sender an error and no ack.
//!
//! Idempotency is the store's: `(sender, clientMsgId)` is unique there, so a retry gets the
//! first copy's ack and is not delivered again (for as long as the store holds the message:
//! PostgreSQL forever, the in-memory store until it evicts it). In a cluster without
//! PostgreSQL the bridge first claims the pair in Redis, so a retry on another node is
//! answered the same way for `dedup_window` ([`crate::bridge::store`]'s `dedup`).

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

use super::Cmd;
use crate::bridge::store::{Answer, StoreJob, BUSY};
use crate::limits::{ID_BYTES_MAX, URL_BYTES_MAX};
use crate::metrics::ErrorReason;
use crate::proto::envelope::non_empty;
use crate::shard::Shard;
use crate::store::{NewMessage, PAGE_LIMIT_MAX};

/// Messages one `sync` returns when it names no `limit`.
pub const SYNC_LIMIT_DEFAULT: usize = 100;

/// Namespace for conversation ids derived from two user ids (UUID v5).
const CONVERSATION_NS: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_3a52_9d0e_4b7a_8c21_5e4f_0a9b_7d13);

/// A stable conversation id for two users, the same whichever of them asks.
pub fn derive_conversation_id(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    let mut name = Vec::with_capacity(x.len() + y.len() + 1);
    name.extend_from_slice(x.as_bytes());
    name.push(0);
    name.extend_from_slice(y.as_bytes());
    uuid::Uuid::new_v5(&CONVERSATION_NS, &name).to_string()
}

#[derive(Deserialize)]
struct SendCmd<'a> {
    #[serde(rename = "clientMsgId", borrow, default)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(rename = "attachmentUrl", borrow, default)]
    attachment_url: Option<Cow<'a, str>>,
    /// The client's trace context (W3C `traceparent`), continued when tracing is on.
    #[serde(borrow, default)]
    traceparent: Option<Cow<'a, str>>,
}

pub fn send(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let id = cmd.id;
    let Some(m) = super::parse::<SendCmd>(sh, slot, cmd) else {
        return;
    };
    let cmid = non_empty(&m.client_msg_id);
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", cmid);
        return;
    };
    let Some(cmid) = cmid.filter(|c| c.len() <= ID_BYTES_MAX) else {
        sh.send_error(
            slot,
            ErrorReason::BadRequest,
            id,
            "clientMsgId is required",
            None,
        );
        return;
    };
    let bad = |sh: &mut Shard, reason, text| sh.send_error(slot, reason, id, text, Some(cmid));
    let to = non_empty(&m.to);
    if to.is_some_and(|t| t.len() > ID_BYTES_MAX) {
        bad(sh, ErrorReason::BadRequest, "to is too long");
        return;
    }
    let content = m.content.as_deref().unwrap_or("");
    let attachment = non_empty(&m.attachment_url);
    if content.len() > sh.node.cfg.max_dm_content_bytes
        || attachment.is_some_and(|a| a.len() > URL_BYTES_MAX)
    {
        bad(sh, ErrorReason::TooLarge, "message too large");
        return;
    }
    if content.is_empty() && attachment.is_none() {
        bad(sh, ErrorReason::BadRequest, "content is required");
        return;
    }
    let conversation = non_empty(&m.conversation_id);
    // PostgreSQL text cannot hold U+0000: refused here, so it can never fail a batch.
    let texts = [Some(content), attachment, Some(cmid), to, conversation];
    if texts.iter().flatten().any(|t| t.contains('\0')) {
        bad(sh, ErrorReason::BadRequest, NUL_TEXT);
        return;
    }
    if let (Some(c), Some(to)) = (conversation, to) {
        if let Err(text) = check_conversation_id(c, &user, to) {
            bad(sh, ErrorReason::BadRequest, text);
            return;
        }
    }
    let thread: Arc<str> = match (conversation, to) {
        (Some(c), _) if c.len() > ID_BYTES_MAX => {
            bad(sh, ErrorReason::BadRequest, "conversationId too long");
            return;
        }
        (Some(c), _) => Arc::from(c),
        (None, Some(to)) => Arc::from(derive_conversation_id(&user, to)),
        // A group thread is named by its conversationId; a DM needs its peer.
        (None, None) => {
            bad(sh, ErrorReason::BadRequest, "to is required");
            return;
        }
    };
    let msg = NewMessage {
        server_msg_id: uuid::Uuid::now_v7().as_u128(),
        event_id: uuid::Uuid::now_v7().as_u128(),
        thread,
        sender: user,
        to: to.map(Arc::from),
        client_msg_id: Some(Arc::from(cmid)),
        content: Arc::from(content),
        attachment_url: attachment.map(Arc::from),
        sent_at_ms: sh.now_ms,
    };
    // Traced (when sampled) from here to the ack: the span goes with the job to the bridge,
    // which adds `store.append` (and `kafka.produce`) under it.
    let span = crate::root_span!(
        crate::trace::root_for_field(m.traceparent.as_deref()),
        "dm.send",
        otel.kind = "server",
        shard = sh.id as u64,
        enduser.id = &*msg.sender,
        conversation.id = &*msg.thread,
        message.id = %uuid::Uuid::from_u128(msg.server_msg_id),
        otel.status_code = tracing::field::Empty,
    );
    let job = StoreJob::Send {
        origin: sh.conn_ref(slot),
        answer: Answer::Ws {
            id: id.map(Box::from),
        },
        msg,
        span,
    };
    if !sh.hand_to_store(job) {
        bad(sh, ErrorReason::Busy, BUSY);
        return;
    }
    sh.out.stats.dms += 1;
}

/// The error text of a text field holding U+0000.
pub const NUL_TEXT: &str = "text must not contain NUL characters";

/// A `conversationId` given with `to` names the DM thread of those two users: it may not be
/// all digits (numeric ids are the store's own, and the REST API accepts both forms) nor a
/// derived id (UUID v5) of another pair, which would let one user take the conversation of
/// two others before they write to each other.
pub fn check_conversation_id(c: &str, from: &str, to: &str) -> Result<(), &'static str> {
    if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) {
        return Err("conversationId must not be all digits");
    }
    if let Ok(u) = uuid::Uuid::try_parse(c) {
        if u.get_version_num() == 5 && u.to_string() != derive_conversation_id(from, to) {
            return Err("conversationId belongs to another conversation");
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct SyncCmd {
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    limit: Option<u64>,
}

/// `sync {since?, limit?}`: the user's `message.create` events after `since` (a `cursor`),
/// oldest first, then `sync.done {cursor, more, truncated}`.
pub fn sync(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let id = cmd.id;
    let Some(m) = super::parse::<SyncCmd>(sh, slot, cmd) else {
        return;
    };
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return;
    };
    let limit = match m.limit {
        None => SYNC_LIMIT_DEFAULT,
        Some(n) if n >= 1 && n <= PAGE_LIMIT_MAX as u64 => n as usize,
        Some(_) => {
            let text = const_format_limit();
            sh.send_error(slot, ErrorReason::BadRequest, id, text, None);
            return;
        }
    };
    let job = StoreJob::Sync {
        origin: sh.conn_ref(slot),
        id: id.map(Box::from),
        user,
        since: m.since,
        limit,
    };
    if !sh.hand_to_store(job) {
        sh.send_error(slot, ErrorReason::Busy, id, BUSY, None);
    }
}

/// The error text of a `sync` limit out of range.
fn const_format_limit() -> &'static str {
    const _: () = assert!(PAGE_LIMIT_MAX == 200, "update the text below");
    "limit must be 1 to 200"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_id_with_to_is_checked() {
        let ours = derive_conversation_id("alice", "bob");
        assert_eq!(check_conversation_id(&ours, "bob", "alice"), Ok(()));
        assert_eq!(
            check_conversation_id(&ours.to_uppercase(), "alice", "bob"),
            Ok(())
        );
        let theirs = derive_conversation_id("bob", "carol");
        assert_eq!(
            check_conversation_id(&theirs, "mallory", "bob"),
            Err("conversationId belongs to another conversation")
        );
        assert_eq!(
            check_conversation_id("1041", "alice", "bob"),
            Err("conversationId must not be all digits")
        );
        // A client's own ids (v4, v7, any text) are theirs to use.
        assert_eq!(
            check_conversation_id(&uuid::Uuid::new_v4().to_string(), "a", "b"),
            Ok(())
        );
        assert_eq!(check_conversation_id("order-1041", "a", "b"), Ok(()));
    }

    #[test]
    fn conversation_ids_are_symmetric_and_distinct() {
        assert_eq!(
            derive_conversation_id("alice", "bob"),
            derive_conversation_id("bob", "alice")
        );
        assert_ne!(
            derive_conversation_id("alice", "bob"),
            derive_conversation_id("alice", "carol")
        );
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            derive_conversation_id("ab", "c"),
            derive_conversation_id("a", "bc")
        );
    }
}
