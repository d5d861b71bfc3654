//! Finished spans ([`SpanRecord`]) and their two wire encodings (sans-IO): OTLP/HTTP JSON
//! (the protobuf JSON mapping of `ExportTraceServiceRequest`: `resourceSpans` / `scopeSpans`
//! / `spans`, ids as hex, times as decimal strings of nanoseconds, `kind` as the enum's
//! number) and Zipkin's v2 JSON (an array of spans, times in microseconds, every tag a
//! string).

use crate::proto::json::{write_str, write_u64};

/// What a span stands for, as both formats name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    /// From the `otel.kind` field (tracing-opentelemetry's convention); unknown = internal.
    pub fn parse(s: &str) -> SpanKind {
        match s {
            "server" | "SERVER" => SpanKind::Server,
            "client" | "CLIENT" => SpanKind::Client,
            "producer" | "PRODUCER" => SpanKind::Producer,
            "consumer" | "CONSUMER" => SpanKind::Consumer,
            _ => SpanKind::Internal,
        }
    }

    /// OTLP's `SpanKind` number.
    fn otlp(self) -> u64 {
        match self {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
            SpanKind::Producer => 4,
            SpanKind::Consumer => 5,
        }
    }

    /// Zipkin's `kind` (None: an internal span has none).
    fn zipkin(self) -> Option<&'static str> {
        match self {
            SpanKind::Internal => None,
            SpanKind::Server => Some("SERVER"),
            SpanKind::Client => Some("CLIENT"),
            SpanKind::Producer => Some("PRODUCER"),
            SpanKind::Consumer => Some("CONSUMER"),
        }
    }
}

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    F64(f64),
}

/// A finished span, as the exporter sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub name: &'static str,
    pub kind: SpanKind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attrs: Vec<(&'static str, AttrValue)>,
    /// The span ended in error (`otel.status_code = "ERROR"` or `error = true`).
    pub error: bool,
}

fn hex_u128(out: &mut Vec<u8>, v: u128) {
    out.extend_from_slice(format!("\"{v:032x}\"").as_bytes());
}

fn hex_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(format!("\"{v:016x}\"").as_bytes());
}

fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(v.to_string().as_bytes());
    } else {
        // JSON has no NaN or infinity.
        out.extend_from_slice(b"null");
    }
}

/// The OTLP/HTTP JSON body of `spans` (`POST /v1/traces`, `Content-Type: application/json`).
pub fn otlp_json(service: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let mut o = Vec::with_capacity(256 + spans.len() * 320);
    o.extend_from_slice(
        b"{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":\"service.name\",\"value\":{\"stringValue\":",
    );
    write_str(&mut o, service);
    o.extend_from_slice(b"}}]},\"scopeSpans\":[{\"scope\":{\"name\":\"switchboard\",\"version\":");
    write_str(&mut o, env!("CARGO_PKG_VERSION"));
    o.extend_from_slice(b"},\"spans\":[");
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        o.extend_from_slice(b"{\"traceId\":");
        hex_u128(&mut o, s.trace_id);
        o.extend_from_slice(b",\"spanId\":");
        hex_u64(&mut o, s.span_id);
        if let Some(p) = s.parent_id {
            o.extend_from_slice(b",\"parentSpanId\":");
            hex_u64(&mut o, p);
        }
        o.extend_from_slice(b",\"name\":");
        write_str(&mut o, s.name);
        o.extend_from_slice(b",\"kind\":");
        write_u64(&mut o, s.kind.otlp());
        o.extend_from_slice(b",\"startTimeUnixNano\":\"");
        write_u64(&mut o, s.start_unix_ns);
        o.extend_from_slice(b"\",\"endTimeUnixNano\":\"");
        write_u64(&mut o, s.end_unix_ns);
        o.extend_from_slice(b"\",\"attributes\":[");
        for (j, (k, v)) in s.attrs.iter().enumerate() {
            if j > 0 {
                o.push(b',');
            }
            o.extend_from_slice(b"{\"key\":");
            write_str(&mut o, k);
            o.extend_from_slice(b",\"value\":{");
            match v {
                AttrValue::Str(t) => {
                    o.extend_from_slice(b"\"stringValue\":");
                    write_str(&mut o, t);
                }
                // int64 is a string in the protobuf JSON mapping.
                AttrValue::Int(n) => {
                    o.extend_from_slice(format!("\"intValue\":\"{n}\"").as_bytes());
                }
                AttrValue::Bool(b) => {
                    o.extend_from_slice(format!("\"boolValue\":{b}").as_bytes());
                }
                AttrValue::F64(f) => {
                    o.extend_from_slice(b"\"doubleValue\":");
                    write_f64(&mut o, *f);
                }
            }
            o.extend_from_slice(b"}}");
        }
        o.push(b']');
        if s.error {
            // STATUS_CODE_ERROR.
            o.extend_from_slice(b",\"status\":{\"code\":2}");
        }
        o.push(b'}');
    }
    o.extend_from_slice(b"]}]}]}");
    o
}

/// The Zipkin v2 JSON body of `spans` (`POST /api/v2/spans`).
pub fn zipkin_json(service: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let mut o = Vec::with_capacity(2 + spans.len() * 320);
    o.push(b'[');
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        o.extend_from_slice(b"{\"traceId\":");
        hex_u128(&mut o, s.trace_id);
        o.extend_from_slice(b",\"id\":");
        hex_u64(&mut o, s.span_id);
        if let Some(p) = s.parent_id {
            o.extend_from_slice(b",\"parentId\":");
            hex_u64(&mut o, p);
        }
        o.extend_from_slice(b",\"name\":");
        write_str(&mut o, s.name);
        if let Some(k) = s.kind.zipkin() {
            o.extend_from_slice(b",\"kind\":\"");
            o.extend_from_slice(k.as_bytes());
            o.push(b'"');
        }
        let start_us = s.start_unix_ns / 1000;
        // Zipkin reads a duration of 0 as unknown: at least 1 us.
        let duration_us = (s.end_unix_ns.saturating_sub(s.start_unix_ns) / 1000).max(1);
        o.extend_from_slice(b",\"timestamp\":");
        write_u64(&mut o, start_us);
        o.extend_from_slice(b",\"duration\":");
        write_u64(&mut o, duration_us);
        o.extend_from_slice(b",\"localEndpoint\":{\"serviceName\":");
        write_str(&mut o, service);
        o.extend_from_slice(b"},\"tags\":{");
        let mut first = true;
        for (k, v) in &s.attrs {
            if !first {
                o.push(b',');
            }
            first = false;
            write_str(&mut o, k);
            o.push(b':');
            let text = match v {
                AttrValue::Str(t) => t.clone(),
                AttrValue::Int(n) => n.to_string(),
                AttrValue::Bool(b) => b.to_string(),
                AttrValue::F64(f) => f.to_string(),
            };
            write_str(&mut o, &text);
        }
        if s.error && !s.attrs.iter().any(|(k, _)| *k == "error") {
            if !first {
                o.push(b',');
            }
            o.extend_from_slice(b"\"error\":\"true\"");
        }
        o.extend_from_slice(b"}}");
    }
    o.push(b']');
    o
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(i: u64) -> SpanRecord {
        SpanRecord {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x1000 + i,
            parent_id: Some(0x00f067aa0ba902b7),
            name: "http.request",
            kind: SpanKind::Server,
            start_unix_ns: 1_700_000_000_000_000_000,
            end_unix_ns: 1_700_000_000_002_500_000,
            attrs: vec![
                ("http.request.method", AttrValue::Str("POST".into())),
                ("http.response.status_code", AttrValue::Int(200)),
                ("shard", AttrValue::Int(1)),
            ],
            error: false,
        }
    }

    #[test]
    fn otlp_bytes() {
        let mut child = record(2);
        child.parent_id = Some(0x1001);
        child.name = "auth";
        child.kind = SpanKind::Internal;
        child.attrs = vec![
            ("ok", AttrValue::Bool(false)),
            ("w", AttrValue::F64(0.5)),
            ("q", AttrValue::Str("a\"b".into())),
        ];
        child.error = true;
        let mut root = record(1);
        root.parent_id = None;
        let body = otlp_json("sb \"1\"", &[root, child]);
        let expected = concat!(
            r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"sb \"1\""}}]},"#,
            r#""scopeSpans":[{"scope":{"name":"switchboard","version":""#,
            env!("CARGO_PKG_VERSION"),
            r#""},"spans":["#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"0000000000001001","name":"http.request","kind":2,"startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000002500000","attributes":[{"key":"http.request.method","value":{"stringValue":"POST"}},{"key":"http.response.status_code","value":{"intValue":"200"}},{"key":"shard","value":{"intValue":"1"}}]},"#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"0000000000001002","parentSpanId":"0000000000001001","name":"auth","kind":1,"startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000002500000","attributes":[{"key":"ok","value":{"boolValue":false}},{"key":"w","value":{"doubleValue":0.5}},{"key":"q","value":{"stringValue":"a\"b"}}],"status":{"code":2}}"#,
            "]}]}]}"
        );
        assert_eq!(std::str::from_utf8(&body).unwrap(), expected);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["parentSpanId"],
            "0000000000001001"
        );
        assert_eq!(
            std::str::from_utf8(&otlp_json("s", &[])).unwrap(),
            concat!(
                r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"s"}}]},"scopeSpans":[{"scope":{"name":"switchboard","version":""#,
                env!("CARGO_PKG_VERSION"),
                r#""},"spans":[]}]}]}"#
            )
        );
    }

    #[test]
    fn zipkin_bytes() {
        let mut inner = record(2);
        inner.kind = SpanKind::Internal;
        inner.attrs.clear();
        inner.error = true;
        inner.end_unix_ns = inner.start_unix_ns;
        let body = zipkin_json("switchboard", &[record(1), inner]);
        let expected = concat!(
            r#"[{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","id":"0000000000001001","parentId":"00f067aa0ba902b7","name":"http.request","kind":"SERVER","timestamp":1700000000000000,"duration":2500,"localEndpoint":{"serviceName":"switchboard"},"tags":{"http.request.method":"POST","http.response.status_code":"200","shard":"1"}},"#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","id":"0000000000001002","parentId":"00f067aa0ba902b7","name":"http.request","timestamp":1700000000000000,"duration":1,"localEndpoint":{"serviceName":"switchboard"},"tags":{"error":"true"}}]"#
        );
        assert_eq!(std::str::from_utf8(&body).unwrap(), expected);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(zipkin_json("s", &[]), b"[]");
    }
}
