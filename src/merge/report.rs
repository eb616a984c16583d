//! What merge's workers and appliers share to report what happened: a database connection that
//! reconnects, produce-until-acknowledged, the dead-letter topic and `error_logs`.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::dlq::DeadLetter;
use super::worker::Shared;
use crate::config::DatabaseConfig;
use crate::db::{self, Login};
use crate::kafka::producer::{Record, Sent};
use crate::sinks::retry::RetryPolicy;

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

/// Capped exponential backoff with jitter in its upper half: `base × 2^(attempt-1)`, at most
/// `max`, then a random point between half and all of it, so instances that failed together
/// do not retry together (the sinks' retry policy, with equal jitter).
pub fn jittered(base: Duration, max: Duration, attempt: u32) -> Duration {
    RetryPolicy::new(u32::MAX, base, max).delay(attempt, None)
}

/// Produces until Kafka acknowledges, however long it is away (the producer's one loop). A
/// record Kafka refuses for good (too large for its record limit) is replaced by `shrink`'s
/// smaller version, or dropped — logged and counted — when there is none: it is never retried
/// forever, which would stop the worker or the relay. `false`: stopped first.
///
/// A producer that failed fatally refuses every record from then on: this panics, which the
/// daemon's panic hook turns into a failed process (readiness 503, drain, non-zero exit) for
/// its supervisor to restart with a new producer — rather than a relay or lane that polls on
/// while nothing it announces arrives.
pub async fn send_until_acknowledged(
    shared: &Shared,
    record: &Record<'_>,
    stop: &CancellationToken,
    shrink: fn(&[u8]) -> Option<Vec<u8>>,
) -> bool {
    let refused = |how| {
        shared
            .metrics
            .refused_records
            .with_label_values(&[record.topic, how])
            .inc();
    };
    match shared
        .producer
        .send_until_acknowledged(record, shared.kafka_wait, stop, shrink)
        .await
    {
        Sent::Acknowledged { shrunk } => {
            if shrunk {
                refused("shrunk");
            }
            true
        }
        Sent::Refused(_) => {
            refused("dropped");
            true
        }
        Sent::Stopped => false,
        Sent::Fatal(e) => panic!("merge: the Kafka producer failed fatally: {e}"),
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
