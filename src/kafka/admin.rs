//! Broker reachability and topic creation through the Kafka admin API.

use std::collections::HashSet;
use std::sync::Arc;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create a Kafka admin client: {0}")]
    Client(#[source] KafkaError),
    #[error("broker at {brokers} unreachable: {source}")]
    Unreachable { brokers: String, source: KafkaError },
    #[error("cannot create topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("admin request failed: {0}")]
    Request(#[source] KafkaError),
}

pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    cfg: KafkaConfig,
}

/// What the cluster metadata says.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub brokers: usize,
    pub topics: HashSet<String>,
}

impl KafkaAdmin {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, AdminError> {
        let client = super::client_config(cfg)
            .create()
            .map_err(AdminError::Client)?;
        Ok(Self {
            client: Arc::new(client),
            cfg: cfg.clone(),
        })
    }

    /// Fetches cluster metadata (brokers and topics); this is the reachability probe.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, AdminError> {
        let client = Arc::clone(&self.client);
        let timeout = self.cfg.request_timeout();
        let brokers = self.cfg.brokers.clone();
        // fetch_metadata blocks; keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            let md = client
                .inner()
                .fetch_metadata(None, timeout)
                .map_err(|source| AdminError::Unreachable { brokers, source })?;
            Ok(ClusterInfo {
                brokers: md.brokers().len(),
                topics: md.topics().iter().map(|t| t.name().to_owned()).collect(),
            })
        })
        .await
        .expect("metadata task panicked")
    }

    /// Creates the topics that are missing; existing ones are left as they are.
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<Vec<String>, AdminError> {
        let existing = self.cluster_info().await?.topics;
        let missing: Vec<&String> = topics.iter().filter(|t| !existing.contains(*t)).collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.cfg.topic_partitions,
                    TopicReplication::Fixed(self.cfg.topic_replication_factor),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.cfg.request_timeout()));
        let results = self
            .client
            .create_topics(&new_topics, &opts)
            .await
            .map_err(AdminError::Request)?;
        let mut created = Vec::new();
        for result in results {
            match result {
                Ok(topic) => created.push(topic),
                // Another instance won the race: that is the state we wanted.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(AdminError::CreateTopic { topic, code }),
            }
        }
        Ok(created)
    }
}
