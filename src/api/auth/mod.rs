//! Who is calling: the Memberstack member JWT in `Authorization: Bearer …` (member routes)
//! and the admin token (admin routes).
//!
//! Member tokens (docs/external-services.md §3): mode `jwks` accepts RS256 only, with keys from
//! the configured JWKS; mode `hs256` accepts HS256 only, with the shared secret. The allowed
//! algorithm is pinned before any key is chosen, so `alg: none`, an HS256 token "signed" with
//! the RSA public key (algorithm confusion) and every other algorithm are refused up front —
//! and pinned again in `jsonwebtoken`'s `Validation`. Then: signature, `exp` (required), `nbf`,
//! `iss` (required), `aud` (required, and `api.audience` with it), with a small leeway. The
//! member is the `id` claim (what the Admin SDK returns), else `sub` (what Memberstack's newer
//! guide shows).

mod error;
pub mod jwks;

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::Deserialize;
use subtle::ConstantTimeEq;

pub use error::AuthError;
pub use jwks::{JwksCache, JwksError};

use crate::config::{ApiAuthMode, ApiConfig};

/// Longer bearer values are refused without parsing (a member JWT is well under 2 KiB).
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The authenticated member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub member_id: String,
}

enum Keys {
    Jwks(Arc<JwksCache>),
    Hs256(Arc<DecodingKey>),
}

/// Verifies member tokens. Cheap to share behind an `Arc`.
pub struct MemberAuth {
    keys: Keys,
    algorithm: Algorithm,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    id: Option<String>,
    sub: Option<String>,
    #[serde(rename = "type")]
    token_type: Option<String>,
}

impl MemberAuth {
    pub fn new(cfg: &ApiConfig) -> Result<Self, JwksError> {
        // aws-lc-rs is the only backend compiled in; installing it explicitly keeps a second
        // backend enabled elsewhere in the dependency graph from making verification panic.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let (keys, algorithm) = match cfg.auth_mode {
            ApiAuthMode::Jwks => (
                Keys::Jwks(Arc::new(JwksCache::new(
                    &cfg.jwks_url,
                    cfg.jwks_fetch_timeout(),
                    cfg.jwks_min_refresh(),
                    cfg.jwks_max_age(),
                )?)),
                jwks::ALGORITHM,
            ),
            ApiAuthMode::Hs256 => {
                let secret = cfg
                    .hs256_secret
                    .as_ref()
                    .map_or(&[][..], |s| s.expose_secret().as_bytes());
                (
                    Keys::Hs256(Arc::new(DecodingKey::from_secret(secret))),
                    Algorithm::HS256,
                )
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[cfg.issuer.as_str()]);
        // `aud` is always required and compared. The configuration refuses the API without
        // `api.audience`; should a caller build this without one anyway, it fails closed (no
        // audience matches) rather than accepting the tokens of every Memberstack app.
        validation.validate_aud = true;
        if let Some(aud) = &cfg.audience {
            validation.set_audience(&[aud.as_str()]);
        }
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        Ok(Self {
            keys,
            algorithm,
            validation,
        })
    }

    /// The JWKS cache (mode `jwks`), for the startup prefetch and status.
    pub fn jwks(&self) -> Option<&Arc<JwksCache>> {
        match &self.keys {
            Keys::Jwks(cache) => Some(cache),
            Keys::Hs256(_) => None,
        }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = bearer(headers)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| classify_bad_header(token))?;
        if header.alg != self.algorithm {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let key = match &self.keys {
            Keys::Jwks(cache) => cache.key(header.kid.as_deref()).await?,
            Keys::Hs256(key) => Arc::clone(key),
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| AuthError::from_jwt(&e))?;
        let claims = data.claims;
        if claims.token_type.as_deref().is_some_and(|t| t != "member") {
            return Err(AuthError::NotAMemberToken);
        }
        let member_id = claims
            .id
            .or(claims.sub)
            .filter(|id| !id.trim().is_empty() && id.len() <= 256)
            .ok_or(AuthError::MissingClaim("id"))?;
        Ok(Caller { member_id })
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::MissingToken)?
        .to_str()
        .map_err(|_| AuthError::MalformedHeader)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::MalformedHeader);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::MalformedToken);
    }
    Ok(token)
}

/// `jsonwebtoken` cannot parse headers with algorithms it does not know (`none` among
/// them); tell those apart from garbage so the caller gets the precise code.
fn classify_bad_header(token: &str) -> AuthError {
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h.trim_end_matches('='))
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
    match alg {
        Some(_) if token.split('.').count() == 3 => AuthError::AlgorithmNotAllowed,
        _ => AuthError::MalformedToken,
    }
}

/// The admin token, compared in constant time. Both sides are hashed first, so neither the
/// comparison's duration nor an early length mismatch says anything about the token.
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    pub fn new(token: &secrecy::SecretString) -> Self {
        Self {
            digest: digest(token.expose_secret().trim()),
        }
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let presented = bearer(headers)?;
        if bool::from(digest(presented).ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(AuthError::WrongAdminToken)
        }
    }
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

#[cfg(test)]
mod tests;
