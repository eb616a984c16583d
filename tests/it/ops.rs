//! The daemon's process frame, end to end: the ops server answers, readiness follows the
//! dependencies, topics are created at start, SIGTERM drains and exits 0.

use std::process::{Child, Stdio};
use std::time::Duration;

use membersync::kafka::admin::KafkaAdmin;

use crate::support::{self, TestDb, membersync, wait_for};

struct Daemon {
    child: Child,
    base: String,
}

impl Daemon {
    fn start(env: Vec<(String, String)>) -> Daemon {
        let port = support::free_port();
        let child = membersync()
            .arg("run")
            .envs(env)
            .env(
                "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
                format!("127.0.0.1:{port}"),
            )
            .env("MEMBERSYNC__SHUTDOWN__DRAIN_TIMEOUT_SECS", "10")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start membersync run");
        Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("{}{path}", self.base)).await.ok()?;
        Some((resp.status().as_u16(), resp.text().await.ok()?))
    }

    fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(status.unwrap().success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_for(db: &TestDb, prefix: &str) -> Vec<(String, String)> {
    let mut env = db.env();
    env.push((
        "MEMBERSYNC__KAFKA__BROKERS".into(),
        support::Services::get().kafka_brokers().into(),
    ));
    env.push(("MEMBERSYNC__KAFKA__TOPIC_PREFIX".into(), prefix.into()));
    env
}

#[tokio::test]
async fn serves_metrics_health_and_readiness_then_drains_on_sigterm() {
    let db = TestDb::migrated().await;
    let kafka = support::kafka::config();
    let mut daemon = Daemon::start(env_for(&db, &kafka.topic_prefix));

    let (status, _) = wait_for("/healthz", Duration::from_secs(30), || {
        daemon.get("/healthz")
    })
    .await;
    assert_eq!(status, 200);

    let (status, body) = daemon.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    let build_info = body
        .lines()
        .find(|l| l.starts_with("membersync_build_info{"))
        .expect(&body);
    assert!(
        build_info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build_info}"
    );
    assert!(build_info.contains("commit=\""), "{build_info}");
    assert!(build_info.ends_with(" 1"), "{build_info}");
    assert!(body.contains("process_resident_memory_bytes"), "{body}");
    assert!(body.contains("process_open_fds"), "{body}");

    let (status, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["checks"]["postgres"], "ok");
    assert_eq!(ready["checks"]["kafka"], "ok");

    // Topics were created at start.
    let info = KafkaAdmin::new(&kafka)
        .unwrap()
        .cluster_info()
        .await
        .unwrap();
    for topic in ["memberstack", "stripe", "cdc.public.members", "sync", "dlq"] {
        assert!(
            info.topics
                .contains(&format!("{}.{topic}", kafka.topic_prefix)),
            "{topic} missing"
        );
    }

    daemon.signal("TERM");
    let status = wait_for("exit after SIGTERM", Duration::from_secs(15), || {
        let exited = daemon.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn readiness_reports_an_unreachable_database() {
    let db = TestDb::migrated().await;
    let kafka = support::kafka::config();
    let mut env = env_for(&db, &kafka.topic_prefix);
    env.retain(|(k, _)| k != "MEMBERSYNC__DATABASE__PORT");
    env.push((
        "MEMBERSYNC__DATABASE__PORT".into(),
        support::free_port().to_string(),
    ));
    env.push((
        "MEMBERSYNC__DATABASE__CONNECT_TIMEOUT_SECS".into(),
        "1".into(),
    ));
    let daemon = Daemon::start(env);
    wait_for("/healthz", Duration::from_secs(30), || {
        daemon.get("/healthz")
    })
    .await;
    let (status, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["checks"]["kafka"], "ok");
    assert!(
        ready["checks"]["postgres"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{body}"
    );
}
