//! The watermark window of one chunk: which keys the stream changed between the chunk's low
//! and high watermark, and which transactions committed just before the low one (to catch a
//! commit that was in the WAL before the low watermark but not yet visible to the chunk's
//! select).

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

/// The content of a watermark message. `run` is unique per leadership term, so watermarks
/// re-read from the WAL after a restart never match the chunk in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub snapshot: i64,
    pub run: String,
    pub chunk: u64,
    pub mark: Mark,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    Low,
    High,
}

impl Watermark {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a watermark serialises")
    }

    pub fn parse(content: &[u8]) -> Option<Self> {
        serde_json::from_slice(content).ok()
    }

    /// Same chunk of the same run (either mark).
    pub fn same_chunk(&self, other: &Watermark) -> bool {
        self.snapshot == other.snapshot && self.run == other.run && self.chunk == other.chunk
    }
}

/// Keys of one table changed by the stream inside a chunk's window. A key is the Kafka key
/// or the identity key (primary key) of the changed row, old or new image: a delete under
/// REPLICA IDENTITY DEFAULT carries only the primary key, and `public.members` is keyed on
/// `memberstack_id`, so both are kept and a chunk row matching either is dropped.
#[derive(Debug, Default)]
pub struct Window {
    open: bool,
    keys: HashSet<Vec<u8>>,
    /// A truncate of the table inside the window: every row of the chunk is stale.
    truncated: bool,
}

impl Window {
    /// The low watermark arrived: from now on changes count.
    pub fn open(&mut self) {
        self.open = true;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn changed(&mut self, key: &[u8]) {
        if self.open {
            self.keys.insert(key.to_vec());
        }
    }

    pub fn truncated(&mut self) {
        if self.open {
            self.truncated = true;
        }
    }

    /// Whether a chunk row with these keys must be dropped (its newer version is in the
    /// stream, before the high watermark).
    pub fn drops(&self, keys: &[Option<&[u8]>]) -> bool {
        self.truncated || keys.iter().flatten().any(|k| self.keys.contains(*k))
    }
}

/// The transactions a snapshot sees as running: those listed (`xip`) and every xid from
/// `xmax` on (Postgres does not list those; `xmax` is the newest *completed* xid + 1, so a
/// transaction still committing can be at or above it). 32-bit xids, as pgoutput sends them.
#[derive(Debug, Clone, Default)]
pub struct Running {
    pub xmax: u32,
    pub xip: HashSet<u32>,
}

impl Running {
    pub fn contains(&self, xid: u32) -> bool {
        // Modulo-2^32 comparison, as Postgres compares xids.
        self.xip.contains(&xid) || (xid.wrapping_sub(self.xmax) as i32) >= 0
    }
}

/// The xids of the last committed transactions the stream saw, numbered in stream order.
/// Postgres writes a commit record before the transaction becomes visible to new snapshots;
/// a transaction whose commit precedes the low watermark in the WAL but that the chunk's
/// snapshot still saw as running would leave a stale row in the chunk with its change
/// already streamed. Such a transaction is in the snapshot's running list (`xip`) and in
/// this ring before the low watermark: the chunk is then read again.
#[derive(Debug)]
pub struct RecentCommits {
    ring: VecDeque<(u64, u32)>,
    next: u64,
    capacity: usize,
}

impl RecentCommits {
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: VecDeque::with_capacity(capacity),
            next: 0,
            capacity,
        }
    }

    pub fn committed(&mut self, xid: u32) {
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back((self.next, xid));
        self.next += 1;
    }

    /// The position of the next commit (taken when the low watermark arrives).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Whether a transaction committed before `position` is in `running`.
    pub fn any_before(&self, position: u64, running: &Running) -> bool {
        self.ring
            .iter()
            .take_while(|(n, _)| *n < position)
            .any(|(_, xid)| running.contains(*xid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_after_the_low_watermark_count() {
        let mut w = Window::default();
        w.changed(b"a");
        assert!(!w.drops(&[Some(b"a")]), "before the low watermark");
        w.open();
        w.changed(b"b");
        assert!(w.drops(&[Some(b"x"), Some(b"b")]), "either key matches");
        assert!(!w.drops(&[Some(b"a"), None]));
        w.truncated();
        assert!(w.drops(&[None]), "a truncate drops the whole chunk");
    }

    #[test]
    fn watermarks_round_trip_and_match_by_chunk() {
        let low = Watermark {
            snapshot: 3,
            run: "r1".into(),
            chunk: 7,
            mark: Mark::Low,
        };
        let high = Watermark {
            mark: Mark::High,
            ..low.clone()
        };
        assert_eq!(
            Watermark::parse(low.to_text().as_bytes()),
            Some(low.clone())
        );
        assert!(low.same_chunk(&high));
        let other_run = Watermark {
            run: "r2".into(),
            ..high
        };
        assert!(!low.same_chunk(&other_run));
        assert_eq!(Watermark::parse(b"not json"), None);
    }

    #[test]
    fn recent_commits_before_a_position_are_checked_against_the_running_list() {
        let mut r = RecentCommits::new(3);
        r.committed(10);
        r.committed(11);
        let low = r.position();
        r.committed(12);
        let running = |xs: &[u32]| Running {
            xmax: 100,
            xip: xs.iter().copied().collect(),
        };
        assert!(r.any_before(low, &running(&[11])));
        assert!(
            !r.any_before(low, &running(&[12])),
            "after the low watermark"
        );
        let at_xmax = Running {
            xmax: 11,
            xip: HashSet::new(),
        };
        assert!(
            r.any_before(low, &at_xmax),
            "xids from xmax on are running though not listed"
        );
        r.committed(13);
        r.committed(14);
        assert!(
            !r.any_before(low, &running(&[10])),
            "forgotten beyond the capacity"
        );
    }

    #[test]
    fn xids_compare_modulo_2_pow_32() {
        let r = Running {
            xmax: u32::MAX - 1,
            xip: HashSet::new(),
        };
        assert!(r.contains(u32::MAX - 1));
        assert!(r.contains(3), "wrapped past xmax");
        assert!(!r.contains(u32::MAX - 2));
    }
}
