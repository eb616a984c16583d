//! Liveness: each role's main loop beats a per-role heartbeat; `/healthz` answers 503 naming
//! a role that has not beaten for `telemetry.liveness_timeout_secs`, or whose task ended, so
//! that a supervisor restarts a process with a wedged role (a loop blocked on a future that
//! never resolves) while the process itself still answers.
//!
//! A loop beats on every turn and on a periodic tick while idle; waiting out an outage
//! (backoff, a full producer queue, a standby polling for leadership) keeps turning, so it
//! keeps beating. Only a loop that stops turning goes silent.
//!
//! The registry is process-wide: the keyed consumer (merge, bridge) finds its role's
//! heartbeat by name, without every constructor in between carrying it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One role's heartbeat. `Heartbeat::detached()` beats into nothing (code run outside the
/// daemon, unit tests).
#[derive(Clone, Default)]
pub struct Heartbeat(Option<Arc<Beat>>);

struct Beat {
    /// Milliseconds since the registry's epoch at the last beat.
    last_ms: AtomicU64,
    ended: AtomicBool,
}

impl Heartbeat {
    pub fn detached() -> Self {
        Self(None)
    }

    /// The loop made progress (or turned while idle).
    pub fn beat(&self) {
        if let Some(b) = &self.0 {
            b.last_ms.store(registry().now_ms(), Ordering::Relaxed);
        }
    }

    /// The role's task is gone (it returned or panicked outside a shutdown).
    pub fn end(&self) {
        if let Some(b) = &self.0 {
            b.ended.store(true, Ordering::Relaxed);
        }
    }
}

/// The process's roles and how long a silent one may stay silent.
pub struct Registry {
    epoch: Instant,
    timeout_ms: AtomicU64,
    roles: Mutex<Vec<(&'static str, Arc<Beat>)>>,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        epoch: Instant::now(),
        timeout_ms: AtomicU64::new(DEFAULT_TIMEOUT.as_millis() as u64),
        roles: Mutex::new(Vec::new()),
    })
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }
}

/// Sets the timeout (`telemetry.liveness_timeout_secs`); the daemon calls it at start.
pub fn set_timeout(timeout: Duration) {
    registry()
        .timeout_ms
        .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
}

/// How often an idle loop beats: a quarter of the timeout (so that a slow turn or two is not
/// mistaken for a wedge), at most every 5 s.
pub fn period() -> Duration {
    (registry().timeout() / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// `role`'s heartbeat, registered (and counted as beating now) on first use.
pub fn heartbeat(role: &'static str) -> Heartbeat {
    let reg = registry();
    let mut roles = reg.roles.lock().expect("liveness");
    if let Some((_, b)) = roles.iter().find(|(r, _)| *r == role) {
        return Heartbeat(Some(Arc::clone(b)));
    }
    let beat = Arc::new(Beat {
        last_ms: AtomicU64::new(reg.now_ms()),
        ended: AtomicBool::new(false),
    });
    roles.push((role, Arc::clone(&beat)));
    Heartbeat(Some(beat))
}

/// The roles that are not alive, each with the reason: silent for longer than the timeout, or
/// their task ended. Empty: alive.
pub fn dead_roles() -> Vec<(&'static str, String)> {
    let reg = registry();
    dead_at(reg, reg.now_ms())
}

fn dead_at(reg: &Registry, now: u64) -> Vec<(&'static str, String)> {
    let timeout = reg.timeout();
    let roles = reg.roles.lock().expect("liveness");
    roles
        .iter()
        .filter_map(|(role, b)| {
            if b.ended.load(Ordering::Relaxed) {
                return Some((*role, "its task ended".to_owned()));
            }
            let silent = Duration::from_millis(now.saturating_sub(b.last_ms.load(Ordering::Relaxed)));
            (silent > timeout).then(|| {
                (
                    *role,
                    format!(
                        "no heartbeat for {}s (telemetry.liveness_timeout_secs = {}): its loop is wedged",
                        silent.as_secs(),
                        timeout.as_secs()
                    ),
                )
            })
        })
        .collect()
}

/// Sleeps `d` (or until `cancel`), beating every [`period`] meanwhile: a loop waiting out an
/// outage is not wedged.
pub async fn sleep_beating(
    heartbeat: &Heartbeat,
    d: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) {
    let until = tokio::time::Instant::now() + d;
    loop {
        heartbeat.beat();
        let now = tokio::time::Instant::now();
        if now >= until {
            return;
        }
        let step = period().min(until - now);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(step) => {}
        }
    }
}

/// Awaits `work`, beating every [`period`] meanwhile: for a step that may legitimately wait
/// long on the other side (Postgres creating a slot waits for older transactions to end).
pub async fn beating_while<T>(heartbeat: &Heartbeat, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(period());
    loop {
        tokio::select! {
            out = &mut work => {
                heartbeat.beat();
                return out;
            }
            _ = tick.tick() => heartbeat.beat(),
        }
    }
}

/// Debug builds only (the integration tests run them): with `MEMBERSYNC_TEST_WEDGE_ROLE` =
/// `role` and `MEMBERSYNC_TEST_WEDGE_AFTER_MS` = N, the first call from `role`'s loop N ms
/// or more after the start never returns — the loop wedges on a future that never resolves,
/// the way a stuck call would.
#[cfg(debug_assertions)]
pub async fn test_wedge(role: &str) {
    static WEDGE: OnceLock<Option<(String, Duration)>> = OnceLock::new();
    let wedge = WEDGE.get_or_init(|| {
        let role = std::env::var("MEMBERSYNC_TEST_WEDGE_ROLE").ok()?;
        let ms = std::env::var("MEMBERSYNC_TEST_WEDGE_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Some((role, Duration::from_millis(ms)))
    });
    if let Some((wedged, after)) = wedge
        && wedged == role
        && registry().epoch.elapsed() >= *after
    {
        tracing::warn!(role, "MEMBERSYNC_TEST_WEDGE: this role's loop wedges now");
        std::future::pending::<()>().await;
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn test_wedge(_role: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_or_ended_role_is_dead_and_a_beating_one_is_not() {
        // The registry is process-wide: these roles are this test's own.
        let quiet = heartbeat("test-quiet");
        let ended = heartbeat("test-ended");
        let lively = heartbeat("test-lively");
        let reg = registry();
        let dead_at = |role, now| dead_at(reg, now).into_iter().find(|(r, _)| *r == role);
        let now = reg.now_ms();
        assert!(dead_at("test-quiet", now).is_none() && dead_at("test-ended", now).is_none());
        ended.end();
        assert!(dead_at("test-ended", now).unwrap().1.contains("ended"));
        // A timeout later, the one that did not beat is dead; the one that did is not.
        let later = now + reg.timeout().as_millis() as u64 + 1;
        lively
            .0
            .as_ref()
            .unwrap()
            .last_ms
            .store(later, Ordering::Relaxed);
        let quiet_reason = dead_at("test-quiet", later).unwrap().1;
        assert!(quiet_reason.contains("no heartbeat"), "{quiet_reason}");
        assert!(dead_at("test-lively", later).is_none());
        quiet.beat();
        Heartbeat::detached().beat();
    }
}
