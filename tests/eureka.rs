//! Service discovery against a stub Eureka server (a plain `TcpListener` thread in this file
//! that speaks the four calls of Eureka's REST API and records every request): the
//! registration's exact body and credentials, heartbeats at the configured interval, a
//! forgotten instance registered again, `OUT_OF_SERVICE` the moment SIGTERM starts the drain
//! and before the deregistration, the deregistration at exit, Eureka down at start (the node
//! is ready at once and registers when Eureka appears), and a hung Eureka holding the exit
//! back by `eureka_timeout` at most.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::Value;

/// How often the stub's blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(10);
/// Largest request the stub reads.
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// How long a test waits for the node to make an expected request.
const WAIT: Duration = Duration::from_secs(8);

/// One request the stub received, and what it answered (None: it never answered).
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
    at: Instant,
    answered: Option<u16>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

struct Shared {
    stop: AtomicBool,
    /// Answer nothing (a hung Eureka): requests are recorded and left waiting.
    hang: AtomicBool,
    requests: Mutex<Vec<Req>>,
    /// Instance paths (`/eureka/apps/APP/ID`) registered.
    known: Mutex<HashSet<String>>,
}

/// The stub Eureka server at `http://127.0.0.1:<port>/eureka/`.
struct StubEureka {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl StubEureka {
    fn start() -> StubEureka {
        StubEureka::on(TcpListener::bind("127.0.0.1:0").expect("bind stub"))
    }

    /// On a port chosen earlier (Eureka that appears after the node started).
    fn start_on(port: u16) -> StubEureka {
        StubEureka::on(TcpListener::bind(("127.0.0.1", port)).expect("bind stub on its port"))
    }

    fn on(listener: TcpListener) -> StubEureka {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            known: Mutex::new(HashSet::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || serve(sock, &s));
                    }
                    Err(_) => std::thread::sleep(TICK),
                }
            }
        });
        StubEureka {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/eureka/", self.addr)
    }

    fn requests(&self) -> Vec<Req> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Wait until `pred` holds for the requests so far; returns them.
    fn wait(&self, what: &str, pred: impl Fn(&[Req]) -> bool) -> Vec<Req> {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.requests();
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "the stub never saw {what}; it saw:\n{:#?}",
                r.iter()
                    .map(|r| format!("{} {} -> {:?}", r.method, r.path, r.answered))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(TICK);
        }
    }

    /// Forget every instance (a restarted Eureka): heartbeats get 404.
    fn forget_all(&self) {
        self.shared.known.lock().unwrap().clear();
    }

    fn hang(&self) {
        self.shared.hang.store(true, Ordering::SeqCst);
    }
}

impl Drop for StubEureka {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Eureka's answers: register 204; heartbeat, status change and deregistration 200 for a
/// known instance, 404 for one it does not hold.
fn answer(s: &Shared, method: &str, path: &str, body: &str) -> u16 {
    let mut known = s.known.lock().unwrap();
    let Some(rest) = path.strip_prefix("/eureka/apps/") else {
        return 400;
    };
    match method {
        "POST" if !rest.contains('/') => {
            let Ok(v) = serde_json::from_str::<Value>(body) else {
                return 400;
            };
            let Some(id) = v["instance"]["instanceId"].as_str() else {
                return 400;
            };
            known.insert(format!("{path}/{id}"));
            204
        }
        "PUT" => {
            let instance = path.split_once("/status?value=").map_or(path, |(i, _)| i);
            if known.contains(instance) {
                200
            } else {
                404
            }
        }
        // Removing a status override (Eureka keeps the instance, status UP).
        "DELETE" if path.ends_with("/status?value=UP") => {
            if known.contains(path.trim_end_matches("/status?value=UP")) {
                200
            } else {
                404
            }
        }
        "DELETE" => {
            if known.remove(path) {
                200
            } else {
                404
            }
        }
        _ => 400,
    }
}

fn serve(mut sock: TcpStream, s: &Shared) {
    let _ = sock.set_read_timeout(Some(TICK));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next().unwrap_or_default().split(' ');
            let method = first.next().unwrap_or_default().to_owned();
            let path = first.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                let mut req = Req {
                    method,
                    path,
                    headers,
                    body,
                    at: Instant::now(),
                    answered: None,
                };
                if s.hang.load(Ordering::SeqCst) {
                    s.requests.lock().unwrap().push(req);
                    while !s.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                    }
                    return;
                }
                let status = answer(s, &req.method, &req.path, &req.body);
                req.answered = Some(status);
                s.requests.lock().unwrap().push(req);
                let reason = if status < 300 { "OK" } else { "No" };
                let out = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n");
                if sock.write_all(out.as_bytes()).is_err() {
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

/// Two distinct ports nothing listens on (yet).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// The machine's host name, as the node reads it for its default instance id.
fn machine_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read the host name")
        .trim()
        .to_owned()
}

/// Short intervals so a test sees several heartbeats in a few seconds.
const FAST: [(&str, &str); 4] = [
    ("SWITCHBOARD_EUREKA_RENEWAL_INTERVAL", "1s"),
    ("SWITCHBOARD_EUREKA_LEASE_DURATION", "3s"),
    ("SWITCHBOARD_EUREKA_TIMEOUT", "1s"),
    ("SWITCHBOARD_EUREKA_RETRY_MAX", "300ms"),
];

fn with_fast<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    FAST.iter().copied().chain(extra.iter().copied()).collect()
}

/// Wait until the node has its registration answered (its metric says so: the stub records a
/// request before answering it) and has removed any old override, so a signal sent next
/// finds nothing of the registration in flight.
fn registered(server: &TestServer, stub: &StubEureka, instance: &str) {
    server.wait_metrics("the registration", |t| {
        metric(t, "switchboard_eureka_registered") == Some(1)
    });
    let clear = format!("{instance}/status?value=UP");
    stub.wait("the override removal", |r| {
        r.iter()
            .any(|r| r.is("DELETE", &clear) && r.answered == Some(200))
    });
    // Its answer is written right after it is recorded.
    std::thread::sleep(Duration::from_millis(50));
}

fn count(reqs: &[Req], method: &str, path: &str) -> usize {
    reqs.iter().filter(|r| r.is(method, path)).count()
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn registers_with_its_urls_renews_on_schedule_and_registers_again_when_forgotten() {
    let stub = StubEureka::start();
    // Spring Cloud's user:password@ form of a service URL.
    let url = format!("http://eu:s3cret@{}/eureka/", stub.addr);
    let server = TestServer::start(&with_fast(&[
        ("SWITCHBOARD_SERVICE_NAME", "chat-gateway"),
        ("SWITCHBOARD_EUREKA_URL", &url),
    ]));
    let port = server.port;
    let host = machine_host();
    let id = format!("{host}:chat-gateway:{port}");
    let app_path = "/eureka/apps/CHAT-GATEWAY";
    let instance = format!("{app_path}/{id}");

    let reqs = stub.wait("a registration", |r| count(r, "POST", app_path) >= 1);
    let reg = reqs.iter().find(|r| r.is("POST", app_path)).unwrap();
    assert_eq!(reg.answered, Some(204));
    assert_eq!(reg.header("content-type"), Some("application/json"));
    assert_eq!(reg.header("authorization"), Some("Basic ZXU6czNjcmV0"));
    let body: Value = serde_json::from_str(&reg.body).expect("a JSON body");
    let i = &body["instance"];
    assert_eq!(i["instanceId"], id.as_str());
    assert_eq!(i["hostName"], host.as_str());
    assert_eq!(i["app"], "CHAT-GATEWAY");
    assert_eq!(i["ipAddr"], "127.0.0.1");
    assert_eq!(i["status"], "UP");
    assert_eq!(i["port"]["$"], u64::from(port));
    assert_eq!(i["port"]["@enabled"], "true");
    assert_eq!(i["securePort"]["@enabled"], "false");
    assert_eq!(i["healthCheckUrl"], format!("http://{host}:{port}/ready"));
    assert_eq!(i["statusPageUrl"], format!("http://{host}:{port}/health"));
    assert_eq!(i["homePageUrl"], format!("http://{host}:{port}/"));
    assert_eq!(i["vipAddress"], "chat-gateway");
    assert_eq!(
        i["dataCenterInfo"]["@class"],
        "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"
    );
    assert_eq!(i["dataCenterInfo"]["name"], "MyOwn");
    assert_eq!(i["leaseInfo"]["renewalIntervalInSecs"], 1);
    assert_eq!(i["leaseInfo"]["durationInSecs"], 3);
    // The registered paths are the node's own endpoints.
    assert_eq!(server.http_get("/ready").0, 200);
    assert_eq!(server.http_get("/health").0, 200);

    // Right after it, any status override an earlier run left for this id is removed.
    let clear = format!("{instance}/status?value=UP");
    let reqs = stub.wait("the override removal", |r| count(r, "DELETE", &clear) == 1);
    let at = reqs.iter().position(|r| r.is("DELETE", &clear)).unwrap();
    assert_eq!(reqs[at].answered, Some(200));
    assert!(
        reqs[..at].iter().all(|r| r.is("POST", app_path)),
        "{reqs:#?}"
    );

    // Heartbeats on the configured schedule, each answered 200.
    let reqs = stub.wait("three heartbeats", |r| count(r, "PUT", &instance) >= 3);
    let mut last = reg.at;
    for beat in reqs.iter().filter(|r| r.is("PUT", &instance)) {
        assert_eq!(beat.answered, Some(200));
        assert_eq!(beat.body, "");
        let gap = beat.at - last;
        assert!(
            gap >= Duration::from_millis(900) && gap <= Duration::from_millis(1600),
            "a heartbeat {gap:?} after the one before (interval 1s)"
        );
        last = beat.at;
    }
    let text = server.wait_metrics("three heartbeats", |t| {
        metric(t, "switchboard_eureka_heartbeats_total") >= Some(3)
    });
    assert_eq!(metric(&text, "switchboard_eureka_registered"), Some(1));
    assert_eq!(
        metric(&text, "switchboard_eureka_registrations_total"),
        Some(1)
    );
    assert_eq!(metric(&text, "switchboard_eureka_out_of_service"), Some(0));

    // Eureka restarts empty: the next heartbeat gets 404, the node registers again at once.
    stub.forget_all();
    let reqs = stub.wait("a second registration", |r| count(r, "POST", app_path) >= 2);
    let lost = reqs
        .iter()
        .position(|r| r.is("PUT", &instance) && r.answered == Some(404))
        .expect("a heartbeat answered 404");
    let again = reqs.iter().rposition(|r| r.is("POST", app_path)).unwrap();
    assert!(again > lost, "registered again after the 404");
    assert!(
        reqs[again].at - reqs[lost].at < Duration::from_millis(500),
        "at once, not at the next interval"
    );
    let body: Value = serde_json::from_str(&reqs[again].body).unwrap();
    assert_eq!(body["instance"]["instanceId"], id.as_str());
    assert_eq!(body["instance"]["status"], "UP");
    let reqs = stub.wait("a heartbeat after it", |r| {
        r.iter()
            .skip(again)
            .any(|r| r.is("PUT", &instance) && r.answered == Some(200))
    });
    assert!(reqs.len() > again);
    // The override was removed once, after the first registration only.
    assert_eq!(count(&reqs, "DELETE", &clear), 1);
    let text = server.wait_metrics("the re-registration", |t| {
        metric(t, "switchboard_eureka_reregistrations_total") == Some(1)
    });
    assert_eq!(
        metric(&text, "switchboard_eureka_registrations_total"),
        Some(2)
    );
    assert_eq!(metric(&text, "switchboard_eureka_registered"), Some(1));
    // Eureka is not part of readiness, and the password is never logged.
    let (status, ready) = server.http_get("/ready");
    assert_eq!((status, ready.as_str()), (200, r#"{"status":"ready"}"#));
    let logs = server.logs();
    assert!(logs.contains("eureka: registered"), "{logs}");
    assert!(!logs.contains("s3cret"), "{logs}");
}

#[test]
fn sigterm_turns_out_of_service_at_once_and_deregisters_at_exit() {
    let stub = StubEureka::start();
    let url = stub.url();
    let mut server = TestServer::start(&with_fast(&[
        ("SWITCHBOARD_EUREKA_URL", &url),
        ("SWITCHBOARD_EUREKA_INSTANCE_ID", "node-1"),
        ("SWITCHBOARD_SHUTDOWN_TIMEOUT", "6s"),
    ]));
    let instance = "/eureka/apps/SWITCHBOARD/node-1";
    let status_oos = format!("{instance}/status?value=OUT_OF_SERVICE");
    registered(&server, &stub, instance);
    // Clients keep the drain going: they are closed in batches, one a tick (100 ms) here, over
    // the first half of shutdown_timeout.
    let clients: Vec<common::Client> = (0..20).map(|_| server.connect("/ws")).collect();

    let sigterm = Instant::now();
    server.signal_term();
    let reqs = stub.wait("OUT_OF_SERVICE", |r| count(r, "PUT", &status_oos) >= 1);
    let oos = reqs.iter().find(|r| r.is("PUT", &status_oos)).unwrap();
    assert_eq!(oos.answered, Some(200));
    assert!(
        oos.at - sigterm < Duration::from_millis(1000),
        "OUT_OF_SERVICE {:?} after SIGTERM",
        oos.at - sigterm
    );
    // Still draining: the node runs, /ready says so, and it has not deregistered yet.
    assert!(server.is_running(), "exited before the drain");
    assert_eq!(server.try_http_get("/ready").map(|r| r.0), Some(503));
    assert_eq!(count(&stub.requests(), "DELETE", instance), 0);

    let status = server.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    drop(clients);
    let reqs = stub.requests();
    let deletes: Vec<&Req> = reqs.iter().filter(|r| r.is("DELETE", instance)).collect();
    assert_eq!(deletes.len(), 1, "one deregistration");
    assert_eq!(deletes[0].answered, Some(200));
    assert!(
        deletes[0].at - oos.at >= Duration::from_millis(1500),
        "the status went out when the drain started, {:?} before the deregistration",
        deletes[0].at - oos.at
    );
    // Nothing after the deregistration.
    assert!(reqs.iter().all(|r| r.at <= deletes[0].at));
    let logs = server.logs();
    assert!(logs.contains("eureka: deregistered"), "{logs}");
}

#[test]
fn eureka_down_at_start_does_not_stop_the_node() {
    // Two servers listed, neither up: the node starts, serves and is ready regardless.
    let (dead, later) = free_ports();
    let urls = format!("http://127.0.0.1:{dead}/eureka/,http://127.0.0.1:{later}/eureka");
    let started = Instant::now();
    let mut server = TestServer::start(&with_fast(&[
        ("SWITCHBOARD_EUREKA_URL", &urls),
        ("SWITCHBOARD_EUREKA_INSTANCE_ID", "node-2"),
    ]));
    server.wait_ready();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "ready {:?} after spawn",
        started.elapsed()
    );
    server.assert_serving();
    let text = server.wait_metrics("failed registrations", |t| {
        metric(t, "switchboard_eureka_registration_failures_total") >= Some(2)
    });
    assert_eq!(metric(&text, "switchboard_eureka_registered"), Some(0));

    // Eureka appears on the second URL: the node registers there within the backoff's cap.
    let stub = StubEureka::start_on(later);
    let appeared = Instant::now();
    let reqs = stub.wait("a registration", |r| {
        count(r, "POST", "/eureka/apps/SWITCHBOARD") == 1
    });
    assert!(
        reqs[0].at - appeared < Duration::from_secs(2),
        "registered {:?} after Eureka appeared (retry cap 300ms)",
        reqs[0].at - appeared
    );
    server.wait_metrics("the registration", |t| {
        metric(t, "switchboard_eureka_registered") == Some(1)
    });
    assert!(server.sigterm().success());
    assert_eq!(
        count(
            &stub.requests(),
            "DELETE",
            "/eureka/apps/SWITCHBOARD/node-2"
        ),
        1
    );
}

#[test]
fn a_hung_eureka_holds_the_exit_back_by_eureka_timeout_at_most() {
    let stub = StubEureka::start();
    let url = stub.url();
    let mut server = TestServer::start(&with_fast(&[
        ("SWITCHBOARD_EUREKA_URL", &url),
        ("SWITCHBOARD_EUREKA_INSTANCE_ID", "node-3"),
    ]));
    registered(&server, &stub, "/eureka/apps/SWITCHBOARD/node-3");
    // Eureka stops answering (a hung server: connections accepted, nothing said).
    stub.hang();
    let sigterm = Instant::now();
    let status = server.sigterm();
    let took = sigterm.elapsed();
    assert!(status.success(), "exit status {status:?}");
    // The drain of a node without clients, plus eureka_timeout (1s), plus scheduling.
    assert!(
        took < Duration::from_millis(2500),
        "exit took {took:?} with eureka_timeout 1s"
    );
    let reqs = stub.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path.ends_with("/status?value=OUT_OF_SERVICE")),
        "the drain's status change was sent"
    );
    let logs = server.logs();
    assert!(logs.contains("could not deregister"), "{logs}");
}
