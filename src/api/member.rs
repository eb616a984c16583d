//! Member routes. The member is always the token's: `me` routes take nothing else, and
//! `/v1/members/{id}/sync` answers 403 unless `{id}` is the token's member.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiState;
use super::auth::Caller;
use super::problem::Problem;
use super::sync_view;
use crate::ingest::envelope;
use crate::kafka::producer::Record;
use crate::sinks::memberstack::MemberstackError;

/// Who is calling, or the answer that refuses them.
async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Caller, Problem> {
    let Some(auth) = &state.member_auth else {
        return Err(Problem::not_found(
            "api_disabled",
            "the member API is disabled on this server",
        ));
    };
    let result = auth.authenticate(headers).await;
    state.metrics.auth(result.as_ref().err().map(|e| e.code()));
    result.map_err(Problem::from)
}

pub async fn my_sync(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    match caller(&state, &headers).await {
        Ok(caller) => sync_of(&state, &caller.member_id).await,
        Err(p) => p.into_response(),
    }
}

pub async fn member_sync(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match caller(&state, &headers).await {
        Ok(caller) if caller.member_id == id => sync_of(&state, &caller.member_id).await,
        Ok(_) => Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a member may only read its own sync state",
        )
        .into_response(),
        Err(p) => p.into_response(),
    }
}

async fn sync_of(state: &ApiState, member_id: &str) -> Response {
    let work = async {
        let client = state.db.get().await.map_err(|e| {
            tracing::warn!(error = %e, "API: cannot reach Postgres");
            database_unavailable()
        })?;
        sync_view::load(&client, member_id, &state.fields)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "API: reading the sync state failed");
                database_unavailable()
            })
    };
    match tokio::time::timeout(state.cfg.request_timeout(), work).await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(p)) => p.into_response(),
        Err(_) => database_unavailable().into_response(),
    }
}

fn database_unavailable() -> Problem {
    Problem::unavailable(
        "database_unavailable",
        "the sync state cannot be read now; retry later",
    )
}

/// Re-reads the member from Memberstack and publishes it as a `member_snapshot` record on
/// the Memberstack topic, for merge to re-merge; 202 once Kafka acknowledged it.
pub async fn resync(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let caller = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(p) => return p.into_response(),
    };
    let Some(memberstack) = &state.memberstack else {
        return Problem::unavailable(
            "memberstack_not_configured",
            "this server has no Memberstack API key; resync is unavailable",
        )
        .into_response();
    };
    if let Err(wait) = state.resync_limit.check(&caller.member_id) {
        return Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "resync_too_frequent",
            "a resync of this member was requested moments ago",
        )
        .retry_after(wait.as_secs_f64().ceil() as u64)
        .into_response();
    }
    let fetched = tokio::time::timeout(
        state.cfg.request_timeout(),
        memberstack.get_member(&caller.member_id),
    )
    .await;
    let member = match fetched {
        Ok(Ok(Some(member))) => member,
        Ok(Ok(None)) => {
            return Problem::not_found(
                "member_not_found",
                "Memberstack has no member with this id",
            )
            .into_response();
        }
        Ok(Err(e)) => return memberstack_unavailable(&e).into_response(),
        Err(_) => return memberstack_unavailable(&MemberstackError::Timeout).into_response(),
    };
    // Memberstack answers for the id asked; anything else is not this member's record.
    if member.id != caller.member_id {
        tracing::warn!("API: Memberstack returned another member than asked for; not published");
        return memberstack_unavailable(&MemberstackError::Decode("member id mismatch".into()))
            .into_response();
    }
    let event_id = format!(
        "resync_{}_{}",
        caller.member_id,
        uuid::Uuid::new_v4().simple()
    );
    let record = envelope::member_snapshot(
        &event_id,
        &member.raw,
        &caller.member_id,
        chrono::Utc::now(),
    );
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_bytes()))
        .collect();
    let sent = state
        .producer
        .send(
            &Record {
                topic: &state.memberstack_topic,
                key: record.key.as_bytes(),
                payload: &record.value,
                headers: &headers,
            },
            state.kafka_ack_timeout,
        )
        .await;
    match sent {
        Ok(_) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "accepted", "event_id": event_id})),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "API: resync snapshot not acknowledged by Kafka");
            Problem::unavailable(
                "kafka_unavailable",
                "the resync could not be queued; retry later",
            )
            .into_response()
        }
    }
}

fn memberstack_unavailable(e: &MemberstackError) -> Problem {
    // The error text is ours (no key, no URL), but it stays in the log, not the answer.
    tracing::warn!(error = %e, "API: Memberstack read for a resync failed");
    Problem::unavailable(
        "memberstack_unavailable",
        "Memberstack cannot be read now; retry later",
    )
}
