-- V9: when each column of a members row last changed (docs/merge.md, "Supabase's time for a
-- field").
--
-- Merge decides a `latest` field between a Memberstack edit and a Supabase value the CDC
-- stream has not delivered yet by comparing their times. The row's updated_at is no such
-- time: any later write of another column (an application write, or merge writing a
-- different field) moves it, so an older Supabase edit looked newer than a newer Memberstack
-- edit and overwrote it (found by the soak harness). This table keeps, per member and
-- column, the start time of the transaction that last changed the column — the same clock as
-- updated_at — maintained by a trigger, so every writer (the daemon, the API roles through
-- PostgREST, an operator with psql) is covered.
--
-- No foreign key to public.members: one would make a plain `truncate public.members` fail
-- ("cannot truncate a table referenced in a foreign key constraint") for the application and
-- its operators, because of a table of ours they never see. Deletes and truncates of members
-- are followed by the triggers below instead.
create table membersync_meta.member_column_edits (
  member_id   uuid        not null,
  column_name text        not null,
  edited_at   timestamptz not null,
  constraint member_column_edits_pkey primary key (member_id, column_name)
);

comment on table membersync_meta.member_column_edits is
  'membersync: when each column of a members row last changed (kept by a trigger).';

grant select on membersync_meta.member_column_edits to membersync;

-- SECURITY DEFINER: the writers of members (authenticated through RLS, membersync) have no
-- privilege on membersync_meta, and need none.
create function membersync_meta.record_member_column_edits()
  returns trigger
  language plpgsql
  security definer
  set search_path to ''
as $$
begin
  insert into membersync_meta.member_column_edits as e (member_id, column_name, edited_at)
  select new.id, n.key, pg_catalog.now()
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

comment on function membersync_meta.record_member_column_edits() is
  'membersync: trigger recording per-column edit times of public.members.';

revoke all on function membersync_meta.record_member_column_edits() from public;

create trigger members_record_column_edits
  after insert or update on public.members
  for each row
  execute function membersync_meta.record_member_column_edits();

-- A deleted or truncated member takes its edit times with it.
create function membersync_meta.forget_member_column_edits()
  returns trigger
  language plpgsql
  security definer
  set search_path to ''
as $$
begin
  if tg_op = 'TRUNCATE' then
    delete from membersync_meta.member_column_edits;
  else
    delete from membersync_meta.member_column_edits where member_id = old.id;
  end if;
  return null;
end
$$;

comment on function membersync_meta.forget_member_column_edits() is
  'membersync: trigger removing the edit times of deleted or truncated public.members rows.';

revoke all on function membersync_meta.forget_member_column_edits() from public;

create trigger members_forget_column_edits
  after delete on public.members
  for each row
  execute function membersync_meta.forget_member_column_edits();

create trigger members_forget_column_edits_on_truncate
  after truncate on public.members
  for each statement
  execute function membersync_meta.forget_member_column_edits();

-- Rows that exist already: their columns' best-known edit time is the row's updated_at.
insert into membersync_meta.member_column_edits (member_id, column_name, edited_at)
select m.id, c.key, m.updated_at
  from public.members m
 cross join lateral pg_catalog.jsonb_object_keys(pg_catalog.to_jsonb(m)) c(key)
 where c.key not in ('updated_at', 'created_at', 'id')
on conflict do nothing;
