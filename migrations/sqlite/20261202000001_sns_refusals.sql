-- Refused SNS deliveries are folded: repeats of one kind of refusal to one hook within a minute count
-- into the first row (`count`, `last_at`) instead of adding rows, so no stream of forged posts can grow
-- the database faster than one row per hook and kind a minute. `code` is the kind of refusal.
ALTER TABLE sns_deliveries ADD COLUMN code TEXT;
ALTER TABLE sns_deliveries ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sns_deliveries ADD COLUMN last_at INTEGER;
CREATE INDEX sns_deliveries_fold ON sns_deliveries (hook, code, id) WHERE outcome = 'rejected';
