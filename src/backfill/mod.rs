//! `membersync backfill` (docs/backfill.md): full reconciliation of both sides.
//!
//! The Memberstack pass pages every member through the client's rate limiter and publishes
//! each as a `member.snapshot` on `<prefix>.memberstack`; merge (a running `membersync run` or
//! `merge`) reconciles each by the field authority rules, creating rows and auth users for
//! members Supabase lacks. Progress (the list cursor of the last fully acknowledged page) is
//! persisted in `membersync_meta.backfill_runs`, so an interrupted run resumes where it
//! stopped. Unless told not to, the run also requests an incremental snapshot of the captured
//! tables (`cdc::incremental`, run by the CDC leader while streaming continues), so rows that
//! drifted on the Supabase side reach merge too, and waits for it after the Memberstack pass.
//! `--dry-run` writes nothing anywhere and prints the drift instead.

pub mod drift;
pub mod pass;
pub mod progress;
pub mod state;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cdc::incremental::{self, IncrementalError, SnapshotState, SnapshotStatus};
use crate::config::Config;
use crate::db::{self, Login};
use crate::kafka::admin::{AdminError, KafkaAdmin};
use crate::kafka::producer::{ProduceError, Producer};
use crate::kafka::topics::Topics;
use crate::sinks::memberstack::{MAX_PAGE_SIZE, MemberstackClient, MemberstackError};

pub use drift::DriftReport;
pub use pass::PassSummary;

#[derive(Debug, Clone)]
pub struct Options {
    /// Ignore the saved progress: abandon an open run and start from the first page.
    pub restart: bool,
    /// `GET /members` page size, 1..=100.
    pub page_size: u32,
    /// Request an incremental snapshot of the captured tables and wait for it.
    pub snapshot: bool,
}

/// How often the wait for the incremental snapshot polls its progress.
const SNAPSHOT_POLL: Duration = Duration::from_millis(500);
/// A request no CDC leader picked up after this long is worth a warning (no `run`/`cdc`?).
const SNAPSHOT_PICKUP_WARNING: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("Memberstack: {0}")]
    Memberstack(#[from] MemberstackError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Connect(#[from] db::DbError),
    #[error("Kafka: {0}")]
    Produce(#[from] ProduceError),
    #[error("Kafka: {0}")]
    Admin(#[from] AdminError),
    #[error("incremental snapshot: {0}")]
    Incremental(#[from] IncrementalError),
    #[error(
        "the incremental snapshot {id} of the captured tables ended {state}: {error} \
         (the Memberstack pass is complete; `membersync snapshot` requests another)"
    )]
    SnapshotEnded {
        id: i64,
        state: &'static str,
        error: String,
    },
    #[error("another backfill is running against this database")]
    Busy,
    #[error("--page-size must be between 1 and {MAX_PAGE_SIZE}, got {0}")]
    PageSize(u32),
}

/// What a (real) backfill did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub run_id: i64,
    /// Continued an interrupted run.
    pub resumed: bool,
    /// This invocation's pages, members and list requests.
    pub this_invocation: PassSummary,
    /// The run's totals, earlier invocations included.
    pub pages_done: u64,
    pub members_published: u64,
    pub topic: String,
    /// The incremental snapshot of the captured tables, as it finished (absent with
    /// `--no-snapshot`).
    pub snapshot: Option<SnapshotSummary>,
    pub elapsed_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub id: i64,
    pub state: &'static str,
    pub tables: Vec<String>,
    pub rows_emitted: i64,
    pub rows_skipped: i64,
    pub chunks: i64,
}

impl From<&SnapshotStatus> for SnapshotSummary {
    fn from(s: &SnapshotStatus) -> Self {
        Self {
            id: s.id,
            state: s.state.as_str(),
            tables: s.tables.clone(),
            rows_emitted: s.rows_emitted,
            rows_skipped: s.rows_skipped,
            chunks: s.chunks,
        }
    }
}

impl Outcome {
    pub fn summary_line(&self) -> String {
        let snapshot = match &self.snapshot {
            Some(s) => format!(
                "; incremental snapshot {} of {} {}: {} rows ({} left to the stream)",
                s.id,
                s.tables.join(", "),
                s.state,
                s.rows_emitted,
                s.rows_skipped
            ),
            None => String::new(),
        };
        format!(
            "backfill run {} {}: {} members in {} pages published to {} ({} pages in {:.1} s now){snapshot}; merge reconciles them",
            self.run_id,
            if self.resumed {
                "resumed and completed"
            } else {
                "completed"
            },
            self.members_published,
            self.pages_done,
            self.topic,
            self.this_invocation.pages,
            self.elapsed_secs
        )
    }
}

fn check_page_size(page_size: u32) -> Result<(), BackfillError> {
    if (1..=MAX_PAGE_SIZE).contains(&page_size) {
        Ok(())
    } else {
        Err(BackfillError::PageSize(page_size))
    }
}

/// The dry run: reads Memberstack and `members`, compares, writes nothing.
pub async fn dry_run(config: &Config, page_size: u32) -> Result<DriftReport, BackfillError> {
    check_page_size(page_size)?;
    let memberstack = MemberstackClient::new(&config.memberstack, None)?;
    let db = db::connect(&config.database, Login::Daemon).await?;
    let members = drift::memberstack_members(&memberstack, page_size).await?;
    let rows = drift::supabase_rows(&db).await?;
    Ok(drift::compare(&config.merge.fields, &members, &rows))
}

/// The Memberstack pass, resumable; returns when every page is published and acknowledged.
pub async fn run(config: &Config, options: &Options) -> Result<Outcome, BackfillError> {
    check_page_size(options.page_size)?;
    let started = Instant::now();
    let memberstack = MemberstackClient::new(&config.memberstack, None)?;
    let db = db::connect(&config.database, Login::Daemon).await?;
    if !state::try_lock(&db).await? {
        return Err(BackfillError::Busy);
    }
    let topic = Topics::new(&config.kafka.topic_prefix).memberstack();
    if config.kafka.create_topics {
        KafkaAdmin::new(&config.kafka)?
            .ensure_topics(std::slice::from_ref(&topic))
            .await?;
    }
    let message_timeout = Duration::from_millis(config.kafka.message_timeout_ms);
    let producer = Producer::new(&config.kafka, message_timeout)?;
    let mut run = state::open(&db, options.page_size, options.restart).await?;
    // Requested first, so the CDC leader re-reads the tables while the Memberstack pass runs;
    // once per run (a resumed run waits for the request it made before).
    if options.snapshot && run.snapshot_request_id.is_none() {
        let id = incremental::request_snapshot(&db, &[]).await?;
        state::snapshot_requested(&db, &mut run, id).await?;
        tracing::info!(
            run_id = run.id,
            snapshot_id = id,
            "backfill: incremental snapshot of the captured tables requested"
        );
    }
    audit(
        &db,
        if run.resumed {
            "backfill_resumed"
        } else {
            "backfill_started"
        },
        run.id,
        serde_json::json!({
            "page_size": options.page_size,
            "snapshot": options.snapshot,
            "restart": options.restart,
            "cursor": run.cursor,
            "members_published": run.members_published,
        }),
    )
    .await?;
    if run.resumed {
        tracing::info!(
            run_id = run.id,
            cursor = run.cursor,
            pages_done = run.pages_done,
            members_published = run.members_published,
            "backfill: resuming an interrupted run after its last finished page"
        );
    } else {
        tracing::info!(run_id = run.id, "backfill: new run");
    }
    let progress = progress::Progress::new(run.members_published);
    let pass = pass::Pass {
        memberstack: &memberstack,
        producer: &producer,
        topic: &topic,
        db: &db,
        page_size: options.page_size,
        queue_wait: message_timeout,
    };
    let summary = pass.run(&mut run, &progress).await;
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            progress.finish();
            return Err(e);
        }
    };
    let snapshot = match run.snapshot_request_id.filter(|_| options.snapshot) {
        Some(id) => Some(wait_for_snapshot(&db, id, &progress).await),
        None => None,
    };
    progress.finish();
    let snapshot = snapshot.transpose()?;
    state::complete(&db, &run).await?;
    if let Some(s) = snapshot.as_ref().filter(|s| s.state != SnapshotState::Done) {
        return Err(BackfillError::SnapshotEnded {
            id: s.id,
            state: s.state.as_str(),
            error: s.error.clone().unwrap_or_else(|| "-".into()),
        });
    }
    let outcome = Outcome {
        run_id: run.id,
        resumed: run.resumed,
        this_invocation: summary,
        pages_done: run.pages_done,
        members_published: run.members_published,
        topic,
        snapshot: snapshot.as_ref().map(SnapshotSummary::from),
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    audit(
        &db,
        "backfill_completed",
        run.id,
        serde_json::to_value(&outcome).unwrap_or_default(),
    )
    .await?;
    tracing::info!(
        run_id = outcome.run_id,
        pages_done = outcome.pages_done,
        members_published = outcome.members_published,
        list_requests = outcome.this_invocation.list_requests,
        elapsed_secs = outcome.elapsed_secs,
        "backfill: Memberstack pass completed"
    );
    Ok(outcome)
}

/// An `audit_logs` row for the run (issue #16: backfill runs leave a trace, as `dlq replay`
/// does): who ran it, which run, and what it was asked or did.
async fn audit(
    db: &tokio_postgres::Client,
    action: &str,
    run_id: i64,
    details: serde_json::Value,
) -> Result<(), BackfillError> {
    let actor = std::env::var("USER").unwrap_or_else(|_| "membersync-cli".into());
    db.execute(
        "insert into public.audit_logs (actor, action, target, details) values ($1, $2, $3, $4)",
        &[&actor, &action, &format!("backfill_run:{run_id}"), &details],
    )
    .await?;
    Ok(())
}

/// Polls the incremental snapshot until it ends (done, failed or cancelled).
async fn wait_for_snapshot(
    db: &tokio_postgres::Client,
    id: i64,
    progress: &progress::Progress,
) -> Result<SnapshotStatus, BackfillError> {
    let waiting = Instant::now();
    let mut warned = false;
    loop {
        let status = incremental::snapshot_status(db, id).await?;
        if status.state.is_final() {
            return Ok(status);
        }
        progress.snapshot(&status);
        if status.state == SnapshotState::Requested
            && !warned
            && waiting.elapsed() >= SNAPSHOT_PICKUP_WARNING
        {
            warned = true;
            tracing::warn!(
                snapshot_id = id,
                "backfill: no CDC leader has started the incremental snapshot yet; is \
                 `membersync run` (or `cdc`) running? Still waiting (Ctrl-C is safe: the request \
                 stays and runs when CDC does)"
            );
        }
        tokio::time::sleep(SNAPSHOT_POLL).await;
    }
}
