//! Trace context from request headers (sans-IO): W3C Trace Context's `traceparent`
//! (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`) and Zipkin's B3, both the single
//! `b3` header (`<trace id>-<span id>[-<sampling>[-<parent span id>]]`, or a lone sampling
//! state) and the multi-header form (`X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`,
//! `X-B3-Flags`). `traceparent` wins over `b3`, which wins over `X-B3-*`.
//!
//! Peer input: a malformed value is ignored (as if absent), never an error and never a panic.
//! All-zero ids are invalid in both formats. W3C ids must be lower-case hex (the spec's
//! `HEXDIGLC`); B3 ids are accepted in either case, 64-bit trace ids left-padded with zeros.

/// The trace headers of one request, as the HTTP parser found them (trimmed; the last of a
/// repeated header wins).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Headers<'a> {
    pub traceparent: Option<&'a str>,
    pub b3: Option<&'a str>,
    pub b3_trace_id: Option<&'a str>,
    pub b3_span_id: Option<&'a str>,
    pub b3_sampled: Option<&'a str>,
    pub b3_flags: Option<&'a str>,
}

impl<'a> Headers<'a> {
    /// Record `name: value` if it is one of the trace headers; false if it is not.
    pub fn offer(&mut self, name: &str, value: &'a str) -> bool {
        let slot = if name.eq_ignore_ascii_case("traceparent") {
            &mut self.traceparent
        } else if name.eq_ignore_ascii_case("b3") {
            &mut self.b3
        } else if name.len() > 5 && name.as_bytes()[..5].eq_ignore_ascii_case(b"x-b3-") {
            let rest = &name[5..];
            if rest.eq_ignore_ascii_case("traceid") {
                &mut self.b3_trace_id
            } else if rest.eq_ignore_ascii_case("spanid") {
                &mut self.b3_span_id
            } else if rest.eq_ignore_ascii_case("sampled") {
                &mut self.b3_sampled
            } else if rest.eq_ignore_ascii_case("flags") {
                &mut self.b3_flags
            } else {
                return false;
            }
        } else {
            return false;
        };
        *slot = Some(value);
        true
    }

    /// The context the request carries, if any well-formed one.
    pub fn parse(&self) -> Option<Incoming> {
        if let Some(p) = self.traceparent.and_then(parse_traceparent) {
            return Some(p);
        }
        if let Some(p) = self.b3.and_then(parse_b3_single) {
            return Some(p);
        }
        parse_b3_multi(self)
    }
}

/// What a request says about its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A parent span: continue its trace. `sampled` None: the caller left the decision to us
    /// (B3 without a sampling state).
    Parent {
        trace_id: u128,
        span_id: u64,
        sampled: Option<bool>,
    },
    /// A sampling decision without ids (`b3: 0`, `b3: 1`, `b3: d`, or `X-B3-Sampled` alone):
    /// a new trace, recorded or not as it says.
    Decision(bool),
}

fn hex_digit(b: u8, lower_only: bool) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' if !lower_only => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `s` as a number of at most 32 hex digits.
fn hex(s: &str, lower_only: bool) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    s.bytes().try_fold(0u128, |n, b| {
        Some(n << 4 | u128::from(hex_digit(b, lower_only)?))
    })
}

/// A `traceparent` value, or None when malformed (or version `ff`, or all-zero ids).
pub fn parse_traceparent(v: &str) -> Option<Incoming> {
    let v = v.trim();
    let b = v.as_bytes();
    // version "-" trace-id "-" parent-id "-" flags: 2+1+32+1+16+1+2 = 55 bytes. A later
    // version may append "-..." fields; version 00 may not.
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex(&v[..2], true)?;
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let trace_id = hex(&v[3..35], true)?;
    let span_id = hex(&v[36..52], true)? as u64;
    let flags = hex(&v[53..55], true)? as u8;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Incoming::Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
    })
}

/// A B3 trace id: 16 or 32 hex digits, not all zero.
fn b3_trace_id(s: &str) -> Option<u128> {
    if s.len() != 16 && s.len() != 32 {
        return None;
    }
    hex(s, false).filter(|&t| t != 0)
}

/// A B3 span id: 16 hex digits, not all zero.
fn b3_span_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex(s, false).map(|v| v as u64).filter(|&s| s != 0)
}

/// The single header's sampling state: `1` and `d` (debug) record, `0` does not.
fn b3_state(s: &str) -> Option<bool> {
    match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// A `b3` value, or None when malformed.
pub fn parse_b3_single(v: &str) -> Option<Incoming> {
    let v = v.trim();
    let mut parts = v.split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        return b3_state(first).map(Incoming::Decision);
    };
    let trace_id = b3_trace_id(first)?;
    let span_id = b3_span_id(second)?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => Some(b3_state(s)?),
    };
    if let Some(parent) = parts.next() {
        b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming::Parent {
        trace_id,
        span_id,
        sampled,
    })
}

/// The `X-B3-*` headers, or None when absent or malformed.
fn parse_b3_multi(h: &Headers<'_>) -> Option<Incoming> {
    // `X-B3-Flags: 1` is debug, which implies sampled; otherwise X-B3-Sampled (1/0, and the
    // true/false older clients send).
    let sampled = if h.b3_flags.map(str::trim) == Some("1") {
        Some(true)
    } else {
        match h.b3_sampled.map(|s| s.trim().to_ascii_lowercase()) {
            None => None,
            Some(s) if s == "1" || s == "true" => Some(true),
            Some(s) if s == "0" || s == "false" => Some(false),
            Some(_) => None,
        }
    };
    match (h.b3_trace_id, h.b3_span_id) {
        (Some(t), Some(s)) => Some(Incoming::Parent {
            trace_id: b3_trace_id(t.trim())?,
            span_id: b3_span_id(s.trim())?,
            sampled,
        }),
        _ => sampled.map(Incoming::Decision),
    }
}

/// The `traceparent` value that continues `trace_id` with `span_id` as the parent.
pub fn format_traceparent(trace_id: u128, span_id: u64, sampled: bool) -> String {
    format!(
        "00-{trace_id:032x}-{span_id:016x}-{:02x}",
        u8::from(sampled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    const S: u64 = 0x00f067aa0ba902b7;

    fn parent(sampled: Option<bool>) -> Option<Incoming> {
        Some(Incoming::Parent {
            trace_id: T,
            span_id: S,
            sampled,
        })
    }

    #[test]
    fn traceparent() {
        let p = parse_traceparent;
        assert_eq!(
            p("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            parent(Some(true))
        );
        assert_eq!(
            p("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            parent(Some(false))
        );
        // Other flag bits are not the sampled bit.
        assert_eq!(
            p("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02"),
            parent(Some(false))
        );
        // A later version may carry more; version 00 may not.
        assert_eq!(
            p("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            parent(Some(true))
        );
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{e9}",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        // Multi-byte characters where the dashes go: no panic on a char boundary.
        assert_eq!(p(&"é".repeat(40)), None);
        assert_eq!(
            format_traceparent(T, S, true),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn b3_single() {
        let p = parse_b3_single;
        assert_eq!(
            p("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"),
            parent(Some(true))
        );
        assert_eq!(
            p("4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-d-05e3ac9a4f6e3b90"),
            parent(Some(true))
        );
        assert_eq!(
            p("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"),
            parent(None)
        );
        assert_eq!(
            p("a3ce929d0e0e4736-00f067aa0ba902b7-0"),
            Some(Incoming::Parent {
                trace_id: 0xa3ce929d0e0e4736,
                span_id: S,
                sampled: Some(false)
            })
        );
        assert_eq!(p("0"), Some(Incoming::Decision(false)));
        assert_eq!(p("1"), Some(Incoming::Decision(true)));
        assert_eq!(p("d"), Some(Incoming::Decision(true)));
        for bad in [
            "",
            "2",
            "-",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-2",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-zz",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-05e3ac9a4f6e3b90-x",
            "4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-1",
            "00000000000000000000000000000000-00f067aa0ba902b7-1",
            "4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-1",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-1",
            "éééééééééééééééé-00f067aa0ba902b7",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn b3_multi_and_precedence() {
        let mut h = Headers::default();
        for (k, v) in [
            ("X-B3-TraceId", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("X-B3-Sampled", "1"),
            ("X-B3-ParentSpanId", "05e3ac9a4f6e3b90"),
        ] {
            h.offer(k, v);
        }
        assert_eq!(h.parse(), parent(Some(true)));
        h.b3_sampled = Some("false");
        assert_eq!(h.parse(), parent(Some(false)));
        h.b3_flags = Some("1");
        assert_eq!(h.parse(), parent(Some(true)));
        h.b3_flags = None;
        h.b3_sampled = Some("maybe");
        assert_eq!(h.parse(), parent(None));
        h.b3_span_id = Some("xyz");
        assert_eq!(h.parse(), None);
        let only = Headers {
            b3_sampled: Some("0"),
            ..Headers::default()
        };
        assert_eq!(only.parse(), Some(Incoming::Decision(false)));
        // traceparent first, then b3, then X-B3-*; a malformed one falls through.
        let mut h = Headers::default();
        assert!(h.offer("TraceParent", "garbage"));
        assert!(h.offer("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-1"));
        assert!(!h.offer("x-b3-other", "1"));
        assert!(!h.offer("x-b3-", "1"));
        assert!(!h.offer("accept", "1"));
        assert!(matches!(
            h.parse(),
            Some(Incoming::Parent {
                trace_id: 0xa3ce929d0e0e4736,
                ..
            })
        ));
        h.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(h.parse(), parent(Some(true)));
        assert_eq!(Headers::default().parse(), None);
    }
}
