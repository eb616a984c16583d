//! Sections for the merge role and the services it writes to: `[merge]` (consumer, workers,
//! retries, field mapping), `[memberstack]` (Admin REST API), `[supabase]` (Auth admin API)
//! and `[posthog]`. Documented in `docs/configuration.md` and `docs/merge.md`.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Which side's value wins when the two disagree (docs/sync-policy.md §2, docs/merge.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Authority {
    /// Memberstack owns the field: identity, email, subscription.
    Memberstack,
    /// Supabase owns the field: application data.
    Supabase,
    /// The newer change wins, by the change's own timestamp.
    Latest,
}

impl Authority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memberstack => "memberstack",
            Self::Supabase => "supabase",
            Self::Latest => "latest",
        }
    }
}

/// How a field's values are compared and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Compared and stored as they are.
    None,
    /// Plan status: compared case-insensitively and mapped to active | inactive | cancelled |
    /// free (sync rules); the raw value goes to `<column>_raw` when that column exists.
    PlanStatus,
    /// A JSON object whose scalar values compare equal across string and number (`1` = `"1"`),
    /// as Memberstack custom fields are strings while Postgres may hold numbers.
    CustomFields,
    /// Text compared case-insensitively (emails).
    CaseInsensitive,
}

/// One synced field: where it lives on each side and who owns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// The field's name in `sync_state`, logs and outcomes.
    pub name: String,
    /// Path in the Memberstack member: `auth.email`, `customFields` (the whole object),
    /// `customFields.<key>`, `metaData.<key>`, `json.<key>`, `planConnection.status`,
    /// `planConnection.planId` (the member's first active plan connection, else its first).
    pub memberstack: String,
    /// Column of `public.members`.
    pub supabase: String,
    pub authority: Authority,
    #[serde(default = "normalize_none")]
    pub normalize: Normalize,
}

fn normalize_none() -> Normalize {
    Normalize::None
}

/// What `member.deleted` does to the Supabase row. (No hard delete: the daemon's role has no
/// DELETE on `members`, and the row's history stays queryable.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// Set `deleted_at` (and keep the row and its history).
    Soft,
    /// Only log it.
    Ignore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MergeConfig {
    /// The Kafka consumer group every merge instance joins.
    pub group_id: String,
    /// Topics consumed; empty means `<prefix>.memberstack`, `<prefix>.stripe` and
    /// `<prefix>.cdc.public.members`.
    pub topics: Vec<String>,
    /// Members processed at once (a member's changes are always processed in order).
    pub workers: usize,
    /// Records fetched but not yet finished, at most (backpressure on the consumer).
    pub max_in_flight: usize,
    /// Failed attempts after which a change (or a pending push) is reported late
    /// (`error_logs` `sync_failed`, PostHog `sync_failed`); infrastructure errors keep being
    /// retried after that, however long the outage. Only poison and permanent errors are
    /// dead-lettered.
    pub max_attempts: u32,
    /// Backoff before the 2nd, 3rd, … attempt: `backoff_base_ms × 2^(attempt-1)`, capped at
    /// `backoff_max_ms`, then jittered between half and all of it (so about 2 s, 4 s, 8 s with
    /// the defaults: the sync rules' three retries).
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How often finished offsets are committed to Kafka.
    pub commit_interval_ms: u64,
    /// How long the broker may hold a fetch waiting for records (librdkafka
    /// `fetch.wait.max.ms`): the upper bound of the consumer's added latency when idle.
    pub fetch_wait_max_ms: u64,
    /// librdkafka `session.timeout.ms`: how long the group waits for a crashed instance (a
    /// SIGKILL, an OOM kill) before its partitions go to another one or to its restart.
    pub session_timeout_ms: u64,
    /// A value we pushed to Memberstack is recognised in its webhook for this long.
    pub echo_window_secs: u64,
    pub on_member_deleted: DeleteMode,
    /// Create the Supabase auth user for a new member (needs `[supabase]`).
    pub create_auth_users: bool,
    /// Memberstack pushes in flight at once (all within the shared requests-per-second budget).
    pub push_lanes: usize,
    /// Supabase Auth calls in flight at once.
    pub auth_lanes: usize,
    /// One member's pushes are at least this far apart: edits made meanwhile are coalesced
    /// into the next PATCH, and a member editing in a loop gets its share of the budget, not
    /// all of it.
    pub member_push_interval_ms: u64,
    /// How long an applier's claim on a pending push lasts if its session stays up (a claim
    /// whose Postgres session is gone, e.g. after a kill -9, is free at once).
    pub claim_lease_secs: u64,
    /// How often idle appliers and the outcome relay look for work other merge instances
    /// committed (work committed by this instance wakes them at once).
    pub poll_interval_ms: u64,
    /// A Supabase Auth change that conflicts with another user (the email belongs to another
    /// auth user, or to an unconfirmed or already linked one) is not dead-lettered: it is
    /// recorded as a conflict and tried again this often (a newer email supersedes it).
    pub conflict_retry_secs: u64,
    /// Push a Memberstack email change into the member's auth user even when Memberstack does
    /// not report the new email verified (`verified: false`). Off: the auth user keeps its
    /// email until Memberstack reports the new one verified.
    pub sync_unverified_emails: bool,
    /// Who wins a `latest` field when both sides changed it at exactly the same time
    /// (the sync rules: Supabase).
    pub tie_winner: TieWinner,
    pub fields: Vec<FieldMapping>,
}

/// The winner of an exact timestamp tie of a `latest` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TieWinner {
    #[default]
    Supabase,
    Memberstack,
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            group_id: "membersync-merge".into(),
            topics: Vec::new(),
            workers: 16,
            max_in_flight: 1_000,
            max_attempts: 3,
            backoff_base_ms: 2_000,
            backoff_max_ms: 60_000,
            commit_interval_ms: 1_000,
            fetch_wait_max_ms: 100,
            session_timeout_ms: 45_000,
            echo_window_secs: 600,
            on_member_deleted: DeleteMode::Soft,
            create_auth_users: true,
            push_lanes: 8,
            auth_lanes: 8,
            member_push_interval_ms: 2_000,
            claim_lease_secs: 600,
            poll_interval_ms: 500,
            conflict_retry_secs: 3_600,
            sync_unverified_emails: false,
            tie_winner: TieWinner::Supabase,
            fields: default_fields(),
        }
    }
}

impl MergeConfig {
    /// The wait before attempt `attempt + 1`: capped exponential backoff with jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        crate::merge::report::jittered(
            Duration::from_millis(self.backoff_base_ms),
            Duration::from_millis(self.backoff_max_ms),
            attempt,
        )
    }

    pub fn field(&self, name: &str) -> Option<&FieldMapping> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// The sync rules' defaults: Memberstack owns identity and subscription, Supabase owns
/// application data, custom fields follow the newer change.
pub fn default_fields() -> Vec<FieldMapping> {
    let field = |name: &str, ms: &str, sb: &str, authority, normalize| FieldMapping {
        name: name.into(),
        memberstack: ms.into(),
        supabase: sb.into(),
        authority,
        normalize,
    };
    vec![
        field(
            "email",
            "auth.email",
            "email",
            Authority::Memberstack,
            Normalize::CaseInsensitive,
        ),
        field(
            "subscription_status",
            "planConnection.status",
            "subscription_status",
            Authority::Memberstack,
            Normalize::PlanStatus,
        ),
        field(
            "plan_id",
            "planConnection.planId",
            "plan_id",
            Authority::Memberstack,
            Normalize::None,
        ),
        field(
            "custom_fields",
            "customFields",
            "custom_fields",
            Authority::Latest,
            Normalize::CustomFields,
        ),
        field(
            "project_data",
            "metaData.project_data",
            "project_data",
            Authority::Supabase,
            Normalize::None,
        ),
        field(
            "usage_stats",
            "metaData.usage_stats",
            "usage_stats",
            Authority::Supabase,
            Normalize::None,
        ),
    ]
}

/// Memberstack's Admin REST API (docs/external-services.md §2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemberstackConfig {
    pub api_url: String,
    /// Secret (`sk_…`): only from `MEMBERSYNC__MEMBERSTACK__API_KEY` or `api_key_file`.
    /// Unset: nothing is written to Memberstack (merge runs one-way and says so).
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    /// Requests per second across every call of this process (Memberstack allows 25).
    pub requests_per_second: u32,
    pub request_timeout_ms: u64,
    /// Attempts per call on 429, 5xx and transport errors (with backoff and jitter).
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for MemberstackConfig {
    fn default() -> Self {
        Self {
            api_url: "https://admin.memberstack.com".into(),
            api_key: None,
            api_key_file: None,
            requests_per_second: 25,
            request_timeout_ms: 10_000,
            max_attempts: 5,
            backoff_base_ms: 200,
            backoff_max_ms: 10_000,
        }
    }
}

impl MemberstackConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Supabase's Auth (GoTrue) admin API, for creating and updating auth users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupabaseConfig {
    /// The project URL (`https://<ref>.supabase.co`); `/auth/v1/admin/users` is appended.
    /// Unset: auth users are not created.
    pub url: Option<String>,
    /// Secret: the service-role key, only from `MEMBERSYNC__SUPABASE__SERVICE_ROLE_KEY` or
    /// `service_role_key_file`.
    pub service_role_key: Option<SecretString>,
    pub service_role_key_file: Option<PathBuf>,
    pub request_timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
}

impl Default for SupabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            service_role_key: None,
            service_role_key_file: None,
            request_timeout_ms: 10_000,
            max_attempts: 3,
            backoff_base_ms: 200,
        }
    }
}

impl SupabaseConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// PostHog capture (docs/external-services.md §5). Off unless `api_key` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostHogConfig {
    pub host: String,
    /// The project API key (`phc_…`). It is public by PostHog's design (web pages embed it),
    /// so it may live in the file. Unset: no events are sent.
    pub api_key: Option<String>,
    /// Events per `/batch/` request at most.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    pub flush_interval_ms: u64,
    /// Events waiting to be sent at most; beyond it new events are dropped and counted
    /// (analytics never hold back a sync).
    pub queue_capacity: usize,
    pub request_timeout_ms: u64,
    pub max_attempts: u32,
}

impl Default for PostHogConfig {
    fn default() -> Self {
        Self {
            host: "https://us.i.posthog.com".into(),
            api_key: None,
            batch_size: 100,
            flush_interval_ms: 1_000,
            queue_capacity: 10_000,
            request_timeout_ms: 10_000,
            max_attempts: 3,
        }
    }
}
