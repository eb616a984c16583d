//! The webhook endpoint: `POST /webhooks/memberstack` (Svix) and `POST /webhooks/stripe`.
//!
//! Order of work per request: content type → body (bounded) → signature on the raw bytes →
//! parse → produce and wait for Kafka's acknowledgement → 200. Anything that fails before the
//! acknowledgement answers non-2xx, so the sender keeps the event and retries; nothing that
//! failed verification or parsing is ever produced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::limit::ConcurrencyLimitLayer;

use super::envelope::{self, IngestRecord, Source};
use super::event::{parse_memberstack, parse_stripe};
use super::metrics::IngestMetrics;
use super::rejection::Rejection;
use super::verify::stripe::StripeVerifier;
use super::verify::svix::SvixVerifier;
use crate::config::{Config, IngestConfig, split_secrets};
use crate::kafka::producer::{ProduceError, Producer, Record};
use crate::kafka::topics::Topics;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Key(#[from] super::verify::KeyError),
    #[error(transparent)]
    Producer(#[from] ProduceError),
    #[error("cannot register ingest metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error("ingest server failed: {0}")]
    Serve(#[source] std::io::Error),
}

struct IngestState {
    svix: Option<SvixVerifier>,
    stripe: Option<StripeVerifier>,
    producer: Producer,
    memberstack_topic: String,
    stripe_topic: String,
    metrics: IngestMetrics,
    cfg: IngestConfig,
}

/// The bound webhook server.
pub struct IngestServer {
    listener: TcpListener,
    router: Router,
    producer: Producer,
}

impl IngestServer {
    pub async fn bind(config: &Config, metrics: &Metrics) -> Result<Self, IngestError> {
        let cfg = config.ingest.clone();
        let svix = cfg
            .memberstack_webhook_secrets
            .as_ref()
            .map(|s| SvixVerifier::new(&split_secrets(s)))
            .transpose()?;
        let stripe = cfg
            .stripe_webhook_secrets
            .as_ref()
            .map(|s| StripeVerifier::new(&split_secrets(s)))
            .transpose()?;
        if svix.is_none() && stripe.is_none() {
            tracing::warn!("no webhook secrets configured: both webhook routes answer 404");
        }
        let producer = Producer::new(&config.kafka, cfg.kafka_ack_timeout())?;
        let topics = Topics::new(&config.kafka.topic_prefix);
        let addr = cfg.listen_addr;
        let state = Arc::new(IngestState {
            svix,
            stripe,
            producer: producer.clone(),
            memberstack_topic: topics.memberstack(),
            stripe_topic: topics.stripe(),
            metrics: IngestMetrics::register(metrics.registry())?,
            cfg,
        });
        // The member and admin API shares the listener and the producer (DESIGN.md §5).
        let api = crate::api::router(
            config,
            metrics,
            producer.clone(),
            config.ingest.kafka_ack_timeout(),
        )?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| IngestError::Bind { addr, source })?;
        Ok(Self {
            listener,
            router: router(state).merge(api),
            producer,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, lets in-flight requests finish, then flushes the producer.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        let result = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        let producer = self.producer;
        // Every 2xx already waited for its ack; this only drains records of requests that
        // timed out and were answered 503 (their senders retry; merge deduplicates).
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        result.map_err(IngestError::Serve)
    }
}

fn router(state: Arc<IngestState>) -> Router {
    let limit = state.cfg.concurrency_limit;
    Router::new()
        .route("/webhooks/memberstack", post(memberstack))
        .route("/webhooks/stripe", post(stripe))
        .layer(ConcurrencyLimitLayer::new(limit))
        .with_state(state)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": {"code": "not_found", "message": "no such route"}})),
            )
        })
}

async fn memberstack(
    State(state): State<Arc<IngestState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Source::Memberstack, headers, body).await
}

async fn stripe(State(state): State<Arc<IngestState>>, headers: HeaderMap, body: Body) -> Response {
    handle(state, Source::Stripe, headers, body).await
}

/// What a successful request did.
enum Accepted {
    Produced(String),
    /// Genuine, but names neither a member nor a customer: nothing to sync.
    Ignored(String),
}

async fn handle(
    state: Arc<IngestState>,
    source: Source,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        state.cfg.request_timeout(),
        process(&state, source, &headers, body),
    )
    .await
    .unwrap_or(Err(Rejection::Timeout));
    let (response, status, reason) = match outcome {
        Ok(Accepted::Produced(id)) => {
            (Json(json!({"status": "accepted", "event_id": id})).into_response(), StatusCode::OK, "accepted")
        }
        Ok(Accepted::Ignored(id)) => (
            Json(json!({"status": "ignored", "event_id": id, "reason": "names no member or customer"}))
                .into_response(),
            StatusCode::OK,
            "ignored_unroutable",
        ),
        Err(rejection) => {
            let (status, reason) = (rejection.status(), rejection.reason());
            if status.is_server_error() {
                tracing::warn!(source = source.as_str(), reason, "webhook not accepted");
            } else {
                tracing::debug!(source = source.as_str(), reason, "webhook rejected");
            }
            (rejection.into_response(), status, reason)
        }
    };
    let m = &state.metrics;
    m.requests
        .with_label_values(&[source.as_str(), status.as_str(), reason])
        .inc();
    m.request_seconds
        .with_label_values(&[source.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn process(
    state: &IngestState,
    source: Source,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Rejection> {
    let configured = match source {
        Source::Memberstack => state.svix.is_some(),
        Source::Stripe => state.stripe.is_some(),
    };
    if !configured {
        return Err(Rejection::NotConfigured);
    }
    if !is_json(headers) {
        return Err(Rejection::UnsupportedMediaType);
    }
    let body = read_body(headers, body, state.cfg.body_limit_bytes).await?;
    let now = unix_now();
    let received_at = chrono::Utc::now();
    let (record, topic) = match source {
        Source::Memberstack => {
            let verifier = state.svix.as_ref().ok_or(Rejection::NotConfigured)?;
            let delivery = verifier.verify(headers, &body, now)?;
            let event = parse_memberstack(&body)?;
            let record =
                envelope::memberstack(&delivery.id, delivery.timestamp, &event, received_at);
            (record, &state.memberstack_topic)
        }
        Source::Stripe => {
            let verifier = state.stripe.as_ref().ok_or(Rejection::NotConfigured)?;
            let delivery = verifier.verify(headers, &body, now)?;
            let event = parse_stripe(&body)?;
            match envelope::stripe(delivery.timestamp, &event, received_at) {
                Some(record) => (record, &state.stripe_topic),
                None => return Ok(Accepted::Ignored(event.id)),
            }
        }
    };
    if record.unknown_event {
        state.metrics.unknown_events.inc();
    }
    produce(state, topic, &record).await?;
    Ok(Accepted::Produced(record.event_id))
}

async fn produce(state: &IngestState, topic: &str, record: &IngestRecord) -> Result<(), Rejection> {
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_bytes()))
        .collect();
    let started = Instant::now();
    let sent = state
        .producer
        .send(
            &Record {
                topic,
                key: record.key.as_bytes(),
                payload: &record.value,
                headers: &headers,
            },
            state.cfg.kafka_ack_timeout(),
        )
        .await;
    match sent {
        Ok(_) => {
            state
                .metrics
                .kafka_ack_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, topic, "webhook event not acknowledged by Kafka");
            Err(Rejection::from_produce(&e))
        }
    }
}

/// `application/json`, any parameters (`charset=utf-8`), any case.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads at most `limit` bytes; a declared or actual larger body is refused without reading
/// the rest.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Rejection::TooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Rejection::TooLarge(limit)),
        Err(_) => Err(Rejection::BodyRead),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
