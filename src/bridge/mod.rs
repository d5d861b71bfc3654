//! The bridge: the one thread per node that carries cross-node traffic (Redis pub/sub and
//! presence, Kafka persistence and notifications), with reconnects and capped backoff.
//!
//! Shards never block on it: they `try_send` into its bounded inbox and count what a full
//! inbox drops. It talks back through the shards' own inboxes ([`Inboxes`]), built before it:
//! what arrives from other nodes is delivered with [`deliver_inbound`], the same plan the
//! shards use, never sent back out.
//!
//! This is the single-node implementation: with neither Redis nor Kafka configured there is
//! nothing to forward, `clustered` is false so shards never send to it (the no-op costs
//! nothing on the message path), the bridge reports itself healthy, and its thread just drains
//! its inbox until shutdown. The Redis and Kafka implementations plug in here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::directory::{Directory, Transition};
use crate::limits::BRIDGE_INBOX_SINGLE_NODE_CAPACITY;
use crate::proto::Frame;
use crate::route::Target;
use crate::shard::{Inboxes, ShardMsg};

/// What shards hand to the bridge.
pub enum BridgeMsg {
    /// A delivery whose recipients may be on other nodes (room publish, broadcast, a user's
    /// devices, a connection of another node).
    Deliver { target: Target, frame: Frame },
    /// A room's first subscriber on this node arrived, or its last one left. Reports from two
    /// shards may arrive in either order: act on [`Directory::room_shards`], not on the order.
    Room { room: Arc<str>, t: Transition },
    /// A user's first device on this node arrived, or the last one left (same caveat).
    User { user: Arc<str>, t: Transition },
    /// A job for the message store (boxed: rare next to deliveries, and large).
    Store(Box<StoreJob>),
    /// Stop the bridge thread.
    Shutdown,
}

/// Work for the message store, which only the bridge thread calls.
pub enum StoreJob {
    /// A REST API request, parsed and authenticated on the shard: run it
    /// (`crate::rest::execute`) as `user` and answer the HTTP connection `origin`, which waits,
    /// with one `ShardMsg::Deliver { target: Target::Conn(origin), frame }` of the whole
    /// response (`crate::rest::http_response` with `keep` and `cors`, the origin to echo).
    Rest {
        origin: crate::route::ConnRef,
        user: Arc<str>,
        op: crate::rest::RestOp,
        keep: bool,
        cors: Option<Arc<str>>,
    },
}

/// The shards' view of the bridge.
pub struct BridgeHandle {
    pub tx: Sender<BridgeMsg>,
    /// False while a configured backend is unreachable (/ready answers 503).
    pub healthy: Arc<AtomicBool>,
    /// Whether any backend is configured (single node: false, and shards never forward).
    pub clustered: bool,
    thread: Option<JoinHandle<()>>,
}

/// What the bridge thread needs of the node.
pub struct Shards {
    pub inboxes: Arc<Inboxes>,
    pub node_id: u32,
}

impl BridgeHandle {
    /// Start the single-node bridge.
    pub fn single_node(shards: Shards) -> std::io::Result<BridgeHandle> {
        // Shards send nothing to a bridge that is not clustered: a few slots for Shutdown,
        // not BRIDGE_INBOX_CAPACITY (whose slots, all touched at creation, cost MiBs).
        let (tx, rx) = bounded(BRIDGE_INBOX_SINGLE_NODE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("switchboard-bridge".into())
            .spawn(move || run_single_node(rx, shards))?;
        Ok(BridgeHandle {
            tx,
            healthy: Arc::new(AtomicBool::new(true)),
            clustered: false,
            thread: Some(thread),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Stop the thread and wait for it.
    pub fn shutdown(&mut self) {
        let _ = self.tx.send(BridgeMsg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_single_node(rx: Receiver<BridgeMsg>, _shards: Shards) {
    while let Ok(msg) = rx.recv() {
        match msg {
            // No other node exists: nothing to forward or subscribe to.
            BridgeMsg::Deliver { .. }
            | BridgeMsg::Room { .. }
            | BridgeMsg::User { .. }
            | BridgeMsg::Store(_) => {}
            BridgeMsg::Shutdown => break,
        }
    }
}

/// Deliver a frame that arrived from another node to this node's recipients of `target`:
/// one `ShardMsg::Deliver` per shard that holds some. Returns the shards whose inbox was
/// full or dead (their recipients missed it; the caller counts them).
pub fn deliver_inbound(shards: &Shards, dir: &Directory, target: Target, frame: Frame) -> u64 {
    let p = crate::route::plan(&target, dir, shards.node_id, 0, shards.inboxes.len(), false);
    let mut bits = p.shards | u64::from(p.local);
    let mut missed = 0;
    while bits != 0 {
        let shard = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let msg = ShardMsg::Deliver {
            target: target.clone(),
            frame: frame.clone(),
        };
        if shards.inboxes.send(shard, msg).is_err() {
            missed |= 1u64 << shard;
        }
    }
    missed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Inbox;

    #[test]
    fn inbound_frames_reach_exactly_the_shards_with_recipients() {
        let mut receivers = Vec::new();
        let mut inboxes = Vec::new();
        let mut polls = Vec::new();
        for _ in 0..3 {
            let poll = mio::Poll::new().unwrap();
            let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
            let (tx, rx) = bounded(1);
            inboxes.push(Inbox {
                tx,
                waker,
                wake_pending: AtomicBool::new(false),
            });
            receivers.push(rx);
            polls.push(poll);
        }
        let shards = Shards {
            inboxes: Arc::new(Inboxes(inboxes, Default::default())),
            node_id: 9,
        };
        let dir = Directory::new();
        let room: Arc<str> = Arc::from("r");
        dir.rooms.arrive(&room, 0);
        dir.rooms.arrive(&room, 2);
        let frame = Frame::from_wire(b"x", 0);
        assert_eq!(
            deliver_inbound(&shards, &dir, Target::room(room.clone()), frame.clone()),
            0
        );
        assert!(matches!(
            receivers[0].try_recv(),
            Ok(ShardMsg::Deliver { .. })
        ));
        assert!(receivers[1].try_recv().is_err());
        assert!(matches!(
            receivers[2].try_recv(),
            Ok(ShardMsg::Deliver { .. })
        ));
        // Shard 0's inbox is full now (capacity 1): it is reported as missed.
        deliver_inbound(&shards, &dir, Target::room(room.clone()), frame.clone());
        assert_eq!(
            deliver_inbound(&shards, &dir, Target::room(room), frame),
            0b101
        );
    }
}
