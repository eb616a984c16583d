//! Memberstack Admin REST API client (docs/external-services.md §2): `X-API-KEY`, JSON bodies,
//! a 25 requests/second limit per key/IP that answers 429 beyond it.
//!
//! Every attempt, retries included, first takes a permit from one send budget shared by all
//! clones of the client (`budget.rs`), so the daemon itself never provokes a 429; a 429 from
//! elsewhere (another process on the same key) pauses the whole client for its `Retry-After`,
//! and 429 and 5xx are retried with backoff.

mod budget;
mod metrics;
mod types;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use tracing::Instrument;

use crate::config::MemberstackConfig;
use crate::sinks::retry::{self, Failure, RetryPolicy};

use budget::SendBudget;
use metrics::MemberstackMetrics;
pub use types::{Member, MemberPage, MemberstackError};

/// Largest page `GET /members` serves (higher values are capped by Memberstack anyway).
pub const MAX_PAGE_SIZE: u32 = 100;

/// Cheap to clone: all clones share one HTTP connection pool and one send budget.
#[derive(Clone)]
pub struct MemberstackClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `api_url` without a trailing slash.
    base: String,
    /// Marked sensitive, so hyper and `Debug` never print it.
    api_key: HeaderValue,
    budget: SendBudget,
    requests_per_second: u32,
    policy: RetryPolicy,
    metrics: MemberstackMetrics,
}

impl std::fmt::Debug for MemberstackClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberstackClient")
            .field("api_url", &self.inner.base)
            .field("api_key", &"[redacted]")
            .field("requests_per_second", &self.inner.requests_per_second)
            .field("max_attempts", &self.inner.policy.max_attempts)
            .finish()
    }
}

/// Routes as metric labels and span fields: templated, never a member id or email.
mod route {
    pub const GET_MEMBER: &str = "GET /members/:id";
    pub const LIST_MEMBERS: &str = "GET /members";
    pub const CREATE_MEMBER: &str = "POST /members";
    pub const UPDATE_MEMBER: &str = "PATCH /members/:id";
    pub const DELETE_MEMBER: &str = "DELETE /members/:id";
    pub const ADD_PLAN: &str = "POST /members/:id/add-plan";
    pub const REMOVE_PLAN: &str = "POST /members/:id/remove-plan";
}

impl MemberstackClient {
    pub fn new(
        cfg: &MemberstackConfig,
        metrics: Option<&prometheus::Registry>,
    ) -> Result<Self, MemberstackError> {
        let key = cfg
            .api_key
            .as_ref()
            .ok_or(MemberstackError::NotConfigured)?;
        let mut api_key = HeaderValue::from_str(key.expose_secret().trim())
            .map_err(|_| MemberstackError::NotConfigured)?;
        api_key.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout())
            .user_agent(concat!("membersync/", env!("CARGO_PKG_VERSION")))
            .redirect(crate::config::same_origin_redirects())
            .build()
            .map_err(|e| MemberstackError::Transport(retry::transport_message(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: cfg.api_url.trim_end_matches('/').to_string(),
                api_key,
                budget: SendBudget::per_second(cfg.requests_per_second),
                requests_per_second: cfg.requests_per_second.max(1),
                policy: RetryPolicy::new(
                    cfg.max_attempts,
                    Duration::from_millis(cfg.backoff_base_ms),
                    Duration::from_millis(cfg.backoff_max_ms),
                ),
                metrics: MemberstackMetrics::new(metrics),
            }),
        })
    }

    /// `GET /members/:id_or_email`. A miss is `Ok(None)`, whether Memberstack says so with
    /// `{data: null}` (what the SDK documents) or with a 404.
    pub async fn get_member(&self, id_or_email: &str) -> Result<Option<Member>, MemberstackError> {
        let path = format!("/members/{}", encode_segment(id_or_email));
        let body = self
            .call(
                Method::GET,
                route::GET_MEMBER,
                &path,
                &[],
                None,
                Miss::IsNone,
            )
            .await?;
        match body {
            None => Ok(None),
            Some(bytes) => decode_data(&bytes),
        }
    }

    /// `GET /members?first=<limit>&after=<after>&order=ASC[&includeJSON=true]`. `limit` is
    /// clamped to 1..=100.
    pub async fn list_members(
        &self,
        after: Option<u64>,
        limit: u32,
        include_json: bool,
    ) -> Result<MemberPage, MemberstackError> {
        let mut query = vec![
            ("first", limit.clamp(1, MAX_PAGE_SIZE).to_string()),
            ("order", "ASC".to_string()),
        ];
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        if include_json {
            query.push(("includeJSON", "true".to_string()));
        }
        let bytes = self
            .call(
                Method::GET,
                route::LIST_MEMBERS,
                "/members",
                &query,
                None,
                Miss::IsError,
            )
            .await?
            .unwrap_or_default();
        let body: Value =
            serde_json::from_slice(&bytes).map_err(|e| MemberstackError::Decode(e.to_string()))?;
        MemberPage::from_value(body, after).map_err(MemberstackError::Decode)
    }

    /// `PATCH /members/:id` with `patch` as given. Memberstack shallow-merges `customFields`
    /// and `metaData`, and replaces `json` whole.
    pub async fn update_member(
        &self,
        id: &str,
        patch: &Map<String, Value>,
    ) -> Result<Member, MemberstackError> {
        let path = format!("/members/{}", encode_segment(id));
        let body = Value::Object(patch.clone());
        let bytes = self
            .call(
                Method::PATCH,
                route::UPDATE_MEMBER,
                &path,
                &[],
                Some(&body),
                Miss::IsError,
            )
            .await?
            .unwrap_or_default();
        decode_data(&bytes)?.ok_or_else(|| MemberstackError::Decode("`data` is null".into()))
    }

    /// `POST /members`. Not idempotent: a retry after a lost answer may fail with the
    /// duplicate-email error; callers resolve that by looking the member up.
    pub async fn create_member(&self, body: &Value) -> Result<Member, MemberstackError> {
        let bytes = self
            .call(
                Method::POST,
                route::CREATE_MEMBER,
                "/members",
                &[],
                Some(body),
                Miss::IsError,
            )
            .await?
            .unwrap_or_default();
        decode_data(&bytes)?.ok_or_else(|| MemberstackError::Decode("`data` is null".into()))
    }

    /// `DELETE /members/:id`. A 404 counts as done: the member is gone either way (and a retry
    /// after a lost answer would otherwise fail).
    pub async fn delete_member(&self, id: &str) -> Result<(), MemberstackError> {
        let path = format!("/members/{}", encode_segment(id));
        self.call(
            Method::DELETE,
            route::DELETE_MEMBER,
            &path,
            &[],
            None,
            Miss::IsNone,
        )
        .await
        .map(drop)
    }

    /// `POST /members/:id/add-plan` (free plans only). The answer is plain text `OK`.
    pub async fn add_free_plan(&self, id: &str, plan_id: &str) -> Result<(), MemberstackError> {
        let path = format!("/members/{}/add-plan", encode_segment(id));
        let body = serde_json::json!({ "planId": plan_id });
        self.call(
            Method::POST,
            route::ADD_PLAN,
            &path,
            &[],
            Some(&body),
            Miss::IsError,
        )
        .await
        .map(drop)
    }

    /// `POST /members/:id/remove-plan` (free plans only). The answer is plain text `OK`.
    pub async fn remove_free_plan(&self, id: &str, plan_id: &str) -> Result<(), MemberstackError> {
        let path = format!("/members/{}/remove-plan", encode_segment(id));
        let body = serde_json::json!({ "planId": plan_id });
        self.call(
            Method::POST,
            route::REMOVE_PLAN,
            &path,
            &[],
            Some(&body),
            Miss::IsError,
        )
        .await
        .map(drop)
    }

    /// One logical call: attempts with retries, under one span. Returns the raw 2xx body
    /// (callers decide whether it is JSON), or `None` for a 404 when `miss` allows it.
    async fn call(
        &self,
        method: Method,
        route: &'static str,
        path: &str,
        query: &[(&'static str, String)],
        body: Option<&Value>,
        miss: Miss,
    ) -> Result<Option<bytes::Bytes>, MemberstackError> {
        let span = tracing::info_span!(
            "memberstack",
            route,
            status = tracing::field::Empty,
            attempts = tracing::field::Empty
        );
        let url = format!("{}{}", self.inner.base, path);
        // Atomic, not Cell: the future must stay Send.
        let attempts = AtomicU32::new(0);
        let result = self
            .inner
            .policy
            .run(
                |attempt| {
                    attempts.store(attempt, Ordering::Relaxed);
                    self.attempt(method.clone(), route, &url, query, body, miss)
                },
                |attempt, err, delay| {
                    self.inner.metrics.retries.inc();
                    tracing::warn!(attempt, error = %err, delay_ms = delay.as_millis() as u64, "retrying Memberstack request");
                },
            )
            .instrument(span.clone())
            .await;
        span.record("attempts", attempts.load(Ordering::Relaxed));
        if let Err(err) = &result {
            span.in_scope(|| tracing::debug!(error = %err, "Memberstack request failed"));
        }
        result
    }

    async fn attempt(
        &self,
        method: Method,
        route: &'static str,
        url: &str,
        query: &[(&'static str, String)],
        body: Option<&Value>,
        miss: Miss,
    ) -> Result<Option<bytes::Bytes>, Failure<MemberstackError>> {
        let inner = &*self.inner;
        let waited = Instant::now();
        inner.budget.acquire().await;
        inner
            .metrics
            .limiter_wait
            .observe(waited.elapsed().as_secs_f64());

        let mut request = inner
            .http
            .request(method, url)
            .header("X-API-KEY", inner.api_key.clone());
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let started = Instant::now();
        let outcome = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = retry::retry_after_header(response.headers());
                response.bytes().await.map(|b| (status, retry_after, b))
            }
            Err(err) => Err(err),
        };
        let elapsed = started.elapsed().as_secs_f64();
        inner
            .metrics
            .duration
            .with_label_values(&[route])
            .observe(elapsed);

        let span = tracing::Span::current();
        let (status, retry_after, bytes) = match outcome {
            Ok(parts) => parts,
            Err(err) => {
                let (label, error) = transport_error(err);
                span.record("status", label);
                inner
                    .metrics
                    .requests
                    .with_label_values(&[route, label])
                    .inc();
                return Err(Failure::retryable(error, None));
            }
        };
        span.record("status", status);
        let status_label = status.to_string();
        inner
            .metrics
            .requests
            .with_label_values(&[route, status_label.as_str()])
            .inc();
        match status {
            200..=299 => Ok(Some(bytes)),
            404 if miss == Miss::IsNone => Ok(None),
            429 => {
                inner.metrics.rate_limited.inc();
                inner.budget.pause(retry_after);
                Err(Failure::retryable(
                    MemberstackError::RateLimited { retry_after },
                    retry_after,
                ))
            }
            _ => {
                let error = MemberstackError::from_body(status, &bytes);
                match retry::classify_status(status) {
                    retry::Class::Retryable => Err(Failure::retryable(error, retry_after)),
                    retry::Class::Permanent => Err(Failure::permanent(error)),
                }
            }
        }
    }
}

/// How a 404 is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    IsNone,
    IsError,
}

/// Maps a reqwest error without its URL (which can hold an email) into our error and a
/// metric label.
fn transport_error(err: reqwest::Error) -> (&'static str, MemberstackError) {
    if err.is_timeout() {
        ("timeout", MemberstackError::Timeout)
    } else {
        (
            "transport",
            MemberstackError::Transport(retry::transport_message(err)),
        )
    }
}

/// Decodes `{ data: Member | null }`.
fn decode_data(bytes: &[u8]) -> Result<Option<Member>, MemberstackError> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        data: Option<Member>,
    }
    serde_json::from_slice::<Envelope>(bytes)
        .map(|e| e.data)
        .map_err(|e| MemberstackError::Decode(e.to_string()))
}

/// Percent-encodes a path segment like JavaScript's `encodeURIComponent` (what the SDK uses):
/// `@` → `%40`, `+` → `%2B`, `/` → `%2F`, so an email is one segment and decodes back intact.
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
