//! The binary's edge: parse arguments, load configuration, start telemetry, run a command, and
//! map the outcome to an exit code (0 ok, 1 failure, 2 invalid configuration).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use membersync::cli::{BackfillArgs, Cli, Command, DlqCommand};
use membersync::config::{self, Config};
use membersync::daemon::Role;
use membersync::db::{self, Login};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("membersync: {e}");
            return ExitCode::from(2);
        }
    };
    // Sentry wants to be initialised before the runtime starts its threads.
    let _telemetry = membersync::telemetry::init(&config.telemetry);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("membersync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "membersync failed");
            eprintln!("membersync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            let roles = Role::for_run(&config);
            membersync::daemon::run(config, &roles).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cdc => {
            membersync::daemon::run(config, &[Role::Cdc]).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest => {
            membersync::daemon::run(config, &[Role::Ingest]).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Merge => {
            membersync::daemon::run(config, &[Role::Merge]).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bridge => {
            membersync::daemon::run(config, &[Role::Bridge]).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill(args) => backfill(args, &config).await,
        Command::Dlq { command } => dlq(command, &config).await,
        Command::Migrate { wait: true } => {
            // Polled every 2 s; said again only when the reason changes.
            let mut last = String::new();
            db::migrate::wait_until_applied(
                &config.database,
                Login::Daemon,
                std::time::Duration::from_secs(2),
                |why| {
                    if why != last {
                        tracing::info!(%why, "waiting for the schema migrations");
                        last = why.to_owned();
                    }
                },
            )
            .await;
            println!(
                "schema is up to date ({} migrations)",
                db::migrate::known().len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { wait: false } => {
            let mut client = db::connect(&config.database, Login::Admin).await?;
            let report = db::migrate::migrate(&mut client)
                .await
                .context("applying migrations")?;
            if report.applied.is_empty() {
                println!(
                    "schema is up to date ({} migrations)",
                    db::migrate::known().len()
                );
            } else {
                for name in &report.applied {
                    println!("applied {name}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { tables, wait } => snapshot(&config, &tables, wait).await,
        Command::Check => {
            let items = membersync::check::run(&config).await;
            for item in &items {
                println!("{item}");
            }
            Ok(if items.iter().all(|i| i.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn backfill(args: BackfillArgs, config: &Config) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        let report = membersync::backfill::dry_run(config, args.page_size).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let options = membersync::backfill::Options {
        restart: args.restart,
        page_size: args.page_size,
        snapshot: !args.no_snapshot,
    };
    let outcome = membersync::backfill::run(config, &options).await?;
    if args.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        println!("{}", outcome.summary_line());
    }
    Ok(ExitCode::SUCCESS)
}

async fn snapshot(config: &Config, tables: &[String], wait: bool) -> anyhow::Result<ExitCode> {
    use membersync::cdc::incremental::{self, SnapshotState};
    if let Some(t) = tables.iter().find(|t| !config.cdc.tables.contains(t)) {
        anyhow::bail!("{t} is not a captured table (cdc.tables)");
    }
    let client = db::connect(&config.database, Login::Daemon).await?;
    let id = incremental::request_snapshot(&client, tables).await?;
    println!("incremental snapshot {id} requested");
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = None;
    loop {
        let s = incremental::snapshot_status(&client, id).await?;
        let line = format!(
            "{} table={} rows={} skipped={} chunks={}",
            s.state.as_str(),
            s.current_table.as_deref().unwrap_or("-"),
            s.rows_emitted,
            s.rows_skipped,
            s.chunks
        );
        if last.as_ref() != Some(&line) {
            println!("{line}");
            last = Some(line);
        }
        match s.state {
            SnapshotState::Done => return Ok(ExitCode::SUCCESS),
            SnapshotState::Failed | SnapshotState::Cancelled => {
                eprintln!(
                    "membersync: snapshot {id} {}: {}",
                    s.state.as_str(),
                    s.error.as_deref().unwrap_or("-")
                );
                return Ok(ExitCode::FAILURE);
            }
            SnapshotState::Requested | SnapshotState::Running => {}
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn dlq(command: DlqCommand, config: &Config) -> anyhow::Result<ExitCode> {
    use membersync::merge::dlq;
    let topic = membersync::kafka::topics::Topics::new(&config.kafka.topic_prefix).dlq();
    let letters = dlq::read_all(&config.kafka, &topic)
        .await
        .with_context(|| format!("reading {topic}"))?;
    let client = db::connect(&config.database, Login::Daemon).await?;
    let replayed = dlq::replayed_ids(&client)
        .await
        .context("reading audit_logs")?;
    match command {
        DlqCommand::List { json } => {
            if json {
                for v in dlq::listing(&letters, &replayed) {
                    println!("{v}");
                }
            } else {
                print!("{}", dlq::table(&letters, &replayed));
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { id, all } => {
            let chosen: Vec<&dlq::DeadLetter> = if all {
                letters
                    .iter()
                    .filter(|l| !replayed.contains(&l.id))
                    .collect()
            } else {
                let mut chosen = Vec::new();
                for wanted in &id {
                    match letters.iter().find(|l| &l.id == wanted) {
                        Some(l) => chosen.push(l),
                        None => anyhow::bail!("no dead letter with id {wanted} on {topic}"),
                    }
                }
                chosen
            };
            let producer = membersync::kafka::producer::Producer::new(
                &config.kafka,
                std::time::Duration::from_millis(config.kafka.message_timeout_ms),
            )?;
            for letter in &chosen {
                letter
                    .replay(&producer, std::time::Duration::from_secs(10))
                    .await
                    .with_context(|| format!("replaying {}", letter.id))?;
                dlq::record_replay(&client, letter)
                    .await
                    .context("writing audit_logs")?;
                println!("replayed {} to {}", letter.id, letter.origin.topic);
            }
            if chosen.is_empty() {
                println!("nothing to replay");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
