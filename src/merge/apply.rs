//! Applying one change: one short Postgres transaction that locks the member, skips an event
//! already processed, resolves every field the change carries, writes the row, the logs and
//! `sync_state`, and — in the same transaction, with no network I/O — what the change asks of
//! Memberstack and Supabase Auth (the member's desired state in the outbox) and its outcome
//! record. The exactly-once marker commits with all of it. The appliers in [`super::outbox`]
//! then make the external writes, outside any member lock.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

use super::MemberstackPath;
use super::change::{Change, ChangeKind};
use super::normalize::same;
use super::outbox::{self, Origin, Target};
use super::outcome::{Outcome, Status};
use super::resolve::{
    FieldState, Incoming, Resolution, Rules, Side, SupabaseNow, observe_own_write, resolve,
};
use super::store::{self, LogEntry};
use crate::config::{DeleteMode, FieldMapping, MergeConfig};
use crate::sinks::memberstack::{MemberstackClient, MemberstackError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database: {}", db_detail(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The TLS settings could not be loaded when (re)connecting, e.g. `database.ssl_root_cert`
    /// is being replaced: like an unreachable database, it passes.
    #[error("database TLS: {0}")]
    DbTls(#[from] crate::db::tls::TlsError),
    /// Re-reading the member for an event that does not describe it.
    #[error("Memberstack: {0}")]
    Memberstack(#[from] MemberstackError),
}

/// tokio-postgres' Display says only "db error"; the server's message and code say what.
pub(crate) fn db_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl ApplyError {
    /// Worth another attempt: the database or a service was away or busy. A constraint the
    /// change violates, or a 4xx, fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Db(e) => e.as_db_error().is_none_or(|db| {
                use tokio_postgres::error::SqlState;
                let code = db.code();
                *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::UNIQUE_VIOLATION
                    || *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::LOCK_NOT_AVAILABLE
                    || *code == SqlState::QUERY_CANCELED
                    || code.code().starts_with("08")
                    || code.code().starts_with("53")
                    || code.code().starts_with("57")
                    || code.code().starts_with("58")
                    || code.code().starts_with("XX")
            }),
            Self::DbTls(_) => true,
            Self::Memberstack(e) => e.is_retryable(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Db(_) | Self::DbTls(_) => "database",
            Self::Memberstack(_) => "memberstack",
        }
    }
}

/// The event id prefix of the snapshots `POST /v1/members/me/resync` publishes.
const RESYNC_PREFIX: &str = "resync_";

/// A mapped field with its parsed Memberstack path.
#[derive(Debug, Clone)]
pub struct Field {
    pub mapping: FieldMapping,
    pub path: MemberstackPath,
}

/// Parses the configured fields' Memberstack paths (validated with the config).
pub fn fields(cfg: &MergeConfig) -> Vec<Field> {
    cfg.fields
        .iter()
        .filter_map(|m| {
            Some(Field {
                path: MemberstackPath::parse(&m.memberstack).ok()?,
                mapping: m.clone(),
            })
        })
        .collect()
}

/// Decides changes. Cheap to clone: one per worker.
#[derive(Clone)]
pub struct Applier {
    cfg: Arc<MergeConfig>,
    fields: Arc<Vec<Field>>,
    /// Only read here (an event that does not describe the member); pushes are the outbox's.
    memberstack: Option<MemberstackClient>,
    /// Whether a Supabase Auth applier runs (`[supabase]` configured).
    auth: bool,
}

/// One field's decision within a change.
struct Decided<'a> {
    field: &'a Field,
    resolution: Resolution,
    previous: Option<Value>,
}

/// What the change asks of Supabase Auth.
struct AuthIntent {
    desired: Map<String, Value>,
    /// The outcome waits for the applier: it names the auth user the applier creates or
    /// links, or says that the email could not be set (`auth_user = "conflict"`).
    awaits: bool,
}

impl Applier {
    pub fn new(
        cfg: Arc<MergeConfig>,
        fields: Arc<Vec<Field>>,
        memberstack: Option<MemberstackClient>,
        auth: bool,
    ) -> Self {
        Self {
            cfg,
            fields,
            memberstack,
            auth,
        }
    }

    /// Decides and commits one change; its outcome is in the outbox when this returns `Ok`
    /// (except for duplicates and membersync's own writes, which announce nothing).
    pub async fn apply(
        &self,
        client: &mut Client,
        change: &Change,
        origin: &Origin,
        attempt: u32,
    ) -> Result<Outcome, ApplyError> {
        let mut change = change.clone();
        if change.member_id.is_none()
            && let ChangeKind::Stripe {
                customer_id: Some(customer),
                ..
            } = &change.kind
        {
            // No member metadata: the customer's member, as Memberstack told us (a read of
            // committed rows, before the member's transaction).
            change.member_id = store::member_by_stripe_customer(&*client, customer).await?;
        }
        let Some(member_id) = change.member_id.clone() else {
            let why = match change.kind {
                ChangeKind::Stripe { .. } => {
                    "the Stripe event names no Memberstack member and no member has its customer"
                }
                _ => "the change names no Memberstack member",
            };
            return self
                .skip(
                    client,
                    Outcome::new(&change, Status::Skipped).with_reason(why),
                    attempt,
                )
                .await;
        };
        match &change.kind {
            ChangeKind::Cdc { own: true, op, .. } if op != "d" && op != "t" => {
                return self.observe_own_write(client, &change, &member_id).await;
            }
            ChangeKind::Cdc { own: true, .. } => {
                return Ok(
                    Outcome::new(&change, Status::Skipped).with_reason("membersync's own write")
                );
            }
            ChangeKind::Cdc { op, .. } if op == "d" || op == "t" => {
                let outcome = Outcome::new(&change, Status::Skipped)
                    .with_reason("rows deleted in Supabase are not deleted in Memberstack");
                return self.skip(client, outcome, attempt).await;
            }
            // Outside the transaction: no lock is held while Memberstack answers.
            ChangeKind::Memberstack { refetch: true, .. } => match &self.memberstack {
                Some(ms) => match ms.get_member(&member_id).await? {
                    Some(member) => change.payload = member.raw,
                    None => {
                        let outcome = Outcome::new(&change, Status::Skipped)
                            .with_reason("the member no longer exists in Memberstack");
                        return self.skip(client, outcome, attempt).await;
                    }
                },
                None => {
                    let outcome = Outcome::new(&change, Status::Skipped).with_reason(
                        "unknown event and no Memberstack API key to re-read the member",
                    );
                    return self.skip(client, outcome, attempt).await;
                }
            },
            _ => {}
        }
        // Plan events, and a Stripe subscription that ended, name one plan connection: the
        // member's plan is chosen from all of them, re-read here — outside the transaction, no
        // lock is held while Memberstack answers; an outage is retried like any other.
        if (change.is_plan_event() || change.is_subscription_loss())
            && let Some(ms) = &self.memberstack
        {
            match ms.get_member(&member_id).await? {
                // A subscription that ended: Memberstack, which owns the status, says what is
                // left (it sends its own plan event once it has ended the connection).
                Some(member) if change.is_plan_event() || change.is_subscription_end() => {
                    change.with_plan_connections(&member.raw)
                }
                // A subscription past due (or unpaid, …) while the member has two or more
                // active paid plans: whichever this one is, another one still gives access.
                Some(member) => {
                    if active_paid_plans(&member.raw) >= 2 {
                        change.with_plan_connections(&member.raw);
                    }
                }
                None => {
                    let outcome = Outcome::new(&change, Status::Skipped)
                        .with_reason("the member no longer exists in Memberstack");
                    return self.skip(client, outcome, attempt).await;
                }
            }
        }

        let tx = client.transaction().await?;
        // The lock first: a concurrent delivery of the same event waits here, then sees it
        // processed.
        let row = store::lock_member(&tx, &member_id).await?;
        if let Some(previous) = store::processed(&tx, &change.event_id).await? {
            // Its outcome was committed with it (the relay sends it, a crash or not): a
            // redelivery announces nothing more.
            let mut outcome = serde_json::from_value::<Outcome>(previous)
                .unwrap_or_else(|_| Outcome::new(&change, Status::Duplicate));
            outcome.reason =
                Some(format!("already processed ({:?})", outcome.status).to_lowercase());
            outcome.status = Status::Duplicate;
            tx.rollback().await?;
            return Ok(outcome);
        }
        let mut states = store::field_states(&tx, &member_id).await?;
        let mut outcome = Outcome::new(&change, Status::Unchanged);
        outcome.attempts = attempt;
        outcome.user_id = row.as_ref().and_then(|r| r.user_id).map(|u| u.to_string());

        // Tombstones: a member Memberstack deleted stays deleted. A later change of it — a
        // delayed `member.created` or `member.updated` (webhooks are retried for hours), the
        // application's edit of its row, a Stripe event — is ignored and logged; nothing is
        // written or pushed for it.
        if !change.is_deleted()
            && let Some(deleted) = outbox::deleted_at(&tx, &member_id).await?
        {
            tracing::info!(member = %member_id, event_id = %change.event_id, %deleted, "change of a deleted member ignored");
            outcome.status = Status::Skipped;
            outcome.reason = Some(format!(
                "the member was deleted in Memberstack at {}: its later changes are ignored",
                deleted.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ));
            commit_decision(tx, &change, &member_id, &mut outcome, false).await?;
            return Ok(outcome);
        }

        // Orphans: a member Memberstack answered 404 for gets nothing pushed until a change
        // from Memberstack shows it exists.
        if matches!(change.kind, ChangeKind::Memberstack { .. }) {
            outbox::clear_orphan(&tx, &member_id).await?;
        } else if matches!(change.kind, ChangeKind::Cdc { .. })
            && outbox::is_orphan(&tx, &member_id).await?
        {
            outcome.status = Status::Skipped;
            outcome.reason = Some(
                "the member does not exist in Memberstack: nothing is pushed for it until it does"
                    .into(),
            );
            commit_decision(tx, &change, &member_id, &mut outcome, false).await?;
            return Ok(outcome);
        }

        if change.is_deleted() {
            return self
                .delete(tx, &change, &member_id, row.is_some(), outcome)
                .await;
        }

        let decided = self.decide(&change, row.as_ref(), &states);
        let writes: Vec<(&FieldMapping, Value)> = decided
            .iter()
            .filter_map(|d| Some((&d.field.mapping, d.resolution.write_supabase.clone()?)))
            .collect();
        let create_row = row.is_none() && change.side == Side::Memberstack;
        let user_id = row.as_ref().and_then(|r| r.user_id);
        let auth_conflict = if self.auth && change.side == Side::Memberstack {
            outbox::conflict_of(&tx, &member_id, Target::Auth).await?
        } else {
            None
        };
        let auth = self.auth_intent(
            &change,
            row.as_ref(),
            &decided,
            auth_conflict.as_ref(),
            &mut outcome,
        );

        let mut doc = store::column_values(&writes);
        if let Some(customer) = change.stripe_customer_id()
            && row.as_ref().is_none_or(|r| {
                r.columns.get("stripe_customer_id").and_then(Value::as_str) != Some(customer)
            })
        {
            // Kept so that a Stripe event naming only this customer finds the member.
            doc.insert(
                "stripe_customer_id".into(),
                Value::String(customer.to_owned()),
            );
        }
        if !doc.is_empty() || create_row {
            store::mark_origin(&tx).await?;
            store::write_member(&tx, &member_id, user_id, &doc, row.is_some()).await?;
            outcome.created = create_row;
        }

        for d in &decided {
            let r = &d.resolution;
            let wrote = r.write_supabase.is_some();
            let pushed = r.push_memberstack.is_some();
            let value = r
                .write_supabase
                .clone()
                .or_else(|| r.push_memberstack.clone())
                .unwrap_or_else(|| r.state.value.clone().unwrap_or(Value::Null));
            outcome.record_field(&d.field.mapping.name, r.verdict, &value, wrote, pushed);
            if let Some(c) = &r.conflict {
                outcome.record_conflict(&d.field.mapping.name, c);
            }
            let before = states.remove(&d.field.mapping.name).unwrap_or_default();
            if before != r.state {
                store::save_field_state(&tx, &member_id, &d.field.mapping.name, &r.state).await?;
            }
        }
        if outcome
            .fields
            .iter()
            .any(|f| f.wrote_supabase || f.pushed_memberstack)
            || outcome.created
        {
            outcome.status = Status::Applied;
        }
        self.log(&tx, &change, &member_id, user_id, &decided, &outcome)
            .await?;
        if change.is_snapshot() && change.event_id.starts_with(RESYNC_PREFIX) {
            // A member's own resync (`POST /v1/members/me/resync`) is an administrative action:
            // recorded once, with its decision (the API role itself is read-only).
            store::audit(
                &tx,
                &format!("member:{member_id}"),
                "member_resync",
                &member_id,
                &json!({"event_id": change.event_id, "status": outcome.status}),
            )
            .await?;
        }

        // The desired external state, coalesced with what is pending for the member.
        let (push, settled) = self.memberstack_intent(&change, &decided);
        let pace = std::time::Duration::from_millis(self.cfg.member_push_interval_ms);
        outbox::upsert_intent(
            &tx,
            &member_id,
            Target::Memberstack,
            &push,
            &settled,
            Some(origin),
            pace,
        )
        .await?;
        let awaiting_auth = auth.as_ref().is_some_and(|a| a.awaits);
        if let Some(a) = &auth {
            // New values for an intent that waits on a conflict: try them now (a conflict
            // that stands is not reported again).
            outbox::supersede_conflict(&tx, &member_id, Target::Auth).await?;
            outbox::upsert_intent(
                &tx,
                &member_id,
                Target::Auth,
                &a.desired,
                &[],
                Some(origin),
                std::time::Duration::ZERO,
            )
            .await?;
        }

        commit_decision(tx, &change, &member_id, &mut outcome, awaiting_auth).await?;
        Ok(outcome)
    }

    /// An outcome decided without touching the member: only announced.
    async fn skip(
        &self,
        client: &mut Client,
        mut outcome: Outcome,
        attempt: u32,
    ) -> Result<Outcome, ApplyError> {
        outcome.attempts = attempt;
        outbox::enqueue_outcome(&*client, &outcome, false).await?;
        Ok(outcome)
    }

    /// membersync's own write, seen through CDC: nothing to apply (it is never pushed back),
    /// but its values are the newest the Supabase stream has shown (`supabase_seen`).
    async fn observe_own_write(
        &self,
        client: &mut Client,
        change: &Change,
        member_id: &str,
    ) -> Result<Outcome, ApplyError> {
        let tx = client.transaction().await?;
        store::lock_member(&tx, member_id).await?;
        let states = store::field_states(&tx, member_id).await?;
        for field in self.fields.iter() {
            let Some(value) = change.field_value(&field.mapping) else {
                continue;
            };
            let before = states.get(&field.mapping.name).cloned().unwrap_or_default();
            let after = observe_own_write(&before, &value);
            if after != before {
                store::save_field_state(&tx, member_id, &field.mapping.name, &after).await?;
            }
        }
        tx.commit().await?;
        Ok(Outcome::new(change, Status::Skipped).with_reason("membersync's own write"))
    }

    fn decide<'a>(
        &'a self,
        change: &Change,
        row: Option<&store::MemberRow>,
        states: &HashMap<String, FieldState>,
    ) -> Vec<Decided<'a>> {
        let now = Utc::now();
        let mut out = Vec::new();
        for field in self.fields.iter() {
            let Some(value) = change.field_value(&field.mapping) else {
                continue;
            };
            let rules = Rules {
                authority: field.mapping.authority,
                normalize: field.mapping.normalize,
                writable: field.path.is_writable() && self.memberstack.is_some(),
                now,
                echo_window: chrono::Duration::seconds(self.cfg.echo_window_secs as i64),
                tie: self.cfg.tie_winner,
            };
            let supabase = SupabaseNow {
                value: row.map(|r| {
                    r.columns
                        .get(&field.mapping.supabase)
                        .cloned()
                        .unwrap_or(Value::Null)
                }),
                edited_at: row.map(|r| r.edited_at(&field.mapping.supabase)),
            };
            let incoming = Incoming {
                side: change.side,
                value,
                at: change.occurred_at,
                replayed: change.replayed,
                snapshot: change.is_snapshot(),
            };
            let state = states.get(&field.mapping.name).cloned().unwrap_or_default();
            let resolution = resolve(&rules, &state, &supabase, &incoming);
            out.push(Decided {
                field,
                resolution,
                previous: supabase.value,
            });
        }
        out
    }

    /// The Memberstack values to set (by field name), and the pending ones that this change
    /// settles: Memberstack itself now holds the agreed value, so a push still waiting for
    /// the field would overwrite a newer Memberstack edit with an older value.
    fn memberstack_intent(
        &self,
        change: &Change,
        decided: &[Decided<'_>],
    ) -> (Map<String, Value>, Vec<String>) {
        let mut push = Map::new();
        let mut settled = Vec::new();
        for d in decided {
            let r = &d.resolution;
            let name = &d.field.mapping.name;
            if let Some(v) = &r.push_memberstack {
                push.insert(name.clone(), v.clone());
            } else if change.side == Side::Memberstack
                && let (Some(agreed), Some(incoming)) = (&r.state.value, &r.state.memberstack_seen)
                && same(d.field.mapping.normalize, agreed, incoming)
            {
                settled.push(name.clone());
            }
        }
        (push, settled)
    }

    /// What the member's auth user must become: created (or linked, by email) when the member
    /// has none; its email and user_metadata updated when the change wrote one of them. The
    /// email is part of it only when it is to be set (a new user, a changed email, or an
    /// email held back until Memberstack reports it verified), with whether it is verified.
    fn auth_intent(
        &self,
        change: &Change,
        row: Option<&store::MemberRow>,
        decided: &[Decided<'_>],
        conflict: Option<&Value>,
        outcome: &mut Outcome,
    ) -> Option<AuthIntent> {
        if !self.auth || !self.cfg.create_auth_users || change.side != Side::Memberstack {
            return None;
        }
        let existing = row.and_then(|r| r.user_id);
        // The member's values after this change, by column.
        let mut after: Map<String, Value> = row.map(|r| r.columns.clone()).unwrap_or_default();
        for (column, value) in store::column_values(
            &decided
                .iter()
                .filter_map(|d| Some((&d.field.mapping, d.resolution.write_supabase.clone()?)))
                .collect::<Vec<_>>(),
        ) {
            after.insert(column, value);
        }
        let member_id = change.member_id.as_deref().unwrap_or_default();
        let metadata = json!({
            "memberstack_id": member_id,
            "plan_id": after.get("plan_id").cloned().unwrap_or(Value::Null),
            "subscription_status": after.get("subscription_status").cloned().unwrap_or(json!("free")),
        });
        let email = after.get("email").and_then(Value::as_str);
        // Memberstack's `verified`: whether the member confirmed its (current) email; `None`:
        // the change does not say (webhooks need not carry it; the applier then asks).
        let verified = match change.kind {
            ChangeKind::Memberstack { .. } => {
                change.payload.get("verified").and_then(Value::as_bool)
            }
            _ => None,
        };
        let reason = conflict
            .and_then(|c| c.get("reason"))
            .and_then(Value::as_str);
        match existing {
            None => {
                let email = email?;
                if reason.is_some() {
                    // The last attempt found an auth user it may not link: the outcome does
                    // not wait for the retry.
                    outcome.auth_user = Some("conflict".into());
                }
                Some(AuthIntent {
                    desired: outbox::auth::desired(Some((email, verified)), metadata),
                    awaits: reason.is_none(),
                })
            }
            Some(_) => {
                let wrote = |column: &str| {
                    decided.iter().any(|d| {
                        d.resolution.write_supabase.is_some() && d.field.mapping.supabase == column
                    })
                };
                let email_changed = wrote("email");
                let now_verified = reason == Some("email_unverified") && verified == Some(true);
                let touched = email_changed
                    || now_verified
                    || wrote("subscription_status")
                    || wrote("plan_id");
                touched.then(|| {
                    let send_email = email_changed || now_verified;
                    outcome.auth_user = Some("updated".into());
                    AuthIntent {
                        desired: outbox::auth::desired(
                            email.filter(|_| send_email).map(|e| (e, verified)),
                            metadata,
                        ),
                        awaits: send_email,
                    }
                })
            }
        }
    }

    async fn delete(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        change: &Change,
        member_id: &str,
        exists: bool,
        mut outcome: Outcome,
    ) -> Result<Outcome, ApplyError> {
        if exists && self.cfg.on_member_deleted == DeleteMode::Soft {
            store::mark_origin(&tx).await?;
            if store::soft_delete(&tx, member_id, change.occurred_at).await? {
                outcome.status = Status::Applied;
                outcome.deleted = true;
            }
        }
        // Nothing more is pushed for a deleted member, and its later changes are ignored.
        outbox::cancel_intents(&tx, member_id).await?;
        outbox::mark_deleted(&tx, member_id, change.occurred_at).await?;
        let user_id: Option<Uuid> = outcome.user_id.as_deref().and_then(|u| u.parse().ok());
        store::log_change(
            &tx,
            &LogEntry {
                user_id,
                memberstack_id: member_id,
                change_type: "deleted",
                old: Value::Null,
                new: json!({ "deleted": outcome.deleted, "mode": format!("{:?}", self.cfg.on_member_deleted).to_lowercase() }),
                source: change.source,
            },
        )
        .await?;
        commit_decision(tx, change, member_id, &mut outcome, false).await?;
        Ok(outcome)
    }

    /// `user_logs`: one row for the change's writes (old and new values), one per conflict.
    async fn log(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        change: &Change,
        member_id: &str,
        user_id: Option<Uuid>,
        decided: &[Decided<'_>],
        outcome: &Outcome,
    ) -> Result<(), ApplyError> {
        let mut old = Map::new();
        let mut new = Map::new();
        let mut subscription = false;
        for d in decided {
            let r = &d.resolution;
            if let Some(v) = r.write_supabase.as_ref().or(r.push_memberstack.as_ref()) {
                old.insert(
                    d.field.mapping.name.clone(),
                    d.previous.clone().unwrap_or(Value::Null),
                );
                new.insert(d.field.mapping.name.clone(), v.clone());
                subscription |= r.write_supabase.is_some()
                    && matches!(
                        d.field.mapping.supabase.as_str(),
                        "subscription_status" | "plan_id"
                    );
            }
        }
        if !new.is_empty() {
            let change_type = if outcome.created {
                "created"
            } else if subscription {
                "subscription_updated"
            } else if decided
                .iter()
                .all(|d| d.resolution.write_supabase.is_none())
            {
                "synced"
            } else {
                "updated"
            };
            store::log_change(
                tx,
                &LogEntry {
                    user_id,
                    memberstack_id: member_id,
                    change_type,
                    old: Value::Object(old),
                    new: Value::Object(new),
                    source: change.source,
                },
            )
            .await?;
        }
        for c in &outcome.conflicts {
            store::log_change(
                tx,
                &LogEntry {
                    user_id,
                    memberstack_id: member_id,
                    change_type: "conflict_resolved",
                    old: json!({ c.field.clone(): c.losing }),
                    new: json!({ c.field.clone(): c.winning, "winner": c.winner }),
                    source: change.source,
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// How many active paid (not `FREE`) plan connections the member has.
fn active_paid_plans(member: &Value) -> usize {
    member
        .get("planConnections")
        .and_then(Value::as_array)
        .map_or(0, |list| {
            list.iter()
                .filter(|p| p.get("active").and_then(Value::as_bool) == Some(true))
                .filter(|p| {
                    !p.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.eq_ignore_ascii_case("free"))
                })
                .count()
        })
}

/// The end of every decision: the exactly-once marker with the outcome, the outcome into the
/// outbox for the relay, and the commit that makes all of it durable at once.
async fn commit_decision(
    tx: tokio_postgres::Transaction<'_>,
    change: &Change,
    member_id: &str,
    outcome: &mut Outcome,
    awaiting_auth: bool,
) -> Result<(), ApplyError> {
    outcome.processed_at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    store::mark_processed(
        &tx,
        &change.event_id,
        change.source,
        change.event_type(),
        Some(member_id),
        &outcome.to_json(),
    )
    .await?;
    outbox::enqueue_outcome(&tx, outcome, awaiting_auth).await?;
    tx.commit().await?;
    Ok(())
}
