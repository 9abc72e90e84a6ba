DROP FUNCTION metering.commit_many(jsonb, timestamptz);
DROP FUNCTION metering.reserve_many(jsonb, timestamptz);
