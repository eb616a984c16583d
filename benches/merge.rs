//! Merge throughput, Memberstack pacing and end-to-end latency: `cargo bench --bench merge`.
//!
//! The real release binary (`membersync run`: CDC, ingest and merge) on a fresh database of
//! the dev Postgres cluster and the dev broker (topics under a unique prefix, deleted at the
//! end), with the in-process Memberstack (25 requests per rolling second, 429 beyond) and
//! Supabase Auth simulators.
//!
//! 1. **Seed**: `MEMBERS` members are created in the Memberstack simulator's dashboard; its
//!    (sequential, Svix-signed) `member.created` webhooks make merge create every `members`
//!    row and auth user. No PATCH is needed for that, so the seed leaves no backlog.
//! 2. **Burst** of mixed changes from both sides, at once:
//!    - `MS_CHANGES` Memberstack-side changes: signed `member.updated` webhooks, shaped like
//!      the simulator's, posted to ingest with `CONCURRENCY` requests in flight. Each changes
//!      `customFields.seq` of one member (round-robin over the "Memberstack-side" members,
//!      so one member's changes are posted in order, thousands of requests apart); merge
//!      writes each one to Postgres.
//!    - `SQL_CHANGES` Supabase-side changes: one `update public.members set project_data`
//!      per transaction, on other members ("Supabase-side", disjoint from the first set, so
//!      the simulator's state — whose webhooks echo our PATCHes — never contradicts the
//!      webhooks this bench posts), committed as fast as one connection can at the start of
//!      the burst. Supabase owns `project_data`: merge PATCHes each to Memberstack, paced at
//!      `memberstack.requests_per_second` (25): a backlog of `SQL_CHANGES / 25` seconds.
//! 3. **Probes**, once everything drained (unloaded): `PROBES` single webhooks (post →
//!    `members` row visible, polled every ms) and `PROBES` single SQL updates (commit → PATCH
//!    arrival in the simulator's call log), one at a time.
//!
//! Reported: Postgres changes applied per second (from `webhook_log.processed_at`), the
//! Memberstack calls per second during the PATCH backlog (simulator call log, per-second
//! counts, median and ratio to 25, busiest rolling second), 429 answers (simulator and the
//! daemon's own counter), webhook → row and row → PATCH latency (p50 / p99) under load and
//! unloaded. Results: `bench/results/merge.md`.
//!
//! Environment (all optional):
//! - `MEMBERSYNC_BENCH_MERGE_MEMBERS` (10000): members seeded;
//! - `MEMBERSYNC_BENCH_MERGE_MS_CHANGES` (48500): webhooks in the burst;
//! - `MEMBERSYNC_BENCH_MERGE_SQL_CHANGES` (1500): SQL updates in the burst (one member each);
//! - `MEMBERSYNC_BENCH_MERGE_CONCURRENCY` (32): webhook requests in flight;
//! - `MEMBERSYNC_BENCH_MERGE_PROBES` (200): unloaded probes of each kind;
//! - `MEMBERSYNC_BENCH_MERGE_TIMEOUT_SECS` (900): limit for the seed and for the burst drain;
//! - `MEMBERSYNC_BENCH_MERGE_OUT` (`bench/results/merge.md`): the report.
//!
//! Needs the dev services (`scripts/dev-services up`, `.dev/services.env`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt as _;
use membersync::ingest::verify::svix::SvixVerifier;
use membersync::sim::memberstack::{MemberstackConfig, MemberstackSim, NewMember};
use membersync::sim::supabase_auth::{AuthConfig, AuthSim};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

mod support;
use support::host::{command_output, env_or, free_port, repo_root};
use support::metrics::Metrics;
use support::stats::percentile_f64;

const API_KEY: &str = "sk_sb_merge_bench_key";
const SERVICE_KEY: &str = "service-role-merge-bench";
const STRIPE_SECRET: &str = "whsec_stripe_merge_bench_secret";
const RPS: f64 = 25.0;
const NAME_PREFIX: &str = "mergebench";

// ---------------------------------------------------------------------------------------
// Settings and services
// ---------------------------------------------------------------------------------------

struct Settings {
    members: usize,
    ms_changes: usize,
    sql_changes: usize,
    concurrency: usize,
    probes: usize,
    timeout: Duration,
    out: PathBuf,
}

impl Settings {
    fn load() -> Settings {
        let s = Settings {
            members: env_or("MEMBERSYNC_BENCH_MERGE_MEMBERS", 10_000),
            ms_changes: env_or("MEMBERSYNC_BENCH_MERGE_MS_CHANGES", 48_500),
            sql_changes: env_or("MEMBERSYNC_BENCH_MERGE_SQL_CHANGES", 1_500),
            concurrency: env_or("MEMBERSYNC_BENCH_MERGE_CONCURRENCY", 32).max(1),
            probes: env_or("MEMBERSYNC_BENCH_MERGE_PROBES", 200),
            timeout: Duration::from_secs(env_or("MEMBERSYNC_BENCH_MERGE_TIMEOUT_SECS", 900) as u64),
            out: std::env::var("MEMBERSYNC_BENCH_MERGE_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| repo_root().join("bench/results/merge.md")),
        };
        assert!(
            s.sql_changes.max(s.probes.min(1)) < s.members
                && s.members - s.sql_changes >= s.probes.max(1),
            "MEMBERS must exceed SQL_CHANGES by at least PROBES (disjoint member sets)"
        );
        s
    }

    fn command(&self) -> String {
        let mut vars = Vec::new();
        for (k, v, d) in [
            ("MEMBERS", self.members, 10_000),
            ("MS_CHANGES", self.ms_changes, 48_500),
            ("SQL_CHANGES", self.sql_changes, 1_500),
            ("CONCURRENCY", self.concurrency, 32),
            ("PROBES", self.probes, 200),
        ] {
            if v != d {
                vars.push(format!("MEMBERSYNC_BENCH_MERGE_{k}={v}"));
            }
        }
        // The broker the run used: its storage decides how fast merge's acks come back.
        if let Ok(storage) = std::env::var("MEMBERSYNC_DEV_KAFKA_STORAGE") {
            vars.push(format!("MEMBERSYNC_DEV_KAFKA_STORAGE={storage}"));
        }
        let command = "cargo bench --bench merge".to_owned();
        if vars.is_empty() {
            command
        } else {
            format!("{} {command}", vars.join(" "))
        }
    }
}

use support::services::Services;

/// This bench's helpers on the shared dev-services settings.
impl Services {
    fn superuser_password(&self) -> String {
        std::fs::read_to_string(self.var("MEMBERSYNC_DEV_PG_SUPERUSER_PASSWORD_FILE"))
            .expect("superuser password file")
            .trim()
            .to_owned()
    }

    fn dsn(&self, db: &str) -> String {
        format!(
            "host={} port={} user={} password={} dbname={}",
            self.var("MEMBERSYNC_DEV_PG_HOST"),
            self.var("MEMBERSYNC_DEV_PG_PORT"),
            self.var("MEMBERSYNC_DEV_PG_SUPERUSER"),
            self.superuser_password(),
            db
        )
    }

    async fn connect(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(
            &format!("{} application_name=membersync-merge-bench", self.dsn(db)),
            NoTls,
        )
        .await
        .unwrap_or_else(|e| {
            panic!("cannot reach the dev Postgres ({e}): run `scripts/dev-services up`")
        });
        tokio::spawn(conn);
        client
    }

    fn brokers(&self) -> &str {
        self.var("MEMBERSYNC_DEV_KAFKA_BROKERS")
    }
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

struct Daemon {
    child: Option<std::process::Child>,
    pid: u32,
    ops: String,
    ingest: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Daemon {
    fn spawn(env: &[(String, String)], ingest_port: u16, log: PathBuf) -> Daemon {
        let ops_port = free_port();
        let file = std::fs::File::create(&log).expect("daemon log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_membersync"));
        cmd.env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        let child = cmd
            .arg("run")
            .envs(env.iter().cloned())
            .env(
                "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
                format!("127.0.0.1:{ops_port}"),
            )
            .env(
                "MEMBERSYNC__INGEST__LISTEN_ADDR",
                format!("127.0.0.1:{ingest_port}"),
            )
            .env("MEMBERSYNC__SHUTDOWN__DRAIN_TIMEOUT_SECS", "10")
            .env(
                "MEMBERSYNC__TELEMETRY__LOG_LEVEL",
                "warn,librdkafka=off,rdkafka=off",
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("start membersync run");
        Daemon {
            pid: child.id(),
            child: Some(child),
            ops: format!("http://127.0.0.1:{ops_port}"),
            ingest: format!("http://127.0.0.1:{ingest_port}"),
            log,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> Option<String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.ops))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        resp.text().await.ok()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "membersync run exited early with {status}:\n{}",
                    self.log_tail(40)
                );
            }
            if let Some(body) = self.get("/readyz").await {
                let ready: Value = serde_json::from_str(&body).unwrap_or_default();
                if ready["checks"]["startup"] == "ok" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "membersync run not ready:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics(&self) -> Metrics {
        Metrics::parse(&self.get("/metrics").await.unwrap_or_default())
    }

    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    fn rss_mib(&self) -> f64 {
        support::process::rss_mib(self.pid)
    }

    async fn terminate(&mut self) -> String {
        // Taken, so that Drop does not signal a pid the system may have reused.
        match self.child.take() {
            Some(mut child) => {
                support::process::terminate(&mut child, Duration::from_secs(30)).await
            }
            None => "not running".into(),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        support::process::log_tail(&self.log, lines)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Metrics {}

/// The bucket bounds holding the p-quantile of a histogram delta: `(lower, upper)`.
fn bucket_quantile(after: &[(f64, f64)], before: &[(f64, f64)], p: f64) -> Option<(f64, f64)> {
    let d: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c),
            )
        })
        .collect();
    let total = d.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = (p * total).ceil();
    let mut lower = 0.0;
    for (le, c) in d {
        if c >= rank {
            return Some((lower, le));
        }
        lower = le;
    }
    None
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v.to_vec());
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn ms(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 10_000.0 {
        format!("{:.1} s", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0} ms")
    } else {
        format!("{x:.1} ms")
    }
}

/// Counts per whole second of `times_us` (µs), over `[from, to)` µs.
fn per_second(times_us: &[i64], from: i64, to: i64) -> Vec<f64> {
    let secs = ((to - from) / 1_000_000).max(0) as usize;
    let mut counts = vec![0.0; secs];
    for t in times_us {
        if *t >= from {
            let i = ((t - from) / 1_000_000) as usize;
            if i < secs {
                counts[i] += 1.0;
            }
        }
    }
    counts
}

/// The most events in any rolling 1-second window (`[t, t + 1 s)`).
fn busiest_rolling_second(sorted_us: &[i64]) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..sorted_us.len() {
        while sorted_us[i] - sorted_us[j] >= 1_000_000 {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

// ---------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------

/// What a member.updated payload needs besides `customFields`.
#[derive(Clone)]
struct Base {
    id: String,
    email: String,
    meta: Value,
    plans: Value,
    verified: bool,
    created_at: String,
}

struct Poster {
    http: reqwest::Client,
    url: String,
    signer: SvixVerifier,
}

impl Poster {
    /// Posts one signed `member.updated` (custom field `seq`), retrying a failed delivery
    /// with the same svix-id (as Svix would). Returns (svix id, sent at µs, attempts, status).
    async fn post(&self, base: &Base, seq: &str) -> (String, i64, u32, u16) {
        let id = format!("msg_mb_{}", uuid::Uuid::new_v4().simple());
        let sent = now_us();
        let body = json!({
            "event": "member.updated",
            "timestamp": sent / 1000,
            "payload": {
                "id": base.id,
                "auth": {"email": base.email},
                "metaData": base.meta,
                "customFields": {"seq": seq, "tier": "gold"},
                "planConnections": base.plans,
                "verified": base.verified,
                "createdAt": base.created_at,
            }
        })
        .to_string();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let ts = chrono::Utc::now().timestamp();
            let resp = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("svix-id", &id)
                .header("svix-timestamp", ts.to_string())
                .header("svix-signature", self.signer.sign(&id, ts, body.as_bytes()))
                .body(body.clone())
                .timeout(Duration::from_secs(15))
                .send()
                .await;
            let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
            if (200..300).contains(&status) || attempts >= 5 {
                return (id, sent, attempts, status);
            }
            tokio::time::sleep(Duration::from_millis(100 * attempts as u64)).await;
        }
    }
}

fn webhook_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

// ---------------------------------------------------------------------------------------
// Clean-up
// ---------------------------------------------------------------------------------------

async fn delete_topics(brokers: &str, prefix: &str) -> usize {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
    {
        Ok(c) => c,
        Err(_) => return 0,
    };
    let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(10)) else {
        return 0;
    };
    let topics: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(&format!("{prefix}.")))
        .collect();
    if topics.is_empty() {
        return 0;
    }
    let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
    {
        Ok(a) => a,
        Err(_) => return 0,
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    match admin.delete_topics(&names, &opts).await {
        Ok(r) => r.iter().filter(|x| x.is_ok()).count(),
        Err(_) => 0,
    }
}

async fn drop_database(svc: &Services, db: &str) {
    let admin = svc.connect("postgres").await;
    // The daemon's slot is named after the database; a logical slot blocks DROP DATABASE.
    for _ in 0..50 {
        let r = admin
            .execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1 and not active",
                &[&db],
            )
            .await;
        let left: i64 = admin
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = $1",
                &[&db],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if r.is_ok() && left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(e) = admin
        .batch_execute(&format!("drop database if exists {db} with (force)"))
        .await
    {
        eprintln!("merge bench: could not drop database {db}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Results {
    seed_secs: f64,
    seed_patches: usize,
    burst_post_secs: f64,
    post_failures: usize,
    post_retries: usize,
    sql_commit_secs: f64,
    drain_secs: f64,
    ms_drain_secs: f64,
    /// `webhook_log` rows of the burst per whole second since the burst start (Memberstack
    /// webhooks / all sources).
    applied_per_sec_ms: Vec<f64>,
    applied_per_sec_all: Vec<f64>,
    burst_processed_all: i64,
    wrong_final_rows: i64,
    patch_times_us: Vec<i64>,
    backlog_from_us: i64,
    backlog_to_us: i64,
    backlog_per_sec: Vec<f64>,
    backlog_patches: usize,
    busiest_second: usize,
    other_calls: BTreeMap<String, u64>,
    sim_429: u64,
    daemon_429: f64,
    missing_patches: usize,
    lat_webhook_load: Vec<f64>,
    lat_patch_load: Vec<f64>,
    lat_webhook_probe: Vec<f64>,
    lat_patch_probe: Vec<f64>,
    probe_failures: Vec<String>,
    hist_load: Option<((f64, f64), (f64, f64))>,
    metric_deltas: BTreeMap<String, f64>,
    daemon_cpu_burst: f64,
    daemon_rss_peak: f64,
    load_before: String,
    load_after: String,
    log_summary: Vec<String>,
    exit: String,
    topics_deleted: usize,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` / `cargo test --benches` compatibility: nothing to list.
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let settings = Settings::load();
    let svc = Services::load();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let db = format!("{NAME_PREFIX}_{}_{}", std::process::id(), &suffix[..8]);
    let topic_prefix = format!("bench-merge-{}-{}", std::process::id(), &suffix[..8]);
    eprintln!("merge bench: database {db}, topics {topic_prefix}.*");

    // Fresh database: the Supabase stand-in and membersync's migrations.
    {
        let admin = svc.connect("postgres").await;
        admin
            .batch_execute(&format!("create database {db}"))
            .await
            .expect("create database");
        let mut c = svc.connect(&db).await;
        let bootstrap = std::fs::read_to_string(repo_root().join("scripts/supabase-bootstrap.sql"))
            .expect("bootstrap sql");
        c.batch_execute(&bootstrap)
            .await
            .expect("Supabase bootstrap");
        membersync::db::migrate::migrate(&mut c)
            .await
            .expect("migrations");
    }

    let mut results = Results::default();
    // In a task of its own: a panic ends the measurement, not the clean-up below.
    let outcome = tokio::spawn(measure(
        Settings::load(),
        Services::load(),
        db.clone(),
        topic_prefix.clone(),
    ))
    .await;
    match outcome {
        Ok(r) => results = r,
        Err(e) => eprintln!("merge bench: the measurement failed: {e}"),
    }

    results.topics_deleted = delete_topics(svc.brokers(), &topic_prefix).await;
    drop_database(&svc, &db).await;

    if results.exit.is_empty() {
        eprintln!("merge bench: no results (see above); report not written");
        std::process::exit(1);
    }
    let report = report(&settings, &results, &db, &topic_prefix);
    if let Some(dir) = settings.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&settings.out, &report).expect("write report");
    println!("{report}");
    eprintln!("merge bench: report written to {}", settings.out.display());
}

/// The Memberstack simulator on a runtime and OS thread of its own. It stamps each request's
/// arrival for its rate window; on the bench's runtime, the load generators' tasks would delay
/// some stamps more than others and make a correctly paced daemon look bunched (or hide real
/// bunching). Its own thread is scheduled by the kernel like the server it stands for.
fn start_memberstack_on_its_own_thread(config: MemberstackConfig) -> MemberstackSim {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("memberstack-sim".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("simulator runtime");
            rt.block_on(async move {
                let sim = MemberstackSim::start(config)
                    .await
                    .expect("memberstack simulator");
                tx.send(sim).expect("bench waiting for the simulator");
                // Serve until the process ends.
                std::future::pending::<()>().await;
            });
        })
        .expect("simulator thread");
    rx.recv().expect("memberstack simulator started")
}

async fn measure(settings: Settings, svc: Services, db: String, topic_prefix: String) -> Results {
    let mut r = Results::default();
    let admin = svc.connect(&db).await;
    let ingest_port = free_port();
    let secret = webhook_secret();
    let ms = start_memberstack_on_its_own_thread(MemberstackConfig::new(API_KEY).with_webhook(
        format!("http://127.0.0.1:{ingest_port}/webhooks/memberstack"),
        secret.clone(),
    ));
    let auth = AuthSim::start(AuthConfig::new(svc.dsn(&db), SERVICE_KEY))
        .await
        .expect("auth simulator");

    let mut env: Vec<(String, String)> = vec![
        (
            "MEMBERSYNC__DATABASE__HOST",
            svc.var("MEMBERSYNC_DEV_PG_HOST").to_owned(),
        ),
        (
            "MEMBERSYNC__DATABASE__PORT",
            svc.var("MEMBERSYNC_DEV_PG_PORT").to_owned(),
        ),
        ("MEMBERSYNC__DATABASE__DBNAME", db.clone()),
        ("MEMBERSYNC__DATABASE__USER", "membersync".to_owned()),
        (
            "MEMBERSYNC__DATABASE__PASSWORD_FILE",
            svc.var("MEMBERSYNC__DATABASE__PASSWORD_FILE").to_owned(),
        ),
        (
            "MEMBERSYNC__DATABASE__ADMIN_USER",
            svc.var("MEMBERSYNC_DEV_PG_SUPERUSER").to_owned(),
        ),
        (
            "MEMBERSYNC__DATABASE__ADMIN_PASSWORD_FILE",
            svc.var("MEMBERSYNC_DEV_PG_SUPERUSER_PASSWORD_FILE")
                .to_owned(),
        ),
        ("MEMBERSYNC__CDC__SLOT", db.clone()),
        ("MEMBERSYNC__KAFKA__BROKERS", svc.brokers().to_owned()),
        ("MEMBERSYNC__KAFKA__TOPIC_PREFIX", topic_prefix.clone()),
        (
            "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS",
            secret.clone(),
        ),
        (
            "MEMBERSYNC__INGEST__STRIPE_WEBHOOK_SECRETS",
            STRIPE_SECRET.to_owned(),
        ),
        ("MEMBERSYNC__MEMBERSTACK__API_URL", ms.base_url()),
        ("MEMBERSYNC__MEMBERSTACK__API_KEY", API_KEY.to_owned()),
        ("MEMBERSYNC__SUPABASE__URL", auth.base_url()),
        (
            "MEMBERSYNC__SUPABASE__SERVICE_ROLE_KEY",
            SERVICE_KEY.to_owned(),
        ),
        (
            "MEMBERSYNC__MERGE__GROUP_ID",
            format!("{topic_prefix}-merge"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // Any MEMBERSYNC__MERGE__* / MEMBERSYNC__MEMBERSTACK__* of the caller's environment
    // (e.g. MEMBERSYNC__MERGE__WORKERS) is passed through, and named in the report.
    for (k, v) in std::env::vars() {
        if k.starts_with("MEMBERSYNC__MERGE__")
            || k.starts_with("MEMBERSYNC__MEMBERSTACK__REQUESTS")
        {
            env.retain(|(key, _)| *key != k);
            env.push((k, v));
        }
    }
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("merge-daemon.log");
    let mut daemon = Daemon::spawn(&env, ingest_port, log);
    daemon.wait_ready().await;
    eprintln!("merge bench: daemon ready (pid {})", daemon.pid);

    // ---- 1. Seed -------------------------------------------------------------------
    let t = Instant::now();
    let mut bases = Vec::with_capacity(settings.members);
    for i in 0..settings.members {
        let new: NewMember = serde_json::from_value(json!({
            "email": format!("bench{i}@example.com"),
            "customFields": {"seq": "0", "tier": "gold"},
            "metaData": {},
            "plans": [{"planId": "pln_free"}],
        }))
        .unwrap();
        let m = ms.dashboard_create(new).expect("dashboard create");
        bases.push(Base {
            id: m.id.clone(),
            email: m.auth.email.clone(),
            meta: Value::Object(m.meta_data.clone()),
            plans: serde_json::to_value(&m.plan_connections).unwrap(),
            verified: m.verified,
            created_at: m.created_at.clone(),
        });
    }
    let deadline = Instant::now() + settings.timeout;
    let mut last_print = Instant::now();
    loop {
        let n: i64 = admin
            .query_one(
                "select count(*) from public.members where user_id is not null",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n as usize >= settings.members {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "merge bench: seed {n}/{} rows after {:.0} s",
                settings.members,
                t.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "seed not done: {n} rows\n{}",
            daemon.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r.seed_secs = t.elapsed().as_secs_f64();
    ms.wait_webhooks_quiescent(Duration::from_secs(60))
        .await
        .expect("seed webhooks delivered");
    // Let merge finish its tail (CDC of its own inserts) before measuring.
    let mut prev = -1i64;
    loop {
        let n: i64 = admin
            .query_one("select count(*) from public.webhook_log", &[])
            .await
            .unwrap()
            .get(0);
        if n == prev {
            break;
        }
        prev = n;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    r.seed_patches = ms.calls().iter().filter(|c| c.method == "PATCH").count();
    eprintln!(
        "merge bench: seeded {} members in {:.1} s",
        settings.members, r.seed_secs
    );

    // ---- 2. Burst ------------------------------------------------------------------
    let sql_members: Vec<Base> = bases[settings.members - settings.sql_changes..].to_vec();
    let ms_members: Vec<Base> = bases[..settings.members - settings.sql_changes].to_vec();
    let stats0 = ms.stats();
    let calls0 = ms.calls().len();
    let m0 = daemon.metrics().await;
    let cpu0 = daemon.cpu_secs();
    r.load_before = loadavg();
    let burst_start = now_us();
    let t_burst = Instant::now();

    let poster = Arc::new(Poster {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(settings.concurrency)
            .build()
            .unwrap(),
        url: format!("{}/webhooks/memberstack", daemon.ingest),
        signer: SvixVerifier::new(&[secret.clone().into()]).expect("signer"),
    });
    let posted = Arc::new(AtomicU64::new(0));
    let webhooks = {
        let poster = poster.clone();
        let ms_members = Arc::new(ms_members.clone());
        let posted = posted.clone();
        let n = settings.ms_changes;
        let conc = settings.concurrency;
        tokio::spawn(async move {
            let k = ms_members.len();
            futures::stream::iter(0..n)
                .map(|i| {
                    let poster = poster.clone();
                    let ms_members = ms_members.clone();
                    let posted = posted.clone();
                    async move {
                        let base = &ms_members[i % k];
                        let seq = (i / k + 1).to_string();
                        let res = poster.post(base, &seq).await;
                        posted.fetch_add(1, Ordering::Relaxed);
                        res
                    }
                })
                .buffer_unordered(conc)
                .collect::<Vec<_>>()
                .await
        })
    };
    let sql = {
        let c = svc.connect(&db).await;
        let members = sql_members.clone();
        tokio::spawn(async move {
            let mut commits = HashMap::new();
            let stmt = c
                .prepare("update public.members set project_data = $2 where memberstack_id = $1")
                .await
                .unwrap();
            for (i, m) in members.iter().enumerate() {
                let v = json!({"stage": "burst", "n": i});
                c.execute(&stmt, &[&m.id, &v]).await.expect("sql update");
                commits.insert(m.id.clone(), now_us());
            }
            commits
        })
    };
    // Monitor: RSS peak and progress.
    let monitor_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let stop = monitor_stop.clone();
        let pid = daemon.pid;
        let posted = posted.clone();
        let total = settings.ms_changes;
        tokio::spawn(async move {
            let mut peak = 0.0f64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                    .map_or(0.0, |kib| kib / 1024.0);
                peak = peak.max(rss);
                if i.is_multiple_of(20) {
                    eprintln!(
                        "merge bench: burst posted {}/{total}",
                        posted.load(Ordering::Relaxed)
                    );
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            peak
        })
    };

    let sql_commits = sql.await.expect("sql task");
    r.sql_commit_secs = t_burst.elapsed().as_secs_f64();
    let posts = webhooks.await.expect("webhook task");
    r.burst_post_secs = t_burst.elapsed().as_secs_f64();
    r.post_failures = posts.iter().filter(|p| !(200..300).contains(&p.3)).count();
    r.post_retries = posts.iter().map(|p| p.2 as usize - 1).sum();
    let sent_at: HashMap<String, i64> = posts.iter().map(|p| (p.0.clone(), p.1)).collect();
    eprintln!(
        "merge bench: burst posted in {:.1} s ({} failed); waiting for merge to drain",
        r.burst_post_secs, r.post_failures
    );

    // Drain: every burst webhook in webhook_log, every SQL change PATCHed.
    let expected_ms = (settings.ms_changes - r.post_failures) as i64;
    let sql_ids: Vec<String> = sql_members.iter().map(|m| m.id.clone()).collect();
    let deadline = Instant::now() + settings.timeout;
    let mut last_print = Instant::now();
    let mut ms_done: Option<f64> = None;
    loop {
        let n: i64 = admin
            .query_one(
                "select count(*) from public.webhook_log where event_id like 'msg\\_mb\\_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ms_done.is_none() && n >= expected_ms {
            ms_done = Some(t_burst.elapsed().as_secs_f64());
        }
        let patched = sql_ids
            .iter()
            .filter(|id| {
                ms.member(id)
                    .and_then(|m| m.meta_data.get("project_data").cloned())
                    .is_some_and(|v| v["stage"] == "burst")
            })
            .count();
        if n >= expected_ms && patched >= sql_ids.len() {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "merge bench: {:.0} s: {n}/{expected_ms} webhooks applied, {patched}/{} SQL changes in Memberstack",
                t_burst.elapsed().as_secs_f64(),
                sql_ids.len()
            );
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            eprintln!(
                "merge bench: drain timed out: {n}/{expected_ms} webhooks, {patched} patched"
            );
            r.missing_patches = sql_ids.len() - patched;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.drain_secs = t_burst.elapsed().as_secs_f64();
    r.ms_drain_secs = ms_done.unwrap_or(f64::NAN);
    r.daemon_cpu_burst = daemon.cpu_secs() - cpu0;
    // Echo webhooks of the PATCHes: wait until webhook_log stops growing.
    ms.wait_webhooks_quiescent(Duration::from_secs(120))
        .await
        .ok();
    let mut prev = -1i64;
    loop {
        let n: i64 = admin
            .query_one("select count(*) from public.webhook_log", &[])
            .await
            .unwrap()
            .get(0);
        if n == prev {
            break;
        }
        prev = n;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    monitor_stop.store(true, Ordering::Relaxed);
    r.daemon_rss_peak = monitor.await.unwrap_or(0.0);
    let m1 = daemon.metrics().await;
    r.load_after = loadavg();

    // Postgres side: per-second applied changes, final state, webhook → row under load.
    let rows = admin
        .query(
            "select event_id, (extract(epoch from processed_at) * 1000000)::bigint from public.webhook_log
              where processed_at >= to_timestamp($1::float8 / 1000000)",
            &[&(burst_start as f64)],
        )
        .await
        .unwrap();
    let mut ms_times = Vec::new();
    let mut all_times = Vec::new();
    let mut lat_load = Vec::new();
    for row in &rows {
        let id: String = row.get(0);
        let at: i64 = row.get(1);
        all_times.push(at);
        if let Some(sent) = sent_at.get(&id) {
            ms_times.push(at);
            lat_load.push((at - sent) as f64 / 1000.0);
        }
    }
    r.burst_processed_all = rows.len() as i64;
    let last_ms = ms_times.iter().copied().max().unwrap_or(burst_start);
    r.applied_per_sec_ms = per_second(&ms_times, burst_start, last_ms);
    r.applied_per_sec_all = per_second(&all_times, burst_start, last_ms);
    r.lat_webhook_load = sorted(lat_load);
    let k = ms_members.len();
    let rounds = settings.ms_changes.div_ceil(k);
    // Member i % k got rounds ⌈(n - i%k) / k⌉; its last seq is that count.
    let mut wrong = 0i64;
    let finals = admin
        .query(
            "select memberstack_id, custom_fields->>'seq' from public.members",
            &[],
        )
        .await
        .unwrap();
    let index: HashMap<&str, usize> = ms_members
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id.as_str(), i))
        .collect();
    for row in finals {
        let id: String = row.get(0);
        if let Some(i) = index.get(id.as_str()) {
            let expect = (settings.ms_changes - i).div_ceil(k).min(rounds);
            if row.get::<_, Option<String>>(1).as_deref() != Some(&expect.to_string()) {
                wrong += 1;
            }
        }
    }
    r.wrong_final_rows = wrong;

    // Memberstack side: calls during the burst.
    let calls: Vec<_> = ms.calls().into_iter().skip(calls0).collect();
    let mut patch_at: HashMap<String, i64> = HashMap::new();
    for c in &calls {
        if c.method == "PATCH" {
            r.patch_times_us.push(c.at.timestamp_micros());
            let id = c
                .path
                .trim_start_matches("/members/")
                .split('?')
                .next()
                .unwrap_or("")
                .to_owned();
            patch_at.entry(id).or_insert(c.at.timestamp_micros());
        } else {
            *r.other_calls.entry(c.endpoint.clone()).or_default() += 1;
        }
    }
    r.patch_times_us.sort_unstable();
    r.backlog_patches = r.patch_times_us.len();
    if let (Some(first), Some(last)) = (r.patch_times_us.first(), r.patch_times_us.last()) {
        r.backlog_from_us = *first;
        r.backlog_to_us = *last;
        r.backlog_per_sec = per_second(&r.patch_times_us, *first, *last);
    }
    r.busiest_second = busiest_rolling_second(&r.patch_times_us);
    let stats1 = ms.stats();
    r.sim_429 = stats1.rate_limited - stats0.rate_limited;
    r.daemon_429 = m1.get("membersync_memberstack_rate_limited_total")
        - m0.get("membersync_memberstack_rate_limited_total");
    r.lat_patch_load = sorted(
        sql_commits
            .iter()
            .filter_map(|(id, commit)| patch_at.get(id).map(|p| (p - commit) as f64 / 1000.0))
            .collect(),
    );
    let h = "membersync_merge_change_to_applied_seconds";
    r.hist_load = bucket_quantile(&m1.buckets(h), &m0.buckets(h), 0.5).zip(bucket_quantile(
        &m1.buckets(h),
        &m0.buckets(h),
        0.99,
    ));
    for prefix in [
        "membersync_merge_changes_total",
        "membersync_merge_field_resolutions_total",
        "membersync_merge_conflicts_total",
        "membersync_merge_failed_attempts_total",
        "membersync_merge_dead_letters_total",
        "membersync_memberstack_requests_total",
        "membersync_memberstack_retries_total",
        "membersync_memberstack_rate_limited_total",
    ] {
        r.metric_deltas.extend(m1.delta(&m0, prefix));
    }
    eprintln!(
        "merge bench: burst drained in {:.1} s; probing latency",
        r.drain_secs
    );

    // ---- 3. Unloaded probes ------------------------------------------------------------
    let probe_db = svc.connect(&db).await;
    let visible = probe_db
        .prepare(
            "select 1 from public.members where memberstack_id = $1 and custom_fields->>'seq' = $2",
        )
        .await
        .unwrap();
    for p in 0..settings.probes {
        let base = &ms_members[(p * 37) % ms_members.len()];
        let seq = format!("probe{p}");
        let t0 = now_us();
        let (_, _, _, status) = poster.post(base, &seq).await;
        if !(200..300).contains(&status) {
            r.probe_failures
                .push(format!("webhook probe {p}: HTTP {status}"));
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !probe_db
                .query(&visible, &[&base.id, &seq])
                .await
                .unwrap()
                .is_empty()
            {
                r.lat_webhook_probe.push((now_us() - t0) as f64 / 1000.0);
                break;
            }
            if Instant::now() > deadline {
                r.probe_failures.push(format!(
                    "webhook probe {p} ({}): row not updated in 30 s",
                    base.id
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let update = probe_db
        .prepare("update public.members set project_data = $2 where memberstack_id = $1")
        .await
        .unwrap();
    let calls_before_probes = ms.calls().len();
    let mut probe_commits = Vec::new();
    for p in 0..settings.probes {
        let base = &sql_members[p % sql_members.len()];
        let v = json!({"stage": "probe", "n": p});
        probe_db
            .execute(&update, &[&base.id, &v])
            .await
            .expect("probe update");
        let committed = now_us();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ms
                .member(&base.id)
                .and_then(|m| m.meta_data.get("project_data").cloned())
                .as_ref()
                == Some(&v)
            {
                probe_commits.push((base.id.clone(), committed));
                break;
            }
            if Instant::now() > deadline {
                r.probe_failures.push(format!(
                    "PATCH probe {p} ({}): not in Memberstack after 30 s",
                    base.id
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let the echo webhook through and the limiter refill: each probe is unloaded.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let probe_calls: Vec<_> = ms
        .calls()
        .into_iter()
        .skip(calls_before_probes)
        .filter(|c| c.method == "PATCH")
        .collect();
    for (id, committed) in probe_commits {
        if let Some(c) = probe_calls
            .iter()
            .find(|c| c.path.contains(&id) && c.at.timestamp_micros() >= committed - 5_000)
        {
            r.lat_patch_probe
                .push((c.at.timestamp_micros() - committed) as f64 / 1000.0);
        }
    }
    r.lat_webhook_probe = sorted(r.lat_webhook_probe.clone());
    r.lat_patch_probe = sorted(r.lat_patch_probe.clone());
    let _ = daemon.rss_mib();

    r.exit = daemon.terminate().await;
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        let level = ["ERROR", "WARN"].iter().find(|l| line.contains(*l));
        if let Some(level) = level {
            // Group by level + message, without timestamps / ids.
            let msg: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            let text = msg["fields"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| line.chars().skip(30).take(140).collect());
            *kinds.entry(format!("{level}: {text}")).or_default() += 1;
        }
    }
    r.log_summary = kinds
        .into_iter()
        .map(|(k, n)| format!("{n} × {k}"))
        .collect();
    ms.shutdown().await;
    auth.shutdown().await;
    r
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn report(s: &Settings, r: &Results, db: &str, topics: &str) -> String {
    let mut o = String::new();
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let ms_total = s.ms_changes - r.post_failures;
    let ms_rate = ms_total as f64 / r.ms_drain_secs;
    let med_ms = median(&r.applied_per_sec_ms);
    let backlog_secs = (r.backlog_to_us - r.backlog_from_us) as f64 / 1e6;
    let mean_rate = if backlog_secs > 0.0 {
        (r.backlog_patches.saturating_sub(1)) as f64 / backlog_secs
    } else {
        f64::NAN
    };
    let med_rate = median(&r.backlog_per_sec);
    let pacing_met = med_rate >= 0.95 * RPS && r.sim_429 == 0;

    let _ = writeln!(o, "# Merge benchmark\n");
    let _ = writeln!(
        o,
        "Generated by `benches/merge.rs` (see `bench/README.md`). Commit `{commit}`{}, {}.\n",
        if dirty {
            " (with uncommitted changes in the worktree)"
        } else {
            ""
        },
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(o, "```sh\n{}\n```\n", s.command());
    let _ = writeln!(
        o,
        "Machine: {cores} cores ({cpu}), shared and noisy (other builds and tests may run: load average {} before the burst, {} after). \
         Postgres 15 and the Tansu broker run on the same machine, as do the simulators (in the bench process, Memberstack's on a runtime and thread of its own) and the load generator. \
         The simulators answer at once: a real Memberstack adds 100+ ms per call, which the 25/s pacing hides only if merge keeps enough PATCHes in flight.\n",
        r.load_before, r.load_after
    );
    let _ = writeln!(
        o,
        "Run: {} members seeded; burst of {} Memberstack-side webhooks ({} members, {} concurrent requests) + {} SQL updates of `project_data` ({} other members), {} changes in all. \
         Database `{db}`, topics `{topics}.*` (deleted: {}). Daemon: `membersync run`, release build, default `[merge]` and `[memberstack]` settings ({} workers, 25 requests/s) unless named in the command.\n",
        s.members,
        s.ms_changes,
        s.members - s.sql_changes,
        s.concurrency,
        s.sql_changes,
        s.sql_changes,
        s.ms_changes + s.sql_changes,
        r.topics_deleted,
        std::env::var("MEMBERSYNC__MERGE__WORKERS").unwrap_or_else(|_| "16".into()),
    );

    let _ = writeln!(o, "## Targets\n");
    let _ = writeln!(o, "| target | figure | verdict |\n|---|---|---|");
    // Head-of-line blocking: webhooks applied per second while the PATCH backlog lasts
    // against afterwards (merge v2's target: at least 0.8 of it).
    {
        let split = (((r.backlog_to_us - r.backlog_from_us.min(r.backlog_to_us)) / 1_000_000)
            as usize)
            .min(r.applied_per_sec_ms.len());
        let during = median(&r.applied_per_sec_ms[..split]);
        let after = &r.applied_per_sec_ms[split..];
        let (figure, met) = if after.len() >= 3 {
            let ratio = during / median(after).max(1e-9);
            (
                format!(
                    "median {during:.0}/s over {split} s of backlog vs {:.0}/s over {} s after: ratio {ratio:.2}",
                    median(after),
                    after.len()
                ),
                ratio >= 0.8,
            )
        } else {
            (
                format!(
                    "every webhook applied while the {split}-s PATCH backlog lasted (median {during:.0}/s): nothing waited behind it"
                ),
                split > 0,
            )
        };
        let _ = writeln!(
            o,
            "| webhooks applied/s during the PATCH backlog ≥ 0.8 × after it | {figure} | {} |",
            if met { "**met**" } else { "**missed**" }
        );
    }
    let _ = writeln!(
        o,
        "| Memberstack calls/s under backlog ≥ 95 % of 25/s (≥ 23.75/s) | median {med_rate:.1}/s over {} whole seconds ({:.0} % of 25), mean {mean_rate:.2}/s | {} |",
        r.backlog_per_sec.len(),
        med_rate / RPS * 100.0,
        if med_rate >= 0.95 * RPS {
            "**met**"
        } else {
            "**missed**"
        }
    );
    let _ = writeln!(
        o,
        "| zero 429 caused by our own pacing | {} × 429 from the simulator, {} counted by the daemon; busiest rolling second {} calls | {} |",
        r.sim_429,
        r.daemon_429,
        r.busiest_second,
        if r.sim_429 == 0 {
            "**met**"
        } else {
            "**missed**"
        }
    );
    let _ = writeln!(
        o,
        "| changes applied to Postgres per second (no target) | {ms_rate:.0}/s overall for the {ms_total} webhooks (burst start → last applied, {:.1} s); median per-second {med_ms:.0}/s | report |",
        r.ms_drain_secs
    );
    let _ = writeln!(
        o,
        "| webhook → row (no target) | unloaded p50 {} / p99 {} ({} probes); under the burst p50 {} / p99 {} | report |",
        ms(percentile_f64(&r.lat_webhook_probe, 0.5)),
        ms(percentile_f64(&r.lat_webhook_probe, 0.99)),
        r.lat_webhook_probe.len(),
        ms(percentile_f64(&r.lat_webhook_load, 0.5)),
        ms(percentile_f64(&r.lat_webhook_load, 0.99)),
    );
    let _ = writeln!(
        o,
        "| row → PATCH (no target) | unloaded p50 {} / p99 {} ({} probes); under the backlog p50 {} / p99 {} | report |\n",
        ms(percentile_f64(&r.lat_patch_probe, 0.5)),
        ms(percentile_f64(&r.lat_patch_probe, 0.99)),
        r.lat_patch_probe.len(),
        ms(percentile_f64(&r.lat_patch_load, 0.5)),
        ms(percentile_f64(&r.lat_patch_load, 0.99)),
    );
    let _ = writeln!(
        o,
        "Overall pacing verdict: {}.\n",
        if pacing_met { "met" } else { "missed" }
    );

    let _ = writeln!(o, "## Throughput\n");
    let _ = writeln!(o, "| | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| seed: {} `member.created` (sequential simulator webhooks) → row + auth user | {:.1} s ({:.0}/s); PATCHes caused: {} |",
        s.members,
        r.seed_secs,
        s.members as f64 / r.seed_secs,
        r.seed_patches
    );
    let _ = writeln!(
        o,
        "| burst: SQL updates committed | {:.1} s after the burst start |",
        r.sql_commit_secs
    );
    let _ = writeln!(
        o,
        "| burst: webhooks posted (ingest answered) | {:.1} s ({:.0}/s); failed after 5 attempts: {}; retried attempts: {} |",
        r.burst_post_secs,
        s.ms_changes as f64 / r.burst_post_secs,
        r.post_failures,
        r.post_retries
    );
    let _ = writeln!(
        o,
        "| burst: last webhook applied | {:.1} s |",
        r.ms_drain_secs
    );
    let _ = writeln!(
        o,
        "| burst: last SQL change PATCHed | {:.1} s{} |",
        r.drain_secs,
        if r.missing_patches > 0 {
            format!(" (**{} never PATCHed**)", r.missing_patches)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "| `webhook_log` rows since the burst start (webhooks, CDC events, echoes) | {} |",
        r.burst_processed_all
    );
    let _ = writeln!(
        o,
        "| Memberstack-side members whose final `custom_fields.seq` is not their last change | {} |",
        r.wrong_final_rows
    );
    let _ = writeln!(
        o,
        "| daemon CPU during the burst | {:.0} s ({:.2} cores over {:.0} s); peak RSS {:.0} MiB |",
        r.daemon_cpu_burst,
        r.daemon_cpu_burst / r.drain_secs,
        r.drain_secs,
        r.daemon_rss_peak
    );
    let _ = writeln!(o);
    let dist = |v: &[f64]| {
        let s = sorted(v.to_vec());
        format!(
            "min {:.0}, p10 {:.0}, median {:.0}, p90 {:.0}, max {:.0}",
            percentile_f64(&s, 0.0),
            percentile_f64(&s, 0.1),
            percentile_f64(&s, 0.5),
            percentile_f64(&s, 0.9),
            percentile_f64(&s, 1.0)
        )
    };
    let _ = writeln!(
        o,
        "Memberstack webhooks applied per second (whole seconds from the burst start to the last one): {}.\n",
        dist(&r.applied_per_sec_ms)
    );
    let _ = writeln!(
        o,
        "All `webhook_log` rows per second, same window: {}.\n",
        dist(&r.applied_per_sec_all)
    );
    // While the PATCH backlog lasted vs after.
    let backlog_end_sec =
        ((r.backlog_to_us - r.backlog_from_us.min(r.backlog_to_us)) / 1_000_000) as usize;
    let (during, after): (Vec<f64>, Vec<f64>) = {
        let off =
            ((r.backlog_from_us - r.backlog_from_us.min(r.backlog_to_us)) / 1_000_000) as usize;
        let _ = off;
        let split = backlog_end_sec.min(r.applied_per_sec_ms.len());
        (
            r.applied_per_sec_ms[..split].to_vec(),
            r.applied_per_sec_ms[split..].to_vec(),
        )
    };
    let _ = writeln!(
        o,
        "Webhooks applied per second while the PATCH backlog lasted (first {} s): median {:.0}; afterwards: median {:.0} ({} s).\n",
        during.len(),
        median(&during),
        median(&after),
        after.len()
    );
    let series: Vec<String> = r
        .applied_per_sec_ms
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect();
    let _ = writeln!(
        o,
        "<details><summary>per-second series (webhooks applied)</summary>\n\n{}\n\n</details>\n",
        series.join(" ")
    );

    let _ = writeln!(o, "## Memberstack pacing\n");
    let _ = writeln!(
        o,
        "{} PATCHes during the burst, from the first to the last {backlog_secs:.1} s apart. Per whole second of that window: {}. Other API calls: {:?}.\n",
        r.backlog_patches,
        dist(&r.backlog_per_sec),
        r.other_calls
    );
    let series: Vec<String> = r
        .backlog_per_sec
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect();
    let _ = writeln!(
        o,
        "<details><summary>PATCHes per second</summary>\n\n{}\n\n</details>\n",
        series.join(" ")
    );

    let _ = writeln!(o, "## Latency\n");
    let _ = writeln!(
        o,
        "| path | condition | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|"
    );
    for (name, cond, v) in [
        (
            "webhook → row",
            "unloaded probe: POST start → row visible (polled every 1 ms)",
            &r.lat_webhook_probe,
        ),
        (
            "webhook → row",
            "burst: POST start → `webhook_log.processed_at` (transaction start)",
            &r.lat_webhook_load,
        ),
        (
            "row → PATCH",
            "unloaded probe: SQL commit returned → PATCH arrived at the simulator",
            &r.lat_patch_probe,
        ),
        (
            "row → PATCH",
            "burst (backlog of SQL changes at 25/s): commit → PATCH",
            &r.lat_patch_load,
        ),
    ] {
        let _ = writeln!(
            o,
            "| {name} | {cond} | {} | {} | {} | {} | {} |",
            v.len(),
            ms(percentile_f64(v, 0.5)),
            ms(percentile_f64(v, 0.9)),
            ms(percentile_f64(v, 0.99)),
            ms(percentile_f64(v, 1.0))
        );
    }
    if let Some(((l50, u50), (l99, u99))) = r.hist_load {
        let _ = writeln!(
            o,
            "\nMerge's own `membersync_merge_change_to_applied_seconds` over the burst (all sources, bucket bounds): p50 in ({l50}, {u50}] s, p99 in ({l99}, {u99}] s."
        );
    }
    if !r.probe_failures.is_empty() {
        let _ = writeln!(o, "\nProbe failures: {}", r.probe_failures.join("; "));
    }
    let _ = writeln!(o, "\n## Daemon counters over the burst (deltas)\n\n```");
    for (k, v) in &r.metric_deltas {
        let _ = writeln!(o, "{k} {v}");
    }
    let _ = writeln!(o, "```\n");
    let _ = writeln!(
        o,
        "Daemon exit: {}. Warnings/errors in its log (level warn):\n",
        r.exit
    );
    if r.log_summary.is_empty() {
        let _ = writeln!(o, "- none");
    }
    for l in r.log_summary.iter().take(20) {
        let _ = writeln!(o, "- {l}");
    }
    o
}
