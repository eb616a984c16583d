//! The initial snapshot: every row of the captured tables, read under the snapshot the slot
//! exported at its creation, published as `op: "r"` before streaming starts at the slot's
//! consistent point — so each row is either in the snapshot or in the stream, never in
//! neither. Rows are read with a cursor, a batch at a time: memory does not grow with the
//! table.

use std::time::Instant;

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::StreamContext;
use super::envelope::{Envelope, Op, Snapshot, Source, now_us};
use super::temporal::{self, ColumnType};
use super::value::text_to_json;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Sink(#[from] super::sink::SinkError),
    #[error("Kafka did not acknowledge a snapshot row: {0}")]
    Delivery(String),
    #[error("table {0} has no columns visible to the daemon role")]
    NoColumns(String),
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The key the stream would use for `table`: the replica identity index's columns under
/// REPLICA IDENTITY USING INDEX, none under NOTHING, else the primary key (DEFAULT and FULL).
pub(crate) async fn identity_key(
    tx: &impl tokio_postgres::GenericClient,
    table: &str,
) -> Result<Vec<String>, SnapshotError> {
    let rows = tx
        .query(
            "select a.attname::text
             from pg_class c
             join pg_index i on i.indrelid = c.oid
               and case c.relreplident when 'i' then i.indisreplident when 'n' then false else i.indisprimary end
             join pg_attribute a on a.attrelid = c.oid and a.attnum = any(i.indkey)
             where c.oid = $1::text::regclass
             order by array_position(i.indkey::int2[], a.attnum)",
            &[&table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Reads every captured table under `snapshot_name` and produces the rows; returns the row
/// count once Kafka acknowledged them all. `consistent_point` is the slot's position (the
/// snapshot rows' `source.lsn`).
pub async fn run(
    client: &mut Client,
    ctx: &StreamContext,
    snapshot_name: &str,
    consistent_point: u64,
) -> Result<u64, SnapshotError> {
    let started = Instant::now();
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "set transaction isolation level repeatable read, read only;
         set transaction snapshot '{}'",
        snapshot_name.replace('\'', "''")
    ))
    .await?;
    // Debezium's txId of snapshot rows: the reading transaction's id (32 bits, as pgoutput's).
    let tx_id: i64 = tx
        .query_one(
            "select pg_current_xact_id()::text::bigint % 4294967296",
            &[],
        )
        .await?
        .get(0);
    let seq = ctx.tracker.begin();
    let mut out = Out {
        ctx,
        seq,
        ts_us: now_us(),
        tx_id: u32::try_from(tx_id).ok(),
        lsn: consistent_point,
        pending: None,
        first: true,
    };
    let mut total = 0u64;
    for table in &ctx.config.cdc.tables {
        let (schema, name) = table.split_once('.').expect("validated schema.table");
        let columns: Vec<(String, u32, i32)> = tx
            .query(
                "select attname::text, atttypid::oid, atttypmod from pg_attribute
                 where attrelid = $1::text::regclass and attnum > 0 and not attisdropped order by attnum",
                &[&table],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        if columns.is_empty() {
            return Err(SnapshotError::NoColumns(table.clone()));
        }
        let topic = ctx.topics.cdc(schema, name);
        let identity = identity_key(&tx, table).await?;
        let key_columns = ctx.key_columns(table, &identity);
        tx.batch_execute(&format!(
            "declare membersync_snapshot no scroll cursor for select * from {}.{}",
            quote_ident(schema),
            quote_ident(name)
        ))
        .await?;
        let fetch = format!(
            "fetch {} from membersync_snapshot",
            ctx.config.cdc.snapshot_fetch_rows
        );
        let mut table_rows = 0u64;
        let mut first_in_table = true;
        loop {
            ctx.heartbeat.beat();
            let messages = tx.simple_query(&fetch).await?;
            let mut fetched = 0;
            for message in messages {
                let SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                fetched += 1;
                let mut after = Map::with_capacity(columns.len());
                for (i, (col, oid, _)) in columns.iter().enumerate() {
                    let value = row
                        .get(i)
                        .map_or(Value::Null, |text| text_to_json(*oid, text));
                    after.insert(col.clone(), value);
                }
                let types = columns.iter().map(|(name, oid, typmod)| ColumnType {
                    name,
                    type_oid: *oid,
                    type_modifier: *typmod,
                });
                temporal::encode(ctx.config.cdc.time_precision_mode, &mut after, types);
                let key = ctx.kafka_key(&after, &key_columns);
                out.push(Row {
                    topic: topic.clone(),
                    schema: schema.to_owned(),
                    table: name.to_owned(),
                    key,
                    after,
                    first_in_table,
                    last_in_table: false,
                })
                .await?;
                first_in_table = false;
                table_rows += 1;
            }
            if fetched == 0 {
                break;
            }
        }
        tx.batch_execute("close membersync_snapshot").await?;
        if let Some(p) = out.pending.as_mut() {
            p.last_in_table = true;
        }
        ctx.metrics
            .events
            .with_label_values(&[table, Op::Read.as_str()])
            .inc_by(table_rows);
        tracing::info!(table, rows = table_rows, "snapshot of table produced");
        total += table_rows;
    }
    out.flush(true).await?;
    tx.commit().await?;
    // The snapshot is one "transaction" ending at the consistent point: confirmed when every
    // row is acknowledged.
    ctx.tracker.commit(seq, consistent_point, Instant::now());
    ctx.wait_until_idle().await?;
    tracing::info!(
        rows = total,
        secs = started.elapsed().as_secs_f64(),
        "initial snapshot acknowledged by Kafka"
    );
    Ok(total)
}

/// A snapshot row waiting for the next one: whether it is the last (of its table, of the
/// snapshot) is known only then.
struct Row {
    topic: String,
    schema: String,
    table: String,
    key: Option<Vec<u8>>,
    after: Map<String, Value>,
    first_in_table: bool,
    last_in_table: bool,
}

/// Produces snapshot rows one behind, so that each gets Debezium's `source.snapshot` mark.
struct Out<'a> {
    ctx: &'a StreamContext,
    seq: u64,
    ts_us: i64,
    tx_id: Option<u32>,
    lsn: u64,
    pending: Option<Row>,
    first: bool,
}

impl Out<'_> {
    async fn push(&mut self, row: Row) -> Result<(), SnapshotError> {
        self.flush(false).await?;
        self.pending = Some(row);
        Ok(())
    }

    /// Produces the pending row; `last` when no row follows it.
    async fn flush(&mut self, last: bool) -> Result<(), SnapshotError> {
        let Some(row) = self.pending.take() else {
            return Ok(());
        };
        let ctx = self.ctx;
        let mut source = Source::new(
            &ctx.config.kafka.topic_prefix,
            &ctx.config.database.dbname,
            &row.schema,
            &row.table,
            self.ts_us,
            self.lsn,
        );
        source.snapshot = Snapshot::of_row(self.first, last, row.first_in_table, row.last_in_table);
        source.tx_id = self.tx_id;
        source.sequence = Some(super::envelope::sequence(None, self.lsn));
        self.first = false;
        let envelope = Envelope::new(Op::Read, None, Some(&row.after), source, None);
        ctx.sink
            .send(self.seq, &row.topic, row.key.as_deref(), &envelope.to_vec())
            .await?;
        Ok(())
    }
}
