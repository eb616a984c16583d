//! The change event on `<prefix>.cdc.<schema>.<table>`: Debezium's JSON envelope, so existing
//! consumers work unchanged. Schema: `schemas/kafka/cdc.json`; reference: `docs/topics.md`.

use serde::Serialize;
use serde_json::{Map, Value};

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "r")]
    Read,
    #[serde(rename = "t")]
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// The value that marks an unchanged TOASTed column (never `null`).
pub use super::relation::UNCHANGED_TOAST_MARKER as UNCHANGED_TOAST;

#[derive(Debug, Clone, Serialize)]
pub struct Source<'a> {
    pub version: &'static str,
    pub connector: &'static str,
    /// The logical server name: the topic prefix.
    pub name: &'a str,
    /// When the change was committed (snapshot rows: when the snapshot ran).
    pub ts_ms: i64,
    /// `"true"` for snapshot rows, `"false"` for streamed changes (Debezium's `"last"` is not
    /// used).
    pub snapshot: &'static str,
    pub db: &'a str,
    pub schema: &'a str,
    pub table: &'a str,
    #[serde(rename = "txId")]
    pub tx_id: Option<u32>,
    /// The transaction's commit LSN (snapshot rows: the slot's consistent point). pgoutput v1
    /// has no per-change LSN; `(lsn, transaction.total_order)` identifies an event.
    pub lsn: u64,
    /// `"membersync"` when the transaction was written by membersync itself.
    pub origin: Option<&'a str>,
    /// Columns whose value is [`UNCHANGED_TOAST`] in `after` (and `before`).
    pub unchanged_columns: &'a [String],
}

#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    /// Debezium's form: `"<txId>:<commit LSN>"`.
    pub id: String,
    /// Position of this event in its transaction, from 1.
    pub total_order: u64,
    /// Position among this transaction's events of the same table, from 1.
    pub data_collection_order: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a> {
    pub before: Option<&'a Map<String, Value>>,
    pub after: Option<&'a Map<String, Value>>,
    pub source: Source<'a>,
    pub op: Op,
    /// When membersync processed it.
    pub ts_ms: i64,
    pub transaction: Option<Transaction>,
}

impl Envelope<'_> {
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }
}

/// The Kafka key: one key column → its value's text (so a member's change events share a
/// partition with its webhook events, keyed by the bare member id); several → a JSON object.
/// `None` when a key column is null or missing.
pub fn key(row: &Map<String, Value>, columns: &[String]) -> Option<Vec<u8>> {
    match columns {
        [one] => match row.get(one)? {
            Value::Null => None,
            Value::String(s) if s == UNCHANGED_TOAST => None,
            Value::String(s) => Some(s.as_bytes().to_vec()),
            other => Some(other.to_string().into_bytes()),
        },
        many => {
            let mut obj = Map::new();
            for c in many {
                obj.insert(c.clone(), row.get(c)?.clone());
            }
            Some(serde_json::to_vec(&obj).expect("a map serialises"))
        }
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Postgres epoch (2000-01-01) microseconds → Unix milliseconds.
pub fn pg_micros_to_unix_ms(micros: i64) -> i64 {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    micros / 1000 + PG_EPOCH_UNIX_SECS * 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_key_column_is_its_bare_text_and_several_are_an_object() {
        let row = json!({"memberstack_id": "mem_1", "id": 7, "n": null})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(key(&row, &["memberstack_id".into()]).unwrap(), b"mem_1");
        assert_eq!(key(&row, &["id".into()]).unwrap(), b"7");
        assert_eq!(key(&row, &["n".into()]), None);
        assert_eq!(
            key(&row, &["id".into(), "memberstack_id".into()]).unwrap(),
            br#"{"id":7,"memberstack_id":"mem_1"}"#
        );
    }

    #[test]
    fn envelope_is_debezium_shaped() {
        let after = json!({"id": 1}).as_object().unwrap().clone();
        let unchanged = vec!["big".to_string()];
        let e = Envelope {
            before: None,
            after: Some(&after),
            source: Source {
                version: "0.1.0",
                connector: "membersync",
                name: "membersync",
                ts_ms: 1,
                snapshot: "false",
                db: "postgres",
                schema: "public",
                table: "members",
                tx_id: Some(9),
                lsn: 42,
                origin: None,
                unchanged_columns: &unchanged,
            },
            op: Op::Create,
            ts_ms: 2,
            transaction: Some(Transaction {
                id: "9:42".into(),
                total_order: 1,
                data_collection_order: 1,
            }),
        };
        let v: Value = serde_json::from_slice(&e.to_vec()).unwrap();
        assert_eq!(v["op"], "c");
        assert_eq!(v["before"], Value::Null);
        assert_eq!(v["source"]["txId"], 9);
        assert_eq!(v["source"]["unchanged_columns"], json!(["big"]));
        assert_eq!(v["transaction"]["id"], "9:42");
        assert_eq!(pg_micros_to_unix_ms(0), 946_684_800_000);
    }
}
