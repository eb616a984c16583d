use std::time::Duration;

use super::*;
use crate::sinks::test_server::{MockServer, Reply};

const KEY: &str = "phc_testprojectkey";

fn cfg(url: &str) -> PostHogConfig {
    PostHogConfig {
        host: format!("{url}/"),
        api_key: Some(KEY.into()),
        batch_size: 100,
        flush_interval_ms: 60_000,
        queue_capacity: 1_000,
        request_timeout_ms: 2_000,
        max_attempts: 3,
    }
}

fn ok() -> Reply {
    Reply::json(200, json!({"status": 1}))
}

fn event(i: usize) -> CaptureEvent {
    CaptureEvent::new(
        "sync_completed",
        format!("mem_{i}"),
        &format!("membersync.sync:0:{i}"),
    )
    .with_property("field", "email")
}

fn count(m: &PostHogMetrics, result: &str) -> u64 {
    m.events.with_label_values(&[result]).get()
}

#[test]
fn off_without_api_key() {
    let mut c = cfg("http://127.0.0.1:1");
    c.api_key = None;
    assert!(PostHog::start(&c, None).is_none());
}

#[test]
fn uuid_is_deterministic_per_event_and_key() {
    let a = CaptureEvent::new("sync_completed", "mem_1", "topic:3:1200");
    let b = CaptureEvent::new("sync_completed", "mem_1", "topic:3:1200");
    assert_eq!(a.uuid, b.uuid);
    assert_eq!(a.uuid.get_version_num(), 5);
    assert_eq!(
        a.uuid,
        Uuid::new_v5(&UUID_NAMESPACE, b"sync_completed:topic:3:1200")
    );
    assert_ne!(
        a.uuid,
        CaptureEvent::new("sync_failed", "mem_1", "topic:3:1200").uuid
    );
    assert_ne!(
        a.uuid,
        CaptureEvent::new("sync_completed", "mem_1", "topic:3:1201").uuid
    );
}

#[tokio::test]
async fn batches_by_size_and_flushes_on_shutdown() {
    let server = MockServer::start(ok()).await;
    let (ph, task) = PostHog::start(&cfg(&server.url), None).unwrap();
    let metrics = ph.metrics.clone();
    for i in 0..250 {
        ph.capture(event(i));
    }
    ph.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();

    let reqs = server.requests();
    let sizes: Vec<usize> = reqs
        .iter()
        .map(|r| r.json()["batch"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(count(&metrics, "sent"), 250);
    let body = reqs[0].json();
    assert_eq!(reqs[0].path, "/batch/");
    assert_eq!(body["api_key"], KEY);
    let first = &body["batch"][0];
    assert_eq!(first["event"], "sync_completed");
    assert_eq!(first["distinct_id"], "mem_0");
    assert_eq!(first["properties"]["field"], "email");
    assert_eq!(first["uuid"], event(0).uuid.to_string());
    let ts = first["timestamp"].as_str().unwrap();
    assert!(DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
}

#[tokio::test]
async fn partial_batch_goes_after_the_flush_interval() {
    let server = MockServer::start(ok()).await;
    let mut c = cfg(&server.url);
    c.flush_interval_ms = 100;
    let (ph, _task) = PostHog::start(&c, None).unwrap();
    for i in 0..3 {
        ph.capture(event(i));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "sent without shutdown");
    assert_eq!(reqs[0].json()["batch"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let server = MockServer::start(ok()).await;
    let mut c = cfg(&server.url);
    c.queue_capacity = 5;
    let registry = Registry::new();
    let (ph, task) = PostHog::start(&c, Some(&registry)).unwrap();
    // The test runtime is single-threaded: the sender task cannot run between these calls,
    // so exactly `queue_capacity` events fit.
    for i in 0..20 {
        ph.capture(event(i));
    }
    assert_eq!(ph.metrics.dropped.get(), 15);
    let metrics = ph.metrics.clone();
    ph.shutdown();
    task.await.unwrap();
    assert_eq!(count(&metrics, "dropped"), 15);
    assert_eq!(count(&metrics, "sent"), 5);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("membersync_posthog_dropped_total 15"),
        "{text}"
    );
    assert!(!text.contains(KEY));
}

#[tokio::test]
async fn unauthorized_batch_is_dropped_not_retried() {
    let server = MockServer::start(Reply::json(401, json!({"type": "authentication_error"}))).await;
    let (ph, task) = PostHog::start(&cfg(&server.url), None).unwrap();
    let metrics = ph.metrics.clone();
    for i in 0..3 {
        ph.capture(event(i));
    }
    ph.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.requests().len(), 1);
    assert_eq!(count(&metrics, "failed"), 3);
    assert_eq!(metrics.batches.with_label_values(&["401"]).get(), 1);
}

#[tokio::test]
async fn unavailable_is_retried_then_given_up() {
    let server = MockServer::start(ok()).await;
    server.push(Reply::json(503, json!({"error": "retry"})));
    let (ph, task) = PostHog::start(&cfg(&server.url), None).unwrap();
    let metrics = ph.metrics.clone();
    ph.capture(event(1));
    ph.shutdown();
    task.await.unwrap();
    assert_eq!(server.requests().len(), 2);
    assert_eq!(count(&metrics, "sent"), 1);

    let server = MockServer::start(Reply::json(500, json!({}))).await;
    let (ph, task) = PostHog::start(&cfg(&server.url), None).unwrap();
    let metrics = ph.metrics.clone();
    ph.capture(event(1));
    drop(ph); // dropping the last handle flushes too
    task.await.unwrap();
    assert_eq!(server.requests().len(), 3, "max_attempts");
    assert_eq!(count(&metrics, "failed"), 1);
}

#[tokio::test]
async fn shutdown_is_bounded_when_posthog_hangs() {
    let server = MockServer::start(ok().delay(Duration::from_secs(30))).await;
    let mut c = cfg(&server.url);
    c.request_timeout_ms = 60_000;
    let (ph, task) = PostHog::start(&c, None).unwrap();
    let metrics = ph.metrics.clone();
    ph.capture(event(1));
    ph.shutdown();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(8), task)
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(7));
    assert_eq!(count(&metrics, "failed"), 1);
}
