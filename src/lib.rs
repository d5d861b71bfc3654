//! Switchboard: a thread-per-core WebSocket messaging server.
//!
//! Layout (see `docs/ARCHITECTURE.md`):
//! - [`proto`] and [`route`] are sans-IO: bytes and `now` in, bytes and events out.
//! - [`auth`] verifies JWTs (pure).
//! - [`shard`] runs one pinned event loop per core over a `Slab` of clients.
//! - [`io`] holds the only socket/OS calls: listeners, pinning, rlimits.
//! - [`bridge`] is the one thread that talks to the outside: the message [`store`] (in memory or
//!   PostgreSQL), and Redis/Kafka to come (single node: nothing to forward).
//! - [`directory`] is the node-wide, lock-free view of which shards hold which rooms and users;
//!   [`admission`] decides whether one more connection, member or device fits.
//! - [`rest`] is the messaging REST API (`/api/v1/`): parsed on the shards, run on the bridge.
//! - [`trace`] is distributed tracing (spans, propagation headers, the export queue), off by
//!   default; the bridge exports.
//! - [`metrics`] merges per-shard counters off the hot path; [`server`] wires it all together.

pub mod admission;
pub mod auth;
pub mod bridge;
pub mod cluster;
pub mod config;
pub mod dialect;
pub mod directory;
pub mod doctor;
pub mod fault;
pub mod http;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod notifications;
pub mod proto;
pub mod proxy;
pub mod rest;
pub mod room_options;
pub mod route;
pub mod server;
pub mod shard;
pub mod store;
pub mod tls;
pub mod trace;
