//! Postgres connections and the schema migrations in `schemas/migrations/`.

pub mod migrate;
pub mod tls;

use secrecy::ExposeSecret;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;

/// Which role a connection logs in as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// The daemon's least-privilege role (`database.user`).
    Daemon,
    /// The owner role that applies migrations (`database.admin_user`).
    Admin,
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
    let (user, password) = match login {
        Login::Daemon => (&cfg.user, cfg.password.as_ref()),
        Login::Admin => (&cfg.admin_user, cfg.admin_password.as_ref()),
    };
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
    let user = match login {
        Login::Daemon => cfg.user.clone(),
        Login::Admin => cfg.admin_user.clone(),
    };
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
