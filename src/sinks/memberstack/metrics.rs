//! The Memberstack client's metric families.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

#[derive(Clone)]
pub(crate) struct MemberstackMetrics {
    /// By templated route (`PATCH /members/:id`, never an id) and status (or `timeout`,
    /// `transport`).
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub rate_limited: IntCounter,
    pub retries: IntCounter,
    pub limiter_wait: Histogram,
}

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl MemberstackMetrics {
    pub fn new(registry: Option<&Registry>) -> Self {
        let m = Self::unregistered();
        super::super::registry::register_all(
            registry,
            "memberstack",
            vec![
                Box::new(m.requests.clone()),
                Box::new(m.duration.clone()),
                Box::new(m.rate_limited.clone()),
                Box::new(m.retries.clone()),
                Box::new(m.limiter_wait.clone()),
            ],
        );
        m
    }

    // The options are constants, so construction cannot fail at runtime; a mistake here
    // fails every test at once.
    #[allow(clippy::expect_used)]
    fn unregistered() -> Self {
        Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "membersync_memberstack_requests_total",
                    "Memberstack Admin API requests by route and HTTP status (each attempt).",
                ),
                &["method_route", "status"],
            )
            .expect("valid metric"),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "membersync_memberstack_request_duration_seconds",
                    "Memberstack Admin API request latency per attempt.",
                )
                .buckets(BUCKETS.to_vec()),
                &["method_route"],
            )
            .expect("valid metric"),
            rate_limited: IntCounter::new(
                "membersync_memberstack_rate_limited_total",
                "429 answers received from Memberstack.",
            )
            .expect("valid metric"),
            retries: IntCounter::new(
                "membersync_memberstack_retries_total",
                "Memberstack requests retried after a retryable failure.",
            )
            .expect("valid metric"),
            limiter_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "membersync_memberstack_rate_limiter_wait_seconds",
                    "Time spent waiting for the client's own rate limiter before a request.",
                )
                .buckets(vec![
                    0.0, 0.001, 0.01, 0.04, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .expect("valid metric"),
        }
    }
}
