//! The outcome relay: produces the outcome records merge committed (`outcome_outbox`) to
//! `<prefix>.sync`, keyed by member, hands their events to PostHog, and deletes them once Kafka
//! acknowledged them. A crash in between re-sends the same record (same id, same status): the
//! outcome of a change committed just before a kill -9 still arrives, as `applied`.
//!
//! Per-member order: a claim skips a member's outcome while an earlier one of the same member
//! is claimed elsewhere or waits for its auth user, and claims are serialised by one advisory
//! lock (they are short), so two merge instances never send one member's outcomes in parallel.
//! Within a batch each member's outcomes are sent one after the other; members in parallel.
//!
//! Liveness (`merge-relay` in `/healthz`): the loop beats on every turn and while it waits for
//! Kafka or a backoff; only a database statement that never returns silences it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::kafka::producer::Record;
use crate::merge::outcome::{Outcome, Status};
use crate::merge::report;
use crate::merge::worker::Shared;
use crate::telemetry::liveness;

/// Key of the advisory lock that serialises claims (`'membersync.outcome_relay'`).
const CLAIM_LOCK_SQL: &str =
    "select pg_advisory_xact_lock(hashtextextended('membersync.outcome_relay', 0))";

const BATCH: i64 = 256;

struct Claimed {
    seq: i64,
    member_id: Option<String>,
    payload: serde_json::Value,
}

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    const NAME: &str = "merge-relay";
    let heartbeat = liveness::heartbeat(NAME);
    let mut db: Option<Client> = None;
    let mut failures = 0u32;
    let poll = Duration::from_millis(shared.cfg.poll_interval_ms);
    loop {
        if stop.is_cancelled() {
            return;
        }
        heartbeat.beat();
        liveness::test_wedge(NAME).await;
        let result = async {
            let client = report::connected(&shared.database, &mut db).await?;
            relay_batch(&shared, client, &heartbeat, &stop).await
        }
        .await;
        match result {
            Ok(0) => {
                failures = 0;
                tokio::select! {
                    _ = shared.wake.outcomes.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.cancelled() => return,
                }
            }
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                let wait = shared.cfg.backoff(failures);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "outcome relay: database unavailable; retrying");
                liveness::sleep_beating(&heartbeat, wait, &stop).await;
            }
        }
    }
}

/// Relays one batch; returns how many outcomes it sent.
async fn relay_batch(
    shared: &Shared,
    client: &mut Client,
    heartbeat: &liveness::Heartbeat,
    stop: &CancellationToken,
) -> Result<usize, report::DbFailure> {
    let lease_ms = (shared.cfg.claim_lease_secs * 1000) as f64;
    let tx = client.transaction().await?;
    tx.execute(CLAIM_LOCK_SQL, &[]).await?;
    let rows = tx
        .query(
            "with c as (
                select o.seq from membersync_meta.outcome_outbox o
                 where not o.awaiting_auth
                   and (o.claimed_until is null or o.claimed_until < now()
                        or not exists (select 1 from pg_stat_activity a where a.pid = o.claimed_pid))
                   and not exists (
                       select 1 from membersync_meta.outcome_outbox e
                        where e.member_id = o.member_id and e.seq < o.seq
                          and (e.awaiting_auth
                               or (e.claimed_until >= now()
                                   and exists (select 1 from pg_stat_activity a where a.pid = e.claimed_pid))))
                 order by o.seq limit $1)
             update membersync_meta.outcome_outbox o
                set claimed_until = now() + make_interval(secs => $2::float8 / 1000.0), claimed_pid = pg_backend_pid()
               from c where o.seq = c.seq
           returning o.seq, o.member_id, o.payload",
            &[&BATCH, &lease_ms],
        )
        .await?;
    tx.commit().await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut by_member: BTreeMap<Option<String>, Vec<Claimed>> = BTreeMap::new();
    for r in rows {
        let c = Claimed {
            seq: r.get(0),
            member_id: r.get(1),
            payload: r.get(2),
        };
        by_member.entry(c.member_id.clone()).or_default().push(c);
    }
    for list in by_member.values_mut() {
        list.sort_by_key(|c| c.seq);
    }
    let sends = by_member
        .into_values()
        .map(|list| send_member(shared, list, stop));
    let sent: Vec<i64> = liveness::beating_while(heartbeat, futures::future::join_all(sends))
        .await
        .into_iter()
        .flatten()
        .collect();
    if !sent.is_empty() {
        client
            .execute(
                "delete from membersync_meta.outcome_outbox where seq = any($1)",
                &[&sent],
            )
            .await?;
    }
    Ok(sent.len())
}

/// One member's outcomes, in order; stops at the first one not acknowledged (shutdown).
async fn send_member(shared: &Shared, list: Vec<Claimed>, stop: &CancellationToken) -> Vec<i64> {
    let mut sent = Vec::with_capacity(list.len());
    for c in list {
        let outcome: Option<Outcome> = serde_json::from_value(c.payload.clone()).ok();
        let status = c
            .payload
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        let event_id = c
            .payload
            .get("event_id")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let payload = serde_json::to_vec(&c.payload).unwrap_or_default();
        let key = c.member_id.clone().unwrap_or_default();
        let headers: [(&str, &[u8]); 3] = [
            ("membersync-event-id", event_id.as_bytes()),
            ("membersync-status", status.as_bytes()),
            ("content-type", b"application/json"),
        ];
        let record = Record {
            topic: &shared.sync_topic,
            key: key.as_bytes(),
            payload: &payload,
            headers: &headers,
        };
        if !report::send_until_acknowledged(shared, &record, stop, Outcome::shrink).await {
            break;
        }
        if let (Some(ph), Some(o)) = (&shared.posthog, &outcome) {
            for event in o.posthog_events() {
                ph.capture(event);
            }
        }
        if let Some(o) = &outcome
            && o.status == Status::Applied
            && let Ok(at) = o.occurred_at.parse::<chrono::DateTime<chrono::Utc>>()
        {
            let lag = chrono::Utc::now() - at;
            shared
                .metrics
                .outbox
                .change_to_announced
                .observe(lag.num_milliseconds().max(0) as f64 / 1000.0);
        }
        sent.push(c.seq);
    }
    sent
}
