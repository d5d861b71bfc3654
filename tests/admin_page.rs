//! The admin page (`admin_page`) over real sockets and in a real browser: off by default, its
//! files and headers, `GET /api/admin/activity` against known traffic, and headless Chromium
//! (Debian's `chromium`; `tests/run-all.sh` installs it) loading `/admin` against a running
//! node with clients, rooms, publishes and errors, whose shown numbers must be those of
//! `/api/stats` and `/api/admin/activity` read right after.
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
/// polls fetch for real; virtual time waits for them), then return the DOM; with
/// `screenshot`, also write a PNG there.
fn browse(url: &str, virtual_ms: u64, screenshot: Option<&std::path::Path>) -> String {
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
    .arg(format!("--virtual-time-budget={virtual_ms}"));
    match screenshot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
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
    let url = format!("http://127.0.0.1:{}/admin#key={KEY}", s.port);
    let dom = browse(&url, 4000, None);
    let st = stats(&s);
    let a = activity(&s);
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
    assert_eq!(st["connections"], 7);
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
    // The rate and latency read-outs are filled once two reads were compared.
    assert!(text_of(&dom, "v-deliveries_rate").ends_with("/s"), "{dom}");
    let p99 = text_of(&dom, "v-p99");
    assert!(p99 == "-" || p99.parse::<f64>().is_ok(), "{p99}");
    // The key left the address bar and is not in the page.
    assert!(!dom.contains(KEY));

    if std::env::var_os("SWITCHBOARD_BLESS_DOCS").is_some() {
        // The screenshot for the docs, with publishes flowing so that the charts have lines
        // (under virtual time the page's clock runs faster than the publisher's: the rate it
        // shows is per virtual second).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = {
            let stop = stop.clone();
            let mut c = s.connect("/ws");
            c.subscribe("busy");
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.send_json(json!({"type": "publish", "room": "busy", "data": {"n": n}}));
                    n += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/admin-page.png");
        browse(&url, 30_000, Some(&png));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        publisher.join().unwrap();
        let bytes = std::fs::read(&png).expect("screenshot written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}

#[test]
fn chromium_with_a_wrong_key_asks_again_and_says_why() {
    let s = with_page();
    let url = format!("http://127.0.0.1:{}/admin#key=wrong", s.port);
    let dom = browse(&url, 3000, None);
    assert!(dom.contains("data-state=\"locked\""), "{dom}");
    assert_eq!(text_of(&dom, "login-error"), "invalid or missing API key");
}
