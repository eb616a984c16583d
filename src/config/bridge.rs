//! `[bridge]`: the role that forwards merge's outcomes (`<prefix>.sync`) to Make.com custom
//! webhooks. Documented in `docs/configuration.md` and `docs/bridge.md`.
//!
//! Routes are a map (name → route) rather than a list so that each one can be set from the
//! environment (`MEMBERSYNC__BRIDGE__ROUTES__<NAME>__URL`) and so that the name can label
//! metrics and logs: the URL itself is never shown, it carries the hook's token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::ConfigError;
use crate::merge::outcome::Status;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// The Kafka consumer group every bridge instance joins (not merge's).
    pub group_id: String,
    /// The topic consumed; unset means `<prefix>.sync`.
    pub topic: Option<String>,
    /// Members delivered at once (one member's outcomes are always delivered in order).
    pub workers: usize,
    /// Records fetched but not yet finished, at most (backpressure on the consumer).
    pub max_in_flight: usize,
    /// One HTTP request to Make.com, end to end.
    pub request_timeout_ms: u64,
    /// Attempts per outcome and URL (on 408, 429, 5xx, timeouts and connection errors)
    /// before the outcome goes to `<prefix>.bridge.dlq`.
    pub max_attempts: u32,
    /// Backoff before the 2nd, 3rd, … attempt: `backoff_base_ms × 2^(attempt-1)`, capped at
    /// `backoff_max_ms`, with jitter; a `Retry-After` is waited at least.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A `Retry-After` longer than this is not slept through (the worker would hold back its
    /// other members): the outcome is dead-lettered instead.
    pub max_retry_after_secs: u64,
    /// How often finished offsets are committed to Kafka.
    pub commit_interval_ms: u64,
    /// librdkafka `fetch.wait.max.ms` of the consumer.
    pub fetch_wait_max_ms: u64,
    /// librdkafka `session.timeout.ms`: how long the group waits for a crashed instance
    /// before its partitions (and their uncommitted outcomes) go to another one.
    pub session_timeout_ms: u64,
    /// Where outcomes go. Empty: the bridge has nothing to do, and `membersync run` does not
    /// start it.
    pub routes: BTreeMap<String, RouteConfig>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            group_id: "membersync-bridge".into(),
            topic: None,
            workers: 8,
            max_in_flight: 1_000,
            request_timeout_ms: 10_000,
            max_attempts: 5,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            max_retry_after_secs: 300,
            commit_interval_ms: 1_000,
            fetch_wait_max_ms: 100,
            session_timeout_ms: 45_000,
            routes: BTreeMap::new(),
        }
    }
}

impl BridgeConfig {
    /// At least one route is configured: the bridge role has work to do.
    pub fn enabled(&self) -> bool {
        !self.routes.is_empty()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// One route: which outcomes, to which Make.com webhook URL(s).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Secret-like (the URL carries the hook's token): one or more webhook URLs, separated by
    /// whitespace or commas. From the file, `MEMBERSYNC__BRIDGE__ROUTES__<NAME>__URL` or
    /// `url_file`; never logged (logs and dead letters name the host only).
    pub url: Option<SecretString>,
    pub url_file: Option<PathBuf>,
    /// Outcome statuses routed here (`applied`, `unchanged`, `duplicate`, `skipped`,
    /// `failed`); empty = any.
    pub statuses: Vec<Status>,
    /// Event types routed here (`member.updated`; a trailing `*` matches a prefix:
    /// `member.plan.*`, `customer.subscription.*`; CDC ops are `c`, `u`, `d`, `r`, `t`);
    /// empty = any.
    pub event_types: Vec<String>,
    /// Sides routed here (`memberstack`, `stripe`, `supabase`); empty = any.
    pub sources: Vec<String>,
    /// Catch-all: this route receives exactly the outcomes no other (non-fallback) route
    /// matched. A fallback route has no filters.
    pub fallback: bool,
}

impl RouteConfig {
    /// The URLs, parsed. Only call after validation.
    pub fn urls(&self) -> Vec<reqwest::Url> {
        self.url
            .as_ref()
            .map(split_urls)
            .unwrap_or_default()
            .iter()
            .filter_map(|u| reqwest::Url::parse(u).ok())
            .collect()
    }
}

fn split_urls(secret: &SecretString) -> Vec<String> {
    secret
        .expose_secret()
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

const SOURCES: [&str; 3] = ["memberstack", "stripe", "supabase"];

pub(super) fn validate(b: &BridgeConfig) -> Result<(), ConfigError> {
    let positive = [
        ("bridge.workers", b.workers as u64),
        ("bridge.max_in_flight", b.max_in_flight as u64),
        ("bridge.request_timeout_ms", b.request_timeout_ms),
        ("bridge.max_attempts", u64::from(b.max_attempts)),
        ("bridge.commit_interval_ms", b.commit_interval_ms),
    ];
    if b.session_timeout_ms < 6_000 {
        // librdkafka's heartbeat (3 s) must fit in it, and brokers refuse less than their
        // group.min.session.timeout.ms (Kafka: 6 s).
        return Err(ConfigError::new(
            "bridge.session_timeout_ms",
            "must be at least 6000",
        ));
    }
    for (key, v) in positive {
        if v < 1 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
    }
    if b.group_id.trim().is_empty() {
        return Err(ConfigError::new("bridge.group_id", "must not be empty"));
    }
    if b.backoff_max_ms < b.backoff_base_ms {
        return Err(ConfigError::new(
            "bridge.backoff_max_ms",
            "must be at least bridge.backoff_base_ms",
        ));
    }
    if b.topic.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(ConfigError::new("bridge.topic", "must not be empty"));
    }
    for (name, route) in &b.routes {
        let key = format!("bridge.routes.{name}");
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            return Err(ConfigError::new(
                key,
                "a route name is 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-'",
            ));
        }
        let Some(url) = &route.url else {
            return Err(ConfigError::new(
                format!("{key}.url"),
                format!(
                    "is required (in the file, MEMBERSYNC__BRIDGE__ROUTES__{}__URL or `url_file`)",
                    name.to_uppercase()
                ),
            ));
        };
        let urls = split_urls(url);
        if urls.is_empty() {
            return Err(ConfigError::new(format!("{key}.url"), "is empty"));
        }
        for (i, u) in urls.iter().enumerate() {
            // The message never repeats the URL: it holds the hook's token.
            let ok = reqwest::Url::parse(u)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return Err(ConfigError::new(
                    format!("{key}.url"),
                    format!("URL number {} is not an http:// or https:// URL", i + 1),
                ));
            }
        }
        for source in &route.sources {
            if !SOURCES.contains(&source.as_str()) {
                return Err(ConfigError::new(
                    format!("{key}.sources"),
                    format!("`{source}` is not one of {}", SOURCES.join(", ")),
                ));
            }
        }
        if route.event_types.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::new(
                format!("{key}.event_types"),
                "an event type must not be empty",
            ));
        }
        let filtered = !(route.statuses.is_empty()
            && route.event_types.is_empty()
            && route.sources.is_empty());
        if route.fallback && filtered {
            return Err(ConfigError::new(
                format!("{key}.fallback"),
                "a fallback route takes what no other route matched; it has no statuses, event_types or sources",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use secrecy::ExposeSecret;

    use super::super::{Config, ConfigError, load_from};
    use crate::merge::outcome::Status;

    fn load(toml: &str, prefix: &str) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        load_from(Some(file.path()), prefix)
    }

    const NO_ENV: &str = "MEMBERSYNC_UNIT_TEST_BRIDGE_UNSET__";

    #[test]
    fn routes_parse_from_the_file() {
        let c = load(
            r#"
[bridge]
group_id = "g"
max_attempts = 3

[bridge.routes.plans]
url = "https://hook.eu1.make.com/aaa https://hook.us1.make.com/bbb"
statuses = ["applied", "failed"]
event_types = ["member.plan.*"]
sources = ["memberstack", "stripe"]

[bridge.routes.everything_else]
url = "https://hook.eu1.make.com/ccc"
fallback = true
"#,
            NO_ENV,
        )
        .unwrap();
        assert!(c.bridge.enabled());
        assert_eq!(c.bridge.max_attempts, 3);
        let plans = &c.bridge.routes["plans"];
        assert_eq!(plans.statuses, [Status::Applied, Status::Failed]);
        assert_eq!(plans.urls().len(), 2);
        assert!(c.bridge.routes["everything_else"].fallback);
        // Debug output (logs of the config, panics) never shows a URL.
        assert!(!format!("{c:?}").contains("aaa"));
        assert!(!crate::config::Config::default().bridge.enabled());
    }

    #[test]
    fn a_route_url_comes_from_a_file() {
        // (The environment form, MEMBERSYNC__BRIDGE__ROUTES__<NAME>__URL, is exercised end to
        // end in tests/it/bridge.rs: this crate forbids the unsafe `set_var`.)
        let mut url = tempfile::NamedTempFile::new().unwrap();
        url.write_all(b"https://hook.eu1.make.com/from-file\n")
            .unwrap();
        let c = load(
            &format!(
                "[bridge.routes.new_members]\nurl_file = {:?}\nstatuses = [\"applied\"]",
                url.path()
            ),
            NO_ENV,
        )
        .unwrap();
        let route = &c.bridge.routes["new_members"];
        assert_eq!(
            route.url.as_ref().unwrap().expose_secret(),
            "https://hook.eu1.make.com/from-file"
        );
        let err = load(
            &format!(
                "[bridge.routes.r]\nurl = \"https://h/x\"\nurl_file = {:?}",
                url.path()
            ),
            NO_ENV,
        )
        .unwrap_err();
        assert_eq!(err.key, "bridge.routes.r.url");
    }

    #[test]
    fn each_invalid_value_names_its_key_without_the_url() {
        let cases = [
            ("[bridge]\nworkers = 0", "bridge.workers", "at least 1"),
            (
                "[bridge]\nmax_attempts = 0",
                "bridge.max_attempts",
                "at least 1",
            ),
            (
                "[bridge]\nbackoff_base_ms = 10\nbackoff_max_ms = 1",
                "bridge.backoff_max_ms",
                "at least",
            ),
            (
                "[bridge.routes.r]\nstatuses = [\"applied\"]",
                "bridge.routes.r.url",
                "required",
            ),
            (
                "[bridge.routes.r]\nurl = \" , \"",
                "bridge.routes.r.url",
                "is empty",
            ),
            (
                "[bridge.routes.r]\nurl = \"ftp://hook.eu1.make.com/s3cr3t\"",
                "bridge.routes.r.url",
                "not an http",
            ),
            (
                "[bridge.routes.r]\nurl = \"hook.eu1.make.com/s3cr3t\"",
                "bridge.routes.r.url",
                "not an http",
            ),
            (
                "[bridge.routes.r]\nurl = \"https://h/s3cr3t\"\nstatuses = [\"done\"]",
                "bridge.routes.r.statuses.0",
                "unknown value `done`",
            ),
            (
                "[bridge.routes.r]\nurl = \"https://h/s3cr3t\"\nsources = [\"posthog\"]",
                "bridge.routes.r.sources",
                "not one of",
            ),
            (
                "[bridge.routes.r]\nurl = \"https://h/s3cr3t\"\nfallback = true\nstatuses = [\"failed\"]",
                "bridge.routes.r.fallback",
                "no statuses",
            ),
            (
                "[bridge.routes.\"bad name\"]\nurl = \"https://h/s3cr3t\"",
                "bridge.routes.bad name",
                "route name",
            ),
            (
                "[bridge.routes.r]\nurl = \"https://h/s3cr3t\"\nurls = []",
                "bridge.routes.r.urls",
                "unknown key",
            ),
        ];
        for (toml, key, problem) in cases {
            let err = load(toml, NO_ENV).expect_err(toml);
            assert_eq!(err.key, key, "{toml} → {err}");
            assert!(err.problem.contains(problem), "{toml} → {err}");
            assert!(!err.to_string().contains("s3cr3t"), "{toml} → {err}");
        }
    }
}
