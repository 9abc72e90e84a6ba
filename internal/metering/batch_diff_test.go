package metering

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// storedRowsSQL renders every row that a reserve or commit can write, one
// line per row, sorted. Reservation ids outside $1 are written as "new", so
// the rows of a reservation that the reference and the batch path each
// create under a random id compare equal.
const storedRowsSQL = `
WITH known AS (SELECT unnest($1::uuid[]) AS id),
rows AS (
    SELECT 'counter ' || c::text AS line FROM metering.counters c
    UNION ALL
    SELECT format('event %s %s %s %s %s %s %s %s %s %s %s', e.account_id, e.metric, e.parent_id,
                  e.period_start, e.amount, e.kind, e.resource_id,
                  CASE WHEN e.reservation_id IN (SELECT id FROM known) THEN e.reservation_id::text
                       WHEN e.reservation_id IS NULL THEN 'null' ELSE 'new' END,
                  e.actor, e.reason, e.create_time)
    FROM metering.usage_events e
    UNION ALL
    SELECT format('reservation %s %s %s %s %s %s %s %s %s %s %s %s %s',
                  CASE WHEN r.id IN (SELECT id FROM known) THEN r.id::text ELSE 'new' END,
                  r.account_id, r.state, r.metrics, r.parent_ids, r.amounts, r.committed_amounts,
                  r.resource_id, r.idempotency_key, r.actor, r.create_time, r.expire_time, r.finish_time)
    FROM metering.reservations r
    UNION ALL
    SELECT format('key %s %s %s %s %s %s', k.account_id, k.key, encode(k.request_hash, 'hex'),
                  CASE WHEN k.reservation_id IN (SELECT id FROM known) THEN k.reservation_id::text
                       WHEN k.reservation_id IS NULL THEN 'null' ELSE 'new' END,
                  k.response, k.create_time)
    FROM metering.idempotency_keys k
    UNION ALL
    SELECT format('resource %s %s %s %s %s %s %s %s %s', cr.account_id, cr.metric, cr.resource_id,
                  cr.parent_id, cr.amount,
                  CASE WHEN cr.reservation_id IN (SELECT id FROM known) THEN cr.reservation_id::text
                       WHEN cr.reservation_id IS NULL THEN 'null' ELSE 'new' END,
                  cr.create_time, cr.delete_time, cr.subtracted)
    FROM metering.counted_resources cr
)
SELECT line FROM rows ORDER BY line`

// differ compares the batch path with the per-call SQL functions, one call
// at a time, on the state that a random sequence of operations builds.
type differ struct {
	*batchEnv
	rng *rand.Rand
	// log lists the last operations run, to replay a failure by hand.
	log []string
	// knownBefore lists the reservation ids stored before the call compared.
	knownBefore []string
	outcomes    map[string]int
}

func (d *differ) knownReservations() []string {
	d.t.Helper()
	var ids []string
	err := d.pool.QueryRow(d.t.Context(), `SELECT coalesce(array_agg(id::text), '{}') FROM metering.reservations`).Scan(&ids)
	require.NoError(d.t, err)
	return ids
}

func storedRows(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, known []string) ([]string, error) {
	rows, err := q.Query(ctx, storedRowsSQL, known)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// reference runs one per-call SQL function on the current state in a
// transaction that it rolls back, and returns its result and the rows it
// would have stored.
func (d *differ) reference(known []string, query string, args ...any) (result, []string) {
	d.t.Helper()
	ctx := d.t.Context()
	tx, err := d.pool.Begin(ctx)
	require.NoError(d.t, err)
	defer tx.Rollback(ctx) //nolint:errcheck // The reference writes nothing.

	var out result
	require.NoError(d.t, tx.QueryRow(ctx, query, args...).Scan(&out))
	rows, err := storedRows(ctx, tx, known)
	require.NoError(d.t, err)
	return out, rows
}

// same fails the test when the batch path's result or stored rows differ
// from the reference's.
func (d *differ) same(op string, ref, got result, refRows []string, newID string) bool {
	d.t.Helper()
	if ref.Reservation != nil && got.Reservation != nil && newID != "" {
		ref.Reservation.ID = newID
	}
	for _, r := range []*result{&ref, &got} {
		if r.Reservation != nil {
			r.Reservation.CreateTime = r.Reservation.CreateTime.UTC()
			r.Reservation.ExpireTime = r.Reservation.ExpireTime.UTC()
		}
		r.PeriodStart, r.PeriodEnd = r.PeriodStart.UTC(), r.PeriodEnd.UTC()
		if len(r.Usage) == 0 {
			r.Usage = nil
		}
	}
	rows, err := storedRows(d.t.Context(), d.pool, d.knownBefore)
	require.NoError(d.t, err)
	kind, _, _ := strings.Cut(strings.SplitN(op, " ", 3)[2], " ")
	d.outcomes[kind+" "+ref.Outcome]++
	ok := assert.Equal(d.t, ref, got, "result of %s\nafter %v", op, d.log)
	ok = assert.Equal(d.t, refRows, rows, "stored rows after %s\nafter %v", op, d.log) && ok
	return ok
}

func (d *differ) pick(list []string) string { return list[d.rng.IntN(len(list))] }

func (d *differ) randomReserve() reserveCall {
	acct := d.pick([]string{"a", "a", "t", "e", "b", "nobody"})
	metrics := slices.Clone([]Metric{Agents, Tasks, Documents, Messages, StorageBytes})
	d.rng.Shuffle(len(metrics), func(i, j int) { metrics[i], metrics[j] = metrics[j], metrics[i] })
	if d.rng.IntN(2) == 0 {
		// Period counters only, which the batch path commits itself.
		metrics = []Metric{Tasks, Messages}
		d.rng.Shuffle(len(metrics), func(i, j int) { metrics[i], metrics[j] = metrics[j], metrics[i] })
	}
	c := reserveCall{AccountID: acct, Actor: "test", Hash: []byte{}}
	for _, m := range metrics[:1+d.rng.IntN(min(3, len(metrics)))] {
		parent := ""
		if m == Documents {
			parent = d.pick([]string{"", "p1", "p2"})
		}
		amount := int64(1 + d.rng.IntN(3))
		if acct == "e" && d.rng.IntN(3) == 0 {
			amount = math.MaxInt64 - int64(d.rng.IntN(5))
		}
		c.Metrics = append(c.Metrics, string(m))
		c.ParentIDs = append(c.ParentIDs, parent)
		c.Amounts = append(c.Amounts, amount)
	}
	if d.rng.IntN(2) == 0 {
		c.Key = d.pick([]string{"k1", "k2", "k3"})
		c.Hash = []byte(d.pick([]string{"h1", "h2"}))
	}
	c.TTL = []time.Duration{time.Second, 2 * time.Second, time.Minute}[d.rng.IntN(3)]
	if d.rng.IntN(3) != 0 {
		c.ResourceID = d.pick([]string{"r1", "r2", "r3", "r4", "r5", "r6"})
	}
	return c
}

type storedReservation struct {
	id, account string
	metrics     []string
	parents     []string
	amounts     []int64
	resource    string
	expire      time.Time
}

func (d *differ) reservations() []storedReservation {
	d.t.Helper()
	rows, err := d.pool.Query(d.t.Context(), `
		SELECT id::text, account_id, metrics, parent_ids, amounts, resource_id, expire_time
		FROM metering.reservations ORDER BY create_time, id`)
	require.NoError(d.t, err)
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (storedReservation, error) {
		var r storedReservation
		err := row.Scan(&r.id, &r.account, &r.metrics, &r.parents, &r.amounts, &r.resource, &r.expire)
		return r, err
	})
	require.NoError(d.t, err)
	return out
}

func (d *differ) randomCommit(all []storedReservation) (commitCall, bool) {
	if len(all) == 0 {
		return commitCall{}, false
	}
	r := all[len(all)-1-d.rng.IntN(min(len(all), 8))]
	c := commitCall{AccountID: r.account, ReservationID: r.id, Actor: "test"}
	if d.rng.IntN(10) == 0 {
		c.AccountID = d.pick([]string{"a", "b", "t", "e"})
	}
	for i := range r.metrics {
		if d.rng.IntN(2) == 0 {
			continue
		}
		amount := int64(d.rng.IntN(int(min(r.amounts[i], 4)) + 2))
		if d.rng.IntN(10) == 0 {
			amount = r.amounts[i]
		}
		c.Metrics = append(c.Metrics, r.metrics[i])
		c.ParentIDs = append(c.ParentIDs, r.parents[i])
		c.Amounts = append(c.Amounts, amount)
	}
	switch d.rng.IntN(4) {
	case 0:
		c.ResourceID = r.resource
	case 1:
		c.ResourceID = d.pick([]string{"r1", "r2", "r3", "r4"})
	}
	return c, true
}

var diffSeeds, diffSteps = 12, 500

// TestBatchMatchesSQLFunctions runs random operations and compares every
// reserve and commit of the batch path with metering.reserve and
// metering.commit on the same state: the result and every stored row.
func TestBatchMatchesSQLFunctions(t *testing.T) {
	t.Parallel()
	for seed := range uint64(diffSeeds) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			t.Parallel()
			runDiffer(t, seed, diffSteps)
		})
	}
}

func runDiffer(t *testing.T, seed uint64, steps int) {
	e := newBatchEnv(t)
	d := &differ{batchEnv: e, rng: rand.New(rand.NewPCG(seed, 11)), outcomes: map[string]int{}}
	ctx := t.Context()
	e.account("a", Enforce)
	e.account("b", Enforce)
	e.account("t", TrackOnly)
	_, _, err := e.svc.SetAccountPlan(ctx, SetAccountRequest{AccountID: "e", PlanID: "enterprise"})
	require.NoError(t, err)

	for step := range steps {
		switch n := d.rng.IntN(100); {
		case n < 40:
			c := d.randomReserve()
			known := d.knownReservations()
			d.knownBefore = known
			now := e.clock()
			ref, refRows := d.reference(known, reserveSQL, c.AccountID, c.Metrics, c.ParentIDs, c.Amounts, c.Key, c.Hash,
				pgtype.Interval{Microseconds: c.TTL.Microseconds(), Valid: true}, c.ResourceID, c.Actor, now)
			got, err := e.svc.reserveBatch(ctx, []reserveCall{c})
			require.NoError(t, err)
			op := fmt.Sprintf("step %d reserve %+v", step, c)
			d.log = append(d.log, op)
			newID := ""
			if got[0].Reservation != nil && !slices.Contains(known, got[0].Reservation.ID) {
				newID = got[0].Reservation.ID
			}
			if !d.same(op, ref, got[0], refRows, newID) {
				return
			}
		case n < 70:
			c, ok := d.randomCommit(d.reservations())
			if !ok {
				continue
			}
			known := d.knownReservations()
			d.knownBefore = known
			ref, refRows := d.reference(known, commitSQL, c.AccountID, c.ReservationID, c.Metrics, c.ParentIDs, c.Amounts,
				c.ResourceID, c.Actor, e.clock())
			got, err := e.svc.commitBatch(ctx, []commitCall{c})
			require.NoError(t, err)
			op := fmt.Sprintf("step %d commit %+v", step, c)
			d.log = append(d.log, op)
			if !d.same(op, ref, got[0], refRows, "") {
				return
			}
		case n < 75:
			all := d.reservations()
			if len(all) == 0 {
				continue
			}
			r := all[d.rng.IntN(len(all))]
			_, _ = e.svc.Release(ctx, r.account, r.id)
			d.log = append(d.log, fmt.Sprintf("step %d release %s", step, r.id))
		case n < 88:
			var step time.Duration
			switch d.rng.IntN(5) {
			case 0:
				step = time.Second
			case 1:
				step = time.Microsecond
			case 2:
				all := d.reservations()
				if len(all) > 0 {
					// Exactly at a reservation's expiry.
					step = all[d.rng.IntN(len(all))].expire.Sub(e.clock())
				}
			case 3:
				_, period, err := e.svc.GetAccount(ctx, "a")
				require.NoError(t, err)
				step = period.End.Sub(e.clock()) - time.Duration(d.rng.IntN(2))*time.Second
			case 4:
				step = 30 * time.Second
			}
			if step > 0 {
				e.advance(step)
			}
			d.log = append(d.log, fmt.Sprintf("advance %s to %s", step, e.clock().Format(time.RFC3339Nano)))
		case n < 92:
			acct := d.pick([]string{"a", "t", "b"})
			m := d.pick([]string{"tasks", "messages", "agents", "documents"})
			_, err := e.svc.RecordUsage(ctx, RecordRequest{
				AccountID: acct, Items: []Item{{Metric: Metric(m), Amount: 1}}, ResourceID: fmt.Sprintf("rec-%d", step), Actor: "test",
			})
			require.NoError(t, err)
			d.log = append(d.log, fmt.Sprintf("step %d record %s %s", step, acct, m))
		case n < 95:
			acct := d.pick([]string{"a", "t", "b"})
			m := d.pick([]string{"tasks", "messages", "agents"})
			delta := int64(d.rng.IntN(5) - 2)
			_, _ = e.svc.AdjustUsage(ctx, AdjustRequest{
				AccountID: acct, Metric: Metric(m), Delta: delta, Reason: "test", Actor: "test",
			})
			d.log = append(d.log, fmt.Sprintf("step %d adjust %s %s", step, acct, m))
		case n < 97:
			acct := d.pick([]string{"a", "t", "b"})
			m := d.pick([]string{"agents", "documents", "storage_bytes"})
			_, _ = e.svc.RecordDeletion(ctx, acct, Metric(m), d.pick([]string{"r1", "r2", "r3", "r4"}), "test")
			d.log = append(d.log, fmt.Sprintf("step %d delete %s %s", step, acct, m))
		default:
			acct := d.pick([]string{"a", "t", "b"})
			plan := d.pick([]string{"tiny", "free", "enterprise"})
			mode := Enforcement(d.pick([]string{"enforce", "track_only"}))
			_, _, err := e.svc.SetAccountPlan(ctx, SetAccountRequest{AccountID: acct, PlanID: plan, Enforcement: mode})
			require.NoError(t, err)
			d.log = append(d.log, fmt.Sprintf("step %d move %s to %s %s", step, acct, plan, mode))
		}
		if len(d.log) > 30 {
			d.log = d.log[len(d.log)-30:]
		}
	}
	e.reconciled()
	t.Log(d.outcomes)
}
