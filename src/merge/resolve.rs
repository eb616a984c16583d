//! Conflict resolution for one field: given what was last agreed (`sync_state`), what
//! Supabase holds now and one incoming change from either side, decide what to write where.
//! Pure and deterministic: the same inputs always give the same [`Resolution`].
//!
//! The rules (docs/merge.md has the reasoning and the worked cases):
//! - **Echoes**: a Memberstack value we pushed ourselves comes back in a webhook; it is
//!   recognised (pending echoes, within `echo_window`) and does nothing. CDC events of our
//!   own writes never get here: they carry `source.origin = "membersync"`.
//! - **Authority** `memberstack`: Memberstack's value always wins; a Supabase edit of the
//!   field is reverted to the last Memberstack value. `supabase`: Supabase's value always
//!   wins; a Memberstack edit is overwritten with the Supabase value. `latest`: the change
//!   with the newer timestamp wins; on an exact tie `merge.tie_winner` wins (Supabase by
//!   default, as the sync rules say).
//! - A Memberstack webhook older than our last push describes a state our push overwrote.
//! - Supabase's time for a field is the agreed `synced_at` when the row still holds the
//!   agreed value, else when that column last changed (an edit whose CDC event is still on
//!   its way) — per column, not the row's `updated_at`, which later writes of other columns
//!   move.
//! - Webhooks and CDC events carry the whole member: a field whose value did not change
//!   since the previous event of the same stream was not edited by this change.
//! - Nothing is written that the target already holds, so re-applying a resolution's
//!   result changes nothing (idempotence; property-tested below).
//! - A push is a decision only: the pusher (merge's outbox) records its echo when it claims
//!   it and its time when Memberstack answered.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::normalize::same;
use crate::config::{Authority, Normalize, TieWinner};

/// Where a change came from. Stripe counts as Memberstack's side: it reports the
/// subscription, which Memberstack owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Memberstack,
    Supabase,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memberstack => "memberstack",
            Self::Supabase => "supabase",
        }
    }
}

/// A value we pushed to Memberstack whose webhook has not come back yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    pub value: Value,
    pub at: DateTime<Utc>,
}

/// One row of `sync_state`: the last agreed value of a field and how it got there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldState {
    pub value: Option<Value>,
    /// The timestamp of the change that produced `value` (the field's `last_synced_at`).
    pub synced_at: Option<DateTime<Utc>>,
    pub source: Option<Side>,
    pub pushed_value: Option<Value>,
    pub pushed_at: Option<DateTime<Utc>>,
    pub echoes: Vec<Echo>,
    /// The field's value in the last Memberstack webhook, and in the last CDC event (ours
    /// included). Both streams carry whole members / rows: a value equal to the previous one
    /// is not an edit of this field, whatever the change's timestamp says.
    pub memberstack_seen: Option<Value>,
    pub supabase_seen: Option<Value>,
}

/// What Supabase holds for the field right now (read under the member's lock).
#[derive(Debug, Clone, PartialEq)]
pub struct SupabaseNow {
    /// `None`: the member has no row yet.
    pub value: Option<Value>,
    /// When the field's column last changed (`membersync_meta.member_column_edits`).
    pub edited_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub side: Side,
    pub value: Value,
    pub at: DateTime<Utc>,
    /// Re-fed by `dlq replay`: an operator asks for it to be applied, so it counts as an
    /// edit even if the stream has shown its value since.
    pub replayed: bool,
    /// A `member.snapshot` (backfill, resync): Memberstack's whole state, read now. For a
    /// field with an owner it counts as an edit even if the stream has shown its value (a
    /// reconciliation must fix drift that webhooks once carried, e.g. a revert that failed).
    /// For a `latest` field only a value new to merge counts: the snapshot's time is when it
    /// was read, not when the value was set, and it must not beat a newer Supabase edit of
    /// a value merge already knew.
    pub snapshot: bool,
}

/// The field's rules and the clock.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub authority: Authority,
    pub normalize: Normalize,
    /// Whether membersync may write the field to Memberstack (plan fields may not).
    pub writable: bool,
    pub now: DateTime<Utc>,
    pub echo_window: Duration,
    /// Who wins a `latest` field on an exact timestamp tie between the two sides.
    pub tie: TieWinner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The incoming value won and was written where it was missing.
    Applied,
    /// Both sides already agree with it.
    Unchanged,
    /// Our own push, come back.
    Echo,
    /// Older than what is known; the newer value stands.
    Stale,
    /// The field's owner's value was restored on the side that changed it.
    Reverted,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Echo => "echo",
            Self::Stale => "stale",
            Self::Reverted => "reverted",
        }
    }
}

/// Both sides changed the field and one value lost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub winner: Side,
    pub winning: Value,
    pub losing: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub verdict: Verdict,
    pub write_supabase: Option<Value>,
    pub push_memberstack: Option<Value>,
    pub conflict: Option<Conflict>,
    pub state: FieldState,
}

/// A CDC event of membersync's own write: nothing to resolve, but it is the Supabase
/// stream's newest value of every column of the row.
pub fn observe_own_write(state: &FieldState, value: &Value) -> FieldState {
    FieldState {
        supabase_seen: Some(value.clone()),
        ..state.clone()
    }
}

pub fn resolve(
    rules: &Rules,
    state: &FieldState,
    supabase: &SupabaseNow,
    incoming: &Incoming,
) -> Resolution {
    let mut st = state.clone();
    st.echoes.retain(|e| rules.now - e.at < rules.echo_window);
    let mut r = match incoming.side {
        Side::Memberstack => from_memberstack(rules, st, supabase, incoming),
        Side::Supabase => from_supabase(rules, st, supabase, incoming),
    };
    // Never write what the target already holds.
    if let (Some(w), Some(now)) = (&r.write_supabase, &supabase.value)
        && same(rules.normalize, w, now)
    {
        r.write_supabase = None;
    }
    if r.push_memberstack.is_some() && !rules.writable {
        r.push_memberstack = None;
    }
    // A push is only decided here. Its echo is recorded when the pusher claims it and its
    // time (`pushed_at`) when Memberstack's response arrives (merge's outbox): stamping it
    // now would date a PATCH that may wait in the rate limiter, or never be sent (coalesced).
    r
}

fn outcome(verdict: Verdict, state: FieldState) -> Resolution {
    Resolution {
        verdict,
        write_supabase: None,
        push_memberstack: None,
        conflict: None,
        state,
    }
}

fn from_memberstack(
    rules: &Rules,
    mut st: FieldState,
    sb: &SupabaseNow,
    inc: &Incoming,
) -> Resolution {
    let n = rules.normalize;
    let (v, t) = (&inc.value, inc.at);
    let edited = inc.replayed
        || (inc.snapshot && rules.authority != Authority::Latest)
        || st
            .memberstack_seen
            .as_ref()
            .is_none_or(|seen| !same(n, seen, v));
    st.memberstack_seen = Some(v.clone());
    if st.echoes.iter().any(|e| same(n, &e.value, v)) {
        // The same value pushed twice comes back once (the second PATCH changed nothing).
        st.echoes.retain(|e| !same(n, &e.value, v));
        return outcome(Verdict::Echo, st);
    }
    if !edited {
        // The webhook is about another field (or shows Memberstack before our push landed).
        return outcome(Verdict::Unchanged, st);
    }
    let Some(sb_value) = &sb.value else {
        // No row yet: Memberstack's value is all there is.
        return accept_memberstack(n, st, None, v, t, false);
    };
    let agreed = st.value.as_ref().is_some_and(|a| same(n, a, sb_value));
    let superseded = st.pushed_at.is_some_and(|p| t < p);
    match rules.authority {
        Authority::Memberstack => {
            let older = st.source == Some(Side::Memberstack) && st.synced_at.is_some_and(|s| t < s);
            if older {
                return outcome(Verdict::Stale, st);
            }
            accept_memberstack(n, st, Some((sb_value, agreed)), v, t, false)
        }
        Authority::Supabase => {
            if same(n, v, sb_value) {
                st.value = Some(sb_value.clone());
                return outcome(Verdict::Unchanged, st);
            }
            if superseded
                && st
                    .pushed_value
                    .as_ref()
                    .is_some_and(|p| same(n, p, sb_value))
            {
                // Our later push already put Supabase's value there.
                return outcome(Verdict::Stale, st);
            }
            st.value = Some(sb_value.clone());
            let mut r = outcome(Verdict::Reverted, st);
            r.push_memberstack = Some(sb_value.clone());
            r.conflict = Some(Conflict {
                winner: Side::Supabase,
                winning: sb_value.clone(),
                losing: v.clone(),
            });
            r
        }
        Authority::Latest => {
            let sb_time = if agreed {
                st.synced_at
            } else {
                sb.edited_at.or(st.synced_at)
            };
            // Newer than Supabase's value and, when it was made before our last push landed,
            // newer than the value we pushed. A tie with a Supabase time goes to
            // `merge.tie_winner`; a tie with Memberstack's own agreed time is no conflict.
            let ms_time = agreed && st.source == Some(Side::Memberstack);
            let wins = |s: DateTime<Utc>| {
                t > s || (t == s && (ms_time || rules.tie == TieWinner::Memberstack))
            };
            let newer = sb_time.is_none_or(wins) && (!superseded || st.synced_at.is_none_or(wins));
            if newer {
                accept_memberstack(n, st, Some((sb_value, agreed)), v, t, superseded)
            } else {
                let conflict = (!same(n, v, sb_value)).then(|| Conflict {
                    winner: Side::Supabase,
                    winning: sb_value.clone(),
                    losing: v.clone(),
                });
                let mut r = outcome(Verdict::Stale, st);
                r.conflict = conflict;
                r
            }
        }
    }
}

/// Memberstack's value wins: write it to Supabase unless it is there already. `repush`: our
/// own earlier push overwrote this edit in Memberstack, so it goes back there too.
fn accept_memberstack(
    n: Normalize,
    mut st: FieldState,
    sb: Option<(&Value, bool)>,
    v: &Value,
    t: DateTime<Utc>,
    repush: bool,
) -> Resolution {
    let unchanged = sb.is_some_and(|(sb_value, _)| same(n, v, sb_value));
    st.synced_at = Some(match st.synced_at {
        Some(s) if unchanged => s.max(t),
        _ => t,
    });
    st.value = Some(v.clone());
    st.source = Some(Side::Memberstack);
    let repush = repush && !st.pushed_value.as_ref().is_some_and(|p| same(n, p, v));
    if unchanged && !repush {
        return outcome(Verdict::Unchanged, st);
    }
    let conflict = match sb {
        Some((sb_value, false)) if !same(n, v, sb_value) => Some(Conflict {
            winner: Side::Memberstack,
            winning: v.clone(),
            losing: sb_value.clone(),
        }),
        _ => None,
    };
    let mut r = outcome(Verdict::Applied, st);
    r.write_supabase = (!unchanged).then(|| v.clone());
    r.push_memberstack = repush.then(|| v.clone());
    r.conflict = conflict;
    r
}

fn from_supabase(
    rules: &Rules,
    mut st: FieldState,
    sb: &SupabaseNow,
    inc: &Incoming,
) -> Resolution {
    let n = rules.normalize;
    // A dead letter re-fed by an operator (`dlq replay`) is resolved against the current
    // state: its own value may be older than what the row holds now, and must never be pushed
    // over it. What counts is the row's value, as of when its column last changed.
    let current = match (inc.replayed, &sb.value) {
        (true, Some(now)) => Some((now.clone(), sb.edited_at.map_or(inc.at, |e| e.max(inc.at)))),
        _ => None,
    };
    let (v, t) = match &current {
        Some((now, at)) => (now, *at),
        // Dated by when its column was written (`member_column_edits`, the write's own time),
        // the time `from_memberstack` used for it while this event was on its way — not the
        // commit time the event carries, which can be later: one edit, one time, whichever
        // arrives first.
        None => (
            &inc.value,
            sb.edited_at.filter(|e| *e <= inc.at).unwrap_or(inc.at),
        ),
    };
    if !inc.replayed
        && let Some(now) = &sb.value
        && !same(n, now, v)
    {
        // The row no longer holds this edit: a newer write replaced it (the application's,
        // its own event still on its way, or merge's, which decided it already). This edit
        // neither reverts the row nor is pushed: either would overwrite the newer value,
        // which is decided when its own event arrives.
        st.supabase_seen = Some(v.clone());
        return outcome(Verdict::Stale, st);
    }
    let edited = inc.replayed
        || st
            .supabase_seen
            .as_ref()
            .is_none_or(|seen| !same(n, seen, v));
    if !inc.replayed {
        st.supabase_seen = Some(v.clone());
    }
    let agreed_now = st.value.as_ref().is_some_and(|a| same(n, a, v));
    if inc.replayed && agreed_now && rules.authority != Authority::Memberstack {
        // The row holds the agreed value and the operator asks for it to reach Memberstack
        // (the push that failed): push it again.
        let mut r = outcome(Verdict::Applied, st);
        r.push_memberstack = Some(v.clone());
        return r;
    }
    if !edited || agreed_now {
        return outcome(Verdict::Unchanged, st);
    }
    let supabase_wins = match rules.authority {
        Authority::Supabase => true,
        // On an exact tie with Memberstack's value, `merge.tie_winner` decides.
        Authority::Latest => st.synced_at.is_none_or(|s| {
            t > s
                || (t == s
                    && st.source == Some(Side::Memberstack)
                    && rules.tie == TieWinner::Supabase)
        }),
        Authority::Memberstack => match (&st.value, st.source) {
            (Some(_), Some(Side::Memberstack)) => false,
            // Nothing known from Memberstack yet: adopt what Supabase has.
            _ => {
                st.value = Some(v.clone());
                st.synced_at = Some(t);
                st.source = Some(Side::Supabase);
                return outcome(Verdict::Applied, st);
            }
        },
    };
    if supabase_wins {
        st.value = Some(v.clone());
        st.synced_at = Some(t);
        st.source = Some(Side::Supabase);
        let mut r = outcome(Verdict::Applied, st);
        r.push_memberstack = Some(v.clone());
        return r;
    }
    // The agreed value is newer (or owned by Memberstack): it stands, and Supabase gets it
    // back if the row no longer holds it.
    let agreed = st.value.clone().unwrap_or(Value::Null);
    let verdict = if rules.authority == Authority::Memberstack {
        Verdict::Reverted
    } else {
        Verdict::Stale
    };
    let mut r = outcome(verdict, st);
    r.conflict = Some(Conflict {
        winner: Side::Memberstack,
        winning: agreed.clone(),
        losing: v.clone(),
    });
    if sb.value.as_ref().is_none_or(|now| !same(n, now, &agreed)) {
        r.write_supabase = Some(agreed);
    }
    r
}

#[cfg(test)]
mod tests;
