-- ec2jobd queue schema (PostgreSQL), for several daemons sharing one queue. The same tables and
-- columns as the SQLite schema (migrations/sqlite, all of it folded into this first migration), so
-- `ec2jobd store copy` moves rows as they are. Times are bigint milliseconds since the Unix epoch
-- (UTC); JSON is stored as text, exactly as the daemon wrote it.

CREATE TABLE jobs (
    id               text PRIMARY KEY,                   -- ULID: sorts by creation time
    state            text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    action           text NOT NULL,
    spec             text NOT NULL,                      -- normalised JobSpec (JSON)
    idempotency_key  text,
    request_hash     text,                               -- SHA-256 of the normalised spec
    created_at       bigint NOT NULL,
    updated_at       bigint NOT NULL,
    started_at       bigint,
    finished_at      bigint,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    run_after        bigint NOT NULL,                    -- not claimed before this (retry backoff)
    timeout_ms       bigint NOT NULL,                    -- per-attempt limit
    lease_owner      text,                               -- worker or parking lot holding the lease (fencing token)
    lease_expires_at bigint,
    cancel_requested boolean NOT NULL DEFAULT false,
    error            text,                               -- JobError (JSON)
    results          text NOT NULL DEFAULT '{}',
    progress         text NOT NULL DEFAULT '{}',
    checkpoint       text,                               -- executor-owned resume state (JSON)
    priority         integer NOT NULL DEFAULT 0,         -- higher first
    wait_outcome     text,                               -- what a parked wait saw, for the next claim
    outbox_done_at   bigint,                             -- outcome published (or nothing to publish)
    outbox_tries     integer NOT NULL DEFAULT 0,
    outbox_after     bigint NOT NULL DEFAULT 0
);

-- Two replicas receiving the same Idempotency-Key queue one job: the second insert conflicts.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Claims walk this index in claim order (`FOR UPDATE SKIP LOCKED`): priority, then due time, then id.
CREATE INDEX jobs_claim_priority ON jobs (priority DESC, run_after, id) WHERE state = 'queued';
-- "When is the next job due", for the workers' sleep.
CREATE INDEX jobs_claim ON jobs (run_after, id) WHERE state = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE state = 'running';
CREATE INDEX jobs_state_id ON jobs (state, id);
CREATE INDEX jobs_action_id ON jobs (action, id);
CREATE INDEX jobs_outbox ON jobs (outbox_after, id) WHERE outbox_done_at IS NULL AND finished_at IS NOT NULL;

CREATE TABLE job_events (
    seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at      bigint NOT NULL,
    kind    text NOT NULL,
    message text NOT NULL,
    data    text NOT NULL DEFAULT 'null'
);

CREATE INDEX job_events_job ON job_events (job_id, seq);

CREATE TABLE api_tokens (
    name         text PRIMARY KEY,
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_sha256 text NOT NULL UNIQUE,                   -- the token itself is never stored
    created_at   bigint NOT NULL
);

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- SNS deliveries: every message that reached POST /v1/sns/{hook}, what became of it, and its job.
-- Refused ones are folded (`code`, `count`, `last_at`: one row per hook and kind a minute).
CREATE TABLE sns_deliveries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          bigint NOT NULL,
    hook        text NOT NULL,
    message_id  text,                                     -- absent when the body was not SNS's shape
    topic_arn   text,
    kind        text,                                     -- Notification, SubscriptionConfirmation, …
    outcome     text NOT NULL,                            -- accepted, duplicate, no_rule, rejected, confirmed, unsubscribed
    reason      text,
    rule        text,
    job_id      text,
    code        text,
    count       integer NOT NULL DEFAULT 1,
    last_at     bigint
);

CREATE INDEX sns_deliveries_message ON sns_deliveries (hook, message_id);
-- One accepted delivery per message and hook, whichever replica received it: the same delivery
-- sent to two replicas queues one job (the second insert conflicts and is recorded a duplicate).
CREATE UNIQUE INDEX sns_deliveries_accepted ON sns_deliveries (hook, message_id)
    WHERE outcome = 'accepted' AND message_id IS NOT NULL;
CREATE INDEX sns_deliveries_fold ON sns_deliveries (hook, code, id) WHERE outcome = 'rejected';

-- SNS hooks managed over the API (config hooks live in the config file).
CREATE TABLE sns_hooks (
    name       text PRIMARY KEY,
    body       text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);

-- Saved job templates (PUT /v1/templates/{name}).
CREATE TABLE templates (
    name       text PRIMARY KEY,
    body       text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);

-- Leader leases: periodic maintenance (reaping expired leases, pruning, schedules) runs in the one
-- replica holding the row's lease; another takes over once `expires_at` passes.
CREATE TABLE leader (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    expires_at bigint NOT NULL
);
