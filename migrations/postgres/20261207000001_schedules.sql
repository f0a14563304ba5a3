-- Schedules created over the API (PUT /v1/schedules/{name}): when to fire which job, as JSON.
-- Schedules from config are not stored; their firings' jobs are (created_by = 'schedule:<name>').
CREATE TABLE schedules (
    name       text PRIMARY KEY,
    body       text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);

-- Overrides of window schedules with expiry (POST /v1/schedules/{name}/overrides), named
-- `<schedule>/<id>`: "keep db-7 running until Friday 18:00".
CREATE TABLE schedule_overrides (
    name       text PRIMARY KEY,
    body       text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);
