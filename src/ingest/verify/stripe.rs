//! Stripe webhook signature verification.
//!
//! Scheme (docs/external-services.md §4; `stripe/stripe-python` `stripe/_webhook.py` and
//! `stripe/stripe-node` `src/Webhooks.ts`):
//! - header `Stripe-Signature: t=<unix seconds>,v1=<hex>,v1=<hex>,v0=<hex>`: comma-separated
//!   `key=value` elements;
//! - signed payload `{t}.{raw body}`, HMAC-SHA256, lowercase hex;
//! - the key is the endpoint secret's UTF-8 bytes **as they are** (`whsec_…` included, not
//!   base64-decoded: unlike Svix);
//! - only `v1` is a live scheme: `v0` (test-mode fake) and unknown schemes are ignored, so a
//!   header without any `v1` fails with [`VerifyError::NoSignatures`];
//! - any `v1` value may match (Stripe sends one per active secret while a secret is rolled).
//!
//! Timestamps: we do what Stripe's SDKs do, exactly. They reject a timestamp only when it is
//! more than the tolerance (300 s) **before** now (`timestamp < now - tolerance` in
//! stripe-python, `now - timestamp > tolerance` in stripe-node), and never reject one in the
//! future; and they check the signature **before** the timestamp. So a future `t=` with a
//! valid signature is accepted here, and a stale delivery with a bad signature reports
//! [`VerifyError::SignatureMismatch`]. Rationale for not being stricter than Stripe: a
//! receiver clock running slow would otherwise reject every genuine delivery, and a future
//! timestamp can only come from someone holding the secret, against whom a freshness check
//! does not help; replays of old deliveries are still bounded by the stale check and
//! deduplicated by event id downstream (merge's `webhook_log`, docs/merge.md).
//!
//! Parsing is stricter than the SDKs where they are ambiguous: `t` must be a non-negative
//! decimal integer and appear exactly once (stripe-python takes the first `t`, stripe-node
//! the last).

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{KeyError, MAC_LEN, TOLERANCE_SECS, VerifyError, parse_unix_seconds, single_header};

type HmacSha256 = Hmac<Sha256>;

/// The header Stripe signs deliveries with (HTTP header names are case-insensitive).
pub const SIGNATURE_HEADER: &str = "stripe-signature";
/// Prefix every Stripe endpoint secret has; required, so that a pasted API key is refused.
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest `Stripe-Signature` accepted, in bytes (about 110 `v1=` elements).
pub const MAX_SIGNATURE_HEADER_LEN: usize = 8 * 1024;
/// The only live signature scheme.
const EXPECTED_SCHEME: &str = "v1";

/// What a verified Stripe delivery told us, beyond the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeDelivery {
    /// The signed timestamp (`t=`), Unix seconds.
    pub timestamp: i64,
}

/// Verifies `Stripe-Signature` headers against one or more endpoint secrets.
pub struct StripeVerifier {
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for StripeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeVerifier")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl StripeVerifier {
    /// Builds a verifier from `whsec_…` endpoint secrets. Several may be active at once
    /// (while a secret is rolled); a delivery passes if it matches any of them.
    pub fn new(secrets: &[SecretString]) -> Result<Self, KeyError> {
        if secrets.is_empty() {
            return Err(KeyError::NoSecrets);
        }
        for (index, secret) in secrets.iter().enumerate() {
            let secret = secret.expose_secret();
            if secret.chars().any(char::is_whitespace) {
                // stripe-node only warns about this; a secret with whitespace can never
                // verify, so fail at start-up instead of on every delivery.
                return Err(KeyError::Whitespace { index });
            }
            if secret.is_empty() {
                return Err(KeyError::Empty { index });
            }
            match secret.strip_prefix(SECRET_PREFIX) {
                None => return Err(KeyError::MissingPrefix { index }),
                Some("") => return Err(KeyError::Empty { index }),
                Some(_) => {}
            }
        }
        Ok(Self {
            secrets: secrets.to_vec(),
        })
    }

    /// Everything that can be checked before the body is read: the header present and well
    /// formed with at least one `v1` element that could be a MAC, and the timestamp not too
    /// old. Unlike [`StripeVerifier::verify`] (which, as Stripe's SDKs do, checks the
    /// signature first), a stale delivery is refused here whatever its signature, so the
    /// server need not read its body; the status is 401 either way.
    pub fn check_headers(
        &self,
        headers: &HeaderMap,
        now_unix_secs: i64,
    ) -> Result<(), VerifyError> {
        let (timestamp, candidates) = read_header(headers)?;
        if is_stale(timestamp, now_unix_secs) {
            return Err(VerifyError::TimestampTooOld);
        }
        if candidates.is_empty() {
            return Err(VerifyError::SignatureMismatch);
        }
        Ok(())
    }

    /// Verifies one delivery. `body` must be the raw request bytes; `now_unix_secs` is the
    /// receiver's clock. See the module docs for the (Stripe-identical) timestamp rule.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix_secs: i64,
    ) -> Result<StripeDelivery, VerifyError> {
        let (timestamp, candidates) = read_header(headers)?;
        let matched = self.secrets.iter().any(|secret| {
            let expected = compute_mac(secret.expose_secret().as_bytes(), timestamp, body);
            candidates
                .iter()
                .any(|candidate| bool::from(candidate.ct_eq(&expected)))
        });
        if !matched {
            return Err(VerifyError::SignatureMismatch);
        }

        // Stripe's rule, after the signature check: only too-old is rejected.
        if is_stale(timestamp, now_unix_secs) {
            return Err(VerifyError::TimestampTooOld);
        }
        Ok(StripeDelivery { timestamp })
    }

    /// The `Stripe-Signature` value Stripe would send: `t=<timestamp>` then one `v1=` per
    /// configured secret. For test simulators and self-checks; production only verifies.
    pub fn signature_header(&self, timestamp: i64, body: &[u8]) -> String {
        let mut header = format!("t={timestamp}");
        for secret in &self.secrets {
            let mac = compute_mac(secret.expose_secret().as_bytes(), timestamp, body);
            header.push_str(",v1=");
            header.push_str(&hex::encode(mac));
        }
        header
    }
}

/// `Stripe-Signature` parsed: the timestamp and every `v1` value that decodes to a MAC's
/// length.
fn read_header(headers: &HeaderMap) -> Result<(i64, Vec<[u8; MAC_LEN]>), VerifyError> {
    let header = single_header(headers, SIGNATURE_HEADER, MAX_SIGNATURE_HEADER_LEN)?
        .ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;

    let mut timestamp = None;
    let mut any_v1 = false;
    let mut candidates: Vec<[u8; MAC_LEN]> = Vec::new();
    for element in header.split(',') {
        let (key, value) = match element.split_once('=') {
            Some(kv) => kv,
            // stripe-python fails on a bare `t`; other bare words are ignored.
            None if element == "t" => {
                return Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
            }
            None => continue,
        };
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(VerifyError::MalformedHeader(SIGNATURE_HEADER));
                }
                timestamp = Some(
                    parse_unix_seconds(value, SIGNATURE_HEADER)
                        .map_err(|_| VerifyError::MalformedHeader(SIGNATURE_HEADER))?,
                );
            }
            EXPECTED_SCHEME => {
                any_v1 = true;
                // Not 64 hex digits: cannot match; skip, like a wrong signature.
                let mut mac = [0u8; MAC_LEN];
                if hex::decode_to_slice(value, &mut mac).is_ok() {
                    candidates.push(mac);
                }
            }
            // `v0` (test-mode fake signature) and unknown schemes: ignored, to prevent
            // downgrade attacks.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::MalformedHeader(SIGNATURE_HEADER))?;
    if !any_v1 {
        return Err(VerifyError::NoSignatures);
    }
    Ok((timestamp, candidates))
}

/// More than the tolerance before now (Stripe never rejects a future timestamp).
fn is_stale(timestamp: i64, now_unix_secs: i64) -> bool {
    i128::from(timestamp) < i128::from(now_unix_secs) - i128::from(TOLERANCE_SECS)
}

/// HMAC-SHA256 over `{timestamp}.{body}`, timestamp in canonical decimal (stripe-python
/// formats the parsed integer with `%d`).
fn compute_mac(key: &[u8], timestamp: i64, body: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
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

    // stripe-python `tests/test_webhook.py`: DUMMY_WEBHOOK_PAYLOAD and DUMMY_WEBHOOK_SECRET,
    // byte for byte. Those tests sign at `time.time()`, so Stripe publishes no fixed
    // signature; the expected value below was computed at a fixed timestamp with Python's
    // standard library, exactly as stripe-python's `_compute_signature` does:
    //   hmac.new(b"whsec_test_secret", b"1614265330." + payload, hashlib.sha256).hexdigest()
    const PAYLOAD: &[u8] = b"{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\",\n  \"data\": { \"object\": { \"id\": \"rdr_123\", \"object\": \"terminal.reader\" } }\n}";
    const SECRET: &str = "whsec_test_secret";
    const TS: i64 = 1_614_265_330;
    const SIG: &str = "117f2d4aa1697fc9f837f2feca4e5e23ec790ffa7b6b669073d3677ae48c4b5f";
    // Same payload and timestamp, another secret (also computed with Python's `hmac`).
    const OTHER_SECRET: &str = "whsec_other_secret_for_rotation";
    const OTHER_SIG: &str = "8d52b05cd6f739d7811a2d46fcc48c64bbcc0b6900fecf9936819f05bfe0d160";

    fn verifier(secrets: &[&str]) -> StripeVerifier {
        let secrets: Vec<SecretString> = secrets.iter().map(|s| SecretString::from(*s)).collect();
        StripeVerifier::new(&secrets).expect("valid secrets")
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, HeaderValue::from_str(value).unwrap());
        h
    }

    fn vector_header() -> String {
        format!("t={TS},v1={SIG}")
    }

    #[test]
    fn stripe_node_crypto_provider_vectors() {
        // stripe-node `test/crypto/helpers.ts`: fixed HMAC-SHA256 hex values for key
        // "test_secret", proving the key is the secret's UTF-8 bytes as-is.
        for (payload, expected) in [
            (
                "".as_bytes(),
                "f7f9bd47fb987337b5796fdc1fdb9ba221d0d5396814bfcaf9521f43fd8927fd",
            ),
            (
                br#"{"obj1":"hello","obj2":"world"}"#.as_slice(),
                "bebb1a643997f419b315ddba19e6f5411e1ce7f810ba6d3617ce72823092f363",
            ),
            (
                "\u{1F600}".as_bytes(),
                "837da296d05c4fe31f61d5d7ead035099d9585a5bcde87de952012a78f0b0c43",
            ),
        ] {
            let mut mac = HmacSha256::new_from_slice(b"test_secret").unwrap();
            mac.update(payload);
            assert_eq!(hex::encode(mac.finalize().into_bytes()), expected);
        }
    }

    #[test]
    fn header_checks_before_the_body_agree_with_verify() {
        let v = verifier(&[SECRET]);
        // What verify accepts, the header check lets through (a future `t` included).
        v.check_headers(&headers(&vector_header()), TS).unwrap();
        v.check_headers(&headers(&vector_header()), TS - 3600)
            .unwrap();
        // Stale: refused without the body, whatever the signature.
        assert_eq!(
            v.check_headers(&headers(&vector_header()), TS + 301),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(
            v.check_headers(&HeaderMap::new(), TS),
            Err(VerifyError::MissingHeader(SIGNATURE_HEADER))
        );
        assert_eq!(
            v.check_headers(&headers(&format!("v1={SIG}")), TS),
            Err(VerifyError::MalformedHeader(SIGNATURE_HEADER))
        );
        assert_eq!(
            v.check_headers(&headers(&format!("t={TS},v0={SIG}")), TS),
            Err(VerifyError::NoSignatures)
        );
        // A v1 that cannot be a MAC can never match.
        assert_eq!(
            v.check_headers(&headers(&format!("t={TS},v1=zz")), TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn fixed_vector_verifies() {
        let v = verifier(&[SECRET]);
        assert_eq!(v.signature_header(TS, PAYLOAD), vector_header());
        let d = v.verify(&headers(&vector_header()), PAYLOAD, TS).unwrap();
        assert_eq!(d, StripeDelivery { timestamp: TS });
    }

    #[test]
    fn header_name_is_case_insensitive() {
        let v = verifier(&[SECRET]);
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(b"Stripe-Signature").unwrap(),
            HeaderValue::from_str(&vector_header()).unwrap(),
        );
        v.verify(&h, PAYLOAD, TS).unwrap();
    }

    #[test]
    fn key_is_not_base64_decoded() {
        // The same secret used the Svix way (base64-decoded) must not verify.
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode("dGVzdF9zZWNyZXQ=")
            .unwrap();
        assert_eq!(decoded, b"test_secret");
        let v = verifier(&["whsec_dGVzdF9zZWNyZXQ="]);
        let header = format!(
            "t={TS},v1={}",
            hex::encode(compute_mac(&decoded, TS, PAYLOAD))
        );
        assert_eq!(
            v.verify(&headers(&header), PAYLOAD, TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn tampered_body_and_timestamp_are_rejected() {
        let v = verifier(&[SECRET]);
        let mut body = PAYLOAD.to_vec();
        body[10] ^= 1;
        assert_eq!(
            v.verify(&headers(&vector_header()), &body, TS),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            v.verify(&headers(&format!("t={},v1={SIG}", TS + 1)), PAYLOAD, TS),
            Err(VerifyError::SignatureMismatch)
        );
        // Re-serialised JSON is not the raw body.
        let reserialised =
            serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(PAYLOAD).unwrap())
                .unwrap();
        assert_eq!(
            v.verify(&headers(&vector_header()), &reserialised, TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let v = verifier(&[OTHER_SECRET]);
        assert_eq!(
            v.verify(&headers(&vector_header()), PAYLOAD, TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn stale_rejected_future_accepted_like_stripe() {
        let v = verifier(&[SECRET]);
        let h = headers(&vector_header());
        v.verify(&h, PAYLOAD, TS + 300).unwrap();
        assert_eq!(
            v.verify(&h, PAYLOAD, TS + 301),
            Err(VerifyError::TimestampTooOld)
        );
        // Stripe's SDKs do not reject future timestamps; neither do we.
        v.verify(&h, PAYLOAD, TS - 301).unwrap();
        v.verify(&h, PAYLOAD, TS - 86_400 * 365).unwrap();
        v.verify(&h, PAYLOAD, i64::MIN).unwrap();
        assert_eq!(
            v.verify(&h, PAYLOAD, i64::MAX),
            Err(VerifyError::TimestampTooOld)
        );
    }

    #[test]
    fn signature_is_checked_before_timestamp() {
        // Stripe's order: a stale delivery with a bad signature is a signature failure.
        let v = verifier(&[SECRET]);
        let h = headers(&format!("t={TS},v1={}", "0".repeat(64)));
        assert_eq!(
            v.verify(&h, PAYLOAD, TS + 10_000),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn missing_and_empty_header() {
        let v = verifier(&[SECRET]);
        assert_eq!(
            v.verify(&HeaderMap::new(), PAYLOAD, TS),
            Err(VerifyError::MissingHeader("stripe-signature"))
        );
        assert_eq!(
            v.verify(&headers(""), PAYLOAD, TS),
            Err(VerifyError::EmptyHeader("stripe-signature"))
        );
        // A Svix-signed request is not a Stripe one.
        let mut h = HeaderMap::new();
        h.insert("svix-signature", HeaderValue::from_static("v1,abc"));
        assert_eq!(
            v.verify(&h, PAYLOAD, TS),
            Err(VerifyError::MissingHeader("stripe-signature"))
        );
    }

    #[test]
    fn malformed_headers() {
        let v = verifier(&[SECRET]);
        let malformed = VerifyError::MalformedHeader("stripe-signature");
        for header in [
            // stripe-python / stripe-node "Unable to extract timestamp and signatures".
            "i'm not even a real signature header",
            "bad_header",
            format!("v1={SIG}").as_str(),
            format!("t,v1={SIG}").as_str(),
            format!("t=,v1={SIG}").as_str(),
            format!("t=abc,v1={SIG}").as_str(),
            format!("t=-5,v1={SIG}").as_str(),
            format!("t=1.5,v1={SIG}").as_str(),
            format!("t= {TS},v1={SIG}").as_str(),
            format!("t=99999999999999999999,v1={SIG}").as_str(),
            format!("t={TS},t={TS},v1={SIG}").as_str(),
        ] {
            assert_eq!(
                v.verify(&headers(header), PAYLOAD, TS),
                Err(malformed),
                "{header}"
            );
        }
        let long = format!("t={TS},v1={}", "a".repeat(MAX_SIGNATURE_HEADER_LEN));
        assert_eq!(
            v.verify(&headers(&long), PAYLOAD, TS),
            Err(VerifyError::HeaderTooLong("stripe-signature"))
        );
        let mut h = headers(&vector_header());
        h.append(
            SIGNATURE_HEADER,
            HeaderValue::from_str(&vector_header()).unwrap(),
        );
        assert_eq!(v.verify(&h, PAYLOAD, TS), Err(malformed));
        let mut h = HeaderMap::new();
        h.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_bytes(b"t=1,v1=\xe9").unwrap(),
        );
        assert_eq!(v.verify(&h, PAYLOAD, TS), Err(malformed));
    }

    #[test]
    fn v0_only_is_no_signatures() {
        // stripe-python `test_raise_on_no_signatures_with_expected_scheme`: the right MAC
        // under scheme v0 is still "no signatures".
        let v = verifier(&[SECRET]);
        assert_eq!(
            v.verify(&headers(&format!("t={TS},v0={SIG}")), PAYLOAD, TS),
            Err(VerifyError::NoSignatures)
        );
        assert_eq!(
            v.verify(&headers(&format!("t={TS}")), PAYLOAD, TS),
            Err(VerifyError::NoSignatures)
        );
        assert_eq!(
            v.verify(&headers(&format!("t={TS},V1={SIG}")), PAYLOAD, TS),
            Err(VerifyError::NoSignatures)
        );
    }

    #[test]
    fn unknown_schemes_and_junk_elements_are_ignored() {
        let v = verifier(&[SECRET]);
        for header in [
            format!(
                "t={TS},v1={SIG},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"
            ),
            format!("v2=abc,t={TS},foo,v1={SIG},x=y=z"),
            format!("t={TS},v0={OTHER_SIG},v1={SIG}"),
        ] {
            v.verify(&headers(&header), PAYLOAD, TS).unwrap();
        }
    }

    #[test]
    fn several_signatures_one_valid() {
        // stripe-python `test_header_contains_valid_signature`.
        let v = verifier(&[SECRET]);
        for header in [
            format!("{},v1=bad_signature", vector_header()),
            format!("t={TS},v1=bad_signature,v1={OTHER_SIG},v1={SIG}"),
            // Uppercase hex decodes to the same MAC bytes.
            format!("t={TS},v1={}", SIG.to_uppercase()),
        ] {
            v.verify(&headers(&header), PAYLOAD, TS).unwrap();
        }
        // stripe-python `test_raise_on_no_valid_signatures_for_payload`.
        assert_eq!(
            v.verify(&headers(&format!("t={TS},v1=bad_signature")), PAYLOAD, TS),
            Err(VerifyError::SignatureMismatch)
        );
        // A signature with a trailing extra `=` part is the SDK's `split("=")[1]`: no match.
        assert_eq!(
            v.verify(&headers(&format!("t={TS},v1={SIG}=x")), PAYLOAD, TS),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn rotation_second_secret_matches() {
        let v = verifier(&[OTHER_SECRET, SECRET]);
        v.verify(&headers(&vector_header()), PAYLOAD, TS).unwrap();
        v.verify(&headers(&format!("t={TS},v1={OTHER_SIG}")), PAYLOAD, TS)
            .unwrap();
        assert_eq!(
            v.signature_header(TS, PAYLOAD),
            format!("t={TS},v1={OTHER_SIG},v1={SIG}")
        );
    }

    #[test]
    fn bad_secrets_are_rejected_without_echoing_them() {
        for (secret, expected) in [
            ("", KeyError::Empty { index: 0 }),
            ("whsec_", KeyError::Empty { index: 0 }),
            (
                "sk_live_abcdefghijklmnop",
                KeyError::MissingPrefix { index: 0 },
            ),
            ("whsec_abc\n", KeyError::Whitespace { index: 0 }),
            ("whsec_ab c", KeyError::Whitespace { index: 0 }),
        ] {
            let err = StripeVerifier::new(&[SecretString::from(secret)]).unwrap_err();
            assert_eq!(err, expected, "{secret:?}");
            let text = format!("{err} {err:?}");
            assert!(
                !text.contains("abcdefghijklmnop") && !text.contains("abc"),
                "{text}"
            );
        }
        assert_eq!(StripeVerifier::new(&[]).unwrap_err(), KeyError::NoSecrets);
        assert_eq!(
            format!("{:?}", verifier(&[SECRET, OTHER_SECRET])),
            "StripeVerifier { secrets: 2 }"
        );
    }

    #[test]
    fn errors_never_contain_received_values() {
        let v = verifier(&[OTHER_SECRET]);
        let err = v
            .verify(&headers(&vector_header()), PAYLOAD, TS)
            .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains(&SIG[..8]) && !text.contains(&TS.to_string()));
    }

    fn header_text() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "(t=[0-9]{0,12},)?((v0|v1|v2|t|x)=[0-9a-fA-F=]{0,70},?){0,4}"
                .prop_map(String::into_bytes),
            "[ -~]{0,200}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..300),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_arbitrary_input(
            header in header_text(),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            now in any::<i64>(),
        ) {
            let v = verifier(&[SECRET, OTHER_SECRET]);
            let mut h = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(&header) {
                h.insert(SIGNATURE_HEADER, value);
            }
            let _ = v.verify(&h, &body, now);
        }

        #[test]
        fn sign_then_verify_round_trips(
            ts in 0i64..=4_102_444_800,
            age in -1_000_000i64..=300,
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let v = verifier(&[SECRET]);
            let header = v.signature_header(ts, &body);
            let d = v.verify(&headers(&header), &body, ts + age).unwrap();
            prop_assert_eq!(d.timestamp, ts);
        }

        #[test]
        fn any_single_bit_flip_in_the_body_is_rejected(
            body in proptest::collection::vec(any::<u8>(), 1..256),
            index in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let v = verifier(&[SECRET, OTHER_SECRET]);
            let header = v.signature_header(TS, &body);
            let mut tampered = body.clone();
            tampered[index.index(body.len())] ^= 1 << bit;
            prop_assert_eq!(
                v.verify(&headers(&header), &tampered, TS),
                Err(VerifyError::SignatureMismatch)
            );
        }
    }
}
