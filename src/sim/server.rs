//! Serving a simulator's router on a loopback (or given) address, with a graceful shutdown
//! that cannot be held up by requests the fault injector made hang.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::SimError;
use super::faults::{Fault, Faults, hang};
use super::observe::{ApiCall, CallLog};

/// How long shutdown waits for in-flight requests before dropping them.
const DRAIN: Duration = Duration::from_secs(5);

pub(crate) struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `addr` (default `127.0.0.1:0`) and serves `router` until [`Server::shutdown`].
    pub async fn spawn(
        addr: Option<SocketAddr>,
        router: Router,
        shutdown: CancellationToken,
    ) -> Result<Server, SimError> {
        let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimError::Bind { addr, source })?;
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router)
                .with_graceful_shutdown(async move { token.cancelled().await });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "simulator server stopped");
            }
        });
        Ok(Server {
            addr,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, releases hanging requests, waits (bounded) for the rest.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let mut task = self.task;
        if tokio::time::timeout(DRAIN, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// How a simulator renders its error bodies and which rate limiter it has, for the shared
/// API middleware.
pub(crate) trait ApiFront: Send + Sync + 'static {
    fn faults(&self) -> &Faults;
    fn calls(&self) -> &CallLog;
    fn shutdown_token(&self) -> &CancellationToken;
    /// The response for an injected failure with the simulator's error shape.
    fn fault_response(&self, status: StatusCode) -> Response;
    /// The 429 response (forced or from the limiter).
    fn rate_limited_response(&self) -> Response;
    /// The route template of `path` (`/members/{id}`), the per-endpoint counter key. (axum's
    /// `MatchedPath` needs a feature the crate does not enable.)
    fn route_template(&self, path: &str) -> String {
        path.to_owned()
    }
    /// `true` when the request is over the rate limit (a request that passes is counted).
    fn over_rate_limit(&self, _now: Instant) -> bool {
        false
    }
}

/// Wraps every API route: latency, rate limit, injected faults, then records the call.
pub(crate) async fn api_middleware<F: ApiFront>(
    State(front): State<Arc<F>>,
    request: Request,
    next: Next,
) -> Response {
    let at = Utc::now();
    let method = request.method().to_string();
    let path = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let endpoint = format!("{method} {}", front.route_template(request.uri().path()));
    let latency = front.faults().latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = if front.over_rate_limit(Instant::now()) {
        front.rate_limited_response()
    } else {
        match front.faults().take() {
            Some(Fault::RateLimited) => front.rate_limited_response(),
            Some(Fault::Fail(status, body)) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                match body {
                    Some(body) => (status, axum::Json(body)).into_response(),
                    None => front.fault_response(status),
                }
            }
            Some(Fault::Hang) => {
                hang(front.shutdown_token()).await;
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            }
            None => next.run(request).await,
        }
    };
    front.calls().record(ApiCall {
        method,
        path,
        endpoint,
        status: response.status().as_u16(),
        at,
    });
    response
}

/// The `/__sim/` fault and observability endpoints every simulator has. They need no key,
/// are not rate limited and are not recorded as API calls.
pub(crate) fn control_routes<F: ApiFront>() -> Router<Arc<F>> {
    use axum::Json;
    use axum::routing::{get, post};
    use serde::Deserialize;

    use super::faults::FailSpec;

    #[derive(Deserialize)]
    struct Count {
        count: u32,
    }
    #[derive(Deserialize)]
    struct Latency {
        ms: u64,
    }

    Router::new()
        .route(
            "/__sim/faults",
            get(|State(f): State<Arc<F>>| async move { Json(f.faults().snapshot()) }),
        )
        .route(
            "/__sim/faults/fail",
            post(
                |State(f): State<Arc<F>>, Json(spec): Json<FailSpec>| async move {
                    f.faults().fail_next(spec);
                    Json(f.faults().snapshot())
                },
            ),
        )
        .route(
            "/__sim/faults/latency",
            post(
                |State(f): State<Arc<F>>, Json(l): Json<Latency>| async move {
                    f.faults().set_latency(Duration::from_millis(l.ms));
                    Json(f.faults().snapshot())
                },
            ),
        )
        .route(
            "/__sim/faults/hang",
            post(|State(f): State<Arc<F>>, Json(c): Json<Count>| async move {
                f.faults().hang_next(c.count);
                Json(f.faults().snapshot())
            }),
        )
        .route(
            "/__sim/faults/rate-limit",
            post(|State(f): State<Arc<F>>, Json(c): Json<Count>| async move {
                f.faults().rate_limit_next(c.count);
                Json(f.faults().snapshot())
            }),
        )
        .route(
            "/__sim/faults/reset",
            post(|State(f): State<Arc<F>>| async move {
                f.faults().reset();
                Json(f.faults().snapshot())
            }),
        )
        .route(
            "/__sim/stats",
            get(|State(f): State<Arc<F>>| async move { Json(f.calls().stats()) }),
        )
        .route(
            "/__sim/calls",
            get(|State(f): State<Arc<F>>| async move { Json(f.calls().calls()) }),
        )
}
