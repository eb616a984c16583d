//! `membersync run`: the process frame every role runs in — the ops server, the roles as
//! supervised tasks, and a graceful shutdown bounded by `shutdown.drain_timeout_secs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use futures::future::BoxFuture;
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

/// Named tasks that share one shutdown token. The first task to fail cancels the rest.
struct Supervisor {
    tasks: JoinSet<(&'static str, RoleResult)>,
    shutdown: CancellationToken,
}

impl Supervisor {
    fn new(shutdown: CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            shutdown,
        }
    }

    fn spawn<F>(&mut self, role: &'static str, task: F)
    where
        F: Future<Output = RoleResult> + Send + 'static,
    {
        self.tasks.spawn(task.map(move |r| (role, r)));
    }

    /// Waits for shutdown (or the first failure), then for the drain, bounded by `drain`.
    async fn run(mut self, drain: std::time::Duration) -> Result<(), DaemonError> {
        let mut failure = None;
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                failure = outcome(joined);
                if failure.is_none() {
                    tracing::warn!("a role stopped on its own; shutting down");
                }
                self.shutdown.cancel();
            }
        }
        let drained = tokio::time::timeout(drain, async {
            while let Some(joined) = self.tasks.join_next().await {
                if let Some(e) = outcome(joined) {
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
        failure.map_or(Ok(()), Err)
    }
}

fn outcome(
    joined: Result<(&'static str, RoleResult), tokio::task::JoinError>,
) -> Option<DaemonError> {
    match joined {
        Ok((role, Ok(()))) => {
            tracing::info!(role, "role stopped");
            None
        }
        Ok((role, Err(message))) => {
            tracing::error!(role, error = %message, "role failed");
            Some(DaemonError::Role { role, message })
        }
        Err(e) => Some(DaemonError::Role {
            role: "task",
            message: e.to_string(),
        }),
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
    let started = Arc::new(AtomicBool::new(false));
    let mut probes = probes(&config, roles)?;
    probes.insert(
        0,
        Box::new(StartupProbe {
            started: Arc::clone(&started),
        }),
    );
    let addr = config.telemetry.metrics_addr;
    let server = OpsServer::bind(addr, ops::router(metrics.clone(), probes))
        .await
        .map_err(|source| DaemonError::Bind { addr, source })?;
    tracing::info!(addr = %server.local_addr().unwrap_or(addr), "ops server listening (/metrics, /healthz, /readyz)");

    // Liveness and metrics answer from here on, while the roles start.
    let mut supervisor = Supervisor::new(shutdown.clone());
    let token = shutdown.clone();
    supervisor.spawn("ops", async move {
        server.serve(token).await.map_err(|e| e.to_string())
    });

    if config.kafka.create_topics {
        let admin =
            KafkaAdmin::new(&config.kafka).map_err(|e| DaemonError::Setup(e.to_string()))?;
        let topics = crate::kafka::topics::Topics::new(&config.kafka.topic_prefix).all(&config);
        let created = admin
            .ensure_topics(&topics)
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        if !created.is_empty() {
            tracing::info!(?created, "created missing topics");
        }
    }

    if roles.contains(&Role::Cdc) {
        let cdc = crate::cdc::Cdc::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let token = shutdown.clone();
        supervisor.spawn("cdc", async move {
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
        supervisor.spawn("merge", async move {
            merge.run(token).await.map_err(|e| e.to_string())
        });
    }

    if roles.contains(&Role::Bridge) {
        let bridge = crate::bridge::Bridge::new(&config, &metrics)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let token = shutdown.clone();
        supervisor.spawn("bridge", async move {
            bridge.run(token).await.map_err(|e| e.to_string())
        });
    }

    started.store(true, Ordering::Release);
    tracing::info!(
        version = crate::telemetry::BUILD_VERSION,
        "membersync running"
    );
    supervisor.run(config.shutdown.drain_timeout()).await
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

/// Not ready until every role of this process has started (listeners bound, topics ready).
struct StartupProbe {
    started: Arc<AtomicBool>,
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
