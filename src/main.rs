//! The binary's edge: parse arguments, load configuration, start telemetry, run a command, and
//! map the outcome to an exit code (0 ok, 1 failure, 2 invalid configuration).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use membersync::cli::{Cli, Command};
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
            membersync::daemon::run(config, Role::ALL).await?;
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
        Command::Migrate => {
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
