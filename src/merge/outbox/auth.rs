//! The Supabase Auth applier: gives each member the auth user its desired state describes
//! (`{email, metadata}`): creates it (or links the existing user with that email) when the
//! member has none, else updates its email and `user_metadata`. Creating or linking sets
//! `members.user_id` and releases the member's outcomes that waited for it (they name the
//! user).
//!
//! Guards (docs/merge.md "Auth users: linking and conflicts"):
//! - on `email_exists` only an auth user whose email is confirmed and that no other member
//!   references is linked (`membersync_meta.linkable_auth_user`); otherwise nothing is created
//!   or linked and the member's auth intent waits as a **conflict**;
//! - an email change is sent to the auth user only when Memberstack reports the new email
//!   verified (or `merge.sync_unverified_emails`): the change's own `verified`, else the
//!   member re-read from the Admin API (webhooks do not always carry it); until then it waits
//!   as a conflict, re-checked at every retry;
//! - an email another auth user has is a conflict too: the rest (user_metadata) is applied,
//!   the email waits.
//!
//! A conflict is recorded once (`user_logs` `conflict`, `membersync_merge_sync_conflicts_total`,
//! the outcome's `auth_user = "conflict"`), never dead-lettered: the intent is tried again
//! every `merge.conflict_retry_secs`, or at once when a change gives it a new email.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::lanes::{Failure, IntentApplier};
use super::{Intent, Target};
use crate::config::MergeConfig;
use crate::merge::store;
use crate::sinks::memberstack::MemberstackClient;
use crate::sinks::supabase_auth::{AuthError, CreateUser, SupabaseAuthClient};

pub struct AuthApplier {
    cfg: Arc<MergeConfig>,
    client: SupabaseAuthClient,
    conflicts: prometheus::IntCounterVec,
    /// Re-reads a member whose new email the change did not report verified.
    memberstack: Option<MemberstackClient>,
}

pub struct AuthPlan {
    member_id: String,
    user_id: Option<Uuid>,
    email: Option<String>,
    /// The email goes to an existing auth user and the change did not report it verified:
    /// Memberstack is asked first.
    verify_email: bool,
    metadata: Value,
}

pub struct AuthDone {
    user_id: Option<Uuid>,
    /// `created`, `linked`, `updated` or `conflict` (nothing created or linked).
    how: &'static str,
    /// Why (part of) the intent could not be applied: a conflict reason
    /// (`crate::merge::metrics::CONFLICT_REASONS`).
    conflict: Option<&'static str>,
}

impl AuthApplier {
    pub fn new(
        cfg: Arc<MergeConfig>,
        client: SupabaseAuthClient,
        conflicts: prometheus::IntCounterVec,
        memberstack: Option<MemberstackClient>,
    ) -> Self {
        Self {
            cfg,
            client,
            conflicts,
            memberstack,
        }
    }

    /// Whether Memberstack reports `email` as the member's verified email (re-read now).
    async fn verified_in_memberstack(&self, member_id: &str, email: &str) -> Result<bool, Failure> {
        let Some(ms) = &self.memberstack else {
            return Ok(false);
        };
        match ms.get_member(member_id).await {
            Ok(Some(m)) => Ok(m.raw.get("verified").and_then(Value::as_bool) == Some(true)
                && m.raw
                    .pointer("/auth/email")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))),
            Ok(None) => Ok(false),
            Err(e) if e.is_retryable() => Err(Failure::Retry {
                kind: "memberstack",
                message: format!("Memberstack: {e}"),
            }),
            Err(_) => Ok(false),
        }
    }
}

/// The desired state merge writes for a member (`merge_intents.desired` of target `auth`):
/// the email (only when it is to be set: a new auth user, or a changed email) with whether
/// the change reported it verified (`null`: it did not say), and the user_metadata.
pub fn desired(
    email: Option<(&str, Option<bool>)>,
    metadata: Value,
) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    if let Some((email, verified)) = email {
        m.insert("email".into(), json!(email));
        m.insert("email_verified".into(), json!(verified));
    }
    m.insert("metadata".into(), metadata);
    m
}

fn db_retry(e: tokio_postgres::Error) -> Failure {
    Failure::Retry {
        kind: "database",
        message: format!("database: {e}"),
    }
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
        let verified = intent
            .desired
            .get("email_verified")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Some(AuthPlan {
            member_id: intent.member_id.clone(),
            user_id,
            verify_email: user_id.is_some()
                && email.is_some()
                && !verified
                && !self.cfg.sync_unverified_emails,
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
            let metadata_only = json!({ "user_metadata": plan.metadata });
            let mut held = false;
            let mut email = plan.email.as_ref();
            if let Some(e) = email
                && plan.verify_email
                && !self.verified_in_memberstack(&plan.member_id, e).await?
            {
                held = true;
                email = None;
            }
            let Some(email) = email else {
                self.client
                    .update_user(id, &metadata_only)
                    .await
                    .map_err(classify)?;
                return Ok(AuthDone {
                    user_id: Some(id),
                    how: "updated",
                    conflict: held.then_some("email_unverified"),
                });
            };
            let mut body = metadata_only.clone();
            body["email"] = json!(email);
            return match self.client.update_user(id, &body).await {
                Ok(_) => Ok(AuthDone {
                    user_id: Some(id),
                    how: "updated",
                    conflict: None,
                }),
                // Another auth user has the email: the metadata is applied, the email waits.
                Err(AuthError::EmailExists) => {
                    self.client
                        .update_user(id, &metadata_only)
                        .await
                        .map_err(classify)?;
                    Ok(AuthDone {
                        user_id: Some(id),
                        how: "updated",
                        conflict: Some("email_in_use"),
                    })
                }
                Err(e) => Err(classify(e)),
            };
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
                user_id: Some(user.id),
                how: "created",
                conflict: None,
            }),
            Err(AuthError::EmailExists) => {
                // Only a confirmed auth user that no other member references may be linked:
                // anyone can sign up with someone else's email and leave it unconfirmed.
                let row = db
                    .query_opt(
                        "select user_id, verdict from membersync_meta.linkable_auth_user($1, $2)",
                        &[&email, &plan.member_id],
                    )
                    .await
                    .map_err(db_retry)?;
                match row.map(|r| (r.get::<_, Uuid>(0), r.get::<_, String>(1))) {
                    Some((id, verdict)) if verdict == "linkable" => Ok(AuthDone {
                        user_id: Some(id),
                        how: "linked",
                        conflict: None,
                    }),
                    Some((_, verdict)) => Ok(AuthDone {
                        user_id: None,
                        how: "conflict",
                        conflict: Some(if verdict == "unconfirmed" {
                            "unconfirmed"
                        } else {
                            "linked_to_another_member"
                        }),
                    }),
                    // Supabase Auth has the email, but not as a user that may be linked (an
                    // SSO or deleted user).
                    None => Ok(AuthDone {
                        user_id: None,
                        how: "conflict",
                        conflict: Some("email_in_use"),
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
        if let Some((plan, done)) = result {
            if let Some(reason) = done.conflict {
                return self.conflict(tx, intent, plan, done, reason).await;
            }
            if let Some(id) = done.user_id {
                if done.how != "updated" {
                    store::mark_origin(tx).await?;
                    store::link_user_if_unlinked(tx, &intent.member_id, id).await?;
                    let linked: Option<Uuid> = tx
                        .query_opt(
                            "select user_id from public.members where memberstack_id = $1",
                            &[&intent.member_id],
                        )
                        .await?
                        .and_then(|r| r.get(0));
                    if done.how == "linked" && linked != Some(id) {
                        // Another member linked the same user meanwhile (one user, one member).
                        let lost = AuthDone {
                            user_id: None,
                            how: "conflict",
                            conflict: Some("linked_to_another_member"),
                        };
                        return self
                            .conflict(tx, intent, plan, &lost, "linked_to_another_member")
                            .await;
                    }
                }
                user_id = Some(id);
            }
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

impl AuthApplier {
    /// Under the member's lock: what was applied leaves the intent, the rest waits
    /// `merge.conflict_retry_secs`; a new conflict is logged and counted once.
    async fn conflict(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
        plan: &AuthPlan,
        done: &AuthDone,
        reason: &'static str,
    ) -> Result<(), tokio_postgres::Error> {
        // An update applied the user_metadata; a refused creation applied nothing.
        let mut applied = serde_json::Map::new();
        if done.user_id.is_some()
            && let Some(m) = intent.desired.get("metadata")
        {
            applied.insert("metadata".into(), m.clone());
        }
        let conflict = json!({
            "reason": reason,
            "email": plan.email,
            "since": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        let retry = std::time::Duration::from_secs(self.cfg.conflict_retry_secs.max(1));
        let fresh = super::hold(tx, intent, &applied, &conflict, retry).await?;
        let user_id = match done.user_id {
            Some(id) => Some(id),
            None => tx
                .query_opt(
                    "select user_id from public.members where memberstack_id = $1",
                    &[&intent.member_id],
                )
                .await?
                .and_then(|r| r.get(0)),
        };
        if fresh {
            self.conflicts.with_label_values(&["auth", reason]).inc();
            tracing::warn!(member = %intent.member_id, reason, "Supabase Auth conflict: recorded, retried later");
            store::log_change(
                tx,
                &store::LogEntry {
                    user_id,
                    memberstack_id: &intent.member_id,
                    change_type: "conflict",
                    old: json!({ "auth_user": user_id.map(|u| u.to_string()) }),
                    new: json!({
                        "target": "auth",
                        "reason": reason,
                        "email": plan.email,
                        "retry_in_secs": self.cfg.conflict_retry_secs,
                    }),
                    source: "membersync",
                },
            )
            .await?;
        }
        let how = if done.user_id.is_none() {
            "conflict"
        } else {
            done.how
        };
        release_outcomes(tx, &intent.member_id, user_id, Some(how)).await?;
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
