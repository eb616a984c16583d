//! Ingest: Memberstack (Svix-signed) and Stripe (Stripe-signed) webhooks → Kafka.

mod conn;
pub mod envelope;
pub mod event;
pub mod gate;
pub mod metrics;
pub mod rejection;
pub mod server;
pub mod verify;

pub use server::{IngestError, IngestServer};
