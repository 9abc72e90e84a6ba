package metering

import (
	"context"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/internal/pgtest"
)

// batchEnv is a Service on its own database with a settable clock, and a
// plan "tiny" whose limits are small enough to reach in one batch. They are
// tasks 3, messages 5, agents 2, documents 10 per account and 2 per parent,
// and storage 100 bytes.
type batchEnv struct {
	t    *testing.T
	pool *pgxpool.Pool
	svc  *Service
	mu   sync.Mutex
	now  time.Time
	// next, when not empty, lists the times that the next clock reads
	// return, before the clock returns now again.
	next []time.Time
}

func newBatchEnv(t *testing.T) *batchEnv {
	t.Helper()
	e := &batchEnv{t: t, pool: pgtest.NewPool(t), now: time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)}
	e.svc = New(Config{Pool: e.pool, Now: e.clock})
	t.Cleanup(e.svc.Close)

	limits := map[Limit]int64{
		{Metric: Tasks, Scope: ScopeAccount}:        3,
		{Metric: Messages, Scope: ScopeAccount}:     5,
		{Metric: Agents, Scope: ScopeAccount}:       2,
		{Metric: Documents, Scope: ScopeAccount}:    10,
		{Metric: Documents, Scope: ScopeParent}:     2,
		{Metric: StorageBytes, Scope: ScopeAccount}: 100,
	}
	plan := Plan{ID: "tiny", DisplayName: "Tiny"}
	for _, l := range RequiredLimits() {
		limit := limits[l]
		l.Max = &limit
		plan.Limits = append(plan.Limits, l)
	}
	_, _, err := e.svc.UpsertPlan(t.Context(), plan)
	require.NoError(t, err)
	return e
}

func (e *batchEnv) clock() time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.next) > 0 {
		t := e.next[0]
		e.next = e.next[1:]
		return t
	}
	return e.now
}

func (e *batchEnv) advance(d time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.now = e.now.Add(d)
}

func (e *batchEnv) account(id string, enforcement Enforcement) {
	e.t.Helper()
	_, _, err := e.svc.SetAccountPlan(e.t.Context(), SetAccountRequest{AccountID: id, PlanID: "tiny", Enforcement: enforcement})
	require.NoError(e.t, err)
}

// reconciled fails the test when a counter differs from its ledger.
func (e *batchEnv) reconciled() {
	e.t.Helper()
	mismatches, err := e.svc.Reconcile(e.t.Context())
	require.NoError(e.t, err)
	assert.Empty(e.t, mismatches)
}

func (e *batchEnv) used(acct string, metric Metric, parent string) int64 {
	e.t.Helper()
	var used int64
	err := e.pool.QueryRow(e.t.Context(), `
		SELECT coalesce(sum(used), 0)::bigint FROM metering.counters
		WHERE account_id = $1 AND metric = $2 AND parent_id = $3`, acct, string(metric), parent).Scan(&used)
	require.NoError(e.t, err)
	return used
}

func reserveOf(acct string, metric Metric, amount int64, key string) reserveCall {
	return reserveCall{
		AccountID: acct, Metrics: []string{string(metric)}, ParentIDs: []string{""}, Amounts: []int64{amount},
		Key: key, Hash: []byte(key), TTL: time.Minute, Actor: "test",
	}
}

func counterOf(t *testing.T, r result, metric Metric) Counter {
	t.Helper()
	for _, c := range r.Usage {
		if c.Metric == metric && c.Scope == ScopeAccount {
			return c
		}
	}
	t.Fatalf("no %s counter in %+v", metric, r.Usage)
	return Counter{}
}

// TestReserveBatchDecidesInOrder runs one batch whose calls depend on each
// other: each is checked against the capacity left by the calls before it.
func TestReserveBatchDecidesInOrder(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	e.account("a", Enforce)
	e.account("b", Enforce)
	e.account("t", TrackOnly)
	_, err := e.svc.RecordUsage(t.Context(), RecordRequest{
		AccountID: "a", Items: []Item{{Metric: Messages, Amount: 1}}, IdempotencyKey: "recorded",
		RequestHash: []byte("recorded"), Actor: "test",
	})
	require.NoError(t, err)

	results, err := e.svc.reserveBatch(t.Context(), []reserveCall{
		0: reserveOf("a", Tasks, 1, "k1"),
		1: reserveOf("a", Tasks, 1, "k1"), // the same request again: a replay of 0
		2: reserveOf("a", Tasks, 2, ""),   // 1 reserved + 2 = the limit
		3: reserveOf("a", Tasks, 1, ""),   // over the limit
		4: reserveOf("nobody", Tasks, 1, ""),
		5: reserveOf("b", Tasks, 3, "k1"), // keys are per account
		6: reserveOf("t", Tasks, 4, ""),   // track-only: granted, reported
		7: reserveOf("a", Messages, 1, "recorded"),
		8: reserveOf("b", Tasks, 1, "k2"), // rejected: its key stays free
		9: reserveOf("b", Tasks, 1, "k2"),
	})
	require.NoError(t, err)

	outcomes := make([]string, len(results))
	for i, r := range results {
		outcomes[i] = r.Outcome
	}
	assert.Equal(t, []string{
		"granted", "replayed", "granted", "rejected", "account_not_found",
		"granted", "granted", "key_conflict", "rejected", "rejected",
	}, outcomes)

	assert.Equal(t, results[0].Reservation.ID, results[1].Reservation.ID, "a replay returns the first reservation")
	first := counterOf(t, results[0], Tasks)
	assert.Equal(t, Counter{Metric: Tasks, Scope: ScopeAccount, Kind: PeriodCounter, Limit: first.Limit, Requested: 1}, first)
	assert.EqualValues(t, 3, *first.Limit)
	assert.EqualValues(t, 1, counterOf(t, results[2], Tasks).Reserved, "call 2 sees the capacity call 0 holds")
	rejected := counterOf(t, results[3], Tasks)
	assert.EqualValues(t, 3, rejected.Reserved)
	assert.True(t, rejected.Exceeded)
	assert.False(t, results[3].PeriodStart.IsZero(), "a rejection names the period for its retry time")
	track := counterOf(t, results[6], Tasks)
	assert.True(t, track.Exceeded, "track-only reports the limit it would exceed")

	res := results[2].Reservation.decode()
	assert.Equal(t, Pending, res.State)
	assert.Equal(t, e.clock(), res.CreateTime)
	assert.Equal(t, e.clock().Add(time.Minute), res.ExpireTime)

	var pending, keys int
	require.NoError(t, e.pool.QueryRow(t.Context(),
		`SELECT count(*) FROM metering.reservations WHERE state = 'pending'`).Scan(&pending))
	require.NoError(t, e.pool.QueryRow(t.Context(),
		`SELECT count(*) FROM metering.idempotency_keys WHERE key IN ('k1', 'k2')`).Scan(&keys))
	assert.Equal(t, 4, pending, "calls 0, 2, 5 and 6 hold capacity")
	assert.Equal(t, 2, keys, "k1 of a and of b; k2 was never granted")

	// The reservation the batch stored reads back as the batch returned it.
	var created, expires time.Time
	var amounts []int64
	require.NoError(t, e.pool.QueryRow(t.Context(), `
		SELECT create_time, expire_time, amounts FROM metering.reservations WHERE id = $1`,
		res.ID).Scan(&created, &expires, &amounts))
	assert.True(t, created.Equal(res.CreateTime), "stored %v, returned %v", created, res.CreateTime)
	assert.True(t, expires.Equal(res.ExpireTime), "stored %v, returned %v", expires, res.ExpireTime)
	assert.Equal(t, []int64{2}, amounts)
	e.reconciled()
}

// TestCommitBatchDecidesInOrder runs one batch of commits that the batch
// path decides itself and commits that it hands to metering.commit.
func TestCommitBatchDecidesInOrder(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	e.account("a", Enforce)
	e.account("b", Enforce)
	ctx := t.Context()

	reserve := func(acct string, items []Item, resource string) string {
		t.Helper()
		r, err := e.svc.Reserve(ctx, ReserveRequest{AccountID: acct, Items: items, TTL: time.Minute, ResourceID: resource, Actor: "test"})
		require.NoError(t, err)
		return r.Reservation.ID
	}
	tasks := func(n int64) []Item { return []Item{{Metric: Tasks, Amount: n}} }

	expired := reserve("a", tasks(1), "")
	e.advance(2 * time.Minute)
	partial := reserve("a", tasks(2), "")
	other := reserve("b", tasks(1), "")
	agent := reserve("a", []Item{{Metric: Agents, Amount: 1}}, "agent-1")
	released := reserve("b", tasks(1), "")
	_, err := e.svc.Release(ctx, "b", released)
	require.NoError(t, err)
	plain := reserve("b", tasks(1), "")

	commit := func(acct, id string, actual ...Item) commitCall {
		metrics, parents, amounts := splitItems(actual)
		return commitCall{AccountID: acct, ReservationID: id, Metrics: metrics, ParentIDs: parents, Amounts: amounts, Actor: "test"}
	}
	results, err := e.svc.commitBatch(ctx, []commitCall{
		0: commit("a", partial, Item{Metric: Tasks, Amount: 1}), // commits less than it reserved
		1: commit("a", partial, Item{Metric: Tasks, Amount: 1}), // the same commit again: a replay
		2: commit("a", other),                                   // another account's reservation
		3: commit("a", agent),                                   // a running total: metering.commit
		4: commit("a", expired),                                 // expired, capacity still free
		5: commit("b", released),
		6: commit("b", "00000000-0000-4000-8000-000000000000"),
		7: commit("b", plain, Item{Metric: Tasks, Amount: 5}), // more than reserved
		8: commit("b", other),
		9: commit("nobody", plain),
	})
	require.NoError(t, err)

	outcomes := make([]string, len(results))
	for i, r := range results {
		outcomes[i] = r.Outcome
	}
	assert.Equal(t, []string{
		"committed", "replayed", "reservation_not_found", "committed", "committed",
		"released", "reservation_not_found", "invalid_actual", "committed", "reservation_not_found",
	}, outcomes)

	res := results[0].Reservation.decode()
	assert.Equal(t, Committed, res.State)
	assert.Equal(t, []Item{{Metric: Tasks, Amount: 1}}, res.CommittedItems)
	c := counterOf(t, results[0], Tasks)
	assert.Zero(t, c.Requested)
	// The usage is read after the commits the batch decides itself and
	// before those it hands to metering.commit, such as call 4.
	assert.EqualValues(t, 1, c.Used)
	assert.Zero(t, c.Reserved, "nothing of a is pending after the batch")
	assert.Equal(t, results[0].Reservation.ID, results[1].Reservation.ID)

	assert.EqualValues(t, 2, e.used("a", Tasks, ""))
	assert.EqualValues(t, 1, e.used("a", Agents, ""))
	assert.EqualValues(t, 1, e.used("b", Tasks, ""))
	var counted int
	require.NoError(t, e.pool.QueryRow(ctx,
		`SELECT count(*) FROM metering.counted_resources WHERE resource_id = 'agent-1'`).Scan(&counted))
	assert.Equal(t, 1, counted, "the agent's commit remembers the resource for its deletion")
	var events int
	require.NoError(t, e.pool.QueryRow(ctx,
		`SELECT count(*) FROM metering.usage_events WHERE reservation_id = $1`, partial).Scan(&events))
	assert.Equal(t, 1, events, "a replayed commit writes no second ledger row")
	e.reconciled()
}

// TestBatchesHoldLimitsUnderConcurrency runs batches of reserves and commits
// on three accounts from many goroutines at once. Each account grants
// exactly its limit, and no batch deadlocks with another.
func TestBatchesHoldLimitsUnderConcurrency(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	accounts := []string{"x", "y", "z"}
	for _, a := range accounts {
		e.account(a, Enforce)
	}

	var (
		mu      sync.Mutex
		granted = map[string]int{}
		wg      sync.WaitGroup
	)
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for range 5 {
				calls := make([]reserveCall, 12)
				for i := range calls {
					calls[i] = reserveOf(accounts[rng.IntN(len(accounts))], Messages, 1, "")
				}
				results, err := e.svc.reserveBatch(context.WithoutCancel(t.Context()), calls)
				if !assert.NoError(t, err) {
					return
				}
				var commits []commitCall
				for i, r := range results {
					if r.Outcome != "granted" {
						assert.Equal(t, "rejected", r.Outcome)
						continue
					}
					commits = append(commits, commitCall{AccountID: calls[i].AccountID, ReservationID: r.Reservation.ID, Actor: "test"})
				}
				if len(commits) == 0 {
					continue
				}
				done, err := e.svc.commitBatch(context.WithoutCancel(t.Context()), commits)
				if !assert.NoError(t, err) {
					return
				}
				mu.Lock()
				for i, r := range done {
					assert.Equal(t, "committed", r.Outcome)
					granted[commits[i].AccountID]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()

	for _, a := range accounts {
		assert.Equal(t, 5, granted[a], "account %s grants exactly its limit", a)
		assert.EqualValues(t, 5, e.used(a, Messages, ""))
	}
	e.reconciled()
}

// TestBatchExpiresAtExpireTime checks the instant a reservation expires: at
// its expire_time it holds no capacity, so a reserve may take it, and its
// own commit must then find the limit reached instead of counting twice.
func TestBatchExpiresAtExpireTime(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	e.account("a", Enforce)

	first, err := e.svc.reserveBatch(t.Context(), []reserveCall{reserveOf("a", Tasks, 3, "")})
	require.NoError(t, err)
	require.Equal(t, "granted", first[0].Outcome)

	e.advance(time.Minute - time.Microsecond)
	before, err := e.svc.reserveBatch(t.Context(), []reserveCall{reserveOf("a", Tasks, 1, "")})
	require.NoError(t, err)
	assert.Equal(t, "rejected", before[0].Outcome, "a microsecond before expire_time the reservation holds the limit")

	e.advance(time.Microsecond)
	second, err := e.svc.reserveBatch(t.Context(), []reserveCall{reserveOf("a", Tasks, 3, "")})
	require.NoError(t, err)
	require.Equal(t, "granted", second[0].Outcome, "at expire_time the capacity is free")

	commits, err := e.svc.commitBatch(t.Context(), []commitCall{
		{AccountID: "a", ReservationID: first[0].Reservation.ID, Actor: "test"},
		{AccountID: "a", ReservationID: second[0].Reservation.ID, Actor: "test"},
	})
	require.NoError(t, err)
	assert.Equal(t, "expired", commits[0].Outcome)
	assert.Equal(t, "committed", commits[1].Outcome)
	assert.EqualValues(t, 3, e.used("a", Tasks, ""))
	e.reconciled()
}

// TestCommitBatchExpiresByClockAfterLocks runs a commit batch whose clock
// reads a microsecond before the reservation's expiry, and then, after the
// locks, the expiry itself. A reserve that held the locks in between took
// the capacity at the expiry, so the commit must find it expired.
func TestCommitBatchExpiresByClockAfterLocks(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	e.account("a", Enforce)
	ctx := t.Context()

	first, err := e.svc.reserveBatch(ctx, []reserveCall{reserveOf("a", Tasks, 3, "")})
	require.NoError(t, err)
	require.Equal(t, "granted", first[0].Outcome)
	expiry := first[0].Reservation.ExpireTime

	e.advance(time.Minute)
	second, err := e.svc.reserveBatch(ctx, []reserveCall{reserveOf("a", Tasks, 3, "")})
	require.NoError(t, err)
	require.Equal(t, "granted", second[0].Outcome)

	e.mu.Lock()
	e.next = []time.Time{expiry.Add(-time.Microsecond), expiry}
	e.mu.Unlock()
	commits, err := e.svc.commitBatch(ctx, []commitCall{{AccountID: "a", ReservationID: first[0].Reservation.ID, Actor: "test"}})
	require.NoError(t, err)
	assert.Equal(t, "expired", commits[0].Outcome)
	assert.Zero(t, e.used("a", Tasks, ""))
	e.reconciled()
}

// TestBatchOfRejectionsRollsBack checks that a batch transaction whose last
// pipeline has nothing to write ends with ROLLBACK, so that it does not wait
// for a WAL flush, and that one with writes commits.
func TestBatchOfRejectionsRollsBack(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	ctx := t.Context()

	status := func(last *pgx.Batch) string {
		t.Helper()
		tx, err := beginBatch(ctx, e.pool)
		require.NoError(t, err)
		defer tx.release()

		var xid string
		first := &pgx.Batch{}
		first.Queue(`SELECT pg_current_xact_id()::text`).QueryRow(func(row pgx.Row) error { return row.Scan(&xid) })
		require.NoError(t, tx.send(ctx, first, false))
		require.NoError(t, tx.send(ctx, last, true))

		var got string
		require.NoError(t, e.pool.QueryRow(ctx, `SELECT pg_xact_status($1::xid8)`, xid).Scan(&got))
		return got
	}

	assert.Equal(t, "aborted", status(&pgx.Batch{}))
	writes := &pgx.Batch{}
	writes.Queue(`UPDATE metering.plans SET display_name = 'Tiny plan' WHERE id = 'tiny'`)
	assert.Equal(t, "committed", status(writes))
}

// ledgerOf returns the sum of an account's counters of metric and the sum of
// their ledger rows. Both are text, so a sum past the largest bigint reads
// back instead of failing the cast.
func (e *batchEnv) ledgerOf(acct string, metric Metric) (counter, ledger string) {
	e.t.Helper()
	err := e.pool.QueryRow(e.t.Context(), `
		SELECT coalesce((SELECT sum(used) FROM metering.counters
		                 WHERE account_id = $1 AND metric = $2), 0)::text,
		       coalesce((SELECT sum(amount) FROM metering.usage_events
		                 WHERE account_id = $1 AND metric = $2), 0)::text`,
		acct, string(metric)).Scan(&counter, &ledger)
	require.NoError(e.t, err)
	return counter, ledger
}

// TestCommitBatchOverflowKeepsLedger commits, in one batch, two reservations
// whose sum passes the largest bigint. The second reserve ran after the first
// had expired, and the commit batch on a replica whose clock is behind.
// metering.commit commits the first and fails the second with 22003, and
// the batch must keep the counter equal to its ledger as well.
func TestCommitBatchOverflowKeepsLedger(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	ctx := t.Context()
	_, _, err := e.svc.SetAccountPlan(ctx, SetAccountRequest{AccountID: "e", PlanID: "enterprise"})
	require.NoError(t, err)

	first := reserveOf("e", Tasks, math.MaxInt64, "")
	first.TTL = time.Second
	reserved, err := e.svc.reserveBatch(ctx, []reserveCall{first})
	require.NoError(t, err)
	require.Equal(t, "granted", reserved[0].Outcome)
	firstID := reserved[0].Reservation.ID

	e.advance(time.Second)
	reserved, err = e.svc.reserveBatch(ctx, []reserveCall{reserveOf("e", Tasks, math.MaxInt64, "")})
	require.NoError(t, err)
	require.Equal(t, "granted", reserved[0].Outcome, "the first reservation expired, so its capacity is free")
	secondID := reserved[0].Reservation.ID

	e.advance(-500 * time.Millisecond)

	// The reference: metering.commit, one call after the other, in a
	// transaction rolled back afterwards.
	tx, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	var ref result
	require.NoError(t, tx.QueryRow(ctx, commitSQL, "e", firstID, []string{}, []string{}, []int64{}, "", "test", e.clock()).Scan(&ref))
	require.Equal(t, "committed", ref.Outcome)
	var pgErr *pgconn.PgError
	err = tx.QueryRow(ctx, commitSQL, "e", secondID, []string{}, []string{}, []int64{}, "", "test", e.clock()).Scan(&ref)
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "22003", pgErr.Code, "metering.commit fails the second commit: the counter would overflow")
	require.NoError(t, tx.Rollback(ctx))

	commitFirst := commitCall{AccountID: "e", ReservationID: firstID, Actor: "test"}
	commitSecond := commitCall{AccountID: "e", ReservationID: secondID, Actor: "test"}
	_, err = e.svc.commitBatch(ctx, []commitCall{commitFirst, commitSecond})
	require.ErrorIs(t, err, errSumOverflow, "the batch fails, so the coalescer runs each commit on its own")
	counter, ledger := e.ledgerOf("e", Tasks)
	assert.Equal(t, "0", counter, "the failed batch wrote nothing")
	assert.Equal(t, "0", ledger)

	// On their own, the commits end as metering.commit ends them.
	results, err := e.svc.commitBatch(ctx, []commitCall{commitFirst})
	require.NoError(t, err)
	assert.Equal(t, "committed", results[0].Outcome)
	_, err = e.svc.commitBatch(ctx, []commitCall{commitSecond})
	assert.ErrorIs(t, err, ErrOverflow)

	counter, ledger = e.ledgerOf("e", Tasks)
	assert.Equal(t, ledger, counter, "the tasks counter equals the sum of its ledger rows")
}

// TestReserveBatchStoresReturnedExpiry reserves with a TTL that is not a
// whole number of microseconds, which the API accepts. The expire_time that
// the batch returns must be the one it stores, as metering.reserve returns
// it, so that a retry with the same idempotency key returns the same value.
func TestReserveBatchStoresReturnedExpiry(t *testing.T) {
	t.Parallel()
	e := newBatchEnv(t)
	ctx := t.Context()
	e.account("a", Enforce)

	call := reserveOf("a", Tasks, 1, "k")
	call.TTL = time.Minute + 500*time.Nanosecond
	granted, err := e.svc.reserveBatch(ctx, []reserveCall{call})
	require.NoError(t, err)
	require.Equal(t, "granted", granted[0].Outcome)

	var stored time.Time
	err = e.pool.QueryRow(ctx, `SELECT expire_time FROM metering.reservations WHERE id = $1`,
		granted[0].Reservation.ID).Scan(&stored)
	require.NoError(t, err)
	assert.Equal(t, stored.UTC(), granted[0].Reservation.ExpireTime.UTC(), "returned expire_time differs from the stored one")

	replayed, err := e.svc.reserveBatch(ctx, []reserveCall{call})
	require.NoError(t, err)
	require.Equal(t, "replayed", replayed[0].Outcome)
	assert.Equal(t, replayed[0].Reservation.ExpireTime.UTC(), granted[0].Reservation.ExpireTime.UTC(),
		"a replay returns another expire_time than the first response")
}
