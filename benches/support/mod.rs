//! What every bench needs, in one place: the dev services' settings, the host (ports, paths,
//! commands, settings from the environment) and the statistics the reports print. Each bench
//! is a crate of its own that includes this module with `mod support;` and uses what it needs,
//! so items one bench leaves unused are not dead code. The integration tests' support includes
//! `host.rs` too.
#![allow(dead_code)]

pub mod host;
pub mod metrics;
pub mod process;
pub mod services;
pub mod stats;
