//! Errors of starting or driving a simulator.

use std::net::SocketAddr;
use std::time::Duration;

use crate::ingest::verify::KeyError;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the webhook signing secret is unusable: {0}")]
    WebhookSecret(#[from] KeyError),
    #[error("a webhook URL needs a signing secret")]
    WebhookSecretMissing,
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot connect to the database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("no member with id {0}")]
    MemberNotFound(String),
    #[error("email {0} is already in use")]
    EmailInUse(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}
