//! Loading: defaults ← TOML file ← environment, then secret resolution and validation.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;

use super::error::from_figment;
use super::{Config, ConfigError};

/// Environment overrides look like `MEMBERSYNC__DATABASE__PORT=6543`.
pub const ENV_PREFIX: &str = "MEMBERSYNC__";

/// Keys whose values are secrets: they may come from the environment or a `<key>_file`,
/// never from the config file itself (files get committed, copied and pasted into tickets).
const SECRET_KEYS: &[&str] = &[
    "database.password",
    "database.admin_password",
    "database.merge_password",
    "database.api_password",
    "kafka.sasl_password",
    "telemetry.sentry_dsn",
    "ingest.memberstack_webhook_secrets",
    "ingest.stripe_webhook_secrets",
    "memberstack.api_key",
    "supabase.service_role_key",
    "api.hs256_secret",
    "api.admin_token",
];

/// Loads the configuration the daemon runs with.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_from(path, ENV_PREFIX)
}

/// Like [`load`], with another environment prefix (lets tests isolate themselves).
pub fn load_from(path: Option<&Path>, env_prefix: &str) -> Result<Config, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::new(
                "",
                format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                ),
            ));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let figment = figment.merge(Env::prefixed(env_prefix).split("__"));

    for &key in SECRET_KEYS {
        if let Some(meta) = figment.find_metadata(key)
            && matches!(meta.source, Some(figment::Source::File(_)))
        {
            let var = format!("{env_prefix}{}", key.to_uppercase().replace('.', "__"));
            return Err(ConfigError::new(
                key,
                format!(
                    "secrets may not be written in the config file; set {var} or `{key}_file` instead"
                ),
            ));
        }
    }

    let mut config: Config = figment.extract().map_err(|e| from_figment(e, env_prefix))?;
    if !figment.contains("database.sslmode") {
        // Not chosen: verify-full off loopback (or with a CA to verify against), libpq's
        // prefer on this machine.
        let db = &mut config.database;
        db.sslmode = if db.ssl_root_cert.is_some() {
            super::PgSslMode::VerifyFull
        } else {
            super::default_sslmode(&db.host)
        };
    }
    resolve_secrets(&mut config)?;
    validate(&config)?;
    Ok(config)
}

fn resolve_secrets(c: &mut Config) -> Result<(), ConfigError> {
    resolve(
        "database.password",
        &mut c.database.password,
        c.database.password_file.take(),
    )?;
    resolve(
        "database.admin_password",
        &mut c.database.admin_password,
        c.database.admin_password_file.take(),
    )?;
    resolve(
        "database.merge_password",
        &mut c.database.merge_password,
        c.database.merge_password_file.take(),
    )?;
    resolve(
        "database.api_password",
        &mut c.database.api_password,
        c.database.api_password_file.take(),
    )?;
    resolve(
        "kafka.sasl_password",
        &mut c.kafka.sasl_password,
        c.kafka.sasl_password_file.take(),
    )?;
    resolve(
        "telemetry.sentry_dsn",
        &mut c.telemetry.sentry_dsn,
        c.telemetry.sentry_dsn_file.take(),
    )?;
    resolve(
        "ingest.memberstack_webhook_secrets",
        &mut c.ingest.memberstack_webhook_secrets,
        c.ingest.memberstack_webhook_secrets_file.take(),
    )?;
    resolve(
        "ingest.stripe_webhook_secrets",
        &mut c.ingest.stripe_webhook_secrets,
        c.ingest.stripe_webhook_secrets_file.take(),
    )?;
    resolve(
        "memberstack.api_key",
        &mut c.memberstack.api_key,
        c.memberstack.api_key_file.take(),
    )?;
    resolve(
        "supabase.service_role_key",
        &mut c.supabase.service_role_key,
        c.supabase.service_role_key_file.take(),
    )?;
    for (name, route) in &mut c.bridge.routes {
        let file = route.url_file.take();
        resolve(&format!("bridge.routes.{name}.url"), &mut route.url, file)?;
    }
    resolve(
        "api.hs256_secret",
        &mut c.api.hs256_secret,
        c.api.hs256_secret_file.take(),
    )?;
    resolve(
        "api.admin_token",
        &mut c.api.admin_token,
        c.api.admin_token_file.take(),
    )?;
    if c.telemetry.sentry_dsn.is_none() {
        // Sentry's own convention; honoured so existing deployments keep working.
        if let Ok(dsn) = std::env::var("SENTRY_DSN")
            && !dsn.trim().is_empty()
        {
            c.telemetry.sentry_dsn = Some(SecretString::from(dsn.trim().to_owned()));
        }
    }
    Ok(())
}

/// Reads `<key>_file` into the secret slot; both set at once is ambiguous and refused.
fn resolve(
    key: &str,
    slot: &mut Option<SecretString>,
    file: Option<PathBuf>,
) -> Result<(), ConfigError> {
    let Some(file) = file else { return Ok(()) };
    if slot.is_some() {
        return Err(ConfigError::new(
            key,
            format!("set either `{key}` or `{key}_file`, not both"),
        ));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| {
        ConfigError::new(
            format!("{key}_file"),
            format!("cannot read {}: {}", file.display(), e.kind()),
        )
    })?;
    // Trailing newlines are an artefact of editors and `echo`; multi-value secrets (webhook
    // secrets during rotation) may put one value per line.
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::new(
            format!("{key}_file"),
            format!("{} is empty", file.display()),
        ));
    }
    *slot = Some(SecretString::from(value.to_owned()));
    Ok(())
}

fn validate(c: &Config) -> Result<(), ConfigError> {
    let db = &c.database;
    non_empty("database.host", &db.host)?;
    non_empty("database.dbname", &db.dbname)?;
    non_empty("database.user", &db.user)?;
    non_empty("database.admin_user", &db.admin_user)?;
    for (key, user) in [
        ("database.merge_user", &db.merge_user),
        ("database.api_user", &db.api_user),
    ] {
        if let Some(user) = user {
            non_empty(key, user)?;
        }
    }
    if db.port == 0 {
        return Err(ConfigError::new(
            "database.port",
            "must be between 1 and 65535",
        ));
    }
    at_least_one(
        "database.connect_timeout_secs",
        db.connect_timeout_secs as i64,
    )?;
    if let Some(path) = &db.ssl_root_cert {
        if !db.sslmode.verifies() {
            return Err(ConfigError::new(
                "database.ssl_root_cert",
                "is only used by sslmode verify-ca or verify-full; set database.sslmode",
            ));
        }
        crate::db::tls::load_root_certs(path)
            .map_err(|e| ConfigError::new("database.ssl_root_cert", e.to_string()))?;
    }

    let k = &c.kafka;
    validate_brokers(&k.brokers)?;
    non_empty("kafka.client_id", &k.client_id)?;
    if k.topic_prefix.is_empty()
        || k.topic_prefix.len() > 200
        || !k
            .topic_prefix
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
    {
        return Err(ConfigError::new(
            "kafka.topic_prefix",
            "must be 1 to 200 characters of a-z, A-Z, 0-9, '.', '_' or '-' (Kafka topic name rules)",
        ));
    }
    if k.security_protocol.uses_sasl() {
        if k.sasl_mechanism.is_none() {
            return Err(ConfigError::new(
                "kafka.sasl_mechanism",
                "required when security_protocol is sasl_plaintext or sasl_ssl (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
            ));
        }
        if k.sasl_username.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::new(
                "kafka.sasl_username",
                "required when SASL is used",
            ));
        }
        if k.sasl_password.is_none() {
            return Err(ConfigError::new(
                "kafka.sasl_password",
                "required when SASL is used (MEMBERSYNC__KAFKA__SASL_PASSWORD or kafka.sasl_password_file)",
            ));
        }
    }
    at_least_one("kafka.message_timeout_ms", k.message_timeout_ms as i64)?;
    at_least_one("kafka.request_timeout_ms", k.request_timeout_ms as i64)?;
    at_least_one("kafka.topic_partitions", k.topic_partitions as i64)?;
    at_least_one(
        "kafka.topic_replication_factor",
        k.topic_replication_factor as i64,
    )?;
    super::librdkafka::validate(&k.librdkafka)?;

    validate_ingest(&c.ingest)?;
    super::api::validate(&c.api)?;
    validate_merge(c)?;
    super::bridge::validate(&c.bridge)?;

    let cdc = &c.cdc;
    if !is_pg_name(&cdc.slot) || cdc.slot.chars().any(|ch| ch.is_ascii_uppercase()) {
        return Err(ConfigError::new(
            "cdc.slot",
            "must be 1 to 63 characters of lower-case letters, digits and '_' (Postgres slot name rules)",
        ));
    }
    if cdc.slot == "supabase_realtime" || cdc.publication == "supabase_realtime" {
        return Err(ConfigError::new(
            if cdc.slot == "supabase_realtime" {
                "cdc.slot"
            } else {
                "cdc.publication"
            },
            "must not be `supabase_realtime`: that belongs to Supabase Realtime; membersync uses its own",
        ));
    }
    if !is_pg_name(&cdc.publication) {
        return Err(ConfigError::new(
            "cdc.publication",
            "must be 1 to 63 characters of letters, digits and '_'",
        ));
    }
    if cdc.tables.is_empty() {
        return Err(ConfigError::new(
            "cdc.tables",
            "must name at least one table (`schema.table`)",
        ));
    }
    for table in &cdc.tables {
        match table.split_once('.') {
            Some((schema, name)) if is_pg_name(schema) && is_pg_name(name) => {}
            _ => {
                return Err(ConfigError::new(
                    "cdc.tables",
                    format!("`{table}` is not of the form `schema.table` (letters, digits, '_')"),
                ));
            }
        }
    }

    for (table, columns) in &cdc.key_columns {
        if !cdc.tables.contains(table) {
            return Err(ConfigError::new(
                format!("cdc.key_columns.{table}"),
                "names a table that is not in cdc.tables",
            ));
        }
        if columns.is_empty() || columns.iter().any(|c| !is_pg_name(c)) {
            return Err(ConfigError::new(
                format!("cdc.key_columns.{table}"),
                "must list one or more column names",
            ));
        }
    }
    if let Err(e) = crate::cdc::identity::skipped_operations(&cdc.skipped_operations) {
        return Err(ConfigError::new("cdc.skipped_operations", e));
    }
    at_least_one("cdc.snapshot_fetch_rows", cdc.snapshot_fetch_rows as i64)?;
    at_least_one(
        "cdc.incremental_chunk_rows",
        cdc.incremental_chunk_rows as i64,
    )?;
    at_least_one(
        "cdc.incremental_poll_interval_ms",
        cdc.incremental_poll_interval_ms as i64,
    )?;
    at_least_one("cdc.status_interval_ms", cdc.status_interval_ms as i64)?;
    at_least_one(
        "cdc.slot_poll_interval_secs",
        cdc.slot_poll_interval_secs as i64,
    )?;
    at_least_one(
        "cdc.reconnect_max_backoff_secs",
        cdc.reconnect_max_backoff_secs as i64,
    )?;

    let t = &c.telemetry;
    if tracing_subscriber::EnvFilter::try_new(&t.log_level).is_err() {
        return Err(ConfigError::new(
            "telemetry.log_level",
            format!(
                "`{}` is not a valid filter (e.g. `info` or `membersync=debug,rdkafka=warn`)",
                t.log_level
            ),
        ));
    }
    if let Some(dsn) = &t.sentry_dsn {
        use secrecy::ExposeSecret;
        if dsn.expose_secret().parse::<sentry::types::Dsn>().is_err() {
            // The value itself stays out of the message: a DSN carries the project's key.
            return Err(ConfigError::new(
                "telemetry.sentry_dsn",
                "is not a valid Sentry DSN",
            ));
        }
    }
    if !(0.0..=1.0).contains(&t.sentry_traces_sample_rate) {
        return Err(ConfigError::new(
            "telemetry.sentry_traces_sample_rate",
            "must be between 0.0 and 1.0",
        ));
    }
    at_least_one(
        "telemetry.liveness_timeout_secs",
        t.liveness_timeout_secs as i64,
    )?;
    at_least_one(
        "shutdown.drain_timeout_secs",
        c.shutdown.drain_timeout_secs as i64,
    )?;
    Ok(())
}

/// Kafka's default `message.max.bytes` is 1,000,000; the envelope adds headers and provenance.
const MAX_WEBHOOK_BODY: usize = 900_000;

fn validate_ingest(i: &crate::config::IngestConfig) -> Result<(), ConfigError> {
    if i.body_limit_bytes == 0 || i.body_limit_bytes > MAX_WEBHOOK_BODY {
        return Err(ConfigError::new(
            "ingest.body_limit_bytes",
            format!(
                "must be between 1 and {MAX_WEBHOOK_BODY}: a larger body would not fit Kafka's default \
                 1 MB record size (the sender would be told to retry forever)"
            ),
        ));
    }
    at_least_one("ingest.request_timeout_ms", i.request_timeout_ms as i64)?;
    if i.kafka_ack_timeout_ms == 0 || i.kafka_ack_timeout_ms >= i.request_timeout_ms {
        return Err(ConfigError::new(
            "ingest.kafka_ack_timeout_ms",
            "must be at least 1 and below ingest.request_timeout_ms",
        ));
    }
    at_least_one("ingest.concurrency_limit", i.concurrency_limit as i64)?;
    // What unauthenticated senders can make the server hold: one body per in-flight slot.
    let bodies = i.concurrency_limit.saturating_mul(i.body_limit_bytes);
    if bodies > i.memory_budget_bytes {
        return Err(ConfigError::new(
            "ingest.concurrency_limit",
            format!(
                "times ingest.body_limit_bytes is {bodies} bytes, above ingest.memory_budget_bytes \
                 ({}): lower one of them or raise the budget (and the memory limit with it)",
                i.memory_budget_bytes
            ),
        ));
    }
    if i.body_read_timeout_ms == 0 || i.body_read_timeout_ms > i.request_timeout_ms {
        return Err(ConfigError::new(
            "ingest.body_read_timeout_ms",
            "must be at least 1 and at most ingest.request_timeout_ms",
        ));
    }
    at_least_one(
        "ingest.header_read_timeout_ms",
        i.header_read_timeout_ms as i64,
    )?;
    at_least_one("ingest.max_connections", i.max_connections as i64)?;
    for (key, secrets) in [
        (
            "ingest.memberstack_webhook_secrets",
            &i.memberstack_webhook_secrets,
        ),
        ("ingest.stripe_webhook_secrets", &i.stripe_webhook_secrets),
    ] {
        let Some(secrets) = secrets else { continue };
        let parts = crate::config::split_secrets(secrets);
        if parts.is_empty() {
            return Err(ConfigError::new(key, "is empty"));
        }
        let usable = if key.contains("memberstack") {
            crate::ingest::verify::svix::SvixVerifier::new(&parts).map(|_| ())
        } else {
            crate::ingest::verify::stripe::StripeVerifier::new(&parts).map(|_| ())
        };
        // KeyError's text never contains the secret.
        usable.map_err(|e| ConfigError::new(key, e.to_string()))?;
    }
    Ok(())
}

/// Columns of `public.members` a field may map to; everything else is the daemon's own.
const MAPPABLE_COLUMNS: [&str; 6] = [
    "email",
    "subscription_status",
    "plan_id",
    "custom_fields",
    "project_data",
    "usage_stats",
];

fn validate_merge(c: &Config) -> Result<(), ConfigError> {
    let m = &c.merge;
    non_empty("merge.group_id", &m.group_id)?;
    at_least_one("merge.workers", m.workers as i64)?;
    at_least_one("merge.max_in_flight", m.max_in_flight as i64)?;
    at_least_one("merge.max_attempts", m.max_attempts as i64)?;
    at_least_one("merge.commit_interval_ms", m.commit_interval_ms as i64)?;
    at_least_one("merge.push_lanes", m.push_lanes as i64)?;
    at_least_one("merge.auth_lanes", m.auth_lanes as i64)?;
    at_least_one("merge.claim_lease_secs", m.claim_lease_secs as i64)?;
    at_least_one("merge.poll_interval_ms", m.poll_interval_ms as i64)?;
    if m.session_timeout_ms < 6_000 {
        // librdkafka's heartbeat (3 s) must fit in it, and brokers refuse less than their
        // group.min.session.timeout.ms (Kafka: 6 s).
        return Err(ConfigError::new(
            "merge.session_timeout_ms",
            "must be at least 6000",
        ));
    }
    if m.backoff_max_ms < m.backoff_base_ms {
        return Err(ConfigError::new(
            "merge.backoff_max_ms",
            "must be at least merge.backoff_base_ms",
        ));
    }
    let mut names = std::collections::HashSet::new();
    let mut columns = std::collections::HashSet::new();
    for (i, f) in m.fields.iter().enumerate() {
        let key = format!("merge.fields[{i}]");
        if !names.insert(f.name.as_str()) {
            return Err(ConfigError::new(
                format!("{key}.name"),
                format!("field {:?} is mapped twice", f.name),
            ));
        }
        if !MAPPABLE_COLUMNS.contains(&f.supabase.as_str()) {
            return Err(ConfigError::new(
                format!("{key}.supabase"),
                format!("must be one of {}", MAPPABLE_COLUMNS.join(", ")),
            ));
        }
        if !columns.insert(f.supabase.as_str()) {
            return Err(ConfigError::new(
                format!("{key}.supabase"),
                format!("column {:?} is mapped twice", f.supabase),
            ));
        }
        if let Err(why) = crate::merge::MemberstackPath::parse(&f.memberstack) {
            return Err(ConfigError::new(format!("{key}.memberstack"), why));
        }
    }
    for (key, v) in [
        (
            "memberstack.requests_per_second",
            c.memberstack.requests_per_second as i64,
        ),
        (
            "memberstack.request_timeout_ms",
            c.memberstack.request_timeout_ms as i64,
        ),
        (
            "memberstack.max_attempts",
            c.memberstack.max_attempts as i64,
        ),
        (
            "supabase.request_timeout_ms",
            c.supabase.request_timeout_ms as i64,
        ),
        ("supabase.max_attempts", c.supabase.max_attempts as i64),
        ("posthog.batch_size", c.posthog.batch_size as i64),
        (
            "posthog.flush_interval_ms",
            c.posthog.flush_interval_ms as i64,
        ),
        ("posthog.queue_capacity", c.posthog.queue_capacity as i64),
        ("posthog.max_attempts", c.posthog.max_attempts as i64),
    ] {
        at_least_one(key, v)?;
    }
    // The URLs that carry an API key: https, or http on loopback (the simulators).
    super::transport::validate_api_url("memberstack.api_url", &c.memberstack.api_url)?;
    if let Some(url) = &c.supabase.url {
        super::transport::validate_api_url("supabase.url", url)?;
    }
    let posthog = c.posthog.host.as_str();
    if !(posthog.starts_with("http://") || posthog.starts_with("https://")) || posthog.len() < 8 {
        return Err(ConfigError::new(
            "posthog.host",
            "must be an http:// or https:// URL",
        ));
    }
    if c.supabase.url.is_some() != c.supabase.service_role_key.is_some() {
        return Err(ConfigError::new(
            "supabase.service_role_key",
            "supabase.url and supabase.service_role_key are set together or not at all",
        ));
    }
    Ok(())
}

fn at_least_one(key: &str, value: i64) -> Result<(), ConfigError> {
    if value < 1 {
        Err(ConfigError::new(key, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::new(key, "must not be empty"))
    } else {
        Ok(())
    }
}

fn is_pg_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && !s.starts_with(|ch: char| ch.is_ascii_digit())
}

fn validate_brokers(brokers: &str) -> Result<(), ConfigError> {
    let bad = |what: String| ConfigError::new("kafka.brokers", what);
    if brokers.trim().is_empty() {
        return Err(bad("must list at least one `host:port`".into()));
    }
    for entry in brokers.split(',').map(str::trim) {
        let Some((host, port)) = entry.rsplit_once(':') else {
            return Err(bad(format!("`{entry}` is not `host:port`")));
        };
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad(format!(
                "`{entry}` is not `host:port` with a port from 1 to 65535"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::io::Write;

    const NO_ENV: &str = "MEMBERSYNC_UNIT_TEST_UNSET_PREFIX__";

    fn load_toml(toml: &str) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        load_from(Some(file.path()), NO_ENV)
    }

    #[test]
    fn defaults_are_valid() {
        let c = load_from(None, NO_ENV).unwrap();
        assert_eq!(c.database.port, 5432);
        assert_eq!(c.cdc.tables, vec!["public.members".to_string()]);
    }

    #[test]
    fn each_invalid_value_names_its_key() {
        let cases = [
            (
                "[database]\nport = \"abc\"",
                "database.port",
                "expected u16",
            ),
            (
                "[database]\nport = 0",
                "database.port",
                "between 1 and 65535",
            ),
            ("[database]\nhots = \"x\"", "database.hots", "unknown key"),
            ("[nope]\na = 1", "nope", "unknown key"),
            (
                "[kafka]\nbrokers = \"localhost\"",
                "kafka.brokers",
                "not `host:port`",
            ),
            ("[kafka]\nbrokers = \"\"", "kafka.brokers", "at least one"),
            (
                "[kafka]\ntopic_prefix = \"a b\"",
                "kafka.topic_prefix",
                "Kafka topic name rules",
            ),
            (
                "[kafka]\nsecurity_protocol = \"sasl_ssl\"",
                "kafka.sasl_mechanism",
                "required",
            ),
            (
                "[kafka]\nsecurity_protocol = \"tls\"",
                "kafka.security_protocol",
                "unknown value `tls`",
            ),
            (
                "[database]\nsslmode = \"allow\"",
                "database.sslmode",
                "unknown value `allow`",
            ),
            (
                "[database]\nsslmode = \"prefer\"\nssl_root_cert = \"/nonexistent/ca.pem\"",
                "database.ssl_root_cert",
                "only used by sslmode verify-ca or verify-full",
            ),
            (
                "[database]\nssl_root_cert = \"/nonexistent/ca.pem\"",
                "database.ssl_root_cert",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                "[memberstack]\napi_url = \"http://admin.memberstack.com\"",
                "memberstack.api_url",
                "plain http",
            ),
            (
                "[supabase]\nurl = \"http://abc.supabase.co\"",
                "supabase.url",
                "plain http",
            ),
            (
                "[database]\nsslmode = \"verify-full\"\nssl_root_cert = \"/nonexistent/ca.pem\"",
                "database.ssl_root_cert",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                "[kafka]\ntopic_partitions = 0",
                "kafka.topic_partitions",
                "at least 1",
            ),
            ("[cdc]\nslot = \"Bad-Slot\"", "cdc.slot", "slot name rules"),
            (
                "[cdc]\nslot = \"supabase_realtime\"",
                "cdc.slot",
                "supabase_realtime",
            ),
            ("[cdc]\ntables = []", "cdc.tables", "at least one"),
            (
                "[cdc]\ntables = [\"members\"]",
                "cdc.tables",
                "schema.table",
            ),
            (
                "[telemetry]\nlog_format = \"xml\"",
                "telemetry.log_format",
                "unknown value `xml`",
            ),
            (
                "[telemetry]\nlog_level = \"info,=[\"",
                "telemetry.log_level",
                "not a valid filter",
            ),
            (
                "[telemetry]\nmetrics_addr = \"nowhere\"",
                "telemetry.metrics_addr",
                "invalid socket address",
            ),
            (
                "[telemetry]\nsentry_traces_sample_rate = 2.0",
                "telemetry.sentry_traces_sample_rate",
                "between",
            ),
            (
                "[shutdown]\ndrain_timeout_secs = 0",
                "shutdown.drain_timeout_secs",
                "at least 1",
            ),
            ("database = 5", "database", "expected"),
            (
                "[ingest]\nbody_limit_bytes = 2000000",
                "ingest.body_limit_bytes",
                "between 1 and 900000",
            ),
            (
                "[ingest]\nkafka_ack_timeout_ms = 20000",
                "ingest.kafka_ack_timeout_ms",
                "below ingest.request_timeout_ms",
            ),
            (
                "[ingest]\nconcurrency_limit = 0",
                "ingest.concurrency_limit",
                "at least 1",
            ),
            (
                "[ingest]\nconcurrency_limit = 1024",
                "ingest.concurrency_limit",
                "above ingest.memory_budget_bytes",
            ),
            (
                "[ingest]\nbody_read_timeout_ms = 20000",
                "ingest.body_read_timeout_ms",
                "at most ingest.request_timeout_ms",
            ),
            (
                "[ingest]\nmax_connections = 0",
                "ingest.max_connections",
                "at least 1",
            ),
            (
                "[cdc.key_columns]\n\"public.other\" = [\"id\"]",
                "cdc.key_columns.public.other",
                "not in cdc.tables",
            ),
            (
                "[cdc]\nsnapshot = \"sometimes\"",
                "cdc.snapshot",
                "unknown value `sometimes`",
            ),
            (
                "[merge]\nsession_timeout_ms = 3000",
                "merge.session_timeout_ms",
                "at least 6000",
            ),
        ];
        for (toml, key, problem) in cases {
            let err = load_toml(toml).expect_err(toml);
            assert_eq!(err.key, key, "{toml} → {err}");
            assert!(err.problem.contains(problem), "{toml} → {err}");
        }
    }

    #[test]
    fn sslmode_defaults_to_verify_full_off_loopback_and_an_explicit_one_wins() {
        use crate::config::PgSslMode;
        let mode = |toml: &str| load_toml(toml).unwrap().database.sslmode;
        assert_eq!(mode(""), PgSslMode::Prefer, "127.0.0.1 by default");
        assert_eq!(mode("[database]\nhost = \"localhost\""), PgSslMode::Prefer);
        assert_eq!(
            mode("[database]\nhost = \"db.abc.supabase.co\""),
            PgSslMode::VerifyFull
        );
        assert_eq!(
            mode("[database]\nhost = \"10.1.2.3\""),
            PgSslMode::VerifyFull
        );
        assert_eq!(
            mode("[database]\nhost = \"db.abc.supabase.co\"\nsslmode = \"require\""),
            PgSslMode::Require
        );
        assert_eq!(
            mode("[database]\nhost = \"127.0.0.1\"\nsslmode = \"verify-ca\""),
            PgSslMode::VerifyCa
        );
    }

    #[test]
    fn secrets_in_the_file_are_refused_without_echoing_them() {
        for (toml, key) in [
            (
                "[database]\npassword = \"hunter2-secret\"",
                "database.password",
            ),
            (
                "[database]\nadmin_password = \"hunter2-secret\"",
                "database.admin_password",
            ),
            (
                "[kafka]\nsasl_password = \"hunter2-secret\"",
                "kafka.sasl_password",
            ),
            (
                "[telemetry]\nsentry_dsn = \"https://hunter2-secret@o1.ingest.sentry.io/1\"",
                "telemetry.sentry_dsn",
            ),
            (
                "[ingest]\nmemberstack_webhook_secrets = \"whsec_hunter2-secret\"",
                "ingest.memberstack_webhook_secrets",
            ),
            (
                "[ingest]\nstripe_webhook_secrets = \"whsec_hunter2-secret\"",
                "ingest.stripe_webhook_secrets",
            ),
        ] {
            let err = load_toml(toml).unwrap_err();
            assert_eq!(err.key, key);
            assert!(
                err.problem
                    .contains("may not be written in the config file"),
                "{err}"
            );
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn secret_files_are_read_and_redacted_in_debug() {
        let mut secret = tempfile::NamedTempFile::new().unwrap();
        secret.write_all(b"s3cr3t-value\n").unwrap();
        let toml = format!("[database]\npassword_file = {:?}", secret.path());
        let c = load_toml(&toml).unwrap();
        assert_eq!(
            c.database.password.as_ref().unwrap().expose_secret(),
            "s3cr3t-value"
        );
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn missing_or_empty_secret_file_is_precise() {
        let err = load_toml("[database]\npassword_file = \"/nonexistent/pw\"").unwrap_err();
        assert_eq!(err.key, "database.password_file");
        assert!(err.problem.contains("cannot read /nonexistent/pw"), "{err}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err =
            load_toml(&format!("[kafka]\nsasl_password_file = {:?}", empty.path())).unwrap_err();
        assert_eq!(err.key, "kafka.sasl_password_file");
        assert!(err.problem.contains("is empty"), "{err}");
    }

    #[test]
    fn missing_file_and_bad_toml_are_reported() {
        let err = load_from(Some(Path::new("/nonexistent/membersync.toml")), NO_ENV).unwrap_err();
        assert!(err.problem.contains("does not exist"), "{err}");
        let err = load_toml("[database\nport = 1").unwrap_err();
        assert!(!err.problem.is_empty());
    }
}
