//! The daemon's side of liveness (`telemetry::liveness`): a role's task that ends outside a
//! shutdown marks its heartbeat ended, and ingest — a server, not a loop — beats through a
//! periodic self-check that its listener accepts and answers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::telemetry::liveness::{self, Heartbeat};

/// Marks the heartbeat ended when dropped outside a shutdown: the role's task returned,
/// failed or panicked while the others run on.
struct EndGuard {
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !self.shutdown.is_cancelled() {
            self.heartbeat.end();
        }
    }
}

/// `task`, whose end outside a shutdown fails liveness.
pub(super) async fn watched<F: Future>(
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
    task: F,
) -> F::Output {
    let _guard = EndGuard {
        heartbeat,
        shutdown,
    };
    task.await
}

/// Beats ingest's heartbeat each time its listener answers an HTTP request (any status: a
/// path no route serves gets 404 without touching Kafka, which may be away). A server that
/// no longer accepts or answers stops the beats.
pub(super) async fn ingest_self_check(
    addr: SocketAddr,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let period = liveness::period();
    let client = match reqwest::Client::builder()
        .timeout(period.max(Duration::from_secs(1)))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "ingest self-check: cannot build the HTTP client");
            return;
        }
    };
    let url = format!("http://{addr}/.membersync/liveness");
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match client.get(&url).send().await {
            Ok(_) => heartbeat.beat(),
            Err(e) => tracing::debug!(error = %e, "ingest self-check: no answer"),
        }
    }
}
