//! What tests and benchmarks can observe about a simulator's API traffic: a call log and
//! counters. Control endpoints (`/__sim/…`) and dashboard edits are not API calls and are not
//! recorded here.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// One API request, as answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiCall {
    pub method: String,
    /// The request path with its query string.
    pub path: String,
    /// The route template, e.g. `PATCH /members/{id}` (the per-endpoint counter key).
    pub endpoint: String,
    pub status: u16,
    /// When the request arrived.
    pub at: DateTime<Utc>,
}

/// Counters over the API calls so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub total_requests: u64,
    /// 429 answers (rate limiter and forced ones).
    pub rate_limited: u64,
    /// Calls per route template (`GET /members`, `PATCH /members/{id}`, …).
    pub per_endpoint: BTreeMap<String, u64>,
    /// Calls per answered status code.
    pub per_status: BTreeMap<u16, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct CallLog {
    inner: Mutex<(Vec<ApiCall>, Stats)>,
}

impl CallLog {
    pub fn record(&self, call: ApiCall) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (calls, stats) = &mut *guard;
        stats.total_requests += 1;
        if call.status == 429 {
            stats.rate_limited += 1;
        }
        *stats.per_endpoint.entry(call.endpoint.clone()).or_default() += 1;
        *stats.per_status.entry(call.status).or_default() += 1;
        calls.push(call);
    }

    pub fn calls(&self) -> Vec<ApiCall> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    pub fn stats(&self) -> Stats {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    pub fn clear(&self) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
    }
}
