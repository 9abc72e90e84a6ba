package workspace

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// databaseTimeout bounds the database work that runs detached from the
// caller: the COMMIT of a create or delete, and writing its rows again.
const databaseTimeout = 10 * time.Second

// create is one create that guard runs.
type create struct {
	accountID string
	// operation is the RPC method name, such as "CreateTask".
	operation string
	// requestID, when set, makes the create idempotent: a retry returns the
	// first result, and every attempt counts the same resource in Metering.
	requestID   string
	requestHash []byte
	// requestField names the field of requestID in errors.
	requestField string
	// resourceID is the id of the row that write inserts, and the resource
	// that Metering counts.
	resourceID string
	// reserved are reserved before the write and committed after it. Empty
	// means the create is not counted before the write, as for a folder.
	reserved []*meteringv1.UsageItem
	// recorded are counted with RecordUsage after the write, for usage that
	// is never refused, such as a message. A create sets reserved or
	// recorded, not both.
	recorded []*meteringv1.UsageItem
	// ttl is the TTL of the reservation.
	ttl time.Duration
	// receive, when set, runs after the reservation and before the
	// transaction, and returns the actual amounts to commit, or nil for the
	// reserved ones. Uploads receive their bytes here.
	receive func(ctx context.Context) ([]*meteringv1.UsageItem, error)
	// write inserts the rows in tx. It may run a second time, in a new
	// transaction, when Metering counted the create but the first
	// transaction failed.
	write func(ctx context.Context, tx pgx.Tx) error
	// discard, when set, runs when the create ends without its rows
	// committed: after a failure, and when an earlier attempt of the same
	// request wrote first.
	discard func()
}

// outcome is the end state of one attempt of a create.
type outcome int

const (
	// outcomeWritten: the rows are committed, and counted.
	outcomeWritten outcome = iota
	// outcomeReplayed: an earlier attempt of the request wrote the rows.
	outcomeReplayed
	// outcomeNotCounted: nothing was written or counted. A pending
	// reservation is to be released.
	outcomeNotCounted
	// outcomePending: the outcome was not known in time, and a background
	// task owns the reservation and the files now.
	outcomePending
	// outcomeCountedWithoutRows: Metering counted the create, but its rows
	// could not be written.
	outcomeCountedWithoutRows
)

// writeError is a failure of the write step, after which the reservation is
// released.
type writeError struct {
	err error
}

func (e *writeError) Error() string { return e.err.Error() }

func (e *writeError) Unwrap() error { return e.err }

// guard runs one create: reserve in Metering, write the rows in a
// transaction, commit the reservation, commit the transaction. It returns
// the id of the created resource, and true when the request id names a create
// that already succeeded, whose resource id it returns without writing.
//
// Failures undo what was done:
//   - Metering refuses or cannot be reached at the reservation: nothing is
//     written, and the error passes Metering's status on.
//   - The write fails: the transaction is rolled back and the reservation
//     released.
//   - The commit fails (RESERVATION_EXPIRED with the capacity gone): the
//     transaction is rolled back, so the rows are never visible.
//   - The commit gets no response: a release settles it. Metering rejects the
//     release of a committed reservation, so a rejection means the create was
//     counted, and the transaction is committed after all. A release that
//     succeeds means it was not, and the transaction is rolled back. When
//     the release gets no response either, the transaction is rolled back and
//     a background task settles the reservation, writing the rows again if
//     Metering counted them (see settleInBackground).
//   - Metering counted the create but the COMMIT of the transaction fails:
//     the rows are written again in a new transaction.
//
// From the Metering commit on, the work runs detached from ctx, so a client
// that cancels or whose deadline passes cannot leave a count without rows.
// The transaction waits at most twice MeteringTimeout for Metering: once for
// the commit and once for the release that settles it.
//
// Attempts of one request id write one at a time, under an advisory lock,
// and the second finds the first's row in workspace.requests.
func (s *Service) guard(ctx context.Context, c create) (string, bool, error) {
	var res *reservation
	out := outcomeNotCounted
	defer func() { s.finish(ctx, c, res, out) }()

	if c.requestID != "" {
		id, found, err := s.findReplay(ctx, s.pool, c)
		if err != nil || found {
			return id, found, err
		}
	}

	if len(c.reserved) > 0 {
		// The reservation is made detached from ctx, so a client that goes
		// away meanwhile does not leave it holding capacity until its TTL:
		// the steps below then fail on ctx, and finish releases it. The
		// retries of meter.reserve bound the call.
		r, err := s.meter.reserve(context.WithoutCancel(ctx), reserveRequest{
			accountID:  c.accountID,
			items:      c.reserved,
			ttl:        c.ttl,
			keyBase:    meteringKeyBase(c.requestID),
			origin:     keyOrigin{field: c.requestField, value: c.requestID},
			resourceID: c.resourceID,
		})
		if err != nil {
			return "", false, err
		}
		res = &r
		s.reservationUsers.add(r.id)
	}

	var actual []*meteringv1.UsageItem
	if c.receive != nil {
		var err error
		if actual, err = c.receive(ctx); err != nil {
			return "", false, err
		}
	}

	id, out, err := s.writeAndCount(ctx, c, res, actual)

	return id, out == outcomeReplayed, err
}

// finish ends an attempt: it releases a reservation that nothing was
// counted for, unless a concurrent attempt of the same request still uses
// it, and discards the files of an upload whose rows were not written.
func (s *Service) finish(ctx context.Context, c create, res *reservation, out outcome) {
	if res != nil {
		last := s.reservationUsers.drop(res.id)
		releasable := out == outcomeNotCounted || out == outcomeReplayed
		if last && releasable && !res.committed && !res.released {
			s.release(ctx, c, *res)
		}
	}

	if c.discard != nil && out != outcomeWritten && out != outcomePending {
		c.discard()
	}
}

// writeAndCount writes the rows of c in a transaction, counts them in
// Metering and commits the transaction. See guard.
func (s *Service) writeAndCount(ctx context.Context, c create, res *reservation, actual []*meteringv1.UsageItem) (string, outcome, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return "", outcomeNotCounted, fmt.Errorf("begin transaction: %w", translate(err))
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // A rollback after commit returns ErrTxClosed, which is expected.

	if c.requestID != "" {
		id, found, err := s.lockAndFindReplay(ctx, tx, c)
		if err != nil {
			return "", outcomeNotCounted, err
		}
		if found {
			return id, outcomeReplayed, nil
		}
	}

	if err := s.writeRows(ctx, tx, c); err != nil {
		return "", outcomeNotCounted, &writeError{err: err}
	}

	// Metering may count the create from here on. The caller's cancel or
	// deadline must not roll the rows back after that, so the rest runs
	// detached from ctx, within its own time limits.
	detached := context.WithoutCancel(ctx)
	if err := s.count(detached, c, res, actual); err != nil {
		var pending *pendingError
		if errors.As(err, &pending) {
			return "", outcomePending, err
		}
		return "", outcomeNotCounted, err
	}

	commitCtx, cancel := context.WithTimeout(detached, databaseTimeout)
	defer cancel()
	if err := tx.Commit(commitCtx); err != nil {
		return s.writeAgainAfterCommitFailure(detached, c, res, translate(err))
	}

	return c.resourceID, outcomeWritten, nil
}

// writeAgainAfterCommitFailure handles a COMMIT that failed after Metering
// counted the create: it writes the rows again in a new transaction. When
// the database is unavailable, a background task keeps trying.
//
// NOTE: when the rows cannot be written for another reason, Metering counts
// one create more than exists. A retry with the same request id writes the
// rows without counting again. Without a request id, the extra count stays
// until an operator corrects it with AdjustUsage.
func (s *Service) writeAgainAfterCommitFailure(ctx context.Context, c create, res *reservation, commitErr error) (string, outcome, error) {
	s.logger.WarnContext(ctx, "transaction commit failed after Metering counted the create; writing the rows again",
		"account_id", c.accountID, "operation", c.operation, "resource_id", c.resourceID, "error", commitErr)

	replayed, err := s.writeAgain(ctx, c)
	switch {
	case err == nil && replayed:
		return c.resourceID, outcomeReplayed, nil
	case err == nil:
		return c.resourceID, outcomeWritten, nil
	case errors.Is(err, errDatabaseUnavailable):
		s.writeAgainInBackground(ctx, c)
		return "", outcomePending, &pendingError{cause: err}
	}

	s.logger.ErrorContext(ctx, "create counted in Metering but its rows could not be written",
		"account_id", c.accountID, "operation", c.operation, "resource_id", c.resourceID, "reservation_id", reservationID(res), "error", err)

	return "", outcomeCountedWithoutRows, err
}

// writeAgain writes the rows of a create that Metering counted in a new
// transaction, without calling Metering. It reports true when the rows
// exist already: an earlier attempt of the request wrote them, or the
// COMMIT that seemed to fail did commit.
func (s *Service) writeAgain(ctx context.Context, c create) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, databaseTimeout)
	defer cancel()

	replayed := false
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if c.requestID != "" {
			_, found, err := s.lockAndFindReplay(ctx, tx, c)
			if err != nil || found {
				replayed = found
				return err
			}
		}
		return s.writeRows(ctx, tx, c)
	})
	if isPrimaryKeyViolation(err) {
		// The ids of created rows are random or derived from the request
		// id, so an existing row is this create's own.
		return false, nil
	}
	if replayed {
		return true, err
	}

	return false, err
}

// writeRows runs the write of c, records its request id, and runs the
// write hook.
func (s *Service) writeRows(ctx context.Context, tx pgx.Tx, c create) error {
	if err := c.write(ctx, tx); err != nil {
		return err
	}

	if c.requestID != "" {
		r := request{operation: c.operation, hash: c.requestHash, resourceID: c.resourceID}
		if err := insertRequest(ctx, tx, c.accountID, c.requestID, r, s.now()); err != nil {
			return err
		}
	}

	if s.cfg.WriteHook != nil {
		return s.cfg.WriteHook(ctx, Write{AccountID: c.accountID, Operation: c.operation, ResourceID: c.resourceID})
	}

	return nil
}

// findReplay returns the resource id of an earlier create with the request
// id of c, and true when there is one. A request id that an earlier request
// of another operation or content used is a requestReusedError.
func (s *Service) findReplay(ctx context.Context, q querier, c create) (string, bool, error) {
	r, found, err := findRequest(ctx, q, c.accountID, c.requestID)
	if err != nil || !found {
		return "", false, err
	}

	return checkReplay(c, r)
}

// lockAndFindReplay takes the advisory lock of the request id of c in tx and
// then does what findReplay does.
func (s *Service) lockAndFindReplay(ctx context.Context, tx pgx.Tx, c create) (string, bool, error) {
	r, found, err := lockAndFindRequest(ctx, tx, c.accountID, c.requestID)
	if err != nil || !found {
		return "", false, err
	}

	return checkReplay(c, r)
}

func checkReplay(c create, r request) (string, bool, error) {
	if r.operation != c.operation || !bytes.Equal(r.hash, c.requestHash) {
		return "", false, &requestReusedError{field: c.requestField, id: c.requestID}
	}

	return r.resourceID, true, nil
}

func reservationID(res *reservation) string {
	if res == nil {
		return ""
	}

	return res.id
}
