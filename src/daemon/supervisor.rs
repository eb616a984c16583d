//! The roles as named tasks sharing one shutdown token: the first to fail (an error or a
//! panic) cancels the rest, fails readiness and makes the process exit non-zero.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::health::Health;

/// A role's task: runs until its token is cancelled, then drains and returns.
pub(super) type RoleResult = Result<(), String>;

/// Named tasks that share one shutdown token. The first task to fail (return an error or
/// panic) cancels the rest, fails readiness and makes the process exit non-zero.
pub(super) struct Supervisor {
    tasks: JoinSet<(&'static str, RoleResult)>,
    /// A panicked task's `JoinError` carries only its id: this names its role.
    names: HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
    health: Health,
}

impl Supervisor {
    pub(super) fn new(shutdown: CancellationToken, health: Health) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
            health,
        }
    }

    pub(super) fn spawn<F>(&mut self, role: &'static str, task: F)
    where
        F: Future<Output = RoleResult> + Send + 'static,
    {
        let handle = self.tasks.spawn(task.map(move |r| (role, r)));
        self.names.insert(handle.id(), role);
    }

    /// Waits for shutdown (or the first failure), then for the drain, bounded by `drain`.
    pub(super) async fn run(mut self, drain: Duration) -> Result<(), DaemonError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::ops::Probe;

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
