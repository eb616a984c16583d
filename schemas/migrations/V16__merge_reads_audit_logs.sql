-- V16: merge's login role (`membersync_merge`, V14) reads `audit_logs`.
--
-- The merge role exports `membersync_dlq_unreplayed{topic}`: the dead letters on `<prefix>.dlq`
-- less the distinct `dlq_replay` targets in `audit_logs`. V14 gave `membersync_merge` what merge
-- writes, not this read, so with the per-duty logins (Kubernetes) the gauge was not exported.
-- Read-only, like the API role's (V14).
grant select on public.audit_logs to membersync_merge;
create policy audit_logs_membersync_merge on public.audit_logs for select to membersync_merge using (true);
