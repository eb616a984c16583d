//! The daemon's process frame, end to end: the ops server answers, readiness follows the
//! dependencies, topics are created at start, SIGTERM drains and exits 0.

use std::time::Duration;

use membersync::kafka::admin::KafkaAdmin;

use crate::support::{self, TestDb, broker::Broker, daemon::Daemon, wait_for};

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
    env.push((
        "MEMBERSYNC__TELEMETRY__LIVENESS_TIMEOUT_SECS".into(),
        "2".into(),
    ));
    let started = tokio::time::Instant::now();
    let daemon = Daemon::start("run", env).await;
    let (status, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    // Waiting out the outage (CDC backs off and retries) is not a wedge: alive throughout,
    // for several liveness timeouts.
    while started.elapsed() < Duration::from_secs(8) {
        let (status, body) = daemon.get("/healthz").await.unwrap();
        assert_eq!(status, 200, "alive while Postgres is away: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// Kafka away when the process starts is an outage, not a fatal error: ingest starts, answers
/// webhooks 503 with Retry-After (readiness 503) while Kafka is gone, and 200 once it is back
/// (the topics are created then).
#[tokio::test]
async fn ingest_starts_while_kafka_is_down_and_answers_503_until_it_is_back() {
    use membersync::ingest::verify::svix::SvixVerifier;
    use secrecy::SecretString;

    let mut broker = Broker::start().await;
    broker.stop().await;
    let mut kafka = support::kafka::config();
    kafka.brokers = broker.addr();
    let secret = format!(
        "whsec_{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            uuid::Uuid::new_v4().as_bytes()
        )
    );
    let env: Vec<(String, String)> = [
        ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.clone()),
        (
            "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
            kafka.topic_prefix.clone(),
        ),
        ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1".into()),
        (
            "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS",
            secret.clone(),
        ),
        ("MEMBERSYNC__TELEMETRY__LIVENESS_TIMEOUT_SECS", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let daemon = Daemon::start("ingest", env).await;

    let (status, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");

    let svix = SvixVerifier::new(&[SecretString::from(secret)]).unwrap();
    let http = reqwest::Client::new();
    let post = |id: &'static str| {
        let body =
            serde_json::json!({"event": "member.created", "timestamp": 1_700_000_000_123_i64,
            "payload": {"id": "mem_kafka_down", "auth": {"email": "k@example.com"}}})
            .to_string();
        let ts = chrono::Utc::now().timestamp();
        http.post(format!("{}/webhooks/memberstack", daemon.ingest))
            .header("content-type", "application/json")
            .header("svix-id", id)
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", svix.sign(id, ts, body.as_bytes()))
            .body(body)
            .send()
    };
    let resp = post("msg_kafka_down").await.expect("ingest answers");
    assert_eq!(resp.status().as_u16(), 503);
    // Waiting for Kafka is not a wedge: alive for several liveness timeouts.
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(6) {
        let (status, body) = daemon.get("/healthz").await.unwrap();
        assert_eq!(status, 200, "alive while Kafka is away: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        resp.headers().get("retry-after").is_some(),
        "503 without Retry-After"
    );
    assert!(daemon.child.id() > 0);

    broker.restart().await;
    wait_for(
        "a webhook accepted once Kafka is back",
        Duration::from_secs(60),
        || {
            let sent = post("msg_kafka_back");
            async move { (sent.await.ok()?.status().as_u16() == 200).then_some(()) }
        },
    )
    .await;
    wait_for(
        "readiness once Kafka is back",
        Duration::from_secs(60),
        || {
            let d = &daemon;
            async move { (d.get("/readyz").await?.0 == 200).then_some(()) }
        },
    )
    .await;
}

/// A panic in any task — here a detached one, like a worker whose role only logs its end —
/// fails the process: readiness turns 503 and it exits non-zero for its supervisor.
#[tokio::test]
async fn a_panicking_task_fails_readiness_and_the_process_exits_non_zero() {
    let db = TestDb::migrated().await;
    let kafka = support::kafka::config();
    let mut env = env_for(&db, &kafka.topic_prefix);
    env.push(("MEMBERSYNC_TEST_PANIC_AFTER_MS".into(), "3000".into()));
    let mut daemon = Daemon::start("run", env).await;
    // The panic comes 3 s after the start; the drain after it takes a moment, during which
    // readiness must say why.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut saw_503 = false;
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        if let Some((503, body)) = daemon.get("/readyz").await
            && body.contains("panicked")
        {
            saw_503 = true;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the process did not exit after the panic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "exit status {status:?}");
    eprintln!("readiness 503 seen before the exit: {saw_503}");
}

/// Liveness sees a wedged role: merge's loop blocks on a future that never resolves (the
/// debug-only `MEMBERSYNC_TEST_WEDGE_*` hook) and `/healthz` answers 503 naming merge within
/// `telemetry.liveness_timeout_secs`, while a healthy daemon with the same timeout — its CDC
/// streaming, ingest serving, merge idle — answers 200 throughout.
#[tokio::test]
async fn a_wedged_role_fails_liveness_while_a_healthy_daemon_stays_alive() {
    const TIMEOUT_SECS: u64 = 4;
    let liveness = (
        "MEMBERSYNC__TELEMETRY__LIVENESS_TIMEOUT_SECS".to_owned(),
        TIMEOUT_SECS.to_string(),
    );
    let healthy_db = TestDb::migrated().await;
    let healthy_kafka = support::kafka::config();
    let mut env = env_for(&healthy_db, &healthy_kafka.topic_prefix);
    env.push(liveness.clone());
    let healthy = Daemon::start("run", env).await;

    let wedged_db = TestDb::migrated().await;
    let wedged_kafka = support::kafka::config();
    let mut env = env_for(&wedged_db, &wedged_kafka.topic_prefix);
    env.push(liveness);
    env.push(("MEMBERSYNC_TEST_WEDGE_ROLE".into(), "merge".into()));
    env.push(("MEMBERSYNC_TEST_WEDGE_AFTER_MS".into(), "2000".into()));
    let wedged = Daemon::start("run", env).await;

    let started = tokio::time::Instant::now();
    let mut dead_after = None;
    // Watch both until the wedged one is reported dead, and the healthy one for at least
    // three timeouts.
    while dead_after.is_none() || started.elapsed() < Duration::from_secs(3 * TIMEOUT_SECS) {
        let (status, body) = healthy.get("/healthz").await.expect("healthy /healthz");
        assert_eq!(status, 200, "the healthy daemon must stay alive: {body}");
        if dead_after.is_none()
            && let Some((503, body)) = wedged.get("/healthz").await
        {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["status"], "dead", "{body}");
            let reason = v["roles"]["merge"].as_str().expect(&body);
            assert!(reason.contains("no heartbeat"), "{body}");
            assert_eq!(
                v["roles"].as_object().unwrap().len(),
                1,
                "only merge is wedged: {body}"
            );
            dead_after = Some(started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the wedged merge was not reported within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The wedge comes 2 s after the start, the report a timeout later (and not before it).
    let dead_after = dead_after.unwrap();
    eprintln!("wedged merge reported dead {dead_after:?} after the daemons were up");
    assert!(
        dead_after < Duration::from_secs(2 + TIMEOUT_SECS + 10),
        "{dead_after:?}"
    );
    let (status, body) = wedged.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "readiness says it too: {body}");
    assert!(body.contains("merge"), "{body}");
}

/// Liveness sees a wedged merge applier, not only a wedged consumer loop: the outcome relay
/// blocks on a future that never resolves (as on a database statement that never returns) and
/// `/healthz` answers 503 naming `merge-relay`, while merge's consumer loop still beats.
#[tokio::test]
async fn a_wedged_outbox_relay_fails_liveness() {
    const TIMEOUT_SECS: u64 = 4;
    let db = TestDb::migrated().await;
    let kafka = support::kafka::config();
    let mut env = env_for(&db, &kafka.topic_prefix);
    env.push((
        "MEMBERSYNC__TELEMETRY__LIVENESS_TIMEOUT_SECS".into(),
        TIMEOUT_SECS.to_string(),
    ));
    env.push(("MEMBERSYNC_TEST_WEDGE_ROLE".into(), "merge-relay".into()));
    env.push(("MEMBERSYNC_TEST_WEDGE_AFTER_MS".into(), "2000".into()));
    let daemon = Daemon::start("run", env).await;
    let body = wait_for(
        "/healthz to name the wedged relay",
        Duration::from_secs(30),
        || {
            let d = &daemon;
            async move {
                match d.get("/healthz").await? {
                    (503, body) => Some(body),
                    _ => None,
                }
            }
        },
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let roles = v["roles"].as_object().expect(&body);
    assert!(
        roles["merge-relay"]
            .as_str()
            .is_some_and(|r| r.contains("no heartbeat")),
        "{body}"
    );
    assert!(
        !roles.contains_key("merge"),
        "the consumer loop still beats: {body}"
    );
}

/// `membersync_dlq_unreplayed{topic}`: dead letters on `<prefix>.dlq` minus the distinct
/// ones `audit_logs` records as replayed, computed by the merge role.
#[tokio::test]
async fn the_dead_letter_backlog_counts_the_letters_nobody_replayed() {
    use membersync::kafka::producer::{Producer, Record};

    let db = TestDb::migrated().await;
    let kafka = support::kafka::config();
    let dlq = format!("{}.dlq", kafka.topic_prefix);
    KafkaAdmin::new(&kafka)
        .unwrap()
        .ensure_topics(std::slice::from_ref(&dlq))
        .await
        .unwrap();
    let producer = Producer::new(&kafka, Duration::from_secs(10)).unwrap();
    for i in 0..3 {
        let payload = format!("{{\"id\": \"letter-{i}\"}}");
        producer
            .send(
                &Record {
                    topic: &dlq,
                    key: b"mem_backlog",
                    payload: payload.as_bytes(),
                    headers: &[],
                },
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // Two letters replayed, one of them twice: two replays count.
    db.admin()
        .await
        .batch_execute(
            "insert into public.audit_logs (actor, action, target) values
               ('test', 'dlq_replay', 'letter-0'), ('test', 'dlq_replay', 'letter-0'),
               ('test', 'dlq_replay', 'letter-1'), ('test', 'other_action', 'letter-2')",
        )
        .await
        .unwrap();

    let daemon = Daemon::start("merge", env_for(&db, &kafka.topic_prefix)).await;
    let series = format!("membersync_dlq_unreplayed{{topic=\"{dlq}\"}}");
    wait_for("the backlog gauge", Duration::from_secs(30), || {
        let d = &daemon;
        let series = series.clone();
        async move {
            let (_, text) = d.get("/metrics").await?;
            text.lines().any(|l| l.starts_with(&series)).then_some(())
        }
    })
    .await;
    assert_eq!(daemon.metric(&series).await, 1.0);
}

/// The CDC leader polls its slot's retention from `pg_replication_slots`: the WAL kept since
/// `restart_lsn`, `safe_wal_size` (NaN when `max_slot_wal_keep_size` is unlimited) and
/// `wal_status`, one series per status.
#[tokio::test]
async fn the_cdc_leader_reports_the_slots_retention() {
    let db = TestDb::migrated().await;
    let kafka = support::kafka::config();
    let daemon = Daemon::start("cdc", env_for(&db, &kafka.topic_prefix)).await;
    wait_for("the slot's wal_status", Duration::from_secs(60), || {
        let d = &daemon;
        async move {
            (d.metric("membersync_cdc_slot_wal_status{status=\"reserved\"}")
                .await
                == 1.0)
                .then_some(())
        }
    })
    .await;
    let (_, text) = daemon.get("/metrics").await.unwrap();
    for status in ["extended", "unreserved", "lost"] {
        assert!(
            text.contains(&format!(
                "membersync_cdc_slot_wal_status{{status=\"{status}\"}} 0"
            )),
            "{status}: {text}"
        );
    }
    let retained = text
        .lines()
        .find_map(|l| l.strip_prefix("membersync_cdc_slot_retained_bytes "))
        .expect("retained bytes");
    assert!(retained.trim().parse::<f64>().unwrap() >= 0.0, "{retained}");

    let limit: String = db
        .admin()
        .await
        .query_one("show max_slot_wal_keep_size", &[])
        .await
        .unwrap()
        .get(0);
    let safe = text
        .lines()
        .find_map(|l| l.strip_prefix("membersync_cdc_slot_safe_wal_size_bytes "))
        .expect("safe_wal_size");
    if limit == "-1" {
        assert_eq!(safe.trim(), "NaN", "unlimited: {safe}");
    } else {
        assert!(safe.trim().parse::<f64>().unwrap() > 0.0, "{limit}: {safe}");
    }
}
