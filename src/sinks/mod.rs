//! Clients of the external services merge writes to: Memberstack's Admin REST API, Supabase's
//! Auth admin API and PostHog capture.
