package workspace

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// maxKeyGenerations bounds the Metering idempotency keys of one request id.
// Each attempt whose reservation was released or expired moves the request
// to the next key, so a request id allows this many failed attempts.
const maxKeyGenerations = 32

// Metering reasons of a commit or release that another attempt of the same
// request raced with.
const (
	meteringReasonReservationReleased  = "RESERVATION_RELEASED"
	meteringReasonReservationCommitted = "RESERVATION_COMMITTED"
	meteringReasonCommitMismatch       = "COMMIT_MISMATCH"
)

// meter calls Metering, retrying the calls that failed with UNAVAILABLE or a
// timeout. It is safe for concurrent use.
type meter struct {
	client   meteringv1.MeteringServiceClient
	timeout  time.Duration
	attempts int
	backoff  time.Duration
}

// keyOrigin names the request field that a Metering idempotency key derives
// from, for the error of a key reused with another request.
type keyOrigin struct {
	field string
	value string
}

// call runs fn with a timeout per attempt. An attempt that fails with
// UNAVAILABLE or DEADLINE_EXCEEDED is retried after a backoff that doubles,
// with jitter, up to m.attempts attempts in all. Only idempotent calls go
// through call. It returns the cause of ctx's end when ctx ends (ctx's
// error, or errMeteringTimedOut for a budget from meteringBudget), and a
// meteringError for any other failure.
func call[Resp any](ctx context.Context, m *meter, method string, origin keyOrigin, fn func(context.Context) (Resp, error)) (Resp, error) {
	delay := m.backoff
	for attempt := 1; ; attempt++ {
		attemptCtx, cancel := context.WithTimeout(ctx, m.timeout)
		resp, err := fn(attemptCtx)
		cancel()
		if err == nil {
			return resp, nil
		}

		var zero Resp
		if ctx.Err() != nil {
			return zero, fmt.Errorf("metering %s: %w", method, context.Cause(ctx))
		}

		st := status.Convert(err)
		retryable := st.Code() == codes.Unavailable || st.Code() == codes.DeadlineExceeded
		if !retryable || attempt >= m.attempts {
			return zero, &meteringError{method: method, keyField: origin.field, keyValue: origin.value, status: st}
		}

		// Full jitter keeps the retries of many callers from arriving at
		// the same moment.
		wait := delay/2 + rand.N(delay/2+1)
		select {
		case <-ctx.Done():
			return zero, fmt.Errorf("metering %s: %w", method, context.Cause(ctx))
		case <-time.After(wait):
		}
		delay *= 2
	}
}

// reservation is capacity held in Metering for one create.
type reservation struct {
	id string
	// committed marks a reservation that Metering committed for the
	// resource, by an earlier attempt of the request or by this one.
	// Committing it again counts nothing, and it must never be released.
	committed bool
	// released marks a reservation that this attempt released already.
	released bool
}

// reserveRequest is a reservation to make.
type reserveRequest struct {
	accountID string
	items     []*meteringv1.UsageItem
	ttl       time.Duration
	// keyBase starts the idempotency keys of a request id; empty means a
	// request without one.
	keyBase    string
	origin     keyOrigin
	resourceID string
	// skipCommitted makes reserve pass over the keys whose reservation an
	// earlier attempt committed, and reserve anew under the next free key.
	skipCommitted bool
}

// reserve holds the capacity of req.items.
//
// Without a request id, the reservation gets a random idempotency key, so a
// retry after a lost response returns the same reservation. With one, the
// keys are keyBase/0, keyBase/1 and so on: a key whose reservation an earlier
// attempt released, or that expired, is spent, and reserve moves to the
// next. A pending reservation is used as it is. A reservation committed for
// the same resource is returned with committed set, unless
// req.skipCommitted is set. It returns errTooManyAttempts when every key is
// spent.
func (m *meter) reserve(ctx context.Context, req reserveRequest) (reservation, error) {
	if req.keyBase == "" {
		r, err := m.checkAndReserve(ctx, req, newID(meteringKeyPrefix))
		if err != nil {
			return reservation{}, err
		}

		return reservation{id: r.GetId()}, nil
	}

	for generation := range maxKeyGenerations {
		r, err := m.checkAndReserve(ctx, req, fmt.Sprintf("%s/%d", req.keyBase, generation))
		if err != nil {
			return reservation{}, err
		}

		switch r.GetState() {
		case meteringv1.ReservationState_RESERVATION_STATE_PENDING:
			return reservation{id: r.GetId()}, nil
		case meteringv1.ReservationState_RESERVATION_STATE_COMMITTED:
			// An earlier attempt committed in Metering, and then its
			// transaction failed, so no row exists yet: writing the row now
			// completes that create without counting again.
			if r.GetResourceId() == req.resourceID && !req.skipCommitted {
				return reservation{id: r.GetId(), committed: true}, nil
			}
		default:
			// Released or expired: the attempt that made it failed.
		}
	}

	return reservation{}, errTooManyAttempts
}

func (m *meter) checkAndReserve(ctx context.Context, req reserveRequest, key string) (*meteringv1.Reservation, error) {
	resp, err := call(ctx, m, "CheckAndReserve", req.origin, func(ctx context.Context) (*meteringv1.CheckAndReserveResponse, error) {
		return m.client.CheckAndReserve(ctx, &meteringv1.CheckAndReserveRequest{
			AccountId:      req.accountID,
			Items:          req.items,
			IdempotencyKey: key,
			Ttl:            durationpb.New(req.ttl),
		})
	})
	if err != nil {
		return nil, err
	}

	return resp.GetReservation(), nil
}

// commit records the usage of a reservation for resourceID. actual lists
// the actual amounts when they are below the reserved ones; nil commits the
// reserved amounts. It returns errConcurrentAttempt when another attempt of
// the same request released the reservation meanwhile, and
// errAlreadyCommitted when another attempt committed it with other amounts.
func (m *meter) commit(ctx context.Context, accountID string, r reservation, resourceID string, actual []*meteringv1.UsageItem) error {
	_, err := call(ctx, m, "Commit", keyOrigin{}, func(ctx context.Context) (*meteringv1.CommitResponse, error) {
		return m.client.Commit(ctx, &meteringv1.CommitRequest{
			AccountId:     accountID,
			ReservationId: r.id,
			ActualItems:   actual,
			ResourceId:    resourceID,
		})
	})

	if e, ok := err.(*meteringError); ok && e.status.Code() == codes.FailedPrecondition {
		switch errorReason(e.status) {
		case meteringReasonReservationReleased:
			return fmt.Errorf("commit reservation %s: %w", r.id, errConcurrentAttempt)
		case meteringReasonReservationCommitted, meteringReasonCommitMismatch:
			return fmt.Errorf("commit reservation %s: %w", r.id, errAlreadyCommitted)
		}
	}

	return err
}

// release frees a pending reservation. Releasing a released or expired one
// succeeds. It returns errAlreadyCommitted for a committed one.
func (m *meter) release(ctx context.Context, accountID string, r reservation) error {
	_, err := call(ctx, m, "Release", keyOrigin{}, func(ctx context.Context) (*meteringv1.ReleaseResponse, error) {
		return m.client.Release(ctx, &meteringv1.ReleaseRequest{AccountId: accountID, ReservationId: r.id})
	})

	if e, ok := err.(*meteringError); ok && e.status.Code() == codes.FailedPrecondition &&
		errorReason(e.status) == meteringReasonReservationCommitted {
		return fmt.Errorf("release reservation %s: %w", r.id, errAlreadyCommitted)
	}

	return err
}

// settle finds out whether Metering committed a reservation whose commit
// got no response. It releases the reservation, which Metering rejects for
// a committed one, so afterwards the reservation can no longer change: it
// returns true when Metering committed it, and false when it is released or
// expired now. An error means the outcome is still unknown.
func (m *meter) settle(ctx context.Context, accountID string, r reservation) (bool, error) {
	err := m.release(ctx, accountID, r)
	if errors.Is(err, errAlreadyCommitted) {
		return true, nil
	}
	if err != nil {
		return false, err
	}

	return false, nil
}

// recordUsage counts usage that already happened, such as a message, under
// the idempotency key.
func (m *meter) recordUsage(ctx context.Context, accountID, key string, origin keyOrigin, items []*meteringv1.UsageItem, resourceID string) error {
	_, err := call(ctx, m, "RecordUsage", origin, func(ctx context.Context) (*meteringv1.RecordUsageResponse, error) {
		return m.client.RecordUsage(ctx, &meteringv1.RecordUsageRequest{
			AccountId:      accountID,
			Items:          items,
			IdempotencyKey: key,
			ResourceId:     resourceID,
		})
	})

	return err
}

// recordDeletion subtracts what the commit of resourceID added to the
// running totals of metric. It reports false, with no error, when Metering
// never counted the resource, so there is nothing to subtract.
func (m *meter) recordDeletion(ctx context.Context, accountID string, metric meteringv1.Metric, resourceID string) (bool, error) {
	_, err := call(ctx, m, "RecordDeletion", keyOrigin{}, func(ctx context.Context) (*meteringv1.RecordDeletionResponse, error) {
		return m.client.RecordDeletion(ctx, &meteringv1.RecordDeletionRequest{
			AccountId:  accountID,
			Metric:     metric,
			ResourceId: resourceID,
		})
	})

	if e, ok := err.(*meteringError); ok && e.status.Code() == codes.NotFound {
		return false, nil
	}
	if err != nil {
		return false, err
	}

	return true, nil
}
