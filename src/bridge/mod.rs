//! The bridge: the one thread per node that talks to everything outside the node: the message
//! store ([`store`]: in memory, or PostgreSQL), Redis ([`redis`]: the other nodes of a
//! cluster) and Kafka ([`kafka`], [`notify`]), with reconnects and capped backoff. It runs a tokio current-thread runtime; shards never run on
//! it and never block on it.
//!
//! Shards `try_send` into its bounded inbox (a tokio channel: its slots are allocated as they
//! fill, so the 65,536-slot bound costs nothing while idle) and count or refuse what a full
//! inbox drops. It talks back through the shards' own inboxes ([`Inboxes`]): frames for this
//! node's connections go to the shards [`recipient_shards`] names (the plan the shards use),
//! held back in order for a shard whose inbox is full (`store::deliver`).
//!
//! With `eureka_url` set it also runs the node's registration with Eureka ([`eureka`]), told
//! of the drain and the exit through [`BridgeHandle::draining`] and [`BridgeHandle::shutdown`].
//!
//! With `trace_exporter` set it also sends the node's finished spans to the trace collector
//! ([`trace_export`]), and what is left of them once more at exit.
//!
//! With no Redis configured, `clustered` is false: shards send it only store jobs (direct
//! messages, `sync`, receipts, the REST API), never room traffic, and nothing of [`redis`]
//! exists.

pub mod eureka;
pub mod http_client;
pub mod kafka;
pub mod notify;
pub mod proxy;
pub mod redis;
pub mod store;
pub mod trace_export;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::directory::{Directory, Transition};
use crate::limits::BRIDGE_INBOX_CAPACITY;
use crate::proto::Frame;
use crate::route::Target;
use crate::shard::{Inboxes, Node};

pub use store::StoreJob;

/// What shards hand to the bridge.
pub enum BridgeMsg {
    /// A delivery whose recipients may be on other nodes (room publish, broadcast, a user's
    /// devices, a connection of another node).
    Deliver { target: Target, frame: Frame },
    /// [`BridgeMsg::Deliver`] made inside a traced span (tracing on, the trace sampled): its
    /// `redis.publish` span is a child of that span, and the envelope carries the context to
    /// the other nodes. Boxed: rare, and the common variant stays small.
    DeliverTraced(Box<(Target, Frame, tracing::Span)>),
    /// A room's first subscriber on this node arrived, or its last one left. Reports from two
    /// shards may arrive in either order: act on [`Directory::room_shards`], not on the order.
    Room { room: Arc<str>, t: Transition },
    /// A user's first device on this node arrived, or the last one left (same caveat).
    User { user: Arc<str>, t: Transition },
    /// A topic's first member on this node arrived, or the last one left (same caveat).
    Topic { topic: Arc<str>, t: Transition },
    /// Clustered: an event of a user's presence owner on this node for the user's watchers
    /// on every node (`frame`), in order. `online` Some: it found the user online (first
    /// device here) or offline (its grace over), and the watchers hear it only if Redis says
    /// the change is the cluster's, not only this node's (`frame` None: an invisible user's,
    /// told to no one, still judged); None: a status change, told as it is, after the changes
    /// before it ([`redis::Redis::presence`]). `record`: the user as the cluster's readers
    /// see it with the change ([`crate::shard::service::presence::state::encode_remote`]),
    /// written to Redis with it.
    Presence {
        user: Arc<str>,
        online: Option<bool>,
        frame: Option<Frame>,
        record: Box<str>,
    },
    /// Clustered: `presence.query {user_ids}` or the first answer of `presence.watch` for
    /// connection `to`, some of whose users this node does not hold: the bridge reads those
    /// from Redis and hands the answer back to the connection's shard
    /// ([`redis::Redis::presence_read`]).
    PresenceRead(Box<crate::shard::service::presence::Read>),
    /// Clustered: `user`'s first device in `room` on this node joined (`join`) or its last
    /// one left; Redis judges whether it is the cluster's (the room's hash of users) and its
    /// script publishes `frame` (`presence.join` / `presence.leave`, None in a room without
    /// events) to the room's members on every node, `except` the joining connection
    /// ([`redis::Redis::room_presence`]).
    RoomPresence {
        room: Arc<str>,
        user: Arc<str>,
        join: bool,
        frame: Option<Frame>,
        except: Option<crate::route::ConnRef>,
    },
    /// Clustered: a room query; the bridge reads the room's users on every node from Redis
    /// and hands them to the room's owner shard ([`redis::Redis::room_read`]).
    RoomRead(Box<crate::shard::service::presence::RoomRead>),
    /// Clustered: a room with history: a message for Redis to sequence, or a stream read
    /// for a resume ([`redis::history`]; boxed like `Store`).
    History(Box<redis::history::HistoryJob>),
    /// Work for the message store (boxed: jobs are larger than the other variants).
    Store(Box<StoreJob>),
    /// A call to the auth service or a custom-type backend ([`proxy`]; boxed like `Store`).
    Proxy(Box<proxy::Job>),
    /// Clustered: a service's message for other nodes, as [`crate::cluster::encode_service`]
    /// carries it: calls whose state is on another node, the server API's disconnect.
    Service {
        to: ServiceTo,
        service: u8,
        body: Vec<u8>,
    },
    /// Stop the bridge thread (after the store has finished the jobs it holds).
    Shutdown,
}

/// Which nodes a [`BridgeMsg::Service`] is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceTo {
    /// One node.
    Node(u32),
    /// Every node (the calls channel).
    Calls,
    /// The nodes holding a device of this user (the user's channel).
    User(Arc<str>),
}

/// The sending side of the bridge inbox, as shards hold it.
pub type BridgeTx = mpsc::Sender<BridgeMsg>;

/// The bridge inbox: created before the node (which holds the sender), handed to
/// [`BridgeHandle::start`] once the node exists.
pub fn inbox() -> (BridgeTx, mpsc::Receiver<BridgeMsg>) {
    mpsc::channel(BRIDGE_INBOX_CAPACITY)
}

/// The node's handle on the bridge thread.
pub struct BridgeHandle {
    tx: BridgeTx,
    thread: Option<JoinHandle<()>>,
    /// Where the node is, for the Eureka registration (a watch: the task sees the latest).
    phase: tokio::sync::watch::Sender<eureka::Phase>,
}

/// What the bridge thread needs of the node.
pub struct Shards {
    pub inboxes: Arc<Inboxes>,
    pub node_id: u32,
}

impl BridgeHandle {
    /// Start the bridge thread for `node`, reading `rx` (from [`inbox`]). Its runtime and
    /// the store are set up on the thread; a store that cannot be reached yet is retried
    /// there while the node serves (readiness says so).
    pub fn start(node: Arc<Node>, rx: mpsc::Receiver<BridgeMsg>) -> std::io::Result<Self> {
        let tx = node.bridge_tx.clone();
        let (phase, phase_rx) = tokio::sync::watch::channel(eureka::Phase::Serving);
        let thread = std::thread::Builder::new()
            .name("switchboard-bridge".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "the bridge runtime cannot start: no direct messages, sync or REST API on this node");
                        node.bridge_healthy.store(false, Ordering::Relaxed);
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    // Only when configured: with eureka_url empty nothing of it exists.
                    let registration = (!node.cfg.eureka_url.is_empty())
                        .then(|| tokio::task::spawn_local(eureka::run(node.clone(), phase_rx)));
                    let eureka_timeout = node.cfg.eureka_timeout;
                    // Only with tracing on (`trace::install` made the pipeline).
                    let exporter = crate::trace::pipeline().and_then(|p| {
                        let mut e = trace_export::Exporter::new(p, &node.cfg)?;
                        Some((p, tokio::task::spawn_local(async move { e.run().await })))
                    });
                    let at_exit = node.clone();
                    store::run(node, rx).await;
                    // It deregisters while the store finishes (told at `shutdown`); wait
                    // for it, bounded by its own timeout.
                    if let Some(task) = registration {
                        eureka::finish(task, eureka_timeout).await;
                    }
                    // The spans of the last requests: sent once, within trace_export_timeout.
                    if let Some((p, task)) = exporter {
                        task.abort();
                        if let Some(mut e) = trace_export::Exporter::new(p, &at_exit.cfg) {
                            e.flush().await;
                        }
                    }
                });
            })?;
        Ok(BridgeHandle {
            tx,
            thread: Some(thread),
            phase,
        })
    }

    /// A drain has started: the Eureka registration (if any) turns `OUT_OF_SERVICE` now.
    pub fn draining(&self) {
        self.phase.send_if_modified(|p| {
            let was = *p;
            if was == eureka::Phase::Serving {
                *p = eureka::Phase::Draining;
            }
            was == eureka::Phase::Serving
        });
    }

    /// Stop the thread and wait for it: the store finishes the jobs it already holds, and the
    /// Eureka registration (if any) deregisters, within `eureka_timeout`.
    pub fn shutdown(&mut self) {
        self.phase.send_replace(eureka::Phase::Exiting);
        // Blocking: the bridge drains its inbox, so a full one frees a slot (an ended bridge
        // thread makes this return at once).
        let _ = self.tx.blocking_send(BridgeMsg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The shards of this node holding recipients of `target`, as a bitmap: the plan shards use,
/// seen from outside every shard (the bridge never sends a frame back to itself). The store's
/// `deliver` hands one `ShardMsg::Deliver` to each, through its backlog.
pub fn recipient_shards(shards: &Shards, dir: &Directory, target: &Target) -> u64 {
    let p = crate::route::plan(target, dir, shards.node_id, 0, shards.inboxes.len(), false);
    p.shards | u64::from(p.local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::ConnRef;

    #[test]
    fn frames_from_the_bridge_go_to_exactly_the_shards_with_recipients() {
        let inboxes = (0..3)
            .map(|_| {
                let poll = mio::Poll::new().unwrap();
                let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
                crate::shard::Inbox {
                    tx: crossbeam_channel::bounded(1).0,
                    waker,
                    wake_pending: std::sync::atomic::AtomicBool::new(false),
                }
            })
            .collect();
        let shards = Shards {
            inboxes: Arc::new(Inboxes(inboxes, Default::default())),
            node_id: 9,
        };
        let dir = Directory::new();
        let room: Arc<str> = Arc::from("r");
        dir.rooms.arrive(&room, 0);
        dir.rooms.arrive(&room, 2);
        assert_eq!(recipient_shards(&shards, &dir, &Target::room(room)), 0b101);
        assert_eq!(
            recipient_shards(&shards, &dir, &Target::room(Arc::from("empty"))),
            0
        );
        let on = |node, shard| {
            Target::Conn(ConnRef {
                node,
                shard,
                slot: 1,
                gen: 1,
            })
        };
        // A connection of this node: its shard; of another node: none here.
        assert_eq!(recipient_shards(&shards, &dir, &on(9, 1)), 0b010);
        assert_eq!(recipient_shards(&shards, &dir, &on(8, 1)), 0);
    }
}
