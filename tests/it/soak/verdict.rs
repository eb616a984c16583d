//! The verdict, from ground truth after quiescence. Each check lists exactly which member,
//! field or id violated it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use membersync::sim::memberstack::DeliveryStatus;
use rdkafka::Message;
use serde_json::{Value, json};

use super::observe::{self, Sample};
use super::stack::Stack;
use super::traffic::{Truth, normalise};

pub struct Check {
    pub name: &'static str,
    /// What was compared, e.g. "40 members".
    pub scope: String,
    pub violations: Vec<String>,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Records in a topic against distinct ids (informational: at-least-once produces duplicates).
pub struct Duplicates {
    pub topic: String,
    pub records: usize,
    pub distinct: usize,
}

pub struct Resources {
    pub rss_start_mb: f64,
    pub rss_end_mb: f64,
    pub rss_max_mb: f64,
    pub fds_start: u64,
    pub fds_end: u64,
    pub fds_max: u64,
    /// Median of the first and last third of the samples taken ≥ `WARM` after a (re)start.
    pub rss_first_third_mb: f64,
    pub rss_last_third_mb: f64,
    pub fds_first_third: f64,
    pub fds_last_third: f64,
}

/// Samples this soon after a (re)start are warm-up, left out of the growth comparison.
const WARM: f64 = 10.0;

pub struct Members {
    pub memberstack: Vec<String>,
    pub sql: Vec<String>,
    pub stripe: Vec<String>,
}

pub struct Verdict {
    pub checks: Vec<Check>,
    pub duplicates: Vec<Duplicates>,
    pub resources: Option<Resources>,
    pub accepted_webhooks: usize,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::ok)
    }
}

pub async fn judge(
    stack: &Stack,
    members: &Members,
    truth: &Truth,
    samples: &[Sample],
    quiescence: Result<(), String>,
) -> Verdict {
    let mut checks = vec![Check {
        name: "quiescence (webhooks delivered, consumer lag 0, no writes for 5 s)",
        scope: "bounded wait".into(),
        violations: quiescence.err().into_iter().collect(),
    }];
    let admin = stack.admin().await;
    let rows: HashMap<String, Value> = admin
        .query(
            "select memberstack_id, to_jsonb(m) from public.members m",
            &[],
        )
        .await
        .expect("read members")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let sim = |id: &str| serde_json::to_value(stack.ms.member(id)).unwrap_or(Value::Null);

    // 1. Memberstack → Supabase: the last dashboard value of a `latest` field only Memberstack
    // edits.
    let mut v = Vec::new();
    for id in &members.memberstack {
        let want = truth.ms_last.get(id).map(u64::to_string);
        let Some(want) = want else { continue };
        let row = rows.get(id).cloned().unwrap_or(Value::Null);
        let got = row["custom_fields"]["ms_seq"].as_str().map(str::to_owned);
        if got.as_deref() != Some(want.as_str()) {
            v.push(format!(
                "{id}: members.custom_fields.ms_seq = {got:?}, Memberstack's last edit set {want:?}"
            ));
        }
        let in_sim = sim(id)["customFields"]["ms_seq"]
            .as_str()
            .map(str::to_owned);
        if in_sim.as_deref() != Some(want.as_str()) {
            v.push(format!(
                "{id}: Memberstack customFields.ms_seq = {in_sim:?}, expected {want:?} (nothing may overwrite it)"
            ));
        }
    }
    checks.push(Check {
        name: "Memberstack edits reflected in Supabase (custom_fields, latest)",
        scope: format!(
            "{} members, {} dashboard edits",
            members.memberstack.len(),
            truth.ms_edits
        ),
        violations: v,
    });

    // 2. Supabase → Memberstack: the last committed SQL value of a Supabase-owned field.
    let mut v = Vec::new();
    for id in &members.sql {
        let Some(last) = truth.sql_last.get(id) else {
            continue;
        };
        let mut allowed = vec![json!({"sql_seq": last})];
        for n in truth.sql_ambiguous.get(id).into_iter().flatten() {
            allowed.push(json!({"sql_seq": n}));
        }
        let row = rows.get(id).cloned().unwrap_or(Value::Null);
        let got = row["project_data"].clone();
        if !allowed.contains(&got) {
            v.push(format!(
                "{id}: members.project_data = {got}, last committed SQL value {}",
                allowed[0]
            ));
        }
        let pushed = sim(id)["metaData"]["project_data"].clone();
        if pushed != got {
            v.push(format!(
                "{id}: Memberstack metaData.project_data = {pushed}, Supabase holds {got}"
            ));
        }
    }
    checks.push(Check {
        name: "Supabase edits reflected in Memberstack (project_data, Supabase-owned)",
        scope: format!(
            "{} members, {} committed SQL updates",
            members.sql.len(),
            truth.sql_commits
        ),
        violations: v,
    });

    // 3. Stripe → Supabase (row and auth user metadata).
    let mut v = Vec::new();
    let users: HashMap<String, Value> = admin
        .query("select id::text, raw_user_meta_data from auth.users", &[])
        .await
        .expect("read auth.users")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for id in &members.stripe {
        let Some(last) = truth.stripe_last.get(id) else {
            continue;
        };
        let row = rows.get(id).cloned().unwrap_or(Value::Null);
        if row["subscription_status"] != normalise(last) || row["subscription_status_raw"] != *last
        {
            v.push(format!(
                "{id}: members.subscription_status = {} (raw {}), last Stripe event said {last} ({})",
                row["subscription_status"],
                row["subscription_status_raw"],
                normalise(last)
            ));
        }
        let meta = row["user_id"]
            .as_str()
            .and_then(|u| users.get(u))
            .map(|m| m["subscription_status"].clone())
            .unwrap_or(Value::Null);
        if meta != normalise(last) {
            v.push(format!(
                "{id}: auth user_metadata.subscription_status = {meta}, expected {}",
                normalise(last)
            ));
        }
    }
    for id in &truth.stripe_lost {
        v.push(format!(
            "Stripe event {id} was never accepted (non-2xx for 180 s)"
        ));
    }
    checks.push(Check {
        name: "Stripe events reflected in Supabase (row and auth user)",
        scope: format!(
            "{} members, {} accepted events",
            members.stripe.len(),
            truth.stripe_accepted.len()
        ),
        violations: v,
    });

    // 4. Exactly-once effect: every accepted webhook id is in webhook_log exactly once.
    let logged: HashMap<String, i64> = admin
        .query(
            "select event_id, count(*) from public.webhook_log group by event_id",
            &[],
        )
        .await
        .expect("read webhook_log")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut v = Vec::new();
    let deliveries = stack.ms.deliveries();
    let mut accepted: Vec<(String, &str)> = Vec::new();
    for d in &deliveries {
        match d.status {
            DeliveryStatus::Delivered => accepted.push((d.svix_id.clone(), "memberstack")),
            DeliveryStatus::Failed => v.push(format!(
                "webhook {} ({} of {}) never accepted after {} attempts (last status {:?}, error {:?})",
                d.svix_id, d.event, d.member_id, d.attempts, d.last_response_status, d.last_error
            )),
            DeliveryStatus::Pending => v.push(format!(
                "webhook {} ({} of {}) still pending",
                d.svix_id, d.event, d.member_id
            )),
        }
    }
    accepted.extend(
        truth
            .stripe_accepted
            .iter()
            .map(|id| (id.clone(), "stripe")),
    );
    for (id, source) in &accepted {
        let n = logged.get(id).copied().unwrap_or(0);
        if n != 1 {
            v.push(format!(
                "{source} webhook {id}: {n} webhook_log rows (exactly one effect expected)"
            ));
        }
    }
    checks.push(Check {
        name: "every accepted webhook had exactly one effect (webhook_log)",
        scope: format!("{} accepted webhooks", accepted.len()),
        violations: v,
    });

    // 5. The dead-letter topic holds the poison and nothing else; 6. duplicates per topic.
    let brokers = stack.broker.addr();
    let read = |topic: String| {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || {
            observe::read_all(&brokers, &topic, Duration::from_secs(60))
        })
    };
    let mut v = Vec::new();
    let mut duplicates = Vec::new();
    let mut dead_keys: BTreeMap<String, usize> = BTreeMap::new();
    match read(stack.topic("dlq")).await.unwrap() {
        Ok(records) => {
            for r in &records {
                let letter: Value = r
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or(Value::Null);
                let key = letter["key"].as_str().unwrap_or_default().to_owned();
                if truth.poison.contains(&key) || truth.poison_unacknowledged.contains(&key) {
                    *dead_keys.entry(key).or_default() += 1;
                } else {
                    v.push(format!(
                        "dead letter not injected: event {} of {} from {} ({}: {})",
                        letter["event_id"],
                        letter["member_id"],
                        letter["origin"]["topic"],
                        letter["error"]["kind"],
                        letter["error"]["message"]
                    ));
                }
            }
            duplicates.push(Duplicates {
                topic: "dlq (by poison key)".into(),
                records: dead_keys.values().sum(),
                distinct: dead_keys.len(),
            });
        }
        Err(e) => v.push(format!("cannot read the dead-letter topic: {e}")),
    }
    for key in &truth.poison {
        if !dead_keys.contains_key(key) {
            v.push(format!(
                "poison record {key} is not in the dead-letter topic"
            ));
        }
    }
    checks.push(Check {
        name: "the dead-letter topic holds exactly the injected poison",
        scope: format!("{} poison records injected", truth.poison.len()),
        violations: v,
    });
    for suffix in ["memberstack", "stripe", "cdc.public.members", "sync"] {
        let records = match read(stack.topic(suffix)).await.unwrap() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("soak: cannot count {suffix}: {e}");
                continue;
            }
        };
        let ids: BTreeSet<Vec<u8>> = records
            .iter()
            .filter(|r| !r.key().is_some_and(|k| k.starts_with(b"soak-poison-")))
            .map(|r| {
                crate::support::kafka::header(r, "membersync_event_id")
                    .map(String::into_bytes)
                    .unwrap_or_else(|| r.payload().unwrap_or_default().to_vec())
            })
            .collect();
        let poison = records
            .iter()
            .filter(|r| r.key().is_some_and(|k| k.starts_with(b"soak-poison-")))
            .count();
        duplicates.push(Duplicates {
            topic: suffix.into(),
            records: records.len() - poison,
            distinct: ids.len(),
        });
    }

    // The broker itself: a panic while it serves (e.g. in Tansu's storage) fails requests until
    // it restarts, which shows up as violations above that are not membersync's. Panics on the
    // way out after a SIGTERM (support::broker::Broker::panics) are counted in the scope only.
    let panics = stack.broker.panics();
    checks.push(Check {
        name: "the broker stayed healthy (no panic while serving)",
        scope: format!(
            "Tansu's log; {} panic(s) during an orderly stop not counted",
            panics.while_stopping.len()
        ),
        violations: panics
            .while_serving
            .into_iter()
            .map(|p| format!("the broker (Tansu) panicked: {p}"))
            .collect(),
    });

    // 7. RSS and open file descriptors.
    let resources = resources(samples);
    let mut v = Vec::new();
    if let Some(r) = &resources {
        if r.rss_last_third_mb > 2.0 * r.rss_first_third_mb + 64.0 {
            v.push(format!(
                "RSS grew: median {:.1} MB in the last third vs {:.1} MB in the first (bound 2× + 64 MB)",
                r.rss_last_third_mb, r.rss_first_third_mb
            ));
        }
        if r.fds_last_third > 2.0 * r.fds_first_third + 32.0 {
            v.push(format!(
                "open fds grew: median {:.0} in the last third vs {:.0} in the first (bound 2× + 32)",
                r.fds_last_third, r.fds_first_third
            ));
        }
    } else {
        v.push("no resource samples".into());
    }
    checks.push(Check {
        name: "RSS and open file descriptors bounded",
        scope: format!(
            "{} samples, warm-up {WARM} s after each start left out",
            samples.len()
        ),
        violations: v,
    });

    Verdict {
        checks,
        duplicates,
        resources,
        accepted_webhooks: accepted.len(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn resources(samples: &[Sample]) -> Option<Resources> {
    let measured: Vec<&Sample> = samples.iter().filter(|s| s.rss_kb.is_some()).collect();
    if measured.is_empty() {
        return None;
    }
    // Each pid's first sample time: its start, near enough.
    let mut started: HashMap<u32, f64> = HashMap::new();
    for s in &measured {
        started.entry(s.pid).or_insert(s.t);
    }
    let warm: Vec<&Sample> = measured
        .iter()
        .copied()
        .filter(|s| s.t - started[&s.pid] >= WARM)
        .collect();
    let pool = if warm.len() >= 6 {
        warm
    } else {
        measured.clone()
    };
    let third = (pool.len() / 3).max(1);
    let mb = |s: &&Sample| s.rss_kb.unwrap_or(0) as f64 / 1024.0;
    let fd = |s: &&Sample| s.fds.unwrap_or(0) as f64;
    let first = &pool[..third];
    let last = &pool[pool.len() - third..];
    Some(Resources {
        rss_start_mb: mb(&measured[0]),
        rss_end_mb: mb(measured.last().unwrap()),
        rss_max_mb: measured.iter().map(mb).fold(0.0, f64::max),
        fds_start: measured[0].fds.unwrap_or(0),
        fds_end: measured.last().unwrap().fds.unwrap_or(0),
        fds_max: measured.iter().filter_map(|s| s.fds).max().unwrap_or(0),
        rss_first_third_mb: median(first.iter().map(mb).collect()),
        rss_last_third_mb: median(last.iter().map(mb).collect()),
        fds_first_third: median(first.iter().map(fd).collect()),
        fds_last_third: median(last.iter().map(fd).collect()),
    })
}
