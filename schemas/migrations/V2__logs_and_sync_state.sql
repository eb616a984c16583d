-- V2: the log tables and the daemon's per-field sync state. See docs/schema.md.

-- ---------------------------------------------------------------------------------------
-- user_logs: the sync rules' change log, with their SQL fixed: PostgreSQL has no inline
-- INDEX clause (separate CREATE INDEX below), and change_type accepts the rules' own
-- 'subscription_updated' plus 'conflict_resolved'.
-- ---------------------------------------------------------------------------------------
create table public.user_logs (
  id             uuid        not null default gen_random_uuid(),
  user_id        uuid                 references auth.users (id) on delete cascade,
  memberstack_id text,
  change_type    text        not null,
  old_data       jsonb,
  new_data       jsonb,
  source         text        not null,
  created_at     timestamptz not null default now(),
  constraint user_logs_pkey primary key (id),
  constraint user_logs_change_type_check check (change_type in (
    'created', 'updated', 'deleted', 'synced', 'subscription_updated', 'conflict_resolved'
  )),
  constraint user_logs_source_check check (source in (
    'memberstack', 'supabase', 'stripe', 'membersync'
  ))
);

comment on table public.user_logs is 'membersync: change log per member (sync rules).';

create index idx_user_logs_user_id on public.user_logs (user_id);
create index idx_user_logs_created_at on public.user_logs (created_at);
create index idx_user_logs_memberstack_id on public.user_logs (memberstack_id, created_at);

-- ---------------------------------------------------------------------------------------
-- error_logs: failed changes (one row per change sent to the DLQ). No foreign keys:
-- recording an error must never fail.
-- ---------------------------------------------------------------------------------------
create table public.error_logs (
  id             uuid        not null default gen_random_uuid(),
  user_id        uuid,
  memberstack_id text,
  error_type     text        not null,
  error_message  text        not null,
  context        jsonb                default '{}'::jsonb,
  retry_count    integer     not null default 0,
  created_at     timestamptz not null default now(),
  constraint error_logs_pkey primary key (id),
  constraint error_logs_retry_count_check check (retry_count >= 0)
);

comment on table public.error_logs is 'membersync: sync failures (daemon only).';

create index error_logs_created_at_idx on public.error_logs (created_at);
create index error_logs_memberstack_id_idx on public.error_logs (memberstack_id);

-- ---------------------------------------------------------------------------------------
-- webhook_log: one row per processed event; event_id unique gives exactly-once effect.
-- ---------------------------------------------------------------------------------------
create table public.webhook_log (
  id             uuid        not null default gen_random_uuid(),
  event_id       text        not null,
  source         text        not null,
  event_type     text,
  memberstack_id text,
  payload        jsonb,
  result         jsonb,
  processed_at   timestamptz not null default now(),
  constraint webhook_log_pkey primary key (id),
  constraint webhook_log_event_id_key unique (event_id)
);

comment on table public.webhook_log is
  'membersync: processed events (svix-id, Stripe event id, CDC position), for deduplication.';

create index webhook_log_memberstack_id_idx on public.webhook_log (memberstack_id);
create index webhook_log_processed_at_idx on public.webhook_log (processed_at);

-- ---------------------------------------------------------------------------------------
-- audit_logs: administrative actions (DLQ replay, backfill, admin API calls).
-- ---------------------------------------------------------------------------------------
create table public.audit_logs (
  id         uuid        not null default gen_random_uuid(),
  actor      text        not null,
  action     text        not null,
  target     text,
  details    jsonb       not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  constraint audit_logs_pkey primary key (id)
);

comment on table public.audit_logs is 'membersync: administrative actions (daemon only).';

create index audit_logs_created_at_idx on public.audit_logs (created_at);

-- ---------------------------------------------------------------------------------------
-- sync_state: per member and field, what was last synced and what the daemon last pushed
-- (conflict resolution by timestamp, echo suppression).
-- ---------------------------------------------------------------------------------------
create table public.sync_state (
  memberstack_id    text        not null,
  field             text        not null,
  last_synced_at    timestamptz not null,
  last_value        jsonb,
  last_pushed_value jsonb,
  last_source       text,
  constraint sync_state_pkey primary key (memberstack_id, field)
);

comment on table public.sync_state is 'membersync: per-field sync state (daemon only).';
