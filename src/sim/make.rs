//! Make.com custom webhook simulator (docs/external-services.md §6): any request to `/<token>` is
//! queued for "the scenario" and answered `200 Accepted`, as Make does when the scenario has
//! no Webhook response module. Accepted requests are recorded for tests.
//!
//! Unconfirmed vendor behaviour, and the choice made here (docs/simulators.md):
//! - a deactivated or deleted hook answers **410** `There is no scenario listening for this
//!   webhook.` (the status Make is reported to use; the reference could not confirm it);
//! - a 429 carries `Retry-After` (`retry_after_secs`, default 1);
//! - bodies over 5 MB (the community-reported limit) answer 413.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router, middleware};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::SimError;
use super::faults::{FailSpec, Faults, FaultsSnapshot};
use super::observe::{ApiCall, CallLog, Stats};
use super::server::{ApiFront, Server, api_middleware, control_routes};

/// Make's reported maximum payload.
pub const MAX_BODY: usize = 5 * 1024 * 1024;
/// The body of a deactivated hook's answer.
pub const GONE_BODY: &str = "There is no scenario listening for this webhook.";

/// Settings of a [`MakeSim`].
#[derive(Debug, Clone, Default)]
pub struct MakeConfig {
    /// Listen address; `None` = `127.0.0.1:0`.
    pub addr: Option<SocketAddr>,
}

/// One accepted request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HookRequest {
    /// The hook token (the path without its leading `/`).
    pub token: String,
    pub method: String,
    /// Header names lower-case; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON when it is JSON, else as a string.
    pub body: Value,
    pub received_at: DateTime<Utc>,
}

impl HookRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_lowercase()).map(String::as_str)
    }
}

struct Inner {
    requests: Mutex<Vec<HookRequest>>,
    deactivated: Mutex<BTreeSet<String>>,
    retry_after_secs: Mutex<u64>,
    faults: Faults,
    calls: CallLog,
    shutdown: CancellationToken,
}

impl ApiFront for Inner {
    fn faults(&self) -> &Faults {
        &self.faults
    }
    fn calls(&self) -> &CallLog {
        &self.calls
    }
    fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }
    fn fault_response(&self, status: StatusCode) -> Response {
        (status, "injected failure (simulator)").into_response()
    }
    fn rate_limited_response(&self) -> Response {
        let secs = *self
            .retry_after_secs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            "Too Many Requests",
        )
            .into_response()
    }
    fn route_template(&self, _path: &str) -> String {
        "/{token}".into()
    }
}

/// A running Make.com webhook simulator.
pub struct MakeSim {
    inner: Arc<Inner>,
    server: Server,
}

impl MakeSim {
    pub async fn start(config: MakeConfig) -> Result<Self, SimError> {
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            requests: Mutex::new(Vec::new()),
            deactivated: Mutex::new(BTreeSet::new()),
            retry_after_secs: Mutex::new(1),
            faults: Faults::default(),
            calls: CallLog::default(),
            shutdown: shutdown.clone(),
        });
        let api = Router::new()
            .route("/{token}", any(hook))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .route_layer(middleware::from_fn_with_state(
                inner.clone(),
                api_middleware::<Inner>,
            ))
            .with_state(inner.clone());
        let control = Router::new()
            .route("/__sim/requests", get(requests))
            .route("/__sim/hooks/{token}/deactivate", post(deactivate))
            .route("/__sim/hooks/{token}/activate", post(activate))
            .route("/__sim/faults/retry-after", post(set_retry_after))
            .merge(control_routes::<Inner>())
            .with_state(inner.clone());
        let server = Server::spawn(config.addr, control.merge(api), shutdown).await?;
        Ok(Self { inner, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
    /// `http://127.0.0.1:<port>`, the stand-in for `https://hook.eu1.make.com`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }
    /// The webhook URL of `token`.
    pub fn hook_url(&self, token: &str) -> String {
        format!("{}/{token}", self.base_url())
    }
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }

    /// Every accepted request, in arrival order.
    pub fn requests(&self) -> Vec<HookRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// The accepted requests of one hook.
    pub fn requests_to(&self, token: &str) -> Vec<HookRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.token == token)
            .collect()
    }
    /// Every request as answered (faulted ones too).
    pub fn calls(&self) -> Vec<ApiCall> {
        self.inner.calls.calls()
    }
    pub fn stats(&self) -> Stats {
        self.inner.calls.stats()
    }

    /// The hook answers 410 from now on (scenario deactivated or hook deleted).
    pub fn deactivate(&self, token: &str) {
        self.inner
            .deactivated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_owned());
    }
    pub fn activate(&self, token: &str) {
        self.inner
            .deactivated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    /// The next `count` requests answer `status`.
    pub fn fail_next(&self, count: u32, status: u16) {
        self.inner.faults.fail_next(FailSpec {
            count,
            status,
            body: None,
        });
    }
    /// The next `count` requests answer 429 with `Retry-After` (see
    /// [`set_retry_after`](Self::set_retry_after)).
    pub fn rate_limit_next(&self, count: u32) {
        self.inner.faults.rate_limit_next(count);
    }
    /// The `Retry-After` of 429 answers, in seconds (default 1).
    pub fn set_retry_after(&self, secs: u64) {
        *self
            .inner
            .retry_after_secs
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = secs;
    }
    /// The next `count` requests never answer (the client times out).
    pub fn hang_next(&self, count: u32) {
        self.inner.faults.hang_next(count);
    }
    pub fn set_latency(&self, latency: Duration) {
        self.inner.faults.set_latency(latency);
    }
    pub fn reset_faults(&self) {
        self.inner.faults.reset();
    }
    pub fn faults(&self) -> FaultsSnapshot {
        self.inner.faults.snapshot()
    }
}

async fn hook(
    State(inner): State<Arc<Inner>>,
    Path(token): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let gone = inner
        .deactivated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&token);
    if gone {
        return (StatusCode::GONE, GONE_BODY).into_response();
    }
    let mut hdrs: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        hdrs.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    inner
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(HookRequest {
            token,
            method: method.to_string(),
            headers: hdrs,
            body,
            received_at: Utc::now(),
        });
    (StatusCode::OK, "Accepted").into_response()
}

async fn requests(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let requests = inner
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Json(json!({ "requests": requests }))
}

async fn deactivate(State(inner): State<Arc<Inner>>, Path(token): Path<String>) -> StatusCode {
    inner
        .deactivated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token);
    StatusCode::NO_CONTENT
}

async fn activate(State(inner): State<Arc<Inner>>, Path(token): Path<String>) -> StatusCode {
    inner
        .deactivated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&token);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct RetryAfter {
    secs: u64,
}

async fn set_retry_after(State(inner): State<Arc<Inner>>, Json(r): Json<RetryAfter>) -> StatusCode {
    *inner
        .retry_after_secs
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = r.secs;
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_records_and_injects_make_faults() {
        let sim = MakeSim::start(MakeConfig::default()).await.unwrap();
        let http = reqwest::Client::new();
        let post = |token: &str| {
            http.post(sim.hook_url(token))
                .header("x-membersync-event-id", "evt_1")
                .json(&json!({"id": 1}))
                .send()
        };
        let ok = post("tok-a").await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.text().await.unwrap(), "Accepted");
        let recorded = sim.requests_to("tok-a");
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].body, json!({"id": 1}));
        assert_eq!(recorded[0].header("X-Membersync-Event-Id"), Some("evt_1"));

        sim.set_retry_after(7);
        sim.rate_limit_next(1);
        let limited = post("tok-a").await.unwrap();
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()["retry-after"], "7");

        sim.fail_next(1, 502);
        assert_eq!(post("tok-a").await.unwrap().status(), 502);

        sim.deactivate("tok-b");
        let gone = post("tok-b").await.unwrap();
        assert_eq!(gone.status(), 410);
        assert_eq!(gone.text().await.unwrap(), GONE_BODY);
        sim.activate("tok-b");
        assert_eq!(post("tok-b").await.unwrap().status(), 200);

        // Control endpoints are not hooks.
        let listed: Value = http
            .get(format!("{}/__sim/requests", sim.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed["requests"].as_array().unwrap().len(), 2);
        assert_eq!(sim.stats().rate_limited, 1);
        assert_eq!(sim.calls().len(), 5);
        sim.shutdown().await;
    }
}
