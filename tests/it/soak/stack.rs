//! Everything private to one soak run: a throw-away Postgres cluster (so it can be restarted),
//! a Tansu broker with SQLite storage (survives its restarts), the simulators, and
//! `membersync run` as a child process that can be SIGKILLed and started again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use membersync::sim::memberstack::{MemberstackConfig, MemberstackSim};
use membersync::sim::posthog::{PostHogConfig, PostHogSim};
use membersync::sim::supabase_auth::{AuthConfig, AuthSim};
use tokio_postgres::Client;

use crate::support::{self, broker::Broker, cluster::TempCluster, daemon::Daemon, free_port};

pub const API_KEY: &str = "sk_sb_soak_key";
pub const SERVICE_KEY: &str = "service-role-soak-key";
pub const POSTHOG_KEY: &str = "phc_soak";
pub const STRIPE_SECRET: &str = "whsec_stripe_soak_secret";
const PARTITIONS: i32 = 3;
/// How long a (re)started daemon may take to report `startup: ok` on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Fields drop in order: the daemon stops before the broker and the cluster.
pub struct Stack {
    pub daemon: Option<Daemon>,
    /// The running daemon's pid (0 while none runs), for the resource sampler.
    pub pid: Arc<AtomicU32>,
    /// Shared with the traffic generators while the fault runner holds the stack.
    pub ms: Arc<MemberstackSim>,
    pub auth: AuthSim,
    pub posthog: PostHogSim,
    pub broker: Broker,
    pub cluster: Arc<TempCluster>,
    pub env: Vec<(String, String)>,
    pub ingest_port: u16,
    pub prefix: String,
    pub group: String,
    pub daemon_log: PathBuf,
    pub starts: u32,
    _secrets: tempfile::TempDir,
}

fn webhook_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

impl Stack {
    pub async fn start(daemon_log: &Path) -> Stack {
        let cluster = Arc::new(TempCluster::start(&[
            "wal_level = logical",
            "max_connections = 100",
        ]));
        let mut admin = cluster.connect().await;
        let bootstrap =
            std::fs::read_to_string(support::repo_root().join("scripts/supabase-bootstrap.sql"))
                .expect("scripts/supabase-bootstrap.sql");
        admin.batch_execute(&bootstrap).await.expect("bootstrap");
        admin
            .batch_execute("create role membersync login replication password 'membersync-soak'")
            .await
            .expect("create the daemon's role");
        membersync::db::migrate::migrate(&mut admin)
            .await
            .expect("migrate");
        let secrets = tempfile::tempdir().expect("tempdir");
        let password = secrets.path().join("password");
        std::fs::write(&password, "membersync-soak").expect("password file");

        let broker = Broker::start().await;
        let ingest_port = free_port();
        let secret = webhook_secret();
        let mut ms_config = MemberstackConfig::new(API_KEY).with_webhook(
            format!("http://127.0.0.1:{ingest_port}/webhooks/memberstack"),
            secret.clone(),
        );
        // Svix retries for hours; a few minutes here outlast every outage the soak injects.
        ms_config.webhook_backoff = [200, 500, 1000, 2000, 3000]
            .into_iter()
            .chain(std::iter::repeat_n(5000, 60))
            .map(Duration::from_millis)
            .collect();
        ms_config.webhook_timeout = Duration::from_secs(10);
        let ms = MemberstackSim::start(ms_config)
            .await
            .expect("memberstack simulator");
        let auth = AuthSim::start(AuthConfig::new(
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                cluster.port
            ),
            SERVICE_KEY,
        ))
        .await
        .expect("auth simulator");
        let posthog = PostHogSim::start(PostHogConfig::new(POSTHOG_KEY))
            .await
            .expect("posthog simulator");

        let prefix = support::unique_name("soak").replace('_', "-");
        let group = support::unique_name("soak-merge");
        let pw = password.display().to_string();
        let env: Vec<(String, String)> = [
            ("MEMBERSYNC__DATABASE__HOST", "127.0.0.1".to_owned()),
            ("MEMBERSYNC__DATABASE__PORT", cluster.port.to_string()),
            ("MEMBERSYNC__DATABASE__DBNAME", "postgres".into()),
            ("MEMBERSYNC__DATABASE__USER", "membersync".into()),
            ("MEMBERSYNC__DATABASE__PASSWORD_FILE", pw.clone()),
            ("MEMBERSYNC__DATABASE__ADMIN_USER", "postgres".into()),
            ("MEMBERSYNC__DATABASE__ADMIN_PASSWORD_FILE", pw),
            ("MEMBERSYNC__CDC__SLOT", "membersync_soak".into()),
            ("MEMBERSYNC__CDC__HEARTBEAT_INTERVAL_SECS", "1".into()),
            ("MEMBERSYNC__CDC__STATUS_INTERVAL_MS", "200".into()),
            ("MEMBERSYNC__KAFKA__BROKERS", broker.addr()),
            ("MEMBERSYNC__KAFKA__TOPIC_PREFIX", prefix.clone()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PARTITIONS",
                PARTITIONS.to_string(),
            ),
            ("MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS", secret),
            (
                "MEMBERSYNC__INGEST__STRIPE_WEBHOOK_SECRETS",
                STRIPE_SECRET.into(),
            ),
            ("MEMBERSYNC__MEMBERSTACK__API_URL", ms.base_url()),
            ("MEMBERSYNC__MEMBERSTACK__API_KEY", API_KEY.into()),
            ("MEMBERSYNC__MEMBERSTACK__BACKOFF_BASE_MS", "100".into()),
            ("MEMBERSYNC__MEMBERSTACK__BACKOFF_MAX_MS", "2000".into()),
            ("MEMBERSYNC__SUPABASE__URL", auth.base_url()),
            ("MEMBERSYNC__SUPABASE__SERVICE_ROLE_KEY", SERVICE_KEY.into()),
            ("MEMBERSYNC__POSTHOG__HOST", posthog.base_url()),
            ("MEMBERSYNC__POSTHOG__API_KEY", POSTHOG_KEY.into()),
            ("MEMBERSYNC__POSTHOG__FLUSH_INTERVAL_MS", "500".into()),
            ("MEMBERSYNC__MERGE__GROUP_ID", group.clone()),
            // merge.max_attempts stays at its default (3): an outage longer than that is waited
            // out and reported late, never dead-lettered, so any dead letter but the poison is
            // a finding. Backoff capped at 5 s so that recovery is seen within seconds.
            ("MEMBERSYNC__MERGE__BACKOFF_BASE_MS", "250".into()),
            ("MEMBERSYNC__MERGE__BACKOFF_MAX_MS", "5000".into()),
            ("MEMBERSYNC__MERGE__COMMIT_INTERVAL_MS", "200".into()),
            // A SIGKILLed merge instance keeps its partitions until its session expires; 10 s
            // (the minimum an operator would pick for fast fail-over; the default is 45 s)
            // keeps each kill's stall short enough for the 60-s profile.
            ("MEMBERSYNC__MERGE__SESSION_TIMEOUT_MS", "10000".into()),
            ("MEMBERSYNC__SHUTDOWN__DRAIN_TIMEOUT_SECS", "10".into()),
            (
                "MEMBERSYNC__TELEMETRY__LOG_LEVEL",
                "warn,librdkafka=off,rdkafka=off".into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

        let mut stack = Stack {
            daemon: None,
            pid: Arc::new(AtomicU32::new(0)),
            ms: Arc::new(ms),
            auth,
            posthog,
            broker,
            cluster,
            env,
            ingest_port,
            prefix,
            group,
            daemon_log: daemon_log.to_owned(),
            starts: 0,
            _secrets: secrets,
        };
        stack.start_daemon().await;
        stack
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// The topics merge consumes.
    pub fn merge_topics(&self) -> Vec<String> {
        ["memberstack", "stripe", "cdc.public.members"]
            .iter()
            .map(|s| self.topic(s))
            .collect()
    }

    pub fn partitions(&self) -> i32 {
        PARTITIONS
    }

    /// `membersync run` on the fixed ingest port, its log appended to `daemon_log`; returns
    /// once every role has started.
    pub async fn start_daemon(&mut self) {
        let ops_port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .expect("daemon log");
        let child = support::membersync()
            .arg("run")
            .envs(self.env.iter().cloned())
            .env(
                "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
                format!("127.0.0.1:{ops_port}"),
            )
            .env(
                "MEMBERSYNC__INGEST__LISTEN_ADDR",
                format!("127.0.0.1:{}", self.ingest_port),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start membersync run");
        self.pid.store(child.id(), Ordering::Relaxed);
        self.starts += 1;
        let mut daemon = Daemon {
            child,
            ops: format!("http://127.0.0.1:{ops_port}"),
            ingest: format!("http://127.0.0.1:{}", self.ingest_port),
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                panic!(
                    "membersync run exited early with {status}; log {}:\n{}",
                    self.daemon_log.display(),
                    tail(&self.daemon_log, 40)
                );
            }
            if let Some((_, body)) = daemon.get("/readyz").await {
                let ready: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if ready["checks"]["startup"] == "ok" {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "membersync run did not start within {START_TIMEOUT:?}; log:\n{}",
                tail(&self.daemon_log, 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.daemon = Some(daemon);
    }

    /// SIGKILL, as a crash or an OOM kill: no drain, no final offset commit.
    pub fn kill_daemon(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
        }
        self.pid.store(0, Ordering::Relaxed);
    }

    /// SIGTERM, as a deploy or a scale-down: the daemon drains, commits its offsets and leaves
    /// the group. Waits up to 60 s for the exit (then SIGKILL); returns how it exited.
    pub async fn stop_daemon(&mut self) -> String {
        let Some(mut daemon) = self.daemon.take() else {
            return "(not running)".into();
        };
        daemon.signal("TERM");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                break status.to_string();
            }
            if tokio::time::Instant::now() > deadline {
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
                break "killed: no exit 60 s after SIGTERM".into();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.pid.store(0, Ordering::Relaxed);
        status
    }

    /// A superuser connection to the soak's database (the cluster's `postgres`).
    pub async fn admin(&self) -> Client {
        self.cluster.connect().await
    }

    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.cluster.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(3));
        cfg
    }
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
