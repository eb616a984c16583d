//! Memberstack simulator: the Admin REST API (docs/external-services.md §2), dashboard edits, and
//! Svix-signed webhooks (§1). See `docs/simulators.md`.

mod api;
mod control;
mod model;
mod rate;
mod store;
mod webhooks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::Response;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

pub use model::{Member, MemberAuth, MemberPatch, NewMember, PlanChange, PlanConnection, PlanRef};
pub use webhooks::{Delivery, DeliveryStatus};

use super::SimError;
use super::faults::{FailSpec, Faults, FaultsSnapshot};
use super::observe::{ApiCall, CallLog, Stats};
use super::server::{ApiFront, Server};
use crate::ingest::verify::SvixVerifier;
use rate::RateLimiter;
use store::Store;
use webhooks::{Outbox, Sender};

/// Memberstack's documented limit (docs/external-services.md §2).
pub const DEFAULT_RATE_LIMIT: u32 = 25;

/// Settings of a [`MemberstackSim`].
#[derive(Debug, Clone)]
pub struct MemberstackConfig {
    /// Listen address; `None` = `127.0.0.1:0`.
    pub addr: Option<SocketAddr>,
    /// The `X-API-KEY` every API request must carry.
    pub api_key: SecretString,
    /// Requests per rolling second across the API; 0 = unlimited.
    pub rate_limit: u32,
    /// Where webhooks go (membersync's `/webhooks/memberstack`); `None` = no webhooks.
    pub webhook_url: Option<String>,
    /// `whsec_<base64>` signing secret; required with `webhook_url`.
    pub webhook_secret: Option<SecretString>,
    /// Delays before each retry; after the last one the message is marked failed.
    pub webhook_backoff: Vec<Duration>,
    /// Per-attempt timeout (Svix: 15 s).
    pub webhook_timeout: Duration,
    /// `planId` → `planName`; unknown plans are named after their id.
    pub plan_names: HashMap<String, String>,
}

impl MemberstackConfig {
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            addr: None,
            api_key: SecretString::from(api_key.into()),
            rate_limit: DEFAULT_RATE_LIMIT,
            webhook_url: None,
            webhook_secret: None,
            webhook_backoff: [100, 500, 1000, 2000, 5000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            webhook_timeout: Duration::from_secs(15),
            plan_names: HashMap::new(),
        }
    }

    /// Sends webhooks to `url`, signed with `secret` (`whsec_…`).
    pub fn with_webhook(mut self, url: impl Into<String>, secret: impl Into<String>) -> Self {
        self.webhook_url = Some(url.into());
        self.webhook_secret = Some(SecretString::from(secret.into()));
        self
    }
}

pub(crate) struct Inner {
    config: MemberstackConfig,
    store: Mutex<Store>,
    outbox: Arc<Outbox>,
    faults: Faults,
    calls: CallLog,
    limiter: RateLimiter,
    shutdown: CancellationToken,
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ApiFront for Inner {
    fn faults(&self) -> &Faults {
        &self.faults
    }
    fn calls(&self) -> &CallLog {
        &self.calls
    }
    fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }
    fn fault_response(&self, status: StatusCode) -> Response {
        let code = status
            .canonical_reason()
            .unwrap_or("error")
            .to_lowercase()
            .replace(' ', "-");
        api::error(status, &code, "Injected failure (simulator).")
    }
    fn rate_limited_response(&self) -> Response {
        let mut r = api::error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests, please slow down.",
        );
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        r
    }
    fn route_template(&self, path: &str) -> String {
        // /members/<id>[/add-plan|/remove-plan]
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        match parts.as_slice() {
            ["", "members", _] => "/members/{id}".into(),
            ["", "members", _, action] => format!("/members/{{id}}/{action}"),
            _ => path.to_owned(),
        }
    }
    fn over_rate_limit(&self, now: Instant) -> bool {
        !self.limiter.admit(now)
    }
}

/// A running Memberstack simulator (API on [`MemberstackSim::base_url`], control under
/// `/__sim/`). Dropping it without [`MemberstackSim::shutdown`] leaves the tasks running
/// until the runtime ends.
pub struct MemberstackSim {
    inner: Arc<Inner>,
    server: Server,
}

impl MemberstackSim {
    pub async fn start(config: MemberstackConfig) -> Result<Self, SimError> {
        let shutdown = CancellationToken::new();
        let sender = match &config.webhook_url {
            Some(url) => {
                let secret = config
                    .webhook_secret
                    .clone()
                    .ok_or(SimError::WebhookSecretMissing)?;
                let signer = SvixVerifier::new(&[secret])?;
                let client = reqwest::Client::builder()
                    .timeout(config.webhook_timeout)
                    .build()?;
                Some((url.clone(), signer, client))
            }
            None => None,
        };
        let outbox = Arc::new(Outbox::new(sender.is_some()));
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::new(config.plan_names.clone(), outbox.clone())),
            outbox: outbox.clone(),
            faults: Faults::default(),
            calls: CallLog::default(),
            limiter: RateLimiter::new(config.rate_limit),
            shutdown: shutdown.clone(),
            config,
        });
        let router = api::routes(inner.clone()).merge(control::routes(inner.clone()));
        let server = Server::spawn(inner.config.addr, router, shutdown.clone()).await?;
        if let Some((url, signer, client)) = sender {
            let sender = Sender {
                outbox,
                client,
                url,
                signer,
                backoff: inner.config.webhook_backoff.clone(),
                shutdown: shutdown.clone(),
            };
            // Shutdown also abandons an attempt in flight (it could take the full timeout).
            tokio::spawn(async move {
                tokio::select! {
                    () = sender.run() => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
        Ok(Self { inner, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:<port>`, the stand-in for `https://admin.memberstack.com`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Stops the server and the webhook sender (undelivered webhooks are dropped).
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }

    // --- faults ---

    /// The next `count` API requests answer `status` with a `{code, message}` body.
    pub fn fail_next(&self, count: u32, status: u16) {
        self.inner.faults.fail_next(FailSpec {
            count,
            status,
            body: None,
        });
    }
    pub fn fail_next_with(&self, spec: FailSpec) {
        self.inner.faults.fail_next(spec);
    }
    /// Delay added before every API response (0 to remove).
    pub fn set_latency(&self, latency: Duration) {
        self.inner.faults.set_latency(latency);
    }
    /// The next `count` API requests never answer (until shutdown).
    pub fn hang_next(&self, count: u32) {
        self.inner.faults.hang_next(count);
    }
    /// The next `count` API requests answer 429.
    pub fn rate_limit_next(&self, count: u32) {
        self.inner.faults.rate_limit_next(count);
    }
    pub fn reset_faults(&self) {
        self.inner.faults.reset();
    }
    pub fn faults(&self) -> FaultsSnapshot {
        self.inner.faults.snapshot()
    }

    // --- observation ---

    pub fn stats(&self) -> Stats {
        self.inner.calls.stats()
    }
    pub fn calls(&self) -> Vec<ApiCall> {
        self.inner.calls.calls()
    }
    /// Forgets the call log and counters.
    pub fn clear_calls(&self) {
        self.inner.calls.clear();
    }
    /// Every member, in creation order.
    pub fn members(&self) -> Vec<Member> {
        self.inner.store().all()
    }
    pub fn member(&self, id: &str) -> Option<Member> {
        self.inner.store().get(id).cloned()
    }
    pub fn member_by_email(&self, email: &str) -> Option<Member> {
        self.inner.store().find(email).cloned()
    }
    /// Unix ms of the member's last change (= the `timestamp` of its last webhook).
    pub fn last_changed_ms(&self, id: &str) -> Option<i64> {
        self.inner.store().changed_ms(id)
    }

    // --- dashboard edits (not API calls; webhooks fire) ---

    pub fn dashboard_create(&self, new: NewMember) -> Result<Member, SimError> {
        self.inner.store().create(new)
    }
    pub fn dashboard_update(&self, id: &str, patch: &MemberPatch) -> Result<Member, SimError> {
        self.inner.store().update(id, patch)
    }
    /// `Ok(None)` when the change was a no-op (no webhook).
    pub fn dashboard_plan(
        &self,
        id: &str,
        change: PlanChange,
    ) -> Result<Option<PlanConnection>, SimError> {
        self.inner.store().change_plan(id, change, false)
    }
    /// The member's Stripe customer, as a Stripe checkout sets it (no webhook of its own; the
    /// plan the checkout adds sends one).
    pub fn dashboard_stripe_customer(&self, id: &str, customer: &str) -> Result<(), SimError> {
        self.inner.store().set_stripe_customer(id, customer)
    }
    pub fn dashboard_delete(&self, id: &str) -> Result<(), SimError> {
        self.inner.store().delete(id)
    }

    // --- webhooks ---

    /// Every webhook message queued so far, with its outcome.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.outbox.deliveries()
    }
    pub fn pause_webhooks(&self) {
        self.inner.outbox.set_paused(true);
    }
    pub fn resume_webhooks(&self) {
        self.inner.outbox.set_paused(false);
    }
    /// Waits until every queued webhook was delivered or marked failed.
    pub async fn wait_webhooks_quiescent(&self, timeout: Duration) -> Result<(), SimError> {
        self.inner.outbox.wait_quiescent(timeout).await
    }
}
