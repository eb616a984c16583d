//! A change event larger than Kafka accepts must never wedge the stream: retrying the same
//! record fails the same way, the slot stops confirming and Postgres keeps WAL until the slot
//! is lost. Such an event is replaced by a **reference record** — the same envelope with its
//! largest columns cut (left out of `before`/`after`), `truncated: true` and the cut columns
//! in `source.truncated_columns` — and a **dead letter** on `<prefix>.dlq` (kind
//! `cdc_record_too_large`) that carries the reference, so the row can be re-read
//! (`membersync snapshot --table …`) once it is small enough. Both are sized to fit the limit
//! themselves. Reference: docs/cdc.md ("Records too large for Kafka").

use serde_json::{Map, Value};

use crate::merge::change::Position;
use crate::merge::dlq::{DeadLetter, DlqError, SCHEMA_VERSION};

/// `error.kind` of the dead letter (and the reason in logs).
pub const DLQ_KIND: &str = "cdc_record_too_large";

/// Namespace of the dead letters' ids (uuid v5 of topic, LSN, position and key).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d656d62_6572_7379_6e63_636463000001);

/// Columns at most this large (JSON bytes, both images) are never cut: key columns and other
/// small values stay, so the reference still says which row changed and how.
const KEEP_BELOW_BYTES: usize = 1024;

/// The replacement of one refused (or too large) change event.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The reference record's value (same topic and key as the original).
    pub reference: Vec<u8>,
    /// The dead letter's value, for `<prefix>.dlq` (same key as the original).
    pub dead_letter: Vec<u8>,
    /// The dead letter's id (its `membersync-dlq-id` header).
    pub dead_letter_id: String,
    /// `schema.table` of the change, for metrics and logs.
    pub table: String,
    pub cut: Vec<String>,
}

/// Whether a record of `key` and `payload` exceeds `limit` bytes.
pub fn too_large(key: Option<&[u8]>, payload: &[u8], limit: usize) -> bool {
    key.map_or(0, <[u8]>::len) + payload.len() > limit
}

/// Builds the replacement of the change event `payload` (a CDC envelope) that was refused on
/// `topic`. The reference record is at most half of `limit` (minus the key), so that the dead
/// letter that carries it fits as well; a dead letter that still would not fit carries no
/// value (the key and the error still name the row).
pub fn replace(
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    limit: usize,
    reason: &str,
) -> Replacement {
    let key_len = key.map_or(0, <[u8]>::len);
    let target = limit.saturating_sub(key_len) / 2;
    let original: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let (reference, cut) = reference(&original, target);
    let reference_bytes = serde_json::to_vec(&reference).expect("JSON serialises");

    let source = &original["source"];
    let table = format!(
        "{}.{}",
        source["schema"].as_str().unwrap_or(""),
        source["table"].as_str().unwrap_or("")
    );
    let lsn = source["lsn"].as_u64().unwrap_or(0);
    let order = original["transaction"]["total_order"].as_u64().unwrap_or(0);
    let row = match &original["after"] {
        Value::Object(_) => &original["after"],
        _ => &original["before"],
    };
    let member_id = row["memberstack_id"].as_str().map(str::to_owned);
    let key_text = key.map(|k| String::from_utf8_lossy(k).into_owned());
    // The same event id merge gives the change (see merge's decoding of CDC events).
    let event_id = if original["op"] == "r" {
        format!("cdc:{lsn}:r:{}", member_id.as_deref().unwrap_or(""))
    } else {
        format!("cdc:{lsn}:{order}")
    };
    let id = uuid::Uuid::new_v5(
        &NAMESPACE,
        format!(
            "{topic}/{lsn}/{order}/{}",
            key_text.as_deref().unwrap_or("")
        )
        .as_bytes(),
    )
    .to_string();
    let mut letter = DeadLetter {
        schema_version: SCHEMA_VERSION,
        id: id.clone(),
        failed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        error: DlqError {
            kind: DLQ_KIND.into(),
            message: format!(
                "change event of {} bytes on {topic} ({reason}); published as a reference record \
                 without the columns [{}]: re-read the row (`membersync snapshot --table {table}`) \
                 once its values are smaller",
                payload.len() + key_len,
                cut.join(", ")
            ),
            retryable: false,
        },
        attempts: 1,
        // Never stored in Kafka: no partition or offset.
        origin: Position {
            topic: topic.to_owned(),
            partition: -1,
            offset: -1,
        },
        event_id: Some(event_id),
        member_id,
        key: key_text,
        value: Some(reference),
        value_base64: None,
        headers: Default::default(),
    };
    let mut dead_letter = serde_json::to_vec(&letter).expect("JSON serialises");
    if dead_letter.len() + key_len > limit {
        letter.value = None;
        letter
            .error
            .message
            .push_str(" (the reference is left out: too large)");
        dead_letter = serde_json::to_vec(&letter).expect("JSON serialises");
    }
    Replacement {
        reference: reference_bytes,
        dead_letter,
        dead_letter_id: id,
        table,
        cut,
    }
}

/// A dead letter that was itself refused: the same letter without the value.
pub fn shrink_dead_letter(payload: &[u8]) -> Option<Vec<u8>> {
    let mut letter: DeadLetter = serde_json::from_slice(payload).ok()?;
    if letter.value.is_none() && letter.value_base64.is_none() {
        return None;
    }
    letter.value = None;
    letter.value_base64 = None;
    letter
        .error
        .message
        .push_str(" (the reference is left out: too large)");
    serde_json::to_vec(&letter).ok()
}

/// The envelope with its largest columns left out until it serialises to at most `target`
/// bytes. Returns it and the cut columns, largest first.
fn reference(original: &Value, target: usize) -> (Value, Vec<String>) {
    let mut env = match original {
        Value::Object(m) => m.clone(),
        // Not an envelope (cannot happen for CDC's own records): keep nothing of it.
        _ => Map::new(),
    };
    let size = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len());
    let mut columns: Vec<(String, usize)> = Vec::new();
    for image in ["before", "after"] {
        if let Some(Value::Object(row)) = env.get(image) {
            for (name, value) in row {
                let bytes = size(value);
                match columns.iter_mut().find(|(n, _)| n == name) {
                    Some((_, total)) => *total += bytes,
                    None => columns.push((name.clone(), bytes)),
                }
            }
        }
    }
    columns.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut cut = Vec::new();
    let mut current = size(&Value::Object(env.clone()));
    for (name, bytes) in columns {
        if current <= target {
            break;
        }
        if bytes < KEEP_BELOW_BYTES {
            break;
        }
        for image in ["before", "after"] {
            if let Some(Value::Object(row)) = env.get_mut(image) {
                row.remove(&name);
            }
        }
        current = current.saturating_sub(bytes);
        cut.push(name);
    }
    env.insert("truncated".into(), Value::Bool(true));
    if let Some(Value::Object(source)) = env.get_mut("source") {
        source.insert(
            "truncated_columns".into(),
            Value::Array(cut.iter().cloned().map(Value::String).collect()),
        );
    }
    // Many small columns (or huge names): the row images go, the rest still identifies it.
    if size(&Value::Object(env.clone())) > target {
        for image in ["before", "after"] {
            if let Some(v) = env.get_mut(image)
                && v.is_object()
            {
                *v = Value::Null;
            }
        }
        if let Some(Value::Object(source)) = env.get_mut("source") {
            source.insert("truncated_columns".into(), Value::String("*".into()));
        }
    }
    (Value::Object(env), cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(big: usize) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "before": null,
            "after": {
                "id": 7,
                "memberstack_id": "mem_1",
                "email": "a@example.com",
                "project_data": {"blob": "x".repeat(big)},
                "usage_stats": {"n": "y".repeat(big / 4)},
            },
            "source": {"schema": "public", "table": "members", "lsn": 4242, "snapshot": "false"},
            "op": "u",
            "ts_ms": 1,
            "transaction": {"id": "9:4242", "total_order": 3, "data_collection_order": 1},
        }))
        .unwrap()
    }

    #[test]
    fn cuts_the_largest_columns_until_the_reference_and_its_dead_letter_fit() {
        let payload = envelope(1_300_000);
        assert!(too_large(Some(b"mem_1"), &payload, 1_000_000));
        let r = replace(
            "p.cdc.public.members",
            Some(b"mem_1"),
            &payload,
            1_000_000,
            "test",
        );
        // usage_stats (325 kB) fits once project_data is cut: only the largest goes.
        assert_eq!(r.cut, vec!["project_data"]);
        assert_eq!(r.table, "public.members");
        assert!(r.reference.len() <= 500_000);
        assert!(r.dead_letter.len() < 1_000_000);
        let reference: Value = serde_json::from_slice(&r.reference).unwrap();
        assert_eq!(reference["truncated"], true);
        assert_eq!(
            reference["source"]["truncated_columns"],
            json!(["project_data"])
        );
        assert!(reference["after"].get("usage_stats").is_some());
        assert_eq!(reference["source"]["lsn"], 4242);
        assert_eq!(reference["after"]["id"], 7);
        assert_eq!(reference["after"]["email"], "a@example.com");
        assert!(reference["after"].get("project_data").is_none());
        let letter: DeadLetter = serde_json::from_slice(&r.dead_letter).unwrap();
        assert_eq!(letter.error.kind, DLQ_KIND);
        assert!(!letter.error.retryable);
        assert_eq!(letter.key.as_deref(), Some("mem_1"));
        assert_eq!(letter.member_id.as_deref(), Some("mem_1"));
        assert_eq!(letter.event_id.as_deref(), Some("cdc:4242:3"));
        assert_eq!(letter.value.as_ref().unwrap()["after"]["id"], 7);
        assert_eq!(letter.id, r.dead_letter_id);
        // Deterministic: a re-delivered change gets the same dead letter id.
        let again = replace(
            "p.cdc.public.members",
            Some(b"mem_1"),
            &payload,
            1_000_000,
            "test",
        );
        assert_eq!(again.dead_letter_id, r.dead_letter_id);
    }

    #[test]
    fn a_tiny_limit_still_gives_a_reference_and_a_dead_letter_without_value() {
        let payload = envelope(10_000);
        let r = replace("t", Some(b"mem_1"), &payload, 600, "test");
        let reference: Value = serde_json::from_slice(&r.reference).unwrap();
        assert_eq!(reference["truncated"], true);
        assert_eq!(reference["after"], Value::Null);
        let letter: DeadLetter = serde_json::from_slice(&r.dead_letter).unwrap();
        assert!(letter.value.is_none());
        let shrunk = shrink_dead_letter(
            &serde_json::to_vec(&DeadLetter {
                value: Some(json!({"a": 1})),
                ..letter.clone()
            })
            .unwrap(),
        )
        .unwrap();
        let shrunk: DeadLetter = serde_json::from_slice(&shrunk).unwrap();
        assert!(shrunk.value.is_none());
        assert_eq!(
            shrink_dead_letter(&serde_json::to_vec(&shrunk).unwrap()),
            None
        );
    }
}
