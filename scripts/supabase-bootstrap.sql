-- supabase-bootstrap.sql: a local stand-in for the parts of a Supabase database that
-- membersync relies on. It is NOT a migration: on a real Supabase project all of this
-- already exists (created by supabase/postgres's init scripts and supabase/auth's
-- migrations). It is applied by `scripts/dev-services` to the dev database and by the
-- test harness to every fresh test database, as a superuser.
--
-- Rules for this file:
--   * idempotent: it runs on every dev start and on every new test database;
--   * safe when several databases of the same cluster are bootstrapped at once
--     (parallel tests): roles, role memberships and role settings are cluster-wide, so
--     every cluster-wide change is taken under a cluster-wide lock, re-checked, and
--     wrapped in an exception handler that tolerates a concurrent creator;
--   * plain SQL for the simple-query protocol (tokio-postgres `batch_execute`, or
--     `psql --single-transaction -f`): no psql meta-commands. One simple query runs as one
--     implicit transaction, so the lock below is held until the end of the script.
--
-- What it follows (docs/external-services.md §8.1-§8.3):
--   * roles: supabase/postgres migrations/db/init-scripts/00000000000000-initial-schema.sql
--   * auth.users and auth.uid()/role()/email()/jwt(): supabase/auth migrations, current
--     definitions (20220224000811_update_auth_functions, 20220531120530_add_auth_jwt_function,
--     20240624145325_recreate_auth_functions, 20240612123726_enable_rls_update_grants).
-- Left out on purpose: supabase_admin (a superuser; Supabase grants it to authenticator,
-- which a local stand-in has no use for), the replication/etl/read-only users, the
-- `extensions` schema, and the rest of the auth schema (sessions, identities, ...).

-- ---------------------------------------------------------------------------------------
-- 1. Cluster-wide: roles (serialised across databases)
-- ---------------------------------------------------------------------------------------

do $bootstrap$
declare
  r record;
begin
  -- A shared catalog's lock is cluster-wide (advisory locks are per database), so this
  -- serialises concurrent bootstraps of different databases until the end of the
  -- transaction; the exception handlers below still cover a concurrent creator that does
  -- not take this lock (e.g. a migration creating its own role).
  lock table pg_catalog.pg_authid in share row exclusive mode;

  -- create role anon nologin noinherit; create role authenticated nologin noinherit;
  -- create role service_role nologin noinherit bypassrls; create user authenticator noinherit;
  for r in
    select * from (values
      ('anon',          'nologin noinherit'),
      ('authenticated', 'nologin noinherit'),
      ('service_role',  'nologin noinherit bypassrls'),
      ('authenticator', 'login noinherit')
    ) as t(name, attrs)
  loop
    if not exists (select 1 from pg_catalog.pg_roles where rolname = r.name) then
      begin
        execute format('create role %I %s', r.name, r.attrs);
      exception when duplicate_object or unique_violation then
        null; -- created concurrently by another bootstrap
      end;
    end if;
  end loop;

  -- grant anon, authenticated, service_role to authenticator (PostgREST logs in as
  -- authenticator and SET ROLEs to the JWT's role).
  for r in select unnest(array['anon', 'authenticated', 'service_role']) as name loop
    if not pg_catalog.pg_has_role('authenticator', r.name, 'member') then
      begin
        execute format('grant %I to authenticator', r.name);
      exception when duplicate_object or unique_violation then
        null;
      end;
    end if;
  end loop;

  -- alter role anon set statement_timeout = '3s';
  -- alter role authenticated set statement_timeout = '8s';
  for r in
    select * from (values ('anon', '3s'), ('authenticated', '8s')) as t(name, timeout)
  loop
    if not exists (
      select 1
      from pg_catalog.pg_db_role_setting s
      join pg_catalog.pg_roles ro on ro.oid = s.setrole
      where s.setdatabase = 0
        and ro.rolname = r.name
        and ('statement_timeout=' || r.timeout) = any (s.setconfig)
    ) then
      begin
        execute format('alter role %I set statement_timeout = %L', r.name, r.timeout);
      exception when duplicate_object or unique_violation then
        null;
      end;
    end if;
  end loop;
end
$bootstrap$;

-- ---------------------------------------------------------------------------------------
-- 2. Per database: schema auth, auth.users, auth functions
-- ---------------------------------------------------------------------------------------

create schema if not exists auth;
comment on schema auth is 'Local stand-in for Supabase Auth''s schema (scripts/supabase-bootstrap.sql).';

-- The columns of supabase/auth's auth.users that a client of Supabase can see, with the
-- types of the current schema (base table, then later migrations). created_at and
-- updated_at have no default: GoTrue sets them.
create table if not exists auth.users (
  instance_id                 uuid,
  id                          uuid not null,
  aud                         varchar(255),
  "role"                      varchar(255),
  email                       varchar(255),
  encrypted_password          varchar(255),
  email_confirmed_at          timestamptz,
  invited_at                  timestamptz,
  confirmation_token          varchar(255),
  confirmation_sent_at        timestamptz,
  recovery_token              varchar(255),
  recovery_sent_at            timestamptz,
  email_change_token_new      varchar(255),
  email_change                varchar(255),
  email_change_sent_at        timestamptz,
  last_sign_in_at             timestamptz,
  raw_app_meta_data           jsonb,
  raw_user_meta_data          jsonb,
  is_super_admin              boolean,
  created_at                  timestamptz,
  updated_at                  timestamptz,
  phone                       text default null,
  phone_confirmed_at          timestamptz,
  phone_change                text default '',
  phone_change_token          varchar(255) default '',
  phone_change_sent_at        timestamptz,
  confirmed_at                timestamptz
    generated always as (least(email_confirmed_at, phone_confirmed_at)) stored,
  email_change_token_current  varchar(255) default '',
  email_change_confirm_status smallint default 0
    check (email_change_confirm_status >= 0 and email_change_confirm_status <= 2),
  banned_until                timestamptz,
  reauthentication_token      varchar(255) default '',
  reauthentication_sent_at    timestamptz,
  is_sso_user                 boolean not null default false,
  deleted_at                  timestamptz,
  is_anonymous                boolean not null default false,
  constraint users_pkey primary key (id),
  constraint users_phone_key unique (phone)
);
comment on table auth.users is 'Auth: Stores user login data within a secure schema.';
comment on column auth.users.is_sso_user is 'Auth: Set this column to true when the account comes from SSO. These accounts can have duplicate emails.';

create index if not exists users_instance_id_idx on auth.users using btree (instance_id);
create index if not exists users_instance_id_email_idx on auth.users using btree (instance_id, lower(email::text));
create unique index if not exists users_email_partial_key on auth.users (email) where (is_sso_user = false);
create index if not exists users_is_anonymous_idx on auth.users using btree (is_anonymous);

alter table auth.users enable row level security;

-- Current definitions (supabase/auth 20220224000811 + 20220531120530, search_path pinned
-- as in 20240624145325): a single claim setting (old PostgREST) or the claims JSON.
create or replace function auth.uid()
  returns uuid
  language sql stable
  set search_path to ''
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim.sub', true), ''),
      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;

create or replace function auth.role()
  returns text
  language sql stable
  set search_path to ''
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim.role', true), ''),
      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
    )::text
$$;

create or replace function auth.email()
  returns text
  language sql stable
  set search_path to ''
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim.email', true), ''),
      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
    )::text
$$;

create or replace function auth.jwt()
  returns jsonb
  language sql stable
  set search_path to ''
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim', true), ''),
      nullif(current_setting('request.jwt.claims', true), '')
    )::jsonb
$$;

comment on function auth.uid() is 'Deprecated. Use auth.jwt() -> ''sub'' instead.';
comment on function auth.role() is 'Deprecated. Use auth.jwt() -> ''role'' instead.';
comment on function auth.email() is 'Deprecated. Use auth.jwt() -> ''email'' instead.';

grant usage on schema auth to anon, authenticated, service_role;
grant execute on function auth.uid(), auth.role(), auth.email(), auth.jwt()
  to anon, authenticated, service_role;

-- ---------------------------------------------------------------------------------------
-- 3. Per database: schema public as Supabase sets it up
-- ---------------------------------------------------------------------------------------

-- Every table, function and sequence later created in public by this user (the migrating
-- superuser, `postgres`) is fully granted to the API roles: Row Level Security is what
-- keeps anon and authenticated out. (Supabase also grants them to postgres itself.)
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;

-- ---------------------------------------------------------------------------------------
-- 4. Per database: the (empty) Realtime publication
-- ---------------------------------------------------------------------------------------

do $bootstrap$
begin
  if not exists (select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
end
$bootstrap$;
