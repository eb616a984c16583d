//! Merge: consumes the Memberstack, Stripe and CDC topics as one consumer group, reconciles
//! each member's changes by field authority and `last_synced_at`, and writes the result to
//! Supabase (one transaction per change) and Memberstack (Admin REST API). See docs/merge.md.
//!
//! Data flow: [`consumer`] reads and routes records by member → [`worker`] retries and
//! dead-letters → [`change`] decodes → [`apply`] locks the member, [`resolve`]s each field,
//! writes Memberstack / Supabase Auth / Postgres ([`store`]) → [`outcome`] is announced.

pub mod apply;
pub mod change;
pub mod consumer;
pub mod dlq;
pub mod metrics;
pub mod normalize;
pub mod outcome;
pub mod path;
pub mod resolve;
pub mod store;
pub mod worker;

/// The offset tracker is shared with the bridge; it lives in `kafka`.
pub use crate::kafka::offsets;
pub use consumer::{Merge, MergeError};
pub use path::MemberstackPath;
