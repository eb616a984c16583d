//! A producer whose `send` resolves only once the broker has acknowledged the record
//! (idempotent, `acks=all`), with errors classified the way callers need: retry later, or
//! the record itself is unacceptable, or the producer is broken.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::sinks::retry::RetryPolicy;

/// One record to produce. Headers are `(name, value)` pairs.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// Where the broker stored an acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The local queue stayed full for the whole wait: the broker is slow or away.
    #[error("the producer queue is full")]
    QueueFull,
    /// Not acknowledged in time (broker down, partition leader missing, …). Safe to retry:
    /// the record may still arrive, and consumers deduplicate by event id.
    #[error("not acknowledged by Kafka: {0}")]
    Unavailable(#[source] KafkaError),
    /// The record can never be accepted (too large, topic invalid or not authorised).
    #[error("Kafka refused the record: {0}")]
    Rejected(#[source] KafkaError),
    /// The idempotent producer hit a fatal error; it must be re-created.
    #[error("the Kafka producer failed fatally: {0}")]
    Fatal(#[source] KafkaError),
    #[error("cannot create the Kafka producer: {0}")]
    Create(#[source] KafkaError),
}

impl ProduceError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::QueueFull | Self::Unavailable(_))
    }

    fn classify(err: KafkaError) -> Self {
        let code = err.rdkafka_error_code();
        match code {
            Some(RDKafkaErrorCode::QueueFull) => Self::QueueFull,
            Some(RDKafkaErrorCode::Fatal) => Self::Fatal(err),
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::UnknownTopic,
            ) => Self::Rejected(err),
            _ => Self::Unavailable(err),
        }
    }
}

/// How [`Producer::send_until_acknowledged`] ended.
#[derive(Debug)]
pub enum Sent {
    /// The broker holds the record — its smaller version (`shrunk`) when the broker refused
    /// the original for good.
    Acknowledged { shrunk: bool },
    /// Refused for good, and there is no smaller version: nothing was stored. Logged here; the
    /// caller counts it and moves on (retrying cannot help, and would stop its stream).
    Refused(ProduceError),
    /// `stop` came first; the record may or may not be stored.
    Stopped,
    /// The producer is broken (a fatal idempotence error) and will refuse every record: the
    /// caller must end its role so that the supervisor restarts it with a new producer.
    Fatal(ProduceError),
}

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    /// `message_timeout` bounds how long librdkafka keeps retrying one record; callers that
    /// answer someone (a webhook sender) set it to their own deadline so that a record is not
    /// delivered long after its sender was told to retry.
    pub fn new(cfg: &KafkaConfig, message_timeout: Duration) -> Result<Self, ProduceError> {
        let inner = super::producer_config(cfg)
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().max(1).to_string(),
            )
            .create()
            .map_err(ProduceError::Create)?;
        Ok(Self { inner })
    }

    /// Sends and waits for the broker's acknowledgement. `queue_wait` is how long to wait for
    /// room in a full local queue — the backpressure point.
    pub async fn send(
        &self,
        record: &Record<'_>,
        queue_wait: Duration,
    ) -> Result<Delivered, ProduceError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(*value),
            });
        }
        let fr = FutureRecord::to(record.topic)
            .key(record.key)
            .payload(record.payload)
            .headers(headers);
        match self.inner.send(fr, Timeout::After(queue_wait)).await {
            Ok(delivery) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((err, _)) => Err(ProduceError::classify(err)),
        }
    }

    /// Sends until the broker acknowledges, backing off (jittered, 200 ms doubling to 10 s)
    /// while it is away, however long that is: the one produce loop of the consumers that must
    /// not move on before their record is stored (dead letters, outcomes).
    ///
    /// A record the broker refuses for good (too large for its record limit) is replaced by
    /// `shrink`'s smaller version of it and sent again; without one it is [`Sent::Refused`].
    pub async fn send_until_acknowledged(
        &self,
        record: &Record<'_>,
        queue_wait: Duration,
        stop: &CancellationToken,
        shrink: impl Fn(&[u8]) -> Option<Vec<u8>>,
    ) -> Sent {
        let backoff = RetryPolicy::new(
            u32::MAX,
            Duration::from_millis(200),
            Duration::from_secs(10),
        );
        let mut failures = 0;
        let mut smaller: Option<Vec<u8>> = None;
        loop {
            let current = Record {
                payload: smaller.as_deref().unwrap_or(record.payload),
                ..record.clone()
            };
            let error = match self.send(&current, queue_wait).await {
                Ok(_) => {
                    return Sent::Acknowledged {
                        shrunk: smaller.is_some(),
                    };
                }
                Err(e) => e,
            };
            match error {
                ProduceError::Rejected(_) => match shrink(current.payload) {
                    Some(s) if s.len() < current.payload.len() => {
                        tracing::warn!(topic = record.topic, bytes = current.payload.len(), error = %error, "Kafka refused the record; sending it without its largest values");
                        smaller = Some(s);
                    }
                    _ => {
                        tracing::error!(topic = record.topic, bytes = current.payload.len(), error = %error, "Kafka refused the record and it cannot be made smaller: not sent");
                        return Sent::Refused(error);
                    }
                },
                ProduceError::Fatal(_) | ProduceError::Create(_) => return Sent::Fatal(error),
                ProduceError::QueueFull | ProduceError::Unavailable(_) => {
                    failures += 1;
                    let wait = backoff.delay(failures, None);
                    tracing::warn!(topic = record.topic, error = %error, retry_in_ms = wait.as_millis() as u64, "Kafka did not take the record; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return Sent::Stopped,
                    }
                }
            }
        }
    }

    /// Waits for queued records to be acknowledged (used at shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(Timeout::After(timeout))
    }
}
