//! `membersync-sim`: runs the Memberstack, Supabase Auth, PostHog and Make.com simulators for
//! the local
//! run (see docs/simulators.md), prints their URLs, and stops on Ctrl-C.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use membersync::sim::make::{MakeConfig, MakeSim};
use membersync::sim::memberstack::{MemberstackConfig, MemberstackSim};
use membersync::sim::posthog::{PostHogConfig, PostHogSim};
use membersync::sim::supabase_auth::{AuthConfig, AuthSim};
use secrecy::SecretString;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Local simulators of Memberstack, Supabase Auth, PostHog and Make.com webhooks"
)]
struct Args {
    /// Memberstack Admin API listen address.
    #[arg(long, default_value = "127.0.0.1:8781")]
    memberstack_addr: SocketAddr,
    /// Supabase Auth admin API listen address (needs --database-url).
    #[arg(long, default_value = "127.0.0.1:8782")]
    auth_addr: SocketAddr,
    /// PostHog capture listen address.
    #[arg(long, default_value = "127.0.0.1:8783")]
    posthog_addr: SocketAddr,
    /// Make.com custom webhooks listen address (any `/<token>` is a hook).
    #[arg(long, default_value = "127.0.0.1:8784")]
    make_addr: SocketAddr,
    /// The Memberstack secret key clients must send as X-API-KEY.
    #[arg(long, env = "MEMBERSYNC_SIM_API_KEY", hide_env_values = true)]
    api_key: String,
    /// membersync's webhook endpoint (`http://127.0.0.1:8080/webhooks/memberstack`).
    #[arg(long)]
    webhook_url: Option<String>,
    /// Svix signing secret (`whsec_<base64>`) for the webhooks; required with --webhook-url.
    #[arg(long, env = "MEMBERSYNC_SIM_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Postgres DSN (tokio-postgres syntax) of a role that may write auth.users; without it
    /// the Supabase Auth simulator is not started.
    #[arg(long, env = "MEMBERSYNC_SIM_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The Supabase service_role key clients must send (Authorization: Bearer, apikey).
    #[arg(
        long,
        env = "MEMBERSYNC_SIM_SERVICE_ROLE_KEY",
        hide_env_values = true,
        default_value = "sim-service-role-key"
    )]
    service_role_key: String,
    /// The PostHog project API key clients must send as api_key.
    #[arg(
        long,
        env = "MEMBERSYNC_SIM_POSTHOG_API_KEY",
        hide_env_values = true,
        default_value = "phc_sim"
    )]
    posthog_api_key: String,
    /// Memberstack API requests per rolling second (0 = unlimited).
    #[arg(long, default_value_t = membersync::sim::memberstack::DEFAULT_RATE_LIMIT)]
    rate_limit: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let mut ms_config = MemberstackConfig::new(args.api_key);
    ms_config.addr = Some(args.memberstack_addr);
    ms_config.rate_limit = args.rate_limit;
    if let Some(url) = args.webhook_url {
        let secret = args
            .webhook_secret
            .context("--webhook-url needs --webhook-secret (or MEMBERSYNC_SIM_WEBHOOK_SECRET)")?;
        ms_config.webhook_url = Some(url);
        ms_config.webhook_secret = Some(SecretString::from(secret));
    }
    let memberstack = MemberstackSim::start(ms_config)
        .await
        .context("starting the Memberstack simulator")?;
    println!("memberstack  {}", memberstack.base_url());

    let auth = match args.database_url {
        Some(url) => {
            let mut config = AuthConfig::new(url, args.service_role_key);
            config.addr = Some(args.auth_addr);
            let auth = AuthSim::start(config)
                .await
                .context("starting the Supabase Auth simulator")?;
            println!("supabase     {}", auth.base_url());
            Some(auth)
        }
        None => {
            println!("supabase     (not started: no --database-url)");
            None
        }
    };

    let mut ph_config = PostHogConfig::new(args.posthog_api_key);
    ph_config.addr = Some(args.posthog_addr);
    let posthog = PostHogSim::start(ph_config)
        .await
        .context("starting the PostHog simulator")?;
    println!("posthog      {}", posthog.base_url());
    let make = MakeSim::start(MakeConfig {
        addr: Some(args.make_addr),
    })
    .await
    .context("starting the Make.com simulator")?;
    println!("make         {}/<token>", make.base_url());
    println!("control      <url>/__sim/… (see docs/simulators.md); Ctrl-C stops");

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    memberstack.shutdown().await;
    if let Some(auth) = auth {
        auth.shutdown().await;
    }
    posthog.shutdown().await;
    make.shutdown().await;
    Ok(())
}
