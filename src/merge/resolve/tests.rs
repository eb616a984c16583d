use chrono::TimeZone;
use proptest::prelude::*;
use serde_json::json;

use super::*;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_700_000_000_000 + ms).unwrap()
}

fn rules(authority: Authority, now: i64) -> Rules {
    Rules {
        authority,
        normalize: Normalize::None,
        writable: true,
        now: at(now),
        echo_window: Duration::seconds(600),
        tie: TieWinner::Supabase,
    }
}

fn agreed(value: Value, t: i64, source: Side) -> FieldState {
    FieldState {
        value: Some(value),
        synced_at: Some(at(t)),
        source: Some(source),
        ..Default::default()
    }
}

fn row(value: Value, edited: i64) -> SupabaseNow {
    SupabaseNow {
        value: Some(value),
        edited_at: Some(at(edited)),
    }
}

fn ms(value: Value, t: i64) -> Incoming {
    Incoming {
        side: Side::Memberstack,
        value,
        at: at(t),
        replayed: false,
        snapshot: false,
    }
}

fn sb(value: Value, t: i64) -> Incoming {
    Incoming {
        side: Side::Supabase,
        value,
        at: at(t),
        replayed: false,
        snapshot: false,
    }
}

#[test]
fn memberstack_owned_field_follows_memberstack() {
    let r = resolve(
        &rules(Authority::Memberstack, 100),
        &agreed(json!("a@x"), 1, Side::Memberstack),
        &row(json!("a@x"), 1),
        &ms(json!("b@x"), 50),
    );
    assert_eq!(r.verdict, Verdict::Applied);
    assert_eq!(r.write_supabase, Some(json!("b@x")));
    assert_eq!(r.push_memberstack, None);
}

#[test]
fn supabase_edit_of_a_memberstack_field_is_reverted() {
    let r = resolve(
        &rules(Authority::Memberstack, 100),
        &agreed(json!("a@x"), 1, Side::Memberstack),
        &row(json!("hacked@x"), 60),
        &sb(json!("hacked@x"), 60),
    );
    assert_eq!(r.verdict, Verdict::Reverted);
    assert_eq!(r.write_supabase, Some(json!("a@x")));
    assert_eq!(r.conflict.unwrap().winner, Side::Memberstack);
}

#[test]
fn memberstack_edit_of_a_supabase_field_is_overwritten() {
    let r = resolve(
        &rules(Authority::Supabase, 100),
        &agreed(json!({"p": 1}), 1, Side::Supabase),
        &row(json!({"p": 1}), 1),
        &ms(json!({"p": 2}), 50),
    );
    assert_eq!(r.verdict, Verdict::Reverted);
    assert_eq!(r.push_memberstack, Some(json!({"p": 1})));
    assert_eq!(r.write_supabase, None);
    // The push is only decided: its echo and time are the pusher's to record.
    assert!(r.state.echoes.is_empty());
    assert_eq!(r.state.pushed_at, None);
}

#[test]
fn our_own_push_coming_back_is_an_echo() {
    let first = resolve(
        &rules(Authority::Latest, 10),
        &agreed(json!("x"), 1, Side::Memberstack),
        &row(json!("y"), 5),
        &sb(json!("y"), 5),
    );
    assert_eq!(first.push_memberstack, Some(json!("y")));
    // What the pusher records when it claims the push (merge's outbox).
    let mut pushed = first.state.clone();
    pushed.echoes.push(Echo {
        value: json!("y"),
        at: at(12),
    });
    let echo = resolve(
        &rules(Authority::Latest, 20),
        &pushed,
        &row(json!("y"), 5),
        &ms(json!("y"), 11),
    );
    assert_eq!(echo.verdict, Verdict::Echo);
    assert!(echo.write_supabase.is_none() && echo.push_memberstack.is_none());
    assert!(echo.state.echoes.is_empty());
}

#[test]
fn latest_ties_go_to_supabase_by_default() {
    // The row changed at 50 (CDC on its way), the webhook is from 50 too: Supabase keeps it.
    let state = agreed(json!("x"), 1, Side::Memberstack);
    let r = resolve(
        &rules(Authority::Latest, 100),
        &state,
        &row(json!("sb"), 50),
        &ms(json!("ms"), 50),
    );
    assert_eq!(r.verdict, Verdict::Stale);
    assert_eq!(r.write_supabase, None);
    // The webhook was processed first: the Supabase edit of the same instant wins and is pushed.
    let state = agreed(json!("ms"), 50, Side::Memberstack);
    let r = resolve(
        &rules(Authority::Latest, 100),
        &state,
        &row(json!("sb"), 50),
        &sb(json!("sb"), 50),
    );
    assert_eq!(r.verdict, Verdict::Applied);
    assert_eq!(r.push_memberstack, Some(json!("sb")));
}

#[test]
fn latest_ties_go_to_memberstack_when_configured() {
    let mut rules_ms = rules(Authority::Latest, 100);
    rules_ms.tie = TieWinner::Memberstack;
    let state = agreed(json!("x"), 1, Side::Memberstack);
    let r = resolve(
        &rules_ms,
        &state,
        &row(json!("sb"), 50),
        &ms(json!("ms"), 50),
    );
    assert_eq!(r.verdict, Verdict::Applied);
    assert_eq!(r.write_supabase, Some(json!("ms")));
    let state = agreed(json!("ms"), 50, Side::Memberstack);
    let r = resolve(
        &rules_ms,
        &state,
        &row(json!("sb"), 50),
        &sb(json!("sb"), 50),
    );
    assert_eq!(
        r.push_memberstack, None,
        "the Memberstack value of the same instant stands"
    );
    assert_eq!(r.write_supabase, Some(json!("ms")));
}

#[test]
fn an_unsynced_supabase_edit_beats_an_older_webhook() {
    // The row changed at 60 (its CDC event is still on the way); the webhook is from 50.
    let r = resolve(
        &rules(Authority::Latest, 100),
        &agreed(json!("x"), 1, Side::Memberstack),
        &row(json!("sb"), 60),
        &ms(json!("ms"), 50),
    );
    assert_eq!(r.verdict, Verdict::Stale);
    assert_eq!(r.write_supabase, None);
}

#[test]
fn expired_echoes_are_forgotten() {
    let mut state = agreed(json!("y"), 1, Side::Supabase);
    state.echoes.push(Echo {
        value: json!("y"),
        at: at(0),
    });
    let mut r = rules(Authority::Latest, 700_000);
    r.echo_window = Duration::seconds(600);
    let res = resolve(&r, &state, &row(json!("y"), 1), &ms(json!("y"), 650_000));
    assert_eq!(res.verdict, Verdict::Unchanged);
    assert!(res.state.echoes.is_empty());
}

// ---------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("a")),
        Just(json!("b")),
        Just(json!("c")),
        Just(json!(1)),
        Just(Value::Null)
    ]
}

fn authority() -> impl Strategy<Value = Authority> {
    prop_oneof![
        Just(Authority::Memberstack),
        Just(Authority::Supabase),
        Just(Authority::Latest)
    ]
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Memberstack), Just(Side::Supabase)]
}

prop_compose! {
    fn field_state()(
        value in proptest::option::of(value()),
        synced in proptest::option::of(0i64..100),
        source in proptest::option::of(side()),
        pushed in proptest::option::of((value(), 0i64..100)),
        echoes in proptest::collection::vec((value(), 0i64..100), 0..3),
        ms_seen in proptest::option::of(value()),
        sb_seen in proptest::option::of(value()),
    ) -> FieldState {
        FieldState {
            value,
            synced_at: synced.map(at),
            source,
            pushed_value: pushed.as_ref().map(|p| p.0.clone()),
            pushed_at: pushed.map(|p| at(p.1)),
            echoes: echoes.into_iter().map(|(value, t)| Echo { value, at: at(t) }).collect(),
            memberstack_seen: ms_seen,
            supabase_seen: sb_seen,
        }
    }
}

prop_compose! {
    fn supabase_now()(value in proptest::option::of(value()), edited in 0i64..100) -> SupabaseNow {
        SupabaseNow { value, edited_at: Some(at(edited)) }
    }
}

prop_compose! {
    fn incoming()(side in side(), value in value(), t in 0i64..100, snap in any::<bool>()) -> Incoming {
        // Snapshots come from Memberstack's side only.
        Incoming { side, value, at: at(t), replayed: false, snapshot: snap && side == Side::Memberstack }
    }
}

proptest! {
    #[test]
    fn deterministic(a in authority(), s in field_state(), now in supabase_now(), inc in incoming()) {
        let r = rules(a, 200);
        prop_assert_eq!(resolve(&r, &s, &now, &inc), resolve(&r, &s, &now, &inc));
    }

    /// Applying a resolution and then resolving the same change again writes nothing more
    /// (a change processed twice has one effect; an echo is consumed at most once first).
    #[test]
    fn idempotent(a in authority(), s in field_state(), now in supabase_now(), inc in incoming()) {
        let r = rules(a, 200);
        let mut state = s;
        let mut supabase = now;
        let mut writes = 0;
        for round in 0..3 {
            let res = resolve(&r, &state, &supabase, &inc);
            if round == 2 {
                prop_assert!(res.write_supabase.is_none(), "third application wrote Supabase: {:?}", res);
                prop_assert!(res.push_memberstack.is_none(), "third application pushed: {:?}", res);
            }
            writes += res.write_supabase.is_some() as u32 + res.push_memberstack.is_some() as u32;
            if let Some(w) = res.write_supabase {
                supabase.value = Some(w);
            }
            state = match &res.push_memberstack {
                Some(p) => pushed(&res.state, p, 200),
                None => res.state,
            };
        }
        prop_assert!(writes <= 2);
    }

    /// Nothing written is what the target already holds.
    #[test]
    fn no_redundant_supabase_write(a in authority(), s in field_state(), now in supabase_now(), inc in incoming()) {
        let res = resolve(&rules(a, 200), &s, &now, &inc);
        if let (Some(w), Some(v)) = (&res.write_supabase, &now.value) {
            prop_assert_ne!(w, v);
        }
    }

    /// Two concurrent edits of an agreed field — one in Memberstack, one in Supabase —
    /// processed in either order, with every push echoed back as a webhook, end with both
    /// sides holding the authority's value, in a bounded number of writes.
    #[test]
    fn concurrent_edits_converge(
        a in authority(),
        start in value(),
        ms_value in value(),
        sb_value in value(),
        ms_time in 1i64..50,
        sb_time in 1i64..50,
        memberstack_first in any::<bool>(),
        noise in any::<bool>(),
    ) {
        let expected = match a {
            Authority::Memberstack => ms_value.clone(),
            Authority::Supabase => sb_value.clone(),
            // An exact tie goes to Supabase (`merge.tie_winner` default, the sync rules).
            Authority::Latest => if ms_time > sb_time { ms_value.clone() } else { sb_value.clone() },
        };
        let mut state = agreed(start.clone(), 0, Side::Memberstack);
        state.memberstack_seen = Some(start.clone());
        state.supabase_seen = Some(start.clone());
        let mut world = World {
            memberstack: ms_value.clone(),
            supabase: sb_value.clone(),
            supabase_edited: sb_time,
            state,
            queue: Default::default(),
            now: 100,
            writes: 0,
        };
        let webhook = ms(ms_value.clone(), ms_time);
        let cdc = sb(sb_value.clone(), sb_time);
        // The edits happened unless they were no-ops on their side.
        let mut events = Vec::new();
        if ms_value != start { events.push(Ev::In(webhook)); }
        if sb_value != start { events.push(Ev::In(cdc)); }
        if !memberstack_first { events.reverse(); }
        if noise {
            // Later changes of other fields: whole members / rows carrying this field unchanged,
            // newer than both edits (Memberstack's before any push of ours landed).
            let later = ms_time.max(sb_time) + 1;
            events.push(Ev::In(ms(ms_value.clone(), later)));
            events.push(Ev::In(sb(sb_value.clone(), later)));
        }
        world.queue.extend(events);
        world.run(a);
        let expected = if ms_value == start && sb_value == start { start.clone() }
            else if ms_value == start { if a == Authority::Memberstack { start.clone() } else { sb_value.clone() } }
            else if sb_value == start && a != Authority::Supabase { ms_value.clone() }
            else { expected };
        prop_assert_eq!(&world.memberstack, &expected, "memberstack");
        prop_assert_eq!(&world.supabase, &expected, "supabase");
        prop_assert!(world.writes <= 4, "{} writes", world.writes);
    }
}

/// What the pusher records of a push that goes out at once (merge's outbox): its echo when it
/// claims it, its value and time when Memberstack answers.
fn pushed(state: &FieldState, value: &Value, t: i64) -> FieldState {
    let mut s = state.clone();
    s.echoes.push(Echo {
        value: value.clone(),
        at: at(t),
    });
    s.pushed_value = Some(value.clone());
    s.pushed_at = Some(at(t));
    s
}

/// What merge reads: a change from either side, or the CDC event of its own write.
enum Ev {
    In(Incoming),
    Own(Value),
}

/// Both sides and the queue of changes merge sees, for the convergence property.
struct World {
    memberstack: Value,
    supabase: Value,
    supabase_edited: i64,
    state: FieldState,
    queue: std::collections::VecDeque<Ev>,
    now: i64,
    writes: u32,
}

impl World {
    fn run(&mut self, a: Authority) {
        let mut steps = 0;
        while let Some(ev) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 30, "no quiescence");
            self.now += 10;
            let inc = match ev {
                Ev::Own(v) => {
                    self.state = observe_own_write(&self.state, &v);
                    continue;
                }
                Ev::In(inc) => inc,
            };
            let now = SupabaseNow {
                value: Some(self.supabase.clone()),
                edited_at: Some(at(self.supabase_edited)),
            };
            let res = resolve(&rules(a, self.now), &self.state, &now, &inc);
            self.state = res.state;
            if let Some(w) = res.write_supabase {
                // Our own write: its CDC event is origin-tagged; it only updates what the
                // Supabase stream has shown.
                self.supabase = w.clone();
                self.supabase_edited = self.now;
                self.writes += 1;
                self.queue.push_back(Ev::Own(w));
            }
            if let Some(p) = res.push_memberstack {
                self.state = pushed(&self.state, &p, self.now);
                self.writes += 1;
                if p != self.memberstack {
                    // Memberstack sends a webhook only when the member changed.
                    self.memberstack = p.clone();
                    self.queue.push_back(Ev::In(ms(p, self.now)));
                }
            }
        }
    }
}

/// Found end to end: a webhook made before our last push landed must not overwrite a newer
/// Supabase edit whose CDC event is still on its way.
#[test]
fn a_superseded_webhook_loses_to_an_unsynced_newer_supabase_edit() {
    let mut state = agreed(json!({"k": "9"}), 714, Side::Supabase);
    state.pushed_value = Some(json!({"k": "9"}));
    state.pushed_at = Some(at(1_080));
    state.memberstack_seen = Some(json!({"k": "8"}));
    state.supabase_seen = Some(json!({"k": "9"}));
    let r = resolve(
        &rules(Authority::Latest, 1_300),
        &state,
        &row(json!({"k": "14"}), 1_197),
        &ms(json!({"k": "11"}), 991),
    );
    assert_eq!(r.verdict, Verdict::Stale);
    assert_eq!(r.write_supabase, None);
    assert_eq!(r.push_memberstack, None);
}

fn snapshot(value: Value, t: i64) -> Incoming {
    Incoming {
        snapshot: true,
        ..ms(value, t)
    }
}

#[test]
fn a_snapshot_repairs_owned_drift_the_stream_already_showed() {
    // Memberstack holds a value of a Supabase-owned field that merge has seen before (the
    // revert of it never landed): a webhook repeating it is no edit, a snapshot still repairs.
    let state = FieldState {
        memberstack_seen: Some(json!("ms")),
        ..agreed(json!("sb"), 10, Side::Supabase)
    };
    let supabase = row(json!("sb"), 10);
    let webhook = resolve(
        &rules(Authority::Supabase, 100),
        &state,
        &supabase,
        &ms(json!("ms"), 50),
    );
    assert_eq!(webhook.verdict, Verdict::Unchanged);
    let snap = resolve(
        &rules(Authority::Supabase, 100),
        &state,
        &supabase,
        &snapshot(json!("ms"), 50),
    );
    assert_eq!(snap.verdict, Verdict::Reverted);
    assert_eq!(snap.push_memberstack, Some(json!("sb")));
    // A Memberstack-owned field: Supabase gets Memberstack's value back.
    let state = FieldState {
        memberstack_seen: Some(json!("ms")),
        ..agreed(json!("ms"), 10, Side::Memberstack)
    };
    let snap = resolve(
        &rules(Authority::Memberstack, 100),
        &state,
        &row(json!("edited"), 20),
        &snapshot(json!("ms"), 50),
    );
    assert_eq!(snap.write_supabase, Some(json!("ms")));
}

#[test]
fn a_snapshot_of_a_known_latest_value_does_not_beat_a_newer_supabase_edit() {
    // Supabase edited the field at 20 (its CDC event still on its way); the snapshot read at
    // 50 shows the value merge agreed on at 10: it says nothing about when that was set.
    let state = FieldState {
        memberstack_seen: Some(json!("old")),
        ..agreed(json!("old"), 10, Side::Memberstack)
    };
    let r = resolve(
        &rules(Authority::Latest, 100),
        &state,
        &row(json!("new"), 20),
        &snapshot(json!("old"), 50),
    );
    assert_eq!(r.verdict, Verdict::Unchanged);
    assert_eq!((r.write_supabase, r.push_memberstack), (None, None));
    // A value merge never saw (a missed webhook) counts as read at the snapshot's time.
    let r = resolve(
        &rules(Authority::Latest, 100),
        &state,
        &row(json!("new"), 20),
        &snapshot(json!("missed"), 50),
    );
    assert_eq!(r.write_supabase, Some(json!("missed")));
}

fn replayed(value: Value, t: i64) -> Incoming {
    Incoming {
        replayed: true,
        ..sb(value, t)
    }
}

/// `dlq replay` of an old Supabase edit (A) after a newer one (B) was pushed: Memberstack
/// gets what the row holds now, never the replayed value.
#[test]
fn a_replayed_old_edit_pushes_what_the_row_holds_now() {
    for a in [Authority::Supabase, Authority::Latest] {
        let state = agreed(json!({"v": "B"}), 20, Side::Supabase);
        let r = resolve(
            &rules(a, 100),
            &state,
            &row(json!({"v": "B"}), 20),
            &replayed(json!({"v": "A"}), 10),
        );
        assert_eq!(r.push_memberstack, Some(json!({"v": "B"})), "{a:?}");
        assert_eq!(r.write_supabase, None);
        assert_eq!(r.state.value, Some(json!({"v": "B"})));
    }
}

/// The push of an agreed value failed for good and was dead-lettered: its replay pushes it.
#[test]
fn a_replayed_change_whose_push_failed_pushes_the_agreed_value() {
    let state = agreed(json!({"calls": 7}), 10, Side::Supabase);
    let r = resolve(
        &rules(Authority::Supabase, 100),
        &state,
        &row(json!({"calls": 7}), 10),
        &replayed(json!({"calls": 7}), 10),
    );
    assert_eq!(r.push_memberstack, Some(json!({"calls": 7})));
}

/// Issue #16, item 4: a Supabase edit the row no longer holds (a newer write replaced it, its
/// event still queued) neither reverts the row nor is pushed, whatever the authority.
#[test]
fn a_supabase_edit_the_row_no_longer_holds_neither_reverts_nor_pushes() {
    for a in [
        Authority::Latest,
        Authority::Memberstack,
        Authority::Supabase,
    ] {
        let r = resolve(
            &rules(a, 100),
            &agreed(json!("M"), 50, Side::Memberstack),
            &row(json!("B"), 70),
            &sb(json!("A"), 40),
        );
        assert_eq!(r.verdict, Verdict::Stale, "{a:?}");
        assert_eq!(r.write_supabase, None, "{a:?}: no revert over B");
        assert_eq!(r.push_memberstack, None, "{a:?}: A is not pushed");
        assert_eq!(r.state.supabase_seen, Some(json!("A")));
        assert_eq!(r.state.value, Some(json!("M")));
    }
}

/// Issue #16, item 4: a Supabase edit is dated by its column's write time, the time a
/// Memberstack edit was judged against while the CDC event was on its way, not by the later
/// commit time the event carries.
#[test]
fn a_supabase_edit_is_dated_by_its_write_not_its_commit() {
    // Written at 40, committed at 60; a Memberstack edit made at 50 is newer.
    let mut st = agreed(json!("old"), 10, Side::Memberstack);
    st.supabase_seen = Some(json!("old"));
    st.memberstack_seen = Some(json!("M"));
    st.value = Some(json!("M"));
    st.synced_at = Some(at(50));
    let r = resolve(
        &rules(Authority::Latest, 100),
        &st,
        &row(json!("A"), 40),
        &sb(json!("A"), 60),
    );
    assert_eq!(r.verdict, Verdict::Stale);
    assert_eq!(r.push_memberstack, None);
    assert_eq!(
        r.write_supabase,
        Some(json!("M")),
        "the older A is reverted"
    );
}
