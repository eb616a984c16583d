//! The database roles by duty (schemas/migrations/V14): each configured login connects, and
//! has what its duty needs — merge its reads and writes, the API reads and nothing more — and,
//! when it is a role of its own, none of the powers it does not need (REPLICATION, SUPERUSER,
//! BYPASSRLS). CDC's replication role is checked by [`super::postgres`].

use tokio_postgres::Client;

use super::Item;
use crate::config::Config;
use crate::db::{self, Login};

/// `(table, privilege)` merge uses (src/merge/store.rs, src/merge/worker.rs).
const MERGE_NEEDS: &[(&str, &str)] = &[
    ("public.members", "SELECT"),
    ("public.members", "INSERT"),
    ("public.members", "UPDATE"),
    ("public.user_logs", "INSERT"),
    ("public.error_logs", "INSERT"),
    ("public.webhook_log", "SELECT"),
    ("public.webhook_log", "INSERT"),
    ("public.sync_state", "SELECT"),
    ("public.sync_state", "INSERT"),
    ("public.sync_state", "UPDATE"),
    ("membersync_meta.member_column_edits", "SELECT"),
    // The outbox (V12).
    ("membersync_meta.merge_intents", "SELECT"),
    ("membersync_meta.merge_intents", "INSERT"),
    ("membersync_meta.merge_intents", "UPDATE"),
    ("membersync_meta.merge_intents", "DELETE"),
    ("membersync_meta.outcome_outbox", "SELECT"),
    ("membersync_meta.outcome_outbox", "INSERT"),
    ("membersync_meta.outcome_outbox", "UPDATE"),
    ("membersync_meta.outcome_outbox", "DELETE"),
    // The unreplayed dead-letter gauge (V16).
    ("public.audit_logs", "SELECT"),
    // A member's resync, recorded when merge applies it (V17).
    ("public.audit_logs", "INSERT"),
];

/// What the API reads (src/api/sync_view.rs, src/api/status.rs), and the one table it appends
/// to: its admin calls' audit rows (src/api/admin.rs, V19).
const API_NEEDS: &[(&str, &str)] = &[
    ("public.members", "SELECT"),
    ("public.sync_state", "SELECT"),
    ("public.error_logs", "SELECT"),
    ("public.audit_logs", "SELECT"),
    ("public.audit_logs", "INSERT"),
];

pub(super) async fn check(config: &Config) -> Vec<Item> {
    let mut items = vec![duty(config, Login::Merge, "merge", MERGE_NEEDS).await];
    // The API reads the database only when it is served (or has a login of its own).
    if config.api.enabled || config.database.api_user.is_some() {
        items.push(duty(config, Login::Api, "api", API_NEEDS).await);
    }
    items
}

async fn duty(config: &Config, login: Login, duty: &str, needs: &[(&str, &str)]) -> Item {
    let db = &config.database;
    let (user, _) = login.credentials(db);
    let label = format!("{duty} role {user}");
    let client = match db::connect(db, login).await {
        Ok(client) => client,
        Err(e) => {
            let key = match login {
                Login::Api => "database.api_user / api_password",
                _ => "database.merge_user / merge_password",
            };
            return Item::fail(
                label,
                e.to_string(),
                format!(
                    "check {key}: the role exists (`membersync migrate` creates it), may LOG IN, and has this \
                     password (as the owner: `alter role {user} password '…'`)"
                ),
            );
        }
    };
    // A login of its own (not the daemon's all-in-one role, which CDC needs with REPLICATION).
    let own_role = user != db.user;
    match privileges(&client, needs, login, own_role).await {
        Ok(problems) if problems.is_empty() => Item::pass(label, format!("has what {duty} needs")),
        Ok(problems) => Item::fail(
            label,
            problems.join("; "),
            "run `membersync migrate` (V14 grants each duty role what it needs); remove other powers \
             as the owner (`alter role … noreplication nobypassrls`, `revoke … from …`)",
        ),
        Err(e) => Item::fail(label, e.to_string(), "see the Postgres log"),
    }
}

/// What is missing, and — for a role of its own — what it has and should not.
async fn privileges(
    client: &Client,
    needs: &[(&str, &str)],
    login: Login,
    own_role: bool,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let tables: Vec<String> = needs.iter().map(|(t, _)| (*t).to_owned()).collect();
    let wanted: Vec<String> = needs.iter().map(|(_, p)| (*p).to_owned()).collect();
    let rows = client
        .query(
            // A table that does not exist is the migrations' item, not this one.
            "select t.name, t.privilege, has_table_privilege(current_user, t.name, t.privilege)
               from unnest($1::text[], $2::text[]) as t(name, privilege)
              where to_regclass(t.name) is not null",
            &[&tables, &wanted],
        )
        .await?;
    let mut problems: Vec<String> = rows
        .iter()
        .filter(|r| !r.get::<_, bool>(2))
        .map(|r| {
            format!(
                "lacks {} on {}",
                r.get::<_, String>(1),
                r.get::<_, String>(0)
            )
        })
        .collect();
    let row = client
        .query_one(
            "select rolreplication, rolsuper, rolbypassrls
               from pg_roles where rolname = current_user",
            &[],
        )
        .await?;
    let (replication, superuser, bypassrls): (bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    if own_role {
        for (has, what) in [
            (replication, "REPLICATION"),
            (superuser, "SUPERUSER"),
            (bypassrls, "BYPASSRLS"),
        ] {
            if has {
                problems.push(format!("has {what}, which its duty does not need"));
            }
        }
    }
    if login == Login::Api && own_role {
        // Read-only but for appending its audit rows: no other write privilege on any table of
        // ours.
        let writable: Vec<String> = client
            .query(
                "select n.nspname || '.' || c.relname
                   from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  where n.nspname in ('public', 'membersync_meta') and c.relkind in ('r', 'p')
                    and (has_table_privilege(current_user, c.oid, 'UPDATE, DELETE, TRUNCATE')
                         or (has_table_privilege(current_user, c.oid, 'INSERT')
                             and c.oid <> 'public.audit_logs'::regclass))
                  order by 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !writable.is_empty() {
            problems.push(format!(
                "may write {} (the API role must be read-only but for appending audit_logs)",
                writable.join(", ")
            ));
        }
    }
    Ok(problems)
}
