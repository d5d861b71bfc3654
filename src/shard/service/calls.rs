//! Calls: the WebRTC signalling relay (`call.offer`, `call.answer`, `call.ice`, `call.hangup`;
//! PROTOCOL.md section 5, docs/protocol/calls.md). The server relays SDP and ICE candidates
//! and keeps each call's state (ringing, active); it never looks inside them and never
//! persists them.
//!
//! **Where a call lives.** Both users' commands for one call must meet in one place, so a
//! call's state is kept on an owner shard chosen by the pair of users ([`owner`]: a fixed
//! hash of the two ids, sorted, like `rooms::owner`). A command on any other shard is checked
//! there (identity, fields, limits, `policy::may_address`) and handed to the owner as
//! `ServiceMsg::Calls(Box<Msg>)` (boxed: the inbox is an array of `ShardMsg` slots, and a
//! call message is larger than the rest). The owner runs the sans-IO [`Calls`] machine, which
//! returns [`Action`]s, and the glue turns them into frames delivered through the seam
//! ([`Target::User`] for every device of a callee, [`Target::Conn`] for one connection on any
//! shard, errors to the requester included). Glare (both users calling each other at once) is
//! decided on the owner, where both offers arrive.
//!
//! **Parties and disconnects.** The offering connection and, once answered, the answering
//! connection are the call's two parties. Each party's own shard keeps, in [`State::conns`],
//! the calls that connection is a party to (each offer or answer adds a use before it is
//! forwarded; the owner's [`Msg::Untrack`] takes the use back when the call ends or the
//! command is refused, or clustered when no node confirms it; at most `max_calls_per_user`
//! entries per connection). `on_detach` forwards [`Input::Gone`] for each to its owner, which
//! ends the call with `disconnected` for the other side. Nothing is kept for a connection that
//! is in no call.
//!
//! **Across nodes.** Clustered, a call lives on the owner shard of the node its offer reached
//! (the caller's). A command the local owner does not hold may be for a call held on another
//! node, so it goes to every other node ([`Action::Elsewhere`], `<p>{calls}`), and this owner
//! keeps it waiting ([`Pending`], at most [`CALLS_PENDING_PER_SHARD_MAX`], each for
//! [`CALL_REMOTE_WAIT`] on the timer wheel). The node that holds the call runs it as a local
//! one (its events, errors and untracks reach the requester through that node's channel) and
//! confirms it ([`Action::Held`] -> `cluster::service::CALL_HELD` to the requester's node ->
//! [`Input::Held`]), which ends the wait; nodes that do not hold it say nothing. A command
//! nobody confirms in time (the call ended or timed out meanwhile, its node died, or the
//! `call_id` was made up) gets `unknown call`, the frame one node would have sent, and an
//! answer's tracked entry is released, so every forwarded command has a definite outcome
//! within the wait. An answer is the one command whose call a node may have accepted
//! unconfirmed (its confirmation late or lost): when its wait runs out, every other node is
//! told the answering connection left ([`Input::Gone`]), so a node that made it a party ends
//! that call as if it had left (it was told `unknown call`) and both sides agree; a
//! confirmation that comes after the wait does the same for its node. This was chosen over
//! routing commands straight to the holding node (learning it from the `call.incoming` it
//! relayed): that needs a route table per ringing call on every callee node and still a
//! deadline for a holder that died or a route that was never heard, where the wait alone
//! covers every case with one small entry per command in flight. Inputs that never cross
//! (offers, timers) and departures ([`Input::Gone`], nobody to answer) wait for nothing. One
//! node (not clustered) never waits: `unknown call` at once, as before.
//!
//! **Limits.** Calls per user node-wide (`max_calls_per_user`, counted in
//! `Directory::calls`, so a user's calls on different owner shards add up), calls per shard
//! ([`CALLS_PER_SHARD_MAX`]), `call_id` ([`CALL_ID_BYTES_MAX`]), SDP ([`CALL_SDP_BYTES_MAX`]),
//! candidate ([`CALL_CANDIDATE_BYTES_MAX`]) and hangup reason ([`CALL_REASON_BYTES_MAX`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use serde::Deserialize;
use slab::Slab;
use sonic_rs::LazyValue;

use super::Cmd;
use crate::directory::Names;
use crate::limits::ID_BYTES_MAX;
use crate::metrics::ErrorReason;
use crate::proto::envelope::{non_empty, parse_as};
use crate::proto::Frame;
use crate::route::{ConnRef, Target};
use crate::shard::Shard;

/// Longest `call_id`, in bytes (a UUID is 36; room for a client's own scheme).
pub const CALL_ID_BYTES_MAX: usize = 128;
/// Largest `sdp` value (offer or answer), in bytes of JSON. Browser SDPs are 2-10 KB; a
/// simulcast offer with many codecs stays under 20 KB.
pub const CALL_SDP_BYTES_MAX: usize = 32 * 1024;
/// Largest `candidate` value, in bytes of JSON (an `RTCIceCandidateInit` is ~200 B).
pub const CALL_CANDIDATE_BYTES_MAX: usize = 2048;
/// Longest hangup `reason`, in bytes.
pub const CALL_REASON_BYTES_MAX: usize = 64;
/// Calls (ringing or active) one shard owns. A call costs ~200 B plus its ids, so the bound
/// holds the calls of one shard under ~20 MiB; past it offers get `server busy, retry later`.
pub const CALLS_PER_SHARD_MAX: usize = 65_536;

/// Largest `max_calls_per_user` (each party connection keeps a list of this many at most,
/// scanned linearly).
pub const CALLS_PER_USER_LIMIT: usize = 1024;

/// Clustered: how long a command sent to the other nodes (a call this node does not hold)
/// waits for the node holding its call to confirm ([`Input::Held`]) before the requester gets
/// `unknown call` (and an answer's entry is released). A confirmation takes one Redis round
/// trip (milliseconds); the wait only runs out when no node holds the call, or when Redis or
/// the holding node is this late (then an answer confirmed after all ends the call there).
pub const CALL_REMOTE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Clustered: commands one shard has sent to the other nodes and still waits on (each at most
/// [`CALL_REMOTE_WAIT`], ~300 B with its ids); past it such commands get
/// `server busy, retry later`.
pub const CALLS_PENDING_PER_SHARD_MAX: usize = 4096;

/// The owner shard of the calls between `a` and `b`: a fixed hash of the two ids sorted (the
/// same on every shard and run, whichever of them asks).
pub fn owner(a: &str, b: &str, shards: usize) -> usize {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one((lo, hi));
    (h % shards.max(1) as u64) as usize
}

// ------------------------------------------------------------------ across nodes

const REMOTE_ANSWER: u8 = 1;
const REMOTE_ICE: u8 = 2;
const REMOTE_HANGUP: u8 = 3;
const REMOTE_GONE: u8 = 4;
/// In the tag of an answer, ICE or hangup: the key its requester waits under follows (a node
/// of an earlier version refuses such a tag; its own commands, without it, still decode).
const REMOTE_ASK: u8 = 0x80;

/// The body of a call command for another node (`cluster::service::CALL_INPUT`): a tag, then
/// for an answer, ICE or hangup with an `ask` (tag | [`REMOTE_ASK`]) the key its requester's
/// shard waits under (u64 LE; the node holding the call confirms it with [`encode_held`]),
/// the requester (connection, user, `id`), the peer, the call id and the payload. Offers,
/// timers and the rest never leave their node (None); so does an `ask` on a departure
/// (`Gone` needs none).
pub fn encode_remote(input: &Input, ask: Option<u64>) -> Option<(u8, Vec<u8>)> {
    use crate::cluster::{put_conn, put_str};
    let mut v = Vec::with_capacity(64);
    let req_part = |v: &mut Vec<u8>, tag: u8, req: &Req, to: &str, call_id: &str| {
        match ask {
            Some(k) => {
                v.push(tag | REMOTE_ASK);
                v.extend_from_slice(&k.to_le_bytes());
            }
            None => v.push(tag),
        }
        put_conn(v, req.conn);
        put_str(v, &req.user);
        match &req.id {
            Some(id) => {
                v.push(1);
                put_str(v, id);
            }
            None => v.push(0),
        }
        put_str(v, to);
        put_str(v, call_id);
    };
    match input {
        Input::Answer {
            req,
            to,
            call_id,
            sdp,
        } => {
            req_part(&mut v, REMOTE_ANSWER, req, to, call_id);
            put_str(&mut v, sdp);
        }
        Input::Ice {
            req,
            to,
            call_id,
            candidate,
        } => {
            req_part(&mut v, REMOTE_ICE, req, to, call_id);
            put_str(&mut v, candidate);
        }
        Input::Hangup {
            req,
            to,
            call_id,
            reason,
        } => {
            req_part(&mut v, REMOTE_HANGUP, req, to, call_id);
            match reason {
                Some(r) => {
                    v.push(1);
                    put_str(&mut v, r);
                }
                None => v.push(0),
            }
        }
        Input::Gone {
            conn,
            user,
            peer,
            call_id,
        } if ask.is_none() => {
            v.push(REMOTE_GONE);
            put_conn(&mut v, *conn);
            put_str(&mut v, user);
            put_str(&mut v, peer);
            put_str(&mut v, call_id);
        }
        Input::Gone { .. }
        | Input::Offer { .. }
        | Input::Timer { .. }
        | Input::NodeGone { .. }
        | Input::Held { .. } => return None,
    }
    Some((crate::cluster::service::CALL_INPUT, v))
}

/// Decode [`encode_remote`]'s body: the input and its `ask`. None for anything malformed
/// (never panics).
pub fn decode_remote(b: &[u8]) -> Option<(Input, Option<u64>)> {
    let mut r = crate::cluster::Reader::new(b);
    let mut tag = r.u8().ok()?;
    let mut ask = None;
    let input = if tag == REMOTE_GONE {
        Input::Gone {
            conn: r.conn().ok()?,
            user: r.str().ok()?.into(),
            peer: r.str().ok()?.into(),
            call_id: r.str().ok()?.into(),
        }
    } else {
        if tag & REMOTE_ASK != 0 {
            tag &= !REMOTE_ASK;
            ask = Some(r.u64().ok()?);
        }
        if !matches!(tag, REMOTE_ANSWER | REMOTE_ICE | REMOTE_HANGUP) {
            return None;
        }
        let conn = r.conn().ok()?;
        let user: Arc<str> = r.str().ok()?.into();
        let id = match r.u8().ok()? {
            0 => None,
            _ => Some(r.str().ok()?.into()),
        };
        let req = Req { conn, user, id };
        let to: Arc<str> = r.str().ok()?.into();
        let call_id: Box<str> = r.str().ok()?.into();
        match tag {
            REMOTE_ANSWER => Input::Answer {
                req,
                to,
                call_id,
                sdp: r.str().ok()?.into(),
            },
            REMOTE_ICE => Input::Ice {
                req,
                to,
                call_id,
                candidate: r.str().ok()?.into(),
            },
            REMOTE_HANGUP => Input::Hangup {
                req,
                to,
                call_id,
                reason: match r.u8().ok()? {
                    0 => None,
                    _ => Some(r.str().ok()?.into()),
                },
            },
            _ => return None,
        }
    };
    r.done().then_some((input, ask))
}

/// The body of a confirmation for the requester's node (`cluster::service::CALL_HELD`): this
/// node holds the call of the command forwarded under `key` and ran it. `party`: the
/// requester's connection became a party (an accepted answer). Then the requester's
/// connection, user, the peer and the call id.
pub fn encode_held(
    key: u64,
    party: bool,
    conn: ConnRef,
    user: &str,
    peer: &str,
    call_id: &str,
) -> (u8, Vec<u8>) {
    use crate::cluster::{put_conn, put_str};
    let mut v = Vec::with_capacity(48 + user.len() + peer.len() + call_id.len());
    v.extend_from_slice(&key.to_le_bytes());
    v.push(u8::from(party));
    put_conn(&mut v, conn);
    put_str(&mut v, user);
    put_str(&mut v, peer);
    put_str(&mut v, call_id);
    (crate::cluster::service::CALL_HELD, v)
}

/// Decode [`encode_held`]'s body from node `origin` (the node holding the call). None for
/// anything malformed (never panics).
pub fn decode_held(origin: u32, b: &[u8]) -> Option<Input> {
    let mut r = crate::cluster::Reader::new(b);
    let key = r.u64().ok()?;
    let party = match r.u8().ok()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let input = Input::Held {
        key,
        party,
        node: origin,
        conn: r.conn().ok()?,
        user: r.str().ok()?.into(),
        peer: r.str().ok()?.into(),
        call_id: r.str().ok()?.into(),
    };
    r.done().then_some(input)
}

/// The body of an untrack for a party connection on another node
/// (`cluster::service::CALL_UNTRACK`).
pub fn encode_untrack(conn: ConnRef, peer: &str, call_id: &str) -> (u8, Vec<u8>) {
    let mut v = Vec::with_capacity(32 + peer.len() + call_id.len());
    crate::cluster::put_conn(&mut v, conn);
    crate::cluster::put_str(&mut v, peer);
    crate::cluster::put_str(&mut v, call_id);
    (crate::cluster::service::CALL_UNTRACK, v)
}

/// Decode [`encode_untrack`]'s body into the message for the connection's shard.
pub fn decode_untrack(b: &[u8]) -> Option<Msg> {
    let mut r = crate::cluster::Reader::new(b);
    let msg = Msg::Untrack {
        conn: r.conn().ok()?,
        peer: r.str().ok()?.into(),
        call_id: r.str().ok()?.into(),
    };
    r.done().then_some(msg)
}

/// The shard of this node that owns `input`'s pair (for an input from another node).
pub fn owner_of_input(input: &Input, shards: usize) -> usize {
    match input {
        Input::Offer { req, to, .. }
        | Input::Answer { req, to, .. }
        | Input::Ice { req, to, .. }
        | Input::Hangup { req, to, .. } => owner(&req.user, to, shards),
        Input::Gone { user, peer, .. } | Input::Held { user, peer, .. } => {
            owner(user, peer, shards)
        }
        Input::Timer { .. } | Input::NodeGone { .. } => 0,
    }
}

// ------------------------------------------------------------------ the sans-IO machine

/// Who sent a command: the connection (where errors go), its user, the command's `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Req {
    pub conn: ConnRef,
    pub user: Arc<str>,
    pub id: Option<Box<str>>,
}

/// What the owner's machine is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Offer {
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        sdp: Box<str>,
    },
    Answer {
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        sdp: Box<str>,
    },
    Ice {
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        candidate: Box<str>,
    },
    Hangup {
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        reason: Option<Box<str>>,
    },
    /// A party connection of `user` went away (its shard's `on_detach`).
    Gone {
        conn: ConnRef,
        user: Arc<str>,
        peer: Arc<str>,
        call_id: Box<str>,
    },
    /// A ring deadline entry fired (the key of an [`Action::Schedule`]).
    Timer { key: u64 },
    /// Clustered: node `node` died (it was reaped): every call with a party there ends,
    /// `disconnected` for the other side.
    NodeGone { node: u32 },
    /// Clustered: node `node` holds the call of the command this shard forwarded under `key`
    /// for `conn` (of `user`, to `peer`) and ran it; `party`: `conn` became a party (an
    /// accepted answer). It ends the wait ([`Action::Held`] there).
    Held {
        key: u64,
        party: bool,
        node: u32,
        conn: ConnRef,
        user: Arc<str>,
        peer: Arc<str>,
        call_id: Box<str>,
    },
}

/// Calls messages between shards (boxed in `ServiceMsg::Calls`).
pub enum Msg {
    /// For the owner shard of the call's pair.
    Owner(Input),
    /// For the owner shard of the call's pair, from another node whose owner did not hold
    /// the call ([`Action::Elsewhere`] there; `ask`: the key it waits under, to confirm with
    /// [`Action::Held`] if the call is held here), or that node's [`Input::Held`].
    Remote { input: Input, ask: Option<u64> },
    /// For the shard of `conn`: it is no longer a party to `(peer, call_id)`.
    Untrack {
        conn: ConnRef,
        peer: Arc<str>,
        call_id: Box<str>,
    },
}

/// Where an event goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// One connection on any shard.
    Conn(ConnRef),
    /// Every device of `user` (except one).
    User {
        user: Arc<str>,
        except: Option<ConnRef>,
    },
}

/// An event frame's content (`call_id` travels beside it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Incoming { from: Arc<str>, sdp: Box<str> },
    Answer { from: Arc<str>, sdp: Box<str> },
    Ice { from: Arc<str>, candidate: Box<str> },
    Ended { reason: Cow<'static, str> },
}

/// An error the owner sends back to the requester (with `data.call_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// No such call between these two users, it ended, or the requester is not one of its
    /// connections: the client should drop its state for the call.
    UnknownCall,
    /// An offer whose `call_id` is taken by a live call between the same users: pick a new id.
    InUse,
    /// An answer for a call another device (or this one) already answered.
    AlreadyAnswered,
    /// ICE from a callee device before it answered: send `call.answer` first.
    NotAnswered,
    /// The caller is at `max_calls_per_user`: hang up a call first.
    TooManyCalls,
    /// The owner shard is at `CALLS_PER_SHARD_MAX`: retry later.
    ServerBusy,
}

impl CallError {
    pub fn text(self) -> &'static str {
        match self {
            CallError::UnknownCall => "unknown call",
            CallError::InUse => "call_id already in use",
            CallError::AlreadyAnswered => "call already answered",
            CallError::NotAnswered => "call not answered",
            CallError::TooManyCalls => "too many calls",
            CallError::ServerBusy => "server busy, retry later",
        }
    }

    pub fn reason(self) -> ErrorReason {
        match self {
            CallError::ServerBusy => ErrorReason::Busy,
            _ => ErrorReason::BadRequest,
        }
    }
}

/// What the glue does for the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Deliver an event frame for `call_id`.
    Event {
        dest: Dest,
        call_id: Box<str>,
        event: Event,
    },
    /// Send the requester an error.
    Error {
        conn: ConnRef,
        id: Option<Box<str>>,
        err: CallError,
        call_id: Box<str>,
    },
    /// Feed `Input::Timer { key }` back at `tick` or later.
    Schedule { tick: u32, key: u64 },
    /// `conn` is no longer a party to `(peer, call_id)` (its shard drops the entry).
    Untrack {
        conn: ConnRef,
        peer: Arc<str>,
        call_id: Box<str>,
    },
    /// Clustered: no call here for this command; hand it to the other nodes (`node`: only
    /// that one), where the one holding the call (the node its offer reached) runs it and,
    /// with an `ask`, confirms it ([`Input::Held`]).
    Elsewhere {
        input: Input,
        ask: Option<u64>,
        node: Option<u32>,
    },
    /// Clustered: this node holds the call of a command from `conn`'s node, forwarded under
    /// `key`: tell that node ([`encode_held`]), which stops waiting.
    Held {
        key: u64,
        party: bool,
        conn: ConnRef,
        user: Arc<str>,
        peer: Arc<str>,
        call_id: Box<str>,
    },
}

/// Node-wide calls per user: one more (unless at the limit) or one fewer.
pub trait Counts {
    fn up(&mut self, user: &Arc<str>) -> bool;
    fn down(&mut self, user: &Arc<str>);
}

/// Counters the glue moves into the shard's stats after each input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub offered: u64,
    pub answered: u64,
    pub busy: u64,
    pub ended_hangup: u64,
    pub ended_timeout: u64,
    pub ended_disconnected: u64,
    pub ended_glare: u64,
    /// Clustered: commands sent to the other nodes that no node confirmed in time.
    pub remote_unanswered: u64,
    /// Clustered: confirmations of an answer after its wait ran out (that call ended there).
    pub remote_late: u64,
}

/// The clock and settings an input is handled with.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub now: u32,
    /// `ring_timeout` in wheel ticks.
    pub ring_ticks: u32,
    /// Other nodes exist: a command for a call this shard does not hold may be for a call
    /// held on another node ([`Action::Elsewhere`]) rather than `unknown call`.
    pub clustered: bool,
    /// The input came from another node (its node held no such call): a call not held here
    /// either is dropped silently, since the node that holds it answers.
    pub remote: bool,
    /// With `remote`: the requester's shard waits for a confirmation under this key
    /// ([`Action::Held`] when the call is held here).
    pub ask: Option<u64>,
    /// [`CALL_REMOTE_WAIT`] in wheel ticks: how long a command sent to the other nodes waits.
    pub wait_ticks: u32,
}

struct Call {
    /// Generation in the timer key (24 bits): a reused slab index never takes an old timer.
    gen: u32,
    id: Box<str>,
    caller: Arc<str>,
    callee: Arc<str>,
    caller_conn: ConnRef,
    /// The answering connection; `None` while ringing.
    answered: Option<ConnRef>,
    /// Ring deadline tick (meaningful while ringing).
    deadline: u32,
}

/// Clustered: a command sent to the other nodes, waiting for the one holding its call.
struct Pending {
    gen: u32,
    conn: ConnRef,
    /// The requester's user (an answer's [`Input::Gone`] names it).
    user: Arc<str>,
    id: Option<Box<str>>,
    peer: Arc<str>,
    call_id: Box<str>,
    /// An answer: the requester's shard holds a use of its entry for the call.
    tracked: bool,
    deadline: u32,
}

const GEN_MASK: u32 = (1 << 24) - 1;
/// In a timer key (and the key a command is forwarded under): a [`Pending`] entry, not a call
/// (slab indexes stay far below it: [`CALLS_PER_SHARD_MAX`], [`CALLS_PENDING_PER_SHARD_MAX`]).
const PENDING_BIT: u64 = 1 << 31;

/// The calls one shard owns: calls by slab index, the calls of each user pair (for lookup by
/// `call_id` and glare), the commands waiting on other nodes, and the counters. No I/O, no
/// clock: inputs in, actions out.
#[derive(Default)]
pub struct Calls {
    slab: Slab<Call>,
    pairs: HashMap<(Arc<str>, Arc<str>), Vec<u32>>,
    /// Clustered: commands sent to the other nodes, by slab index (at most
    /// [`CALLS_PENDING_PER_SHARD_MAX`]).
    pending: Slab<Pending>,
    next_gen: u32,
    pub stats: Stats,
}

fn pair(a: &Arc<str>, b: &Arc<str>) -> (Arc<str>, Arc<str>) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl Calls {
    /// Calls owned now.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Commands sent to the other nodes still waiting for a confirmation.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn next_gen(&mut self) -> u32 {
        let gen = self.next_gen & GEN_MASK;
        self.next_gen = self.next_gen.wrapping_add(1);
        gen
    }

    fn find(&self, a: &Arc<str>, b: &Arc<str>, call_id: &str) -> Option<usize> {
        let list = self.pairs.get(&pair(a, b))?;
        list.iter()
            .map(|&i| i as usize)
            .find(|&i| &*self.slab[i].id == call_id)
    }

    fn key(&self, i: usize) -> u64 {
        (u64::from(self.slab[i].gen) << 32) | i as u64
    }

    /// Handle one input, appending what to do to `out`.
    pub fn handle(
        &mut self,
        input: Input,
        cx: Ctx,
        counts: &mut impl Counts,
        out: &mut Vec<Action>,
    ) {
        // From another node that waits for a confirmation: if the call is held here, the
        // command runs and that node hears so (whatever the outcome).
        let confirm = match (&input, cx.ask) {
            (
                Input::Answer {
                    req, to, call_id, ..
                }
                | Input::Ice {
                    req, to, call_id, ..
                }
                | Input::Hangup {
                    req, to, call_id, ..
                },
                Some(key),
            ) if cx.remote && self.find(&req.user, to, call_id).is_some() => {
                Some((key, req.conn, req.user.clone(), to.clone(), call_id.clone()))
            }
            _ => None,
        };
        let mut party = false;
        match input {
            Input::Offer {
                req,
                to,
                call_id,
                sdp,
            } => self.offer(req, to, call_id, sdp, cx, counts, out),
            Input::Answer {
                req,
                to,
                call_id,
                sdp,
            } => party = self.answer(req, to, call_id, sdp, cx, out),
            Input::Ice {
                req,
                to,
                call_id,
                candidate,
            } => self.ice(req, to, call_id, candidate, cx, out),
            Input::Hangup {
                req,
                to,
                call_id,
                reason,
            } => self.hangup(req, to, call_id, reason, cx, counts, out),
            Input::Gone {
                conn,
                user,
                peer,
                call_id,
            } => self.gone(conn, user, peer, call_id, cx, counts, out),
            Input::Timer { key } if key & PENDING_BIT != 0 => self.pending_timer(key, cx, out),
            Input::Timer { key } => self.timer(key, cx, counts, out),
            Input::NodeGone { node } => self.node_gone(node, counts, out),
            Input::Held {
                key,
                party,
                node,
                conn,
                user,
                peer,
                call_id,
            } => self.held(key, party, node, conn, user, peer, call_id, out),
        }
        if let Some((key, conn, user, peer, call_id)) = confirm {
            out.push(Action::Held {
                key,
                party,
                conn,
                user,
                peer,
                call_id,
            });
        }
    }

    /// The [`Pending`] entry of `key`, if it is still waiting.
    fn pending_of(&self, key: u64) -> Option<usize> {
        let i = (key & (PENDING_BIT - 1)) as usize;
        let gen = (key >> 32) as u32;
        self.pending
            .get(i)
            .filter(|p| key & PENDING_BIT != 0 && p.gen == gen)
            .map(|_| i)
    }

    /// A command sent to the other nodes: no node confirmed it within its wait, so no node
    /// holds its call (or none could say so in time): `unknown call`, as on one node, and an
    /// answer's entry is released. An answer may still have been accepted by a node whose
    /// confirmation was lost or late: every other node is told the requester left the call
    /// ([`Input::Gone`], as its shard's `on_detach` would), so a node that made it a party
    /// ends the call there (`disconnected` for the caller) and both sides agree it is over;
    /// a node where it is no party ignores it.
    fn pending_timer(&mut self, key: u64, cx: Ctx, out: &mut Vec<Action>) {
        let Some(i) = self.pending_of(key) else {
            return; // confirmed: a stale entry
        };
        let p = &self.pending[i];
        if (p.deadline.wrapping_sub(cx.now) as i32) > 0 {
            out.push(Action::Schedule {
                tick: p.deadline,
                key,
            });
            return;
        }
        let p = self.pending.remove(i);
        self.stats.remote_unanswered += 1;
        if p.tracked {
            out.push(Action::Untrack {
                conn: p.conn,
                peer: p.peer.clone(),
                call_id: p.call_id.clone(),
            });
        }
        out.push(Action::Error {
            conn: p.conn,
            id: p.id,
            err: CallError::UnknownCall,
            call_id: p.call_id.clone(),
        });
        if p.tracked {
            out.push(Action::Elsewhere {
                input: Input::Gone {
                    conn: p.conn,
                    user: p.user,
                    peer: p.peer,
                    call_id: p.call_id,
                },
                ask: None,
                node: None,
            });
        }
    }

    /// Node `node` holds the call of the command forwarded under `key` and ran it: the wait is
    /// over (its own answer or error reaches the requester from there). A confirmation for
    /// nothing waiting here (it came after the wait ran out, so the requester was told
    /// `unknown call`, or a second node holds a call with the same id) that made the requester
    /// a party ends that call on that node, as if the requester had left: the requester's
    /// shard no longer counts it as a party, so nothing else would.
    #[allow(clippy::too_many_arguments)]
    fn held(
        &mut self,
        key: u64,
        party: bool,
        node: u32,
        conn: ConnRef,
        user: Arc<str>,
        peer: Arc<str>,
        call_id: Box<str>,
        out: &mut Vec<Action>,
    ) {
        if let Some(i) = self.pending_of(key) {
            let p = &self.pending[i];
            if p.conn == conn && p.peer == peer && p.call_id == call_id {
                self.pending.remove(i);
                return;
            }
        }
        if party {
            self.stats.remote_late += 1;
            out.push(Action::Elsewhere {
                input: Input::Gone {
                    conn,
                    user,
                    peer,
                    call_id,
                },
                ask: None,
                node: Some(node),
            });
        }
    }

    fn node_gone(&mut self, node: u32, counts: &mut impl Counts, out: &mut Vec<Action>) {
        let dead: Vec<usize> = self
            .slab
            .iter()
            .filter(|(_, c)| {
                c.caller_conn.node == node || c.answered.is_some_and(|a| a.node == node)
            })
            .map(|(i, _)| i)
            .collect();
        for i in dead {
            let c = &self.slab[i];
            let dest = if c.caller_conn.node == node {
                match c.answered {
                    None => Dest::User {
                        user: c.callee.clone(),
                        except: None,
                    },
                    Some(a) => Dest::Conn(a),
                }
            } else {
                Dest::Conn(c.caller_conn)
            };
            out.push(ended(dest, &c.id, "disconnected"));
            self.stats.ended_disconnected += 1;
            self.remove(i, counts, out);
        }
    }

    /// A command (answer, ICE, hangup) for a call this shard does not hold: `unknown call` on
    /// one node; clustered, the call may be held by the node its offer reached, so the
    /// command goes to the other nodes ([`Action::Elsewhere`], the requester's entry still
    /// tracked) and waits here, up to [`CALL_REMOTE_WAIT`], for the node holding it to
    /// confirm ([`Input::Held`]; that node answers, and untracks the entry if it refuses);
    /// unconfirmed, it is `unknown call` after all ([`Calls::pending_timer`]). A command that
    /// came from another node is dropped here (its node waits for the holder's confirmation).
    fn not_here(&mut self, input: Input, cx: Ctx, tracked: bool, out: &mut Vec<Action>) {
        if cx.remote {
            return;
        }
        if cx.clustered {
            let (req, peer, call_id) = match &input {
                Input::Answer {
                    req, to, call_id, ..
                }
                | Input::Ice {
                    req, to, call_id, ..
                }
                | Input::Hangup {
                    req, to, call_id, ..
                } => (req, to, call_id),
                _ => return,
            };
            if self.pending.len() >= CALLS_PENDING_PER_SHARD_MAX {
                let (req, peer, call_id) = (req.clone(), peer.clone(), call_id.clone());
                return self.refuse(req, peer, call_id, CallError::ServerBusy, tracked, out);
            }
            let gen = self.next_gen();
            let deadline = cx.now.wrapping_add(cx.wait_ticks.max(1));
            let i = self.pending.insert(Pending {
                gen,
                conn: req.conn,
                user: req.user.clone(),
                id: req.id.clone(),
                peer: peer.clone(),
                call_id: call_id.clone(),
                tracked,
                deadline,
            });
            let key = (u64::from(gen) << 32) | PENDING_BIT | i as u64;
            out.push(Action::Schedule {
                tick: deadline,
                key,
            });
            out.push(Action::Elsewhere {
                input,
                ask: Some(key),
                node: None,
            });
            return;
        }
        match input {
            Input::Answer {
                req, to, call_id, ..
            }
            | Input::Ice {
                req, to, call_id, ..
            }
            | Input::Hangup {
                req, to, call_id, ..
            } => self.refuse(req, to, call_id, CallError::UnknownCall, tracked, out),
            Input::Offer { .. }
            | Input::Gone { .. }
            | Input::Timer { .. }
            | Input::NodeGone { .. }
            | Input::Held { .. } => {}
        }
    }

    /// Refuse `req`: the error, and for an offer or answer (`tracked`: the requester's shard
    /// counted one more use of the entry for the call) the untrack that takes it back.
    fn refuse(
        &self,
        req: Req,
        peer: Arc<str>,
        call_id: Box<str>,
        err: CallError,
        tracked: bool,
        out: &mut Vec<Action>,
    ) {
        if tracked {
            out.push(Action::Untrack {
                conn: req.conn,
                peer,
                call_id: call_id.clone(),
            });
        }
        out.push(Action::Error {
            conn: req.conn,
            id: req.id,
            err,
            call_id,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn offer(
        &mut self,
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        sdp: Box<str>,
        cx: Ctx,
        counts: &mut impl Counts,
        out: &mut Vec<Action>,
    ) {
        if self.find(&req.user, &to, &call_id).is_some() {
            return self.refuse(req, to, call_id, CallError::InUse, true, out);
        }
        // Glare: the other user's offer to this one is still ringing. The offer of the user
        // whose id sorts first survives.
        let glare = self.pairs.get(&pair(&req.user, &to)).and_then(|list| {
            list.iter().map(|&i| i as usize).find(|&i| {
                let c = &self.slab[i];
                c.answered.is_none() && c.caller == to && c.callee == req.user
            })
        });
        if let Some(j) = glare {
            self.stats.ended_glare += 1;
            if req.user < to {
                // The ringing call loses: its caller and every device that rang hear why.
                let c = &self.slab[j];
                let id = c.id.clone();
                out.push(ended(Dest::Conn(c.caller_conn), &id, "glare"));
                out.push(ended(
                    Dest::User {
                        user: c.callee.clone(),
                        except: None,
                    },
                    &id,
                    "glare",
                ));
                self.remove(j, counts, out);
            } else {
                // This offer loses; nobody else saw it.
                out.push(ended(Dest::Conn(req.conn), &call_id, "glare"));
                out.push(Action::Untrack {
                    conn: req.conn,
                    peer: to,
                    call_id,
                });
                return;
            }
        }
        if self.slab.len() >= CALLS_PER_SHARD_MAX {
            return self.refuse(req, to, call_id, CallError::ServerBusy, true, out);
        }
        if !counts.up(&req.user) {
            return self.refuse(req, to, call_id, CallError::TooManyCalls, true, out);
        }
        if !counts.up(&to) {
            counts.down(&req.user);
            self.stats.busy += 1;
            out.push(ended(Dest::Conn(req.conn), &call_id, "busy"));
            out.push(Action::Untrack {
                conn: req.conn,
                peer: to,
                call_id,
            });
            return;
        }
        let gen = self.next_gen();
        let deadline = cx.now.wrapping_add(cx.ring_ticks.max(1));
        let i = self.slab.insert(Call {
            gen,
            id: call_id.clone(),
            caller: req.user.clone(),
            callee: to.clone(),
            caller_conn: req.conn,
            answered: None,
            deadline,
        });
        self.pairs
            .entry(pair(&req.user, &to))
            .or_default()
            .push(i as u32);
        self.stats.offered += 1;
        out.push(Action::Schedule {
            tick: deadline,
            key: self.key(i),
        });
        out.push(Action::Event {
            dest: Dest::User {
                user: to,
                except: None,
            },
            call_id,
            event: Event::Incoming {
                from: req.user,
                sdp,
            },
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        sdp: Box<str>,
        cx: Ctx,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(i) = self.find(&req.user, &to, &call_id) else {
            let input = Input::Answer {
                req,
                to,
                call_id,
                sdp,
            };
            self.not_here(input, cx, true, out);
            return false;
        };
        let c = &self.slab[i];
        if c.callee != req.user {
            self.refuse(req, to, call_id, CallError::UnknownCall, true, out);
            return false;
        }
        if c.answered.is_some() {
            self.refuse(req, to, call_id, CallError::AlreadyAnswered, true, out);
            return false;
        }
        let caller_conn = c.caller_conn;
        self.slab[i].answered = Some(req.conn);
        self.stats.answered += 1;
        out.push(Action::Event {
            dest: Dest::Conn(caller_conn),
            call_id: call_id.clone(),
            event: Event::Answer {
                from: req.user.clone(),
                sdp,
            },
        });
        out.push(ended(
            Dest::User {
                user: req.user,
                except: Some(req.conn),
            },
            &call_id,
            "answered_elsewhere",
        ));
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn ice(
        &mut self,
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        candidate: Box<str>,
        cx: Ctx,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.find(&req.user, &to, &call_id) else {
            let input = Input::Ice {
                req,
                to,
                call_id,
                candidate,
            };
            return self.not_here(input, cx, false, out);
        };
        let c = &self.slab[i];
        let dest = if req.conn == c.caller_conn {
            match c.answered {
                // Before the answer: every device that rings (the caller cannot know which one
                // will answer).
                None => Dest::User {
                    user: c.callee.clone(),
                    except: None,
                },
                Some(a) => Dest::Conn(a),
            }
        } else if c.answered == Some(req.conn) {
            Dest::Conn(c.caller_conn)
        } else if c.answered.is_none() && c.callee == req.user {
            return self.refuse(req, to, call_id, CallError::NotAnswered, false, out);
        } else {
            return self.refuse(req, to, call_id, CallError::UnknownCall, false, out);
        };
        out.push(Action::Event {
            dest,
            call_id,
            event: Event::Ice {
                from: req.user,
                candidate,
            },
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn hangup(
        &mut self,
        req: Req,
        to: Arc<str>,
        call_id: Box<str>,
        reason: Option<Box<str>>,
        cx: Ctx,
        counts: &mut impl Counts,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.find(&req.user, &to, &call_id) else {
            let input = Input::Hangup {
                req,
                to,
                call_id,
                reason,
            };
            return self.not_here(input, cx, false, out);
        };
        let given = |default: &'static str| -> Cow<'static, str> {
            match &reason {
                Some(r) => Cow::Owned(r.to_string()),
                None => Cow::Borrowed(default),
            }
        };
        let c = &self.slab[i];
        if req.conn == c.caller_conn {
            // The caller hangs up (a cancel while ringing).
            let dest = match c.answered {
                None => Dest::User {
                    user: c.callee.clone(),
                    except: None,
                },
                Some(a) => Dest::Conn(a),
            };
            out.push(Action::Event {
                dest,
                call_id: call_id.clone(),
                event: Event::Ended {
                    reason: given("hangup"),
                },
            });
        } else if c.answered == Some(req.conn) {
            out.push(Action::Event {
                dest: Dest::Conn(c.caller_conn),
                call_id: call_id.clone(),
                event: Event::Ended {
                    reason: given("hangup"),
                },
            });
        } else if c.answered.is_none() && c.callee == req.user {
            // A ringing device declines: the caller hears `rejected`, the callee's other
            // devices stop ringing.
            out.push(Action::Event {
                dest: Dest::Conn(c.caller_conn),
                call_id: call_id.clone(),
                event: Event::Ended {
                    reason: given("rejected"),
                },
            });
            out.push(ended(
                Dest::User {
                    user: req.user.clone(),
                    except: Some(req.conn),
                },
                &call_id,
                "rejected_elsewhere",
            ));
        } else {
            return self.refuse(req, to, call_id, CallError::UnknownCall, false, out);
        }
        self.stats.ended_hangup += 1;
        self.remove(i, counts, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn gone(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        peer: Arc<str>,
        call_id: Box<str>,
        cx: Ctx,
        counts: &mut impl Counts,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.find(&user, &peer, &call_id) else {
            // Ended already, or (clustered) held by another node.
            if cx.clustered && !cx.remote {
                out.push(Action::Elsewhere {
                    input: Input::Gone {
                        conn,
                        user,
                        peer,
                        call_id,
                    },
                    ask: None,
                    node: None,
                });
            }
            return;
        };
        let c = &self.slab[i];
        let dest = if conn == c.caller_conn {
            match c.answered {
                None => Dest::User {
                    user: c.callee.clone(),
                    except: None,
                },
                Some(a) => Dest::Conn(a),
            }
        } else if c.answered == Some(conn) {
            Dest::Conn(c.caller_conn)
        } else {
            return; // not a party (a stale entry)
        };
        out.push(ended(dest, &call_id, "disconnected"));
        self.stats.ended_disconnected += 1;
        self.remove(i, counts, out);
    }

    fn timer(&mut self, key: u64, cx: Ctx, counts: &mut impl Counts, out: &mut Vec<Action>) {
        let i = (key & 0xFFFF_FFFF) as usize;
        let gen = (key >> 32) as u32;
        let Some(c) = self
            .slab
            .get(i)
            .filter(|c| c.gen == gen && c.answered.is_none())
        else {
            return; // answered or ended: a stale entry
        };
        // Wrapping tick compare: the deadline is at most a ring_timeout ahead.
        if (c.deadline.wrapping_sub(cx.now) as i32) > 0 {
            out.push(Action::Schedule {
                tick: c.deadline,
                key,
            });
            return;
        }
        out.push(ended(Dest::Conn(c.caller_conn), &c.id, "timeout"));
        out.push(ended(
            Dest::User {
                user: c.callee.clone(),
                except: None,
            },
            &c.id,
            "timeout",
        ));
        self.stats.ended_timeout += 1;
        self.remove(i, counts, out);
    }

    /// End call `i`: free its counts, untrack its party connections, drop it.
    fn remove(&mut self, i: usize, counts: &mut impl Counts, out: &mut Vec<Action>) {
        let c = self.slab.remove(i);
        let p = pair(&c.caller, &c.callee);
        if let Some(list) = self.pairs.get_mut(&p) {
            list.retain(|&x| x as usize != i);
            if list.is_empty() {
                self.pairs.remove(&p);
            }
        }
        counts.down(&c.caller);
        counts.down(&c.callee);
        out.push(Action::Untrack {
            conn: c.caller_conn,
            peer: c.callee.clone(),
            call_id: c.id.clone(),
        });
        if let Some(a) = c.answered {
            out.push(Action::Untrack {
                conn: a,
                peer: c.caller,
                call_id: c.id,
            });
        }
    }
}

fn ended(dest: Dest, call_id: &str, reason: &'static str) -> Action {
    Action::Event {
        dest,
        call_id: call_id.into(),
        event: Event::Ended {
            reason: Cow::Borrowed(reason),
        },
    }
}

// ------------------------------------------------------------------ the shard glue

/// The calls a connection is a party to, on its own shard.
struct ConnCalls {
    gen: u32,
    calls: Vec<Tracked>,
}

/// One call a connection is a party to.
struct Tracked {
    peer: Arc<str>,
    call_id: Box<str>,
    /// Offers and answers for it not yet untracked by the owner (usually 1).
    uses: u32,
}

/// Per-shard state of the calls service.
#[derive(Default)]
pub struct State {
    /// The calls this shard owns.
    pub machine: Calls,
    /// Connections of this shard that are a party to a call: slot -> (peer, call_id) list.
    /// Only connections in a call have an entry; each list holds at most `max_calls_per_user`.
    conns: HashMap<u32, ConnCalls>,
    /// Reused action buffer.
    actions: Vec<Action>,
}

/// The node-wide per-user call counts (`Directory::calls`), at `max_calls_per_user`.
struct NodeCounts<'a> {
    names: &'a Names,
    max: u32,
}

impl Counts for NodeCounts<'_> {
    fn up(&mut self, user: &Arc<str>) -> bool {
        self.names.count_up(user, self.max).is_some()
    }
    fn down(&mut self, user: &Arc<str>) {
        self.names.count_down(user);
    }
}

#[derive(Deserialize)]
struct SdpCmd<'a> {
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    call_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sdp: Option<LazyValue<'a>>,
}

#[derive(Deserialize)]
struct IceCmd<'a> {
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    call_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    candidate: Option<LazyValue<'a>>,
}

#[derive(Deserialize)]
struct HangupCmd<'a> {
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    call_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

fn parse<'a, T: Deserialize<'a>>(sh: &mut Shard, slot: u32, cmd: &Cmd<'a>) -> Option<T> {
    let parsed = parse_as::<T>(cmd.text);
    if parsed.is_none() {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::InvalidJson,
            "invalid JSON format",
            None,
        );
    }
    parsed
}

/// An error frame, with `data.call_id` when the command had a usable one.
fn error_frame(sh: &mut Shard, id: Option<&str>, text: &str, call_id: Option<&str>) -> Frame {
    let now_ms = sh.now_ms;
    sh.fb.text(sh.now_us, |o| {
        o.str("type", "error").id(id).str("error", text);
        if let Some(c) = call_id {
            o.obj("data", |d| {
                d.str("call_id", c);
            });
        }
        o.u64("timestamp", now_ms);
    })
}

fn send_error(
    sh: &mut Shard,
    slot: u32,
    id: Option<&str>,
    reason: ErrorReason,
    text: &str,
    call_id: Option<&str>,
) {
    sh.out.stats.errors[reason as usize] += 1;
    let f = error_frame(sh, id, text, call_id);
    sh.reply(slot, f);
}

/// A JSON payload that is present: not absent, `null` or `""`.
fn payload<'v>(v: &'v Option<LazyValue<'_>>) -> Option<&'v str> {
    v.as_ref()
        .map(|v| v.as_raw_str())
        .filter(|r| *r != "null" && *r != "\"\"")
}

/// The checks every call command shares, in order: an identity, a `call_id`, a `to` that is
/// someone else. Returns the requester and the peer, or the error sent.
fn front(
    sh: &mut Shard,
    slot: u32,
    cmd: &Cmd<'_>,
    to: &Option<Cow<'_, str>>,
    call_id: &Option<Cow<'_, str>>,
) -> Option<(Req, Arc<str>)> {
    let id = cmd.id;
    let cid = non_empty(call_id);
    let usable = cid.filter(|c| c.len() <= CALL_ID_BYTES_MAX);
    let Some(user) = sh.clients[slot as usize].user.clone() else {
        send_error(sh, slot, id, ErrorReason::NotAllowed, "not allowed", usable);
        return None;
    };
    let Some(cid) = cid else {
        send_error(
            sh,
            slot,
            id,
            ErrorReason::BadRequest,
            "call_id is required",
            None,
        );
        return None;
    };
    if cid.len() > CALL_ID_BYTES_MAX {
        send_error(
            sh,
            slot,
            id,
            ErrorReason::BadRequest,
            "call_id too long",
            None,
        );
        return None;
    }
    let Some(to) = non_empty(to).filter(|t| t.len() <= ID_BYTES_MAX) else {
        send_error(
            sh,
            slot,
            id,
            ErrorReason::BadRequest,
            "to is required",
            Some(cid),
        );
        return None;
    };
    if to == &*user {
        send_error(
            sh,
            slot,
            id,
            ErrorReason::NotAllowed,
            "not allowed",
            Some(cid),
        );
        return None;
    }
    let to: Arc<str> = match sh.users.key(to) {
        Some(k) => k,
        None => Arc::from(to),
    };
    let req = Req {
        conn: sh.conn_ref(slot),
        user,
        id: id.map(Box::from),
    };
    Some((req, to))
}

fn too_large(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>, call_id: &str) {
    send_error(
        sh,
        slot,
        cmd.id,
        ErrorReason::TooLarge,
        "message too large",
        Some(call_id),
    );
}

/// `call.offer {to, call_id, sdp}`.
pub fn offer(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    sdp_command(sh, slot, cmd, true);
}

/// `call.answer {to, call_id, sdp}`.
pub fn answer(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    sdp_command(sh, slot, cmd, false);
}

fn sdp_command(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>, is_offer: bool) {
    let Some(c) = parse::<SdpCmd>(sh, slot, cmd) else {
        return;
    };
    let Some((req, to)) = front(sh, slot, cmd, &c.to, &c.call_id) else {
        return;
    };
    let call_id = non_empty(&c.call_id).unwrap_or_default();
    let Some(sdp) = payload(&c.sdp) else {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::BadRequest,
            "sdp is required",
            Some(call_id),
        );
        return;
    };
    if sdp.len() > CALL_SDP_BYTES_MAX {
        return too_large(sh, slot, cmd, call_id);
    }
    if is_offer && !super::policy::may_address(sh, slot, &to) {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::NotAllowed,
            "not allowed",
            Some(call_id),
        );
        return;
    }
    // Nobody to ring: on one node the directory knows at once (clustered, the callee may be
    // on another node, so the offer rings until ring_timeout).
    if is_offer && !sh.node.clustered && sh.node.dir.user_shards(&to) == 0 {
        sh.out.stats.calls_unavailable += 1;
        apply(sh, ended(Dest::Conn(req.conn), call_id, "unavailable"));
        return;
    }
    // This connection becomes a party (the caller, or the answering device): remember it
    // here, so a disconnect ends the call; the owner untracks it if it refuses.
    if !track(sh, slot, &to, call_id) {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::BadRequest,
            "too many calls",
            Some(call_id),
        );
        return;
    }
    let (call_id, sdp): (Box<str>, Box<str>) = (call_id.into(), sdp.into());
    let input = if is_offer {
        Input::Offer {
            req,
            to: to.clone(),
            call_id: call_id.clone(),
            sdp,
        }
    } else {
        Input::Answer {
            req,
            to: to.clone(),
            call_id: call_id.clone(),
            sdp,
        }
    };
    if !forward(sh, input) {
        untrack_local(sh, slot, &to, &call_id);
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::Busy,
            "server busy, retry later",
            Some(&call_id),
        );
    }
}

/// `call.ice {to, call_id, candidate}`.
pub fn ice(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<IceCmd>(sh, slot, cmd) else {
        return;
    };
    let Some((req, to)) = front(sh, slot, cmd, &c.to, &c.call_id) else {
        return;
    };
    let call_id = non_empty(&c.call_id).unwrap_or_default();
    let Some(candidate) = payload(&c.candidate) else {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::BadRequest,
            "candidate is required",
            Some(call_id),
        );
        return;
    };
    if candidate.len() > CALL_CANDIDATE_BYTES_MAX {
        return too_large(sh, slot, cmd, call_id);
    }
    let input = Input::Ice {
        req,
        to,
        call_id: call_id.into(),
        candidate: candidate.into(),
    };
    if !forward(sh, input) {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::Busy,
            "server busy, retry later",
            Some(call_id),
        );
    }
}

/// `call.hangup {to, call_id, reason?}`.
pub fn hangup(sh: &mut Shard, slot: u32, cmd: &Cmd<'_>) {
    let Some(c) = parse::<HangupCmd>(sh, slot, cmd) else {
        return;
    };
    let Some((req, to)) = front(sh, slot, cmd, &c.to, &c.call_id) else {
        return;
    };
    let call_id = non_empty(&c.call_id).unwrap_or_default();
    let reason = non_empty(&c.reason);
    if reason.is_some_and(|r| r.len() > CALL_REASON_BYTES_MAX) {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::BadRequest,
            "reason too long",
            Some(call_id),
        );
        return;
    }
    let input = Input::Hangup {
        req,
        to,
        call_id: call_id.into(),
        reason: reason.map(Box::from),
    };
    if !forward(sh, input) {
        send_error(
            sh,
            slot,
            cmd.id,
            ErrorReason::Busy,
            "server busy, retry later",
            Some(call_id),
        );
    }
}

/// The owner shard of an input's pair.
fn owner_of(sh: &Shard, a: &str, b: &str) -> usize {
    owner(a, b, sh.node.inboxes.len())
}

/// Hand `input` to its owner (run it here if this shard owns the pair). False when the
/// owner's inbox could not take it (counted).
fn forward(sh: &mut Shard, input: Input) -> bool {
    let own = match &input {
        Input::Offer { req, to, .. }
        | Input::Answer { req, to, .. }
        | Input::Ice { req, to, .. }
        | Input::Hangup { req, to, .. } => owner_of(sh, &req.user, to),
        Input::Gone { user, peer, .. } | Input::Held { user, peer, .. } => owner_of(sh, user, peer),
        Input::Timer { .. } | Input::NodeGone { .. } => sh.id,
    };
    if own == sh.id {
        run(sh, input);
        return true;
    }
    let msg =
        crate::shard::ShardMsg::service(super::ServiceMsg::Calls(Box::new(Msg::Owner(input))));
    if sh.node.inboxes.send(own, msg).is_ok() {
        sh.out.stats.cross_shard_sent += 1;
        true
    } else {
        sh.out.stats.cross_shard_dropped += 1;
        false
    }
}

/// Run one input through this shard's machine and carry out its actions.
fn run(sh: &mut Shard, input: Input) {
    run_from(sh, input, false, None);
}

/// [`run`]; `remote`: the input came from another node, `ask`: which waits for a
/// confirmation under this key.
fn run_from(sh: &mut Shard, input: Input, remote: bool, ask: Option<u64>) {
    let node = sh.node.clone();
    let mut counts = NodeCounts {
        names: &node.dir.calls,
        max: node.cfg.max_calls_per_user.min(u32::MAX as usize) as u32,
    };
    let cx = Ctx {
        now: sh.now_tick,
        // One tick more: `now` is the current tick's start, so the call rings at least
        // ring_timeout (and at most one tick longer).
        ring_ticks: crate::shard::ticks(node.cfg.ring_timeout) + 1,
        clustered: node.clustered,
        remote,
        ask,
        // One tick more, as for the ring.
        wait_ticks: crate::shard::ticks(CALL_REMOTE_WAIT) + 1,
    };
    let mut out = std::mem::take(&mut sh.svc.calls.actions);
    sh.svc
        .calls
        .machine
        .handle(input, cx, &mut counts, &mut out);
    let s = std::mem::take(&mut sh.svc.calls.machine.stats);
    let st = &mut sh.out.stats;
    st.calls_offered += s.offered;
    st.calls_answered += s.answered;
    st.calls_busy += s.busy;
    st.calls_ended_hangup += s.ended_hangup;
    st.calls_ended_timeout += s.ended_timeout;
    st.calls_ended_disconnected += s.ended_disconnected;
    st.calls_ended_glare += s.ended_glare;
    st.calls_remote_unanswered += s.remote_unanswered;
    st.calls_remote_late += s.remote_late;
    for a in out.drain(..) {
        apply(sh, a);
    }
    sh.svc.calls.actions = out;
}

/// A call message for the other nodes (`node`: one of them; None: every one), through the
/// bridge. Lost to a full bridge inbox (counted): a lost command is like a lost signalling
/// packet, and the ring timeout or a hangup still ends the call.
fn to_other_nodes(sh: &mut Shard, node: Option<u32>, body: (u8, Vec<u8>)) {
    let msg = crate::bridge::BridgeMsg::Service {
        to: node.map_or(
            crate::bridge::ServiceTo::Calls,
            crate::bridge::ServiceTo::Node,
        ),
        service: body.0,
        body: body.1,
    };
    if sh.node.bridge_tx.try_send(msg).is_err() {
        sh.out.stats.bridge_dropped += 1;
    }
}

fn apply(sh: &mut Shard, a: Action) {
    match a {
        Action::Elsewhere { input, ask, node } => {
            if let Some(body) = encode_remote(&input, ask) {
                to_other_nodes(sh, node, body);
            }
        }
        Action::Held {
            key,
            party,
            conn,
            user,
            peer,
            call_id,
        } => {
            // Only inputs from another node are confirmed. Lost (a full bridge inbox): the
            // requester hears `unknown call` when its wait runs out.
            if conn.node != sh.node.id {
                let body = encode_held(key, party, conn, &user, &peer, &call_id);
                to_other_nodes(sh, Some(conn.node), body);
            }
        }
        Action::Event {
            dest,
            call_id,
            event,
        } => {
            let now_ms = sh.now_ms;
            let f = sh.fb.text(sh.now_us, |o| {
                let kind = match &event {
                    Event::Incoming { .. } => "call.incoming",
                    Event::Answer { .. } => "call.answer",
                    Event::Ice { .. } => "call.ice",
                    Event::Ended { .. } => "call.ended",
                };
                o.str("type", kind)
                    .obj("data", |d| {
                        d.str("call_id", &call_id);
                        match &event {
                            Event::Incoming { from, sdp } | Event::Answer { from, sdp } => {
                                d.str("from", from).raw("sdp", sdp);
                            }
                            Event::Ice { from, candidate } => {
                                d.str("from", from).raw("candidate", candidate);
                            }
                            Event::Ended { reason } => {
                                d.str("reason", reason);
                            }
                        }
                    })
                    .u64("timestamp", now_ms);
            });
            let target = match dest {
                Dest::Conn(c) => Target::Conn(c),
                Dest::User { user, except } => Target::User { user, except },
            };
            // A frame a full inbox could not take is lost like any signalling packet; the
            // ring timeout or a hangup still ends the call (counted in cross_shard_dropped).
            sh.deliver(&target, &f);
        }
        Action::Error {
            conn,
            id,
            err,
            call_id,
        } => {
            sh.out.stats.errors[err.reason() as usize] += 1;
            let f = error_frame(sh, id.as_deref(), err.text(), Some(&call_id));
            sh.deliver(&Target::Conn(conn), &f);
        }
        Action::Schedule { tick, key } => {
            sh.schedule_service(tick, super::id::CALLS, key);
        }
        Action::Untrack {
            conn,
            peer,
            call_id,
        } => {
            if conn.node == sh.node.id && conn.shard as usize == sh.id {
                if sh
                    .clients
                    .get(conn.slot as usize)
                    .is_some_and(|c| c.gen == conn.gen)
                {
                    untrack_local(sh, conn.slot, &peer, &call_id);
                }
            } else if conn.node != sh.node.id {
                // A party on another node: through the bridge to its node.
                let body = encode_untrack(conn, &peer, &call_id);
                to_other_nodes(sh, Some(conn.node), body);
            } else {
                let msg = crate::shard::ShardMsg::service(super::ServiceMsg::Calls(Box::new(
                    Msg::Untrack {
                        conn,
                        peer,
                        call_id,
                    },
                )));
                // Lost (a full inbox): the stale entry only costs a `Gone` the owner ignores.
                if sh.node.inboxes.send(conn.shard as usize, msg).is_ok() {
                    sh.out.stats.cross_shard_sent += 1;
                } else {
                    sh.out.stats.cross_shard_dropped += 1;
                }
            }
        }
    }
}

/// Remember that `slot` is a party to `(peer, call_id)`: one more use of its entry (every
/// offer or answer adds one, every `Untrack` takes one back, so an untrack of an earlier call
/// with the same id that arrives late leaves the new call's use in place). False: the
/// connection already has `max_calls_per_user` entries.
fn track(sh: &mut Shard, slot: u32, peer: &Arc<str>, call_id: &str) -> bool {
    let gen = sh.clients[slot as usize].gen;
    let max = sh.node.cfg.max_calls_per_user;
    let e = sh.svc.calls.conns.entry(slot).or_insert_with(|| ConnCalls {
        gen,
        calls: Vec::new(),
    });
    if e.gen != gen {
        // Left by an earlier connection in this slot (on_detach clears it; defensive).
        e.gen = gen;
        e.calls.clear();
    }
    if let Some(t) = e
        .calls
        .iter_mut()
        .find(|t| &t.peer == peer && &*t.call_id == call_id)
    {
        t.uses = t.uses.saturating_add(1);
        return true;
    }
    if e.calls.len() >= max {
        if e.calls.is_empty() {
            sh.svc.calls.conns.remove(&slot);
        }
        return false;
    }
    e.calls.push(Tracked {
        peer: peer.clone(),
        call_id: call_id.into(),
        uses: 1,
    });
    true
}

/// One use of `slot`'s entry for `(peer, call_id)` is over.
fn untrack_local(sh: &mut Shard, slot: u32, peer: &str, call_id: &str) {
    let gen = sh.clients.get(slot as usize).map(|c| c.gen);
    let Some(e) = sh.svc.calls.conns.get_mut(&slot) else {
        return;
    };
    if Some(e.gen) != gen {
        return;
    }
    if let Some(i) = e
        .calls
        .iter()
        .position(|t| &*t.peer == peer && &*t.call_id == call_id)
    {
        e.calls[i].uses -= 1;
        if e.calls[i].uses == 0 {
            e.calls.swap_remove(i);
        }
    }
    if e.calls.is_empty() {
        sh.svc.calls.conns.remove(&slot);
    }
}

pub fn on_msg(sh: &mut Shard, m: Msg) {
    match m {
        Msg::Owner(input) => run(sh, input),
        Msg::Remote { input, ask } => run_from(sh, input, true, ask),
        Msg::Untrack {
            conn,
            peer,
            call_id,
        } => {
            if sh
                .clients
                .get(conn.slot as usize)
                .is_some_and(|c| c.gen == conn.gen)
            {
                untrack_local(sh, conn.slot, &peer, &call_id);
            }
        }
    }
}

pub fn on_timer(sh: &mut Shard, key: u64) {
    run(sh, Input::Timer { key });
}

/// The connection is going away: every call it is a party to ends (`disconnected` for the
/// other side), on each call's owner.
pub fn on_detach(sh: &mut Shard, slot: u32) {
    let Some(e) = sh.svc.calls.conns.remove(&slot) else {
        return;
    };
    let c = &sh.clients[slot as usize];
    let Some(user) = c.user.clone().filter(|_| c.gen == e.gen) else {
        return;
    };
    let conn = sh.conn_ref(slot);
    for Tracked { peer, call_id, .. } in e.calls {
        // Lost (a full inbox): the call lingers until the other side hangs up or, while
        // ringing, the ring timeout (counted in cross_shard_dropped).
        forward(
            sh,
            Input::Gone {
                conn,
                user: user.clone(),
                peer,
                call_id,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u32 = 450;
    const WAIT: u32 = 21;

    fn conn(shard: u16, slot: u32) -> ConnRef {
        ConnRef {
            node: 1,
            shard,
            slot,
            gen: 1,
        }
    }

    fn u(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// Per-user counts in a map, at `max`.
    struct MapCounts {
        max: u32,
        n: HashMap<Arc<str>, u32>,
    }

    impl Counts for MapCounts {
        fn up(&mut self, user: &Arc<str>) -> bool {
            let n = self.n.entry(user.clone()).or_default();
            if *n >= self.max {
                return false;
            }
            *n += 1;
            true
        }
        fn down(&mut self, user: &Arc<str>) {
            let n = self.n.get_mut(user).expect("down without up");
            *n -= 1;
            if *n == 0 {
                self.n.remove(user);
            }
        }
    }

    struct T {
        m: Calls,
        counts: MapCounts,
        now: u32,
        clustered: bool,
        remote: bool,
        ask: Option<u64>,
    }

    impl T {
        fn new(max: u32) -> T {
            T {
                m: Calls::default(),
                counts: MapCounts {
                    max,
                    n: HashMap::new(),
                },
                now: 1000,
                clustered: false,
                remote: false,
                ask: None,
            }
        }

        fn run(&mut self, input: Input) -> Vec<Action> {
            let mut out = Vec::new();
            let cx = Ctx {
                now: self.now,
                ring_ticks: RING,
                clustered: self.clustered,
                remote: self.remote,
                ask: self.ask,
                wait_ticks: WAIT,
            };
            self.m.handle(input, cx, &mut self.counts, &mut out);
            out
        }

        fn offer(&mut self, from: &str, c: ConnRef, to: &str, id: &str) -> Vec<Action> {
            self.run(Input::Offer {
                req: req(from, c),
                to: u(to),
                call_id: id.into(),
                sdp: "\"o\"".into(),
            })
        }

        fn answer(&mut self, from: &str, c: ConnRef, to: &str, id: &str) -> Vec<Action> {
            self.run(Input::Answer {
                req: req(from, c),
                to: u(to),
                call_id: id.into(),
                sdp: "\"a\"".into(),
            })
        }

        fn ice(&mut self, from: &str, c: ConnRef, to: &str, id: &str) -> Vec<Action> {
            self.run(Input::Ice {
                req: req(from, c),
                to: u(to),
                call_id: id.into(),
                candidate: "{}".into(),
            })
        }

        fn hangup(
            &mut self,
            from: &str,
            c: ConnRef,
            to: &str,
            id: &str,
            reason: Option<&str>,
        ) -> Vec<Action> {
            self.run(Input::Hangup {
                req: req(from, c),
                to: u(to),
                call_id: id.into(),
                reason: reason.map(Box::from),
            })
        }

        fn gone(&mut self, user: &str, c: ConnRef, peer: &str, id: &str) -> Vec<Action> {
            self.run(Input::Gone {
                conn: c,
                user: u(user),
                peer: u(peer),
                call_id: id.into(),
            })
        }

        fn count(&self, user: &str) -> u32 {
            self.counts.n.get(user).copied().unwrap_or(0)
        }
    }

    fn req(user: &str, c: ConnRef) -> Req {
        Req {
            conn: c,
            user: u(user),
            id: Some("7".into()),
        }
    }

    fn user(name: &str, except: Option<ConnRef>) -> Dest {
        Dest::User {
            user: u(name),
            except,
        }
    }

    fn ev(dest: Dest, id: &str, event: Event) -> Action {
        Action::Event {
            dest,
            call_id: id.into(),
            event,
        }
    }

    fn end(dest: Dest, id: &str, reason: &'static str) -> Action {
        ended(dest, id, reason)
    }

    fn err(c: ConnRef, e: CallError, id: &str) -> Action {
        Action::Error {
            conn: c,
            id: Some("7".into()),
            err: e,
            call_id: id.into(),
        }
    }

    fn untrack(c: ConnRef, peer: &str, id: &str) -> Action {
        Action::Untrack {
            conn: c,
            peer: u(peer),
            call_id: id.into(),
        }
    }

    fn schedule_key(out: &[Action]) -> u64 {
        out.iter()
            .find_map(|a| match a {
                Action::Schedule { key, .. } => Some(*key),
                _ => None,
            })
            .expect("a schedule action")
    }

    // alice's device A on shard 0, bob's devices B1 (shard 1) and B2 (shard 0).
    const A: ConnRef = ConnRef {
        node: 1,
        shard: 0,
        slot: 10,
        gen: 1,
    };
    const B1: ConnRef = ConnRef {
        node: 1,
        shard: 1,
        slot: 20,
        gen: 1,
    };
    const B2: ConnRef = ConnRef {
        node: 1,
        shard: 0,
        slot: 21,
        gen: 1,
    };

    #[test]
    fn offer_answer_ice_hangup() {
        let mut t = T::new(4);
        let out = t.offer("alice", A, "bob", "c1");
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            Action::Schedule {
                tick: 1000 + RING,
                key: schedule_key(&out)
            }
        );
        assert_eq!(
            out[1],
            ev(
                user("bob", None),
                "c1",
                Event::Incoming {
                    from: u("alice"),
                    sdp: "\"o\"".into()
                }
            )
        );
        assert_eq!((t.count("alice"), t.count("bob")), (1, 1));
        // Before the answer the caller's candidates reach every ringing device; a ringing
        // device's own candidates are refused.
        assert_eq!(
            t.ice("alice", A, "bob", "c1"),
            vec![ev(
                user("bob", None),
                "c1",
                Event::Ice {
                    from: u("alice"),
                    candidate: "{}".into()
                }
            )]
        );
        assert_eq!(
            t.ice("bob", B1, "alice", "c1"),
            vec![err(B1, CallError::NotAnswered, "c1")]
        );
        let out = t.answer("bob", B1, "alice", "c1");
        assert_eq!(
            out,
            vec![
                ev(
                    Dest::Conn(A),
                    "c1",
                    Event::Answer {
                        from: u("bob"),
                        sdp: "\"a\"".into()
                    }
                ),
                end(user("bob", Some(B1)), "c1", "answered_elsewhere"),
            ]
        );
        // After: only between A and B1.
        assert_eq!(
            t.ice("alice", A, "bob", "c1"),
            vec![ev(
                Dest::Conn(B1),
                "c1",
                Event::Ice {
                    from: u("alice"),
                    candidate: "{}".into()
                }
            )]
        );
        assert_eq!(
            t.ice("bob", B1, "alice", "c1"),
            vec![ev(
                Dest::Conn(A),
                "c1",
                Event::Ice {
                    from: u("bob"),
                    candidate: "{}".into()
                }
            )]
        );
        assert_eq!(
            t.ice("bob", B2, "alice", "c1"),
            vec![err(B2, CallError::UnknownCall, "c1")]
        );
        assert_eq!(
            t.answer("bob", B2, "alice", "c1"),
            vec![
                untrack(B2, "alice", "c1"),
                err(B2, CallError::AlreadyAnswered, "c1")
            ]
        );
        // A repeated answer from the answering device gives back the use it added.
        assert_eq!(
            t.answer("bob", B1, "alice", "c1"),
            vec![
                untrack(B1, "alice", "c1"),
                err(B1, CallError::AlreadyAnswered, "c1")
            ]
        );
        assert_eq!(
            t.hangup("bob", B1, "alice", "c1", None),
            vec![
                end(Dest::Conn(A), "c1", "hangup"),
                untrack(A, "bob", "c1"),
                untrack(B1, "alice", "c1"),
            ]
        );
        assert!(t.m.is_empty());
        assert!(t.counts.n.is_empty());
        let s = t.m.stats;
        assert_eq!((s.offered, s.answered, s.ended_hangup), (1, 1, 1));
        // Ended: every command about it is an unknown call.
        assert_eq!(
            t.hangup("alice", A, "bob", "c1", None),
            vec![err(A, CallError::UnknownCall, "c1")]
        );
        assert_eq!(
            t.ice("alice", A, "bob", "c1"),
            vec![err(A, CallError::UnknownCall, "c1")]
        );
    }

    #[test]
    fn caller_cancel_and_callee_reject() {
        let mut t = T::new(4);
        t.offer("alice", A, "bob", "c1");
        assert_eq!(
            t.hangup("alice", A, "bob", "c1", Some("cancel")),
            vec![
                end_owned(user("bob", None), "c1", "cancel"),
                untrack(A, "bob", "c1")
            ]
        );
        t.offer("alice", A, "bob", "c2");
        assert_eq!(
            t.hangup("bob", B2, "alice", "c2", None),
            vec![
                end(Dest::Conn(A), "c2", "rejected"),
                end(user("bob", Some(B2)), "c2", "rejected_elsewhere"),
                untrack(A, "bob", "c2"),
            ]
        );
        // Only the offering connection speaks for the caller.
        t.offer("alice", A, "bob", "c3");
        let a2 = conn(1, 11);
        assert_eq!(
            t.hangup("alice", a2, "bob", "c3", None),
            vec![err(a2, CallError::UnknownCall, "c3")]
        );
        // The caller cannot answer its own call; a stranger does not find it.
        assert_eq!(
            t.answer("alice", A, "bob", "c3"),
            vec![
                untrack(A, "bob", "c3"),
                err(A, CallError::UnknownCall, "c3")
            ]
        );
        let carol = conn(1, 30);
        assert_eq!(
            t.answer("carol", carol, "alice", "c3"),
            vec![
                untrack(carol, "alice", "c3"),
                err(carol, CallError::UnknownCall, "c3")
            ]
        );
        assert_eq!(t.m.len(), 1);
    }

    fn end_owned(dest: Dest, id: &str, reason: &str) -> Action {
        Action::Event {
            dest,
            call_id: id.into(),
            event: Event::Ended {
                reason: Cow::Owned(reason.to_string()),
            },
        }
    }

    #[test]
    fn ring_timeout() {
        let mut t = T::new(4);
        let key = schedule_key(&t.offer("alice", A, "bob", "c1"));
        // Fired early (a wheel lap): scheduled again, nothing else.
        t.now += RING - 1;
        assert_eq!(
            t.run(Input::Timer { key }),
            vec![Action::Schedule {
                tick: 1000 + RING,
                key
            }]
        );
        t.now += 1;
        assert_eq!(
            t.run(Input::Timer { key }),
            vec![
                end(Dest::Conn(A), "c1", "timeout"),
                end(user("bob", None), "c1", "timeout"),
                untrack(A, "bob", "c1"),
            ]
        );
        assert_eq!(t.m.stats.ended_timeout, 1);
        assert!(t.counts.n.is_empty());
        // Stale: nothing.
        assert!(t.run(Input::Timer { key }).is_empty());
        // An answered call does not time out; a reused slab index does not take an old key.
        let key2 = schedule_key(&t.offer("alice", A, "bob", "c2"));
        assert_ne!(key, key2);
        t.answer("bob", B1, "alice", "c2");
        t.now += RING;
        assert!(t.run(Input::Timer { key: key2 }).is_empty());
        assert!(t.run(Input::Timer { key }).is_empty());
        assert_eq!(t.m.len(), 1);
    }

    #[test]
    fn glare_keeps_the_offer_of_the_first_id() {
        // bob rings alice; then alice offers to bob: alice < bob, so bob's call ends.
        let mut t = T::new(4);
        t.offer("bob", B1, "alice", "b-call");
        let out = t.offer("alice", A, "bob", "a-call");
        assert_eq!(out[0], end(Dest::Conn(B1), "b-call", "glare"));
        assert_eq!(out[1], end(user("alice", None), "b-call", "glare"));
        assert_eq!(out[2], untrack(B1, "alice", "b-call"));
        assert!(matches!(out[3], Action::Schedule { .. }));
        assert!(matches!(
            &out[4],
            Action::Event {
                event: Event::Incoming { .. },
                ..
            }
        ));
        assert_eq!(t.m.len(), 1);
        assert_eq!((t.count("alice"), t.count("bob")), (1, 1));

        // The other order: alice rings bob, then bob offers: bob's offer loses, only bob hears.
        let mut t = T::new(4);
        t.offer("alice", A, "bob", "a-call");
        assert_eq!(
            t.offer("bob", B1, "alice", "b-call"),
            vec![
                end(Dest::Conn(B1), "b-call", "glare"),
                untrack(B1, "alice", "b-call")
            ]
        );
        assert_eq!(t.m.len(), 1);
        assert_eq!(t.m.stats.ended_glare, 1);
        // Once answered, a new offer the other way is a second call, not glare.
        t.answer("bob", B2, "alice", "a-call");
        let out = t.offer("bob", B1, "alice", "b-call");
        assert!(matches!(out[1], Action::Event { .. }), "{out:?}");
        assert_eq!(t.m.len(), 2);
    }

    #[test]
    fn disconnects_end_calls() {
        let mut t = T::new(4);
        t.offer("alice", A, "bob", "c1");
        // A ringing device that goes away is not a party.
        assert!(t.gone("bob", B2, "alice", "c1").is_empty());
        // The caller goes while ringing: every device that rang hears.
        assert_eq!(
            t.gone("alice", A, "bob", "c1"),
            vec![
                end(user("bob", None), "c1", "disconnected"),
                untrack(A, "bob", "c1")
            ]
        );
        t.offer("alice", A, "bob", "c2");
        t.answer("bob", B1, "alice", "c2");
        assert_eq!(
            t.gone("bob", B1, "alice", "c2"),
            vec![
                end(Dest::Conn(A), "c2", "disconnected"),
                untrack(A, "bob", "c2"),
                untrack(B1, "alice", "c2"),
            ]
        );
        assert!(t.gone("bob", B1, "alice", "c2").is_empty());
        assert_eq!(t.m.stats.ended_disconnected, 2);
        assert!(t.m.is_empty() && t.counts.n.is_empty());
    }

    #[test]
    fn limits_and_ids() {
        let mut t = T::new(2);
        t.offer("alice", A, "bob", "c1");
        // A taken id between the same users; the same id between other users is fine.
        assert_eq!(
            t.offer("alice", A, "bob", "c1"),
            vec![untrack(A, "bob", "c1"), err(A, CallError::InUse, "c1")]
        );
        let a2 = conn(1, 12);
        assert_eq!(
            t.offer("alice", a2, "bob", "c1"),
            vec![untrack(a2, "bob", "c1"), err(a2, CallError::InUse, "c1")]
        );
        t.offer("carol", conn(1, 30), "dave", "c1");
        t.offer("alice", A, "erin", "c2");
        assert_eq!(t.count("alice"), 2);
        assert_eq!(
            t.offer("alice", A, "frank", "c3"),
            vec![
                untrack(A, "frank", "c3"),
                err(A, CallError::TooManyCalls, "c3")
            ]
        );
        // The callee at its limit: the caller hears busy, nothing rings.
        let g = conn(1, 40);
        t.offer("gina", g, "bob", "g1");
        assert_eq!(t.count("bob"), 2);
        let h = conn(1, 41);
        assert_eq!(
            t.offer("hank", h, "bob", "h1"),
            vec![end(Dest::Conn(h), "h1", "busy"), untrack(h, "bob", "h1")]
        );
        assert_eq!(t.count("hank"), 0);
        assert_eq!(t.m.stats.busy, 1);
    }

    #[test]
    fn calls_per_shard_are_bounded() {
        let mut t = T::new(u32::MAX);
        for i in 0..CALLS_PER_SHARD_MAX {
            t.offer(&format!("u{i}"), conn(0, i as u32), "hub", "c");
        }
        let x = conn(0, 1 << 30);
        assert_eq!(
            t.offer("late", x, "hub", "c"),
            vec![untrack(x, "hub", "c"), err(x, CallError::ServerBusy, "c")]
        );
    }

    #[test]
    fn owners_are_symmetric_and_spread() {
        assert_eq!(owner("alice", "bob", 2), owner("bob", "alice", 2));
        assert_eq!(owner("alice", "bob", 1), 0);
        let on_zero = (0..1000)
            .filter(|i| owner("alice", &format!("user-{i}"), 2) == 0)
            .count();
        assert!((400..600).contains(&on_zero), "{on_zero}");
    }

    #[test]
    fn config_bounds() {
        use crate::config::Config;
        use std::time::Duration;
        let check = |f: &dyn Fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().map_err(|e| e.key)
        };
        assert_eq!(check(&|_| {}), Ok(()));
        assert_eq!(check(&|c| c.ring_timeout = Duration::from_secs(1)), Ok(()));
        assert_eq!(
            check(&|c| c.ring_timeout = Duration::from_secs(3600)),
            Ok(())
        );
        assert_eq!(check(&|c| c.max_calls_per_user = 1), Ok(()));
        assert_eq!(
            check(&|c| c.max_calls_per_user = CALLS_PER_USER_LIMIT),
            Ok(())
        );
        for bad in [Duration::from_millis(999), Duration::from_secs(3601)] {
            assert_eq!(
                check(&|c| c.ring_timeout = bad),
                Err("ring_timeout".to_string())
            );
        }
        for bad in [0, CALLS_PER_USER_LIMIT + 1] {
            assert_eq!(
                check(&|c| c.max_calls_per_user = bad),
                Err("max_calls_per_user".to_string())
            );
        }
    }

    #[test]
    fn error_texts() {
        for (e, text) in [
            (CallError::UnknownCall, "unknown call"),
            (CallError::InUse, "call_id already in use"),
            (CallError::AlreadyAnswered, "call already answered"),
            (CallError::NotAnswered, "call not answered"),
            (CallError::TooManyCalls, "too many calls"),
            (CallError::ServerBusy, "server busy, retry later"),
        ] {
            assert_eq!(e.text(), text);
        }
        assert_eq!(CallError::ServerBusy.reason(), ErrorReason::Busy);
    }

    #[test]
    fn clustered_commands_for_calls_not_held_here_go_to_the_other_nodes() {
        let a = conn(0, 1);
        let b = conn(1, 2);
        let mut t = T::new(4);
        t.clustered = true;
        // No call here: the answer, ICE and hangup go elsewhere and wait for a confirmation
        // (nothing is refused now: the node holding the call answers); a party's departure
        // goes elsewhere and waits for nothing.
        for out in [
            t.answer("bob", b, "alice", "c1"),
            t.ice("bob", b, "alice", "c1"),
            t.hangup("bob", b, "alice", "c1", None),
        ] {
            assert_eq!(out.len(), 2, "{out:?}");
            let key = schedule_key(&out);
            assert_eq!(
                out[0],
                Action::Schedule {
                    tick: 1000 + WAIT,
                    key
                }
            );
            assert!(
                matches!(&out[1], Action::Elsewhere { ask: Some(k), node: None, .. } if *k == key),
                "{out:?}"
            );
        }
        assert_eq!(t.m.pending_len(), 3);
        let out = t.gone("bob", b, "alice", "c1");
        assert!(
            matches!(
                &out[..],
                [Action::Elsewhere {
                    input: Input::Gone { .. },
                    ask: None,
                    node: None
                }]
            ),
            "{out:?}"
        );
        // From another node and not held here either: dropped silently.
        t.remote = true;
        assert!(t.answer("bob", b, "alice", "c1").is_empty());
        assert!(t.gone("bob", b, "alice", "c1").is_empty());
        // Held here: a remote answer runs as a local one would.
        t.remote = false;
        t.offer("alice", a, "bob", "c2");
        t.remote = true;
        let out = t.answer("bob", b, "alice", "c2");
        assert!(
            out.iter().any(|x| matches!(x, Action::Event { dest: Dest::Conn(c), event: Event::Answer { .. }, .. } if *c == a)),
            "{out:?}"
        );
        // Not clustered: unknown call, as ever.
        let mut one = T::new(4);
        let out = one.ice("bob", b, "alice", "c1");
        assert!(
            matches!(
                out[0],
                Action::Error {
                    err: CallError::UnknownCall,
                    ..
                }
            ),
            "{out:?}"
        );
    }

    fn elsewhere_key(out: &[Action]) -> u64 {
        out.iter()
            .find_map(|a| match a {
                Action::Elsewhere { ask: Some(k), .. } => Some(*k),
                _ => None,
            })
            .expect("an elsewhere action with an ask")
    }

    fn held(key: u64, party: bool, c: ConnRef, user: &str, peer: &str, id: &str) -> Input {
        Input::Held {
            key,
            party,
            node: 5,
            conn: c,
            user: u(user),
            peer: u(peer),
            call_id: id.into(),
        }
    }

    #[test]
    fn clustered_commands_no_node_holds_time_out_as_unknown_calls() {
        let b = conn(1, 2);
        let mut t = T::new(4);
        t.clustered = true;
        let out = t.answer("bob", b, "alice", "late");
        let key = schedule_key(&out);
        assert_eq!(key, elsewhere_key(&out));
        let ice_key = schedule_key(&t.ice("bob", b, "alice", "late"));
        let hangup_key = schedule_key(&t.hangup("bob", b, "alice", "made-up", None));
        assert_eq!(t.m.pending_len(), 3);
        // Fired early (a wheel lap): scheduled again.
        t.now += WAIT - 1;
        assert_eq!(
            t.run(Input::Timer { key }),
            vec![Action::Schedule {
                tick: 1000 + WAIT,
                key
            }]
        );
        // Unconfirmed at the deadline: the answer's entry is released, every command gets
        // the single-node `unknown call`, and the other nodes hear the answer's connection
        // left the call (in case one did make it a party).
        t.now += 1;
        assert_eq!(
            t.run(Input::Timer { key }),
            vec![
                untrack(b, "alice", "late"),
                err(b, CallError::UnknownCall, "late"),
                Action::Elsewhere {
                    input: Input::Gone {
                        conn: b,
                        user: u("bob"),
                        peer: u("alice"),
                        call_id: "late".into(),
                    },
                    ask: None,
                    node: None,
                }
            ]
        );
        assert_eq!(
            t.run(Input::Timer { key: ice_key }),
            vec![err(b, CallError::UnknownCall, "late")]
        );
        assert_eq!(
            t.run(Input::Timer { key: hangup_key }),
            vec![err(b, CallError::UnknownCall, "made-up")]
        );
        assert_eq!(t.m.pending_len(), 0);
        assert_eq!(t.m.stats.remote_unanswered, 3);
        // Stale: nothing; nor does a pending key touch a call in the slot of the same index.
        assert!(t.run(Input::Timer { key }).is_empty());
        t.offer("alice", conn(0, 1), "bob", "c9");
        assert!(t.run(Input::Timer { key }).is_empty());
        assert_eq!(t.m.len(), 1);
        // A confirmation that comes after the wait, for a command that made no party:
        // nothing to do.
        assert!(t
            .run(held(ice_key, false, b, "bob", "alice", "late"))
            .is_empty());
    }

    #[test]
    fn a_confirmation_ends_the_wait() {
        let b = conn(1, 2);
        let mut t = T::new(4);
        t.clustered = true;
        let key = schedule_key(&t.answer("bob", b, "alice", "c1"));
        // Someone else's confirmation (another connection, call or a made-up key) does not.
        for other in [
            held(key, false, conn(1, 3), "bob", "alice", "c1"),
            held(key, false, b, "bob", "alice", "c2"),
            held(key ^ (1 << 32), false, b, "bob", "alice", "c1"),
            held(key & !PENDING_BIT, false, b, "bob", "alice", "c1"),
        ] {
            assert!(t.run(other).is_empty());
            assert_eq!(t.m.pending_len(), 1);
        }
        assert!(t.run(held(key, true, b, "bob", "alice", "c1")).is_empty());
        assert_eq!(t.m.pending_len(), 0);
        // Its timer finds nothing: no error, no untrack (the holder answered).
        t.now += WAIT;
        assert!(t.run(Input::Timer { key }).is_empty());
        // A second confirmation that made the connection a party (a call with the same id on
        // a second node): that call ends there, as if the connection had left.
        assert_eq!(
            t.run(held(key, true, b, "bob", "alice", "c1")),
            vec![Action::Elsewhere {
                input: Input::Gone {
                    conn: b,
                    user: u("bob"),
                    peer: u("alice"),
                    call_id: "c1".into(),
                },
                ask: None,
                node: Some(5),
            }]
        );
        assert_eq!(t.m.stats.remote_late, 1);
        assert_eq!(t.m.stats.remote_unanswered, 0);
    }

    #[test]
    fn an_accepted_answer_whose_confirmation_is_lost_ends_the_call_on_both_nodes() {
        // alice on node 1 (`holder`) calls bob; bob answers on node 2 (`asker`), whose owner
        // does not hold the call and forwards the answer.
        let a = conn(0, 1);
        let b = ConnRef {
            node: 2,
            shard: 0,
            slot: 9,
            gen: 1,
        };
        let mut holder = T::new(4);
        holder.clustered = true;
        holder.offer("alice", a, "bob", "c1");
        let mut asker = T::new(4);
        asker.clustered = true;
        let out = asker.answer("bob", b, "alice", "c1");
        let key = elsewhere_key(&out);
        let Some(Action::Elsewhere { input, .. }) = out.into_iter().last() else {
            panic!("the answer goes to the other nodes");
        };
        // The holder accepts it (alice gets the answer) and confirms; the confirmation is
        // lost on the way.
        holder.remote = true;
        holder.ask = Some(key);
        let out = holder.run(input);
        assert_eq!(
            out.first(),
            Some(&ev(
                Dest::Conn(a),
                "c1",
                Event::Answer {
                    from: u("bob"),
                    sdp: "\"a\"".into()
                }
            ))
        );
        assert!(
            matches!(out.last(), Some(Action::Held { party: true, .. })),
            "{out:?}"
        );
        assert_eq!(holder.count("alice"), 1);
        // The asker's wait runs out: bob is told `unknown call` and untracked, and the other
        // nodes hear bob's connection left the call.
        asker.now += WAIT;
        let out = asker.run(Input::Timer { key });
        assert_eq!(
            out[..2],
            [
                untrack(b, "alice", "c1"),
                err(b, CallError::UnknownCall, "c1")
            ]
        );
        let Some(Action::Elsewhere {
            input: gone @ Input::Gone { .. },
            ask: None,
            node: None,
        }) = out.get(2).cloned()
        else {
            panic!("{out:?}");
        };
        // The holder ends the call as if bob had left: alice hears it, the call is gone (the
        // parties' entries released; bob's is already, so his untrack finds nothing).
        holder.ask = None;
        assert_eq!(
            holder.run(gone.clone()),
            vec![
                end(Dest::Conn(a), "c1", "disconnected"),
                untrack(a, "bob", "c1"),
                untrack(b, "alice", "c1")
            ]
        );
        assert!(holder.m.is_empty());
        assert_eq!(holder.count("alice"), 0);
        // Told twice (a late confirmation also sends it): nothing more.
        assert!(holder.run(gone).is_empty());
    }

    #[test]
    fn the_node_holding_the_call_confirms_what_it_ran() {
        let a = conn(0, 1);
        let b = ConnRef {
            node: 2,
            shard: 0,
            slot: 9,
            gen: 1,
        };
        let mut t = T::new(4);
        t.clustered = true;
        t.offer("alice", a, "bob", "c1");
        t.remote = true;
        t.ask = Some(77);
        let confirm = |party: bool| Action::Held {
            key: 77,
            party,
            conn: b,
            user: u("bob"),
            peer: u("alice"),
            call_id: "c1".into(),
        };
        // ICE before the answer: refused here, and confirmed (the error comes from here).
        let out = t.ice("bob", b, "alice", "c1");
        assert_eq!(
            out,
            vec![err(b, CallError::NotAnswered, "c1"), confirm(false)]
        );
        // The answer: accepted, the connection is a party.
        let out = t.answer("bob", b, "alice", "c1");
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[2], confirm(true));
        // Again: refused with its untrack, not a party by this command.
        let out = t.answer("bob", b, "alice", "c1");
        assert_eq!(
            out,
            vec![
                untrack(b, "alice", "c1"),
                err(b, CallError::AlreadyAnswered, "c1"),
                confirm(false)
            ]
        );
        let out = t.hangup("bob", b, "alice", "c1", None);
        assert_eq!(out.last(), Some(&confirm(false)), "{out:?}");
        // Not held here: nothing at all (the node holding it, if any, confirms).
        assert!(t.answer("bob", b, "alice", "c1").is_empty());
        assert!(t.ice("bob", b, "alice", "c1").is_empty());
        // Without an ask (an older sender): no confirmation.
        t.remote = false;
        t.ask = None;
        t.offer("alice", a, "bob", "c2");
        t.remote = true;
        let out = t.answer("bob", b, "alice", "c2");
        assert!(
            !out.iter().any(|x| matches!(x, Action::Held { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn commands_waiting_on_other_nodes_are_bounded() {
        let b = conn(1, 2);
        let mut t = T::new(4);
        t.clustered = true;
        for i in 0..CALLS_PENDING_PER_SHARD_MAX {
            t.ice("bob", b, "alice", &format!("c{i}"));
        }
        assert_eq!(t.m.pending_len(), CALLS_PENDING_PER_SHARD_MAX);
        assert_eq!(
            t.answer("bob", b, "alice", "x"),
            vec![untrack(b, "alice", "x"), err(b, CallError::ServerBusy, "x")]
        );
        assert_eq!(
            t.ice("bob", b, "alice", "x"),
            vec![err(b, CallError::ServerBusy, "x")]
        );
    }

    #[test]
    fn remote_inputs_round_trip_and_garbage_is_refused() {
        let c = ConnRef {
            node: 7,
            shard: 1,
            slot: 42,
            gen: 3,
        };
        let r = |id: Option<&str>| Req {
            conn: c,
            user: u("bob"),
            id: id.map(Box::from),
        };
        let inputs = [
            Input::Answer {
                req: r(Some("9")),
                to: u("alice"),
                call_id: "c".into(),
                sdp: "{\"type\":\"answer\"}".into(),
            },
            Input::Ice {
                req: r(None),
                to: u("alice"),
                call_id: "c".into(),
                candidate: "{}".into(),
            },
            Input::Hangup {
                req: r(None),
                to: u("alice"),
                call_id: "c".into(),
                reason: Some("busy".into()),
            },
            Input::Hangup {
                req: r(Some("x")),
                to: u("alice"),
                call_id: "c".into(),
                reason: None,
            },
            Input::Gone {
                conn: c,
                user: u("bob"),
                peer: u("alice"),
                call_id: "c".into(),
            },
        ];
        for (n, i) in inputs.iter().enumerate() {
            let gone = matches!(i, Input::Gone { .. });
            let ask = match n % 3 {
                _ if gone => None,
                0 => Some(u64::MAX - 1),
                1 => Some(0),
                _ => None,
            };
            let (service, body) = encode_remote(i, ask).expect("crosses nodes");
            assert_eq!(service, crate::cluster::service::CALL_INPUT);
            assert_eq!(decode_remote(&body), Some((i.clone(), ask)));
            for n in 0..body.len() {
                assert!(decode_remote(&body[..n]).is_none(), "truncated at {n}");
            }
            let mut longer = body.clone();
            longer.push(0);
            assert!(decode_remote(&longer).is_none());
            // An unknown tag is refused, with or without the ask bit.
            for tag in [0, 9, REMOTE_ASK, REMOTE_ASK | REMOTE_GONE, REMOTE_ASK | 9] {
                let mut bad = body.clone();
                bad[0] = tag;
                assert!(decode_remote(&bad).is_none(), "tag {tag}");
            }
        }
        // A departure waits for nothing; offers, timers and confirmations stay on their node.
        assert!(encode_remote(&inputs[4], Some(1)).is_none());
        assert!(encode_remote(&Input::Timer { key: 1 }, None).is_none());
        let held = Input::Held {
            key: 5,
            party: true,
            node: 9,
            conn: c,
            user: u("bob"),
            peer: u("alice"),
            call_id: "c".into(),
        };
        assert!(encode_remote(&held, None).is_none());
        assert!(decode_remote(&[]).is_none());
        assert!(decode_remote(&[REMOTE_ANSWER | REMOTE_ASK, 1, 0, 0]).is_none());
        // A command from a node of the earlier version (no ask) still decodes.
        let (_, old) = encode_remote(&inputs[0], None).expect("crosses nodes");
        assert_eq!(old[0], REMOTE_ANSWER);
        assert_eq!(decode_remote(&old), Some((inputs[0].clone(), None)));
        let (_, body) = encode_untrack(c, "alice", "c");
        assert!(matches!(
            decode_untrack(&body),
            Some(Msg::Untrack { conn, .. }) if conn == c
        ));
        assert!(decode_untrack(&body[1..]).is_none());

        // Confirmations: round trip (the holder's node from the envelope), and garbage.
        for party in [true, false] {
            let (service, body) = encode_held(5, party, c, "bob", "alice", "c");
            assert_eq!(service, crate::cluster::service::CALL_HELD);
            let want = Input::Held {
                key: 5,
                party,
                node: 9,
                conn: c,
                user: u("bob"),
                peer: u("alice"),
                call_id: "c".into(),
            };
            assert_eq!(decode_held(9, &body), Some(want));
            for n in 0..body.len() {
                assert!(decode_held(9, &body[..n]).is_none(), "truncated at {n}");
            }
            let mut longer = body.clone();
            longer.push(0);
            assert!(decode_held(9, &longer).is_none());
            let mut bad = body.clone();
            bad[8] = 2; // party is 0 or 1
            assert!(decode_held(9, &bad).is_none());
            // The user: key, party, connection, then its length and bytes.
            let user_at = 8 + 1 + 14;
            let mut bad = body.clone();
            bad[user_at + 4] = 0xff; // not UTF-8
            assert!(decode_held(9, &bad).is_none());
            let mut bad = body.clone();
            bad[user_at..user_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(decode_held(9, &bad).is_none());
        }
        assert!(decode_held(9, &[]).is_none());
        assert!(decode_held(9, &[0xff; 64]).is_none());
    }

    #[test]
    fn a_dead_node_ends_the_calls_with_a_party_there() {
        let a = conn(0, 1);
        let remote = ConnRef {
            node: 99,
            shard: 0,
            slot: 5,
            gen: 1,
        };
        let mut t = T::new(4);
        t.offer("alice", a, "bob", "c1");
        t.answer("bob", remote, "alice", "c1");
        t.offer("alice", a, "carol", "c2");
        let out = t.run(Input::NodeGone { node: 99 });
        assert!(
            out.contains(&ended(Dest::Conn(a), "c1", "disconnected")),
            "{out:?}"
        );
        // The call ringing carol (no party on node 99) goes on.
        assert_eq!(t.m.len(), 1);
        assert_eq!(t.count("bob"), 0);
        assert!(t.run(Input::NodeGone { node: 98 }).is_empty());
    }
}
