//! `membersync_kafka_consumer_lag{group,topic,partition}`: how many records of each partition a
//! consumer group has not committed yet, from librdkafka's statistics
//! (`statistics.interval.ms`; a consumer's context hands the raw JSON to
//! [`ConsumerLag::observe_raw`]). The alerting rules use this exact name.
//!
//! Per assigned partition, librdkafka reports `consumer_lag` = high watermark − the higher of
//! the committed and the stored offset. Before the group has committed anything for a
//! partition that value is -1; the lag is then the whole partition (high − low watermark),
//! since `auto.offset.reset = earliest` will read all of it. Partitions this consumer no
//! longer holds (rebalanced away, or not assigned) are removed, so another instance's series
//! is never shadowed by a stale one.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, OnceLock};

use prometheus::{IntGaugeVec, Opts, Registry};
use rdkafka::ClientConfig;
use serde::Deserialize;

/// The gauge family, shared by every consumer of the process (merge and bridge run in one
/// `membersync run` and must report into one family; a second registration of the same name
/// in a registry would be refused).
fn family() -> &'static IntGaugeVec {
    static FAMILY: OnceLock<IntGaugeVec> = OnceLock::new();
    FAMILY.get_or_init(|| {
        #[allow(clippy::expect_used)] // constant options: cannot fail at runtime
        IntGaugeVec::new(
            Opts::new(
                "membersync_kafka_consumer_lag",
                "Records not yet committed by the consumer group, per topic partition held by this process (librdkafka statistics).",
            ),
            &["group", "topic", "partition"],
        )
        .expect("valid metric")
    })
}

/// Turns on librdkafka's statistics for a consumer (`interval_ms` 0 leaves them off).
pub fn enable_statistics(config: &mut ClientConfig, interval_ms: u64) {
    if interval_ms > 0 {
        config.set("statistics.interval.ms", interval_ms.to_string());
    }
}

/// One consumer's lag reporter. Cheap to clone.
#[derive(Clone)]
pub struct ConsumerLag {
    group: String,
    /// The series this consumer set last time, to remove the ones it no longer holds.
    reported: std::sync::Arc<Mutex<BTreeSet<(String, i32)>>>,
}

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    topics: HashMap<String, TopicStats>,
}

#[derive(Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: HashMap<String, PartitionStats>,
}

#[derive(Deserialize)]
struct PartitionStats {
    partition: i32,
    #[serde(default)]
    desired: bool,
    #[serde(default)]
    fetch_state: String,
    #[serde(default = "unknown")]
    committed_offset: i64,
    #[serde(default = "unknown")]
    lo_offset: i64,
    #[serde(default = "unknown")]
    hi_offset: i64,
    #[serde(default = "unknown")]
    consumer_lag: i64,
}

fn unknown() -> i64 {
    -1
}

impl PartitionStats {
    /// The lag to report, or `None` when this consumer does not hold the partition or the
    /// broker's watermarks are not known yet.
    fn lag(&self) -> Option<i64> {
        if self.partition < 0 || !self.desired || self.fetch_state == "none" {
            return None;
        }
        if self.consumer_lag >= 0 {
            return Some(self.consumer_lag);
        }
        (self.committed_offset < 0 && self.hi_offset >= 0)
            .then(|| self.hi_offset - self.lo_offset.max(0))
    }
}

impl ConsumerLag {
    /// Registers the family in `registry` (once; later calls find it there) and returns the
    /// reporter of consumer group `group`.
    pub fn new(registry: &Registry, group: &str) -> Self {
        match registry.register(Box::new(family().clone())) {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => tracing::warn!(error = %e, "cannot register membersync_kafka_consumer_lag"),
        }
        Self {
            group: group.to_owned(),
            reported: Default::default(),
        }
    }

    /// Updates the gauges from one librdkafka statistics document (JSON).
    pub fn observe_raw(&self, json: &[u8]) {
        let stats: Stats = match serde_json::from_slice(json) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable librdkafka statistics");
                return;
            }
        };
        let mut now = BTreeSet::new();
        for (topic, t) in &stats.topics {
            for p in t.partitions.values() {
                if let Some(lag) = p.lag() {
                    family()
                        .with_label_values(&[&self.group, topic, &p.partition.to_string()])
                        .set(lag);
                    now.insert((topic.clone(), p.partition));
                }
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in reported.difference(&now) {
            let _ = family().remove_label_values(&[&self.group, topic, &partition.to_string()]);
        }
        *reported = now;
    }

    /// Removes every series of this consumer (it stopped).
    pub fn clear(&self) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in reported.iter() {
            let _ = family().remove_label_values(&[&self.group, topic, &partition.to_string()]);
        }
        reported.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(partitions: &str) -> Vec<u8> {
        format!(r#"{{"name":"c","type":"consumer","topics":{{"t.sync":{{"topic":"t.sync","partitions":{{{partitions}}}}}}}}}"#).into_bytes()
    }

    fn value(registry: &Registry, group: &str, partition: &str) -> Option<f64> {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        let series = format!(
            "membersync_kafka_consumer_lag{{group=\"{group}\",partition=\"{partition}\",topic=\"t.sync\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn reports_assigned_partitions_and_drops_revoked_ones() {
        let registry = Registry::new();
        let lag = ConsumerLag::new(&registry, "lag-unit-1");
        // A second reporter on the same registry (merge and bridge in one process) is fine.
        let _other = ConsumerLag::new(&registry, "lag-unit-other");
        lag.observe_raw(&stats(
            r#""0":{"partition":0,"desired":true,"fetch_state":"active","committed_offset":7,"lo_offset":0,"hi_offset":10,"consumer_lag":3},
               "1":{"partition":1,"desired":true,"fetch_state":"active","committed_offset":-1001,"lo_offset":2,"hi_offset":6,"consumer_lag":-1},
               "2":{"partition":2,"desired":false,"fetch_state":"none","committed_offset":-1001,"lo_offset":-1,"hi_offset":-1,"consumer_lag":-1},
               "-1":{"partition":-1,"desired":false,"fetch_state":"none","consumer_lag":-1}"#,
        ));
        assert_eq!(value(&registry, "lag-unit-1", "0"), Some(3.0));
        assert_eq!(
            value(&registry, "lag-unit-1", "1"),
            Some(4.0),
            "nothing committed: high − low"
        );
        assert_eq!(
            value(&registry, "lag-unit-1", "2"),
            None,
            "not assigned here"
        );
        // Partition 0 was revoked.
        lag.observe_raw(&stats(
            r#""1":{"partition":1,"desired":true,"fetch_state":"active","committed_offset":6,"lo_offset":2,"hi_offset":6,"consumer_lag":0}"#,
        ));
        assert_eq!(value(&registry, "lag-unit-1", "0"), None);
        assert_eq!(value(&registry, "lag-unit-1", "1"), Some(0.0));
        lag.clear();
        assert_eq!(value(&registry, "lag-unit-1", "1"), None);
    }
}
