//! The bridge role: one consumer of its own group (`bridge.group_id`) over `<prefix>.sync`,
//! routing each outcome to a worker by its key (the member id) — one member's outcomes are
//! delivered in order, different members in parallel — and storing an offset only when its
//! record and every earlier one of the partition are finished (`kafka::offsets`, shared with
//! merge). librdkafka commits stored offsets every `bridge.commit_interval_ms` and on
//! rebalance; shutdown commits once more, synchronously.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::MakeClient;
use super::metrics::BridgeMetrics;
use super::route::Router;
use super::worker::{self, Finished, Job, Shared};
use crate::config::Config;
use crate::kafka::lag::{self, ConsumerLag};
use crate::kafka::offsets::OffsetTracker;
use crate::kafka::producer::Producer;
use crate::kafka::topics::Topics;
use crate::sinks::retry::RetryPolicy;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("no [bridge.routes] configured: the bridge has nowhere to deliver outcomes")]
    NoRoutes,
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot create the producer: {0}")]
    Producer(#[from] crate::kafka::producer::ProduceError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Tells the consumer loop which partitions were taken away, and reports consumer lag.
struct BridgeContext {
    revoked: mpsc::UnboundedSender<Vec<(String, i32)>>,
    lag: ConsumerLag,
}

impl ClientContext for BridgeContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.lag.observe_raw(statistics);
    }
}

impl ConsumerContext for BridgeContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            let _ = self.revoked.send(parts);
        }
    }
}

pub struct Bridge {
    consumer: StreamConsumer<BridgeContext>,
    revoked: mpsc::UnboundedReceiver<Vec<(String, i32)>>,
    shared: Arc<Shared>,
    lag: ConsumerLag,
    workers: usize,
    max_in_flight: usize,
    drain: Duration,
}

impl Bridge {
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Self, BridgeError> {
        let b = &config.bridge;
        if !b.enabled() {
            return Err(BridgeError::NoRoutes);
        }
        let topics = Topics::new(&config.kafka.topic_prefix);
        let topic = b.topic.clone().unwrap_or_else(|| topics.sync());
        let (tx, revoked) = mpsc::unbounded_channel();
        let lag = ConsumerLag::new(metrics.registry(), &b.group_id);
        let mut client_config = crate::kafka::client_config(&config.kafka);
        client_config
            .set("group.id", &b.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", b.commit_interval_ms.to_string())
            // Offsets are stored by hand, only for finished records.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", b.fetch_wait_max_ms.to_string())
            .set("session.timeout.ms", b.session_timeout_ms.to_string());
        lag::enable_statistics(&mut client_config, config.kafka.statistics_interval_ms);
        let consumer: StreamConsumer<BridgeContext> =
            client_config.create_with_context(BridgeContext {
                revoked: tx,
                lag: lag.clone(),
            })?;
        consumer.subscribe(&[&topic])?;
        let mut policy = RetryPolicy::new(
            b.max_attempts,
            Duration::from_millis(b.backoff_base_ms),
            Duration::from_millis(b.backoff_max_ms),
        );
        policy.max_retry_after = Duration::from_secs(b.max_retry_after_secs);
        let router = Router::new(b);
        for (name, route) in &b.routes {
            let hosts: Vec<String> = route.urls().iter().map(super::route::host_of).collect();
            tracing::info!(route = %name, ?hosts, fallback = route.fallback, "bridge route");
        }
        let shared = Arc::new(Shared {
            router,
            client: MakeClient::new(b.request_timeout())?,
            policy,
            producer: Producer::new(
                &config.kafka,
                Duration::from_millis(config.kafka.message_timeout_ms),
            )?,
            dlq_topic: topics.bridge_dlq(),
            metrics: BridgeMetrics::register(metrics.registry())?,
            kafka_wait: Duration::from_secs(5),
        });
        Ok(Self {
            consumer,
            revoked,
            shared,
            lag,
            workers: b.workers,
            max_in_flight: b.max_in_flight,
            drain: config.shutdown.drain_timeout(),
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let stop_workers = CancellationToken::new();
        let (finished_tx, mut finished) = mpsc::unbounded_channel::<Finished>();
        let mut queues = Vec::with_capacity(self.workers);
        let mut handles = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            let (tx, rx) = mpsc::channel::<Job>(self.max_in_flight);
            queues.push(tx);
            handles.push(tokio::spawn(worker::run(
                Arc::clone(&self.shared),
                rx,
                finished_tx.clone(),
                stop_workers.clone(),
            )));
        }
        drop(finished_tx);
        let mut tracker = OffsetTracker::default();
        tracing::info!(workers = self.workers, "bridge consuming");

        loop {
            // Backpressure: no more than max_in_flight records read and not finished.
            let room = tracker.in_flight() < self.max_in_flight;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(parts) = self.revoked.recv() => {
                    for (topic, partition) in parts {
                        tracker.forget(&topic, partition);
                    }
                }
                Some(done) = finished.recv() => self.finish(&mut tracker, done),
                message = self.consumer.recv(), if room => {
                    match message {
                        Ok(m) => self.dispatch(&queues, &mut tracker, m.detach()).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }

        // Drain: in-flight deliveries finish (or are interrupted by stop_workers, and their
        // records are delivered again after the restart), within the drain timeout.
        drop(queues);
        let deadline = tokio::time::Instant::now() + self.drain;
        while tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, finished.recv()).await {
                Ok(Some(done)) => self.finish(&mut tracker, done),
                _ => break,
            }
        }
        stop_workers.cancel();
        for h in handles {
            let _ = h.await;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in tracker.committable() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1));
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "final offset commit failed; delivered outcomes may be delivered again");
        }
        let _ = self.shared.producer.flush(Duration::from_secs(5));
        self.lag.clear();
        tracing::info!(unfinished = tracker.in_flight(), "bridge stopped");
        Ok(())
    }

    async fn dispatch(
        &self,
        queues: &[mpsc::Sender<Job>],
        tracker: &mut OffsetTracker,
        message: rdkafka::message::OwnedMessage,
    ) {
        tracker.begin(message.topic(), message.partition(), message.offset());
        self.shared
            .metrics
            .in_flight
            .set(tracker.in_flight() as i64);
        let mut h = DefaultHasher::new();
        message.key().unwrap_or_default().hash(&mut h);
        let queue = &queues[(h.finish() % queues.len() as u64) as usize];
        if queue.send(Job { message }).await.is_err() {
            tracing::error!("a bridge worker stopped unexpectedly");
        }
    }

    fn finish(&self, tracker: &mut OffsetTracker, done: Finished) {
        if let Some(offset) = tracker.finish(&done.topic, done.partition, done.offset)
            && let Err(e) = self
                .consumer
                .store_offset(&done.topic, done.partition, offset)
        {
            tracing::debug!(topic = %done.topic, partition = done.partition, error = %e, "offset not stored (partition revoked?)");
        }
        self.shared
            .metrics
            .in_flight
            .set(tracker.in_flight() as i64);
    }
}
