//! Kafka settings for tests: the dev broker, with a topic prefix of the test's own.

use membersync::config::KafkaConfig;

use super::{Services, unique_name};

/// Settings pointing at the dev broker with a unique topic prefix, so tests never share topics.
pub fn config() -> KafkaConfig {
    KafkaConfig {
        brokers: Services::get().kafka_brokers().to_owned(),
        topic_prefix: unique_name("test").replace('_', "-"),
        topic_partitions: 3,
        ..KafkaConfig::default()
    }
}

/// Reads `topic` from the beginning in a fresh group until `n` records arrived (panics after
/// `timeout`).
pub async fn consume(
    cfg: &KafkaConfig,
    topic: &str,
    n: usize,
    timeout: std::time::Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = membersync::kafka::client_config(cfg)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("consume {topic}: {e}"),
            Err(_) => panic!(
                "only {} of {n} records on {topic} after {timeout:?}",
                out.len()
            ),
        }
    }
    out
}

/// The value of header `name` of `m`, as UTF-8.
pub fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
