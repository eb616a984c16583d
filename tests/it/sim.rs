//! The simulators (`membersync::sim`) over real HTTP: each test starts its own instances on
//! port 0.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use membersync::ingest::verify::SvixVerifier;
use membersync::sim::memberstack::{
    DeliveryStatus, MemberPatch, MemberstackConfig, MemberstackSim, NewMember, PlanChange,
};
use membersync::sim::posthog::{PostHogConfig, PostHogSim};
use membersync::sim::supabase_auth::{AuthConfig, AuthSim};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::support::{TestDb, wait_for};

const KEY: &str = "sk_sb_test_key";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WAIT: Duration = Duration::from_secs(10);

async fn memberstack(rate_limit: u32) -> MemberstackSim {
    let mut config = MemberstackConfig::new(KEY);
    config.rate_limit = rate_limit;
    MemberstackSim::start(config).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get(sim: &MemberstackSim, path: &str) -> (StatusCode, Value) {
    let r = http()
        .get(format!("{}{path}", sim.base_url()))
        .header("X-API-KEY", KEY)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

async fn send(
    sim: &MemberstackSim,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    http()
        .request(method, format!("{}{path}", sim.base_url()))
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn create(sim: &MemberstackSim, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            sim.dashboard_create(NewMember::with_email(format!("user{i}@example.com")))
                .unwrap()
                .id
        })
        .collect()
}

/// Walks `GET /members` with `query` (plus `after`), returning ids and page sizes.
async fn walk(sim: &MemberstackSim, query: &str) -> (Vec<String>, Vec<usize>) {
    let (mut ids, mut sizes, mut after) = (Vec::new(), Vec::new(), 0u64);
    loop {
        let (status, page) = get(sim, &format!("/members?{query}&after={after}")).await;
        assert_eq!(status, StatusCode::OK);
        let data = page["data"].as_array().unwrap();
        sizes.push(data.len());
        ids.extend(data.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        after = page["endCursor"].as_u64().expect("endCursor is a number");
        if !page["hasNextPage"].as_bool().unwrap() {
            return (ids, sizes);
        }
        assert!(sizes.len() < 100, "pagination does not end");
    }
}

#[tokio::test]
async fn memberstack_pagination_walks_every_member_once() {
    let sim = memberstack(0).await;
    let (_, empty) = get(&sim, "/members").await;
    assert_eq!(empty["endCursor"], json!(0));
    assert_eq!(empty["hasNextPage"], json!(false));
    assert_eq!(empty["totalCount"], json!(0));

    let created = create(&sim, 230);
    let (ids, sizes) = walk(&sim, "first=100").await;
    assert_eq!(ids, created, "ascending order, each member once");
    assert_eq!(sizes, vec![100, 100, 30]);

    // Above 100 is capped; `first` wins over `limit`; default 50.
    let (_, sizes) = walk(&sim, "first=500").await;
    assert_eq!(sizes, vec![100, 100, 30]);
    let (_, sizes) = walk(&sim, "first=90&limit=7").await;
    assert_eq!(sizes, vec![90, 90, 50]);
    let (ids, sizes) = walk(&sim, "limit=77").await;
    assert_eq!(sizes, vec![77, 77, 76]);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 230);
    let (_, sizes) = walk(&sim, "order=ASC").await;
    assert_eq!(sizes, vec![50, 50, 50, 50, 30]);

    let (ids, _) = walk(&sim, "order=DESC&first=64").await;
    let mut reversed = created.clone();
    reversed.reverse();
    assert_eq!(ids, reversed);

    // Last page: hasNextPage false, endCursor still a number; json only with includeJSON.
    let (_, page) = get(&sim, "/members?first=100&after=200").await;
    assert_eq!(page["hasNextPage"], json!(false));
    assert!(page["endCursor"].as_u64().unwrap() > 200);
    assert_eq!(page["totalCount"], json!(230));
    assert!(page["data"][0].get("json").is_none());
    let (_, page) = get(&sim, "/members?first=1&includeJSON=true").await;
    assert_eq!(page["data"][0]["json"], json!({}));
    assert_eq!(page["data"][0]["auth"]["email"], json!("user0@example.com"));
    assert_eq!(page["data"][0]["planConnections"], json!([]));
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_get_create_patch_delete() {
    let sim = memberstack(0).await;
    let (status, miss) = get(&sim, "/members/mem_nobody").await;
    assert_eq!((status, miss), (StatusCode::OK, json!({"data": null})));

    let r = send(&sim, reqwest::Method::POST, "/members", json!({"email": "Ann@Example.com", "password": "pw", "customFields": {"a": "1", "b": "2"}, "metaData": {"m": 1}, "json": {"x": 1}, "plans": [{"planId": "pln_free"}]})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let created: Value = r.json().await.unwrap();
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("mem_"));
    assert_eq!(created["data"]["json"], json!({"x": 1}));
    assert_eq!(
        created["data"]["planConnections"][0]["status"],
        json!("ACTIVE")
    );
    assert_eq!(created["data"]["planConnections"][0]["type"], json!("FREE"));

    let r = send(
        &sim,
        reqwest::Method::POST,
        "/members",
        json!({"email": "ann@example.COM", "password": "pw"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        json!("email-already-in-use")
    );
    let r = send(
        &sim,
        reqwest::Method::POST,
        "/members",
        json!({"password": "pw"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // By URL-encoded email, case-insensitively; GET one always includes json.
    let (_, by_email) = get(&sim, "/members/ANN%40example.com").await;
    assert_eq!(by_email["data"]["id"], json!(id));
    assert_eq!(by_email["data"]["json"], json!({"x": 1}));

    let r = send(&sim, reqwest::Method::PATCH, &format!("/members/{id}"), json!({"customFields": {"b": null, "c": "3"}, "metaData": {"n": 2}, "json": {"y": 2}, "verified": true})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(
        patched["data"]["customFields"],
        json!({"a": "1", "b": null, "c": "3"})
    );
    assert_eq!(patched["data"]["metaData"], json!({"m": 1, "n": 2}));
    assert_eq!(
        patched["data"]["json"],
        json!({"y": 2}),
        "json is replaced whole"
    );
    assert_eq!(patched["data"]["verified"], json!(true));
    assert_eq!(sim.member(&id).unwrap().custom_fields.len(), 3);

    let r = send(
        &sim,
        reqwest::Method::PATCH,
        "/members/mem_nobody",
        json!({"verified": true}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"code": "member-not-found", "message": "There is no member with this identifier."})
    );

    let r = send(
        &sim,
        reqwest::Method::DELETE,
        &format!("/members/{id}"),
        json!({}),
    )
    .await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"data": {"id": id}})
    );
    assert!(sim.member(&id).is_none());
    let stats = sim.stats();
    assert_eq!(stats.per_endpoint["PATCH /members/{id}"], 2);
    assert_eq!(stats.per_endpoint["POST /members"], 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_plans_answer_plain_ok() {
    let sim = memberstack(0).await;
    let id = create(&sim, 1).remove(0);
    let r = send(
        &sim,
        reqwest::Method::POST,
        &format!("/members/{id}/add-plan"),
        json!({"planId": "pln_free"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(r.text().await.unwrap(), "OK");
    let c = &sim.member(&id).unwrap().plan_connections[0];
    assert_eq!(
        (
            c.plan_id.as_str(),
            c.status.as_str(),
            c.plan_type.as_str(),
            c.active
        ),
        ("pln_free", "ACTIVE", "FREE", true)
    );
    assert!(c.id.starts_with("con_"));

    let r = send(
        &sim,
        reqwest::Method::POST,
        &format!("/members/{id}/remove-plan"),
        json!({"planId": "pln_free"}),
    )
    .await;
    assert_eq!(r.text().await.unwrap(), "OK");
    assert!(sim.member(&id).unwrap().plan_connections.is_empty());
    let r = send(
        &sim,
        reqwest::Method::POST,
        "/members/mem_nobody/add-plan",
        json!({"planId": "pln_free"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_requires_the_api_key() {
    let sim = memberstack(0).await;
    for key in [None, Some("sk_wrong")] {
        let mut req = http().get(format!("{}/members", sim.base_url()));
        if let Some(key) = key {
            req = req.header("X-Api-Key", key);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            json!("invalid-api-key")
        );
    }
    // Control endpoints need no key.
    let r = http()
        .get(format!("{}/__sim/stats", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["per_status"]["401"],
        json!(2)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_rate_limit_answers_429_with_retry_after() {
    let sim = memberstack(25).await;
    let client = http();
    let started = Instant::now();
    let responses = futures::future::join_all((0..26).map(|_| {
        client
            .get(format!("{}/members", sim.base_url()))
            .header("x-api-key", KEY)
            .send()
    }))
    .await;
    let elapsed = started.elapsed();
    let limited: Vec<_> = responses
        .into_iter()
        .map(Result::unwrap)
        .filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(
        elapsed < Duration::from_secs(1),
        "26 requests took {elapsed:?}"
    );
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].headers()["retry-after"], "1");
    assert_eq!(sim.stats().rate_limited, 1);
    assert_eq!(sim.stats().total_requests, 26);
    // Dashboard edits are not API calls: not limited, not counted.
    create(&sim, 30);
    assert_eq!(sim.stats().total_requests, 26);
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_fault_injection() {
    let sim = memberstack(0).await;
    sim.fail_next(2, 503);
    for _ in 0..2 {
        let (status, body) = get(&sim, "/members").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["code"].is_string() && body["message"].is_string());
    }
    assert_eq!(get(&sim, "/members").await.0, StatusCode::OK);

    // The same over HTTP, with a custom body; then forced 429s.
    let ctl = |path: &str, body: Value| {
        http()
            .post(format!("{}/__sim/faults/{path}", sim.base_url()))
            .json(&body)
            .send()
    };
    assert!(
        ctl(
            "fail",
            json!({"count": 1, "status": 502, "body": {"code": "x", "message": "y"}})
        )
        .await
        .unwrap()
        .status()
        .is_success()
    );
    assert_eq!(
        get(&sim, "/members").await,
        (
            StatusCode::BAD_GATEWAY,
            json!({"code": "x", "message": "y"})
        )
    );
    ctl("rate-limit", json!({"count": 1})).await.unwrap();
    assert_eq!(get(&sim, "/members").await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(sim.stats().rate_limited, 1);

    // Latency applies to every response.
    ctl("latency", json!({"ms": 300})).await.unwrap();
    let t = Instant::now();
    assert_eq!(get(&sim, "/members").await.0, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    ctl("reset", json!({})).await.unwrap();
    assert_eq!(sim.faults(), Default::default());

    // A hanging request is only ended by the client's timeout.
    sim.hang_next(1);
    let err = reqwest::Client::new()
        .get(format!("{}/members", sim.base_url()))
        .header("x-api-key", KEY)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(get(&sim, "/members").await.0, StatusCode::OK);
    let calls = sim.calls();
    assert!(calls.iter().all(|c| c.path.starts_with("/members")));
    sim.shutdown().await;
}

type Seen = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A webhook receiver answering the queued statuses (then 200), recording every request.
struct Receiver {
    url: String,
    seen: Seen,
}

async fn receiver(statuses: Vec<u16>) -> Receiver {
    let seen: Seen = Arc::default();
    let statuses = Arc::new(Mutex::new(
        statuses
            .into_iter()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let (s, st) = (seen.clone(), statuses.clone());
    let app = axum::Router::new().route(
        "/webhooks/memberstack",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (s, st) = (s.clone(), st.clone());
            async move {
                s.lock().unwrap().push((headers, body.to_vec()));
                StatusCode::from_u16(st.lock().unwrap().pop_front().unwrap_or(200)).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/webhooks/memberstack",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, seen }
}

async fn memberstack_with_webhooks(url: &str) -> MemberstackSim {
    let mut config = MemberstackConfig::new(KEY).with_webhook(url, SECRET);
    config.rate_limit = 0;
    config.webhook_backoff = vec![Duration::from_millis(50); 3];
    MemberstackSim::start(config).await.unwrap()
}

#[tokio::test]
async fn memberstack_webhooks_are_svix_signed_and_retried_with_the_same_id() {
    let rx = receiver(vec![500]).await;
    let sim = memberstack_with_webhooks(&rx.url).await;
    let r = send(
        &sim,
        reqwest::Method::POST,
        "/members",
        json!({"email": "w@example.com", "password": "pw", "customFields": {"a": 1}}),
    )
    .await;
    let id = r.json::<Value>().await.unwrap()["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.wait_webhooks_quiescent(WAIT).await.unwrap();

    let seen = rx.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one failed attempt, one retry");
    let verifier = SvixVerifier::new(&[SecretString::from(SECRET)]).unwrap();
    let now = chrono::Utc::now().timestamp();
    let first = verifier.verify(&seen[0].0, &seen[0].1, now).unwrap();
    let second = verifier.verify(&seen[1].0, &seen[1].1, now).unwrap();
    assert_eq!(first.id, second.id, "a retry keeps its svix-id");
    assert!(first.id.starts_with("msg_"));
    assert_eq!(seen[0].1, seen[1].1);
    assert_eq!(seen[1].0["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&seen[1].1).unwrap();
    assert_eq!(body["event"], json!("member.created"));
    assert_eq!(body["payload"]["id"], json!(id));
    assert_eq!(body["payload"]["auth"]["email"], json!("w@example.com"));
    assert_eq!(body["payload"]["customFields"], json!({"a": 1}));
    assert!(body["payload"].get("json").is_none());
    assert_eq!(body["timestamp"], json!(sim.last_changed_ms(&id).unwrap()));

    let deliveries = sim.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].attempts, 2);
    assert_eq!(deliveries[0].status, DeliveryStatus::Delivered);
    assert_eq!(deliveries[0].svix_id, first.id);
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_webhooks_follow_changes_only() {
    let rx = receiver(vec![]).await;
    let sim = memberstack_with_webhooks(&rx.url).await;
    let id = sim
        .dashboard_create(NewMember::with_email("d@example.com"))
        .unwrap()
        .id;
    let path = format!("/members/{id}");
    send(
        &sim,
        reqwest::Method::PATCH,
        &path,
        json!({"customFields": {"a": "1"}}),
    )
    .await;
    sim.wait_webhooks_quiescent(WAIT).await.unwrap();
    assert_eq!(sim.deliveries().len(), 2);

    // A PATCH that changes nothing sends nothing.
    let r = send(
        &sim,
        reqwest::Method::PATCH,
        &path,
        json!({"customFields": {"a": "1"}}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    sim.wait_webhooks_quiescent(WAIT).await.unwrap();
    assert_eq!(sim.deliveries().len(), 2);

    // Dashboard edits fire webhooks, in order, while paused deliveries wait.
    sim.pause_webhooks();
    sim.dashboard_update(
        &id,
        &MemberPatch {
            verified: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    sim.dashboard_plan(
        &id,
        PlanChange::Add {
            plan_id: "pln_paid".into(),
            plan_name: Some("Pro".into()),
            plan_type: Some("SUBSCRIPTION".into()),
            status: None,
        },
    )
    .unwrap();
    sim.dashboard_plan(
        &id,
        PlanChange::Update {
            plan_id: "pln_paid".into(),
            status: "past_due".into(),
            active: None,
        },
    )
    .unwrap();
    sim.dashboard_plan(
        &id,
        PlanChange::Cancel {
            plan_id: "pln_paid".into(),
        },
    )
    .unwrap();
    sim.dashboard_delete(&id).unwrap();
    assert!(
        sim.wait_webhooks_quiescent(Duration::from_millis(200))
            .await
            .is_err()
    );
    assert_eq!(rx.seen.lock().unwrap().len(), 2);
    sim.resume_webhooks();
    sim.wait_webhooks_quiescent(WAIT).await.unwrap();

    let seen = rx.seen.lock().unwrap().clone();
    let bodies: Vec<Value> = seen
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect();
    let events: Vec<&str> = bodies
        .iter()
        .map(|b| b["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "member.created",
            "member.updated",
            "member.updated",
            "member.plan.added",
            "member.plan.updated",
            "member.plan.canceled",
            "member.deleted"
        ]
    );
    assert_eq!(
        bodies[4]["payload"]["planConnection"]["status"],
        json!("PAST_DUE")
    );
    assert_eq!(
        bodies[4]["payload"]["planConnection"]["active"],
        json!(false)
    );
    assert_eq!(
        bodies[3]["payload"]["planConnection"]["planName"],
        json!("Pro")
    );
    assert_eq!(bodies[6]["payload"], json!({"id": id}));
    let ids: HashSet<_> = seen
        .iter()
        .map(|(h, _)| h["svix-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 7, "each message has its own id");
    assert_eq!(
        sim.stats().total_requests,
        2,
        "dashboard edits are not API calls"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn memberstack_webhook_marked_failed_after_the_schedule() {
    let rx = receiver(vec![500; 10]).await;
    let sim = memberstack_with_webhooks(&rx.url).await;
    create(&sim, 1);
    sim.wait_webhooks_quiescent(WAIT).await.unwrap();
    let d = &sim.deliveries()[0];
    assert_eq!(
        (d.status, d.attempts, d.last_response_status),
        (DeliveryStatus::Failed, 4, Some(500))
    );
    assert_eq!(rx.seen.lock().unwrap().len(), 4);
    sim.shutdown().await;
}

/// GoTrue's pool reconnects after a database restart; so does the simulator (the soak restarts
/// Postgres under it).
#[tokio::test]
async fn auth_simulator_reconnects_after_a_postgres_restart() {
    let cluster = crate::support::cluster::TempCluster::start(&[]);
    let bootstrap =
        std::fs::read_to_string(crate::support::repo_root().join("scripts/supabase-bootstrap.sql"))
            .unwrap();
    cluster
        .connect()
        .await
        .batch_execute(&bootstrap)
        .await
        .unwrap();
    let sim = AuthSim::start(AuthConfig::new(
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            cluster.port
        ),
        "service-key",
    ))
    .await
    .unwrap();
    let create = |email: &'static str| {
        http()
            .post(format!("{}/auth/v1/admin/users", sim.base_url()))
            .header("authorization", "Bearer service-key")
            .header("apikey", "service-key")
            .json(&json!({"email": email}))
            .send()
    };
    assert_eq!(
        create("before@example.com").await.unwrap().status(),
        StatusCode::OK
    );
    cluster.restart_fast(Duration::from_secs(60));
    // The first request after the restart may still meet the dead connection; the next ones
    // must succeed.
    let status = wait_for(
        "a user created after the restart",
        Duration::from_secs(20),
        || async {
            let r = create("after@example.com").await.ok()?;
            (r.status() == StatusCode::OK).then_some(r.status())
        },
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let n: i64 = cluster
        .connect()
        .await
        .query_one("select count(*) from auth.users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn auth_sim_writes_auth_users() {
    let db = TestDb::bootstrapped().await;
    let sim = AuthSim::start(AuthConfig::new(db.superuser_dsn(), "service-key"))
        .await
        .unwrap();
    let users = format!("{}/auth/v1/admin/users", sim.base_url());
    let admin = |req: reqwest::RequestBuilder| {
        req.header("authorization", "Bearer service-key")
            .header("apikey", "service-key")
    };

    let r = admin(http().post(&users))
        .json(&json!({"email": "Bea@Example.com", "password": "pw", "email_confirm": true, "user_metadata": {"a": 1, "b": 2}, "app_metadata": {"role": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["email"], json!("bea@example.com"));
    assert_eq!(user["aud"], json!("authenticated"));
    assert_eq!(
        user["app_metadata"],
        json!({"provider": "email", "providers": ["email"], "role": "x"})
    );
    assert!(user["email_confirmed_at"].is_string());
    let id: uuid::Uuid = user["id"].as_str().unwrap().parse().unwrap();

    let row = db
        .admin()
        .await
        .query_one("select email, role, raw_user_meta_data, created_at is not null as c from auth.users where id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "bea@example.com");
    assert_eq!(row.get::<_, String>(1), "authenticated");
    assert_eq!(row.get::<_, Value>(2), json!({"a": 1, "b": 2}));
    assert!(row.get::<_, bool>(3));

    let r = admin(http().post(&users))
        .json(&json!({"email": "BEA@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"code": 422, "error_code": "email_exists", "msg": "A user with this email address has already been registered"})
    );
    let r = admin(http().post(&users))
        .json(&json!({"email": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_code"],
        json!("validation_failed")
    );

    // PUT merges user_metadata shallowly (null removes a key).
    let r = admin(http().put(format!("{users}/{id}")))
        .json(&json!({"user_metadata": {"b": null, "c": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["user_metadata"],
        json!({"a": 1, "c": 3})
    );
    let r = admin(http().get(format!("{users}/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["id"], json!(id));
    let r = admin(http().get(&users)).send().await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["users"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let r = http()
        .get(&users)
        .header("authorization", "Bearer wrong")
        .header("apikey", "service-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_code"],
        json!("no_authorization")
    );

    sim.fail_next(1, 503);
    let r = admin(http().get(&users)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], json!(503));

    let r = admin(http().delete(format!("{users}/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
    let r = admin(http().get(format!("{users}/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_code"],
        json!("user_not_found")
    );
    let n: i64 = db
        .admin()
        .await
        .query_one("select count(*) from auth.users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(sim.stats().per_endpoint["GET /auth/v1/admin/users/{id}"], 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn posthog_sim_accepts_batches_and_checks_keys() {
    let sim = PostHogSim::start(PostHogConfig::new("phc_test"))
        .await
        .unwrap();
    let post = |path: &str, body: Value| {
        http()
            .post(format!("{}{path}", sim.base_url()))
            .json(&body)
            .send()
    };

    let r = post("/batch/", json!({"api_key": "phc_test", "historical_migration": true, "batch": [
        {"event": "member_synced", "distinct_id": "mem_1", "properties": {"x": 1}, "uuid": "0190e1f4-0000-7000-8000-000000000001"},
        {"event": "member_synced", "properties": {"distinct_id": "mem_2"}, "timestamp": "2024-01-01T00:00:00Z"},
    ]})).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": 1}));
    let r = post(
        "/i/v0/e/",
        json!({"api_key": "phc_test", "event": "one", "distinct_id": "mem_3"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    for (path, body, status) in [
        (
            "/batch/",
            json!({"api_key": "phc_wrong", "batch": [{"event": "e", "distinct_id": "d"}]}),
            401,
        ),
        (
            "/batch/",
            json!({"batch": [{"event": "e", "distinct_id": "d"}]}),
            401,
        ),
        (
            "/batch/",
            json!({"api_key": "phc_test", "batch": [{"event": "e", "distinct_id": "d", "api_key": "phc_other"}]}),
            401,
        ),
        ("/batch/", json!({"api_key": "phc_test", "batch": []}), 400),
        (
            "/batch/",
            json!({"api_key": "phc_test", "batch": [{"distinct_id": "d"}]}),
            400,
        ),
        (
            "/capture/",
            json!({"api_key": "phc_test", "event": "e"}),
            400,
        ),
    ] {
        assert_eq!(
            post(path, body.clone()).await.unwrap().status().as_u16(),
            status,
            "{body}"
        );
    }
    let r = http()
        .post(format!("{}/batch/", sim.base_url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let events = sim.events();
    assert_eq!(
        events
            .iter()
            .map(|e| e.distinct_id.as_str())
            .collect::<Vec<_>>(),
        ["mem_1", "mem_2", "mem_3"]
    );
    assert_eq!(
        events[0].uuid.as_deref(),
        Some("0190e1f4-0000-7000-8000-000000000001")
    );
    assert!(sim.batches()[0].historical_migration);
    let over_http: Value = http()
        .get(format!("{}/__sim/events", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http["events"].as_array().unwrap().len(), 3);

    sim.fail_next(1, 503);
    sim.rate_limit_next(1);
    let ok = json!({"api_key": "phc_test", "event": "e", "distinct_id": "d"});
    assert_eq!(
        post("/capture/", ok.clone()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        post("/capture/", ok.clone()).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        post("/capture/", ok).await.unwrap().status(),
        StatusCode::OK
    );
    wait_for("four events", WAIT, || async {
        (sim.events().len() == 4).then_some(())
    })
    .await;
    sim.shutdown().await;
}
