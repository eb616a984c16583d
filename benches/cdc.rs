//! CDC throughput, latency and memory: `cargo bench --bench cdc`.
//!
//! Three measurements of the real release binary (`membersync cdc`) against the dev
//! Postgres cluster and the dev broker, each in a fresh database of its own:
//!
//! 1. **Backlog drain** (baseline in the same run): two logical slots are created at the same
//!    point, then a backlog of `2 × MEMBERSYNC_BENCH_CDC_ROWS` row changes is written to
//!    `public.members` (inserts, then updates of the same rows, in transactions of
//!    `MEMBERSYNC_BENCH_CDC_TX_ROWS` rows). `pg_recvlogical` drains one slot to `/dev/null`
//!    with the daemon's pgoutput options (`--endpos` = the WAL position after the load); the
//!    daemon drains the other into Kafka, and is done when `membersync_cdc_confirmed_lsn`
//!    passes the last load transaction (everything acknowledged by Kafka and confirmed). The
//!    pair runs `MEMBERSYNC_BENCH_CDC_REPS` times with fresh slots and a fresh backlog,
//!    alternating which of the two goes first (the second reads WAL the first already pulled
//!    into the page cache). Reported: both rates, medians, and the ratio daemon/pg_recvlogical.
//! 2. **Steady load**: with the daemon streaming, a writer commits
//!    `rate × tick / 1000` rows every `tick` ms (default 50 rows / 10 ms = 5,000 rows/s),
//!    alternating an insert of new members and an update of the previous tick's members.
//!    Commit→ack comes from the daemon's own histogram (`membersync_cdc_commit_to_ack_seconds`,
//!    bucket-resolution estimates) and, independently, from a consumer of the CDC topic
//!    started before the load: `source.ts_ms` (Postgres commit time) against the Kafka record
//!    timestamp and against the time the consumer received the record.
//! 3. **Large transaction**: one transaction inserting `MEMBERSYNC_BENCH_CDC_BIG_TX_ROWS` rows
//!    (`insert … select generate_series(…)`); the daemon's RSS (`/proc/<pid>/status` VmRSS,
//!    every 100 ms) before, during and after, until the confirmed LSN passes the transaction.
//!
//! Everything created — the database, every slot (an abandoned slot pins WAL for the whole
//! cluster), the topics — is removed at the end, also after a failure or Ctrl-C; leftovers
//! of an earlier run that died are removed at start. Results: `bench/results/cdc.md`.
//!
//! Environment (all optional):
//! - `MEMBERSYNC_BENCH_CDC_ROWS` (100000): rows inserted per backlog rep (the same rows are
//!   then updated, so the backlog has twice as many changes);
//! - `MEMBERSYNC_BENCH_CDC_TX_ROWS` (1000): rows per backlog transaction;
//! - `MEMBERSYNC_BENCH_CDC_REPS` (3): backlog reps (a rep disturbed by a build is repeated,
//!   at most 2 extra times);
//! - `MEMBERSYNC_BENCH_CDC_RATE` (5000) / `_TICK_MS` (10) / `_SECS` (30) / `_WARMUP_SECS` (3):
//!   the steady load;
//! - `MEMBERSYNC_BENCH_CDC_BIG_TX_ROWS` (1000000): rows of the large transaction;
//! - `MEMBERSYNC_BENCH_CDC_PHASES` (`backlog,steady,bigtx`): which measurements run;
//! - `MEMBERSYNC_BENCH_CDC_TIMEOUT_SECS` (900): how long a drain may take before the bench
//!   reports the daemon stuck (with its metrics, slot state and log);
//! - `MEMBERSYNC_BENCH_QUIET_TIMEOUT_SECS` (1800): how long to wait for other builds and test
//!   runs to finish before each measurement (2 shared cores: a compile is pure noise);
//! - `MEMBERSYNC_BENCH_CDC_OUT` (`bench/results/cdc.md`): the report.
//!
//! Needs the dev services (`scripts/dev-services up`, `.dev/services.env`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Timestamp;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

mod support;
use support::host::{Machine, command_output, env_or, free_port, machine, read_trimmed, repo_root};
use support::metrics::Metrics;
use support::stats::percentile_f64;

/// The publication `membersync migrate` creates.
const PUBLICATION: &str = "membersync";
/// Name prefix of everything this bench creates in Postgres (`<prefix>_<pid>_<random>`).
const NAME_PREFIX: &str = "cdcbench";
const METRICS_POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------
// Settings and environment
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Backlog,
    Steady,
    BigTx,
}

struct Settings {
    rows: u64,
    tx_rows: u64,
    reps: usize,
    rate: u64,
    tick_ms: u64,
    secs: u64,
    warmup_secs: u64,
    big_tx_rows: u64,
    phases: BTreeSet<Phase>,
    drain_timeout: Duration,
    quiet_timeout: Duration,
    out: PathBuf,
    /// Run a private Tansu (default) rather than use the shared dev broker.
    private_broker: bool,
}

const SETTING_KEYS: &[&str] = &[
    "MEMBERSYNC_BENCH_CDC_ROWS",
    "MEMBERSYNC_BENCH_CDC_TX_ROWS",
    "MEMBERSYNC_BENCH_CDC_REPS",
    "MEMBERSYNC_BENCH_CDC_RATE",
    "MEMBERSYNC_BENCH_CDC_TICK_MS",
    "MEMBERSYNC_BENCH_CDC_SECS",
    "MEMBERSYNC_BENCH_CDC_WARMUP_SECS",
    "MEMBERSYNC_BENCH_CDC_BIG_TX_ROWS",
    "MEMBERSYNC_BENCH_CDC_PHASES",
    "MEMBERSYNC_BENCH_CDC_TIMEOUT_SECS",
    "MEMBERSYNC_BENCH_QUIET_TIMEOUT_SECS",
    "MEMBERSYNC_BENCH_CDC_OUT",
    "MEMBERSYNC_BENCH_CDC_BROKER",
];

impl Settings {
    fn from_env() -> Settings {
        let phases = std::env::var("MEMBERSYNC_BENCH_CDC_PHASES")
            .unwrap_or_else(|_| "backlog,steady,bigtx".into())
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "backlog" => Phase::Backlog,
                "steady" => Phase::Steady,
                "bigtx" => Phase::BigTx,
                other => panic!(
                    "MEMBERSYNC_BENCH_CDC_PHASES: unknown phase {other:?} (backlog, steady, bigtx)"
                ),
            })
            .collect::<BTreeSet<_>>();
        assert!(!phases.is_empty(), "MEMBERSYNC_BENCH_CDC_PHASES is empty");
        let s = Settings {
            rows: env_or("MEMBERSYNC_BENCH_CDC_ROWS", 100_000),
            tx_rows: env_or("MEMBERSYNC_BENCH_CDC_TX_ROWS", 1_000),
            reps: env_or("MEMBERSYNC_BENCH_CDC_REPS", 3) as usize,
            rate: env_or("MEMBERSYNC_BENCH_CDC_RATE", 5_000),
            tick_ms: env_or("MEMBERSYNC_BENCH_CDC_TICK_MS", 10),
            secs: env_or("MEMBERSYNC_BENCH_CDC_SECS", 30),
            warmup_secs: env_or("MEMBERSYNC_BENCH_CDC_WARMUP_SECS", 3),
            big_tx_rows: env_or("MEMBERSYNC_BENCH_CDC_BIG_TX_ROWS", 1_000_000),
            phases,
            drain_timeout: Duration::from_secs(env_or("MEMBERSYNC_BENCH_CDC_TIMEOUT_SECS", 900)),
            quiet_timeout: Duration::from_secs(env_or("MEMBERSYNC_BENCH_QUIET_TIMEOUT_SECS", 1800)),
            private_broker: match std::env::var("MEMBERSYNC_BENCH_CDC_BROKER").as_deref() {
                Err(_) | Ok("private") => true,
                Ok("dev") => false,
                Ok(other) => panic!("MEMBERSYNC_BENCH_CDC_BROKER={other:?}: private or dev"),
            },
            out: std::env::var("MEMBERSYNC_BENCH_CDC_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| repo_root().join("bench/results/cdc.md")),
        };
        assert!(
            s.rows > 0 && s.tx_rows > 0 && s.reps > 0,
            "rows, tx rows and reps must be ≥ 1"
        );
        assert!(s.tick_ms > 0 && s.secs > 0, "tick and seconds must be ≥ 1");
        assert!(
            s.rate * s.tick_ms / 1000 > 0,
            "MEMBERSYNC_BENCH_CDC_RATE × TICK_MS must be at least 1000 (one row per tick)"
        );
        s
    }

    fn rows_per_tick(&self) -> u64 {
        self.rate * self.tick_ms / 1000
    }

    /// The command line that reproduces this run.
    fn command(&self) -> String {
        let mut cmd = String::new();
        for key in SETTING_KEYS {
            if let Ok(v) = std::env::var(key) {
                let _ = write!(cmd, "{key}={v} ");
            }
        }
        cmd.push_str("cargo bench --bench cdc");
        cmd
    }
}

use support::services::Services;

/// This bench's helpers on the shared dev-services settings.
impl Services {
    fn pg_host(&self) -> &str {
        self.var("MEMBERSYNC_DEV_PG_HOST")
    }

    fn pg_port(&self) -> u16 {
        self.var("MEMBERSYNC_DEV_PG_PORT")
            .parse()
            .expect("numeric port")
    }

    fn superuser(&self) -> &str {
        self.var("MEMBERSYNC_DEV_PG_SUPERUSER")
    }

    fn superuser_password_file(&self) -> &str {
        self.var("MEMBERSYNC_DEV_PG_SUPERUSER_PASSWORD_FILE")
    }

    fn superuser_password(&self) -> String {
        read_trimmed(self.superuser_password_file()).expect("superuser password file")
    }

    fn pg_bin(&self) -> PathBuf {
        PathBuf::from(self.var("MEMBERSYNC_DEV_PG_BIN"))
    }

    fn brokers(&self) -> &str {
        self.var("MEMBERSYNC_DEV_KAFKA_BROKERS")
    }

    async fn connect(&self, dbname: &str) -> Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(self.pg_host())
            .port(self.pg_port())
            .user(self.superuser())
            .password(self.superuser_password())
            .dbname(dbname)
            .application_name("membersync-cdc-bench")
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = cfg.connect(NoTls).await.unwrap_or_else(|e| {
            panic!("cannot reach the dev Postgres ({e}): run `scripts/dev-services up`")
        });
        tokio::spawn(conn);
        client
    }
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Other activity on the machine, and CPU accounting
// ---------------------------------------------------------------------------------------

/// Processes this bench started (daemons), so they do not count as foreign activity.
fn own_children() -> &'static Mutex<BTreeSet<u32>> {
    static CHILDREN: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    CHILDREN.get_or_init(|| Mutex::new(BTreeSet::new()))
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> Option<String> {
    read_trimmed(format!("/proc/{pid}/comm"))
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Builds, test runs and other benchmarks: compilers, cargo (not this bench's ancestors),
/// nextest, the ingest bench, membersync processes this bench did not start and brokers
/// other than its own; by pid.
fn foreign_processes() -> BTreeMap<u32, String> {
    let mut ancestors = BTreeSet::new();
    let mut pid = std::process::id();
    while let Some(p) = parent(pid) {
        if p == 0 || !ancestors.insert(p) {
            break;
        }
        pid = p;
    }
    let mut own = own_children().lock().expect("children").clone();
    // The broker this bench uses is not foreign; other Tansu instances (the shared dev
    // broker while the bench runs its own, other tests' brokers) are.
    own.extend(tansu_pid());
    pids()
        .into_iter()
        .filter(|pid| !ancestors.contains(pid) && !own.contains(pid))
        .filter_map(|pid| Some((pid, comm(pid)?)))
        .filter(|(_, c)| {
            c == "rustc"
                || c == "cargo"
                || c.starts_with("cargo-nextest")
                || c.starts_with("ingest_load")
                || c == "membersync"
                || c == "tansu"
        })
        .collect()
}

/// Foreign processes that used CPU (≥ 2 % of a core) over `window`. Another benchmark
/// waiting for quiet itself (it sees this bench's `cargo` as a build) sleeps and is not
/// activity — counting it would make the two benches wait for each other forever.
async fn foreign_activity(window: Duration) -> BTreeSet<String> {
    let hz = clock_ticks_per_sec();
    let before: BTreeMap<u32, (String, Option<u64>)> = foreign_processes()
        .into_iter()
        .map(|(pid, name)| (pid, (name, proc_ticks(pid))))
        .collect();
    if before.is_empty() {
        return BTreeSet::new();
    }
    tokio::time::sleep(window).await;
    let after = foreign_processes();
    let mut busy = BTreeSet::new();
    for (pid, (name, t0)) in &before {
        let t1 = proc_ticks(*pid);
        let used = match (t0, t1) {
            (Some(a), Some(b)) => b.saturating_sub(*a) as f64 / hz / window.as_secs_f64(),
            // Ended meanwhile: a short build step, count it.
            _ => 1.0,
        };
        if used >= 0.02 {
            busy.insert(name.clone());
        }
    }
    // Started meanwhile.
    busy.extend(
        after
            .into_iter()
            .filter(|(pid, _)| !before.contains_key(pid))
            .map(|(_, name)| name),
    );
    busy
}

/// Waits until no other build, test run or benchmark is using CPU, or `timeout` passed.
async fn wait_for_quiet(timeout: Duration, what: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    let mut announced = false;
    loop {
        let busy = foreign_activity(Duration::from_secs(3)).await;
        if busy.is_empty() {
            if announced {
                eprintln!("cdc bench: quiet again");
                // Let the page cache and CPU frequency settle after a build.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            return busy;
        }
        if Instant::now() >= deadline {
            eprintln!("cdc bench: still busy ({busy:?}) after {timeout:?}; measuring anyway");
            return busy;
        }
        if !announced {
            eprintln!("cdc bench: waiting for {busy:?} to finish before {what}");
            announced = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn clock_ticks_per_sec() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0)
}

/// user + system ticks of a process.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    // After "pid (comm) ": state is field 3, utime field 14, stime field 15.
    let get = |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Some(get(14) + get(15))
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `host:port` of the broker the bench uses (set once in `main`).
static BROKER_ADDR: OnceLock<String> = OnceLock::new();

/// The Tansu process serving the broker the bench uses (matched by its listener port).
fn tansu_pid() -> Option<u32> {
    let port = BROKER_ADDR
        .get()
        .and_then(|b| b.split(',').next())
        .and_then(|first| first.trim().rsplit_once(':'))
        .map(|(_, p)| p.to_owned());
    let tansus: Vec<u32> = pids()
        .into_iter()
        .filter(|pid| comm(*pid).as_deref() == Some("tansu"))
        .collect();
    let by_port = port.as_ref().and_then(|port| {
        tansus.iter().copied().find(|pid| {
            cmdline(*pid)
                .iter()
                .any(|a| a.ends_with(&format!(":{port}")))
        })
    });
    by_port.or_else(|| tansus.first().copied())
}

/// The resident set (VmRSS) and its high-water mark (VmHWM) of a process, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Samples the CPU time of named processes (added while it runs) every 50 ms, and other
/// builds/test runs every 250 ms, until finished.
struct Watch {
    stop: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<(String, u32)>>>,
    thread: std::thread::JoinHandle<WatchResult>,
}

#[derive(Default, Clone)]
struct WatchResult {
    secs: f64,
    /// Average cores used, by label; `other` is the machine minus every labelled process.
    cores: BTreeMap<String, f64>,
    foreign: BTreeSet<String>,
}

impl Watch {
    fn start(initial: Vec<(String, u32)>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(initial));
        let (flag, watched) = (stop.clone(), pids.clone());
        let thread = std::thread::Builder::new()
            .name("cpu-watch".into())
            .spawn(move || {
                let hz = clock_ticks_per_sec();
                let started = Instant::now();
                let machine0 = machine_ticks().0;
                // (label, pid) → (first seen, last seen)
                let mut seen: BTreeMap<(String, u32), (u64, u64)> = BTreeMap::new();
                // foreign pid → (name, first ticks, last ticks, times seen)
                let mut foreign_seen: BTreeMap<u32, (String, u64, u64, u32)> = BTreeMap::new();
                let mut n = 0u64;
                loop {
                    let last_round = flag.load(Ordering::Relaxed);
                    for (label, pid) in watched.lock().expect("pids").clone() {
                        if let Some(t) = proc_ticks(pid) {
                            seen.entry((label, pid))
                                .and_modify(|e| e.1 = t)
                                .or_insert((t, t));
                        }
                    }
                    if n.is_multiple_of(5) {
                        for (pid, name) in foreign_processes() {
                            if let Some(t) = proc_ticks(pid) {
                                foreign_seen
                                    .entry(pid)
                                    .and_modify(|e| {
                                        e.2 = t;
                                        e.3 += 1;
                                    })
                                    .or_insert((name, t, t, 1));
                            }
                        }
                    }
                    n += 1;
                    if last_round {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let machine = machine_ticks().0.saturating_sub(machine0) as f64 / hz / secs;
                let mut cores: BTreeMap<String, f64> = BTreeMap::new();
                for ((label, _), (a, b)) in seen {
                    *cores.entry(label).or_default() += b.saturating_sub(a) as f64 / hz / secs;
                }
                // Disturbing: used ≥ 2 % of a core while seen, or a build step seen only once.
                let foreign: BTreeSet<String> = foreign_seen
                    .into_values()
                    .filter(|(name, a, b, times)| {
                        b.saturating_sub(*a) as f64 / hz / secs >= 0.02
                            || (*times == 1 && (name == "rustc" || name == "cargo"))
                    })
                    .map(|(name, ..)| name)
                    .collect();
                let labelled: f64 = cores.values().sum();
                cores.insert("other".into(), (machine - labelled).max(0.0));
                cores.insert("machine".into(), machine);
                WatchResult {
                    secs,
                    cores,
                    foreign,
                }
            })
            .expect("spawn cpu watch");
        Watch { stop, pids, thread }
    }

    fn add(&self, label: &str, pid: u32) {
        self.pids
            .lock()
            .expect("pids")
            .push((label.to_owned(), pid));
    }

    fn finish(self) -> WatchResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn cpu_cell(w: &WatchResult, label: &str) -> String {
    w.cores.get(label).map_or("–".into(), |c| format!("{c:.2}"))
}

// ---------------------------------------------------------------------------------------
// A private broker
// ---------------------------------------------------------------------------------------

/// Tansu (the dev services' binary and version) with SQLite storage in a fresh directory,
/// on a free loopback port: the bench writes millions of records, which would bloat the
/// shared dev broker's database (and deleting them keeps that broker busy for minutes).
/// Killed, and its directory removed, when dropped.
struct PrivateBroker {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    addr: String,
}

impl PrivateBroker {
    fn tansu_bin() -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("tansu"))
                .find(|p| p.is_file())
        });
        on_path.or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cargo/bin/tansu"))
                .filter(|p| p.is_file())
        })
    }

    fn start() -> Result<PrivateBroker, String> {
        let bin = Self::tansu_bin()
            .ok_or("tansu is not installed (scripts/dev-services up installs it)")?;
        let dir = tempfile::Builder::new()
            .prefix("membersync-cdc-bench-tansu-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        std::fs::create_dir(dir.path().join("tansu")).map_err(|e| e.to_string())?;
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).map_err(|e| e.to_string())?;
        // Tansu resolves a relative sqlite:// URL against its working directory.
        let child = Command::new(bin)
            .current_dir(dir.path())
            .args(["broker", "--cluster-id", "membersync-cdc-bench"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu/tansu.db"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start tansu: {e}"))?;
        own_children().lock().expect("children").insert(child.id());
        let broker = PrivateBroker {
            dir,
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("the private Tansu did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    /// Size of its database files.
    fn storage_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.path().join("tansu"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cleanup: the database, every slot, the topics — also after a panic or Ctrl-C
// ---------------------------------------------------------------------------------------

struct Cleanup {
    host: String,
    port: u16,
    user: String,
    password: String,
    brokers: String,
    db: String,
    topic_prefix: String,
    /// Topics live on the shared dev broker (a private broker is simply discarded).
    delete_topics: bool,
    done: AtomicBool,
}

impl Cleanup {
    fn superuser_config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(dbname)
            .application_name("membersync-cdc-bench-cleanup")
            .connect_timeout(Duration::from_secs(5));
        cfg
    }

    /// Drops every slot of `db` (terminating its walsender first), then `db` itself.
    async fn drop_db(cfg: tokio_postgres::Config, db: &str) -> Result<Vec<String>, String> {
        let (client, conn) = cfg.connect(NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut dropped = Vec::new();
        for attempt in 0..50 {
            let rows = client
                .query(
                    "select slot_name::text, active_pid from pg_replication_slots \
                     where database = $1 or slot_name like $2",
                    &[&db, &format!("{db}\\_%")],
                )
                .await
                .map_err(|e| e.to_string())?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let (slot, pid): (String, Option<i32>) = (row.get(0), row.get(1));
                if let Some(pid) = pid {
                    let _ = client
                        .execute("select pg_terminate_backend($1)", &[&pid])
                        .await;
                    continue;
                }
                match client
                    .execute("select pg_drop_replication_slot($1)", &[&slot])
                    .await
                {
                    Ok(_) => dropped.push(slot),
                    Err(e) if attempt == 49 => return Err(format!("drop slot {slot}: {e}")),
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        client
            .batch_execute(&format!("drop database if exists {db} with (force)"))
            .await
            .map_err(|e| format!("drop database {db}: {e}"))?;
        Ok(dropped)
    }

    async fn delete_topics(&self) -> Result<usize, String> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .map_err(|e| e.to_string())?;
        let topics: Vec<String> = [
            "memberstack",
            "stripe",
            "cdc.public.members",
            "sync",
            "dlq",
            "bench.sink",
        ]
        .iter()
        .map(|t| format!("{}.{t}", self.topic_prefix))
        .collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results =
            tokio::time::timeout(Duration::from_secs(60), admin.delete_topics(&names, &opts))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        Ok(results.iter().filter(|r| r.is_ok()).count())
    }

    /// Idempotent; returns what it did.
    fn run_blocking(self: &Arc<Self>) -> String {
        if self.done.swap(true, Ordering::SeqCst) {
            return "already cleaned up".into();
        }
        let me = self.clone();
        // May be called inside the bench's runtime (or while it unwinds): use a private one.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let mut notes = Vec::new();
                match Self::drop_db(me.superuser_config("postgres"), &me.db).await {
                    Ok(slots) => notes.push(format!(
                        "dropped database `{}` and {} slot(s) ({})",
                        me.db,
                        slots.len(),
                        slots.join(", ")
                    )),
                    Err(e) => notes.push(format!("FAILED to drop database/slots: {e}")),
                }
                if !me.delete_topics {
                    notes.push("the private broker is discarded with its storage".into());
                } else {
                    match me.delete_topics().await {
                        Ok(n) => {
                            notes.push(format!("deleted {n} topic(s) `{}.*`", me.topic_prefix))
                        }
                        Err(e) => notes.push(format!(
                            "could not delete topics `{}.*`: {e}",
                            me.topic_prefix
                        )),
                    }
                }
                let msg = notes.join("; ");
                eprintln!("cdc bench cleanup: {msg}");
                msg
            })
        })
        .join()
        .unwrap_or_else(|_| "cleanup thread panicked".into())
    }

    /// Leftovers of earlier runs that died (their pid is gone): slots and databases.
    async fn remove_stale(svc: &Services) -> Vec<String> {
        let client = svc.connect("postgres").await;
        let mut names: BTreeSet<String> = BTreeSet::new();
        let pattern = format!("{NAME_PREFIX}\\_%");
        for sql in [
            "select datname::text from pg_database where datname like $1",
            "select slot_name::text from pg_replication_slots where slot_name like $1",
        ] {
            if let Ok(rows) = client.query(sql, &[&pattern]).await {
                names.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            }
        }
        let mut dbs: BTreeSet<String> = BTreeSet::new();
        for name in names {
            // cdcbench_<pid>_<random>[_slot]
            let mut parts = name.split('_');
            let (Some(_), Some(pid), Some(random)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            dbs.insert(format!("{NAME_PREFIX}_{pid}_{random}"));
        }
        let mut out = Vec::new();
        for db in dbs {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host(svc.pg_host())
                .port(svc.pg_port())
                .user(svc.superuser())
                .password(svc.superuser_password())
                .dbname("postgres");
            match Self::drop_db(cfg, &db).await {
                Ok(slots) => out.push(format!("{db} (+{} slots)", slots.len())),
                Err(e) => out.push(format!("{db}: {e}")),
            }
        }
        out
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) {
            let me = Arc::new(Cleanup {
                host: self.host.clone(),
                port: self.port,
                user: self.user.clone(),
                password: self.password.clone(),
                brokers: self.brokers.clone(),
                db: self.db.clone(),
                topic_prefix: self.topic_prefix.clone(),
                delete_topics: self.delete_topics,
                done: AtomicBool::new(false),
            });
            me.run_blocking();
            me.done.store(true, Ordering::SeqCst);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// Everything the phases share.
struct Ctx {
    settings: Settings,
    svc: Services,
    db: String,
    topic_prefix: String,
    logs: tempfile::TempDir,
    http: reqwest::Client,
}

impl Ctx {
    fn topic(&self) -> String {
        format!("{}.cdc.public.members", self.topic_prefix)
    }

    /// The topic of the sink-only run.
    fn sink_topic(&self) -> String {
        format!("{}.bench.sink", self.topic_prefix)
    }

    fn slot(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.db)
    }

    /// `MEMBERSYNC__*` for `membersync migrate` / `membersync cdc` on this database.
    fn daemon_env(&self, slot: &str) -> Vec<(String, String)> {
        let s = &self.svc;
        [
            ("MEMBERSYNC__DATABASE__HOST", s.pg_host().to_owned()),
            ("MEMBERSYNC__DATABASE__PORT", s.pg_port().to_string()),
            ("MEMBERSYNC__DATABASE__DBNAME", self.db.clone()),
            ("MEMBERSYNC__DATABASE__USER", "membersync".to_owned()),
            (
                "MEMBERSYNC__DATABASE__PASSWORD_FILE",
                s.var("MEMBERSYNC__DATABASE__PASSWORD_FILE").to_owned(),
            ),
            ("MEMBERSYNC__DATABASE__ADMIN_USER", s.superuser().to_owned()),
            (
                "MEMBERSYNC__DATABASE__ADMIN_PASSWORD_FILE",
                s.superuser_password_file().to_owned(),
            ),
            ("MEMBERSYNC__CDC__SLOT", slot.to_owned()),
            ("MEMBERSYNC__CDC__SNAPSHOT", "never".to_owned()),
            ("MEMBERSYNC__KAFKA__BROKERS", s.brokers().to_owned()),
            ("MEMBERSYNC__KAFKA__TOPIC_PREFIX", self.topic_prefix.clone()),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "6".to_owned()),
            ("MEMBERSYNC__TELEMETRY__LOG_LEVEL", "warn".to_owned()),
            ("MEMBERSYNC__SHUTDOWN__DRAIN_TIMEOUT_SECS", "30".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn membersync(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_membersync"));
        cmd.env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd
    }

    fn spawn_daemon(&self, slot: &str, name: &str) -> DaemonProc {
        let port = free_port();
        let log = self.logs.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("daemon log");
        let child = self
            .membersync()
            .arg("cdc")
            .envs(self.daemon_env(slot))
            .env(
                "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
                format!("127.0.0.1:{port}"),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("start membersync cdc");
        let pid = child.id();
        own_children().lock().expect("children").insert(pid);
        DaemonProc {
            child: Some(child),
            pid,
            ops: format!("http://127.0.0.1:{port}"),
            log,
            http: self.http.clone(),
            spawned: Instant::now(),
        }
    }
}

struct DaemonProc {
    child: Option<std::process::Child>,
    pid: u32,
    ops: String,
    log: PathBuf,
    http: reqwest::Client,
    spawned: Instant,
}

impl DaemonProc {
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

    async fn metrics(&self) -> Option<Metrics> {
        self.get("/metrics").await.map(|t| Metrics::parse(&t))
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until every role started (`/readyz` reports `startup: ok`).
    async fn wait_ready(&mut self, timeout: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "membersync cdc exited early with {status}:\n{}",
                    self.log_tail(40)
                ));
            }
            if let Some(body) = self.get("/readyz").await {
                let ready: Value = serde_json::from_str(&body).unwrap_or_default();
                if ready["checks"]["startup"] == "ok" {
                    return Ok(Instant::now());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "membersync cdc not ready after {timeout:?}:\n{}",
                    self.log_tail(40)
                ));
            }
            tokio::time::sleep(METRICS_POLL).await;
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    async fn terminate(&mut self) -> String {
        // Taken, so that Drop does not signal a pid the system may have reused.
        match self.child.take() {
            Some(mut child) => {
                support::process::terminate(&mut child, Duration::from_secs(45)).await
            }
            None => "not running".into(),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        support::process::log_tail(&self.log, lines)
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One scrape of `/metrics`: `series → value`.
impl Metrics {
    fn confirmed(&self) -> i64 {
        self.get("membersync_cdc_confirmed_lsn") as i64
    }

    /// `membersync_cdc_events_total` of `public.members`, for one op or all (`None`).
    fn events(&self, op: Option<&str>) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.starts_with("membersync_cdc_events_total{")
                    && k.contains("table=\"public.members\"")
                    && op.is_none_or(|op| k.contains(&format!("op=\"{op}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn summary(&self) -> String {
        let mut keys: Vec<&String> = self
            .0
            .keys()
            .filter(|k| k.starts_with("membersync_cdc_") && !k.contains("_bucket"))
            .collect();
        keys.sort();
        keys.iter()
            .map(|k| format!("{k} {}", self.get(k)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Slot state, for diagnostics.
async fn slot_state(admin: &Client, slot: &str) -> String {
    match admin
        .query_opt(
            "select active, active_pid, confirmed_flush_lsn::text, \
             (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, coalesce(wal_status, '') \
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
    {
        Ok(Some(r)) => format!(
            "slot {slot}: active={} active_pid={:?} confirmed_flush_lsn={:?} lag_bytes={:?} wal_status={}",
            r.get::<_, bool>(0),
            r.get::<_, Option<i32>>(1),
            r.get::<_, Option<String>>(2),
            r.get::<_, Option<i64>>(3),
            r.get::<_, String>(4)
        ),
        Ok(None) => format!("slot {slot}: missing"),
        Err(e) => format!("slot {slot}: query failed: {e}"),
    }
}

/// The walsender serving `slot`, once it is active (checked every 20 ms, up to `timeout`).
async fn walsender_pid(admin: &Client, slot: &str, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(row)) = admin
            .query_opt(
                "select active_pid from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
            && let Some(pid) = row.get::<_, Option<i32>>(0)
        {
            return Some(pid as u32);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

const INSERT_SQL: &str = "insert into public.members \
    (memberstack_id, email, subscription_status, subscription_status_raw, plan_id, \
     custom_fields, project_data, usage_stats) \
    select 'mem_' || $3::text || '_' || g, $3::text || '.' || g || '@example.com', 'active', 'ACTIVE', \
      'pln_premium-monthly-' || (g % 7), \
      jsonb_build_object('first-name', 'Ada', 'last-name', 'Lovelace ' || g, 'country', 'GB', \
                         'newsletter', g % 2 = 0), \
      jsonb_build_object('onboarded', true, 'team', 'team-' || (g % 50)), \
      jsonb_build_object('logins', g % 97) \
    from generate_series($1::bigint, $2::bigint) g";

const UPDATE_SQL: &str = "update public.members m set \
      subscription_status = 'cancelled', subscription_status_raw = 'CANCELED', \
      custom_fields = m.custom_fields || jsonb_build_object('plan-changed', g), \
      last_synced_at = now() \
    from generate_series($1::bigint, $2::bigint) g \
    where m.memberstack_id = 'mem_' || $3::text || '_' || g";

const INSERT_LSN_SQL: &str = "select (pg_current_wal_insert_lsn() - '0/0')::bigint";

/// Runs `sql` in a transaction and returns the WAL insert position just before its commit:
/// the commit record (and so the `Commit.end_lsn` the daemon confirms) lies after it, and
/// every earlier transaction of this session before it.
async fn exec_marked(client: &mut Client, sql: &str, from: i64, to: i64, tag: &str) -> i64 {
    let tx = client.transaction().await.expect("begin");
    tx.execute(sql, &[&from, &to, &tag])
        .await
        .expect("load statement");
    let lsn: i64 = tx
        .query_one(INSERT_LSN_SQL, &[])
        .await
        .expect("insert lsn")
        .get(0);
    tx.commit().await.expect("commit");
    lsn
}

async fn current_lsn(client: &Client) -> (i64, String) {
    let row = client
        .query_one(
            "select (pg_current_wal_lsn() - '0/0')::bigint, pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .expect("current wal lsn");
    (row.get(0), row.get(1))
}

struct Load {
    changes: u64,
    secs: f64,
    /// WAL insert position before the last transaction's commit.
    last_marker: i64,
    /// `pg_current_wal_lsn()` after the load, for `pg_recvlogical --endpos`.
    end_lsn: (i64, String),
    wal_bytes: i64,
}

/// `rows` inserts, then updates of the same rows, `tx_rows` per transaction.
async fn load_backlog(client: &mut Client, tag: &str, rows: u64, tx_rows: u64) -> Load {
    let started = Instant::now();
    let start = current_lsn(client).await.0;
    let mut marker = 0;
    for sql in [INSERT_SQL, UPDATE_SQL] {
        let mut from = 1u64;
        while from <= rows {
            let to = (from + tx_rows - 1).min(rows);
            marker = exec_marked(client, sql, from as i64, to as i64, tag).await;
            from = to + 1;
        }
    }
    let end_lsn = current_lsn(client).await;
    Load {
        changes: 2 * rows,
        secs: started.elapsed().as_secs_f64(),
        last_marker: marker,
        wal_bytes: end_lsn.0 - start,
        end_lsn,
    }
}

// ---------------------------------------------------------------------------------------
// Phase 1: backlog drain, daemon vs pg_recvlogical
// ---------------------------------------------------------------------------------------

struct RecvRun {
    secs: f64,
    ok: bool,
    note: String,
    cpu: WatchResult,
}

struct DaemonRun {
    /// Spawn → confirmed past the backlog.
    secs_spawn: Option<f64>,
    /// `/readyz` startup ok → confirmed past the backlog (the reported figure).
    secs_ready: Option<f64>,
    /// First change event produced → confirmed past the backlog.
    secs_first: Option<f64>,
    events: f64,
    backpressure_waits: f64,
    reconnects: f64,
    exit: String,
    note: String,
    cpu: WatchResult,
}

impl DaemonRun {
    fn ok(&self) -> bool {
        self.secs_ready.is_some()
    }
}

struct Rep {
    index: usize,
    recv_first: bool,
    load: Load,
    recv: RecvRun,
    daemon: DaemonRun,
    sink: Option<SinkRun>,
    quiet_wait: BTreeSet<String>,
}

impl Rep {
    fn disturbed(&self) -> BTreeSet<String> {
        let mut d = self.recv.cpu.foreign.clone();
        d.extend(self.daemon.cpu.foreign.iter().cloned());
        if let Some(sink) = &self.sink {
            d.extend(sink.cpu.foreign.iter().cloned());
        }
        d
    }

    fn recv_rate(&self) -> Option<f64> {
        self.recv
            .ok
            .then(|| self.load.changes as f64 / self.recv.secs)
    }

    fn daemon_rate(&self) -> Option<f64> {
        self.daemon.secs_ready.map(|s| self.load.changes as f64 / s)
    }

    fn sink_rate(&self) -> Option<f64> {
        self.sink
            .as_ref()
            .filter(|s| s.ok)
            .map(|s| self.load.changes as f64 / s.secs)
    }
}

async fn run_recvlogical(
    ctx: &Ctx,
    admin: &Client,
    slot: &str,
    endpos: &str,
    timeout: Duration,
) -> RecvRun {
    let svc = &ctx.svc;
    let watch = Watch::start(
        tansu_pid()
            .map(|p| vec![("broker".to_owned(), p)])
            .unwrap_or_default(),
    );
    let started = Instant::now();
    let mut child = tokio::process::Command::new(svc.pg_bin().join("pg_recvlogical"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PGPASSWORD", svc.superuser_password())
        .env("PGAPPNAME", "cdc-bench-pg_recvlogical")
        .args([
            "-d",
            &ctx.db,
            "-h",
            svc.pg_host(),
            "-p",
            &svc.pg_port().to_string(),
        ])
        .args([
            "-U",
            svc.superuser(),
            "--slot",
            slot,
            "--start",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={PUBLICATION}"),
        ])
        .args(["-o", "messages=true", "-f", "/dev/null", "--endpos", endpos])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pg_recvlogical");
    if let Some(pid) = child.id() {
        watch.add("pg_recvlogical", pid);
    }
    let wait = async {
        if let Some(pid) = walsender_pid(admin, slot, Duration::from_secs(10)).await {
            watch.add("walsender", pid);
        }
        child.wait().await
    };
    let outcome = tokio::time::timeout(timeout, wait).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = watch.finish();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt as _;
        let _ = tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut stderr)).await;
    }
    match outcome {
        Ok(Ok(status)) if status.success() => RecvRun {
            secs,
            ok: true,
            note: stderr.trim().to_owned(),
            cpu,
        },
        Ok(Ok(status)) => RecvRun {
            secs,
            ok: false,
            note: format!("pg_recvlogical {status}: {}", stderr.trim()),
            cpu,
        },
        Ok(Err(e)) => RecvRun {
            secs,
            ok: false,
            note: format!("pg_recvlogical: {e}"),
            cpu,
        },
        Err(_) => {
            let _ = child.kill().await;
            RecvRun {
                secs,
                ok: false,
                note: format!("pg_recvlogical did not reach --endpos {endpos} within {timeout:?}"),
                cpu,
            }
        }
    }
}

/// Starts the daemon on `slot` and waits until it confirmed past `marker`.
async fn run_daemon_drain(
    ctx: &Ctx,
    admin: &Client,
    slot: &str,
    marker: i64,
    name: &str,
) -> DaemonRun {
    let watch = Watch::start(
        tansu_pid()
            .map(|p| vec![("broker".to_owned(), p)])
            .unwrap_or_default(),
    );
    let mut daemon = ctx.spawn_daemon(slot, name);
    watch.add("daemon", daemon.pid);
    let spawned = daemon.spawned;
    let mut run = DaemonRun {
        secs_spawn: None,
        secs_ready: None,
        secs_first: None,
        events: 0.0,
        backpressure_waits: 0.0,
        reconnects: 0.0,
        exit: String::new(),
        note: String::new(),
        cpu: WatchResult::default(),
    };
    let ready = match daemon.wait_ready(Duration::from_secs(60)).await {
        Ok(at) => at,
        Err(e) => {
            run.note = e;
            run.cpu = watch.finish();
            run.exit = daemon.terminate().await;
            return run;
        }
    };
    let deadline = Instant::now() + ctx.settings.drain_timeout;
    let mut first_event: Option<Instant> = None;
    let mut walsender_found = false;
    let mut last = Metrics::default();
    let mut last_progress = (0.0, Instant::now());
    loop {
        if !walsender_found
            && let Ok(Some(row)) = admin
                .query_opt(
                    "select active_pid from pg_replication_slots where slot_name = $1",
                    &[&slot],
                )
                .await
            && let Some(pid) = row.get::<_, Option<i32>>(0)
        {
            watch.add("walsender", pid as u32);
            walsender_found = true;
        }
        if let Some(m) = daemon.metrics().await {
            let now = Instant::now();
            if first_event.is_none() && m.events(None) > 0.0 {
                first_event = Some(now);
            }
            if m.events(None) > last_progress.0 {
                last_progress = (m.events(None), now);
            }
            let done = m.confirmed() > marker;
            last = m;
            if done {
                run.secs_spawn = Some(now.duration_since(spawned).as_secs_f64());
                run.secs_ready = Some(now.duration_since(ready).as_secs_f64());
                run.secs_first = first_event.map(|f| now.duration_since(f).as_secs_f64());
                break;
            }
        }
        if let Some(status) = daemon.exited() {
            run.note = format!("the daemon exited during the drain with {status}");
            break;
        }
        if Instant::now() > deadline {
            run.note = format!(
                "the daemon did not confirm past the backlog within {:?} (target LSN > {marker}); \
                 last event produced {:.1} s before the deadline",
                ctx.settings.drain_timeout,
                last_progress.1.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(METRICS_POLL).await;
    }
    run.cpu = watch.finish();
    run.events = last.events(None);
    run.backpressure_waits = last.get("membersync_cdc_backpressure_waits_total");
    run.reconnects = last.get("membersync_cdc_reconnects_total");
    if !run.ok() {
        run.note = format!(
            "{}\n\nmetrics:\n{}\n\n{}\n\nlog tail:\n{}",
            run.note,
            last.summary(),
            slot_state(admin, slot).await,
            daemon.log_tail(40)
        );
    }
    run.exit = daemon.terminate().await;
    run
}

/// A Kafka record's key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// Records of the CDC topic (key, value), read from its beginning: real envelopes for the
/// sink-only run.
fn capture_records(brokers: &str, topic: &str, n: usize) -> Result<Vec<KeyValue>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("cdc-bench-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(|e| e.to_string())?;
        }
    }
    consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    if out.is_empty() {
        return Err(format!("no records on {topic} within 30 s"));
    }
    Ok(out)
}

/// The daemon's Kafka half alone: its own sink (`membersync::cdc::sink::CdcSink`, same
/// producer settings) and LSN ack tracker, fed `changes` pre-built envelopes in transactions
/// of `tx_rows` as fast as it takes them, until every transaction is acknowledged. What the
/// daemon could reach if reading and decoding Postgres cost nothing.
struct SinkRun {
    secs: f64,
    ok: bool,
    note: String,
    cpu: WatchResult,
    mean_bytes: f64,
}

async fn run_sink_only(ctx: &Ctx, records: &[KeyValue], changes: u64, tx_rows: u64) -> SinkRun {
    use membersync::cdc::ack::AckTracker;
    use membersync::cdc::sink::CdcSink;
    let kafka = membersync::config::KafkaConfig {
        brokers: ctx.svc.brokers().to_owned(),
        topic_prefix: ctx.topic_prefix.clone(),
        topic_partitions: 6,
        ..Default::default()
    };
    let topic = ctx.sink_topic();
    let mean_bytes =
        records.iter().map(|r| r.1.len()).sum::<usize>() as f64 / records.len().max(1) as f64;
    let fail = |note: String| SinkRun {
        secs: 0.0,
        ok: false,
        note,
        cpu: WatchResult::default(),
        mean_bytes,
    };
    let admin = match membersync::kafka::admin::KafkaAdmin::new(&kafka) {
        Ok(a) => a,
        Err(e) => return fail(format!("admin: {e}")),
    };
    if let Err(e) = admin.ensure_topics(std::slice::from_ref(&topic)).await {
        return fail(format!("create {topic}: {e}"));
    }
    let tracker = AckTracker::new();
    let sink = match CdcSink::new(&kafka, tracker.clone()) {
        Ok(s) => s,
        Err(e) => return fail(format!("sink: {e}")),
    };
    let mut watched = vec![("sink (this process)".to_owned(), std::process::id())];
    if let Some(p) = tansu_pid() {
        watched.push(("broker".to_owned(), p));
    }
    let watch = Watch::start(watched);
    let started = Instant::now();
    let deadline = started + ctx.settings.drain_timeout;
    let mut sent = 0u64;
    let mut lsn = 1u64;
    let mut note = String::new();
    'produce: while sent < changes {
        let seq = tracker.begin();
        let n = tx_rows.min(changes - sent);
        for i in 0..n {
            let (key, value) = &records[((sent + i) as usize) % records.len()];
            if let Err(e) = sink.send(seq, &topic, Some(key), value).await {
                note = format!("send: {e}");
                break 'produce;
            }
        }
        sent += n;
        lsn += 1;
        tracker.commit(seq, lsn, Instant::now());
        tracker.take_confirmed();
    }
    while note.is_empty() {
        tracker.take_confirmed();
        if let Some(e) = tracker.take_failure() {
            note = format!("delivery failed: {e}");
            break;
        }
        if tracker.is_idle() {
            break;
        }
        if Instant::now() > deadline {
            note = format!(
                "not all records acknowledged within {:?}",
                ctx.settings.drain_timeout
            );
            break;
        }
        tokio::select! {
            _ = tracker.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = watch.finish();
    SinkRun {
        secs,
        ok: note.is_empty(),
        note,
        cpu,
        mean_bytes,
    }
}

async fn backlog_rep(
    ctx: &Ctx,
    admin: &Client,
    loader: &mut Client,
    index: usize,
    records: &mut Option<Result<Vec<KeyValue>, String>>,
) -> Rep {
    let s = &ctx.settings;
    let quiet_wait = wait_for_quiet(s.quiet_timeout, &format!("backlog rep {}", index + 1)).await;
    let (dslot, bslot) = (
        ctx.slot(&format!("d{index}")),
        ctx.slot(&format!("b{index}")),
    );
    admin
        .query_one(
            "select pg_create_logical_replication_slot($1, 'pgoutput'), \
                    pg_create_logical_replication_slot($2, 'pgoutput')",
            &[&dslot, &bslot],
        )
        .await
        .expect("create the two slots");
    eprintln!(
        "cdc bench: rep {}: writing the backlog ({} changes)",
        index + 1,
        2 * s.rows
    );
    let load = load_backlog(loader, &format!("r{index}"), s.rows, s.tx_rows).await;
    // Keep autovacuum and a checkpoint out of the measurement.
    loader
        .batch_execute("vacuum (analyze) public.members")
        .await
        .expect("vacuum");
    loader
        .batch_execute("checkpoint")
        .await
        .expect("checkpoint");
    let recv_first = index.is_multiple_of(2);
    let timeout = s.drain_timeout;
    let (recv, daemon) = if recv_first {
        eprintln!(
            "cdc bench: rep {}: pg_recvlogical, then the daemon",
            index + 1
        );
        let r = run_recvlogical(ctx, admin, &bslot, &load.end_lsn.1, timeout).await;
        let d = run_daemon_drain(
            ctx,
            admin,
            &dslot,
            load.last_marker,
            &format!("drain-{index}"),
        )
        .await;
        (r, d)
    } else {
        eprintln!(
            "cdc bench: rep {}: the daemon, then pg_recvlogical",
            index + 1
        );
        let d = run_daemon_drain(
            ctx,
            admin,
            &dslot,
            load.last_marker,
            &format!("drain-{index}"),
        )
        .await;
        let r = run_recvlogical(ctx, admin, &bslot, &load.end_lsn.1, timeout).await;
        (r, d)
    };
    for slot in [&dslot, &bslot] {
        if let Err(e) = admin
            .execute("select pg_drop_replication_slot($1)", &[slot])
            .await
        {
            eprintln!("cdc bench: dropping slot {slot} failed ({e}); the final cleanup retries");
        }
    }
    eprintln!(
        "cdc bench: rep {}: pg_recvlogical {:.2} s, daemon {} ",
        index + 1,
        recv.secs,
        daemon
            .secs_ready
            .map_or("FAILED".into(), |x| format!("{x:.2} s"))
    );
    if records.is_none() && daemon.ok() {
        let (brokers, topic) = (ctx.svc.brokers().to_owned(), ctx.topic());
        *records = Some(
            tokio::task::spawn_blocking(move || capture_records(&brokers, &topic, 2_000))
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
        );
    }
    let sink = match records {
        Some(Ok(r)) => {
            eprintln!(
                "cdc bench: rep {}: the daemon's sink alone, {} records",
                index + 1,
                load.changes
            );
            let run = run_sink_only(ctx, r, load.changes, s.tx_rows).await;
            eprintln!(
                "cdc bench: rep {}: sink alone {:.2} s {}",
                index + 1,
                run.secs,
                run.note
            );
            Some(run)
        }
        Some(Err(e)) => Some(SinkRun {
            secs: 0.0,
            ok: false,
            note: format!("no records to replay: {e}"),
            cpu: WatchResult::default(),
            mean_bytes: 0.0,
        }),
        None => None,
    };
    Rep {
        index,
        recv_first,
        load,
        recv,
        daemon,
        sink,
        quiet_wait,
    }
}

// ---------------------------------------------------------------------------------------
// Phase 2: steady load, commit → ack
// ---------------------------------------------------------------------------------------

struct Received {
    recv_us: i64,
    timestamp: Timestamp,
    payload: Vec<u8>,
}

/// Reads the CDC topic from its current end, on a thread of its own, until stopped.
struct TopicReader {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Result<Vec<Received>, String>>,
}

impl TopicReader {
    fn start(brokers: &str, topic: &str) -> Result<(TopicReader, usize), String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("cdc-bench-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20")
            .set("fetch.error.backoff.ms", "20")
            .create()
            .map_err(|e| format!("consumer: {e}"))?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(format!("topic {topic} has no partitions"));
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let (_, high) = consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
            tpl.add_partition_offset(topic, *p, Offset::Offset(high))
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (flag, counter) = (stop.clone(), count.clone());
        let thread = std::thread::Builder::new()
            .name("topic-reader".into())
            .spawn(move || {
                let mut out = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => {
                            out.push(Received {
                                recv_us: unix_micros(),
                                timestamp: m.timestamp(),
                                payload: m.payload().unwrap_or_default().to_vec(),
                            });
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Err(e)) => return Err(format!("consume: {e}")),
                        None => {}
                    }
                }
                Ok(out)
            })
            .map_err(|e| e.to_string())?;
        Ok((
            TopicReader {
                stop,
                count,
                thread,
            },
            partitions.len(),
        ))
    }

    fn finish(self) -> Result<Vec<Received>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "reader panicked".to_owned())?
    }
}

#[derive(Default)]
struct Steady {
    partitions: usize,
    offered_rate: u64,
    rows_per_tick: u64,
    measured_secs: f64,
    measured_rows: u64,
    measured_txs: u64,
    writer_max_late_ms: f64,
    writer_p99_commit_ms: f64,
    /// From the writer's last commit until the daemon confirmed it.
    catch_up_s: Option<f64>,
    hist_buckets: Vec<(f64, f64)>,
    hist_count: f64,
    hist_sum: f64,
    confirmed_txs: f64,
    /// Per transaction: commit → last record's Kafka timestamp / → last record received.
    tx_kafka_ts_ms: Vec<f64>,
    tx_received_ms: Vec<f64>,
    /// Per record: commit → the daemon built the envelope (`ts_ms`) / Kafka timestamp / received.
    row_envelope_ms: Vec<f64>,
    row_kafka_ts_ms: Vec<f64>,
    row_received_ms: Vec<f64>,
    timestamp_type: String,
    records_seen: usize,
    records_expected: u64,
    cpu: WatchResult,
    note: String,
}

/// Prometheus-style estimate from cumulative buckets: linear inside the bucket holding the
/// rank. Returns (estimate, lower bound, upper bound of that bucket).
fn bucket_quantile(buckets: &[(f64, f64)], p: f64) -> Option<(f64, f64, f64)> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = p * total;
    let mut prev = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some((prev.0, prev.0, le));
            }
            let within = if cum > prev.1 {
                (rank - prev.1) / (cum - prev.1)
            } else {
                1.0
            };
            return Some((prev.0 + (le - prev.0) * within, prev.0, le));
        }
        prev = (le, cum);
    }
    None
}

async fn steady_phase(
    ctx: &Ctx,
    daemon: &DaemonProc,
    writer: &mut Client,
    admin: &Client,
    slot: &str,
) -> Steady {
    let s = &ctx.settings;
    let mut out = Steady {
        offered_rate: s.rate,
        rows_per_tick: s.rows_per_tick(),
        ..Default::default()
    };
    let (reader, partitions) = match TopicReader::start(ctx.svc.brokers(), &ctx.topic()) {
        Ok(r) => r,
        Err(e) => {
            out.note = format!("cannot read the CDC topic: {e}");
            return out;
        }
    };
    out.partitions = partitions;
    let insert = writer.prepare(INSERT_SQL).await.expect("prepare insert");
    let update = writer.prepare(UPDATE_SQL).await.expect("prepare update");
    let tick = Duration::from_millis(s.tick_ms);
    let warm_ticks = s.warmup_secs * 1000 / s.tick_ms;
    let total_ticks = warm_ticks + s.secs * 1000 / s.tick_ms;
    let per = s.rows_per_tick() as i64;
    let mut next_row = 1i64;
    let mut prev_range = (0i64, 0i64);
    let mut lateness_ms: Vec<f64> = Vec::new();
    let mut commit_ms: Vec<f64> = Vec::new();
    let mut before: Option<tokio::task::JoinHandle<Option<Metrics>>> = None;
    let mut window = (0i64, 0i64); // unix µs of the measured window
    let mut marker = 0i64;
    let mut watch: Option<Watch> = None;
    eprintln!(
        "cdc bench: steady load, {} rows every {} ms for {} + {} s",
        per, s.tick_ms, s.warmup_secs, s.secs
    );
    let mut watched = vec![("daemon".to_owned(), daemon.pid)];
    if let Some(p) = tansu_pid() {
        watched.push(("broker".to_owned(), p));
    }
    if let Some(p) = walsender_pid(admin, slot, Duration::from_secs(2)).await {
        watched.push(("walsender".to_owned(), p));
    }
    let t0 = tokio::time::Instant::now();
    let mut interval = tokio::time::interval_at(t0, tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for k in 0..total_ticks {
        interval.tick().await;
        let due = t0 + tick * k as u32;
        if k == warm_ticks {
            window.0 = unix_micros();
            let (http, url) = (daemon.http.clone(), format!("{}/metrics", daemon.ops));
            before = Some(tokio::spawn(async move {
                Some(Metrics::parse(
                    &http.get(url).send().await.ok()?.text().await.ok()?,
                ))
            }));
            watch = Some(Watch::start(watched.clone()));
        }
        let started = tokio::time::Instant::now();
        let late = started.duration_since(due).as_secs_f64() * 1000.0;
        let last = k + 1 == total_ticks;
        let tag = "steady";
        let (sql, stmt, range) = if k % 2 == 0 {
            let r = (next_row, next_row + per - 1);
            next_row += per;
            (INSERT_SQL, &insert, r)
        } else {
            (UPDATE_SQL, &update, prev_range)
        };
        if last {
            marker = exec_marked(writer, sql, range.0, range.1, tag).await;
        } else {
            writer
                .execute(stmt, &[&range.0, &range.1, &tag])
                .await
                .expect("steady write");
        }
        prev_range = range;
        if k >= warm_ticks {
            lateness_ms.push(late);
            commit_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            out.measured_rows += per as u64;
            out.measured_txs += 1;
        }
    }
    window.1 = unix_micros();
    let last_commit = Instant::now();
    out.measured_secs = (window.1 - window.0) as f64 / 1e6;
    // Wait until the daemon confirmed the last transaction.
    let deadline = Instant::now() + Duration::from_secs(120);
    let after = loop {
        if let Some(m) = daemon.metrics().await
            && m.confirmed() > marker
        {
            out.catch_up_s = Some(last_commit.elapsed().as_secs_f64());
            break Some(m);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(METRICS_POLL).await;
    };
    if let Some(w) = watch {
        out.cpu = w.finish();
    }
    let before = match before {
        Some(h) => h.await.ok().flatten(),
        None => None,
    };
    // Let the reader catch up with what the daemon confirmed (bounded).
    let expected_records = total_ticks * per as u64;
    let catch_up = Instant::now() + Duration::from_secs(15);
    while (reader.count.load(Ordering::Relaxed) as u64) < expected_records
        && Instant::now() < catch_up
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = match reader.finish() {
        Ok(r) => r,
        Err(e) => {
            out.note = format!("reading the CDC topic failed: {e}");
            Vec::new()
        }
    };
    out.records_expected = expected_records;
    out.records_seen = records.len();
    match (&before, &after) {
        (Some(b), Some(a)) => {
            let name = "membersync_cdc_commit_to_ack_seconds";
            let bb = b.buckets(name);
            out.hist_buckets = a
                .buckets(name)
                .iter()
                .map(|(le, c)| {
                    let old = bb.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
                    (*le, c - old)
                })
                .collect();
            out.hist_count = a.get(&format!("{name}_count")) - b.get(&format!("{name}_count"));
            out.hist_sum = a.get(&format!("{name}_sum")) - b.get(&format!("{name}_sum"));
            out.confirmed_txs = a.get("membersync_cdc_transactions_total")
                - b.get("membersync_cdc_transactions_total");
        }
        _ => {
            let _ = writeln!(
                out.note,
                "could not read the daemon's histogram before and after (before: {}, after: {}); \
                 after the load: {}\nlog tail:\n{}",
                before.is_some(),
                after.is_some(),
                slot_state(admin, slot).await,
                daemon.log_tail(30)
            );
        }
    }
    // Independent figures from the records themselves.
    let mut per_tx: HashMap<u64, (i64, f64, f64)> = HashMap::new(); // lsn → (commit ms, max ts, max recv)
    let mut types = BTreeSet::new();
    for r in &records {
        let Ok(v) = serde_json::from_slice::<Value>(&r.payload) else {
            continue;
        };
        let (Some(commit), Some(lsn)) =
            (v["source"]["ts_ms"].as_i64(), v["source"]["lsn"].as_u64())
        else {
            continue;
        };
        if commit * 1000 < window.0 || commit * 1000 > window.1 {
            continue;
        }
        let (kind, ts) = match r.timestamp {
            Timestamp::CreateTime(t) => ("CreateTime", Some(t)),
            Timestamp::LogAppendTime(t) => ("LogAppendTime", Some(t)),
            Timestamp::NotAvailable => ("none", None),
        };
        types.insert(kind);
        let recv_ms = r.recv_us as f64 / 1000.0 - commit as f64;
        out.row_received_ms.push(recv_ms);
        if let Some(env_ts) = v["ts_ms"].as_i64() {
            out.row_envelope_ms.push((env_ts - commit) as f64);
        }
        let ts_ms = ts.map(|t| (t - commit) as f64);
        if let Some(t) = ts_ms {
            out.row_kafka_ts_ms.push(t);
        }
        let e = per_tx.entry(lsn).or_insert((commit, f64::MIN, f64::MIN));
        e.1 = e.1.max(ts_ms.unwrap_or(f64::MIN));
        e.2 = e.2.max(recv_ms);
    }
    out.timestamp_type = types.into_iter().collect::<Vec<_>>().join(", ");
    for (_, (_, ts, recv)) in per_tx {
        if ts > f64::MIN {
            out.tx_kafka_ts_ms.push(ts);
        }
        out.tx_received_ms.push(recv);
    }
    for v in [
        &mut out.tx_kafka_ts_ms,
        &mut out.tx_received_ms,
        &mut out.row_envelope_ms,
        &mut out.row_kafka_ts_ms,
        &mut out.row_received_ms,
    ] {
        v.sort_by(f64::total_cmp);
    }
    lateness_ms.sort_by(f64::total_cmp);
    commit_ms.sort_by(f64::total_cmp);
    out.writer_max_late_ms = lateness_ms.last().copied().unwrap_or(0.0);
    out.writer_p99_commit_ms = percentile_f64(&commit_ms, 0.99);
    if after.is_none() {
        let _ = writeln!(
            out.note,
            "the daemon did not confirm the last steady transaction within 120 s"
        );
    }
    out
}

// ---------------------------------------------------------------------------------------
// Phase 3: one large transaction, RSS
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct BigTx {
    rows: u64,
    baseline_kib: u64,
    peak_kib: u64,
    peak_at_s: f64,
    after_kib: u64,
    hwm_before_kib: u64,
    hwm_after_kib: u64,
    insert_secs: f64,
    first_event_after_commit_s: Option<f64>,
    drain_after_commit_s: Option<f64>,
    events: f64,
    backpressure_waits: f64,
    samples: Vec<(f64, u64)>,
    cpu: WatchResult,
    note: String,
}

async fn big_tx_phase(
    ctx: &Ctx,
    daemon: &DaemonProc,
    writer: &mut Client,
    admin: &Client,
    slot: &str,
) -> BigTx {
    let rows = ctx.settings.big_tx_rows;
    let mut out = BigTx {
        rows,
        ..Default::default()
    };
    let pid = daemon.pid;
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let sampler = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some((rss, _)) = rss_kib(pid) {
                        samples.push((origin.elapsed().as_secs_f64(), rss));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                samples
            })
            .expect("rss sampler")
    };
    let mut initial = vec![("daemon".to_owned(), pid)];
    if let Some(p) = tansu_pid() {
        initial.push(("broker".to_owned(), p));
    }
    if let Some(p) = walsender_pid(admin, slot, Duration::from_millis(500)).await {
        initial.push(("walsender".to_owned(), p));
    }
    let watch = Watch::start(initial);
    // Idle baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    out.hwm_before_kib = rss_kib(pid).map_or(0, |r| r.1);
    let before = daemon.metrics().await.unwrap_or_default();
    let insert_at = origin.elapsed().as_secs_f64();
    eprintln!("cdc bench: one transaction of {rows} rows");
    let started = Instant::now();
    let marker = exec_marked(writer, INSERT_SQL, 1, rows as i64, "big").await;
    let committed = Instant::now();
    out.insert_secs = committed.duration_since(started).as_secs_f64();
    let deadline = Instant::now() + ctx.settings.drain_timeout;
    let mut last = before.clone();
    loop {
        if let Some(m) = daemon.metrics().await {
            let now = Instant::now();
            if out.first_event_after_commit_s.is_none() && m.events(None) > before.events(None) {
                out.first_event_after_commit_s = Some(now.duration_since(committed).as_secs_f64());
            }
            let done = m.confirmed() > marker;
            last = m;
            if done {
                out.drain_after_commit_s = Some(now.duration_since(committed).as_secs_f64());
                break;
            }
        }
        if Instant::now() > deadline {
            out.note = format!(
                "the daemon did not confirm the large transaction within {:?}\n\nmetrics:\n{}\n\n{}\n\nlog tail:\n{}",
                ctx.settings.drain_timeout,
                last.summary(),
                slot_state(admin, slot).await,
                daemon.log_tail(40)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_at = origin.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    out.cpu = watch.finish();
    out.hwm_after_kib = rss_kib(pid).map_or(0, |r| r.1);
    out.samples = sampler.join().unwrap_or_default();
    let mut base: Vec<u64> = out
        .samples
        .iter()
        .filter(|(t, _)| *t < insert_at)
        .map(|s| s.1)
        .collect();
    base.sort_unstable();
    out.baseline_kib = base.get(base.len() / 2).copied().unwrap_or(0);
    if let Some((t, kib)) = out
        .samples
        .iter()
        .filter(|(t, _)| *t >= insert_at)
        .max_by_key(|s| s.1)
        .copied()
    {
        out.peak_kib = kib;
        out.peak_at_s = t - insert_at;
    }
    out.after_kib = out
        .samples
        .iter()
        .rev()
        .find(|(t, _)| *t > drained_at)
        .map_or(0, |s| s.1);
    out.events = last.events(None) - before.events(None);
    out.backpressure_waits = last.get("membersync_cdc_backpressure_waits_total")
        - before.get("membersync_cdc_backpressure_waits_total");
    out
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn broker_description(private: bool) -> String {
    let version = std::fs::read_to_string(repo_root().join("scripts/dev-services"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("TANSU_VERSION=")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let storage = tansu_pid()
        .map(cmdline)
        .map(|args| {
            args.iter()
                .position(|a| a == "--storage-engine")
                .and_then(|i| args.get(i + 1))
                .and_then(|url| url.split_once("://").map(|(scheme, _)| scheme.to_owned()))
                .unwrap_or_else(|| "?".into())
        })
        .unwrap_or_else(|| "?".into());
    if private {
        format!(
            "a private Tansu {version} (the binary `scripts/dev-services` installs) started by the bench, \
             {storage} storage in a fresh directory, single broker on loopback"
        )
    } else {
        format!(
            "the shared dev broker (`MEMBERSYNC_BENCH_CDC_BROKER=dev`): Tansu {version}, {storage} storage, \
             single broker on loopback"
        )
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

/// Lines at WARN or above in the daemons' logs, counted by (log, message).
fn log_issues(dir: &Path) -> Vec<String> {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines() {
            let (level, message) = match serde_json::from_str::<Value>(line) {
                Ok(v) => (
                    v["level"].as_str().unwrap_or("").to_owned(),
                    format!(
                        "{} {}",
                        v["message"]
                            .as_str()
                            .or(v["fields"]["message"].as_str())
                            .unwrap_or(""),
                        v["error"]
                            .as_str()
                            .or(v["fields"]["error"].as_str())
                            .unwrap_or("")
                    ),
                ),
                Err(_) => (
                    if line.contains("ERROR") {
                        "ERROR".into()
                    } else if line.contains("WARN") {
                        "WARN".into()
                    } else {
                        String::new()
                    },
                    line.to_owned(),
                ),
            };
            if level == "WARN" || level == "ERROR" {
                let message: String = message.trim().chars().take(300).collect();
                *counts
                    .entry((name.clone(), format!("{level} {message}")))
                    .or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|((log, msg), n)| format!("`{log}` ×{n}: {msg}"))
        .collect()
}

struct Report<'a> {
    ctx: &'a Ctx,
    broker: String,
    /// Size of the private broker's storage at the end.
    broker_storage: Option<u64>,
    started: chrono::DateTime<chrono::Utc>,
    finished: chrono::DateTime<chrono::Utc>,
    machine_before: Machine,
    stale: Vec<String>,
    reps: Vec<Rep>,
    steady: Option<Steady>,
    big: Option<BigTx>,
    setup_note: String,
    log_issues: Vec<String>,
    cleanup: String,
    leftover_slots: String,
}

impl Report<'_> {
    fn render(&self) -> String {
        let s = &self.ctx.settings;
        let m = &self.machine_before;
        let mut o = String::new();
        let commit =
            command_output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
        let dirty = command_output(
            "git",
            &[
                "status",
                "--porcelain",
                "--",
                "src",
                "Cargo.toml",
                "Cargo.lock",
            ],
        )
        .filter(|s| !s.is_empty())
        .map_or(String::new(), |s| {
            format!(
                " + uncommitted changes in {} file(s) of src/ and Cargo.*",
                s.lines().count()
            )
        });
        let pg_version = command_output(
            &self
                .ctx
                .svc
                .pg_bin()
                .join("pg_recvlogical")
                .to_string_lossy(),
            &["--version"],
        )
        .unwrap_or_else(|| "?".into());
        let daemon_version = command_output(env!("CARGO_BIN_EXE_membersync"), &["--version"])
            .unwrap_or_else(|| "?".into());

        let _ = writeln!(o, "# CDC benchmark: membersync vs pg_recvlogical\n");
        let _ = writeln!(
            o,
            "Generated by `benches/cdc.rs`; see `bench/README.md` for what it does and how.\n"
        );
        let _ = writeln!(o, "- **Command**: `{}`", s.command());
        let _ = writeln!(
            o,
            "- **Date**: {} → {} (UTC)",
            self.started.format("%Y-%m-%d %H:%M:%S"),
            self.finished.format("%H:%M:%S")
        );
        let _ = writeln!(
            o,
            "- **Commit**: `{commit}`{dirty}; binary `{}` (`{daemon_version}`, release profile)",
            env!("CARGO_BIN_EXE_membersync")
                .rsplit('/')
                .next()
                .unwrap_or("membersync")
        );
        let _ = writeln!(
            o,
            "- **Machine**: {} cores ({}), {} RAM, Linux {}; load average at start {}",
            m.nproc, m.cpu, m.mem, m.kernel, m.loadavg
        );
        let _ = writeln!(
            o,
            "- **Postgres**: dev cluster `{}:{}` ({pg_version}), fresh database per run; `synchronous_commit` as configured",
            self.ctx.svc.pg_host(),
            self.ctx.svc.pg_port()
        );
        let _ = writeln!(
            o,
            "- **Broker**: {}; topic `<prefix>.cdc.public.members`, 6 partitions{}",
            self.broker,
            self.broker_storage.map_or(String::new(), |b| format!(
                "; its storage held {:.0} MiB at the end",
                b as f64 / 1024.0 / 1024.0
            ))
        );
        let _ = writeln!(
            o,
            "- **Daemon**: `membersync cdc`, `MEMBERSYNC__TELEMETRY__LOG_LEVEL=warn`, `MEMBERSYNC__CDC__SNAPSHOT=never`, other settings default (idempotent producer, `acks=all`, `linger.ms=5`, lz4)"
        );
        if !self.stale.is_empty() {
            let _ = writeln!(
                o,
                "- Removed leftovers of earlier runs first: {}",
                self.stale.join(", ")
            );
        }
        if !self.setup_note.is_empty() {
            let _ = writeln!(o, "- **Setup problem**: {}", self.setup_note);
        }
        let _ = writeln!(
            o,
            "- **Cleanup**: {}; cdcbench slots left on the cluster afterwards: {}",
            self.cleanup, self.leftover_slots
        );
        let _ = writeln!(o);

        // Targets summary
        let _ = writeln!(o, "## Targets\n");
        let _ = writeln!(o, "| target | measured | verdict |");
        let _ = writeln!(o, "|---|---|---|");
        let ratio = self.ratio();
        if let Some((r, _, _)) = ratio {
            let _ = writeln!(
                o,
                "| backlog drain rate ≥ 0.7 × pg_recvlogical | {r:.3} (median of per-rep ratios) | {}{} |",
                verdict(r >= 0.7),
                if r >= 0.7 {
                    String::new()
                } else {
                    format!(
                        ", short by {:.3} ({:.0} % of the target)",
                        0.7 - r,
                        r / 0.7 * 100.0
                    )
                }
            );
        } else if !self.reps.is_empty() {
            let _ = writeln!(
                o,
                "| backlog drain rate ≥ 0.7 × pg_recvlogical | no successful rep | **not measured** |"
            );
        }
        if let Some(st) = &self.steady {
            let hist_p99 = bucket_quantile(&st.hist_buckets, 0.99);
            let rcv_p99 = percentile_f64(&st.tx_received_ms, 0.99);
            if !st.tx_received_ms.is_empty() {
                // The consumer figure is an upper bound; the floor of the histogram's p99
                // bucket a lower one (the histogram samples the fastest transaction of each
                // confirmation, see below).
                let floor_ms = hist_p99.map(|(_, lo, _)| lo * 1e3);
                let verdict_text = if rcv_p99 <= 50.0 {
                    verdict(true).to_owned()
                } else if let Some(floor) = floor_ms.filter(|f| *f >= 50.0) {
                    format!(
                        "{}: over by at least {:.0} ms (histogram bucket floor, {:.0}×) and at most {:.0} ms (consumer bound, {:.1}×)",
                        verdict(false),
                        floor - 50.0,
                        floor / 50.0,
                        rcv_p99 - 50.0,
                        rcv_p99 / 50.0
                    )
                } else {
                    format!(
                        "**not shown met**: the consumer bound is {:.0} ms over; the histogram does not decide",
                        rcv_p99 - 50.0
                    )
                };
                let _ = writeln!(
                    o,
                    "| p99 commit→ack ≤ 50 ms at {} rows/s | daemon's histogram {}; consumer (commit → transaction's last record readable, an upper bound) {:.0} ms | {verdict_text} |",
                    thousands(st.offered_rate as f64),
                    hist_p99.map_or("–".into(), |(e, lo, hi)| format!(
                        "≈{:.0} ms (bucket {:.0}–{:.0} ms)",
                        e * 1e3,
                        lo * 1e3,
                        hi * 1e3
                    )),
                    rcv_p99,
                );
            } else {
                let _ = writeln!(
                    o,
                    "| p99 commit→ack ≤ 50 ms at 5k rows/s | no records read | **not measured** |"
                );
            }
        }
        if let Some(b) = &self.big {
            if b.drain_after_commit_s.is_some() {
                let growth = b.peak_kib.saturating_sub(b.baseline_kib);
                // 100 MB = 10^8 bytes.
                let met = growth * 1024 <= 100_000_000;
                let _ = writeln!(
                    o,
                    "| RSS growth ≤ 100 MB on a {}-row transaction | {} = {:.1} MB ({} → peak {}) | {}{} |",
                    thousands(b.rows as f64),
                    mib(growth),
                    (growth * 1024) as f64 / 1e6,
                    mib(b.baseline_kib),
                    mib(b.peak_kib),
                    verdict(met),
                    if met {
                        format!(", {:.1} MB to spare", 100.0 - (growth * 1024) as f64 / 1e6)
                    } else {
                        format!(", over by {:.1} MB", (growth * 1024) as f64 / 1e6 - 100.0)
                    }
                );
            } else {
                let _ = writeln!(
                    o,
                    "| RSS growth ≤ 100 MB on the large transaction | the daemon did not finish | **not measured** |"
                );
            }
        }
        let _ = writeln!(o);

        self.render_backlog(&mut o);
        self.render_steady(&mut o);
        self.render_big(&mut o);
        let _ = writeln!(o, "## Daemon logs\n");
        if self.log_issues.is_empty() {
            let _ = writeln!(
                o,
                "No line at WARN or above in any daemon's log (log level `warn`).\n"
            );
        } else {
            let _ = writeln!(o, "Lines at WARN or above (log, count, message):\n");
            for l in &self.log_issues {
                let _ = writeln!(o, "- {l}");
            }
            let _ = writeln!(o);
        }
        o
    }

    /// (median per-rep ratio, median daemon rate, median pg_recvlogical rate) over the
    /// undisturbed reps that both succeeded (all successful reps if every one was disturbed).
    fn ratio(&self) -> Option<(f64, f64, f64)> {
        let ok: Vec<&Rep> = self
            .reps
            .iter()
            .filter(|r| r.recv_rate().is_some() && r.daemon_rate().is_some())
            .collect();
        let clean: Vec<&Rep> = ok
            .iter()
            .copied()
            .filter(|r| r.disturbed().is_empty())
            .collect();
        let used = if clean.is_empty() { ok } else { clean };
        if used.is_empty() {
            return None;
        }
        let ratios = used
            .iter()
            .map(|r| r.daemon_rate().unwrap() / r.recv_rate().unwrap())
            .collect();
        let d = used.iter().map(|r| r.daemon_rate().unwrap()).collect();
        let b = used.iter().map(|r| r.recv_rate().unwrap()).collect();
        Some((median(ratios)?, median(d)?, median(b)?))
    }

    fn render_backlog(&self, o: &mut String) {
        if self.reps.is_empty() {
            return;
        }
        let s = &self.ctx.settings;
        let _ = writeln!(o, "## 1. Backlog drain\n");
        let _ = writeln!(
            o,
            "Per rep: two pgoutput slots created in one statement, then {} row changes written to `public.members` \
             ({} inserts, then updates of the same rows; {} rows per transaction, {} transactions), then `VACUUM` and `CHECKPOINT`. \
             `pg_recvlogical` drains one slot to `/dev/null`; the daemon drains the other into Kafka and counts as done \
             when `membersync_cdc_confirmed_lsn` passes the last load transaction (every record acknowledged by Kafka). \
             The daemon's time runs from `/readyz` reporting `startup: ok` (topics checked, roles started — the replication \
             connection is opened after that, inside the measured time); `pg_recvlogical`'s from process start to exit. \
             Reps alternate which one reads first.\n",
            thousands((2 * s.rows) as f64),
            thousands(s.rows as f64),
            thousands(s.tx_rows as f64),
            thousands((2 * s.rows).div_ceil(s.tx_rows) as f64),
        );
        let _ = writeln!(
            o,
            "`pg_recvlogical -d <db> -h {} -p {} -U {} --slot <slot> --start --no-loop -o proto_version=1 -o publication_names={PUBLICATION} -o messages=true -f /dev/null --endpos <pg_current_wal_lsn() after the load>` (the options the daemon's `START_REPLICATION` sends).\n",
            self.ctx.svc.pg_host(),
            self.ctx.svc.pg_port(),
            self.ctx.svc.superuser()
        );
        let _ = writeln!(
            o,
            "| rep | first | changes | WAL written (load time) | pg_recvlogical s | rows/s | daemon s (ready→done) | rows/s | **ratio** | daemon s from spawn / from 1st event | events counted | sink alone s | rows/s | daemon ÷ sink alone | other builds seen |"
        );
        let _ = writeln!(
            o,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.reps {
            let ratio = match (r.daemon_rate(), r.recv_rate()) {
                (Some(d), Some(b)) => format!("**{:.3}**", d / b),
                _ => "–".into(),
            };
            let mut disturbed: Vec<String> = r.disturbed().into_iter().collect();
            if !r.quiet_wait.is_empty() {
                disturbed.push(format!("(still busy at start: {:?})", r.quiet_wait));
            }
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.1} MiB in {:.1} s | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |",
                r.index + 1,
                if r.recv_first {
                    "pg_recvlogical"
                } else {
                    "daemon"
                },
                thousands(r.load.changes as f64),
                r.load.wal_bytes as f64 / 1024.0 / 1024.0,
                r.load.secs,
                if r.recv.ok {
                    format!("{:.2}", r.recv.secs)
                } else {
                    "FAILED".into()
                },
                r.recv_rate().map_or("–".into(), thousands),
                opt(r.daemon.secs_ready, 2),
                r.daemon_rate().map_or("–".into(), thousands),
                ratio,
                opt(r.daemon.secs_spawn, 2),
                opt(r.daemon.secs_first, 2),
                thousands(r.daemon.events),
                r.sink.as_ref().map_or("–".into(), |x| if x.ok {
                    format!("{:.2}", x.secs)
                } else {
                    "FAILED".into()
                }),
                r.sink_rate().map_or("–".into(), thousands),
                match (r.daemon_rate(), r.sink_rate()) {
                    (Some(d), Some(k)) => format!("{:.2}", d / k),
                    _ => "–".into(),
                },
                if disturbed.is_empty() {
                    "none".into()
                } else {
                    disturbed.join(", ")
                },
            );
        }
        if let Some((ratio, d, b)) = self.ratio() {
            let _ = writeln!(
                o,
                "\n**Medians**: pg_recvlogical {} rows/s, daemon {} rows/s; ratio of medians {:.3}, median of per-rep ratios **{:.3}**.",
                thousands(b),
                thousands(d),
                d / b,
                ratio
            );
            let sink: Vec<f64> = self.reps.iter().filter_map(Rep::sink_rate).collect();
            if let Some(k) = median(sink) {
                let bytes = self
                    .reps
                    .iter()
                    .filter_map(|r| r.sink.as_ref())
                    .map(|x| x.mean_bytes)
                    .next()
                    .unwrap_or(0.0);
                let _ = writeln!(
                    o,
                    "\n**Sink alone** (the daemon's own `CdcSink` + `AckTracker` from the library, same producer settings, \
                     replaying {} real envelopes of this run's topic, mean {:.0} bytes, keyed as the daemon keys them, in \
                     transactions of {} to a fresh 6-partition topic; no Postgres): median {} rows/s = {:.3} × pg_recvlogical. \
                     The daemon reaches {:.2} of that. So the Kafka side alone {} the 0.7 target on this broker.",
                    thousands(2_000.0),
                    bytes,
                    thousands(s.tx_rows as f64),
                    thousands(k),
                    k / b,
                    d / k,
                    if k / b < 0.7 {
                        "cannot meet"
                    } else {
                        "could meet"
                    }
                );
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(
            o,
            "CPU (average cores over each run; `walsender` is the Postgres process decoding the slot, `other` is everything else on the machine):\n"
        );
        let _ = writeln!(
            o,
            "| rep | run | secs | walsender | reader (pg_recvlogical / daemon / sink) | broker | other | machine |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        for r in &self.reps {
            let empty = WatchResult::default();
            let sink_cpu = r.sink.as_ref().map_or(&empty, |x| &x.cpu);
            for (name, w, reader) in [
                ("pg_recvlogical", &r.recv.cpu, "pg_recvlogical"),
                ("daemon", &r.daemon.cpu, "daemon"),
                ("sink alone", sink_cpu, "sink (this process)"),
            ] {
                if w.secs == 0.0 {
                    continue;
                }
                let _ = writeln!(
                    o,
                    "| {} | {name} | {:.2} | {} | {} | {} | {} | {} |",
                    r.index + 1,
                    w.secs,
                    cpu_cell(w, "walsender"),
                    cpu_cell(w, reader),
                    cpu_cell(w, "broker"),
                    cpu_cell(w, "other"),
                    cpu_cell(w, "machine"),
                );
            }
        }
        let _ = writeln!(o);
        for r in &self.reps {
            let expected = r.load.changes as f64;
            if r.daemon.ok() && (r.daemon.events - expected).abs() > 0.5 {
                let _ = writeln!(
                    o,
                    "- Rep {}: the daemon counted {} change events for {} row changes.",
                    r.index + 1,
                    thousands(r.daemon.events),
                    thousands(expected)
                );
            }
            if r.daemon.backpressure_waits > 0.0 || r.daemon.reconnects > 0.0 {
                let _ = writeln!(
                    o,
                    "- Rep {}: backpressure waits {}, reconnects {}.",
                    r.index + 1,
                    r.daemon.backpressure_waits,
                    r.daemon.reconnects
                );
            }
            if !r.daemon.exit.is_empty() && !r.daemon.exit.contains("exit status: 0") {
                let _ = writeln!(
                    o,
                    "- Rep {}: daemon exit after SIGTERM: {}",
                    r.index + 1,
                    r.daemon.exit
                );
            }
            if !r.recv.ok {
                let _ = writeln!(o, "- Rep {}: {}", r.index + 1, r.recv.note);
            }
            if let Some(x) = r.sink.as_ref().filter(|x| !x.ok) {
                let _ = writeln!(o, "- Rep {}: sink alone: {}", r.index + 1, x.note);
            }
            if !r.daemon.ok() {
                let _ = writeln!(
                    o,
                    "- Rep {}: **the daemon failed**:\n\n```\n{}\n```",
                    r.index + 1,
                    r.daemon.note.trim()
                );
            }
        }
        let _ = writeln!(o);
    }

    fn render_steady(&self, o: &mut String) {
        let Some(st) = &self.steady else { return };
        let s = &self.ctx.settings;
        let _ = writeln!(
            o,
            "## 2. Commit → ack at a steady {} rows/s\n",
            thousands(st.offered_rate as f64)
        );
        let _ = writeln!(
            o,
            "One writer connection commits {} rows every {} ms (alternately an insert of new members and an update of \
             the previous tick's), {} s warm-up then {} s measured; open loop (a late tick is sent at once). Measured: {} \
             transactions, {} rows in {:.1} s = {} rows/s achieved; writer statement p99 {:.1} ms, latest tick {:.1} ms late. \
             Topic partitions: {}. The daemon confirmed the writer's last transaction {} s after its commit.\n",
            st.rows_per_tick,
            s.tick_ms,
            s.warmup_secs,
            s.secs,
            thousands(st.measured_txs as f64),
            thousands(st.measured_rows as f64),
            st.measured_secs,
            thousands(st.measured_rows as f64 / st.measured_secs.max(1e-9)),
            st.writer_p99_commit_ms,
            st.writer_max_late_ms,
            st.partitions,
            opt(st.catch_up_s, 2),
        );
        let _ = writeln!(o, "| measure | what | samples | p50 ms | p99 ms | max ms |");
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        let row = |o: &mut String, name: &str, what: &str, v: &[f64]| {
            let _ = writeln!(
                o,
                "| {name} | {what} | {} | {:.1} | {:.1} | {:.1} |",
                thousands(v.len() as f64),
                percentile_f64(v, 0.5),
                percentile_f64(v, 0.99),
                v.last().copied().unwrap_or(f64::NAN)
            );
        };
        row(
            o,
            "**consumer, per transaction**",
            "commit (`source.ts_ms`) → the transaction's last record received by a consumer reading the topic (upper bound of commit → ack)",
            &st.tx_received_ms,
        );
        row(
            o,
            "Kafka timestamp, per transaction",
            &format!(
                "commit → the last record's Kafka timestamp ({})",
                if st.timestamp_type.is_empty() {
                    "?"
                } else {
                    &st.timestamp_type
                }
            ),
            &st.tx_kafka_ts_ms,
        );
        row(
            o,
            "consumer, per record",
            "commit → record received",
            &st.row_received_ms,
        );
        row(
            o,
            "Kafka timestamp, per record",
            "commit → record timestamp",
            &st.row_kafka_ts_ms,
        );
        row(
            o,
            "envelope, per record",
            "commit → the daemon built the envelope (`ts_ms`)",
            &st.row_envelope_ms,
        );
        if let (Some(p50), Some(p99)) = (
            bucket_quantile(&st.hist_buckets, 0.5),
            bucket_quantile(&st.hist_buckets, 0.99),
        ) {
            let _ = writeln!(
                o,
                "| daemon histogram | `membersync_cdc_commit_to_ack_seconds` delta over the measured window (bucket-resolution estimate; bucket in brackets) | {} | {:.1} [{:.1}–{:.1}] | {:.1} [{:.1}–{:.1}] | – |",
                thousands(st.hist_count),
                p50.0 * 1e3,
                p50.1 * 1e3,
                p50.2 * 1e3,
                p99.0 * 1e3,
                p99.1 * 1e3,
                p99.2 * 1e3,
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "`source.ts_ms` is the commit time in whole milliseconds, so consumer figures carry up to +1 ms. \
             Records read: {} of {} written during the phase (the reader started at the topic's end before the load). \
             Histogram: {} observations for {} transactions confirmed in the same window (mean {:.1} ms).\n",
            thousands(st.records_seen as f64),
            thousands(st.records_expected as f64),
            thousands(st.hist_count),
            thousands(st.confirmed_txs),
            if st.hist_count > 0.0 {
                st.hist_sum / st.hist_count * 1e3
            } else {
                f64::NAN
            },
        );
        if st.hist_count + 0.5 < st.confirmed_txs {
            let _ = writeln!(
                o,
                "The histogram has fewer observations than confirmed transactions: the daemon observes one \
                 latency per confirmation step — that of the newest transaction confirmed in the step \
                 (`AckTracker::take_confirmed` returns only its latency, `stream::confirm` observes it once) — \
                 so when several transactions are confirmed together the older, slower ones are not \
                 recorded. The histogram therefore under-counts and leans low; its p99 bucket floor is still \
                 a valid lower bound.\n"
            );
        }
        if !st.hist_buckets.is_empty() {
            let _ = writeln!(o, "<details><summary>histogram buckets (delta)</summary>\n");
            let _ = writeln!(o, "| le (s) | cumulative count |");
            let _ = writeln!(o, "|---|---|");
            for (le, c) in &st.hist_buckets {
                let _ = writeln!(o, "| {le} | {c} |");
            }
            let _ = writeln!(o, "\n</details>\n");
        }
        let w = &st.cpu;
        let _ = writeln!(
            o,
            "CPU during the measured window (cores): daemon {}, walsender {}, broker {}, other (incl. this bench's writer and reader, Postgres backends) {}, machine {}. Other builds seen: {}.\n",
            cpu_cell(w, "daemon"),
            cpu_cell(w, "walsender"),
            cpu_cell(w, "broker"),
            cpu_cell(w, "other"),
            cpu_cell(w, "machine"),
            if w.foreign.is_empty() {
                "none".into()
            } else {
                format!("{:?}", w.foreign)
            }
        );
        if !st.note.is_empty() {
            let _ = writeln!(o, "**Problem**:\n\n```\n{}\n```\n", st.note.trim());
        }
    }

    fn render_big(&self, o: &mut String) {
        let Some(b) = &self.big else { return };
        let _ = writeln!(
            o,
            "## 3. RSS during one {}-row transaction\n",
            thousands(b.rows as f64)
        );
        let _ = writeln!(
            o,
            "The same daemon (after phase 2, if it ran) idles 3 s, then one transaction inserts {} rows \
             (`insert … select … from generate_series(…)`, {:.1} s to commit). VmRSS sampled every 100 ms from 3 s before \
             the insert until 3 s after the confirmed LSN passed the transaction.\n",
            thousands(b.rows as f64),
            b.insert_secs
        );
        let _ = writeln!(
            o,
            "| baseline RSS (median, idle) | peak RSS | growth | RSS 3 s after | VmHWM before → after |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|");
        let _ = writeln!(
            o,
            "| {} | {} (at +{:.1} s after the insert began) | **{}** | {} | {} → {} |\n",
            mib(b.baseline_kib),
            mib(b.peak_kib),
            b.peak_at_s,
            mib(b.peak_kib.saturating_sub(b.baseline_kib)),
            mib(b.after_kib),
            mib(b.hwm_before_kib),
            mib(b.hwm_after_kib)
        );
        let _ = writeln!(
            o,
            "After the commit: first event produced after {} s (the walsender decodes the transaction while it is written — \
             spilling to disk beyond `logical_decoding_work_mem` — and sends nothing of it before the commit; \
             proto_version 1 cannot stream an open transaction), \
             confirmed after {} s → {} rows/s end to end after commit. Events counted: {}; backpressure waits (producer \
             queue full): {}.\n",
            opt(b.first_event_after_commit_s, 1),
            opt(b.drain_after_commit_s, 1),
            b.drain_after_commit_s
                .map_or("–".into(), |d| thousands(b.rows as f64 / d)),
            thousands(b.events),
            thousands(b.backpressure_waits),
        );
        let w = &b.cpu;
        let _ = writeln!(
            o,
            "CPU over the phase (cores): daemon {}, walsender {}, broker {}, other {}, machine {}. Other builds seen: {}.\n",
            cpu_cell(w, "daemon"),
            cpu_cell(w, "walsender"),
            cpu_cell(w, "broker"),
            cpu_cell(w, "other"),
            cpu_cell(w, "machine"),
            if w.foreign.is_empty() {
                "none".into()
            } else {
                format!("{:?}", w.foreign)
            }
        );
        if !b.samples.is_empty() {
            // A coarse profile: one line per second.
            let _ = writeln!(
                o,
                "<details><summary>RSS profile (one sample per second, seconds since sampling began)</summary>\n"
            );
            let _ = writeln!(o, "| t (s) | RSS |");
            let _ = writeln!(o, "|---|---|");
            let mut next = 0.0;
            for (t, kib) in &b.samples {
                if *t >= next {
                    let _ = writeln!(o, "| {t:.1} | {} |", mib(*kib));
                    next = t.floor() + 1.0;
                }
            }
            let _ = writeln!(o, "\n</details>\n");
        }
        if !b.note.is_empty() {
            let _ = writeln!(o, "**Problem**:\n\n```\n{}\n```\n", b.note.trim());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

/// Waits (up to 2 min) until the broker answers a metadata request: the dev broker may be
/// restarting.
fn wait_for_broker(brokers: &str) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("client: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("the broker at {brokers} does not answer: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

/// Applies the Supabase stand-in and `membersync migrate` to a new database.
async fn setup_database(ctx: &Ctx) -> Result<(), String> {
    ctx.svc
        .connect("postgres")
        .await
        .batch_execute(&format!("create database {}", ctx.db))
        .await
        .map_err(|e| format!("create database: {e}"))?;
    let bootstrap = std::fs::read_to_string(repo_root().join("scripts/supabase-bootstrap.sql"))
        .map_err(|e| format!("scripts/supabase-bootstrap.sql: {e}"))?;
    ctx.svc
        .connect(&ctx.db)
        .await
        .batch_execute(&bootstrap)
        .await
        .map_err(|e| format!("bootstrap: {e}"))?;
    let out = ctx
        .membersync()
        .arg("migrate")
        .envs(ctx.daemon_env(&ctx.slot("unused")))
        .output()
        .map_err(|e| format!("membersync migrate: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "membersync migrate failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

async fn run(ctx: &Ctx, report: &mut Report<'_>) {
    let s = &ctx.settings;
    wait_for_quiet(s.quiet_timeout, "setting up").await;
    let brokers = ctx.svc.brokers().to_owned();
    if let Err(e) = tokio::task::spawn_blocking(move || wait_for_broker(&brokers))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    {
        report.setup_note = e;
        return;
    }
    if let Err(e) = setup_database(ctx).await {
        report.setup_note = e;
        return;
    }
    let admin = ctx.svc.connect(&ctx.db).await;
    let mut loader = ctx.svc.connect(&ctx.db).await;

    if s.phases.contains(&Phase::Steady) || s.phases.contains(&Phase::Backlog) {
        // Creates the topics (6 partitions) before anything is measured.
        let slot = ctx.slot("init");
        let mut d = ctx.spawn_daemon(&slot, "init");
        if let Err(e) = d.wait_ready(Duration::from_secs(60)).await {
            report.setup_note = e;
            return;
        }
        d.terminate().await;
        let _ = admin
            .execute("select pg_drop_replication_slot($1)", &[&slot])
            .await;
    }

    if s.phases.contains(&Phase::Backlog) {
        let mut extra = 0;
        let mut i = 0;
        let mut records = None;
        while i < s.reps + extra {
            let rep = backlog_rep(ctx, &admin, &mut loader, i, &mut records).await;
            let disturbed = !rep.disturbed().is_empty();
            report.reps.push(rep);
            if disturbed && extra < 2 {
                eprintln!(
                    "cdc bench: rep {} was disturbed by other activity; one more rep",
                    i + 1
                );
                extra += 1;
            }
            i += 1;
        }
    }

    if s.phases.contains(&Phase::Steady) || s.phases.contains(&Phase::BigTx) {
        let slot = ctx.slot("s");
        wait_for_quiet(s.quiet_timeout, "the streaming phases").await;
        let mut daemon = ctx.spawn_daemon(&slot, "stream");
        if let Err(e) = daemon.wait_ready(Duration::from_secs(60)).await {
            report.setup_note = e;
            return;
        }
        // With SNAPSHOT never the daemon creates its slot and streams; wait for that.
        if walsender_pid(&admin, &slot, Duration::from_secs(60))
            .await
            .is_none()
        {
            report.setup_note = format!(
                "the daemon did not start streaming slot {slot} within 60 s:\n{}",
                daemon.log_tail(40)
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        if s.phases.contains(&Phase::Steady) {
            report.steady = Some(steady_phase(ctx, &daemon, &mut loader, &admin, &slot).await);
        }
        if s.phases.contains(&Phase::BigTx) {
            wait_for_quiet(s.quiet_timeout, "the large transaction").await;
            report.big = Some(big_tx_phase(ctx, &daemon, &mut loader, &admin, &slot).await);
        }
        let exit = daemon.terminate().await;
        if !exit.contains("exit status: 0") {
            let _ = write!(
                report.setup_note,
                "streaming daemon exit after SIGTERM: {exit}. "
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    if std::env::args().skip(1).any(|a| a == "--list") {
        return;
    }
    let settings = Settings::from_env();
    let mut svc = Services::load();
    let broker = if settings.private_broker {
        let b = PrivateBroker::start().unwrap_or_else(|e| panic!("private broker: {e}"));
        svc.vars
            .insert("MEMBERSYNC_DEV_KAFKA_BROKERS".into(), b.addr.clone());
        Some(b)
    } else {
        None
    };
    let _ = BROKER_ADDR.set(svc.brokers().to_owned());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let random = uuid::Uuid::new_v4().simple().to_string();
    let db = format!("{NAME_PREFIX}_{}_{}", std::process::id(), &random[..8]);
    let topic_prefix = db.replace('_', "-");
    let cleanup = Arc::new(Cleanup {
        host: svc.pg_host().to_owned(),
        port: svc.pg_port(),
        user: svc.superuser().to_owned(),
        password: svc.superuser_password(),
        brokers: svc.brokers().to_owned(),
        db: db.clone(),
        topic_prefix: topic_prefix.clone(),
        delete_topics: broker.is_none(),
        done: AtomicBool::new(false),
    });
    let out_path = settings.out.clone();
    let ctx = Ctx {
        settings,
        svc,
        db,
        topic_prefix,
        logs: tempfile::Builder::new()
            .prefix("membersync-cdc-bench-")
            .tempdir()
            .expect("tempdir"),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()
            .expect("http client"),
    };
    let stale = rt.block_on(Cleanup::remove_stale(&ctx.svc));
    let mut report = Report {
        ctx: &ctx,
        broker: broker_description(broker.is_some()),
        broker_storage: None,
        started: chrono::Utc::now(),
        finished: chrono::Utc::now(),
        machine_before: machine(),
        stale,
        reps: Vec::new(),
        steady: None,
        big: None,
        setup_note: String::new(),
        log_issues: Vec::new(),
        cleanup: String::new(),
        leftover_slots: String::new(),
    };
    eprintln!(
        "cdc bench: database {}, logs in {}",
        ctx.db,
        ctx.logs.path().display()
    );
    let interrupted = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = run(&ctx, &mut report) => false,
            _ = tokio::signal::ctrl_c() => true,
            _ = term.recv() => true,
        }
    });
    // Every daemon of `run` is dropped (killed) by now; remove slots, database and topics.
    report.finished = chrono::Utc::now();
    report.log_issues = log_issues(ctx.logs.path());
    report.broker_storage = broker.as_ref().map(PrivateBroker::storage_bytes);
    report.cleanup = cleanup.run_blocking();
    report.leftover_slots = rt.block_on(async {
        let client = ctx.svc.connect("postgres").await;
        match client
            .query(
                "select slot_name::text from pg_replication_slots where slot_name like $1",
                &[&format!("{NAME_PREFIX}\\_%")],
            )
            .await
        {
            Ok(rows) if rows.is_empty() => "none".to_owned(),
            Ok(rows) => rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("unknown ({e})"),
        }
    });
    drop(broker);
    if interrupted {
        eprintln!("cdc bench: interrupted; cleaned up, no report written");
        std::process::exit(130);
    }
    let text = report.render();
    if let Some(dir) = out_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out_path, &text).expect("write the report");
    println!("{text}");
    eprintln!("cdc bench: report written to {}", out_path.display());
}
