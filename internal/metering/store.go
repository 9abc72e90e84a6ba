package metering

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// result is the JSON document the SQL functions return. Each function sets
// the fields its outcomes need.
type result struct {
	Outcome     string           `json:"outcome"`
	Reservation *reservationJSON `json:"reservation"`
	Usage       []Counter        `json:"usage"`
	PeriodStart time.Time        `json:"period_start"`
	PeriodEnd   time.Time        `json:"period_end"`
	PlanID      string           `json:"plan_id"`
	Enforcement string           `json:"enforcement"`
	Index       int              `json:"index"`
	Metric      string           `json:"metric"`
	Reserved    *int64           `json:"reserved"`
	Used        *int64           `json:"used"`
	ResourceID  string           `json:"resource_id"`
	ParentID    string           `json:"parent_id"`
	Subtracted  *int64           `json:"subtracted"`
	Replayed    bool             `json:"replayed"`
}

func (r result) period() Period {
	return Period{Start: r.PeriodStart.UTC(), End: r.PeriodEnd.UTC()}
}

// reservationJSON is a reservation as metering.reservation_json renders it.
type reservationJSON struct {
	ID               string    `json:"id"`
	AccountID        string    `json:"account_id"`
	State            string    `json:"state"`
	Metrics          []string  `json:"metrics"`
	ParentIDs        []string  `json:"parent_ids"`
	Amounts          []int64   `json:"amounts"`
	CommittedAmounts []int64   `json:"committed_amounts"`
	ResourceID       string    `json:"resource_id"`
	IdempotencyKey   string    `json:"idempotency_key"`
	CreateTime       time.Time `json:"create_time"`
	ExpireTime       time.Time `json:"expire_time"`
}

func (r *reservationJSON) decode() Reservation {
	if r == nil {
		return Reservation{}
	}
	res := Reservation{
		ID:             r.ID,
		AccountID:      r.AccountID,
		State:          State(r.State),
		ResourceID:     r.ResourceID,
		IdempotencyKey: r.IdempotencyKey,
		CreateTime:     r.CreateTime.UTC(),
		ExpireTime:     r.ExpireTime.UTC(),
	}
	for i, m := range r.Metrics {
		res.Items = append(res.Items, Item{Metric: Metric(m), ParentID: r.ParentIDs[i], Amount: r.Amounts[i]})
		if r.CommittedAmounts != nil {
			res.CommittedItems = append(res.CommittedItems, Item{Metric: Metric(m), ParentID: r.ParentIDs[i], Amount: r.CommittedAmounts[i]})
		}
	}
	return res
}

// errClosed reports a call made after Service.Close.
var errClosed = fmt.Errorf("%w: the service is shutting down", ErrUnavailable)

func isUnavailable(err error) bool {
	return errors.Is(err, ErrUnavailable)
}

// translate turns errors that mean PostgreSQL could not serve the request
// into ErrUnavailable and returns others unchanged.
func translate(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}

	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "22003":
			return fmt.Errorf("%w: %s", ErrOverflow, pgErr.Code)
		// Class 08: connection exception; 53: insufficient resources;
		// 57P0x: the server is shutting down or starting.
		case len(pgErr.Code) == 5 && (pgErr.Code[:2] == "08" || pgErr.Code[:2] == "53" || pgErr.Code[:4] == "57P0"):
			return fmt.Errorf("%w: %s", ErrUnavailable, pgErr.Code)
		default:
			return err
		}
	}

	// A connection that breaks mid-query surfaces as an unexpected EOF or a
	// closed network connection, not as a PostgreSQL error.
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	if errors.As(err, &connectErr) || errors.As(err, &netErr) || pgconn.SafeToRetry(err) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return err
}
