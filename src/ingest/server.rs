//! The webhook endpoint: `POST /webhooks/memberstack` (Svix) and `POST /webhooks/stripe`.
//!
//! Order of work per request: content type → signature headers (presence, syntax, timestamp
//! window) → an in-flight slot ([`super::gate`]) → body (bounded in size and in time) →
//! signature on the raw bytes → parse → produce and wait for Kafka's acknowledgement → 200.
//! Everything before the body costs no memory, so a request that fails there is answered
//! without reading its body. Anything that fails before the acknowledgement answers non-2xx,
//! so the sender keeps the event and retries; nothing that failed verification or parsing is
//! ever produced. Resource limits: `docs/ingest.md`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::conn::{self, ConnLimits};
use super::envelope::{self, IngestRecord, Source};
use super::event::{parse_memberstack, parse_stripe};
use super::gate::{BodyRead, Gate};
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
}

struct IngestState {
    svix: Option<SvixVerifier>,
    stripe: Option<StripeVerifier>,
    producer: Producer,
    memberstack_topic: String,
    stripe_topic: String,
    metrics: IngestMetrics,
    gate: Arc<Gate>,
    cfg: IngestConfig,
}

/// The bound webhook server.
pub struct IngestServer {
    listener: TcpListener,
    router: Router,
    producer: Producer,
    limits: ConnLimits,
    connections: prometheus::IntGauge,
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
        let ingest_metrics = IngestMetrics::register(metrics.registry())?;
        let gate = Gate::new(
            cfg.concurrency_limit,
            ingest_metrics.shed.clone(),
            ingest_metrics.in_flight.clone(),
        );
        let limits = ConnLimits {
            max_connections: cfg.max_connections,
            header_read_timeout: cfg.header_read_timeout(),
        };
        let connections = ingest_metrics.connections.clone();
        let state = Arc::new(IngestState {
            svix,
            stripe,
            producer: producer.clone(),
            memberstack_topic: topics.memberstack(),
            stripe_topic: topics.stripe(),
            metrics: ingest_metrics,
            gate: Arc::clone(&gate),
            cfg,
        });
        // The member and admin API shares the listener and the producer (docs/api.md).
        // Its requests take slots of the same in-flight limit as the webhooks.
        let api = crate::api::router(
            config,
            metrics,
            producer.clone(),
            config.ingest.kafka_ack_timeout(),
        )?
        .layer(axum::middleware::from_fn_with_state(gate, api_slot));
        let listener = listen(addr).map_err(|source| IngestError::Bind { addr, source })?;
        Ok(Self {
            listener,
            router: router(state).merge(api),
            producer,
            limits,
            connections,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, lets in-flight requests finish, then flushes the producer.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        conn::serve(
            self.listener,
            self.router,
            self.limits,
            self.connections,
            shutdown,
        )
        .await;
        let producer = self.producer;
        // Every 2xx already waited for its ack; this only drains records of requests that
        // timed out and were answered 503 (their senders retry; merge deduplicates).
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        Ok(())
    }
}

/// Like `TcpListener::bind`, with a longer backlog (tokio's is 1,024): connections that
/// arrive while the accept loop is busy wait in the kernel instead of being dropped and
/// retried by the client a second or more later.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(conn::LISTEN_BACKLOG)
}

/// An in-flight slot for an API request, or 503 at once.
async fn api_slot(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    match gate.admit().await {
        Some(_slot) => next.run(request).await,
        None => crate::api::Problem::unavailable("overloaded", "the server is busy; retry later")
            .into_response(),
    }
}

fn router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/webhooks/memberstack", post(memberstack))
        .route("/webhooks/stripe", post(stripe))
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
    let mut body_read = false;
    let outcome = tokio::time::timeout(
        state.cfg.request_timeout(),
        process(&state, source, &headers, body, started, &mut body_read),
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
            // Shedding is counted, not logged: under attack it happens thousands of times a
            // second.
            let shed = matches!(rejection, Rejection::Overloaded | Rejection::SilentBodyShed);
            if status.is_server_error() && !shed {
                tracing::warn!(source = source.as_str(), reason, "webhook not accepted");
            } else {
                tracing::debug!(source = source.as_str(), reason, "webhook rejected");
            }
            let mut response = rejection.into_response();
            if !body_read {
                // The rest of the body is not wanted: say so (the connection closes after
                // the answer, lingering so that the answer reaches the client).
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            (response, status, reason)
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

/// `body_read` is set once the body has been read to its end.
async fn process(
    state: &IngestState,
    source: Source,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    body_read: &mut bool,
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
    // Before the body: a forged or stale delivery costs neither a slot nor a buffer.
    match source {
        Source::Memberstack => state
            .svix
            .as_ref()
            .map(|v| v.check_headers(headers, unix_now())),
        Source::Stripe => state
            .stripe
            .as_ref()
            .map(|v| v.check_headers(headers, unix_now())),
    }
    .ok_or(Rejection::NotConfigured)??;
    // Held until the answer: the body, the parsed event and the record live in this slot.
    let mut slot = state.gate.admit().await.ok_or(Rejection::Overloaded)?;
    let buffer = slot.buffer();
    read_body(
        headers,
        body,
        state.cfg.body_limit_bytes,
        tokio::time::Instant::from_std(started + state.cfg.body_read_timeout()),
        &state.gate.reading(),
        buffer,
    )
    .await?;
    *body_read = true;
    let body: &[u8] = buffer;
    let now = unix_now();
    let received_at = chrono::Utc::now();
    let (record, topic) = match source {
        Source::Memberstack => {
            let verifier = state.svix.as_ref().ok_or(Rejection::NotConfigured)?;
            let delivery = verifier.verify(headers, body, now)?;
            let event = parse_memberstack(body)?;
            let record =
                envelope::memberstack(&delivery.id, delivery.timestamp, &event, received_at);
            (record, &state.memberstack_topic)
        }
        Source::Stripe => {
            let verifier = state.stripe.as_ref().ok_or(Rejection::NotConfigured)?;
            let delivery = verifier.verify(headers, body, now)?;
            let event = parse_stripe(body)?;
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

/// Reads the body into `buf` (the slot's buffer): at most `limit` bytes by `deadline`. A
/// declared or actual larger body is refused without reading the rest, and so is one that
/// the gate sheds while it is silent.
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    deadline: tokio::time::Instant,
    reading: &BodyRead,
    buf: &mut Vec<u8>,
) -> Result<(), Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Rejection::TooLarge(limit));
    }
    buf.clear();
    // Never beyond the limit: no doubling past it.
    buf.reserve_exact(declared.unwrap_or(0) as usize);
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| Rejection::BodyRead)?.into_data() else {
                continue;
            };
            reading.progressed();
            let needed = buf.len() + data.len();
            if needed > limit {
                return Err(Rejection::TooLarge(limit));
            }
            if needed > buf.capacity() {
                let target = (buf.capacity() * 2).clamp(needed, limit);
                buf.reserve_exact(target - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    tokio::select! {
        read = read => read,
        () = reading.shed() => Err(Rejection::SilentBodyShed),
        () = tokio::time::sleep_until(deadline) => Err(Rejection::BodyTimeout),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
