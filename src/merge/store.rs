//! Merge's reads and writes in Supabase Postgres, all inside the one transaction of a
//! change: the member's lock, its row and field states, the exactly-once marker
//! (`webhook_log`), the row write, the change log (`user_logs`), `sync_state`, and the origin
//! message that tells CDC the transaction is ours.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::normalize::plan_status;
use super::resolve::{Echo, FieldState, Side};
use crate::config::{FieldMapping, Normalize};

/// The member's row as merge sees it.
#[derive(Debug, Clone)]
pub struct MemberRow {
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Mapped columns, as JSON.
    pub columns: Map<String, Value>,
    /// When each column last changed (`membersync_meta.member_column_edits`, kept by a
    /// trigger). Not `updated_at`: a later write of another column moves that.
    pub column_edited_at: HashMap<String, DateTime<Utc>>,
}

impl MemberRow {
    /// When `column` last changed; the row's `updated_at` for a column the trigger has not
    /// seen change (it can only be older).
    pub fn edited_at(&self, column: &str) -> DateTime<Utc> {
        self.column_edited_at
            .get(column)
            .copied()
            .unwrap_or(self.updated_at)
    }
}

/// Serialises every writer of one member (merge instances, whatever topic the change came
/// from) and locks the row against concurrent application writes until commit.
pub async fn lock_member(
    tx: &Transaction<'_>,
    memberstack_id: &str,
) -> Result<Option<MemberRow>, tokio_postgres::Error> {
    tx.execute(
        "select pg_advisory_xact_lock(hashtextextended('membersync.member:' || $1, 0))",
        &[&memberstack_id],
    )
    .await?;
    let row = tx
        .query_opt(
            "select id, user_id, deleted_at, updated_at, to_jsonb(m) as doc
               from public.members m where memberstack_id = $1 for update",
            &[&memberstack_id],
        )
        .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let id: Uuid = r.get("id");
    let column_edited_at = tx
        .query(
            "select column_name, edited_at from membersync_meta.member_column_edits
              where member_id = $1",
            &[&id],
        )
        .await?
        .into_iter()
        .map(|e| (e.get("column_name"), e.get("edited_at")))
        .collect();
    let doc: Value = r.get("doc");
    Ok(Some(MemberRow {
        id,
        user_id: r.get("user_id"),
        deleted_at: r.get("deleted_at"),
        updated_at: r.get("updated_at"),
        columns: match doc {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        column_edited_at,
    }))
}

/// The member whose Stripe customer this is (`members.stripe_customer_id`, kept from
/// Memberstack's member object), if any.
pub async fn member_by_stripe_customer(
    client: &impl tokio_postgres::GenericClient,
    customer_id: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "select memberstack_id from public.members
              where stripe_customer_id = $1 and deleted_at is null
              order by updated_at desc limit 1",
            &[&customer_id],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The outcome stored for an already-processed event, if any.
pub async fn processed(
    tx: &Transaction<'_>,
    event_id: &str,
) -> Result<Option<Value>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "select result from public.webhook_log where event_id = $1",
            &[&event_id],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, Option<Value>>(0).unwrap_or(Value::Null)))
}

pub async fn field_states(
    tx: &Transaction<'_>,
    memberstack_id: &str,
) -> Result<HashMap<String, FieldState>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select field, last_synced_at, last_value, last_pushed_value, last_source, pushed_at, echoes,
                    memberstack_seen, supabase_seen
               from public.sync_state where memberstack_id = $1",
            &[&memberstack_id],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let source: Option<String> = r.get("last_source");
            let echoes: Value = r.get("echoes");
            let state = FieldState {
                value: r.get("last_value"),
                synced_at: Some(r.get::<_, DateTime<Utc>>("last_synced_at"))
                    .filter(|t| *t != DateTime::<Utc>::UNIX_EPOCH),
                source: match source.as_deref() {
                    Some("memberstack") => Some(Side::Memberstack),
                    Some("supabase") => Some(Side::Supabase),
                    _ => None,
                },
                pushed_value: r.get("last_pushed_value"),
                pushed_at: r.get("pushed_at"),
                echoes: serde_json::from_value::<Vec<Echo>>(echoes).unwrap_or_default(),
                memberstack_seen: r.get("memberstack_seen"),
                supabase_seen: r.get("supabase_seen"),
            };
            (r.get::<_, String>("field"), state)
        })
        .collect())
}

pub async fn save_field_state(
    tx: &Transaction<'_>,
    memberstack_id: &str,
    field: &str,
    state: &FieldState,
) -> Result<(), tokio_postgres::Error> {
    // A field only ever seen (never agreed) still has its row; its time is unknown.
    let synced_at = state.synced_at.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let echoes = serde_json::to_value(&state.echoes).unwrap_or(Value::Array(Vec::new()));
    tx.execute(
        "insert into public.sync_state
             (memberstack_id, field, last_synced_at, last_value, last_pushed_value, last_source, pushed_at, echoes,
              memberstack_seen, supabase_seen, updated_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
         on conflict (memberstack_id, field) do update set
             last_synced_at = excluded.last_synced_at, last_value = excluded.last_value,
             last_pushed_value = excluded.last_pushed_value, last_source = excluded.last_source,
             pushed_at = excluded.pushed_at, echoes = excluded.echoes,
             memberstack_seen = excluded.memberstack_seen, supabase_seen = excluded.supabase_seen,
             updated_at = now()",
        &[
            &memberstack_id,
            &field,
            &synced_at,
            &state.value,
            &state.pushed_value,
            &state.source.map(Side::as_str),
            &state.pushed_at,
            &echoes,
            &state.memberstack_seen,
            &state.supabase_seen,
        ],
    )
    .await?;
    Ok(())
}

/// Tags the transaction as membersync's own for CDC (`source.origin = "membersync"`), so
/// its row changes are not pushed back. Must come before the first row write.
pub async fn mark_origin(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "select pg_logical_emit_message(true, $1, '')",
        &[&crate::cdc::ORIGIN_PREFIX],
    )
    .await?;
    Ok(())
}

const JSON_OBJECT_COLUMNS: [&str; 3] = ["custom_fields", "project_data", "usage_stats"];

/// Whether the `members` column is a NOT NULL JSON object (`{}` is its "nothing").
pub fn is_object_column(column: &str) -> bool {
    JSON_OBJECT_COLUMNS.contains(&column)
}

/// The column values to write: mapped field values, with plan statuses normalised (the raw
/// value kept in `subscription_status_raw`).
pub fn column_values(writes: &[(&FieldMapping, Value)]) -> Map<String, Value> {
    let mut doc = Map::new();
    for (field, value) in writes {
        if field.normalize == Normalize::PlanStatus {
            doc.insert(
                field.supabase.clone(),
                Value::String(plan_status(value).to_owned()),
            );
            if field.supabase == "subscription_status" {
                doc.insert("subscription_status_raw".into(), value.clone());
            }
        } else if field.normalize == Normalize::CustomFields
            && let Value::Object(m) = value
        {
            // A custom field Memberstack cleared (the empty string) is a key the row does not
            // have: the two spell "no value" differently (docs/merge.md).
            let kept = m
                .iter()
                .filter(|(_, v)| !v.is_null() && v.as_str() != Some(""))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            doc.insert(field.supabase.clone(), Value::Object(kept));
        } else if value.is_null() && JSON_OBJECT_COLUMNS.contains(&field.supabase.as_str()) {
            // These columns are NOT NULL objects: a cleared value is an empty object.
            doc.insert(field.supabase.clone(), Value::Object(Map::new()));
        } else {
            doc.insert(field.supabase.clone(), value.clone());
        }
    }
    doc
}

/// Updates (or, for a new member, inserts) the row. Column names come from the validated
/// mapping (config: MAPPABLE_COLUMNS), never from input.
pub async fn write_member(
    tx: &Transaction<'_>,
    memberstack_id: &str,
    user_id: Option<Uuid>,
    doc: &Map<String, Value>,
    exists: bool,
) -> Result<(), tokio_postgres::Error> {
    let columns: Vec<&str> = doc.keys().map(String::as_str).collect();
    let doc = Value::Object(doc.clone());
    if exists {
        let mut sets: Vec<String> = columns.iter().map(|c| format!("{c} = r.{c}")).collect();
        sets.push("user_id = coalesce(m.user_id, $3::uuid)".into());
        // When membersync last wrote the row (docs/api.md).
        sets.push("last_synced_at = now()".into());
        let sql = format!(
            "update public.members m set {} from jsonb_populate_record(null::public.members, $2) r
              where m.memberstack_id = $1",
            sets.join(", ")
        );
        tx.execute(&sql, &[&memberstack_id, &doc, &user_id]).await?;
    } else {
        let list = columns.join(", ");
        let select: Vec<String> = columns.iter().map(|c| format!("r.{c}")).collect();
        let sql = format!(
            "insert into public.members (memberstack_id, user_id, last_synced_at{comma}{list})
             select $1::text, $3::uuid, now(){comma}{select} from jsonb_populate_record(null::public.members, $2) r",
            comma = if columns.is_empty() { "" } else { ", " },
            select = select.join(", "),
        );
        tx.execute(&sql, &[&memberstack_id, &doc, &user_id]).await?;
    }
    Ok(())
}

pub async fn link_user(
    tx: &Transaction<'_>,
    memberstack_id: &str,
    user_id: Uuid,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "update public.members set user_id = $2 where memberstack_id = $1 and user_id is distinct from $2",
        &[&memberstack_id, &user_id],
    )
    .await?;
    Ok(())
}

/// Links the auth user the Auth applier created or found, unless the member got one meanwhile.
pub async fn link_user_if_unlinked(
    tx: &Transaction<'_>,
    memberstack_id: &str,
    user_id: Uuid,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "update public.members set user_id = $2 where memberstack_id = $1 and user_id is null
            and not exists (select 1 from public.members o where o.user_id = $2)",
        &[&memberstack_id, &user_id],
    )
    .await?;
    Ok(())
}

/// Records that membersync brought Memberstack in line with the row (a push landed).
pub async fn touch_synced(
    tx: &Transaction<'_>,
    memberstack_id: &str,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "update public.members set last_synced_at = $2 where memberstack_id = $1
            and last_synced_at is distinct from $2",
        &[&memberstack_id, &at],
    )
    .await?;
    Ok(())
}

pub async fn soft_delete(
    tx: &Transaction<'_>,
    memberstack_id: &str,
    at: DateTime<Utc>,
) -> Result<bool, tokio_postgres::Error> {
    let n = tx
        .execute(
            "update public.members set deleted_at = $2 where memberstack_id = $1 and deleted_at is null",
            &[&memberstack_id, &at],
        )
        .await?;
    Ok(n > 0)
}

pub struct LogEntry<'a> {
    pub user_id: Option<Uuid>,
    pub memberstack_id: &'a str,
    pub change_type: &'a str,
    pub old: Value,
    pub new: Value,
    pub source: &'a str,
}

pub async fn log_change(
    tx: &Transaction<'_>,
    e: &LogEntry<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "insert into public.user_logs (user_id, memberstack_id, change_type, old_data, new_data, source)
         values ($1, $2, $3, $4, $5, $6)",
        &[&e.user_id, &e.memberstack_id, &e.change_type, &e.old, &e.new, &e.source],
    )
    .await?;
    Ok(())
}

/// An `audit_logs` row, inside the change's transaction.
pub async fn audit(
    tx: &Transaction<'_>,
    actor: &str,
    action: &str,
    target: &str,
    details: &Value,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "insert into public.audit_logs (actor, action, target, details) values ($1, $2, $3, $4)",
        &[&actor, &action, &target, details],
    )
    .await?;
    Ok(())
}

/// Marks the event processed; its outcome is kept so a redelivery can re-announce it.
pub async fn mark_processed(
    tx: &Transaction<'_>,
    event_id: &str,
    source: &str,
    event_type: &str,
    memberstack_id: Option<&str>,
    result: &Value,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "insert into public.webhook_log (event_id, source, event_type, memberstack_id, result)
         values ($1, $2, $3, $4, $5)",
        &[&event_id, &source, &event_type, &memberstack_id, result],
    )
    .await?;
    Ok(())
}

/// The auth user already registered with this email (SECURITY DEFINER function, V8).
pub async fn auth_user_by_email(
    tx: &Transaction<'_>,
    email: &str,
) -> Result<Option<Uuid>, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "select membersync_meta.auth_user_id_by_email($1)",
            &[&email],
        )
        .await?;
    Ok(row.get(0))
}
