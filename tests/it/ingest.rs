//! Webhook ingest end to end: the real binary, real HTTP, the real broker. Every rejection
//! gets its status and JSON error, and nothing rejected ever reaches Kafka (asserted by
//! consuming the topic).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use membersync::config::KafkaConfig;
use membersync::ingest::verify::stripe::StripeVerifier;
use membersync::ingest::verify::svix::SvixVerifier;
use rdkafka::Message;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::support::{self, daemon::Daemon, kafka::header, wait_for};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn random_secret() -> String {
    let bytes: Vec<u8> = (0..24).map(|_| rand_byte()).collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

/// A running `membersync ingest` with its own topics (1 partition: total order, so "the
/// sentinel is the first record" proves nothing before it was produced).
struct Ingest {
    daemon: Daemon,
    kafka: KafkaConfig,
    svix: SvixVerifier,
    svix_secret: String,
    stripe: StripeVerifier,
    http: reqwest::Client,
}

impl Ingest {
    /// `extra` overrides the defaults; a pair with an empty value removes that variable.
    async fn start_with(kafka: KafkaConfig, extra: Vec<(String, String)>) -> Ingest {
        let svix_secret = random_secret();
        let stripe_secret = random_secret();
        let mut env = vec![
            (
                "MEMBERSYNC__KAFKA__BROKERS".to_string(),
                kafka.brokers.clone(),
            ),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX".into(),
                kafka.topic_prefix.clone(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS".into(), "1".into()),
            (
                "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS".into(),
                svix_secret.clone(),
            ),
            (
                "MEMBERSYNC__INGEST__STRIPE_WEBHOOK_SECRETS".into(),
                stripe_secret.clone(),
            ),
            (
                "MEMBERSYNC__INGEST__BODY_LIMIT_BYTES".into(),
                "65536".into(),
            ),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| *k != key);
            if !value.is_empty() {
                env.push((key, value));
            }
        }
        let daemon = Daemon::start("ingest", env).await;
        Ingest {
            daemon,
            kafka,
            svix: SvixVerifier::new(&[SecretString::from(svix_secret.clone())]).unwrap(),
            svix_secret,
            stripe: StripeVerifier::new(&[SecretString::from(stripe_secret)]).unwrap(),
            http: reqwest::Client::new(),
        }
    }

    async fn start() -> Ingest {
        Self::start_with(support::kafka::config(), vec![]).await
    }

    fn memberstack_topic(&self) -> String {
        format!("{}.memberstack", self.kafka.topic_prefix)
    }

    fn stripe_topic(&self) -> String {
        format!("{}.stripe", self.kafka.topic_prefix)
    }

    /// POSTs `body` with `headers`; returns status and JSON body.
    async fn post(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.daemon.ingest))
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn svix_headers(&self, id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        vec![
            ("content-type", "application/json".into()),
            ("svix-id", id.into()),
            ("svix-timestamp", ts.to_string()),
            ("svix-signature", self.svix.sign(id, ts, body)),
        ]
    }

    async fn memberstack(&self, id: &str, body: &[u8]) -> (u16, Value) {
        self.post(
            "/webhooks/memberstack",
            &self.svix_headers(id, now(), body),
            body.to_vec(),
        )
        .await
    }
}

fn member_created(member: &str) -> Vec<u8> {
    json!({"event": "member.created", "timestamp": 1_700_000_000_123_i64,
           "payload": {"id": member, "auth": {"email": format!("{member}@example.com")}, "customFields": {"n": 1}}})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn memberstack_delivery_is_produced_with_key_headers_and_envelope_and_duplicates_repeat_them()
{
    let ingest = Ingest::start().await;
    let body = member_created("mem_abc");
    for _ in 0..2 {
        let (status, json) = ingest.memberstack("msg_dup1", &body).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json, json!({"status": "accepted", "event_id": "msg_dup1"}));
    }
    let records = support::kafka::consume(
        &ingest.kafka,
        &ingest.memberstack_topic(),
        2,
        Duration::from_secs(30),
    )
    .await;
    for m in &records {
        assert_eq!(m.key(), Some(&b"mem_abc"[..]));
        assert_eq!(
            header(m, "membersync_event_id").as_deref(),
            Some("msg_dup1")
        );
        assert_eq!(header(m, "ce_id").as_deref(), Some("msg_dup1"));
        assert_eq!(
            header(m, "ce_type").as_deref(),
            Some("memberstack.member.created")
        );
        assert_eq!(
            header(m, "ce_source").as_deref(),
            Some("/membersync/ingest/memberstack")
        );
        assert_eq!(header(m, "ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(
            header(m, "ce_time").as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(v["id"], "msg_dup1");
        assert_eq!(v["source"], "memberstack");
        assert_eq!(v["kind"], "member_created");
        assert_eq!(v["member_id"], "mem_abc");
        assert_eq!(v["data"]["payload"]["auth"]["email"], "mem_abc@example.com");
    }
    assert_eq!(
        ingest
            .daemon
            .metric("membersync_ingest_requests_total{reason=\"accepted\",source=\"memberstack\",status=\"200\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn every_bad_delivery_gets_its_status_and_nothing_reaches_kafka() {
    let ingest = Ingest::start().await;
    let body = member_created("mem_bad");
    let ts = now();
    let good = ingest.svix_headers("msg_bad", ts, &body);
    let with = |name: &str, value: String| -> Vec<(&'static str, String)> {
        good.iter()
            .map(|(k, v)| (*k, if *k == name { value.clone() } else { v.clone() }))
            .collect()
    };
    let without = |name: &str| -> Vec<(&'static str, String)> {
        good.iter().filter(|(k, _)| *k != name).cloned().collect()
    };
    let other = SvixVerifier::new(&[SecretString::from(random_secret())]).unwrap();
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    let not_json = b"this is not json".to_vec();
    let no_member = br#"{"event":"member.updated","payload":{"auth":{"email":"x@y.z"}}}"#.to_vec();
    let stale = ts - 301;
    let future = ts + 301;

    // (name, headers, body, expected status, expected error text)
    type Case<'a> = (&'a str, Vec<(&'static str, String)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "tampered body",
            good.clone(),
            tampered,
            401,
            "bad_signature",
        ),
        (
            "tampered id",
            with("svix-id", "msg_other".into()),
            body.clone(),
            401,
            "bad_signature",
        ),
        (
            "tampered timestamp",
            with("svix-timestamp", (ts - 1).to_string()),
            body.clone(),
            401,
            "bad_signature",
        ),
        (
            "wrong secret",
            with("svix-signature", other.sign("msg_bad", ts, &body)),
            body.clone(),
            401,
            "bad_signature",
        ),
        (
            "stale timestamp",
            ingest.svix_headers("msg_bad", stale, &body),
            body.clone(),
            401,
            "stale_timestamp",
        ),
        (
            "future timestamp",
            ingest.svix_headers("msg_bad", future, &body),
            body.clone(),
            401,
            "future_timestamp",
        ),
        (
            "missing id",
            without("svix-id"),
            body.clone(),
            401,
            "missing_header",
        ),
        (
            "missing timestamp",
            without("svix-timestamp"),
            body.clone(),
            401,
            "missing_header",
        ),
        (
            "missing signature",
            without("svix-signature"),
            body.clone(),
            401,
            "missing_header",
        ),
        (
            "garbage signature",
            with("svix-signature", "v1,!!!".into()),
            body.clone(),
            401,
            "bad_signature",
        ),
        (
            "not JSON",
            ingest.svix_headers("msg_bad", ts, &not_json),
            not_json.clone(),
            400,
            "not_json",
        ),
        (
            "no member id",
            ingest.svix_headers("msg_bad", ts, &no_member),
            no_member.clone(),
            400,
            "missing_field",
        ),
        (
            "wrong content type",
            with("content-type", "text/plain".into()),
            body.clone(),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            without("content-type"),
            body.clone(),
            415,
            "unsupported_media_type",
        ),
    ];
    for (what, headers, body, status, code) in cases {
        let (got, json) = ingest.post("/webhooks/memberstack", &headers, body).await;
        assert_eq!(got, status, "{what}: {json}");
        assert_eq!(json["error"]["code"], code, "{what}: {json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains(&ingest.svix_secret[6..]),
            "{what}: secret echoed"
        );
        assert!(!message.contains("v1,"), "{what}: signature echoed");
    }
    // Oversized, both declared and streamed without a length.
    let big = vec![b' '; 70_000];
    let (got, json) = ingest
        .post(
            "/webhooks/memberstack",
            &ingest.svix_headers("msg_big", ts, &big),
            big.clone(),
        )
        .await;
    assert_eq!(
        (got, json["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    let stream = reqwest::Body::wrap_stream(futures::stream::iter(
        big.chunks(8192)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    ));
    let (got, json) = ingest
        .post(
            "/webhooks/memberstack",
            &ingest.svix_headers("msg_big", ts, &big),
            stream,
        )
        .await;
    assert_eq!(
        (got, json["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // The sentinel is the first and only record: nothing rejected was produced before it.
    let sentinel = member_created("mem_sentinel");
    assert_eq!(ingest.memberstack("msg_sentinel", &sentinel).await.0, 200);
    let records = support::kafka::consume(
        &ingest.kafka,
        &ingest.memberstack_topic(),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records[0].offset(), 0);
    assert_eq!(records[0].key(), Some(&b"mem_sentinel"[..]));
    let rejected = ingest
        .daemon
        .metric("membersync_ingest_requests_total{reason=\"bad_signature\",source=\"memberstack\",status=\"401\"}")
        .await;
    assert_eq!(rejected, 5.0);
}

#[tokio::test]
async fn rotation_webhook_headers_and_unknown_events_are_accepted() {
    let ingest = Ingest::start().await;
    let body = json!({"event": "member.plan.replaced", "payload": {"id": "mem_rot"}})
        .to_string()
        .into_bytes();
    let ts = now();
    // An old secret's signature first, the current one second: any match is enough.
    let old = SvixVerifier::new(&[SecretString::from(random_secret())]).unwrap();
    let signature = format!(
        "{} {}",
        old.sign("msg_rot", ts, &body),
        ingest.svix.sign("msg_rot", ts, &body)
    );
    let headers = vec![
        (
            "content-type",
            "application/json; charset=utf-8".to_string(),
        ),
        ("webhook-id", "msg_rot".into()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ];
    let (status, json) = ingest.post("/webhooks/memberstack", &headers, body).await;
    assert_eq!(status, 200, "{json}");
    let records = support::kafka::consume(
        &ingest.kafka,
        &ingest.memberstack_topic(),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        header(&records[0], "membersync_unknown_event").as_deref(),
        Some("true")
    );
    assert_eq!(
        ingest
            .daemon
            .metric("membersync_ingest_unknown_events_total")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_delivery_signed_by_the_official_svix_library_is_accepted_and_another_secret_is_refused()
{
    let ingest = Ingest::start().await;
    let body =
        r#"{"event":"member.updated","timestamp":1700000000000,"payload":{"id":"mem_svixlib"}}"#;
    let sign = |secret: &str| -> String {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, datetime\nfrom svix.webhooks import Webhook\n\
                 ts = datetime.datetime.fromtimestamp(int(sys.argv[3]), tz=datetime.timezone.utc)\n\
                 print(Webhook(sys.argv[1]).sign(sys.argv[2], ts, sys.argv[4]))",
                secret,
                "msg_svixlib",
                &now().to_string(),
                body,
            ])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "the official svix Python library is required (pip install svix): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    for (secret, expected) in [(ingest.svix_secret.clone(), 200), (random_secret(), 401)] {
        let headers = vec![
            ("content-type", "application/json".to_string()),
            ("svix-id", "msg_svixlib".into()),
            ("svix-timestamp", now().to_string()),
            ("svix-signature", sign(&secret)),
        ];
        let (status, json) = ingest.post("/webhooks/memberstack", &headers, body).await;
        assert_eq!(status, expected, "{json}");
    }
}

fn subscription_event(id: &str, metadata: Value) -> Vec<u8> {
    json!({"id": id, "object": "event", "type": "customer.subscription.updated", "created": 1_700_000_000,
           "data": {"object": {"id": "sub_1", "object": "subscription", "customer": "cus_42", "status": "past_due",
                               "metadata": metadata, "items": {"data": [{"price": {"id": "price_9"}}]}}}})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn stripe_events_are_keyed_by_member_or_flagged_for_lookup_and_bad_ones_refused() {
    let ingest = Ingest::start().await;
    let post = |body: Vec<u8>, ts: i64, sig: Option<String>| {
        let ingest = &ingest;
        async move {
            let sig = sig.unwrap_or_else(|| ingest.stripe.signature_header(ts, &body));
            let headers = vec![
                (
                    "content-type",
                    "application/json; charset=utf-8".to_string(),
                ),
                ("stripe-signature", sig),
            ];
            ingest.post("/webhooks/stripe", &headers, body).await
        }
    };
    let keyed = subscription_event("evt_keyed", json!({"memberstack_user_id": "mem_stripe"}));
    let unkeyed = subscription_event("evt_lookup", json!({}));
    let ts = now();

    // Refused: stale, v0 only, tampered, unsigned.
    let v0_only = format!("t={ts},v0={}", "0".repeat(64));
    for (body, ts, sig, status, code) in [
        (keyed.clone(), ts - 301, None, 401, "stale_timestamp"),
        (keyed.clone(), ts, Some(v0_only), 401, "no_signatures"),
        (
            unkeyed.clone(),
            ts,
            Some(ingest.stripe.signature_header(ts, &keyed)),
            401,
            "bad_signature",
        ),
        (b"[1,2]".to_vec(), ts, None, 400, "not_an_object"),
    ] {
        let (got, json) = post(body, ts, sig).await;
        assert_eq!(
            (got, json["error"]["code"].as_str()),
            (status, Some(code)),
            "{json}"
        );
    }
    // Accepted: a future timestamp (Stripe only rejects old ones), and both key kinds.
    assert_eq!(post(keyed.clone(), ts + 600, None).await.0, 200);
    assert_eq!(post(unkeyed, ts, None).await.0, 200);
    let unroutable = json!({"id": "evt_none", "type": "balance.available", "data": {"object": {"object": "balance"}}});
    let (status, json) = post(unroutable.to_string().into_bytes(), ts, None).await;
    assert_eq!((status, json["status"].as_str()), (200, Some("ignored")));

    let records = support::kafka::consume(
        &ingest.kafka,
        &ingest.stripe_topic(),
        2,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records[0].key(), Some(&b"mem_stripe"[..]));
    assert_eq!(
        header(&records[0], "membersync_event_id").as_deref(),
        Some("evt_keyed")
    );
    assert_eq!(
        header(&records[0], "ce_type").as_deref(),
        Some("stripe.customer.subscription.updated")
    );
    assert_eq!(records[1].key(), Some(&b"cus_42"[..]));
    assert_eq!(
        header(&records[1], "membersync_needs_lookup").as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn an_unconfigured_source_answers_404() {
    let kafka = support::kafka::config();
    let ingest = Ingest::start_with(
        kafka,
        vec![(
            "MEMBERSYNC__INGEST__STRIPE_WEBHOOK_SECRETS".into(),
            String::new(),
        )],
    )
    .await;
    let body = subscription_event("evt_x", json!({"memberstack_user_id": "mem_x"}));
    let headers = vec![
        ("content-type", "application/json".to_string()),
        (
            "stripe-signature",
            ingest.stripe.signature_header(now(), &body),
        ),
    ];
    let (status, json) = ingest.post("/webhooks/stripe", &headers, body).await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (404, Some("source_not_configured"))
    );
    // The configured source still works, and unknown paths are JSON 404s too.
    assert_eq!(
        ingest
            .memberstack("msg_ok", &member_created("mem_ok"))
            .await
            .0,
        200
    );
    let (status, json) = ingest.post("/webhooks/other", &headers, "{}").await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

#[tokio::test]
async fn broker_down_answers_503_with_retry_after_and_recovers_when_it_returns() {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(1).expect("mock cluster");
    let mut kafka = support::kafka::config();
    kafka.brokers = mock.bootstrap_servers();
    let topic = format!("{}.memberstack", kafka.topic_prefix);
    mock.create_topic(&topic, 1, 1).unwrap();
    let ingest = Ingest::start_with(
        kafka,
        vec![
            ("MEMBERSYNC__KAFKA__CREATE_TOPICS".into(), "false".into()),
            (
                "MEMBERSYNC__INGEST__KAFKA_ACK_TIMEOUT_MS".into(),
                "1500".into(),
            ),
        ],
    )
    .await;
    assert_eq!(
        ingest
            .memberstack("msg_up1", &member_created("mem_m"))
            .await
            .0,
        200
    );

    mock.broker_down(1).unwrap();
    let started = std::time::Instant::now();
    let resp = ingest
        .http
        .post(format!("{}/webhooks/memberstack", ingest.daemon.ingest))
        .headers(to_headermap(&ingest.svix_headers(
            "msg_down",
            now(),
            &member_created("mem_m"),
        )))
        .body(member_created("mem_m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "5");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the ack timeout"
    );
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], "kafka_unavailable");

    mock.broker_up(1).unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    wait_for(
        "a delivery accepted after the broker returned",
        Duration::from_secs(60),
        || {
            let id = format!(
                "msg_back{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            let ingest = &ingest;
            async move {
                (ingest.memberstack(&id, &member_created("mem_m")).await.0 == 200).then_some(())
            }
        },
    )
    .await;
}

fn to_headermap(headers: &[(&'static str, String)]) -> reqwest::header::HeaderMap {
    headers
        .iter()
        .map(|(k, v)| {
            (
                reqwest::header::HeaderName::from_static(k),
                v.parse().unwrap(),
            )
        })
        .collect()
}
