//! A merge worker: processes the records routed to it (all of one member's records go to the
//! same worker, in partition order), one at a time. A change is decided and committed in one
//! short transaction ([`super::apply`]); its outcome and external writes are in the outbox
//! then, and the appliers take it from there ([`super::outbox`]). Only then is the record
//! reported finished, and its offset may be committed.
//!
//! Errors by class: a record that cannot be decoded, or a change that fails the same way every
//! time (a constraint it violates), goes to the dead-letter topic. An infrastructure error
//! (Postgres away, a busy Memberstack when an event must be re-read) is retried with capped,
//! jittered backoff for as long as it lasts — the member's later records wait behind it, and
//! the consumer stops reading when `max_in_flight` records are unfinished. After
//! `merge.max_attempts` failed attempts the change is reported late, once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::apply::{Applier, ApplyError};
use super::change::{self, Change, Position, TopicKind};
use super::dlq::{DeadLetter, DlqError};
use super::metrics::MergeMetrics;
use super::outbox::{self, Origin, Wakeups};
use super::outcome::{Outcome, Status};
use super::report;
use crate::config::{DatabaseConfig, MergeConfig};
use crate::kafka::producer::Producer;
use crate::sinks::posthog::PostHog;

/// What every worker and applier shares.
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
    pub wake: Arc<Wakeups>,
}

/// Processes one record until its effects (or its dead letter) are durable. Returns false
/// when interrupted by shutdown before that: the record is then read again after the restart.
pub async fn process(
    shared: &Shared,
    db: &mut Option<Client>,
    message: OwnedMessage,
    kind: TopicKind,
    stop: &CancellationToken,
) -> bool {
    let m = &message;
    let position = Position {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
    };
    let change = match change::decode(kind, position, m.payload()) {
        Ok(mut change) => {
            let replay_of = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == super::dlq::REPLAY_HEADER)
                    .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
            });
            if let Some(dlq_id) = replay_of {
                // The original's decision may have committed (only its push failed): the
                // replay is a change of its own, processed once per dead letter, and resolved
                // against the current state.
                change.replayed = true;
                change.event_id = format!("{}#replay:{dlq_id}", change.event_id);
            }
            change
        }
        Err(e) => {
            tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "undecodable record: dead-lettered");
            let error = DlqError {
                kind: "decode".into(),
                message: e.to_string(),
                retryable: false,
            };
            let letter = DeadLetter::new(m, error, 0, None, None);
            return dead_letter(shared, db, &letter, stop).await;
        }
    };
    let origin = Origin::of(m, &change.event_id);
    let mut attempt = 0;
    let mut late_reported = false;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = apply_once(shared, db, &change, &origin, attempt).await;
        shared
            .metrics
            .apply_seconds
            .with_label_values(&[change.source])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outcome) => {
                count(shared, &change, &outcome);
                wake(&shared.wake);
                return true;
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
                if !e.is_retryable() {
                    tracing::error!(event_id = %change.event_id, member = ?change.member_id, attempt, error = %e, "change failed permanently: dead-lettered");
                    let error = DlqError {
                        kind: e.kind().into(),
                        message: e.to_string(),
                        retryable: false,
                    };
                    let letter = DeadLetter::new(
                        m,
                        error.clone(),
                        attempt,
                        Some(change.event_id.clone()),
                        change.member_id.clone(),
                    );
                    if !dead_letter(shared, db, &letter, stop).await {
                        return false;
                    }
                    let mut outcome = Outcome::new(&change, Status::Failed);
                    outcome.attempts = attempt;
                    outcome.error = Some(error.message);
                    return announce_failure(shared, db, &change, outcome, stop).await;
                }
                if attempt >= shared.cfg.max_attempts && !late_reported {
                    late_reported = true;
                    report_late(shared, db, &change, &e, attempt).await;
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
    origin: &Origin,
    attempt: u32,
) -> Result<Outcome, ApplyError> {
    let client = report::connected(&shared.database, db)
        .await
        .map_err(|e| match e {
            crate::db::DbError::Connect { source, .. } | crate::db::DbError::Query(source) => {
                ApplyError::Db(source)
            }
            crate::db::DbError::Tls(e) => ApplyError::DbTls(e),
        })?;
    shared.applier.apply(client, change, origin, attempt).await
}

/// New work for this instance's appliers and relay: wakes the idle ones, and leaves a permit
/// for one that is busy checking right now.
fn wake(w: &Wakeups) {
    for n in [&w.memberstack, &w.auth, &w.outcomes] {
        n.notify_waiters();
        n.notify_one();
    }
}

fn count(shared: &Shared, change: &Change, outcome: &Outcome) {
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
}

/// The dead-lettered change's `failed` outcome goes through the outbox like every outcome
/// (waiting for the database if it is away).
async fn announce_failure(
    shared: &Shared,
    db: &mut Option<Client>,
    change: &Change,
    outcome: Outcome,
    stop: &CancellationToken,
) -> bool {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = async {
            let client = report::connected(&shared.database, db).await?;
            outbox::enqueue_outcome(&*client, &outcome, false).await?;
            Ok::<_, report::DbFailure>(())
        }
        .await;
        match result {
            Ok(()) => {
                count(shared, change, &outcome);
                wake(&shared.wake);
                return true;
            }
            Err(e) => {
                let wait = shared.cfg.backoff(attempt);
                tracing::warn!(event_id = %change.event_id, error = %e, "cannot record the failed outcome; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

/// Once per change: it is late (`error_logs` `sync_failed`, PostHog `sync_failed`); its
/// retries go on.
async fn report_late(
    shared: &Shared,
    db: &mut Option<Client>,
    change: &Change,
    error: &ApplyError,
    attempts: u32,
) {
    shared
        .metrics
        .outbox
        .late
        .with_label_values(&["merge"])
        .inc();
    let context = serde_json::json!({
        "event_id": change.event_id,
        "origin": change.position,
        "error_kind": error.kind(),
        "retrying": true,
    });
    if let Ok(client) = report::connected(&shared.database, db).await {
        report::error_log(
            client,
            change.member_id.as_deref(),
            &error.to_string(),
            &context,
            attempts,
        )
        .await;
    }
    if let (Some(ph), Some(member)) = (&shared.posthog, change.member_id.as_deref()) {
        let mut event = crate::sinks::posthog::CaptureEvent::new(
            "sync_failed",
            member,
            &format!("late:{}", change.event_id),
        );
        event
            .properties
            .insert("event_id".into(), change.event_id.clone().into());
        event
            .properties
            .insert("error".into(), error.to_string().into());
        event.properties.insert("attempts".into(), attempts.into());
        event.properties.insert("retrying".into(), true.into());
        ph.capture(event);
    }
}

async fn dead_letter(
    shared: &Shared,
    db: &mut Option<Client>,
    letter: &DeadLetter,
    stop: &CancellationToken,
) -> bool {
    if !report::publish_dead_letter(shared, letter, stop).await {
        return false;
    }
    // The dead letter is the durable record; the row is for people querying the database.
    if let Ok(client) = report::connected(&shared.database, db).await {
        report::error_log(
            client,
            letter.member_id.as_deref(),
            &letter.error.message,
            &report::dead_letter_context(letter),
            letter.attempts,
        )
        .await;
    }
    true
}
