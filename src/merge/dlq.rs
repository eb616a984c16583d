//! The dead-letter topic (`<prefix>.dlq`, schema `schemas/kafka/dlq.json`): a record that
//! could not be decoded, or a change (or its push) that failed permanently — a 4xx, a
//! constraint it violates, never an outage — is written there whole (key, value, headers)
//! with the error and where it came from, so `membersync dlq replay` can re-feed it to its
//! topic unchanged.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use chrono::{SecondsFormat, Utc};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::change::Position;
use crate::config::KafkaConfig;
use crate::kafka::producer::{ProduceError, Producer, Record};

pub const SCHEMA_VERSION: u32 = 1;
/// Header on a replayed record naming the dead letter it came from.
pub const REPLAY_HEADER: &str = "membersync-replay-of";

const DLQ_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d656d62_6572_7379_6e63_646c71000001);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqError {
    /// `decode` (poison), `database`, `memberstack`, `supabase_auth`, `missing_in_memberstack`.
    pub kind: String,
    pub message: String,
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema_version: u32,
    /// Stable per origin record: `uuid_v5(topic/partition/offset)`.
    pub id: String,
    pub failed_at: String,
    pub error: DlqError,
    pub attempts: u32,
    pub origin: Position,
    pub event_id: Option<String>,
    pub member_id: Option<String>,
    pub key: Option<String>,
    /// The original value when it is JSON …
    pub value: Option<Value>,
    /// … else its bytes, base64.
    pub value_base64: Option<String>,
    pub headers: BTreeMap<String, String>,
}

impl DeadLetter {
    pub fn new(
        message: &OwnedMessage,
        error: DlqError,
        attempts: u32,
        event_id: Option<String>,
        member_id: Option<String>,
    ) -> Self {
        // The record whole (key, value or its bytes, headers): the same capture the outbox
        // keeps of a change, so both kinds of dead letter carry it the same way.
        let record = crate::merge::outbox::Origin::of(message, event_id.as_deref().unwrap_or(""));
        let origin = record.position;
        let id = uuid::Uuid::new_v5(
            &DLQ_NAMESPACE,
            format!("{}/{}/{}", origin.topic, origin.partition, origin.offset).as_bytes(),
        );
        Self {
            schema_version: SCHEMA_VERSION,
            id: id.to_string(),
            failed_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            error,
            attempts,
            origin,
            event_id,
            member_id,
            key: record.key,
            value: record.value,
            value_base64: record.value_base64,
            headers: record.headers,
        }
    }

    /// A pending push that failed permanently (merge's outbox), as the Kafka record of the
    /// latest change that asked for it: `dlq replay` re-feeds that change, and merge resolves
    /// it again against the state of that moment.
    pub fn from_origin(
        origin: Option<&crate::merge::outbox::Origin>,
        error: DlqError,
        attempts: u32,
        member_id: Option<String>,
    ) -> Self {
        let position = origin.map(|o| o.position.clone()).unwrap_or(Position {
            topic: String::new(),
            partition: -1,
            offset: -1,
        });
        let id = uuid::Uuid::new_v5(
            &DLQ_NAMESPACE,
            format!(
                "{}/{}/{}/{}",
                position.topic, position.partition, position.offset, error.kind
            )
            .as_bytes(),
        );
        Self {
            schema_version: SCHEMA_VERSION,
            id: id.to_string(),
            failed_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            error,
            attempts,
            origin: position,
            event_id: origin.map(|o| o.event_id.clone()),
            key: origin
                .and_then(|o| o.key.clone())
                .or_else(|| member_id.clone()),
            member_id,
            value: origin.and_then(|o| o.value.clone()),
            value_base64: origin.and_then(|o| o.value_base64.clone()),
            headers: origin.map(|o| o.headers.clone()).unwrap_or_default(),
        }
    }

    /// The original record's bytes.
    pub fn original_value(&self) -> Vec<u8> {
        match (&self.value, &self.value_base64) {
            (Some(v), _) => serde_json::to_vec(v).unwrap_or_default(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    pub async fn publish(
        &self,
        producer: &Producer,
        topic: &str,
        wait: Duration,
    ) -> Result<(), ProduceError> {
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let key = self.key.clone().unwrap_or_default();
        producer
            .send(
                &Record {
                    topic,
                    key: key.as_bytes(),
                    payload: &payload,
                    headers: &[("membersync-dlq-id", self.id.as_bytes())],
                },
                wait,
            )
            .await?;
        Ok(())
    }

    /// Re-feeds the original record to its topic, unchanged but for the replay header.
    pub async fn replay(&self, producer: &Producer, wait: Duration) -> Result<(), ProduceError> {
        let value = self.original_value();
        let key = self.key.clone().unwrap_or_default();
        let mut headers: Vec<(&str, &[u8])> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != REPLAY_HEADER)
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        headers.push((REPLAY_HEADER, self.id.as_bytes()));
        producer
            .send(
                &Record {
                    topic: &self.origin.topic,
                    key: key.as_bytes(),
                    payload: &value,
                    headers: &headers,
                },
                wait,
            )
            .await?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqReadError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("timed out reading {0}")]
    Timeout(String),
}

/// Every dead letter on the topic, oldest first (reads each partition from its beginning to
/// its current end; no consumer group, nothing committed).
pub async fn read_all(cfg: &KafkaConfig, topic: &str) -> Result<Vec<DeadLetter>, DlqReadError> {
    let cfg = cfg.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_all_blocking(&cfg, &topic))
        .await
        .unwrap_or_else(|e| Err(DlqReadError::Timeout(format!("reader task: {e}"))))
}

fn read_all_blocking(cfg: &KafkaConfig, topic: &str) -> Result<Vec<DeadLetter>, DlqReadError> {
    let timeout = cfg.request_timeout();
    let consumer: BaseConsumer = crate::kafka::client_config(cfg)
        .set("group.id", "membersync-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
        }
    }
    let mut letters = Vec::new();
    if ends.is_empty() {
        return Ok(letters);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout * 3;
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(DlqReadError::Timeout(topic.to_owned()));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        if let Some(letter) = msg
            .payload()
            .and_then(|p| serde_json::from_slice::<DeadLetter>(p).ok())
        {
            letters.push(letter);
        }
        if ends
            .get(&msg.partition())
            .is_some_and(|end| msg.offset() + 1 >= *end)
        {
            ends.remove(&msg.partition());
        }
    }
    letters.sort_by(|a, b| a.failed_at.cmp(&b.failed_at));
    Ok(letters)
}

/// Ids of dead letters already replayed (audit_logs, action `dlq_replay`).
pub async fn replayed_ids(
    client: &tokio_postgres::Client,
) -> Result<std::collections::HashSet<String>, tokio_postgres::Error> {
    let rows = client
        .query("select target from public.audit_logs where action = 'dlq_replay' and target is not null", &[])
        .await?;
    Ok(rows.into_iter().map(|r| r.get::<_, String>(0)).collect())
}

pub async fn record_replay(
    client: &tokio_postgres::Client,
    letter: &DeadLetter,
) -> Result<(), tokio_postgres::Error> {
    let details = serde_json::json!({
        "origin": letter.origin,
        "event_id": letter.event_id,
        "member_id": letter.member_id,
        "error": letter.error,
    });
    let actor = std::env::var("USER").unwrap_or_else(|_| "membersync-cli".into());
    client
        .execute(
            "insert into public.audit_logs (actor, action, target, details) values ($1, 'dlq_replay', $2, $3)",
            &[&actor, &letter.id, &details],
        )
        .await?;
    Ok(())
}

/// `dlq list --json` (and `GET /v1/admin/dlq`): each dead letter as JSON, plus `replayed`.
pub fn listing(letters: &[DeadLetter], replayed: &std::collections::HashSet<String>) -> Vec<Value> {
    letters
        .iter()
        .map(|l| {
            let mut v = serde_json::to_value(l).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("replayed".into(), Value::Bool(replayed.contains(&l.id)));
            }
            v
        })
        .collect()
}

/// `dlq list` as a table.
pub fn table(letters: &[DeadLetter], replayed: &std::collections::HashSet<String>) -> String {
    let mut out = format!(
        "{:<36}  {:<24}  {:<40}  {:>8}  {:<8}  {}\n",
        "ID", "FAILED AT", "ORIGIN (topic/partition/offset)", "ATTEMPTS", "REPLAYED", "ERROR"
    );
    for l in letters {
        let origin = format!(
            "{}/{}/{}",
            l.origin.topic, l.origin.partition, l.origin.offset
        );
        let mut error = format!("{}: {}", l.error.kind, l.error.message);
        if error.len() > 100 {
            let cut = (0..=100)
                .rev()
                .find(|i| error.is_char_boundary(*i))
                .unwrap_or(0);
            error.truncate(cut);
            error.push('…');
        }
        out.push_str(&format!(
            "{:<36}  {:<24}  {:<40}  {:>8}  {:<8}  {}\n",
            l.id,
            l.failed_at,
            origin,
            l.attempts,
            if replayed.contains(&l.id) {
                "yes"
            } else {
                "no"
            },
            error
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", letters.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedHeaders;

    #[test]
    fn keeps_non_json_values_byte_exact_and_ids_stable() {
        let msg = OwnedMessage::new(
            Some(vec![0xff, 0x00, b'x']),
            Some(b"mem_1".to_vec()),
            "membersync.memberstack".into(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "h",
                value: Some("v"),
            })),
        );
        let err = DlqError {
            kind: "decode".into(),
            message: "not JSON".into(),
            retryable: false,
        };
        let a = DeadLetter::new(&msg, err.clone(), 0, None, None);
        let b = DeadLetter::new(&msg, err, 0, None, None);
        assert_eq!(a.id, b.id);
        assert_eq!(a.original_value(), vec![0xff, 0x00, b'x']);
        assert_eq!(a.headers.get("h").map(String::as_str), Some("v"));
        let round: DeadLetter = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(round, a);
    }
}
