//! Fault injection shared by the simulators: the next N requests fail, hang or are refused
//! with 429, and every response can be delayed. Faults only apply to the simulated API, never
//! to the `/__sim/` control endpoints, so a test can always undo what it set up.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// "Fail the next `count` requests with `status`", optionally with a custom JSON body
/// (otherwise the simulator's own error shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailSpec {
    pub count: u32,
    pub status: u16,
    #[serde(default)]
    pub body: Option<Value>,
}

/// The faults currently armed (also the body of `GET /__sim/faults`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultsSnapshot {
    pub fail: Option<FailSpec>,
    pub latency_ms: u64,
    pub hang_next: u32,
    pub rate_limit_next: u32,
}

/// What the middleware must do with one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fault {
    /// Answer with this status and (optional) custom body.
    Fail(u16, Option<Value>),
    /// Answer 429.
    RateLimited,
    /// Never answer (until the simulator shuts down).
    Hang,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    state: Mutex<FaultsSnapshot>,
}

impl Faults {
    pub fn fail_next(&self, spec: FailSpec) {
        self.lock().fail = (spec.count > 0).then_some(spec);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    }

    pub fn hang_next(&self, count: u32) {
        self.lock().hang_next = count;
    }

    pub fn rate_limit_next(&self, count: u32) {
        self.lock().rate_limit_next = count;
    }

    pub fn reset(&self) {
        *self.lock() = FaultsSnapshot::default();
    }

    pub fn snapshot(&self) -> FaultsSnapshot {
        self.lock().clone()
    }

    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.lock().latency_ms)
    }

    /// Consumes one armed fault, if any. Order: forced 429, then failure, then hang, so that a
    /// test arming several sees each one in a predictable order.
    pub fn take(&self) -> Option<Fault> {
        let mut s = self.lock();
        if s.rate_limit_next > 0 {
            s.rate_limit_next -= 1;
            return Some(Fault::RateLimited);
        }
        if let Some(fail) = s.fail.as_mut() {
            fail.count -= 1;
            let fault = Fault::Fail(fail.status, fail.body.clone());
            if fail.count == 0 {
                s.fail = None;
            }
            return Some(fault);
        }
        if s.hang_next > 0 {
            s.hang_next -= 1;
            return Some(Fault::Hang);
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultsSnapshot> {
        // A panic while holding this lock cannot leave the counters half-updated in a way
        // that matters for a simulator; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sleeps "forever": until the simulator shuts down, so that graceful shutdown is not held up
/// by a hanging request. A client sees no answer until its own timeout fires.
pub(crate) async fn hang(shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(Duration::from_secs(3600)) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_consumed_in_order() {
        let f = Faults::default();
        f.fail_next(FailSpec {
            count: 2,
            status: 503,
            body: None,
        });
        f.rate_limit_next(1);
        f.hang_next(1);
        assert_eq!(f.take(), Some(Fault::RateLimited));
        assert_eq!(f.take(), Some(Fault::Fail(503, None)));
        assert_eq!(f.take(), Some(Fault::Fail(503, None)));
        assert_eq!(f.take(), Some(Fault::Hang));
        assert_eq!(f.take(), None);
        f.set_latency(Duration::from_millis(20));
        f.reset();
        assert_eq!(f.snapshot(), FaultsSnapshot::default());
    }
}
