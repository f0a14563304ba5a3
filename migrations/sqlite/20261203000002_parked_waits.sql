-- Parked waits: a job waiting for instances (or snapshots, AMIs) holds no worker. It stays `running`
-- with its lease passed to the parking lot of a process (`lease_owner` = the lot's id), which renews
-- the leases of all its jobs in one statement (`jobs_lease_owner`); the job's checkpoint says what it
-- waits for and how it goes on. When the wait ends the lot queues the job again with what the wait
-- saw in `wait_outcome`, which the next claim hands to the executor. A lot that dies leaves its
-- leases to expire, and the jobs are claimed and parked again, like any running job.
ALTER TABLE jobs ADD COLUMN wait_outcome TEXT;
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE state = 'running';
