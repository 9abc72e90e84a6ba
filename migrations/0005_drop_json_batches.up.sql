-- The service now decides batches of reserves and commits itself, with
-- set-based statements (internal/metering/batch.go), so the JSON batch
-- functions of 0003 have no caller left.
DROP FUNCTION metering.commit_many(jsonb, timestamptz);
DROP FUNCTION metering.reserve_many(jsonb, timestamptz);
