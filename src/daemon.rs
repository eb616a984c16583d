//! `membersync run`: the process frame every role runs in — the ops server, the roles as
//! supervised tasks, and a graceful shutdown bounded by `shutdown.drain_timeout_secs`.

mod dlq_backlog;
mod health;
mod liveness;
mod supervisor;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::health::{Health, StartupProbe, TopicsProbe, probes};
use self::supervisor::Supervisor;
use crate::config::Config;
use crate::http::ops::{self, OpsServer};
use crate::kafka::admin::KafkaAdmin;
use crate::telemetry::Metrics;
use crate::telemetry::liveness::{self as beats, Heartbeat};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("role {role} failed: {message}")]
    Role { role: &'static str, message: String },
    #[error("{0}")]
    Setup(String),
}

/// A role the process can run; `membersync run` runs all of them, `membersync <role>` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Cdc,
    Ingest,
    Merge,
    /// Outcomes → Make.com webhooks; only with `[bridge.routes]` configured.
    Bridge,
}

impl Role {
    pub const ALL: &'static [Role] = &[Role::Cdc, Role::Ingest, Role::Merge, Role::Bridge];

    /// The roles `membersync run` starts: all of them, except the bridge when no Make.com
    /// route is configured (it would have nothing to do, and would refuse to start).
    pub fn for_run(config: &Config) -> Vec<Role> {
        Self::ALL
            .iter()
            .copied()
            .filter(|r| *r != Role::Bridge || config.bridge.enabled())
            .collect()
    }

    fn needs_postgres(self) -> bool {
        match self {
            Role::Cdc | Role::Merge => true,
            Role::Ingest | Role::Bridge => false,
        }
    }
}

/// Runs `roles` until SIGTERM/SIGINT.
pub async fn run(config: Config, roles: &[Role]) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    crate::shutdown::install(shutdown.clone()).map_err(DaemonError::Signals)?;
    let metrics = Metrics::new();
    beats::set_timeout(Duration::from_secs(config.telemetry.liveness_timeout_secs));
    let health = Health::default();
    health.install_panic_hook(shutdown.clone());
    let started = Arc::new(AtomicBool::new(false));
    let (topics_ready, topics_rx) = watch::channel(!config.kafka.create_topics);
    let mut probes = probes(&config, roles)?;
    probes.insert(
        0,
        Box::new(StartupProbe {
            started: Arc::clone(&started),
        }),
    );
    probes.push(Box::new(TopicsProbe {
        ready: topics_rx.clone(),
    }));
    probes.push(Box::new(health.clone()));
    let addr = config.telemetry.metrics_addr;
    let server = OpsServer::bind(addr, ops::router(metrics.clone(), probes))
        .await
        .map_err(|source| DaemonError::Bind { addr, source })?;
    tracing::info!(addr = %server.local_addr().unwrap_or(addr), "ops server listening (/metrics, /healthz, /readyz)");

    // Liveness and metrics answer from here on, while the roles start.
    let mut supervisor = Supervisor::new(shutdown.clone(), health.clone());
    let token = shutdown.clone();
    supervisor.spawn("ops", async move {
        server.serve(token).await.map_err(|e| e.to_string())
    });

    if config.kafka.create_topics {
        // Kafka away at start is an outage to wait out, not a reason to exit: ingest starts
        // at once (and answers 503 + Retry-After until Kafka is back); the roles that read or
        // write the topics start once they exist.
        let admin =
            KafkaAdmin::new(&config.kafka).map_err(|e| DaemonError::Setup(e.to_string()))?;
        let topics = crate::kafka::topics::Topics::new(&config.kafka.topic_prefix).all(&config);
        match admin.ensure_topics(&topics).await {
            Ok(created) => {
                if !created.is_empty() {
                    tracing::info!(?created, "created missing topics");
                }
                let _ = topics_ready.send(true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot ensure the Kafka topics at start; starting anyway and retrying");
                let token = shutdown.clone();
                let max_backoff = Duration::from_secs(config.cdc.reconnect_max_backoff_secs.max(1));
                tokio::spawn(async move {
                    ensure_topics(&admin, &topics, &token, max_backoff).await;
                    let _ = topics_ready.send(true);
                });
            }
        }
    }

    if roles.contains(&Role::Cdc) {
        let cdc = crate::cdc::Cdc::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        *health.cdc.lock().expect("health") = Some(cdc.status());
        let token = shutdown.clone();
        let ready = topics_rx.clone();
        let beat = beats::heartbeat("cdc");
        let task = async move {
            if !topics_created(ready, &token, &beat).await {
                return Ok(());
            }
            cdc.run(token).await.map_err(|e| e.to_string())
        };
        supervisor.spawn("cdc", watched("cdc", shutdown.clone(), task));
    }

    if roles.contains(&Role::Ingest) {
        let ingest = crate::ingest::IngestServer::bind(&config, &metrics)
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let addr = ingest.local_addr().unwrap_or(config.ingest.listen_addr);
        tracing::info!(%addr, "webhook ingest listening");
        tokio::spawn(liveness::ingest_self_check(
            addr,
            beats::heartbeat("ingest"),
            shutdown.clone(),
        ));
        let token = shutdown.clone();
        let task = async move { ingest.serve(token).await.map_err(|e| e.to_string()) };
        supervisor.spawn("ingest", watched("ingest", shutdown.clone(), task));
    }

    if roles.contains(&Role::Merge) {
        let merge = crate::merge::Merge::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let token = shutdown.clone();
        let ready = topics_rx.clone();
        let beat = beats::heartbeat("merge");
        let backlog = dlq_backlog::DlqBacklog::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let task = async move {
            if !topics_created(ready, &token, &beat).await {
                return Ok(());
            }
            tokio::spawn(backlog.run(token.clone()));
            merge.run(token).await.map_err(|e| e.to_string())
        };
        supervisor.spawn("merge", watched("merge", shutdown.clone(), task));
    }

    if roles.contains(&Role::Bridge) {
        let bridge = crate::bridge::Bridge::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let token = shutdown.clone();
        let ready = topics_rx.clone();
        let beat = beats::heartbeat("bridge");
        let task = async move {
            if !topics_created(ready, &token, &beat).await {
                return Ok(());
            }
            bridge.run(token).await.map_err(|e| e.to_string())
        };
        supervisor.spawn("bridge", watched("bridge", shutdown.clone(), task));
    }

    #[cfg(debug_assertions)]
    spawn_test_panic();

    started.store(true, Ordering::Release);
    tracing::info!(
        version = crate::telemetry::BUILD_VERSION,
        "membersync running"
    );
    supervisor.run(config.shutdown.drain_timeout()).await
}

/// Debug builds only (the integration tests run them): `MEMBERSYNC_TEST_PANIC_AFTER_MS`
/// makes a detached task panic after that long, the way a worker a role spawned would — its
/// `JoinHandle` kept by nobody — to test that any panic fails the process.
#[cfg(debug_assertions)]
fn spawn_test_panic() {
    let Some(ms) = std::env::var("MEMBERSYNC_TEST_PANIC_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        panic!("MEMBERSYNC_TEST_PANIC_AFTER_MS: a worker task panics");
    });
}

/// Creates the missing topics, retrying with capped backoff until Kafka answers (or shutdown).
async fn ensure_topics(
    admin: &KafkaAdmin,
    topics: &[String],
    shutdown: &CancellationToken,
    max_backoff: Duration,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match admin.ensure_topics(topics).await {
            Ok(created) => {
                if !created.is_empty() {
                    tracing::info!(?created, "created missing topics");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_secs = backoff.as_secs(), "cannot ensure the Kafka topics; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Waits until the topics exist (beating: waiting for Kafka is not a wedge); `false` if
/// shutdown came first.
async fn topics_created(
    mut ready: watch::Receiver<bool>,
    shutdown: &CancellationToken,
    beat: &Heartbeat,
) -> bool {
    let wait = async {
        tokio::select! {
            r = ready.wait_for(|created| *created) => r.is_ok(),
            _ = shutdown.cancelled() => false,
        }
    };
    beats::beating_while(beat, wait).await
}

/// A role's task whose end outside a shutdown fails liveness (`/healthz`).
fn watched<F: std::future::Future>(
    role: &'static str,
    shutdown: CancellationToken,
    task: F,
) -> impl std::future::Future<Output = F::Output> {
    liveness::watched(beats::heartbeat(role), shutdown, task)
}
