//! Applies `schemas/migrations/` (embedded at build time) with refinery: ordered, each in its
//! own transaction, checksummed — an applied migration whose file changed is refused.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("schemas/migrations");
}

/// Bookkeeping lives outside `public`: Supabase grants `anon` and `authenticated` every table in
/// `public` by default privileges, and PostgREST exposes that schema.
const META_SCHEMA: &str = "membersync_meta";
const HISTORY_TABLE: &str = "membersync_meta.schema_history";
/// The roles the migrations create (V1, V14); each may read the history (for `check` and
/// `migrate --wait`, which log in as them).
const DAEMON_ROLES: [&str; 3] = ["membersync", "membersync_merge", "membersync_api"];

/// Serialises concurrent `migrate` runs against one database (e.g. several pods starting).
const MIGRATION_LOCK_KEY: i64 = 0x6d73_796e_635f_6d69; // "msync_mi"

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names (`V1__core_tables`) of the migrations applied by this run; empty when up to date.
    pub applied: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration failed: {0}")]
    Refinery(#[source] refinery::Error),
    #[error("cannot prepare the migration history: {0}")]
    Setup(#[source] tokio_postgres::Error),
    #[error("cannot take the migration lock: {0}")]
    Lock(#[source] tokio_postgres::Error),
}

/// Every migration this build knows, as `(version, name)`.
pub fn known() -> Vec<(i32, String)> {
    let mut known: Vec<(i32, String)> = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| (m.version(), m.name().to_owned()))
        .collect();
    // In version order (the order they apply in): the embedded list follows the file names,
    // where V10 sorts before V2.
    known.sort_by_key(|(v, _)| *v);
    known
}

pub async fn migrate(client: &mut Client) -> Result<MigrationReport, MigrateError> {
    client
        .execute("select pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(MigrateError::Lock)?;
    let result = run_locked(client).await;
    // Best effort: the lock also dies with the session.
    let _ = client
        .execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    Ok(MigrationReport {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| format!("V{}__{}", m.version(), m.name()))
            .collect(),
    })
}

async fn run_locked(client: &mut Client) -> Result<refinery::Report, MigrateError> {
    client
        .batch_execute(&format!(
            "create schema if not exists {META_SCHEMA}; revoke all on schema {META_SCHEMA} from public"
        ))
        .await
        .map_err(MigrateError::Setup)?;
    let mut runner = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true);
    runner.set_migration_table_name(HISTORY_TABLE);
    let report = runner
        .run_async(client)
        .await
        .map_err(MigrateError::Refinery)?;
    for role in DAEMON_ROLES {
        client
            .batch_execute(&format!(
                "do $$ begin
                   if exists (select from pg_roles where rolname = '{role}') then
                     grant usage on schema {META_SCHEMA} to {role};
                     grant select on {HISTORY_TABLE} to {role};
                   end if;
                 end $$"
            ))
            .await
            .map_err(MigrateError::Setup)?;
    }
    Ok(report)
}

/// Versions recorded as applied in the database (empty when the history table is missing).
pub async fn applied_versions(client: &Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("select to_regclass($1) is not null", &[&HISTORY_TABLE])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!("select version from {HISTORY_TABLE} order by version"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The migrations this build knows that the database has not applied, as `V<n>__<name>`.
pub async fn pending(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let applied = applied_versions(client).await?;
    Ok(known()
        .into_iter()
        .filter(|(v, _)| !applied.contains(v))
        .map(|(v, name)| format!("V{v}__{name}"))
        .collect())
}

/// Waits until every migration this build knows is applied (by someone else: `migrate` as the
/// owner), asking every `poll` as `login`. Connection and query errors are only reported
/// through `waiting` and asked again: the database may come up after the caller. For an
/// initContainer that starts a role only once its schema is there.
pub async fn wait_until_applied(
    cfg: &crate::config::DatabaseConfig,
    login: super::Login,
    poll: std::time::Duration,
    mut waiting: impl FnMut(&str),
) {
    loop {
        let outcome = match super::connect(cfg, login).await {
            Ok(client) => pending(&client).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(p) if p.is_empty() => return,
            Ok(p) => waiting(&format!("{} pending: {}", p.len(), p.join(", "))),
            Err(e) => waiting(&e),
        }
        tokio::time::sleep(poll).await;
    }
}
