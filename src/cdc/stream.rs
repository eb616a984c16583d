//! The streaming loop: decode pgoutput as it arrives, produce each change at once (a large
//! transaction is never buffered), and confirm LSNs strictly by the acknowledgement rule.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::envelope::{
    self, Envelope, Op, Source, Transaction, UNCHANGED_TOAST, now_ms, pg_micros_to_unix_ms,
    pg_micros_to_unix_us,
};
use super::incremental::{WATERMARK_PREFIX, driver::Driver};
use super::pgoutput::{self, Message, OldTuple};
use super::relation::{Relation, RelationCache};
use super::slot::{self, Leader, SlotError};
use super::temporal::{self, ColumnType};
use super::{CdcError, ORIGIN_NAME, ORIGIN_PREFIX, StreamContext};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("undecodable pgoutput message: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("row of {table} does not match its relation: {reason}")]
    Row { table: String, reason: String },
    #[error("the replication stream ended")]
    Ended,
}

/// The transaction being streamed.
struct OpenTx {
    seq: u64,
    xid: u32,
    final_lsn: u64,
    /// Commit time, Unix microseconds.
    commit_us: i64,
    /// End LSN of the transaction committed before this one (Debezium's `lastCommitLsn`, the
    /// first element of `source.sequence`).
    last_commit: Option<u64>,
    origin: bool,
    total_order: u64,
    per_table: HashMap<u32, u64>,
    /// Changed the table an incremental snapshot is reading (see incremental::window).
    touched_snapshot_table: bool,
}

pub async fn run(
    ctx: &StreamContext,
    repl: &mut ReplicationClient,
    leader: &Leader,
    shutdown: &CancellationToken,
) -> Result<(), CdcError> {
    let cfg = &ctx.config.cdc;
    let mut relations = RelationCache::new();
    let mut primary_keys: HashMap<u32, Vec<String>> = HashMap::new();
    let mut tx: Option<OpenTx> = None;
    // Streaming resumes after the slot's confirmed position: the last commit known to be done.
    let mut last_commit = confirmed_flush(leader, &cfg.slot).await;
    let heartbeat_every = Duration::from_secs(cfg.heartbeat_interval_secs.max(1));
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat_every,
        heartbeat_every,
    );
    let mut poll = tokio::time::interval(Duration::from_secs(cfg.slot_poll_interval_secs));
    // Incremental snapshots run inside the stream: their watermarks and rows must take
    // their place among the changes.
    let mut snapshots = Driver::new(ctx);
    // An idle stream still turns (and beats) at least this often.
    let mut alive = tokio::time::interval(crate::telemetry::liveness::period());
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ctx.heartbeat.beat();
        crate::telemetry::liveness::test_wedge("cdc").await;
        confirm(ctx, repl);
        ctx.sink.resend_refused().await?;
        if let Some((e, permanent)) = ctx.tracker.take_failure_kind() {
            return Err(if permanent {
                CdcError::Rejected(e)
            } else {
                CdcError::Delivery(e)
            });
        }
        snapshots.persist(ctx, leader.client()).await?;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                drain(ctx, repl).await?;
                return snapshots.persist(ctx, leader.client()).await;
            }
            _ = ctx.tracker.changed() => {}
            _ = alive.tick() => {}
            _ = poll.tick() => watch_slot(ctx, leader).await?,
            wake = snapshots.wake() => snapshots.on_wake(ctx, leader.client(), wake).await?,
            _ = heartbeat.tick(), if cfg.heartbeat_interval_secs > 0 => {
                if let Err(e) = slot::heartbeat(leader.client()).await {
                    tracing::warn!(error = %e, "heartbeat message failed");
                }
            }
            event = repl.recv() => {
                let Some(event) = event? else { return Err(StreamError::Ended.into()) };
                handle(ctx, repl, leader, &mut relations, &mut primary_keys, &mut tx, &mut last_commit, &mut snapshots, event).await?;
            }
        }
    }
}

/// Confirms to Postgres every transaction Kafka fully acknowledged, in order.
fn confirm(ctx: &StreamContext, repl: &ReplicationClient) {
    if let Some(c) = ctx.tracker.take_confirmed() {
        repl.update_applied_lsn(Lsn(c.lsn));
        ctx.metrics.confirmed_lsn.set(c.lsn as i64);
        ctx.metrics.transactions.inc_by(c.transactions);
        for latency in &c.latencies {
            ctx.metrics.commit_to_ack.observe(latency.as_secs_f64());
        }
    }
}

/// On shutdown: wait (bounded) until every produced record is acknowledged, confirm the
/// committed transactions among them, and stop the session. A transaction still open (its
/// commit not read yet) is not confirmed: it is streamed again on the next start.
async fn drain(ctx: &StreamContext, repl: &mut ReplicationClient) -> Result<(), CdcError> {
    let deadline = Instant::now() + ctx.config.shutdown.drain_timeout();
    while ctx.tracker.outstanding() > 0 && Instant::now() < deadline {
        confirm(ctx, repl);
        tokio::select! {
            _ = ctx.tracker.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    confirm(ctx, repl);
    // The worker sends a raised LSN at most once per status interval and sends nothing when
    // stopped: wait one interval (and a margin) so the final standby status reaches Postgres.
    tokio::time::sleep(Duration::from_millis(
        ctx.config.cdc.status_interval_ms + 100,
    ))
    .await;
    let _ = repl.shutdown().await;
    Ok(())
}

async fn watch_slot(ctx: &StreamContext, leader: &Leader) -> Result<(), CdcError> {
    match slot::health(leader.client(), &ctx.config.cdc.slot).await {
        Ok(Some(h)) => {
            ctx.metrics.observe_slot(&h);
            if h.wal_status == "lost" {
                return Err(SlotError::Lost(ctx.config.cdc.slot.clone()).into());
            }
            Ok(())
        }
        Ok(None) => Err(SlotError::Lost(ctx.config.cdc.slot.clone()).into()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the slot's health");
            Ok(())
        }
    }
}

/// The slot's confirmed flush LSN, if it can be read.
async fn confirmed_flush(leader: &Leader, slot: &str) -> Option<u64> {
    let row = leader
        .client()
        .query_opt(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    let text: Option<String> = row.get(0);
    Lsn::parse(&text?).ok().map(|l| l.as_u64())
}

/// Postgres commit timestamp (µs since 2000) → the `Instant` it corresponds to here.
fn instant_of(pg_micros: i64) -> Instant {
    let age_ms = (now_ms() - pg_micros_to_unix_ms(pg_micros)).max(0) as u64;
    Instant::now()
        .checked_sub(Duration::from_millis(age_ms))
        .unwrap_or_else(Instant::now)
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    ctx: &StreamContext,
    repl: &ReplicationClient,
    leader: &Leader,
    relations: &mut RelationCache,
    primary_keys: &mut HashMap<u32, Vec<String>>,
    tx: &mut Option<OpenTx>,
    last_commit: &mut Option<u64>,
    snapshots: &mut Driver,
    event: ReplicationEvent,
) -> Result<(), CdcError> {
    match event {
        ReplicationEvent::Begin {
            final_lsn,
            xid,
            commit_time_micros,
        } => {
            *tx = Some(OpenTx {
                seq: ctx.tracker.begin(),
                xid,
                final_lsn: final_lsn.as_u64(),
                commit_us: pg_micros_to_unix_us(commit_time_micros),
                last_commit: *last_commit,
                origin: false,
                total_order: 0,
                per_table: HashMap::new(),
                touched_snapshot_table: false,
            });
        }
        ReplicationEvent::Commit {
            end_lsn,
            commit_time_micros,
            ..
        } => {
            *last_commit = Some(end_lsn.as_u64());
            if let Some(open) = tx.take() {
                ctx.tracker
                    .commit(open.seq, end_lsn.as_u64(), instant_of(commit_time_micros));
                snapshots
                    .on_commit(
                        ctx,
                        leader.client(),
                        open.xid,
                        open.touched_snapshot_table,
                        end_lsn.as_u64(),
                    )
                    .await?;
            }
        }
        ReplicationEvent::Message {
            transactional: true,
            prefix,
            ..
        } if prefix == ORIGIN_PREFIX => {
            if let Some(open) = tx.as_mut() {
                open.origin = true;
            }
        }
        ReplicationEvent::Message {
            prefix, content, ..
        } if prefix == WATERMARK_PREFIX => {
            snapshots.on_watermark(&content);
        }
        ReplicationEvent::Message { .. } => {}
        ReplicationEvent::KeepAlive { wal_end, .. } => {
            // Idle: nothing open and nothing unacknowledged, so everything up to the server's
            // position is either confirmed or irrelevant to this slot. Following it keeps the
            // slot from pinning WAL that other tables or databases write.
            if tx.is_none() && ctx.tracker.is_idle() && !wal_end.is_zero() {
                repl.update_applied_lsn(wal_end);
                ctx.metrics.confirmed_lsn.set(wal_end.as_u64() as i64);
            }
        }
        ReplicationEvent::XLogData {
            wal_start, data, ..
        } => {
            let message = pgoutput::decode(&data).map_err(StreamError::from)?;
            // The walsender sends each change with its own LSN as the message's start (as
            // Debezium reads it); messages that are not changes carry 0.
            let lsn = if wal_start.is_zero() {
                tx.as_ref().map_or(0, |t| t.final_lsn)
            } else {
                wal_start.as_u64()
            };
            if let Message::Relation(rel) = &message {
                // Under REPLICA IDENTITY FULL every column is flagged as key; the Kafka key
                // is then the primary key, read from the catalog once per Relation message.
                if rel.replica_identity == pgoutput::ReplicaIdentity::Full {
                    primary_keys.insert(rel.id, primary_key(leader, rel.id).await?);
                } else {
                    primary_keys.remove(&rel.id);
                }
            }
            change(
                ctx,
                relations,
                primary_keys,
                tx.as_mut(),
                snapshots,
                lsn,
                message,
            )
            .await?;
        }
        ReplicationEvent::StoppedAt { .. } => return Err(StreamError::Ended.into()),
    }
    Ok(())
}

/// One decoded pgoutput message inside a transaction.
async fn change(
    ctx: &StreamContext,
    relations: &mut RelationCache,
    primary_keys: &HashMap<u32, Vec<String>>,
    tx: Option<&mut OpenTx>,
    snapshots: &mut Driver,
    lsn: u64,
    message: Message,
) -> Result<(), CdcError> {
    let (relation_id, op, old, new) = match message {
        Message::Relation(rel) => {
            relations.insert(rel);
            return Ok(());
        }
        Message::Insert(m) => (m.relation_id, Op::Create, None, Some(m.new)),
        Message::Update(m) => (m.relation_id, Op::Update, m.old, Some(m.new)),
        Message::Delete(m) => (m.relation_id, Op::Delete, Some(m.old), None),
        Message::Truncate(m) => {
            let Some(tx) = tx else { return Ok(()) };
            for id in m.relation_ids {
                let rel = relations.get(id).ok_or(StreamError::UnknownRelation(id))?;
                if snapshots.reading(&rel.qualified_name()) {
                    tx.touched_snapshot_table = true;
                }
                if snapshots.watching(&rel.qualified_name()) {
                    snapshots.truncated();
                }
                let e = Event {
                    op: Op::Truncate,
                    key: None,
                    before: None,
                    after: None,
                    unchanged: &[],
                };
                emit(ctx, tx, rel, id, lsn, e).await?;
            }
            return Ok(());
        }
        // Begin/Commit/Message arrive as their own events; Type and Origin carry nothing we publish.
        _ => return Ok(()),
    };
    let Some(tx) = tx else { return Ok(()) };
    let rel = relations
        .get(relation_id)
        .ok_or(StreamError::UnknownRelation(relation_id))?;
    let row_error = |e: &dyn std::fmt::Display| StreamError::Row {
        table: rel.qualified_name(),
        reason: e.to_string(),
    };
    let mut before = match &old {
        Some(OldTuple::Full(t)) | Some(OldTuple::Key(t)) => {
            Some(rel.row(t).map_err(|e| row_error(&e))?)
        }
        None => None,
    };
    let mut after = match &new {
        Some(t) => Some(rel.row(t).map_err(|e| row_error(&e))?),
        None => None,
    };
    let mode = ctx.config.cdc.time_precision_mode;
    for row in [before.as_mut(), after.as_mut()].into_iter().flatten() {
        let columns = rel.columns.iter().map(|c| ColumnType {
            name: &c.name,
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
        });
        temporal::encode(mode, &mut row.values, columns);
    }
    // An unchanged TOASTed value stays marked, unless the old full row (REPLICA IDENTITY
    // FULL) knows it.
    let mut unchanged = Vec::new();
    if let Some(after) = after.as_mut() {
        for col in std::mem::take(&mut after.unchanged_toast) {
            let known = match (&old, &before) {
                (Some(OldTuple::Full(_)), Some(b)) => {
                    b.values.get(&col).filter(|v| !is_marker(v)).cloned()
                }
                _ => None,
            };
            match known {
                Some(v) => {
                    after.values.insert(col, v);
                }
                None => unchanged.push(col),
            }
        }
    }
    let identity = primary_keys
        .get(&relation_id)
        .cloned()
        .unwrap_or_else(|| identity_columns(rel));
    if snapshots.reading(&rel.qualified_name()) {
        tx.touched_snapshot_table = true;
    }
    if snapshots.watching(&rel.qualified_name()) {
        // Every key the chunk's rows could be matched by: the Kafka key and the identity of
        // both images (a delete under REPLICA IDENTITY DEFAULT carries only the identity).
        let key_columns = ctx.key_columns(&rel.qualified_name(), &identity);
        let mut keys = Vec::with_capacity(4);
        for row in [before.as_ref(), after.as_ref()].into_iter().flatten() {
            for columns in [&key_columns, &identity] {
                if !columns.is_empty() {
                    keys.push(super::envelope::key(&row.values, columns));
                }
            }
        }
        snapshots.changed(&keys);
    }
    // Keys first: a key column holding the unchanged-TOAST marker gives no key.
    let key_columns = ctx.key_columns(&rel.qualified_name(), &identity);
    let new_key = after
        .as_ref()
        .and_then(|r| ctx.kafka_key(&r.values, &key_columns));
    let old_key = before
        .as_ref()
        .and_then(|r| ctx.kafka_key(&r.values, &key_columns));
    // Published with the configured placeholder (Debezium's by default).
    let placeholder = &ctx.config.cdc.unavailable_value_placeholder;
    let mut before = before.map(|r| r.values);
    let mut after = after.map(|r| r.values);
    for row in [before.as_mut(), after.as_mut()].into_iter().flatten() {
        envelope::publish_placeholders(row, placeholder);
    }
    let event = |op, key, before, after| Event {
        op,
        key,
        before,
        after,
        unchanged: &unchanged,
    };
    match op {
        // A key change, as Debezium: a delete under the old key (and its tombstone), then a
        // create under the new one, so that keyed consumers drop the old key.
        Op::Update if old_key.is_some() && new_key.is_some() && old_key != new_key => {
            let old_key = old_key.as_deref();
            emit(
                ctx,
                tx,
                rel,
                relation_id,
                lsn,
                event(Op::Delete, old_key, before.as_ref(), None),
            )
            .await?;
            emit(
                ctx,
                tx,
                rel,
                relation_id,
                lsn,
                event(Op::Create, new_key.as_deref(), None, after.as_ref()),
            )
            .await
        }
        Op::Delete => {
            emit(
                ctx,
                tx,
                rel,
                relation_id,
                lsn,
                event(Op::Delete, old_key.as_deref(), before.as_ref(), None),
            )
            .await
        }
        _ => {
            emit(
                ctx,
                tx,
                rel,
                relation_id,
                lsn,
                event(op, new_key.as_deref(), before.as_ref(), after.as_ref()),
            )
            .await
        }
    }
}

/// One event to publish.
struct Event<'a> {
    op: Op,
    key: Option<&'a [u8]>,
    before: Option<&'a Map<String, Value>>,
    after: Option<&'a Map<String, Value>>,
    /// Columns of `after` holding the placeholder.
    unchanged: &'a [String],
}

async fn primary_key(leader: &Leader, relation_id: u32) -> Result<Vec<String>, CdcError> {
    let rows = leader
        .client()
        .query(
            "select a.attname::text from pg_index i
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
             where i.indrelid = $1::oid and i.indisprimary
             order by array_position(i.indkey::int2[], a.attnum)",
            &[&relation_id],
        )
        .await
        .map_err(SlotError::from)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The replica-identity key columns (primary key under REPLICA IDENTITY DEFAULT).
fn identity_columns(rel: &Relation) -> Vec<String> {
    rel.columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| c.name.clone())
        .collect()
}

fn is_marker(v: &Value) -> bool {
    v.as_str() == Some(UNCHANGED_TOAST)
}

/// Publishes `e` (unless its operation is skipped), and after a delete its tombstone.
async fn emit(
    ctx: &StreamContext,
    tx: &mut OpenTx,
    rel: &Relation,
    relation_id: u32,
    lsn: u64,
    e: Event<'_>,
) -> Result<(), CdcError> {
    if ctx.skips(e.op) {
        return Ok(());
    }
    tx.total_order += 1;
    let table_order = tx.per_table.entry(relation_id).or_insert(0);
    *table_order += 1;
    let qualified = rel.qualified_name();
    let mut source = Source::new(
        &ctx.config.kafka.topic_prefix,
        &ctx.config.database.dbname,
        &rel.namespace,
        &rel.name,
        tx.commit_us,
        lsn,
    );
    source.tx_id = Some(tx.xid);
    source.sequence = Some(envelope::sequence(tx.last_commit, lsn));
    source.origin = tx.origin.then_some(ORIGIN_NAME);
    source.unchanged_columns = if e.after.is_some() { e.unchanged } else { &[] };
    let transaction = Transaction {
        id: format!("{}:{}", tx.xid, tx.final_lsn),
        total_order: tx.total_order,
        data_collection_order: *table_order,
    };
    let envelope = Envelope::new(e.op, e.before, e.after, source, Some(transaction));
    let topic = ctx.topics.cdc(&rel.namespace, &rel.name);
    let mut waited = ctx
        .sink
        .send(tx.seq, &topic, e.key, &envelope.to_vec())
        .await?;
    if let (Op::Delete, true, Some(key)) = (e.op, ctx.config.cdc.tombstones_on_delete, e.key) {
        waited |= ctx.sink.send_tombstone(tx.seq, &topic, key).await?;
    }
    if waited {
        ctx.metrics.backpressure_waits.inc();
    }
    ctx.metrics
        .events
        .with_label_values(&[&qualified, e.op.as_str()])
        .inc();
    Ok(())
}
