package workspace

import (
	"bytes"
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// releaseTimeout bounds the release of a reservation after a failed create.
// The release runs even when the caller has gone away.
const releaseTimeout = 10 * time.Second

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
	// is never refused, such as a message.
	recorded []*meteringv1.UsageItem
	// ttl is the TTL of the reservation.
	ttl time.Duration
	// receive, when set, runs after the reservation and before the
	// transaction, and returns the actual amounts to commit, or nil for the
	// reserved ones. Uploads receive their bytes here.
	receive func(ctx context.Context) ([]*meteringv1.UsageItem, error)
	// write inserts the rows in tx.
	write func(ctx context.Context, tx pgx.Tx) error
	// discard, when set, runs when the create ends without its rows
	// committed: after a failure, and when an earlier attempt of the same
	// request wrote first.
	discard func()
}

// writeError is a failure of the write step, after which the reservation is
// released.
type writeError struct {
	err error
}

func (e *writeError) Error() string { return e.err.Error() }

func (e *writeError) Unwrap() error { return e.err }

// errReplayed stops the transaction of a create whose request an earlier
// attempt completed meanwhile.
var errReplayed = errors.New("request already completed")

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
//   - The commit fails (Metering unreachable, or RESERVATION_EXPIRED with the
//     capacity gone): the transaction is rolled back, so the rows are never
//     visible, and the reservation is released.
//
// Attempts of one request id write one at a time, under an advisory lock,
// and the second finds the first's row in workspace.requests.
func (s *Service) guard(ctx context.Context, c create) (id string, replayed bool, err error) {
	written := false
	if c.discard != nil {
		defer func() {
			if !written {
				c.discard()
			}
		}()
	}

	if c.requestID != "" {
		id, found, err := s.findReplay(ctx, s.pool, c)
		if err != nil || found {
			return id, found, err
		}
	}

	var res *reservation
	if len(c.reserved) > 0 {
		r, err := s.meter.reserve(ctx, reserveRequest{
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
	}

	var actual []*meteringv1.UsageItem
	if c.receive != nil {
		actual, err = c.receive(ctx)
		if err != nil {
			s.release(ctx, c, res)
			return "", false, err
		}
	}

	var replayedID string
	meteringCommitted := false
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		if c.requestID != "" {
			if err := lockRequest(ctx, tx, c.accountID, c.requestID); err != nil {
				return err
			}
			id, found, err := s.findReplay(ctx, tx, c)
			if err != nil {
				return err
			}
			if found {
				replayedID = id
				return errReplayed
			}
		}

		if err := s.writeRows(ctx, tx, c); err != nil {
			return &writeError{err: err}
		}

		if res != nil {
			if err := s.meter.commit(ctx, c.accountID, *res, c.resourceID, actual); err != nil {
				return err
			}
			meteringCommitted = true
		}
		if len(c.recorded) > 0 {
			key := meteringKeyBase(c.requestID) + "/record"
			if c.requestID == "" {
				key = newID(meteringKeyPrefix)
			}
			origin := keyOrigin{field: c.requestField, value: c.requestID}
			if err := s.meter.recordUsage(ctx, c.accountID, key, origin, c.recorded, c.resourceID); err != nil {
				return err
			}
			meteringCommitted = true
		}

		return nil
	})

	var commitErr *commitError
	switch {
	case err == nil:
		written = true
		return c.resourceID, false, nil
	case errors.Is(err, errReplayed):
		return replayedID, true, nil
	case errors.As(err, &commitErr) && meteringCommitted:
		// NOTE: Metering counted the create, but its rows were rolled back,
		// so Metering counts one more than exists until a retry with the
		// same request id writes the rows without counting again. Without a
		// request id the extra count stays.
		s.logger.ErrorContext(ctx, "create counted in Metering but its transaction failed",
			"account_id", c.accountID, "operation", c.operation, "resource_id", c.resourceID, "error", err)
		return "", false, err
	}

	if res != nil && !res.committed && !meteringCommitted {
		s.release(ctx, c, res)
	}

	return "", false, err
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
	if r.operation != c.operation || !bytes.Equal(r.hash, c.requestHash) {
		return "", false, &requestReusedError{field: c.requestField, id: c.requestID}
	}

	return r.resourceID, true, nil
}

// release frees the reservation of a failed create, if there is one. A
// failure is logged: the reservation then holds its capacity until its TTL
// ends.
func (s *Service) release(ctx context.Context, c create, res *reservation) {
	if res == nil || res.committed {
		return
	}

	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), releaseTimeout)
	defer cancel()

	if err := s.meter.release(ctx, c.accountID, *res); err != nil {
		s.logger.WarnContext(ctx, "release reservation failed; the capacity stays reserved until the reservation expires",
			"account_id", c.accountID, "operation", c.operation, "reservation_id", res.id, "ttl", c.ttl, "error", err)
	}
}
