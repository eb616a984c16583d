#![no_main]

use axum::http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use membersync_fuzz::verify::StripeVerifier;
use secrecy::SecretString;

const SECRETS: [&str; 2] = ["whsec_test_secret", "whsec_other_secret_for_rotation"];

fuzz_target!(|input: (Vec<u8>, i64, i64, Vec<u8>)| {
    let (header, signed_at, now, body) = input;
    let secrets = SECRETS.map(SecretString::from);
    let verifier = StripeVerifier::new(&secrets).expect("valid secrets");

    // 1. Arbitrary header and body: must not panic.
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(&header) {
        headers.insert("stripe-signature", value);
    }
    let _ = verifier.verify(&headers, &body, now);

    // 2. A correctly signed delivery of the same body verifies.
    let signed_at = signed_at.rem_euclid(4_102_444_800);
    let mut headers = HeaderMap::new();
    let value = verifier.signature_header(signed_at, &body);
    headers.insert("stripe-signature", HeaderValue::from_str(&value).unwrap());
    verifier
        .verify(&headers, &body, signed_at)
        .expect("own signature verifies");
});
