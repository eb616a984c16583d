//! The bridge end to end: the real `membersync bridge` binary on the dev broker, outcomes
//! produced to a per-test `<prefix>.sync` topic, delivered over real HTTP to the Make.com
//! simulator; its dead letters read back from `<prefix>.bridge.dlq` and its committed offsets
//! from the broker.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::Duration;

use membersync::bridge::dlq::BridgeDeadLetter;
use membersync::config::KafkaConfig;
use membersync::kafka::admin::KafkaAdmin;
use membersync::kafka::producer::{Delivered, Producer, Record};
use membersync::kafka::topics::Topics;
use membersync::sim::make::{MakeConfig, MakeSim};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::support::{self, daemon::Daemon, wait_for};

const WAIT: Duration = Duration::from_secs(30);
const APPLIED: &str = "tok-applied-s3cr3t";
const PLANS: &str = "tok-plans-s3cr3t";

/// Fields drop in order: the bridge stops before the simulator.
struct Stack {
    daemon: Daemon,
    make: MakeSim,
    kafka: KafkaConfig,
    topics: Topics,
    producer: Producer,
    group: String,
    env: Vec<(String, String)>,
    _config: tempfile::NamedTempFile,
}

impl Stack {
    /// Routes: `applied` (statuses = applied; its URL from the environment) and `plans`
    /// (event types member.plan.*; its URL in the file).
    async fn start(commit_interval_ms: u64) -> Stack {
        let kafka = support::kafka::config();
        let topics = Topics::new(&kafka.topic_prefix);
        KafkaAdmin::new(&kafka)
            .unwrap()
            .ensure_topics(&[topics.sync(), topics.bridge_dlq()])
            .await
            .expect("create the test's topics");
        let make = MakeSim::start(MakeConfig::default())
            .await
            .expect("make simulator");
        let group = support::unique_name("bridge");
        let mut config = tempfile::NamedTempFile::new().unwrap();
        write!(
            config,
            r#"
[bridge]
group_id = "{group}"
max_attempts = 3
backoff_base_ms = 50
backoff_max_ms = 200
request_timeout_ms = 2000
commit_interval_ms = {commit_interval_ms}
session_timeout_ms = 6000

[bridge.routes.applied]
statuses = ["applied"]

[bridge.routes.plans]
url = "{plans}"
event_types = ["member.plan.*"]
"#,
            plans = make.hook_url(PLANS),
        )
        .unwrap();
        let env: Vec<(String, String)> = vec![
            (
                "MEMBERSYNC_CONFIG".into(),
                config.path().display().to_string(),
            ),
            ("MEMBERSYNC__KAFKA__BROKERS".into(), kafka.brokers.clone()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX".into(),
                kafka.topic_prefix.clone(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS".into(), "3".into()),
            (
                "MEMBERSYNC__KAFKA__STATISTICS_INTERVAL_MS".into(),
                "300".into(),
            ),
            // A webhook URL is a secret: this one comes from the environment.
            (
                "MEMBERSYNC__BRIDGE__ROUTES__APPLIED__URL".into(),
                make.hook_url(APPLIED),
            ),
        ];
        let daemon = Daemon::start("bridge", env.clone()).await;
        let producer = Producer::new(&kafka, Duration::from_secs(10)).unwrap();
        Stack {
            daemon,
            make,
            kafka,
            topics,
            producer,
            group,
            env,
            _config: config,
        }
    }

    async fn restart(&mut self) {
        self.daemon = Daemon::start("bridge", self.env.clone()).await;
    }

    /// Produces `outcome` keyed by its member; returns where it landed.
    async fn produce(&self, outcome: &Value) -> Delivered {
        crate::schemas::assert_valid("sync", outcome, "the test's outcome");
        let payload = serde_json::to_vec(outcome).unwrap();
        let key = outcome["member_id"].as_str().unwrap_or_default().to_owned();
        let topic = self.topics.sync();
        let record = Record {
            topic: &topic,
            key: key.as_bytes(),
            payload: &payload,
            headers: &[("content-type", b"application/json")],
        };
        self.producer
            .send(&record, Duration::from_secs(5))
            .await
            .expect("produce an outcome")
    }

    /// The requests the hook accepted for outcome `event_id`.
    fn received(&self, token: &str, event_id: &str) -> Vec<membersync::sim::make::HookRequest> {
        self.make
            .requests_to(token)
            .into_iter()
            .filter(|r| r.header("x-membersync-event-id") == Some(event_id))
            .collect()
    }

    async fn wait_received(&self, token: &str, event_id: &str, n: usize) {
        wait_for(
            &format!("{n} deliveries of {event_id} to {token}"),
            WAIT,
            || async move { (self.received(token, event_id).len() >= n).then_some(()) },
        )
        .await;
    }

    /// The group's committed offsets on the sync topic (the next offset to read).
    fn committed(&self) -> HashMap<i32, i64> {
        let consumer: BaseConsumer = membersync::kafka::client_config(&self.kafka)
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition(&self.topics.sync(), p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(5))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }

    fn is_committed(&self, at: Delivered) -> bool {
        self.committed()
            .get(&at.partition)
            .is_some_and(|next| *next > at.offset)
    }

    async fn wait_committed(&self, at: Delivered) {
        wait_for(
            &format!(
                "offset {} of partition {} committed",
                at.offset, at.partition
            ),
            WAIT,
            || async move { self.is_committed(at).then_some(()) },
        )
        .await;
    }

    /// `membersync_kafka_consumer_lag` of this group: partition → value.
    async fn lag(&self) -> HashMap<String, f64> {
        let (_, text) = self.daemon.get("/metrics").await.expect("metrics");
        let group = format!("group=\"{}\"", self.group);
        text.lines()
            .filter(|l| l.starts_with("membersync_kafka_consumer_lag{") && l.contains(&group))
            .filter_map(|l| {
                let partition = l.split("partition=\"").nth(1)?.split('"').next()?;
                let value = l.rsplit(' ').next()?.parse().ok()?;
                Some((partition.to_owned(), value))
            })
            .collect()
    }
}

fn outcome(member: &str, event_id: &str, status: &str, source: &str, event_type: &str) -> Value {
    let mut o = json!({
        "schema_version": 1,
        "id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, event_id.as_bytes()).to_string(),
        "event_id": event_id,
        "member_id": member,
        "user_id": null,
        "source": source,
        "event_type": event_type,
        "status": status,
        "fields": [],
        "conflicts": [],
        "created": false,
        "deleted": false,
        "origin": {"topic": "membersync.memberstack", "partition": 0, "offset": 1},
        "occurred_at": "2024-05-14T09:21:07.512Z",
        "processed_at": "2024-05-14T09:21:08.164Z",
        "attempts": 1
    });
    match status {
        "failed" => o["error"] = json!("Supabase Auth request timed out"),
        "skipped" | "duplicate" => o["reason"] = json!("the Stripe event names no member"),
        _ => {}
    }
    o
}

fn event_id() -> String {
    support::unique_name("evt")
}

#[tokio::test]
async fn outcomes_are_delivered_per_route_in_member_order_and_unrouted_ones_committed() {
    let s = Stack::start(200).await;
    let (e1, e2, e3, e4) = (event_id(), event_id(), event_id(), event_id());
    let o1 = outcome("mem_a", &e1, "applied", "memberstack", "member.updated");
    let o2 = outcome(
        "mem_a",
        &e2,
        "applied",
        "memberstack",
        "member.plan.updated",
    );
    let o3 = outcome("mem_b", &e3, "failed", "memberstack", "member.plan.added");
    let o4 = outcome(
        "mem_c",
        &e4,
        "skipped",
        "stripe",
        "customer.subscription.updated",
    );
    let mut at = Vec::new();
    for o in [&o1, &o2, &o3, &o4] {
        at.push(s.produce(o).await);
    }
    s.wait_received(APPLIED, &e2, 1).await;
    s.wait_received(PLANS, &e3, 1).await;
    s.wait_received(PLANS, &e2, 1).await;
    for a in &at {
        s.wait_committed(*a).await;
    }

    // applied: o1 then o2 (one member, in order); plans: o2 and o3; o4 nowhere.
    let applied = s.make.requests_to(APPLIED);
    let ids: Vec<_> = applied
        .iter()
        .map(|r| r.header("x-membersync-event-id").unwrap())
        .collect();
    assert_eq!(ids, [e1.as_str(), e2.as_str()]);
    assert_eq!(s.make.requests_to(PLANS).len(), 2);
    assert_eq!(s.make.calls().len(), 4, "o4 (skipped) is routed nowhere");

    // What Make receives: the outcome itself, with headers to route and deduplicate on.
    let r = &applied[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.body, o1);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("x-membersync-outcome-id"),
        o1["id"].as_str(),
        "{r:?}"
    );
    assert_eq!(r.header("x-membersync-status"), Some("applied"));
    assert_eq!(r.header("x-membersync-event-type"), Some("member.updated"));
    assert_eq!(r.header("x-membersync-route"), Some("applied"));
    assert_eq!(r.header("x-membersync-attempt"), Some("1"));
    assert!(r.header("user-agent").unwrap().starts_with("membersync/"));

    let d = &s.daemon;
    assert_eq!(
        d.metric(r#"membersync_bridge_deliveries_total{route="applied",status="200"}"#)
            .await,
        2.0
    );
    assert_eq!(
        d.metric(r#"membersync_bridge_deliveries_total{route="plans",status="200"}"#)
            .await,
        2.0
    );
    assert_eq!(
        d.metric(r#"membersync_bridge_outcomes_total{result="unrouted"}"#)
            .await,
        1.0
    );
    assert_eq!(
        d.metric(r#"membersync_bridge_delivery_seconds_count{route="plans"}"#)
            .await,
        2.0
    );
    // Everything committed: the group's lag drops to 0 on every partition it holds.
    let lag = wait_for("consumer lag 0 on all 3 partitions", WAIT, || async {
        let lag = s.lag().await;
        (lag.len() == 3 && lag.values().all(|v| *v == 0.0)).then_some(lag)
    })
    .await;
    assert_eq!(lag.len(), 3);
    // The tokens never reach the logs' or metrics' view of the world.
    let (_, metrics) = d.get("/metrics").await.unwrap();
    assert!(!metrics.contains("s3cr3t"));
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_delivered_once() {
    let s = Stack::start(200).await;
    s.make.set_retry_after(3);
    s.make.rate_limit_next(1);
    let e1 = event_id();
    let at = s
        .produce(&outcome(
            "mem_r",
            &e1,
            "applied",
            "memberstack",
            "member.updated",
        ))
        .await;
    // While the bridge waits, the outcome is read but not committed: the lag shows it.
    let lag = wait_for("a consumer lag of 1 during the wait", WAIT, || async {
        let lag = s.lag().await;
        let p = at.partition.to_string();
        lag.get(&p).copied().filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(lag, 1.0);
    assert!(s.received(APPLIED, &e1).is_empty(), "not before the wait");
    s.wait_received(APPLIED, &e1, 1).await;
    s.wait_committed(at).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let delivered = s.received(APPLIED, &e1);
    assert_eq!(delivered.len(), 1, "delivered once");
    assert_eq!(delivered[0].header("x-membersync-attempt"), Some("2"));
    let calls = s.make.calls();
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        [429, 200]
    );
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= chrono::Duration::milliseconds(3_000),
        "retried after {waited:?}, Retry-After said 3 s"
    );
    assert_eq!(
        s.daemon
            .metric(r#"membersync_bridge_retries_total{reason="429",route="applied"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn exhausted_and_permanent_failures_are_dead_lettered_and_the_next_outcome_goes_through() {
    let s = Stack::start(200).await;
    // Every attempt of the first outcome (max_attempts = 3) gets a 503.
    s.make.fail_next(3, 503);
    let (e1, e2) = (event_id(), event_id());
    let o1 = outcome("mem_d", &e1, "applied", "memberstack", "member.updated");
    let at1 = s.produce(&o1).await;
    let at2 = s
        .produce(&outcome(
            "mem_d",
            &e2,
            "applied",
            "memberstack",
            "member.updated",
        ))
        .await;
    s.wait_received(APPLIED, &e2, 1).await;
    s.wait_committed(at2).await;
    assert!(s.is_committed(at1));
    assert!(s.received(APPLIED, &e1).is_empty());
    assert_eq!(
        s.make.calls().iter().map(|c| c.status).collect::<Vec<_>>(),
        [503, 503, 503, 200],
        "o2 waits for o1 (same member) to be dead-lettered"
    );

    // A deactivated hook (410) is permanent: one attempt, then a dead letter; the other route
    // still gets the outcome.
    s.make.deactivate(PLANS);
    let e3 = event_id();
    let at3 = s
        .produce(&outcome(
            "mem_e",
            &e3,
            "applied",
            "memberstack",
            "member.plan.updated",
        ))
        .await;
    s.wait_received(APPLIED, &e3, 1).await;
    s.wait_committed(at3).await;

    let letters = support::kafka::consume(&s.kafka, &s.topics.bridge_dlq(), 2, WAIT).await;
    let mut by_event: HashMap<String, (BridgeDeadLetter, Value)> = HashMap::new();
    for m in &letters {
        use rdkafka::Message;
        let value: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        crate::schemas::assert_valid("bridge-dlq", &value, "a bridge dead letter");
        let raw = String::from_utf8_lossy(m.payload().unwrap());
        assert!(
            !raw.contains("s3cr3t"),
            "the URL's token is never written: {raw}"
        );
        let letter: BridgeDeadLetter = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(
            support::kafka::header(m, "membersync-dlq-id").as_deref(),
            Some(letter.id.as_str())
        );
        assert_eq!(m.key(), letter.key.as_deref().map(str::as_bytes));
        by_event.insert(letter.event_id.clone().unwrap(), (letter, value));
    }
    let host = format!("127.0.0.1:{}", s.make.addr().port());

    let (storm, value) = &by_event[&e1];
    assert_eq!(storm.route.as_deref(), Some("applied"));
    assert_eq!(storm.url_host.as_deref(), Some(host.as_str()));
    assert_eq!(storm.error.kind, "http_status");
    assert_eq!(storm.error.status, Some(503));
    assert!(storm.error.retryable);
    assert_eq!(storm.attempts, 3);
    assert_eq!(storm.origin.topic, s.topics.sync());
    assert_eq!(
        (storm.origin.partition, storm.origin.offset),
        (at1.partition, at1.offset)
    );
    assert_eq!(storm.key.as_deref(), Some("mem_d"));
    assert_eq!(storm.outcome_id.as_deref(), o1["id"].as_str());
    assert_eq!(value["outcome"], o1);

    let (gone, _) = &by_event[&e3];
    assert_eq!(gone.route.as_deref(), Some("plans"));
    assert_eq!(gone.error.status, Some(410));
    assert!(!gone.error.retryable);
    assert_eq!(gone.attempts, 1);
    assert!(
        gone.error.message.contains("no scenario listening"),
        "{}",
        gone.error.message
    );

    let d = &s.daemon;
    assert_eq!(
        d.metric(r#"membersync_bridge_dead_letters_total{kind="http_status",route="applied"}"#)
            .await,
        1.0
    );
    assert_eq!(
        d.metric(r#"membersync_bridge_retries_total{reason="503",route="applied"}"#)
            .await,
        2.0
    );
    assert_eq!(
        d.metric(r#"membersync_bridge_deliveries_total{route="plans",status="410"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn committed_outcomes_are_not_redelivered_after_a_restart_uncommitted_ones_are() {
    // Offsets are committed only at shutdown (and on rebalance) here, so a crash after a
    // delivery leaves it uncommitted.
    let mut s = Stack::start(600_000).await;
    let e1 = event_id();
    let at1 = s
        .produce(&outcome(
            "mem_f",
            &e1,
            "applied",
            "memberstack",
            "member.updated",
        ))
        .await;
    s.wait_received(APPLIED, &e1, 1).await;
    assert!(s.daemon.terminate().await.success());
    assert!(s.is_committed(at1), "SIGTERM commits what was delivered");

    s.restart().await;
    let e2 = event_id();
    let at2 = s
        .produce(&outcome(
            "mem_f",
            &e2,
            "applied",
            "memberstack",
            "member.updated",
        ))
        .await;
    s.wait_received(APPLIED, &e2, 1).await;
    assert_eq!(
        s.received(APPLIED, &e1).len(),
        1,
        "o1 was committed: not again"
    );

    // A crash after delivering o2, before its offset is committed: at least once means o2
    // is delivered again, with the same idempotency key.
    s.daemon.child.kill().unwrap();
    s.daemon.child.wait().unwrap();
    assert!(!s.is_committed(at2));
    s.restart().await;
    s.wait_received(APPLIED, &e2, 2).await;
    let twice = s.received(APPLIED, &e2);
    assert_eq!(twice[0].body, twice[1].body);
    assert_eq!(s.received(APPLIED, &e1).len(), 1);
    assert!(s.daemon.terminate().await.success());
    assert!(s.is_committed(at2));
}

#[tokio::test]
async fn bridge_without_routes_refuses_to_start() {
    let kafka = support::kafka::config();
    let out = support::membersync()
        .arg("bridge")
        .env("MEMBERSYNC__KAFKA__BROKERS", &kafka.brokers)
        .env("MEMBERSYNC__KAFKA__TOPIC_PREFIX", &kafka.topic_prefix)
        .env(
            "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
            format!("127.0.0.1:{}", support::free_port()),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no [bridge.routes] configured"), "{stderr}");
}

#[test]
fn the_dead_letter_examples_round_trip_through_the_crate_type() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_root().join("schemas/kafka/bridge-dlq.json"))
            .unwrap(),
    )
    .unwrap();
    for example in schema["examples"].as_array().unwrap() {
        let letter: BridgeDeadLetter = serde_json::from_value(example.clone()).unwrap();
        assert_eq!(&serde_json::to_value(&letter).unwrap(), example);
    }
}
