//! Conversion of PostgreSQL **text output** (as carried by pgoutput `t` column values) to JSON,
//! by type OID.
//!
//! The replication session is expected to pin `DateStyle=ISO` (and `TimeZone=UTC`,
//! `bytea_output=hex`); values in any other shape are kept as their text rather than guessed at.
//! Conversion never fails: whatever cannot be converted becomes a JSON string of the text.
//!
//! | type | JSON |
//! | --- | --- |
//! | `int2`, `int4`, `int8`, `oid` | number |
//! | `float4`, `float8` | number; `NaN`, `Infinity`, `-Infinity` as strings |
//! | `numeric`, `money` | string (no precision loss; `NaN` too) |
//! | `bool` | `true` / `false` |
//! | `json`, `jsonb` | the embedded JSON value |
//! | `date` | `YYYY-MM-DD` (`infinity` kept) |
//! | `timestamp` | `YYYY-MM-DDTHH:MM:SS[.ffffff]` |
//! | `timestamptz` | `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, converted to UTC |
//! | `bytea` | base64 (standard alphabet, padded) |
//! | arrays of the above | JSON arrays (nested for multi-dimensional), elements converted by element type |
//! | anything else (`text`, `varchar`, `uuid`, `time`, `interval`, enums, …) | string |
//!
//! `cdc.time_precision_mode` may turn `date`, `time` and `timestamp` into Debezium's numbers
//! afterwards (`super::temporal`).
//!
//! Years outside 0000–9999 (and BC dates, as astronomical years: 1 BC = `0000`, 44 BC =
//! `-0043`) use ISO 8601 expanded notation with a sign (`+10000-01-01`, `-0043-03-15`).

use base64::Engine as _;
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Timelike};
use serde_json::Value;

/// Type OIDs (from PostgreSQL's `pg_type.dat`).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;

    pub const XML_ARRAY: u32 = 143;
    pub const JSON_ARRAY: u32 = 199;
    pub const MONEY_ARRAY: u32 = 791;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const BYTEA_ARRAY: u32 = 1001;
    pub const CHAR_ARRAY: u32 = 1002;
    pub const NAME_ARRAY: u32 = 1003;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const OID_ARRAY: u32 = 1028;
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    pub const DATE_ARRAY: u32 = 1182;
    pub const TIME_ARRAY: u32 = 1183;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const INTERVAL_ARRAY: u32 = 1187;
    pub const NUMERIC_ARRAY: u32 = 1231;
    pub const TIMETZ_ARRAY: u32 = 1270;
    pub const UUID_ARRAY: u32 = 2951;
    pub const JSONB_ARRAY: u32 = 3807;
}

/// The element type of a known array type (all of them use `,` as the delimiter).
pub fn array_element_oid(array_oid: u32) -> Option<u32> {
    use oid::*;
    Some(match array_oid {
        XML_ARRAY => XML,
        JSON_ARRAY => JSON,
        MONEY_ARRAY => MONEY,
        BOOL_ARRAY => BOOL,
        BYTEA_ARRAY => BYTEA,
        CHAR_ARRAY => CHAR,
        NAME_ARRAY => NAME,
        INT2_ARRAY => INT2,
        INT4_ARRAY => INT4,
        TEXT_ARRAY => TEXT,
        BPCHAR_ARRAY => BPCHAR,
        VARCHAR_ARRAY => VARCHAR,
        INT8_ARRAY => INT8,
        FLOAT4_ARRAY => FLOAT4,
        FLOAT8_ARRAY => FLOAT8,
        OID_ARRAY => OID,
        TIMESTAMP_ARRAY => TIMESTAMP,
        DATE_ARRAY => DATE,
        TIME_ARRAY => TIME,
        TIMESTAMPTZ_ARRAY => TIMESTAMPTZ,
        INTERVAL_ARRAY => INTERVAL,
        NUMERIC_ARRAY => NUMERIC,
        TIMETZ_ARRAY => TIMETZ,
        UUID_ARRAY => UUID,
        JSONB_ARRAY => JSONB,
        _ => return None,
    })
}

/// Converts the text output of a value of type `type_oid` to JSON (see the module table).
pub fn text_to_json(type_oid: u32, text: &str) -> Value {
    use oid::*;
    let converted = match type_oid {
        BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        INT2 | INT4 | INT8 | OID => integer(text),
        FLOAT4 | FLOAT8 => float(text),
        JSON | JSONB => serde_json::from_str(text).ok(),
        DATE => date(text).map(Value::String),
        TIMESTAMP => timestamp(text).map(Value::String),
        TIMESTAMPTZ => timestamptz(text).map(Value::String),
        BYTEA => bytea(text).map(|b| Value::String(base64::prelude::BASE64_STANDARD.encode(b))),
        _ => match array_element_oid(type_oid) {
            Some(elem) => parse_array(text)
                .ok()
                .map(|items| array_to_json(elem, items)),
            None => None,
        },
    };
    converted.unwrap_or_else(|| Value::String(text.to_owned()))
}

fn array_to_json(elem_oid: u32, items: Vec<ArrayItem>) -> Value {
    Value::Array(
        items
            .into_iter()
            .map(|item| match item {
                ArrayItem::Null => Value::Null,
                ArrayItem::Value(s) => text_to_json(elem_oid, &s),
                ArrayItem::Array(sub) => array_to_json(elem_oid, sub),
            })
            .collect(),
    )
}

fn integer(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        Some(Value::from(i))
    } else {
        text.parse::<u64>().ok().map(Value::from)
    }
}

fn float(text: &str) -> Option<Value> {
    // `NaN`, `Infinity` and `-Infinity` parse to non-finite values, which JSON cannot hold:
    // they fall back to their text.
    let f = text.parse::<f64>().ok()?;
    serde_json::Number::from_f64(f).map(Value::Number)
}

/// Splits a trailing ` BC` off.
fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

/// Parses an ISO `Y…Y-MM-DD` date (the year may have more than four digits).
fn parse_date(text: &str, bc: bool) -> Option<NaiveDate> {
    let mut parts = text.rsplitn(3, '-');
    let day = parts.next()?;
    let month = parts.next()?;
    let year = parts.next()?;
    if day.len() != 2 || month.len() != 2 || year.len() < 4 {
        return None;
    }
    if !(all_digits(year) && all_digits(month) && all_digits(day)) {
        return None;
    }
    let year: i32 = year.parse().ok()?;
    // Astronomical numbering: 1 BC is year 0.
    let year = if bc { 1 - year } else { year };
    NaiveDate::from_ymd_opt(year, month.parse().ok()?, day.parse().ok()?)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `HH:MM:SS[.f…]` (fractions beyond microseconds are truncated; PostgreSQL never sends
/// more than six digits).
fn parse_time(text: &str) -> Option<NaiveTime> {
    let (hms, frac) = match text.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (text, None),
    };
    let mut it = hms.split(':');
    let (h, m, s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || h.len() != 2 || m.len() != 2 || s.len() != 2 {
        return None;
    }
    if !(all_digits(h) && all_digits(m) && all_digits(s)) {
        return None;
    }
    let micros = match frac {
        None => 0,
        Some(f) if all_digits(f) => {
            let digits: String = f.chars().chain(std::iter::repeat('0')).take(6).collect();
            digits.parse::<u32>().ok()?
        }
        Some(_) => return None,
    };
    NaiveTime::from_hms_micro_opt(h.parse().ok()?, m.parse().ok()?, s.parse().ok()?, micros)
}

fn format_date(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn format_datetime(dt: NaiveDateTime) -> String {
    let base = dt.format("%Y-%m-%dT%H:%M:%S").to_string();
    let micros = dt.nanosecond() / 1000;
    if micros == 0 {
        base
    } else {
        format!("{base}.{micros:06}")
    }
}

fn date(text: &str) -> Option<String> {
    let (body, bc) = strip_bc(text);
    parse_date(body, bc).map(format_date)
}

fn parse_timestamp(text: &str, bc: bool) -> Option<NaiveDateTime> {
    let (d, t) = text.split_once(' ')?;
    Some(NaiveDateTime::new(parse_date(d, bc)?, parse_time(t)?))
}

fn timestamp(text: &str) -> Option<String> {
    let (body, bc) = strip_bc(text);
    parse_timestamp(body, bc).map(format_datetime)
}

/// Parses a UTC offset `±HH[:MM[:SS]]` (or `±HHMM`) into seconds east of UTC.
fn parse_offset(text: &str) -> Option<i64> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let fields: Vec<&str> = if rest.contains(':') {
        rest.split(':').collect()
    } else if rest.len() == 4 {
        vec![&rest[..2], &rest[2..]]
    } else {
        vec![rest]
    };
    if fields.is_empty() || fields.len() > 3 {
        return None;
    }
    let mut secs: i64 = 0;
    for (i, f) in fields.iter().enumerate() {
        if !all_digits(f) || f.len() > 2 {
            return None;
        }
        let v: i64 = f.parse().ok()?;
        if i > 0 && v >= 60 {
            return None;
        }
        secs += v * [3600, 60, 1][i];
    }
    Some(sign * secs)
}

fn timestamptz(text: &str) -> Option<String> {
    let (body, bc) = strip_bc(text);
    let (d, t) = body.split_once(' ')?;
    let split = t.rfind(['+', '-'])?;
    let (t, offset) = t.split_at(split);
    let offset = parse_offset(offset)?;
    let local = NaiveDateTime::new(parse_date(d, bc)?, parse_time(t)?);
    let utc = local.checked_sub_signed(TimeDelta::try_seconds(offset)?)?;
    Some(format!("{}Z", format_datetime(utc)))
}

/// Decodes bytea text output: hex format (`\x0102`) or the legacy escape format.
fn bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(hex_digits) = text.strip_prefix("\\x") {
        return hex::decode(hex_digits).ok();
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b.get(i + 1..i + 4)?;
            if !oct.iter().all(|c| (b'0'..=b'7').contains(c)) || oct[0] > b'3' {
                return None;
            }
            out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
            i += 4;
        }
    }
    Some(out)
}

/// One element of a parsed PostgreSQL array literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayItem {
    /// An unquoted `NULL`.
    Null,
    /// An element's text (quotes and escapes removed).
    Value(String),
    /// A sub-array (multi-dimensional arrays).
    Array(Vec<ArrayItem>),
}

/// Why an array literal could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed array literal at byte {offset}: {reason}")]
pub struct ArrayParseError {
    /// Byte offset into the text.
    pub offset: usize,
    /// What was wrong.
    pub reason: &'static str,
}

/// Parses a PostgreSQL array literal with `,` as delimiter (`{1,2,NULL,"a b","q\"x"}`,
/// `{{1,2},{3,4}}`, optionally preceded by dimension bounds `[2:3]=`), returning the top-level
/// elements.
pub fn parse_array(text: &str) -> Result<Vec<ArrayItem>, ArrayParseError> {
    let mut p = ArrayParser {
        s: text.as_bytes(),
        pos: 0,
    };
    p.skip_ws();
    if p.peek() == Some(b'[') {
        // Dimension decoration, e.g. `[0:1][1:2]=`.
        let eq = text[p.pos..]
            .find('=')
            .ok_or(p.err("dimensions without '='"))?;
        p.pos += eq + 1;
        p.skip_ws();
    }
    let items = p.array(0)?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err(p.err("junk after closing '}'"));
    }
    Ok(items)
}

/// PostgreSQL's `MAXDIM`.
const MAX_ARRAY_DEPTH: usize = 6;

struct ArrayParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl ArrayParser<'_> {
    fn err(&self, reason: &'static str) -> ArrayParseError {
        ArrayParseError {
            offset: self.pos,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_array_space) {
            self.pos += 1;
        }
    }

    /// Parses `{ … }` starting at the current `{`.
    fn array(&mut self, depth: usize) -> Result<Vec<ArrayItem>, ArrayParseError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err("too many dimensions"));
        }
        if self.peek() != Some(b'{') {
            return Err(self.err("expected '{'"));
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            self.skip_ws();
            let item = match self.peek() {
                Some(b'{') => ArrayItem::Array(self.array(depth + 1)?),
                Some(b'"') => ArrayItem::Value(self.quoted()?),
                Some(b',' | b'}') => return Err(self.err("empty element")),
                Some(_) => self.unquoted()?,
                None => return Err(self.err("unexpected end")),
            };
            items.push(item);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(_) => return Err(self.err("expected ',' or '}'")),
                None => return Err(self.err("unexpected end")),
            }
        }
    }

    /// Parses `"…"` with backslash escapes.
    fn quoted(&mut self) -> Result<String, ArrayParseError> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted element")),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self.peek().ok_or(self.err("backslash at end"))?;
                    out.push(c);
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        self.utf8(out)
    }

    /// Parses an unquoted element up to the next `,` or `}`; surrounding whitespace is not part
    /// of it (escaped whitespace is), and an unescaped `NULL` (any case) is the null element.
    fn unquoted(&mut self) -> Result<ArrayItem, ArrayParseError> {
        let mut out = Vec::new();
        let mut keep = 0; // length of `out` up to the last non-space or escaped byte
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return Err(self.err("unexpected end")),
                Some(b',' | b'}') => break,
                Some(b'{' | b'"') => return Err(self.err("unexpected character in element")),
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self.peek().ok_or(self.err("backslash at end"))?;
                    out.push(c);
                    keep = out.len();
                    escaped = true;
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    if !is_array_space(c) {
                        keep = out.len();
                    }
                    self.pos += 1;
                }
            }
        }
        out.truncate(keep);
        if !escaped && out.eq_ignore_ascii_case(b"NULL") {
            return Ok(ArrayItem::Null);
        }
        self.utf8(out).map(ArrayItem::Value)
    }

    fn utf8(&self, bytes: Vec<u8>) -> Result<String, ArrayParseError> {
        // Only ASCII bytes are ever removed from valid UTF-8 input, so this cannot fail for a
        // `&str` source; kept as an error rather than a panic all the same.
        String::from_utf8(bytes).map_err(|_| self.err("invalid UTF-8"))
    }
}

/// `array_isspace` in PostgreSQL: space, tab, newline, carriage return, vertical tab, form feed.
fn is_array_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

#[cfg(test)]
mod tests {
    use super::oid::*;
    use super::*;
    use chrono::Datelike;
    use proptest::prelude::*;
    use serde_json::json;

    fn j(oid: u32, text: &str) -> Value {
        text_to_json(oid, text)
    }

    #[test]
    fn booleans() {
        assert_eq!(j(BOOL, "t"), json!(true));
        assert_eq!(j(BOOL, "f"), json!(false));
        assert_eq!(j(BOOL, "maybe"), json!("maybe"));
    }

    #[test]
    fn integers() {
        assert_eq!(j(INT2, "-32768"), json!(-32768));
        assert_eq!(j(INT4, "2147483647"), json!(2147483647));
        assert_eq!(j(INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(j(INT8, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(j(OID, "4294967295"), json!(4294967295u32));
        assert_eq!(j(INT4, "x1"), json!("x1"));
    }

    #[test]
    fn floats() {
        assert_eq!(j(FLOAT8, "1.5"), json!(1.5));
        assert_eq!(j(FLOAT8, "1e+300"), json!(1e300));
        assert_eq!(j(FLOAT4, "1.5e-07"), json!(1.5e-7));
        assert_eq!(j(FLOAT4, "0.1"), json!(0.1));
        assert_eq!(j(FLOAT8, "-0"), json!(-0.0));
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(j(FLOAT4, special), json!(special));
            assert_eq!(j(FLOAT8, special), json!(special));
        }
    }

    #[test]
    fn numeric_and_money_stay_strings() {
        assert_eq!(j(NUMERIC, "12.50"), json!("12.50"));
        assert_eq!(
            j(NUMERIC, "123456789012345678901234567890.000000000001"),
            json!("123456789012345678901234567890.000000000001")
        );
        assert_eq!(j(NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(j(NUMERIC, "Infinity"), json!("Infinity"));
        assert_eq!(j(MONEY, "$12.34"), json!("$12.34"));
    }

    #[test]
    fn strings() {
        assert_eq!(j(TEXT, "hello"), json!("hello"));
        assert_eq!(j(TEXT, ""), json!(""));
        assert_eq!(j(VARCHAR, "v"), json!("v"));
        assert_eq!(j(BPCHAR, "a  "), json!("a  "));
        assert_eq!(
            j(UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(j(XML, "<a>1</a>"), json!("<a>1</a>"));
        assert_eq!(j(TIME, "12:34:56.789"), json!("12:34:56.789"));
        assert_eq!(j(TIMETZ, "12:34:56+05:30"), json!("12:34:56+05:30"));
        assert_eq!(j(INTERVAL, "1 day 02:03:04"), json!("1 day 02:03:04"));
        assert_eq!(j(CHAR, "x"), json!("x"));
        assert_eq!(j(NAME, "pg_class"), json!("pg_class"));
        // Unknown (e.g. enum) types.
        assert_eq!(j(32055, "happy"), json!("happy"));
        assert_eq!(j(32055, "{a,b}"), json!("{a,b}"));
    }

    #[test]
    fn json_types_embed() {
        assert_eq!(
            j(JSONB, r#"{"a": 1, "b": [true, null]}"#),
            json!({"a": 1, "b": [true, null]})
        );
        assert_eq!(
            j(JSON, r#"{"a":1,  "b" : [1,2]}"#),
            json!({"a": 1, "b": [1, 2]})
        );
        assert_eq!(j(JSONB, "\"s\""), json!("s"));
        assert_eq!(j(JSONB, "3"), json!(3));
        assert_eq!(j(JSON, "{not json"), json!("{not json"));
    }

    #[test]
    fn dates() {
        assert_eq!(j(DATE, "2024-01-02"), json!("2024-01-02"));
        assert_eq!(j(DATE, "infinity"), json!("infinity"));
        assert_eq!(j(DATE, "-infinity"), json!("-infinity"));
        assert_eq!(j(DATE, "0044-03-15 BC"), json!("-0043-03-15"));
        assert_eq!(j(DATE, "0001-01-01 BC"), json!("0000-01-01"));
        assert_eq!(j(DATE, "10000-01-01"), json!("+10000-01-01"));
        // Beyond chrono's range (PostgreSQL allows up to 5874897 AD): kept as text.
        assert_eq!(j(DATE, "5874897-12-31"), json!("5874897-12-31"));
        assert_eq!(j(DATE, "2024-02-30"), json!("2024-02-30"));
        assert_eq!(j(DATE, "01-02-2024"), json!("01-02-2024"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            j(TIMESTAMP, "2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05")
        );
        assert_eq!(
            j(TIMESTAMP, "2024-01-02 03:04:05.123456"),
            json!("2024-01-02T03:04:05.123456")
        );
        assert_eq!(
            j(TIMESTAMP, "2024-01-02 03:04:05.5"),
            json!("2024-01-02T03:04:05.500000")
        );
        assert_eq!(
            j(TIMESTAMP, "2000-01-01 00:00:00.000001"),
            json!("2000-01-01T00:00:00.000001")
        );
        assert_eq!(
            j(TIMESTAMP, "0044-03-15 12:00:00 BC"),
            json!("-0043-03-15T12:00:00")
        );
        assert_eq!(
            j(TIMESTAMP, "294276-12-31 23:59:59.999999"),
            json!("294276-12-31 23:59:59.999999")
        );
        assert_eq!(j(TIMESTAMP, "infinity"), json!("infinity"));
        assert_eq!(j(TIMESTAMP, "-infinity"), json!("-infinity"));
        // Non-ISO DateStyle output is kept verbatim.
        assert_eq!(
            j(TIMESTAMP, "Tue Jan 02 03:04:05 2024"),
            json!("Tue Jan 02 03:04:05 2024")
        );
    }

    #[test]
    fn timestamptz_to_utc() {
        assert_eq!(
            j(TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            j(TIMESTAMPTZ, "2024-01-02 03:04:05+05:30"),
            json!("2024-01-01T21:34:05Z")
        );
        assert_eq!(
            j(TIMESTAMPTZ, "2024-06-30 23:59:59.5-07"),
            json!("2024-07-01T06:59:59.500000Z")
        );
        // Local mean time offsets carry seconds.
        assert_eq!(
            j(TIMESTAMPTZ, "0044-03-15 12:00:00+05:53:28 BC"),
            json!("-0043-03-15T06:06:32Z")
        );
        assert_eq!(
            j(TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"),
            json!("-0043-03-15T12:00:00Z")
        );
        assert_eq!(
            j(TIMESTAMPTZ, "2024-12-31 23:30:00-01"),
            json!("2025-01-01T00:30:00Z")
        );
        assert_eq!(j(TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(j(TIMESTAMPTZ, "-infinity"), json!("-infinity"));
        assert_eq!(
            j(TIMESTAMPTZ, "2024-01-02 03:04:05"),
            json!("2024-01-02 03:04:05")
        );
        assert_eq!(
            j(TIMESTAMPTZ, "2024-01-02 03:04:05+5:3x"),
            json!("2024-01-02 03:04:05+5:3x")
        );
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("+00"), Some(0));
        assert_eq!(parse_offset("-07"), Some(-7 * 3600));
        assert_eq!(parse_offset("+05:30"), Some(5 * 3600 + 30 * 60));
        assert_eq!(parse_offset("+0530"), Some(5 * 3600 + 30 * 60));
        assert_eq!(parse_offset("-00:25:21"), Some(-(25 * 60 + 21)));
        assert_eq!(parse_offset("+05:60"), None);
        assert_eq!(parse_offset("05"), None);
        assert_eq!(parse_offset("+"), None);
    }

    #[test]
    fn bytea_to_base64() {
        assert_eq!(j(BYTEA, "\\x0102ff"), json!("AQL/"));
        assert_eq!(j(BYTEA, "\\x"), json!(""));
        assert_eq!(j(BYTEA, "\\x00"), json!("AA=="));
        // bytea_output = escape
        assert_eq!(j(BYTEA, "\\000\\001\\\\'\\377A"), json!("AAFcJ/9B"));
        assert_eq!(j(BYTEA, "\\xzz"), json!("\\xzz"));
        assert_eq!(j(BYTEA, "\\9"), json!("\\9"));
    }

    #[test]
    fn arrays_of_every_listed_type() {
        assert_eq!(j(BOOL_ARRAY, "{t,f,NULL}"), json!([true, false, null]));
        assert_eq!(j(INT2_ARRAY, "{1,-2}"), json!([1, -2]));
        assert_eq!(j(INT4_ARRAY, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(j(INT8_ARRAY, "{9223372036854775807}"), json!([i64::MAX]));
        assert_eq!(
            j(
                TEXT_ARRAY,
                r#"{"a b","c\"d",NULL,"NULL","","x\\y","{}",","}"#
            ),
            json!(["a b", "c\"d", null, "NULL", "", "x\\y", "{}", ","])
        );
        assert_eq!(j(VARCHAR_ARRAY, "{a,b}"), json!(["a", "b"]));
        assert_eq!(j(BPCHAR_ARRAY, r#"{"a  "}"#), json!(["a  "]));
        assert_eq!(
            j(FLOAT4_ARRAY, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(j(FLOAT8_ARRAY, "{1e+300,0.25}"), json!([1e300, 0.25]));
        assert_eq!(
            j(TIMESTAMP_ARRAY, r#"{"2024-01-01 00:00:00.25"}"#),
            json!(["2024-01-01T00:00:00.250000"])
        );
        assert_eq!(
            j(TIMESTAMPTZ_ARRAY, r#"{"2024-01-01 00:00:00+01",NULL}"#),
            json!(["2023-12-31T23:00:00Z", null])
        );
        assert_eq!(
            j(NUMERIC_ARRAY, "{1.10,NaN,NULL}"),
            json!(["1.10", "NaN", null])
        );
        assert_eq!(
            j(UUID_ARRAY, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])
        );
        assert_eq!(
            j(JSONB_ARRAY, r#"{"{\"a\": 1}","[1, 2]"}"#),
            json!([{"a": 1}, [1, 2]])
        );
        assert_eq!(
            j(JSON_ARRAY, r#"{"{\"a\":1,  \"b\" : [1,2]}"}"#),
            json!([{"a": 1, "b": [1, 2]}])
        );
        assert_eq!(
            j(DATE_ARRAY, r#"{2024-01-01,"0044-03-15 BC",infinity}"#),
            json!(["2024-01-01", "-0043-03-15", "infinity"])
        );
        assert_eq!(j(BYTEA_ARRAY, r#"{"\\x01",NULL}"#), json!(["AQ==", null]));
        assert_eq!(j(TEXT_ARRAY, "{}"), json!([]));
    }

    #[test]
    fn array_syntax() {
        assert_eq!(
            j(TEXT_ARRAY, r#"{{a,b},{NULL,d}}"#),
            json!([["a", "b"], [null, "d"]])
        );
        assert_eq!(j(INT4_ARRAY, "[2:3]={1,2}"), json!([1, 2]));
        assert_eq!(
            j(INT4_ARRAY, "[0:1][1:2]={{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        // Whitespace around elements, escapes in unquoted elements, escaped NULL.
        assert_eq!(
            j(TEXT_ARRAY, r#"{ a , "b" ,c\ d, N\ULL, null , x\  }"#),
            json!(["a", "b", "c d", "NULL", null, "x "])
        );
        assert_eq!(
            j(TEXT_ARRAY, "{\" lead\",\"trail \",\"tab\t\",\"nl\n\"}"),
            json!([" lead", "trail ", "tab\t", "nl\n"])
        );
        assert_eq!(j(TEXT_ARRAY, "{\"ünï\",€}"), json!(["ünï", "€"]));
        // Malformed literals are kept as text.
        for bad in [
            "",
            "{",
            "}",
            "{a",
            "{a,}",
            "{,a}",
            "{\"a}",
            "{a}x",
            "{a\"b}",
            "[1:2]{1,2}",
            "{a\\",
            "{{{{{{{1}}}}}}}",
        ] {
            assert_eq!(j(TEXT_ARRAY, bad), json!(bad), "{bad:?}");
        }
    }

    #[test]
    fn array_parse_errors_have_offsets() {
        assert_eq!(
            parse_array("{a,}"),
            Err(ArrayParseError {
                offset: 3,
                reason: "empty element"
            })
        );
        assert_eq!(
            parse_array("{a}x").unwrap_err().to_string(),
            "malformed array literal at byte 3: junk after closing '}'"
        );
    }

    /// Formats strings the way PostgreSQL's `array_out` does.
    fn pg_format_element(s: &str) -> String {
        let needs_quotes = s.is_empty()
            || s.eq_ignore_ascii_case("NULL")
            || s.bytes()
                .any(|c| matches!(c, b'"' | b'\\' | b'{' | b'}' | b',') || is_array_space(c));
        if !needs_quotes {
            return s.to_owned();
        }
        let mut out = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    fn pg_format(items: &[Option<String>]) -> String {
        let parts: Vec<String> = items
            .iter()
            .map(|i| match i {
                None => "NULL".to_owned(),
                Some(s) => pg_format_element(s),
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    #[test]
    fn formatter_matches_postgres() {
        // Output of: select array['a b','c"d',null,'NULL','','x\y','{}',',']::text[];
        let items = ["a b", "c\"d", "", "NULL", "", "x\\y", "{}", ","]
            .iter()
            .enumerate()
            .map(|(i, s)| (i != 2).then(|| s.to_string()))
            .collect::<Vec<_>>();
        assert_eq!(
            pg_format(&items),
            r#"{"a b","c\"d",NULL,"NULL","","x\\y","{}",","}"#
        );
    }

    proptest! {
        #[test]
        fn formatted_arrays_parse_back(items in proptest::collection::vec(
            proptest::option::of(any::<String>()), 0..8)) {
            let text = pg_format(&items);
            let parsed = parse_array(&text).expect("formatted array parses");
            let expected: Vec<ArrayItem> = items
                .iter()
                .map(|i| match i {
                    None => ArrayItem::Null,
                    Some(s) => ArrayItem::Value(s.clone()),
                })
                .collect();
            prop_assert_eq!(parsed, expected);
            let json = text_to_json(TEXT_ARRAY, &text);
            let expected_json: Vec<Value> = items
                .iter()
                .map(|i| i.clone().map_or(Value::Null, Value::String))
                .collect();
            prop_assert_eq!(json, Value::Array(expected_json));
        }

        #[test]
        fn nested_formatted_arrays_parse_back(rows in proptest::collection::vec(
            proptest::collection::vec(proptest::option::of("[ -~]{0,6}"), 2), 1..4)) {
            let text = format!(
                "{{{}}}",
                rows.iter().map(|r| pg_format(r)).collect::<Vec<_>>().join(",")
            );
            let parsed = parse_array(&text).expect("nested array parses");
            prop_assert_eq!(parsed.len(), rows.len());
            for (p, r) in parsed.iter().zip(&rows) {
                let expected: Vec<ArrayItem> = r
                    .iter()
                    .map(|i| i.clone().map_or(ArrayItem::Null, ArrayItem::Value))
                    .collect();
                prop_assert_eq!(p, &ArrayItem::Array(expected));
            }
        }

        #[test]
        fn arbitrary_text_never_panics(oid in proptest::sample::select(vec![
            BOOL, BYTEA, INT2, INT4, INT8, OID, FLOAT4, FLOAT8, NUMERIC, JSON, JSONB, DATE,
            TIMESTAMP, TIMESTAMPTZ, TEXT_ARRAY, INT4_ARRAY, TIMESTAMPTZ_ARRAY, BYTEA_ARRAY,
        ]), text in "\\PC{0,40}") {
            let _ = text_to_json(oid, &text);
        }

        #[test]
        fn timestamptz_roundtrip(secs in -100_000_000_000i64..250_000_000_000i64,
                                 micros in 0u32..1_000_000,
                                 offset_min in -15 * 60i64..15 * 60) {
            let utc = chrono::DateTime::from_timestamp(secs, micros * 1000).unwrap().naive_utc();
            let local = utc + TimeDelta::minutes(offset_min);
            let sign = if offset_min < 0 { '-' } else { '+' };
            let abs = offset_min.abs();
            let (ce, year) = local.year_ce();
            let bc = !ce;
            let frac = if micros == 0 { String::new() } else { format!(".{micros:06}") };
            let text = format!(
                "{year:04}-{}{frac}{sign}{:02}:{:02}{}",
                local.format("%m-%d %H:%M:%S"),
                abs / 60,
                abs % 60,
                if bc { " BC" } else { "" },
            );
            let expected = format!("{}Z", format_datetime(utc));
            prop_assert_eq!(text_to_json(TIMESTAMPTZ, &text), Value::String(expected));
        }
    }
}
