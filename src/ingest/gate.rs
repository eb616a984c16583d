//! The ingest server's one in-flight limit, shared by every route (both webhooks and the
//! member/admin API).
//!
//! A request needs a slot for as long as it runs; a webhook holds at most one body of
//! `ingest.body_limit_bytes` in it, so the slots bound the memory that unauthenticated
//! senders can make the server hold. When every slot is taken nothing waits in line:
//!
//! - if some webhook is still reading its body, the one whose body has been silent longest
//!   is shed (answered 503 with `Retry-After`, connection closed) and the newcomer takes its
//!   slot. A slow-loris sender that stops short of the end of its body therefore cannot keep
//!   a genuine delivery out, which sends its body at once and so is never the silent one;
//! - otherwise (every slot is verifying, producing or serving the API: real work) the
//!   newcomer is answered 503 with `Retry-After` at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// How long a newcomer waits for the slot of the body read it shed. The shed request gives
/// it back as soon as its task runs again; this only bounds a race with a victim that had
/// just finished its body.
const HANDOVER: Duration = Duration::from_secs(1);

/// A held slot, with the body buffer that comes with it; dropping it frees both.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
    buffer: Vec<u8>,
    buffers: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Slot {
    /// This slot's body buffer: empty, with whatever capacity an earlier request left it.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        lock(&self.buffers).push(buffer);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a request got no slot (the label of `membersync_ingest_shed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Every slot is busy with work other than reading a body.
    Full,
    /// This request's body had been silent longest when a newcomer needed a slot.
    SilentBody,
}

impl Shed {
    pub fn label(self) -> &'static str {
        match self {
            Shed::Full => "full",
            Shed::SilentBody => "silent_body",
        }
    }
}

pub struct Gate {
    limit: usize,
    /// Body buffers of free slots. Buffers are kept and reused rather than freed: a slot
    /// never holds more than one, so they never exceed `limit × body_limit_bytes`, and
    /// reusing them keeps the allocator from scattering half-free pages over its arenas
    /// (with fresh 512-KiB buffers for every request under attack, resident memory kept
    /// growing well past the bodies actually held).
    buffers: Arc<Mutex<Vec<Vec<u8>>>>,
    permits: Arc<Semaphore>,
    readers: Mutex<Readers>,
    epoch: Instant,
    shed: IntCounterVec,
    in_flight: IntGauge,
}

#[derive(Default)]
struct Readers {
    next_id: u64,
    active: HashMap<u64, Reader>,
}

struct Reader {
    /// Milliseconds since the gate's epoch when the body last delivered bytes.
    last_progress: Arc<AtomicU64>,
    evict: CancellationToken,
}

impl Gate {
    /// `shed` counts refusals by [`Shed::label`] (one label, `reason`); `in_flight` follows
    /// the slots in use.
    pub fn new(limit: usize, shed: IntCounterVec, in_flight: IntGauge) -> Arc<Self> {
        for reason in [Shed::Full, Shed::SilentBody] {
            shed.with_label_values(&[reason.label()]);
        }
        Arc::new(Self {
            limit,
            buffers: Arc::new(Mutex::new(Vec::with_capacity(limit))),
            permits: Arc::new(Semaphore::new(limit)),
            readers: Mutex::new(Readers::default()),
            epoch: Instant::now(),
            shed,
            in_flight,
        })
    }

    /// Slots in use.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// A slot, at once or by shedding the most silent body read; `None`: answer 503.
    pub async fn admit(&self) -> Option<Slot> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Some(self.slot(permit));
        }
        let Some(victim) = self.pick_victim() else {
            self.shed.with_label_values(&[Shed::Full.label()]).inc();
            return None;
        };
        victim.cancel();
        // tokio's semaphore hands a freed permit to the oldest waiter, so the slot the
        // victim gives back comes here, not to a later `try_acquire`.
        match tokio::time::timeout(HANDOVER, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Some(self.slot(permit)),
            _ => {
                self.shed.with_label_values(&[Shed::Full.label()]).inc();
                None
            }
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.in_flight.inc();
        Slot {
            _permit: permit,
            in_flight: self.in_flight.clone(),
            buffer: lock(&self.buffers).pop().unwrap_or_default(),
            buffers: Arc::clone(&self.buffers),
        }
    }

    /// Removes and returns the eviction token of the body read silent longest.
    fn pick_victim(&self) -> Option<CancellationToken> {
        let mut readers = lock(&self.readers);
        let id = readers
            .active
            .iter()
            .min_by_key(|(_, r)| r.last_progress.load(Ordering::Relaxed))
            .map(|(id, _)| *id)?;
        readers.active.remove(&id).map(|r| r.evict)
    }

    /// Registers a body read that may be shed while it runs; it is no longer sheddable once
    /// the returned guard is dropped.
    pub fn reading(self: &Arc<Self>) -> BodyRead {
        let last_progress = Arc::new(AtomicU64::new(self.now_ms()));
        let evict = CancellationToken::new();
        let mut readers = lock(&self.readers);
        let id = readers.next_id;
        readers.next_id += 1;
        readers.active.insert(
            id,
            Reader {
                last_progress: Arc::clone(&last_progress),
                evict: evict.clone(),
            },
        );
        BodyRead {
            gate: Arc::clone(self),
            id,
            last_progress,
            evict,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn count_evicted(&self) {
        self.shed
            .with_label_values(&[Shed::SilentBody.label()])
            .inc();
    }
}

/// A body read in progress (see [`Gate::reading`]).
pub struct BodyRead {
    gate: Arc<Gate>,
    id: u64,
    last_progress: Arc<AtomicU64>,
    evict: CancellationToken,
}

impl BodyRead {
    /// Bytes arrived: this read is no longer the silent one.
    pub fn progressed(&self) {
        self.last_progress
            .store(self.gate.now_ms(), Ordering::Relaxed);
    }

    /// Resolves when a newcomer shed this read; counts it.
    pub async fn shed(&self) {
        let cancelled: WaitForCancellationFuture<'_> = self.evict.cancelled();
        cancelled.await;
        self.gate.count_evicted();
    }
}

impl Drop for BodyRead {
    fn drop(&mut self) {
        let mut readers = lock(&self.gate.readers);
        readers.active.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn gate(limit: usize) -> Arc<Gate> {
        let shed = IntCounterVec::new(Opts::new("shed", "shed"), &["reason"]).unwrap();
        Gate::new(
            limit,
            shed,
            IntGauge::new("in_flight", "in flight").unwrap(),
        )
    }

    fn shed_count(gate: &Gate, reason: Shed) -> u64 {
        gate.shed.with_label_values(&[reason.label()]).get()
    }

    #[tokio::test]
    async fn body_buffers_are_reused_and_come_back_empty() {
        let gate = gate(2);
        let mut slot = gate.admit().await.unwrap();
        slot.buffer().extend_from_slice(&[1; 1000]);
        let ptr = slot.buffer().as_ptr();
        drop(slot);
        let mut again = gate.admit().await.unwrap();
        assert!(again.buffer().is_empty());
        assert!(again.buffer().capacity() >= 1000);
        assert_eq!(again.buffer().as_ptr(), ptr);
        // Never more buffers than slots.
        let _other = gate.admit().await.unwrap();
        drop(again);
        assert!(lock(&gate.buffers).len() <= 2);
    }

    #[tokio::test]
    async fn a_full_gate_without_body_reads_sheds_the_newcomer_at_once() {
        let gate = gate(2);
        let _a = gate.admit().await.unwrap();
        let _b = gate.admit().await.unwrap();
        assert_eq!(gate.in_flight(), 2);
        let started = Instant::now();
        assert!(gate.admit().await.is_none());
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(shed_count(&gate, Shed::Full), 1);
    }

    #[tokio::test]
    async fn a_newcomer_takes_the_slot_of_the_most_silent_body_read() {
        let gate = gate(2);
        // Two requests reading bodies; `quiet` stops first, `busy` keeps progressing.
        let quiet_slot = gate.admit().await.unwrap();
        let busy_slot = gate.admit().await.unwrap();
        let quiet = gate.reading();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let busy = gate.reading();
        busy.progressed();

        let victim = tokio::spawn(async move {
            quiet.shed().await;
            drop(quiet);
            drop(quiet_slot);
        });
        let newcomer = tokio::time::timeout(Duration::from_secs(2), gate.admit())
            .await
            .expect("no hang")
            .expect("a slot");
        victim.await.unwrap();
        assert_eq!(shed_count(&gate, Shed::SilentBody), 1);
        assert_eq!(gate.in_flight(), 2);
        // The busy one is untouched and still registered; the next newcomer sheds it.
        assert!(!busy.evict.is_cancelled());
        drop(newcomer);
        drop(busy);
        drop(busy_slot);
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_victim_that_does_not_give_its_slot_back_costs_the_newcomer_a_bounded_wait() {
        let gate = gate(1);
        let _slot = gate.admit().await.unwrap();
        let _stuck = gate.reading();
        let started = Instant::now();
        assert!(gate.admit().await.is_none());
        assert!(started.elapsed() < HANDOVER + Duration::from_millis(500));
    }
}
