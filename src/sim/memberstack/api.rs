//! The Admin REST API routes (docs/external-services.md §2).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::Inner;
use super::model::{MemberPatch, NewMember, PlanChange};
use crate::sim::SimError;
use crate::sim::server::api_middleware;

const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 100;

/// `{code, message}`, the Admin API's error body.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

pub(crate) fn sim_error(e: SimError) -> Response {
    match e {
        SimError::MemberNotFound(_) => error(
            StatusCode::NOT_FOUND,
            "member-not-found",
            "There is no member with this identifier.",
        ),
        SimError::EmailInUse(_) => error(
            StatusCode::BAD_REQUEST,
            "email-already-in-use",
            "This email is already in use.",
        ),
        SimError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad-request", &m),
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-server-error",
            &other.to_string(),
        ),
    }
}

/// Errors are boxed responses: `Response` is large and these are cold paths.
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            &format!("invalid body: {e}"),
        ))
    })
}

pub(crate) fn routes(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/members", get(list).post(create))
        .route("/members/{id}", get(get_one).patch(update).delete(delete))
        .route("/members/{id}/add-plan", post(add_plan))
        .route("/members/{id}/remove-plan", post(remove_plan))
        // Innermost first: the key check runs after rate limit and faults (outer layer).
        .route_layer(middleware::from_fn_with_state(inner.clone(), require_key))
        .route_layer(middleware::from_fn_with_state(
            inner.clone(),
            api_middleware::<Inner>,
        ))
        .with_state(inner)
}

async fn require_key(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get("x-api-key")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let expected = inner.config.api_key.expose_secret().as_bytes();
    if given.is_empty() || !bool::from(given.ct_eq(expected)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid-api-key",
            "The API key is missing or invalid.",
        );
    }
    next.run(request).await
}

fn number(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, Box<Response>> {
    q.get(key)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    &format!("`{key}` must be a non-negative integer"),
                ))
            })
        })
        .transpose()
}

async fn list(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (first, limit, after) = match (
        number(&q, "first"),
        number(&q, "limit"),
        number(&q, "after"),
    ) {
        (Ok(f), Ok(l), Ok(a)) => (f, l, a),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return *r,
    };
    let size = first.or(limit).map_or(DEFAULT_PAGE, |n| {
        usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE)
    });
    let descending = q
        .get("order")
        .is_some_and(|o| o.eq_ignore_ascii_case("DESC"));
    let include_json = q.get("includeJSON").is_some_and(|v| v == "true");
    let page = inner.store().page(after.unwrap_or(0), size, descending);
    let data: Vec<Value> = page
        .members
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
            if !include_json && let Some(o) = v.as_object_mut() {
                o.remove("json");
            }
            v
        })
        .collect();
    Json(json!({
        "totalCount": page.total,
        "endCursor": page.end_cursor,
        "hasNextPage": page.has_next,
        "data": data,
    }))
    .into_response()
}

async fn get_one(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    let member = inner.store().find(&id).cloned();
    Json(json!({"data": member})).into_response()
}

async fn create(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let new: NewMember = match parse(&body) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    if new.email.as_deref().is_none_or(|e| e.trim().is_empty()) {
        return error(StatusCode::BAD_REQUEST, "bad-request", "email is required");
    }
    if new.password.as_deref().is_none_or(str::is_empty) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "password is required",
        );
    }
    match inner.store().create(new) {
        Ok(m) => Json(json!({"data": m})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn update(State(inner): State<Arc<Inner>>, Path(id): Path<String>, body: Bytes) -> Response {
    let patch: MemberPatch = match parse(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match inner.store().update(&id, &patch) {
        Ok(m) => Json(json!({"data": m})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn delete(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    match inner.store().delete(&id) {
        Ok(()) => Json(json!({"data": {"id": id}})).into_response(),
        Err(e) => sim_error(e),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlanBody {
    plan_id: Option<String>,
}

fn plan_id(body: &Bytes) -> Result<String, Box<Response>> {
    parse::<PlanBody>(body)?
        .plan_id
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "planId is required",
            ))
        })
}

/// The SDK documents these answers as plain text `OK`, not JSON.
fn ok_text() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "OK").into_response()
}

async fn add_plan(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let plan_id = match plan_id(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let change = PlanChange::Add {
        plan_id,
        plan_name: None,
        plan_type: Some("FREE".into()),
        status: Some("ACTIVE".into()),
    };
    match inner.store().change_plan(&id, change, false) {
        Ok(_) => ok_text(),
        Err(e) => sim_error(e),
    }
}

async fn remove_plan(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let plan_id = match plan_id(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match inner
        .store()
        .change_plan(&id, PlanChange::Cancel { plan_id }, true)
    {
        Ok(_) => ok_text(),
        Err(e) => sim_error(e),
    }
}
