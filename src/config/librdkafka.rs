//! `[kafka.librdkafka]`: librdkafka properties passed through to every Kafka client (producer,
//! consumer, admin), the way vector's `librdkafka_options` and Debezium's `kafka.*` pass-through
//! do — message size, queue bounds, compression, `client.rack`, socket tuning, … The
//! properties membersync sets itself are refused here (each has its own key, or membersync's
//! correctness depends on its value), and so are secret-bearing ones (this table lives in the
//! config file, where secrets may not).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::ConfigError;

/// The table, as librdkafka wants it: property → text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibrdkafkaProperties(pub BTreeMap<String, String>);

impl LibrdkafkaProperties {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// TOML lets an operator write `"queue.buffering.max.kbytes" = 65536` or `= "65536"`; both mean
/// the same to librdkafka, which takes every value as text.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl<'de> Deserialize<'de> for LibrdkafkaProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(Self(
            raw.into_iter()
                .map(|(k, v)| {
                    let text = match v {
                        Scalar::Text(s) => s,
                        Scalar::Integer(i) => i.to_string(),
                        Scalar::Float(f) => f.to_string(),
                        Scalar::Bool(b) => b.to_string(),
                    };
                    (k, text)
                })
                .collect(),
        ))
    }
}

/// Properties membersync owns, with what to use instead. Setting one here would either be
/// overwritten silently or break a guarantee (no loss, no duplicates, offsets committed only
/// after the work is done).
const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers"),
    ("metadata.broker.list", "set kafka.brokers"),
    ("client.id", "set kafka.client_id"),
    ("security.protocol", "set kafka.security_protocol"),
    ("sasl.mechanism", "set kafka.sasl_mechanism"),
    ("sasl.mechanisms", "set kafka.sasl_mechanism"),
    ("sasl.username", "set kafka.sasl_username"),
    ("ssl.ca.location", "set kafka.ssl_ca_location"),
    ("socket.timeout.ms", "set kafka.request_timeout_ms"),
    ("message.timeout.ms", "set kafka.message_timeout_ms"),
    ("delivery.timeout.ms", "set kafka.message_timeout_ms"),
    ("linger.ms", "set kafka.linger_ms"),
    ("queue.buffering.max.ms", "set kafka.linger_ms"),
    ("statistics.interval.ms", "set kafka.statistics_interval_ms"),
    (
        "log_level",
        "set telemetry.log_level (librdkafka logs through it)",
    ),
    (
        "group.id",
        "set merge.group_id / bridge.group_id (each role has its own group)",
    ),
    (
        "group.instance.id",
        "membersync's consumers are dynamic group members",
    ),
    (
        "session.timeout.ms",
        "set merge.session_timeout_ms / bridge.session_timeout_ms",
    ),
    (
        "fetch.wait.max.ms",
        "set merge.fetch_wait_max_ms / bridge.fetch_wait_max_ms",
    ),
    (
        "partition.assignment.strategy",
        "merge and bridge depend on their assignment strategy",
    ),
    (
        "enable.auto.commit",
        "membersync commits offsets itself, only after the work is done",
    ),
    (
        "enable.auto.offset.store",
        "membersync stores offsets itself, only after the work is done",
    ),
    (
        "auto.commit.interval.ms",
        "set merge.commit_interval_ms / bridge.commit_interval_ms",
    ),
    (
        "auto.offset.reset",
        "a new consumer group must read from the earliest record",
    ),
    (
        "enable.partition.eof",
        "membersync's consumers rely on its value",
    ),
    (
        "isolation.level",
        "membersync's consumers rely on its value",
    ),
    (
        "enable.idempotence",
        "the producers are idempotent: no loss, no duplicates within a session",
    ),
    (
        "enable.gapless.guarantee",
        "the producers rely on their own setting",
    ),
    (
        "acks",
        "the producers use acks=all (idempotence requires it)",
    ),
    (
        "request.required.acks",
        "the producers use acks=all (idempotence requires it)",
    ),
    (
        "max.in.flight.requests.per.connection",
        "idempotence bounds it; ordering depends on it",
    ),
    (
        "max.in.flight",
        "idempotence bounds it; ordering depends on it",
    ),
    (
        "transactional.id",
        "membersync does not use Kafka transactions",
    ),
];

/// Words that mark a property carrying a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`, `ssl.keystore.password`, …).
const SECRET_MARKERS: &[&str] = &[
    "password",
    "secret",
    "ssl.key.pem",
    "ssl_key",
    "sasl.oauthbearer.config",
];

pub(super) fn validate(props: &LibrdkafkaProperties) -> Result<(), ConfigError> {
    for (name, value) in props.iter() {
        let key = format!("kafka.librdkafka.\"{name}\"");
        let lower = name.trim().to_ascii_lowercase();
        if lower.is_empty() {
            return Err(ConfigError::new(key, "a property name must not be empty"));
        }
        if let Some((_, instead)) = OWNED.iter().find(|(owned, _)| *owned == lower) {
            return Err(ConfigError::new(
                key,
                format!(
                    "membersync sets `{name}` itself and it may not be overridden here: {instead}"
                ),
            ));
        }
        if SECRET_MARKERS.iter().any(|m| lower.contains(m)) {
            // The value stays out of the message.
            return Err(ConfigError::new(
                key,
                "carries a secret, and secrets may not be written in the config file \
                 (SASL PLAIN/SCRAM: kafka.sasl_password or kafka.sasl_password_file)",
            ));
        }
        if lower.ends_with("_cb") || lower == "plugin.library.paths" {
            return Err(ConfigError::new(
                key,
                "callbacks and plugins cannot be configured through membersync",
            ));
        }
        // librdkafka itself says whether it knows the property and accepts the value (the
        // text of its answer names the property, and the value only for enums and numbers).
        let mut probe = rdkafka::ClientConfig::new();
        probe.set(name, value);
        if let Err(e) = probe.create_native_config() {
            return Err(ConfigError::new(key, format!("librdkafka refuses it: {e}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> LibrdkafkaProperties {
        LibrdkafkaProperties(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn tuning_properties_pass() {
        let p = props(&[
            ("queue.buffering.max.kbytes", "65536"),
            ("queue.buffering.max.messages", "100000"),
            ("message.max.bytes", "2000000"),
            ("compression.type", "gzip"),
            ("client.rack", "use1-az1"),
            ("socket.keepalive.enable", "true"),
        ]);
        assert_eq!(validate(&p), Ok(()));
    }

    #[test]
    fn every_owned_property_is_refused_with_what_to_do_instead() {
        for (owned, instead) in OWNED {
            let err = validate(&props(&[(owned, "x")])).unwrap_err();
            assert_eq!(err.key, format!("kafka.librdkafka.\"{owned}\""));
            assert!(err.problem.contains("membersync sets"), "{err}");
            assert!(err.problem.contains(instead), "{err}");
        }
        // Case and surrounding spaces do not get around the list.
        assert!(validate(&props(&[("Enable.Idempotence", "false")])).is_err());
        assert!(validate(&props(&[(" group.id", "x")])).is_err());
    }

    #[test]
    fn secrets_are_refused_without_echoing_them() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "sasl.oauthbearer.client.secret",
            "ssl.keystore.password",
            "ssl.key.pem",
        ] {
            let err = validate(&props(&[(name, "hunter2-secret")])).unwrap_err();
            assert!(err.problem.contains("secret"), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn librdkafka_refuses_unknown_properties_and_bad_values() {
        let err = validate(&props(&[("queue.buffering.max.kbyte", "1")])).unwrap_err();
        assert!(err.problem.contains("librdkafka refuses"), "{err}");
        let err = validate(&props(&[("compression.type", "brotli")])).unwrap_err();
        assert!(err.problem.contains("librdkafka refuses"), "{err}");
        assert!(validate(&props(&[("plugin.library.paths", "/tmp/x.so")])).is_err());
    }
}
