//! Direct messages: `message.send` (PROTOCOL.md section 3). The sender gets `message.ack`;
//! every device of `to` and every other device of the sender gets `message.create`, on any
//! shard, through the delivery seam ([`Target::User`]).
//!
//! Idempotency is the node's [`crate::dedup::DedupTable`]: the claim is made before delivery
//! and carries the ids every copy uses, so a retried `clientMsgId` gets the same ack and the
//! same `eventId`. When a shard could not be handed the event (its inbox full), the claim
//! records the shards still owed and the sender gets `server busy, retry later` without an
//! ack; the retry delivers to those shards only. No device ever gets one message twice.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

use super::Cmd;
use crate::dedup::{AckRecord, Claim, Owed};
use crate::limits::{ID_BYTES_MAX, URL_BYTES_MAX};
use crate::metrics::ErrorReason;
use crate::proto::envelope::non_empty;
use crate::proto::json::rfc3339_ms;
use crate::route::Target;
use crate::shard::Shard;

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
    let Some(to) = non_empty(&m.to).filter(|t| t.len() <= ID_BYTES_MAX) else {
        bad(sh, ErrorReason::BadRequest, "to is required");
        return;
    };
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
    let conversation: Arc<str> = match non_empty(&m.conversation_id) {
        Some(c) if c.len() <= ID_BYTES_MAX => Arc::from(c),
        Some(_) => {
            bad(sh, ErrorReason::BadRequest, "conversationId too long");
            return;
        }
        None => Arc::from(derive_conversation_id(&user, to)),
    };
    let now_ms = sh.now_ms;
    let fresh = AckRecord {
        server_msg_id: uuid::Uuid::now_v7().as_u128(),
        event_id: uuid::Uuid::now_v7().as_u128(),
        conversation_id: conversation,
        sent_at_ms: now_ms,
        expires_ms: now_ms + sh.node.cfg.dedup_window.as_millis() as u64,
        owed: Owed::default(),
    };
    if sh.dedup_fifo.len() >= sh.node.dedup.max() {
        bad(sh, ErrorReason::Busy, "server busy, retry later");
        return;
    }
    let (record, retry) = match sh.node.dedup.claim(&user, cmid, &fresh, now_ms) {
        Claim::Duplicate(prev) => {
            sh.out.stats.dm_duplicates += 1;
            send_ack(sh, slot, id, cmid, &prev);
            return;
        }
        Claim::Full => {
            bad(sh, ErrorReason::Busy, "server busy, retry later");
            return;
        }
        Claim::Incomplete(prev) => {
            sh.out.stats.dm_duplicates += 1;
            (prev, true)
        }
        Claim::New => {
            let pushed = sh
                .dedup_fifo
                .push(&sh.node.dedup, fresh.expires_ms, user.clone(), cmid);
            debug_assert!(pushed, "checked above");
            (fresh, false)
        }
    };
    let sent_at = rfc3339_ms(record.sent_at_ms);
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "message.create")
            .obj("data", |d| {
                d.uuid("eventId", record.event_id)
                    .uuid("serverMsgId", record.server_msg_id)
                    .str("clientMsgId", cmid)
                    .str("from", &user)
                    .str("to", to)
                    .str("conversationId", &record.conversation_id)
                    .str("content", content)
                    .opt_str("attachmentUrl", attachment)
                    .str("sentAt", &sent_at);
            })
            .u64("timestamp", now_ms);
    });
    let me = sh.conn_ref(slot);
    // The recipient's devices, then the sender's other devices (once, if they are the same
    // user; the sending device gets the ack, not its own message).
    let to_self = *user == *to;
    let to_target = Target::User {
        user: Arc::from(to),
        except: to_self.then_some(me),
    };
    let from_target = Target::User {
        user: user.clone(),
        except: Some(me),
    };
    let owed = if retry {
        let to_missed = sh.deliver_to_shards(&to_target, &f, record.owed.to).shards;
        let from_missed = sh
            .deliver_to_shards(&from_target, &f, record.owed.from)
            .shards;
        Owed {
            to: to_missed,
            from: from_missed,
        }
    } else {
        let to_missed = sh.deliver(&to_target, &f).shards;
        let from_missed = if to_self {
            0
        } else {
            sh.deliver(&from_target, &f).shards
        };
        Owed {
            to: to_missed,
            from: from_missed,
        }
    };
    if !owed.is_empty() || retry {
        sh.node.dedup.settle(&user, cmid, owed);
    }
    if !owed.is_empty() {
        // Some device could not be reached: no ack for what was not delivered. The claim
        // remembers who is still owed; the client's retry delivers to them, same ids.
        bad(sh, ErrorReason::Busy, "server busy, retry later");
        return;
    }
    sh.out.stats.dms += 1;
    send_ack(sh, slot, id, cmid, &record);
}

fn send_ack(sh: &mut Shard, slot: u32, id: Option<&str>, cmid: &str, rec: &AckRecord) {
    let sent_at = rfc3339_ms(rec.sent_at_ms);
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "message.ack")
            .id(id)
            .obj("data", |d| {
                d.str("clientMsgId", cmid)
                    .uuid("serverMsgId", rec.server_msg_id)
                    .str("conversationId", &rec.conversation_id)
                    .str("sentAt", &sent_at);
            })
            .u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
}

#[cfg(test)]
mod tests {
    use super::*;

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
