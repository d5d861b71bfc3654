//! The deployment files against the real server: `deploy/grafana/` (dashboard and its
//! provisioning), `deploy/prometheus/` (alert rules, scrape config), `deploy/compose/`,
//! `deploy/k8s/`, the `Dockerfile` and `.dockerignore`.
//!
//! There is no container runtime here, so nothing is run in a container. Instead every file is
//! parsed (JSON with serde_json, YAML with serde_norway, the k8s file as multi-document YAML),
//! its structure checked, and every fact it states about the server is checked against the
//! server itself:
//! - every metric name in a PromQL expression of the dashboard (targets and variable queries)
//!   and the alert rules is in the `/metrics` output of the real binary, started with a real
//!   Redis and a Kafka (librdkafka's mock cluster) configured so that the Redis and Kafka
//!   families are rendered ([`every_metric_named_is_exported`]); `up` is the one name allowed
//!   without it ([`PROMETHEUS_MADE`]);
//! - every `SWITCHBOARD_*` name in compose, k8s, the Dockerfile and docs/OPERATIONS.md is a key
//!   of the server's key table (`Config::keys()` plus the structured keys `switchboard config`
//!   lists), and each node's whole environment (with its config file) loads through
//!   `switchboard config` without an error or an "is not a setting" warning, every variable
//!   read from the env;
//! - the port, probe paths, `shutdown_timeout` and `shards` the files rely on are the values
//!   `switchboard config` prints for that very configuration, and the probe and scrape paths
//!   answer 200 on a running node.
//!
//! Each check is a function returning what is wrong, so the self-tests at the end feed it a
//! deliberately wrong file and see it fail.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::kafka::Mock;
use common::redis::RedisServer;
use common::TestServer;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

const DASHBOARD: &str = "deploy/grafana/switchboard.json";
const GRAFANA_DATASOURCES: &str = "deploy/grafana/provisioning/datasources/prometheus.yml";
const GRAFANA_DASHBOARDS: &str = "deploy/grafana/provisioning/dashboards/switchboard.yml";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const PROMETHEUS: &str = "deploy/prometheus/prometheus.yml";
const COMPOSE: &str = "deploy/compose/docker-compose.yml";
const K8S_DIR: &str = "deploy/k8s";
const DOCKERFILE: &str = "Dockerfile";
const DOCKERIGNORE: &str = ".dockerignore";
const OPERATIONS: &str = "docs/OPERATIONS.md";

/// Metric names that are right without being in the server's output: `up` is made by
/// Prometheus for every scrape target (1 when the scrape succeeded), never by the target.
const PROMETHEUS_MADE: &[&str] = &["up"];

/// The compose services that run Switchboard.
const COMPOSE_NODES: &[&str] = &["sb1", "sb2", "sb3"];

/// What the dashboard must show (issue 15, "Dashboards and alerts"): one metric per item.
const DASHBOARD_MUST_USE: &[(&str, &str)] = &[
    ("connections per shard", "switchboard_connections"),
    ("connections per node", "switchboard_clients"),
    ("rooms", "switchboard_rooms"),
    ("frames per second", "switchboard_frames_out_total"),
    ("deliveries per second", "switchboard_deliveries_total"),
    ("bytes out", "switchboard_bytes_out_total"),
    (
        "publish-to-flush latency",
        "switchboard_publish_to_flush_seconds_bucket",
    ),
    (
        "slow-consumer closes",
        "switchboard_slow_consumer_closes_total",
    ),
    ("errors by reason", "switchboard_errors_total"),
    ("bridge health", "switchboard_bridge_dropped_total"),
    ("message store health", "switchboard_store_up"),
    ("Redis health", "switchboard_redis_up"),
    ("Kafka health", "switchboard_kafka_up"),
    ("consumer lag", "switchboard_kafka_consumer_lag"),
];

/// The alerts issue 15 asks for, by the name they have in alerts.yml.
const ALERTS_REQUIRED: &[&str] = &[
    "SwitchboardNodeNotReady",
    "SwitchboardNodeRestarted", // shard dead: the restart a dead shard causes
    "SwitchboardShardInboxDrops", // shard dead or stalled: its inbox refuses messages
    "SwitchboardRedisDegraded",
    "SwitchboardKafkaConsumerLag",
    "SwitchboardSlowConsumerSpike",
    "SwitchboardFdHeadroomLow",
];

// ---------------------------------------------------------------------------------------------
// Files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn json_file(rel: &str) -> Json {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
}

/// One YAML document, with merge keys (`<<: *anchor`) applied as compose applies them.
fn yaml_str(text: &str, what: &str) -> Yaml {
    let mut v: Yaml =
        serde_norway::from_str(text).unwrap_or_else(|e| panic!("{what} is not YAML: {e}"));
    v.apply_merge()
        .unwrap_or_else(|e| panic!("{what}: merge keys: {e}"));
    v
}

fn yaml_file(rel: &str) -> Yaml {
    yaml_str(&read(rel), rel)
}

/// Every document of a multi-document YAML text (empty documents skipped).
fn yaml_docs(text: &str, what: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    for (i, d) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Yaml::deserialize(d).unwrap_or_else(|e| panic!("{what} document {i}: {e}"));
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

/// The k8s manifests: every document of every `.yaml`/`.yml` file in deploy/k8s, with its file.
fn k8s_docs() -> Vec<(String, Yaml)> {
    let dir = root().join(K8S_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {K8S_DIR}");
    let mut out = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        for d in yaml_docs(&text, &name) {
            out.push((name.clone(), d));
        }
    }
    out
}

fn s<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

/// A YAML scalar as text (compose and k8s accept numbers and booleans where strings go).
fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The server's configuration, as `switchboard config` prints it

/// `switchboard config` run with exactly `env` (nothing from this process's environment):
/// (exit success, stdout, stderr).
fn config_run(env: &[(String, String)]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("config");
    common::hermetic(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run switchboard config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One configuration as the server loaded it: key -> (value as printed, source).
struct Loaded {
    values: BTreeMap<String, (String, String)>,
    warnings: Vec<String>,
}

impl Loaded {
    fn get(&self, key: &str) -> &str {
        &self
            .values
            .get(key)
            .unwrap_or_else(|| panic!("`switchboard config` printed no {key}"))
            .0
    }
    fn source(&self, key: &str) -> &str {
        &self.values[key].1
    }
    fn duration(&self, key: &str) -> Duration {
        parse_debug_duration(self.get(key))
            .unwrap_or_else(|| panic!("{key} = {} is not a duration", self.get(key)))
    }
    fn unquoted(&self, key: &str) -> String {
        self.get(key).trim_matches('"').to_owned()
    }
}

/// Load `env` through `switchboard config`; panics with the server's own error if it refuses.
fn load(env: &[(String, String)], what: &str) -> Loaded {
    let (ok, out, err) = config_run(env);
    assert!(
        ok,
        "{what}: `switchboard config` refused this configuration:\n{err}\nenv: {env:?}"
    );
    let mut values = BTreeMap::new();
    let mut warnings = Vec::new();
    for line in out.lines() {
        if let Some(w) = line.strip_prefix("# ") {
            warnings.push(w.to_owned());
            continue;
        }
        let (kv, source) = line.rsplit_once("  # ").unwrap_or((line, ""));
        if let Some((k, v)) = kv.split_once(" = ") {
            values.insert(k.to_owned(), (v.to_owned(), source.to_owned()));
        }
    }
    assert!(values.len() > 50, "{what}: unexpected dump:\n{out}");
    Loaded { values, warnings }
}

/// `Duration`'s Debug form as `switchboard config` prints it: `30s`, `1.5s`, `500ms`.
fn parse_debug_duration(v: &str) -> Option<Duration> {
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    num.parse::<f64>()
        .ok()
        .map(|n| Duration::from_secs_f64(n * mult))
}

/// A compose/k8s duration (`45s`, `1m30s`, `500ms`), or whole seconds.
fn parse_duration(v: &str) -> Option<Duration> {
    if let Ok(n) = v.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            _ => return None,
        };
        total += Duration::from_secs_f64(n * secs);
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Every environment name the server reads as a setting: `SWITCHBOARD_<KEY>` of every key
/// `switchboard config` lists (the key table and the structured keys), and
/// `SWITCHBOARD_CONFIG`. The key table itself (`Config::keys()`) must be part of it: a check
/// that the name rule used here is the server's.
fn setting_env_names() -> BTreeSet<String> {
    let defaults = load(&[], "defaults");
    let mut names: BTreeSet<String> = defaults
        .values
        .keys()
        .map(|k| format!("SWITCHBOARD_{}", k.to_uppercase()))
        .collect();
    for k in switchboard::config::Config::keys() {
        assert!(
            names.contains(k.env),
            "key table env {} (key {}) is not SWITCHBOARD_<KEY> of a listed key",
            k.env,
            k.key
        );
    }
    names.insert(switchboard::config::CONFIG_FILE_ENV.to_owned());
    names
}

/// The `SWITCHBOARD_*` names in `names` that are not settings.
fn unknown_env<'a>(
    names: impl IntoIterator<Item = &'a str>,
    known: &BTreeSet<String>,
) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| n.starts_with("SWITCHBOARD_") && !known.contains(*n))
        .map(str::to_owned)
        .collect()
}

/// What is wrong with one node's environment as the server loads it: refused (panics in
/// [`load`]), a variable the loader calls "not a setting", or a `SWITCHBOARD_*` variable whose
/// key was not taken from the environment.
fn env_problems(loaded: &Loaded, env: &[(String, String)]) -> Vec<String> {
    let mut problems: Vec<String> = loaded
        .warnings
        .iter()
        .filter(|w| w.contains("is not a setting"))
        .cloned()
        .collect();
    for (name, _) in env {
        let Some(key) = name.strip_prefix("SWITCHBOARD_") else {
            continue;
        };
        if name == switchboard::config::CONFIG_FILE_ENV {
            continue;
        }
        let key = key.to_lowercase();
        match loaded.values.get(&key) {
            Some((_, src)) if src == &format!("from env {name}") => {}
            Some((_, src)) => problems.push(format!("{name}: {key} came from {src:?}")),
            None => problems.push(format!("{name}: no key {key}")),
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// PromQL: the metric names an expression selects

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Followed by a parenthesised list of label names (or, for group_*, possibly nothing).
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];

/// Skip a quoted string starting at `i` (the quote); returns the index after it.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if q != b'`' => j += 2,
            c if c == q => return j + 1,
            _ => j += 1,
        }
    }
    j
}

/// Skip a bracketed group starting at `i` (`{`, `[` or `(`), strings inside included.
fn skip_group(b: &[u8], i: usize) -> usize {
    let (open, close) = (
        b[i],
        match b[i] {
            b'{' => b'}',
            b'[' => b']',
            _ => b')',
        },
    );
    let mut depth = 0;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(b, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The metric names selected by a PromQL expression: identifiers outside strings, label
/// matchers `{}`, ranges `[]`, Grafana variables (`$x`, `${x}`) and label lists (`by (...)`),
/// that are not functions (followed by `(`), aggregations, keywords or numbers.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c == b'{' || c == b'[' {
            i = skip_group(b, i);
        } else if c == b'#' {
            // A comment runs to the end of the line.
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'$' {
            i += 1;
            if i < b.len() && b[i] == b'{' {
                i = skip_group(b, i);
            } else {
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == b'.' {
            // A number or a duration (`0.99`, `1e3`, `5m`, `0x1f`).
            while i < b.len() && (is_ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let after = next_non_space(i);
            let paren = after < b.len() && b[after] == b'(';
            if LABEL_LIST_KEYWORDS.contains(&word) {
                if paren {
                    i = skip_group(b, after);
                }
            } else if paren || AGGREGATIONS.contains(&word) || KEYWORDS.contains(&word) {
                // A function call, an aggregation (`sum by (x) (...)`), or a keyword.
            } else {
                out.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The selector of a Grafana `label_values(selector, label)` query (`label_values(label)`
/// selects no metric), or the query itself when it is plain PromQL.
fn grafana_query_expr(q: &str) -> String {
    let q = q.trim();
    match q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        Some(args) => match args.rsplit_once(',') {
            Some((selector, _label)) => selector.to_owned(),
            None => String::new(),
        },
        None => q.to_owned(),
    }
}

/// Every metric name in `/metrics` text: sample names, and every `# TYPE` family (with a
/// histogram's `_bucket`, `_sum` and `_count`), so that a family with no sample yet (the Kafka
/// consumer lag before any partition is assigned) counts.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Every PromQL expression of the dashboard: (where, expr), panels in rows included, and the
/// variable queries.
fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard_panels(d) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or("");
            out.push((format!("panel {title:?} {}", t["refId"]), expr.to_owned()));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("");
            out.push((format!("variable {}", v["name"]), grafana_query_expr(q)));
        }
    }
    out
}

/// Every panel that is not a row, including panels nested in collapsed rows.
fn dashboard_panels(d: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// Every alert rule's (alert name, expr).
fn alert_exprs(rules: &Yaml) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().into_iter().flatten() {
        for r in g["rules"].as_sequence().into_iter().flatten() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    out
}

/// What is wrong with these expressions against the exported names: an expression that
/// selects no metric at all (a parse that found nothing proves nothing), or a name the server
/// does not export.
fn metric_problems(exprs: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (what, expr) in exprs {
        let names = promql_metrics(expr);
        if names.is_empty() {
            problems.push(format!("{what}: no metric in {expr:?}"));
        }
        for n in names {
            if !exported.contains(&n) && !PROMETHEUS_MADE.contains(&n.as_str()) {
                problems.push(format!("{what}: {n} is not in /metrics ({expr:?})"));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the rules

/// What is wrong with the dashboard's structure.
fn dashboard_problems(d: &Json) -> Vec<String> {
    let mut p = Vec::new();
    let inputs = d["__inputs"].as_array().cloned().unwrap_or_default();
    if !inputs.iter().any(|i| {
        i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"
    }) {
        p.push("no __inputs DS_PROMETHEUS (a prometheus datasource input)".to_owned());
    }
    // Provisioning skips __inputs: a datasource variable of that name resolves it there.
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !vars.iter().any(|v| {
        v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"
    }) {
        p.push("no datasource variable DS_PROMETHEUS".to_owned());
    }
    for key in ["title", "uid", "schemaVersion"] {
        if d[key].is_null() {
            p.push(format!("no {key}"));
        }
    }
    let panels = dashboard_panels(d);
    if panels.len() < 10 {
        p.push(format!("only {} panels", panels.len()));
    }
    let mut ids = BTreeSet::new();
    let top = d["panels"].as_array().cloned().unwrap_or_default();
    let nested: Vec<&Json> = top
        .iter()
        .filter(|p| p["type"] == "row")
        .flat_map(|r| r["panels"].as_array().into_iter().flatten())
        .collect();
    for panel in top.iter().chain(nested) {
        if let Some(id) = panel["id"].as_u64() {
            if !ids.insert(id) {
                p.push(format!("panel id {id} twice"));
            }
        } else {
            p.push(format!("panel {} has no id", panel["title"]));
        }
        if panel["gridPos"]["w"].as_u64().is_none() || panel["gridPos"]["h"].as_u64().is_none() {
            p.push(format!("panel {} has no gridPos", panel["title"]));
        }
    }
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("?");
        if panel["datasource"]["uid"] != "${DS_PROMETHEUS}" {
            p.push(format!(
                "panel {title:?}: datasource is not ${{DS_PROMETHEUS}}"
            ));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            p.push(format!("panel {title:?}: no targets"));
        }
        for t in targets {
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                p.push(format!("panel {title:?}: a target without expr"));
            }
            if t["datasource"]["uid"] != "${DS_PROMETHEUS}" {
                p.push(format!(
                    "panel {title:?}: a target's datasource is not ${{DS_PROMETHEUS}}"
                ));
            }
        }
    }
    let all: Vec<(String, String)> = dashboard_exprs(d);
    let used: BTreeSet<String> = all.iter().flat_map(|(_, e)| promql_metrics(e)).collect();
    for (item, metric) in DASHBOARD_MUST_USE {
        if !used.contains(*metric) {
            p.push(format!("{item}: no panel uses {metric}"));
        }
    }
    if !all.iter().any(|(_, e)| {
        e.contains("histogram_quantile(")
            && e.contains("switchboard_publish_to_flush_seconds_bucket")
    }) {
        p.push("no publish-to-flush quantile (histogram_quantile over its buckets)".to_owned());
    }
    if !all
        .iter()
        .any(|(_, e)| e.contains("switchboard_errors_total") && e.contains("by (reason)"))
    {
        p.push("errors are not shown by reason".to_owned());
    }
    p
}

/// What is wrong with the alert rules' structure.
fn alert_problems(rules: &Yaml) -> Vec<String> {
    let mut p = Vec::new();
    let groups = rules["groups"].as_sequence().cloned().unwrap_or_default();
    if groups.is_empty() {
        p.push("no groups".to_owned());
    }
    let mut names = BTreeSet::new();
    for g in &groups {
        if g["name"].as_str().is_none() {
            p.push("a group without a name".to_owned());
        }
        let rs = g["rules"].as_sequence().cloned().unwrap_or_default();
        if rs.is_empty() {
            p.push(format!("group {:?} has no rules", g["name"]));
        }
        for r in rs {
            let Some(name) = r["alert"].as_str() else {
                p.push(format!("a rule without alert: {r:?}"));
                continue;
            };
            if !names.insert(name.to_owned()) {
                p.push(format!("alert {name} twice"));
            }
            if r["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                p.push(format!("{name}: no expr"));
            }
            match r["for"].as_str() {
                Some(f) if parse_duration(f).is_some() => {}
                other => p.push(format!("{name}: for is {other:?}, not a duration")),
            }
            match r["labels"]["severity"].as_str() {
                Some("critical" | "warning" | "info") => {}
                other => p.push(format!("{name}: labels.severity is {other:?}")),
            }
            if r["annotations"]["summary"].as_str().is_none() {
                p.push(format!("{name}: no annotations.summary"));
            }
        }
    }
    for want in ALERTS_REQUIRED {
        if !names.contains(*want) {
            p.push(format!("no alert {want}"));
        }
    }
    p
}

#[test]
fn dashboard_parses_and_every_panel_has_a_query() {
    let d = json_file(DASHBOARD);
    let problems = dashboard_problems(&d);
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
}

#[test]
fn alert_rules_parse_with_alert_expr_for_and_labels() {
    let rules = yaml_file(ALERTS);
    let problems = alert_problems(&rules);
    assert!(problems.is_empty(), "{ALERTS}:\n{}", problems.join("\n"));
}

/// The real node, with Redis, Kafka, the TLS listener and tracing configured so that their
/// families are rendered: its `/metrics` names every metric the dashboard and the rules use.
#[test]
fn every_metric_named_is_exported() {
    let redis = RedisServer::start();
    let kafka = Mock::start(1);
    let dm_topic = "switchboard.direct-messages";
    kafka.create_topic(dm_topic, 1);
    let dir = std::env::temp_dir().join(format!("sb-deploy-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let certs = common::redis::TestCerts::generate(&dir);
    let tls_port = common::free_port().to_string();
    let collector = common::http_stub::closed_url("/v1/traces");
    let server = TestServer::start(&[
        ("SWITCHBOARD_REDIS_URL", &redis.url()),
        ("SWITCHBOARD_KAFKA_BROKERS", &kafka.bootstrap()),
        ("SWITCHBOARD_KAFKA_DM_TOPIC", dm_topic),
        ("SWITCHBOARD_TLS_PORT", &tls_port),
        ("SWITCHBOARD_TLS_CERT_FILE", &certs.server_cert),
        ("SWITCHBOARD_TLS_KEY_FILE", &certs.server_key),
        ("SWITCHBOARD_TRACE_EXPORTER", "otlp"),
        ("SWITCHBOARD_TRACE_ENDPOINT", &collector),
    ]);
    // Ready: the store, Redis and Kafka all answered, so every family has its lines.
    server.wait_ready();
    let text = server.wait_metrics("the Redis, Kafka, TLS and tracing families", |t| {
        t.contains("# TYPE switchboard_redis_up gauge")
            && t.contains("# TYPE switchboard_kafka_up gauge")
            && t.contains("# TYPE switchboard_kafka_consumer_lag gauge")
            && t.contains("# TYPE switchboard_tls_reloads_total counter")
            && t.contains("# TYPE switchboard_trace_spans_dropped_total counter")
    });
    let _ = std::fs::remove_dir_all(&dir);
    let exported = exported_names(&text);
    assert!(exported.len() > 100, "too few names:\n{text}");

    let d = json_file(DASHBOARD);
    let rules = yaml_file(ALERTS);
    let mut exprs = dashboard_exprs(&d);
    exprs.extend(alert_exprs(&rules));
    let problems = metric_problems(&exprs, &exported);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(server);
    drop(kafka);
    drop(redis);
}

// ---------------------------------------------------------------------------------------------
// Prometheus scrape config and Grafana provisioning, against compose

/// A compose service's volumes as (source resolved against the compose file, target).
fn compose_mounts(svc: &Yaml) -> Vec<(Option<PathBuf>, String)> {
    let base = root().join(COMPOSE);
    let base = base.parent().unwrap();
    let mut out = Vec::new();
    for v in svc["volumes"].as_sequence().into_iter().flatten() {
        let spec = s(v, "volume");
        let mut parts = spec.split(':');
        let src = parts.next().unwrap();
        let dst = parts
            .next()
            .unwrap_or_else(|| panic!("volume {spec:?} has no target"));
        let path = (src.starts_with('.') || src.starts_with('/')).then(|| base.join(src));
        out.push((path, dst.to_owned()));
    }
    out
}

/// A compose service's environment (map or `K=V` list form).
fn compose_env(svc: &Yaml) -> Vec<(String, String)> {
    match &svc["environment"] {
        Yaml::Mapping(m) => m
            .iter()
            .map(|(k, v)| (s(k, "env name").to_owned(), scalar(v).unwrap_or_default()))
            .collect(),
        Yaml::Sequence(l) => l
            .iter()
            .map(|e| {
                let e = s(e, "env entry");
                let (k, v) = e.split_once('=').unwrap_or((e, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The words of a compose `command` (a list, or one string), split as a shell would split
/// plain words (on whitespace, `;`, `\\`, quotes).
fn command_words(v: &Yaml) -> BTreeSet<String> {
    let parts: Vec<String> = match v {
        Yaml::Sequence(l) => l.iter().filter_map(scalar).collect(),
        other => scalar(other).into_iter().collect(),
    };
    parts
        .iter()
        .flat_map(|p| {
            p.split(|c: char| c.is_whitespace() || matches!(c, ';' | '\\' | '"' | '\''))
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn compose() -> Yaml {
    yaml_file(COMPOSE)
}

/// The environment a compose node runs with, as `switchboard config` must see it here: the
/// container path of SWITCHBOARD_CONFIG replaced by the file mounted there.
fn compose_node_env(svc: &Yaml, name: &str) -> Vec<(String, String)> {
    let mounts = compose_mounts(svc);
    compose_env(svc)
        .into_iter()
        .map(|(k, v)| {
            if k == switchboard::config::CONFIG_FILE_ENV {
                let src = mounts
                    .iter()
                    .find(|(_, dst)| *dst == v)
                    .and_then(|(src, _)| src.clone())
                    .unwrap_or_else(|| panic!("{name}: {k}={v} is not a mounted file"));
                assert!(src.is_file(), "{name}: {} does not exist", src.display());
                (k, src.display().to_string())
            } else {
                (k, v)
            }
        })
        .collect()
}

/// Host and port of `scheme://[user@]host:port[/...]`, or of a bare `host:port`.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hp = rest.split('/').next().unwrap();
    let (h, p) = hp
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url}: no port"));
    (
        h.to_owned(),
        p.parse().unwrap_or_else(|_| panic!("{url}: bad port")),
    )
}

#[test]
fn compose_cluster_is_three_nodes_and_their_services() {
    let c = compose();
    let services = c["services"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{COMPOSE}: no services"));
    for want in ["redis", "kafka", "postgres", "prometheus", "grafana"] {
        assert!(services.contains_key(want), "{COMPOSE}: no service {want}");
    }
    let svc = |n: &str| &c["services"][n];
    // Kafka: Apache's image, in KRaft mode (broker and controller in one, no ZooKeeper).
    let kafka_env: BTreeMap<String, String> = compose_env(svc("kafka")).into_iter().collect();
    assert!(
        s(&svc("kafka")["image"], "kafka image").starts_with("apache/kafka:"),
        "kafka is not apache/kafka"
    );
    let roles = &kafka_env["KAFKA_PROCESS_ROLES"];
    assert!(
        roles.contains("broker") && roles.contains("controller"),
        "{roles}"
    );
    assert!(!services.contains_key("zookeeper"));
    let advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .find_map(|l| l.strip_prefix("PLAINTEXT://"))
        .map(host_port)
        .expect("a PLAINTEXT advertised listener");

    let mut host_ports = BTreeSet::new();
    for name in COMPOSE_NODES {
        let n = svc(name);
        assert!(!n.is_null(), "{COMPOSE}: no node {name}");
        // Built from the repository's Dockerfile.
        let ctx = root()
            .join("deploy/compose")
            .join(s(&n["build"]["context"], "build.context"));
        let dockerfile = n["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
        assert!(
            ctx.join(dockerfile).canonicalize().ok() == root().join(DOCKERFILE).canonicalize().ok(),
            "{name}: build is not the repository's Dockerfile"
        );
        let env = compose_node_env(n, name);
        let loaded = load(&env, name);
        let problems = env_problems(&loaded, &env);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
        let port: u16 = loaded.get("port").parse().unwrap();
        // Published on a host port, to the port the node listens on.
        let ports: Vec<String> = n["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(scalar)
            .collect();
        let published = ports
            .iter()
            .find_map(|p| {
                let (h, c) = p.rsplit_once(':')?;
                (c.parse::<u16>().ok()? == port).then(|| h.to_owned())
            })
            .unwrap_or_else(|| panic!("{name}: no port maps to {port}: {ports:?}"));
        assert!(host_ports.insert(published), "{name}: host port used twice");
        // Stopped after the drain, not in the middle of it.
        let grace = parse_duration(s(&n["stop_grace_period"], "stop_grace_period")).unwrap();
        let drain = loaded.duration("shutdown_timeout");
        assert!(
            grace > drain,
            "{name}: stop_grace_period {grace:?} <= shutdown_timeout {drain:?}"
        );
        // The fd limit is set (the server raises its soft limit to this hard limit).
        let soft = n["ulimits"]["nofile"]["soft"]
            .as_u64()
            .expect("ulimits.nofile.soft");
        let hard = n["ulimits"]["nofile"]["hard"]
            .as_u64()
            .expect("ulimits.nofile.hard");
        assert!(
            soft <= hard && hard >= 65_536,
            "{name}: nofile {soft}:{hard}"
        );
        // Its backends are the compose services.
        assert_eq!(loaded.source("redis_url"), "from env SWITCHBOARD_REDIS_URL");
        let env_map: BTreeMap<&str, &str> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(host_port(env_map["SWITCHBOARD_REDIS_URL"]).0, "redis");
        assert_eq!(host_port(env_map["SWITCHBOARD_DATABASE_URL"]).0, "postgres");
        for b in env_map["SWITCHBOARD_KAFKA_BROKERS"].split(',') {
            assert_eq!(host_port(b), advertised, "{name}: broker {b}");
        }
        // kafka-init creates every topic this node uses: the node never creates topics.
        let init = command_words(&svc("kafka-init")["command"]);
        let mut topics = vec![
            loaded.unquoted("kafka_dm_topic"),
            loaded.unquoted("kafka_dead_letter_topic"),
        ];
        if let Some(file) = env_map.get(switchboard::config::CONFIG_FILE_ENV) {
            let cfg = yaml_str(&std::fs::read_to_string(file).unwrap(), file);
            for rule in cfg["kafka_notifications"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                if let Some(t) = rule["topic"].as_str() {
                    topics.push(t.to_owned());
                }
            }
        }
        for t in &topics {
            assert!(
                init.contains(t),
                "{name}: kafka-init does not create topic {t}"
            );
        }
    }
    // Every file a service mounts exists.
    for (name, sv) in services {
        for (src, dst) in compose_mounts(sv) {
            if let Some(src) = src {
                assert!(
                    src.exists(),
                    "{}: mount {} -> {dst}: no such file",
                    s(name, "service"),
                    src.display()
                );
            }
        }
    }
}

#[test]
fn prometheus_scrapes_the_compose_nodes_and_loads_the_rules() {
    let c = compose();
    let p = yaml_file(PROMETHEUS);
    let prom = &c["services"]["prometheus"];
    let mounts = compose_mounts(prom);
    let mounted = |file: &str| {
        mounts
            .iter()
            .find(|(src, _)| {
                src.as_ref().and_then(|s| s.canonicalize().ok())
                    == root().join(file).canonicalize().ok()
            })
            .map(|(_, dst)| dst.clone())
            .unwrap_or_else(|| panic!("prometheus does not mount {file}"))
    };
    let config_at = mounted(PROMETHEUS);
    let rules_at = mounted(ALERTS);
    let command = command_words(&prom["command"]);
    assert!(
        command.contains(&format!("--config.file={config_at}")),
        "prometheus is not started with {config_at}"
    );
    let rule_files: Vec<&str> = p["rule_files"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|r| s(r, "rule_files"))
        .collect();
    assert_eq!(rule_files, [rules_at.as_str()], "rule_files");

    let jobs = p["scrape_configs"].as_sequence().expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == "switchboard")
        .expect("a job named switchboard (the rules select job=\"switchboard\")");
    let defaults = load(&[], "defaults");
    let port: u16 = defaults.get("port").parse().unwrap();
    let targets: BTreeSet<String> = job["static_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|sc| sc["targets"].as_sequence().cloned().unwrap_or_default())
        .map(|t| s(&t, "target").to_owned())
        .collect();
    let want: BTreeSet<String> = COMPOSE_NODES
        .iter()
        .map(|n| format!("{n}:{port}"))
        .collect();
    assert_eq!(targets, want, "scrape targets");
    let path = job["metrics_path"].as_str().unwrap_or("/metrics");
    let server = TestServer::start(&[]);
    let (status, text) = server.http_get(path);
    assert_eq!(status, 200, "GET {path}");
    assert!(text.contains("# TYPE switchboard_clients gauge"));
}

#[test]
fn grafana_provisions_the_dashboard_and_the_compose_prometheus() {
    let c = compose();
    let g = &c["services"]["grafana"];
    let mounts = compose_mounts(g);
    let find = |rel: &str| {
        let want = root().join(rel).canonicalize().unwrap();
        mounts
            .iter()
            .find_map(|(src, dst)| {
                let src = src.as_ref()?.canonicalize().ok()?;
                if src == want {
                    Some(dst.clone())
                } else if want.starts_with(&src) {
                    Some(format!("{dst}/{}", want.strip_prefix(&src).ok()?.display()))
                } else {
                    None
                }
            })
            .unwrap_or_else(|| panic!("grafana does not mount {rel}"))
    };
    let ds = yaml_file(GRAFANA_DATASOURCES);
    assert!(find(GRAFANA_DATASOURCES).starts_with("/etc/grafana/provisioning/datasources/"));
    let prom = ds["datasources"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|d| d["type"] == "prometheus")
        .expect("a prometheus datasource");
    assert_eq!(
        host_port(s(&prom["url"], "datasource url")),
        ("prometheus".to_owned(), 9090),
        "the datasource is not the compose Prometheus"
    );
    let dash = yaml_file(GRAFANA_DASHBOARDS);
    assert!(find(GRAFANA_DASHBOARDS).starts_with("/etc/grafana/provisioning/dashboards/"));
    let provider_path = s(
        &dash["providers"][0]["options"]["path"],
        "providers[0].options.path",
    );
    let json_at = find(DASHBOARD);
    assert!(
        Path::new(&json_at).parent() == Some(Path::new(provider_path)),
        "dashboard mounted at {json_at}, provider reads {provider_path}"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The k8s documents of one kind.
fn kind<'a>(docs: &'a [(String, Yaml)], k: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == k)
        .map(|(_, d)| d)
        .collect()
}

/// Placeholder values for variables a manifest takes from a Secret (the test cannot read the
/// Secret): each a valid value of its setting. A new secret variable must be added here.
fn secret_placeholder(name: &str) -> &'static str {
    match name {
        "SWITCHBOARD_REDIS_URL" => "redis://redis:6379",
        "SWITCHBOARD_DATABASE_URL" => "postgres://switchboard:secret@postgres:5432/switchboard",
        "SWITCHBOARD_JWT_SECRET" => "0123456789abcdef0123456789abcdef0123456789abcdef",
        "SWITCHBOARD_API_KEY" => "k-0123456789abcdef",
        "SWITCHBOARD_KAFKA_BROKERS" => "kafka:9092",
        other => panic!("{other} comes from a Secret: add a placeholder for it here"),
    }
}

/// A probe's or Service's port (a number or a container port name) as a number.
fn resolve_port(p: &Yaml, container: &Yaml) -> u16 {
    if let Some(n) = p.as_u64() {
        return n as u16;
    }
    let name = s(p, "port");
    container["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|cp| cp["name"] == name)
        .and_then(|cp| cp["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}")) as u16
}

/// Seconds a preStop hook pauses: `exec: [sleep, N]` or `sleep: {seconds: N}`.
fn pre_stop_seconds(container: &Yaml) -> u64 {
    let h = &container["lifecycle"]["preStop"];
    assert!(!h.is_null(), "no preStop hook");
    if let Some(n) = h["sleep"]["seconds"].as_u64() {
        return n;
    }
    let cmd: Vec<String> = h["exec"]["command"]
        .as_sequence()
        .expect("preStop exec.command")
        .iter()
        .filter_map(scalar)
        .collect();
    match cmd.as_slice() {
        [sleep, n] if sleep.ends_with("sleep") => n.parse().expect("sleep seconds"),
        _ => 0,
    }
}

/// The container's environment and config file as `switchboard config` must load them here:
/// secret values replaced by placeholders, SWITCHBOARD_CONFIG by the ConfigMap file mounted there
/// (written to `dir`).
fn k8s_env(
    pod: &Yaml,
    container: &Yaml,
    configmaps: &[&Yaml],
    dir: &Path,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in container["env"].as_sequence().into_iter().flatten() {
        let name = s(&e["name"], "env name").to_owned();
        let value = if let Some(v) = scalar(&e["value"]) {
            v
        } else if !e["valueFrom"]["secretKeyRef"].is_null() {
            secret_placeholder(&name).to_owned()
        } else {
            panic!("{name}: neither value nor secretKeyRef");
        };
        env.push((name, value));
    }
    for (name, value) in env.iter_mut() {
        if name != switchboard::config::CONFIG_FILE_ENV {
            continue;
        }
        // Which volume is mounted at the file's directory, and which ConfigMap key it is.
        let path = Path::new(value.as_str());
        let (mount_dir, file) = (path.parent().unwrap(), path.file_name().unwrap());
        let mount = container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| Path::new(s(&m["mountPath"], "mountPath")) == mount_dir)
            .unwrap_or_else(|| panic!("{value}: nothing is mounted at {}", mount_dir.display()));
        let volume = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        let cm_name = s(&volume["configMap"]["name"], "volume configMap.name");
        let cm = configmaps
            .iter()
            .find(|c| c["metadata"]["name"] == cm_name)
            .unwrap_or_else(|| panic!("no ConfigMap {cm_name}"));
        let key = file.to_str().unwrap();
        let text = s(&cm["data"][key], "ConfigMap data key");
        let local = dir.join(key);
        std::fs::write(&local, text).unwrap();
        *value = local.display().to_string();
    }
    env
}

/// Whether the pod's grace period is too short for its preStop pause plus the drain
/// (`shutdown_timeout` as the server loaded it for this pod).
fn grace_problem(pod: &Yaml, container: &Yaml, loaded: &Loaded) -> Option<String> {
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let pause = pre_stop_seconds(container);
    let drain = loaded.duration("shutdown_timeout");
    (Duration::from_secs(grace) <= Duration::from_secs(pause) + drain).then(|| {
        format!(
            "terminationGracePeriodSeconds {grace} <= preStop {pause} s + shutdown_timeout {drain:?}"
        )
    })
}

#[test]
fn k8s_manifests_probe_the_real_paths_and_outlast_the_drain() {
    let docs = k8s_docs();
    for (file, d) in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(d[key].is_string(), "{file}: a document without {key}");
        }
        assert!(
            d["metadata"]["name"].is_string(),
            "{file}: a document without metadata.name"
        );
    }
    for k in ["Deployment", "Service", "PodDisruptionBudget", "ConfigMap"] {
        assert!(!kind(&docs, k).is_empty(), "no {k} in {K8S_DIR}");
    }
    let deployments = kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let dep = deployments[0];
    let pod = &dep["spec"]["template"]["spec"];
    let labels = dep["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .expect("pod labels");
    let selector = &dep["spec"]["selector"]["matchLabels"];
    let matches = |sel: &Yaml| {
        let sel = sel.as_mapping().expect("a matchLabels/selector mapping");
        !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(
        matches(selector),
        "Deployment selector does not match its pods"
    );
    let containers = pod["containers"].as_sequence().expect("containers");
    let container = containers
        .iter()
        .find(|c| c["name"] == "switchboard")
        .expect("a container named switchboard");

    // The configuration the pod runs, as the server loads it.
    let dir = std::env::temp_dir().join(format!("switchboard-deploy-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let configmaps = kind(&docs, "ConfigMap");
    let env = k8s_env(pod, container, &configmaps, &dir);
    let loaded = load(&env, "k8s Deployment");
    let problems = env_problems(&loaded, &env);
    assert!(problems.is_empty(), "k8s env:\n{}", problems.join("\n"));
    let port: u16 = loaded.get("port").parse().unwrap();

    // Probes on /ready and /live, on the port the server listens on.
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(resolve_port(&get["port"], container), port, "{probe} port");
    }
    let exposed: Vec<u64> = container["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(exposed, [u64::from(port)], "container ports");
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    if let Some(p) = scalar(&annotations["prometheus.io/port"]) {
        assert_eq!(p, port.to_string(), "prometheus.io/port");
    }

    // The grace period covers the preStop pause and the whole drain.
    if let Some(p) = grace_problem(pod, container, &loaded) {
        panic!("{p}");
    }

    // Resources: requests and limits, whole cores = shards (thread-per-core).
    let res = &container["resources"];
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(scalar(&res[k][r]).is_some(), "resources.{k}.{r}");
        }
    }
    let cpu = scalar(&res["requests"]["cpu"]).unwrap();
    assert_eq!(
        cpu,
        loaded.get("shards"),
        "requests.cpu {cpu} is not the shard count {}",
        loaded.get("shards")
    );
    let mib = |v: &str| -> u64 {
        let n = v.trim_end_matches("Mi").trim_end_matches("Gi");
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("memory {v}: use Mi or Gi"));
        if v.ends_with("Gi") {
            n * 1024
        } else {
            n
        }
    };
    assert!(
        mib(&scalar(&res["requests"]["memory"]).unwrap())
            <= mib(&scalar(&res["limits"]["memory"]).unwrap())
    );

    // Runs as the image's non-root user.
    let sc = &pod["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        sc["runAsUser"].as_u64().map(|u| u.to_string()),
        Some(dockerfile_user().0),
        "runAsUser is not the Dockerfile's USER"
    );

    // The Service sends its port to the server's, for these pods.
    for svc in kind(&docs, "Service") {
        assert!(matches(&svc["spec"]["selector"]), "Service selector");
        for p in svc["spec"]["ports"].as_sequence().expect("Service ports") {
            assert_eq!(
                resolve_port(&p["targetPort"], container),
                port,
                "Service targetPort"
            );
        }
    }
    for pdb in kind(&docs, "PodDisruptionBudget") {
        assert!(
            matches(&pdb["spec"]["selector"]["matchLabels"]),
            "PDB selector"
        );
        assert!(
            !pdb["spec"]["maxUnavailable"].is_null() || !pdb["spec"]["minAvailable"].is_null(),
            "PDB without maxUnavailable or minAvailable"
        );
    }

    // The probe paths are the server's: 200 from a running node.
    // (/ready turns 200 once the message store is up, a moment after start.)
    let server = TestServer::start(&[]);
    for (path, body) in [
        ("/ready", "\"status\":\"ready\""),
        ("/live", "\"status\":\"alive\""),
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (status, text) = loop {
            let (status, text) = server.http_get(path);
            if status == 200 || std::time::Instant::now() > deadline {
                break (status, text);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status, 200, "GET {path}: {text}");
        assert!(text.contains(body), "GET {path}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// The final stage's USER (uid, gid).
fn dockerfile_user() -> (String, Option<String>) {
    let text = read(DOCKERFILE);
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let user = last_stage
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("the final stage sets USER");
    let (u, g) = user
        .trim()
        .split_once(':')
        .map_or((user.trim(), None), |(u, g)| (u, Some(g)));
    (u.to_owned(), g.map(str::to_owned))
}

/// `KEY=VALUE` pairs of every ENV instruction (continuation lines joined).
fn dockerfile_env(text: &str) -> Vec<(String, String)> {
    let joined = text.replace("\\\n", " ");
    let mut env = Vec::new();
    for line in joined.lines() {
        if let Some(rest) = line.trim().strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV {rest}: use KEY=VALUE"));
                env.push((k.to_owned(), v.trim_matches('"').to_owned()));
            }
        }
    }
    env
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_exposes_the_port() {
    let text = read(DOCKERFILE);
    let froms: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FROM "))
        .collect();
    assert!(froms.len() >= 2, "not multi-stage: {froms:?}");
    assert!(
        froms[0].starts_with("rust:"),
        "builder is not a rust image: {}",
        froms[0]
    );
    let runtime = froms.last().unwrap();
    assert!(
        runtime.starts_with("debian:bookworm-slim"),
        "runtime {runtime}"
    );
    let final_stage = text.rsplit("\nFROM ").next().unwrap();
    assert!(
        final_stage.contains("COPY --from=builder"),
        "the binary comes from the builder"
    );
    let (uid, _) = dockerfile_user();
    assert!(uid != "root" && uid != "0", "USER {uid} is root");

    let env = dockerfile_env(&text);
    let loaded = load(&env, "Dockerfile ENV");
    let problems = env_problems(&loaded, &env);
    assert!(problems.is_empty(), "Dockerfile:\n{}", problems.join("\n"));
    let port = loaded.get("port");
    let exposed: Vec<&str> = final_stage
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        exposed.iter().any(|e| e.trim_end_matches("/tcp") == port),
        "EXPOSE {exposed:?} does not include the port {port}"
    );
    assert!(
        final_stage.contains("ENTRYPOINT [\"/usr/local/bin/switchboard\"]"),
        "ENTRYPOINT is not the binary"
    );

    let ignore = read(DOCKERIGNORE);
    let lines: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for want in [".git", "**/target"] {
        assert!(
            lines.contains(&want),
            "{DOCKERIGNORE} does not exclude {want}"
        );
    }
    for needed in ["src", "Cargo.toml", "Cargo.lock", "benches", "loadtest"] {
        assert!(
            !lines.contains(&needed),
            "{DOCKERIGNORE} excludes {needed}, which the build needs"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Every SWITCHBOARD_* name in every file

/// Every `SWITCHBOARD_*` word in a text (names in comments and commands included).
fn switchboard_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("SWITCHBOARD_") && w.len() > "SWITCHBOARD_".len())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_switchboard_env_name_is_a_setting() {
    let known = setting_env_names();
    let mut files: Vec<String> = vec![COMPOSE.into(), DOCKERFILE.into(), OPERATIONS.into()];
    for entry in std::fs::read_dir(root().join(K8S_DIR)).unwrap() {
        let p = entry.unwrap().path();
        files.push(p.strip_prefix(root()).unwrap().display().to_string());
    }
    let mut seen = 0;
    for f in &files {
        let words = switchboard_words(&read(f));
        seen += words.len();
        let bad = unknown_env(words.iter().map(String::as_str), &known);
        assert!(bad.is_empty(), "{f}: not settings: {bad:?}");
    }
    assert!(
        seen >= 10,
        "only {seen} SWITCHBOARD_* names found: is the scan broken?"
    );
}

// ---------------------------------------------------------------------------------------------
// The checks can fail

#[test]
fn promql_metric_extraction() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"sum by (instance, le) (rate(switchboard_publish_to_flush_seconds_bucket{job=~"$job",instance=~"$instance"}[$__rate_interval]))"#,
            &["switchboard_publish_to_flush_seconds_bucket"],
        ),
        (
            "sum by (job, instance) (switchboard_connections) / on (job, instance) switchboard_limit_max_connections > 0.8",
            &["switchboard_connections", "switchboard_limit_max_connections"],
        ),
        (
            "max by (job, instance) ((switchboard_draining == 1) or (switchboard_store_up == 0))",
            &["switchboard_draining", "switchboard_store_up"],
        ),
        (
            r#"histogram_quantile(0.99, sum without (shard) (rate(a_bucket{le!="+Inf", x='}'}[5m] offset 1h)))"#,
            &["a_bucket"],
        ),
        (
            "rate(x_total[5m]) + ignoring (code) group_left (reason) y_total unless z",
            &["x_total", "y_total", "z"],
        ),
        (r#"up{job="switchboard"} == 0"#, &["up"]),
        ("resets(switchboard_accepted_total[15m]) > 0", &["switchboard_accepted_total"]),
        (r#"label_values(switchboard_clients{job=~"$job"}, instance)"#, &["switchboard_clients"]),
    ];
    for (expr, want) in cases {
        let expr = grafana_query_expr(expr);
        let got = promql_metrics(&expr);
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(got, want, "{expr}");
    }
}

/// A real scrape's text with one family the dashboard uses cut out, or a dashboard with a
/// misspelt metric: both must be reported.
#[test]
fn a_wrong_metric_name_fails_the_check() {
    let server = TestServer::start(&[]);
    let (_, text) = server.http_get("/metrics");
    let exported = exported_names(&text);
    let d = json_file(DASHBOARD);
    let mut exprs = dashboard_exprs(&d);
    // Without Redis and Kafka their families are absent: the dashboard's panels on them fail.
    let problems = metric_problems(&exprs, &exported);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("switchboard_redis_up is not in /metrics")),
        "{problems:?}"
    );
    // Only those, and the TLS reload and tracing families (with tls_port and trace_exporter):
    // everything else is exported by a plain node.
    let plain: Vec<&String> = problems
        .iter()
        .filter(|p| {
            !p.contains("switchboard_redis_")
                && !p.contains("switchboard_kafka_")
                && !p.contains("switchboard_tls_reload")
                && !p.contains("switchboard_trace_")
        })
        .collect();
    assert!(plain.is_empty(), "{plain:?}");
    // One letter wrong in one expression: caught.
    let (what, expr) = exprs
        .iter_mut()
        .find(|(_, e)| e.contains("switchboard_connections{"))
        .unwrap();
    *expr = expr.replace("switchboard_connections{", "switchboard_conections{");
    let what = what.clone();
    let problems = metric_problems(&exprs, &exported);
    assert!(
        problems.iter().any(
            |p| p.starts_with(&what) && p.contains("switchboard_conections is not in /metrics")
        ),
        "{problems:?}"
    );
    // An expression that names no metric at all is a failure, not a pass.
    let problems = metric_problems(&[("x".into(), "sum(rate([5m]))".into())], &exported);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn a_wrong_env_name_fails_the_check() {
    let known = setting_env_names();
    assert_eq!(
        unknown_env(
            ["SWITCHBOARD_REDIS_ULR", "SWITCHBOARD_PORT", "PATH"],
            &known
        ),
        ["SWITCHBOARD_REDIS_ULR"]
    );
    // Through the loader: the misspelt name is "not a setting", and the key it meant is not
    // taken from the environment.
    let env = vec![("SWITCHBOARD_SHUTDOWN_TIMOUT".to_owned(), "20s".to_owned())];
    let loaded = load(&env, "misspelt");
    let problems = env_problems(&loaded, &env);
    assert!(
        problems.iter().any(|p| p.contains("is not a setting")),
        "{problems:?}"
    );
    // A bad value is refused by the loader itself.
    let (ok, _, err) = config_run(&[("SWITCHBOARD_PORT".to_owned(), "80808".to_owned())]);
    assert!(!ok && err.contains("port"), "{err}");
}

#[test]
fn a_broken_dashboard_or_rule_fails_the_check() {
    let mut d = json_file(DASHBOARD);
    d["__inputs"] = Json::Array(vec![]);
    let panels = d["panels"].as_array_mut().unwrap();
    let first = panels.iter_mut().find(|p| p["type"] != "row").unwrap();
    first["targets"] = Json::Array(vec![]);
    let problems = dashboard_problems(&d);
    assert!(
        problems.iter().any(|p| p.contains("__inputs")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("no targets")),
        "{problems:?}"
    );

    let mut rules = yaml_file(ALERTS);
    let r = &mut rules["groups"][0]["rules"][0];
    r.as_mapping_mut().unwrap().remove("for");
    r["labels"] = Yaml::Null;
    let problems = alert_problems(&rules);
    assert!(
        problems.iter().any(|p| p.contains("for is None")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("severity")),
        "{problems:?}"
    );
}

#[test]
fn a_short_grace_period_is_caught() {
    // The grace check compares against the shutdown_timeout the server loads, not a constant:
    // the manifests' pod with a 60 s drain no longer fits its grace period.
    let docs = k8s_docs();
    let pod = &kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let default = load(&[], "defaults");
    assert_eq!(grace_problem(pod, container, &default), None);
    let long = load(
        &[("SWITCHBOARD_SHUTDOWN_TIMEOUT".to_owned(), "60s".to_owned())],
        "long drain",
    );
    let problem = grace_problem(pod, container, &long).expect("a 60 s drain must not fit");
    assert!(problem.contains("shutdown_timeout 60s"), "{problem}");
    assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(
        parse_debug_duration("1.5s"),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        parse_debug_duration("250ms"),
        Some(Duration::from_millis(250))
    );
}
