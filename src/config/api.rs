//! `[api]`: the member and admin HTTP API served next to webhook ingest (`docs/api.md`).

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::ConfigError;

/// How member tokens (`Authorization: Bearer <Memberstack member JWT>`) are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiAuthMode {
    /// RS256 only, public keys from `jwks_url` (Memberstack 2.0).
    Jwks,
    /// HS256 only, with the shared secret `hs256_secret` (the sync rules' `MEMBERSTACK_SECRET`).
    Hs256,
}

impl ApiAuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwks => "jwks",
            Self::Hs256 => "hs256",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the member routes (`/v1/members/...`). Off (the default): they answer 404. On
    /// requires `audience`.
    pub enabled: bool,
    pub auth_mode: ApiAuthMode,
    /// JWKS with the RS256 keys member tokens are signed with (mode `jwks`).
    pub jwks_url: String,
    /// Allow a plain-`http://` JWKS URL that is not on loopback. Off by default: whoever can
    /// alter the key set in transit can mint tokens for any member.
    pub jwks_allow_http: bool,
    /// Unknown `kid`s refetch the key set at most this often (all misses share one fetch).
    pub jwks_min_refresh_secs: u64,
    /// A key set older than this is refreshed in the background on the next request.
    pub jwks_max_age_secs: u64,
    pub jwks_fetch_timeout_ms: u64,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (the Memberstack app id, `app_…`); required when `enabled`: Memberstack
    /// signs the member tokens of every app with the same keys, so without it a member of any
    /// other app would be let in.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Secret (mode `hs256`): only from `MEMBERSYNC__API__HS256_SECRET` or `hs256_secret_file`.
    pub hs256_secret: Option<SecretString>,
    pub hs256_secret_file: Option<PathBuf>,
    /// Secret: bearer token of the `/v1/admin/...` routes. Unset: those routes answer 404.
    pub admin_token: Option<SecretString>,
    pub admin_token_file: Option<PathBuf>,
    /// Whole-request budget of an API call (database, Memberstack, Kafka); then 503.
    pub request_timeout_ms: u64,
    /// One member may ask for a resync at most this often (protects the shared Memberstack
    /// rate limit); more answer 429.
    pub resync_min_interval_secs: u64,
}

/// Memberstack's JWKS is not confirmed (docs/external-services.md §3): the SDK 1.7.0 reads
/// `http://member-jwt.s3-website-us-east-1.amazonaws.com/` (plain HTTP), newer docs name this one.
pub const DEFAULT_JWKS_URL: &str = "https://auth.memberstack.com/jwks";
pub const DEFAULT_ISSUER: &str = "https://api.memberstack.com";

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            // Off until configured: the member routes are internet-facing, and safe only with
            // an audience (and a database role) of their own.
            enabled: false,
            auth_mode: ApiAuthMode::Jwks,
            jwks_url: DEFAULT_JWKS_URL.into(),
            jwks_allow_http: false,
            jwks_min_refresh_secs: 30,
            jwks_max_age_secs: 3_600,
            jwks_fetch_timeout_ms: 5_000,
            issuer: DEFAULT_ISSUER.into(),
            audience: None,
            leeway_secs: 30,
            hs256_secret: None,
            hs256_secret_file: None,
            admin_token: None,
            admin_token_file: None,
            request_timeout_ms: 10_000,
            resync_min_interval_secs: 10,
        }
    }
}

impl ApiConfig {
    pub fn jwks_min_refresh(&self) -> Duration {
        Duration::from_secs(self.jwks_min_refresh_secs)
    }
    pub fn jwks_max_age(&self) -> Duration {
        Duration::from_secs(self.jwks_max_age_secs)
    }
    pub fn jwks_fetch_timeout(&self) -> Duration {
        Duration::from_millis(self.jwks_fetch_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn resync_min_interval(&self) -> Duration {
        Duration::from_secs(self.resync_min_interval_secs)
    }
}

/// RFC 7518 §3.2: an HS256 key "of the same size as the hash output ... or larger MUST be used".
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Admin tokens are compared in constant time, but a short one can simply be guessed.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 24;

pub(super) fn validate(a: &ApiConfig) -> Result<(), ConfigError> {
    let at_least_one = |key: &str, v: u64| {
        if v == 0 {
            Err(ConfigError::new(key, "must be at least 1"))
        } else {
            Ok(())
        }
    };
    at_least_one("api.jwks_min_refresh_secs", a.jwks_min_refresh_secs)?;
    at_least_one("api.jwks_max_age_secs", a.jwks_max_age_secs)?;
    at_least_one("api.jwks_fetch_timeout_ms", a.jwks_fetch_timeout_ms)?;
    at_least_one("api.request_timeout_ms", a.request_timeout_ms)?;
    if a.leeway_secs > 300 {
        return Err(ConfigError::new(
            "api.leeway_secs",
            "must be at most 300 (a clock skew tolerance, not a session extension)",
        ));
    }
    if a.issuer.trim().is_empty() {
        return Err(ConfigError::new("api.issuer", "must not be empty"));
    }
    if a.audience.as_deref().is_some_and(|s| s.trim().is_empty()) {
        return Err(ConfigError::new("api.audience", "must not be empty"));
    }
    if let Some(token) = &a.admin_token
        && token.expose_secret().trim().len() < MIN_ADMIN_TOKEN_BYTES
    {
        return Err(ConfigError::new(
            "api.admin_token",
            format!(
                "must be at least {MIN_ADMIN_TOKEN_BYTES} characters (e.g. `openssl rand -hex 32`)"
            ),
        ));
    }
    if !a.enabled {
        return Ok(());
    }
    if a.audience.is_none() {
        return Err(ConfigError::new(
            "api.audience",
            "required when api.enabled = true: set it to your Memberstack app id (app_…); without \
             it a member token of any Memberstack app would be accepted",
        ));
    }
    match a.auth_mode {
        ApiAuthMode::Jwks => validate_jwks_url(a),
        ApiAuthMode::Hs256 => match &a.hs256_secret {
            None => Err(ConfigError::new(
                "api.hs256_secret",
                "required when api.auth_mode = \"hs256\" (MEMBERSYNC__API__HS256_SECRET or api.hs256_secret_file)",
            )),
            Some(s) if s.expose_secret().len() < MIN_HS256_SECRET_BYTES => Err(ConfigError::new(
                "api.hs256_secret",
                format!("must be at least {MIN_HS256_SECRET_BYTES} bytes (RFC 7518 §3.2)"),
            )),
            Some(_) => Ok(()),
        },
    }
}

fn validate_jwks_url(a: &ApiConfig) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(&a.jwks_url)
        .map_err(|e| ConfigError::new("api.jwks_url", format!("is not a URL: {e}")))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback || a.jwks_allow_http => Ok(()),
        "http" => Err(ConfigError::new(
            "api.jwks_url",
            "is plain http: anyone on the path could swap the keys and mint member tokens; use https, \
             or set api.jwks_allow_http = true if you accept that",
        )),
        other => Err(ConfigError::new(
            "api.jwks_url",
            format!("scheme `{other}` is not http(s)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API switched on with an audience, then `f`.
    fn with(f: impl FnOnce(&mut ApiConfig)) -> Result<(), ConfigError> {
        let mut c = ApiConfig {
            enabled: true,
            audience: Some("app_test".into()),
            ..ApiConfig::default()
        };
        f(&mut c);
        validate(&c)
    }

    #[test]
    fn the_defaults_are_valid_and_leave_the_api_off() {
        assert!(!ApiConfig::default().enabled);
        assert_eq!(validate(&ApiConfig::default()), Ok(()));
        assert_eq!(with(|_| {}), Ok(()));
    }

    #[test]
    fn the_api_on_requires_an_audience_in_either_mode() {
        let e = with(|c| c.audience = None).unwrap_err();
        assert_eq!(e.key, "api.audience");
        assert!(e.problem.contains("required when api.enabled"), "{e}");
        let e = with(|c| {
            c.audience = None;
            c.auth_mode = ApiAuthMode::Hs256;
            c.hs256_secret = Some(SecretString::from("0123456789abcdef0123456789abcdef"));
        })
        .unwrap_err();
        assert_eq!(e.key, "api.audience");
        // Off, no audience is needed.
        assert_eq!(
            with(|c| {
                c.enabled = false;
                c.audience = None;
            }),
            Ok(())
        );
    }

    #[test]
    fn plain_http_jwks_is_refused_off_loopback_unless_allowed() {
        let http = |url: &'static str, allow: bool| {
            with(move |c| {
                c.jwks_url = url.into();
                c.jwks_allow_http = allow;
            })
        };
        assert_eq!(
            http("http://member-jwt.example.com/", false)
                .unwrap_err()
                .key,
            "api.jwks_url"
        );
        assert_eq!(http("http://member-jwt.example.com/", true), Ok(()));
        assert_eq!(http("http://127.0.0.1:9/jwks", false), Ok(()));
        assert_eq!(http("http://[::1]:9/jwks", false), Ok(()));
        assert_eq!(http("http://localhost/jwks", false), Ok(()));
        assert!(http("ftp://example.com/jwks", true).is_err());
        assert!(http("not a url", true).is_err());
    }

    #[test]
    fn hs256_needs_a_long_enough_secret() {
        let hs = |secret: Option<&'static str>| {
            with(move |c| {
                c.auth_mode = ApiAuthMode::Hs256;
                c.hs256_secret = secret.map(SecretString::from);
            })
        };
        assert_eq!(hs(None).unwrap_err().key, "api.hs256_secret");
        let short = hs(Some("too-short")).unwrap_err();
        assert!(
            !short.problem.contains("too-short"),
            "the secret is not echoed"
        );
        assert_eq!(hs(Some("0123456789abcdef0123456789abcdef")), Ok(()));
    }

    #[test]
    fn admin_token_and_audience_must_be_usable() {
        let e = with(|c| c.admin_token = Some(SecretString::from("short"))).unwrap_err();
        assert_eq!(e.key, "api.admin_token");
        assert!(!e.problem.contains("short"));
        assert_eq!(
            with(|c| c.audience = Some(" ".into())).unwrap_err().key,
            "api.audience"
        );
        assert_eq!(
            with(|c| c.leeway_secs = 3600).unwrap_err().key,
            "api.leeway_secs"
        );
        assert_eq!(
            with(|c| c.jwks_min_refresh_secs = 0).unwrap_err().key,
            "api.jwks_min_refresh_secs"
        );
    }
}
