-- Saved job templates (PUT /v1/templates/{name}): a job spec with named parameters, as JSON.
CREATE TABLE templates (
    name       TEXT PRIMARY KEY NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
