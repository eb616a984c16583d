//! The loop every applier runs, `merge.push_lanes` times in parallel: claim the oldest due
//! intent of its target, apply it with no lock held, record the result under the member's
//! lock. How each error class is handled lives here, once:
//!
//! - **Infrastructure** (Postgres away, a 5xx/429/timeout from the service): the intent is
//!   postponed with capped exponential backoff and jitter and retried by itself, however long
//!   the outage lasts. After `merge.max_attempts` failed attempts the episode is reported once
//!   as late (`error_logs` `sync_failed`, the PostHog `sync_failed` event, a metric) while the
//!   retries go on.
//! - **Permanent** (a 4xx other than 408/429): the intent's
//!   latest contributing change is dead-lettered (`dlq replay` re-feeds it) and what was
//!   claimed is dropped.
//!
//! Each lane beats a heartbeat of its own (`merge-<target>-lane-<n>` in `/healthz`) on every
//! turn, and while it waits on something bounded or deliberate — the service's answer (the
//! client's timeouts bound it), Kafka taking a dead letter, a backoff. Only a database
//! statement is awaited without beating: one that never returns (a connection cut off without
//! a reset) silences the lane, and liveness sees it after `telemetry.liveness_timeout_secs`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;

use super::{Intent, MEMBER_LOCK_SQL, Target};
use crate::merge::dlq::{DeadLetter, DlqError};
use crate::merge::report;
use crate::merge::worker::Shared;
use crate::telemetry::liveness::{self, Heartbeat};

/// Why an apply failed, by what retrying can do about it.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The service or the database is away or busy: wait and try again.
    Retry { kind: &'static str, message: String },
    /// It will fail the same way every time: dead-letter.
    Permanent { kind: &'static str, message: String },
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Self::Retry { kind, .. } | Self::Permanent { kind, .. } => kind,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Retry { message, .. } | Self::Permanent { message, .. } => f.write_str(message),
        }
    }
}

/// One target's applier: what to do before, during and after the network call.
pub trait IntentApplier: Send + Sync + 'static {
    /// What `prepare` decided to send.
    type Plan: Send + Sync;
    /// What the service answered.
    type Done: Send + Sync;
    const TARGET: Target;

    /// Under the claim's transaction and the member's lock: decides what to send (`None`:
    /// nothing, the target already holds the desired state) and records what must be known
    /// before the call (echoes of a push).
    fn prepare(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
    ) -> impl Future<Output = Result<Option<Self::Plan>, tokio_postgres::Error>> + Send;

    /// The network call, with no transaction open.
    fn apply(
        &self,
        db: &Client,
        plan: &Self::Plan,
    ) -> impl Future<Output = Result<Self::Done, Failure>> + Send;

    /// Under the member's lock: records the result (`None`: nothing was sent, or the intent
    /// was dead-lettered) and completes the intent (`super::complete`).
    fn record(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
        result: Option<(&Self::Plan, &Self::Done)>,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

/// Runs `lanes` copies of the loop until `stop`.
pub async fn run<A: IntentApplier>(
    applier: Arc<A>,
    shared: Arc<Shared>,
    lanes: usize,
    stop: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..lanes.max(1) {
        tasks.spawn(lane(
            Arc::clone(&applier),
            Arc::clone(&shared),
            lane_name(A::TARGET, n),
            stop.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

/// A lane's name in `/healthz`. The liveness registry holds `&'static str`s: each name is
/// made once per process (a few bytes per lane), as the daemon starts its appliers once.
fn lane_name(target: Target, n: usize) -> &'static str {
    Box::leak(format!("merge-{}-lane-{n}", target.as_str()).into_boxed_str())
}

async fn lane<A: IntentApplier>(
    applier: Arc<A>,
    shared: Arc<Shared>,
    name: &'static str,
    stop: CancellationToken,
) {
    let heartbeat = liveness::heartbeat(name);
    let mut db: Option<Client> = None;
    let mut failures = 0u32;
    let poll = Duration::from_millis(shared.cfg.poll_interval_ms);
    let wake = shared.wake.for_target(A::TARGET);
    loop {
        if stop.is_cancelled() {
            return;
        }
        heartbeat.beat();
        liveness::test_wedge(name).await;
        let step = async {
            let client = report::connected(&shared.database, &mut db).await?;
            step(&*applier, &shared, client, &heartbeat, &stop).await
        }
        .await;
        match step {
            Ok(true) => failures = 0,
            Ok(false) => {
                failures = 0;
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.cancelled() => return,
                }
            }
            Err(e) => {
                failures += 1;
                if db.as_ref().is_some_and(Client::is_closed) {
                    db = None;
                }
                let wait = shared.cfg.backoff(failures);
                tracing::warn!(target_system = A::TARGET.as_str(), error = %e, retry_in_ms = wait.as_millis() as u64, "merge outbox: database unavailable; retrying");
                liveness::sleep_beating(&heartbeat, wait, &stop).await;
            }
        }
    }
}

/// One claim and its consequences. `Ok(false)`: nothing was due.
async fn step<A: IntentApplier>(
    applier: &A,
    shared: &Shared,
    client: &mut Client,
    heartbeat: &Heartbeat,
    stop: &CancellationToken,
) -> Result<bool, report::DbFailure> {
    let lease = Duration::from_secs(shared.cfg.claim_lease_secs);
    let tx = client.transaction().await?;
    let Some(intent) = super::claim(&tx, A::TARGET, lease).await? else {
        tx.commit().await?;
        return Ok(false);
    };
    let plan = applier.prepare(&tx, &intent).await?;
    tx.commit().await?;

    let Some(plan) = plan else {
        finish(applier, client, &intent, None, Utc::now()).await?;
        return Ok(true);
    };
    let target = A::TARGET.as_str();
    let started = Instant::now();
    let result = liveness::beating_while(heartbeat, applier.apply(client, &plan)).await;
    shared
        .metrics
        .outbox
        .apply_seconds
        .with_label_values(&[target])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(done) => {
            finish(applier, client, &intent, Some((&plan, &done)), Utc::now()).await?;
            let m = &shared.metrics.outbox;
            m.applied.with_label_values(&[target, "applied"]).inc();
            m.last_success
                .with_label_values(&[target])
                .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        }
        Err(failure @ Failure::Retry { .. }) => {
            shared
                .metrics
                .outbox
                .applied
                .with_label_values(&[target, "retry"])
                .inc();
            let attempts = intent.attempts as u32 + 1;
            let late = intent.late_reported || attempts >= shared.cfg.max_attempts;
            if late && !intent.late_reported {
                report_late(shared, client, &intent, &failure, attempts).await;
            }
            let wait = shared.cfg.backoff(attempts);
            tracing::warn!(member = %intent.member_id, target_system = target, attempts, retry_in_ms = wait.as_millis() as u64, error = %failure, "apply failed; will retry");
            super::postpone(&*client, &intent, &failure.to_string(), wait, late).await?;
        }
        Err(failure @ Failure::Permanent { .. }) => {
            shared
                .metrics
                .outbox
                .applied
                .with_label_values(&[target, "dead_lettered"])
                .inc();
            tracing::error!(member = %intent.member_id, target_system = target, error = %failure, "apply failed permanently: dead-lettered");
            let attempts = intent.attempts as u32 + 1;
            let sent = dead_letter(shared, client, &intent, &failure, attempts, stop);
            if !liveness::beating_while(heartbeat, sent).await {
                // Stopping: the claim ends with our session and the intent is tried again.
                return Ok(true);
            }
            super::abandon(&*client, &intent).await?;
            finish(applier, client, &intent, None, Utc::now()).await?;
        }
    }
    Ok(true)
}

async fn finish<A: IntentApplier>(
    applier: &A,
    client: &mut Client,
    intent: &Intent,
    result: Option<(&A::Plan, &A::Done)>,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(MEMBER_LOCK_SQL, &[&intent.member_id]).await?;
    applier.record(&tx, intent, result, at).await?;
    tx.commit().await
}

/// Once per failure episode: the change is late (the retries go on).
async fn report_late(
    shared: &Shared,
    client: &Client,
    intent: &Intent,
    failure: &Failure,
    attempts: u32,
) {
    shared
        .metrics
        .outbox
        .late
        .with_label_values(&[intent.target.as_str()])
        .inc();
    let context = serde_json::json!({
        "target": intent.target.as_str(),
        "event_id": intent.origin.as_ref().map(|o| o.event_id.clone()),
        "error_kind": failure.kind(),
        "retrying": true,
    });
    report::error_log(
        client,
        Some(&intent.member_id),
        &failure.to_string(),
        &context,
        attempts,
    )
    .await;
    if let Some(ph) = &shared.posthog {
        let key = format!(
            "late:{}:{}:{}",
            intent.target.as_str(),
            intent.member_id,
            intent
                .failing_since
                .map(|t| t.timestamp_millis())
                .unwrap_or_default()
        );
        let mut event =
            crate::sinks::posthog::CaptureEvent::new("sync_failed", &intent.member_id, &key);
        event
            .properties
            .insert("target".into(), intent.target.as_str().into());
        event
            .properties
            .insert("error".into(), failure.to_string().into());
        event.properties.insert("attempts".into(), attempts.into());
        event.properties.insert("retrying".into(), true.into());
        ph.capture(event);
    }
}

async fn dead_letter(
    shared: &Shared,
    client: &Client,
    intent: &Intent,
    failure: &Failure,
    attempts: u32,
    stop: &CancellationToken,
) -> bool {
    let error = DlqError {
        kind: failure.kind().into(),
        message: failure.to_string(),
        retryable: false,
    };
    let letter = DeadLetter::from_origin(
        intent.origin.as_ref(),
        error,
        attempts,
        Some(intent.member_id.clone()),
    );
    if !report::publish_dead_letter(shared, &letter, stop).await {
        return false;
    }
    report::error_log(
        client,
        letter.member_id.as_deref(),
        &letter.error.message,
        &report::dead_letter_context(&letter),
        attempts,
    )
    .await;
    true
}
