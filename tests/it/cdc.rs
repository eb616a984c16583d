//! CDC end to end: the real binary streaming a real Postgres slot to a real broker. Every test
//! has its own database, slot, topic prefix and broker (a private Tansu: support::broker), its
//! topics have one partition (a topic's order is the order the daemon produced in), and it
//! waits for conditions, never for a fixed time (except the deliberate 10 s broker outage).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use membersync::config::KafkaConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::support::{
    self, TestDb, broker::Broker, cluster::TempCluster, daemon::Daemon, wait_for,
};

/// A table with one column of each kind the value conversion cares about.
const CDC_T: &str = r#"
create table public.cdc_t (
  id int primary key,
  memberstack_id text not null unique,
  name text,
  big text,
  n numeric,
  js jsonb,
  ts timestamptz,
  tags text[],
  raw bytea
);
grant select on public.cdc_t to membersync;
alter publication membersync add table public.cdc_t;
"#;

const TABLES: &str = r#"["public.members","public.cdc_t"]"#;

/// One test's database (with `public.cdc_t` captured), topic prefix and superuser connection.
struct Setup {
    db: TestDb,
    kafka: KafkaConfig,
    admin: Client,
    /// A broker of this test's own (heavy or destructive tests), else the shared dev broker.
    broker: Option<Broker>,
}

impl Setup {
    /// With a broker of the test's own: tests that produce tens of thousands of records keep
    /// their load off the shared dev broker (a single SQLite-backed Tansu that stops answering
    /// metadata requests while it stores large batches), and a test may kill its broker.
    async fn new() -> Setup {
        let broker = Broker::start().await;
        let mut kafka = support::kafka::config();
        kafka.brokers = broker.addr();
        let mut s = Self::with_kafka(kafka).await;
        s.broker = Some(broker);
        s
    }

    async fn with_kafka(mut kafka: KafkaConfig) -> Setup {
        kafka.topic_partitions = 1;
        let db = TestDb::migrated().await;
        let admin = db.admin().await;
        admin.batch_execute(CDC_T).await.expect("create cdc_t");
        // Not UTC (Supabase projects can set one): values must still come out in UTC, from
        // the snapshot as well as from the stream.
        admin
            .batch_execute(&format!(
                "alter database {} set timezone to 'Asia/Kolkata'",
                db.name
            ))
            .await
            .unwrap();
        Setup {
            db,
            kafka,
            admin,
            broker: None,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.db.env();
        for (k, v) in [
            ("MEMBERSYNC__KAFKA__BROKERS", self.kafka.brokers.as_str()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
                self.kafka.topic_prefix.as_str(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1"),
            ("MEMBERSYNC__CDC__TABLES", TABLES),
            ("MEMBERSYNC__CDC__HEARTBEAT_INTERVAL_SECS", "1"),
            ("MEMBERSYNC__CDC__SLOT_POLL_INTERVAL_SECS", "1"),
            ("MEMBERSYNC__CDC__STATUS_INTERVAL_MS", "200"),
            ("MEMBERSYNC__CDC__RECONNECT_MAX_BACKOFF_SECS", "2"),
            // These tests read every operation one record each; Debezium's defaults (truncates
            // skipped, a tombstone after each delete) are tested in `debezium`.
            ("MEMBERSYNC__CDC__SKIPPED_OPERATIONS", "none"),
            ("MEMBERSYNC__CDC__TOMBSTONES_ON_DELETE", "false"),
        ] {
            env.push((k.into(), v.into()));
        }
        env
    }

    fn env_with(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).into(), (*v).into()));
        }
        env
    }

    async fn start(&self) -> Daemon {
        Daemon::start("cdc", self.env()).await
    }

    fn topic(&self, table: &str) -> String {
        format!("{}.cdc.public.{table}", self.kafka.topic_prefix)
    }

    fn reader(&self, table: &str) -> Reader {
        Reader::new(&self.kafka, &self.topic(table))
    }

    /// Runs one statement as its own transaction.
    async fn sql(&self, statement: &str) {
        self.admin
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}: {:?}", e.as_db_error()));
    }

    /// Waits until the slot exists and its initial snapshot is acknowledged.
    async fn snapshot_done(&self) {
        let slot = self.db.slot();
        let admin = &self.admin;
        wait_for(
            "the initial snapshot to complete",
            Duration::from_secs(60),
            || {
                let slot = slot.clone();
                async move {
                    let row = admin
                        .query_opt(
                            "select 1 from membersync_meta.cdc_snapshots s
                         join pg_replication_slots r on r.slot_name = s.slot_name
                         where s.slot_name = $1 and s.completed_at is not null",
                            &[&slot],
                        )
                        .await
                        .unwrap();
                    row.map(|_| ())
                }
            },
        )
        .await;
    }
}

/// One record of a CDC topic.
#[derive(Debug, Clone)]
struct Event {
    key: Option<String>,
    value: Value,
}

impl Event {
    fn op(&self) -> &str {
        self.value["op"].as_str().unwrap_or("?")
    }

    /// `after.id`, else `before.id`.
    fn id(&self) -> Option<i64> {
        self.value["after"]["id"]
            .as_i64()
            .or_else(|| self.value["before"]["id"].as_i64())
    }

    fn tx_id(&self) -> &str {
        self.value["transaction"]["id"].as_str().unwrap_or("")
    }

    /// The commit LSN in `transaction.id` (`<txId>:<lsn>`).
    fn commit_lsn(&self) -> u64 {
        self.tx_id()
            .split_once(':')
            .expect("txId:lsn")
            .1
            .parse()
            .expect("numeric lsn")
    }
}

/// Reads one single-partition topic from the beginning, keeping everything read.
struct Reader {
    consumer: StreamConsumer,
    topic: String,
    events: Vec<Event>,
}

impl Reader {
    fn new(kafka: &KafkaConfig, topic: &str) -> Reader {
        let consumer: StreamConsumer = membersync::kafka::client_config(kafka)
            .set("group.id", support::unique_name("cdc-reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).expect("assign");
        Reader {
            consumer,
            topic: topic.to_owned(),
            events: Vec::new(),
        }
    }

    /// Reads until `done(everything read so far)`; panics after `timeout`.
    async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> &[Event] {
        let deadline = Instant::now() + timeout;
        while !done(&self.events) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let tail: Vec<String> = self
                    .events
                    .iter()
                    .rev()
                    .take(5)
                    .map(|e| e.value.to_string())
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what} on {}: {} records read; last ones: {tail:#?}",
                    self.topic,
                    self.events.len()
                );
            }
            match tokio::time::timeout(left.min(Duration::from_secs(1)), self.consumer.recv()).await
            {
                Ok(Ok(m)) => {
                    let value = m
                        .payload()
                        .map(|p| serde_json::from_slice(p).expect("a CDC record is JSON"))
                        .unwrap_or(Value::Null);
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    self.events.push(Event { key, value });
                }
                Ok(Err(e)) => eprintln!("consume {}: {e} (retrying)", self.topic),
                Err(_) => {}
            }
        }
        &self.events
    }

    async fn count(&mut self, n: usize, timeout: Duration) -> &[Event] {
        self.until(&format!("{n} records"), timeout, |e| e.len() >= n)
            .await
    }

    /// Reads until every id of `ids` was seen in an event with op `op`.
    async fn all_ids(&mut self, op: &str, ids: &BTreeSet<i64>, timeout: Duration) -> &[Event] {
        let mut seen = BTreeSet::new();
        let mut scanned = 0;
        self.until(
            &format!("{} ids with op {op}", ids.len()),
            timeout,
            |events| {
                for e in &events[scanned..] {
                    if e.op() == op {
                        seen.extend(e.id());
                    }
                }
                scanned = events.len();
                seen.len() >= ids.len() && ids.is_subset(&seen)
            },
        )
        .await
    }
}

/// A sample of `membersync_cdc_events_total` (0 when absent or the daemon is gone).
async fn events_metric(daemon: &Daemon, table: &str, op: &str) -> f64 {
    let Some((_, text)) = daemon.get("/metrics").await else {
        return 0.0;
    };
    let (table, op) = (format!("table=\"{table}\""), format!("op=\"{op}\""));
    text.lines()
        .filter(|l| {
            l.starts_with("membersync_cdc_events_total{") && l.contains(&table) && l.contains(&op)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `X/Y` → u64.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("X/Y");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `v` is an ISO 8601 UTC timestamp (`…Z`) for the instant `expected` (RFC 3339).
fn assert_utc(v: &Value, expected: &str) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp expected, got {v}"));
    assert!(s.ends_with('Z') && s.contains('T'), "not ISO 8601 UTC: {s}");
    let got = chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let want = chrono::DateTime::parse_from_rfc3339(expected).unwrap();
    assert_eq!(got, want, "{s} is not {expected}");
}

/// Inserts `txs` transactions of `rows` rows into cdc_t (ids from 1), pausing between them.
fn spawn_loader(
    client: Client,
    txs: i32,
    rows: i32,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for t in 0..txs {
            let (lo, hi) = (t * rows + 1, (t + 1) * rows);
            client
                .execute(
                    "insert into public.cdc_t (id, memberstack_id, name)
                     select g, 'mem_' || g, 'load' from generate_series($1::int, $2::int) g",
                    &[&lo, &hi],
                )
                .await
                .expect("load transaction");
            tokio::time::sleep(pause).await;
        }
    })
}

/// How many times each id of `ids` appears among the `op` events; panics if one is missing.
fn count_ids(events: &[Event], op: &str, ids: &BTreeSet<i64>) -> (usize, usize) {
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.op() == op) {
        *counts.entry(e.id().expect("id")).or_default() += 1;
    }
    let missing: Vec<&i64> = ids
        .iter()
        .filter(|id| !counts.contains_key(id))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "ids missing from Kafka (first 10): {missing:?}"
    );
    let total: usize = ids.iter().map(|id| counts[id]).sum();
    (total, total - ids.len())
}

async fn slot_confirmed(admin: &Client, slot: &str) -> Option<u64> {
    let row = admin
        .query_opt(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()?;
    row.get::<_, Option<String>>(0).map(|s| parse_lsn(&s))
}

// ------------------------------------------------------------------------------------------
// 1. Every operation, the envelope and value conversion
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_operation_is_a_debezium_envelope_with_converted_values() {
    let s = Setup::new().await;
    // Present before the daemon starts: published by the initial snapshot (op r).
    s.sql("insert into public.members (memberstack_id, email, custom_fields) values ('mem_snap', 'snap@example.com', '{\"k\": 1}')").await;
    s.sql(
        r#"insert into public.cdc_t values (1, 'mem_1', 'one', null, 12345678901234567890.123456789,
             '{"a": [1, 2.5, {"b": null}], "s": "x"}', '2024-02-29 12:34:56.789+02', '{a,"b c",NULL}', '\x00ff10')"#,
    )
    .await;
    let _daemon = s.start().await;
    let mut reader = s.reader("cdc_t");
    reader.count(1, Duration::from_secs(30)).await;

    // Streamed: one transaction each.
    s.sql(
        r#"insert into public.cdc_t values (2, 'mem_2', 'two', 'small', -0.000001, '[1, "x", true]',
             '1999-12-31 23:59:59.999999-08', '{}', '\x')"#,
    )
    .await;
    s.sql("update public.cdc_t set name = 'two!', n = 'NaN', js = 'null' where id = 2")
        .await;
    s.sql("delete from public.cdc_t where id = 2").await;
    s.sql("truncate public.cdc_t").await;
    let events = reader.count(5, Duration::from_secs(30)).await.to_vec();
    let ops: Vec<&str> = events.iter().map(Event::op).collect();
    assert_eq!(ops, ["r", "c", "u", "d", "t"], "{events:#?}");

    // Fields every event has.
    let mut last_lsn = 0;
    for e in &events {
        let v = &e.value;
        let src = &v["source"];
        assert_eq!(src["connector"], "postgresql", "{v}");
        assert_eq!(src["producer"], "membersync", "{v}");
        assert_eq!(src["name"], s.kafka.topic_prefix.as_str(), "{v}");
        assert_eq!(src["db"], s.db.name.as_str(), "{v}");
        assert_eq!(src["schema"], "public", "{v}");
        assert_eq!(src["table"], "cdc_t", "{v}");
        assert!(src["version"].is_string(), "{v}");
        assert!(src["ts_ms"].as_i64().unwrap() > 1_600_000_000_000, "{v}");
        assert!(
            v["ts_ms"].as_i64().unwrap() >= src["ts_ms"].as_i64().unwrap(),
            "{v}"
        );
        assert_eq!(src["origin"], Value::Null, "{v}");
        let lsn = src["lsn"]
            .as_u64()
            .unwrap_or_else(|| panic!("source.lsn: {v}"));
        assert!(lsn > last_lsn || e.op() == "r", "LSNs grow: {v}");
        last_lsn = lsn;
        if e.op() == "r" {
            assert!(
                matches!(src["snapshot"].as_str(), Some("true" | "first" | "last")),
                "{v}"
            );
            assert_eq!(v["transaction"], Value::Null, "{v}");
        } else {
            assert_eq!(src["snapshot"], "false", "{v}");
            let tx_id = src["txId"].as_u64().unwrap_or_else(|| panic!("txId: {v}"));
            let t = &v["transaction"];
            let (xid, commit_lsn) = t["id"].as_str().unwrap().split_once(':').unwrap();
            assert_eq!(xid, tx_id.to_string(), "{v}");
            assert!(
                commit_lsn.parse::<u64>().unwrap() >= lsn,
                "commit LSN ≥ change LSN: {v}"
            );
            assert_eq!(
                (
                    t["total_order"].as_u64(),
                    t["data_collection_order"].as_u64()
                ),
                (Some(1), Some(1)),
                "{v}"
            );
        }
    }
    let tx_ids: BTreeSet<&str> = events[1..].iter().map(Event::tx_id).collect();
    assert_eq!(tx_ids.len(), 4, "four transactions");

    // r: every type converted.
    let r = &events[0].value;
    assert_eq!(r["before"], Value::Null);
    let a = &r["after"];
    assert_eq!(a["id"], 1);
    assert_eq!(a["memberstack_id"], "mem_1");
    assert_eq!(a["name"], "one");
    assert_eq!(a["big"], Value::Null);
    assert_eq!(
        a["n"], "12345678901234567890.123456789",
        "numeric as an exact string"
    );
    assert_eq!(
        a["js"],
        json!({"a": [1, 2.5, {"b": null}], "s": "x"}),
        "jsonb embedded"
    );
    assert_utc(&a["ts"], "2024-02-29T10:34:56.789Z");
    assert_eq!(a["tags"], json!(["a", "b c", null]));
    assert_eq!(a["raw"], "AP8Q", "bytea as base64");

    // c
    let c = &events[1].value;
    assert_eq!(c["before"], Value::Null);
    let a = &c["after"];
    assert_eq!(a["id"], 2);
    assert_eq!(a["big"], "small");
    assert_eq!(a["n"], "-0.000001");
    assert_eq!(a["js"], json!([1, "x", true]));
    assert_utc(&a["ts"], "2000-01-01T07:59:59.999999Z");
    assert_eq!(a["tags"], json!([]));
    assert_eq!(a["raw"], "");
    assert_eq!(c["source"]["unchanged_columns"], json!([]));

    // u
    let u = &events[2].value;
    assert_eq!(u["after"]["name"], "two!");
    assert_eq!(u["after"]["n"], "NaN");
    assert_eq!(u["after"]["js"], Value::Null, "jsonb 'null' → JSON null");
    assert_eq!(u["after"]["big"], "small");

    // d
    let d = &events[3].value;
    assert_eq!(d["after"], Value::Null);
    assert_eq!(d["before"]["id"], 2);

    // t
    let t = &events[4].value;
    assert_eq!((&t["before"], &t["after"]), (&Value::Null, &Value::Null));

    // The members snapshot, too.
    let mut members = s.reader("members");
    let m = members.count(1, Duration::from_secs(30)).await[0]
        .value
        .clone();
    assert_eq!(m["op"], "r", "{m}");
    assert_eq!(m["source"]["table"], "members");
    assert_eq!(m["after"]["memberstack_id"], "mem_snap");
    assert_eq!(m["after"]["email"], "snap@example.com");
    assert_eq!(m["after"]["custom_fields"], json!({"k": 1}));
    assert!(
        m["after"]["id"].as_str().unwrap().len() == 36,
        "uuid as text: {m}"
    );
    let created: String = s
        .admin
        .query_one(
            "select to_char(created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') from public.members",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_utc(&m["after"]["created_at"], &created);
}

// ------------------------------------------------------------------------------------------
// 2. REPLICA IDENTITY DEFAULT and FULL
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn before_images_follow_the_replica_identity() {
    let s = Setup::new().await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    let row = |id: i32| {
        format!(
            "insert into public.cdc_t values ({id}, 'mem_{id}', 'n{id}', null, 1.5, '{{\"v\": {id}}}', \
             '2024-01-01 00:00:00+00', '{{x}}', '\\x01')"
        )
    };
    // DEFAULT (primary key)
    s.sql(&row(10)).await;
    s.sql("update public.cdc_t set name = 'changed' where id = 10")
        .await;
    s.sql("update public.cdc_t set id = 11 where id = 10").await;
    s.sql("delete from public.cdc_t where id = 11").await;
    // FULL
    s.sql("alter table public.cdc_t replica identity full")
        .await;
    s.sql(&row(20)).await;
    s.sql("update public.cdc_t set name = 'changed' where id = 20")
        .await;
    s.sql("delete from public.cdc_t where id = 20").await;

    let mut reader = s.reader("cdc_t");
    let events = reader.count(8, Duration::from_secs(30)).await.to_vec();
    let ops: Vec<&str> = events.iter().map(Event::op).collect();
    // The key change (10 → 11) is a delete of 10 and a create of 11, as Debezium publishes it.
    assert_eq!(ops, ["c", "u", "d", "c", "d", "c", "u", "d"], "{events:#?}");
    let key_only = |before: &Value, id: i64| {
        let obj = before
            .as_object()
            .unwrap_or_else(|| panic!("before expected: {before}"));
        assert_eq!(obj.get("id"), Some(&json!(id)), "{before}");
        for (k, v) in obj {
            assert!(
                k == "id" || v.is_null(),
                "only the key in a DEFAULT before image: {before}"
            );
        }
    };

    // DEFAULT: an update that keeps the key has no before image; one that changes it is a
    // delete with the old key and a create; a delete has the key.
    let b = &events[1].value["before"];
    assert!(b.is_null() || b.as_object().is_some_and(|_| true), "{b}");
    if !b.is_null() {
        key_only(b, 10);
    }
    assert_eq!(events[1].value["after"]["name"], "changed");
    key_only(&events[2].value["before"], 10);
    assert_eq!(events[2].key.as_deref(), Some("10"));
    assert_eq!(events[3].value["after"]["id"], 11);
    assert_eq!(events[3].value["before"], Value::Null);
    assert_eq!(events[3].key.as_deref(), Some("11"));
    assert_eq!(
        events[2].value["source"]["lsn"], events[3].value["source"]["lsn"],
        "one change, one LSN"
    );
    key_only(&events[4].value["before"], 11);

    // FULL: the whole old row.
    let full_old = json!({"id": 20, "memberstack_id": "mem_20", "name": "n20", "big": null, "n": "1.5",
                          "js": {"v": 20}, "ts": events[5].value["after"]["ts"], "tags": ["x"], "raw": "AQ=="});
    assert_eq!(events[6].value["before"], full_old, "update under FULL");
    assert_eq!(events[6].value["after"]["name"], "changed");
    assert_eq!(
        events[7].value["before"]["name"], "changed",
        "delete under FULL: {}",
        events[7].value
    );
    assert_eq!(events[7].value["before"]["js"], json!({"v": 20}));
    assert_eq!(events[7].value["after"], Value::Null);
}

#[tokio::test]
async fn schema_changes_mid_stream_and_a_two_table_truncate() {
    let s = Setup::new().await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_1')")
        .await;
    s.sql("alter table public.cdc_t add column extra int default 7")
        .await;
    s.sql("insert into public.cdc_t (id, memberstack_id, extra) values (2, 'mem_2', 8)")
        .await;
    s.sql("alter table public.cdc_t drop column name").await;
    s.sql("update public.cdc_t set extra = 9 where id = 1")
        .await;
    s.sql("insert into public.members (memberstack_id) values ('mem_1')")
        .await;
    s.sql("truncate public.members, public.cdc_t").await;

    let cdc_t = s
        .reader("cdc_t")
        .count(4, Duration::from_secs(30))
        .await
        .to_vec();
    let ops: Vec<&str> = cdc_t.iter().map(Event::op).collect();
    assert_eq!(ops, ["c", "c", "u", "t"]);
    assert!(
        cdc_t[0].value["after"].get("extra").is_none(),
        "{}",
        cdc_t[0].value
    );
    assert_eq!(cdc_t[1].value["after"]["extra"], 8);
    assert_eq!(cdc_t[1].value["after"]["name"], Value::Null);
    assert_eq!(cdc_t[2].value["after"]["extra"], 9);
    assert!(
        cdc_t[2].value["after"].get("name").is_none(),
        "dropped column gone: {}",
        cdc_t[2].value
    );
    let members = s
        .reader("members")
        .count(2, Duration::from_secs(30))
        .await
        .to_vec();
    assert_eq!(members[1].op(), "t");
    // One transaction, two tables: one truncate event on each topic.
    let (tm, tc) = (
        &members[1].value["transaction"],
        &cdc_t[3].value["transaction"],
    );
    assert_eq!(tm["id"], tc["id"]);
    let mut orders = [tm["total_order"].as_u64(), tc["total_order"].as_u64()];
    orders.sort();
    assert_eq!(orders, [Some(1), Some(2)]);
}

// ------------------------------------------------------------------------------------------
// 3. Unchanged TOAST
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn unchanged_toast_is_marked_under_default_and_filled_under_full() {
    let s = Setup::new().await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    // Random hex: pglz cannot shrink it, so the value is stored out of line.
    s.sql(
        "insert into public.cdc_t (id, memberstack_id, name, big)
         select 1, 'mem_1', 'a', string_agg(md5(random()::text), '') from generate_series(1, 400)",
    )
    .await;
    let (big, stored): (String, i32) = {
        let r = s
            .admin
            .query_one(
                "select big, pg_column_size(big) from public.cdc_t where id = 1",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        big.len() > 8000 && stored > 8000,
        "stored uncompressed out of line: {stored} bytes"
    );
    s.sql("update public.cdc_t set name = 'b' where id = 1")
        .await;
    s.sql("alter table public.cdc_t replica identity full")
        .await;
    s.sql("update public.cdc_t set name = 'c' where id = 1")
        .await;

    let mut reader = s.reader("cdc_t");
    let events = reader.count(3, Duration::from_secs(30)).await.to_vec();
    assert_eq!(
        events.iter().map(Event::op).collect::<Vec<_>>(),
        ["c", "u", "u"]
    );
    assert_eq!(events[0].value["after"]["big"], big.as_str());

    let default = &events[1].value;
    assert_eq!(default["after"]["name"], "b");
    assert_eq!(
        default["after"]["big"], "__debezium_unavailable_value",
        "never null, never the value"
    );
    assert_eq!(default["source"]["unchanged_columns"], json!(["big"]));

    let full = &events[2].value;
    assert_eq!(full["after"]["name"], "c");
    assert_eq!(
        full["after"]["big"],
        big.as_str(),
        "filled from the FULL before image"
    );
    assert_eq!(full["before"]["big"], big.as_str());
    assert_eq!(full["source"]["unchanged_columns"], json!([]));
}

// ------------------------------------------------------------------------------------------
// 4. Transactions: commit order, total_order, data_collection_order
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn multi_table_transactions_keep_commit_order() {
    let s = Setup::new().await;
    let _daemon = s.start().await;
    s.snapshot_done().await;

    // A starts first, B commits first: the stream must follow commit order.
    let mut a = s.db.admin().await;
    let mut b = s.db.admin().await;
    let ta = a.transaction().await.unwrap();
    ta.batch_execute("insert into public.members (memberstack_id) values ('mem_a1')")
        .await
        .unwrap();
    ta.batch_execute("insert into public.cdc_t (id, memberstack_id) values (101, 'mem_a1')")
        .await
        .unwrap();
    let tb = b.transaction().await.unwrap();
    tb.batch_execute("insert into public.members (memberstack_id) values ('mem_b1')")
        .await
        .unwrap();
    tb.batch_execute("insert into public.cdc_t (id, memberstack_id) values (201, 'mem_b1')")
        .await
        .unwrap();
    tb.batch_execute(
        "update public.members set email = 'b@example.com' where memberstack_id = 'mem_b1'",
    )
    .await
    .unwrap();
    tb.batch_execute("insert into public.cdc_t (id, memberstack_id) values (202, 'mem_b2')")
        .await
        .unwrap();
    tb.commit().await.unwrap();
    ta.batch_execute("update public.cdc_t set name = 'a' where id = 101")
        .await
        .unwrap();
    ta.batch_execute("insert into public.members (memberstack_id) values ('mem_a2')")
        .await
        .unwrap();
    ta.commit().await.unwrap();

    // And many concurrent two-table transactions.
    let mut tasks = Vec::new();
    for task in 0..8 {
        let mut client = s.db.admin().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..3 {
                let id = 1000 + task * 10 + i;
                let tx = client.transaction().await.unwrap();
                tx.execute("insert into public.members (memberstack_id) values ('mem_' || $1::int)", &[&id])
                    .await
                    .unwrap();
                tx.execute("insert into public.cdc_t (id, memberstack_id) values ($1, 'mem_' || $1::int)", &[&id])
                    .await
                    .unwrap();
                tx.execute(
                    "update public.members set email = 'x@example.com' where memberstack_id = 'mem_' || $1::int",
                    &[&id],
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let members = s
        .reader("members")
        .count(4 + 48, Duration::from_secs(30))
        .await
        .to_vec();
    let cdc_t = s
        .reader("cdc_t")
        .count(4 + 24, Duration::from_secs(30))
        .await
        .to_vec();

    // Per topic: each transaction's events are contiguous, transactions in commit order.
    for (name, events) in [("members", &members), ("cdc_t", &cdc_t)] {
        let mut runs: Vec<(&str, u64)> = Vec::new();
        for e in events.iter() {
            if runs.last().map(|r| r.0) != Some(e.tx_id()) {
                runs.push((e.tx_id(), e.commit_lsn()));
            }
        }
        let distinct: BTreeSet<&str> = runs.iter().map(|r| r.0).collect();
        assert_eq!(
            distinct.len(),
            runs.len(),
            "{name}: a transaction's events are interleaved with another's"
        );
        assert!(
            runs.windows(2).all(|w| w[0].1 < w[1].1),
            "{name}: not in commit order: {runs:?}"
        );
        // data_collection_order counts this table's events within the transaction.
        let mut per_tx: HashMap<&str, u64> = HashMap::new();
        for e in events.iter() {
            let n = per_tx.entry(e.tx_id()).or_default();
            *n += 1;
            assert_eq!(
                e.value["transaction"]["data_collection_order"], *n,
                "{name}: {}",
                e.value
            );
        }
    }

    // Across both topics: one transaction id, total_order 1..n.
    let mut by_tx: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in members.iter().chain(cdc_t.iter()) {
        assert!(
            e.tx_id()
                .starts_with(&format!("{}:", e.value["source"]["txId"])),
            "{}",
            e.value
        );
        by_tx
            .entry(e.tx_id())
            .or_default()
            .push(e.value["transaction"]["total_order"].as_u64().unwrap());
    }
    assert_eq!(by_tx.len(), 2 + 24);
    for (tx, mut orders) in by_tx {
        orders.sort_unstable();
        let n = orders.len() as u64;
        assert_eq!(orders, (1..=n).collect::<Vec<_>>(), "total_order of {tx}");
    }

    // The hand-made pair: B (committed first) entirely before A, in both topics.
    let tx_of = |events: &[Event], key: &str| -> (String, u64) {
        let e = events
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .unwrap_or_else(|| panic!("{key}"));
        (
            e.tx_id().to_owned(),
            e.value["source"]["txId"].as_u64().unwrap(),
        )
    };
    let (tx_a, xid_a) = tx_of(&members, "mem_a1");
    let (tx_b, xid_b) = tx_of(&members, "mem_b1");
    assert!(xid_a < xid_b, "A was assigned its xid first");
    let pos = |events: &[Event], tx: &str| -> Vec<usize> {
        events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.tx_id() == tx)
            .map(|(i, _)| i)
            .collect()
    };
    for (name, events) in [("members", &members), ("cdc_t", &cdc_t)] {
        let (pa, pb) = (pos(events, &tx_a), pos(events, &tx_b));
        assert_eq!((pa.len(), pb.len()), (2, 2), "{name}");
        assert!(
            pb.iter().max() < pa.iter().min(),
            "{name}: B committed first, so B's events come first"
        );
    }
    let orders = |events: &[Event], tx: &str| -> Vec<(String, u64)> {
        events
            .iter()
            .filter(|e| e.tx_id() == tx)
            .map(|e| {
                (
                    e.op().to_owned(),
                    e.value["transaction"]["total_order"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(orders(&members, &tx_b), [("c".into(), 1), ("u".into(), 3)]);
    assert_eq!(orders(&cdc_t, &tx_b), [("c".into(), 2), ("c".into(), 4)]);
    assert_eq!(orders(&members, &tx_a), [("c".into(), 1), ("c".into(), 4)]);
    assert_eq!(orders(&cdc_t, &tx_a), [("c".into(), 2), ("u".into(), 3)]);
}

// ------------------------------------------------------------------------------------------
// 5. Keys
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn keys_are_the_member_id_for_members_and_the_primary_key_elsewhere() {
    let s = Setup::new().await;
    s.sql("insert into public.members (memberstack_id) values ('mem_k1')")
        .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_c1')")
        .await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    s.sql("insert into public.members (memberstack_id) values ('mem_k2')")
        .await;
    s.sql("update public.members set email = 'k2@example.com' where memberstack_id = 'mem_k2'")
        .await;
    s.sql("delete from public.members where memberstack_id = 'mem_k2'")
        .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (2, 'mem_c2')")
        .await;
    s.sql("update public.cdc_t set name = 'x' where id = 2")
        .await;
    s.sql("update public.cdc_t set id = 3 where id = 2").await;
    s.sql("delete from public.cdc_t where id = 3").await;
    s.sql("alter table public.cdc_t replica identity full")
        .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (4, 'mem_c4')")
        .await;
    s.sql("update public.cdc_t set name = 'y' where id = 4")
        .await;
    s.sql("delete from public.cdc_t where id = 4").await;

    let members = s
        .reader("members")
        .count(4, Duration::from_secs(30))
        .await
        .to_vec();
    let cdc_t = s
        .reader("cdc_t")
        .count(9, Duration::from_secs(30))
        .await
        .to_vec();
    let expected = [
        (
            &members,
            vec![
                ("r", "mem_k1"),
                ("c", "mem_k2"),
                ("u", "mem_k2"),
                ("d", "mem_k2"),
            ],
        ),
        (
            &cdc_t,
            vec![
                ("r", "1"),
                ("c", "2"),
                ("u", "2"),
                // The key change 2 → 3: a delete under 2, a create under 3.
                ("d", "2"),
                ("c", "3"),
                ("d", "3"),
                ("c", "4"),
                ("u", "4"),
                ("d", "4"),
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (events, want) in expected {
        assert_eq!(
            events.iter().map(Event::op).collect::<Vec<_>>(),
            want.iter().map(|w| w.0).collect::<Vec<_>>()
        );
        for (e, (op, key)) in events.iter().zip(want) {
            if e.key.as_deref() != Some(key) {
                wrong.push(format!(
                    "{}/{op} (replica identity {}): key {:?}, expected {key:?}",
                    e.value["source"]["table"],
                    if e.value["after"]["id"] == 4 || e.value["before"]["id"] == 4 {
                        "FULL"
                    } else {
                        "DEFAULT"
                    },
                    e.key
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "wrong Kafka keys:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn keys_under_replica_identity_full_are_still_the_primary_key() {
    let s = Setup::new().await;
    s.sql("alter table public.cdc_t replica identity full")
        .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_c1')")
        .await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (2, 'mem_c2')")
        .await;
    s.sql("update public.cdc_t set name = 'x' where id = 2")
        .await;
    s.sql("delete from public.cdc_t where id = 2").await;
    let cdc_t = s
        .reader("cdc_t")
        .count(4, Duration::from_secs(30))
        .await
        .to_vec();
    let keys: Vec<(&str, Option<&str>)> =
        cdc_t.iter().map(|e| (e.op(), e.key.as_deref())).collect();
    assert_eq!(
        keys,
        [
            ("r", Some("1")),
            ("c", Some("2")),
            ("u", Some("2")),
            ("d", Some("2"))
        ]
    );
}

#[tokio::test]
async fn key_columns_can_be_configured_through_the_environment() {
    let s = Setup::new().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_c1')")
        .await;
    let env = s.env_with(&[(
        "MEMBERSYNC__CDC__KEY_COLUMNS",
        r#"{"public.members"=["email","memberstack_id"],"public.cdc_t"=["memberstack_id"]}"#,
    )]);
    let _daemon = Daemon::start("cdc", env).await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (2, 'mem_c2')")
        .await;
    s.sql("update public.cdc_t set name = 'x' where id = 2")
        .await;
    s.sql("insert into public.members (memberstack_id, email) values ('mem_m1', 'm1@example.com')")
        .await;

    let cdc_t = s
        .reader("cdc_t")
        .count(3, Duration::from_secs(30))
        .await
        .to_vec();
    let keys: Vec<(&str, Option<&str>)> =
        cdc_t.iter().map(|e| (e.op(), e.key.as_deref())).collect();
    assert_eq!(
        keys,
        [
            ("r", Some("mem_c1")),
            ("c", Some("mem_c2")),
            ("u", Some("mem_c2"))
        ]
    );
    let members = s
        .reader("members")
        .count(1, Duration::from_secs(30))
        .await
        .to_vec();
    let key: Value = serde_json::from_str(members[0].key.as_deref().expect("a key"))
        .expect("several columns: JSON");
    assert_eq!(
        key,
        json!({"email": "m1@example.com", "memberstack_id": "mem_m1"})
    );
}

// ------------------------------------------------------------------------------------------
// 6. Origin
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn transactions_marked_as_membersync_writes_carry_the_origin() {
    let s = Setup::new().await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    s.sql(
        "begin;
         select pg_logical_emit_message(true, 'membersync.origin', '');
         insert into public.cdc_t (id, memberstack_id) values (1, 'mem_1');
         insert into public.members (memberstack_id) values ('mem_1');
         commit;",
    )
    .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (2, 'mem_2')")
        .await;
    // Neither a non-transactional marker nor another prefix marks a transaction.
    s.sql(
        "begin;
         select pg_logical_emit_message(false, 'membersync.origin', '');
         insert into public.cdc_t (id, memberstack_id) values (3, 'mem_3');
         commit;",
    )
    .await;
    s.sql(
        "begin;
         select pg_logical_emit_message(true, 'someone.else', '');
         insert into public.cdc_t (id, memberstack_id) values (4, 'mem_4');
         commit;",
    )
    .await;
    s.sql(
        "begin;
         select pg_logical_emit_message(true, 'membersync.origin', '');
         update public.cdc_t set name = 'mine' where id = 2;
         commit;",
    )
    .await;

    let cdc_t = s
        .reader("cdc_t")
        .count(5, Duration::from_secs(30))
        .await
        .to_vec();
    let origins: Vec<(Option<i64>, &str, &Value)> = cdc_t
        .iter()
        .map(|e| (e.id(), e.op(), &e.value["source"]["origin"]))
        .collect();
    let m = json!("membersync");
    assert_eq!(
        origins,
        [
            (Some(1), "c", &m),
            (Some(2), "c", &Value::Null),
            (Some(3), "c", &Value::Null),
            (Some(4), "c", &Value::Null),
            (Some(2), "u", &m)
        ]
    );
    let members = s
        .reader("members")
        .count(1, Duration::from_secs(30))
        .await
        .to_vec();
    assert_eq!(members[0].value["source"]["origin"], "membersync");
}

// ------------------------------------------------------------------------------------------
// 7. kill -9 under load
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn kill_9_under_load_loses_nothing() {
    const TXS: i32 = 200;
    const ROWS: i32 = 100;
    let s = Setup::new().await;
    let mut daemon = s.start().await;
    s.snapshot_done().await;
    let loader = spawn_loader(s.db.admin().await, TXS, ROWS, Duration::from_millis(5));
    wait_for(
        "the first events of the load",
        Duration::from_secs(30),
        || {
            let d = &daemon;
            async move { (events_metric(d, "public.cdc_t", "c").await >= 3000.0).then_some(()) }
        },
    )
    .await;
    let produced_before_kill = events_metric(&daemon, "public.cdc_t", "c").await;
    let confirmed_before_kill = slot_confirmed(&s.admin, &s.db.slot()).await;
    daemon.signal("KILL");
    let _ = daemon.child.wait();
    let loading = !loader.is_finished();
    eprintln!(
        "killed after {produced_before_kill} events produced (slot confirmed at {confirmed_before_kill:?}); \
         loader still running: {loading}"
    );

    let daemon = s.start().await;
    loader.await.unwrap();
    let ids: BTreeSet<i64> = (1..=(TXS * ROWS) as i64).collect();
    let mut reader = s.reader("cdc_t");
    let events = reader.all_ids("c", &ids, Duration::from_secs(60)).await;
    let (total, duplicates) = count_ids(events, "c", &ids);
    eprintln!(
        "kill -9 under load: {} rows committed, {total} insert events in Kafka, {duplicates} duplicates \
         (re-sent after the restart)",
        ids.len()
    );
    assert!(
        produced_before_kill < ids.len() as f64,
        "the kill happened before everything was streamed"
    );
    drop(daemon);
}

#[tokio::test]
async fn postgres_connections_killed_mid_load_reconnect_and_lose_nothing() {
    const TXS: i32 = 60;
    const ROWS: i32 = 100;
    let s = Setup::new().await;
    let daemon = s.start().await;
    s.snapshot_done().await;
    let loader = spawn_loader(s.db.admin().await, TXS, ROWS, Duration::from_millis(20));
    wait_for(
        "the first events of the load",
        Duration::from_secs(30),
        || {
            let d = &daemon;
            async move { (events_metric(d, "public.cdc_t", "c").await >= 1000.0).then_some(()) }
        },
    )
    .await;
    // The walsender and the leadership connection, as on a Postgres failover or restart.
    let killed: i64 = s
        .admin
        .query_one(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
             where usename = 'membersync' and datname = current_database()) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 2, "terminated {killed} backends");
    loader.await.unwrap();
    let ids: BTreeSet<i64> = (1..=(TXS * ROWS) as i64).collect();
    let mut reader = s.reader("cdc_t");
    let events = reader.all_ids("c", &ids, Duration::from_secs(60)).await;
    let (total, duplicates) = count_ids(events, "c", &ids);
    let reconnects = daemon.metric("membersync_cdc_reconnects_total").await;
    eprintln!(
        "postgres connections killed: {killed} backends; {total} insert events for {} rows, {duplicates} duplicates; \
         reconnects {reconnects}",
        ids.len()
    );
    assert!(reconnects >= 1.0, "the stream reconnected");
    assert_eq!(
        daemon.metric("membersync_cdc_leader").await,
        1.0,
        "and leads again"
    );
}

#[tokio::test]
async fn sigterm_mid_load_drains_and_a_restart_loses_nothing() {
    const TXS: i32 = 60;
    const ROWS: i32 = 100;
    let s = Setup::new().await;
    let mut daemon = s.start().await;
    s.snapshot_done().await;
    let loader = spawn_loader(s.db.admin().await, TXS, ROWS, Duration::from_millis(20));
    wait_for(
        "the first events of the load",
        Duration::from_secs(30),
        || {
            let d = &daemon;
            async move { (events_metric(d, "public.cdc_t", "c").await >= 1000.0).then_some(()) }
        },
    )
    .await;
    let status = daemon.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    let loading = !loader.is_finished();
    let _daemon = s.start().await;
    loader.await.unwrap();
    let ids: BTreeSet<i64> = (1..=(TXS * ROWS) as i64).collect();
    let mut reader = s.reader("cdc_t");
    let events = reader.all_ids("c", &ids, Duration::from_secs(60)).await;
    let (total, duplicates) = count_ids(events, "c", &ids);
    eprintln!(
        "SIGTERM mid-load (loader still running: {loading}): {total} insert events for {} rows, {duplicates} duplicates",
        ids.len()
    );
    // The drain confirmed everything Kafka acknowledged: at most the transaction the stream was
    // in the middle of is sent again.
    assert!(
        duplicates < ROWS as usize,
        "{duplicates} duplicates after a clean shutdown"
    );
}

// ------------------------------------------------------------------------------------------
// 8. Kafka unavailable for 10 s mid-load
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn broker_unavailable_for_10_s_loses_nothing() {
    const TXS: i32 = 200;
    const ROWS: i32 = 100;
    let mut s = Setup::new().await;
    let daemon = s.start().await;
    s.snapshot_done().await;
    let loader = spawn_loader(s.db.admin().await, TXS, ROWS, Duration::from_millis(40));
    wait_for(
        "the first events of the load",
        Duration::from_secs(30),
        || {
            let d = &daemon;
            async move { (events_metric(d, "public.cdc_t", "c").await >= 2000.0).then_some(()) }
        },
    )
    .await;
    let broker = s.broker.as_mut().unwrap();
    broker.kill();
    let confirmed_at_kill = slot_confirmed(&s.admin, &s.db.slot()).await;
    let produced_at_kill = events_metric(&daemon, "public.cdc_t", "c").await;
    // The outage itself: a fixed 10 s with no broker at all. Acknowledgements already on their
    // way may still be confirmed in the first 2 s; after that, nothing can be, although the
    // load goes on (Postgres must keep the WAL).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let confirmed_early = slot_confirmed(&s.admin, &s.db.slot()).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let produced_in_outage = events_metric(&daemon, "public.cdc_t", "c").await - produced_at_kill;
    let confirmed_in_outage = slot_confirmed(&s.admin, &s.db.slot()).await;
    assert_eq!(
        confirmed_early, confirmed_in_outage,
        "the slot was confirmed past changes Kafka never acknowledged"
    );
    s.broker.as_mut().unwrap().restart().await;
    let back = Instant::now();
    loader.await.unwrap();

    let ids: BTreeSet<i64> = (1..=(TXS * ROWS) as i64).collect();
    let mut reader = Reader::new(&s.kafka, &s.topic("cdc_t"));
    let events = reader.all_ids("c", &ids, Duration::from_secs(90)).await;
    let (total, duplicates) = count_ids(events, "c", &ids);
    eprintln!(
        "broker down 10 s: {produced_at_kill} events produced before, {produced_in_outage} handed to the producer \
         during the outage; slot confirmed {confirmed_at_kill:?} → {confirmed_in_outage:?}; all {} rows in Kafka \
         {:.1} s after the broker returned; {total} insert events, {duplicates} duplicates; reconnects {}",
        ids.len(),
        back.elapsed().as_secs_f64(),
        daemon.metric("membersync_cdc_reconnects_total").await,
    );
    assert!(
        produced_at_kill < ids.len() as f64,
        "the outage began mid-load"
    );
    assert!(daemon.child.id() > 0);
}

// ------------------------------------------------------------------------------------------
// 9. Idle database, busy cluster: the slot still advances
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_idle_database_slot_advances_while_another_database_writes() {
    let s = Setup::new().await;
    let _daemon = s.start().await;
    s.snapshot_done().await;
    let slot = s.db.slot();
    let start = slot_confirmed(&s.admin, &slot)
        .await
        .expect("confirmed_flush_lsn");

    let other = TestDb::bootstrapped().await;
    let busy = other.admin().await;
    busy.batch_execute(
        "create table public.churn as select g, md5(g::text) as h from generate_series(1, 100000) g;
         update public.churn set h = h || 'x';",
    )
    .await
    .unwrap();
    let target: String = busy
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let target = parse_lsn(&target);
    assert!(target > start);
    let began = Instant::now();
    let admin = &s.admin;
    wait_for(
        "the idle slot's confirmed_flush_lsn to pass the other database's writes",
        Duration::from_secs(30),
        || {
            let slot = slot.clone();
            async move { slot_confirmed(admin, &slot).await.filter(|c| *c >= target) }
        },
    )
    .await;
    eprintln!(
        "idle slot advanced {} bytes past the other database's writes within {:.1} s",
        target - start,
        began.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------------------------------
// 10. Advisory-lock failover
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_hot_standby_takes_over_within_seconds_after_kill_9() {
    let s = Setup::new().await;
    let first = s.start().await;
    let second = s.start().await;
    let daemons = [first, second];
    let leader = wait_for("exactly one leader", Duration::from_secs(30), || {
        let d = &daemons;
        async move {
            let (a, b) = (
                d[0].metric("membersync_cdc_leader").await,
                d[1].metric("membersync_cdc_leader").await,
            );
            assert!(a + b <= 1.0, "two leaders at once");
            (a + b == 1.0).then_some(if a == 1.0 { 0 } else { 1 })
        }
    })
    .await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_1')")
        .await;
    let mut reader = s.reader("cdc_t");
    reader.count(1, Duration::from_secs(30)).await;
    let [first, second] = daemons;
    let (mut leader_d, standby) = if leader == 0 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(standby.metric("membersync_cdc_leader").await, 0.0);

    leader_d.signal("KILL");
    let killed = Instant::now();
    let _ = leader_d.child.wait();
    // Changes made right after the kill, before anyone streams them.
    for id in 2..=6 {
        s.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id) values ({id}, 'mem_{id}')"
        ))
        .await;
    }
    let takeover = wait_for("the standby to take over", Duration::from_secs(20), || {
        let d = &standby;
        async move { (d.metric("membersync_cdc_leader").await == 1.0).then(|| killed.elapsed()) }
    })
    .await;
    for id in 7..=11 {
        s.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id) values ({id}, 'mem_{id}')"
        ))
        .await;
    }
    let ids: BTreeSet<i64> = (2..=11).collect();
    reader.all_ids("c", &ids, Duration::from_secs(30)).await;
    let streaming = killed.elapsed();
    eprintln!(
        "failover: standby leader {:.1} s after kill -9; changes made after the kill in Kafka {:.1} s after it",
        takeover.as_secs_f64(),
        streaming.as_secs_f64()
    );
    assert!(
        takeover <= Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
}

/// A leader that hangs with its connections up (SIGSTOP: the kernel keeps its sockets, so
/// Postgres keeps its session and the lock) is replaced once its lease is stale: the standby
/// terminates its sessions and streams, with the default settings, within 30 s.
#[tokio::test]
async fn a_hung_leader_is_replaced_within_30_s_after_sigstop() {
    let s = Setup::new().await;
    let daemons = [s.start().await, s.start().await];
    let leader = wait_for("exactly one leader", Duration::from_secs(30), || {
        let d = &daemons;
        async move {
            let (a, b) = (
                d[0].metric("membersync_cdc_leader").await,
                d[1].metric("membersync_cdc_leader").await,
            );
            assert!(a + b <= 1.0, "two leaders at once");
            (a + b == 1.0).then_some(if a == 1.0 { 0 } else { 1 })
        }
    })
    .await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_1')")
        .await;
    let mut reader = s.reader("cdc_t");
    reader.count(1, Duration::from_secs(30)).await;
    let [first, second] = daemons;
    let (hung, standby) = if leader == 0 {
        (first, second)
    } else {
        (second, first)
    };

    hung.signal("STOP");
    let stopped = Instant::now();
    for id in 2..=6 {
        s.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id) values ({id}, 'mem_{id}')"
        ))
        .await;
    }
    let takeover = wait_for("the standby to take over", Duration::from_secs(30), || {
        let d = &standby;
        async move { (d.metric("membersync_cdc_leader").await == 1.0).then(|| stopped.elapsed()) }
    })
    .await;
    for id in 7..=11 {
        s.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id) values ({id}, 'mem_{id}')"
        ))
        .await;
    }
    let ids: BTreeSet<i64> = (2..=11).collect();
    let events = reader
        .all_ids("c", &ids, Duration::from_secs(30))
        .await
        .to_vec();
    let streaming = stopped.elapsed();
    eprintln!(
        "hung leader: standby leader {:.1} s after SIGSTOP; changes made after it in Kafka {:.1} s after it",
        takeover.as_secs_f64(),
        streaming.as_secs_f64()
    );
    assert!(streaming <= Duration::from_secs(30), "took {streaming:?}");
    let (_, duplicates) = count_ids(&events, "c", &ids);
    assert_eq!(duplicates, 0, "changes after the hang were sent twice");

    // Resumed, the old leader finds its sessions gone and does not stream beside the new one.
    hung.signal("CONT");
    wait_for(
        "the resumed leader to stand by",
        Duration::from_secs(30),
        || {
            let d = &hung;
            async move { (d.metric("membersync_cdc_leader").await == 0.0).then_some(()) }
        },
    )
    .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (12, 'mem_12')")
        .await;
    reader
        .all_ids("c", &BTreeSet::from([12]), Duration::from_secs(30))
        .await;
    assert_eq!(standby.metric("membersync_cdc_leader").await, 1.0);
    assert_eq!(hung.metric("membersync_cdc_leader").await, 0.0);
}

/// A leader cut off from Postgres by dropped packets (a partition, a node that vanished; made
/// by nftables, see `support::partition`): no FIN, no RST, nothing acknowledged. The server
/// keeps the session and its lock until its keepalives or the standby act: the lease goes
/// stale, so the standby terminates that session and streams within 30 s; the cut-off leader
/// gives up by itself.
#[tokio::test]
async fn a_partitioned_leader_is_replaced_within_30_s() {
    let s = Setup::new().await;
    let partition = support::partition::Partition::to_postgres();
    let port = partition.port.to_string();
    let leader = Daemon::start(
        "cdc",
        s.env_with(&[
            ("MEMBERSYNC__DATABASE__PORT", port.as_str()),
            ("MEMBERSYNC__DATABASE__CONNECT_TIMEOUT_SECS", "2"),
        ]),
    )
    .await;
    wait_for(
        "the daemon behind the partition to lead",
        Duration::from_secs(30),
        || {
            let d = &leader;
            async move { (d.metric("membersync_cdc_leader").await == 1.0).then_some(()) }
        },
    )
    .await;
    let standby = s.start().await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id) values (1, 'mem_1')")
        .await;
    let mut reader = s.reader("cdc_t");
    reader.count(1, Duration::from_secs(30)).await;
    assert_eq!(standby.metric("membersync_cdc_leader").await, 0.0);

    partition.cut();
    let cut = Instant::now();
    for id in 2..=6 {
        s.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id) values ({id}, 'mem_{id}')"
        ))
        .await;
    }
    let takeover = wait_for("the standby to take over", Duration::from_secs(30), || {
        let d = &standby;
        async move { (d.metric("membersync_cdc_leader").await == 1.0).then(|| cut.elapsed()) }
    })
    .await;
    for id in 7..=11 {
        s.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id) values ({id}, 'mem_{id}')"
        ))
        .await;
    }
    let ids: BTreeSet<i64> = (2..=11).collect();
    let events = reader
        .all_ids("c", &ids, Duration::from_secs(30))
        .await
        .to_vec();
    let streaming = cut.elapsed();
    eprintln!(
        "partitioned leader: standby leader {:.1} s after the cut; changes made after it in Kafka {:.1} s after it",
        takeover.as_secs_f64(),
        streaming.as_secs_f64()
    );
    assert!(streaming <= Duration::from_secs(30), "took {streaming:?}");
    let (_, duplicates) = count_ids(&events, "c", &ids);
    assert_eq!(duplicates, 0, "changes after the cut were sent twice");
    // Its ops port still answers: the cut-off leader stopped leading on its own.
    wait_for(
        "the cut-off leader to give up",
        Duration::from_secs(30),
        || {
            let d = &leader;
            async move { (d.metric("membersync_cdc_leader").await == 0.0).then_some(()) }
        },
    )
    .await;
}

// ------------------------------------------------------------------------------------------
// 11. An interrupted initial snapshot starts over
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_interrupted_snapshot_restarts_cleanly() {
    const ROWS: i64 = 50_000;
    let s = Setup::new().await;
    s.sql(&format!(
        "insert into public.cdc_t (id, memberstack_id, name) select g, 'mem_' || g, 'snap' from generate_series(1, {ROWS}) g"
    ))
    .await;
    let slot = s.db.slot();
    let mut daemon = s.start().await;
    let admin = &s.admin;
    // Kill it while the snapshot is being delivered to Kafka, before it completed: once records
    // show in Kafka, or once every row is handed to the producer (Tansu may not answer
    // ListOffsets for the whole delivery while it stores the large batches, so the high
    // watermark alone can miss the window).
    let watermarks = Reader::new(&s.kafka, &s.topic("cdc_t"));
    let topic = s.topic("cdc_t");
    let d = &daemon;
    let in_kafka = wait_for(
        "the snapshot to be under way",
        Duration::from_secs(90),
        || {
            let (slot, topic, w) = (slot.clone(), topic.clone(), &watermarks);
            async move {
                let high = w
                    .consumer
                    .fetch_watermarks(&topic, 0, Duration::from_secs(2))
                    .map_or(0, |(_, h)| h);
                let handed_over = events_metric(d, "public.cdc_t", "r").await >= ROWS as f64;
                let open = admin
                    .query_opt(
                        "select 1 from membersync_meta.cdc_snapshots s
                     join pg_replication_slots r on r.slot_name = s.slot_name
                     where s.slot_name = $1 and s.completed_at is null",
                        &[&slot],
                    )
                    .await
                    .unwrap()
                    .is_some();
                (open && (high > 0 || handed_over)).then_some(high)
            }
        },
    )
    .await;
    daemon.signal("KILL");
    let _ = daemon.child.wait();
    let produced: Option<bool> = admin
        .query_opt(
            "select completed_at is null from membersync_meta.cdc_snapshots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert_eq!(
        produced,
        Some(true),
        "the kill came after the snapshot completed: make the table larger"
    );
    let (first_point, first_started): (Option<String>, String) = {
        let r = admin
            .query_one(
                "select consistent_point::text, started_at::text from membersync_meta.cdc_snapshots
                 where slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };

    // Between the two runs, and during the second snapshot.
    s.sql("insert into public.cdc_t (id, memberstack_id) select g, 'mem_' || g from generate_series(50001, 50100) g")
        .await;
    let started = Instant::now();
    let _daemon = s.start().await;
    // Once the new slot exists, new rows belong to the stream, not to the snapshot.
    wait_for(
        "the second snapshot's slot",
        Duration::from_secs(90),
        || {
            let (slot, first_started) = (slot.clone(), first_started.clone());
            async move {
                admin
                    .query_opt(
                        "select 1 from membersync_meta.cdc_snapshots s
                     join pg_replication_slots r on r.slot_name = s.slot_name
                     where s.slot_name = $1 and s.started_at::text <> $2
                       and r.confirmed_flush_lsn is not null",
                        &[&slot, &first_started],
                    )
                    .await
                    .unwrap()
                    .map(|_| ())
            }
        },
    )
    .await;
    s.sql("insert into public.cdc_t (id, memberstack_id) select g, 'mem_' || g from generate_series(50101, 50200) g")
        .await;
    s.snapshot_done().await;
    let (point, rows): (String, i64) = {
        let r = admin
            .query_one(
                "select consistent_point::text, rows from membersync_meta.cdc_snapshots where slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(first_point, None, "the interrupted run never completed");
    let point = parse_lsn(&point);

    let mut reader = s.reader("cdc_t");
    let all: BTreeSet<i64> = (1..=ROWS + 200).collect();
    let (mut seen, mut scanned) = (BTreeSet::new(), 0);
    let events = reader
        .until("every row", Duration::from_secs(90), |events| {
            for e in &events[scanned..] {
                if e.op() == "c" || (e.op() == "r" && e.value["source"]["lsn"] == point) {
                    seen.extend(e.id());
                }
            }
            scanned = events.len();
            seen.len() >= all.len() && all.is_subset(&seen)
        })
        .await;
    let second_run: BTreeSet<i64> = events
        .iter()
        .filter(|e| e.op() == "r" && e.value["source"]["lsn"] == point)
        .filter_map(Event::id)
        .collect();
    let first_run = events
        .iter()
        .filter(|e| e.op() == "r" && e.value["source"]["lsn"] != point)
        .count();
    let streamed = events.iter().filter(|e| e.op() == "c").count();
    eprintln!(
        "interrupted snapshot: killed with {in_kafka} records seen in Kafka ({first_run} read back), then {} in the new snapshot \
         (rows = {rows}) and {streamed} streamed, {:.1} s after the restart",
        second_run.len(),
        started.elapsed().as_secs_f64()
    );
    let pre: BTreeSet<i64> = (1..=ROWS + 100).collect();
    assert!(
        pre.is_subset(&second_run),
        "every row present before the restart is in the new snapshot"
    );
    assert_eq!(
        rows as usize,
        second_run.len(),
        "cdc_snapshots.rows counts the snapshot"
    );
    let late: BTreeSet<i64> = (ROWS + 101..=ROWS + 200).collect();
    assert!(
        late.is_disjoint(&second_run),
        "rows committed after the slot's creation are not in its snapshot"
    );
    assert!(streamed >= late.len(), "they are streamed");
}

// ------------------------------------------------------------------------------------------
// 12. A lost slot is loud and is not re-created
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lost_slot_is_reported_and_not_recreated() {
    let cluster = TempCluster::start(&[
        "wal_level = logical",
        "max_slot_wal_keep_size = 1MB",
        "wal_keep_size = 0",
        "min_wal_size = 32MB",
        "max_wal_size = 32MB",
        "checkpoint_timeout = 1h",
    ]);
    let mut admin = cluster.connect().await;
    let bootstrap =
        std::fs::read_to_string(support::repo_root().join("scripts/supabase-bootstrap.sql"))
            .unwrap();
    admin.batch_execute(&bootstrap).await.expect("bootstrap");
    admin
        .batch_execute("create role membersync login replication password 'membersync-test'")
        .await
        .unwrap();
    membersync::db::migrate::migrate(&mut admin)
        .await
        .expect("migrate");
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("password");
    std::fs::write(&password, "membersync-test").unwrap();
    let slot = support::unique_name("lost");
    let broker = Broker::start().await;
    let mut kafka = support::kafka::config();
    kafka.brokers = broker.addr();
    let env: Vec<(String, String)> = [
        ("MEMBERSYNC__DATABASE__HOST", "127.0.0.1".to_owned()),
        ("MEMBERSYNC__DATABASE__PORT", cluster.port.to_string()),
        ("MEMBERSYNC__DATABASE__DBNAME", "postgres".into()),
        ("MEMBERSYNC__DATABASE__USER", "membersync".into()),
        (
            "MEMBERSYNC__DATABASE__PASSWORD_FILE",
            password.display().to_string(),
        ),
        ("MEMBERSYNC__DATABASE__ADMIN_USER", "postgres".into()),
        (
            "MEMBERSYNC__DATABASE__ADMIN_PASSWORD_FILE",
            password.display().to_string(),
        ),
        ("MEMBERSYNC__CDC__SLOT", slot.clone()),
        ("MEMBERSYNC__CDC__SLOT_POLL_INTERVAL_SECS", "1".into()),
        ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.clone()),
        (
            "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
            kafka.topic_prefix.clone(),
        ),
        ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let mut daemon = Daemon::start("cdc", env.clone()).await;
    let adm = &admin;
    let started_at: String = wait_for("the slot and its snapshot", Duration::from_secs(30), || {
        let slot = slot.clone();
        async move {
            adm.query_opt(
                "select s.started_at::text from membersync_meta.cdc_snapshots s
                 join pg_replication_slots r on r.slot_name = s.slot_name
                 where s.slot_name = $1 and s.completed_at is not null",
                &[&slot],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
        }
    })
    .await;
    assert!(daemon.terminate().await.success());

    // WAL the slot would need, beyond max_slot_wal_keep_size, then checkpoints that remove it.
    admin
        .batch_execute("create table public.junk (g int, pad text)")
        .await
        .unwrap();
    wait_for("the slot to be lost", Duration::from_secs(60), || {
        let slot = slot.clone();
        async move {
            adm.batch_execute(
                "insert into public.junk select g, repeat('x', 1000) from generate_series(1, 4000) g;
                 select pg_switch_wal();",
            )
            .await
            .unwrap();
            adm.batch_execute("checkpoint").await.unwrap();
            let status: String = adm
                .query_one("select coalesce(wal_status, '') from pg_replication_slots where slot_name = $1", &[&slot])
                .await
                .unwrap()
                .get(0);
            (status == "lost").then_some(())
        }
    })
    .await;

    let daemon = Daemon::start("cdc", env).await;
    wait_for(
        "membersync_cdc_slot_lost 1",
        Duration::from_secs(30),
        || {
            let d = &daemon;
            async move { (d.metric("membersync_cdc_slot_lost").await == 1.0).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        daemon.metric("membersync_cdc_leader").await,
        0.0,
        "CDC stopped"
    );
    // Loud: the stop shows in readiness and its own gauge, and the WAL it pins in the lag.
    assert_eq!(daemon.metric("membersync_cdc_stopped").await, 1.0);
    let (status, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("CDC stopped"), "{body}");
    wait_for(
        "the lag of the stopped slot",
        Duration::from_secs(10),
        || {
            let d = &daemon;
            async move { (d.metric("membersync_cdc_slot_lag_bytes").await > 0.0).then_some(()) }
        },
    )
    .await;
    let (status, again): (String, String) = {
        let r = admin
            .query_one(
                "select coalesce(r.wal_status, ''), s.started_at::text from pg_replication_slots r
                 join membersync_meta.cdc_snapshots s on s.slot_name = r.slot_name where r.slot_name = $1",
                &[&slot],
            )
            .await
            .expect("the slot still exists");
        (r.get(0), r.get(1))
    };
    assert_eq!(status, "lost", "the slot was not re-created");
    assert_eq!(again, started_at, "no new snapshot was started");
}

// ------------------------------------------------------------------------------------------
// 13. A change too large for Kafka never wedges the stream
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_change_too_large_for_kafka_is_replaced_and_the_stream_moves_on() {
    let s = Setup::new().await;
    let daemon = s.start().await;
    s.snapshot_done().await;
    s.sql("insert into public.cdc_t (id, memberstack_id, name) values (1, 'mem_1', 'small')")
        .await;
    // cdc_t has no size limit (members has, V13): 1.3 MB, over Kafka's default 1 MB record.
    s.sql("update public.cdc_t set big = repeat('x', 1300000), name = 'grown' where id = 1")
        .await;
    s.sql("insert into public.cdc_t (id, memberstack_id, name) values (2, 'mem_2', 'after')")
        .await;

    let mut reader = s.reader("cdc_t");
    let events = reader
        .until(
            "the change after the oversized one",
            Duration::from_secs(60),
            |e| e.iter().any(|e| e.op() == "c" && e.id() == Some(2)),
        )
        .await
        .to_vec();
    let reference = events
        .iter()
        .find(|e| e.op() == "u" && e.id() == Some(1))
        .expect("the reference record of the oversized update");
    let v = &reference.value;
    assert_eq!(v["truncated"], true, "{v}");
    assert_eq!(v["source"]["truncated_columns"], json!(["big"]), "{v}");
    assert_eq!(v["source"]["table"], "cdc_t");
    assert!(v["source"]["lsn"].as_u64().unwrap() > 0);
    assert_eq!(v["after"]["name"], "grown", "small columns are kept");
    assert!(
        v["after"].get("big").is_none(),
        "the cut column is left out"
    );
    assert_eq!(reference.key.as_deref(), Some("1"));
    // In commit order: the reference sits where the change was.
    let pos = |id: i64, op: &str| {
        events
            .iter()
            .position(|e| e.op() == op && e.id() == Some(id))
    };
    assert!(pos(1, "c") < pos(1, "u") && pos(1, "u") < pos(2, "c"));

    // The slot moved past the change after it: nothing is stuck.
    let after = events
        .iter()
        .find(|e| e.id() == Some(2))
        .unwrap()
        .commit_lsn();
    let admin = &s.admin;
    let slot = s.db.slot();
    wait_for(
        "the slot to confirm past the later change",
        Duration::from_secs(30),
        || {
            let slot = slot.clone();
            async move { (slot_confirmed(admin, &slot).await? >= after).then_some(()) }
        },
    )
    .await;

    // The dead letter names the row (key = its primary key) and carries the reference.
    let mut dlq = Reader::new(&s.kafka, &format!("{}.dlq", s.kafka.topic_prefix));
    let letters = dlq.count(1, Duration::from_secs(30)).await;
    let letter = &letters[0].value;
    assert_eq!(letter["error"]["kind"], "cdc_record_too_large", "{letter}");
    assert_eq!(letter["error"]["retryable"], false);
    assert_eq!(letter["key"], "1");
    assert_eq!(letter["origin"]["topic"], s.topic("cdc_t"));
    assert_eq!(letter["value"]["after"]["id"], 1);
    assert_eq!(letter["value"]["truncated"], true);
    assert!(letter.to_string().len() < 1_000_000);
    // Both follow their published schemas.
    for (name, record) in [("cdc", v), ("dlq", letter)] {
        let path = support::repo_root().join(format!("schemas/kafka/{name}.json"));
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(record)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}\n{record}");
    }

    assert_eq!(
        daemon
            .metric("membersync_cdc_oversized_records_total{table=\"public.cdc_t\"}")
            .await,
        1.0
    );
    assert_eq!(daemon.metric("membersync_cdc_stopped").await, 0.0);
    let (status, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[path = "incremental.rs"]
mod incremental;

// ------------------------------------------------------------------------------------------
// cdc.replica_identity (Debezium's replica.identity.autoset.values)
// ------------------------------------------------------------------------------------------

/// The leader sets the configured identity where the daemon role may (here it owns `cdc_t`),
/// and leaves a table it may not alter as it is (`members`, owned by the migrating role, is
/// FULL since V18 anyway): updates then carry the whole old row.
#[tokio::test]
async fn the_configured_replica_identity_is_set_at_start() {
    let s = Setup::new().await;
    s.sql("alter table public.cdc_t owner to membersync").await;
    let identity = |table: &'static str| {
        let admin = &s.admin;
        async move {
            let c: i8 = admin
                .query_one(
                    "select relreplident::\"char\" from pg_class where oid = $1::text::regclass",
                    &[&table],
                )
                .await
                .unwrap()
                .get(0);
            c as u8
        }
    };
    assert_eq!(identity("public.cdc_t").await, b'd');
    let env = s.env_with(&[(
        "MEMBERSYNC__CDC__REPLICA_IDENTITY",
        r#"{"public.cdc_t"="full","public.members"="full"}"#,
    )]);
    let _daemon = Daemon::start("cdc", env).await;
    s.snapshot_done().await;
    assert_eq!(identity("public.cdc_t").await, b'f', "set by the leader");
    assert_eq!(identity("public.members").await, b'f', "V18");
    s.sql("insert into public.cdc_t (id, memberstack_id, name) values (1, 'mem_1', 'a')")
        .await;
    s.sql("update public.cdc_t set name = 'b' where id = 1")
        .await;
    let events = s
        .reader("cdc_t")
        .count(2, Duration::from_secs(30))
        .await
        .to_vec();
    assert_eq!(events[1].value["before"]["name"], "a", "{:?}", events[1]);
}

// ------------------------------------------------------------------------------------------
// cdc.time_precision_mode (Debezium's time.precision.mode)
// ------------------------------------------------------------------------------------------

/// `adaptive`: dates as days, times and timestamps as micro- or milliseconds by precision, in
/// snapshot rows and streamed changes alike; `timestamptz` stays an ISO string.
#[tokio::test]
async fn adaptive_time_precision_publishes_debezium_numbers() {
    let s = Setup::with_kafka(support::kafka::config()).await;
    s.sql(
        "alter table public.cdc_t add column d date, add column t time, add column t3 time(3),
           add column lts timestamp, add column lts0 timestamp(0), add column ds date[]",
    )
    .await;
    s.sql(
        "insert into public.cdc_t (id, memberstack_id, d, t, t3, lts, lts0, ds) values
           (1, 'mem_1', '2024-02-29', '12:34:56.789012', '00:00:01.5', '2024-02-29 12:34:56.789012',
            '1969-12-31 23:59:59', '{1970-01-02,NULL}')",
    )
    .await;
    let env = s.env_with(&[("MEMBERSYNC__CDC__TIME_PRECISION_MODE", "adaptive")]);
    let _daemon = Daemon::start("cdc", env).await;
    s.snapshot_done().await;
    s.sql("update public.cdc_t set name = 'x' where id = 1")
        .await;
    let events = s
        .reader("cdc_t")
        .count(2, Duration::from_secs(30))
        .await
        .to_vec();
    for e in &events {
        let a = &e.value["after"];
        assert_eq!(a["d"], 19_782, "{a}");
        assert_eq!(a["t"], 45_296_789_012i64, "{a}");
        assert_eq!(a["t3"], 1_500, "{a}");
        assert_eq!(a["lts"], 1_709_210_096_789_012i64, "{a}");
        assert_eq!(a["lts0"], -1_000, "{a}");
        assert_eq!(a["ds"], json!([1, null]), "{a}");
    }
    assert_eq!(events[1].value["op"], "u");
}
