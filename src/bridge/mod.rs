//! The bridge: the one thread per node that carries cross-node traffic (Redis pub/sub and
//! presence, Kafka persistence and notifications), with reconnects and capped backoff.
//!
//! Shards never block on it: they `try_send` into its bounded inbox and count what a full
//! inbox drops. This is the single-node implementation: with neither Redis nor Kafka
//! configured there is nothing to forward, the bridge reports itself healthy, and its thread
//! just drains its inbox until shutdown. The Redis and Kafka implementations plug in here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::limits::BRIDGE_INBOX_CAPACITY;
use crate::proto::Frame;

/// What shards hand to the bridge.
pub enum BridgeMsg {
    /// A room message for subscribers on other nodes.
    RoomPublish { room: Arc<str>, frame: Frame },
    /// Stop the bridge thread.
    Shutdown,
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

impl BridgeHandle {
    /// Start the single-node bridge.
    pub fn single_node() -> std::io::Result<BridgeHandle> {
        let (tx, rx) = bounded(BRIDGE_INBOX_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("switchboard-bridge".into())
            .spawn(move || run_single_node(rx))?;
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

fn run_single_node(rx: Receiver<BridgeMsg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            // No other node exists: nothing to forward.
            BridgeMsg::RoomPublish { .. } => {}
            BridgeMsg::Shutdown => break,
        }
    }
}
