//! Svix-style webhook delivery: one FIFO queue per simulator (so one member's events arrive
//! in order), one background sender, retries with the same `svix-id` and a fresh
//! `svix-timestamp`/signature per attempt, then "failed" after the backoff schedule.
//! Svix's real schedule is minutes to hours (docs/external-services.md §1.5); tests need seconds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::ingest::verify::SvixVerifier;
use crate::sim::SimError;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Queued or being retried.
    Pending,
    /// Answered 2xx.
    Delivered,
    /// Every attempt of the schedule failed.
    Failed,
}

/// One webhook message and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    /// `msg_<uuid>`, identical on every attempt.
    pub svix_id: String,
    pub event: String,
    pub member_id: String,
    /// The body's `timestamp` (time of the change, Unix ms).
    pub timestamp_ms: i64,
    /// The exact bytes sent (and signed).
    pub body: String,
    pub attempts: u32,
    pub status: DeliveryStatus,
    /// Status code of the last attempt, if the receiver answered.
    pub last_response_status: Option<u16>,
    /// Transport error of the last attempt, if any.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    /// Indices into `deliveries` still to send; the front one is in flight.
    queue: VecDeque<usize>,
    deliveries: Vec<Delivery>,
    paused: bool,
}

pub(crate) struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    /// Undelivered messages (queued + in flight), for the quiescence wait.
    pending: watch::Sender<usize>,
    enabled: bool,
}

impl Outbox {
    pub fn new(enabled: bool) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            pending: watch::channel(0).0,
            enabled,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `event` for `member_id`; does nothing when no webhook URL is configured.
    pub fn enqueue(&self, event: &str, member_id: &str, timestamp_ms: i64, payload: Value) {
        if !self.enabled {
            return;
        }
        let body = json!({"event": event, "timestamp": timestamp_ms, "payload": payload});
        let mut s = self.lock();
        let index = s.deliveries.len();
        s.deliveries.push(Delivery {
            svix_id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            event: event.to_owned(),
            member_id: member_id.to_owned(),
            timestamp_ms,
            body: body.to_string(),
            attempts: 0,
            status: DeliveryStatus::Pending,
            last_response_status: None,
            last_error: None,
        });
        s.queue.push_back(index);
        self.pending.send_replace(s.queue.len());
        drop(s);
        self.wake.notify_one();
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.wake.notify_one();
    }

    /// Waits until every queued message was delivered or failed.
    pub async fn wait_quiescent(&self, timeout: Duration) -> Result<(), SimError> {
        let mut rx = self.pending.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .map_err(|_| SimError::Timeout(timeout))?
            .map(|_| ())
            .map_err(|_| SimError::Timeout(timeout))
    }

    /// The next message to send, once there is one and delivery is not paused.
    async fn next(&self, shutdown: &CancellationToken) -> Option<(usize, String, String)> {
        loop {
            {
                let s = self.lock();
                if !s.paused
                    && let Some(&i) = s.queue.front()
                {
                    let d = &s.deliveries[i];
                    return Some((i, d.svix_id.clone(), d.body.clone()));
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }

    fn record_attempt(&self, index: usize, status: Option<u16>, error: Option<String>) {
        let mut s = self.lock();
        let d = &mut s.deliveries[index];
        d.attempts += 1;
        d.last_response_status = status;
        d.last_error = error;
    }

    fn finish(&self, index: usize, status: DeliveryStatus) {
        let mut s = self.lock();
        s.deliveries[index].status = status;
        s.queue.pop_front();
        self.pending.send_replace(s.queue.len());
    }
}

pub(crate) struct Sender {
    pub outbox: Arc<Outbox>,
    pub client: reqwest::Client,
    pub url: String,
    pub signer: SvixVerifier,
    pub backoff: Vec<Duration>,
    pub shutdown: CancellationToken,
}

impl Sender {
    pub async fn run(self) {
        while let Some((index, id, body)) = self.outbox.next(&self.shutdown).await {
            let mut failures = 0;
            loop {
                let (status, error) = self.attempt(&id, &body).await;
                self.outbox.record_attempt(index, status, error);
                if status.is_some_and(|s| (200..300).contains(&s)) {
                    self.outbox.finish(index, DeliveryStatus::Delivered);
                    break;
                }
                let Some(delay) = self.backoff.get(failures).copied() else {
                    self.outbox.finish(index, DeliveryStatus::Failed);
                    break;
                };
                failures += 1;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.shutdown.cancelled() => return,
                }
                // A retry waits while delivery is paused, like the first attempt.
                if self.outbox.next(&self.shutdown).await.is_none() {
                    return;
                }
            }
        }
    }

    async fn attempt(&self, id: &str, body: &str) -> (Option<u16>, Option<String>) {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = self.signer.sign(id, timestamp, body.as_bytes());
        let result = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("svix-id", id)
            .header("svix-timestamp", timestamp.to_string())
            .header("svix-signature", signature)
            .body(body.to_owned())
            .send()
            .await;
        match result {
            Ok(response) => (Some(response.status().as_u16()), None),
            Err(e) => (None, Some(e.to_string())),
        }
    }
}
