//! Incremental snapshots of captured tables while streaming continues (DBLog / Debezium
//! "incremental snapshot", Sequin "backfill"): the table is read in primary-key chunks, each
//! between a low and a high watermark written into the WAL with `pg_logical_emit_message`.
//! Rows the stream changed between a chunk's watermarks are dropped from the chunk (the
//! stream already carries their newer version), the rest are published as `op: "r"` with
//! `source.snapshot = "incremental"`. No transaction lives longer than one chunk's select, so
//! nothing pins WAL or vacuum for the length of the snapshot. Design and guarantees:
//! docs/cdc.md, "Incremental snapshots".
//!
//! This module is the public face: [`request_snapshot`] (the signal) and
//! [`snapshot_status`] (progress), used by `membersync snapshot` and `membersync backfill`.
//! The CDC leader runs requests in [`driver`].

pub mod chunk;
pub mod driver;
pub mod window;

use tokio_postgres::Client;

/// Prefix of the watermark logical messages (non-transactional, see docs/cdc.md).
pub const WATERMARK_PREFIX: &str = "membersync.watermark";

#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    #[error("postgres query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("no incremental snapshot with id {0}")]
    NotFound(i64),
    #[error("table name {0:?} is not of the form schema.table")]
    BadTable(String),
    #[error("cannot connect for an incremental snapshot: {0}")]
    Connect(String),
}

/// Where a request stands (`membersync_meta.cdc_incremental_snapshots`, V10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Waiting for the CDC leader to pick it up (polled about every second).
    Requested,
    Running,
    Done,
    /// Stopped for good; `error` says why.
    Failed,
    Cancelled,
}

impl SnapshotState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => Self::Requested,
            "running" => Self::Running,
            "done" => Self::Done,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// No more progress will be made.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// Progress of one request. Counts cover chunks Kafka acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotStatus {
    pub id: i64,
    /// The tables in order; empty until the leader resolved "every captured table".
    pub tables: Vec<String>,
    pub state: SnapshotState,
    pub requested_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The table being read (`None` before the start and once done).
    pub current_table: Option<String>,
    /// Primary key of the last acknowledged row of `current_table` (JSON array of text values).
    pub last_key: Option<serde_json::Value>,
    pub rows_emitted: i64,
    /// Rows left out of their chunk because the stream changed them meanwhile.
    pub rows_skipped: i64,
    pub chunks: i64,
    pub error: Option<String>,
}

/// Requests an incremental snapshot of `tables` (`schema.table`; empty = every captured
/// table) and returns its id. The CDC leader starts it within about a second while
/// streaming continues; requests run one at a time, oldest first. Tables that are not
/// captured make the request fail (see [`snapshot_status`]).
pub async fn request_snapshot(client: &Client, tables: &[String]) -> Result<i64, IncrementalError> {
    if let Some(bad) = tables.iter().find(|t| !is_qualified(t)) {
        return Err(IncrementalError::BadTable(bad.clone()));
    }
    let row = client
        .query_one(
            "insert into membersync_meta.cdc_incremental_snapshots (tables) values ($1) returning id",
            &[&tables],
        )
        .await?;
    Ok(row.get(0))
}

/// The progress of request `id`.
pub async fn snapshot_status(client: &Client, id: i64) -> Result<SnapshotStatus, IncrementalError> {
    let row = client
        .query_opt(
            "select id, tables, state, requested_at, started_at, finished_at, current_table,
                    last_key, rows_emitted, rows_skipped, chunks, error
             from membersync_meta.cdc_incremental_snapshots where id = $1",
            &[&id],
        )
        .await?
        .ok_or(IncrementalError::NotFound(id))?;
    let state: String = row.get(2);
    Ok(SnapshotStatus {
        id: row.get(0),
        tables: row.get(1),
        // The check constraint allows only the known states.
        state: SnapshotState::parse(&state).unwrap_or(SnapshotState::Failed),
        requested_at: row.get(3),
        started_at: row.get(4),
        finished_at: row.get(5),
        current_table: row.get(6),
        last_key: row.get(7),
        rows_emitted: row.get(8),
        rows_skipped: row.get(9),
        chunks: row.get(10),
        error: row.get(11),
    })
}

/// Cancels request `id` if it has not finished; the leader stops it before its next chunk.
/// Returns whether it was still unfinished.
pub async fn cancel_snapshot(client: &Client, id: i64) -> Result<bool, IncrementalError> {
    let n = client
        .execute(
            "update membersync_meta.cdc_incremental_snapshots
               set state = 'cancelled', finished_at = now(), updated_at = now()
             where id = $1 and state in ('requested', 'running')",
            &[&id],
        )
        .await?;
    Ok(n == 1)
}

fn is_qualified(t: &str) -> bool {
    matches!(t.split_once('.'), Some((s, n)) if !s.is_empty() && !n.is_empty())
}
