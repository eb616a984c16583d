-- V3: Row Level Security on every table and least-privilege grants. See docs/schema.md.
--
-- On Supabase every table created in public is fully granted to anon, authenticated and
-- service_role (default privileges), and PostgREST serves it to anyone holding the anon
-- key: RLS is the only thing between a table and the internet. So:
--   * RLS is enabled on every table of ours;
--   * members and user_logs: an authenticated user reaches only its own rows
--     ((select auth.uid()) = user_id), one policy per command, so it can neither read,
--     insert, update into, nor move a row to another user; anon gets nothing;
--   * error_logs, webhook_log, audit_logs, sync_state: no privilege and no policy for
--     anon or authenticated (internal to the daemon);
--   * TRUNCATE, REFERENCES and TRIGGER are revoked from the API roles (TRUNCATE ignores RLS);
--   * the daemon (role membersync) gets only the privileges it uses, and policies
--     `to membersync using (true) with check (true)` instead of BYPASSRLS.
-- service_role keeps Supabase's grants: it is the project's admin key and has BYPASSRLS.

alter table public.members     enable row level security;
alter table public.user_logs   enable row level security;
alter table public.error_logs  enable row level security;
alter table public.webhook_log enable row level security;
alter table public.audit_logs  enable row level security;
alter table public.sync_state  enable row level security;

-- ---------------------------------------------------------------------------------------
-- API roles
-- ---------------------------------------------------------------------------------------
revoke all on public.members, public.user_logs, public.error_logs, public.webhook_log,
              public.audit_logs, public.sync_state
  from anon, authenticated;

grant select, insert, update, delete on public.members, public.user_logs to authenticated;

create policy members_select_own on public.members
  for select to authenticated
  using ((select auth.uid()) = user_id);
create policy members_insert_own on public.members
  for insert to authenticated
  with check ((select auth.uid()) = user_id);
create policy members_update_own on public.members
  for update to authenticated
  using ((select auth.uid()) = user_id)
  with check ((select auth.uid()) = user_id);
create policy members_delete_own on public.members
  for delete to authenticated
  using ((select auth.uid()) = user_id);

create policy user_logs_select_own on public.user_logs
  for select to authenticated
  using ((select auth.uid()) = user_id);
create policy user_logs_insert_own on public.user_logs
  for insert to authenticated
  with check ((select auth.uid()) = user_id);
create policy user_logs_update_own on public.user_logs
  for update to authenticated
  using ((select auth.uid()) = user_id)
  with check ((select auth.uid()) = user_id);
create policy user_logs_delete_own on public.user_logs
  for delete to authenticated
  using ((select auth.uid()) = user_id);

-- ---------------------------------------------------------------------------------------
-- The daemon
-- ---------------------------------------------------------------------------------------
grant usage on schema public to membersync;

grant select, insert, update         on public.members     to membersync;
grant insert                         on public.user_logs   to membersync;
grant select, insert                 on public.error_logs  to membersync;
grant select, insert                 on public.webhook_log to membersync;
grant insert                         on public.audit_logs  to membersync;
grant select, insert, update, delete on public.sync_state  to membersync;

-- The privileges above decide what the daemon may do; these policies only let its rows
-- through RLS (it has no BYPASSRLS).
create policy members_membersync     on public.members     for all to membersync using (true) with check (true);
create policy user_logs_membersync   on public.user_logs   for all to membersync using (true) with check (true);
create policy error_logs_membersync  on public.error_logs  for all to membersync using (true) with check (true);
create policy webhook_log_membersync on public.webhook_log for all to membersync using (true) with check (true);
create policy audit_logs_membersync  on public.audit_logs  for all to membersync using (true) with check (true);
create policy sync_state_membersync  on public.sync_state  for all to membersync using (true) with check (true);

-- Functions the daemon calls: pg_logical_emit_message (origin marker, heartbeat,
-- snapshot watermarks), advisory locks (single active CDC), and the view
-- pg_replication_slots. PostgreSQL grants all of them to PUBLIC, so normally nothing is
-- granted here; should a server have revoked them, grant them back (which needs a role
-- that may grant them, i.e. a superuser).
do $migration$
declare
  f text;
begin
  foreach f in array array[
    'pg_catalog.pg_logical_emit_message(boolean, text, text)',
    'pg_catalog.pg_logical_emit_message(boolean, text, bytea)',
    'pg_catalog.pg_try_advisory_lock(bigint)',
    'pg_catalog.pg_advisory_lock(bigint)',
    'pg_catalog.pg_advisory_unlock(bigint)'
  ] loop
    if not pg_catalog.has_function_privilege('membersync', f, 'execute') then
      execute format('grant execute on function %s to membersync', f);
    end if;
  end loop;

  if not pg_catalog.has_table_privilege('membersync', 'pg_catalog.pg_replication_slots', 'select') then
    grant select on pg_catalog.pg_replication_slots to membersync;
  end if;
end
$migration$;

-- refinery's history table is not in public: `membersync migrate` keeps it in
-- membersync_meta.schema_history, a schema the API roles cannot use (src/db/migrate.rs).
