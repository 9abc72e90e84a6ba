package workspace

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Time limits of the work that outlives a request.
const (
	// releaseTimeout bounds the release of a reservation after a failed
	// create, retries included.
	releaseTimeout = 10 * time.Second
	// releaseWait is how long a request waits for the release of its
	// reservation before it returns and leaves the release running in the
	// background, so a slow Metering does not hold the request.
	releaseWait = time.Second
	// settleTimeout bounds how long a background task keeps trying to
	// settle a create whose outcome was unknown when its request ended.
	settleTimeout = 10 * time.Minute
	// minRetryPause is the first pause between two tries of a background
	// task. It doubles after each try, up to maxRetryPause.
	minRetryPause = 100 * time.Millisecond
	maxRetryPause = 5 * time.Second
)

// tasks runs the goroutines that outlive a request, and lets Close wait for
// them. It is safe for concurrent use.
type tasks struct {
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func newTasks() *tasks {
	ctx, cancel := context.WithCancel(context.Background())

	return &tasks{ctx: ctx, cancel: cancel}
}

// start runs fn in a new goroutine with a context that close cancels. After
// close it returns false without running fn.
func (t *tasks) start(fn func(ctx context.Context)) bool {
	t.mu.Lock()
	defer t.mu.Unlock()

	if t.closed {
		return false
	}
	t.wg.Go(func() { fn(t.ctx) })

	return true
}

// close stops new tasks from starting and waits for the running ones until
// ctx is done. Then it cancels their context and waits for them to return.
func (t *tasks) close(ctx context.Context) {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()

	done := make(chan struct{})
	go func() {
		t.wg.Wait()
		close(done)
	}()

	select {
	case <-done:
	case <-ctx.Done():
		t.cancel()
		<-done
	}
	t.cancel()
}

// reservationUsers counts the attempts in this process that use each reservation.
// Attempts of one request id share a pending reservation, so the one that
// fails first must not release it while another may still commit it. It is
// safe for concurrent use.
type reservationUsers struct {
	mu    sync.Mutex
	count map[string]int
}

func (h *reservationUsers) add(reservationID string) {
	h.mu.Lock()
	defer h.mu.Unlock()

	if h.count == nil {
		h.count = map[string]int{}
	}
	h.count[reservationID]++
}

// drop ends one attempt's use of the reservation and reports whether it was
// the last.
func (h *reservationUsers) drop(reservationID string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()

	h.count[reservationID]--
	if h.count[reservationID] > 0 {
		return false
	}
	delete(h.count, reservationID)

	return true
}

// Close waits until the background tasks end or ctx is done, then stops
// them. They release reservations and settle creates whose outcome was
// unknown when their request ended. Call it after the gRPC server stopped;
// the Service must not be used afterwards. A task stopped early logs what it
// left undone.
func (s *Service) Close(ctx context.Context) {
	s.tasks.close(ctx)
}

// release frees the pending reservation res of a failed create. The
// release runs in the background, and release waits up to releaseWait for
// it. A failure is logged: the reservation then holds its capacity until
// its TTL ends.
func (s *Service) release(ctx context.Context, c create, res reservation) {
	done := make(chan struct{})
	started := s.tasks.start(func(taskCtx context.Context) {
		defer close(done)

		ctx, cancel := context.WithTimeout(taskCtx, releaseTimeout)
		defer cancel()

		err := s.meter.release(ctx, c.accountID, res)
		if err != nil && !errors.Is(err, errAlreadyCommitted) {
			s.logger.WarnContext(ctx, "release reservation failed; the capacity stays reserved until the reservation expires",
				"account_id", c.accountID, "operation", c.operation, "reservation_id", res.id, "ttl", c.ttl, "error", err)
		}
	})
	if !started {
		s.logger.WarnContext(ctx, "service closed, so the reservation was not released; the capacity stays reserved until it expires",
			"account_id", c.accountID, "operation", c.operation, "reservation_id", res.id, "ttl", c.ttl)
		return
	}

	timer := time.NewTimer(releaseWait)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
	}
}

// settleInBackground settles res, whose commit and release got no response,
// after the request's transaction is rolled back. It retries the release
// until Metering responds, for up to settleTimeout. When Metering had
// committed the reservation, it writes the rows again (see writeAgain), so
// the counted create exists; otherwise nothing was counted. Then it
// discards the files that no row uses.
//
// NOTE: the task runs in this process only. When the process stops first,
// or Metering stays unreachable for settleTimeout, a committed reservation
// stays counted without rows. A retry with the same request id completes
// it; without a request id an operator corrects it with AdjustUsage.
func (s *Service) settleInBackground(ctx context.Context, c create, res reservation) {
	attrs := []any{"account_id", c.accountID, "operation", c.operation, "resource_id", c.resourceID, "reservation_id", res.id}

	started := s.tasks.start(func(taskCtx context.Context) {
		ctx, cancel := context.WithTimeout(taskCtx, settleTimeout)
		defer cancel()

		committed, err := retry(ctx, unknownOutcome, func(ctx context.Context) (bool, error) {
			return s.meter.settle(ctx, c.accountID, res)
		})
		if err != nil {
			s.logger.ErrorContext(ctx, "could not find out whether Metering counted a create; if it did, it counts one more than exists",
				append(attrs, "error", err)...)
			s.discard(c)
			return
		}
		if !committed {
			s.logger.InfoContext(ctx, "create settled in the background: Metering did not count it, so it stays undone", attrs...)
			s.discard(c)
			return
		}

		s.writeAgainUntilDone(ctx, c, attrs)
	})
	if !started {
		s.logger.ErrorContext(ctx, "service closed, so a create whose commit got no response cannot be settled", attrs...)
	}
}

// writeAgainInBackground writes the rows of a create that Metering counted
// in a new transaction, retrying while the database is unavailable, for up
// to settleTimeout.
func (s *Service) writeAgainInBackground(ctx context.Context, c create) {
	attrs := []any{"account_id", c.accountID, "operation", c.operation, "resource_id", c.resourceID}

	started := s.tasks.start(func(taskCtx context.Context) {
		ctx, cancel := context.WithTimeout(taskCtx, settleTimeout)
		defer cancel()

		s.writeAgainUntilDone(ctx, c, attrs)
	})
	if !started {
		s.logger.ErrorContext(ctx, "service closed, so the rows of a counted create cannot be written again", attrs...)
	}
}

// writeAgainUntilDone runs writeAgain until it succeeds, fails for another
// reason than an unavailable database, or ctx ends, and logs the result.
func (s *Service) writeAgainUntilDone(ctx context.Context, c create, attrs []any) {
	unavailable := func(err error) bool { return errors.Is(err, errDatabaseUnavailable) }
	replayed, err := retry(ctx, unavailable, func(ctx context.Context) (bool, error) {
		return s.writeAgain(ctx, c)
	})

	switch {
	case err != nil:
		s.logger.ErrorContext(ctx, "create counted in Metering but its rows could not be written", append(attrs, "error", err)...)
		s.discard(c)
	case replayed:
		s.logger.InfoContext(ctx, "create settled in the background: another attempt of the request wrote its rows", attrs...)
		s.discard(c)
	default:
		s.logger.WarnContext(ctx, "create settled in the background: Metering counted it, so its rows were written", attrs...)
	}
}

func (s *Service) discard(c create) {
	if c.discard != nil {
		c.discard()
	}
}

// retry runs fn until it returns an error that retryable rejects, or ctx
// ends, pausing between tries for a time that doubles from minRetryPause to
// maxRetryPause. It returns the last result.
func retry[T any](ctx context.Context, retryable func(error) bool, fn func(context.Context) (T, error)) (T, error) {
	pause := minRetryPause
	for {
		v, err := fn(ctx)
		if err == nil || !retryable(err) || ctx.Err() != nil {
			return v, err
		}

		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(pause):
		}
		pause = min(2*pause, maxRetryPause)
	}
}
