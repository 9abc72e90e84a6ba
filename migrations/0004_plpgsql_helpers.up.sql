-- The helper functions move from LANGUAGE sql to plpgsql. PostgreSQL before
-- version 18 plans the body of a SQL function that it cannot inline on every
-- call, while plpgsql caches the plan of each statement per session, so the
-- hot path no longer replans the limit check on every reserve. The queries
-- are unchanged. `#variable_conflict use_column` keeps the column names of
-- the queries from resolving to the functions' output parameters.

CREATE OR REPLACE FUNCTION metering.counter_state(p_account text, p_plan text, p_period_start timestamptz,
                                                  p_now timestamptz, p_metrics text[], p_parents text[],
                                                  p_requested bigint[], p_skip_reservation uuid)
RETURNS TABLE (metric text, scope text, parent_id text, kind text, period_start timestamptz,
               used bigint, reserved bigint, max_amount bigint, unlimited boolean,
               requested bigint, exceeded boolean, overflow boolean)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH wanted AS (
        SELECT w.metric, w.parent_id, w.requested, w.ord,
               CASE WHEN w.parent_id = '' THEN 'account' ELSE 'parent' END AS scope,
               CASE WHEN w.parent_id = '' THEN m.account_kind ELSE m.parent_kind END AS kind
        FROM unnest(p_metrics, p_parents, p_requested) WITH ORDINALITY AS w (metric, parent_id, requested, ord)
        JOIN metering.metrics m ON m.name = w.metric
    ),
    -- Summed once per metric and parent, so each counter reads a few rows
    -- however many reservations are pending.
    pending AS MATERIALIZED (
        SELECT i.metric, i.parent_id, sum(i.amount) AS amount
        FROM metering.reservations r,
             unnest(r.metrics, r.parent_ids, r.amounts) AS i (metric, parent_id, amount)
        WHERE r.account_id = p_account
          AND r.state = 'pending'
          AND r.expire_time > p_now
          AND r.id IS DISTINCT FROM p_skip_reservation
        GROUP BY i.metric, i.parent_id
    ),
    state AS MATERIALIZED (
        SELECT w.ord, w.metric, w.scope, w.parent_id, w.kind,
               CASE WHEN w.kind = 'period' THEN p_period_start ELSE '-infinity'::timestamptz END AS period_start,
               coalesce(c.used, 0) AS used,
               least(coalesce((SELECT sum(p.amount) FROM pending p
                               WHERE p.metric = w.metric AND (w.parent_id = '' OR p.parent_id = w.parent_id)), 0),
                     9223372036854775807)::bigint AS reserved,
               l.max_amount,
               coalesce(l.unlimited, false) AS unlimited,
               w.requested
        FROM wanted w
        LEFT JOIN metering.plan_limits l
               ON l.plan_id = p_plan AND l.metric = w.metric AND l.scope = w.scope
        LEFT JOIN metering.counters c
               ON c.account_id = p_account AND c.metric = w.metric AND c.parent_id = w.parent_id
              AND c.period_start = CASE WHEN w.kind = 'period' THEN p_period_start ELSE '-infinity'::timestamptz END
    )
    -- A missing limit row denies: plans are validated to list every limit.
    SELECT s.metric, s.scope, s.parent_id, s.kind, s.period_start, s.used, s.reserved,
           CASE WHEN s.unlimited THEN NULL ELSE coalesce(s.max_amount, 0) END,
           s.unlimited, s.requested,
           NOT s.unlimited AND s.used::numeric + s.reserved + s.requested > coalesce(s.max_amount, 0),
           s.used::numeric + s.reserved + s.requested > 9223372036854775807
    FROM state s
    ORDER BY s.ord;
END
$$;

CREATE OR REPLACE FUNCTION metering.item_counters(p_metrics text[], p_parents text[], p_amounts bigint[],
                                                  OUT metrics text[], OUT parents text[], OUT amounts bigint[])
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    WITH items AS (
        SELECT i.metric, i.parent_id, i.amount, i.ord
        FROM unnest(p_metrics, p_parents, p_amounts) WITH ORDINALITY AS i (metric, parent_id, amount, ord)
    ),
    counters AS (
        SELECT i.metric, '' AS parent_id, i.amount, i.ord * 2 AS ord FROM items i
        UNION ALL
        SELECT i.metric, i.parent_id, i.amount, i.ord * 2 + 1
        FROM items i JOIN metering.metrics m ON m.name = i.metric
        WHERE i.parent_id <> '' AND m.parent_kind IS NOT NULL
    ),
    -- Items that touch the same counter are summed, so the limit check sees
    -- their total. A sum past the largest bigint is clamped to it, which the
    -- overflow check then reports.
    summed AS (
        SELECT c.metric, c.parent_id, least(sum(c.amount), 9223372036854775807)::bigint AS amount, min(c.ord) AS ord
        FROM counters c
        GROUP BY c.metric, c.parent_id
    )
    SELECT coalesce(array_agg(s.metric ORDER BY s.ord), '{}'),
           coalesce(array_agg(s.parent_id ORDER BY s.ord), '{}'),
           coalesce(array_agg(s.amount ORDER BY s.ord), '{}')
    INTO metrics, parents, amounts
    FROM summed s;
END
$$;

CREATE OR REPLACE FUNCTION metering.usage_json(p_account text, p_plan text, p_period_start timestamptz,
                                               p_now timestamptz, p_metrics text[], p_parents text[],
                                               p_requested bigint[], p_skip_reservation uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'metric', s.metric, 'scope', s.scope, 'parent_id', s.parent_id, 'kind', s.kind,
                   'used', s.used, 'reserved', s.reserved, 'limit', s.max_amount,
                   'unlimited', s.unlimited, 'requested', s.requested, 'exceeded', s.exceeded,
                   'overflow', s.overflow)), '[]')
        FROM metering.counter_state(p_account, p_plan, p_period_start, p_now, p_metrics, p_parents,
                                    p_requested, p_skip_reservation) s);
END
$$;

CREATE OR REPLACE FUNCTION metering.reservation_json(r metering.reservations, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'id', r.id, 'account_id', r.account_id,
        'state', CASE WHEN r.state = 'pending' AND r.expire_time <= p_now THEN 'expired' ELSE r.state END,
        'metrics', r.metrics, 'parent_ids', r.parent_ids, 'amounts', r.amounts,
        'committed_amounts', r.committed_amounts, 'resource_id', r.resource_id,
        'idempotency_key', r.idempotency_key, 'create_time', r.create_time,
        'expire_time', r.expire_time);
END
$$;

CREATE OR REPLACE FUNCTION metering.apply_usage(p_account text, p_period_start timestamptz, p_now timestamptz,
                                                p_metrics text[], p_parents text[], p_amounts bigint[],
                                                p_kind text, p_resource text, p_reservation uuid,
                                                p_actor text, p_reason text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    WITH changes AS (
        SELECT c.metric, c.parent_id, c.amount,
               CASE WHEN (CASE WHEN c.parent_id = '' THEN m.account_kind ELSE m.parent_kind END) = 'period'
                    THEN p_period_start ELSE '-infinity'::timestamptz END AS period_start
        FROM unnest(p_metrics, p_parents, p_amounts) AS c (metric, parent_id, amount)
        JOIN metering.metrics m ON m.name = c.metric
        WHERE c.amount <> 0
    ),
    added AS (
        INSERT INTO metering.counters AS t (account_id, metric, parent_id, period_start, used)
        SELECT p_account, c.metric, c.parent_id, c.period_start, c.amount
        FROM changes c
        WHERE c.amount > 0
        -- A fixed order, so concurrent writers lock counter rows the same way.
        ORDER BY c.metric, c.parent_id, c.period_start
        ON CONFLICT (account_id, metric, parent_id, period_start)
        DO UPDATE SET used = t.used + excluded.used
    ),
    -- A negative amount needs an existing row: the proposed row of an upsert
    -- would fail the used >= 0 check before the conflict is resolved.
    subtracted AS (
        UPDATE metering.counters t SET used = t.used + c.amount
        FROM changes c
        WHERE c.amount < 0 AND t.account_id = p_account AND t.metric = c.metric
          AND t.parent_id = c.parent_id AND t.period_start = c.period_start
    )
    INSERT INTO metering.usage_events (account_id, metric, parent_id, period_start, amount, kind,
                                       resource_id, reservation_id, actor, reason, create_time)
    SELECT p_account, c.metric, c.parent_id, c.period_start, c.amount, p_kind,
           p_resource, p_reservation, p_actor, p_reason, p_now
    FROM changes c;
END
$$;

CREATE OR REPLACE FUNCTION metering.running_metric(p_metrics text[], p_parents text[], p_amounts bigint[])
RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT i.metric
        FROM unnest(p_metrics, p_parents, p_amounts) WITH ORDINALITY AS i (metric, parent_id, amount, ord)
        JOIN metering.metrics m ON m.name = i.metric
        WHERE i.amount > 0
          AND (m.account_kind = 'running' OR (i.parent_id <> '' AND m.parent_kind = 'running'))
        ORDER BY i.ord
        LIMIT 1);
END
$$;
