use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::json;

use super::*;
use crate::sinks::test_server::{MockServer, Reply, max_in_window};

const KEY: &str = "sk_sb_supersecretkey123";

fn cfg(url: &str) -> MemberstackConfig {
    MemberstackConfig {
        api_url: format!("{url}/"),
        api_key: Some(SecretString::from(KEY)),
        requests_per_second: 1_000,
        request_timeout_ms: 2_000,
        max_attempts: 4,
        backoff_base_ms: 10,
        backoff_max_ms: 50,
        ..MemberstackConfig::default()
    }
}

async fn setup(default: Reply) -> (MockServer, MemberstackClient) {
    let server = MockServer::start(default).await;
    let client = MemberstackClient::new(&cfg(&server.url), None).unwrap();
    (server, client)
}

fn member(id: &str) -> serde_json::Value {
    json!({"id": id, "auth": {"email": "a+b@example.com"}, "customFields": {"plan": "pro"}})
}

#[tokio::test]
async fn missing_key_is_not_configured() {
    let mut c = cfg("http://127.0.0.1:1");
    c.api_key = None;
    assert_eq!(
        MemberstackClient::new(&c, None).unwrap_err(),
        MemberstackError::NotConfigured
    );
}

#[tokio::test]
async fn get_member_hit_and_both_kinds_of_miss() {
    let (server, client) = setup(Reply::json(200, json!({"data": null}))).await;
    server.push(Reply::json(200, json!({"data": member("mem_1")})));
    server.push(Reply::json(
        404,
        json!({"code": "not-found", "message": "There is no member with this identifier."}),
    ));

    let hit = client.get_member("a+b@example.com").await.unwrap().unwrap();
    assert_eq!(hit.id, "mem_1");
    assert_eq!(hit.email(), Some("a+b@example.com"));
    assert_eq!(client.get_member("mem_missing").await.unwrap(), None, "404");
    assert_eq!(
        client.get_member("mem_gone").await.unwrap(),
        None,
        "{{data: null}}"
    );

    let reqs = server.requests();
    assert_eq!(reqs.len(), 3, "a miss is not retried");
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].path, "/members/a%2Bb%40example.com");
    assert_eq!(reqs[0].header("x-api-key"), Some(KEY));
}

#[tokio::test]
async fn list_members_sends_the_sdk_query_and_reads_legacy_has_more() {
    let (server, client) = setup(Reply::json(
        200,
        json!({"totalCount": 2, "endCursor": 42, "hasMore": true, "data": [member("mem_1"), member("mem_2")]}),
    ))
    .await;
    let page = client.list_members(Some(7), 500, true).await.unwrap();
    assert_eq!(page.total_count, 2);
    assert_eq!(page.end_cursor, 42);
    assert!(page.has_next_page);
    assert_eq!(
        page.data.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["mem_1", "mem_2"]
    );
    let req = &server.requests()[0];
    assert_eq!(req.path, "/members");
    let query = req.query.clone().unwrap();
    for part in ["first=100", "after=7", "order=ASC", "includeJSON=true"] {
        assert!(query.split('&').any(|p| p == part), "{part} in {query}");
    }
}

#[tokio::test]
async fn update_member_patches_the_body_as_given() {
    let (server, client) = setup(Reply::json(200, json!({"data": member("mem_1")}))).await;
    let patch = json!({"customFields": {"plan": "pro"}, "metaData": {"x": 1}, "json": {"a": [1]}});
    let patch = patch.as_object().unwrap().clone();
    let m = client.update_member("mem_1", &patch).await.unwrap();
    assert_eq!(m.id, "mem_1");
    let req = &server.requests()[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("PATCH", "/members/mem_1")
    );
    assert_eq!(req.json(), serde_json::Value::Object(patch));
    assert!(
        req.header("content-type")
            .unwrap()
            .contains("application/json")
    );
}

#[tokio::test]
async fn plain_text_ok_answers_are_not_parsed() {
    let (server, client) = setup(Reply::text(200, "OK")).await;
    client.add_free_plan("mem_1", "pln_free").await.unwrap();
    client.remove_free_plan("mem_1", "pln_free").await.unwrap();
    client.delete_member("mem_1").await.unwrap();
    server.push(Reply::json(
        404,
        json!({"code": "not-found", "message": "no member"}),
    ));
    client.delete_member("mem_1").await.unwrap();
    let reqs = server.requests();
    assert_eq!(reqs[0].path, "/members/mem_1/add-plan");
    assert_eq!(reqs[0].json(), json!({"planId": "pln_free"}));
    assert_eq!(reqs[1].path, "/members/mem_1/remove-plan");
    assert_eq!(reqs[2].method, "DELETE");
    assert_eq!(reqs.len(), 4);

    server.push(Reply::json(201, json!({"data": member("mem_9")})));
    let created = client
        .create_member(&json!({"email": "n@example.com", "password": "pw"}))
        .await
        .unwrap();
    assert_eq!(created.id, "mem_9");
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let (server, client) = setup(Reply::json(200, json!({"data": member("mem_1")}))).await;
    server.push(
        Reply::json(429, json!({"code": "rate-limited", "message": "slow down"}))
            .header("retry-after", "1"),
    );
    let registry = prometheus::Registry::new();
    let client_with_metrics = MemberstackClient::new(&cfg(&server.url), Some(&registry)).unwrap();
    drop(client);
    let started = Instant::now();
    client_with_metrics
        .get_member("mem_1")
        .await
        .unwrap()
        .unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let m = &client_with_metrics.inner.metrics;
    assert_eq!(m.rate_limited.get(), 1);
    assert_eq!(m.retries.get(), 1);
}

/// A 429 on one request holds back every other request of the client (another clone, another
/// member) for the `Retry-After`, not only the retry of the request that got it.
#[tokio::test]
async fn a_429_pauses_the_other_requests_too() {
    let (server, client) = setup(Reply::json(200, json!({"data": member("mem_1")}))).await;
    server.push(
        Reply::json(429, json!({"code": "rate-limited", "message": "slow down"}))
            .header("retry-after", "1"),
    );
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.get_member("mem_1").await }
    });
    while server.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The 429 has been answered; this request would leave 41 ms later without the pause.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.get_member("mem_2").await.unwrap().unwrap();
    first.await.unwrap().unwrap().unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    let later = reqs[1..].iter().map(|r| r.at.duration_since(reqs[0].at));
    assert!(
        later.clone().all(|gap| gap >= Duration::from_secs(1)),
        "requests left {:?} after the 429",
        later.collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn persistent_429_ends_as_rate_limited() {
    let (server, client) =
        setup(Reply::json(429, json!({"message": "Too many requests"})).header("retry-after", "0"))
            .await;
    let err = client.get_member("mem_1").await.unwrap_err();
    assert_eq!(
        err,
        MemberstackError::RateLimited {
            retry_after: Some(Duration::ZERO)
        }
    );
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 4, "max_attempts");
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let (server, client) = setup(Reply::json(200, json!({"data": member("mem_1")}))).await;
    server.push(Reply::text(500, "boom"));
    server.push(Reply::text(502, "<html>bad gateway</html>"));
    server.push(Reply::json(503, json!({"message": "maintenance"})));
    let m = client.get_member("mem_1").await.unwrap().unwrap();
    assert_eq!(m.id, "mem_1");
    assert_eq!(server.requests().len(), 4);

    // Exhausted: the last server error is returned, and it is retryable.
    let (server, client) = setup(Reply::json(
        503,
        json!({"code": "down", "message": "maintenance"}),
    ))
    .await;
    let err = client.get_member("mem_1").await.unwrap_err();
    assert!(
        matches!(err, MemberstackError::Api { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn client_errors_are_not_retried_and_parsed() {
    let (server, client) = setup(Reply::json(
        422,
        json!({"code": "invalid-email", "message": "Email is invalid"}),
    ))
    .await;
    let patch = json!({"email": "nope"}).as_object().unwrap().clone();
    let err = client.update_member("mem_1", &patch).await.unwrap_err();
    assert_eq!(
        err,
        MemberstackError::Api {
            status: 422,
            code: Some("invalid-email".into()),
            message: "Email is invalid".into()
        }
    );
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), 1);

    server.push(Reply::json(
        400,
        json!({"error": {"code": "bad-plan", "message": "Plan is not free"}}),
    ));
    let err = client.add_free_plan("mem_1", "pln_paid").await.unwrap_err();
    assert!(
        matches!(err, MemberstackError::Api { status: 400, code: Some(ref c), .. } if c == "bad-plan"),
        "{err:?}"
    );
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn timeouts_and_transport_errors() {
    let (server, _) =
        setup(Reply::json(200, json!({"data": null})).delay(Duration::from_millis(500))).await;
    let mut c = cfg(&server.url);
    c.request_timeout_ms = 100;
    c.max_attempts = 2;
    let client = MemberstackClient::new(&c, None).unwrap();
    let err = client.get_member("mem_1").await.unwrap_err();
    assert_eq!(err, MemberstackError::Timeout);
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn api_key_never_shows_in_debug_or_errors() {
    // Nothing listens on port 1: a transport error whose URL holds an email.
    let client = MemberstackClient::new(&cfg("http://127.0.0.1:1"), None).unwrap();
    let debug = format!("{client:?}");
    assert!(!debug.contains(KEY), "{debug}");
    let err = client
        .get_member("secret.person@example.com")
        .await
        .unwrap_err();
    assert!(matches!(err, MemberstackError::Transport(_)), "{err:?}");
    for text in [format!("{err:?}"), err.to_string()] {
        assert!(!text.contains(KEY), "{text}");
        assert!(!text.contains("secret.person"), "URL stripped: {text}");
    }

    let (_server, client) = setup(Reply::json(
        401,
        json!({"code": "invalid-key", "message": "Invalid API key"}),
    ))
    .await;
    let err = client.list_members(None, 10, false).await.unwrap_err();
    assert!(!format!("{err:?} {err}").contains(KEY));
}

#[tokio::test]
async fn metrics_use_templated_routes_and_registering_twice_is_fine() {
    let (server, _) = setup(Reply::json(200, json!({"data": member("mem_secret_id")}))).await;
    let registry = prometheus::Registry::new();
    let a = MemberstackClient::new(&cfg(&server.url), Some(&registry)).unwrap();
    let b = MemberstackClient::new(&cfg(&server.url), Some(&registry)).unwrap();
    let patch = json!({"metaData": {"x": 1}}).as_object().unwrap().clone();
    a.update_member("mem_secret_id", &patch).await.unwrap();
    b.get_member("mem_secret_id").await.unwrap();
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(text.contains(r#"membersync_memberstack_requests_total{method_route="PATCH /members/:id",status="200"} 1"#), "{text}");
    assert!(text.contains("membersync_memberstack_request_duration_seconds"));
    assert!(text.contains("membersync_memberstack_rate_limiter_wait_seconds"));
    assert!(!text.contains("mem_secret_id"));
}

/// 60 calls at 25/s: the first goes at once, the other 59 are spaced by the limiter, so at
/// least 59 × 40 ms = 2.36 s; no rolling second at the server sees more than 25.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limiter_keeps_every_rolling_second_under_the_limit() {
    let server = MockServer::start(Reply::json(200, json!({"data": null}))).await;
    let mut c = cfg(&server.url);
    c.requests_per_second = 25;
    let client = MemberstackClient::new(&c, None).unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.get_member(&format!("mem_{i}")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), None);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(2_300), "{elapsed:?}");
    let times: Vec<Instant> = server.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 60);
    let max = max_in_window(&times, Duration::from_secs(1));
    assert!(max <= 25, "{max} requests in one rolling second");
}

#[test]
fn path_segments_are_percent_encoded() {
    assert_eq!(encode_segment("a+b@x.com/?#"), "a%2Bb%40x.com%2F%3F%23");
}
