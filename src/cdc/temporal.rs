//! `cdc.time_precision_mode`: how `date`, `time` and `timestamp` (without time zone) values
//! are published, as Debezium's `time.precision.mode`. The row conversion
//! ([`super::value`]) writes ISO 8601 text; [`encode`] turns it into Debezium's numbers when a
//! numeric mode is configured. `timestamptz` is always a UTC ISO string (Debezium's
//! `ZonedTimestamp`, in every mode); `timetz` and `interval` stay text (docs/topics.md).

use chrono::{NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::value::{array_element_oid, oid};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimePrecisionMode {
    /// ISO 8601 text: `date` `YYYY-MM-DD`, `time` `HH:MM:SS[.ffffff]`, `timestamp`
    /// `YYYY-MM-DDTHH:MM:SS[.ffffff]` (close to Debezium's `isostring`, without its `Z`).
    #[default]
    IsoString,
    /// Debezium's default: `date` → days since 1970-01-01; `time` and `timestamp` → milliseconds
    /// (precision 0–3) or microseconds (4–6, and no precision) since midnight / the epoch.
    Adaptive,
    /// Kafka Connect's types: `date` → days; `time` and `timestamp` → milliseconds (precision
    /// beyond milliseconds is cut).
    Connect,
}

/// A column of a published row: its name, type and type modifier (`atttypmod`, -1 if none).
pub struct ColumnType<'a> {
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Re-encodes the temporal columns of `row` for `mode` (arrays element by element). Values
/// that are not ISO text of the expected shape (`infinity`, years beyond 9999, the unchanged
/// TOAST marker) are left as they are.
pub fn encode<'a>(
    mode: TimePrecisionMode,
    row: &mut Map<String, Value>,
    columns: impl IntoIterator<Item = ColumnType<'a>>,
) {
    if mode == TimePrecisionMode::IsoString {
        return;
    }
    for c in columns {
        if let Some(v) = row.get_mut(c.name) {
            let kind = array_element_oid(c.type_oid).unwrap_or(c.type_oid);
            if matches!(kind, oid::DATE | oid::TIME | oid::TIMESTAMP) {
                convert(mode, kind, c.type_modifier, v);
            }
        }
    }
}

fn convert(mode: TimePrecisionMode, kind: u32, typmod: i32, v: &mut Value) {
    if let Value::Array(items) = v {
        for item in items {
            convert(mode, kind, typmod, item);
        }
        return;
    }
    let Some(text) = v.as_str() else { return };
    // Precision: the type modifier of time/timestamp is the precision; none means 6.
    let micros = mode == TimePrecisionMode::Adaptive && !(0..=3).contains(&typmod);
    let unit = |us: i64| if micros { us } else { us.div_euclid(1000) };
    let new = match kind {
        oid::DATE => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .map(|d| (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days()),
        oid::TIME if text == "24:00:00" => Some(unit(86_400_000_000)),
        oid::TIME => NaiveTime::parse_from_str(text, "%H:%M:%S%.f")
            .ok()
            .map(|t| {
                unit(
                    i64::from(t.num_seconds_from_midnight()) * 1_000_000
                        + i64::from(t.nanosecond() / 1000),
                )
            }),
        oid::TIMESTAMP => NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
            .ok()
            .map(|t| unit(t.and_utc().timestamp_micros())),
        _ => None,
    };
    if let Some(n) = new {
        *v = Value::from(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols() -> Vec<ColumnType<'static>> {
        vec![
            ColumnType {
                name: "d",
                type_oid: oid::DATE,
                type_modifier: -1,
            },
            ColumnType {
                name: "t",
                type_oid: oid::TIME,
                type_modifier: -1,
            },
            ColumnType {
                name: "t3",
                type_oid: oid::TIME,
                type_modifier: 3,
            },
            ColumnType {
                name: "ts",
                type_oid: oid::TIMESTAMP,
                type_modifier: 6,
            },
            ColumnType {
                name: "ts0",
                type_oid: oid::TIMESTAMP,
                type_modifier: 0,
            },
            ColumnType {
                name: "ds",
                type_oid: oid::DATE_ARRAY,
                type_modifier: -1,
            },
            ColumnType {
                name: "x",
                type_oid: oid::TEXT,
                type_modifier: -1,
            },
        ]
    }

    fn row() -> Map<String, Value> {
        json!({"d": "2024-02-29", "t": "12:34:56.789012", "t3": "00:00:01.5",
               "ts": "2024-02-29T12:34:56.789012", "ts0": "1969-12-31T23:59:59",
               "ds": ["1970-01-02", null, "infinity"], "x": "2024-02-29"})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn adaptive_gives_days_and_micros_or_millis_by_precision() {
        let mut r = row();
        encode(TimePrecisionMode::Adaptive, &mut r, cols());
        assert_eq!(r["d"], 19_782);
        assert_eq!(r["t"], 45_296_789_012i64);
        assert_eq!(r["t3"], 1_500);
        assert_eq!(r["ts"], 1_709_210_096_789_012i64);
        assert_eq!(r["ts0"], -1_000);
        assert_eq!(r["ds"], json!([1, null, "infinity"]));
        assert_eq!(r["x"], "2024-02-29", "not a temporal column");
    }

    #[test]
    fn connect_gives_millis_and_iso_string_leaves_text() {
        let mut r = row();
        encode(TimePrecisionMode::Connect, &mut r, cols());
        assert_eq!(r["t"], 45_296_789);
        assert_eq!(r["ts"], 1_709_210_096_789i64);
        let mut r = row();
        encode(TimePrecisionMode::IsoString, &mut r, cols());
        assert_eq!(r, row());
    }
}
