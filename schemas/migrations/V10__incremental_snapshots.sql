-- V10: incremental snapshots of captured tables (DBLog watermark method, docs/cdc.md).
--
-- A row is both the signal and the progress record. `membersync snapshot` (or any client with
-- insert on this table) requests one by inserting a row; the CDC leader polls for the oldest
-- unfinished row, runs it chunk by chunk while streaming continues, and records after every
-- chunk that Kafka acknowledged its position (`current_table`, `last_key`). A crash or a
-- leader change resumes from there, never from the start.
create table if not exists membersync_meta.cdc_incremental_snapshots (
    id            bigserial primary key,
    -- `schema.table` names, in the order they are snapshotted; empty = every captured table
    -- (the leader fills in the list when it starts).
    tables        text[] not null default '{}',
    requested_at  timestamptz not null default now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    state         text not null default 'requested'
                  check (state in ('requested', 'running', 'done', 'failed', 'cancelled')),
    -- The table being snapshotted and the primary key (JSON array of the key columns' text
    -- values) of the last row of its last acknowledged chunk; null = start of the table.
    current_table text,
    last_key      jsonb,
    rows_emitted  bigint not null default 0,
    -- Rows of a chunk not emitted because the stream changed them inside the chunk's window
    -- (their newer version is already in the topic).
    rows_skipped  bigint not null default 0,
    chunks        bigint not null default 0,
    error         text,
    updated_at    timestamptz not null default now()
);

-- The leader looks for the oldest unfinished request.
create index if not exists cdc_incremental_snapshots_pending
    on membersync_meta.cdc_incremental_snapshots (id)
    where state in ('requested', 'running');

revoke all on membersync_meta.cdc_incremental_snapshots from public;
grant usage on schema membersync_meta to membersync;
grant select, insert, update on membersync_meta.cdc_incremental_snapshots to membersync;
grant usage, select on sequence membersync_meta.cdc_incremental_snapshots_id_seq to membersync;
