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
