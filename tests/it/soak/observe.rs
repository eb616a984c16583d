//! What the soak watches while it runs: one sample per second of the daemon's RSS and open
//! file descriptors (`/proc/<pid>`), the changes merge has processed (`webhook_log`), and the
//! merge group's consumer lag (committed offsets against high watermarks); and, at the end, every
//! record of a topic.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds after the traffic started.
    pub t: f64,
    pub pid: u32,
    pub rss_kb: Option<u64>,
    pub fds: Option<u64>,
    /// `webhook_log` rows (changes merge has processed), when Postgres answered.
    pub processed: Option<i64>,
    /// Records of merge's topics not yet committed by its group, when the broker answered.
    pub lag: Option<i64>,
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The merge group's lag, recomputed about once a second on a thread of its own (librdkafka
/// calls block).
pub struct LagProbe {
    latest: Arc<Mutex<Option<(Instant, i64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LagProbe {
    pub fn start(brokers: String, group: String, topics: Vec<String>, partitions: i32) -> LagProbe {
        let latest = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (latest.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("log_level", "0")
                .create()
                .expect("lag consumer");
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                if let Some(lag) = group_lag(&consumer, &topics, partitions) {
                    *l.lock().unwrap() = Some((Instant::now(), lag));
                }
                std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
            }
        });
        LagProbe {
            latest,
            stop,
            thread: Some(thread),
        }
    }

    /// The last lag measured within `fresh`.
    pub fn lag(&self, fresh: Duration) -> Option<i64> {
        self.latest
            .lock()
            .unwrap()
            .filter(|(at, _)| at.elapsed() <= fresh)
            .map(|(_, lag)| lag)
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn group_lag(consumer: &BaseConsumer, topics: &[String], partitions: i32) -> Option<i64> {
    let timeout = Duration::from_secs(2);
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition(t, p);
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .ok()?;
        let done = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - done).max(0);
    }
    Some(lag)
}

/// Samples once a second until `stop` is set.
pub async fn sample(
    pid: Arc<AtomicU32>,
    pg: tokio_postgres::Config,
    lag: &LagProbe,
    t0: Instant,
    stop: &AtomicBool,
    out: &Mutex<Vec<Sample>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let pid = pid.load(Ordering::Relaxed);
        let mut s = Sample {
            t: t0.elapsed().as_secs_f64(),
            pid,
            rss_kb: (pid != 0).then(|| rss_kb(pid)).flatten(),
            fds: (pid != 0).then(|| fds(pid)).flatten(),
            processed: None,
            lag: lag.lag(Duration::from_secs(3)),
        };
        super::ensure_connected(&mut client, &pg, Duration::from_secs(2)).await;
        if let Some(c) = &client {
            s.processed = tokio::time::timeout(
                Duration::from_secs(2),
                c.query_one("select count(*) from public.webhook_log", &[]),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|r| r.get(0));
        }
        out.lock().unwrap().push(s);
    }
}

/// Every record of `topic` (all partitions, from the low to the high watermark at the time of
/// the call). Blocking.
pub fn read_all(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::support::unique_name("soak-reader"))
        .set("enable.auto.commit", "false")
        .set("log_level", "0")
        .create()
        .map_err(|e| e.to_string())?;
    // A broker that answers nothing must not hold the verdict for long.
    let call = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), call)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = std::collections::HashMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, call)
            .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(|e| e.to_string())?;
            remaining.insert(p, high);
        }
    }
    if remaining.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "read {} records of {topic}; partitions not read to the end: {remaining:?}",
                out.len()
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let (p, next) = (m.partition(), m.offset() + 1);
                if remaining.get(&p).is_some_and(|high| next >= *high) {
                    remaining.remove(&p);
                }
                out.push(m.detach());
            }
            Some(Err(e)) => return Err(format!("consume {topic}: {e}")),
            None => {}
        }
    }
    Ok(out)
}
