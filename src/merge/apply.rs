//! Applying one change: one Postgres transaction that locks the member, skips an event
//! already processed, resolves every field the change carries, makes the external writes
//! (Supabase Auth, Memberstack) and then the database writes, and commits them together with
//! the exactly-once marker. A failure anywhere rolls the transaction back; external writes
//! are idempotent (they set values), so the retry converges to the same state.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

use super::MemberstackPath;
use super::change::{Change, ChangeKind};
use super::outcome::{Outcome, Status};
use super::resolve::{
    FieldState, Incoming, Resolution, Rules, Side, SupabaseNow, observe_own_write, resolve,
};
use super::store::{self, LogEntry};
use crate::config::{DeleteMode, FieldMapping, MergeConfig};
use crate::sinks::memberstack::{MemberstackClient, MemberstackError};
use crate::sinks::supabase_auth::{AuthError, CreateUser, SupabaseAuthClient};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database: {}", db_detail(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The TLS settings could not be loaded when (re)connecting, e.g. `database.ssl_root_cert`
    /// is being replaced: like an unreachable database, it passes.
    #[error("database TLS: {0}")]
    DbTls(#[from] crate::db::tls::TlsError),
    #[error("Memberstack: {0}")]
    Memberstack(#[from] MemberstackError),
    #[error("Supabase Auth: {0}")]
    Auth(#[from] AuthError),
    #[error("member {0} does not exist in Memberstack")]
    MissingInMemberstack(String),
}

/// tokio-postgres' Display says only "db error"; the server's message and code say what.
fn db_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl ApplyError {
    /// Worth another attempt: the database or a service was away or busy. Validation
    /// failures and missing members fail the same way every time.
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
                    || code.code().starts_with("08")
                    || code.code().starts_with("53")
            }),
            Self::DbTls(_) => true,
            Self::Memberstack(e) => e.is_retryable(),
            Self::Auth(e) => e.is_retryable(),
            Self::MissingInMemberstack(_) => false,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Db(_) | Self::DbTls(_) => "database",
            Self::Memberstack(_) => "memberstack",
            Self::Auth(_) => "supabase_auth",
            Self::MissingInMemberstack(_) => "missing_in_memberstack",
        }
    }
}

/// A mapped field with its parsed Memberstack path.
#[derive(Debug, Clone)]
pub struct Field {
    pub mapping: FieldMapping,
    pub path: MemberstackPath,
}

/// Applies changes. Cheap to clone: one per worker.
#[derive(Clone)]
pub struct Applier {
    cfg: Arc<MergeConfig>,
    fields: Arc<Vec<Field>>,
    memberstack: Option<MemberstackClient>,
    auth: Option<SupabaseAuthClient>,
}

/// One field's decision within a change.
struct Decided<'a> {
    field: &'a Field,
    resolution: Resolution,
    previous: Option<Value>,
}

impl Applier {
    pub fn new(
        cfg: Arc<MergeConfig>,
        memberstack: Option<MemberstackClient>,
        auth: Option<SupabaseAuthClient>,
    ) -> Self {
        let fields = cfg
            .fields
            .iter()
            .filter_map(|m| {
                Some(Field {
                    path: MemberstackPath::parse(&m.memberstack).ok()?,
                    mapping: m.clone(),
                })
            })
            .collect();
        Self {
            cfg,
            fields: Arc::new(fields),
            memberstack,
            auth,
        }
    }

    pub async fn apply(&self, client: &mut Client, change: &Change) -> Result<Outcome, ApplyError> {
        let Some(member_id) = change.member_id.clone() else {
            let why = match change.kind {
                ChangeKind::Stripe { .. } => "the Stripe event names no Memberstack member",
                _ => "the change names no Memberstack member",
            };
            return Ok(Outcome::new(change, Status::Skipped).with_reason(why));
        };
        let mut change = change.clone();
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
                return Ok(Outcome::new(&change, Status::Skipped)
                    .with_reason("rows deleted in Supabase are not deleted in Memberstack"));
            }
            ChangeKind::Memberstack { refetch: true, .. } => match &self.memberstack {
                Some(ms) => match ms.get_member(&member_id).await? {
                    Some(member) => change.payload = member.raw,
                    None => {
                        return Ok(Outcome::new(&change, Status::Skipped)
                            .with_reason("the member no longer exists in Memberstack"));
                    }
                },
                None => {
                    return Ok(Outcome::new(&change, Status::Skipped).with_reason(
                        "unknown event and no Memberstack API key to re-read the member",
                    ));
                }
            },
            _ => {}
        }

        let tx = client.transaction().await?;
        // The lock first: a concurrent delivery of the same event waits here, then sees it
        // processed.
        let row = store::lock_member(&tx, &member_id).await?;
        if let Some(previous) = store::processed(&tx, &change.event_id).await? {
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
        outcome.user_id = row.as_ref().and_then(|r| r.user_id).map(|u| u.to_string());

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

        // External writes first: if one fails nothing is committed and the retry redoes them.
        let user_id = self
            .sync_auth_user(&tx, &change, row.as_ref(), &decided, &mut outcome)
            .await?;
        self.push_to_memberstack(&member_id, &decided).await?;

        let doc = store::column_values(&writes);
        if !doc.is_empty()
            || create_row
            || (user_id.is_some() && row.as_ref().is_some_and(|r| r.user_id.is_none()))
        {
            store::mark_origin(&tx).await?;
            if doc.is_empty() && !create_row {
                if let Some(uid) = user_id {
                    store::link_user(&tx, &member_id, uid).await?;
                }
            } else {
                store::write_member(&tx, &member_id, user_id, &doc, row.is_some()).await?;
            }
            outcome.created = create_row;
        }
        outcome.user_id = user_id.map(|u| u.to_string()).or(outcome.user_id);

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
        outcome.processed_at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        store::mark_processed(
            &tx,
            &change.event_id,
            change.source,
            change.event_type(),
            Some(&member_id),
            &outcome.to_json(),
        )
        .await?;
        tx.commit().await?;
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

    /// Creates the member's auth user (or links the one with its email) when the member has
    /// none, and keeps its email and user_metadata in step with the member's subscription.
    async fn sync_auth_user(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        change: &Change,
        row: Option<&store::MemberRow>,
        decided: &[Decided<'_>],
        outcome: &mut Outcome,
    ) -> Result<Option<Uuid>, ApplyError> {
        let existing = row.and_then(|r| r.user_id);
        let Some(auth) = self.auth.as_ref().filter(|_| self.cfg.create_auth_users) else {
            return Ok(existing);
        };
        if change.side != Side::Memberstack {
            return Ok(existing);
        }
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
        let email = after
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_owned);
        match existing {
            None => {
                let Some(email) = email else {
                    return Ok(None);
                };
                let request = CreateUser {
                    email: email.clone(),
                    email_confirm: true,
                    user_metadata: metadata,
                    app_metadata: None,
                    password: None,
                };
                match auth.create_user(&request).await {
                    Ok(user) => {
                        outcome.auth_user = Some("created".into());
                        Ok(Some(user.id))
                    }
                    Err(AuthError::EmailExists) => {
                        let id = store::auth_user_by_email(tx, &email).await?;
                        if id.is_some() {
                            outcome.auth_user = Some("linked".into());
                        }
                        Ok(id)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Some(id) => {
                let touched = decided.iter().any(|d| {
                    d.resolution.write_supabase.is_some()
                        && matches!(
                            d.field.mapping.supabase.as_str(),
                            "email" | "subscription_status" | "plan_id"
                        )
                });
                if touched {
                    let mut body = json!({ "user_metadata": metadata });
                    if let Some(email) = email {
                        body["email"] = json!(email);
                    }
                    auth.update_user(id, &body).await?;
                    outcome.auth_user = Some("updated".into());
                }
                Ok(Some(id))
            }
        }
    }

    /// One PATCH with every field to push. `json` is replaced whole by Memberstack, so a
    /// `json.<key>` field reads the member first (read-modify-write).
    async fn push_to_memberstack(
        &self,
        member_id: &str,
        decided: &[Decided<'_>],
    ) -> Result<(), ApplyError> {
        let pushes: Vec<(&Field, Value)> = decided
            .iter()
            .filter_map(|d| Some((d.field, d.resolution.push_memberstack.clone()?)))
            .collect();
        let Some(ms) = &self.memberstack else {
            return Ok(());
        };
        if pushes.is_empty() {
            return Ok(());
        }
        let current = if pushes.iter().any(|(f, _)| f.path.needs_read_before_write()) {
            Some(
                ms.get_member(member_id)
                    .await?
                    .ok_or_else(|| ApplyError::MissingInMemberstack(member_id.to_owned()))?
                    .raw,
            )
        } else {
            None
        };
        let mut patch = Map::new();
        for (field, value) in pushes {
            field.path.put(&mut patch, value, current.as_ref());
        }
        match ms.update_member(member_id, &patch).await {
            Ok(_) => Ok(()),
            Err(MemberstackError::Api { status: 404, .. }) => {
                Err(ApplyError::MissingInMemberstack(member_id.to_owned()))
            }
            Err(e) => Err(e.into()),
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
        let user_id = outcome.user_id.as_deref().and_then(|u| u.parse().ok());
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
        store::mark_processed(
            &tx,
            &change.event_id,
            change.source,
            change.event_type(),
            Some(member_id),
            &outcome.to_json(),
        )
        .await?;
        tx.commit().await?;
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
