//! The LSN acknowledgement rule (docs/cdc.md): the LSN confirmed to Postgres is the
//! `Commit.end_lsn` of the newest transaction whose records — and those of every earlier
//! transaction — Kafka has acknowledged.
//!
//! Records are counted per transaction, not kept: librdkafka's delivery callback carries the
//! transaction's sequence number and decrements its counter, so memory is bounded by the
//! number of transactions in flight, not by their size (a 1M-row transaction costs one entry).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::ClientContext;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::Notify;

/// One transaction on its way to Kafka.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    /// Records produced and not yet acknowledged.
    outstanding: u64,
    /// Set at `Commit`; until then more records may come.
    end_lsn: Option<u64>,
    /// When Postgres committed it (for commit→ack latency), if known.
    committed: Option<Instant>,
    /// A record failed for good: this transaction (and all after it) is never confirmed.
    failed: bool,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    queue: VecDeque<InFlight>,
    /// The first delivery failure since the last reset; the stream restarts on it.
    failure: Option<String>,
    /// That failure can never pass by retrying (an authorisation or topic error): CDC stops
    /// for an operator instead of reconnecting in a loop.
    permanent: bool,
    /// Records the broker refused as too large, waiting to be replaced (their transaction
    /// still counts them as outstanding).
    refused: Vec<Refused>,
}

/// A record the broker refused as too large after it was queued.
#[derive(Debug, Clone)]
pub struct Refused {
    pub seq: u64,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub error: String,
}

/// What [`AckTracker::take_confirmed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    pub lsn: u64,
    pub transactions: u64,
    /// Commit→ack of each confirmed transaction whose commit time is known (one per
    /// transaction, so that a histogram of them is not skewed to the newest of a batch).
    pub latencies: Vec<std::time::Duration>,
}

/// Shared between the stream (which opens and commits transactions) and librdkafka's
/// delivery callbacks (which acknowledge records).
#[derive(Debug, Clone, Default)]
pub struct AckTracker {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a transaction; returns the sequence number its records carry.
    pub fn begin(&self) -> u64 {
        let mut s = self.state.lock().expect("ack state");
        let seq = s.next_seq;
        s.next_seq += 1;
        s.queue.push_back(InFlight {
            seq,
            outstanding: 0,
            end_lsn: None,
            committed: None,
            failed: false,
        });
        seq
    }

    /// One more record of transaction `seq` was handed to the producer.
    pub fn produced(&self, seq: u64) {
        let mut s = self.state.lock().expect("ack state");
        if let Some(tx) = s.queue.iter_mut().rev().find(|t| t.seq == seq) {
            tx.outstanding += 1;
        }
    }

    /// Transaction `seq` committed at `end_lsn`: no more records will come for it.
    pub fn commit(&self, seq: u64, end_lsn: u64, committed: Instant) {
        let mut s = self.state.lock().expect("ack state");
        if let Some(tx) = s.queue.iter_mut().rev().find(|t| t.seq == seq) {
            tx.end_lsn = Some(end_lsn);
            tx.committed = Some(committed);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Delivery callback: a record of `seq` was acknowledged (`Ok`) or failed for good.
    pub fn delivered(&self, seq: u64, result: Result<(), String>) {
        let mut s = self.state.lock().expect("ack state");
        // Reports for transactions forgotten by `reset` (a previous session) are ignored:
        // those transactions are streamed again anyway.
        let Some(tx) = s.queue.iter_mut().find(|t| t.seq == seq) else {
            return;
        };
        tx.outstanding = tx.outstanding.saturating_sub(1);
        tx.failed |= result.is_err();
        if let Err(e) = result {
            s.failure.get_or_insert(e);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Pops every leading transaction that is committed and fully acknowledged; returns the
    /// newest such end LSN. Nothing after an unacknowledged transaction is confirmed.
    pub fn take_confirmed(&self) -> Option<Confirmed> {
        let mut s = self.state.lock().expect("ack state");
        let mut confirmed: Option<Confirmed> = None;
        while let Some(front) = s.queue.front() {
            match front.end_lsn {
                Some(lsn) if front.outstanding == 0 && !front.failed => {
                    let c = confirmed.get_or_insert_with(|| Confirmed {
                        lsn,
                        transactions: 0,
                        latencies: Vec::new(),
                    });
                    c.lsn = lsn;
                    c.transactions += 1;
                    c.latencies.extend(front.committed.map(|at| at.elapsed()));
                    s.queue.pop_front();
                }
                _ => break,
            }
        }
        confirmed
    }

    /// True when transaction `seq` is confirmed: committed, acknowledged, and so is every
    /// transaction before it (or forgotten by `reset`).
    pub fn is_settled(&self, seq: u64) -> bool {
        !self
            .state
            .lock()
            .expect("ack state")
            .queue
            .iter()
            .any(|t| t.seq == seq)
    }

    /// True when nothing is in flight: no open or unacknowledged transaction.
    pub fn is_idle(&self) -> bool {
        self.state.lock().expect("ack state").queue.is_empty()
    }

    /// Records produced and not yet acknowledged, over all transactions.
    pub fn outstanding(&self) -> u64 {
        self.state
            .lock()
            .expect("ack state")
            .queue
            .iter()
            .map(|t| t.outstanding)
            .sum()
    }

    /// A record of `seq` was refused as too large: it stays outstanding (its transaction is
    /// not confirmed) until `CdcSink::resend_refused` queued its replacement and released it.
    pub fn refused(&self, refused: Refused) {
        let mut s = self.state.lock().expect("ack state");
        if !s.queue.iter().any(|t| t.seq == refused.seq) {
            return;
        }
        s.refused.push(refused);
        drop(s);
        self.notify.notify_one();
    }

    pub fn take_refused(&self) -> Vec<Refused> {
        std::mem::take(&mut self.state.lock().expect("ack state").refused)
    }

    pub fn take_failure(&self) -> Option<String> {
        let mut s = self.state.lock().expect("ack state");
        s.permanent = false;
        s.failure.take()
    }

    /// The first delivery failure, and whether it is permanent.
    pub fn take_failure_kind(&self) -> Option<(String, bool)> {
        let mut s = self.state.lock().expect("ack state");
        let permanent = std::mem::take(&mut s.permanent);
        s.failure.take().map(|f| (f, permanent))
    }

    /// A delivery failed for good with an error no retry can fix.
    pub fn delivered_permanent_failure(&self, seq: u64, error: String) {
        let first = {
            let s = self.state.lock().expect("ack state");
            s.failure.is_none()
        };
        self.delivered(seq, Err(error));
        if first {
            self.state.lock().expect("ack state").permanent = true;
        }
    }

    /// Forgets everything in flight (after a reconnect the stream restarts from the confirmed
    /// LSN, so unconfirmed transactions are sent again: at-least-once).
    pub fn reset(&self) {
        let mut s = self.state.lock().expect("ack state");
        s.queue.clear();
        s.failure = None;
        s.permanent = false;
        s.refused.clear();
    }

    /// Resolves when a delivery or commit happened since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// librdkafka context that routes delivery reports to the tracker. The opaque is the
/// transaction's sequence number.
pub struct CdcProducerContext {
    pub tracker: AckTracker,
}

impl ClientContext for CdcProducerContext {}

impl ProducerContext for CdcProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, message)) if super::sink::is_too_large(e) => {
                use rdkafka::Message as _;
                self.tracker.refused(Refused {
                    seq: seq as u64,
                    topic: message.topic().to_owned(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    error: e.to_string(),
                });
                return;
            }
            Err((e, _)) if is_permanent(e) => {
                self.tracker
                    .delivered_permanent_failure(seq as u64, e.to_string());
                return;
            }
            Err((e, _)) => Err(e.to_string()),
        };
        self.tracker.delivered(seq as u64, outcome);
    }
}

/// Delivery errors no reconnect can fix: Kafka refuses this client the topic or the cluster.
fn is_permanent(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidMessageSize
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_a_fully_acknowledged_prefix_of_committed_transactions() {
        let t = AckTracker::new();
        let now = Instant::now();
        let a = t.begin();
        t.produced(a);
        t.produced(a);
        t.commit(a, 100, now);
        let b = t.begin();
        t.produced(b);
        t.commit(b, 200, now);
        // b is acknowledged first: nothing may be confirmed while a is outstanding.
        t.delivered(b, Ok(()));
        assert_eq!(t.take_confirmed(), None);
        t.delivered(a, Ok(()));
        assert_eq!(t.take_confirmed(), None, "a has one record left");
        t.delivered(a, Ok(()));
        let c = t.take_confirmed().unwrap();
        assert_eq!((c.lsn, c.transactions), (200, 2));
        assert_eq!(
            c.latencies.len(),
            2,
            "one commit→ack latency per transaction"
        );
        assert!(t.is_idle());
    }

    #[test]
    fn an_open_transaction_blocks_confirmation_and_empty_ones_pass() {
        let t = AckTracker::new();
        let now = Instant::now();
        let a = t.begin();
        t.commit(a, 50, now); // no rows for captured tables
        let b = t.begin();
        t.produced(b);
        t.delivered(b, Ok(()));
        assert_eq!(
            t.take_confirmed().map(|c| c.lsn),
            Some(50),
            "b is not committed yet"
        );
        assert!(!t.is_idle());
        t.commit(b, 60, now);
        assert_eq!(t.take_confirmed().map(|c| c.lsn), Some(60));
    }

    #[test]
    fn failures_are_kept_until_taken_and_reset_forgets_in_flight_work() {
        let t = AckTracker::new();
        let a = t.begin();
        t.produced(a);
        t.commit(a, 10, Instant::now());
        t.delivered(a, Err("broker gone".into()));
        assert_eq!(
            t.take_confirmed(),
            None,
            "a failed transaction is never confirmed"
        );
        assert_eq!(t.take_failure().as_deref(), Some("broker gone"));
        assert_eq!(t.take_failure(), None);
        t.reset();
        assert!(t.is_idle());
    }

    #[test]
    fn a_permanent_delivery_failure_is_told_apart() {
        let t = AckTracker::new();
        let a = t.begin();
        t.produced(a);
        t.produced(a);
        t.delivered(a, Err("broker gone".into()));
        t.delivered_permanent_failure(a, "not authorised".into());
        assert_eq!(
            t.take_failure_kind(),
            Some(("broker gone".into(), false)),
            "the first failure decides"
        );
        let b = t.begin();
        t.produced(b);
        t.delivered_permanent_failure(b, "not authorised".into());
        assert_eq!(t.take_failure_kind(), Some(("not authorised".into(), true)));
        assert_eq!(t.take_failure_kind(), None);
    }
}
