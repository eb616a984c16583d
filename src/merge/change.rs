//! Decoding one Kafka record of a consumed topic into a [`Change`]: who it is about, when it
//! happened, and the mapped field values it carries. A record that cannot be decoded is
//! poison ([`DecodeError`]) and goes straight to the dead-letter topic.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

use crate::cdc::envelope::UNCHANGED_TOAST;
use crate::config::FieldMapping;
use crate::ingest::envelope::SNAPSHOT_KIND;
use crate::merge::MemberstackPath;
use crate::merge::resolve::Side;

/// Where a record was read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    /// A Memberstack webhook. `refetch`: the payload does not describe the member (unknown
    /// and team events): read the member from the Admin API instead. `snapshot`: a
    /// `member.snapshot` (backfill, resync): the payload is the whole member as the Admin API
    /// returned it, so a field it lacks is absent, not "not carried".
    Memberstack {
        event: String,
        deleted: bool,
        refetch: bool,
        snapshot: bool,
        /// A plan event (`member.plan.*`): it carries one plan connection, which says nothing
        /// about the member's other plans; merge re-reads the member's whole list.
        plan: bool,
    },
    /// A Stripe event. `customer_id`: the Stripe customer it names (merge maps an event
    /// without member metadata to the member through `members.stripe_customer_id`).
    Stripe {
        event: String,
        customer_id: Option<String>,
    },
    /// A row change of `public.members`. `own`: written by membersync (never pushed back).
    Cdc { op: String, own: bool },
}

/// One change to merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Exactly-once key (`webhook_log.event_id`): svix-id, Stripe event id, or
    /// `cdc:<lsn>:<order>`.
    pub event_id: String,
    pub member_id: Option<String>,
    pub side: Side,
    pub source: &'static str,
    pub kind: ChangeKind,
    pub occurred_at: DateTime<Utc>,
    /// The member object (Memberstack), or the row (CDC), as sent.
    pub payload: Value,
    pub position: Position,
    /// Re-fed by `membersync dlq replay` (header `membersync-replay-of`).
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the record has no value")]
    Empty,
    #[error("the value is not JSON: {0}")]
    NotJson(String),
    #[error("the value lacks {0}")]
    Missing(&'static str),
    #[error("{0} is not a topic merge consumes")]
    UnknownTopic(String),
}

/// Which kind of topic a consumed topic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Memberstack,
    Stripe,
    Cdc,
}

impl TopicKind {
    pub fn of(topic: &str, prefix: &str) -> Option<Self> {
        let rest = topic.strip_prefix(prefix)?.strip_prefix('.')?;
        match rest {
            "memberstack" => Some(Self::Memberstack),
            "stripe" => Some(Self::Stripe),
            r if r.starts_with("cdc.") => Some(Self::Cdc),
            _ => None,
        }
    }
}

pub fn decode(
    kind: TopicKind,
    position: Position,
    value: Option<&[u8]>,
) -> Result<Change, DecodeError> {
    let bytes = value.filter(|v| !v.is_empty()).ok_or(DecodeError::Empty)?;
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    match kind {
        TopicKind::Memberstack => memberstack(v, position),
        TopicKind::Stripe => stripe(v, position),
        TopicKind::Cdc => cdc(v, position),
    }
}

fn text<'a>(v: &'a Value, key: &'static str) -> Result<&'a str, DecodeError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or(DecodeError::Missing(key))
}

fn instant(v: &Value, key: &'static str) -> Result<DateTime<Utc>, DecodeError> {
    text(v, key)?
        .parse::<DateTime<Utc>>()
        .map_err(|_| DecodeError::Missing(key))
}

fn memberstack(v: Value, position: Position) -> Result<Change, DecodeError> {
    let event = text(&v, "type")?.to_owned();
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("unknown");
    let data = v.get("data").ok_or(DecodeError::Missing("data"))?;
    let payload = data
        .get("payload")
        .or_else(|| data.get("data"))
        .cloned()
        .unwrap_or(Value::Null);
    let member_id = v
        .get("member_id")
        .and_then(Value::as_str)
        .or_else(|| payload.get("id").and_then(Value::as_str))
        .map(str::to_owned);
    let known = matches!(
        kind,
        "member_created"
            | "member_updated"
            | "member_deleted"
            | "plan_added"
            | "plan_updated"
            | "plan_canceled"
            | SNAPSHOT_KIND
    );
    Ok(Change {
        event_id: text(&v, "id")?.to_owned(),
        member_id,
        side: Side::Memberstack,
        source: "memberstack",
        kind: ChangeKind::Memberstack {
            event,
            deleted: kind == "member_deleted",
            refetch: !known,
            snapshot: kind == SNAPSHOT_KIND,
            plan: matches!(kind, "plan_added" | "plan_updated" | "plan_canceled"),
        },
        occurred_at: instant(&v, "occurred_at")?,
        payload,
        position,
        replayed: false,
    })
}

fn stripe(v: Value, position: Position) -> Result<Change, DecodeError> {
    let event = text(&v, "type")?.to_owned();
    let object = v
        .get("data")
        .and_then(|d| d.get("data"))
        .and_then(|d| d.get("object"))
        .cloned()
        .unwrap_or(Value::Null);
    // A subscription event's object is the subscription; `deleted` means it ended.
    let status = if event == "customer.subscription.deleted" {
        Some(Value::String("canceled".into()))
    } else if event.starts_with("customer.subscription.") {
        object.get("status").cloned()
    } else {
        None
    };
    let needs_lookup = v
        .get("needs_lookup")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut payload = Map::new();
    if let Some(status) = status {
        // Shaped like a Memberstack plan event so the mapping's plan status path reads it.
        payload.insert(
            "planConnection".into(),
            serde_json::json!({ "status": status }),
        );
    }
    Ok(Change {
        event_id: text(&v, "id")?.to_owned(),
        member_id: if needs_lookup {
            None
        } else {
            v.get("member_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        },
        side: Side::Memberstack,
        source: "stripe",
        kind: ChangeKind::Stripe {
            event,
            customer_id: v
                .get("customer_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        },
        occurred_at: instant(&v, "occurred_at")?,
        payload: Value::Object(payload),
        position,
        replayed: false,
    })
}

fn cdc(v: Value, position: Position) -> Result<Change, DecodeError> {
    let op = text(&v, "op")?.to_owned();
    let source = v.get("source").ok_or(DecodeError::Missing("source"))?;
    let lsn = source
        .get("lsn")
        .and_then(Value::as_u64)
        .ok_or(DecodeError::Missing("source.lsn"))?;
    let order = v
        .get("transaction")
        .and_then(|t| t.get("total_order"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let own = source.get("origin").and_then(Value::as_str) == Some(crate::cdc::ORIGIN_NAME);
    // Without the columns the event says are unchanged TOAST (their value is a placeholder,
    // not the row's): such a change does not carry them.
    let row = crate::cdc::envelope::available_columns(&v);
    let member_id = row
        .get("memberstack_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let commit_ms = source
        .get("ts_ms")
        .and_then(Value::as_i64)
        .ok_or(DecodeError::Missing("source.ts_ms"))?;
    // A snapshot row's commit time is the snapshot's; the row's own updated_at says when it
    // was last edited.
    let occurred_at = if op == "r" {
        row.get("updated_at")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<DateTime<Utc>>().ok())
    } else {
        None
    }
    .or_else(|| Utc.timestamp_millis_opt(commit_ms).single())
    .ok_or(DecodeError::Missing("source.ts_ms"))?;
    let event_id = if op == "r" {
        // Snapshot rows share the consistent point's LSN: the key tells them apart.
        format!("cdc:{lsn}:r:{}", member_id.as_deref().unwrap_or(""))
    } else {
        format!("cdc:{lsn}:{order}")
    };
    Ok(Change {
        event_id,
        member_id,
        side: Side::Supabase,
        source: "supabase",
        kind: ChangeKind::Cdc { op, own },
        occurred_at,
        payload: row,
        position,
        replayed: false,
    })
}

/// A mapped field's value in a whole member (a snapshot): a missing key is an absent value,
/// spelled the way the `members` column spells "nothing" (`{}` for the NOT NULL object
/// columns, else null), so that "absent on both sides" compares equal.
pub fn snapshot_field_value(member: &Value, field: &FieldMapping) -> Value {
    let value = MemberstackPath::parse(&field.memberstack)
        .ok()
        .and_then(|p| p.get(member))
        .unwrap_or(Value::Null);
    if value.is_null() && crate::merge::store::is_object_column(&field.supabase) {
        Value::Object(Map::new())
    } else {
        value
    }
}

impl Change {
    /// The mapped field's value in this change, or `None` when the change does not carry it.
    pub fn field_value(&self, field: &FieldMapping) -> Option<Value> {
        match &self.kind {
            ChangeKind::Cdc { .. } => {
                let v = self.payload.get(&field.supabase)?;
                (v.as_str() != Some(UNCHANGED_TOAST)).then(|| v.clone())
            }
            ChangeKind::Stripe { .. } => {
                // Stripe reports a subscription's status; with the member's plan connections
                // re-read from Memberstack (a subscription that ended), its plan too.
                let path = MemberstackPath::parse(&field.memberstack).ok()?;
                let carried = path == MemberstackPath::PlanStatus
                    || (path == MemberstackPath::PlanId
                        && self.payload.get("planConnections").is_some());
                carried.then(|| path.get(&self.payload)).flatten()
            }
            ChangeKind::Memberstack { snapshot: true, .. } => {
                Some(snapshot_field_value(&self.payload, field))
            }
            ChangeKind::Memberstack { .. } => MemberstackPath::parse(&field.memberstack)
                .ok()?
                .get(&self.payload),
        }
    }

    /// A plan event of Memberstack (`member.plan.*`).
    pub fn is_plan_event(&self) -> bool {
        matches!(self.kind, ChangeKind::Memberstack { plan: true, .. })
    }

    /// A Stripe subscription that ended: whether the member still has a plan depends on its
    /// other plan connections.
    pub fn is_subscription_end(&self) -> bool {
        matches!(&self.kind, ChangeKind::Stripe { event, .. } if event == "customer.subscription.deleted")
    }

    /// A Stripe subscription event whose status takes access away (past due, unpaid, …) — a
    /// subscription that ended included. Whether the member loses access depends on its other
    /// subscriptions.
    pub fn is_subscription_loss(&self) -> bool {
        matches!(&self.kind, ChangeKind::Stripe { event, .. } if event.starts_with("customer.subscription."))
            && self
                .payload
                .get("planConnection")
                .and_then(|c| c.get("status"))
                .is_some_and(|s| crate::merge::normalize::plan_status(s) != "active")
    }

    /// The member's plan connections, re-read from Memberstack, stand for the change's own
    /// plan data (one connection, or a Stripe status): the plan fields are chosen from the
    /// whole list. Nothing else of the member is taken from the re-read: its other fields are
    /// dated by their own webhooks.
    pub fn with_plan_connections(&mut self, member: &Value) {
        let list = member
            .get("planConnections")
            .cloned()
            .filter(Value::is_array)
            .unwrap_or_else(|| Value::Array(Vec::new()));
        let mut payload = Map::new();
        if let Some(id) = self.payload.get("id") {
            payload.insert("id".into(), id.clone());
        }
        payload.insert("planConnections".into(), list);
        if let Some(customer) = member.get("stripeCustomerId").filter(|c| c.is_string()) {
            payload.insert("stripeCustomerId".into(), customer.clone());
        }
        self.payload = Value::Object(payload);
    }

    /// The member's Stripe customer, when this Memberstack change shows it (the member
    /// object's `stripeCustomerId`).
    pub fn stripe_customer_id(&self) -> Option<&str> {
        match self.kind {
            ChangeKind::Memberstack { .. } => self
                .payload
                .get("stripeCustomerId")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty()),
            _ => None,
        }
    }

    /// A `member.snapshot`: the whole member, read from the Admin API.
    pub fn is_snapshot(&self) -> bool {
        matches!(self.kind, ChangeKind::Memberstack { snapshot: true, .. })
    }

    pub fn is_deleted(&self) -> bool {
        match &self.kind {
            ChangeKind::Memberstack { deleted, .. } => *deleted,
            ChangeKind::Cdc { op, .. } => op == "d",
            ChangeKind::Stripe { .. } => false,
        }
    }

    pub fn event_type(&self) -> &str {
        match &self.kind {
            ChangeKind::Memberstack { event, .. } | ChangeKind::Stripe { event, .. } => event,
            ChangeKind::Cdc { op, .. } => op,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pos() -> Position {
        Position {
            topic: "t".into(),
            partition: 0,
            offset: 7,
        }
    }

    #[test]
    fn memberstack_envelope_decodes() {
        let v = json!({
            "schema_version": 1, "id": "msg_1", "source": "memberstack", "type": "member.updated",
            "kind": "member_updated", "member_id": "mem_1", "needs_lookup": false,
            "occurred_at": "2026-01-01T00:00:00.123Z", "signed_at": "2026-01-01T00:00:01Z",
            "received_at": "2026-01-01T00:00:01Z",
            "data": {"event": "member.updated", "timestamp": 1, "payload": {"id": "mem_1", "auth": {"email": "A@x.io"}, "customFields": {"n": 1}}}
        });
        let c = decode(
            TopicKind::Memberstack,
            pos(),
            Some(v.to_string().as_bytes()),
        )
        .unwrap();
        assert_eq!(c.event_id, "msg_1");
        assert_eq!(c.member_id.as_deref(), Some("mem_1"));
        let email = &crate::config::default_fields()[0];
        assert_eq!(c.field_value(email), Some(json!("A@x.io")));
        let project = crate::config::default_fields()
            .into_iter()
            .find(|f| f.name == "project_data")
            .unwrap();
        assert_eq!(
            c.field_value(&project),
            None,
            "metaData is not in this payload"
        );
    }

    #[test]
    fn a_member_snapshot_is_the_whole_member_and_needs_no_refetch() {
        let member = json!({"id": "mem_5", "auth": {"email": "s@x.io"}, "metaData": {}, "planConnections": []});
        let rec =
            crate::ingest::envelope::member_snapshot("backfill_1", &member, "mem_5", Utc::now());
        let c = decode(TopicKind::Memberstack, pos(), Some(&rec.value)).unwrap();
        assert!(c.is_snapshot());
        assert!(matches!(
            c.kind,
            ChangeKind::Memberstack { refetch: false, .. }
        ));
        let fields = crate::config::default_fields();
        let by = |n: &str| fields.iter().find(|f| f.name == n).unwrap();
        // A key the member lacks is absent, spelled like the column spells nothing.
        assert_eq!(c.field_value(by("project_data")), Some(json!({})));
        assert_eq!(c.field_value(by("custom_fields")), Some(json!({})));
        assert_eq!(c.field_value(by("plan_id")), Some(Value::Null));
        assert_eq!(c.field_value(by("email")), Some(json!("s@x.io")));
    }

    #[test]
    fn own_cdc_events_are_marked_and_toast_is_absent() {
        let v = json!({
            "op": "u", "before": null,
            "after": {"memberstack_id": "mem_1", "email": "a@x", "project_data": "__unchanged_toast"},
            "source": {"lsn": 42, "ts_ms": 1_700_000_000_000i64, "origin": "membersync"},
            "transaction": {"id": "1:42", "total_order": 3, "data_collection_order": 1}
        });
        let c = decode(TopicKind::Cdc, pos(), Some(v.to_string().as_bytes())).unwrap();
        assert_eq!(c.event_id, "cdc:42:3");
        assert_eq!(
            c.kind,
            ChangeKind::Cdc {
                op: "u".into(),
                own: true
            }
        );
        let fields = crate::config::default_fields();
        let project = fields.iter().find(|f| f.name == "project_data").unwrap();
        assert_eq!(c.field_value(project), None);
    }

    #[test]
    fn poison_is_precise() {
        assert_eq!(decode(TopicKind::Cdc, pos(), None), Err(DecodeError::Empty));
        assert!(matches!(
            decode(TopicKind::Cdc, pos(), Some(b"{nope")),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(
            decode(TopicKind::Stripe, pos(), Some(b"{}")),
            Err(DecodeError::Missing("type"))
        );
    }

    #[test]
    fn stripe_subscription_status_reads_as_plan_status() {
        let v = json!({
            "id": "evt_1", "type": "customer.subscription.updated", "member_id": "mem_9",
            "needs_lookup": false, "occurred_at": "2026-01-01T00:00:00Z",
            "data": {"data": {"object": {"status": "past_due"}}}
        });
        let c = decode(TopicKind::Stripe, pos(), Some(v.to_string().as_bytes())).unwrap();
        let status = crate::config::default_fields()
            .into_iter()
            .find(|f| f.name == "subscription_status")
            .unwrap();
        assert_eq!(c.field_value(&status), Some(json!("past_due")));
        let plan = crate::config::default_fields()
            .into_iter()
            .find(|f| f.name == "plan_id")
            .unwrap();
        assert_eq!(c.field_value(&plan), None);
    }
}
