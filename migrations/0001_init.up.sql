-- The Metering schema: plans and accounts, counters, reservations, the usage
-- ledger, and the functions that check and change counters in one statement
-- each, so every hot-path RPC is one round trip.
--
-- Every function takes the current time as a parameter (p_now) instead of
-- calling now(), so the service's injected clock decides what has expired and
-- which billing period applies. Period arithmetic is done on UTC timestamps
-- (timestamp without time zone), so the session TimeZone changes no result.

CREATE SCHEMA metering;

-- The metric catalog. account_kind is how the account-wide counter behaves;
-- parent_kind is set when the metric also has a per-parent counter.
CREATE TABLE metering.metrics (
    name        text PRIMARY KEY,
    account_kind text NOT NULL CHECK (account_kind IN ('period', 'running')),
    parent_kind text CHECK (parent_kind IN ('period', 'running')),
    sort_order  smallint NOT NULL UNIQUE
);

INSERT INTO metering.metrics (name, account_kind, parent_kind, sort_order) VALUES
    ('agents',        'running', NULL,      1),
    ('tasks',         'period',  NULL,      2),
    ('documents',     'period',  'running', 3),
    ('messages',      'period',  NULL,      4),
    ('storage_bytes', 'running', NULL,      5);

CREATE TABLE metering.plans (
    id           text PRIMARY KEY,
    display_name text NOT NULL,
    create_time  timestamptz NOT NULL,
    update_time  timestamptz NOT NULL
);

-- One row per metric and scope of a plan. Unlimited is its own column, never a
-- magic max_amount.
CREATE TABLE metering.plan_limits (
    plan_id    text NOT NULL REFERENCES metering.plans (id) ON DELETE CASCADE,
    metric     text NOT NULL REFERENCES metering.metrics (name),
    scope      text NOT NULL CHECK (scope IN ('account', 'parent')),
    max_amount bigint CHECK (max_amount >= 0),
    unlimited  boolean NOT NULL,
    PRIMARY KEY (plan_id, metric, scope),
    CHECK (unlimited = (max_amount IS NULL))
);

CREATE TABLE metering.accounts (
    id             text PRIMARY KEY,
    plan_id        text NOT NULL REFERENCES metering.plans (id),
    billing_anchor timestamptz NOT NULL,
    enforcement    text NOT NULL CHECK (enforcement IN ('enforce', 'track_only')),
    create_time    timestamptz NOT NULL,
    update_time    timestamptz NOT NULL
);

-- Committed usage. parent_id is '' for the account-wide counter. Period
-- counters have one row per billing period; running totals never reset, so
-- their single row has period_start '-infinity'.
CREATE TABLE metering.counters (
    account_id   text NOT NULL REFERENCES metering.accounts (id),
    metric       text NOT NULL REFERENCES metering.metrics (name),
    parent_id    text NOT NULL,
    period_start timestamptz NOT NULL,
    used         bigint NOT NULL CHECK (used >= 0),
    PRIMARY KEY (account_id, metric, parent_id, period_start)
);

-- A reservation's items are parallel arrays: item i is
-- (metrics[i], parent_ids[i], amounts[i]). A pending reservation holds
-- capacity only while expire_time is in the future, whether or not the
-- sweeper has marked it expired yet.
CREATE TABLE metering.reservations (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id        text NOT NULL REFERENCES metering.accounts (id),
    state             text NOT NULL CHECK (state IN ('pending', 'committed', 'released', 'expired')),
    metrics           text[] NOT NULL,
    parent_ids        text[] NOT NULL,
    amounts           bigint[] NOT NULL,
    committed_amounts bigint[],
    resource_id       text NOT NULL,
    idempotency_key   text NOT NULL,
    actor             text NOT NULL,
    create_time       timestamptz NOT NULL,
    expire_time       timestamptz NOT NULL,
    finish_time       timestamptz
);

-- Pending reservations are few per account, so summing them stays cheap
-- however long the history grows.
CREATE INDEX reservations_pending_by_account ON metering.reservations (account_id, expire_time)
    WHERE state = 'pending';
CREATE INDEX reservations_pending_by_expiry ON metering.reservations (expire_time)
    WHERE state = 'pending';
CREATE INDEX reservations_by_account_time ON metering.reservations (account_id, create_time DESC, id DESC);

-- Idempotency keys are scoped per account. request_hash covers the operation
-- and the whole request, so reusing a key for another request is detected.
CREATE TABLE metering.idempotency_keys (
    account_id     text NOT NULL REFERENCES metering.accounts (id),
    key            text NOT NULL,
    request_hash   bytea NOT NULL,
    reservation_id uuid REFERENCES metering.reservations (id),
    response       jsonb,
    create_time    timestamptz NOT NULL,
    PRIMARY KEY (account_id, key)
);

-- What each committed resource added, so its deletion subtracts exactly that,
-- once. amount is the committed amount of the metric for the resource.
CREATE TABLE metering.counted_resources (
    account_id     text NOT NULL REFERENCES metering.accounts (id),
    metric         text NOT NULL REFERENCES metering.metrics (name),
    resource_id    text NOT NULL,
    parent_id      text NOT NULL,
    amount         bigint NOT NULL,
    reservation_id uuid REFERENCES metering.reservations (id),
    create_time    timestamptz NOT NULL,
    delete_time    timestamptz,
    subtracted     bigint,
    PRIMARY KEY (account_id, metric, resource_id)
);

-- The ledger: one row per change of one counter, written in the same
-- transaction as the change, so sum(amount) per counter equals counters.used.
CREATE TABLE metering.usage_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     text NOT NULL,
    metric         text NOT NULL,
    parent_id      text NOT NULL,
    period_start   timestamptz NOT NULL,
    amount         bigint NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('commit', 'record', 'deletion', 'adjustment')),
    resource_id    text NOT NULL,
    reservation_id uuid,
    actor          text NOT NULL,
    reason         text NOT NULL,
    create_time    timestamptz NOT NULL
);

-- Default plans. Per-period limits count creates in one billing period;
-- agents and storage_bytes count what exists now; documents per task count
-- the documents that exist now in one task.
INSERT INTO metering.plans (id, display_name, create_time, update_time) VALUES
    ('free',       'Free',       '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    ('pro',        'Pro',        '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    ('enterprise', 'Enterprise', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z');

INSERT INTO metering.plan_limits (plan_id, metric, scope, max_amount, unlimited) VALUES
    ('free', 'agents',        'account', 3,             false),
    ('free', 'tasks',         'account', 100,           false),
    ('free', 'documents',     'account', 200,           false),
    ('free', 'documents',     'parent',  20,            false),
    ('free', 'messages',      'account', 1000,          false),
    ('free', 'storage_bytes', 'account', 1073741824,    false),
    ('pro',  'agents',        'account', 25,            false),
    ('pro',  'tasks',         'account', 5000,          false),
    ('pro',  'documents',     'account', 10000,         false),
    ('pro',  'documents',     'parent',  200,           false),
    ('pro',  'messages',      'account', 100000,        false),
    ('pro',  'storage_bytes', 'account', 107374182400,  false),
    ('enterprise', 'agents',        'account', NULL, true),
    ('enterprise', 'tasks',         'account', NULL, true),
    ('enterprise', 'documents',     'account', NULL, true),
    ('enterprise', 'documents',     'parent',  NULL, true),
    ('enterprise', 'messages',      'account', NULL, true),
    ('enterprise', 'storage_bytes', 'account', NULL, true);

-- period_bounds returns the billing period that contains p_at: calendar
-- months from the anchor in UTC. Each start is the anchor plus k months,
-- clamped to the month's last day, so an anchor on the 31st gives Jan 31,
-- Feb 28 (29), Mar 31, Apr 30 and never drifts.
CREATE FUNCTION metering.period_bounds(p_anchor timestamptz, p_at timestamptz,
                                       OUT period_start timestamptz, OUT period_end timestamptz)
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    anchor timestamp := p_anchor AT TIME ZONE 'UTC';
    at     timestamp := p_at AT TIME ZONE 'UTC';
    months integer;
BEGIN
    months := (extract(year FROM at)::integer - extract(year FROM anchor)::integer) * 12
            + extract(month FROM at)::integer - extract(month FROM anchor)::integer;
    IF anchor + make_interval(months => months) > at THEN
        months := months - 1;
    END IF;
    period_start := (anchor + make_interval(months => months)) AT TIME ZONE 'UTC';
    period_end := (anchor + make_interval(months => months + 1)) AT TIME ZONE 'UTC';
END
$$;

-- counter_state returns the state of the counters named by the parallel
-- arrays (metric, parent_id, requested): used in the current period or in
-- total, reserved by pending reservations that have not expired, the plan's
-- limit, and whether used + reserved + requested exceeds it. A parent_id of ''
-- names the account-wide counter. p_skip_reservation is left out of reserved.
CREATE FUNCTION metering.counter_state(p_account text, p_plan text, p_period_start timestamptz,
                                       p_now timestamptz, p_metrics text[], p_parents text[],
                                       p_requested bigint[], p_skip_reservation uuid)
RETURNS TABLE (metric text, scope text, parent_id text, kind text, period_start timestamptz,
               used bigint, reserved bigint, max_amount bigint, unlimited boolean,
               requested bigint, exceeded boolean, overflow boolean)
LANGUAGE sql STABLE AS $$
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
    ORDER BY s.ord
$$;

-- item_counters expands request items into the counters they touch: each item
-- counts for its metric's account-wide counter, and an item with a parent also
-- for the per-parent counter when the metric has one. Returns parallel arrays.
CREATE FUNCTION metering.item_counters(p_metrics text[], p_parents text[], p_amounts bigint[],
                                       OUT metrics text[], OUT parents text[], OUT amounts bigint[])
LANGUAGE sql STABLE AS $$
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
    )
    -- Items that touch the same counter are summed, so the limit check sees
    -- their total. A sum past the largest bigint is clamped to it, which the
    -- overflow check then reports.
    , summed AS (
        SELECT c.metric, c.parent_id, least(sum(c.amount), 9223372036854775807)::bigint AS amount, min(c.ord) AS ord
        FROM counters c
        GROUP BY c.metric, c.parent_id
    )
    SELECT coalesce(array_agg(s.metric ORDER BY s.ord), '{}'),
           coalesce(array_agg(s.parent_id ORDER BY s.ord), '{}'),
           coalesce(array_agg(s.amount ORDER BY s.ord), '{}')
    FROM summed s
$$;

-- usage_json renders counter_state rows as a JSON array.
CREATE FUNCTION metering.usage_json(p_account text, p_plan text, p_period_start timestamptz,
                                    p_now timestamptz, p_metrics text[], p_parents text[],
                                    p_requested bigint[], p_skip_reservation uuid)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'metric', s.metric, 'scope', s.scope, 'parent_id', s.parent_id, 'kind', s.kind,
               'used', s.used, 'reserved', s.reserved, 'limit', s.max_amount,
               'unlimited', s.unlimited, 'requested', s.requested, 'exceeded', s.exceeded,
               'overflow', s.overflow)), '[]')
    FROM metering.counter_state(p_account, p_plan, p_period_start, p_now, p_metrics, p_parents,
                                p_requested, p_skip_reservation) s
$$;

-- reservation_json renders a reservation with its effective state: a pending
-- reservation past its expiry reads as expired before the sweeper marks it.
CREATE FUNCTION metering.reservation_json(r metering.reservations, p_now timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', r.id, 'account_id', r.account_id,
        'state', CASE WHEN r.state = 'pending' AND r.expire_time <= p_now THEN 'expired' ELSE r.state END,
        'metrics', r.metrics, 'parent_ids', r.parent_ids, 'amounts', r.amounts,
        'committed_amounts', r.committed_amounts, 'resource_id', r.resource_id,
        'idempotency_key', r.idempotency_key, 'create_time', r.create_time,
        'expire_time', r.expire_time)
$$;

-- apply_usage adds amounts to counters and appends one ledger row per counter
-- changed. The arrays are counters as item_counters returns them. Zero
-- amounts change nothing.
CREATE FUNCTION metering.apply_usage(p_account text, p_period_start timestamptz, p_now timestamptz,
                                     p_metrics text[], p_parents text[], p_amounts bigint[],
                                     p_kind text, p_resource text, p_reservation uuid,
                                     p_actor text, p_reason text)
RETURNS void
LANGUAGE sql AS $$
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
    FROM changes c
$$;

-- record_resources remembers what a resource added for each of its items
-- whose metric has a running total, so RecordDeletion can subtract it later.
-- Returns the metric of an item whose resource was already counted, or NULL.
CREATE FUNCTION metering.record_resources(p_account text, p_resource text, p_reservation uuid,
                                          p_now timestamptz, p_metrics text[], p_parents text[],
                                          p_amounts bigint[])
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    taken text;
BEGIN
    IF p_resource = '' THEN
        RETURN NULL;
    END IF;

    SELECT cr.metric INTO taken
    FROM metering.counted_resources cr
    WHERE cr.account_id = p_account AND cr.resource_id = p_resource AND cr.metric = ANY (p_metrics)
      AND cr.delete_time IS NULL
    LIMIT 1;
    IF FOUND THEN
        RETURN taken;
    END IF;

    -- A resource whose deletion was recorded may be counted again, as when
    -- an upload is stored again under the same id. The ledger keeps both.
    INSERT INTO metering.counted_resources AS cr (account_id, metric, resource_id, parent_id, amount,
                                                  reservation_id, create_time)
    SELECT p_account, i.metric, p_resource, i.parent_id, i.amount, p_reservation, p_now
    FROM unnest(p_metrics, p_parents, p_amounts) AS i (metric, parent_id, amount)
    JOIN metering.metrics m ON m.name = i.metric
    WHERE m.account_kind = 'running' OR m.parent_kind = 'running'
    ON CONFLICT (account_id, metric, resource_id) DO UPDATE SET
        parent_id = excluded.parent_id, amount = excluded.amount, reservation_id = excluded.reservation_id,
        create_time = excluded.create_time, delete_time = NULL, subtracted = NULL;
    RETURN NULL;
END
$$;

-- running_metric returns the first metric among the items that adds
-- to a running total with a positive amount, or NULL.
CREATE FUNCTION metering.running_metric(p_metrics text[], p_parents text[], p_amounts bigint[])
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT i.metric
    FROM unnest(p_metrics, p_parents, p_amounts) WITH ORDINALITY AS i (metric, parent_id, amount, ord)
    JOIN metering.metrics m ON m.name = i.metric
    WHERE i.amount > 0
      AND (m.account_kind = 'running' OR (i.parent_id <> '' AND m.parent_kind = 'running'))
    ORDER BY i.ord
    LIMIT 1
$$;

-- reserve checks that every item fits and holds the capacity, all items or
-- none. The account row lock serializes every change to one account's
-- counters, so the check and the hold are one atomic step.
CREATE FUNCTION metering.reserve(p_account text, p_metrics text[], p_parents text[], p_amounts bigint[],
                                 p_key text, p_hash bytea, p_ttl interval, p_resource text,
                                 p_actor text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    acct     metering.accounts;
    res      metering.reservations;
    idem     metering.idempotency_keys;
    period   record;
    cnt      record;
    usage    jsonb;
    rejected boolean;
BEGIN
    SELECT * INTO acct FROM metering.accounts WHERE id = p_account FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'account_not_found');
    END IF;
    period := metering.period_bounds(acct.billing_anchor, p_now);

    IF p_key <> '' THEN
        SELECT * INTO idem FROM metering.idempotency_keys WHERE account_id = p_account AND key = p_key;
        IF FOUND THEN
            IF idem.request_hash <> p_hash OR idem.reservation_id IS NULL THEN
                RETURN jsonb_build_object('outcome', 'key_conflict');
            END IF;
            SELECT * INTO res FROM metering.reservations WHERE id = idem.reservation_id;
            cnt := metering.item_counters(res.metrics, res.parent_ids, array_fill(0::bigint, ARRAY[cardinality(res.metrics)]));
            RETURN jsonb_build_object(
                'outcome', 'replayed',
                'reservation', metering.reservation_json(res, p_now),
                'period_start', period.period_start, 'period_end', period.period_end,
                'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now,
                                             cnt.metrics, cnt.parents, cnt.amounts, NULL));
        END IF;
    END IF;

    cnt := metering.item_counters(p_metrics, p_parents, p_amounts);
    usage := metering.usage_json(p_account, acct.plan_id, period.period_start, p_now,
                                 cnt.metrics, cnt.parents, cnt.amounts, NULL);
    IF jsonb_path_exists(usage, '$[*] ? (@.overflow == true)') THEN
        RETURN jsonb_build_object('outcome', 'overflow', 'usage', usage);
    END IF;
    rejected := jsonb_path_exists(usage, '$[*] ? (@.exceeded == true)');
    IF rejected AND acct.enforcement = 'enforce' THEN
        RETURN jsonb_build_object('outcome', 'rejected', 'usage', usage,
                                  'period_start', period.period_start, 'period_end', period.period_end);
    END IF;

    INSERT INTO metering.reservations (account_id, state, metrics, parent_ids, amounts, resource_id,
                                       idempotency_key, actor, create_time, expire_time)
    VALUES (p_account, 'pending', p_metrics, p_parents, p_amounts, p_resource, p_key, p_actor,
            p_now, p_now + p_ttl)
    RETURNING * INTO res;

    IF p_key <> '' THEN
        INSERT INTO metering.idempotency_keys (account_id, key, request_hash, reservation_id, create_time)
        VALUES (p_account, p_key, p_hash, res.id, p_now);
    END IF;

    RETURN jsonb_build_object(
        'outcome', 'granted',
        'reservation', metering.reservation_json(res, p_now),
        'period_start', period.period_start, 'period_end', period.period_end,
        -- The state before this reservation, with requested = its amounts.
        'usage', usage);
END
$$;

-- commit records the actual usage of a reservation. p_metrics, p_parents and
-- p_amounts are the actual amounts the caller named; other items commit their
-- reserved amount.
CREATE FUNCTION metering.commit(p_account text, p_id uuid, p_metrics text[], p_parents text[],
                                p_amounts bigint[], p_resource text, p_actor text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    acct     metering.accounts;
    res      metering.reservations;
    period   record;
    cnt      record;
    actual   bigint[];
    bad      record;
    resource text;
    running  text;
    taken    text;
    usage    jsonb;
    expired  boolean;
BEGIN
    SELECT * INTO acct FROM metering.accounts WHERE id = p_account FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'reservation_not_found');
    END IF;
    SELECT * INTO res FROM metering.reservations WHERE id = p_id AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'reservation_not_found');
    END IF;
    period := metering.period_bounds(acct.billing_anchor, p_now);

    -- An actual item must name a reserved metric and parent and may not
    -- exceed the reserved amount.
    SELECT a.ord, a.metric, a.amount, r.amount AS reserved INTO bad
    FROM unnest(p_metrics, p_parents, p_amounts) WITH ORDINALITY AS a (metric, parent_id, amount, ord)
    LEFT JOIN unnest(res.metrics, res.parent_ids, res.amounts) AS r (metric, parent_id, amount)
           ON r.metric = a.metric AND r.parent_id = a.parent_id
    WHERE r.amount IS NULL OR a.amount > r.amount
    ORDER BY a.ord
    LIMIT 1;
    IF FOUND THEN
        RETURN jsonb_build_object('outcome', 'invalid_actual', 'index', bad.ord - 1,
                                  'metric', bad.metric, 'reserved', bad.reserved);
    END IF;

    SELECT array_agg(coalesce(a.amount, r.amount) ORDER BY r.ord) INTO actual
    FROM unnest(res.metrics, res.parent_ids, res.amounts) WITH ORDINALITY AS r (metric, parent_id, amount, ord)
    LEFT JOIN unnest(p_metrics, p_parents, p_amounts) AS a (metric, parent_id, amount)
           ON a.metric = r.metric AND a.parent_id = r.parent_id;

    IF res.state = 'committed' THEN
        IF actual IS DISTINCT FROM res.committed_amounts
           OR (p_resource <> '' AND p_resource <> res.resource_id) THEN
            RETURN jsonb_build_object('outcome', 'already_committed',
                                      'reservation', metering.reservation_json(res, p_now));
        END IF;
        cnt := metering.item_counters(res.metrics, res.parent_ids, array_fill(0::bigint, ARRAY[cardinality(res.metrics)]));
        RETURN jsonb_build_object(
            'outcome', 'replayed',
            'reservation', metering.reservation_json(res, p_now),
            'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now,
                                         cnt.metrics, cnt.parents, cnt.amounts, NULL));
    END IF;
    IF res.state = 'released' THEN
        RETURN jsonb_build_object('outcome', 'released', 'reservation', metering.reservation_json(res, p_now));
    END IF;

    IF p_resource <> '' AND res.resource_id <> '' AND p_resource <> res.resource_id THEN
        RETURN jsonb_build_object('outcome', 'resource_mismatch', 'resource_id', res.resource_id);
    END IF;
    resource := CASE WHEN p_resource <> '' THEN p_resource ELSE res.resource_id END;
    running := metering.running_metric(res.metrics, res.parent_ids, actual);
    IF resource = '' AND running IS NOT NULL THEN
        RETURN jsonb_build_object('outcome', 'resource_required', 'metric', running);
    END IF;

    -- An expired reservation no longer holds capacity: it commits only if the
    -- capacity is still free now.
    cnt := metering.item_counters(res.metrics, res.parent_ids, actual);
    expired := res.state = 'expired' OR res.expire_time <= p_now;
    IF expired THEN
        usage := metering.usage_json(p_account, acct.plan_id, period.period_start, p_now,
                                     cnt.metrics, cnt.parents, cnt.amounts, res.id);
        IF jsonb_path_exists(usage, '$[*] ? (@.overflow == true)') THEN
            RETURN jsonb_build_object('outcome', 'overflow');
        END IF;
        IF acct.enforcement = 'enforce' AND jsonb_path_exists(usage, '$[*] ? (@.exceeded == true)') THEN
            IF res.state = 'pending' THEN
                UPDATE metering.reservations SET state = 'expired', finish_time = res.expire_time
                WHERE id = res.id
                RETURNING * INTO res;
            END IF;
            RETURN jsonb_build_object('outcome', 'expired', 'usage', usage,
                                      'reservation', metering.reservation_json(res, p_now),
                                      'period_start', period.period_start, 'period_end', period.period_end);
        END IF;
    END IF;

    taken := metering.record_resources(p_account, resource, res.id, p_now, res.metrics, res.parent_ids, actual);
    IF taken IS NOT NULL THEN
        RETURN jsonb_build_object('outcome', 'resource_counted', 'metric', taken, 'resource_id', resource);
    END IF;

    PERFORM metering.apply_usage(p_account, period.period_start, p_now, cnt.metrics, cnt.parents,
                                 cnt.amounts, 'commit', resource, res.id, p_actor, '');
    UPDATE metering.reservations
    SET state = 'committed', committed_amounts = actual, resource_id = resource, finish_time = p_now
    WHERE id = res.id
    RETURNING * INTO res;

    cnt := metering.item_counters(res.metrics, res.parent_ids, array_fill(0::bigint, ARRAY[cardinality(res.metrics)]));
    RETURN jsonb_build_object(
        'outcome', 'committed',
        'reservation', metering.reservation_json(res, p_now),
        'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now,
                                     cnt.metrics, cnt.parents, cnt.amounts, NULL));
END
$$;

-- release frees a pending reservation. Releasing a released or expired one
-- changes nothing.
CREATE FUNCTION metering.release(p_account text, p_id uuid, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    res metering.reservations;
BEGIN
    SELECT * INTO res FROM metering.reservations WHERE id = p_id AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'reservation_not_found');
    END IF;
    IF res.state = 'committed' THEN
        RETURN jsonb_build_object('outcome', 'committed', 'reservation', metering.reservation_json(res, p_now));
    END IF;
    IF res.state = 'pending' THEN
        UPDATE metering.reservations SET state = 'released', finish_time = p_now
        WHERE id = res.id
        RETURNING * INTO res;
    END IF;
    RETURN jsonb_build_object('outcome', 'released', 'reservation', metering.reservation_json(res, p_now));
END
$$;

-- record_usage counts usage that already happened. It is never rejected for
-- quota; the result lists the limits exceeded afterwards.
CREATE FUNCTION metering.record_usage(p_account text, p_metrics text[], p_parents text[], p_amounts bigint[],
                                      p_key text, p_hash bytea, p_resource text, p_actor text,
                                      p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    acct   metering.accounts;
    idem   metering.idempotency_keys;
    period record;
    cnt    record;
    taken  text;
    result jsonb;
BEGIN
    SELECT * INTO acct FROM metering.accounts WHERE id = p_account FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'account_not_found');
    END IF;
    period := metering.period_bounds(acct.billing_anchor, p_now);

    IF p_key <> '' THEN
        SELECT * INTO idem FROM metering.idempotency_keys WHERE account_id = p_account AND key = p_key;
        IF FOUND THEN
            IF idem.request_hash <> p_hash OR idem.response IS NULL THEN
                RETURN jsonb_build_object('outcome', 'key_conflict');
            END IF;
            RETURN idem.response || jsonb_build_object('outcome', 'replayed');
        END IF;
    END IF;

    cnt := metering.item_counters(p_metrics, p_parents, p_amounts);
    IF EXISTS (SELECT 1 FROM metering.counter_state(p_account, acct.plan_id, period.period_start, p_now,
                                                    cnt.metrics, cnt.parents, cnt.amounts, NULL) s
               WHERE s.overflow) THEN
        RETURN jsonb_build_object('outcome', 'overflow');
    END IF;

    taken := metering.record_resources(p_account, p_resource, NULL, p_now, p_metrics, p_parents, p_amounts);
    IF taken IS NOT NULL THEN
        RETURN jsonb_build_object('outcome', 'resource_counted', 'metric', taken, 'resource_id', p_resource);
    END IF;

    PERFORM metering.apply_usage(p_account, period.period_start, p_now, cnt.metrics, cnt.parents,
                                 cnt.amounts, 'record', p_resource, NULL, p_actor, '');
    result := jsonb_build_object(
        'outcome', 'recorded',
        'period_start', period.period_start, 'period_end', period.period_end,
        'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now, cnt.metrics,
                                     cnt.parents, array_fill(0::bigint, ARRAY[cardinality(cnt.metrics)]), NULL));

    IF p_key <> '' THEN
        INSERT INTO metering.idempotency_keys (account_id, key, request_hash, response, create_time)
        VALUES (p_account, p_key, p_hash, result, p_now);
    END IF;
    RETURN result;
END
$$;

-- record_deletion subtracts from running totals exactly what the commit of a
-- resource added, once. Period counters keep what happened. A counter lowered
-- by an operator's adjustment meanwhile stops at zero.
CREATE FUNCTION metering.record_deletion(p_account text, p_metric text, p_resource text,
                                         p_actor text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    acct     metering.accounts;
    cr       metering.counted_resources;
    m        metering.metrics;
    period   record;
    metrics  text[] := '{}';
    parents  text[] := '{}';
    amounts  bigint[] := '{}';
    current  bigint;
    minus    bigint;
    total    bigint := 0;
    replayed boolean;
BEGIN
    SELECT * INTO acct FROM metering.accounts WHERE id = p_account FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'account_not_found');
    END IF;
    period := metering.period_bounds(acct.billing_anchor, p_now);

    SELECT * INTO cr FROM metering.counted_resources
    WHERE account_id = p_account AND metric = p_metric AND resource_id = p_resource
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'resource_not_found');
    END IF;

    SELECT * INTO m FROM metering.metrics WHERE name = p_metric;
    IF m.account_kind = 'running' THEN
        metrics := metrics || p_metric;
        parents := parents || ''::text;
    END IF;
    IF cr.parent_id <> '' AND m.parent_kind = 'running' THEN
        metrics := metrics || p_metric;
        parents := parents || cr.parent_id;
    END IF;

    replayed := cr.delete_time IS NOT NULL;
    IF NOT replayed THEN
        FOR i IN 1 .. cardinality(metrics) LOOP
            SELECT c.used INTO current FROM metering.counters c
            WHERE c.account_id = p_account AND c.metric = metrics[i] AND c.parent_id = parents[i]
              AND c.period_start = '-infinity';
            minus := least(cr.amount, coalesce(current, 0));
            amounts := amounts || (-minus);
            total := greatest(total, minus);
        END LOOP;

        PERFORM metering.apply_usage(p_account, period.period_start, p_now, metrics, parents, amounts,
                                     'deletion', p_resource, cr.reservation_id, p_actor, '');
        UPDATE metering.counted_resources SET delete_time = p_now, subtracted = total
        WHERE account_id = p_account AND metric = p_metric AND resource_id = p_resource
        RETURNING * INTO cr;
    END IF;

    RETURN jsonb_build_object(
        'outcome', 'deleted', 'replayed', replayed,
        'subtracted', cr.subtracted, 'parent_id', cr.parent_id,
        'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now, metrics, parents,
                                     array_fill(0::bigint, ARRAY[cardinality(metrics)]), NULL));
END
$$;

-- adjust_usage applies an operator's signed correction to one counter.
CREATE FUNCTION metering.adjust_usage(p_account text, p_metric text, p_parent text, p_delta bigint,
                                      p_reason text, p_key text, p_hash bytea, p_actor text,
                                      p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    acct   metering.accounts;
    idem   metering.idempotency_keys;
    period record;
    st     record;
    result jsonb;
BEGIN
    SELECT * INTO acct FROM metering.accounts WHERE id = p_account FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'account_not_found');
    END IF;
    period := metering.period_bounds(acct.billing_anchor, p_now);

    IF p_key <> '' THEN
        SELECT * INTO idem FROM metering.idempotency_keys WHERE account_id = p_account AND key = p_key;
        IF FOUND THEN
            IF idem.request_hash <> p_hash OR idem.response IS NULL THEN
                RETURN jsonb_build_object('outcome', 'key_conflict');
            END IF;
            RETURN idem.response || jsonb_build_object('outcome', 'replayed');
        END IF;
    END IF;

    SELECT * INTO st FROM metering.counter_state(p_account, acct.plan_id, period.period_start, p_now,
                                                ARRAY[p_metric], ARRAY[p_parent], ARRAY[0::bigint], NULL);
    IF st.used::numeric + p_delta < 0 THEN
        RETURN jsonb_build_object('outcome', 'negative', 'used', st.used);
    END IF;
    -- Pending reservations may still commit, so they count toward overflow.
    IF st.used::numeric + st.reserved + p_delta > 9223372036854775807 THEN
        RETURN jsonb_build_object('outcome', 'overflow');
    END IF;

    PERFORM metering.apply_usage(p_account, period.period_start, p_now, ARRAY[p_metric], ARRAY[p_parent],
                                 ARRAY[p_delta], 'adjustment', '', NULL, p_actor, p_reason);
    result := jsonb_build_object(
        'outcome', 'adjusted',
        'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now, ARRAY[p_metric],
                                     ARRAY[p_parent], ARRAY[0::bigint], NULL));
    IF p_key <> '' THEN
        INSERT INTO metering.idempotency_keys (account_id, key, request_hash, response, create_time)
        VALUES (p_account, p_key, p_hash, result, p_now);
    END IF;
    RETURN result;
END
$$;

-- current_usage returns an account's plan, period and the usage of every
-- metric, plus the per-parent counters of p_parent when it is not ''.
CREATE FUNCTION metering.current_usage(p_account text, p_parent text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    acct    metering.accounts;
    period  record;
    metrics text[];
    parents text[];
BEGIN
    SELECT * INTO acct FROM metering.accounts WHERE id = p_account;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'account_not_found');
    END IF;
    period := metering.period_bounds(acct.billing_anchor, p_now);

    SELECT array_agg(c.metric ORDER BY c.ord), array_agg(c.parent_id ORDER BY c.ord)
    INTO metrics, parents
    FROM (
        SELECT m.name AS metric, '' AS parent_id, m.sort_order * 2 AS ord FROM metering.metrics m
        UNION ALL
        SELECT m.name, p_parent, m.sort_order * 2 + 1 FROM metering.metrics m
        WHERE p_parent <> '' AND m.parent_kind IS NOT NULL
    ) c;

    RETURN jsonb_build_object(
        'outcome', 'ok', 'plan_id', acct.plan_id, 'enforcement', acct.enforcement,
        'period_start', period.period_start, 'period_end', period.period_end,
        'usage', metering.usage_json(p_account, acct.plan_id, period.period_start, p_now, metrics, parents,
                                     array_fill(0::bigint, ARRAY[cardinality(metrics)]), NULL));
END
$$;
