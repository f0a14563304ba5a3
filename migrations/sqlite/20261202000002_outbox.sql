-- The outbox of finished jobs: a job that reaches a final state (finished_at set, in the same
-- transaction) is not yet handed on (`outbox_done_at` NULL) until the notifier has published its
-- outcome or decided nothing is to be published. `outbox_tries` counts failed publishes, and
-- `outbox_after` holds the next one back (backoff). Survives restarts: a job whose daemon was killed
-- between its end and its publish is published after restart.
ALTER TABLE jobs ADD COLUMN outbox_done_at INTEGER;
ALTER TABLE jobs ADD COLUMN outbox_tries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN outbox_after INTEGER NOT NULL DEFAULT 0;
-- Jobs that ended before the outbox existed were handled (or not) by the old in-memory notifier.
UPDATE jobs SET outbox_done_at = COALESCE(finished_at, updated_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX jobs_outbox ON jobs (outbox_after, id)
    WHERE outbox_done_at IS NULL AND finished_at IS NOT NULL;
