//! The daemon's process frame, end to end: the ops server answers, readiness follows the
//! dependencies, topics are created at start, SIGTERM drains and exits 0.

use membersync::kafka::admin::KafkaAdmin;

use crate::support::{self, TestDb, daemon::Daemon};

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
    let mut daemon = Daemon::start("run", env_for(&db, &kafka.topic_prefix)).await;

    let (status, body) = daemon.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");

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

    let status = daemon.terminate().await;
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
    let daemon = Daemon::start("run", env).await;
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
