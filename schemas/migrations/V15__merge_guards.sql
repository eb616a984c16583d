-- V15: guards for merge (docs/merge.md "Auth users: linking and conflicts", "Orphans"),
-- see docs/schema.md#v15-merge-guards.
--
-- 1. One auth user belongs to at most one member: `unique (user_id)` on public.members.
--    Without it, two members linked to one auth user let that user read both rows through
--    RLS. If the table already holds duplicates, the migration stops and names them: which
--    member really owns the auth user is a decision for a person, not for a migration.
--    (Nulls are not equal to each other: any number of members may have no auth user yet.)
-- 2. Linking an existing auth user by email (on Supabase Auth's `email_exists`) is guarded:
--    only a user whose email is confirmed and that no other member references may be linked.
--    membersync_meta.linkable_auth_user(email, member) says which user has the email and
--    whether it may be linked; auth_user_id_by_email (V8) now answers only linkable users too.
-- 3. Merge remembers conflicts and orphans on its intents (merge_intents.conflict,
--    merge_intents.orphan_since) and logs conflicts in user_logs (change_type 'conflict').
-- 4. `usage_stats` is the application's metering: signed-in members may no longer update it
--    (V5 granted it). An application that wants members to write it grants it back:
--    `grant update (usage_stats) on public.members to authenticated;`.

do $migration$
declare
  dups text;
begin
  if not exists (select from pg_catalog.pg_constraint
                  where conrelid = 'public.members'::regclass and conname = 'members_user_id_key') then
    select string_agg(format('%s (members %s)', user_id, ids), '; ')
      into dups
      from (select user_id, string_agg(memberstack_id, ', ' order by memberstack_id) as ids
              from public.members
             where user_id is not null
             group by user_id
            having count(*) > 1
             order by user_id
             limit 20) d;
    if dups is not null then
      raise exception 'V15: public.members has auth users linked to more than one member: %', dups
        using hint = 'Each auth user may belong to one member only (RLS shows a user every row '
                     'that names it). Set user_id to null on the rows that do not own the auth user '
                     '(membersync links the right user again when the member changes), then run '
                     'membersync migrate again. See docs/schema.md#v15-merge-guards.';
    end if;
    alter table public.members add constraint members_user_id_key unique (user_id);
  end if;
end
$migration$;

create or replace function membersync_meta.linkable_auth_user(p_email text, p_memberstack_id text)
  returns table (user_id uuid, verdict text)
  language sql
  stable
  security definer
  set search_path to ''
as $$
  select u.id,
         case
           when exists (select 1 from public.members m
                         where m.user_id = u.id and m.memberstack_id <> p_memberstack_id)
             then 'linked_to_another_member'
           when u.email_confirmed_at is null then 'unconfirmed'
           else 'linkable'
         end
    from auth.users u
   where lower(u.email) = lower(p_email)
     and u.deleted_at is null
     and not u.is_sso_user
   order by u.created_at
   limit 1
$$;

comment on function membersync_meta.linkable_auth_user(text, text) is
  'membersync: the auth user with this email and whether member p_memberstack_id may be linked to it '
  '(linkable: email confirmed and no other member references it).';

revoke all on function membersync_meta.linkable_auth_user(text, text) from public;
grant execute on function membersync_meta.linkable_auth_user(text, text) to membersync;
grant execute on function membersync_meta.linkable_auth_user(text, text) to membersync_merge;

-- V8's function, with the same guard: callers that only ask "which user may I link" can no
-- longer get an unconfirmed or already linked user.
create or replace function membersync_meta.auth_user_id_by_email(p_email text)
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
     and u.email_confirmed_at is not null
     and not exists (select 1 from public.members m where m.user_id = u.id)
   order by u.created_at
   limit 1
$$;

alter table membersync_meta.merge_intents
  -- Why the intent cannot be applied now ({reason, email, since}); it waits
  -- merge.conflict_retry_secs between attempts instead of being dead-lettered.
  add column if not exists conflict     jsonb,
  -- Memberstack answered 404: the member does not exist there. Nothing is pushed for it
  -- until a Memberstack change of that member (webhook or snapshot) clears this.
  add column if not exists orphan_since timestamptz;

alter table public.user_logs drop constraint user_logs_change_type_check;
alter table public.user_logs add constraint user_logs_change_type_check check (change_type in (
  'created', 'updated', 'deleted', 'synced', 'subscription_updated', 'conflict_resolved', 'conflict'
));

revoke update (usage_stats) on public.members from authenticated;
