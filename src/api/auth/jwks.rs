//! The RS256 keys of a JWKS URL, cached.
//!
//! A token whose `kid` is not cached refetches the set, but at most once per
//! `min_refresh`: concurrent misses queue behind one fetch and then look again, and misses
//! inside the interval are answered from the cache ("unknown kid") without any request. So
//! a flood of tokens with made-up `kid`s costs the JWKS host at most one request per
//! interval, and costs us a mutex and a map lookup per token. A set older than `max_age` is
//! refreshed in the background (a removed key stops being trusted), under the same bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::sync::Mutex;

use super::AuthError;

/// A JWKS larger than this is refused (a key set is a few kilobytes).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot fetch the JWKS: {0}")]
    Fetch(String),
    #[error("the JWKS answered HTTP {0}")]
    Status(u16),
    #[error("the JWKS is not a JSON key set: {0}")]
    Decode(String),
    #[error("the JWKS holds no usable RS256 signing key")]
    NoKeys,
}

/// One fetched key set.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<DecodingKey>>,
    /// The set's only key, for tokens without a `kid`.
    only: Option<Arc<DecodingKey>>,
    fetched_at: Option<Instant>,
    /// Bumped by every successful fetch, so a waiter can tell the set changed.
    generation: u64,
}

impl KeySet {
    fn find(&self, kid: Option<&str>) -> Result<Arc<DecodingKey>, AuthError> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned().ok_or(AuthError::UnknownKid),
            None => self.only.clone().ok_or(if self.by_kid.is_empty() {
                AuthError::UnknownKid
            } else {
                AuthError::MissingKid
            }),
        }
    }
}

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_ok: bool,
}

pub struct JwksCache {
    url: String,
    http: reqwest::Client,
    min_refresh: Duration,
    max_age: Duration,
    keys: RwLock<Arc<KeySet>>,
    refresh: Mutex<RefreshState>,
    /// A background refresh is queued or running (one at a time, not one per request).
    refreshing: AtomicBool,
    fetches: AtomicU64,
}

impl JwksCache {
    pub fn new(
        url: &str,
        fetch_timeout: Duration,
        min_refresh: Duration,
        max_age: Duration,
    ) -> Result<Self, JwksError> {
        let http = reqwest::Client::builder()
            .timeout(fetch_timeout)
            .user_agent(concat!("membersync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| JwksError::Fetch(e.to_string()))?;
        Ok(Self {
            url: url.to_owned(),
            http,
            min_refresh,
            max_age,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refresh: Mutex::new(RefreshState::default()),
            refreshing: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
        })
    }

    /// How many fetches were attempted (for `/v1/admin/status` and tests).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    pub fn cached_keys(&self) -> usize {
        self.current().by_kid.len()
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The key a token names, refreshing the set within the bounds described above.
    pub async fn key(self: &Arc<Self>, kid: Option<&str>) -> Result<Arc<DecodingKey>, AuthError> {
        let seen = self.current();
        if let Ok(key) = seen.find(kid) {
            if seen.fetched_at.is_some_and(|t| t.elapsed() > self.max_age) {
                self.refresh_in_background();
            }
            return Ok(key);
        }
        let mut state = self.refresh.lock().await;
        let now = self.current();
        if now.generation != seen.generation {
            // Someone refreshed while we waited: their set is as fresh as it gets.
            return now.find(kid);
        }
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.min_refresh)
        {
            return Err(if state.last_ok {
                now.find(kid).err().unwrap_or(AuthError::UnknownKid)
            } else {
                AuthError::KeysUnavailable
            });
        }
        match self.fetch_locked(&mut state).await {
            Ok(set) => set.find(kid),
            Err(_) => Err(AuthError::KeysUnavailable),
        }
    }

    /// Fetches now unless a fetch ran within `min_refresh` (startup prefetch, staleness).
    pub async fn refresh_if_due(&self) {
        let mut state = self.refresh.lock().await;
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.min_refresh)
        {
            return;
        }
        let _ = self.fetch_locked(&mut state).await;
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.refresh_if_due().await;
            this.refreshing.store(false, Ordering::Release);
        });
    }

    async fn fetch_locked(&self, state: &mut RefreshState) -> Result<Arc<KeySet>, JwksError> {
        state.last_attempt = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch().await {
            Ok((by_kid, only)) => {
                state.last_ok = true;
                let mut slot = self.keys.write().unwrap_or_else(|e| e.into_inner());
                let set = Arc::new(KeySet {
                    by_kid,
                    only,
                    fetched_at: Some(Instant::now()),
                    generation: slot.generation + 1,
                });
                *slot = Arc::clone(&set);
                tracing::debug!(keys = set.by_kid.len(), "JWKS refreshed");
                Ok(set)
            }
            Err(e) => {
                state.last_ok = false;
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the cached keys");
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<KeyMaps, JwksError> {
        let response = self
            .http
            .get(&self.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| JwksError::Fetch(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(JwksError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(JwksError::Decode("larger than 1 MiB".into()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| JwksError::Fetch(e.without_url().to_string()))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(JwksError::Decode("larger than 1 MiB".into()));
        }
        parse(&body)
    }
}

type KeyMaps = (HashMap<String, Arc<DecodingKey>>, Option<Arc<DecodingKey>>);

/// The RS256 signing keys of a JWKS document. Keys of other types, uses or algorithms, and
/// keys this crate cannot read, are skipped rather than failing the whole set.
fn parse(body: &[u8]) -> Result<KeyMaps, JwksError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| JwksError::Decode(e.to_string()))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::Decode("no `keys` array".into()))?;
    let mut by_kid = HashMap::new();
    let mut all = Vec::new();
    for raw in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        if !is_rs256_signing_key(&jwk) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let key = Arc::new(key);
        if let Some(kid) = &jwk.common.key_id {
            by_kid.insert(kid.clone(), Arc::clone(&key));
        }
        all.push(key);
    }
    if all.is_empty() {
        return Err(JwksError::NoKeys);
    }
    let only = (all.len() == 1).then(|| all.remove(0));
    Ok((by_kid, only))
}

fn is_rs256_signing_key(jwk: &Jwk) -> bool {
    matches!(jwk.algorithm, AlgorithmParameters::RSA(_))
        && matches!(
            jwk.common.public_key_use,
            None | Some(PublicKeyUse::Signature)
        )
        && matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256))
}

/// The only algorithm mode `jwks` accepts.
pub const ALGORITHM: Algorithm = Algorithm::RS256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_rs256_signing_keys() {
        let body = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "a", "use": "sig", "alg": "RS256", "n": N, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": N, "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": N, "e": "AQAB"},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "weird"}
        ]});
        let (by_kid, only) = parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(by_kid.keys().collect::<Vec<_>>(), vec!["a"]);
        assert!(only.is_some());
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error() {
        assert!(matches!(
            parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#),
            Err(JwksError::NoKeys)
        ));
        assert!(matches!(parse(b"[]"), Err(JwksError::Decode(_))));
    }

    #[test]
    fn tokens_without_kid_need_a_single_key_set() {
        let set = KeySet::default();
        assert_eq!(set.find(None).err(), Some(AuthError::UnknownKid));
        let key = Arc::new(DecodingKey::from_secret(b"x"));
        let mut by_kid = HashMap::new();
        by_kid.insert("a".to_owned(), Arc::clone(&key));
        by_kid.insert("b".to_owned(), Arc::clone(&key));
        let set = KeySet {
            by_kid,
            ..KeySet::default()
        };
        assert_eq!(set.find(None).err(), Some(AuthError::MissingKid));
        assert!(set.find(Some("a")).is_ok());
        assert_eq!(set.find(Some("c")).err(), Some(AuthError::UnknownKid));
    }

    /// Serves `body` at `/jwks`, counting requests.
    async fn serve(body: Value) -> (String, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                h.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                async move { axum::Json(body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, hits)
    }

    #[tokio::test]
    async fn a_stale_set_is_refreshed_in_the_background_once() {
        let body = serde_json::json!({"keys": [{"kty": "RSA", "kid": "a", "n": N, "e": "AQAB"}]});
        let (url, hits) = serve(body).await;
        let cache = Arc::new(
            JwksCache::new(
                &url,
                Duration::from_secs(2),
                Duration::from_millis(1),
                Duration::from_millis(50),
            )
            .unwrap(),
        );
        assert!(cache.key(Some("a")).await.is_ok());
        assert_eq!(hits.load(Ordering::SeqCst), 1, "the first miss fetched");
        tokio::time::sleep(Duration::from_millis(80)).await;
        // Stale: answered from the cache at once, refreshed behind the scenes (once).
        for _ in 0..20 {
            assert!(cache.key(Some("a")).await.is_ok());
        }
        for _ in 0..100 {
            if hits.load(Ordering::SeqCst) >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_jwks_is_unavailable_not_unauthorized() {
        let cache = Arc::new(
            JwksCache::new(
                "http://127.0.0.1:9/jwks",
                Duration::from_millis(500),
                Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .unwrap(),
        );
        assert_eq!(
            cache.key(Some("a")).await.err(),
            Some(AuthError::KeysUnavailable)
        );
        // Within the refresh bound: no second attempt, same answer.
        assert_eq!(
            cache.key(Some("b")).await.err(),
            Some(AuthError::KeysUnavailable)
        );
        assert_eq!(cache.fetches(), 1);
    }

    /// A 2048-bit modulus (test-only, from tests/fixtures/api/key_a.pem).
    const N: &str = concat!(
        "qrcjhGyQ_v1OtbxDA4sAaT9zfIFP8hXQLqG9z6I4fzfcWe3CTgx2VjQq5bK7dm-bfJ_o16lLlqfSl9eaRvfam",
        "VSYOgk8fF89SqQoGft2jvwHUo41RPNfPbY6Sv1mH8U1En0XHC3VQr5Md0-pk7m7hx5ZLpra53Q2v1pMY3Uc1Q",
        "aWvE9HZT74pHq8DRXyEyP6odUhvUyvmXvrkzu9x1s5aUcYlhNq3C3sPJ_5ewsEbUdFCUMzHMtLpDKsWu4WqYu",
        "WzlVono1UhD8V_ylWHIzDCrYTHwt2DJsCw_59Gpbyw7DPp8aqh4M9llyppVUb5BsXFljQ-wfy6dl2AZEWZPGHKw"
    );
}
