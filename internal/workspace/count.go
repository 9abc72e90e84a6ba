package workspace

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// count counts the written rows of c in Metering: it commits the
// reservation, or records the usage. A nil error means Metering counted
// them. A pendingError means a background task settles the outcome.
func (s *Service) count(ctx context.Context, c create, res *reservation, actual []*meteringv1.UsageItem) error {
	switch {
	case res != nil:
		return s.commitReservation(ctx, c, res, actual)
	case len(c.recorded) > 0:
		return s.recordUsage(ctx, c)
	}

	return nil
}

// commitReservation commits res with the actual amounts. A commit that
// gets no response is settled with a release (see settle).
func (s *Service) commitReservation(ctx context.Context, c create, res *reservation, actual []*meteringv1.UsageItem) error {
	if res.committed {
		// An earlier attempt committed this request in Metering and then
		// failed to write its rows, so these rows complete that create.
		// Only an upload may have counted another amount than this attempt
		// received.
		if c.receive == nil {
			return nil
		}
		return s.recount(ctx, c, actual)
	}

	budget, cancel := s.meteringBudget(ctx)
	err := s.meter.commit(budget, c.accountID, *res, c.resourceID, actual)
	cancel()

	switch {
	case err == nil:
		res.committed = true
		return nil
	case errors.Is(err, errAlreadyCommitted) && c.receive != nil:
		// Another attempt of this upload committed the shared
		// reservation with its own size and then failed to write its
		// row: this attempt's size replaces it.
		res.committed = true
		return s.recount(ctx, c, actual)
	case unknownOutcome(err):
		return s.settle(ctx, c, res, err)
	}

	return err
}

// recount replaces the storage that an earlier attempt of an upload
// committed, but never wrote a row for, with the size this attempt
// received: it records the deletion of the resource, which subtracts
// whatever Metering counts for it now, reserves the received size under the
// next idempotency key and commits it. It runs under the request's advisory
// lock, after finding no row, so no attempt's row loses its count.
//
// NOTE: unlike a first attempt, this attempt received its bytes before
// reserving their storage. The earlier attempt's count is freed first, so
// an account near its limit can still retry.
func (s *Service) recount(ctx context.Context, c create, actual []*meteringv1.UsageItem) error {
	items := actual
	if items == nil {
		items = c.reserved
	}

	budget, cancel := s.meteringBudget(ctx)
	defer cancel()

	for _, item := range items {
		if _, err := s.meter.recordDeletion(budget, c.accountID, item.GetMetric(), c.resourceID); err != nil {
			return err
		}
	}

	r, err := s.meter.reserve(budget, reserveRequest{
		accountID:     c.accountID,
		items:         items,
		ttl:           c.ttl,
		keyBase:       meteringKeyBase(c.requestID),
		origin:        keyOrigin{field: c.requestField, value: c.requestID},
		resourceID:    c.resourceID,
		skipCommitted: true,
	})
	if err != nil {
		return err
	}

	err = s.meter.commit(budget, c.accountID, r, c.resourceID, nil)
	switch {
	case err == nil:
		return nil
	case unknownOutcome(err):
		return s.settle(ctx, c, &r, err)
	}
	s.release(ctx, c, r)

	return err
}

// recordUsage counts the recorded items of c.
//
// NOTE: when RecordUsage gets no response, the transaction is rolled back, but
// Metering may have counted the usage. A retry with the same request id
// reuses the idempotency key and converges; without a request id, Metering
// may count one message more than exists.
func (s *Service) recordUsage(ctx context.Context, c create) error {
	key := meteringKeyBase(c.requestID) + "/record"
	if c.requestID == "" {
		key = newID(meteringKeyPrefix)
	}
	origin := keyOrigin{field: c.requestField, value: c.requestID}

	budget, cancel := s.meteringBudget(ctx)
	defer cancel()

	return s.meter.recordUsage(budget, c.accountID, key, origin, c.recorded, c.resourceID)
}

// settle finds out, while the transaction is still open, whether Metering
// committed res, whose commit got no response (cause). When Metering
// committed it, it returns nil and the transaction is committed. When the
// reservation is released now, it returns cause. When the release gets no
// response either, it hands res to a background task and returns a
// pendingError.
func (s *Service) settle(ctx context.Context, c create, res *reservation, cause error) error {
	budget, cancel := s.meteringBudget(ctx)
	committed, err := s.meter.settle(budget, c.accountID, *res)
	cancel()

	switch {
	case err == nil && committed:
		s.logger.WarnContext(ctx, "metering commit got no response but Metering had applied it, so the create is kept",
			"account_id", c.accountID, "operation", c.operation, "resource_id", c.resourceID, "reservation_id", res.id, "error", cause)
		res.committed = true
		return nil
	case err == nil:
		res.released = true
		return cause
	}

	s.settleInBackground(ctx, c, *res)

	return &pendingError{cause: cause}
}

// meteringBudget returns ctx limited to MeteringTimeout, for the Metering
// calls made while a transaction is open. When the limit passes, the calls
// fail with errMeteringTimedOut.
func (s *Service) meteringBudget(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, s.cfg.MeteringTimeout, errMeteringTimedOut)
}

// unknownOutcome reports whether err leaves it unknown whether Metering
// applied the call: it timed out, or the connection failed, possibly after
// the request was sent.
func unknownOutcome(err error) bool {
	var e *meteringError
	if errors.As(err, &e) {
		code := e.status.Code()
		return code == codes.Unavailable || code == codes.DeadlineExceeded
	}

	return errors.Is(err, errMeteringTimedOut) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}
