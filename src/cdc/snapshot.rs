//! The initial snapshot: every row of the captured tables, read under the snapshot the slot
//! exported at its creation, published as `op: "r"` before streaming starts at the slot's
//! consistent point — so each row is either in the snapshot or in the stream, never in
//! neither. Rows are read with a cursor, a batch at a time: memory does not grow with the
//! table.

use std::time::Instant;

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::StreamContext;
use super::envelope::{Envelope, Op, Source, now_ms};
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
    let seq = ctx.tracker.begin();
    let ts_ms = now_ms();
    let mut total = 0u64;
    for table in &ctx.config.cdc.tables {
        let (schema, name) = table.split_once('.').expect("validated schema.table");
        let columns: Vec<(String, u32)> = tx
            .query(
                "select attname::text, atttypid::oid from pg_attribute
                 where attrelid = $1::text::regclass and attnum > 0 and not attisdropped order by attnum",
                &[&table],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
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
                for (i, (col, oid)) in columns.iter().enumerate() {
                    let value = row
                        .get(i)
                        .map_or(Value::Null, |text| text_to_json(*oid, text));
                    after.insert(col.clone(), value);
                }
                let envelope = Envelope {
                    before: None,
                    after: Some(&after),
                    source: Source {
                        version: crate::telemetry::BUILD_VERSION,
                        connector: "membersync",
                        name: &ctx.config.kafka.topic_prefix,
                        ts_ms,
                        snapshot: "true",
                        db: &ctx.config.database.dbname,
                        schema,
                        table: name,
                        tx_id: None,
                        lsn: consistent_point,
                        origin: None,
                        unchanged_columns: &[],
                    },
                    op: Op::Read,
                    ts_ms: now_ms(),
                    transaction: None,
                };
                let key = super::envelope::key(&after, &key_columns);
                ctx.sink
                    .send(seq, &topic, key.as_deref(), &envelope.to_vec())
                    .await?;
                table_rows += 1;
            }
            if fetched == 0 {
                break;
            }
        }
        tx.batch_execute("close membersync_snapshot").await?;
        ctx.metrics
            .events
            .with_label_values(&[table, Op::Read.as_str()])
            .inc_by(table_rows);
        tracing::info!(table, rows = table_rows, "snapshot of table produced");
        total += table_rows;
    }
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
