package workspace

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// querier runs queries: the pool, or a transaction.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// inTx runs fn in a transaction and commits it when fn returns nil.
func (s *Service) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin transaction: %w", translate(err))
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // A rollback after commit returns ErrTxClosed, which is expected.

	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return &commitError{err: translate(err)}
	}

	return nil
}

// commitError is a failed COMMIT of the transaction of inTx.
type commitError struct {
	err error
}

func (e *commitError) Error() string { return "commit transaction: " + e.err.Error() }

func (e *commitError) Unwrap() error { return e.err }

// PostgreSQL error codes that the store acts on.
const (
	uniqueViolation     = "23505"
	foreignKeyViolation = "23503"
)

// translate wraps errors that mean PostgreSQL could not serve the request
// with errDatabaseUnavailable and returns others unchanged.
func translate(err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}

	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// Class 08: connection exception; 53: insufficient resources;
		// 57P0x: the server is shutting down or starting.
		code := pgErr.Code
		if len(code) == 5 && (code[:2] == "08" || code[:2] == "53" || code[:4] == "57P0") {
			return fmt.Errorf("%w: %w", errDatabaseUnavailable, err)
		}

		return err
	}

	// A connection that breaks mid-query surfaces as an unexpected EOF or a
	// closed network connection, not as a PostgreSQL error.
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	if errors.As(err, &connectErr) || errors.As(err, &netErr) || pgconn.SafeToRetry(err) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("%w: %w", errDatabaseUnavailable, err)
	}

	return err
}

// isConstraintViolation reports whether err is a violation of constraint
// with the SQLSTATE code.
func isConstraintViolation(err error, code, constraint string) bool {
	var pgErr *pgconn.PgError

	return errors.As(err, &pgErr) && pgErr.Code == code && pgErr.ConstraintName == constraint
}

// isPrimaryKeyViolation reports whether err is a unique violation of a
// primary key, which PostgreSQL names <table>_pkey by default.
func isPrimaryKeyViolation(err error) bool {
	var pgErr *pgconn.PgError

	return errors.As(err, &pgErr) && pgErr.Code == uniqueViolation && strings.HasSuffix(pgErr.ConstraintName, "_pkey")
}

// request is a row of workspace.requests: a create that carried a request
// id.
type request struct {
	operation  string
	hash       []byte
	resourceID string
}

// findRequest returns the request with the id in the account, and false when
// there is none.
func findRequest(ctx context.Context, q querier, accountID, requestID string) (request, bool, error) {
	const query = `
		SELECT operation, request_hash, resource_id
		FROM workspace.requests
		WHERE account_id = $1 AND request_id = $2`

	var r request
	err := q.QueryRow(ctx, query, accountID, requestID).Scan(&r.operation, &r.hash, &r.resourceID)
	if errors.Is(err, pgx.ErrNoRows) {
		return request{}, false, nil
	}
	if err != nil {
		return request{}, false, fmt.Errorf("look up request %q: %w", requestID, translate(err))
	}

	return r, true, nil
}

// insertRequest records the create of a request id.
func insertRequest(ctx context.Context, tx pgx.Tx, accountID, requestID string, r request, at time.Time) error {
	const query = `
		INSERT INTO workspace.requests (account_id, request_id, operation, request_hash, resource_id, create_time)
		VALUES ($1, $2, $3, $4, $5, $6)`

	if _, err := tx.Exec(ctx, query, accountID, requestID, r.operation, r.hash, r.resourceID, at); err != nil {
		return fmt.Errorf("record request %q: %w", requestID, translate(err))
	}

	return nil
}

// lockAndFindRequest takes a transaction-scoped advisory lock on the request
// id of the account, so attempts of one request run their writes one at a
// time, and then returns the request as findRequest does.
//
// The lookup is a statement of its own. Under READ COMMITTED a statement
// reads a snapshot taken when it starts, so a lookup in the statement that
// waits for the lock would miss the row of the attempt it waited for.
func lockAndFindRequest(ctx context.Context, tx pgx.Tx, accountID, requestID string) (request, bool, error) {
	sum := sha256.Sum256([]byte("workspace.requests\x00" + accountID + "\x00" + requestID))
	key := int64(binary.BigEndian.Uint64(sum[:8]))

	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", key); err != nil {
		return request{}, false, fmt.Errorf("lock request %q: %w", requestID, translate(err))
	}

	return findRequest(ctx, tx, accountID, requestID)
}
