-- Who changed what the API manages: templates, SNS hooks, tokens (created, replaced, deleted,
-- revoked), each by the token that did it (`cli` for `ec2jobd token …` on the host).
CREATE TABLE audit_log (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     bigint NOT NULL,
    actor  text NOT NULL,
    what   text NOT NULL,
    name   text NOT NULL,
    change text NOT NULL
);
