-- Runs once, when the supabase/postgres container initialises an empty data directory
-- (mounted into /docker-entrypoint-initdb.d/init-scripts/, executed by the image's migrate.sh
-- as `postgres` while that role is still a superuser).
--
-- Creates membersync's daemon role with its password. Before PostgreSQL 16 only a superuser may
-- create a REPLICATION role, and the image demotes `postgres` right after its init scripts, so
-- `membersync migrate` (which runs as `postgres`) could not create it later. On hosted Supabase
-- the same statement is run once in the SQL editor (docs/operations.md#hosted-supabase).
\set membersync_password `cat /run/secrets/membersync_db_password`
create role membersync
  login replication
  nosuperuser nocreatedb nocreaterole nobypassrls
  password :'membersync_password';
