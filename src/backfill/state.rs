//! The run's persisted progress (`membersync_meta.backfill_runs`, migration V11): which run
//! is open, and the list cursor after the last page whose records Kafka acknowledged.

use tokio_postgres::Client;

/// Serialises backfills against one database: a second `membersync backfill` while one runs
/// would publish every member twice and race on the cursor.
const LOCK_KEY: i64 = 0x6d73_796e_635f_6266; // "msync_bf"

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub id: i64,
    /// `None`: no page finished yet.
    pub cursor: Option<u64>,
    pub pages_done: u64,
    pub members_published: u64,
    pub total_count: Option<u64>,
    pub snapshot_request_id: Option<i64>,
    /// Whether this run was found open (interrupted earlier) rather than started now.
    pub resumed: bool,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Takes the backfill lock for this session; `false` when another backfill holds it.
pub async fn try_lock(db: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = db
        .query_one("select pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    Ok(row.get(0))
}

/// The open run, resumed; or, with `restart` or when none is open, a new one (an open run
/// is then marked abandoned).
pub async fn open(
    db: &Client,
    page_size: u32,
    restart: bool,
) -> Result<Run, tokio_postgres::Error> {
    if restart {
        db.execute(
            "update membersync_meta.backfill_runs set abandoned_at = now(), updated_at = now()
              where completed_at is null and abandoned_at is null",
            &[],
        )
        .await?;
    } else if let Some(row) = db
        .query_opt(
            "select id, cursor, pages_done, members_published, total_count, snapshot_request_id
               from membersync_meta.backfill_runs
              where completed_at is null and abandoned_at is null",
            &[],
        )
        .await?
    {
        return Ok(Run {
            id: row.get(0),
            cursor: row.get::<_, Option<i64>>(1).map(to_u64),
            pages_done: to_u64(row.get(2)),
            members_published: to_u64(row.get(3)),
            total_count: row.get::<_, Option<i64>>(4).map(to_u64),
            snapshot_request_id: row.get(5),
            resumed: true,
        });
    }
    let page_size = i32::try_from(page_size).unwrap_or(100);
    let row = db
        .query_one(
            "insert into membersync_meta.backfill_runs (page_size) values ($1) returning id",
            &[&page_size],
        )
        .await?;
    Ok(Run {
        id: row.get(0),
        cursor: None,
        pages_done: 0,
        members_published: 0,
        total_count: None,
        snapshot_request_id: None,
        resumed: false,
    })
}

/// One more page finished: every record of it acknowledged. Only then the cursor moves.
pub async fn page_done(
    db: &Client,
    run: &mut Run,
    cursor: u64,
    members: u64,
    total_count: u64,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "update membersync_meta.backfill_runs
            set cursor = $2, pages_done = pages_done + 1,
                members_published = members_published + $3,
                total_count = $4, updated_at = now()
          where id = $1",
        &[
            &run.id,
            &to_i64(cursor),
            &to_i64(members),
            &to_i64(total_count),
        ],
    )
    .await?;
    run.cursor = Some(cursor);
    run.pages_done += 1;
    run.members_published += members;
    run.total_count = Some(total_count);
    Ok(())
}

/// The incremental snapshot this run requested (so a resumed run does not request another).
pub async fn snapshot_requested(
    db: &Client,
    run: &mut Run,
    request_id: i64,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "update membersync_meta.backfill_runs set snapshot_request_id = $2, updated_at = now()
          where id = $1",
        &[&run.id, &request_id],
    )
    .await?;
    run.snapshot_request_id = Some(request_id);
    Ok(())
}

pub async fn complete(db: &Client, run: &Run) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "update membersync_meta.backfill_runs set completed_at = now(), updated_at = now()
          where id = $1",
        &[&run.id],
    )
    .await?;
    Ok(())
}
