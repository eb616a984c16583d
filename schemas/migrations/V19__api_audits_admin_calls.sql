-- V19: the admin API leaves a trace in audit_logs (issue #16, item 9: "admin calls leave no
-- trace"). The API role (`membersync_api`, V14) stays read-only for everything else; on
-- audit_logs it may append, and only its own kind of row: actor 'admin-api', an action starting
-- with 'admin_'. It can therefore never write a 'dlq_replay' row (which marks a dead letter as
-- replayed and so lowers membersync_dlq_unreplayed), nor update or delete what is there.
grant insert on public.audit_logs to membersync_api;
create policy audit_logs_membersync_api_insert on public.audit_logs
  for insert to membersync_api
  with check (actor = 'admin-api' and action like 'admin\_%');
