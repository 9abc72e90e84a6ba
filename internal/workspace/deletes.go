package workspace

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// deletion is one delete that deleteCounted runs.
type deletion struct {
	accountID string
	// operation is the RPC method name, such as "DeleteAgent".
	operation  string
	resourceID string
	// metric is the running total that the resource adds to.
	metric meteringv1.Metric
	// delete deletes the rows in tx, or returns a notFoundError. It reports
	// whether Metering counts the resource in a running total, so that its
	// deletion must be recorded. It may run a second time, in a new
	// transaction, when the first COMMIT fails.
	delete func(ctx context.Context, tx pgx.Tx) (bool, error)
	// deleted, when set, runs once the deletion is committed.
	deleted func()
}

// deleteCounted deletes the rows of d and records the deletion in Metering in
// one transaction, so the resource's slot is freed exactly when its rows go.
// When Metering cannot be reached, the rows stay. From the RecordDeletion
// call on, the work runs detached from ctx, so a client that cancels cannot
// leave rows that Metering no longer counts.
//
// NOTE: when RecordDeletion gets no response within MeteringTimeout, the rows
// stay and the delete fails with UNAVAILABLE, but Metering may have
// subtracted the resource already, so it counts one less than exists until
// the delete is retried. A retry converges, because Metering subtracts each
// resource once.
func (s *Service) deleteCounted(ctx context.Context, d deletion) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin transaction: %w", translate(err))
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // A rollback after commit returns ErrTxClosed, which is expected.

	counted, err := d.delete(ctx, tx)
	if err != nil {
		return err
	}
	if !counted {
		if err := tx.Commit(ctx); err != nil {
			return fmt.Errorf("commit transaction: %w", translate(err))
		}
		s.deleted(d)
		return nil
	}

	detached := context.WithoutCancel(ctx)
	budget, cancel := s.meteringBudget(detached)
	found, err := s.meter.recordDeletion(budget, d.accountID, d.metric, d.resourceID)
	cancel()
	if err != nil {
		return err
	}
	if !found {
		s.logger.WarnContext(ctx, "deleted resource was not counted in Metering",
			"account_id", d.accountID, "operation", d.operation, "resource_id", d.resourceID)
	}

	commitCtx, cancelCommit := context.WithTimeout(detached, databaseTimeout)
	defer cancelCommit()
	if err := tx.Commit(commitCtx); err != nil {
		return s.deleteAgainAfterCommitFailure(detached, d, translate(err))
	}
	s.deleted(d)

	return nil
}

// deleteAgainAfterCommitFailure handles a COMMIT that failed after Metering
// recorded the deletion: it deletes the rows again in a new transaction.
// When the database is unavailable, a background task keeps trying, for up
// to settleTimeout.
func (s *Service) deleteAgainAfterCommitFailure(ctx context.Context, d deletion, commitErr error) error {
	attrs := []any{"account_id", d.accountID, "operation", d.operation, "resource_id", d.resourceID}
	s.logger.WarnContext(ctx, "transaction commit failed after Metering recorded the deletion; deleting the rows again",
		append(attrs, "error", commitErr)...)

	err := s.deleteAgain(ctx, d)
	switch {
	case err == nil:
		return nil
	case !errors.Is(err, errDatabaseUnavailable):
		s.logger.ErrorContext(ctx, "deletion recorded in Metering but the rows could not be deleted", append(attrs, "error", err)...)
		return err
	}

	started := s.tasks.start(func(taskCtx context.Context) {
		ctx, cancel := context.WithTimeout(taskCtx, settleTimeout)
		defer cancel()

		unavailable := func(err error) bool { return errors.Is(err, errDatabaseUnavailable) }
		if _, err := retry(ctx, unavailable, func(ctx context.Context) (struct{}, error) {
			return struct{}{}, s.deleteAgain(ctx, d)
		}); err != nil {
			s.logger.ErrorContext(ctx, "deletion recorded in Metering but the rows could not be deleted", append(attrs, "error", err)...)
			return
		}
		s.logger.WarnContext(ctx, "delete settled in the background: its rows were deleted", attrs...)
	})
	if !started {
		s.logger.ErrorContext(ctx, "service closed, so the rows of a recorded deletion cannot be deleted again", attrs...)
		return err
	}

	return &pendingError{cause: err, deletion: true}
}

// deleteAgain deletes the rows of d in a new transaction without calling
// Metering, and then runs d.deleted. Rows that are gone already, because the
// COMMIT that seemed to fail did commit, count as deleted.
func (s *Service) deleteAgain(ctx context.Context, d deletion) error {
	ctx, cancel := context.WithTimeout(ctx, databaseTimeout)
	defer cancel()

	err := s.inTx(ctx, func(tx pgx.Tx) error {
		_, err := d.delete(ctx, tx)
		return err
	})
	var notFound *notFoundError
	if err != nil && !errors.As(err, &notFound) {
		return err
	}
	s.deleted(d)

	return nil
}

func (s *Service) deleted(d deletion) {
	if d.deleted != nil {
		d.deleted()
	}
}
