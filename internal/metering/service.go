package metering

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Reservation time to live.
const (
	// DefaultTTL applies when a request names no TTL.
	DefaultTTL = 5 * time.Minute
	// MinTTL is the shortest TTL a request may name.
	MinTTL = time.Second
	// MaxTTL is the longest TTL a request may name.
	MaxTTL = time.Hour
)

// Config configures a Service.
type Config struct {
	Pool   *pgxpool.Pool
	Logger *slog.Logger
	// Now returns the current time. Defaults to time.Now.
	Now func() time.Time
	// BatchWorkers is how many batches of reserves, and of commits, run at
	// once. Defaults to DefaultBatchWorkers.
	BatchWorkers int
	// MaxBatch is the largest number of concurrent reserves, or commits,
	// run as one transaction. Defaults to DefaultMaxBatch; 1 runs every call
	// on its own.
	MaxBatch int
	// OnBatch, when set, is called with the operation ("reserve" or
	// "commit") and the size of every batch run, for metrics.
	OnBatch func(op string, size int)
}

// Service counts usage and enforces limits. It is safe for concurrent use.
// Close it to stop its batch workers.
type Service struct {
	pool     *pgxpool.Pool
	logger   *slog.Logger
	now      func() time.Time
	reserves *coalescer[reserveCall, result]
	commits  *coalescer[commitCall, result]
}

// New returns a Service. Concurrent Reserve and Commit calls are coalesced
// into batches that each run as one transaction of two round trips.
func New(cfg Config) *Service {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.BatchWorkers <= 0 {
		cfg.BatchWorkers = DefaultBatchWorkers
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = DefaultMaxBatch
	}

	s := &Service{pool: cfg.Pool, logger: cfg.Logger, now: cfg.Now}
	s.reserves = newCoalescer(cfg.BatchWorkers, cfg.MaxBatch, s.reserveOne, s.reserveBatch)
	s.commits = newCoalescer(cfg.BatchWorkers, cfg.MaxBatch, s.commitOne, s.commitBatch)
	if cfg.OnBatch != nil {
		s.reserves.observe = func(size int) { cfg.OnBatch("reserve", size) }
		s.commits.observe = func(size int) { cfg.OnBatch("commit", size) }
	}
	return s
}

// Close stops the batch workers after the batches in flight. Reserve and
// Commit calls after Close fail.
func (s *Service) Close() {
	s.reserves.close()
	s.commits.close()
}

// reserveOne and commitOne run one call as a batch of one: a single call,
// or a call of a batch that failed, run again on its own.
func (s *Service) reserveOne(ctx context.Context, c reserveCall) (result, error) {
	out, err := s.reserveBatch(ctx, []reserveCall{c})
	if err != nil {
		return result{}, err
	}
	return out[0], nil
}

func (s *Service) commitOne(ctx context.Context, c commitCall) (result, error) {
	out, err := s.commitBatch(ctx, []commitCall{c})
	if err != nil {
		return result{}, err
	}
	return out[0], nil
}

// ReserveRequest is a validated CheckAndReserve request.
type ReserveRequest struct {
	AccountID string
	// Items name each metric at most once, as the API validation ensures.
	Items          []Item
	IdempotencyKey string
	// RequestHash identifies the request for idempotency; required with a key.
	RequestHash []byte
	// TTL is zero, which takes DefaultTTL, or in [MinTTL, MaxTTL].
	TTL        time.Duration
	ResourceID string
	Actor      string
}

// ReserveResult is a granted or replayed reservation.
type ReserveResult struct {
	Reservation Reservation
	// Usage is the state of the reserved counters after the reservation.
	Usage []Counter
	// WouldExceed lists, in track-only mode, the limits the request would
	// have exceeded.
	WouldExceed []Counter
	Replayed    bool
	Period      Period
}

// Reserve holds capacity for all items or none. It returns a *LimitError
// when an item does not fit and the account enforces its limits, a
// *KeyReusedError, ErrAccountNotFound or ErrUnavailable.
func (s *Service) Reserve(ctx context.Context, req ReserveRequest) (ReserveResult, error) {
	ttl := req.TTL
	if ttl == 0 {
		ttl = DefaultTTL
	}
	metrics, parents, amounts := splitItems(req.Items)

	out, err := s.reserves.do(ctx, reserveCall{
		AccountID:  req.AccountID,
		Metrics:    metrics,
		ParentIDs:  parents,
		Amounts:    amounts,
		Key:        req.IdempotencyKey,
		Hash:       hashOrEmpty(req.RequestHash),
		TTL:        ttl,
		ResourceID: req.ResourceID,
		Actor:      req.Actor,
	})
	if err != nil {
		return ReserveResult{}, fmt.Errorf("reserve account %q: %w", req.AccountID, err)
	}

	switch out.Outcome {
	case "granted", "replayed":
		res := ReserveResult{
			Reservation: out.Reservation.decode(),
			Usage:       out.Usage,
			Replayed:    out.Outcome == "replayed",
			Period:      out.period(),
		}
		for i := range res.Usage {
			c := &res.Usage[i]
			if c.Exceeded {
				res.WouldExceed = append(res.WouldExceed, *c)
			}
			// The function reports the state before the reservation.
			c.Reserved += c.Requested
			c.Exceeded = false
		}
		return res, nil
	case "overflow":
		return ReserveResult{}, errOverflow("items")
	case "rejected":
		return ReserveResult{}, &LimitError{Violations: exceeded(out.Usage), Period: out.period()}
	case "key_conflict":
		return ReserveResult{}, &KeyReusedError{Key: req.IdempotencyKey}
	case "account_not_found":
		return ReserveResult{}, fmt.Errorf("reserve account %q: %w", req.AccountID, ErrAccountNotFound)
	}
	return ReserveResult{}, unexpectedOutcome("reserve", out.Outcome)
}

// CommitRequest is a validated Commit request.
type CommitRequest struct {
	AccountID     string
	ReservationID string
	// Actual lists actual amounts per reserved metric and parent; reserved
	// items left out commit their reserved amount.
	Actual     []Item
	ResourceID string
	Actor      string
}

// CommitResult is a committed reservation.
type CommitResult struct {
	Reservation Reservation
	// Usage is the state of the committed counters after the commit.
	Usage    []Counter
	Replayed bool
}

// Commit records the usage of a reservation. Committing an expired
// reservation succeeds only while its capacity is still free. It returns
// ErrReservationNotFound, a *StateError, an *InvalidError, a
// *ResourceCountedError or ErrUnavailable.
func (s *Service) Commit(ctx context.Context, req CommitRequest) (CommitResult, error) {
	metrics, parents, amounts := splitItems(req.Actual)

	out, err := s.commits.do(ctx, commitCall{
		AccountID:     req.AccountID,
		ReservationID: req.ReservationID,
		Metrics:       metrics,
		ParentIDs:     parents,
		Amounts:       amounts,
		ResourceID:    req.ResourceID,
		Actor:         req.Actor,
	})
	if err != nil {
		return CommitResult{}, fmt.Errorf("commit reservation %q: %w", req.ReservationID, err)
	}

	switch out.Outcome {
	case "committed", "replayed":
		return CommitResult{
			Reservation: out.Reservation.decode(),
			Usage:       out.Usage,
			Replayed:    out.Outcome == "replayed",
		}, nil
	case "reservation_not_found":
		return CommitResult{}, fmt.Errorf("commit reservation %q: %w", req.ReservationID, ErrReservationNotFound)
	case "invalid_actual":
		field := fmt.Sprintf("actual_items[%d]", out.Index)
		if out.Reserved == nil {
			return CommitResult{}, &InvalidError{Field: field, Description: "names a metric and parent that the reservation does not hold"}
		}
		return CommitResult{}, &InvalidError{
			Field:       field + ".amount",
			Description: fmt.Sprintf("must not exceed the reserved amount %d", *out.Reserved),
		}
	case "resource_mismatch":
		return CommitResult{}, &InvalidError{
			Field:       "resource_id",
			Description: fmt.Sprintf("must match the reservation's resource_id %q", out.ResourceID),
		}
	case "resource_required":
		return CommitResult{}, &InvalidError{
			Field:       "resource_id",
			Description: fmt.Sprintf("required because metric %s adds to a running total that a deletion must lower", out.Metric),
		}
	case "resource_counted":
		return CommitResult{}, &ResourceCountedError{Metric: Metric(out.Metric), ResourceID: out.ResourceID}
	case "already_committed":
		return CommitResult{}, &StateError{
			Reason:  ReasonCommitMismatch,
			Message: fmt.Sprintf("reservation %q was already committed with other amounts or another resource", req.ReservationID),
		}
	case "overflow":
		return CommitResult{}, errOverflow("actual_items")
	case "released":
		return CommitResult{}, &StateError{
			Reason:  ReasonReservationReleased,
			Message: fmt.Sprintf("reservation %q was released and cannot be committed", req.ReservationID),
		}
	case "expired":
		return CommitResult{}, &StateError{
			Reason:     ReasonReservationExpired,
			Message:    fmt.Sprintf("reservation %q expired and its capacity is no longer free; undo the create", req.ReservationID),
			Violations: exceeded(out.Usage),
		}
	}
	return CommitResult{}, unexpectedOutcome("commit", out.Outcome)
}

// Release frees a pending reservation. Releasing a released or expired
// reservation changes nothing. It returns ErrReservationNotFound, a
// *StateError for a committed reservation, or ErrUnavailable.
func (s *Service) Release(ctx context.Context, accountID, reservationID string) (Reservation, error) {
	const query = `SELECT metering.release($1, $2, $3)`
	var out result
	err := s.pool.QueryRow(ctx, query, accountID, reservationID, s.now()).Scan(&out)
	if err != nil {
		return Reservation{}, fmt.Errorf("release reservation %q: %w", reservationID, translate(err))
	}

	switch out.Outcome {
	case "released":
		return out.Reservation.decode(), nil
	case "reservation_not_found":
		return Reservation{}, fmt.Errorf("release reservation %q: %w", reservationID, ErrReservationNotFound)
	case "committed":
		return Reservation{}, &StateError{
			Reason:  ReasonReservationCommitted,
			Message: fmt.Sprintf("reservation %q was committed; record a deletion to free its usage", reservationID),
		}
	}
	return Reservation{}, unexpectedOutcome("release", out.Outcome)
}

// RecordRequest is a validated RecordUsage request.
type RecordRequest struct {
	AccountID      string
	Items          []Item
	IdempotencyKey string
	RequestHash    []byte
	ResourceID     string
	Actor          string
}

// RecordResult is the outcome of RecordUsage.
type RecordResult struct {
	// Usage is the state of the recorded counters afterwards.
	Usage []Counter
	// Exceeded lists the limits that used + reserved now exceeds.
	Exceeded []Counter
	Replayed bool
}

// RecordUsage counts usage that already happened. It never rejects for
// quota. It returns a *KeyReusedError, a *ResourceCountedError,
// ErrAccountNotFound or ErrUnavailable.
func (s *Service) RecordUsage(ctx context.Context, req RecordRequest) (RecordResult, error) {
	metrics, parents, amounts := splitItems(req.Items)

	const query = `SELECT metering.record_usage($1, $2, $3, $4, $5, $6, $7, $8, $9)`
	var out result
	err := s.pool.QueryRow(ctx, query, req.AccountID, metrics, parents, amounts, req.IdempotencyKey,
		hashOrEmpty(req.RequestHash), req.ResourceID, req.Actor, s.now()).Scan(&out)
	if err != nil {
		return RecordResult{}, fmt.Errorf("record usage account %q: %w", req.AccountID, translate(err))
	}

	switch out.Outcome {
	case "recorded", "replayed":
		return RecordResult{Usage: out.Usage, Exceeded: exceeded(out.Usage), Replayed: out.Outcome == "replayed"}, nil
	case "overflow":
		return RecordResult{}, errOverflow("items")
	case "key_conflict":
		return RecordResult{}, &KeyReusedError{Key: req.IdempotencyKey}
	case "resource_counted":
		return RecordResult{}, &ResourceCountedError{Metric: Metric(out.Metric), ResourceID: out.ResourceID}
	case "account_not_found":
		return RecordResult{}, fmt.Errorf("record usage account %q: %w", req.AccountID, ErrAccountNotFound)
	}
	return RecordResult{}, unexpectedOutcome("record usage", out.Outcome)
}

// DeletionResult is the outcome of RecordDeletion.
type DeletionResult struct {
	// Subtracted is the amount the first deletion of the resource subtracted.
	Subtracted int64
	// ParentID is the parent whose running total was lowered, if any.
	ParentID string
	// Usage is the state of the lowered counters afterwards.
	Usage    []Counter
	Replayed bool
}

// RecordDeletion subtracts from running totals exactly what the commit of
// resourceID added, once. It returns ErrResourceNotFound when nothing was
// counted for the resource, ErrAccountNotFound or ErrUnavailable.
func (s *Service) RecordDeletion(ctx context.Context, accountID string, metric Metric, resourceID, actor string) (DeletionResult, error) {
	const query = `SELECT metering.record_deletion($1, $2, $3, $4, $5)`
	var out result
	err := s.pool.QueryRow(ctx, query, accountID, string(metric), resourceID, actor, s.now()).Scan(&out)
	if err != nil {
		return DeletionResult{}, fmt.Errorf("record deletion account %q resource %q: %w", accountID, resourceID, translate(err))
	}

	switch out.Outcome {
	case "deleted":
		return DeletionResult{
			Subtracted: deref(out.Subtracted),
			ParentID:   out.ParentID,
			Usage:      out.Usage,
			Replayed:   out.Replayed,
		}, nil
	case "resource_not_found":
		return DeletionResult{}, fmt.Errorf("record deletion account %q metric %s resource %q: %w",
			accountID, metric, resourceID, ErrResourceNotFound)
	case "account_not_found":
		return DeletionResult{}, fmt.Errorf("record deletion account %q: %w", accountID, ErrAccountNotFound)
	}
	return DeletionResult{}, unexpectedOutcome("record deletion", out.Outcome)
}

// Usage is an account's current usage.
type Usage struct {
	AccountID   string
	PlanID      string
	Enforcement Enforcement
	Period      Period
	// Counters lists every metric's account-wide counter in catalog order,
	// each followed by its per-parent counter when a parent was named.
	Counters []Counter
}

// CurrentUsage returns the usage of every metric, and the per-parent
// counters of parentID when it is not empty. It returns ErrAccountNotFound
// or ErrUnavailable.
func (s *Service) CurrentUsage(ctx context.Context, accountID, parentID string) (Usage, error) {
	const query = `SELECT metering.current_usage($1, $2, $3)`
	var out result
	err := s.pool.QueryRow(ctx, query, accountID, parentID, s.now()).Scan(&out)
	if err != nil {
		return Usage{}, fmt.Errorf("read usage account %q: %w", accountID, translate(err))
	}
	if out.Outcome == "account_not_found" {
		return Usage{}, fmt.Errorf("read usage account %q: %w", accountID, ErrAccountNotFound)
	}

	return Usage{
		AccountID:   accountID,
		PlanID:      out.PlanID,
		Enforcement: Enforcement(out.Enforcement),
		Period:      out.period(),
		Counters:    out.Usage,
	}, nil
}

// AdjustRequest is a validated AdjustUsage request.
type AdjustRequest struct {
	AccountID string
	Metric    Metric
	// ParentID names a per-parent counter; empty for the account's.
	ParentID       string
	Delta          int64
	Reason         string
	IdempotencyKey string
	RequestHash    []byte
	Actor          string
}

// AdjustResult is the outcome of AdjustUsage.
type AdjustResult struct {
	Counter  Counter
	Replayed bool
}

// AdjustUsage applies an operator's correction to one counter, in the
// current period for a period counter. It returns a *StateError when the
// counter would go below zero, a *KeyReusedError, ErrAccountNotFound or
// ErrUnavailable.
func (s *Service) AdjustUsage(ctx context.Context, req AdjustRequest) (AdjustResult, error) {
	const query = `SELECT metering.adjust_usage($1, $2, $3, $4, $5, $6, $7, $8, $9)`
	var out result
	err := s.pool.QueryRow(ctx, query, req.AccountID, string(req.Metric), req.ParentID, req.Delta, req.Reason,
		req.IdempotencyKey, hashOrEmpty(req.RequestHash), req.Actor, s.now()).Scan(&out)
	if err != nil {
		return AdjustResult{}, fmt.Errorf("adjust usage account %q metric %s: %w", req.AccountID, req.Metric, translate(err))
	}

	switch out.Outcome {
	case "adjusted", "replayed":
		return AdjustResult{Counter: out.Usage[0], Replayed: out.Outcome == "replayed"}, nil
	case "negative":
		return AdjustResult{}, &StateError{
			Reason:  ReasonCounterNegative,
			Message: fmt.Sprintf("delta %d would take metric %s below zero: used is %d", req.Delta, req.Metric, deref(out.Used)),
		}
	case "overflow":
		return AdjustResult{}, errOverflow("delta")
	case "key_conflict":
		return AdjustResult{}, &KeyReusedError{Key: req.IdempotencyKey}
	case "account_not_found":
		return AdjustResult{}, fmt.Errorf("adjust usage account %q: %w", req.AccountID, ErrAccountNotFound)
	}
	return AdjustResult{}, unexpectedOutcome("adjust usage", out.Outcome)
}

func splitItems(items []Item) (metrics, parents []string, amounts []int64) {
	metrics = make([]string, len(items))
	parents = make([]string, len(items))
	amounts = make([]int64, len(items))
	for i, item := range items {
		metrics[i] = string(item.Metric)
		parents[i] = item.ParentID
		amounts[i] = item.Amount
	}
	return metrics, parents, amounts
}

func exceeded(counters []Counter) []Counter {
	var out []Counter
	for _, c := range counters {
		if c.Exceeded {
			out = append(out, c)
		}
	}
	return out
}

func hashOrEmpty(h []byte) []byte {
	if h == nil {
		return []byte{}
	}
	return h
}

func deref(v *int64) int64 {
	if v == nil {
		return 0
	}
	return *v
}

func errOverflow(field string) error {
	return &InvalidError{Field: field, Description: "with the current usage the sum would overflow a 64-bit counter"}
}

func unexpectedOutcome(op, outcome string) error {
	return fmt.Errorf("%s: unexpected outcome %q from the database", op, outcome)
}
