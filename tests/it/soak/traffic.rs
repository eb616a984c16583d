//! Steady mixed traffic from both sides, and the ground truth of what was committed where.
//!
//! Members are split by who changes them, so that the expected final state follows from the
//! authority rules alone (docs/merge.md), without modelling clock races:
//! - Memberstack members: `customFields.ms_seq` edited in the dashboard (the simulator sends
//!   the Svix-signed `member.updated`); `custom_fields` is a `latest` field and only
//!   Memberstack edits it, so the last dashboard value must end up in `members.custom_fields`;
//! - SQL members: `members.project_data` updated by SQL (Supabase owns it): the last committed
//!   value must end up in Memberstack's `metaData.project_data`;
//! - Stripe members: `customer.subscription.updated` events, Stripe-signed, retried until a
//!   2xx like Stripe does: the last status must end up in `members.subscription_status(_raw)`
//!   and in the auth user's `user_metadata.subscription_status`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use membersync::ingest::verify::stripe::StripeVerifier;
use membersync::sim::memberstack::MemberstackSim;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio::time::MissedTickBehavior;

/// Stripe statuses in an order where each normalises differently from the one before
/// (active, inactive, cancelled, inactive, active, cancelled), so every event is a real change
/// and the raw column must hold the last one.
pub const STRIPE_CYCLE: [&str; 6] = [
    "past_due",
    "canceled",
    "unpaid",
    "trialing",
    "incomplete_expired",
    "active",
];

pub fn normalise(status: &str) -> &'static str {
    match status {
        "active" | "trialing" => "active",
        "canceled" | "incomplete_expired" => "cancelled",
        _ => "inactive",
    }
}

#[derive(Default)]
pub struct Truth {
    /// Memberstack member → last `ms_seq` set in the dashboard.
    pub ms_last: BTreeMap<String, u64>,
    pub ms_edits: u64,
    /// SQL member → last committed `project_data.sql_seq`.
    pub sql_last: BTreeMap<String, u64>,
    /// SQL member → values whose commit is unknown (the connection died mid-statement) and
    /// that came after the last confirmed one: either may be the final value.
    pub sql_ambiguous: BTreeMap<String, Vec<u64>>,
    pub sql_commits: u64,
    /// Updates not attempted or failed (Postgres restarting).
    pub sql_failures: u64,
    /// Stripe member → last accepted status.
    pub stripe_last: BTreeMap<String, &'static str>,
    pub stripe_accepted: BTreeSet<String>,
    /// Stripe events never accepted within the sender's retry budget.
    pub stripe_lost: Vec<String>,
    pub stripe_retries: u64,
    /// Keys of the poison records produced straight to the memberstack topic.
    pub poison: BTreeSet<String>,
    /// Poison the broker never acknowledged (within 120 s).
    pub poison_unacknowledged: BTreeSet<String>,
}

pub type Shared = Mutex<Truth>;

fn ticker(rate: f64) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

/// Dashboard edits of `customFields.ms_seq`, round-robin over `members`, at `rate` per second.
pub async fn memberstack_edits(
    ms: &MemberstackSim,
    members: &[String],
    rate: f64,
    until: Instant,
    truth: &Shared,
) {
    let mut tick = ticker(rate);
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let id = &members[n as usize % members.len()];
        let patch =
            serde_json::from_value(json!({"customFields": {"ms_seq": n.to_string()}})).unwrap();
        ms.dashboard_update(id, &patch).expect("dashboard update");
        let mut t = truth.lock().unwrap();
        t.ms_last.insert(id.clone(), n);
        t.ms_edits += 1;
    }
}

/// `update public.members set project_data` by SQL, one autocommit statement each, through a
/// connection that is re-opened after Postgres restarts.
pub async fn sql_edits(
    pg: tokio_postgres::Config,
    members: &[String],
    rate: f64,
    until: Instant,
    truth: &Shared,
) {
    let mut tick = ticker(rate);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let id = &members[n as usize % members.len()];
        super::ensure_connected(&mut client, &pg, Duration::from_secs(3)).await;
        let Some(c) = &client else {
            truth.lock().unwrap().sql_failures += 1;
            continue;
        };
        let value = json!({"sql_seq": n});
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            c.execute(
                "update public.members set project_data = $1 where memberstack_id = $2",
                &[&value, id],
            ),
        )
        .await;
        let mut t = truth.lock().unwrap();
        match result {
            Ok(Ok(1)) => {
                t.sql_last.insert(id.clone(), n);
                t.sql_ambiguous.remove(id);
                t.sql_commits += 1;
            }
            Ok(Ok(rows)) => panic!("the update of {id} touched {rows} rows"),
            Ok(Err(_)) | Err(_) => {
                // Not known whether it committed: the connection may have died at commit.
                t.sql_ambiguous.entry(id.clone()).or_default().push(n);
                t.sql_failures += 1;
                client = None;
            }
        }
    }
}

/// Stripe `customer.subscription.updated` events, one at a time, each retried until a 2xx
/// (Stripe retries for days; here up to `give_up`).
pub async fn stripe_events(
    ingest: String,
    members: &[String],
    rate: f64,
    until: Instant,
    seed: u64,
    truth: &Shared,
) {
    let signer = StripeVerifier::new(&[STRIPE_SECRET.to_owned().into()]).unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let give_up = Duration::from_secs(180);
    let mut tick = ticker(rate);
    let mut k = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let id = &members[k % members.len()];
        let status = STRIPE_CYCLE[(k / members.len()) % STRIPE_CYCLE.len()];
        k += 1;
        let event_id = format!("evt_soak_{seed:x}_{k}");
        let body = json!({
            "id": event_id, "object": "event", "type": "customer.subscription.updated",
            "created": chrono::Utc::now().timestamp(),
            "data": {"object": {"id": format!("sub_{id}"), "object": "subscription",
                     "customer": format!("cus_{id}"), "status": status,
                     "metadata": {"memberstack_user_id": id}}}
        })
        .to_string();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        let accepted = loop {
            let ts = chrono::Utc::now().timestamp();
            let resp = http
                .post(format!("{ingest}/webhooks/stripe"))
                .header("content-type", "application/json")
                .header(
                    "stripe-signature",
                    signer.signature_header(ts, body.as_bytes()),
                )
                .body(body.clone())
                .send()
                .await;
            if resp.is_ok_and(|r| r.status().is_success()) {
                break true;
            }
            truth.lock().unwrap().stripe_retries += 1;
            if started.elapsed() > give_up {
                break false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        let mut t = truth.lock().unwrap();
        if accepted {
            t.stripe_accepted.insert(event_id);
            t.stripe_last.insert(id.clone(), status);
        } else {
            t.stripe_lost.push(event_id);
        }
    }
}

use super::stack::STRIPE_SECRET;

/// Poison: records that are no ingest envelope, produced straight to the memberstack topic at
/// `at` (seconds after `t0`), each retried until the broker acknowledges it.
pub async fn poison(brokers: String, topic: String, at: Vec<f64>, t0: Instant, truth: &Shared) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("message.timeout.ms", "20000")
        .create()
        .expect("poison producer");
    for (i, secs) in at.iter().enumerate() {
        let due = t0 + Duration::from_secs_f64(*secs);
        tokio::time::sleep_until(due.into()).await;
        let key = format!("soak-poison-{i}");
        let payload = format!("\u{1}poison {i}: not a webhook envelope");
        let started = Instant::now();
        let produced = loop {
            let record = FutureRecord::to(&topic).key(&key).payload(&payload);
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => break true,
                Err(_) if started.elapsed() > Duration::from_secs(120) => break false,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        let mut t = truth.lock().unwrap();
        if produced {
            t.poison.insert(key);
        } else {
            // Maybe on the topic after all: a dead letter with this key is then no finding.
            t.poison_unacknowledged.insert(key);
        }
    }
}
