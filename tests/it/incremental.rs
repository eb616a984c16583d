//! Incremental snapshots (docs/cdc.md): requested while the daemon streams, read in chunks
//! between watermarks, resumable. A child module of `cdc` (its Setup, Reader and helpers).
//! The table is filled before the daemon starts with `cdc.snapshot = "never"`, so its rows
//! reach Kafka only through the incremental snapshot.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use membersync::cdc::incremental::{self, SnapshotState, SnapshotStatus};
use tokio_postgres::Client;

use super::{Event, Setup};
use crate::support::{daemon::Daemon, wait_for};

/// Small chunks, so even a few thousand rows take many chunks.
const CHUNK_ROWS: &str = "250";

impl Setup {
    async fn start_incremental(&self) -> Daemon {
        Daemon::start(
            "cdc",
            self.env_with(&[
                ("MEMBERSYNC__CDC__SNAPSHOT", "never"),
                ("MEMBERSYNC__CDC__INCREMENTAL_CHUNK_ROWS", CHUNK_ROWS),
                ("MEMBERSYNC__CDC__INCREMENTAL_POLL_INTERVAL_MS", "200"),
            ]),
        )
        .await
    }

    async fn fill(&self, rows: i64) {
        self.sql(&format!(
            "insert into public.cdc_t (id, memberstack_id, name)
             select g, 'mem_' || g, 'v0' from generate_series(1, {rows}) g"
        ))
        .await;
    }

    /// Waits until the slot exists (streaming started).
    async fn streaming(&self) {
        let slot = self.db.slot();
        let admin = &self.admin;
        wait_for("the slot", Duration::from_secs(60), || {
            let slot = slot.clone();
            async move {
                admin
                    .query_opt(
                        "select 1 from pg_replication_slots where slot_name = $1 and active",
                        &[&slot],
                    )
                    .await
                    .unwrap()
                    .map(|_| ())
            }
        })
        .await;
    }

    async fn status_until(
        &self,
        id: i64,
        what: &str,
        timeout: Duration,
        done: impl Fn(&SnapshotStatus) -> bool,
    ) -> SnapshotStatus {
        let admin = &self.admin;
        let done = &done;
        wait_for(what, timeout, || async move {
            let s = incremental::snapshot_status(admin, id).await.unwrap();
            assert_ne!(s.state, SnapshotState::Failed, "snapshot failed: {s:?}");
            done(&s).then_some(s)
        })
        .await
    }
}

fn is_incremental_read(e: &Event) -> bool {
    e.op() == "r" && e.value["source"]["snapshot"] == "incremental"
}

// ------------------------------------------------------------------------------------------
// (a) every row, while streaming continues, through the CLI
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn incremental_snapshot_emits_every_row_while_streaming_continues() {
    const ROWS: i64 = 3_000;
    let s = Setup::new().await;
    s.fill(ROWS).await;
    let daemon = s.start_incremental().await;
    s.streaming().await;

    // Streaming goes on meanwhile: transactions of 50 new rows (ids above ROWS) until the
    // snapshot is done.
    let stop = tokio_util::sync::CancellationToken::new();
    let loader = spawn_offset_loader(s.db.admin().await, ROWS, 50, stop.clone());

    // The subcommand, as an operator runs it.
    let env = s.env();
    let cli = tokio::task::spawn_blocking(move || {
        crate::support::membersync()
            .args(["snapshot", "--table", "public.cdc_t", "--wait"])
            .envs(env)
            .output()
            .expect("run membersync snapshot")
    });
    let out = tokio::time::timeout(Duration::from_secs(180), cli)
        .await
        .expect("membersync snapshot --wait did not finish in 180 s")
        .unwrap();
    stop.cancel();
    let loaded_rows = loader.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "membersync snapshot failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("requested") && stdout.contains("done"),
        "{stdout}"
    );
    let id = s
        .admin
        .query_one(
            "select max(id) from membersync_meta.cdc_incremental_snapshots",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let status = incremental::snapshot_status(&s.admin, id).await.unwrap();
    assert_eq!(status.state, SnapshotState::Done);

    let ids: BTreeSet<i64> = (1..=ROWS).collect();
    let loaded: BTreeSet<i64> = (ROWS + 1..=ROWS + loaded_rows).collect();
    let mut reader = s.reader("cdc_t");
    let (mut r, mut reads_seen, mut c, mut scanned) = (BTreeSet::new(), 0, BTreeSet::new(), 0);
    let events = reader
        .until(
            "every row as r and every load as c",
            Duration::from_secs(120),
            |events| {
                for e in &events[scanned..] {
                    if is_incremental_read(e) {
                        r.extend(e.id());
                        reads_seen += 1;
                    } else if e.op() == "c" {
                        c.extend(e.id());
                    }
                }
                scanned = events.len();
                reads_seen >= status.rows_emitted && ids.is_subset(&r) && loaded.is_subset(&c)
            },
        )
        .await;
    let reads: Vec<&Event> = events.iter().filter(|e| is_incremental_read(e)).collect();
    // Snapshot rows carry the Debezium shape: key = the primary key, no before, lsn set.
    for e in &reads {
        crate::schemas::assert_valid("cdc", &e.value, "an incremental snapshot row");
        assert_eq!(e.key.as_deref(), Some(e.id().unwrap().to_string().as_str()));
        assert!(e.value["before"].is_null());
        assert!(e.value["source"]["lsn"].as_u64().unwrap() > 0);
        assert!(e.value["transaction"].is_null());
    }
    // Streamed inserts landed between the snapshot's first and last row: it ran while
    // streaming went on.
    let first_r = events.iter().position(is_incremental_read).unwrap();
    let last_r = events.iter().rposition(is_incremental_read).unwrap();
    let interleaved = events[first_r..last_r]
        .iter()
        .filter(|e| e.op() == "c")
        .count();
    eprintln!(
        "status: {status:?}; {} r events; {loaded_rows} rows inserted meanwhile, {interleaved} of them streamed between the first and the last snapshot row",
        reads.len()
    );
    assert!(
        interleaved > 0,
        "no change was streamed while the snapshot ran"
    );
    assert_eq!(status.tables, vec!["public.cdc_t".to_string()]);
    assert!(status.chunks >= ROWS / 250, "{status:?}");
    assert_eq!(
        status.rows_emitted as usize,
        reads.len(),
        "one r event per emitted row, nothing re-sent without a restart"
    );
    assert!(status.finished_at.is_some() && status.started_at.is_some());
    let rows_metric = daemon
        .metric("membersync_cdc_incremental_snapshot_rows_total{table=\"public.cdc_t\"}")
        .await;
    assert_eq!(rows_metric as usize, reads.len());
    assert_eq!(
        daemon
            .metric("membersync_cdc_incremental_snapshot_active")
            .await,
        0.0
    );
}

/// Inserts transactions of `rows` rows with ids above `offset` until `stop`; returns how
/// many rows it inserted.
fn spawn_offset_loader(
    client: Client,
    offset: i64,
    rows: i64,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut done = 0;
        while !stop.is_cancelled() {
            let (lo, hi) = (offset + done + 1, offset + done + rows);
            client
                .execute(
                    "insert into public.cdc_t (id, memberstack_id, name)
                     select g, 'mem_' || g, 'load' from generate_series($1::bigint, $2::bigint) g",
                    &[&lo, &hi],
                )
                .await
                .expect("load transaction");
            done += rows;
            // Paced like live traffic (~2,500 rows/s), not a bulk load.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done
    })
}

// ------------------------------------------------------------------------------------------
// (b) concurrent updates and deletes: never a stale row after a newer change
// ------------------------------------------------------------------------------------------

/// Updates (`name = 'v<n>'`, n rising per key) and deletes rows (those `≡ lane mod LANES`,
/// so each key has one writer and its versions rise in commit order) until `stop`,
/// mostly just ahead of the snapshot's persisted position, where the chunk in flight is; lane
/// 0 also updates its keys of the next three chunks in one transaction per new position.
/// Returns (updates, deletes).
fn spawn_writer(
    mut client: Client,
    lane: i64,
    rows: i64,
    snapshot: i64,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ lane as u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut deleted = BTreeSet::new();
        let (mut updates, mut deletes, mut version) = (0u64, 0u64, 0i64);
        let (mut position, mut round, mut bulk_at) = (0i64, 0u64, -1i64);
        while !stop.is_cancelled() {
            round += 1;
            if round % 20 == 1 {
                let s = incremental::snapshot_status(&client, snapshot)
                    .await
                    .unwrap();
                position = s
                    .last_key
                    .and_then(|k| k[0].as_str().and_then(|v| v.parse().ok()))
                    .unwrap_or(0);
            }
            let r = next();
            if lane == 0 && position != bulk_at {
                // Once per acknowledged chunk, one transaction across this lane's keys of the
                // next three chunks that holds the table's lock for a moment before it commits.
                // The chunk read that starts meanwhile takes its snapshot (this transaction
                // still running), waits for the lock in its select and reads once this has
                // committed, between its watermarks: its rows changed inside its window, every
                // time. Unlocked writes alone hit a window (a few milliseconds of a chunk's
                // cycle) too rarely for the test to be sure it exercised one.
                bulk_at = position;
                version += 1;
                let ahead = 3 * CHUNK_ROWS.parse::<i64>().unwrap();
                let tx = client.transaction().await.unwrap();
                tx.batch_execute("lock table public.cdc_t in access exclusive mode")
                    .await
                    .unwrap();
                let changed = tx
                    .execute(
                        "update public.cdc_t set name = 'v' || $3::bigint
                         where id > $1 and id <= $1 + $2 and id % $5 = $4",
                        &[
                            &(position as i32),
                            &(ahead as i32),
                            &version,
                            &(lane as i32),
                            &(LANES as i32),
                        ],
                    )
                    .await
                    .unwrap();
                tx.batch_execute("select pg_sleep(0.1)").await.unwrap();
                tx.commit().await.unwrap();
                updates += changed;
                continue;
            }
            let mut id = if r % 10 < 9 {
                position + 1 + (r >> 8) as i64 % 500
            } else {
                1 + (r >> 8) as i64 % rows
            };
            id = (id - id.rem_euclid(LANES) + lane).clamp(1, rows);
            if id.rem_euclid(LANES) != lane || deleted.contains(&id) {
                continue;
            }
            if r % 50 == 0 {
                client
                    .execute("delete from public.cdc_t where id = $1", &[&(id as i32)])
                    .await
                    .unwrap();
                deleted.insert(id);
                deletes += 1;
            } else {
                version += 1;
                client
                    .execute(
                        "update public.cdc_t set name = 'v' || $2::bigint where id = $1",
                        &[&(id as i32), &version],
                    )
                    .await
                    .unwrap();
                updates += 1;
            }
        }
        (updates, deletes)
    })
}

/// Concurrent writers.
const LANES: i64 = 4;

/// The version in `name` (`v<n>`).
fn version(row: &serde_json::Value) -> i64 {
    row["name"]
        .as_str()
        .and_then(|n| n.strip_prefix('v'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no version in {row}"))
}

#[tokio::test]
async fn incremental_snapshot_never_emits_a_stale_row_after_a_newer_change() {
    const ROWS: i64 = 10_000;
    let s = Setup::new().await;
    s.fill(ROWS).await;
    let _daemon = s.start_incremental().await;
    s.streaming().await;
    let id = incremental::request_snapshot(&s.admin, &["public.cdc_t".to_string()])
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut handles = Vec::new();
    for lane in 0..LANES {
        handles.push(spawn_writer(
            s.db.admin().await,
            lane,
            ROWS,
            id,
            stop.clone(),
        ));
    }
    let status = s
        .status_until(
            id,
            "the snapshot under writes",
            Duration::from_secs(240),
            |s| s.state == SnapshotState::Done,
        )
        .await;
    stop.cancel();
    let (mut updates, mut deletes) = (0, 0);
    for h in handles {
        let (u, d) = h.await.unwrap();
        updates += u;
        deletes += d;
    }
    eprintln!("{updates} updates and {deletes} deletes during the snapshot; {status:?}");

    let mut reader = s.reader("cdc_t");
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut scanned = 0;
    let events = reader
        .until(
            "every change and snapshot row",
            Duration::from_secs(120),
            |events| {
                for e in &events[scanned..] {
                    *counts.entry(e.op().to_owned()).or_default() += 1;
                }
                scanned = events.len();
                let count = |op: &str| counts.get(op).copied().unwrap_or(0);
                count("u") >= updates
                    && count("d") >= deletes
                    && count("r") >= status.rows_emitted as u64
            },
        )
        .await;

    // Per key, in partition order: an r event never carries an older version than a change
    // event before it, and never follows the key's delete.
    let mut latest: HashMap<i64, i64> = HashMap::new();
    let mut gone: BTreeSet<i64> = BTreeSet::new();
    let mut covered: BTreeSet<i64> = BTreeSet::new();
    let mut stale = Vec::new();
    for (offset, e) in events.iter().enumerate() {
        let key = e.id().expect("id");
        match e.op() {
            "u" => {
                latest.insert(key, version(&e.value["after"]));
                covered.insert(key);
            }
            "d" => {
                gone.insert(key);
                covered.insert(key);
            }
            "r" => {
                let v = version(&e.value["after"]);
                if gone.contains(&key) || latest.get(&key).is_some_and(|l| v < *l) {
                    stale.push((offset, key, v, latest.get(&key).copied()));
                }
                covered.insert(key);
            }
            _ => {}
        }
    }
    if let Some((_, key, _, _)) = stale.first() {
        for e in events.iter().filter(|e| e.id() == Some(*key)) {
            eprintln!(
                "key {key}: {} v{} lsn {} tx {}",
                e.op(),
                e.value["after"]["name"],
                e.value["source"]["lsn"],
                e.value["source"]["txId"]
            );
        }
    }
    assert!(
        stale.is_empty(),
        "stale snapshot rows (offset, key, version, newer version already in the topic): {:?}",
        &stale[..stale.len().min(10)]
    );
    let missing: Vec<i64> = (1..=ROWS)
        .filter(|k| !covered.contains(k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "keys with neither a snapshot row nor a change: {missing:?}"
    );
    assert!(updates > 100, "the writers barely ran ({updates} updates)");
    assert!(
        status.rows_skipped > 0,
        "no chunk row was ever changed inside its window: the test did not exercise the window"
    );
}

// ------------------------------------------------------------------------------------------
// (c) kill -9 mid-snapshot: resumes from the last acknowledged chunk
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_interrupted_incremental_snapshot_resumes_from_its_last_chunk() {
    const ROWS: i64 = 30_000;
    let s = Setup::new().await;
    s.fill(ROWS).await;
    let mut daemon = s.start_incremental().await;
    s.streaming().await;
    let id = incremental::request_snapshot(&s.admin, &[]).await.unwrap();
    let before_kill = s
        .status_until(
            id,
            "ten acknowledged chunks",
            Duration::from_secs(120),
            |s| s.chunks >= 10,
        )
        .await;
    daemon.signal("KILL");
    let _ = daemon.child.wait();
    let at_kill = incremental::snapshot_status(&s.admin, id).await.unwrap();
    assert_eq!(
        at_kill.state,
        SnapshotState::Running,
        "the kill came after the snapshot finished: make the table larger"
    );
    assert!(at_kill.chunks >= before_kill.chunks);
    // Empty request = every captured table, in cdc.tables order: members first (empty here).
    assert_eq!(
        at_kill.tables,
        vec!["public.members".to_string(), "public.cdc_t".to_string()]
    );
    assert_eq!(at_kill.current_table.as_deref(), Some("public.cdc_t"));
    let resume_after: i64 = at_kill.last_key.as_ref().expect("a persisted position")[0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("killed at {at_kill:?}");

    let _daemon = s.start_incremental().await;
    let done = s
        .status_until(id, "the resumed snapshot", Duration::from_secs(180), |s| {
            s.state == SnapshotState::Done
        })
        .await;
    let ids: BTreeSet<i64> = (1..=ROWS).collect();
    let mut reader = s.reader("cdc_t");
    let events = reader.all_ids("r", &ids, Duration::from_secs(120)).await;
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for e in events.iter().filter(|e| is_incremental_read(e)) {
        *counts.entry(e.id().unwrap()).or_default() += 1;
    }
    let redone: Vec<i64> = (1..=resume_after)
        .filter(|k| counts.get(k) != Some(&1))
        .take(10)
        .collect();
    assert!(
        redone.is_empty(),
        "rows up to the persisted position {resume_after} were produced again (or never): {redone:?}"
    );
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "resumed after id {resume_after}; {duplicates} rows produced twice (chunks in flight at the kill); {done:?}"
    );
    assert!(
        (duplicates as i64) < ROWS - resume_after,
        "the resumed run started over"
    );
}
