//! Test support: connection settings of the local services, a fresh database per test,
//! throw-away Postgres clusters, unique Kafka topic names, and the membersync binary.

#![allow(dead_code)]

pub mod broker;
pub mod cluster;
pub mod daemon;
pub mod kafka;
pub mod partition;

// The host helpers the benches use too (one copy for both).
#[path = "../../../benches/support/host.rs"]
mod host;
pub use host::{free_port, repo_root};

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use membersync::config::DatabaseConfig;
use secrecy::SecretString;
use tokio_postgres::{Client, NoTls};

/// Settings written by `scripts/dev-services up` (`.dev/services.env`), overridable by the
/// process environment.
pub struct Services {
    vars: HashMap<String, String>,
}

impl Services {
    pub fn get() -> &'static Services {
        static SERVICES: OnceLock<Services> = OnceLock::new();
        SERVICES.get_or_init(|| {
            let file = repo_root().join(".dev/services.env");
            let mut vars: HashMap<String, String> = std::fs::read_to_string(&file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                .collect();
            for (k, v) in std::env::vars() {
                if k.starts_with("MEMBERSYNC_DEV_") {
                    vars.insert(k, v);
                }
            }
            assert!(
                vars.contains_key("MEMBERSYNC_DEV_PG_PORT") && vars.contains_key("MEMBERSYNC_DEV_KAFKA_BROKERS"),
                "the local services are not set up ({} missing): run `scripts/dev-services up` first \
                 (scripts/test does it for you)",
                file.display()
            );
            Services { vars }
        })
    }

    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from .dev/services.env"))
    }

    pub fn pg_host(&self) -> &str {
        self.var("MEMBERSYNC_DEV_PG_HOST")
    }

    pub fn pg_port(&self) -> u16 {
        self.var("MEMBERSYNC_DEV_PG_PORT")
            .parse()
            .expect("numeric port")
    }

    pub fn pg_bin(&self) -> PathBuf {
        PathBuf::from(self.var("MEMBERSYNC_DEV_PG_BIN"))
    }

    pub fn superuser_password(&self) -> String {
        let file = self.var("MEMBERSYNC_DEV_PG_SUPERUSER_PASSWORD_FILE");
        std::fs::read_to_string(file)
            .expect("superuser password file")
            .trim()
            .to_owned()
    }

    pub fn kafka_brokers(&self) -> &str {
        self.var("MEMBERSYNC_DEV_KAFKA_BROKERS")
    }

    /// A superuser connection to `dbname` on the dev cluster; panics with a clear message if
    /// Postgres is down.
    pub async fn superuser(&self, dbname: &str) -> Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(self.pg_host())
            .port(self.pg_port())
            .user(self.var("MEMBERSYNC_DEV_PG_SUPERUSER"))
            .password(self.superuser_password())
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = cfg.connect(NoTls).await.unwrap_or_else(|e| {
            panic!("cannot reach the dev Postgres ({e}): run `scripts/dev-services up`")
        });
        tokio::spawn(conn);
        client
    }
}

/// A name no other test (or test run) uses: `<prefix>_<pid>_<n>_<random>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}_{n}_{}", std::process::id(), &random[..8])
}

/// A fresh database on the dev cluster, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// A new database with the Supabase stand-in (`scripts/supabase-bootstrap.sql`) applied.
    pub async fn bootstrapped() -> TestDb {
        let services = Services::get();
        let name = unique_name("t");
        services
            .superuser("postgres")
            .await
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create test database");
        let db = TestDb { name };
        let bootstrap = std::fs::read_to_string(repo_root().join("scripts/supabase-bootstrap.sql"))
            .expect("scripts/supabase-bootstrap.sql");
        db.admin()
            .await
            .batch_execute(&bootstrap)
            .await
            .expect("apply the Supabase bootstrap");
        db
    }

    /// [`TestDb::bootstrapped`] plus membersync's migrations.
    pub async fn migrated() -> TestDb {
        let db = Self::bootstrapped().await;
        let mut client = db.admin().await;
        membersync::db::migrate::migrate(&mut client)
            .await
            .expect("migrations apply");
        db
    }

    /// A libpq-style connection string for the superuser on this database (the Supabase Auth
    /// simulator writes `auth.users` through it).
    pub fn superuser_dsn(&self) -> String {
        let s = Services::get();
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host={} port={} user={} password={} dbname={}",
            s.pg_host(),
            s.pg_port(),
            quote(s.var("MEMBERSYNC_DEV_PG_SUPERUSER")),
            quote(&s.superuser_password()),
            self.name
        )
    }

    /// A new superuser connection to this database.
    pub async fn admin(&self) -> Client {
        Services::get().superuser(&self.name).await
    }

    /// Settings for membersync: the daemon role with its dev password, the superuser as admin.
    pub fn db_config(&self) -> DatabaseConfig {
        let s = Services::get();
        let daemon_password = std::fs::read_to_string(s.var("MEMBERSYNC__DATABASE__PASSWORD_FILE"))
            .expect("membersync password file")
            .trim()
            .to_owned();
        DatabaseConfig {
            host: s.pg_host().to_owned(),
            port: s.pg_port(),
            dbname: self.name.clone(),
            user: "membersync".into(),
            password: Some(SecretString::from(daemon_password)),
            admin_user: s.var("MEMBERSYNC_DEV_PG_SUPERUSER").to_owned(),
            admin_password: Some(SecretString::from(s.superuser_password())),
            ..DatabaseConfig::default()
        }
    }

    /// This database's replication slot name (slots are cluster-wide; tests must not share).
    pub fn slot(&self) -> String {
        self.name.clone()
    }

    /// The same settings as `MEMBERSYNC__DATABASE__*` variables, for running the binary.
    pub fn env(&self) -> Vec<(String, String)> {
        let s = Services::get();
        vec![
            ("MEMBERSYNC__DATABASE__HOST".into(), s.pg_host().into()),
            ("MEMBERSYNC__DATABASE__PORT".into(), s.pg_port().to_string()),
            ("MEMBERSYNC__DATABASE__DBNAME".into(), self.name.clone()),
            ("MEMBERSYNC__DATABASE__USER".into(), "membersync".into()),
            (
                "MEMBERSYNC__DATABASE__PASSWORD_FILE".into(),
                s.var("MEMBERSYNC__DATABASE__PASSWORD_FILE").into(),
            ),
            (
                "MEMBERSYNC__DATABASE__ADMIN_USER".into(),
                s.var("MEMBERSYNC_DEV_PG_SUPERUSER").into(),
            ),
            (
                "MEMBERSYNC__DATABASE__ADMIN_PASSWORD_FILE".into(),
                s.var("MEMBERSYNC_DEV_PG_SUPERUSER_PASSWORD_FILE").into(),
            ),
            // Slots are cluster-wide: each test database gets its own.
            ("MEMBERSYNC__CDC__SLOT".into(), self.slot()),
        ]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime; use a private one on a plain thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = Services::get().superuser("postgres").await;
                // A logical slot keeps its database from being dropped, and slots are a
                // cluster-wide budget (max_replication_slots) that parallel tests share.
                let _ = client
                    .execute(
                        "select pg_terminate_backend(active_pid) from pg_replication_slots
                          where database = $1 and active_pid is not null",
                        &[&name],
                    )
                    .await;
                for _ in 0..50 {
                    let dropped = client
                        .execute(
                            "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                              where database = $1 and not active",
                            &[&name],
                        )
                        .await;
                    let left: i64 = client
                        .query_one(
                            "select count(*) from pg_replication_slots where database = $1",
                            &[&name],
                        )
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
                    if dropped.is_ok() && left == 0 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                client
                    .batch_execute(&format!("drop database if exists {name} with (force)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// The membersync binary with a clean environment (only PATH and HOME survive), so that the
/// developer's own `MEMBERSYNC__*` variables cannot leak into a test.
pub fn membersync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_membersync"));
    cmd.env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd
}

/// Polls `probe` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
