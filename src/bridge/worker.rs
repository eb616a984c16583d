//! A bridge worker: delivers the outcome records routed to it (all of one member's records go
//! to the same worker, in partition order), one record at a time, to every URL its routes
//! name (those in parallel). A URL that keeps failing gets a dead letter on
//! `<prefix>.bridge.dlq`; only when every URL was answered 2xx or dead-lettered (Kafka
//! acknowledged it) is the record reported finished, so that its offset may be committed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;

use super::client::MakeClient;
use super::dlq::{BridgeDeadLetter, BridgeError, Failed};
use super::metrics::BridgeMetrics;
use super::route::{OutcomeHead, Router, Target};
use crate::kafka::producer::{Producer, Record, Sent};
use crate::sinks::retry::{Class, RetryPolicy};

/// What every worker shares.
pub struct Shared {
    pub router: Router,
    pub client: MakeClient,
    pub policy: RetryPolicy,
    pub producer: Producer,
    pub dlq_topic: String,
    pub metrics: BridgeMetrics,
    pub kafka_wait: Duration,
}

/// The end of one delivery to one URL.
enum Delivery {
    Delivered,
    Failed { error: BridgeError, attempts: u32 },
    Interrupted,
}

/// Delivers one record to every URL its routes name. Returns false when interrupted by
/// shutdown before the record was finished (it is delivered again after the restart).
pub async fn process(shared: &Shared, m: &OwnedMessage, stop: &CancellationToken) -> bool {
    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let outcome: OutcomeHead = match serde_json::from_slice(&payload) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "not an outcome record: dead-lettered");
            shared
                .metrics
                .outcomes
                .with_label_values(&["undecodable"])
                .inc();
            let error = BridgeError {
                kind: "decode".into(),
                message: format!("not an outcome record: {e}"),
                status: None,
                retryable: false,
            };
            let letter = BridgeDeadLetter::new(m, None, error, 0, None);
            return dead_letter(shared, &letter, "none", stop).await;
        }
    };
    let targets = shared.router.targets(&outcome);
    if targets.is_empty() {
        tracing::debug!(event_id = %outcome.event_id, status = %outcome.status, event_type = %outcome.event_type, "no route for this outcome; skipped");
        shared
            .metrics
            .outcomes
            .with_label_values(&["unrouted"])
            .inc();
        return true;
    }
    shared.metrics.outcomes.with_label_values(&["routed"]).inc();
    let results = futures::future::join_all(
        targets
            .iter()
            .map(|t| deliver(shared, t, &outcome, payload.clone(), stop)),
    )
    .await;
    let mut complete = true;
    for (target, result) in targets.iter().zip(results) {
        match result {
            Delivery::Delivered => {}
            Delivery::Interrupted => complete = false,
            Delivery::Failed { error, attempts } => {
                let letter = BridgeDeadLetter::new(
                    m,
                    Some(Failed {
                        route: &target.route,
                        index: target.index,
                        host: &target.host,
                    }),
                    error,
                    attempts,
                    Some((&outcome.id, &outcome.event_id)),
                );
                if !dead_letter(shared, &letter, &target.route, stop).await {
                    return false;
                }
            }
        }
    }
    complete
}

/// Attempts one URL until it answers 2xx, fails permanently, or the attempts run out.
async fn deliver(
    shared: &Shared,
    target: &Target,
    outcome: &OutcomeHead,
    body: Bytes,
    stop: &CancellationToken,
) -> Delivery {
    let started = Instant::now();
    let attempts = shared.policy.max_attempts.max(1);
    let mut attempt = 1;
    let finish = |status: &str| {
        shared
            .metrics
            .deliveries
            .with_label_values(&[&target.route, status])
            .inc();
        shared
            .metrics
            .delivery_seconds
            .with_label_values(&[&target.route])
            .observe(started.elapsed().as_secs_f64());
    };
    loop {
        let result = tokio::select! {
            r = shared.client.post(target, outcome, body.clone(), attempt) => r,
            _ = stop.cancelled() => return Delivery::Interrupted,
        };
        let error = match result {
            Ok(status) => {
                finish(&status.to_string());
                tracing::debug!(route = %target.route, host = %target.host, event_id = %outcome.event_id, attempt, "outcome delivered");
                return Delivery::Delivered;
            }
            Err(e) => e,
        };
        let retryable = error.class() == Class::Retryable;
        let too_long = error
            .retry_after()
            .filter(|ra| *ra > shared.policy.max_retry_after);
        if !retryable || attempt >= attempts || too_long.is_some() {
            let (kind, message, label) = match too_long {
                Some(ra) => (
                    "retry_after_too_long".to_owned(),
                    format!(
                        "{error}; Retry-After {}s exceeds bridge.max_retry_after_secs",
                        ra.as_secs()
                    ),
                    "retry_after_too_long".to_owned(),
                ),
                None => (error.kind().to_owned(), error.to_string(), error.label()),
            };
            finish(&label);
            tracing::error!(route = %target.route, host = %target.host, event_id = %outcome.event_id, attempt, error = %message, "outcome not delivered: dead-lettered");
            return Delivery::Failed {
                error: BridgeError {
                    kind,
                    message,
                    status: error.status(),
                    retryable,
                },
                attempts: attempt,
            };
        }
        shared
            .metrics
            .retries
            .with_label_values(&[&target.route, &error.label()])
            .inc();
        let wait = shared.policy.delay(attempt, error.retry_after());
        tracing::warn!(route = %target.route, host = %target.host, event_id = %outcome.event_id, attempt, retry_in_ms = wait.as_millis() as u64, error = %error, "delivery failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return Delivery::Interrupted,
        }
        attempt += 1;
    }
}

/// Produces the dead letter and waits for Kafka's acknowledgement, however long Kafka is away
/// (the record is not finished before). `false`: stopped first, or the producer broke (the
/// worker then ends, and with it the role, to be restarted).
async fn dead_letter(
    shared: &Shared,
    letter: &BridgeDeadLetter,
    route: &str,
    stop: &CancellationToken,
) -> bool {
    let payload = serde_json::to_vec(letter).unwrap_or_default();
    let key = letter.key.clone().unwrap_or_default();
    let record = Record {
        topic: &shared.dlq_topic,
        key: key.as_bytes(),
        payload: &payload,
        headers: &[("membersync-dlq-id", letter.id.as_bytes())],
    };
    let sent = shared
        .producer
        .send_until_acknowledged(&record, shared.kafka_wait, stop, BridgeDeadLetter::shrink)
        .await;
    match sent {
        Sent::Acknowledged { .. } => {
            shared
                .metrics
                .dead_letters
                .with_label_values(&[route, &letter.error.kind])
                .inc();
            true
        }
        // Refused even without its outcome (not for size: what is left is a few hundred
        // bytes): the producer logged it, and retrying cannot help.
        Sent::Refused(_) => true,
        Sent::Stopped => false,
        Sent::Fatal(e) => {
            tracing::error!(error = %e, "the Kafka producer failed fatally; the bridge stops to be restarted");
            false
        }
    }
}
