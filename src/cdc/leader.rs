//! Single-active leadership of a slot: an advisory lock on a session of its own, kept alive
//! by TCP keepalives on both ends and a liveness lease a standby can judge (V13,
//! `membersync_meta.cdc_leaders`), so that a leader that hangs or vanishes with its connection
//! open is replaced within `cdc.leader_lease_timeout_secs`. Reference: docs/cdc.md
//! ("Leadership").

use std::time::Duration;

use tokio_postgres::Client;

use super::slot::SlotError;
use crate::config::{CdcConfig, DatabaseConfig};
use crate::db::{self, DbError, Login};

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
        heartbeat: &crate::telemetry::liveness::Heartbeat,
    ) -> Result<Option<Leader>, SlotError> {
        let slot = cdc.slot.as_str();
        let lease = Lease::of(cdc);
        let client = lock_session(cfg, &lease).await?;
        let key = lock_key(slot);
        let mut logged = false;
        loop {
            // A hot standby's poll is its loop's turn.
            heartbeat.beat();
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
