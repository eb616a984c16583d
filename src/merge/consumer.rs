//! The merge role: one keyed consumer ([`crate::kafka::keyed`]) of the group over the
//! Memberstack, Stripe and CDC topics — one member's changes in order, different members in
//! parallel, an offset stored only for finished records — and, beside it, the outbox's
//! appliers and outcome relay ([`super::outbox`]).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::apply::{self, Applier};
use super::change::TopicKind;
use super::metrics::MergeMetrics;
use super::outbox::{self, Wakeups, auth::AuthApplier, lanes, memberstack::Pusher};
use super::worker::{self, Shared};
use crate::config::Config;
use crate::kafka::keyed::{self, Handler, KeyedConsumer};
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
    #[error(transparent)]
    WorkerEnded(#[from] keyed::WorkerEnded),
}

pub struct Merge {
    consumer: KeyedConsumer,
    shared: Arc<Shared>,
    prefix: String,
    pusher: Option<Pusher>,
    auth: Option<AuthApplier>,
    drain: Duration,
    posthog_task: Option<tokio::task::JoinHandle<()>>,
}

/// Merge's records for the keyed consumer: each worker keeps its own database connection.
struct Records {
    shared: Arc<Shared>,
    prefix: String,
}

impl Handler for Records {
    type Worker = Option<Client>;

    fn worker(&self) -> Option<Client> {
        None
    }

    async fn handle(
        &self,
        db: &mut Option<Client>,
        message: OwnedMessage,
        stop: &CancellationToken,
    ) -> bool {
        // A configured topic outside the prefix is read as CDC (Debezium shape).
        let kind = TopicKind::of(message.topic(), &self.prefix).unwrap_or(TopicKind::Cdc);
        // The tombstone after a CDC delete is for compacted topics and upsert consumers; the
        // delete event before it carried the change.
        if kind == TopicKind::Cdc && crate::cdc::envelope::is_tombstone(message.payload()) {
            return true;
        }
        worker::process(&self.shared, db, message, kind, stop).await
    }
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
        let merge_metrics = MergeMetrics::register(metrics.registry())?;
        let consumer = KeyedConsumer::new(
            &config.kafka,
            keyed::Settings {
                group_id: m.group_id.clone(),
                topics: subscribed,
                workers: m.workers,
                max_in_flight: m.max_in_flight,
                commit_interval_ms: m.commit_interval_ms,
                fetch_wait_max_ms: m.fetch_wait_max_ms,
                session_timeout_ms: m.session_timeout_ms,
                drain: config.shutdown.drain_timeout(),
                role: "merge",
            },
            metrics.registry(),
            merge_metrics.in_flight.clone(),
        )?;

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
        let pusher = memberstack.clone().map(|ms| {
            Pusher::new(
                Arc::clone(&cfg),
                Arc::clone(&fields),
                ms,
                merge_metrics.outbox.orphans.clone(),
            )
        });
        let auth = auth.map(|a| {
            AuthApplier::new(
                Arc::clone(&cfg),
                a,
                merge_metrics.outbox.sync_conflicts.clone(),
                memberstack.clone(),
            )
        });
        let shared = Arc::new(Shared {
            applier: Applier::new(Arc::clone(&cfg), fields, memberstack, auth.is_some()),
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
            metrics: merge_metrics,
            kafka_wait: Duration::from_secs(5),
        });
        Ok(Self {
            consumer,
            shared,
            prefix: config.kafka.topic_prefix.clone(),
            pusher,
            auth,
            drain: config.shutdown.drain_timeout(),
            posthog_task,
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), MergeError> {
        // The outbox's appliers and relay run beside the consumer and stop after it (the last
        // changes' outcomes are relayed if the drain leaves time).
        let stop_outbox = CancellationToken::new();
        let mut outbox_tasks = tokio::task::JoinSet::new();
        let cfg = Arc::clone(&self.shared.cfg);
        if let Some(pusher) = self.pusher.take() {
            outbox_tasks.spawn(lanes::run(
                Arc::new(pusher),
                Arc::clone(&self.shared),
                cfg.push_lanes,
                stop_outbox.clone(),
            ));
        }
        if let Some(auth) = self.auth.take() {
            outbox_tasks.spawn(lanes::run(
                Arc::new(auth),
                Arc::clone(&self.shared),
                cfg.auth_lanes,
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

        let records = Arc::new(Records {
            shared: Arc::clone(&self.shared),
            prefix: self.prefix.clone(),
        });
        let consumed = self.consumer.run(records, shutdown).await;
        // What remains of the drain: let the relay send the last outcomes.
        let deadline = tokio::time::Instant::now() + self.drain / 2;
        let _ = tokio::time::timeout_at(deadline, outbox::drained(&self.shared)).await;
        stop_outbox.cancel();
        while outbox_tasks.join_next().await.is_some() {}

        if let Some(ph) = Arc::get_mut(&mut self.shared).and_then(|s| s.posthog.take()) {
            ph.shutdown();
        }
        if let Some(task) = self.posthog_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let _ = self.shared.producer.flush(Duration::from_secs(5));
        tracing::info!("merge stopped");
        Ok(consumed?)
    }
}
