//! Webhook signature verification for the two senders `ingest` accepts.
//!
//! - [`svix`]: Memberstack deliveries, signed with the Svix / Standard Webhooks scheme
//!   (`svix-id`, `svix-timestamp`, `svix-signature`, or the unbranded `webhook-*` names).
//! - [`stripe`]: Stripe deliveries, signed with `Stripe-Signature: t=…,v1=…`.
//!
//! Both verifiers work on the **raw request bytes** (never re-serialised JSON), accept several
//! active secrets at once (secret rotation), decode every candidate signature to raw MAC bytes
//! and compare those in constant time. Neither the errors nor the `Debug` output of a verifier
//! ever contain a secret or a received signature value: every error carries only `'static`
//! text chosen by this module, so it is safe to log, to use as a metrics label (through
//! [`VerifyError::reason`]) and to send back to the client.

pub mod stripe;
pub mod svix;

pub use stripe::{StripeDelivery, StripeVerifier};
pub use svix::{SvixDelivery, SvixVerifier};

use axum::http::HeaderMap;

/// HMAC-SHA256 output length, in bytes. Both schemes use it.
pub(crate) const MAC_LEN: usize = 32;

/// Why a delivery failed verification.
///
/// Every variant maps to HTTP 401 in the ingest handler (a bad or missing signature,
/// docs/ingest.md); [`VerifyError::reason`] gives a stable snake_case label for metrics.
/// The `&'static str` payloads are header names (e.g. `"svix-timestamp"`), never values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header is absent (for Svix: neither the `svix-*` nor the `webhook-*` name).
    #[error("missing required header `{0}`")]
    MissingHeader(&'static str),
    /// A required header is present but empty (or only whitespace).
    #[error("header `{0}` is empty")]
    EmptyHeader(&'static str),
    /// A header is longer than this receiver accepts for it.
    #[error("header `{0}` is longer than allowed")]
    HeaderTooLong(&'static str),
    /// A header is present but cannot be parsed: not visible ASCII, sent more than once, a
    /// timestamp that is not a non-negative decimal integer that fits in 64 bits, an id with
    /// whitespace, or a `Stripe-Signature` without exactly one `t=` element.
    #[error("header `{0}` is malformed")]
    MalformedHeader(&'static str),
    /// The signed timestamp is older than the tolerance (300 s).
    #[error("signature timestamp is too old (more than 300 seconds before now)")]
    TimestampTooOld,
    /// The signed timestamp is further in the future than the tolerance (Svix only).
    #[error("signature timestamp is too far in the future (more than 300 seconds after now)")]
    TimestampTooNew,
    /// The signature header contains no entry of the supported scheme (`v1`).
    #[error("no signature with the expected scheme v1")]
    NoSignatures,
    /// No `v1` signature matches the payload under any configured secret.
    #[error("no signature matches the payload")]
    SignatureMismatch,
}

impl VerifyError {
    /// A stable, low-cardinality snake_case label for metrics (`reason="…"`).
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::MissingHeader(_) => "missing_header",
            VerifyError::EmptyHeader(_) => "empty_header",
            VerifyError::HeaderTooLong(_) => "header_too_long",
            VerifyError::MalformedHeader(_) => "malformed_header",
            VerifyError::TimestampTooOld => "stale_timestamp",
            VerifyError::TimestampTooNew => "future_timestamp",
            VerifyError::NoSignatures => "no_signatures",
            VerifyError::SignatureMismatch => "bad_signature",
        }
    }

    /// The header this error is about, when there is one.
    pub fn header(&self) -> Option<&'static str> {
        match self {
            VerifyError::MissingHeader(h)
            | VerifyError::EmptyHeader(h)
            | VerifyError::HeaderTooLong(h)
            | VerifyError::MalformedHeader(h) => Some(h),
            _ => None,
        }
    }
}

/// A configured signing secret could not be used. Never contains the secret or any part of
/// it; `index` is the secret's 0-based position in the list given to the constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The list of secrets is empty.
    #[error("no webhook signing secret configured")]
    NoSecrets,
    /// The secret (after an optional `whsec_` prefix) is empty.
    #[error("webhook signing secret at index {index} is empty")]
    Empty { index: usize },
    /// The secret contains whitespace, usually a trailing newline from a file or `echo`.
    #[error("webhook signing secret at index {index} contains whitespace (a trailing newline?)")]
    Whitespace { index: usize },
    /// A Stripe secret that does not start with `whsec_` (catches a pasted API key).
    #[error("webhook signing secret at index {index} does not start with `whsec_`")]
    MissingPrefix { index: usize },
    /// A Svix secret whose part after `whsec_` is not standard, padded base64.
    #[error("webhook signing secret at index {index} is not valid base64 after `whsec_`")]
    NotBase64 { index: usize },
    /// The decoded key is shorter than `min` bytes.
    #[error("webhook signing secret at index {index} is too short (at least {min} bytes of key)")]
    TooShort { index: usize, min: usize },
}

/// Seconds of clock difference accepted between the signed timestamp and now (both schemes).
pub const TOLERANCE_SECS: i64 = 300;

/// Reads a header that must appear at most once, as visible ASCII, within `max_len` bytes.
///
/// `Ok(None)` when absent. The returned text has surrounding spaces/tabs removed (HTTP
/// parsers already strip them; this only matters for hand-built maps).
pub(crate) fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
    max_len: usize,
) -> Result<Option<&'a str>, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        // Two values for one field is ambiguous: different components (proxy, us) might
        // pick different ones. Refuse rather than guess.
        return Err(VerifyError::MalformedHeader(name));
    }
    if value.len() > max_len {
        return Err(VerifyError::HeaderTooLong(name));
    }
    let text = value
        .to_str()
        .map_err(|_| VerifyError::MalformedHeader(name))?
        .trim_matches([' ', '\t']);
    if text.is_empty() {
        return Err(VerifyError::EmptyHeader(name));
    }
    Ok(Some(text))
}

/// Parses a Unix-seconds timestamp: 1 to 19 ASCII digits (no sign, no spaces, no fraction)
/// that fit in an `i64`.
pub(crate) fn parse_unix_seconds(text: &str, header: &'static str) -> Result<i64, VerifyError> {
    if text.is_empty() {
        return Err(VerifyError::EmptyHeader(header));
    }
    if text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::MalformedHeader(header));
    }
    text.parse::<i64>()
        .map_err(|_| VerifyError::MalformedHeader(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reasons_are_distinct_snake_case_labels() {
        let all = [
            VerifyError::MissingHeader("x"),
            VerifyError::EmptyHeader("x"),
            VerifyError::HeaderTooLong("x"),
            VerifyError::MalformedHeader("x"),
            VerifyError::TimestampTooOld,
            VerifyError::TimestampTooNew,
            VerifyError::NoSignatures,
            VerifyError::SignatureMismatch,
        ];
        let mut seen = std::collections::HashSet::new();
        for e in all {
            let r = e.reason();
            assert!(
                r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{r}"
            );
            assert!(seen.insert(r), "duplicate label {r}");
        }
        assert_eq!(VerifyError::TimestampTooOld.reason(), "stale_timestamp");
        assert_eq!(VerifyError::SignatureMismatch.reason(), "bad_signature");
        assert_eq!(VerifyError::MissingHeader("a").reason(), "missing_header");
        assert_eq!(VerifyError::MissingHeader("a").header(), Some("a"));
        assert_eq!(VerifyError::NoSignatures.header(), None);
    }

    #[test]
    fn single_header_rules() {
        let mut h = HeaderMap::new();
        assert_eq!(single_header(&h, "x-a", 10), Ok(None));
        h.insert("x-a", HeaderValue::from_static("  abc "));
        assert_eq!(single_header(&h, "x-a", 10), Ok(Some("abc")));
        assert_eq!(
            single_header(&h, "x-a", 3),
            Err(VerifyError::HeaderTooLong("x-a"))
        );
        h.insert("x-a", HeaderValue::from_static(""));
        assert_eq!(
            single_header(&h, "x-a", 10),
            Err(VerifyError::EmptyHeader("x-a"))
        );
        h.insert("x-a", HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert_eq!(
            single_header(&h, "x-a", 10),
            Err(VerifyError::MalformedHeader("x-a"))
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        assert_eq!(
            single_header(&h, "x-a", 10),
            Err(VerifyError::MalformedHeader("x-a"))
        );
    }

    #[test]
    fn unix_seconds_parsing() {
        assert_eq!(parse_unix_seconds("1614265330", "t"), Ok(1_614_265_330));
        assert_eq!(parse_unix_seconds("0", "t"), Ok(0));
        assert_eq!(parse_unix_seconds("9223372036854775807", "t"), Ok(i64::MAX));
        for bad in [
            "-1",
            "+1",
            "1.5",
            "1e9",
            " 1",
            "abc",
            "9223372036854775808",
            "12345678901234567890",
        ] {
            assert_eq!(
                parse_unix_seconds(bad, "t"),
                Err(VerifyError::MalformedHeader("t")),
                "{bad}"
            );
        }
        assert_eq!(
            parse_unix_seconds("", "t"),
            Err(VerifyError::EmptyHeader("t"))
        );
    }

    #[test]
    fn messages_are_fixed_text() {
        // The Display output is built from 'static text only, so it can never contain a
        // received value; spot-check the wording the HTTP layer will return.
        assert_eq!(
            VerifyError::MissingHeader("svix-id").to_string(),
            "missing required header `svix-id`"
        );
        assert_eq!(
            KeyError::NotBase64 { index: 1 }.to_string(),
            "webhook signing secret at index 1 is not valid base64 after `whsec_`"
        );
    }
}
