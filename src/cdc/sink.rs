//! CDC's Kafka producer: idempotent, `acks=all`, and never gives up on a record
//! (`message.timeout.ms = 0`): while Kafka is away the local queue fills, `send` waits, the
//! stream stops reading, and Postgres keeps the WAL — backpressure instead of loss.
//!
//! The one record it cannot wait out is one Kafka will never accept (too large): that change
//! is replaced by a reference record and a dead letter (`super::oversize`), before producing
//! when it exceeds `cdc.max_record_bytes`, or when librdkafka or the broker refuses it.

use std::time::Duration;

use prometheus::IntCounterVec;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::util::Timeout;

use super::ack::{AckTracker, CdcProducerContext};
use super::oversize;
use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the CDC producer: {0}")]
    Create(#[source] KafkaError),
    #[error("Kafka refused a change event: {0}")]
    Produce(#[source] KafkaError),
}

pub struct CdcSink {
    producer: ThreadedProducer<CdcProducerContext>,
    tracker: AckTracker,
    policy: OversizePolicy,
    /// Beaten while waiting for room in a full queue: waiting out Kafka is not a wedge.
    heartbeat: crate::telemetry::liveness::Heartbeat,
}

/// What to do with a change event Kafka would refuse as too large.
#[derive(Clone)]
pub struct OversizePolicy {
    /// Records (key + value) above this are replaced before producing (`cdc.max_record_bytes`).
    pub max_record_bytes: usize,
    /// `<prefix>.dlq`.
    pub dlq_topic: String,
    /// `membersync_cdc_oversized_records_total{table}`, when registered.
    pub counter: Option<IntCounterVec>,
}

impl OversizePolicy {
    /// Kafka's (and librdkafka's) default record limit.
    pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

    pub fn defaults(topic_prefix: &str) -> Self {
        Self {
            max_record_bytes: Self::DEFAULT_MAX_RECORD_BYTES,
            dlq_topic: crate::kafka::topics::Topics::new(topic_prefix).dlq(),
            counter: None,
        }
    }
}

/// librdkafka's local check (`message.max.bytes`) and the broker's (`MESSAGE_TOO_LARGE`,
/// `RECORD_LIST_TOO_LARGE`) both say: this record will never be accepted.
pub fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// librdkafka checks a record's size plus its wire overhead against `message.max.bytes`: leave
/// room above `cdc.max_record_bytes`, so that a record membersync lets through is not refused
/// locally (it would still be replaced, but the check before producing says why).
const WIRE_HEADROOM_BYTES: usize = 4096;

/// How long to wait before retrying when the local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

impl CdcSink {
    pub fn new(cfg: &KafkaConfig, tracker: AckTracker) -> Result<Self, SinkError> {
        Self::with_policy(cfg, tracker, OversizePolicy::defaults(&cfg.topic_prefix))
    }

    pub fn with_policy(
        cfg: &KafkaConfig,
        tracker: AckTracker,
        policy: OversizePolicy,
    ) -> Result<Self, SinkError> {
        let max_message = (policy.max_record_bytes + WIRE_HEADROOM_BYTES)
            .max(OversizePolicy::DEFAULT_MAX_RECORD_BYTES);
        let producer = crate::kafka::producer_config(cfg)
            .set("message.timeout.ms", "0")
            // Large batches: CDC is a throughput path; acks still gate the LSN.
            .set("batch.num.messages", "10000")
            // The queue is where backpressure starts: bounded in bytes as well as in count,
            // so a Kafka outage or a 1M-row transaction cannot grow memory by more than this.
            .set("queue.buffering.max.messages", "100000")
            .set("queue.buffering.max.kbytes", "32768")
            .set("compression.type", "lz4")
            .set("message.max.bytes", max_message.to_string())
            .create_with_context(CdcProducerContext {
                tracker: tracker.clone(),
            })
            .map_err(SinkError::Create)?;
        Ok(Self {
            producer,
            tracker,
            policy,
            heartbeat: Default::default(),
        })
    }

    /// The role heartbeat to beat while waiting for room in the queue.
    pub fn set_heartbeat(&mut self, heartbeat: crate::telemetry::liveness::Heartbeat) {
        self.heartbeat = heartbeat;
    }

    /// Hands one change event of transaction `seq` to librdkafka, waiting while its queue is
    /// full. Returns `true` if it had to wait (backpressure). An event too large for Kafka is
    /// replaced by its reference record and dead letter (see `super::oversize`).
    pub async fn send(
        &self,
        seq: u64,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<bool, SinkError> {
        let limit = self.policy.max_record_bytes;
        if oversize::too_large(key, payload, limit) {
            let reason = format!("over cdc.max_record_bytes = {limit}");
            return self.replace(seq, topic, key, payload, limit, &reason).await;
        }
        match self.send_raw(seq, topic, key, payload, None).await {
            Err(SinkError::Produce(e)) if is_too_large(&e) => {
                self.replace(seq, topic, key, payload, limit, &e.to_string())
                    .await
            }
            other => other,
        }
    }

    /// Replaces records the broker refused as too large after they were queued (delivery
    /// reports, see `AckTracker::take_refused`); each original is released only once its
    /// replacements are queued, so its transaction is confirmed only once they are acknowledged.
    pub async fn resend_refused(&self) -> Result<(), SinkError> {
        for r in self.tracker.take_refused() {
            if r.topic == self.policy.dlq_topic {
                match oversize::shrink_dead_letter(&r.payload) {
                    Some(smaller) => {
                        let id = dlq_id(&smaller);
                        self.send_raw(r.seq, &r.topic, r.key.as_deref(), &smaller, id.as_deref())
                            .await?;
                    }
                    None => tracing::error!(
                        topic = r.topic,
                        bytes = r.payload.len(),
                        "Kafka refused a CDC dead letter without value as too large; it is dropped"
                    ),
                }
            } else {
                // The broker's limit is below ours: each refusal halves the reference.
                let limit = self.policy.max_record_bytes.min(r.payload.len());
                self.replace(
                    r.seq,
                    &r.topic,
                    r.key.as_deref(),
                    &r.payload,
                    limit,
                    &r.error,
                )
                .await?;
            }
            self.tracker.delivered(r.seq, Ok(()));
        }
        Ok(())
    }

    async fn replace(
        &self,
        seq: u64,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        limit: usize,
        reason: &str,
    ) -> Result<bool, SinkError> {
        let r = oversize::replace(topic, key, payload, limit, reason);
        tracing::warn!(
            topic,
            table = r.table,
            bytes = payload.len(),
            cut = ?r.cut,
            dead_letter = r.dead_letter_id,
            reason,
            "change event too large for Kafka: published a reference record and a dead letter"
        );
        let waited = self.send_raw(seq, topic, key, &r.reference, None).await?;
        let dlq = self.policy.dlq_topic.clone();
        let waited_dlq = self
            .send_raw(seq, &dlq, key, &r.dead_letter, Some(&r.dead_letter_id))
            .await?;
        if let Some(counter) = &self.policy.counter {
            counter.with_label_values(&[&r.table]).inc();
        }
        Ok(waited || waited_dlq)
    }

    /// Hands a tombstone (a record with the key and no value) of transaction `seq` to
    /// librdkafka: log compaction then drops the key, as Debezium's `tombstones.on.delete`.
    pub async fn send_tombstone(
        &self,
        seq: u64,
        topic: &str,
        key: &[u8],
    ) -> Result<bool, SinkError> {
        self.send_record(seq, topic, Some(key), None, None).await
    }

    async fn send_raw(
        &self,
        seq: u64,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        dlq_id: Option<&str>,
    ) -> Result<bool, SinkError> {
        self.send_record(seq, topic, key, Some(payload), dlq_id)
            .await
    }

    async fn send_record(
        &self,
        seq: u64,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        dlq_id: Option<&str>,
    ) -> Result<bool, SinkError> {
        // Count first: the delivery callback may run before `send` returns.
        self.tracker.produced(seq);
        let mut waited = false;
        loop {
            let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, seq as usize);
            if let Some(payload) = payload {
                record = record.payload(payload);
            }
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(id) = dlq_id {
                record = record.headers(OwnedHeaders::new().insert(Header {
                    key: "membersync-dlq-id",
                    value: Some(id),
                }));
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(waited),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    waited = true;
                    self.heartbeat.beat();
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, _)) if is_too_large(&e) => {
                    // Not a failure of the transaction: the caller replaces the record.
                    self.tracker.delivered(seq, Ok(()));
                    return Err(SinkError::Produce(e));
                }
                Err((e, _)) => {
                    self.tracker.delivered(seq, Err(e.to_string()));
                    return Err(SinkError::Produce(e));
                }
            }
        }
    }

    /// Waits until every queued record is acknowledged (or `timeout`).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(Timeout::After(timeout))
    }

    /// Records queued in librdkafka and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

/// The id of a dead letter (its `membersync-dlq-id` header).
fn dlq_id(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use serde_json::json;

    use super::*;

    /// The broker's refusal arrives in a delivery report, after `send` returned: the record is
    /// replaced then, and its transaction is confirmed once the replacements are acknowledged.
    #[tokio::test]
    async fn a_record_the_broker_refuses_as_too_large_is_replaced_and_its_transaction_confirmed() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let cfg = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            topic_prefix: "t".into(),
            ..KafkaConfig::default()
        };
        let topic = "t.cdc.public.members";
        mock.create_topic(topic, 1, 1).unwrap();
        mock.create_topic("t.dlq", 1, 1).unwrap();
        let counter = IntCounterVec::new(prometheus::Opts::new("c", "c"), &["table"]).unwrap();
        let tracker = AckTracker::new();
        let policy = OversizePolicy {
            counter: Some(counter.clone()),
            ..OversizePolicy::defaults("t")
        };
        let sink = CdcSink::with_policy(&cfg, tracker.clone(), policy).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let payload = serde_json::to_vec(&json!({
            "before": null,
            "after": {"id": 1, "memberstack_id": "mem_1", "project_data": {"x": "y".repeat(50_000)}},
            "source": {"schema": "public", "table": "members", "lsn": 100},
            "op": "u",
            "transaction": {"id": "1:100", "total_order": 1, "data_collection_order": 1},
        }))
        .unwrap();
        let seq = tracker.begin();
        sink.send(seq, topic, Some(b"mem_1"), &payload)
            .await
            .unwrap();
        tracker.commit(seq, 100, Instant::now());
        let deadline = Instant::now() + Duration::from_secs(20);
        let confirmed = loop {
            sink.resend_refused().await.unwrap();
            assert_eq!(
                tracker.take_failure(),
                None,
                "not a failure of the transaction"
            );
            if let Some(c) = tracker.take_confirmed() {
                break c;
            }
            assert!(Instant::now() < deadline, "never confirmed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(confirmed.lsn, 100);
        assert_eq!(
            counter.with_label_values(&["public.members"]).get(),
            1,
            "replaced once"
        );
    }

    /// An authorisation error in a delivery report is permanent: CDC stops for an operator
    /// (loudly) instead of reconnecting forever.
    #[tokio::test]
    async fn a_topic_authorisation_failure_is_a_permanent_delivery_failure() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let cfg = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            topic_prefix: "t".into(),
            ..KafkaConfig::default()
        };
        mock.create_topic("t.x", 1, 1).unwrap();
        let tracker = AckTracker::new();
        let sink = CdcSink::new(&cfg, tracker.clone()).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let seq = tracker.begin();
        sink.send(seq, "t.x", Some(b"k"), b"{}").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (error, permanent) = loop {
            if let Some(f) = tracker.take_failure_kind() {
                break f;
            }
            assert!(Instant::now() < deadline, "no delivery report");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(permanent, "{error}");
    }
}
