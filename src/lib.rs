//! membersync: keeps Memberstack members and a Supabase (PostgreSQL) database in sync, in both
//! directions, through Kafka. See `docs/architecture.md` for the data flow.

pub mod api;
pub mod backfill;
pub mod bridge;
pub mod cdc;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod merge;
pub mod shutdown;
pub mod sim;
pub mod sinks;
pub mod telemetry;
