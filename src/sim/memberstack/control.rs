//! `/__sim/` endpoints of the Memberstack simulator: dashboard edits (a human changing a
//! member in Memberstack: no API key, no rate limit, not counted, but webhooks fire), member
//! state and webhook deliveries. Fault and stats endpoints come from `sim::server`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::Inner;
use super::api::{error, parse, sim_error};
use super::model::{MemberPatch, NewMember, PlanChange};
use crate::sim::server::control_routes;

pub(crate) fn routes(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/__sim/members", get(list).post(create))
        .route(
            "/__sim/members/{id}",
            get(get_one).patch(update).delete(delete),
        )
        .route("/__sim/members/{id}/plans", post(plan))
        .route("/__sim/webhooks", get(deliveries))
        .route("/__sim/webhooks/pause", post(pause))
        .route("/__sim/webhooks/resume", post(resume))
        .merge(control_routes::<Inner>())
        .with_state(inner)
}

async fn list(State(inner): State<Arc<Inner>>) -> Response {
    Json(json!({"data": inner.store().all()})).into_response()
}

async fn get_one(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    let store = inner.store();
    match store.get(&id) {
        Some(m) => Json(json!({"data": m, "lastChangedMs": store.changed_ms(&id)})).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "member-not-found",
            "There is no member with this identifier.",
        ),
    }
}

async fn create(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    match parse::<NewMember>(&body).map(|n| inner.store().create(n)) {
        Ok(Ok(m)) => Json(json!({"data": m})).into_response(),
        Ok(Err(e)) => sim_error(e),
        Err(r) => *r,
    }
}

async fn update(State(inner): State<Arc<Inner>>, Path(id): Path<String>, body: Bytes) -> Response {
    match parse::<MemberPatch>(&body).map(|p| inner.store().update(&id, &p)) {
        Ok(Ok(m)) => Json(json!({"data": m})).into_response(),
        Ok(Err(e)) => sim_error(e),
        Err(r) => *r,
    }
}

async fn delete(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    match inner.store().delete(&id) {
        Ok(()) => Json(json!({"data": {"id": id}})).into_response(),
        Err(e) => sim_error(e),
    }
}

async fn plan(State(inner): State<Arc<Inner>>, Path(id): Path<String>, body: Bytes) -> Response {
    match parse::<PlanChange>(&body).map(|c| inner.store().change_plan(&id, c, false)) {
        Ok(Ok(c)) => Json(json!({"data": c})).into_response(),
        Ok(Err(e)) => sim_error(e),
        Err(r) => *r,
    }
}

async fn deliveries(State(inner): State<Arc<Inner>>) -> Response {
    Json(json!({"data": inner.outbox.deliveries()})).into_response()
}

async fn pause(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.outbox.set_paused(true);
    StatusCode::NO_CONTENT
}

async fn resume(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.outbox.set_paused(false);
    StatusCode::NO_CONTENT
}
