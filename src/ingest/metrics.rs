use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Ingest's metric families.
#[derive(Clone)]
pub struct IngestMetrics {
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub kafka_ack_seconds: prometheus::Histogram,
    pub unknown_events: IntCounter,
    /// Requests refused or cut off for want of an in-flight slot, by `reason`.
    pub shed: IntCounterVec,
    /// Requests holding an in-flight slot (all routes).
    pub in_flight: IntGauge,
    /// Open connections, lingering ones included.
    pub connections: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl IngestMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "membersync_ingest_requests_total",
                "Webhook requests by source, HTTP status and reason.",
            ),
            &["source", "status", "reason"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "membersync_ingest_request_seconds",
                "Webhook request latency, arrival to answer.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["source"],
        )?;
        let kafka_ack_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "membersync_ingest_kafka_ack_seconds",
                "Time from producing a webhook event to Kafka's acknowledgement.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let unknown_events = IntCounter::new(
            "membersync_ingest_unknown_events_total",
            "Accepted Memberstack events whose name membersync does not know (handled as re-fetch).",
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "membersync_ingest_shed_total",
                "Requests (webhooks and API) answered 503 for want of an in-flight slot: \
                 `full` (every slot busy) or `silent_body` (a body read cut off to make room).",
            ),
            &["reason"],
        )?;
        let in_flight = IntGauge::new(
            "membersync_ingest_in_flight",
            "Requests holding one of ingest.concurrency_limit slots (webhooks and API).",
        )?;
        let connections = IntGauge::new(
            "membersync_ingest_connections",
            "Open connections of the ingest server (at most ingest.max_connections).",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(kafka_ack_seconds.clone()))?;
        registry.register(Box::new(unknown_events.clone()))?;
        Ok(Self {
            requests,
            request_seconds,
            kafka_ack_seconds,
            unknown_events,
            shed,
            in_flight,
            connections,
        })
    }
}
