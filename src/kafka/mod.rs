//! Kafka: client settings, topic names, topic administration, consumer offsets and lag.

pub mod admin;
pub mod keyed;
pub mod lag;
pub mod offsets;
pub mod producer;
pub mod topics;

use rdkafka::ClientConfig;
use secrecy::ExposeSecret;

use crate::config::KafkaConfig;

/// Settings every client (producer, consumer, admin) shares: brokers, identity, security, and
/// the operator's `[kafka.librdkafka]` properties (none of which membersync sets itself: the
/// configuration refuses those). librdkafka ignores, with a warning, a producer property on a
/// consumer and the reverse.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .set("security.protocol", cfg.security_protocol.as_librdkafka())
        .set(
            "socket.timeout.ms",
            cfg.request_timeout_ms.max(10).to_string(),
        )
        // librdkafka logs through our tracing via the default context's log hook.
        .set("log_level", "4");
    if let Some(mechanism) = cfg.sasl_mechanism {
        c.set("sasl.mechanism", mechanism.as_librdkafka());
    }
    if let Some(user) = &cfg.sasl_username {
        c.set("sasl.username", user);
    }
    if let Some(password) = &cfg.sasl_password {
        c.set("sasl.password", password.expose_secret());
    }
    if let Some(ca) = &cfg.ssl_ca_location {
        c.set("ssl.ca.location", ca.display().to_string());
    }
    for (key, value) in cfg.librdkafka.iter() {
        c.set(key, value);
    }
    c
}

/// Sets `key` unless the operator set it in `[kafka.librdkafka]`: for membersync's defaults
/// that an operator may tune (queue bounds, batch size, compression).
pub fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// A producer that never loses or duplicates within a session: idempotence implies
/// `acks=all`, bounded in-flight requests and retries that keep order.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("linger.ms", cfg.linger_ms.to_string());
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LibrdkafkaProperties;

    fn with_props(pairs: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            librdkafka: LibrdkafkaProperties(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn pass_through_properties_reach_every_client() {
        let cfg = with_props(&[
            ("queue.buffering.max.kbytes", "65536"),
            ("client.rack", "use1-az1"),
        ]);
        for c in [client_config(&cfg), producer_config(&cfg)] {
            assert_eq!(c.get("queue.buffering.max.kbytes"), Some("65536"));
            assert_eq!(c.get("client.rack"), Some("use1-az1"));
            assert_eq!(c.get("bootstrap.servers"), Some(cfg.brokers.as_str()));
        }
        // The producer's guarantees are membersync's, whatever the table says (and the
        // configuration refuses to let it say anything about them).
        let p = producer_config(&cfg);
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
    }

    #[test]
    fn set_default_leaves_an_operator_value_alone() {
        let mut c = client_config(&with_props(&[("compression.type", "zstd")]));
        set_default(&mut c, "compression.type", "lz4");
        set_default(&mut c, "batch.num.messages", "10000");
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("batch.num.messages"), Some("10000"));
    }
}
