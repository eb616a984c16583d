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

/// Settings every client (producer, consumer, admin) shares: brokers, identity, security.
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
    c
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
