//! A merge worker: processes the records routed to it (all of one member's records go to the
//! same worker, in partition order), one at a time, with retries and backoff; a record that
//! exhausts its attempts, or cannot be decoded, goes to the dead-letter topic. Then it
//! announces the outcome and reports the record finished — only then may its offset be
//! committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::apply::{Applier, ApplyError};
use super::change::{self, Change, Position, TopicKind};
use super::dlq::{DeadLetter, DlqError};
use super::metrics::MergeMetrics;
use super::outcome::{Outcome, Status};
use crate::config::{DatabaseConfig, MergeConfig};
use crate::db::{self, Login};
use crate::kafka::producer::{Producer, Record};
use crate::sinks::posthog::PostHog;

/// A record to process.
pub struct Job {
    pub message: OwnedMessage,
    pub kind: TopicKind,
}

/// A record whose effects (or dead letter) are durable.
#[derive(Debug)]
pub struct Finished {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What every worker shares.
pub struct Shared {
    pub cfg: Arc<MergeConfig>,
    pub database: DatabaseConfig,
    pub applier: Applier,
    pub producer: Producer,
    pub sync_topic: String,
    pub dlq_topic: String,
    pub posthog: Option<PostHog>,
    pub metrics: MergeMetrics,
    pub kafka_wait: Duration,
}

pub async fn run(
    shared: Arc<Shared>,
    mut jobs: mpsc::Receiver<Job>,
    finished: mpsc::UnboundedSender<Finished>,
    stop: CancellationToken,
) {
    let mut db: Option<Client> = None;
    while let Some(job) = jobs.recv().await {
        let done = Finished {
            topic: job.message.topic().to_owned(),
            partition: job.message.partition(),
            offset: job.message.offset(),
        };
        if process(&shared, &mut db, job, &stop).await {
            let _ = finished.send(done);
        } else {
            // Stopped before the record's effects were durable: it is not reported, so its
            // offset is not committed and the record is read again after the restart.
            break;
        }
    }
}

/// Returns false when interrupted by shutdown before the record was finished.
async fn process(
    shared: &Shared,
    db: &mut Option<Client>,
    job: Job,
    stop: &CancellationToken,
) -> bool {
    let m = &job.message;
    let position = Position {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
    };
    let change = match change::decode(job.kind, position, m.payload()) {
        Ok(mut change) => {
            change.replayed = m
                .headers()
                .is_some_and(|h| h.iter().any(|h| h.key == super::dlq::REPLAY_HEADER));
            change
        }
        Err(e) => {
            tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "undecodable record: dead-lettered");
            let error = DlqError {
                kind: "decode".into(),
                message: e.to_string(),
                retryable: false,
            };
            return dead_letter(shared, m, error, 0, None, stop).await;
        }
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = apply_once(shared, db, &change).await;
        shared
            .metrics
            .apply_seconds
            .with_label_values(&[change.source])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(mut outcome) => {
                outcome.attempts = attempt;
                return announce(shared, &change, outcome, stop).await;
            }
            Err(e) => {
                shared
                    .metrics
                    .failed_attempts
                    .with_label_values(&[e.kind()])
                    .inc();
                if db.as_ref().is_some_and(Client::is_closed) {
                    *db = None;
                }
                let retryable = e.is_retryable();
                if !retryable || attempt >= shared.cfg.max_attempts {
                    tracing::error!(event_id = %change.event_id, member = ?change.member_id, attempt, error = %e, "change failed: dead-lettered");
                    let error = DlqError {
                        kind: e.kind().into(),
                        message: e.to_string(),
                        retryable,
                    };
                    if !dead_letter(shared, m, error.clone(), attempt, Some(&change), stop).await {
                        return false;
                    }
                    let mut outcome = Outcome::new(&change, Status::Failed);
                    outcome.attempts = attempt;
                    outcome.error = Some(error.message);
                    return announce(shared, &change, outcome, stop).await;
                }
                let wait = shared.cfg.backoff(attempt);
                tracing::warn!(event_id = %change.event_id, attempt, retry_in_ms = wait.as_millis() as u64, error = %e, "change failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

async fn apply_once(
    shared: &Shared,
    db: &mut Option<Client>,
    change: &Change,
) -> Result<Outcome, ApplyError> {
    if db.is_none() {
        let client = db::connect(&shared.database, Login::Daemon)
            .await
            .map_err(|e| match e {
                db::DbError::Connect { source, .. } | db::DbError::Query(source) => {
                    ApplyError::Db(source)
                }
                db::DbError::Tls(e) => ApplyError::DbTls(e),
            })?;
        *db = Some(client);
    }
    let client = db.as_mut().expect("connected above");
    shared.applier.apply(client, change).await
}

/// Publishes the outcome on the sync topic (keyed by member) and hands it to PostHog.
/// Retries until Kafka takes it: the record is finished only then.
async fn announce(
    shared: &Shared,
    change: &Change,
    outcome: Outcome,
    stop: &CancellationToken,
) -> bool {
    let status = format!("{:?}", outcome.status).to_lowercase();
    shared
        .metrics
        .changes
        .with_label_values(&[change.source, &status])
        .inc();
    for f in &outcome.fields {
        shared
            .metrics
            .fields
            .with_label_values(&[&f.field, &f.verdict])
            .inc();
    }
    for c in &outcome.conflicts {
        shared
            .metrics
            .conflicts
            .with_label_values(&[&c.field, c.winner.as_str()])
            .inc();
    }
    if outcome.status == Status::Applied {
        let lag = chrono::Utc::now() - change.occurred_at;
        shared
            .metrics
            .change_to_applied
            .observe(lag.num_milliseconds().max(0) as f64 / 1000.0);
    }
    // membersync's own writes coming back through CDC are not news.
    let own = matches!(change.kind, change::ChangeKind::Cdc { own: true, .. });
    if !own {
        let payload = serde_json::to_vec(&outcome).unwrap_or_default();
        let key = change.member_id.clone().unwrap_or_default();
        let headers: [(&str, &[u8]); 3] = [
            ("membersync-event-id", change.event_id.as_bytes()),
            ("membersync-status", status.as_bytes()),
            ("content-type", b"application/json"),
        ];
        let record = Record {
            topic: &shared.sync_topic,
            key: key.as_bytes(),
            payload: &payload,
            headers: &headers,
        };
        if !send_until_acknowledged(shared, &record, stop).await {
            return false;
        }
        if let Some(ph) = &shared.posthog {
            for event in outcome.posthog_events() {
                ph.capture(event);
            }
        }
    }
    true
}

async fn dead_letter(
    shared: &Shared,
    message: &OwnedMessage,
    error: DlqError,
    attempts: u32,
    change: Option<&Change>,
    stop: &CancellationToken,
) -> bool {
    let letter = DeadLetter::new(
        message,
        error.clone(),
        attempts,
        change.map(|c| c.event_id.clone()),
        change.and_then(|c| c.member_id.clone()),
    );
    let payload = serde_json::to_vec(&letter).unwrap_or_default();
    let key = letter.key.clone().unwrap_or_default();
    let record = Record {
        topic: &shared.dlq_topic,
        key: key.as_bytes(),
        payload: &payload,
        headers: &[("membersync-dlq-id", letter.id.as_bytes())],
    };
    if !send_until_acknowledged(shared, &record, stop).await {
        return false;
    }
    shared
        .metrics
        .dead_letters
        .with_label_values(&[&error.kind])
        .inc();
    record_error(shared, &letter).await;
    true
}

/// `error_logs` row for a dead letter. The dead letter itself is the durable record; this
/// row is for people querying the database, so a failure here is logged, not retried.
async fn record_error(shared: &Shared, letter: &DeadLetter) {
    let context = serde_json::json!({
        "dlq_id": letter.id,
        "event_id": letter.event_id,
        "origin": letter.origin,
        "error_kind": letter.error.kind,
    });
    let result = async {
        let client = db::connect(&shared.database, Login::Daemon).await?;
        client
            .execute(
                "insert into public.error_logs (memberstack_id, error_type, error_message, context, retry_count)
                 values ($1, 'sync_failed', $2, $3, $4)",
                &[&letter.member_id, &letter.error.message, &context, &(letter.attempts as i32)],
            )
            .await?;
        Ok::<_, db::DbError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::error!(dlq_id = %letter.id, error = %e, "cannot write error_logs for a dead letter (it is on the DLQ topic)");
    }
}

async fn send_until_acknowledged(
    shared: &Shared,
    record: &Record<'_>,
    stop: &CancellationToken,
) -> bool {
    let mut wait = Duration::from_millis(200);
    loop {
        match shared.producer.send(record, shared.kafka_wait).await {
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(topic = record.topic, error = %e, "Kafka did not take the record; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return false,
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}
