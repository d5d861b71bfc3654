//! Who may address whom: the `address_policy` check shared by the services that reach a named
//! user without a message (typing, receipts, calls, presence watches). With `any` (the
//! default, as direct messages allow) every identified user may address every user; with
//! `claim` only the users listed in the connection's JWT `allowed_users` claim (none without
//! the claim or without a token). A refusal is the `not allowed` error.

use crate::config::AddressPolicy;
use crate::shard::Shard;

/// Whether the connection at `slot` may address `to`.
pub fn may_address(sh: &Shard, slot: u32, to: &str) -> bool {
    match sh.node.cfg.address_policy {
        AddressPolicy::Any => true,
        AddressPolicy::Claim => sh.clients[slot as usize]
            .grants
            .as_deref()
            .and_then(|g| g.allowed_users.as_deref())
            .is_some_and(|users| users.iter().any(|u| u == to)),
    }
}
