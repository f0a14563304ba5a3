-- SNS hooks managed over the API (config hooks live in the config file). The hook body is the JSON of
-- PUT /v1/sns/hooks/{name}: topics, account, rules, notify.
CREATE TABLE sns_hooks (
    name       TEXT PRIMARY KEY NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
