//! PostHog capture simulator (docs/external-services.md §5): `POST /batch/`, `/i/v0/e/`,
//! `/capture/`, answering as `PostHog/posthog:rust/capture` does (200 `{"status":1}`, 400 for
//! invalid payloads, 401 for a missing, wrong or mixed `api_key`). Accepted events are
//! recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::SimError;
use super::faults::{FailSpec, Faults, FaultsSnapshot};
use super::observe::{ApiCall, CallLog, Stats};
use super::server::{ApiFront, Server, api_middleware, control_routes};

/// Settings of a [`PostHogSim`].
#[derive(Debug, Clone)]
pub struct PostHogConfig {
    /// Listen address; `None` = `127.0.0.1:0`.
    pub addr: Option<SocketAddr>,
    /// The project API key (`phc_…`) every request must carry as `api_key`.
    pub api_key: String,
}

impl PostHogConfig {
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            addr: None,
            api_key: api_key.into(),
        }
    }
}

/// One accepted event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapturedEvent {
    pub event: String,
    pub distinct_id: String,
    pub properties: Value,
    pub timestamp: Option<String>,
    pub uuid: Option<String>,
}

/// One accepted request (a single-event capture is a batch of one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapturedBatch {
    /// `/batch/`, `/i/v0/e/` or `/capture/`.
    pub endpoint: String,
    pub historical_migration: bool,
    pub received_at: DateTime<Utc>,
    pub events: Vec<CapturedEvent>,
}

struct Inner {
    config: PostHogConfig,
    batches: Mutex<Vec<CapturedBatch>>,
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
        reject(status, "injected failure (simulator)")
    }
    fn rate_limited_response(&self) -> Response {
        reject(StatusCode::TOO_MANY_REQUESTS, "rate limited")
    }
}

/// Capture answers errors as plain text (`CaptureError` renders `(status, message)`).
fn reject(status: StatusCode, message: &str) -> Response {
    (status, message.to_owned()).into_response()
}

/// A running PostHog capture simulator.
pub struct PostHogSim {
    inner: Arc<Inner>,
    server: Server,
}

impl PostHogSim {
    pub async fn start(config: PostHogConfig) -> Result<Self, SimError> {
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            config,
            batches: Mutex::new(Vec::new()),
            faults: Faults::default(),
            calls: CallLog::default(),
            shutdown: shutdown.clone(),
        });
        let api = Router::new()
            .route("/batch", post(batch))
            .route("/batch/", post(batch))
            .route("/i/v0/e", post(single))
            .route("/i/v0/e/", post(single))
            .route("/capture", post(single))
            .route("/capture/", post(single))
            .route_layer(middleware::from_fn_with_state(
                inner.clone(),
                api_middleware::<Inner>,
            ))
            .with_state(inner.clone());
        let control = Router::new()
            .route("/__sim/events", get(events))
            .route("/__sim/batches", get(batches))
            .merge(control_routes::<Inner>())
            .with_state(inner.clone());
        let server = Server::spawn(inner.config.addr, api.merge(control), shutdown).await?;
        Ok(Self { inner, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
    /// `http://127.0.0.1:<port>`, the stand-in for `https://us.i.posthog.com`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }

    /// Every accepted request, in arrival order.
    pub fn batches(&self) -> Vec<CapturedBatch> {
        self.inner
            .batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Every accepted event, in arrival order.
    pub fn events(&self) -> Vec<CapturedEvent> {
        self.batches().into_iter().flat_map(|b| b.events).collect()
    }
    pub fn stats(&self) -> Stats {
        self.inner.calls.stats()
    }
    pub fn calls(&self) -> Vec<ApiCall> {
        self.inner.calls.calls()
    }

    /// The next `count` requests answer `status` (503 and 429 are what capture sends).
    pub fn fail_next(&self, count: u32, status: u16) {
        self.inner.faults.fail_next(FailSpec {
            count,
            status,
            body: None,
        });
    }
    pub fn rate_limit_next(&self, count: u32) {
        self.inner.faults.rate_limit_next(count);
    }
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

async fn events(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let batches = inner
        .batches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let events: Vec<CapturedEvent> = batches.into_iter().flat_map(|b| b.events).collect();
    Json(json!({"events": events}))
}

async fn batches(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let batches = inner
        .batches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Json(json!({"batches": batches}))
}

type Rejection = (StatusCode, &'static str);

/// Validates one event; `api_key` collects the keys seen (to refuse mixed keys).
fn event(raw: &Value, keys: &mut Vec<String>) -> Result<CapturedEvent, Rejection> {
    let obj = raw
        .as_object()
        .ok_or((StatusCode::BAD_REQUEST, "event is not an object"))?;
    for key_field in ["api_key", "token"] {
        if let Some(k) = obj.get(key_field).and_then(Value::as_str) {
            keys.push(k.to_owned());
        }
    }
    let event = obj
        .get("event")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
        .ok_or((StatusCode::BAD_REQUEST, "missing event name"))?;
    let properties = obj.get("properties").cloned().unwrap_or_else(|| json!({}));
    let distinct_id = obj
        .get("distinct_id")
        .or_else(|| properties.get("distinct_id"))
        .and_then(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .ok_or((StatusCode::BAD_REQUEST, "missing distinct_id"))?;
    Ok(CapturedEvent {
        event: event.to_owned(),
        distinct_id,
        properties,
        timestamp: obj
            .get("timestamp")
            .and_then(Value::as_str)
            .map(str::to_owned),
        uuid: obj.get("uuid").and_then(Value::as_str).map(str::to_owned),
    })
}

fn check_keys(inner: &Inner, keys: &[String]) -> Result<(), Rejection> {
    let first = keys
        .first()
        .ok_or((StatusCode::UNAUTHORIZED, "missing api_key"))?;
    if keys.iter().any(|k| k != first) {
        return Err((StatusCode::UNAUTHORIZED, "mixed api keys in one request"));
    }
    if *first != inner.config.api_key {
        return Err((StatusCode::UNAUTHORIZED, "invalid api_key"));
    }
    Ok(())
}

fn accept(inner: &Inner, endpoint: &str, historical: bool, events: Vec<CapturedEvent>) -> Response {
    inner
        .batches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(CapturedBatch {
            endpoint: endpoint.to_owned(),
            historical_migration: historical,
            received_at: Utc::now(),
            events,
        });
    Json(json!({"status": 1})).into_response()
}

fn parse_body(body: &Bytes) -> Result<Value, Rejection> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or((StatusCode::BAD_REQUEST, "invalid JSON payload"))
}

async fn batch(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let result = (|| {
        let v = parse_body(&body)?;
        let mut keys: Vec<String> = v
            .get("api_key")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .into_iter()
            .collect();
        let raw = v
            .get("batch")
            .and_then(Value::as_array)
            .ok_or((StatusCode::BAD_REQUEST, "missing batch"))?;
        if raw.is_empty() {
            return Err((StatusCode::BAD_REQUEST, "empty batch"));
        }
        let events = raw
            .iter()
            .map(|e| event(e, &mut keys))
            .collect::<Result<Vec<_>, _>>()?;
        check_keys(&inner, &keys)?;
        let historical = v
            .get("historical_migration")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok((events, historical))
    })();
    match result {
        Ok((events, historical)) => accept(&inner, "/batch/", historical, events),
        Err((status, message)) => reject(status, message),
    }
}

async fn single(State(inner): State<Arc<Inner>>, uri: axum::http::Uri, body: Bytes) -> Response {
    let endpoint = if uri.path().starts_with("/capture") {
        "/capture/"
    } else {
        "/i/v0/e/"
    };
    let result = (|| {
        let v = parse_body(&body)?;
        let mut keys = Vec::new();
        let e = event(&v, &mut keys)?;
        check_keys(&inner, &keys)?;
        Ok(e)
    })();
    match result {
        Ok(e) => accept(&inner, endpoint, false, vec![e]),
        Err((status, message)) => reject(status, message),
    }
}
