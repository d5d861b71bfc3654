//! Admission: whether one more connection, room member or user device fits, against the
//! configured limits (`max_connections`, `max_connections_per_room`,
//! `max_connections_per_user`). The counts live in the directory's entries (updated in
//! place, see [`crate::directory`]); this module owns the policy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::shard::Node;

/// One more upgraded connection on the node, unless at `max_connections`.
pub fn connection(node: &Node) -> bool {
    let before = node.dir.connections.fetch_add(1, Ordering::Relaxed);
    if before >= node.max_connections {
        node.dir.connections.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

/// The reverse of a successful [`connection`].
pub fn connection_gone(node: &Node) {
    node.dir.connections.fetch_sub(1, Ordering::Relaxed);
}

/// One more member of `room` on the node; the new node-wide count, or `None` when the room is
/// at `max_connections_per_room` (0 = unlimited).
pub fn room_join(node: &Node, room: &Arc<str>) -> Option<u32> {
    node.dir
        .rooms
        .count_up(room, node.cfg.max_connections_per_room)
}

/// The reverse of a successful [`room_join`].
pub fn room_leave(node: &Node, room: &Arc<str>) {
    node.dir.rooms.count_down(room);
}

/// One more device of `user` on the node, unless at `max_connections_per_user`.
pub fn device(node: &Node, user: &Arc<str>) -> Option<u32> {
    let max = node.cfg.max_connections_per_user.min(u32::MAX as usize) as u32;
    node.dir.users.count_up(user, max)
}

/// The reverse of a successful [`device`].
pub fn device_gone(node: &Node, user: &Arc<str>) {
    node.dir.users.count_down(user);
}
