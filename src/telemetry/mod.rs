//! Logs (tracing, JSON or human), optional Sentry, and the Prometheus registry.

pub mod liveness;
mod logging;
mod metrics;

pub use logging::{TelemetryGuard, init};
pub use metrics::{BUILD_COMMIT, BUILD_VERSION, Metrics};
