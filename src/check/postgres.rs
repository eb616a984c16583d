use tokio_postgres::Client;

use super::Item;
use crate::config::Config;
use crate::db::{self, Login};

/// pgoutput with `messages 'true'` (logical messages) needs PostgreSQL 14 or newer.
const MIN_SERVER_VERSION: i32 = 140_000;

pub(super) async fn check(config: &Config) -> Vec<Item> {
    let db = &config.database;
    let client = match db::connect(db, Login::Daemon).await {
        Ok(client) => client,
        Err(e) => {
            let text = e.to_string();
            let hint = if text.contains("UnknownIssuer")
                || text.contains("invalid peer certificate")
            {
                format!(
                    "the server's certificate is not trusted under sslmode {}: set database.ssl_root_cert to the CA \
                     that issued it (hosted Supabase: the project's CA certificate, Dashboard → Database → SSL \
                     Configuration); or, knowingly, a weaker database.sslmode",
                    db.sslmode.as_str()
                )
            } else {
                format!(
                    "check database.host/port/dbname, that role {} exists with LOGIN and that its password is set \
                     (MEMBERSYNC__DATABASE__PASSWORD or database.password_file); on Supabase use the direct \
                     connection, not the pooler",
                    db.user
                )
            };
            return vec![Item::fail("postgres connection", text, hint)];
        }
    };
    let mut items = vec![Item::pass(
        "postgres connection",
        format!("{}:{}/{} as {}", db.host, db.port, db.dbname, db.user),
    )];
    match checks(&client, config).await {
        Ok(more) => items.extend(more),
        Err(e) => items.push(Item::fail(
            "postgres queries",
            e.to_string(),
            "see the Postgres log",
        )),
    }
    items
}

async fn checks(client: &Client, config: &Config) -> Result<Vec<Item>, tokio_postgres::Error> {
    let cdc = &config.cdc;
    let mut items = Vec::new();

    let row = client
        .query_one(
            "select current_setting('server_version_num')::int, current_setting('server_version'),
                    current_setting('wal_level'),
                    (select rolreplication or rolsuper from pg_roles where rolname = current_user),
                    current_setting('max_replication_slots')::int,
                    (select count(*)::int from pg_replication_slots)",
            &[],
        )
        .await?;
    let (version_num, version): (i32, String) = (row.get(0), row.get(1));
    let wal_level: String = row.get(2);
    let can_replicate: bool = row.get(3);
    let (max_slots, used_slots): (i32, i32) = (row.get(4), row.get(5));

    items.push(if version_num >= MIN_SERVER_VERSION {
        Item::pass("server version", format!("PostgreSQL {version}"))
    } else {
        Item::fail(
            "server version",
            format!("PostgreSQL {version}"),
            "membersync needs PostgreSQL 14 or newer",
        )
    });
    let logical = wal_level == "logical";
    items.push(if logical {
        Item::pass("wal_level", "logical")
    } else {
        Item::fail(
            "wal_level",
            format!("{wal_level} (logical decoding is off)"),
            "run `ALTER SYSTEM SET wal_level = 'logical'` as a superuser and restart Postgres \
             (hosted Supabase already runs with wal_level = logical)",
        )
    });
    items.push(if can_replicate {
        Item::pass(
            "replication privilege",
            format!("role {} may replicate", config.database.user),
        )
    } else {
        Item::fail(
            "replication privilege",
            format!("role {} lacks REPLICATION", config.database.user),
            format!(
                "run `ALTER ROLE {} REPLICATION` as the owner",
                config.database.user
            ),
        )
    });

    let slot = client
        .query_opt(
            "select plugin, database = current_database(), coalesce(wal_status, 'unknown'), active
             from pg_replication_slots where slot_name = $1",
            &[&cdc.slot],
        )
        .await?;
    let free = max_slots - used_slots;
    items.push(if slot.is_some() || free > 0 {
        Item::pass(
            "replication slots",
            format!("{used_slots} of {max_slots} in use"),
        )
    } else {
        Item::fail(
            "replication slots",
            format!("all {max_slots} in use"),
            "raise max_replication_slots (restart needed) or drop an unused slot: \
             `select slot_name, active from pg_replication_slots`",
        )
    });
    let label = format!("slot {}", cdc.slot);
    items.push(match slot {
        Some(row) => {
            let (plugin, same_db, wal_status, active): (String, bool, String, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if plugin != "pgoutput" || !same_db {
                Item::fail(
                    label,
                    format!("exists but uses plugin {plugin}{}", if same_db { "" } else { " on another database" }),
                    "choose another cdc.slot, or drop this slot if nothing else uses it",
                )
            } else if wal_status == "lost" {
                Item::fail(
                    label,
                    "exists but its WAL was removed (wal_status = lost): changes after its position are gone",
                    "drop the slot, let membersync re-create it, then run a backfill to reconcile; \
                     raise max_slot_wal_keep_size to avoid a repeat",
                )
            } else {
                Item::pass(label, format!("exists (pgoutput, wal_status {wal_status}, active {active})"))
            }
        }
        None if logical && can_replicate && free > 0 => {
            Item::pass(label, "missing; membersync creates it at start")
        }
        None => Item::fail(
            label,
            "missing and cannot be created (see the items above)",
            "fix wal_level, the REPLICATION privilege or the free slots above",
        ),
    });

    items.push(publication(client, config).await?);
    items.push(migrations(client).await?);
    Ok(items)
}

async fn publication(client: &Client, config: &Config) -> Result<Item, tokio_postgres::Error> {
    let cdc = &config.cdc;
    let label = format!("publication {}", cdc.publication);
    let exists = client
        .query_opt(
            "select 1 from pg_publication where pubname = $1",
            &[&cdc.publication],
        )
        .await?;
    if exists.is_some() {
        let rows = client
            .query("select schemaname || '.' || tablename from pg_publication_tables where pubname = $1", &[
                &cdc.publication,
            ])
            .await?;
        let published: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&String> = cdc
            .tables
            .iter()
            .filter(|t| !published.contains(t))
            .collect();
        return Ok(if missing.is_empty() {
            Item::pass(label, format!("publishes {}", cdc.tables.join(", ")))
        } else {
            let list: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            Item::fail(
                label,
                format!("does not publish {}", list.join(", ")),
                format!(
                    "as the table owner: `ALTER PUBLICATION {} ADD TABLE {}`",
                    cdc.publication,
                    list.join(", ")
                ),
            )
        });
    }
    // Only a table's owner may add it to a publication, so the daemon role usually cannot.
    let owns_all: bool = client
        .query_one(
            "select has_database_privilege(current_database(), 'CREATE')
                and coalesce(bool_and(pg_has_role(c.relowner, 'USAGE')), false)
             from unnest($1::text[]) as t(name)
             left join pg_class c on c.oid = to_regclass(t.name)",
            &[&cdc.tables],
        )
        .await?
        .get(0);
    Ok(if owns_all {
        Item::pass(label, "missing; membersync creates it at start")
    } else {
        Item::fail(
            label,
            "missing, and this role may not create it",
            "run `membersync migrate` (it creates the publication as the owner)",
        )
    })
}

async fn migrations(client: &Client) -> Result<Item, tokio_postgres::Error> {
    let known = db::migrate::known();
    let applied = match db::migrate::applied_versions(client).await {
        Ok(v) => v,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Ok(Item::fail(
                "schema migrations",
                "this role may not read the migration history",
                "run `membersync migrate` (it grants the daemon role read access)",
            ));
        }
        Err(e) => return Err(e),
    };
    let pending: Vec<String> = known
        .iter()
        .filter(|(v, _)| !applied.contains(v))
        .map(|(v, name)| format!("V{v}__{name}"))
        .collect();
    Ok(if pending.is_empty() {
        Item::pass(
            "schema migrations",
            format!("{} of {} applied", applied.len(), known.len()),
        )
    } else {
        Item::fail(
            "schema migrations",
            format!("{} pending: {}", pending.len(), pending.join(", ")),
            "run `membersync migrate`",
        )
    })
}
