//! The broker features membersync relies on, verified with membersync's own client settings:
//! idempotent acks=all production, headers, consumer groups, committed offsets surviving a
//! consumer restart.

use std::time::Duration;

use membersync::kafka::admin::KafkaAdmin;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support;

fn consumer(cfg: &membersync::config::KafkaConfig, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = membersync::kafka::client_config(cfg)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

async fn next(consumer: &StreamConsumer) -> rdkafka::message::OwnedMessage {
    tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .expect("consume without error")
        .detach()
}

#[tokio::test]
async fn idempotent_produce_then_group_consume_resumes_from_committed_offset() {
    let mut cfg = support::kafka::config();
    cfg.topic_partitions = 1;
    let topic = format!("{}.roundtrip", cfg.topic_prefix);
    let admin = KafkaAdmin::new(&cfg).unwrap();
    assert_eq!(
        admin
            .ensure_topics(std::slice::from_ref(&topic))
            .await
            .unwrap(),
        vec![topic.clone()]
    );
    // A second call finds it and creates nothing.
    assert!(
        admin
            .ensure_topics(std::slice::from_ref(&topic))
            .await
            .unwrap()
            .is_empty()
    );

    let producer: FutureProducer = membersync::kafka::producer_config(&cfg).create().unwrap();
    for i in 0..10 {
        let payload = format!("{{\"n\":{i}}}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(format!("evt-{i}").as_bytes()),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("test.event"),
            });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("mem_1")
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("acked by the broker");
    }

    let group = support::unique_name("group");
    let first = consumer(&cfg, &group, &topic);
    for i in 0..4 {
        let m = next(&first).await;
        assert_eq!(m.payload(), Some(format!("{{\"n\":{i}}}").as_bytes()));
        assert_eq!(m.key(), Some(&b"mem_1"[..]));
        let headers = m.headers().expect("headers kept");
        let ce_id = headers
            .iter()
            .find(|h| h.key == "ce_id")
            .and_then(|h| h.value);
        assert_eq!(ce_id, Some(format!("evt-{i}").as_bytes()));
        assert!(
            headers
                .iter()
                .any(|h| h.key == "ce_type" && h.value == Some(&b"test.event"[..]))
        );
    }
    // Commit "consumed up to offset 3" explicitly: the next consumer must start at 4.
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(4))
        .unwrap();
    first.commit(&tpl, CommitMode::Sync).expect("commit");
    drop(first);

    let second = consumer(&cfg, &group, &topic);
    let m = next(&second).await;
    assert_eq!(m.offset(), 4, "resumed from the committed offset");
    assert_eq!(m.payload(), Some(&b"{\"n\":4}"[..]));
}

/// The keyed consumer merge and the bridge share: a worker whose handler cannot go on (its
/// producer broke) ends the consumer with `WorkerEnded` — the role fails and is restarted —
/// instead of leaving that worker's members waiting while the role looks alive. The record
/// it gave up on is not committed, so the restarted role reads it again.
#[tokio::test]
async fn a_worker_that_cannot_go_on_ends_the_keyed_consumer() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use membersync::kafka::keyed::{Handler, KeyedConsumer, Settings};
    use tokio_util::sync::CancellationToken;

    struct GivesUpOn(&'static [u8], AtomicUsize);
    impl Handler for GivesUpOn {
        type Worker = ();
        fn worker(&self) {}
        async fn handle(
            &self,
            _: &mut (),
            message: rdkafka::message::OwnedMessage,
            _: &CancellationToken,
        ) -> bool {
            self.1.fetch_add(1, Ordering::SeqCst);
            message.key() != Some(self.0)
        }
    }

    let mut cfg = support::kafka::config();
    cfg.topic_partitions = 1;
    let topic = format!("{}.keyed", cfg.topic_prefix);
    KafkaAdmin::new(&cfg)
        .unwrap()
        .ensure_topics(std::slice::from_ref(&topic))
        .await
        .unwrap();
    let producer: FutureProducer = membersync::kafka::producer_config(&cfg).create().unwrap();
    for key in ["mem_ok_1", "mem_broken", "mem_ok_2"] {
        producer
            .send(
                FutureRecord::to(&topic).key(key).payload("{}"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let group = support::unique_name("keyed");
    let settings = Settings {
        group_id: group.clone(),
        topics: vec![topic.clone()],
        workers: 4,
        max_in_flight: 16,
        commit_interval_ms: 100,
        fetch_wait_max_ms: 100,
        session_timeout_ms: 10_000,
        drain: Duration::from_secs(5),
        role: "keyed-test",
    };
    let registry = prometheus::Registry::new();
    let in_flight = prometheus::IntGauge::new("keyed_test_in_flight", "test").unwrap();
    let keyed = KeyedConsumer::new(&cfg, settings, &registry, in_flight).unwrap();
    let handler = Arc::new(GivesUpOn(b"mem_broken", AtomicUsize::new(0)));
    let shutdown = CancellationToken::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(60),
        keyed.run(Arc::clone(&handler), shutdown.clone()),
    )
    .await
    .expect("the consumer ends on its own, without a shutdown");
    let error = ended.expect_err("a worker that gave up is an error");
    assert!(error.to_string().contains("keyed-test"), "{error}");
    assert!(!shutdown.is_cancelled());

    // The record given up on was not committed: a new member of the group (same assignment
    // protocol as the keyed consumer) reads it again.
    let again: StreamConsumer = membersync::kafka::client_config(&cfg)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .expect("consumer");
    again.subscribe(&[topic.as_str()]).expect("subscribe");
    let mut keys = Vec::new();
    while !keys.iter().any(|k| k == "mem_broken") {
        let m = next(&again).await;
        keys.push(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned());
    }
}
