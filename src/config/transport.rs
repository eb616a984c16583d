//! Transport rules for the hosts and URLs the configuration names: credentials travel
//! encrypted and authenticated except to this machine. Plain `http://` and unverified Postgres
//! TLS are for loopback (development, simulators); anything else gets `https://` and
//! `verify-full` unless the operator says otherwise (Postgres) or not at all (the API URLs that
//! carry keys). And an API key never follows a redirect to another origin.

use super::{ConfigError, PgSslMode};

/// `localhost`, a loopback address (`127.0.0.0/8`, `::1`), or a Unix socket directory (a host
/// that starts with `/`, as in libpq).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    host.eq_ignore_ascii_case("localhost")
        || host.starts_with('/')
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `database.sslmode` when the operator did not set it: `verify-full` for a remote host
/// (`prefer` can be downgraded to plaintext by anyone on the path, and `require` accepts any
/// certificate), libpq's `prefer` on loopback.
pub fn default_sslmode(host: &str) -> PgSslMode {
    if is_loopback_host(host) {
        PgSslMode::Prefer
    } else {
        PgSslMode::VerifyFull
    }
}

/// An API base URL that carries a key (Memberstack's `X-API-KEY`, Supabase's service-role
/// key): `https://`, or `http://` on loopback only.
pub(super) fn validate_api_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url.trim())
        .map_err(|e| ConfigError::new(key, format!("is not a URL: {e}")))?;
    let loopback = parsed.host_str().is_some_and(is_loopback_host);
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(ConfigError::new(
            key,
            "is plain http: the API key would cross the network in clear text; use https \
             (http:// is accepted on loopback only)",
        )),
        other => Err(ConfigError::new(
            key,
            format!("must be an https:// URL, not {other}://"),
        )),
    }
}

/// Most redirects to follow.
const MAX_REDIRECTS: usize = 5;

/// The redirect policy of the clients that send an API key in a header: reqwest strips
/// `Authorization` and cookies on a redirect to another host, but not `X-API-KEY` or `apikey`.
/// A redirect is followed only to the same origin (scheme, host and port); any other stops,
/// and the 3xx is the answer (a misconfigured URL, reported as such).
pub fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if !same_origin {
            attempt.stop()
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "/var/run/postgresql",
        ] {
            assert!(is_loopback_host(host), "{host}");
            assert_eq!(default_sslmode(host), PgSslMode::Prefer, "{host}");
        }
        for host in [
            "db.abcdefgh.supabase.co",
            "10.0.0.5",
            "192.168.1.1",
            "::ffff:10.0.0.1",
            "localhost.example.com",
            "postgres",
        ] {
            assert!(!is_loopback_host(host), "{host}");
            assert_eq!(default_sslmode(host), PgSslMode::VerifyFull, "{host}");
        }
    }

    #[test]
    fn api_urls_are_https_except_on_loopback() {
        for ok in [
            "https://admin.memberstack.com",
            "https://abc.supabase.co",
            "http://127.0.0.1:9911",
            "http://localhost:54321",
            "http://[::1]:80",
        ] {
            assert_eq!(validate_api_url("k", ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://admin.memberstack.com",
            "http://abc.supabase.co",
            "http://10.0.0.1:8080",
            "ftp://admin.memberstack.com",
            "admin.memberstack.com",
        ] {
            let e = validate_api_url("memberstack.api_url", bad).unwrap_err();
            assert_eq!(e.key, "memberstack.api_url", "{bad}");
        }
        assert!(
            validate_api_url("k", "http://abc.supabase.co")
                .unwrap_err()
                .problem
                .contains("plain http")
        );
    }
}
