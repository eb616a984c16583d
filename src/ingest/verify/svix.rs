//! Svix / Standard Webhooks signature verification (Memberstack deliveries).
//!
//! Scheme (docs/external-services.md §1.1, svix `rust/src/webhooks.rs`):
//! - headers `svix-id`, `svix-timestamp` (Unix seconds), `svix-signature`; each one may
//!   instead come under its unbranded name `webhook-id`, `webhook-timestamp`,
//!   `webhook-signature` (looked up per header, `svix-*` first, as the svix libraries do);
//! - signed content `{id}.{timestamp}.{raw body bytes}`, HMAC-SHA256, base64 (standard
//!   alphabet, padded);
//! - the signature header is a space-separated list of `<version>,<base64>` entries; only
//!   `v1` entries are considered (`v1a` = asymmetric, and anything else, is ignored) and a
//!   match of any entry under any configured secret passes;
//! - the timestamp must be within 300 s of now in both directions, checked before the
//!   signature (as the svix libraries do).
//!
//! Differences from the svix crate, all stricter or equivalent:
//! - candidate signatures are base64-decoded and compared as raw MAC bytes in constant time
//!   (svix compares the base64 strings);
//! - the body does not have to be UTF-8 (svix refuses non-UTF-8 bodies as "payload invalid";
//!   the MAC is over bytes either way);
//! - ids are capped at [`MAX_ID_LEN`] bytes and may not contain whitespace; headers that
//!   appear twice are refused.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{KeyError, MAC_LEN, TOLERANCE_SECS, VerifyError, parse_unix_seconds, single_header};

type HmacSha256 = Hmac<Sha256>;

/// Prefix of Svix signing secrets. Optional on input, as in the svix libraries.
pub const SECRET_PREFIX: &str = "whsec_";
/// Fewest key bytes accepted (Svix issues 24-byte keys; Standard Webhooks says 24 to 64).
pub const MIN_KEY_LEN: usize = 16;
/// Longest message id accepted, in bytes (Svix ids are `msg_` + 27 characters).
pub const MAX_ID_LEN: usize = 256;
/// Longest timestamp header accepted, in bytes.
pub const MAX_TIMESTAMP_LEN: usize = 32;
/// Longest signature header accepted, in bytes (about 170 `v1,` entries).
pub const MAX_SIGNATURE_HEADER_LEN: usize = 8 * 1024;

const ID_HEADERS: (&str, &str) = ("svix-id", "webhook-id");
const TIMESTAMP_HEADERS: (&str, &str) = ("svix-timestamp", "webhook-timestamp");
const SIGNATURE_HEADERS: (&str, &str) = ("svix-signature", "webhook-signature");

/// What a verified Svix delivery told us, beyond the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvixDelivery {
    /// The message id (`svix-id`): identical on retries, so it is the idempotency key.
    pub id: String,
    /// The signed timestamp, Unix seconds.
    pub timestamp: i64,
}

/// Verifies Svix-signed deliveries against one or more active secrets.
pub struct SvixVerifier {
    keys: Vec<SecretSlice<u8>>,
}

impl std::fmt::Debug for SvixVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvixVerifier")
            .field("secrets", &self.keys.len())
            .finish()
    }
}

impl SvixVerifier {
    /// Builds a verifier from `whsec_<base64>` secrets (the prefix is optional). Several
    /// secrets may be active during rotation; a delivery passes if it matches any of them.
    pub fn new(secrets: &[SecretString]) -> Result<Self, KeyError> {
        if secrets.is_empty() {
            return Err(KeyError::NoSecrets);
        }
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, secret)| decode_key(index, secret.expose_secret()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { keys })
    }

    /// Everything that can be checked before the body is read: the three headers present
    /// and well formed, the timestamp within the tolerance, and at least one `v1` entry
    /// that could be a MAC. A delivery that fails here fails [`SvixVerifier::verify`] too,
    /// with the same error (except [`VerifyError::SignatureMismatch`] for a header whose
    /// `v1` entries are all undecodable), so the server may refuse it without reading its
    /// body.
    pub fn check_headers(
        &self,
        headers: &HeaderMap,
        now_unix_secs: i64,
    ) -> Result<(), VerifyError> {
        let signed = read_headers(headers, now_unix_secs)?;
        if signed.candidates.is_empty() {
            return Err(VerifyError::SignatureMismatch);
        }
        Ok(())
    }

    /// Verifies one delivery. `body` must be the raw request bytes; `now_unix_secs` is the
    /// receiver's clock.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix_secs: i64,
    ) -> Result<SvixDelivery, VerifyError> {
        let SignedHeaders {
            id,
            timestamp,
            candidates,
        } = read_headers(headers, now_unix_secs)?;
        for key in &self.keys {
            let expected = compute_mac(key.expose_secret(), id, timestamp, body);
            if candidates
                .iter()
                .any(|candidate| bool::from(candidate.ct_eq(&expected)))
            {
                return Ok(SvixDelivery {
                    id: id.to_owned(),
                    timestamp,
                });
            }
        }
        Err(VerifyError::SignatureMismatch)
    }

    /// The `svix-signature` value a sender would put on this message: one `v1,<base64>`
    /// entry per configured secret, space-separated (what Svix sends during rotation).
    /// For test simulators and self-checks; production only verifies.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        self.keys
            .iter()
            .map(|key| {
                let mac = compute_mac(key.expose_secret(), id, timestamp, body);
                format!("v1,{}", STANDARD.encode(mac))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the three headers say, parsed; the timestamp already checked.
struct SignedHeaders<'a> {
    id: &'a str,
    timestamp: i64,
    /// Every `v1` entry that decodes to a MAC's length.
    candidates: Vec<[u8; MAC_LEN]>,
}

fn read_headers(headers: &HeaderMap, now_unix_secs: i64) -> Result<SignedHeaders<'_>, VerifyError> {
    let (id_name, id) = branded_or_unbranded(headers, ID_HEADERS, MAX_ID_LEN)?;
    if id.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(VerifyError::MalformedHeader(id_name));
    }
    let (ts_name, ts_text) = branded_or_unbranded(headers, TIMESTAMP_HEADERS, MAX_TIMESTAMP_LEN)?;
    let timestamp = parse_unix_seconds(ts_text, ts_name)?;
    let (_, signatures) =
        branded_or_unbranded(headers, SIGNATURE_HEADERS, MAX_SIGNATURE_HEADER_LEN)?;

    check_timestamp(timestamp, now_unix_secs)?;

    let mut any_v1 = false;
    let mut candidates: Vec<[u8; MAC_LEN]> = Vec::new();
    for entry in signatures.split(' ').filter(|e| !e.is_empty()) {
        let Some((version, encoded)) = entry.split_once(',') else {
            continue;
        };
        if version != "v1" {
            continue;
        }
        any_v1 = true;
        // A v1 entry that is not base64 of exactly 32 bytes cannot match; skip it rather
        // than fail, so that one garbled entry does not hide a valid one.
        if let Some(mac) = decode_mac(encoded) {
            candidates.push(mac);
        }
    }
    if !any_v1 {
        return Err(VerifyError::NoSignatures);
    }
    Ok(SignedHeaders {
        id,
        timestamp,
        candidates,
    })
}

fn decode_key(index: usize, secret: &str) -> Result<SecretSlice<u8>, KeyError> {
    if secret.chars().any(char::is_whitespace) {
        return Err(KeyError::Whitespace { index });
    }
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    if encoded.is_empty() {
        return Err(KeyError::Empty { index });
    }
    // Deliberately drop base64's DecodeError: its message names the offending byte and
    // offset, which would put part of the secret into a log line.
    let key = secrecy::zeroize::Zeroizing::new(
        STANDARD
            .decode(encoded)
            .map_err(|_| KeyError::NotBase64 { index })?,
    );
    if key.len() < MIN_KEY_LEN {
        return Err(KeyError::TooShort {
            index,
            min: MIN_KEY_LEN,
        });
    }
    Ok(SecretSlice::from(key.to_vec()))
}

/// Looks a header up under its `svix-*` name, then its `webhook-*` name.
fn branded_or_unbranded<'a>(
    headers: &'a HeaderMap,
    (branded, unbranded): (&'static str, &'static str),
    max_len: usize,
) -> Result<(&'static str, &'a str), VerifyError> {
    if let Some(value) = single_header(headers, branded, max_len)? {
        return Ok((branded, value));
    }
    if let Some(value) = single_header(headers, unbranded, max_len)? {
        return Ok((unbranded, value));
    }
    Err(VerifyError::MissingHeader(branded))
}

fn check_timestamp(timestamp: i64, now: i64) -> Result<(), VerifyError> {
    // i128: no overflow whatever the two values are.
    let age = i128::from(now) - i128::from(timestamp);
    if age > i128::from(TOLERANCE_SECS) {
        Err(VerifyError::TimestampTooOld)
    } else if -age > i128::from(TOLERANCE_SECS) {
        Err(VerifyError::TimestampTooNew)
    } else {
        Ok(())
    }
}

fn decode_mac(encoded: &str) -> Option<[u8; MAC_LEN]> {
    // 32 bytes are 44 base64 characters with padding; don't decode anything else.
    if encoded.len() != 44 {
        return None;
    }
    STANDARD.decode(encoded).ok()?.try_into().ok()
}

/// HMAC-SHA256 over `{id}.{timestamp}.{body}`. The timestamp is written in canonical decimal
/// (as the svix libraries sign the parsed integer), the body as raw bytes.
fn compute_mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    // The published test vector, from svix/svix-webhooks `python/tests/test_webhooks.py`
    // (`test_sign_function`) and `php/tests/WebhookTest.php` (`testSignFunctionWorks`); the
    // Standard Webhooks spec repeats it. Checked against the stored source of those files.
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    // The svix Rust crate's own fixed vector, `rust/src/webhooks.rs` `test_sign`.
    const RUST_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const RUST_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const RUST_TS: i64 = 1_649_367_553;
    const RUST_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const RUST_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    fn verifier(secrets: &[&str]) -> SvixVerifier {
        let secrets: Vec<SecretString> = secrets.iter().map(|s| SecretString::from(*s)).collect();
        SvixVerifier::new(&secrets).expect("valid secrets")
    }

    fn headers(prefix: &str, id: &str, ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [("id", id), ("timestamp", ts), ("signature", sig)] {
            let name =
                axum::http::HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes()).unwrap();
            h.insert(name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn vector_headers() -> HeaderMap {
        headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), VECTOR_SIG)
    }

    #[test]
    fn published_vector_verifies() {
        let v = verifier(&[VECTOR_SECRET]);
        assert_eq!(v.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY), VECTOR_SIG);
        let delivery = v
            .verify(&vector_headers(), VECTOR_BODY, VECTOR_TS)
            .expect("published vector");
        assert_eq!(
            delivery,
            SvixDelivery {
                id: VECTOR_ID.into(),
                timestamp: VECTOR_TS
            }
        );
    }

    #[test]
    fn published_vector_without_prefix_verifies() {
        // The svix libraries accept the secret with or without `whsec_`.
        let v = verifier(&["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        v.verify(&vector_headers(), VECTOR_BODY, VECTOR_TS).unwrap();
    }

    #[test]
    fn svix_rust_crate_vector_verifies() {
        let v = verifier(&[RUST_SECRET]);
        assert_eq!(v.sign(RUST_ID, RUST_TS, RUST_BODY), RUST_SIG);
        let h = headers("svix", RUST_ID, &RUST_TS.to_string(), RUST_SIG);
        v.verify(&h, RUST_BODY, RUST_TS).unwrap();
    }

    #[test]
    fn svix_python_invalid_signature_vector_is_rejected() {
        // `test_invalid_signature_raises_error`: last base64 character changed.
        let v = verifier(&[VECTOR_SECRET]);
        let h = headers(
            "svix",
            VECTOR_ID,
            &VECTOR_TS.to_string(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        );
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn unbranded_headers_verify() {
        let v = verifier(&[VECTOR_SECRET]);
        let h = headers("webhook", VECTOR_ID, &VECTOR_TS.to_string(), VECTOR_SIG);
        let d = v.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap();
        assert_eq!(d.id, VECTOR_ID);
    }

    #[test]
    fn mixed_and_title_cased_headers_verify() {
        let v = verifier(&[VECTOR_SECRET]);
        let mut h = HeaderMap::new();
        // HeaderMap names are case-insensitive; `from_bytes` lowercases.
        h.insert(
            axum::http::HeaderName::from_bytes(b"Svix-Id").unwrap(),
            HeaderValue::from_static(VECTOR_ID),
        );
        h.insert("webhook-timestamp", HeaderValue::from(VECTOR_TS));
        h.insert(
            axum::http::HeaderName::from_bytes(b"SVIX-SIGNATURE").unwrap(),
            HeaderValue::from_static(VECTOR_SIG),
        );
        v.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap();
    }

    #[test]
    fn tampered_body_id_timestamp_are_rejected() {
        let v = verifier(&[VECTOR_SECRET]);
        let ts = VECTOR_TS.to_string();
        assert_eq!(
            v.verify(&vector_headers(), br#"{"test": 2432232315}"#, VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            v.verify(&vector_headers(), b"", VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
        let h = headers("svix", "msg_p5jXN8AQM9LWM0D4loKWxJeK", &ts, VECTOR_SIG);
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
        let h = headers("svix", VECTOR_ID, &(VECTOR_TS + 1).to_string(), VECTOR_SIG);
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
        // The parsed timestamp is re-printed canonically before signing (as the svix
        // crate does), so a leading zero is harmless and still verifies.
        let h = headers("svix", VECTOR_ID, &format!("0{ts}"), VECTOR_SIG);
        assert!(v.verify(&h, VECTOR_BODY, VECTOR_TS).is_ok());
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let v = verifier(&[OTHER_SECRET]);
        assert_eq!(
            v.verify(&vector_headers(), VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn timestamp_tolerance_both_directions() {
        let v = verifier(&[VECTOR_SECRET]);
        let h = vector_headers();
        // Exactly at the edges: accepted.
        v.verify(&h, VECTOR_BODY, VECTOR_TS + 300).unwrap();
        v.verify(&h, VECTOR_BODY, VECTOR_TS - 300).unwrap();
        // One second past: rejected, with distinct errors.
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS + 301),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS - 301),
            Err(VerifyError::TimestampTooNew)
        );
        // Extreme clocks do not overflow.
        assert_eq!(
            v.verify(&h, VECTOR_BODY, i64::MAX),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(
            v.verify(&h, VECTOR_BODY, i64::MIN),
            Err(VerifyError::TimestampTooNew)
        );
    }

    #[test]
    fn header_checks_before_the_body_agree_with_verify() {
        let v = verifier(&[VECTOR_SECRET]);
        v.check_headers(&vector_headers(), VECTOR_TS).unwrap();
        // Whatever the body turns out to be: the signature is not checked here.
        let forged = headers(
            "svix",
            VECTOR_ID,
            &VECTOR_TS.to_string(),
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        v.check_headers(&forged, VECTOR_TS).unwrap();
        let ts = VECTOR_TS.to_string();
        for (h, now, expected) in [
            (
                vector_headers(),
                VECTOR_TS + 301,
                VerifyError::TimestampTooOld,
            ),
            (
                vector_headers(),
                VECTOR_TS - 301,
                VerifyError::TimestampTooNew,
            ),
            (
                headers("svix", VECTOR_ID, "soon", VECTOR_SIG),
                VECTOR_TS,
                VerifyError::MalformedHeader("svix-timestamp"),
            ),
            (
                headers("svix", VECTOR_ID, &ts, "v2,abc"),
                VECTOR_TS,
                VerifyError::NoSignatures,
            ),
            (
                headers("svix", VECTOR_ID, &ts, "v1,!!!"),
                VECTOR_TS,
                VerifyError::SignatureMismatch,
            ),
            (
                HeaderMap::new(),
                VECTOR_TS,
                VerifyError::MissingHeader("svix-id"),
            ),
        ] {
            assert_eq!(v.check_headers(&h, now), Err(expected));
            assert_eq!(v.verify(&h, VECTOR_BODY, now), Err(expected));
        }
    }

    #[test]
    fn timestamp_is_checked_before_signature() {
        // As in the svix libraries: a stale delivery reports the timestamp, even unsigned.
        let v = verifier(&[VECTOR_SECRET]);
        let h = headers(
            "svix",
            VECTOR_ID,
            "1000",
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::TimestampTooOld)
        );
    }

    #[test]
    fn each_missing_header_is_named() {
        let v = verifier(&[VECTOR_SECRET]);
        for (remove, name) in [
            ("svix-id", "svix-id"),
            ("svix-timestamp", "svix-timestamp"),
            ("svix-signature", "svix-signature"),
        ] {
            let mut h = vector_headers();
            h.remove(remove);
            assert_eq!(
                v.verify(&h, VECTOR_BODY, VECTOR_TS),
                Err(VerifyError::MissingHeader(name))
            );
        }
        for remove in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut h = headers("webhook", VECTOR_ID, &VECTOR_TS.to_string(), VECTOR_SIG);
            h.remove(remove);
            let err = v.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap_err();
            assert_eq!(err.reason(), "missing_header");
            // Reported under the canonical svix-* name.
            assert!(err.header().unwrap().starts_with("svix-"), "{err:?}");
        }
        assert_eq!(
            v.verify(&HeaderMap::new(), VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::MissingHeader("svix-id"))
        );
    }

    #[test]
    fn malformed_ids_and_timestamps() {
        let v = verifier(&[VECTOR_SECRET]);
        let ts = VECTOR_TS.to_string();
        let cases: Vec<(String, String, VerifyError)> = vec![
            (
                String::new(),
                ts.clone(),
                VerifyError::EmptyHeader("svix-id"),
            ),
            (
                "   ".into(),
                ts.clone(),
                VerifyError::EmptyHeader("svix-id"),
            ),
            (
                "msg 1".into(),
                ts.clone(),
                VerifyError::MalformedHeader("svix-id"),
            ),
            (
                "m".repeat(MAX_ID_LEN + 1),
                ts.clone(),
                VerifyError::HeaderTooLong("svix-id"),
            ),
            (
                VECTOR_ID.into(),
                String::new(),
                VerifyError::EmptyHeader("svix-timestamp"),
            ),
            (
                VECTOR_ID.into(),
                "hello".into(),
                VerifyError::MalformedHeader("svix-timestamp"),
            ),
            (
                VECTOR_ID.into(),
                "1614265330.0".into(),
                VerifyError::MalformedHeader("svix-timestamp"),
            ),
            (
                VECTOR_ID.into(),
                "-1614265330".into(),
                VerifyError::MalformedHeader("svix-timestamp"),
            ),
            (
                VECTOR_ID.into(),
                "99999999999999999999".into(),
                VerifyError::MalformedHeader("svix-timestamp"),
            ),
            (
                VECTOR_ID.into(),
                "1".repeat(MAX_TIMESTAMP_LEN + 1),
                VerifyError::HeaderTooLong("svix-timestamp"),
            ),
        ];
        for (id, ts, expected) in cases {
            let h = headers("svix", &id, &ts, VECTOR_SIG);
            assert_eq!(
                v.verify(&h, VECTOR_BODY, VECTOR_TS),
                Err(expected),
                "id={id:?} ts={ts:?}"
            );
        }
        let h = headers(
            "svix",
            VECTOR_ID,
            &ts,
            &"v".repeat(MAX_SIGNATURE_HEADER_LEN + 1),
        );
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::HeaderTooLong("svix-signature"))
        );
        // Non-ASCII header bytes.
        let mut h = vector_headers();
        h.insert("svix-id", HeaderValue::from_bytes(b"msg_\xff").unwrap());
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::MalformedHeader("svix-id"))
        );
        // Repeated header.
        let mut h = vector_headers();
        h.append("svix-id", HeaderValue::from_static("msg_other"));
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::MalformedHeader("svix-id"))
        );
        // A malformed unbranded header is named as such.
        let h = headers("webhook", VECTOR_ID, "soon", VECTOR_SIG);
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::MalformedHeader("webhook-timestamp"))
        );
    }

    #[test]
    fn malformed_signature_headers() {
        let v = verifier(&[VECTOR_SECRET]);
        let ts = VECTOR_TS.to_string();
        for (sig, expected) in [
            ("BAD_SIG_NATURE", VerifyError::NoSignatures),
            ("v1", VerifyError::NoSignatures),
            (
                "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                VerifyError::NoSignatures,
            ),
            (
                "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                VerifyError::NoSignatures,
            ),
            ("v1,", VerifyError::SignatureMismatch),
            ("v1,dawfeoifkpqwoekfpqoekf", VerifyError::SignatureMismatch),
            ("v1,g0hM9SsE", VerifyError::SignatureMismatch),
            // Right bytes, wrong alphabet/padding: only canonical base64 is accepted.
            (
                "v1,g0hM9SsE-OTPJTGt_tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                VerifyError::SignatureMismatch,
            ),
            (
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",
                VerifyError::SignatureMismatch,
            ),
            // Hex of the right MAC is not accepted either.
            (
                "v1,83484cf52b04f8e4cf2531adfed9882ad4b2665137b852442d594d20e2c9d4e1",
                VerifyError::SignatureMismatch,
            ),
        ] {
            let h = headers("svix", VECTOR_ID, &ts, sig);
            assert_eq!(v.verify(&h, VECTOR_BODY, VECTOR_TS), Err(expected), "{sig}");
        }
    }

    #[test]
    fn several_signatures_one_valid() {
        // Shape of svix's `test_multi_sig_payload_is_valid`.
        let v = verifier(&[VECTOR_SECRET]);
        let sig = [
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "garbage",
            VECTOR_SIG,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        ]
        .join(" ");
        let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), &sig);
        v.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap();
        // Extra spaces between entries are tolerated.
        let sig = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=   {VECTOR_SIG}");
        let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), &sig);
        v.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap();
        // None valid.
        let sig = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1a,xyz";
        let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), sig);
        assert_eq!(
            v.verify(&h, VECTOR_BODY, VECTOR_TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn rotation_second_secret_matches() {
        let v = verifier(&[OTHER_SECRET, VECTOR_SECRET]);
        v.verify(&vector_headers(), VECTOR_BODY, VECTOR_TS).unwrap();
        // And the sender side of rotation: both signatures in one header.
        let both = v.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY);
        assert_eq!(both.split(' ').count(), 2);
        assert!(both.ends_with(VECTOR_SIG));
        let only_new = verifier(&[VECTOR_SECRET]);
        let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), &both);
        only_new.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap();
    }

    #[test]
    fn bad_keys_are_rejected_without_echoing_them() {
        let cases: [(&str, KeyError); 6] = [
            ("whsec_", KeyError::Empty { index: 0 }),
            ("", KeyError::Empty { index: 0 }),
            ("whsec_not*base64!!", KeyError::NotBase64 { index: 0 }),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa",
                KeyError::NotBase64 { index: 0 },
            ),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
                KeyError::Whitespace { index: 0 },
            ),
            (
                "whsec_c2hvcnQ=",
                KeyError::TooShort {
                    index: 0,
                    min: MIN_KEY_LEN,
                },
            ),
        ];
        for (secret, expected) in cases {
            let err = SvixVerifier::new(&[SecretString::from(secret)]).unwrap_err();
            assert_eq!(err, expected, "{secret:?}");
            let text = format!("{err} {err:?}");
            let body = secret.trim().trim_start_matches("whsec_");
            assert!(body.len() < 4 || !text.contains(body), "{text}");
        }
        assert_eq!(SvixVerifier::new(&[]).unwrap_err(), KeyError::NoSecrets);
        let err = SvixVerifier::new(&[
            SecretString::from(VECTOR_SECRET),
            SecretString::from("whsec_%%%"),
        ])
        .unwrap_err();
        assert_eq!(err, KeyError::NotBase64 { index: 1 });
    }

    #[test]
    fn debug_output_hides_keys() {
        let v = verifier(&[VECTOR_SECRET]);
        let text = format!("{v:?}");
        assert_eq!(text, "SvixVerifier { secrets: 1 }");
    }

    #[test]
    fn errors_never_contain_received_values() {
        let v = verifier(&[VECTOR_SECRET]);
        let h = headers(
            "svix",
            VECTOR_ID,
            &VECTOR_TS.to_string(),
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        );
        let err = v.verify(&h, VECTOR_BODY, VECTOR_TS).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("Ceo5"));
        assert!(!text.contains(VECTOR_ID));
    }

    #[test]
    fn non_utf8_body_is_fine() {
        let v = verifier(&[VECTOR_SECRET]);
        let body = [0xff, 0xfe, 0x00, 0x80];
        let sig = v.sign(VECTOR_ID, VECTOR_TS, &body);
        let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), &sig);
        v.verify(&h, &body, VECTOR_TS).unwrap();
    }

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            // Mostly-plausible text, to reach the deeper branches.
            "(v1,|v1a,|v2,| |,)?[A-Za-z0-9+/=,. _-]{0,120}".prop_map(String::into_bytes),
            "[0-9]{0,25}".prop_map(String::into_bytes),
            // Anything at all (invalid header bytes are skipped by the caller).
            proptest::collection::vec(any::<u8>(), 0..300),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_arbitrary_input(
            id in header_value(),
            ts in header_value(),
            sig in header_value(),
            unbranded in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            now in any::<i64>(),
        ) {
            let v = verifier(&[VECTOR_SECRET, OTHER_SECRET]);
            let prefix = if unbranded { "webhook" } else { "svix" };
            let mut h = HeaderMap::new();
            for (name, value) in [("id", &id), ("timestamp", &ts), ("signature", &sig)] {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    let name = axum::http::HeaderName::from_bytes(
                        format!("{prefix}-{name}").as_bytes(),
                    )
                    .unwrap();
                    h.insert(name, value);
                }
            }
            let _ = v.verify(&h, &body, now);
        }

        #[test]
        fn sign_then_verify_round_trips(
            id in "[A-Za-z0-9_.:-]{1,64}",
            ts in 0i64..=4_102_444_800,
            skew in -300i64..=300,
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let v = verifier(&[VECTOR_SECRET]);
            let sig = v.sign(&id, ts, &body);
            let h = headers("svix", &id, &ts.to_string(), &sig);
            let d = v.verify(&h, &body, ts + skew).unwrap();
            prop_assert_eq!(d.id, id);
            prop_assert_eq!(d.timestamp, ts);
        }

        #[test]
        fn any_single_bit_flip_in_the_body_is_rejected(
            body in proptest::collection::vec(any::<u8>(), 1..256),
            index in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let v = verifier(&[VECTOR_SECRET, OTHER_SECRET]);
            let sig = v.sign(VECTOR_ID, VECTOR_TS, &body);
            let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), &sig);
            let mut tampered = body.clone();
            tampered[index.index(body.len())] ^= 1 << bit;
            prop_assert_eq!(
                v.verify(&h, &tampered, VECTOR_TS),
                Err(VerifyError::SignatureMismatch)
            );
        }

        #[test]
        fn any_single_bit_flip_in_the_signature_is_rejected(
            index in 0usize..32,
            bit in 0u8..8,
        ) {
            let v = verifier(&[VECTOR_SECRET]);
            let mut mac = STANDARD
                .decode(VECTOR_SIG.trim_start_matches("v1,"))
                .unwrap();
            mac[index] ^= 1 << bit;
            let sig = format!("v1,{}", STANDARD.encode(&mac));
            let h = headers("svix", VECTOR_ID, &VECTOR_TS.to_string(), &sig);
            prop_assert_eq!(
                v.verify(&h, VECTOR_BODY, VECTOR_TS),
                Err(VerifyError::SignatureMismatch)
            );
        }
    }
}
