//! The `tracing` side of [`crate::trace`]: [`TraceLayer`] gives every span of target
//! [`TARGET`] its ids (a root the trace [`crate::trace::Root::span`] decided, a child its
//! parent's trace), keeps its attributes while it is open and queues its record when it
//! closes; [`WithTraceIds`] stamps `trace_id` and `span_id` on every log line written inside
//! a traced span, in the text and JSON formats.
//!
//! Spans of other targets, and spans of [`TARGET`] whose parent is not traced, are ignored:
//! nothing is stored for them.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{encode::SpanRecord, pipeline, take_pending, AttrValue, SpanKind, TARGET};
use crate::limits::{TRACE_ATTRIBUTES_PER_SPAN_MAX, TRACE_ATTRIBUTE_BYTES_MAX};

/// What the layer keeps in a traced span's extensions while it is open.
pub struct SpanData {
    pub trace_id: u128,
    pub span_id: u64,
    parent_id: Option<u64>,
    start_unix_ns: u64,
    kind: SpanKind,
    attrs: Vec<(&'static str, AttrValue)>,
    error: bool,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The layer (from [`crate::trace::install`]).
pub struct TraceLayer {
    _private: (),
}

impl TraceLayer {
    pub(super) fn new() -> TraceLayer {
        TraceLayer { _private: () }
    }
}

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != TARGET {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let (trace_id, parent_id) = match take_pending() {
            Some(root) => (root.trace_id, root.remote_parent),
            None => {
                let Some(parent) = span.parent() else {
                    return;
                };
                let ext = parent.extensions();
                let Some(p) = ext.get::<SpanData>() else {
                    return;
                };
                (p.trace_id, Some(p.span_id))
            }
        };
        let mut data = SpanData {
            trace_id,
            span_id: super::new_span_id(),
            parent_id,
            start_unix_ns: unix_ns(),
            kind: SpanKind::Internal,
            attrs: Vec::new(),
            error: false,
        };
        attrs.record(&mut Visitor(&mut data));
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut ext = span.extensions_mut();
        if let Some(data) = ext.get_mut::<SpanData>() {
            values.record(&mut Visitor(data));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(d) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        let Some(p) = pipeline() else {
            return;
        };
        p.push(SpanRecord {
            trace_id: d.trace_id,
            span_id: d.span_id,
            parent_id: d.parent_id,
            name: span.name(),
            kind: d.kind,
            start_unix_ns: d.start_unix_ns,
            end_unix_ns: unix_ns().max(d.start_unix_ns),
            attrs: d.attrs,
            error: d.error,
        });
    }
}

/// Records a span's fields as attributes: `otel.kind` sets the kind, `otel.status_code =
/// "ERROR"` or `error = true` marks it failed; the rest are kept (bounded in count and size).
struct Visitor<'a>(&'a mut SpanData);

impl Visitor<'_> {
    fn put(&mut self, key: &'static str, v: AttrValue) {
        let attrs = &mut self.0.attrs;
        if let Some(slot) = attrs.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = v;
        } else if attrs.len() < TRACE_ATTRIBUTES_PER_SPAN_MAX {
            attrs.push((key, v));
        }
    }

    fn text(&mut self, field: &Field, s: &str) {
        match field.name() {
            "otel.kind" => self.0.kind = SpanKind::parse(s),
            "otel.status_code" => self.0.error = s.eq_ignore_ascii_case("error"),
            "message" => {}
            name => {
                let mut end = s.len().min(TRACE_ATTRIBUTE_BYTES_MAX);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                self.put(name, AttrValue::Str(s[..end].to_owned()));
            }
        }
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.text(field, &s);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), AttrValue::Int(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(
            field.name(),
            AttrValue::Int(i64::try_from(value).unwrap_or(i64::MAX)),
        );
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "error" && value {
            self.0.error = true;
        }
        self.put(field.name(), AttrValue::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), AttrValue::F64(value));
    }
}

/// A log formatter that adds `trace_id` and `span_id` (the innermost traced span's) to every
/// line written inside a traced span: the first fields of a JSON line, the last of a text
/// line. Lines outside traced spans are the inner formatter's, untouched. A stamped line is
/// formatted into a buffer first, so it carries no ANSI colours.
pub struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<F> WithTraceIds<F> {
    pub fn text(inner: F) -> WithTraceIds<F> {
        WithTraceIds { inner, json: false }
    }

    pub fn json(inner: F) -> WithTraceIds<F> {
        WithTraceIds { inner, json: true }
    }
}

/// The ids of the innermost traced span of `event`'s scope.
fn ids_of<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(u128, u64)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    ctx.event_scope()?.find_map(|span| {
        span.extensions()
            .get::<SpanData>()
            .map(|d| (d.trace_id, d.span_id))
    })
}

/// `line` (one formatted log line) with the ids added.
pub fn stamp(line: &str, json: bool, trace_id: u128, span_id: u64) -> String {
    if json {
        if let Some(rest) = line.strip_prefix('{') {
            return format!(
                "{{\"trace_id\":\"{trace_id:032x}\",\"span_id\":\"{span_id:016x}\",{rest}"
            );
        }
        return line.to_owned();
    }
    let (body, nl) = match line.strip_suffix('\n') {
        Some(b) => (b, "\n"),
        None => (line, ""),
    };
    format!("{body} trace_id={trace_id:032x} span_id={span_id:016x}{nl}")
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = ids_of(ctx) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&stamp(&line, self.json, trace_id, span_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        let t = 0x4bf92f3577b34da6a3ce929d0e0e4736;
        assert_eq!(
            stamp("{\"timestamp\":\"x\",\"message\":\"m\"}\n", true, t, 7),
            "{\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"0000000000000007\",\"timestamp\":\"x\",\"message\":\"m\"}\n"
        );
        assert_eq!(
            stamp("2026  INFO a{b=1}: m\n", false, t, 7),
            "2026  INFO a{b=1}: m trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=0000000000000007\n"
        );
    }
}
