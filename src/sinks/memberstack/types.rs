//! Memberstack's wire types and errors.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A member as Memberstack returned it. `raw` is the whole object, so fields membersync does
/// not model survive a read-modify-write; `id` is lifted out because every call needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub raw: Value,
}

impl Member {
    pub fn from_value(raw: Value) -> Result<Self, String> {
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| "member without a string `id`".to_string())?
            .to_string();
        Ok(Self { id, raw })
    }

    /// `auth.email` (the current API), else a top-level `email` (older payloads).
    pub fn email(&self) -> Option<&str> {
        self.raw
            .pointer("/auth/email")
            .or_else(|| self.raw.get("email"))
            .and_then(Value::as_str)
    }

    pub fn custom_fields(&self) -> Option<&serde_json::Map<String, Value>> {
        self.raw.get("customFields").and_then(Value::as_object)
    }

    pub fn meta_data(&self) -> Option<&serde_json::Map<String, Value>> {
        self.raw.get("metaData").and_then(Value::as_object)
    }

    /// The member's `json` field (only present when fetched with `includeJSON=true`).
    pub fn json(&self) -> Option<&Value> {
        self.raw.get("json")
    }

    pub fn plan_connections(&self) -> &[Value] {
        self.raw
            .get("planConnections")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
}

impl Serialize for Member {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Member::from_value(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// One page of `GET /members`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberPage {
    pub total_count: u64,
    /// Pass as `after` for the next page. Never null per the SDK, even on the last page:
    /// `has_next_page` says whether to go on.
    pub end_cursor: u64,
    pub has_next_page: bool,
    pub data: Vec<Member>,
}

impl MemberPage {
    /// Lenient on purpose: `hasMore` is the legacy name of `hasNextPage`, the cursor may come
    /// as a number or a numeric string, and a missing cursor keeps the one we asked with (so a
    /// caller can never loop back to the start).
    pub(crate) fn from_value(body: Value, after: Option<u64>) -> Result<Self, String> {
        let as_u64 = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok());
        let data = match body.get("data") {
            Some(Value::Array(items)) => items
                .iter()
                .cloned()
                .map(Member::from_value)
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err("`data` is not an array".into()),
        };
        let has_next_page = body
            .get("hasNextPage")
            .or_else(|| body.get("hasMore"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            total_count: body.get("totalCount").and_then(as_u64).unwrap_or(0),
            end_cursor: body
                .get("endCursor")
                .and_then(as_u64)
                .or(after)
                .unwrap_or(0),
            has_next_page,
            data,
        })
    }
}

/// A failed Memberstack call. Never carries the API key: it is only ever in a request header,
/// and transport errors are rendered without their URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberstackError {
    /// A non-2xx answer with Memberstack's `{code, message}` (or `{error: {code, message}}`).
    #[error("Memberstack answered {status}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// Still 429 after every attempt (or the server asked to wait longer than we retry for).
    #[error("Memberstack rate limit (429) after all attempts{}", retry_after.map(|d| format!("; retry after {d:?}")).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    #[error("Memberstack request timed out")]
    Timeout,
    #[error("Memberstack transport error: {0}")]
    Transport(String),
    #[error("unexpected Memberstack response body: {0}")]
    Decode(String),
    /// `[memberstack] api_key` is unset (or is not a valid header value).
    #[error("Memberstack API key is not configured")]
    NotConfigured,
}

impl MemberstackError {
    /// Whether a later attempt can succeed: 429, 5xx gateway/availability errors, timeouts and
    /// transport errors. Other 4xx, decode errors and missing configuration cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { status, .. } => {
                crate::sinks::retry::classify_status(*status)
                    == crate::sinks::retry::Class::Retryable
            }
            Self::RateLimited { .. } | Self::Timeout | Self::Transport(_) => true,
            Self::Decode(_) | Self::NotConfigured => false,
        }
    }

    /// Builds the `Api` error from a response body: `{code, message}`, `{error: {code,
    /// message}}`, `{error: "…"}`, or plain text.
    pub(crate) fn from_body(status: u16, body: &[u8]) -> Self {
        let (code, message) = parse_error_body(body);
        Self::Api {
            status,
            code,
            message: message.unwrap_or_else(|| default_message(status)),
        }
    }
}

fn default_message(status: u16) -> String {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
        .to_string()
}

/// Longest error text we keep from a non-JSON body (an HTML error page, say).
const MAX_TEXT: usize = 300;

fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    let text = |v: Option<&Value>| {
        v.and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(json) => {
            let inner = match json.get("error") {
                Some(err @ Value::Object(_)) => err,
                Some(Value::String(s)) => return (None, Some(s.clone())),
                _ => &json,
            };
            (text(inner.get("code")), text(inner.get("message")))
        }
        Err(_) => {
            let s = String::from_utf8_lossy(body);
            let s = s.trim();
            if s.is_empty() {
                (None, None)
            } else {
                (None, Some(s.chars().take(MAX_TEXT).collect()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn member_round_trips_transparently() {
        let raw = json!({"id": "mem_1", "auth": {"email": "a@b.c"}, "customFields": {"x": "1"}});
        let m: Member = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(m.id, "mem_1");
        assert_eq!(m.email(), Some("a@b.c"));
        assert_eq!(serde_json::to_value(&m).unwrap(), raw);
        assert!(serde_json::from_value::<Member>(json!({"auth": {}})).is_err());
    }

    #[test]
    fn page_accepts_legacy_has_more() {
        let p = MemberPage::from_value(
            json!({"totalCount": 3, "endCursor": 7, "hasMore": true, "data": [{"id": "mem_1"}]}),
            None,
        )
        .unwrap();
        assert!(p.has_next_page);
        assert_eq!((p.total_count, p.end_cursor, p.data.len()), (3, 7, 1));
        let p = MemberPage::from_value(json!({"data": [], "hasNextPage": false}), Some(9)).unwrap();
        assert_eq!(p.end_cursor, 9);
    }

    #[test]
    fn error_bodies() {
        let e = MemberstackError::from_body(400, br#"{"code":"generic-message","message":"nope"}"#);
        assert_eq!(
            e,
            MemberstackError::Api {
                status: 400,
                code: Some("generic-message".into()),
                message: "nope".into()
            }
        );
        let e =
            MemberstackError::from_body(422, br#"{"error":{"code":"invalid","message":"bad"}}"#);
        assert!(
            matches!(e, MemberstackError::Api { code: Some(ref c), ref message, .. } if c == "invalid" && message == "bad")
        );
        let e = MemberstackError::from_body(502, b"<html>Bad Gateway</html>");
        assert!(e.is_retryable());
        let e = MemberstackError::from_body(500, b"");
        assert!(
            matches!(e, MemberstackError::Api { ref message, .. } if message == "Internal Server Error")
        );
    }
}
