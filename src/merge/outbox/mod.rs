//! Merge's transactional outbox (migration V12, docs/merge.md "The outbox").
//!
//! A change is decided in one short Postgres transaction with no network I/O ([`super::apply`]):
//! what it asks of Memberstack and of Supabase Auth is written there as the member's *desired
//! state* ([`upsert_intent`]), and its outcome record as a row to relay
//! ([`enqueue_outcome`]). Appliers then drive each target to its desired state outside any
//! member lock:
//!
//! - [`memberstack::Pusher`]: one coalesced PATCH per member with the latest desired values,
//!   paced by the shared 25/s budget, oldest waiting member first;
//! - [`auth::AuthApplier`]: creates, links or updates the member's auth user;
//! - [`relay::Relay`]: produces outcome records to `<prefix>.sync` and PostHog.
//!
//! The first two share [`lanes`]: claim one intent with a lease, apply it, record the result,
//! back off with jitter on an infrastructure error (however long it lasts), dead-letter only a
//! permanent one.
//!
//! Locking order, everywhere: the member's advisory lock first, then the intent row. A claim
//! only *tries* the advisory lock, so it never waits behind a merge transaction.

pub mod auth;
pub mod lanes;
pub mod memberstack;
pub mod relay;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_postgres::{GenericClient, Transaction};
use tokio_util::sync::CancellationToken;

use super::change::Position;
use super::outcome::Outcome;

/// The external system an intent is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Memberstack,
    Auth,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memberstack => "memberstack",
            Self::Auth => "auth",
        }
    }
}

/// Wakes the appliers when a merge transaction committed new work (other merge instances find
/// it by polling).
#[derive(Default)]
pub struct Wakeups {
    pub memberstack: Notify,
    pub auth: Notify,
    pub outcomes: Notify,
}

impl Wakeups {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn for_target(&self, target: Target) -> &Notify {
        match target {
            Target::Memberstack => &self.memberstack,
            Target::Auth => &self.auth,
        }
    }
}

/// The Kafka record of the latest change that contributed to an intent: a permanent failure is
/// dead-lettered as this record, so `dlq replay` re-feeds it and merge resolves it again
/// against the state of that moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub event_id: String,
    pub position: Position,
    pub key: Option<String>,
    pub value: Option<Value>,
    pub value_base64: Option<String>,
    pub headers: BTreeMap<String, String>,
}

impl Origin {
    pub fn of(message: &OwnedMessage, event_id: &str) -> Self {
        let payload = message.payload();
        let value = payload.and_then(|p| serde_json::from_slice::<Value>(p).ok());
        let value_base64 = match (&value, payload) {
            (None, Some(p)) => Some(base64::engine::general_purpose::STANDARD.encode(p)),
            _ => None,
        };
        let mut headers = BTreeMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                if let Some(v) = header.value {
                    headers.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    );
                }
            }
        }
        Self {
            event_id: event_id.to_owned(),
            position: Position {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            },
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            value,
            value_base64,
            headers,
        }
    }
}

/// One member's pending work for one target, as claimed by an applier.
#[derive(Debug, Clone)]
pub struct Intent {
    pub member_id: String,
    pub target: Target,
    pub desired: Map<String, Value>,
    pub version: i64,
    /// Failed attempts in the current failure episode.
    pub attempts: i32,
    pub failing_since: Option<DateTime<Utc>>,
    pub late_reported: bool,
    pub origin: Option<Origin>,
}

/// The member's advisory lock (the same key `store::lock_member` takes).
pub(crate) const MEMBER_LOCK_SQL: &str =
    "select pg_advisory_xact_lock(hashtextextended('membersync.member:' || $1, 0))";
const MEMBER_TRY_LOCK_SQL: &str =
    "select pg_try_advisory_xact_lock(hashtextextended('membersync.member:' || $1, 0))";

/// Inside the merge transaction: merges `set` into the member's desired state for `target`
/// (a later value of a field replaces an earlier one) and drops the fields in `drop` (the
/// other side already holds what was agreed). A member with nothing pending keeps its place
/// at the back of the queue; `pace` delays a new intent until the member's last push is
/// `pace` old (fairness: one member editing in a loop cannot take the whole budget).
pub async fn upsert_intent(
    tx: &Transaction<'_>,
    member_id: &str,
    target: Target,
    set: &Map<String, Value>,
    drop: &[String],
    origin: Option<&Origin>,
    pace: std::time::Duration,
) -> Result<(), tokio_postgres::Error> {
    if set.is_empty() && drop.is_empty() {
        return Ok(());
    }
    let set = Value::Object(set.clone());
    let origin = origin.and_then(|o| serde_json::to_value(o).ok());
    let pace_ms = pace.as_millis() as f64;
    if set.as_object().is_some_and(|m| !m.is_empty()) {
        tx.execute(
            "insert into membersync_meta.merge_intents as i (memberstack_id, target, desired, origin)
             values ($1, $2, $3 - $4::text[], $5)
             on conflict (memberstack_id, target) do update set
                 desired = (i.desired || excluded.desired) - $4::text[],
                 version = i.version + 1,
                 origin = coalesce(excluded.origin, i.origin),
                 -- A member that had nothing pending waits for its pace since the last push,
                 -- and queues behind the members already waiting.
                 queued_at = case when i.desired = '{}'::jsonb then now() else i.queued_at end,
                 not_before = case when i.desired = '{}'::jsonb
                     then greatest(i.not_before, coalesce(i.last_applied_at, '-infinity') + make_interval(secs => $6::float8 / 1000.0))
                     else i.not_before end,
                 updated_at = now()",
            &[&member_id, &target.as_str(), &set, &drop, &origin, &pace_ms],
        )
        .await?;
    } else {
        tx.execute(
            "update membersync_meta.merge_intents
                set desired = desired - $3::text[], version = version + 1, updated_at = now()
              where memberstack_id = $1 and target = $2 and desired ?| $3::text[]",
            &[&member_id, &target.as_str(), &drop],
        )
        .await?;
    }
    Ok(())
}

/// Inside the merge transaction of a deleted member: nothing more is pushed for it.
pub async fn cancel_intents(
    tx: &Transaction<'_>,
    member_id: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "update membersync_meta.merge_intents set desired = '{}'::jsonb, version = version + 1, updated_at = now()
          where memberstack_id = $1",
        &[&member_id],
    )
    .await?;
    Ok(())
}

/// Claims the oldest due intent of `target` whose member no merge transaction holds: a lease
/// (`claimed_until`, and the claiming session's pid, so a crashed instance's claims are free
/// again as soon as its connection is gone). The transaction is the caller's, so that it can
/// record what it is about to push under the same member lock.
pub async fn claim(
    tx: &Transaction<'_>,
    target: Target,
    lease: std::time::Duration,
) -> Result<Option<Intent>, tokio_postgres::Error> {
    let candidates = tx
        .query(
            &format!(
                "select memberstack_id from membersync_meta.merge_intents
                  where target = $1 and desired <> '{{}}'::jsonb and not_before <= now()
                    and orphan_since is null and {CLAIMABLE}
                  order by queued_at limit 8"
            ),
            &[&target.as_str()],
        )
        .await?;
    let lease_ms = lease.as_millis() as f64;
    for c in candidates {
        let member: String = c.get(0);
        let locked: bool = tx.query_one(MEMBER_TRY_LOCK_SQL, &[&member]).await?.get(0);
        if !locked {
            continue;
        }
        let row = tx
            .query_opt(
                &format!(
                    "update membersync_meta.merge_intents
                        set claimed_until = now() + make_interval(secs => $3::float8 / 1000.0),
                            claimed_pid = pg_backend_pid()
                      where memberstack_id = $1 and target = $2 and desired <> '{{}}'::jsonb
                        and not_before <= now() and orphan_since is null and {CLAIMABLE}
                  returning desired, version, attempts, failing_since, late_reported, origin"
                ),
                &[&member, &target.as_str(), &lease_ms],
            )
            .await?;
        if let Some(r) = row {
            let desired: Value = r.get("desired");
            let origin: Option<Value> = r.get("origin");
            return Ok(Some(Intent {
                member_id: member,
                target,
                desired: match desired {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
                version: r.get("version"),
                attempts: r.get("attempts"),
                failing_since: r.get("failing_since"),
                late_reported: r.get("late_reported"),
                origin: origin.and_then(|o| serde_json::from_value(o).ok()),
            }));
        }
    }
    Ok(None)
}

/// Free: never claimed, lease over, or the claiming session is gone.
const CLAIMABLE: &str = "(claimed_until is null or claimed_until < now()
      or not exists (select 1 from pg_stat_activity a where a.pid = claimed_pid))";

/// After a successful apply, under the member's lock: removes from the desired state what was
/// applied (unless a newer value of the field arrived meanwhile), releases the claim, ends the
/// failure episode, and paces the member's next push. Returns what is still pending.
pub async fn complete(
    tx: &Transaction<'_>,
    intent: &Intent,
    applied: &Map<String, Value>,
    applied_at: DateTime<Utc>,
    pace: std::time::Duration,
) -> Result<Map<String, Value>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "select desired from membersync_meta.merge_intents
              where memberstack_id = $1 and target = $2 for update",
            &[&intent.member_id, &intent.target.as_str()],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Map::new());
    };
    let mut desired = match row.get::<_, Value>(0) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    desired.retain(|k, v| applied.get(k) != Some(v));
    let pace_ms = pace.as_millis() as f64;
    tx.execute(
        "update membersync_meta.merge_intents
            set desired = $3::jsonb, claimed_until = null, claimed_pid = null, attempts = 0,
                failing_since = null, late_reported = false, last_error = null, conflict = null,
                last_applied_at = $4::timestamptz,
                not_before = $4::timestamptz + make_interval(secs => $5::float8 / 1000.0),
                queued_at = case when $3::jsonb = '{}'::jsonb then queued_at else now() end,
                updated_at = now()
          where memberstack_id = $1 and target = $2",
        &[
            &intent.member_id,
            &intent.target.as_str(),
            &Value::Object(desired.clone()),
            &applied_at,
            &pace_ms,
        ],
    )
    .await?;
    Ok(desired)
}

/// After a conflict (the target refuses the intent because of another record, e.g. the email
/// belongs to another auth user), under the member's lock: what was applied leaves the
/// intent, the rest waits `retry_in` (a newer change of it supersedes the wait,
/// [`supersede_conflict`]). Returns whether the conflict is new (not the one already
/// recorded), i.e. whether to report it.
pub async fn hold(
    tx: &Transaction<'_>,
    intent: &Intent,
    applied: &Map<String, Value>,
    conflict: &Value,
    retry_in: std::time::Duration,
) -> Result<bool, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "select desired, conflict from membersync_meta.merge_intents
              where memberstack_id = $1 and target = $2 for update",
            &[&intent.member_id, &intent.target.as_str()],
        )
        .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let mut desired = match row.get::<_, Value>(0) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    desired.retain(|k, v| applied.get(k) != Some(v));
    let before: Option<Value> = row.get(1);
    let fresh = before.as_ref().is_none_or(|b| {
        b.get("reason") != conflict.get("reason") || b.get("email") != conflict.get("email")
    });
    let mut conflict = conflict.clone();
    if let (Some(b), false) = (&before, fresh) {
        conflict["since"] = b.get("since").cloned().unwrap_or(Value::Null);
    }
    let retry_ms = retry_in.as_millis() as f64;
    tx.execute(
        "update membersync_meta.merge_intents
            set desired = $3::jsonb, conflict = $4::jsonb, claimed_until = null, claimed_pid = null,
                attempts = 0, failing_since = null, late_reported = false,
                last_error = $4::jsonb ->> 'reason',
                not_before = now() + make_interval(secs => $5::float8 / 1000.0),
                updated_at = now()
          where memberstack_id = $1 and target = $2",
        &[
            &intent.member_id,
            &intent.target.as_str(),
            &Value::Object(desired),
            &conflict,
            &retry_ms,
        ],
    )
    .await?;
    Ok(fresh)
}

/// The conflict the member's intent for `target` waits on, if any.
pub async fn conflict_of(
    client: &impl GenericClient,
    member_id: &str,
    target: Target,
) -> Result<Option<Value>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "select conflict from membersync_meta.merge_intents
              where memberstack_id = $1 and target = $2 and conflict is not null",
            &[&member_id, &target.as_str()],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Inside the merge transaction: the change gives the conflicting intent new values (a new
/// email, a verified one, new metadata): it is tried at once instead of after its wait. The
/// conflict stays recorded until the intent applies, so one that stands is not reported again.
pub async fn supersede_conflict(
    tx: &Transaction<'_>,
    member_id: &str,
    target: Target,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "update membersync_meta.merge_intents set not_before = now(), updated_at = now()
          where memberstack_id = $1 and target = $2 and conflict is not null",
        &[&member_id, &target.as_str()],
    )
    .await?;
    Ok(())
}

/// Under the member's lock, after Memberstack answered 404 for it: nothing is pushed for the
/// member until Memberstack shows it ([`clear_orphan`]). What was pending is dropped (the row
/// holds it; a snapshot of the member pushes what Supabase owns). Returns whether the member
/// was not known as an orphan yet (report it once).
pub async fn mark_orphan(
    tx: &Transaction<'_>,
    member_id: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "update membersync_meta.merge_intents i
                set orphan_since = coalesce(i.orphan_since, now()), desired = '{}'::jsonb,
                    version = i.version + 1, claimed_until = null, claimed_pid = null, attempts = 0,
                    failing_since = null, late_reported = false, last_error = null, updated_at = now()
               from (select orphan_since from membersync_meta.merge_intents
                      where memberstack_id = $1 and target = 'memberstack') old
              where i.memberstack_id = $1 and i.target = 'memberstack'
          returning old.orphan_since is null",
            &[&member_id],
        )
        .await?;
    if let Some(row) = row {
        return Ok(row.get(0));
    }
    // No intent row (pruned meanwhile): remember the orphan in a new one.
    let n = tx
        .execute(
            "insert into membersync_meta.merge_intents (memberstack_id, target, orphan_since)
             values ($1, 'memberstack', now()) on conflict (memberstack_id, target) do nothing",
            &[&member_id],
        )
        .await?;
    Ok(n == 1)
}

/// Inside the merge transaction of `member.deleted`: the member's tombstone. Nothing is
/// pushed for it any more (what was pending is dropped), and later changes of it are ignored.
pub async fn mark_deleted(
    tx: &Transaction<'_>,
    member_id: &str,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "insert into membersync_meta.merge_intents as i (memberstack_id, target, deleted_at)
         values ($1, 'memberstack', $2)
         on conflict (memberstack_id, target) do update set
             deleted_at = coalesce(i.deleted_at, excluded.deleted_at), desired = '{}'::jsonb,
             version = i.version + 1, updated_at = now()",
        &[&member_id, &at],
    )
    .await?;
    Ok(())
}

/// When Memberstack deleted the member, if it did (its tombstone).
pub async fn deleted_at(
    client: &impl GenericClient,
    member_id: &str,
) -> Result<Option<DateTime<Utc>>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "select deleted_at from membersync_meta.merge_intents
              where memberstack_id = $1 and target = 'memberstack' and deleted_at is not null",
            &[&member_id],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Whether Memberstack answered 404 for the member and has not shown it since.
pub async fn is_orphan(
    client: &impl GenericClient,
    member_id: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "select 1 from membersync_meta.merge_intents
              where memberstack_id = $1 and target = 'memberstack' and orphan_since is not null",
            &[&member_id],
        )
        .await?
        .is_some())
}

/// Inside the merge transaction of a Memberstack change of the member: it exists there.
pub async fn clear_orphan(
    tx: &Transaction<'_>,
    member_id: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "update membersync_meta.merge_intents set orphan_since = null, updated_at = now()
          where memberstack_id = $1 and target = 'memberstack' and orphan_since is not null",
        &[&member_id],
    )
    .await?;
    Ok(())
}

/// After an infrastructure failure: the claim is released and the intent waits `retry_in`.
pub async fn postpone(
    client: &impl GenericClient,
    intent: &Intent,
    error: &str,
    retry_in: std::time::Duration,
    late_reported: bool,
) -> Result<(), tokio_postgres::Error> {
    let retry_ms = retry_in.as_millis() as f64;
    client
        .execute(
            "update membersync_meta.merge_intents
                set claimed_until = null, claimed_pid = null, attempts = attempts + 1,
                    failing_since = coalesce(failing_since, now()), late_reported = $4,
                    last_error = $3, not_before = now() + make_interval(secs => $5::float8 / 1000.0),
                    updated_at = now()
              where memberstack_id = $1 and target = $2",
            &[
                &intent.member_id,
                &intent.target.as_str(),
                &error,
                &late_reported,
                &retry_ms,
            ],
        )
        .await?;
    Ok(())
}

/// After a permanent failure (dead-lettered): what was claimed is dropped; values that
/// arrived since stay pending.
pub async fn abandon(
    client: &impl GenericClient,
    intent: &Intent,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "update membersync_meta.merge_intents
                set desired = case when version = $3 then '{}'::jsonb else desired end,
                    claimed_until = null, claimed_pid = null, attempts = 0, failing_since = null,
                    late_reported = false, last_error = null, updated_at = now()
              where memberstack_id = $1 and target = $2",
            &[&intent.member_id, &intent.target.as_str(), &intent.version],
        )
        .await?;
    Ok(())
}

/// Forgets members with nothing pending whose pace is long over.
pub async fn prune(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "delete from membersync_meta.merge_intents
              where desired = '{}'::jsonb and not_before < now() - interval '1 minute'
                and orphan_since is null and deleted_at is null
                and (claimed_until is null or claimed_until < now())",
            &[],
        )
        .await
}

/// Pending intents per target: count and the oldest's age in seconds (metrics).
pub async fn backlog(
    client: &impl GenericClient,
) -> Result<Vec<(String, i64, f64)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "select target, count(*), coalesce(extract(epoch from now() - min(coalesce(failing_since, queued_at)))::float8, 0)
               from membersync_meta.merge_intents
              -- An intent waiting on a conflict is reported as a conflict, not as backlog.
              where desired <> '{}'::jsonb and conflict is null and orphan_since is null
              group by target",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Inside the merge transaction: the change's outcome, to be produced by the relay.
pub async fn enqueue_outcome(
    client: &impl GenericClient,
    outcome: &Outcome,
    awaiting_auth: bool,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "insert into membersync_meta.outcome_outbox (member_id, event_id, payload, awaiting_auth)
             values ($1, $2, $3, $4)",
            &[
                &outcome.member_id,
                &outcome.event_id,
                &outcome.to_json(),
                &awaiting_auth,
            ],
        )
        .await?;
    Ok(())
}

/// Every few seconds: forgets members with nothing pending, and refreshes the backlog gauges
/// (pending intents and the oldest's age per target, outcomes not yet relayed).
pub async fn housekeeping(shared: Arc<crate::merge::worker::Shared>, stop: CancellationToken) {
    let mut db = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let result = async {
            let client = crate::merge::report::connected(&shared.database, &mut db).await?;
            prune(&*client).await?;
            let m = &shared.metrics.outbox;
            let backlog = backlog(&*client).await?;
            for target in [Target::Memberstack, Target::Auth] {
                let (count, oldest) = backlog
                    .iter()
                    .find(|(t, _, _)| t == target.as_str())
                    .map(|(_, c, o)| (*c, *o))
                    .unwrap_or((0, 0.0));
                m.pending.with_label_values(&[target.as_str()]).set(count);
                m.oldest_seconds
                    .with_label_values(&[target.as_str()])
                    .set(oldest);
            }
            let outcomes: i64 = client
                .query_one("select count(*) from membersync_meta.outcome_outbox", &[])
                .await?
                .get(0);
            m.outcomes_pending.set(outcomes);
            Ok::<_, crate::merge::report::DbFailure>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "outbox housekeeping skipped (database unavailable)");
        }
    }
}

/// Resolves once no outcome is left to relay (used at shutdown, within the drain timeout).
pub async fn drained(shared: &crate::merge::worker::Shared) {
    let mut db = None;
    loop {
        let left = async {
            let client = crate::merge::report::connected(&shared.database, &mut db).await?;
            let n: i64 = client
                .query_one(
                    "select count(*) from membersync_meta.outcome_outbox where not awaiting_auth",
                    &[],
                )
                .await?
                .get(0);
            Ok::<_, crate::merge::report::DbFailure>(n)
        }
        .await;
        if matches!(left, Ok(0)) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
