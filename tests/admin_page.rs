//! The admin page (`admin_page`) over real sockets and in a real browser: off by default, its
//! files and headers, `GET /api/admin/activity` against known traffic, and headless Chromium
//! (Debian's `chromium`; `tests/run-all.sh` installs it, driven over the DevTools protocol so
//! the page runs in real time) loading `/admin` against a running node with clients, rooms,
//! errors and publishes flowing while it is open, whose shown numbers must be those of
//! `/api/stats` and `/api/admin/activity`: the counts exactly, deliveries per second near
//! the API's rate, numeric p50/p99 within what the latency histogram recorded, and drawn
//! lines on both charts.
//!
//! `SWITCHBOARD_BLESS_DOCS=1` also writes the browser's screenshot to `docs/admin-page.png`.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{json, Value};

const KEY: &str = "admin-test-key";
/// The whole browser run (start, page load, a few polls, dump): far more than it takes.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

fn with_page() -> TestServer {
    TestServer::start(&[
        ("SWITCHBOARD_API_KEY", KEY),
        ("SWITCHBOARD_ADMIN_PAGE", "true"),
    ])
}

fn get(s: &TestServer, path: &str, key: Option<&str>) -> common::HttpReply {
    let key = key.map_or(String::new(), |k| format!("X-API-Key: {k}\r\n"));
    s.http_request(&format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\n{key}Connection: close\r\n\r\n"
    ))
}

fn stats(s: &TestServer) -> Value {
    let r = get(s, "/api/stats", Some(KEY));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn activity(s: &TestServer) -> Value {
    let r = get(s, "/api/admin/activity", Some(KEY));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn the_page_is_off_unless_enabled_and_needs_the_api_key() {
    let s = TestServer::start(&[("SWITCHBOARD_API_KEY", KEY)]);
    for path in ["/admin", "/admin/app.js", "/admin/app.css"] {
        let r = get(&s, path, None);
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_eq!(r.json(), json!({"error": "not found"}));
    }
    // The activity endpoint is part of the server API: behind the key, page or not.
    assert_eq!(get(&s, "/api/admin/activity", None).status, 401);
    assert_eq!(get(&s, "/api/admin/activity", Some("wrong")).status, 401);
    assert_eq!(get(&s, "/api/admin/activity", Some(KEY)).status, 200);

    // admin_page without api_key: a configuration error naming the key (the same check runs
    // at start-up), not a page that cannot read anything.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    common::hermetic(&mut cmd);
    let out = cmd
        .arg("config")
        .env("SWITCHBOARD_ADMIN_PAGE", "true")
        .stdin(Stdio::null())
        .output()
        .expect("run switchboard");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("admin_page") && err.contains("api_key"),
        "{err}"
    );
}

#[test]
fn the_page_and_its_files_are_served_with_a_strict_policy() {
    let s = with_page();
    for (path, ctype, needle) in [
        (
            "/admin",
            "text/html; charset=utf-8",
            "<script src=\"/admin/app.js\"",
        ),
        (
            "/admin/app.js",
            "text/javascript; charset=utf-8",
            "/api/admin/activity",
        ),
        ("/admin/app.css", "text/css; charset=utf-8", ".cards"),
    ] {
        let r = get(&s, path, None);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(ctype), "{path}");
        assert!(r.body.contains(needle), "{path}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self'")
                && csp.contains("connect-src 'self'")
                && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    // The page holds no data: nothing of the node is in it.
    let page = get(&s, "/admin", None).body;
    assert!(!page.contains(&stats(&s)["node_id"].as_str().unwrap().to_string()));
    // HEAD is served where GET is; other methods are 405.
    let mut c = s.tcp();
    c.write_all(b"HEAD /admin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    c.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after the head: {head}");
    let r = s.http_request(
        "POST /admin HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

/// Clients in three rooms of 3, 2 and 1 members (on both shards), publishes into the first,
/// and 2 malformed frames. Returns the clients (kept open).
fn traffic(s: &TestServer) -> Vec<common::Client> {
    let mut clients = Vec::new();
    for (room, n) in [("busy", 3), ("quiet", 2), ("lonely", 1)] {
        for _ in 0..n {
            let mut c = s.connect("/ws");
            c.subscribe(room);
            clients.push(c);
        }
    }
    // One more client in no room.
    clients.push(s.connect("/ws"));
    for i in 0..5 {
        clients[0].send_json(json!({"type": "publish", "room": "busy", "data": {"n": i}}));
    }
    for c in &mut clients[..3] {
        for _ in 0..5 {
            c.expect_type("message");
        }
    }
    clients[6].send_text("{not json");
    clients[6].expect_error("invalid JSON format");
    clients[6].send_text("[1]");
    clients[6].expect_error("invalid JSON format");
    clients
}

#[test]
fn activity_lists_the_busiest_rooms_errors_closes_and_latency() {
    let s = with_page();
    let empty = activity(&s);
    assert_eq!(empty["busiest_rooms"], json!([]));
    assert_eq!(empty["rooms"], 0);
    let _clients = traffic(&s);
    // Shard counters and the histogram are published once per tick: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = activity(&s);
        if a["errors"]["invalid_json"] == 2 && a["latency_us"]["count"].as_u64() >= Some(15) {
            break a;
        }
        assert!(Instant::now() < deadline, "counters never arrived: {a}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(a["node_id"], stats(&s)["node_id"]);
    assert_eq!(a["rooms"], 3);
    assert_eq!(a["rooms_scanned"], 3);
    assert_eq!(
        a["busiest_rooms"],
        json!([
            {"room": "busy", "members": 3},
            {"room": "quiet", "members": 2},
            {"room": "lonely", "members": 1},
        ])
    );
    // Every reason and close kind is listed, zero or not.
    let errors = a["errors"].as_object().unwrap();
    assert!(errors.contains_key("rate_limited") && errors.contains_key("invalid_json"));
    assert_eq!(errors.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 2);
    assert!(a["closes"].as_object().unwrap().contains_key("4008"));
    // The histogram: cumulative, non-decreasing, at most the count.
    let buckets = a["latency_us"]["buckets"].as_array().unwrap();
    assert_eq!(buckets[0][0], 50);
    assert_eq!(buckets.last().unwrap()[0], 5_000_000);
    let counts: Vec<u64> = buckets.iter().map(|b| b[1].as_u64().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    let count = a["latency_us"]["count"].as_u64().unwrap();
    assert!(*counts.last().unwrap() <= count);
    assert!(a["latency_us"]["sum"].as_u64().unwrap() > 0);
}

#[test]
fn busiest_rooms_are_the_top_ten_by_members() {
    let s = with_page();
    // Rooms r0..r11 with 1..12 members: the list is r11 (12) down to r2 (3).
    let mut clients = Vec::new();
    for r in 0..12 {
        for _ in 0..=r {
            let mut c = s.connect("/ws");
            c.subscribe(&format!("r{r}"));
            clients.push(c);
        }
    }
    let a = activity(&s);
    let got: Vec<(String, u64)> = a["busiest_rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["room"].as_str().unwrap().to_owned(),
                r["members"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = (2..12).rev().map(|r| (format!("r{r}"), r + 1)).collect();
    assert_eq!(got, want);
    assert_eq!(a["rooms"], 12);
}

// ---- in a browser

fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHBOARD_TEST_CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
        {
            let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !p.is_empty() {
                return PathBuf::from(p);
            }
        }
    }
    panic!(
        "the admin page test needs a headless Chromium: apt-get install chromium \
         (tests/run-all.sh installs it), or set SWITCHBOARD_TEST_CHROMIUM to a Chrome binary"
    );
}

/// Load `url` in headless Chromium, let the page run `virtual_ms` of virtual time (its
/// polls fetch for real; virtual time waits for them), then return the DOM.
fn browse(url: &str, virtual_ms: u64) -> String {
    let profile = std::env::temp_dir().join(format!(
        "switchboard-admin-chromium-{}-{}",
        std::process::id(),
        common::now_ms()
    ));
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--virtual-time-budget={virtual_ms}"))
    .arg("--dump-dom");
    let mut child = cmd
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    loop {
        if child.try_wait().expect("wait chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("chromium output");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The text of the element with `id="<id>"` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].trim().to_owned()
}

/// The cells of the table row `<tr data-<attr>="<key>">`.
fn row_of(dom: &str, attr: &str, key: &str) -> Vec<String> {
    let at = dom
        .find(&format!("<tr data-{attr}=\"{key}\">"))
        .unwrap_or_else(|| panic!("no row {attr}={key} in the page:\n{dom}"));
    let end = at + dom[at..].find("</tr>").unwrap();
    dom[at..end]
        .split("<td>")
        .skip(1)
        .map(|c| c.split("</td>").next().unwrap().to_owned())
        .collect()
}

fn number(s: &str) -> u64 {
    s.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// Headless Chromium driven over the DevTools protocol, in real time: unlike `browse`'s
/// `--virtual-time-budget`, where the page's clock jumps a second between polls that are a
/// few real milliseconds apart (so any rate it shows is per virtual second, about zero), the
/// page here polls once a real second, so its deliveries per second and latencies are those
/// of the traffic. Killed (and its profile removed) when dropped.
struct Devtools {
    child: std::process::Child,
    profile: PathBuf,
    ws: tungstenite::WebSocket<std::net::TcpStream>,
    next_id: u64,
}

impl Devtools {
    /// Start Chromium on a blank page and attach to it.
    fn open() -> Devtools {
        let profile = std::env::temp_dir().join(format!(
            "switchboard-admin-cdp-{}-{}",
            std::process::id(),
            common::now_ms()
        ));
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it took in the profile, first line.
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        let port: u16 = loop {
            let f = std::fs::read_to_string(profile.join("DevToolsActivePort")).unwrap_or_default();
            if let Some(p) = f.lines().next().and_then(|l| l.trim().parse().ok()) {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "chromium never opened its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The blank page's target, then its WebSocket.
        let ws_url = loop {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("devtools");
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut r = String::new();
            let _ = c.read_to_string(&mut r);
            let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let page = serde_json::from_str::<Value>(body).ok().and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if let Some(u) = page {
                break u;
            }
            assert!(
                Instant::now() < deadline,
                "chromium has no page target: {r}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("devtools ws");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (ws, _) = tungstenite::client(ws_url.as_str(), stream).expect("devtools handshake");
        Devtools {
            child,
            profile,
            ws,
            next_id: 1,
        }
    }

    /// Call `method`; its `result` (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tungstenite::Message::text(msg))
            .expect("devtools send");
        loop {
            let m = self.ws.read().expect("devtools answer");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of the page expression `expr`.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn dom(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .as_str()
            .expect("the DOM")
            .to_owned()
    }

    /// Columns of canvas `id` holding a pixel of any of the line colours `rgb` (within
    /// anti-aliasing): a line through n points of the 120-point chart spans about
    /// 4.7 * (n - 1) columns, a lone point 4; 0 before the page is there.
    fn line_columns(&mut self, id: &str, rgb: &[[u8; 3]]) -> u64 {
        let test = rgb
            .iter()
            .map(|[r, g, b]| {
                format!(
                    "(Math.abs(d[i] - {r}) < 40 && Math.abs(d[i + 1] - {g}) < 40 \
                     && Math.abs(d[i + 2] - {b}) < 40)"
                )
            })
            .collect::<Vec<_>>()
            .join(" || ");
        self.eval(&format!(
            "(() => {{ const c = document.getElementById('{id}'); \
             if (!c) return 0; \
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
             const cols = new Set(); \
             for (let i = 0; i < d.length; i += 4) {{ \
               if (d[i + 3] > 200 && ({test})) cols.add((i / 4) % c.width); }} \
             return cols.size; }})()"
        ))
        .as_u64()
        .expect("a count")
    }

    fn screenshot(&mut self, path: &std::path::Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64_decode(r["data"].as_str().expect("screenshot data"));
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Devtools {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &v)| n | u32::from(v) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Publishes into a room of four members (the publisher and three listeners, on one thread
/// that reads every copy, so no send queue fills) every 20 ms until stopped: about 200
/// deliveries a second, under the default rate limit of 100 commands a second.
struct Publisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// The listeners besides the publisher in the live room.
const LIVE_LISTENERS: usize = 3;

impl Publisher {
    fn start(s: &TestServer) -> Publisher {
        let mut members: Vec<common::Client> =
            (0..=LIVE_LISTENERS).map(|_| s.connect("/ws")).collect();
        for c in &mut members {
            c.subscribe("live");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                members[0].send_json(json!({"type": "publish", "room": "live", "data": {"n": n}}));
                for c in &mut members {
                    assert_eq!(c.expect_type("message")["data"]["n"], n);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        });
        Publisher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; the publishes made.
    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("publisher")
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The range in ms that the samples recorded between two reads of the latency histogram
/// fall in: the lower bound of the lowest bucket that gained samples to the upper bound of
/// the highest one. Any quantile of a window inside the two reads lies in it.
fn latency_range_ms(before: &Value, after: &Value) -> (f64, f64) {
    let b = before["buckets"].as_array().unwrap();
    let a = after["buckets"].as_array().unwrap();
    let gained: Vec<(u64, u64)> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            (
                x[0].as_u64().unwrap(),
                x[1].as_u64().unwrap() - y[1].as_u64().unwrap(),
            )
        })
        .collect();
    let total = after["count"].as_u64().unwrap() - before["count"].as_u64().unwrap();
    assert!(total > 0, "no latency samples: {before} {after}");
    let first = gained
        .iter()
        .position(|&(_, c)| c > 0)
        .unwrap_or(gained.len());
    let lower = if first == 0 { 0 } else { gained[first - 1].0 };
    // Past the last bucket the page says "at least" its bound.
    let upper = gained
        .iter()
        .find(|&&(_, c)| c == total)
        .map_or(gained.last().unwrap().0, |&(le, _)| le);
    (lower as f64 / 1000.0, upper as f64 / 1000.0)
}

#[test]
fn chromium_shows_the_numbers_of_the_api() {
    let s = with_page();
    let _clients = traffic(&s);
    // Wait until the published counters include the errors, so that the page and the API
    // read the same totals.
    let deadline = Instant::now() + Duration::from_secs(10);
    while activity(&s)["errors"]["invalid_json"] != 2 {
        assert!(Instant::now() < deadline, "errors never counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Traffic while the page is open; the histogram from here on bounds the latencies shown.
    let publisher = Publisher::start(&s);
    std::thread::sleep(Duration::from_millis(500));
    let a0 = activity(&s);
    let mut page = Devtools::open();
    let url = format!("http://127.0.0.1:{}/admin#key={KEY}", s.port);
    page.call("Page.navigate", json!({ "url": url }));
    // Four polls compared (five reads, about 4 s): lines through four points on both charts
    // (p50 blue, p99 orange, which may cover p50 where they are close).
    const BLUE: [u8; 3] = [0x27, 0x64, 0xc4];
    const ORANGE: [u8; 3] = [0xc4, 0x54, 0x2b];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let deliveries = page.line_columns("c-deliveries", &[BLUE]);
        let latency = page.line_columns("c-latency", &[BLUE, ORANGE]);
        if deliveries >= 14 && latency >= 14 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the charts never got four points ({deliveries} and {latency} columns):\n{}",
            page.dom()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The API's counter over the last 1.5 s before the page is read (the page's rate is its
    // last second's), not over the whole time the page was open: a publisher on two loaded
    // cores keeps no even pace over many seconds.
    let (tw, stw) = (Instant::now(), stats(&s));
    std::thread::sleep(Duration::from_millis(1500));
    let dom = page.dom();
    let latency_columns = (
        page.line_columns("c-latency", &[BLUE]),
        page.line_columns("c-latency", &[ORANGE]),
    );
    let (t1, st1, a1) = (Instant::now(), stats(&s), activity(&s));
    let st = &st1;
    let a = &a1;
    assert!(
        dom.contains("data-state=\"live\""),
        "the page never read the API:\n{dom}"
    );
    assert_eq!(text_of(&dom, "v-node_id"), st["node_id"].as_str().unwrap());
    for key in ["connections", "max_connections", "rooms", "users", "shards"] {
        assert_eq!(
            number(&text_of(&dom, &format!("v-{key}"))),
            st[key].as_u64().unwrap(),
            "{key}"
        );
    }
    assert_eq!(st["connections"], 7 + 1 + LIVE_LISTENERS as u64);
    assert_eq!(text_of(&dom, "v-nodes"), "1");
    assert_eq!(text_of(&dom, "v-draining"), "serving");
    assert_eq!(text_of(&dom, "status"), "ready");
    for r in a["busiest_rooms"].as_array().unwrap() {
        let room = r["room"].as_str().unwrap();
        assert_eq!(
            row_of(&dom, "room", room),
            vec![room.to_owned(), r["members"].to_string()]
        );
    }
    // Errors since start as the API says; zero reasons are not listed.
    assert_eq!(row_of(&dom, "reason", "invalid_json")[2], "2");
    assert!(!dom.contains("data-reason=\"rate_limited\""));

    // Deliveries per second over the page's last second against the API's counter over the
    // 1.5 s that end as the page is read. Within half to one and a half times: each end of
    // the page's one-second difference reads shard counters published every 250 ms (up to a
    // quarter of the second's deliveries either way), and a 20 ms publisher on two shared
    // cores does not keep an exact pace; a per-virtual-second rate or a frozen one is far
    // outside.
    let api_rate = (st1["counters"]["deliveries"].as_u64().unwrap()
        - stw["counters"]["deliveries"].as_u64().unwrap()) as f64
        / (t1 - tw).as_secs_f64();
    let shown = text_of(&dom, "v-deliveries_rate");
    let page_rate = number(
        shown
            .strip_suffix("/s")
            .unwrap_or_else(|| panic!("{shown}")),
    ) as f64;
    assert!(api_rate > 50.0, "the publisher did not run: {api_rate}/s");
    assert!(
        page_rate >= 0.5 * api_rate && page_rate <= 1.5 * api_rate,
        "the page shows {page_rate}/s, the API {api_rate:.0}/s"
    );
    // The latencies of the last second are numbers, within what the histogram recorded
    // while the page was open.
    let p50: f64 = text_of(&dom, "v-p50").parse().expect("a numeric p50");
    let p99: f64 = text_of(&dom, "v-p99").parse().expect("a numeric p99");
    let (low, high) = latency_range_ms(&a0["latency_us"], &a1["latency_us"]);
    // Rounded to 0.01 ms on the page.
    assert!(
        p50 > 0.0 && p50 <= p99 && p50 + 0.005 >= low && p99 <= high + 0.005,
        "p50 {p50} p99 {p99} outside [{low}, {high}] ms"
    );
    // Both latency lines are there (at least a lone point's width of each).
    assert!(
        latency_columns.0 >= 4 && latency_columns.1 >= 4,
        "latency chart columns {latency_columns:?}"
    );
    // The key left the address bar and is not in the page.
    assert!(!dom.contains(KEY));
    assert!(!page.eval("location.href").as_str().unwrap().contains(KEY));

    if std::env::var_os("SWITCHBOARD_BLESS_DOCS").is_some() {
        // The screenshot for the docs, after half a minute of the same traffic.
        std::thread::sleep(Duration::from_secs(30));
        let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/admin-page.png");
        page.screenshot(&png);
        let bytes = std::fs::read(&png).expect("screenshot written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
    drop(page);
    assert!(publisher.stop() > 0);
}

#[test]
fn chromium_with_a_wrong_key_asks_again_and_says_why() {
    let s = with_page();
    let url = format!("http://127.0.0.1:{}/admin#key=wrong", s.port);
    let dom = browse(&url, 3000);
    assert!(dom.contains("data-state=\"locked\""), "{dom}");
    assert_eq!(text_of(&dom, "login-error"), "invalid or missing API key");
}
