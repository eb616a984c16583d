use super::Item;
use crate::config::Config;
use crate::kafka::admin::KafkaAdmin;
use crate::kafka::topics::Topics;

pub(super) async fn check(config: &Config) -> Vec<Item> {
    let k = &config.kafka;
    let hint = "start the broker, or fix kafka.brokers / security settings";
    let info = match KafkaAdmin::new(k) {
        Ok(admin) => admin.cluster_info().await,
        Err(e) => return vec![Item::fail("kafka broker", e.to_string(), hint)],
    };
    let info = match info {
        Ok(info) => info,
        Err(e) => return vec![Item::fail("kafka broker", e.to_string(), hint)],
    };
    let mut items = vec![Item::pass(
        "kafka broker",
        format!("{} reachable ({} broker(s))", k.brokers, info.brokers),
    )];
    for topic in Topics::new(&k.topic_prefix).all(config) {
        let label = format!("topic {topic}");
        items.push(if info.topics.contains(&topic) {
            Item::pass(label, "exists")
        } else if k.create_topics {
            Item::pass(
                label,
                format!(
                    "missing; membersync creates it at start ({} partitions)",
                    k.topic_partitions
                ),
            )
        } else {
            Item::fail(
                label,
                "missing and kafka.create_topics is false",
                format!(
                    "create it (key = member id, {} partitions) or set kafka.create_topics = true",
                    k.topic_partitions
                ),
            )
        });
    }
    items
}
