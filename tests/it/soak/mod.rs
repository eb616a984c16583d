//! Soak and chaos (issue #8): `membersync run` under sustained mixed traffic while the daemon,
//! the broker, Postgres and the Memberstack API fail on a seeded schedule; then, after
//! quiescence, a verdict from ground truth (`verdict.rs`) and a report with a plot
//! (`report.rs`). Everything is private to the run (`stack.rs`): its own Postgres cluster,
//! Tansu broker with SQLite storage, simulators and daemon process.
//!
//! - `MEMBERSYNC_SOAK_SECS` (120): seconds of traffic; faults fall in the first 75 % (at most
//!   the whole run less 15 s), the rest is for recovery. The committed report is a 600-s run.
//! - `MEMBERSYNC_SOAK_SEED` (random, printed): the fault schedule, the poison times, the order
//!   of Stripe statuses follow from it.
//! - `MEMBERSYNC_SOAK_FAULTS` (`daemon,broker,postgres,5xx,429,slow,postgres-outage,503-outage`):
//!   which faults, a subset of those and `daemon-stop` (SIGTERM + restart), `broker-kill`
//!   (SIGKILL + restart). The outages last 60 s (Postgres stopped) and 120 s (every Memberstack
//!   request answered 503) in runs of 600 s or more, 10 s and 20 s in the 120-s profile. The
//!   broker must be Tansu with scripts/tansu-patches/ (what `scripts/dev-services up` builds).
//! - `MEMBERSYNC_SOAK_OVERLAP` (unset): `1` injects every fault at its planned time; by default
//!   a fault waits until merge has caught up after the previous one (see faults.rs).
//! - `MEMBERSYNC_SOAK_OUT` (`target/soak/soak.md`): the report; the plot goes next to it
//!   (`.png`). The daemon's and the broker's logs go to `target/soak/<report name>.daemon.log`
//!   and `.broker.log` (not next to a committed report).
//!
//! Reproduce: `MEMBERSYNC_SOAK_SECS=600 MEMBERSYNC_SOAK_SEED=<seed>
//! MEMBERSYNC_SOAK_OUT=bench/results/soak.md scripts/test -E 'test(/^soak::/)'`.

mod faults;
mod observe;
mod report;
mod stack;
mod traffic;
mod verdict;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::{self, wait_for};
use stack::Stack;
use verdict::Members;

/// Members per group (see traffic.rs).
const MEMBERSTACK_MEMBERS: usize = 12;
const SQL_MEMBERS: usize = 8;
const STRIPE_MEMBERS: usize = 4;
/// Offered changes per second.
const WEBHOOK_RATE: f64 = 4.0;
const SQL_RATE: f64 = 3.0;
const STRIPE_RATE: f64 = 1.0;
/// Quiescence: this long without a new processed change, PATCH or row change.
const QUIET: Duration = Duration::from_secs(5);

pub struct Settings {
    pub secs: u64,
    pub seed: u64,
    pub out: PathBuf,
    /// Seconds at the end without faults.
    pub recovery: u64,
    pub quiesce_timeout: Duration,
    pub faults: Vec<faults::Kind>,
    /// Inject each fault at its planned time even if merge has not recovered from the last.
    pub overlap: bool,
    /// The long outages at their full length (60 s and 120 s) whatever the run's length.
    pub full_outages: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let secs: u64 = var("MEMBERSYNC_SOAK_SECS")
            .map(|v| v.parse().expect("MEMBERSYNC_SOAK_SECS: seconds"))
            .unwrap_or(120);
        assert!(secs >= 30, "MEMBERSYNC_SOAK_SECS must be at least 30");
        let seed = var("MEMBERSYNC_SOAK_SEED")
            .map(|v| {
                v.parse()
                    .expect("MEMBERSYNC_SOAK_SEED: an unsigned integer")
            })
            .unwrap_or_else(rand::random);
        let out = var("MEMBERSYNC_SOAK_OUT")
            .map(PathBuf::from)
            .map(|p| {
                if p.is_absolute() {
                    p
                } else {
                    support::repo_root().join(p)
                }
            })
            .unwrap_or_else(|| support::repo_root().join("target/soak/soak.md"));
        Settings {
            secs,
            seed,
            out,
            recovery: (secs / 4).max(15),
            quiesce_timeout: Duration::from_secs(240),
            overlap: var("MEMBERSYNC_SOAK_OVERLAP").is_some_and(|v| v == "1"),
            full_outages: false,
            faults: faults::Kind::parse_list(&var("MEMBERSYNC_SOAK_FAULTS").unwrap_or_default()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_traffic_under_faults_converges_with_exactly_once_effect() {
    soak(Settings::from_env()).await;
}

/// Merge waits out long outages instead of dead-lettering (issue #15): Postgres stopped for
/// 60 s, and separately every Memberstack request answered 503 for 120 s, under the soak's
/// steady mix of webhooks, SQL edits and Stripe events; then every change is applied in
/// per-member order, both sides equal, and the DLQ holds only the injected poison.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_outages_are_waited_out_without_dead_letters() {
    let mut settings = Settings::from_env();
    settings.secs = 300;
    settings.recovery = 75;
    settings.faults = vec![
        faults::Kind::PostgresOutage,
        faults::Kind::MemberstackOutage,
    ];
    settings.full_outages = true;
    settings.out = support::repo_root().join("target/soak/long-outages.md");
    soak(settings).await;
}

async fn soak(settings: Settings) {
    eprintln!(
        "soak: seed {} ({} s); reproduce with MEMBERSYNC_SOAK_SEED={} MEMBERSYNC_SOAK_SECS={}",
        settings.seed, settings.secs, settings.seed, settings.secs
    );
    std::fs::create_dir_all(settings.out.parent().unwrap()).expect("report directory");
    let logs = support::repo_root().join("target/soak");
    std::fs::create_dir_all(&logs).expect("log directory");
    let stem = settings
        .out
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let daemon_log = logs.join(format!("{stem}.daemon.log"));
    let _ = std::fs::remove_file(&daemon_log);
    let setup_started = Instant::now();
    let mut stack = Stack::start(&daemon_log).await;
    let members = create_members(&stack).await;
    let setup = setup_started.elapsed();

    let plan = faults::plan(
        settings.seed,
        settings.secs,
        settings.recovery,
        &settings.faults,
        settings.full_outages,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed ^ 0x9e37_79b9);
    let poison_at: Vec<f64> = {
        let n = (settings.secs / 20).max(3);
        let mut at: Vec<f64> = (0..n)
            .map(|_| rng.random_range(2.0..(settings.secs - settings.recovery) as f64))
            .collect();
        at.sort_by(f64::total_cmp);
        at
    };

    let truth = Mutex::new(traffic::Truth::default());
    let samples = Mutex::new(Vec::new());
    let stop_sampling = AtomicBool::new(false);
    let lag = observe::LagProbe::start(
        stack.broker.addr(),
        stack.group.clone(),
        stack.merge_topics(),
        stack.partitions(),
    );
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(settings.secs);
    let ms = stack.ms.clone();
    let pg = stack.pg_config();
    let ingest = format!("http://127.0.0.1:{}", stack.ingest_port);
    let pid = stack.pid.clone();
    let brokers = stack.broker.addr();
    let memberstack_topic = stack.topic("memberstack");

    let (happened, skipped, quiescence) = {
        let sampler = observe::sample(pid, pg.clone(), &lag, t0, &stop_sampling, &samples);
        let main = async {
            let ((happened, skipped), ..) = tokio::join!(
                faults::run(
                    &mut stack,
                    &plan,
                    t0,
                    &lag,
                    (settings.secs - settings.recovery) as f64,
                    settings.overlap
                ),
                traffic::memberstack_edits(&ms, &members.memberstack, WEBHOOK_RATE, until, &truth),
                traffic::sql_edits(pg.clone(), &members.sql, SQL_RATE, until, &truth),
                traffic::stripe_events(
                    ingest,
                    &members.stripe,
                    STRIPE_RATE,
                    until,
                    settings.seed,
                    &truth
                ),
                traffic::poison(brokers, memberstack_topic, poison_at, t0, &truth),
            );
            eprintln!(
                "soak: traffic ended at t={:.1}s; waiting for quiescence",
                t0.elapsed().as_secs_f64()
            );
            let q = quiesce(&stack, &lag, settings.quiesce_timeout).await;
            stop_sampling.store(true, Ordering::Relaxed);
            (happened, skipped, q)
        };
        let (out, ()) = tokio::join!(main, sampler);
        out
    };
    let traffic_end = settings.secs as f64;
    let quiesced_at = t0.elapsed().as_secs_f64();
    eprintln!("soak: quiescence {quiescence:?} at t={quiesced_at:.1}s; judging");

    let truth = truth.into_inner().unwrap();
    let samples = samples.into_inner().unwrap();
    let verdict = verdict::judge(&stack, &members, &truth, &samples, quiescence).await;
    let run = report::Run {
        settings: &settings,
        setup,
        members: &members,
        truth: &truth,
        samples: &samples,
        faults: &happened,
        skipped: &skipped,
        verdict: &verdict,
        traffic_end,
        quiesced_at,
        daemon_starts: stack.starts,
        ms_stats: stack.ms.stats(),
        auth_stats: stack.auth.stats(),
        posthog_events: stack.posthog.events().len(),
        deliveries: stack.ms.deliveries().len(),
        daemon_log: &daemon_log,
    };
    let path = report::write(&run);
    std::fs::write(logs.join(format!("{stem}.broker.log")), stack.broker.log())
        .expect("write the broker's log");
    eprintln!("soak: report {}", path.display());
    stack.kill_daemon();

    let failed: Vec<String> = verdict
        .checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| format!("✗ {}:\n  {}", c.name, c.violations.join("\n  ")))
        .collect();
    assert!(
        failed.is_empty(),
        "soak verdict failed (seed {}, report {}):\n{}",
        settings.seed,
        path.display(),
        failed.join("\n")
    );
}

/// Creates every member in the Memberstack dashboard and waits for its row and auth user.
async fn create_members(stack: &Stack) -> Members {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for (group, n) in [
        ("ms", MEMBERSTACK_MEMBERS),
        ("sql", SQL_MEMBERS),
        ("stripe", STRIPE_MEMBERS),
    ] {
        let mut ids = Vec::new();
        for i in 0..n {
            let new = serde_json::from_value(json!({
                "email": format!("soak-{group}-{i}@example.com"),
                "customFields": {},
                "metaData": {},
                "plans": [{"planId": "pln_free"}],
            }))
            .unwrap();
            ids.push(stack.ms.dashboard_create(new).expect("dashboard create").id);
        }
        groups.push(ids);
    }
    let admin = stack.admin().await;
    let total = (MEMBERSTACK_MEMBERS + SQL_MEMBERS + STRIPE_MEMBERS) as i64;
    wait_for(
        "every member's row with its auth user",
        Duration::from_secs(120),
        || async {
            let n: i64 = admin
                .query_one(
                    "select count(*) from public.members where user_id is not null",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == total).then_some(())
        },
    )
    .await;
    let stripe = groups.pop().unwrap();
    let sql = groups.pop().unwrap();
    let memberstack = groups.pop().unwrap();
    Members {
        memberstack,
        sql,
        stripe,
    }
}

/// Waits until webhooks are delivered, merge's lag is 0 and nothing changes for [`QUIET`]:
/// no new `webhook_log` row, Memberstack API call or `members` row version.
async fn quiesce(stack: &Stack, lag: &observe::LagProbe, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    let mut stable_since = Instant::now();
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = stack
                .pg_config()
                .connect(tokio_postgres::NoTls)
                .await
                .ok()
                .map(|(c, conn)| {
                    tokio::spawn(conn);
                    c
                });
        }
        let fingerprint = match &client {
            Some(c) => c
                .query_one(
                    "select (select count(*) from public.webhook_log)::text || ':' ||
                            coalesce((select md5(string_agg(md5(m::text), ',' order by memberstack_id))
                                        from public.members m), '')",
                    &[],
                )
                .await
                .ok()
                .map(|r| r.get::<_, String>(0)),
            None => None,
        };
        let state = (fingerprint, stack.ms.stats().total_requests);
        let idle = stack
            .ms
            .wait_webhooks_quiescent(Duration::from_millis(1))
            .await
            .is_ok();
        let lag_now = lag.lag(Duration::from_secs(3));
        if last.as_ref() != Some(&state) || state.0.is_none() {
            stable_since = Instant::now();
        }
        if idle && lag_now == Some(0) && stable_since.elapsed() >= QUIET {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not quiescent after {timeout:?}: webhooks idle {idle}, consumer lag {lag_now:?}, \
                 last change {:.1} s ago",
                stable_since.elapsed().as_secs_f64()
            ));
        }
        last = Some(state);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Keeps `client` connected across Postgres restarts: reconnects (within `timeout`) when it is
/// missing or closed, and leaves `None` while the server is away.
async fn ensure_connected(
    client: &mut Option<tokio_postgres::Client>,
    pg: &tokio_postgres::Config,
    timeout: Duration,
) {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = match tokio::time::timeout(timeout, pg.connect(tokio_postgres::NoTls)).await {
            Ok(Ok((c, conn))) => {
                tokio::spawn(conn);
                Some(c)
            }
            _ => None,
        };
    }
}
