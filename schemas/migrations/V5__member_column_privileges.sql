-- V5: least privilege for signed-in API users on members and user_logs. See docs/schema.md.
--
-- V3 granted `authenticated` select, insert, update and delete on both tables, RLS limiting
-- the rows to its own. Through PostgREST a signed-in user could therefore set its own
-- subscription_status / plan_id / email / memberstack_id (Memberstack-owned identity and
-- subscription: a free user could give itself a paid plan in this database), insert members
-- rows, delete its row, and rewrite or delete its own audit trail in user_logs. Now:
--   * members: select (own rows, policy members_select_own) and update of the application
--     columns only — project_data, usage_stats, custom_fields (column-level grant; own rows,
--     policy members_update_own). No insert (rows come from Memberstack through the daemon),
--     no delete (a deleted member is soft-deleted by the daemon). Every other column,
--     user_id included, is refused with "permission denied" — also a column added later,
--     since a column-level grant names its columns.
--   * user_logs: select own rows only; the audit trail is written by the daemon alone.
--   * anon: still nothing. membersync and service_role: unchanged.
--
-- The updated_at trigger keeps working for such an update: membersync_set_updated_at() is
-- not SECURITY DEFINER, but PostgreSQL checks EXECUTE on a trigger function only when the
-- trigger is created (by the owner), not when it fires, and a column a BEFORE trigger sets
-- is not subject to the column privilege check (only the columns named in the UPDATE are).
--
-- V1..V4 are applied on existing databases and checksummed by refinery: they are not edited;
-- this migration changes their result.

-- ---------------------------------------------------------------------------------------
-- Privileges. `revoke all` first so that the result does not depend on what was granted
-- before (it also removes any column-level grants: revoking a table privilege revokes the
-- same privilege on every column), then grant exactly what is wanted.
-- ---------------------------------------------------------------------------------------
revoke all on public.members, public.user_logs from authenticated;

grant select on public.members, public.user_logs to authenticated;
grant update (project_data, usage_stats, custom_fields) on public.members to authenticated;

-- ---------------------------------------------------------------------------------------
-- Policies. The privileges alone now refuse insert and delete (and update of user_logs),
-- so their policies would be dead code; they are dropped rather than kept, so that a later
-- `grant insert` or `grant delete` by mistake still finds no permissive policy and RLS
-- refuses every row (defence in depth), and pg_policies shows what is actually allowed.
-- `if exists`: an operator may have dropped them already.
-- ---------------------------------------------------------------------------------------
drop policy if exists members_insert_own   on public.members;
drop policy if exists members_delete_own   on public.members;
drop policy if exists user_logs_insert_own on public.user_logs;
drop policy if exists user_logs_update_own on public.user_logs;
drop policy if exists user_logs_delete_own on public.user_logs;

-- Kept: members_select_own, user_logs_select_own, and members_update_own, restated here so
-- that the remaining update is tied to the user's own row both before (USING) and after
-- (WITH CHECK) the change.
alter policy members_update_own on public.members
  to authenticated
  using ((select auth.uid()) = user_id)
  with check ((select auth.uid()) = user_id);
