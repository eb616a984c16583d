//! `membersync check` against real services: all ✓ on the local stack, precise ✗ and hints
//! where a prerequisite is missing.

use std::process::Output;

use crate::support::{self, TestDb, cluster::TempCluster, membersync};

fn run_check(env: &[(String, String)]) -> (Output, String) {
    let out = membersync()
        .arg("check")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn kafka_env(prefix: &str) -> Vec<(String, String)> {
    vec![
        (
            "MEMBERSYNC__KAFKA__BROKERS".into(),
            support::Services::get().kafka_brokers().into(),
        ),
        ("MEMBERSYNC__KAFKA__TOPIC_PREFIX".into(), prefix.into()),
    ]
}

#[tokio::test]
async fn all_items_pass_against_the_local_services() {
    let db = TestDb::migrated().await;
    let prefix = support::kafka::config().topic_prefix;
    let mut env = db.env();
    env.extend(kafka_env(&prefix));
    env.push(("MEMBERSYNC__CDC__SLOT".into(), support::unique_name("slot")));
    let (out, stdout) = run_check(&env);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for label in [
        "✓ postgres connection",
        "✓ server version: PostgreSQL 15",
        "✓ wal_level: logical",
        "✓ replication privilege",
        "✓ replication slots",
        "✓ slot ",
        "✓ publication membersync: publishes public.members",
        "✓ schema migrations",
        "✓ kafka broker",
        &format!("✓ topic {prefix}.memberstack"),
        &format!("✓ topic {prefix}.cdc.public.members"),
        &format!("✓ topic {prefix}.dlq"),
    ] {
        assert!(stdout.contains(label), "missing {label:?} in:\n{stdout}");
    }
    assert!(!stdout.contains('✗'), "{stdout}");
}

#[tokio::test]
async fn unmigrated_database_is_reported_with_the_fix() {
    let db = TestDb::bootstrapped().await;
    let mut env = db.env();
    env.extend(kafka_env(&support::kafka::config().topic_prefix));
    let (out, stdout) = run_check(&env);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("✗ publication membersync: missing, and this role may not create it"),
        "{stdout}"
    );
    assert!(stdout.contains("run `membersync migrate`"), "{stdout}");
    assert!(stdout.contains("✗ schema migrations"), "{stdout}");
}

#[tokio::test]
async fn wal_level_replica_is_a_failure_with_a_hint() {
    let cluster = TempCluster::start(&["wal_level = replica"]);
    let wal_level: String = cluster
        .connect()
        .await
        .query_one("show wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "replica");
    let mut env = vec![
        (
            "MEMBERSYNC__DATABASE__HOST".to_string(),
            "127.0.0.1".to_string(),
        ),
        (
            "MEMBERSYNC__DATABASE__PORT".into(),
            cluster.port.to_string(),
        ),
        ("MEMBERSYNC__DATABASE__USER".into(), "postgres".into()),
    ];
    env.extend(kafka_env(&support::kafka::config().topic_prefix));
    let (out, stdout) = run_check(&env);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("✗ wal_level: replica (logical decoding is off)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fix: run `ALTER SYSTEM SET wal_level = 'logical'`"),
        "{stdout}"
    );
    assert!(stdout.contains("✓ postgres connection"), "{stdout}");
    assert!(
        stdout.contains("✗ slot membersync: missing and cannot be created"),
        "{stdout}"
    );
}

#[tokio::test]
async fn role_without_replication_is_reported() {
    let db = TestDb::migrated().await;
    // A throw-away login role without REPLICATION, in place of the daemon role.
    let role = support::unique_name("norepl");
    let admin = db.admin().await;
    admin
        .batch_execute(&format!("create role {role} login password 'pw-{role}'"))
        .await
        .unwrap();
    let mut env: Vec<(String, String)> = db
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("MEMBERSYNC__DATABASE__PASSWORD"))
        .collect();
    env.retain(|(k, _)| k != "MEMBERSYNC__DATABASE__USER");
    env.push(("MEMBERSYNC__DATABASE__USER".into(), role.clone()));
    env.push((
        "MEMBERSYNC__DATABASE__PASSWORD".into(),
        format!("pw-{role}"),
    ));
    env.extend(kafka_env(&support::kafka::config().topic_prefix));
    let (out, stdout) = run_check(&env);
    admin.batch_execute(&format!("drop role {role}")).await.ok();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "✗ replication privilege: role {role} lacks REPLICATION"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&format!("pw-{role}")),
        "password leaked: {stdout}"
    );
}

/// The duty roles of V14 as a superuser session sees them with `set role`: merge writes the
/// synced record but nothing of CDC's or the tools', the API reads and writes nothing, neither
/// may replicate.
#[tokio::test]
async fn duty_roles_have_exactly_their_duties() {
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    let as_role = |role: &'static str, sql: &'static str| {
        let admin = &admin;
        async move {
            let result = admin
                .batch_execute(&format!("begin; set local role {role}; {sql}; rollback"))
                .await;
            let _ = admin.batch_execute("rollback").await;
            result.map_err(|e| {
                e.as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string())
            })
        }
    };
    // Merge: the record and its bookkeeping.
    for sql in [
        "insert into public.members (memberstack_id) values ('mem_duty')",
        "update public.members set email = 'a@example.com' where memberstack_id = 'mem_duty'",
        "select * from public.members for update",
        "insert into public.webhook_log (event_id, source, event_type) values ('e1', 'memberstack', 'member.updated')",
        "select * from public.sync_state",
        "select * from membersync_meta.member_column_edits",
        "select membersync_meta.auth_user_id_by_email('a@example.com')",
        "select pg_logical_emit_message(true, 'membersync.test', '')",
        // V16: the unreplayed dead-letter gauge.
        "select count(*) from public.audit_logs",
        // V17: a member's resync, recorded when merge applies it.
        "insert into public.audit_logs (actor, action) values ('merge', 'member_resync')",
    ] {
        assert_eq!(
            as_role("membersync_merge", sql).await,
            Ok(()),
            "merge: {sql}"
        );
    }
    for sql in [
        "delete from public.members",
        "delete from public.audit_logs",
        "select * from membersync_meta.cdc_incremental_snapshots",
        "select * from membersync_meta.backfill_runs",
        "select pg_create_logical_replication_slot('duty_merge_slot', 'pgoutput')",
    ] {
        let refused = as_role("membersync_merge", sql).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|m| m.contains("permission denied")
                    || m.contains(
                        "must be superuser or have privileges of the pg_read_all_stats role"
                    )
                    || m.contains("replication")),
            "merge may not: {sql} → {refused:?}"
        );
    }
    // API: reads only.
    for sql in [
        "select * from public.members",
        "select * from public.sync_state",
        "select * from public.error_logs",
        "select * from public.audit_logs",
        "insert into public.audit_logs (actor, action) values ('admin-api', 'admin_dlq_list')",
        "select * from pg_replication_slots",
    ] {
        assert_eq!(as_role("membersync_api", sql).await, Ok(()), "api: {sql}");
    }
    for sql in [
        "insert into public.members (memberstack_id) values ('mem_api')",
        "update public.members set email = null",
        "delete from public.sync_state",
        "insert into public.error_logs (error_type, error_message) values ('x', 'y')",
        // Its own audit rows only (V19): never one that marks a dead letter replayed.
        "insert into public.audit_logs (actor, action) values ('admin-api', 'dlq_replay')",
        "insert into public.audit_logs (actor, action) values ('cli', 'admin_x')",
        "update public.audit_logs set action = 'x'",
        "delete from public.audit_logs",
        "select * from public.webhook_log",
        "select * from membersync_meta.member_column_edits",
        "select pg_create_logical_replication_slot('duty_api_slot', 'pgoutput')",
    ] {
        let refused = as_role("membersync_api", sql).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|m| m.contains("permission denied")
                    || m.contains("row-level security")
                    || m.contains("replication")),
            "api may not: {sql} → {refused:?}"
        );
    }
}

/// `check` logs in as each configured duty role and verifies it; a write privilege granted to
/// the API role is a ✗ naming the table.
#[tokio::test]
async fn check_verifies_each_duty_role() {
    const PASSWORD: &str = "duty-role-test-password-0123456789";
    let db = TestDb::migrated().await;
    let admin = db.admin().await;
    // Cluster-wide, like the roles; every test that sets it sets the same value.
    admin
        .batch_execute(&format!(
            "alter role membersync_merge password '{PASSWORD}'; alter role membersync_api password '{PASSWORD}'"
        ))
        .await
        .unwrap();
    let mut env = db.env();
    env.extend(kafka_env(&support::kafka::config().topic_prefix));
    for (k, v) in [
        ("MEMBERSYNC__DATABASE__MERGE_USER", "membersync_merge"),
        ("MEMBERSYNC__DATABASE__MERGE_PASSWORD", PASSWORD),
        ("MEMBERSYNC__DATABASE__API_USER", "membersync_api"),
        ("MEMBERSYNC__DATABASE__API_PASSWORD", PASSWORD),
    ] {
        env.push((k.into(), v.into()));
    }
    let (_, stdout) = run_check(&env);
    assert!(
        stdout.contains("✓ merge role membersync_merge: has what merge needs"),
        "{stdout}"
    );
    assert!(
        stdout.contains("✓ api role membersync_api: has what api needs"),
        "{stdout}"
    );

    // In this database only: the API role may now write members.
    admin
        .batch_execute("grant insert on public.members to membersync_api")
        .await
        .unwrap();
    let (out, stdout) = run_check(&env);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("✗ api role membersync_api: may write public.members"),
        "{stdout}"
    );

    // A wrong password is a ✗ with the fix, not a crash.
    env.retain(|(k, _)| k != "MEMBERSYNC__DATABASE__MERGE_PASSWORD");
    env.push((
        "MEMBERSYNC__DATABASE__MERGE_PASSWORD".into(),
        "wrong-password".into(),
    ));
    let (_, stdout) = run_check(&env);
    assert!(stdout.contains("✗ merge role membersync_merge"), "{stdout}");
    assert!(
        stdout.contains("database.merge_user / merge_password"),
        "{stdout}"
    );
}
