//! One chunk, on its own (non-replication) connection: low watermark, a short read-only
//! select of the next `limit` rows by primary key, high watermark. It never waits for the
//! replication stream, so the stream keeps flowing while it runs.

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::WATERMARK_PREFIX;
use super::window::{Mark, Running, Watermark};
use crate::cdc::value::text_to_json;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// Permanent: the request cannot succeed as it stands.
    #[error("{0}")]
    Unusable(String),
}

/// What to read.
#[derive(Debug, Clone)]
pub struct ChunkRequest {
    /// `schema.table`.
    pub table: String,
    /// Primary-key text values of the last row already read; `None` = from the start.
    pub after: Option<Vec<String>>,
    /// The table's greatest primary key when its snapshot started (`None`: not known yet,
    /// read now). Rows inserted later are in the stream anyway; without the bound a busy
    /// table would be chased forever.
    pub until: Option<Vec<String>>,
    pub limit: u32,
    pub low: Watermark,
    /// How temporal values are published (`cdc.time_precision_mode`).
    pub time_mode: crate::cdc::temporal::TimePrecisionMode,
}

#[derive(Debug, Clone)]
pub struct ChunkRows {
    pub table: String,
    /// The columns identifying a row in the stream (replica identity; primary key under
    /// DEFAULT and FULL), for matching window keys.
    pub identity: Vec<String>,
    pub rows: Vec<Map<String, Value>>,
    /// Primary-key text values of the last row read (the next chunk starts after it).
    pub last_key: Option<Vec<String>>,
    /// Fewer rows than asked, or the bound reached: the table is finished.
    pub last_chunk: bool,
    /// The bound used (see [`ChunkRequest::until`]); `None` for an empty table.
    pub until: Option<Vec<String>>,
    /// Transactions running for the chunk's snapshot.
    pub running: Running,
}

/// Session settings pinned like the replication session's, so values (and keys made of
/// them) read here are spelled exactly as the stream spells them.
pub const SESSION_SETTINGS: &str = "set datestyle = 'ISO, MDY'; set timezone = 'UTC';
     set intervalstyle = 'iso_8601'; set extra_float_digits = 3;
     set standard_conforming_strings = on";

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

struct Column {
    name: String,
    oid: u32,
    /// `format_type` spelling, for casting key literals.
    sql_type: String,
    typmod: i32,
}

/// Reads one chunk between two watermarks.
pub async fn read(client: &Client, req: &ChunkRequest) -> Result<ChunkRows, ChunkError> {
    let (schema, name) = req
        .table
        .split_once('.')
        .ok_or_else(|| ChunkError::Unusable(format!("{} is not schema.table", req.table)))?;
    let columns: Vec<Column> = client
        .query(
            "select attname::text, atttypid::oid, format_type(atttypid, atttypmod), atttypmod from pg_attribute
             where attrelid = $1::text::regclass and attnum > 0 and not attisdropped order by attnum",
            &[&req.table],
        )
        .await?
        .iter()
        .map(|r| Column {
            name: r.get(0),
            oid: r.get(1),
            sql_type: r.get(2),
            typmod: r.get(3),
        })
        .collect();
    if columns.is_empty() {
        return Err(ChunkError::Unusable(format!(
            "table {} has no columns visible to the daemon role",
            req.table
        )));
    }
    let pk: Vec<String> = client
        .query(
            "select a.attname::text from pg_index i
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
             where i.indrelid = $1::text::regclass and i.indisprimary
             order by array_position(i.indkey::int2[], a.attnum)",
            &[&req.table],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if pk.is_empty() {
        return Err(ChunkError::Unusable(format!(
            "table {} has no primary key: an incremental snapshot reads it in primary-key order",
            req.table
        )));
    }
    let identity = crate::cdc::snapshot::identity_key(client, &req.table)
        .await
        .map_err(|e| ChunkError::Unusable(e.to_string()))?;
    let pk_index: Vec<usize> =
        pk.iter()
            .map(|k| {
                columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                    ChunkError::Unusable(format!("primary key column {k} not readable"))
                })
            })
            .collect::<Result<_, _>>()?;
    let order = pk
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let table_sql = format!("{}.{}", quote_ident(schema), quote_ident(name));
    let until = match &req.until {
        Some(until) => Some(until.clone()),
        None => {
            let select_pk = pk
                .iter()
                .map(|k| format!("t.{}::text", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", ");
            let desc = pk
                .iter()
                // Qualified: a bare name would sort by the text output column.
                .map(|k| format!("t.{} desc", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", ");
            client
                .query_opt(
                    &format!("select {select_pk} from {table_sql} t order by {desc} limit 1"),
                    &[],
                )
                .await?
                .map(|r| (0..pk.len()).map(|i| r.get::<_, String>(i)).collect())
        }
    };
    let literals = |values: &[String]| -> Result<String, ChunkError> {
        if values.len() != pk.len() {
            return Err(ChunkError::Unusable(format!(
                "the saved position of {} does not match its primary key ({order})",
                req.table
            )));
        }
        Ok(values
            .iter()
            .zip(&pk_index)
            .map(|(v, &i)| format!("{}::{}", quote_literal(v), columns[i].sql_type))
            .collect::<Vec<_>>()
            .join(", "))
    };
    // An empty table still gets its (empty) chunk between watermarks: the driver moves on
    // when the high watermark arrives, as for any chunk.
    let mut filter = match &until {
        Some(until) => format!("where ({order}) <= ({})", literals(until)?),
        None => "where false".to_owned(),
    };
    if let Some(after) = &req.after {
        filter.push_str(&format!(" and ({order}) > ({})", literals(after)?));
    }
    let select = format!(
        "select {} from {table_sql} {filter} order by {order} limit {}",
        columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", "),
        req.limit
    );

    emit(client, &req.low, false).await?;
    // Repeatable read: the running list and the rows come from one snapshot. The transaction
    // lasts one select: nothing is pinned between chunks.
    client
        .batch_execute("begin isolation level repeatable read read only")
        .await?;
    let result = async {
        // xid8 → the 32-bit xid pgoutput sends.
        let row = client
            .query_one(
                "select (pg_snapshot_xmax(s)::text::numeric % 4294967296)::bigint,
                        array(select (x::text::numeric % 4294967296)::bigint
                              from pg_snapshot_xip(s) x)
                 from pg_current_snapshot() s",
                &[],
            )
            .await?;
        let running = Running {
            xmax: row.get::<_, i64>(0) as u32,
            xip: row
                .get::<_, Vec<i64>>(1)
                .into_iter()
                .map(|x| x as u32)
                .collect(),
        };
        let messages = client.simple_query(&select).await?;
        Ok::<_, tokio_postgres::Error>((running, messages))
    }
    .await;
    let (running, messages) = match result {
        Ok(r) => {
            client.batch_execute("commit").await?;
            r
        }
        Err(e) => {
            let _ = client.batch_execute("rollback").await;
            return Err(e.into());
        }
    };
    emit(
        client,
        &Watermark {
            mark: Mark::High,
            ..req.low.clone()
        },
        true,
    )
    .await?;

    let mut rows = Vec::new();
    let mut last_key = None;
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let mut after = Map::with_capacity(columns.len());
        for (i, c) in columns.iter().enumerate() {
            let value = row.get(i).map_or(Value::Null, |t| text_to_json(c.oid, t));
            after.insert(c.name.clone(), value);
        }
        let types = columns.iter().map(|c| crate::cdc::temporal::ColumnType {
            name: &c.name,
            type_oid: c.oid,
            type_modifier: c.typmod,
        });
        crate::cdc::temporal::encode(req.time_mode, &mut after, types);
        last_key = Some(
            pk_index
                .iter()
                .map(|&i| row.get(i).unwrap_or_default().to_owned())
                .collect(),
        );
        rows.push(after);
    }
    Ok(ChunkRows {
        table: req.table.clone(),
        identity,
        last_chunk: rows.len() < req.limit as usize || last_key.is_some() && last_key == until,
        rows,
        last_key,
        until,
        running,
    })
}

/// A watermark (docs/cdc.md explains the choice). The low one is non-transactional: decoded
/// at its own WAL position, no xid, no commit. The high one is transactional, in a transaction
/// of its own (autocommit): its commit flushes the WAL, so both reach the walsender at once
/// (Postgres before 17 does not flush for a non-transactional message, and the walsender
/// only sends flushed WAL: the high watermark would wait up to `wal_writer_delay`).
async fn emit(
    client: &Client,
    mark: &Watermark,
    transactional: bool,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "select pg_logical_emit_message($1, $2::text, $3::text)",
            &[&transactional, &WATERMARK_PREFIX, &mark.to_text()],
        )
        .await?;
    Ok(())
}
