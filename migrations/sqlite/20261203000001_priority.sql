-- Priorities: a queued job with a higher `priority` is claimed first, then the one due first (the
-- spec's `priority`, default 0; SNS rules' jobs default to `sns.priority`). The claim walks
-- `jobs_claim_priority` in its order; `jobs_claim` stays for "when is the next job due".
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_claim_priority ON jobs (priority DESC, run_after, id) WHERE state = 'queued';
