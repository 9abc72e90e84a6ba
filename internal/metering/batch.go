package metering

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/big"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The batch path runs a batch of reserves, or of commits, in one transaction
// of two pipelined round trips. The first locks the batch's accounts in id
// order and reads what the decisions need. The service then decides each
// call in Go, in batch order, and the second round trip writes every
// decision with one set-based statement and commits. Some calls are left to
// the per-call SQL function, metering.reserve or metering.commit: an
// idempotent replay, a commit of an expired reservation, a metric with a
// running total. Those run in the same transaction, after the batch's writes.
//
// The rules are those of the SQL functions, and the tests run every reserve
// and commit through this path. PostgreSQL then does set-based reads and
// writes instead of one function call per request, which is most of the CPU
// that a busy Metering spends.

// batchSettingsSQL sets the planner for the rest of a batch transaction.
// Every batch statement looks rows up by key, and planning one costs more
// than running it, so each is planned once per connection and reused. A plan
// made while a table was small would scan that table on every later
// execution, so scans and hash or merge joins are ruled out while an index
// can serve.
const batchSettingsSQL = `
SELECT set_config('plan_cache_mode', 'force_generic_plan', true),
       set_config('enable_seqscan', 'off', true),
       set_config('enable_hashjoin', 'off', true),
       set_config('enable_mergejoin', 'off', true)`

// lockAccountsSQL locks the accounts of a batch in id order and returns each
// one's current billing period. Every batch locks shared accounts in the
// same order, so two batches cannot deadlock on them.
const lockAccountsSQL = `
SELECT a.id, a.plan_id, a.enforcement, p.period_start, p.period_end
FROM metering.accounts a
CROSS JOIN LATERAL metering.period_bounds(a.billing_anchor, $2) p
WHERE a.id = ANY ($1::text[])
ORDER BY a.id
FOR NO KEY UPDATE OF a`

// findKeysSQL returns the idempotency keys of a batch that are already used.
const findKeysSQL = `
SELECT k.account_id, k.key
FROM unnest($1::text[], $2::text[]) AS u (account_id, key)
JOIN metering.idempotency_keys k ON k.account_id = u.account_id AND k.key = u.key`

// counterStateSQL reads the counters named by the parallel arrays (account,
// metric, parent, kind). Each row has the counter's position in the arrays,
// its usage in the current period or in total, the amount that unexpired
// pending reservations hold, and the plan's limit. The limit is -1 when
// unlimited, and 0 when the plan has no limit row, which denies as in
// metering.counter_state.
// Each value is a subquery on an index, so the plan is the same whatever the
// parameters and PostgreSQL can reuse it.
const counterStateSQL = `
SELECT w.ord,
       coalesce((SELECT c.used FROM metering.counters c
                 WHERE c.account_id = w.account_id AND c.metric = w.metric AND c.parent_id = w.parent_id
                   AND c.period_start = w.period_start), 0),
       least(coalesce((SELECT sum(i.amount)
                       FROM metering.reservations r,
                            unnest(r.metrics, r.parent_ids, r.amounts) AS i (metric, parent_id, amount)
                       WHERE r.account_id = w.account_id AND r.state = 'pending' AND r.expire_time > $5
                         AND i.metric = w.metric AND (w.parent_id = '' OR i.parent_id = w.parent_id)), 0),
             9223372036854775807)::bigint,
       coalesce((SELECT CASE WHEN l.unlimited THEN -1 ELSE l.max_amount END
                 FROM metering.plan_limits l
                 WHERE l.plan_id = w.plan_id AND l.metric = w.metric
                   AND l.scope = CASE WHEN w.parent_id = '' THEN 'account' ELSE 'parent' END), 0)
FROM (
    SELECT u.ord, u.account_id, u.metric, u.parent_id, a.plan_id,
           CASE WHEN u.kind = 'period' THEN (metering.period_bounds(a.billing_anchor, $5)).period_start
                ELSE '-infinity'::timestamptz END AS period_start
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
         AS u (account_id, metric, parent_id, kind, ord)
    JOIN metering.accounts a ON a.id = u.account_id
) w`

// insertReservationsSQL stores granted reservations and their idempotency
// keys. Reservation i has the items at positions lo[i]..hi[i] of the
// flattened item arrays.
const insertReservationsSQL = `
WITH r AS (
    INSERT INTO metering.reservations (id, account_id, state, metrics, parent_ids, amounts, resource_id,
                                       idempotency_key, actor, create_time, expire_time)
    SELECT u.id::uuid, u.account_id, 'pending', ($7::text[])[u.lo:u.hi], ($8::text[])[u.lo:u.hi],
           ($9::bigint[])[u.lo:u.hi], u.resource_id, u.key, u.actor, $10, u.expire_time
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                $11::int[], $12::int[])
         AS u (id, account_id, resource_id, key, actor, expire_time, lo, hi)
)
INSERT INTO metering.idempotency_keys (account_id, key, request_hash, reservation_id, create_time)
SELECT u.account_id, u.key, u.hash, u.id::uuid, $10
FROM unnest($1::text[], $2::text[], $4::text[], $13::bytea[]) AS u (id, account_id, key, hash)
WHERE u.key <> ''`

// lockReservationsSQL locks the reservations of a batch of commits in id
// order and returns them.
const lockReservationsSQL = `
SELECT r.id::text, r.account_id, r.state, r.metrics, r.parent_ids, r.amounts, r.resource_id,
       r.idempotency_key, r.create_time, r.expire_time
FROM metering.reservations r
JOIN unnest($1::text[], $2::text[]) AS u (id, account_id)
  ON r.id = u.id::uuid AND r.account_id = u.account_id
ORDER BY r.id
FOR UPDATE OF r`

// commitReservationsSQL marks reservations committed, adds the committed
// amounts to the counters, and appends one ledger row per counter changed,
// as metering.apply_usage does for one call. The counter rows arrive summed
// per counter and sorted, so concurrent writers lock them in the same order.
const commitReservationsSQL = `
WITH done AS (
    UPDATE metering.reservations r
    SET state = 'committed', committed_amounts = ($3::bigint[])[u.lo:u.hi], resource_id = u.resource_id,
        finish_time = $4
    FROM unnest($1::text[], $2::text[], $5::int[], $6::int[]) AS u (id, resource_id, lo, hi)
    WHERE r.id = u.id::uuid
),
added AS (
    INSERT INTO metering.counters AS t (account_id, metric, parent_id, period_start, used)
    SELECT * FROM unnest($7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::bigint[])
    ON CONFLICT (account_id, metric, parent_id, period_start) DO UPDATE SET used = t.used + excluded.used
)
INSERT INTO metering.usage_events (account_id, metric, parent_id, period_start, amount, kind,
                                   resource_id, reservation_id, actor, reason, create_time)
SELECT u.account_id, u.metric, u.parent_id, u.period_start, u.amount, 'commit',
       u.resource_id, u.reservation_id::uuid, u.actor, '', $4
FROM unnest($12::text[], $13::text[], $14::text[], $15::timestamptz[], $16::bigint[], $17::text[],
            $18::text[], $19::text[])
     AS u (account_id, metric, parent_id, period_start, amount, resource_id, reservation_id, actor)`

const (
	reserveSQL = `SELECT metering.reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`
	commitSQL  = `SELECT metering.commit($1, $2, $3, $4, $5, $6, $7, $8)`
)

// reserveCall is one reserve of a batch.
type reserveCall struct {
	AccountID  string
	Metrics    []string
	ParentIDs  []string
	Amounts    []int64
	Key        string
	Hash       []byte
	TTL        time.Duration
	ResourceID string
	Actor      string
}

// commitCall is one commit of a batch.
type commitCall struct {
	AccountID     string
	ReservationID string
	Metrics       []string
	ParentIDs     []string
	Amounts       []int64
	ResourceID    string
	Actor         string
}

// account is a locked account row with its current billing period.
type account struct {
	plan        string
	enforcement string
	period      Period
}

// counterKey names one counter of one account; parent is "" for the
// account-wide counter.
type counterKey struct {
	account, metric, parent string
}

// itemCounter is one counter that a list of items touches and the sum of
// the amounts it receives.
type itemCounter struct {
	metric, parent string
	kind           Kind
	amount         int64
}

// counterState is one row of counterStateSQL.
type counterState struct {
	used, reserved, limit int64
	unlimited             bool
}

// itemCounters expands items into the counters they touch, in the order of
// metering.item_counters: each item counts for its metric's account-wide
// counter, and an item with a parent also for the per-parent counter when
// the metric has one. Items that touch the same counter are summed. It
// reports false when a metric is not in the catalog.
func itemCounters(metrics, parents []string, amounts []int64) ([]itemCounter, bool) {
	out := make([]itemCounter, 0, 2*len(metrics))
	add := func(metric, parent string, kind Kind, amount int64) {
		for i := range out {
			if out[i].metric == metric && out[i].parent == parent {
				out[i].amount = addClamped(out[i].amount, amount)
				return
			}
		}
		out = append(out, itemCounter{metric: metric, parent: parent, kind: kind, amount: amount})
	}
	for i, m := range metrics {
		info, ok := Info(Metric(m))
		if !ok {
			return nil, false
		}
		add(m, "", info.AccountKind, amounts[i])
		if parents[i] != "" && info.ParentKind != "" {
			add(m, parents[i], info.ParentKind, amounts[i])
		}
	}
	return out, true
}

// addClamped returns a + b, clamped to the int64 range as the SQL functions
// clamp sums with least().
func addClamped(a, b int64) int64 {
	switch {
	case b > 0 && a > math.MaxInt64-b:
		return math.MaxInt64
	case b < 0 && a < math.MinInt64-b:
		return math.MinInt64
	}
	return a + b
}

// check returns the counter as the SQL functions render it, whether used +
// reserved + requested exceeds the limit, and whether it overflows 64 bits.
func (st counterState) check(c itemCounter, requested int64) (counter Counter, overflow bool) {
	sum := new(big.Int).SetInt64(st.used)
	sum.Add(sum, big.NewInt(st.reserved))
	sum.Add(sum, big.NewInt(requested))
	counter = Counter{
		Metric:    Metric(c.metric),
		Scope:     ScopeAccount,
		ParentID:  c.parent,
		Kind:      c.kind,
		Used:      st.used,
		Reserved:  st.reserved,
		Unlimited: st.unlimited,
		Requested: requested,
	}
	if c.parent != "" {
		counter.Scope = ScopeParent
	}
	if !st.unlimited {
		limit := st.limit
		counter.Limit = &limit
		counter.Exceeded = sum.Cmp(big.NewInt(limit)) > 0
	}
	return counter, !sum.IsInt64()
}

// batchTx runs the two round trips of a batch on one connection. It begins
// the transaction with the first pipeline and commits it with the second.
type batchTx struct {
	conn   *pgxpool.Conn
	open   bool
	closed bool
}

func beginBatch(ctx context.Context, pool *pgxpool.Pool) (*batchTx, error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return &batchTx{conn: conn}, nil
}

// send runs the queued statements as one pipeline. The first call prepends
// BEGIN; with commit, COMMIT follows them, and send fails when the
// transaction did not commit. A last pipeline with no statements, such as
// a batch of rejections, ends with ROLLBACK instead. Such a transaction only
// read and locked rows, and a rollback does not wait for a WAL flush.
func (t *batchTx) send(ctx context.Context, b *pgx.Batch, commit bool) error {
	if !t.open {
		b.QueuedQueries = append([]*pgx.QueuedQuery{{SQL: "BEGIN"}, {SQL: batchSettingsSQL}}, b.QueuedQueries...)
		t.open = true
	}
	var committed bool
	if commit {
		end := "COMMIT"
		if b.Len() == 0 {
			end = "ROLLBACK"
		}
		b.Queue(end).Exec(func(tag pgconn.CommandTag) error {
			committed = tag.String() == end
			return nil
		})
	}
	if err := t.conn.SendBatch(ctx, b).Close(); err != nil {
		return err
	}
	if commit {
		if !committed {
			return errors.New("the batch transaction did not commit")
		}
		t.closed = true
	}
	return nil
}

// release ends a transaction that did not commit and returns the connection
// to the pool. A connection left inside a transaction is closed by the pool.
func (t *batchTx) release() {
	if t.open && !t.closed {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = t.conn.Exec(ctx, "ROLLBACK")
	}
	t.conn.Release()
}

// accountIDs returns the distinct ids, sorted.
func accountIDs[T any](calls []T, id func(T) string) []string {
	ids := make([]string, 0, len(calls))
	for _, c := range calls {
		ids = append(ids, id(c))
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

func queueLockAccounts(b *pgx.Batch, ids []string, now time.Time, into map[string]account) {
	b.Queue(lockAccountsSQL, ids, now).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var id string
			var a account
			if err := rows.Scan(&id, &a.plan, &a.enforcement, &a.period.Start, &a.period.End); err != nil {
				return err
			}
			a.period.Start, a.period.End = a.period.Start.UTC(), a.period.End.UTC()
			into[id] = a
		}
		return rows.Err()
	})
}

// counterStates collects counters to read with counterStateSQL, each once.
type counterStates struct {
	index                      map[counterKey]int
	accounts, metrics, parents []string
	kinds                      []string
	states                     []counterState
}

func newCounterStates() *counterStates {
	return &counterStates{index: make(map[counterKey]int)}
}

func (cs *counterStates) add(acct string, c itemCounter) {
	k := counterKey{account: acct, metric: c.metric, parent: c.parent}
	if _, ok := cs.index[k]; ok {
		return
	}
	cs.index[k] = len(cs.accounts)
	cs.accounts = append(cs.accounts, acct)
	cs.metrics = append(cs.metrics, c.metric)
	cs.parents = append(cs.parents, c.parent)
	cs.kinds = append(cs.kinds, string(c.kind))
}

func (cs *counterStates) get(acct string, c itemCounter) *counterState {
	return &cs.states[cs.index[counterKey{account: acct, metric: c.metric, parent: c.parent}]]
}

// queue reads the counters' states with the statements queued before it.
// Every counter's account must exist, as a locked account does.
func (cs *counterStates) queue(b *pgx.Batch, now time.Time) {
	cs.states = make([]counterState, len(cs.accounts))
	if len(cs.accounts) == 0 {
		return
	}
	b.Queue(counterStateSQL, cs.accounts, cs.metrics, cs.parents, cs.kinds, now).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var ord int
			var st counterState
			if err := rows.Scan(&ord, &st.used, &st.reserved, &st.limit); err != nil {
				return err
			}
			st.unlimited = st.limit < 0
			cs.states[ord-1] = st
		}
		return rows.Err()
	})
}

// reserveBatch runs calls as one transaction and returns one result per
// call, in order, as metering.reserve renders it.
func (s *Service) reserveBatch(ctx context.Context, calls []reserveCall) ([]result, error) {
	now := s.now().Truncate(time.Microsecond)
	tx, err := beginBatch(ctx, s.pool)
	if err != nil {
		return nil, translate(err)
	}
	defer tx.release()

	// What each call needs: its counters, when every metric is known, and
	// its idempotency key.
	counters := make([][]itemCounter, len(calls))
	states := newCounterStates()
	var keyAccounts, keys []string
	for i, c := range calls {
		if cnt, ok := itemCounters(c.Metrics, c.ParentIDs, c.Amounts); ok {
			counters[i] = cnt
			for _, ic := range cnt {
				states.add(c.AccountID, ic)
			}
		}
		if c.Key != "" {
			keyAccounts = append(keyAccounts, c.AccountID)
			keys = append(keys, c.Key)
		}
	}

	accounts := make(map[string]account)
	usedKeys := make(map[[2]string]bool)
	first := &pgx.Batch{}
	queueLockAccounts(first, accountIDs(calls, func(c reserveCall) string { return c.AccountID }), now, accounts)
	if len(keys) > 0 {
		first.Queue(findKeysSQL, keyAccounts, keys).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var k [2]string
				if err := rows.Scan(&k[0], &k[1]); err != nil {
					return err
				}
				usedKeys[k] = true
			}
			return rows.Err()
		})
	}
	states.queue(first, now)
	if err := tx.send(ctx, first, false); err != nil {
		return nil, translate(err)
	}

	results := make([]result, len(calls))
	var ins reservationRows
	second := &pgx.Batch{}
	var slow []int
	for i, c := range calls {
		acct, ok := accounts[c.AccountID]
		if !ok {
			results[i] = result{Outcome: "account_not_found"}
			continue
		}
		key := [2]string{c.AccountID, c.Key}
		if counters[i] == nil || (c.Key != "" && usedKeys[key]) || slices.ContainsFunc(c.Amounts, func(a int64) bool { return a < 0 }) {
			// The per-call function replays the key, or rejects a reused
			// one, after the batch's own keys are stored.
			slow = append(slow, i)
			continue
		}
		if c.Key != "" {
			usedKeys[key] = true
		}
		results[i] = decideReserve(c, counters[i], acct, states)
		if results[i].Outcome != "granted" {
			continue
		}
		for _, ic := range counters[i] {
			st := states.get(c.AccountID, ic)
			st.reserved = addClamped(st.reserved, ic.amount)
		}
		res, err := ins.add(c, now)
		if err != nil {
			return nil, err
		}
		results[i].Reservation = res
	}

	if len(ins.ids) > 0 {
		second.Queue(insertReservationsSQL, ins.ids, ins.accounts, ins.resources, ins.keys, ins.actors,
			ins.expires, ins.metrics, ins.parents, ins.amounts, now, ins.lo, ins.hi, ins.hashes)
	}
	for _, i := range slow {
		c := calls[i]
		second.Queue(reserveSQL, c.AccountID, c.Metrics, c.ParentIDs, c.Amounts, c.Key, c.Hash,
			pgtype.Interval{Microseconds: c.TTL.Microseconds(), Valid: true}, c.ResourceID, c.Actor, now,
		).QueryRow(func(row pgx.Row) error { return row.Scan(&results[i]) })
	}
	if err := tx.send(ctx, second, true); err != nil {
		return nil, translate(err)
	}
	return results, nil
}

// decideReserve checks one reserve against the counters' states, which
// include the reservations granted earlier in the batch, as metering.reserve
// does: an overflow first, then a limit the account enforces.
func decideReserve(c reserveCall, counters []itemCounter, acct account, states *counterStates) result {
	usage := make([]Counter, len(counters))
	var overflow, exceeded bool
	for j, ic := range counters {
		var o bool
		usage[j], o = states.get(c.AccountID, ic).check(ic, ic.amount)
		overflow = overflow || o
		exceeded = exceeded || usage[j].Exceeded
	}
	switch {
	case overflow:
		return result{Outcome: "overflow", Usage: usage}
	case exceeded && Enforcement(acct.enforcement) == Enforce:
		return result{Outcome: "rejected", Usage: usage, PeriodStart: acct.period.Start, PeriodEnd: acct.period.End}
	}
	return result{Outcome: "granted", Usage: usage, PeriodStart: acct.period.Start, PeriodEnd: acct.period.End}
}

// reservationRows are granted reservations as insertReservationsSQL reads
// them.
type reservationRows struct {
	ids, accounts, resources, keys, actors []string
	expires                                []time.Time
	hashes                                 [][]byte
	lo, hi                                 []int32
	metrics, parents                       []string
	amounts                                []int64
}

// add appends a granted reserve to the rows and returns the reservation
// that its response carries.
func (r *reservationRows) add(c reserveCall, now time.Time) (*reservationJSON, error) {
	id, err := uuid.NewRandom()
	if err != nil {
		return nil, fmt.Errorf("generate a reservation id: %w", err)
	}
	// PostgreSQL stores microseconds, and the response must match the row.
	expire := now.Add(c.TTL.Truncate(time.Microsecond))

	r.ids = append(r.ids, id.String())
	r.accounts = append(r.accounts, c.AccountID)
	r.resources = append(r.resources, c.ResourceID)
	r.keys = append(r.keys, c.Key)
	r.actors = append(r.actors, c.Actor)
	r.expires = append(r.expires, expire)
	r.hashes = append(r.hashes, c.Hash)
	r.lo = append(r.lo, int32(len(r.metrics)+1))
	r.metrics = append(r.metrics, c.Metrics...)
	r.parents = append(r.parents, c.ParentIDs...)
	r.amounts = append(r.amounts, c.Amounts...)
	r.hi = append(r.hi, int32(len(r.metrics)))

	return &reservationJSON{
		ID:             id.String(),
		AccountID:      c.AccountID,
		State:          string(Pending),
		Metrics:        c.Metrics,
		ParentIDs:      c.ParentIDs,
		Amounts:        c.Amounts,
		ResourceID:     c.ResourceID,
		IdempotencyKey: c.Key,
		CreateTime:     now,
		ExpireTime:     expire,
	}, nil
}

// lockedReservation is a reservation row as lockReservationsSQL returns it.
type lockedReservation struct {
	reservationJSON
	done bool
}

// commitBatch runs calls as one transaction and returns one result per
// call, in order, as metering.commit renders it.
func (s *Service) commitBatch(ctx context.Context, calls []commitCall) ([]result, error) {
	now := s.now().Truncate(time.Microsecond)
	tx, err := beginBatch(ctx, s.pool)
	if err != nil {
		return nil, translate(err)
	}
	defer tx.release()

	var ids, idAccounts []string
	for _, c := range calls {
		if uuid.Validate(c.ReservationID) == nil {
			ids = append(ids, c.ReservationID)
			idAccounts = append(idAccounts, c.AccountID)
		}
	}
	accounts := make(map[string]account)
	reservations := make(map[string]*lockedReservation)
	first := &pgx.Batch{}
	queueLockAccounts(first, accountIDs(calls, func(c commitCall) string { return c.AccountID }), now, accounts)
	first.Queue(lockReservationsSQL, ids, idAccounts).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var r lockedReservation
			if err := rows.Scan(&r.ID, &r.AccountID, &r.State, &r.Metrics, &r.ParentIDs, &r.Amounts,
				&r.ResourceID, &r.IdempotencyKey, &r.CreateTime, &r.ExpireTime); err != nil {
				return err
			}
			reservations[r.ID] = &r
		}
		return rows.Err()
	})
	if err := tx.send(ctx, first, false); err != nil {
		return nil, translate(err)
	}
	// Expiry is decided by a clock read after the locks. A reserve that held
	// them first may have freed an expiring reservation's capacity meanwhile.
	decided := s.now().Truncate(time.Microsecond)
	if decided.Before(now) {
		decided = now
	}

	results := make([]result, len(calls))
	var rows commitRows
	states := newCounterStates()
	type fastCommit struct {
		call     int
		counters []itemCounter
	}
	var fast []fastCommit
	var slow []int
	for i, c := range calls {
		if _, ok := accounts[c.AccountID]; !ok {
			results[i] = result{Outcome: "reservation_not_found"}
			continue
		}
		id, err := uuid.Parse(c.ReservationID)
		if err != nil {
			slow = append(slow, i)
			continue
		}
		res, ok := reservations[id.String()]
		if !ok || res.AccountID != c.AccountID {
			results[i] = result{Outcome: "reservation_not_found"}
			continue
		}
		actual, ok := fastActual(c, res, decided)
		if !ok {
			slow = append(slow, i)
			continue
		}
		res.done = true
		resource := c.ResourceID
		if resource == "" {
			resource = res.ResourceID
		}
		acct := accounts[c.AccountID]
		counters, _ := itemCounters(res.Metrics, res.ParentIDs, actual)
		rows.add(c, res, acct, counters, actual, resource)
		for j := range counters {
			counters[j].amount = 0
			states.add(c.AccountID, counters[j])
		}
		fast = append(fast, fastCommit{call: i, counters: counters})

		committed := res.reservationJSON
		committed.State = string(Committed)
		committed.CommittedAmounts = actual
		committed.ResourceID = resource
		results[i] = result{Outcome: "committed", Reservation: &committed}
	}

	second := &pgx.Batch{}
	if len(rows.ids) > 0 {
		sums, err := rows.counterSums()
		if err != nil {
			return nil, err
		}
		second.Queue(commitReservationsSQL, rows.ids, rows.resources, rows.actual, now, rows.lo, rows.hi,
			sums.accounts, sums.metrics, sums.parents, sums.periods, sums.amounts,
			rows.events.accounts, rows.events.metrics, rows.events.parents, rows.events.periods,
			rows.events.amounts, rows.events.resources, rows.events.reservations, rows.events.actors)
	}
	// NOTE: every fast commit reports the usage after all of the batch's
	// fast commits, so it may include the calls after it in the batch.
	// metering.commit, run call by call, would report each step.
	states.queue(second, now)
	for _, i := range slow {
		c := calls[i]
		second.Queue(commitSQL, c.AccountID, c.ReservationID, c.Metrics, c.ParentIDs, c.Amounts,
			c.ResourceID, c.Actor, decided,
		).QueryRow(func(row pgx.Row) error { return row.Scan(&results[i]) })
	}
	if err := tx.send(ctx, second, true); err != nil {
		return nil, translate(err)
	}

	for _, f := range fast {
		acct := calls[f.call].AccountID
		usage := make([]Counter, len(f.counters))
		for j, ic := range f.counters {
			usage[j], _ = states.get(acct, ic).check(ic, 0)
		}
		results[f.call].Usage = usage
	}
	return results, nil
}

// fastActual returns the amounts to commit for each reserved item, or false
// when the per-call function must decide the commit. The batch path decides
// it when the reservation is pending, unexpired and not committed earlier in
// the batch, and the resource matches. The actual items must name reserved
// items at most once each, within their amounts. No item may add to a
// running total, because those record the resource for RecordDeletion.
func fastActual(c commitCall, res *lockedReservation, now time.Time) ([]int64, bool) {
	if res.done || State(res.State) != Pending || !res.ExpireTime.After(now) {
		return nil, false
	}
	if c.ResourceID != "" && res.ResourceID != "" && c.ResourceID != res.ResourceID {
		return nil, false
	}
	for _, m := range res.Metrics {
		info, ok := Info(Metric(m))
		if !ok || info.HasRunningTotal() {
			return nil, false
		}
	}
	actual := slices.Clone(res.Amounts)
	named := make([]bool, len(res.Amounts))
	for i, m := range c.Metrics {
		j := slices.IndexFunc(res.Metrics, func(rm string) bool { return rm == m })
		for j >= 0 && res.ParentIDs[j] != c.ParentIDs[i] {
			next := slices.IndexFunc(res.Metrics[j+1:], func(rm string) bool { return rm == m })
			if next < 0 {
				j = -1
				break
			}
			j += next + 1
		}
		if j < 0 || named[j] || c.Amounts[i] < 0 || c.Amounts[i] > res.Amounts[j] {
			return nil, false
		}
		named[j] = true
		actual[j] = c.Amounts[i]
	}
	return actual, true
}

// commitRows are fast commits as commitReservationsSQL reads them.
type commitRows struct {
	ids, resources []string
	actual         []int64
	lo, hi         []int32
	events         counterChanges
}

// counterChanges are parallel arrays of counter changes.
type counterChanges struct {
	accounts, metrics, parents []string
	periods                    []pgtype.Timestamptz
	amounts                    []int64
	resources, reservations    []string
	actors                     []string
}

func (r *commitRows) add(c commitCall, res *lockedReservation, acct account, counters []itemCounter, actual []int64, resource string) {
	r.ids = append(r.ids, res.ID)
	r.resources = append(r.resources, resource)
	r.lo = append(r.lo, int32(len(r.actual)+1))
	r.actual = append(r.actual, actual...)
	r.hi = append(r.hi, int32(len(r.actual)))
	for _, ic := range counters {
		if ic.amount == 0 {
			continue
		}
		period := pgtype.Timestamptz{InfinityModifier: pgtype.NegativeInfinity, Valid: true}
		if ic.kind == PeriodCounter {
			period = pgtype.Timestamptz{Time: acct.period.Start, Valid: true}
		}
		e := &r.events
		e.accounts = append(e.accounts, c.AccountID)
		e.metrics = append(e.metrics, ic.metric)
		e.parents = append(e.parents, ic.parent)
		e.periods = append(e.periods, period)
		e.amounts = append(e.amounts, ic.amount)
		e.resources = append(e.resources, resource)
		e.reservations = append(e.reservations, res.ID)
		e.actors = append(e.actors, c.Actor)
	}
}

// errSumOverflow fails a batch of commits whose amounts for one counter
// add up past the int64 range. The coalescer then runs each commit on its
// own, and the one that would overflow the counter fails as in
// metering.commit.
var errSumOverflow = fmt.Errorf("%w: the commits of the batch add up past the int64 range", ErrOverflow)

// counterSums sums the changes per counter, sorted by account, metric,
// parent and period, so that each counter row is written once and
// concurrent writers lock rows in the same order.
func (r *commitRows) counterSums() (counterChanges, error) {
	type key struct {
		account, metric, parent string
		period                  int64
		infinite                bool
	}
	e := r.events
	order := make([]int, 0, len(e.amounts))
	sums := make(map[key]int)
	var out counterChanges
	for i := range e.amounts {
		k := key{e.accounts[i], e.metrics[i], e.parents[i], e.periods[i].Time.UnixMicro(), e.periods[i].InfinityModifier != 0}
		if j, ok := sums[k]; ok {
			if e.amounts[i] > math.MaxInt64-out.amounts[j] {
				return counterChanges{}, errSumOverflow
			}
			out.amounts[j] += e.amounts[i]
			continue
		}
		sums[k] = len(out.amounts)
		order = append(order, len(out.amounts))
		out.accounts = append(out.accounts, e.accounts[i])
		out.metrics = append(out.metrics, e.metrics[i])
		out.parents = append(out.parents, e.parents[i])
		out.periods = append(out.periods, e.periods[i])
		out.amounts = append(out.amounts, e.amounts[i])
	}
	slices.SortFunc(order, func(a, b int) int {
		if c := cmp.Compare(out.accounts[a], out.accounts[b]); c != 0 {
			return c
		}
		if c := cmp.Compare(out.metrics[a], out.metrics[b]); c != 0 {
			return c
		}
		if c := cmp.Compare(out.parents[a], out.parents[b]); c != 0 {
			return c
		}
		return out.periods[a].Time.Compare(out.periods[b].Time)
	})
	sorted := counterChanges{}
	for _, i := range order {
		sorted.accounts = append(sorted.accounts, out.accounts[i])
		sorted.metrics = append(sorted.metrics, out.metrics[i])
		sorted.parents = append(sorted.parents, out.parents[i])
		sorted.periods = append(sorted.periods, out.periods[i])
		sorted.amounts = append(sorted.amounts, out.amounts[i])
	}
	return sorted, nil
}
