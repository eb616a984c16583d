//! The member and admin API end to end: the real `membersync ingest` binary, a test JWKS
//! served from this process (counting its fetches), a real database, the real broker and
//! the Memberstack simulator. Tokens are signed with the test-only keys of
//! `tests/fixtures/api/`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::routing::get;
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use membersync::config::KafkaConfig;
use membersync::sim::memberstack::{MemberstackConfig, MemberstackSim, NewMember};
use rdkafka::Message;
use serde_json::{Value, json};

use crate::support::{self, TestDb, daemon::Daemon, kafka::header};

const KEY_A: &[u8] = include_bytes!("../fixtures/api/key_a.pem");
const KEY_A_PUBLIC: &[u8] = include_bytes!("../fixtures/api/key_a.pub.pem");
const KEY_B: &[u8] = include_bytes!("../fixtures/api/key_b.pem");
const AUDIENCE: &str = "app_test_membersync";
const ISSUER: &str = "https://api.memberstack.com";
const ADMIN_TOKEN: &str = "admin-token-for-tests-only-0123456789";
const HS256_SECRET: &str = "hs256-shared-secret-for-tests-only-0123456789";
const MS_API_KEY: &str = "sk_sb_api_tests";

/// Test JWKS: what it serves can change; every fetch is counted.
#[derive(Clone)]
struct JwksServer {
    addr: SocketAddr,
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Jwk>) -> JwksServer {
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks",
            get(move || {
                let (k, f) = (k.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let set = JwkSet {
                        keys: k.lock().unwrap().clone(),
                    };
                    Json(serde_json::to_value(set).unwrap())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        JwksServer {
            addr,
            keys,
            fetches,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn add(&self, jwk: Jwk) {
        self.keys.lock().unwrap().push(jwk);
    }
}

fn jwk(pem: &[u8], kid: &str) -> Jwk {
    let mut jwk =
        Jwk::from_encoding_key(&EncodingKey::from_rsa_pem(pem).unwrap(), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(member: &str) -> Value {
    json!({"id": member, "type": "member", "iss": ISSUER, "aud": AUDIENCE,
           "iat": now(), "exp": now() + 600})
}

fn rs256(pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

fn token(member: &str) -> String {
    rs256(KEY_A, Some("key-a"), &claims(member))
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A running `membersync ingest` with the API configured, and what it talks to.
struct Stack {
    daemon: Daemon,
    db: TestDb,
    kafka: KafkaConfig,
    jwks: JwksServer,
    ms: MemberstackSim,
    http: reqwest::Client,
}

impl Stack {
    async fn start(extra: &[(&str, &str)]) -> Stack {
        let db = TestDb::migrated().await;
        let kafka = support::kafka::config();
        let jwks = JwksServer::start(vec![jwk(KEY_A, "key-a")]).await;
        let ms = MemberstackSim::start(MemberstackConfig::new(MS_API_KEY))
            .await
            .expect("Memberstack simulator");
        let mut env: Vec<(String, String)> = db.env();
        for (k, v) in [
            ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.clone()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
                kafka.topic_prefix.clone(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1".into()),
            ("MEMBERSYNC__API__ENABLED", "true".into()),
            ("MEMBERSYNC__API__JWKS_URL", jwks.url()),
            ("MEMBERSYNC__API__AUDIENCE", AUDIENCE.into()),
            ("MEMBERSYNC__API__JWKS_MIN_REFRESH_SECS", "1".into()),
            ("MEMBERSYNC__API__ADMIN_TOKEN", ADMIN_TOKEN.into()),
            ("MEMBERSYNC__MEMBERSTACK__API_URL", ms.base_url()),
            ("MEMBERSYNC__MEMBERSTACK__API_KEY", MS_API_KEY.into()),
            ("MEMBERSYNC__MEMBERSTACK__MAX_ATTEMPTS", "1".into()),
        ] {
            env.push((k.to_owned(), v));
        }
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            if !v.is_empty() {
                env.push(((*k).to_owned(), (*v).to_owned()));
            }
        }
        let daemon = Daemon::start("ingest", env).await;
        Stack {
            daemon,
            db,
            kafka,
            jwks,
            ms,
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.daemon.ingest));
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body, headers)
    }

    async fn get(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let (s, b, _) = self.call(reqwest::Method::GET, path, bearer).await;
        (s, b)
    }

    async fn post(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let (s, b, _) = self.call(reqwest::Method::POST, path, bearer).await;
        (s, b)
    }

    /// The daemon's startup prefetch of the key set has happened.
    async fn jwks_warm(&self) {
        let jwks = self.jwks.clone();
        support::wait_for("the JWKS prefetch", Duration::from_secs(10), || {
            let n = jwks.fetches();
            async move { (n >= 1).then_some(()) }
        })
        .await;
    }
}

/// Rows as merge leaves them for `member`: the members row, field states (email agreed,
/// project_data edited in Supabase since, custom_fields pushed and not confirmed yet), a
/// dead letter that was replayed and one that was not.
async fn insert_merged_member(db: &TestDb, member: &str) {
    db.admin()
        .await
        .batch_execute(&format!(
            "insert into public.members (memberstack_id, email, subscription_status, plan_id,
                                         custom_fields, project_data, last_synced_at)
             values ('{member}', 'Ada@Example.com', 'active', 'pln_pro', '{{\"team\":\"x\"}}',
                     '{{\"p\":2}}', '2024-05-14T09:00:00Z');
             insert into public.sync_state (memberstack_id, field, last_synced_at, last_value,
                                            last_source, pushed_at, echoes)
             values ('{member}', 'email', '2024-05-14T09:00:00Z', '\"ada@example.com\"',
                     'memberstack', null, '[]'),
                    ('{member}', 'project_data', '2024-05-14T09:00:00Z', '{{\"p\":1}}',
                     'supabase', null, '[]'),
                    ('{member}', 'custom_fields', '2024-05-14T09:00:00Z', '{{\"team\":\"x\"}}',
                     'supabase', '2024-05-14T09:00:01Z',
                     '[{{\"value\":{{\"team\":\"x\"}},\"at\":\"2024-05-14T09:00:01Z\"}}]');
             insert into public.error_logs (memberstack_id, error_type, error_message, context,
                                            retry_count, created_at)
             values ('{member}', 'sync_failed', 'Memberstack 500: internal detail', 
                     '{{\"dlq_id\":\"dlq-1\",\"error_kind\":\"memberstack\"}}', 3,
                     '2024-05-14T08:00:00Z'),
                    ('{member}', 'sync_failed', 'database error',
                     '{{\"dlq_id\":\"dlq-2\",\"error_kind\":\"database\"}}', 3,
                     '2024-05-14T08:30:00Z');
             insert into public.audit_logs (actor, action, target)
             values ('ops', 'dlq_replay', 'dlq-1');"
        ))
        .await
        .expect("insert merged rows");
}

#[tokio::test]
async fn a_member_reads_its_own_sync_state_and_not_anothers() {
    let s = Stack::start(&[]).await;
    insert_merged_member(&s.db, "mem_ada").await;
    insert_merged_member(&s.db, "mem_bob").await;

    let (status, view) = s.get("/v1/members/me/sync", Some(&token("mem_ada"))).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["member_id"], "mem_ada");
    let m = &view["member"];
    assert_eq!(m["memberstack_id"], "mem_ada");
    assert_eq!(m["email"], "Ada@Example.com");
    assert_eq!(m["subscription_status"], "active");
    assert_eq!(m["plan_id"], "pln_pro");
    assert_eq!(m["last_synced_at"], "2024-05-14T09:00:00Z");
    let fields: Vec<&str> = view["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["custom_fields", "email", "project_data"]);
    assert_eq!(view["fields"][1]["last_synced_at"], "2024-05-14T09:00:00Z");
    assert_eq!(view["fields"][1]["last_source"], "memberstack");
    // Email differs only in case (normalised: the same fact); project_data was edited.
    let pending: HashSet<(String, String)> = view["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["field"].as_str().unwrap().into(),
                p["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected: HashSet<(String, String)> = [
        ("project_data".into(), "supabase_edit".into()),
        ("custom_fields".into(), "memberstack_unconfirmed".into()),
    ]
    .into();
    assert_eq!(pending, expected, "{view}");
    let letters = view["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0]["dlq_id"], "dlq-2", "newest first");
    assert_eq!(letters[0]["replayed"], false);
    assert_eq!(letters[1]["dlq_id"], "dlq-1");
    assert_eq!(letters[1]["replayed"], true);
    assert_eq!(letters[1]["error_kind"], "memberstack");
    assert!(
        !view.to_string().contains("internal detail"),
        "error messages are for operators"
    );

    // The same through the explicit route, and nobody else's.
    let (status, by_id) = s
        .get("/v1/members/mem_ada/sync", Some(&token("mem_ada")))
        .await;
    assert_eq!((status, &by_id["member_id"]), (200, &json!("mem_ada")));
    let (status, body) = s
        .get("/v1/members/mem_bob/sync", Some(&token("mem_ada")))
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert!(!body.to_string().contains("bob@"), "{body}");

    // A member the database does not know yet.
    let (status, view) = s.get("/v1/members/me/sync", Some(&token("mem_new"))).await;
    assert_eq!(status, 200);
    assert_eq!(view["member"], Value::Null);
    assert_eq!(view["fields"], json!([]));
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_its_code() {
    let s = Stack::start(&[]).await;
    s.jwks_warm().await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let with = |key: &str, value: Value| {
        let mut c = claims("mem_x");
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = claims("mem_x");
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let valid = token("mem_x");
    let parts: Vec<&str> = valid.split('.').collect();
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "missing_token"),
        (
            "not bearer",
            Some(format!("Basic {valid}")),
            "malformed_authorization",
        ),
        (
            "garbage",
            Some("Bearer not.a.jwt".into()),
            "malformed_token",
        ),
        (
            "alg none",
            Some(format!(
                "Bearer {}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims("mem_x"))
            )),
            "alg_not_allowed",
        ),
        (
            // Algorithm confusion: HMAC keyed with the RSA public key the JWKS publishes.
            "HS256 with the public key",
            Some(format!("Bearer {}", {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("key-a".into());
                encode(
                    &h,
                    &claims("mem_x"),
                    &EncodingKey::from_secret(KEY_A_PUBLIC),
                )
                .unwrap()
            })),
            "alg_not_allowed",
        ),
        (
            "RS512",
            Some(format!("Bearer {}", {
                let mut h = Header::new(Algorithm::RS512);
                h.kid = Some("key-a".into());
                encode(
                    &h,
                    &claims("mem_x"),
                    &EncodingKey::from_rsa_pem(KEY_A).unwrap(),
                )
                .unwrap()
            })),
            "alg_not_allowed",
        ),
        (
            "unknown kid",
            Some(format!(
                "Bearer {}",
                rs256(KEY_B, Some("nobody"), &claims("mem_x"))
            )),
            "unknown_kid",
        ),
        (
            "signed by another key",
            Some(format!(
                "Bearer {}",
                rs256(KEY_B, Some("key-a"), &claims("mem_x"))
            )),
            "bad_signature",
        ),
        (
            "tampered claims",
            Some(format!(
                "Bearer {}.{}.{}",
                parts[0],
                b64(&claims("mem_other")),
                parts[2]
            )),
            "bad_signature",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                token_with(with("exp", json!(now() - 120)))
            )),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                token_with(with("nbf", json!(now() + 120)))
            )),
            "token_not_yet_valid",
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                token_with(with("aud", json!("app_other")))
            )),
            "wrong_audience",
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                token_with(with("iss", json!("https://evil.example")))
            )),
            "wrong_issuer",
        ),
        (
            "no exp",
            Some(format!("Bearer {}", token_with(without("exp")))),
            "missing_exp",
        ),
        (
            "no member id",
            Some(format!("Bearer {}", token_with(without("id")))),
            "missing_claim",
        ),
    ];
    for (what, authorization, code) in cases {
        for path in ["/v1/members/me/sync", "/v1/members/me/resync"] {
            let mut req = if path.ends_with("resync") {
                s.http.post(format!("{}{path}", s.daemon.ingest))
            } else {
                s.http.get(format!("{}{path}", s.daemon.ingest))
            };
            if let Some(a) = &authorization {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 401, "{what} on {path}");
            assert!(
                resp.headers()
                    .get("www-authenticate")
                    .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")),
                "{what}: RFC 6750 challenge"
            );
            let text = resp.text().await.unwrap();
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["error"], code, "{what} on {path}: {body}");
            assert!(body["message"].is_string());
            if let Some(a) = &authorization
                && let Some(t) = a.split(' ').nth(1)
                && t.len() > 20
            {
                assert!(!text.contains(t), "{what}: the token is not echoed");
            }
        }
    }
    // Nothing was published for any of them.
    let ms_topic = format!("{}.memberstack", s.kafka.topic_prefix);
    let (_, high) = watermarks(&s.kafka, &ms_topic);
    assert_eq!(high, 0);
}

fn token_with(claims: Value) -> String {
    rs256(KEY_A, Some("key-a"), &claims)
}

fn watermarks(kafka: &KafkaConfig, topic: &str) -> (i64, i64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = membersync::kafka::client_config(kafka)
        .set("group.id", support::unique_name("wm"))
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap()
}

#[tokio::test]
async fn a_new_kid_refetches_once_and_floods_of_unknown_kids_are_bounded() {
    let s = Stack::start(&[]).await;
    s.jwks_warm().await;
    let (status, _) = s.get("/v1/members/me/sync", Some(&token("mem_r"))).await;
    assert_eq!(status, 200);
    assert_eq!(s.jwks.fetches(), 1, "a cached key needs no fetch");

    // Rotation: Memberstack starts signing with key B under a new kid.
    s.jwks.add(jwk(KEY_B, "key-b"));
    tokio::time::sleep(Duration::from_millis(1_100)).await; // past the refresh bound
    let rotated = rs256(KEY_B, Some("key-b"), &claims("mem_r"));
    let (status, body) = s.get("/v1/members/me/sync", Some(&rotated)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.jwks.fetches(), 2, "one refetch for the new kid");
    let (status, _) = s.get("/v1/members/me/sync", Some(&rotated)).await;
    assert_eq!(status, 200);
    assert_eq!(s.jwks.fetches(), 2, "then it is cached");

    // A flood of made-up kids over ~3 s: at most one fetch per second (the configured bound).
    let key = EncodingKey::from_rsa_pem(KEY_A).unwrap();
    let waves: Vec<Vec<String>> = (0..6)
        .map(|wave| {
            (0..50)
                .map(|i| {
                    let mut h = Header::new(Algorithm::RS256);
                    h.kid = Some(format!("made-up-{wave}-{i}"));
                    encode(&h, &claims("mem_r"), &key).unwrap()
                })
                .collect()
        })
        .collect();
    let before = s.jwks.fetches();
    let started = std::time::Instant::now();
    let mut codes = HashSet::new();
    for wave in waves {
        let requests = wave.into_iter().map(|t| {
            let url = format!("{}/v1/members/me/sync", s.daemon.ingest);
            let http = s.http.clone();
            async move {
                let resp = http.get(url).bearer_auth(t).send().await.unwrap();
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap();
                (
                    status,
                    body["error"].as_str().unwrap_or_default().to_owned(),
                )
            }
        });
        for (status, code) in futures::future::join_all(requests).await {
            assert_eq!(status, 401);
            codes.insert(code);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fetched = s.jwks.fetches() - before;
    assert_eq!(codes, HashSet::from(["unknown_kid".to_owned()]));
    let bound = elapsed.ceil() as usize + 1;
    assert!(
        fetched <= bound,
        "{fetched} JWKS fetches for 300 unknown kids in {elapsed:.1}s (bound {bound})"
    );
    assert!(fetched >= 1, "misses past the bound do refetch");
}

#[tokio::test]
async fn hs256_mode_accepts_its_tokens_only_and_admin_routes_can_be_off() {
    let s = Stack::start(&[
        ("MEMBERSYNC__API__AUTH_MODE", "hs256"),
        ("MEMBERSYNC__API__HS256_SECRET", HS256_SECRET),
        ("MEMBERSYNC__API__ADMIN_TOKEN", ""),
    ])
    .await;
    insert_merged_member(&s.db, "mem_h").await;
    let good = hs256(HS256_SECRET.as_bytes(), &claims("mem_h"));
    let (status, view) = s.get("/v1/members/me/sync", Some(&good)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["member"]["email"], "Ada@Example.com");

    let cases = [
        (
            hs256(b"another-secret-of-at-least-32-bytes!!", &claims("mem_h")),
            "bad_signature",
        ),
        (token("mem_h"), "alg_not_allowed"),
        (
            {
                let mut c = claims("mem_h");
                c["exp"] = json!(now() - 120);
                hs256(HS256_SECRET.as_bytes(), &c)
            },
            "token_expired",
        ),
    ];
    for (t, code) in cases {
        let (status, body) = s.get("/v1/members/me/sync", Some(&t)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some(code)),
            "{body}"
        );
    }
    assert_eq!(s.jwks.fetches(), 0, "no JWKS in hs256 mode");

    for path in ["/v1/admin/status", "/v1/admin/dlq"] {
        let (status, body) = s.get(path, Some(ADMIN_TOKEN)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("admin_disabled"))
        );
    }
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let s = Stack::start(&[]).await;
    for path in ["/v1/admin/status", "/v1/admin/dlq"] {
        let (status, body) = s.get(path, None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("missing_token")),
            "{path}"
        );
        let wrong = format!("{ADMIN_TOKEN}x");
        let (status, body) = s.get(path, Some(&wrong)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_admin_token")),
            "{path}"
        );
        // A member token is no admin token.
        let (status, _) = s.get(path, Some(&token("mem_x"))).await;
        assert_eq!(status, 401);
    }
    let (status, st) = s.get("/v1/admin/status", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["process"]["roles"], json!(["ingest"]));
    assert_eq!(st["cdc_slot"]["exists"], false, "{st}");
    assert_eq!(st["dlq"]["records"], 0, "{st}");
    assert_eq!(st["dlq"]["replayed"], 0, "{st}");
    assert_eq!(st["merge_consumer"]["total_lag"], 0, "{st}");
    assert_eq!(st["api"]["auth_mode"], "jwks");
    assert!(!st.to_string().contains(ADMIN_TOKEN));

    let (status, dlq) = s.get("/v1/admin/dlq", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{dlq}");
    assert_eq!(dlq["count"], 0);
    assert_eq!(dlq["dead_letters"], json!([]));

    // The dead-letter listing left its trace; the polled status and the refused calls did not.
    let audit: Vec<(String, String)> =
        s.db.admin()
            .await
            .query(
                "select actor, action from public.audit_logs order by created_at",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(
        audit,
        vec![("admin-api".to_owned(), "admin_dlq_list".to_owned())]
    );
}

#[tokio::test]
async fn resync_publishes_the_member_as_a_snapshot_record() {
    let s = Stack::start(&[("MEMBERSYNC__API__RESYNC_MIN_INTERVAL_SECS", "60")]).await;
    let member =
        s.ms.dashboard_create(NewMember {
            email: Some("grace@example.com".into()),
            custom_fields: Some(json!({"team": "navy"}).as_object().unwrap().clone()),
            ..NewMember::default()
        })
        .unwrap();
    let t = token(&member.id);
    let (status, body) = s.post("/v1/members/me/resync", Some(&t)).await;
    assert_eq!(status, 202, "{body}");
    let event_id = body["event_id"].as_str().unwrap().to_owned();
    assert!(event_id.starts_with(&format!("resync_{}_", member.id)));

    let topic = format!("{}.memberstack", s.kafka.topic_prefix);
    let records = support::kafka::consume(&s.kafka, &topic, 1, Duration::from_secs(20)).await;
    let r = &records[0];
    assert_eq!(r.key(), Some(member.id.as_bytes()));
    let v: Value = serde_json::from_slice(r.payload().unwrap()).unwrap();
    assert_eq!(v["id"], event_id);
    assert_eq!(v["type"], "member.snapshot");
    assert_eq!(v["kind"], "member_snapshot");
    assert_eq!(v["member_id"], member.id.as_str());
    assert_eq!(v["data"]["payload"]["id"], member.id.as_str());
    assert_eq!(v["data"]["payload"]["auth"]["email"], "grace@example.com");
    assert_eq!(v["data"]["payload"]["customFields"]["team"], "navy");
    assert_eq!(
        header(r, "membersync_event_id").as_deref(),
        Some(event_id.as_str())
    );
    assert_eq!(
        header(r, "membersync_member_id").as_deref(),
        Some(member.id.as_str())
    );

    // Once per interval per member.
    let (status, body) = s.post("/v1/members/me/resync", Some(&t)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("resync_too_frequent"))
    );

    // A member Memberstack does not know.
    let (status, body) = s
        .post("/v1/members/me/resync", Some(&token("mem_ghost")))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("member_not_found")),
        "{body}"
    );

    // Memberstack failing.
    s.ms.fail_next(5, 500);
    let (status, body) = s
        .post("/v1/members/me/resync", Some(&token("mem_other")))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("memberstack_unavailable")),
        "{body}"
    );
    s.ms.reset_faults();

    // Exactly the one snapshot was published.
    assert_eq!(watermarks(&s.kafka, &topic).1, 1);
}

#[tokio::test]
async fn resync_answers_503_when_kafka_does_not_acknowledge() {
    let s = Stack::start(&[
        ("MEMBERSYNC__KAFKA__BROKERS", "127.0.0.1:1"),
        ("MEMBERSYNC__KAFKA__CREATE_TOPICS", "false"),
        ("MEMBERSYNC__INGEST__KAFKA_ACK_TIMEOUT_MS", "1000"),
    ])
    .await;
    let member =
        s.ms.dashboard_create(NewMember {
            email: Some("kafka-down@example.com".into()),
            ..NewMember::default()
        })
        .unwrap();
    let (status, body) = s
        .post("/v1/members/me/resync", Some(&token(&member.id)))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("kafka_unavailable")),
        "{body}"
    );
}
