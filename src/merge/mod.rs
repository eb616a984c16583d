//! Merge: consumes the Memberstack, Stripe and CDC topics as one consumer group, reconciles
//! each member's changes by field authority and `last_synced_at`, and writes the result to
//! Supabase (one transaction per change) and Memberstack (Admin REST API). See docs/merge.md.

pub mod path;

pub use path::MemberstackPath;
