//! Clients of the external services merge writes to: Memberstack's Admin REST API, Supabase's
//! Auth admin API and PostHog capture.

pub mod memberstack;
pub mod posthog;
pub mod retry;
pub mod supabase_auth;

mod registry;

#[cfg(test)]
mod test_server;
