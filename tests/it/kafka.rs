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
