package metering

import (
	"context"
	"fmt"
	"time"
)

// sweepBatch is how many reservations one sweeper statement marks expired.
const sweepBatch = 1000

// ExpireReservations marks pending reservations past their expiry as expired
// and returns how many it marked. Expired reservations already stop counting
// at their expiry; this only keeps the stored state and the pending index
// small.
func (s *Service) ExpireReservations(ctx context.Context) (int64, error) {
	const query = `
		UPDATE metering.reservations SET state = 'expired', finish_time = expire_time
		WHERE id IN (
			SELECT id FROM metering.reservations
			WHERE state = 'pending' AND expire_time <= $1
			ORDER BY expire_time
			LIMIT $2
			FOR UPDATE SKIP LOCKED)`

	now := s.now()
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, query, now, sweepBatch)
		if err != nil {
			return total, fmt.Errorf("expire reservations: %w", translate(err))
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < sweepBatch {
			return total, nil
		}
	}
}

// RunSweeper calls ExpireReservations every interval until ctx is done.
func (s *Service) RunSweeper(ctx context.Context, interval time.Duration) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()

	// failing is true after a failed sweep, so an outage logs one warning
	// and one recovery instead of a line every interval.
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}

		n, err := s.ExpireReservations(ctx)
		if err != nil {
			if ctx.Err() == nil && !failing {
				s.logger.WarnContext(ctx, "sweeping expired reservations failed; retrying every interval", "error", err, "interval", interval)
			}
			failing = true
			continue
		}
		if failing {
			s.logger.InfoContext(ctx, "sweeping expired reservations works again")
			failing = false
		}
		if n > 0 {
			s.logger.DebugContext(ctx, "expired reservations marked", "count", n)
		}
	}
}
