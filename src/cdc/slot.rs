//! The control plane around the replication slot: the slot's state, health and lag, and the
//! snapshot bookkeeping that makes an interrupted initial snapshot restart cleanly. Leadership
//! (who streams it) is in `super::leader`.

use tokio_postgres::Client;

pub use super::leader::Leader;
use crate::config::Config;
use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("postgres query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// Loud and final: the WAL the slot needs is gone, so changes were lost. Re-creating the
    /// slot silently would hide that (Debezium DBZ-5739); an operator must decide.
    #[error(
        "replication slot {0} is lost (wal_status = lost): Postgres removed WAL it still needed, \
         so changes were lost. Drop the slot, restart membersync (it snapshots again) and run a \
         backfill; raise max_slot_wal_keep_size to avoid a repeat"
    )]
    Lost(String),
    #[error("replication slot {slot} uses plugin {plugin}, not pgoutput")]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "publication {publication} is missing or does not publish {missing}, and role {role} may not \
         change it (only a table's owner may publish it): run `membersync migrate`, or as the owner \
         `ALTER PUBLICATION {publication} ADD TABLE {missing}`"
    )]
    NoPublication {
        publication: String,
        missing: String,
        role: String,
    },
}

/// What the slot looks like right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Missing,
    /// Exists and its snapshot (if any) completed: stream from its confirmed position.
    Ready,
    /// Exists, but its snapshot never completed: drop and start over.
    SnapshotInterrupted,
}

pub async fn inspect(client: &Client, config: &Config) -> Result<SlotState, SlotError> {
    let slot = &config.cdc.slot;
    ensure_publication(client, config).await?;
    let row = client
        .query_opt(
            "select plugin, coalesce(wal_status, '') from pg_replication_slots
             where slot_name = $1 and database = current_database()",
            &[slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(SlotState::Missing);
    };
    let (plugin, wal_status): (String, String) = (row.get(0), row.get(1));
    if plugin != "pgoutput" {
        return Err(SlotError::WrongPlugin {
            slot: slot.clone(),
            plugin,
        });
    }
    if wal_status == "lost" {
        return Err(SlotError::Lost(slot.clone()));
    }
    let snapshot = client
        .query_opt("select completed_at is not null from membersync_meta.cdc_snapshots where slot_name = $1", &[slot])
        .await?;
    Ok(match snapshot {
        Some(row) if !row.get::<_, bool>(0) => SlotState::SnapshotInterrupted,
        _ => SlotState::Ready,
    })
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_table(t: &str) -> String {
    let (schema, name) = t.split_once('.').unwrap_or(("public", t));
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Creates the daemon's publication, or adds missing tables to it, when this role may (it
/// owns the tables); otherwise fails with the statement an owner must run.
async fn ensure_publication(client: &Client, config: &Config) -> Result<(), SlotError> {
    let cdc = &config.cdc;
    let exists: bool = client
        .query_one(
            "select exists(select 1 from pg_publication where pubname = $1)",
            &[&cdc.publication],
        )
        .await?
        .get(0);
    let published: Vec<String> = client
        .query(
            "select schemaname || '.' || tablename from pg_publication_tables where pubname = $1",
            &[&cdc.publication],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&String> = cdc
        .tables
        .iter()
        .filter(|t| !published.contains(t))
        .collect();
    if exists && missing.is_empty() {
        return Ok(());
    }
    let list = missing
        .iter()
        .map(|t| quote_table(t))
        .collect::<Vec<_>>()
        .join(", ");
    let statement = if exists {
        format!(
            "alter publication {} add table {list}",
            quote_ident(&cdc.publication)
        )
    } else {
        format!(
            "create publication {} for table {list}",
            quote_ident(&cdc.publication)
        )
    };
    match client.batch_execute(&statement).await {
        Ok(()) => {
            tracing::info!(
                publication = cdc.publication,
                tables = list,
                "publication created or extended"
            );
            Ok(())
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(SlotError::NoPublication {
                publication: cdc.publication.clone(),
                missing: missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                role: config.database.user.clone(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Records that a snapshot is about to start, before the slot exists (see V6).
pub async fn snapshot_started(client: &Client, slot: &str) -> Result<(), SlotError> {
    client
        .execute(
            "insert into membersync_meta.cdc_snapshots (slot_name) values ($1)
             on conflict (slot_name) do update
               set started_at = now(), completed_at = null, consistent_point = null, rows = 0",
            &[&slot],
        )
        .await?;
    Ok(())
}

pub async fn snapshot_completed(
    client: &Client,
    slot: &str,
    consistent_point: &str,
    rows: i64,
) -> Result<(), SlotError> {
    client
        .execute(
            "update membersync_meta.cdc_snapshots
               set completed_at = now(), consistent_point = $2::text::pg_lsn, rows = $3
             where slot_name = $1",
            &[&slot, &consistent_point, &rows],
        )
        .await?;
    Ok(())
}

/// Drops a slot whose snapshot never completed (nothing past its consistent point was ever
/// acknowledged, so nothing is lost by starting over).
pub async fn drop_interrupted(client: &Client, slot: &str) -> Result<(), SlotError> {
    tracing::warn!(
        slot,
        "the initial snapshot was interrupted; dropping its slot and starting over"
    );
    client
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1", &[&slot])
        .await?;
    Ok(())
}

/// The slot's health, polled for metrics and the lost-slot alarm.
#[derive(Debug, Clone)]
pub struct SlotHealth {
    pub lag_bytes: i64,
    pub confirmed_flush_lsn: Option<u64>,
    pub wal_status: String,
    /// WAL kept for the slot: the current position minus `restart_lsn` (none when lost).
    pub retained_bytes: Option<i64>,
    /// `safe_wal_size`: none when `max_slot_wal_keep_size` is unlimited (or the slot is lost).
    pub safe_wal_size: Option<i64>,
}

pub async fn health(client: &Client, slot: &str) -> Result<Option<SlotHealth>, SlotError> {
    let row = client
        .query_opt(
            "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint,
                    (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint,
                    coalesce(wal_status, ''),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                    safe_wal_size
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotHealth {
        lag_bytes: r.get(0),
        confirmed_flush_lsn: r.get::<_, Option<i64>>(1).map(|v| v as u64),
        wal_status: r.get(2),
        retained_bytes: r.get(3),
        safe_wal_size: r.get(4),
    }))
}

/// Writes a non-transactional logical message so the slot sees WAL (and can advance) even
/// when only other databases of the cluster write.
pub async fn heartbeat(client: &Client) -> Result<(), SlotError> {
    client
        .execute(
            "select pg_logical_emit_message(false, 'membersync.heartbeat', now()::text)",
            &[],
        )
        .await?;
    Ok(())
}
