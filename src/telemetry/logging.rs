use secrecy::ExposeSecret;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

/// Keeps Sentry alive; dropping it flushes queued events (within Sentry's shutdown timeout).
#[must_use = "dropping the guard shuts Sentry down"]
pub struct TelemetryGuard {
    _sentry: Option<sentry::ClientInitGuard>,
}

/// Installs the global subscriber: `RUST_LOG` wins over `telemetry.log_level`; output goes to
/// stderr so that stdout stays free for command output (`check`, `dlq list`).
pub fn init(cfg: &TelemetryConfig) -> TelemetryGuard {
    let sentry = cfg.sentry_dsn.as_ref().map(|dsn| {
        // The DSN was parsed during config validation, so `dsn()` cannot panic here.
        let mut options = sentry::ClientOptions::new()
            .dsn(dsn.expose_secret())
            .maybe_release(sentry::release_name!())
            .traces_sample_rate(cfg.sentry_traces_sample_rate);
        if let Some(env) = &cfg.sentry_environment {
            options = options.environment(env.clone());
        }
        sentry::init(options)
    });

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let sentry_layer = sentry.as_ref().map(|_| sentry_tracing::layer());
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(sentry_layer);
    // try_init: tests and repeated calls in one process must not panic.
    let _ = match cfg.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    TelemetryGuard { _sentry: sentry }
}
