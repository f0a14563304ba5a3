-- What a token may use beyond its role: accounts, actions and templates (JSON; NULL: anything its
-- role allows).
ALTER TABLE api_tokens ADD COLUMN scopes TEXT;
