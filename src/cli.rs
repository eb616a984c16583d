//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "membersync",
    version,
    about = "Keeps Memberstack members and a Supabase database in sync through Kafka",
    long_about = "Keeps Memberstack members and a Supabase (PostgreSQL) database in sync, in both \
                  directions, through Kafka.\n\nConfiguration: a TOML file (--config) with environment \
                  overrides MEMBERSYNC__SECTION__KEY; secrets only from the environment or *_file keys. \
                  See docs/configuration.md."
)]
pub struct Cli {
    /// TOML configuration file; without it, defaults plus environment overrides.
    #[arg(
        long,
        short,
        global = true,
        env = "MEMBERSYNC_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: every role in one process, the ops server on telemetry.metrics_addr,
    /// until SIGTERM or SIGINT (then drain, bounded by shutdown.drain_timeout_secs).
    Run,
    /// Run only the CDC role: stream the captured tables' changes from the logical replication
    /// slot to Kafka. Several instances may run; one streams, the others wait as hot standby.
    Cdc,
    /// Run only the webhook ingest role: POST /webhooks/memberstack and /webhooks/stripe on
    /// ingest.listen_addr, verified and produced to Kafka (scale out behind a load balancer).
    Ingest,
    /// Run only the merge role: consume the Memberstack, Stripe and CDC topics as one consumer
    /// group (merge.group_id), reconcile each member by field authority and write both sides
    /// (scale out: instances share the partitions).
    Merge,
    /// Run only the bridge role: consume merge's outcomes (<prefix>.sync) in its own consumer
    /// group (bridge.group_id) and POST them to the Make.com webhooks of [bridge.routes], with
    /// retries and a dead-letter topic (<prefix>.bridge.dlq). Scale out: instances share the
    /// partitions.
    Bridge,
    /// Reconcile everything: page every Memberstack member (within the rate limit) and publish
    /// it as a member.snapshot for merge to reconcile by field authority, and request an
    /// incremental snapshot of the captured tables (run by CDC while it streams). Resumable: an
    /// interrupted run continues after its last finished page. See docs/backfill.md.
    Backfill(BackfillArgs),
    /// Inspect and replay the dead-letter topic (<prefix>.dlq).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Apply the database migrations (schemas/migrations) as database.admin_user: tables, row-level
    /// security, the membersync role's grants and the publication. Safe to re-run.
    Migrate {
        /// Apply nothing: wait, as database.user, until every migration this build knows has
        /// been applied (by a `migrate` elsewhere), then exit 0. For a Kubernetes initContainer
        /// that starts a role only after its schema is there.
        #[arg(long)]
        wait: bool,
    },
    /// Request an incremental snapshot of captured tables: the CDC leader re-reads them in
    /// primary-key chunks while streaming continues and publishes the rows as op "r"
    /// (docs/cdc.md). Prints the request id; resumable after a crash or leader change.
    Snapshot {
        /// A captured table (schema.table); repeat for several. Default: every captured table.
        #[arg(long = "table", value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Wait until it finishes, printing progress; exit 1 if it fails.
        #[arg(long)]
        wait: bool,
    },
    /// Check configuration, Postgres and Kafka; one line per item with ✓ or ✗ and a fix hint.
    /// Exits 1 if any item fails.
    Check,
}

#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// Change nothing: compare Memberstack with Supabase per mapped field and print the drift
    /// (only in Memberstack, only in Supabase, different values).
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable output (the drift report, or the run's summary) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Ignore saved progress: abandon an interrupted run and start from the first page.
    #[arg(long, conflicts_with = "dry_run")]
    pub restart: bool,
    /// Only the Memberstack pass: do not request (nor wait for) an incremental snapshot of the
    /// captured Supabase tables.
    #[arg(long, conflicts_with = "dry_run")]
    pub no_snapshot: bool,
    /// Members per list request (Memberstack serves at most 100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub page_size: u32,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters: id, when, origin topic/partition/offset, attempts, error, and
    /// whether it was replayed.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-feed dead letters to their original topic (unchanged, with a membersync-replay-of
    /// header); merge processes them again. Each replay is recorded in audit_logs.
    Replay {
        /// The dead letter to replay (from `dlq list`).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Vec<String>,
        /// Replay every dead letter not replayed yet.
        #[arg(long)]
        all: bool,
    },
}
