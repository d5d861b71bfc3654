//! The OS boundary: listening sockets (SO_REUSEPORT), per-connection socket options, core
//! pinning. Everything that is a syscall outside mio's read/write lives here.
//!
//! epoll through mio is the backend. io_uring (tokio-uring) is planned behind a cargo feature
//! and this same narrow surface; it is not built yet.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;

/// A non-blocking listener on `addr`, with SO_REUSEPORT when asked (one per shard).
pub fn std_listener(
    addr: SocketAddr,
    reuse_port: bool,
    backlog: u32,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Apply the per-connection socket options from config to an accepted stream.
pub fn configure_stream(stream: &mio::net::TcpStream, cfg: &Config) -> io::Result<()> {
    stream.set_nodelay(cfg.tcp_nodelay)?;
    if cfg.so_sndbuf > 0 || cfg.so_rcvbuf > 0 {
        let sock = socket2::SockRef::from(stream);
        if cfg.so_sndbuf > 0 {
            sock.set_send_buffer_size(cfg.so_sndbuf as usize)?;
        }
        if cfg.so_rcvbuf > 0 {
            sock.set_recv_buffer_size(cfg.so_rcvbuf as usize)?;
        }
    }
    Ok(())
}

/// Pin the calling thread to core `index` modulo the cores available. Returns whether it did.
pub fn pin_to_core(index: usize) -> bool {
    match core_affinity::get_core_ids() {
        Some(cores) if !cores.is_empty() => {
            core_affinity::set_for_current(cores[index % cores.len()])
        }
        _ => false,
    }
}

/// Cores available to this process.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
