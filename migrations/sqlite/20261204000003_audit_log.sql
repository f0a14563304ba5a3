-- Who changed what the API manages: templates, SNS hooks, tokens (created, replaced, deleted,
-- revoked), each by the token that did it (`cli` for `ec2jobd token …` on the host).
CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    what   TEXT NOT NULL,
    name   TEXT NOT NULL,
    change TEXT NOT NULL
);
