use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The bridge's metric families (names are part of the alerting contract: docs/bridge.md).
#[derive(Clone)]
pub struct BridgeMetrics {
    /// One per outcome and URL, by route and final status (`200`, `503`, `410`, `timeout`,
    /// `transport`, `retry_after_too_long`).
    pub deliveries: IntCounterVec,
    /// Failed attempts that were retried, by route and reason (`429`, `503`, `timeout`, …).
    pub retries: IntCounterVec,
    /// Dead letters written to `<prefix>.bridge.dlq`, by route (`none` for undecodable
    /// records) and error kind.
    pub dead_letters: IntCounterVec,
    /// Records read, by what became of them: `routed`, `unrouted`, `undecodable`.
    pub outcomes: IntCounterVec,
    /// From the first attempt to the final answer (retries and their waits included).
    pub delivery_seconds: HistogramVec,
    pub in_flight: IntGauge,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl BridgeMetrics {
    /// The dead-letter counters of every configured route exist from the start, at 0, so that
    /// the first dead letter is an increase alerts can see.
    pub fn register(registry: &Registry, routes: &[&str]) -> prometheus::Result<Self> {
        let m = Self {
            deliveries: IntCounterVec::new(
                Opts::new(
                    "membersync_bridge_deliveries_total",
                    "Outcome deliveries to Make.com, by route and final status (HTTP status, timeout, transport, retry_after_too_long).",
                ),
                &["route", "status"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "membersync_bridge_retries_total",
                    "Failed delivery attempts that were retried, by route and reason.",
                ),
                &["route", "reason"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "membersync_bridge_dead_letters_total",
                    "Records written to the bridge's dead-letter topic, by route and error kind.",
                ),
                &["route", "kind"],
            )?,
            outcomes: IntCounterVec::new(
                Opts::new(
                    "membersync_bridge_outcomes_total",
                    "Outcome records read by the bridge, by result (routed, unrouted, undecodable).",
                ),
                &["result"],
            )?,
            delivery_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "membersync_bridge_delivery_seconds",
                    "From the first attempt of a delivery to its final answer, by route.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )?,
            in_flight: IntGauge::new(
                "membersync_bridge_in_flight",
                "Outcome records read from Kafka and not yet finished.",
            )?,
        };
        for route in routes {
            for kind in [
                "http_status",
                "timeout",
                "transport",
                "retry_after_too_long",
            ] {
                m.dead_letters.with_label_values(&[route, kind]);
            }
        }
        m.dead_letters.with_label_values(&["none", "decode"]);
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.outcomes.clone()))?;
        registry.register(Box::new(m.delivery_seconds.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        Ok(m)
    }
}
