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
