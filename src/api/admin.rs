//! Admin routes: `Authorization: Bearer <api.admin_token>`. Without a configured token they
//! do not exist (404), so an unconfigured server offers nothing to guess at.
//!
//! Each answered call that shows member data appends an `audit_logs` row (actor `admin-api`,
//! action `admin_<route>`; the API role may append only such rows, V19). `status` is not
//! recorded: it shows no member data and is made to be polled, so its rows would bury the
//! others. A refused call is logged and counted, not recorded: an unauthenticated caller must
//! not be able to make the database grow.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiState;
use super::problem::Problem;
use super::status;
use crate::kafka::topics::Topics;
use crate::merge::dlq;

fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), Problem> {
    let Some(admin) = &state.admin else {
        return Err(Problem::not_found(
            "admin_disabled",
            "the admin API is disabled on this server (no api.admin_token)",
        ));
    };
    admin.check(headers).map_err(|e| {
        tracing::info!(code = e.code(), "API: admin request refused");
        Problem::from(e)
    })
}

pub async fn status(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Err(p) = authorize(&state, &headers) {
        return p.into_response();
    }
    Json(status::gather(&state).await).into_response()
}

/// The dead letters, as `membersync dlq list --json` prints them (one object per letter,
/// with `replayed`), oldest first.
pub async fn dlq(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Err(p) = authorize(&state, &headers) {
        return p.into_response();
    }
    let topic = Topics::new(&state.config.kafka.topic_prefix).dlq();
    let letters = match dlq::read_all(&state.config.kafka, &topic).await {
        Ok(letters) => letters,
        Err(e) => {
            tracing::warn!(error = %e, "API: reading the dead-letter topic failed");
            return Problem::unavailable(
                "kafka_unavailable",
                "the dead-letter topic cannot be read now",
            )
            .into_response();
        }
    };
    let replayed = match state.db.get().await {
        Ok(client) => dlq::replayed_ids(&client).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let replayed = match replayed {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "API: reading replayed dead letters failed");
            return Problem::unavailable("database_unavailable", "audit_logs cannot be read now")
                .into_response();
        }
    };
    let listed = dlq::listing(&letters, &replayed);
    if let Err(e) = audit(
        &state,
        "admin_dlq_list",
        json!({"topic": topic, "count": listed.len()}),
    )
    .await
    {
        // The letters are not shown without their trace.
        tracing::warn!(error = %e, "API: cannot record the admin call in audit_logs");
        return Problem::unavailable("database_unavailable", "audit_logs cannot be written now")
            .into_response();
    }
    Json(json!({"topic": topic, "count": listed.len(), "dead_letters": listed})).into_response()
}

/// Appends the call's `audit_logs` row.
async fn audit(state: &ApiState, action: &str, details: serde_json::Value) -> Result<(), String> {
    let client = state.db.get().await.map_err(|e| e.to_string())?;
    client
        .execute(
            "insert into public.audit_logs (actor, action, details) values ('admin-api', $1, $2)",
            &[&action, &details],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
