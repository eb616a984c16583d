use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Merge's metric families (names are part of the alerting contract: docs/merge.md).
#[derive(Clone)]
pub struct MergeMetrics {
    pub changes: IntCounterVec,
    pub fields: IntCounterVec,
    pub conflicts: IntCounterVec,
    pub failed_attempts: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub apply_seconds: HistogramVec,
    pub change_to_applied: Histogram,
    pub in_flight: IntGauge,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl MergeMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            changes: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_changes_total",
                    "Changes merged, by source (memberstack/stripe/supabase) and status (applied/unchanged/duplicate/skipped/failed).",
                ),
                &["source", "status"],
            )?,
            fields: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_field_resolutions_total",
                    "Field resolutions by field and verdict (applied/unchanged/echo/stale/reverted).",
                ),
                &["field", "verdict"],
            )?,
            conflicts: IntCounterVec::new(
                Opts::new("membersync_merge_conflicts_total", "Conflicts resolved, by field and winning side."),
                &["field", "winner"],
            )?,
            failed_attempts: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_failed_attempts_total",
                    "Attempts that failed (and were retried or dead-lettered), by error kind.",
                ),
                &["kind"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new("membersync_merge_dead_letters_total", "Changes written to the dead-letter topic, by error kind."),
                &["kind"],
            )?,
            apply_seconds: HistogramVec::new(
                HistogramOpts::new("membersync_merge_apply_seconds", "Time to apply one change (one attempt), by source.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["source"],
            )?,
            change_to_applied: Histogram::with_opts(
                HistogramOpts::new(
                    "membersync_merge_change_to_applied_seconds",
                    "From the change on its side (webhook timestamp, commit time) to merge's commit.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            in_flight: IntGauge::new("membersync_merge_in_flight", "Records read from Kafka and not yet finished.")?,
        };
        registry.register(Box::new(m.changes.clone()))?;
        registry.register(Box::new(m.fields.clone()))?;
        registry.register(Box::new(m.conflicts.clone()))?;
        registry.register(Box::new(m.failed_attempts.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.apply_seconds.clone()))?;
        registry.register(Box::new(m.change_to_applied.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        Ok(m)
    }
}
