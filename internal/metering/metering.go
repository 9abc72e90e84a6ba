// Package metering counts usage and enforces plan limits on PostgreSQL.
//
// Most checks and counter changes run as SQL functions (see migrations/), one
// statement and one transaction per operation. Reserves and commits run in
// batches of concurrent calls instead (see batch.go). The service reads the
// state of a batch's counters under the accounts' row locks and decides each
// call in Go. Then it writes the batch with set-based statements, in the
// same transaction. Every statement receives the current time from the
// Service's clock.
package metering

import (
	"errors"
	"fmt"
	"time"
)

// Metric names a thing that plans limit. The values are the names stored in
// PostgreSQL.
type Metric string

// The metrics.
const (
	Agents       Metric = "agents"
	Tasks        Metric = "tasks"
	Documents    Metric = "documents"
	Messages     Metric = "messages"
	StorageBytes Metric = "storage_bytes"
)

// Kind is the behaviour of a counter over time.
type Kind string

// The kinds of counter.
const (
	// PeriodCounter resets at the start of each billing period.
	PeriodCounter Kind = "period"
	// RunningTotal never resets and goes down when a resource is deleted.
	RunningTotal Kind = "running"
)

// Scope is the extent of a limit: the whole account or each parent.
type Scope string

// The scopes of a limit.
const (
	ScopeAccount Scope = "account"
	ScopeParent  Scope = "parent"
)

// MetricInfo describes how a metric is counted. It mirrors the
// metering.metrics table.
type MetricInfo struct {
	Metric Metric
	// AccountKind is the kind of the account-wide counter.
	AccountKind Kind
	// ParentKind is the kind of the per-parent counter; empty when the metric
	// has none.
	ParentKind Kind
}

// Catalog lists every metric in display order.
var Catalog = []MetricInfo{
	{Metric: Agents, AccountKind: RunningTotal},
	{Metric: Tasks, AccountKind: PeriodCounter},
	{Metric: Documents, AccountKind: PeriodCounter, ParentKind: RunningTotal},
	{Metric: Messages, AccountKind: PeriodCounter},
	{Metric: StorageBytes, AccountKind: RunningTotal},
}

// Info returns the catalog entry of m and whether m is known.
func Info(m Metric) (MetricInfo, bool) {
	for _, info := range Catalog {
		if info.Metric == m {
			return info, true
		}
	}
	return MetricInfo{}, false
}

// HasRunningTotal reports whether a deletion of a resource of this metric can
// lower a counter.
func (i MetricInfo) HasRunningTotal() bool {
	return i.AccountKind == RunningTotal || i.ParentKind == RunningTotal
}

// Item is an amount of one metric, optionally under a parent.
type Item struct {
	Metric   Metric
	Amount   int64
	ParentID string
}

// Enforcement is an account's enforcement mode.
type Enforcement string

// The enforcement modes.
const (
	// Enforce rejects requests over a limit.
	Enforce Enforcement = "enforce"
	// TrackOnly rejects nothing and reports what would have been rejected.
	TrackOnly Enforcement = "track_only"
)

// State is the stage of a reservation.
type State string

// The reservation states.
const (
	Pending   State = "pending"
	Committed State = "committed"
	Released  State = "released"
	Expired   State = "expired"
)

// Reservation is capacity held for one create or upload. State is the
// effective state: a pending reservation past ExpireTime reads as Expired.
type Reservation struct {
	ID             string
	AccountID      string
	State          State
	Items          []Item
	CommittedItems []Item
	ResourceID     string
	IdempotencyKey string
	CreateTime     time.Time
	ExpireTime     time.Time
}

// Counter is the state of one counter: an account's or one parent's.
type Counter struct {
	Metric   Metric `json:"metric"`
	Scope    Scope  `json:"scope"`
	ParentID string `json:"parent_id"`
	Kind     Kind   `json:"kind"`
	// Used is the committed usage: this period for a period counter.
	Used int64 `json:"used"`
	// Reserved is held by pending reservations that have not expired.
	Reserved int64 `json:"reserved"`
	// Limit is nil when Unlimited is true.
	Limit     *int64 `json:"limit"`
	Unlimited bool   `json:"unlimited"`
	// Requested is the amount the request adds to this counter.
	Requested int64 `json:"requested"`
	// Exceeded reports whether Used + Reserved + Requested is over Limit.
	Exceeded bool `json:"exceeded"`
}

// Remaining returns Limit - Used - Reserved, not below zero, and false when
// the counter is unlimited.
func (c Counter) Remaining() (int64, bool) {
	if c.Unlimited || c.Limit == nil {
		return 0, false
	}
	return max(*c.Limit-c.Used-c.Reserved, 0), true
}

// Period is a billing period: [Start, End).
type Period struct {
	Start time.Time
	End   time.Time
}

// Sentinel errors that callers match with errors.Is.
var (
	ErrAccountNotFound     = errors.New("account not found")
	ErrPlanNotFound        = errors.New("plan not found")
	ErrReservationNotFound = errors.New("reservation not found")
	ErrResourceNotFound    = errors.New("resource not counted")
	// ErrOverflow reports a counter that would pass the largest int64.
	ErrOverflow = errors.New("counter overflow")
	// ErrUnavailable wraps errors that mean PostgreSQL could not be reached.
	ErrUnavailable = errors.New("database unavailable")
)

// LimitError reports that a request exceeds one or more limits.
type LimitError struct {
	// Violations are the counters whose limit the request exceeds.
	Violations []Counter
	Period     Period
}

func (e *LimitError) Error() string {
	v := e.Violations[0]
	return fmt.Sprintf("limit exceeded: metric %s scope %s parent %q: used %d + reserved %d + requested %d > limit %d",
		v.Metric, v.Scope, v.ParentID, v.Used, v.Reserved, v.Requested, limitValue(v))
}

func limitValue(c Counter) int64 {
	if c.Limit == nil {
		return 0
	}
	return *c.Limit
}

// Reasons of a StateError, sent to clients as google.rpc.ErrorInfo reasons.
const (
	ReasonReservationExpired   = "RESERVATION_EXPIRED"
	ReasonReservationReleased  = "RESERVATION_RELEASED"
	ReasonReservationCommitted = "RESERVATION_COMMITTED"
	ReasonCommitMismatch       = "COMMIT_MISMATCH"
	ReasonCounterNegative      = "COUNTER_WOULD_GO_NEGATIVE"
	ReasonAnchorFixed          = "BILLING_ANCHOR_FIXED"
)

// StateError reports that an operation conflicts with the current state of a
// reservation or counter, so retrying the same request cannot succeed.
type StateError struct {
	Reason  string
	Message string
	// Violations are set for ReasonReservationExpired: the limits the commit
	// would exceed now.
	Violations []Counter
}

func (e *StateError) Error() string { return e.Message }

// InvalidError reports a request that is invalid given what is stored, such
// as an actual amount above the reserved one. Nothing was written.
type InvalidError struct {
	// Field is the request field, as a path like "actual_items[1].amount".
	Field       string
	Description string
}

func (e *InvalidError) Error() string { return e.Field + ": " + e.Description }

// KeyReusedError reports an idempotency key used before for a different
// request.
type KeyReusedError struct {
	Key string
}

func (e *KeyReusedError) Error() string {
	return fmt.Sprintf("idempotency key %q was already used for a different request", e.Key)
}

// ResourceCountedError reports a resource whose usage was already counted
// under the same metric.
type ResourceCountedError struct {
	Metric     Metric
	ResourceID string
}

func (e *ResourceCountedError) Error() string {
	return fmt.Sprintf("resource %q was already counted for metric %s", e.ResourceID, e.Metric)
}
