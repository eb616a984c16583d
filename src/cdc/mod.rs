//! CDC: Supabase logical replication → Kafka, at least once, in commit order per key, with
//! nothing acknowledged to Postgres before Kafka holds it (docs/cdc.md).
//!
//! The owner type is [`Cdc`]: it waits for leadership of the slot (advisory lock; other
//! instances are hot standbys), creates the slot and snapshots when needed, then streams,
//! reconnecting with capped exponential backoff after any Postgres or Kafka error.

pub mod ack;
pub mod envelope;
pub mod identity;
pub mod incremental;
pub mod leader;
pub mod metrics;
pub mod oversize;
pub mod pgoutput;
pub mod relation;
pub mod sink;
pub mod slot;
pub mod snapshot;
pub mod stream;
pub mod temporal;
pub mod value;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use self::ack::AckTracker;
use self::metrics::CdcMetrics;
use self::sink::{CdcSink, OversizePolicy};
use self::slot::{Leader, SlotError, SlotState};
use crate::config::{Config, SnapshotMode};
use crate::db::{self, Login};
use crate::kafka::topics::Topics;
use crate::telemetry::liveness::{self, Heartbeat};

/// Prefix of the transactional logical message that marks membersync's own writes. It must
/// be the first statement of such a transaction: events are streamed as they arrive, so only
/// events after the marker can carry `source.origin`.
pub const ORIGIN_PREFIX: &str = "membersync.origin";
/// `source.origin` of events of a marked transaction.
pub const ORIGIN_NAME: &str = "membersync";

#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("replication stream: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    #[error("incremental snapshot: {0}")]
    Incremental(#[from] incremental::IncrementalError),
    #[error("Kafka did not acknowledge a change event: {0}")]
    Delivery(String),
    /// A delivery failed with an error no retry fixes (authorisation, invalid topic).
    #[error("Kafka refused a change event for good: {0}")]
    Rejected(String),
    #[error("lost leadership of the slot (lock connection closed)")]
    LeadershipLost,
    #[error("cannot create the slot: {0}")]
    CreateSlot(String),
}

impl CdcError {
    /// Errors that reconnecting cannot fix; an operator has to act. (A record too large for
    /// Kafka is not one: the sink replaces it, see `oversize`.)
    fn needs_operator(&self) -> bool {
        if let CdcError::Sink(sink::SinkError::Produce(e)) = self {
            // Retrying the same change cannot help.
            use rdkafka::error::RDKafkaErrorCode as C;
            if matches!(
                e.rdkafka_error_code(),
                Some(C::InvalidMessageSize | C::TopicAuthorizationFailed | C::InvalidTopic)
            ) {
                return true;
            }
        }
        matches!(
            self,
            CdcError::Rejected(_)
                | CdcError::Slot(
                    SlotError::Lost(_)
                        | SlotError::WrongPlugin { .. }
                        | SlotError::NoPublication { .. }
                )
        )
    }
}

/// What the snapshot and the stream share.
pub struct StreamContext {
    pub config: Config,
    pub topics: Topics,
    pub sink: CdcSink,
    pub tracker: AckTracker,
    pub metrics: CdcMetrics,
    /// The role's liveness heartbeat: every turn of CDC's loops beats it.
    pub heartbeat: Heartbeat,
    /// Operations not published (`cdc.skipped_operations`).
    pub skipped: Vec<envelope::Op>,
}

impl StreamContext {
    /// The key columns of `table`: configured ones, else `fallback` (the replica identity).
    pub fn skips(&self, op: envelope::Op) -> bool {
        self.skipped.contains(&op)
    }

    /// The Kafka key of an event about `row`, in the configured format.
    pub fn kafka_key(
        &self,
        row: &serde_json::Map<String, serde_json::Value>,
        columns: &[String],
    ) -> Option<Vec<u8>> {
        envelope::kafka_key(row, columns, self.config.cdc.key_format)
    }

    pub fn key_columns(&self, table: &str, fallback: &[String]) -> Vec<String> {
        self.config
            .cdc
            .key_columns
            .get(table)
            .cloned()
            .unwrap_or_else(|| fallback.to_vec())
    }

    /// Waits until everything produced is acknowledged; a delivery failure is an error.
    pub async fn wait_until_idle(&self) -> Result<(), snapshot::SnapshotError> {
        loop {
            self.heartbeat.beat();
            self.sink.resend_refused().await?;
            if let Some(c) = self.tracker.take_confirmed() {
                self.metrics.confirmed_lsn.set(c.lsn as i64);
            }
            if let Some(e) = self.tracker.take_failure() {
                return Err(snapshot::SnapshotError::Delivery(e));
            }
            if self.tracker.is_idle() {
                return Ok(());
            }
            tokio::select! {
                _ = self.tracker.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// Whether CDC is stopped on an error an operator must fix: readiness fails while it is
/// (`/readyz` 503), so that a wedged stream is not reported as healthy.
#[derive(Debug, Clone, Default)]
pub struct CdcStatus {
    stopped: Arc<Mutex<Option<String>>>,
}

impl CdcStatus {
    /// `Some(reason)` while stopped.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().expect("cdc status").clone()
    }

    pub(crate) fn set(&self, reason: Option<String>) {
        *self.stopped.lock().expect("cdc status") = reason;
    }
}

pub struct Cdc {
    ctx: Arc<StreamContext>,
    status: CdcStatus,
}

impl Cdc {
    pub fn new(config: &Config, metrics: &crate::telemetry::Metrics) -> Result<Self, CdcError> {
        let tracker = AckTracker::new();
        let metrics = CdcMetrics::register(metrics.registry())
            .map_err(|e| CdcError::CreateSlot(format!("metrics: {e}")))?;
        // Present at 0 from the start, so that an alert on its increase sees the first one.
        for table in &config.cdc.tables {
            metrics.oversized.with_label_values(&[table]);
        }
        let policy = OversizePolicy {
            max_record_bytes: config.cdc.max_record_bytes.max(1024),
            counter: Some(metrics.oversized.clone()),
            ..OversizePolicy::defaults(&config.kafka.topic_prefix)
        };
        let heartbeat = liveness::heartbeat("cdc");
        let mut sink = CdcSink::with_policy(&config.kafka, tracker.clone(), policy)?;
        sink.set_heartbeat(heartbeat.clone());
        Ok(Self {
            status: CdcStatus::default(),
            ctx: Arc::new(StreamContext {
                config: config.clone(),
                topics: Topics::new(&config.kafka.topic_prefix),
                sink,
                tracker,
                metrics,
                heartbeat,
                // Validated with the configuration.
                skipped: identity::skipped_operations(&config.cdc.skipped_operations)
                    .unwrap_or_default(),
            }),
        })
    }

    /// The handle readiness reads.
    pub fn status(&self) -> CdcStatus {
        self.status.clone()
    }

    /// Runs until `shutdown`. Errors an operator must fix (a lost slot) stop CDC loudly but
    /// leave the rest of the process running; it re-checks every minute.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), CdcError> {
        let ctx = &self.ctx;
        let max_backoff = Duration::from_secs(ctx.config.cdc.reconnect_max_backoff_secs);
        let mut backoff = Duration::from_secs(1);
        loop {
            ctx.heartbeat.beat();
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let leader = match Leader::acquire(
                &ctx.config.database,
                &ctx.config.cdc,
                Duration::from_secs(1),
                &shutdown,
                &ctx.heartbeat,
            )
            .await
            {
                Ok(Some(leader)) => leader,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach Postgres for CDC leadership; retrying");
                    liveness::sleep_beating(&ctx.heartbeat, backoff, &shutdown).await;
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            };
            ctx.metrics.leader.set(1);
            tracing::info!(slot = ctx.config.cdc.slot, "CDC leadership acquired");
            let outcome = tokio::select! {
                r = lead(ctx, &leader, &shutdown, &self.status) => r,
                _ = leader.lost() => Err(CdcError::LeadershipLost),
            };
            ctx.metrics.leader.set(0);
            ctx.tracker.reset();
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if e.needs_operator() => {
                    ctx.metrics
                        .slot_lost
                        .set(matches!(e, CdcError::Slot(SlotError::Lost(_))) as i64);
                    ctx.metrics.stopped.set(1);
                    self.status.set(Some(e.to_string()));
                    tracing::error!(error = %e, "CDC stopped: operator action needed");
                    drop(leader);
                    watch_while_stopped(ctx, &shutdown, Duration::from_secs(60)).await;
                }
                Err(e) => {
                    ctx.metrics.reconnects.inc();
                    tracing::warn!(error = %e, backoff_secs = backoff.as_secs(), "CDC stream failed; reconnecting");
                    drop(leader);
                    liveness::sleep_beating(&ctx.heartbeat, backoff, &shutdown).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
}

/// Sleeps `d` while stopped, polling the slot's lag meanwhile: the WAL a stopped stream makes
/// Postgres keep must show in `membersync_cdc_slot_lag_bytes`, not a stale value.
async fn watch_while_stopped(ctx: &StreamContext, shutdown: &CancellationToken, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    let every = Duration::from_secs(ctx.config.cdc.slot_poll_interval_secs.max(1));
    let mut client = None;
    while tokio::time::Instant::now() < until && !shutdown.is_cancelled() {
        ctx.heartbeat.beat();
        if client.is_none() {
            client = db::connect(&ctx.config.database, Login::Daemon).await.ok();
        }
        if let Some(c) = &client {
            match slot::health(c, &ctx.config.cdc.slot).await {
                Ok(Some(h)) => ctx.metrics.observe_slot(&h),
                Ok(None) => {}
                Err(_) => client = None,
            }
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        liveness::sleep_beating(&ctx.heartbeat, every.min(left), shutdown).await;
    }
}

/// One term of leadership: make sure the slot exists (snapshotting a new one), then stream.
async fn lead(
    ctx: &StreamContext,
    leader: &Leader,
    shutdown: &CancellationToken,
    status: &CdcStatus,
) -> Result<(), CdcError> {
    let slot = &ctx.config.cdc.slot;
    identity::apply(leader.client(), &ctx.config.cdc).await;
    let state = slot::inspect(leader.client(), &ctx.config).await?;
    ctx.metrics.slot_lost.set(0);
    let mut replication = replication_client(ctx).await?;
    if state == SlotState::SnapshotInterrupted {
        slot::drop_interrupted(leader.client(), slot).await?;
    }
    if state != SlotState::Ready {
        create_slot_and_snapshot(ctx, leader, &mut replication).await?;
    }
    replication.start().await?;
    replication.wait_started().await?;
    tracing::info!(slot, "streaming changes");
    ctx.metrics.stopped.set(0);
    status.set(None);
    stream::run(ctx, &mut replication, leader, shutdown).await
}

/// A gated replication session: commands can run on it before START_REPLICATION.
async fn replication_client(
    ctx: &StreamContext,
) -> Result<pgwire_replication::ReplicationClient, CdcError> {
    let db = &ctx.config.database;
    let password = db
        .password
        .as_ref()
        .map(|p| p.expose_secret().to_owned())
        .unwrap_or_default();
    let cfg = pgwire_replication::ReplicationConfig::new(
        db.host.clone(),
        db.user.clone(),
        password,
        db.dbname.clone(),
        ctx.config.cdc.slot.clone(),
        ctx.config.cdc.publication.clone(),
    )
    .with_port(db.port)
    .with_tls(crate::db::tls::replication(db))
    .with_application_name(format!("{}-cdc", db.application_name))
    // Pin the text formats the value conversion relies on.
    .with_options(
        "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3",
    )
    .with_status_interval(Duration::from_millis(ctx.config.cdc.status_interval_ms))
    .with_wakeup_interval(Duration::from_secs(1));
    Ok(pgwire_replication::ReplicationClient::connect_gated(cfg).await?)
}

async fn create_slot_and_snapshot(
    ctx: &StreamContext,
    leader: &Leader,
    replication: &mut pgwire_replication::ReplicationClient,
) -> Result<(), CdcError> {
    let slot = &ctx.config.cdc.slot;
    let snapshot = ctx.config.cdc.snapshot == SnapshotMode::Initial;
    // Written before the slot exists: a crash from here on is detected as an interrupted
    // snapshot (V6), never mistaken for a complete one.
    slot::snapshot_started(leader.client(), slot).await?;
    let mode = if snapshot { "export" } else { "nothing" };
    // Postgres creates the slot once every transaction older than it has ended, which may take
    // long on a busy server: a wait on the other side, not a wedge.
    let rows = liveness::beating_while(
        &ctx.heartbeat,
        replication.simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT '{mode}')"
        )),
    )
    .await?;
    let row = rows
        .first()
        .ok_or_else(|| CdcError::CreateSlot("no answer to CREATE_REPLICATION_SLOT".into()))?;
    let text = |i: usize| -> Option<String> {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent_point =
        text(1).ok_or_else(|| CdcError::CreateSlot("no consistent point".into()))?;
    let lsn = pgwire_replication::Lsn::parse(&consistent_point).map_err(|e| {
        CdcError::CreateSlot(format!("bad consistent point {consistent_point}: {e:?}"))
    })?;
    tracing::info!(slot, consistent_point, "replication slot created");
    let mut rows_done = 0;
    if snapshot {
        let snapshot_name =
            text(2).ok_or_else(|| CdcError::CreateSlot("no exported snapshot".into()))?;
        let mut client = db::connect(&ctx.config.database, Login::Daemon)
            .await
            .map_err(SlotError::from)?;
        rows_done = snapshot::run(&mut client, ctx, &snapshot_name, lsn.as_u64()).await?;
    }
    slot::snapshot_completed(leader.client(), slot, &consistent_point, rows_done as i64).await?;
    Ok(())
}
