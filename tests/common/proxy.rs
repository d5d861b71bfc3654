//! A TCP proxy between the server under test and a dependency (a Kafka broker, PostgreSQL), to
//! break the network path on purpose.
//!
//! Owns: one loopback listener per [`Proxy`] forwarding every accepted connection to `upstream`
//! (two copying threads per connection), and the faults a test switches on and off: [`cut`]
//! (every connection closed, new ones refused: a dead host), [`swallow`] (connections stay
//! open and new ones are accepted, but nothing is forwarded either way: a black hole, requests
//! time out), and [`heal`] (forwarding again, on the same port). Every thread here stops when
//! the proxy is dropped; every blocking call has a timeout.
//!
//! [`cut`]: Proxy::cut
//! [`swallow`]: Proxy::swallow
//! [`heal`]: Proxy::heal

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the mode and the stop flag.
const TICK: Duration = Duration::from_millis(20);
/// How long a connect to the upstream may take before the client's connection is dropped.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Proxy::heal`] retries binding the old port after a [`Proxy::cut`].
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once; more are closed at accept (a test never needs that many).
const CONNECTIONS_MAX: usize = 1024;
/// Bytes one read moves.
const BUF_BYTES: usize = 64 << 10;

const FORWARD: u8 = 0;
const SWALLOW: u8 = 1;
const CUT: u8 = 2;

struct Shared {
    upstream: SocketAddr,
    port: u16,
    mode: AtomicU8,
    stop: AtomicBool,
    listener: Mutex<Option<TcpListener>>,
    /// The sockets of every open connection by id, to close them on cut/heal/drop.
    conns: Mutex<HashMap<u64, Vec<TcpStream>>>,
    next_id: AtomicU64,
}

impl Shared {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::Acquire)
    }

    fn close_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for (_, socks) in conns.drain() {
            for s in socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A forwarding proxy on `127.0.0.1:<port>` (see the module docs).
pub struct Proxy {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(upstream)
            .unwrap_or_else(|e| panic!("proxy upstream {upstream}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("proxy upstream {upstream} resolves to nothing"));
        let listener = bind(0).expect("bind the proxy on 127.0.0.1:0");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream,
            port,
            mode: AtomicU8::new(FORWARD),
            stop: AtomicBool::new(false),
            listener: Mutex::new(Some(listener)),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(s))
            .expect("spawn proxy thread");
        Proxy {
            shared,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:<port>`: give this to the client instead of the upstream's address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.shared.port)
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// Close every connection and stop listening: connects are refused until [`Proxy::heal`].
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::Release);
        *self
            .shared
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.shared.close_all();
    }

    /// Keep every connection open and accept new ones, but forward nothing either way (bytes
    /// are read and dropped): the peer looks hung.
    pub fn swallow(&self) {
        self.shared.mode.store(SWALLOW, Ordering::Release);
    }

    /// Forward again. Connections open during the fault are closed first (a swallowed stream
    /// has lost bytes and cannot be resumed), so clients reconnect to a clean path; after a
    /// [`Proxy::cut`] the same port is bound again.
    pub fn heal(&self) {
        {
            let mut l = self
                .shared
                .listener
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if l.is_none() {
                let deadline = Instant::now() + REBIND_TIMEOUT;
                loop {
                    match bind(self.shared.port) {
                        Ok(new) => {
                            *l = Some(new);
                            break;
                        }
                        Err(e) => assert!(
                            Instant::now() < deadline,
                            "proxy could not bind port {} again: {e}",
                            self.shared.port
                        ),
                    }
                    std::thread::sleep(TICK);
                }
            }
        }
        if self.shared.mode() != FORWARD {
            self.shared.close_all();
        }
        self.shared.mode.store(FORWARD, Ordering::Release);
    }

    /// Client connections accepted and forwarded (or held) since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.next_id.load(Ordering::Relaxed)
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        *self
            .shared
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.shared.close_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn accept_loop(s: Arc<Shared>) {
    while !s.stop.load(Ordering::Acquire) {
        let accepted = {
            let l = s.listener.lock().unwrap_or_else(|p| p.into_inner());
            match l.as_ref().map(|l| l.accept()) {
                Some(Ok((c, _))) => Some(c),
                Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => None,
                Some(Err(e)) => {
                    eprintln!("proxy {}: accept: {e}", s.port);
                    None
                }
                None => None,
            }
        };
        match accepted {
            Some(c) => serve(&s, c),
            None => std::thread::sleep(TICK),
        }
    }
}

/// Start forwarding (or swallowing) one accepted client connection.
fn serve(s: &Arc<Shared>, client: TcpStream) {
    if s.mode() == CUT || s.conns.lock().unwrap_or_else(|p| p.into_inner()).len() >= CONNECTIONS_MAX
    {
        return;
    }
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    // While swallowing, a new connection gets no upstream at all: it is held open and drained.
    let upstream = if s.mode() == SWALLOW {
        None
    } else {
        match TcpStream::connect_timeout(&s.upstream, UPSTREAM_CONNECT_TIMEOUT) {
            Ok(u) => {
                let _ = u.set_nodelay(true);
                Some(u)
            }
            Err(_) => return, // the client sees a close, as with the upstream down
        }
    };
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let clone = |t: &TcpStream| t.try_clone().expect("clone a proxy socket");
    let mut socks = vec![clone(&client)];
    socks.extend(upstream.as_ref().map(clone));
    s.conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, socks);
    match upstream {
        Some(up) => {
            let (c2, u2) = (clone(&client), clone(&up));
            spawn_pump(s.clone(), id, client, Some(up));
            spawn_pump(s.clone(), id, u2, Some(c2));
        }
        None => spawn_pump(s.clone(), id, client, None),
    }
}

fn spawn_pump(s: Arc<Shared>, id: u64, from: TcpStream, to: Option<TcpStream>) {
    let _ = std::thread::Builder::new()
        .name(format!("proxy-{}-pump", s.port))
        .spawn(move || pump(&s, id, from, to));
}

/// Copy `from` to `to` while forwarding; read and drop while swallowing; on EOF, an error, a
/// cut or the proxy's drop, shut both down.
fn pump(s: &Shared, id: u64, mut from: TcpStream, mut to: Option<TcpStream>) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; BUF_BYTES];
    loop {
        if s.stop.load(Ordering::Acquire) || s.mode() == CUT {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.mode() != FORWARD {
                    continue;
                }
                if let Some(t) = to.as_mut() {
                    if t.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    if let Some(t) = to {
        let _ = t.shutdown(Shutdown::Both);
    }
    s.conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}
