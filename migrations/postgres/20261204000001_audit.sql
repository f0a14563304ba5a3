-- Who did it: the API token (or `sns:<hook>`) that submitted a job, and that caused an event
-- (a cancel). NULL for rows from before this migration.
ALTER TABLE jobs ADD COLUMN created_by text;
ALTER TABLE job_events ADD COLUMN actor text;
-- `GET /v1/jobs?created_by=` walks this, newest first.
CREATE INDEX jobs_created_by_id ON jobs (created_by, id);
