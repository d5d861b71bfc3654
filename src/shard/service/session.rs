//! The session: `ping`, in-band `authenticate` (first auth and refresh, PROTOCOL.md section
//! 1), and a connection's identity (the user table, devices per user, the user's node-level
//! transitions).

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

use super::Cmd;
use crate::auth::Claims;
use crate::bridge::BridgeMsg;
use crate::config::AuthMode;
use crate::directory::Transition;
use crate::metrics::ErrorReason;
use crate::proto::envelope::{non_empty, parse_as};
use crate::proto::ws::close;
use crate::shard::{flag, Grants, Phase, Shard};

pub fn ping(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "pong").id(cmd.id).u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
}

/// Why an identity could not be attached.
#[derive(Debug, PartialEq, Eq)]
pub enum IdentityError {
    /// The user is at `max_connections_per_user` on this node.
    TooManyDevices,
}

/// The error text for [`IdentityError::TooManyDevices`] (HTTP 429 on upgrade, close 1008 in band).
pub const TOO_MANY_DEVICES: &str = "too many connections for this user";

/// Attach a user identity (and JWT grants) to a connection.
pub fn set_identity(
    sh: &mut Shard,
    slot: u32,
    user: &str,
    claims: Option<&Claims>,
) -> Result<(), IdentityError> {
    let key: Arc<str> = match sh.users.key(user) {
        Some(k) => k,
        None => Arc::from(user),
    };
    if crate::admission::device(&sh.node, &key).is_none() {
        sh.out.stats.errors[ErrorReason::TooManyDevices as usize] += 1;
        return Err(IdentityError::TooManyDevices);
    }
    let first = sh.users.add(&key, slot);
    if first {
        let t = sh.node.dir.users.arrive(&key, sh.id);
        report_transition(sh, key.clone(), t);
    }
    let c = &mut sh.clients[slot as usize];
    c.user = Some(key);
    if let Some(claims) = claims {
        c.exp_s = claims.exp.min(u32::MAX as u64) as u32;
        c.grants = Some(Arc::new(Grants {
            rooms: claims.rooms.clone(),
            admin: claims.admin,
            allowed_users: claims.allowed_users.clone(),
        }));
    }
    super::on_attach(sh, slot);
    Ok(())
}

/// Detach the identity (the connection is closing or closed).
pub fn clear_identity(sh: &mut Shard, slot: u32) {
    let Some(user) = sh.clients[slot as usize].user.take() else {
        return;
    };
    crate::admission::device_gone(&sh.node, &user);
    if sh.users.remove(&user, slot) {
        let t = sh.node.dir.users.depart(&user, sh.id);
        report_transition(sh, user, t);
    }
}

/// Tell the bridge a user's first device on this node arrived or the last one left.
fn report_transition(sh: &mut Shard, user: Arc<str>, t: Transition) {
    if t != Transition::None && sh.node.clustered {
        let msg = BridgeMsg::User { user, t };
        if sh.node.bridge_tx.try_send(msg).is_err() {
            sh.out.stats.bridge_dropped += 1;
            // The bridge re-reads the directory for it.
            sh.node
                .redis_stats
                .transitions_lost
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[derive(Deserialize)]
struct AuthCmd<'a> {
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
}

/// `auth.failed` with `text`, then close 4001.
pub fn auth_failed_close(sh: &mut Shard, slot: u32, id: Option<&str>, text: &str) {
    auth_failed(sh, slot, id, text);
    sh.close_with(slot, close::UNAUTHORIZED, "unauthorized");
}

fn auth_failed(sh: &mut Shard, slot: u32, id: Option<&str>, text: &str) {
    sh.out.stats.errors[ErrorReason::AuthFailed as usize] += 1;
    let now_ms = sh.now_ms;
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "auth.failed")
            .id(id)
            .str("error", text)
            .u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
}

pub fn authenticate(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let id = cmd.id;
    let node = sh.node.clone();
    let Some(verifier) = node
        .verifier
        .as_ref()
        .filter(|_| node.cfg.auth_mode == AuthMode::Jwt)
    else {
        sh.send_error(slot, ErrorReason::NotAllowed, id, "not allowed", None);
        return;
    };
    let awaiting = sh.clients[slot as usize].phase == Phase::AwaitAuth;
    let token = parse_as::<AuthCmd>(cmd.text);
    let result = match token.as_ref().and_then(|t| non_empty(&t.token)) {
        None => Err("token is required"),
        Some(token) => verifier
            .verify(token, sh.now_ms / 1000)
            .map_err(|e| e.as_str()),
    };
    let claims = match result {
        Ok(claims) => claims,
        Err(text) if awaiting => {
            auth_failed_close(sh, slot, id, text);
            return;
        }
        Err(text) => {
            auth_failed(sh, slot, id, text);
            return;
        }
    };
    if crate::store::has_nul(&claims.sub) {
        // The message store cannot hold the user id (see dm::NUL_TEXT).
        auth_failed(sh, slot, id, super::dm::NUL_TEXT);
        return;
    }
    if awaiting {
        if set_identity(sh, slot, &claims.sub, Some(&claims)).is_err() {
            auth_failed(sh, slot, id, TOO_MANY_DEVICES);
            sh.close_with(slot, close::POLICY, TOO_MANY_DEVICES);
            return;
        }
        let c = &mut sh.clients[slot as usize];
        c.phase = Phase::Open;
    } else {
        let c = &mut sh.clients[slot as usize];
        if c.user.as_deref() != Some(claims.sub.as_str()) {
            auth_failed(sh, slot, id, "token subject mismatch");
            return;
        }
        c.exp_s = claims.exp.min(u32::MAX as u64) as u32;
        c.flags &= !flag::EXPIRING_SENT;
        c.grants = Some(Arc::new(Grants {
            rooms: claims.rooms.clone(),
            admin: claims.admin,
            allowed_users: claims.allowed_users.clone(),
        }));
        // A narrower rooms claim: leave what it no longer allows.
        super::rooms::on_grants_changed(sh, slot);
    }
    let now_ms = sh.now_ms;
    let expires_ms = claims.exp.saturating_mul(1000);
    let f = sh.fb.text(sh.now_us, |o| {
        o.str("type", "auth.success")
            .id(id)
            .obj("data", |d| {
                d.str("user_id", &claims.sub).u64("expires_at", expires_ms);
            })
            .u64("timestamp", now_ms);
    });
    sh.reply(slot, f);
    if awaiting {
        sh.dialect_opened(slot);
    }
    let now = sh.now_tick;
    sh.schedule(slot, now + 1);
}
