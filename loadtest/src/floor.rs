//! `floor`: what the kernel charges for the system calls a WebSocket server cannot avoid, on
//! this machine, with no server at all. One thread makes N loopback connections to its own
//! listener and times, in thread CPU time, each of: `accept4`, `epoll_ctl(ADD)`, a 64-byte
//! `send` (which on loopback also runs the receiver's TCP input and wake-up), and the
//! receiver's `recv`. From these it derives lower bounds for the targets that are made of
//! those calls, so a measured number can be read against what the machine allows.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use mio::{Interest, Poll, Token};

use crate::report::Report;

/// Payload of each timed send: a 64-byte room message is ~100 bytes on the wire.
const SEND_BYTES: usize = 100;
/// Rounds of sends (each to every connection); the first warms up and is not counted.
const SEND_ROUNDS: usize = 4;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn per_op_us(ns: u64, ops: usize) -> f64 {
    ns as f64 / 1000.0 / ops.max(1) as f64
}

pub fn run(n: usize, nofile: u64) -> Report {
    let mut r = Report::new("floor");
    r.put("connections", n);
    if (2 * n + 64) as u64 > nofile {
        r.fail(format!(
            "{n} connections need {} fds here (both ends), over RLIMIT_NOFILE {nofile}",
            2 * n + 64
        ));
        return r;
    }
    match measure(n, &mut r) {
        Ok(()) => {}
        Err(e) => r.fail(format!("floor: {e}")),
    }
    r
}

fn measure(n: usize, r: &mut Report) -> std::io::Result<()> {
    let listener = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_tcp_nodelay(true)?; // inherited by accepted sockets, as in the server
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )?;
        s.listen(n.min(i32::MAX as usize) as i32)?;
        TcpListener::from(s)
    };
    let addr = listener.local_addr()?;
    // Connect in batches no larger than the accept backlog the kernel allows.
    let mut clients = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    let mut accept_ns = 0u64;
    const BATCH: usize = 1000;
    while clients.len() < n {
        let k = BATCH.min(n - clients.len());
        for _ in 0..k {
            clients.push(TcpStream::connect(addr)?);
        }
        let t = thread_cpu_ns();
        for _ in 0..k {
            servers.push(listener.accept()?.0);
        }
        accept_ns += thread_cpu_ns() - t;
    }
    let poll = Poll::new()?;
    let t = thread_cpu_ns();
    for (i, s) in servers.iter().enumerate() {
        poll.registry().register(
            &mut mio::unix::SourceFd(&s.as_raw_fd()),
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
    }
    let epoll_add_ns = thread_cpu_ns() - t;
    // The receivers sit in an epoll set too, as a client's event loop would.
    let client_poll = Poll::new()?;
    for (i, c) in clients.iter().enumerate() {
        c.set_nonblocking(true)?;
        client_poll.registry().register(
            &mut mio::unix::SourceFd(&c.as_raw_fd()),
            Token(i),
            Interest::READABLE,
        )?;
    }
    let msg = [b'x'; SEND_BYTES];
    let mut buf = vec![0u8; 64 * 1024];
    let (mut send_ns, mut recv_ns, mut sends, mut recvs) = (0u64, 0u64, 0usize, 0usize);
    for round in 0..SEND_ROUNDS {
        let t = thread_cpu_ns();
        for s in &servers {
            // SAFETY: `msg` outlives the call; send reads at most its length.
            let w = unsafe {
                libc::send(
                    s.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if w != SEND_BYTES as isize {
                return Err(std::io::Error::other(format!("short send: {w}")));
            }
        }
        let dt_send = thread_cpu_ns() - t;
        let t = thread_cpu_ns();
        for c in clients.iter_mut() {
            let got = c.read(&mut buf)?;
            if got != SEND_BYTES {
                return Err(std::io::Error::other(format!("short recv: {got}")));
            }
        }
        let dt_recv = thread_cpu_ns() - t;
        if round > 0 {
            send_ns += dt_send;
            recv_ns += dt_recv;
            sends += n;
            recvs += n;
        }
    }
    let accept = per_op_us(accept_ns, n);
    let epoll_add = per_op_us(epoll_add_ns, n);
    let send = per_op_us(send_ns, sends);
    let recv = per_op_us(recv_ns, recvs);
    r.put_f("accept_us", accept, 2);
    r.put_f("epoll_add_us", epoll_add, 2);
    r.put_f("send_us", send, 2);
    r.put_f("recv_us", recv, 2);
    // A subscribe-after-connect connection costs the server at least accept + epoll add +
    // 2 x (recv + send); with ?subscribe= one recv and one send.
    r.put_f(
        "connect_floor_us",
        accept + epoll_add + 2.0 * (recv + send),
        2,
    );
    r.put_f(
        "connect_url_subscribe_floor_us",
        accept + epoll_add + recv + send,
        2,
    );
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    r.put("cores", cores as u64);
    // One publish to 19,500 subscribers: 19,500 sends spread over every core, before the
    // generator reads a byte; the last subscriber can be reached no sooner.
    r.put_f(
        "fanout_19500_last_ms_floor",
        19_500.0 * send / cores / 1000.0,
        1,
    );
    r.put_f("fanout_500_last_ms_floor", 500.0 * send / cores / 1000.0, 2);
    Ok(())
}
