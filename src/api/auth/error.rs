//! Every way a bearer token is refused, with a stable code. Messages use fixed wording: they
//! never quote the token, its claims or a key.

use axum::http::StatusCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the Authorization header is missing")]
    MissingToken,
    #[error("the Authorization header is not `Bearer <token>`")]
    MalformedHeader,
    #[error("the token is not a well-formed JWT")]
    MalformedToken,
    #[error("the token's algorithm is not accepted here")]
    AlgorithmNotAllowed,
    #[error("the token names no key id (kid) and the key set has several keys")]
    MissingKid,
    #[error("the token's key id (kid) is not in the key set")]
    UnknownKid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token has no expiry (exp)")]
    MissingExp,
    #[error("the token lacks the required claim `{0}`")]
    MissingClaim(&'static str),
    #[error("the token is not a member token")]
    NotAMemberToken,
    #[error("the admin token is not valid")]
    WrongAdminToken,
    /// Not the caller's fault: the key set could not be fetched.
    #[error("the signing keys are unavailable; retry later")]
    KeysUnavailable,
}

impl AuthError {
    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedHeader => "malformed_authorization",
            Self::MalformedToken => "malformed_token",
            Self::AlgorithmNotAllowed => "alg_not_allowed",
            Self::MissingKid => "missing_kid",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::WrongAudience => "wrong_audience",
            Self::WrongIssuer => "wrong_issuer",
            Self::MissingExp => "missing_exp",
            Self::MissingClaim(_) => "missing_claim",
            Self::NotAMemberToken => "not_a_member_token",
            Self::WrongAdminToken => "invalid_admin_token",
            Self::KeysUnavailable => "jwks_unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// Maps a `jsonwebtoken` failure of signature or claim validation.
    pub(super) fn from_jwt(err: &jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match err.kind() {
            K::InvalidSignature | K::InvalidKeyFormat | K::InvalidRsaKey(_) => Self::BadSignature,
            K::ExpiredSignature => Self::Expired,
            K::ImmatureSignature => Self::NotYetValid,
            K::InvalidAudience => Self::WrongAudience,
            K::InvalidIssuer => Self::WrongIssuer,
            K::MissingRequiredClaim(c) => match c.as_str() {
                "exp" => Self::MissingExp,
                "iss" => Self::MissingClaim("iss"),
                "aud" => Self::MissingClaim("aud"),
                "nbf" => Self::MissingClaim("nbf"),
                _ => Self::MissingClaim("sub"),
            },
            K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName => {
                Self::AlgorithmNotAllowed
            }
            _ => Self::MalformedToken,
        }
    }
}
