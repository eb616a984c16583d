-- V17: the member's Stripe customer, and audit rows from the API role (issue #16, item 9).
--
-- A Stripe event without `metadata.memberstack_user_id` names only its customer. Memberstack's
-- member object carries that customer (`stripeCustomerId`); merge keeps it on the member's row
-- whenever a change from Memberstack shows it (plan events re-read the member, snapshots are
-- the whole member), and maps such an event to its member through it.
alter table public.members add column stripe_customer_id text;

comment on column public.members.stripe_customer_id is
  'membersync: the member''s Stripe customer (Memberstack''s stripeCustomerId), kept by merge.';

create index members_stripe_customer_id_idx on public.members (stripe_customer_id)
  where stripe_customer_id is not null;

-- Merge records a member's resync (`POST /v1/members/me/resync`) in audit_logs when it applies
-- the snapshot the resync published: the API role stays read-only, and the row commits once,
-- with the decision. (The command-line tools, backfill among them, log in as membersync, which
-- may insert already, V3.)
grant insert on public.audit_logs to membersync_merge;
create policy audit_logs_membersync_merge_insert on public.audit_logs
  for insert to membersync_merge with check (true);

-- Deleted members' tombstones (issue #16, item 6): after `member.deleted`, merge ignores (and
-- logs) every later change of that member — a delayed `member.created` or `member.updated`, an
-- application edit of its row, a Stripe event — and pushes nothing for it. Kept whatever
-- `merge.on_member_deleted` says (with `ignore` the row keeps no trace of the deletion), on the
-- member's Memberstack intent, which housekeeping then never prunes.
alter table membersync_meta.merge_intents add column if not exists deleted_at timestamptz;

comment on column membersync_meta.merge_intents.deleted_at is
  'membersync: when Memberstack deleted the member (a tombstone: later changes are ignored).';

-- Column edit times comparable with the CDC commit time (issue #16, item 4). V9 recorded the
-- writing transaction's start (`now()`): in a transaction that began before a Memberstack edit
-- and wrote after it, the column looked older than the Memberstack edit although its value was
-- set later. The time of the write itself (`clock_timestamp()`, at or before the commit the CDC
-- event carries) is when the value was set; merge dates a Supabase edit by it both before its
-- CDC event arrives and when it does, so one edit is judged by one time.
create or replace function membersync_meta.record_member_column_edits()
  returns trigger
  language plpgsql
  security definer
  set search_path to ''
as $$
begin
  insert into membersync_meta.member_column_edits as e (member_id, column_name, edited_at)
  select new.id, n.key, pg_catalog.clock_timestamp()
    from pg_catalog.jsonb_each(pg_catalog.to_jsonb(new)) n
    left join pg_catalog.jsonb_each(
           case when tg_op = 'UPDATE' then pg_catalog.to_jsonb(old) end) o
      on o.key = n.key
   where n.key not in ('updated_at', 'created_at', 'id')
     and (tg_op = 'INSERT' or o.value is distinct from n.value)
  on conflict (member_id, column_name) do update set edited_at = excluded.edited_at;
  return null;
end
$$;
