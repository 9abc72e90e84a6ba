-- Restores the JSON batch functions exactly as 0003 created them.
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
