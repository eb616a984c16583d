//! The configuration sections and their defaults. Every key here is documented, with its
//! default, in `docs/configuration.md`; keep the two in step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub cdc: CdcConfig,
    pub ingest: IngestConfig,
    pub merge: super::MergeConfig,
    pub memberstack: super::MemberstackConfig,
    pub supabase: super::SupabaseConfig,
    pub posthog: super::PostHogConfig,
    pub bridge: super::BridgeConfig,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
    pub api: super::ApiConfig,
}

/// The Supabase Postgres database. Use the direct connection (not the pooler): logical
/// replication does not work through Supavisor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    /// The daemon's own least-privilege role (LOGIN REPLICATION), created by `migrate`.
    pub user: String,
    /// Secret: only from `MEMBERSYNC__DATABASE__PASSWORD` or `password_file`.
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
    /// The role merge logs in as (V14 creates `membersync_merge`: merge's reads and writes,
    /// no REPLICATION). Unset: `user`.
    pub merge_user: Option<String>,
    /// Secret: only from `MEMBERSYNC__DATABASE__MERGE_PASSWORD` or `merge_password_file`.
    pub merge_password: Option<SecretString>,
    pub merge_password_file: Option<PathBuf>,
    /// The role the member/admin API logs in as (V14 creates `membersync_api`: read-only).
    /// Unset: `user`.
    pub api_user: Option<String>,
    /// Secret: only from `MEMBERSYNC__DATABASE__API_PASSWORD` or `api_password_file`.
    pub api_password: Option<SecretString>,
    pub api_password_file: Option<PathBuf>,
    /// The owner role `migrate` connects as (Supabase: `postgres`).
    pub admin_user: String,
    /// Secret: only from `MEMBERSYNC__DATABASE__ADMIN_PASSWORD` or `admin_password_file`.
    pub admin_password: Option<SecretString>,
    pub admin_password_file: Option<PathBuf>,
    pub connect_timeout_secs: u64,
    pub application_name: String,
    /// TLS to Postgres, with libpq's `sslmode` meanings; applies to every connection, the
    /// replication stream included. Unset in the configuration: `verify-full` for a host that
    /// is not loopback (or with `ssl_root_cert`), `prefer` on loopback (the loader decides;
    /// the struct's own default is `prefer`, for the loopback default host).
    pub sslmode: PgSslMode,
    /// PEM bundle of the CAs `verify-ca` / `verify-full` accept (hosted Supabase: the project's
    /// CA certificate from the dashboard). Without it, the Mozilla roots.
    pub ssl_root_cert: Option<PathBuf>,
}

/// libpq's `sslmode` values (without `allow`, which only makes sense for servers that demand
/// TLS of some clients and not of others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgSslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; no certificate check (libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection; no certificate check.
    Require,
    /// TLS, and the server certificate must chain to a trusted CA (any host name).
    VerifyCa,
    /// TLS, a trusted chain, and a certificate for the host connected to.
    VerifyFull,
}

impl PgSslMode {
    /// The configuration's spelling (libpq's).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5432,
            dbname: "postgres".into(),
            user: "membersync".into(),
            password: None,
            password_file: None,
            merge_user: None,
            merge_password: None,
            merge_password_file: None,
            api_user: None,
            api_password: None,
            api_password_file: None,
            admin_user: "postgres".into(),
            admin_password: None,
            admin_password_file: None,
            connect_timeout_secs: 10,
            application_name: "membersync".into(),
            sslmode: PgSslMode::default(),
            ssl_root_cert: None,
        }
    }
}

impl DatabaseConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` bootstrap list.
    pub brokers: String,
    pub client_id: String,
    /// Every topic name starts with this prefix (`<prefix>.memberstack`, `<prefix>.cdc.…`).
    pub topic_prefix: String,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    /// Secret: only from `MEMBERSYNC__KAFKA__SASL_PASSWORD` or `sasl_password_file`.
    pub sasl_password: Option<SecretString>,
    pub sasl_password_file: Option<PathBuf>,
    pub ssl_ca_location: Option<PathBuf>,
    /// How long the producer may try to deliver one message before it is reported failed.
    pub message_timeout_ms: u64,
    pub linger_ms: u64,
    /// Timeout of metadata and admin requests.
    pub request_timeout_ms: u64,
    /// Create missing topics at start (with `topic_partitions` / `topic_replication_factor`).
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication_factor: i32,
    /// How often consumers (merge, bridge) refresh `membersync_kafka_consumer_lag` from
    /// librdkafka's statistics; 0 turns the metric off.
    pub statistics_interval_ms: u64,
    /// librdkafka properties applied to every client (`[kafka.librdkafka]`), except the ones
    /// membersync owns (refused at load).
    pub librdkafka: super::LibrdkafkaProperties,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            client_id: "membersync".into(),
            topic_prefix: "membersync".into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_location: None,
            message_timeout_ms: 30_000,
            linger_ms: 5,
            request_timeout_ms: 10_000,
            create_topics: true,
            topic_partitions: 6,
            topic_replication_factor: 1,
            statistics_interval_ms: 5_000,
            librdkafka: super::LibrdkafkaProperties::default(),
        }
    }
}

impl KafkaConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Snapshot the captured tables when the slot is created (then stream).
    Initial,
    /// Never snapshot: stream changes from the slot's creation on.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdcConfig {
    /// The daemon's own logical replication slot (never `supabase_realtime`'s).
    pub slot: String,
    /// The daemon's own publication, created by `migrate`.
    pub publication: String,
    /// Captured tables, `schema.table`.
    pub tables: Vec<String>,
    /// Kafka key columns per table (`"public.members" = ["memberstack_id"]`); other tables
    /// use their replica-identity key. One column → its text as the key; several → a JSON
    /// object.
    pub key_columns: std::collections::BTreeMap<String, Vec<String>>,
    pub snapshot: SnapshotMode,
    /// Rows fetched per round trip during a snapshot.
    pub snapshot_fetch_rows: u32,
    /// Rows per chunk of an incremental snapshot (one short select between two watermarks).
    pub incremental_chunk_rows: u32,
    /// How often the CDC leader looks for a requested incremental snapshot.
    pub incremental_poll_interval_ms: u64,
    /// A logical message is written this often so the slot advances when only other
    /// databases write (0 disables).
    pub heartbeat_interval_secs: u64,
    /// How often the acknowledged LSN is reported to Postgres at the latest.
    pub status_interval_ms: u64,
    /// How often slot lag and health are polled.
    pub slot_poll_interval_secs: u64,
    /// Upper bound of the reconnect backoff after a Postgres or Kafka error.
    pub reconnect_max_backoff_secs: u64,
    /// A change event whose record (key + value) is larger is replaced by a reference record
    /// and a dead letter instead of being produced (Kafka would refuse it for good). Keep it
    /// at or below the topics' `max.message.bytes`.
    pub max_record_bytes: usize,
    /// How often the leader renews its liveness lease (`membersync_meta.cdc_leaders`).
    pub leader_heartbeat_interval_ms: u64,
    /// A standby terminates the leader's lock session when its lease is older than this
    /// (a hung leader, or one whose connection is gone without the server noticing), and
    /// takes over. Also the TCP keepalive and user timeout budget of the lock session.
    pub leader_lease_timeout_secs: u64,
    /// The Kafka key of change events: `member_id` (one key column → its bare text, sharing
    /// partitions with the webhook topics) or `debezium` (a JSON object of the key columns).
    pub key_format: crate::cdc::envelope::KeyFormat,
    /// Debezium's `skipped.operations`: comma-separated `c`, `u`, `d`, `t`, or `none`.
    pub skipped_operations: String,
    /// Debezium's `tombstones.on.delete`: a null-valued record follows every delete.
    pub tombstones_on_delete: bool,
    /// Debezium's `unavailable.value.placeholder`: stands in for an unchanged TOASTed value.
    pub unavailable_value_placeholder: String,
    /// The replica identity CDC gives a captured table when it starts (Debezium's
    /// `replica.identity.autoset.values`): `"public.members" = "full"`; unlisted tables are
    /// left as they are.
    pub replica_identity: std::collections::BTreeMap<String, crate::cdc::identity::ReplicaIdentity>,
    /// Debezium's `time.precision.mode` for `date`, `time` and `timestamp`: `iso_string`,
    /// `adaptive` or `connect`.
    pub time_precision_mode: crate::cdc::temporal::TimePrecisionMode,
}

impl Default for CdcConfig {
    fn default() -> Self {
        let mut key_columns = std::collections::BTreeMap::new();
        key_columns.insert(
            "public.members".to_owned(),
            vec!["memberstack_id".to_owned()],
        );
        Self {
            slot: "membersync".into(),
            publication: "membersync".into(),
            tables: vec!["public.members".into()],
            key_columns,
            snapshot: SnapshotMode::Initial,
            snapshot_fetch_rows: 5_000,
            incremental_chunk_rows: 1_024,
            incremental_poll_interval_ms: 1_000,
            heartbeat_interval_secs: 10,
            status_interval_ms: 1_000,
            slot_poll_interval_secs: 10,
            reconnect_max_backoff_secs: 30,
            max_record_bytes: 1_000_000,
            leader_heartbeat_interval_ms: 2_000,
            leader_lease_timeout_secs: 15,
            key_format: crate::cdc::envelope::KeyFormat::MemberId,
            skipped_operations: "t".into(),
            tombstones_on_delete: true,
            unavailable_value_placeholder: crate::cdc::envelope::DEBEZIUM_PLACEHOLDER.into(),
            replica_identity: [(
                "public.members".to_owned(),
                crate::cdc::identity::ReplicaIdentity::Full,
            )]
            .into(),
            time_precision_mode: crate::cdc::temporal::TimePrecisionMode::IsoString,
        }
    }
}

/// The webhook endpoint (`POST /webhooks/memberstack`, `POST /webhooks/stripe`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen_addr: SocketAddr,
    /// Larger bodies are refused with 413 before they are read to the end. At most
    /// 900,000: the record (body plus envelope) must fit Kafka's default 1 MB message size.
    pub body_limit_bytes: usize,
    /// Whole-request budget (reading the body, verifying, producing); then 408.
    pub request_timeout_ms: u64,
    /// How long a delivery may wait for Kafka's acknowledgement; then 503 and the sender
    /// retries. Keep it well under Svix's 15 s.
    pub kafka_ack_timeout_ms: u64,
    /// Requests in flight at once, across every route of the server (both webhooks and the
    /// member/admin API). One more is not queued: the body read that has been silent longest
    /// is shed to make room, or, when none is reading a body, the newcomer is answered 503
    /// with `Retry-After`. `concurrency_limit × body_limit_bytes` may not exceed
    /// `memory_budget_bytes`.
    pub concurrency_limit: usize,
    /// Bytes of request bodies the server may hold at once (`docs/ingest.md`): the
    /// configuration is refused when `concurrency_limit × body_limit_bytes` exceeds it.
    pub memory_budget_bytes: usize,
    /// A webhook body must have arrived in full this long after its headers; then 408 and
    /// the connection is closed (slow senders cannot hold a slot). At most
    /// `request_timeout_ms`.
    pub body_read_timeout_ms: u64,
    /// A connection must send a request's complete headers this long after it opened or
    /// after its previous answer; then it is closed.
    pub header_read_timeout_ms: u64,
    /// Open connections at most (lingering ones included); at the cap the server stops
    /// accepting until one closes, and the kernel's backlog holds the newcomers.
    pub max_connections: usize,
    /// Secret: Svix signing secrets (`whsec_…`), several separated by spaces or commas while
    /// rotating. Only from `MEMBERSYNC__INGEST__MEMBERSTACK_WEBHOOK_SECRETS` or the `_file`.
    /// Unset: the Memberstack route answers 404.
    pub memberstack_webhook_secrets: Option<SecretString>,
    pub memberstack_webhook_secrets_file: Option<PathBuf>,
    /// Secret: Stripe endpoint secrets (`whsec_…`), as above. Unset: the Stripe route answers 404.
    pub stripe_webhook_secrets: Option<SecretString>,
    pub stripe_webhook_secrets_file: Option<PathBuf>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 512 * 1024,
            request_timeout_ms: 10_000,
            kafka_ack_timeout_ms: 5_000,
            concurrency_limit: 64,
            memory_budget_bytes: 32 * 1024 * 1024,
            body_read_timeout_ms: 5_000,
            header_read_timeout_ms: 10_000,
            max_connections: 3_072,
            memberstack_webhook_secrets: None,
            memberstack_webhook_secrets_file: None,
            stripe_webhook_secrets: None,
            stripe_webhook_secrets_file: None,
        }
    }
}

impl IngestConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn kafka_ack_timeout(&self) -> Duration {
        Duration::from_millis(self.kafka_ack_timeout_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}

/// Splits a secret holding several values (rotation) into its parts.
pub fn split_secrets(secrets: &SecretString) -> Vec<SecretString> {
    use secrecy::ExposeSecret;
    secrets
        .expose_secret()
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_owned()))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A `tracing` filter directive (`info`, `membersync=debug,rdkafka=warn`); `RUST_LOG` wins.
    pub log_level: String,
    /// Address of the metrics / health server (`/metrics`, `/healthz`, `/readyz`).
    pub metrics_addr: SocketAddr,
    /// Secret: only from `MEMBERSYNC__TELEMETRY__SENTRY_DSN`, `sentry_dsn_file` or `SENTRY_DSN`.
    pub sentry_dsn: Option<SecretString>,
    pub sentry_dsn_file: Option<PathBuf>,
    pub sentry_environment: Option<String>,
    pub sentry_traces_sample_rate: f32,
    /// `/healthz` answers 503 when a started role's loop has not beaten for this long (it is
    /// wedged) or its task ended.
    pub liveness_timeout_secs: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info,tokio_postgres=warn".into(),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            sentry_dsn: None,
            sentry_dsn_file: None,
            sentry_environment: None,
            sentry_traces_sample_rate: 0.0,
            liveness_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long roles may take to finish in-flight work before exit.
    pub drain_timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_secs: 30,
        }
    }
}

impl ShutdownConfig {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}
