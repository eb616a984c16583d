-- V14: database roles by duty. See docs/schema.md#roles.
--
-- Until now one role, membersync (LOGIN REPLICATION), served CDC, merge's writes and the
-- internet-facing member API. Two more roles, each with only what its duty uses:
--   * membersync_merge — merge: reads and writes the synced record and its bookkeeping;
--     no REPLICATION, no snapshot or backfill state;
--   * membersync_api   — the member/admin API: reads only, no REPLICATION.
-- membersync stays the replication role CDC (and the command-line tools: dlq, snapshot,
-- backfill) log in as, with its V3 grants, so that `membersync run` — every role in one
-- process, one login — keeps working. Deployments that split the roles give each its own
-- login (database.merge_user, database.api_user; or database.user per pod).
--
-- The roles are cluster-wide, created here if missing, LOGIN without a password (the operator
-- sets one: `alter role membersync_merge password '…'`). Creating a role without REPLICATION
-- needs only CREATEROLE, which Supabase's postgres has. Several databases of one cluster may
-- run this at once (parallel tests): a concurrent creator is fine.
do $migration$
declare
  r text;
begin
  foreach r in array array['membersync_merge', 'membersync_api'] loop
    if not exists (select from pg_catalog.pg_roles where rolname = r) then
      begin
        execute format(
          'create role %I login nosuperuser nocreatedb nocreaterole nobypassrls noreplication', r);
      exception
        when duplicate_object or unique_violation then
          null; -- created concurrently by another database's migration
      end;
    elsif exists (select from pg_catalog.pg_roles
                   where rolname = r and (rolsuper or rolbypassrls or rolreplication)) then
      raise warning 'role "%" is SUPERUSER, BYPASSRLS or REPLICATION: it should have none of them '
                    '(see docs/schema.md#roles)', r;
    end if;
  end loop;
end
$migration$;

-- ---------------------------------------------------------------------------------------
-- membersync_merge: what merge reads and writes (src/merge/store.rs, src/merge/worker.rs).
-- ---------------------------------------------------------------------------------------
grant usage on schema public          to membersync_merge;
grant usage on schema membersync_meta to membersync_merge;

grant select, insert, update on public.members     to membersync_merge;
grant insert                 on public.user_logs   to membersync_merge;
grant insert                 on public.error_logs  to membersync_merge;
grant select, insert         on public.webhook_log to membersync_merge;
grant select, insert, update on public.sync_state  to membersync_merge;
-- Which columns Supabase-side writers changed, and when (V9; written by a trigger).
grant select on membersync_meta.member_column_edits to membersync_merge;
-- Linking an existing auth user by email (V8).
grant execute on function membersync_meta.auth_user_id_by_email(text) to membersync_merge;

-- Merge's transactional outbox (V12: intents to push, outcomes to relay), where it exists.
do $migration$
begin
  if pg_catalog.to_regclass('membersync_meta.merge_intents') is not null then
    grant select, insert, update, delete on membersync_meta.merge_intents to membersync_merge;
  end if;
  if pg_catalog.to_regclass('membersync_meta.outcome_outbox') is not null then
    grant select, insert, update, delete on membersync_meta.outcome_outbox to membersync_merge;
    grant usage, select on sequence membersync_meta.outcome_outbox_seq_seq to membersync_merge;
  end if;
end
$migration$;

-- The privileges decide what merge may do; these policies only let its rows through RLS.
create policy members_membersync_merge     on public.members     for all to membersync_merge using (true) with check (true);
create policy user_logs_membersync_merge   on public.user_logs   for all to membersync_merge using (true) with check (true);
create policy error_logs_membersync_merge  on public.error_logs  for all to membersync_merge using (true) with check (true);
create policy webhook_log_membersync_merge on public.webhook_log for all to membersync_merge using (true) with check (true);
create policy sync_state_membersync_merge  on public.sync_state  for all to membersync_merge using (true) with check (true);

-- ---------------------------------------------------------------------------------------
-- membersync_api: what the API reads (src/api/sync_view.rs, src/api/status.rs). Nothing else.
-- ---------------------------------------------------------------------------------------
grant usage on schema public to membersync_api;

grant select on public.members    to membersync_api;
grant select on public.sync_state to membersync_api;
grant select on public.error_logs to membersync_api;
grant select on public.audit_logs to membersync_api;

create policy members_membersync_api    on public.members    for select to membersync_api using (true);
create policy sync_state_membersync_api on public.sync_state for select to membersync_api using (true);
create policy error_logs_membersync_api on public.error_logs for select to membersync_api using (true);
create policy audit_logs_membersync_api on public.audit_logs for select to membersync_api using (true);

-- Functions both call: pg_logical_emit_message (merge marks its own transactions), advisory
-- locks (merge serialises one member), pg_replication_slots (the admin status). PostgreSQL
-- grants them to PUBLIC; should a server have revoked them, grant them back (V3 does the same
-- for membersync).
do $migration$
declare
  f text;
begin
  foreach f in array array[
    'pg_catalog.pg_logical_emit_message(boolean, text, text)',
    'pg_catalog.pg_advisory_xact_lock(bigint)'
  ] loop
    if not pg_catalog.has_function_privilege('membersync_merge', f, 'execute') then
      execute format('grant execute on function %s to membersync_merge', f);
    end if;
  end loop;
  if not pg_catalog.has_table_privilege('membersync_api', 'pg_catalog.pg_replication_slots', 'select') then
    grant select on pg_catalog.pg_replication_slots to membersync_api;
  end if;
end
$migration$;
