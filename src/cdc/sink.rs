//! CDC's Kafka producer: idempotent, `acks=all`, and never gives up on a record
//! (`message.timeout.ms = 0`): while Kafka is away the local queue fills, `send` waits, the
//! stream stops reading, and Postgres keeps the WAL — backpressure instead of loss.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::util::Timeout;

use super::ack::{AckTracker, CdcProducerContext};
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
}

/// How long to wait before retrying when the local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

impl CdcSink {
    pub fn new(cfg: &KafkaConfig, tracker: AckTracker) -> Result<Self, SinkError> {
        let producer = crate::kafka::producer_config(cfg)
            .set("message.timeout.ms", "0")
            // Large batches: CDC is a throughput path; acks still gate the LSN.
            .set("batch.num.messages", "10000")
            // The queue is where backpressure starts: bounded in bytes as well as in count,
            // so a Kafka outage or a 1M-row transaction cannot grow memory by more than this.
            .set("queue.buffering.max.messages", "100000")
            .set("queue.buffering.max.kbytes", "32768")
            .set("compression.type", "lz4")
            .create_with_context(CdcProducerContext {
                tracker: tracker.clone(),
            })
            .map_err(SinkError::Create)?;
        Ok(Self { producer, tracker })
    }

    /// Hands one record of transaction `seq` to librdkafka, waiting while its queue is full.
    /// Returns `true` if it had to wait (backpressure).
    pub async fn send(
        &self,
        seq: u64,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<bool, SinkError> {
        // Count first: the delivery callback may run before `send` returns.
        self.tracker.produced(seq);
        let mut waited = false;
        loop {
            let mut record = BaseRecord::with_opaque_to(topic, seq as usize).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(waited),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    waited = true;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
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
