//! The Memberstack pusher: drives each member's Memberstack fields to their desired values
//! with one coalesced `PATCH /members/:id` per claim, within the client's shared 25/s budget.
//!
//! - Only fields whose desired value differs from what Memberstack was last seen to hold
//!   (its last webhook, `sync_state.memberstack_seen`, and our last push) are sent.
//! - The echo of each pushed value is recorded *before* the PATCH, so its webhook is
//!   recognised however fast it comes back; the push time (`pushed_at`) is the time the
//!   **response** arrived, so a Memberstack edit made while our PATCH waited in the rate
//!   limiter is not mistaken for an older one.
//! - After the push, a field whose agreed value moved on while the PATCH was in flight (a newer
//!   Memberstack edit won, and our PATCH overwrote it there) is queued again with the agreed
//!   value: the two sides converge instead of silently diverging.
//! - A member Memberstack does not have (404; a row created in Supabase only) is an
//!   **orphan**: reported once (`error_logs` `missing_in_memberstack`,
//!   `membersync_merge_orphans_total`), not dead-lettered, and nothing more is pushed for it
//!   until a Memberstack change of that member shows it exists (`outbox::clear_orphan`).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio_postgres::{Client, Transaction};

use super::lanes::{Failure, IntentApplier};
use super::{Intent, Target};
use crate::config::MergeConfig;
use crate::merge::MemberstackPath;
use crate::merge::apply::Field;
use crate::merge::normalize::same;
use crate::merge::resolve::Echo;
use crate::merge::store;
use crate::sinks::memberstack::{MemberstackClient, MemberstackError};

pub struct Pusher {
    cfg: Arc<MergeConfig>,
    fields: Arc<Vec<Field>>,
    client: MemberstackClient,
    orphans: prometheus::IntCounter,
}

/// What Memberstack answered.
pub enum Pushed {
    Patched,
    /// 404: the member does not exist in Memberstack.
    Missing,
}

/// What one claim sends.
pub struct Push {
    member_id: String,
    /// By field name.
    values: Map<String, Value>,
    fields: Vec<(Field, Value)>,
}

impl Pusher {
    pub fn new(
        cfg: Arc<MergeConfig>,
        fields: Arc<Vec<Field>>,
        client: MemberstackClient,
        orphans: prometheus::IntCounter,
    ) -> Self {
        Self {
            cfg,
            fields,
            client,
            orphans,
        }
    }

    fn field(&self, name: &str) -> Option<&Field> {
        self.fields
            .iter()
            .find(|f| f.mapping.name == name && f.path.is_writable())
    }
}

impl IntentApplier for Pusher {
    type Plan = Push;
    type Done = Pushed;
    const TARGET: Target = Target::Memberstack;

    async fn prepare(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
    ) -> Result<Option<Push>, tokio_postgres::Error> {
        let mut states = store::field_states(tx, &intent.member_id).await?;
        let now = Utc::now();
        let window = chrono::Duration::seconds(self.cfg.echo_window_secs as i64);
        let mut push = Push {
            member_id: intent.member_id.clone(),
            values: Map::new(),
            fields: Vec::new(),
        };
        for (name, value) in &intent.desired {
            // A field no longer mapped (or not writable) is dropped with the intent.
            let Some(field) = self.field(name) else {
                continue;
            };
            let n = field.mapping.normalize;
            let state = states.entry(name.clone()).or_default();
            // Memberstack surely holds the value when both its last webhook and our last push
            // say so (either alone may be older than the other).
            let holds = |v: &Option<Value>| v.as_ref().is_some_and(|x| same(n, x, value));
            if holds(&state.memberstack_seen)
                && (state.pushed_value.is_none() || holds(&state.pushed_value))
            {
                continue;
            }
            let before = state.clone();
            state
                .echoes
                .retain(|e| now - e.at < window && !same(n, &e.value, value));
            state.echoes.push(Echo {
                value: value.clone(),
                at: now,
            });
            if *state != before {
                store::save_field_state(tx, &intent.member_id, name, state).await?;
            }
            let sent = if field.path == MemberstackPath::CustomFields {
                with_cleared_keys(value, [&state.memberstack_seen, &state.pushed_value])
            } else {
                value.clone()
            };
            push.values.insert(name.clone(), value.clone());
            push.fields.push((field.clone(), sent));
        }
        Ok((!push.fields.is_empty()).then_some(push))
    }

    async fn apply(&self, _db: &Client, push: &Push) -> Result<Pushed, Failure> {
        let classify = |e: MemberstackError| {
            if e.is_retryable() {
                Failure::Retry {
                    kind: "memberstack",
                    message: format!("Memberstack: {e}"),
                }
            } else {
                Failure::Permanent {
                    kind: "memberstack",
                    message: format!("Memberstack: {e}"),
                }
            }
        };
        let missing = |e: &MemberstackError| matches!(e, MemberstackError::Api { status: 404, .. });
        // `json` is replaced whole by Memberstack: its keys are read first (read-modify-write).
        let current = if push
            .fields
            .iter()
            .any(|(f, _)| f.path.needs_read_before_write())
        {
            match self.client.get_member(&push.member_id).await {
                Ok(Some(m)) => Some(m.raw),
                Ok(None) => return Ok(Pushed::Missing),
                Err(e) if missing(&e) => return Ok(Pushed::Missing),
                Err(e) => return Err(classify(e)),
            }
        } else {
            None
        };
        let mut patch = Map::new();
        for (field, value) in &push.fields {
            field.path.put(&mut patch, value.clone(), current.as_ref());
        }
        match self.client.update_member(&push.member_id, &patch).await {
            Ok(_) => Ok(Pushed::Patched),
            Err(e) if missing(&e) => Ok(Pushed::Missing),
            Err(e) => Err(classify(e)),
        }
    }

    async fn record(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
        result: Option<(&Push, &Pushed)>,
        at: DateTime<Utc>,
    ) -> Result<(), tokio_postgres::Error> {
        let pace = std::time::Duration::from_millis(self.cfg.member_push_interval_ms);
        let push = match result {
            None => {
                // Nothing sent: what was desired is there already (or was dead-lettered).
                super::complete(tx, intent, &intent.desired, at, std::time::Duration::ZERO).await?;
                return Ok(());
            }
            Some((_, Pushed::Missing)) => return self.orphan(tx, intent).await,
            Some((push, Pushed::Patched)) => push,
        };
        store::mark_origin(tx).await?;
        store::touch_synced(tx, &intent.member_id, at).await?;
        let states: HashMap<_, _> = store::field_states(tx, &intent.member_id).await?;
        let mut repush = Map::new();
        for (field, value) in &push.fields {
            let name = &field.mapping.name;
            let mut state = states.get(name).cloned().unwrap_or_default();
            // `memberstack_seen` stays the last webhook's value: a webhook sent before our PATCH
            // landed must still read as "not an edit" of this field.
            state.pushed_value = Some(value.clone());
            state.pushed_at = Some(at);
            store::save_field_state(tx, &intent.member_id, name, &state).await?;
            if let Some(agreed) = &state.value
                && !same(field.mapping.normalize, agreed, value)
            {
                repush.insert(name.clone(), agreed.clone());
            }
        }
        let pending = super::complete(tx, intent, &push.values, at, pace).await?;
        // The agreed value moved on while the PATCH was in flight: Memberstack must get it
        // (unless a newer desired value is pending anyway).
        repush.retain(|name, _| !pending.contains_key(name));
        if !repush.is_empty() {
            super::upsert_intent(
                tx,
                &intent.member_id,
                Target::Memberstack,
                &repush,
                &[],
                intent.origin.as_ref(),
                pace,
            )
            .await?;
        }
        Ok(())
    }
}

/// Memberstack shallow-merges `customFields`: a key left out keeps its value there. A key
/// Memberstack holds (its last webhook, or our last push) that the desired value no longer has
/// is sent cleared, as the empty string, so that a key removed in Supabase does not stay in
/// Memberstack and come back with its next webhook.
fn with_cleared_keys(desired: &Value, known: [&Option<Value>; 2]) -> Value {
    let Value::Object(want) = desired else {
        return desired.clone();
    };
    let mut out = want.clone();
    for held in known.into_iter().flatten() {
        let Value::Object(held) = held else { continue };
        for (k, v) in held {
            let has_value = !v.is_null() && v.as_str() != Some("");
            if has_value && !out.contains_key(k) {
                out.insert(k.clone(), Value::String(String::new()));
            }
        }
    }
    Value::Object(out)
}

impl Pusher {
    /// Memberstack does not have the member: report it once, push nothing more for it.
    async fn orphan(
        &self,
        tx: &Transaction<'_>,
        intent: &Intent,
    ) -> Result<(), tokio_postgres::Error> {
        // The echoes recorded for this push will never come back: forget them, or a later
        // Memberstack value equal to one would be taken for our own write.
        let states = store::field_states(tx, &intent.member_id).await?;
        for (name, value) in &intent.desired {
            let Some(field) = self.field(name) else {
                continue;
            };
            if let Some(state) = states.get(name) {
                let mut after = state.clone();
                after
                    .echoes
                    .retain(|e| !same(field.mapping.normalize, &e.value, value));
                if after != *state {
                    store::save_field_state(tx, &intent.member_id, name, &after).await?;
                }
            }
        }
        if !super::mark_orphan(tx, &intent.member_id).await? {
            return Ok(());
        }
        self.orphans.inc();
        tracing::warn!(member = %intent.member_id, "member does not exist in Memberstack: nothing is pushed for it until it does");
        let context = serde_json::json!({
            "target": "memberstack",
            "event_id": intent.origin.as_ref().map(|o| o.event_id.clone()),
            "error_kind": "missing_in_memberstack",
            "retrying": false,
        });
        tx.execute(
            "insert into public.error_logs (memberstack_id, user_id, error_type, error_message, context, retry_count)
             values ($1, (select user_id from public.members where memberstack_id = $1),
                     'missing_in_memberstack', $2, $3, 0)",
            &[
                &intent.member_id,
                &format!(
                    "member {} does not exist in Memberstack: its changes in Supabase are not pushed until it does",
                    intent.member_id
                ),
                &context,
            ],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_memberstack_holds_and_supabase_removed_are_sent_cleared() {
        let desired = json!({"a": "1"});
        let seen = Some(json!({"a": "0", "k": "x", "gone": ""}));
        let pushed = Some(json!({"p": 2}));
        assert_eq!(
            with_cleared_keys(&desired, [&seen, &pushed]),
            json!({"a": "1", "k": "", "p": ""})
        );
        assert_eq!(with_cleared_keys(&desired, [&None, &None]), desired);
    }
}
