//! Memberstack's limit: at most N requests per rolling one-second window ("25
//! requests/second", docs/external-services.md §2.1). Only admitted requests occupy the window,
//! so a client that backs off after a 429 gets through once older requests age out.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// 0 disables the limit.
    limit: u32,
    admitted: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            admitted: Mutex::new(VecDeque::new()),
        }
    }

    /// Admits (and counts) the request, or returns `false` when the window is full.
    pub fn admit(&self, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut q = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            q.pop_front();
        }
        if q.len() >= self.limit as usize {
            return false;
        }
        q.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_window() {
        let r = RateLimiter::new(2);
        let t0 = Instant::now();
        assert!(r.admit(t0));
        assert!(r.admit(t0 + Duration::from_millis(500)));
        assert!(!r.admit(t0 + Duration::from_millis(900)));
        assert!(r.admit(t0 + Duration::from_millis(1000)));
        assert!(!r.admit(t0 + Duration::from_millis(1400)));
        assert!(RateLimiter::new(0).admit(t0));
    }
}
