//! The control plane around the replication slot: single-active leadership through an
//! advisory lock, the slot's health and lag, and the snapshot bookkeeping that makes an
//! interrupted initial snapshot restart cleanly.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{CdcConfig, Config, DatabaseConfig};
use crate::db::{self, DbError, Login};

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

/// The advisory lock key of a slot: every membersync instance that would stream this slot
/// computes the same key, and only the holder streams.
fn lock_key(slot: &str) -> String {
    format!("membersync.cdc.{slot}")
}

/// How leadership is kept alive and judged (`cdc.leader_*`).
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    /// How often the leader renews its lease.
    pub heartbeat: Duration,
    /// A lease older than this is stale: the standby terminates its holder.
    pub timeout: Duration,
}

impl Lease {
    pub fn of(cdc: &CdcConfig) -> Self {
        let timeout = Duration::from_secs(cdc.leader_lease_timeout_secs.max(2));
        let heartbeat = Duration::from_millis(cdc.leader_heartbeat_interval_ms.max(100))
            // At least three renewals per timeout, or a busy moment looks like a hang.
            .min(timeout / 3);
        Self { heartbeat, timeout }
    }

    /// TCP keepalive: idle a third of the timeout, then probes every sixth, three of them —
    /// a dead peer is noticed within about the lease timeout on both ends.
    fn keepalive(&self) -> (Duration, Duration, u32) {
        let idle = (self.timeout / 3).max(Duration::from_secs(1));
        let interval = (self.timeout / 6).max(Duration::from_secs(1));
        (idle, interval, 3)
    }
}

/// Leadership over one slot, held for as long as this connection lives and its lease is
/// renewed.
pub struct Leader {
    client: Client,
    slot: String,
    lease: Lease,
    /// False on a database without the lease table (V13 not applied): the lock alone.
    leased: bool,
}

impl Leader {
    /// Waits (hot standby) until this process holds the lock, polling every `poll`. A
    /// leader whose lease is stale (it hangs, or its host is gone while Postgres still keeps
    /// its session) is terminated, so that the lock is released. Returns `None` if `cancel`
    /// fires first.
    pub async fn acquire(
        cfg: &DatabaseConfig,
        cdc: &CdcConfig,
        poll: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Leader>, SlotError> {
        let slot = cdc.slot.as_str();
        let lease = Lease::of(cdc);
        let client = lock_session(cfg, &lease).await?;
        let key = lock_key(slot);
        let mut logged = false;
        loop {
            let got: bool = client
                .query_one(
                    "select pg_try_advisory_lock(hashtextextended($1, 0))",
                    &[&key],
                )
                .await?
                .get(0);
            if got {
                let leased = take_lease(&client, slot, &cfg.application_name).await?;
                let leader = Leader {
                    client,
                    slot: slot.to_owned(),
                    lease,
                    leased,
                };
                leader.take_over_slot().await?;
                return Ok(Some(leader));
            }
            if !logged {
                tracing::info!(
                    slot,
                    "another instance streams this slot; waiting as hot standby"
                );
                logged = true;
            }
            if terminate_stale_leader(&client, slot, &key, &lease).await? {
                // Its lock is released when its backend has exited: try again at once.
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// A walsender still streaming the slot belongs to a former leader (this one holds the
    /// lock): end it, or starting replication would fail with "slot is active" until
    /// Postgres notices the old session is gone (`wal_sender_timeout`).
    async fn take_over_slot(&self) -> Result<(), SlotError> {
        let ended = self
            .client
            .query(
                "select pg_terminate_backend(active_pid, 5000) from pg_replication_slots
                  where slot_name = $1 and active_pid is not null and active_pid <> pg_backend_pid()",
                &[&self.slot],
            )
            .await?;
        if !ended.is_empty() {
            tracing::warn!(
                slot = self.slot,
                "ended a former leader's replication session on the slot"
            );
        }
        Ok(())
    }

    /// Resolves when leadership is lost: the lock connection is gone, or the lease could not
    /// be renewed within its timeout (then a standby may already have terminated this session;
    /// streaming on would race it). Renews the lease every heartbeat meanwhile.
    pub async fn lost(&self) {
        loop {
            if self.client.is_closed() {
                return;
            }
            let renewed = tokio::time::timeout(self.lease.timeout, self.renew()).await;
            match renewed {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tracing::error!(
                        slot = self.slot,
                        "the lease names another leader; giving up leadership"
                    );
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(slot = self.slot, error = %e, "cannot renew the CDC leader lease");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        slot = self.slot,
                        timeout_secs = self.lease.timeout.as_secs(),
                        "the CDC leader lease was not renewed in time; giving up leadership"
                    );
                    return;
                }
            }
            tokio::time::sleep(self.lease.heartbeat).await;
        }
    }

    /// `Ok(false)` when the lease row is no longer this session's.
    async fn renew(&self) -> Result<bool, tokio_postgres::Error> {
        if !self.leased {
            self.client.simple_query("select 1").await?;
            return Ok(true);
        }
        let n = self
            .client
            .execute(
                "update membersync_meta.cdc_leaders set heartbeat_at = now()
                  where slot_name = $1 and pid = pg_backend_pid()",
                &[&self.slot],
            )
            .await?;
        Ok(n == 1)
    }

    /// The leader's own connection, for control-plane queries.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The lock session: TCP keepalives and a user timeout on both ends, so that a peer that
/// vanished (host down, partition) is noticed in about the lease timeout rather than the
/// kernel's two hours — by the server, which then releases the lock, and by the client.
async fn lock_session(cfg: &DatabaseConfig, lease: &Lease) -> Result<Client, SlotError> {
    let (idle, interval, count) = lease.keepalive();
    let mut pg = db::pg_config(cfg, Login::Daemon);
    pg.keepalives(true)
        .keepalives_idle(idle)
        .keepalives_interval(interval)
        .keepalives_retries(count)
        .tcp_user_timeout(lease.timeout);
    let (client, connection) = pg
        .connect(db::tls::connector(cfg).map_err(DbError::from)?)
        .await
        .map_err(|source| DbError::Connect {
            host: cfg.host.clone(),
            port: cfg.port,
            user: cfg.user.clone(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "CDC lock connection closed with an error");
        }
    });
    // Server side (ignored on a Unix socket): these are user-settable.
    client
        .batch_execute(&format!(
            "set tcp_keepalives_idle = {}; set tcp_keepalives_interval = {}; \
             set tcp_keepalives_count = {count}; set tcp_user_timeout = {}",
            idle.as_secs(),
            interval.as_secs(),
            lease.timeout.as_millis()
        ))
        .await?;
    Ok(client)
}

/// Writes this session's lease. `false` when the lease table does not exist (V13 not
/// applied): leadership then rests on the lock alone.
async fn take_lease(client: &Client, slot: &str, app: &str) -> Result<bool, SlotError> {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let holder = format!("{app} pid {} {host}", std::process::id());
    let written = client
        .execute(
            "insert into membersync_meta.cdc_leaders (slot_name, pid, holder)
             values ($1, pg_backend_pid(), $2)
             on conflict (slot_name) do update
               set pid = excluded.pid, holder = excluded.holder,
                   acquired_at = now(), heartbeat_at = now()",
            &[&slot, &holder],
        )
        .await;
    match written {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            tracing::warn!(
                slot,
                "membersync_meta.cdc_leaders is missing (run `membersync migrate`): a hung \
                 leader cannot be replaced until Postgres drops its session"
            );
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Terminates the lock holder's session when its lease is older than the timeout (by the
/// database's clock, so no clock skew between hosts matters). Only a holder that wrote the
/// lease is judged: the pid must both hold the lock and be named by the lease.
async fn terminate_stale_leader(
    client: &Client,
    slot: &str,
    key: &str,
    lease: &Lease,
) -> Result<bool, SlotError> {
    let stale = client
        .query_opt(
            "select l.pid, l.holder, extract(epoch from now() - l.heartbeat_at)::float8
               from membersync_meta.cdc_leaders l
              where l.slot_name = $1
                and now() - l.heartbeat_at > make_interval(secs => $3)
                and exists (select 1 from pg_locks k
                             where k.locktype = 'advisory' and k.granted and k.pid = l.pid
                               and k.objsubid = 1
                               and ((k.classid::bigint << 32) | k.objid::bigint)
                                   = hashtextextended($2, 0))",
            &[&slot, &key, &lease.timeout.as_secs_f64()],
        )
        .await;
    let row = match stale {
        Ok(row) => row,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e.into()),
    };
    let Some(row) = row else { return Ok(false) };
    let (pid, holder, age): (i32, String, f64) = (row.get(0), row.get(1), row.get(2));
    tracing::warn!(
        slot,
        pid,
        holder,
        lease_age_secs = age,
        "the CDC leader's lease is stale; terminating its session to take over"
    );
    let ended: bool = client
        .query_one("select pg_terminate_backend($1, 5000)", &[&pid])
        .await?
        .get(0);
    Ok(ended)
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
}

pub async fn health(client: &Client, slot: &str) -> Result<Option<SlotHealth>, SlotError> {
    let row = client
        .query_opt(
            "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint,
                    (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint,
                    coalesce(wal_status, '')
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotHealth {
        lag_bytes: r.get(0),
        confirmed_flush_lsn: r.get::<_, Option<i64>>(1).map(|v| v as u64),
        wal_status: r.get(2),
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
