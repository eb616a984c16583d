-- V13: (1) a size limit on the members columns a signed-in user may write, and (2) the CDC
-- leader's liveness lease. See docs/schema.md (V13) and docs/cdc.md.
--
-- (1) V5 lets `authenticated` update project_data, usage_stats and custom_fields of its own
-- row, with no limit on their size. Every members change is one Kafka record on the CDC
-- topic, and Kafka refuses a record over its size limit (1,000,000 bytes by default): one
-- user storing a 1 MB value produced a change no broker accepts. CDC no longer wedges on
-- such a record (it publishes a reference record and a dead letter instead, docs/cdc.md),
-- but the row should not get that large in the first place. Each of the three columns is
-- limited to 65,536 bytes of JSON text (`octet_length(col::text)`, the form CDC publishes,
-- not the compressed on-disk size), so a whole row stays far below the record limit.
--
-- The limit applies to every writer (membersync's merge included: a Memberstack value over
-- it fails that write, which merge dead-letters). To change it, replace the constraint as
-- the table owner, e.g. for 256 KiB:
--
--   alter table public.members drop constraint members_project_data_size,
--     add constraint members_project_data_size
--       check (octet_length(project_data::text) <= 262144) not valid;
--
-- NOT VALID: rows already larger are not checked now (the migration must not fail on an
-- existing database); any new write of such a row must bring it under the limit. Find them
-- with `select id from public.members where octet_length(project_data::text) > 65536`, fix
-- them, then `alter table public.members validate constraint members_project_data_size`.
alter table public.members
    add constraint members_project_data_size
        check (octet_length(project_data::text) <= 65536) not valid,
    add constraint members_usage_stats_size
        check (octet_length(usage_stats::text) <= 65536) not valid,
    add constraint members_custom_fields_size
        check (octet_length(custom_fields::text) <= 65536) not valid;

-- (2) Leadership of a slot is an advisory lock on the leader's session. A leader that hangs
-- with its connection up (a stopped process, a partition the server has not noticed) would
-- keep it for as long as TCP keeps the session (hours). The leader therefore renews a lease
-- here every `cdc.leader_heartbeat_interval_ms`, with its backend pid; a standby that finds
-- the lease older than `cdc.leader_lease_timeout_secs` (by the database's clock) while that
-- pid still holds the lock terminates that backend (pg_terminate_backend: allowed for a
-- backend of the same role) and takes the lock.
create table if not exists membersync_meta.cdc_leaders (
    slot_name    text primary key,
    -- pg_backend_pid() of the leader's lock session.
    pid          integer     not null,
    -- application_name and host of the leader, for operators.
    holder       text        not null,
    acquired_at  timestamptz not null default now(),
    heartbeat_at timestamptz not null default now()
);

revoke all on membersync_meta.cdc_leaders from public;
grant usage on schema membersync_meta to membersync;
grant select, insert, update on membersync_meta.cdc_leaders to membersync;
