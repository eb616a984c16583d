//! Typed views of the webhook bodies `ingest` accepts, after their signature was verified.
//!
//! Both parsers take the raw body bytes, keep the original JSON value (`raw`) for the Kafka
//! record, and pull out the few fields routing needs, with errors precise enough for a 400
//! response body and a metrics label ([`ParseError::reason`]). Parse errors never contain
//! body text: only a position and fixed wording.
//!
//! Memberstack (docs/external-services.md §1.3, §1.4): the docs disagree, so every documented
//! shape is accepted:
//! - envelope `{event, timestamp, payload}` or `{event, timestamp, data}`; `type` is accepted
//!   as an alias of `event` (some handlers send or expect it); `event` wins if both exist,
//!   as does `payload` over `data`;
//! - `timestamp` is Unix **milliseconds**, normally a JSON integer; a float or a digit string
//!   is tolerated, and a missing/null one is `None` (the signed `svix-timestamp` is the
//!   authoritative time);
//! - the member id is `payload.id` (`"mem_…"`), or `payload.memberId` for team events; it
//!   is the Kafka key, so it is the only payload field whose absence or type is an error;
//!   other typed fields (`auth.email`, `ownerId`, …) of an unexpected type are `None`;
//! - shapes that vary between docs (`customFields`, `metaData`, `planConnections`,
//!   `planConnection`) are kept as raw [`serde_json::Value`];
//! - unknown event names are accepted as [`MemberstackEventKind::Unknown`] ("re-fetch the
//!   member", docs/external-services.md §1.3).
//!
//! Stripe (docs/external-services.md §4): `{id: "evt_…", type, created, data: {object}}`, plus
//! helpers for `customer.subscription.*` events and for choosing the Kafka key.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest member id / event name / Stripe id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Metadata key on Stripe objects that carries the Memberstack member id.
pub const MEMBERSTACK_ID_METADATA_KEY: &str = "memberstack_user_id";

/// Why a body could not be parsed. Maps to HTTP 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON at all (or truncated). Only the position and category from serde_json are
    /// kept, never the message (which could quote the body).
    #[error("body is not valid JSON ({category} error at line {line}, column {column})")]
    NotJson {
        line: usize,
        column: usize,
        /// `"syntax"`, `"eof"`, `"data"` or `"io"`.
        category: &'static str,
    },
    /// Valid JSON, but the top level is not an object.
    #[error("body is not a JSON object")]
    NotAnObject,
    /// A required field is absent or null. The payload is the field's path.
    #[error("{0} is missing")]
    MissingField(&'static str),
    /// A field is present with an unusable value.
    #[error("{field} has the wrong type: expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
}

impl ParseError {
    /// A stable snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::NotJson { .. } => "not_json",
            ParseError::NotAnObject => "not_an_object",
            ParseError::MissingField(_) => "missing_field",
            ParseError::WrongType { .. } => "wrong_type",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Memberstack
// ---------------------------------------------------------------------------------------

/// What a Memberstack event means for the sync, whatever name the sender used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberstackEventKind {
    MemberCreated,
    MemberUpdated,
    MemberDeleted,
    PlanAdded,
    PlanUpdated,
    PlanCanceled,
    TeamMemberAdded,
    TeamMemberRemoved,
    /// A name not in the table (including the unconfirmed `member.plan.replaced`): treat as
    /// "re-fetch the member".
    Unknown,
}

impl MemberstackEventKind {
    /// Classifies an event name (ASCII case-insensitive). The table follows
    /// docs/external-services.md §1.3: the confirmed names, the Pipedream/handler names
    /// (`member.plan.*`), the older docs' `member.plan.created` and
    /// `member.planConnection.*`, British `cancelled` spellings, and the team events.
    pub fn from_event_name(name: &str) -> Self {
        const TABLE: &[(&str, MemberstackEventKind)] = &[
            ("member.created", MemberstackEventKind::MemberCreated),
            ("member.updated", MemberstackEventKind::MemberUpdated),
            ("member.deleted", MemberstackEventKind::MemberDeleted),
            ("member.plan.added", MemberstackEventKind::PlanAdded),
            ("member.plan.created", MemberstackEventKind::PlanAdded),
            (
                "member.planconnection.created",
                MemberstackEventKind::PlanAdded,
            ),
            (
                "member.planconnection.added",
                MemberstackEventKind::PlanAdded,
            ),
            ("member.plan.updated", MemberstackEventKind::PlanUpdated),
            (
                "member.planconnection.updated",
                MemberstackEventKind::PlanUpdated,
            ),
            ("member.plan.canceled", MemberstackEventKind::PlanCanceled),
            ("member.plan.cancelled", MemberstackEventKind::PlanCanceled),
            (
                "member.planconnection.canceled",
                MemberstackEventKind::PlanCanceled,
            ),
            (
                "member.planconnection.cancelled",
                MemberstackEventKind::PlanCanceled,
            ),
            ("team.member.added", MemberstackEventKind::TeamMemberAdded),
            (
                "team.member.removed",
                MemberstackEventKind::TeamMemberRemoved,
            ),
        ];
        TABLE
            .iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
            .map_or(MemberstackEventKind::Unknown, |(_, kind)| *kind)
    }

    /// A stable snake_case label (metrics, logs).
    pub fn as_str(&self) -> &'static str {
        match self {
            MemberstackEventKind::MemberCreated => "member_created",
            MemberstackEventKind::MemberUpdated => "member_updated",
            MemberstackEventKind::MemberDeleted => "member_deleted",
            MemberstackEventKind::PlanAdded => "plan_added",
            MemberstackEventKind::PlanUpdated => "plan_updated",
            MemberstackEventKind::PlanCanceled => "plan_canceled",
            MemberstackEventKind::TeamMemberAdded => "team_member_added",
            MemberstackEventKind::TeamMemberRemoved => "team_member_removed",
            MemberstackEventKind::Unknown => "unknown",
        }
    }

    /// Team events name the member in `memberId` rather than `id`.
    pub fn is_team_event(&self) -> bool {
        matches!(
            self,
            MemberstackEventKind::TeamMemberAdded | MemberstackEventKind::TeamMemberRemoved
        )
    }
}

/// Which envelope key carried the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadKey {
    /// `payload` (developers.memberstack.com, Admin and DOM docs).
    Payload,
    /// `data` (Help Center variant).
    Data,
}

impl PayloadKey {
    fn pick(self, payload_path: &'static str, data_path: &'static str) -> &'static str {
        match self {
            PayloadKey::Payload => payload_path,
            PayloadKey::Data => data_path,
        }
    }
}

/// The member-related fields of a Memberstack payload. Everything is optional except what
/// [`MemberstackEvent::member_id`] needs; shapes that vary stay raw JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberstackPayload {
    /// `payload.id` (`"mem_…"` for member and plan events).
    pub id: Option<String>,
    /// `payload.memberId` (team events).
    pub member_id: Option<String>,
    /// `payload.ownerId` (team events).
    pub owner_id: Option<String>,
    /// `payload.teamId` (team events).
    pub team_id: Option<String>,
    /// `payload.auth.email`.
    pub email: Option<String>,
    /// `payload.customFields`, as sent.
    pub custom_fields: Option<Value>,
    /// `payload.metaData` (also accepted: `metadata`), as sent.
    pub meta_data: Option<Value>,
    /// `payload.planConnections` (member objects), as sent.
    pub plan_connections: Option<Value>,
    /// `payload.planConnection` (plan events), as sent.
    pub plan_connection: Option<Value>,
    /// `payload.stripeCustomerId`, when the member object carries it.
    pub stripe_customer_id: Option<String>,
}

/// A parsed Memberstack webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberstackEvent {
    /// The event name exactly as sent (`event`, or `type`).
    pub event: String,
    /// Its classification.
    pub kind: MemberstackEventKind,
    /// The member the event is about: the Kafka key.
    pub member_id: String,
    /// Envelope `timestamp`, Unix milliseconds, if sent.
    pub timestamp_ms: Option<i64>,
    /// Which envelope key held the payload.
    pub payload_key: PayloadKey,
    /// The typed payload fields.
    pub payload: MemberstackPayload,
    /// The whole body as parsed.
    pub raw: Value,
}

/// Parses a (verified) Memberstack webhook body.
pub fn parse_memberstack(body: &[u8]) -> Result<MemberstackEvent, ParseError> {
    let raw = parse_object(body)?;
    let root = raw.as_object().ok_or(ParseError::NotAnObject)?;

    let event = match (present(root, "event"), present(root, "type")) {
        (Some(v), _) => bounded_str(v, "event")?,
        (None, Some(v)) => bounded_str(v, "type")?,
        (None, None) => return Err(ParseError::MissingField("event")),
    }
    .to_owned();
    let kind = MemberstackEventKind::from_event_name(&event);

    let (payload_key, payload_value) = match (present(root, "payload"), present(root, "data")) {
        (Some(v), _) => (PayloadKey::Payload, v),
        (None, Some(v)) => (PayloadKey::Data, v),
        (None, None) => return Err(ParseError::MissingField("payload")),
    };
    let obj = payload_value.as_object().ok_or(ParseError::WrongType {
        field: payload_key.pick("payload", "data"),
        expected: "object",
    })?;

    let timestamp_ms = match present(root, "timestamp") {
        None => None,
        Some(v) => Some(timestamp_millis(v).ok_or(ParseError::WrongType {
            field: "timestamp",
            expected: "number (Unix milliseconds)",
        })?),
    };

    let p = |payload_path, data_path| payload_key.pick(payload_path, data_path);

    // The member id is the one field that must be right: it is the Kafka key. Team events
    // name the member `memberId` (their `id`, if any, may be something else); everything
    // else uses `id`, with `memberId` as a fallback when `id` is absent.
    let (preferred, preferred_path, fallback, fallback_path) = if kind.is_team_event() {
        (
            "memberId",
            p("payload.memberId", "data.memberId"),
            "id",
            p("payload.id", "data.id"),
        )
    } else {
        (
            "id",
            p("payload.id", "data.id"),
            "memberId",
            p("payload.memberId", "data.memberId"),
        )
    };
    let (member_id, member_id_path) = match (present(obj, preferred), present(obj, fallback)) {
        (Some(v), _) => (v, preferred_path),
        (None, Some(v)) => (v, fallback_path),
        (None, None) => return Err(ParseError::MissingField(preferred_path)),
    };
    let member_id = member_id.as_str().ok_or(ParseError::WrongType {
        field: member_id_path,
        expected: "string",
    })?;
    if !is_valid_key(member_id) {
        return Err(ParseError::WrongType {
            field: member_id_path,
            expected: "non-empty id without whitespace, at most 256 bytes",
        });
    }
    let member_id = member_id.to_owned();

    // Everything else is informational (the raw JSON is kept, and `merge` re-reads the
    // member): a field of an unexpected type is `None` rather than a rejected delivery.
    let payload = MemberstackPayload {
        id: str_field(obj, "id"),
        member_id: str_field(obj, "memberId"),
        owner_id: str_field(obj, "ownerId"),
        team_id: str_field(obj, "teamId"),
        email: obj
            .get("auth")
            .and_then(Value::as_object)
            .and_then(|auth| str_field(auth, "email")),
        custom_fields: present(obj, "customFields").cloned(),
        meta_data: present(obj, "metaData")
            .or_else(|| present(obj, "metadata"))
            .cloned(),
        plan_connections: present(obj, "planConnections").cloned(),
        plan_connection: present(obj, "planConnection").cloned(),
        stripe_customer_id: str_field(obj, "stripeCustomerId"),
    };

    Ok(MemberstackEvent {
        event,
        kind,
        member_id,
        timestamp_ms,
        payload_key,
        payload,
        raw,
    })
}

// ---------------------------------------------------------------------------------------
// Stripe
// ---------------------------------------------------------------------------------------

/// A parsed Stripe (v1 "snapshot") event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StripeEvent {
    /// `id`, `"evt_…"`: the idempotency key.
    pub id: String,
    /// `type`, e.g. `customer.subscription.updated`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// `created`, Unix seconds, if sent.
    pub created: Option<i64>,
    /// `livemode`, if sent.
    pub livemode: Option<bool>,
    /// `api_version`, if sent.
    pub api_version: Option<String>,
    /// `data.object`: the object the event is about.
    pub object: Value,
    /// `data.previous_attributes`, on `*.updated` events.
    pub previous_attributes: Option<Value>,
    /// The whole body as parsed.
    pub raw: Value,
}

/// The sync-relevant fields of a subscription (`customer.subscription.*` events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeSubscription {
    /// `data.object.id` (`"sub_…"`).
    pub id: Option<String>,
    /// `data.object.metadata.memberstack_user_id`.
    pub memberstack_id: Option<String>,
    /// `data.object.customer` (`"cus_…"`; an expanded customer object gives its `id`).
    pub customer: Option<String>,
    /// `data.object.status` (`active`, `trialing`, `past_due`, `canceled`, …).
    pub status: Option<String>,
    /// `data.object.items.data[0].price.id`.
    pub price_id: Option<String>,
}

/// The Kafka key for a Stripe event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingKey {
    /// The Memberstack member id, or else the Stripe customer id.
    pub key: String,
    /// `true` when `key` is a Stripe customer id that `merge` must map to a member.
    pub needs_lookup: bool,
}

impl StripeEvent {
    /// Whether this is a `customer.subscription.*` event.
    pub fn is_subscription_event(&self) -> bool {
        self.event_type.starts_with("customer.subscription.")
    }

    /// The subscription fields, for `customer.subscription.*` events (else `None`).
    /// Tolerant: a field that is absent or of an unexpected type is `None`.
    pub fn subscription(&self) -> Option<StripeSubscription> {
        if !self.is_subscription_event() {
            return None;
        }
        let object = self.object.as_object()?;
        let price_id = object
            .get("items")
            .and_then(|items| items.get("data"))
            .and_then(|data| data.get(0))
            .and_then(|item| item.get("price"))
            .and_then(id_or_expanded);
        Some(StripeSubscription {
            id: str_field(object, "id"),
            memberstack_id: self.memberstack_id(),
            customer: object.get("customer").and_then(id_or_expanded),
            status: str_field(object, "status"),
            price_id,
        })
    }

    /// `data.object.metadata.memberstack_user_id`, when it is a usable id.
    pub fn memberstack_id(&self) -> Option<String> {
        self.object
            .get("metadata")
            .and_then(|m| m.get(MEMBERSTACK_ID_METADATA_KEY))
            .and_then(Value::as_str)
            .filter(|id| is_valid_key(id))
            .map(str::to_owned)
    }

    /// The Stripe customer this event is about: `data.object.customer` (string or expanded
    /// object), or `data.object.id` when the object is itself a customer (`customer.*`).
    pub fn customer_id(&self) -> Option<String> {
        if let Some(customer) = self.object.get("customer").and_then(id_or_expanded) {
            return Some(customer);
        }
        if self.object.get("object").and_then(Value::as_str) == Some("customer") {
            return self.object.get("id").and_then(id_or_expanded);
        }
        None
    }

    /// The Kafka key: the Memberstack id from the object's metadata when present, else the
    /// Stripe customer id with `needs_lookup: true`; `None` if the event names neither.
    pub fn routing_key(&self) -> Option<RoutingKey> {
        if let Some(key) = self.memberstack_id() {
            return Some(RoutingKey {
                key,
                needs_lookup: false,
            });
        }
        self.customer_id().map(|key| RoutingKey {
            key,
            needs_lookup: true,
        })
    }
}

/// Parses a (verified) Stripe webhook body.
pub fn parse_stripe(body: &[u8]) -> Result<StripeEvent, ParseError> {
    let raw = parse_object(body)?;
    let root = raw.as_object().ok_or(ParseError::NotAnObject)?;

    let id = present(root, "id").ok_or(ParseError::MissingField("id"))?;
    let id = id.as_str().ok_or(ParseError::WrongType {
        field: "id",
        expected: "string",
    })?;
    if id.len() <= "evt_".len() || !id.starts_with("evt_") || !is_valid_key(id) {
        return Err(ParseError::WrongType {
            field: "id",
            expected: "event id starting with evt_",
        });
    }

    let event_type = bounded_str(
        present(root, "type").ok_or(ParseError::MissingField("type"))?,
        "type",
    )?;

    let created = match present(root, "created") {
        None => None,
        Some(v) => Some(v.as_i64().ok_or(ParseError::WrongType {
            field: "created",
            expected: "integer (Unix seconds)",
        })?),
    };

    let data = present(root, "data").ok_or(ParseError::MissingField("data"))?;
    let data = data.as_object().ok_or(ParseError::WrongType {
        field: "data",
        expected: "object",
    })?;
    let object = present(data, "object").ok_or(ParseError::MissingField("data.object"))?;
    if !object.is_object() {
        return Err(ParseError::WrongType {
            field: "data.object",
            expected: "object",
        });
    }

    let id = id.to_owned();
    let event_type = event_type.to_owned();
    let livemode = root.get("livemode").and_then(Value::as_bool);
    let api_version = str_field(root, "api_version");
    let object = object.clone();
    let previous_attributes = present(data, "previous_attributes").cloned();
    Ok(StripeEvent {
        id,
        event_type,
        created,
        livemode,
        api_version,
        object,
        previous_attributes,
        raw,
    })
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn parse_object(body: &[u8]) -> Result<Value, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::NotJson {
        line: e.line(),
        column: e.column(),
        category: match e.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "eof",
        },
    })?;
    if !value.is_object() {
        return Err(ParseError::NotAnObject);
    }
    Ok(value)
}

/// A field that is present and not `null`.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A non-empty string of at most [`MAX_ID_LEN`] bytes.
fn bounded_str<'a>(value: &'a Value, field: &'static str) -> Result<&'a str, ParseError> {
    match value.as_str() {
        Some(s) if !s.is_empty() && s.len() <= MAX_ID_LEN => Ok(s),
        Some(_) => Err(ParseError::WrongType {
            field,
            expected: "non-empty string of at most 256 bytes",
        }),
        None => Err(ParseError::WrongType {
            field,
            expected: "string",
        }),
    }
}

/// A string field, tolerant: anything else is `None`.
fn str_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// A Stripe reference: either the id string, or an expanded object with an `id`.
fn id_or_expanded(value: &Value) -> Option<String> {
    let id = match value {
        Value::String(s) => s.as_str(),
        Value::Object(o) => o.get("id")?.as_str()?,
        _ => return None,
    };
    is_valid_key(id).then(|| id.to_owned())
}

/// Usable as a Kafka key: non-empty, at most [`MAX_ID_LEN`] bytes, no whitespace or
/// control characters.
fn is_valid_key(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Unix milliseconds from an integer, a float (truncated) or a string of digits.
fn timestamp_millis(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            let f = n.as_f64()?;
            // `as` saturates; the range check keeps that from passing off garbage.
            (f.is_finite() && f >= i64::MIN as f64 && f < i64::MAX as f64).then_some(f as i64)
        }),
        Value::String(s)
            if !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
