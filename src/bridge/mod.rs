//! Bridge: forwards merge's outcomes (`<prefix>.sync`) to Make.com custom webhooks, per route
//! (`[bridge.routes]`), with retries, backoff and its own dead-letter topic
//! (`<prefix>.bridge.dlq`). PostHog is not the bridge's: merge sends the PostHog events, and
//! one owner keeps them from being sent twice. See docs/bridge.md.
//!
//! Data flow: [`consumer`] reads and routes records by member → [`worker`] picks the URLs
//! ([`route`]), POSTs ([`client`]) with retries, dead-letters ([`dlq`]) → the record is
//! finished and its offset may be committed.

pub mod client;
pub mod consumer;
pub mod dlq;
pub mod metrics;
pub mod route;
pub mod worker;

pub use consumer::{Bridge, BridgeError};
