//! The daemon's share of Memberstack's rate limit, shared by every clone of the client.
//!
//! Two parts:
//! - **spacing** (a `governor` limiter with a burst of one): consecutive requests at least
//!   `permit_interval` apart, so any rolling second holds at most the limit and the budget is
//!   spent evenly rather than in a burst at the start of each second;
//! - **a shared pause after a 429**: a 429 means someone else spends the same key's budget (another
//!   process, a script) or the server counts differently. Every request of the client then
//!   waits for the server's `Retry-After` — one second when it gives none, the server's window —
//!   instead of each of the merge lanes discovering the limit on its own and adding to it.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// The server's window, and the pause after a 429 without `Retry-After`.
const WINDOW: Duration = Duration::from_secs(1);

/// The limiter's permit spacing for `rps` requests per second.
///
/// A token bucket with burst = rps allows a full burst at the start of a second plus the
/// steady refill, i.e. up to ~2×rps inside one rolling second as the server counts it. So the
/// bucket holds a single token (burst 1) refilled every `1/rps`: consecutive requests are at
/// least `1/rps` apart, which bounds any rolling second to `rps` requests. The extra 1/40 of
/// an interval absorbs network jitter that can bunch requests up on the way to the server
/// (at 25/s: 41 ms spacing, so 25 requests span 1.025 s and tolerate 25 ms of skew).
pub(crate) fn permit_interval(rps: u32) -> Duration {
    let rps = rps.max(1);
    let interval = WINDOW / rps;
    interval + interval / 40
}

#[derive(Debug)]
pub(crate) struct SendBudget {
    limiter: DefaultDirectRateLimiter,
    /// No request leaves before this instant (set by a 429).
    paused_until: Mutex<Option<Instant>>,
}

impl SendBudget {
    /// A budget of `rps` requests per second (at least 1).
    pub fn per_second(rps: u32) -> Self {
        let quota = Quota::with_period(permit_interval(rps))
            .expect("permit_interval is never zero")
            .allow_burst(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct(quota),
            paused_until: Mutex::new(None),
        }
    }

    /// Waits until a request may leave.
    pub async fn acquire(&self) {
        loop {
            if let Some(until) = self.paused() {
                tokio::time::sleep_until(until).await;
            }
            self.limiter.until_ready().await;
            // A 429 that arrived while this request waited for its permit holds it too.
            if self.paused().is_none() {
                return;
            }
        }
    }

    /// Holds every request back for `retry_after` (one window when the server gave none).
    pub fn pause(&self, retry_after: Option<Duration>) {
        let until = Instant::now() + retry_after.unwrap_or(WINDOW);
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// The end of a pause still running.
    fn paused(&self) -> Option<Instant> {
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        match *paused {
            Some(until) if until > Instant::now() => Some(until),
            _ => {
                *paused = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permit_interval_is_never_faster_than_the_limit() {
        assert!(permit_interval(25) >= Duration::from_millis(40));
        assert!(permit_interval(0) >= WINDOW);
        // The merge bench's acceptance: pacing at ≥ 95 % of the limit.
        assert!(1.0 / permit_interval(25).as_secs_f64() >= 0.95 * 25.0);
    }

    #[tokio::test]
    async fn a_429_pauses_every_request_for_its_retry_after() {
        let budget = std::sync::Arc::new(SendBudget::per_second(1_000));
        budget.acquire().await;
        let paused_at = Instant::now();
        budget.pause(Some(Duration::from_millis(300)));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move {
                    budget.acquire().await;
                    Instant::now()
                })
            })
            .collect();
        for w in waiters {
            assert!(w.await.unwrap() - paused_at >= Duration::from_millis(300));
        }
        budget.pause(None);
        let again = Instant::now();
        budget.acquire().await;
        assert!(
            Instant::now() - again >= WINDOW,
            "no Retry-After: one window"
        );
        budget.pause(Some(Duration::from_secs(60)));
        budget.pause(Some(Duration::from_millis(1)));
        assert!(
            budget.paused().unwrap() - Instant::now() > Duration::from_secs(30),
            "a shorter pause never cuts a longer one"
        );
    }
}
