//! `schemas/migrations/` through `membersync::db::migrate` (refinery), and the Supabase stand-in
//! `scripts/supabase-bootstrap.sql` they run on. See docs/schema.md.

use std::time::Duration;

use membersync::db::migrate::{MigrationReport, known, migrate};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::support::cluster::TempCluster;
use crate::support::{TestDb, repo_root};

/// Where `membersync migrate` keeps refinery's history (src/db/migrate.rs).
const HISTORY: &str = "membersync_meta.schema_history";

const TABLES: [&str; 6] = [
    "members",
    "user_logs",
    "error_logs",
    "webhook_log",
    "audit_logs",
    "sync_state",
];

fn all_names() -> Vec<String> {
    known()
        .into_iter()
        .map(|(v, name)| format!("V{v}__{name}"))
        .collect()
}

fn bootstrap_sql() -> String {
    std::fs::read_to_string(repo_root().join("scripts/supabase-bootstrap.sql"))
        .expect("scripts/supabase-bootstrap.sql")
}

async fn strings(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn applies_every_migration_to_a_bootstrapped_database_once() {
    let db = TestDb::bootstrapped().await;
    let mut admin = db.admin().await;

    let names = all_names();
    assert!(names.len() >= 4, "migrations: {names:?}");
    let report = migrate(&mut admin)
        .await
        .expect("migrations apply to a fresh database");
    assert_eq!(
        report,
        MigrationReport {
            applied: names.clone()
        }
    );

    for table in TABLES {
        let exists: bool = admin
            .query_one(
                "select to_regclass($1) is not null",
                &[&format!("public.{table}")],
            )
            .await
            .unwrap()
            .get(0);
        assert!(exists, "table public.{table} missing");
    }
    let recorded: Vec<i32> = admin
        .query(
            &format!("select version from {HISTORY} order by version"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        recorded,
        known().into_iter().map(|(v, _)| v).collect::<Vec<_>>()
    );

    // Again: nothing to do, nothing changes.
    let again = migrate(&mut admin)
        .await
        .expect("re-running the migrations is a no-op");
    assert!(
        again.applied.is_empty(),
        "re-run applied {:?}",
        again.applied
    );
    let again = migrate(&mut admin).await.expect("and again");
    assert!(again.applied.is_empty());
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused() {
    let db = TestDb::migrated().await;
    let mut admin = db.admin().await;
    let (version, name) = known().into_iter().nth(1).expect("at least two migrations");
    // What refinery sees when the file of an applied migration was edited afterwards.
    let n = admin
        .execute(
            &format!("update {HISTORY} set checksum = '12345' where version = $1"),
            &[&version],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);

    let err = migrate(&mut admin)
        .await
        .expect_err("an edited applied migration must be refused");
    let text = err.to_string();
    let full = format!("V{version}__{name}");
    assert!(
        text.contains(&full),
        "the error names the migration: {text}"
    );
    assert!(
        text.contains("different"),
        "the error says it changed: {text}"
    );

    // Nothing was applied or recorded meanwhile.
    let count: i64 = admin
        .query_one(&format!("select count(*) from {HISTORY}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as usize, known().len());
}

#[tokio::test]
async fn an_applied_migration_missing_from_the_build_is_refused() {
    let db = TestDb::migrated().await;
    let mut admin = db.admin().await;
    admin
        .execute(
            &format!("insert into {HISTORY} (version, name, applied_on, checksum) values (9999, 'from_the_future', '2030-01-01T00:00:00Z', '1')"),
            &[],
        )
        .await
        .unwrap();
    let err = migrate(&mut admin)
        .await
        .expect_err("a database ahead of the build must be refused");
    let text = err.to_string();
    assert!(
        text.contains("V9999__from_the_future") && text.contains("missing"),
        "{text}"
    );
}

#[tokio::test]
async fn schema_has_its_indexes_constraints_and_publication() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;

    let indexes = strings(
        &admin,
        "select indexname::text from pg_indexes where schemaname = 'public'",
    )
    .await;
    for index in [
        "members_pkey",
        "members_memberstack_id_key",
        "members_user_id_idx",
        "members_email_lower_idx",
        "user_logs_pkey",
        "idx_user_logs_user_id",
        "idx_user_logs_created_at",
        "idx_user_logs_memberstack_id",
        "webhook_log_event_id_key",
        "sync_state_pkey",
    ] {
        assert!(
            indexes.iter().any(|i| i == index),
            "index {index} missing; have {indexes:?}"
        );
    }
    let email_index: String = admin
        .query_one(
            "select indexdef from pg_indexes where indexname = 'members_email_lower_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(email_index.contains("lower(email)"), "{email_index}");

    // Every table in public has RLS enabled.
    let without_rls = strings(
        &admin,
        "select relname::text from pg_class
         where relnamespace = 'public'::regnamespace and relkind in ('r', 'p') and not relrowsecurity",
    )
    .await;
    assert!(
        without_rls.is_empty(),
        "tables without RLS: {without_rls:?}"
    );

    // The CDC publication holds members, whose replica identity is FULL (V18): update and
    // delete events carry the whole old row (and the memberstack_id CDC keys them by).
    let published = strings(&admin, "select schemaname || '.' || tablename from pg_publication_tables where pubname = 'membersync'").await;
    assert_eq!(published, ["public.members"]);
    let identity: i8 = admin
        .query_one(
            "select relreplident::\"char\" from pg_class where oid = 'public.members'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity as u8, b'f');
    let realtime = strings(
        &admin,
        "select tablename::text from pg_publication_tables where pubname = 'supabase_realtime'",
    )
    .await;
    assert!(realtime.is_empty(), "supabase_realtime is left alone");

    // members.user_id → auth.users, on delete set null; user_logs.user_id on delete cascade.
    let fks = strings(
        &admin,
        "select conrelid::regclass::text || ':' || confrelid::regclass::text || ':' || confdeltype::text
         from pg_constraint where contype = 'f' and connamespace = 'public'::regnamespace order by 1",
    )
    .await;
    assert_eq!(fks, ["members:auth.users:n", "user_logs:auth.users:c"]);
}

#[tokio::test]
async fn check_constraints_accept_the_sync_rules_values() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;

    // The sync rules' own 'subscription_updated' (their CHECK rejected it) and the rest.
    for change_type in [
        "created",
        "updated",
        "deleted",
        "synced",
        "subscription_updated",
        "conflict_resolved",
    ] {
        for source in ["memberstack", "supabase", "stripe", "membersync"] {
            admin
                .execute(
                    "insert into public.user_logs (memberstack_id, change_type, source) values ('mem_1', $1, $2)",
                    &[&change_type, &source],
                )
                .await
                .unwrap_or_else(|e| panic!("user_logs refuses ({change_type}, {source}): {e}"));
        }
    }
    for (sql, what) in [
        (
            "insert into public.user_logs (change_type, source) values ('bogus', 'memberstack')",
            "change_type",
        ),
        (
            "insert into public.user_logs (change_type, source) values ('created', 'zapier')",
            "source",
        ),
        (
            "insert into public.members (memberstack_id, subscription_status) values ('mem_x', 'ACTIVE')",
            "status",
        ),
        (
            "insert into public.members (memberstack_id, subscription_status) values ('mem_x', 'trialing')",
            "status",
        ),
        (
            "insert into public.members (memberstack_id, custom_fields) values ('mem_x', '[1]')",
            "custom_fields",
        ),
        (
            "insert into public.members (memberstack_id) values ('')",
            "memberstack_id",
        ),
        (
            "insert into public.error_logs (error_type, error_message, retry_count) values ('x', 'y', -1)",
            "retry_count",
        ),
    ] {
        let err = admin.execute(sql, &[]).await.expect_err(what);
        assert_eq!(
            err.code(),
            Some(&SqlState::CHECK_VIOLATION),
            "{what}: {err}"
        );
    }
    for status in ["active", "inactive", "cancelled", "free"] {
        admin
            .execute(
                "insert into public.members (memberstack_id, subscription_status) values ($1, $2)",
                &[&format!("mem_{status}"), &status],
            )
            .await
            .unwrap_or_else(|e| panic!("status {status}: {e}"));
    }
    let default: String = admin
        .query_one("insert into public.members (memberstack_id) values ('mem_default') returning subscription_status", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default, "free");

    // Unique keys.
    let err = admin
        .execute(
            "insert into public.members (memberstack_id) values ('mem_free')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    admin
        .execute(
            "insert into public.webhook_log (event_id, source) values ('evt_1', 'stripe')",
            &[],
        )
        .await
        .unwrap();
    let err = admin
        .execute(
            "insert into public.webhook_log (event_id, source) values ('evt_1', 'stripe')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));

    // A member may exist before its auth user; deleting the auth user unlinks the member.
    let user = uuid::Uuid::new_v4();
    admin
        .execute(
            "insert into auth.users (id, email) values ($1, 'u@example.com')",
            &[&user],
        )
        .await
        .unwrap();
    admin
        .execute(
            "update public.members set user_id = $1 where memberstack_id = 'mem_active'",
            &[&user],
        )
        .await
        .unwrap();
    admin
        .execute(
            "insert into public.user_logs (user_id, change_type, source) values ($1, 'created', 'memberstack')",
            &[&user],
        )
        .await
        .unwrap();
    let err = admin
        .execute(
            "update public.members set user_id = $1 where memberstack_id = 'mem_free'",
            &[&uuid::Uuid::new_v4()],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION));
    admin
        .execute("delete from auth.users where id = $1", &[&user])
        .await
        .unwrap();
    let row = admin
        .query_one(
            "select (select user_id from public.members where memberstack_id = 'mem_active'),
                    (select count(*) from public.user_logs where user_id = $1)",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<uuid::Uuid>>(0), None);
    assert_eq!(row.get::<_, i64>(1), 0);
}

#[tokio::test]
async fn updated_at_follows_real_changes_only() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    let old = "2001-01-01T00:00:00Z";
    admin
        .execute(
            "insert into public.members (memberstack_id, email, created_at, updated_at) values ('mem_1', 'a@x', $1::text::timestamptz, $1::text::timestamptz)",
            &[&old],
        )
        .await
        .unwrap();
    let changed = |sql: &'static str| {
        let admin = &admin;
        async move {
            admin.execute(sql, &[]).await.unwrap();
            let moved: bool = admin
                .query_one("select updated_at > '2001-01-01T00:00:00Z' from public.members where memberstack_id = 'mem_1'", &[])
                .await
                .unwrap()
                .get(0);
            moved
        }
    };
    assert!(
        !changed("update public.members set email = 'a@x' where memberstack_id = 'mem_1'").await,
        "a no-op update keeps updated_at"
    );
    assert!(
        changed("update public.members set email = 'b@x' where memberstack_id = 'mem_1'").await,
        "a change moves updated_at"
    );
}

/// membersync's bookkeeping of column edit times (V9) must not get in the application's way:
/// `members` stays deletable and truncatable without `cascade`, and the edit times follow.
#[tokio::test]
async fn column_edit_times_follow_deletes_and_plain_truncates_of_members() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    let edits = |sql: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("`{sql}`: {e:?}"))
                .get::<_, i64>(0)
        }
    };
    admin
        .batch_execute(
            "insert into public.members (memberstack_id, email) values ('mem_1', 'a@x'), ('mem_2', 'b@x');
             update public.members set plan_id = 'pln_1' where memberstack_id = 'mem_1';",
        )
        .await
        .unwrap();
    let per_member = "select count(distinct member_id) from membersync_meta.member_column_edits";
    assert_eq!(edits(per_member).await, 2, "both members have edit times");
    let plan = "select count(*) from membersync_meta.member_column_edits e
                join public.members m on m.id = e.member_id
                where m.memberstack_id = 'mem_1' and e.column_name = 'plan_id'";
    assert_eq!(edits(plan).await, 1, "the update recorded plan_id");

    admin
        .batch_execute("delete from public.members where memberstack_id = 'mem_2'")
        .await
        .unwrap();
    assert_eq!(
        edits(per_member).await,
        1,
        "a delete removes its member's edit times"
    );

    admin
        .batch_execute("truncate public.members")
        .await
        .unwrap_or_else(|e| panic!("plain truncate of members: {e:?}"));
    assert_eq!(
        edits(per_member).await,
        0,
        "a truncate removes every edit time"
    );
}

#[tokio::test]
async fn daemon_role_is_created_least_privileged() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    let row = admin
        .query_one(
            "select rolcanlogin, rolreplication, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb
             from pg_roles where rolname = 'membersync'",
            &[],
        )
        .await
        .expect("role membersync exists");
    let attrs: Vec<bool> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(
        attrs,
        [true, true, false, false, false, false],
        "login, replication, and nothing else"
    );

    // Grants, per table, exactly as docs/schema.md lists them.
    let privileges = strings(
        &admin,
        "select c.relname || ':' || string_agg(p.privilege_type, ',' order by p.privilege_type)
         from pg_class c
         cross join lateral (select unnest(array['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) as privilege_type) p
         where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
           and has_table_privilege('membersync', c.oid, p.privilege_type)
         group by c.relname order by c.relname",
    )
    .await;
    assert_eq!(
        privileges,
        [
            "audit_logs:INSERT,SELECT",
            "error_logs:INSERT,SELECT",
            "members:INSERT,SELECT,UPDATE",
            "sync_state:DELETE,INSERT,SELECT,UPDATE",
            "user_logs:INSERT",
            "webhook_log:INSERT,SELECT",
        ]
    );
    let can_emit: bool = admin
        .query_one(
            "select has_function_privilege('membersync', 'pg_logical_emit_message(boolean,text,text)', 'execute')
                and has_table_privilege('membersync', 'pg_replication_slots', 'select')
                and has_function_privilege('membersync', 'pg_try_advisory_lock(bigint)', 'execute')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(can_emit);
}

/// What the API roles may do (V3, narrowed by V5), exactly as docs/schema.md lists it.
#[tokio::test]
async fn api_roles_are_least_privileged() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;

    // Table-level privileges, per role and table.
    let privileges = strings(
        &admin,
        "select r.role || ':' || c.relname || ':' || string_agg(p.privilege_type, ',' order by p.privilege_type)
         from pg_class c
         cross join (values ('anon'), ('authenticated'), ('service_role')) r(role)
         cross join lateral (select unnest(array['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) as privilege_type) p
         where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
           and has_table_privilege(r.role, c.oid, p.privilege_type)
         group by r.role, c.relname order by 1",
    )
    .await;
    let all = "DELETE,INSERT,REFERENCES,SELECT,TRIGGER,TRUNCATE,UPDATE";
    let mut expected = vec![
        "authenticated:members:SELECT".to_owned(),
        "authenticated:user_logs:SELECT".to_owned(),
    ];
    // service_role keeps Supabase's default privileges (everything; it has BYPASSRLS).
    let mut tables = TABLES.to_vec();
    tables.sort();
    expected.extend(tables.iter().map(|t| format!("service_role:{t}:{all}")));
    assert_eq!(privileges, expected);

    // Column-level privileges beyond those: authenticated may update two columns of members
    // (usage_stats no longer since V15).
    let columns = strings(
        &admin,
        "select r.role || ':' || c.relname || '.' || a.attname || ':' || p.privilege_type
         from pg_class c
         join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
         cross join (values ('anon'), ('authenticated')) r(role)
         cross join lateral (select unnest(array['SELECT','INSERT','UPDATE','REFERENCES']) as privilege_type) p
         where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
           and has_column_privilege(r.role, c.oid, a.attnum, p.privilege_type)
           and not has_table_privilege(r.role, c.oid, p.privilege_type)
         order by 1",
    )
    .await;
    assert_eq!(
        columns,
        [
            "authenticated:members.custom_fields:UPDATE",
            "authenticated:members.project_data:UPDATE",
        ]
    );

    // The API roles' policies: read own rows, update own members row; nothing else.
    let policies = strings(
        &admin,
        "select tablename || ':' || policyname || ':' || cmd || ':' || permissive || ':'
                || array_to_string(roles, ',') || ':' || coalesce(qual, '-') || ':' || coalesce(with_check, '-')
         from pg_policies
         where schemaname = 'public' and roles && array['anon', 'authenticated', 'public']::name[]
         order by 1",
    )
    .await;
    let own = "( SELECT auth.uid() AS uid) = user_id";
    assert_eq!(
        policies,
        [
            format!("members:members_select_own:SELECT:PERMISSIVE:authenticated:({own}):-"),
            format!("members:members_update_own:UPDATE:PERMISSIVE:authenticated:({own}):({own})"),
            format!("user_logs:user_logs_select_own:SELECT:PERMISSIVE:authenticated:({own}):-"),
        ]
    );

    // The updated_at trigger function is not callable by the API roles (and need not be:
    // EXECUTE is checked when a trigger is created, not when it fires), nor SECURITY DEFINER.
    let row = admin
        .query_one(
            "select has_function_privilege('authenticated', 'public.membersync_set_updated_at()', 'execute'),
                    has_function_privilege('anon', 'public.membersync_set_updated_at()', 'execute'),
                    prosecdef
             from pg_proc where oid = 'public.membersync_set_updated_at()'::regprocedure",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (0..3).map(|i| row.get::<_, bool>(i)).collect::<Vec<_>>(),
        [false, false, false]
    );
}

#[tokio::test]
async fn supabase_bootstrap_is_idempotent_and_supabase_shaped() {
    let db = TestDb::bootstrapped().await;
    let admin = db.admin().await;
    let sql = bootstrap_sql();
    admin
        .batch_execute(&sql)
        .await
        .expect("bootstrap runs a second time");
    admin.batch_execute(&sql).await.expect("and a third");

    let roles = strings(
        &admin,
        "select rolname || ':' || rolcanlogin || ':' || rolinherit || ':' || rolbypassrls || ':' || rolsuper
         from pg_roles where rolname in ('anon', 'authenticated', 'service_role', 'authenticator') order by rolname",
    )
    .await;
    assert_eq!(
        roles,
        [
            "anon:false:false:false:false",
            "authenticated:false:false:false:false",
            "authenticator:true:false:false:false",
            "service_role:false:false:true:false",
        ]
    );
    let members_of_authenticator = strings(
        &admin,
        "select r.rolname::text from pg_auth_members m join pg_roles r on r.oid = m.roleid
         where m.member = 'authenticator'::regrole order by 1",
    )
    .await;
    assert_eq!(
        members_of_authenticator,
        ["anon", "authenticated", "service_role"]
    );
    let timeouts = strings(
        &admin,
        "select r.rolname || ':' || array_to_string(s.setconfig, ',') from pg_db_role_setting s
         join pg_roles r on r.oid = s.setrole
         where s.setdatabase = 0 and r.rolname in ('anon', 'authenticated') order by 1",
    )
    .await;
    assert_eq!(
        timeouts,
        [
            "anon:statement_timeout=3s",
            "authenticated:statement_timeout=8s"
        ]
    );

    // auth.users, its generated confirmed_at, RLS on it.
    let id = uuid::Uuid::new_v4();
    let row = admin
        .query_one(
            "insert into auth.users (id, email, email_confirmed_at, phone_confirmed_at)
             values ($1, 'c@example.com', '2024-01-02Z', '2024-01-01Z')
             returning confirmed_at = '2024-01-01Z'::timestamptz, is_sso_user, is_anonymous,
                       (select relrowsecurity from pg_class where oid = 'auth.users'::regclass)",
            &[&id],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "confirmed_at = least(email_confirmed_at, phone_confirmed_at)"
    );
    assert!(!row.get::<_, bool>(1));
    assert!(!row.get::<_, bool>(2));
    assert!(row.get::<_, bool>(3), "RLS enabled on auth.users");

    let functions = strings(
        &admin,
        "select p.proname || ':' || p.provolatile::text || ':' || l.lanname from pg_proc p join pg_language l on l.oid = p.prolang
         where p.pronamespace = 'auth'::regnamespace order by 1",
    )
    .await;
    assert_eq!(
        functions,
        ["email:s:sql", "jwt:s:sql", "role:s:sql", "uid:s:sql"]
    );
    for role in ["anon", "authenticated", "service_role"] {
        let ok: bool = admin
            .query_one(
                "select has_schema_privilege($1, 'auth', 'usage')
                    and has_function_privilege($1, 'auth.uid()', 'execute')
                    and has_function_privilege($1, 'auth.jwt()', 'execute')
                    and has_schema_privilege($1, 'public', 'usage')",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ok, "{role} can use auth.uid()/auth.jwt() and schema public");
    }

    // Supabase's default privileges: a new table in public is open to anon until RLS closes it.
    admin
        .batch_execute("create table public.probe (id int)")
        .await
        .unwrap();
    let anon_can: bool = admin
        .query_one(
            "select has_table_privilege('anon', 'public.probe', 'select')
                and has_table_privilege('anon', 'public.probe', 'delete')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        anon_can,
        "default privileges grant new public tables to anon, as on Supabase"
    );

    let realtime: i64 = admin
        .query_one(
            "select count(*) from pg_publication p where p.pubname = 'supabase_realtime'
               and not exists (select 1 from pg_publication_tables t where t.pubname = p.pubname)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(realtime, 1, "an empty supabase_realtime publication");
}

/// Roles are cluster-wide while test databases are not: several databases of a brand-new
/// cluster bootstrapped and migrated at the same time must all succeed (races on CREATE ROLE,
/// GRANT role, ALTER ROLE SET).
#[tokio::test]
async fn bootstrap_and_migrations_run_concurrently_on_a_fresh_cluster() {
    const DATABASES: usize = 6;
    let cluster = TempCluster::start(&["wal_level = logical", "max_connections = 50"]);
    let postgres = cluster.connect().await;
    for i in 0..DATABASES {
        postgres
            .batch_execute(&format!("create database par_{i}"))
            .await
            .unwrap();
    }
    let sql = bootstrap_sql();
    let runs = (0..DATABASES).map(|i| {
        let sql = sql.clone();
        let port = cluster.port;
        async move {
            let (mut client, conn) = tokio_postgres::Config::new()
                .host("127.0.0.1")
                .port(port)
                .user("postgres")
                .dbname(format!("par_{i}"))
                .connect_timeout(Duration::from_secs(5))
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("par_{i} bootstrap: {e:?}"))?;
            let report = migrate(&mut client)
                .await
                .map_err(|e| format!("par_{i} migrate: {e}"))?;
            Ok::<_, String>(report.applied.len())
        }
    });
    let results = futures::future::join_all(runs).await;
    for result in results {
        assert_eq!(
            result.expect("concurrent bootstrap + migrate"),
            known().len()
        );
    }
    let roles: i64 = postgres
        .query_one(
            "select count(*) from pg_roles
             where rolname in ('anon', 'authenticated', 'service_role', 'authenticator', 'membersync')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, 5);
}

/// `membersync migrate --wait` (the Kubernetes roles' initContainer): applies nothing, waits as
/// the daemon role while migrations are pending, and exits 0 once the owner has applied them.
#[tokio::test]
async fn migrate_wait_returns_only_once_every_migration_is_applied() {
    let db = TestDb::bootstrapped().await;
    let mut child = crate::support::membersync()
        .args(["migrate", "--wait"])
        .envs(db.env())
        .env("MEMBERSYNC__TELEMETRY__LOG_FORMAT", "pretty")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run membersync migrate --wait");

    // Pending: it keeps waiting (and applies nothing: no history table appears).
    let admin = db.admin().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "migrate --wait exited while migrations were pending"
        );
    }
    let history: bool = admin
        .query_one("select to_regclass($1) is not null", &[&HISTORY])
        .await
        .unwrap()
        .get(0);
    assert!(!history, "migrate --wait must not apply anything");

    // The owner applies them: it returns, successfully, within a couple of polls.
    let mut owner = db.admin().await;
    migrate(&mut owner).await.expect("migrations apply");
    let status =
        crate::support::wait_for("migrate --wait to exit", Duration::from_secs(20), || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await;
    let out = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "exit {status}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("schema is up to date"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// V15 adds `unique (user_id)` to `members`. On a database where two members already share an
/// auth user it stops and names them (which member owns the user is for a person to decide);
/// once they are fixed, it applies.
#[tokio::test]
async fn v15_refuses_members_sharing_an_auth_user_and_names_them() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    let sql = std::fs::read_to_string(
        crate::support::repo_root().join("schemas/migrations/V15__merge_guards.sql"),
    )
    .unwrap();
    let start = sql.find("do $migration$").unwrap();
    let end = sql[start..].find("$migration$;").unwrap() + start + "$migration$;".len();
    let unique_block = &sql[start..end];

    // The database as it was before V15, with two members sharing one auth user.
    admin
        .batch_execute(
            "alter table public.members drop constraint members_user_id_key;
             insert into auth.users (id, aud, role, email, created_at, updated_at)
             values ('00000000-0000-4000-8000-00000000000a', 'authenticated', 'authenticated', 'shared@example.com', now(), now());
             insert into public.members (memberstack_id, user_id) values
               ('mem_one', '00000000-0000-4000-8000-00000000000a'),
               ('mem_two', '00000000-0000-4000-8000-00000000000a');",
        )
        .await
        .unwrap();
    let err = admin
        .batch_execute(unique_block)
        .await
        .expect_err("V15 on duplicates");
    let db_err = err.as_db_error().expect("a database error");
    assert!(
        db_err.message().contains("more than one member")
            && db_err.message().contains("mem_one, mem_two"),
        "{}",
        db_err.message()
    );
    assert!(db_err.hint().is_some_and(|h| h.contains("user_id to null")));

    // Fixed by the operator: it applies.
    admin
        .batch_execute("update public.members set user_id = null where memberstack_id = 'mem_two'")
        .await
        .unwrap();
    admin.batch_execute(unique_block).await.unwrap();
    let exists: bool = admin
        .query_one(
            "select exists (select from pg_constraint where conname = 'members_user_id_key' and contype = 'u')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(exists);
}
