//! The HTTP API served by the ingest server (`docs/api.md`):
//!
//! - member routes, authorised by the Memberstack member JWT ([`auth`]):
//!   `GET /v1/members/me/sync`, `GET /v1/members/{id}/sync` (403 unless `{id}` is the caller),
//!   `POST /v1/members/me/resync`;
//! - admin routes, authorised by the admin token: `GET /v1/admin/status`, `GET /v1/admin/dlq`.
//!
//! [`router`] builds the routes; the ingest server merges them into its own router.

mod admin;
pub mod auth;
mod db;
mod member;
mod problem;
mod status;
mod sync_view;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{IntCounterVec, Opts};

use crate::config::{ApiConfig, Config, FieldMapping};
use crate::kafka::producer::Producer;
use crate::kafka::topics::Topics;
use crate::sinks::memberstack::MemberstackClient;
use crate::telemetry::Metrics;
use auth::{AdminToken, JwksError, MemberAuth};

pub use problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API: {0}")]
    Jwks(#[from] JwksError),
    #[error("API: cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Everything a request needs, shared by all of them.
pub(crate) struct ApiState {
    cfg: ApiConfig,
    /// `None`: member routes disabled (`api.enabled = false`).
    member_auth: Option<MemberAuth>,
    /// `None`: admin routes disabled (no `api.admin_token`).
    admin: Option<AdminToken>,
    /// `None`: no Memberstack API key, so no resync.
    memberstack: Option<MemberstackClient>,
    producer: Producer,
    memberstack_topic: String,
    kafka_ack_timeout: Duration,
    resync_limit: ResyncLimit,
    db: db::SharedClient,
    fields: Vec<FieldMapping>,
    config: Config,
    registry: Metrics,
    metrics: ApiMetrics,
}

/// The API's routes, sharing `producer` (and its acknowledgement timeout) with ingest.
pub fn router(
    config: &Config,
    metrics: &Metrics,
    producer: Producer,
    kafka_ack_timeout: Duration,
) -> Result<Router, ApiError> {
    let cfg = config.api.clone();
    let member_auth = if cfg.enabled {
        let auth = MemberAuth::new(&cfg)?;
        if let Some(jwks) = auth.jwks() {
            // Warm the cache so the first member does not wait for the key set.
            let jwks = Arc::clone(jwks);
            tokio::spawn(async move { jwks.refresh_if_due().await });
        }
        if cfg.audience.is_none() {
            tracing::warn!(
                "api.audience is not set: member tokens of any Memberstack app are accepted \
                 (set it to your app id, app_…)"
            );
        }
        Some(auth)
    } else {
        None
    };
    let admin = cfg.admin_token.as_ref().map(AdminToken::new);
    if admin.is_none() {
        tracing::info!("api.admin_token is not set: the /v1/admin routes answer 404");
    }
    // Same settings, hence the same rate limit, as merge's client; its own limiter, though,
    // so `run` may use up to twice the rate (resync is rare and limited per member).
    let memberstack = MemberstackClient::new(&config.memberstack, None).ok();
    let state = Arc::new(ApiState {
        member_auth,
        admin,
        memberstack,
        producer,
        memberstack_topic: Topics::new(&config.kafka.topic_prefix).memberstack(),
        kafka_ack_timeout,
        resync_limit: ResyncLimit::new(cfg.resync_min_interval()),
        db: db::SharedClient::new(config.database.clone()),
        fields: config.merge.fields.clone(),
        config: config.clone(),
        registry: metrics.clone(),
        metrics: ApiMetrics::register(metrics.registry())?,
        cfg,
    });
    Ok(Router::new()
        .route("/v1/members/me/sync", get(member::my_sync))
        .route("/v1/members/me/resync", post(member::resync))
        .route("/v1/members/{id}/sync", get(member::member_sync))
        .route("/v1/admin/status", get(admin::status))
        .route("/v1/admin/dlq", get(admin::dlq))
        .with_state(state))
}

struct ApiMetrics {
    auth: IntCounterVec,
}

impl ApiMetrics {
    fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let auth = IntCounterVec::new(
            Opts::new(
                "membersync_api_auth_total",
                "Member token checks by outcome (`ok` or the error code).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(auth.clone()))?;
        Ok(Self { auth })
    }

    fn auth(&self, error: Option<&'static str>) {
        self.auth.with_label_values(&[error.unwrap_or("ok")]).inc();
    }
}

/// At most one resync per member per interval.
struct ResyncLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

/// Forgotten members are pruned once the limiter tracks this many.
const RESYNC_LIMIT_PRUNE_AT: usize = 10_000;

impl ResyncLimit {
    fn new(interval: Duration) -> Self {
        let quota = Quota::with_period(interval.max(Duration::from_millis(1)))
            .expect("a positive period")
            .allow_burst(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when the member must wait.
    fn check(&self, member: &str) -> Result<(), Duration> {
        if self.limiter.len() > RESYNC_LIMIT_PRUNE_AT {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&member.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}
