//! Integration tests, compiled as one binary. They run against the real local services
//! (`scripts/dev-services up`) and fail loudly when those are missing.

mod api;
mod backfill;
mod bridge;
mod cdc;
mod check;
mod config;
mod debezium;
mod deploy;
mod docs;
mod ingest;
mod ingest_slowloris;
mod kafka;
mod merge;
mod migrations;
mod ops;
mod redirects;
mod rls;
mod schemas;
mod sim;
mod soak;
mod support;
mod tls;
