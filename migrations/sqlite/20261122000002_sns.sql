-- SNS deliveries: every message that reached POST /v1/sns/{hook}, what became of it, and its job.
CREATE TABLE sns_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    hook        TEXT NOT NULL,
    message_id  TEXT,                                     -- absent when the body was not SNS's shape
    topic_arn   TEXT,
    kind        TEXT,                                     -- Notification, SubscriptionConfirmation, …
    outcome     TEXT NOT NULL,                            -- accepted, duplicate, no_rule, rejected, confirmed, unsubscribed
    reason      TEXT,
    rule        TEXT,
    job_id      TEXT
) STRICT;

-- Deduplication looks up earlier deliveries of a message to the same hook.
CREATE INDEX sns_deliveries_message ON sns_deliveries (hook, message_id);
