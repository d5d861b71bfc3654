//! Distributed tracing end to end: the real binary with `trace_exporter` zipkin (and otlp)
//! pointed at a stub collector (`common::http_stub`), every trace sampled: a server API request
//! and a WebSocket upgrade carrying the caller's `traceparent` (and B3 headers) arrive as
//! spans of the caller's trace with the caller's span as parent and the right attributes; a
//! direct message is one trace from `message.send` to `message.ack` with its `store.append`
//! child; a caller that says "not sampled" is not recorded, and an end user's "sampled"
//! does not force a trace; log lines inside a span carry its
//! `trace_id` and `span_id` (text and JSON); in OTLP form our own spans link by
//! `parentSpanId` with the right `kind` and typed attributes; a Kafka notification record's
//! `traceparent` or B3 headers are continued; with the collector down the node serves on
//! while `/metrics` counts the dropped spans, and with it hung the queue fills to its bound
//! and no further. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::http_stub::{closed_url, Reply, Stub};
use common::{http_json, metric, TestServer};
use serde_json::{json, Value};

const KEY: &str = "trace-key";
/// How long a test waits for spans to reach the collector (export interval 50 ms).
const WAIT: Duration = Duration::from_secs(10);

const T1: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const P1: &str = "00f067aa0ba902b7";
const T2: &str = "0af7651916cd43dd8448eb211c80319c";
const P2: &str = "b7ad6b7169203331";
const T3: &str = "80f198ee56343ba864fe8b2a57d3eff7";
const P3: &str = "e457b5a2e4d86bd1";
const T4: &str = "11111111111111111111111111111111";
const T5: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const P5: &str = "051581bf3cb55c13";
const T6: &str = "6e0c63257de34c92bf9efcd03927272e";
const P6: &str = "3b9aca07d8f1c2e4";
const T7: &str = "7d3efb1a9c2e4f6081b2c3d4e5f60718";
const P7: &str = "7a1b2c3d4e5f6071";
const T8: &str = "8e4f0c2b1a3d5e7f9081726354aabbcc";
const P8: &str = "8b7c6d5e4f3a2b1c";
const T9: &str = "7d1f4c0a9b8e4f2a8c3b5d6e7f809112";
const P9: &str = "9a8b7c6d5e4f3a2b";

fn collector(path: &'static str) -> Stub {
    Stub::start(move |p, _| {
        if p == path {
            Reply::json(202, "{}")
        } else {
            Reply::json(404, "{}")
        }
    })
}

fn server(exporter: &str, endpoint: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SWITCHBOARD_TRACE_EXPORTER", exporter),
        ("SWITCHBOARD_TRACE_ENDPOINT", endpoint),
        ("SWITCHBOARD_TRACE_SAMPLE_RATIO", "1.0"),
        ("SWITCHBOARD_TRACE_SERVICE_NAME", "sb-test"),
        ("SWITCHBOARD_TRACE_EXPORT_INTERVAL", "50ms"),
        ("SWITCHBOARD_TRACE_EXPORT_TIMEOUT", "500ms"),
        ("SWITCHBOARD_API_KEY", KEY),
        ("SWITCHBOARD_LOG_LEVEL", "debug"),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env)
}

fn stats(s: &TestServer, trace: &[(&str, &str)]) -> u16 {
    let mut headers = vec![("X-API-Key", KEY)];
    headers.extend_from_slice(trace);
    http_json(s, "GET", "/api/stats", &headers, None, false).0
}

/// Zipkin spans received so far (every body is a JSON array).
fn zipkin_spans(stub: &Stub) -> Vec<Value> {
    stub.bodies()
        .iter()
        .flat_map(|b| {
            serde_json::from_str::<Value>(b)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {b}"))
                .as_array()
                .expect("a Zipkin body is an array")
                .clone()
        })
        .collect()
}

/// OTLP spans received so far, each with the resource's service.name beside it.
fn otlp_spans(stub: &Stub) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for b in stub.bodies() {
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {b}"));
        for rs in v["resourceSpans"].as_array().expect("resourceSpans") {
            let attrs = rs["resource"]["attributes"].as_array().expect("attributes");
            let service = attrs
                .iter()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .expect("service.name")
                .to_owned();
            for ss in rs["scopeSpans"].as_array().expect("scopeSpans") {
                assert_eq!(ss["scope"]["name"], "switchboard");
                for s in ss["spans"].as_array().expect("spans") {
                    out.push((service.clone(), s.clone()));
                }
            }
        }
    }
    out
}

/// Wait until `pred` holds of what the collector received; the spans then.
fn wait_for<T: std::fmt::Debug>(
    what: &str,
    get: impl Fn() -> Vec<T>,
    pred: impl Fn(&[T]) -> bool,
) -> Vec<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get();
        if pred(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "the collector never got {what}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn zipkin_find<'a>(spans: &'a [Value], trace: &str, name: &str) -> Option<&'a Value> {
    spans
        .iter()
        .find(|s| s["traceId"] == trace && s["name"] == name)
}

#[test]
fn zipkin_spans_continue_the_callers_trace() {
    let stub = collector("/api/v2/spans");
    let s = server("zipkin", &stub.url("/api/v2/spans"), &[]);
    // A caller that says "not sampled" first: it must never show up.
    let unsampled = format!("00-{T4}-{P1}-00");
    assert_eq!(stats(&s, &[("traceparent", &unsampled)]), 200);
    let tp1 = format!("00-{T1}-{P1}-01");
    assert_eq!(stats(&s, &[("traceparent", &tp1)]), 200);
    let b3 = format!("{T3}-{P3}-1");
    assert_eq!(stats(&s, &[("b3", &b3)]), 200);
    // A wrong key: the span says 401.
    let wrong = http_json(
        &s,
        "GET",
        "/api/stats",
        &[
            ("X-API-Key", "nope"),
            ("X-B3-TraceId", T2),
            ("X-B3-SpanId", P2),
            ("X-B3-Sampled", "1"),
        ],
        None,
        false,
    );
    assert_eq!(wrong.0, 401);
    // A REST request the bridge runs against the store: its span ends with the answer.
    let tp6 = format!("00-{T6}-{P6}-01");
    let rest = http_json(
        &s,
        "GET",
        "/api/v1/messages/threads",
        &[("X-User-Id", "alice"), ("traceparent", &tp6)],
        None,
        false,
    );
    assert_eq!(rest.0, 200, "{rest:?}");
    // An upgrade with the caller's context, then a direct message on it.
    let tp2 = format!("00-{T2}-{P2}-01");
    let mut alice = s.connect_with("/ws?user_id=alice", &[("traceparent", &tp2)]);
    alice.send_json(
        json!({"type": "message.send", "clientMsgId": "c-1", "to": "bob", "content": "hi"}),
    );
    let ack = alice.expect_type("message.ack");
    let msg_id = ack["data"]["serverMsgId"]
        .as_str()
        .expect("serverMsgId")
        .to_owned();
    // A client continuing its own trace in the envelope, to a recipient who is connected.
    let mut bob = s.connect("/ws?user_id=bob");
    let tp5 = format!("00-{T5}-{P5}-01");
    alice.send_json(json!({"type": "message.send", "clientMsgId": "c-2", "to": "bob", "content": "again", "traceparent": tp5}));
    alice.expect_type("message.ack");
    bob.expect_type("message.create");

    let spans = wait_for(
        "the API, upgrade and DM spans",
        || zipkin_spans(&stub),
        |spans| {
            zipkin_find(spans, T1, "http.request").is_some()
                && zipkin_find(spans, T3, "http.request").is_some()
                && zipkin_find(spans, T2, "ws.upgrade").is_some()
                && spans.iter().any(|s| s["name"] == "store.append")
                && spans.iter().any(|s| s["name"] == "dm.send")
                && zipkin_find(spans, T5, "dm.send").is_some()
                && zipkin_find(spans, T5, "shard.deliver").is_some()
                && zipkin_find(spans, T6, "http.request").is_some()
        },
    );
    assert!(
        spans.iter().all(|s| s["traceId"] != T4),
        "a trace the caller did not sample was recorded: {spans:?}"
    );
    for sp in &spans {
        assert_eq!(sp["localEndpoint"]["serviceName"], "sb-test", "{sp}");
        assert!(
            sp["timestamp"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000_000),
            "{sp}"
        );
        assert!(sp["duration"].as_u64().is_some_and(|d| d >= 1), "{sp}");
        assert_eq!(sp["id"].as_str().map(str::len), Some(16), "{sp}");
    }
    let api = zipkin_find(&spans, T1, "http.request").unwrap();
    assert_eq!(api["parentId"], P1, "{api}");
    assert_eq!(api["kind"], "SERVER", "{api}");
    let tags = &api["tags"];
    assert_eq!(tags["http.request.method"], "GET", "{api}");
    assert_eq!(tags["url.path"], "/api/stats", "{api}");
    assert_eq!(tags["http.response.status_code"], "200", "{api}");
    assert!(tags["shard"].as_str().is_some(), "{api}");
    let rest = zipkin_find(&spans, T6, "http.request").unwrap();
    assert_eq!(rest["parentId"], P6, "{rest}");
    assert_eq!(
        rest["tags"]["url.path"], "/api/v1/messages/threads",
        "{rest}"
    );
    assert_eq!(rest["tags"]["enduser.id"], "alice", "{rest}");
    assert_eq!(rest["tags"]["http.response.status_code"], "200", "{rest}");
    let b3_api = zipkin_find(&spans, T3, "http.request").unwrap();
    assert_eq!(b3_api["parentId"], P3, "{b3_api}");
    let up = zipkin_find(&spans, T2, "ws.upgrade").unwrap();
    assert_eq!(up["parentId"], P2, "{up}");
    assert_eq!(up["tags"]["url.path"], "/ws", "{up}");
    assert_eq!(up["tags"]["http.response.status_code"], "101", "{up}");
    // The 401 (multi-header B3) is in the same trace as the upgrade, as its own span.
    let refused = spans
        .iter()
        .find(|s| s["traceId"] == T2 && s["name"] == "http.request")
        .expect("the refused request's span");
    assert_eq!(
        refused["tags"]["http.response.status_code"], "401",
        "{refused}"
    );
    assert_eq!(refused["parentId"], P2);
    // The DM: one trace, dm.send the root, store.append its child, within its time.
    let dm = spans
        .iter()
        .find(|s| s["name"] == "dm.send" && s["tags"]["message.id"] == msg_id.as_str())
        .unwrap_or_else(|| panic!("no dm.send for {msg_id}: {spans:?}"));
    assert!(dm.get("parentId").is_none(), "{dm}");
    assert_eq!(dm["tags"]["enduser.id"], "alice", "{dm}");
    let store = spans
        .iter()
        .find(|s| s["name"] == "store.append" && s["parentId"] == dm["id"])
        .unwrap_or_else(|| panic!("no store.append under {dm}: {spans:?}"));
    assert_eq!(store["traceId"], dm["traceId"]);
    let (dm_t, dm_d) = (
        dm["timestamp"].as_u64().unwrap(),
        dm["duration"].as_u64().unwrap(),
    );
    let st_t = store["timestamp"].as_u64().unwrap();
    assert!(st_t >= dm_t && st_t <= dm_t + dm_d, "{dm} {store}");
    let dm5 = zipkin_find(&spans, T5, "dm.send").unwrap();
    assert_eq!(dm5["parentId"], P5, "{dm5}");
    // bob's shard's part of the delivery, to its socket write.
    let d5 = zipkin_find(&spans, T5, "shard.deliver").unwrap();
    assert_eq!(d5["parentId"], dm5["id"], "{d5}");
    assert!(
        zipkin_spans(&stub).iter().any(|s| s["traceId"] == T5
            && s["name"] == "store.append"
            && s["parentId"] == dm5["id"]),
        "no store.append in the client's trace"
    );

    // Log lines inside the upgrade's span carry its ids (text format).
    let logs = s.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("connected") && l.contains(&format!("trace_id={T2}")))
        .unwrap_or_else(|| panic!("no log line with the upgrade's trace id:\n{logs}"));
    let up_id = up["id"].as_str().unwrap();
    assert!(line.contains(&format!("span_id={up_id}")), "{line}");
    alice.close();
}

/// B3 on the upgrade request, in both forms: the `ws.upgrade` span continues the caller's
/// trace with the caller's span as its parent (as `traceparent` does above).
#[test]
fn b3_headers_on_the_upgrade_are_continued() {
    let stub = collector("/api/v2/spans");
    let s = server("zipkin", &stub.url("/api/v2/spans"), &[]);
    let single = format!("{T7}-{P7}-1");
    let a = s.connect_with("/ws?user_id=ann", &[("b3", &single)]);
    let b = s.connect_with(
        "/ws?user_id=ben",
        &[
            ("X-B3-TraceId", T8),
            ("X-B3-SpanId", P8),
            ("X-B3-Sampled", "1"),
        ],
    );
    let spans = wait_for(
        "both upgrades' spans",
        || zipkin_spans(&stub),
        |spans| {
            zipkin_find(spans, T7, "ws.upgrade").is_some()
                && zipkin_find(spans, T8, "ws.upgrade").is_some()
        },
    );
    for (t, parent, user) in [(T7, P7, "ann"), (T8, P8, "ben")] {
        let up = zipkin_find(&spans, t, "ws.upgrade").unwrap();
        assert_eq!(up["parentId"], parent, "{up}");
        assert_eq!(up["kind"], "SERVER", "{up}");
        assert_eq!(up["tags"]["url.path"], "/ws", "{up}");
        assert_eq!(up["tags"]["enduser.id"], user, "{up}");
        assert_eq!(up["tags"]["http.response.status_code"], "101", "{up}");
    }
    a.close();
    b.close();
}

#[test]
fn otlp_spans_and_json_logs() {
    let stub = collector("/v1/traces");
    let s = server(
        "otlp",
        &stub.url("/v1/traces"),
        &[("SWITCHBOARD_LOG_FORMAT", "json")],
    );
    let tp1 = format!("00-{T1}-{P1}-01");
    assert_eq!(stats(&s, &[("traceparent", &tp1)]), 200);
    let tp2 = format!("00-{T2}-{P2}-01");
    let mut c = s.connect_with("/ws?user_id=bob", &[("traceparent", &tp2)]);
    // A direct message continuing the client's trace: dm.send and its store.append child.
    let tp5 = format!("00-{T5}-{P5}-01");
    c.send_json(json!({"type": "message.send", "clientMsgId": "o-1", "to": "carol", "content": "hi", "traceparent": tp5}));
    let ack = c.expect_type("message.ack");
    let msg_id = ack["data"]["serverMsgId"]
        .as_str()
        .expect("serverMsgId")
        .to_owned();
    let named = |spans: &[(String, Value)], t: &str, n: &str| {
        spans
            .iter()
            .any(|(_, s)| s["traceId"] == t && s["name"] == n)
    };
    let spans = wait_for(
        "the API, upgrade and DM spans",
        || otlp_spans(&stub),
        |spans| {
            spans.iter().any(|(_, s)| s["traceId"] == T1)
                && spans.iter().any(|(_, s)| s["traceId"] == T2)
                && named(spans, T5, "dm.send")
                && named(spans, T5, "store.append")
        },
    );
    let attr = |s: &Value, k: &str| -> Value {
        s["attributes"]
            .as_array()
            .expect("attributes")
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
            .unwrap_or(Value::Null)
    };
    let (service, api) = spans.iter().find(|(_, s)| s["traceId"] == T1).unwrap();
    assert_eq!(service, "sb-test");
    assert_eq!(api["name"], "http.request", "{api}");
    assert_eq!(api["parentSpanId"], P1, "{api}");
    assert_eq!(api["kind"], 2, "{api}");
    let start: u64 = api["startTimeUnixNano"]
        .as_str()
        .expect("a string")
        .parse()
        .unwrap();
    let end: u64 = api["endTimeUnixNano"]
        .as_str()
        .expect("a string")
        .parse()
        .unwrap();
    assert!(start > 1_600_000_000_000_000_000 && end >= start, "{api}");
    assert_eq!(
        attr(api, "http.request.method"),
        json!({"stringValue": "GET"})
    );
    assert_eq!(
        attr(api, "http.response.status_code"),
        json!({"intValue": "200"})
    );
    let (_, up) = spans.iter().find(|(_, s)| s["traceId"] == T2).unwrap();
    assert_eq!(up["name"], "ws.upgrade");
    assert_eq!(up["parentSpanId"], P2);
    assert_eq!(
        attr(up, "enduser.id"),
        json!({"stringValue": "bob"}),
        "{up}"
    );
    assert_eq!(
        attr(up, "http.response.status_code"),
        json!({"intValue": "101"})
    );
    assert_eq!(up["kind"], 2, "{up}");
    assert_eq!(attr(up, "url.path"), json!({"stringValue": "/ws"}), "{up}");
    assert!(attr(up, "shard")["intValue"].as_str().is_some(), "{up}");

    // Our own spans link to each other by parentSpanId: dm.send (SERVER, 2) under the
    // client's span, store.append (INTERNAL, 1) under dm.send, in dm.send's time.
    let find = |t: &str, n: &str| -> &Value {
        spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s["traceId"] == t && s["name"] == n)
            .unwrap_or_else(|| panic!("no {n} in {t}: {spans:?}"))
    };
    let dm = find(T5, "dm.send");
    assert_eq!(dm["parentSpanId"], P5, "{dm}");
    assert_eq!(dm["kind"], 2, "{dm}");
    assert_eq!(
        attr(dm, "enduser.id"),
        json!({"stringValue": "bob"}),
        "{dm}"
    );
    assert_eq!(
        attr(dm, "message.id"),
        json!({"stringValue": msg_id}),
        "{dm}"
    );
    assert!(attr(dm, "shard")["intValue"].as_str().is_some(), "{dm}");
    assert!(dm.get("status").is_none(), "{dm}");
    let store = find(T5, "store.append");
    assert_eq!(store["parentSpanId"], dm["spanId"], "{store}");
    assert_ne!(store["spanId"], dm["spanId"], "{store}");
    assert_eq!(store["kind"], 1, "{store}");
    let n = attr(store, "batch.size");
    let n: u64 = n["intValue"]
        .as_str()
        .unwrap_or_else(|| panic!("batch.size is not an intValue: {store}"))
        .parse()
        .unwrap();
    assert!(n >= 1, "{store}");
    let ns = |s: &Value, k: &str| -> u64 { s[k].as_str().expect("a string").parse().unwrap() };
    assert!(
        ns(store, "startTimeUnixNano") >= ns(dm, "startTimeUnixNano")
            && ns(store, "endTimeUnixNano") <= ns(dm, "endTimeUnixNano"),
        "{dm} {store}"
    );

    // JSON log lines inside the upgrade's span have the ids as top-level fields.
    let logs = s.logs();
    let line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["trace_id"] == T2 && v["message"] == "connected")
        .unwrap_or_else(|| panic!("no JSON log line with the upgrade's trace id:\n{logs}"));
    assert_eq!(line["span_id"], up["spanId"], "{line}");
    // Every line is still one JSON object.
    for l in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
    c.close();
}

#[test]
fn a_collector_that_is_down_costs_spans_not_service() {
    let s = server("otlp", &closed_url("/v1/traces"), &[]);
    for i in 0..20 {
        let tp = format!("00-{T1}-{:016x}-01", i + 1);
        assert_eq!(stats(&s, &[("traceparent", &tp)]), 200);
    }
    s.assert_serving();
    let text = s.wait_metrics("dropped spans", |t| {
        metric(t, "switchboard_trace_spans_dropped_total").is_some_and(|n| n >= 20)
    });
    assert!(
        metric(&text, "switchboard_trace_export_failures_total").is_some_and(|n| n >= 1),
        "{text}"
    );
    assert_eq!(
        metric(&text, "switchboard_trace_spans_exported_total"),
        Some(0)
    );
    assert!(text.contains("switchboard_trace_spans_dropped_total{reason=\"export_failed\"}"));
    // Still serving, after the failures.
    assert_eq!(stats(&s, &[]), 200);
    s.assert_serving();
    assert!(s
        .logs()
        .contains("trace exporter: the collector did not take spans"));
}

/// A collector that takes the connection and never answers (a hung collector), with a long
/// `trace_export_timeout`: the exporter's one request holds its batch, nothing drains, and
/// the queue fills to [`TRACE_QUEUE_SPANS_MAX`] and drops the rest, counted as `queue_full`.
/// Every publish at ratio 1.0 is a sampled `room.publish` span, so publishing well past the
/// bound plus the one batch in flight must drop; the queue gauge never passes the bound, and
/// the node answers a ping and delivers a publish promptly while the collector still hangs.
/// The bound has no config key (a fixed limit, `src/limits.rs`, not worth a knob: a slower
/// collector wants a shorter `trace_export_interval` or a larger `trace_export_batch_max`), so
/// the test makes twice the bound in spans: a debug build publishes 16,384 in about a second.
#[test]
fn a_hung_collector_fills_the_queue_to_its_bound_and_no_further() {
    use switchboard::limits::TRACE_QUEUE_SPANS_MAX as BOUND;
    const BATCH: usize = 512;
    const PUBLISHES: usize = 2 * BOUND;
    const CHUNK: usize = 500;
    // Accepted by the kernel (the listen backlog), never read, never answered.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1/traces", hung.local_addr().unwrap());
    let batch = BATCH.to_string();
    let s = server(
        "otlp",
        &endpoint,
        &[
            ("SWITCHBOARD_TRACE_EXPORT_TIMEOUT", "60s"),
            ("SWITCHBOARD_TRACE_EXPORT_BATCH_MAX", &batch),
            ("SWITCHBOARD_RATE_LIMIT_PER_SEC", "1000000"),
            ("SWITCHBOARD_RATE_LIMIT_BURST", "1000000"),
            ("SWITCHBOARD_LOG_LEVEL", "info"),
        ],
    );
    let queued = |t: &str| metric(t, "switchboard_trace_queue_spans").expect("the queue gauge");
    let queue_full = |t: &str| {
        t.lines()
            .find_map(|l| {
                l.strip_prefix("switchboard_trace_spans_dropped_total{reason=\"queue_full\"} ")
            })
            .map(|v| v.trim().parse::<u64>().expect("a count"))
            .unwrap_or_else(|| panic!("no queue_full drop counter:\n{t}"))
    };
    let mut pubr = s.connect("/ws?user_id=flood");
    pubr.subscribe("flood");
    let mut sent = 0;
    while sent < PUBLISHES {
        let n = CHUNK.min(PUBLISHES - sent);
        for i in sent..sent + n {
            pubr.send_json(json!({"type": "publish", "room": "flood", "data": {"n": i}}));
        }
        // Our own copies back, so the publisher's send queue never fills.
        for _ in 0..n {
            pubr.expect_type("message");
        }
        sent += n;
        let (_, text) = s.http_get("/metrics");
        assert!(
            queued(&text) <= BOUND as u64,
            "the queue passed its bound after {sent} publishes:\n{text}"
        );
    }
    let text = s.wait_metrics("the spans made past the bound dropped", |t| {
        queue_full(t) >= (PUBLISHES - BOUND - BATCH) as u64
    });
    // Nothing drains while the one request hangs: the queue is exactly full.
    assert_eq!(queued(&text), BOUND as u64, "{text}");
    assert_eq!(
        metric(&text, "switchboard_trace_spans_exported_total"),
        Some(0),
        "{text}"
    );
    // The request has not failed yet (60 s): the collector hangs, it does not refuse.
    assert_eq!(
        metric(&text, "switchboard_trace_export_failures_total"),
        Some(0),
        "{text}"
    );

    // Still serving, promptly, while the collector hangs and the queue stays full.
    let t0 = Instant::now();
    let mut c = s.connect("/ws?user_id=late");
    c.send_json(json!({"type": "ping", "id": "p"}));
    assert_eq!(c.expect_type("pong")["id"], "p");
    let mut sub = s.connect("/ws?user_id=sub");
    sub.subscribe("after");
    c.subscribe("after");
    c.send_json(json!({"type": "publish", "room": "after", "data": {"n": 1}}));
    assert_eq!(sub.expect_type("message")["data"]["n"], 1);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "serving took {took:?}");
    let (_, text) = s.http_get("/metrics");
    assert_eq!(queued(&text), BOUND as u64, "{text}");
    drop(hung);
    pubr.close();
    c.close();
    sub.close();
}

/// Two nodes and one Redis: a client's publish on node A to a room with a subscriber on
/// node B is one trace, `room.publish` (A, under the client's `traceparent` field) ->
/// `redis.publish` (A, until Redis answers) -> `redis.receive` (B, to the hand-off to its
/// shards) -> `shard.deliver` (B, to the socket write); a server API publish likewise under
/// its `http.request`. Untraced publishes cross
/// in version-1 envelopes, as before.
#[test]
fn a_cross_node_publish_is_one_trace() {
    use common::redis::RedisServer;
    let stub = collector("/api/v2/spans");
    let redis = RedisServer::start();
    let url = redis.url();
    let endpoint = stub.url("/api/v2/spans");
    let extra = [("SWITCHBOARD_REDIS_URL", url.as_str())];
    let a = server("zipkin", &endpoint, &extra);
    let b = server("zipkin", &endpoint, &extra);
    a.wait_ready();
    b.wait_ready();
    let mut bob = b.connect("/ws?user_id=bob");
    bob.subscribe("lobby");
    let mut alice = a.connect("/ws?user_id=alice");
    alice.subscribe("lobby");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub("sb:{room:lobby}") != 2 {
        assert!(Instant::now() < deadline, "both nodes never held the room");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tp1 = format!("00-{T1}-{P1}-01");
    alice.send_json(
        json!({"type": "publish", "room": "lobby", "data": {"n": 1}, "traceparent": tp1}),
    );
    assert_eq!(alice.expect_type("message")["data"]["n"], 1);
    assert_eq!(bob.expect_type("message")["data"]["n"], 1);
    let tp3 = format!("00-{T3}-{P3}-01");
    let (status, _) = http_json(
        &a,
        "POST",
        "/api/publish",
        &[("X-API-Key", KEY), ("traceparent", &tp3)],
        Some(&json!({"room": "lobby", "data": {"n": 2}})),
        false,
    );
    assert_eq!(status, 200);
    assert_eq!(bob.expect_type("message")["data"]["n"], 2);
    let names = ["redis.publish", "redis.receive"];
    let spans = wait_for(
        "both publishes' spans on both nodes",
        || zipkin_spans(&stub),
        |spans| {
            [T1, T3]
                .iter()
                .all(|t| names.iter().all(|n| zipkin_find(spans, t, n).is_some()))
                && zipkin_find(spans, T1, "room.publish").is_some()
                && zipkin_find(spans, T3, "http.request").is_some()
                && zipkin_find(spans, T1, "shard.deliver").is_some()
        },
    );
    let publish = zipkin_find(&spans, T1, "room.publish").unwrap();
    assert_eq!(publish["parentId"], P1, "{publish}");
    assert_eq!(publish["kind"], "SERVER", "{publish}");
    assert_eq!(publish["tags"]["messaging.destination.name"], "lobby");
    assert_eq!(publish["tags"]["enduser.id"], "alice");
    let api = zipkin_find(&spans, T3, "http.request").unwrap();
    for (t, parent) in [(T1, publish), (T3, api)] {
        let out = zipkin_find(&spans, t, "redis.publish").unwrap();
        assert_eq!(out["parentId"], parent["id"], "{out}");
        assert_eq!(out["kind"], "PRODUCER", "{out}");
        assert_eq!(out["tags"]["messaging.system"], "redis");
        assert_eq!(out["tags"]["messaging.destination.name"], "sb:{room:lobby}");
        assert!(
            out.get("tags").and_then(|t| t.get("error")).is_none(),
            "{out}"
        );
        let inn = zipkin_find(&spans, t, "redis.receive").unwrap();
        assert_eq!(inn["parentId"], out["id"], "{inn}");
        assert_eq!(inn["kind"], "CONSUMER", "{inn}");
        assert_eq!(inn["tags"]["messaging.system"], "redis");
        assert_eq!(
            inn["tags"]["origin.node"].as_str().map(str::len),
            Some(8),
            "{inn}"
        );
    }
    // On B, the shard holding bob: its part, to the turn's socket writes.
    let inn = zipkin_find(&spans, T1, "redis.receive").unwrap();
    let d = zipkin_find(&spans, T1, "shard.deliver").unwrap();
    assert_eq!(d["parentId"], inn["id"], "{d}");
    // One receive per publish: node A drops its own envelopes by the origin id.
    assert_eq!(
        spans
            .iter()
            .filter(|x| x["traceId"] == T1 && x["name"] == "redis.receive")
            .count(),
        1
    );
    bob.close();
    alice.close();
}

/// A room with history across nodes: Redis sequences the message (the append script), and
/// the trace goes with it: the publisher's `room.publish` (on whichever shard owns the room:
/// the publish is handed there with its span), the append's `redis.publish` until Redis
/// answers, and on every node, the origin too (it delivers when Redis says), a
/// `redis.receive` whose `shard.deliver` is the owner shard's delivery.
#[test]
fn a_cross_node_publish_into_a_room_with_history_is_one_trace() {
    use common::redis::RedisServer;
    let stub = collector("/api/v2/spans");
    let redis = RedisServer::start();
    let url = redis.url();
    let endpoint = stub.url("/api/v2/spans");
    // Ratio 0, every caller's flag followed: only a publish that asks is traced, so the
    // second, plain one below must leave no span at all.
    let extra = [
        ("SWITCHBOARD_REDIS_URL", url.as_str()),
        (
            "SWITCHBOARD_ROOMS",
            r#"[{"pattern": "h-*", "history_size": 10}]"#,
        ),
        ("SWITCHBOARD_TRACE_SAMPLE_RATIO", "0"),
        ("SWITCHBOARD_TRACE_PARENT_SAMPLED", "all"),
    ];
    let a = server("zipkin", &endpoint, &extra);
    let b = server("zipkin", &endpoint, &extra);
    a.wait_ready();
    b.wait_ready();
    let mut bob = b.connect("/ws?user_id=bob");
    bob.subscribe("h-lobby");
    let mut alice = a.connect("/ws?user_id=alice");
    alice.subscribe("h-lobby");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.numsub("sb:{room:h-lobby}") != 2 {
        assert!(Instant::now() < deadline, "both nodes never held the room");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tp = format!("00-{T9}-{P9}-01");
    alice.send_json(
        json!({"type": "publish", "room": "h-lobby", "data": {"n": 1}, "traceparent": tp}),
    );
    let got = alice.expect_type("message");
    assert_eq!(
        (got["data"]["n"].as_u64(), got["offset"].as_u64()),
        (Some(1), Some(1))
    );
    let got = bob.expect_type("message");
    assert_eq!(
        (got["data"]["n"].as_u64(), got["offset"].as_u64()),
        (Some(1), Some(1))
    );
    let count = |spans: &[Value], name: &str| {
        spans
            .iter()
            .filter(|x| x["traceId"] == T9 && x["name"] == name)
            .count()
    };
    let spans = wait_for(
        "the history publish's spans on both nodes",
        || zipkin_spans(&stub),
        |spans| {
            zipkin_find(spans, T9, "room.publish").is_some()
                && zipkin_find(spans, T9, "redis.publish").is_some()
                && count(spans, "redis.receive") == 2
                && count(spans, "shard.deliver") == 2
        },
    );
    let publish = zipkin_find(&spans, T9, "room.publish").unwrap();
    assert_eq!(publish["parentId"], P9, "{publish}");
    assert_eq!(publish["tags"]["messaging.destination.name"], "h-lobby");
    let out = zipkin_find(&spans, T9, "redis.publish").unwrap();
    assert_eq!(out["parentId"], publish["id"], "{out}");
    assert_eq!(out["kind"], "PRODUCER", "{out}");
    assert_eq!(
        out["tags"]["messaging.destination.name"], "sb:{room:h-lobby}",
        "{out}"
    );
    assert!(
        out.get("tags").and_then(|t| t.get("error")).is_none(),
        "{out}"
    );
    let receives: Vec<&Value> = spans
        .iter()
        .filter(|x| x["traceId"] == T9 && x["name"] == "redis.receive")
        .collect();
    for inn in &receives {
        assert_eq!(inn["parentId"], out["id"], "{inn}");
        assert_eq!(inn["kind"], "CONSUMER", "{inn}");
        assert_eq!(
            inn["tags"]["messaging.destination.name"], "h-lobby",
            "{inn}"
        );
        assert_eq!(
            inn["tags"]["messaging.message.id"], "1",
            "the offset: {inn}"
        );
        let d = spans
            .iter()
            .find(|x| x["name"] == "shard.deliver" && x["parentId"] == inn["id"])
            .unwrap_or_else(|| panic!("no shard.deliver under {inn}"));
        assert_eq!(d["traceId"], T9, "{d}");
    }
    assert_ne!(receives[0]["id"], receives[1]["id"]);
    // An untraced publish into the room makes no span anywhere (a version-1 envelope): the
    // only redis.receive spans in the collector stay the traced one's two.
    alice.send_json(json!({"type": "publish", "room": "h-lobby", "data": {"n": 2}}));
    assert_eq!(bob.expect_type("message")["offset"], 2);
    assert_eq!(alice.expect_type("message")["offset"], 2);
    std::thread::sleep(Duration::from_millis(500));
    let after = zipkin_spans(&stub);
    let receives: Vec<&Value> = after
        .iter()
        .filter(|x| x["name"] == "redis.receive")
        .collect();
    assert_eq!(receives.len(), 2, "only the traced publish's: {receives:?}");
    assert!(
        after
            .iter()
            .all(|x| x["tags"]["messaging.message.id"] != "2"),
        "a span of the untraced publish"
    );
    bob.close();
    alice.close();
}

/// At ratio 0, only the API key's holder can ask for a trace: an end user's sampled flag, on
/// the upgrade, on `message.send` and on a REST request, is not followed (default
/// `trace_parent_sampled` = api), so no client can make the node record its traffic.
#[test]
fn an_end_user_cannot_force_a_trace() {
    let stub = collector("/api/v2/spans");
    let s = server(
        "zipkin",
        &stub.url("/api/v2/spans"),
        &[("SWITCHBOARD_TRACE_SAMPLE_RATIO", "0")],
    );
    let tp2 = format!("00-{T2}-{P2}-01");
    let mut alice = s.connect_with("/ws?user_id=alice", &[("traceparent", &tp2)]);
    let tp5 = format!("00-{T5}-{P5}-01");
    alice.send_json(json!({"type": "message.send", "clientMsgId": "c-1", "to": "bob", "content": "hi", "traceparent": tp5}));
    alice.expect_type("message.ack");
    let tp6 = format!("00-{T6}-{P6}-01");
    let rest = http_json(
        &s,
        "GET",
        "/api/v1/messages/threads",
        &[("X-User-Id", "alice"), ("traceparent", &tp6)],
        None,
        false,
    );
    assert_eq!(rest.0, 200, "{rest:?}");
    let wrong_key = http_json(
        &s,
        "GET",
        "/api/stats",
        &[("X-API-Key", "nope"), ("b3", &format!("{T4}-{P1}-1"))],
        None,
        false,
    );
    assert_eq!(wrong_key.0, 401);
    // The trusted caller last: once its span is in, the others would have been too.
    let tp1 = format!("00-{T1}-{P1}-01");
    assert_eq!(stats(&s, &[("traceparent", &tp1)]), 200);
    let spans = wait_for(
        "the API key holder's span",
        || zipkin_spans(&stub),
        |spans| zipkin_find(spans, T1, "http.request").is_some(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let spans = zipkin_spans(&stub)
        .into_iter()
        .chain(spans)
        .collect::<Vec<_>>();
    for t in [T2, T4, T5, T6] {
        assert!(
            spans.iter().all(|x| x["traceId"] != t),
            "an end user's flag started trace {t}: {spans:?}"
        );
    }
    let text = s.wait_metrics("the sampled count", |t| {
        metric(t, "switchboard_trace_traces_sampled_total").is_some()
    });
    assert_eq!(
        metric(&text, "switchboard_trace_traces_sampled_total"),
        Some(1),
        "{text}"
    );
    alice.close();
}

#[test]
fn tracing_off_shows_nothing() {
    let s = TestServer::start(&[("SWITCHBOARD_API_KEY", KEY)]);
    let tp = format!("00-{T1}-{P1}-01");
    assert_eq!(stats(&s, &[("traceparent", &tp)]), 200);
    let (_, text) = s.http_get("/metrics");
    assert!(!text.contains("switchboard_trace_"), "{text}");
    assert!(!s.logs().contains("trace_id"));
}

#[test]
fn the_jwt_check_is_a_child_of_the_upgrade() {
    use common::jwt;
    let stub = collector("/api/v2/spans");
    let s = server(
        "zipkin",
        &stub.url("/api/v2/spans"),
        &[
            ("SWITCHBOARD_AUTH_MODE", "jwt"),
            ("SWITCHBOARD_JWT_SECRET", jwt::SECRET),
        ],
    );
    let now = common::now_s() as i64;
    let good = jwt::hs256(&json!({"sub": "carol", "iat": now, "exp": now + 300}));
    let tp = format!("00-{T1}-{P1}-01");
    let auth = format!("Bearer {good}");
    let c = s.connect_with("/ws", &[("traceparent", &tp), ("Authorization", &auth)]);
    let bad = format!("Bearer {}x", good);
    let tp3 = format!("00-{T3}-{P3}-01");
    let r = s.raw_upgrade("/ws", &[("traceparent", &tp3), ("Authorization", &bad)]);
    assert_eq!(r.status, 401);
    let spans = wait_for(
        "the upgrade and auth spans",
        || zipkin_spans(&stub),
        |spans| {
            [T1, T3].iter().all(|t| {
                zipkin_find(spans, t, "ws.upgrade").is_some()
                    && zipkin_find(spans, t, "auth").is_some()
            })
        },
    );
    let up = zipkin_find(&spans, T1, "ws.upgrade").unwrap();
    let check = zipkin_find(&spans, T1, "auth").unwrap();
    assert_eq!(check["parentId"], up["id"], "{check}");
    assert_eq!(check["tags"]["auth.mode"], "jwt");
    assert_eq!(check["tags"]["auth.result"], "ok");
    assert_eq!(up["tags"]["enduser.id"], "carol");
    let refused = zipkin_find(&spans, T3, "ws.upgrade").unwrap();
    assert_eq!(
        refused["tags"]["http.response.status_code"], "401",
        "{refused}"
    );
    let check = zipkin_find(&spans, T3, "auth").unwrap();
    assert_eq!(check["parentId"], refused["id"]);
    assert_ne!(check["tags"]["auth.result"], "ok", "{check}");
    c.close();
}

/// Kafka (librdkafka's in-process mock cluster): a traced DM's record carries a `traceparent`
/// naming its `kafka.produce` span (child of `dm.send`), and a notification record that
/// carries one is handled in a `kafka.notify` span of that trace, with the recipient shard's
/// `shard.deliver` under it.
#[test]
fn kafka_records_carry_the_trace_on() {
    use common::kafka::{self, Mock};
    let mock = Mock::start(1);
    mock.create_topic("dm-trace", 1);
    mock.create_topic("trace.joined", 1);
    mock.create_topic("trace-dlq", 1);
    let stub = collector("/api/v2/spans");
    let bootstrap = mock.bootstrap();
    let rules = json!([
        {"topic": "trace.joined", "room": "/community", "kind": "user.joined", "data": ["/userId"]},
    ])
    .to_string();
    let group = kafka::unique_group("trace");
    let s = server(
        "zipkin",
        &stub.url("/api/v2/spans"),
        &[
            ("SWITCHBOARD_KAFKA_BROKERS", &bootstrap),
            ("SWITCHBOARD_KAFKA_DM_TOPIC", "dm-trace"),
            ("SWITCHBOARD_KAFKA_NOTIFICATIONS", &rules),
            ("SWITCHBOARD_KAFKA_GROUP_ID", &group),
            ("SWITCHBOARD_KAFKA_DEAD_LETTER_TOPIC", "trace-dlq"),
            ("SWITCHBOARD_KAFKA_FROM_BEGINNING", "true"),
            ("SWITCHBOARD_KAFKA_SESSION_TIMEOUT", "3s"),
        ],
    );
    s.wait_ready();
    let mut alice = s.connect("/ws?user_id=alice");
    let mut acked = false;
    for i in 0..20 {
        alice.send_json(json!({"type": "message.send", "clientMsgId": format!("k-{i}"), "to": "bob", "content": "hi"}));
        let v = alice.recv_json();
        if v["type"] == "message.ack" {
            acked = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(acked, "no DM acked through the mock broker");
    let recs = kafka::read_all(&bootstrap, "dm-trace", 1, kafka::READ_TIMEOUT);
    let tp = recs
        .iter()
        .rev()
        .find_map(|r| r.header("traceparent"))
        .unwrap_or_else(|| panic!("no traceparent header: {recs:?}"))
        .to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{tp}");
    let (trace, parent) = (parts[1].to_owned(), parts[2].to_owned());
    let spans = wait_for(
        "the kafka.produce span the header names",
        || zipkin_spans(&stub),
        |spans| spans.iter().any(|s| s["id"] == parent.as_str()),
    );
    let produce = spans.iter().find(|s| s["id"] == parent.as_str()).unwrap();
    assert_eq!(produce["name"], "kafka.produce", "{produce}");
    assert_eq!(produce["traceId"], trace.as_str());
    assert_eq!(produce["kind"], "PRODUCER");
    assert_eq!(produce["tags"]["messaging.destination.name"], "dm-trace");
    let dm = zipkin_find(&spans, &trace, "dm.send").expect("the dm.send span");
    assert_eq!(produce["parentId"], dm["id"]);

    // A notification record with the producer's context.
    let mut ann = s.connect("/ws?user_id=ann");
    ann.subscribe("c1");
    let tp3 = format!("00-{T3}-{P3}-01");
    kafka::produce(
        &bootstrap,
        "trace.joined",
        None,
        r#"{"userId":"dan","community":"c1"}"#,
        &[("traceparent", &tp3)],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no notification within 30 s");
        match ann.next_event(left) {
            common::Event::Json(v) if v["type"] == "notification" => break,
            common::Event::Close(..) | common::Event::Closed(_) => panic!("ann was closed"),
            _ => {}
        }
    }
    let spans = wait_for(
        "the kafka.notify span and its shard's part",
        || zipkin_spans(&stub),
        |spans| {
            zipkin_find(spans, T3, "kafka.notify").is_some()
                && zipkin_find(spans, T3, "shard.deliver").is_some()
        },
    );
    let n = zipkin_find(&spans, T3, "kafka.notify").unwrap();
    assert_eq!(n["parentId"], P3, "{n}");
    assert_eq!(n["kind"], "CONSUMER");
    assert_eq!(n["tags"]["messaging.destination.name"], "trace.joined");
    // To the socket write: the shard that holds ann ends its span after the turn's writes.
    let d = zipkin_find(&spans, T3, "shard.deliver").unwrap();
    assert_eq!(d["parentId"], n["id"], "{d}");
    assert!(d["tags"]["shard"].as_str().is_some(), "{d}");

    // Records with B3 headers instead, single and multi: continued the same way.
    let single = format!("{T5}-{P5}-1");
    let multi = [
        ("X-B3-TraceId", T6),
        ("X-B3-SpanId", P6),
        ("X-B3-Sampled", "1"),
    ];
    for (user, headers) in [("eve", &[("b3", single.as_str())][..]), ("fay", &multi[..])] {
        let payload = json!({"userId": user, "community": "c1"}).to_string();
        kafka::produce(&bootstrap, "trace.joined", None, &payload, headers);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no notification for {user} within 30 s");
            match ann.next_event(left) {
                common::Event::Json(v) if v["type"] == "notification" => break,
                common::Event::Close(..) | common::Event::Closed(_) => panic!("ann was closed"),
                _ => {}
            }
        }
    }
    let spans = wait_for(
        "the B3 records' kafka.notify spans",
        || zipkin_spans(&stub),
        |spans| {
            [T5, T6].iter().all(|t| {
                zipkin_find(spans, t, "kafka.notify").is_some()
                    && zipkin_find(spans, t, "shard.deliver").is_some()
            })
        },
    );
    for (t, parent) in [(T5, P5), (T6, P6)] {
        let n = zipkin_find(&spans, t, "kafka.notify").unwrap();
        assert_eq!(n["parentId"], parent, "{n}");
        assert_eq!(n["kind"], "CONSUMER", "{n}");
        assert_eq!(n["tags"]["messaging.destination.name"], "trace.joined");
        let d = zipkin_find(&spans, t, "shard.deliver").unwrap();
        assert_eq!(d["parentId"], n["id"], "{d}");
    }
    alice.close();
    ann.close();
}
