//! The code under fuzzing, compiled from the main crate's source files.

#[path = "../../src/ingest/event.rs"]
pub mod event;

#[path = "../../src/ingest/verify/mod.rs"]
pub mod verify;
