//! The JSON Schemas of `schemas/kafka/` and the message reference `docs/topics.md` against what
//! membersync really produces.
//!
//! There is no JSON Schema crate among the dependencies, so a small checker below evaluates the
//! keywords the schemas use (`type`, `const`, `enum`, `required`, `properties`,
//! `additionalProperties`, `items`, `uniqueItems`, `minLength`/`maxLength`,
//! `minimum`/`maximum`, `pattern` for the tiny regex subset the schemas use, `format:
//! date-time`, `$ref` to `#/$defs/…`, `allOf`/`anyOf`/`oneOf`/`not`, `if`/`then`/`else`) and
//! refuses any other keyword, so a schema cannot silently outgrow it.
//!
//! What is checked:
//! - each schema file: draft 2020-12, an object schema with `properties`, `required` (all of
//!   them declared), `additionalProperties: false`, and its `examples` valid;
//! - records built by the crate's own builders (`ingest::envelope::memberstack` / `stripe`
//!   from parsed bodies, `cdc::envelope::Envelope::to_vec`) for every shape the code can
//!   produce, their keys, and their headers against the header table of `docs/topics.md`;
//! - every example value in `docs/topics.md`;
//! - records a running `membersync ingest` / `membersync cdc` really put on the local broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::Utc;
use membersync::cdc::envelope::{self as cdc, Envelope, Op, Source, Transaction, UNCHANGED_TOAST};
use membersync::ingest::envelope::{self as ingest, IngestRecord};
use membersync::ingest::event::{parse_memberstack, parse_stripe};
use membersync::ingest::verify::stripe::StripeVerifier;
use membersync::ingest::verify::svix::SvixVerifier;
use rdkafka::Message;
use secrecy::SecretString;
use serde_json::{Map, Value, json};

use crate::support::{self, TestDb, daemon::Daemon, repo_root};

// ------------------------------------------------------------------------------------------
// The schemas and the docs
// ------------------------------------------------------------------------------------------

const SCHEMAS: [&str; 3] = ["memberstack", "stripe", "cdc"];

fn schema(name: &str) -> Value {
    let path = repo_root().join(format!("schemas/kafka/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn topics_md() -> String {
    std::fs::read_to_string(repo_root().join("docs/topics.md")).expect("docs/topics.md")
}

/// Header names of the table under `## Headers` in docs/topics.md.
fn documented_headers() -> BTreeSet<String> {
    let doc = topics_md();
    let section = doc
        .split("\n## Headers")
        .nth(1)
        .expect("docs/topics.md has a `## Headers` section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// `(schema name, JSON)` of every ```json block in docs/topics.md marked `<!-- value: NAME -->`.
fn documented_examples() -> Vec<(String, Value)> {
    let doc = topics_md();
    let mut out = Vec::new();
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("<!-- value: ") {
        rest = &rest[i + "<!-- value: ".len()..];
        let name = rest[..rest.find(" -->").expect("marker closes")].to_owned();
        let start = rest
            .find("```json\n")
            .expect("a ```json block follows the marker")
            + 8;
        let end = start + rest[start..].find("\n```").expect("the block closes");
        let value = serde_json::from_str(&rest[start..end])
            .unwrap_or_else(|e| panic!("docs/topics.md example for {name} is not JSON: {e}"));
        out.push((name, value));
        rest = &rest[end..];
    }
    out
}

// ------------------------------------------------------------------------------------------
// A small JSON Schema checker
// ------------------------------------------------------------------------------------------

/// Keywords that carry no assertion (annotations, and structure handled elsewhere).
const ANNOTATIONS: [&str; 7] = [
    "$schema",
    "$id",
    "$defs",
    "$comment",
    "title",
    "description",
    "examples",
];
const ASSERTIONS: [&str; 21] = [
    "$ref",
    "type",
    "const",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "uniqueItems",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "pattern",
    "format",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
];

/// The errors of `value` against the schema document `root` (empty: valid).
fn check(root: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate(root, root, value, "$", &mut errors);
    errors
}

fn is_valid(root: &Value, schema: &Value, value: &Value) -> bool {
    let mut errors = Vec::new();
    validate(root, schema, value, "$", &mut errors);
    errors.is_empty()
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => panic!("unknown JSON type {other:?} in a schema"),
    }
}

fn validate(root: &Value, schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    let s = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => return errors.push(format!("{path}: not allowed")),
        Value::Object(s) => s,
        other => panic!("{path}: a schema must be an object or a boolean, found {other}"),
    };
    for key in s.keys() {
        assert!(
            ANNOTATIONS.contains(&key.as_str())
                || ASSERTIONS.contains(&key.as_str())
                || key == "else",
            "{path}: the test's checker does not know the keyword {key:?}; teach it"
        );
    }
    if let Some(r) = s.get("$ref") {
        let r = r.as_str().expect("$ref is a string");
        let target = r
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
            .unwrap_or_else(|| panic!("{path}: cannot resolve $ref {r}"));
        validate(root, target, v, path, errors);
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().map(|t| t.as_str().expect("type names")).collect(),
            other => panic!("{path}: bad type keyword {other}"),
        };
        if !types.iter().any(|t| type_matches(t, v)) {
            // Every other keyword would only repeat the problem.
            return errors.push(format!(
                "{path}: expected {}, found {}",
                types.join(" or "),
                short(v)
            ));
        }
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        errors.push(format!("{path}: expected {c}, found {}", short(v)));
    }
    if let Some(e) = s.get("enum")
        && !e.as_array().expect("enum is an array").contains(v)
    {
        errors.push(format!("{path}: {} is not one of {e}", short(v)));
    }
    match v {
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                errors.push(format!("{path}: shorter than {min} characters"));
            }
            if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                errors.push(format!("{path}: longer than {max} characters"));
            }
            if let Some(p) = s.get("pattern") {
                let p = p.as_str().expect("pattern is a string");
                if !pattern_matches(p, text) {
                    errors.push(format!("{path}: {} does not match {p}", short(v)));
                }
            }
            match s.get("format").and_then(Value::as_str) {
                Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => {
                    errors.push(format!("{path}: {} is not an RFC 3339 date-time", short(v)));
                }
                Some("date-time") => {}
                Some(other) => panic!("{path}: the checker does not know format {other:?}"),
                None => {}
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap();
            if let Some(min) = s.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                errors.push(format!("{path}: {n} is below {min}"));
            }
            if let Some(max) = s.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                errors.push(format!("{path}: {n} is above {max}"));
            }
        }
        Value::Object(obj) => {
            if let Some(required) = s.get("required") {
                for name in required.as_array().expect("required is an array") {
                    let name = name.as_str().expect("required names");
                    if !obj.contains_key(name) {
                        errors.push(format!("{path}: required property {name:?} is missing"));
                    }
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (name, value) in obj {
                let sub_path = format!("{path}.{name}");
                match props.and_then(|p| p.get(name)) {
                    Some(sub) => validate(root, sub, value, &sub_path, errors),
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            errors.push(format!("{path}: property {name:?} is not in the schema"))
                        }
                        Some(extra) => validate(root, extra, value, &sub_path, errors),
                        None => {}
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(root, item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
            if s.get("uniqueItems") == Some(&Value::Bool(true)) {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        errors.push(format!("{path}: {} appears twice", short(item)));
                    }
                }
            }
        }
        _ => {}
    }
    if let Some(all) = s.get("allOf") {
        for sub in all.as_array().expect("allOf is an array") {
            validate(root, sub, v, path, errors);
        }
    }
    if let Some(any) = s.get("anyOf")
        && !any
            .as_array()
            .unwrap()
            .iter()
            .any(|sub| is_valid(root, sub, v))
    {
        errors.push(format!("{path}: matches none of anyOf"));
    }
    if let Some(one) = s.get("oneOf") {
        let mut last = Vec::new();
        let mut matching = 0;
        for sub in one.as_array().unwrap() {
            let mut e = Vec::new();
            validate(root, sub, v, path, &mut e);
            if e.is_empty() {
                matching += 1;
            } else {
                last = e;
            }
        }
        if matching != 1 {
            errors.push(format!(
                "{path}: matches {matching} of oneOf (one must match): {last:?}"
            ));
        }
    }
    if let Some(not) = s.get("not")
        && is_valid(root, not, v)
    {
        errors.push(format!("{path}: matches `not`"));
    }
    if let Some(cond) = s.get("if") {
        let branch = if is_valid(root, cond, v) {
            s.get("then")
        } else {
            s.get("else")
        };
        if let Some(branch) = branch {
            validate(root, branch, v, path, errors);
        }
    }
}

/// `pattern` for the subset the schemas use: anchored (`^…$`), atoms `\S`, `\d`, `[…]` with
/// ranges, or a literal, each optionally followed by `+`.
fn pattern_matches(pattern: &str, text: &str) -> bool {
    #[derive(Debug)]
    enum Atom {
        Lit(char),
        NonSpace,
        Digit,
        Class(Vec<(char, char)>),
    }
    let inner = pattern
        .strip_prefix('^')
        .and_then(|p| p.strip_suffix('$'))
        .unwrap_or_else(|| panic!("pattern {pattern:?}: the checker needs ^…$"));
    let mut atoms: Vec<(Atom, bool)> = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        let atom = match c {
            '\\' => match chars.next() {
                Some('S') => Atom::NonSpace,
                Some('d') => Atom::Digit,
                Some(c) if c.is_ascii_punctuation() => Atom::Lit(c),
                other => panic!("pattern {pattern:?}: unsupported escape {other:?}"),
            },
            '[' => {
                let mut ranges = Vec::new();
                loop {
                    let lo = chars.next().expect("class closes");
                    if lo == ']' {
                        break;
                    }
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        ranges.push((lo, chars.next().expect("range end")));
                    } else {
                        ranges.push((lo, lo));
                    }
                }
                Atom::Class(ranges)
            }
            '.' | '*' | '?' | '(' | ')' | '|' | '{' | '}' | '+' | '^' | '$' => {
                panic!("pattern {pattern:?}: the checker does not support {c:?}")
            }
            c => Atom::Lit(c),
        };
        let plus = chars.peek() == Some(&'+');
        if plus {
            chars.next();
        }
        atoms.push((atom, plus));
    }
    fn one(atom: &Atom, c: char) -> bool {
        match atom {
            Atom::Lit(l) => *l == c,
            Atom::NonSpace => !c.is_whitespace(),
            Atom::Digit => c.is_ascii_digit(),
            Atom::Class(ranges) => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)),
        }
    }
    fn go(atoms: &[(Atom, bool)], text: &[char]) -> bool {
        let Some(((atom, plus), rest)) = atoms.split_first() else {
            return text.is_empty();
        };
        if !*plus {
            return text.first().is_some_and(|c| one(atom, *c)) && go(rest, &text[1..]);
        }
        let run = text.iter().take_while(|c| one(atom, **c)).count();
        (1..=run).rev().any(|n| go(rest, &text[n..]))
    }
    go(&atoms, &text.chars().collect::<Vec<_>>())
}

pub(crate) fn assert_valid(name: &str, value: &Value, what: &str) {
    let errors = check(&schema(name), value);
    assert!(
        errors.is_empty(),
        "{what} does not match schemas/kafka/{name}.json:\n  {}\nvalue: {}",
        errors.join("\n  "),
        serde_json::to_string_pretty(value).unwrap()
    );
    if name == "cdc" {
        check_cdc_cross_fields(value, what);
    }
}

/// What the CDC schema states in prose: `transaction.id` is `"<source.txId>:<source.lsn>"`
/// (both the commit LSN), and `unchanged_columns` name the `after` columns holding the marker.
fn check_cdc_cross_fields(v: &Value, what: &str) {
    if let Some(tx) = v["transaction"].as_object() {
        assert_eq!(
            tx["id"].as_str().unwrap(),
            format!("{}:{}", v["source"]["txId"], v["source"]["lsn"]),
            "{what}: transaction.id is \"<txId>:<lsn>\""
        );
    }
    let marked: Vec<&str> = v["after"]
        .as_object()
        .map(|after| {
            after
                .iter()
                .filter(|(_, value)| value.as_str() == Some(UNCHANGED_TOAST))
                .map(|(k, _)| k.as_str())
                .collect()
        })
        .unwrap_or_default();
    let listed: Vec<&str> = v["source"]["unchanged_columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort_unstable();
    assert_eq!(
        marked, listed_sorted,
        "{what}: unchanged_columns lists exactly the marked columns of after"
    );
}

// ------------------------------------------------------------------------------------------
// Ingest records: value, key and headers
// ------------------------------------------------------------------------------------------

/// Checks one webhook-topic record against its schema, the key rule and the header table;
/// returns the header names it carried.
fn check_ingest_record(
    source: &str,
    key: &[u8],
    headers: &[(String, String)],
    value: &[u8],
) -> BTreeSet<String> {
    let v: Value = serde_json::from_slice(value).expect("the value is JSON");
    assert_valid(source, &v, &format!("a {source} record"));
    let h: BTreeMap<&str, &str> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(h.len(), headers.len(), "no header is repeated: {headers:?}");
    let documented = documented_headers();
    for name in h.keys() {
        assert!(
            documented.contains(*name),
            "header {name:?} is not in docs/topics.md#headers"
        );
    }
    let key = std::str::from_utf8(key).expect("the key is UTF-8");
    let id = v["id"].as_str().unwrap();
    let event_type = v["type"].as_str().unwrap();
    let expected = [
        ("membersync_event_id", id.to_owned()),
        ("membersync_event_type", event_type.to_owned()),
        ("membersync_source", source.to_owned()),
        ("content-type", "application/json".to_owned()),
        ("ce_specversion", "1.0".to_owned()),
        ("ce_id", id.to_owned()),
        ("ce_type", format!("{source}.{event_type}")),
        ("ce_source", format!("/membersync/ingest/{source}")),
        ("ce_time", v["occurred_at"].as_str().unwrap().to_owned()),
    ];
    for (name, value) in &expected {
        assert_eq!(h.get(name).copied(), Some(value.as_str()), "header {name}");
    }
    assert_eq!(
        h.get("membersync_member_id").copied(),
        v["member_id"].as_str(),
        "membersync_member_id is the member id, when known"
    );
    let needs_lookup = v["needs_lookup"].as_bool().unwrap();
    assert_eq!(
        h.get("membersync_needs_lookup").copied(),
        needs_lookup.then_some("true")
    );
    assert_eq!(
        h.get("membersync_unknown_event").copied(),
        (v["kind"] == "unknown").then_some("true")
    );
    if needs_lookup {
        assert_eq!(
            Some(key),
            v["customer_id"].as_str(),
            "a needs_lookup record is keyed by customer id"
        );
    } else {
        assert_eq!(Some(key), v["member_id"].as_str(), "keyed by member id");
    }
    h.keys().map(|k| k.to_string()).collect()
}

fn check_built(source: &str, record: &IngestRecord) -> BTreeSet<String> {
    let headers: Vec<(String, String)> = record
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let v: Value = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(record.event_id, v["id"].as_str().unwrap());
    check_ingest_record(source, record.key.as_bytes(), &headers, &record.value)
}

fn memberstack_bodies() -> Vec<Value> {
    vec![
        json!({"event": "member.created", "timestamp": 1_715_678_467_512_i64,
               "payload": {"id": "mem_a", "auth": {"email": "a@example.com"}, "customFields": {"x": 1}}}),
        // Help Center shape: `data` instead of `payload`, `type` instead of `event`, no timestamp.
        json!({"type": "member.updated", "data": {"id": "mem_b", "metaData": {}}}),
        // Timestamp in seconds and as a digit string; British spelling of a plan event.
        json!({"event": "member.plan.cancelled", "timestamp": 1_715_678_467_i64, "payload": {"id": "mem_c", "planConnection": {"planId": "pln_1"}}}),
        json!({"event": "member.plan.added", "timestamp": "1715678467512", "payload": {"id": "mem_d"}}),
        json!({"event": "member.deleted", "timestamp": 1_715_678_467_512.9_f64, "payload": {"id": "mem_e"}}),
        // Team events name the member in memberId.
        json!({"event": "team.member.added", "payload": {"memberId": "mem_f", "ownerId": "mem_o", "teamId": "team_1"}}),
        json!({"event": "team.member.removed", "payload": {"id": "tm_1", "memberId": "mem_g"}}),
        json!({"event": "member.planConnection.updated", "timestamp": null, "payload": {"id": "mem_h"}}),
        // Unknown names are accepted (kind: unknown, header membersync_unknown_event).
        json!({"event": "member.plan.replaced", "payload": {"id": "mem_i"}}),
    ]
}

fn stripe_bodies() -> Vec<Value> {
    let sub = |metadata: Value, customer: Value| {
        json!({"id": "evt_1", "object": "event", "api_version": "2024-04-10", "created": 1_715_679_011,
               "livemode": false, "type": "customer.subscription.updated",
               "data": {"object": {"id": "sub_1", "object": "subscription", "customer": customer, "status": "active",
                                   "metadata": metadata,
                                   "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": "price_1"}}]}},
                        "previous_attributes": {"status": "trialing"}}})
    };
    vec![
        // Member id in metadata: keyed by member, customer id filled in too.
        sub(json!({"memberstack_user_id": "mem_a"}), json!("cus_1")),
        // No metadata, expanded customer: keyed by customer, needs_lookup.
        sub(json!({}), json!({"id": "cus_2", "object": "customer"})),
        // An unusable metadata value falls back to the customer.
        sub(
            json!({"memberstack_user_id": "mem with space"}),
            json!("cus_3"),
        ),
        // A customer object is its own customer; no `created`.
        json!({"id": "evt_2", "type": "customer.updated", "data": {"object": {"id": "cus_4", "object": "customer", "metadata": {}}}}),
        // Member metadata and no customer at all.
        json!({"id": "evt_3", "type": "checkout.session.completed", "created": 1_715_679_011,
               "data": {"object": {"id": "cs_1", "object": "checkout.session", "metadata": {"memberstack_user_id": "mem_b"}}}}),
        json!({"id": "evt_4", "type": "invoice.payment_failed", "created": 1_715_680_965,
               "data": {"object": {"id": "in_1", "object": "invoice", "customer": "cus_5", "metadata": {}}}}),
    ]
}

// ------------------------------------------------------------------------------------------
// CDC envelopes as the stream and the snapshot build them
// ------------------------------------------------------------------------------------------

fn members_row(id: &str, memberstack_id: Option<&str>) -> Map<String, Value> {
    json!({
        "id": id, "user_id": null, "memberstack_id": memberstack_id, "email": "a@example.com",
        "subscription_status": "active", "subscription_status_raw": "ACTIVE", "plan_id": "pln_1",
        "custom_fields": {"a": 1}, "project_data": {"big": "x"}, "usage_stats": {},
        "deleted_at": null, "created_at": "2024-05-14T09:21:07.512345Z",
        "updated_at": "2024-05-14T09:21:07.512345Z", "last_synced_at": null
    })
    .as_object()
    .unwrap()
    .clone()
}

fn streamed<'a>(
    op: Op,
    before: Option<&'a Map<String, Value>>,
    after: Option<&'a Map<String, Value>>,
    origin: Option<&'a str>,
    unchanged: &'a [String],
) -> Envelope<'a> {
    Envelope {
        before,
        after,
        source: Source {
            version: membersync::telemetry::BUILD_VERSION,
            connector: "membersync",
            name: "membersync",
            ts_ms: 1_715_678_469_004,
            snapshot: "false",
            db: "postgres",
            schema: "public",
            table: "members",
            tx_id: Some(u32::MAX),
            lsn: u64::from(u32::MAX) * 7 + 3,
            origin,
            unchanged_columns: unchanged,
        },
        op,
        ts_ms: cdc::now_ms(),
        transaction: Some(Transaction {
            id: format!("{}:{}", u32::MAX, u64::from(u32::MAX) * 7 + 3),
            total_order: 2,
            data_collection_order: 1,
        }),
    }
}

// ------------------------------------------------------------------------------------------
// Tests without services
// ------------------------------------------------------------------------------------------

#[test]
fn schema_files_are_draft_2020_12_object_schemas_whose_examples_are_valid() {
    let dir = repo_root().join("schemas/kafka");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = SCHEMAS.iter().map(|n| format!("{n}.json")).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "every schema in schemas/kafka/ is tested here"
    );
    for name in SCHEMAS {
        let s = schema(name);
        assert_eq!(
            s["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        assert_eq!(s["type"], "object", "{name}");
        assert_eq!(
            s["additionalProperties"], false,
            "{name}: the envelope is closed"
        );
        let props = s["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: properties"));
        let required = s["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: required"));
        assert!(!required.is_empty(), "{name}");
        for r in required {
            assert!(
                props.contains_key(r.as_str().unwrap()),
                "{name}: required {r} is not declared"
            );
        }
        for (prop, sub) in props {
            assert!(
                sub.get("description").is_some(),
                "{name}: property {prop} is documented"
            );
        }
        let examples = s["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: examples"));
        assert!(!examples.is_empty(), "{name}");
        for (i, example) in examples.iter().enumerate() {
            assert_valid(name, example, &format!("example {i} of {name}.json"));
        }
    }
}

#[test]
fn the_checker_rejects_what_the_schemas_forbid() {
    let ms = schema("memberstack");
    let good = ms["examples"][0].clone();
    assert!(check(&ms, &good).is_empty());
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        check(&ms, &v)
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "missing required",
            broken(&|v| {
                v.as_object_mut().unwrap().remove("member_id");
            }),
        ),
        (
            "wrong type",
            broken(&|v| v["needs_lookup"] = json!("false")),
        ),
        ("const", broken(&|v| v["schema_version"] = json!(2))),
        ("enum", broken(&|v| v["kind"] = json!("member_exploded"))),
        ("source enum", broken(&|v| v["source"] = json!("stripe"))),
        (
            "extra property",
            broken(&|v| v["customer_id"] = json!("cus_1")),
        ),
        (
            "date-time",
            broken(&|v| v["signed_at"] = json!("yesterday")),
        ),
        ("pattern", broken(&|v| v["id"] = json!("msg 1"))),
        (
            "nested anyOf",
            broken(&|v| {
                v["data"].as_object_mut().unwrap().remove("event");
            }),
        ),
        ("nested type", broken(&|v| v["data"]["payload"] = json!([]))),
    ];
    for (what, errors) in cases {
        assert!(!errors.is_empty(), "the checker missed: {what}");
    }
    let cdc_schema = schema("cdc");
    let good = cdc_schema["examples"][0].clone();
    let mut v = good.clone();
    v["op"] = json!("d");
    assert!(
        !check(&cdc_schema, &v).is_empty(),
        "if/then: a delete has after = null"
    );
    let mut v = good.clone();
    v["transaction"] = Value::Null;
    assert!(
        !check(&cdc_schema, &v).is_empty(),
        "a streamed event has a transaction"
    );
    let mut v = good.clone();
    v["transaction"]["id"] = json!("x:1");
    assert!(!check(&cdc_schema, &v).is_empty(), "transaction.id pattern");
    let mut v = good;
    v["source"]["txId"] = json!(-1);
    assert!(!check(&cdc_schema, &v).is_empty(), "txId minimum");
    let st = schema("stripe");
    let mut v = st["examples"][1].clone();
    v["member_id"] = json!("mem_1");
    assert!(!check(&st, &v).is_empty(), "needs_lookup ⇒ member_id null");
    v.as_object_mut().unwrap().remove("customer_id");
    v["member_id"] = Value::Null;
    assert!(!check(&st, &v).is_empty(), "needs_lookup ⇒ customer_id");
    assert!(
        pattern_matches("^[0-9]+:[0-9]+$", "12:345") && !pattern_matches("^[0-9]+:[0-9]+$", "12:")
    );
    assert!(pattern_matches("^evt_\\S+$", "evt_1") && !pattern_matches("^evt_\\S+$", "evt_"));
}

#[test]
fn memberstack_records_match_the_schema_key_rule_and_header_table() {
    let mut seen = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for (i, body) in memberstack_bodies().into_iter().enumerate() {
        let event = parse_memberstack(&serde_json::to_vec(&body).unwrap())
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        let record = ingest::memberstack(
            &format!("msg_{i}x27charsvixmessageidabc"),
            1_715_678_468,
            &event,
            Utc::now(),
        );
        assert_eq!(record.key, event.member_id);
        seen.extend(check_built("memberstack", &record));
        let v: Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(v["data"], body, "the body is carried whole");
        kinds.insert(v["kind"].as_str().unwrap().to_owned());
    }
    assert!(
        kinds.contains("unknown") && kinds.contains("team_member_added") && kinds.len() >= 7,
        "{kinds:?}"
    );
    for name in [
        "membersync_member_id",
        "membersync_unknown_event",
        "ce_time",
    ] {
        assert!(seen.contains(name), "{name} was exercised");
    }
}

#[test]
fn stripe_records_match_the_schema_key_rule_and_header_table() {
    let mut seen = BTreeSet::new();
    let (mut by_member, mut by_customer) = (0, 0);
    for body in stripe_bodies() {
        let event = parse_stripe(&serde_json::to_vec(&body).unwrap())
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        let record = ingest::stripe(1_715_679_012, &event, Utc::now()).expect("routable");
        seen.extend(check_built("stripe", &record));
        let v: Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(v["data"], body, "the body is carried whole");
        if v["needs_lookup"] == true {
            by_customer += 1
        } else {
            by_member += 1
        }
    }
    assert!(by_member >= 2 && by_customer >= 3);
    assert!(seen.contains("membersync_needs_lookup") && seen.contains("membersync_member_id"));
    // Events that name nobody are not produced at all.
    let nobody = parse_stripe(
        br#"{"id":"evt_9","type":"balance.available","data":{"object":{"object":"balance"}}}"#,
    )
    .unwrap();
    assert!(ingest::stripe(1_715_679_012, &nobody, Utc::now()).is_none());
}

#[test]
fn every_documented_header_is_produced_by_some_record() {
    let mut seen = BTreeSet::new();
    for (i, body) in memberstack_bodies().into_iter().enumerate() {
        let event = parse_memberstack(&serde_json::to_vec(&body).unwrap()).unwrap();
        seen.extend(
            ingest::memberstack(&format!("msg_{i}"), 1_715_678_468, &event, Utc::now())
                .headers
                .iter()
                .map(|h| h.0.to_owned()),
        );
    }
    for body in stripe_bodies() {
        let event = parse_stripe(&serde_json::to_vec(&body).unwrap()).unwrap();
        seen.extend(
            ingest::stripe(1, &event, Utc::now())
                .unwrap()
                .headers
                .iter()
                .map(|h| h.0.to_owned()),
        );
    }
    assert_eq!(
        documented_headers(),
        seen,
        "docs/topics.md#headers lists exactly the headers ingest sets"
    );
}

#[test]
fn cdc_envelopes_of_every_op_match_the_schema() {
    let row = members_row("5f0c6b1e-8a8e-4d59-9a57-0c1f1b8e2d41", Some("mem_a"));
    let mut toasted = row.clone();
    toasted.insert("project_data".into(), json!(UNCHANGED_TOAST));
    let unchanged = vec!["project_data".to_string()];
    // The old-key image of a delete under REPLICA IDENTITY DEFAULT: the primary key, nulls.
    let key_only: Map<String, Value> = row
        .keys()
        .map(|k| {
            (
                k.clone(),
                if k == "id" {
                    row[k].clone()
                } else {
                    Value::Null
                },
            )
        })
        .collect();
    let none: &[String] = &[];
    let snapshot = Envelope {
        before: None,
        after: Some(&row),
        source: Source {
            version: membersync::telemetry::BUILD_VERSION,
            connector: "membersync",
            name: "membersync",
            ts_ms: cdc::now_ms(),
            snapshot: "true",
            db: "postgres",
            schema: "public",
            table: "members",
            tx_id: None,
            lsn: 24_510_232,
            origin: None,
            unchanged_columns: &[],
        },
        op: Op::Read,
        ts_ms: cdc::now_ms(),
        transaction: None,
    };
    let envelopes = [
        ("snapshot read", snapshot),
        ("insert", streamed(Op::Create, None, Some(&row), None, none)),
        (
            "update by membersync",
            streamed(Op::Update, None, Some(&row), Some("membersync"), none),
        ),
        (
            "update, unchanged TOAST",
            streamed(Op::Update, None, Some(&toasted), None, &unchanged),
        ),
        (
            "update, REPLICA IDENTITY FULL",
            streamed(Op::Update, Some(&row), Some(&row), None, none),
        ),
        (
            "delete, full old row",
            streamed(Op::Delete, Some(&row), None, None, none),
        ),
        (
            "delete, old key only",
            streamed(Op::Delete, Some(&key_only), None, None, none),
        ),
        ("truncate", streamed(Op::Truncate, None, None, None, none)),
    ];
    for (what, envelope) in &envelopes {
        let v: Value = serde_json::from_slice(&envelope.to_vec()).unwrap();
        assert_valid("cdc", &v, what);
    }
    // Key rules as documented in docs/topics.md#partitioning.
    let key = |row: &Map<String, Value>, cols: &[&str]| {
        cdc::key(row, &cols.iter().map(|c| c.to_string()).collect::<Vec<_>>())
            .map(|k| String::from_utf8(k).unwrap())
    };
    assert_eq!(
        key(&row, &["memberstack_id"]).as_deref(),
        Some("mem_a"),
        "one column: bare text"
    );
    assert_eq!(
        key(&json!({"n": 7}).as_object().unwrap().clone(), &["n"]).as_deref(),
        Some("7")
    );
    assert_eq!(
        key(
            &json!({"b": "x", "a": 1}).as_object().unwrap().clone(),
            &["b", "a"]
        )
        .as_deref(),
        Some(r#"{"a":1,"b":"x"}"#),
        "several columns: a JSON object, alphabetical"
    );
    assert_eq!(
        key(&key_only, &["memberstack_id"]),
        None,
        "a NULL key column: no key"
    );
    assert_eq!(
        key(&toasted, &["project_data"]),
        None,
        "an unchanged-TOAST key column: no key"
    );
}

#[test]
fn the_examples_in_docs_topics_md_match_the_schemas() {
    let examples = documented_examples();
    for name in SCHEMAS {
        assert!(
            examples.iter().any(|(n, _)| n == name),
            "docs/topics.md has an example value for {name}"
        );
    }
    for (name, value) in &examples {
        assert!(
            SCHEMAS.contains(&name.as_str()),
            "unknown schema {name} in docs/topics.md"
        );
        assert_valid(
            name,
            value,
            &format!("the docs/topics.md example for {name}"),
        );
    }
}

// ------------------------------------------------------------------------------------------
// Real records on the local broker
// ------------------------------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn record_headers(m: &rdkafka::message::OwnedMessage) -> Vec<(String, String)> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn ingest_records_on_the_broker_match_the_schemas() {
    let secret = format!(
        "whsec_{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            uuid::Uuid::new_v4().as_bytes()
        )
    );
    let kafka = support::kafka::config();
    let env = vec![
        (
            "MEMBERSYNC__KAFKA__BROKERS".to_string(),
            kafka.brokers.clone(),
        ),
        (
            "MEMBERSYNC__KAFKA__TOPIC_PREFIX".into(),
            kafka.topic_prefix.clone(),
        ),
        (
            "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS".into(),
            secret.clone(),
        ),
        (
            "MEMBERSYNC__INGEST__STRIPE_WEBHOOK_SECRETS".into(),
            secret.clone(),
        ),
    ];
    let mut daemon = Daemon::start("ingest", env).await;
    let svix = SvixVerifier::new(&[SecretString::from(secret.clone())]).unwrap();
    let stripe = StripeVerifier::new(&[SecretString::from(secret)]).unwrap();
    let http = reqwest::Client::new();

    let ms_bodies = memberstack_bodies();
    for (i, body) in ms_bodies.iter().enumerate() {
        let body = serde_json::to_vec(body).unwrap();
        let (id, ts) = (format!("msg_schema{i}"), now());
        let resp = http
            .post(format!("{}/webhooks/memberstack", daemon.ingest))
            .header("content-type", "application/json")
            .header("svix-id", &id)
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", svix.sign(&id, ts, &body))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{}",
            resp.text().await.unwrap()
        );
    }
    let st_bodies = stripe_bodies();
    for body in &st_bodies {
        let body = serde_json::to_vec(body).unwrap();
        let ts = now();
        let resp = http
            .post(format!("{}/webhooks/stripe", daemon.ingest))
            .header("content-type", "application/json")
            .header("stripe-signature", stripe.signature_header(ts, &body))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{}",
            resp.text().await.unwrap()
        );
    }

    for (source, n) in [
        ("memberstack", ms_bodies.len()),
        ("stripe", st_bodies.len()),
    ] {
        let topic = format!("{}.{source}", kafka.topic_prefix);
        let records = support::kafka::consume(&kafka, &topic, n, Duration::from_secs(30)).await;
        for m in &records {
            check_ingest_record(
                source,
                m.key().expect("every webhook record has a key"),
                &record_headers(m),
                m.payload().unwrap(),
            );
        }
    }
    daemon.terminate().await;
}

#[tokio::test]
async fn cdc_records_on_the_broker_match_the_schema() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    admin
        .batch_execute("insert into public.members (memberstack_id, email) values ('mem_snap', 'snap@example.com')")
        .await
        .unwrap();
    let mut kafka = support::kafka::config();
    kafka.topic_partitions = 1;
    let mut env = db.env();
    env.extend([
        (
            "MEMBERSYNC__KAFKA__BROKERS".to_string(),
            kafka.brokers.clone(),
        ),
        (
            "MEMBERSYNC__KAFKA__TOPIC_PREFIX".into(),
            kafka.topic_prefix.clone(),
        ),
        ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS".into(), "1".into()),
    ]);
    let mut daemon = Daemon::start("cdc", env).await;
    let topic = format!("{}.cdc.public.members", kafka.topic_prefix);
    // The snapshot row arrives once the slot exists: everything after it is streamed.
    support::kafka::consume(&kafka, &topic, 1, Duration::from_secs(60)).await;

    // One transaction each, so that the events come in this order and only the third one
    // carries the origin marker (it must be the transaction's first statement).
    for sql in [
        "insert into public.members (memberstack_id, email, project_data)
           select 'mem_new', 'new@example.com',
                  jsonb_build_object('blob', (select string_agg(md5(random()::text), '') from generate_series(1, 400)))",
        "update public.members set email = 'renamed@example.com' where memberstack_id = 'mem_new'",
        "begin;
         select pg_logical_emit_message(true, 'membersync.origin', '');
         update public.members set plan_id = 'pln_1' where memberstack_id = 'mem_new';
         commit",
        "delete from public.members where memberstack_id = 'mem_snap'",
        "truncate public.members cascade",
    ] {
        admin.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // r, c, u, u (origin), d, t
    let records = support::kafka::consume(&kafka, &topic, 6, Duration::from_secs(60)).await;
    let mut ops = Vec::new();
    for m in &records {
        assert!(
            m.headers().is_none() || record_headers(m).is_empty(),
            "CDC records carry no headers"
        );
        let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_valid(
            "cdc",
            &v,
            &format!("the {} record at offset {}", v["op"], m.offset()),
        );
        let key = m.key().map(|k| String::from_utf8(k.to_vec()).unwrap());
        let row = if v["after"].is_object() {
            &v["after"]
        } else {
            &v["before"]
        };
        assert_eq!(
            key.as_deref(),
            row["memberstack_id"].as_str(),
            "key = memberstack_id of the row ({})",
            v["op"]
        );
        ops.push((
            v["op"].as_str().unwrap().to_owned(),
            v["source"]["origin"].clone(),
            v["source"]["unchanged_columns"].clone(),
        ));
    }
    let op_names: Vec<&str> = ops.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(op_names, ["r", "c", "u", "u", "d", "t"], "{ops:?}");
    assert_eq!(
        ops[2].2,
        json!(["project_data"]),
        "the first update left the TOASTed blob out"
    );
    assert_eq!(
        ops[3].1,
        json!("membersync"),
        "the marked transaction has origin membersync"
    );
    daemon.terminate().await;
}
