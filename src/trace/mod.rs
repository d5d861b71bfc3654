//! Distributed tracing: spans for what a person debugging follows (an upgrade and its
//! authentication, each server API and REST request, a direct message from `message.send` to
//! `message.ack` with its store commit and Kafka produce, a notification record from Kafka, a
//! room publish and its way through Redis to the other nodes), continued from the caller's
//! W3C `traceparent` or Zipkin B3 headers ([`propagation`]; a `message.send` or `publish`
//! field, a Kafka record's headers) and handed on (a DM record's `traceparent` header, the
//! trace context of a version-2 cluster envelope, `crate::cluster`), exported over OTLP/HTTP
//! JSON or Zipkin's v2 JSON API (`crate::bridge::trace_export`), and stamped on every log
//! line written inside them.
//!
//! **Our own small exporter, not the OpenTelemetry crates.** `opentelemetry-otlp` brings
//! hyper/reqwest or tonic (some 60 crates to build here) and OpenTelemetry's Zipkin exporter
//! is deprecated; `tracing-opentelemetry` would still need one of them. What we need is small:
//! ids, a sampling decision, a bounded queue, and two JSON encodings ([`encode`]) POSTed with
//! the HTTP client the bridge already has (`bridge::http_client`). About 900 lines, no new
//! crate.
//!
//! How it fits together:
//! - [`install`] (from `main`, only with `trace_exporter` not `off`) creates the one
//!   [`Pipeline`]: the sampling threshold, the bounded queue of finished spans
//!   ([`TRACE_QUEUE_SPANS_MAX`]) and its counters, and returns the [`layer::TraceLayer`] to
//!   put beside the log formatter. With tracing off there is no pipeline: [`root`] answers
//!   None after one atomic load, no span is created, nothing is queued, no task runs.
//! - A root span is decided *before* it is made: [`root`] takes what the request's headers
//!   say ([`propagation::Incoming`]). A trusted caller's flag (`trace_parent_sampled`: by
//!   default callers with the API key, and Kafka records) is followed: sampled always, not
//!   sampled never. Otherwise `trace_sample_ratio` decides, by the trace id when the caller
//!   gave one (as OpenTelemetry's ratio sampler does, so every service agrees): an end user
//!   cannot make the node record every message of theirs, yet a sampled trace still links.
//!   An unsampled root is `Span::none()`: no allocation, no registry slot, no export. A
//!   sampled one is made through [`Root::span`] (the [`root_span!`] macro), which hands the
//!   layer its trace id and remote parent.
//! - Children are ordinary `tracing` spans of target [`TARGET`] made with [`child_span!`]
//!   (nothing when the parent is not traced); the layer gives each a span id in the parent's
//!   trace. Spans may cross threads (a DM's span goes with its store job to the bridge and
//!   ends when the ack is sent).
//! - When a traced span closes, the layer queues its record (`try_send`: a full queue drops
//!   it and counts it, the emitting thread never waits); the bridge's exporter task sends the
//!   queue in batches.
//!
//! Owns: ids, the sampling decision, the queue and its counters ([`TraceStats`], rendered by
//! [`render`]). Never touches sockets (the bridge exports) nor the fan-out path: room
//! deliveries are never traced per recipient.

pub mod encode;
pub mod layer;
pub mod propagation;

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crossbeam_channel::{Receiver, Sender};

use crate::config::{Config, TraceExporter, TraceParentSampled};
use crate::limits::TRACE_QUEUE_SPANS_MAX;
pub use encode::{AttrValue, SpanKind, SpanRecord};
pub use propagation::Incoming;

/// The `tracing` target of every traced span (the log filter always enables it while
/// tracing is on, whatever `log_level` says; no event uses it).
pub const TARGET: &str = "sb_trace";

/// The node's tracing: sampling, the queue of finished spans, counters. One per process.
pub struct Pipeline {
    /// A new trace is recorded when a random (or its trace id's low) 64 bits fall below this.
    threshold: u64,
    /// `trace_sample_ratio` is 1.0: every trace (the threshold cannot say "all").
    always: bool,
    /// Whose sampled flag is followed.
    follow: TraceParentSampled,
    tx: Sender<SpanRecord>,
    rx: Receiver<SpanRecord>,
    pub exporter: TraceExporter,
    pub stats: TraceStats,
}

/// Counters of the pipeline, rendered in `/metrics` while tracing is on.
#[derive(Default)]
pub struct TraceStats {
    /// Sampled root spans started.
    pub traces_sampled: AtomicU64,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (the exporter is behind or backing off).
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because their export request failed (collector down, slow, refusing).
    pub dropped_export_failed: AtomicU64,
    /// Export requests that failed.
    pub export_failures: AtomicU64,
}

static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// The pipeline, when tracing is on.
#[inline]
pub fn pipeline() -> Option<&'static Pipeline> {
    PIPELINE.get()
}

/// Set tracing up for this process from `cfg`: None (and nothing set) when `trace_exporter`
/// is off. Call once, before the log subscriber is installed; a second call returns None.
pub fn install(cfg: &Config) -> Option<layer::TraceLayer> {
    if cfg.trace_exporter == TraceExporter::Off {
        return None;
    }
    let (tx, rx) = crossbeam_channel::bounded(TRACE_QUEUE_SPANS_MAX);
    let ratio = cfg.trace_sample_ratio.clamp(0.0, 1.0);
    let p = Pipeline {
        // ratio * 2^64, saturating; 1.0 is `always`.
        threshold: (ratio * 18_446_744_073_709_551_616.0) as u64,
        always: ratio >= 1.0,
        follow: cfg.trace_parent_sampled,
        tx,
        rx,
        exporter: cfg.trace_exporter,
        stats: TraceStats::default(),
    };
    PIPELINE.set(p).ok()?;
    Some(layer::TraceLayer::new())
}

impl Pipeline {
    /// Queue a finished span; a full queue drops it (counted).
    fn push(&self, rec: SpanRecord) {
        if self.tx.try_send(rec).is_err() {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Take up to `max` queued spans (the exporter).
    pub fn take(&self, max: usize) -> Vec<SpanRecord> {
        self.rx.try_iter().take(max).collect()
    }

    /// Spans waiting in the queue.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    fn sampled_by(&self, bits: u64) -> bool {
        self.always || bits < self.threshold
    }
}

// ---------------------------------------------------------------------------------------------
// Ids: a per-thread SplitMix64 seeded once from the OS (via uuid's v4). Trace ids need to be
// unique, not secret.
// ---------------------------------------------------------------------------------------------

thread_local! {
    static RNG: Cell<u64> = Cell::new(uuid::Uuid::new_v4().as_u64_pair().0 | 1);
    /// The root being made by [`Root::span`], taken by the layer's `on_new_span`.
    static PENDING: Cell<Option<Root>> = const { Cell::new(None) };
}

fn next_u64() -> u64 {
    RNG.with(|s| {
        let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A new span id (never 0).
pub(crate) fn new_span_id() -> u64 {
    loop {
        let v = next_u64();
        if v != 0 {
            return v;
        }
    }
}

fn new_trace_id() -> u128 {
    loop {
        let v = u128::from(next_u64()) << 64 | u128::from(next_u64());
        if v != 0 {
            return v;
        }
    }
}

/// A sampled root span about to be made: its trace, and the remote parent it continues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub trace_id: u128,
    pub remote_parent: Option<u64>,
}

/// Who sent a trace context: whether its sampled flag may decide (`trace_parent_sampled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A caller holding the API key, or a Kafka record (our own services).
    Trusted,
    /// A WebSocket client, a REST user, an upgrade request.
    EndUser,
}

/// Decide a new root span: None when tracing is off or the trace is not sampled (make no
/// span), Some to make one with [`Root::span`]. `incoming`: what the request's headers say;
/// `caller`: who said it.
#[inline]
pub fn root(incoming: Option<Incoming>, caller: Caller) -> Option<Root> {
    let p = pipeline()?;
    decide(p, incoming, caller)
}

/// Tracing is on (one atomic load): guard work done only for tracing, such as parsing a
/// context the caller sent.
#[inline]
pub fn on() -> bool {
    pipeline().is_some()
}

/// The trace id and span id of `span`, when it is traced (to hand on: a `traceparent` header
/// of a produced Kafka record).
pub fn context_of(span: &tracing::Span) -> Option<(u128, u64)> {
    if span.is_none() {
        return None;
    }
    span.with_subscriber(|(id, dispatch)| {
        use tracing_subscriber::registry::{LookupSpan, SpanData as _};
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let data = registry.span_data(id)?;
        let ext = data.extensions();
        ext.get::<layer::SpanData>()
            .map(|d| (d.trace_id, d.span_id))
    })
    .flatten()
}

/// [`root`] for a request: its trace headers are parsed, and `caller` asked, only when
/// tracing is on.
#[inline]
pub fn root_for(
    headers: &propagation::Headers<'_>,
    caller: impl FnOnce() -> Caller,
) -> Option<Root> {
    let p = pipeline()?;
    decide(p, headers.parse(), caller())
}

/// [`root`] for a client frame's optional `traceparent` field (an end user's: its flag does
/// not decide, `trace_parent_sampled`); parsed only when tracing is on.
#[inline]
pub fn root_for_field(traceparent: Option<&str>) -> Option<Root> {
    let p = pipeline()?;
    let incoming = traceparent.and_then(propagation::parse_traceparent);
    decide(p, incoming, Caller::EndUser)
}

/// [`root`] for a span continuing another node of ours (a cluster envelope's trace id and
/// parent span): its sampled flag is followed, as a trusted caller's.
pub fn root_from_node(trace_id: u128, span_id: u64) -> Option<Root> {
    root(
        Some(Incoming::Parent {
            trace_id,
            span_id,
            sampled: Some(true),
        }),
        Caller::Trusted,
    )
}

/// The current span when tracing is on, else `Span::none()` without asking the subscriber.
#[inline]
pub fn current() -> tracing::Span {
    if pipeline().is_none() {
        return tracing::Span::none();
    }
    tracing::Span::current()
}

/// The current span, boxed, when it is traced (to carry in a message to another shard or
/// the bridge, which continue it); None, with tracing off after one atomic load.
#[inline]
pub fn current_traced() -> Option<Box<tracing::Span>> {
    let span = current();
    (!span.is_none()).then(|| Box::new(span))
}

/// Record the HTTP status a traced span answered with (`http.response.status_code`; a 5xx
/// marks the span failed). Nothing when the span is not traced.
pub fn record_status(span: &tracing::Span, status: u16) {
    if span.is_none() {
        return;
    }
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

fn decide(p: &Pipeline, incoming: Option<Incoming>, caller: Caller) -> Option<Root> {
    let follow = match p.follow {
        TraceParentSampled::All => true,
        TraceParentSampled::Api => caller == Caller::Trusted,
        TraceParentSampled::Ignore => false,
    };
    // A flag not followed: the trace id and parent are kept, the ratio decides.
    let incoming = match incoming {
        Some(Incoming::Parent {
            trace_id, span_id, ..
        }) if !follow => Some(Incoming::Parent {
            trace_id,
            span_id,
            sampled: None,
        }),
        Some(Incoming::Decision(_)) if !follow => None,
        other => other,
    };
    let r = match incoming {
        Some(Incoming::Parent {
            trace_id,
            span_id,
            sampled,
        }) => {
            let yes = sampled.unwrap_or_else(|| p.sampled_by(trace_id as u64));
            yes.then_some(Root {
                trace_id,
                remote_parent: Some(span_id),
            })
        }
        Some(Incoming::Decision(false)) => None,
        Some(Incoming::Decision(true)) => Some(Root {
            trace_id: new_trace_id(),
            remote_parent: None,
        }),
        None => p.sampled_by(next_u64()).then(|| Root {
            trace_id: new_trace_id(),
            remote_parent: None,
        }),
    };
    if r.is_some() {
        p.stats.traces_sampled.fetch_add(1, Ordering::Relaxed);
    }
    r
}

impl Root {
    /// Make the root span: `make` creates it (a span of target [`TARGET`] with
    /// `parent: None`), and the layer gives it this trace id and remote parent.
    pub fn span(self, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
        PENDING.with(|p| p.set(Some(self)));
        let span = make();
        // Taken by the layer; cleared here if the span was not made (filtered out).
        PENDING.with(|p| p.set(None));
        span
    }
}

/// The root being made on this thread, if any (the layer).
pub(crate) fn take_pending() -> Option<Root> {
    PENDING.with(|p| p.take())
}

/// A root span of target [`TARGET`] when `$root` (an `Option<Root>` from [`root`]) is Some,
/// else `Span::none()`: `root_span!(trace::root(incoming), "http.request", field = value)`.
#[macro_export]
macro_rules! root_span {
    ($root:expr, $name:literal $(, $($fields:tt)*)?) => {
        match $root {
            Some(root) => root.span(|| {
                ::tracing::info_span!(target: $crate::trace::TARGET, parent: None, $name $(, $($fields)*)?)
            }),
            None => ::tracing::Span::none(),
        }
    };
}

/// A child span of `$parent` (a `&Span`) of target [`TARGET`], or `Span::none()` when the
/// parent is not traced (costs one check then).
#[macro_export]
macro_rules! child_span {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {{
        let parent: &::tracing::Span = $parent;
        if parent.is_none() {
            ::tracing::Span::none()
        } else {
            ::tracing::info_span!(target: $crate::trace::TARGET, parent: parent, $name $(, $($fields)*)?)
        }
    }};
}

/// The `/metrics` lines of tracing (only while it is on).
pub fn render(out: &mut String) {
    let Some(p) = pipeline() else {
        return;
    };
    let s = &p.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP switchboard_trace_traces_sampled_total Sampled traces started on this node (root spans)\n# TYPE switchboard_trace_traces_sampled_total counter\nswitchboard_trace_traces_sampled_total {}",
        load(&s.traces_sampled)
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_trace_spans_exported_total Spans the trace collector accepted\n# TYPE switchboard_trace_spans_exported_total counter\nswitchboard_trace_spans_exported_total {}",
        load(&s.exported)
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_trace_spans_dropped_total Spans not exported: queue_full (the exporter is behind or backing off), export_failed (the collector did not take the batch)\n# TYPE switchboard_trace_spans_dropped_total counter\nswitchboard_trace_spans_dropped_total{{reason=\"queue_full\"}} {}\nswitchboard_trace_spans_dropped_total{{reason=\"export_failed\"}} {}",
        load(&s.dropped_queue_full),
        load(&s.dropped_export_failed)
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_trace_export_failures_total Export requests that failed\n# TYPE switchboard_trace_export_failures_total counter\nswitchboard_trace_export_failures_total {}",
        load(&s.export_failures)
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_trace_queue_spans Finished spans waiting for the exporter\n# TYPE switchboard_trace_queue_spans gauge\nswitchboard_trace_queue_spans {}",
        p.queued()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Caller = Caller::Trusted;

    fn pipeline_of(ratio: f64) -> Pipeline {
        pipeline_following(ratio, TraceParentSampled::Api)
    }

    fn pipeline_following(ratio: f64, follow: TraceParentSampled) -> Pipeline {
        let (tx, rx) = crossbeam_channel::bounded(4);
        Pipeline {
            threshold: (ratio * 18_446_744_073_709_551_616.0) as u64,
            always: ratio >= 1.0,
            follow,
            tx,
            rx,
            exporter: TraceExporter::Otlp,
            stats: TraceStats::default(),
        }
    }

    #[test]
    fn sampling_honours_the_parent_then_the_ratio() {
        let none = pipeline_of(0.0);
        let all = pipeline_of(1.0);
        let parent = |sampled| {
            Some(Incoming::Parent {
                trace_id: 7,
                span_id: 9,
                sampled,
            })
        };
        assert_eq!(decide(&none, None, T), None);
        assert!(decide(&all, None, T).is_some_and(|r| r.remote_parent.is_none() && r.trace_id != 0));
        // A sampled parent is followed at ratio 0, an unsampled one refused at ratio 1.
        assert_eq!(
            decide(&none, parent(Some(true)), T),
            Some(Root {
                trace_id: 7,
                remote_parent: Some(9)
            })
        );
        assert_eq!(decide(&all, parent(Some(false)), T), None);
        assert_eq!(decide(&none, Some(Incoming::Decision(false)), T), None);
        assert!(decide(&none, Some(Incoming::Decision(true)), T).is_some());
        // Deferred: by the trace id's low 64 bits against the ratio.
        let half = pipeline_of(0.5);
        assert!(decide(&half, parent(None), T).is_some());
        let high = Some(Incoming::Parent {
            trace_id: u128::from(u64::MAX),
            span_id: 9,
            sampled: None,
        });
        assert_eq!(decide(&half, high, T), None);
        assert_eq!(all.stats.traces_sampled.load(Ordering::Relaxed), 1);
        // About the ratio of fresh traces.
        let tenth = pipeline_of(0.1);
        let n = (0..10_000)
            .filter(|_| decide(&tenth, None, T).is_some())
            .count();
        assert!((700..1300).contains(&n), "{n}");
    }

    #[test]
    fn an_end_users_flag_is_followed_only_when_configured() {
        let parent = |sampled| {
            Some(Incoming::Parent {
                trace_id: 7,
                span_id: 9,
                sampled: Some(sampled),
            })
        };
        let u = Caller::EndUser;
        // Default (api): an end user's "sampled" does not force a trace at ratio 0, nor does
        // "not sampled" refuse one at ratio 1; the ratio decides, by the trace id, and the
        // parent is kept.
        let none = pipeline_of(0.0);
        assert_eq!(decide(&none, parent(true), u), None);
        assert_eq!(decide(&none, Some(Incoming::Decision(true)), u), None);
        let all = pipeline_of(1.0);
        assert_eq!(
            decide(&all, parent(false), u),
            Some(Root {
                trace_id: 7,
                remote_parent: Some(9)
            })
        );
        assert!(decide(&all, Some(Incoming::Decision(false)), u).is_some());
        // Trusted callers are followed.
        assert!(decide(&none, parent(true), T).is_some());
        // all: everyone's flag; ignore: nobody's.
        let gw = pipeline_following(0.0, TraceParentSampled::All);
        assert!(decide(&gw, parent(true), u).is_some());
        let ig = pipeline_following(0.0, TraceParentSampled::Ignore);
        assert_eq!(decide(&ig, parent(true), T), None);
        let ig_all = pipeline_following(1.0, TraceParentSampled::Ignore);
        assert!(decide(&ig_all, parent(false), T).is_some());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let p = pipeline_of(1.0);
        for i in 0..6 {
            p.push(encode::tests::record(i));
        }
        assert_eq!(p.queued(), 4);
        assert_eq!(p.stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        assert_eq!(p.take(3).len(), 3);
        assert_eq!(p.take(3).len(), 1);
    }

    #[test]
    fn the_layer_links_children_to_their_root() {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(layer::TraceLayer::new());
        tracing::subscriber::with_default(subscriber, || {
            let root = Root {
                trace_id: 0xabc,
                remote_parent: Some(7),
            };
            let span = crate::root_span!(Some(root), "r", otel.kind = "server");
            let (trace_id, root_id) = context_of(&span).expect("traced");
            assert_eq!(trace_id, 0xabc);
            let child = crate::child_span!(&span, "c");
            let (t, c) = context_of(&child).expect("traced child");
            assert_eq!(t, 0xabc);
            assert_ne!(c, root_id);
            // Not sampled: no span at all, and its children none either.
            let none = crate::root_span!(None::<Root>, "r");
            assert!(none.is_none());
            assert!(crate::child_span!(&none, "c").is_none());
            // A span of another target is not traced.
            let other = tracing::info_span!("plain");
            assert_eq!(context_of(&other), None);
        });
    }

    #[test]
    fn ids_are_never_zero_and_differ() {
        let a = new_trace_id();
        let b = new_trace_id();
        assert!(a != 0 && b != 0 && a != b);
        assert_ne!(new_span_id(), new_span_id());
    }
}
