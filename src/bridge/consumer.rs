//! The bridge role: one keyed consumer ([`crate::kafka::keyed`]) of its own group
//! (`bridge.group_id`) over `<prefix>.sync` — one member's outcomes are delivered in order,
//! different members in parallel, and an offset is stored only when its record and every
//! earlier one of the partition are finished.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;

use super::client::MakeClient;
use super::metrics::BridgeMetrics;
use super::route::Router;
use super::worker::{self, Shared};
use crate::config::Config;
use crate::kafka::keyed::{self, Handler, KeyedConsumer};
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
    #[error(transparent)]
    WorkerEnded(#[from] keyed::WorkerEnded),
}

pub struct Bridge {
    consumer: KeyedConsumer,
    shared: Arc<Shared>,
}

/// The bridge's records for the keyed consumer.
struct Outcomes(Arc<Shared>);

impl Handler for Outcomes {
    type Worker = ();

    fn worker(&self) {}

    async fn handle(&self, _: &mut (), message: OwnedMessage, stop: &CancellationToken) -> bool {
        worker::process(&self.0, &message, stop).await
    }
}

impl Bridge {
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Self, BridgeError> {
        let b = &config.bridge;
        if !b.enabled() {
            return Err(BridgeError::NoRoutes);
        }
        let topics = Topics::new(&config.kafka.topic_prefix);
        let topic = b.topic.clone().unwrap_or_else(|| topics.sync());
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
            metrics: BridgeMetrics::register(
                metrics.registry(),
                &b.routes.keys().map(String::as_str).collect::<Vec<_>>(),
            )?,
            kafka_wait: Duration::from_secs(5),
        });
        let consumer = KeyedConsumer::new(
            &config.kafka,
            keyed::Settings {
                group_id: b.group_id.clone(),
                topics: vec![topic],
                workers: b.workers,
                max_in_flight: b.max_in_flight,
                commit_interval_ms: b.commit_interval_ms,
                fetch_wait_max_ms: b.fetch_wait_max_ms,
                session_timeout_ms: b.session_timeout_ms,
                drain: config.shutdown.drain_timeout(),
                role: "bridge",
            },
            metrics.registry(),
            shared.metrics.in_flight.clone(),
        )?;
        Ok(Self { consumer, shared })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let outcomes = Arc::new(Outcomes(Arc::clone(&self.shared)));
        let consumed = self.consumer.run(outcomes, shutdown).await;
        let _ = self.shared.producer.flush(Duration::from_secs(5));
        tracing::info!("bridge stopped");
        Ok(consumed?)
    }
}
