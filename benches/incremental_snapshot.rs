//! Incremental snapshot throughput and the WAL it retains: `cargo bench --bench incremental_snapshot`.
//!
//! In a fresh database of the dev Postgres and a private Tansu broker (the CDC topics of two
//! 1M-row snapshots would otherwise land on the shared dev broker), with a table of
//! `MEMBERSYNC_BENCH_ISNAP_ROWS` rows (1,000,000) and a light writer updating random rows
//! throughout (`MEMBERSYNC_BENCH_ISNAP_WRITES` rows/s, 200, so there is WAL to retain):
//!
//! 1. **Chunk reads alone** (Postgres-side ceiling): the same primary-key chunk selects
//!    (`cdc.incremental_chunk_rows`) over the whole table from this process, nothing produced.
//! 2. **Initial snapshot** (same-run baseline): `membersync cdc` creating its slot with
//!    `cdc.snapshot = "initial"` — one exported-snapshot transaction for the whole table.
//! 3. **Incremental snapshot**: the same daemon, now streaming, runs `request_snapshot` of the
//!    table while the writer goes on.
//!
//! Sampled every 250 ms during 2 and 3: WAL retained by the slot
//! (`pg_current_wal_lsn() - confirmed_flush_lsn` and `- restart_lsn`) and the age of the
//! oldest open transaction in the database (what pins vacuum). Reported: rows/s, max and
//! at-end WAL figures. Results: `bench/results/backfill.md`, section "Incremental snapshot"
//! (`MEMBERSYNC_BENCH_ISNAP_OUT` to write elsewhere). Everything created is dropped at the end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

mod support;
use support::host::{env_or, free_port, repo_root};

const SECTION: &str = "## Incremental snapshot";

fn services() -> HashMap<String, String> {
    let file = repo_root().join(".dev/services.env");
    let vars: HashMap<String, String> = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}: run `scripts/dev-services up`", file.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect();
    vars
}

/// The daemon binary: `MEMBERSYNC_BENCH_ISNAP_BIN` (e.g. `target/release/membersync` when the
/// bench itself runs as a debug build), else the one cargo built with this bench.
fn daemon_bin() -> PathBuf {
    std::env::var_os("MEMBERSYNC_BENCH_ISNAP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_membersync")))
}

/// A private Tansu on SQLite, killed (and its storage removed) when dropped.
struct Broker {
    _dir: tempfile::TempDir,
    child: Child,
    addr: String,
}

impl Broker {
    fn start() -> Broker {
        let bin = std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join("tansu"))
                    .find(|p| p.is_file())
            })
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".cargo/bin/tansu"))
                    .filter(|p| p.is_file())
            })
            .expect("tansu is not installed (scripts/dev-services up installs it)");
        let dir = tempfile::Builder::new()
            .prefix("membersync-isnap-bench-tansu-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("tansu")).unwrap();
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).unwrap();
        let child = Command::new(bin)
            .current_dir(dir.path())
            .args(["broker", "--cluster-id", "membersync-isnap-bench"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu/tansu.db"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            _dir: dir,
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench {
    vars: HashMap<String, String>,
    db: String,
    broker: Broker,
    chunk_rows: u64,
}

impl Bench {
    fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from .dev/services.env"))
    }

    async fn superuser(&self, dbname: &str) -> Client {
        let password =
            std::fs::read_to_string(self.var("MEMBERSYNC_DEV_PG_SUPERUSER_PASSWORD_FILE")).unwrap();
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(self.var("MEMBERSYNC_DEV_PG_HOST"))
            .port(self.var("MEMBERSYNC_DEV_PG_PORT").parse().unwrap())
            .user(self.var("MEMBERSYNC_DEV_PG_SUPERUSER"))
            .password(password.trim())
            .dbname(dbname)
            .application_name("membersync-isnap-bench");
        let (client, conn) = cfg.connect(NoTls).await.expect("dev Postgres");
        tokio::spawn(conn);
        client
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with("MEMBERSYNC__DATABASE__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.retain(|(k, _)| k != "MEMBERSYNC__DATABASE__DBNAME");
        for (k, v) in [
            ("MEMBERSYNC__DATABASE__DBNAME", self.db.clone()),
            ("MEMBERSYNC__KAFKA__BROKERS", self.broker.addr.clone()),
            ("MEMBERSYNC__KAFKA__TOPIC_PREFIX", self.db.clone()),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1".into()),
            ("MEMBERSYNC__CDC__SLOT", self.db.clone()),
            // members stays captured (the default key columns name it); it is empty here.
            (
                "MEMBERSYNC__CDC__TABLES",
                r#"["public.members","public.isnap_t"]"#.into(),
            ),
            (
                "MEMBERSYNC__CDC__INCREMENTAL_CHUNK_ROWS",
                self.chunk_rows.to_string(),
            ),
            (
                "MEMBERSYNC__CDC__INCREMENTAL_POLL_INTERVAL_MS",
                "200".into(),
            ),
            ("MEMBERSYNC__TELEMETRY__LOG_LEVEL", "warn".into()),
            (
                "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "MEMBERSYNC__INGEST__LISTEN_ADDR",
                format!("127.0.0.1:{}", free_port()),
            ),
        ] {
            env.push((k.into(), v));
        }
        env
    }

    fn membersync(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(daemon_bin());
        cmd.env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.args(args).envs(self.env());
        cmd
    }
}

/// WAL retained and the oldest transaction, sampled until `stop`.
#[derive(Debug, Default, Clone)]
struct Samples {
    max_confirmed_lag: i64,
    max_restart_lag: i64,
    max_xact_secs: f64,
    last_confirmed_lag: i64,
    last_restart_lag: i64,
    n: usize,
}

async fn sample(client: &Client, db: &str, s: &mut Samples) {
    let row = client
        .query_opt(
            "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint,
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint,
                    (select coalesce(extract(epoch from max(now() - xact_start)), 0)::float8
                     from pg_stat_activity
                     where datname = $1 and xact_start is not null and pid <> pg_backend_pid()
                       and application_name not like 'membersync-isnap-bench%')
             from pg_replication_slots where slot_name = $1",
            &[&db],
        )
        .await
        .ok()
        .flatten();
    if let Some(r) = row {
        let (c, rs, x): (i64, i64, f64) = (r.get(0), r.get(1), r.get(2));
        s.max_confirmed_lag = s.max_confirmed_lag.max(c);
        s.max_restart_lag = s.max_restart_lag.max(rs);
        s.max_xact_secs = s.max_xact_secs.max(x);
        s.last_confirmed_lag = c;
        s.last_restart_lag = rs;
        s.n += 1;
    }
}

fn pg(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

fn mib(b: i64) -> String {
    format!("{:.1} MiB", b as f64 / 1_048_576.0)
}

/// Updates `per_sec` random rows a second (10 statements a second) until `stop`.
fn spawn_writer(
    client: Client,
    rows: u64,
    per_sec: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let batch = (per_sec / 10).max(1) as i64;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut written = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let start = 1 + (seed % rows) as i64;
            let n = client
                .execute(
                    "update public.isnap_t set name = md5(random()::text), updated_at = now()
                     where id >= $1 and id < $1 + $2",
                    &[&start, &batch],
                )
                .await
                .unwrap_or(0);
            written += n;
        }
        written
    })
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo test --benches` / nextest list the binary's tests: a bench has none.
        return;
    }
    let rows = env_or("MEMBERSYNC_BENCH_ISNAP_ROWS", 1_000_000);
    let writes = env_or("MEMBERSYNC_BENCH_ISNAP_WRITES", 200);
    let chunk_rows = env_or("MEMBERSYNC_BENCH_ISNAP_CHUNK_ROWS", 1024);
    let out = std::env::var("MEMBERSYNC_BENCH_ISNAP_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("bench/results/backfill.md"));
    let bench = Bench {
        vars: services(),
        db: format!("isnapbench_{}", std::process::id()),
        broker: Broker::start(),
        chunk_rows,
    };
    let postgres = bench.superuser("postgres").await;
    postgres
        .batch_execute(&format!("create database {}", bench.db))
        .await
        .unwrap();
    let result = run(&bench, rows, writes, chunk_rows).await;
    // Cleanup whatever happened: the slot first (an abandoned slot pins WAL cluster-wide).
    let _ = postgres
        .execute(
            "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = $1 and active_pid is not null",
            &[&bench.db],
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = postgres
        .execute(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
            &[&bench.db],
        )
        .await;
    let dropped = postgres
        .batch_execute(&format!(
            "drop database if exists {} with (force)",
            bench.db
        ))
        .await;
    eprintln!(
        "cleanup: database {} dropped: {:?}",
        bench.db,
        dropped.is_ok()
    );
    let report = result.expect("bench failed");
    write_section(&out, &report);
    println!("{report}");
}

async fn run(bench: &Bench, rows: u64, writes: u64, chunk_rows: u64) -> Result<String, String> {
    // The Supabase stand-in (auth schema, roles) the migrations expect.
    let bootstrap = std::fs::read_to_string(repo_root().join("scripts/supabase-bootstrap.sql"))
        .map_err(|e| format!("scripts/supabase-bootstrap.sql: {e}"))?;
    bench
        .superuser(&bench.db)
        .await
        .batch_execute(&bootstrap)
        .await
        .map_err(|e| format!("bootstrap: {}", pg(e)))?;
    let status = bench
        .membersync(&["migrate"])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("membersync migrate: {status}"));
    }
    let admin = bench.superuser(&bench.db).await;
    let load = Instant::now();
    admin
        .batch_execute(&format!(
            "create table public.isnap_t (id bigint primary key, memberstack_id text not null,
               name text, payload text, updated_at timestamptz not null default now());
             insert into public.isnap_t (id, memberstack_id, name, payload)
               select g, 'mem_' || g, md5(g::text), repeat(md5(g::text), 3)
               from generate_series(1, {rows}) g;
             grant select on public.isnap_t to membersync;
             alter publication membersync add table public.isnap_t;"
        ))
        .await
        .map_err(pg)?;
    eprintln!(
        "loaded {rows} rows in {:.1} s",
        load.elapsed().as_secs_f64()
    );

    // 1. Chunk reads alone.
    let started = Instant::now();
    let mut after = 0i64;
    let mut read = 0u64;
    loop {
        let got = admin
            .query(
                "select * from public.isnap_t where id > $1 order by id limit $2",
                &[&after, &(chunk_rows as i64)],
            )
            .await
            .map_err(pg)?;
        let Some(last) = got.last() else { break };
        after = last.get(0);
        read += got.len() as u64;
    }
    let select_secs = started.elapsed().as_secs_f64();
    eprintln!("chunk reads alone: {read} rows in {select_secs:.1} s");

    let sampler_client = bench.superuser(&bench.db).await;
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(
        bench.superuser(&bench.db).await,
        rows,
        writes,
        stop_writer.clone(),
    );

    // 2. Initial snapshot.
    let started = Instant::now();
    let mut daemon = bench
        .membersync(&["cdc"])
        .env("MEMBERSYNC__CDC__SNAPSHOT", "initial")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut initial = Samples::default();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if let Ok(Some(st)) = daemon.try_wait() {
            return Err(format!("membersync cdc exited: {st}"));
        }
        sample(&sampler_client, &bench.db, &mut initial).await;
        let done = admin
            .query_opt(
                "select 1 from membersync_meta.cdc_snapshots where slot_name = $1 and completed_at is not null",
                &[&bench.db],
            )
            .await
            .map_err(pg)?
            .is_some();
        if done {
            break;
        }
        if Instant::now() > deadline {
            return Err("initial snapshot did not finish in an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let initial_secs = started.elapsed().as_secs_f64();
    sample(&sampler_client, &bench.db, &mut initial).await;
    eprintln!("initial snapshot: {initial_secs:.1} s; {initial:?}");

    // The stream first drains the writer's WAL the slot held during the initial snapshot:
    // wait for that (bounded), so the incremental run's samples are its own.
    let caught_up = Instant::now();
    let mut idle = Samples::default();
    while caught_up.elapsed() < Duration::from_secs(120) {
        sample(&sampler_client, &bench.db, &mut idle).await;
        if idle.n > 0 && idle.last_confirmed_lag < 1_048_576 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let catch_up_secs = caught_up.elapsed().as_secs_f64();
    eprintln!("stream caught up in {catch_up_secs:.1} s");

    // 3. Incremental snapshot, the daemon streaming.
    let id = membersync::cdc::incremental::request_snapshot(&admin, &["public.isnap_t".to_owned()])
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut incremental = Samples::default();
    let status = loop {
        if let Ok(Some(st)) = daemon.try_wait() {
            return Err(format!("membersync cdc exited: {st}"));
        }
        sample(&sampler_client, &bench.db, &mut incremental).await;
        let s = membersync::cdc::incremental::snapshot_status(&admin, id)
            .await
            .map_err(|e| e.to_string())?;
        if s.state.is_final() {
            break s;
        }
        if Instant::now() > deadline + Duration::from_secs(3600) {
            return Err("incremental snapshot did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let incremental_secs = started.elapsed().as_secs_f64();
    sample(&sampler_client, &bench.db, &mut incremental).await;
    eprintln!("incremental snapshot: {incremental_secs:.1} s; {status:?}; {incremental:?}");
    stop_writer.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    if status.state != membersync::cdc::incremental::SnapshotState::Done {
        return Err(format!("incremental snapshot ended {status:?}"));
    }

    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rate = |secs: f64| rows as f64 / secs;
    let mut r = String::new();
    let _ = writeln!(r, "{SECTION}\n");
    let _ = writeln!(
        r,
        "`cargo bench --bench incremental_snapshot` (`benches/incremental_snapshot.rs`), commit `{commit}`, \
         {cores} cores ({cpu}), shared with other agents' builds and tests (noisy: compare within the run). \
         Dev Postgres 15, a private Tansu (SQLite) broker, one partition; daemon `{}`, bench process a {} build. \
         Table `public.isnap_t`: {rows} rows of ~150 bytes (bigint primary key, text columns); \
         a writer updates ~{writes} random rows/s throughout ({written} rows updated in all); \
         `cdc.incremental_chunk_rows = {chunk_rows}`.\n",
        daemon_bin().strip_prefix(repo_root()).map_or_else(
            |_| daemon_bin().display().to_string(),
            |p| p.display().to_string()
        ),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let _ = writeln!(
        r,
        "| run | rows | seconds | rows/s | max WAL retained (confirmed_flush / restart) | at end | longest transaction |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|");
    let _ = writeln!(
        r,
        "| chunk selects alone (this process, no Kafka) | {read} | {select_secs:.1} | {:.0} | – | – | one chunk |",
        read as f64 / select_secs
    );
    let _ = writeln!(
        r,
        "| initial snapshot (`cdc.snapshot = \"initial\"`, baseline) | {rows} | {initial_secs:.1} | {:.0} | {} / {} | {} / {} | {:.1} s |",
        rate(initial_secs),
        mib(initial.max_confirmed_lag),
        mib(initial.max_restart_lag),
        mib(initial.last_confirmed_lag),
        mib(initial.last_restart_lag),
        initial.max_xact_secs
    );
    let _ = writeln!(
        r,
        "| incremental snapshot (`membersync snapshot`, while streaming) | {} emitted + {} skipped | {incremental_secs:.1} | {:.0} | {} / {} | {} / {} | {:.1} s |",
        status.rows_emitted,
        status.rows_skipped,
        rate(incremental_secs),
        mib(incremental.max_confirmed_lag),
        mib(incremental.max_restart_lag),
        mib(incremental.last_confirmed_lag),
        mib(incremental.last_restart_lag),
        incremental.max_xact_secs
    );
    let _ = writeln!(
        r,
        "\nBefore the incremental run the stream drained what the slot held from the initial snapshot \
         ({catch_up_secs:.1} s, until under 1 MiB).\n{} chunks. WAL retained = `pg_current_wal_lsn()` minus the slot's `confirmed_flush_lsn` / `restart_lsn`, \
         sampled every 250 ms ({} / {} samples); \"longest transaction\" = the oldest `xact_start` of any session in \
         the database (the writer's and the daemon's; this process's sampler excluded).",
        status.chunks, initial.n, incremental.n
    );
    Ok(r)
}

/// Replaces (or appends) this bench's section of `path`, leaving the rest of the file alone.
fn write_section(path: &Path, section: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match old.find(SECTION) {
        Some(start) => {
            let rest = &old[start + SECTION.len()..];
            let end = rest
                .find("\n## ")
                .map_or(old.len(), |i| start + SECTION.len() + i + 1);
            format!("{}{}{}", &old[..start], section, &old[end..])
        }
        None if old.trim().is_empty() => section.to_owned(),
        None => format!("{}\n\n{}", old.trim_end(), section),
    };
    std::fs::write(path, new).expect("write results");
}
