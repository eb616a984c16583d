//! Row Level Security and privileges, tested as the real roles — never as the owner, who
//! bypasses RLS and would make every check pass. Each check runs in a transaction on a
//! superuser connection that sets the JWT claims the way PostgREST does and then
//! `set local role`s to `authenticated`, `anon` or the daemon's `membersync`; the transaction
//! is rolled back. See docs/schema.md.
//!
//! A signed-in user (`authenticated`) reads its own `members` and `user_logs` rows and
//! updates only `project_data` and `custom_fields` of its own `members` row (`usage_stats`,
//! the application's metering, since V15)
//! (V5); everything else is refused with "permission denied".

use membersync::db::{Login, connect};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use crate::support::TestDb;

const USER_A: Uuid = Uuid::from_u128(0x0000_00aa_0000_4000_8000_0000_0000_000a);
const USER_B: Uuid = Uuid::from_u128(0x0000_00bb_0000_4000_8000_0000_0000_000b);

/// Who a transaction acts as.
#[derive(Debug, Clone, Copy)]
enum As {
    /// `authenticated` with `sub` = this user.
    User(Uuid),
    /// `authenticated` without any claims.
    UserWithoutClaims,
    Anon,
    Daemon,
}

/// A migrated database with two auth users, A and B, each with a `members` row and
/// `user_logs`, plus a member without auth user; members rows were last updated at
/// [`FIXTURE_UPDATED_AT`].
struct Fixture {
    _db: TestDb,
    admin: Client,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDb::migrated().await;
        let admin = db.admin().await;
        admin
            .execute(
                "insert into auth.users (id, aud, role, email, raw_app_meta_data, created_at, updated_at)
                 select id, 'authenticated', 'authenticated', email,
                        '{\"provider\":\"email\",\"providers\":[\"email\"]}', now(), now()
                 from (values ($1::uuid, 'a@example.com'), ($2::uuid, 'b@example.com')) as t(id, email)",
                &[&USER_A, &USER_B],
            )
            .await
            .expect("insert auth users");
        admin
            .execute(
                "insert into public.members (user_id, memberstack_id, email, subscription_status, plan_id, created_at, updated_at)
                 select user_id, memberstack_id, email, status, plan_id, $3::text::timestamptz, $3::text::timestamptz
                 from (values ($1::uuid, 'mem_a', 'a@example.com', 'active', 'pln_a'),
                              ($2::uuid, 'mem_b', 'b@example.com', 'free', null),
                              (null, 'mem_orphan', 'orphan@example.com', 'free', null))
                      as t(user_id, memberstack_id, email, status, plan_id)",
                &[&USER_A, &USER_B, &FIXTURE_UPDATED_AT],
            )
            .await
            .expect("insert members");
        admin
            .execute(
                "insert into public.user_logs (user_id, memberstack_id, change_type, new_data, source)
                 values ($1, 'mem_a', 'created', '{}', 'memberstack'),
                        ($1, 'mem_a', 'subscription_updated', '{\"status\":\"active\"}', 'stripe'),
                        ($2, 'mem_b', 'created', '{}', 'memberstack'),
                        (null, 'mem_orphan', 'created', '{}', 'memberstack')",
                &[&USER_A, &USER_B],
            )
            .await
            .expect("insert user_logs");
        admin
            .batch_execute(
                "insert into public.error_logs (memberstack_id, error_type, error_message) values ('mem_a', 'sync_failed', 'boom');
                 insert into public.webhook_log (event_id, source, event_type, memberstack_id) values ('msg_1', 'memberstack', 'member.updated', 'mem_a');
                 insert into public.audit_logs (actor, action, target) values ('admin', 'dlq.replay', 'mem_a');
                 insert into public.sync_state (memberstack_id, field, last_synced_at, last_value) values ('mem_a', 'email', now(), '\"a@example.com\"');",
            )
            .await
            .expect("insert internal rows");
        Fixture { _db: db, admin }
    }

    /// A transaction acting as `who`; dropped (or rolled back) at the end of the check.
    async fn tx(&mut self, who: As) -> Transaction<'_> {
        let tx = self.admin.transaction().await.expect("begin");
        let (claims, role) = match who {
            As::User(id) => (Some(id), "authenticated"),
            As::UserWithoutClaims => (None, "authenticated"),
            As::Anon => (None, "anon"),
            As::Daemon => (None, "membersync"),
        };
        if let Some(id) = claims {
            tx.query_one(
                "select set_config('request.jwt.claims',
                                   json_build_object('sub', $1::text, 'role', 'authenticated')::text, true)",
                &[&id.to_string()],
            )
            .await
            .expect("set claims");
        }
        tx.batch_execute(&format!("set local role {role}"))
            .await
            .expect("set role");
        tx
    }

    /// Runs one statement as `who` in its own transaction (rolled back) and returns the number
    /// of rows it returned or affected.
    async fn run(&mut self, who: As, sql: &str) -> Result<u64, tokio_postgres::Error> {
        let tx = self.tx(who).await;
        let result = tx.execute(sql, &[]).await;
        drop(tx); // rollback
        result
    }

    /// `memberstack_id`s of the rows of `table` that `who` can see, sorted.
    async fn visible(&mut self, who: As, table: &str) -> Vec<String> {
        let tx = self.tx(who).await;
        let rows = tx
            .query(
                &format!("select memberstack_id from public.{table} order by memberstack_id"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{who:?} selecting from {table}: {e}"));
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Asserts that `sql`, run as `who`, is refused with `insufficient_privilege` (42501), the
    /// code of both "permission denied" and RLS violations; returns the message.
    async fn refused(&mut self, who: As, sql: &str) -> String {
        match self.run(who, sql).await {
            Ok(n) => panic!("{who:?} was allowed to run `{sql}` ({n} rows)"),
            Err(e) => {
                let db = e
                    .as_db_error()
                    .unwrap_or_else(|| panic!("{who:?} `{sql}`: not a server error: {e}"));
                assert_eq!(
                    db.code(),
                    &SqlState::INSUFFICIENT_PRIVILEGE,
                    "{who:?} `{sql}` failed for another reason: {}",
                    db.message()
                );
                db.message().to_owned()
            }
        }
    }

    async fn allowed(&mut self, who: As, sql: &str) -> u64 {
        self.run(who, sql)
            .await
            .unwrap_or_else(|e| panic!("{who:?} `{sql}`: {e}"))
    }
}

fn is_permission_denied(message: &str) -> bool {
    message.starts_with("permission denied") || message.starts_with("must be owner")
}

#[tokio::test]
async fn auth_functions_read_the_jwt_claims() {
    let mut f = Fixture::new().await;
    let tx = f.tx(As::User(USER_A)).await;
    let row = tx
        .query_one("select auth.uid(), auth.role(), auth.jwt() ->> 'sub', auth.email(), current_user::text", &[])
        .await
        .expect("auth functions are callable by authenticated");
    assert_eq!(row.get::<_, Option<Uuid>>(0), Some(USER_A));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("authenticated")
    );
    assert_eq!(row.get::<_, Option<String>>(2), Some(USER_A.to_string()));
    assert_eq!(
        row.get::<_, Option<String>>(3),
        None,
        "no email claim was set"
    );
    assert_eq!(row.get::<_, String>(4), "authenticated");
    drop(tx);

    // The older PostgREST form, one setting per claim, is honoured too.
    let tx = f.admin.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "select set_config('request.jwt.claim.sub', '{USER_B}', true); set local role authenticated"
    ))
    .await
    .unwrap();
    let uid: Option<Uuid> = tx.query_one("select auth.uid()", &[]).await.unwrap().get(0);
    assert_eq!(uid, Some(USER_B));
    drop(tx);

    let tx = f.tx(As::UserWithoutClaims).await;
    let uid: Option<Uuid> = tx.query_one("select auth.uid()", &[]).await.unwrap().get(0);
    assert_eq!(uid, None);
}

#[tokio::test]
async fn authenticated_sees_only_its_own_rows() {
    let mut f = Fixture::new().await;
    assert_eq!(f.visible(As::User(USER_A), "members").await, ["mem_a"]);
    assert_eq!(f.visible(As::User(USER_B), "members").await, ["mem_b"]);
    assert_eq!(
        f.visible(As::User(USER_A), "user_logs").await,
        ["mem_a", "mem_a"]
    );
    assert_eq!(f.visible(As::User(USER_B), "user_logs").await, ["mem_b"]);

    // A filter on the other user's id finds nothing (rather than an error).
    let n = f
        .allowed(
            As::User(USER_A),
            &format!("select * from public.members where user_id = '{USER_B}'"),
        )
        .await;
    assert_eq!(n, 0);
    let n = f
        .allowed(
            As::User(USER_A),
            &format!("select * from public.user_logs where user_id = '{USER_B}'"),
        )
        .await;
    assert_eq!(n, 0);

    // Without a `sub` claim auth.uid() is null: nothing matches, not even rows without user.
    assert!(f.visible(As::UserWithoutClaims, "members").await.is_empty());
    assert!(
        f.visible(As::UserWithoutClaims, "user_logs")
            .await
            .is_empty()
    );
    // A user that exists nowhere sees nothing either.
    assert!(
        f.visible(As::User(Uuid::new_v4()), "members")
            .await
            .is_empty()
    );
}

/// Columns of `members` a signed-in user may update (on its own row): the application's data.
const APP_COLUMNS: [&str; 2] = ["project_data", "custom_fields"];

/// Every other column of `members`, with a value a user might try to give it; `{me}` and
/// `{other}` are replaced by the user's and the other user's id. Memberstack owns identity
/// and subscription, the daemon the rest.
const OTHER_COLUMNS: [(&str, &str); 15] = [
    ("usage_stats", "'{\"calls\": 0}'"),
    ("subscription_status", "'active'"),
    ("subscription_status_raw", "'ACTIVE'"),
    ("plan_id", "'pln_paid'"),
    ("email", "'someone.else@example.com'"),
    ("memberstack_id", "'mem_stolen'"),
    ("user_id", "'{other}'"),
    ("user_id", "null"),
    ("user_id", "'{me}'"),
    ("id", "gen_random_uuid()"),
    ("deleted_at", "now()"),
    ("created_at", "now()"),
    ("updated_at", "'2000-01-01T00:00:00Z'"),
    ("last_synced_at", "now()"),
    // V17: which member a Stripe customer's events go to is Memberstack's to say.
    ("stripe_customer_id", "'cus_someone_else'"),
];

/// What the fixture's members rows were created with.
const FIXTURE_UPDATED_AT: &str = "2001-01-01T00:00:00Z";

#[tokio::test]
async fn authenticated_updates_the_application_columns_of_its_own_row() {
    let mut f = Fixture::new().await;

    for column in APP_COLUMNS {
        let tx = f.tx(As::User(USER_A)).await;
        // PostgREST's PATCH with `Prefer: return=representation` is an UPDATE ... RETURNING.
        let row = tx
            .query_one(
                &format!(
                    "update public.members set {column} = '{{\"edited\": \"{column}\"}}'
                     where memberstack_id = 'mem_a'
                     returning {column} ->> 'edited', updated_at = now(), updated_at > $1::text::timestamptz"
                ),
                &[&FIXTURE_UPDATED_AT],
            )
            .await
            .unwrap_or_else(|e| panic!("A updates its own {column}: {e}"));
        assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(column));
        assert!(
            row.get::<_, bool>(1) && row.get::<_, bool>(2),
            "the trigger moves updated_at when A updates {column}"
        );
        drop(tx);
    }

    // A no-op update touches the row but keeps updated_at (the trigger's WHEN clause).
    let tx = f.tx(As::User(USER_A)).await;
    let n = tx
        .execute(
            "update public.members set project_data = project_data where memberstack_id = 'mem_a'",
            &[],
        )
        .await
        .expect("no-op update");
    assert_eq!(n, 1);
    let moved: bool = tx
        .query_one(
            "select updated_at <> $1::text::timestamptz from public.members where memberstack_id = 'mem_a'",
            &[&FIXTURE_UPDATED_AT],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!moved, "a no-op update keeps updated_at");
    drop(tx);

    // All three at once, committed; checked as the owner: only they changed.
    let tx = f.tx(As::User(USER_A)).await;
    let n = tx
        .execute(
            "update public.members
                set project_data = '{\"stage\": 2}',
                    custom_fields = custom_fields || '{\"nickname\": \"ace\"}'",
            &[],
        )
        .await
        .expect("A updates its application columns");
    assert_eq!(n, 1, "an unfiltered update reaches A's row only");
    tx.commit().await.unwrap();
    let row = f
        .admin
        .query_one(
            "select project_data::text, usage_stats::text, custom_fields::text, updated_at > $1::text::timestamptz,
                    user_id, email, subscription_status, plan_id, deleted_at is null, last_synced_at is null
             from public.members where memberstack_id = 'mem_a'",
            &[&FIXTURE_UPDATED_AT],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"stage": 2}"#);
    assert_eq!(row.get::<_, String>(1), "{}");
    assert_eq!(row.get::<_, String>(2), r#"{"nickname": "ace"}"#);
    assert!(row.get::<_, bool>(3), "updated_at moved");
    assert_eq!(row.get::<_, Option<Uuid>>(4), Some(USER_A));
    assert_eq!(
        row.get::<_, Option<String>>(5).as_deref(),
        Some("a@example.com")
    );
    assert_eq!(row.get::<_, String>(6), "active");
    assert_eq!(row.get::<_, Option<String>>(7).as_deref(), Some("pln_a"));
    assert!(row.get::<_, bool>(8) && row.get::<_, bool>(9));

    // The table's CHECK constraints still apply to the user's writes.
    let err = f
        .run(
            As::User(USER_A),
            "update public.members set custom_fields = '[1]' where memberstack_id = 'mem_a'",
        )
        .await
        .expect_err("custom_fields must stay an object");
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err}");
}

#[tokio::test]
async fn authenticated_cannot_update_memberstack_owned_or_daemon_columns() {
    let mut f = Fixture::new().await;

    // The lists above cover every column of members: a new column needs a decision here.
    let mut columns: Vec<String> = f
        .admin
        .query(
            "select column_name::text from information_schema.columns
             where table_schema = 'public' and table_name = 'members' order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut listed: Vec<String> = APP_COLUMNS
        .iter()
        .copied()
        .chain(OTHER_COLUMNS.iter().map(|(c, _)| *c))
        .map(str::to_owned)
        .collect();
    listed.sort();
    listed.dedup();
    columns.sort();
    assert_eq!(columns, listed, "columns of public.members");

    // Each user on its own row (B is the free member who would give itself a paid plan).
    for (me, other, mem) in [(USER_A, USER_B, "mem_a"), (USER_B, USER_A, "mem_b")] {
        for (column, value) in OTHER_COLUMNS {
            let value = value
                .replace("{me}", &me.to_string())
                .replace("{other}", &other.to_string());
            let sql = format!(
                "update public.members set {column} = {value} where memberstack_id = '{mem}'"
            );
            let msg = f.refused(As::User(me), &sql).await;
            assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
        }
        // Mixed with an application column, the whole statement is refused.
        let sql = format!(
            "update public.members set project_data = '{{}}', plan_id = 'pln_paid', subscription_status = 'active'
             where memberstack_id = '{mem}'"
        );
        let msg = f.refused(As::User(me), &sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
        // So is an upsert (it needs INSERT).
        let sql = format!(
            "insert into public.members (user_id, memberstack_id, plan_id) values ('{me}', '{mem}', 'pln_paid')
             on conflict (memberstack_id) do update set plan_id = excluded.plan_id"
        );
        let msg = f.refused(As::User(me), &sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }

    // Checked as the owner: nothing changed.
    let rows: Vec<String> = f
        .admin
        .query(
            "select concat_ws(':', memberstack_id, user_id, email, subscription_status, plan_id,
                              (updated_at = $1::text::timestamptz)::text)
             from public.members order by memberstack_id",
            &[&FIXTURE_UPDATED_AT],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [
            format!("mem_a:{USER_A}:a@example.com:active:pln_a:true"),
            format!("mem_b:{USER_B}:b@example.com:free:true"),
            "mem_orphan:orphan@example.com:free:true".to_owned(),
        ]
    );
}

#[tokio::test]
async fn authenticated_cannot_update_another_users_row() {
    let mut f = Fixture::new().await;
    for (sql, expected) in [
        (
            "update public.members set project_data = '{\"pwned\": true}' where memberstack_id = 'mem_b'",
            0,
        ),
        (
            "update public.members set project_data = '{\"pwned\": true}' where memberstack_id = 'mem_orphan'",
            0,
        ),
        (
            "update public.members set custom_fields = '{\"pwned\": true}' where memberstack_id <> 'mem_a'",
            0,
        ),
        // Unfiltered: RLS narrows it to A's own row.
        (
            "update public.members set project_data = '{\"mine\": true}'",
            1,
        ),
    ] {
        let tx = f.tx(As::User(USER_A)).await;
        let n = tx
            .execute(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("`{sql}`: {e}"));
        assert_eq!(n, expected, "`{sql}`");
        tx.commit().await.unwrap();
    }
    // Checked as the owner: B's and the orphan's rows are intact.
    let rows: Vec<String> = f
        .admin
        .query(
            "select memberstack_id || ':' || project_data::text || usage_stats::text || custom_fields::text
             from public.members order by memberstack_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [
            r#"mem_a:{"mine": true}{}{}"#,
            "mem_b:{}{}{}",
            "mem_orphan:{}{}{}"
        ]
    );
}

#[tokio::test]
async fn authenticated_cannot_insert_or_delete_members() {
    let mut f = Fixture::new().await;
    for sql in [
        // Its own row, another user's, one without user, a copy of its own.
        format!(
            "insert into public.members (user_id, memberstack_id) values ('{USER_A}', 'mem_a2')"
        ),
        format!(
            "insert into public.members (user_id, memberstack_id) values ('{USER_B}', 'mem_forged')"
        ),
        "insert into public.members (user_id, memberstack_id) values (null, 'mem_forged')"
            .to_owned(),
        "insert into public.members (user_id, memberstack_id, plan_id)
         select user_id, memberstack_id || '_2', 'pln_paid' from public.members"
            .to_owned(),
        "delete from public.members where memberstack_id = 'mem_a'".to_owned(),
        "delete from public.members where memberstack_id = 'mem_b'".to_owned(),
        "delete from public.members".to_owned(),
    ] {
        let msg = f.refused(As::User(USER_A), &sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }
    let n: i64 = f
        .admin
        .query_one("select count(*) from public.members", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}

#[tokio::test]
async fn authenticated_cannot_write_user_logs() {
    let mut f = Fixture::new().await;
    for sql in [
        format!(
            "insert into public.user_logs (user_id, memberstack_id, change_type, source)
             values ('{USER_A}', 'mem_a', 'updated', 'supabase')"
        ),
        format!(
            "insert into public.user_logs (user_id, change_type, source) values ('{USER_B}', 'updated', 'supabase')"
        ),
        "insert into public.user_logs (change_type, source) values ('updated', 'supabase')"
            .to_owned(),
        // Rewriting or erasing its own audit trail, or another user's.
        "update public.user_logs set new_data = '{}' where memberstack_id = 'mem_a'".to_owned(),
        format!("update public.user_logs set user_id = '{USER_B}' where memberstack_id = 'mem_a'"),
        "update public.user_logs set source = 'supabase' where memberstack_id = 'mem_b'".to_owned(),
        "delete from public.user_logs where memberstack_id = 'mem_a'".to_owned(),
        "delete from public.user_logs where memberstack_id = 'mem_b'".to_owned(),
        "delete from public.user_logs".to_owned(),
    ] {
        let msg = f.refused(As::User(USER_A), &sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }
    let rows: Vec<String> = f
        .admin
        .query(
            "select concat_ws(':', memberstack_id, user_id, change_type, source, new_data::text)
             from public.user_logs order by memberstack_id, change_type",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [
            format!("mem_a:{USER_A}:created:memberstack:{{}}"),
            format!(r#"mem_a:{USER_A}:subscription_updated:stripe:{{"status": "active"}}"#),
            format!("mem_b:{USER_B}:created:memberstack:{{}}"),
            "mem_orphan:created:memberstack:{}".to_owned(),
        ]
    );
}

#[tokio::test]
async fn authenticated_is_refused_on_internal_tables() {
    let mut f = Fixture::new().await;
    for table in ["error_logs", "webhook_log", "audit_logs", "sync_state"] {
        let msg = f
            .refused(As::User(USER_A), &format!("select * from public.{table}"))
            .await;
        assert!(is_permission_denied(&msg), "{table}: {msg}");
        let msg = f
            .refused(As::User(USER_A), &format!("delete from public.{table}"))
            .await;
        assert!(is_permission_denied(&msg), "{table}: {msg}");
    }
    for sql in [
        "insert into public.error_logs (error_type, error_message) values ('x', 'y')",
        "insert into public.webhook_log (event_id, source) values ('forged', 'memberstack')",
        "insert into public.audit_logs (actor, action) values ('me', 'forged')",
        "insert into public.sync_state (memberstack_id, field, last_synced_at) values ('mem_a', 'email', now())",
        // TRUNCATE ignores RLS: it must not be granted at all.
        "truncate public.members",
        "truncate public.user_logs",
    ] {
        let msg = f.refused(As::User(USER_A), sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }
}

#[tokio::test]
async fn anon_gets_nothing() {
    let mut f = Fixture::new().await;
    for table in [
        "members",
        "user_logs",
        "error_logs",
        "webhook_log",
        "audit_logs",
        "sync_state",
    ] {
        let msg = f
            .refused(As::Anon, &format!("select * from public.{table}"))
            .await;
        assert!(is_permission_denied(&msg), "{table}: {msg}");
    }
    for sql in [
        "insert into public.members (memberstack_id) values ('mem_anon')",
        "update public.members set plan_id = 'x'",
        "delete from public.members",
        "insert into public.user_logs (change_type, source) values ('created', 'supabase')",
        "insert into public.webhook_log (event_id, source) values ('forged', 'memberstack')",
        "truncate public.members",
    ] {
        let msg = f.refused(As::Anon, sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }
    // anon may still call the auth helpers (as on Supabase), which say "nobody".
    let tx = f.tx(As::Anon).await;
    let uid: Option<Uuid> = tx.query_one("select auth.uid()", &[]).await.unwrap().get(0);
    assert_eq!(uid, None);
}

#[tokio::test]
async fn daemon_role_can_do_its_writes() {
    let mut f = Fixture::new().await;
    let tx = f.tx(As::Daemon).await;

    // It sees every member, whatever user_id (its policy lets it through RLS).
    let n = tx
        .execute("select 1 from public.members", &[])
        .await
        .expect("daemon reads members");
    assert_eq!(n, 3);

    // Upsert members: insert, then update through on conflict.
    let upsert = "insert into public.members (memberstack_id, email, subscription_status, subscription_status_raw, plan_id, last_synced_at)
                  values ($1, $2, 'active', 'ACTIVE', 'pln_1', now())
                  on conflict (memberstack_id) do update
                    set email = excluded.email, subscription_status = excluded.subscription_status,
                        subscription_status_raw = excluded.subscription_status_raw,
                        plan_id = excluded.plan_id, last_synced_at = excluded.last_synced_at";
    assert_eq!(
        tx.execute(upsert, &[&"mem_new", &"new@example.com"])
            .await
            .expect("insert member"),
        1
    );
    assert_eq!(
        tx.execute(upsert, &[&"mem_new", &"renamed@example.com"])
            .await
            .expect("upsert member"),
        1
    );
    assert_eq!(
        tx.execute(upsert, &[&"mem_a", &"a2@example.com"])
            .await
            .expect("upsert A's member"),
        1
    );
    let n = tx
        .execute(
            "update public.members set deleted_at = now() where memberstack_id = 'mem_b'",
            &[],
        )
        .await
        .expect("soft delete");
    assert_eq!(n, 1);

    // Logs.
    tx.execute(
        "insert into public.user_logs (user_id, memberstack_id, change_type, old_data, new_data, source)
         values ($1, 'mem_a', 'conflict_resolved', '{}', '{}', 'membersync')",
        &[&USER_A],
    )
    .await
    .expect("insert user_logs");
    tx.execute(
        "insert into public.error_logs (memberstack_id, error_type, error_message, context, retry_count)
         values ('mem_a', 'sync_failed', 'timeout', '{\"attempt\": 3}', 3)",
        &[],
    )
    .await
    .expect("insert error_logs");
    tx.execute("insert into public.audit_logs (actor, action, target) values ('membersync', 'backfill', 'all')", &[])
        .await
        .expect("insert audit_logs");
    let n = tx
        .execute("select 1 from public.error_logs", &[])
        .await
        .expect("daemon reads error_logs");
    assert_eq!(n, 2);

    // webhook_log deduplication: the second insert of one event id does nothing.
    let dedup = "insert into public.webhook_log (event_id, source, event_type, memberstack_id, payload, result)
                 values ($1, 'memberstack', 'member.updated', 'mem_a', '{}', '{\"applied\": true}')
                 on conflict (event_id) do nothing";
    assert_eq!(
        tx.execute(dedup, &[&"msg_2"])
            .await
            .expect("insert webhook_log"),
        1
    );
    assert_eq!(
        tx.execute(dedup, &[&"msg_2"])
            .await
            .expect("duplicate webhook_log"),
        0
    );
    assert_eq!(
        tx.execute(dedup, &[&"msg_1"])
            .await
            .expect("duplicate of the fixture's event"),
        0
    );
    let n = tx
        .execute(
            "select 1 from public.webhook_log where event_id = 'msg_2'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);

    // sync_state upsert and delete.
    let state = "insert into public.sync_state (memberstack_id, field, last_synced_at, last_value, last_pushed_value, last_source)
                 values ('mem_a', 'email', now(), $1, $1, 'memberstack')
                 on conflict (memberstack_id, field) do update
                   set last_synced_at = excluded.last_synced_at, last_value = excluded.last_value,
                       last_pushed_value = excluded.last_pushed_value, last_source = excluded.last_source";
    let value = serde_json::json!("a2@example.com");
    assert_eq!(
        tx.execute(state, &[&value])
            .await
            .expect("upsert sync_state"),
        1
    );
    assert_eq!(
        tx.execute(
            "delete from public.sync_state where memberstack_id = 'mem_new'",
            &[]
        )
        .await
        .expect("delete sync_state"),
        0
    );

    // The origin marker, the CDC's single-active lock and its slot view.
    let lsn: Option<String> = tx
        .query_one(
            "select pg_logical_emit_message(true, 'membersync.origin', 'x')::text",
            &[],
        )
        .await
        .expect("pg_logical_emit_message")
        .get(0);
    assert!(lsn.is_some());
    let locked: bool = tx
        .query_one("select pg_try_advisory_xact_lock(4242)", &[])
        .await
        .expect("advisory lock")
        .get(0);
    assert!(locked);
    tx.query(
        "select slot_name, confirmed_flush_lsn from pg_replication_slots",
        &[],
    )
    .await
    .expect("read pg_replication_slots");
    let n = tx
        .execute(
            "select 1 from pg_publication_tables where pubname = 'membersync'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    tx.commit().await.expect("commit the daemon's writes");

    let email: Option<String> = f
        .admin
        .query_one(
            "select email from public.members where memberstack_id = 'mem_new'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(email.as_deref(), Some("renamed@example.com"));
}

#[tokio::test]
async fn daemon_role_cannot_change_the_schema_or_delete_members() {
    let mut f = Fixture::new().await;
    for sql in [
        "drop table public.members",
        "drop table public.user_logs",
        "alter table public.members add column pwned text",
        "alter table public.members disable row level security",
        "alter table public.sync_state no force row level security",
        "drop policy members_select_own on public.members",
        "create policy pwned on public.members for select to anon using (true)",
        "truncate public.members",
        "truncate public.sync_state",
        "delete from public.members",
        "delete from public.user_logs",
        "update public.user_logs set source = 'supabase'",
        "delete from public.webhook_log",
        "update public.audit_logs set action = 'x'",
        "create table public.pwned (id int)",
        "alter publication membersync drop table public.members",
    ] {
        let msg = f.refused(As::Daemon, sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }
}

/// The same, through a real login as the daemon (`database.user` with its dev password), the
/// way `membersync` connects.
#[tokio::test]
async fn daemon_login_is_least_privileged() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    admin
        .execute(
            "insert into public.members (memberstack_id) values ('mem_1'), ('mem_2')",
            &[],
        )
        .await
        .unwrap();
    let daemon = connect(&db.db_config(), Login::Daemon)
        .await
        .expect("the daemon role logs in");

    let who = daemon
        .query_one(
            "select current_user::text, r.rolsuper, r.rolbypassrls, r.rolreplication
             from pg_roles r where r.rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(who.get::<_, String>(0), "membersync");
    assert!(!who.get::<_, bool>(1), "membersync must not be superuser");
    assert!(!who.get::<_, bool>(2), "membersync must not have BYPASSRLS");
    assert!(
        who.get::<_, bool>(3),
        "membersync needs REPLICATION for its slot"
    );

    assert_eq!(
        daemon
            .execute("select 1 from public.members", &[])
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        daemon
            .execute(
                "update public.members set plan_id = 'pln_x' where memberstack_id = 'mem_1'",
                &[]
            )
            .await
            .unwrap(),
        1
    );
    for sql in [
        "delete from public.members",
        "drop table public.members",
        "truncate public.members",
    ] {
        let err = daemon.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "`{sql}`: {err}"
        );
    }

    // It owns nothing in public.
    let owned: i64 = admin
        .query_one(
            "select count(*) from pg_class c
             where c.relnamespace = 'public'::regnamespace and pg_get_userbyid(c.relowner) = 'membersync'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owned, 0);
}

/// V13: a signed-in user cannot store a value that would make its row's change event too
/// large for Kafka (one user could otherwise stall CDC for everyone); a value under the limit
/// still goes through, and so does the daemon's own write of a Memberstack-sized value.
#[tokio::test]
async fn authenticated_cannot_store_oversized_application_values() {
    let mut f = Fixture::new().await;
    for column in APP_COLUMNS {
        let huge = format!(
            "update public.members set {column} = jsonb_build_object('blob', repeat('x', 1300000))
             where memberstack_id = 'mem_a'"
        );
        match f.run(As::User(USER_A), &huge).await {
            Ok(n) => panic!("A stored a 1.3 MB {column} ({n} rows)"),
            Err(e) => {
                let db = e.as_db_error().expect("a server error");
                assert_eq!(
                    db.code(),
                    &SqlState::CHECK_VIOLATION,
                    "{column}: {}",
                    db.message()
                );
                assert_eq!(
                    db.constraint(),
                    Some(format!("members_{column}_size").as_str())
                );
            }
        }
        // Just under the limit (65,536 bytes of JSON text): allowed.
        let fits = format!(
            "update public.members set {column} = jsonb_build_object('blob', repeat('x', 65500))
             where memberstack_id = 'mem_a'"
        );
        assert_eq!(f.allowed(As::User(USER_A), &fits).await, 1, "{column}");
        let daemon = format!(
            "update public.members set {column} = jsonb_build_object('plan', repeat('y', 20000))
             where memberstack_id = 'mem_b'"
        );
        assert_eq!(f.allowed(As::Daemon, &daemon).await, 1, "{column}");
    }
}

/// Issue #16, item 8: `usage_stats` is the application's metering (Supabase owns usage logs):
/// a signed-in member may not write it, even on its own row (V15). An application that wants
/// members to write it grants it back (docs/schema.md), which works as before.
#[tokio::test]
async fn authenticated_cannot_update_its_usage_stats_unless_granted() {
    let mut f = Fixture::new().await;
    for sql in [
        "update public.members set usage_stats = '{\"calls\": 0}' where memberstack_id = 'mem_a'",
        "update public.members set usage_stats = usage_stats || '{\"calls\": 1}'",
        "update public.members set project_data = '{}', usage_stats = '{}' where memberstack_id = 'mem_a'",
    ] {
        let msg = f.refused(As::User(USER_A), sql).await;
        assert!(is_permission_denied(&msg), "`{sql}`: {msg}");
    }
    // The daemon still writes it (merge applies Memberstack-side values of the field).
    let n = f
        .run(
            As::Daemon,
            "update public.members set usage_stats = '{\"calls\": 3}' where memberstack_id = 'mem_a'",
        )
        .await
        .expect("the daemon updates usage_stats");
    assert_eq!(n, 1);

    // Granted back by the application: its own row only, as for the other columns.
    f.admin
        .batch_execute("grant update (usage_stats) on public.members to authenticated")
        .await
        .unwrap();
    let n = f
        .run(
            As::User(USER_A),
            "update public.members set usage_stats = '{\"calls\": 4}'",
        )
        .await
        .expect("granted back");
    assert_eq!(n, 1, "RLS still limits it to A's row");
}
