//! A small HTTP/1.1 server standing in for a backend (the auth service, a custom-type
//! backend): every request's body goes to the test's handler, which says what to answer and
//! how long to wait first. Counts requests and keeps their bodies. Keep-alive is honoured.
//! Every thread stops when the stub is dropped; every blocking call has a timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(20);
/// Largest request the stub reads (heads and bodies of tests are small).
const REQUEST_BYTES_MAX: usize = 1 << 20;

/// What to answer one request with.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    /// Wait this long before answering (a slow backend).
    pub delay: Duration,
    /// Send these bytes instead of a well-formed response (a broken backend).
    pub raw: Option<Vec<u8>>,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.as_bytes().to_vec(),
            delay: Duration::ZERO,
            raw: None,
        }
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&str, &str) -> Reply + Send + Sync;

struct Shared {
    stop: AtomicBool,
    requests: AtomicU64,
    bodies: Mutex<Vec<String>>,
    handler: Box<Handler>,
}

pub struct Stub {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Stub {
    /// Start a stub; `handler(path, body)` answers every request.
    pub fn start(handler: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
            handler: Box::new(handler),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || serve(sock, &s));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
                    Err(_) => std::thread::sleep(TICK),
                }
            }
        });
        Stub {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests answered or being answered so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The bodies received so far, in order.
    pub fn bodies(&self) -> Vec<String> {
        self.shared.bodies.lock().unwrap().clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// An `http://127.0.0.1:<port>/` where nothing listens (a backend that is down).
pub fn closed_url(path: &str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}{path}")
}

fn serve(mut sock: TcpStream, s: &Shared) {
    let _ = sock.set_read_timeout(Some(TICK));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        // A complete request in `buf`?
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                s.requests.fetch_add(1, Ordering::SeqCst);
                s.bodies.lock().unwrap().push(body.clone());
                let reply = (s.handler)(&path, &body);
                let mut waited = Duration::ZERO;
                while waited < reply.delay {
                    if s.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(TICK);
                    waited += TICK;
                }
                let close = reply.raw.is_some();
                let bytes = match reply.raw {
                    Some(raw) => raw,
                    None => {
                        let mut out = format!(
                            "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            reply.status,
                            reply.body.len()
                        )
                        .into_bytes();
                        out.extend_from_slice(&reply.body);
                        out
                    }
                };
                if sock.write_all(&bytes).is_err() || close {
                    return;
                }
                continue;
            }
        }
        if buf.len() > REQUEST_BYTES_MAX {
            return;
        }
        match sock.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}
