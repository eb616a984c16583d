-- V11: progress of `membersync backfill` (docs/backfill.md), outside `public` like V6.
--
-- One row per run. `cursor` is the Memberstack list cursor (`endCursor`) of the last page
-- whose snapshot records were ALL acknowledged by Kafka; it is written only after that, so
-- a run interrupted anywhere (kill -9 included) resumes after the last finished page and
-- re-reads at most the pages it had not finished. At most one run is open (neither
-- completed nor abandoned); `--restart` abandons it and starts a new one.
create table if not exists membersync_meta.backfill_runs (
    id                  bigserial primary key,
    started_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    completed_at        timestamptz,
    abandoned_at        timestamptz,
    page_size           integer     not null check (page_size between 1 and 100),
    -- null: no page finished yet (start from the beginning).
    cursor              bigint,
    pages_done          bigint      not null default 0,
    members_published   bigint      not null default 0,
    -- Memberstack's totalCount as of the last page read.
    total_count         bigint,
    -- The incremental snapshot requested for the captured tables (cdc incremental
    -- snapshots' signal id), when the run triggered one.
    snapshot_request_id bigint
);

create unique index if not exists backfill_runs_one_open
    on membersync_meta.backfill_runs ((true))
 where completed_at is null and abandoned_at is null;

revoke all on membersync_meta.backfill_runs from public;
grant usage on schema membersync_meta to membersync;
grant select, insert, update on membersync_meta.backfill_runs to membersync;
grant usage, select on sequence membersync_meta.backfill_runs_id_seq to membersync;
