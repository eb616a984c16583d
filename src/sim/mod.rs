//! Local simulators of the external SaaS membersync talks to (Memberstack Admin API and its
//! Svix-signed webhooks, Supabase Auth admin API, PostHog capture), for tests, benchmarks and
//! the local run (`membersync-sim`). They follow `docs/simulators.md`.
