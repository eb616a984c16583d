//! Local simulators of the external SaaS membersync talks to (Memberstack Admin API and its
//! Svix-signed webhooks, Supabase Auth admin API, PostHog capture, Make.com custom webhooks),
//! for tests, benchmarks and the local run (`membersync-sim`). They follow
//! `docs/simulators.md`.

mod error;
mod faults;
mod observe;
mod server;

pub mod make;
pub mod memberstack;
pub mod posthog;
pub mod supabase_auth;

pub use error::SimError;
pub use faults::{FailSpec, FaultsSnapshot};
pub use observe::{ApiCall, Stats};
