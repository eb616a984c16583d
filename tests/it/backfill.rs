//! `membersync backfill` end to end: the real binary against the Memberstack and Supabase
//! Auth simulators, the dev Postgres and broker, with `membersync merge` reconciling what the
//! backfill publishes. Both sides are seeded directly (simulator dashboard without webhooks,
//! SQL), as if membersync had never run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Output, Stdio};
use std::time::Duration;

use membersync::sim::memberstack::{MemberstackConfig, MemberstackSim, NewMember, PlanChange};
use membersync::sim::supabase_auth::{AuthConfig, AuthSim};
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::support::{self, TestDb, daemon::Daemon, wait_for};

const API_KEY: &str = "sk_sb_backfill_test_key";
const SERVICE_KEY: &str = "service-role-backfill-key";

/// Fields drop in order: the database goes last.
struct Env {
    admin: Client,
    kafka: membersync::config::KafkaConfig,
    ms: MemberstackSim,
    _auth: AuthSim,
    env: Vec<(String, String)>,
    _db: TestDb,
}

impl Env {
    async fn start() -> Env {
        let db = TestDb::migrated().await;
        let admin = db.admin().await;
        let kafka = support::kafka::config();
        // No webhook URL: seeding the simulator must not reach membersync; only the backfill
        // tells merge about these members.
        let ms = MemberstackSim::start(MemberstackConfig::new(API_KEY))
            .await
            .expect("memberstack simulator");
        let dsn = db.superuser_dsn();
        let auth = AuthSim::start(AuthConfig::new(dsn, SERVICE_KEY))
            .await
            .expect("auth simulator");
        let mut env = db.env();
        for (k, v) in [
            ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.clone()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
                kafka.topic_prefix.clone(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "3".into()),
            ("MEMBERSYNC__MEMBERSTACK__API_URL", ms.base_url()),
            ("MEMBERSYNC__MEMBERSTACK__API_KEY", API_KEY.into()),
            ("MEMBERSYNC__MEMBERSTACK__BACKOFF_BASE_MS", "50".into()),
            ("MEMBERSYNC__SUPABASE__URL", auth.base_url()),
            ("MEMBERSYNC__SUPABASE__SERVICE_ROLE_KEY", SERVICE_KEY.into()),
            (
                "MEMBERSYNC__MERGE__GROUP_ID",
                support::unique_name("backfill"),
            ),
            ("MEMBERSYNC__MERGE__COMMIT_INTERVAL_MS", "200".into()),
            ("MEMBERSYNC__MERGE__WORKERS", "8".into()),
            (
                "MEMBERSYNC__TELEMETRY__LOG_LEVEL",
                "info,librdkafka=off,rdkafka=off".into(),
            ),
        ] {
            env.push((k.into(), v));
        }
        Env {
            _db: db,
            admin,
            kafka,
            ms,
            _auth: auth,
            env,
        }
    }

    fn backfill_command(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Command {
        let mut cmd = support::membersync();
        cmd.arg("backfill")
            .args(args)
            .envs(self.env.clone())
            .envs(extra.iter().map(|(k, v)| (*k, *v)));
        cmd
    }

    /// Runs `membersync backfill ARGS` to the end.
    fn backfill(&self, args: &[&str]) -> Output {
        let out = self
            .backfill_command(args, &[])
            .stderr(Stdio::inherit())
            .output()
            .expect("run membersync backfill");
        assert!(
            out.status.success(),
            "membersync backfill {args:?} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        out
    }

    fn dry_run(&self) -> Value {
        let out = self.backfill(&["--dry-run", "--json"]);
        serde_json::from_slice(&out.stdout).expect("the dry run prints JSON")
    }

    fn create(&self, email: &str, custom: Value, meta: Value) -> String {
        let new: NewMember = serde_json::from_value(json!({
            "email": email,
            "customFields": custom,
            "metaData": meta,
            "plans": [{"planId": "pln_free"}],
        }))
        .unwrap();
        self.ms.dashboard_create(new).expect("dashboard create").id
    }

    fn ms_member(&self, id: &str) -> Value {
        serde_json::to_value(self.ms.member(id).expect("member in the simulator")).unwrap()
    }

    async fn insert_row(&self, id: &str, row: &Value) {
        self.admin
            .execute(
                "insert into public.members
                   select * from jsonb_populate_record(null::public.members, $1)",
                &[&json!({
                    "id": uuid::Uuid::new_v4(),
                    "memberstack_id": id,
                    "email": row["email"],
                    "subscription_status": row["subscription_status"],
                    "subscription_status_raw": row["subscription_status_raw"],
                    "plan_id": row["plan_id"],
                    "custom_fields": row["custom_fields"],
                    "project_data": row["project_data"],
                    "usage_stats": row["usage_stats"],
                    "created_at": "2026-01-01T00:00:00Z",
                    "updated_at": "2026-01-01T00:00:00Z",
                })],
            )
            .await
            .expect("insert members row");
    }

    async fn row(&self, id: &str) -> Option<Value> {
        self.admin
            .query_opt(
                "select to_jsonb(m) from public.members m where memberstack_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    fn list_calls(&self) -> Vec<String> {
        self.ms
            .calls()
            .into_iter()
            .filter(|c| c.endpoint == "GET /members")
            .map(|c| c.path)
            .collect()
    }
}

/// The `after` parameter of a list request path (`None`: the first page).
fn after_of(path: &str) -> Option<u64> {
    let query = path.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .map(|v| v.parse().expect("numeric cursor"))
}

/// What a seeded member looks like in Supabase when both sides agree.
fn agreeing_row(email: &str, custom: &Value, project: &Value) -> Value {
    json!({
        "email": email,
        "subscription_status": "active",
        "subscription_status_raw": "ACTIVE",
        "plan_id": "pln_free",
        "custom_fields": custom,
        "project_data": project,
        "usage_stats": {},
    })
}

/// One planted drift: the member, the field, its category and the value that must win.
struct Drift {
    member: String,
    field: &'static str,
    category: &'static str,
    /// Where the winner's value must end up: "supabase" (column) or "memberstack" (member).
    fixed_on: &'static str,
    expected: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reports_exactly_the_planted_drift_and_reconciles_it() {
    let env = Env::start().await;
    // 1,000 members in Memberstack; 780 of them have a row, 220 do not; 20 more rows have no
    // member. 50 fields of the 780 differ, one per member, over every category and
    // authority. The other members agree field by field.
    const MEMBERS: usize = 1000;
    const WITH_ROW: usize = 780;
    let mut drifts = Vec::new();
    let mut ids = Vec::new();
    for i in 0..MEMBERS {
        let email = format!("member{i}@example.com");
        let mut custom = json!({"tier": "basic", "n": i});
        let mut meta = json!({"project_data": {"p": i}});
        let mut row = agreeing_row(&email, &custom, &json!({"p": i}));
        // Which drift (if any) member i carries: 50 members, kinds in blocks.
        let (field, category, fixed_on) = match i {
            0..8 => ("email", "different", "supabase"),
            8..14 => ("subscription_status", "different", "supabase"),
            14..18 => ("plan_id", "only_in_memberstack", "supabase"),
            18..26 => ("custom_fields", "different", "supabase"),
            26..30 => ("custom_fields", "only_in_memberstack", "supabase"),
            30..32 => ("custom_fields", "only_in_supabase", "supabase"),
            32..40 => ("project_data", "different", "memberstack"),
            40..46 => ("project_data", "only_in_supabase", "memberstack"),
            46..50 => ("usage_stats", "only_in_memberstack", "memberstack"),
            _ => ("", "", ""),
        };
        let expected = match field {
            "email" => {
                row["email"] = json!(format!("old{i}@example.com"));
                json!(email)
            }
            "subscription_status" => {
                row["subscription_status"] = json!("cancelled");
                row["subscription_status_raw"] = json!("CANCELED");
                json!("active")
            }
            "plan_id" => {
                row["plan_id"] = Value::Null;
                json!("pln_free")
            }
            // `latest`: the snapshot shows a value merge never saw, read now: it is newer
            // than the seeded rows' edits, so Memberstack's value wins.
            "custom_fields" if category == "different" => {
                row["custom_fields"] = json!({"tier": "gold", "n": i});
                custom.clone()
            }
            "custom_fields" if category == "only_in_memberstack" => {
                row["custom_fields"] = json!({});
                custom.clone()
            }
            "custom_fields" => {
                custom = json!({});
                json!({})
            }
            // Supabase owns these: its value is pushed to Memberstack.
            "project_data" if category == "different" => {
                row["project_data"] = json!({"p": i, "edited": true});
                json!({"p": i, "edited": true})
            }
            "project_data" => {
                meta = json!({});
                json!({"p": i})
            }
            "usage_stats" => {
                meta["usage_stats"] = json!({"runs": 5});
                json!({})
            }
            _ => Value::Null,
        };
        let id = env.create(&email, custom, meta);
        if !field.is_empty() {
            drifts.push(Drift {
                member: id.clone(),
                field,
                category,
                fixed_on,
                expected,
            });
        }
        if i < WITH_ROW {
            env.insert_row(&id, &row).await;
        }
        ids.push(id);
    }
    let supabase_only: Vec<String> = (0..20).map(|k| format!("mem_sbonly_{k:02}")).collect();
    for (k, id) in supabase_only.iter().enumerate() {
        let email = format!("gone{k}@example.com");
        env.insert_row(id, &agreeing_row(&email, &json!({}), &json!({})))
            .await;
    }
    assert_eq!(drifts.len(), 50);

    // The dry run reports exactly the planted drift, and writes nothing anywhere.
    let report = env.dry_run();
    let reported: BTreeSet<(String, String, String)> = report["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["member_id"].as_str().unwrap().to_owned(),
                d["field"].as_str().unwrap().to_owned(),
                d["category"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let planted: BTreeSet<(String, String, String)> = drifts
        .iter()
        .map(|d| (d.member.clone(), d.field.to_owned(), d.category.to_owned()))
        .collect();
    assert_eq!(report["fields"].as_array().unwrap().len(), 50);
    assert_eq!(reported, planted);
    assert_eq!(
        report["counts"],
        json!({"only_in_memberstack": 12, "only_in_supabase": 8, "different": 30})
    );
    let only_ms: BTreeSet<&str> = report["members_only_in_memberstack"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        only_ms,
        ids[WITH_ROW..].iter().map(String::as_str).collect()
    );
    assert_eq!(report["members_only_in_supabase"], json!(supabase_only));
    assert!(
        env.ms.calls().iter().all(|c| c.method == "GET"),
        "the dry run only reads Memberstack"
    );
    let runs: i64 = env
        .admin
        .query_one("select count(*) from membersync_meta.backfill_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 0, "the dry run keeps no state");
    let table = String::from_utf8(env.backfill(&["--dry-run"]).stdout).unwrap();
    assert!(
        table
            .contains("field drift: 50 (only in Memberstack 12, only in Supabase 8, different 30)"),
        "{table}"
    );

    // The backfill with merge running reconciles everything per authority.
    let _merge = Daemon::start("merge", env.env.clone()).await;
    let out = env.backfill(&["--json", "--no-snapshot"]);
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["members_published"], json!(MEMBERS));
    assert_eq!(outcome["pages_done"], json!(10));
    wait_for(
        "merge to process every snapshot",
        Duration::from_secs(180),
        || async {
            let n: i64 = env
                .admin
                .query_one(
                    "select count(*) from public.webhook_log where event_id like 'backfill_%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n as usize == MEMBERS).then_some(())
        },
    )
    .await;

    let after = env.dry_run();
    assert_eq!(after["fields"], json!([]), "no field drift is left");
    assert_eq!(after["members_only_in_memberstack"], json!([]));
    assert_eq!(
        after["members_only_in_supabase"],
        json!(supabase_only),
        "rows without a member are reported, never deleted"
    );
    for d in &drifts {
        let got = if d.fixed_on == "supabase" {
            env.row(&d.member).await.unwrap()[d.field].clone()
        } else {
            env.ms_member(&d.member)["metaData"][d.field].clone()
        };
        assert_eq!(
            got, d.expected,
            "{} {} ({}) must end as the authority's value",
            d.member, d.field, d.category
        );
    }
    // Members only in Memberstack got a row and an auth user, like any new member (the
    // Supabase Auth applier creates it after the row is committed).
    let only_in_memberstack = ids[WITH_ROW..].to_vec();
    wait_for(
        "an auth user for every new member",
        Duration::from_secs(60),
        || async {
            let users: i64 = env
                .admin
                .query_one(
                    "select count(*) from public.members m join auth.users u on u.id = m.user_id
                  where m.memberstack_id = any($1)",
                    &[&only_in_memberstack],
                )
                .await
                .unwrap()
                .get(0);
            (users as usize == MEMBERS - WITH_ROW).then_some(())
        },
    )
    .await;
    // Only Supabase-owned drift was written to Memberstack: one PATCH per such member.
    let patches = env
        .ms
        .calls()
        .iter()
        .filter(|c| c.method == "PATCH")
        .count();
    assert_eq!(
        patches,
        drifts
            .iter()
            .filter(|d| d.fixed_on == "memberstack")
            .count()
    );
    let done: Option<chrono::DateTime<chrono::Utc>> = env
        .admin
        .query_one(
            "select completed_at from membersync_meta.backfill_runs",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(done.is_some(), "the run is recorded as completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backfill_resumes_without_rereading_finished_pages() {
    let env = Env::start().await;
    const MEMBERS: usize = 600;
    let ids: Vec<String> = (0..MEMBERS)
        .map(|i| env.create(&format!("r{i}@example.com"), json!({"n": i}), json!({})))
        .collect();
    // A paid plan on some, so snapshots are not all alike.
    for id in ids.iter().step_by(7) {
        env.ms
            .dashboard_plan(
                id,
                PlanChange::Add {
                    plan_id: "pln_pro".into(),
                    plan_name: None,
                    plan_type: Some("SUBSCRIPTION".into()),
                    status: Some("ACTIVE".into()),
                },
            )
            .unwrap();
    }
    // 30 pages of 20 at 10 requests/s: about 3 s, time enough to kill it mid-run.
    let slow = [("MEMBERSYNC__MEMBERSTACK__REQUESTS_PER_SECOND", "10")];
    let mut child = env
        .backfill_command(&["--page-size", "20", "--json", "--no-snapshot"], &slow)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start membersync backfill");
    let (run_id, pages, cursor): (i64, i64, i64) =
        wait_for("five finished pages", Duration::from_secs(60), || async {
            let row = env
                .admin
                .query_opt(
                    "select id, pages_done, cursor from membersync_meta.backfill_runs
                      where pages_done >= 5",
                    &[],
                )
                .await
                .unwrap()?;
            Some((row.get(0), row.get(1), row.get(2)))
        })
        .await;
    child.kill().expect("kill -9 the backfill");
    child.wait().unwrap();
    let state: (i64, i64, Option<chrono::DateTime<chrono::Utc>>) = {
        let r = env
            .admin
            .query_one(
                "select pages_done, cursor, completed_at from membersync_meta.backfill_runs",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert!(state.0 >= pages && state.1 >= cursor && state.2.is_none());
    let (pages_at_kill, cursor_at_kill) = (state.0, state.1 as u64);
    assert!(
        (pages_at_kill as usize) < MEMBERS / 20,
        "killed before the end ({pages_at_kill} pages)"
    );
    let first_run_calls = env.list_calls().len();

    let out = env.backfill(&["--page-size", "20", "--json", "--no-snapshot"]);
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["run_id"], json!(run_id));
    assert_eq!(outcome["resumed"], json!(true));
    assert_eq!(outcome["members_published"], json!(MEMBERS));
    assert_eq!(outcome["pages_done"], json!(MEMBERS / 20));
    assert_eq!(
        outcome["this_invocation"]["pages"],
        json!(MEMBERS / 20 - pages_at_kill as usize)
    );
    // Issue #16, item 9: each invocation leaves its trace in audit_logs.
    let audit: Vec<(String, String, Value)> = env
        .admin
        .query(
            "select action, target, details from public.audit_logs
              where action like 'backfill_%' order by created_at, action",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let actions: Vec<&str> = audit.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["backfill_started", "backfill_resumed", "backfill_completed"],
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .all(|(_, target, _)| *target == format!("backfill_run:{run_id}"))
    );
    assert_eq!(audit[2].2["members_published"], json!(MEMBERS));

    // The second invocation starts at the saved cursor and never asks for an earlier page.
    let calls = env.list_calls();
    let resumed: Vec<Option<u64>> = calls[first_run_calls..]
        .iter()
        .map(|p| after_of(p))
        .collect();
    assert_eq!(resumed[0], Some(cursor_at_kill));
    assert!(
        resumed
            .iter()
            .all(|a| a.is_some_and(|c| c >= cursor_at_kill)),
        "finished pages were read again: {resumed:?}"
    );
    // Over both invocations every page was requested once, except those the first one had
    // not finished: the pages waiting for acknowledgements and the one being fetched.
    let mut per_cursor: HashMap<Option<u64>, usize> = HashMap::new();
    for p in &calls {
        *per_cursor.entry(after_of(p)).or_default() += 1;
    }
    let reread: Vec<_> = per_cursor.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        reread.len() <= membersync::backfill::pass::PAGES_IN_FLIGHT + 1,
        "pages read more than once: {reread:?}"
    );
    assert!(
        reread
            .iter()
            .all(|(c, n)| **n == 2 && c.is_some_and(|c| c >= cursor_at_kill)),
        "a finished page was read again: {reread:?}"
    );
    assert_eq!(per_cursor.len(), MEMBERS / 20);

    // Every member is on the topic (members of an unfinished page may appear twice, with the
    // same event id: merge drops the copy).
    let topic = format!("{}.memberstack", env.kafka.topic_prefix);
    let by_member = read_snapshots(&env.kafka, &topic, ids.len()).await;
    assert_eq!(
        by_member.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(
        by_member.values().all(|ids| ids.len() == 1),
        "a re-published member keeps its event id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_triggers_an_incremental_snapshot_of_the_captured_tables_and_waits_for_it() {
    let env = Env::start().await;
    // 30 members, 20 of them with an agreeing row, 10 without. CDC runs (`membersync run`)
    // without a snapshot at slot creation: the only read of the table is the backfill's.
    let mut ids = Vec::new();
    for i in 0..30 {
        let email = format!("s{i}@example.com");
        let custom = json!({"n": i});
        let id = env.create(&email, custom.clone(), json!({"project_data": {"p": i}}));
        if i < 20 {
            env.insert_row(&id, &agreeing_row(&email, &custom, &json!({"p": i})))
                .await;
        }
        ids.push(id);
    }
    let secret = format!(
        "whsec_{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 24])
    );
    let mut daemon_env = env.env.clone();
    daemon_env.extend([
        (
            "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS".to_owned(),
            secret,
        ),
        // Only the backfill's incremental snapshot reads the table, not a slot-creation one.
        ("MEMBERSYNC__CDC__SNAPSHOT".to_owned(), "never".to_owned()),
        (
            "MEMBERSYNC__CDC__HEARTBEAT_INTERVAL_SECS".to_owned(),
            "1".to_owned(),
        ),
        (
            "MEMBERSYNC__CDC__STATUS_INTERVAL_MS".to_owned(),
            "200".to_owned(),
        ),
        (
            "MEMBERSYNC__CDC__INCREMENTAL_POLL_INTERVAL_MS".to_owned(),
            "100".to_owned(),
        ),
    ]);
    let _run = Daemon::start("run", daemon_env).await;

    let out = env.backfill(&["--json"]);
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["members_published"], json!(30));
    let snapshot = &outcome["snapshot"];
    assert_eq!(snapshot["state"], json!("done"), "{outcome}");
    assert_eq!(snapshot["tables"], json!(["public.members"]));
    assert_eq!(
        snapshot["rows_emitted"].as_i64().unwrap() + snapshot["rows_skipped"].as_i64().unwrap(),
        20,
        "every row is read once: published, or left to the stream that carries a newer version"
    );
    let recorded: Option<i64> = env
        .admin
        .query_one(
            "select snapshot_request_id from membersync_meta.backfill_runs",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, snapshot["id"].as_i64());
    // Merge creates the 10 missing rows from the Memberstack pass; nothing drifts after.
    wait_for(
        "every member to have a row",
        Duration::from_secs(60),
        || async {
            let n: i64 = env
                .admin
                .query_one(
                    "select count(*) from public.members where memberstack_id = any($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get(0);
            (n == 30).then_some(())
        },
    )
    .await;
    let after = env.dry_run();
    assert_eq!(after["fields"], json!([]));
    assert_eq!(after["members_only_in_memberstack"], json!([]));
}

/// Reads `topic` from the start until `members` distinct members were seen (and a little
/// longer, for copies of the last ones): member id → the event ids seen for it.
async fn read_snapshots(
    cfg: &membersync::config::KafkaConfig,
    topic: &str,
    members: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = membersync::kafka::client_config(cfg)
        .set("group.id", support::unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut by_member: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Once every member is in, drain whatever follows for a moment (copies).
        let wait = if by_member.len() >= members {
            Duration::from_secs(2)
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                let m = m.detach();
                let member = support::kafka::header(&m, "membersync_member_id").unwrap();
                let id = support::kafka::header(&m, "membersync_event_id").unwrap();
                by_member.entry(member).or_default().insert(id);
            }
            Ok(Err(e)) => panic!("consume {topic}: {e}"),
            Err(_) if by_member.len() >= members => return by_member,
            Err(_) => panic!("only {} of {members} members on {topic}", by_member.len()),
        }
    }
}
