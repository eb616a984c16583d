//! What merge's workers and appliers share to report what happened: a database connection that
//! reconnects, produce-until-acknowledged, the dead-letter topic and `error_logs`.

use std::time::Duration;

use rand::Rng;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::dlq::DeadLetter;
use super::worker::Shared;
use crate::config::DatabaseConfig;
use crate::db::{self, Login};
use crate::kafka::producer::Record;

/// A database step failed: connecting, or a statement.
#[derive(Debug, thiserror::Error)]
pub enum DbFailure {
    #[error("{0}")]
    Connect(#[from] db::DbError),
    #[error("database: {}", crate::merge::apply::db_detail(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// The open connection, or a new one (after a restart of Postgres, the old one is closed).
pub async fn connected<'a>(
    database: &DatabaseConfig,
    db: &'a mut Option<Client>,
) -> Result<&'a mut Client, db::DbError> {
    if db.as_ref().is_some_and(Client::is_closed) {
        *db = None;
    }
    if db.is_none() {
        *db = Some(db::connect(database, Login::Merge).await?);
    }
    Ok(db.as_mut().expect("connected above"))
}

/// Capped exponential backoff with full jitter in its upper half: `base × 2^(attempt-1)`,
/// at most `max`, then a random point between half and all of it, so instances that failed
/// together do not retry together.
pub fn jittered(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(factor).min(max);
    let half = full / 2;
    half + full
        .saturating_sub(half)
        .mul_f64(rand::rng().random::<f64>())
}

/// Produces until Kafka acknowledges, backing off while it is away. A record Kafka refuses for
/// good (too large for its record limit) is replaced by `shrink`'s smaller version, or dropped
/// — logged and counted — when there is none: it is never retried forever, which would stop
/// the worker or the relay. `false`: stopped first.
pub async fn send_until_acknowledged(
    shared: &Shared,
    record: &Record<'_>,
    stop: &CancellationToken,
    shrink: fn(&[u8]) -> Option<Vec<u8>>,
) -> bool {
    let mut attempt = 0;
    let mut smaller: Option<Vec<u8>> = None;
    loop {
        let current = Record {
            payload: smaller.as_deref().unwrap_or(record.payload),
            ..record.clone()
        };
        match shared.producer.send(&current, shared.kafka_wait).await {
            Ok(_) => return true,
            Err(e) if !e.is_retryable() => match shrink(current.payload) {
                Some(s) if s.len() < current.payload.len() => {
                    tracing::warn!(topic = record.topic, bytes = current.payload.len(), error = %e, "Kafka refused the record; sending it without its largest values");
                    shared
                        .metrics
                        .refused_records
                        .with_label_values(&[record.topic, "shrunk"])
                        .inc();
                    smaller = Some(s);
                }
                _ => {
                    tracing::error!(topic = record.topic, bytes = current.payload.len(), error = %e, "Kafka refused the record and it cannot be made smaller: dropped");
                    shared
                        .metrics
                        .refused_records
                        .with_label_values(&[record.topic, "dropped"])
                        .inc();
                    return true;
                }
            },
            Err(e) => {
                attempt += 1;
                let wait = jittered(Duration::from_millis(200), Duration::from_secs(10), attempt);
                tracing::warn!(topic = record.topic, error = %e, retry_in_ms = wait.as_millis() as u64, "Kafka did not take the record; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

/// Writes the dead letter to `<prefix>.dlq` (until Kafka takes it) and counts it.
pub async fn publish_dead_letter(
    shared: &Shared,
    letter: &DeadLetter,
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
    if !send_until_acknowledged(
        shared,
        &record,
        stop,
        crate::cdc::oversize::shrink_dead_letter,
    )
    .await
    {
        return false;
    }
    shared
        .metrics
        .dead_letters
        .with_label_values(&[&letter.error.kind])
        .inc();
    true
}

pub fn dead_letter_context(letter: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "dlq_id": letter.id,
        "event_id": letter.event_id,
        "origin": letter.origin,
        "error_kind": letter.error.kind,
    })
}

/// An `error_logs` row (`sync_failed`). The dead letter or the pending intent is the durable
/// record; this row is for people querying the database, so a failure here is logged, not
/// retried.
pub async fn error_log(
    client: &Client,
    member_id: Option<&str>,
    message: &str,
    context: &serde_json::Value,
    attempts: u32,
) {
    let result = client
        .execute(
            "insert into public.error_logs (memberstack_id, user_id, error_type, error_message, context, retry_count)
             values ($1, (select user_id from public.members where memberstack_id = $1), 'sync_failed', $2, $3, $4)",
            &[&member_id, &message, context, &(attempts as i32)],
        )
        .await;
    if let Err(e) = result {
        tracing::error!(member = ?member_id, error = %e, "cannot write error_logs");
    }
}
