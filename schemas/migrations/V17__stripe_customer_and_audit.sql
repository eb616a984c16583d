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
