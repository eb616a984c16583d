-- V8: what merge needs beyond V2 (docs/merge.md, docs/schema.md).
--
-- sync_state gains the time of the last push to Memberstack, the pushed values whose webhooks
-- have not come back yet (echo suppression), the field's value in the last webhook and in the
-- last CDC event (both streams carry whole members: an unchanged value is not an edit), and
-- when the row last changed.
alter table public.sync_state
  add column pushed_at  timestamptz,
  add column echoes     jsonb       not null default '[]'::jsonb,
  add column memberstack_seen jsonb,
  add column supabase_seen    jsonb,
  add column updated_at timestamptz not null default now(),
  add constraint sync_state_echoes_check check (jsonb_typeof(echoes) = 'array');

comment on column public.sync_state.echoes is
  'membersync: values pushed to Memberstack whose webhook has not come back yet ({value, at}).';

-- `dlq list` shows which dead letters were replayed (audit_logs rows of action dlq_replay).
grant select on public.audit_logs to membersync;

-- When the Auth admin API answers "email exists" for a member's email, merge links the
-- existing auth user. auth.users belongs to Supabase Auth and has RLS on; instead of a grant
-- and a policy on a table membersync does not own, one narrow SECURITY DEFINER function in
-- the daemon's private schema answers exactly that question.
create schema if not exists membersync_meta;
revoke all on schema membersync_meta from public;
grant usage on schema membersync_meta to membersync;

create function membersync_meta.auth_user_id_by_email(p_email text)
  returns uuid
  language sql
  stable
  security definer
  set search_path to ''
as $$
  select u.id
    from auth.users u
   where lower(u.email) = lower(p_email)
     and u.deleted_at is null
     and not u.is_sso_user
   order by u.created_at
   limit 1
$$;

revoke all on function membersync_meta.auth_user_id_by_email(text) from public;
grant execute on function membersync_meta.auth_user_id_by_email(text) to membersync;
