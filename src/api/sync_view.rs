//! What `GET /v1/members/me/sync` shows a member: its `members` row, each synced field's
//! state (`sync_state`), what is still pending, and its dead-lettered changes (`error_logs`).
//!
//! "Pending" is what the database can tell cheaply and exactly:
//! - `supabase_edit`: the `members` row holds a value other than the field's last agreed one
//!   (`sync_state.last_value`) — an edit in Supabase whose CDC event merge has not applied
//!   yet (merge reads the row the same way, `resolve.rs`);
//! - `memberstack_unconfirmed`: values pushed to Memberstack whose webhook has not come back
//!   yet (`sync_state.echoes`).
//!
//! Webhooks received but not yet merged are not shown: they sit in Kafka, and finding one
//! member's records there is not cheap (operators see the consumer lag in `/v1/admin/status`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Client;

use crate::config::FieldMapping;
use crate::merge::normalize::same;

/// At most this many dead letters are listed, newest first.
const DEAD_LETTER_LIMIT: i64 = 50;

#[derive(Debug, Serialize)]
pub struct SyncView {
    pub member_id: String,
    /// `null`: no `members` row yet (never synced, or not this app's member).
    pub member: Option<MemberRow>,
    pub fields: Vec<FieldView>,
    pub pending: Vec<Pending>,
    pub dead_letters: Vec<DeadLetterView>,
}

#[derive(Debug, Serialize)]
pub struct MemberRow {
    pub memberstack_id: String,
    pub email: Option<String>,
    pub subscription_status: Option<String>,
    pub plan_id: Option<String>,
    pub last_synced_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct FieldView {
    pub field: String,
    /// `null` when the field was only ever seen, never agreed.
    pub last_synced_at: Option<DateTime<Utc>>,
    /// Which side the agreed value came from.
    pub last_source: Option<String>,
    pub pushed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct Pending {
    pub field: String,
    /// `supabase_edit` or `memberstack_unconfirmed`.
    pub kind: &'static str,
    /// When: the row's `updated_at`, or the oldest unconfirmed push.
    pub since: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    /// Id in `membersync dlq list` / `GET /v1/admin/dlq`.
    pub dlq_id: Option<String>,
    pub error_kind: Option<String>,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
    pub replayed: bool,
}

pub async fn load(
    client: &Client,
    member_id: &str,
    fields: &[FieldMapping],
) -> Result<SyncView, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select to_jsonb(m) from public.members m where memberstack_id = $1",
            &[&member_id],
        )
        .await?
        .map(|r| r.get::<_, Value>(0));
    let states = client
        .query(
            "select field, last_synced_at, last_value, last_source, pushed_at, echoes
               from public.sync_state where memberstack_id = $1 order by field",
            &[&member_id],
        )
        .await?;
    let letters = client
        .query(
            "select e.context->>'dlq_id', e.context->>'error_kind', e.retry_count, e.created_at,
                    exists (select 1 from public.audit_logs a
                             where a.action = 'dlq_replay' and a.target = e.context->>'dlq_id')
               from public.error_logs e
              where e.memberstack_id = $1
              order by e.created_at desc
              limit $2",
            &[&member_id, &DEAD_LETTER_LIMIT],
        )
        .await?;

    let mut view = SyncView {
        member_id: member_id.to_owned(),
        member: row.as_ref().map(member_row),
        fields: Vec::new(),
        pending: Vec::new(),
        dead_letters: letters
            .iter()
            .map(|r| DeadLetterView {
                dlq_id: r.get(0),
                error_kind: r.get(1),
                attempts: r.get(2),
                failed_at: r.get(3),
                replayed: r.get(4),
            })
            .collect(),
    };
    let row_updated_at = view.member.as_ref().and_then(|m| m.updated_at);
    for s in &states {
        let field: String = s.get("field");
        let synced_at: DateTime<Utc> = s.get("last_synced_at");
        let last_value: Option<Value> = s.get("last_value");
        let echoes: Value = s.get("echoes");
        if let (Some(mapping), Some(row), Some(agreed)) = (
            fields.iter().find(|f| f.name == field),
            row.as_ref(),
            last_value.as_ref(),
        ) {
            let now = row.get(&mapping.supabase).unwrap_or(&Value::Null);
            if !same(mapping.normalize, now, agreed) {
                view.pending.push(Pending {
                    field: field.clone(),
                    kind: "supabase_edit",
                    since: row_updated_at,
                });
            }
        }
        let unconfirmed: Vec<DateTime<Utc>> = echoes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("at")?.as_str()?.parse().ok())
            .collect();
        if !unconfirmed.is_empty() {
            view.pending.push(Pending {
                field: field.clone(),
                kind: "memberstack_unconfirmed",
                since: unconfirmed.into_iter().min(),
            });
        }
        view.fields.push(FieldView {
            field,
            // merge stores the epoch for "seen, never agreed".
            last_synced_at: (synced_at != DateTime::<Utc>::UNIX_EPOCH).then_some(synced_at),
            last_source: s.get("last_source"),
            pushed_at: s.get("pushed_at"),
        });
    }
    Ok(view)
}

fn member_row(v: &Value) -> MemberRow {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let time = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
    };
    MemberRow {
        memberstack_id: text("memberstack_id").unwrap_or_default(),
        email: text("email"),
        subscription_status: text("subscription_status"),
        plan_id: text("plan_id"),
        last_synced_at: time("last_synced_at"),
        updated_at: time("updated_at"),
        deleted_at: time("deleted_at"),
    }
}
