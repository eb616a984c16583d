//! The merge role: one consumer of the group over the Memberstack, Stripe and CDC topics,
//! routing each record to a worker by its key (the member id), so that one member's changes
//! are processed in order while different members proceed in parallel. Offsets are stored
//! only for finished records (see `offsets`) and committed by librdkafka's auto-commit —
//! also on a rebalance — and once more, synchronously, at shutdown.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::apply::{self, Applier};
use super::change::TopicKind;
use super::metrics::MergeMetrics;
use super::offsets::OffsetTracker;
use super::outbox::{self, Wakeups, auth::AuthApplier, lanes, memberstack::Pusher};
use super::worker::{self, Finished, Job, Shared};
use crate::config::Config;
use crate::kafka::producer::Producer;
use crate::kafka::topics::Topics;
use crate::sinks::memberstack::MemberstackClient;
use crate::sinks::posthog::PostHog;
use crate::sinks::supabase_auth::SupabaseAuthClient;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot create the producer: {0}")]
    Producer(#[from] crate::kafka::producer::ProduceError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("Memberstack client: {0}")]
    Memberstack(#[from] crate::sinks::memberstack::MemberstackError),
    #[error("Supabase Auth client: {0}")]
    Auth(#[from] crate::sinks::supabase_auth::AuthError),
}

/// Tells the consumer loop which partitions were taken away, and reports consumer lag.
struct MergeContext {
    revoked: mpsc::UnboundedSender<Vec<(String, i32)>>,
    lag: crate::kafka::lag::ConsumerLag,
}

impl ClientContext for MergeContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.lag.observe_raw(statistics);
    }
}

impl ConsumerContext for MergeContext {
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

pub struct Merge {
    consumer: StreamConsumer<MergeContext>,
    pusher: Option<Pusher>,
    auth: Option<AuthApplier>,
    revoked: mpsc::UnboundedReceiver<Vec<(String, i32)>>,
    shared: Arc<Shared>,
    prefix: String,
    workers: usize,
    max_in_flight: usize,
    drain: Duration,
    posthog_task: Option<tokio::task::JoinHandle<()>>,
}

impl Merge {
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Self, MergeError> {
        let topics = Topics::new(&config.kafka.topic_prefix);
        let m = &config.merge;
        let subscribed: Vec<String> = if m.topics.is_empty() {
            vec![
                topics.memberstack(),
                topics.stripe(),
                topics.cdc("public", "members"),
            ]
        } else {
            m.topics.clone()
        };
        let (tx, revoked) = mpsc::unbounded_channel();
        let lag = crate::kafka::lag::ConsumerLag::new(metrics.registry(), &m.group_id);
        let mut client_config = crate::kafka::client_config(&config.kafka);
        crate::kafka::lag::enable_statistics(
            &mut client_config,
            config.kafka.statistics_interval_ms,
        );
        let consumer: StreamConsumer<MergeContext> = client_config
            .set("group.id", &m.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", m.commit_interval_ms.to_string())
            // Offsets are stored by hand, only for finished records.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", m.fetch_wait_max_ms.to_string())
            .set("session.timeout.ms", m.session_timeout_ms.to_string())
            .create_with_context(MergeContext { revoked: tx, lag })?;
        let refs: Vec<&str> = subscribed.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;

        let memberstack = match &config.memberstack.api_key {
            Some(_) => Some(MemberstackClient::new(
                &config.memberstack,
                Some(metrics.registry()),
            )?),
            None => {
                tracing::warn!(
                    "memberstack.api_key is not set: merge writes Supabase only, nothing is pushed to Memberstack"
                );
                None
            }
        };
        let auth = match &config.supabase.url {
            Some(_) => Some(SupabaseAuthClient::new(&config.supabase)?),
            None => None,
        };
        let (posthog, posthog_task) =
            match PostHog::start(&config.posthog, Some(metrics.registry())) {
                Some((ph, task)) => (Some(ph), Some(task)),
                None => (None, None),
            };
        let cfg = Arc::new(m.clone());
        let fields = Arc::new(apply::fields(&cfg));
        let pusher = memberstack
            .clone()
            .map(|ms| Pusher::new(Arc::clone(&cfg), Arc::clone(&fields), ms));
        let auth_applier = auth.map(|a| AuthApplier::new(Arc::clone(&cfg), a));
        let shared = Arc::new(Shared {
            applier: Applier::new(
                Arc::clone(&cfg),
                fields,
                memberstack,
                auth_applier.is_some(),
            ),
            wake: Wakeups::new(),
            cfg,
            database: config.database.clone(),
            producer: Producer::new(
                &config.kafka,
                Duration::from_millis(config.kafka.message_timeout_ms),
            )?,
            sync_topic: topics.sync(),
            dlq_topic: topics.dlq(),
            posthog,
            metrics: MergeMetrics::register(metrics.registry())?,
            kafka_wait: Duration::from_secs(5),
        });
        Ok(Self {
            consumer,
            pusher,
            auth: auth_applier,
            revoked,
            shared,
            prefix: config.kafka.topic_prefix.clone(),
            workers: m.workers,
            max_in_flight: m.max_in_flight,
            drain: config.shutdown.drain_timeout(),
            posthog_task,
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), MergeError> {
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
        // The outbox's appliers and relay run beside the consumer, and stop after the workers
        // (the last changes' outcomes are relayed if the drain leaves time).
        let stop_outbox = CancellationToken::new();
        let mut outbox_tasks = tokio::task::JoinSet::new();
        if let Some(pusher) = self.pusher.take() {
            outbox_tasks.spawn(lanes::run(
                Arc::new(pusher),
                Arc::clone(&self.shared),
                self.shared.cfg.push_lanes,
                stop_outbox.clone(),
            ));
        }
        if let Some(auth) = self.auth.take() {
            outbox_tasks.spawn(lanes::run(
                Arc::new(auth),
                Arc::clone(&self.shared),
                self.shared.cfg.auth_lanes,
                stop_outbox.clone(),
            ));
        }
        outbox_tasks.spawn(outbox::relay::run(
            Arc::clone(&self.shared),
            stop_outbox.clone(),
        ));
        outbox_tasks.spawn(outbox::housekeeping(
            Arc::clone(&self.shared),
            stop_outbox.clone(),
        ));
        let mut tracker = OffsetTracker::default();
        tracing::info!(workers = self.workers, "merge consuming");

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
                    let message = match message {
                        Ok(m) => m.detach(),
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    // A configured topic outside the prefix is read as CDC (Debezium shape).
                    let kind = TopicKind::of(message.topic(), &self.prefix).unwrap_or(TopicKind::Cdc);
                    self.dispatch(&queues, &mut tracker, message, kind).await;
                }
            }
        }

        // Drain: let the workers finish what they hold, within the drain timeout.
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
        // Give the relay what remains of the drain to send the last outcomes.
        let _ = tokio::time::timeout_at(deadline, outbox::drained(&self.shared)).await;
        stop_outbox.cancel();
        while outbox_tasks.join_next().await.is_some() {}
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in tracker.committable() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1));
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "final offset commit failed; finished records may be read again");
        }
        if let Some(ph) = Arc::get_mut(&mut self.shared).and_then(|s| s.posthog.take()) {
            ph.shutdown();
        }
        if let Some(task) = self.posthog_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let _ = self.shared.producer.flush(Duration::from_secs(5));
        tracing::info!(unfinished = tracker.in_flight(), "merge stopped");
        Ok(())
    }

    async fn dispatch(
        &self,
        queues: &[mpsc::Sender<Job>],
        tracker: &mut OffsetTracker,
        message: rdkafka::message::OwnedMessage,
        kind: TopicKind,
    ) {
        tracker.begin(message.topic(), message.partition(), message.offset());
        self.shared
            .metrics
            .in_flight
            .set(tracker.in_flight() as i64);
        let mut h = DefaultHasher::new();
        message.key().unwrap_or_default().hash(&mut h);
        let queue = &queues[(h.finish() % queues.len() as u64) as usize];
        if queue.send(Job { message, kind }).await.is_err() {
            tracing::error!("a merge worker stopped unexpectedly");
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
