//! Sans-IO protocol: HTTP upgrade heads, WebSocket framing, the JSON envelope, close codes.
//!
//! Owns bytes in, bytes and events out. Never touches sockets, clocks (`now` is an argument)
//! or threads, which is what makes it fuzzable and unit-testable.

pub mod envelope;
pub mod http;
pub mod json;
pub mod ws;

pub use envelope::{Frame, FrameBuilder, Head};
