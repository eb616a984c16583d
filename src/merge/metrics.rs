use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

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
    pub refused_records: IntCounterVec,
    pub outbox: OutboxMetrics,
}

/// The outbox and its appliers (docs/merge.md "The outbox"; alerts: pending age, time since
/// the last successful push).
#[derive(Clone)]
pub struct OutboxMetrics {
    pub pending: IntGaugeVec,
    pub oldest_seconds: GaugeVec,
    pub outcomes_pending: IntGauge,
    pub applied: IntCounterVec,
    pub late: IntCounterVec,
    pub last_success: GaugeVec,
    pub apply_seconds: HistogramVec,
    pub change_to_announced: Histogram,
    /// `membersync_merge_sync_conflicts_total{target,reason}`: intents a target refused
    /// because of another record (counted once per conflict, not per retry).
    pub sync_conflicts: IntCounterVec,
    /// `membersync_merge_orphans_total`: members Memberstack answered 404 for (once each).
    pub orphans: prometheus::IntCounter,
}

/// Conflict reasons (`membersync_merge_sync_conflicts_total{reason}`).
pub const CONFLICT_REASONS: [&str; 4] = [
    "unconfirmed",
    "linked_to_another_member",
    "email_in_use",
    "email_unverified",
];

/// Targets and results, pre-created at 0 so that `increase()` and alerts see them from the start.
const TARGETS: [&str; 2] = ["memberstack", "auth"];
const RESULTS: [&str; 3] = ["applied", "retry", "dead_lettered"];
/// Error kinds a dead letter can have (`membersync_merge_dead_letters_total{kind}`).
pub const DEAD_LETTER_KINDS: [&str; 5] = [
    "decode",
    "database",
    "memberstack",
    "missing_in_memberstack",
    "supabase_auth",
];

impl OutboxMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            pending: IntGaugeVec::new(
                Opts::new(
                    "membersync_merge_intents_pending",
                    "Members with a pending push, by target (memberstack/auth).",
                ),
                &["target"],
            )?,
            oldest_seconds: GaugeVec::new(
                Opts::new(
                    "membersync_merge_intent_oldest_age_seconds",
                    "Age of the oldest pending intent, by target (since it was queued or started failing).",
                ),
                &["target"],
            )?,
            outcomes_pending: IntGauge::new(
                "membersync_merge_outcomes_pending",
                "Outcome records committed and not yet produced to the sync topic.",
            )?,
            applied: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_intent_attempts_total",
                    "Attempts to apply an intent, by target and result (applied/retry/dead_lettered).",
                ),
                &["target", "result"],
            )?,
            late: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_late_total",
                    "Failure episodes that reached merge.max_attempts and were reported late (retries go on), by target.",
                ),
                &["target"],
            )?,
            last_success: GaugeVec::new(
                Opts::new(
                    "membersync_merge_last_success_timestamp_seconds",
                    "Unix time of the last successful apply, by target (0: none since start).",
                ),
                &["target"],
            )?,
            apply_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "membersync_merge_intent_apply_seconds",
                    "Time of one apply call (the HTTP round trips), by target.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["target"],
            )?,
            change_to_announced: Histogram::with_opts(
                HistogramOpts::new(
                    "membersync_merge_change_to_announced_seconds",
                    "From the change on its side to its applied outcome acknowledged by Kafka.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            sync_conflicts: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_sync_conflicts_total",
                    "Intents a target refused because of another record (an email another auth user has, an unconfirmed or already linked auth user, an unverified email), by target and reason; each retried after merge.conflict_retry_secs.",
                ),
                &["target", "reason"],
            )?,
            orphans: prometheus::IntCounter::new(
                "membersync_merge_orphans_total",
                "Members with a Supabase row that Memberstack answered 404 for (reported once; nothing is pushed for them until Memberstack shows them).",
            )?,
        };
        for r in CONFLICT_REASONS {
            m.sync_conflicts.with_label_values(&["auth", r]);
        }
        // `merge`: a change whose transaction keeps failing (the database is away).
        m.late.with_label_values(&["merge"]);
        for t in TARGETS {
            m.pending.with_label_values(&[t]).set(0);
            m.oldest_seconds.with_label_values(&[t]).set(0.0);
            m.late.with_label_values(&[t]);
            m.last_success.with_label_values(&[t]);
            for r in RESULTS {
                m.applied.with_label_values(&[t, r]);
            }
        }
        registry.register(Box::new(m.pending.clone()))?;
        registry.register(Box::new(m.oldest_seconds.clone()))?;
        registry.register(Box::new(m.outcomes_pending.clone()))?;
        registry.register(Box::new(m.applied.clone()))?;
        registry.register(Box::new(m.late.clone()))?;
        registry.register(Box::new(m.last_success.clone()))?;
        registry.register(Box::new(m.apply_seconds.clone()))?;
        registry.register(Box::new(m.change_to_announced.clone()))?;
        registry.register(Box::new(m.sync_conflicts.clone()))?;
        registry.register(Box::new(m.orphans.clone()))?;
        Ok(m)
    }
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
            refused_records: IntCounterVec::new(
                Opts::new(
                    "membersync_merge_refused_records_total",
                    "Records Kafka refused for good (too large), by topic and what was done: shrunk (sent without their largest values) or dropped.",
                ),
                &["topic", "action"],
            )?,
            outbox: OutboxMetrics::register(registry)?,
        };
        for kind in DEAD_LETTER_KINDS {
            m.dead_letters.with_label_values(&[kind]);
            if kind != "decode" {
                m.failed_attempts.with_label_values(&[kind]);
            }
        }
        registry.register(Box::new(m.changes.clone()))?;
        registry.register(Box::new(m.fields.clone()))?;
        registry.register(Box::new(m.conflicts.clone()))?;
        registry.register(Box::new(m.failed_attempts.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.apply_seconds.clone()))?;
        registry.register(Box::new(m.change_to_applied.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.refused_records.clone()))?;
        Ok(m)
    }
}
