//! `membersync_dlq_unreplayed{topic}`: dead letters on `<prefix>.dlq` that nobody replayed,
//! so that an alert can stay firing until someone does. Computed once a minute by the merge
//! role, cheaply and approximately: the records the topic holds (the sum over its partitions
//! of high − low watermark; nothing is read) minus the dead letters `membersync dlq replay`
//! recorded (`count(distinct target)` of `audit_logs` rows with action `dlq_replay`), at
//! least 0. Records the topic's retention deleted while their replay rows remain make it
//! read low (never below 0); a replay recorded for a letter of another deployment's topic
//! sharing the database would too. Reference: docs/operations.md#membersyncdeadlettersunreplayed.

use std::time::Duration;

use prometheus::{IntGaugeVec, Opts};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, Login};
use crate::kafka::topics::Topics;
use crate::telemetry::Metrics;

/// How often the backlog is recomputed.
const EVERY: Duration = Duration::from_secs(60);

pub(super) struct DlqBacklog {
    config: Config,
    topic: String,
    gauge: IntGaugeVec,
}

impl DlqBacklog {
    pub(super) fn new(config: &Config, metrics: &Metrics) -> Result<Self, prometheus::Error> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "membersync_dlq_unreplayed",
                "Dead letters on the topic without a dlq_replay audit_logs row (records on the topic minus replays recorded, at least 0; recomputed every minute).",
            ),
            &["topic"],
        )?;
        metrics.registry().register(Box::new(gauge.clone()))?;
        Ok(Self {
            config: config.clone(),
            topic: Topics::new(&config.kafka.topic_prefix).dlq(),
            gauge,
        })
    }

    /// Recomputes the gauge every minute (the first time at once) until `shutdown`.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let consumer = match self.consumer() {
            Ok(c) => std::sync::Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "dead-letter backlog: cannot create a Kafka client; membersync_dlq_unreplayed is not exported");
                return;
            }
        };
        let mut db: Option<Client> = None;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.compute(&consumer, &mut db).await {
                Ok(n) => self.gauge.with_label_values(&[&self.topic]).set(n),
                Err(e) => {
                    tracing::warn!(error = %e, topic = self.topic, "dead-letter backlog not recomputed; retrying in a minute");
                }
            }
        }
    }

    fn consumer(&self) -> Result<BaseConsumer, rdkafka::error::KafkaError> {
        // Never subscribed: it joins no group, it only reads the partitions' offsets.
        crate::kafka::client_config(&self.config.kafka)
            .set(
                "group.id",
                format!("{}-dlq-backlog", self.config.merge.group_id),
            )
            .set("enable.auto.commit", "false")
            .create()
    }

    async fn compute(
        &self,
        consumer: &std::sync::Arc<BaseConsumer>,
        db: &mut Option<Client>,
    ) -> Result<i64, String> {
        let records = {
            let consumer = std::sync::Arc::clone(consumer);
            let topic = self.topic.clone();
            let timeout = self.config.kafka.request_timeout();
            tokio::task::spawn_blocking(move || records(&consumer, &topic, timeout))
                .await
                .map_err(|e| e.to_string())??
        };
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            *db = Some(
                db::connect(&self.config.database, Login::Merge)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let client = db.as_ref().expect("connected above");
        let replayed: i64 = client
            .query_one(
                "select count(distinct target) from public.audit_logs where action = 'dlq_replay'",
                &[],
            )
            .await
            .map_err(|e| {
                let hint = if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                    " (merge's database login needs select on public.audit_logs, see docs/operations.md#membersyncdeadlettersunreplayed)"
                } else {
                    ""
                };
                format!("cannot count the replays: {e}{hint}")
            })?
            .get(0);
        Ok((records - replayed).max(0))
    }
}

/// The records `topic` holds: the sum over its partitions of high − low watermark.
fn records(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<i64, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut total = 0;
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| e.to_string())?;
        total += (high - low).max(0);
    }
    Ok(total)
}
