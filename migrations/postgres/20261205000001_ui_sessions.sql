-- Dashboard sessions (/ui): the cookie holds a random secret, only its SHA-256 is stored. A session
-- lives until expires_at, its sign-out, or its token's revocation (it names the token by hash, so a
-- revoked token's sessions, and a new token of the same name, never match).
CREATE TABLE ui_sessions (
    session_sha256 text PRIMARY KEY,
    token_sha256   text NOT NULL,
    csrf           text NOT NULL,
    created_at     bigint NOT NULL,
    expires_at     bigint NOT NULL
);

CREATE INDEX ui_sessions_token ON ui_sessions (token_sha256, created_at);
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
