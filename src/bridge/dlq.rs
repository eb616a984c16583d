//! The bridge's own dead-letter topic (`<prefix>.bridge.dlq`, schema
//! `schemas/kafka/bridge-dlq.json`): one record per outcome and URL that could not be
//! delivered (attempts exhausted, a permanent answer, an excessive `Retry-After`), or per
//! record that is not an outcome at all. It holds the whole outcome, so nothing is lost (an
//! outcome too large for a dead letter stays readable at its origin, which the letter names);
//! merge's `<prefix>.dlq` is a different topic with a different owner.

use base64::Engine as _;
use chrono::{SecondsFormat, Utc};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::merge::change::Position;

pub const SCHEMA_VERSION: u32 = 1;

const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_6d62_6572_7379_6e63_6272_6467_0001);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeError {
    /// `http_status` (see `status`), `timeout`, `transport`, `retry_after_too_long` or
    /// `decode` (the record is not an outcome).
    pub kind: String,
    /// Never contains the URL (it holds the hook's token).
    pub message: String,
    /// The HTTP status of the last answer, if there was one.
    pub status: Option<u16>,
    /// Whether the last failure was of a retryable kind (then the attempts ran out).
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeDeadLetter {
    pub schema_version: u32,
    /// Stable per origin record and URL: `uuid_v5(topic/partition/offset/route/index)`, so a
    /// record dead-lettered again after a restart has the same id.
    pub id: String,
    pub failed_at: String,
    /// The route (`[bridge.routes.<name>]`); `null` for an undecodable record.
    pub route: Option<String>,
    /// `host[:port]` of the webhook URL (never the path: it is the hook's token).
    pub url_host: Option<String>,
    pub error: BridgeError,
    pub attempts: u32,
    pub origin: Position,
    pub key: Option<String>,
    pub outcome_id: Option<String>,
    pub event_id: Option<String>,
    /// The outcome as read, when it is JSON …
    pub outcome: Option<Value>,
    /// … else its bytes, base64.
    pub outcome_base64: Option<String>,
}

/// Which URL of which route failed.
pub struct Failed<'a> {
    pub route: &'a str,
    pub index: usize,
    pub host: &'a str,
}

impl BridgeDeadLetter {
    pub fn new(
        message: &OwnedMessage,
        target: Option<Failed<'_>>,
        error: BridgeError,
        attempts: u32,
        ids: Option<(&str, &str)>,
    ) -> Self {
        let origin = Position {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let which = target
            .as_ref()
            .map_or_else(String::new, |t| format!("/{}/{}", t.route, t.index));
        let id = uuid::Uuid::new_v5(
            &NAMESPACE,
            format!(
                "{}/{}/{}{which}",
                origin.topic, origin.partition, origin.offset
            )
            .as_bytes(),
        );
        let payload = message.payload();
        let outcome = payload.and_then(|p| serde_json::from_slice::<Value>(p).ok());
        let outcome_base64 = match (&outcome, payload) {
            (None, Some(p)) => Some(base64::engine::general_purpose::STANDARD.encode(p)),
            _ => None,
        };
        Self {
            schema_version: SCHEMA_VERSION,
            id: id.to_string(),
            failed_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            route: target.as_ref().map(|t| t.route.to_owned()),
            url_host: target.as_ref().map(|t| t.host.to_owned()),
            error,
            attempts,
            origin,
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            outcome_id: ids.map(|(id, _)| id.to_owned()),
            event_id: ids.map(|(_, e)| e.to_owned()),
            outcome,
            outcome_base64,
        }
    }

    /// A dead letter that Kafka refused as too large (an outcome near the record limit): the
    /// same letter without the outcome, which stays readable at its origin (topic, partition,
    /// offset). `None` when there is nothing left to cut.
    pub fn shrink(payload: &[u8]) -> Option<Vec<u8>> {
        let mut letter: BridgeDeadLetter = serde_json::from_slice(payload).ok()?;
        if letter.outcome.is_none() && letter.outcome_base64.is_none() {
            return None;
        }
        letter.outcome = None;
        letter.outcome_base64 = None;
        letter
            .error
            .message
            .push_str(" (the outcome is left out: too large; read it at the origin)");
        serde_json::to_vec(&letter).ok()
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;

    use super::*;

    #[test]
    fn shrinking_drops_the_outcome_and_keeps_its_origin() {
        let message = OwnedMessage::new(
            Some(format!(r#"{{"id":"o1","big":"{}"}}"#, "x".repeat(10_000)).into_bytes()),
            Some(b"mem_1".to_vec()),
            "p.sync".into(),
            Timestamp::NotAvailable,
            2,
            40,
            None,
        );
        let error = BridgeError {
            kind: "http_status".into(),
            message: "410".into(),
            status: Some(410),
            retryable: false,
        };
        let letter = BridgeDeadLetter::new(&message, None, error, 1, Some(("o1", "e1")));
        let full = serde_json::to_vec(&letter).unwrap();
        let small = BridgeDeadLetter::shrink(&full).expect("the outcome can go");
        assert!(small.len() < full.len());
        let shrunk: BridgeDeadLetter = serde_json::from_slice(&small).unwrap();
        assert_eq!(shrunk.outcome, None);
        assert_eq!(shrunk.origin, letter.origin);
        assert_eq!(shrunk.id, letter.id);
        assert!(
            BridgeDeadLetter::shrink(&small).is_none(),
            "nothing left to cut"
        );
    }
}
