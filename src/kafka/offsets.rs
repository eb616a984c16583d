//! Which offset of each partition may be committed: records finish out of order (merge and
//! bridge workers run different members at once), and an offset is committed only when it and
//! every earlier record of its partition have finished (their effects, or dead letters, are
//! durable).

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default)]
struct Partition {
    /// Offsets begun and not finished (a count: after a rebalance the same offset can be
    /// read again while the first read is still running).
    in_flight: BTreeMap<i64, u32>,
    /// The highest offset begun.
    high: i64,
    /// The last offset handed out for storing.
    stored: i64,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<(String, i32), Partition>,
}

impl OffsetTracker {
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .parts
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| Partition {
                high: offset - 1,
                stored: offset - 1,
                ..Default::default()
            });
        *p.in_flight.entry(offset).or_default() += 1;
        p.high = p.high.max(offset);
    }

    /// Marks a record finished; returns the offset to store (librdkafka commits it + 1) when
    /// the committable position moved.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(&(topic.to_owned(), partition))?;
        match p.in_flight.get_mut(&offset) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                p.in_flight.remove(&offset);
            }
            None => return None,
        }
        let safe = match p.in_flight.keys().next() {
            Some(first) => first - 1,
            None => p.high,
        };
        (safe > p.stored).then(|| {
            p.stored = safe;
            safe
        })
    }

    /// The partitions went to another consumer: forget them (their finished offsets were
    /// committed by the rebalance; late finishes are ignored).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.parts.remove(&(topic.to_owned(), partition));
    }

    pub fn in_flight(&self) -> usize {
        self.parts
            .values()
            .map(|p| p.in_flight.values().sum::<u32>() as usize)
            .sum()
    }

    /// Every partition's committable offset (for the final commit at shutdown).
    pub fn committable(&self) -> Vec<(String, i32, i64)> {
        self.parts
            .iter()
            .filter(|(_, p)| p.stored >= 0)
            .map(|((t, part), p)| (t.clone(), *part, p.stored))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_a_finished_prefix() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.begin("a", 0, o);
        }
        assert_eq!(t.finish("a", 0, 12), None, "10 and 11 still running");
        assert_eq!(t.finish("a", 0, 10), Some(10));
        assert_eq!(t.finish("a", 0, 11), Some(12));
        assert_eq!(t.finish("a", 0, 14), None);
        assert_eq!(t.finish("a", 0, 13), Some(14));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_forgotten_ones_ignored() {
        let mut t = OffsetTracker::default();
        t.begin("a", 0, 0);
        t.begin("a", 1, 5);
        assert_eq!(t.finish("a", 1, 5), Some(5));
        t.forget("a", 0);
        assert_eq!(t.finish("a", 0, 0), None);
        assert_eq!(t.committable(), vec![("a".to_owned(), 1, 5)]);
    }

    #[test]
    fn a_record_read_twice_keeps_its_place_until_both_finish() {
        let mut t = OffsetTracker::default();
        t.begin("a", 0, 3);
        t.begin("a", 0, 3);
        t.begin("a", 0, 4);
        assert_eq!(t.finish("a", 0, 3), None);
        assert_eq!(t.finish("a", 0, 3), Some(3));
        assert_eq!(t.finish("a", 0, 4), Some(4));
    }
}
