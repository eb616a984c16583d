//! API keys and redirects: the Memberstack and Supabase Auth clients send their key in headers
//! (`X-API-KEY`; `apikey` and `Authorization`) that must never reach another origin. Two real
//! HTTP servers on loopback: the API answers with a redirect, the other records what reaches it.
//! `127.0.0.1` and `localhost` are different origins, as two hosts would be.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::any;
use membersync::config::{MemberstackConfig, SupabaseConfig};
use membersync::sinks::memberstack::MemberstackClient;
use membersync::sinks::supabase_auth::SupabaseAuthClient;
use secrecy::SecretString;

const KEY: &str = "sk_redirect_test_key_0123456789";

/// The headers of every request a server received.
type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// A server that records each request and answers `200 {"data": {...}}`, or redirects every
/// request to `redirect_to` + the same path.
async fn server(redirect_to: Option<String>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(any(move |uri: axum::http::Uri, headers: HeaderMap| {
        let (s, redirect_to) = (s.clone(), redirect_to.clone());
        async move {
            s.lock().unwrap().push(headers);
            match redirect_to {
                Some(base) => (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("{base}{}", uri.path()))],
                    String::new(),
                )
                    .into_response(),
                None => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"data":{"id":"mem_1","auth":{"email":"a@example.com"}},"id":"00000000-0000-0000-0000-000000000001","email":"a@example.com"}"#,
                )
                    .into_response(),
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}"), seen)
}

fn memberstack(url: &str) -> MemberstackClient {
    MemberstackClient::new(
        &MemberstackConfig {
            api_url: url.to_owned(),
            api_key: Some(SecretString::from(KEY)),
            max_attempts: 1,
            ..MemberstackConfig::default()
        },
        None,
    )
    .unwrap()
}

fn supabase(url: &str) -> SupabaseAuthClient {
    SupabaseAuthClient::new(&SupabaseConfig {
        url: Some(url.to_owned()),
        service_role_key: Some(SecretString::from(KEY)),
        max_attempts: 1,
        ..SupabaseConfig::default()
    })
    .unwrap()
}

/// The same server under the other loopback name: another origin.
fn other_origin(url: &str) -> String {
    url.replace("127.0.0.1", "localhost")
}

#[tokio::test]
async fn api_keys_do_not_follow_a_redirect_to_another_origin() {
    let (elsewhere, seen_elsewhere) = server(None).await;
    let (api, seen_api) = server(Some(other_origin(&elsewhere))).await;

    let ms = memberstack(&api).get_member("mem_1").await;
    assert!(
        ms.is_err(),
        "a redirect to another origin is an error: {ms:?}"
    );
    let auth = supabase(&api).get_user(uuid::Uuid::from_u128(1)).await;
    assert!(auth.is_err(), "a redirect to another origin is an error");

    assert_eq!(
        seen_api.lock().unwrap().len(),
        2,
        "both clients asked the API"
    );
    let leaked = seen_elsewhere.lock().unwrap();
    assert!(
        leaked.is_empty(),
        "nothing may reach the other origin, let alone a key: {leaked:?}"
    );
}

#[tokio::test]
async fn a_redirect_within_the_same_origin_is_followed_with_the_key() {
    let (same, seen_same) = same_origin_redirector().await;
    let member = memberstack(&same).get_member("mem_1").await;
    assert!(member.is_ok(), "{member:?}");
    let seen = seen_same.lock().unwrap();
    assert_eq!(seen.len(), 2, "the original request and the redirected one");
    assert_eq!(
        seen[1].get("x-api-key").and_then(|v| v.to_str().ok()),
        Some(KEY),
        "within the origin, the key goes along"
    );
}

/// A server that redirects `/members/…` to `/moved/members/…` on itself and answers there.
async fn same_origin_redirector() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(any(move |uri: axum::http::Uri, headers: HeaderMap| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(headers);
            if uri.path().starts_with("/moved") {
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"data":{"id":"mem_1","auth":{"email":"a@example.com"}}}"#.to_owned(),
                )
                    .into_response()
            } else {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("/moved{}", uri.path()))],
                    String::new(),
                )
                    .into_response()
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}"), seen)
}
