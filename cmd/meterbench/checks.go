package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/metering/metering/internal/metering"
)

// checkTimeout bounds the checks after one cell.
const checkTimeout = 2 * time.Minute

// maxReportedViolations is how many offending counters a failed check
// names.
const maxReportedViolations = 5

// Check names, as printed.
const (
	checkNameLimits = "no counter over its limit"
	checkNameLedger = "counters equal the ledger"
	checkNameTotals = "counters equal acknowledged writes"
	checkNameGrants = "grants within the limit"
	checkNameErrors = "no unexpected errors"
)

// checkResult is the outcome of one check after one cell.
type checkResult struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// checker runs the checks against the benchmark database.
type checker struct {
	pool    *pgxpool.Pool
	service *metering.Service
}

// overLimitQuery returns the counters whose used amount plus the amounts of
// unexpired pending reservations exceeds the limit of the account's plan.
// An item with a parent also counts for the account, as in the reserve
// function. Used amounts are summed over periods, which is exact here
// because a benchmark database lives within its accounts' first billing
// period (a month from the setup).
const overLimitQuery = `
	WITH items AS (
		SELECT r.account_id, i.metric, i.parent_id, i.amount
		FROM metering.reservations r
		CROSS JOIN LATERAL unnest(r.metrics, r.parent_ids, r.amounts) AS i(metric, parent_id, amount)
		WHERE r.state = 'pending' AND r.expire_time > $1
	),
	usage AS (
		SELECT account_id, metric, parent_id, used, 0::bigint AS reserved FROM metering.counters
		UNION ALL
		SELECT account_id, metric, '', 0, amount FROM items
		UNION ALL
		SELECT account_id, metric, parent_id, 0, amount FROM items WHERE parent_id <> ''
	),
	totals AS (
		SELECT u.account_id, u.metric, u.parent_id, sum(u.used)::bigint AS used,
		       sum(u.reserved)::bigint AS reserved, l.max_amount
		FROM usage u
		JOIN metering.accounts a ON a.id = u.account_id
		JOIN metering.plan_limits l ON l.plan_id = a.plan_id AND l.metric = u.metric
			AND l.scope = CASE WHEN u.parent_id = '' THEN 'account' ELSE 'parent' END
		WHERE NOT l.unlimited
		GROUP BY u.account_id, u.metric, u.parent_id, l.max_amount
	)
	SELECT count(*) OVER (), count(*) FILTER (WHERE used + reserved > max_amount) OVER (),
	       account_id, metric, parent_id, used, reserved, max_amount
	FROM totals
	ORDER BY used + reserved > max_amount DESC, account_id, metric, parent_id
	LIMIT $2`

// checkLimits proves that no counter plus its pending reservations exceeds
// its plan's limit.
func (c checker) checkLimits(ctx context.Context) checkResult {
	res := checkResult{Name: checkNameLimits}

	rows, err := c.pool.Query(ctx, overLimitQuery, time.Now(), maxReportedViolations)
	if err != nil {
		res.Detail = fmt.Sprintf("query failed: %v", err)
		return res
	}
	defer rows.Close()

	var (
		checked, over int64
		violations    []string
	)
	for rows.Next() {
		var (
			account, metric, parent string
			used, reserved, limit   int64
		)
		if err := rows.Scan(&checked, &over, &account, &metric, &parent, &used, &reserved, &limit); err != nil {
			res.Detail = fmt.Sprintf("scan failed: %v", err)
			return res
		}
		if used+reserved > limit {
			violations = append(violations, fmt.Sprintf("%s %s%s used %d + reserved %d > limit %d",
				account, metric, parentSuffix(parent), used, reserved, limit))
		}
	}
	if err := rows.Err(); err != nil {
		res.Detail = fmt.Sprintf("query failed: %v", err)
		return res
	}

	if over > 0 {
		res.Detail = fmt.Sprintf("%d of %d counters over their limit: %s", over, checked, strings.Join(violations, "; "))
		return res
	}
	res.OK = true
	res.Detail = fmt.Sprintf("%d counters checked", checked)

	return res
}

// backendPIDs returns the process ids of the sessions connected to the
// benchmark database other than the one it queries on: the server's pool
// and the idle connections of the checker's. It returns nil when the query
// fails.
func (c checker) backendPIDs(ctx context.Context) []int {
	const query = `
		SELECT pid FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'`

	rows, err := c.pool.Query(ctx, query)
	if err != nil {
		return nil
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		return nil
	}

	return pids
}

func parentSuffix(parent string) string {
	if parent == "" {
		return ""
	}

	return " parent " + parent
}

// checkLedger proves with metering.Service.Reconcile that every counter
// equals the sum of its usage events.
func (c checker) checkLedger(ctx context.Context) checkResult {
	res := checkResult{Name: checkNameLedger}

	mismatches, err := c.service.Reconcile(ctx)
	if err != nil {
		res.Detail = fmt.Sprintf("reconcile failed: %v", err)
		return res
	}
	if len(mismatches) > 0 {
		var listed []string
		for _, m := range mismatches[:min(len(mismatches), maxReportedViolations)] {
			listed = append(listed, fmt.Sprintf("%s %s%s period %s counter %d ledger %d",
				m.AccountID, m.Metric, parentSuffix(m.ParentID), m.PeriodStart, m.Counter, m.Ledger))
		}
		res.Detail = fmt.Sprintf("%d counters differ from the ledger: %s", len(mismatches), strings.Join(listed, "; "))
		return res
	}
	res.OK = true
	res.Detail = "reconcile found no difference"

	return res
}

// checkTotals proves that the counters w names add up to the writes the
// client saw acknowledged. Writes that failed with an unknown outcome may
// or may not have been applied, so the sum may exceed acknowledged by up to
// unknown.
func (c checker) checkTotals(ctx context.Context, w writtenCounter, acknowledged, unknown int64) checkResult {
	const query = `
		SELECT coalesce(sum(used), 0)::bigint FROM metering.counters
		WHERE metric = $1 AND parent_id = '' AND starts_with(account_id, $2)`

	res := checkResult{Name: checkNameTotals}

	var used int64
	if err := c.pool.QueryRow(ctx, query, w.metric, w.accountPrefix).Scan(&used); err != nil {
		res.Detail = fmt.Sprintf("query failed: %v", err)
		return res
	}

	res.Detail = fmt.Sprintf("%s of %s*: server %d, client %d", w.metric, w.accountPrefix, used, acknowledged)
	if unknown > 0 {
		res.Detail += fmt.Sprintf(" (+ up to %d with unknown outcome)", unknown)
	}
	res.OK = used >= acknowledged && used <= acknowledged+unknown

	return res
}

// checkGrants proves that the cell of scenario (c) granted no more than the
// limit, and exactly the limit when it asked for more than that and no call
// failed unexpectedly: limits are exact both ways.
func checkGrants(limit, granted, rejected int64, unexpected bool) checkResult {
	res := checkResult{
		Name:   checkNameGrants,
		Detail: fmt.Sprintf("%d granted of limit %d, %d rejected", granted, limit, rejected),
	}

	switch {
	case granted > limit:
		res.Detail += ": over-admission"
	case !unexpected && granted+rejected > limit && granted < limit:
		res.Detail += ": under-admission, rejected while capacity was free"
	default:
		res.OK = true
	}

	return res
}

// checkUnexpected fails when any RPC of the cell returned a status the
// scenario does not expect.
func checkUnexpected(codes map[string]int64) checkResult {
	res := checkResult{Name: checkNameErrors, OK: len(codes) == 0, Detail: "none"}
	if len(codes) > 0 {
		var parts []string
		for _, key := range sortedKeys(codes) {
			parts = append(parts, fmt.Sprintf("%s: %d", key, codes[key]))
		}
		res.Detail = strings.Join(parts, ", ")
	}

	return res
}
