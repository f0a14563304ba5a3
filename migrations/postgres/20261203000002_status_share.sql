-- Status polling shared by replicas: one replica (the maintenance leader) polls EC2 for what every
-- replica waits on; the others record what they wait on here and read its rounds.

-- What each replica's watcher of one account+region (`scope`) waits on, until it stops renewing.
CREATE TABLE status_wants (
    scope    text NOT NULL,
    node     text NOT NULL,
    wants    text NOT NULL,                       -- ids by kind and the interval asked for (JSON)
    until_ms bigint NOT NULL,
    PRIMARY KEY (scope, node)
);

-- The latest round the polling replica made of each scope.
CREATE TABLE status_rounds (
    scope text PRIMARY KEY,
    round text NOT NULL,                          -- statuses, states and errors of the round (JSON)
    at    bigint NOT NULL
);
