-- The dashboard's "finished per hour" chart reads the last day of finished jobs as a range.
CREATE INDEX jobs_finished ON jobs (finished_at, state) WHERE finished_at IS NOT NULL;
