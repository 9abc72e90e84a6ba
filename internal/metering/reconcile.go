package metering

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Mismatch is a counter whose value differs from the sum of its ledger rows.
type Mismatch struct {
	AccountID   string
	Metric      Metric
	ParentID    string
	PeriodStart string
	Counter     int64
	Ledger      int64
}

// Reconcile compares every counter with the sum of the usage events written
// for it and returns the counters that differ. An empty result means the
// counters match the ledger. It reads all accounts in one snapshot, so it costs a scan of
// the ledger and is meant for tests and operators, not the hot path.
func (s *Service) Reconcile(ctx context.Context) ([]Mismatch, error) {
	const query = `
		WITH ledger AS (
			SELECT account_id, metric, parent_id, period_start, sum(amount)::bigint AS total
			FROM metering.usage_events
			GROUP BY account_id, metric, parent_id, period_start
		)
		SELECT coalesce(c.account_id, l.account_id), coalesce(c.metric, l.metric),
		       coalesce(c.parent_id, l.parent_id), coalesce(c.period_start, l.period_start)::text,
		       coalesce(c.used, 0), coalesce(l.total, 0)
		FROM metering.counters c
		FULL JOIN ledger l USING (account_id, metric, parent_id, period_start)
		WHERE coalesce(c.used, 0) <> coalesce(l.total, 0)
		ORDER BY 1, 2, 3, 4`

	rows, err := s.pool.Query(ctx, query)
	if err != nil {
		return nil, fmt.Errorf("reconcile: %w", translate(err))
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Mismatch, error) {
		var m Mismatch
		err := row.Scan(&m.AccountID, &m.Metric, &m.ParentID, &m.PeriodStart, &m.Counter, &m.Ledger)
		return m, err
	})
	if err != nil {
		return nil, fmt.Errorf("reconcile: %w", translate(err))
	}
	return out, nil
}

// Now returns the service clock's current time.
func (s *Service) Now() time.Time { return s.now() }
