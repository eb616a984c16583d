use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::slot::SlotHealth;

/// The values of `pg_replication_slots.wal_status`, each a series of `membersync_cdc_slot_wal_status`.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// CDC's metric families (names are part of the alerting contract: deploy/ and docs/).
#[derive(Clone)]
pub struct CdcMetrics {
    pub events: IntCounterVec,
    pub transactions: IntCounter,
    pub confirmed_lsn: IntGauge,
    pub slot_lag_bytes: IntGauge,
    pub slot_retained_bytes: IntGauge,
    pub slot_safe_wal_size_bytes: Gauge,
    pub slot_wal_status: IntGaugeVec,
    pub commit_to_ack: Histogram,
    pub leader: IntGauge,
    pub slot_lost: IntGauge,
    pub reconnects: IntCounter,
    pub backpressure_waits: IntCounter,
    pub oversized: IntCounterVec,
    pub stopped: IntGauge,
    pub incremental_rows: IntCounterVec,
    pub incremental_skipped: IntCounterVec,
    pub incremental_chunks: IntCounterVec,
    pub incremental_retries: IntCounterVec,
    pub incremental_active: IntGauge,
    pub incremental_tables_remaining: IntGauge,
}

impl CdcMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            events: IntCounterVec::new(
                Opts::new("membersync_cdc_events_total", "Change events produced, by table and op (c/u/d/r/t)."),
                &["table", "op"],
            )?,
            transactions: IntCounter::new(
                "membersync_cdc_transactions_total",
                "Transactions confirmed to Postgres after Kafka acknowledged all their events.",
            )?,
            confirmed_lsn: IntGauge::new(
                "membersync_cdc_confirmed_lsn",
                "The LSN acknowledged to Postgres (every change up to it is in Kafka).",
            )?,
            slot_lag_bytes: IntGauge::new(
                "membersync_cdc_slot_lag_bytes",
                "WAL the slot retains: pg_current_wal_lsn() minus confirmed_flush_lsn (polled).",
            )?,
            slot_retained_bytes: IntGauge::new(
                "membersync_cdc_slot_retained_bytes",
                "WAL Postgres keeps for the slot: pg_current_wal_lsn() minus restart_lsn (polled).",
            )?,
            slot_safe_wal_size_bytes: Gauge::new(
                "membersync_cdc_slot_safe_wal_size_bytes",
                "WAL that can still be written before the slot is in danger of being lost (safe_wal_size, polled); NaN when unlimited (max_slot_wal_keep_size = -1).",
            )?,
            slot_wal_status: IntGaugeVec::new(
                Opts::new(
                    "membersync_cdc_slot_wal_status",
                    "1 for the slot's current wal_status (reserved, extended, unreserved, lost), 0 for the others (polled).",
                ),
                &["status"],
            )?,
            commit_to_ack: Histogram::with_opts(
                HistogramOpts::new(
                    "membersync_cdc_commit_to_ack_seconds",
                    "From the Postgres commit to Kafka's acknowledgement of the transaction's last event.",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )?,
            leader: IntGauge::new("membersync_cdc_leader", "1 while this process holds the slot's leadership.")?,
            slot_lost: IntGauge::new(
                "membersync_cdc_slot_lost",
                "1 when the slot's WAL was removed (wal_status = lost): changes were lost; CDC stopped.",
            )?,
            reconnects: IntCounter::new(
                "membersync_cdc_reconnects_total",
                "Times the stream was restarted after a Postgres or Kafka error.",
            )?,
            backpressure_waits: IntCounter::new(
                "membersync_cdc_backpressure_waits_total",
                "Events that waited for room in the full producer queue.",
            )?,
            oversized: IntCounterVec::new(
                Opts::new(
                    "membersync_cdc_oversized_records_total",
                    "Change events too large for Kafka, replaced by a reference record and a dead letter, by table.",
                ),
                &["table"],
            )?,
            stopped: IntGauge::new(
                "membersync_cdc_stopped",
                "1 while CDC is stopped on an error an operator must fix (the slot does not advance).",
            )?,
            incremental_rows: IntCounterVec::new(
                Opts::new(
                    "membersync_cdc_incremental_snapshot_rows_total",
                    "Rows an incremental snapshot produced (op r), by table.",
                ),
                &["table"],
            )?,
            incremental_skipped: IntCounterVec::new(
                Opts::new(
                    "membersync_cdc_incremental_snapshot_skipped_rows_total",
                    "Chunk rows left out because the stream changed them inside the chunk's watermark window.",
                ),
                &["table"],
            )?,
            incremental_chunks: IntCounterVec::new(
                Opts::new(
                    "membersync_cdc_incremental_snapshot_chunks_total",
                    "Incremental snapshot chunks produced, by table.",
                ),
                &["table"],
            )?,
            incremental_retries: IntCounterVec::new(
                Opts::new(
                    "membersync_cdc_incremental_snapshot_chunk_retries_total",
                    "Chunks read again because a transaction that committed before the low watermark was not yet visible to the chunk's select.",
                ),
                &["table"],
            )?,
            incremental_active: IntGauge::new(
                "membersync_cdc_incremental_snapshot_active",
                "1 while this leader runs an incremental snapshot.",
            )?,
            incremental_tables_remaining: IntGauge::new(
                "membersync_cdc_incremental_snapshot_tables_remaining",
                "Tables the running incremental snapshot has not finished (the current one included).",
            )?,
        };
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.transactions.clone()))?;
        registry.register(Box::new(m.confirmed_lsn.clone()))?;
        registry.register(Box::new(m.slot_lag_bytes.clone()))?;
        registry.register(Box::new(m.slot_retained_bytes.clone()))?;
        registry.register(Box::new(m.slot_safe_wal_size_bytes.clone()))?;
        registry.register(Box::new(m.slot_wal_status.clone()))?;
        registry.register(Box::new(m.commit_to_ack.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.slot_lost.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
        registry.register(Box::new(m.backpressure_waits.clone()))?;
        registry.register(Box::new(m.oversized.clone()))?;
        registry.register(Box::new(m.stopped.clone()))?;
        registry.register(Box::new(m.incremental_rows.clone()))?;
        registry.register(Box::new(m.incremental_skipped.clone()))?;
        registry.register(Box::new(m.incremental_chunks.clone()))?;
        registry.register(Box::new(m.incremental_retries.clone()))?;
        registry.register(Box::new(m.incremental_active.clone()))?;
        registry.register(Box::new(m.incremental_tables_remaining.clone()))?;
        Ok(m)
    }
}

impl CdcMetrics {
    /// Records one poll of the slot: lag, retention, safe_wal_size and wal_status.
    pub fn observe_slot(&self, h: &SlotHealth) {
        self.slot_lag_bytes.set(h.lag_bytes);
        if let Some(retained) = h.retained_bytes {
            self.slot_retained_bytes.set(retained);
        }
        // NULL: no limit (max_slot_wal_keep_size = -1), or the slot is lost.
        self.slot_safe_wal_size_bytes
            .set(h.safe_wal_size.map_or(f64::NAN, |b| b as f64));
        for status in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[status])
                .set((h.wal_status == status) as i64);
        }
    }
}
