//! One connection's state, owned by its shard's slab.
//!
//! Byte budget (x86_64), checked by `client_budget` below — the product is memory per idle
//! connection, so every field earns its place:
//!
//! | field            | bytes | why |
//! |------------------|------:|-----|
//! | sock             |     4 | fd (mio::net::TcpStream; 16 B in debug builds, Client +16) |
//! | gen              |     4 | slab generation: stale tokens/timers are ignored |
//! | phase, flags     |     2 | lifecycle + bit flags |
//! | rl_strikes       |     1 | rate-limit rejections in a row (`rate_limit_max_violations` <= 255) |
//! | dialect          |     1 | the wire dialect of the connection ([`crate::dialect`]); 0 = native |
//! | rl_tokens        |     4 | token bucket level (f32) |
//! | rl_last_ms       |     4 | last refill, shard-relative ms |
//! | last_rx_tick     |     4 | liveness (also the accept tick while in HTTP phase) |
//! | deadline_tick    |     4 | next timer-wheel entry |
//! | stall_tick       |     4 | when the send queue last made progress |
//! | exp_s            |     4 | token expiry (Unix s), 0 = none; the auth deadline tick while awaiting auth; requests served while an HTTP connection is kept alive |
//! | queued           |     4 | bytes in `queue` not yet written |
//! | head_off         |     4 | bytes of the first queued frame already written |
//! | last_write_ms    |     4 | last write, shard-relative ms (write_coalesce) |
//! | id               |    16 | client_id (UUID as two u64: a u128 would force 16-byte alignment) |
//! | user             |    16 | Option<Arc<str>>, shared with the user table |
//! | rooms            |    24 | Vec<Membership> (8 B per room on the heap) |
//! | queue            |    32 | VecDeque<Frame> (16 B per queued frame on the heap) |
//! | rx               |     8 | Option<Box<RxState>>: only while a frame/message is partial |
//! | grants           |     8 | Option<Arc<Grants>>: JWT room globs / admin |
//! | **total**        | **152** | no padding left; + slab entry tag: 160 |
//!
//! An idle subscribed connection adds one heap block for `rooms` (~32 B with the allocator's
//! header) and 4 B in the room's member list; the read buffer is per shard. A connection of
//! another dialect costs nothing more, except that a topic-protocol connection with
//! subscriptions, or a messaging-service connection with sends waiting for their ack, has one
//! entry in the outbox's edge table (`dialect::EdgeState` plus the map's ~16 B, plus its
//! conversation filters (at most 100) or its held sends (at most 64)). A TLS connection
//! (`tls_port`) keeps its rustls state outside this struct, in the shard's side table
//! (`shard::tls`): one boxed `rustls::ServerConnection` (1,168 B inline) and rustls' own
//! buffers, measured at 8,250 B per idle TLS connection against 283 B plain
//! (docs/BENCHMARKS.md, "TLS cost"); a plain connection pays nothing for it.

use std::collections::VecDeque;
use std::sync::Arc;

use mio::net::TcpStream;

use crate::proto::ws::RxState;
use crate::proto::Frame;
use crate::route::Membership;

/// Lifecycle of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Reading the HTTP request head.
    Http,
    /// Upgraded in jwt mode without a token: only `authenticate` is accepted.
    AwaitAuth,
    /// Authenticated (or auth mode none): serving commands.
    Open,
    /// Upgraded on `echo_path`: frames are echoed, no protocol.
    Echo,
    /// A response or close frame is queued; the socket closes once it is flushed and the peer
    /// has answered or `CLOSING_GRACE_TICKS` passed.
    Closing,
}

/// Bit flags in [`Client::flags`].
pub mod flag {
    /// In the shard's dirty list (has output to flush).
    pub const DIRTY: u8 = 1;
    /// A ping was sent since the last inbound traffic.
    pub const PING_SENT: u8 = 2;
    /// `auth.expiring` was sent for the current token.
    pub const EXPIRING_SENT: u8 = 4;
    /// Counted in the node's WebSocket connection total.
    pub const COUNTED: u8 = 8;
    /// The write side was shut down after the final frame.
    pub const WRITE_SHUT: u8 = 16;
    /// Queued in the resume-read list.
    pub const RESUME_READ: u8 = 32;
    /// Was upgraded to WebSocket (never cleared; the drain waits for these).
    pub const WS: u8 = 64;
    /// Has a reply or a close frame queued: written this turn, never held by write_coalesce.
    pub const URGENT: u8 = 128;
}

/// Permissions from a JWT.
#[derive(Debug)]
pub struct Grants {
    /// Room glob patterns (None = all rooms).
    pub rooms: Option<Vec<String>>,
    pub admin: bool,
    /// The JWT `allowed_users` claim (see `address_policy`).
    pub allowed_users: Option<Vec<String>>,
}

pub struct Client {
    pub sock: TcpStream,
    pub gen: u32,
    pub phase: Phase,
    pub flags: u8,
    pub rl_strikes: u8,
    pub dialect: u8,
    pub rl_tokens: f32,
    pub rl_last_ms: u32,
    pub last_rx_tick: u32,
    pub deadline_tick: u32,
    pub stall_tick: u32,
    pub exp_s: u32,
    pub queued: u32,
    pub head_off: u32,
    pub last_write_ms: u32,
    pub id: [u64; 2],
    pub user: Option<Arc<str>>,
    pub rooms: Vec<Membership>,
    pub queue: VecDeque<Frame>,
    pub rx: Option<Box<RxState>>,
    pub grants: Option<Arc<Grants>>,
}

impl Client {
    pub fn new(sock: TcpStream, gen: u32, now_tick: u32, burst: f32, now_ms: u32) -> Client {
        Client {
            sock,
            gen,
            phase: Phase::Http,
            flags: 0,
            rl_strikes: 0,
            dialect: 0,
            rl_tokens: burst,
            rl_last_ms: now_ms,
            last_rx_tick: now_tick,
            deadline_tick: 0,
            stall_tick: now_tick,
            exp_s: 0,
            queued: 0,
            head_off: 0,
            // Far in the past (wrapping): the first frame is never held by write_coalesce.
            last_write_ms: now_ms.wrapping_sub(1 << 31),
            id: {
                let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
                [hi, lo]
            },
            user: None,
            rooms: Vec::new(),
            queue: VecDeque::new(),
            rx: None,
            grants: None,
        }
    }

    /// The client_id as a UUID value.
    pub fn uuid(&self) -> u128 {
        ((self.id[0] as u128) << 64) | self.id[1] as u128
    }

    #[inline]
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// May this client use `room`? (JWT `rooms` globs; no grants = everything.)
    pub fn allows_room(&self, room: &str) -> bool {
        match self.grants.as_deref() {
            Some(Grants {
                rooms: Some(globs), ..
            }) => globs.iter().any(|g| crate::auth::glob_match(g, room)),
            _ => true,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.grants.as_deref().is_some_and(|g| g.admin)
    }

    /// Token bucket: take one command token. `rate` per second, `burst` max.
    pub fn take_token(&mut self, now_ms: u32, rate: f32, burst: f32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.rl_last_ms) as f32 / 1000.0;
        self.rl_last_ms = now_ms;
        self.rl_tokens = (self.rl_tokens + elapsed * rate).min(burst);
        if self.rl_tokens >= 1.0 {
            self.rl_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_budget() {
        // The ledger in the module doc: keep it true.
        // mio adds an 8-byte selector id to every socket in debug builds only (4 -> 16 B with
        // alignment; the Client grows by 16: the twelve 4-byte fields after it then end
        // half-way into a word).
        let debug_extra = if cfg!(debug_assertions) { 16 } else { 0 };
        let stream = if cfg!(debug_assertions) { 16 } else { 4 };
        assert_eq!(std::mem::size_of::<mio::net::TcpStream>(), stream);
        let size = std::mem::size_of::<Client>();
        assert!(size <= 152 + debug_extra, "Client is {size} B");
        // A slab entry is an enum of Client and a vacant-list index: at most 8 B more.
        assert!(std::mem::size_of::<Option<Client>>() <= 160 + debug_extra);
        assert_eq!(std::mem::size_of::<Membership>(), 8);
        assert_eq!(std::mem::size_of::<Frame>(), 16);
    }
}
