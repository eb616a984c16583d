#![no_main]

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use membersync_fuzz::verify::SvixVerifier;
use secrecy::SecretString;

/// id, timestamp and signature header bytes, unbranded names?, signing time, now, body.
type Input = (Vec<u8>, Vec<u8>, Vec<u8>, bool, i64, i64, Vec<u8>);

const SECRETS: [&str; 2] = [
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
];

fuzz_target!(|input: Input| {
    let (id, timestamp, signature, unbranded, signed_at, now, body) = input;
    let secrets = SECRETS.map(SecretString::from);
    let verifier = SvixVerifier::new(&secrets).expect("valid secrets");

    // 1. Arbitrary headers and body: must not panic.
    let prefix = if unbranded { "webhook" } else { "svix" };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("id", &id),
        ("timestamp", &timestamp),
        ("signature", &signature),
    ] {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            let name = HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes()).unwrap();
            headers.insert(name, value);
        }
    }
    let _ = verifier.verify(&headers, &body, now);

    // 2. A correctly signed delivery of the same body verifies.
    let signed_at = signed_at.rem_euclid(4_102_444_800);
    let mut headers = HeaderMap::new();
    headers.insert(
        "svix-id",
        HeaderValue::from_static("msg_p5jXN8AQM9LWM0D4loKWxJek"),
    );
    headers.insert("svix-timestamp", HeaderValue::from(signed_at));
    let signature = verifier.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", signed_at, &body);
    headers.insert("svix-signature", HeaderValue::from_str(&signature).unwrap());
    verifier
        .verify(&headers, &body, signed_at)
        .expect("own signature verifies");
});
