//! `GET /v1/admin/status`: a cheap, honest snapshot. Each part is read independently, under
//! its own short deadline, and reports its own error instead of failing the whole answer:
//!
//! - `process`: the roles running in this process (those whose metrics are registered) and
//!   its `membersync_*` gauges (CDC leadership, slot lag, merge in flight, …);
//! - `cdc_slot`: the replication slot as Postgres sees it (any process may hold it);
//! - `merge_consumer`: the consumer group's state and lag (committed offsets against the
//!   partitions' ends), read from Kafka;
//! - `dlq`: records on the dead-letter topic (from the partitions' offsets, nothing is read)
//!   and how many were replayed (`audit_logs`);
//! - `api`: the member auth mode and the JWKS cache.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use super::ApiState;
use crate::config::Config;
use crate::kafka::topics::Topics;

/// Each part of the status gets this long.
const PART_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn gather(state: &ApiState) -> Value {
    let (cdc_slot, kafka, replayed) = tokio::join!(
        bounded(cdc_slot(state)),
        bounded(kafka_parts(state.config.clone())),
        bounded(replayed_count(state)),
    );
    let (merge_consumer, mut dlq) = match kafka {
        Ok((consumer, dlq)) => (consumer, dlq),
        Err(e) => (json!({"error": e}), json!({"error": e})),
    };
    if let Value::Object(m) = &mut dlq {
        m.insert(
            "replayed".into(),
            replayed.map_or_else(|e| json!({"error": e}), Value::from),
        );
    }
    json!({
        "version": crate::telemetry::BUILD_VERSION,
        "process": process(state),
        "cdc_slot": cdc_slot.unwrap_or_else(|e| json!({"error": e})),
        "merge_consumer": merge_consumer,
        "dlq": dlq,
        "api": api(state),
    })
}

async fn bounded<T>(work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(PART_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", PART_TIMEOUT.as_secs())))
}

fn process(state: &ApiState) -> Value {
    let families = state.registry.registry().gather();
    let mut roles = Vec::new();
    for (role, prefix) in [
        ("cdc", "membersync_cdc_"),
        ("ingest", "membersync_ingest_"),
        ("merge", "membersync_merge_"),
        ("bridge", "membersync_bridge_"),
    ] {
        if families.iter().any(|f| f.name().starts_with(prefix)) {
            roles.push(role);
        }
    }
    let gauges: BTreeMap<String, f64> = families
        .iter()
        .filter(|f| {
            f.name().starts_with("membersync_")
                && f.name() != "membersync_build_info"
                && f.get_field_type() == prometheus::proto::MetricType::GAUGE
        })
        .map(|f| {
            let total = f.get_metric().iter().map(|m| m.get_gauge().value()).sum();
            (f.name().to_owned(), total)
        })
        .collect();
    json!({"roles": roles, "gauges": gauges})
}

async fn cdc_slot(state: &ApiState) -> Result<Value, String> {
    let client = state.db.get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_opt(
            "select active, active_pid, wal_status,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
               from pg_replication_slots where slot_name = $1",
            &[&state.config.cdc.slot],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(match row {
        None => json!({"slot": state.config.cdc.slot, "exists": false}),
        Some(r) => json!({
            "slot": state.config.cdc.slot,
            "exists": true,
            // Active: a CDC leader is streaming from it (`active_pid` is its backend).
            "active": r.get::<_, bool>(0),
            "active_pid": r.get::<_, Option<i32>>(1),
            "wal_status": r.get::<_, Option<String>>(2),
            "lag_bytes": r.get::<_, Option<i64>>(3),
        }),
    })
}

async fn replayed_count(state: &ApiState) -> Result<i64, String> {
    let client = state.db.get().await.map_err(|e| e.to_string())?;
    client
        .query_one(
            "select count(distinct target) from public.audit_logs where action = 'dlq_replay'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| e.to_string())
}

fn api(state: &ApiState) -> Value {
    let jwks = state
        .member_auth
        .as_ref()
        .and_then(|a| a.jwks())
        .map(|j| json!({"fetches": j.fetches(), "cached_keys": j.cached_keys()}));
    json!({
        "member_routes": state.member_auth.is_some(),
        "auth_mode": state.cfg.auth_mode.as_str(),
        "jwks": jwks,
        "resync": state.memberstack.is_some(),
    })
}

/// The merge group's lag and the dead-letter count, from one short-lived Kafka client.
async fn kafka_parts(config: Config) -> Result<(Value, Value), String> {
    tokio::task::spawn_blocking(move || kafka_parts_blocking(&config))
        .await
        .map_err(|e| e.to_string())?
}

fn kafka_parts_blocking(config: &Config) -> Result<(Value, Value), String> {
    let timeout = config.kafka.request_timeout().min(PART_TIMEOUT);
    let group = &config.merge.group_id;
    // Not subscribed, so it never joins the group: it only reads the group's offsets.
    let consumer: BaseConsumer = crate::kafka::client_config(&config.kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let topics = Topics::new(&config.kafka.topic_prefix);
    let merge_topics = if config.merge.topics.is_empty() {
        // Merge's defaults (src/merge/consumer.rs).
        vec![
            topics.memberstack(),
            topics.stripe(),
            topics.cdc("public", "members"),
        ]
    } else {
        config.merge.topics.clone()
    };

    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for topic in &merge_topics {
        for (partition, (_, high)) in partitions(&consumer, topic, timeout)? {
            ends.insert((topic.clone(), partition), high);
            tpl.add_partition(topic, partition);
        }
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| e.to_string())?;
    let mut lag = BTreeMap::<String, i64>::new();
    for e in committed.elements() {
        let end = ends
            .get(&(e.topic().to_owned(), e.partition()))
            .copied()
            .unwrap_or(0);
        // Nothing committed yet: the group starts from the beginning, so all of it is lag.
        let done = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        *lag.entry(e.topic().to_owned()).or_default() += (end - done).max(0);
    }
    let group_state = consumer
        .fetch_group_list(Some(group), timeout)
        .map_err(|e| e.to_string())
        .and_then(|list| {
            list.groups()
                .iter()
                .find(|g| g.name() == group)
                .map(|g| json!({"state": g.state(), "members": g.members().len()}))
                .ok_or_else(|| "group unknown to the broker".to_owned())
        });
    let consumer_view = json!({
        "group": group,
        "lag": lag,
        "total_lag": lag.values().sum::<i64>(),
        "group_state": group_state.unwrap_or_else(|e| json!({"error": e})),
    });

    let dlq_topic = topics.dlq();
    let records: i64 = partitions(&consumer, &dlq_topic, timeout)?
        .into_iter()
        .map(|(_, (low, high))| (high - low).max(0))
        .sum();
    Ok((
        consumer_view,
        json!({"topic": dlq_topic, "records": records}),
    ))
}

/// A partition id with its (low, high) watermarks.
type PartitionWatermarks = (i32, (i64, i64));

/// Each partition of `topic` with its (low, high) offsets; none when the topic is missing.
fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<PartitionWatermarks>, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    ids.into_iter()
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, timeout)
                .map(|w| (p, w))
                .map_err(|e| e.to_string())
        })
        .collect()
}
