-- ec2jobd queue schema (SQLite). Times are integer milliseconds since the Unix epoch (UTC).

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL,          -- ULID: sorts by creation time
    state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    action           TEXT NOT NULL,
    spec             TEXT NOT NULL,                      -- normalised JobSpec (JSON)
    idempotency_key  TEXT,
    request_hash     TEXT,                               -- SHA-256 of the normalised spec
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_after        INTEGER NOT NULL,                   -- not claimed before this (retry backoff)
    timeout_ms       INTEGER NOT NULL,                   -- per-attempt limit
    lease_owner      TEXT,                               -- worker id holding the lease (fencing token)
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error            TEXT,                               -- JobError (JSON)
    results          TEXT NOT NULL DEFAULT '{}',
    progress         TEXT NOT NULL DEFAULT '{}',
    checkpoint       TEXT                                -- executor-owned resume state (JSON)
) STRICT;

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_claim ON jobs (run_after, id) WHERE state = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_state_id ON jobs (state, id);
CREATE INDEX jobs_action_id ON jobs (action, id);

CREATE TABLE job_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL,
    data    TEXT NOT NULL DEFAULT 'null'
) STRICT;

CREATE INDEX job_events_job ON job_events (job_id, seq);

CREATE TABLE api_tokens (
    name         TEXT PRIMARY KEY NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_sha256 TEXT NOT NULL UNIQUE,                   -- the token itself is never stored
    created_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;
