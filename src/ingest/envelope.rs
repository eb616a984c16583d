//! What ingest writes to Kafka for one verified delivery: the key (the Memberstack member
//! id), a JSON value that wraps the sender's payload with its provenance, and headers with
//! the event id, type, source and CloudEvents attributes. Schemas: `schemas/kafka/`.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

use super::event::{MemberstackEvent, MemberstackEventKind, StripeEvent};

/// Bumped when the value's shape changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Memberstack,
    Stripe,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memberstack => "memberstack",
            Self::Stripe => "stripe",
        }
    }
}

/// The Kafka value.
#[derive(Debug, Clone, Serialize)]
pub struct IngestEnvelope<'a> {
    pub schema_version: u32,
    /// The sender's idempotency key: `svix-id` (Memberstack) or the Stripe event id.
    pub id: &'a str,
    pub source: Source,
    /// The event name exactly as sent.
    #[serde(rename = "type")]
    pub event_type: &'a str,
    /// Memberstack: the classification (`member_created`, …, `unknown`); Stripe: absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// The Memberstack member id, when known.
    pub member_id: Option<&'a str>,
    /// Stripe: the customer id, when the event names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<&'a str>,
    /// The key is a Stripe customer id that merge must map to a member.
    pub needs_lookup: bool,
    /// When the event happened, by the sender's clock (falls back to `signed_at`).
    pub occurred_at: String,
    /// The signature timestamp.
    pub signed_at: String,
    pub received_at: String,
    /// The sender's JSON body, whole.
    pub data: &'a Value,
}

/// A record ready to produce.
#[derive(Debug, Clone)]
pub struct IngestRecord {
    pub event_id: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    pub unknown_event: bool,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn from_secs(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

/// Memberstack sends `timestamp` in ms (docs/external-services.md §1.4); tolerate seconds.
fn from_sender_timestamp(ts: i64) -> Option<DateTime<Utc>> {
    let ms = if ts.abs() < 100_000_000_000 {
        ts.checked_mul(1000)?
    } else {
        ts
    };
    Utc.timestamp_millis_opt(ms).single()
}

fn headers(
    id: &str,
    source: Source,
    event_type: &str,
    occurred_at: &str,
    extra: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("membersync_event_id", id.to_owned()),
        ("membersync_event_type", event_type.to_owned()),
        ("membersync_source", source.as_str().to_owned()),
        ("content-type", "application/json".to_owned()),
        ("ce_specversion", "1.0".to_owned()),
        ("ce_id", id.to_owned()),
        ("ce_type", format!("{}.{event_type}", source.as_str())),
        (
            "ce_source",
            format!("/membersync/ingest/{}", source.as_str()),
        ),
        ("ce_time", occurred_at.to_owned()),
    ];
    h.extend(extra);
    h
}

pub fn memberstack(
    svix_id: &str,
    signed_at: i64,
    event: &MemberstackEvent,
    received_at: DateTime<Utc>,
) -> IngestRecord {
    let signed = from_secs(signed_at);
    let occurred = event
        .timestamp_ms
        .and_then(from_sender_timestamp)
        .unwrap_or(signed);
    let unknown = event.kind == MemberstackEventKind::Unknown;
    let envelope = IngestEnvelope {
        schema_version: SCHEMA_VERSION,
        id: svix_id,
        source: Source::Memberstack,
        event_type: &event.event,
        kind: Some(event.kind.as_str()),
        member_id: Some(&event.member_id),
        customer_id: None,
        needs_lookup: false,
        occurred_at: rfc3339(occurred),
        signed_at: rfc3339(signed),
        received_at: rfc3339(received_at),
        data: &event.raw,
    };
    let mut extra = vec![("membersync_member_id", event.member_id.clone())];
    if unknown {
        // Memberstack's docs disagree on names; merge treats these as "re-fetch the member".
        extra.push(("membersync_unknown_event", "true".to_owned()));
    }
    IngestRecord {
        event_id: svix_id.to_owned(),
        key: event.member_id.clone(),
        headers: headers(
            svix_id,
            Source::Memberstack,
            &event.event,
            &envelope.occurred_at,
            extra,
        ),
        value: serde_json::to_vec(&envelope).expect("envelope serialises"),
        unknown_event: unknown,
    }
}

/// Event name and kind of a member snapshot: the whole member as the Admin API returned it,
/// published by `POST /v1/members/me/resync` (and the backfill) for merge to re-merge.
pub const SNAPSHOT_EVENT: &str = "member.snapshot";
pub const SNAPSHOT_KIND: &str = "member_snapshot";

/// A member snapshot in the webhook envelope: `data` is shaped like a webhook body
/// (`{event, timestamp, payload}`), `payload` being the fetched member, so every reader of
/// `data.payload` finds the member where a webhook puts it. There is no signature:
/// `signed_at` is the fetch time, like `occurred_at` and `received_at`.
pub fn member_snapshot(
    event_id: &str,
    member: &Value,
    member_id: &str,
    fetched_at: DateTime<Utc>,
) -> IngestRecord {
    let at = rfc3339(fetched_at);
    let data = serde_json::json!({
        "event": SNAPSHOT_EVENT,
        "timestamp": fetched_at.timestamp_millis(),
        "payload": member,
    });
    let envelope = IngestEnvelope {
        schema_version: SCHEMA_VERSION,
        id: event_id,
        source: Source::Memberstack,
        event_type: SNAPSHOT_EVENT,
        kind: Some(SNAPSHOT_KIND),
        member_id: Some(member_id),
        customer_id: None,
        needs_lookup: false,
        occurred_at: at.clone(),
        signed_at: at.clone(),
        received_at: at.clone(),
        data: &data,
    };
    let headers = headers(
        event_id,
        Source::Memberstack,
        SNAPSHOT_EVENT,
        &at,
        vec![("membersync_member_id", member_id.to_owned())],
    );
    IngestRecord {
        event_id: event_id.to_owned(),
        key: member_id.to_owned(),
        headers,
        value: serde_json::to_vec(&envelope).expect("envelope serialises"),
        unknown_event: false,
    }
}

/// `None` when the event names neither a member nor a customer: nothing to sync.
pub fn stripe(
    signed_at: i64,
    event: &StripeEvent,
    received_at: DateTime<Utc>,
) -> Option<IngestRecord> {
    let routing = event.routing_key()?;
    let signed = from_secs(signed_at);
    let occurred = event.created.map(from_secs).unwrap_or(signed);
    let member_id = (!routing.needs_lookup).then_some(routing.key.as_str());
    let customer_id = event.customer_id();
    let envelope = IngestEnvelope {
        schema_version: SCHEMA_VERSION,
        id: &event.id,
        source: Source::Stripe,
        event_type: &event.event_type,
        kind: None,
        member_id,
        customer_id: customer_id.as_deref(),
        needs_lookup: routing.needs_lookup,
        occurred_at: rfc3339(occurred),
        signed_at: rfc3339(signed),
        received_at: rfc3339(received_at),
        data: &event.raw,
    };
    let mut extra = Vec::new();
    if let Some(member) = member_id {
        extra.push(("membersync_member_id", member.to_owned()));
    }
    if routing.needs_lookup {
        extra.push(("membersync_needs_lookup", "true".to_owned()));
    }
    Some(IngestRecord {
        event_id: event.id.clone(),
        key: routing.key.clone(),
        headers: headers(
            &event.id,
            Source::Stripe,
            &event.event_type,
            &envelope.occurred_at,
            extra,
        ),
        value: serde_json::to_vec(&envelope).expect("envelope serialises"),
        unknown_event: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::{parse_memberstack, parse_stripe};

    #[test]
    fn memberstack_record_is_keyed_by_member_and_carries_cloudevents_headers() {
        let body = br#"{"event":"member.created","timestamp":1633486880169,"payload":{"id":"mem_1","auth":{"email":"a@b.c"}}}"#;
        let event = parse_memberstack(body).unwrap();
        let rec = memberstack("msg_1", 1_633_486_881, &event, Utc::now());
        assert_eq!(rec.key, "mem_1");
        assert_eq!(rec.event_id, "msg_1");
        let h: std::collections::HashMap<_, _> = rec.headers.iter().cloned().collect();
        assert_eq!(h["ce_id"], "msg_1");
        assert_eq!(h["ce_type"], "memberstack.member.created");
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_time"], "2021-10-06T02:21:20.169Z");
        let v: Value = serde_json::from_slice(&rec.value).unwrap();
        assert_eq!(v["kind"], "member_created");
        assert_eq!(v["data"]["payload"]["auth"]["email"], "a@b.c");
        assert!(!rec.unknown_event);
    }

    #[test]
    fn unknown_memberstack_events_are_flagged() {
        let body = br#"{"event":"member.plan.replaced","payload":{"id":"mem_2"}}"#;
        let rec = memberstack(
            "msg_2",
            1_700_000_000,
            &parse_memberstack(body).unwrap(),
            Utc::now(),
        );
        assert!(rec.unknown_event);
        assert!(
            rec.headers
                .contains(&("membersync_unknown_event", "true".to_owned()))
        );
    }

    #[test]
    fn stripe_without_member_metadata_is_keyed_by_customer_and_flagged() {
        let body = br#"{"id":"evt_1","type":"customer.subscription.updated","created":1700000000,"data":{"object":{"id":"sub_1","object":"subscription","customer":"cus_9","status":"active","metadata":{}}}}"#;
        let rec = stripe(1_700_000_001, &parse_stripe(body).unwrap(), Utc::now()).unwrap();
        assert_eq!(rec.key, "cus_9");
        assert!(
            rec.headers
                .contains(&("membersync_needs_lookup", "true".to_owned()))
        );
        let v: Value = serde_json::from_slice(&rec.value).unwrap();
        assert_eq!(v["needs_lookup"], true);
        assert_eq!(v["member_id"], Value::Null);
    }

    #[test]
    fn member_snapshot_wraps_the_member_like_a_webhook_body() {
        let member = serde_json::json!({"id": "mem_9", "auth": {"email": "x@y.z"}});
        let at = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
        let rec = member_snapshot("resync_mem_9_1", &member, "mem_9", at);
        assert_eq!(rec.key, "mem_9");
        let v: Value = serde_json::from_slice(&rec.value).unwrap();
        assert_eq!(v["type"], "member.snapshot");
        assert_eq!(v["kind"], "member_snapshot");
        assert_eq!(v["data"]["payload"], member);
        assert_eq!(v["occurred_at"], "2023-11-14T22:13:20.123Z");
        let h: std::collections::HashMap<_, _> = rec.headers.iter().cloned().collect();
        assert_eq!(h["ce_type"], "memberstack.member.snapshot");
        assert_eq!(h["membersync_member_id"], "mem_9");
    }

    #[test]
    fn stripe_event_naming_nobody_is_not_routable() {
        let body =
            br#"{"id":"evt_2","type":"balance.available","data":{"object":{"object":"balance"}}}"#;
        assert!(stripe(1_700_000_001, &parse_stripe(body).unwrap(), Utc::now()).is_none());
    }
}
