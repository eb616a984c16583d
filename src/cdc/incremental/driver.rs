//! The CDC leader's side of incremental snapshots, driven from the streaming loop: picks the
//! oldest unfinished request, runs its chunks one after another on a connection of its own,
//! and, when a chunk's high watermark comes through the stream, drops the rows the stream
//! changed inside the window, produces the rest as `op: "r"` and records the position once
//! Kafka acknowledged them.
//!
//! LSN rule: a chunk's rows form one tracker "transaction" ending at the high watermark's LSN,
//! produced at the watermark's place in the stream. The ack tracker confirms strictly in
//! order, so the slot never moves past a chunk's high watermark before Kafka acknowledged the
//! chunk, and the chunk's position is persisted only once it is confirmed (`persist`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::IncrementalError;
use super::chunk::{self, ChunkError, ChunkRequest, ChunkRows};
use super::window::{Mark, RecentCommits, Watermark, Window};
use crate::cdc::envelope::{self, Envelope, Op, Snapshot, Source, now_us};
use crate::cdc::{CdcError, StreamContext};
use crate::db::{self, Login};

/// Commits remembered for the commit-before-visible check (window.rs).
const RECENT_COMMITS: usize = 4096;

/// The request being run.
struct Active {
    id: i64,
    tables: Vec<String>,
    /// Index in `tables` of the table being read.
    index: usize,
    /// Primary key of the last row read of that table (ahead of the persisted position).
    after: Option<Vec<String>>,
    /// The table's greatest primary key when its snapshot started (chunk.rs).
    until: Option<Vec<String>>,
    /// Chunks started in this run (watermark numbering).
    chunk: u64,
    rows: i64,
    skipped: i64,
    chunks: i64,
    conn: Arc<Client>,
    inflight: Option<Inflight>,
}

/// The chunk between its watermarks.
struct Inflight {
    low: Watermark,
    window: Window,
    /// `RecentCommits::position` when the low watermark arrived.
    low_position: Option<u64>,
    /// The high watermark arrived; its transaction's commit has not yet.
    high_seen: bool,
    task: Option<JoinHandle<Result<ChunkRows, ChunkError>>>,
    result: Option<Result<ChunkRows, ChunkError>>,
}

/// A position to persist once the chunk's records are confirmed.
struct Checkpoint {
    seq: u64,
    id: i64,
    table: Option<String>,
    last_key: Option<Vec<String>>,
    rows: i64,
    skipped: i64,
    chunks: i64,
    done: bool,
}

/// What [`Driver::wake`] found.
pub enum Wake {
    Poll,
    ChunkRead(Result<ChunkRows, ChunkError>),
}

pub struct Driver {
    /// Unique per streaming session: watermarks of earlier sessions, read again from the WAL
    /// after a restart, never match.
    run: String,
    poll: tokio::time::Interval,
    recent: RecentCommits,
    active: Option<Active>,
    pending: VecDeque<Checkpoint>,
    active_gauge: IntGauge,
}

impl Drop for Driver {
    /// The session ended (error, leadership lost, shutdown): a chunk query still running is
    /// of no use any more; the next session resumes from the persisted position.
    fn drop(&mut self) {
        if let Some(task) = self
            .active
            .as_mut()
            .and_then(|a| a.inflight.as_mut())
            .and_then(|i| i.task.take())
        {
            task.abort();
        }
        self.active_gauge.set(0);
    }
}

fn unique_run() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

impl Driver {
    pub fn new(ctx: &StreamContext) -> Self {
        let every = Duration::from_millis(ctx.config.cdc.incremental_poll_interval_ms.max(1));
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            run: unique_run(),
            poll,
            recent: RecentCommits::new(RECENT_COMMITS),
            active: None,
            pending: VecDeque::new(),
            active_gauge: ctx.metrics.incremental_active.clone(),
        }
    }

    /// Resolves when the driver has something to do: the poll interval elapsed, or the
    /// running chunk query ended. Cancel-safe (for `select!`).
    pub async fn wake(&mut self) -> Wake {
        let task = self
            .active
            .as_mut()
            .and_then(|a| a.inflight.as_mut())
            .and_then(|i| i.task.as_mut());
        match task {
            Some(task) => tokio::select! {
                r = join(task) => Wake::ChunkRead(r),
                _ = self.poll.tick() => Wake::Poll,
            },
            None => {
                self.poll.tick().await;
                Wake::Poll
            }
        }
    }

    pub async fn on_wake(
        &mut self,
        ctx: &StreamContext,
        leader: &Client,
        wake: Wake,
    ) -> Result<(), CdcError> {
        match wake {
            Wake::Poll => self.on_poll(ctx, leader).await,
            Wake::ChunkRead(r) => self.on_task_done(ctx, leader, r).await,
        }
    }

    /// A transaction of the stream committed at `end_lsn`; if it carried the high watermark
    /// of the chunk in flight, the chunk is produced right after it.
    pub async fn on_commit(
        &mut self,
        ctx: &StreamContext,
        leader: &Client,
        xid: u32,
        touched_snapshot_table: bool,
        end_lsn: u64,
    ) -> Result<(), CdcError> {
        // Only transactions that changed the table being read can leave a stale row in it.
        if touched_snapshot_table {
            self.recent.committed(xid);
        }
        let high = self
            .active
            .as_ref()
            .and_then(|a| a.inflight.as_ref())
            .is_some_and(|i| i.high_seen);
        if high {
            self.finish_chunk(ctx, leader, end_lsn).await?;
        }
        Ok(())
    }

    /// Whether an incremental snapshot is reading `table`.
    pub fn reading(&self, table: &str) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.tables.get(a.index).is_some_and(|t| t == table))
    }

    /// Whether changes of `table` are being watched (a chunk window of it is open).
    pub fn watching(&self, table: &str) -> bool {
        self.active.as_ref().is_some_and(|a| {
            a.tables.get(a.index).is_some_and(|t| t == table)
                && a.inflight.as_ref().is_some_and(|i| i.window.is_open())
        })
    }

    /// The stream changed a row of the watched table (its Kafka and identity keys).
    pub fn changed(&mut self, keys: &[Option<Vec<u8>>]) {
        if let Some(i) = self.active.as_mut().and_then(|a| a.inflight.as_mut()) {
            for k in keys.iter().flatten() {
                i.window.changed(k);
            }
        }
    }

    /// The stream truncated the watched table.
    pub fn truncated(&mut self) {
        if let Some(i) = self.active.as_mut().and_then(|a| a.inflight.as_mut()) {
            i.window.truncated();
        }
    }

    /// Picks up a request when idle; notices a cancelled one.
    pub async fn on_poll(&mut self, ctx: &StreamContext, leader: &Client) -> Result<(), CdcError> {
        if let Some(active) = &self.active {
            let state: Option<String> = leader
                .query_opt(
                    "select state from membersync_meta.cdc_incremental_snapshots where id = $1",
                    &[&active.id],
                )
                .await
                .map_err(IncrementalError::from)?
                .map(|r| r.get(0));
            if state.as_deref() != Some("running") {
                tracing::info!(
                    id = active.id,
                    ?state,
                    "incremental snapshot stopped from outside"
                );
                self.stop(ctx);
            }
            return Ok(());
        }
        // Positions of an abandoned run must land first: the next run starts from them.
        if !self.pending.is_empty() {
            return Ok(());
        }
        let Some(row) = leader
            .query_opt(
                "select id, tables, current_table, last_key, rows_emitted, rows_skipped, chunks
                 from membersync_meta.cdc_incremental_snapshots
                 where state in ('requested', 'running') order by id limit 1",
                &[],
            )
            .await
            .map_err(IncrementalError::from)?
        else {
            return Ok(());
        };
        let id: i64 = row.get(0);
        let mut tables: Vec<String> = row.get(1);
        if tables.is_empty() {
            tables = ctx.config.cdc.tables.clone();
        }
        if let Some(t) = tables.iter().find(|t| !ctx.config.cdc.tables.contains(t)) {
            let reason = format!("{t} is not a captured table (cdc.tables)");
            fail(leader, id, &reason).await?;
            return Ok(());
        }
        let current: Option<String> = row.get(2);
        let index = current
            .and_then(|c| tables.iter().position(|t| *t == c))
            .unwrap_or(0);
        let after: Option<Vec<String>> = row
            .get::<_, Option<serde_json::Value>>(3)
            .and_then(|v| serde_json::from_value(v).ok());
        let conn = match connect(ctx).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(id, error = %e, "incremental snapshot: cannot connect; retrying");
                return Ok(());
            }
        };
        leader
            .execute(
                "update membersync_meta.cdc_incremental_snapshots
                   set state = 'running', tables = $2, started_at = coalesce(started_at, now()),
                       updated_at = now()
                 where id = $1",
                &[&id, &tables],
            )
            .await
            .map_err(IncrementalError::from)?;
        tracing::info!(id, ?tables, resume_table = index, resume_after = ?after, "incremental snapshot started");
        self.active = Some(Active {
            id,
            tables,
            index,
            after,
            until: None,
            chunk: 0,
            rows: row.get(4),
            skipped: row.get(5),
            chunks: row.get(6),
            conn: Arc::new(conn),
            inflight: None,
        });
        self.active_gauge.set(1);
        self.next_chunk(ctx);
        Ok(())
    }

    /// The chunk query ended (before its high watermark reached the stream, usually).
    pub async fn on_task_done(
        &mut self,
        ctx: &StreamContext,
        leader: &Client,
        result: Result<ChunkRows, ChunkError>,
    ) -> Result<(), CdcError> {
        let Some(inflight) = self.active.as_mut().and_then(|a| a.inflight.as_mut()) else {
            return Ok(());
        };
        inflight.task = None;
        match result {
            Ok(rows) => {
                inflight.result = Some(Ok(rows));
                Ok(())
            }
            // The high watermark will not come.
            Err(e) => self.chunk_failed(ctx, leader, e).await,
        }
    }

    /// A watermark came through the stream. The high one is inside its own transaction:
    /// the chunk is produced at that transaction's commit (`on_commit`), so it takes that
    /// place in the ack order.
    pub fn on_watermark(&mut self, content: &[u8]) {
        let Some(mark) = Watermark::parse(content) else {
            return;
        };
        let position = self.recent.position();
        let Some(inflight) = self.active.as_mut().and_then(|a| a.inflight.as_mut()) else {
            return;
        };
        if !inflight.low.same_chunk(&mark) {
            return;
        }
        match mark.mark {
            Mark::Low => {
                inflight.window.open();
                inflight.low_position = Some(position);
            }
            Mark::High => inflight.high_seen = true,
        }
    }

    /// Persists the positions of chunks Kafka acknowledged (and every change before them).
    pub async fn persist(&mut self, ctx: &StreamContext, leader: &Client) -> Result<(), CdcError> {
        while let Some(c) = self.pending.front() {
            if !ctx.tracker.is_settled(c.seq) {
                break;
            }
            let last_key = c.last_key.as_ref().map(|k| serde_json::json!(k));
            if c.done {
                leader
                    .execute(
                        "update membersync_meta.cdc_incremental_snapshots
                           set state = 'done', finished_at = now(), current_table = null,
                               last_key = null, rows_emitted = $2, rows_skipped = $3, chunks = $4,
                               error = null, updated_at = now()
                         where id = $1 and state = 'running'",
                        &[&c.id, &c.rows, &c.skipped, &c.chunks],
                    )
                    .await
                    .map_err(IncrementalError::from)?;
                tracing::info!(
                    id = c.id,
                    rows = c.rows,
                    skipped = c.skipped,
                    chunks = c.chunks,
                    "incremental snapshot done"
                );
            } else {
                leader
                    .execute(
                        "update membersync_meta.cdc_incremental_snapshots
                           set current_table = $2, last_key = $3, rows_emitted = $4,
                               rows_skipped = $5, chunks = $6, updated_at = now()
                         where id = $1 and state = 'running'",
                        &[&c.id, &c.table, &last_key, &c.rows, &c.skipped, &c.chunks],
                    )
                    .await
                    .map_err(IncrementalError::from)?;
            }
            self.pending.pop_front();
        }
        Ok(())
    }

    fn stop(&mut self, ctx: &StreamContext) {
        if let Some(mut active) = self.active.take()
            && let Some(task) = active.inflight.take().and_then(|i| i.task)
        {
            task.abort();
        }
        self.active_gauge.set(0);
        ctx.metrics.incremental_tables_remaining.set(0);
    }

    /// Starts the next chunk of the active request.
    fn next_chunk(&mut self, ctx: &StreamContext) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.chunk += 1;
        let low = Watermark {
            snapshot: active.id,
            run: self.run.clone(),
            chunk: active.chunk,
            mark: Mark::Low,
        };
        let req = ChunkRequest {
            table: active.tables[active.index].clone(),
            after: active.after.clone(),
            until: active.until.clone(),
            limit: ctx.config.cdc.incremental_chunk_rows,
            low: low.clone(),
            time_mode: ctx.config.cdc.time_precision_mode,
        };
        ctx.metrics
            .incremental_tables_remaining
            .set((active.tables.len() - active.index) as i64);
        let conn = Arc::clone(&active.conn);
        active.inflight = Some(Inflight {
            low,
            window: Window::default(),
            low_position: None,
            high_seen: false,
            task: Some(tokio::spawn(async move { chunk::read(&conn, &req).await })),
            result: None,
        });
    }

    async fn chunk_failed(
        &mut self,
        ctx: &StreamContext,
        leader: &Client,
        error: ChunkError,
    ) -> Result<(), CdcError> {
        let Some(id) = self.active.as_ref().map(|a| a.id) else {
            return Ok(());
        };
        self.stop(ctx);
        match error {
            ChunkError::Unusable(reason) => fail(leader, id, &reason).await,
            ChunkError::Query(e) => {
                // Retried from the last acknowledged chunk at the next poll, on a new connection.
                tracing::warn!(id, error = %e, "incremental snapshot chunk failed; resuming shortly");
                leader
                    .execute(
                        "update membersync_meta.cdc_incremental_snapshots set error = $2, updated_at = now()
                         where id = $1",
                        &[&id, &e.to_string()],
                    )
                    .await
                    .map_err(IncrementalError::from)?;
                Ok(())
            }
        }
    }

    /// The high watermark arrived: filter the chunk, produce it, move on.
    async fn finish_chunk(
        &mut self,
        ctx: &StreamContext,
        leader: &Client,
        lsn: u64,
    ) -> Result<(), CdcError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(mut inflight) = active.inflight.take() else {
            return Ok(());
        };
        // The query wrote the high watermark as its last step: it has ended or is ending.
        let result = match (inflight.result.take(), inflight.task.as_mut()) {
            (Some(r), _) => r,
            (None, Some(task)) => join(task).await,
            (None, None) => return Ok(()),
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => return self.chunk_failed(ctx, leader, e).await,
        };
        let low_position = inflight.low_position.unwrap_or(0);
        if self.recent.any_before(low_position, &rows.running) {
            // A transaction committed before the low watermark was still invisible to the
            // chunk's snapshot: the chunk may hold its old rows. Read it again.
            tracing::debug!(
                id = active.id,
                chunk = active.chunk,
                "chunk raced a commit; reading it again"
            );
            ctx.metrics
                .incremental_retries
                .with_label_values(&[rows.table.as_str()])
                .inc();
            self.next_chunk(ctx);
            return Ok(());
        }
        let table = rows.table.as_str();
        let (schema, name) = table.split_once('.').expect("validated schema.table");
        let topic = ctx.topics.cdc(schema, name);
        let key_columns = ctx.key_columns(table, &rows.identity);
        let seq = ctx.tracker.begin();
        let ts_us = now_us();
        let (mut produced, mut skipped) = (0i64, 0i64);
        for after in &rows.rows {
            let key = envelope::key(after, &key_columns);
            // No identity (REPLICA IDENTITY NOTHING): nothing to match by but the Kafka key.
            let identity = (!rows.identity.is_empty())
                .then(|| envelope::key(after, &rows.identity))
                .flatten();
            if inflight
                .window
                .drops(&[key.as_deref(), identity.as_deref()])
            {
                skipped += 1;
                continue;
            }
            let mut source = Source::new(
                &ctx.config.kafka.topic_prefix,
                &ctx.config.database.dbname,
                schema,
                name,
                ts_us,
                lsn,
            );
            source.snapshot = Snapshot::Incremental;
            source.sequence = Some(envelope::sequence(None, lsn));
            let event = Envelope::new(Op::Read, None, Some(after), source, None);
            let key = ctx.kafka_key(after, &key_columns);
            if ctx
                .sink
                .send(seq, &topic, key.as_deref(), &event.to_vec())
                .await?
            {
                ctx.metrics.backpressure_waits.inc();
            }
            produced += 1;
        }
        ctx.tracker.commit(seq, lsn, Instant::now());
        let m = &ctx.metrics;
        m.incremental_rows
            .with_label_values(&[table])
            .inc_by(produced as u64);
        m.incremental_skipped
            .with_label_values(&[table])
            .inc_by(skipped as u64);
        m.incremental_chunks.with_label_values(&[table]).inc();
        m.events
            .with_label_values(&[table, Op::Read.as_str()])
            .inc_by(produced as u64);
        active.rows += produced;
        active.skipped += skipped;
        active.chunks += 1;
        if rows.last_chunk {
            tracing::info!(id = active.id, table, "incremental snapshot of table read");
            active.index += 1;
            active.after = None;
            active.until = None;
        } else {
            active.after = rows.last_key;
            active.until = rows.until;
        }
        let done = active.index >= active.tables.len();
        self.pending.push_back(Checkpoint {
            seq,
            id: active.id,
            table: active.tables.get(active.index).cloned(),
            last_key: active.after.clone(),
            rows: active.rows,
            skipped: active.skipped,
            chunks: active.chunks,
            done,
        });
        if done {
            self.stop(ctx);
        } else {
            self.next_chunk(ctx);
        }
        Ok(())
    }
}

async fn join(
    task: &mut JoinHandle<Result<ChunkRows, ChunkError>>,
) -> Result<ChunkRows, ChunkError> {
    match task.await {
        Ok(r) => r,
        Err(e) => Err(ChunkError::Unusable(format!(
            "chunk task ended abnormally: {e}"
        ))),
    }
}

/// The chunk connection, with the replication session's value formats.
async fn connect(ctx: &StreamContext) -> Result<Client, IncrementalError> {
    let client = db::connect(&ctx.config.database, Login::Daemon)
        .await
        .map_err(|e| IncrementalError::Connect(e.to_string()))?;
    client.batch_execute(chunk::SESSION_SETTINGS).await?;
    Ok(client)
}

async fn fail(leader: &Client, id: i64, reason: &str) -> Result<(), CdcError> {
    tracing::error!(id, reason, "incremental snapshot failed");
    leader
        .execute(
            "update membersync_meta.cdc_incremental_snapshots
               set state = 'failed', error = $2, finished_at = now(), updated_at = now()
             where id = $1",
            &[&id, &reason],
        )
        .await
        .map_err(IncrementalError::from)?;
    Ok(())
}
