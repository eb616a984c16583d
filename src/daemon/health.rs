//! Readiness: the dependencies each role needs (Postgres, Kafka, the topics), that the roles
//! started, and what the process knows about itself — a failed role, a panic anywhere, a CDC
//! stream stopped for an operator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{DaemonError, Role};
use crate::config::Config;
use crate::db::{self, Login};
use crate::http::ops::Probe;
use crate::kafka::admin::KafkaAdmin;

/// What readiness knows beyond the dependencies: a failed role, a panic anywhere in the
/// process, a stopped CDC stream.
#[derive(Clone, Default)]
pub(super) struct Health {
    failed: Arc<Mutex<Option<String>>>,
    panicked: Arc<Mutex<Option<String>>>,
    pub(super) cdc: Arc<Mutex<Option<crate::cdc::CdcStatus>>>,
}

impl Health {
    pub(super) fn fail(&self, reason: String) {
        self.failed.lock().expect("health").get_or_insert(reason);
    }

    pub(super) fn panicked(&self) -> Option<String> {
        self.panicked.lock().expect("health").clone()
    }

    /// Any panic in this process — a role's task or a worker task a role spawned (whose
    /// `JoinHandle` may only log it) — fails the process: readiness turns 503, the roles
    /// drain and it exits non-zero, so that a supervisor restarts it instead of leaving a
    /// role silently short of a worker. The previous hook (which prints the panic) still runs.
    pub(super) fn install_panic_hook(&self, shutdown: CancellationToken) {
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
        let dead = crate::telemetry::liveness::dead_roles();
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
            if let Some((role, reason)) = dead.into_iter().next() {
                return Err(format!("role {role} is not alive: {reason}"));
            }
            Ok(())
        }
        .boxed()
    }
}

/// Readiness covers what the selected roles depend on; Kafka is needed by every role, and
/// the full daemon (`run`) also streams from Postgres.
pub(super) fn probes(config: &Config, roles: &[Role]) -> Result<Vec<Box<dyn Probe>>, DaemonError> {
    let admin = KafkaAdmin::new(&config.kafka).map_err(|e| DaemonError::Setup(e.to_string()))?;
    let mut probes: Vec<Box<dyn Probe>> = vec![Box::new(KafkaProbe { admin })];
    if roles == Role::ALL || roles.iter().any(|r| r.needs_postgres()) {
        let config = config.database.clone();
        probes.insert(0, Box::new(PostgresProbe { config }));
    }
    Ok(probes)
}

/// Not ready until every role of this process has started (listeners bound).
pub(super) struct StartupProbe {
    pub(super) started: Arc<AtomicBool>,
}

/// Not ready until the topics exist (`kafka.create_topics`): CDC, merge and the bridge wait
/// for them.
pub(super) struct TopicsProbe {
    pub(super) ready: watch::Receiver<bool>,
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
