-- V12: merge's transactional outbox (docs/merge.md, "The outbox").
--
-- Merge decides a change in one short transaction with no network I/O. What the change asks
-- of the outside world is written here in that same transaction, and applied afterwards by
-- merge's appliers, outside any member lock:
--
-- * merge_intents: per member and target, the desired external state. Memberstack: the
--   mapped fields to set (`{field name: value}`); Supabase Auth: the auth user's email and
--   user_metadata. Later changes of the member merge into the same row (coalescing), so a
--   member edited 50 times while a push waits gets one PATCH of the latest values. An
--   applier claims a row with a lease (`claimed_until`) — never a row lock held across HTTP —
--   and several merge instances share the rows (`for update skip locked` on claim).
--   A row whose `desired` is empty is kept for a while to remember `last_applied_at`, which
--   paces one member's pushes (fairness); the pruner deletes it afterwards.
-- * outcome_outbox: the outcome record of each processed change, produced to `<prefix>.sync`
--   (and PostHog) by the outcome relay, then deleted. A crash re-sends the same record.
--   `awaiting_auth`: the change creates the member's auth user; its outcome names the user,
--   so it waits for the Auth applier (and so do the member's later outcomes: per-member order).
create table if not exists membersync_meta.merge_intents (
    memberstack_id  text        not null,
    target          text        not null check (target in ('memberstack', 'auth')),
    desired         jsonb       not null default '{}'::jsonb check (jsonb_typeof(desired) = 'object'),
    -- Bumped by every change of `desired`: an applier that pushed version N deletes only
    -- what it pushed, and only if nothing newer arrived meanwhile.
    version         bigint      not null default 1,
    -- Fairness: the oldest waiting member goes first; a member pushed again goes to the back.
    queued_at       timestamptz not null default now(),
    -- Backoff after a failure, and per-member pacing after a push.
    not_before      timestamptz not null default now(),
    claimed_until   timestamptz,
    -- The claiming session (pg_backend_pid): a claim whose session is gone is free again.
    claimed_pid     integer,
    last_applied_at timestamptz,
    -- The current failure episode: attempts, since when, whether it was reported as late.
    attempts        integer     not null default 0,
    failing_since   timestamptz,
    late_reported   boolean     not null default false,
    last_error      text,
    -- The latest change that contributed (event id, topic, partition, offset, key, value,
    -- headers): a permanent failure is dead-lettered as that record, so `dlq replay`
    -- re-feeds it and merge resolves it again against the current state.
    origin          jsonb,
    updated_at      timestamptz not null default now(),
    primary key (memberstack_id, target)
);

create index if not exists merge_intents_due
    on membersync_meta.merge_intents (target, queued_at)
 where desired <> '{}'::jsonb;

create table if not exists membersync_meta.outcome_outbox (
    seq           bigserial   primary key,
    member_id     text,
    event_id      text        not null,
    payload       jsonb       not null,
    awaiting_auth boolean     not null default false,
    claimed_until timestamptz,
    claimed_pid   integer,
    created_at    timestamptz not null default now()
);

create index if not exists outcome_outbox_member
    on membersync_meta.outcome_outbox (member_id, seq);

revoke all on membersync_meta.merge_intents, membersync_meta.outcome_outbox from public;
grant usage on schema membersync_meta to membersync;
grant select, insert, update, delete on membersync_meta.merge_intents to membersync;
grant select, insert, update, delete on membersync_meta.outcome_outbox to membersync;
grant usage, select on sequence membersync_meta.outcome_outbox_seq_seq to membersync;
