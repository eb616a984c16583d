//! The keyed consumer merge and the bridge share: one consumer of a group, routing each record
//! to a worker by its key (the member id), so that one member's records are handled in
//! partition order while different members proceed in parallel.
//!
//! The offset rule lives here, once: a record's offset is stored only when it and every
//! earlier record of its partition are finished ([`OffsetTracker`]) — their effects, or their
//! dead letters, are durable. librdkafka commits stored offsets every `commit_interval_ms` and
//! on a rebalance; shutdown drains the workers within the drain timeout and commits once
//! more, synchronously. At most `max_in_flight` records are read and not finished: past that
//! the consumer stops reading (backpressure, bounded memory, however long a worker waits out
//! an outage).
//!
//! A worker that ends outside a shutdown (a panic, or a handler that gave up: its producer
//! broke) would leave its members' records waiting for good while the role looked alive. So the
//! consumer stops too, commits what is finished and returns [`WorkerEnded`]: the role fails,
//! the daemon exits non-zero, and the supervisor starts a fresh one.

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::lag::{self, ConsumerLag};
use super::offsets::OffsetTracker;
use crate::config::KafkaConfig;
use crate::telemetry::liveness;

/// A worker ended while the consumer was running: see the module's documentation.
#[derive(Debug, thiserror::Error)]
#[error("a {role} worker ended unexpectedly ({how}); the role stops so that it is restarted")]
pub struct WorkerEnded {
    pub role: &'static str,
    pub how: String,
}

/// What a worker does with one record.
pub trait Handler: Send + Sync + 'static {
    /// Each worker's own state (a database connection, …).
    type Worker: Send + 'static;

    fn worker(&self) -> Self::Worker;

    /// Handles the record until its effects (or its dead letter) are durable: `true`. `false`:
    /// interrupted by `stop` first, or unable to go on (its producer broke); the record is not
    /// reported finished, so its offset is not committed and it is read again after the
    /// restart. Outside a shutdown, `false` ends the role ([`WorkerEnded`]).
    fn handle(
        &self,
        worker: &mut Self::Worker,
        message: OwnedMessage,
        stop: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;
}

/// The group's settings (the `[merge]` or `[bridge]` section).
#[derive(Debug, Clone)]
pub struct Settings {
    pub group_id: String,
    pub topics: Vec<String>,
    pub workers: usize,
    pub max_in_flight: usize,
    pub commit_interval_ms: u64,
    pub fetch_wait_max_ms: u64,
    pub session_timeout_ms: u64,
    pub drain: Duration,
    /// What the role is called in logs.
    pub role: &'static str,
}

/// Tells the consumer loop which partitions were taken away, and reports consumer lag.
struct Context {
    revoked: mpsc::UnboundedSender<Vec<(String, i32)>>,
    lag: ConsumerLag,
}

impl ClientContext for Context {
    fn stats_raw(&self, statistics: &[u8]) {
        self.lag.observe_raw(statistics);
    }
}

impl ConsumerContext for Context {
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

/// A record whose handling ended.
struct Finished {
    topic: String,
    partition: i32,
    offset: i64,
}

pub struct KeyedConsumer {
    consumer: StreamConsumer<Context>,
    revoked: mpsc::UnboundedReceiver<Vec<(String, i32)>>,
    lag: ConsumerLag,
    settings: Settings,
    in_flight: IntGauge,
}

impl KeyedConsumer {
    pub fn new(
        kafka: &KafkaConfig,
        settings: Settings,
        registry: &prometheus::Registry,
        in_flight: IntGauge,
    ) -> Result<Self, KafkaError> {
        let (tx, revoked) = mpsc::unbounded_channel();
        let lag = ConsumerLag::new(registry, &settings.group_id);
        let mut client_config = super::client_config(kafka);
        client_config
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                settings.commit_interval_ms.to_string(),
            )
            // Offsets are stored by hand, only for finished records.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", settings.fetch_wait_max_ms.to_string())
            .set(
                "session.timeout.ms",
                settings.session_timeout_ms.to_string(),
            );
        lag::enable_statistics(&mut client_config, kafka.statistics_interval_ms);
        let consumer: StreamConsumer<Context> = client_config.create_with_context(Context {
            revoked: tx,
            lag: lag.clone(),
        })?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            consumer,
            revoked,
            lag,
            settings,
            in_flight,
        })
    }

    /// Consumes until `shutdown`, then drains and commits; or until a worker ends on its own.
    pub async fn run<H: Handler>(
        mut self,
        handler: Arc<H>,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerEnded> {
        let role = self.settings.role;
        let stop_workers = CancellationToken::new();
        let (finished_tx, mut finished) = mpsc::unbounded_channel::<Finished>();
        let mut queues = Vec::with_capacity(self.settings.workers);
        let mut workers = JoinSet::new();
        for _ in 0..self.settings.workers.max(1) {
            let (tx, rx) = mpsc::channel::<OwnedMessage>(self.settings.max_in_flight);
            queues.push(tx);
            workers.spawn(work(
                Arc::clone(&handler),
                rx,
                finished_tx.clone(),
                stop_workers.clone(),
            ));
        }
        let mut ended = None;
        drop(finished_tx);
        let mut tracker = OffsetTracker::default();
        tracing::info!(workers = self.settings.workers, "{role} consuming");
        // Liveness: every turn of this loop beats the role's heartbeat, and the tick makes an
        // idle loop (or one whose workers wait out an outage, reading nothing) turn.
        let heartbeat = liveness::heartbeat(role);
        let mut tick = tokio::time::interval(liveness::period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            heartbeat.beat();
            liveness::test_wedge(role).await;
            let room = tracker.in_flight() < self.settings.max_in_flight;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(joined) = workers.join_next() => {
                    let how = match joined {
                        Err(e) if e.is_panic() => "it panicked".to_owned(),
                        Err(e) => e.to_string(),
                        Ok(()) => "its handler could not go on".to_owned(),
                    };
                    let error = WorkerEnded { role, how };
                    tracing::error!(error = %error, "{role} stops consuming");
                    ended = Some(error);
                    break;
                }
                _ = tick.tick() => {}
                Some(parts) = self.revoked.recv() => {
                    for (topic, partition) in parts {
                        tracker.forget(&topic, partition);
                    }
                }
                Some(done) = finished.recv() => self.finish(&mut tracker, done),
                message = self.consumer.recv(), if room => match message {
                    Ok(m) => self.dispatch(&queues, &mut tracker, m.detach()).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }

        // Drain: the workers finish what they hold (or are interrupted by stop_workers, and
        // their records are read again after the restart), within the drain timeout.
        drop(queues);
        let deadline = tokio::time::Instant::now() + self.settings.drain;
        while tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, finished.recv()).await {
                Ok(Some(done)) => self.finish(&mut tracker, done),
                _ => break,
            }
        }
        stop_workers.cancel();
        while workers.join_next().await.is_some() {}
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in tracker.committable() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1));
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "{role}: final offset commit failed; finished records may be read again");
        }
        self.lag.clear();
        tracing::info!(unfinished = tracker.in_flight(), "{role} stopped consuming");
        ended.map_or(Ok(()), Err)
    }

    async fn dispatch(
        &self,
        queues: &[mpsc::Sender<OwnedMessage>],
        tracker: &mut OffsetTracker,
        message: OwnedMessage,
    ) {
        tracker.begin(message.topic(), message.partition(), message.offset());
        self.in_flight.set(tracker.in_flight() as i64);
        let queue = &queues[worker_of(message.key().unwrap_or_default(), queues.len())];
        if queue.send(message).await.is_err() {
            tracing::error!("a {} worker stopped unexpectedly", self.settings.role);
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
        self.in_flight.set(tracker.in_flight() as i64);
    }
}

/// The worker a key goes to: the same key, the same worker, always.
fn worker_of(key: &[u8], workers: usize) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % workers.max(1) as u64) as usize
}

async fn work<H: Handler>(
    handler: Arc<H>,
    mut jobs: mpsc::Receiver<OwnedMessage>,
    finished: mpsc::UnboundedSender<Finished>,
    stop: CancellationToken,
) {
    let mut state = handler.worker();
    while let Some(message) = jobs.recv().await {
        let done = Finished {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        if handler.handle(&mut state, message, &stop).await {
            let _ = finished.send(done);
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_of;

    #[test]
    fn one_key_always_goes_to_one_worker() {
        for key in [&b"mem_1"[..], b"mem_2", b""] {
            let w = worker_of(key, 16);
            assert!(w < 16);
            assert!((0..100).all(|_| worker_of(key, 16) == w));
        }
        assert_eq!(worker_of(b"mem_1", 1), 0);
    }
}
