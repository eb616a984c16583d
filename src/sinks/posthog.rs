//! PostHog capture (docs/external-services.md §5): events go through a bounded queue to one
//! background task that POSTs them to `{host}/batch/`.
//!
//! Analytics must never hold back a sync, so `capture` never waits: when the queue is full the
//! event is dropped and counted. A batch is retried on 429/5xx/transport errors and dropped
//! (counted, logged with PostHog's status, never the key) after `max_attempts` or on any other
//! 4xx: 400 and 401 mean the batch or the key is wrong and retrying cannot fix it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::PostHogConfig;
use crate::sinks::retry::{self, Failure, RetryPolicy};

/// Namespace of the deterministic event uuids. Never change it: PostHog dedups re-sent events
/// by uuid, and a new namespace would make every replayed event look new.
pub const UUID_NAMESPACE: Uuid = Uuid::from_u128(0x6d5b_1c3e_8a4f_4b1e_9f2d_7c0a_e5b3_d914);

/// After shutdown is asked for, queued events get this long to be sent; the rest are counted
/// as failed.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One event for PostHog's `/batch/`.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureEvent {
    pub event: String,
    pub distinct_id: String,
    pub properties: Map<String, Value>,
    pub timestamp: DateTime<Utc>,
    pub uuid: Uuid,
}

impl CaptureEvent {
    /// An event whose uuid is derived from `event` and `dedup_key` (e.g. the change's Kafka
    /// coordinates or webhook id), so re-processing a change re-sends the same uuid.
    ///
    /// PostHog dedups on uuid + event + timestamp + distinct_id: for a replay to dedup, set the
    /// timestamp from the change itself ([`with_timestamp`](Self::with_timestamp)); the default
    /// is now.
    pub fn new(event: impl Into<String>, distinct_id: impl Into<String>, dedup_key: &str) -> Self {
        let event = event.into();
        let uuid = Self::dedup_uuid(&event, dedup_key);
        Self {
            event,
            distinct_id: distinct_id.into(),
            properties: Map::new(),
            timestamp: Utc::now(),
            uuid,
        }
    }

    /// UUIDv5(`UUID_NAMESPACE`, `"{event}:{dedup_key}"`).
    pub fn dedup_uuid(event: &str, dedup_key: &str) -> Uuid {
        Uuid::new_v5(&UUID_NAMESPACE, format!("{event}:{dedup_key}").as_bytes())
    }

    pub fn with_timestamp(mut self, timestamp: DateTime<Utc>) -> Self {
        self.timestamp = timestamp;
        self
    }

    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    fn to_wire(&self) -> Value {
        json!({
            "event": self.event,
            "distinct_id": self.distinct_id,
            "properties": self.properties,
            "timestamp": self.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true),
            "uuid": self.uuid,
        })
    }
}

#[derive(Clone)]
struct PostHogMetrics {
    /// `sent`, `dropped` (queue full or closed), `failed` (batch given up).
    events: IntCounterVec,
    /// Final status of each batch: the HTTP status, `timeout` or `transport`.
    batches: IntCounterVec,
    dropped: IntCounter,
}

impl PostHogMetrics {
    // Constant options: construction cannot fail at runtime.
    #[allow(clippy::expect_used)]
    fn new(registry: Option<&Registry>) -> Self {
        let m = Self {
            events: IntCounterVec::new(
                Opts::new(
                    "membersync_posthog_events_total",
                    "PostHog events by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            batches: IntCounterVec::new(
                Opts::new(
                    "membersync_posthog_batches_total",
                    "PostHog /batch/ requests by final status.",
                ),
                &["status"],
            )
            .expect("valid metric"),
            dropped: IntCounter::new(
                "membersync_posthog_dropped_total",
                "PostHog events dropped because the queue was full.",
            )
            .expect("valid metric"),
        };
        super::registry::register_all(
            registry,
            "posthog",
            vec![
                Box::new(m.events.clone()),
                Box::new(m.batches.clone()),
                Box::new(m.dropped.clone()),
            ],
        );
        m
    }
}

/// Handle to the capture queue. Cheap to clone; the background task flushes and stops when
/// [`shutdown`](Self::shutdown) is called or the last handle is dropped.
#[derive(Clone)]
pub struct PostHog {
    tx: mpsc::Sender<CaptureEvent>,
    stop: CancellationToken,
    metrics: PostHogMetrics,
}

impl std::fmt::Debug for PostHog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostHog")
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .finish()
    }
}

impl PostHog {
    /// Starts the background sender. `None` when `api_key` is unset: PostHog is off.
    /// Must be called inside a tokio runtime.
    pub fn start(
        cfg: &PostHogConfig,
        metrics: Option<&Registry>,
    ) -> Option<(PostHog, tokio::task::JoinHandle<()>)> {
        let api_key = cfg
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())?
            .to_string();
        let metrics = PostHogMetrics::new(metrics);
        let http = match reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .user_agent(concat!("membersync/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(http) => http,
            Err(err) => {
                tracing::error!(error = %retry::transport_message(err), "PostHog disabled: cannot build HTTP client");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let stop = CancellationToken::new();
        let worker = Worker {
            http,
            url: format!("{}/batch/", cfg.host.trim_end_matches('/')),
            api_key,
            batch_size: cfg.batch_size.max(1),
            flush_interval: Duration::from_millis(cfg.flush_interval_ms.max(1)),
            policy: RetryPolicy::new(cfg.max_attempts, BACKOFF_BASE, BACKOFF_MAX),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(worker.run(rx, stop.clone()));
        Some((PostHog { tx, stop, metrics }, task))
    }

    /// Queues an event without waiting. A full (or closed) queue drops it and counts it.
    pub fn capture(&self, event: CaptureEvent) {
        if self.tx.try_send(event).is_err() {
            self.metrics.dropped.inc();
            self.metrics.events.with_label_values(&["dropped"]).inc();
        }
    }

    /// Asks the task to send what is queued and stop (within a few seconds); await the
    /// `JoinHandle` from [`start`](Self::start) to wait for it. Other clones' later captures
    /// are dropped.
    pub fn shutdown(self) {
        self.stop.cancel();
    }
}

struct Worker {
    http: reqwest::Client,
    url: String,
    /// The project key: public by PostHog's design, still never logged.
    api_key: String,
    batch_size: usize,
    flush_interval: Duration,
    policy: RetryPolicy,
    metrics: PostHogMetrics,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<CaptureEvent>, stop: CancellationToken) {
        // Events taken off the queue but not yet sent or given up: what a cut-short flush loses.
        let unsent = AtomicU64::new(0);
        {
            let work = self.work(&mut rx, &stop, &unsent);
            tokio::pin!(work);
            tokio::select! {
                () = &mut work => {}
                () = async { stop.cancelled().await; tokio::time::sleep(SHUTDOWN_FLUSH).await } => {}
            }
        }
        rx.close();
        let mut lost = unsent.load(Ordering::Relaxed);
        while rx.try_recv().is_ok() {
            lost += 1;
        }
        if lost > 0 {
            self.metrics
                .events
                .with_label_values(&["failed"])
                .inc_by(lost);
            tracing::warn!(lost, "PostHog events not sent before shutdown");
        }
    }

    async fn work(
        &self,
        rx: &mut mpsc::Receiver<CaptureEvent>,
        stop: &CancellationToken,
        unsent: &AtomicU64,
    ) {
        let mut buf: Vec<CaptureEvent> = Vec::with_capacity(self.batch_size);
        let mut flush_at: Option<Instant> = None;
        loop {
            let room = self.batch_size - buf.len();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    flush_at = None;
                    self.send(std::mem::take(&mut buf), unsent).await;
                }
                n = rx.recv_many(&mut buf, room) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                    unsent.fetch_add(n as u64, Ordering::Relaxed);
                    if buf.len() >= self.batch_size {
                        flush_at = None;
                        self.send(std::mem::take(&mut buf), unsent).await;
                    } else if flush_at.is_none() {
                        flush_at = Some(Instant::now() + self.flush_interval);
                    }
                }
            }
        }
        // Flush: what is buffered plus what is still queued, in full batches.
        rx.close();
        while let Ok(event) = rx.try_recv() {
            unsent.fetch_add(1, Ordering::Relaxed);
            buf.push(event);
        }
        for chunk in buf.chunks(self.batch_size) {
            self.send(chunk.to_vec(), unsent).await;
        }
    }

    async fn send(&self, batch: Vec<CaptureEvent>, unsent: &AtomicU64) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = json!({
            "api_key": self.api_key,
            "batch": batch.iter().map(CaptureEvent::to_wire).collect::<Vec<_>>(),
        });
        let result = self
            .policy
            .run(
                |_| self.post(&body),
                |attempt, status, delay| {
                    tracing::debug!(
                        attempt,
                        status,
                        delay_ms = delay.as_millis() as u64,
                        "retrying PostHog batch"
                    );
                },
            )
            .await;
        unsent.fetch_sub(n, Ordering::Relaxed);
        match result {
            Ok(status) => {
                self.metrics
                    .batches
                    .with_label_values(&[status.as_str()])
                    .inc();
                self.metrics.events.with_label_values(&["sent"]).inc_by(n);
            }
            Err(status) => {
                self.metrics
                    .batches
                    .with_label_values(&[status.as_str()])
                    .inc();
                self.metrics.events.with_label_values(&["failed"]).inc_by(n);
                tracing::warn!(events = n, posthog_status = %status, "PostHog batch dropped");
            }
        }
    }

    /// One POST; `Ok`/`Err` carry the status label.
    async fn post(&self, body: &Value) -> Result<String, Failure<String>> {
        match self.http.post(&self.url).json(body).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = retry::retry_after_header(response.headers());
                // Drain the body so the connection can be reused; its content is not needed.
                let _ = response.bytes().await;
                let label = status.to_string();
                if (200..300).contains(&status) {
                    Ok(label)
                } else if retry::classify_status(status) == retry::Class::Retryable {
                    Err(Failure::retryable(label, retry_after))
                } else {
                    Err(Failure::permanent(label))
                }
            }
            Err(err) if err.is_timeout() => Err(Failure::retryable("timeout".into(), None)),
            Err(err) => {
                tracing::debug!(error = %retry::transport_message(err), "PostHog request failed");
                Err(Failure::retryable("transport".into(), None))
            }
        }
    }
}

#[cfg(test)]
mod tests;
