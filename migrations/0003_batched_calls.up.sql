-- Batched reserve and commit: one statement runs many requests in one
-- transaction, so concurrent callers share a round trip, the account row
-- locks and one WAL flush. Each request runs through the same function as a
-- single call, so the rules are the same; the results come back in request
-- order.
--
-- The accounts of the batch are locked first, in id order, so two batches
-- never wait on each other in a cycle. The functions called per request lock
-- their account again, which is free for a row the transaction holds.

-- reserve_many runs metering.reserve for each element of p_requests, an array
-- of objects with account_id, metrics, parent_ids, amounts, key, hash
-- (base64), ttl_us (microseconds), resource_id and actor.
CREATE FUNCTION metering.reserve_many(p_requests jsonb, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r       jsonb;
    results jsonb[] := '{}';
BEGIN
    PERFORM 1 FROM metering.accounts
    WHERE id IN (SELECT x->>'account_id' FROM jsonb_array_elements(p_requests) x)
    ORDER BY id
    FOR NO KEY UPDATE;

    FOR r IN SELECT x FROM jsonb_array_elements(p_requests) x LOOP
        results := results || metering.reserve(
            r->>'account_id',
            ARRAY(SELECT jsonb_array_elements_text(r->'metrics')),
            ARRAY(SELECT jsonb_array_elements_text(r->'parent_ids')),
            ARRAY(SELECT jsonb_array_elements_text(r->'amounts')::bigint),
            r->>'key',
            decode(r->>'hash', 'base64'),
            make_interval(secs => (r->>'ttl_us')::bigint / 1000000.0),
            r->>'resource_id',
            r->>'actor',
            p_now);
    END LOOP;
    RETURN to_jsonb(results);
END
$$;

-- commit_many runs metering.commit for each element of p_requests, an array
-- of objects with account_id, id, metrics, parent_ids, amounts, resource_id
-- and actor.
CREATE FUNCTION metering.commit_many(p_requests jsonb, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r       jsonb;
    results jsonb[] := '{}';
BEGIN
    PERFORM 1 FROM metering.accounts
    WHERE id IN (SELECT x->>'account_id' FROM jsonb_array_elements(p_requests) x)
    ORDER BY id
    FOR NO KEY UPDATE;

    FOR r IN SELECT x FROM jsonb_array_elements(p_requests) x LOOP
        results := results || metering.commit(
            r->>'account_id',
            (r->>'id')::uuid,
            ARRAY(SELECT jsonb_array_elements_text(r->'metrics')),
            ARRAY(SELECT jsonb_array_elements_text(r->'parent_ids')),
            ARRAY(SELECT jsonb_array_elements_text(r->'amounts')::bigint),
            r->>'resource_id',
            r->>'actor',
            p_now);
    END LOOP;
    RETURN to_jsonb(results);
END
$$;
