//! Merge end to end: the real daemon (`membersync run`: CDC, ingest and merge) on the dev
//! Postgres and broker, with the Memberstack, Supabase Auth and PostHog simulators sending
//! and receiving real HTTP. Changes are made the way people make them: in the Memberstack
//! dashboard (the simulator then sends Svix-signed webhooks) and by SQL in Supabase.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use membersync::config::KafkaConfig;
use membersync::sim::memberstack::{MemberstackConfig, MemberstackSim};
use membersync::sim::posthog::{PostHogConfig, PostHogSim};
use membersync::sim::supabase_auth::{AuthConfig, AuthSim};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::support::{self, TestDb, daemon::Daemon, free_port, wait_for};

const API_KEY: &str = "sk_sb_merge_test_key";
const SERVICE_KEY: &str = "service-role-test-key";
const POSTHOG_KEY: &str = "phc_merge_test";
const STRIPE_SECRET: &str = "whsec_stripe_merge_test_secret";
const WAIT: Duration = Duration::from_secs(20);

/// Fields drop in order: the daemon stops before its database is dropped.
struct Stack {
    daemon: Daemon,
    /// Further role processes when the stack runs roles separately ([`Stack::start_roles`]);
    /// held so that they stop (on drop) before the database is dropped.
    _more: Vec<Daemon>,
    admin: Client,
    kafka: KafkaConfig,
    ms: MemberstackSim,
    auth: AuthSim,
    posthog: PostHogSim,
    env: Vec<(String, String)>,
    db: TestDb,
}

fn webhook_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

impl Stack {
    async fn start(extra: &[(&str, &str)]) -> Stack {
        Self::start_roles(&["run"], extra).await
    }

    /// The stack with `commands` as separate processes (`["ingest", "merge"]`: no CDC), the
    /// first one serving the ingest port the Memberstack simulator delivers to.
    async fn start_roles(commands: &[&str], extra: &[(&str, &str)]) -> Stack {
        let db = TestDb::migrated().await;
        let admin = db.admin().await;
        let kafka = support::kafka::config();
        let ingest_port = free_port();
        let secret = webhook_secret();
        let ms = MemberstackSim::start(MemberstackConfig::new(API_KEY).with_webhook(
            format!("http://127.0.0.1:{ingest_port}/webhooks/memberstack"),
            secret.clone(),
        ))
        .await
        .expect("memberstack simulator");
        let dsn = db.superuser_dsn();
        let auth = AuthSim::start(AuthConfig::new(dsn, SERVICE_KEY))
            .await
            .expect("auth simulator");
        let posthog = PostHogSim::start(PostHogConfig::new(POSTHOG_KEY))
            .await
            .expect("posthog simulator");
        let mut env = db.env();
        let group = support::unique_name("merge");
        for (k, v) in [
            ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.clone()),
            (
                "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
                kafka.topic_prefix.clone(),
            ),
            ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "3".into()),
            ("MEMBERSYNC__CDC__HEARTBEAT_INTERVAL_SECS", "1".into()),
            ("MEMBERSYNC__CDC__STATUS_INTERVAL_MS", "200".into()),
            ("MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS", secret),
            (
                "MEMBERSYNC__INGEST__STRIPE_WEBHOOK_SECRETS",
                STRIPE_SECRET.into(),
            ),
            ("MEMBERSYNC__MEMBERSTACK__API_URL", ms.base_url()),
            ("MEMBERSYNC__MEMBERSTACK__API_KEY", API_KEY.into()),
            ("MEMBERSYNC__MEMBERSTACK__BACKOFF_BASE_MS", "50".into()),
            ("MEMBERSYNC__SUPABASE__URL", auth.base_url()),
            ("MEMBERSYNC__SUPABASE__SERVICE_ROLE_KEY", SERVICE_KEY.into()),
            ("MEMBERSYNC__POSTHOG__HOST", posthog.base_url()),
            ("MEMBERSYNC__POSTHOG__API_KEY", POSTHOG_KEY.into()),
            ("MEMBERSYNC__POSTHOG__FLUSH_INTERVAL_MS", "100".into()),
            ("MEMBERSYNC__MERGE__GROUP_ID", group),
            ("MEMBERSYNC__MERGE__BACKOFF_BASE_MS", "200".into()),
            ("MEMBERSYNC__MERGE__BACKOFF_MAX_MS", "400".into()),
            ("MEMBERSYNC__MERGE__COMMIT_INTERVAL_MS", "200".into()),
        ] {
            env.push((k.into(), v));
        }
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).into(), (*v).into()));
        }
        let daemon = Daemon::start_on(commands[0], env.clone(), ingest_port).await;
        let mut more = Vec::new();
        for command in &commands[1..] {
            more.push(Daemon::start(command, env.clone()).await);
        }
        if commands.iter().any(|c| *c == "run" || *c == "cdc") {
            // CDC's initial snapshot reads every row that exists while it runs, as changes
            // from Supabase (op `r`): a member created meanwhile would be seen twice, which
            // tests of exact effects must not depend on.
            wait_for("CDC's initial snapshot completed", WAIT, || async {
                let done: i64 = admin
                    .query_one(
                        "select count(*) from membersync_meta.cdc_snapshots where slot_name = $1 and completed_at is not null",
                        &[&db.slot()],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (done == 1).then_some(())
            })
            .await;
        }
        Stack {
            _more: more,
            db,
            admin,
            kafka,
            ms,
            auth,
            posthog,
            daemon,
            env,
        }
    }

    fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.kafka.topic_prefix)
    }

    /// A member created in the Memberstack dashboard, once merge has created its row.
    async fn dashboard_member(&self, email: &str, custom_fields: Value) -> String {
        let new = serde_json::from_value(json!({
            "email": email,
            "customFields": custom_fields,
            "metaData": {},
            "plans": [{"planId": "pln_free"}],
        }))
        .unwrap();
        let member = self.ms.dashboard_create(new).expect("dashboard create");
        let id = member.id.clone();
        self.row_where(&id, "user_id is not null").await;
        id
    }

    /// Waits until the member's row satisfies `condition` (SQL), returns the row as JSON.
    async fn row_where(&self, id: &str, condition: &str) -> Value {
        let sql = format!(
            "select to_jsonb(m) from public.members m where memberstack_id = $1 and ({condition})"
        );
        wait_for(
            &format!("members row of {id} where {condition}"),
            WAIT,
            || {
                let sql = sql.clone();
                async move {
                    let row = self.admin.query_opt(&sql, &[&id]).await.unwrap();
                    row.map(|r| r.get::<_, Value>(0))
                }
            },
        )
        .await
    }

    async fn row(&self, id: &str) -> Value {
        self.row_where(id, "true").await
    }

    fn ms_member(&self, id: &str) -> Value {
        serde_json::to_value(self.ms.member(id).expect("member in the simulator")).unwrap()
    }

    fn dashboard_update(&self, id: &str, patch: Value) {
        let patch = serde_json::from_value(patch).unwrap();
        self.ms
            .dashboard_update(id, &patch)
            .expect("dashboard update");
    }

    fn patches(&self) -> usize {
        self.ms
            .calls()
            .iter()
            .filter(|c| c.method == "PATCH")
            .count()
    }

    /// Both sides stop changing: webhooks delivered, and for `quiet` no new PATCH, no new
    /// row version and no new outcome.
    /// Pushes and outcomes merge committed and its appliers have not finished.
    async fn outbox_pending(&self) -> i64 {
        self.admin
            .query_one(
                "select (select count(*) from membersync_meta.merge_intents
                          where desired <> '{}'::jsonb and conflict is null and orphan_since is null)
                      + (select count(*) from membersync_meta.outcome_outbox)",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn quiescent(&self, quiet: Duration) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.ms
                .wait_webhooks_quiescent(WAIT)
                .await
                .expect("webhooks delivered");
            let before = (
                self.patches(),
                self.row_versions().await,
                self.processed().await,
            );
            tokio::time::sleep(quiet).await;
            let after = (
                self.patches(),
                self.row_versions().await,
                self.processed().await,
            );
            if before == after
                && self.outbox_pending().await == 0
                && self
                    .ms
                    .wait_webhooks_quiescent(Duration::from_millis(1))
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no quiescence: {before:?} → {after:?}"
            );
        }
    }

    /// A fingerprint of every members row (changes whenever any row changes).
    async fn row_versions(&self) -> String {
        let r = self
            .admin
            .query_one("select coalesce(string_agg(md5(m::text), ',' order by memberstack_id), '') from public.members m", &[])
            .await
            .unwrap();
        r.get(0)
    }

    /// What merge did for a member, for failure messages.
    async fn history(&self, id: &str) -> String {
        let rows = self
            .admin
            .query(
                "select processed_at::text, event_id, event_type, result->>'occurred_at', (result->'fields')::text
                   from public.webhook_log where memberstack_id = $1 order by processed_at",
                &[&id],
            )
            .await
            .unwrap();
        let mut out = String::new();
        for r in rows {
            out.push_str(&format!(
                "{} {} {} occurred {} {}\n",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
                r.get::<_, Option<String>>(3).unwrap_or_default(),
                r.get::<_, Option<String>>(4).unwrap_or_default()
            ));
        }
        let state = self
            .admin
            .query("select field, last_synced_at::text, last_value::text, pushed_at::text, echoes::text from public.sync_state where memberstack_id = $1", &[&id])
            .await
            .unwrap();
        for r in state {
            out.push_str(&format!(
                "state {} synced {} value {} pushed {:?} echoes {}\n",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
                r.get::<_, Option<String>>(3),
                r.get::<_, String>(4)
            ));
        }
        out
    }

    async fn processed(&self) -> i64 {
        self.admin
            .query_one("select count(*) from public.webhook_log", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// An auth user made directly in Supabase (a sign-up), not through membersync; its email
    /// confirmed or not. Returns its id.
    async fn supabase_sign_up(&self, email: &str, confirmed: bool) -> String {
        let row = self
            .admin
            .query_one(
                "insert into auth.users (instance_id, id, aud, role, email, encrypted_password,
                        email_confirmed_at, raw_app_meta_data, raw_user_meta_data, created_at, updated_at,
                        is_super_admin, is_sso_user, is_anonymous)
                 values ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated',
                        'authenticated', $1, '', case when $2 then now() end,
                        '{\"provider\":\"email\",\"providers\":[\"email\"]}', '{}', now(), now(),
                        false, false, false)
                 returning id::text",
                &[&email, &confirmed],
            )
            .await
            .expect("sign-up");
        row.get(0)
    }

    /// `user_logs` conflict rows of a member (`new_data`), oldest first.
    async fn conflicts(&self, id: &str) -> Vec<Value> {
        self.admin
            .query(
                "select new_data from public.user_logs
                  where memberstack_id = $1 and change_type = 'conflict' order by created_at, id",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The email of an auth user.
    async fn auth_email(&self, user_id: &str) -> String {
        self.admin
            .query_one(
                "select email from auth.users where id = $1::text::uuid",
                &[&user_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The `members` rows `user_id` can read through RLS, as PostgREST would let it.
    async fn visible_to(&self, user_id: &str) -> i64 {
        let mut c = self.db.admin().await;
        let tx = c.transaction().await.unwrap();
        tx.batch_execute(&format!(
            "set local role authenticated; select set_config('request.jwt.claims', '{}', true);",
            json!({"sub": user_id, "role": "authenticated"})
        ))
        .await
        .unwrap();
        let n: i64 = tx
            .query_one("select count(*) from public.members", &[])
            .await
            .unwrap()
            .get(0);
        tx.rollback().await.unwrap();
        n
    }

    /// Runs `sql` as the member's signed-in user, through RLS, as PostgREST would.
    async fn as_user(&self, user_id: &str, sql: &str) {
        let mut c = self.db.admin().await;
        let tx = c.transaction().await.unwrap();
        tx.batch_execute(&format!(
            "set local role authenticated; select set_config('request.jwt.claims', '{}', true);",
            json!({"sub": user_id, "role": "authenticated"})
        ))
        .await
        .unwrap();
        let n = tx.execute(sql, &[]).await.expect("user update");
        assert_eq!(n, 1, "the user's update reached its own row through RLS");
        tx.commit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn member_created_in_memberstack_gets_auth_user_row_and_outcome() {
    let s = Stack::start(&[("MEMBERSYNC__KAFKA__STATISTICS_INTERVAL_MS", "300")]).await;
    let started = Instant::now();
    let new = serde_json::from_value(json!({
        "email": "Ada@Example.com",
        "customFields": {"seats": "3"},
        "plans": [{"planId": "pln_free"}],
    }))
    .unwrap();
    let id = s.ms.dashboard_create(new).unwrap().id;
    let row = s.row_where(&id, "user_id is not null").await;
    eprintln!(
        "member.created → members row with auth user: {:?}",
        started.elapsed()
    );
    assert_eq!(
        row["email"], "ada@example.com",
        "Memberstack stores emails lowercased"
    );
    assert_eq!(row["subscription_status"], "active");
    assert_eq!(row["subscription_status_raw"], "ACTIVE");
    assert_eq!(row["plan_id"], "pln_free");
    assert_eq!(row["custom_fields"], json!({"seats": "3"}));

    let user = s
        .admin
        .query_one(
            "select email, raw_user_meta_data, email_confirmed_at is not null from auth.users where id = $1::text::uuid",
            &[&row["user_id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(user.get::<_, String>(0), "ada@example.com");
    let meta: Value = user.get(1);
    assert_eq!(meta["memberstack_id"], id.as_str());
    assert_eq!(meta["subscription_status"], "active");
    assert_eq!(meta["plan_id"], "pln_free");
    assert!(user.get::<_, bool>(2), "email_confirm");
    let creates = s.auth.calls().iter().filter(|c| c.method == "POST").count();
    assert_eq!(creates, 1, "one POST /auth/v1/admin/users");

    let logs: i64 = s
        .admin
        .query_one(
            "select count(*) from public.user_logs where memberstack_id = $1 and change_type = 'created' and source = 'memberstack'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logs, 1);

    let outcomes = support::kafka::consume(&s.kafka, &s.topic("sync"), 1, WAIT).await;
    let outcome: Value =
        serde_json::from_slice(rdkafka::Message::payload(&outcomes[0]).unwrap()).unwrap();
    assert_eq!(outcome["status"], "applied");
    assert_eq!(outcome["created"], true);
    assert_eq!(outcome["auth_user"], "created");
    assert_eq!(outcome["member_id"], id.as_str());
    crate::schemas::assert_valid("sync", &outcome, "outcome of member.created");

    let events = wait_for("PostHog user_created", WAIT, || async {
        let events = s.posthog.events();
        events
            .iter()
            .any(|e| e.event == "user_created")
            .then_some(events)
    })
    .await;
    let created = events.iter().find(|e| e.event == "user_created").unwrap();
    assert_eq!(created.distinct_id, id);
    assert!(created.uuid.is_some());
    assert!(events.iter().any(|e| e.event == "sync_completed"));
    // Issue #16, item 9: the sync rules' `sync_operation` event.
    let events = wait_for("PostHog sync_operation", WAIT, || async {
        let events = s.posthog.events();
        events
            .iter()
            .any(|e| e.event == "sync_operation")
            .then_some(events)
    })
    .await;
    let op = events.iter().find(|e| e.event == "sync_operation").unwrap();
    assert_eq!(
        op.properties["operation_type"], "memberstack:member.created",
        "{:?}",
        op.properties
    );
    assert_eq!(op.properties["success"], true);
    assert!(op.properties["duration_ms"].is_i64());

    // Nothing follows: the origin-tagged CDC event of merge's own insert is not pushed back.
    s.quiescent(Duration::from_secs(1)).await;
    assert_eq!(
        s.patches(),
        0,
        "no PATCH for a member created in Memberstack: {:?}\n{}",
        s.ms.calls(),
        s.history(&id).await
    );

    // Everything processed is committed: merge's consumer lag is 0 on every partition of its
    // three topics (3 partitions each).
    let group = s
        .env
        .iter()
        .find(|(k, _)| k == "MEMBERSYNC__MERGE__GROUP_ID")
        .map(|(_, v)| format!("group=\"{v}\""))
        .unwrap();
    wait_for(
        "merge's consumer lag 0 on its 9 partitions",
        WAIT,
        || async {
            let (_, text) = s.daemon.get("/metrics").await?;
            let lags: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("membersync_kafka_consumer_lag{") && l.contains(&group))
                .collect();
            (lags.len() == 9 && lags.iter().all(|l| l.ends_with(" 0"))).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn supabase_owned_field_updated_by_the_user_is_patched_to_memberstack() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("grace@example.com", json!({})).await;
    let user_id = s.row(&id).await["user_id"].as_str().unwrap().to_owned();
    s.quiescent(Duration::from_millis(500)).await;
    // The CDC event of merge's own insert showed every column: unchanged columns of a later
    // row change are not mistaken for edits (and not pushed along). Waited for, not assumed
    // after quiescence: on a loaded machine that event can take longer than the quiet period.
    wait_for("supabase_seen of all 6 fields", WAIT, || async {
        let seen: i64 = s
            .admin
            .query_one(
                "select count(*) from public.sync_state where memberstack_id = $1 and supabase_seen is not null",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (seen == 6).then_some(())
    })
    .await;
    let before = s.patches();

    let started = Instant::now();
    s.as_user(
        &user_id,
        r#"update public.members set project_data = '{"stage": 4}' where true"#,
    )
    .await;
    wait_for("project_data in Memberstack metaData", WAIT, || async {
        (s.ms_member(&id)["metaData"]["project_data"] == json!({"stage": 4})).then_some(())
    })
    .await;
    eprintln!(
        "SQL update → PATCH applied in Memberstack: {:?}",
        started.elapsed()
    );

    s.quiescent(Duration::from_secs(1)).await;
    assert_eq!(
        s.patches(),
        before + 1,
        "exactly one PATCH; its webhook is an echo"
    );
    let echo: i64 = s
        .admin
        .query_one(
            "select count(*) from public.webhook_log where memberstack_id = $1 and result->'fields' @> '[{\"verdict\": \"echo\"}]'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(echo, 1, "the PATCH's webhook was recognised as our echo");
}

#[tokio::test(flavor = "multi_thread")]
async fn owned_fields_are_reverted_when_the_other_side_edits_them() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("linus@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;

    // Memberstack owns email: an SQL edit is reverted.
    s.admin
        .execute(
            "update public.members set email = 'hijack@example.com' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    s.row_where(&id, "email = 'linus@example.com'").await;
    // Supabase owns project_data: a Memberstack edit is overwritten with Supabase's value.
    s.dashboard_update(
        &id,
        json!({"metaData": {"project_data": {"stage": "forged"}}}),
    );
    wait_for(
        "Supabase's project_data back in Memberstack",
        WAIT,
        || async { (s.ms_member(&id)["metaData"]["project_data"] == json!({})).then_some(()) },
    )
    .await;
    s.quiescent(Duration::from_secs(1)).await;
    assert_eq!(s.row(&id).await["project_data"], json!({}));
    let conflicts: Vec<String> = s
        .admin
        .query(
            "select new_data->>'winner' from public.user_logs where memberstack_id = $1 and change_type = 'conflict_resolved' order by created_at",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(conflicts, ["memberstack", "supabase"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_field_edited_on_both_sides_in_the_same_second_converges_to_the_newer() {
    let s = Stack::start(&[]).await;
    let id = s
        .dashboard_member("hedy@example.com", json!({"tier": "bronze"}))
        .await;
    s.quiescent(Duration::from_millis(500)).await;

    for (first_memberstack, older, newer) in [(true, "silver", "gold"), (false, "platinum", "iron")]
    {
        if first_memberstack {
            s.dashboard_update(&id, json!({"customFields": {"tier": older}}));
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.admin
                .execute(
                    "update public.members set custom_fields = jsonb_build_object('tier', $2::text) where memberstack_id = $1",
                    &[&id, &newer],
                )
                .await
                .unwrap();
        } else {
            s.admin
                .execute(
                    "update public.members set custom_fields = jsonb_build_object('tier', $2::text) where memberstack_id = $1",
                    &[&id, &older],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.dashboard_update(&id, json!({"customFields": {"tier": newer}}));
        }
        s.quiescent(Duration::from_secs(1)).await;
        assert_eq!(
            s.row(&id).await["custom_fields"],
            json!({"tier": newer}),
            "Supabase"
        );
        assert_eq!(
            s.ms_member(&id)["customFields"],
            json!({"tier": newer}),
            "Memberstack"
        );
        let patches = s.patches();
        let versions = s.row_versions().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            (s.patches(), s.row_versions().await),
            (patches, versions),
            "no further writes"
        );
    }
}

/// A Supabase edit of a `latest` field whose CDC event has not arrived is dated by when that
/// column changed, not by the row's `updated_at`: a later write of another column must not
/// make the older Supabase value beat a newer Memberstack edit (the soak harness found
/// exactly that losing a Memberstack edit). CDC does not run here, so the Supabase edits
/// stay "on their way" for as long as the test needs.
#[tokio::test(flavor = "multi_thread")]
async fn unsynced_supabase_edit_is_dated_by_its_column_not_by_later_writes_of_the_row() {
    let s = Stack::start_roles(&["ingest", "merge"], &[]).await;
    let id = s
        .dashboard_member("ada@example.com", json!({"tier": "bronze"}))
        .await;
    s.quiescent(Duration::from_millis(300)).await;

    s.ms.pause_webhooks();
    s.admin
        .execute(
            "update public.members set custom_fields = '{\"tier\": \"sql-older\"}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.dashboard_update(&id, json!({"customFields": {"tier": "memberstack-newer"}}));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A later application write of another column: the row's updated_at is now newer than
    // the Memberstack edit, the custom_fields edit is not.
    s.admin
        .execute(
            "update public.members set project_data = '{\"step\": 2}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let edits: Vec<(String, chrono::DateTime<chrono::Utc>)> = s
        .admin
        .query(
            "select e.column_name, e.edited_at from membersync_meta.member_column_edits e
               join public.members m on m.id = e.member_id
              where m.memberstack_id = $1 and e.column_name in ('custom_fields', 'project_data')
              order by e.column_name",
            &[&id],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        edits.len(),
        2,
        "both columns' edit times recorded: {edits:?}"
    );
    assert!(
        edits[0].1 < edits[1].1,
        "custom_fields edited before project_data: {edits:?}"
    );
    s.ms.resume_webhooks();

    let row = s
        .row_where(&id, "custom_fields->>'tier' = 'memberstack-newer'")
        .await;
    assert_eq!(
        row["project_data"],
        json!({"step": 2}),
        "{}",
        s.history(&id).await
    );
    s.quiescent(Duration::from_millis(500)).await;
    assert_eq!(
        s.ms_member(&id)["customFields"],
        json!({"tier": "memberstack-newer"}),
        "Memberstack keeps its newer edit"
    );
}

/// Randomised interleavings of edits on both sides, several seeds: after quiescence both
/// sides hold what the authority rules say, nothing was lost, and every edit caused a
/// bounded number of writes.
#[tokio::test(flavor = "multi_thread")]
async fn random_edits_on_both_sides_converge() {
    let seeds: Vec<u64> = std::env::var("MEMBERSYNC_TEST_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    let s = Stack::start(&[]).await;
    let mut members = Vec::new();
    for i in 0..3 {
        members.push(
            s.dashboard_member(&format!("m{i}@example.com"), json!({"k": "0"}))
                .await,
        );
    }
    s.quiescent(Duration::from_millis(500)).await;
    for seed in seeds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Expected final value per (member, field).
        let mut expect: BTreeMap<(String, &str), Value> = BTreeMap::new();
        let patches_before = s.patches();
        let ops = 24;
        let mut ms_edits = 0;
        let mut deleted: Vec<String> = Vec::new();
        let mut replays = false;
        for n in 0..ops {
            let id = members[rng.random_range(0..members.len())].clone();
            let value = format!("s{seed}-{n}");
            let op = rng.random_range(0..11);
            eprintln!(
                "op {n} {} {id} {op}",
                chrono::Utc::now().format("%H:%M:%S%.3f")
            );
            match op {
                // latest: the newer edit wins, whichever side.
                0 => {
                    s.dashboard_update(&id, json!({"customFields": {"k": value}}));
                    ms_edits += 1;
                    expect.insert((id, "custom_fields"), json!({"k": value}));
                }
                1 => {
                    s.admin
                        .execute(
                            "update public.members set custom_fields = jsonb_build_object('k', $2::text) where memberstack_id = $1",
                            &[&id, &value],
                        )
                        .await
                        .unwrap();
                    expect.insert((id, "custom_fields"), json!({"k": value}));
                }
                // supabase-owned: Supabase's edits win, Memberstack's are overwritten.
                2 => {
                    s.admin
                        .execute(
                            "update public.members set project_data = jsonb_build_object('v', $2::text) where memberstack_id = $1",
                            &[&id, &value],
                        )
                        .await
                        .unwrap();
                    expect.insert((id, "project_data"), json!({"v": value}));
                }
                3 => {
                    s.dashboard_update(
                        &id,
                        json!({"metaData": {"project_data": {"v": format!("forged-{value}")}}}),
                    );
                    ms_edits += 1;
                }
                // Plans (Memberstack's): a paid plan added or a plan cancelled, in any order
                // and mix with free ones; the row follows the whole list (issue #16, item 2).
                5 => {
                    let (plan, kind) = [
                        ("pln_pro", "SUBSCRIPTION"),
                        ("pln_team", "SUBSCRIPTION"),
                        ("pln_bonus", "FREE"),
                    ][rng.random_range(0..3)];
                    s.plan(
                        &id,
                        json!({"action": "add", "planId": plan, "type": kind, "status": "ACTIVE"}),
                    );
                }
                6 => {
                    let plans = ["pln_pro", "pln_team", "pln_bonus", "pln_free"];
                    let plan = plans[rng.random_range(0..plans.len())];
                    let _ = s.ms.dashboard_plan(
                        &id,
                        serde_json::from_value(json!({"action": "cancel", "planId": plan}))
                            .unwrap(),
                    );
                }
                // A custom field removed, on either side (issue #16, item 7).
                7 => {
                    if rng.random_bool(0.5) {
                        s.dashboard_update(&id, json!({"customFields": {"k": ""}}));
                        ms_edits += 1;
                    } else {
                        s.admin
                            .execute(
                                "update public.members set custom_fields = custom_fields - 'k' where memberstack_id = $1",
                                &[&id],
                            )
                            .await
                            .unwrap();
                    }
                    expect.insert((id, "custom_fields"), json!({}));
                }
                // A member deleted in Memberstack and another created (issue #16, item 6):
                // the deleted one stays deleted, the new one is synced like the others.
                8 => {
                    s.ms.dashboard_delete(&id).unwrap();
                    expect.retain(|(m, _), _| *m != id);
                    members.retain(|m| *m != id);
                    deleted.push(id);
                    members.push(
                        s.dashboard_member(&format!("new-{value}@example.com"), json!({"k": "0"}))
                            .await,
                    );
                }
                // A push Memberstack refuses for good (dead letter), replayed at the end with
                // `dlq replay --all` (issue #16, items 1 and 9), while the application goes on
                // editing the member.
                9 => {
                    s.ms.fail_next(1, 422);
                    for v in [format!("{value}-a"), value.clone()] {
                        s.admin
                            .execute(
                                "update public.members set project_data = jsonb_build_object('v', $2::text) where memberstack_id = $1",
                                &[&id, &v],
                            )
                            .await
                            .unwrap();
                    }
                    expect.insert((id, "project_data"), json!({"v": value}));
                    replays = true;
                }
                // memberstack-owned: Memberstack's edits win, Supabase's are reverted.
                _ => {
                    let email = format!("{value}@example.com");
                    if rng.random_bool(0.5) {
                        s.dashboard_update(&id, json!({"email": email}));
                        ms_edits += 1;
                        expect.insert((id, "email"), json!(email));
                    } else {
                        s.admin
                            .execute(
                                "update public.members set email = $2 where memberstack_id = $1",
                                &[&id, &email],
                            )
                            .await
                            .unwrap();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
        }
        s.quiescent(Duration::from_secs(2)).await;
        if replays {
            s.ms.reset_faults();
            let before = s.changes_finished().await;
            let out = cli(&s.env, &["dlq", "replay", "--all"]);
            let sent = out.lines().filter(|l| l.contains("replayed")).count() as i64;
            eprintln!("seed {seed}: dlq replay --all: {out}");
            wait_for("the replays processed", WAIT, || async {
                (s.changes_finished().await >= before + sent as f64).then_some(())
            })
            .await;
            s.quiescent(Duration::from_secs(2)).await;
        }
        for id in &deleted {
            let row = s.row(id).await;
            assert!(
                row["deleted_at"].is_string(),
                "seed {seed}: {id} stays deleted: {row}"
            );
        }
        for id in &members {
            let row = s.row(id).await;
            let ms = s.ms_member(id);
            // Both sides agree on every field (a cleared custom field is `""` in Memberstack
            // and an absent key in Supabase) …
            let (row_cf, ms_cf) = (
                custom_fields(&row["custom_fields"]),
                custom_fields(&ms["customFields"]),
            );
            if row_cf != ms_cf {
                eprintln!("{}", s.history(id).await);
            }
            assert_eq!(row_cf, ms_cf, "seed {seed} {id} custom_fields");
            // … the plan is the one Memberstack's whole list says …
            let plan_id = membersync::merge::MemberstackPath::PlanId
                .get(&ms)
                .unwrap_or(Value::Null);
            let status = membersync::merge::normalize::plan_status(
                &membersync::merge::MemberstackPath::PlanStatus
                    .get(&ms)
                    .unwrap_or(Value::Null),
            );
            assert_eq!(
                (&row["plan_id"], row["subscription_status"].as_str()),
                (&plan_id, Some(status)),
                "seed {seed} {id} plan of {}\n{}",
                ms["planConnections"],
                s.history(id).await
            );
            // A key Memberstack never had is Supabase's default, {}.
            let ms_project = ms["metaData"]
                .get("project_data")
                .cloned()
                .unwrap_or(json!({}));
            assert_eq!(
                row["project_data"], ms_project,
                "seed {seed} {id} project_data"
            );
            assert_eq!(row["email"], ms["auth"]["email"], "seed {seed} {id} email");
            // … and on the authority's value: no edit was lost.
            for (field, ms_value) in [
                ("custom_fields", &ms_cf),
                ("project_data", &ms_project),
                ("email", &ms["auth"]["email"]),
            ] {
                if let Some(expected) = expect.get(&(id.clone(), field)) {
                    if ms_value != expected {
                        eprintln!("{}", s.history(id).await);
                    }
                    assert_eq!(ms_value, expected, "seed {seed}: {id} {field}");
                }
            }
        }
        // Bounded writes: each edit causes at most two PATCHes (a push and one re-push).
        let patches = s.patches() - patches_before;
        assert!(
            patches <= 2 * ops,
            "seed {seed}: {patches} PATCHes for {ops} edits ({ms_edits} in Memberstack)"
        );
    }
}

/// Custom fields as both sides mean them: a key whose value is `""` or null is no key.
fn custom_fields(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null() && v.as_str() != Some(""))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        _ => json!({}),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_changes_go_to_the_dlq_and_replay_applies_them() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("barbara@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;

    // Poison on the Memberstack topic is dead-lettered and does not block the partition.
    let producer =
        membersync::kafka::producer::Producer::new(&s.kafka, Duration::from_secs(10)).unwrap();
    producer
        .send(
            &membersync::kafka::producer::Record {
                topic: &s.topic("memberstack"),
                key: id.as_bytes(),
                payload: b"{not json",
                headers: &[],
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    // Memberstack refuses the push for good (a 4xx other than 408/429): not retried, the
    // change that asked for it is dead-lettered.
    s.ms.fail_next(1, 422);
    s.admin
        .execute(
            "update public.members set usage_stats = '{\"calls\": 7}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let letters = support::kafka::consume(&s.kafka, &s.topic("dlq"), 2, WAIT).await;
    let letters: Vec<Value> = letters
        .iter()
        .map(|m| serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap())
        .collect();
    for l in &letters {
        crate::schemas::assert_valid("dlq", l, "dead letter");
    }
    let poison = letters
        .iter()
        .find(|l| l["error"]["kind"] == "decode")
        .expect("poison dead letter");
    assert_eq!(poison["attempts"], 0);
    assert_eq!(
        poison["value_base64"],
        base64::engine::general_purpose::STANDARD.encode(b"{not json")
    );
    let failed = letters
        .iter()
        .find(|l| l["error"]["kind"] == "memberstack")
        .expect("failed change");
    assert_eq!(failed["attempts"], 1, "a permanent error is not retried");
    assert_eq!(failed["member_id"], id.as_str());
    assert!(
        failed["origin"]["topic"]
            .as_str()
            .unwrap()
            .ends_with("cdc.public.members"),
        "the dead letter is the change that asked for the push: {failed}"
    );
    let errors: i64 = s
        .admin
        .query_one(
            "select count(*) from public.error_logs where memberstack_id = $1 and error_type = 'sync_failed'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 1);

    // The partition moved on: a later change of the same member is applied.
    s.ms.reset_faults();
    s.dashboard_update(&id, json!({"customFields": {"after": "dlq"}}));
    s.row_where(&id, "custom_fields->>'after' = 'dlq'").await;
    assert_ne!(
        s.ms_member(&id)["metaData"]["usage_stats"],
        json!({"calls": 7})
    );

    // `dlq list` shows both; `dlq replay --id` re-feeds the failed change, which now applies.
    let list = cli(&s.env, &["dlq", "list", "--json"]);
    let listed: Vec<Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{list}");
    assert!(listed.iter().all(|l| l["replayed"] == false));
    let table = cli(&s.env, &["dlq", "list"]);
    assert!(
        table.contains(failed["id"].as_str().unwrap()) && table.contains("2 dead letter(s)"),
        "{table}"
    );
    cli(
        &s.env,
        &["dlq", "replay", "--id", failed["id"].as_str().unwrap()],
    );
    wait_for("replayed change applied in Memberstack", WAIT, || async {
        (s.ms_member(&id)["metaData"]["usage_stats"] == json!({"calls": 7})).then_some(())
    })
    .await;
    let list = cli(&s.env, &["dlq", "list", "--json"]);
    let replayed: Vec<bool> = list
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["id"] == failed["id"])
        .map(|l| l["replayed"].as_bool().unwrap())
        .collect();
    assert_eq!(replayed, [true]);
    let audit: i64 = s
        .admin
        .query_one(
            "select count(*) from public.audit_logs where action = 'dlq_replay' and target = $1",
            &[&failed["id"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audit, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_webhooks_have_one_effect_and_stripe_updates_the_subscription() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("katherine@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;

    // Svix retries the same message: same svix-id, one effect.
    let first =
        s.ms.deliveries()
            .into_iter()
            .find(|d| d.member_id == id)
            .expect("delivery");
    let secret = s
        .env
        .iter()
        .find(|(k, _)| k == "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS")
        .unwrap()
        .1
        .clone();
    let svix = membersync::ingest::verify::svix::SvixVerifier::new(&[secret.into()]).unwrap();
    let now = chrono::Utc::now().timestamp();
    let resp = reqwest::Client::new()
        .post(format!("{}/webhooks/memberstack", s.daemon.ingest))
        .header("content-type", "application/json")
        .header("svix-id", &first.svix_id)
        .header("svix-timestamp", now.to_string())
        .header(
            "svix-signature",
            svix.sign(&first.svix_id, now, first.body.as_bytes()),
        )
        .body(first.body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_for("the redelivery processed as a duplicate", WAIT, || async {
        let n: i64 = s
            .admin
            .query_one(
                "select count(*) from public.webhook_log where event_id = $1",
                &[&first.svix_id],
            )
            .await
            .unwrap()
            .get(0);
        let dup = s
            .daemon
            .metric("membersync_merge_changes_total{source=\"memberstack\",status=\"duplicate\"}")
            .await;
        (n == 1 && dup >= 1.0).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    let created: i64 = s
        .admin
        .query_one("select count(*) from public.user_logs where memberstack_id = $1 and change_type = 'created'", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 1, "one effect for two deliveries");

    // A paid plan added in Memberstack (member.plan.added): plan and status follow.
    s.ms
        .dashboard_plan(
            &id,
            serde_json::from_value(json!({"action": "add", "planId": "pln_pro", "type": "SUBSCRIPTION", "status": "TRIALING"}))
                .unwrap(),
        )
        .unwrap();
    let row = s.row_where(&id, "plan_id = 'pln_pro'").await;
    assert_eq!(
        row["subscription_status"], "active",
        "trialing provisions access"
    );
    // TRIALING and ACTIVE are the same normalised status: nothing to write, and the raw
    // column keeps the value of the last real change.
    assert_eq!(row["subscription_status_raw"], "ACTIVE");

    // Stripe: the subscription went past due.
    let stripe =
        membersync::ingest::verify::stripe::StripeVerifier::new(&[STRIPE_SECRET.to_owned().into()])
            .unwrap();
    let body = json!({
        "id": "evt_merge_1", "object": "event", "type": "customer.subscription.updated",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "past_due",
                 "metadata": {"memberstack_user_id": id}}}
    })
    .to_string();
    let ts = chrono::Utc::now().timestamp();
    let resp = reqwest::Client::new()
        .post(format!("{}/webhooks/stripe", s.daemon.ingest))
        .header("content-type", "application/json")
        .header(
            "stripe-signature",
            stripe.signature_header(ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let row = s.row_where(&id, "subscription_status = 'inactive'").await;
    assert_eq!(row["subscription_status_raw"], "past_due");
    // The Auth applier follows, outside the merge transaction.
    wait_for("auth user_metadata follows", WAIT, || async {
        let meta: Value = s
            .admin
            .query_one(
                "select raw_user_meta_data from auth.users where id = $1::text::uuid",
                &[&row["user_id"].as_str().unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        (meta["subscription_status"] == "inactive").then_some(())
    })
    .await;
    let event = wait_for("PostHog subscription_changed", WAIT, || async {
        s.posthog.events().into_iter().find(|e| {
            e.event == "subscription_changed"
                && e.distinct_id == id
                && e.properties["subscription_status"] == "past_due"
        })
    })
    .await;
    // Issue #16, item 9: the sync rules' properties.
    assert_eq!(
        event.properties["new_status"], "inactive",
        "{:?}",
        event.properties
    );
    assert_eq!(event.properties["user_id"], row["user_id"]);

    // Deleted in Memberstack: soft-deleted here.
    s.ms.dashboard_delete(&id).unwrap();
    s.row_where(&id, "deleted_at is not null").await;
}

/// `membersync <args>` with the stack's environment; panics on failure, returns stdout.
fn cli(env: &[(String, String)], args: &[&str]) -> String {
    let out = support::membersync()
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "membersync {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---- Merge v2: the outbox (no HTTP inside the member's transaction) ----------------------

impl Stack {
    /// `kill -9` of the daemon, then the same daemon started again on the same ingest port.
    async fn kill_and_restart(&mut self) {
        self.daemon.signal("KILL");
        let _ = self.daemon.child.wait();
        let port: u16 = self
            .daemon
            .ingest
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("ingest port");
        self.daemon = Daemon::start_on("run", self.env.clone(), port).await;
    }

    /// An intent of this member is claimed by an applier (its PATCH is on its way).
    async fn push_claimed(&self, id: &str) {
        wait_for("the member's push claimed by the pusher", WAIT, || async {
            let n: i64 = self
                .admin
                .query_one(
                    "select count(*) from membersync_meta.merge_intents
                      where memberstack_id = $1 and target = 'memberstack' and claimed_until > now()",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            (n > 0).then_some(())
        })
        .await;
    }
}

/// Memberstack hangs every request: the member's row is never locked across the HTTP call, so
/// the app's own update of it (PostgREST runs under an 8 s statement_timeout on Supabase)
/// completes at once, and merge keeps deciding the member's changes.
#[tokio::test(flavor = "multi_thread")]
async fn no_lock_is_held_while_memberstack_hangs() {
    let s = Stack::start(&[("MEMBERSYNC__MEMBERSTACK__REQUEST_TIMEOUT_MS", "5000")]).await;
    let id = s.dashboard_member("hang@example.com", json!({})).await;
    let user_id = s.row(&id).await["user_id"].as_str().unwrap().to_owned();
    s.quiescent(Duration::from_millis(500)).await;

    s.ms.hang_next(1_000);
    s.admin
        .execute(
            "update public.members set project_data = '{\"step\": 1}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    s.push_claimed(&id).await;

    // The app, as the member, under Supabase's statement_timeout: never waits for the push.
    let (app, conn) = tokio_postgres::connect(
        &format!(
            "{} options='-c statement_timeout=8000'",
            s.db.superuser_dsn()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut slowest = Duration::ZERO;
    for step in 2..7 {
        let tx_started = Instant::now();
        app.batch_execute(&format!(
            "begin; set local role authenticated;
             select set_config('request.jwt.claims', '{{\"sub\": \"{user_id}\", \"role\": \"authenticated\"}}', true);
             update public.members set project_data = '{{\"step\": {step}}}' where true;
             commit;"
        ))
        .await
        .unwrap();
        slowest = slowest.max(tx_started.elapsed());
    }
    eprintln!("the app's updates while the PATCH hangs: slowest {slowest:?}");
    assert!(
        slowest < Duration::from_millis(100),
        "an app update waited {slowest:?}: a lock is held across HTTP"
    );
    // Merge decided every one of them meanwhile (their CDC events are committed changes).
    wait_for("merge decided the app's edits", WAIT, || async {
        let v: Option<Value> = s
            .admin
            .query_one(
                "select last_value from public.sync_state where memberstack_id = $1 and field = 'project_data'",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (v == Some(json!({"step": 6}))).then_some(())
    })
    .await;

    // Memberstack answers again: the latest value arrives, coalesced.
    s.ms.reset_faults();
    wait_for(
        "the latest value in Memberstack",
        Duration::from_secs(60),
        || async {
            (s.ms_member(&id)["metaData"]["project_data"] == json!({"step": 6})).then_some(())
        },
    )
    .await;
}

/// One member edited 50 times in one second: their changes coalesce into at most two PATCHes
/// of the latest values, and both sides end equal.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_edited_fifty_times_in_a_second_gets_at_most_two_patches() {
    // One PATCH at once, the rest coalesced into the next one a pace later. The pace is 8 s
    // here (default 2 s) so that the bound holds however slowly a loaded CI machine moves the
    // 50 edits through CDC and merge: all of them are decided before the second PATCH. The
    // edits are paced at 20 ms (one second in all); on a saturated machine the test's own
    // round trips stretch that, which is fine as long as they end well before the pace.
    let s = Stack::start(&[("MEMBERSYNC__MERGE__MEMBER_PUSH_INTERVAL_MS", "8000")]).await;
    let id = s.dashboard_member("burst@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;
    let before = s.patches();
    let started = Instant::now();
    for n in 0..50 {
        s.admin
            .execute(
                "update public.members set custom_fields = jsonb_build_object('n', $2::text) where memberstack_id = $1",
                &[&id, &n.to_string()],
            )
            .await
            .unwrap();
        let next = Duration::from_millis(20 * (n + 1));
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 50 edits took {:?}: the machine is too slow for the test's premise",
        started.elapsed()
    );
    s.quiescent(Duration::from_secs(9)).await;
    let patches = s.patches() - before;
    eprintln!("50 edits in {:?} → {patches} PATCH(es)", started.elapsed());
    assert!(patches <= 2, "{patches} PATCHes for one member's burst");
    assert_eq!(s.ms_member(&id)["customFields"], json!({"n": "49"}));
    assert_eq!(s.row(&id).await["custom_fields"], json!({"n": "49"}));
}

/// A Memberstack edit made while our PATCH of an older Supabase edit waits in the rate
/// limiter: the push's time is when Memberstack answered, so the newer Memberstack edit wins
/// and survives on both sides (before, the PATCH overwrote it there and its echo was
/// swallowed: the two sides diverged for good).
#[tokio::test(flavor = "multi_thread")]
async fn a_memberstack_edit_made_while_our_patch_waits_survives_on_both_sides() {
    let s = Stack::start(&[("MEMBERSYNC__MEMBERSTACK__REQUESTS_PER_SECOND", "1")]).await;
    let other = s.dashboard_member("other@example.com", json!({})).await;
    let id = s
        .dashboard_member("limiter@example.com", json!({"tier": "old"}))
        .await;
    s.quiescent(Duration::from_millis(500)).await;

    // Another member's push takes the second's only permit …
    s.admin
        .execute(
            "update public.members set project_data = '{\"x\": 1}' where memberstack_id = $1",
            &[&other],
        )
        .await
        .unwrap();
    wait_for("the other member's PATCH", WAIT, || async {
        (s.ms_member(&other)["metaData"]["project_data"] == json!({"x": 1})).then_some(())
    })
    .await;
    // … so this member's push of a Supabase edit waits in the limiter …
    s.admin
        .execute(
            "update public.members set custom_fields = '{\"tier\": \"supabase\"}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    s.push_claimed(&id).await;
    // … while the member is edited, later, in Memberstack.
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.dashboard_update(&id, json!({"customFields": {"tier": "memberstack"}}));

    s.quiescent(Duration::from_secs(3)).await;
    assert_eq!(
        s.ms_member(&id)["customFields"],
        json!({"tier": "memberstack"}),
        "{}",
        s.history(&id).await
    );
    assert_eq!(
        s.row(&id).await["custom_fields"],
        json!({"tier": "memberstack"}),
        "{}",
        s.history(&id).await
    );
}

/// kill -9 of merge after a change committed and before its outcome was produced: the outcome
/// arrives after the restart, as `applied` (not turned into `duplicate`).
#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_committed_before_a_kill_is_produced_after_the_restart_as_applied() {
    let mut s = Stack::start(&[]).await;
    // The auth user's creation hangs, so the new member's outcome (which names the user) is
    // committed and held in the outbox when the daemon dies.
    s.auth.hang_next(1);
    let new = serde_json::from_value(json!({
        "email": "kill@example.com",
        "plans": [{"planId": "pln_free"}],
    }))
    .unwrap();
    let id = s.ms.dashboard_create(new).unwrap().id;
    s.row(&id).await;
    wait_for("the outcome committed to the outbox, waiting for the auth user", WAIT, || async {
        let n: i64 = s
            .admin
            .query_one(
                "select count(*) from membersync_meta.outcome_outbox where member_id = $1 and awaiting_auth",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;

    s.kill_and_restart().await;
    let outcomes = support::kafka::consume(&s.kafka, &s.topic("sync"), 1, WAIT).await;
    let outcome: Value =
        serde_json::from_slice(rdkafka::Message::payload(&outcomes[0]).unwrap()).unwrap();
    assert_eq!(outcome["member_id"], id.as_str());
    assert_eq!(outcome["event_type"], "member.created");
    assert_eq!(outcome["status"], "applied");
    assert_eq!(outcome["created"], true);
    assert_eq!(outcome["auth_user"], "created");
    assert!(outcome["user_id"].is_string());
    let row = s.row_where(&id, "user_id is not null").await;
    assert_eq!(outcome["user_id"], row["user_id"]);
    s.quiescent(Duration::from_millis(500)).await;
    // Exactly one outcome: a redelivery of the change after the restart announces nothing.
    let (kafka, topic) = (s.kafka.clone(), s.topic("sync"));
    let second = tokio::spawn(async move {
        support::kafka::consume(&kafka, &topic, 2, Duration::from_secs(3)).await
    })
    .await;
    assert!(second.is_err(), "a redelivery announces nothing more");
}

/// Issue #16, item 1: a dead-lettered Supabase edit (A) replayed after a newer edit (B) was
/// pushed must not push A over B: the replay resolves against the current state.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_old_edit_never_overwrites_a_newer_one() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("replay@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;

    // Edit A: its PATCH is refused for good → dead letter.
    s.ms.fail_next(1, 422);
    s.admin
        .execute(
            "update public.members set project_data = '{\"v\": \"A\"}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let letters = support::kafka::consume(&s.kafka, &s.topic("dlq"), 1, WAIT).await;
    let letter: Value =
        serde_json::from_slice(rdkafka::Message::payload(&letters[0]).unwrap()).unwrap();
    assert_eq!(letter["member_id"], id.as_str());

    // Edit B: pushed.
    s.admin
        .execute(
            "update public.members set project_data = '{\"v\": \"B\"}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    wait_for("B in Memberstack", WAIT, || async {
        (s.ms_member(&id)["metaData"]["project_data"] == json!({"v": "B"})).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;

    // The replay of A: both sides keep B.
    cli(&s.env, &["dlq", "replay", "--all"]);
    wait_for("the replay processed", WAIT, || async {
        let n: i64 = s
            .admin
            .query_one(
                "select count(*) from public.webhook_log where event_id like '%#replay:%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    s.quiescent(Duration::from_secs(1)).await;
    assert_eq!(
        s.ms_member(&id)["metaData"]["project_data"],
        json!({"v": "B"}),
        "{}",
        s.history(&id).await
    );
    assert_eq!(s.row(&id).await["project_data"], json!({"v": "B"}));
}

/// Issue #16, item 5 (security): an auth user someone registered with a member's email and
/// never confirmed is not linked to the member (it would read the member's row through RLS).
/// Nothing is created or linked; a conflict is recorded once and the outcome says so.
#[tokio::test(flavor = "multi_thread")]
async fn an_unconfirmed_auth_user_with_the_members_email_is_never_linked() {
    let s = Stack::start(&[]).await;
    // Someone signs up in Supabase with the victim's email and never confirms it.
    let squatter = s.supabase_sign_up("victim@example.com", false).await;

    let new = serde_json::from_value(json!({
        "email": "victim@example.com",
        "customFields": {"team": "red"},
        "plans": [{"planId": "pln_free"}],
    }))
    .unwrap();
    let id = s.ms.dashboard_create(new).unwrap().id;
    // The Auth applier has decided: linked (the old behaviour) or a conflict.
    wait_for("the auth user decided", WAIT, || async {
        let row = s.row(&id).await;
        (!row["user_id"].is_null() || !s.conflicts(&id).await.is_empty()).then_some(())
    })
    .await;
    let row = s.row(&id).await;
    assert!(
        row["user_id"].is_null(),
        "the member was linked to an unconfirmed auth user: {row}"
    );
    assert_eq!(
        s.visible_to(&squatter).await,
        0,
        "the squatter reads no member row"
    );
    assert_eq!(
        row["custom_fields"],
        json!({"team": "red"}),
        "the rest applied"
    );
    let users: i64 = s
        .admin
        .query_one("select count(*) from auth.users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1, "no auth user created (the email exists)");
    let confirmed: bool = s
        .admin
        .query_one(
            "select email_confirmed_at is not null from auth.users where id = $1::text::uuid",
            &[&squatter],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!confirmed, "nothing confirmed the squatter's email");

    // Recorded once: user_logs, the metric, the outcome.
    let conflicts = s.conflicts(&id).await;
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["reason"], "unconfirmed");
    assert_eq!(conflicts[0]["target"], "auth");
    let outcomes = support::kafka::consume(&s.kafka, &s.topic("sync"), 1, WAIT).await;
    let outcome: Value =
        serde_json::from_slice(rdkafka::Message::payload(&outcomes[0]).unwrap()).unwrap();
    assert_eq!(outcome["member_id"], id.as_str());
    crate::schemas::assert_valid("sync", &outcome, "outcome");
    assert_eq!(outcome["auth_user"], "conflict");
    assert!(outcome["user_id"].is_null());
    assert_eq!(
        s.daemon
            .metric(r#"membersync_merge_sync_conflicts_total{reason="unconfirmed",target="auth"}"#)
            .await,
        1.0
    );
    // A later change of the member neither links nor logs the conflict again.
    s.dashboard_update(&id, json!({"customFields": {"team": "blue"}}));
    s.row_where(&id, "custom_fields->>'team' = 'blue'").await;
    s.quiescent(Duration::from_millis(500)).await;
    assert!(s.row(&id).await["user_id"].is_null());
    assert_eq!(s.conflicts(&id).await.len(), 1);
    let dead: i64 = s
        .admin
        .query_one(
            "select count(*) from public.error_logs where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "a conflict is not a dead letter");

    // One auth user, one member: members.user_id is unique.
    let other = s.dashboard_member("other@example.com", json!({})).await;
    let other_user = s.row(&other).await["user_id"].as_str().unwrap().to_owned();
    let err = s
        .admin
        .execute(
            "update public.members set user_id = $2::text::uuid where memberstack_id = $1",
            &[&id, &other_user],
        )
        .await
        .expect_err("a second member with the same auth user");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

/// Issue #16, item 5: a Memberstack email change reaches the member's auth user only once
/// Memberstack reports the new email verified (else anyone could move an auth user to an
/// email they do not own).
#[tokio::test(flavor = "multi_thread")]
async fn an_unverified_memberstack_email_is_not_pushed_into_the_auth_user() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("first@example.com", json!({})).await;
    let user = s.row(&id).await["user_id"].as_str().unwrap().to_owned();
    s.quiescent(Duration::from_millis(500)).await;

    s.dashboard_update(&id, json!({"email": "second@example.com"}));
    s.row_where(&id, "email = 'second@example.com'").await;
    wait_for("the held email recorded", WAIT, || async {
        (!s.conflicts(&id).await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(s.auth_email(&user).await, "first@example.com");
    assert_eq!(s.conflicts(&id).await[0]["reason"], "email_unverified");

    // Memberstack reports it verified: now the auth user follows.
    s.dashboard_update(&id, json!({"verified": true}));
    wait_for("the verified email in the auth user", WAIT, || async {
        (s.auth_email(&user).await == "second@example.com").then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    assert_eq!(s.conflicts(&id).await.len(), 1);
}

/// Issue #16, item 3: a member's new (verified) email belongs to another Supabase auth user.
/// The change applies to the row; the auth email waits as a conflict (no dead letter), and a
/// later email change supersedes it.
#[tokio::test(flavor = "multi_thread")]
async fn an_email_another_auth_user_has_is_a_conflict_not_a_dead_end() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("mine@example.com", json!({})).await;
    let user = s.row(&id).await["user_id"].as_str().unwrap().to_owned();
    s.supabase_sign_up("taken@example.com", true).await;
    s.quiescent(Duration::from_millis(500)).await;

    s.dashboard_update(
        &id,
        json!({"email": "taken@example.com", "verified": true, "customFields": {"k": "1"}}),
    );
    s.row_where(
        &id,
        "email = 'taken@example.com' and custom_fields->>'k' = '1'",
    )
    .await;
    wait_for("the conflict recorded", WAIT, || async {
        let errors: i64 = s
            .admin
            .query_one(
                "select count(*) from public.error_logs where memberstack_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (errors > 0 || !s.conflicts(&id).await.is_empty()).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    let errors: i64 = s
        .admin
        .query_one(
            "select count(*) from public.error_logs where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 0, "not dead-lettered: {}", s.history(&id).await);
    let conflicts = s.conflicts(&id).await;
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["reason"], "email_in_use");
    assert_eq!(conflicts[0]["email"], "taken@example.com");
    assert_eq!(s.auth_email(&user).await, "mine@example.com");
    assert_eq!(
        s.daemon
            .metric(r#"membersync_merge_sync_conflicts_total{reason="email_in_use",target="auth"}"#)
            .await,
        1.0
    );
    // The auth part keeps waiting (not dropped), with a long backoff.
    let waiting: bool = s
        .admin
        .query_one(
            "select desired->>'email' = 'taken@example.com' and not_before > now() + interval '10 minutes'
               from membersync_meta.merge_intents where memberstack_id = $1 and target = 'auth'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(waiting, "the auth email waits for a retry");

    // The member's later changes are not blocked, and a new email supersedes the conflict.
    s.dashboard_update(&id, json!({"email": "free@example.com", "verified": true}));
    wait_for("the new email in the auth user", WAIT, || async {
        (s.auth_email(&user).await == "free@example.com").then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    assert_eq!(s.row(&id).await["email"], "free@example.com");
    assert_eq!(s.conflicts(&id).await.len(), 1);
}

/// Issue #16, item 10: a `members` row created in Supabase for a member Memberstack does not
/// have is reported once, not dead-lettered once per edit, and nothing more is pushed for it.
#[tokio::test(flavor = "multi_thread")]
async fn an_orphan_row_is_reported_once_and_not_pushed_again() {
    let s = Stack::start(&[]).await;
    let id = "mem_orphan_in_supabase";
    s.admin
        .execute(
            "insert into public.members (memberstack_id, email) values ($1, 'orphan@example.com')",
            &[&id],
        )
        .await
        .unwrap();
    // Its first push (of the insert) failed: an error was reported.
    let errors = || async {
        s.admin
            .query_one(
                "select count(*) from public.error_logs where memberstack_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for("the first push's failure reported", WAIT * 3, || async {
        (errors().await > 0).then_some(())
    })
    .await;
    for i in 0..6 {
        s.admin
            .execute(
                "update public.members set project_data = jsonb_build_object('v', $2::int) where memberstack_id = $1",
                &[&id, &i],
            )
            .await
            .unwrap();
        // Spaced beyond the member's push pacing (`merge.member_push_interval_ms`, 2 s), so
        // that each would be a PATCH of its own (and, before, a dead letter of its own).
        tokio::time::sleep(Duration::from_millis(2_100)).await;
    }
    // The insert and the six edits processed, and whatever they pushed done.
    wait_for("the edits processed", WAIT * 3, || async {
        let n: i64 = s
            .admin
            .query_one(
                "select count(*) from public.webhook_log where memberstack_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 7).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    let errors: Vec<String> = s
        .admin
        .query(
            "select error_type from public.error_logs where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        errors,
        ["missing_in_memberstack"],
        "reported once: {}",
        s.history(id).await
    );
    let pushes =
        s.ms.calls()
            .iter()
            .filter(|c| c.method == "PATCH" && c.path.contains(id))
            .count();
    assert!(pushes <= 1, "{pushes} PATCHes for an orphan");
    assert_eq!(s.daemon.metric("membersync_merge_orphans_total").await, 1.0);
    // Later edits are announced as skipped, with the reason.
    let skipped: Vec<String> = s
        .admin
        .query(
            "select result->>'reason' from public.webhook_log where memberstack_id = $1 and result->>'status' = 'skipped'",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!skipped.is_empty(), "{}", s.history(id).await);
    assert!(skipped[0].contains("does not exist in Memberstack"));

    // Memberstack shows the member (a snapshot, as backfill or resync publish it): pushing
    // resumes for it.
    let member = json!({
        "id": id, "auth": {"email": "orphan@example.com"}, "verified": false,
        "customFields": {}, "metaData": {}, "json": {}, "planConnections": [],
    });
    let record = membersync::ingest::envelope::member_snapshot(
        "resync_orphan_1",
        &member,
        id,
        chrono::Utc::now(),
    );
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_bytes()))
        .collect();
    let producer =
        membersync::kafka::producer::Producer::new(&s.kafka, Duration::from_secs(10)).unwrap();
    producer
        .send(
            &membersync::kafka::producer::Record {
                topic: &s.topic("memberstack"),
                key: record.key.as_bytes(),
                payload: &record.value,
                headers: &headers,
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    wait_for("the snapshot processed", WAIT * 2, || async {
        s.admin
            .query_opt(
                "select 1 from public.webhook_log where event_id = 'resync_orphan_1'",
                &[],
            )
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let pushes =
            s.ms.calls()
                .iter()
                .filter(|c| c.method == "PATCH" && c.path.contains(id))
                .count();
        if pushes > 1 {
            break;
        }
        if Instant::now() > deadline {
            let intents: Vec<String> = s
                .admin
                .query(
                    "select to_jsonb(i)::text from membersync_meta.merge_intents i where memberstack_id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            panic!(
                "no push for the member again ({pushes} PATCHes); intents {intents:?}\n{}",
                s.history(id).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue #16, item 9: `members.last_synced_at` (docs/api.md) is when membersync last brought
/// the two sides together: written with every row merge writes and every push that landed.
#[tokio::test(flavor = "multi_thread")]
async fn last_synced_at_follows_merges_writes_and_pushes() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("synced@example.com", json!({})).await;
    let row = s.row(&id).await;
    assert!(
        row["last_synced_at"].is_string(),
        "written with the row merge created: {row}"
    );
    s.quiescent(Duration::from_millis(500)).await;
    let before = s.row(&id).await["last_synced_at"].clone();

    // A Supabase edit, pushed to Memberstack: the push moves it.
    s.admin
        .execute(
            "update public.members set project_data = '{\"p\": 1}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    wait_for("the push landed", WAIT, || async {
        (s.ms_member(&id)["metaData"]["project_data"] == json!({"p": 1})).then_some(())
    })
    .await;
    let row = s
        .row_where(
            &id,
            &format!("last_synced_at > '{}'", before.as_str().unwrap()),
        )
        .await;
    assert_eq!(row["project_data"], json!({"p": 1}));
}

/// Issue #16, item 5: a change that does not say whether the new email is verified (webhooks
/// need not carry `verified`) makes the Auth applier ask Memberstack: verified there, the
/// auth user follows.
#[tokio::test(flavor = "multi_thread")]
async fn an_email_change_without_verified_is_checked_in_memberstack() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("before@example.com", json!({})).await;
    let user = s.row(&id).await["user_id"].as_str().unwrap().to_owned();
    s.quiescent(Duration::from_millis(500)).await;

    // Memberstack has the new, verified email; merge learns of the change from a record that
    // does not carry `verified`.
    s.ms.pause_webhooks();
    s.dashboard_update(&id, json!({"email": "after@example.com", "verified": true}));
    let member = json!({
        "id": id, "auth": {"email": "after@example.com"},
        "customFields": {}, "metaData": {}, "json": {},
        "planConnections": [{"id": "con_1", "active": true, "status": "ACTIVE", "planId": "pln_free", "type": "FREE"}],
    });
    let record = membersync::ingest::envelope::member_snapshot(
        "resync_verified_1",
        &member,
        &id,
        chrono::Utc::now(),
    );
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_bytes()))
        .collect();
    let producer =
        membersync::kafka::producer::Producer::new(&s.kafka, Duration::from_secs(10)).unwrap();
    producer
        .send(
            &membersync::kafka::producer::Record {
                topic: &s.topic("memberstack"),
                key: record.key.as_bytes(),
                payload: &record.value,
                headers: &headers,
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    s.row_where(&id, "email = 'after@example.com'").await;
    wait_for("the verified email in the auth user", WAIT, || async {
        (s.auth_email(&user).await == "after@example.com").then_some(())
    })
    .await;
    assert!(s.conflicts(&id).await.is_empty());
    // Issue #16, item 9: the member's resync is an administrative action with its trace.
    let audit: Vec<(String, String)> = s
        .admin
        .query(
            "select actor, details->>'event_id' from public.audit_logs
              where action = 'member_resync' and target = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        audit,
        [(format!("member:{id}"), "resync_verified_1".to_owned())]
    );
    s.ms.resume_webhooks();
    s.quiescent(Duration::from_millis(500)).await;
}

// ---- Issue #16: plans, edit times, custom-field removal, Stripe customers -----------------

impl Stack {
    /// A plan change made in the Memberstack dashboard (a webhook follows).
    fn plan(&self, id: &str, change: Value) {
        self.ms
            .dashboard_plan(id, serde_json::from_value(change).unwrap())
            .expect("plan change");
    }

    /// Posts a Stripe event, signed, to ingest.
    async fn post_stripe(&self, body: Value) {
        let stripe = membersync::ingest::verify::stripe::StripeVerifier::new(&[STRIPE_SECRET
            .to_owned()
            .into()])
        .unwrap();
        let body = body.to_string();
        let ts = chrono::Utc::now().timestamp();
        let resp = reqwest::Client::new()
            .post(format!("{}/webhooks/stripe", self.daemon.ingest))
            .header("content-type", "application/json")
            .header(
                "stripe-signature",
                stripe.signature_header(ts, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// Posts a Memberstack webhook body, Svix-signed, to ingest, as Memberstack would.
    async fn post_memberstack(&self, svix_id: &str, body: Value) {
        let secret = self
            .env
            .iter()
            .find(|(k, _)| k == "MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS")
            .unwrap()
            .1
            .clone();
        let svix = membersync::ingest::verify::svix::SvixVerifier::new(&[secret.into()]).unwrap();
        let body = body.to_string();
        let now = chrono::Utc::now().timestamp();
        let resp = reqwest::Client::new()
            .post(format!("{}/webhooks/memberstack", self.daemon.ingest))
            .header("content-type", "application/json")
            .header("svix-id", svix_id)
            .header("svix-timestamp", now.to_string())
            .header("svix-signature", svix.sign(svix_id, now, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    /// Waits until merge processed the event, returns its outcome.
    async fn processed_event(&self, event_id: &str) -> Value {
        wait_for(&format!("event {event_id} processed"), WAIT * 2, || async {
            self.admin
                .query_opt(
                    "select result from public.webhook_log where event_id = $1",
                    &[&event_id],
                )
                .await
                .unwrap()
                .map(|r| r.get::<_, Value>(0))
        })
        .await
    }

    /// Changes merge finished, whatever their status (some are decided before any
    /// transaction, e.g. a re-read member that no longer exists, and leave no `webhook_log`
    /// row).
    async fn changes_finished(&self) -> f64 {
        let (_, text) = self.daemon.get("/metrics").await.expect("metrics");
        text.lines()
            .filter(|l| l.starts_with("membersync_merge_changes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .sum()
    }

    /// The member's processed plan events, counted.
    async fn plan_events(&self, id: &str) -> i64 {
        self.admin
            .query_one(
                "select count(*) from public.webhook_log where memberstack_id = $1 and event_type like 'member.plan.%'",
                &[&id],
            )
            .await
            .unwrap()
            .get(0)
    }
}

/// Issue #16, item 2: a plan event names one plan connection; the member's plan is chosen from
/// all of them (re-read from Memberstack outside the member's transaction). A free plan added
/// to a paying member, or a secondary plan cancelled, leaves the paid plan; a connection
/// without `planId` never nulls `plan_id`; an outage of the re-read is waited out, never
/// dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn plan_events_choose_the_plan_from_all_the_members_plans() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("plans@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;

    s.plan(
        &id,
        json!({"action": "add", "planId": "pln_pro", "type": "SUBSCRIPTION", "status": "ACTIVE"}),
    );
    s.row_where(
        &id,
        "plan_id = 'pln_pro' and subscription_status = 'active'",
    )
    .await;

    // A free plan added to the paying member.
    s.plan(
        &id,
        json!({"action": "add", "planId": "pln_bonus", "type": "FREE"}),
    );
    wait_for("the free plan's event processed", WAIT, || async {
        (s.plan_events(&id).await == 2).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    let row = s.row(&id).await;
    assert_eq!(
        (row["plan_id"].clone(), row["subscription_status"].clone()),
        (json!("pln_pro"), json!("active")),
        "a free plan never hides the paid one: {}",
        s.history(&id).await
    );

    // The secondary plan cancelled while the paid one is active.
    s.plan(&id, json!({"action": "cancel", "planId": "pln_bonus"}));
    wait_for("the cancellation processed", WAIT, || async {
        (s.plan_events(&id).await == 3).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    let row = s.row(&id).await;
    assert_eq!(
        (row["plan_id"].clone(), row["subscription_status"].clone()),
        (json!("pln_pro"), json!("active")),
        "cancelling a secondary plan does not cancel the member: {}",
        s.history(&id).await
    );

    // A plan event whose connection has no planId, while Memberstack's API is down for a
    // moment: the re-read waits the outage out.
    s.ms.fail_next(2, 503);
    let svix_id = "msg_plan_without_plan_id";
    s.post_memberstack(
        svix_id,
        json!({
            "event": "member.plan.updated",
            "timestamp": chrono::Utc::now().timestamp_millis(),
            "payload": {"id": id, "planConnection": {"id": "con_x", "active": true, "status": "ACTIVE", "type": "SUBSCRIPTION"}},
        }),
    )
    .await;
    let outcome = s.processed_event(svix_id).await;
    assert_ne!(outcome["status"], "failed", "{outcome}");
    let row = s.row(&id).await;
    assert_eq!(row["plan_id"], "pln_pro", "{}", s.history(&id).await);
    assert_eq!(row["subscription_status"], "active");
    let gets =
        s.ms.calls()
            .iter()
            .filter(|c| c.method == "GET" && c.path.contains(&id))
            .count();
    assert!(gets >= 3, "the re-read was retried: {gets} GETs");
    assert_eq!(
        s.daemon
            .metric("membersync_merge_dead_letters_total{kind=\"memberstack\"}")
            .await,
        0.0
    );

    // The paid plan cancelled: the member is left with its free plan.
    s.plan(&id, json!({"action": "cancel", "planId": "pln_pro"}));
    s.row_where(&id, "plan_id = 'pln_free'").await;
}

/// Issue #16, items 2 and 9: a Stripe subscription that ended does not cancel a member who has
/// another active subscription; a Stripe event without member metadata finds its member
/// through the member's Stripe customer (Memberstack's `stripeCustomerId`, kept on the row).
#[tokio::test(flavor = "multi_thread")]
async fn stripe_events_respect_other_subscriptions_and_find_the_member_by_customer() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("stripe@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;

    // A checkout: the Stripe customer, then two paid plans.
    s.ms.dashboard_stripe_customer(&id, "cus_merge_16").unwrap();
    s.plan(
        &id,
        json!({"action": "add", "planId": "pln_pro", "type": "SUBSCRIPTION", "status": "ACTIVE"}),
    );
    s.plan(
        &id,
        json!({"action": "add", "planId": "pln_team", "type": "SUBSCRIPTION", "status": "ACTIVE"}),
    );
    let row = s
        .row_where(&id, "stripe_customer_id = 'cus_merge_16'")
        .await;
    assert_eq!(row["plan_id"], "pln_pro");
    wait_for("both plan events processed", WAIT, || async {
        (s.plan_events(&id).await == 2).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;

    // One of the subscriptions ends in Stripe: the member still pays for the other.
    s.post_stripe(json!({
        "id": "evt_merge_16_deleted", "object": "event", "type": "customer.subscription.deleted",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {"id": "sub_team", "object": "subscription", "customer": "cus_merge_16",
                 "status": "canceled", "metadata": {"memberstack_user_id": id}}}
    }))
    .await;
    s.processed_event("evt_merge_16_deleted").await;
    s.quiescent(Duration::from_millis(500)).await;
    let row = s.row(&id).await;
    assert_eq!(
        row["subscription_status"],
        "active",
        "{}",
        s.history(&id).await
    );
    assert_eq!(row["plan_id"], "pln_pro");
    // One of them is past due: the other still gives access.
    s.post_stripe(json!({
        "id": "evt_merge_16_past_due", "object": "event", "type": "customer.subscription.updated",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {"id": "sub_team", "object": "subscription", "customer": "cus_merge_16",
                 "status": "past_due", "metadata": {"memberstack_user_id": id}}}
    }))
    .await;
    s.processed_event("evt_merge_16_past_due").await;
    s.quiescent(Duration::from_millis(500)).await;
    assert_eq!(
        s.row(&id).await["subscription_status"],
        "active",
        "{}",
        s.history(&id).await
    );

    // Memberstack ends the team plan; then a Stripe event that names only the customer says
    // the remaining subscription is past due.
    s.plan(&id, json!({"action": "cancel", "planId": "pln_team"}));
    wait_for("the cancellation processed", WAIT, || async {
        (s.plan_events(&id).await == 3).then_some(())
    })
    .await;
    s.post_stripe(json!({
        "id": "evt_merge_16_customer", "object": "event", "type": "customer.subscription.updated",
        "created": chrono::Utc::now().timestamp() + 1,
        "data": {"object": {"id": "sub_pro", "object": "subscription", "customer": "cus_merge_16",
                 "status": "past_due", "metadata": {}}}
    }))
    .await;
    let outcome = s.processed_event("evt_merge_16_customer").await;
    assert_eq!(outcome["member_id"], id.as_str(), "{outcome}");
    let row = s.row_where(&id, "subscription_status = 'inactive'").await;
    assert_eq!(row["subscription_status_raw"], "past_due");
}

/// Issue #16, item 4: an old Supabase edit that lost to a newer Memberstack edit must not
/// revert the row over an even newer application edit whose CDC event is still on its way,
/// and that newer edit is then pushed with the row holding it. CDC does not run here: the
/// test delivers the CDC events itself, when it wants.
#[tokio::test(flavor = "multi_thread")]
async fn a_losing_old_supabase_edit_never_overwrites_a_newer_one() {
    let s = Stack::start_roles(&["ingest", "merge"], &[]).await;
    let id = s
        .dashboard_member("edit-times@example.com", json!({"tier": "bronze"}))
        .await;
    s.quiescent(Duration::from_millis(300)).await;

    let edit = |tier: &'static str| {
        let s = &s;
        let id = id.clone();
        async move {
            let r = s
                .admin
                .query_one(
                    "update public.members set custom_fields = jsonb_build_object('tier', $2::text)
                      where memberstack_id = $1
                  returning to_jsonb(members.*), (extract(epoch from clock_timestamp()) * 1000)::bigint",
                    &[&id, &tier],
                )
                .await
                .unwrap();
            (r.get::<_, Value>(0), r.get::<_, i64>(1))
        }
    };
    // A: an application edit, its CDC event delayed.
    let (row_a, at_a) = edit("A").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A newer Memberstack edit wins over A (A's column edit time is older) …
    s.dashboard_update(&id, json!({"customFields": {"tier": "M"}}));
    s.row_where(&id, "custom_fields->>'tier' = 'M'").await;
    // … and then the application edits again: B, its CDC event delayed too.
    let (row_b, at_b) = edit("B").await;

    let producer =
        membersync::kafka::producer::Producer::new(&s.kafka, Duration::from_secs(10)).unwrap();
    let topic = s.topic("cdc.public.members");
    let cdc = |row: &Value, at: i64, lsn: u64| {
        json!({
            "op": "u", "before": null, "after": row,
            "source": {"lsn": lsn, "ts_ms": at, "db": "postgres", "schema": "public", "table": "members"},
            "transaction": {"id": format!("{lsn}"), "total_order": 1, "data_collection_order": 1}
        })
        .to_string()
    };
    for (row, at, lsn) in [(&row_a, at_a, 9_000_001u64), (&row_b, at_b, 9_000_002)] {
        producer
            .send(
                &membersync::kafka::producer::Record {
                    topic: &topic,
                    key: id.as_bytes(),
                    payload: cdc(row, at, lsn).as_bytes(),
                    headers: &[],
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let decided = s.processed_event(&format!("cdc:{lsn}:1")).await;
        if lsn == 9_000_001 {
            // A lost, and the row holds B: nothing is reverted.
            assert_eq!(
                s.row(&id).await["custom_fields"],
                json!({"tier": "B"}),
                "A's revert overwrote the newer B: {decided}\n{}",
                s.history(&id).await
            );
        }
    }
    s.quiescent(Duration::from_millis(500)).await;
    assert_eq!(s.row(&id).await["custom_fields"], json!({"tier": "B"}));
    assert_eq!(
        s.ms_member(&id)["customFields"],
        json!({"tier": "B"}),
        "{}",
        s.history(&id).await
    );
}

/// Issue #16, item 7: Memberstack shallow-merges `customFields`, so a key removed in Supabase
/// is sent cleared (the empty string) and does not come back with Memberstack's next webhook.
#[tokio::test(flavor = "multi_thread")]
async fn a_custom_field_removed_in_supabase_is_cleared_in_memberstack() {
    let s = Stack::start(&[]).await;
    let id = s
        .dashboard_member("remove-key@example.com", json!({"a": "1", "k": "x"}))
        .await;
    s.quiescent(Duration::from_millis(500)).await;

    s.admin
        .execute(
            "update public.members set custom_fields = custom_fields - 'k' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    wait_for("the key cleared in Memberstack", WAIT, || async {
        let k = s.ms_member(&id)["customFields"].get("k").cloned();
        matches!(k.as_ref().and_then(Value::as_str), None | Some("")).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;

    // Memberstack's next change of the member does not bring the key back.
    s.dashboard_update(&id, json!({"customFields": {"a": "2"}}));
    s.row_where(&id, "custom_fields->>'a' = '2'").await;
    s.quiescent(Duration::from_millis(500)).await;
    assert_eq!(
        s.row(&id).await["custom_fields"],
        json!({"a": "2"}),
        "{}",
        s.history(&id).await
    );
    assert_eq!(s.ms_member(&id)["customFields"], json!({"a": "2", "k": ""}));
}

/// Issue #16, item 6: a deleted member keeps a tombstone. A delayed `member.created` or
/// `member.updated` delivered after `member.deleted` changes nothing (nor creates anything),
/// and the application's edits of the deleted row are not pushed (no 404, no dead letter).
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_member_stays_deleted_whatever_arrives_later() {
    let s = Stack::start(&[]).await;
    let id = s.dashboard_member("tombstone@example.com", json!({})).await;
    s.quiescent(Duration::from_millis(500)).await;
    let created =
        s.ms.deliveries()
            .into_iter()
            .find(|d| d.member_id == id)
            .expect("the member.created delivery");

    s.ms.dashboard_delete(&id).unwrap();
    let deleted = s.row_where(&id, "deleted_at is not null").await;
    s.quiescent(Duration::from_millis(500)).await;
    let patches_before = s.patches();

    // A member.updated that Svix delivers late, and the original member.created again under a
    // new message id (a resend).
    let late = chrono::Utc::now().timestamp_millis();
    s.post_memberstack(
        "msg_tombstone_update",
        json!({"event": "member.updated", "timestamp": late,
               "payload": {"id": id, "auth": {"email": "revived@example.com"}, "customFields": {"x": "1"}, "metaData": {}}}),
    )
    .await;
    let body: Value = serde_json::from_str(&created.body).unwrap();
    s.post_memberstack("msg_tombstone_created", body).await;
    // The application edits the deleted row.
    s.admin
        .execute(
            "update public.members set project_data = '{\"after\": \"delete\"}' where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    for event in ["msg_tombstone_update", "msg_tombstone_created"] {
        let outcome = s.processed_event(event).await;
        assert_eq!(outcome["status"], "skipped", "{event}: {outcome}");
        assert!(
            outcome["reason"].as_str().unwrap().contains("deleted"),
            "{outcome}"
        );
    }
    wait_for("the application's edit decided", WAIT, || async {
        let n: i64 = s
            .admin
            .query_one(
                "select count(*) from public.webhook_log where memberstack_id = $1 and source = 'supabase' and result->>'status' = 'skipped'",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 1).then_some(())
    })
    .await;
    s.quiescent(Duration::from_millis(500)).await;
    let row = s.row(&id).await;
    assert_eq!(
        row["email"],
        "tombstone@example.com",
        "{}",
        s.history(&id).await
    );
    assert_eq!(row["custom_fields"], json!({}));
    assert_eq!(row["deleted_at"], deleted["deleted_at"]);
    assert_eq!(
        s.patches(),
        patches_before,
        "nothing pushed for a deleted member"
    );
    let users: i64 = s
        .admin
        .query_one(
            "select count(*) from auth.users where raw_user_meta_data->>'memberstack_id' = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1, "no second auth user");
    let errors: i64 = s
        .admin
        .query_one(
            "select count(*) from public.error_logs where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 0, "no 404, no dead letter");
}

/// A member row deleted in SQL: CDC publishes the delete and then its tombstone (a null value,
/// for compacted topics). Merge takes the delete and passes over the tombstone — it is no
/// undecodable record for the dead-letter topic. An insert under the same key afterwards (the
/// same partition and worker, so handled after the tombstone) is the barrier.
#[tokio::test(flavor = "multi_thread")]
async fn a_hard_deleted_row_leaves_no_dead_letter_for_its_tombstone() {
    let s = Stack::start(&[]).await;
    let id = s
        .dashboard_member("hard-delete@example.com", json!({}))
        .await;
    s.quiescent(Duration::from_millis(500)).await;
    s.admin
        .execute(
            "delete from public.members where memberstack_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let before = s.processed().await;
    s.admin
        .execute(
            "insert into public.members (memberstack_id, email) values ($1, 'again@example.com')",
            &[&id],
        )
        .await
        .unwrap();
    wait_for("the insert after the tombstone decided", WAIT, || async {
        (s.processed().await > before).then_some(())
    })
    .await;
    let letters: i64 = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = membersync::kafka::client_config(&s.kafka)
            .set("group.id", support::unique_name("dlq-count"))
            .create()
            .unwrap();
        (0..s.kafka.topic_partitions as i32)
            .map(|p| {
                let (low, high) = c
                    .fetch_watermarks(&s.topic("dlq"), p, Duration::from_secs(10))
                    .unwrap();
                high - low
            })
            .sum()
    };
    assert_eq!(letters, 0, "dead letters: {}", s.history(&id).await);
}
