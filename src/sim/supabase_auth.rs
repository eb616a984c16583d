//! Supabase Auth (GoTrue) admin API simulator, backed by the real `auth.users` table of a
//! Postgres database (docs/external-services.md §8.1, §8.6, `scripts/supabase-bootstrap.sql`),
//! so that triggers, RLS and CDC see exactly what a real GoTrue would write.
//!
//! Routes: `POST/GET /auth/v1/admin/users`, `GET/PUT/DELETE /auth/v1/admin/users/{id}`.
//! Errors have GoTrue's shape `{code, error_code, msg}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use tokio_postgres::{Client, NoTls, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::SimError;
use super::faults::{FailSpec, Faults, FaultsSnapshot};
use super::observe::{ApiCall, CallLog, Stats};
use super::server::{ApiFront, Server, api_middleware, control_routes};

/// Settings of an [`AuthSim`].
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Listen address; `None` = `127.0.0.1:0`.
    pub addr: Option<SocketAddr>,
    /// tokio-postgres connection string of a role that may write `auth.users` (a superuser
    /// or the database owner; GoTrue's own role is `supabase_auth_admin`).
    pub database_url: SecretString,
    /// The key expected in `Authorization: Bearer …` and `apikey`.
    pub service_role_key: SecretString,
}

impl AuthConfig {
    pub fn new(database_url: impl Into<String>, service_role_key: impl Into<String>) -> Self {
        Self {
            addr: None,
            database_url: SecretString::from(database_url.into()),
            service_role_key: SecretString::from(service_role_key.into()),
        }
    }
}

struct Inner {
    config: AuthConfig,
    /// Replaced by a new connection when the database dropped it (a Postgres restart), as
    /// GoTrue's pool reconnects.
    db: tokio::sync::Mutex<Arc<Client>>,
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
        error(status, "unexpected_failure", "Injected failure (simulator)")
    }
    fn route_template(&self, path: &str) -> String {
        match path.strip_prefix("/auth/v1/admin/users/") {
            Some(rest) if !rest.is_empty() => "/auth/v1/admin/users/{id}".into(),
            _ => path.to_owned(),
        }
    }
    fn rate_limited_response(&self) -> Response {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            "over_request_rate_limit",
            "Request rate limit reached",
        )
    }
}

async fn connect(config: &AuthConfig, shutdown: &CancellationToken) -> Result<Client, SimError> {
    let (db, connection) =
        tokio_postgres::connect(config.database_url.expose_secret(), NoTls).await?;
    let conn_shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            r = connection => if let Err(e) = r {
                tracing::warn!(error = %e, "auth simulator lost its database connection");
            },
            () = conn_shutdown.cancelled() => {}
        }
    });
    Ok(db)
}

impl Inner {
    /// The database connection, reconnecting once it was closed; a 500 while the database
    /// is unreachable.
    async fn client(&self) -> Result<Arc<Client>, Response> {
        let mut db = self.db.lock().await;
        if db.is_closed() {
            let fresh = connect(&self.config, &self.shutdown).await.map_err(|e| {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unexpected_failure",
                    &format!("Database error: {e}"),
                )
            })?;
            *db = Arc::new(fresh);
        }
        Ok(db.clone())
    }
}

/// GoTrue's error body.
fn error(status: StatusCode, error_code: &str, msg: &str) -> Response {
    (
        status,
        Json(json!({"code": status.as_u16(), "error_code": error_code, "msg": msg})),
    )
        .into_response()
}

fn db_error(e: &tokio_postgres::Error) -> Response {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        return email_exists();
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "unexpected_failure",
        &format!("Database error: {e}"),
    )
}

fn email_exists() -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "email_exists",
        "A user with this email address has already been registered",
    )
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "user_not_found", "User not found")
}

fn invalid_email() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "validation_failed",
        "Unable to validate email address: invalid format",
    )
}

/// A running Supabase Auth admin API simulator.
pub struct AuthSim {
    inner: Arc<Inner>,
    server: Server,
}

impl AuthSim {
    pub async fn start(config: AuthConfig) -> Result<Self, SimError> {
        let shutdown = CancellationToken::new();
        let db = connect(&config, &shutdown).await?;
        let inner = Arc::new(Inner {
            config,
            db: tokio::sync::Mutex::new(Arc::new(db)),
            faults: Faults::default(),
            calls: CallLog::default(),
            shutdown: shutdown.clone(),
        });
        let api = Router::new()
            .route("/auth/v1/admin/users", get(list).post(create))
            .route(
                "/auth/v1/admin/users/{id}",
                get(get_one).put(update).delete(delete),
            )
            .route_layer(middleware::from_fn_with_state(inner.clone(), require_key))
            .route_layer(middleware::from_fn_with_state(
                inner.clone(),
                api_middleware::<Inner>,
            ))
            .with_state(inner.clone());
        let control = control_routes::<Inner>().with_state(inner.clone());
        let server = Server::spawn(inner.config.addr, api.merge(control), shutdown).await?;
        Ok(Self { inner, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
    /// `http://127.0.0.1:<port>`, the stand-in for `https://<project>.supabase.co`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }

    pub fn stats(&self) -> Stats {
        self.inner.calls.stats()
    }
    pub fn calls(&self) -> Vec<ApiCall> {
        self.inner.calls.calls()
    }
    /// The next `count` requests answer `status` with a GoTrue error body.
    pub fn fail_next(&self, count: u32, status: u16) {
        self.inner.faults.fail_next(FailSpec {
            count,
            status,
            body: None,
        });
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

async fn require_key(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    let expected = inner.config.service_role_key.expose_secret().as_bytes();
    let matches =
        |v: Option<&[u8]>| v.is_some_and(|v| !v.is_empty() && bool::from(v.ct_eq(expected)));
    let headers = request.headers();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::as_bytes);
    let apikey = headers.get("apikey").map(|v| v.as_bytes());
    if !matches(bearer) || !matches(apikey) {
        return error(
            StatusCode::UNAUTHORIZED,
            "no_authorization",
            "This endpoint requires a valid Bearer token and apikey",
        );
    }
    next.run(request).await
}

const COLUMNS: &str = "id, aud, role, email, email_confirmed_at, confirmed_at, phone, \
    last_sign_in_at, raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous";

fn ts(row: &Row, column: &str) -> Value {
    row.get::<_, Option<DateTime<Utc>>>(column)
        .map_or(Value::Null, |t| {
            Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true))
        })
}

/// The user object GoTrue answers with.
fn user_json(row: &Row) -> Value {
    json!({
        "id": row.get::<_, Uuid>("id"),
        "aud": row.get::<_, Option<String>>("aud"),
        "role": row.get::<_, Option<String>>("role"),
        "email": row.get::<_, Option<String>>("email"),
        "email_confirmed_at": ts(row, "email_confirmed_at"),
        "confirmed_at": ts(row, "confirmed_at"),
        "phone": row.get::<_, Option<String>>("phone").unwrap_or_default(),
        "last_sign_in_at": ts(row, "last_sign_in_at"),
        "app_metadata": row.get::<_, Option<Value>>("raw_app_meta_data").unwrap_or_else(|| json!({})),
        "user_metadata": row.get::<_, Option<Value>>("raw_user_meta_data").unwrap_or_else(|| json!({})),
        "identities": [],
        "created_at": ts(row, "created_at"),
        "updated_at": ts(row, "updated_at"),
        "is_anonymous": row.get::<_, bool>("is_anonymous"),
    })
}

fn plausible_email(email: &str) -> bool {
    matches!(email.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.') && !d.contains('@'))
        && !email.chars().any(char::is_whitespace)
        && email.len() <= 255
}

/// Errors are boxed responses: `Response` is large and these are cold paths.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Box<Response>> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            &format!("Could not read request body: {e}"),
        ))
    })
}

#[derive(Deserialize)]
struct CreateUser {
    email: Option<String>,
    #[serde(default)]
    email_confirm: bool,
    #[serde(default)]
    user_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    app_metadata: Option<Map<String, Value>>,
}

async fn email_taken(db: &Client, email: &str, except: Option<Uuid>) -> Result<bool, Response> {
    db.query_opt(
        "select 1 from auth.users where lower(email) = lower($1) and deleted_at is null \
         and ($2::uuid is null or id <> $2)",
        &[&email, &except],
    )
    .await
    .map(|r| r.is_some())
    .map_err(|e| db_error(&e))
}

async fn create(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let db = match inner.client().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let req: CreateUser = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let Some(email) = req
        .email
        .map(|e| e.trim().to_lowercase())
        .filter(|e| plausible_email(e))
    else {
        return invalid_email();
    };
    match email_taken(&db, &email, None).await {
        Ok(true) => return email_exists(),
        Ok(false) => {}
        Err(r) => return r,
    }
    // GoTrue's defaults, with the caller's app_metadata merged over them.
    let mut app = json!({"provider": "email", "providers": ["email"]})
        .as_object()
        .cloned()
        .unwrap_or_default();
    app.extend(req.app_metadata.unwrap_or_default());
    let user_meta = Value::Object(req.user_metadata.unwrap_or_default());
    let sql = format!(
        "insert into auth.users (instance_id, id, aud, role, email, encrypted_password, \
           email_confirmed_at, raw_app_meta_data, raw_user_meta_data, created_at, updated_at, \
           is_super_admin, is_sso_user, is_anonymous) \
         values ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated', \
           'authenticated', $1, '', case when $2 then now() end, $3, $4, now(), now(), \
           false, false, false) \
         returning {COLUMNS}"
    );
    match db
        .query_one(
            &sql,
            &[&email, &req.email_confirm, &Value::Object(app), &user_meta],
        )
        .await
    {
        Ok(row) => Json(user_json(&row)).into_response(),
        Err(e) => db_error(&e),
    }
}

fn user_id(id: &str) -> Option<Uuid> {
    Uuid::parse_str(id).ok()
}

async fn get_one(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    let db = match inner.client().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let Some(id) = user_id(&id) else {
        return not_found();
    };
    let sql = format!("select {COLUMNS} from auth.users where id = $1");
    match db.query_opt(&sql, &[&id]).await {
        Ok(Some(row)) => Json(user_json(&row)).into_response(),
        Ok(None) => not_found(),
        Err(e) => db_error(&e),
    }
}

#[derive(Deserialize)]
struct UpdateUser {
    email: Option<String>,
    #[serde(default)]
    email_confirm: Option<bool>,
    #[serde(default)]
    user_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    app_metadata: Option<Map<String, Value>>,
}

/// GoTrue's `UpdateUserMetaData`: given keys are set, keys given as `null` are removed,
/// other keys stay (a shallow merge).
const MERGE: &str = "(coalesce({col}, '{}'::jsonb) \
    - coalesce((select array_agg(key) from jsonb_each(${p}) where value = 'null'::jsonb), '{}'::text[])) \
    || coalesce((select jsonb_object_agg(key, value) from jsonb_each(${p}) where value <> 'null'::jsonb), '{}'::jsonb)";

async fn update(State(inner): State<Arc<Inner>>, Path(id): Path<String>, body: Bytes) -> Response {
    let db = match inner.client().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let Some(id) = user_id(&id) else {
        return not_found();
    };
    let req: UpdateUser = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let email = req.email.map(|e| e.trim().to_lowercase());
    if let Some(email) = &email {
        if !plausible_email(email) {
            return invalid_email();
        }
        match email_taken(&db, email, Some(id)).await {
            Ok(true) => return email_exists(),
            Ok(false) => {}
            Err(r) => return r,
        }
    }
    let merge = |col: &str, p: u8| MERGE.replace("{col}", col).replace("{p}", &p.to_string());
    let sql = format!(
        "update auth.users set \
           email = coalesce($2, email), \
           email_confirmed_at = case when $3 then coalesce(email_confirmed_at, now()) else email_confirmed_at end, \
           raw_user_meta_data = {}, \
           raw_app_meta_data = {}, \
           updated_at = now() \
         where id = $1 returning {COLUMNS}",
        merge("raw_user_meta_data", 4),
        merge("raw_app_meta_data", 5),
    );
    let user_meta = Value::Object(req.user_metadata.unwrap_or_default());
    let app_meta = Value::Object(req.app_metadata.unwrap_or_default());
    let confirm = req.email_confirm.unwrap_or(false);
    match db
        .query_opt(&sql, &[&id, &email, &confirm, &user_meta, &app_meta])
        .await
    {
        Ok(Some(row)) => Json(user_json(&row)).into_response(),
        Ok(None) => not_found(),
        Err(e) => db_error(&e),
    }
}

async fn delete(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    let db = match inner.client().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let Some(id) = user_id(&id) else {
        return not_found();
    };
    match db
        .execute("delete from auth.users where id = $1", &[&id])
        .await
    {
        Ok(0) => not_found(),
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => db_error(&e),
    }
}

async fn list(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let db = match inner.client().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let num = |k: &str, d: i64| {
        q.get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(d)
    };
    let page = num("page", 1);
    let per_page = num("per_page", 50).min(1000);
    let sql =
        format!("select {COLUMNS} from auth.users order by created_at, id limit $1 offset $2");
    match db.query(&sql, &[&per_page, &((page - 1) * per_page)]).await {
        Ok(rows) => Json(json!({
            "users": rows.iter().map(user_json).collect::<Vec<_>>(),
            "aud": "authenticated",
        }))
        .into_response(),
        Err(e) => db_error(&e),
    }
}
