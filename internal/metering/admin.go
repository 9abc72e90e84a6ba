package metering

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Limit caps one metric in one scope. Max is nil when the limit is
// unlimited.
type Limit struct {
	Metric Metric
	Scope  Scope
	Max    *int64
}

// Plan is a named set of limits.
type Plan struct {
	ID          string
	DisplayName string
	// Limits has one entry per metric and scope in the catalog.
	Limits     []Limit
	CreateTime time.Time
	UpdateTime time.Time
}

// RequiredLimits returns the metric and scope pairs every plan must limit:
// each metric's account scope, and the parent scope of metrics that have one.
func RequiredLimits() []Limit {
	var out []Limit
	for _, info := range Catalog {
		out = append(out, Limit{Metric: info.Metric, Scope: ScopeAccount})
		if info.ParentKind != "" {
			out = append(out, Limit{Metric: info.Metric, Scope: ScopeParent})
		}
	}
	return out
}

// UpsertPlan creates a plan or replaces its display name and limits, and
// reports whether it was created. The plan must be validated: one limit per
// pair of RequiredLimits.
func (s *Service) UpsertPlan(ctx context.Context, p Plan) (Plan, bool, error) {
	const upsertPlan = `
		INSERT INTO metering.plans (id, display_name, create_time, update_time)
		VALUES ($1, $2, $3, $3)
		ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name, update_time = excluded.update_time
		RETURNING create_time, update_time, create_time = update_time`
	const deleteLimits = `DELETE FROM metering.plan_limits WHERE plan_id = $1`
	const insertLimit = `
		INSERT INTO metering.plan_limits (plan_id, metric, scope, max_amount, unlimited)
		VALUES ($1, $2, $3, $4, $5)`

	var created bool
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, upsertPlan, p.ID, p.DisplayName, s.now()).Scan(&p.CreateTime, &p.UpdateTime, &created); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, deleteLimits, p.ID); err != nil {
			return err
		}
		for _, l := range p.Limits {
			if _, err := tx.Exec(ctx, insertLimit, p.ID, string(l.Metric), string(l.Scope), l.Max, l.Max == nil); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return Plan{}, false, fmt.Errorf("upsert plan %q: %w", p.ID, translate(err))
	}
	p.CreateTime, p.UpdateTime = p.CreateTime.UTC(), p.UpdateTime.UTC()
	return p, created, nil
}

// ListPlans returns every plan ordered by id, limits in catalog order.
func (s *Service) ListPlans(ctx context.Context) ([]Plan, error) {
	const query = `
		SELECT p.id, p.display_name, p.create_time, p.update_time,
		       coalesce(array_agg(l.metric ORDER BY m.sort_order, l.scope) FILTER (WHERE l.metric IS NOT NULL), '{}'),
		       coalesce(array_agg(l.scope ORDER BY m.sort_order, l.scope) FILTER (WHERE l.metric IS NOT NULL), '{}'),
		       coalesce(array_agg(l.max_amount ORDER BY m.sort_order, l.scope) FILTER (WHERE l.metric IS NOT NULL), '{}')
		FROM metering.plans p
		LEFT JOIN metering.plan_limits l ON l.plan_id = p.id
		LEFT JOIN metering.metrics m ON m.name = l.metric
		GROUP BY p.id
		ORDER BY p.id`

	rows, err := s.pool.Query(ctx, query)
	if err != nil {
		return nil, fmt.Errorf("list plans: %w", translate(err))
	}
	plans, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Plan, error) {
		var (
			p       Plan
			metrics []string
			scopes  []string
			maxes   []*int64
		)
		if err := row.Scan(&p.ID, &p.DisplayName, &p.CreateTime, &p.UpdateTime, &metrics, &scopes, &maxes); err != nil {
			return Plan{}, err
		}
		p.CreateTime, p.UpdateTime = p.CreateTime.UTC(), p.UpdateTime.UTC()
		for i := range metrics {
			p.Limits = append(p.Limits, Limit{Metric: Metric(metrics[i]), Scope: Scope(scopes[i]), Max: maxes[i]})
		}
		return p, nil
	})
	if err != nil {
		return nil, fmt.Errorf("list plans: %w", translate(err))
	}
	return plans, nil
}

// Account is a customer with a plan.
type Account struct {
	ID            string
	PlanID        string
	BillingAnchor time.Time
	Enforcement   Enforcement
	CreateTime    time.Time
	UpdateTime    time.Time
}

// SetAccountRequest is a validated SetAccountPlan request.
type SetAccountRequest struct {
	AccountID string
	PlanID    string
	// BillingAnchor is optional: a new account without one is anchored now,
	// an existing account keeps its anchor.
	BillingAnchor *time.Time
	// Enforcement is optional: a new account without one enforces, an
	// existing account keeps its mode.
	Enforcement Enforcement
}

// SetAccountPlan moves an account to a plan, creating it if new, and
// reports whether it was created. It returns ErrPlanNotFound, a *StateError
// when an existing account is given another billing anchor, or
// ErrUnavailable.
func (s *Service) SetAccountPlan(ctx context.Context, req SetAccountRequest) (Account, bool, error) {
	const query = `
		INSERT INTO metering.accounts AS a (id, plan_id, billing_anchor, enforcement, create_time, update_time)
		VALUES ($1, $2, coalesce($3::timestamptz, $5), coalesce(nullif($4::text, ''), 'enforce'), $5, $5)
		ON CONFLICT (id) DO UPDATE SET
			plan_id = excluded.plan_id,
			enforcement = coalesce(nullif($4::text, ''), a.enforcement),
			update_time = excluded.update_time
		-- Moving the anchor of an existing account would reset or overlap
		-- the current period, so only the same anchor is accepted.
		WHERE $3::timestamptz IS NULL OR a.billing_anchor = $3::timestamptz
		RETURNING id, plan_id, billing_anchor, enforcement, create_time, update_time, xmax = 0`

	var (
		a       Account
		created bool
	)
	err := s.pool.QueryRow(ctx, query, req.AccountID, req.PlanID, req.BillingAnchor, string(req.Enforcement), s.now()).
		Scan(&a.ID, &a.PlanID, &a.BillingAnchor, &a.Enforcement, &a.CreateTime, &a.UpdateTime, &created)
	if errors.Is(err, pgx.ErrNoRows) {
		return Account{}, false, &StateError{
			Reason:  ReasonAnchorFixed,
			Message: fmt.Sprintf("account %q has another billing anchor, which cannot change; leave billing_anchor unset", req.AccountID),
		}
	}
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "23503" {
			return Account{}, false, fmt.Errorf("set account %q plan %q: %w", req.AccountID, req.PlanID, ErrPlanNotFound)
		}
		return Account{}, false, fmt.Errorf("set account %q plan %q: %w", req.AccountID, req.PlanID, translate(err))
	}
	return a.utc(), created, nil
}

// GetAccount returns an account and its current billing period. It returns
// ErrAccountNotFound or ErrUnavailable.
func (s *Service) GetAccount(ctx context.Context, accountID string) (Account, Period, error) {
	const query = `
		SELECT a.id, a.plan_id, a.billing_anchor, a.enforcement, a.create_time, a.update_time,
		       p.period_start, p.period_end
		FROM metering.accounts a, metering.period_bounds(a.billing_anchor, $2) p
		WHERE a.id = $1`

	var (
		a      Account
		period Period
	)
	err := s.pool.QueryRow(ctx, query, accountID, s.now()).
		Scan(&a.ID, &a.PlanID, &a.BillingAnchor, &a.Enforcement, &a.CreateTime, &a.UpdateTime, &period.Start, &period.End)
	if errors.Is(err, pgx.ErrNoRows) {
		return Account{}, Period{}, fmt.Errorf("get account %q: %w", accountID, ErrAccountNotFound)
	}
	if err != nil {
		return Account{}, Period{}, fmt.Errorf("get account %q: %w", accountID, translate(err))
	}
	return a.utc(), Period{Start: period.Start.UTC(), End: period.End.UTC()}, nil
}

func (a Account) utc() Account {
	a.BillingAnchor, a.CreateTime, a.UpdateTime = a.BillingAnchor.UTC(), a.CreateTime.UTC(), a.UpdateTime.UTC()
	return a
}

// ListReservationsRequest selects a page of an account's reservations.
type ListReservationsRequest struct {
	AccountID string
	// States filters by effective state; empty means pending and expired.
	States []State
	// PageSize is in [1, 1000].
	PageSize  int
	PageToken string
}

var uuidPattern = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// ErrInvalidPageToken reports a page token this service did not issue.
var ErrInvalidPageToken = errors.New("invalid page token")

// ListReservations returns an account's reservations newest first and the
// token of the next page, empty on the last page. It returns
// ErrAccountNotFound, ErrInvalidPageToken or ErrUnavailable.
func (s *Service) ListReservations(ctx context.Context, req ListReservationsRequest) ([]Reservation, string, error) {
	const query = `
		SELECT metering.reservation_json(r, $2)
		FROM metering.reservations r
		WHERE r.account_id = $1
		  AND (CASE WHEN r.state = 'pending' AND r.expire_time <= $2 THEN 'expired' ELSE r.state END) = ANY ($3)
		  AND ($4::timestamptz IS NULL OR (r.create_time, r.id) < ($4, $5::uuid))
		ORDER BY r.create_time DESC, r.id DESC
		LIMIT $6`

	if _, _, err := s.GetAccount(ctx, req.AccountID); err != nil {
		return nil, "", err
	}
	states := []string{string(Pending), string(Expired)}
	if len(req.States) > 0 {
		states = states[:0]
		for _, st := range req.States {
			states = append(states, string(st))
		}
	}
	afterTime, afterID, err := decodePageToken(req.PageToken)
	if err != nil {
		return nil, "", err
	}

	rows, err := s.pool.Query(ctx, query, req.AccountID, s.now(), states, afterTime, afterID, req.PageSize+1)
	if err != nil {
		return nil, "", fmt.Errorf("list reservations account %q: %w", req.AccountID, translate(err))
	}
	docs, err := pgx.CollectRows(rows, pgx.RowTo[reservationJSON])
	if err != nil {
		return nil, "", fmt.Errorf("list reservations account %q: %w", req.AccountID, translate(err))
	}

	var next string
	if len(docs) > req.PageSize {
		docs = docs[:req.PageSize]
		last := docs[len(docs)-1]
		next = encodePageToken(last.CreateTime, last.ID)
	}
	out := make([]Reservation, len(docs))
	for i := range docs {
		out[i] = docs[i].decode()
	}
	return out, next, nil
}

func encodePageToken(t time.Time, id string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(t.UTC().Format(time.RFC3339Nano) + "|" + id))
}

func decodePageToken(token string) (*time.Time, *string, error) {
	if token == "" {
		return nil, nil, nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return nil, nil, ErrInvalidPageToken
	}
	at, id, ok := strings.Cut(string(raw), "|")
	if !ok {
		return nil, nil, ErrInvalidPageToken
	}
	t, err := time.Parse(time.RFC3339Nano, at)
	if err != nil || !uuidPattern.MatchString(id) {
		return nil, nil, ErrInvalidPageToken
	}
	return &t, &id, nil
}

func (s *Service) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // A rollback after commit returns ErrTxClosed, which is expected.

	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}
