//! `membersync run`: the process frame every role runs in — the ops server, the roles as
//! supervised tasks, and a graceful shutdown bounded by `shutdown.drain_timeout_secs`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, Login};
use crate::http::ops::{self, OpsServer, Probe};
use crate::kafka::admin::KafkaAdmin;
use crate::telemetry::Metrics;

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

/// A role's task: runs until its token is cancelled, then drains and returns.
type RoleResult = Result<(), String>;

/// Named tasks that share one shutdown token. The first task to fail (return an error or
/// panic) cancels the rest, fails readiness and makes the process exit non-zero.
struct Supervisor {
    tasks: JoinSet<(&'static str, RoleResult)>,
    /// A panicked task's `JoinError` carries only its id: this names its role.
    names: HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
    health: Health,
}

impl Supervisor {
    fn new(shutdown: CancellationToken, health: Health) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
            health,
        }
    }

    fn spawn<F>(&mut self, role: &'static str, task: F)
    where
        F: Future<Output = RoleResult> + Send + 'static,
    {
        let handle = self.tasks.spawn(task.map(move |r| (role, r)));
        self.names.insert(handle.id(), role);
    }

    /// Waits for shutdown (or the first failure), then for the drain, bounded by `drain`.
    async fn run(mut self, drain: Duration) -> Result<(), DaemonError> {
        let mut failure = None;
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            Some(joined) = self.tasks.join_next_with_id() => {
                failure = self.outcome(joined);
                if failure.is_none() {
                    tracing::warn!("a role stopped on its own; shutting down");
                }
                self.shutdown.cancel();
            }
        }
        let drained = tokio::time::timeout(drain, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                if let Some(e) = self.outcome(joined) {
                    failure.get_or_insert(e);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::error!(
                timeout_secs = drain.as_secs(),
                "drain timed out; aborting the remaining tasks"
            );
            self.tasks.abort_all();
        }
        // A panic anywhere in the process (a worker task a role spawned and only logs, too)
        // fails it, even when every role then drained cleanly.
        if let Some(message) = self.health.panicked() {
            failure.get_or_insert(DaemonError::Role {
                role: "panic",
                message,
            });
        }
        failure.map_or(Ok(()), Err)
    }

    fn outcome(
        &self,
        joined: Result<(tokio::task::Id, (&'static str, RoleResult)), tokio::task::JoinError>,
    ) -> Option<DaemonError> {
        let failure = match joined {
            Ok((_, (role, Ok(())))) => {
                tracing::info!(role, "role stopped");
                return None;
            }
            Ok((_, (role, Err(message)))) => {
                tracing::error!(role, error = %message, "role failed");
                DaemonError::Role { role, message }
            }
            Err(e) => {
                let role = self.names.get(&e.id()).copied().unwrap_or("task");
                let message = if e.is_panic() {
                    "panicked".to_owned()
                } else {
                    e.to_string()
                };
                tracing::error!(role, error = %message, "role task ended abnormally");
                DaemonError::Role { role, message }
            }
        };
        self.health.fail(failure.to_string());
        Some(failure)
    }
}

/// What readiness knows beyond the dependencies: a failed role, a panic anywhere in the
/// process, a stopped CDC stream.
#[derive(Clone, Default)]
struct Health {
    failed: Arc<Mutex<Option<String>>>,
    panicked: Arc<Mutex<Option<String>>>,
    cdc: Arc<Mutex<Option<crate::cdc::CdcStatus>>>,
}

impl Health {
    fn fail(&self, reason: String) {
        self.failed.lock().expect("health").get_or_insert(reason);
    }

    fn panicked(&self) -> Option<String> {
        self.panicked.lock().expect("health").clone()
    }

    /// Any panic in this process — a role's task or a worker task a role spawned (whose
    /// `JoinHandle` may only log it) — fails the process: readiness turns 503, the roles
    /// drain and it exits non-zero, so that a supervisor restarts it instead of leaving a
    /// role silently short of a worker. The previous hook (which prints the panic) still runs.
    fn install_panic_hook(&self, shutdown: CancellationToken) {
        let panicked = Arc::clone(&self.panicked);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let thread = std::thread::current();
            let message = format!(
                "a task panicked on thread {}: {info}",
                thread.name().unwrap_or("unnamed")
            );
            if let Ok(mut p) = panicked.lock() {
                p.get_or_insert(message);
            }
            shutdown.cancel();
        }));
    }
}

impl Probe for Health {
    fn name(&self) -> &'static str {
        "roles"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let failed = self.failed.lock().expect("health").clone();
        let panicked = self.panicked();
        let cdc = self
            .cdc
            .lock()
            .expect("health")
            .as_ref()
            .and_then(|c| c.stopped());
        async move {
            if let Some(p) = panicked {
                return Err(p);
            }
            if let Some(f) = failed {
                return Err(f);
            }
            if let Some(reason) = cdc {
                return Err(format!("CDC stopped, operator action needed: {reason}"));
            }
            Ok(())
        }
        .boxed()
    }
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
        supervisor.spawn("cdc", async move {
            if !topics_created(ready, &token).await {
                return Ok(());
            }
            cdc.run(token).await.map_err(|e| e.to_string())
        });
    }

    if roles.contains(&Role::Ingest) {
        let ingest = crate::ingest::IngestServer::bind(&config, &metrics)
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let addr = ingest.local_addr().unwrap_or(config.ingest.listen_addr);
        tracing::info!(%addr, "webhook ingest listening");
        let token = shutdown.clone();
        supervisor.spawn("ingest", async move {
            ingest.serve(token).await.map_err(|e| e.to_string())
        });
    }

    if roles.contains(&Role::Merge) {
        let merge = crate::merge::Merge::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let token = shutdown.clone();
        let ready = topics_rx.clone();
        supervisor.spawn("merge", async move {
            if !topics_created(ready, &token).await {
                return Ok(());
            }
            merge.run(token).await.map_err(|e| e.to_string())
        });
    }

    if roles.contains(&Role::Bridge) {
        let bridge = crate::bridge::Bridge::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let token = shutdown.clone();
        let ready = topics_rx.clone();
        supervisor.spawn("bridge", async move {
            if !topics_created(ready, &token).await {
                return Ok(());
            }
            bridge.run(token).await.map_err(|e| e.to_string())
        });
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

/// Waits until the topics exist; `false` if shutdown came first.
async fn topics_created(mut ready: watch::Receiver<bool>, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        r = ready.wait_for(|created| *created) => r.is_ok(),
        _ = shutdown.cancelled() => false,
    }
}

/// Readiness covers what the selected roles depend on; Kafka is needed by every role, and
/// the full daemon (`run`) also streams from Postgres.
fn probes(config: &Config, roles: &[Role]) -> Result<Vec<Box<dyn Probe>>, DaemonError> {
    let admin = KafkaAdmin::new(&config.kafka).map_err(|e| DaemonError::Setup(e.to_string()))?;
    let mut probes: Vec<Box<dyn Probe>> = vec![Box::new(KafkaProbe { admin })];
    if roles == Role::ALL || roles.iter().any(|r| r.needs_postgres()) {
        let config = config.database.clone();
        probes.insert(0, Box::new(PostgresProbe { config }));
    }
    Ok(probes)
}

/// Not ready until every role of this process has started (listeners bound).
struct StartupProbe {
    started: Arc<AtomicBool>,
}

/// Not ready until the topics exist (`kafka.create_topics`): CDC, merge and the bridge wait
/// for them.
struct TopicsProbe {
    ready: watch::Receiver<bool>,
}

impl Probe for TopicsProbe {
    fn name(&self) -> &'static str {
        "topics"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let ready = *self.ready.borrow();
        async move {
            if ready {
                Ok(())
            } else {
                Err("waiting for Kafka to create the topics".to_owned())
            }
        }
        .boxed()
    }
}

impl Probe for StartupProbe {
    fn name(&self) -> &'static str {
        "startup"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let started = self.started.load(Ordering::Acquire);
        async move {
            if started {
                Ok(())
            } else {
                Err("roles are starting".to_owned())
            }
        }
        .boxed()
    }
}

struct PostgresProbe {
    config: crate::config::DatabaseConfig,
}

impl Probe for PostgresProbe {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            let client = db::connect(&self.config, Login::Daemon)
                .await
                .map_err(|e| e.to_string())?;
            client
                .simple_query("select 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        .boxed()
    }
}

struct KafkaProbe {
    admin: KafkaAdmin,
}

impl Probe for KafkaProbe {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            self.admin
                .cluster_info()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_role_fails_readiness_and_the_run() {
        let shutdown = CancellationToken::new();
        let health = Health::default();
        let mut supervisor = Supervisor::new(shutdown.clone(), health.clone());
        let token = shutdown.clone();
        supervisor.spawn("ops", async move {
            token.cancelled().await;
            Ok(())
        });
        supervisor.spawn("merge", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("a worker bug")
        });
        assert!(health.check().await.is_ok());
        let err = supervisor.run(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(&err, DaemonError::Role { role: "merge", message } if message == "panicked"),
            "{err}"
        );
        assert!(shutdown.is_cancelled(), "the other roles are stopped");
        let reason = health.check().await.unwrap_err();
        assert!(reason.contains("merge"), "{reason}");
    }

    #[tokio::test]
    async fn a_stopped_cdc_stream_fails_readiness_until_it_streams_again() {
        let health = Health::default();
        let status = crate::cdc::CdcStatus::default();
        *health.cdc.lock().unwrap() = Some(status.clone());
        assert!(health.check().await.is_ok());
        status.set(Some("replication slot s is lost".into()));
        let reason = health.check().await.unwrap_err();
        assert!(
            reason.contains("CDC stopped") && reason.contains("lost"),
            "{reason}"
        );
        status.set(None);
        assert!(health.check().await.is_ok());
    }
}
