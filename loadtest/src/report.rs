//! The result of a run: ordered rows printed as a table for people and as one JSON line for
//! scripts, plus the failures that make the exit code nonzero.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// Ordered results of one scenario.
pub struct Report {
    pub scenario: &'static str,
    /// Name of the run (`--label`), empty when none.
    pub label: String,
    rows: Vec<(String, Value)>,
    /// Problems the user must see; any makes the exit code 1.
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            label: String::new(),
            rows: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn put(&mut self, key: &str, v: impl Into<Value>) {
        self.rows.push((key.to_string(), v.into()));
    }

    /// A float rounded to `digits` decimals (NaN/inf become null).
    pub fn put_f(&mut self, key: &str, v: f64, digits: i32) {
        let p = 10f64.powi(digits);
        let r = (v * p).round() / p;
        self.rows.push((
            key.to_string(),
            serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number),
        ));
    }

    /// Percentiles in microseconds of a nanosecond histogram, under `prefix_`.
    pub fn put_hist(&mut self, prefix: &str, h: &Histogram<u64>) {
        self.put(&format!("{prefix}_count"), h.len());
        if h.is_empty() {
            return;
        }
        for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)] {
            self.put_f(
                &format!("{prefix}_{name}_us"),
                h.value_at_quantile(q) as f64 / 1000.0,
                1,
            );
        }
        self.put_f(&format!("{prefix}_max_us"), h.max() as f64 / 1000.0, 1);
        self.put_f(&format!("{prefix}_mean_us"), h.mean() / 1000.0, 1);
    }

    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    /// The JSON line: scenario, every row in order, failures, ok.
    pub fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("scenario".into(), json!(self.scenario));
        if !self.label.is_empty() {
            m.insert("label".into(), json!(self.label));
        }
        for (k, v) in &self.rows {
            m.insert(k.clone(), v.clone());
        }
        m.insert("failures".into(), json!(self.failures));
        m.insert("ok".into(), json!(self.failures.is_empty()));
        Value::Object(m)
    }

    /// Human-readable table.
    pub fn table(&self) -> String {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut s = format!("== switchboard-load {} ==\n", self.scenario);
        for (k, v) in &self.rows {
            let val = match v {
                Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            s.push_str(&format!("  {k:<width$}  {val}\n"));
        }
        if self.failures.is_empty() {
            s.push_str("  result: OK\n");
        } else {
            s.push_str("  FAILURES:\n");
            for f in &self.failures {
                s.push_str(&format!("    - {f}\n"));
            }
        }
        s
    }
}

fn num(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 || f.abs() >= 100.0 {
                format!("{f:.0}")
            } else {
                format!("{f:.2}")
            }
        }
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn ms(v: &Value, key: &str) -> String {
    v[key]
        .as_f64()
        .map_or("-".into(), |us| format!("{:.2}", us / 1000.0))
}

/// (label, ok, headline numbers) of one JSON result line.
pub fn summary_row(v: &Value) -> (String, String, String) {
    let scenario = v["scenario"].as_str().unwrap_or("?");
    let label = v["label"].as_str().unwrap_or(scenario).to_string();
    let ok = if v["ok"].as_bool() == Some(true) {
        "ok".to_string()
    } else {
        "FAIL".to_string()
    };
    let conns = num(v, "connections");
    let text = match scenario {
        "connect" => format!(
            "{conns} conns: {} upgrades/s, all subscribed in {} s; handshake p50/p99 {}/{} ms; subscribe p50/p99 {}/{} ms; server {} CPU-us/conn",
            num(v, "upgrades_per_s"),
            num(v, "time_to_all_subscribed_s"),
            ms(v, "handshake_p50_us"),
            ms(v, "handshake_p99_us"),
            ms(v, "subscribe_p50_us"),
            ms(v, "subscribe_p99_us"),
            num(v, "server_cpu_us_per_conn")
        ),
        "idle" => format!(
            "{conns} conns: server RSS {} B/conn; kernel slab {} B/conn (both ends); idle CPU {} %",
            num(v, "server_rss_bytes_per_conn"),
            num(v, "kernel_slab_bytes_per_conn_both_ends"),
            num(v, "server_cpu_pct_idle")
        ),
        "fanout" => format!(
            "{} rooms x {} subs ({} slow) at {}/s: {} deliveries/s, lost {}, drain {} s; latency p50/p90/p99/p99.9/max {}/{}/{}/{}/{} ms; server {} CPU-us/delivery, {} % CPU; generator {} % CPU",
            num(v, "rooms"),
            num(v, "subscribers"),
            num(v, "slow_subscribers"),
            num(v, "rate_per_s"),
            num(v, "deliveries_per_s"),
            num(v, "lost"),
            num(v, "drain_waited_s"),
            ms(v, "latency_p50_us"),
            ms(v, "latency_p90_us"),
            ms(v, "latency_p99_us"),
            ms(v, "latency_p999_us"),
            ms(v, "latency_max_us"),
            num(v, "server_cpu_us_per_delivery"),
            num(v, "server_cpu_pct_run"),
            num(v, "generator_cpu_pct_run")
        ),
        "dm" => format!(
            "{} users x {} devices at {}/s: ack p50/p99 {}/{} ms; create p50/p99 {}/{} ms; {} of {} creates",
            num(v, "users"),
            num(v, "devices_per_user"),
            num(v, "rate_per_s"),
            ms(v, "ack_p50_us"),
            ms(v, "ack_p99_us"),
            ms(v, "create_p50_us"),
            ms(v, "create_p99_us"),
            num(v, "received_creates"),
            num(v, "expected_creates")
        ),
        "echo" => format!(
            "{conns} conns at {}/s: ping RTT p50/p99/p99.9 {}/{}/{} ms; {} of {} pongs",
            num(v, "rate_per_s"),
            ms(v, "rtt_p50_us"),
            ms(v, "rtt_p99_us"),
            ms(v, "rtt_p999_us"),
            num(v, "pongs"),
            num(v, "pings")
        ),
        "churn" => format!(
            "{} cycles x {} conns: back to baseline in {} ms; server RSS {} -> peak {} -> {} KiB, after each cycle {}",
            num(v, "cycles"),
            num(v, "connections_per_cycle"),
            v["cycle_back_to_baseline_ms"].as_str().unwrap_or("-"),
            num(v, "server_rss_before_kb"),
            num(v, "server_rss_peak_kb"),
            num(v, "server_rss_after_kb"),
            v["server_rss_after_each_cycle_kb"].as_str().unwrap_or("-")
        ),
        "history-resume" => format!(
            "{} subscribers resume a {}-message gap: all recovered in {} s; per subscriber p50/p99 {}/{} ms; {} of {} replayed, {} missing, {} duplicate; server {} CPU-us/resume",
            num(v, "subscribers"),
            num(v, "messages"),
            num(v, "time_to_all_recovered_s"),
            ms(v, "resume_p50_us"),
            ms(v, "resume_p99_us"),
            num(v, "replayed"),
            num(v, "expected_replayed"),
            num(v, "missing"),
            num(v, "duplicates"),
            num(v, "server_cpu_us_per_resume")
        ),
        "typing-storm" => format!(
            "{} typers in a room of {}: {} commands, {} events, {} frames saved by coalescing; start p50/p99 {}/{} ms; server {} CPU-us/event",
            num(v, "typers"),
            num(v, "members"),
            num(v, "commands_sent"),
            num(v, "events_received"),
            num(v, "frames_saved_by_coalescing"),
            ms(v, "typing_start_p50_us"),
            ms(v, "typing_start_p99_us"),
            num(v, "server_cpu_us_per_typing_event")
        ),
        "presence-churn" => format!(
            "{} watchers x {} churners at {}/s ({}): {} events/s; online p50/p99 {}/{} ms, offline p50/p99 {}/{} ms (grace {} s); server {} CPU-us/change",
            num(v, "watchers"),
            num(v, "churners"),
            num(v, "reconnects_per_s_target"),
            v["mode"].as_str().unwrap_or("-"),
            num(v, "events_per_s"),
            ms(v, "online_p50_us"),
            ms(v, "online_p99_us"),
            ms(v, "offline_p50_us"),
            ms(v, "offline_p99_us"),
            num(v, "grace_s"),
            num(v, "server_cpu_us_per_change")
        ),
        "rest-read" => format!(
            "{conns} conns, {} mode{}, {}: {} req/s, latency p50/p90/p99/max {}/{}/{}/{} ms; {} errors; server {} CPU-us/request",
            v["mode"].as_str().unwrap_or("-"),
            if v["mode"].as_str() == Some("open") {
                format!(" at {}/s", num(v, "rate_per_s"))
            } else {
                String::new()
            },
            match v["get"].as_str() {
                Some(p) => format!("GET {p}"),
                None => format!(
                    "pages of {} from {} messages{}",
                    num(v, "limit"),
                    num(v, "messages"),
                    if v["walk"].as_bool() == Some(true) { " (walk)" } else { "" }
                ),
            },
            num(v, "requests_per_s"),
            ms(v, "latency_p50_us"),
            ms(v, "latency_p90_us"),
            ms(v, "latency_p99_us"),
            ms(v, "latency_max_us"),
            num(v, "errors"),
            num(v, "server_cpu_us_per_request")
        ),
        "saturation" => format!(
            "{} subscribers: highest rate with p99 <= 250 ms and 0 lost: {}/s = {} deliveries/s (p99 {} ms, server {} CPU-us/delivery)",
            num(v, "subscribers"),
            num(v, "rate_per_s"),
            num(v, "deliveries_per_s"),
            ms(v, "latency_p99_us"),
            num(v, "server_cpu_us_per_delivery")
        ),
        "floor" => format!(
            "no server, {conns} loopback pairs, thread CPU per call: accept {} us, epoll add {} us, send {} us, recv {} us; floors: connect {} us/conn ({} with ?subscribe=), last of 19,500 reached after {} ms, last of 500 after {} ms",
            num(v, "accept_us"),
            num(v, "epoll_add_us"),
            num(v, "send_us"),
            num(v, "recv_us"),
            num(v, "connect_floor_us"),
            num(v, "connect_url_subscribe_floor_us"),
            num(v, "fanout_19500_last_ms_floor"),
            num(v, "fanout_500_last_ms_floor")
        ),
        _ => String::new(),
    };
    let fails = v["failures"].as_array().map_or(0, Vec::len);
    let text = if fails > 0 {
        format!("{text} [{fails} failure(s)]")
    } else {
        text
    };
    (label, ok, text)
}

/// The rows as an aligned text table.
pub fn summary_table(rows: &[(String, String, String)]) -> String {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<w$}  {:<4}  result\n", "run", "ok");
    for (label, ok, text) in rows {
        s.push_str(&format!("{label:<w$}  {ok:<4}  {text}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_order_and_failures() {
        let mut r = Report::new("echo");
        r.put("b", 2);
        r.put("a", "x");
        r.put_f("f", 1.23456, 2);
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).expect("bounds");
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("in range");
        }
        r.put_hist("lat", &h);
        r.fail("lost 3");
        let j = r.json();
        let keys: Vec<&String> = j.as_object().expect("object").keys().collect();
        assert_eq!(keys[..4], ["scenario", "b", "a", "f"]);
        assert_eq!(j["f"], json!(1.23));
        assert_eq!(j["lat_count"], json!(1000));
        let p50 = j["lat_p50_us"].as_f64().expect("p50");
        assert!((499.0..=501.0).contains(&p50), "{p50}");
        assert_eq!(j["ok"], json!(false));
        assert!(r.table().contains("lost 3"));
        let (label, ok, text) = summary_row(&json!({"scenario":"echo","ok":true,
            "connections":10,"rate_per_s":5.0,"rtt_p50_us":1500.0,"pings":4,"pongs":4}));
        assert_eq!((label.as_str(), ok.as_str()), ("echo", "ok"));
        assert!(text.contains("p50/p99/p99.9 1.50/-/-"), "{text}");
        assert!(summary_table(&[(label, ok, text)]).starts_with("run"));
        let (_, ok, text) = summary_row(&json!({"scenario":"history-resume","ok":true,
            "subscribers":10000,"messages":100,"time_to_all_recovered_s":1.5,
            "resume_p50_us":2000.0,"replayed":1000000,"expected_replayed":1000000,
            "missing":0,"duplicates":0}));
        assert_eq!(ok, "ok");
        assert!(text.starts_with("10000 subscribers resume a 100-message gap: all recovered in 1.50 s; per subscriber p50/p99 2.00/- ms"), "{text}");
        let (_, _, text) = summary_row(&json!({"scenario":"rest-read","mode":"open",
            "rate_per_s":5000.0,"connections":64,"limit":50,"messages":1000,"walk":false,
            "requests_per_s":4990,"latency_p50_us":450.0,"latency_p99_us":2100.0,"errors":0}));
        assert!(
            text.starts_with("64 conns, open mode at 5000/s, pages of 50 from 1000 messages: 4990 req/s, latency p50/p90/p99/max 0.45/-/2.10/- ms; 0 errors"),
            "{text}"
        );
        let (_, _, text) = summary_row(&json!({"scenario":"presence-churn","mode":"events"}));
        assert!(text.contains("(events)"), "{text}");
    }
}
