//! The change event on `<prefix>.cdc.<schema>.<table>`: the value Debezium's PostgreSQL
//! connector produces through Kafka Connect's `JsonConverter` with `schemas.enable=false`, so
//! that Debezium consumers read it unchanged. What membersync adds (`source.origin` of its own
//! writes, `source.producer`, `source.unchanged_columns`) are extra fields such consumers
//! ignore. Schema: `schemas/kafka/cdc.json`; reference and the remaining differences:
//! `docs/topics.md`.

use serde::{Deserialize, Serialize};
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

/// The marker the row conversion puts where pgoutput did not send an unchanged TOASTed value.
/// Events never carry it: [`publish_placeholders`] replaces it with the configured
/// `cdc.unavailable_value_placeholder`.
pub use super::relation::UNCHANGED_TOAST_MARKER as UNCHANGED_TOAST;

/// Debezium's default `unavailable.value.placeholder`.
pub const DEBEZIUM_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// `source.connector`: Debezium's name of its PostgreSQL connector (consumers dispatch on it).
pub const CONNECTOR: &str = "postgresql";
/// `source.producer`: what wrote the event (a membersync addition).
pub const PRODUCER: &str = "membersync";

/// `source.snapshot`, as Debezium spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Snapshot {
    /// A streamed change.
    False,
    /// A row of the initial snapshot (neither first nor last of anything).
    True,
    /// The first row of the initial snapshot.
    First,
    FirstInDataCollection,
    LastInDataCollection,
    /// The last row of the initial snapshot.
    Last,
    /// A row of an incremental snapshot.
    Incremental,
}

impl Snapshot {
    /// Debezium's rule: last of all, first of all, last of its table, first of its table.
    pub fn of_row(first: bool, last: bool, first_in_table: bool, last_in_table: bool) -> Self {
        if last {
            Snapshot::Last
        } else if first {
            Snapshot::First
        } else if last_in_table {
            Snapshot::LastInDataCollection
        } else if first_in_table {
            Snapshot::FirstInDataCollection
        } else {
            Snapshot::True
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Source<'a> {
    pub version: &'static str,
    pub connector: &'static str,
    /// The logical server name: the topic prefix.
    pub name: &'a str,
    /// When the change was committed (snapshot rows: when the snapshot ran).
    pub ts_ms: i64,
    pub snapshot: Snapshot,
    pub db: &'a str,
    /// Debezium's `sequence`: a JSON array of two strings in a string,
    /// `["<last commit LSN>","<this change's LSN>"]` (the first `null` when unknown, and on
    /// snapshot rows, as Debezium's).
    pub sequence: Option<String>,
    pub ts_us: i64,
    pub ts_ns: i64,
    pub schema: &'a str,
    pub table: &'a str,
    #[serde(rename = "txId")]
    pub tx_id: Option<u32>,
    /// This change's own LSN (snapshot rows: the slot's consistent point; incremental snapshot
    /// rows: the LSN of the chunk's closing watermark).
    pub lsn: u64,
    /// Always `null`, as from Debezium unless `xmin.fetch.interval.ms` is set.
    pub xmin: Option<u64>,
    /// `"membersync"` when the transaction was written by membersync itself.
    pub origin: Option<&'a str>,
    /// Always [`PRODUCER`].
    pub producer: &'static str,
    /// Columns of `after` that hold the unavailable-value placeholder.
    pub unchanged_columns: &'a [String],
}

impl<'a> Source<'a> {
    /// A source block with the given commit time (Unix microseconds); `snapshot` false, no
    /// transaction, no sequence, no origin.
    pub fn new(
        name: &'a str,
        db: &'a str,
        schema: &'a str,
        table: &'a str,
        commit_us: i64,
        lsn: u64,
    ) -> Self {
        Source {
            version: crate::telemetry::BUILD_VERSION,
            connector: CONNECTOR,
            name,
            ts_ms: commit_us.div_euclid(1000),
            snapshot: Snapshot::False,
            db,
            sequence: None,
            ts_us: commit_us,
            ts_ns: commit_us.saturating_mul(1000),
            schema,
            table,
            tx_id: None,
            lsn,
            xmin: None,
            origin: None,
            producer: PRODUCER,
            unchanged_columns: &[],
        }
    }
}

/// Debezium's `source.sequence` value.
pub fn sequence(last_commit_lsn: Option<u64>, lsn: u64) -> String {
    serde_json::to_string(&[
        last_commit_lsn.map(|l| l.to_string()),
        Some(lsn.to_string()),
    ])
    .expect("strings serialise")
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
    pub transaction: Option<Transaction>,
    pub op: Op,
    /// When membersync processed it.
    pub ts_ms: i64,
    pub ts_us: i64,
    pub ts_ns: i64,
}

impl<'a> Envelope<'a> {
    /// An envelope stamped with the current time.
    pub fn new(
        op: Op,
        before: Option<&'a Map<String, Value>>,
        after: Option<&'a Map<String, Value>>,
        source: Source<'a>,
        transaction: Option<Transaction>,
    ) -> Self {
        let now_us = now_us();
        Envelope {
            before,
            after,
            source,
            transaction,
            op,
            ts_ms: now_us.div_euclid(1000),
            ts_us: now_us,
            ts_ns: now_us.saturating_mul(1000),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }
}

/// How the Kafka key of a change event is written (`cdc.key_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    /// One key column → its bare text (for `members`, the member id: the same bytes as the
    /// webhook topics' keys, so a member's events of every topic share a partition number);
    /// several → a JSON object.
    #[default]
    MemberId,
    /// Debezium's: always a JSON object of the key columns (`{"memberstack_id":"mem_1"}`).
    Debezium,
}

/// The identity of a row by `columns`, for matching rows against each other (incremental
/// snapshot windows): one column → its value's text; several → a JSON object. `None` when a
/// key column is null, missing or unavailable.
pub fn key(row: &Map<String, Value>, columns: &[String]) -> Option<Vec<u8>> {
    match columns {
        [one] => match row.get(one)? {
            Value::Null => None,
            Value::String(s) if s == UNCHANGED_TOAST => None,
            Value::String(s) => Some(s.as_bytes().to_vec()),
            other => Some(other.to_string().into_bytes()),
        },
        many => json_key(row, many),
    }
}

/// The Kafka key of an event about `row`, in `format`.
pub fn kafka_key(
    row: &Map<String, Value>,
    columns: &[String],
    format: KeyFormat,
) -> Option<Vec<u8>> {
    match format {
        KeyFormat::MemberId => key(row, columns),
        KeyFormat::Debezium if columns.is_empty() => None,
        KeyFormat::Debezium => json_key(row, columns),
    }
}

fn json_key(row: &Map<String, Value>, columns: &[String]) -> Option<Vec<u8>> {
    let mut obj = Map::new();
    for c in columns {
        let v = row.get(c)?;
        if v.as_str() == Some(UNCHANGED_TOAST) {
            return None;
        }
        obj.insert(c.clone(), v.clone());
    }
    Some(serde_json::to_vec(&obj).expect("a map serialises"))
}

/// The member id a CDC record's key names, in either key format: the bare text, or the
/// `memberstack_id` of a Debezium JSON key. For readers (merge, tools) that group by member.
pub fn member_id_of_key(key: &[u8]) -> Option<String> {
    if key.first() == Some(&b'{')
        && let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(key)
    {
        return o
            .get("memberstack_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    std::str::from_utf8(key).ok().map(str::to_owned)
}

/// Whether a CDC record is a tombstone (the null value after a delete): readers that decode
/// every record skip these.
pub fn is_tombstone(value: Option<&[u8]>) -> bool {
    value.is_none_or(|v| v.is_empty())
}

/// Replaces the internal unchanged-TOAST marker by `placeholder` in `row`.
pub fn publish_placeholders(row: &mut Map<String, Value>, placeholder: &str) {
    for v in row.values_mut() {
        if v.as_str() == Some(UNCHANGED_TOAST) {
            *v = Value::String(placeholder.to_owned());
        }
    }
}

/// `row` without the columns a CDC event lists in `source.unchanged_columns` (whose values are
/// the placeholder, whatever it is configured to): what a reader that must not take the
/// placeholder for a value uses.
pub fn available_columns(event: &Value) -> Value {
    let row = event
        .get("after")
        .filter(|a| a.is_object())
        .or_else(|| event.get("before"))
        .cloned()
        .unwrap_or(Value::Null);
    let Value::Object(mut row) = row else {
        return row;
    };
    if let Some(Value::Array(cols)) = event.pointer("/source/unchanged_columns") {
        for c in cols.iter().filter_map(Value::as_str) {
            row.remove(c);
        }
    }
    Value::Object(row)
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Postgres epoch (2000-01-01) microseconds → Unix milliseconds.
pub fn pg_micros_to_unix_ms(micros: i64) -> i64 {
    micros / 1000 + PG_EPOCH_UNIX_SECS * 1000
}

/// Postgres epoch (2000-01-01) microseconds → Unix microseconds.
pub fn pg_micros_to_unix_us(micros: i64) -> i64 {
    micros + PG_EPOCH_UNIX_SECS * 1_000_000
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
    fn debezium_keys_are_always_objects_and_read_back_as_the_member_id() {
        let row = json!({"memberstack_id": "mem_1", "id": 7})
            .as_object()
            .unwrap()
            .clone();
        let cols = ["memberstack_id".to_string()];
        let k = kafka_key(&row, &cols, KeyFormat::Debezium).unwrap();
        assert_eq!(k, br#"{"memberstack_id":"mem_1"}"#);
        assert_eq!(member_id_of_key(&k).as_deref(), Some("mem_1"));
        let bare = kafka_key(&row, &cols, KeyFormat::MemberId).unwrap();
        assert_eq!(member_id_of_key(&bare).as_deref(), Some("mem_1"));
        assert_eq!(
            kafka_key(&row, &["id".into()], KeyFormat::Debezium).unwrap(),
            br#"{"id":7}"#
        );
        assert_eq!(kafka_key(&row, &[], KeyFormat::Debezium), None);
    }

    #[test]
    fn sequence_is_a_string_holding_two_strings() {
        assert_eq!(sequence(Some(10), 42), r#"["10","42"]"#);
        assert_eq!(sequence(None, 42), r#"[null,"42"]"#);
    }

    #[test]
    fn snapshot_marks_follow_debezium() {
        assert_eq!(Snapshot::of_row(true, true, true, true), Snapshot::Last);
        assert_eq!(Snapshot::of_row(true, false, true, true), Snapshot::First);
        assert_eq!(
            Snapshot::of_row(false, false, true, true),
            Snapshot::LastInDataCollection
        );
        assert_eq!(
            Snapshot::of_row(false, false, true, false),
            Snapshot::FirstInDataCollection
        );
        assert_eq!(Snapshot::of_row(false, false, false, false), Snapshot::True);
        assert_eq!(
            serde_json::to_value(Snapshot::FirstInDataCollection).unwrap(),
            "first_in_data_collection"
        );
    }

    #[test]
    fn placeholders_and_available_columns() {
        let mut row = json!({"a": UNCHANGED_TOAST, "b": 1})
            .as_object()
            .unwrap()
            .clone();
        publish_placeholders(&mut row, DEBEZIUM_PLACEHOLDER);
        assert_eq!(row["a"], DEBEZIUM_PLACEHOLDER);
        let e = json!({"after": row, "source": {"unchanged_columns": ["a"]}});
        assert_eq!(available_columns(&e), json!({"b": 1}));
        assert!(is_tombstone(None) && is_tombstone(Some(b"")) && !is_tombstone(Some(b"{}")));
    }

    #[test]
    fn envelope_is_debezium_shaped() {
        let after = json!({"id": 1}).as_object().unwrap().clone();
        let unchanged = vec!["big".to_string()];
        let mut source = Source::new(
            "membersync",
            "postgres",
            "public",
            "members",
            1_700_000_000_123_456,
            42,
        );
        source.tx_id = Some(9);
        source.sequence = Some(sequence(Some(40), 42));
        source.unchanged_columns = &unchanged;
        let e = Envelope::new(
            Op::Create,
            None,
            Some(&after),
            source,
            Some(Transaction {
                id: "9:50".into(),
                total_order: 1,
                data_collection_order: 1,
            }),
        );
        let v: Value = serde_json::from_slice(&e.to_vec()).unwrap();
        assert_eq!(v["op"], "c");
        assert_eq!(v["before"], Value::Null);
        let s = &v["source"];
        assert_eq!(s["connector"], "postgresql");
        assert_eq!(s["producer"], "membersync");
        assert_eq!(s["snapshot"], "false");
        assert_eq!(s["txId"], 9);
        assert_eq!(s["lsn"], 42);
        assert_eq!(s["xmin"], Value::Null);
        assert_eq!(s["sequence"], r#"["40","42"]"#);
        assert_eq!(s["ts_ms"], 1_700_000_000_123i64);
        assert_eq!(s["ts_us"], 1_700_000_000_123_456i64);
        assert_eq!(s["ts_ns"], 1_700_000_000_123_456_000i64);
        assert_eq!(s["unchanged_columns"], json!(["big"]));
        assert_eq!(v["transaction"]["id"], "9:50");
        let (ms, us, ns) = (
            v["ts_ms"].as_i64().unwrap(),
            v["ts_us"].as_i64().unwrap(),
            v["ts_ns"].as_i64().unwrap(),
        );
        assert!(us / 1000 == ms && ns / 1000 == us);
        assert_eq!(pg_micros_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_micros_to_unix_us(1), 946_684_800_000_001);
    }
}
