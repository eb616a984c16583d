//! One POST of an outcome to a Make.com custom webhook (docs/external-services.md §6), and what
//! its answer means: 2xx delivered; 408, 429, 5xx, timeouts and connection errors worth another
//! attempt; every other answer permanent (a deactivated or deleted hook, a bad URL).
//!
//! Make answers `200 Accepted` as soon as the request is in the hook's queue, so a 2xx means
//! "stored by Make", which is the durability the bridge waits for before committing.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};

use super::route::{OutcomeHead, Target};
use crate::sinks::retry::{self, Class};

/// The header Make scenarios can deduplicate on: the change's event id, the same on every
/// redelivery and re-announcement of the outcome.
pub const EVENT_ID_HEADER: &str = "x-membersync-event-id";
pub const OUTCOME_ID_HEADER: &str = "x-membersync-outcome-id";
pub const STATUS_HEADER: &str = "x-membersync-status";
pub const EVENT_TYPE_HEADER: &str = "x-membersync-event-type";
pub const ROUTE_HEADER: &str = "x-membersync-route";
pub const ATTEMPT_HEADER: &str = "x-membersync-attempt";

/// Error bodies are kept this short in logs and dead letters.
const BODY_EXCERPT: usize = 256;

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttemptError {
    #[error("Make.com answered {status}: {body}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused or reset, DNS, TLS (never the URL: it holds the token).
    #[error("connection error: {0}")]
    Transport(String),
}

/// Statuses worth another attempt: 408 (Make's edge timed out waiting for us), 429, 5xx.
pub fn classify_status(status: u16) -> Class {
    match status {
        408 | 429 | 500..=599 => Class::Retryable,
        _ => Class::Permanent,
    }
}

impl AttemptError {
    pub fn class(&self) -> Class {
        match self {
            Self::Status { status, .. } => classify_status(*status),
            Self::Timeout(_) | Self::Transport(_) => Class::Retryable,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Metric label and dead-letter kind: the status code, `timeout` or `transport`.
    pub fn label(&self) -> String {
        match self {
            Self::Status { status, .. } => status.to_string(),
            Self::Timeout(_) => "timeout".into(),
            Self::Transport(_) => "transport".into(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Status { .. } => "http_status",
            Self::Timeout(_) => "timeout",
            Self::Transport(_) => "transport",
        }
    }
}

#[derive(Clone)]
pub struct MakeClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl MakeClient {
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("membersync/", env!("CARGO_PKG_VERSION")))
            // A POST that is redirected would be replayed as a GET elsewhere: a webhook URL
            // that redirects is a misconfiguration, reported as its 3xx (permanent).
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, timeout })
    }

    /// POSTs `body` (the outcome record as merge published it) to `target`.
    pub async fn post(
        &self,
        target: &Target,
        outcome: &OutcomeHead,
        body: Bytes,
        attempt: u32,
    ) -> Result<u16, AttemptError> {
        let response = self
            .http
            .post(target.url.clone())
            .headers(headers(target, outcome, attempt))
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(status);
        }
        let retry_after = retry::retry_after_header(response.headers());
        let text = response.text().await.unwrap_or_default();
        Err(AttemptError::Status {
            status,
            retry_after,
            body: excerpt(&text),
        })
    }

    fn transport(&self, e: reqwest::Error) -> AttemptError {
        if e.is_timeout() {
            AttemptError::Timeout(self.timeout)
        } else {
            // `transport_message` drops the URL reqwest would print.
            AttemptError::Transport(retry::transport_message(e))
        }
    }
}

fn headers(target: &Target, outcome: &OutcomeHead, attempt: u32) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut put = |name: &'static str, value: &str| {
        // Values come from our own records; one that is not a valid header value is left
        // out rather than failing the delivery (the body carries every field anyway).
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    put(EVENT_ID_HEADER, &outcome.event_id);
    put(OUTCOME_ID_HEADER, &outcome.id);
    put(STATUS_HEADER, &outcome.status);
    put(EVENT_TYPE_HEADER, &outcome.event_type);
    put(ROUTE_HEADER, &target.route);
    put(ATTEMPT_HEADER, &attempt.to_string());
    h
}

fn excerpt(text: &str) -> String {
    let text = text.trim();
    if text.len() <= BODY_EXCERPT {
        return text.to_owned();
    }
    let mut end = BODY_EXCERPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_make_answers() {
        for s in [408, 429, 500, 502, 503, 504, 520, 599] {
            assert_eq!(classify_status(s), Class::Retryable, "{s}");
        }
        for s in [301, 302, 400, 401, 403, 404, 405, 410, 413, 422] {
            assert_eq!(classify_status(s), Class::Permanent, "{s}");
        }
        assert_eq!(
            AttemptError::Timeout(Duration::from_secs(1)).class(),
            Class::Retryable
        );
        assert_eq!(
            AttemptError::Transport("connection refused".into()).class(),
            Class::Retryable
        );
        let gone = AttemptError::Status {
            status: 410,
            retry_after: None,
            body: "There is no scenario listening for this webhook.".into(),
        };
        assert_eq!(gone.class(), Class::Permanent);
        assert_eq!(gone.label(), "410");
        assert_eq!(gone.kind(), "http_status");
    }

    #[test]
    fn long_bodies_are_cut_on_a_char_boundary() {
        let body = "é".repeat(300);
        let cut = excerpt(&body);
        assert!(cut.len() <= BODY_EXCERPT + "…".len());
        assert!(cut.ends_with('…'));
    }
}
