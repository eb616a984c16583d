-- V1: the daemon's role and the synced record, `public.members`.
-- See docs/schema.md. Applied by `membersync migrate` (refinery; one transaction per file).

-- ---------------------------------------------------------------------------------------
-- The daemon's role. Cluster-wide, created only if missing; no password here (the operator
-- sets one: `alter role membersync password '...'`). LOGIN REPLICATION for the CDC slot;
-- neither superuser nor BYPASSRLS: Row Level Security is bypassed for the daemon by its
-- own policies (V3), and it owns no table, so it can neither drop nor alter them.
-- Many databases of one cluster may run this at the same time (parallel tests): a
-- concurrent creator shows up as duplicate_object or unique_violation and is fine.
-- ---------------------------------------------------------------------------------------
do $migration$
declare
  existing record;
begin
  select rolsuper, rolbypassrls, rolreplication, rolcanlogin
    into existing
    from pg_catalog.pg_roles
   where rolname = 'membersync';

  if not found then
    begin
      create role membersync
        login replication
        nosuperuser nocreatedb nocreaterole nobypassrls;
    exception
      when duplicate_object or unique_violation then
        null; -- created concurrently by another database's migration
      when insufficient_privilege then
        raise exception using
          errcode = 'insufficient_privilege',
          message = 'cannot create role "membersync" with LOGIN REPLICATION: ' || sqlerrm,
          hint    = 'Before PostgreSQL 16 only a superuser may create a REPLICATION role. '
                    'Have a superuser run: create role membersync login replication; '
                    'then run the migrations again (see docs/schema.md).';
    end;
  elsif existing.rolsuper or existing.rolbypassrls then
    raise warning 'role "membersync" is SUPERUSER or BYPASSRLS: Row Level Security does not '
                  'restrict it; membersync needs neither (see docs/schema.md)';
  elsif not existing.rolreplication or not existing.rolcanlogin then
    raise warning 'role "membersync" lacks LOGIN or REPLICATION: the daemon cannot log in or '
                  'stream changes (see docs/schema.md)';
  end if;
end
$migration$;

-- ---------------------------------------------------------------------------------------
-- members: one row per Memberstack member, the record both sides are synced into.
-- ---------------------------------------------------------------------------------------
create table public.members (
  id                      uuid        not null default gen_random_uuid(),
  -- The Supabase auth user; null until the daemon has created or found it.
  user_id                 uuid                 references auth.users (id) on delete set null,
  memberstack_id          text        not null,
  email                   text,
  -- Normalised status (sync rules' enum); the raw Memberstack/Stripe status is kept too.
  subscription_status     text        not null default 'free',
  subscription_status_raw text,
  plan_id                 text,
  custom_fields           jsonb       not null default '{}'::jsonb,
  project_data            jsonb       not null default '{}'::jsonb,
  usage_stats             jsonb       not null default '{}'::jsonb,
  -- Soft delete: set when the member is deleted in Memberstack.
  deleted_at              timestamptz,
  created_at              timestamptz not null default now(),
  updated_at              timestamptz not null default now(),
  last_synced_at          timestamptz,
  constraint members_pkey primary key (id),
  constraint members_memberstack_id_key unique (memberstack_id),
  constraint members_memberstack_id_check check (memberstack_id <> ''),
  constraint members_subscription_status_check
    check (subscription_status in ('active', 'inactive', 'cancelled', 'free')),
  constraint members_custom_fields_check check (jsonb_typeof(custom_fields) = 'object')
);

comment on table public.members is
  'membersync: one row per Memberstack member, synced both ways (docs/schema.md).';
comment on column public.members.user_id is 'auth.users.id of the member; null until known.';
comment on column public.members.subscription_status_raw is
  'Status as Memberstack/Stripe reported it (e.g. ACTIVE, past_due, trialing).';
comment on column public.members.deleted_at is 'Soft delete: the member was deleted in Memberstack.';

create index members_user_id_idx on public.members (user_id);
create index members_email_lower_idx on public.members (lower(email));

-- updated_at follows every real change of the row.
create function public.membersync_set_updated_at()
  returns trigger
  language plpgsql
  set search_path to ''
as $$
begin
  new.updated_at := pg_catalog.now();
  return new;
end
$$;

comment on function public.membersync_set_updated_at() is
  'membersync: trigger keeping updated_at current.';

-- Supabase's default privileges grant every new function in public to the API roles.
revoke all on function public.membersync_set_updated_at() from public, anon, authenticated;

create trigger members_set_updated_at
  before update on public.members
  for each row
  when (old.* is distinct from new.*)
  execute function public.membersync_set_updated_at();
