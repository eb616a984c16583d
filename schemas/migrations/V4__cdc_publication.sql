-- V4: the publication the daemon's CDC streams (logical replication, pgoutput).
-- Created here, by the tables' owner, because only a table's owner may add it to a
-- publication; the daemon only checks that it exists. Never `supabase_realtime`.
-- members keeps REPLICA IDENTITY DEFAULT (primary key in the old-key of updates/deletes).
do $migration$
begin
  if not exists (select 1 from pg_catalog.pg_publication where pubname = 'membersync') then
    create publication membersync for table public.members;
  elsif not exists (
    select 1 from pg_catalog.pg_publication_tables
     where pubname = 'membersync' and schemaname = 'public' and tablename = 'members'
  ) then
    alter publication membersync add table public.members;
  end if;
end
$migration$;
