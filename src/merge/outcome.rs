//! The outcome of one change: the record on `<prefix>.sync` (schema
//! `schemas/kafka/sync.json`) and the PostHog events derived from it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::change::{Change, Position};
use super::resolve::{Conflict, Side, Verdict};
use crate::sinks::posthog::CaptureEvent;

pub const SCHEMA_VERSION: u32 = 1;

/// Namespace of outcome ids: `uuid_v5(NS, event_id)`, so a re-announced outcome has the
/// same id and consumers can deduplicate.
const OUTCOME_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d656d62_6572_7379_6e63_6f7574636f6d);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Something was written to Supabase and/or Memberstack.
    Applied,
    /// Processed; both sides already agreed (echoes, stale and equal values).
    Unchanged,
    /// Already processed earlier (same event id): nothing done again, and nothing announced
    /// (counted in metrics only; kept in the schema for records of earlier versions).
    Duplicate,
    /// Not applicable (no member id, a Stripe customer without member, a truncate, …).
    Skipped,
    /// Failed permanently or could not be decoded: it is on the dead-letter topic.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldOutcome {
    pub field: String,
    pub verdict: String,
    pub value: Value,
    pub wrote_supabase: bool,
    pub pushed_memberstack: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictOutcome {
    pub field: String,
    pub winner: Side,
    pub winning: Value,
    pub losing: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub schema_version: u32,
    pub id: String,
    pub event_id: String,
    pub member_id: Option<String>,
    pub user_id: Option<String>,
    pub source: String,
    pub event_type: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    pub fields: Vec<FieldOutcome>,
    pub conflicts: Vec<ConflictOutcome>,
    /// The `members` row was created by this change.
    pub created: bool,
    /// `deleted_at` was set by this change.
    pub deleted: bool,
    /// What happened to the Supabase auth user: created, linked (existing email) or updated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub auth_user: Option<String>,
    pub origin: Position,
    pub occurred_at: String,
    pub processed_at: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The record was too large for Kafka: field and conflict values were left out (`null`).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub truncated: bool,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Outcome {
    pub fn new(change: &Change, status: Status) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            id: uuid::Uuid::new_v5(&OUTCOME_NAMESPACE, change.event_id.as_bytes()).to_string(),
            event_id: change.event_id.clone(),
            member_id: change.member_id.clone(),
            user_id: None,
            source: change.source.to_owned(),
            event_type: change.event_type().to_owned(),
            status,
            reason: None,
            fields: Vec::new(),
            conflicts: Vec::new(),
            created: false,
            deleted: false,
            auth_user: None,
            origin: change.position.clone(),
            occurred_at: rfc3339(change.occurred_at),
            processed_at: rfc3339(Utc::now()),
            attempts: 1,
            error: None,
            truncated: false,
        }
    }

    /// An outcome record Kafka refused as too large, without its values (a member's
    /// `project_data` can be large): the same outcome, its field and conflict values `null`.
    pub fn shrink(payload: &[u8]) -> Option<Vec<u8>> {
        let mut o: Outcome = serde_json::from_slice(payload).ok()?;
        if o.truncated {
            return None;
        }
        for f in &mut o.fields {
            f.value = Value::Null;
        }
        for c in &mut o.conflicts {
            c.winning = Value::Null;
            c.losing = Value::Null;
        }
        o.truncated = true;
        serde_json::to_vec(&o).ok()
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn record_conflict(&mut self, field: &str, c: &Conflict) {
        self.conflicts.push(ConflictOutcome {
            field: field.to_owned(),
            winner: c.winner,
            winning: c.winning.clone(),
            losing: c.losing.clone(),
        });
    }

    pub fn record_field(
        &mut self,
        field: &str,
        verdict: Verdict,
        value: &Value,
        wrote: bool,
        pushed: bool,
    ) {
        self.fields.push(FieldOutcome {
            field: field.to_owned(),
            verdict: verdict.as_str().to_owned(),
            value: value.clone(),
            wrote_supabase: wrote,
            pushed_memberstack: pushed,
        });
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The PostHog events this outcome stands for (sync rules: sync_completed, sync_failed,
    /// user_created, subscription_changed, conflict_resolved). Their uuids derive from the
    /// event id, so a redelivered change is deduplicated by PostHog.
    pub fn posthog_events(&self) -> Vec<CaptureEvent> {
        let Some(member) = self.member_id.as_deref() else {
            return Vec::new();
        };
        let mut base = Map::new();
        base.insert("source".into(), json!(self.source));
        base.insert("event_type".into(), json!(self.event_type));
        base.insert("event_id".into(), json!(self.event_id));
        let event = |name: &str, key: &str, extra: Map<String, Value>| {
            let mut e = CaptureEvent::new(name, member, key);
            e.properties.extend(base.clone());
            e.properties.extend(extra);
            // PostHog deduplicates on uuid, event, timestamp and distinct_id: the change's
            // own time keeps a redelivered change identical.
            if let Ok(t) = self.occurred_at.parse() {
                e.timestamp = t;
            }
            e
        };
        let mut out = Vec::new();
        if self.status != Status::Duplicate {
            // The sync rules' `sync_operation`: every change merge decided, how long it took
            // from the change on its side to the decision, and whether it succeeded.
            let duration_ms = match (
                DateTime::parse_from_rfc3339(&self.occurred_at),
                DateTime::parse_from_rfc3339(&self.processed_at),
            ) {
                (Ok(a), Ok(b)) => (b - a).num_milliseconds().max(0),
                _ => 0,
            };
            out.push(event(
                "sync_operation",
                &format!("{}:operation", self.event_id),
                props(json!({
                    "operation_type": format!("{}:{}", self.source, self.event_type),
                    "duration_ms": duration_ms,
                    "success": self.status != Status::Failed,
                    "status": self.status,
                })),
            ));
        }
        match self.status {
            Status::Applied => {
                let fields: Vec<&str> = self
                    .fields
                    .iter()
                    .filter(|f| f.wrote_supabase || f.pushed_memberstack)
                    .map(|f| f.field.as_str())
                    .collect();
                out.push(event(
                    "sync_completed",
                    &self.event_id,
                    props(json!({ "fields": fields })),
                ));
            }
            Status::Failed => out.push(event(
                "sync_failed",
                &self.event_id,
                props(json!({ "error": self.error, "attempts": self.attempts })),
            )),
            _ => {}
        }
        if self.created {
            out.push(event(
                "user_created",
                &self.event_id,
                props(json!({ "user_id": self.user_id })),
            ));
        }
        let mut subscription: Map<String, Value> = self
            .fields
            .iter()
            .filter(|f| {
                f.wrote_supabase && (f.field == "subscription_status" || f.field == "plan_id")
            })
            .map(|f| (f.field.clone(), f.value.clone()))
            .collect();
        if !subscription.is_empty() {
            // The sync rules' properties: the new status and the member's auth user.
            // (The field's value is Memberstack's raw status; `new_status` is the sync rules'
            // enum, as in `members.subscription_status`.)
            if let Some(raw) = subscription.get("subscription_status") {
                let status = super::normalize::plan_status(raw);
                subscription.insert("new_status".into(), json!(status));
            }
            subscription.insert("user_id".into(), json!(self.user_id));
            out.push(event("subscription_changed", &self.event_id, subscription));
        }
        for c in &self.conflicts {
            out.push(event(
                "conflict_resolved",
                &format!("{}:{}", self.event_id, c.field),
                props(json!({ "field": c.field, "winner": c.winner })),
            ));
        }
        out
    }
}

fn props(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_outcome_is_sent_without_its_values_once() {
        let big = json!({"blob": "x".repeat(2_000_000)});
        let mut o: Outcome = serde_json::from_value(json!({
            "schema_version": 1, "id": "i", "event_id": "e", "member_id": "mem_1", "user_id": null,
            "source": "supabase", "event_type": "u", "status": "applied", "fields": [],
            "conflicts": [], "created": false, "deleted": false,
            "origin": {"topic": "t", "partition": 0, "offset": 1},
            "occurred_at": "2026-01-01T00:00:00.000Z", "processed_at": "2026-01-01T00:00:00.000Z",
            "attempts": 1
        }))
        .unwrap();
        o.record_field("project_data", Verdict::Applied, &big, true, true);
        o.conflicts.push(ConflictOutcome {
            field: "project_data".into(),
            winner: Side::Supabase,
            winning: big.clone(),
            losing: big,
        });
        let shrunk = Outcome::shrink(&serde_json::to_vec(&o).unwrap()).unwrap();
        assert!(shrunk.len() < 2_000);
        let back: Value = serde_json::from_slice(&shrunk).unwrap();
        assert_eq!(back["truncated"], true);
        assert_eq!(back["fields"][0]["value"], Value::Null);
        assert_eq!(back["fields"][0]["field"], "project_data");
        assert_eq!(back["conflicts"][0]["winning"], Value::Null);
        assert_eq!(back["status"], "applied");
        assert_eq!(Outcome::shrink(&shrunk), None, "nothing more to cut");
        // Without `truncated` the record is unchanged in shape.
        let plain =
            serde_json::to_value(Outcome::new(&sample_change(), Status::Unchanged)).unwrap();
        assert!(plain.get("truncated").is_none());
    }

    fn sample_change() -> Change {
        Change {
            event_id: "e".into(),
            member_id: Some("mem_1".into()),
            side: Side::Supabase,
            source: "supabase",
            kind: super::super::change::ChangeKind::Cdc {
                op: "u".into(),
                own: false,
            },
            occurred_at: Utc::now(),
            payload: Value::Null,
            position: Position {
                topic: "t".into(),
                partition: 0,
                offset: 1,
            },
            replayed: false,
        }
    }
}
