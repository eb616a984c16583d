//! The operations server: `/metrics` (Prometheus text), `/healthz` (the process and each of
//! its roles' loops are alive, see `telemetry::liveness`) and `/readyz` (the dependencies
//! answer). It runs on its own port so that it can stay private
//! while webhook ingest is public.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::{BoxFuture, join_all};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// A dependency the daemon needs to do its work; `/readyz` is 200 only if all answer.
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;
    /// `Err` carries a short reason for operators; it must never contain a secret.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct OpsState {
    metrics: Metrics,
    probes: Arc<Vec<Box<dyn Probe>>>,
}

pub fn router(metrics: Metrics, probes: Vec<Box<dyn Probe>>) -> Router {
    let state = OpsState {
        metrics,
        probes: Arc::new(probes),
    };
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .route("/readyz", get(ready_handler))
        .with_state(state)
}

async fn metrics_handler(State(state): State<OpsState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// 200 while every started role beats; 503 naming the roles that are wedged or gone.
async fn health_handler() -> Response {
    let dead = crate::telemetry::liveness::dead_roles();
    if dead.is_empty() {
        return Json(json!({"status": "alive"})).into_response();
    }
    let roles: serde_json::Map<_, _> = dead
        .into_iter()
        .map(|(role, reason)| (role.to_owned(), json!(reason)))
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "dead", "roles": roles})),
    )
        .into_response()
}

async fn ready_handler(State(state): State<OpsState>) -> Response {
    let results = join_all(state.probes.iter().map(|p| async move {
        let outcome = match tokio::time::timeout(PROBE_TIMEOUT, p.check()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
        };
        (p.name(), outcome)
    }))
    .await;
    let ready = results.iter().all(|(_, r)| r.is_ok());
    let checks: serde_json::Map<_, _> = results
        .into_iter()
        .map(|(name, r)| {
            (
                name.to_owned(),
                json!(r.err().unwrap_or_else(|| "ok".into())),
            )
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks});
    (status, Json(body)).into_response()
}

/// A bound ops server, ready to serve.
pub struct OpsServer {
    listener: TcpListener,
    router: Router,
}

impl OpsServer {
    pub async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            router,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires, then finishes in-flight requests.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }
}
