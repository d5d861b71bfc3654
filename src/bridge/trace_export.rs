//! The trace exporter: one task on the bridge's runtime, only when `trace_exporter` is not
//! `off`, that sends the spans [`crate::trace`] queued to the collector, every
//! `trace_export_interval`, at most `trace_export_batch_max` per request: OTLP/HTTP JSON
//! (`POST` to e.g. `/v1/traces`) or Zipkin v2 JSON (`/api/v2/spans`), through the bridge's own
//! HTTP client (`http_client`, the one Eureka uses).
//!
//! Why the bridge and not a thread of its own: the bridge already runs an async runtime with
//! the HTTP client, and exporting is a few small POSTs a second, never on a shard. A thread
//! would add a runtime (or a blocking client) for nothing. Nothing here blocks the bridge:
//! every request runs under `trace_export_timeout`, and encoding a batch of 512 spans takes
//! well under a millisecond.
//!
//! A batch the collector does not take (unreachable, slow, non-2xx) is dropped and counted
//! (`switchboard_trace_spans_dropped_total{reason="export_failed"}`): traces are a debugging
//! aid, never worth memory or retries the node needs. The next attempt waits a capped,
//! jittered backoff (up to [`RETRY_MAX`]); meanwhile the queue fills and what does not fit is
//! dropped and counted too (`reason="queue_full"`). The collector is logged when it stops and
//! starts answering, never per batch. At exit what is queued is sent once, within
//! `trace_export_timeout`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::http_client::{Client, Options, Url};
use crate::cluster::Backoff;
use crate::config::{Config, TraceExporter};
use crate::trace::{encode, Pipeline};

/// Longest wait between attempts while the collector does not answer.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Largest answer body read from a collector (they answer `{}` or a partial-success note).
const ANSWER_BYTES_MAX: usize = 64 * 1024;
/// Largest answer head read from a collector.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Batches sent per interval at most: a queue refilled faster than this is dropped at its
/// bound instead of keeping the bridge busy.
const BATCHES_PER_TICK_MAX: usize = 16;
/// `User-Agent` of every request.
const USER_AGENT: &str = concat!("switchboard/", env!("CARGO_PKG_VERSION"));

/// The exporter: where, how, and the client.
pub struct Exporter {
    p: &'static Pipeline,
    url: Url,
    format: TraceExporter,
    service: String,
    batch_max: usize,
    interval: Duration,
    timeout: Duration,
    client: Client,
    /// The collector answered the last request (for logging changes only).
    up: bool,
}

/// Spans taken from the queue for one request: counted as `export_failed` when dropped before
/// the collector took them (a failed request, or one abandoned by the exit's abort), so every
/// span is exported or counted.
struct Taken<'a> {
    n: u64,
    stats: &'a crate::trace::TraceStats,
    exported: bool,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.exported {
            self.stats
                .dropped_export_failed
                .fetch_add(self.n, Ordering::Relaxed);
        }
    }
}

impl Exporter {
    /// The exporter for `cfg` (validated: the URL parses), or None when tracing is off.
    pub fn new(p: &'static Pipeline, cfg: &Config) -> Option<Exporter> {
        let url = match Url::parse(cfg.trace_url()) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "trace exporter: bad trace_endpoint; no spans are exported");
                return None;
            }
        };
        Some(Exporter {
            p,
            url,
            format: cfg.trace_exporter,
            service: cfg.trace_service().to_owned(),
            batch_max: cfg.trace_export_batch_max.max(1),
            interval: cfg.trace_export_interval,
            timeout: cfg.trace_export_timeout,
            client: Client::new(Options {
                connect_timeout: cfg.trace_export_timeout,
                idle_per_host_max: 1,
                // Below the common collectors' idle timeouts (the OpenTelemetry Collector's
                // Go server: 90 s... but proxies in front may be shorter).
                idle_timeout: Duration::from_secs(4),
                hosts_max: 1,
                head_bytes_max: HEAD_BYTES_MAX,
                user_agent: USER_AGENT,
            }),
            up: true,
        })
    }

    /// The request body of `spans` in the configured format.
    pub fn body(&self, spans: &[encode::SpanRecord]) -> Vec<u8> {
        match self.format {
            TraceExporter::Zipkin => encode::zipkin_json(&self.service, spans),
            _ => encode::otlp_json(&self.service, spans),
        }
    }

    /// Send one batch of queued spans; Ok(n) spans sent (0: the queue was empty), Err after a
    /// failed request (its spans dropped and counted).
    async fn send_batch(&mut self, timeout: Duration) -> Result<usize, ()> {
        let spans = self.p.take(self.batch_max);
        if spans.is_empty() {
            return Ok(0);
        }
        let body = self.body(&spans);
        let n = spans.len() as u64;
        drop(spans);
        let stats = &self.p.stats;
        // Counted dropped unless the collector takes them, also when this future is dropped
        // mid-request (the task aborted at exit).
        let mut taken = Taken {
            n,
            stats,
            exported: false,
        };
        let why = match self
            .client
            .post_json(&self.url, &[], &body, timeout, ANSWER_BYTES_MAX)
            .await
        {
            Ok(r) if (200..300).contains(&r.status) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                taken.exported = true;
                if !self.up {
                    self.up = true;
                    tracing::info!(url = %self.url.authority(), "trace exporter: the collector takes spans again");
                }
                return Ok(n as usize);
            }
            Ok(r) => format!("answered {}", r.status),
            Err(e) => format!("{e:?}"),
        };
        drop(taken);
        stats.export_failures.fetch_add(1, Ordering::Relaxed);
        if self.up {
            self.up = false;
            tracing::warn!(url = %self.url.authority(), why = %why, "trace exporter: the collector did not take spans; dropping them (counted) and backing off");
        }
        Err(())
    }

    /// Export until the task is aborted (the bridge's exit; [`Exporter::flush`] on a new
    /// exporter sends what is left): every interval, batches
    /// until the queue is empty (at most [`BATCHES_PER_TICK_MAX`]), then sleep; after a
    /// failure, a backoff instead.
    pub async fn run(&mut self) {
        let mut backoff = Backoff::new(RETRY_MAX, crate::trace::new_span_id());
        loop {
            tokio::time::sleep(self.interval).await;
            for _ in 0..BATCHES_PER_TICK_MAX {
                match self.send_batch(self.timeout).await {
                    Ok(n) if n < self.batch_max => {
                        backoff.reset();
                        break;
                    }
                    Ok(_) => backoff.reset(),
                    Err(()) => {
                        tokio::time::sleep(backoff.wait().saturating_sub(self.interval)).await;
                        break;
                    }
                }
            }
        }
    }

    /// At exit: send what is queued, all within one `trace_export_timeout`.
    pub async fn flush(&mut self) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        for _ in 0..BATCHES_PER_TICK_MAX {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.send_batch(left).await {
                Ok(n) if n == self.batch_max => continue,
                _ => return,
            }
        }
    }
}
