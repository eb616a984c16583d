//! Merge: consumes the Memberstack, Stripe and CDC topics as one consumer group, reconciles
//! each member's changes by field authority and `last_synced_at`, and writes the result to
//! Supabase (one short transaction per change) and, through the outbox, Supabase Auth and
//! Memberstack (Admin REST API). See docs/merge.md.
//!
//! Data flow: [`consumer`] reads and routes records by member → [`worker`] retries and
//! dead-letters → [`change`] decodes → [`apply`] locks the member, [`resolve`]s each field and
//! commits, in one short transaction with no network I/O, the row ([`store`]), the desired
//! Memberstack / Supabase Auth state and the [`outcome`] ([`outbox`]) → the outbox's appliers
//! push to Memberstack and Supabase Auth, and its relay announces the outcome.

pub mod apply;
pub mod change;
pub mod consumer;
pub mod dlq;
pub mod metrics;
pub mod normalize;
pub mod outbox;
pub mod outcome;
pub mod path;
pub mod report;
pub mod resolve;
pub mod store;
pub mod worker;

/// The offset tracker is shared with the bridge; it lives in `kafka`.
pub use crate::kafka::offsets;
pub use consumer::{Merge, MergeError};
pub use path::MemberstackPath;
