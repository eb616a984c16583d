//! Client of Supabase Auth's (GoTrue) admin API, `/auth/v1/admin/users`, with the service-role
//! key (docs/external-services.md §8.6). Merge creates the auth user of a new member and keeps
//! its email and `user_metadata` current.
//!
//! GoTrue has no request rate limit for the service role that membersync could hit at merge's
//! pace, so there is no limiter here; 429/5xx/transport errors are retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::SupabaseConfig;
use crate::sinks::retry::{self, Failure, RetryPolicy};

/// Backoff cap: `[supabase]` has no `backoff_max_ms`, and with the default 3 attempts the cap
/// is never reached anyway.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Body of `POST /auth/v1/admin/users`.
#[derive(Clone, Serialize)]
pub struct CreateUser {
    pub email: String,
    /// `true`: the user is created confirmed (Memberstack already owns the identity), and
    /// GoTrue sends no confirmation email.
    pub email_confirm: bool,
    pub user_metadata: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_metadata: Option<Value>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "expose_password"
    )]
    pub password: Option<SecretString>,
}

impl std::fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUser")
            .field("email", &self.email)
            .field("email_confirm", &self.email_confirm)
            .field("user_metadata", &self.user_metadata)
            .field("app_metadata", &self.app_metadata)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

fn expose_password<S: serde::Serializer>(
    p: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_some(p.expose_secret()),
        None => s.serialize_none(),
    }
}

/// A GoTrue user as returned; `raw` is the whole object.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthUser {
    pub id: Uuid,
    pub email: Option<String>,
    pub user_metadata: Value,
    pub app_metadata: Value,
    pub raw: Value,
}

impl AuthUser {
    fn from_value(raw: Value) -> Result<Self, AuthError> {
        // Older GoTrue wrapped the user as `{user: {...}}` in some answers.
        let raw = match raw {
            Value::Object(mut map)
                if !map.contains_key("id") && map.get("user").is_some_and(Value::is_object) =>
            {
                map.remove("user").unwrap_or_default()
            }
            other => other,
        };
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| AuthError::Decode("user without a UUID `id`".into()))?;
        let field = |k: &str| {
            raw.get(k)
                .cloned()
                .unwrap_or(Value::Object(Default::default()))
        };
        Ok(Self {
            id,
            email: raw
                .get("email")
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty())
                .map(str::to_string),
            user_metadata: field("user_metadata"),
            app_metadata: field("app_metadata"),
            raw,
        })
    }
}

/// A failed Auth admin call. Never carries the service-role key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A user with this email exists already (422 `email_exists`).
    #[error("a Supabase auth user with this email already exists")]
    EmailExists,
    #[error("Supabase Auth answered {status}{}: {message}", error_code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        status: u16,
        error_code: Option<String>,
        message: String,
    },
    #[error("Supabase Auth request timed out")]
    Timeout,
    #[error("Supabase Auth transport error: {0}")]
    Transport(String),
    #[error("unexpected Supabase Auth response body: {0}")]
    Decode(String),
    /// `[supabase] url` or `service_role_key` is unset (or unusable).
    #[error("Supabase Auth is not configured (url and service_role_key)")]
    NotConfigured,
}

impl AuthError {
    /// 429, 500/502/503/504, timeouts and transport errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { status, .. } => retry::classify_status(*status) == retry::Class::Retryable,
            Self::Timeout | Self::Transport(_) => true,
            Self::EmailExists | Self::Decode(_) | Self::NotConfigured => false,
        }
    }

    /// GoTrue's error shapes: `{code, error_code, msg}` (current), `{error, error_description}`
    /// (older, OAuth-style) and `{message}` (the API gateway).
    fn from_body(status: u16, body: &[u8]) -> Self {
        let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let text = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_string);
        let error_code = text("error_code").or_else(|| text("error"));
        let message = text("msg")
            .or_else(|| text("error_description"))
            .or_else(|| text("message"))
            .or_else(|| text("error"))
            .or_else(|| {
                let s = String::from_utf8_lossy(body)
                    .trim()
                    .chars()
                    .take(300)
                    .collect::<String>();
                (!s.is_empty()).then_some(s)
            })
            .unwrap_or_else(|| format!("HTTP {status}"));
        let exists = error_code.as_deref() == Some("email_exists")
            || ((status == 422 || status == 400) && message.contains("already been registered"));
        if exists {
            Self::EmailExists
        } else {
            Self::Api {
                status,
                error_code,
                message,
            }
        }
    }
}

/// Cheap to clone.
#[derive(Clone)]
pub struct SupabaseAuthClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{url}/auth/v1/admin/users`
    users_url: String,
    /// `Bearer <key>` and `<key>`, both marked sensitive.
    bearer: HeaderValue,
    apikey: HeaderValue,
    policy: RetryPolicy,
}

impl std::fmt::Debug for SupabaseAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupabaseAuthClient")
            .field("users_url", &self.inner.users_url)
            .field("service_role_key", &"[redacted]")
            .finish()
    }
}

impl SupabaseAuthClient {
    pub fn new(cfg: &SupabaseConfig) -> Result<Self, AuthError> {
        let url = cfg
            .url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or(AuthError::NotConfigured)?;
        let key = cfg
            .service_role_key
            .as_ref()
            .ok_or(AuthError::NotConfigured)?;
        let key = key.expose_secret().trim();
        let sensitive = |v: String| {
            HeaderValue::from_str(&v)
                .map(|mut h| {
                    h.set_sensitive(true);
                    h
                })
                .map_err(|_| AuthError::NotConfigured)
        };
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout())
            .user_agent(concat!("membersync/", env!("CARGO_PKG_VERSION")))
            .redirect(crate::config::same_origin_redirects())
            .build()
            .map_err(|e| AuthError::Transport(retry::transport_message(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                users_url: format!("{}/auth/v1/admin/users", url.trim_end_matches('/')),
                bearer: sensitive(format!("Bearer {key}"))?,
                apikey: sensitive(key.to_string())?,
                policy: RetryPolicy::new(
                    cfg.max_attempts,
                    Duration::from_millis(cfg.backoff_base_ms),
                    BACKOFF_MAX,
                ),
            }),
        })
    }

    /// `POST /auth/v1/admin/users`. Not idempotent: if an answer is lost and the retry finds
    /// the user created, the result is `EmailExists`; callers look the user up then.
    pub async fn create_user(&self, req: &CreateUser) -> Result<AuthUser, AuthError> {
        let body = serde_json::to_value(req).map_err(|e| AuthError::Decode(e.to_string()))?;
        let url = self.inner.users_url.clone();
        let bytes = self
            .call(Method::POST, "POST /admin/users", url, Some(&body), false)
            .await?;
        decode_user(bytes)
    }

    /// `PUT /auth/v1/admin/users/:id` with `body` as given (e.g. `{email, user_metadata}`;
    /// GoTrue merges `user_metadata` keys into the existing object).
    pub async fn update_user(&self, id: Uuid, body: &Value) -> Result<AuthUser, AuthError> {
        let url = format!("{}/{id}", self.inner.users_url);
        let bytes = self
            .call(Method::PUT, "PUT /admin/users/:id", url, Some(body), false)
            .await?;
        decode_user(bytes)
    }

    /// `GET /auth/v1/admin/users/:id`; 404 (`user_not_found`) is `Ok(None)`.
    pub async fn get_user(&self, id: Uuid) -> Result<Option<AuthUser>, AuthError> {
        let url = format!("{}/{id}", self.inner.users_url);
        match self
            .call(Method::GET, "GET /admin/users/:id", url, None, true)
            .await?
        {
            Some(bytes) => decode_user(Some(bytes)).map(Some),
            None => Ok(None),
        }
    }

    /// `DELETE /auth/v1/admin/users/:id` (hard delete). A 404 counts as done.
    pub async fn delete_user(&self, id: Uuid) -> Result<(), AuthError> {
        let url = format!("{}/{id}", self.inner.users_url);
        self.call(Method::DELETE, "DELETE /admin/users/:id", url, None, true)
            .await
            .map(drop)
    }

    async fn call(
        &self,
        method: Method,
        route: &'static str,
        url: String,
        body: Option<&Value>,
        not_found_is_none: bool,
    ) -> Result<Option<bytes::Bytes>, AuthError> {
        let span = tracing::info_span!("supabase_auth", route, status = tracing::field::Empty);
        self.inner
            .policy
            .run(
                |_| self.attempt(method.clone(), &url, body, not_found_is_none),
                |attempt, err, delay| {
                    tracing::warn!(attempt, error = %err, delay_ms = delay.as_millis() as u64, "retrying Supabase Auth request");
                },
            )
            .instrument(span)
            .await
    }

    async fn attempt(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        not_found_is_none: bool,
    ) -> Result<Option<bytes::Bytes>, Failure<AuthError>> {
        let inner = &*self.inner;
        let mut request = inner
            .http
            .request(method, url)
            .header(reqwest::header::AUTHORIZATION, inner.bearer.clone())
            .header("apikey", inner.apikey.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        let span = tracing::Span::current();
        let sent = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = retry::retry_after_header(response.headers());
                response.bytes().await.map(|b| (status, retry_after, b))
            }
            Err(err) => Err(err),
        };
        let (status, retry_after, bytes) = match sent {
            Ok(parts) => parts,
            Err(err) if err.is_timeout() => {
                span.record("status", "timeout");
                return Err(Failure::retryable(AuthError::Timeout, None));
            }
            Err(err) => {
                span.record("status", "transport");
                return Err(Failure::retryable(
                    AuthError::Transport(retry::transport_message(err)),
                    None,
                ));
            }
        };
        span.record("status", status);
        match status {
            200..=299 => Ok(Some(bytes)),
            404 if not_found_is_none => Ok(None),
            _ => {
                let error = AuthError::from_body(status, &bytes);
                match retry::classify_status(status) {
                    retry::Class::Retryable => Err(Failure::retryable(error, retry_after)),
                    retry::Class::Permanent => Err(Failure::permanent(error)),
                }
            }
        }
    }
}

fn decode_user(bytes: Option<bytes::Bytes>) -> Result<AuthUser, AuthError> {
    let bytes = bytes.unwrap_or_default();
    let raw: Value =
        serde_json::from_slice(&bytes).map_err(|e| AuthError::Decode(e.to_string()))?;
    AuthUser::from_value(raw)
}

#[cfg(test)]
mod tests;
