//! The Supabase Auth applier: gives each member the auth user its desired state describes
//! (`{email, metadata}`): creates it (or links the existing user with that email) when the
//! member has none, else updates its email and `user_metadata`. Creating or linking sets
//! `members.user_id` and releases the member's outcomes that waited for it (they name the
//! user).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::lanes::{Failure, IntentApplier};
use super::{Intent, Target};
use crate::config::MergeConfig;
use crate::merge::store;
use crate::sinks::supabase_auth::{AuthError, CreateUser, SupabaseAuthClient};

pub struct AuthApplier {
    cfg: Arc<MergeConfig>,
    client: SupabaseAuthClient,
}

pub struct AuthPlan {
    member_id: String,
    user_id: Option<Uuid>,
    email: Option<String>,
    metadata: Value,
}

pub struct AuthDone {
    user_id: Uuid,
    /// `created`, `linked` or `updated`.
    how: &'static str,
}

impl AuthApplier {
    pub fn new(cfg: Arc<MergeConfig>, client: SupabaseAuthClient) -> Self {
        Self { cfg, client }
    }
}

/// The desired state merge writes for a member (`merge_intents.desired` of target `auth`).
pub fn desired(email: Option<&str>, metadata: Value) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("email".into(), email.map_or(Value::Null, |e| json!(e)));
    m.insert("metadata".into(), metadata);
    m
}

fn classify(e: AuthError) -> Failure {
    if e.is_retryable() {
        Failure::Retry {
            kind: "supabase_auth",
            message: format!("Supabase Auth: {e}"),
        }
    } else {
        Failure::Permanent {
            kind: "supabase_auth",
            message: format!("Supabase Auth: {e}"),
        }
    }
}

impl IntentApplier for AuthApplier {
    type Plan = AuthPlan;
    type Done = AuthDone;
    const TARGET: Target = Target::Auth;

    async fn prepare(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
    ) -> Result<Option<AuthPlan>, tokio_postgres::Error> {
        let row = tx
            .query_opt(
                "select user_id from public.members where memberstack_id = $1",
                &[&intent.member_id],
            )
            .await?;
        let user_id: Option<Uuid> = row.and_then(|r| r.get(0));
        let email = intent
            .desired
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if user_id.is_none() && (email.is_none() || !self.cfg.create_auth_users) {
            return Ok(None);
        }
        Ok(Some(AuthPlan {
            member_id: intent.member_id.clone(),
            user_id,
            email,
            metadata: intent
                .desired
                .get("metadata")
                .cloned()
                .unwrap_or_else(|| json!({})),
        }))
    }

    async fn apply(&self, db: &Client, plan: &AuthPlan) -> Result<AuthDone, Failure> {
        if let Some(id) = plan.user_id {
            let mut body = json!({ "user_metadata": plan.metadata });
            if let Some(email) = &plan.email {
                body["email"] = json!(email);
            }
            self.client.update_user(id, &body).await.map_err(classify)?;
            return Ok(AuthDone {
                user_id: id,
                how: "updated",
            });
        }
        let email = plan.email.clone().unwrap_or_default();
        let request = CreateUser {
            email: email.clone(),
            email_confirm: true,
            user_metadata: plan.metadata.clone(),
            app_metadata: None,
            password: None,
        };
        match self.client.create_user(&request).await {
            Ok(user) => Ok(AuthDone {
                user_id: user.id,
                how: "created",
            }),
            Err(AuthError::EmailExists) => {
                let row = db
                    .query_one(
                        "select membersync_meta.auth_user_id_by_email($1)",
                        &[&email],
                    )
                    .await
                    .map_err(|e| Failure::Retry {
                        kind: "database",
                        message: format!("database: {e}"),
                    })?;
                match row.get::<_, Option<Uuid>>(0) {
                    Some(id) => Ok(AuthDone {
                        user_id: id,
                        how: "linked",
                    }),
                    None => Err(Failure::Permanent {
                        kind: "supabase_auth",
                        message: format!(
                            "member {}: Supabase Auth says the email exists, but no linkable auth user has it",
                            plan.member_id
                        ),
                    }),
                }
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn record(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
        result: Option<(&AuthPlan, &AuthDone)>,
        at: DateTime<Utc>,
    ) -> Result<(), tokio_postgres::Error> {
        let mut user_id = None;
        let mut how = None;
        if let Some((_, done)) = result {
            if done.how != "updated" {
                store::mark_origin(tx).await?;
                store::link_user_if_unlinked(tx, &intent.member_id, done.user_id).await?;
            }
            user_id = Some(done.user_id);
            how = Some(done.how);
        }
        if user_id.is_none() {
            user_id = tx
                .query_opt(
                    "select user_id from public.members where memberstack_id = $1",
                    &[&intent.member_id],
                )
                .await?
                .and_then(|r| r.get(0));
        }
        release_outcomes(tx, &intent.member_id, user_id, how).await?;
        super::complete(tx, intent, &intent.desired, at, std::time::Duration::ZERO).await?;
        Ok(())
    }
}

/// The member's outcomes that waited for its auth user now name it and may be relayed.
async fn release_outcomes(
    tx: &Transaction<'_>,
    member_id: &str,
    user_id: Option<Uuid>,
    how: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    let patch = json!({
        "user_id": user_id.map(|u| u.to_string()),
        "auth_user": how,
    });
    tx.execute(
        "update membersync_meta.outcome_outbox
            set awaiting_auth = false,
                payload = payload || jsonb_strip_nulls($2::jsonb)
          where member_id = $1 and awaiting_auth",
        &[&member_id, &patch],
    )
    .await?;
    Ok(())
}
