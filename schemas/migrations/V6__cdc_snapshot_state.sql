-- V6: bookkeeping for CDC's initial snapshot, outside `public` (PostgREST does not expose
-- membersync_meta; `membersync migrate` creates that schema before running migrations).
--
-- A row is written BEFORE the replication slot is created and completed only after every
-- snapshot row is acknowledged by Kafka. A slot whose row is not completed therefore belongs
-- to a snapshot that was interrupted (crash, kill -9): the daemon drops that slot and starts
-- the snapshot again, so no change between the snapshot and the stream is ever skipped.
create table if not exists membersync_meta.cdc_snapshots (
    slot_name        text primary key,
    consistent_point pg_lsn,
    started_at       timestamptz not null default now(),
    completed_at     timestamptz,
    rows             bigint not null default 0
);

revoke all on membersync_meta.cdc_snapshots from public;
grant usage on schema membersync_meta to membersync;
grant select, insert, update, delete on membersync_meta.cdc_snapshots to membersync;
