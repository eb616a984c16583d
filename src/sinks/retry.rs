//! The retry policy the sink clients share: how many attempts, how long to wait between them,
//! and which outcomes are worth another attempt.
//!
//! Backoff before attempt `n + 1` (after `n` failures) is `base × 2^(n-1)`, capped at `max`, then
//! jittered so that many workers failing together do not retry in lockstep. A server's
//! `Retry-After` is a floor: we never retry earlier than it asks.

use std::future::Future;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveDateTime, Utc};
use rand::Rng;

/// How the computed backoff is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, backoff]`: spreads retries the most, may retry almost at once.
    Full,
    /// `backoff / 2` plus uniform in `[0, backoff / 2]`: keeps at least half the backoff.
    Equal,
    /// No randomness (tests, or a single caller).
    None,
}

/// What a failed attempt means for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Worth another attempt: 429, 500, 502, 503, 504, transport errors and timeouts.
    Retryable,
    /// Retrying cannot help: every other 4xx (and decode errors).
    Permanent,
}

/// Classifies an HTTP status of a failed response.
pub fn classify_status(status: u16) -> Class {
    match status {
        429 | 500 | 502 | 503 | 504 => Class::Retryable,
        _ => Class::Permanent,
    }
}

/// One failed attempt: the error, and the server's `Retry-After` if it sent one.
#[derive(Debug)]
pub struct Failure<E> {
    pub error: E,
    pub class: Class,
    pub retry_after: Option<Duration>,
}

impl<E> Failure<E> {
    pub fn permanent(error: E) -> Self {
        Self {
            error,
            class: Class::Permanent,
            retry_after: None,
        }
    }

    pub fn retryable(error: E, retry_after: Option<Duration>) -> Self {
        Self {
            error,
            class: Class::Retryable,
            retry_after,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total (1 = no retry). 0 is treated as 1.
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
    /// A `Retry-After` longer than this ends the retries instead of sleeping through it: a
    /// worker parked for an hour holds back every other change of its partition. The caller
    /// gets the error (with the server's delay) and its own retry / DLQ logic decides.
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    pub fn new(max_attempts: u32, base: Duration, max: Duration) -> Self {
        Self {
            max_attempts,
            base,
            max,
            jitter: Jitter::Equal,
            max_retry_after: Duration::from_secs(60),
        }
    }

    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The un-jittered backoff after `failures` failed attempts (1-based): `base × 2^(n-1)`,
    /// capped at `max`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// The wait before the next attempt: jittered backoff, never less than `retry_after`.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(failures);
        let jittered = match self.jitter {
            Jitter::None => backoff,
            Jitter::Full => random_up_to(backoff),
            Jitter::Equal => backoff / 2 + random_up_to(backoff - backoff / 2),
        };
        match retry_after {
            Some(floor) => jittered.max(floor),
            None => jittered,
        }
    }

    /// Runs `op` until it succeeds, fails permanently, or the attempts are used up; returns the
    /// last error then. `op` gets the 1-based attempt number. `on_retry(attempt, &error, delay)`
    /// runs before each sleep (metrics, logs).
    pub async fn run<T, E, F, Fut>(
        &self,
        mut op: F,
        mut on_retry: impl FnMut(u32, &E, Duration),
    ) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure<E>>>,
    {
        let attempts = self.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let failure = match op(attempt).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if failure.class == Class::Permanent || attempt >= attempts {
                return Err(failure.error);
            }
            if failure
                .retry_after
                .is_some_and(|ra| ra > self.max_retry_after)
            {
                return Err(failure.error);
            }
            let delay = self.delay(attempt, failure.retry_after);
            on_retry(attempt, &failure.error, delay);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

fn random_up_to(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// Parses a `Retry-After` value: delay-seconds (`"2"`, also a lenient `"1.5"`) or an HTTP
/// date (IMF-fixdate, and the obsolete RFC 850 and asctime forms RFC 9110 says to accept).
/// A date in the past means "now" (zero). Garbage gives `None`: fall back to backoff.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let date = parse_http_date(value)?;
    let now: DateTime<Utc> = now.into();
    Some((date - now).to_std().unwrap_or(Duration::ZERO))
}

fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(date) = DateTime::parse_from_rfc2822(value) {
        return Some(date.with_timezone(&Utc));
    }
    // RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT") and asctime ("Sun Nov  6 08:49:37 1994").
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|fmt| NaiveDateTime::parse_from_str(value, fmt).ok())
        .map(|naive| naive.and_utc())
}

/// Reads `Retry-After` from a response's headers.
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// A reqwest error as one line, with its sources ("error sending request: tcp connect error:
/// Connection refused") but without the request URL, which can hold an email (reqwest's
/// `Display` appends it). Secrets are only ever in headers, which reqwest errors never print.
pub fn transport_message(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy::new(5, Duration::from_millis(100), Duration::from_millis(1_000))
            .with_jitter(jitter)
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy(Jitter::None);
        let got: Vec<u128> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(1_000));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..500 {
            let full = policy(Jitter::Full).delay(3, None);
            assert!(full <= Duration::from_millis(400));
            let equal = policy(Jitter::Equal).delay(3, None);
            assert!(equal >= Duration::from_millis(200) && equal <= Duration::from_millis(400));
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy(Jitter::Full);
        for _ in 0..100 {
            assert!(p.delay(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        }
        // A short Retry-After does not shorten the backoff either.
        let d = policy(Jitter::None).delay(4, Some(Duration::from_millis(1)));
        assert_eq!(d, Duration::from_millis(800));
    }

    #[test]
    fn classifies_statuses() {
        for s in [429, 500, 502, 503, 504] {
            assert_eq!(classify_status(s), Class::Retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422, 501] {
            assert_eq!(classify_status(s), Class::Permanent, "{s}");
        }
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37Z
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1_500))
        );
        let imf = parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now);
        assert_eq!(imf, Some(Duration::from_secs(10)));
        let rfc850 = parse_retry_after("Sunday, 06-Nov-94 08:49:57 GMT", now);
        assert_eq!(rfc850, Some(Duration::from_secs(20)));
        let asctime = parse_retry_after("Sun Nov  6 08:50:07 1994", now);
        assert_eq!(asctime, Some(Duration::from_secs(30)));
        let past = parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now);
        assert_eq!(past, Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[tokio::test]
    async fn run_retries_retryable_then_succeeds() {
        let calls = AtomicU32::new(0);
        let retries = AtomicU32::new(0);
        let p = RetryPolicy::new(4, Duration::from_millis(1), Duration::from_millis(5));
        let out: Result<u32, &str> = p
            .run(
                |attempt| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if attempt < 3 {
                            Err(Failure::retryable("busy", None))
                        } else {
                            Ok(attempt)
                        }
                    }
                },
                |_, _, _| {
                    retries.fetch_add(1, Ordering::SeqCst);
                },
            )
            .await;
        assert_eq!(out, Ok(3));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(retries.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn run_stops_on_permanent_and_after_max_attempts() {
        let p = RetryPolicy::new(3, Duration::from_millis(1), Duration::from_millis(2));
        let calls = AtomicU32::new(0);
        let out: Result<(), &str> = p
            .run(
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err(Failure::permanent("bad request")) }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out, Err("bad request"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let out: Result<(), &str> = p
            .run(
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err(Failure::retryable("down", None)) }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out, Err("down"));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn run_gives_up_on_an_excessive_retry_after() {
        let p = RetryPolicy::new(3, Duration::from_millis(1), Duration::from_millis(2));
        let calls = AtomicU32::new(0);
        let out: Result<(), &str> = p
            .run(
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err(Failure::retryable("later", Some(Duration::from_secs(3600)))) }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out, Err("later"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
