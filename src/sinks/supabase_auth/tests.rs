use serde_json::json;

use super::*;
use crate::sinks::test_server::{MockServer, Reply};

const KEY: &str = "eyJhbGciOiJIUzI1NiJ9.service-role-secret";
const ID: &str = "9b2f1a4e-3c5d-4e6f-8a7b-0c1d2e3f4a5b";

fn cfg(url: &str) -> SupabaseConfig {
    SupabaseConfig {
        url: Some(format!("{url}/")),
        service_role_key: Some(SecretString::from(KEY)),
        request_timeout_ms: 2_000,
        max_attempts: 3,
        backoff_base_ms: 10,
        ..SupabaseConfig::default()
    }
}

fn user(email: &str) -> Value {
    json!({
        "id": ID, "aud": "authenticated", "role": "authenticated", "email": email,
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"memberstack_id": "mem_1"},
        "created_at": "2024-01-01T00:00:00Z"
    })
}

async fn setup(default: Reply) -> (MockServer, SupabaseAuthClient) {
    let server = MockServer::start(default).await;
    let client = SupabaseAuthClient::new(&cfg(&server.url)).unwrap();
    (server, client)
}

fn create(email: &str) -> CreateUser {
    CreateUser {
        email: email.into(),
        email_confirm: true,
        user_metadata: json!({"memberstack_id": "mem_1"}),
        app_metadata: None,
        password: None,
    }
}

#[test]
fn missing_url_or_key_is_not_configured() {
    let mut c = cfg("http://127.0.0.1:1");
    c.url = None;
    assert_eq!(
        SupabaseAuthClient::new(&c).unwrap_err(),
        AuthError::NotConfigured
    );
    let mut c = cfg("http://127.0.0.1:1");
    c.service_role_key = None;
    assert_eq!(
        SupabaseAuthClient::new(&c).unwrap_err(),
        AuthError::NotConfigured
    );
}

#[tokio::test]
async fn create_user_sends_both_auth_headers_and_the_body() {
    let (server, client) = setup(Reply::json(200, user("a@example.com"))).await;
    let u = client.create_user(&create("a@example.com")).await.unwrap();
    assert_eq!(u.id, Uuid::parse_str(ID).unwrap());
    assert_eq!(u.email.as_deref(), Some("a@example.com"));
    assert_eq!(u.user_metadata, json!({"memberstack_id": "mem_1"}));
    assert_eq!(u.app_metadata["provider"], "email");
    let req = &server.requests()[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/auth/v1/admin/users")
    );
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(req.header("apikey"), Some(KEY));
    assert_eq!(
        req.json(),
        json!({"email": "a@example.com", "email_confirm": true, "user_metadata": {"memberstack_id": "mem_1"}})
    );

    let mut with_password = create("b@example.com");
    with_password.password = Some(SecretString::from("hunter22"));
    with_password.app_metadata = Some(json!({"source": "membersync"}));
    assert!(!format!("{with_password:?}").contains("hunter22"));
    client.create_user(&with_password).await.unwrap();
    let body = server.requests()[1].json();
    assert_eq!(body["password"], "hunter22");
    assert_eq!(body["app_metadata"], json!({"source": "membersync"}));
}

#[tokio::test]
async fn email_exists_is_mapped_and_not_retried() {
    let (server, client) = setup(Reply::json(
        422,
        json!({"code": 422, "error_code": "email_exists", "msg": "A user with this email address has already been registered"}),
    ))
    .await;
    let err = client
        .create_user(&create("a@example.com"))
        .await
        .unwrap_err();
    assert_eq!(err, AuthError::EmailExists);
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), 1);

    // Older GoTrue: no error_code, only the message.
    server.push(Reply::json(
        422,
        json!({"code": 422, "msg": "A user with this email address has already been registered"}),
    ));
    assert_eq!(
        client
            .create_user(&create("a@example.com"))
            .await
            .unwrap_err(),
        AuthError::EmailExists
    );
}

#[tokio::test]
async fn error_shapes_are_parsed() {
    let (server, client) = setup(Reply::json(
        400,
        json!({"error": "invalid_request", "error_description": "email is malformed"}),
    ))
    .await;
    let err = client.create_user(&create("nope")).await.unwrap_err();
    assert_eq!(
        err,
        AuthError::Api {
            status: 400,
            error_code: Some("invalid_request".into()),
            message: "email is malformed".into()
        }
    );
    server.push(Reply::json(401, json!({"message": "Invalid API key"})));
    let err = client
        .get_user(Uuid::parse_str(ID).unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AuthError::Api {
            status: 401,
            error_code: None,
            message: "Invalid API key".into()
        }
    );
    assert!(!format!("{err:?} {err} {client:?}").contains("service-role-secret"));
    assert_eq!(server.requests().len(), 2, "4xx not retried");
}

#[tokio::test]
async fn get_update_delete() {
    let id = Uuid::parse_str(ID).unwrap();
    let (server, client) = setup(Reply::json(200, user("new@example.com"))).await;
    server.push(Reply::json(
        404,
        json!({"code": 404, "error_code": "user_not_found", "msg": "User not found"}),
    ));
    assert_eq!(client.get_user(id).await.unwrap(), None);
    let got = client.get_user(id).await.unwrap().unwrap();
    assert_eq!(got.id, id);
    let updated = client
        .update_user(id, &json!({"email": "new@example.com"}))
        .await
        .unwrap();
    assert_eq!(updated.email.as_deref(), Some("new@example.com"));
    client.delete_user(id).await.unwrap();
    let reqs = server.requests();
    let calls: Vec<_> = reqs
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let path = format!("/auth/v1/admin/users/{ID}");
    assert_eq!(
        calls,
        [
            ("GET", path.as_str()),
            ("GET", path.as_str()),
            ("PUT", path.as_str()),
            ("DELETE", path.as_str())
        ]
    );
    assert_eq!(reqs[2].json(), json!({"email": "new@example.com"}));
}

#[tokio::test]
async fn server_errors_are_retried() {
    let (server, client) = setup(Reply::json(200, user("a@example.com"))).await;
    server.push(Reply::json(
        500,
        json!({"code": 500, "msg": "Database error creating new user"}),
    ));
    server.push(Reply::text(503, "upstream unavailable").header("retry-after", "0"));
    client.create_user(&create("a@example.com")).await.unwrap();
    assert_eq!(server.requests().len(), 3);

    let (server, client) = setup(Reply::json(502, json!({"message": "bad gateway"}))).await;
    let err = client
        .get_user(Uuid::parse_str(ID).unwrap())
        .await
        .unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 3, "max_attempts");
}

#[tokio::test]
async fn transport_errors_are_retryable_and_keyless() {
    let client = SupabaseAuthClient::new(&cfg("http://127.0.0.1:1")).unwrap();
    let err = client
        .get_user(Uuid::parse_str(ID).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, AuthError::Transport(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(!format!("{err:?}").contains("service-role-secret"));
}
