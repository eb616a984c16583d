//! Postgres connections and the schema migrations in `schemas/migrations/`.

pub mod migrate;
pub mod tls;

use secrecy::ExposeSecret;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;

/// Which role a connection logs in as: one per duty (schemas/migrations/V14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// The daemon's replication role (`database.user`): CDC and the command-line tools.
    Daemon,
    /// Merge's role (`database.merge_user`, else `database.user`).
    Merge,
    /// The read-only role of the member/admin API (`database.api_user`, else `database.user`).
    Api,
    /// The owner role that applies migrations (`database.admin_user`).
    Admin,
}

impl Login {
    /// The user and password this login uses under `cfg`.
    pub fn credentials(self, cfg: &DatabaseConfig) -> (&str, Option<&secrecy::SecretString>) {
        let daemon = (cfg.user.as_str(), cfg.password.as_ref());
        match self {
            Self::Daemon => daemon,
            Self::Merge => cfg
                .merge_user
                .as_deref()
                .map_or(daemon, |u| (u, cfg.merge_password.as_ref())),
            Self::Api => cfg
                .api_user
                .as_deref()
                .map_or(daemon, |u| (u, cfg.api_password.as_ref())),
            Self::Admin => (cfg.admin_user.as_str(), cfg.admin_password.as_ref()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The message is tokio-postgres's with its causes (a TLS handshake failure says why only
    /// there), which never include the password.
    #[error(
        "cannot connect to Postgres at {host}:{port} as {user}: {}",
        with_causes(source)
    )]
    Connect {
        host: String,
        port: u16,
        user: String,
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
    #[error("database TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// `error: cause: cause …`, without repeating a cause its parent already printed.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Builds the tokio-postgres configuration for `login`. The password is handed to the driver
/// and nowhere else.
pub fn pg_config(cfg: &DatabaseConfig, login: Login) -> tokio_postgres::Config {
    let (user, password) = login.credentials(cfg);
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.dbname)
        .user(user)
        .application_name(&cfg.application_name)
        .connect_timeout(cfg.connect_timeout())
        .ssl_mode(tls::driver_mode(cfg.sslmode));
    if let Some(password) = password {
        pg.password(password.expose_secret());
    }
    pg
}

/// Opens a connection and drives it on its own task.
pub async fn connect(cfg: &DatabaseConfig, login: Login) -> Result<Client, DbError> {
    let user = login.credentials(cfg).0.to_owned();
    let (client, connection) = pg_config(cfg, login)
        .connect(tls::connector(cfg)?)
        .await
        .map_err(|source| DbError::Connect {
            host: cfg.host.clone(),
            port: cfg.port,
            user,
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed with an error");
        }
    });
    Ok(client)
}
