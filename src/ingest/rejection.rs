//! Every way a webhook request can be turned away, with its HTTP status, a stable reason
//! label (metrics) and a JSON body `{error:{code,message}}` that never echoes secrets,
//! signatures or the body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::event::ParseError;
use super::verify::VerifyError;
use crate::kafka::producer::ProduceError;

/// Seconds a sender should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("this webhook source is not configured on this server")]
    NotConfigured,
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    #[error("could not read the request body")]
    BodyRead,
    #[error("{0}")]
    Verify(#[from] VerifyError),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("the event queue is unavailable; retry later")]
    KafkaUnavailable,
    #[error("the event could not be stored")]
    KafkaRejected,
    #[error("the request took too long")]
    Timeout,
    #[error("the body did not arrive in time")]
    BodyTimeout,
    #[error("the server is busy; retry later")]
    Overloaded,
    #[error("the body arrived too slowly while the server was busy; retry later")]
    SilentBodyShed,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotConfigured => StatusCode::NOT_FOUND,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyRead | Self::Parse(_) => StatusCode::BAD_REQUEST,
            Self::Verify(_) => StatusCode::UNAUTHORIZED,
            Self::KafkaUnavailable | Self::Overloaded | Self::SilentBodyShed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // Retrying the same bytes cannot help, but a 5xx keeps the sender's copy alive
            // for an operator to fix (e.g. raise the topic's max.message.bytes).
            Self::KafkaRejected => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout | Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Stable snake_case label: the `reason` of `membersync_ingest_requests_total` and the
    /// `code` of the JSON error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotConfigured => "source_not_configured",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::TooLarge(_) => "payload_too_large",
            Self::BodyRead => "body_unreadable",
            Self::Verify(e) => e.reason(),
            Self::Parse(e) => e.reason(),
            Self::KafkaUnavailable => "kafka_unavailable",
            Self::KafkaRejected => "kafka_rejected",
            Self::Timeout => "request_timeout",
            Self::BodyTimeout => "body_read_timeout",
            Self::Overloaded => "overloaded",
            Self::SilentBodyShed => "shed_silent_body",
        }
    }

    pub fn from_produce(err: &ProduceError) -> Self {
        if err.is_retryable() {
            Self::KafkaUnavailable
        } else {
            Self::KafkaRejected
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.reason(), "message": self.to_string()}}));
        let mut response = (self.status(), body).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}
