//! HS256 mode end to end through `MemberAuth`, and the header handling both modes share.
//! (Mode `jwks` with a served key set is tested in tests/it/api.rs.)

use axum::http::HeaderMap;
use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header, encode};
use secrecy::SecretString;
use serde_json::{Value, json};

use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-only";
const RSA_KEY: &[u8] = include_bytes!("../../../tests/fixtures/api/key_a.pem");

fn config() -> ApiConfig {
    ApiConfig {
        auth_mode: ApiAuthMode::Hs256,
        hs256_secret: Some(SecretString::from(SECRET)),
        audience: Some("app_test".into()),
        leeway_secs: 5,
        ..ApiConfig::default()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims() -> Value {
    json!({"id": "mem_1", "type": "member", "iss": "https://api.memberstack.com",
           "aud": "app_test", "iat": now(), "exp": now() + 600})
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    h
}

async fn check(token: &str) -> Result<Caller, AuthError> {
    MemberAuth::new(&config())
        .unwrap()
        .authenticate(&headers(token))
        .await
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn accepts_a_valid_token_and_takes_the_member_from_id_then_sub() {
    assert_eq!(check(&hs256(&claims())).await.unwrap().member_id, "mem_1");
    let sub_only = with(without(claims(), "id"), "sub", json!("mem_2"));
    assert_eq!(check(&hs256(&sub_only)).await.unwrap().member_id, "mem_2");
}

#[tokio::test]
async fn refuses_each_broken_claim_with_its_code() {
    let cases = [
        (with(claims(), "exp", json!(now() - 60)), AuthError::Expired),
        (
            with(claims(), "nbf", json!(now() + 60)),
            AuthError::NotYetValid,
        ),
        (
            with(claims(), "aud", json!("app_other")),
            AuthError::WrongAudience,
        ),
        (
            with(claims(), "iss", json!("https://evil.example")),
            AuthError::WrongIssuer,
        ),
        (without(claims(), "exp"), AuthError::MissingExp),
        (without(claims(), "iss"), AuthError::MissingClaim("iss")),
        (without(claims(), "aud"), AuthError::MissingClaim("aud")),
        (without(claims(), "id"), AuthError::MissingClaim("id")),
        (
            with(claims(), "type", json!("app")),
            AuthError::NotAMemberToken,
        ),
    ];
    for (claims, expected) in cases {
        assert_eq!(
            check(&hs256(&claims)).await.err(),
            Some(expected),
            "{claims}"
        );
    }
}

#[tokio::test]
async fn leeway_tolerates_small_clock_skew_only() {
    assert!(
        check(&hs256(&with(claims(), "exp", json!(now() - 2))))
            .await
            .is_ok()
    );
    assert!(
        check(&hs256(&with(claims(), "nbf", json!(now() + 2))))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn refuses_other_algorithms_and_alg_none() {
    let rs256 = encode(
        &Header::new(Algorithm::RS256),
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
    )
    .unwrap();
    assert_eq!(
        check(&rs256).await.err(),
        Some(AuthError::AlgorithmNotAllowed)
    );
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        check(&hs512).await.err(),
        Some(AuthError::AlgorithmNotAllowed)
    );
    for alg in ["none", "None", "NONE"] {
        let unsigned = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&claims())
        );
        assert_eq!(
            check(&unsigned).await.err(),
            Some(AuthError::AlgorithmNotAllowed),
            "{alg}"
        );
    }
}

#[tokio::test]
async fn refuses_a_wrong_secret_and_tampered_claims() {
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(b"another secret of at least 32 bytes!!"),
    )
    .unwrap();
    assert_eq!(check(&forged).await.err(), Some(AuthError::BadSignature));
    let token = hs256(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&with(claims(), "id", json!("mem_other"))),
        parts[2]
    );
    assert_eq!(check(&tampered).await.err(), Some(AuthError::BadSignature));
}

#[tokio::test]
async fn refuses_malformed_headers_and_tokens() {
    let auth = MemberAuth::new(&config()).unwrap();
    assert_eq!(
        auth.authenticate(&HeaderMap::new()).await.err(),
        Some(AuthError::MissingToken)
    );
    for value in ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "token"] {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        assert_eq!(
            auth.authenticate(&h).await.err(),
            Some(AuthError::MalformedHeader),
            "{value}"
        );
    }
    for token in ["abc", "a.b.c", "....", &"x".repeat(9000)] {
        assert_eq!(
            check(token).await.err(),
            Some(AuthError::MalformedToken),
            "{token:.20}"
        );
    }
    // The scheme is case-insensitive.
    let mut h = HeaderMap::new();
    let token = hs256(&claims());
    h.insert(
        header::AUTHORIZATION,
        format!("bearer {token}").parse().unwrap(),
    );
    assert!(auth.authenticate(&h).await.is_ok());
}

#[tokio::test]
async fn without_a_configured_audience_every_token_is_refused() {
    // The configuration refuses this; built anyway, it fails closed.
    let cfg = ApiConfig {
        audience: None,
        ..config()
    };
    let auth = MemberAuth::new(&cfg).unwrap();
    for claims in [
        with(claims(), "aud", json!("app_any")),
        with(claims(), "aud", json!("app_test")),
        without(claims(), "aud"),
    ] {
        assert!(auth.authenticate(&headers(&hs256(&claims))).await.is_err());
    }
}

#[test]
fn admin_token_needs_the_exact_value() {
    let admin = AdminToken::new(&SecretString::from("the-admin-token-for-tests-only"));
    assert!(
        admin
            .check(&headers("the-admin-token-for-tests-only"))
            .is_ok()
    );
    for wrong in [
        "the-admin-token-for-tests-onl",
        "the-admin-token-for-tests-only!",
        "x",
    ] {
        assert_eq!(
            admin.check(&headers(wrong)).err(),
            Some(AuthError::WrongAdminToken)
        );
    }
    assert_eq!(
        admin.check(&HeaderMap::new()).err(),
        Some(AuthError::MissingToken)
    );
}
