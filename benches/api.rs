//! Member API rejection latency: end-to-end HTTP round trips against `membersync ingest`
//! (release build) on loopback, for tokens the API must refuse — expired, bad signature,
//! unknown kid (answered from the JWKS cache: a negative, no fetch), no token — side by
//! side with a baseline on the same server that does no auth at all (an unknown route,
//! answered by the router's fallback). Target: p99 ≤ 1 ms for every rejection.
//!
//! Closed loop, one keep-alive connection, requests of all cases interleaved round-robin so
//! that machine noise hits every case alike. Latency runs from just before the request is
//! sent to the end of the response body, client included (the baseline carries the same
//! client cost). Writes `bench/results/api.md` (or `MEMBERSYNC_BENCH_OUT`).
//!
//! `cargo bench --bench api`; settings: `MEMBERSYNC_BENCH_REQUESTS` (per case, default
//! 20000), `MEMBERSYNC_BENCH_WARMUP` (per case, default 2000),
//! `MEMBERSYNC_BENCH_QUIET_TIMEOUT_SECS` (wait for other builds/tests first, default 900).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::get;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

mod support;
use support::host::{command_output, env_or, free_port, read_trimmed, repo_root};
use support::stats::percentile;

const KEY_A: &[u8] = include_bytes!("../tests/fixtures/api/key_a.pem");
const KEY_B: &[u8] = include_bytes!("../tests/fixtures/api/key_b.pem");
const AUDIENCE: &str = "app_bench";
const ISSUER: &str = "https://api.memberstack.com";

/// The dev broker, if `.dev/services.env` names one (the server needs no broker to refuse
/// tokens; with one its producer is simply idle).
fn dev_kafka_brokers() -> String {
    std::env::var("MEMBERSYNC_DEV_KAFKA_BROKERS")
        .ok()
        .or_else(|| {
            std::fs::read_to_string(repo_root().join(".dev/services.env"))
                .ok()?
                .lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == "MEMBERSYNC_DEV_KAFKA_BROKERS")
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "127.0.0.1:9092".into())
}

/// Compilers and cargo processes of other people (not this bench's ancestors).
fn foreign_activity() -> BTreeSet<String> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut ancestors = BTreeSet::new();
    let mut pid = std::process::id();
    while let Some(p) = parent(pid) {
        if p == 0 || !ancestors.insert(p) {
            break;
        }
        pid = p;
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| !ancestors.contains(p))
        .filter_map(|p| read_trimmed(format!("/proc/{p}/comm")))
        .filter(|c| {
            matches!(
                c.as_str(),
                "rustc" | "clippy-driver" | "rustdoc" | "cargo-nextest"
            ) || (c == "cargo")
        })
        .collect()
}

fn wait_for_quiet(timeout: Duration) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let busy = foreign_activity();
        if busy.is_empty() || Instant::now() > deadline {
            return busy;
        }
        eprintln!("waiting for other builds/tests to finish: {busy:?}");
        std::thread::sleep(Duration::from_secs(5));
    }
}

fn jwk(pem: &[u8], kid: &str) -> Jwk {
    let mut jwk =
        Jwk::from_encoding_key(&EncodingKey::from_rsa_pem(pem).unwrap(), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk
}

/// A JWKS with key A, counting its fetches.
async fn serve_jwks() -> (SocketAddr, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let set = serde_json::to_value(JwkSet {
        keys: vec![jwk(KEY_A, "key-a")],
    })
    .unwrap();
    let f = fetches.clone();
    let app = axum::Router::new().route(
        "/jwks",
        get(move || {
            f.fetch_add(1, Ordering::SeqCst);
            let set = set.clone();
            async move { Json(set) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, fetches)
}

struct Daemon {
    child: Child,
    ingest: String,
    ops: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_daemon(jwks: SocketAddr) -> Daemon {
    let (ingest_port, ops_port) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_membersync"));
    cmd.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    let child = cmd
        .arg("ingest")
        .env("MEMBERSYNC__KAFKA__BROKERS", dev_kafka_brokers())
        .env("MEMBERSYNC__KAFKA__CREATE_TOPICS", "false")
        .env("MEMBERSYNC__KAFKA__TOPIC_PREFIX", "bench-api")
        .env("MEMBERSYNC__API__ENABLED", "true")
        .env("MEMBERSYNC__API__JWKS_URL", format!("http://{jwks}/jwks"))
        .env("MEMBERSYNC__API__AUDIENCE", AUDIENCE)
        // Long enough that every unknown kid after the startup fetch is a cached negative.
        .env("MEMBERSYNC__API__JWKS_MIN_REFRESH_SECS", "3600")
        .env(
            "MEMBERSYNC__INGEST__LISTEN_ADDR",
            format!("127.0.0.1:{ingest_port}"),
        )
        .env(
            "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
            format!("127.0.0.1:{ops_port}"),
        )
        .env(
            "MEMBERSYNC__TELEMETRY__LOG_LEVEL",
            "warn,librdkafka=off,rdkafka=off",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start membersync ingest");
    let daemon = Daemon {
        child,
        ingest: format!("http://127.0.0.1:{ingest_port}"),
        ops: format!("http://127.0.0.1:{ops_port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/readyz", daemon.ops)).await
            && let Ok(v) = r.json::<Value>().await
            && v["checks"]["startup"] == "ok"
        {
            return daemon;
        }
        assert!(
            Instant::now() < deadline,
            "membersync ingest did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Case {
    name: &'static str,
    path: &'static str,
    authorization: Option<String>,
    expect_status: u16,
    expect_code: &'static str,
    samples: Vec<u64>,
    mismatches: usize,
}

fn token(pem: &[u8], kid: &str, exp_offset: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_owned());
    let claims = json!({"id": "mem_bench", "type": "member", "iss": ISSUER, "aud": AUDIENCE,
                        "iat": now, "exp": now + exp_offset});
    encode(&h, &claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

fn cases() -> Vec<Case> {
    let case = |name, path, authorization: Option<String>, expect_status, expect_code| Case {
        name,
        path,
        authorization,
        expect_status,
        expect_code,
        samples: Vec::new(),
        mismatches: 0,
    };
    let bearer = |t: String| Some(format!("Bearer {t}"));
    vec![
        case(
            "baseline: unknown route, no auth",
            "/v1/bench-baseline",
            None,
            404,
            "",
        ),
        case(
            "no token",
            "/v1/members/me/sync",
            None,
            401,
            "missing_token",
        ),
        case(
            "expired",
            "/v1/members/me/sync",
            bearer(token(KEY_A, "key-a", -3600)),
            401,
            "token_expired",
        ),
        case(
            "bad signature",
            "/v1/members/me/sync",
            bearer(token(KEY_B, "key-a", 3600)),
            401,
            "bad_signature",
        ),
        case(
            "unknown kid (cached negative)",
            "/v1/members/me/sync",
            bearer(token(KEY_A, "no-such-kid", 3600)),
            401,
            "unknown_kid",
        ),
    ]
}

async fn one(http: &reqwest::Client, base: &str, case: &Case) -> (u64, bool) {
    let mut req = http.get(format!("{base}{}", case.path));
    if let Some(a) = &case.authorization {
        req = req.header("authorization", a);
    }
    let started = Instant::now();
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    let ns = started.elapsed().as_nanos() as u64;
    let ok = status == case.expect_status
        && (case.expect_code.is_empty()
            || serde_json::from_slice::<Value>(&body)
                .is_ok_and(|v| v["error"] == case.expect_code));
    (ns, ok)
}

fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo test --benches` / nextest list the binary's tests: a bench has none.
        return;
    }
    let requests = env_or("MEMBERSYNC_BENCH_REQUESTS", 20_000) as usize;
    let warmup = env_or("MEMBERSYNC_BENCH_WARMUP", 2_000) as usize;
    let out = std::env::var("MEMBERSYNC_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("bench/results/api.md"));
    let quiet = Duration::from_secs(env_or("MEMBERSYNC_BENCH_QUIET_TIMEOUT_SECS", 900));

    let (jwks_addr, jwks_fetches) = serve_jwks().await;
    let daemon = start_daemon(jwks_addr).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let mut cases = cases();

    let busy_before = wait_for_quiet(quiet);
    let load_before = read_trimmed("/proc/loadavg").unwrap_or_default();
    for _ in 0..warmup {
        for case in &cases {
            one(&http, &daemon.ingest, case).await;
        }
    }
    let fetches_before = jwks_fetches.load(Ordering::SeqCst);
    let mut busy_during = BTreeSet::new();
    let started = Instant::now();
    for i in 0..requests {
        // Rotate the order each round so no case always follows another.
        let n = cases.len();
        for k in 0..n {
            let case = &mut cases[(i + k) % n];
            let (ns, ok) = one(&http, &daemon.ingest, case).await;
            case.samples.push(ns);
            if !ok {
                case.mismatches += 1;
            }
        }
        if i % 5_000 == 0 {
            busy_during.extend(foreign_activity());
        }
    }
    let wall = started.elapsed();
    let load_after = read_trimmed("/proc/loadavg").unwrap_or_default();
    let fetches_during = jwks_fetches.load(Ordering::SeqCst) - fetches_before;
    drop(daemon);

    let mut table = String::from(
        "| case | answer | requests | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | p99 − baseline p99 | p99 ≤ 1 ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let baseline_p99 = {
        let mut s = cases[0].samples.clone();
        s.sort_unstable();
        percentile(&s, 0.99)
    };
    let mut all_ok = true;
    for case in &mut cases {
        case.samples.sort_unstable();
        let s = &case.samples;
        let p99 = percentile(s, 0.99);
        let rejection = case.expect_status == 401;
        let ok = p99 <= 1_000_000;
        if rejection {
            all_ok &= ok && case.mismatches == 0;
        }
        let answer = if case.expect_code.is_empty() {
            format!("{}", case.expect_status)
        } else {
            format!("{} `{}`", case.expect_status, case.expect_code)
        };
        table.push_str(&format!(
            "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            case.name,
            answer,
            if case.mismatches > 0 {
                format!(" ({} unexpected answers)", case.mismatches)
            } else {
                String::new()
            },
            s.len(),
            ms(percentile(s, 0.5)),
            ms(percentile(s, 0.9)),
            ms(p99),
            ms(percentile(s, 0.999)),
            ms(*s.last().unwrap_or(&0)),
            if rejection {
                format!("{:+.3}", (p99 as f64 - baseline_p99 as f64) / 1e6)
            } else {
                "—".into()
            },
            if rejection {
                if ok { "yes" } else { "**no**" }
            } else {
                "—"
            },
        ));
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    let report = format!(
        "# API rejection latency (`benches/api.rs`)\n\n\
         Target: **p99 ≤ 1 ms** end to end for a refused member token. Result: **{verdict}**.\n\n\
         - Server: `membersync ingest` (release), API mode `jwks` (RS256, one cached key), \
           audience and issuer checked; the test JWKS was fetched {fetches_during} time(s) during \
           the measured run (the unknown kid is answered from the cache).\n\
         - Client: this bench, one keep-alive HTTP/1.1 connection, closed loop, the cases \
           interleaved round-robin; latency = send → end of body, client included. Warm-up: \
           {warmup} requests per case, not counted.\n\
         - Baseline: the same server and connection, a route that does no auth (the router's \
           404 fallback), so `p99 − baseline p99` is what token checking adds.\n\n\
         {table}\n\
         {n} requests in {wall:.1} s.\n\n\
         ## Machine and run\n\n\
         - CPU: {cpu}, {nproc} cores (shared with other engineers' builds; compare within a run)\n\
         - load average before / after: `{load_before}` / `{load_after}`\n\
         - other builds/tests seen before measuring: {busy_before}; during: {busy_during}\n\
         - commit: `{commit}`{dirty}\n\
         - command: `cargo bench --bench api` (MEMBERSYNC_BENCH_REQUESTS={requests}, \
           MEMBERSYNC_BENCH_WARMUP={warmup})\n",
        verdict = if all_ok { "met" } else { "NOT met" },
        n = requests * cases.len(),
        wall = wall.as_secs_f64(),
        nproc = std::thread::available_parallelism().map_or(0, |n| n.get()),
        busy_before = if busy_before.is_empty() {
            "none".to_owned()
        } else {
            format!("{busy_before:?}")
        },
        busy_during = if busy_during.is_empty() {
            "none".to_owned()
        } else {
            format!("{busy_during:?}")
        },
        dirty = if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        },
    );
    std::fs::write(&out, &report).expect("write the report");
    println!("{report}");
    println!("written to {}", out.display());
}
