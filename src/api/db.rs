//! One Postgres connection shared by the API's requests (tokio-postgres pipelines concurrent
//! queries on it), opened on first use and reopened after it breaks. The ingest role does
//! not need Postgres otherwise, so an unreachable database only affects the routes that
//! read it (503), never webhook ingest.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::db::{self, DbError, Login};

pub struct SharedClient {
    config: DatabaseConfig,
    client: Mutex<Option<Arc<Client>>>,
}

impl SharedClient {
    pub fn new(config: DatabaseConfig) -> Self {
        Self {
            config,
            client: Mutex::new(None),
        }
    }

    /// The open connection, or a new one (concurrent callers wait for the same connect).
    pub async fn get(&self) -> Result<Arc<Client>, DbError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(db::connect(&self.config, Login::Api).await?);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }
}
