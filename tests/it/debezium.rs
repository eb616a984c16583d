//! Debezium compatibility proven by a consumer membersync did not write: the records of a CDC
//! topic (a snapshot, inserts, updates including one that leaves a TOASTed value unchanged,
//! deletes with their tombstones, a primary-key change, a truncate) are fed to Flink SQL's
//! `debezium-json` format (`tests/it/debezium/flink_materialize.py`, PyPI `apache-flink` on the
//! installed JDK), and the table Flink materialises must equal the Postgres table.
//!
//! Flink is required: without it the test fails, naming the install command.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

use crate::support::{self, TestDb, daemon::Daemon, repo_root, wait_for};

/// The install command CI runs (and the message of a missing Flink).
const INSTALL: &str = "python3 -m pip install apache-flink==2.3.0";

const TABLE: &str = r#"
create table public.dbz_t (
  id int primary key,
  code text not null,
  name text,
  big text,
  n numeric,
  js jsonb,
  ts timestamptz,
  flag boolean
);
alter table public.dbz_t replica identity full;
grant select on public.dbz_t to membersync;
alter publication membersync add table public.dbz_t;
"#;

/// The Python that runs Flink: `MEMBERSYNC_FLINK_PYTHON`, else `python3`.
fn flink_python() -> String {
    let python = std::env::var("MEMBERSYNC_FLINK_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import pyflink.table"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "Flink SQL is missing: `{python} -c 'import pyflink.table'` failed. Install it with \
         `{INSTALL}` (needs a JDK 11+ as `java`), or point MEMBERSYNC_FLINK_PYTHON at a Python \
         that has it."
    );
    python
}

/// Reads partition 0 of `topic` from the start until `done(records so far)`, then on to the
/// partition's end. Values are `None` for tombstones.
async fn read_all(
    kafka: &membersync::config::KafkaConfig,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Option<Value>]) -> bool,
) -> Vec<Option<Value>> {
    let consumer: StreamConsumer = membersync::kafka::client_config(kafka)
        .set("group.id", support::unique_name("dbz-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out: Vec<Option<Value>> = Vec::new();
    let mut end: Option<i64> = None;
    loop {
        if end.is_none() && done(&out) {
            let (_, high) = consumer
                .fetch_watermarks(topic, 0, Duration::from_secs(10))
                .expect("watermarks");
            end = Some(high);
        }
        if end.is_some_and(|high| out.len() as i64 >= high) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "timed out reading {topic}: {} records, last {:?}",
            out.len(),
            out.last()
        );
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            out.push(
                m.payload()
                    .map(|p| serde_json::from_slice(p).expect("a CDC record value is JSON")),
            );
        }
    }
}

/// One row as compared: JSON normalised (jsonb spacing, timestamp precision).
fn normalise(row: &[Value]) -> String {
    let mut r = row.to_vec();
    if let Some(Value::String(js)) = r.get(5) {
        r[5] = serde_json::from_str(js).unwrap_or_else(|e| panic!("js {js}: {e}"));
    }
    if let Some(Value::String(ts)) = r.get(6) {
        let t: DateTime<Utc> = ts.parse().unwrap_or_else(|e| panic!("ts {ts}: {e}"));
        r[6] = Value::String(t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string());
    }
    Value::Array(r).to_string()
}

#[tokio::test]
async fn flink_debezium_json_materialises_the_postgres_table() {
    let python = flink_python();
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    admin.batch_execute(TABLE).await.expect("create dbz_t");
    // Snapshot rows: one with a value stored out of line (random hex does not compress).
    admin
        .batch_execute(
            "insert into public.dbz_t values
               (1, 'one', 'a', (select string_agg(md5(random()::text), '') from generate_series(1, 400)),
                12345678901234567890.123456789, '{\"k\": [1, 2.5, null]}', '2024-02-29 12:34:56.789+02', true),
               (2, 'two', 'b', 'small', -0.5, '\"s\"', '1999-12-31 23:59:59.999999-08', false),
               (3, 'three', null, null, null, null, null, null)",
        )
        .await
        .unwrap();
    let mut kafka = support::kafka::config();
    kafka.topic_partitions = 1;
    let mut env = db.env();
    env.extend(
        [
            ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.as_str()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
                kafka.topic_prefix.as_str(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1"),
            (
                "MEMBERSYNC__CDC__TABLES",
                r#"["public.members","public.dbz_t"]"#,
            ),
            ("MEMBERSYNC__CDC__STATUS_INTERVAL_MS", "200"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let mut daemon = Daemon::start("cdc", env).await;
    let slot = db.slot();
    wait_for("the initial snapshot", Duration::from_secs(60), || {
        let (admin, slot) = (&admin, slot.clone());
        async move {
            admin
                .query_opt(
                    "select 1 from membersync_meta.cdc_snapshots where slot_name = $1 and completed_at is not null",
                    &[&slot],
                )
                .await
                .unwrap()
                .map(|_| ())
        }
    })
    .await;

    for sql in [
        // Inserts, several in one transaction.
        "insert into public.dbz_t values
           (4, 'four', 'd', 'x', 0, '[]', '2024-01-01 00:00:00+00', true),
           (5, 'five', 'e', null, 1e-6, '{}', '2024-01-01 00:00:00.5+00', null)",
        // An update that leaves the TOASTed `big` unchanged.
        "update public.dbz_t set name = 'a!' where id = 1",
        // Several updates of one row in one transaction: one LSN each.
        "begin; update public.dbz_t set n = n + 1 where id = 4;
                update public.dbz_t set n = n + 1 where id = 4;
                update public.dbz_t set js = '{\"z\": true}' where id = 4; commit",
        "delete from public.dbz_t where id = 2",
        "update public.dbz_t set flag = true, ts = now() where id = 5",
        // A primary-key change: a delete of 3, a tombstone, a create of 30.
        "update public.dbz_t set id = 30, code = 'thirty' where id = 3",
    ] {
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let expected: BTreeSet<String> = admin
        .query(
            "select json_build_array(id, code, name, big, n::text, js::text,
                    to_char(ts at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), flag)::text
             from public.dbz_t",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let row: Value = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
            normalise(row.as_array().unwrap())
        })
        .collect();
    assert_eq!(expected.len(), 4);
    // A truncate (Debezium's default `skipped.operations = t` leaves it out of the topic: a
    // Debezium consumer never sees one), and after it, in the same transaction, a marker row
    // on another table that says the truncate was streamed.
    admin
        .batch_execute(
            "begin; truncate public.dbz_t;
             insert into public.members (memberstack_id) values ('mem_after_truncate'); commit",
        )
        .await
        .unwrap();
    let members = format!("{}.cdc.public.members", kafka.topic_prefix);
    read_all(&kafka, &members, Duration::from_secs(60), |r| {
        r.iter()
            .flatten()
            .any(|v| v["after"]["memberstack_id"] == "mem_after_truncate")
    })
    .await;
    let topic = format!("{}.cdc.public.dbz_t", kafka.topic_prefix);
    let records = read_all(&kafka, &topic, Duration::from_secs(60), |r| {
        r.iter().flatten().any(|v| v["after"]["id"] == 30)
    })
    .await;
    daemon.terminate().await;

    // What Flink will read, as membersync produced it.
    let ops: Vec<&str> = records
        .iter()
        .map(|r| {
            r.as_ref()
                .map_or("tombstone", |v| v["op"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        ops,
        [
            "r",
            "r",
            "r",
            "c",
            "c",
            "u",
            "u",
            "u",
            "u",
            "d",
            "tombstone",
            "u",
            "d",
            "tombstone",
            "c"
        ],
        "no truncate, a tombstone after each delete, a key change as delete + tombstone + create"
    );
    let values: Vec<&Value> = records.iter().flatten().collect();
    let snapshot: Vec<&str> = values[..3]
        .iter()
        .map(|v| v["source"]["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(snapshot, ["first", "true", "last"]);
    for v in &values[..3] {
        assert!(v["source"]["txId"].is_u64(), "{v}");
        assert_eq!(
            v["source"]["sequence"],
            format!("[null,\"{}\"]", v["source"]["lsn"]),
            "{v}"
        );
    }
    let toast = &values[5];
    assert_eq!(toast["after"]["name"], "a!");
    assert_eq!(
        toast["after"]["big"], toast["before"]["big"],
        "the unchanged TOASTed value filled from the FULL before image"
    );
    let lsns: Vec<u64> = values[6..9]
        .iter()
        .map(|v| v["source"]["lsn"].as_u64().unwrap())
        .collect();
    assert!(
        lsns[0] < lsns[1] && lsns[1] < lsns[2],
        "each change its own LSN: {lsns:?}"
    );
    for v in &values[3..] {
        let seq: Vec<Option<String>> =
            serde_json::from_str(v["source"]["sequence"].as_str().unwrap()).unwrap();
        assert_eq!(seq[1], Some(v["source"]["lsn"].to_string()), "{v}");
        assert!(seq[0].is_some(), "the last commit LSN is known: {v}");
        assert_eq!(v["source"]["connector"], "postgresql");
    }

    // Flink reads the records (a tombstone is an empty line, as a null Kafka value).
    let dir = std::env::temp_dir().join(support::unique_name("dbz"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("records.json");
    let lines: Vec<String> = records
        .iter()
        .map(|r| r.as_ref().map_or(String::new(), Value::to_string))
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let script = repo_root().join("tests/it/debezium/flink_materialize.py");
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(&file)
            .output()
            .expect("run Flink")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Flink failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.trim_start().starts_with("at "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("Flink ran in {:?}", started.elapsed());
    let materialised: BTreeSet<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ROW "))
        .map(|l| {
            let row: Value = serde_json::from_str(l).unwrap();
            normalise(row.as_array().unwrap())
        })
        .collect();
    assert_eq!(
        materialised, expected,
        "Flink's table equals Postgres' (before the truncate, which Debezium consumers never see)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cdc.key_format = "debezium"`: every key is Debezium's JSON object of the key columns, the
/// tombstone after a delete included; `member_id_of_key` reads the member back.
#[tokio::test]
async fn debezium_key_format_keys_by_a_json_object() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    let mut kafka = support::kafka::config();
    kafka.topic_partitions = 1;
    let mut env = db.env();
    env.extend(
        [
            ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.as_str()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
                kafka.topic_prefix.as_str(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1"),
            ("MEMBERSYNC__CDC__KEY_FORMAT", "debezium"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    admin
        .batch_execute("insert into public.members (memberstack_id) values ('mem_a')")
        .await
        .unwrap();
    let mut daemon = Daemon::start("cdc", env).await;
    let topic = format!("{}.cdc.public.members", kafka.topic_prefix);
    support::kafka::consume(&kafka, &topic, 1, Duration::from_secs(60)).await;
    admin
        .batch_execute(
            "update public.members set email = 'a@example.com' where memberstack_id = 'mem_a';
             delete from public.members where memberstack_id = 'mem_a'",
        )
        .await
        .unwrap();
    // r, u, d, tombstone
    let records = support::kafka::consume(&kafka, &topic, 4, Duration::from_secs(60)).await;
    daemon.terminate().await;
    for m in &records {
        let key = m.key().expect("every record is keyed");
        assert_eq!(key, br#"{"memberstack_id":"mem_a"}"#);
        assert_eq!(
            membersync::cdc::envelope::member_id_of_key(key).as_deref(),
            Some("mem_a")
        );
    }
    assert!(records[3].payload().is_none(), "the delete's tombstone");
    let update: Value = serde_json::from_slice(records[1].payload().unwrap()).unwrap();
    assert_eq!(update["op"], "u");
    assert_eq!(
        update["before"]["email"],
        Value::Null,
        "FULL (V18): the whole old row"
    );
    assert_eq!(update["before"]["memberstack_id"], "mem_a");
}
