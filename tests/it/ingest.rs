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
pub(crate) struct Ingest {
    pub(crate) daemon: Daemon,
    pub(crate) kafka: KafkaConfig,
    svix: SvixVerifier,
    svix_secret: String,
    stripe: StripeVerifier,
    http: reqwest::Client,
}

impl Ingest {
    /// `extra` overrides the defaults; a pair with an empty value removes that variable.
    pub(crate) async fn start_with(kafka: KafkaConfig, extra: Vec<(String, String)>) -> Ingest {
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

    /// `127.0.0.1:<port>` of the ingest server.
    pub(crate) fn addr(&self) -> String {
        self.daemon.ingest.trim_start_matches("http://").to_owned()
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

    pub(crate) fn svix_headers(
        &self,
        id: &str,
        ts: i64,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
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
    // Oversized, both declared and streamed without a length. The server answers 413 as
    // soon as it knows and stops reading, so these go over a raw connection that reads the
    // answer even if its own write fails (reqwest reports a broken pipe instead of the answer).
    let big = vec![b' '; 70_000];
    let signed = ingest.svix_headers("msg_big", ts, &big);
    let declared = raw_exchange(
        &ingest.addr(),
        &request_head("/webhooks/memberstack", &signed, Some(big.len())),
        &big,
    )
    .await;
    assert_eq!(
        (declared.status, declared.json["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{declared:?}"
    );
    let mut chunked = Vec::new();
    for chunk in big.chunks(8192) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = raw_exchange(
        &ingest.addr(),
        &request_head("/webhooks/memberstack", &signed, None),
        &chunked,
    )
    .await;
    assert_eq!(
        (streamed.status, streamed.json["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{streamed:?}"
    );

    // A common client (reqwest: writes the whole body before it reads) posting a body far
    // beyond the limit: it must see the 413, not a broken pipe or a reset (the server drains
    // what it does not read before closing).
    let huge = vec![b' '; 600_000];
    for _ in 0..3 {
        let (got, json) = ingest
            .post(
                "/webhooks/memberstack",
                &ingest.svix_headers("msg_huge", ts, &huge),
                huge.clone(),
            )
            .await;
        assert_eq!(
            (got, json["error"]["code"].as_str()),
            (413, Some("payload_too_large"))
        );
    }

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

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1, for the answers a server gives before it has read the whole request
// ---------------------------------------------------------------------------------------

/// An answer read off a raw connection.
#[derive(Debug)]
pub(crate) struct RawAnswer {
    pub(crate) status: u16,
    /// The head, header names lowercased.
    pub(crate) head: String,
    pub(crate) json: Value,
}

impl RawAnswer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.eq_ignore_ascii_case(name)).then(|| v.trim())
        })
    }
}

/// A POST head: `headers`, then `Content-Length: <len>` or, with `None`, chunked encoding.
pub(crate) fn request_head(path: &str, headers: &[(&str, String)], len: Option<usize>) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match len {
        Some(len) => head.push_str(&format!("Content-Length: {len}\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Writes `head` and `body` on a new connection, carrying on if the write fails (the server
/// may answer early and stop reading), then reads the answer until the server closes the
/// connection. Panics when no answer comes within 10 s.
pub(crate) async fn raw_exchange(addr: &str, head: &[u8], body: &[u8]) -> RawAnswer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = write_all_tolerant(&mut stream, head).await;
    let _ = write_all_tolerant(&mut stream, body).await;
    read_answer(&mut stream, Duration::from_secs(10))
        .await
        .expect("an answer")
}

/// `Err` when the peer stopped taking bytes (reset, broken pipe).
pub(crate) async fn write_all_tolerant(
    stream: &mut tokio::net::TcpStream,
    bytes: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    stream.write_all(bytes).await
}

/// Reads one answer until the server closes the connection; `None` when nothing complete
/// arrived within `timeout`. A reset after the answer is tolerated.
pub(crate) async fn read_answer(
    stream: &mut tokio::net::TcpStream,
    timeout: Duration,
) -> Option<RawAnswer> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    parse_answer(&bytes)
}

pub(crate) fn parse_answer(bytes: &[u8]) -> Option<RawAnswer> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(RawAnswer {
        status,
        head: head.to_owned(),
        json: serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    })
}

/// Svix headers that pass every check that does not need the body (fresh timestamp, a
/// well-formed `v1` entry) but cannot verify: what a forger can send.
fn forged_svix_headers(id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("svix-id", id.into()),
        ("svix-timestamp", now().to_string()),
        (
            "svix-signature",
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode([7u8; 32])
            ),
        ),
    ]
}

/// Opens a connection that sends `head` and `partial` bytes of its body, then stays silent.
async fn stalled(addr: &str, head: &[u8], partial: &[u8]) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    write_all_tolerant(&mut stream, head).await.unwrap();
    write_all_tolerant(&mut stream, partial).await.unwrap();
    stream
}

#[tokio::test]
async fn bad_signature_headers_are_answered_before_the_body_is_sent() {
    let ingest = Ingest::start().await;
    let addr = ingest.addr();
    let body = member_created("mem_early");
    let ts = now();
    let good = ingest.svix_headers("msg_early", ts, &body);
    let without = |name: &str| -> Vec<(&'static str, String)> {
        good.iter().filter(|(k, _)| *k != name).cloned().collect()
    };
    let with = |name: &str, value: String| -> Vec<(&'static str, String)> {
        good.iter()
            .map(|(k, v)| (*k, if *k == name { value.clone() } else { v.clone() }))
            .collect()
    };
    let stripe_body = subscription_event("evt_early", json!({}));
    let stripe_stale = ingest.stripe.signature_header(ts - 301, &stripe_body);
    // (what, path, headers, expected code). Each declares a body within the limit (so the
    // length alone refuses nothing) and sends only 100 bytes of it: an answer proves the
    // server did not wait for the rest.
    type Case<'a> = (&'a str, &'a str, Vec<(&'static str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no signature",
            "/webhooks/memberstack",
            without("svix-signature"),
            "missing_header",
        ),
        (
            "no id",
            "/webhooks/memberstack",
            without("svix-id"),
            "missing_header",
        ),
        (
            "timestamp not a number",
            "/webhooks/memberstack",
            with("svix-timestamp", "soon".into()),
            "malformed_header",
        ),
        (
            "stale",
            "/webhooks/memberstack",
            with("svix-timestamp", (ts - 301).to_string()),
            "stale_timestamp",
        ),
        (
            "future",
            "/webhooks/memberstack",
            with("svix-timestamp", (ts + 301).to_string()),
            "future_timestamp",
        ),
        (
            "no v1 entry",
            "/webhooks/memberstack",
            with("svix-signature", "v2,abc".into()),
            "no_signatures",
        ),
        (
            "undecodable v1",
            "/webhooks/memberstack",
            with("svix-signature", "v1,!!!".into()),
            "bad_signature",
        ),
        (
            "no Stripe-Signature",
            "/webhooks/stripe",
            vec![("content-type", "application/json".into())],
            "missing_header",
        ),
        (
            "Stripe-Signature without t",
            "/webhooks/stripe",
            vec![
                ("content-type", "application/json".into()),
                ("stripe-signature", format!("v1={}", "0".repeat(64))),
            ],
            "malformed_header",
        ),
        (
            "stale Stripe timestamp",
            "/webhooks/stripe",
            vec![
                ("content-type", "application/json".into()),
                ("stripe-signature", stripe_stale),
            ],
            "stale_timestamp",
        ),
    ];
    for (what, path, headers, code) in cases {
        let mut stream = stalled(
            &addr,
            &request_head(path, &headers, Some(60_000)),
            &[b' '; 100],
        )
        .await;
        let started = std::time::Instant::now();
        let answer = read_answer(&mut stream, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("{what}: no answer while the body was still owed"));
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (401, Some(code)),
            "{what}: {answer:?}"
        );
        assert_eq!(answer.header("connection"), Some("close"), "{what}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: answered late"
        );
    }
    // A client that writes its whole body before reading (reqwest) gets the early answer too,
    // not a broken pipe: the server drains what it did not read before closing.
    for _ in 0..3 {
        let (status, json) = ingest
            .post(
                "/webhooks/memberstack",
                &without("svix-signature"),
                vec![b' '; 60_000],
            )
            .await;
        assert_eq!(
            (status, json["error"]["code"].as_str()),
            (401, Some("missing_header"))
        );
    }
    assert_eq!(
        ingest
            .daemon
            .metric("membersync_ingest_shed_total{reason=\"full\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_at_the_body_deadline_and_the_connection_closes() {
    let ingest = Ingest::start_with(
        support::kafka::config(),
        vec![(
            "MEMBERSYNC__INGEST__BODY_READ_TIMEOUT_MS".into(),
            "1000".into(),
        )],
    )
    .await;
    let body = member_created("mem_slow");
    let headers = ingest.svix_headers("msg_slow", now(), &body);
    let head = request_head("/webhooks/memberstack", &headers, Some(body.len()));
    let started = std::time::Instant::now();
    let mut stream = stalled(&ingest.addr(), &head, &body[..body.len() - 1]).await;
    let answer = read_answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer");
    let took = started.elapsed();
    assert_eq!(
        (answer.status, answer.json["error"]["code"].as_str()),
        (408, Some("body_read_timeout")),
        "{answer:?}"
    );
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    // `read_answer` returned because the server closed the connection, not at its timeout.
    assert!(took < Duration::from_secs(5));
}

#[tokio::test]
async fn a_connection_that_sends_no_complete_headers_is_closed() {
    let ingest = Ingest::start_with(
        support::kafka::config(),
        vec![(
            "MEMBERSYNC__INGEST__HEADER_READ_TIMEOUT_MS".into(),
            "500".into(),
        )],
    )
    .await;
    for partial in [
        &b""[..],
        b"POST /webhooks/memberstack HTTP/1.1\r\nHost: x\r\n",
    ] {
        let started = std::time::Instant::now();
        let mut stream = stalled(&ingest.addr(), partial, b"").await;
        // Whatever the server sends (nothing, or an error answer), it then closes.
        let mut rest = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
        )
        .await
        .expect("the server closes the connection")
        .ok();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "closed after {:?}",
            started.elapsed()
        );
    }
    // Both are gone once their drain saw this side close.
    wait_for("no open connections", Duration::from_secs(5), || async {
        (ingest.daemon.metric("membersync_ingest_connections").await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_valid_delivery_takes_the_slot_of_a_silent_body_when_every_slot_is_taken() {
    let ingest = Ingest::start_with(
        support::kafka::config(),
        vec![("MEMBERSYNC__INGEST__CONCURRENCY_LIMIT".into(), "2".into())],
    )
    .await;
    let addr = ingest.addr();
    // Two forgers send all but the last byte of their bodies and stop: both slots taken.
    let head = request_head(
        "/webhooks/memberstack",
        &forged_svix_headers("msg_loris"),
        Some(1000),
    );
    let mut lorises = Vec::new();
    for _ in 0..2 {
        lorises.push(stalled(&addr, &head, &[b' '; 999]).await);
    }
    wait_for("both slots taken", Duration::from_secs(10), || async {
        (ingest.daemon.metric("membersync_ingest_in_flight").await == 2.0).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let (status, json) = ingest
        .memberstack("msg_through", &member_created("mem_through"))
        .await;
    assert_eq!(status, 200, "{json}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "accepted after {:?}",
        started.elapsed()
    );
    // One forger (the one silent longest; both went quiet in the same millisecond, maybe)
    // got 503 with Retry-After and a closed connection; the other still waits for its body.
    let (a, b) = lorises.split_at_mut(1);
    let (a, b) = tokio::join!(
        read_answer(&mut a[0], Duration::from_secs(2)),
        read_answer(&mut b[0], Duration::from_secs(2))
    );
    let mut answers: Vec<RawAnswer> = a.into_iter().chain(b).collect();
    assert_eq!(answers.len(), 1, "exactly one forger is shed: {answers:?}");
    let shed = answers.pop().unwrap();
    assert_eq!(
        (shed.status, shed.json["error"]["code"].as_str()),
        (503, Some("shed_silent_body")),
        "{shed:?}"
    );
    assert_eq!(shed.header("retry-after"), Some("5"));
    assert_eq!(
        ingest
            .daemon
            .metric("membersync_ingest_shed_total{reason=\"silent_body\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn beyond_the_in_flight_limit_webhooks_and_the_api_get_503_with_retry_after_at_once() {
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
                "6000".into(),
            ),
            ("MEMBERSYNC__INGEST__CONCURRENCY_LIMIT".into(), "2".into()),
        ],
    )
    .await;
    // Two genuine deliveries wait for a broker that is down: both slots busy with real work.
    mock.broker_down(1).unwrap();
    let ingest = std::sync::Arc::new(ingest);
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let ingest = std::sync::Arc::clone(&ingest);
            tokio::spawn(async move {
                ingest
                    .memberstack(&format!("msg_wait{i}"), &member_created("mem_w"))
                    .await
                    .0
            })
        })
        .collect();
    wait_for("both slots taken", Duration::from_secs(10), || async {
        (ingest.daemon.metric("membersync_ingest_in_flight").await == 2.0).then_some(())
    })
    .await;

    let started = std::time::Instant::now();
    let resp = ingest
        .http
        .post(format!("{}/webhooks/memberstack", ingest.daemon.ingest))
        .headers(to_headermap(&ingest.svix_headers(
            "msg_more",
            now(),
            &member_created("mem_m"),
        )))
        .body(member_created("mem_m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "5");
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "overloaded"
    );
    let api = ingest
        .http
        .get(format!("{}/v1/members/me/sync", ingest.daemon.ingest))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status().as_u16(), 503);
    assert_eq!(api.headers().get("retry-after").unwrap(), "5");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shed after {:?}",
        started.elapsed()
    );
    assert_eq!(
        ingest
            .daemon
            .metric("membersync_ingest_shed_total{reason=\"full\"}")
            .await,
        2.0
    );

    // Once the broker is back the waiting ones finish, and new requests get slots again.
    mock.broker_up(1).unwrap();
    for w in waiting {
        let _ = w.await.unwrap();
    }
    let api = ingest
        .http
        .get(format!("{}/v1/members/me/sync", ingest.daemon.ingest))
        .send()
        .await
        .unwrap();
    assert_ne!(api.status().as_u16(), 503);
}
